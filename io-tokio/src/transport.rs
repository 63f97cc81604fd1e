//! Frame transports: how Ethernet frames travel between guests and the daemon.
//!
//! The driver loop is generic over [`FrameTransport`]; each transport (TAP, QEMU stream,
//! the virtual switch of several guests, the simulator's faulty link) only moves whole
//! Ethernet frames.
//!
//! Listeners hand each guest connection to the switch as a [`Port`]: a poll-based,
//! object-safe cousin of [`FrameTransport`], so that ports of every kind (UNIX stream,
//! vsock, datagram, stdio) sit in one table. A new kind of listener (say Hyper-V sockets
//! on a Windows host) is a new module that produces `Box<dyn Port>`; nothing else changes.

use std::future::Future;
use std::io;
use std::task::{Context, Poll};

/// A duplex channel of whole Ethernet frames (no FCS).
///
/// Reading is two-step so that the driver's `select!` can wait on [`FrameTransport::recv`]
/// while other branches borrow the core: `recv` buffers frames inside the transport and
/// must be cancel-safe (dropping its future loses no data); [`FrameTransport::next_frame`]
/// then hands them out one by one without waiting.
pub trait FrameTransport {
    /// Wait until at least one frame is buffered. Returns `Ok(false)` when the peer is gone
    /// for good (the daemon then stops serving this transport). Transports that accept
    /// reconnects (the QEMU stream listener) wait for the next peer instead of returning.
    fn recv(&mut self) -> impl Future<Output = io::Result<bool>>;

    /// The next buffered frame, or `None` when the buffer is drained.
    fn next_frame(&mut self) -> Option<&[u8]>;

    /// Queue one frame for the guest. May write at once or buffer until [`Self::flush`].
    /// A frame the transport cannot carry (too big, peer gone) is dropped, not an error.
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()>;

    /// Bytes queued by [`Self::send_frame`] and not yet written. The driver stops draining
    /// the core while this is large (backpressure from a slow guest).
    fn pending(&self) -> usize;

    /// Bytes queued on the way `frame` would take: with several guests, only the
    /// destination's queue holds the core back.
    fn pending_for(&self, _frame: &[u8]) -> usize {
        self.pending()
    }

    /// Write out everything queued.
    fn flush(&mut self) -> impl Future<Output = io::Result<()>>;

    /// The guests behind this transport, for `/stats` (empty: one guest, no counters of
    /// its own).
    fn guests(&self) -> Vec<GuestInfo> {
        Vec::new()
    }

    /// The next MAC address of a guest that left (its port closed) and is not on the
    /// switch any more: the driver ends that guest's flows. A one-guest transport never
    /// reports one (a reconnecting VMM keeps its guest's flows).
    fn take_departed(&mut self) -> Option<[u8; 6]> {
        None
    }

    /// The next address a guest asked for at its handshake (vmnet's Preferred_ipv4), with
    /// its MAC: the driver asks the core's DHCP server to lease it.
    fn take_preferred(&mut self) -> Option<([u8; 6], std::net::Ipv4Addr)> {
        None
    }
}

/// One guest port as `/stats` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestInfo {
    /// The switch's port number.
    pub port: u64,
    /// Where it came from (`unix:/path`, `vmnet:UUID`, ...).
    pub label: String,
    /// Addresses learnt on the port.
    pub macs: Vec<[u8; 6]>,
    pub stats: usernet_core::switch::PortStats,
}

/// One guest's frame channel as a port of the switch (object-safe, poll-based).
///
/// The same contract as [`FrameTransport`]: `poll_recv` buffers frames (its progress is
/// kept inside the port, so stopping to poll loses nothing), `peek_frame`/`pop_frame`
/// hand them out (in two steps so that the switch can look at a frame, copy it to other
/// ports and still hand it to the stack without a copy), `send_frame` queues,
/// `poll_flush` writes.
pub trait Port: Send {
    /// Ready with `Ok(true)` when frames are buffered, `Ok(false)` when the guest is gone.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>>;

    /// The next buffered frame, left in place.
    fn peek_frame(&self) -> Option<&[u8]>;

    /// Done with the frame [`Self::peek_frame`] showed.
    fn pop_frame(&mut self);

    /// Queue a frame for the guest; false if it cannot be carried (size).
    fn send_frame(&mut self, frame: &[u8]) -> bool;

    /// Bytes queued and not yet written.
    fn pending(&self) -> usize;

    /// Write what is queued; Ready once all of it is written.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Port for Box<dyn Port> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        (**self).poll_recv(cx)
    }
    fn peek_frame(&self) -> Option<&[u8]> {
        (**self).peek_frame()
    }
    fn pop_frame(&mut self) {
        (**self).pop_frame()
    }
    fn send_frame(&mut self, frame: &[u8]) -> bool {
        (**self).send_frame(frame)
    }
    fn pending(&self) -> usize {
        (**self).pending()
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_flush(cx)
    }
}
