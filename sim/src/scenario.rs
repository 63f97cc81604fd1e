//! Scenario files: data only (scenarios/*.toml). Adding a case needs no Rust.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One scenario, as written in `scenarios/NAME.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(skip)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Hard limit of simulated time (the run fails if the world has not finished by then).
    #[serde(default = "default_duration")]
    pub duration_s: f64,
    /// turmoil's tick (granularity of daemon↔upstream delivery). The guest link is exact.
    #[serde(default = "default_tick")]
    pub tick_ms: u64,
    /// After the workload ends, how long the daemon may take to forget every flow.
    #[serde(default = "default_drain")]
    pub drain_s: f64,
    /// How frames reach the daemon: `stream` (default) runs the production QEMU-stream
    /// framing (`usernet::stream::FramedStream`) over an in-memory pipe; `direct` hands
    /// frames to the driver without framing.
    #[serde(default)]
    pub transport: Transport,
    /// With the stream transport and a bandwidth limit: a full link towards the guests stops
    /// the pipe being read (as a guest's socket buffer fills), so the daemon's transport
    /// holds frames back instead of the link dropping them.
    #[serde(default)]
    pub backpressure: bool,
    #[serde(default)]
    pub config: ConfigOverrides,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    #[serde(default)]
    pub guests: Vec<GuestSpec>,
    #[serde(default)]
    pub faults: FaultBounds,
    #[serde(default)]
    pub events: Vec<Event>,
    /// The gateway's DNS service (off without this section).
    pub dns: Option<DnsSpec>,
    /// Port forwards exposed when the daemon starts (more with `expose` events).
    #[serde(default)]
    pub forwards: Vec<ForwardSpec>,
    /// Turmoil hosts that connect to the daemon host's forwarded ports.
    #[serde(default)]
    pub clients: Vec<ClientSpec>,
    /// Seeds kept as regression cases: `cargo test -p sim` runs each of them.
    #[serde(default)]
    pub regression_seeds: Vec<u64>,
    /// A known failure kept as documentation (e.g. a third-party bug the sim works around
    /// elsewhere): the kept seeds must fail with a failure containing this text, and the
    /// fixed seed set is not run.
    pub expect_failure: Option<String>,
    /// The daemon's transparent proxy: port-80 traffic to an upstream proxy host.
    pub proxy: Option<ProxySpec>,
    /// Seed of the insta snapshot (default 1).
    #[serde(default = "default_snapshot_seed")]
    pub snapshot_seed: u64,
}

fn default_duration() -> f64 {
    300.0
}
fn default_tick() -> u64 {
    5
}
fn default_drain() -> f64 {
    30.0
}
fn default_heal() -> f64 {
    30.0
}
fn default_snapshot_seed() -> u64 {
    1
}

/// Overrides of the daemon's [`usernet_core::Config`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigOverrides {
    pub mtu: Option<u16>,
    /// Per-flow TCP buffers (both directions).
    pub tcp_buffer: Option<usize>,
    pub udp_idle_timeout_s: Option<f64>,
    pub icmp_idle_timeout_s: Option<f64>,
    pub connect_timeout_s: Option<f64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    /// A literal IPv4 address: the turmoil host's address and the one guests dial.
    pub ip: String,
    /// Also a DNS server on port 53 (UDP, and TCP with 2-byte framing) behaving so.
    pub dns: Option<DnsBehaviour>,
    /// `slow`: how long it waits before answering.
    #[serde(default)]
    pub dns_delay_ms: u64,
    /// Also an HTTP proxy on port 3128 behaving so.
    pub proxy: Option<ProxyBehaviour>,
}

/// How an upstream proxy host treats the daemon's connections on port 3128 (see
/// `upstream::proxy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyBehaviour {
    /// Answers absolute-form requests as the origin would (`GET http://IP/SIZE/KEY`);
    /// anything else gets 400.
    Works,
    /// Nothing listens: connections are refused.
    Refuse,
    /// Accepts, reads the request head, closes without a word.
    Reset,
}

/// The daemon's transparent proxy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySpec {
    /// The upstream (by name) that is the HTTP proxy (port 3128).
    pub http: String,
    /// A no_proxy list.
    #[serde(default)]
    pub no_proxy: String,
}

/// How a DNS upstream answers (see `upstream::dns_answer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsBehaviour {
    /// Answers at once: the A records the query name asks for, the first being its own address.
    Answer,
    /// Answers after `dns_delay_ms`.
    Slow,
    /// Never answers (TCP: accepts, reads, never answers).
    Drop,
    /// SERVFAIL.
    Servfail,
    /// Over UDP: TC set, no records (TCP: the full answer).
    Truncate,
    /// Bytes that are no DNS message.
    Garbage,
    /// A correct answer with another message ID.
    WrongId,
}

