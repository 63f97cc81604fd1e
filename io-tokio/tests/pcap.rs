//! End-to-end tests of `--pcap`: the daemon serves a TAP in a test-created guest
//! namespace (see `common`), the guest pings the gateway and opens a TCP connection to a
//! server on the host namespace's loopback; after the daemon stops, `tcpdump -r` must read
//! the capture and show those frames.
//!
//! Needs root (skipped otherwise), `ip`, `busybox` and `tcpdump`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

const SHORT: Duration = Duration::from_secs(20);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).exists()))
}

fn skip_pcap() -> bool {
    if skip() {
        return true;
    }
    if !have("tcpdump") || !have("busybox") {
        eprintln!("skipping: tcpdump and busybox are needed");
        return true;
    }
    false
}

/// Removes the capture file at the end of a test.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn ping_gateway(tb: &Testbed, count: &str, size: &str) {
    let o = run_cmd(
        tb.guest.cmd("busybox").args([
            "ping",
            "-c",
            count,
            "-i",
            "0.2",
            "-w",
            "10",
            "-s",
            size,
            &GATEWAY.to_string(),
        ]),
        SHORT,
    );
    assert!(
        o.status.success(),
        "ping: {}\n{}\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// `tcpdump -r FILE -nn -tt`: its output lines; it must exit 0 (a cut record is an error).
fn tcpdump(path: &Path) -> Vec<String> {
    let o = run_cmd(
        Command::new("tcpdump").args(["-r", path.to_str().unwrap(), "-nn", "-tt"]),
        SHORT,
    );
    assert!(
        o.status.success(),
        "tcpdump -r: {}\n{}",
        o.status,
        text(&o.stderr)
    );
    text(&o.stdout).lines().map(str::to_owned).collect()
}

/// The (incl_len, orig_len) of every record of a little-endian classic pcap file.
fn records(bytes: &[u8]) -> Vec<(u32, u32)> {
    assert_eq!(&bytes[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "magic");
    let le = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    let mut out = Vec::new();
    let mut i = 24;
    while i < bytes.len() {
        assert!(i + 16 <= bytes.len(), "cut record header at {i}");
        let (incl, orig) = (le(&bytes[i + 8..i + 12]), le(&bytes[i + 12..i + 16]));
        i += 16 + incl as usize;
        assert!(i <= bytes.len(), "cut record data");
        out.push((incl, orig));
    }
    out
}

#[test]
fn pcap_of_a_session_reads_back_with_tcpdump() {
    if skip_pcap() {
        return;
    }
    let file = TempFile(PathBuf::from(format!(
        "/tmp/{}.pcap",
        unique("usernet-pcap")
    )));
    let t0 = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut tb = Testbed::with(Opts {
        extra: vec![
            "--no-dns".into(),
            "--pcap".into(),
            file.0.display().to_string(),
        ],
        ..Opts::default()
    });
    ping_gateway(&tb, "2", "56");

    let listener = tb.host.tcp_listener(4);
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        timeouts(&s, SHORT);
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"world").unwrap();
        buf
    });
    let (client_port, reply) = tb.guest.run(SHORT, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((HOST_ALIAS, port)), SHORT).unwrap();
        timeouts(&s, SHORT);
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        (s.local_addr().unwrap().port(), buf)
    });
    assert_eq!(&reply, b"world");
    assert_eq!(&join_timeout(server, SHORT, "server"), b"hello");
    let st = tb.daemon.stop();
    assert!(st.success(), "daemon exit: {st}");
    let t1 = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();

    let bytes = std::fs::read(&file.0).unwrap();
    let recs = records(&bytes);
    assert!(
        recs.iter().all(|&(incl, orig)| incl == orig),
        "nothing is cut at the default snap length: {recs:?}"
    );
    let lines = tcpdump(&file.0);
    let all = lines.join("\n");
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(
        has("ARP, Request who-has 192.168.65.1 tell 192.168.65.3"),
        "{all}"
    );
    assert!(
        has("ARP, Reply 192.168.65.1 is-at 5a:94:ef:e4:0c:ee"),
        "{all}"
    );
    assert!(
        has("IP 192.168.65.3 > 192.168.65.1: ICMP echo request"),
        "{all}"
    );
    assert!(
        has("IP 192.168.65.1 > 192.168.65.3: ICMP echo reply"),
        "{all}"
    );
    let c = format!("192.168.65.3.{client_port}");
    let s = format!("192.168.65.2.{port}");
    assert!(has(&format!("IP {c} > {s}: Flags [S],")), "SYN:\n{all}");
    assert!(
        has(&format!("IP {s} > {c}: Flags [S.],")),
        "SYN-ACK:\n{all}"
    );
    // The 5 bytes each way (the host's may ride with its FIN).
    let data = |from: &str, to: &str| {
        lines
            .iter()
            .any(|l| l.contains(&format!("IP {from} > {to}: Flags [")) && l.ends_with("length 5"))
    };
    assert!(data(&c, &s) && data(&s, &c), "data both ways:\n{all}");
    assert_eq!(lines.len(), recs.len(), "one line per record");
    // System-clock timestamps, within the test's run.
    for l in &lines {
        let ts: f64 = l.split(' ').next().unwrap().parse().unwrap();
        assert!(
            ts >= t0.as_secs_f64() - 1.0 && ts <= t1.as_secs_f64() + 1.0,
            "timestamp {ts} outside [{t0:?}, {t1:?}]: {l}"
        );
    }
}

#[test]
fn pcap_snaplen_and_size_cap() {
    if skip_pcap() {
        return;
    }
    let file = TempFile(PathBuf::from(format!(
        "/tmp/{}.pcap",
        unique("usernet-pcap")
    )));
    let cap: u64 = 3000;
    let mut tb = Testbed::with(Opts {
        extra: vec![
            "--no-dns".into(),
            "--pcap".into(),
            file.0.display().to_string(),
            "--pcap-snaplen".into(),
            "100".into(),
            "--pcap-max-bytes".into(),
            cap.to_string(),
        ],
        ..Opts::default()
    });
    // 20 requests and 20 replies of 1028 bytes (1000 of data): far more than the cap.
    ping_gateway(&tb, "20", "1000");
    let st = tb.daemon.stop();
    assert!(st.success(), "daemon exit: {st}");
    let log = tb.daemon.log_text();
    assert_eq!(
        log.matches("pcap size cap reached").count(),
        1,
        "logged once:\n{log}"
    );

    let bytes = std::fs::read(&file.0).unwrap();
    assert!(bytes.len() as u64 <= cap, "{} > {cap}", bytes.len());
    // The next record would not have fitted.
    assert!(bytes.len() as u64 + 16 + 100 > cap, "{}", bytes.len());
    let recs = records(&bytes);
    assert!(recs.iter().all(|&(incl, _)| incl <= 100), "{recs:?}");
    let pings: Vec<_> = recs.iter().filter(|&&(_, orig)| orig == 1042).collect();
    assert!(
        !pings.is_empty(),
        "echo frames (1042 bytes) cut to 100: {recs:?}"
    );
    assert!(pings.iter().all(|&&(incl, _)| incl == 100));
    let lines = tcpdump(&file.0);
    assert_eq!(lines.len(), recs.len());
    assert!(
        lines.iter().any(|l| l.contains("ICMP echo request")),
        "{lines:?}"
    );
}
