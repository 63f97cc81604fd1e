//! The VPNKit / hyperkit "vmnet" protocol (all little-endian), server side:
//!
//! 1. init, both ways, [`INIT_LEN`] bytes: `VMN3T`, u32 version (22), a 40-byte commit
//!    string. The server answers with the same layout, echoing the client's commit.
//! 2. a command from the client, [`COMMAND_LEN`] bytes: u8 type, then the body padded
//!    with zeros. Type 1 `Ethernet`: a 36-byte ASCII UUID (all NUL: the server picks
//!    one). Type 8 `Preferred_ipv4`: the UUID, then the IPv4 address as a u32.
//! 3. the server's answer, [`VIF_LEN`] bytes: type 1 `Vif` (u16 MTU, u16 maximum packet
//!    size, the client's 6-byte MAC), or type 2 `Disconnect` (u8 length, the reason).
//! 4. Ethernet frames both ways, each after a u16 length ([`crate::framing::Framing::U16Le`]).
//!
//! The client's MAC is derived from its UUID, so the same UUID always gets the same MAC
//! and, through the DHCP server's per-MAC leases, the same address across reconnects.
//! The parsers are plain functions over byte arrays (fuzzed); [`handshake`] runs them on
//! a stream.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const MAGIC: &[u8; 5] = b"VMN3T";
pub const VERSION: u32 = 22;
pub const INIT_LEN: usize = 5 + 4 + 40;
pub const COMMAND_LEN: usize = 1 + 36 + 4;
pub const VIF_LEN: usize = 1 + 1 + 256;
pub const UUID_LEN: usize = 36;

const CMD_ETHERNET: u8 = 1;
const CMD_PREFERRED_IPV4: u8 = 8;
const RESP_VIF: u8 = 1;
const RESP_DISCONNECT: u8 = 2;

/// Why a handshake failed.
#[derive(Debug)]
pub enum VmnetError {
    BadMagic([u8; 5]),
    BadVersion(u32),
    UnknownCommand(u8),
    BadUuid,
    Io(io::Error),
}

impl fmt::Display for VmnetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmnetError::BadMagic(m) => write!(
                f,
                "bad init magic {:?} (want VMN3T)",
                m.escape_ascii().to_string()
            ),
            VmnetError::BadVersion(v) => {
                write!(f, "unsupported protocol version {v} (want {VERSION})")
            }
            VmnetError::UnknownCommand(c) => write!(
                f,
                "unsupported command type {c} (want Ethernet or Preferred_ipv4)"
            ),
            VmnetError::BadUuid => {
                f.write_str("the UUID is not 36 characters of hex digits and dashes")
            }
            VmnetError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for VmnetError {}

impl From<io::Error> for VmnetError {
    fn from(e: io::Error) -> Self {
        VmnetError::Io(e)
    }
}

/// The client's init message: its version and commit string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Init {
    pub version: u32,
    pub commit: [u8; 40],
}

/// Parse an init message. The version is returned, not checked: the server still
/// answers with its own before closing (so the client can report the mismatch).
pub fn parse_init(b: &[u8; INIT_LEN]) -> Result<Init, VmnetError> {
    let magic: [u8; 5] = b[..5].try_into().expect("5 bytes");
    if &magic != MAGIC {
        return Err(VmnetError::BadMagic(magic));
    }
    Ok(Init {
        version: u32::from_le_bytes(b[5..9].try_into().expect("4 bytes")),
        commit: b[9..49].try_into().expect("40 bytes"),
    })
}

/// The server's init message: our version, the client's commit echoed.
pub fn init_reply(commit: &[u8; 40]) -> [u8; INIT_LEN] {
    let mut b = [0u8; INIT_LEN];
    b[..5].copy_from_slice(MAGIC);
    b[5..9].copy_from_slice(&VERSION.to_le_bytes());
    b[9..].copy_from_slice(commit);
    b
}

/// A client's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// An Ethernet interface for this UUID (`None`: the server picks one).
    Ethernet { uuid: Option<Uuid> },
    /// The same, asking for an IPv4 address.
    PreferredIpv4 { uuid: Option<Uuid>, ip: Ipv4Addr },
}

