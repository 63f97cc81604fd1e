//! The host network as the driver loop sees it. Production implements it with tokio's
//! sockets ([`TokioNet`]); the simulator implements it with turmoil's, so the one driver
//! loop runs in both.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A boxed future the driver can spawn.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A datagram socket on the host.
pub trait HostUdp: Send + Sync + 'static {
    fn try_send_to(&self, payload: &[u8], dst: SocketAddr) -> io::Result<usize>;
    fn send_to<'a>(
        &'a self,
        payload: &'a [u8],
        dst: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;
    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send + 'a;
}

/// An ICMP echo socket on the host (unprivileged: the kernel picks the identifier).
pub trait HostPing: Send + Sync + 'static {
    fn send(&self, dst: IpAddr, seq: u16, payload: &[u8]) -> io::Result<()>;
    /// Receive one echo reply into `buf`: returns its sequence number and payload length.
    fn recv<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<(u16, usize)>> + Send + 'a;
}

/// What the driver needs from the host's network.
pub trait HostNet: Clone + Send + 'static {
    type Tcp: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Udp: HostUdp;
    type Ping: HostPing;

    fn tcp_connect(&self, dst: SocketAddr) -> BoxFuture<io::Result<Self::Tcp>>;
    /// Close with a RST rather than a FIN.
    fn tcp_abort(&self, stream: Self::Tcp);
    /// A UDP socket for a NAT entry whose first datagram goes to `first_dst`.
    fn udp_bind(&self, first_dst: SocketAddr) -> BoxFuture<io::Result<Self::Udp>>;
    fn ping_open(&self, dst: IpAddr) -> io::Result<Self::Ping>;

    /// Listen for TCP connections on `addr` (a port forward). Host networks without
    /// listeners answer `Unsupported`.
    fn tcp_listen(
        &self,
        addr: SocketAddr,
        backlog: u32,
    ) -> io::Result<Box<dyn HostListener<Self::Tcp>>> {
        let _ = (addr, backlog);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this host network has no TCP listeners",
        ))
    }

    /// Look `name` up with the host's resolver (getaddrinfo). `NotFound` means no such name.
    fn resolve(&self, name: String) -> BoxFuture<io::Result<Vec<IpAddr>>> {
        let _ = name;
        Box::pin(async {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this host network has no resolver",
            ))
        })
    }

    /// A UDP socket bound to `addr` (a UDP port forward).
    fn udp_bind_at(&self, addr: SocketAddr) -> BoxFuture<io::Result<Self::Udp>> {
        let _ = addr;
        Box::pin(async {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this host network cannot bind UDP",
            ))
        })
    }
}

/// A listening TCP socket on the host.
pub trait HostListener<T>: Send + Sync + 'static {
    fn poll_accept(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<(T, SocketAddr)>>;
}

impl HostListener<tokio::net::TcpStream> for tokio::net::TcpListener {
    fn poll_accept(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<(tokio::net::TcpStream, SocketAddr)>> {
        match tokio::net::TcpListener::poll_accept(self, cx) {
            std::task::Poll::Ready(Ok((s, a))) => {
                let _ = s.set_nodelay(true);
                std::task::Poll::Ready(Ok((s, a)))
            }
            other => other,
        }
    }
}

/// The unspecified address of `dst`'s family, to bind a socket that reaches it.
pub fn unspecified_for(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// The real host network, through tokio.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioNet;

impl HostUdp for tokio::net::UdpSocket {
    fn try_send_to(&self, payload: &[u8], dst: SocketAddr) -> io::Result<usize> {
        tokio::net::UdpSocket::try_send_to(self, payload, dst)
    }
    fn send_to<'a>(
        &'a self,
        payload: &'a [u8],
        dst: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        tokio::net::UdpSocket::send_to(self, payload, dst)
    }
    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send + 'a {
        tokio::net::UdpSocket::recv_from(self, buf)
    }
}

impl HostNet for TokioNet {
    type Tcp = tokio::net::TcpStream;
    type Udp = tokio::net::UdpSocket;
    type Ping = crate::ping::PingSocket;

    fn tcp_connect(&self, dst: SocketAddr) -> BoxFuture<io::Result<Self::Tcp>> {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(dst).await?;
            // The guest's own stack decides about coalescing; adding Nagle here would
            // only add latency to request/response traffic.
            s.set_nodelay(true)?;
            Ok(s)
        })
    }

    fn tcp_abort(&self, stream: Self::Tcp) {
        // SO_LINGER 0: close() sends a RST.
        let _ = socket_linger_zero(&stream);
        drop(stream);
    }

    fn udp_bind(&self, first_dst: SocketAddr) -> BoxFuture<io::Result<Self::Udp>> {
        Box::pin(tokio::net::UdpSocket::bind(unspecified_for(first_dst)))
    }

    fn ping_open(&self, dst: IpAddr) -> io::Result<Self::Ping> {
        crate::ping::PingSocket::open(dst)
    }

    fn tcp_listen(
        &self,
        addr: SocketAddr,
        backlog: u32,
    ) -> io::Result<Box<dyn HostListener<Self::Tcp>>> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok(Box::new(socket.listen(backlog)?))
    }

    fn udp_bind_at(&self, addr: SocketAddr) -> BoxFuture<io::Result<Self::Udp>> {
        Box::pin(tokio::net::UdpSocket::bind(addr))
    }

    fn resolve(&self, name: String) -> BoxFuture<io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            match tokio::net::lookup_host((name.as_str(), 0)).await {
                Ok(addrs) => Ok(addrs.map(|a| a.ip()).collect()),
                // getaddrinfo's EAI_NONAME: the name does not exist (NXDOMAIN).
                Err(e) if e.to_string().contains("not known") => {
                    Err(io::Error::new(io::ErrorKind::NotFound, e))
                }
                Err(e) => Err(e),
            }
        })
    }
}

fn socket_linger_zero(stream: &tokio::net::TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid fd and a correctly sized option value.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
