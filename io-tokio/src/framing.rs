//! Length-prefixed framings of Ethernet frames on a byte stream, independent of the
//! stream itself:
//!
//! - [`Framing::U32Be`]: a 32-bit big-endian length, then the frame. QEMU's `-netdev
//!   stream` and `-net socket`, passt, libkrun's passt mode.
//! - [`Framing::U16Le`]: a 16-bit little-endian length, then the frame. VPNKit (after the
//!   vmnet handshake), gvisor-tap-vsock's vsock and stdio transports.
//!
//! [`FrameCodec`] is the receive and send state; [`FramedPort`] joins it to any async
//! byte stream and is a [`Port`] of the switch (and a [`FrameTransport`] on its own).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::transport::{FrameTransport, Port};

/// Smallest frame accepted on the wire: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Default size of the receive buffer.
pub const DEFAULT_RX_BUFFER: usize = 256 * 1024;

/// How each frame's length is written on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// u32 big-endian (QEMU, passt).
    U32Be,
    /// u16 little-endian (VPNKit, gvisor-tap-vsock).
    U16Le,
}

impl Framing {
    /// Bytes of the length prefix.
    pub const fn header_len(self) -> usize {
        match self {
            Framing::U32Be => 4,
            Framing::U16Le => 2,
        }
    }

    /// The largest frame accepted: a 65535-byte payload plus the Ethernet header for the
    /// u32 framing (passt's limit), what 16 bits can say for the u16 one.
    pub const fn max_frame(self) -> usize {
        match self {
            Framing::U32Be => 65535 + 14,
            Framing::U16Le => 65535,
        }
    }

    /// The length a header announces; `hdr` holds at least [`Self::header_len`] bytes.
    pub fn decode(self, hdr: &[u8]) -> u32 {
        match self {
            Framing::U32Be => u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]),
            Framing::U16Le => u32::from(u16::from_le_bytes([hdr[0], hdr[1]])),
        }
    }

    /// Append the length prefix for a `len`-byte frame (`len` fits: callers check
    /// [`Self::max_frame`]).
    pub fn encode(self, len: usize, out: &mut Vec<u8>) {
        match self {
            Framing::U32Be => out.extend_from_slice(&(len as u32).to_be_bytes()),
            Framing::U16Le => out.extend_from_slice(&(len as u16).to_le_bytes()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Framing::U32Be => "qemu",
            Framing::U16Le => "u16le",
        }
    }
}

/// What the receive buffer holds after [`FrameCodec::scan`].
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// At least one complete frame can be handed out.
    Ready,
    /// More bytes are needed.
    NeedMore,
    /// The next frame header carries an invalid length.
    Invalid(u32),
}

/// Receive and send state of a length-prefixed framing.
///
/// The receive buffer holds `rx[start..end]` of unconsumed bytes; `rx[start..parsed]` is
/// a run of complete, validated frames that [`FrameCodec::next_frame`] hands out. It
/// always has room for one maximal frame, and the unconsumed bytes move to the front
/// only when the free tail could not hold one.
#[derive(Debug)]
pub struct FrameCodec {
    framing: Framing,
    rx: Box<[u8]>,
    start: usize,
    parsed: usize,
    end: usize,
    tx: Vec<u8>,
    tx_off: usize,
    /// Complete frames before this offset were shown to [`Self::visit_new`].
    visited: usize,
}

