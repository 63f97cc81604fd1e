//! End-to-end tests: the real `usernet` binary serving a TAP in a test-created guest
//! network namespace, real clients (curl, busybox ping/udhcpc, kernel TCP/UDP sockets)
//! in the guest, servers on 127.0.0.1 of a test-created host namespace where the daemon
//! runs. Nothing touches the machine's real interfaces or resolver.
//!
//! Needs root (skipped otherwise) and the tools `ip` (iproute2), `curl` and `busybox`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_secs(20);

fn alias(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(HOST_ALIAS, port))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------------------
// 1. HTTP through the host alias, with curl.

fn http_get_via_host_alias(opts: Opts) {
    let mut tb = Testbed::with(opts);
    let listener = tb.host.tcp_listener(16);
    let port = listener.local_addr().unwrap().port();
    let body = text_body(300 * 1024);
    let server = http_server(listener, body.clone(), 1);
    let url = format!("http://{HOST_ALIAS}:{port}/hello");
    let out = run_ok(
        tb.guest
            .cmd("curl")
            .args(["-sS", "--fail", "--noproxy", "*", "-m", "20", &url]),
        SHORT,
    );
    assert_eq!(out.stdout.len(), body.len(), "body length");
    assert!(out.stdout == body, "the body differs from what was served");
    let lines = join_timeout(server, SHORT, "http server");
    assert_eq!(lines, ["GET /hello HTTP/1.1"]);
    tb.daemon.assert_alive();
    let st = tb.daemon.stop();
    assert!(st.success(), "the daemon exited with {st} on SIGTERM");
}

#[test]
fn http_get_through_host_alias() {
    if skip() {
        return;
    }
    http_get_via_host_alias(Opts::default());
}

#[test]
fn http_get_through_host_alias_mtu_1500() {
    if skip() {
        return;
    }
    http_get_via_host_alias(Opts {
        mtu: Some(1500),
        ..Opts::default()
    });
}

// ---------------------------------------------------------------------------------------
// 2. Bulk transfer each way, byte count and hash compared.

fn bulk_each_way(opts: Opts, size: u64) {
    let mut tb = Testbed::with(opts);
    let up_l = tb.host.tcp_listener(4);
    let down_l = tb.host.tcp_listener(4);
    let up_port = up_l.local_addr().unwrap().port();
    let down_port = down_l.local_addr().unwrap().port();
    let t0 = Instant::now();

    // Host side: one server receives (upload), one sends (download).
    let up_srv = std::thread::spawn(move || {
        let (mut s, _) = up_l.accept().unwrap();
        timeouts(&s, SHORT);
        recv_stream(&mut s).expect("upload server read")
    });
    let down_srv = std::thread::spawn(move || {
        let (mut s, _) = down_l.accept().unwrap();
        timeouts(&s, SHORT);
        let r = send_stream(&mut s, 0xD0_57, size).expect("download server write");
        s.shutdown(Shutdown::Write).unwrap();
        // Let the guest read everything before the socket closes.
        let mut b = [0u8; 16];
        let _ = s.read(&mut b);
        r
    });
    // Guest side, both directions at once.
    let up_cli = tb.guest.spawn(move || {
        let mut s = TcpStream::connect_timeout(&alias(up_port), SHORT).expect("connect (up)");
        timeouts(&s, SHORT);
        let r = send_stream(&mut s, 0x5EED, size).expect("upload write");
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("upload: wait for the server's close");
        assert!(rest.is_empty());
        r
    });
    let down_cli = tb.guest.spawn(move || {
        let mut s = TcpStream::connect_timeout(&alias(down_port), SHORT).expect("connect (down)");
        timeouts(&s, SHORT);
        let r = recv_stream(&mut s).expect("download read");
        drop(s);
        r
    });
    let sent_up = join_timeout(up_cli, LONG, "upload client");
    let got_up = join_timeout(up_srv, LONG, "upload server");
    let got_down = join_timeout(down_cli, LONG, "download client");
    let sent_down = join_timeout(down_srv, LONG, "download server");
    eprintln!("{} MB each way in {:?}", size >> 20, t0.elapsed());
    assert_eq!(sent_up.0, size);
    assert_eq!(got_up.0, size, "upload: bytes received by the host");
    assert_eq!(got_up, sent_up, "upload: hash differs");
    assert_eq!(sent_down.0, size);
    assert_eq!(got_down.0, size, "download: bytes received by the guest");
    assert_eq!(got_down, sent_down, "download: hash differs");
    tb.daemon.assert_alive();
}