/// A UUID in its canonical 36-character text form, lowercased.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uuid(pub [u8; UUID_LEN]);

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Validated ASCII.
        f.write_str(std::str::from_utf8(&self.0).unwrap_or("?"))
    }
}

impl Uuid {
    /// Check and normalise (lowercase) a textual UUID; all NUL means "none given".
    pub fn parse(b: &[u8; UUID_LEN]) -> Result<Option<Uuid>, VmnetError> {
        if b.iter().all(|&c| c == 0) {
            return Ok(None);
        }
        let mut u = [0u8; UUID_LEN];
        for (i, &c) in b.iter().enumerate() {
            let dash = matches!(i, 8 | 13 | 18 | 23);
            u[i] = match c {
                b'-' if dash => c,
                b'0'..=b'9' | b'a'..=b'f' if !dash => c,
                b'A'..=b'F' if !dash => c.to_ascii_lowercase(),
                _ => return Err(VmnetError::BadUuid),
            };
        }
        Ok(Some(Uuid(u)))
    }

    /// A fresh UUID (version 4 layout) from 16 random bytes.
    pub fn from_random(r: [u8; 16]) -> Uuid {
        let mut r = r;
        r[6] = (r[6] & 0x0f) | 0x40;
        r[8] = (r[8] & 0x3f) | 0x80;
        let hex = b"0123456789abcdef";
        let mut u = [b'-'; UUID_LEN];
        let mut j = 0;
        for (i, byte) in r.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                j += 1;
            }
            u[j] = hex[usize::from(byte >> 4)];
            u[j + 1] = hex[usize::from(byte & 0xf)];
            j += 2;
        }
        Uuid(u)
    }

    /// The MAC address this UUID always gets: locally administered, unicast, from a
    /// 64-bit FNV-1a hash of the text (stable across versions and platforms).
    pub fn mac(&self) -> [u8; 6] {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &c in &self.0 {
            h ^= u64::from(c);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        [0x02, b[0], b[1], b[2], b[3], b[4] ^ b[5] ^ b[6] ^ b[7]]
    }
}

/// Parse a command message.
pub fn parse_command(b: &[u8; COMMAND_LEN]) -> Result<Command, VmnetError> {
    let uuid = || Uuid::parse(b[1..37].try_into().expect("36 bytes"));
    match b[0] {
        CMD_ETHERNET => Ok(Command::Ethernet { uuid: uuid()? }),
        CMD_PREFERRED_IPV4 => Ok(Command::PreferredIpv4 {
            uuid: uuid()?,
            // Written as a little-endian number whose value is the address.
            ip: Ipv4Addr::from(u32::from_le_bytes(b[37..41].try_into().expect("4 bytes"))),
        }),
        t => Err(VmnetError::UnknownCommand(t)),
    }
}

/// The `Vif` answer: MTU, maximum packet size and the client's MAC.
pub fn vif_reply(mtu: u16, max_packet: u16, mac: [u8; 6]) -> [u8; VIF_LEN] {
    let mut b = [0u8; VIF_LEN];
    b[0] = RESP_VIF;
    b[1..3].copy_from_slice(&mtu.to_le_bytes());
    b[3..5].copy_from_slice(&max_packet.to_le_bytes());
    b[5..11].copy_from_slice(&mac);
    b
}

/// The `Disconnect` answer with a reason (cut to 255 bytes).
pub fn disconnect_reply(reason: &str) -> [u8; VIF_LEN] {
    let mut b = [0u8; VIF_LEN];
    b[0] = RESP_DISCONNECT;
    let r = &reason.as_bytes()[..reason.len().min(255)];
    b[1] = r.len() as u8;
    b[2..2 + r.len()].copy_from_slice(r);
    b
}

/// Fill in the IPv4 header checksum of `frame` if the sender left it zero.
///
/// VPNKit's own Go client (used by rootlesskit and vpnkit-expose-port) builds its DHCP
/// DISCOVER "as if we were using offload", with a zero header checksum; VPNKit takes it.
/// Ports of vmnet clients apply this to every received frame, emulating the offload;
/// every other transport keeps rejecting bad checksums.
pub fn fill_ipv4_checksum(frame: &mut [u8]) {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ip = &mut frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl || ip[10..12] != [0, 0] {
        return;
    }
    let mut sum: u32 = ip[..ihl]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// What a finished handshake established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub uuid: Uuid,
    pub mac: [u8; 6],
    pub preferred_ip: Option<Ipv4Addr>,
}

