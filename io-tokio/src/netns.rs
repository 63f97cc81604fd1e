//! `usernet run -- CMD`: run a command in a fresh network namespace whose only link is a
//! TAP device served by the daemon (like `pasta CMD`).
//!
//! The child process is forked and, before it execs the command:
//! 1. if we are not root, enters a new user namespace mapping our uid/gid to root;
//! 2. enters a new network namespace, and a mount namespace with a fresh `/sys` mounted
//!    (best effort) so `/sys/class/net` shows the new namespace's interfaces;
//! 3. brings up `lo`, creates the TAP device, sets its MTU, address and netmask, brings it
//!    up and adds the default route (ioctls only: no `ip` binary needed), and opens
//!    `ping_group_range` (best effort);
//! 4. passes the TAP descriptor to the parent over a socketpair (`SCM_RIGHTS`) and waits
//!    for a "go" byte; then execs the command (`PATH` lookup). If exec fails it prints
//!    `usernet: cannot run CMD: REASON` and exits with status 127.
//!
//! The child gets `SIGKILL` if the daemon dies (`PR_SET_PDEATHSIG`); the fork is done by a
//! dedicated thread that lives as long as the process, because the death signal is tied
//! to the thread that forked, not to the process.
//!
//! Between `fork` and `exec` the child only makes raw system calls on data prepared
//! beforehand: no allocation, no locks, no panics (the daemon is multi-threaded).

use std::ffi::{CString, OsString};
use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::tap::{check_ifname, os_msg, IfReq};

/// How to set up the namespace's network.
#[derive(Debug, Clone)]
pub struct NetnsSetup {
    /// Name of the TAP device to create (1 to 15 characters).
    pub tap_name: String,
    /// MTU of the TAP device.
    pub mtu: u32,
    /// Address and prefix length to configure; `None` leaves the device unconfigured.
    pub guest_addr: Option<(Ipv4Addr, u8)>,
    /// Default route via this gateway (must be inside the configured subnet).
    pub gateway: Option<Ipv4Addr>,
}

/// How long the parent waits for the child to set up the namespace.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Setup steps, reported by the child as (step, errno).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    DeathSig = 1,
    UserNs,
    UidMap,
    Setgroups,
    GidMap,
    NetNs,
    CtlSocket,
    LoUp,
    OpenTun,
    CreateTap,
    Mtu,
    Addr,
    Netmask,
    TapUp,
    Route,
    SendFd,
}

impl Step {
    fn from_u8(v: u8) -> Option<Step> {
        use Step::*;
        [
            DeathSig, UserNs, UidMap, Setgroups, GidMap, NetNs, CtlSocket, LoUp, OpenTun,
            CreateTap, Mtu, Addr, Netmask, TapUp, Route, SendFd,
        ]
        .into_iter()
        .find(|s| *s as u8 == v)
    }
}

/// Everything the child needs, prepared before the fork (the child must not allocate).
struct ChildCtx {
    sock: RawFd,
    parent_sock: RawFd,
    parent_pid: libc::pid_t,
    userns: bool,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    ifname: [u8; libc::IFNAMSIZ],
    mtu: i32,
    addr: Option<([u8; 4], [u8; 4])>,
    gateway: Option<[u8; 4]>,
    /// Null-terminated argv.
    argv: Vec<*const c_char>,
    /// Null-terminated list of paths to try with execve.
    candidates: Vec<*const c_char>,
    /// "usernet: cannot run CMD: "
    err_prefix: Vec<u8>,
    // Owners of the strings the pointers above point into.
    _strings: Vec<CString>,
}

/// A command running in its own network namespace. Killed (SIGKILL) on drop if it has
/// not been waited for.
#[derive(Debug)]
pub struct Sandbox {
    pid: libc::pid_t,
    /// The TAP device's descriptor (non-blocking, close-on-exec), for the daemon to serve
    /// (e.g. with `TapTransport::new`). Take it with [`Sandbox::take_tap`].
    pub tap: Option<OwnedFd>,
    status: Option<ExitStatus>,
    pidfd: Option<AsyncFd<OwnedFd>>,
}

