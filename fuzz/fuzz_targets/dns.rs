//! Arbitrary guest queries, upstream answers, host-resolver results and time into the DNS
//! forwarder: it must never panic, every guest query that is answered gets its own ID back,
//! and its tables stay within their bounds.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rand_chacha::rand_core::SeedableRng;
use usernet_core::dns::{
    ClientToken, Dns, DnsConfig, DnsMode, DnsOutput, ResolveError, ResolveId, UpstreamTransport,
};
use usernet_core::{Duration, Instant, Rng};

#[derive(Arbitrary, Debug)]
enum Step {
    /// Raw bytes from the guest.
    Query {
        tcp: bool,
        client: u8,
        bytes: Vec<u8>,
    },
    /// A well-formed query header and question (name labels, type) followed by arbitrary bytes.
    Question {
        tcp: bool,
        client: u8,
        id: u16,
        flags: u16,
        labels: Vec<Vec<u8>>,
        qtype: u16,
        tail: Vec<u8>,
    },
    /// Raw bytes from an upstream.
    Upstream {
        server: u8,
        tcp: bool,
        bytes: Vec<u8>,
    },
    /// A reply to the n-th query sent upstream: its ID and question kept, the rest arbitrary.
    Reply {
        n: u8,
        flags: u16,
        counts: [u8; 3],
        body: Vec<u8>,
        wrong_source: bool,
    },
    /// The same reply, but with the query echoed as a header+question answer and records
    /// appended (gives hickory's decoder and the cache something to chew on).
    Echo {
        n: u8,
        rcode: u8,
        records: Vec<u8>,
        ancount: u8,
    },
    /// A well-formed answer to the n-th query sent upstream: `a_count` A records (owner: a
    /// pointer to the question) with `ttl`, and optionally an SOA in the authority section
    /// (negative answers); reaches the cache.
    Records {
        n: u8,
        rcode: u8,
        ttl: u16,
        a_count: u8,
        soa: Option<(u16, u16)>,
        tc: bool,
    },
    Resolved {
        n: u8,
        addrs: Vec<[u8; 4]>,
        err: Option<u8>,
    },
    /// The driver reports that sending to a server failed.
    UpstreamError {
        server: u8,
        tcp: bool,
    },
    Hosts(String),
    Cancel {
        client: u8,
    },
    Advance(u16),
}

const SERVERS: [u8; 4] = [1, 2, 3, 9];

fn server(i: u8) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, SERVERS[usize::from(i) % 4])),
        53,
    )
}

fn client(tcp: bool, c: u8) -> ClientToken {
    if tcp {
        ClientToken::Tcp(u64::from(c % 4))
    } else {
        ClientToken::Udp(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(192, 168, 65, 3)),
            1000 + u16::from(c % 4),
        ))
    }
}

