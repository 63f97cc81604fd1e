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
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use usernet_core::dns::ResolveError;
use usernet_core::stack::{GuestFlows, ResolveRequest};
use usernet_core::{ConnectError, FlowId, HostCommand, Instant, ProxyConfig, Stack};

use crate::api::{Control, Reply, Request};
use crate::forward::{Forward, Protocol, Remote};
use crate::hostnet::{BoxFuture, HostListener, HostNet, HostPing, HostUdp};
use crate::proxy::ProxySettings;
use crate::transport::{FrameTransport, GuestInfo};

/// Bytes queued towards the guest before the loop stops draining the core and flushes.
const TX_HIGH_WATER: usize = 256 * 1024;
/// Host events taken per loop turn before the guest side gets its turn again.
const EVENT_BATCH: usize = 64;

/// What the host side reports back to the loop.
enum Event {
    Ping(FlowId, u16, Vec<u8>),
    /// The host resolver's answer for a DNS system-mode lookup.
    Resolved(u64, Result<Vec<IpAddr>, ResolveError>),
    /// Proxy settings (re)loaded and their proxy hosts resolved.
    Proxy(Box<(ProxySettings, Result<Option<ProxyConfig>, String>)>),
}

/// Flow ids whose host socket became ready, forwards whose listening socket did, and the
/// loop's waker.
#[derive(Default)]
struct ReadyQueue {
    inner: Mutex<ReadyInner>,
}

struct ReadyInner {
    flows: Vec<FlowId>,
    forwards: Vec<u64>,
    /// A rarely ready source (the stop signal, the events and control channels) woke:
    /// they are polled only then, not on every turn of the loop.
    side: bool,
    waker: Option<Waker>,
}

impl Default for ReadyInner {
    fn default() -> Self {
        ReadyInner {
            flows: Vec::new(),
            forwards: Vec::new(),
            // Polled once at the start, which registers their wakers.
            side: true,
            waker: None,
        }
    }
}

impl ReadyQueue {
    fn push(&self, id: FlowId) {
        let mut g = self.inner.lock().expect("not poisoned");
        g.flows.push(id);
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }
    fn push_forward(&self, id: u64) {
        let mut g = self.inner.lock().expect("not poisoned");
        g.forwards.push(id);
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }
    fn push_side(&self) {
        let mut g = self.inner.lock().expect("not poisoned");
        g.side = true;
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }
    fn take(&self, into: &mut Vec<FlowId>, forwards: &mut Vec<u64>) {
        let mut g = self.inner.lock().expect("not poisoned");
        into.append(&mut g.flows);
        if !g.forwards.is_empty() {
            forwards.append(&mut g.forwards);
        }
    }
    /// Whether a side source woke since the last call.
    fn take_side(&self) -> bool {
        std::mem::take(&mut self.inner.lock().expect("not poisoned").side)
    }
    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut g = self.inner.lock().expect("not poisoned");
        if g.flows.is_empty() && g.forwards.is_empty() && !g.side {
            if !g.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                g.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// What ended a wait of the loop.
enum Woke {
    Guest(io::Result<bool>),
    Ready,
    Timer,
}

/// Adaptive busy-polling before the loop blocks, as QEMU's event loop does it
/// (`poll-max-ns`): when what the loop waits for keeps arriving within microseconds (a
/// request/response exchange), it polls for up to `window` instead of sleeping, and
/// saves the wake-up from an idle CPU, which on a virtual machine costs more than the
/// exchange's own work. The window grows while waits end shortly after it, and drops to
/// nothing after a wait longer than `max`, so an idle or slow-paced daemon never spins.
#[derive(Debug, Default)]
pub struct Poller {
    max: std::time::Duration,
    window: std::time::Duration,
    /// Waits that polling caught (no sleep), and waits that ended in a sleep.
    caught: u64,
    slept: u64,
}

/// The first window once waits turn short.
const POLL_START: std::time::Duration = std::time::Duration::from_micros(4);
/// Polls per wait at most, whatever the clock says.
const POLL_MAX_SPINS: u32 = 10_000;

impl Poller {
    /// Poll for at most `max` before blocking (zero: never poll).
    pub fn new(max: std::time::Duration) -> Self {
        Poller {
            max,
            window: std::time::Duration::ZERO,
            caught: 0,
            slept: 0,
        }
    }

    /// For `/stats`.
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "max_us": self.max.as_micros() as u64,
            "window_us": self.window.as_micros() as u64,
            "caught": self.caught,
            "slept": self.slept,
        })
    }

    /// Wait for `fut`, polling it first for the current window.
    async fn wait<F: Future>(&mut self, mut fut: Pin<&mut F>) -> F::Output {
        if self.max.is_zero() {
            self.slept += 1;
            return fut.await;
        }
        // The real clock: the window is about the CPU's time, and the simulation, whose
        // clock only moves while the runtime is idle, leaves polling off.
        let start = std::time::Instant::now();
        if !self.window.is_zero() {
            for _ in 0..POLL_MAX_SPINS {
                if let Poll::Ready(v) = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
                    self.caught += 1;
                    self.adjust(start.elapsed());
                    return v;
                }
                if start.elapsed() >= self.window {
                    break;
                }
                // Defers to the runtime, which looks at the sockets without blocking
                // (`epoll_wait` with a zero timeout) before polling again.
                tokio::task::yield_now().await;
            }
        }
        self.slept += 1;
        let v = fut.await;
        self.adjust(start.elapsed());
        v
    }

    fn adjust(&mut self, waited: std::time::Duration) {
        if waited <= self.window {
            // Polling caught it.
        } else if waited > self.max {
            self.window = std::time::Duration::ZERO;
        } else if self.window < self.max {
            self.window = if self.window.is_zero() {
                POLL_START
            } else {
                (self.window * 2).min(self.max)
            };
        }
    }
}

/// What a waker queues when its socket becomes ready.
#[derive(Clone, Copy)]
enum Token {
    /// A flow's host socket (TCP stream, pending connect, UDP socket).
    Flow(FlowId),
    /// A forward's listening socket.
    Forward(u64),
    /// The stop signal, the events channel or the control channel.
    Side,
}

struct TokenWaker {
    token: Token,
    queue: Arc<ReadyQueue>,
}

impl TokenWaker {
    fn waker(token: Token, queue: &Arc<ReadyQueue>) -> Waker {
        Waker::from(Arc::new(TokenWaker {
            token,
            queue: queue.clone(),
        }))
    }
}

impl Wake for TokenWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        match self.token {
            Token::Flow(id) => self.queue.push(id),
            Token::Forward(id) => self.queue.push_forward(id),
            Token::Side => self.queue.push_side(),
        }
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

