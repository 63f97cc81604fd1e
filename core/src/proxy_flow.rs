//! Proxied TCP flows: the glue between [`crate::proxy`] and the stack's TCP relay.
//!
//! An intercepted guest connection gets its smoltcp socket at once (the handshake must
//! complete before the request head or ClientHello can be read), and a [`ProxyFlow`].
//! Once the head or the server name is known the flow is routed (to the upstream proxy,
//! or direct when excluded) and the host connect starts. Bytes for the host then come
//! from the flow's own bounded buffer first (a rewritten head, a CONNECT), then straight
//! from the socket: a request body up to its end, or everything in a tunnel.

use std::mem::discriminant;
use std::net::{IpAddr, SocketAddr};

use smoltcp::socket::tcp;
use smoltcp::time::Instant;

use super::{Cmd, ConnectError, FlowId, ResolveRequest, Stack};
use crate::dns::ResolveError;
use crate::proxy::connect::{parse_connect_response, write_connect};
use crate::proxy::flow::{After, ProxyFlow, ProxyKind, Stage, STATUS_PREFIX};
use crate::proxy::http::{
    self, authority, error_response, parse_request, split_absolute, split_authority, Body,
    HeadError, RequestHead, CONNECT_ESTABLISHED,
};
use crate::proxy::sni::{read_sni, Sni};
use crate::proxy::{ProxyConfig, Upstream};

/// The proxy's own name lookups carry this bit in their request id (the DNS forwarder
/// counts its ids up from 1).
pub(super) const PROXY_RESOLVE: u64 = 1 << 63;

/// A TLS client sends its ClientHello at once; one silent this long after connecting is
/// taken for a protocol whose server speaks first, and tunnelled by address.
const TLS_SNIFF_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(5);

/// An HTTP client has this long from connecting to complete its first request head
/// (nginx's `client_header_timeout`): a guest trickling a head does not hold its flow
/// for ever. Later heads on a kept-alive connection wait without limit, as any idle
/// connection does.
const HEAD_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);

/// Smallest and largest head limit a configuration may set.
const HEAD_LIMIT_RANGE: (usize, usize) = (1024, 256 * 1024);

/// What [`Stack::tcp_to_host`] hands out for a proxied flow.
enum ToHost {
    Nothing,
    Out,
    Socket(usize),
    BadBody,
}

impl Stack {
    /// Use `config` for new connections (`None`: no interception at all). Connections
    /// already proxied keep going as they were routed.
    pub fn set_proxy(&mut self, config: Option<ProxyConfig>) {
        self.proxy = config.map(|mut c| {
            c.head_limit = c.head_limit.clamp(HEAD_LIMIT_RANGE.0, HEAD_LIMIT_RANGE.1);
            c
        });
    }

    /// The proxy configuration in use.
    pub fn proxy(&self) -> Option<&ProxyConfig> {
        self.proxy.as_ref()
    }

    /// Whether a new guest connection to `dst` is intercepted, and how.
    pub(super) fn proxy_kind(&self, dst: SocketAddr) -> Option<ProxyKind> {
        let p = self.proxy.as_ref()?;
        if dst.ip() == IpAddr::V4(self.config.gateway) {
            return (p.explicit_port == Some(dst.port())).then_some(ProxyKind::Explicit);
        }
        // The host alias is the host itself: never through a proxy.
        if Some(dst.ip()) == self.config.host_alias.map(IpAddr::V4) {
            return None;
        }
        if p.http.is_some() && p.http_ports.contains(&dst.port()) {
            Some(ProxyKind::Http)
        } else if p.https.is_some() && p.https_ports.contains(&dst.port()) {
            Some(ProxyKind::Https)
        } else {
            None
        }
    }

    /// A new intercepted flow: its socket now, the decision once the guest has spoken.
    pub(super) fn proxy_accept(&mut self, now: Instant, id: FlowId, kind: ProxyKind) {
        let limit = self
            .proxy
            .as_ref()
            .map_or(HEAD_LIMIT_RANGE.0, |c| c.head_limit);
        let Some(f) = self.tcp.get_mut(&id) else {
            return;
        };
        let dst = f.key.dst;
        let mut p = ProxyFlow::new(kind, dst.to_string(), limit);
        p.sniff_deadline = Some(
            now + if kind == ProxyKind::Https {
                TLS_SNIFF_TIMEOUT
            } else {
                HEAD_TIMEOUT
            },
        );
        f.proxy = Some(Box::new(p));
        self.proxy_flows += 1;
        self.stats.proxy.flows += 1;
        if kind == ProxyKind::Explicit {
            self.stats.proxy.explicit += 1;
        }
        self.accept_guest(now, id);
    }

