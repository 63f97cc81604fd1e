//! The gateway's DNS service: the glue between the [`Dns`] forwarder and the rest of the
//! stack. Guest queries arrive over UDP and TCP on the gateway's port 53; queries to
//! upstream servers leave through an internal UDP flow per address family (the host side
//! treats it as any NAT entry) and, after a truncated answer, one internal TCP flow per
//! query (the host side treats it as any TCP flow, without a smoltcp socket behind it).

use std::net::{SocketAddr, SocketAddrV4};

use smoltcp::socket::tcp;
use smoltcp::time::Instant;

use super::{Cmd, FlowId, Stack};
use crate::dns::{ClientToken, DnsOutput, ResolveError, ResolveId, UpstreamTransport};
use crate::udp::UdpFlow;

/// A lookup for the host's resolver (getaddrinfo), in DNS system mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolveRequest {
    pub req: u64,
    pub name: String,
    pub want_v4: bool,
    pub want_v6: bool,
}

/// A DNS-over-TCP exchange with an upstream: the framed query out, the framed answer in.
#[derive(Debug)]
pub(super) struct DnsTcpUpstream {
    pub server: SocketAddr,
    pub out: Vec<u8>,
    pub sent: usize,
    pub answer: Vec<u8>,
    pub connected: bool,
}

/// The largest DNS message over TCP (the 2-byte length allows no more), plus its prefix.
const MAX_TCP_MESSAGE: usize = 65535 + 2;

impl Stack {
    /// Hand every output of the forwarder to where it goes.
    pub(super) fn drain_dns(&mut self, now: Instant) {
        while let Some(out) = self.dns.as_mut().and_then(|d| d.poll_output()) {
            match out {
                DnsOutput::ToGuest {
                    client: ClientToken::Udp(SocketAddr::V4(guest)),
                    bytes,
                } => {
                    let src = SocketAddrV4::new(self.config.gateway, 53);
                    self.send_udp_to_guest(src, guest, &bytes);
                }
                DnsOutput::ToGuest {
                    client: ClientToken::Udp(SocketAddr::V6(_)),
                    ..
                } => {}
                DnsOutput::ToGuest {
                    client: ClientToken::Tcp(id),
                    bytes,
                } => {
                    self.dns_answer_tcp(FlowId(id), &bytes);
                }
                DnsOutput::ToUpstream {
                    server,
                    via: UpstreamTransport::Udp,
                    bytes,
                } => {
                    let flow = self.dns_udp_flow(now, server);
                    let range = self.arena_push(&bytes);
                    self.commands.push_back(Cmd::UdpSend(flow, server, range));
                }
                DnsOutput::ToUpstream {
                    server,
                    via: UpstreamTransport::Tcp,
                    bytes,
                } => {
                    let id = self.new_flow_id();
                    let mut out = Vec::with_capacity(bytes.len() + 2);
                    out.extend_from_slice(&(bytes.len().min(65535) as u16).to_be_bytes());
                    out.extend_from_slice(&bytes[..bytes.len().min(65535)]);
                    self.dns_tcp.insert(
                        id,
                        DnsTcpUpstream {
                            server,
                            out,
                            sent: 0,
                            answer: Vec::new(),
                            connected: false,
                        },
                    );
                    self.commands.push_back(Cmd::TcpConnect(id, server));
                }
                DnsOutput::Resolve {
                    req,
                    name,
                    want_v4,
                    want_v6,
                } => {
                    self.resolves.push_back(ResolveRequest {
                        req: req.0,
                        name,
                        want_v4,
                        want_v6,
                    });
                }
            }
        }
        self.close_stale_dns_tcp();
    }

    /// Close the DNS-over-TCP exchanges with upstreams whose answer nobody waits for any
    /// more (the query was answered by another server, timed out, or its guest left): an
    /// upstream that accepts and never answers would otherwise hold its flow and host
    /// socket for good. (Found by the sim: dns_all_down seed 1.)
    fn close_stale_dns_tcp(&mut self) {
        let Some(dns) = self.dns.as_ref() else {
            return;
        };
        if self.dns_tcp.is_empty() {
            return;
        }
        let stale: Vec<FlowId> = self
            .dns_tcp
            .iter()
            .filter(|(_, x)| match x.out.get(2..4) {
                Some(id) => !dns.awaits(
                    u16::from_be_bytes([id[0], id[1]]),
                    x.server,
                    UpstreamTransport::Tcp,
                ),
                None => true,
            })
            .map(|(f, _)| *f)
            .collect();
        for flow in stale {
            self.dns_tcp.remove(&flow);
            self.commands.push_back(Cmd::TcpClose(flow));
        }
    }

