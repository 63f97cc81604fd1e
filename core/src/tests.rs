//! Frame-level tests of the whole stack: a hand-driven guest on one side, the test as the
//! host on the other.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use rand_chacha::rand_core::SeedableRng;
use smoltcp::wire::{checksum, IpProtocol};

use crate::device::{ETHERTYPE_ARP, ETHERTYPE_IPV4, ETH_HDR};
use crate::stack::GuestFlows;
use crate::wire::{self, IcmpEcho, Ipv4, TcpPorts, Udp};
use crate::{Config, DropReason, FlowId, HostCommand, Instant, Rng, Stack};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;

fn guest_ip() -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 65, 3)
}

fn t(ms: i64) -> Instant {
    Instant::from_millis(ms)
}

fn stack() -> Stack {
    Stack::new(Config::default(), Rng::seed_from_u64(7), t(0)).unwrap()
}

fn eth(ethertype: u16, payload: &[u8], dst: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0; ETH_HDR + payload.len()];
    crate::device::write_eth(&mut f, dst, GUEST_MAC, ethertype);
    f[ETH_HDR..].copy_from_slice(payload);
    f
}

fn gw_mac() -> [u8; 6] {
    Config::default().gateway_mac
}

#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    // SYNs carry an MSS option, as every real stack sends.
    let opts: &[u8] = if flags & SYN != 0 {
        &[2, 4, 0x05, 0xb4]
    } else {
        &[]
    };
    let hdr = wire::TCP_HDR + opts.len();
    let tcp_len = hdr + payload.len();
    let mut p = vec![0; wire::IPV4_HDR + tcp_len];
    let total = p.len();
    wire::emit_ipv4_header(&mut p, *src.ip(), *dst.ip(), wire::PROTO_TCP, total, 1);
    let s = &mut p[wire::IPV4_HDR..];
    s[0..2].copy_from_slice(&src.port().to_be_bytes());
    s[2..4].copy_from_slice(&dst.port().to_be_bytes());
    s[4..8].copy_from_slice(&seq.to_be_bytes());
    s[8..12].copy_from_slice(&ack.to_be_bytes());
    s[12] = ((hdr / 4) as u8) << 4;
    s[13] = flags;
    s[14..16].copy_from_slice(&65535u16.to_be_bytes());
    s[wire::TCP_HDR..hdr].copy_from_slice(opts);
    s[hdr..].copy_from_slice(payload);
    let pseudo = checksum::pseudo_header_v4(src.ip(), dst.ip(), IpProtocol::Tcp, tcp_len as u32);
    let sum = !checksum::combine(&[pseudo, checksum::data(s)]);
    s[16..18].copy_from_slice(&sum.to_be_bytes());
    eth(ETHERTYPE_IPV4, &p, gw_mac())
}

fn udp_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0; wire::IPV4_HDR + wire::UDP_HDR + payload.len()];
    wire::emit_udp(
        &mut p,
        *src.ip(),
        src.port(),
        *dst.ip(),
        dst.port(),
        payload,
        9,
    );
    eth(ETHERTYPE_IPV4, &p, gw_mac())
}

/// Every frame the stack has for the guest.
fn drain_frames(s: &mut Stack) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(f) = s.peek_frame() {
        out.push(f.to_vec());
        s.pop_frame();
    }
    out
}

/// Owned copy of a command, so tests can hold several.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    Connect(FlowId, SocketAddr),
    Ready(FlowId),
    Shutdown(FlowId),
    Close(FlowId),
    Abort(FlowId),
    UdpSend(FlowId, SocketAddr, Vec<u8>),
    UdpClose(FlowId),
    Ping(FlowId, IpAddr, u16, Vec<u8>),
    PingClose(FlowId),
}

fn drain_cmds(s: &mut Stack) -> Vec<Cmd> {
    let mut out = Vec::new();
    while let Some(c) = s.poll_command() {
        out.push(match c {
            HostCommand::TcpConnect { flow, dst } => Cmd::Connect(flow, dst),
            HostCommand::TcpReady { flow } => Cmd::Ready(flow),
            HostCommand::TcpShutdownWrite { flow } => Cmd::Shutdown(flow),
            HostCommand::TcpClose { flow } => Cmd::Close(flow),
            HostCommand::TcpAbort { flow } => Cmd::Abort(flow),
            HostCommand::UdpSend { flow, dst, payload } => {
                Cmd::UdpSend(flow, dst, payload.to_vec())
            }
            HostCommand::UdpClose { flow } => Cmd::UdpClose(flow),
            HostCommand::PingSend {
                flow,
                dst,
                seq,
                payload,
            } => Cmd::Ping(flow, dst, seq, payload.to_vec()),
            HostCommand::PingClose { flow } => Cmd::PingClose(flow),
        });
    }
    out
}

struct Seg {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    p: TcpPorts,
    payload: Vec<u8>,
}

fn tcp_segments(frames: &[Vec<u8>]) -> Vec<Seg> {
    frames
        .iter()
        .filter_map(|f| {
            assert_eq!(&f[0..6], &GUEST_MAC, "frames go to the guest's MAC");
            let ip = Ipv4::parse(&f[ETH_HDR..]).ok()?;
            if ip.protocol != wire::PROTO_TCP {
                return None;
            }
            let p = TcpPorts::parse(&ip).unwrap();
            // Every emitted segment carries a valid checksum.
            let pseudo = checksum::pseudo_header_v4(
                &ip.src,
                &ip.dst,
                IpProtocol::Tcp,
                ip.payload().len() as u32,
            );
            assert_eq!(
                checksum::combine(&[pseudo, checksum::data(ip.payload())]),
                !0
            );
            let off = usize::from(ip.payload()[12] >> 4) * 4;
            Some(Seg {
                src: SocketAddrV4::new(ip.src, p.src_port),
                dst: SocketAddrV4::new(ip.dst, p.dst_port),
                payload: ip.payload()[off..].to_vec(),
                p,
            })
        })
        .collect()
}

/// A guest connection driven by hand.
struct Conn {
    guest: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
}

impl Conn {
    fn new(dst: SocketAddrV4) -> Self {
        Conn {
            guest: SocketAddrV4::new(guest_ip(), 40000),
            dst,
            seq: 1000,
            ack: 0,
        }
    }
    fn syn(&self) -> Vec<u8> {
        tcp_frame(self.guest, self.dst, self.seq, 0, SYN, &[])
    }
    fn send(&mut self, flags: u8, payload: &[u8]) -> Vec<u8> {
        let f = tcp_frame(self.guest, self.dst, self.seq, self.ack, flags, payload);
        self.seq = self
            .seq
            .wrapping_add(payload.len() as u32 + u32::from(flags & FIN != 0));
        f
    }
}

/// Open a connection through the whole handshake; returns the flow and the connection.
fn established(s: &mut Stack, now: &mut i64) -> (FlowId, Conn) {
    let mut c = Conn::new(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 80));
    s.handle_frame(t(*now), &c.syn());
    s.poll(t(*now));
    let cmds = drain_cmds(s);
    let [Cmd::Connect(flow, _)] = cmds[..] else {
        panic!("{cmds:?}")
    };
    s.tcp_connected(t(*now), flow);
    s.poll(t(*now));
    let segs = tcp_segments(&drain_frames(s));
    assert_eq!(segs.len(), 1);
    c.seq += 1;
    c.ack = segs[0].p.seq.wrapping_add(1);
    *now += 1;
    let ack = c.send(ACK, &[]);
    s.handle_frame(t(*now), &ack);
    s.poll(t(*now));
    drain_cmds(s);
    assert_eq!(s.tcp_flows()[0].state, "ESTABLISHED");
    (flow, c)
}

