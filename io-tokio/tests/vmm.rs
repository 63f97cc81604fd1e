//! VMM transports end to end: the real daemon (`usernet serve --listen ...`) in a
//! test-created network namespace, test clients written here speaking the VPNKit vmnet
//! protocol, u16 LE frames and vfkit datagrams over UNIX sockets, several guests on one
//! switch. The guests' traffic is DHCP with the gateway and frames between guests: it
//! never leaves the daemon.
//!
//! Needs root (network namespaces; skipped otherwise).

mod common;

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use usernet::testutil::dhcp_frame;

const T: Duration = Duration::from_secs(10);

/// Socket paths under /tmp for one test, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let d = PathBuf::from(format!("/tmp/{}", unique("usernet-vmm")));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_for(path: &Path, d: &mut Daemon) {
    let deadline = Instant::now() + T;
    while !path.exists() {
        d.assert_alive();
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// (message type, yiaddr) of a DHCP reply frame for `mac`, or None for other frames.
fn dhcp_reply(frame: &[u8], mac: [u8; 6], xid: u32) -> Option<(u8, Ipv4Addr)> {
    if frame.len() < 14 + 20 + 8 + 243 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let udp = &frame[14 + ihl..];
    if udp.len() < 8 || udp[0..2] != 67u16.to_be_bytes() {
        return None;
    }
    let b = &udp[8..];
    if b.len() < 243 || b[4..8] != xid.to_be_bytes() || b[28..34] != mac {
        return None;
    }
    // The message type is the first option.
    if b[240] != 53 {
        return None;
    }
    Some((b[242], Ipv4Addr::new(b[16], b[17], b[18], b[19])))
}

/// u16 LE framed Ethernet over a UNIX stream.
struct U16Client {
    s: UnixStream,
}

impl U16Client {
    fn wrap(s: UnixStream) -> U16Client {
        s.set_read_timeout(Some(T)).unwrap();
        U16Client { s }
    }
    fn send(&mut self, f: &[u8]) {
        let mut v = (f.len() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(f);
        self.s.write_all(&v).unwrap();
    }
    fn recv(&mut self) -> Vec<u8> {
        let mut h = [0u8; 2];
        self.s.read_exact(&mut h).expect("frame header");
        let mut f = vec![0u8; usize::from(u16::from_le_bytes(h))];
        self.s.read_exact(&mut f).expect("frame");
        f
    }
    /// DISCOVER then REQUEST: the address leased to `mac`.
    fn lease(&mut self, mac: [u8; 6], xid: u32) -> Ipv4Addr {
        self.send(&dhcp_frame(mac, xid, None));
        let offered = self.wait_dhcp(mac, xid, 2);
        self.send(&dhcp_frame(mac, xid, Some(offered)));
        let acked = self.wait_dhcp(mac, xid, 5);
        assert_eq!(acked, offered);
        acked
    }
    fn wait_dhcp(&mut self, mac: [u8; 6], xid: u32, kind: u8) -> Ipv4Addr {
        for _ in 0..100 {
            let f = self.recv();
            if let Some((k, ip)) = dhcp_reply(&f, mac, xid) {
                assert_eq!(k, kind, "DHCP message type");
                return ip;
            }
        }
        panic!("no DHCP reply of type {kind} in 100 frames");
    }
}

const INIT: &[u8; 49] = b"VMN3T\x16\x00\x00\x000123456789012345678901234567890123456789";

/// Connect and run the vmnet handshake for `uuid`: (client, MTU, max packet, MAC).
fn vmnet_connect(path: &Path, uuid: &str) -> (U16Client, u16, u16, [u8; 6]) {
    vmnet_connect_preferring(path, uuid, None)
}

/// The same, with a Preferred_ipv4 command (type 8) when `preferred` is given.
fn vmnet_connect_preferring(
    path: &Path,
    uuid: &str,
    preferred: Option<Ipv4Addr>,
) -> (U16Client, u16, u16, [u8; 6]) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(INIT).unwrap();
    let mut init = [0u8; 49];
    s.read_exact(&mut init).unwrap();
    assert_eq!(&init, INIT, "the server's init echoes ours");
    let mut cmd = [0u8; 41];
    cmd[0] = 1;
    cmd[1..37].copy_from_slice(uuid.as_bytes());
    if let Some(ip) = preferred {
        // VPNKit writes the address as a little-endian u32 whose value is the address.
        cmd[0] = 8;
        cmd[37..41].copy_from_slice(&u32::from(ip).to_le_bytes());
    }
    s.write_all(&cmd).unwrap();
    let mut vif = [0u8; 258];
    s.read_exact(&mut vif).unwrap();
    assert_eq!(vif[0], 1, "a Vif answer");
    let mtu = u16::from_le_bytes([vif[1], vif[2]]);
    let max = u16::from_le_bytes([vif[3], vif[4]]);
    let mac: [u8; 6] = vif[5..11].try_into().unwrap();
    assert!(vif[11..].iter().all(|&b| b == 0));
    (U16Client::wrap(s), mtu, max, mac)
}

const UUID_A: &str = "7d5e3c1a-0000-4000-8000-00000000000a";
const UUID_B: &str = "7d5e3c1a-0000-4000-8000-00000000000b";
const UUID_C: &str = "7d5e3c1a-0000-4000-8000-00000000000c";
const UUID_E: &str = "7d5e3c1a-0000-4000-8000-00000000000e";

#[test]
fn vmnet_client_gets_a_vif_and_a_lease_and_keeps_them_across_reconnects() {
    if skip() {
        return;
    }
    let host = Netns::new("unvmm-h");
    let dir = Dir::new();
    let sock = dir.path("vpnkit.sock");
    let listen = format!("unix:{},framing=vmnet", sock.display());
    let mut d = Daemon::spawn(
        &host,
        &["serve".into(), "--no-dns".into(), "--listen".into(), listen],
    );
    wait_for(&sock, &mut d);

    // A malformed handshake is refused with a log line; the listener keeps serving.
    let mut bad = UnixStream::connect(&sock).unwrap();
    bad.set_read_timeout(Some(T)).unwrap();
    let mut junk = *INIT;
    junk[0] = b'X';
    bad.write_all(&junk).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(bad.read(&mut buf).unwrap(), 0, "closed without an answer");

    let (mut a, mtu, max, mac_a) = vmnet_connect(&sock, UUID_A);
    assert_eq!((mtu, max), (1500, 1550));
    assert_eq!(mac_a[0] & 3, 2, "locally administered unicast");
    let ip_a = a.lease(mac_a, 0x1111);
    assert_eq!(ip_a, FIRST_GUEST);

    // Another UUID at the same time: another MAC, another address.
    let (mut b, _, _, mac_b) = vmnet_connect(&sock, UUID_B);
    assert_ne!(mac_b, mac_a);
    let ip_b = b.lease(mac_b, 0x2222);
    assert_ne!(ip_b, ip_a);

    // A reconnects: same MAC, offered the same address again.
    drop(a);
    let (mut a2, _, _, mac_a2) = vmnet_connect(&sock, UUID_A);
    assert_eq!(mac_a2, mac_a);
    a2.send(&dhcp_frame(mac_a, 0x3333, None));
    assert_eq!(a2.wait_dhcp(mac_a, 0x3333, 2), ip_a);
    // The same UUID in upper case is the same client.
    drop(a2);
    let (_, _, _, mac_up) = vmnet_connect(&sock, &UUID_A.to_uppercase());
    assert_eq!(mac_up, mac_a);

    // A client sending Preferred_ipv4 is leased that address, not the lowest free one.
    let want = Ipv4Addr::new(192, 168, 65, 50);
    let (mut c, _, _, mac_c) = vmnet_connect_preferring(&sock, UUID_C, Some(want));
    assert_eq!(c.lease(mac_c, 0x4444), want);
    // Another client preferring the same address gets another one (with a log line).
    let (mut e, _, _, mac_e) = vmnet_connect_preferring(&sock, UUID_E, Some(want));
    let ip_e = e.lease(mac_e, 0x5555);
    assert_ne!(ip_e, want);

    d.assert_alive();
    let log = d.log_text();
    assert!(
        log.contains("vmnet handshake failed: bad init magic"),
        "log:\n{log}"
    );
    assert!(
        log.contains("preferred address not reserved: 192.168.65.50 is leased to another client"),
        "log:\n{log}"
    );
}

#[test]
fn vfkit_datagram_peer_gets_a_lease() {
    if skip() {
        return;
    }
    let host = Netns::new("unvmm-h");
    let dir = Dir::new();
    let sock = dir.path("vfkit.sock");
    let mut d = Daemon::spawn(
        &host,
        &[
            "serve".into(),
            "--no-dns".into(),
            "--listen".into(),
            format!("unixgram:{}", sock.display()),
        ],
    );
    wait_for(&sock, &mut d);
    let me = dir.path("vm.sock");
    let peer = UnixDatagram::bind(&me).unwrap();
    peer.set_read_timeout(Some(T)).unwrap();
    peer.send_to(b"VFKT", &sock).unwrap();
    let mac = [0x02, 0x76, 0x66, 0x6b, 0x74, 0x01];
    let mut buf = vec![0u8; 65536];
    let mut lease = None;
    for (xid, request) in [(0x44u32, None), (0x44, Some(()))] {
        let req = request.and(lease);
        peer.send_to(&dhcp_frame(mac, xid, req), &sock).unwrap();
        let want = if req.is_some() { 5 } else { 2 };
        let mut got = None;
        for _ in 0..100 {
            let n = peer.recv(&mut buf).expect("a datagram from the daemon");
            if let Some((k, ip)) = dhcp_reply(&buf[..n], mac, xid) {
                assert_eq!(k, want);
                got = Some(ip);
                break;
            }
        }
        lease = Some(got.expect("a DHCP reply"));
    }
    assert_eq!(lease, Some(FIRST_GUEST));
    d.assert_alive();
}

#[test]
fn two_guests_on_one_switch_reach_each_other_and_are_counted() {
    if skip() {
        return;
    }
    let host = Netns::new("unvmm-h");
    let dir = Dir::new();
    let sock = dir.path("gv.sock");
    let qemu = dir.path("qemu.sock");
    let api = dir.path("api.sock");
    let mut d = Daemon::spawn(
        &host,
        &[
            "serve".into(),
            "--no-dns".into(),
            "--api".into(),
            api.display().to_string(),
            "--listen".into(),
            format!("unix:{},framing=u16le", sock.display()),
            "--listen".into(),
            format!("unix:{}", qemu.display()),
        ],
    );
    wait_for(&sock, &mut d);
    wait_for(&qemu, &mut d);
    let mac_a = [0x02, 0, 0, 0, 0, 0xa];
    let mac_b = [0x02, 0, 0, 0, 0, 0xb];
    let mut a = U16Client::wrap(UnixStream::connect(&sock).unwrap());
    let ip_a = a.lease(mac_a, 1);
    // B is a QEMU-framed guest on another listener of the same switch.
    let mut b = UnixStream::connect(&qemu).unwrap();
    b.set_read_timeout(Some(T)).unwrap();
    let send_b = |b: &mut UnixStream, f: &[u8]| {
        let mut v = (f.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(f);
        b.write_all(&v).unwrap();
    };
    let recv_b = |b: &mut UnixStream| {
        let mut h = [0u8; 4];
        b.read_exact(&mut h).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(h) as usize];
        b.read_exact(&mut f).unwrap();
        f
    };
    send_b(&mut b, &dhcp_frame(mac_b, 2, None));
    let mut ip_b = None;
    for _ in 0..100 {
        if let Some((2, ip)) = dhcp_reply(&recv_b(&mut b), mac_b, 2) {
            ip_b = Some(ip);
            break;
        }
    }
    let ip_b = ip_b.expect("B's offer");
    assert_ne!(ip_a, ip_b);

    // A to B, unicast at layer 2 (an arbitrary Ethertype the gateway would not carry),
    // then B answers: each gets exactly the other's frame, bit for bit.
    let mut ab = Vec::new();
    ab.extend_from_slice(&mac_b);
    ab.extend_from_slice(&mac_a);
    ab.extend_from_slice(&[0x88, 0xb5]);
    ab.extend((0..1486).map(|i| i as u8));
    a.send(&ab);
    let got = loop {
        let f = recv_b(&mut b);
        if f[12..14] == [0x88, 0xb5] {
            break f;
        }
    };
    assert_eq!(got, ab);
    let mut ba = ab.clone();
    ba[..6].copy_from_slice(&mac_a);
    ba[6..12].copy_from_slice(&mac_b);
    ba[20] ^= 0xff;
    send_b(&mut b, &ba);
    let got = loop {
        let f = a.recv();
        if f[12..14] == [0x88, 0xb5] {
            break f;
        }
    };
    assert_eq!(got, ba);

    // Per-guest counters in `usernet ctl stats`.
    let v = ctl_stats(&api);
    let guests = v["guests"].as_array().expect("a guests list");
    assert_eq!(guests.len(), 2, "{v}");
    let ga = &guests[0];
    assert_eq!(ga["macs"], serde_json::json!(["02:00:00:00:00:0a"]));
    assert_eq!(ga["ips"], serde_json::json!([ip_a.to_string()]));
    assert!(ga["label"].as_str().unwrap().starts_with("unix:"));
    assert_eq!(ga["frames_from_guest"], 3, "{v}");
    assert!(ga["frames_to_guest"].as_u64().unwrap() >= 3, "{v}");
    assert!(ga["bytes_from_guest"].as_u64().unwrap() > 1500);
    let gb = &guests[1];
    assert_eq!(gb["macs"], serde_json::json!(["02:00:00:00:00:0b"]));
    assert_eq!(gb["frames_from_guest"], 2, "{v}");

    // B leaves: its port goes, A stays.
    drop(b);
    wait_stats(&api, T, "B still on the switch", |v| {
        v["guests"].as_array().unwrap().len() == 1
    });
    d.assert_alive();
}

/// The DHCP DISCOVER of VPNKit's Go client (`go/pkg/vmnet`, vendored by rootlesskit),
/// byte for byte: xid 1, broadcast flag, and an IPv4 header checksum left at zero "as if
/// we were using offload".
fn go_client_discover(mac: [u8; 6]) -> Vec<u8> {
    let mut bootp = vec![1, 1, 6, 0, 1, 0, 0, 0, 0, 0, 0x80, 0];
    bootp.extend_from_slice(&[0; 16]);
    bootp.extend_from_slice(&mac);
    bootp.extend_from_slice(&[0; 202]);
    bootp.extend_from_slice(&[0x63, 0x82, 0x53, 0x63, 0x35, 0x01, 0x01, 0xff]);
    let mut udp = vec![0, 68, 0, 67];
    udp.extend_from_slice(&((8 + bootp.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&bootp);
    let len = (20 + udp.len()) as u16;
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0x00]);
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[
        0x7f, 0x61, 0, 0, 0x40, 0x11, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255,
    ]);
    f.extend_from_slice(&udp);
    f
}

