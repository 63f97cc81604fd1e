//! QEMU `-netdev stream` / passt framing on a UNIX stream socket.
//!
//! Each frame on the wire is a 32-bit big-endian length followed by that many bytes of
//! Ethernet frame (no FCS). This is the protocol of QEMU's `-netdev stream` (and of the
//! older `-net socket`), of passt, and of libkrun/krunvm's passt mode. The codec itself
//! lives in [`crate::framing`], shared with the other length-prefixed framings.
//!
//! [`StreamTransport`] owns a listening socket and serves at most one guest connection at a
//! time; a newer connection replaces the old one (QEMU reconnects after a restart).
//! [`FramedStream`] is the same framing over any one connected byte stream.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};

use crate::framing::{drain, fill, FrameCodec, FramedPort, Framing, ReadEnd};
use crate::transport::FrameTransport;

pub use crate::framing::{DEFAULT_RX_BUFFER, MIN_FRAME};

/// Largest frame accepted on the wire: a 65535-byte payload plus the Ethernet header.
pub const MAX_FRAME: usize = Framing::U32Be.max_frame();
/// Size of the length prefix.
pub const HEADER_LEN: usize = Framing::U32Be.header_len();

/// QEMU-framed Ethernet frames over one connected byte stream.
///
/// `recv` returns `Ok(false)` on a clean EOF and an `InvalidData` error on a framing
/// error; there is no reconnecting (see [`StreamTransport`] for that).
#[derive(Debug)]
pub struct FramedStream<S>(FramedPort<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> FramedStream<S> {
    /// Wrap a connected stream with the default receive buffer size.
    pub fn new(io: S) -> Self {
        Self::with_buffer(io, DEFAULT_RX_BUFFER)
    }

    /// Wrap a connected stream; the receive buffer is at least one maximal frame.
    pub fn with_buffer(io: S, rx_size: usize) -> Self {
        FramedStream(FramedPort::with_buffer(io, Framing::U32Be, rx_size))
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.0.get_ref()
    }

    /// The underlying stream, mutably (reading from it directly breaks the framing).
    pub fn get_mut(&mut self) -> &mut S {
        self.0.get_mut()
    }

    /// Give back the stream, discarding anything buffered.
    pub fn into_inner(self) -> S {
        self.0.into_inner()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameTransport for FramedStream<S> {
    async fn recv(&mut self) -> io::Result<bool> {
        self.0.recv().await
    }

    fn next_frame(&mut self) -> Option<&[u8]> {
        FrameTransport::next_frame(&mut self.0)
    }

    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        FrameTransport::send_frame(&mut self.0, frame)
    }

    fn pending(&self) -> usize {
        FrameTransport::pending(&self.0)
    }

    async fn flush(&mut self) -> io::Result<()> {
        FrameTransport::flush(&mut self.0).await
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
            codec: FrameCodec::new(Framing::U32Be, rx_size),
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
            if self.codec.has_frame() {
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
            self.codec.clear_tx();
            return Ok(());
        };
        if let Err(e) = drain(conn, &mut self.codec).await {
            tracing::warn!(path = %self.listener.path.display(), "write error: {e}; dropping the connection");
            self.disconnect();
        }
        Ok(())
    }
}
