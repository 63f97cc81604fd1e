//! `usernet guest`: the helper that runs inside a guest (or a network namespace standing
//! in for one), creates a TAP device and carries its frames to the daemon over a UNIX or
//! vsock stream. It does the job of VPNKit's `vpnkit-tap-vsockd` and gvisor-tap-vsock's
//! `gvforwarder`.
//!
//! The daemon side is any stream listener with the same framing: `usernet stream`
//! (QEMU's u32 big-endian length, the default here) or a u16 little-endian listener
//! (gvisor-tap-vsock's vsock and stdio framing). The helper only moves frames: addressing
//! is left to the guest's own DHCP client, the helper just sets the TAP's MTU and brings
//! it up.
//!
//! When the connection drops (the daemon restarts, a framing error) the helper connects
//! again with a bounded exponential backoff. Frames the guest sends meanwhile are read and
//! dropped, like a NIC whose cable is out, so that stale frames do not pile up in the TAP
//! queue and the TAP itself stays up with its addresses and routes.
//!
//! Frame path: the TAP is read in batches ([`crate::tap::TapTransport`]), frames are
//! appended with their length prefix to one reused send buffer that is written with as
//! few `write`s as the socket allows; the daemon's bytes are read in large chunks into one
//! reused receive buffer and cut into frames in place. Nothing is allocated per frame.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::tap::{open_tap, os_msg, IfReq, TapTransport};
use crate::transport::FrameTransport;

/// Smallest frame carried: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Bytes queued towards the daemon before the TAP is no longer read (backpressure: the
/// TAP's own queue then fills and the kernel drops, as a NIC would).
const TX_HIGH_WATER: usize = 256 * 1024;
/// Size of the receive buffer: many frames per `read`, at least one maximal frame.
const RX_BUFFER: usize = 256 * 1024;
/// A connection attempt that has not completed by then counts as failed (a vsock peer
/// that never answers; a UNIX connect does not wait).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Socket buffers asked for (the kernel caps them at `net.core.[rw]mem_max`).
const SOCKET_BUFFER: usize = 1 << 20;
/// The first wait before connecting again.
const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Where the daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:PATH`: a UNIX stream socket.
    Unix(PathBuf),
    /// `vsock://CID:PORT`: AF_VSOCK (CID 2 is the host).
    Vsock { cid: u32, port: u32 },
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(format!("{s:?}: the socket path is empty"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s
            .strip_prefix("vsock://")
            .or_else(|| s.strip_prefix("vsock:"))
        {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| format!("{s:?}: expected vsock://CID:PORT"))?;
            let num = |v: &str, what: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("{s:?}: {what} {v:?} is not a number"))
            };
            return Ok(Endpoint::Vsock {
                cid: num(cid, "CID")?,
                port: num(port, "port")?,
            });
        }
        Err(format!(
            "{s:?}: expected unix:PATH or vsock://CID:PORT (CID 2 is the host)"
        ))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
        }
    }
}

/// How frames are delimited on the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Framing {
    /// A u32 big-endian length before each frame: QEMU `-netdev stream`, passt,
    /// `usernet stream`.
    Qemu,
    /// A u16 little-endian length before each frame: gvisor-tap-vsock (vsock, stdio),
    /// VPNKit after its handshake.
    U16le,
}

impl Framing {
    /// The wire format (one codec for the daemon's listeners and this helper).
    pub fn wire(self) -> crate::framing::Framing {
        match self {
            Framing::Qemu => crate::framing::Framing::U32Be,
            Framing::U16le => crate::framing::Framing::U16Le,
        }
    }

    /// Size of the length prefix.
    pub fn header_len(self) -> usize {
        self.wire().header_len()
    }

    /// Largest frame the framing carries (the same bound as the daemon's listeners).
    pub fn max_frame(self) -> usize {
        self.wire().max_frame()
    }

    fn encode(self, len: usize, out: &mut Vec<u8>) {
        self.wire().encode(len, out)
    }

    fn decode(self, hdr: &[u8]) -> usize {
        self.wire().decode(hdr) as usize
    }
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The name the command line uses.
        f.write_str(match self {
            Framing::Qemu => "qemu",
            Framing::U16le => "u16le",
        })
    }
}

/// A length prefix outside `MIN_FRAME..=max_frame`: the stream cannot be trusted past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadLength(pub usize);