#[test]
fn bulk_100mb_each_way_hash_matches() {
    if skip() {
        return;
    }
    bulk_each_way(Opts::default(), 100 << 20);
}

#[test]
fn bulk_20mb_each_way_hash_matches_mtu_1500() {
    if skip() {
        return;
    }
    bulk_each_way(
        Opts {
            mtu: Some(1500),
            ..Opts::default()
        },
        20 << 20,
    );
}

/// Slow readers on both ends: the daemon's buffers fill, flow control holds the sender
/// back, and nothing is lost or reordered.
#[test]
fn backpressure_with_stalled_readers() {
    if skip() {
        return;
    }
    const SIZE: u64 = 16 << 20;
    /// Read to EOF, stalling 400 ms after every 4 MiB.
    fn slow_recv(s: &mut TcpStream) -> (u64, u64) {
        let mut h = Hash::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut next_stall = 0u64;
        loop {
            let (n, _) = h.finish();
            if n >= next_stall {
                std::thread::sleep(Duration::from_millis(400));
                next_stall += 4 << 20;
            }
            match s.read(&mut buf).expect("slow reader") {
                0 => return h.finish(),
                k => h.update(&buf[..k]),
            }
        }
    }
    let mut tb = Testbed::start();
    let up_l = tb.host.tcp_listener(4);
    let down_l = tb.host.tcp_listener(4);
    let (up_port, down_port) = (
        up_l.local_addr().unwrap().port(),
        down_l.local_addr().unwrap().port(),
    );
    let up_srv = std::thread::spawn(move || {
        let (mut s, _) = up_l.accept().unwrap();
        timeouts(&s, SHORT);
        slow_recv(&mut s)
    });
    let down_srv = std::thread::spawn(move || {
        let (mut s, _) = down_l.accept().unwrap();
        timeouts(&s, SHORT);
        let r = send_stream(&mut s, 99, SIZE).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
        r
    });
    let up_cli = tb.guest.spawn(move || {
        let mut s = TcpStream::connect_timeout(&alias(up_port), SHORT).unwrap();
        timeouts(&s, SHORT);
        let r = send_stream(&mut s, 98, SIZE).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
        r
    });
    let down_cli = tb.guest.spawn(move || {
        let mut s = TcpStream::connect_timeout(&alias(down_port), SHORT).unwrap();
        timeouts(&s, SHORT);
        slow_recv(&mut s)
    });
    let sent_up = join_timeout(up_cli, LONG, "upload client");
    let got_up = join_timeout(up_srv, LONG, "upload server");
    let got_down = join_timeout(down_cli, LONG, "download client");
    let sent_down = join_timeout(down_srv, LONG, "download server");
    assert_eq!(got_up, sent_up, "upload (bytes, hash)");
    assert_eq!(got_down, sent_down, "download (bytes, hash)");
    assert_eq!(sent_up.0, SIZE);
    tb.daemon.assert_alive();
}

/// A server that speaks first (SSH, SMTP): its greeting must reach a guest that has sent
/// nothing, both at once after the accept and some time later.
#[test]
fn server_speaks_first() {
    if skip() {
        return;
    }
    const BANNER: &[u8] = b"SSH-2.0-usernet_e2e\r\n";
    const LATER: &[u8] = b"220 later, still unprompted\r\n";
    let mut tb = Testbed::start();
    let l = tb.host.tcp_listener(4);
    let port = l.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        timeouts(&s, SHORT);
        s.write_all(BANNER).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(LATER).unwrap();
        let mut b = [0u8; 3];
        s.read_exact(&mut b).expect("server: the guest's answer");
        b
    });
    let cli = tb.guest.spawn(move || {
        let mut s = TcpStream::connect_timeout(&alias(port), SHORT).expect("connect");
        timeouts(&s, Duration::from_secs(5));
        let t = Instant::now();
        let mut b = vec![0u8; BANNER.len()];
        let r1 = s.read_exact(&mut b).map(|_| b).map_err(|e| e.kind());
        let t1 = t.elapsed();
        let mut b = vec![0u8; LATER.len()];
        let r2 = s.read_exact(&mut b).map(|_| b).map_err(|e| e.kind());
        let t2 = t.elapsed();
        let _ = s.write_all(b"ok\n");
        (r1, t1, r2, t2)
    });
    let (r1, t1, r2, t2) = join_timeout(cli, SHORT, "guest");
    assert_eq!(
        r1.as_deref(),
        Ok(BANNER),
        "the greeting sent at once did not reach the guest (waited {t1:?})"
    );
    assert!(t1 < Duration::from_secs(2), "the greeting took {t1:?}");
    assert_eq!(
        r2.as_deref(),
        Ok(LATER),
        "the later unprompted line did not reach the guest (waited {t2:?})"
    );
    assert_eq!(&join_timeout(srv, SHORT, "server"), b"ok\n");
    tb.daemon.assert_alive();
}

