//! The transparent and explicit proxy, driven through guest frames.

use super::*;
use crate::proxy::{parse_no_proxy, ProxyConfig, Upstream};
use crate::ConnectError;

const UPSTREAM: &str = "10.9.9.9:3128";
const AUTH: &str = "Basic dTpw";
const HELLO_SNI: &[u8] = include_bytes!("proxy/testdata/curl-sni-www.example.test.bin");
const HELLO_NO_SNI: &[u8] = include_bytes!("proxy/testdata/openssl-no-sni.bin");

fn web() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 80)
}

fn tls() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 443)
}

fn upstream() -> Option<Upstream> {
    Some(Upstream {
        addr: UPSTREAM.parse().unwrap(),
        authorization: Some(AUTH.into()),
    })
}

fn proxied_stack(exclude: &str) -> Stack {
    let mut s = stack();
    s.set_proxy(Some(ProxyConfig {
        http: upstream(),
        https: upstream(),
        exclude: parse_no_proxy(exclude).unwrap(),
        ..ProxyConfig::default()
    }));
    s
}

/// Open an intercepted connection: the handshake completes without any host command.
fn open(s: &mut Stack, now: i64, dst: SocketAddrV4) -> (FlowId, Conn) {
    // Earlier flows' leftovers are not this one's business.
    drain_cmds(s);
    drain_frames(s);
    let port = 40000 + s.stats().tcp_flows_opened as u16;
    let mut c = Conn {
        guest: SocketAddrV4::new(guest_ip(), port),
        ..Conn::new(dst)
    };
    s.handle_frame(t(now), &c.syn());
    s.poll(t(now));
    let early = drain_cmds(s);
    assert!(
        !early.iter().any(|c| matches!(c, Cmd::Connect(..))),
        "no host connect before the guest spoke: {early:?}"
    );
    let segs: Vec<Seg> = tcp_segments(&drain_frames(s))
        .into_iter()
        .filter(|g| g.dst == c.guest)
        .collect();
    assert!(segs[0].p.syn && segs[0].p.ack_flag, "SYN-ACK at once");
    c.seq += 1;
    c.ack = segs[0].p.seq.wrapping_add(1);
    s.handle_frame(t(now), &c.send(ACK, &[]));
    s.poll(t(now));
    let flow = s.tcp_flows().last().unwrap().flow;
    (flow, c)
}

/// Guest sends `data`; returns the host commands.
fn guest_sends(s: &mut Stack, now: i64, c: &mut Conn, data: &[u8]) -> Vec<Cmd> {
    s.handle_frame(t(now), &c.send(ACK | PSH, data));
    s.poll(t(now));
    drain_cmds(s)
}

/// Everything the host side would read now.
fn host_reads(s: &mut Stack, flow: FlowId) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..100 {
        let d = s.tcp_to_host(flow).to_vec();
        if d.is_empty() {
            break;
        }
        s.tcp_consume_to_host(flow, d.len());
        out.extend_from_slice(&d);
    }
    out
}

fn host_writes(s: &mut Stack, flow: FlowId, data: &[u8]) {
    let n = s.tcp_from_host(flow, |buf| {
        buf[..data.len()].copy_from_slice(data);
        (data.len(), data.len())
    });
    assert_eq!(n, Some(data.len()));
}

