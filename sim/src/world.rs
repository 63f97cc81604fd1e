//! One simulated run: the turmoil world (daemon host running the production driver loop,
//! upstream hosts), the guest link, the guests, scheduled faults, and the oracles.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use usernet::{Driver, FrameTransport};
use usernet_core::{Config, Stack};

use crate::client::ClientShared;
use crate::guest::{Guest, GuestShared, Outcome};
use crate::hostnet::TurmoilNet;
use crate::link::{fmt_mac, Dir, Link, LinkParams};
use crate::rng;
use crate::scenario::{EventKind, Expect, FwdProtocol, JobKind, Scenario, Transport};
use crate::trace::Trace;

/// Deliberately broken behaviours, to prove the oracles can fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mutation {
    #[default]
    None,
    /// The host side of the relay loses one byte of the first stream.
    RelayDropsByte,
    /// The relay never notices the upstream's FIN.
    RelayIgnoresFin,
    /// The leak check runs without letting the daemon finish its closes and expiries
    /// (the "final cleanup" is skipped).
    SkipCleanup,
    /// A guest forgets its finished connections without closing them.
    GuestVanishes,
    /// A task panics (the guest, on its DHCP lease): tokio swallows it, the sim must not.
    Panic,
    /// The host side sends every UDP datagram twice (a forward that answers twice).
    UdpTwice,
}

impl std::str::FromStr for Mutation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" => Mutation::None,
            "drop-byte" => Mutation::RelayDropsByte,
            "ignore-fin" => Mutation::RelayIgnoresFin,
            "skip-cleanup" => Mutation::SkipCleanup,
            "guest-vanishes" => Mutation::GuestVanishes,
            "panic" => Mutation::Panic,
            "udp-twice" => Mutation::UdpTwice,
            _ => {
                return Err(format!(
                    "unknown mutation {s:?} (drop-byte, ignore-fin, skip-cleanup, guest-vanishes, panic, udp-twice)"
                ))
            }
        })
    }
}

/// What the daemon reports at the end.
#[derive(Clone, Debug, Default)]
pub struct DaemonReport {
    pub tcp_flows: usize,
    pub udp_flows: usize,
    pub ping_flows: usize,
    pub open_sockets: usize,
    pub frames_queued: usize,
    pub flows_left: Vec<String>,
    pub tcp_flows_opened: u64,
    pub tcp_connects_failed: u64,
    pub udp_flows_opened: u64,
    pub connects_ok: u64,
    pub drops: Vec<(String, u64)>,
    pub workload_done_us: u64,
    pub idle_us: u64,
    pub mtu_changes: Vec<(u64, u16)>,
    /// Expose/unexpose calls and what they answered.
    pub forwards: Vec<String>,
    pub dns: Option<usernet_core::dns::DnsStats>,
}

/// The state every task of the world shares (one thread: `Rc<RefCell<_>>`).
pub struct World {
    pub base: tokio::time::Instant,
    pub link: Link,
    pub trace: Trace,
    pub guests: Vec<GuestShared>,
    /// MTU changes for the daemon to apply, with whether the guest is told.
    pub pending_mtu: Vec<(u16, bool)>,
    pub daemon: Option<DaemonReport>,
    pub errors: Vec<String>,
    /// Client hosts (port forwards) and how many have not finished.
    pub clients: Vec<ClientShared>,
    pub clients_left: usize,
    /// Expose/unexpose events for the daemon to carry out: (kind, host port, guest port,
    /// protocol).
    pub pending_forwards: Vec<(EventKind, u16, u16, FwdProtocol)>,
    /// Datagrams through UDP forwards, counted at both ends.
    pub udp_fwd: UdpFwdCounts,
}

/// Datagrams of UDP port forwards: what the clients sent and got back, what the guests'
/// `udp_serve` services got and echoed. Each daemon step forwards every datagram once,
/// so copies only multiply on the guest link: the oracle bounds each end's count by the
/// other's plus the link's duplications.
#[derive(Clone, Copy, Debug, Default)]
pub struct UdpFwdCounts {
    pub client_sent: u64,
    pub client_replies: u64,
    pub guest_received: u64,
    pub guest_echoed: u64,
    /// Datagrams answered at their first attempt (the delivery ratio before retries).
    pub first_try: u64,
    pub answered: u64,
}

impl World {
    pub fn now_us(&self) -> u64 {
        (tokio::time::Instant::now() - self.base).as_micros() as u64
    }
}

thread_local! {
    /// The world of the run on this thread, for host-side events (`SimTcp` lives inside
    /// the driver and cannot hold an `Rc`).
    static CURRENT: RefCell<Option<std::rc::Weak<RefCell<World>>>> = const { RefCell::new(None) };
}

/// Record a host-side event (connects, FINs, resets) in the trace.
pub fn host_event(kind: &str, line: impl FnOnce() -> String) {
    CURRENT.with(|c| {
        let Some(w) = c.borrow().as_ref().and_then(|w| w.upgrade()) else {
            return;
        };
        let Ok(mut w) = w.try_borrow_mut() else {
            return;
        };
        let now = w.now_us();
        w.trace.event(now, kind, 0, &[]);
        w.trace.log(now, || format!("host {}", line()));
    });
}