/// Copy frames between a TAP (in a test namespace) and a u16 LE framed stream, as
/// rootlesskit's parent does between its child's TAP and VPNKit, until `stop`.
fn relay(
    tap: std::os::fd::OwnedFd,
    sock: UnixStream,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    let tap = std::sync::Arc::new(tap);
    let mut w = sock.try_clone().unwrap();
    let (tap_r, stop_r) = (tap.clone(), stop.clone());
    let up = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop_r.load(Ordering::Relaxed) {
            let mut p = libc::pollfd {
                fd: tap_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
                continue;
            }
            // SAFETY: reading into our buffer from an open descriptor.
            let n = unsafe { libc::read(tap_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            let n = n as usize;
            let mut v = (n as u16).to_le_bytes().to_vec();
            v.extend_from_slice(&buf[..n]);
            if w.write_all(&v).is_err() {
                return;
            }
        }
    });
    let mut r = sock;
    r.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let down = std::thread::spawn(move || {
        let mut acc = Vec::new();
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            match r.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => acc.extend_from_slice(&buf[..n]),
                Err(_) => continue,
            }
            while acc.len() >= 2 {
                let len = usize::from(u16::from_le_bytes([acc[0], acc[1]]));
                if acc.len() < 2 + len {
                    break;
                }
                // SAFETY: writing one frame from our buffer to an open descriptor.
                unsafe { libc::write(tap.as_raw_fd(), acc[2..].as_ptr().cast(), len) };
                acc.drain(..2 + len);
            }
        }
    });
    vec![up, down]
}

