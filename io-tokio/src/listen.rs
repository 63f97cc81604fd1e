//! Listeners of `usernet serve --listen SPEC`: each accepted connection (or datagram
//! socket, or stdio) becomes a port of the virtual switch.
//!
//! - `unix:PATH[,framing=qemu|u16le|vmnet]`: a UNIX stream listener. `qemu` (u32 BE,
//!   the default) for QEMU `-netdev stream` and passt clients, `u16le` for
//!   gvisor-tap-vsock style clients, `vmnet` for VPNKit/hyperkit clients. Firecracker
//!   and Cloud Hypervisor deliver a guest's vsock connections to port P on the host
//!   socket `<uds_path>_<P>`: listen on that path with the guest's framing.
//! - `unixgram:PATH`: vfkit/libkrun datagrams, one frame each ([`crate::unixgram`]).
//! - `vsock:PORT[,framing=...]`: AF_VSOCK from guests (u16le by default, as
//!   gvisor-tap-vsock's in-guest forwarder speaks).
//! - `stdio`: u16 LE frames on stdin/stdout, for a VMM that spawns usernet.
//!
//! Each listener runs in a task of its own and hands ports to the switch over a
//! channel. A connection whose handshake fails is logged and closed; the listener keeps
//! serving. A listener for another platform (Hyper-V sockets on Windows) is one more
//! variant here and a module producing `Box<dyn Port>`.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::framing::{FramedPort, Framing};
use crate::stream::{self, StreamListener};
use crate::transport::Port;
use crate::vmnet;
use crate::vswitch::{NewPort, PortSender};

/// How frames are delimited on a stream listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFraming {
    /// u32 big-endian length (QEMU, passt).
    Qemu,
    /// u16 little-endian length (gvisor-tap-vsock, VPNKit after its handshake).
    U16Le,
    /// The VPNKit/hyperkit handshake, then u16 LE frames.
    Vmnet,
}

impl StreamFraming {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamFraming::Qemu => "qemu",
            StreamFraming::U16Le => "u16le",
            StreamFraming::Vmnet => "vmnet",
        }
    }
}

impl FromStr for StreamFraming {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qemu" | "u32be" | "passt" => Ok(StreamFraming::Qemu),
            "u16le" | "gvproxy" | "bess" => Ok(StreamFraming::U16Le),
            "vmnet" | "vpnkit" | "hyperkit" => Ok(StreamFraming::Vmnet),
            _ => Err(format!("unknown framing {s:?} (qemu, u16le or vmnet)")),
        }
    }
}

/// One `--listen` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenSpec {
    Unix {
        path: PathBuf,
        framing: StreamFraming,
    },
    Unixgram {
        path: PathBuf,
    },
    Vsock {
        port: u32,
        framing: StreamFraming,
    },
    Stdio,
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenSpec::Unix { path, framing } => {
                write!(f, "unix:{},framing={}", path.display(), framing.as_str())
            }
            ListenSpec::Unixgram { path } => write!(f, "unixgram:{}", path.display()),
            ListenSpec::Vsock { port, framing } => {
                write!(f, "vsock:{port},framing={}", framing.as_str())
            }
            ListenSpec::Stdio => f.write_str("stdio"),
        }
    }
}

impl FromStr for ListenSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "stdio" {
            return Ok(ListenSpec::Stdio);
        }
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            format!("--listen {s:?}: expected unix:PATH, unixgram:PATH, vsock:PORT or stdio")
        })?;
        // Options follow the last comma that starts a `key=value`; paths may hold commas.
        let (target, opts) = match rest.rfind(",framing=") {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let mut framing = None;
        if let Some(opts) = opts {
            for o in opts.split(',') {
                match o.split_once('=') {
                    Some(("framing", v)) => framing = Some(v.parse::<StreamFraming>()?),
                    _ => return Err(format!("--listen {s:?}: unknown option {o:?}")),
                }
            }
        }
        if target.is_empty() {
            return Err(format!("--listen {s:?}: missing the address"));
        }
        match kind {
            "unix" => Ok(ListenSpec::Unix {
                path: target.into(),
                framing: framing.unwrap_or(StreamFraming::Qemu),
            }),
            "unixgram" if framing.is_none() => Ok(ListenSpec::Unixgram {
                path: target.into(),
            }),
            "unixgram" => Err(format!(
                "--listen {s:?}: datagram sockets carry one frame per datagram (no framing option)"
            )),
            "vsock" => Ok(ListenSpec::Vsock {
                port: target
                    .parse()
                    .map_err(|_| format!("--listen {s:?}: {target:?} is not a vsock port"))?,
                framing: framing.unwrap_or(StreamFraming::U16Le),
            }),
            _ => Err(format!(
                "--listen {s:?}: unknown kind {kind:?} (unix, unixgram, vsock or stdio)"
            )),
        }
    }
}