/// The daemon's end of the link: the production loop's `FrameTransport`.
pub struct DaemonPort {
    world: Rc<RefCell<World>>,
    notify: Rc<Notify>,
    guest_notify: Vec<Rc<Notify>>,
    buf: VecDeque<Vec<u8>>,
    cur: Vec<u8>,
}

impl FrameTransport for DaemonPort {
    async fn recv(&mut self) -> io::Result<bool> {
        loop {
            let (next, base) = {
                let w = &mut *self.world.borrow_mut();
                let now = w.now_us();
                w.link.take_for_daemon(&mut w.trace, now, &mut self.buf);
                if !self.buf.is_empty() {
                    return Ok(true);
                }
                (w.link.next_for_daemon(), w.base)
            };
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(base + Duration::from_micros(t)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.notify.notified() => {}
                _ = sleep => {}
            }
        }
    }

    fn next_frame(&mut self) -> Option<&[u8]> {
        self.cur = self.buf.pop_front()?;
        Some(&self.cur)
    }

    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let w = &mut *self.world.borrow_mut();
        let now = w.now_us();
        w.link.send(&mut w.trace, Dir::D2g, now, frame);
        for n in &self.guest_notify {
            n.notify_one();
        }
        Ok(())
    }

    fn pending(&self) -> usize {
        0
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Options of one run beyond the scenario and seed.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    pub trace_log: bool,
    pub mutation: Mutation,
}

/// The result of one run.
#[derive(Debug, Default)]
pub struct RunReport {
    pub scenario: String,
    pub seed: u64,
    pub faults: String,
    pub failures: Vec<String>,
    pub trace_hash: u64,
    pub trace_events: u64,
    pub sim_time: Duration,
    pub wall_time: Duration,
    pub summary: String,
    pub log: Vec<String>,
}

impl RunReport {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn replay_command(&self) -> String {
        format!(
            "cargo run -p sim --release -- run {} --seed {}",
            self.scenario, self.seed
        )
    }

    /// What a failure prints: scenario, seed, swarm options, failures, replay command.
    pub fn failure_text(&self) -> String {
        let mut s = format!(
            "FAILED scenario {} seed {}\n  faults: {}\n",
            self.scenario, self.seed, self.faults
        );
        for f in &self.failures {
            let _ = writeln!(s, "  - {f}");
        }
        let _ = writeln!(s, "  replay: {}", self.replay_command());
        s
    }
}

/// A run taking longer than this in wall-clock time is reported as hung (checked between
/// turmoil steps; a spin inside one step is not caught).
const WATCHDOG: Duration = Duration::from_secs(120);

const DAEMON_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn guest_mac(spec_mac: &Option<String>, idx: usize) -> [u8; 6] {
    if let Some(m) = spec_mac {
        let v: Vec<u8> = m
            .split(':')
            .filter_map(|p| u8::from_str_radix(p, 16).ok())
            .collect();
        if let Ok(a) = <[u8; 6]>::try_from(v) {
            return a;
        }
    }
    [0x52, 0x54, 0x00, 0x12, 0x34, idx as u8 + 1]
}

fn daemon_config(sc: &Scenario) -> Config {
    let mut c = Config::default();
    let o = &sc.config;
    if let Some(m) = o.mtu {
        c.mtu = m;
    }
    if let Some(b) = o.tcp_buffer {
        c.tcp.rx_buffer = b;
        c.tcp.tx_buffer = b;
    }
    if let Some(t) = o.udp_idle_timeout_s {
        c.udp.idle_timeout = usernet_core::Duration::from_micros((t * 1e6) as u64);
    }
    if let Some(t) = o.icmp_idle_timeout_s {
        c.icmp.idle_timeout = usernet_core::Duration::from_micros((t * 1e6) as u64);
    }
    if let Some(t) = o.connect_timeout_s {
        c.tcp.connect_timeout = usernet_core::Duration::from_micros((t * 1e6) as u64);
    }
    if let Some(d) = &sc.dns {
        let mut dc =
            usernet_core::dns::DnsConfig::new(IpAddr::V4(c.gateway), c.host_alias.map(IpAddr::V4));
        dc.upstream_groups = d
            .groups
            .iter()
            .map(|g| {
                g.iter()
                    .filter_map(|n| sc.upstream_ip(n))
                    .map(|ip| std::net::SocketAddr::new(IpAddr::V4(ip), 53))
                    .collect()
            })
            .collect();
        if let Some(ms) = d.retransmit_ms {
            dc.retransmit = usernet_core::Duration::from_millis(ms);
        }
        if let Some(ms) = d.timeout_ms {
            dc.timeout = usernet_core::Duration::from_millis(ms);
        }
        if let Some(n) = d.cache_entries {
            dc.cache_entries = n;
        }
        c.dns = Some(dc);
    }
    c
}