    fn proxy_mut(&mut self, id: FlowId) -> Option<&mut ProxyFlow> {
        self.tcp.get_mut(&id)?.proxy.as_deref_mut()
    }

    fn is_proxied(&self, id: FlowId) -> bool {
        self.proxy_flows > 0 && self.tcp.get(&id).is_some_and(|f| f.proxy.is_some())
    }

    // ---------------------------------------------------------------- decisions

    /// Look at a proxied flow after something happened to it.
    pub(super) fn service_proxy(&mut self, id: FlowId) {
        // A stage change may allow more progress at once (a body ended: the next head);
        // bounded, the rest waits for the next event.
        for _ in 0..4 {
            let Some(p) = self.tcp.get(&id).and_then(|f| f.proxy.as_deref()) else {
                return;
            };
            let before = (discriminant(&p.stage), p.body.is_some());
            self.proxy_step(id);
            let Some(p) = self.tcp.get(&id).and_then(|f| f.proxy.as_deref()) else {
                return;
            };
            if (discriminant(&p.stage), p.body.is_some()) == before {
                break;
            }
        }
        self.proxy_ready(id);
    }

    fn proxy_step(&mut self, id: FlowId) {
        let Some(f) = self.tcp.get_mut(&id) else {
            return;
        };
        let Some(handle) = f.handle() else { return };
        let Some(p) = f.proxy.as_deref_mut() else {
            return;
        };
        match p.stage {
            Stage::Sniff => self.proxy_sniff(id),
            Stage::Http
                if !p.out_pending()
                    && p.body.is_none_or(|b| b.done())
                    && p.upgrade_wait.is_none() =>
            {
                if p.one_shot && p.body.is_some() {
                    p.body = None;
                    p.stage = Stage::Drain;
                    return;
                }
                p.body = None;
                self.proxy_next_head(id);
            }
            Stage::Failed | Stage::Drain => {
                let s = self.sockets.get_mut::<tcp::Socket>(handle);
                let mut n = 0;
                while let Ok(k) = s.recv(|b| (b.len(), b.len())) {
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                if n > 0 {
                    // The window opened: let the guest know.
                    self.egress_pending = true;
                }
            }
            _ => {}
        }
    }

    /// Copy the start of the guest's bytes (up to the head limit) into the scratch
    /// buffer. Also: whether no more bytes can come before some are taken (the guest
    /// sent FIN, or the receive buffer is full).
    fn proxy_peek(&mut self, id: FlowId) -> Option<(Vec<u8>, bool, usize)> {
        let f = self.tcp.get(&id)?;
        let handle = f.handle()?;
        let limit = f.proxy.as_deref()?.head_limit;
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        let avail = s.recv_queue();
        // smoltcp keeps `may_recv` true while bytes are buffered: the state tells
        // whether the guest's FIN arrived.
        let fin = matches!(
            s.state(),
            tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait
        );
        let full = fin || avail >= s.recv_capacity();
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.resize(avail.min(limit), 0);
        let n = s.peek_slice(&mut buf).unwrap_or(0);
        buf.truncate(n);
        Some((buf, full, limit))
    }

    fn proxy_sniff(&mut self, id: FlowId) {
        let Some(kind) = self.proxy_mut(id).map(|p| p.kind) else {
            return;
        };
        let Some((buf, full, limit)) = self.proxy_peek(id) else {
            return;
        };
        if buf.is_empty() {
            if full {
                // The guest closed without a word: close too, nothing was connected.
                self.proxy_fail(id, None);
            }
            self.scratch = buf;
            return;
        }
        match kind {
            ProxyKind::Https => match read_sni(&buf, limit) {
                Sni::NeedMore if !full => {}
                Sni::Name(name) => self.route_tls(id, Some(name)),
                // No name, not TLS, or a hello that will not complete: by address.
                Sni::NeedMore | Sni::NoName | Sni::NotTls => self.route_tls(id, None),
            },
            ProxyKind::Http | ProxyKind::Explicit => match parse_request(&buf, limit) {
                Ok(None) if !full => {}
                Ok(None) => {
                    // The guest stopped, or its head fills the whole receive buffer.
                    let fin = self.proxy_fin(id);
                    self.proxy_bad_head(
                        id,
                        if fin {
                            HeadError::Malformed
                        } else {
                            HeadError::TooLarge
                        },
                    );
                }
                Err(e) => self.proxy_bad_head(id, e),
                Ok(Some(head)) if kind == ProxyKind::Http => self.route_http(id, head),
                Ok(Some(head)) => self.route_explicit(id, head),
            },
        }
        self.scratch = buf;
    }

    fn proxy_fin(&mut self, id: FlowId) -> bool {
        self.tcp.get(&id).and_then(|f| f.handle()).is_some_and(|h| {
            !matches!(
                self.sockets.get::<tcp::Socket>(h).state(),
                tcp::State::Established | tcp::State::SynReceived
            )
        })
    }

    fn proxy_bad_head(&mut self, id: FlowId, e: HeadError) {
        let detail = match e {
            HeadError::Malformed => {
                self.stats.proxy.bad_requests += 1;
                "malformed request"
            }
            HeadError::TooLarge => {
                self.stats.proxy.heads_too_large += 1;
                "request head too large"
            }
        };
        self.proxy_fail(id, Some((e.status(), detail)));
    }

    /// Take `n` bytes of the guest's (a head already copied out).
    fn proxy_take(&mut self, id: FlowId, n: usize) {
        if let Some(h) = self.tcp.get(&id).and_then(|f| f.handle()) {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            let _ = s.recv(|b| (n.min(b.len()), ()));
            self.egress_pending = true;
        }
    }

    fn route_tls(&mut self, id: FlowId, name: Option<String>) {
        let Some(dst) = self.tcp.get(&id).map(|f| f.key.dst) else {
            return;
        };
        let ip = dst.ip();
        let upstream = self.upstream_for(|c| c.https.as_ref(), name.as_deref(), Some(ip));
        let Some(up) = upstream else {
            let to = SocketAddr::new(self.host_target(dst.ip()), dst.port());
            self.proxy_connect(id, to, After::Tunnel);
            return;
        };
        if name.is_some() {
            self.stats.proxy.sni_names += 1;
        } else {
            self.stats.proxy.sni_fallbacks += 1;
        }
        self.stats.proxy.connects += 1;
        let target = authority(name.as_deref().unwrap_or(&dst.ip().to_string()), dst.port());
        let Some(p) = self.proxy_mut(id) else { return };
        write_connect(&target, up.authorization.as_deref(), &mut p.out);
        self.proxy_connect(id, up.addr, After::ConnectReply);
    }

    /// The upstream proxy for a destination, `None` when it goes direct (excluded, or
    /// no upstream of that kind); counts exclusions.
    fn upstream_for(
        &mut self,
        pick: impl Fn(&ProxyConfig) -> Option<&Upstream>,
        host: Option<&str>,
        ip: Option<IpAddr>,
    ) -> Option<Upstream> {
        let c = self.proxy.as_ref()?;
        let up = pick(c)?;
        if c.excluded(host, ip) {
            self.stats.proxy.excluded += 1;
            return None;
        }
        Some(up.clone())
    }

    fn route_http(&mut self, id: FlowId, head: RequestHead) {
        let Some(dst) = self.tcp.get(&id).map(|f| f.key.dst) else {
            return;
        };
        let host = head
            .host
            .as_deref()
            .and_then(|h| split_authority(h, dst.port()));
        let ip = dst.ip();
        let upstream = self.upstream_for(
            |c| c.http.as_ref(),
            host.as_ref().map(|h| h.0.as_str()),
            Some(ip),
        );
        let Some(up) = upstream else {
            // Direct: the head stays in the socket and goes as it came.
            let to = SocketAddr::new(self.host_target(dst.ip()), dst.port());
            self.proxy_connect(id, to, After::Tunnel);
            return;
        };
        self.proxy_take(id, head.len);
        let after = self.proxy_forward_head(id, &head, &up);
        self.proxy_connect(id, up.addr, after);
    }

    /// Queue `head` rewritten for the upstream proxy; what follows it.
    fn proxy_forward_head(&mut self, id: FlowId, head: &RequestHead, up: &Upstream) -> After {
        self.stats.proxy.requests += 1;
        let Some(p) = self.proxy_mut(id) else {
            return After::Tunnel;
        };
        p.via_upstream = true;
        p.authorization.clone_from(&up.authorization);
        let auth = head.host.clone().unwrap_or_else(|| p.dst_authority.clone());
        http::write_for_proxy(head, &auth, up.authorization.as_deref(), &mut p.out);
        if head.is_connect() {
            After::Tunnel
        } else {
            p.body = Some(Body::new(head.framing));
            if head.upgrade {
                // Tunnel only once the response says 101.
                p.upgrade_wait = Some(Vec::new());
            }
            After::Http
        }
    }

    fn route_explicit(&mut self, id: FlowId, head: RequestHead) {
        if head.is_connect() {
            let target = http::valid_authority(&head.target)
                .then(|| split_authority(&head.target, 443))
                .flatten();
            let Some((host, port)) = target else {
                self.proxy_bad_head(id, HeadError::Malformed);
                return;
            };
            let ip = host.parse::<IpAddr>().ok();
            self.proxy_take(id, head.len);
            match self.upstream_for(|c| c.https.as_ref(), Some(&host), ip) {
                Some(up) => {
                    // The upstream's reply passes to the guest as it comes.
                    let after = self.proxy_forward_head(id, &head, &up);
                    self.proxy_connect(id, up.addr, after);
                }
                None => self.proxy_direct(id, host, ip, port, After::Established),
            }
            return;
        }
        let Some((host, port, path)) = split_absolute(&head.target) else {
            self.proxy_bad_head(id, HeadError::Malformed);
            return;
        };
        let ip = host.parse::<IpAddr>().ok();
        self.proxy_take(id, head.len);
        match self.upstream_for(|c| c.http.as_ref(), Some(&host), ip) {
            Some(up) => {
                let after = self.proxy_forward_head(id, &head, &up);
                self.proxy_connect(id, up.addr, after);
            }
            None => {
                let Some(p) = self.proxy_mut(id) else { return };
                http::write_for_origin(&head, &path, &mut p.out);
                let after = if head.upgrade {
                    After::Tunnel
                } else {
                    p.one_shot = true;
                    p.body = Some(Body::new(head.framing));
                    After::Http
                };
                self.proxy_direct(id, host, ip, port, after);
            }
        }
    }

    /// Connect the explicit proxy to a destination by address, or look its name up.
    fn proxy_direct(
        &mut self,
        id: FlowId,
        host: String,
        ip: Option<IpAddr>,
        port: u16,
        after: After,
    ) {
        match ip {
            Some(ip) => {
                let to = SocketAddr::new(self.host_target(ip), port);
                self.proxy_connect_named(id, to, after);
            }
            None => {
                // A lookup holds a pending-connect slot: lookups in flight are bounded
                // as connects are (each is a resolver call on the host).
                if self.tcp_pending + self.proxy_connecting >= self.config.tcp.max_pending_connects
                {
                    self.stats.drop(crate::DropReason::TcpPendingLimit);
                    self.proxy_fail(id, Some((503, "too many connections in progress")));
                    return;
                }
                let deadline = self.last_now + self.config.tcp.connect_timeout;
                let Some(p) = self.proxy_mut(id) else { return };
                p.stage = Stage::Resolving {
                    port,
                    after,
                    deadline,
                };
                self.proxy_connecting += 1;
                self.stats.proxy.resolves += 1;
                self.resolves.push_back(ResolveRequest {
                    req: PROXY_RESOLVE | id.0,
                    name: host,
                    want_v4: true,
                    want_v6: true,
                });
            }
        }
    }

    /// Connect the explicit proxy to an address it was given by name or literal. The
    /// host's own loopback is reachable only when the host alias is (the explicit proxy
    /// must not open what `--host-ip 0.0.0.0` closed).
    fn proxy_connect_named(&mut self, id: FlowId, to: SocketAddr, after: After) {
        let ip = match to.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            ip => ip,
        };
        if (ip.is_loopback() || ip.is_unspecified()) && self.config.host_alias.is_none() {
            self.stats.proxy.forbidden += 1;
            self.proxy_fail(id, Some((403, "the host's loopback is not reachable")));
            return;
        }
        self.proxy_connect(id, to, after);
    }

