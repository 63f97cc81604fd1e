//! The few packet shapes the switch reads and writes itself (everything TCP goes through
//! smoltcp). Parsing validates every length before use; emitting fills checksums.

use std::net::Ipv4Addr;

use smoltcp::wire::checksum;
use smoltcp::wire::IpProtocol;

use crate::stats::DropReason;

pub const IPV4_HDR: usize = 20;
pub const UDP_HDR: usize = 8;
pub const ICMP_HDR: usize = 8;
pub const TCP_HDR: usize = 20;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A parsed IPv4 header; `payload` is the bytes after the header, cut to the total length.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    pub dont_frag: bool,
    /// The whole packet (header and payload) without link padding.
    pub packet: &'a [u8],
    pub header_len: usize,
}

impl<'a> Ipv4<'a> {
    pub fn payload(&self) -> &'a [u8] {
        &self.packet[self.header_len..]
    }

    /// Parse and check an IPv4 packet: version, lengths, header checksum, no fragments.
    pub fn parse(buf: &'a [u8]) -> Result<Self, DropReason> {
        if buf.len() < IPV4_HDR {
            return Err(DropReason::Truncated);
        }
        if buf[0] >> 4 != 4 {
            return Err(DropReason::Malformed);
        }
        let header_len = usize::from(buf[0] & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if header_len < IPV4_HDR || total_len < header_len {
            return Err(DropReason::Malformed);
        }
        if buf.len() < total_len {
            return Err(DropReason::Truncated);
        }
        if checksum::data(&buf[..header_len]) != !0 {
            return Err(DropReason::BadChecksum);
        }
        let flags_frag = u16::from_be_bytes([buf[6], buf[7]]);
        let more_frags = flags_frag & 0x2000 != 0;
        let frag_offset = flags_frag & 0x1fff;
        if more_frags || frag_offset != 0 {
            return Err(DropReason::Fragment);
        }
        Ok(Ipv4 {
            src: Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]),
            dst: Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]),
            protocol: buf[9],
            ttl: buf[8],
            dont_frag: flags_frag & 0x4000 != 0,
            packet: &buf[..total_len],
            header_len,
        })
    }
}

/// A parsed UDP header (checksum verified when present).
#[derive(Clone, Copy, Debug)]
pub struct Udp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

impl<'a> Udp<'a> {
    pub fn parse(ip: &Ipv4<'a>) -> Result<Self, DropReason> {
        let seg = ip.payload();
        if seg.len() < UDP_HDR {
            return Err(DropReason::Truncated);
        }
        let len = usize::from(u16::from_be_bytes([seg[4], seg[5]]));
        if len < UDP_HDR || len > seg.len() {
            return Err(DropReason::Malformed);
        }
        let seg = &seg[..len];
        let sum = u16::from_be_bytes([seg[6], seg[7]]);
        if sum != 0 {
            let pseudo = checksum::pseudo_header_v4(&ip.src, &ip.dst, IpProtocol::Udp, len as u32);
            if checksum::combine(&[pseudo, checksum::data(seg)]) != !0 {
                return Err(DropReason::BadChecksum);
            }
        }
        Ok(Udp {
            src_port: u16::from_be_bytes([seg[0], seg[1]]),
            dst_port: u16::from_be_bytes([seg[2], seg[3]]),
            payload: &seg[UDP_HDR..],
        })
    }
}

/// The ports and flags of a TCP segment: all the switch needs to route it to a flow.
#[derive(Clone, Copy, Debug)]
pub struct TcpPorts {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub syn: bool,
    pub ack_flag: bool,
    pub rst: bool,
    pub fin: bool,
    pub payload_len: usize,
}

impl TcpPorts {
    pub fn parse(ip: &Ipv4<'_>) -> Result<Self, DropReason> {
        let seg = ip.payload();
        if seg.len() < TCP_HDR {
            return Err(DropReason::Truncated);
        }
        let off = usize::from(seg[12] >> 4) * 4;
        if off < TCP_HDR || off > seg.len() {
            return Err(DropReason::Malformed);
        }
        let flags = seg[13];
        Ok(TcpPorts {
            src_port: u16::from_be_bytes([seg[0], seg[1]]),
            dst_port: u16::from_be_bytes([seg[2], seg[3]]),
            seq: u32::from_be_bytes([seg[4], seg[5], seg[6], seg[7]]),
            ack: u32::from_be_bytes([seg[8], seg[9], seg[10], seg[11]]),
            fin: flags & 0x01 != 0,
            syn: flags & 0x02 != 0,
            rst: flags & 0x04 != 0,
            ack_flag: flags & 0x10 != 0,
            payload_len: seg.len() - off,
        })
    }
}