thread_local! {
    /// Panics on this thread during the current run (tasks spawned on a tokio runtime
    /// swallow their panics: the driver's UDP and connect tasks, the guests).
    static PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Record every panic on the thread where it happens, then report it as usual.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.to_string();
            let _ = PANICS.try_with(|p| p.borrow_mut().push(msg));
            previous(info);
        }));
    });
}

/// Run `sc` with `seed`.
pub fn run(sc: &Scenario, seed: u64, opts: RunOptions) -> RunReport {
    install_panic_hook();
    PANICS.with(|p| p.borrow_mut().clear());
    let wall = std::time::Instant::now();
    let params = LinkParams::draw(&sc.faults, seed);
    let faults = params.describe();
    let macs: Vec<[u8; 6]> = sc
        .guests
        .iter()
        .enumerate()
        .map(|(i, g)| guest_mac(&g.mac, i))
        .collect();
    let config = daemon_config(sc);
    let mtu = usize::from(config.mtu);

    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs_f64(sc.duration_s))
        .tick_duration(Duration::from_millis(sc.tick_ms))
        .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .rng_seed(rng::derive(seed, "turmoil"))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(sc.tick_ms.max(2)))
        .tcp_capacity(256)
        .udp_capacity(256)
        .build();

    for u in &sc.upstreams {
        let ip: Ipv4Addr = u.ip.parse().expect("checked");
        let dns = u.dns.map(|b| (b, u.dns_delay_ms));
        let proxy = u.proxy;
        sim.host(IpAddr::V4(ip), move || {
            crate::upstream::serve(ip, dns, proxy)
        });
    }

    let heal_us = params.heal_us;
    // The shared world. `base` is reset when the daemon starts (inside its runtime).
    let world: Rc<RefCell<Option<Rc<RefCell<World>>>>> = Rc::new(RefCell::new(None));
    {
        let sc = sc.clone();
        let world_slot = world.clone();
        let macs = macs.clone();
        sim.client(IpAddr::V4(DAEMON_IP), async move {
            daemon_main(sc, seed, opts, params, macs, config, mtu, world_slot).await
        });
    }

    for (ci, c) in sc.clients.iter().enumerate() {
        let ip: Ipv4Addr = c.ip.parse().expect("checked");
        let (spec, slot) = (c.clone(), world.clone());
        sim.client(IpAddr::V4(ip), async move {
            crate::client::run(ci, spec, DAEMON_IP, seed, heal_us, slot).await
        });
    }

    // Scheduled faults, fired between steps.
    let mut fired: Vec<Option<Duration>> = vec![None; sc.events.len()];
    let mut sim_error = None;
    loop {
        let elapsed = sim.elapsed();
        let carried = world
            .borrow()
            .as_ref()
            .map_or(0, |w| w.borrow().link.tcp_bytes);
        for (i, e) in sc.events.iter().enumerate() {
            if fired[i].is_some() {
                continue;
            }
            // `at_s` and `after_bytes` events fire on their own; `after_prev_s` counts from
            // the event before it in the file.
            let due = if let Some(t) = e.at_s {
                elapsed >= Duration::from_secs_f64(t)
            } else if let Some(b) = e.after_bytes {
                carried >= b
            } else {
                match i.checked_sub(1).map(|p| fired[p]) {
                    Some(Some(prev)) => {
                        elapsed >= prev + Duration::from_secs_f64(e.after_prev_s.unwrap_or(0.0))
                    }
                    Some(None) => false,
                    None => elapsed >= Duration::from_secs_f64(e.after_prev_s.unwrap_or(0.0)),
                }
            };
            if !due {
                continue;
            }
            fired[i] = Some(elapsed);
            let up = sc.upstream_ip(&e.upstream).map(IpAddr::V4);
            if let Some(w) = world.borrow().as_ref() {
                let w = &mut *w.borrow_mut();
                let t = elapsed.as_micros() as u64;
                w.trace
                    .event(t, "fault", i as u64, format!("{:?}", e.kind).as_bytes());
                w.trace
                    .log(t, || format!("FAULT {:?} {}", e.kind, e.upstream));
                match e.kind {
                    EventKind::MtuTold | EventKind::MtuBlackhole => {
                        w.pending_mtu
                            .push((e.mtu.expect("checked"), e.kind == EventKind::MtuTold));
                    }
                    EventKind::Expose | EventKind::Unexpose => {
                        w.pending_forwards.push((
                            e.kind,
                            e.port.expect("checked"),
                            e.guest_port.unwrap_or(0),
                            e.protocol,
                        ));
                    }
                    _ => {}
                }
            }
            let d = IpAddr::V4(DAEMON_IP);
            match (e.kind, up) {
                (EventKind::Partition, Some(u)) => sim.partition(d, u),
                (EventKind::Repair, Some(u)) => sim.repair(d, u),
                (EventKind::Hold, Some(u)) => sim.hold(d, u),
                (EventKind::Release, Some(u)) => sim.release(d, u),
                (EventKind::Crash, Some(u)) => sim.crash(u),
                (EventKind::Bounce, Some(u)) => sim.bounce(u),
                _ => {}
            }
        }
        if wall.elapsed() > WATCHDOG {
            sim_error = Some(format!(
                "watchdog: {:?} of wall-clock time at simulated {:.3}s (a hang or a spin)",
                WATCHDOG,
                sim.elapsed().as_secs_f64()
            ));
            break;
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                sim_error = Some(e.to_string());
                break;
            }
        }
    }
    let sim_time = sim.elapsed();
    drop(sim);

    let mut report = RunReport {
        scenario: sc.name.clone(),
        seed,
        faults,
        sim_time,
        ..Default::default()
    };
    if let Some(e) = sim_error {
        report.failures.push(format!("simulation: {e}"));
    }
    for p in PANICS.with(|p| std::mem::take(&mut *p.borrow_mut())) {
        report.failures.push(format!("safety: panic: {p}"));
    }
    let Some(w) = world.borrow_mut().take() else {
        report.failures.push("the daemon never started".into());
        return report;
    };
    let mut w = Rc::try_unwrap(w)
        .map(RefCell::into_inner)
        .unwrap_or_else(|rc| {
            // Tasks still hold the world (the sim ended early): take what we need.
            let mut b = rc.borrow_mut();
            World {
                base: b.base,
                link: std::mem::replace(&mut b.link, Link::new(LinkParams::default(), 0, vec![])),
                trace: std::mem::take(&mut b.trace),
                guests: std::mem::take(&mut b.guests),
                pending_mtu: vec![],
                daemon: b.daemon.take(),
                errors: std::mem::take(&mut b.errors),
                clients: std::mem::take(&mut b.clients),
                clients_left: b.clients_left,
                pending_forwards: vec![],
                udp_fwd: b.udp_fwd,
            }
        });
    check(sc, &w, &mut report, opts);
    report.trace_hash = w.trace.hash();
    report.trace_events = w.trace.events;
    report.log = w.trace.take_log();
    report.summary = summary(sc, &w, &report);
    report.wall_time = wall.elapsed();
    report
}