    fn proxy_connect(&mut self, id: FlowId, to: SocketAddr, after: After) {
        // After a lookup the flow already holds its slot.
        let held = self.proxy_mut(id).is_some_and(|p| p.holds_connect_slot());
        if !held && self.tcp_pending + self.proxy_connecting >= self.config.tcp.max_pending_connects
        {
            self.stats.drop(crate::DropReason::TcpPendingLimit);
            self.proxy_fail(id, Some((503, "too many connections in progress")));
            return;
        }
        let deadline = self.last_now + self.config.tcp.connect_timeout;
        let Some(p) = self.proxy_mut(id) else { return };
        p.stage = Stage::Connecting { deadline, after };
        if !held {
            self.proxy_connecting += 1;
        }
        self.commands.push_back(Cmd::TcpConnect(id, to));
    }

    /// The next request head on a keep-alive connection.
    fn proxy_next_head(&mut self, id: FlowId) {
        let Some((buf, full, limit)) = self.proxy_peek(id) else {
            return;
        };
        if buf.is_empty() {
            self.scratch = buf;
            return;
        }
        let parsed = parse_request(&buf, limit);
        self.scratch = buf;
        match parsed {
            Ok(None) if !full => {}
            Ok(None) => {
                // A head cut off by the guest's FIN: nothing to forward.
                if let Some(p) = self.proxy_mut(id) {
                    p.stage = Stage::Drain;
                }
            }
            Err(e) => {
                // A response may be on its way to the guest: no error of our own can
                // be put in the stream; reset.
                match e {
                    HeadError::Malformed => self.stats.proxy.bad_requests += 1,
                    HeadError::TooLarge => self.stats.proxy.heads_too_large += 1,
                }
                self.proxy_abort(id);
            }
            Ok(Some(head)) => {
                let Some(p) = self.proxy_mut(id) else { return };
                let up = Upstream {
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    authorization: p.authorization.clone(),
                };
                if !p.via_upstream {
                    return;
                }
                self.proxy_take(id, head.len);
                if self.proxy_forward_head(id, &head, &up) == After::Tunnel {
                    if let Some(p) = self.proxy_mut(id) {
                        p.stage = Stage::Tunnel;
                    }
                }
            }
        }
    }