fn errno() -> i32 {
    // SAFETY: reading the thread's errno.
    unsafe { *libc::__errno_location() }
}

fn os_error(errno: i32) -> String {
    os_msg(&io::Error::from_raw_os_error(errno))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Candidate paths for `cmd`, searched like `execvp` does.
fn exec_candidates(cmd: &std::ffi::OsStr) -> Vec<Vec<u8>> {
    let bytes = cmd.as_bytes();
    if bytes.contains(&b'/') {
        return vec![bytes.to_vec()];
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    path.as_bytes()
        .split(|&b| b == b':')
        .map(|dir| {
            let mut p = if dir.is_empty() {
                b".".to_vec()
            } else {
                dir.to_vec()
            };
            p.push(b'/');
            p.extend_from_slice(bytes);
            p
        })
        .collect()
}

fn cstring(bytes: Vec<u8>, what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| invalid(format!("{what} contains a NUL byte")))
}

fn prefix_to_mask(prefix: u8) -> [u8; 4] {
    let m = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    m.to_be_bytes()
}

impl ChildCtx {
    fn new(
        cfg: &NetnsSetup,
        cmd: &[OsString],
        sock: RawFd,
        parent_sock: RawFd,
    ) -> io::Result<ChildCtx> {
        check_ifname(&cfg.tap_name)?;
        let mtu =
            i32::try_from(cfg.mtu).map_err(|_| invalid(format!("invalid MTU {}", cfg.mtu)))?;
        let addr = match cfg.guest_addr {
            Some((_, p)) if p > 32 => return Err(invalid(format!("invalid prefix length /{p}"))),
            Some((a, p)) => Some((a.octets(), prefix_to_mask(p))),
            None => None,
        };
        let Some(cmd0) = cmd.first().filter(|c| !c.is_empty()) else {
            return Err(invalid("no command to run".into()));
        };
        let mut strings = Vec::new();
        let mut argv = Vec::new();
        for a in cmd {
            let c = cstring(a.as_bytes().to_vec(), "an argument")?;
            argv.push(c.as_ptr());
            strings.push(c);
        }
        argv.push(std::ptr::null());
        let mut candidates = Vec::new();
        for p in exec_candidates(cmd0) {
            let c = cstring(p, "the command path")?;
            candidates.push(c.as_ptr());
            strings.push(c);
        }
        candidates.push(std::ptr::null());
        // SAFETY: plain getters.
        let (uid, gid, euid) = unsafe { (libc::geteuid(), libc::getegid(), libc::geteuid()) };
        let mut err_prefix = b"usernet: cannot run ".to_vec();
        err_prefix.extend_from_slice(cmd0.as_bytes());
        err_prefix.extend_from_slice(b": ");
        Ok(ChildCtx {
            sock,
            parent_sock,
            // SAFETY: plain getter.
            parent_pid: unsafe { libc::getpid() },
            userns: euid != 0,
            uid_map: format!("0 {uid} 1\n").into_bytes(),
            gid_map: format!("0 {gid} 1\n").into_bytes(),
            ifname: IfReq::new(cfg.tap_name.as_bytes()).name,
            mtu,
            addr,
            gateway: cfg.gateway.map(|g| g.octets()),
            argv,
            candidates,
            err_prefix,
            _strings: strings,
        })
    }
}

/// Run `cmd` in a new network namespace (and, when not root, a new user namespace) with
/// a TAP device configured as `cfg` says. Returns once the namespace is set up and the
/// command is about to be executed; the TAP descriptor is in [`Sandbox::tap`].
///
/// Blocks the calling thread for the few milliseconds the setup takes.
/// Errors name the failing step, e.g. "cannot create a network namespace: Operation not
/// permitted (...)". A command that cannot be executed is not an error here: the child
/// prints why and exits with status 127.
pub fn spawn_in_new_netns(cfg: &NetnsSetup, cmd: &[OsString]) -> io::Result<Sandbox> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot create a socketpair: {}", os_msg(&e)),
        ));
    }
    // SAFETY: fresh descriptors owned by nobody else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let ctx = ChildCtx::new(cfg, cmd, theirs.as_raw_fd(), ours.as_raw_fd())?;
    set_rcvtimeo(&ours, SETUP_TIMEOUT)?;

    let pid = fork_child(&ctx)?;
    drop(theirs);
    drop(ctx);
    let mut sandbox = Sandbox {
        pid,
        tap: None,
        status: None,
        pidfd: None,
    };

    match receive_tap(&ours, cfg) {
        Ok(tap) => sandbox.tap = Some(tap),
        Err(e) => {
            // `sandbox`'s drop kills and reaps the child.
            drop(sandbox);
            return Err(e);
        }
    }
    // SAFETY: writing one byte from a valid buffer.
    let n = unsafe {
        libc::send(
            ours.as_raw_fd(),
            b"G".as_ptr().cast(),
            1,
            libc::MSG_NOSIGNAL,
        )
    };
    if n != 1 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot start the command: {}", os_msg(&e)),
        ));
    }
    Ok(sandbox)
}

