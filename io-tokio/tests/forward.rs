//! End-to-end tests of port forwarding: host ports of the daemon's (test-created) host
//! namespace carried into servers in the (test-created) guest namespace, set by `-p` at
//! start or through the control API (`usernet ctl`) at run time.
//!
//! Needs root (skipped otherwise) and `ip` (iproute2) and `busybox` (udhcpc, nc).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const SHORT: Duration = Duration::from_secs(20);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A path for the API socket, unique to this test.
fn api_path() -> PathBuf {
    PathBuf::from(format!("/tmp/{}.sock", unique("usernet-fwd-api")))
}

/// Daemon options: the API at `api` plus `extra`.
fn opts(api: &Path, configure_guest: bool, extra: &[&str]) -> Opts {
    let mut e: Vec<String> = vec!["--no-dns".into(), "--api".into(), api.display().to_string()];
    e.extend(extra.iter().map(|s| s.to_string()));
    Opts {
        mtu: None,
        configure_guest,
        extra: e,
    }
}

/// `usernet ctl --api API ARGS...` (the API is a path: no namespace needed).
fn ctl(api: &Path, args: &[&str]) -> Output {
    run_cmd(
        Command::new(USERNET)
            .arg("ctl")
            .arg("--api")
            .arg(api)
            .args(args),
        SHORT,
    )
}