    /// The internal UDP flow that carries queries to `server`'s address family.
    fn dns_udp_flow(&mut self, now: Instant, server: SocketAddr) -> FlowId {
        let family = usize::from(server.is_ipv6());
        if let Some(id) = self.dns_udp[family].filter(|id| self.udp.contains_key(id)) {
            self.udp.get_mut(&id).expect("checked").last_active = now;
            return id;
        }
        let id = self.new_flow_id();
        let guest = SocketAddr::V4(SocketAddrV4::new(self.config.gateway, 53));
        self.udp.insert(
            id,
            UdpFlow {
                guest,
                last_active: now,
                dns_internal: true,
                inbound: None,
            },
        );
        self.dns_udp[family] = Some(id);
        let expiry = now + self.config.udp.idle_timeout;
        self.udp_next_expiry = Some(self.udp_next_expiry.map_or(expiry, |e| e.min(expiry)));
        id
    }

    /// An upstream's UDP answer arrived on the internal flow.
    pub(super) fn dns_from_upstream_udp(&mut self, now: Instant, from: SocketAddr, payload: &[u8]) {
        if let Some(dns) = self.dns.as_mut() {
            dns.handle_upstream(now, from, UpstreamTransport::Udp, payload);
        }
        self.drain_dns(now);
    }

    /// A guest's UDP query to the gateway.
    pub(super) fn dns_query_udp(&mut self, now: Instant, guest: SocketAddr, payload: &[u8]) {
        if let Some(dns) = self.dns.as_mut() {
            dns.handle_query(now, ClientToken::Udp(guest), payload);
        }
        self.drain_dns(now);
    }

    /// Write a framed answer to a guest's DNS-over-TCP connection.
    fn dns_answer_tcp(&mut self, flow: FlowId, bytes: &[u8]) {
        let Some(handle) = self.tcp.get(&flow).and_then(|f| f.handle()) else {
            return;
        };
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        let len = bytes.len().min(65535);
        // A TCP answer is one message or nothing: without room for it whole, the guest
        // retries, which is better than a torn stream.
        if s.send_capacity() - s.send_queue() >= len + 2 {
            let _ = s.send_slice(&(len as u16).to_be_bytes());
            let _ = s.send_slice(&bytes[..len]);
            self.egress_pending = true;
        }
        self.dirty.push(flow);
    }

