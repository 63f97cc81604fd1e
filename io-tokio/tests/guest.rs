//! End-to-end tests of `usernet guest`, the in-guest helper: the daemon (`usernet stream`)
//! runs in a test-created "host" namespace; the helper runs in a test-created "guest"
//! namespace, creates the TAP there and connects to the daemon's UNIX socket. The guest
//! then gets its address from busybox udhcpc and reaches TCP and UDP servers on the host
//! namespace's loopback (through the host alias) and the gateway's DNS; after the daemon
//! restarts, the helper reconnects and all of it works again.
//!
//! Needs root (skipped otherwise), `ip` (iproute2) and `busybox`.
//! Not covered here: vsock (this machine has /dev/vsock but no vhost-vsock, so nothing
//! listens on CID 2; the framing code is the same as on the UNIX path), and two guests on
//! one daemon (needs the multi-guest switch).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const SHORT: Duration = Duration::from_secs(20);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Removes a directory at the end of a test.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = PathBuf::from(format!("/tmp/{}", unique("usernet-guest")));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Poll `cond` every 20 ms for up to `timeout`; panic with `what` (and the log file) if
/// it never holds.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool, log: &Path) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} within {timeout:?}; {}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon in `host`, listening on `sock` (QEMU stream framing). Its DNS upstream is
/// a closed port of the host namespace's loopback: only the gateway's static names answer.
fn start_daemon(host: &Netns, sock: &Path) -> Daemon {
    let mut d = Daemon::spawn(
        host,
        &[
            "stream".into(),
            "--socket".into(),
            sock.display().to_string(),
            "--dns".into(),
            "127.0.0.1:9".into(),
        ],
    );
    let log = d.log.clone();
    wait_for(
        "the daemon listens",
        Duration::from_secs(10),
        || {
            d.assert_alive();
            sock.exists()
        },
        &log,
    );
    d
}

/// Shell lines for [`udhcpc`]'s script: configure what it was given.
const CONFIGURE: &str = "ip addr flush dev \"$interface\"\n\
                         ip addr add \"$ip/$mask\" dev \"$interface\"\n\
                         ip route replace default via \"$router\" dev \"$interface\"";

/// A TCP round trip from the guest to a server on the host namespace's loopback.
fn tcp_round_trip(host: &Netns, guest: &Netns, msg: &'static [u8]) {
    let listener = host.tcp_listener(4);
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        timeouts(&s, SHORT);
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        (buf, peer)
    });
    let echoed = guest.run(SHORT, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((HOST_ALIAS, port)), SHORT).unwrap();
        timeouts(&s, SHORT);
        s.write_all(msg).unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).unwrap();
        buf
    });
    let (got, peer) = join_timeout(server, SHORT, "tcp server");
    assert_eq!(got, msg);
    assert_eq!(echoed, msg);
    assert!(
        peer.ip().is_loopback(),
        "the host side sees a loopback peer: {peer}"
    );
}

/// A UDP echo through the host alias (retried: the first datagram may wait for ARP).
fn udp_round_trip(host: &Netns, guest: &Netns) {
    let sock = host.run(SHORT, || UdpSocket::bind("127.0.0.1:0").unwrap());
    let port = sock.local_addr().unwrap().port();
    sock.set_read_timeout(Some(SHORT)).unwrap();
    let server = thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        // Answer every copy the client may send until it has its echo.
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        sock.send_to(&buf[..n], from).unwrap();
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            sock.send_to(&buf[..n], from).unwrap();
        }
        buf[..n].to_vec()
    });
    let reply = guest.run(SHORT, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 1500];
        for _ in 0..5 {
            s.send_to(b"ping over udp", (HOST_ALIAS, port)).unwrap();
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                return Some((buf[..n].to_vec(), from));
            }
        }
        None
    });
    let (data, from) = reply.expect("a UDP echo through the host alias");
    assert_eq!(data, b"ping over udp");
    assert_eq!(from, SocketAddr::from((HOST_ALIAS, port)));
    assert_eq!(join_timeout(server, SHORT, "udp server"), b"ping over udp");
}

/// The gateway answers a static name (busybox nslookup, a real resolver client).
fn dns_lookup(guest: &Netns) {
    let o = run_cmd(
        guest.cmd("busybox").args([
            "nslookup",
            "-type=a",
            "host.usernet.internal",
            &GATEWAY.to_string(),
        ]),
        SHORT,
    );
    let out = text(&o.stdout);
    assert!(
        o.status.success() && out.contains(&HOST_ALIAS.to_string()),
        "nslookup: {}\n{out}\n{}",
        o.status,
        text(&o.stderr)
    );
}

