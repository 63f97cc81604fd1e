//! Helpers for the end-to-end tests: test-created network namespaces, the daemon running
//! inside a "host" namespace, threads and commands inside a namespace, every wait bounded.
//!
//! Traffic stays inside namespaces the tests create: the daemon runs in a test "host"
//! namespace (its 127.0.0.1 is that namespace's loopback) and serves a TAP in a test
//! "guest" namespace.

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The daemon binary under test.
pub const USERNET: &str = env!("CARGO_BIN_EXE_usernet");
/// Name of the TAP device in the guest namespace.
pub const TAP: &str = "untap0";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 65, 1);
pub const HOST_ALIAS: Ipv4Addr = Ipv4Addr::new(192, 168, 65, 2);
pub const FIRST_GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 65, 3);

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True (after printing a line) when the test must be skipped: not root.
pub fn skip() -> bool {
    if is_root() {
        return false;
    }
    eprintln!("skipping: the end-to-end tests need root (network namespaces, TAP)");
    true
}

/// A name unique to this process and call: `PREFIX-PID-N`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit (children inherit it).
pub fn raise_nofile() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

pub fn nofile_limit() -> u64 {
    // SAFETY: plain getrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur as u64
    }
}

/// Run a command to completion within `timeout`, capturing its output (stdin is null).
/// Panics (after killing it) when it does not finish in time.
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: join_timeout(t_out, Duration::from_secs(5), "stdout reader"),
        stderr: join_timeout(t_err, Duration::from_secs(5), "stderr reader"),
    }
}

/// `run_cmd`, then panic with the output unless it exited 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let o = run_cmd(cmd, timeout);
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Wait for a thread within `timeout`; re-raise its panic; panic when it takes too long
/// (the thread is left behind).
pub fn join_timeout<R>(h: JoinHandle<R>, timeout: Duration, what: &str) -> R {
    let deadline = Instant::now() + timeout;
    while !h.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what} did not finish within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    match h.join() {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// Move the calling thread into network namespace `name` (only this thread).
pub fn enter_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid descriptor; only the calling thread changes namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", io::Error::last_os_error());
}

/// A test-created network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        run_ok(
            Command::new("ip").args(["netns", "add", &name]),
            Duration::from_secs(10),
        );
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Output {
        run_ok(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            Duration::from_secs(10),
        )
    }

    /// A command run inside the namespace (`ip netns exec NAME PROG ARGS...`), with a
    /// clean proxy environment.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        for v in [
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
        ] {
            c.env_remove(v);
        }
        c.env("no_proxy", "*");
        c
    }

    /// Run `f` on a new thread inside this namespace.
    pub fn spawn<R, F>(&self, f: F) -> JoinHandle<R>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let name = self.name.clone();
        thread::spawn(move || {
            enter_netns(&name);
            f()
        })
    }

    /// Run `f` inside this namespace and wait for it (bounded).
    pub fn run<R, F>(&self, timeout: Duration, f: F) -> R
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        join_timeout(self.spawn(f), timeout, "namespace thread")
    }

    /// A TCP listener on 127.0.0.1:0 of this namespace, with backlog `backlog`.
    pub fn tcp_listener(&self, backlog: i32) -> TcpListener {
        self.run(Duration::from_secs(5), move || {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
                .unwrap();
            s.listen(backlog).unwrap();
            TcpListener::from(s)
        })
    }

    /// A port of 127.0.0.1 in this namespace where nothing listens.
    pub fn closed_port(&self) -> u16 {
        let l = self.tcp_listener(1);
        let p = l.local_addr().unwrap().port();
        drop(l);
        p
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A running daemon process (`ip netns exec HOST usernet ...`), its output in a log file.
/// Dropping it kills it (SIGTERM, then SIGKILL) by PID.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(host: &Netns, args: &[String]) -> Daemon {
        Daemon::spawn_prog(host, USERNET, args)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panic (with the log) if the daemon has exited.
    pub fn assert_alive(&mut self) {
        let c = self.child.as_mut().expect("daemon already stopped");
        if let Some(s) = c.try_wait().unwrap() {
            panic!("the daemon exited ({s}); log:\n{}", self.log_text());
        }
    }

    /// Stop with SIGTERM and return the exit status (SIGKILL after 5 s).
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("daemon already stopped");
        if let Ok(Some(s)) = c.try_wait() {
            return s;
        }
        // SAFETY: signalling our own child by PID (`ip netns exec` execs the daemon).
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let s = c.wait().unwrap();
                panic!(
                    "the daemon ignored SIGTERM for 5 s (killed: {s}); log:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("--- daemon log ({}), last lines ---", self.log.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// How to set up a TAP testbed.
#[derive(Clone, Debug)]
pub struct Opts {
    /// MTU of the TAP and of the daemon (`None`: the daemon's default, 65520).
    pub mtu: Option<u16>,
    /// Give the guest its address (.3/24) and default route (via .1).
    pub configure_guest: bool,
    /// More daemon options.
    pub extra: Vec<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            mtu: None,
            configure_guest: true,
            extra: vec!["--no-dns".into()],
        }
    }
}

