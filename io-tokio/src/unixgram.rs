//! vfkit / libkrun style UNIX datagram transport: one bare Ethernet frame per datagram.
//!
//! The server binds a datagram socket; the VMM binds its own and sends to ours. The
//! peer's address is learnt from the datagrams it sends (the latest sender wins, so a
//! restarted VMM with a new socket is followed). A 4-byte `VFKT` datagram is vfkit's
//! legacy hello and is consumed. As in gvisor-tap-vsock, the socket gets large buffers
//! (1 MiB send, 4 MiB receive) and a send that fails with `ENOBUFS` (the peer's queue
//! is full) is retried shortly after rather than dropped.

use std::future::Future;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::ReadBuf;
use tokio::net::UnixDatagram;

use crate::framing::MIN_FRAME;
use crate::transport::Port;

/// vfkit's legacy hello datagram.
pub const VFKT_MAGIC: &[u8; 4] = b"VFKT";
/// Largest datagram taken as a frame.
pub const MAX_DGRAM: usize = 65535;
const RX_BUFFER: usize = 256 * 1024;
const SNDBUF: usize = 1 << 20;
const RCVBUF: usize = 4 << 20;
/// Pause before retrying a send that failed with ENOBUFS.
const ENOBUFS_RETRY: Duration = Duration::from_millis(1);

/// What one received datagram is.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram {
    /// vfkit's hello: consumed.
    Magic,
    /// Shorter than an Ethernet header: dropped.
    Runt,
    /// An Ethernet frame.
    Frame,
}

/// Classify a received datagram.
pub fn classify(d: &[u8]) -> Datagram {
    if d == VFKT_MAGIC {
        Datagram::Magic
    } else if d.len() < MIN_FRAME {
        Datagram::Runt
    } else {
        Datagram::Frame
    }
}

/// Bind a datagram socket at `path`, replacing a stale socket file (not anything else).
pub fn bind(path: &Path) -> io::Result<UnixDatagram> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: the path exists and is not a socket", path.display()),
            ));
        }
        // A datagram socket cannot be probed like a listener: the VMM binds its own
        // end, so whatever is at our path is ours from an earlier run.
        std::fs::remove_file(path)?;
    }
    let sock = UnixDatagram::bind(path)?;
    let r = socket2::SockRef::from(&sock);
    // Best effort: the kernel caps them at net.core.[rw]mem_max.
    let _ = r.set_send_buffer_size(SNDBUF);
    let _ = r.set_recv_buffer_size(RCVBUF);
    Ok(sock)
}

/// A datagram socket serving one VMM as a switch port.
pub struct DgramPort {
    sock: UnixDatagram,
    path: PathBuf,
    peer: Option<PathBuf>,
    /// Received frames, each as a u16 LE length and the bytes: `rx[start..end]`.
    rx: Box<[u8]>,
    start: usize,
    end: usize,
    /// Frames to send, same layout.
    tx: Vec<u8>,
    tx_off: usize,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counters for the log.
    pub runts: u64,
    pub enobufs: u64,
}