fn ctl_ok(api: &Path, args: &[&str]) -> String {
    let o = ctl(api, args);
    assert!(
        o.status.success(),
        "usernet ctl {args:?}: {}\n{}{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// A server in the guest namespace on 0.0.0.0:PORT: for every connection it writes
/// `peer=ADDR\n` (the source address it sees), then echoes until EOF. Stops on drop.
struct GuestServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GuestServer {
    fn start(guest: &Netns, port: u16) -> GuestServer {
        let l: TcpListener = guest.run(SHORT, move || {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                .unwrap();
            s.listen(4096).unwrap();
            TcpListener::from(s)
        });
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        s.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || {
                            timeouts(&s, SHORT);
                            if s.write_all(format!("peer={peer}\n").as_bytes()).is_err() {
                                return;
                            }
                            let mut buf = [0u8; 4096];
                            loop {
                                match s.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if s.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("guest server accept: {e}"),
                }
            }
        });
        GuestServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for GuestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// From the host namespace: connect to 127.0.0.1:PORT, read the greeting line, send
/// `msg` and read its echo; return (greeting, the client's own address).
fn hello(host: &Netns, port: u16, msg: &'static str) -> (String, SocketAddr) {
    host.run(SHORT, move || {
        let mut s = TcpStream::connect_timeout(&local(port), SHORT).expect("connect");
        timeouts(&s, SHORT);
        let me = s.local_addr().unwrap();
        let mut greeting = Vec::new();
        let mut b = [0u8; 1];
        while !greeting.ends_with(b"\n") {
            match s.read(&mut b) {
                Ok(1) => greeting.push(b[0]),
                r => panic!("reading the greeting after {greeting:?}: {r:?}"),
            }
        }
        s.write_all(msg.as_bytes()).unwrap();
        let mut echo = vec![0u8; msg.len()];
        s.read_exact(&mut echo).expect("echo");
        assert_eq!(echo, msg.as_bytes());
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("read to EOF");
        assert!(rest.is_empty());
        (text(&greeting).trim().to_string(), me)
    })
}

/// From the host namespace: connect and wait for the connection to end; returns how it
/// ended (`Ok(bytes)` on EOF) and how long it took.
fn connect_and_wait_end(host: &Netns, port: u16) -> (std::io::Result<usize>, Duration) {
    host.run(SHORT, move || {
        let t0 = Instant::now();
        // The reset may even beat the end of the connect.
        let mut s = match TcpStream::connect_timeout(&local(port), SHORT) {
            Ok(s) => s,
            Err(e) => return (Err(e), t0.elapsed()),
        };
        timeouts(&s, Duration::from_secs(15));
        let mut v = Vec::new();
        let r = s.read_to_end(&mut v);
        (r, t0.elapsed())
    })
}

/// Run busybox udhcpc in the guest (the daemon then holds a lease), then configure the
/// address it was given (.3) by hand.
fn dhcp_in_guest(tb: &Testbed) {
    udhcpc(&tb.guest, "");
    tb.guest.ip(&["addr", "add", "192.168.65.3/24", "dev", TAP]);
    tb.guest
        .ip(&["route", "add", "default", "via", "192.168.65.1"]);
}

// ---------------------------------------------------------------------------------------

/// `-p` (a `:PORT` forward, resolved through the DHCP lease): refused while the guest has
/// no lease, then carried to the guest's server, which sees the client's real port at the
/// host alias; `ctl list` and `ctl leases` show the forward and the lease.
#[test]
fn publish_flag_reaches_the_leased_guest() {
    if skip() {
        return;
    }
    let api = api_path();
    let mut tb = Testbed::with(opts(&api, false, &["-p", "18080:8080"]));
    let _srv = GuestServer::start(&tb.guest, 8080);
    assert_eq!(
        ctl_ok(&api, &["list"]),
        "tcp 127.0.0.1:18080 -> :8080\n",
        "ctl list"
    );
    // No lease yet: the connection is refused at once.
    let (r, took) = connect_and_wait_end(&tb.host, 18080);
    assert!(
        took < Duration::from_secs(2),
        "refusal took {took:?} ({r:?})"
    );
    assert!(
        matches!(&r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{r:?}"
    );
    dhcp_in_guest(&tb);
    let leases = ctl_ok(&api, &["leases"]);
    assert!(
        leases.starts_with("192.168.65.3 "),
        "ctl leases: {leases:?}"
    );
    let (greeting, me) = hello(&tb.host, 18080, "through -p\n");
    assert_eq!(
        greeting,
        format!("peer={}:{}", HOST_ALIAS, me.port()),
        "the guest sees the client at the host alias with its own port"
    );
    let stats = ctl_ok(&api, &["stats"]);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["driver"]["forward_accepted"], 1, "{stats}");
    assert_eq!(v["driver"]["forward_no_guest"], 1, "{stats}");
    assert!(v["core"]["frames_in"].as_u64().unwrap() > 0, "{stats}");
    tb.daemon.assert_alive();
    assert!(tb.daemon.stop().success());
    assert!(!api.exists(), "the API socket is removed on exit");
}

/// A forward set at run time through `usernet ctl expose` to an explicit guest address;
/// `ctl unexpose` closes the port at once (ConnectionRefused) while the connection already
/// open keeps working; errors come back as `usernet: MESSAGE`, exit 1.
#[test]
fn expose_and_unexpose_at_run_time() {
    if skip() {
        return;
    }
    let api = api_path();
    let mut tb = Testbed::with(opts(&api, true, &[]));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&api).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "API socket mode");
    }
    let _srv = GuestServer::start(&tb.guest, 8081);
    assert_eq!(
        ctl_ok(&api, &["expose", "127.0.0.1:18081", "192.168.65.3:8081"]),
        "exposed tcp 127.0.0.1:18081 -> 192.168.65.3:8081\n"
    );
    assert_eq!(
        ctl_ok(&api, &["list"]),
        "tcp 127.0.0.1:18081 -> 192.168.65.3:8081\n"
    );
    let (greeting, me) = hello(&tb.host, 18081, "run time\n");
    assert_eq!(greeting, format!("peer={HOST_ALIAS}:{}", me.port()));

    // A connection held open across the unexpose.
    let held = tb.host.run(SHORT, || {
        let mut s = TcpStream::connect_timeout(&local(18081), SHORT).unwrap();
        timeouts(&s, SHORT);
        let mut b = [0u8; 64];
        let n = s.read(&mut b).unwrap();
        assert!(text(&b[..n]).starts_with("peer="));
        s
    });
    assert_eq!(
        ctl_ok(&api, &["unexpose", "127.0.0.1:18081"]),
        "unexposed tcp 127.0.0.1:18081 -> 192.168.65.3:8081\n"
    );
    let r = tb.host.run(SHORT, || {
        TcpStream::connect_timeout(&local(18081), SHORT).map(|_| ())
    });
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused),
        "the port refuses after unexpose"
    );
    let mut held = held;
    held.write_all(b"still here\n").unwrap();
    let mut echo = [0u8; 11];
    held.read_exact(&mut echo)
        .expect("the open connection keeps working");
    assert_eq!(&echo, b"still here\n");
    drop(held);
    assert_eq!(ctl_ok(&api, &["list"]), "");

    let o = ctl(&api, &["unexpose", "127.0.0.1:18081"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "usernet: tcp 127.0.0.1:18081 is not exposed\n"
    );
    let o = ctl(&api, &["expose", "127.0.0.1:x", ":80"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with("usernet: local "),
        "{}",
        text(&o.stderr)
    );
    tb.daemon.assert_alive();
}

/// Address in use: at run time the expose fails with a one-line reason and the other
/// forwards keep working; at start, the daemon exits with a one-line error naming it.
#[test]
fn address_in_use_is_reported() {
    if skip() {
        return;
    }
    let api = api_path();
    let mut tb = Testbed::with(opts(&api, true, &[]));
    let _srv = GuestServer::start(&tb.guest, 8082);
    ctl_ok(&api, &["expose", "127.0.0.1:18082", "192.168.65.3:8082"]);
    let busy = tb.host.tcp_listener(4);
    let busy_port = busy.local_addr().unwrap().port();
    let o = ctl(
        &api,
        &[
            "expose",
            &format!("127.0.0.1:{busy_port}"),
            "192.168.65.3:8082",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        format!(
            "usernet: cannot listen on tcp 127.0.0.1:{busy_port}: the address is already in use\n"
        )
    );
    let o = ctl(&api, &["expose", "127.0.0.1:18082", "192.168.65.3:9"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("already exposed"),
        "{}",
        text(&o.stderr)
    );
    let (greeting, _) = hello(&tb.host, 18082, "still forwarding\n");
    assert!(greeting.starts_with("peer="));
    tb.daemon.assert_alive();

    // At start: usernet exits 1 before serving.
    let sock = format!("/tmp/{}.sock", unique("usernet-fwd-stream"));
    let o = run_cmd(
        tb.host.cmd(USERNET).args([
            "stream",
            "--socket",
            &sock,
            "--no-dns",
            "-p",
            "18083:80",
            "-p",
            &format!("{busy_port}:80"),
        ]),
        SHORT,
    );
    let _ = std::fs::remove_file(&sock);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    let last = err.lines().last().unwrap_or("");
    assert_eq!(
        last,
        format!(
            "usernet: cannot listen on tcp 127.0.0.1:{busy_port}: the address is already in use \
             (forward tcp 127.0.0.1:{busy_port} -> :80)"
        )
    );
    drop(busy);
}

/// UDP through a forward: the guest's echo server sees the client at the host alias, and
/// its replies come back to the client from the forwarded address.
#[test]
fn udp_echo_through_a_forward() {
    if skip() {
        return;
    }
    let api = api_path();
    let mut tb = Testbed::with(opts(&api, true, &[]));
    let server: UdpSocket = tb
        .guest
        .run(SHORT, || UdpSocket::bind("0.0.0.0:5353").unwrap());
    server.set_read_timeout(Some(SHORT)).unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut peers = Vec::new();
        loop {
            let Ok((n, peer)) = server.recv_from(&mut buf) else {
                return peers;
            };
            if &buf[..n] == b"quit" {
                return peers;
            }
            peers.push(peer);
            let mut reply = format!("peer={peer} ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            server.send_to(&reply, peer).unwrap();
        }
    });
    ctl_ok(
        &api,
        &[
            "expose",
            "127.0.0.1:15353",
            "192.168.65.3:5353",
            "--protocol",
            "udp",
        ],
    );
    assert_eq!(
        ctl_ok(&api, &["list"]),
        "udp 127.0.0.1:15353 -> 192.168.65.3:5353\n"
    );
    let (replies, me) = tb.host.run(SHORT, || {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.connect(local(15353)).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        for i in 0..5 {
            let msg = format!("datagram {i}");
            // The first may be lost while the gateway learns the guest's MAC: retry.
            let mut tries = 0;
            loop {
                c.send(msg.as_bytes()).unwrap();
                match c.recv(&mut buf) {
                    Ok(n) => {
                        got.push(text(&buf[..n]));
                        break;
                    }
                    Err(_) if tries < 10 => tries += 1,
                    Err(e) => panic!("no reply to {msg:?}: {e}"),
                }
            }
        }
        c.send(b"quit").unwrap();
        (got, c.local_addr().unwrap())
    });
    let peers = join_timeout(echo, SHORT, "udp echo server");
    let alias = SocketAddr::V4(SocketAddrV4::new(HOST_ALIAS, me.port()));
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r, &format!("peer={alias} datagram {i}"));
    }
    assert!(peers.iter().all(|p| *p == alias), "{peers:?}");
    tb.daemon.assert_alive();
}