#[test]
fn syn_to_refused_port_gets_rst_and_no_synack_before() {
    let mut s = stack();
    let c = Conn::new(SocketAddrV4::new(Ipv4Addr::new(192, 168, 65, 2), 9));
    s.handle_frame(t(0), &c.syn());
    s.poll(t(0));
    let cmds = drain_cmds(&mut s);
    // The host alias leads to the host's loopback.
    let [Cmd::Connect(flow, dst)] = cmds[..] else {
        panic!("{cmds:?}")
    };
    assert_eq!(dst, "127.0.0.1:9".parse().unwrap());
    assert!(
        drain_frames(&mut s).is_empty(),
        "nothing for the guest before the host answers"
    );
    s.tcp_connect_failed(t(5), flow, crate::ConnectError::Refused);
    s.poll(t(5));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert_eq!(segs.len(), 1);
    assert!(segs[0].p.rst && segs[0].p.ack_flag);
    assert_eq!(segs[0].p.ack, c.seq + 1);
    assert_eq!(segs[0].src, c.dst);
    assert_eq!(s.tcp_flow_count(), 0);
}

#[test]
fn synack_only_after_connect_and_retransmitted_syn_is_one_flow() {
    let mut s = stack();
    let c = Conn::new(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 443));
    s.handle_frame(t(0), &c.syn());
    s.handle_frame(t(1000), &c.syn());
    s.handle_frame(t(3000), &c.syn());
    s.poll(t(3000));
    let cmds = drain_cmds(&mut s);
    assert_eq!(cmds.len(), 1, "one connect for three SYNs: {cmds:?}");
    let Cmd::Connect(flow, dst) = cmds[0] else {
        panic!()
    };
    assert_eq!(dst, "203.0.113.5:443".parse().unwrap());
    assert!(drain_frames(&mut s).is_empty());
    s.tcp_connected(t(3001), flow);
    s.poll(t(3001));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert_eq!(segs.len(), 1);
    assert!(segs[0].p.syn && segs[0].p.ack_flag);
    assert_eq!(segs[0].p.ack, c.seq + 1);
    assert_eq!(s.tcp_flow_count(), 1);
}

#[test]
fn data_round_trip_and_half_close_both_ways() {
    let mut s = stack();
    let mut now = 0;
    let (flow, mut c) = established(&mut s, &mut now);
    s.handle_frame(t(now), &c.send(ACK | PSH, b"hello"));
    s.poll(t(now));
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Ready(flow)]);
    assert_eq!(s.tcp_to_host(flow), b"hello");
    s.tcp_consume_to_host(flow, 5);
    assert_eq!(s.tcp_to_host(flow), b"");
    // Host answers.
    let n = s.tcp_from_host(flow, |buf| {
        buf[..5].copy_from_slice(b"world");
        (5, 5)
    });
    assert_eq!(n, Some(5));
    s.poll(t(now));
    let segs = tcp_segments(&drain_frames(&mut s));
    let data: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(data, b"world");
    c.ack = c.ack.wrapping_add(5);
    // Guest half-closes: the host write side is shut down, the other way keeps flowing.
    now += 1;
    s.handle_frame(t(now), &c.send(ACK | FIN, &[]));
    s.poll(t(now));
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Shutdown(flow)]);
    drain_frames(&mut s);
    s.tcp_from_host(flow, |buf| {
        buf[..4].copy_from_slice(b"more");
        (4, ())
    });
    s.tcp_host_eof(flow);
    s.poll(t(now));
    let segs = tcp_segments(&drain_frames(&mut s));
    let data: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(
        data, b"more",
        "the reply after the guest's FIN still arrives"
    );
    assert!(
        segs.last().unwrap().p.fin,
        "host EOF becomes a FIN after the data"
    );
    c.ack = c.ack.wrapping_add(5);
    now += 1;
    s.handle_frame(t(now), &c.send(ACK, &[]));
    s.poll(t(now));
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Close(flow)]);
    assert_eq!(s.tcp_flow_count(), 0);
}

#[test]
fn commands_come_before_the_egress_pass_and_a_due_ack_still_goes_out() {
    let mut s = stack();
    let mut now = 0;
    let (flow, mut c) = established(&mut s, &mut now);
    drain_frames(&mut s);
    s.handle_frame(t(now), &c.send(ACK | PSH, b"hello"));
    // `service` hands the host its work without an egress pass.
    s.service();
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Ready(flow)]);
    assert_eq!(s.tcp_to_host(flow), b"hello");
    s.tcp_consume_to_host(flow, 5);
    s.poll(t(now));
    // The ACK is delayed (1 ms by default), and polls that follow no change skip the
    // egress pass...
    assert!(drain_frames(&mut s).is_empty());
    let half = Instant::from_micros(t(now).total_micros() + 500);
    s.poll(half);
    assert!(drain_frames(&mut s).is_empty());
    let due = s.poll_timeout().expect("the delayed ACK is a deadline");
    assert!(due <= t(now + 1), "{due}");
    // ...but not once smoltcp's timer is due: the ACK goes out with nothing new in.
    s.poll(due);
    let segs = tcp_segments(&drain_frames(&mut s));
    assert_eq!(segs.len(), 1, "one pure ACK");
    assert!(segs[0].payload.is_empty());
    assert_eq!(segs[0].p.ack, c.seq, "acknowledges the 5 bytes");
}

#[test]
fn host_eof_first_then_guest_fin_closes_cleanly() {
    let mut s = stack();
    let mut now = 0;
    let (flow, mut c) = established(&mut s, &mut now);
    s.tcp_host_eof(flow);
    s.poll(t(now));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(segs[0].p.fin);
    c.ack = c.ack.wrapping_add(1);
    // The guest may still send after the host's EOF.
    s.handle_frame(t(now), &c.send(ACK | PSH, b"late"));
    s.poll(t(now));
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Ready(flow)]);
    assert_eq!(s.tcp_to_host(flow), b"late");
    s.tcp_consume_to_host(flow, 4);
    s.handle_frame(t(now), &c.send(ACK | FIN, &[]));
    s.poll(t(now));
    assert_eq!(
        drain_cmds(&mut s),
        vec![Cmd::Close(flow)],
        "closing covers the write side"
    );
}

#[test]
fn rst_each_way() {
    let mut s = stack();
    let mut now = 0;
    let (flow, mut c) = established(&mut s, &mut now);
    s.handle_frame(t(now), &c.send(RST, &[]));
    s.poll(t(now));
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Abort(flow)]);
    assert_eq!(s.tcp_flow_count(), 0);

    let mut s = stack();
    let (flow, _c) = established(&mut s, &mut now);
    s.tcp_host_reset(flow);
    s.poll(t(now));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert_eq!(segs.len(), 1);
    assert!(segs[0].p.rst);
    assert_eq!(s.tcp_flow_count(), 0);
    assert!(drain_cmds(&mut s).is_empty(), "the host side already knows");
}

