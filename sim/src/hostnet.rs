//! `HostNet` over turmoil: the production driver loop's host side in the simulated world.
//! Optional mutations (deliberately broken relays) prove that the oracles can fail.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use usernet::hostnet::{BoxFuture, HostListener, HostNet, HostPing, HostUdp};

use crate::world::{host_event, Mutation};

/// The simulated host network of the daemon.
#[derive(Clone)]
pub struct TurmoilNet {
    mutation: Mutation,
    /// The one-byte-loss mutation hits the first stream only.
    armed: Arc<AtomicBool>,
    /// Addresses that answer pings.
    ping_answers: Arc<Vec<IpAddr>>,
}

impl TurmoilNet {
    pub fn new(mutation: Mutation, ping_answers: Vec<IpAddr>) -> Self {
        TurmoilNet {
            mutation,
            armed: Arc::new(AtomicBool::new(true)),
            ping_answers: Arc::new(ping_answers),
        }
    }
}

/// A turmoil TCP stream, possibly broken on purpose.
pub struct SimTcp {
    inner: turmoil::net::TcpStream,
    peer: SocketAddr,
    /// Mutation: drop the byte at this offset of what is read from the host.
    drop_at: Option<u64>,
    /// Mutation: never report EOF (a relay that ignores FIN).
    swallow_eof: bool,
    read: u64,
    /// The peer sent its FIN.
    read_eof: bool,
    /// A write blocked since then, and the timer that fails it.
    write_blocked: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// turmoil gives a writer credits per segment in flight and takes them back when the peer
/// reads; when the peer's socket is gone (it closed, then crashed) the credits never come
/// back and the blocked writer is never woken, where a kernel would fail the write with
/// EPIPE/ECONNRESET once the peer's RST arrives (or ETIMEDOUT after its retransmissions).
/// So a write to a peer that already sent its FIN, blocked this long, fails. (Found with
/// upstream_crash seed 1773: the flow leaked.)
const WRITE_AFTER_EOF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Offset of the byte the lossy relay drops.
const DROPPED_BYTE: u64 = 1000;

impl AsyncRead for SimTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let n = (buf.filled().len() - before) as u64;
        if n == 0 {
            if !self.read_eof {
                let peer = self.peer;
                host_event("host-eof", || format!("{peer} EOF"));
            }
            self.read_eof = true;
            if self.swallow_eof {
                // Never woken again: the FIN is lost inside the relay.
                return Poll::Pending;
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(k) = self.drop_at {
            if (self.read..self.read + n).contains(&k) {
                let i = before + (k - self.read) as usize;
                let filled = buf.filled_mut();
                filled.copy_within(i + 1.., i);
                let len = buf.filled().len() - 1;
                buf.set_filled(len);
                self.drop_at = None;
                self.read += n;
                if n == 1 {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                return Poll::Ready(Ok(()));
            }
        }
        self.read += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SimTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending if self.read_eof => {
                let timer = self
                    .write_blocked
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_AFTER_EOF_TIMEOUT)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "peer gone (write blocked after its FIN)",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            other => {
                if other.is_ready() {
                    self.write_blocked = None;
                }
                other
            }
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // turmoil bug: a FIN that arrives while the peer's receive queue is full (every
        // write credit in use) waits in its reorder buffer until another segment comes,
        // which after a FIN never happens: the peer never sees EOF. Only send the FIN once
        // a credit is free, i.e. the queue has room. (Found with slow_reader seed 5188.)
        {
            let writable = self.inner.writable();
            let mut writable = std::pin::pin!(writable);
            if writable.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        if let Poll::Ready(r) = &r {
            let peer = self.peer;
            host_event("host-shutdown", || format!("{peer} shutdown(write): {r:?}"));
        }
        r
    }
}

/// A turmoil UDP socket; `twice` (mutation) sends every datagram two times.
pub struct SimUdp(turmoil::net::UdpSocket, bool);

impl HostUdp for SimUdp {
    fn try_send_to(&self, payload: &[u8], dst: SocketAddr) -> io::Result<usize> {
        if self.1 {
            let _ = self.0.try_send_to(payload, dst);
        }
        self.0.try_send_to(payload, dst)
    }
    fn send_to<'a>(
        &'a self,
        payload: &'a [u8],
        dst: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        self.0.send_to(payload, dst)
    }
    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send + 'a {
        self.0.recv_from(buf)
    }
}

/// turmoil has no ICMP: the sim's ping socket answers at once for the upstream hosts'
/// addresses (whether or not they are up) and never for others.
pub struct SimPing {
    answers: bool,
    replies: std::sync::Mutex<std::collections::VecDeque<(u16, Vec<u8>)>>,
    ready: tokio::sync::Notify,
}

impl HostPing for SimPing {
    fn send(&self, _dst: IpAddr, seq: u16, payload: &[u8]) -> io::Result<()> {
        if self.answers {
            let mut q = self.replies.lock().expect("not poisoned");
            q.push_back((seq, payload.to_vec()));
            self.ready.notify_one();
        }
        Ok(())
    }
    async fn recv(&self, buf: &mut [u8]) -> io::Result<(u16, usize)> {
        loop {
            let next = self.replies.lock().expect("not poisoned").pop_front();
            if let Some((seq, p)) = next {
                let n = p.len().min(buf.len());
                buf[..n].copy_from_slice(&p[..n]);
                return Ok((seq, n));
            }
            self.ready.notified().await;
        }
    }
}

impl HostNet for TurmoilNet {
    type Tcp = SimTcp;
    type Udp = SimUdp;
    type Ping = SimPing;