/// What the guest received (and its FIN), acknowledged in `c` for later segments.
fn guest_reads(s: &mut Stack, now: i64, c: &mut Conn) -> (Vec<u8>, bool) {
    s.poll(t(now));
    let segs = tcp_segments(&drain_frames(s));
    let mut data = Vec::new();
    let mut fin = false;
    for g in segs
        .into_iter()
        .filter(|g| g.dst == c.guest && g.src == c.dst)
    {
        data.extend_from_slice(&g.payload);
        fin |= g.p.fin;
        c.ack = c
            .ack
            .wrapping_add(g.payload.len() as u32 + u32::from(g.p.fin));
    }
    (data, fin)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn no_proxy_configured_means_no_interception() {
    let mut s = stack();
    let c = Conn::new(web());
    s.handle_frame(t(0), &c.syn());
    s.poll(t(0));
    assert!(
        matches!(drain_cmds(&mut s)[..], [Cmd::Connect(_, dst)] if dst == SocketAddr::V4(web()))
    );
    // An upstream for HTTPS only leaves port 80 alone.
    let mut s = stack();
    s.set_proxy(Some(ProxyConfig {
        https: upstream(),
        ..ProxyConfig::default()
    }));
    s.handle_frame(t(0), &c.syn());
    s.poll(t(0));
    assert!(
        matches!(drain_cmds(&mut s)[..], [Cmd::Connect(_, dst)] if dst == SocketAddr::V4(web()))
    );
    assert_eq!(s.stats().proxy.flows, 0);
}

#[test]
fn http_requests_rewritten_for_the_upstream_with_keep_alive_and_bodies() {
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, web());
    // A head split across segments: nothing happens until it is whole.
    assert_eq!(
        guest_sends(&mut s, 1, &mut c, b"GET /x HTTP/1.1\r\nHo"),
        vec![]
    );
    let cmds = guest_sends(&mut s, 2, &mut c, b"st: example.test\r\n\r\n");
    assert_eq!(cmds, vec![Cmd::Connect(flow, UPSTREAM.parse().unwrap())]);
    s.tcp_connected(t(3), flow);
    s.poll(t(3));
    assert_eq!(
        text(&host_reads(&mut s, flow)),
        format!("GET http://example.test/x HTTP/1.1\r\nHost: example.test\r\nProxy-Authorization: {AUTH}\r\n\r\n")
    );
    host_writes(
        &mut s,
        flow,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    );
    let (got, _) = guest_reads(&mut s, 4, &mut c);
    assert_eq!(got, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    // Keep-alive: a POST with a body, a chunked POST and a GET without Host in one
    // segment. Bodies pass unchanged and end where their framing says.
    let batch = b"POST /p HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\r\nhello\
POST /c HTTP/1.1\r\nHost: b.test:8080\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
GET /n HTTP/1.0\r\n\r\n";
    guest_sends(&mut s, 5, &mut c, batch);
    let sent = text(&host_reads(&mut s, flow));
    assert_eq!(
        sent,
        format!(
            "POST http://example.test/p HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\nProxy-Authorization: {AUTH}\r\n\r\nhello\
POST http://b.test:8080/c HTTP/1.1\r\nHost: b.test:8080\r\nTransfer-Encoding: chunked\r\nProxy-Authorization: {AUTH}\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
GET http://203.0.113.5:80/n HTTP/1.0\r\nProxy-Authorization: {AUTH}\r\n\r\n"
        )
    );
    assert_eq!(s.stats().proxy.requests, 4);
    // The guest closes: the host's write side is shut once everything went.
    s.handle_frame(t(6), &c.send(ACK | FIN, &[]));
    s.poll(t(6));
    assert!(drain_cmds(&mut s).contains(&Cmd::Shutdown(flow)));
}

#[test]
fn a_body_split_across_segments_is_streamed_not_buffered() {
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, web());
    guest_sends(
        &mut s,
        1,
        &mut c,
        b"PUT /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    );
    s.tcp_connected(t(2), flow);
    s.poll(t(2));
    let first = text(&host_reads(&mut s, flow));
    assert!(first.ends_with("\r\n\r\n5\r\nhel"), "{first:?}");
    guest_sends(
        &mut s,
        3,
        &mut c,
        b"lo\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
    );
    assert_eq!(
        text(&host_reads(&mut s, flow)),
        format!("lo\r\n0\r\n\r\nGET http://h/ HTTP/1.1\r\nHost: h\r\nProxy-Authorization: {AUTH}\r\n\r\n")
    );
    // A chunked body that is not: both sides are reset.
    guest_sends(
        &mut s,
        4,
        &mut c,
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    );
    host_reads(&mut s, flow);
    s.poll(t(4));
    assert!(drain_cmds(&mut s).contains(&Cmd::Abort(flow)));
    assert_eq!(s.stats().proxy.bad_bodies, 1);
    assert_eq!(s.tcp_flow_count(), 0);
}

#[test]
fn upgrade_is_tunnelled_after_its_head() {
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, web());
    guest_sends(
        &mut s,
        1,
        &mut c,
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    s.tcp_connected(t(2), flow);
    s.poll(t(2));
    host_reads(&mut s, flow);
    // The status line arrives in two pieces; the tunnel opens once it says 101.
    host_writes(&mut s, flow, b"HTTP/1.1 1");
    host_writes(&mut s, flow, b"01 Switching Protocols\r\n\r\n\x81\x02hi");
    let (got, _) = guest_reads(&mut s, 3, &mut c);
    assert_eq!(got, b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi");
    // Frames after the upgrade are not HTTP and pass as they are.
    guest_sends(&mut s, 4, &mut c, b"\x81\x05hello GET / HTTP/1.1\r\n\r\n");
    assert_eq!(
        host_reads(&mut s, flow),
        b"\x81\x05hello GET / HTTP/1.1\r\n\r\n"
    );
}

#[test]
fn an_upgrade_answered_without_101_keeps_http_going() {
    // curl --http2 on http:// offers h2c; servers that ignore it answer 200 and keep
    // the connection: the next request must be rewritten for the proxy again.
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, web());
    guest_sends(
        &mut s,
        1,
        &mut c,
        b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    );
    s.tcp_connected(t(2), flow);
    s.poll(t(2));
    assert!(text(&host_reads(&mut s, flow)).starts_with("GET http://h/a HTTP/1.1\r\n"));
    // The guest's next request waits until the response shows there was no switch.
    guest_sends(&mut s, 3, &mut c, b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(host_reads(&mut s, flow), b"");
    host_writes(
        &mut s,
        flow,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    );
    s.poll(t(4));
    assert_eq!(
        text(&host_reads(&mut s, flow)),
        format!("GET http://h/b HTTP/1.1\r\nHost: h\r\nProxy-Authorization: {AUTH}\r\n\r\n")
    );
    let (got, _) = guest_reads(&mut s, 4, &mut c);
    assert!(got.ends_with(b"ok"));
    assert_eq!(s.stats().proxy.requests, 2);
}

#[test]
fn excluded_destination_goes_direct_unchanged() {
    let mut s = proxied_stack("example.test,10.0.0.0/8");
    let (flow, mut c) = open(&mut s, 0, web());
    let head = b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n";
    let cmds = guest_sends(&mut s, 1, &mut c, head);
    assert_eq!(cmds, vec![Cmd::Connect(flow, SocketAddr::V4(web()))]);
    s.tcp_connected(t(2), flow);
    s.poll(t(2));
    assert_eq!(host_reads(&mut s, flow), head);
    assert_eq!(s.stats().proxy.excluded, 1);
    assert_eq!(s.stats().proxy.requests, 0);
    // TLS by SNI name too.
    let mut s = proxied_stack("*.example.test");
    let (flow, mut c) = open(&mut s, 0, tls());
    let cmds = guest_sends(&mut s, 1, &mut c, HELLO_SNI);
    assert_eq!(cmds, vec![Cmd::Connect(flow, SocketAddr::V4(tls()))]);
    s.tcp_connected(t(2), flow);
    s.poll(t(2));
    assert_eq!(host_reads(&mut s, flow), HELLO_SNI);
}

#[test]
fn tls_goes_through_connect_by_sni_name() {
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, tls());
    // The hello split across two segments.
    let (a, b) = HELLO_SNI.split_at(100);
    assert_eq!(guest_sends(&mut s, 1, &mut c, a), vec![]);
    let cmds = guest_sends(&mut s, 2, &mut c, b);
    assert_eq!(cmds, vec![Cmd::Connect(flow, UPSTREAM.parse().unwrap())]);
    s.tcp_connected(t(3), flow);
    s.poll(t(3));
    assert_eq!(
        text(&host_reads(&mut s, flow)),
        format!("CONNECT www.example.test:443 HTTP/1.1\r\nHost: www.example.test:443\r\nProxy-Authorization: {AUTH}\r\n\r\n")
    );
    // The reply arrives in pieces; the hello waits until the tunnel is open.
    host_writes(&mut s, flow, b"HTTP/1.1 200 Connection established\r\n");
    assert_eq!(host_reads(&mut s, flow), b"");
    host_writes(&mut s, flow, b"\r\n\x16\x03\x03");
    s.poll(t(4));
    assert_eq!(host_reads(&mut s, flow), HELLO_SNI);
    let (got, _) = guest_reads(&mut s, 4, &mut c);
    assert_eq!(
        got, b"\x16\x03\x03",
        "bytes after the reply head are the server's"
    );
    let st = &s.stats().proxy;
    assert_eq!((st.connects, st.sni_names, st.sni_fallbacks), (1, 1, 0));
}

#[test]
fn tls_without_sni_connects_by_address_and_a_refusal_closes() {
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, tls());
    guest_sends(&mut s, 1, &mut c, HELLO_NO_SNI);
    s.tcp_connected(t(2), flow);
    s.poll(t(2));
    assert!(text(&host_reads(&mut s, flow)).starts_with("CONNECT 203.0.113.5:443 HTTP/1.1\r\n"));
    host_writes(
        &mut s,
        flow,
        b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n",
    );
    s.poll(t(3));
    assert!(drain_cmds(&mut s).contains(&Cmd::Abort(flow)));
    let (got, fin) = guest_reads(&mut s, 3, &mut c);
    assert_eq!(
        (got.len(), fin),
        (0, true),
        "a closed connection, nothing else"
    );
    assert_eq!(s.stats().proxy.connect_refused, 1);
    assert_eq!(s.stats().proxy.sni_fallbacks, 1);
}

