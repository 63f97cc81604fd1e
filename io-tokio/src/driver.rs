//! The one driver loop: it joins a [`Stack`] to a frame transport and to the host network.
//! Written once, generic over [`HostNet`], so the simulator runs this very loop over
//! turmoil's sockets.
//!
//! TCP flows are polled in place: each host stream gets a waker of its own that queues
//! the flow's id, and bytes move straight between the kernel socket and smoltcp's buffers
//! (`poll_read` into the send buffer, `poll_write` from the receive buffer): no task, no
//! channel and no copy per segment. UDP and ping sockets get a small task each, since a
//! NAT entry's traffic is datagrams rather than a stream.

use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use usernet_core::{ConnectError, FlowId, HostCommand, Instant, Stack};

use crate::hostnet::{BoxFuture, HostNet, HostPing, HostUdp};
use crate::transport::FrameTransport;

/// Bytes queued towards the guest before the loop stops draining the core and flushes.
const TX_HIGH_WATER: usize = 256 * 1024;
/// Host events taken per loop turn before the guest side gets its turn again.
const EVENT_BATCH: usize = 64;

/// What the host side reports back to the loop.
enum Event {
    Ping(FlowId, u16, Vec<u8>),
}

/// Flow ids whose host socket became ready, and the loop's waker.
#[derive(Default)]
struct ReadyQueue {
    inner: Mutex<(Vec<FlowId>, Option<Waker>)>,
}

