//! Real-VMM end-to-end test: QEMU boots a tiny Linux guest (Debian's distro kernel and a
//! busybox initramfs built here at test time) whose only NIC is
//! `-netdev stream` connected to `usernet stream --socket`. The guest takes a DHCP lease
//! from usernet, fetches a page from an HTTP server on the host alias (the daemon's
//! 127.0.0.1), prints both on its serial console and powers off.
//!
//! Traffic stays inside a network namespace the test creates: the daemon and the HTTP
//! server (a thread of this process that entered the namespace) both live there, and
//! QEMU talks only to the daemon's UNIX socket.
//!
//! Needs root, `ip` (iproute2), `qemu-system-x86_64`, a kernel in /boot with its modules
//! (`linux-image-amd64`), a static busybox (`busybox-static`) and, for compressed kernel
//! modules, `xz`/`zstd`/`gzip`. Without them the test is skipped with a printed line,
//! unless `USERNET_REQUIRE_QEMU=1`, under which it fails instead.
//!
//! QEMU uses TCG (software emulation) unless `USERNET_QEMU_ACCEL` names another
//! accelerator (e.g. `kvm`): a /dev/kvm that opens is no proof that KVM works (nested
//! sandboxes hang in the guest's early boot), and a TCG boot takes only seconds.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USERNET: &str = env!("CARGO_BIN_EXE_usernet");
const QEMU: &str = "qemu-system-x86_64";
const EXPECTED_LEASE: &str = "192.168.65.3";
const EXPECTED_ROUTER: &str = "192.168.65.1";
const EXPECTED_MTU: &str = "1500";
const HOST_ALIAS: &str = "192.168.65.2";
/// Bound on the whole guest run (TCG boot to poweroff takes ~5 s on a 2-core machine).
const QEMU_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on the daemon creating its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(15);
/// Modules the guest needs for its NIC (their dependencies are added from modules.dep).
const NIC_MODULES: &[&str] = &["virtio_pci", "virtio_net"];

// ---------------------------------------------------------------------------------------
// Prerequisites.

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn required() -> bool {
    std::env::var("USERNET_REQUIRE_QEMU").is_ok_and(|v| v == "1")
}

fn in_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// True when `path` is an ELF executable without a program interpreter (PT_INTERP).
fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = fs::read(path) else { return false };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != 3
    })
}

/// A kernel image in /boot with its module tree: the newest version that has both.
fn find_kernel() -> Option<(PathBuf, PathBuf)> {
    let mut found: Vec<(String, PathBuf, PathBuf)> = fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let ver = name.strip_prefix("vmlinuz-")?.to_string();
            let mods = PathBuf::from(format!("/lib/modules/{ver}"));
            mods.join("modules.dep")
                .is_file()
                .then(|| (ver, e.path(), mods))
        })
        .collect();
    found.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    found.pop().map(|(_, k, m)| (k, m))
}

/// Compare version strings with their digit runs as numbers.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(u64, String)> {
        let mut v = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let n = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            let num = rest[..n].parse().unwrap_or(0);
            rest = &rest[n..];
            let t = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            v.push((num, rest[..t].to_string()));
            rest = &rest[t..];
        }
        v
    }
    parts(a).cmp(&parts(b))
}

struct Prereqs {
    qemu: PathBuf,
    ip: PathBuf,
    kernel: PathBuf,
    modules: PathBuf,
    busybox: PathBuf,
}

/// The prerequisites, or why they are missing.
fn prereqs() -> Result<Prereqs, String> {
    if !is_root() {
        return Err("needs root (network namespaces)".into());
    }
    let qemu =
        in_path(QEMU).ok_or("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")?;
    let ip = in_path("ip").ok_or("`ip` not found (apt-get install iproute2)")?;
    let (kernel, modules) = find_kernel()
        .ok_or("no /boot/vmlinuz-* with /lib/modules (apt-get install linux-image-amd64)")?;
    if File::open(&kernel).is_err() {
        return Err(format!("{} is not readable", kernel.display()));
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| is_static_elf(p))
        .ok_or("no static busybox in /bin or /usr/bin (apt-get install busybox-static)")?;
    Ok(Prereqs {
        qemu,
        ip,
        kernel,
        modules,
        busybox,
    })
}