/// A guest with nothing listening: the host client's connection ends (reset or EOF)
/// within a few seconds, not at a timeout.
#[test]
fn guest_refusal_resets_the_client_quickly() {
    if skip() {
        return;
    }
    let api = api_path();
    let mut tb = Testbed::with(opts(&api, true, &[]));
    ctl_ok(&api, &["expose", "127.0.0.1:18084", "192.168.65.3:8084"]);
    for round in 0..2 {
        let (r, took) = connect_and_wait_end(&tb.host, 18084);
        eprintln!("refused round {round}: {r:?} after {took:?}");
        assert!(
            matches!(&r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{r:?}"
        );
        // The first round may wait for the guest's MAC address (ARP, then smoltcp's SYN
        // retransmission); later ones are immediate.
        let limit = if round == 0 { 4000 } else { 500 };
        assert!(
            took < Duration::from_millis(limit),
            "round {round}: {took:?}"
        );
    }
    tb.daemon.assert_alive();
}

/// `usernet run -p`: the forward leads to the namespace usernet configured itself (no
/// DHCP), here to busybox nc serving one connection.
#[test]
fn run_with_publish() {
    if skip() {
        return;
    }
    let host = Netns::new("unfwd-h");
    let mut daemon = Daemon::spawn(
        &host,
        &[
            "run".into(),
            "--no-dns".into(),
            "-p".into(),
            "18085:8085".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            "echo served-by-nc | busybox nc -l -p 8085".into(),
        ],
    );
    let deadline = Instant::now() + SHORT;
    let got = loop {
        let r = host.run(SHORT, || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&local(18085), SHORT)?;
            timeouts(&s, Duration::from_secs(5));
            let mut v = Vec::new();
            s.read_to_end(&mut v)?;
            Ok(v)
        });
        match r {
            Ok(v) if !v.is_empty() => break v,
            // Not listening yet (usernet or nc): try again.
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => panic!(
                "no answer through the forward: {other:?}\n{}",
                daemon.log_text()
            ),
        }
    };
    assert_eq!(got, b"served-by-nc\n");
    let st = daemon.stop();
    assert!(st.success() || st.code().is_some(), "{st}");
}