/// Bytes read from the daemon, cut into frames in place. Receive and send state are two
/// values here (the daemon's [`crate::framing::FrameCodec`] keeps both in one) because the
/// helper's loop reads into one while writing out of the other in the same `select!`.
#[derive(Debug)]
struct RxBuf {
    framing: Framing,
    buf: Box<[u8]>,
    /// `buf[start..end]` is unconsumed.
    start: usize,
    end: usize,
}

impl RxBuf {
    fn new(framing: Framing, size: usize) -> RxBuf {
        let size = size.max(framing.max_frame() + framing.header_len());
        RxBuf {
            framing,
            buf: vec![0u8; size].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Room for the next read. Moves the (partial) unconsumed bytes to the front only
    /// when the free tail could not hold a maximal frame.
    fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < self.framing.max_frame() + self.framing.header_len()
            && self.start > 0
        {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // Never empty (a zero-length read would look like EOF): the buffer holds a maximal
        // frame with its header, and complete frames are always taken out after a read.
        debug_assert!(self.end < self.buf.len());
        &mut self.buf[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next complete frame, `None` when more bytes are needed.
    fn next_frame(&mut self) -> Result<Option<&[u8]>, BadLength> {
        let h = self.framing.header_len();
        if self.end - self.start < h {
            return Ok(None);
        }
        let len = self.framing.decode(&self.buf[self.start..self.start + h]);
        if !(MIN_FRAME..=self.framing.max_frame()).contains(&len) {
            return Err(BadLength(len));
        }
        if self.end - self.start < h + len {
            return Ok(None);
        }
        let s = self.start + h;
        self.start = s + len;
        Ok(Some(&self.buf[s..s + len]))
    }

    /// Bytes of an incomplete frame still buffered.
    fn partial(&self) -> usize {
        self.end - self.start
    }
}

/// Frames queued for the daemon, each behind its length prefix.
#[derive(Debug)]
struct TxBuf {
    framing: Framing,
    buf: Vec<u8>,
    off: usize,
}

impl TxBuf {
    fn new(framing: Framing) -> TxBuf {
        TxBuf {
            framing,
            buf: Vec::with_capacity(TX_HIGH_WATER + 64 * 1024),
            off: 0,
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.off = 0;
    }

    /// Queue `frame`; false (nothing queued) when the framing cannot carry it.
    fn push(&mut self, frame: &[u8]) -> bool {
        if frame.len() < MIN_FRAME || frame.len() > self.framing.max_frame() {
            return false;
        }
        if self.off == self.buf.len() {
            self.reset();
        }
        self.framing.encode(frame.len(), &mut self.buf);
        self.buf.extend_from_slice(frame);
        true
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.off
    }

    fn unsent(&self) -> &[u8] {
        &self.buf[self.off..]
    }

    fn sent(&mut self, n: usize) {
        self.off = (self.off + n).min(self.buf.len());
        if self.off == self.buf.len() {
            self.reset();
        }
    }
}

/// The `usernet guest` options.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// The daemon: unix:PATH or vsock://CID:PORT (CID 2 is the host).
    #[arg(long, value_name = "ENDPOINT")]
    pub connect: Endpoint,
    /// Name of the TAP device to create (or attach to, if it exists).
    #[arg(long, value_name = "NAME")]
    pub tap: String,
    /// Framing on the stream: `qemu` (u32 big-endian length; `usernet stream`) or `u16le`
    /// (gvisor-tap-vsock's vsock and stdio framing).
    #[arg(long, value_enum, default_value = "qemu")]
    pub framing: Framing,
    /// MTU given to the TAP (match the daemon's --mtu; its DHCP offers it too).
    #[arg(long, default_value_t = crate::cli::DEFAULT_GUEST_MTU, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(68..=65535))]
    pub mtu: u32,
    /// Longest wait between two connection attempts, in milliseconds (the wait doubles
    /// from 100 ms up to this).
    #[arg(long, default_value_t = 2000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub reconnect_max_ms: u64,
}

/// How to reach the daemon.
#[derive(Clone, Debug)]
pub struct GuestOptions {
    pub endpoint: Endpoint,
    pub framing: Framing,
    /// The first wait before connecting again; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl GuestOptions {
    pub fn new(endpoint: Endpoint, framing: Framing) -> Self {
        GuestOptions {
            endpoint,
            framing,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Counters of the helper.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Connections made to the daemon.
    pub connects: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    pub frames_to_daemon: u64,
    pub bytes_to_daemon: u64,
    pub frames_from_daemon: u64,
    pub bytes_from_daemon: u64,
    /// Frames from the TAP dropped while not connected.
    pub dropped_disconnected: u64,
    /// Frames from the TAP too large (or small) for the framing.
    pub dropped_size: u64,
}

/// Why a connection ended.
enum End {
    Stopped,
    TapGone(Option<io::Error>),
    Conn(String),
}

/// Carry frames between `tap` and one connection until it ends.
#[allow(clippy::too_many_arguments)]
async fn pump<T, R, W, S>(
    tap: &mut T,
    rd: &mut R,
    wr: &mut W,
    rx: &mut RxBuf,
    tx: &mut TxBuf,
    stats: &mut GuestStats,
    mut stop: Pin<&mut S>,
) -> End
where
    T: FrameTransport,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: Future<Output = ()>,
{
    loop {
        // Every branch is cancel-safe: a `read` or `write` that loses the race transfers
        // nothing, and the TAP's `recv` keeps what it read.
        tokio::select! {
            _ = stop.as_mut() => return End::Stopped,
            r = wr.write(tx.unsent()), if tx.pending() > 0 => match r {
                Ok(0) => return End::Conn("the daemon stopped reading (write returned 0)".into()),
                Ok(n) => tx.sent(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return End::Conn(format!("write error: {e}")),
            },
            r = rd.read(rx.spare()) => match r {
                Ok(0) if rx.partial() > 0 => {
                    return End::Conn(format!(
                        "the daemon closed the connection in the middle of a frame ({} bytes)",
                        rx.partial()
                    ))
                }
                Ok(0) => return End::Conn("the daemon closed the connection".into()),
                Ok(n) => {
                    rx.filled(n);
                    loop {
                        match rx.next_frame() {
                            Ok(Some(f)) => {
                                stats.frames_from_daemon += 1;
                                stats.bytes_from_daemon += f.len() as u64;
                                if let Err(e) = tap.send_frame(f) {
                                    return End::TapGone(Some(e));
                                }
                            }
                            Ok(None) => break,
                            Err(BadLength(len)) => {
                                return End::Conn(format!(
                                    "protocol error: invalid frame length {len} (must be \
                                     {MIN_FRAME}..={})",
                                    rx.framing.max_frame()
                                ))
                            }
                        }
                    }
                    if tap.pending() > 0 {
                        if let Err(e) = tap.flush().await {
                            return End::TapGone(Some(e));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return End::Conn(format!("read error: {e}")),
            },
            r = tap.recv(), if tx.pending() < TX_HIGH_WATER => match r {
                Ok(true) => {
                    while let Some(f) = tap.next_frame() {
                        if tx.push(f) {
                            stats.frames_to_daemon += 1;
                            stats.bytes_to_daemon += f.len() as u64;
                        } else {
                            stats.dropped_size += 1;
                            tracing::debug!(len = f.len(), "frame too large for the framing; dropped");
                        }
                    }
                }
                Ok(false) => return End::TapGone(None),
                Err(e) => return End::TapGone(Some(e)),
            },
        }
    }
}

/// Run `fut` while reading and dropping the TAP's frames (the link is "unplugged").
/// `None` when `stop` fired first; an error when the TAP is gone.
async fn unplugged<T, F, S>(
    tap: &mut T,
    fut: F,
    stats: &mut GuestStats,
    mut stop: Pin<&mut S>,
) -> io::Result<Option<F::Output>>
where
    T: FrameTransport,
    F: Future,
    S: Future<Output = ()>,
{
    let mut fut = std::pin::pin!(fut);
    loop {
        tokio::select! {
            // A connection that is ready is taken before any more frames are dropped.
            biased;
            _ = stop.as_mut() => return Ok(None),
            out = fut.as_mut() => return Ok(Some(out)),
            r = tap.recv() => match r {
                Ok(true) => {
                    while tap.next_frame().is_some() {
                        stats.dropped_disconnected += 1;
                    }
                }
                Ok(false) => return Err(io::Error::other("the tap device is gone")),
                Err(e) => return Err(e),
            },
        }
    }
}

/// Connect and hand out the two halves to `pump`.
async fn session<T, S>(
    tap: &mut T,
    endpoint: &Endpoint,
    conn: Conn,
    bufs: (&mut RxBuf, &mut TxBuf),
    stats: &mut GuestStats,
    stop: Pin<&mut S>,
) -> End
where
    T: FrameTransport,
    S: Future<Output = ()>,
{
    let (rx, tx) = bufs;
    rx.reset();
    tx.reset();
    tracing::info!(endpoint = %endpoint, "connected to the daemon");
    match conn {
        Conn::Unix(mut s) => {
            let (mut r, mut w) = s.split();
            pump(tap, &mut r, &mut w, rx, tx, stats, stop).await
        }
        Conn::Vsock(mut s) => {
            let (mut r, mut w) = s.split();
            pump(tap, &mut r, &mut w, rx, tx, stats, stop).await
        }
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

async fn connect(endpoint: &Endpoint) -> io::Result<Conn> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_once(endpoint))
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            ))
        })
}

async fn connect_once(endpoint: &Endpoint) -> io::Result<Conn> {
    match endpoint {
        Endpoint::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path).await?;
            let r = socket2::SockRef::from(&s);
            let _ = r.set_send_buffer_size(SOCKET_BUFFER);
            let _ = r.set_recv_buffer_size(SOCKET_BUFFER);
            Ok(Conn::Unix(s))
        }
        Endpoint::Vsock { cid, port } => {
            tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                .await
                .map(Conn::Vsock)
        }
    }
}

/// Carry `tap`'s frames to the daemon at `opts.endpoint` until `stop` completes,
/// reconnecting whenever the connection ends. Returns the counters when stopped; an error
/// only when the TAP is gone.
pub async fn run<T: FrameTransport>(
    tap: &mut T,
    opts: &GuestOptions,
    stop: impl Future<Output = ()>,
) -> io::Result<GuestStats> {
    let mut stop = std::pin::pin!(stop);
    let mut stats = GuestStats::default();
    let mut rx = RxBuf::new(opts.framing, RX_BUFFER);
    let mut tx = TxBuf::new(opts.framing);
    let min = opts.backoff_min.max(Duration::from_millis(1));
    let max = opts.backoff_max.max(min);
    let mut delay = min;
    // Failures since the last successful connect (only the first is logged as a warning).
    let mut failures = 0u64;
    loop {
        let attempt = unplugged(tap, connect(&opts.endpoint), &mut stats, stop.as_mut()).await?;
        let Some(attempt) = attempt else {
            return Ok(stats);
        };
        match attempt {
            Ok(conn) => {
                stats.connects += 1;
                failures = 0;
                let began = tokio::time::Instant::now();
                let end = session(
                    tap,
                    &opts.endpoint,
                    conn,
                    (&mut rx, &mut tx),
                    &mut stats,
                    stop.as_mut(),
                )
                .await;
                match end {
                    End::Stopped => return Ok(stats),
                    End::TapGone(e) => {
                        let why = e.map(|e| e.to_string()).unwrap_or_else(|| "closed".into());
                        return Err(io::Error::other(format!("the tap device is gone: {why}")));
                    }
                    End::Conn(why) => {
                        tracing::warn!(endpoint = %opts.endpoint, "disconnected: {why}; reconnecting")
                    }
                }
                // A session that lasted starts the backoff afresh; one the daemon ended at
                // once (refusing us) keeps doubling it.
                if began.elapsed() >= max {
                    delay = min;
                }
            }
            Err(e) => {
                stats.connect_failures += 1;
                failures += 1;
                if failures == 1 {
                    tracing::warn!(endpoint = %opts.endpoint,
                        "cannot connect: {}; retrying (up to every {max:?})", os_msg(&e));
                } else {
                    tracing::debug!(endpoint = %opts.endpoint, attempt = failures,
                        "cannot connect: {}", os_msg(&e));
                }
            }
        }
        let wait = unplugged(tap, tokio::time::sleep(delay), &mut stats, stop.as_mut()).await?;
        if wait.is_none() {
            return Ok(stats);
        }
        delay = (delay * 2).min(max);
    }
}

/// Set the MTU of interface `name` and bring it up (in the current network namespace).
pub fn configure_link(name: &str, mtu: u32) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let ioctl = |req: libc::c_ulong, ifr: &mut IfReq, what: &str| -> io::Result<()> {
        // SAFETY: these SIOC*IF* requests read and write a `struct ifreq`, which IfReq
        // matches.
        if unsafe { libc::ioctl(sock.as_raw_fd(), req as _, ifr as *mut IfReq) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("{what} of {name}: {}", os_msg(&e)),
            ));
        }
        Ok(())
    };
    let mut ifr = IfReq::new(name.as_bytes());
    ifr.set_int(i32::try_from(mtu).unwrap_or(i32::MAX));
    ioctl(libc::SIOCSIFMTU, &mut ifr, "cannot set the MTU")?;
    let mut ifr = IfReq::new(name.as_bytes());
    ioctl(libc::SIOCGIFFLAGS, &mut ifr, "cannot read the flags")?;
    ifr.set_short(ifr.short() | libc::IFF_UP as i16);
    ioctl(libc::SIOCSIFFLAGS, &mut ifr, "cannot bring up")?;
    Ok(())
}

/// `usernet guest`: create the TAP, then serve it until `stop`.
pub async fn serve(args: GuestArgs, stop: impl Future<Output = ()>) -> Result<(), String> {
    let max_frame = args.framing.max_frame();
    if args.mtu as usize + 14 > max_frame {
        return Err(format!(
            "--mtu {} is too large for the {} framing (frames of at most {max_frame} bytes)",
            args.mtu, args.framing
        ));
    }
    let fd = open_tap(None, &args.tap).map_err(|e| e.to_string())?;
    configure_link(&args.tap, args.mtu).map_err(|e| e.to_string())?;
    let mut tap = TapTransport::new(fd).map_err(|e| format!("tap {}: {e}", args.tap))?;
    tracing::info!(tap = %args.tap, mtu = args.mtu, endpoint = %args.connect,
        framing = %args.framing, "guest helper starting");
    let mut opts = GuestOptions::new(args.connect, args.framing);
    opts.backoff_max = Duration::from_millis(args.reconnect_max_ms);
    let stats = run(&mut tap, &opts, stop)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(?stats, tap_dropped = tap.dropped(), "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::sync::mpsc;

    fn wire(framing: Framing, frames: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in frames {
            framing.encode(f.len(), &mut v);
            v.extend_from_slice(f);
        }
        v
    }

    fn feed(rx: &mut RxBuf, bytes: &[u8]) {
        let s = rx.spare();
        s[..bytes.len()].copy_from_slice(bytes);
        rx.filled(bytes.len());
    }

    fn drain(rx: &mut RxBuf) -> Result<Vec<Vec<u8>>, BadLength> {
        let mut out = Vec::new();
        while let Some(f) = rx.next_frame()? {
            out.push(f.to_vec());
        }
        Ok(out)
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:/run/u.sock".parse(),
            Ok(Endpoint::Unix("/run/u.sock".into()))
        );
        assert_eq!(
            "unix:///run/u.sock".parse(),
            Ok(Endpoint::Unix("/run/u.sock".into()))
        );
        assert_eq!(
            "vsock://2:1024".parse(),
            Ok(Endpoint::Vsock { cid: 2, port: 1024 })
        );
        assert_eq!(
            "vsock:3:5".parse::<Endpoint>().unwrap().to_string(),
            "vsock://3:5"
        );
        for bad in [
            "unix:",
            "vsock://2",
            "vsock://x:1",
            "vsock://2:99999999999",
            "tcp:1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn wire_formats_are_byte_exact() {
        let f = [0xeeu8; 300];
        let q = wire(Framing::Qemu, &[&f]);
        assert_eq!(&q[..4], &[0, 0, 1, 44]);
        let u = wire(Framing::U16le, &[&f]);
        assert_eq!(&u[..2], &[44, 1]);
        let mut tx = TxBuf::new(Framing::U16le);
        assert!(tx.push(&f));
        assert_eq!(tx.unsent(), &u[..]);
    }

    #[test]
    fn rx_byte_by_byte_both_framings() {
        for framing in [Framing::Qemu, Framing::U16le] {
            let a = [1u8; 14];
            let b: Vec<u8> = (0..1514u32).map(|i| i as u8).collect();
            let w = wire(framing, &[&a, &b]);
            let mut rx = RxBuf::new(framing, 0);
            let mut got = Vec::new();
            // A short read in the middle of a header and of a frame: nothing comes out
            // until the frame is complete.
            for byte in &w {
                feed(&mut rx, std::slice::from_ref(byte));
                got.extend(drain(&mut rx).unwrap());
            }
            assert_eq!(got, vec![a.to_vec(), b], "{framing:?}");
            assert_eq!(rx.partial(), 0);
        }
    }

    #[test]
    fn rx_max_frames_and_bad_lengths() {
        for framing in [Framing::Qemu, Framing::U16le] {
            let max = framing.max_frame();
            let big = vec![7u8; max];
            let mut rx = RxBuf::new(framing, 0);
            // Twice, so that the second must be compacted to the front of a buffer that
            // holds exactly one maximal frame.
            for _ in 0..2 {
                let w = wire(framing, &[&big]);
                let (h, t) = w.split_at(w.len() / 2);
                feed(&mut rx, h);
                assert_eq!(rx.next_frame(), Ok(None));
                feed(&mut rx, t);
                assert_eq!(rx.next_frame().unwrap().map(<[u8]>::len), Some(max));
            }
            let mut rx = RxBuf::new(framing, 0);
            let mut w = wire(framing, &[&[3u8; 20]]);
            framing.encode(13, &mut w);
            feed(&mut rx, &w);
            assert_eq!(rx.next_frame(), Ok(Some(&[3u8; 20][..])));
            assert_eq!(rx.next_frame(), Err(BadLength(13)));
        }
        let mut rx = RxBuf::new(Framing::Qemu, 0);
        feed(
            &mut rx,
            &((crate::stream::MAX_FRAME + 1) as u32).to_be_bytes(),
        );
        assert_eq!(
            rx.next_frame(),
            Err(BadLength(crate::stream::MAX_FRAME + 1))
        );
    }

    #[test]
    fn tx_refuses_what_the_framing_cannot_carry() {
        let mut tx = TxBuf::new(Framing::U16le);
        assert!(!tx.push(&[0u8; 13]));
        assert!(!tx.push(&vec![0u8; 65536]));
        assert!(tx.push(&vec![0u8; 65535]));
        assert_eq!(tx.pending(), 65537);
        tx.sent(65537);
        assert_eq!(tx.pending(), 0);
        let mut tx = TxBuf::new(Framing::Qemu);
        assert!(tx.push(&vec![0u8; 65536]));
        assert!(!tx.push(&vec![0u8; crate::stream::MAX_FRAME + 1]));
    }

    /// A TAP stand-in: frames pushed into `inject` come out of `recv`; frames the helper
    /// sends go to `sent`.
    struct FakeTap {
        inject: mpsc::UnboundedReceiver<Vec<u8>>,
        queued: VecDeque<Vec<u8>>,
        cur: Vec<u8>,
        sent: mpsc::UnboundedSender<Vec<u8>>,
        /// Frames handed out by `next_frame`.
        taken: Arc<AtomicUsize>,
    }

    impl FakeTap {
        fn new(
            inject: mpsc::UnboundedReceiver<Vec<u8>>,
            sent: mpsc::UnboundedSender<Vec<u8>>,
        ) -> FakeTap {
            FakeTap {
                inject,
                queued: VecDeque::new(),
                cur: Vec::new(),
                sent,
                taken: Arc::default(),
            }
        }
    }

    impl FrameTransport for FakeTap {
        async fn recv(&mut self) -> io::Result<bool> {
            if !self.queued.is_empty() {
                return Ok(true);
            }
            match self.inject.recv().await {
                Some(f) => {
                    self.queued.push_back(f);
                    Ok(true)
                }
                None => Ok(false),
            }
        }
        fn next_frame(&mut self) -> Option<&[u8]> {
            self.cur = self.queued.pop_front()?;
            self.taken.fetch_add(1, Ordering::Relaxed);
            Some(&self.cur)
        }
        fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
            let _ = self.sent.send(frame.to_vec());
            Ok(())
        }
        fn pending(&self) -> usize {
            0
        }
        async fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const T: Duration = Duration::from_secs(10);

    async fn read_frame(s: &mut tokio::net::UnixStream, framing: Framing) -> Vec<u8> {
        let mut h = vec![0u8; framing.header_len()];
        tokio::time::timeout(T, s.read_exact(&mut h))
            .await
            .expect("a frame header")
            .unwrap();
        let mut f = vec![0u8; framing.decode(&h)];
        tokio::time::timeout(T, s.read_exact(&mut f))
            .await
            .expect("a frame")
            .unwrap();
        f
    }

    /// Accept the helper's next connection and wait until it carries frames: `accept`
    /// returns as soon as the helper's connect is queued, before the helper knows it is
    /// connected (frames it reads from the TAP until then are dropped, as they should be).
    async fn accept(
        l: &tokio::net::UnixListener,
        framing: Framing,
        sent: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    ) -> tokio::net::UnixStream {
        let mut s = tokio::time::timeout(T, l.accept())
            .await
            .expect("the helper (re)connects")
            .unwrap()
            .0;
        let hello = frame(0xee, 42);
        s.write_all(&wire(framing, &[&hello])).await.unwrap();
        let got = tokio::time::timeout(T, sent.recv()).await.unwrap().unwrap();
        assert_eq!(got, hello);
        s
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![tag; len];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f
    }

    /// Frames cross both ways; the daemon going away (EOF, then a framing error) makes
    /// the helper connect again, and traffic flows on the new connection.
    async fn reconnects(framing: Framing) {
        let dir =
            std::env::temp_dir().join(format!("usernet-guest-{}-{framing:?}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Removed even when an assertion fails.
        struct RemoveDir(PathBuf);
        impl Drop for RemoveDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _guard = RemoveDir(dir.clone());
        let path = dir.join("d.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (inject, inject_rx) = mpsc::unbounded_channel();
        let (sent_tx, mut sent) = mpsc::unbounded_channel();
        let mut tap = FakeTap::new(inject_rx, sent_tx);
        let mut opts = GuestOptions::new(Endpoint::Unix(path.clone()), framing);
        opts.backoff_min = Duration::from_millis(5);
        opts.backoff_max = Duration::from_millis(20);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let helper = tokio::spawn(async move {
            let s = run(&mut tap, &opts, async {
                let _ = stop_rx.await;
            })
            .await;
            (s, tap)
        });

        let mut conn = accept(&listener, framing, &mut sent).await;
        inject.send(frame(1, 60)).unwrap();
        inject.send(frame(2, 1514)).unwrap();
        assert_eq!(read_frame(&mut conn, framing).await, frame(1, 60));
        assert_eq!(read_frame(&mut conn, framing).await, frame(2, 1514));
        // Two frames in one write, the second split across two writes.
        let w = wire(framing, &[&frame(3, 100), &frame(4, 200)]);
        conn.write_all(&w[..150]).await.unwrap();
        conn.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        conn.write_all(&w[150..]).await.unwrap();
        let got = tokio::time::timeout(T, sent.recv()).await.unwrap().unwrap();
        assert_eq!(got, frame(3, 100));
        let got = tokio::time::timeout(T, sent.recv()).await.unwrap().unwrap();
        assert_eq!(got, frame(4, 200));

        // The daemon restarts: EOF; the helper comes back.
        drop(conn);
        let mut conn = accept(&listener, framing, &mut sent).await;
        inject.send(frame(5, 70)).unwrap();
        assert_eq!(read_frame(&mut conn, framing).await, frame(5, 70));

        // A framing error from the daemon: the helper drops the connection, reconnects.
        let mut bad = Vec::new();
        framing.encode(3, &mut bad);
        bad.extend_from_slice(&[0, 0, 0]);
        conn.write_all(&bad).await.unwrap();
        let mut conn2 = accept(&listener, framing, &mut sent).await;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(T, conn.read_to_end(&mut rest))
            .await
            .expect("the bad connection is closed")
            .unwrap();
        assert_eq!(n, 0);
        let w = wire(framing, &[&frame(6, 64)]);
        conn2.write_all(&w).await.unwrap();
        let got = tokio::time::timeout(T, sent.recv()).await.unwrap().unwrap();
        assert_eq!(got, frame(6, 64));

        stop_tx.send(()).unwrap();
        let (stats, _tap) = tokio::time::timeout(T, helper).await.unwrap().unwrap();
        let stats = stats.unwrap();
        assert_eq!(stats.connects, 3);
        assert_eq!(stats.frames_to_daemon, 3);
        // Three greetings of 42 bytes, then 100, 200 and 64.
        assert_eq!(stats.frames_from_daemon, 6);
        assert_eq!(stats.bytes_from_daemon, 3 * 42 + 364);
        assert_eq!(stats.dropped_disconnected, 0);
        drop(listener);
    }

    #[tokio::test]
    async fn reconnects_qemu_framing() {
        reconnects(Framing::Qemu).await;
    }

    #[tokio::test]
    async fn reconnects_u16le_framing() {
        reconnects(Framing::U16le).await;
    }

    /// With no daemon, frames from the TAP are dropped (and counted), attempts are
    /// retried, and the helper still stops promptly.
    #[tokio::test]
    async fn drops_frames_while_no_daemon_listens() {
        let path =
            std::env::temp_dir().join(format!("usernet-guest-{}-absent.sock", std::process::id()));
        let (inject, inject_rx) = mpsc::unbounded_channel();
        let (sent_tx, _sent) = mpsc::unbounded_channel();
        let mut tap = FakeTap::new(inject_rx, sent_tx);
        let taken = tap.taken.clone();
        let mut opts = GuestOptions::new(Endpoint::Unix(path), Framing::Qemu);
        opts.backoff_min = Duration::from_millis(1);
        opts.backoff_max = Duration::from_millis(4);
        for i in 0..10 {
            inject.send(frame(i, 60)).unwrap();
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let helper = tokio::spawn(async move {
            run(&mut tap, &opts, async {
                let _ = stop_rx.await;
            })
            .await
        });
        tokio::time::timeout(T, async {
            while taken.load(Ordering::Relaxed) < 10 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the helper reads the tap while disconnected");
        stop_tx.send(()).unwrap();
        let stats = tokio::time::timeout(T, helper)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(stats.connects, 0);
        assert!(stats.connect_failures >= 1, "{stats:?}");
        assert_eq!(stats.dropped_disconnected, 10);
        assert_eq!(stats.frames_to_daemon, 0);
    }

    /// The vsock path is compiled in and fails cleanly where nothing listens (or where
    /// the machine has no vsock at all): an error, never a hang or a panic.
    #[tokio::test]
    async fn vsock_connect_without_a_listener_is_an_error() {
        let r = tokio::time::timeout(
            CONNECT_TIMEOUT + Duration::from_secs(5),
            connect(&Endpoint::Vsock {
                cid: 2,
                port: 0x7fff_fff0,
            }),
        )
        .await
        .expect("connect is bounded");
        assert!(r.is_err());
    }

    #[test]
    fn guest_options_parse() {
        use crate::cli::{Cli, Command};
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "usernet",
            "guest",
            "--connect",
            "vsock://2:1024",
            "--tap",
            "eth1",
            "--framing",
            "u16le",
            "--mtu",
            "9000",
        ])
        .unwrap();
        let Command::Guest(a) = cli.command else {
            panic!("not the guest subcommand")
        };
        assert_eq!(a.connect, Endpoint::Vsock { cid: 2, port: 1024 });
        assert_eq!(
            (a.tap.as_str(), a.framing, a.mtu),
            ("eth1", Framing::U16le, 9000)
        );
        assert_eq!(a.reconnect_max_ms, 2000);
        for f in [Framing::Qemu, Framing::U16le] {
            assert_eq!(Framing::from_str(&f.to_string(), false), Ok(f), "{f}");
        }
        let cli = Cli::try_parse_from(["usernet", "guest", "--connect", "unix:/s", "--tap", "t"])
            .unwrap();
        let Command::Guest(a) = cli.command else {
            panic!("not the guest subcommand")
        };
        assert_eq!((a.framing, a.mtu), (Framing::Qemu, 1500));
        for bad in [
            &["--connect", "unix:/s"][..],
            &["--tap", "t"],
            &["--connect", "unix:/s", "--tap", "t", "--mtu", "67"],
            &["--connect", "unix:/s", "--tap", "t", "--framing", "vmnet"],
        ] {
            let mut args = vec!["usernet", "guest"];
            args.extend_from_slice(bad);
            assert!(Cli::try_parse_from(&args).is_err(), "{bad:?}");
        }
    }
}