#[allow(clippy::too_many_arguments)]
async fn daemon_main(
    sc: Scenario,
    seed: u64,
    opts: RunOptions,
    params: LinkParams,
    macs: Vec<[u8; 6]>,
    config: Config,
    mtu: usize,
    slot: Rc<RefCell<Option<Rc<RefCell<World>>>>>,
) -> turmoil::Result {
    let upstream_ips = sc
        .upstreams
        .iter()
        .filter_map(|u| u.ip.parse().ok())
        .collect();
    let mut driver = Driver::new(TurmoilNet::new(opts.mutation, upstream_ips));
    let base = tokio::time::Instant::now();
    let mut link = Link::new(params, seed, macs.clone());
    link.backpressure = sc.backpressure && sc.transport == Transport::Stream;
    link.set_mtu(Dir::D2g, Some(mtu), true);
    let world = Rc::new(RefCell::new(World {
        base,
        link,
        trace: Trace::new(opts.trace_log),
        guests: macs
            .iter()
            .map(|m| GuestShared {
                mac: *m,
                ..Default::default()
            })
            .collect(),
        pending_mtu: Vec::new(),
        daemon: None,
        errors: Vec::new(),
        clients: sc
            .clients
            .iter()
            .map(|c| ClientShared {
                name: c.name.clone(),
                outcomes: vec![Vec::new(); c.jobs.len()],
                done: false,
            })
            .collect(),
        clients_left: sc.clients.len(),
        pending_forwards: sc
            .forwards
            .iter()
            .map(|f| (EventKind::Expose, f.port, f.guest_port, f.protocol))
            .collect(),
        udp_fwd: UdpFwdCounts::default(),
    }));
    *slot.borrow_mut() = Some(world.clone());
    CURRENT.with(|c| *c.borrow_mut() = Some(Rc::downgrade(&world)));
    let mut stack = Stack::new(config, rng::stream(seed, "stack"), driver.now())
        .map_err(|e| format!("config: {e}"))?;
    if let Some(p) = &sc.proxy {
        let ip = sc.upstream_ip(&p.http).expect("checked");
        stack.set_proxy(Some(usernet_core::ProxyConfig {
            http: Some(usernet_core::proxy::Upstream {
                addr: std::net::SocketAddr::from((ip, crate::upstream::PORT_PROXY)),
                authorization: None,
            }),
            exclude: usernet_core::proxy::parse_no_proxy(&p.no_proxy).expect("checked"),
            ..usernet_core::ProxyConfig::default()
        }));
    }
    let daemon_notify = Rc::new(Notify::new());
    let control = Rc::new(Notify::new());
    let guest_notify: Vec<Rc<Notify>> = macs.iter().map(|_| Rc::new(Notify::new())).collect();
    for (i, g) in sc.guests.iter().enumerate() {
        let guest = Guest::new(
            i,
            macs[i],
            g,
            |name| sc.upstream_ip(name),
            sc.upstreams
                .iter()
                .filter_map(|u| Some((u.name.clone(), u.ip.parse().ok()?)))
                .collect(),
            seed,
            mtu,
            world.clone(),
            guest_notify[i].clone(),
            daemon_notify.clone(),
            control.clone(),
            opts.mutation,
        );
        tokio::task::spawn_local(guest.run());
    }
    let mut report = DaemonReport::default();
    let phases = Phases {
        sc: &sc,
        opts,
        world: &world,
        control: &control,
        guest_notify: &guest_notify,
    };
    match sc.transport {
        Transport::Direct => {
            let mut port = DaemonPort {
                world: world.clone(),
                notify: daemon_notify.clone(),
                guest_notify: guest_notify.clone(),
                buf: VecDeque::new(),
                cur: Vec::new(),
            };
            phases
                .run(&mut driver, &mut stack, &mut port, &mut report)
                .await?;
        }
        Transport::Stream => {
            // The production QEMU-stream framing (`FramedStream`) over an in-memory pipe;
            // two pump tasks move frames between the pipe and the link.
            // A small pipe when the link pushes back, so the daemon feels it at once.
            let pipe = if sc.backpressure {
                8 * 1024
            } else {
                STREAM_PIPE
            };
            let (daemon_end, wire_end) = tokio::io::duplex(pipe);
            let (rd, wr) = tokio::io::split(wire_end);
            tokio::task::spawn_local(pump_to_guests(rd, world.clone(), guest_notify.clone()));
            tokio::task::spawn_local(pump_to_daemon(wr, world.clone(), daemon_notify.clone()));
            let mut port = usernet::stream::FramedStream::new(daemon_end);
            phases
                .run(&mut driver, &mut stack, &mut port, &mut report)
                .await?;
        }
    }
    report.idle_us = world.borrow().now_us();
    report.tcp_flows = stack.tcp_flow_count();
    report.udp_flows = stack.udp_flow_count();
    report.ping_flows = stack.ping_flow_count();
    report.open_sockets = driver.open_sockets();
    report.frames_queued = stack.frames_queued();
    report.flows_left = stack
        .tcp_flows()
        .iter()
        .map(|f| {
            format!(
                "{} {} -> {} {} (to host {}, to guest {})",
                f.flow, f.guest, f.dst, f.state, f.to_host_queued, f.to_guest_queued
            )
        })
        .collect();
    let st = stack.stats();
    report.tcp_flows_opened = st.tcp_flows_opened;
    report.tcp_connects_failed = st.tcp_connects_failed;
    report.udp_flows_opened = st.udp_flows_opened;
    report.connects_ok = driver.stats.connects_ok;
    report.dns = stack.dns_stats().cloned();
    report.drops = st
        .drops()
        .map(|(r, n)| (r.as_str().to_string(), n))
        .collect();
    world.borrow_mut().daemon = Some(report);
    Ok(())
}