fuzz_target!(|input: (bool, bool, Vec<Step>)| {
    let (system, cache_on, steps) = input;
    let mut cfg = DnsConfig::new(
        IpAddr::V4(Ipv4Addr::new(192, 168, 65, 1)),
        Some(IpAddr::V4(Ipv4Addr::new(192, 168, 65, 2))),
    );
    cfg.mode = if system {
        DnsMode::System
    } else {
        DnsMode::Forward
    };
    cfg.upstream_groups = vec![vec![server(0), server(1)], vec![server(2)]];
    cfg.zones = vec![("corp".into(), vec![server(3)])];
    cfg.max_inflight = 16;
    cfg.cache_entries = if cache_on { 8 } else { 0 };
    cfg.cache_max_bytes = 16 * 1024;
    cfg.down_after = 2;
    cfg.probe_interval = Duration::from_secs(2);
    let mut dns = Dns::new(cfg, Rng::seed_from_u64(1));
    let mut now = 0i64;
    // Upstream sends and resolve requests seen so far (bounded).
    let mut sent: Vec<(SocketAddr, UpstreamTransport, Vec<u8>)> = Vec::new();
    let mut resolves: Vec<ResolveId> = Vec::new();

    for step in steps.into_iter().take(128) {
        let t = Instant::from_millis(now);
        match step {
            Step::Query {
                tcp,
                client: c,
                bytes,
            } => dns.handle_query(t, client(tcp, c), &bytes),
            Step::Question {
                tcp,
                client: c,
                id,
                flags,
                labels,
                qtype,
                tail,
            } => {
                let mut b = Vec::new();
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&(flags & 0x7fff).to_be_bytes());
                b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
                for l in labels.iter().take(8) {
                    let l = &l[..l.len().min(63)];
                    b.push(l.len() as u8);
                    b.extend_from_slice(l);
                }
                b.push(0);
                b.extend_from_slice(&qtype.to_be_bytes());
                b.extend_from_slice(&[0, 1]);
                b.extend_from_slice(&tail);
                dns.handle_query(t, client(tcp, c), &b);
            }
            Step::Upstream {
                server: s,
                tcp,
                bytes,
            } => {
                let via = if tcp {
                    UpstreamTransport::Tcp
                } else {
                    UpstreamTransport::Udp
                };
                dns.handle_upstream(t, server(s), via, &bytes);
            }
            Step::Reply {
                n,
                flags,
                counts,
                body,
                wrong_source,
            } => {
                if let Some((srv, via, q)) = sent.get(usize::from(n) % sent.len().max(1)).cloned() {
                    let mut b = q.clone();
                    b[2..4].copy_from_slice(&(flags | 0x8000).to_be_bytes());
                    b[6] = 0;
                    b[7] = counts[0];
                    b[9] = counts[1];
                    b[11] = counts[2];
                    b.extend_from_slice(&body);
                    let from = if wrong_source {
                        server(srv.port() as u8 ^ 1)
                    } else {
                        srv
                    };
                    dns.handle_upstream(t, from, via, &b);
                }
            }
            Step::Echo {
                n,
                rcode,
                records,
                ancount,
            } => {
                if let Some((srv, via, q)) = sent.get(usize::from(n) % sent.len().max(1)).cloned() {
                    let mut b = q.clone();
                    b[2] |= 0x80;
                    b[3] = (b[3] & 0xf0) | (rcode & 0x0f);
                    b[6] = 0;
                    b[7] = ancount;
                    b[8..12].fill(0);
                    // Drop whatever followed the question in the query (its OPT).
                    if let Some(end) = question_end(&b) {
                        b.truncate(end);
                    }
                    b.extend_from_slice(&records);
                    dns.handle_upstream(t, srv, via, &b);
                }
            }
            Step::Records {
                n,
                rcode,
                ttl,
                a_count,
                soa,
                tc,
            } => {
                if let Some((srv, via, q)) = sent.get(usize::from(n) % sent.len().max(1)).cloned() {
                    let Some(end) = question_end(&q) else {
                        continue;
                    };
                    let mut b = q[..end].to_vec();
                    b[2] |= 0x80 | if tc { 0x02 } else { 0 };
                    b[3] = 0x80 | (rcode % 4);
                    let a_count = a_count % 8;
                    b[6..12].copy_from_slice(&[0, a_count, 0, u8::from(soa.is_some()), 0, 0]);
                    for i in 0..a_count {
                        b.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0]);
                        b.extend_from_slice(&ttl.to_be_bytes());
                        b.extend_from_slice(&[0, 4, 10, 0, 0, i]);
                    }
                    if let Some((sttl, min)) = soa {
                        b.extend_from_slice(&[0xc0, 12, 0, 6, 0, 1, 0, 0]);
                        b.extend_from_slice(&sttl.to_be_bytes());
                        b.extend_from_slice(&[0, 26, 1, b'n', 0, 1, b'h', 0]);
                        b.extend_from_slice(&[
                            0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0,
                        ]);
                        b.extend_from_slice(&min.to_be_bytes());
                    }
                    dns.handle_upstream(t, srv, via, &b);
                }
            }
            Step::Resolved { n, addrs, err } => {
                if let Some(req) = resolves
                    .get(usize::from(n) % resolves.len().max(1))
                    .copied()
                {
                    let result = match err {
                        Some(0) => Err(ResolveError::NoName),
                        Some(1) => Err(ResolveError::NoData),
                        Some(_) => Err(ResolveError::Failed),
                        None => Ok(addrs
                            .iter()
                            .map(|a| IpAddr::V4(Ipv4Addr::from(*a)))
                            .collect()),
                    };
                    dns.handle_resolved(t, req, result);
                }
            }
            Step::UpstreamError { server: s, tcp } => {
                let via = if tcp {
                    UpstreamTransport::Tcp
                } else {
                    UpstreamTransport::Udp
                };
                dns.handle_upstream_error(t, server(s), via);
            }
            Step::Hosts(text) => {
                dns.set_hosts_text(&text);
            }
            Step::Cancel { client: c } => {
                dns.cancel_client(client(c % 2 == 0, c));
            }
            Step::Advance(ms) => {
                now += i64::from(ms);
                dns.handle_timeout(Instant::from_millis(now));
            }
        }
        while let Some(out) = dns.poll_output() {
            match out {
                DnsOutput::ToGuest { bytes, .. } => {
                    assert!(bytes.len() >= 12, "a reply always has a header");
                    assert!(bytes[2] & 0x80 != 0, "a reply is a response");
                }
                DnsOutput::ToUpstream { server, via, bytes } => {
                    assert!(bytes.len() >= 12);
                    if sent.len() < 64 {
                        sent.push((server, via, bytes));
                    }
                }
                DnsOutput::Resolve { req, .. } => {
                    if resolves.len() < 64 {
                        resolves.push(req);
                    }
                }
            }
        }
        assert!(dns.inflight() <= 16);
        assert!(dns.cache_len() <= 8);
        assert!(dns.cache_bytes() <= 16 * 1024);
        if let Some(next) = dns.poll_timeout() {
            // Every waiting query gives up within the timeout.
            assert!(next.total_millis() <= now + 5000);
        }
    }
    // Liveness: with time, every query in flight is answered and nothing is left waiting.
    for _ in 0..256 {
        match dns.poll_timeout() {
            Some(next) => dns.handle_timeout(next),
            None => break,
        }
        while dns.poll_output().is_some() {}
    }
    assert_eq!(dns.inflight(), 0);
    assert_eq!(dns.poll_timeout(), None);
});

fn question_end(b: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        let len = usize::from(*b.get(i)?);
        if len == 0 {
            return Some(i + 5).filter(|e| *e <= b.len());
        }
        i += 1 + len;
    }
}
