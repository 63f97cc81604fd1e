//! ICMP echo relay: guest pings become host ping-socket requests.

use std::net::Ipv4Addr;

use smoltcp::time::Instant;

/// Guest address, guest echo identifier, destination as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PingKey {
    pub guest: Ipv4Addr,
    pub ident: u16,
    pub dst: Ipv4Addr,
}

#[derive(Debug)]
pub(crate) struct PingFlow {
    pub key: PingKey,
    pub last_active: Instant,
}
