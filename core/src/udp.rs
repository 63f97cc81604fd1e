//! UDP NAT: one host socket per guest source address:port, so replies from any remote
//! reach the guest (endpoint-independent mapping, as VPNKit does).

use std::net::{SocketAddr, SocketAddrV4};

use smoltcp::time::Instant;

#[derive(Debug)]
pub(crate) struct UdpFlow {
    pub guest: SocketAddrV4,
    pub last_active: Instant,
    /// When the guest wrote to the gateway's DNS port, the upstream it was sent to: replies
    /// from there must appear to come from the gateway.
    pub dns_upstream: Option<SocketAddr>,
    /// For a port forward's flow: the host client, and the address it appears as.
    pub inbound: Option<(SocketAddr, SocketAddrV4)>,
}