// ---------------------------------------------------------------------------------------
// 3. Half-close: the guest's FIN does not end the host's reply.

#[test]
fn half_close_reply_after_guest_shutdown() {
    if skip() {
        return;
    }
    let mut tb = Testbed::start();
    let l = tb.host.tcp_listener(4);
    let port = l.local_addr().unwrap().port();
    let request: Vec<u8> = text_body(10_000);
    let reply: Vec<u8> = text_body(1 << 20).into_iter().rev().collect();
    let (req2, rep2) = (request.clone(), reply.clone());
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        timeouts(&s, SHORT);
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("server: read to EOF");
        assert!(got == req2, "server: request differs ({} bytes)", got.len());
        // Reply only after the guest's FIN, then close.
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(&rep2).expect("server: write the reply");
        drop(s);
        got.len()
    });
    let cli = tb.guest.spawn(move || {
        let mut s = TcpStream::connect_timeout(&alias(port), SHORT).expect("connect");
        timeouts(&s, SHORT);
        s.write_all(&request).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .expect("guest: read the reply to EOF");
        // EOF again after EOF.
        let mut b = [0u8; 8];
        assert_eq!(s.read(&mut b).unwrap(), 0);
        got
    });
    let got = join_timeout(cli, SHORT, "guest");
    assert_eq!(join_timeout(srv, SHORT, "server"), 10_000);
    assert_eq!(got.len(), reply.len(), "reply length");
    assert!(got == reply, "reply differs");
    tb.daemon.assert_alive();
}

/// The other way round: the host shuts down its side first; the guest still uploads.
#[test]
fn half_close_host_shuts_down_first() {
    if skip() {
        return;
    }
    let mut tb = Testbed::start();
    let l = tb.host.tcp_listener(4);
    let port = l.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        timeouts(&s, SHORT);
        s.write_all(b"greeting, then EOF\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        recv_stream(&mut s).expect("server: read the upload to EOF")
    });
    let cli = tb.guest.spawn(move || {
        let mut s = TcpStream::connect_timeout(&alias(port), SHORT).expect("connect");
        timeouts(&s, Duration::from_secs(8));
        let mut greeting = Vec::new();
        s.read_to_end(&mut greeting)
            .expect("guest: read to the host's EOF");
        // Upload after the host's FIN.
        let sent = send_stream(&mut s, 77, 2 << 20).expect("guest: upload after EOF");
        s.shutdown(Shutdown::Write).unwrap();
        (greeting, sent)
    });
    let (greeting, sent) = join_timeout(cli, SHORT, "guest");
    let got = join_timeout(srv, SHORT, "server");
    assert_eq!(greeting, b"greeting, then EOF\n");
    assert_eq!(got, sent, "upload after the host's FIN: (bytes, hash)");
    tb.daemon.assert_alive();
}

// ---------------------------------------------------------------------------------------
// DNS relay: the gateway's port 53 forwards to --dns (a fake server on the host ns's
// loopback), queried by a real resolver client (busybox nslookup).

/// Answer A queries with 10.1.2.3 and anything else with no records.
fn dns_answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut i = 12;
    while i < q.len() && q[i] != 0 {
        i += 1 + usize::from(q[i]);
    }
    let end = i + 5; // root label, qtype, qclass
    if end > q.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
    let mut r = q[..end].to_vec();
    r[2] = 0x81 | (q[2] & 0x01); // QR, opcode 0, RD copied
    r[3] = 0x80; // RA, NOERROR
    r[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    if qtype == 1 {
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 1, 2, 3]);
    }
    Some(r)
}