/// Bytes the in-memory pipe of the stream transport holds each way.
const STREAM_PIPE: usize = 64 * 1024;

/// Frames the daemon writes on the stream go onto the link.
async fn pump_to_guests(
    mut rd: tokio::io::ReadHalf<tokio::io::DuplexStream>,
    world: Rc<RefCell<World>>,
    guest_notify: Vec<Rc<Notify>>,
) {
    use tokio::io::AsyncReadExt;
    let mut frame = Vec::new();
    loop {
        // Backpressure: stop reading while the link's queue towards the guests is full; the
        // pipe fills and the daemon's transport has to hold back.
        let wait = {
            let w = &mut *world.borrow_mut();
            let now = w.now_us();
            let t = w.link.d2g_wait(now);
            if let Some(t) = t {
                w.link.note_held();
                w.trace.event(now, "held", t, &[]);
                w.trace.log(now, || {
                    format!(
                        "d>g link full: the daemon's stream is not read until {:.6}s",
                        t as f64 / 1e6
                    )
                });
            }
            t.map(|t| w.base + Duration::from_micros(t))
        };
        if let Some(t) = wait {
            tokio::time::sleep_until(t).await;
            continue;
        }
        let mut len = [0u8; 4];
        if rd.read_exact(&mut len).await.is_err() {
            return;
        }
        frame.resize(u32::from_be_bytes(len) as usize, 0);
        if rd.read_exact(&mut frame).await.is_err() {
            return;
        }
        let w = &mut *world.borrow_mut();
        let now = w.now_us();
        w.link.send(&mut w.trace, Dir::D2g, now, &frame);
        for n in &guest_notify {
            n.notify_one();
        }
    }
}