#[test]
fn backpressure_guest_window_closes_when_host_does_not_read() {
    let mut cfg = Config::default();
    cfg.tcp.rx_buffer = 4096;
    let mut s = Stack::new(cfg, Rng::seed_from_u64(1), t(0)).unwrap();
    let mut now = 0;
    let (flow, mut c) = established(&mut s, &mut now);
    let chunk = [7u8; 1000];
    for _ in 0..4 {
        s.handle_frame(t(now), &c.send(ACK, &chunk));
    }
    s.poll(t(now));
    drain_cmds(&mut s);
    let segs = tcp_segments(&drain_frames(&mut s));
    let last = segs.last().expect("an ACK");
    assert_eq!(last.p.ack, c.seq, "all data acknowledged");
    assert_eq!(s.tcp_flows()[0].to_host_queued, 4000);
    // One more segment beyond the window is not accepted into the buffer.
    s.handle_frame(t(now), &c.send(ACK, &chunk));
    s.poll(t(now));
    assert!(s.tcp_flows()[0].to_host_queued <= 4096);
    // The host drains: the flow is ready again and a window update goes out.
    let n = s.tcp_to_host(flow).len();
    s.tcp_consume_to_host(flow, n);
    s.poll(t(now));
    assert!(
        !drain_frames(&mut s).is_empty(),
        "window update after the host read"
    );
}

#[test]
fn host_read_blocked_until_guest_acks() {
    let mut cfg = Config::default();
    cfg.tcp.tx_buffer = 2000;
    let mut s = Stack::new(cfg, Rng::seed_from_u64(1), t(0)).unwrap();
    let mut now = 0;
    let (flow, mut c) = established(&mut s, &mut now);
    let wrote = s.tcp_from_host(flow, |b| (b.len(), b.len())).unwrap();
    assert_eq!(wrote, 2000);
    assert_eq!(
        s.tcp_from_host(flow, |b| (b.len(), ())),
        None,
        "no room: host reads stop"
    );
    s.poll(t(now));
    let segs = tcp_segments(&drain_frames(&mut s));
    let sent: usize = segs.iter().map(|s| s.payload.len()).sum();
    assert_eq!(sent, 2000);
    drain_cmds(&mut s);
    c.ack = c.ack.wrapping_add(2000);
    s.handle_frame(t(now), &c.send(ACK, &[]));
    s.poll(t(now));
    assert_eq!(
        drain_cmds(&mut s),
        vec![Cmd::Ready(flow)],
        "room again: the host is told"
    );
    assert_eq!(s.tcp_room(flow), 2000);
}

#[test]
fn udp_nat_replies_from_two_remotes() {
    let mut s = stack();
    let guest = SocketAddrV4::new(guest_ip(), 5000);
    s.handle_frame(
        t(0),
        &udp_frame(
            guest,
            SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 7),
            b"ping",
        ),
    );
    s.handle_frame(
        t(0),
        &udp_frame(
            guest,
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 65, 2), 8),
            b"ping2",
        ),
    );
    s.poll(t(0));
    let cmds = drain_cmds(&mut s);
    let [Cmd::UdpSend(f1, d1, ref p1), Cmd::UdpSend(f2, d2, ref p2)] = cmds[..] else {
        panic!("{cmds:?}")
    };
    assert_eq!(f1, f2, "one NAT entry per guest source");
    assert_eq!(
        (d1, p1.as_slice()),
        ("198.51.100.1:7".parse().unwrap(), &b"ping"[..])
    );
    assert_eq!(
        (d2, p2.as_slice()),
        ("127.0.0.1:8".parse().unwrap(), &b"ping2"[..])
    );
    s.udp_from_host(t(1), f1, "198.51.100.1:7".parse().unwrap(), b"pong");
    s.udp_from_host(t(1), f1, "198.51.100.9:99".parse().unwrap(), b"other");
    s.udp_from_host(t(1), f1, "127.0.0.1:8".parse().unwrap(), b"loop");
    let frames = drain_frames(&mut s);
    let got: Vec<(SocketAddrV4, SocketAddrV4, Vec<u8>)> = frames
        .iter()
        .map(|f| {
            let ip = Ipv4::parse(&f[ETH_HDR..]).unwrap();
            let u = Udp::parse(&ip).unwrap();
            (
                SocketAddrV4::new(ip.src, u.src_port),
                SocketAddrV4::new(ip.dst, u.dst_port),
                u.payload.to_vec(),
            )
        })
        .collect();
    assert_eq!(
        got[0],
        ("198.51.100.1:7".parse().unwrap(), guest, b"pong".to_vec())
    );
    assert_eq!(
        got[1],
        ("198.51.100.9:99".parse().unwrap(), guest, b"other".to_vec())
    );
    assert_eq!(
        got[2],
        ("192.168.65.2:8".parse().unwrap(), guest, b"loop".to_vec()),
        "loopback appears as the host alias"
    );
    // Idle expiry closes the host socket.
    s.poll(t(61_000));
    assert_eq!(drain_cmds(&mut s), vec![Cmd::UdpClose(f1)]);
    assert_eq!(s.udp_flow_count(), 0);
}

#[test]
fn udp_flow_cap_evicts_oldest() {
    let mut cfg = Config::default();
    cfg.udp.max_flows = 2;
    let mut s = Stack::new(cfg, Rng::seed_from_u64(1), t(0)).unwrap();
    let dst = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 7);
    for (i, port) in [5000u16, 5001, 5002].into_iter().enumerate() {
        s.handle_frame(
            t(i as i64),
            &udp_frame(SocketAddrV4::new(guest_ip(), port), dst, b"x"),
        );
    }
    s.poll(t(3));
    let cmds = drain_cmds(&mut s);
    assert!(cmds.contains(&Cmd::UdpClose(FlowId(1))), "{cmds:?}");
    assert_eq!(s.udp_flow_count(), 2);
    assert_eq!(s.stats().dropped(DropReason::UdpEvicted), 1);
}

#[test]
fn ping_identifier_round_trip_and_gateway_answers_itself() {
    let mut s = stack();
    let dst = Ipv4Addr::new(192, 168, 65, 2);
    let mut p = vec![0; wire::IPV4_HDR + wire::ICMP_HDR + 4];
    let echo = IcmpEcho {
        request: true,
        ident: 0x4242,
        seq: 3,
        data: b"abcd",
    };
    wire::emit_icmp_echo(&mut p, guest_ip(), dst, &echo, 1);
    s.handle_frame(t(0), &eth(ETHERTYPE_IPV4, &p, gw_mac()));
    s.poll(t(0));
    let cmds = drain_cmds(&mut s);
    let [Cmd::Ping(flow, to, 3, ref data)] = cmds[..] else {
        panic!("{cmds:?}")
    };
    assert_eq!(
        (to, data.as_slice()),
        (IpAddr::V4(Ipv4Addr::LOCALHOST), &b"abcd"[..])
    );
    assert!(drain_frames(&mut s).is_empty(), "no forged reply");
    s.ping_reply(t(1), flow, 3, b"abcd");
    let frames = drain_frames(&mut s);
    let ip = Ipv4::parse(&frames[0][ETH_HDR..]).unwrap();
    let r = IcmpEcho::parse(&ip).unwrap().unwrap();
    assert_eq!(
        (ip.src, ip.dst, r.request, r.ident, r.seq, r.data),
        (dst, guest_ip(), false, 0x4242, 3, &b"abcd"[..])
    );

    wire::emit_icmp_echo(&mut p, guest_ip(), Ipv4Addr::new(192, 168, 65, 1), &echo, 1);
    s.handle_frame(t(2), &eth(ETHERTYPE_IPV4, &p, gw_mac()));
    s.poll(t(2));
    assert!(drain_cmds(&mut s).is_empty());
    assert_eq!(drain_frames(&mut s).len(), 1);
}