/// The gateway's DNS configuration: upstream groups by upstream name (port 53).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSpec {
    /// Tried in order; the servers of a group are asked in parallel.
    pub groups: Vec<Vec<String>>,
    pub retransmit_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    /// Cache entries (0: off).
    pub cache_entries: Option<usize>,
}

/// A port forward: `0.0.0.0:PORT` on the daemon host to the guest's leased address.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    pub port: u16,
    pub guest_port: u16,
    #[serde(default)]
    pub protocol: FwdProtocol,
}

/// A forward's protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FwdProtocol {
    #[default]
    Tcp,
    Udp,
}

impl FwdProtocol {
    pub fn usernet(self) -> usernet::forward::Protocol {
        match self {
            FwdProtocol::Tcp => usernet::forward::Protocol::Tcp,
            FwdProtocol::Udp => usernet::forward::Protocol::Udp,
        }
    }
}

/// A turmoil host running client jobs against the daemon host's forwarded ports
/// (kinds `echo`, expect `complete` | `reset` | `clean`, and `udp_echo`; `port` is the
/// host port).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSpec {
    pub name: String,
    pub ip: String,
    #[serde(default)]
    pub jobs: Vec<Job>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    /// Guest MAC; default 52:54:00:12:34:(index+1).
    pub mac: Option<String>,
    /// Guest TCP socket buffers.
    #[serde(default = "default_guest_buffer")]
    pub tcp_buffer: usize,
    #[serde(default)]
    pub jobs: Vec<Job>,
    /// Keep smoltcp's own ACK sequence numbers (rewound after a timeout) instead of
    /// Linux's; see the guest module docs.
    #[serde(default)]
    pub smoltcp_ack_seq: bool,
    /// Local port range for connections (default 49152..=65535); a small range makes
    /// 4-tuples come back soon after their previous connection closed.
    pub ports: Option<[u16; 2]>,
}

fn default_guest_buffer() -> usize {
    65536
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    #[default]
    Stream,
    Direct,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Guest asks the bulk source for `bytes` bytes and checks every byte in order.
    Download,
    /// Guest sends `bytes` bytes to the bulk sink, half-closes, and checks the sink's count and hash.
    Upload,
    /// Guest sends `bytes` to the echo server while reading the echo, then half-closes.
    Echo,
    /// Guest sends `bytes`, half-closes, and only then receives them back (server answers after EOF).
    HalfClose,
    /// HTTP/1.0 GET of a `bytes`-byte body.
    Http,
    /// Connect to a port nobody listens on.
    Refused,
    /// `count` datagrams of `bytes` bytes to the UDP echo, each retried until answered.
    /// As a client job: to a UDP port forward (the guest's `udp_serve`), every `retry_ms`
    /// until answered; `pause_s`: silent half-way (the forward's flow expires).
    UdpEcho,
    /// `count` ICMP echo requests of `bytes` payload bytes to the upstream, each retried
    /// until answered (the sim host network answers pings to upstream addresses).
    Ping,
    /// `count` DNS queries (A, `records` records each) over UDP to the gateway, `parallel`
    /// at once, each attempt with a fresh ID every `retry_ms`; a TC answer is retried over
    /// TCP to the gateway.
    DnsUdp,
    /// `count` DNS queries pipelined on one TCP connection to the gateway (several
    /// queries on one connection); a connection that fails is retried with the queries
    /// still unanswered.
    DnsTcp,
    /// A server in the guest on `port` (the forward's guest port): it checks that each
    /// connection's source address is the one its client reports, then echoes.
    Serve,
    /// A UDP echo service in the guest on `port` (a UDP forward's guest port): it checks
    /// that each datagram's source address is the one its client reports, then echoes it.
    UdpServe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    /// Every connection completes byte-exact.
    Complete,
    /// Every connection is refused (RST, never established).
    Reset,
    /// Every connection either completes or fails cleanly (RST or early FIN), never hangs.
    Clean,
    /// DNS: every query is answered SERVFAIL.
    Servfail,
    /// HTTP: every request gets a 5xx response of the proxy, then the connection closes.
    HttpError,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub kind: JobKind,
    #[serde(default)]
    pub upstream: String,
    /// Destination port (default by kind).
    pub port: Option<u16>,
    #[serde(default = "default_bytes")]
    pub bytes: u64,
    /// Connections (datagrams for udp_echo).
    #[serde(default = "one")]
    pub count: u32,
    /// Connections open at once.
    #[serde(default = "one")]
    pub parallel: u32,
    #[serde(default)]
    pub start_s: f64,
    /// Every connection must be finished by this simulated time.
    #[serde(default = "default_deadline")]
    pub deadline_s: f64,
    #[serde(default = "default_expect")]
    pub expect: Expect,
    /// Echo only: send half, wait for its echo, stay silent this long, then send the rest
    /// (an idle connection must survive).
    #[serde(default)]
    pub pause_s: f64,
    /// A slow application in the guest: it reads at most this many kilobits per second
    /// (its receive window closes; the daemon must stop reading the upstream and resume).
    pub read_kbps: Option<u64>,
    /// DNS: A records in each answer (more than fit 512 bytes makes the gateway truncate).
    #[serde(default = "one")]
    pub records: u32,
    /// DNS: every answer must come from this upstream.
    pub from: Option<String>,
    /// DNS: every answer must arrive within this long of the attempt it answers.
    pub within_s: Option<f64>,
    /// DNS: a new attempt (fresh ID) after this long without an answer.
    #[serde(default = "default_retry_ms")]
    pub retry_ms: u64,
}