/// Frames due at the daemon are written on the stream, length-prefixed.
async fn pump_to_daemon(
    mut wr: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    world: Rc<RefCell<World>>,
    notify: Rc<Notify>,
) {
    use tokio::io::AsyncWriteExt;
    let mut due = VecDeque::new();
    loop {
        let (next, base) = {
            let w = &mut *world.borrow_mut();
            let now = w.now_us();
            w.link.take_for_daemon(&mut w.trace, now, &mut due);
            (w.link.next_for_daemon(), w.base)
        };
        while let Some(f) = due.pop_front() {
            let mut buf = (f.len() as u32).to_be_bytes().to_vec();
            buf.extend_from_slice(&f);
            if wr.write_all(&buf).await.is_err() {
                return;
            }
        }
        if wr.flush().await.is_err() {
            return;
        }
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(base + Duration::from_micros(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = notify.notified() => {}
            _ = sleep => {}
        }
    }
}

/// The daemon's two phases, over either transport.
struct Phases<'a> {
    sc: &'a Scenario,
    opts: RunOptions,
    world: &'a Rc<RefCell<World>>,
    control: &'a Rc<Notify>,
    guest_notify: &'a [Rc<Notify>],
}

impl Phases<'_> {
    async fn run<T: FrameTransport>(
        &self,
        driver: &mut Driver<TurmoilNet>,
        stack: &mut Stack,
        port: &mut T,
        report: &mut DaemonReport,
    ) -> turmoil::Result {
        let world = self.world;
        // Phase 1: the workload, interrupted for MTU changes and port-forward calls. The
        // stop future also wakes up every 100 ms so that events fired by the outer loop
        // are applied promptly.
        loop {
            let forwards: Vec<(EventKind, u16, u16, FwdProtocol)> =
                std::mem::take(&mut world.borrow_mut().pending_forwards);
            for (kind, port, guest_port, proto) in forwards {
                let protocol = proto.usernet();
                let local = std::net::SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
                let (what, r) = if kind == EventKind::Expose {
                    let f = usernet::forward::Forward {
                        protocol,
                        local,
                        remote: usernet::forward::Remote::Leased(guest_port),
                    };
                    (format!("expose {f}"), driver.expose(f).await)
                } else {
                    (
                        format!("unexpose {} {local}", protocol.as_str()),
                        driver.unexpose(local, protocol).map(|_| ()),
                    )
                };
                let w = &mut *world.borrow_mut();
                let t = w.now_us();
                let line = format!(
                    "{what} at {}: {}",
                    secs(t),
                    match &r {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("error: {e}"),
                    }
                );
                w.trace
                    .event(t, "forward", u64::from(port), line.as_bytes());
                w.trace.log(t, || format!("daemon {line}"));
                report.forwards.push(line);
                let listed = driver.list().len();
                w.trace.event(t, "forwards-listed", listed as u64, &[]);
            }
            let stop = async {
                tokio::select! {
                    biased;
                    _ = self.control.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            };
            driver.run(stack, port, stop).await?;
            let pending: Vec<(u16, bool)> = std::mem::take(&mut world.borrow_mut().pending_mtu);
            for (m, told) in pending {
                let now = driver.now();
                stack.set_mtu(now, m).map_err(|e| format!("set_mtu: {e}"))?;
                let w = &mut *world.borrow_mut();
                let t = w.now_us();
                report.mtu_changes.push((t, m));
                w.trace.event(t, "set_mtu", u64::from(m), &[]);
                w.trace.log(t, || {
                    format!(
                        "daemon set_mtu({m}){}",
                        if told { ", guests told" } else { "" }
                    )
                });
                w.link.set_mtu(Dir::D2g, Some(usize::from(m)), true);
                if told {
                    for g in &mut w.guests {
                        g.pending_mtu = Some(m);
                    }
                    for n in self.guest_notify {
                        n.notify_one();
                    }
                }
            }
            if world.borrow().guests.iter().all(|g| g.done) && world.borrow().clients_left == 0 {
                break;
            }
        }
        report.workload_done_us = world.borrow().now_us();
        // Phase 2: let closes finish and timers run out, then look for leaks.
        let drain_end = report.workload_done_us + (self.sc.drain_s * 1e6) as u64;
        if self.opts.mutation != Mutation::SkipCleanup {
            loop {
                let clean = stack.tcp_flow_count() == 0
                    && stack.udp_flow_count() == 0
                    && stack.ping_flow_count() == 0
                    && driver.open_sockets() == 0
                    && stack.frames_queued() == 0;
                let now = world.borrow().now_us();
                if clean || now >= drain_end {
                    break;
                }
                driver
                    .run(stack, port, tokio::time::sleep(Duration::from_millis(250)))
                    .await?;
            }
        }
        Ok(())
    }
}

