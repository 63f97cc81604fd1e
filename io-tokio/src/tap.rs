//! TAP device transport: Ethernet frames over `/dev/net/tun` (`IFF_TAP | IFF_NO_PI`).
//!
//! [`open_tap`] attaches to (or creates) a TAP interface, optionally inside another network
//! namespace; the file descriptor keeps working from the daemon's own namespace.
//! [`TapTransport`] moves frames over that descriptor: one `read` or `write` is one frame.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::transport::FrameTransport;

/// Largest frame read from or written to the device: a 65536-byte MTU plus the
/// Ethernet header.
pub const MAX_TAP_FRAME: usize = 65536 + 14;
/// Frames read per [`FrameTransport::recv`] at most.
pub const RX_BATCH: usize = 64;
/// Size of the receive buffer (frames stored back to back). Holds many MTU-sized
/// frames; a read is only attempted while a maximal frame still fits.
const RX_BUFFER: usize = 512 * 1024 + MAX_TAP_FRAME;

/// `struct ifreq` as used by `TUNSETIFF` and the `SIOC[GS]IF*` ioctls: the name, then a
/// 24-byte union (flags, MTU or a `sockaddr`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct IfReq {
    pub(crate) name: [u8; libc::IFNAMSIZ],
    pub(crate) data: [u8; 24],
    // Keep the same alignment as the C union (it contains pointers in `ifmap`).
    _align: [u64; 0],
}

impl IfReq {
    /// An `ifreq` naming `name`; the name must already be validated
    /// (see [`check_ifname`]).
    pub(crate) fn new(name: &[u8]) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
            _align: [],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name[..n]);
        r
    }

    pub(crate) fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    pub(crate) fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    pub(crate) fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    /// Store an IPv4 `sockaddr_in` (port 0).
    pub(crate) fn set_ipv4(&mut self, addr: [u8; 4]) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr);
    }
}

/// The text of an OS error without the " (os error N)" suffix that `Display` adds.
pub(crate) fn os_msg(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if e.raw_os_error().is_some() => s[..i].to_owned(),
        _ => s,
    }
}

/// Check an interface name: 1 to 15 bytes, no `/`, `:`, whitespace or NUL.
pub(crate) fn check_ifname(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?} (1 to 15 characters, no '/', ':' or spaces)"),
        ))
    }
}