    fn tcp_connect(&self, dst: SocketAddr) -> BoxFuture<io::Result<SimTcp>> {
        let drop_at = (self.mutation == Mutation::RelayDropsByte
            && self.armed.swap(false, Ordering::Relaxed))
        .then_some(DROPPED_BYTE);
        let swallow_eof = self.mutation == Mutation::RelayIgnoresFin;
        Box::pin(async move {
            let inner = match turmoil::net::TcpStream::connect(dst).await {
                Ok(s) => s,
                Err(e) => {
                    host_event("host-connect-failed", || format!("connect {dst}: {e}"));
                    return Err(e);
                }
            };
            host_event("host-connected", || format!("connected to {dst}"));
            Ok(SimTcp {
                peer: dst,
                inner,
                drop_at,
                swallow_eof,
                read: 0,
                read_eof: false,
                write_blocked: None,
            })
        })
    }

    fn tcp_abort(&self, stream: SimTcp) {
        let peer = stream.peer;
        host_event("host-abort", || format!("{peer} abort"));
        // turmoil sends a RST when a stream with unread data is dropped, a FIN otherwise;
        // it has no SO_LINGER 0.
        drop(stream);
    }

    fn udp_bind(&self, first_dst: SocketAddr) -> BoxFuture<io::Result<SimUdp>> {
        let local = usernet::hostnet::unspecified_for(first_dst);
        let twice = self.mutation == Mutation::UdpTwice;
        Box::pin(async move { Ok(SimUdp(turmoil::net::UdpSocket::bind(local).await?, twice)) })
    }

    fn tcp_listen(
        &self,
        addr: SocketAddr,
        _backlog: u32,
    ) -> io::Result<Box<dyn HostListener<SimTcp>>> {
        // turmoil's bind is async but completes at once (it only touches the world).
        let bind = turmoil::net::TcpListener::bind(addr);
        let mut bind = std::pin::pin!(bind);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let listener = match bind.as_mut().poll(&mut cx) {
            Poll::Ready(r) => r?,
            Poll::Pending => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "turmoil bind did not complete",
                ))
            }
        };
        host_event("host-listen", || format!("listening on {addr}"));
        Ok(Box::new(SimListener {
            listener: Arc::new(listener),
            accept: std::sync::Mutex::new(None),
            addr,
        }))
    }

    fn udp_bind_at(&self, addr: SocketAddr) -> BoxFuture<io::Result<SimUdp>> {
        let twice = self.mutation == Mutation::UdpTwice;
        Box::pin(async move { Ok(SimUdp(turmoil::net::UdpSocket::bind(addr).await?, twice)) })
    }

    fn ping_open(&self, dst: IpAddr) -> io::Result<SimPing> {
        Ok(SimPing {
            answers: self.ping_answers.contains(&dst),
            replies: Default::default(),
            ready: tokio::sync::Notify::new(),
        })
    }
}

type AcceptFuture =
    Pin<Box<dyn Future<Output = io::Result<(turmoil::net::TcpStream, SocketAddr)>> + Send>>;

/// A forward's listener: turmoil's `accept` is a future, kept between polls.
pub struct SimListener {
    listener: Arc<turmoil::net::TcpListener>,
    accept: std::sync::Mutex<Option<AcceptFuture>>,
    addr: SocketAddr,
}

impl Drop for SimListener {
    fn drop(&mut self) {
        let addr = self.addr;
        host_event("host-unlisten", || format!("stopped listening on {addr}"));
    }
}

impl HostListener<SimTcp> for SimListener {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(SimTcp, SocketAddr)>> {
        let mut slot = self.accept.lock().expect("not poisoned");
        let fut = slot.get_or_insert_with(|| {
            let l = self.listener.clone();
            Box::pin(async move { l.accept().await })
        });
        match fut.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                *slot = None;
                let (inner, peer) = r?;
                host_event("host-accepted", || format!("accepted {peer}"));
                Poll::Ready(Ok((
                    SimTcp {
                        inner,
                        peer,
                        drop_at: None,
                        swallow_eof: false,
                        read: 0,
                        read_eof: false,
                        write_blocked: None,
                    },
                    peer,
                )))
            }
        }
    }
}
