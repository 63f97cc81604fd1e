//! UDP NAT: one host socket per guest source address:port, so replies from any remote
//! reach the guest (endpoint-independent mapping, as VPNKit does).

use std::net::SocketAddr;

use smoltcp::time::Instant;

#[derive(Debug)]
pub(crate) struct UdpFlow {
    pub guest: SocketAddr,
    pub last_active: Instant,
    /// The gateway's own flow for DNS queries to upstream servers (not a guest's).
    pub dns_internal: bool,
    /// For a port forward's flow: the host client, and the address it appears as.
    pub inbound: Option<(SocketAddr, SocketAddr)>,
}