/// A hosts file answered by the gateway's DNS service.
struct HostsFile {
    path: std::path::PathBuf,
    modified: Option<std::time::SystemTime>,
    checked: Option<tokio::time::Instant>,
}

/// A watched settings file: re-read when its modification time changes.
struct WatchedFile {
    path: std::path::PathBuf,
    modified: Option<std::time::SystemTime>,
    checked: Option<tokio::time::Instant>,
}

impl WatchedFile {
    fn new(path: std::path::PathBuf) -> Self {
        WatchedFile {
            path,
            modified: None,
            checked: None,
        }
    }

    /// Whether the file changed since the last look; looked at most once a second.
    fn changed(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if self
            .checked
            .is_some_and(|c| now.duration_since(c) < std::time::Duration::from_secs(1))
        {
            return false;
        }
        self.checked = Some(now);
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified == self.modified && self.modified.is_some() {
            return false;
        }
        self.modified = modified;
        true
    }
}

/// Counters of the driver itself (the core keeps its own).
#[derive(Clone, Debug, Default)]
pub struct DriverStats {
    pub connects_ok: u64,
    pub connects_failed: u64,
    pub udp_dropped: u64,
    pub ping_unavailable: u64,
    /// Connections accepted on forwards and opened into the guest.
    pub forward_accepted: u64,
    /// Connections refused because a forward or all forwards together had as many as
    /// allowed ([`ForwardLimits`]).
    pub forward_limit_hits: u64,
    /// Connections and datagrams refused because a `:PORT` forward had no single guest
    /// to go to (no DHCP lease, or several).
    pub forward_no_guest: u64,
    /// Connections and datagrams the core refused (flow table full, same addresses busy).
    pub forward_refused: u64,
    /// Errors from `accept` on a forward's listener (out of descriptors, ...).
    pub forward_accept_errors: u64,
    /// Datagrams received on UDP forwards and handed to the core.
    pub forward_udp_in: u64,
}

/// Limits on connections through port forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardLimits {
    /// Open TCP connections per forward.
    pub per_forward: usize,
    /// Open TCP connections through all forwards together.
    pub total: usize,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        ForwardLimits {
            per_forward: 4096,
            total: 8192,
        }
    }
}

/// A forward's host socket: a TCP listener, or a bound UDP socket with a receive in
/// progress.
enum Listener<N: HostNet> {
    Tcp(Box<dyn HostListener<N::Tcp>>),
    Udp {
        socket: Arc<N::Udp>,
        recv: RecvFuture,
    },
}

/// One port forward, polled in place with a waker that queues its id.
struct ForwardIo<N: HostNet> {
    forward: Forward,
    listener: Listener<N>,
    waker: Waker,
    /// TCP connections open through this forward.
    active: usize,
}

/// Connections taken from one listener per service before others get their turn.
const ACCEPT_BATCH: usize = 64;
/// Wait before polling a listener again after `accept` failed (out of descriptors).
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The loop's state apart from the core and the transport.
pub struct Driver<N: HostNet> {
    net: N,
    start: tokio::time::Instant,
    /// The clock as read once for the current round of the loop (`None`: read it).
    /// Everything one wake-up does happens "now"; reading the clock for each step cost
    /// more than the steps themselves on a request/response exchange.
    clock: std::cell::Cell<Option<Instant>>,
    /// Busy-polling before blocking (off unless [`Driver::set_poll_max`]).
    poller: Poller,
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
    hosts: Option<HostsFile>,
    /// Port forwards by id (ids are never reused).
    forwards: BTreeMap<u64, ForwardIo<N>>,
    next_forward: u64,
    /// Forwards whose listener became ready.
    forward_ids: Vec<u64>,
    /// TCP flows opened by forwards, and the forward each came through.
    inbound_tcp: BTreeMap<FlowId, u64>,
    /// UDP flows opened by forwards: their replies leave from the forward's socket.
    inbound_udp: BTreeMap<FlowId, u64>,
    forward_limits: ForwardLimits,
    listen_backlog: u32,
    /// Where `:PORT` forwards lead when no guest holds a DHCP lease.
    default_guest: Option<std::net::Ipv4Addr>,
    /// Control API requests.
    control: Option<mpsc::Receiver<Control>>,
    /// Capture of every frame to and from the guest (`--pcap`).
    pcap: Option<crate::pcap::Pcap>,
    /// Proxy settings from the flags; the file's (re-read when it changes) go over them.
    proxy_flags: ProxySettings,
    proxy_file: Option<WatchedFile>,
    /// The settings in use.
    proxy_settings: ProxySettings,
}

impl<N: HostNet> Driver<N> {
    pub fn new(net: N) -> Self {
        let (events_tx, events_rx) = mpsc::channel(4096);
        Driver {
            net,
            start: tokio::time::Instant::now(),
            clock: std::cell::Cell::new(None),
            poller: Poller::default(),
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
            hosts: None,
            forwards: BTreeMap::new(),
            next_forward: 0,
            forward_ids: Vec::new(),
            inbound_tcp: BTreeMap::new(),
            inbound_udp: BTreeMap::new(),
            forward_limits: ForwardLimits::default(),
            listen_backlog: 128,
            proxy_flags: ProxySettings::default(),
            proxy_file: None,
            proxy_settings: ProxySettings::default(),
            default_guest: None,
            control: None,
            pcap: None,
        }
    }

    /// Record every frame to and from the guest in `pcap`.
    pub fn set_pcap(&mut self, pcap: crate::pcap::Pcap) {
        self.pcap = Some(pcap);
    }

    /// The capture set with [`Driver::set_pcap`], for a transport that carries frames
    /// the driver never sees (the switch between guests).
    pub fn pcap(&self) -> Option<&crate::pcap::Pcap> {
        self.pcap.as_ref()
    }

    /// Serve control API requests arriving on `rx` (see [`crate::api::serve`]).
    pub fn set_control(&mut self, rx: mpsc::Receiver<Control>) {
        self.control = Some(rx);
    }

    /// Backlog of the listening socket of every forward exposed from now on.
    /// Poll for up to `max` before blocking when traffic comes in quick succession
    /// (see [`Poller`]); zero turns it off.
    pub fn set_poll_max(&mut self, max: std::time::Duration) {
        self.poller = Poller::new(max);
    }

    pub fn set_listen_backlog(&mut self, backlog: u32) {
        self.listen_backlog = backlog;
    }

    pub fn set_forward_limits(&mut self, limits: ForwardLimits) {
        self.forward_limits = limits;
    }

