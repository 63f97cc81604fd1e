//! Frame transports: how Ethernet frames travel between a guest and the daemon.
//!
//! The driver loop is generic over [`FrameTransport`]; each transport (TAP, QEMU stream,
//! the simulator's faulty link) only moves whole Ethernet frames.

use std::future::Future;
use std::io;

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

    /// Write out everything queued.
    fn flush(&mut self) -> impl Future<Output = io::Result<()>>;
}