impl DgramPort {
    pub fn new(sock: UnixDatagram, path: PathBuf) -> Self {
        DgramPort {
            sock,
            path,
            peer: None,
            rx: vec![0u8; RX_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            tx: Vec::new(),
            tx_off: 0,
            retry: None,
            runts: 0,
            enobufs: 0,
        }
    }

    /// The address frames go to (learnt from the peer's datagrams).
    pub fn peer(&self) -> Option<&Path> {
        self.peer.as_deref()
    }

    fn frame_at(&self, at: usize) -> (usize, usize) {
        let len = usize::from(u16::from_le_bytes([self.rx[at], self.rx[at + 1]]));
        (at + 2, len)
    }
}

impl Port for DgramPort {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        loop {
            // Room for a maximal datagram and its length, or stop taking more.
            if self.rx.len() - self.end < MAX_DGRAM + 2 {
                break;
            }
            let at = self.end;
            let mut rb = ReadBuf::new(&mut self.rx[at + 2..at + 2 + MAX_DGRAM]);
            match self.sock.poll_recv_from(cx, &mut rb) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(from)) => {
                    let n = rb.filled().len();
                    match from.as_pathname() {
                        Some(p) if self.peer.as_deref() != Some(p) => {
                            tracing::info!(socket = %self.path.display(), peer = %p.display(), "datagram peer learnt");
                            self.peer = Some(p.to_owned());
                        }
                        Some(_) => {}
                        None if self.peer.is_none() => {
                            tracing::warn!(socket = %self.path.display(), "a datagram from an unnamed socket: no way to answer it")
                        }
                        None => {}
                    }
                    match classify(&self.rx[at + 2..at + 2 + n]) {
                        Datagram::Magic => {
                            tracing::debug!(socket = %self.path.display(), "vfkit hello consumed")
                        }
                        Datagram::Runt => self.runts += 1,
                        Datagram::Frame => {
                            self.rx[at..at + 2].copy_from_slice(&(n as u16).to_le_bytes());
                            self.end = at + 2 + n;
                        }
                    }
                }
            }
        }
        if self.start < self.end {
            Poll::Ready(Ok(true))
        } else {
            Poll::Pending
        }
    }

    fn peek_frame(&self) -> Option<&[u8]> {
        if self.start >= self.end {
            return None;
        }
        let (s, len) = self.frame_at(self.start);
        Some(&self.rx[s..s + len])
    }

    fn pop_frame(&mut self) {
        if self.start < self.end {
            let (s, len) = self.frame_at(self.start);
            self.start = s + len;
        }
    }

    fn send_frame(&mut self, frame: &[u8]) -> bool {
        if self.peer.is_none() || frame.len() < MIN_FRAME || frame.len() > MAX_DGRAM {
            return false;
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        self.tx
            .extend_from_slice(&(frame.len() as u16).to_le_bytes());
        self.tx.extend_from_slice(frame);
        true
    }

    fn pending(&self) -> usize {
        self.tx.len() - self.tx_off
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(t) = self.retry.as_mut() {
            if t.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.retry = None;
        }
        let Some(peer) = self.peer.clone() else {
            self.tx.clear();
            self.tx_off = 0;
            return Poll::Ready(Ok(()));
        };
        while self.tx_off < self.tx.len() {
            let o = self.tx_off;
            let len = usize::from(u16::from_le_bytes([self.tx[o], self.tx[o + 1]]));
            let frame = &self.tx[o + 2..o + 2 + len];
            match self.sock.poll_send_to(cx, frame, &peer) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(_)) => self.tx_off = o + 2 + len,
                Poll::Ready(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.enobufs += 1;
                    let mut t = Box::pin(tokio::time::sleep(ENOBUFS_RETRY));
                    if t.as_mut().poll(cx).is_pending() {
                        self.retry = Some(t);
                        return Poll::Pending;
                    }
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => {
                    // The peer went away (its socket file is gone): forget it and drop
                    // what was queued; it is learnt again from its next datagram.
                    tracing::info!(socket = %self.path.display(), peer = %peer.display(), "send failed: {e}; waiting for the peer to come back");
                    self.peer = None;
                    self.tx.clear();
                    self.tx_off = 0;
                    return Poll::Ready(Ok(()));
                }
            }
        }
        self.tx.clear();
        self.tx_off = 0;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[test]
    fn datagrams_are_classified() {
        assert_eq!(classify(b"VFKT"), Datagram::Magic);
        assert_eq!(classify(b"VFK"), Datagram::Runt);
        assert_eq!(classify(&[0u8; 13]), Datagram::Runt);
        assert_eq!(classify(&[0u8; 14]), Datagram::Frame);
    }

    #[tokio::test]
    async fn magic_consumed_peer_learnt_frames_both_ways() {
        let dir = std::env::temp_dir().join(format!("usernet-dgram-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let srv = dir.join("srv.sock");
        let cli = dir.join("cli.sock");
        let _ = std::fs::remove_file(&cli);
        let mut port = DgramPort::new(bind(&srv).unwrap(), srv.clone());
        let peer = UnixDatagram::bind(&cli).unwrap();
        // Nothing to answer yet: frames for the guest are refused.
        assert!(!port.send_frame(&[1u8; 60]));
        peer.send_to(b"VFKT", &srv).await.unwrap();
        peer.send_to(&[7u8; 5], &srv).await.unwrap();
        let max = vec![9u8; MAX_DGRAM];
        peer.send_to(&[8u8; 60], &srv).await.unwrap();
        peer.send_to(&max, &srv).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            assert!(poll_fn(|cx| port.poll_recv(cx)).await.unwrap());
            while let Some(f) = port.peek_frame() {
                got.push(f.to_vec());
                port.pop_frame();
            }
        }
        assert_eq!(got[0], vec![8u8; 60]);
        assert_eq!(got[1].len(), MAX_DGRAM);
        assert_eq!(port.runts, 1);
        assert_eq!(port.peer(), Some(cli.as_path()));
        assert!(port.send_frame(&[3u8; 42]));
        poll_fn(|cx| port.poll_flush(cx)).await.unwrap();
        let mut buf = vec![0u8; 70000];
        let n = peer.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &[3u8; 42]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