    /// Tell the host side what it can do now (bytes to send, room for its bytes, the
    /// guest's FIN to pass on).
    fn proxy_ready(&mut self, id: FlowId) {
        let Some(f) = self.tcp.get_mut(&id) else {
            return;
        };
        let Some(handle) = f.handle() else { return };
        let Some(p) = f.proxy.as_deref() else { return };
        if !p.connected {
            return;
        }
        let s = self.sockets.get::<tcp::Socket>(handle);
        let queued = s.recv_queue();
        let body_open = p.body.is_some_and(|b| !b.done());
        let to_host = p.out_pending()
            || match p.stage {
                Stage::Tunnel => queued > 0,
                Stage::Http => body_open && queued > 0,
                _ => false,
            };
        let room = s.may_send() && s.send_capacity() > s.send_queue();
        let mut ready = to_host;
        if f.host_read_blocked && room && !matches!(p.stage, Stage::Failed) {
            f.host_read_blocked = false;
            ready = true;
        }
        if ready && !f.ready_queued {
            f.ready_queued = true;
            self.commands.push_back(Cmd::TcpReady(id));
        }
        let all_sent = !p.out_pending()
            && match p.stage {
                Stage::Tunnel => queued == 0,
                Stage::Http => !body_open && queued == 0,
                Stage::Drain => true,
                _ => false,
            };
        if f.guest_fin && all_sent && !f.shutdown_sent {
            f.shutdown_sent = true;
            self.commands.push_back(Cmd::TcpShutdownWrite(id));
        }
    }