// ---------------------------------------------------------------------------------------
// Kernel modules.

/// The module's name from a modules.dep path (`kernel/drivers/net/virtio_net.ko.xz`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The module files (paths relative to the module tree) to insmod, in load order, for
/// `wanted`; modules built into the kernel are left out.
fn module_load_order(modules: &Path, wanted: &[&str]) -> Result<Vec<String>, String> {
    let dep = fs::read_to_string(modules.join("modules.dep"))
        .map_err(|e| format!("reading modules.dep: {e}"))?;
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let builtin: Vec<String> = builtin.lines().map(module_name).collect();
    let mut deps = std::collections::HashMap::new();
    for line in dep.lines() {
        let Some((m, d)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            module_name(m),
            (
                m.to_string(),
                d.split_whitespace().map(String::from).collect::<Vec<_>>(),
            ),
        );
    }
    fn visit(
        name: &str,
        deps: &std::collections::HashMap<String, (String, Vec<String>)>,
        out: &mut Vec<String>,
        depth: usize,
    ) {
        let Some((path, ds)) = deps.get(name) else {
            return;
        };
        if out.contains(path) || depth > 32 {
            return;
        }
        for d in ds {
            visit(&module_name(d), deps, out, depth + 1);
        }
        if !out.contains(path) {
            out.push(path.clone());
        }
    }
    let mut out = Vec::new();
    for w in wanted {
        if deps.contains_key(*w) {
            visit(w, &deps, &mut out, 0);
        } else if !builtin.iter().any(|b| b == w) {
            return Err(format!(
                "the kernel in {} has no module {w}, nor is it built in",
                modules.display()
            ));
        }
    }
    Ok(out)
}

/// The uncompressed contents of a module file.
fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let s = path.to_string_lossy();
    let tool = if s.ends_with(".ko") {
        return fs::read(path).map_err(|e| format!("reading {s}: {e}"));
    } else if s.ends_with(".xz") {
        "xz"
    } else if s.ends_with(".zst") {
        "zstd"
    } else if s.ends_with(".gz") {
        "gzip"
    } else {
        return Err(format!("unknown module compression: {s}"));
    };
    let out = Command::new(tool)
        .args(["-d", "-c"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {tool} to decompress {s} (install it): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} -d -c {s}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

// ---------------------------------------------------------------------------------------
// The initramfs: an uncompressed cpio "newc" archive (the kernel takes it as is).

struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn pad(&mut self) {
        let len = self.buf.len();
        self.buf.resize(len.next_multiple_of(4), 0);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// The guest's /init: load the NIC modules, DHCP, fetch the page, report, power off.
fn init_script(modules: &[String], port: u16) -> String {
    let insmods: String = modules
        .iter()
        .map(|m| format!("insmod /mods/{m} || echo \"USERNET-INSMOD-FAILED {m}\"\n"))
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo USERNET-INIT
{insmods}IF=
i=0
while [ $i -lt 50 ]; do
  for d in /sys/class/net/*; do
    n=${{d##*/}}
    [ "$n" != lo ] && [ -e "$d" ] && IF=$n
  done
  [ -n "$IF" ] && break
  sleep 0.1
  i=$((i+1))
done
echo "USERNET-IF $IF"
ip link set lo up
ip link set "$IF" up
udhcpc -i "$IF" -n -q -t 5 -T 2 -s /udhcpc.sh
echo "USERNET-UDHCPC rc=$?"
wget -q -O /body.txt http://{HOST_ALIAS}:{port}/token.txt
echo "USERNET-WGET rc=$?"
echo "USERNET-BODY $(cat /body.txt)"
echo USERNET-DONE
poweroff -f
"#
    )
}