fn status_line(b: &[u8]) -> String {
    text(b).lines().next().unwrap_or("").to_string()
}

#[test]
fn failures_become_http_errors_on_80_and_closes_on_443() {
    // Upstream refuses: 502.
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, web());
    guest_sends(&mut s, 1, &mut c, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    s.tcp_connect_failed(t(2), flow, ConnectError::Refused);
    let (got, fin) = guest_reads(&mut s, 2, &mut c);
    assert_eq!(status_line(&got), "HTTP/1.1 502 Bad Gateway");
    assert!(text(&got).contains("Connection: close\r\n"));
    assert!(fin);
    drain_cmds(&mut s);
    // Connect timeout (the core's own deadline): 504 and the connect is cancelled.
    let (flow, mut c) = open(
        &mut s,
        10,
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 6), 80),
    );
    guest_sends(&mut s, 11, &mut c, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    let deadline = s.poll_timeout().unwrap();
    assert!(deadline <= t(11 + 30_000));
    s.poll(t(11 + 30_000));
    assert_eq!(drain_cmds(&mut s), vec![Cmd::Abort(flow)]);
    let (got, _) = guest_reads(&mut s, 11 + 30_000, &mut c);
    assert_eq!(status_line(&got), "HTTP/1.1 504 Gateway Timeout");
    assert_eq!(s.stats().proxy.upstream_timeouts, 1);
    // Reset before any response byte: 502; after one: the guest sees the reset.
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, web());
    guest_sends(&mut s, 1, &mut c, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    s.tcp_connected(t(2), flow);
    host_reads(&mut s, flow);
    s.tcp_host_reset(flow);
    let (got, _) = guest_reads(&mut s, 2, &mut c);
    assert_eq!(status_line(&got), "HTTP/1.1 502 Bad Gateway");
    let (flow, mut c) = open(
        &mut s,
        3,
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 80),
    );
    guest_sends(&mut s, 4, &mut c, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    s.tcp_connected(t(4), flow);
    host_reads(&mut s, flow);
    host_writes(&mut s, flow, b"HTTP/1.1 200");
    guest_reads(&mut s, 4, &mut c);
    s.tcp_host_reset(flow);
    s.poll(t(5));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(
        segs.iter().any(|g| g.p.rst),
        "mid-response: the reset passes"
    );
    assert_eq!(s.stats().proxy.upstream_failed, 1);
    // On 443 a refused upstream closes the guest's connection without a word.
    let (flow, mut c) = open(&mut s, 6, tls());
    guest_sends(&mut s, 6, &mut c, HELLO_SNI);
    s.tcp_connect_failed(t(7), flow, ConnectError::Refused);
    let (got, fin) = guest_reads(&mut s, 7, &mut c);
    assert_eq!((got.len(), fin), (0, true));
}