/// VPNKit's command line, as rootlesskit runs it: `vpnkit --ethernet SOCK --mtu 1500`
/// through a symlink named `vpnkit`, and VPNKit's Go client (rootlesskit's): vmnet
/// handshake, a DHCP DISCOVER with a zero IP checksum, the offered address on a TAP with
/// gateway and DNS 192.168.65.1. Then curl reaches a server on the host's loopback
/// through 192.168.65.2 and a name resolves through 192.168.65.1.
///
/// Debian's rootlesskit (1.1.0) is built without its VPNKit driver ("not supported in
/// this Debian package") and as root needs subuid ranges, so this test plays
/// rootlesskit's part itself, following its source.
#[test]
fn vpnkit_command_line_serves_rootlesskits_client() {
    if skip() {
        return;
    }
    let host = Netns::new("unvpk-h");
    let dir = Dir::new();
    let vpnkit = dir.path("vpnkit");
    std::os::unix::fs::symlink(USERNET, &vpnkit).unwrap();
    let sock = dir.path("vpnkit-ethernet.sock");
    let body = text_body(3000);
    let listener = host.tcp_listener(16);
    let port = listener.local_addr().unwrap().port();
    let server = http_server(listener, body.clone(), 1);
    let mut d = Daemon::spawn_prog(
        &host,
        &vpnkit.display().to_string(),
        &[
            "--ethernet".into(),
            sock.display().to_string(),
            "--mtu".into(),
            "1500".into(),
        ],
    );
    wait_for(&sock, &mut d);

    let (mut c, mtu, _, mac) = vmnet_connect(&sock, "3f2504e0-4f89-41d3-9a0c-0305e82c3301");
    assert_eq!(mtu, 1500);
    c.send(&go_client_discover(mac));
    let mut ip = None;
    for _ in 0..100 {
        let f = c.recv();
        if let Some((2, yiaddr)) = dhcp_reply(&f, mac, 0x0100_0000) {
            ip = Some(yiaddr);
            break;
        }
    }
    let ip = ip.expect("an offer for the Go client's DISCOVER");
    assert_eq!(ip, FIRST_GUEST);

    // The child's side: a TAP with the vif's MAC and the offered address.
    let guest = Netns::new("unvpk-g");
    let mac_s = mac.map(|b| format!("{b:02x}")).join(":");
    guest.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
    guest.ip(&[
        "link", "set", "tap0", "address", &mac_s, "mtu", "1500", "up",
    ]);
    guest.ip(&["addr", "add", &format!("{ip}/24"), "dev", "tap0"]);
    guest.ip(&["route", "add", "default", "via", "192.168.65.1"]);
    let tap = usernet::tap::open_tap(Some(&guest.path()), "tap0").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads = relay(tap, c.s.try_clone().unwrap(), stop.clone());

    let out = run_ok(
        guest.cmd("curl").args([
            "-sS",
            "-m",
            "20",
            &format!("http://{HOST_ALIAS}:{port}/vpnkit"),
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(out.stdout, body);
    assert_eq!(
        join_timeout(server, T, "http server"),
        vec!["GET /vpnkit HTTP/1.1"]
    );
    let out = run_ok(
        guest.cmd("dig").args([
            "+short",
            "+time=2",
            "+tries=3",
            "@192.168.65.1",
            "host.usernet.internal",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        HOST_ALIAS.to_string()
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = c.s.shutdown(std::net::Shutdown::Both);
    for t in threads {
        join_timeout(t, T, "relay");
    }
    d.assert_alive();
}

/// A VMM that spawns usernet and talks u16 LE frames over its stdin/stdout gets a
/// lease; closing stdin stops the daemon.
#[test]
fn stdio_guest_gets_a_lease_and_eof_stops_the_daemon() {
    if skip() {
        return;
    }
    let host = Netns::new("unvmm-h");
    let mut child = host
        .cmd(USERNET)
        .args(["serve", "--no-dns", "--listen", "stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mac = [0x02, 0x73, 0x74, 0x64, 0x69, 0x6f];
    let f = dhcp_frame(mac, 0x55, None);
    let mut w = (f.len() as u16).to_le_bytes().to_vec();
    w.extend_from_slice(&f);
    stdin.write_all(&w).unwrap();
    // Read on a thread so that a silent daemon fails the test instead of hanging it.
    let reader = std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stdout);
        for _ in 0..100 {
            let mut h = [0u8; 2];
            r.read_exact(&mut h).ok()?;
            let mut f = vec![0u8; usize::from(u16::from_le_bytes(h))];
            r.read_exact(&mut f).ok()?;
            if let Some(x) = dhcp_reply(&f, mac, 0x55) {
                return Some(x);
            }
        }
        None
    });
    let got = join_timeout(reader, T, "stdio reader");
    assert_eq!(got, Some((2, FIRST_GUEST)));
    drop(stdin);
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon did not stop when its stdin closed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
}

/// Two network namespaces, each a guest on its own connection to one daemon (their TAPs
/// relayed over u16 LE streams): they ping each other and talk TCP at layer 2, the
/// gateway uninvolved, while each still reaches the gateway.
#[test]
fn two_namespaces_on_one_switch_ping_and_tcp_each_other() {
    if skip() {
        return;
    }
    let host = Netns::new("unvmm-h");
    let dir = Dir::new();
    let sock = dir.path("sw.sock");
    let pcap = dir.path("sw.pcap");
    let api = dir.path("api.sock");
    let mut d = Daemon::spawn(
        &host,
        &[
            "serve".into(),
            "--no-dns".into(),
            "--pcap".into(),
            pcap.display().to_string(),
            "--api".into(),
            api.display().to_string(),
            "--listen".into(),
            format!("unix:{},framing=u16le", sock.display()),
        ],
    );
    wait_for(&sock, &mut d);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut guests = Vec::new();
    let mut conns = Vec::new();
    for (i, ip) in ["192.168.65.3", "192.168.65.4"].into_iter().enumerate() {
        let g = Netns::new("unvmm-g");
        g.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
        let mac = format!("02:00:00:00:01:0{i}");
        g.ip(&["link", "set", "tap0", "address", &mac, "mtu", "1500", "up"]);
        g.ip(&["addr", "add", &format!("{ip}/24"), "dev", "tap0"]);
        g.ip(&["route", "add", "default", "via", "192.168.65.1"]);
        let tap = usernet::tap::open_tap(Some(&g.path()), "tap0").unwrap();
        let c = UnixStream::connect(&sock).unwrap();
        threads.extend(relay(tap, c.try_clone().unwrap(), stop.clone()));
        conns.push(c);
        guests.push(g);
    }
    let (a, b) = (&guests[0], &guests[1]);
    let out = run_ok(
        a.cmd("busybox")
            .args(["ping", "-c", "2", "-W", "5", "192.168.65.4"]),
        Duration::from_secs(30),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 packets received"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Both still reach the gateway (ARP and ping answered by the stack).
    run_ok(
        b.cmd("busybox")
            .args(["ping", "-c", "1", "-W", "5", "192.168.65.1"]),
        Duration::from_secs(30),
    );
    // TCP from A to a server in B, bytes both ways.
    let listener = b.run(T, || std::net::TcpListener::bind("192.168.65.4:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut buf = vec![0u8; 100_000];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        peer
    });
    let echoed = a.run(Duration::from_secs(30), move || {
        let mut s = std::net::TcpStream::connect(("192.168.65.4", port)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        s.write_all(&data).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).unwrap();
        back == data
    });
    assert!(echoed);
    let peer = join_timeout(server, T, "tcp server");
    assert_eq!(
        peer.ip().to_string(),
        "192.168.65.3",
        "no NAT between guests"
    );
    // A UDP flow from B through the gateway (to the host alias) shows up as B's alone in
    // the per-guest counters.
    b.run(T, || {
        let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        u.send_to(b"hello", "192.168.65.2:9").unwrap();
    });
    let flows = |v: &serde_json::Value, mac: &str| {
        v["guests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["macs"] == serde_json::json!([mac]))
            .map(|g| g["flows"].clone())
    };
    let v = wait_stats(&api, T, "no UDP flow counted for B", |v| {
        flows(v, "02:00:00:00:01:01") == Some(serde_json::json!({"tcp": 0, "udp": 1, "ping": 0}))
    });
    assert_eq!(
        flows(&v, "02:00:00:00:01:00"),
        Some(serde_json::json!({"tcp": 0, "udp": 0, "ping": 0})),
        "{v}"
    );
    assert_eq!(v["core"]["udp_flows"], 1, "{v}");
    // B's connection goes: its port leaves the switch and its flow ends with it, long
    // before the 60 s UDP idle timeout.
    let _ = conns[1].shutdown(std::net::Shutdown::Both);
    wait_stats(&api, T, "B's flow outlived it", |v| {
        v["guests"].as_array().unwrap().len() == 1 && v["core"]["udp_flows"] == 0
    });
    assert!(
        d.log_text().contains("a departed guest's flows ended"),
        "{}",
        d.log_text()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in &conns {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
    for t in threads {
        join_timeout(t, T, "relay");
    }
    d.assert_alive();
    // The capture holds the frames switched between the guests (which never reach the
    // stack) as well as the gateway's.
    d.stop();
    if Command::new("tcpdump").arg("--version").output().is_ok() {
        let out = run_ok(
            Command::new("tcpdump").args(["-r", pcap.to_str().unwrap(), "-nn"]),
            T,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        for want in [
            "192.168.65.3 > 192.168.65.4: ICMP echo request",
            "192.168.65.4 > 192.168.65.3: ICMP echo reply",
            "192.168.65.4 > 192.168.65.1: ICMP echo request",
            "192.168.65.1 > 192.168.65.4: ICMP echo reply",
        ] {
            assert!(text.contains(want), "no {want:?} in the capture:\n{text}");
        }
    }
}
