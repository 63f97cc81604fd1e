//! The transparent HTTP/HTTPS proxy: guest web traffic to an upstream proxy.
//!
//! Port 80 (the `http_ports`) is proxied at the HTTP level: every request head on the
//! connection is parsed and its target rewritten to absolute form, with our proxy
//! credentials. Port 443 (the `https_ports`) goes through `CONNECT name:443`, the name
//! read from the TLS ClientHello's SNI (the address when there is none), so that exclude
//! rules and name-filtering proxies work for HTTPS. The gateway also serves as an
//! explicit proxy for guests that set `http_proxy`.
//!
//! This module is the protocol logic, pure and testable on its own; the flows that use
//! it live in the stack (`stack/proxy_flow.rs`).

pub mod config;
pub mod connect;
pub(crate) mod flow;
pub mod http;
pub mod sni;

pub use config::{
    parse_no_proxy, parse_ports, parse_proxy_url, ExcludeRule, ProxyConfig, ProxyConfigError,
    ProxyUrl, Upstream,
};

/// Counters of the proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Guest connections intercepted (transparent or explicit).
    pub flows: u64,
    /// Request heads forwarded to an upstream proxy (every one on a keep-alive
    /// connection counts).
    pub requests: u64,
    /// `CONNECT`s sent to an upstream proxy for intercepted TLS.
    pub connects: u64,
    /// TLS connections proxied by their SNI name, and by address (no SNI).
    pub sni_names: u64,
    pub sni_fallbacks: u64,
    /// Connections that went direct because of an exclude rule.
    pub excluded: u64,
    /// Connections to the gateway's explicit proxy port.
    pub explicit: u64,
    /// Name lookups for the explicit proxy.
    pub resolves: u64,
    /// Errors by kind: malformed request (400), head too large (431), upstream refused,
    /// reset or closed before answering (502), connect timeout (504), CONNECT answered
    /// with non-2xx, malformed chunked body, name lookup failed (or timed out: 504).
    pub bad_requests: u64,
    pub heads_too_large: u64,
    pub upstream_failed: u64,
    pub upstream_timeouts: u64,
    pub connect_refused: u64,
    pub bad_bodies: u64,
    pub resolve_failed: u64,
    /// TLS connections silent past the sniff timeout, tunnelled by address.
    pub sniff_timeouts: u64,
    /// HTTP connections without a complete first request head in time (408).
    pub head_timeouts: u64,
    /// Explicit-proxy requests for the host's loopback while the host alias is off.
    pub forbidden: u64,
}