#[test]
fn bad_and_oversized_heads_are_answered_without_a_connect() {
    let mut s = proxied_stack("");
    let (_, mut c) = open(&mut s, 0, web());
    assert_eq!(
        guest_sends(&mut s, 1, &mut c, b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
        vec![]
    );
    let (got, fin) = guest_reads(&mut s, 1, &mut c);
    assert_eq!(status_line(&got), "HTTP/1.1 400 Bad Request");
    assert!(fin);
    let mut s = stack();
    s.set_proxy(Some(ProxyConfig {
        http: upstream(),
        head_limit: 1024,
        ..ProxyConfig::default()
    }));
    let (_, mut c) = open(&mut s, 0, web());
    let long = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX-Long: {}\r\n",
        "a".repeat(1100)
    );
    assert_eq!(guest_sends(&mut s, 1, &mut c, long.as_bytes()), vec![]);
    let (got, _) = guest_reads(&mut s, 1, &mut c);
    assert_eq!(
        status_line(&got),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert_eq!(s.stats().proxy.heads_too_large, 1);
    // A guest that closes before a complete head gets a 400 too; one that says
    // nothing just gets its connection closed.
    let (_, mut c) = open(
        &mut s,
        2,
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 8), 80),
    );
    guest_sends(&mut s, 3, &mut c, b"GET / HT");
    s.handle_frame(t(3), &c.send(ACK | FIN, &[]));
    let (got, _) = guest_reads(&mut s, 3, &mut c);
    assert_eq!(status_line(&got), "HTTP/1.1 400 Bad Request");
    let (_, mut c) = open(
        &mut s,
        4,
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 80),
    );
    s.handle_frame(t(4), &c.send(ACK | FIN, &[]));
    let (got, fin) = guest_reads(&mut s, 4, &mut c);
    assert_eq!((got.len(), fin), (0, true));
    assert_eq!(drain_cmds(&mut s), vec![]);
}

fn explicit() -> SocketAddrV4 {
    SocketAddrV4::new(Config::default().gateway, 3128)
}