fn default_retry_ms() -> u64 {
    1000
}

fn default_bytes() -> u64 {
    1000
}
fn one() -> u32 {
    1
}
fn default_deadline() -> f64 {
    120.0
}
fn default_expect() -> Expect {
    Expect::Complete
}

impl Job {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.kind {
            JobKind::Download => crate::upstream::PORT_SOURCE,
            JobKind::Upload => crate::upstream::PORT_SINK,
            JobKind::Echo => crate::upstream::PORT_ECHO,
            JobKind::HalfClose => crate::upstream::PORT_AFTER_EOF,
            JobKind::Http => crate::upstream::PORT_HTTP,
            JobKind::Refused => 1,
            JobKind::UdpEcho => crate::upstream::PORT_ECHO,
            JobKind::Ping => 0,
            JobKind::DnsUdp | JobKind::DnsTcp => 53,
            JobKind::Serve => 80,
            JobKind::UdpServe => 7,
        })
    }
}

/// A closed range `[lo, hi]` a seed draws from.
pub type Range = [f64; 2];

/// Bounds of the guest-link faults. Each seed draws its own mix (swarm testing): every
/// fault given here is switched off with probability 1/3 unless listed in `required`, and
/// otherwise drawn uniformly within its range.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultBounds {
    /// One-way latency.
    pub latency_ms: Option<Range>,
    /// Extra random delay per frame (order kept unless reordered).
    pub jitter_ms: Option<Range>,
    /// Independent loss probability per frame.
    pub loss: Option<Range>,
    /// Gilbert-Elliott bursty loss: the loss probability in the bad state.
    pub burst_loss: Option<Range>,
    /// Duplication probability per frame.
    pub dup: Option<Range>,
    /// Probability that a frame is held back (delivered after later ones).
    pub reorder: Option<Range>,
    /// Bandwidth limit (log-uniform draw), with a drop-tail queue.
    pub bandwidth_mbps: Option<Range>,
    /// Size of that queue in KiB (default 256).
    pub queue_kb: Option<Range>,
    /// Link down windows: how many, how long, and before when they start.
    pub down: Option<DownBounds>,
    /// Faults end at this simulated time (latency and bandwidth stay); liveness deadlines
    /// should leave room after it for backed-off retransmission timers (up to 60 s).
    #[serde(default = "default_heal")]
    pub heal_s: f64,
    /// Faults never switched off by the swarm draw.
    #[serde(default)]
    pub required: Vec<String>,
    /// Turn off swarm toggling (every fault given is on).
    #[serde(default)]
    pub no_swarm: bool,
}