#[test]
fn dns_relay_to_configured_server() {
    if skip() {
        return;
    }
    let host = Netns::new("une2e-h");
    let dns = host.run(SHORT, || UdpSocket::bind("127.0.0.1:0").unwrap());
    let dns_port = dns.local_addr().unwrap().port();
    let mut tb = Testbed::with_host(
        host,
        Opts {
            extra: vec!["--dns".into(), format!("127.0.0.1:{dns_port}")],
            ..Opts::default()
        },
    );
    dns.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let srv = std::thread::spawn(move || {
        let mut n = 0;
        let mut buf = [0u8; 1500];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((len, from)) = dns.recv_from(&mut buf) {
                if let Some(r) = dns_answer(&buf[..len]) {
                    dns.send_to(&r, from).unwrap();
                    n += 1;
                }
            }
        }
        n
    });
    // A raw query first: the reply must come from the gateway's port 53.
    let (reply, from) = tb.guest.run(SHORT, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let q = [
            0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 4, b'e', b'2', b'e', b'x', 4, b't', b'e',
            b's', b't', 0, 0, 1, 0, 1,
        ];
        let mut buf = [0u8; 1500];
        for _ in 0..3 {
            s.send_to(&q, (GATEWAY, 53)).unwrap();
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                return (buf[..n].to_vec(), Some(from));
            }
        }
        (Vec::new(), None)
    });
    assert_eq!(from, Some(SocketAddr::from((GATEWAY, 53))), "reply source");
    assert_eq!(&reply[..2], &[0xab, 0xcd], "DNS id");
    assert_eq!(&reply[reply.len() - 4..], &[10, 1, 2, 3], "answer");
    // A real client.
    let o = run_cmd(
        tb.guest
            .cmd("busybox")
            .args(["nslookup", "-type=a", "e2ex.test", &GATEWAY.to_string()]),
        SHORT,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = join_timeout(srv, SHORT, "dns server");
    let out = text(&o.stdout);
    assert!(
        out.contains("10.1.2.3"),
        "nslookup: {}\n{out}\n{}",
        o.status,
        text(&o.stderr)
    );
    // nslookup's repeat of the same question may be answered from the gateway's cache.
    assert!(served >= 1, "the fake server answered {served} queries");
    tb.daemon.assert_alive();
}

// ---------------------------------------------------------------------------------------
// 4. A refused port is refused at once (RST), not after the connect timeout.

#[test]
fn refused_port_fails_fast() {
    if skip() {
        return;
    }
    let mut tb = Testbed::start();
    let port = tb.host.closed_port();
    let (kind, took) = tb.guest.run(SHORT, move || {
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&alias(port), Duration::from_secs(15));
        (r.map(|_| ()).map_err(|e| e.kind()), t.elapsed())
    });
    assert_eq!(kind, Err(ErrorKind::ConnectionRefused), "after {took:?}");
    assert!(took < Duration::from_secs(3), "refusal took {took:?}");
    // And again (a second flow to the same port), then a working port still works.
    let l = tb.host.tcp_listener(4);
    let open = l.local_addr().unwrap().port();
    let (kind2, ok) = tb.guest.run(SHORT, move || {
        let r = TcpStream::connect_timeout(&alias(port), Duration::from_secs(15));
        let ok = TcpStream::connect_timeout(&alias(open), Duration::from_secs(15));
        (
            r.map(|_| ()).map_err(|e| e.kind()),
            ok.map(|_| ()).map_err(|e| e.kind()),
        )
    });
    assert_eq!(kind2, Err(ErrorKind::ConnectionRefused));
    assert_eq!(ok, Ok(()));
    drop(l);
    tb.daemon.assert_alive();
}

// ---------------------------------------------------------------------------------------
// 5. UDP echo through the host alias.

fn udp_echo(opts: Opts) {
    let opts_mtu = opts.mtu.unwrap_or(65520);
    let mut tb = Testbed::with(opts);
    let srv_sock = tb
        .host
        .run(SHORT, || UdpSocket::bind("127.0.0.1:0").unwrap());
    let port = srv_sock.local_addr().unwrap().port();
    srv_sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let srv = std::thread::spawn(move || {
        let mut peers = Vec::new();
        let mut buf = vec![0u8; 65536];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            match srv_sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    srv_sock.send_to(&buf[..n], from).unwrap();
                    peers.push(from);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("udp server: {e}"),
            }
        }
        peers
    });
    // Datagrams up to the largest that fits the link's MTU unfragmented (the stack does
    // not reassemble IPv4 fragments, by design).
    let max = usize::from(opts_mtu) - 28;
    let sizes: Vec<usize> = [1usize, 100, 1400, 1472, 4000, 30_000, 60_000, max]
        .into_iter()
        .filter(|&n| n <= max)
        .collect();
    let results = tb.guest.run(LONG, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        for (i, len) in sizes.into_iter().enumerate() {
            let msg: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            let mut got = None;
            // UDP may lose a datagram; a few tries, each bounded.
            for _ in 0..3 {
                s.send_to(&msg, alias(port)).unwrap();
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        got = Some((buf[..n] == msg[..], n, from));
                        break;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("guest recv: {e}"),
                }
            }
            out.push((len, got));
        }
        out
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peers = join_timeout(srv, SHORT, "udp server");
    for (len, got) in results {
        let (same, n, from) = got.unwrap_or_else(|| panic!("no echo of a {len}-byte datagram"));
        assert_eq!(n, len, "echo length");
        assert!(same, "echo of {len} bytes differs");
        assert_eq!(
            from,
            alias(port),
            "the echo must come from the host alias and port"
        );
    }
    // The host saw the datagrams from its own loopback, from one flow's socket.
    assert!(!peers.is_empty());
    assert!(
        peers.iter().all(|p| p.ip() == Ipv4Addr::LOCALHOST),
        "{peers:?}"
    );
    assert!(
        peers.iter().all(|p| *p == peers[0]),
        "one socket per flow: {peers:?}"
    );
    tb.daemon.assert_alive();
}