#[test]
fn guest_helper_gives_a_namespace_dhcp_tcp_udp_dns_and_survives_a_daemon_restart() {
    if skip() {
        return;
    }
    let dir = TempDir::new();
    let sock = dir.0.join("usernet.sock");
    let host = Netns::new("ungst-h");
    let guest = Netns::new("ungst-g");
    let mut daemon = start_daemon(&host, &sock);

    let mut helper = Daemon::spawn(
        &guest,
        &[
            "guest".into(),
            "--connect".into(),
            format!("unix:{}", sock.display()),
            "--tap".into(),
            TAP.into(),
            "-v".into(),
        ],
    );
    // The helper created the TAP, set its MTU and brought it up; the daemon saw it.
    let helper_log = helper.log.clone();
    wait_for(
        "the helper's TAP is up",
        Duration::from_secs(10),
        || {
            helper.assert_alive();
            let o = run_cmd(guest.cmd("ip").args(["-o", "link", "show", TAP]), SHORT);
            let s = text(&o.stdout);
            s.contains(",UP") && s.contains("mtu 1500")
        },
        &helper_log,
    );
    wait_for(
        "the daemon sees the helper",
        Duration::from_secs(10),
        || daemon.log_text().contains("guest connected"),
        &daemon.log,
    );

    let lease = udhcpc(&guest, CONFIGURE);
    let bound = lease
        .lines()
        .find(|l| l.starts_with("bound "))
        .unwrap_or_else(|| panic!("no bound event: {lease:?}"));
    for want in [
        "ip=192.168.65.3 ",
        "mask=24 ",
        "router=192.168.65.1 ",
        "dns=192.168.65.1 ",
        "mtu=1500",
    ] {
        assert!(bound.contains(want), "{want:?} missing in {bound:?}");
    }
    tcp_round_trip(&host, &guest, b"through the guest helper");
    udp_round_trip(&host, &guest);
    dns_lookup(&guest);

    // The daemon restarts. The helper keeps its TAP (and the guest its address) and
    // connects again.
    let st = daemon.stop();
    assert!(st.success(), "daemon exit: {st}");
    drop(daemon);
    wait_for(
        "the helper notices the daemon is gone",
        Duration::from_secs(10),
        || helper.log_text().contains("disconnected"),
        &helper.log,
    );
    let mut daemon = start_daemon(&host, &sock);
    wait_for(
        "the helper reconnects",
        Duration::from_secs(10),
        || daemon.log_text().contains("guest connected"),
        &helper.log,
    );
    helper.assert_alive();
    let o = guest.ip(&["-o", "addr", "show", "dev", TAP]);
    assert!(
        text(&o.stdout).contains("192.168.65.3/24"),
        "the guest keeps its address: {}",
        text(&o.stdout)
    );
    tcp_round_trip(&host, &guest, b"after the daemon restarted");
    udp_round_trip(&host, &guest);
    dns_lookup(&guest);
    // The new daemon leases again (the same first address).
    let lease = udhcpc(&guest, CONFIGURE);
    assert!(lease.contains("bound ip=192.168.65.3 "), "{lease}");
    daemon.assert_alive();

    let st = helper.stop();
    assert!(st.success(), "helper exit: {st}\n{}", helper.log_text());
    let log = helper.log_text();
    assert_eq!(
        log.matches("connected to the daemon").count(),
        2,
        "two sessions:\n{log}"
    );
    // The TAP was the helper's: it goes away with it.
    let o = run_cmd(guest.cmd("ip").args(["link", "show", TAP]), SHORT);
    assert!(!o.status.success(), "{TAP} outlived the helper");
}

#[test]
fn guest_helper_refuses_bad_options() {
    let o = run_cmd(
        std::process::Command::new(USERNET).args([
            "guest",
            "--connect",
            "tcp:1.2.3.4:5",
            "--tap",
            "t0",
        ]),
        SHORT,
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("expected unix:PATH or vsock://CID:PORT"),
        "{}",
        text(&o.stderr)
    );
    let o = run_cmd(
        std::process::Command::new(USERNET).args([
            "guest",
            "--connect",
            "unix:/nonexistent/x.sock",
            "--tap",
            "t0",
            "--framing",
            "u16le",
            "--mtu",
            "65535",
        ]),
        SHORT,
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("too large for the u16le framing"),
        "{}",
        text(&o.stderr)
    );
}