#[test]
fn arp_answers_gateway_and_host_alias_only() {
    let mut s = stack();
    let arp = |target: Ipv4Addr| {
        let mut p = vec![0u8; 28];
        let repr = smoltcp::wire::ArpRepr::EthernetIpv4 {
            operation: smoltcp::wire::ArpOperation::Request,
            source_hardware_addr: smoltcp::wire::EthernetAddress(GUEST_MAC),
            source_protocol_addr: guest_ip(),
            target_hardware_addr: smoltcp::wire::EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        repr.emit(&mut smoltcp::wire::ArpPacket::new_unchecked(&mut p[..]));
        eth(ETHERTYPE_ARP, &p, [0xff; 6])
    };
    s.handle_frame(t(0), &arp(Ipv4Addr::new(192, 168, 65, 1)));
    s.handle_frame(t(0), &arp(Ipv4Addr::new(192, 168, 65, 2)));
    s.handle_frame(t(0), &arp(Ipv4Addr::new(192, 168, 65, 77)));
    let frames = drain_frames(&mut s);
    assert_eq!(frames.len(), 2);
    for (f, ip) in frames.iter().zip([[192, 168, 65, 1], [192, 168, 65, 2]]) {
        assert_eq!(&f[0..6], &GUEST_MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(
            &f[ETH_HDR + 14..ETH_HDR + 18],
            &ip,
            "sender protocol address"
        );
        assert_eq!(&f[ETH_HDR + 8..ETH_HDR + 14], &gw_mac());
    }
}

#[test]
fn dhcp_dora_through_frames() {
    use smoltcp::wire::{DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress};
    let mut s = stack();
    let mut leases = Vec::new();
    for mac_last in [0x10u8, 0x11] {
        let mac = [0x02, 0, 0, 0, 0, mac_last];
        let mut addr = None;
        for (mt, xid) in [
            (DhcpMessageType::Discover, 1u32),
            (DhcpMessageType::Request, 2),
        ] {
            let repr = DhcpRepr {
                message_type: mt,
                transaction_id: xid,
                secs: 0,
                client_hardware_address: EthernetAddress(mac),
                client_ip: Ipv4Addr::UNSPECIFIED,
                your_ip: Ipv4Addr::UNSPECIFIED,
                server_ip: Ipv4Addr::UNSPECIFIED,
                router: None,
                subnet_mask: None,
                relay_agent_ip: Ipv4Addr::UNSPECIFIED,
                broadcast: true,
                requested_ip: addr,
                client_identifier: Some(EthernetAddress(mac)),
                server_identifier: addr.map(|_| Ipv4Addr::new(192, 168, 65, 1)),
                parameter_request_list: None,
                dns_servers: None,
                max_size: None,
                lease_duration: None,
                renew_duration: None,
                rebind_duration: None,
                additional_options: &[],
            };
            let mut payload = vec![0; repr.buffer_len()];
            repr.emit(&mut DhcpPacket::new_unchecked(&mut payload[..]))
                .unwrap();
            let mut p = vec![0; wire::IPV4_HDR + wire::UDP_HDR + payload.len()];
            wire::emit_udp(
                &mut p,
                Ipv4Addr::UNSPECIFIED,
                68,
                Ipv4Addr::BROADCAST,
                67,
                &payload,
                1,
            );
            let mut f = vec![0; ETH_HDR + p.len()];
            crate::device::write_eth(&mut f, [0xff; 6], mac, ETHERTYPE_IPV4);
            f[ETH_HDR..].copy_from_slice(&p);
            s.handle_frame(t(0), &f);
            let frames = drain_frames(&mut s);
            assert_eq!(frames.len(), 1, "one reply to {mt:?}");
            let ip = Ipv4::parse(&frames[0][ETH_HDR..]).unwrap();
            let udp = Udp::parse(&ip).unwrap();
            assert_eq!(
                (ip.src, udp.src_port, udp.dst_port),
                (Ipv4Addr::new(192, 168, 65, 1), 67, 68)
            );
            let packet = DhcpPacket::new_checked(udp.payload).unwrap();
            let reply = DhcpRepr::parse(&packet).unwrap();
            let want = if mt == DhcpMessageType::Discover {
                DhcpMessageType::Offer
            } else {
                DhcpMessageType::Ack
            };
            assert_eq!(reply.message_type, want);
            assert_eq!(reply.router, Some(Ipv4Addr::new(192, 168, 65, 1)));
            addr = Some(reply.your_ip);
        }
        leases.push(addr.unwrap());
    }
    assert_eq!(
        leases,
        vec![
            Ipv4Addr::new(192, 168, 65, 3),
            Ipv4Addr::new(192, 168, 65, 4)
        ]
    );
    assert_eq!(s.leases().count(), 2);
}

#[test]
fn malformed_input_is_counted_and_dropped() {
    let mut s = stack();
    let good = udp_frame(
        SocketAddrV4::new(guest_ip(), 1),
        SocketAddrV4::new(Ipv4Addr::new(1, 2, 3, 4), 2),
        b"x",
    );
    // Every truncation of a good frame, a bad IP checksum, a bad UDP checksum, an unknown
    // ethertype, a frame for another MAC: all dropped and counted, none relayed.
    for cut in 0..good.len() {
        s.handle_frame(t(0), &good[..cut]);
    }
    let mut bad = good.clone();
    bad[ETH_HDR + 10] ^= 0xff;
    s.handle_frame(t(0), &bad);
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    s.handle_frame(t(0), &bad);
    s.handle_frame(t(0), &eth(0x86dd, &[0; 40], gw_mac()));
    s.handle_frame(t(0), &eth(0x1234, &[0; 40], gw_mac()));
    let mut other = good.clone();
    other[0..6].copy_from_slice(&[0x02, 9, 9, 9, 9, 9]);
    s.handle_frame(t(0), &other);
    let mut bad_len = good.clone();
    bad_len[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&9000u16.to_be_bytes());
    s.handle_frame(t(0), &bad_len);
    s.poll(t(0));
    assert!(drain_cmds(&mut s).is_empty());
    assert!(drain_frames(&mut s).is_empty());
    let st = s.stats();
    assert_eq!(st.dropped(DropReason::Truncated), good.len() as u64 + 1);
    assert!(st.dropped(DropReason::BadChecksum) >= 2);
    assert_eq!(st.dropped(DropReason::UnknownEthertype), 2);
    assert_eq!(st.dropped(DropReason::UnknownDestination), 1);
    // And the good frame still works afterwards.
    s.handle_frame(t(0), &good);
    s.poll(t(0));
    assert_eq!(drain_cmds(&mut s).len(), 1);
}

#[test]
fn tcp_flow_limit_refuses_with_rst() {
    let mut cfg = Config::default();
    cfg.tcp.max_pending_connects = 1;
    let mut s = Stack::new(cfg, Rng::seed_from_u64(1), t(0)).unwrap();
    let dst = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 80);
    s.handle_frame(
        t(0),
        &tcp_frame(SocketAddrV4::new(guest_ip(), 1), dst, 1, 0, SYN, &[]),
    );
    s.handle_frame(
        t(0),
        &tcp_frame(SocketAddrV4::new(guest_ip(), 2), dst, 1, 0, SYN, &[]),
    );
    s.poll(t(0));
    assert_eq!(drain_cmds(&mut s).len(), 1);
    let segs = tcp_segments(&drain_frames(&mut s));
    assert_eq!(segs.len(), 1);
    assert!(segs[0].p.rst);
    assert_eq!(segs[0].dst.port(), 2);
    assert_eq!(s.stats().dropped(DropReason::TcpPendingLimit), 1);
}

#[test]
fn connect_timeout_resets_guest_and_aborts_host() {
    let mut s = stack();
    let c = Conn::new(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 80));
    s.handle_frame(t(0), &c.syn());
    s.poll(t(0));
    let [Cmd::Connect(flow, _)] = drain_cmds(&mut s)[..] else {
        panic!()
    };
    let deadline = s
        .poll_timeout()
        .expect("a deadline for the pending connect");
    assert_eq!(deadline, t(30_000));
    s.poll(deadline);
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Abort(flow)]);
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(segs[0].p.rst);
    assert_eq!(s.tcp_flow_count(), 0);
}