/// 1,000 concurrent connections through one forward, all echoed.
#[test]
fn thousand_concurrent_forwarded_connections() {
    if skip() {
        return;
    }
    const N: usize = 1000;
    raise_nofile();
    if nofile_limit() < 4 * N as u64 {
        eprintln!("skipping: RLIMIT_NOFILE {} is too low", nofile_limit());
        return;
    }
    let api = api_path();
    let mut tb = Testbed::with(opts(&api, true, &["--listen-backlog", "2048"]));
    let _srv = GuestServer::start(&tb.guest, 8086);
    ctl_ok(&api, &["expose", "127.0.0.1:18086", "192.168.65.3:8086"]);
    // Warm up: the gateway learns the guest's MAC address.
    hello(&tb.host, 18086, "warm\n");
    let t0 = Instant::now();
    let (connected, echoed, failures) = tb.host.run(Duration::from_secs(90), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use tokio::io::AsyncBufReadExt;
            let mut set = tokio::task::JoinSet::new();
            for i in 0..N {
                set.spawn(async move {
                    let r = tokio::time::timeout(Duration::from_secs(45), async {
                        let s = tokio::net::TcpStream::connect(local(18086)).await?;
                        let mut s = tokio::io::BufReader::new(s);
                        let mut greeting = String::new();
                        s.read_line(&mut greeting).await?;
                        Ok::<_, std::io::Error>((s, greeting))
                    })
                    .await;
                    (i, r)
                });
            }
            let mut streams = Vec::new();
            let mut failures = Vec::new();
            while let Some(r) = set.join_next().await {
                match r.unwrap() {
                    (i, Ok(Ok((s, g)))) if g.starts_with("peer=") => streams.push((i, s)),
                    (i, Ok(Ok((_, g)))) => failures.push(format!("#{i} greeting {g:?}")),
                    (i, Ok(Err(e))) => failures.push(format!("#{i} connect: {e}")),
                    (i, Err(_)) => failures.push(format!("#{i} connect timed out")),
                }
            }
            let connected = streams.len();
            // Phase 2: a few bytes each way on every connection, all at once.
            let (echoed, failures2) = echo_on_each(streams).await;
            failures.extend(failures2);
            (connected, echoed, failures)
        })
    });
    assert_all_echoed("forwarded connections", N, connected, echoed, failures, t0);
    let v: serde_json::Value = serde_json::from_str(&ctl_ok(&api, &["stats"])).unwrap();
    assert_eq!(v["driver"]["forward_accepted"], N as u64 + 1);
    assert_eq!(v["driver"]["forward_limit_hits"], 0);
    // Adaptive polling is on by default wherever there is more than one CPU, and every
    // wait of the loop is counted one way or the other.
    let poll = &v["driver"]["poll"];
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(poll["max_us"], if cpus > 1 { 100 } else { 0 }, "{poll}");
    assert!(
        poll["caught"].as_u64().unwrap() + poll["slept"].as_u64().unwrap() > 0,
        "{poll}"
    );
    tb.daemon.assert_alive();
}