impl FrameCodec {
    pub fn new(framing: Framing, rx_size: usize) -> Self {
        let size = rx_size.max(framing.max_frame() + framing.header_len());
        FrameCodec {
            framing,
            rx: vec![0u8; size].into_boxed_slice(),
            start: 0,
            parsed: 0,
            end: 0,
            tx: Vec::new(),
            tx_off: 0,
            visited: 0,
        }
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Forget everything buffered both ways (a new connection).
    pub fn reset(&mut self) {
        self.start = 0;
        self.parsed = 0;
        self.end = 0;
        self.tx.clear();
        self.tx_off = 0;
        self.visited = 0;
    }

    /// Hand every complete frame not seen before to `f`, which may rewrite it in place
    /// (same length).
    pub fn visit_new(&mut self, mut f: impl FnMut(&mut [u8])) {
        let hl = self.framing.header_len();
        let mut at = self.visited.max(self.start);
        while at < self.parsed {
            let len = self.framing.decode(&self.rx[at..at + hl]) as usize;
            f(&mut self.rx[at + hl..at + hl + len]);
            at += hl + len;
        }
        self.visited = at;
    }

    /// Extend the run of complete frames as far as the buffered bytes allow.
    pub fn scan(&mut self) -> Scan {
        let hl = self.framing.header_len();
        let max = self.framing.max_frame();
        loop {
            let avail = self.end - self.parsed;
            if avail < hl {
                break;
            }
            let len = self.framing.decode(&self.rx[self.parsed..self.parsed + hl]);
            if (len as usize) < MIN_FRAME || (len as usize) > max {
                if self.parsed > self.start {
                    // Hand out the good frames first; the error surfaces on the next scan.
                    return Scan::Ready;
                }
                return Scan::Invalid(len);
            }
            if avail < hl + len as usize {
                break;
            }
            self.parsed += hl + len as usize;
        }
        if self.parsed > self.start {
            Scan::Ready
        } else {
            Scan::NeedMore
        }
    }

    /// The free tail of the receive buffer to read into; then [`Self::commit`] what was
    /// read.
    pub fn prepare_read(&mut self) -> &mut [u8] {
        let room = self.framing.max_frame() + self.framing.header_len();
        if self.start == self.end {
            self.start = 0;
            self.parsed = 0;
            self.end = 0;
            self.visited = 0;
        } else if self.rx.len() - self.end < room && self.start > 0 {
            self.rx.copy_within(self.start..self.end, 0);
            self.parsed -= self.start;
            self.end -= self.start;
            self.visited = self.visited.saturating_sub(self.start);
            self.start = 0;
        }
        &mut self.rx[self.end..]
    }

    /// `n` bytes were read into the slice [`Self::prepare_read`] gave.
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.rx.len());
    }

    /// Copy `bytes` in as if read (tests, fuzzing); returns how many fit.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let buf = self.prepare_read();
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        self.commit(n);
        n
    }

    /// Whether a complete frame is waiting.
    pub fn has_frame(&self) -> bool {
        self.start < self.parsed
    }

    /// The next complete frame (call [`Self::scan`] first). The slice stays valid until
    /// the next read into the buffer.
    pub fn next_frame(&mut self) -> Option<&[u8]> {
        if self.start >= self.parsed {
            return None;
        }
        let hl = self.framing.header_len();
        let s = self.start;
        let len = self.framing.decode(&self.rx[s..s + hl]) as usize;
        self.start = s + hl + len;
        Some(&self.rx[s + hl..s + hl + len])
    }

    /// The next complete frame, left in place (call [`Self::scan`] first).
    pub fn peek_frame(&self) -> Option<&[u8]> {
        if self.start >= self.parsed {
            return None;
        }
        let hl = self.framing.header_len();
        let s = self.start;
        let len = self.framing.decode(&self.rx[s..s + hl]) as usize;
        Some(&self.rx[s + hl..s + hl + len])
    }

    /// Step past the frame [`Self::peek_frame`] showed.
    pub fn pop_frame(&mut self) {
        if self.start < self.parsed {
            let hl = self.framing.header_len();
            let len = self.framing.decode(&self.rx[self.start..self.start + hl]) as usize;
            self.start += hl + len;
        }
    }

    /// Bytes of an incomplete frame still buffered (for EOF diagnostics).
    pub fn partial(&self) -> usize {
        self.end - self.parsed
    }

    /// Queue `frame` for sending; false (nothing queued) if its size cannot be framed.
    pub fn queue(&mut self, frame: &[u8]) -> bool {
        if frame.len() < MIN_FRAME || frame.len() > self.framing.max_frame() {
            return false;
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        self.framing.encode(frame.len(), &mut self.tx);
        self.tx.extend_from_slice(frame);
        true
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.tx.len() - self.tx_off
    }

    /// The queued bytes not yet written.
    pub fn tx_bytes(&self) -> &[u8] {
        &self.tx[self.tx_off..]
    }

    /// `n` queued bytes were written.
    pub fn consume_tx(&mut self, n: usize) {
        self.tx_off = (self.tx_off + n).min(self.tx.len());
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
    }

    /// Drop everything queued for sending.
    pub fn clear_tx(&mut self) {
        self.tx.clear();
        self.tx_off = 0;
    }
}