    // ---------------------------------------------------------------- failures

    /// Answer the guest ourselves (an HTTP error, when given and nothing was answered
    /// yet) and close its connection; the host side, if any, is aborted.
    fn proxy_fail(&mut self, id: FlowId, status: Option<(u16, &str)>) {
        let Some(f) = self.tcp.get_mut(&id) else {
            return;
        };
        let Some(handle) = f.handle() else { return };
        let Some(p) = f.proxy.as_deref_mut() else {
            return;
        };
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        if let Some((code, detail)) = status {
            if !p.response_seen && s.send_queue() == 0 {
                let _ = s.send_slice(&error_response(code, detail));
            }
        }
        s.close();
        // A host connect runs or ran (nothing for the driver to forget otherwise).
        let had_host = !matches!(
            p.stage,
            Stage::Sniff | Stage::Resolving { .. } | Stage::Failed
        );
        if p.holds_connect_slot() {
            self.proxy_connecting -= 1;
        }
        p.stage = Stage::Failed;
        p.out = Vec::new();
        p.sent = 0;
        p.body = None;
        p.connected = false;
        f.host_eof = true;
        if had_host {
            self.commands.push_back(Cmd::TcpAbort(id));
        }
        self.egress_pending = true;
        self.dirty.push(id);
    }

    /// Reset both sides.
    fn proxy_abort(&mut self, id: FlowId) {
        if let Some(h) = self.tcp.get(&id).and_then(|f| f.handle()) {
            self.sockets.get_mut::<tcp::Socket>(h).abort();
            self.flush_egress(self.last_now);
        }
        self.remove_tcp(id);
        self.commands.push_back(Cmd::TcpAbort(id));
    }