/// Settings every listener shares.
#[derive(Clone, Copy, Debug)]
pub struct ListenOptions {
    pub backlog: u32,
    /// The MTU announced to vmnet clients.
    pub mtu: u16,
}

/// Time a vmnet client gets to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most per listener; more connections wait in the backlog.
const MAX_HANDSHAKES: usize = 64;

/// Bind the listener of `spec` now (so errors stop the daemon at start) and serve it in
/// a task that hands ports to `ports`.
pub async fn start(spec: &ListenSpec, opts: ListenOptions, ports: PortSender) -> io::Result<()> {
    match spec {
        ListenSpec::Unix { path, framing } => {
            let listener = stream::bind(path, opts.backlog)?;
            tracing::info!(listen = %spec, "listening");
            tokio::spawn(serve_unix(listener, *framing, opts, ports));
        }
        ListenSpec::Unixgram { path } => {
            let sock = crate::unixgram::bind(path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot bind {}: {e}", path.display()))
            })?;
            tracing::info!(listen = %spec, "listening");
            let port = crate::unixgram::DgramPort::new(sock, path.clone());
            let guard = RemoveOnDrop(path.clone());
            let new = NewPort {
                port: Box::new(WithGuard {
                    port,
                    _guard: guard,
                }),
                label: spec.to_string(),
                preferred: None,
            };
            ports
                .send(new)
                .await
                .map_err(|_| io::Error::other("the switch is gone"))?;
        }
        ListenSpec::Vsock { port, framing } => {
            let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port);
            let listener = tokio_vsock::VsockListener::bind(addr).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on vsock port {port}: {e}"))
            })?;
            tracing::info!(listen = %spec, "listening");
            tokio::spawn(serve_vsock(listener, *framing, opts, ports));
        }
        ListenSpec::Stdio => {
            let io = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
            let new = NewPort {
                port: Box::new(FramedPort::new(io, Framing::U16Le)),
                label: "stdio".into(),
                preferred: None,
            };
            ports
                .send(new)
                .await
                .map_err(|_| io::Error::other("the switch is gone"))?;
        }
    }
    Ok(())
}

/// Removes a datagram socket's file when its port goes.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct WithGuard<P> {
    port: P,
    _guard: RemoveOnDrop,
}

impl<P: Port> Port for WithGuard<P> {
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<bool>> {
        self.port.poll_recv(cx)
    }
    fn peek_frame(&self) -> Option<&[u8]> {
        self.port.peek_frame()
    }
    fn pop_frame(&mut self) {
        self.port.pop_frame()
    }
    fn send_frame(&mut self, frame: &[u8]) -> bool {
        self.port.send_frame(frame)
    }
    fn pending(&self) -> usize {
        self.port.pending()
    }
    fn poll_flush(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        self.port.poll_flush(cx)
    }
}

/// 16 bytes from the OS for UUIDs the server picks (the daemon may use OS randomness).
fn os_random() -> [u8; 16] {
    use std::io::Read;
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    b
}

/// Turn one accepted connection into a port (running the vmnet handshake if asked).
async fn make_port<S>(
    mut io: S,
    framing: StreamFraming,
    opts: ListenOptions,
    label: String,
) -> Option<NewPort>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let framing = match framing {
        StreamFraming::Qemu => Framing::U32Be,
        StreamFraming::U16Le => Framing::U16Le,
        StreamFraming::Vmnet => {
            let r = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                vmnet::handshake(&mut io, opts.mtu, os_random),
            )
            .await;
            match r {
                Ok(Ok(s)) => {
                    let mac = s.mac.map(|b| format!("{b:02x}")).join(":");
                    tracing::info!(
                        listener = %label, uuid = %s.uuid, %mac, preferred_ip = ?s.preferred_ip,
                        "vmnet client connected"
                    );
                    let mut port = FramedPort::new(io, Framing::U16Le);
                    port.set_fixup(vmnet::fill_ipv4_checksum);
                    return Some(NewPort {
                        port: Box::new(port),
                        label: format!("{label} vmnet:{}", s.uuid),
                        preferred: s.preferred_ip.map(|ip| (s.mac, ip)),
                    });
                }
                Ok(Err(e)) => {
                    tracing::warn!(listener = %label, "vmnet handshake failed: {e}; connection closed");
                    return None;
                }
                Err(_) => {
                    tracing::warn!(listener = %label, "vmnet handshake timed out; connection closed");
                    return None;
                }
            }
        }
    };
    Some(NewPort {
        port: Box::new(FramedPort::new(io, framing)),
        label,
        preferred: None,
    })
}