    /// Take the guest's bytes on a DNS-over-TCP connection and hand over whole queries.
    pub(super) fn service_dns_tcp(&mut self, now: Instant, flow: FlowId) {
        let Some(f) = self.tcp.get_mut(&flow) else {
            return;
        };
        let Some(handle) = f.handle() else { return };
        let Some(inbuf) = f.local_dns.as_mut() else {
            return;
        };
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        let mut consumed = false;
        while let Ok(n) = s.recv(|b| {
            let n = b
                .len()
                .min(MAX_TCP_MESSAGE - inbuf.len().min(MAX_TCP_MESSAGE));
            inbuf.extend_from_slice(&b[..n]);
            (n, n)
        }) {
            if n == 0 {
                break;
            }
            consumed = true;
        }
        let mut queries = Vec::new();
        while inbuf.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([inbuf[0], inbuf[1]]));
            if inbuf.len() < 2 + len {
                break;
            }
            queries.push(inbuf[2..2 + len].to_vec());
            inbuf.drain(..2 + len);
        }
        if consumed {
            // The window opened: the next egress pass may announce it.
            self.egress_pending = true;
        }
        if f.guest_fin && !f.host_eof {
            // The guest is done asking; the answers still go out before our FIN.
            f.host_eof = true;
            s.close();
            self.egress_pending = true;
        }
        for q in queries {
            if let Some(dns) = self.dns.as_mut() {
                dns.handle_query(now, ClientToken::Tcp(flow.0), &q);
            }
        }
        self.drain_dns(now);
    }

    /// A guest's DNS-over-TCP connection ended.
    pub(super) fn dns_tcp_closed(&mut self, flow: FlowId) {
        if let Some(dns) = self.dns.as_mut() {
            dns.cancel_client(ClientToken::Tcp(flow.0));
        }
        self.close_stale_dns_tcp();
    }

    // ---- the host side of DNS-over-TCP exchanges with upstreams

    pub(super) fn dns_tcp_connected(&mut self, flow: FlowId) -> bool {
        let Some(x) = self.dns_tcp.get_mut(&flow) else {
            return false;
        };
        x.connected = true;
        self.commands.push_back(Cmd::TcpReady(flow));
        true
    }

    pub(super) fn dns_tcp_failed(&mut self, now: Instant, flow: FlowId) -> bool {
        let Some(x) = self.dns_tcp.remove(&flow) else {
            return false;
        };
        if let Some(dns) = self.dns.as_mut() {
            dns.handle_upstream_error(now, x.server, UpstreamTransport::Tcp);
        }
        self.drain_dns(now);
        true
    }

    pub(super) fn dns_tcp_to_host(&self, flow: FlowId) -> Option<&[u8]> {
        let x = self.dns_tcp.get(&flow)?;
        Some(if x.connected { &x.out[x.sent..] } else { &[] })
    }

    pub(super) fn dns_tcp_consumed(&mut self, flow: FlowId, n: usize) -> bool {
        let Some(x) = self.dns_tcp.get_mut(&flow) else {
            return false;
        };
        x.sent = (x.sent + n).min(x.out.len());
        true
    }

    /// Room for the upstream's answer, or `None` when this is no DNS exchange.
    pub(super) fn dns_tcp_room(&self, flow: FlowId) -> Option<usize> {
        let x = self.dns_tcp.get(&flow)?;
        Some(if x.connected {
            MAX_TCP_MESSAGE - x.answer.len()
        } else {
            0
        })
    }

    /// Let the host write the upstream's answer; a whole message ends the exchange.
    pub(super) fn dns_tcp_from_host<R>(
        &mut self,
        flow: FlowId,
        fill: impl FnOnce(&mut [u8]) -> (usize, R),
    ) -> Option<Option<R>> {
        let x = self.dns_tcp.get_mut(&flow)?;
        if !x.connected || x.answer.len() >= MAX_TCP_MESSAGE {
            return Some(None);
        }
        let start = x.answer.len();
        x.answer.resize(MAX_TCP_MESSAGE, 0);
        let (n, r) = fill(&mut x.answer[start..]);
        x.answer.truncate(start + n.min(MAX_TCP_MESSAGE - start));
        if x.answer.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([x.answer[0], x.answer[1]]));
            if x.answer.len() >= 2 + len {
                let x = self.dns_tcp.remove(&flow).expect("present");
                let now = self.last_now;
                if let Some(dns) = self.dns.as_mut() {
                    dns.handle_upstream(
                        now,
                        x.server,
                        UpstreamTransport::Tcp,
                        &x.answer[2..2 + len],
                    );
                }
                self.commands.push_back(Cmd::TcpClose(flow));
                self.drain_dns(now);
            }
        }
        Some(Some(r))
    }

    /// The next name the host's resolver must look up (DNS system mode); answer with
    /// [`Stack::dns_resolved`].
    pub fn poll_resolve(&mut self) -> Option<ResolveRequest> {
        self.resolves.pop_front()
    }

    /// The host resolver's answer for a [`ResolveRequest`].
    pub fn dns_resolved(
        &mut self,
        now: Instant,
        req: u64,
        result: Result<Vec<std::net::IpAddr>, ResolveError>,
    ) {
        self.last_now = now;
        if req & super::proxy_flow::PROXY_RESOLVE != 0 {
            self.proxy_resolved(req, result);
            return;
        }
        if let Some(dns) = self.dns.as_mut() {
            dns.handle_resolved(now, ResolveId(req), result);
        }
        self.drain_dns(now);
    }

    /// Replace the names of the hosts file (its text, /etc/hosts syntax); the number of
    /// names now known from it.
    pub fn set_dns_hosts(&mut self, text: &str) -> usize {
        self.dns.as_mut().map_or(0, |d| d.set_hosts_text(text))
    }

    /// Counters of the gateway's DNS service, when it runs.
    pub fn dns_stats(&self) -> Option<&crate::dns::DnsStats> {
        self.dns.as_ref().map(|d| d.stats())
    }
}