/// Open `/dev/net/tun` and attach to TAP interface `name` in the current thread's network
/// namespace (creating it if it does not exist and we are allowed to).
fn open_tap_here(name: &str) -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot open /dev/net/tun: {}", os_msg(&e)),
        ));
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name.as_bytes());
    req.set_short((libc::IFF_TAP | libc::IFF_NO_PI) as i16);
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` matches.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req as *mut IfReq) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot attach to tap {name}: {}", os_msg(&e)),
        ));
    }
    Ok(fd)
}

/// Open TAP interface `name`, inside the network namespace at `netns` (a path such as
/// `/run/netns/NAME` or `/proc/PID/ns/net`) if given.
///
/// The namespace is entered by a short-lived helper thread, so the calling threads stay in
/// their own namespace; the returned descriptor (non-blocking, close-on-exec) keeps working
/// from anywhere. Entering a namespace needs `CAP_SYS_ADMIN` over it.
pub fn open_tap(netns: Option<&Path>, name: &str) -> io::Result<OwnedFd> {
    check_ifname(name)?;
    let Some(netns) = netns else {
        return open_tap_here(name);
    };
    let ns = File::open(netns).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot open network namespace {}: {}",
                netns.display(),
                os_msg(&e)
            ),
        )
    })?;
    let name = name.to_owned();
    let netns_disp = netns.display().to_string();
    let handle = std::thread::Builder::new()
        .name("usernet-setns".into())
        .spawn(move || -> io::Result<OwnedFd> {
            // SAFETY: setns only affects this (soon to exit) thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot enter network namespace {netns_disp}: {}",
                        os_msg(&e)
                    ),
                ));
            }
            open_tap_here(&name)
        })?;
    handle
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace helper thread panicked")))
}

/// Errors after which the device is gone for good.
fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::EIO | libc::ENXIO | libc::ENODEV | libc::EPIPE)
    )
}

/// Frames over a TAP file descriptor, registered with tokio.
#[derive(Debug)]
pub struct TapTransport {
    fd: AsyncFd<OwnedFd>,
    buf: Box<[u8]>,
    /// (offset, length) of each buffered frame in `buf`.
    frames: Vec<(u32, u32)>,
    next: usize,
    dropped: u64,
    gone: bool,
    mode: ReadMode,
}

/// How many frames to read per wake-up. In batch mode, reads go on until the device runs
/// dry. When wake-ups bring one frame each (the guest is exchanging requests and
/// responses), single mode reads one frame and hands it over before trying for more:
/// the read that finds the queue empty (a TAP has no FIONREAD to ask) then happens after
/// the frame's work, off the round trip's path. A second frame found waiting behind the
/// first switches back to batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ReadMode {
    single: bool,
    /// The last read was a single-frame one that left readiness set: the next read shows
    /// whether frames queue up behind each other.
    probing: bool,
}

impl ReadMode {
    fn limit(&self) -> usize {
        if self.single {
            1
        } else {
            RX_BATCH
        }
    }

    /// After a read that got `frames` frames and then either hit the limit (`dry`
    /// false) or found the device empty (`dry` true).
    fn after(&mut self, frames: usize, dry: bool) {
        let probe = std::mem::take(&mut self.probing);
        if dry {
            self.single = frames <= 1;
        } else if self.single {
            if probe {
                // A frame was waiting right behind the last: batch again.
                self.single = false;
            } else {
                self.probing = true;
            }
        }
    }
}

impl TapTransport {
    /// Serve a TAP descriptor (as returned by [`open_tap`]). Sets `O_NONBLOCK`.
    /// Must be called within a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<TapTransport> {
        set_nonblocking(fd.as_fd())?;
        Ok(TapTransport {
            // SAFETY: an OwnedFd stays open and the same until the AsyncFd drops it.
            fd: unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? },
            buf: vec![0u8; RX_BUFFER].into_boxed_slice(),
            frames: Vec::with_capacity(RX_BATCH),
            next: 0,
            dropped: 0,
            gone: false,
            mode: ReadMode::default(),
        })
    }

    /// Frames dropped by [`FrameTransport::send_frame`] (device queue full, bad size).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// Read frames until the device has no more, the batch is full or the buffer could not
/// hold another maximal frame. Never waits.
/// Read up to `max` frames into `buf`; `Ok` when `max` were read (more may wait),
/// `WouldBlock` when the device ran dry (after however many frames).
fn read_batch(
    fd: RawFd,
    buf: &mut [u8],
    frames: &mut Vec<(u32, u32)>,
    max: usize,
) -> io::Result<()> {
    let mut off = 0usize;
    while frames.len() < max && buf.len() - off >= MAX_TAP_FRAME {
        let dst = &mut buf[off..];
        // SAFETY: `dst` is a valid writable buffer of `dst.len()` bytes.
        let n = unsafe { libc::read(fd, dst.as_mut_ptr().cast(), dst.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
        let n = n as usize;
        if n == 0 {
            // Not expected from a TAP device; treat like "nothing to read".
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if n < 14 {
            tracing::debug!(len = n, "ignoring a runt frame from the tap");
            continue;
        }
        frames.push((off as u32, n as u32));
        off += n;
    }
    Ok(())
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a valid descriptor.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0
        && unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl FrameTransport for TapTransport {
    async fn recv(&mut self) -> io::Result<bool> {
        loop {
            if self.next < self.frames.len() {
                return Ok(true);
            }
            if self.gone {
                return Ok(false);
            }
            self.frames.clear();
            self.next = 0;
            // Cancel-safe: `readable` is; the reads below happen without awaiting.
            let raw = self.fd.get_ref().as_raw_fd();
            let mut guard = self.fd.readable().await?;
            let r = read_batch(raw, &mut self.buf, &mut self.frames, self.mode.limit());
            let dry = matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            self.mode.after(self.frames.len(), dry);
            match r {
                Ok(()) => {}
                Err(_) if dry => guard.clear_ready(),
                Err(e) if device_gone(&e) => {
                    tracing::warn!("tap device gone: {e}");
                    self.gone = true;
                }
                Err(e) if self.frames.is_empty() => return Err(e),
                Err(e) => tracing::debug!("tap read error after a batch: {e}"),
            }
        }
    }

    fn next_frame(&mut self) -> Option<&[u8]> {
        let &(off, len) = self.frames.get(self.next)?;
        self.next += 1;
        Some(&self.buf[off as usize..off as usize + len as usize])
    }

    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.gone {
            self.dropped += 1;
            return Ok(());
        }
        if frame.len() < 14 || frame.len() > MAX_TAP_FRAME {
            tracing::debug!(len = frame.len(), "dropping a frame of invalid size");
            self.dropped += 1;
            return Ok(());
        }
        let fd = self.fd.get_ref().as_raw_fd();
        loop {
            // SAFETY: `frame` is a valid readable buffer.
            let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    tracing::trace!(len = frame.len(), "tap queue full; dropping a frame");
                }
                _ if device_gone(&e) => {
                    tracing::warn!("tap device gone: {e}");
                    self.gone = true;
                }
                _ => tracing::debug!(len = frame.len(), "tap write failed: {e}; dropping a frame"),
            }
            self.dropped += 1;
            return Ok(());
        }
    }

    fn pending(&self) -> usize {
        0
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn one_frame_per_wake_up_is_read_singly_and_a_queue_brings_batches_back() {
        let mut m = ReadMode::default();
        assert_eq!(m.limit(), RX_BATCH);
        // A batch that found one frame: single mode.
        m.after(1, true);
        assert_eq!(m.limit(), 1);
        // One frame handed over with readiness left set; the probe that follows finds
        // the device empty: still single.
        m.after(1, false);
        assert!(m.probing);
        m.after(0, true);
        assert_eq!((m.limit(), m.probing), (1, false));
        // One frame, then the probe finds another waiting: batches again.
        m.after(1, false);
        m.after(1, false);
        assert_eq!(m.limit(), RX_BATCH);
        // A full batch keeps batching; a batch of several that ran dry too.
        m.after(RX_BATCH, false);
        m.after(5, true);
        assert_eq!(m.limit(), RX_BATCH);
    }
    use std::process::Command;
    use std::time::Duration;

    fn is_root() -> bool {
        unsafe { libc::geteuid() == 0 }
    }

    /// `ping`, or busybox's if there is none; `None` (skip the test) without either.
    pub(crate) fn ping_cmd() -> Option<&'static [&'static str]> {
        let has = |prog: &str| {
            std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).exists()))
        };
        if has("ping") {
            Some(&["ping"])
        } else if has("busybox") {
            Some(&["busybox", "ping"])
        } else {
            None
        }
    }

    /// A named network namespace, deleted on drop.
    struct NetnsGuard(String);

    impl NetnsGuard {
        fn create(name: String) -> Option<NetnsGuard> {
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .ok()?
                .success();
            ok.then_some(NetnsGuard(name))
        }

        fn ip(&self, args: &[&str]) -> bool {
            let mut full = vec!["-n", &self.0];
            full.extend_from_slice(args);
            Command::new("ip")
                .args(&full)
                .status()
                .is_ok_and(|s| s.success())
        }
    }

    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[test]
    fn ifname_checks() {
        assert!(check_ifname("untap0").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("0123456789abcdef").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("a b").is_err());
    }

    #[test]
    fn missing_netns_is_a_clear_error() {
        let e = open_tap(Some(Path::new("/nonexistent/netns")), "untap0").unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot open network namespace /nonexistent/netns"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn tap_in_netns_sees_arp() {
        if !is_root() {
            eprintln!("skipping tap_in_netns_sees_arp: needs root");
            return;
        }
        let Some(ping) = ping_cmd() else {
            eprintln!("skipping tap_in_netns_sees_arp: no ping");
            return;
        };
        let ns_name = format!("usernet-tapt-{}", std::process::id());
        let Some(ns) = NetnsGuard::create(ns_name.clone()) else {
            eprintln!("skipping tap_in_netns_sees_arp: `ip netns add` failed");
            return;
        };
        assert!(ns.ip(&["tuntap", "add", "dev", "untap0", "mode", "tap"]));
        let path = format!("/run/netns/{ns_name}");
        let fd = open_tap(Some(Path::new(&path)), "untap0").expect("open_tap");
        // A second attach to the same (single-queue) tap fails with a clear message.
        let e = open_tap(Some(Path::new(&path)), "untap0").unwrap_err();
        assert!(
            e.to_string().starts_with("cannot attach to tap untap0: "),
            "{e}"
        );

        let mut tap = TapTransport::new(fd).unwrap();
        assert!(ns.ip(&["addr", "add", "10.0.7.1/24", "dev", "untap0"]));
        assert!(ns.ip(&["link", "set", "untap0", "up"]));
        // Any IPv4 packet to a neighbour makes the kernel send an ARP request on untap0.
        let mut args = vec!["netns", "exec", &ns_name];
        args.extend_from_slice(ping);
        args.extend_from_slice(&["-c1", "-W1", "10.0.7.2"]);
        let mut child = Command::new("ip")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ping");

        let arp = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                assert!(tap.recv().await.unwrap(), "tap gone");
                while let Some(f) = tap.next_frame() {
                    if f[12..14] == [0x08, 0x06] {
                        return f.to_vec();
                    }
                }
            }
        })
        .await
        .expect("no ARP request on the tap within 5 s");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(&arp[0..6], &[0xff; 6], "ARP request is broadcast");
        assert_eq!(&arp[20..22], &[0, 1], "ARP opcode request");
        assert_eq!(&arp[28..32], &[10, 0, 7, 1], "sender IP");
        assert_eq!(&arp[38..42], &[10, 0, 7, 2], "target IP");

        // Answer the ARP request through the tap; the kernel learns the neighbour.
        let our_mac = [0x02, 0, 0, 0, 0, 0x42];
        let mut reply = Vec::new();
        reply.extend_from_slice(&arp[6..12]);
        reply.extend_from_slice(&our_mac);
        reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&our_mac);
        reply.extend_from_slice(&[10, 0, 7, 2]);
        reply.extend_from_slice(&arp[22..28]);
        reply.extend_from_slice(&[10, 0, 7, 1]);
        tap.send_frame(&reply).unwrap();
        tap.flush().await.unwrap();
        assert_eq!(tap.dropped(), 0);
        let learned = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let out = Command::new("ip")
                    .args(["-n", &ns_name, "neigh", "show", "10.0.7.2", "dev", "untap0"])
                    .output()
                    .unwrap();
                let s = String::from_utf8_lossy(&out.stdout).to_string();
                if s.contains("02:00:00:00:00:42") {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(learned.is_ok(), "the kernel did not learn our ARP reply");
        drop(ns);
    }
}
