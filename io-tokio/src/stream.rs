//! QEMU `-netdev stream` / passt framing on a UNIX stream socket.
//!
//! Each frame on the wire is a 32-bit big-endian length followed by that many bytes of
//! Ethernet frame (no FCS). This is the protocol of QEMU's `-netdev stream` (and of the
//! older `-net socket`), of passt, and of libkrun/krunvm's passt mode.
//!
//! [`StreamTransport`] owns a listening socket and serves at most one guest connection at a
//! time; a newer connection replaces the old one (QEMU reconnects after a restart).
//! [`FramedStream`] is the same framing over any one connected byte stream.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::transport::FrameTransport;

/// Smallest frame accepted on the wire: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Largest frame accepted on the wire: a 65535-byte payload plus the Ethernet header.
pub const MAX_FRAME: usize = 65535 + 14;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;
/// Default size of the receive buffer.
pub const DEFAULT_RX_BUFFER: usize = 256 * 1024;

/// Receive and send state of the length-prefixed framing, independent of the byte stream.
///
/// The receive buffer holds `buf[start..end]` of unconsumed bytes; `buf[start..parsed]`
/// is a run of complete, validated frames that [`FrameCodec::next_frame`] hands out.
#[derive(Debug)]
struct FrameCodec {
    rx: Box<[u8]>,
    start: usize,
    parsed: usize,
    end: usize,
    tx: Vec<u8>,
    tx_off: usize,
}

/// What the receive buffer holds after [`FrameCodec::scan`].
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// At least one complete frame can be handed out.
    Ready,
    /// More bytes are needed.
    NeedMore,
    /// The next frame header carries an invalid length.
    Invalid(u32),
}

impl FrameCodec {
    fn new(rx_size: usize) -> Self {
        // Always room for one maximal frame with its header.
        let size = rx_size.max(MAX_FRAME + HEADER_LEN);
        FrameCodec {
            rx: vec![0u8; size].into_boxed_slice(),
            start: 0,
            parsed: 0,
            end: 0,
            tx: Vec::new(),
            tx_off: 0,
        }
    }

    fn reset(&mut self) {
        self.start = 0;
        self.parsed = 0;
        self.end = 0;
        self.tx.clear();
        self.tx_off = 0;
    }

    /// Extend the run of complete frames as far as the buffered bytes allow.
    fn scan(&mut self) -> Scan {
        loop {
            let avail = self.end - self.parsed;
            if avail < HEADER_LEN {
                break;
            }
            let hdr = &self.rx[self.parsed..self.parsed + HEADER_LEN];
            let len = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            if (len as usize) < MIN_FRAME || (len as usize) > MAX_FRAME {
                if self.parsed > self.start {
                    // Hand out the good frames first; the error surfaces on the next scan.
                    return Scan::Ready;
                }
                return Scan::Invalid(len);
            }
            if avail < HEADER_LEN + len as usize {
                break;
            }
            self.parsed += HEADER_LEN + len as usize;
        }
        if self.parsed > self.start {
            Scan::Ready
        } else {
            Scan::NeedMore
        }
    }

    /// Make room at the tail of the receive buffer for the next read. Only moves the
    /// (partial) unconsumed bytes when the free tail could not hold a maximal frame.
    fn prepare_read(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.parsed = 0;
            self.end = 0;
        } else if self.rx.len() - self.end < MAX_FRAME + HEADER_LEN && self.start > 0 {
            self.rx.copy_within(self.start..self.end, 0);
            self.parsed -= self.start;
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.rx[self.end..]
    }

    fn next_frame(&mut self) -> Option<&[u8]> {
        if self.start >= self.parsed {
            return None;
        }
        let s = self.start;
        let len = u32::from_be_bytes([self.rx[s], self.rx[s + 1], self.rx[s + 2], self.rx[s + 3]])
            as usize;
        self.start = s + HEADER_LEN + len;
        Some(&self.rx[s + HEADER_LEN..s + HEADER_LEN + len])
    }

    /// Bytes of an incomplete frame still buffered (for EOF diagnostics).
    fn partial(&self) -> usize {
        self.end - self.parsed
    }

