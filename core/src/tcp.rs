//! TCP flows: one smoltcp socket per guest connection, created only once the host side
//! has connected, so the guest never sees a SYN-ACK for a destination that refused.

use std::net::SocketAddr;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;

use crate::stack::FlowId;

/// The 4-tuple as the guest sees it. Family-neutral, so that IPv6 slots in; the
/// packet path is IPv4-only today, so every key is IPv4 for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct TcpKey {
    pub guest: SocketAddr,
    pub dst: SocketAddr,
}

#[derive(Debug)]
pub(crate) enum Phase {
    /// The host connect is in progress; the guest's SYN waits here to be replayed into
    /// smoltcp when it succeeds (a retransmitted SYN meanwhile is absorbed).
    Connecting { syn: Vec<u8>, deadline: Instant },
    /// A smoltcp socket carries the guest side.
    Open { handle: SocketHandle },
}

#[derive(Debug)]
pub(crate) struct TcpFlow {
    pub key: TcpKey,
    pub phase: Phase,
    /// The guest sent FIN (smoltcp can no longer receive).
    pub guest_fin: bool,
    /// `TcpShutdownWrite` was emitted.
    pub shutdown_sent: bool,
    /// The host sent EOF; the socket was asked to close after its data.
    pub host_eof: bool,
    /// The driver found no room for host bytes: tell it when room appears.
    pub host_read_blocked: bool,
    /// A `TcpReady` is queued and not yet polled.
    pub ready_queued: bool,
    /// The smoltcp state seen at the last service, to tell a reset from a close.
    pub last_state: tcp::State,
    /// Opened by the host (a port forward) rather than by a guest SYN.
    pub inbound: bool,
    /// A connection to the gateway's DNS service (no host side): the bytes of a
    /// length-framed query not yet complete.
    pub local_dns: Option<Vec<u8>>,
    /// An intercepted connection: the proxy's state.
    pub proxy: Option<Box<crate::proxy::flow::ProxyFlow>>,
}

impl TcpFlow {
    pub fn new(key: TcpKey, syn: Vec<u8>, deadline: Instant) -> Self {
        TcpFlow {
            key,
            phase: Phase::Connecting { syn, deadline },
            guest_fin: false,
            shutdown_sent: false,
            host_eof: false,
            host_read_blocked: false,
            ready_queued: false,
            last_state: tcp::State::Listen,
            inbound: false,
            local_dns: None,
            proxy: None,
        }
    }

    /// A flow the host opens into the guest: it starts with its socket.
    pub fn inbound(key: TcpKey, handle: SocketHandle) -> Self {
        TcpFlow {
            phase: Phase::Open { handle },
            // Host bytes wait until the guest accepted: tell the driver when room opens.
            host_read_blocked: true,
            inbound: true,
            last_state: tcp::State::SynSent,
            ..TcpFlow::new(key, Vec::new(), Instant::ZERO)
        }
    }

    pub fn handle(&self) -> Option<SocketHandle> {
        match self.phase {
            Phase::Open { handle } => Some(handle),
            Phase::Connecting { .. } => None,
        }
    }
}

/// What the owner may learn about one TCP flow (for stats, tests and the simulator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpFlowInfo {
    pub flow: FlowId,
    pub guest: SocketAddr,
    pub dst: SocketAddr,
    /// `"connecting"` or smoltcp's state name (`"ESTABLISHED"`, ...).
    pub state: String,
    pub to_host_queued: usize,
    pub to_guest_queued: usize,
}