    /// The status an HTTP guest gets when the host side failed before any response.
    fn proxy_upstream_failed(&mut self, id: FlowId, timeout: bool, detail: &str) {
        let Some(p) = self.proxy_mut(id) else { return };
        let kind = p.kind;
        if timeout {
            self.stats.proxy.upstream_timeouts += 1;
        } else {
            self.stats.proxy.upstream_failed += 1;
        }
        let status =
            (kind != ProxyKind::Https).then_some((if timeout { 504 } else { 502 }, detail));
        self.proxy_fail(id, status);
    }

    // ---------------------------------------------------------------- host events

    /// `tcp_connected` for a proxied flow; false when `id` is none.
    pub(super) fn proxy_connected(&mut self, id: FlowId) -> bool {
        if !self.is_proxied(id) {
            return false;
        }
        let deadline = self.last_now + self.config.tcp.connect_timeout;
        let Some(f) = self.tcp.get_mut(&id) else {
            return true;
        };
        let Some(handle) = f.handle() else {
            return true;
        };
        let Some(p) = f.proxy.as_deref_mut() else {
            return true;
        };
        let Stage::Connecting { after, .. } = p.stage else {
            self.stats.drop(crate::DropReason::StaleHostEvent);
            return true;
        };
        p.connected = true;
        self.proxy_connecting -= 1;
        p.stage = match after {
            After::Http => Stage::Http,
            After::Tunnel => Stage::Tunnel,
            After::ConnectReply => Stage::ConnectReply { deadline },
            After::Established => {
                let s = self.sockets.get_mut::<tcp::Socket>(handle);
                let _ = s.send_slice(CONNECT_ESTABLISHED);
                p.response_seen = true;
                Stage::Tunnel
            }
        };
        self.egress_pending = true;
        self.dirty.push(id);
        true
    }

    /// `tcp_connect_failed` for a proxied flow; false when `id` is none.
    pub(super) fn proxy_connect_failed(&mut self, id: FlowId, err: ConnectError) -> bool {
        if !self.is_proxied(id) {
            return false;
        }
        let stage = self.proxy_mut(id).map(|p| p.stage);
        if !matches!(stage, Some(Stage::Connecting { .. })) {
            self.stats.drop(crate::DropReason::StaleHostEvent);
            return true;
        }
        self.stats.tcp_connects_failed += 1;
        let (timeout, detail) = match err {
            ConnectError::TimedOut => (true, "connecting timed out"),
            ConnectError::Refused => (false, "connection refused"),
            ConnectError::Unreachable => (false, "unreachable"),
            ConnectError::Other => (false, "cannot connect"),
        };
        self.proxy_upstream_failed(id, timeout, detail);
        true
    }

    /// `tcp_host_eof` for a proxied flow: true when handled here (the host closed
    /// before answering).
    pub(super) fn proxy_host_eof(&mut self, id: FlowId) -> bool {
        self.proxy_host_gone(id, "the connection closed before a response")
    }

    /// `tcp_host_reset` for a proxied flow, likewise.
    pub(super) fn proxy_host_reset(&mut self, id: FlowId) -> bool {
        self.proxy_host_gone(id, "the connection was reset before a response")
    }

    fn proxy_host_gone(&mut self, id: FlowId, detail: &str) -> bool {
        if !self.is_proxied(id) {
            return false;
        }
        let Some(p) = self.proxy_mut(id) else {
            return false;
        };
        match p.stage {
            Stage::ConnectReply { .. } => {
                self.proxy_upstream_failed(id, false, detail);
                true
            }
            Stage::Http if !p.response_seen => {
                self.proxy_upstream_failed(id, false, detail);
                true
            }
            // The guest's own connection already ended.
            Stage::Failed => true,
            _ => false,
        }
    }

    /// `tcp_room` for a proxied flow, when it differs from the socket's room.
    pub(super) fn proxy_room(&self, id: FlowId) -> Option<usize> {
        if self.proxy_flows == 0 {
            return None;
        }
        let p = self.tcp.get(&id)?.proxy.as_deref()?;
        match p.stage {
            Stage::ConnectReply { .. } => Some(p.head_limit.saturating_sub(p.reply.len())),
            Stage::Failed => Some(0),
            _ => None,
        }
    }

    /// Whether host bytes for `id` are the upstream's CONNECT reply (or go nowhere).
    pub(super) fn proxy_takes_host_bytes(&self, id: FlowId) -> bool {
        self.proxy_flows > 0
            && self
                .tcp
                .get(&id)
                .and_then(|f| f.proxy.as_deref())
                .is_some_and(|p| matches!(p.stage, Stage::ConnectReply { .. } | Stage::Failed))
    }