fn set_rcvtimeo(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a valid timeval.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receive the child's report: the TAP descriptor, or the step that failed.
fn receive_tap(sock: &OwnedFd, cfg: &NetnsSetup) -> io::Result<OwnedFd> {
    let mut data = [0u8; 8];
    let mut cmsg_buf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all pointers refer to live local buffers.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&cmsg_buf) as _;
    let n = loop {
        // SAFETY: see above.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        break n;
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "timed out waiting for the child to set up the network namespace",
            ));
        }
        return Err(io::Error::new(
            e.kind(),
            format!("cannot receive the tap from the child: {}", os_msg(&e)),
        ));
    }
    // Collect any descriptor first, so that it is closed on every path.
    let mut fd = None;
    // SAFETY: walking the control messages the kernel filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const RawFd);
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    match (n, data[0], fd) {
        (0, _, _) => Err(io::Error::other(
            "the child exited during the namespace setup",
        )),
        (1, b'F', Some(fd)) => Ok(fd),
        (6, b'E', _) => {
            let step = Step::from_u8(data[1]);
            let err = i32::from_ne_bytes([data[2], data[3], data[4], data[5]]);
            Err(step_error(cfg, step, err))
        }
        _ => Err(io::Error::other(
            "unexpected message from the namespace child",
        )),
    }
}

fn step_error(cfg: &NetnsSetup, step: Option<Step>, err: i32) -> io::Error {
    let name = &cfg.tap_name;
    let kind = io::Error::from_raw_os_error(err).kind();
    let reason = os_error(err);
    // SAFETY: plain getter. The child used a user namespace iff we are not root.
    let userns = unsafe { libc::geteuid() } != 0;
    let denied = err == libc::EPERM || err == libc::EACCES || err == libc::ENOSPC;
    let ns_hint = match (denied, userns) {
        (false, _) => "",
        (true, true) => " (is unprivileged user namespace creation disabled?)",
        (true, false) if err == libc::EPERM => {
            " (does the daemon lack CAP_SYS_ADMIN, e.g. in a container?)"
        }
        (true, false) => "",
    };
    let gw = cfg.gateway.map(|g| g.to_string()).unwrap_or_default();
    let msg = match step {
        Some(Step::DeathSig) => format!("cannot set the parent-death signal: {reason}"),
        Some(Step::UserNs) => format!("cannot create a user namespace: {reason}{ns_hint}"),
        Some(Step::UidMap) => format!("cannot write /proc/self/uid_map: {reason}"),
        Some(Step::Setgroups) => format!("cannot write /proc/self/setgroups: {reason}"),
        Some(Step::GidMap) => format!("cannot write /proc/self/gid_map: {reason}"),
        Some(Step::NetNs) => format!("cannot create a network namespace: {reason}{ns_hint}"),
        Some(Step::CtlSocket) => format!("cannot create a configuration socket: {reason}"),
        Some(Step::LoUp) => format!("cannot bring up lo: {reason}"),
        Some(Step::OpenTun) if denied => {
            format!("cannot open /dev/net/tun: {reason} (check its permissions)")
        }
        Some(Step::OpenTun) => format!("cannot open /dev/net/tun: {reason}"),
        Some(Step::CreateTap) => format!("cannot create tap {name}: {reason}"),
        Some(Step::Mtu) => format!("cannot set MTU {} on {name}: {reason}", cfg.mtu),
        Some(Step::Addr) => {
            let addr = cfg.guest_addr.map(|a| a.0.to_string()).unwrap_or_default();
            format!("cannot set address {addr} on {name}: {reason}")
        }
        Some(Step::Netmask) => {
            let prefix = cfg.guest_addr.map(|a| a.1).unwrap_or_default();
            format!("cannot set netmask /{prefix} on {name}: {reason}")
        }
        Some(Step::TapUp) => format!("cannot bring up {name}: {reason}"),
        Some(Step::Route) if err == libc::ENETUNREACH => {
            format!("cannot add the default route via {gw}: {reason} (is the gateway inside the guest subnet?)")
        }
        Some(Step::Route) => format!("cannot add the default route via {gw}: {reason}"),
        Some(Step::SendFd) => format!("cannot pass the tap to the parent: {reason}"),
        None => format!("namespace setup failed: {reason}"),
    };
    io::Error::new(kind, msg)
}