/// Run the server side of the handshake on `io`. `random` supplies a UUID for clients
/// that leave it to the server. Frames follow on the same stream, u16 LE framed.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    mtu: u16,
    random: impl FnOnce() -> [u8; 16],
) -> Result<Session, VmnetError> {
    let mut init = [0u8; INIT_LEN];
    io.read_exact(&mut init).await?;
    let client = parse_init(&init)?;
    io.write_all(&init_reply(&client.commit)).await?;
    if client.version != VERSION {
        return Err(VmnetError::BadVersion(client.version));
    }
    let mut cmd = [0u8; COMMAND_LEN];
    io.read_exact(&mut cmd).await?;
    let cmd = match parse_command(&cmd) {
        Ok(c) => c,
        Err(e) => {
            let _ = io.write_all(&disconnect_reply(&e.to_string())).await;
            return Err(e);
        }
    };
    let (uuid, preferred_ip) = match cmd {
        Command::Ethernet { uuid } => (uuid, None),
        Command::PreferredIpv4 { uuid, ip } => (uuid, Some(ip)),
    };
    let uuid = uuid.unwrap_or_else(|| Uuid::from_random(random()));
    let mac = uuid.mac();
    // VPNKit announces MTU + 50 as the largest packet (room for headers).
    io.write_all(&vif_reply(mtu, mtu.saturating_add(50), mac))
        .await?;
    io.flush().await?;
    Ok(Session {
        uuid,
        mac,
        preferred_ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &[u8; 36] = b"c0ffee00-1234-4abc-8def-0123456789ab";

    fn init(version: u32) -> [u8; INIT_LEN] {
        let mut b = [0u8; INIT_LEN];
        b[..5].copy_from_slice(b"VMN3T");
        b[5..9].copy_from_slice(&version.to_le_bytes());
        b[9..].copy_from_slice(b"0123456789012345678901234567890123456789");
        b
    }

    fn ethernet(uuid: &[u8; 36]) -> [u8; COMMAND_LEN] {
        let mut b = [0u8; COMMAND_LEN];
        b[0] = 1;
        b[1..37].copy_from_slice(uuid);
        b
    }

    #[test]
    fn init_is_byte_exact() {
        let i = parse_init(&init(22)).unwrap();
        assert_eq!(i.version, 22);
        let r = init_reply(&i.commit);
        assert_eq!(r, init(22));
        assert_eq!(&r[..9], &[b'V', b'M', b'N', b'3', b'T', 22, 0, 0, 0]);
        let mut bad = init(22);
        bad[0] = b'X';
        assert!(matches!(parse_init(&bad), Err(VmnetError::BadMagic(_))));
    }

    #[test]
    fn commands_parse_and_uuids_are_checked() {
        let c = parse_command(&ethernet(UUID)).unwrap();
        let Command::Ethernet { uuid: Some(u) } = c else {
            panic!("{c:?}")
        };
        assert_eq!(&u.0, UUID);
        // Upper case is the same UUID.
        let upper: [u8; 36] = UUID.to_ascii_uppercase().try_into().unwrap();
        assert_eq!(
            parse_command(&ethernet(&upper)).unwrap(),
            Command::Ethernet { uuid: Some(u) }
        );
        assert_eq!(
            parse_command(&ethernet(&[0; 36])).unwrap(),
            Command::Ethernet { uuid: None }
        );
        let mut p = ethernet(UUID);
        p[0] = 8;
        // 192.168.65.7 as a little-endian number.
        p[37..41].copy_from_slice(&u32::from(Ipv4Addr::new(192, 168, 65, 7)).to_le_bytes());
        assert_eq!(
            parse_command(&p).unwrap(),
            Command::PreferredIpv4 {
                uuid: Some(u),
                ip: Ipv4Addr::new(192, 168, 65, 7)
            }
        );
        let mut bad = *UUID;
        bad[8] = b'x';
        assert!(matches!(
            parse_command(&ethernet(&bad)),
            Err(VmnetError::BadUuid)
        ));
        let mut t = ethernet(UUID);
        t[0] = 6; // Bind_ipv4: vmnetd only
        assert!(matches!(
            parse_command(&t),
            Err(VmnetError::UnknownCommand(6))
        ));
    }

    #[test]
    fn vif_reply_is_byte_exact() {
        let mac = [0x02, 1, 2, 3, 4, 5];
        let r = vif_reply(1500, 1550, mac);
        assert_eq!(r.len(), 258);
        assert_eq!(&r[..11], &[1, 0xdc, 0x05, 0x0e, 0x06, 0x02, 1, 2, 3, 4, 5]);
        assert!(r[11..].iter().all(|&b| b == 0));
        let d = disconnect_reply("no");
        assert_eq!(&d[..4], &[2, 2, b'n', b'o']);
    }

    #[test]
    fn the_same_uuid_always_gets_the_same_mac() {
        let u = Uuid::parse(UUID).unwrap().unwrap();
        // Pinned: a change here changes every VPNKit client's address.
        assert_eq!(u.mac(), Uuid(*UUID).mac());
        let m = u.mac();
        assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast");
        let other = Uuid::parse(b"c0ffee00-1234-4abc-8def-0123456789ac")
            .unwrap()
            .unwrap();
        assert_ne!(other.mac(), m);
        let r = Uuid::from_random([0xff; 16]);
        assert_eq!(&r.0, b"ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert!(Uuid::parse(&r.0).unwrap().is_some());
    }

    #[test]
    fn zero_ipv4_checksums_are_filled_in_and_others_left_alone() {
        // Go client's DISCOVER header: checksum 0, src 0.0.0.0, dst broadcast.
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        f.extend_from_slice(&[
            0x45, 0, 0, 48, 0x7f, 0x61, 0, 0, 0x40, 0x11, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255,
        ]);
        f.resize(14 + 48, 0);
        fill_ipv4_checksum(&mut f);
        let sum: u32 = f[14..34]
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        assert_eq!((sum & 0xffff) + (sum >> 16), 0xffff, "valid now");
        // A wrong (non-zero) checksum stays wrong: the stack counts it.
        let mut g = f.clone();
        g[24] ^= 1;
        let before = g.clone();
        fill_ipv4_checksum(&mut g);
        assert_eq!(g, before);
        // Not IPv4, or too short: untouched.
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        arp[24..26].copy_from_slice(&[0, 0]);
        let before = arp.clone();
        fill_ipv4_checksum(&mut arp);
        assert_eq!(arp, before);
        let mut short = f[..30].to_vec();
        fill_ipv4_checksum(&mut short);
    }

    #[tokio::test]
    async fn handshake_with_short_reads() {
        let (mut server, mut client) = tokio::io::duplex(64);
        let srv = tokio::spawn(async move {
            let s = handshake(&mut server, 1500, || [0; 16]).await;
            (s, server)
        });
        let mut bytes = init(22).to_vec();
        bytes.extend_from_slice(&ethernet(UUID));
        // A byte at a time: every read ends in the middle of a message.
        for b in &bytes[..INIT_LEN] {
            client.write_all(std::slice::from_ref(b)).await.unwrap();
        }
        let mut reply = [0u8; INIT_LEN];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, init(22));
        for b in &bytes[INIT_LEN..] {
            client.write_all(std::slice::from_ref(b)).await.unwrap();
        }
        let mut vif = [0u8; VIF_LEN];
        client.read_exact(&mut vif).await.unwrap();
        let (s, _server) = srv.await.unwrap();
        let s = s.unwrap();
        assert_eq!(&vif[..5], &[1, 0xdc, 0x05, 0x0e, 0x06]);
        assert_eq!(vif[5..11], s.mac);
        assert_eq!(s.mac, Uuid(*UUID).mac());
    }

    #[tokio::test]
    async fn wrong_version_gets_our_init_then_an_error() {
        let (mut server, mut client) = tokio::io::duplex(4096);
        client.write_all(&init(21)).await.unwrap();
        let e = handshake(&mut server, 1500, || [0; 16]).await.unwrap_err();
        assert!(matches!(e, VmnetError::BadVersion(21)), "{e}");
        let mut reply = [0u8; INIT_LEN];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[5..9], &22u32.to_le_bytes());
    }
}