async fn serve_unix(
    listener: StreamListener,
    framing: StreamFraming,
    opts: ListenOptions,
    ports: PortSender,
) {
    let label = format!("unix:{}", listener.path().display());
    let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = match handshakes.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = ports.closed() => return,
        };
        match conn {
            Ok(conn) => {
                let ports = ports.clone();
                let label = label.clone();
                tokio::spawn(async move {
                    let port = make_port(conn, framing, opts, label).await;
                    drop(permit);
                    if let Some(p) = port {
                        let _ = ports.send(p).await;
                    }
                });
            }
            Err(e) => {
                tracing::warn!(listener = %label, "accept failed: {e}");
                // Out of descriptors and the like: pause rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_vsock(
    listener: tokio_vsock::VsockListener,
    framing: StreamFraming,
    opts: ListenOptions,
    ports: PortSender,
) {
    let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = match handshakes.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = ports.closed() => return,
        };
        match conn {
            Ok((conn, addr)) => {
                let ports = ports.clone();
                let label = format!("vsock:{}:{}", addr.cid(), addr.port());
                tokio::spawn(async move {
                    let port = make_port(conn, framing, opts, label).await;
                    drop(permit);
                    if let Some(p) = port {
                        let _ = ports.send(p).await;
                    }
                });
            }
            Err(e) => {
                tracing::warn!("vsock accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::FrameTransport;
    use crate::vswitch::VirtualSwitch;
    use usernet_core::SwitchConfig;

    /// Binds an AF_VSOCK listener if this kernel allows it, and carries a frame through
    /// the local loopback transport (CID 1) if that is loaded; otherwise says what it
    /// could not do. The framing itself is the UNIX listeners' (tested there).
    #[tokio::test]
    async fn vsock_listener_binds_where_the_kernel_allows() {
        let gw = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
        let (tx, mut sw) = VirtualSwitch::channel(SwitchConfig::new(gw));
        let port = 0x7500_0000 + std::process::id();
        let spec = ListenSpec::Vsock {
            port,
            framing: StreamFraming::U16Le,
        };
        let opts = ListenOptions {
            backlog: 8,
            mtu: 1500,
        };
        if let Err(e) = start(&spec, opts, tx).await {
            eprintln!("skipping: no AF_VSOCK listener on this machine: {e}");
            return;
        }
        let addr = tokio_vsock::VsockAddr::new(1, port);
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_vsock::VsockStream::connect(addr),
        )
        .await;
        let mut s = match conn {
            Ok(Ok(s)) => s,
            other => {
                eprintln!(
                    "vsock listener bound; no loopback transport to connect through: {other:?}"
                );
                return;
            }
        };
        use tokio::io::AsyncWriteExt;
        let mut f = gw.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x88, 0xb5]);
        f.resize(60, 7);
        let mut w = (f.len() as u16).to_le_bytes().to_vec();
        w.extend_from_slice(&f);
        s.write_all(&w).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                assert!(sw.recv().await.unwrap());
                if let Some(g) = sw.next_frame() {
                    return g.to_vec();
                }
            }
        })
        .await
        .expect("the frame through vsock");
        assert_eq!(got, f);
    }

    #[test]
    fn specs_parse() {
        let p = |s: &str| s.parse::<ListenSpec>();
        assert_eq!(
            p("unix:/tmp/a.sock").unwrap(),
            ListenSpec::Unix {
                path: "/tmp/a.sock".into(),
                framing: StreamFraming::Qemu
            }
        );
        assert_eq!(
            p("unix:/tmp/v.sock_1024,framing=vmnet").unwrap(),
            ListenSpec::Unix {
                path: "/tmp/v.sock_1024".into(),
                framing: StreamFraming::Vmnet
            }
        );
        assert_eq!(
            p("unix:/tmp/a,b.sock,framing=u16le").unwrap(),
            ListenSpec::Unix {
                path: "/tmp/a,b.sock".into(),
                framing: StreamFraming::U16Le
            }
        );
        assert_eq!(
            p("vsock:1024").unwrap(),
            ListenSpec::Vsock {
                port: 1024,
                framing: StreamFraming::U16Le
            }
        );
        assert_eq!(
            p("unixgram:/tmp/g.sock").unwrap(),
            ListenSpec::Unixgram {
                path: "/tmp/g.sock".into()
            }
        );
        assert_eq!(p("stdio").unwrap(), ListenSpec::Stdio);
        assert!(p("unix:/x,framing=bogus")
            .unwrap_err()
            .contains("unknown framing"));
        assert!(p("vsock:abc").unwrap_err().contains("not a vsock port"));
        assert!(p("unixgram:/x,framing=qemu").is_err());
        assert!(p("tcp:1.2.3.4:5").unwrap_err().contains("unknown kind"));
        assert!(p("unix:").is_err());
        assert!(p("nonsense").is_err());
        // Display gives back a parseable spec.
        let s = p("unix:/tmp/v.sock,framing=vmnet").unwrap();
        assert_eq!(p(&s.to_string()).unwrap(), s);
    }
}
