//! ICMP echo relay: guest pings become host ping-socket requests.

use std::net::IpAddr;

use smoltcp::time::Instant;

/// Guest address, guest echo identifier, destination as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PingKey {
    pub guest: IpAddr,
    pub ident: u16,
    pub dst: IpAddr,
}

#[derive(Debug)]
pub(crate) struct PingFlow {
    pub key: PingKey,
    pub last_active: Instant,
}