#[test]
fn udp_echo_through_host_alias() {
    if skip() {
        return;
    }
    udp_echo(Opts::default());
}

/// The 1500 link's boundary: 1472-byte datagrams are the largest unfragmented ones.
#[test]
fn udp_echo_through_host_alias_mtu_1500() {
    if skip() {
        return;
    }
    udp_echo(Opts {
        mtu: Some(1500),
        ..Opts::default()
    });
}

// ---------------------------------------------------------------------------------------
// 6. Ping the host alias and the gateway.

fn busybox_ping(tb: &Testbed, dst: Ipv4Addr, size: &str) {
    let o = run_cmd(
        tb.guest.cmd("busybox").args([
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-w",
            "10",
            "-s",
            size,
            &dst.to_string(),
        ]),
        SHORT,
    );
    let out = text(&o.stdout);
    assert!(
        o.status.success() && out.contains("3 packets received"),
        "ping {dst} -s {size}: {}\n{out}\n{}",
        o.status,
        text(&o.stderr)
    );
}

#[test]
fn ping_host_alias_and_gateway() {
    if skip() {
        return;
    }
    let mut tb = Testbed::start();
    busybox_ping(&tb, HOST_ALIAS, "56");
    busybox_ping(&tb, GATEWAY, "56");
    // Larger than a 1500 link's MTU, smaller than this one's.
    busybox_ping(&tb, HOST_ALIAS, "8000");
    busybox_ping(&tb, GATEWAY, "8000");
    tb.daemon.assert_alive();
}

// ---------------------------------------------------------------------------------------
// 7. 1000 concurrent TCP connections.