    fn queue(&mut self, frame: &[u8]) -> bool {
        if frame.len() < MIN_FRAME || frame.len() > MAX_FRAME {
            return false;
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        self.tx
            .extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.tx.extend_from_slice(frame);
        true
    }

    fn pending(&self) -> usize {
        self.tx.len() - self.tx_off
    }
}

/// Why reading from a connection stopped.
#[derive(Debug)]
enum ReadEnd {
    Eof,
    Invalid(u32),
    Io(io::Error),
}

/// Read until at least one complete frame is buffered. Cancel-safe: the only await is a
/// `read`, which either completes or transfers nothing; all state lives in `codec`.
async fn fill<S: AsyncRead + Unpin>(io: &mut S, codec: &mut FrameCodec) -> Result<(), ReadEnd> {
    loop {
        match codec.scan() {
            Scan::Ready => return Ok(()),
            Scan::Invalid(len) => return Err(ReadEnd::Invalid(len)),
            Scan::NeedMore => {}
        }
        let buf = codec.prepare_read();
        match io.read(buf).await {
            Ok(0) => return Err(ReadEnd::Eof),
            Ok(n) => codec.end += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadEnd::Io(e)),
        }
    }
}

/// Write out the queued bytes. Cancel-safe: progress is recorded after every `write`.
async fn drain<S: AsyncWrite + Unpin>(io: &mut S, codec: &mut FrameCodec) -> io::Result<()> {
    while codec.tx_off < codec.tx.len() {
        match io.write(&codec.tx[codec.tx_off..]).await {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => codec.tx_off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    codec.tx.clear();
    codec.tx_off = 0;
    io.flush().await
}

/// Length-prefixed Ethernet frames over one connected byte stream.
///
/// `recv` returns `Ok(false)` on a clean EOF and an `InvalidData` error on a framing
/// error; there is no reconnecting (see [`StreamTransport`] for that).
#[derive(Debug)]
pub struct FramedStream<S> {
    io: S,
    codec: FrameCodec,
    closed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FramedStream<S> {
    /// Wrap a connected stream with the default receive buffer size.
    pub fn new(io: S) -> Self {
        Self::with_buffer(io, DEFAULT_RX_BUFFER)
    }

    /// Wrap a connected stream; the receive buffer is at least one maximal frame.
    pub fn with_buffer(io: S, rx_size: usize) -> Self {
        FramedStream {
            io,
            codec: FrameCodec::new(rx_size),
            closed: false,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The underlying stream, mutably (reading from it directly breaks the framing).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// Give back the stream, discarding anything buffered.
    pub fn into_inner(self) -> S {
        self.io
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameTransport for FramedStream<S> {
    async fn recv(&mut self) -> io::Result<bool> {
        if self.closed {
            return Ok(self.codec.start < self.codec.parsed);
        }
        match fill(&mut self.io, &mut self.codec).await {
            Ok(()) => Ok(true),
            Err(ReadEnd::Eof) => {
                self.closed = true;
                if self.codec.partial() > 0 {
                    tracing::debug!(bytes = self.codec.partial(), "EOF inside a frame");
                }
                Ok(self.codec.start < self.codec.parsed)
            }
            Err(ReadEnd::Invalid(len)) => {
                self.closed = true;
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("invalid frame length {len} (must be {MIN_FRAME}..={MAX_FRAME})"),
                ))
            }
            Err(ReadEnd::Io(e)) => Err(e),
        }
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

/// A listening UNIX stream socket; the socket file is removed on drop.
#[derive(Debug)]
pub struct StreamListener {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created, so that drop never removes a file
    /// that somebody else has put at the same path since.
    ident: Option<(u64, u64)>,
}

/// Create a listening UNIX stream socket at `path` with the given listen backlog.
///
/// A stale socket file (nobody accepts connections on it) is replaced; a live one, or a
/// path that is not a socket, is an error. Must be called within a tokio runtime.
pub fn bind(path: &Path, backlog: u32) -> io::Result<StreamListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "cannot listen on {}: the path exists and is not a socket",
                        path.display()
                    ),
                ));
            }
            match StdUnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "cannot listen on {}: address in use (another process is listening on it)",
                            path.display()
                        ),
                    ));
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    tracing::info!(path = %path.display(), "removing stale socket");
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(io::Error::new(
                                e.kind(),
                                format!("cannot remove stale socket {}: {e}", path.display()),
                            ))
                        }
                    }
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "cannot listen on {}: probing the existing socket: {e}",
                            path.display()
                        ),
                    ));
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            ));
        }
    }

    let ctx = |what: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {what}: {e}", path.display()),
        )
    };
    let addr = socket2::SockAddr::unix(path).map_err(|e| ctx("bad socket path", e))?;
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(|e| ctx("socket", e))?;
    sock.bind(&addr).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            ctx("address in use", e)
        } else {
            ctx("bind", e)
        }
    })?;
    let ident = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let result = (|| {
        sock.listen(backlog.min(i32::MAX as u32) as i32)
            .map_err(|e| ctx("listen", e))?;
        sock.set_nonblocking(true)
            .map_err(|e| ctx("set_nonblocking", e))?;
        let std_listener: std::os::unix::net::UnixListener = sock.into();
        UnixListener::from_std(std_listener).map_err(|e| ctx("registering with tokio", e))
    })();
    match result {
        Ok(listener) => Ok(StreamListener {
            listener,
            path: path.to_owned(),
            ident,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

impl StreamListener {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept one connection (cancel-safe).
    pub async fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(s, _)| s)
    }
}

impl Drop for StreamListener {
    fn drop(&mut self) {
        let ours = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => self.ident.is_none_or(|id| id == (m.dev(), m.ino())),
            Err(_) => false,
        };
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Accept errors that concern one connection attempt or a passing resource shortage,
/// not the listener itself.
fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPERM
        )
    )
}