#[test]
fn explicit_proxy_without_upstream_resolves_and_connects_directly() {
    let mut s = stack();
    s.set_proxy(Some(ProxyConfig::default()));
    let (flow, mut c) = open(&mut s, 0, explicit());
    assert_eq!(
        guest_sends(
            &mut s,
            1,
            &mut c,
            b"CONNECT a.test:8443 HTTP/1.1\r\nHost: a.test:8443\r\n\r\n"
        ),
        vec![]
    );
    let r = s.poll_resolve().expect("a lookup");
    assert_eq!((r.name.as_str(), r.want_v4), ("a.test", true));
    s.dns_resolved(t(2), r.req, Ok(vec!["198.51.100.1".parse().unwrap()]));
    s.poll(t(2));
    assert_eq!(
        drain_cmds(&mut s),
        vec![Cmd::Connect(flow, "198.51.100.1:8443".parse().unwrap())]
    );
    s.tcp_connected(t(3), flow);
    let (got, _) = guest_reads(&mut s, 3, &mut c);
    assert_eq!(got, b"HTTP/1.1 200 Connection established\r\n\r\n");
    guest_sends(&mut s, 4, &mut c, b"\x16\x03\x01tunnel");
    assert_eq!(host_reads(&mut s, flow), b"\x16\x03\x01tunnel");
    // A GET for an address goes out in origin form, once.
    let (flow, mut c) = open(&mut s, 5, explicit());
    let cmds = guest_sends(&mut s, 5, &mut c, b"GET http://198.51.100.2:8080/a HTTP/1.1\r\nHost: 198.51.100.2:8080\r\nProxy-Connection: keep-alive\r\n\r\n");
    assert_eq!(
        cmds,
        vec![Cmd::Connect(flow, "198.51.100.2:8080".parse().unwrap())]
    );
    s.tcp_connected(t(6), flow);
    s.poll(t(6));
    assert_eq!(
        text(&host_reads(&mut s, flow)),
        "GET /a HTTP/1.1\r\nHost: 198.51.100.2:8080\r\nConnection: close\r\n\r\n"
    );
    // A name that does not resolve: 502.
    let (_, mut c) = open(&mut s, 7, explicit());
    guest_sends(
        &mut s,
        7,
        &mut c,
        b"GET http://nx.test/ HTTP/1.1\r\nHost: nx.test\r\n\r\n",
    );
    let r = s.poll_resolve().unwrap();
    s.dns_resolved(t(8), r.req, Err(crate::dns::ResolveError::NoName));
    let (got, _) = guest_reads(&mut s, 8, &mut c);
    assert_eq!(status_line(&got), "HTTP/1.1 502 Bad Gateway");
    // A request in origin form is no proxy request.
    let (_, mut c) = open(&mut s, 9, explicit());
    guest_sends(&mut s, 9, &mut c, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let (got, _) = guest_reads(&mut s, 9, &mut c);
    assert_eq!(status_line(&got), "HTTP/1.1 400 Bad Request");
    assert_eq!(s.stats().proxy.explicit, 4);
    // Without the host alias, the host's loopback stays out of reach, by name or literal.
    let mut s = Stack::new(
        Config {
            host_alias: None,
            ..Config::default()
        },
        Rng::seed_from_u64(7),
        t(0),
    )
    .unwrap();
    s.set_proxy(Some(ProxyConfig::default()));
    let (_, mut c) = open(&mut s, 0, explicit());
    guest_sends(&mut s, 1, &mut c, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n");
    let (got, _) = guest_reads(&mut s, 1, &mut c);
    assert_eq!(status_line(&got), "HTTP/1.1 403 Forbidden");
    let (_, mut c) = open(&mut s, 2, explicit());
    guest_sends(
        &mut s,
        2,
        &mut c,
        b"GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    let r = s.poll_resolve().unwrap();
    s.dns_resolved(t(3), r.req, Ok(vec!["::1".parse().unwrap()]));
    let (got, _) = guest_reads(&mut s, 3, &mut c);
    assert_eq!(status_line(&got), "HTTP/1.1 403 Forbidden");
    assert_eq!(drain_cmds(&mut s), vec![]);
    assert_eq!(s.stats().proxy.forbidden, 2);
}

#[test]
fn explicit_proxy_forwards_to_the_upstream_with_credentials() {
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, explicit());
    let cmds = guest_sends(
        &mut s,
        1,
        &mut c,
        b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
    );
    assert_eq!(cmds, vec![Cmd::Connect(flow, UPSTREAM.parse().unwrap())]);
    s.tcp_connected(t(2), flow);
    s.poll(t(2));
    assert_eq!(
        text(&host_reads(&mut s, flow)),
        format!(
            "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nProxy-Authorization: {AUTH}\r\n\r\n"
        )
    );
    // The port is refused when the explicit proxy is off.
    let mut s = stack();
    s.set_proxy(Some(ProxyConfig {
        explicit_port: None,
        ..ProxyConfig::default()
    }));
    s.handle_frame(t(0), &Conn::new(explicit()).syn());
    s.poll(t(0));
    let segs = tcp_segments(&drain_frames(&mut s));
    assert!(segs[0].p.rst);
    // Turning the proxy off: a flow not routed yet goes direct, new ones are not
    // intercepted.
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, web());
    s.set_proxy(None);
    let cmds = guest_sends(&mut s, 1, &mut c, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(cmds, vec![Cmd::Connect(flow, SocketAddr::V4(web()))]);
    let c2 = Conn {
        guest: SocketAddrV4::new(guest_ip(), 40100),
        ..Conn::new(web())
    };
    s.handle_frame(t(2), &c2.syn());
    s.poll(t(2));
    assert!(
        matches!(drain_cmds(&mut s)[..], [Cmd::Connect(_, dst)] if dst == SocketAddr::V4(web()))
    );
}

#[test]
fn expect_continue_and_explicit_connect_through_the_upstream() {
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, web());
    // The head goes first; the body follows the upstream's 100 Continue, framed by its
    // Content-Length; the next request is parsed after it.
    guest_sends(
        &mut s,
        1,
        &mut c,
        b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    );
    s.tcp_connected(t(2), flow);
    s.poll(t(2));
    assert!(text(&host_reads(&mut s, flow)).starts_with("POST http://h/u HTTP/1.1\r\n"));
    host_writes(&mut s, flow, b"HTTP/1.1 100 Continue\r\n\r\n");
    let (got, _) = guest_reads(&mut s, 3, &mut c);
    assert_eq!(got, b"HTTP/1.1 100 Continue\r\n\r\n");
    guest_sends(
        &mut s,
        4,
        &mut c,
        b"dataHEAD /h HTTP/1.1\r\nHost: h\r\n\r\n",
    );
    assert_eq!(
        text(&host_reads(&mut s, flow)),
        format!("dataHEAD http://h/h HTTP/1.1\r\nHost: h\r\nProxy-Authorization: {AUTH}\r\n\r\n")
    );
    // The explicit proxy forwards a CONNECT with our credentials and passes the
    // upstream's answer on as it is.
    let (flow, mut c) = open(&mut s, 5, explicit());
    let cmds = guest_sends(
        &mut s,
        5,
        &mut c,
        b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nProxy-Authorization: guest\r\n\r\n",
    );
    assert_eq!(cmds, vec![Cmd::Connect(flow, UPSTREAM.parse().unwrap())]);
    s.tcp_connected(t(6), flow);
    s.poll(t(6));
    assert_eq!(
        text(&host_reads(&mut s, flow)),
        format!("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nProxy-Authorization: {AUTH}\r\n\r\n")
    );
    host_writes(
        &mut s,
        flow,
        b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
    );
    let (got, _) = guest_reads(&mut s, 7, &mut c);
    assert_eq!(got, b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n");
}

#[test]
fn every_split_of_a_pipelined_stream_gives_the_same_upstream_bytes() {
    let stream: &[u8] = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n\
POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nabcd\r\n0\r\nT: 1\r\n\r\n\
PUT /c HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyz\
GET /d HTTP/1.0\r\nHost: h\r\n\r\n";
    let auth = format!("Proxy-Authorization: {AUTH}\r\n");
    let expected = format!(
        "GET http://h/a HTTP/1.1\r\nHost: h\r\n{auth}\r\n\
POST http://h/b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n{auth}\r\n4;x=y\r\nabcd\r\n0\r\nT: 1\r\n\r\n\
PUT http://h/c HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n{auth}\r\nxyz\
GET http://h/d HTTP/1.0\r\nHost: h\r\n{auth}\r\n"
    );
    for split in 1..stream.len() {
        let mut s = proxied_stack("");
        let (flow, mut c) = open(&mut s, 0, web());
        // The connect starts once the first head is whole.
        let mut connected = false;
        let mut connect = |s: &mut Stack, cmds: Vec<Cmd>| {
            if cmds.contains(&Cmd::Connect(flow, UPSTREAM.parse().unwrap())) {
                assert!(!connected);
                connected = true;
                s.tcp_connected(t(1), flow);
                s.poll(t(1));
            }
        };
        let cmds = guest_sends(&mut s, 1, &mut c, &stream[..split]);
        connect(&mut s, cmds);
        // The host takes bytes a few at a time.
        let mut got = Vec::new();
        let mut take = |s: &mut Stack| {
            for _ in 0..1000 {
                let d = s.tcp_to_host(flow);
                if d.is_empty() {
                    break;
                }
                let n = d.len().min(7);
                got.extend_from_slice(&d[..n]);
                s.tcp_consume_to_host(flow, n);
            }
        };
        take(&mut s);
        let cmds = guest_sends(&mut s, 2, &mut c, &stream[split..]);
        connect(&mut s, cmds);
        take(&mut s);
        assert_eq!(text(&got), expected, "split at {split}");
    }
}

#[test]
fn a_silent_tls_client_is_tunnelled_by_address_after_the_sniff_timeout() {
    // SSH on 443: the server speaks first, the client waits.
    let mut s = proxied_stack("");
    let (flow, mut c) = open(&mut s, 0, tls());
    assert_eq!(s.poll_timeout(), Some(t(5000)));
    s.poll(t(4999));
    assert_eq!(drain_cmds(&mut s), vec![]);
    s.poll(t(5000));
    assert_eq!(
        drain_cmds(&mut s),
        vec![Cmd::Connect(flow, UPSTREAM.parse().unwrap())]
    );
    s.tcp_connected(t(5001), flow);
    s.poll(t(5001));
    assert!(text(&host_reads(&mut s, flow)).starts_with("CONNECT 203.0.113.5:443 HTTP/1.1\r\n"));
    host_writes(&mut s, flow, b"HTTP/1.1 200 OK\r\n\r\nSSH-2.0-server\r\n");
    let (got, _) = guest_reads(&mut s, 5002, &mut c);
    assert_eq!(got, b"SSH-2.0-server\r\n");
    guest_sends(&mut s, 5003, &mut c, b"SSH-2.0-client\r\n");
    assert_eq!(host_reads(&mut s, flow), b"SSH-2.0-client\r\n");
    assert_eq!(s.stats().proxy.sniff_timeouts, 1);
}

#[test]
fn proxied_connects_count_against_the_pending_limit() {
    let mut s = Stack::new(
        Config {
            tcp: crate::config::TcpConfig {
                max_pending_connects: 1,
                ..Default::default()
            },
            ..Config::default()
        },
        Rng::seed_from_u64(7),
        t(0),
    )
    .unwrap();
    s.set_proxy(proxied_stack("").proxy().cloned());
    let head = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n";
    let (first, mut c1) = open(&mut s, 0, web());
    assert_eq!(guest_sends(&mut s, 1, &mut c1, head).len(), 1);
    // A second while the first connects: 503, no connect.
    let (_, mut c2) = open(&mut s, 2, web());
    assert_eq!(guest_sends(&mut s, 3, &mut c2, head), vec![]);
    let (got, _) = guest_reads(&mut s, 3, &mut c2);
    assert_eq!(status_line(&got), "HTTP/1.1 503 Service Unavailable");
    // And a direct flow is refused too (RST), as ever.
    let c3 = Conn {
        guest: SocketAddrV4::new(guest_ip(), 41000),
        ..Conn::new(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 22))
    };
    s.handle_frame(t(4), &c3.syn());
    s.poll(t(4));
    assert_eq!(drain_cmds(&mut s), vec![]);
    assert_eq!(s.stats().dropped(DropReason::TcpPendingLimit), 2);
    // Once the first connected, there is room again.
    s.tcp_connected(t(5), first);
    s.poll(t(5));
    drain_cmds(&mut s);
    let (third, mut c4) = open(&mut s, 6, web());
    assert_eq!(
        guest_sends(&mut s, 7, &mut c4, head),
        vec![Cmd::Connect(third, UPSTREAM.parse().unwrap())]
    );
    s.tcp_connect_failed(t(8), third, ConnectError::Refused);
    s.poll(t(8));
    drain_cmds(&mut s);
    let (fourth, mut c5) = open(&mut s, 9, web());
    assert_eq!(
        guest_sends(&mut s, 10, &mut c5, head),
        vec![Cmd::Connect(fourth, UPSTREAM.parse().unwrap())]
    );
}

#[test]
fn explicit_proxy_lookups_hold_a_pending_slot_and_time_out() {
    let mut s = Stack::new(
        Config {
            tcp: crate::config::TcpConfig {
                max_pending_connects: 1,
                ..Default::default()
            },
            ..Config::default()
        },
        Rng::seed_from_u64(7),
        t(0),
    )
    .unwrap();
    s.set_proxy(Some(ProxyConfig::default()));
    let timeout = Config::default().tcp.connect_timeout.total_millis() as i64;
    let get = |name: &str| format!("GET http://{name}/ HTTP/1.1\r\nHost: {name}\r\n\r\n");
    // A lookup the host's resolver never answers.
    let (first, mut c1) = open(&mut s, 0, explicit());
    assert_eq!(
        guest_sends(&mut s, 1, &mut c1, get("slow.test").as_bytes()),
        vec![]
    );
    let r1 = s.poll_resolve().expect("a lookup");
    assert_eq!(r1.name, "slow.test");
    // It holds the only pending slot: a second lookup is refused without a resolver call.
    let (_, mut c2) = open(&mut s, 2, explicit());
    guest_sends(&mut s, 2, &mut c2, get("other.test").as_bytes());
    assert!(s.poll_resolve().is_none());
    let (got, _) = guest_reads(&mut s, 2, &mut c2);
    assert_eq!(status_line(&got), "HTTP/1.1 503 Service Unavailable");
    assert_eq!(s.stats().dropped(DropReason::TcpPendingLimit), 1);
    // The lookup's deadline is a timer; at it the guest gets 504 and the slot is free.
    assert!(s.poll_timeout().is_some_and(|d| d <= t(1 + timeout)));
    s.poll(t(timeout));
    let (got, _) = guest_reads(&mut s, timeout, &mut c1);
    assert_eq!(got, b"");
    s.poll(t(1 + timeout));
    let (got, fin) = guest_reads(&mut s, 1 + timeout, &mut c1);
    assert_eq!(status_line(&got), "HTTP/1.1 504 Gateway Timeout");
    assert!(fin, "the connection closes after the error");
    assert_eq!(s.stats().proxy.resolve_failed, 1);
    // The late answer changes nothing: no connect for a flow that gave up.
    s.dns_resolved(
        t(2 + timeout),
        r1.req,
        Ok(vec!["198.51.100.1".parse().unwrap()]),
    );
    s.poll(t(2 + timeout));
    assert!(
        !drain_cmds(&mut s)
            .iter()
            .any(|c| matches!(c, Cmd::Connect(f, _) if *f == first)),
        "a connect after the timeout"
    );
    // The slot is free again: a new lookup, its answer connects (the slot carries over
    // to the connect, not counted twice).
    let now = 3 + timeout;
    let (third, mut c3) = open(&mut s, now, explicit());
    guest_sends(&mut s, now, &mut c3, get("fast.test").as_bytes());
    let r3 = s.poll_resolve().expect("a lookup");
    s.dns_resolved(t(now), r3.req, Ok(vec!["198.51.100.3".parse().unwrap()]));
    s.poll(t(now));
    assert_eq!(
        drain_cmds(&mut s),
        vec![Cmd::Connect(third, "198.51.100.3:80".parse().unwrap())]
    );
    s.tcp_connected(t(now + 1), third);
    s.poll(t(now + 1));
    drain_cmds(&mut s);
    let (fourth, mut c4) = open(&mut s, now + 2, explicit());
    assert_eq!(
        guest_sends(
            &mut s,
            now + 2,
            &mut c4,
            b"GET http://198.51.100.4/ HTTP/1.1\r\nHost: 198.51.100.4\r\n\r\n"
        ),
        vec![Cmd::Connect(fourth, "198.51.100.4:80".parse().unwrap())]
    );
}

#[test]
fn the_connect_reply_is_bounded_and_has_a_deadline() {
    let mut s = proxied_stack("");
    let limit = s.proxy().unwrap().head_limit;
    // An upstream whose reply head never ends: the core takes at most the head limit,
    // then closes the guest and aborts the upstream.
    let (flow, mut c) = open(&mut s, 0, tls());
    guest_sends(&mut s, 1, &mut c, HELLO_SNI);
    s.tcp_connected(t(2), flow);
    s.poll(t(2));
    assert!(text(&host_reads(&mut s, flow)).starts_with("CONNECT "));
    let mut taken = 0;
    host_writes(&mut s, flow, b"HTTP/1.1 200 OK\r\n");
    taken += 17;
    for _ in 0..10_000 {
        let room = s.tcp_room(flow);
        if room == 0 {
            break;
        }
        let line = b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        let Some(n) = s.tcp_from_host(flow, |buf| {
            let n = buf.len().min(line.len());
            buf[..n].copy_from_slice(&line[..n]);
            (n, n)
        }) else {
            break;
        };
        taken += n;
    }
    assert!(
        taken <= limit,
        "took {taken} bytes of reply head, limit {limit}"
    );
    assert_eq!(s.tcp_room(flow), 0, "nothing more is taken");
    s.poll(t(3));
    assert!(drain_cmds(&mut s).contains(&Cmd::Abort(flow)));
    let (got, fin) = guest_reads(&mut s, 3, &mut c);
    assert_eq!((got.len(), fin), (0, true));
    assert_eq!(s.stats().proxy.upstream_failed, 1);
    // An upstream that accepts and never answers the CONNECT: closed at the deadline.
    let timeout = Config::default().tcp.connect_timeout.total_millis() as i64;
    let (flow, mut c) = open(&mut s, 10, tls());
    guest_sends(&mut s, 10, &mut c, HELLO_SNI);
    s.tcp_connected(t(11), flow);
    s.poll(t(11));
    host_reads(&mut s, flow);
    assert!(s.poll_timeout().is_some_and(|d| d <= t(11 + timeout)));
    s.poll(t(10 + timeout));
    assert!(!drain_cmds(&mut s).contains(&Cmd::Abort(flow)));
    s.poll(t(11 + timeout));
    assert!(drain_cmds(&mut s).contains(&Cmd::Abort(flow)));
    let (got, fin) = guest_reads(&mut s, 11 + timeout, &mut c);
    assert_eq!((got.len(), fin), (0, true));
    assert_eq!(s.stats().proxy.upstream_timeouts, 1);
}

#[test]
fn a_trickled_first_head_gets_408_at_the_head_timeout() {
    let mut s = proxied_stack("");
    let (_, mut c) = open(&mut s, 0, web());
    assert_eq!(
        guest_sends(&mut s, 1, &mut c, b"GET / HTTP/1.1\r\nHo"),
        vec![]
    );
    assert_eq!(guest_sends(&mut s, 30_000, &mut c, b"st: h\r\n"), vec![]);
    assert!(s.poll_timeout().is_some_and(|d| d <= t(60_000)));
    s.poll(t(59_999));
    let (got, _) = guest_reads(&mut s, 59_999, &mut c);
    assert_eq!(got, b"");
    s.poll(t(60_000));
    let (got, fin) = guest_reads(&mut s, 60_000, &mut c);
    assert_eq!(status_line(&got), "HTTP/1.1 408 Request Timeout");
    assert!(fin);
    assert_eq!(drain_cmds(&mut s), vec![], "nothing was connected");
    assert_eq!(s.stats().proxy.head_timeouts, 1);
    // A head completed in time is not affected by the timer later on.
    let (flow, mut c) = open(&mut s, 70_000, web());
    let cmds = guest_sends(&mut s, 70_001, &mut c, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(cmds, vec![Cmd::Connect(flow, UPSTREAM.parse().unwrap())]);
    s.tcp_connected(t(70_002), flow);
    s.poll(t(200_000));
    assert!(!drain_cmds(&mut s).contains(&Cmd::Abort(flow)));
    assert_eq!(s.stats().proxy.head_timeouts, 1);
}