#[test]
fn thousand_concurrent_connections() {
    if skip() {
        return;
    }
    const N: usize = 1000;
    raise_nofile();
    if nofile_limit() < 3 * N as u64 {
        eprintln!("skipping: RLIMIT_NOFILE {} is too low", nofile_limit());
        return;
    }
    let mut tb = Testbed::start();
    let l = tb.host.tcp_listener(2048);
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..N {
                let (mut s, _) = tokio::time::timeout(LONG, l.accept())
                    .await
                    .expect("server: accept timed out")
                    .expect("accept");
                tasks.spawn(async move {
                    let mut buf = [0u8; 256];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
            tokio::time::timeout(LONG, async { while tasks.join_next().await.is_some() {} })
                .await
                .expect("server: echo tasks did not finish");
            N
        })
    });
    let t0 = Instant::now();
    let (connected, echoed, failures) = tb.guest.run(Duration::from_secs(90), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            // Phase 1: all connections opened at once, and held.
            let mut set = tokio::task::JoinSet::new();
            for i in 0..N {
                set.spawn(async move {
                    let r = tokio::time::timeout(
                        Duration::from_secs(45),
                        tokio::net::TcpStream::connect(alias(port)),
                    )
                    .await;
                    (i, r)
                });
            }
            let mut streams = Vec::new();
            let mut failures = Vec::new();
            while let Some(r) = set.join_next().await {
                match r.unwrap() {
                    (i, Ok(Ok(s))) => streams.push((i, s)),
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
    assert_all_echoed("connections", N, connected, echoed, failures, t0);
    assert_eq!(join_timeout(srv, LONG, "echo server"), N);
    tb.daemon.assert_alive();
}

// ---------------------------------------------------------------------------------------
// 8. DHCP lease obtained by a real client (busybox udhcpc).

#[test]
fn dhcp_lease_with_busybox_udhcpc() {
    if skip() {
        return;
    }
    let mut tb = Testbed::with(Opts {
        configure_guest: false,
        ..Opts::default()
    });
    let env = udhcpc(&tb.guest, "");
    let bound = env
        .lines()
        .find(|l| l.starts_with("bound "))
        .unwrap_or_else(|| panic!("no bound event: {env:?}"));
    for want in [
        "ip=192.168.65.3 ",
        "router=192.168.65.1 ",
        "mtu=65520 ",
        "serverid=192.168.65.1 ",
    ] {
        assert!(bound.contains(want), "{want:?} missing in {bound:?}");
    }
    assert!(
        bound.contains("subnet=255.255.255.0 ") || bound.contains("mask=24 "),
        "netmask missing in {bound:?}"
    );
    assert!(!bound.contains("lease= "), "no lease time in {bound:?}");

    // Apply the lease and use it: TCP to the host alias.
    tb.guest.ip(&["addr", "add", "192.168.65.3/24", "dev", TAP]);
    tb.guest
        .ip(&["route", "add", "default", "via", "192.168.65.1"]);
    let l = tb.host.tcp_listener(4);
    let port = l.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let (mut s, peer) = l.accept().unwrap();
        s.write_all(b"leased\n").unwrap();
        peer
    });
    let got = tb.guest.run(SHORT, move || {
        let mut s = TcpStream::connect_timeout(&alias(port), SHORT).unwrap();
        timeouts(&s, Duration::from_secs(8));
        let mut b = Vec::new();
        s.read_to_end(&mut b)
            .expect("guest: read the server's greeting to EOF");
        b
    });
    assert_eq!(got, b"leased\n");
    let peer = join_timeout(srv, SHORT, "server");
    assert_eq!(peer.ip(), Ipv4Addr::LOCALHOST);
    tb.daemon.assert_alive();
}

// ---------------------------------------------------------------------------------------
// 9. `usernet run`.