    /// Where `:PORT` forwards lead while no guest holds a DHCP lease (`usernet run`
    /// configures its namespace itself, without DHCP).
    pub fn set_default_guest(&mut self, guest: Option<std::net::Ipv4Addr>) {
        self.default_guest = guest;
    }

    /// Start forwarding `forward`: its host socket is bound now, so a bind error (address
    /// in use, privileged port, address not on this host) comes back as a one-line
    /// reason. Other forwards are not affected either way.
    pub async fn expose(&mut self, forward: Forward) -> Result<(), String> {
        self.expose_inner(forward).await.map_err(|(_, m)| m)
    }

    /// `expose`, with the HTTP status that fits the error.
    async fn expose_inner(&mut self, f: Forward) -> Result<(), (u16, String)> {
        if let Some(old) = self
            .forwards
            .values()
            .find(|x| x.forward.protocol == f.protocol && x.forward.local == f.local)
        {
            return Err((
                409,
                format!(
                    "{} {} is already exposed (to {})",
                    f.protocol.as_str(),
                    f.local,
                    old.forward.remote
                ),
            ));
        }
        let listener = match f.protocol {
            Protocol::Tcp => Listener::Tcp(
                self.net
                    .tcp_listen(f.local, self.listen_backlog)
                    .map_err(|e| bind_error(&f, &e))?,
            ),
            Protocol::Udp => {
                let socket = Arc::new(
                    self.net
                        .udp_bind_at(f.local)
                        .await
                        .map_err(|e| bind_error(&f, &e))?,
                );
                Listener::Udp {
                    recv: recv_future(socket.clone(), vec![0u8; 65536]),
                    socket,
                }
            }
        };
        let id = self.next_forward;
        self.next_forward += 1;
        let waker = TokenWaker::waker(Token::Forward(id), &self.ready);
        self.forwards.insert(
            id,
            ForwardIo {
                forward: f,
                listener,
                waker,
                active: 0,
            },
        );
        // Polled once by the loop, which registers the waker.
        self.ready.push_forward(id);
        tracing::info!(forward = %f, "exposed");
        Ok(())
    }

    /// Stop forwarding `local`: its host socket is closed at once. Connections already
    /// open through it keep running until either side closes them; UDP flows lose their
    /// socket (their replies are dropped) and expire.
    pub fn unexpose(&mut self, local: SocketAddr, protocol: Protocol) -> Result<Forward, String> {
        let id = self
            .forwards
            .iter()
            .find(|(_, x)| x.forward.protocol == protocol && x.forward.local == local)
            .map(|(id, _)| *id)
            .ok_or_else(|| format!("{} {local} is not exposed", protocol.as_str()))?;
        let f = self.forwards.remove(&id).expect("found").forward;
        tracing::info!(forward = %f, "unexposed");
        Ok(f)
    }

    /// The forwards, in the order they were exposed.
    pub fn list(&self) -> Vec<Forward> {
        self.forwards.values().map(|x| x.forward).collect()
    }

    /// The core's clock: time since the driver started, from tokio's clock (which the
    /// simulator controls).
    pub fn now(&self) -> Instant {
        if let Some(t) = self.clock.get() {
            return t;
        }
        let t = Instant::from_micros((tokio::time::Instant::now() - self.start).as_micros() as i64);
        self.clock.set(Some(t));
        t
    }