#[test]
fn same_seed_same_output() {
    let run = |seed| {
        let mut s = Stack::new(Config::default(), Rng::seed_from_u64(seed), t(0)).unwrap();
        let mut now = 0;
        let (flow, _) = established(&mut s, &mut now);
        s.tcp_from_host(flow, |b| {
            b[..3].copy_from_slice(b"abc");
            (3, ())
        });
        s.poll(t(now));
        drain_frames(&mut s)
    };
    assert_eq!(run(1), run(1));
    assert_ne!(
        run(1),
        run(2),
        "the seed reaches the initial sequence numbers"
    );
}

#[test]
fn mtu_shrink_shrinks_segments_and_answers_big_guest_packets() {
    let mut s = stack();
    let mut now = 0;
    let (flow, mut c) = established(&mut s, &mut now);
    s.tcp_from_host(flow, |b| (3000.min(b.len()), ()));
    s.poll(t(now));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(
        segs.iter().any(|s| s.payload.len() == 1460),
        "full-size segments at MTU 1500"
    );
    c.ack = c.ack.wrapping_add(3000);
    s.handle_frame(t(now), &c.send(ACK, &[]));
    s.set_mtu(t(now), 1280).unwrap();
    s.tcp_from_host(flow, |b| (3000.min(b.len()), ()));
    s.poll(t(now));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(!segs.is_empty());
    assert!(
        segs.iter().all(|s| s.payload.len() <= 1240),
        "segments fit the new MTU"
    );
    // The guest, not told, still sends 1400-byte packets with DF: it learns the MTU.
    let big = c.send(ACK, &[1u8; 1360]);
    s.handle_frame(t(now), &big);
    s.poll(t(now));
    let frames = drain_frames(&mut s);
    let icmp: Vec<_> = frames
        .iter()
        .filter_map(|f| {
            let ip = Ipv4::parse(&f[ETH_HDR..]).ok()?;
            (ip.protocol == wire::PROTO_ICMP).then(|| ip.payload().to_vec())
        })
        .collect();
    assert_eq!(icmp.len(), 1);
    assert_eq!((icmp[0][0], icmp[0][1]), (3, 4), "fragmentation needed");
    assert_eq!(u16::from_be_bytes([icmp[0][6], icmp[0][7]]), 1280);
    assert_eq!(checksum::data(&icmp[0]), !0);
    // The quoted header names the guest's packet.
    assert_eq!(&icmp[0][8 + 12..8 + 16], &guest_ip().octets());
    assert_eq!(s.stats().dropped(DropReason::TooBig), 1);
    assert_eq!(
        s.tcp_flows()[0].to_host_queued,
        0,
        "the oversized segment was not taken"
    );
}

/// Found by the fuzzer: a SYN to port 0 used to reach `listen`, which refuses port 0, and
/// the failure path decremented the pending-connect count twice (overflow panic).
#[test]
fn syn_to_port_zero_is_refused_without_a_connect() {
    let mut s = stack();
    let dst = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 0);
    s.handle_frame(
        t(0),
        &tcp_frame(SocketAddrV4::new(guest_ip(), 1234), dst, 1, 0, SYN, &[]),
    );
    s.poll(t(0));
    assert!(drain_cmds(&mut s).is_empty());
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(segs[0].p.rst);
    assert_eq!(s.stats().dropped(DropReason::TcpRejected), 1);
    assert_eq!(s.tcp_flow_count(), 0);
}

#[test]
fn large_udp_reply_is_fragmented_to_the_guest_mtu() {
    let mut s = stack();
    let guest = SocketAddrV4::new(guest_ip(), 5353);
    let remote = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 53);
    s.handle_frame(t(0), &udp_frame(guest, remote, b"q"));
    s.poll(t(0));
    let [Cmd::UdpSend(flow, ..)] = drain_cmds(&mut s)[..] else {
        panic!()
    };
    let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
    s.udp_from_host(t(1), flow, remote.into(), &payload);
    let frames = drain_frames(&mut s);
    assert_eq!(frames.len(), 3, "4008 bytes of UDP in 1480-byte fragments");
    // Reassemble by offset and check the UDP datagram, checksum included.
    let mut whole = vec![0u8; 8 + payload.len()];
    let mut ident = None;
    for f in &frames {
        assert!(f.len() - ETH_HDR <= 1500);
        let ip = &f[ETH_HDR..];
        assert_eq!(checksum::data(&ip[..20]), !0);
        let id = u16::from_be_bytes([ip[4], ip[5]]);
        assert_eq!(
            *ident.get_or_insert(id),
            id,
            "one identifier for all fragments"
        );
        let fl = u16::from_be_bytes([ip[6], ip[7]]);
        let off = usize::from(fl & 0x1fff) * 8;
        let len = usize::from(u16::from_be_bytes([ip[2], ip[3]])) - 20;
        whole[off..off + len].copy_from_slice(&ip[20..20 + len]);
        assert_eq!(
            fl & 0x2000 != 0,
            off + len < whole.len(),
            "MF on all but the last"
        );
    }
    let pseudo = checksum::pseudo_header_v4(
        remote.ip(),
        &guest_ip(),
        IpProtocol::Udp,
        whole.len() as u32,
    );
    assert_eq!(checksum::combine(&[pseudo, checksum::data(&whole)]), !0);
    assert_eq!(&whole[8..], &payload[..]);
}