#[test]
fn run_exits_with_the_command_status() {
    if skip() {
        return;
    }
    // `run` makes its own namespaces; the daemon stays in the caller's, so the caller is a
    // test namespace too.
    let host = Netns::new("une2e-h");
    let o = run_cmd(
        host.cmd(USERNET)
            .args(["run", "--no-dns", "--", "sh", "-c", "exit 7"]),
        SHORT,
    );
    assert_eq!(o.status.code(), Some(7), "stderr: {}", text(&o.stderr));
    let o = run_cmd(
        host.cmd(USERNET).args(["run", "--no-dns", "--", "true"]),
        SHORT,
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let o = run_cmd(
        host.cmd(USERNET)
            .args(["run", "--no-dns", "--", "/nonexistent/e2e-command"]),
        SHORT,
    );
    assert_eq!(o.status.code(), Some(127), "stderr: {}", text(&o.stderr));
    // The TAP inside: default MTU 65520, or --mtu.
    let o = run_ok(
        host.cmd(USERNET).args([
            "run",
            "--no-dns",
            "--",
            "sh",
            "-c",
            "cat /sys/class/net/tap0/mtu",
        ]),
        SHORT,
    );
    assert_eq!(text(&o.stdout).trim(), "65520");
    let o = run_ok(
        host.cmd(USERNET).args([
            "run",
            "--no-dns",
            "--mtu",
            "1500",
            "--",
            "sh",
            "-c",
            "cat /sys/class/net/tap0/mtu",
        ]),
        SHORT,
    );
    assert_eq!(text(&o.stdout).trim(), "1500");
}

#[test]
fn run_curl_reaches_the_host_alias() {
    if skip() {
        return;
    }
    let host = Netns::new("une2e-h");
    let l = host.tcp_listener(4);
    let port = l.local_addr().unwrap().port();
    let body = text_body(200_000);
    let server = http_server(l, body.clone(), 1);
    let o = run_cmd(
        host.cmd(USERNET).args([
            "run",
            "--no-dns",
            "--",
            "curl",
            "-sS",
            "--fail",
            "--noproxy",
            "*",
            "-m",
            "20",
            &format!("http://{HOST_ALIAS}:{port}/run"),
        ]),
        Duration::from_secs(30),
    );
    assert!(
        o.status.success(),
        "usernet run curl: {}\n{}",
        o.status,
        text(&o.stderr)
    );
    assert!(o.stdout == body, "body differs ({} bytes)", o.stdout.len());
    assert_eq!(
        join_timeout(server, SHORT, "http server"),
        ["GET /run HTTP/1.1"]
    );
}

/// `run --no-configure`: the command configures itself by DHCP (busybox udhcpc inside).
#[test]
fn run_no_configure_dhcp_inside() {
    if skip() {
        return;
    }
    let host = Netns::new("une2e-h");
    let script = "s=$(mktemp); \
        printf '#!/bin/sh\\necho \"$1 ip=$ip router=$router mtu=$mtu\"\\n' > $s; chmod +x $s; \
        ip -4 -o addr show tap0 | grep -c inet; \
        busybox udhcpc -i tap0 -n -q -f -t 5 -T 1 -O mtu -s $s 2>/dev/null; rc=$?; rm -f $s; exit $rc";
    let o = run_cmd(
        host.cmd(USERNET).args([
            "run",
            "--no-dns",
            "--no-configure",
            "--",
            "sh",
            "-c",
            script,
        ]),
        SHORT,
    );
    let out = text(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{out}\n{}",
        o.status,
        text(&o.stderr)
    );
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("0"),
        "tap0 had an address before DHCP: {out}"
    );
    assert!(
        out.lines()
            .any(|l| l == "bound ip=192.168.65.3 router=192.168.65.1 mtu=65520"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------
// 10. QEMU stream transport with a framed client.

const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn eth(dst: [u8; 6], ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&VM_MAC);
    f.extend_from_slice(&ty.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&VM_MAC);
    a.extend_from_slice(&FIRST_GUEST.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    eth([0xff; 6], 0x0806, &a)
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut s: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn dhcp_discover(xid: u32) -> Vec<u8> {
    let mut b = vec![1u8, 1, 6, 0];
    b.extend_from_slice(&xid.to_be_bytes());
    b.extend_from_slice(&[0; 4]); // secs, flags
    b.extend_from_slice(&[0; 16]); // ciaddr yiaddr siaddr giaddr
    b.extend_from_slice(&VM_MAC);
    b.resize(236, 0);
    b.extend_from_slice(&[0x63, 0x82, 0x53, 0x63]);
    b.extend_from_slice(&[53, 1, 1]);
    b.extend_from_slice(&[55, 4, 1, 3, 6, 26]);
    b.push(255);
    let udp_len = 8 + b.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&68u16.to_be_bytes());
    udp.extend_from_slice(&67u16.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&b);
    let total = 20 + udp.len();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&[0, 0, 0, 0]);
    ip.extend_from_slice(&[255, 255, 255, 255]);
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&udp);
    eth([0xff; 6], 0x0800, &ip)
}

fn send_framed(s: &mut UnixStream, f: &[u8]) {
    let mut w = (f.len() as u32).to_be_bytes().to_vec();
    w.extend_from_slice(f);
    s.write_all(&w).unwrap();
}

/// Read framed frames until `pick` accepts one (others are skipped), bounded.
fn read_until<T>(s: &mut UnixStream, what: &str, mut pick: impl FnMut(&[u8]) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "no {what} within 10 s ({seen} other frames)"
        );
        let mut len = [0u8; 4];
        s.read_exact(&mut len)
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        let len = u32::from_be_bytes(len) as usize;
        assert!((14..=65536 + 14).contains(&len), "bad frame length {len}");
        let mut f = vec![0u8; len];
        s.read_exact(&mut f).unwrap();
        assert!(len <= 1514, "frame of {len} bytes on a 1500-MTU link");
        if let Some(t) = pick(&f) {
            return t;
        }
        seen += 1;
    }
}

fn dhcp_options(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 240;
    while i < b.len() {
        match b[i] {
            0 => i += 1,
            255 => break,
            code => {
                let l = b[i + 1] as usize;
                out.push((code, b[i + 2..i + 2 + l].to_vec()));
                i += 2 + l;
            }
        }
    }
    out
}