impl ReadyQueue {
    fn push(&self, id: FlowId) {
        let mut g = self.inner.lock().expect("not poisoned");
        g.0.push(id);
        if let Some(w) = g.1.take() {
            w.wake();
        }
    }
    fn take(&self, into: &mut Vec<FlowId>) {
        let mut g = self.inner.lock().expect("not poisoned");
        into.append(&mut g.0);
    }
    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut g = self.inner.lock().expect("not poisoned");
        if g.0.is_empty() {
            g.1 = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

struct FlowWaker {
    id: FlowId,
    queue: Arc<ReadyQueue>,
}

impl Wake for FlowWaker {
    fn wake(self: Arc<Self>) {
        self.queue.push(self.id);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.queue.push(self.id);
    }
}

struct TcpIo<S> {
    stream: S,
    waker: Waker,
    shutdown_wanted: bool,
    write_shut: bool,
    read_eof: bool,
}

/// A host connect in progress.
type ConnectFuture<T> = BoxFuture<io::Result<T>>;

/// A receive in progress on a UDP flow's socket; the buffer travels with it.
type RecvFuture = BoxFuture<(io::Result<(usize, SocketAddr)>, Vec<u8>)>;

enum UdpState<U> {
    Binding(BoxFuture<io::Result<U>>),
    Open { socket: Arc<U>, recv: RecvFuture },
    Failed,
}

/// A UDP NAT entry's host socket, polled in place like the TCP streams: sends go out
/// directly from the loop (`try_send_to`), receives complete with the flow's waker.
struct UdpIo<U> {
    state: UdpState<U>,
    waker: Waker,
    /// Datagrams waiting for the socket (still binding, or its send buffer was full).
    queued: std::collections::VecDeque<(SocketAddr, Vec<u8>)>,
    /// The send of the queue's head, waiting for the socket to become writable.
    sending: Option<BoxFuture<io::Result<usize>>>,
}

fn recv_future<U: HostUdp>(socket: Arc<U>, mut buf: Vec<u8>) -> RecvFuture {
    Box::pin(async move {
        let r = socket.recv_from(&mut buf).await;
        (r, buf)
    })
}

/// Datagrams held per flow while its socket binds or cannot take more.
const UDP_QUEUE: usize = 64;
/// Datagrams taken from one UDP socket per service before others get their turn.
const UDP_RECV_BATCH: usize = 64;

struct PingIo {
    tx: mpsc::Sender<(IpAddr, u16, Vec<u8>)>,
}

/// Counters of the driver itself (the core keeps its own).
#[derive(Clone, Debug, Default)]
pub struct DriverStats {
    pub connects_ok: u64,
    pub connects_failed: u64,
    pub udp_dropped: u64,
    pub ping_unavailable: u64,
}

/// The loop's state apart from the core and the transport.
pub struct Driver<N: HostNet> {
    net: N,
    start: tokio::time::Instant,
    tcp: BTreeMap<FlowId, TcpIo<N::Tcp>>,
    /// Host connects in progress, polled in place with the flow's waker.
    pending_connects: BTreeMap<FlowId, (ConnectFuture<N::Tcp>, Waker)>,
    /// Connects that finished while a command borrowed the stack.
    connected: Vec<(FlowId, io::Result<N::Tcp>, Waker)>,
    udp: BTreeMap<FlowId, UdpIo<N::Udp>>,
    pings: BTreeMap<FlowId, PingIo>,
    ready: Arc<ReadyQueue>,
    ready_ids: Vec<FlowId>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    pub stats: DriverStats,
}

impl<N: HostNet> Driver<N> {
    pub fn new(net: N) -> Self {
        let (events_tx, events_rx) = mpsc::channel(4096);
        Driver {
            net,
            start: tokio::time::Instant::now(),
            tcp: BTreeMap::new(),
            pending_connects: BTreeMap::new(),
            connected: Vec::new(),
            udp: BTreeMap::new(),
            pings: BTreeMap::new(),
            ready: Arc::default(),
            ready_ids: Vec::new(),
            events_tx,
            events_rx,
            stats: DriverStats::default(),
        }
    }

    /// The core's clock: time since the driver started, from tokio's clock (which the
    /// simulator controls).
    pub fn now(&self) -> Instant {
        Instant::from_micros((tokio::time::Instant::now() - self.start).as_micros() as i64)
    }

    /// The instant the core's clock calls `t`, on tokio's clock.
    fn tokio_instant(&self, t: Instant) -> tokio::time::Instant {
        self.start + std::time::Duration::from_micros(t.total_micros().max(0) as u64)
    }

    /// Host sockets open (TCP, UDP, ping), for leak checks.
    pub fn open_sockets(&self) -> usize {
        self.tcp.len()
            + self.pending_connects.len()
            + self.connected.len()
            + self.udp.len()
            + self.pings.len()
    }

    /// Serve `transport` until the guest side ends or `stop` completes.
    pub async fn run<T: FrameTransport>(
        &mut self,
        stack: &mut Stack,
        transport: &mut T,
        stop: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let mut stop = std::pin::pin!(stop);
        let mut sleep = Box::pin(tokio::time::sleep_until(tokio::time::Instant::now()));
        let mut armed: Option<tokio::time::Instant> = None;
        loop {
            self.settle(stack, transport)?;
            if transport.pending() > 0 {
                transport.flush().await?;
                // Flushing took time and made room: drain the rest before sleeping.
                self.settle(stack, transport)?;
                if transport.pending() > 0 {
                    transport.flush().await?;
                }
            }
            let deadline = stack.poll_timeout().map(|t| self.tokio_instant(t));
            // The timer is re-armed only when the core needs an earlier wake-up: moving a
            // tokio timer earlier costs a driver unpark (an eventfd write and an extra
            // epoll round), and the delayed-ACK deadline moves with every request. A later
            // deadline leaves the timer as it is: it fires early, the loop finds nothing
            // due and re-arms.
            match (deadline, armed) {
                (Some(d), Some(a)) if a <= d => {}
                (Some(d), _) => {
                    sleep.as_mut().reset(d);
                    armed = Some(d);
                }
                (None, _) => {}
            }
            let ready = self.ready.clone();
            tokio::select! {
                biased;
                _ = &mut stop => return Ok(()),
                r = transport.recv() => {
                    if !r? {
                        return Ok(());
                    }
                    let now = self.now();
                    while let Some(frame) = transport.next_frame() {
                        stack.handle_frame(now, frame);
                    }
                }
                ev = self.events_rx.recv() => {
                    if let Some(ev) = ev {
                        self.handle_event(stack, ev);
                    }
                }
                _ = poll_fn(|cx| ready.poll_ready(cx)) => {}
                _ = sleep.as_mut(), if armed.is_some() => armed = None,
            }
            // Whatever woke us, give every source its turn so none starves under load.
            for _ in 0..EVENT_BATCH {
                match self.events_rx.try_recv() {
                    Ok(ev) => self.handle_event(stack, ev),
                    Err(_) => break,
                }
            }
            self.service_ready(stack);
        }
    }

    /// Run the core and carry out its commands until nothing more comes out (bounded),
    /// queueing frames for the guest up to the high-water mark.
    fn settle<T: FrameTransport>(
        &mut self,
        stack: &mut Stack,
        transport: &mut T,
    ) -> io::Result<()> {
        for _ in 0..8 {
            stack.poll(self.now());
            let mut did = false;
            while let Some(cmd) = stack.poll_command() {
                did = true;
                // A command borrows the stack, so flows it wants serviced are queued and
                // serviced right after.
                self.command(cmd);
            }
            if self.service_ready_now(stack) {
                did = true;
            }
            while transport.pending() < TX_HIGH_WATER {
                let Some(frame) = stack.peek_frame() else {
                    break;
                };
                transport.send_frame(frame)?;
                stack.pop_frame();
            }
            if !did {
                break;
            }
        }
        Ok(())
    }

    fn command(&mut self, cmd: HostCommand<'_>) {
        match cmd {
            HostCommand::TcpConnect { flow, dst } => {
                // Polled in place rather than spawned: no task and no channel hop per
                // connection, and the flow's waker is the one its stream keeps.
                let waker = Waker::from(Arc::new(FlowWaker {
                    id: flow,
                    queue: self.ready.clone(),
                }));
                let mut fut = self.net.tcp_connect(dst);
                match fut.as_mut().poll(&mut Context::from_waker(&waker)) {
                    Poll::Ready(r) => self.connected.push((flow, r, waker)),
                    Poll::Pending => {
                        self.pending_connects.insert(flow, (fut, waker));
                    }
                }
            }
            HostCommand::TcpReady { flow } => self.ready_ids.push(flow),
            HostCommand::TcpShutdownWrite { flow } => {
                if let Some(io) = self.tcp.get_mut(&flow) {
                    io.shutdown_wanted = true;
                    self.ready_ids.push(flow);
                }
            }
            HostCommand::TcpClose { flow } => {
                self.pending_connects.remove(&flow);
                self.connected.retain(|(f, ..)| *f != flow);
                self.tcp.remove(&flow);
            }
            HostCommand::TcpAbort { flow } => {
                self.pending_connects.remove(&flow);
                self.connected.retain(|(f, ..)| *f != flow);
                if let Some(io) = self.tcp.remove(&flow) {
                    self.net.tcp_abort(io.stream);
                }
            }
            HostCommand::UdpSend { flow, dst, payload } => self.udp_send(flow, dst, payload),
            HostCommand::UdpClose { flow } => {
                self.udp.remove(&flow);
            }
            HostCommand::PingSend {
                flow,
                dst,
                seq,
                payload,
            } => self.ping_send(flow, dst, seq, payload),
            HostCommand::PingClose { flow } => {
                self.pings.remove(&flow);
            }
        }
    }

    fn handle_event(&mut self, stack: &mut Stack, ev: Event) {
        let now = self.now();
        match ev {
            Event::Ping(flow, seq, data) => stack.ping_reply(now, flow, seq, &data),
        }
    }

    /// A host connect finished.
    fn connect_done(
        &mut self,
        stack: &mut Stack,
        flow: FlowId,
        r: io::Result<N::Tcp>,
        waker: Waker,
    ) {
        let now = self.now();
        match r {
            Ok(stream) => {
                self.stats.connects_ok += 1;
                self.tcp.insert(
                    flow,
                    TcpIo {
                        stream,
                        waker,
                        shutdown_wanted: false,
                        write_shut: false,
                        read_eof: false,
                    },
                );
                stack.tcp_connected(now, flow);
                // Start reading at once: servers that speak first (SSH, SMTP) must reach
                // the guest without the guest sending anything.
                self.ready_ids.push(flow);
            }
            Err(e) => {
                self.stats.connects_failed += 1;
                tracing::debug!(%flow, error = %e, "host connect failed");
                stack.tcp_connect_failed(now, flow, connect_error(&e));
            }
        }
    }

    fn service_ready(&mut self, stack: &mut Stack) {
        self.ready.take(&mut self.ready_ids);
        self.service_ready_now(stack);
    }

    /// Service every queued flow; true if there were any.
    fn service_ready_now(&mut self, stack: &mut Stack) -> bool {
        let connected = !self.connected.is_empty();
        for (flow, r, waker) in std::mem::take(&mut self.connected) {
            self.connect_done(stack, flow, r, waker);
        }
        if self.ready_ids.is_empty() {
            return connected;
        }
        let mut ids = std::mem::take(&mut self.ready_ids);
        ids.sort_unstable();
        ids.dedup();
        for id in ids.drain(..) {
            if let Some((fut, waker)) = self.pending_connects.get_mut(&id) {
                if let Poll::Ready(r) = fut.as_mut().poll(&mut Context::from_waker(waker)) {
                    let (_, waker) = self.pending_connects.remove(&id).expect("present");
                    self.connect_done(stack, id, r, waker);
                }
                continue;
            }
            if self.udp.contains_key(&id) {
                self.service_udp(stack, id);
                continue;
            }
            self.service_tcp(stack, id);
        }
        // Keep what servicing queued again (a flow that just connected, a busy socket).
        ids.append(&mut self.ready_ids);
        self.ready_ids = ids;
        true
    }

    /// Move what can be moved between one host stream and the core, registering the
    /// flow's waker wherever the stream is not ready.
    fn service_tcp(&mut self, stack: &mut Stack, flow: FlowId) {
        let Some(io) = self.tcp.get_mut(&flow) else {
            return;
        };
        let waker = io.waker.clone();
        let mut cx = Context::from_waker(&waker);
        // Guest to host.
        loop {
            let data = stack.tcp_to_host(flow);
            if data.is_empty() {
                break;
            }
            match Pin::new(&mut io.stream).poll_write(&mut cx, data) {
                Poll::Ready(Ok(n)) if n > 0 => stack.tcp_consume_to_host(flow, n),
                Poll::Ready(Ok(_)) | Poll::Ready(Err(_)) => {
                    self.reset(stack, flow);
                    return;
                }
                Poll::Pending => break,
            }
        }
        if io.shutdown_wanted && !io.write_shut && stack.tcp_to_host(flow).is_empty() {
            match Pin::new(&mut io.stream).poll_shutdown(&mut cx) {
                Poll::Ready(_) => io.write_shut = true,
                Poll::Pending => {}
            }
        }
        // Host to guest, as far as the flow's send buffer has room.
        while !io.read_eof {
            let r = stack.tcp_from_host(flow, |buf| {
                let mut rb = ReadBuf::new(buf);
                match Pin::new(&mut io.stream).poll_read(&mut cx, &mut rb) {
                    Poll::Ready(Ok(())) => (rb.filled().len(), Some(Ok(rb.filled().len()))),
                    Poll::Ready(Err(e)) => (0, Some(Err(e))),
                    Poll::Pending => (0, None),
                }
            });
            match r {
                None | Some(None) => break,
                Some(Some(Ok(0))) => {
                    io.read_eof = true;
                    stack.tcp_host_eof(flow);
                }
                Some(Some(Ok(_))) => {}
                Some(Some(Err(_))) => {
                    self.reset(stack, flow);
                    return;
                }
            }
        }
    }

    fn reset(&mut self, stack: &mut Stack, flow: FlowId) {
        if let Some(io) = self.tcp.remove(&flow) {
            self.net.tcp_abort(io.stream);
        }
        stack.tcp_host_reset(flow);
    }

    fn udp_send(&mut self, flow: FlowId, dst: SocketAddr, payload: &[u8]) {
        let io = match self.udp.get_mut(&flow) {
            Some(io) => io,
            None => {
                let waker = Waker::from(Arc::new(FlowWaker {
                    id: flow,
                    queue: self.ready.clone(),
                }));
                let bind = self.net.udp_bind(dst);
                let io = UdpIo {
                    state: UdpState::Binding(bind),
                    waker,
                    queued: Default::default(),
                    sending: None,
                };
                self.udp.insert(flow, io);
                self.udp.get_mut(&flow).expect("just inserted")
            }
        };
        if let UdpState::Open { socket, .. } = &io.state {
            if io.queued.is_empty() && io.sending.is_none() {
                match socket.try_send_to(payload, dst) {
                    Ok(_) => return,
                    // Not known writable yet (a fresh socket) or its buffer is full: queue.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // UDP may drop, as a link would.
                    Err(_) => {
                        self.stats.udp_dropped += 1;
                        return;
                    }
                }
            }
        }
        if matches!(io.state, UdpState::Failed) || io.queued.len() >= UDP_QUEUE {
            self.stats.udp_dropped += 1;
            return;
        }
        io.queued.push_back((dst, payload.to_vec()));
        self.ready_ids.push(flow);
    }

    /// Bind a UDP flow's socket when due, send what waited for it, and hand received
    /// datagrams to the core.
    fn service_udp(&mut self, stack: &mut Stack, flow: FlowId) {
        let now = self.now();
        let Some(io) = self.udp.get_mut(&flow) else {
            return;
        };
        let mut cx = Context::from_waker(&io.waker);
        if let UdpState::Binding(bind) = &mut io.state {
            match bind.as_mut().poll(&mut cx) {
                Poll::Pending => return,
                Poll::Ready(Err(e)) => {
                    tracing::debug!(%flow, error = %e, "udp bind failed");
                    self.stats.udp_dropped += io.queued.len() as u64;
                    io.queued.clear();
                    io.state = UdpState::Failed;
                    return;
                }
                Poll::Ready(Ok(socket)) => {
                    let socket = Arc::new(socket);
                    let recv = recv_future(socket.clone(), vec![0u8; 65536]);
                    io.state = UdpState::Open { socket, recv };
                }
            }
        }
        let UdpState::Open { socket, recv } = &mut io.state else {
            return;
        };
        // Sends that had to wait, in order.
        loop {
            if io.sending.is_none() {
                let Some((dst, data)) = io.queued.pop_front() else {
                    break;
                };
                let socket = socket.clone();
                io.sending = Some(Box::pin(async move { socket.send_to(&data, dst).await }));
            }
            let sending = io.sending.as_mut().expect("set above");
            match sending.as_mut().poll(&mut cx) {
                Poll::Pending => break,
                Poll::Ready(r) => {
                    if r.is_err() {
                        self.stats.udp_dropped += 1;
                    }
                    io.sending = None;
                }
            }
        }
        for _ in 0..UDP_RECV_BATCH {
            match recv.as_mut().poll(&mut cx) {
                Poll::Pending => return,
                Poll::Ready((r, buf)) => {
                    match r {
                        Ok((n, from)) => stack.udp_from_host(now, flow, from, &buf[..n]),
                        // An ICMP error for an earlier send, surfaced on this socket.
                        Err(e) => tracing::trace!(%flow, error = %e, "udp receive error"),
                    }
                    *recv = recv_future(socket.clone(), buf);
                }
            }
        }
        // More may be waiting: come back after the others had their turn.
        self.ready_ids.push(flow);
    }

    fn ping_send(&mut self, flow: FlowId, dst: IpAddr, seq: u16, payload: &[u8]) {
        if let Some(io) = self.pings.get(&flow) {
            let _ = io.tx.try_send((dst, seq, payload.to_vec()));
            return;
        }
        let socket = match self.net.ping_open(dst) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                if self.stats.ping_unavailable == 0 {
                    tracing::warn!(
                        error = %e,
                        "cannot open an ICMP echo socket: guest pings get no reply \
                         (allow them with sysctl net.ipv4.ping_group_range)"
                    );
                }
                self.stats.ping_unavailable += 1;
                return;
            }
        };
        let (tx, mut rx) = mpsc::channel::<(IpAddr, u16, Vec<u8>)>(64);
        let _ = tx.try_send((dst, seq, payload.to_vec()));
        self.pings.insert(flow, PingIo { tx });
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    biased;
                    out = rx.recv() => match out {
                        Some((dst, seq, data)) => {
                            let _ = socket.send(dst, seq, &data);
                        }
                        None => return,
                    },
                    r = socket.recv(&mut buf) => match r {
                        Ok((seq, n)) => {
                            if events.send(Event::Ping(flow, seq, buf[..n].to_vec())).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    },
                }
            }
        });
    }
}

fn connect_error(e: &io::Error) -> ConnectError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectError::Refused,
        io::ErrorKind::TimedOut => ConnectError::TimedOut,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            ConnectError::Unreachable
        }
        _ => ConnectError::Other,
    }
}