    /// The next [`Driver::now`] reads the clock again: called wherever the loop may have
    /// waited.
    fn clock_moved(&self) {
        self.clock.set(None);
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
        let side = TokenWaker::waker(Token::Side, &self.ready);
        // A new stop future (and whatever else woke since the last run) is polled once,
        // which registers its waker.
        self.ready.push_side();
        loop {
            self.settle(stack, transport)?;
            if transport.pending() > 0 {
                transport.flush().await?;
                self.clock_moved();
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
            self.clock_moved();
            let timer = armed.is_some();
            let woke = {
                let ready = &*self.ready;
                // The frequent sources only; the rare ones are polled below when they woke.
                let wait = std::pin::pin!(async {
                    tokio::select! {
                        biased;
                        r = transport.recv() => Woke::Guest(r),
                        _ = poll_fn(|cx| ready.poll_ready(cx)) => Woke::Ready,
                        _ = sleep.as_mut(), if timer => Woke::Timer,
                    }
                });
                self.poller.wait(wait).await
            };
            let guest = match woke {
                Woke::Guest(r) => Some(r?),
                Woke::Ready => None,
                Woke::Timer => {
                    armed = None;
                    None
                }
            };
            if guest == Some(false) {
                return Ok(());
            }
            if guest == Some(true) {
                let now = self.now();
                self.maybe_reload_hosts(stack);
                self.maybe_reload_proxy();
                // Before the frames: a new guest's DHCP DISCOVER may be among them.
                while let Some((mac, ip)) = transport.take_preferred() {
                    match stack.prefer_address(now, mac, ip) {
                        Ok(()) => {
                            tracing::info!(mac = %mac_str(&mac), %ip, "preferred address reserved")
                        }
                        Err(e) => {
                            tracing::warn!(mac = %mac_str(&mac), "preferred address not reserved: {e}")
                        }
                    }
                }
                while let Some(frame) = transport.next_frame() {
                    if let Some(p) = &self.pcap {
                        p.record(frame);
                    }
                    stack.handle_frame(now, frame);
                }
                while let Some(mac) = transport.take_departed() {
                    let ended = stack.guest_left(now, mac);
                    if ended > 0 {
                        tracing::info!(mac = %mac_str(&mac), flows = ended, "a departed guest's flows ended");
                    }
                }
            }
            // Whatever woke us, the rare sources get their turn when they woke, so none
            // starves under load.
            if self.ready.take_side() {
                if stop
                    .as_mut()
                    .poll(&mut Context::from_waker(&side))
                    .is_ready()
                {
                    return Ok(());
                }
                let mut handled = 0;
                while let Poll::Ready(Some(ev)) =
                    self.events_rx.poll_recv(&mut Context::from_waker(&side))
                {
                    self.handle_event(stack, ev);
                    handled += 1;
                    if handled == EVENT_BATCH {
                        // More may wait: come back after the others had their turn.
                        self.ready.push_side();
                        break;
                    }
                }
                let req = match self.control.as_mut() {
                    Some(rx) => rx.poll_recv(&mut Context::from_waker(&side)),
                    None => Poll::Pending,
                };
                match req {
                    Poll::Ready(Some((req, reply))) => {
                        let r = self.control_request(stack, req, transport.guests()).await;
                        self.clock_moved();
                        let _ = reply.send(r);
                        self.ready.push_side();
                    }
                    Poll::Ready(None) => self.control = None,
                    Poll::Pending => {}
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
        // The commands that inputs call for are carried out before the core's egress
        // pass: a guest's write reaches the host socket first (the latency of a
        // request/response exchange), and one pass then sends whatever both produced.
        stack.service();
        for _ in 0..8 {
            let mut did = false;
            while let Some(cmd) = stack.poll_command() {
                did = true;
                // A command borrows the stack, so flows it wants serviced are queued and
                // serviced right after.
                self.command(cmd);
            }
            while let Some(r) = stack.poll_resolve() {
                did = true;
                self.resolve(r);
            }
            if self.service_ready_now(stack) {
                did = true;
            }
            stack.poll(self.now());
            while let Some(frame) = stack.peek_frame() {
                // Only the queue this frame goes to holds the core back.
                if transport.pending_for(frame) >= TX_HIGH_WATER {
                    break;
                }
                if let Some(p) = &self.pcap {
                    p.record(frame);
                }
                transport.send_frame(frame)?;
                stack.pop_frame();
            }
            // The pass itself may have called for host work (a timer closed a flow).
            if !did && !stack.has_commands() {
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
                let waker = TokenWaker::waker(Token::Flow(flow), &self.ready);
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
                self.forget_inbound(flow);
            }
            HostCommand::TcpAbort { flow } => {
                self.pending_connects.remove(&flow);
                self.connected.retain(|(f, ..)| *f != flow);
                if let Some(io) = self.tcp.remove(&flow) {
                    self.net.tcp_abort(io.stream);
                }
                self.forget_inbound(flow);
            }
            HostCommand::UdpSend { flow, dst, payload } => {
                if !self.inbound_udp.is_empty() {
                    if let Some(&id) = self.inbound_udp.get(&flow) {
                        self.forward_udp_send(id, dst, payload);
                        return;
                    }
                }
                self.udp_send(flow, dst, payload)
            }
            HostCommand::UdpClose { flow } => {
                self.udp.remove(&flow);
                if !self.inbound_udp.is_empty() {
                    self.inbound_udp.remove(&flow);
                }
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
            Event::Resolved(req, result) => stack.dns_resolved(now, req, result),
            Event::Proxy(b) => match b.1 {
                Ok(config) => self.use_proxy(stack, b.0, config),
                Err(e) => tracing::warn!(error = %e, "proxy settings not applied"),
            },
        }
    }

    /// Proxy settings from the flags, and a file that goes over them (re-read when it
    /// changes). Apply them with [`Driver::load_proxy`] before running.
    pub fn set_proxy_settings(&mut self, flags: ProxySettings, file: Option<std::path::PathBuf>) {
        self.proxy_flags = flags;
        self.proxy_file = file.map(WatchedFile::new);
    }

    /// The effective settings now (the file's over the flags').
    fn current_proxy_settings(&mut self) -> Result<ProxySettings, String> {
        match self.proxy_file.as_mut() {
            Some(f) => {
                f.changed();
                Ok(ProxySettings::load(&f.path)?.or(&self.proxy_flags))
            }
            None => Ok(self.proxy_flags.clone()),
        }
    }

    /// Load, resolve and apply the proxy settings now (at start: errors are fatal).
    pub async fn load_proxy(&mut self, stack: &mut Stack) -> Result<(), String> {
        let settings = self.current_proxy_settings()?;
        let config = self.resolve_proxy(settings.clone()).await?;
        self.use_proxy(stack, settings, config);
        Ok(())
    }

    /// Resolve the proxy hosts of `settings` and build the core's configuration; the
    /// future owns everything it needs (it may run off the loop).
    fn resolve_proxy(
        &self,
        settings: ProxySettings,
    ) -> impl Future<Output = Result<Option<ProxyConfig>, String>> + Send + 'static {
        let lookups: Vec<(String, BoxFuture<io::Result<Vec<IpAddr>>>)> = match settings.prepare() {
            Ok(Some(p)) => p
                .names()
                .into_iter()
                .map(|n| (n.clone(), self.net.resolve(n)))
                .collect(),
            _ => Vec::new(),
        };
        async move {
            let mut found = Vec::new();
            for (name, lookup) in lookups {
                match tokio::time::timeout(std::time::Duration::from_secs(10), lookup).await {
                    Ok(Ok(a)) => found.push((name, a)),
                    Ok(Err(e)) => {
                        return Err(format!("cannot resolve the proxy host {name:?}: {e}"))
                    }
                    Err(_) => return Err(format!("looking up the proxy host {name:?} timed out")),
                }
            }
            crate::proxy::resolve_settings(&settings, |n| {
                let r = found
                    .iter()
                    .find(|(f, _)| *f == n)
                    .map(|(_, a)| a.clone())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"));
                std::future::ready(r)
            })
            .await
        }
    }

    fn use_proxy(
        &mut self,
        stack: &mut Stack,
        settings: ProxySettings,
        config: Option<ProxyConfig>,
    ) {
        match &config {
            Some(c) => tracing::info!(
                settings = ?settings.redacted(), http = ?c.http.as_ref().map(|u| u.addr),
                https = ?c.https.as_ref().map(|u| u.addr), explicit_port = ?c.explicit_port,
                "proxy on"
            ),
            None => tracing::info!("proxy off"),
        }
        stack.set_proxy(config);
        self.proxy_settings = settings;
    }

    /// Re-read the proxy file if it changed; the proxy hosts are resolved off the loop.
    fn maybe_reload_proxy(&mut self) {
        let Some(f) = self.proxy_file.as_mut() else {
            return;
        };
        if !f.changed() {
            return;
        }
        let settings = match ProxySettings::load(&f.path) {
            Ok(s) => s.or(&self.proxy_flags),
            Err(e) => {
                tracing::warn!(error = %e, "proxy settings not reloaded");
                return;
            }
        };
        let resolve = self.resolve_proxy(settings.clone());
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let r = resolve.await;
            let _ = events.send(Event::Proxy(Box::new((settings, r)))).await;
        });
    }

    /// Look a name up with the host's resolver (DNS system mode), off the loop.
    fn resolve(&mut self, r: ResolveRequest) {
        let lookup = self.net.resolve(r.name);
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = match lookup.await {
                Ok(addrs) => {
                    let addrs: Vec<IpAddr> = addrs
                        .into_iter()
                        .filter(|a| if a.is_ipv4() { r.want_v4 } else { r.want_v6 })
                        .collect();
                    if addrs.is_empty() {
                        Err(ResolveError::NoData)
                    } else {
                        Ok(addrs)
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ResolveError::NoName),
                Err(_) => Err(ResolveError::Failed),
            };
            let _ = events.send(Event::Resolved(r.req, result)).await;
        });
    }

    /// Answer names from this hosts file (re-read when it changes).
    pub fn set_hosts_file(&mut self, path: std::path::PathBuf) {
        self.hosts = Some(HostsFile {
            path,
            modified: None,
            checked: None,
        });
    }

    /// Re-read the hosts file if it changed; looked at most once a second, and only when
    /// guest frames arrive (a query is one).
    fn maybe_reload_hosts(&mut self, stack: &mut Stack) {
        let Some(h) = self.hosts.as_mut() else { return };
        let now = tokio::time::Instant::now();
        if h.checked
            .is_some_and(|c| now.duration_since(c) < std::time::Duration::from_secs(1))
        {
            return;
        }
        h.checked = Some(now);
        let modified = std::fs::metadata(&h.path).and_then(|m| m.modified()).ok();
        if modified == h.modified && h.modified.is_some() {
            return;
        }
        h.modified = modified;
        match std::fs::read_to_string(&h.path) {
            Ok(text) => {
                let n = stack.set_dns_hosts(&text);
                tracing::info!(path = %h.path.display(), names = n, "hosts file loaded");
            }
            Err(e) => {
                tracing::warn!(path = %h.path.display(), error = %e, "cannot read the hosts file")
            }
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
        self.ready.take(&mut self.ready_ids, &mut self.forward_ids);
        if !self.forward_ids.is_empty() {
            let mut ids = std::mem::take(&mut self.forward_ids);
            ids.sort_unstable();
            ids.dedup();
            for id in ids.drain(..) {
                self.service_forward(stack, id);
            }
            self.forward_ids = ids;
        }
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
        self.forget_inbound(flow);
        stack.tcp_host_reset(flow);
    }

    /// A TCP flow ended: if a forward opened it, it no longer counts against the limits.
    fn forget_inbound(&mut self, flow: FlowId) {
        if self.inbound_tcp.is_empty() {
            return;
        }
        if let Some(id) = self.inbound_tcp.remove(&flow) {
            if let Some(f) = self.forwards.get_mut(&id) {
                f.active = f.active.saturating_sub(1);
            }
        }
    }

    /// Accept what waits on a forward's listener (or receive what waits on its UDP
    /// socket) and open each into the guest.
    fn service_forward(&mut self, stack: &mut Stack, id: u64) {
        let now = self.now();
        let default_guest = self.default_guest;
        let Some(fwd) = self.forwards.get_mut(&id) else {
            return;
        };
        let forward = fwd.forward;
        let waker = fwd.waker.clone();
        let mut cx = Context::from_waker(&waker);
        match &mut fwd.listener {
            Listener::Tcp(listener) => {
                for _ in 0..ACCEPT_BATCH {
                    let (stream, client) = match listener.poll_accept(&mut cx) {
                        Poll::Pending => return,
                        Poll::Ready(Ok(x)) => x,
                        Poll::Ready(Err(e)) => {
                            self.stats.forward_accept_errors += 1;
                            if self.stats.forward_accept_errors.is_power_of_two() {
                                tracing::warn!(%forward, error = %e, "accept failed");
                            }
                            // The listener stays readable without a waker: look again
                            // after a pause rather than spin.
                            let waker = waker.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(ACCEPT_RETRY).await;
                                waker.wake();
                            });
                            return;
                        }
                    };
                    if fwd.active >= self.forward_limits.per_forward
                        || self.inbound_tcp.len() >= self.forward_limits.total
                    {
                        self.stats.forward_limit_hits += 1;
                        if self.stats.forward_limit_hits.is_power_of_two() {
                            tracing::warn!(
                                %forward, %client, per_forward = self.forward_limits.per_forward,
                                total = self.forward_limits.total,
                                "connection limit reached: connection refused"
                            );
                        }
                        self.net.tcp_abort(stream);
                        continue;
                    }
                    let guest = match resolve_remote(stack, forward.remote, default_guest) {
                        Ok(g) => g,
                        Err(why) => {
                            self.stats.forward_no_guest += 1;
                            if self.stats.forward_no_guest.is_power_of_two() {
                                tracing::warn!(%forward, %client, "{why}: connection refused");
                            }
                            self.net.tcp_abort(stream);
                            continue;
                        }
                    };
                    match stack.tcp_open_inbound(now, guest, client) {
                        Ok(flow) => {
                            self.stats.forward_accepted += 1;
                            fwd.active += 1;
                            self.inbound_tcp.insert(flow, id);
                            let waker = TokenWaker::waker(Token::Flow(flow), &self.ready);
                            // The core says `TcpReady` once the guest accepted (or
                            // `TcpAbort` if it refused).
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
                        }
                        Err(e) => {
                            self.stats.forward_refused += 1;
                            tracing::debug!(%forward, %client, %guest, error = %e, "inbound connection refused");
                            self.net.tcp_abort(stream);
                        }
                    }
                }
            }
            Listener::Udp { socket, recv } => {
                for _ in 0..UDP_RECV_BATCH {
                    let Poll::Ready((r, buf)) = recv.as_mut().poll(&mut cx) else {
                        return;
                    };
                    match r {
                        Ok((n, client)) => {
                            match resolve_remote(stack, forward.remote, default_guest) {
                                Ok(guest) => match stack.udp_inbound(now, client, guest, &buf[..n])
                                {
                                    Ok(flow) => {
                                        self.stats.forward_udp_in += 1;
                                        self.inbound_udp.insert(flow, id);
                                    }
                                    Err(e) => {
                                        self.stats.forward_refused += 1;
                                        tracing::debug!(%forward, %client, error = %e, "inbound datagram refused");
                                    }
                                },
                                Err(why) => {
                                    self.stats.forward_no_guest += 1;
                                    if self.stats.forward_no_guest.is_power_of_two() {
                                        tracing::warn!(%forward, %client, "{why}: datagram dropped");
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::trace!(%forward, error = %e, "udp forward receive error")
                        }
                    }
                    *recv = recv_future(socket.clone(), buf);
                }
            }
        }
        // More may be waiting: come back after the others had their turn.
        self.ready.push_forward(id);
    }

    /// A guest's reply on a UDP forward's flow: it leaves from the forward's socket, so
    /// the client sees it come from the address it sent to.
    fn forward_udp_send(&mut self, id: u64, dst: SocketAddr, payload: &[u8]) {
        match self.forwards.get(&id).map(|f| &f.listener) {
            Some(Listener::Udp { socket, .. }) => {
                if socket.try_send_to(payload, dst).is_err() {
                    self.stats.udp_dropped += 1;
                }
            }
            // The forward was unexposed: its socket is gone.
            _ => self.stats.udp_dropped += 1,
        }
    }

    /// Answer one control API request.
    async fn control_request(
        &mut self,
        stack: &mut Stack,
        req: Request,
        guests: Vec<GuestInfo>,
    ) -> Reply {
        match req {
            Request::List => Reply::Ok(serde_json::Value::Array(
                self.list()
                    .iter()
                    .map(|f| {
                        serde_json::to_value(crate::api::ForwardJson::from(f)).unwrap_or_default()
                    })
                    .collect(),
            )),
            // A `:PORT` remote means "the guest": with several, the caller must choose.
            Request::Expose(f)
                if matches!(f.remote, Remote::Leased(_)) && stack.leases().nth(1).is_some() =>
            {
                Reply::Err(409, resolve_remote(stack, f.remote, None).unwrap_err())
            }
            Request::Expose(f) => match self.expose_inner(f).await {
                Ok(()) => Reply::Ok(
                    serde_json::to_value(crate::api::ForwardJson::from(&f)).unwrap_or_default(),
                ),
                Err((status, m)) => Reply::Err(status, m),
            },
            Request::Unexpose { local, protocol } => match self.unexpose(local, protocol) {
                Ok(f) => Reply::Ok(
                    serde_json::to_value(crate::api::ForwardJson::from(&f)).unwrap_or_default(),
                ),
                Err(m) => Reply::Err(404, m),
            },
            Request::Leases => {
                let mut m = serde_json::Map::new();
                for (mac, ip) in stack.leases() {
                    let mac = mac
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                    m.insert(ip.to_string(), serde_json::Value::String(mac));
                }
                Reply::Ok(serde_json::Value::Object(m))
            }
            Request::Stats => {
                let mut v = self.stats_json(stack);
                v["guests"] = guests_json(stack, &guests);
                Reply::Ok(v)
            }
            Request::GetProxy => Reply::Ok(self.proxy_json(stack)),
            Request::SetProxy(settings) => {
                let settings = settings.or(&self.proxy_flags);
                match self.resolve_proxy(settings.clone()).await {
                    Ok(config) => {
                        self.use_proxy(stack, settings, config);
                        Reply::Ok(self.proxy_json(stack))
                    }
                    Err(e) => Reply::Err(400, e),
                }
            }
        }
    }

    /// The proxy settings in use (passwords hidden), as JSON (`GET /proxy`).
    fn proxy_json(&self, stack: &Stack) -> serde_json::Value {
        let mut v = serde_json::to_value(self.proxy_settings.redacted()).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert("active".into(), stack.proxy().is_some().into());
        }
        v
    }

    /// The core's counters and the driver's, as JSON (`GET /stats`).
    pub fn stats_json(&self, stack: &Stack) -> serde_json::Value {
        let s = stack.stats();
        let drops: serde_json::Map<String, serde_json::Value> = s
            .drops()
            .map(|(r, n)| (r.as_str().to_string(), n.into()))
            .collect();
        let d = &self.stats;
        serde_json::json!({
            "core": {
                "frames_in": s.frames_in,
                "frames_out": s.frames_out,
                "bytes_in": s.bytes_in,
                "bytes_out": s.bytes_out,
                "tcp_flows_opened": s.tcp_flows_opened,
                "tcp_connects_failed": s.tcp_connects_failed,
                "udp_flows_opened": s.udp_flows_opened,
                "icmp_echo_requests": s.icmp_echo_requests,
                "icmp_echo_replies": s.icmp_echo_replies,
                "arp_replies": s.arp_replies,
                "dhcp_replies": s.dhcp_replies,
                "drops": drops,
                "total_drops": s.total_drops(),
                "dns": stack.dns_stats().map(|d| {
                    d.fields()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
                        .collect::<serde_json::Map<_, _>>()
                }),
                "tcp_flows": stack.tcp_flow_count(),
                "udp_flows": stack.udp_flow_count(),
                "ping_flows": stack.ping_flow_count(),
                "proxy": {
                    "flows": s.proxy.flows,
                    "requests": s.proxy.requests,
                    "connects": s.proxy.connects,
                    "sni_names": s.proxy.sni_names,
                    "sni_fallbacks": s.proxy.sni_fallbacks,
                    "sniff_timeouts": s.proxy.sniff_timeouts,
                    "head_timeouts": s.proxy.head_timeouts,
                    "excluded": s.proxy.excluded,
                    "explicit": s.proxy.explicit,
                    "resolves": s.proxy.resolves,
                    "errors": {
                        "bad_requests": s.proxy.bad_requests,
                        "heads_too_large": s.proxy.heads_too_large,
                        "upstream_failed": s.proxy.upstream_failed,
                        "upstream_timeouts": s.proxy.upstream_timeouts,
                        "connect_refused": s.proxy.connect_refused,
                        "bad_bodies": s.proxy.bad_bodies,
                        "resolve_failed": s.proxy.resolve_failed,
                        "forbidden": s.proxy.forbidden,
                    },
                },
            },
            "driver": {
                "connects_ok": d.connects_ok,
                "connects_failed": d.connects_failed,
                "udp_dropped": d.udp_dropped,
                "ping_unavailable": d.ping_unavailable,
                "forwards": self.forwards.len(),
                "forward_connections": self.inbound_tcp.len(),
                "forward_accepted": d.forward_accepted,
                "forward_limit_hits": d.forward_limit_hits,
                "forward_no_guest": d.forward_no_guest,
                "forward_refused": d.forward_refused,
                "forward_accept_errors": d.forward_accept_errors,
                "forward_udp_in": d.forward_udp_in,
                "host_sockets": self.open_sockets(),
                "poll": self.poller.json(),
            },
        })
    }

    fn udp_send(&mut self, flow: FlowId, dst: SocketAddr, payload: &[u8]) {
        let io = match self.udp.get_mut(&flow) {
            Some(io) => io,
            None => {
                let waker = TokenWaker::waker(Token::Flow(flow), &self.ready);
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

/// Per-guest counters for `/stats`: each switch port with its addresses and leases.
/// `02:00:00:00:00:0a`.
fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn guests_json(stack: &Stack, guests: &[GuestInfo]) -> serde_json::Value {
    let by_guest = stack.flows_by_guest();
    serde_json::Value::Array(
        guests
            .iter()
            .map(|g| {
                let ips: Vec<String> = stack
                    .leases()
                    .filter(|(mac, _)| g.macs.contains(mac))
                    .map(|(_, ip)| ip.to_string())
                    .collect();
                let s = &g.stats;
                let flows = g.macs.iter().filter_map(|mac| by_guest.get(mac)).fold(
                    GuestFlows::default(),
                    |a, f| GuestFlows {
                        tcp: a.tcp + f.tcp,
                        udp: a.udp + f.udp,
                        ping: a.ping + f.ping,
                    },
                );
                serde_json::json!({
                    "flows": {"tcp": flows.tcp, "udp": flows.udp, "ping": flows.ping},
                    "port": g.port,
                    "label": g.label,
                    "macs": g.macs.iter().map(mac_str).collect::<Vec<_>>(),
                    "ips": ips,
                    "frames_from_guest": s.rx_frames,
                    "bytes_from_guest": s.rx_bytes,
                    "dropped_from_guest": s.rx_dropped,
                    "frames_to_guest": s.tx_frames,
                    "bytes_to_guest": s.tx_bytes,
                    "dropped_to_guest": s.tx_dropped,
                })
            })
            .collect(),
    )
}

/// The guest address a forward's connection or datagram goes to now (family-neutral,
/// as the core's flow keys are; forwards and leases are IPv4 today).
fn resolve_remote(
    stack: &Stack,
    remote: Remote,
    default_guest: Option<std::net::Ipv4Addr>,
) -> Result<SocketAddr, String> {
    let port = match remote {
        Remote::Addr(a) => return Ok(SocketAddr::V4(a)),
        Remote::Leased(p) => p,
    };
    let mut leases = stack.leases();
    match (leases.next(), leases.next()) {
        (Some((_, ip)), None) => Ok(SocketAddr::V4(SocketAddrV4::new(ip, port))),
        (None, _) => match default_guest {
            Some(ip) => Ok(SocketAddr::V4(SocketAddrV4::new(ip, port))),
            None => Err("no guest holds a DHCP lease (name the guest: ADDR:PORT)".into()),
        },
        (Some((_, a)), Some((_, b))) => {
            let mut all = vec![a.to_string(), b.to_string()];
            all.extend(leases.map(|(_, ip)| ip.to_string()));
            Err(format!(
                "{} guests hold DHCP leases ({}): name one as ADDR:{port}",
                all.len(),
                all.join(", ")
            ))
        }
    }
}

/// One line saying why a forward's socket could not be bound, and an HTTP status.
fn bind_error(f: &Forward, e: &io::Error) -> (u16, String) {
    let (status, why) = match e.kind() {
        io::ErrorKind::AddrInUse => (409, "the address is already in use".to_string()),
        io::ErrorKind::PermissionDenied => (
            403,
            "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)".to_string(),
        ),
        io::ErrorKind::AddrNotAvailable => (400, "the address is not on this host".to_string()),
        io::ErrorKind::Unsupported => (501, e.to_string()),
        _ => (500, e.to_string()),
    };
    (
        status,
        format!(
            "cannot listen on {} {}: {why}",
            f.protocol.as_str(),
            f.local
        ),
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokioNet;
    use usernet_core::{Config, Rng};

    fn stack() -> Stack {
        use rand_chacha::rand_core::SeedableRng;
        let c = Config::for_subnet("192.168.65.0/24".parse().unwrap());
        Stack::new(c, Rng::seed_from_u64(1), Instant::from_micros(0)).unwrap()
    }

    #[test]
    fn remotes_resolve_to_an_address_or_a_reason() {
        let s = stack();
        let a: SocketAddrV4 = "192.168.65.9:80".parse().unwrap();
        assert_eq!(resolve_remote(&s, Remote::Addr(a), None), Ok(a.into()));
        let e = resolve_remote(&s, Remote::Leased(80), None).unwrap_err();
        assert!(e.contains("no guest holds a DHCP lease"), "{e}");
        let g = "192.168.65.3".parse().unwrap();
        assert_eq!(
            resolve_remote(&s, Remote::Leased(80), Some(g)),
            Ok(SocketAddrV4::new(g, 80).into())
        );
    }

    #[test]
    fn a_port_remote_with_several_guests_names_the_choice() {
        let mut s = stack();
        for (i, last) in [0x10u8, 0x11].into_iter().enumerate() {
            let mac = [2, 0, 0, 0, 0, last];
            s.handle_frame(
                Instant::ZERO,
                &crate::testutil::dhcp_frame(mac, 0x1234_5678, None),
            );
            let ip = std::net::Ipv4Addr::new(192, 168, 65, 3 + i as u8);
            s.handle_frame(
                Instant::ZERO,
                &crate::testutil::dhcp_frame(mac, 0x1234_5678, Some(ip)),
            );
        }
        assert_eq!(s.leases().count(), 2);
        let e = resolve_remote(&s, Remote::Leased(80), None).unwrap_err();
        assert_eq!(
            e,
            "2 guests hold DHCP leases (192.168.65.3, 192.168.65.4): name one as ADDR:80"
        );
        let a: SocketAddrV4 = "192.168.65.4:80".parse().unwrap();
        assert_eq!(resolve_remote(&s, Remote::Addr(a), None), Ok(a.into()));
    }

    #[test]
    fn poll_window_grows_while_waits_are_short_and_drops_after_a_long_one() {
        let us = std::time::Duration::from_micros;
        let mut p = Poller::new(us(100));
        assert_eq!(p.window, us(0));
        // Waits within the maximum but past the window: grow from the start, doubling.
        let mut seen = Vec::new();
        for _ in 0..7 {
            p.adjust(us(99));
            seen.push(p.window.as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 64, 100, 100]);
        // A wait the window caught leaves it as it is (no growth beyond need).
        let mut q = Poller::new(us(100));
        for _ in 0..8 {
            q.adjust(us(20));
        }
        assert_eq!(q.window, us(32));
        // A wait the window caught changes nothing.
        p.adjust(us(90));
        assert_eq!(p.window, us(100));
        // One wait beyond the maximum (the exchange paused): no polling until waits are
        // short again.
        p.adjust(us(101));
        assert_eq!(p.window, us(0));
        p.adjust(us(5));
        assert_eq!(p.window, POLL_START);
    }

    /// A future that counts its polls and is never ready by itself.
    struct Counted(std::rc::Rc<std::cell::Cell<u32>>);

    impl Future for Counted {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.set(self.0.get() + 1);
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn polling_is_bounded_and_off_means_one_poll() {
        let polls = std::rc::Rc::new(std::cell::Cell::new(0));
        // Off: the future is awaited at once (polled, then only when woken: here by the
        // timeout, which polls it once more before giving up).
        let mut p = Poller::new(std::time::Duration::ZERO);
        let fut = std::pin::pin!(Counted(polls.clone()));
        let r = tokio::time::timeout(std::time::Duration::from_millis(50), p.wait(fut)).await;
        assert!(r.is_err());
        let off = polls.get();
        assert!(off <= 2, "{off} polls");
        // A window far longer than the spin bound: polling stops at the bound, then the
        // loop blocks as usual.
        polls.set(0);
        let mut p = Poller::new(std::time::Duration::from_secs(30));
        p.window = std::time::Duration::from_secs(30);
        let fut = std::pin::pin!(Counted(polls.clone()));
        let r = tokio::time::timeout(std::time::Duration::from_secs(3), p.wait(fut)).await;
        assert!(r.is_err());
        assert_eq!(polls.get(), POLL_MAX_SPINS + off);
        assert_eq!((p.caught, p.slept), (0, 1));
    }

    #[tokio::test]
    async fn polling_hands_back_what_became_ready() {
        // Ready on the third poll, waking nobody: only polling can see it.
        let polls = std::rc::Rc::new(std::cell::Cell::new(0));
        let counted = polls.clone();
        let fut = std::pin::pin!(std::future::poll_fn(move |_| {
            counted.set(counted.get() + 1);
            if counted.get() >= 3 {
                Poll::Ready(7)
            } else {
                Poll::Pending
            }
        }));
        let mut p = Poller::new(std::time::Duration::from_secs(1));
        p.window = std::time::Duration::from_secs(1);
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), p.wait(fut)).await;
        assert_eq!(r.ok(), Some(7));
        assert_eq!(polls.get(), 3);
        assert_eq!((p.caught, p.slept), (1, 0));
        // Caught within the window: it stays.
        assert_eq!(p.window, std::time::Duration::from_secs(1));
    }

    /// A guest link on which nothing ever arrives.
    struct Silent;

    impl FrameTransport for Silent {
        async fn recv(&mut self) -> io::Result<bool> {
            std::future::pending().await
        }
        fn next_frame(&mut self) -> Option<&[u8]> {
            None
        }
        fn send_frame(&mut self, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn pending(&self) -> usize {
            0
        }
        async fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The loop polls its stop future only when it woke; a later `run` brings a new stop
    /// future that must be polled at once. (The simulator found this: it runs the loop
    /// again after each of its events, and every scenario hung.)
    #[tokio::test]
    async fn each_run_honours_its_own_stop_future() {
        let mut d = Driver::new(TokioNet);
        d.set_poll_max(std::time::Duration::from_micros(100));
        let mut s = stack();
        let within = std::time::Duration::from_secs(5);
        for _ in 0..3 {
            let stop = tokio::time::sleep(std::time::Duration::from_millis(10));
            let r = tokio::time::timeout(within, d.run(&mut s, &mut Silent, stop)).await;
            assert!(matches!(r, Ok(Ok(()))), "run did not stop");
        }
        // A stop that completes from another task, and one that is ready at once.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            let _ = tx.send(());
        });
        let stop = async {
            let _ = rx.await;
        };
        let r = tokio::time::timeout(within, d.run(&mut s, &mut Silent, stop)).await;
        assert!(matches!(r, Ok(Ok(()))));
        let r = tokio::time::timeout(within, d.run(&mut s, &mut Silent, async {})).await;
        assert!(matches!(r, Ok(Ok(()))));
    }

    /// Binds on this machine's loopback only.
    #[tokio::test]
    async fn expose_binds_now_and_reports_why_not() {
        let mut d = Driver::new(TokioNet);
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_addr = busy.local_addr().unwrap();
        let f = |local: SocketAddr, protocol| Forward {
            protocol,
            local,
            remote: Remote::Leased(80),
        };
        let e = d.expose(f(busy_addr, Protocol::Tcp)).await.unwrap_err();
        assert_eq!(
            e,
            format!("cannot listen on tcp {busy_addr}: the address is already in use")
        );
        // Every port free: the kernel picks one, which is what the forward lists.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free_addr = free.local_addr().unwrap();
        drop(free);
        d.expose(f(free_addr, Protocol::Tcp)).await.unwrap();
        let e = d.expose(f(free_addr, Protocol::Tcp)).await.unwrap_err();
        assert!(e.contains("already exposed"), "{e}");
        // The same port for UDP is another forward.
        let udp_busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = d
            .expose(f(udp_busy.local_addr().unwrap(), Protocol::Udp))
            .await
            .unwrap_err();
        assert!(e.starts_with("cannot listen on udp"), "{e}");
        let e = d
            .expose(f("192.0.2.1:8080".parse().unwrap(), Protocol::Tcp))
            .await
            .unwrap_err();
        assert!(e.ends_with("the address is not on this host"), "{e}");
        assert_eq!(d.list(), vec![f(free_addr, Protocol::Tcp)]);
        // Unexpose closes the listener at once.
        d.unexpose(free_addr, Protocol::Tcp).unwrap();
        assert_eq!(
            std::net::TcpStream::connect(free_addr)
                .map_err(|e| e.kind())
                .err(),
            Some(io::ErrorKind::ConnectionRefused)
        );
        assert!(d.unexpose(free_addr, Protocol::Tcp).is_err());
        assert!(d.list().is_empty());
    }

    #[test]
    fn stats_count_dns_queries_and_omit_dns_when_it_is_off() {
        use rand_chacha::rand_core::SeedableRng;
        let driver = Driver::new(TokioNet);
        let off = stack();
        assert!(driver.stats_json(&off)["core"]["dns"].is_null());

        let mut c = Config::for_subnet("192.168.65.0/24".parse().unwrap());
        c.dns = Some(usernet_core::dns::DnsConfig::new(
            c.gateway.into(),
            c.host_alias.map(Into::into),
        ));
        let mut s = Stack::new(c, Rng::seed_from_u64(1), Instant::from_micros(0)).unwrap();
        // A query for the gateway's own static name, from a guest.
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["host", "usernet", "internal"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut f = vec![0u8; 14 + 28 + q.len()];
        f[0..6].copy_from_slice(&s.config().gateway_mac);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        usernet_core::wire::emit_udp(
            &mut f[14..],
            "192.168.65.3".parse().unwrap(),
            40000,
            "192.168.65.1".parse().unwrap(),
            53,
            &q,
            1,
        );
        s.handle_frame(Instant::from_micros(0), &f);
        s.poll(Instant::from_micros(0));
        let v = driver.stats_json(&s);
        assert_eq!(v["core"]["dns"]["queries"], 1, "{v}");
        assert_eq!(v["core"]["dns"]["answered_static"], 1, "{v}");
    }
}