/// An ICMP echo request or reply.
#[derive(Clone, Copy, Debug)]
pub struct IcmpEcho<'a> {
    pub request: bool,
    pub ident: u16,
    pub seq: u16,
    pub data: &'a [u8],
}

impl<'a> IcmpEcho<'a> {
    /// `Ok(None)` for ICMP types other than echo.
    pub fn parse(ip: &Ipv4<'a>) -> Result<Option<Self>, DropReason> {
        let m = ip.payload();
        if m.len() < ICMP_HDR {
            return Err(DropReason::Truncated);
        }
        if checksum::data(m) != !0 {
            return Err(DropReason::BadChecksum);
        }
        let request = match (m[0], m[1]) {
            (8, 0) => true,
            (0, 0) => false,
            _ => return Ok(None),
        };
        Ok(Some(IcmpEcho {
            request,
            ident: u16::from_be_bytes([m[4], m[5]]),
            seq: u16::from_be_bytes([m[6], m[7]]),
            data: &m[ICMP_HDR..],
        }))
    }
}

/// Write a 20-byte IPv4 header (DF set, TTL 64) into `buf[..20]` for a packet of
/// `total_len` bytes.
pub fn emit_ipv4_header(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    total_len: usize,
    ident: u16,
) {
    write_ipv4_header(buf, src, dst, protocol, total_len, ident, 0x4000);
}