#[test]
fn qemu_stream_arp_and_dhcp() {
    if skip() {
        return;
    }
    let host = Netns::new("une2e-h");
    let sock = PathBuf::from(format!("/tmp/{}.sock", unique("usernet-e2e")));
    let mut daemon = Daemon::spawn(
        &host,
        &[
            "stream".into(),
            "--socket".into(),
            sock.display().to_string(),
            "--no-dns".into(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        daemon.assert_alive();
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "cannot connect to {sock:?}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();

    // ARP for the gateway.
    send_framed(&mut s, &arp_request(GATEWAY));
    let reply = read_until(&mut s, "ARP reply", |f| {
        (f[12..14] == [0x08, 0x06] && f.len() >= 42 && f[20..22] == [0, 2]).then(|| f.to_vec())
    });
    let gw_mac = usernet_core::Config::for_subnet("192.168.65.0/24".parse().unwrap()).gateway_mac;
    assert_eq!(&reply[0..6], &VM_MAC, "eth dst");
    assert_eq!(&reply[6..12], &gw_mac, "eth src");
    assert_eq!(
        &reply[14..20],
        &[0, 1, 8, 0, 6, 4],
        "arp htype/ptype/hlen/plen"
    );
    assert_eq!(&reply[22..28], &gw_mac, "arp sender mac");
    assert_eq!(&reply[28..32], &GATEWAY.octets(), "arp sender ip");
    assert_eq!(&reply[32..38], &VM_MAC, "arp target mac");
    assert_eq!(&reply[38..42], &FIRST_GUEST.octets(), "arp target ip");

    // DHCP: the offer carries MTU 1500 (stream's default), .3, router .1.
    let xid = 0x1234_5678;
    send_framed(&mut s, &dhcp_discover(xid));
    let bootp = read_until(&mut s, "DHCP offer", |f| {
        if f[12..14] != [0x08, 0x00] || f[23] != 17 {
            return None;
        }
        let ihl = usize::from(f[14] & 0xf) * 4;
        let udp = &f[14 + ihl..];
        (udp[0..2] == 67u16.to_be_bytes() && udp[2..4] == 68u16.to_be_bytes())
            .then(|| udp[8..].to_vec())
    });
    assert_eq!(bootp[0], 2, "BOOTREPLY");
    assert_eq!(bootp[4..8], xid.to_be_bytes(), "xid");
    assert_eq!(&bootp[16..20], &FIRST_GUEST.octets(), "yiaddr");
    assert_eq!(&bootp[28..34], &VM_MAC, "chaddr");
    let opts = dhcp_options(&bootp);
    let opt = |c: u8| {
        opts.iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("option {c} missing: {opts:?}"))
    };
    assert_eq!(opt(53), [2], "DHCPOFFER");
    assert_eq!(opt(26), 1500u16.to_be_bytes(), "interface MTU");
    assert_eq!(opt(3), GATEWAY.octets(), "router");
    assert_eq!(opt(1), [255, 255, 255, 0], "netmask");
    assert_eq!(opt(54), GATEWAY.octets(), "server id");

    drop(s);
    daemon.assert_alive();
    let st = daemon.stop();
    assert!(st.success(), "stream daemon exited with {st} on SIGTERM");
    assert!(!sock.exists(), "the socket file is left behind");
}

// ---------------------------------------------------------------------------------------
// Aborts: a reset on one side reaches the other promptly.

fn linger0(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

#[test]
fn host_reset_reaches_the_guest() {
    if skip() {
        return;
    }
    let mut tb = Testbed::start();
    let l = tb.host.tcp_listener(4);
    let port = l.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        timeouts(&s, SHORT);
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        linger0(&s);
        drop(s);
    });
    let (read, took) = tb.guest.run(SHORT, move || {
        let mut s = TcpStream::connect_timeout(&alias(port), SHORT).unwrap();
        timeouts(&s, Duration::from_secs(10));
        s.write_all(b"hello").unwrap();
        let t = Instant::now();
        let mut b = [0u8; 16];
        let r = s.read(&mut b).map_err(|e| e.kind());
        (r, t.elapsed())
    });
    join_timeout(srv, SHORT, "server");
    assert_eq!(read, Err(ErrorKind::ConnectionReset), "after {took:?}");
    assert!(took < Duration::from_secs(2), "the reset took {took:?}");
    tb.daemon.assert_alive();
}

#[test]
fn guest_reset_reaches_the_host() {
    if skip() {
        return;
    }
    let mut tb = Testbed::start();
    let l = tb.host.tcp_listener(4);
    let port = l.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        timeouts(&s, Duration::from_secs(10));
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        let t = Instant::now();
        let r = s.read(&mut b).map_err(|e| e.kind());
        (r, t.elapsed())
    });
    tb.guest.run(SHORT, move || {
        let mut s = TcpStream::connect_timeout(&alias(port), SHORT).unwrap();
        s.write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        linger0(&s);
        drop(s);
    });
    let (read, took) = join_timeout(srv, SHORT, "server");
    assert_eq!(read, Err(ErrorKind::ConnectionReset), "after {took:?}");
    assert!(took < Duration::from_secs(2), "the reset took {took:?}");
    tb.daemon.assert_alive();
}