/// Regression found by the simulator (scenarios/idle_connection.toml): smoltcp's socket
/// timeout counts from the guest's last segment even on an idle connection, so every flow
/// idle for 5 minutes was reset. Keep-alives keep a live guest's idle flow open, and still
/// end the flow of a guest that went silent.
#[test]
fn idle_flow_survives_and_silent_guest_is_given_up() {
    let mut s = stack();
    let mut now = 0;
    let (flow, mut c) = established(&mut s, &mut now);
    let step = |s: &mut Stack, now: &mut i64, end: i64| {
        let next = s.poll_timeout().map_or(end, |t| t.total_millis());
        *now = next.clamp(*now + 1, end);
        s.poll(t(*now));
        tcp_segments(&drain_frames(s))
    };
    // Twenty idle minutes; the guest answers every keep-alive.
    let end = now + 20 * 60 * 1000;
    let mut probes = 0;
    while now < end {
        for seg in step(&mut s, &mut now, end) {
            assert!(!seg.p.rst, "idle flow reset at {now} ms");
            probes += 1;
            s.handle_frame(t(now), &c.send(ACK, &[]));
            s.poll(t(now));
        }
    }
    assert!(probes > 0, "keep-alives were sent");
    assert_eq!(s.tcp_flow_count(), 1);
    assert!(!drain_cmds(&mut s).contains(&Cmd::Abort(flow)));
    // Now the guest is gone: the flow is given up and the host side reset.
    let end = now + 15 * 60 * 1000;
    let mut cmds = Vec::new();
    while now < end && s.tcp_flow_count() > 0 {
        step(&mut s, &mut now, end);
        cmds.extend(drain_cmds(&mut s));
    }
    assert_eq!(s.tcp_flow_count(), 0);
    assert!(cmds.contains(&Cmd::Abort(flow)), "{cmds:?}");
}

/// Learn the guest's MAC as an ARP exchange would.
fn learn_guest(s: &mut Stack) {
    let mut p = vec![0u8; 28];
    let repr = smoltcp::wire::ArpRepr::EthernetIpv4 {
        operation: smoltcp::wire::ArpOperation::Request,
        source_hardware_addr: smoltcp::wire::EthernetAddress(GUEST_MAC),
        source_protocol_addr: guest_ip(),
        target_hardware_addr: smoltcp::wire::EthernetAddress([0; 6]),
        target_protocol_addr: Ipv4Addr::new(192, 168, 65, 1),
    };
    repr.emit(&mut smoltcp::wire::ArpPacket::new_unchecked(&mut p[..]));
    s.handle_frame(t(0), &eth(ETHERTYPE_ARP, &p, [0xff; 6]));
    drain_frames(s);
}

#[test]
fn inbound_connection_into_the_guest() {
    let mut s = stack();
    learn_guest(&mut s);
    let guest = SocketAddrV4::new(guest_ip(), 80);
    let flow = s
        .tcp_open_inbound(t(0), guest.into(), "127.0.0.1:45000".parse().unwrap())
        .unwrap();
    s.poll(t(0));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert_eq!(segs.len(), 1);
    assert!(segs[0].p.syn && !segs[0].p.ack_flag);
    // A loopback client appears as the host alias, with its own port.
    assert_eq!(segs[0].src, "192.168.65.2:45000".parse().unwrap());
    assert_eq!(segs[0].dst, guest);
    assert!(
        drain_cmds(&mut s).is_empty(),
        "nothing for the host before the guest accepts"
    );
    assert_eq!(
        s.tcp_open_inbound(t(0), guest.into(), "127.0.0.1:45000".parse().unwrap()),
        Err(crate::InboundError::Busy)
    );
    // The guest accepts.
    let isn = segs[0].p.seq;
    let mut c = Conn {
        guest,
        dst: segs[0].src,
        seq: 7000,
        ack: isn.wrapping_add(1),
    };
    s.handle_frame(
        t(1),
        &tcp_frame(c.guest, c.dst, c.seq, c.ack, SYN | ACK, &[]),
    );
    c.seq += 1;
    s.poll(t(1));
    assert_eq!(
        drain_cmds(&mut s),
        vec![Cmd::Ready(flow)],
        "room for the client's bytes"
    );
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(
        segs.iter().all(|x| !x.p.syn && x.p.ack_flag),
        "the handshake's ACK"
    );
    s.tcp_from_host(flow, |b| {
        b[..3].copy_from_slice(b"GET");
        (3, ())
    });
    s.poll(t(1));
    let data: Vec<u8> = tcp_segments(&drain_frames(&mut s))
        .iter()
        .flat_map(|x| x.payload.clone())
        .collect();
    assert_eq!(data, b"GET");
    c.ack = c.ack.wrapping_add(3);
    s.handle_frame(t(2), &c.send(ACK | PSH, b"200"));
    s.poll(t(2));
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Ready(flow)]);
    assert_eq!(s.tcp_to_host(flow), b"200");
}

#[test]
fn inbound_refused_by_the_guest_resets_the_client() {
    let mut s = stack();
    // The guest's MAC is unknown: the gateway asks for it first.
    let guest = SocketAddrV4::new(guest_ip(), 81);
    let flow = s
        .tcp_open_inbound(t(0), guest.into(), "198.51.100.7:5555".parse().unwrap())
        .unwrap();
    s.poll(t(0));
    let frames = drain_frames(&mut s);
    assert_eq!(frames.len(), 1);
    assert_eq!(&frames[0][12..14], &[0x08, 0x06], "an ARP request");
    assert_eq!(&frames[0][ETH_HDR + 24..ETH_HDR + 28], &guest_ip().octets());
    learn_guest(&mut s);
    // smoltcp retransmits the SYN; the guest answers it with a RST.
    let deadline = s.poll_timeout().unwrap();
    s.poll(deadline);
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(segs[0].p.syn);
    assert_eq!(
        segs[0].src,
        "198.51.100.7:5555".parse().unwrap(),
        "a remote client keeps its address"
    );
    let rst = tcp_frame(
        guest,
        segs[0].src,
        0,
        segs[0].p.seq.wrapping_add(1),
        RST | ACK,
        &[],
    );
    s.handle_frame(deadline, &rst);
    s.poll(deadline);
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Abort(flow)]);
    assert_eq!(s.tcp_flow_count(), 0);
}

#[test]
fn udp_forward_into_the_guest_and_back() {
    let mut s = stack();
    learn_guest(&mut s);
    let guest = SocketAddrV4::new(guest_ip(), 53);
    let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let flow = s.udp_inbound(t(0), client, guest.into(), b"query").unwrap();
    let frames = drain_frames(&mut s);
    let ip = Ipv4::parse(&frames[0][ETH_HDR..]).unwrap();
    let u = Udp::parse(&ip).unwrap();
    assert_eq!(
        (
            SocketAddrV4::new(ip.src, u.src_port),
            SocketAddrV4::new(ip.dst, u.dst_port)
        ),
        ("192.168.65.2:40000".parse().unwrap(), guest)
    );
    assert_eq!(u.payload, b"query");
    // The same client again: the same flow.
    assert_eq!(
        s.udp_inbound(t(1), client, guest.into(), b"again").unwrap(),
        flow
    );
    drain_frames(&mut s);
    // The guest's reply goes to the client, not out through a new NAT entry.
    s.handle_frame(
        t(2),
        &udp_frame(guest, "192.168.65.2:40000".parse().unwrap(), b"answer"),
    );
    s.poll(t(2));
    assert_eq!(
        drain_cmds(&mut s),
        vec![Cmd::UdpSend(flow, client, b"answer".to_vec())]
    );
    assert_eq!(s.udp_flow_count(), 1);
    s.poll(t(62_002));
    assert_eq!(drain_cmds(&mut s), vec![Cmd::UdpClose(flow)]);
    assert_eq!(s.udp_flow_count(), 0);
}