/// The 20-byte header with the given flags and fragment offset field.
fn write_ipv4_header(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    total_len: usize,
    ident: u16,
    flags_frag: u16,
) {
    buf[0] = 0x45;
    buf[1] = 0;
    buf[2..4].copy_from_slice(&(total_len as u16).to_be_bytes());
    buf[4..6].copy_from_slice(&ident.to_be_bytes());
    buf[6..8].copy_from_slice(&flags_frag.to_be_bytes());
    buf[8] = 64;
    buf[9] = protocol;
    buf[10..12].fill(0);
    buf[12..16].copy_from_slice(&src.octets());
    buf[16..20].copy_from_slice(&dst.octets());
    let sum = !checksum::data(&buf[..IPV4_HDR]);
    buf[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Write IPv4 + UDP headers and `payload` into `buf` (exactly `IPV4_HDR + UDP_HDR + payload.len()`).
pub fn emit_udp(
    buf: &mut [u8],
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
    ident: u16,
) {
    let udp_len = UDP_HDR + payload.len();
    emit_ipv4_header(buf, src, dst, PROTO_UDP, IPV4_HDR + udp_len, ident);
    emit_udp_segment(&mut buf[IPV4_HDR..], src, sport, dst, dport, payload);
}

/// Write the UDP header and payload (the IP payload of a UDP packet) into `seg`, with the
/// checksum over the IPv4 pseudo-header.
pub fn emit_udp_segment(
    seg: &mut [u8],
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) {
    let udp_len = UDP_HDR + payload.len();
    let seg = &mut seg[..udp_len];
    seg[0..2].copy_from_slice(&sport.to_be_bytes());
    seg[2..4].copy_from_slice(&dport.to_be_bytes());
    seg[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    seg[6..8].fill(0);
    seg[UDP_HDR..].copy_from_slice(payload);
    let pseudo = checksum::pseudo_header_v4(&src, &dst, IpProtocol::Udp, udp_len as u32);
    let mut sum = !checksum::combine(&[pseudo, checksum::data(seg)]);
    if sum == 0 {
        sum = 0xffff;
    }
    seg[6..8].copy_from_slice(&sum.to_be_bytes());
}

/// Write one IPv4 fragment: a header for `chunk` at byte `offset` (a multiple of 8) of
/// the original payload, with "more fragments" unless it is the last.
#[allow(clippy::too_many_arguments)]
pub fn emit_ipv4_fragment(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ident: u16,
    offset: usize,
    more: bool,
    chunk: &[u8],
) {
    let flags_frag = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
    write_ipv4_header(
        buf,
        src,
        dst,
        protocol,
        IPV4_HDR + chunk.len(),
        ident,
        flags_frag,
    );
    buf[IPV4_HDR..IPV4_HDR + chunk.len()].copy_from_slice(chunk);
}

/// Write IPv4 + ICMP echo (request or reply) into `buf`.
pub fn emit_icmp_echo(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    echo: &IcmpEcho<'_>,
    ident: u16,
) {
    let len = ICMP_HDR + echo.data.len();
    emit_ipv4_header(buf, src, dst, PROTO_ICMP, IPV4_HDR + len, ident);
    let m = &mut buf[IPV4_HDR..IPV4_HDR + len];
    m[0] = if echo.request { 8 } else { 0 };
    m[1] = 0;
    m[2..4].fill(0);
    m[4..6].copy_from_slice(&echo.ident.to_be_bytes());
    m[6..8].copy_from_slice(&echo.seq.to_be_bytes());
    m[ICMP_HDR..].copy_from_slice(echo.data);
    let sum = !checksum::data(m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
}

/// Write an ICMP "destination unreachable, fragmentation needed" (type 3 code 4) quoting
/// the start of `original` and advertising `mtu`. Returns the IP packet length.
pub fn icmp_frag_needed_len(original: &[u8]) -> usize {
    IPV4_HDR + ICMP_HDR + original.len().min(IPV4_HDR + 8 + 40)
}

pub fn emit_icmp_frag_needed(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    mtu: u16,
    original: &[u8],
    ident: u16,
) {
    let quoted = &original[..original.len().min(IPV4_HDR + 8 + 40)];
    let len = ICMP_HDR + quoted.len();
    emit_ipv4_header(buf, src, dst, PROTO_ICMP, IPV4_HDR + len, ident);
    let m = &mut buf[IPV4_HDR..IPV4_HDR + len];
    m[0] = 3;
    m[1] = 4;
    m[2..4].fill(0);
    m[4..6].fill(0);
    m[6..8].copy_from_slice(&mtu.to_be_bytes());
    m[ICMP_HDR..].copy_from_slice(quoted);
    let sum = !checksum::data(m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
}

/// Write IPv4 + a bare TCP RST answering a segment (RFC 793 reset generation).
pub fn emit_tcp_rst(
    buf: &mut [u8],
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    answering: &TcpPorts,
    ident: u16,
) {
    emit_ipv4_header(buf, src, dst, PROTO_TCP, IPV4_HDR + TCP_HDR, ident);
    let seg = &mut buf[IPV4_HDR..IPV4_HDR + TCP_HDR];
    seg.fill(0);
    seg[0..2].copy_from_slice(&sport.to_be_bytes());
    seg[2..4].copy_from_slice(&dport.to_be_bytes());
    let (seq, ack, flags) = if answering.ack_flag {
        (answering.ack, 0, 0x04)
    } else {
        let seg_len =
            answering.payload_len as u32 + u32::from(answering.syn) + u32::from(answering.fin);
        (0, answering.seq.wrapping_add(seg_len), 0x14)
    };
    seg[4..8].copy_from_slice(&seq.to_be_bytes());
    seg[8..12].copy_from_slice(&ack.to_be_bytes());
    seg[12] = 5 << 4;
    seg[13] = flags;
    let pseudo = checksum::pseudo_header_v4(&src, &dst, IpProtocol::Tcp, TCP_HDR as u32);
    let sum = !checksum::combine(&[pseudo, checksum::data(seg)]);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_roundtrip_and_checksum_detects_corruption() {
        let src = Ipv4Addr::new(10, 0, 0, 1);
        let dst = Ipv4Addr::new(10, 0, 0, 2);
        let mut buf = vec![0; IPV4_HDR + UDP_HDR + 5];
        emit_udp(&mut buf, src, 1000, dst, 53, b"hello", 7);
        let ip = Ipv4::parse(&buf).unwrap();
        assert_eq!((ip.src, ip.dst, ip.protocol), (src, dst, PROTO_UDP));
        let udp = Udp::parse(&ip).unwrap();
        assert_eq!(
            (udp.src_port, udp.dst_port, udp.payload),
            (1000, 53, &b"hello"[..])
        );
        buf[IPV4_HDR + UDP_HDR] ^= 1;
        let ip = Ipv4::parse(&buf).unwrap();
        assert_eq!(Udp::parse(&ip).unwrap_err(), DropReason::BadChecksum);
        buf[1] = 1; // header checksum no longer adds up
        assert_eq!(Ipv4::parse(&buf).unwrap_err(), DropReason::BadChecksum);
    }

    #[test]
    fn ipv4_rejects_bad_lengths_and_fragments() {
        let mut buf = vec![0; IPV4_HDR + 8];
        emit_ipv4_header(
            &mut buf,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::LOCALHOST,
            PROTO_UDP,
            28,
            1,
        );
        for cut in 0..IPV4_HDR {
            assert!(Ipv4::parse(&buf[..cut]).is_err());
        }
        assert_eq!(Ipv4::parse(&buf[..25]).unwrap_err(), DropReason::Truncated);
        let mut frag = buf.clone();
        frag[6] = 0x20; // more fragments
        frag[10..12].fill(0);
        let sum = !checksum::data(&frag[..20]);
        frag[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(Ipv4::parse(&frag).unwrap_err(), DropReason::Fragment);
        let mut v6 = buf.clone();
        v6[0] = 0x65;
        assert_eq!(Ipv4::parse(&v6).unwrap_err(), DropReason::Malformed);
    }
}