impl Default for FaultBounds {
    fn default() -> Self {
        toml::from_str("").expect("all fields have defaults")
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownBounds {
    pub count: [u32; 2],
    pub ms: Range,
    pub before_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Both ends told of a new MTU (daemon `set_mtu`, guest interface rebuilt); the link
    /// drops larger frames both ways.
    MtuTold,
    /// Path MTU black hole: the daemon is told, the guest is not; the link silently drops
    /// larger frames towards the guest.
    MtuBlackhole,
    /// turmoil partition daemon↔upstream (messages dropped; turmoil TCP never retransmits,
    /// so streams crossing it stall: use `hold` for a transient outage mid-transfer).
    Partition,
    Repair,
    /// turmoil hold: messages daemon↔upstream are kept back until `release`.
    Hold,
    Release,
    /// Crash the upstream host (its sockets go away).
    Crash,
    /// Restart the upstream host's software.
    Bounce,
    /// `Driver::expose` a TCP forward `0.0.0.0:port` -> guest `:guest_port`.
    Expose,
    /// `Driver::unexpose` the forward on `port`.
    Unexpose,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub kind: EventKind,
    /// Fire at this simulated time...
    pub at_s: Option<f64>,
    /// ...or once the guest link has carried this many TCP payload bytes (both directions).
    pub after_bytes: Option<u64>,
    /// ...or this long after the previous event (in file order) fired.
    pub after_prev_s: Option<f64>,
    #[serde(default)]
    pub upstream: String,
    pub mtu: Option<u16>,
    /// Expose/unexpose: the host port.
    pub port: Option<u16>,
    /// Expose: the guest port.
    pub guest_port: Option<u16>,
    /// Expose/unexpose: the forward's protocol.
    #[serde(default)]
    pub protocol: FwdProtocol,
}

/// The workspace's scenarios/ directory.
pub fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

impl Scenario {
    pub fn parse(name: &str, text: &str) -> Result<Self, String> {
        let mut s: Scenario = toml::from_str(text).map_err(|e| format!("{name}: {e}"))?;
        s.name = name.to_string();
        s.check()?;
        Ok(s)
    }

    pub fn load(name: &str) -> Result<Self, String> {
        let path = scenarios_dir().join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(name, &text)
    }

    /// Every scenario name (file stems), sorted.
    pub fn all_names() -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(scenarios_dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let p = e.path();
                        (p.extension()? == "toml")
                            .then(|| p.file_stem()?.to_str().map(String::from))?
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn check(&self) -> Result<(), String> {
        let n = &self.name;
        if self.guests.is_empty() {
            return Err(format!("{n}: no guests"));
        }
        for g in &self.guests {
            for j in &g.jobs {
                let needs_upstream = !matches!(
                    j.kind,
                    JobKind::Refused
                        | JobKind::DnsUdp
                        | JobKind::DnsTcp
                        | JobKind::Serve
                        | JobKind::UdpServe
                ) || !j.upstream.is_empty();
                if let Some(f) = &j.from {
                    self.upstream_ip(f)
                        .ok_or_else(|| format!("{n}: job from unknown upstream {f:?}"))?;
                }
                if j.kind == JobKind::DnsUdp && j.count > 4000 {
                    return Err(format!("{n}: dns_udp count at most 4000"));
                }
                if needs_upstream {
                    self.upstream_ip(&j.upstream).ok_or_else(|| {
                        format!("{n}: job names unknown upstream {:?}", j.upstream)
                    })?;
                }
                if j.parallel == 0 || j.count == 0 {
                    return Err(format!("{n}: count and parallel must be > 0"));
                }
            }
        }
        for e in &self.events {
            let triggers = [
                e.at_s.is_some(),
                e.after_bytes.is_some(),
                e.after_prev_s.is_some(),
            ];
            if triggers.iter().filter(|t| **t).count() != 1 {
                return Err(format!(
                    "{n}: an event needs exactly one of at_s, after_bytes, after_prev_s"
                ));
            }
            match e.kind {
                EventKind::MtuTold | EventKind::MtuBlackhole => {
                    if e.mtu.is_none() {
                        return Err(format!("{n}: mtu event without mtu"));
                    }
                }
                EventKind::Expose | EventKind::Unexpose => {
                    if e.port.is_none() || (e.kind == EventKind::Expose && e.guest_port.is_none()) {
                        return Err(format!("{n}: expose needs port and guest_port"));
                    }
                }
                _ => {
                    self.upstream_ip(&e.upstream).ok_or_else(|| {
                        format!("{n}: event names unknown upstream {:?}", e.upstream)
                    })?;
                }
            }
        }
        if let Some(p) = &self.proxy {
            self.upstream_ip(&p.http)
                .ok_or_else(|| format!("{n}: proxy names unknown upstream {:?}", p.http))?;
            usernet_core::proxy::parse_no_proxy(&p.no_proxy)
                .map_err(|e| format!("{n}: proxy no_proxy: {e}"))?;
        }
        if let Some(d) = &self.dns {
            for name in d.groups.iter().flatten() {
                self.upstream_ip(name)
                    .ok_or_else(|| format!("{n}: dns group names unknown upstream {name:?}"))?;
            }
        }
        for c in &self.clients {
            c.ip.parse::<std::net::Ipv4Addr>()
                .map_err(|_| format!("{n}: client {} ip {:?}", c.name, c.ip))?;
            for j in &c.jobs {
                let kind_ok = match j.kind {
                    JobKind::Echo => true,
                    // One datagram at a time.
                    JobKind::UdpEcho => j.parallel == 1 && j.expect == Expect::Complete,
                    _ => false,
                };
                if !kind_ok || j.parallel == 0 || j.count == 0 {
                    return Err(format!(
                        "{n}: client jobs are echo (count/parallel > 0) or udp_echo (parallel 1, expect complete)"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn upstream_ip(&self, name: &str) -> Option<std::net::Ipv4Addr> {
        self.upstreams
            .iter()
            .find(|u| u.name == name)
            .and_then(|u| u.ip.parse().ok())
    }
}