/// Why reading from a connection stopped.
#[derive(Debug)]
pub enum ReadEnd {
    Eof,
    Invalid(u32),
    Io(io::Error),
}

/// Read until at least one complete frame is buffered. All state lives in `codec`, so
/// dropping the poll between calls loses nothing.
pub fn poll_fill<S: AsyncRead + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    codec: &mut FrameCodec,
) -> Poll<Result<(), ReadEnd>> {
    loop {
        match codec.scan() {
            Scan::Ready => return Poll::Ready(Ok(())),
            Scan::Invalid(len) => return Poll::Ready(Err(ReadEnd::Invalid(len))),
            Scan::NeedMore => {}
        }
        let mut rb = ReadBuf::new(codec.prepare_read());
        match Pin::new(&mut *io).poll_read(cx, &mut rb) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(ReadEnd::Eof));
                }
                codec.commit(n);
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(ReadEnd::Io(e))),
        }
    }
}

/// Write out the queued bytes; progress is recorded after every write.
pub fn poll_drain<S: AsyncWrite + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    codec: &mut FrameCodec,
) -> Poll<io::Result<()>> {
    while codec.pending() > 0 {
        match Pin::new(&mut *io).poll_write(cx, codec.tx_bytes()) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => codec.consume_tx(n),
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
        }
    }
    Pin::new(&mut *io).poll_flush(cx)
}

/// [`poll_fill`] as a future (cancel-safe).
pub async fn fill<S: AsyncRead + Unpin>(io: &mut S, codec: &mut FrameCodec) -> Result<(), ReadEnd> {
    poll_fn(|cx| poll_fill(io, cx, codec)).await
}

/// [`poll_drain`] as a future (cancel-safe).
pub async fn drain<S: AsyncWrite + Unpin>(io: &mut S, codec: &mut FrameCodec) -> io::Result<()> {
    poll_fn(|cx| poll_drain(io, cx, codec)).await
}

/// Length-prefixed Ethernet frames over one connected byte stream.
///
/// Receiving ends with `Ok(false)` on a clean EOF and an `InvalidData` error on a
/// framing error; there is no reconnecting (a listener hands each connection to the
/// switch as a port of its own).
#[derive(Debug)]
pub struct FramedPort<S> {
    io: S,
    codec: FrameCodec,
    closed: bool,
    /// Applied to each received frame once (see [`FramedPort::set_fixup`]).
    fixup: Option<fn(&mut [u8])>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FramedPort<S> {
    pub fn new(io: S, framing: Framing) -> Self {
        Self::with_buffer(io, framing, DEFAULT_RX_BUFFER)
    }

    pub fn with_buffer(io: S, framing: Framing, rx_size: usize) -> Self {
        FramedPort {
            io,
            codec: FrameCodec::new(framing, rx_size),
            closed: false,
            fixup: None,
        }
    }

    /// Rewrite each received frame in place before it is handed out (a peer quirk, such
    /// as VPNKit clients leaving IPv4 header checksums to an "offload").
    pub fn set_fixup(&mut self, f: fn(&mut [u8])) {
        self.fixup = Some(f);
    }

    /// A connection whose first bytes (read during a handshake) are already frames.
    pub fn with_initial(io: S, framing: Framing, initial: &[u8]) -> Self {
        let mut p = Self::new(io, framing);
        p.codec.feed(initial);
        p
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    pub fn into_inner(self) -> S {
        self.io
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FramedPort<S> {
    fn poll_recv_frames(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.closed {
            return Poll::Ready(Ok(self.codec.has_frame()));
        }
        match poll_fill(&mut self.io, cx, &mut self.codec) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => {
                if let Some(f) = self.fixup {
                    self.codec.visit_new(f);
                }
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(ReadEnd::Eof)) => {
                self.closed = true;
                if self.codec.partial() > 0 {
                    tracing::debug!(bytes = self.codec.partial(), "EOF inside a frame");
                }
                Poll::Ready(Ok(self.codec.has_frame()))
            }
            Poll::Ready(Err(ReadEnd::Invalid(len))) => {
                self.closed = true;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "invalid frame length {len} (must be {MIN_FRAME}..={})",
                        self.codec.framing.max_frame()
                    ),
                )))
            }
            Poll::Ready(Err(ReadEnd::Io(e))) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Port for FramedPort<S> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        self.poll_recv_frames(cx)
    }