#[test]
fn inbound_to_an_ipv6_guest_is_unaddressable() {
    // Flow keys are family-neutral, but the packet path is IPv4-only: an IPv6 guest
    // address is refused (never a panic) and leaves nothing behind.
    let mut s = stack();
    learn_guest(&mut s);
    let guest: SocketAddr = "[fd00::3]:80".parse().unwrap();
    let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    assert_eq!(
        s.tcp_open_inbound(t(0), guest, client),
        Err(crate::InboundError::Unaddressable)
    );
    assert_eq!(
        s.udp_inbound(t(0), client, guest, b"x"),
        Err(crate::InboundError::Unaddressable)
    );
    s.poll(t(0));
    assert!(drain_frames(&mut s).is_empty());
    assert!(drain_cmds(&mut s).is_empty());
    assert!(s.is_idle());
}

fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// An answer to `query` with one A record.
fn dns_answer(query: &[u8], addr: [u8; 4]) -> Vec<u8> {
    let mut a = query.to_vec();
    a[2] = 0x81;
    a[3] = 0x80;
    a[7] = 1;
    a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    a.extend_from_slice(&addr);
    a
}

fn dns_stack() -> Stack {
    let mut dns = crate::dns::DnsConfig::new(
        Ipv4Addr::new(192, 168, 65, 1).into(),
        Some(Ipv4Addr::new(192, 168, 65, 2).into()),
    );
    dns.upstream_groups = vec![vec!["127.0.0.1:5353".parse().unwrap()]];
    let cfg = Config {
        dns: Some(dns),
        ..Config::default()
    };
    Stack::new(cfg, Rng::seed_from_u64(3), t(0)).unwrap()
}

fn udp_payloads(frames: &[Vec<u8>]) -> Vec<(SocketAddrV4, SocketAddrV4, Vec<u8>)> {
    frames
        .iter()
        .filter_map(|f| {
            let ip = Ipv4::parse(&f[ETH_HDR..]).ok()?;
            let u = Udp::parse(&ip).ok()?;
            Some((
                SocketAddrV4::new(ip.src, u.src_port),
                SocketAddrV4::new(ip.dst, u.dst_port),
                u.payload.to_vec(),
            ))
        })
        .collect()
}

#[test]
fn dns_over_udp_is_forwarded_and_answered_from_the_gateway() {
    let mut s = dns_stack();
    let guest = SocketAddrV4::new(guest_ip(), 5000);
    let gw53: SocketAddrV4 = "192.168.65.1:53".parse().unwrap();
    let q = dns_query(0x1234, "example.com", 1);
    s.handle_frame(t(0), &udp_frame(guest, gw53, &q));
    s.poll(t(0));
    let cmds = drain_cmds(&mut s);
    let [Cmd::UdpSend(flow, dst, ref sent)] = cmds[..] else {
        panic!("{cmds:?}")
    };
    assert_eq!(dst, "127.0.0.1:5353".parse().unwrap());
    assert_eq!(
        &sent[2..],
        &q[2..],
        "the query goes on unchanged but for its ID"
    );
    assert_ne!(&sent[..2], &q[..2], "a fresh ID upstream");
    // A forged answer (wrong ID) is dropped; the real one reaches the guest with its ID.
    let mut forged = dns_answer(sent, [6, 6, 6, 6]);
    forged[0] ^= 0xff;
    s.udp_from_host(t(1), flow, dst, &forged);
    assert!(drain_frames(&mut s).is_empty());
    s.udp_from_host(t(1), flow, dst, &dns_answer(sent, [93, 184, 216, 34]));
    let got = udp_payloads(&drain_frames(&mut s));
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1), (gw53, guest));
    assert_eq!(
        got[0].2,
        dns_answer(&q, [93, 184, 216, 34]),
        "byte for byte, with the guest's ID"
    );
    assert_eq!(
        s.udp_flow_count(),
        1,
        "only the gateway's own upstream flow"
    );
}

#[test]
fn dns_static_names_and_servfail_when_upstream_is_silent() {
    let mut s = dns_stack();
    let guest = SocketAddrV4::new(guest_ip(), 5001);
    let gw53: SocketAddrV4 = "192.168.65.1:53".parse().unwrap();
    s.handle_frame(
        t(0),
        &udp_frame(guest, gw53, &dns_query(7, "host.docker.internal", 1)),
    );
    s.poll(t(0));
    assert!(drain_cmds(&mut s).is_empty(), "answered locally");
    let got = udp_payloads(&drain_frames(&mut s));
    let a = &got[0].2;
    assert_eq!(&a[..2], &7u16.to_be_bytes());
    assert_eq!(a[3] & 0x0f, 0, "NOERROR");
    assert_eq!(&a[a.len() - 4..], &[192, 168, 65, 2], "the host alias");
    // Nobody answers upstream: SERVFAIL within the timeout, never silence.
    s.handle_frame(
        t(0),
        &udp_frame(guest, gw53, &dns_query(8, "nowhere.example", 1)),
    );
    let mut now = 0;
    let mut answer;
    loop {
        s.poll(t(now));
        drain_cmds(&mut s);
        answer = udp_payloads(&drain_frames(&mut s)).pop();
        if answer.is_some() || now >= 10_000 {
            break;
        }
        now = s
            .poll_timeout()
            .map_or(now + 1000, |x| x.total_millis())
            .max(now + 1);
    }
    let a = answer.expect("an answer").2;
    assert_eq!(&a[..2], &8u16.to_be_bytes());
    assert_eq!(a[3] & 0x0f, 2, "SERVFAIL");
    assert_eq!(now, 5_000, "at the 5 s timeout");
}