/// A fork request for the keeper thread.
struct ForkRequest {
    ctx: *const ChildCtx,
    reply: mpsc::SyncSender<Result<libc::pid_t, i32>>,
}

// SAFETY: the pointer is only dereferenced in the forked child, while the requesting
// thread blocks on `reply` and keeps the context alive.
unsafe impl Send for ForkRequest {}

/// Fork from a thread that never exits, so that `PR_SET_PDEATHSIG` (tied to the forking
/// thread) only fires when the whole process dies.
fn fork_child(ctx: &ChildCtx) -> io::Result<libc::pid_t> {
    static KEEPER: Mutex<Option<mpsc::Sender<ForkRequest>>> = Mutex::new(None);
    let tx = {
        let mut keeper = KEEPER.lock().unwrap_or_else(|e| e.into_inner());
        if keeper.is_none() {
            let (tx, rx) = mpsc::channel::<ForkRequest>();
            std::thread::Builder::new()
                .name("usernet-forker".into())
                .spawn(move || {
                    for req in rx {
                        // SAFETY: the child only runs `child_main`, which makes raw system
                        // calls on prepared data and never returns.
                        let pid = unsafe { libc::fork() };
                        if pid == 0 {
                            // SAFETY: `req.ctx` is alive (see ForkRequest).
                            unsafe { child_main(&*req.ctx) }
                        }
                        let _ = req.reply.send(if pid < 0 { Err(errno()) } else { Ok(pid) });
                    }
                })?;
            *keeper = Some(tx);
        }
        keeper
            .as_ref()
            .cloned()
            .ok_or_else(|| io::Error::other("no forker thread"))?
    };
    let (reply, result) = mpsc::sync_channel(1);
    tx.send(ForkRequest { ctx, reply })
        .map_err(|_| io::Error::other("the forker thread is gone"))?;
    match result.recv() {
        Ok(Ok(pid)) => Ok(pid),
        Ok(Err(e)) => Err(io::Error::new(
            io::Error::from_raw_os_error(e).kind(),
            format!("cannot fork: {}", os_error(e)),
        )),
        Err(_) => Err(io::Error::other("the forker thread is gone")),
    }
}

// ---- the child, between fork and exec: raw system calls only ----

extern "C" {
    static environ: *const *const c_char;
}

type StepResult = Result<(), (Step, i32)>;

fn check(step: Step, r: libc::c_int) -> StepResult {
    if r < 0 {
        Err((step, errno()))
    } else {
        Ok(())
    }
}

/// Write `data` to the file at `path` (one write, as /proc files want).
unsafe fn write_file(path: &std::ffi::CStr, data: &[u8]) -> Result<(), i32> {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(errno());
    }
    let n = libc::write(fd, data.as_ptr().cast(), data.len());
    let e = errno();
    libc::close(fd);
    if n != data.len() as isize {
        return Err(if n < 0 { e } else { libc::EIO });
    }
    Ok(())
}