/// The QEMU `-netdev stream` / passt transport: a listener plus at most one connection.
#[derive(Debug)]
pub struct StreamTransport {
    listener: StreamListener,
    conn: Option<UnixStream>,
    codec: FrameCodec,
    connections: u64,
}

impl StreamTransport {
    /// Serve guests connecting to `listener`, with the default receive buffer.
    pub fn new(listener: StreamListener) -> Self {
        Self::with_buffer(listener, DEFAULT_RX_BUFFER)
    }

    /// Serve guests connecting to `listener`; the receive buffer holds at least one
    /// maximal frame.
    pub fn with_buffer(listener: StreamListener, rx_size: usize) -> Self {
        StreamTransport {
            listener,
            conn: None,
            codec: FrameCodec::new(rx_size),
            connections: 0,
        }
    }

    /// The listener.
    pub fn listener(&self) -> &StreamListener {
        &self.listener
    }

    /// Whether a guest is currently connected.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Number of connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    fn install(&mut self, conn: UnixStream) {
        if self.conn.is_some() {
            tracing::info!(path = %self.listener.path.display(), "new connection replaces the current one");
        } else {
            tracing::info!(path = %self.listener.path.display(), "guest connected");
        }
        self.codec.reset();
        self.conn = Some(conn);
        self.connections += 1;
    }

    fn disconnect(&mut self) {
        self.conn = None;
        self.codec.reset();
    }

    async fn accept_one(&mut self) -> io::Result<()> {
        loop {
            match self.listener.listener.accept().await {
                Ok((conn, _)) => {
                    self.install(conn);
                    return Ok(());
                }
                Err(e) if accept_error_is_transient(&e) => {
                    tracing::warn!(path = %self.listener.path.display(), "accept failed: {e}");
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("accepting on {}: {e}", self.listener.path.display()),
                    ))
                }
            }
        }
    }
}