    /// Host bytes while the CONNECT reply is read: the reply head is parsed here, and
    /// on 2xx the tunnel opens (bytes after the head go on to the guest).
    pub(super) fn proxy_reply_from_host<R>(
        &mut self,
        id: FlowId,
        fill: impl FnOnce(&mut [u8]) -> (usize, R),
    ) -> Option<R> {
        let f = self.tcp.get_mut(&id)?;
        let handle = f.handle()?;
        let p = f.proxy.as_deref_mut()?;
        if !matches!(p.stage, Stage::ConnectReply { .. }) {
            return None;
        }
        let limit = p.head_limit;
        let start = p.reply.len();
        if start >= limit {
            return None;
        }
        p.reply.resize(limit, 0);
        let (n, r) = fill(&mut p.reply[start..]);
        p.reply.truncate(start + n.min(limit - start));
        match parse_connect_response(&p.reply, limit) {
            Ok(None) => {}
            Ok(Some((code, len))) if (200..300).contains(&code) => {
                let rest = p.reply.split_off(len);
                p.reply = Vec::new();
                p.stage = Stage::Tunnel;
                if !rest.is_empty() {
                    p.response_seen = true;
                    let s = self.sockets.get_mut::<tcp::Socket>(handle);
                    let _ = s.send_slice(&rest);
                }
                self.egress_pending = true;
                self.dirty.push(id);
            }
            Ok(Some(_)) => {
                // A 407, 403, 502... of the upstream: on 443 the guest can only be told
                // by a close.
                self.stats.proxy.connect_refused += 1;
                self.proxy_fail(id, None);
            }
            Err(_) => {
                self.stats.proxy.upstream_failed += 1;
                self.proxy_fail(id, None);
            }
        }
        Some(r)
    }

    /// Whether host bytes for `id` are the response to an `Upgrade` request whose status
    /// is not known yet.
    pub(super) fn proxy_watches_status(&self, id: FlowId) -> bool {
        self.proxy_flows > 0
            && self
                .tcp
                .get(&id)
                .and_then(|f| f.proxy.as_deref())
                .is_some_and(|p| p.upgrade_wait.is_some())
    }

    /// The first bytes of the response to an `Upgrade` request (as they reached the
    /// guest's socket): a 101 opens the tunnel, anything else lets HTTP go on.
    pub(super) fn proxy_status_bytes(&mut self, id: FlowId, bytes: &[u8]) {
        let Some(p) = self.proxy_mut(id) else { return };
        let Some(seen) = p.upgrade_wait.as_mut() else {
            return;
        };
        let take = (STATUS_PREFIX - seen.len()).min(bytes.len());
        seen.extend_from_slice(&bytes[..take]);
        if seen.len() < STATUS_PREFIX {
            return;
        }
        let switched = seen.starts_with(b"HTTP/1.") && &seen[8..] == b" 101";
        p.upgrade_wait = None;
        if switched && p.stage == Stage::Http {
            // The request's body (if any) went out before the response: from now on
            // bytes pass as they are.
            p.body = None;
            p.stage = Stage::Tunnel;
        }
        self.dirty.push(id);
        self.service_proxy(id);
    }

    /// A host lookup for the explicit proxy finished (`req` without the proxy bit).
    pub(super) fn proxy_resolved(&mut self, req: u64, result: Result<Vec<IpAddr>, ResolveError>) {
        let id = FlowId(req & !PROXY_RESOLVE);
        let Some(p) = self.proxy_mut(id) else {
            return;
        };
        let Stage::Resolving { port, after, .. } = p.stage else {
            return;
        };
        let addr = result.ok().and_then(|a| {
            a.iter()
                .find(|a| a.is_ipv4())
                .or_else(|| a.first())
                .copied()
        });
        match addr {
            Some(ip) => {
                let ip = self.host_target(ip);
                self.proxy_connect_named(id, SocketAddr::new(ip, port), after);
            }
            None => {
                self.stats.proxy.resolve_failed += 1;
                self.proxy_fail(id, Some((502, "cannot resolve the name")));
            }
        }
    }