/// udhcpc's event script: apply the lease and report it.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
  [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
  ip addr add "$ip/${mask:-24}" dev "$interface"
  for r in $router; do ip route add default via "$r" dev "$interface"; break; done
  echo "USERNET-LEASE $ip ${router:-none} ${mtu:-none}"
  ;;
esac
exit 0
"#;

fn build_initramfs(p: &Prereqs, port: u16) -> Result<Vec<u8>, String> {
    let mods = module_load_order(&p.modules, NIC_MODULES)?;
    let mut cpio = Cpio::new();
    for d in [".", "bin", "dev", "proc", "sys", "mods", "etc", "tmp"] {
        cpio.dir(d);
    }
    cpio.entry("dev/console", 0o020600, (5, 1), &[]);
    cpio.entry("dev/null", 0o020666, (1, 3), &[]);
    let busybox = fs::read(&p.busybox).map_err(|e| format!("reading busybox: {e}"))?;
    cpio.file("bin/busybox", 0o755, &busybox);
    let mut names = Vec::new();
    for (i, m) in mods.iter().enumerate() {
        let data = module_bytes(&p.modules.join(m))?;
        let name = format!("{i:02}-{}.ko", module_name(m));
        cpio.file(&format!("mods/{name}"), 0o644, &data);
        names.push(name);
    }
    cpio.file("init", 0o755, init_script(&names, port).as_bytes());
    cpio.file("udhcpc.sh", 0o755, UDHCPC_SCRIPT.as_bytes());
    Ok(cpio.finish())
}

// ---------------------------------------------------------------------------------------
// The test bed: a temp dir, a network namespace, the daemon, the HTTP server, QEMU.
// Dropping it (also on panic) stops every process by PID and deletes the namespace.

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:08x}", std::process::id())
}

/// SIGTERM, then SIGKILL after `grace`; the exit status if it ended.
fn stop_child(c: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(s)) = c.try_wait() {
        return Some(s);
    }
    // SAFETY: signalling our own, not yet reaped, child by PID.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = c.kill();
    let _ = c.wait();
    None
}