/// The per-forward connection limit: connections beyond it are reset and counted.
#[test]
fn connection_limit_per_forward() {
    if skip() {
        return;
    }
    let api = api_path();
    let mut tb = Testbed::with(opts(&api, true, &["--forward-max-connections", "2"]));
    let _srv = GuestServer::start(&tb.guest, 8087);
    ctl_ok(&api, &["expose", "127.0.0.1:18087", "192.168.65.3:8087"]);
    let (held, third) = tb.host.run(SHORT, || {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect_timeout(&local(18087), SHORT).unwrap();
            timeouts(&s, SHORT);
            let mut b = [0u8; 64];
            assert!(s.read(&mut b).unwrap() > 0);
            held.push(s);
        }
        // The daemon accepts and resets at once, so the RST may land before
        // `connect_timeout` has finished polling: then connect itself fails.
        let third = TcpStream::connect_timeout(&local(18087), SHORT).and_then(|mut s| {
            timeouts(&s, SHORT);
            let mut v = Vec::new();
            s.read_to_end(&mut v).map(|_| v)
        });
        (held, third)
    });
    assert!(
        matches!(&third, Ok(v) if v.is_empty())
            || matches!(&third, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{third:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&ctl_ok(&api, &["stats"])).unwrap();
    assert_eq!(v["driver"]["forward_limit_hits"], 1);
    drop(held);
    // Once they are closed, there is room again.
    let deadline = Instant::now() + SHORT;
    loop {
        let v: serde_json::Value = serde_json::from_str(&ctl_ok(&api, &["stats"])).unwrap();
        if v["driver"]["forward_connections"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "connections not released: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (g, _) = hello(&tb.host, 18087, "room again\n");
    assert!(g.starts_with("peer="));
    tb.daemon.assert_alive();
}