fn sockaddr_in(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data.
    unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

unsafe fn ifreq_ioctl(sock: RawFd, req: libc::c_ulong, ifr: &mut IfReq) -> libc::c_int {
    libc::ioctl(sock, req as _, ifr as *mut IfReq)
}

unsafe fn set_up(sock: RawFd, name: &[u8], step: Step) -> StepResult {
    let mut ifr = IfReq::new(name);
    check(step, ifreq_ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr))?;
    let flags = ifr.short() | libc::IFF_UP as i16;
    ifr.set_short(flags);
    check(step, ifreq_ioctl(sock, libc::SIOCSIFFLAGS, &mut ifr))
}

fn name_bytes(ifname: &[u8; libc::IFNAMSIZ]) -> &[u8] {
    let n = ifname
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(libc::IFNAMSIZ);
    &ifname[..n]
}

/// The namespace setup; returns the TAP descriptor.
unsafe fn child_setup(ctx: &ChildCtx) -> Result<RawFd, (Step, i32)> {
    check(
        Step::DeathSig,
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
    )?;
    if libc::getppid() != ctx.parent_pid {
        // The daemon died before we set the death signal.
        libc::_exit(1);
    }
    if ctx.userns {
        check(Step::UserNs, libc::unshare(libc::CLONE_NEWUSER))?;
        write_file(c"/proc/self/uid_map", &ctx.uid_map).map_err(|e| (Step::UidMap, e))?;
        write_file(c"/proc/self/setgroups", b"deny").map_err(|e| (Step::Setgroups, e))?;
        write_file(c"/proc/self/gid_map", &ctx.gid_map).map_err(|e| (Step::GidMap, e))?;
    }
    check(Step::NetNs, libc::unshare(libc::CLONE_NEWNET))?;

    // Best effort: a private view of /sys for the new namespace, like `ip netns exec`.
    if libc::unshare(libc::CLONE_NEWNS) == 0 {
        let none = std::ptr::null::<c_char>();
        libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        );
        if libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH) == 0 || errno() == libc::EINVAL {
            libc::mount(
                c"sysfs".as_ptr(),
                c"/sys".as_ptr(),
                c"sysfs".as_ptr(),
                0,
                std::ptr::null(),
            );
        }
    }

    let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
    check(Step::CtlSocket, sock)?;
    set_up(sock, b"lo", Step::LoUp)?;

    let tap = libc::open(
        c"/dev/net/tun".as_ptr(),
        libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
    );
    check(Step::OpenTun, tap)?;
    let name = name_bytes(&ctx.ifname);
    let mut ifr = IfReq::new(name);
    ifr.set_short((libc::IFF_TAP | libc::IFF_NO_PI) as i16);
    check(
        Step::CreateTap,
        libc::ioctl(tap, libc::TUNSETIFF as _, &mut ifr as *mut IfReq),
    )?;

    let mut ifr = IfReq::new(name);
    ifr.set_int(ctx.mtu);
    check(Step::Mtu, ifreq_ioctl(sock, libc::SIOCSIFMTU, &mut ifr))?;
    if let Some((addr, mask)) = ctx.addr {
        let mut ifr = IfReq::new(name);
        ifr.set_ipv4(addr);
        check(Step::Addr, ifreq_ioctl(sock, libc::SIOCSIFADDR, &mut ifr))?;
        let mut ifr = IfReq::new(name);
        ifr.set_ipv4(mask);
        check(
            Step::Netmask,
            ifreq_ioctl(sock, libc::SIOCSIFNETMASK, &mut ifr),
        )?;
    }
    set_up(sock, name, Step::TapUp)?;
    if let Some(gw) = ctx.gateway {
        let mut rt: libc::rtentry = mem::zeroed();
        rt.rt_dst = sockaddr_in([0; 4]);
        rt.rt_genmask = sockaddr_in([0; 4]);
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        rt.rt_dev = ctx.ifname.as_ptr() as *mut c_char;
        check(
            Step::Route,
            libc::ioctl(sock, libc::SIOCADDRT as _, &mut rt as *mut libc::rtentry),
        )?;
    }
    libc::close(sock);

    // Best effort: let everybody use ICMP echo sockets (unprivileged ping). With a user
    // namespace only gid 0 is mapped, so the full range is refused; fall back to it.
    let ping = c"/proc/sys/net/ipv4/ping_group_range";
    if write_file(ping, b"0 2147483647").is_err() {
        let _ = write_file(ping, b"0 0");
    }
    Ok(tap)
}