    /// Bytes for the host of a proxied flow (see [`Stack::tcp_to_host`]).
    pub(super) fn proxy_to_host(&mut self, id: FlowId) -> &[u8] {
        let decision = {
            let Some(f) = self.tcp.get(&id) else {
                return &[];
            };
            let (Some(p), Some(h)) = (f.proxy.as_deref(), f.handle()) else {
                return &[];
            };
            if !p.connected {
                ToHost::Nothing
            } else if p.out_pending() {
                ToHost::Out
            } else {
                match (p.stage, p.body) {
                    (Stage::Tunnel, _) => ToHost::Socket(usize::MAX),
                    (Stage::Http, Some(b)) if !b.done() => {
                        let s = self.sockets.get_mut::<tcp::Socket>(h);
                        let data = s.peek(usize::MAX).unwrap_or(&[]);
                        match b.limit(data) {
                            Ok(n) => ToHost::Socket(n),
                            Err(_) => ToHost::BadBody,
                        }
                    }
                    _ => ToHost::Nothing,
                }
            }
        };
        match decision {
            ToHost::Nothing => &[],
            ToHost::Out => match self.tcp.get(&id).and_then(|f| f.proxy.as_deref()) {
                Some(p) => &p.out[p.sent..],
                None => &[],
            },
            ToHost::Socket(n) => match self.tcp.get(&id).and_then(|f| f.handle()) {
                Some(h) => self
                    .sockets
                    .get_mut::<tcp::Socket>(h)
                    .peek(n)
                    .unwrap_or(&[]),
                None => &[],
            },
            ToHost::BadBody => {
                self.stats.proxy.bad_bodies += 1;
                self.proxy_abort(id);
                &[]
            }
        }
    }

    /// The host took `n` bytes of [`Stack::proxy_to_host`].
    pub(super) fn proxy_consumed(&mut self, id: FlowId, n: usize) {
        let Some(f) = self.tcp.get_mut(&id) else {
            return;
        };
        let Some(handle) = f.handle() else { return };
        let Some(p) = f.proxy.as_deref_mut() else {
            return;
        };
        if p.out_pending() {
            p.sent = (p.sent + n).min(p.out.len());
            if !p.out_pending() {
                p.out = Vec::new();
                p.sent = 0;
            }
        } else {
            let s = self.sockets.get_mut::<tcp::Socket>(handle);
            if let Some(b) = p.body.as_mut() {
                if let Ok(d) = s.peek(n) {
                    let _ = b.advance(d);
                }
            }
            let _ = s.recv(|b| (n.min(b.len()), ()));
        }
        self.dirty.push(id);
        // A body (or a head) just ended: the next head goes out in the same pass.
        let next = !p.out_pending()
            && p.stage == Stage::Http
            && p.body.is_none_or(|b| b.done())
            && p.upgrade_wait.is_none();
        if next {
            self.service_proxy(id);
        }
    }

    /// Proxied flows whose lookup, connect or CONNECT reply is overdue, or whose TLS
    /// client stayed silent.
    pub(super) fn proxy_expire(&mut self, now: Instant) {
        if self.proxy_flows == 0 {
            return;
        }
        let late: Vec<FlowId> = self
            .tcp
            .iter()
            .filter(|(_, f)| {
                f.proxy
                    .as_deref()
                    .and_then(|p| p.deadline())
                    .is_some_and(|d| d <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            match self.proxy_mut(id).map(|p| p.stage) {
                Some(Stage::Sniff) => {
                    if self
                        .proxy_mut(id)
                        .is_some_and(|p| p.kind == ProxyKind::Https)
                    {
                        self.stats.proxy.sniff_timeouts += 1;
                        self.route_tls(id, None);
                    } else {
                        self.stats.proxy.head_timeouts += 1;
                        self.proxy_fail(id, Some((408, "no complete request head in time")));
                    }
                    continue;
                }
                Some(Stage::Resolving { .. }) => {
                    // The host's resolver never answered: its late answer is ignored.
                    self.stats.proxy.resolve_failed += 1;
                    self.proxy_fail(id, Some((504, "the name lookup timed out")));
                    continue;
                }
                _ => {}
            }
            // A connect that timed out counts as any failed connect; a CONNECT reply
            // that did not come only as the proxy's own error.
            if matches!(
                self.proxy_mut(id).map(|p| p.stage),
                Some(Stage::Connecting { .. })
            ) {
                self.stats.tcp_connects_failed += 1;
            }
            self.proxy_upstream_failed(id, true, "the upstream did not answer in time");
        }
    }

    pub(super) fn proxy_poll_timeout(&self) -> Option<Instant> {
        if self.proxy_flows == 0 {
            return None;
        }
        self.tcp
            .values()
            .filter_map(|f| f.proxy.as_deref().and_then(|p| p.deadline()))
            .min()
    }
}