impl FrameTransport for StreamTransport {
    async fn recv(&mut self) -> io::Result<bool> {
        loop {
            if self.codec.start < self.codec.parsed {
                return Ok(true);
            }
            let Some(conn) = self.conn.as_mut() else {
                self.accept_one().await?;
                continue;
            };
            let listener = &self.listener.listener;
            let codec = &mut self.codec;
            // Both branches are cancel-safe: `fill` keeps its progress in `codec`.
            let outcome = tokio::select! {
                biased;
                r = fill(conn, codec) => Ok(r),
                a = listener.accept() => Err(a),
            };
            match outcome {
                Ok(Ok(())) => return Ok(true),
                Ok(Err(end)) => {
                    let path = self.listener.path.display();
                    match end {
                        ReadEnd::Eof if self.codec.partial() == 0 => {
                            tracing::info!(path = %path, "guest disconnected")
                        }
                        ReadEnd::Eof => tracing::warn!(
                            path = %path,
                            bytes = self.codec.partial(),
                            "guest disconnected in the middle of a frame"
                        ),
                        ReadEnd::Invalid(len) => tracing::warn!(
                            path = %path,
                            "protocol error: invalid frame length {len} (must be {MIN_FRAME}..={MAX_FRAME}); dropping the connection"
                        ),
                        ReadEnd::Io(e) => {
                            tracing::warn!(path = %path, "read error: {e}; dropping the connection")
                        }
                    }
                    self.disconnect();
                }
                Err(Ok((conn, _))) => self.install(conn),
                Err(Err(e)) if accept_error_is_transient(&e) => {
                    tracing::warn!(path = %self.listener.path.display(), "accept failed: {e}");
                }
                Err(Err(e)) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("accepting on {}: {e}", self.listener.path.display()),
                    ))
                }
            }
        }
    }

    fn next_frame(&mut self) -> Option<&[u8]> {
        self.codec.next_frame()
    }

    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.conn.is_none() {
            tracing::debug!(len = frame.len(), "no guest connected; dropping a frame");
        } else if !self.codec.queue(frame) {
            tracing::debug!(len = frame.len(), "dropping a frame of invalid size");
        }
        Ok(())
    }

    fn pending(&self) -> usize {
        self.codec.pending()
    }

    async fn flush(&mut self) -> io::Result<()> {
        let Some(conn) = self.conn.as_mut() else {
            self.codec.tx.clear();
            self.codec.tx_off = 0;
            return Ok(());
        };
        if let Err(e) = drain(conn, &mut self.codec).await {
            tracing::warn!(path = %self.listener.path.display(), "write error: {e}; dropping the connection");
            self.disconnect();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(frames: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in frames {
            v.extend_from_slice(&(f.len() as u32).to_be_bytes());
            v.extend_from_slice(f);
        }
        v
    }

    fn feed(c: &mut FrameCodec, bytes: &[u8]) {
        let buf = c.prepare_read();
        buf[..bytes.len()].copy_from_slice(bytes);
        c.end += bytes.len();
    }

    #[test]
    fn codec_byte_by_byte() {
        let a = [1u8; 14];
        let b = [2u8; 100];
        let w = wire(&[&a, &b]);
        let mut c = FrameCodec::new(0);
        let mut got = Vec::new();
        for byte in &w {
            feed(&mut c, std::slice::from_ref(byte));
            if c.scan() == Scan::Ready {
                while let Some(f) = c.next_frame() {
                    got.push(f.to_vec());
                }
            }
        }
        assert_eq!(got, vec![a.to_vec(), b.to_vec()]);
        assert_eq!(c.start, c.end);
    }

    #[test]
    fn codec_rejects_bad_lengths_after_good_frames() {
        let a = [7u8; 20];
        let mut w = wire(&[&a]);
        w.extend_from_slice(&13u32.to_be_bytes());
        let mut c = FrameCodec::new(0);
        feed(&mut c, &w);
        assert_eq!(c.scan(), Scan::Ready);
        assert_eq!(c.next_frame(), Some(&a[..]));
        assert_eq!(c.next_frame(), None);
        assert_eq!(c.scan(), Scan::Invalid(13));
        let mut c = FrameCodec::new(0);
        feed(&mut c, &((MAX_FRAME + 1) as u32).to_be_bytes());
        assert_eq!(c.scan(), Scan::Invalid((MAX_FRAME + 1) as u32));
    }

    #[test]
    fn codec_compacts_for_max_frames() {
        // Small buffer: exactly one maximal frame plus header; force compaction.
        let mut c = FrameCodec::new(0);
        let small = [3u8; 14];
        let big = vec![4u8; MAX_FRAME];
        let w = wire(&[&small, &big]);
        // Feed the small frame and the first part of the big one.
        let first = HEADER_LEN + 14 + 1000;
        feed(&mut c, &w[..first]);
        assert_eq!(c.scan(), Scan::Ready);
        assert_eq!(c.next_frame(), Some(&small[..]));
        assert_eq!(c.scan(), Scan::NeedMore);
        feed(&mut c, &w[first..]);
        assert_eq!(c.scan(), Scan::Ready);
        assert_eq!(c.next_frame().map(<[u8]>::len), Some(MAX_FRAME));
    }

    #[test]
    fn codec_tx() {
        let mut c = FrameCodec::new(0);
        assert!(!c.queue(&[0u8; 13]));
        assert!(!c.queue(&vec![0u8; MAX_FRAME + 1]));
        assert!(c.queue(&[9u8; 14]));
        assert_eq!(c.pending(), 18);
        assert_eq!(&c.tx[..4], &14u32.to_be_bytes());
    }
}