/// Check the outcomes of one job against what it expects.
fn check_job(
    f: &mut Vec<String>,
    who: &str,
    ji: usize,
    job: &crate::scenario::Job,
    outs: &[Outcome],
) {
    let mut bad = Vec::new();
    for (ci, o) in outs.iter().enumerate() {
        let problem = match (o, job.expect) {
            (Outcome::Corrupt(why), _) => Some(format!("safety: {why}")),
            (Outcome::Timeout { detail }, _) => Some(format!(
                "liveness: not finished by {}s: {detail}",
                job.deadline_s
            )),
            (Outcome::Complete { .. }, Expect::Complete | Expect::Clean) => None,
            (
                Outcome::Reset {
                    established: false, ..
                },
                Expect::Reset,
            ) => None,
            (Outcome::Reset { .. } | Outcome::Truncated { .. }, Expect::Clean) => None,
            (Outcome::Servfail { .. }, Expect::Servfail | Expect::Clean) => None,
            (Outcome::HttpError { status, .. }, Expect::HttpError | Expect::Clean)
                if (500..600).contains(status) =>
            {
                None
            }
            (o, e) => Some(format!("expected {e:?}, got {o:?}")),
        };
        if let Some(p) = problem {
            bad.push(format!("{who} job{ji} ({:?}) #{ci}: {p}", job.kind));
        }
    }
    let n = bad.len();
    f.extend(bad.into_iter().take(3));
    if n > 3 {
        f.push(format!("{who} job{ji}: ... {n} connections failed in all"));
    }
    // A server handles whatever its clients bring.
    if !matches!(job.kind, JobKind::Serve | JobKind::UdpServe) && outs.len() as u32 != job.count {
        f.push(format!(
            "{who} job{ji}: {} outcomes for {} connections",
            outs.len(),
            job.count
        ));
    }
}

/// The oracles that look at the end state (the link checks frames as they pass).
fn check(sc: &Scenario, w: &World, report: &mut RunReport, opts: RunOptions) {
    let f = &mut report.failures;
    for v in w.link.violations.iter().take(5) {
        f.push(format!("safety: {v}"));
    }
    if w.link.violations.len() > 5 {
        f.push(format!(
            "safety: ... {} wire violations in all",
            w.link.violations.len()
        ));
    }
    for e in &w.errors {
        f.push(e.clone());
    }
    for (gi, (g, spec)) in w.guests.iter().zip(&sc.guests).enumerate() {
        if g.lease.is_none() {
            f.push(format!("liveness: guest{gi} never got a DHCP lease"));
        }
        if !g.done {
            f.push(format!("liveness: guest{gi} did not finish its workload"));
            continue;
        }
        for (ji, (job, outs)) in spec.jobs.iter().zip(&g.outcomes).enumerate() {
            check_job(f, &format!("guest{gi}"), ji, job, outs);
        }
    }
    for (ci, (c, spec)) in w.clients.iter().zip(&sc.clients).enumerate() {
        if !c.done {
            f.push(format!("liveness: client{ci} did not finish its workload"));
            continue;
        }
        for (ji, (job, outs)) in spec.jobs.iter().zip(&c.outcomes).enumerate() {
            check_job(f, &format!("client{ci}"), ji, job, outs);
        }
    }
    // UDP forwards: nothing is answered more often than copies reached the other end.
    let u = w.udp_fwd;
    let (g2d, d2g) = (w.link.stats(Dir::G2d), w.link.stats(Dir::D2g));
    if u.guest_received > u.client_sent + d2g.duplicated {
        f.push(format!(
            "safety: UDP forwards: the guests got {} datagrams; the clients sent {} and the link duplicated {} frames towards the guests",
            u.guest_received, u.client_sent, d2g.duplicated
        ));
    }
    if u.client_replies > u.guest_echoed + g2d.duplicated {
        f.push(format!(
            "safety: UDP forwards: the clients got {} replies; the guests echoed {} and the link duplicated {} frames towards the daemon",
            u.client_replies, u.guest_echoed, g2d.duplicated
        ));
    }
    match &w.daemon {
        None => f.push("liveness: the daemon did not finish (workload or drain hung)".into()),
        Some(d) => {
            if d.tcp_flows + d.udp_flows + d.ping_flows + d.open_sockets + d.frames_queued > 0 {
                f.push(format!(
                    "leak: {}s after the workload: {} TCP flows, {} UDP flows, {} ping flows, {} host sockets, {} frames queued{}",
                    if opts.mutation == Mutation::SkipCleanup { 0.0 } else { sc.drain_s },
                    d.tcp_flows,
                    d.udp_flows,
                    d.ping_flows,
                    d.open_sockets,
                    d.frames_queued,
                    d.flows_left.iter().take(3).map(|s| format!("\n      {s}")).collect::<String>()
                ));
            }
        }
    }
}

fn secs(us: u64) -> String {
    format!("{:.3}s", us as f64 / 1e6)
}

fn summary_job(s: &mut String, ji: usize, job: &crate::scenario::Job, outs: &[Outcome]) {
    let mut counts = std::collections::BTreeMap::<&str, u32>::new();
    let mut bytes = 0;
    let mut last = 0;
    for o in outs {
        let k = match o {
            Outcome::Complete { bytes: b, .. } => {
                bytes += b;
                "complete"
            }
            Outcome::Reset {
                established: false, ..
            } => "refused",
            Outcome::Reset { .. } => "reset",
            Outcome::Truncated { .. } => "truncated",
            Outcome::Servfail { .. } => "servfail",
            Outcome::HttpError { status: 502, .. } => "http_502",
            Outcome::HttpError { status: 504, .. } => "http_504",
            Outcome::HttpError { .. } => "http_error",
            Outcome::Corrupt(_) => "CORRUPT",
            Outcome::Timeout { .. } => "TIMEOUT",
        };
        *counts.entry(k).or_default() += 1;
        last = last.max(o.at_us().unwrap_or(0));
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        s,
        "  job{ji} {:?} x{} (expect {:?}): {} ; {} bytes; last at {}",
        job.kind,
        job.count,
        job.expect,
        counts.join(" "),
        bytes,
        secs(last)
    );
}

