//! Counters: what the stack did and, above all, what it dropped and why.

use std::fmt;

/// Why a frame or packet from the guest (or an event from the host) was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Shorter than its headers claim, or than a header.
    Truncated,
    /// A header field that makes no sense (version, length, flags).
    Malformed,
    /// An IPv4 header checksum that does not add up.
    BadChecksum,
    /// An Ethertype the switch does not carry.
    UnknownEthertype,
    /// A unicast frame for a MAC address that is not on the switch.
    UnknownDestination,
    /// An IPv4 fragment: the stack does not reassemble.
    Fragment,
    /// An IP protocol the stack does not relay.
    UnsupportedProtocol,
    /// Broadcast or multicast traffic the stack does not relay.
    NotUnicast,
    /// A frame longer than the link MTU allows.
    TooBig,
    /// A TCP SYN refused because the flow table is full.
    TcpFlowLimit,
    /// A TCP SYN refused because too many host connects are in progress.
    TcpPendingLimit,
    /// A TCP flow evicted or a SYN the relay could not take.
    TcpRejected,
    /// A UDP flow evicted to make room for a new one.
    UdpEvicted,
    /// A ping refused because the echo table is full.
    IcmpFlowLimit,
    /// A DHCP message that failed to parse or could not be served.
    Dhcp,
    /// A frame for the guest with no known MAC address for its destination.
    NoNeighbor,
    /// A host event for a flow that no longer exists.
    StaleHostEvent,
    /// A host datagram too large for the guest link.
    HostTooBig,
}

impl DropReason {
    pub const ALL: [DropReason; 18] = [
        DropReason::Truncated,
        DropReason::Malformed,
        DropReason::BadChecksum,
        DropReason::UnknownEthertype,
        DropReason::UnknownDestination,
        DropReason::Fragment,
        DropReason::UnsupportedProtocol,
        DropReason::NotUnicast,
        DropReason::TooBig,
        DropReason::TcpFlowLimit,
        DropReason::TcpPendingLimit,
        DropReason::TcpRejected,
        DropReason::UdpEvicted,
        DropReason::IcmpFlowLimit,
        DropReason::Dhcp,
        DropReason::NoNeighbor,
        DropReason::StaleHostEvent,
        DropReason::HostTooBig,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Malformed => "malformed",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::UnknownEthertype => "unknown_ethertype",
            DropReason::UnknownDestination => "unknown_destination",
            DropReason::Fragment => "fragment",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::NotUnicast => "not_unicast",
            DropReason::TooBig => "too_big",
            DropReason::TcpFlowLimit => "tcp_flow_limit",
            DropReason::TcpPendingLimit => "tcp_pending_limit",
            DropReason::TcpRejected => "tcp_rejected",
            DropReason::UdpEvicted => "udp_evicted",
            DropReason::IcmpFlowLimit => "icmp_flow_limit",
            DropReason::Dhcp => "dhcp",
            DropReason::NoNeighbor => "no_neighbor",
            DropReason::StaleHostEvent => "stale_host_event",
            DropReason::HostTooBig => "host_too_big",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of a [`crate::Stack`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub tcp_flows_opened: u64,
    pub tcp_connects_failed: u64,
    pub udp_flows_opened: u64,
    pub icmp_echo_requests: u64,
    pub icmp_echo_replies: u64,
    pub arp_replies: u64,
    pub dhcp_replies: u64,
    /// The transparent and explicit proxy.
    pub proxy: crate::proxy::ProxyStats,
    drops: [u64; DropReason::ALL.len()],
}

impl Stats {
    pub(crate) fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }
    /// How many were dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }
    /// Every drop counter that is not zero.
    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.drops[*r as usize]))
            .filter(|(_, n)| *n > 0)
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}
