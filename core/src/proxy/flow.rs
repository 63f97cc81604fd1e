//! The state of one proxied guest connection (the stack drives it: `stack/proxy_flow.rs`).

use smoltcp::time::Instant;

use super::http::Body;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProxyKind {
    /// Plain HTTP to an `http_ports` destination.
    Http,
    /// TLS to an `https_ports` destination.
    Https,
    /// The gateway's explicit proxy port.
    Explicit,
}

/// What follows a successful host connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum After {
    /// Relay HTTP requests, each head parsed (and rewritten for an upstream proxy).
    Http,
    /// Send the CONNECT in `out`, then read the upstream's reply.
    ConnectReply,
    /// Tell the guest its CONNECT succeeded, then tunnel.
    Established,
    /// Tunnel (after `out`).
    Tunnel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Reading the first request head or the ClientHello; nothing is connected yet.
    Sniff,
    /// The explicit proxy waits for the host's resolver (until `deadline`: a lookup
    /// that never ends must not hold the flow).
    Resolving {
        port: u16,
        after: After,
        deadline: Instant,
    },
    /// The host connect runs.
    Connecting { deadline: Instant, after: After },
    /// The CONNECT went to the upstream; its reply head collects in `reply`.
    ConnectReply { deadline: Instant },
    /// HTTP: `out` (a rewritten head), then the request body from the guest, then the
    /// next head.
    Http,
    /// Bytes both ways unchanged (after `out`).
    Tunnel,
    /// The single request to an origin went out: later guest bytes are discarded, the
    /// response passes.
    Drain,
    /// The proxy answered (or closed) the guest itself: guest bytes are discarded.
    Failed,
}

/// `HTTP/1.1 101`: enough of a status line to know whether it is a 101.
pub(crate) const STATUS_PREFIX: usize = 12;

#[derive(Debug)]
pub(crate) struct ProxyFlow {
    pub kind: ProxyKind,
    pub stage: Stage,
    /// Bytes for the host before any from the guest's socket: a rewritten head or a
    /// CONNECT.
    pub out: Vec<u8>,
    pub sent: usize,
    /// The body of the request being relayed.
    pub body: Option<Body>,
    /// `ip:port` of the original destination, for a request without Host.
    pub dst_authority: String,
    /// Heads go to an upstream proxy, with these credentials.
    pub via_upstream: bool,
    pub authorization: Option<String>,
    /// One request only (the explicit proxy going direct sends `Connection: close`).
    pub one_shot: bool,
    /// The upstream's reply to our CONNECT, until complete.
    pub reply: Vec<u8>,
    /// A byte of response reached the guest (after that, upstream failures are the
    /// guest's to see, as a reset or EOF).
    pub response_seen: bool,
    /// The host connection is open.
    pub connected: bool,
    /// An `Upgrade` request went out: the start of its response's status line (at most
    /// [`STATUS_PREFIX`] bytes) until it tells whether the server switched protocols
    /// (101: tunnel) or not (HTTP goes on: an `h2c` offer is commonly ignored with a
    /// 200 on a connection that stays open). Meanwhile the guest's bytes wait. An
    /// interim `100 Continue` before a 101 counts as no switch (an `Upgrade` with
    /// `Expect: 100-continue` is not seen in practice).
    pub upgrade_wait: Option<Vec<u8>>,
    pub head_limit: usize,
    /// TLS: when a client that has not sent a ClientHello by then is taken for a
    /// protocol whose server speaks first (SSH on 443): tunnelled by address. HTTP: when
    /// a client without a complete first head gets 408.
    pub sniff_deadline: Option<Instant>,
}

impl ProxyFlow {
    pub fn new(kind: ProxyKind, dst_authority: String, head_limit: usize) -> Self {
        ProxyFlow {
            kind,
            stage: Stage::Sniff,
            out: Vec::new(),
            sent: 0,
            body: None,
            dst_authority,
            via_upstream: false,
            authorization: None,
            one_shot: false,
            reply: Vec::new(),
            response_seen: false,
            connected: false,
            upgrade_wait: None,
            head_limit,
            sniff_deadline: None,
        }
    }

    /// Whether the flow holds one of the pending-connect slots (a host connect, or the
    /// name lookup before one).
    pub fn holds_connect_slot(&self) -> bool {
        matches!(
            self.stage,
            Stage::Connecting { .. } | Stage::Resolving { .. }
        )
    }

    pub fn out_pending(&self) -> bool {
        self.sent < self.out.len()
    }

    /// The host-connect deadline, while one runs (or the CONNECT reply is awaited).
    pub fn deadline(&self) -> Option<Instant> {
        match self.stage {
            Stage::Connecting { deadline, .. }
            | Stage::ConnectReply { deadline }
            | Stage::Resolving { deadline, .. } => Some(deadline),
            Stage::Sniff => self.sniff_deadline,
            _ => None,
        }
    }
}