/// Send the TAP descriptor ('F' + SCM_RIGHTS).
unsafe fn send_fd(sock: RawFd, fd: RawFd) -> Result<(), i32> {
    let mut data = [b'F'];
    let mut cmsg_buf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut msg: libc::msghdr = mem::zeroed();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = libc::CMSG_SPACE(mem::size_of::<RawFd>() as u32) as _;
    let c = libc::CMSG_FIRSTHDR(&msg);
    (*c).cmsg_level = libc::SOL_SOCKET;
    (*c).cmsg_type = libc::SCM_RIGHTS;
    (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd);
    if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) < 0 {
        return Err(errno());
    }
    Ok(())
}

unsafe fn write_all(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        if n <= 0 {
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            return;
        }
        data = &data[n as usize..];
    }
}

fn errno_text(e: i32) -> &'static [u8] {
    match e {
        libc::ENOENT => b"No such file or directory",
        libc::EACCES => b"Permission denied",
        libc::ENOEXEC => b"Exec format error",
        libc::ENOTDIR => b"Not a directory",
        libc::EISDIR => b"Is a directory",
        libc::ELOOP => b"Too many levels of symbolic links",
        libc::E2BIG => b"Argument list too long",
        libc::ENOMEM => b"Cannot allocate memory",
        libc::ETXTBSY => b"Text file busy",
        libc::EPERM => b"Operation not permitted",
        libc::ENAMETOOLONG => b"File name too long",
        _ => b"cannot execute",
    }
}

/// The forked child. Never returns.
unsafe fn child_main(ctx: &ChildCtx) -> ! {
    libc::close(ctx.parent_sock);
    let tap = match child_setup(ctx) {
        Ok(tap) => tap,
        Err((step, e)) => {
            let mut rec = [0u8; 6];
            rec[0] = b'E';
            rec[1] = step as u8;
            rec[2..6].copy_from_slice(&e.to_ne_bytes());
            libc::send(ctx.sock, rec.as_ptr().cast(), rec.len(), libc::MSG_NOSIGNAL);
            libc::_exit(1);
        }
    };
    if let Err(e) = send_fd(ctx.sock, tap) {
        let mut rec = [b'E', Step::SendFd as u8, 0, 0, 0, 0];
        rec[2..6].copy_from_slice(&e.to_ne_bytes());
        libc::send(ctx.sock, rec.as_ptr().cast(), rec.len(), libc::MSG_NOSIGNAL);
        libc::_exit(1);
    }
    libc::close(tap);
    // Wait for the parent's go.
    let mut go = [0u8; 1];
    loop {
        let n = libc::read(ctx.sock, go.as_mut_ptr().cast(), 1);
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n != 1 || go[0] != b'G' {
            libc::_exit(1);
        }
        break;
    }
    libc::close(ctx.sock);

    // Undo what the Rust runtime set up: SIGPIPE ignored (inherited by exec), and any
    // blocked signals.
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    let mut set: libc::sigset_t = mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());

    let mut err = libc::ENOENT;
    let mut saw_eacces = false;
    let mut p = ctx.candidates.as_ptr();
    while !(*p).is_null() {
        libc::execve(*p, ctx.argv.as_ptr(), environ);
        match errno() {
            libc::EACCES => saw_eacces = true,
            libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
            e => {
                err = e;
                saw_eacces = false;
                break;
            }
        }
        p = p.add(1);
    }
    if saw_eacces {
        err = libc::EACCES;
    }
    write_all(2, &ctx.err_prefix);
    write_all(2, errno_text(err));
    write_all(2, b"\n");
    libc::_exit(127);
}