/// Two test namespaces and the daemon: the daemon runs in `host` and serves the TAP
/// `untap0` in `guest`.
/// Field order matters: the daemon is stopped before the namespaces are deleted.
pub struct Testbed {
    pub daemon: Daemon,
    pub guest: Netns,
    pub host: Netns,
}

impl Testbed {
    pub fn start() -> Testbed {
        Testbed::with(Opts::default())
    }

    pub fn with(opts: Opts) -> Testbed {
        Testbed::with_host(Netns::new("une2e-h"), opts)
    }

    /// A testbed around an existing host namespace (servers may already run there).
    pub fn with_host(host: Netns, opts: Opts) -> Testbed {
        run_ok(
            host.cmd("sysctl")
                .args(["-q", "-w", "net.ipv4.ping_group_range=0 2147483647"]),
            Duration::from_secs(10),
        );
        let guest = Netns::new("une2e-g");
        let mtu = opts.mtu.unwrap_or(65520).to_string();
        guest.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
        guest.ip(&["link", "set", TAP, "mtu", &mtu]);
        if opts.configure_guest {
            guest.ip(&["addr", "add", "192.168.65.3/24", "dev", TAP]);
        }
        guest.ip(&["link", "set", TAP, "up"]);
        if opts.configure_guest {
            guest.ip(&["route", "add", "default", "via", "192.168.65.1"]);
        }
        let mut args: Vec<String> = vec![
            "tap".into(),
            "--netns".into(),
            guest.path().display().to_string(),
            "--tap".into(),
            TAP.into(),
        ];
        if let Some(m) = opts.mtu {
            args.push("--mtu".into());
            args.push(m.to_string());
        }
        args.extend(opts.extra.iter().cloned());
        let daemon = Daemon::spawn(&host, &args);
        let mut tb = Testbed {
            daemon,
            guest,
            host,
        };
        tb.wait_attached();
        tb
    }

    /// Wait until the daemon has attached to the TAP (its carrier comes up).
    fn wait_attached(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.daemon.assert_alive();
            let o = self.guest.ip(&["-o", "link", "show", TAP]);
            let s = String::from_utf8_lossy(&o.stdout);
            if s.contains("LOWER_UP") && !s.contains("NO-CARRIER") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not attach to {TAP} within 10 s: {s}\nlog:\n{}",
                self.daemon.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A deterministic byte stream (xorshift64), generated a word at a time.
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen(seed | 1)
    }

    /// Fill `buf` (length a multiple of 8).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_exact_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// An order-sensitive 64-bit stream hash (FNV-like over little-endian words), insensitive
/// to how the stream is split into chunks. Fast enough unoptimized for 100 MB.
#[derive(Clone)]
pub struct Hash {
    h: u64,
    pend: [u8; 8],
    np: usize,
    len: u64,
}

impl Default for Hash {
    fn default() -> Self {
        Hash {
            h: 0xcbf2_9ce4_8422_2325,
            pend: [0; 8],
            np: 0,
            len: 0,
        }
    }
}

impl Hash {
    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }

    pub fn update(&mut self, mut d: &[u8]) {
        self.len += d.len() as u64;
        if self.np > 0 {
            let take = (8 - self.np).min(d.len());
            self.pend[self.np..self.np + take].copy_from_slice(&d[..take]);
            self.np += take;
            d = &d[take..];
            if self.np < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.pend));
            self.np = 0;
        }
        let mut it = d.chunks_exact(8);
        for c in &mut it {
            self.word(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let r = it.remainder();
        self.pend[..r.len()].copy_from_slice(r);
        self.np = r.len();
    }

    /// (byte count, hash)
    pub fn finish(&self) -> (u64, u64) {
        let mut h = self.clone();
        let mut last = [0u8; 8];
        last[..h.np].copy_from_slice(&h.pend[..h.np]);
        h.word(u64::from_le_bytes(last));
        h.word(h.len);
        (self.len, h.h)
    }
}

/// Write `total` bytes of `Gen::new(seed)` to `w`; return (count, hash) of what was sent.
pub fn send_stream(w: &mut impl Write, seed: u64, total: u64) -> io::Result<(u64, u64)> {
    let mut g = Gen::new(seed);
    let mut h = Hash::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = total;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        g.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finish())
}

/// Read `r` to EOF; return (count, hash) of what was received.
pub fn recv_stream(r: &mut impl Read) -> io::Result<(u64, u64)> {
    let mut h = Hash::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(h.finish()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Set generous read/write timeouts so a stuck transfer fails instead of hanging.
pub fn timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).unwrap();
    s.set_write_timeout(Some(t)).unwrap();
}

/// A minimal HTTP/1.x server: answers `n` requests on `listener` with `body`, then
/// returns the request lines it saw.
pub fn http_server(listener: TcpListener, body: Vec<u8>, n: usize) -> JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let mut lines = Vec::new();
        for _ in 0..n {
            let (mut s, _) = listener.accept().expect("accept");
            timeouts(&s, Duration::from_secs(20));
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let k = s.read(&mut buf).expect("read request");
                assert!(k > 0, "EOF inside the request: {req:?}");
                req.extend_from_slice(&buf[..k]);
            }
            let text = String::from_utf8_lossy(&req).into_owned();
            lines.push(text.lines().next().unwrap_or("").to_owned());
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).expect("write head");
            s.write_all(&body).expect("write body");
            let _ = s.shutdown(std::net::Shutdown::Write);
            // Wait for the client to close so nothing is reset under it.
            let _ = s.read(&mut buf);
        }
        lines
    })
}