fn wait_timeout(c: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

struct Bed {
    dir: PathBuf,
    ip: PathBuf,
    netns: Option<String>,
    daemon: Option<Child>,
    qemu: Option<Child>,
    stop_http: Arc<AtomicBool>,
    http: Option<JoinHandle<()>>,
}

impl Bed {
    fn new(ip: &Path) -> Bed {
        let id = unique();
        // Under /tmp (not $TMPDIR): the socket path must stay short (sun_path is 108 bytes).
        let dir = PathBuf::from(format!("/tmp/usernet-qemu-{id}"));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let mut bed = Bed {
            dir,
            ip: ip.to_path_buf(),
            netns: None,
            daemon: None,
            qemu: None,
            stop_http: Arc::new(AtomicBool::new(false)),
            http: None,
        };
        let ns = format!("usernet-qemu-{id}");
        bed.ip_ok(&["netns", "add", &ns]);
        bed.netns = Some(ns.clone());
        bed.ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        bed
    }

    fn ns(&self) -> &str {
        self.netns.as_deref().unwrap()
    }

    fn ip_ok(&self, args: &[&str]) {
        let out = Command::new(&self.ip)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
        assert!(
            out.status.success(),
            "ip {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> String {
        fs::read(self.path(name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Everything worth seeing when the test fails.
    fn evidence(&self) -> String {
        format!(
            "--- guest serial console ---\n{}\n--- qemu stderr ---\n{}\n--- daemon log (-v) ---\n{}",
            self.read("serial.log").replace('\r', ""),
            self.read("qemu.log"),
            self.read("daemon.log")
        )
    }

    /// An HTTP/1.x server on 127.0.0.1 inside the namespace, answering GET /token.txt
    /// with `token`; returns its port. The request lines it saw go to `requests`.
    fn start_http(&mut self, token: String, requests: Arc<Mutex<Vec<String>>>) -> u16 {
        let ns_path = format!("/run/netns/{}", self.ns());
        let stop = self.stop_http.clone();
        let (tx, rx) = mpsc::channel();
        let h = thread::spawn(move || {
            let f = File::open(&ns_path).expect("open the namespace");
            // SAFETY: setns on a valid namespace fd moves only this thread.
            let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                let _ = tx.send(Err(format!("setns: {}", std::io::Error::last_os_error())));
                return;
            }
            let l = match TcpListener::bind("127.0.0.1:0") {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(format!("bind: {e}")));
                    return;
                }
            };
            l.set_nonblocking(true).unwrap();
            let _ = tx.send(Ok(l.local_addr().unwrap().port()));
            let deadline = Instant::now() + QEMU_TIMEOUT + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                        let mut req = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let text = String::from_utf8_lossy(&req).into_owned();
                        let line = text.lines().next().unwrap_or("").to_string();
                        let (status, body) = if line.starts_with("GET /token.txt ") {
                            ("200 OK", format!("{token}\n"))
                        } else {
                            ("404 Not Found", "not found\n".to_string())
                        };
                        requests.lock().unwrap().push(line);
                        let resp = format!(
                            "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(resp.as_bytes());
                        let _ = s.shutdown(Shutdown::Write);
                        // Drain until the client closes, so our close sends no RST.
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        self.http = Some(h);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the HTTP server thread did not start")
            .unwrap_or_else(|e| panic!("HTTP server in the namespace: {e}"))
    }

    /// `ip netns exec NS usernet -v stream --socket SOCK --no-dns`; waits for the socket.
    fn start_daemon(&mut self, sock: &Path) {
        let log = File::create(self.path("daemon.log")).unwrap();
        let child = Command::new(&self.ip)
            .args([
                "netns",
                "exec",
                self.ns(),
                USERNET,
                "-v",
                "stream",
                "--socket",
            ])
            .arg(sock)
            .arg("--no-dns")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the daemon: {e}"));
        self.daemon = Some(child);
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !sock.exists() {
            if let Ok(Some(s)) = self.daemon.as_mut().unwrap().try_wait() {
                panic!(
                    "the daemon exited ({s}) before listening:\n{}",
                    self.evidence()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not create {} within {SOCKET_TIMEOUT:?}:\n{}",
                sock.display(),
                self.evidence()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            stop_child(&mut q, Duration::from_secs(3));
        }
        if let Some(mut d) = self.daemon.take() {
            stop_child(&mut d, Duration::from_secs(3));
        }
        self.stop_http.store(true, Ordering::Relaxed);
        if let Some(h) = self.http.take() {
            // The server polls its stop flag every 20 ms (each connection is bounded too).
            let deadline = Instant::now() + Duration::from_secs(15);
            while !h.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        if let Some(ns) = self.netns.take() {
            let _ = Command::new(&self.ip)
                .args(["netns", "del", &ns])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if std::env::var_os("USERNET_QEMU_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("kept {}", self.dir.display());
        }
    }
}

// ---------------------------------------------------------------------------------------
// The test.

#[test]
fn qemu_guest_gets_dhcp_lease_and_fetches_page_from_host_alias() {
    let p = match prereqs() {
        Ok(p) => p,
        Err(why) if required() => panic!("USERNET_REQUIRE_QEMU=1 but {why}"),
        Err(why) => {
            eprintln!("skipping the QEMU end-to-end test: {why}");
            return;
        }
    };
    let started = Instant::now();
    let mut bed = Bed::new(&p.ip);

    let token = format!("usernet-qemu-token-{}", unique());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let port = bed.start_http(token.clone(), requests.clone());

    let initrd = bed.path("initrd.cpio");
    let image = match build_initramfs(&p, port) {
        Ok(image) => image,
        Err(e) if required() => panic!("USERNET_REQUIRE_QEMU=1 but building the initramfs: {e}"),
        Err(e) => {
            eprintln!("skipping the QEMU end-to-end test: building the initramfs: {e}");
            return;
        }
    };
    fs::write(&initrd, image).unwrap();

    let sock = bed.path("usernet.sock");
    bed.start_daemon(&sock);

    let accel = std::env::var("USERNET_QEMU_ACCEL").unwrap_or_else(|_| "tcg".into());
    let mut qemu = Command::new(&p.qemu);
    qemu.args(["-accel", &accel]);
    if accel == "kvm" {
        qemu.args(["-cpu", "host"]);
    }
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-m",
        "256",
        "-smp",
        "1",
    ])
    .arg("-serial")
    .arg(format!("file:{}", bed.path("serial.log").display()))
    .arg("-kernel")
    .arg(&p.kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", "console=ttyS0 quiet panic=-1"])
    .arg("-netdev")
    .arg(format!(
        "stream,id=n0,server=off,addr.type=unix,addr.path={}",
        sock.display()
    ))
    // romfile= skips the iPXE option ROM: the kernel is loaded directly.
    .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
    let qlog = File::create(bed.path("qemu.log")).unwrap();
    qemu.stdin(Stdio::null())
        .stdout(qlog.try_clone().unwrap())
        .stderr(qlog);
    let boot = Instant::now();
    bed.qemu = Some(
        qemu.spawn()
            .unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}")),
    );
    let status = wait_timeout(bed.qemu.as_mut().unwrap(), QEMU_TIMEOUT);
    let boot_time = boot.elapsed();
    let Some(status) = status else {
        panic!(
            "QEMU did not exit within {QEMU_TIMEOUT:?} (accel {accel}):\n{}",
            bed.evidence()
        );
    };
    bed.qemu = None;

    let serial = bed.read("serial.log").replace('\r', "");
    let field = |tag: &str| -> Option<Vec<String>> {
        serial
            .lines()
            .find_map(|l| l.trim().strip_prefix(tag))
            .map(|rest| rest.split_whitespace().map(String::from).collect())
    };
    let lease = field("USERNET-LEASE ").unwrap_or_else(|| {
        panic!(
            "the guest got no DHCP lease (QEMU {status}):\n{}",
            bed.evidence()
        )
    });
    assert_eq!(
        lease,
        [EXPECTED_LEASE, EXPECTED_ROUTER, EXPECTED_MTU],
        "lease (ip router mtu):\n{}",
        bed.evidence()
    );
    let body = field("USERNET-BODY ").unwrap_or_default();
    assert_eq!(
        body,
        [token.as_str()],
        "the page body fetched from http://{HOST_ALIAS}:{port}/token.txt:\n{}",
        bed.evidence()
    );
    assert!(
        serial.contains("USERNET-DONE"),
        "the guest did not finish its script:\n{}",
        bed.evidence()
    );
    assert!(
        status.success(),
        "QEMU exited with {status}:\n{}",
        bed.evidence()
    );
    let reqs = requests.lock().unwrap().clone();
    assert_eq!(
        reqs,
        ["GET /token.txt HTTP/1.1"],
        "requests the HTTP server saw:\n{}",
        bed.evidence()
    );

    // The daemon survived the guest's disconnect and stops cleanly.
    let mut d = bed.daemon.take().unwrap();
    if let Ok(Some(s)) = d.try_wait() {
        panic!(
            "the daemon exited ({s}) during the run:\n{}",
            bed.evidence()
        );
    }
    let st = stop_child(&mut d, Duration::from_secs(5));
    assert!(
        st.is_some_and(|s| s.success()),
        "the daemon did not exit cleanly on SIGTERM ({st:?}):\n{}",
        bed.evidence()
    );
    eprintln!(
        "qemu e2e: guest run {:.1} s (accel {accel}), whole test {:.1} s",
        boot_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