// ---- the parent's handle ----

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain system call.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor (pidfds are close-on-exec).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Reap `pid` if it has exited, caching the status in `status`.
fn reap(pid: libc::pid_t, status: &mut Option<ExitStatus>) -> io::Result<Option<ExitStatus>> {
    if let Some(s) = *status {
        return Ok(Some(s));
    }
    let mut st = 0;
    // SAFETY: waitpid on our own child.
    let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r == 0 {
        return Ok(None);
    }
    let s = ExitStatus::from_raw(st);
    *status = Some(s);
    Ok(Some(s))
}

impl Sandbox {
    /// The command's process id (in the daemon's PID namespace).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Take the TAP descriptor (once).
    pub fn take_tap(&mut self) -> Option<OwnedFd> {
        self.tap.take()
    }

    /// The exit status, if the command has exited (reaps it).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        reap(self.pid, &mut self.status)
    }

    /// Wait for the command to exit. Cancel-safe. Must be called within a tokio runtime.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            if self.pidfd.is_none() {
                match pidfd_open(self.pid) {
                    Ok(fd) => {
                        // SAFETY: an OwnedFd stays open and the same until dropped.
                        let afd =
                            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
                        self.pidfd = Some(afd);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                        // Kernels before 5.3: poll.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                continue; // re-check: it may have exited before the pidfd existed
            }
            if let Some(pidfd) = &self.pidfd {
                let mut guard = pidfd.readable().await?;
                if reap(self.pid, &mut self.status)?.is_none() {
                    guard.clear_ready();
                }
            }
        }
    }

    /// Send SIGKILL to the command (if it has not been reaped yet).
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: our unreaped child: the pid cannot have been reused.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.kill();
            let mut st = 0;
            // SAFETY: reaping our own child (it was just killed, so this is quick).
            while unsafe { libc::waitpid(self.pid, &mut st, 0) } < 0 && errno() == libc::EINTR {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::TapTransport;
    use crate::transport::FrameTransport;

    fn is_root() -> bool {
        unsafe { libc::geteuid() == 0 }
    }

    fn setup(mtu: u32) -> NetnsSetup {
        NetnsSetup {
            tap_name: "untest0".into(),
            mtu,
            guest_addr: Some((Ipv4Addr::new(10, 0, 2, 100), 24)),
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
        }
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    async fn wait(sb: &mut Sandbox) -> ExitStatus {
        tokio::time::timeout(Duration::from_secs(10), sb.wait())
            .await
            .expect("the command did not exit within 10 s")
            .expect("wait")
    }

    #[test]
    fn masks() {
        assert_eq!(prefix_to_mask(24), [255, 255, 255, 0]);
        assert_eq!(prefix_to_mask(0), [0, 0, 0, 0]);
        assert_eq!(prefix_to_mask(32), [255; 4]);
        assert_eq!(prefix_to_mask(9), [255, 128, 0, 0]);
    }

    #[test]
    fn invalid_setups_are_refused_before_forking() {
        let mut cfg = setup(1500);
        cfg.tap_name = "this-name-is-too-long".into();
        assert!(spawn_in_new_netns(&cfg, &args(&["true"])).is_err());
        let mut cfg = setup(1500);
        cfg.guest_addr = Some((Ipv4Addr::new(10, 0, 2, 100), 33));
        assert!(spawn_in_new_netns(&cfg, &args(&["true"])).is_err());
        assert!(spawn_in_new_netns(&setup(1500), &[]).is_err());
    }

    #[tokio::test]
    async fn configures_the_namespace() {
        if !is_root() {
            eprintln!("skipping configures_the_namespace: not root");
            return;
        }
        let out = std::env::temp_dir().join(format!("usernet-netns-{}.out", std::process::id()));
        let script = format!(
            "{{ cat /sys/class/net/untest0/mtu; ip -4 addr show untest0 || true; \
             cat /proc/net/route; cat /proc/sys/net/ipv4/ping_group_range; \
             cat /sys/class/net/lo/operstate; }} > {}",
            out.display()
        );
        let mut sb = spawn_in_new_netns(&setup(1400), &args(&["sh", "-c", &script])).unwrap();
        assert!(sb.pid() > 0);
        let tap = sb.take_tap().expect("tap fd");
        let status = wait(&mut sb).await;
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let _ = std::fs::remove_file(&out);
        assert!(status.success(), "{status:?}\n{text}");
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("1400"), "{text}");
        if text.contains("inet ") {
            assert!(text.contains("inet 10.0.2.100/24"), "{text}");
        }
        // Default route: destination 0, gateway 10.0.2.2 (little-endian hex), on untest0.
        assert!(
            text.lines()
                .any(|l| l.starts_with("untest0\t00000000\t0202000A")),
            "no default route:\n{text}"
        );
        assert!(text.contains("0\t2147483647"), "ping_group_range:\n{text}");
        // Address and netmask: the connected route 10.0.2.0/24.
        assert!(
            text.lines()
                .any(|l| l.starts_with("untest0\t0002000A\t00000000\t0001")
                    && l.contains("\t00FFFFFF\t")),
            "no subnet route:\n{text}"
        );
        // lo is up (its operstate is "unknown" when up, "down" otherwise).
        assert_eq!(text.lines().last(), Some("unknown"), "{text}");
        // The tap is not in our namespace.
        drop(tap);
        // Waiting again returns the cached status.
        assert_eq!(wait(&mut sb).await, status);
    }

    #[tokio::test]
    async fn tap_receives_arp_for_the_gateway() {
        if !is_root() {
            eprintln!("skipping tap_receives_arp_for_the_gateway: not root");
            return;
        }
        let Some(ping) = crate::tap::tests::ping_cmd() else {
            eprintln!("skipping tap_receives_arp_for_the_gateway: no ping");
            return;
        };
        let mut cmd = args(ping);
        cmd.extend(args(&["-c1", "-W2", "10.0.2.2"]));
        let mut sb = spawn_in_new_netns(&setup(1500), &cmd).unwrap();
        let mut tap = TapTransport::new(sb.take_tap().unwrap()).unwrap();
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
        assert_eq!(&arp[20..22], &[0, 1], "ARP request");
        assert_eq!(&arp[28..32], &[10, 0, 2, 100], "sender IP");
        assert_eq!(&arp[38..42], &[10, 0, 2, 2], "target IP");
        // Nobody answers: ping fails (status 1), within its -W timeout.
        let status = wait(&mut sb).await;
        assert!(!status.success());
    }

    #[tokio::test]
    async fn exec_failure_exits_127() {
        if !is_root() {
            eprintln!("skipping exec_failure_exits_127: not root");
            return;
        }
        let mut sb =
            spawn_in_new_netns(&setup(1500), &args(&["usernet-no-such-command-xyz"])).unwrap();
        assert_eq!(wait(&mut sb).await.code(), Some(127));
        let mut sb = spawn_in_new_netns(&setup(1500), &args(&["/nonexistent/cmd"])).unwrap();
        assert_eq!(wait(&mut sb).await.code(), Some(127));
    }

    #[tokio::test]
    async fn setup_errors_name_the_step() {
        if !is_root() {
            eprintln!("skipping setup_errors_name_the_step: not root");
            return;
        }
        let e = spawn_in_new_netns(&setup(100_000), &args(&["true"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot set MTU 100000 on untest0: Invalid argument"
        );
        let mut cfg = setup(1500);
        cfg.gateway = Some(Ipv4Addr::new(192, 168, 9, 1));
        let e = spawn_in_new_netns(&cfg, &args(&["true"])).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "cannot add the default route via 192.168.9.1: Network is unreachable"
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn drop_kills_the_child() {
        if !is_root() {
            eprintln!("skipping drop_kills_the_child: not root");
            return;
        }
        let sb = spawn_in_new_netns(&setup(1500), &args(&["sleep", "100"])).unwrap();
        let pid = sb.pid() as libc::pid_t;
        drop(sb);
        // Reaped: the pid is no longer our child.
        assert_eq!(
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) },
            -1
        );
        assert_eq!(unsafe { libc::kill(pid, 0) }, -1);
    }
}