/// The readable summary snapshotted per scenario.
fn summary(sc: &Scenario, w: &World, r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "scenario: {} (seed {})", sc.name, r.seed);
    let _ = writeln!(s, "faults: {}", r.faults);
    for (gi, (g, spec)) in w.guests.iter().zip(&sc.guests).enumerate() {
        let lease = g
            .lease
            .map_or("none".to_string(), |(ip, t)| format!("{ip} at {}", secs(t)));
        let _ = writeln!(s, "guest{gi} {}: lease {lease}", fmt_mac(&g.mac));
        for (t, m, how) in &g.mtu_changes {
            let _ = writeln!(s, "  mtu -> {m} at {} ({how})", secs(*t));
        }
        for (ji, job) in spec.jobs.iter().enumerate() {
            let outs = g.outcomes.get(ji).map(Vec::as_slice).unwrap_or(&[]);
            summary_job(&mut s, ji, job, outs);
            for n in g.notes.get(ji).map(Vec::as_slice).unwrap_or(&[]) {
                let _ = writeln!(s, "    {n}");
            }
        }
    }
    for (c, spec) in w.clients.iter().zip(&sc.clients) {
        let _ = writeln!(s, "client {} {}:", c.name, spec.ip);
        for (ji, job) in spec.jobs.iter().enumerate() {
            let outs = c.outcomes.get(ji).map(Vec::as_slice).unwrap_or(&[]);
            summary_job(&mut s, ji, job, outs);
        }
    }
    let u = w.udp_fwd;
    if u.client_sent > 0 {
        let _ = writeln!(
            s,
            "udp forwards: clients sent={} answered={} (first try {}) replies={}; guests received={} echoed={}",
            u.client_sent, u.answered, u.first_try, u.client_replies, u.guest_received, u.guest_echoed
        );
    }
    for dir in [Dir::G2d, Dir::D2g] {
        let d = w.link.stats(dir);
        let _ = writeln!(
            s,
            "link {}: frames={} bytes={} delivered={} lost={} down={} queue={} mtu={} dup={} reordered={}",
            dir.name(),
            d.frames,
            d.bytes,
            d.delivered,
            d.lost,
            d.down_dropped,
            d.queue_dropped,
            d.mtu_dropped,
            d.duplicated,
            d.reordered
        );
        if d.held > 0 {
            let _ = writeln!(s, "  backpressure: daemon held back {} times", d.held);
        }
        let _ = writeln!(
            s,
            "  tcp: segments={} payload={} retransmissions={} dup_acks={} keepalives={} syn={} fin={} rst={}",
            d.tcp_segments,
            d.tcp_payload,
            d.tcp_retrans,
            d.tcp_dup_acks,
            d.keepalives,
            d.syns,
            d.fins,
            d.rsts
        );
    }
    if let Some(d) = &w.daemon {
        let _ = writeln!(
            s,
            "daemon: tcp flows opened={} connects failed={} udp flows opened={}",
            d.tcp_flows_opened, d.tcp_connects_failed, d.udp_flows_opened
        );
        for (t, m) in &d.mtu_changes {
            let _ = writeln!(s, "  set_mtu({m}) at {}", secs(*t));
        }
        for l in &d.forwards {
            let _ = writeln!(s, "  {l}");
        }
        if let Some(x) = &d.dns {
            let _ = writeln!(
                s,
                "  dns: queries={} tcp={} forwarded={} upstream sent={} good={} errors={} timeouts={} retransmits={} servfail={} truncated={} marked down={} recovered={}",
                x.queries, x.queries_tcp, x.forwarded, x.upstream_sent, x.upstream_good, x.upstream_errors,
                x.upstream_timeouts, x.retransmits, x.servfail_sent, x.truncated, x.servers_marked_down, x.servers_recovered
            );
            let _ = writeln!(
                s,
                "  dns dropped: malformed={} mismatch={} wrong source={} unknown id={} duplicate={}",
                x.upstream_malformed, x.dropped_mismatch, x.dropped_wrong_source, x.dropped_unknown_id, x.dropped_duplicate
            );
        }
        let drops: Vec<String> = d
            .drops
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        if !drops.is_empty() {
            let _ = writeln!(s, "  drops: {}", drops.join(" "));
        }
        let _ = writeln!(
            s,
            "workload done at {}; daemon idle at {}; left: tcp={} udp={} sockets={}",
            secs(d.workload_done_us),
            secs(d.idle_us),
            d.tcp_flows,
            d.udp_flows,
            d.open_sockets
        );
    }
    let _ = writeln!(
        s,
        "result: {}",
        if r.failures.is_empty() {
            "ok".to_string()
        } else {
            format!("{} failures", r.failures.len())
        }
    );
    s
}