/// A printable body of `len` bytes.
pub fn text_body(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if i % 64 == 63 {
                b'\n'
            } else {
                b'a' + ((i * 7 + i / 64) % 26) as u8
            }
        })
        .collect()
}

/// The second half of the concurrency tests: on every connection at once, a line out, its
/// echo back, then a half-close the server answers with EOF. Returns how many connections
/// echoed, and what went wrong on the others.
pub async fn echo_on_each<S>(streams: Vec<(usize, S)>) -> (usize, Vec<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut set = tokio::task::JoinSet::new();
    for (i, mut s) in streams {
        set.spawn(async move {
            let msg = format!("hello #{i}\n");
            let r = tokio::time::timeout(Duration::from_secs(30), async {
                s.write_all(msg.as_bytes()).await?;
                let mut got = vec![0u8; msg.len()];
                s.read_exact(&mut got).await?;
                s.shutdown().await?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await?;
                Ok::<_, std::io::Error>((got, rest))
            })
            .await;
            match r {
                Ok(Ok((got, rest))) if got == msg.as_bytes() && rest.is_empty() => Ok(()),
                Ok(Ok((got, rest))) => Err(format!(
                    "#{i}: echo {:?} + {} extra bytes",
                    String::from_utf8_lossy(&got),
                    rest.len()
                )),
                Ok(Err(e)) => Err(format!("#{i}: {e}")),
                Err(_) => Err(format!("#{i}: echo timed out")),
            }
        });
    }
    let (mut echoed, mut failures) = (0, Vec::new());
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(()) => echoed += 1,
            Err(e) => failures.push(e),
        }
    }
    (echoed, failures)
}

/// Every one of `n` connections connected and echoed.
pub fn assert_all_echoed(
    what: &str,
    n: usize,
    connected: usize,
    echoed: usize,
    mut failures: Vec<String>,
    t0: std::time::Instant,
) {
    eprintln!(
        "{n} {what}: {connected} connected, {echoed} echoed in {:?}",
        t0.elapsed()
    );
    failures.sort();
    assert!(
        connected == n && echoed == n,
        "{connected}/{n} connected, {echoed}/{n} echoed; {} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
}

impl Daemon {
    /// [`Daemon::spawn`] of any program (usernet, or a symlink to it named `vpnkit`).
    pub fn spawn_prog(host: &Netns, prog: &str, args: &[String]) -> Daemon {
        raise_nofile();
        let log = PathBuf::from(format!("/tmp/{}.log", unique("usernet-e2e")));
        let f = File::create(&log).unwrap();
        let mut c = host.cmd(prog);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {c:?}: {e}"));
        Daemon {
            child: Some(child),
            log,
        }
    }
}

/// `usernet ctl --api API stats`, parsed.
pub fn ctl_stats(api: &std::path::Path) -> serde_json::Value {
    let o = run_ok(
        Command::new(USERNET)
            .arg("ctl")
            .arg("--api")
            .arg(api)
            .arg("stats"),
        Duration::from_secs(20),
    );
    serde_json::from_slice(&o.stdout).expect("ctl stats prints JSON")
}

/// Poll `ctl stats` until `done` holds, for at most `timeout`; panics with `what` and the
/// last figures otherwise. Returns the figures that satisfied it.
pub fn wait_stats(
    api: &std::path::Path,
    timeout: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = ctl_stats(api);
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Run busybox udhcpc once in `guest` on the TAP. Its script records every event as
/// `EVENT ip=.. mask=.. subnet=.. router=.. mtu=.. dns=.. serverid=.. lease=..` and runs
/// the shell lines `on_bound` on `bound` and `renew` (say, to configure the address).
/// Asserts that udhcpc got a lease; returns the record.
#[allow(dead_code)]
pub fn udhcpc(guest: &Netns, on_bound: &str) -> String {
    let dir = PathBuf::from(format!("/tmp/{}", unique("usernet-udhcpc")));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("script");
    let envf = dir.join("env");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             echo \"$1 ip=$ip mask=$mask subnet=$subnet router=$router mtu=$mtu dns=$dns \
             serverid=$serverid lease=$lease\" >> {}\n\
             case \"$1\" in\n\
             bound|renew)\n{on_bound}\n;;\n\
             esac\n",
            envf.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let o = run_cmd(
        guest.cmd("busybox").args([
            "udhcpc",
            "-i",
            TAP,
            "-n",
            "-q",
            "-f",
            "-t",
            "5",
            "-T",
            "1",
            "-O",
            "mtu",
            "-s",
            script.to_str().unwrap(),
        ]),
        Duration::from_secs(20),
    );
    let record = std::fs::read_to_string(&envf).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        o.status.success(),
        "udhcpc: {}\n{}\n{}\nscript saw: {record}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    record
}
