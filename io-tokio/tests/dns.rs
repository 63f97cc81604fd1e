//! The gateway's DNS service end to end: `dig` in the guest namespace, through usernet, to
//! dnsmasq on the daemon's loopback (both inside namespaces the test creates).

mod common;

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const SHORT: Duration = Duration::from_secs(20);

/// dnsmasq serving fixed records on 127.0.0.1:`port` of the host namespace.
struct Dnsmasq(Child);

impl Dnsmasq {
    fn start(host: &Netns, port: u16) -> Dnsmasq {
        let big: Vec<String> = (0..12)
            .map(|i| format!("--txt-record=big.e2e.test,{i:02}{}", "x".repeat(180)))
            .collect();
        let child = host
            .cmd("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--pid-file=",
                &format!("--port={port}"),
                "--host-record=www.e2e.test,10.9.8.7,fd00::7",
                "--srv-host=_sip._tcp.e2e.test,sip.e2e.test,5060,0,5",
                "--txt-record=txt.e2e.test,hello world",
                "--mx-host=e2e.test,mail.e2e.test,10",
                "--ptr-record=7.8.9.10.in-addr.arpa,www.e2e.test",
                "--log-queries",
            ])
            .args(&big)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq-base) runs");
        let d = Dnsmasq(child);
        // Ready when it answers.
        let ok = host.run(SHORT, move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let q = [
                0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'w', b'w', 3, b'e', b'2', b'e', 4,
                b't', b'e', b's', b't', 0, 0, 1, 0, 1,
            ];
            for _ in 0..50 {
                let _ = s.send_to(&q, ("127.0.0.1", port));
                let mut b = [0u8; 512];
                if s.recv_from(&mut b).is_ok() {
                    return true;
                }
            }
            false
        });
        assert!(ok, "dnsmasq did not start");
        d
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child, by PID.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn free_udp_port(host: &Netns) -> u16 {
    host.run(SHORT, || {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
}

fn dig(tb: &Testbed, args: &[&str]) -> String {
    let mut cmd = tb.guest.cmd("dig");
    cmd.args(["@192.168.65.1", "+time=3", "+tries=1"])
        .args(args);
    let o = run_cmd(&mut cmd, SHORT);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn have_tools() -> bool {
    let ok = ["dnsmasq", "dig"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        eprintln!("skipping: dnsmasq and dig (Debian: dnsmasq-base, bind9-dnsutils) are needed");
    }
    ok
}

#[test]
fn record_types_over_udp_and_tcp_and_static_names() {
    if skip() || !have_tools() {
        return;
    }
    let host = Netns::new("undns-h");
    let port = free_udp_port(&host);
    let _dnsmasq = Dnsmasq::start(&host, port);
    let mut tb = Testbed::with_host(
        host,
        Opts {
            extra: vec!["--dns".into(), format!("127.0.0.1:{port}")],
            ..Opts::default()
        },
    );
    for transport in ["+notcp", "+tcp"] {
        let short = |q: &[&str]| {
            let mut a = vec![transport, "+short"];
            a.extend_from_slice(q);
            dig(&tb, &a).trim().to_string()
        };
        assert_eq!(short(&["www.e2e.test", "A"]), "10.9.8.7", "{transport}");
        assert_eq!(short(&["www.e2e.test", "AAAA"]), "fd00::7", "{transport}");
        assert_eq!(
            short(&["_sip._tcp.e2e.test", "SRV"]),
            "0 5 5060 sip.e2e.test.",
            "{transport}"
        );
        assert_eq!(
            short(&["txt.e2e.test", "TXT"]),
            "\"hello world\"",
            "{transport}"
        );
        assert_eq!(
            short(&["e2e.test", "MX"]),
            "10 mail.e2e.test.",
            "{transport}"
        );
        assert_eq!(short(&["-x", "10.9.8.7"]), "www.e2e.test.", "{transport}");
        // Names the gateway answers itself.
        assert_eq!(
            short(&["host.docker.internal", "A"]),
            "192.168.65.2",
            "{transport}"
        );
        assert_eq!(
            short(&["gateway.usernet.internal", "A"]),
            "192.168.65.1",
            "{transport}"
        );
        // A static name without a record of the asked type: NOERROR, no answer.
        let full = dig(&tb, &[transport, "host.docker.internal", "MX"]);
        assert!(full.contains("status: NOERROR"), "{full}");
        assert!(full.contains("ANSWER: 0"), "{full}");
    }
    // An unknown name under the upstream's authority is NXDOMAIN.
    let full = dig(&tb, &["nope.e2e.test", "A"]);
    assert!(
        full.contains("status: NXDOMAIN") || full.contains("status: REFUSED"),
        "{full}"
    );
    tb.daemon.assert_alive();
}

#[test]
fn large_answer_truncates_over_udp_and_comes_whole_over_tcp() {
    if skip() || !have_tools() {
        return;
    }
    let host = Netns::new("undns-h");
    let port = free_udp_port(&host);
    let _dnsmasq = Dnsmasq::start(&host, port);
    let mut tb = Testbed::with_host(
        host,
        Opts {
            extra: vec!["--dns".into(), format!("127.0.0.1:{port}")],
            ..Opts::default()
        },
    );
    // Without EDNS the limit is 512 bytes: TC set, the answer left out.
    let udp = dig(&tb, &["+noedns", "+ignore", "big.e2e.test", "TXT"]);
    assert!(udp.contains(" tc"), "flags show TC: {udp}");
    // dig's own fallback to TCP gets all twelve records through the gateway.
    let tcp = dig(&tb, &["+noedns", "big.e2e.test", "TXT"]);
    let answers = tcp
        .lines()
        .filter(|l| l.starts_with("big.e2e.test.") && l.contains("TXT"))
        .count();
    assert_eq!(answers, 12, "{tcp}");
    assert!(tcp.contains("(TCP)"), "{tcp}");
    tb.daemon.assert_alive();
}

#[test]
fn failover_from_a_dead_upstream_to_a_live_one() {
    if skip() || !have_tools() {
        return;
    }
    let host = Netns::new("undns-h");
    let port = free_udp_port(&host);
    let dead = host.closed_port();
    let _dnsmasq = Dnsmasq::start(&host, port);
    let mut tb = Testbed::with_host(
        host,
        Opts {
            extra: vec![
                "--dns".into(),
                format!("127.0.0.1:{dead}"),
                "--dns".into(),
                format!("127.0.0.1:{port}"),
            ],
            ..Opts::default()
        },
    );
    for (name, qtype) in [
        ("www.e2e.test", "A"),
        ("txt.e2e.test", "TXT"),
        ("e2e.test", "MX"),
    ] {
        let started = std::time::Instant::now();
        let out = dig(&tb, &["+short", name, qtype]);
        assert!(
            !out.trim().is_empty(),
            "{name}: an answer despite the dead first upstream"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{name}: within the failover bound"
        );
    }
    tb.daemon.assert_alive();
}

#[test]
fn hosts_file_is_answered_and_reread_when_it_changes() {
    if skip() || !have_tools() {
        return;
    }
    let host = Netns::new("undns-h");
    let dead = host.closed_port();
    let dir = std::env::temp_dir().join(unique("usernet-hosts"));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "10.5.5.5 svc.e2e.internal alias.e2e.internal\n").unwrap();
    let mut tb = Testbed::with_host(
        host,
        Opts {
            extra: vec![
                "--dns".into(),
                format!("127.0.0.1:{dead}"),
                "--hosts".into(),
                hosts.display().to_string(),
                "--dns-name".into(),
                "db.e2e.internal=10.7.7.7".into(),
            ],
            ..Opts::default()
        },
    );
    assert_eq!(
        dig(&tb, &["+short", "svc.e2e.internal", "A"]).trim(),
        "10.5.5.5"
    );
    assert_eq!(
        dig(&tb, &["+short", "alias.e2e.internal", "A"]).trim(),
        "10.5.5.5"
    );
    assert_eq!(
        dig(&tb, &["+short", "db.e2e.internal", "A"]).trim(),
        "10.7.7.7"
    );
    // A change is picked up (the file is looked at once a second at most).
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&hosts, "10.6.6.6 svc.e2e.internal\n").unwrap();
    let mut got = String::new();
    for _ in 0..5 {
        got = dig(&tb, &["+short", "svc.e2e.internal", "A"])
            .trim()
            .to_string();
        if got == "10.6.6.6" {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(got, "10.6.6.6");
    tb.daemon.assert_alive();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn system_mode_answers_through_the_host_resolver() {
    if skip() || !have_tools() {
        return;
    }
    let host = Netns::new("undns-h");
    let dead = host.closed_port();
    // No upstream answers: whatever the gateway says comes from getaddrinfo. Only
    // "localhost" is asked, which the host's resolver answers from its hosts file.
    let mut tb = Testbed::with_host(
        host,
        Opts {
            extra: vec![
                "--dns-mode".into(),
                "system".into(),
                "--dns".into(),
                format!("127.0.0.1:{dead}"),
            ],
            ..Opts::default()
        },
    );
    assert_eq!(dig(&tb, &["+short", "localhost", "A"]).trim(), "127.0.0.1");
    tb.daemon.assert_alive();
}