    fn peek_frame(&self) -> Option<&[u8]> {
        self.codec.peek_frame()
    }

    fn pop_frame(&mut self) {
        self.codec.pop_frame()
    }

    fn send_frame(&mut self, frame: &[u8]) -> bool {
        self.codec.queue(frame)
    }

    fn pending(&self) -> usize {
        self.codec.pending()
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_drain(&mut self.io, cx, &mut self.codec)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameTransport for FramedPort<S> {
    async fn recv(&mut self) -> io::Result<bool> {
        poll_fn(|cx| self.poll_recv_frames(cx)).await
    }

    fn next_frame(&mut self) -> Option<&[u8]> {
        self.codec.next_frame()
    }

    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        if !self.codec.queue(frame) {
            tracing::debug!(len = frame.len(), "dropping a frame of invalid size");
        }
        Ok(())
    }

    fn pending(&self) -> usize {
        self.codec.pending()
    }

    async fn flush(&mut self) -> io::Result<()> {
        drain(&mut self.io, &mut self.codec).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(framing: Framing, frames: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in frames {
            framing.encode(f.len(), &mut v);
            v.extend_from_slice(f);
        }
        v
    }

    fn drain_frames(c: &mut FrameCodec) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        if c.scan() == Scan::Ready {
            while let Some(f) = c.next_frame() {
                got.push(f.to_vec());
            }
        }
        got
    }

    #[test]
    fn both_framings_byte_by_byte() {
        for framing in [Framing::U32Be, Framing::U16Le] {
            let a = [1u8; 14];
            let b = [2u8; 100];
            let w = wire(framing, &[&a, &b]);
            let mut c = FrameCodec::new(framing, 0);
            let mut got = Vec::new();
            for byte in &w {
                c.feed(std::slice::from_ref(byte));
                got.extend(drain_frames(&mut c));
            }
            assert_eq!(got, vec![a.to_vec(), b.to_vec()], "{framing:?}");
            assert_eq!(c.partial(), 0);
        }
    }

    #[test]
    fn u16le_is_little_endian_on_the_wire() {
        let mut c = FrameCodec::new(Framing::U16Le, 0);
        assert!(c.queue(&[9u8; 300]));
        assert_eq!(&c.tx_bytes()[..2], &[0x2c, 0x01]);
        assert_eq!(c.pending(), 302);
        let mut c = FrameCodec::new(Framing::U32Be, 0);
        assert!(c.queue(&[9u8; 300]));
        assert_eq!(&c.tx_bytes()[..4], &[0, 0, 1, 0x2c]);
    }

    #[test]
    fn short_read_inside_the_header() {
        // One byte of a u16 header, then the rest: nothing until complete.
        let mut c = FrameCodec::new(Framing::U16Le, 0);
        let w = wire(Framing::U16Le, &[&[5u8; 60]]);
        c.feed(&w[..1]);
        assert_eq!(c.scan(), Scan::NeedMore);
        c.feed(&w[1..2]);
        assert_eq!(c.scan(), Scan::NeedMore);
        c.feed(&w[2..]);
        assert_eq!(drain_frames(&mut c), vec![vec![5u8; 60]]);
        // Three bytes of a u32 header.
        let mut c = FrameCodec::new(Framing::U32Be, 0);
        let w = wire(Framing::U32Be, &[&[6u8; 60]]);
        c.feed(&w[..3]);
        assert_eq!(c.scan(), Scan::NeedMore);
        c.feed(&w[3..]);
        assert_eq!(drain_frames(&mut c), vec![vec![6u8; 60]]);
    }

    #[test]
    fn maximal_frames_pass_and_one_more_byte_is_refused() {
        for framing in [Framing::U32Be, Framing::U16Le] {
            let max = framing.max_frame();
            let big = vec![4u8; max];
            let small = [3u8; 14];
            // Small first so that the big one straddles a compaction.
            let w = wire(framing, &[&small, &big]);
            let mut c = FrameCodec::new(framing, 0);
            let first = framing.header_len() + 14 + 1000;
            c.feed(&w[..first]);
            assert_eq!(drain_frames(&mut c), vec![small.to_vec()]);
            let mut off = first;
            while off < w.len() {
                off += c.feed(&w[off..]);
            }
            let got = drain_frames(&mut c);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].len(), max);
            assert!(c.queue(&big));
            assert!(!c.queue(&vec![0u8; max + 1]));
            assert!(!c.queue(&[0u8; 13]));
        }
        let mut c = FrameCodec::new(Framing::U32Be, 0);
        c.feed(&((Framing::U32Be.max_frame() + 1) as u32).to_be_bytes());
        assert_eq!(
            c.scan(),
            Scan::Invalid(Framing::U32Be.max_frame() as u32 + 1)
        );
    }

    #[test]
    fn bad_lengths_after_good_frames() {
        for framing in [Framing::U32Be, Framing::U16Le] {
            let a = [7u8; 20];
            let mut w = wire(framing, &[&a]);
            framing.encode(13, &mut w);
            let mut c = FrameCodec::new(framing, 0);
            c.feed(&w);
            assert_eq!(c.scan(), Scan::Ready);
            assert_eq!(c.next_frame(), Some(&a[..]));
            assert_eq!(c.next_frame(), None);
            assert_eq!(c.scan(), Scan::Invalid(13));
        }
    }

    #[test]
    fn each_frame_is_visited_once_across_compactions() {
        let mut c = FrameCodec::new(Framing::U16Le, 0);
        let mut seen = 0usize;
        let small = [1u8; 14];
        let big = vec![2u8; Framing::U16Le.max_frame()];
        let w = wire(Framing::U16Le, &[&small, &big, &small]);
        let mut off = 0;
        let mut got = 0;
        while off < w.len() {
            off += c.feed(&w[off..(off + 7000).min(w.len())]);
            if c.scan() == Scan::Ready {
                c.visit_new(|f| {
                    seen += 1;
                    f[0] = 9;
                });
                while let Some(f) = c.next_frame() {
                    assert_eq!(f[0], 9);
                    got += 1;
                }
            }
        }
        assert_eq!((seen, got), (3, 3));
    }

    #[tokio::test]
    async fn framed_port_over_a_socket_pair() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let mut p = FramedPort::new(a, Framing::U16Le);
        let w = wire(Framing::U16Le, &[&[1u8; 14], &[2u8; 42]]);
        b.write_all(&w).await.unwrap();
        assert!(FrameTransport::recv(&mut p).await.unwrap());
        assert_eq!(FrameTransport::next_frame(&mut p), Some(&[1u8; 14][..]));
        assert_eq!(FrameTransport::next_frame(&mut p), Some(&[2u8; 42][..]));
        FrameTransport::send_frame(&mut p, &[3u8; 20]).unwrap();
        FrameTransport::flush(&mut p).await.unwrap();
        let mut got = [0u8; 22];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..2], &[20, 0]);
        drop(b);
        assert!(!FrameTransport::recv(&mut p).await.unwrap());
    }
}