#[test]
fn dns_over_tcp_from_the_guest_and_to_the_upstream() {
    let mut s = dns_stack();
    let gw53: SocketAddrV4 = "192.168.65.1:53".parse().unwrap();
    let mut c = Conn::new(gw53);
    s.handle_frame(t(0), &c.syn());
    s.poll(t(0));
    assert!(
        drain_cmds(&mut s).is_empty(),
        "the gateway answers itself: no host connect"
    );
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(segs[0].p.syn && segs[0].p.ack_flag);
    c.seq += 1;
    c.ack = segs[0].p.seq.wrapping_add(1);
    // Two framed queries in one segment: a static name and one for the upstream.
    let q1 = dns_query(1, "gateway.usernet.internal", 1);
    let q2 = dns_query(2, "example.org", 1);
    let mut data = Vec::new();
    for q in [&q1, &q2] {
        data.extend_from_slice(&(q.len() as u16).to_be_bytes());
        data.extend_from_slice(q);
    }
    s.handle_frame(t(1), &c.send(ACK | PSH, &data));
    s.poll(t(1));
    let cmds = drain_cmds(&mut s);
    let [Cmd::Connect(up, dst)] = cmds[..] else {
        panic!("{cmds:?}")
    };
    assert_eq!(
        dst,
        "127.0.0.1:5353".parse().unwrap(),
        "a TCP query goes upstream over TCP"
    );
    let segs = tcp_segments(&drain_frames(&mut s));
    let got: Vec<u8> = segs.iter().flat_map(|x| x.payload.clone()).collect();
    assert_eq!(&got[2..4], &1u16.to_be_bytes(), "the static answer, framed");
    assert_eq!(&got[got.len() - 4..], &[192, 168, 65, 1]);
    c.ack = c.ack.wrapping_add(got.len() as u32);
    // The host connects; the framed query comes out; the framed answer goes in.
    s.tcp_connected(t(2), up);
    s.poll(t(2));
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Ready(up)]);
    let out = s.tcp_to_host(up).to_vec();
    assert_eq!(usize::from(u16::from_be_bytes([out[0], out[1]])), q2.len());
    s.tcp_consume_to_host(up, out.len());
    let ans = dns_answer(&out[2..], [192, 0, 2, 9]);
    let mut framed = (ans.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&ans);
    s.tcp_from_host(up, |b| {
        b[..framed.len()].copy_from_slice(&framed);
        (framed.len(), ())
    });
    s.poll(t(2));
    assert_eq!(
        drain_cmds(&mut s),
        vec![Cmd::Close(up)],
        "one query per upstream connection"
    );
    let got: Vec<u8> = tcp_segments(&drain_frames(&mut s))
        .iter()
        .flat_map(|x| x.payload.clone())
        .collect();
    assert_eq!(&got[2..4], &2u16.to_be_bytes());
    assert_eq!(&got[got.len() - 4..], &[192, 0, 2, 9]);
    // The guest closes: the gateway closes too, and nothing is left.
    c.ack = c.ack.wrapping_add(got.len() as u32);
    s.handle_frame(t(3), &c.send(ACK | FIN, &[]));
    s.poll(t(3));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(segs.iter().any(|x| x.p.fin));
    c.ack = c.ack.wrapping_add(1);
    s.handle_frame(t(3), &c.send(ACK, &[]));
    s.poll(t(3));
    assert!(drain_cmds(&mut s).is_empty(), "no host side to tell");
    assert_eq!(s.tcp_flow_count(), 0);
}

/// A connection into a guest not heard from yet waits for the ARP reply, then goes out at
/// once (not a second later at smoltcp's SYN retransmission).
#[test]
fn frames_for_an_unknown_guest_wait_for_its_arp_reply() {
    let mut s = stack();
    let guest = SocketAddrV4::new(guest_ip(), 22);
    s.tcp_open_inbound(t(0), guest.into(), "127.0.0.1:40001".parse().unwrap())
        .unwrap();
    s.poll(t(0));
    let frames = drain_frames(&mut s);
    assert_eq!(frames.len(), 1, "only the ARP request");
    assert_eq!(&frames[0][0..6], &[0xff; 6]);
    // The guest answers the ARP request (any frame from it teaches its MAC).
    let mut p = vec![0u8; 28];
    let repr = smoltcp::wire::ArpRepr::EthernetIpv4 {
        operation: smoltcp::wire::ArpOperation::Reply,
        source_hardware_addr: smoltcp::wire::EthernetAddress(GUEST_MAC),
        source_protocol_addr: guest_ip(),
        target_hardware_addr: smoltcp::wire::EthernetAddress(gw_mac()),
        target_protocol_addr: Ipv4Addr::new(192, 168, 65, 1),
    };
    repr.emit(&mut smoltcp::wire::ArpPacket::new_unchecked(&mut p[..]));
    s.handle_frame(t(5), &eth(ETHERTYPE_ARP, &p, gw_mac()));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert_eq!(segs.len(), 1, "the held SYN, at once");
    assert!(segs[0].p.syn);
    assert_eq!(segs[0].dst, guest);
}

#[path = "tests_proxy.rs"]
mod proxy;

#[test]
fn flows_are_counted_per_guest_and_protocol() {
    let mut s = stack();
    let mut now = 0;
    established(&mut s, &mut now);
    let dst = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 7);
    // A second guest: another MAC and address on the same link.
    let other_mac = [0x02, 0, 0, 0, 0, 0x09];
    let other = SocketAddrV4::new(Ipv4Addr::new(192, 168, 65, 9), 5000);
    let mut from_other = udp_frame(other, dst, b"x");
    from_other[6..12].copy_from_slice(&other_mac);
    for f in [
        udp_frame(SocketAddrV4::new(guest_ip(), 5000), dst, b"x"),
        udp_frame(SocketAddrV4::new(guest_ip(), 5001), dst, b"x"),
        from_other,
    ] {
        s.handle_frame(t(now), &f);
    }
    s.poll(t(now));
    let m = s.flows_by_guest();
    assert_eq!(
        m.get(&GUEST_MAC),
        Some(&GuestFlows {
            tcp: 1,
            udp: 2,
            ping: 0
        })
    );
    assert_eq!(
        m.get(&other_mac),
        Some(&GuestFlows {
            tcp: 0,
            udp: 1,
            ping: 0
        })
    );
    assert_eq!(m.len(), 2);
}

#[test]
fn a_guest_leaving_ends_its_flows_only() {
    let mut s = stack();
    let mut now = 0;
    let (tcp_flow, _) = established(&mut s, &mut now);
    let dst = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 7);
    let other_mac = [0x02, 0, 0, 0, 0, 0x09];
    let mut from_other = udp_frame(
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 65, 9), 5000),
        dst,
        b"x",
    );
    from_other[6..12].copy_from_slice(&other_mac);
    s.handle_frame(t(now), &from_other);
    s.handle_frame(
        t(now),
        &udp_frame(SocketAddrV4::new(guest_ip(), 5000), dst, b"x"),
    );
    s.poll(t(now));
    let cmds = drain_cmds(&mut s);
    let sends: Vec<FlowId> = cmds
        .iter()
        .filter_map(|c| match c {
            Cmd::UdpSend(f, _, _) => Some(*f),
            _ => None,
        })
        .collect();
    let [other_udp, mine_udp] = sends[..] else {
        panic!("{cmds:?}")
    };
    // A MAC nobody was seen at ends nothing.
    assert_eq!(s.guest_left(t(now), [0x02, 0, 0, 0, 0, 0x77]), 0);
    assert!(drain_cmds(&mut s).is_empty());
    // The other guest leaves: only its UDP flow goes, its host socket closed.
    assert_eq!(s.guest_left(t(now), other_mac), 1);
    assert_eq!(drain_cmds(&mut s), vec![Cmd::UdpClose(other_udp)]);
    assert_eq!(s.udp_flow_count(), 1);
    assert_eq!(s.tcp_flows().len(), 1);
    // Then the first: its TCP flow is reset on the host side, its UDP flow closed.
    assert_eq!(s.guest_left(t(now), GUEST_MAC), 2);
    assert_eq!(
        drain_cmds(&mut s),
        vec![Cmd::Abort(tcp_flow), Cmd::UdpClose(mine_udp)]
    );
    assert!(s.flows_by_guest().is_empty());
    assert!(s.tcp_flows().is_empty());
    assert_eq!(s.udp_flow_count(), 0);
    // Leaving twice is harmless.
    assert_eq!(s.guest_left(t(now), GUEST_MAC), 0);
}
