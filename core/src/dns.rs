//! The DNS forwarder on the gateway, as a sans-IO state machine.
//!
//! [`Dns`] takes guest queries ([`Dns::handle_query`]), upstream answers
//! ([`Dns::handle_upstream`]), host-resolver results ([`Dns::handle_resolved`]) and the time
//! ([`Dns::handle_timeout`]); what it wants done comes out of [`Dns::poll_output`] as
//! [`DnsOutput`]s, and [`Dns::poll_timeout`] says when to call [`Dns::handle_timeout`] next.
//! It reads no clock and no OS randomness: upstream query IDs come from the seeded
//! generator handed to [`Dns::new`], so the same seed and inputs give the same outputs.
//!
//! What it does with a guest query, in order:
//! 1. header unreadable (< 12 bytes): dropped; QR=1 (not a query): dropped; opcode other than
//!    QUERY: NOTIMP; a question section that does not parse, or not exactly one question:
//!    FORMERR.
//! 2. static names (configured names first, then the hosts file): answered locally; a static
//!    name without records of the asked type gets NOERROR with an empty answer.
//! 3. the cache (if on): answered with the TTLs counted down.
//! 4. a name under a configured zone: forwarded to that zone's servers only.
//! 5. system mode: A and AAAA (class IN) become a [`DnsOutput::Resolve`]; other types are
//!    forwarded when upstream groups are configured, else NOTIMP.
//! 6. forward mode: the upstream groups in turn, the servers of a group in parallel, the first
//!    good answer wins and goes back byte-for-byte but for the ID (and TC truncation for
//!    UDP). No answer within `timeout`: SERVFAIL. Never silence.
//!
//! Every byte from the guest or an upstream is hostile: nothing here panics on any input,
//! and every table is bounded (in-flight queries, sends per query, cache entries and bytes,
//! the output queue).

mod cache;
mod names;
mod raw;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{Name, RData, Record};
use rand_chacha::rand_core::Rng as _;
use smoltcp::time::{Duration, Instant};

use crate::Rng;
use cache::{Cache, CacheKey};
pub use names::{StaticNames, MAX_ADDRS_PER_NAME, MAX_STATIC_NAMES};
use raw::{Header, Question};

/// Upstream servers asked in parallel.
pub type UpstreamGroup = Vec<SocketAddr>;

/// How A and AAAA questions are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DnsMode {
    /// Everything goes to the upstream servers.
    #[default]
    Forward,
    /// A and AAAA go to the host's resolver ([`DnsOutput::Resolve`]); other types are
    /// forwarded when upstream groups are configured, else answered NOTIMP.
    System,
}

/// Configuration of a [`Dns`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    pub mode: DnsMode,
    /// Tried in order; the servers of a group are asked in parallel.
    pub upstream_groups: Vec<UpstreamGroup>,
    /// `(zone suffix, servers)`: a query for the zone or a name under it goes only to those
    /// servers (asked in parallel). The longest matching zone wins; `""` or `"."` is the root.
    pub zones: Vec<(String, Vec<SocketAddr>)>,
    /// Ask again (the next group, or the same one again) after this long without a good answer.
    pub retransmit: Duration,
    /// SERVFAIL to the guest after this long without a good answer.
    pub timeout: Duration,
    /// Queries waiting for an upstream or the host resolver at most; beyond, SERVFAIL.
    pub max_inflight: usize,
    /// Cached answers at most; 0 turns the cache off.
    pub cache_entries: usize,
    /// Bytes of cached answers (wire size) at most.
    pub cache_max_bytes: usize,
    /// TTLs above this are cut down to it in the cache (seconds).
    pub cache_max_ttl: u32,
    /// Negative answers (NXDOMAIN, NODATA) are cached at most this long (seconds).
    pub cache_max_negative_ttl: u32,
    /// Names answered locally (before the hosts file).
    pub static_names: StaticNames,
    /// TTL of static answers (seconds).
    pub static_ttl: u32,
    /// TTL of answers from the host resolver (seconds).
    pub system_ttl: u32,
    /// The largest UDP answer sent to a guest, whatever its EDNS size says (at least 512).
    pub max_udp_payload: u16,
    /// An upstream is marked down after this many failures in a row (timeouts, error rcodes).
    pub down_after: u32,
    /// A server that is down is still sent a query (a probe) this often; it is back up as
    /// soon as it answers.
    pub probe_interval: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            mode: DnsMode::Forward,
            upstream_groups: Vec::new(),
            zones: Vec::new(),
            retransmit: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            max_inflight: 1024,
            cache_entries: 4096,
            cache_max_bytes: 8 << 20,
            cache_max_ttl: 86400,
            cache_max_negative_ttl: 3600,
            static_names: StaticNames::new(),
            static_ttl: 10,
            system_ttl: 10,
            max_udp_payload: 4096,
            down_after: 3,
            probe_interval: Duration::from_secs(5),
        }
    }
}

impl DnsConfig {
    /// The defaults, with the built-in static names for the gateway and the host alias
    /// (see [`StaticNames::defaults`]).
    pub fn new(gateway: IpAddr, host_alias: Option<IpAddr>) -> Self {
        DnsConfig {
            static_names: StaticNames::defaults(gateway, host_alias),
            ..DnsConfig::default()
        }
    }
}

/// Who asked, and over what: the caller's way back to the guest. A UDP query is answered
/// in one datagram (TC-truncated to the guest's EDNS size, 512 without EDNS) and forwarded
/// over UDP; a TCP query is answered as one message (the caller adds the 2-byte length) and
/// forwarded over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientToken {
    /// The guest's source address of the UDP query.
    Udp(SocketAddr),
    /// The caller's identifier of the guest's TCP connection.
    Tcp(u64),
}

/// How a message travels between usernet and an upstream server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UpstreamTransport {
    Udp,
    /// One DNS message on a TCP connection; the 2-byte length framing is the caller's.
    Tcp,
}

/// Names a host-resolver request ([`DnsOutput::Resolve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResolveId(pub u64);

/// Why the host resolver gave no address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolveError {
    /// The name does not exist (EAI_NONAME): NXDOMAIN.
    NoName,
    /// The name exists without addresses of that family (EAI_NODATA): NOERROR, empty.
    NoData,
    /// Anything else (EAI_AGAIN, EAI_FAIL, ...): SERVFAIL.
    Failed,
}

/// Work for the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsOutput {
    /// Send `bytes` to the guest: one UDP datagram from the gateway's port 53 to the
    /// client's address, or one length-prefixed message on the client's TCP connection.
    ToGuest { client: ClientToken, bytes: Vec<u8> },
    /// Send `bytes` to `server` over `via` and feed what comes back (from `server`, over
    /// `via`) to [`Dns::handle_upstream`]. Over TCP: open a connection (or reuse one to the
    /// same server), write the length-prefixed message, de-frame the answers.
    ToUpstream {
        server: SocketAddr,
        via: UpstreamTransport,
        bytes: Vec<u8>,
    },
    /// Resolve `name` with the host's resolver (getaddrinfo) and report with
    /// [`Dns::handle_resolved`]. Only the asked family is used from the result.
    Resolve {
        req: ResolveId,
        name: String,
        want_v4: bool,
        want_v6: bool,
    },
}

/// Counters of a [`Dns`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Messages from the guest (UDP and TCP).
    pub queries: u64,
    pub queries_tcp: u64,
    pub answered_static: u64,
    pub answered_system: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_inserts: u64,
    pub cache_evictions: u64,
    /// Guest queries sent upstream.
    pub forwarded: u64,
    /// Messages sent to upstream servers (first sends, retransmits and probes).
    pub upstream_sent: u64,
    /// Rounds started after the retransmit interval or after every server of a round failed.
    pub retransmits: u64,
    /// Messages from upstream servers, whatever became of them.
    pub upstream_received: u64,
    /// Upstream answers passed to the guest.
    pub upstream_good: u64,
    /// Upstream answers with SERVFAIL, REFUSED, NOTIMP or FORMERR.
    pub upstream_errors: u64,
    /// Forwarded queries that got no good answer within the timeout.
    pub upstream_timeouts: u64,
    pub servers_marked_down: u64,
    pub servers_recovered: u64,
    pub resolve_requests: u64,
    /// Host-resolver results for a request that was no longer waiting.
    pub stale_resolves: u64,
    /// SERVFAIL answers made here (timeouts, in-flight cap, no upstream, resolver failure).
    pub servfail_sent: u64,
    pub formerr_sent: u64,
    pub notimp_sent: u64,
    /// UDP answers cut to header and question with TC set.
    pub truncated: u64,
    /// Guest messages too short for a header, or FORMERR'd.
    pub malformed: u64,
    /// Upstream messages too short for a header.
    pub upstream_malformed: u64,
    /// Guest messages with QR=1.
    pub dropped_not_query: u64,
    /// Upstream answers with a known ID whose question, QR bit or opcode did not match.
    pub dropped_mismatch: u64,
    /// Upstream answers with a known ID from a server (or transport) that was not asked.
    pub dropped_wrong_source: u64,
    /// Upstream answers with an ID nothing is waiting for (unknown, or late).
    pub dropped_unknown_id: u64,
    /// Guest queries repeating one (same client and ID) that is still in flight.
    pub dropped_duplicate: u64,
    /// Guest queries refused (SERVFAIL) because `max_inflight` were in flight.
    pub inflight_limited: u64,
    /// Guest queries with nowhere to go (forward mode without upstreams): SERVFAIL.
    pub no_upstream: u64,
    /// Outputs dropped because the caller let the queue grow past its bound.
    pub outputs_dropped: u64,
    /// Upstream sends skipped for want of a free message ID.
    pub ids_exhausted: u64,
    /// In-flight queries forgotten by [`Dns::cancel_client`].
    pub cancelled: u64,
}

impl DnsStats {
    /// Every counter with its name, in declaration order (for the control API).
    pub fn fields(&self) -> [(&'static str, u64); 35] {
        [
            ("queries", self.queries),
            ("queries_tcp", self.queries_tcp),
            ("answered_static", self.answered_static),
            ("answered_system", self.answered_system),
            ("cache_hits", self.cache_hits),
            ("cache_misses", self.cache_misses),
            ("cache_inserts", self.cache_inserts),
            ("cache_evictions", self.cache_evictions),
            ("forwarded", self.forwarded),
            ("upstream_sent", self.upstream_sent),
            ("retransmits", self.retransmits),
            ("upstream_received", self.upstream_received),
            ("upstream_good", self.upstream_good),
            ("upstream_errors", self.upstream_errors),
            ("upstream_timeouts", self.upstream_timeouts),
            ("servers_marked_down", self.servers_marked_down),
            ("servers_recovered", self.servers_recovered),
            ("resolve_requests", self.resolve_requests),
            ("stale_resolves", self.stale_resolves),
            ("servfail_sent", self.servfail_sent),
            ("formerr_sent", self.formerr_sent),
            ("notimp_sent", self.notimp_sent),
            ("truncated", self.truncated),
            ("malformed", self.malformed),
            ("upstream_malformed", self.upstream_malformed),
            ("dropped_not_query", self.dropped_not_query),
            ("dropped_mismatch", self.dropped_mismatch),
            ("dropped_wrong_source", self.dropped_wrong_source),
            ("dropped_unknown_id", self.dropped_unknown_id),
            ("dropped_duplicate", self.dropped_duplicate),
            ("inflight_limited", self.inflight_limited),
            ("no_upstream", self.no_upstream),
            ("outputs_dropped", self.outputs_dropped),
            ("ids_exhausted", self.ids_exhausted),
            ("cancelled", self.cancelled),
        ]
    }
}

/// Sends per guest query at most (first round, retransmits and probes together).
const MAX_SENDS_PER_QUERY: usize = 32;
/// Outputs queued at most; the caller drains them after every call.
const MAX_OUTPUTS: usize = 8192;
/// Addresses in one host-resolver answer at most.
const MAX_RESOLVED: usize = 64;
/// Guest queries longer than this get FORMERR (a question, OPT and a TSIG fit easily); it
/// bounds what in-flight queries hold.
pub const MAX_QUERY_LEN: usize = 4096;

#[derive(Clone, Copy, Debug, Default)]
struct ServerState {
    failures: u32,
    down: bool,
    next_probe: Option<Instant>,
}

/// One upstream message in flight, by message ID.
#[derive(Clone, Copy, Debug)]
struct Sent {
    server: SocketAddr,
    via: UpstreamTransport,
    key: u64,
}

#[derive(Clone, Copy, Debug)]
struct Ask {
    id: u16,
    server: SocketAddr,
    answered: bool,
}

#[derive(Debug)]
struct Forward {
    groups: Vec<UpstreamGroup>,
    via: UpstreamTransport,
    group: usize,
    rounds: usize,
    round: Vec<Ask>,
    /// Every ID sent for this query (late answers from earlier rounds still count).
    ids: Vec<u16>,
    next_retx: Instant,
    /// The last error answer (SERVFAIL, REFUSED, ...) with a matching question.
    last_bad: Option<Vec<u8>>,
}

#[derive(Debug)]
enum Kind {
    Forward(Forward),
    System,
}

#[derive(Debug)]
struct Pending {
    client: ClientToken,
    guest_id: u16,
    /// The guest's query as it came.
    query: Vec<u8>,
    udp_limit: usize,
    question: Question,
    cache_key: Option<CacheKey>,
    deadline: Instant,
    wake: Option<Instant>,
    kind: Kind,
}

/// The DNS forwarder. See the module documentation.
pub struct Dns {
    cfg: DnsConfig,
    rng: Rng,
    hosts: StaticNames,
    reverse: BTreeMap<IpAddr, String>,
    servers: BTreeMap<SocketAddr, ServerState>,
    pending: BTreeMap<u64, Pending>,
    by_client: BTreeMap<(ClientToken, u16), u64>,
    sent: BTreeMap<u16, Sent>,
    timers: BTreeSet<(Instant, u64)>,
    cache: Cache,
    outputs: VecDeque<DnsOutput>,
    next_key: u64,
    stats: DnsStats,
}

impl Dns {
    /// A forwarder for `cfg`. `rng` draws the upstream message IDs: seed it from the
    /// stack's generator for reproducible runs.
    pub fn new(mut cfg: DnsConfig, rng: Rng) -> Self {
        Self::sanitize(&mut cfg);
        let cache = Cache::new(cfg.cache_entries, cfg.cache_max_bytes);
        let mut d = Dns {
            cfg,
            rng,
            hosts: StaticNames::new(),
            reverse: BTreeMap::new(),
            servers: BTreeMap::new(),
            pending: BTreeMap::new(),
            by_client: BTreeMap::new(),
            sent: BTreeMap::new(),
            timers: BTreeSet::new(),
            cache,
            outputs: VecDeque::new(),
            next_key: 1,
            stats: DnsStats::default(),
        };
        d.rebuild_reverse();
        d
    }

    fn sanitize(cfg: &mut DnsConfig) {
        let min = Duration::from_millis(10);
        cfg.retransmit = cfg.retransmit.max(min);
        cfg.timeout = cfg.timeout.max(min);
        cfg.probe_interval = cfg.probe_interval.max(min);
        cfg.max_inflight = cfg.max_inflight.max(1);
        cfg.max_udp_payload = cfg.max_udp_payload.max(512);
        cfg.down_after = cfg.down_after.max(1);
    }

    pub fn config(&self) -> &DnsConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &DnsStats {
        &self.stats
    }

    /// Queries waiting for an upstream or the host resolver.
    pub fn inflight(&self) -> usize {
        self.pending.len()
    }

    /// Entries in the cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Wire bytes of the cached answers.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Whether `server` is currently marked down.
    pub fn is_down(&self, server: SocketAddr) -> bool {
        self.servers.get(&server).is_some_and(|s| s.down)
    }

    /// Whether an answer with message `id` from `server` over `via` is still awaited (its
    /// query is in flight and has not given up on that message).
    pub fn awaits(&self, id: u16, server: SocketAddr, via: UpstreamTransport) -> bool {
        self.sent
            .get(&id)
            .is_some_and(|s| s.server == server && s.via == via)
    }

    /// Replace the upstream groups and zones (for example after resolv.conf changed).
    /// Queries in flight finish with the servers they started with.
    pub fn set_upstreams(
        &mut self,
        groups: Vec<UpstreamGroup>,
        zones: Vec<(String, Vec<SocketAddr>)>,
    ) {
        self.cfg.upstream_groups = groups;
        self.cfg.zones = zones;
        let cfg = &self.cfg;
        self.servers.retain(|s, _| {
            cfg.upstream_groups.iter().flatten().any(|x| x == s)
                || cfg.zones.iter().flat_map(|z| &z.1).any(|x| x == s)
        });
    }

    /// Replace the configured static names (answered before the hosts file).
    pub fn set_static_names(&mut self, names: StaticNames) {
        self.cfg.static_names = names;
        self.rebuild_reverse();
    }

    /// Replace the hosts-file entries with those of `text` (hosts-file syntax, as read by
    /// the caller). Returns how many names it holds.
    pub fn set_hosts_text(&mut self, text: &str) -> usize {
        self.set_hosts(StaticNames::parse_hosts(text))
    }

    /// Replace the hosts-file entries.
    pub fn set_hosts(&mut self, hosts: StaticNames) -> usize {
        self.hosts = hosts;
        self.rebuild_reverse();
        self.hosts.len()
    }

    /// Forget every cached answer.
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    fn rebuild_reverse(&mut self) {
        self.reverse.clear();
        for (name, addrs) in self.cfg.static_names.iter().chain(self.hosts.iter()) {
            for a in addrs {
                self.reverse.entry(*a).or_insert_with(|| name.to_string());
            }
        }
    }

    /// The next output, if any. Drain after every `handle_*` call.
    pub fn poll_output(&mut self) -> Option<DnsOutput> {
        self.outputs.pop_front()
    }

    /// When [`Dns::handle_timeout`] must be called next (retransmit or give-up time of the
    /// earliest query in flight). `None`: nothing is waiting.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    fn push(&mut self, out: DnsOutput) {
        if self.outputs.len() >= MAX_OUTPUTS {
            self.stats.outputs_dropped += 1;
        } else {
            self.outputs.push_back(out);
        }
    }

    /// Send `bytes` to the guest, cut to the UDP limit when needed.
    /// Answer `q` ourselves with `rcode` and no records.
    fn answer_empty(
        &mut self,
        client: ClientToken,
        q: &Message,
        rcode: ResponseCode,
        udp_limit: usize,
    ) {
        let reply = local_reply(q, rcode, Vec::new(), false, udp_limit);
        self.deliver(client, udp_limit, reply);
    }

    fn deliver(&mut self, client: ClientToken, udp_limit: usize, mut bytes: Vec<u8>) {
        let limit = match client {
            ClientToken::Udp(_) => udp_limit,
            ClientToken::Tcp(_) => usize::from(u16::MAX),
        };
        if bytes.len() > limit {
            let cut = raw::truncate(&bytes, true)
                .filter(|b| b.len() <= limit)
                .or_else(|| raw::truncate(&bytes, false))
                .filter(|b| b.len() <= limit);
            bytes = match cut {
                Some(b) => {
                    self.stats.truncated += 1;
                    b
                }
                None => {
                    self.stats.servfail_sent += 1;
                    raw::error_reply(&bytes, raw::RCODE_SERVFAIL)
                }
            };
        }
        self.push(DnsOutput::ToGuest { client, bytes });
    }

    /// A message from the guest, over UDP or TCP (TCP: one de-framed message).
    pub fn handle_query(&mut self, now: Instant, client: ClientToken, msg: &[u8]) {
        self.stats.queries += 1;
        if matches!(client, ClientToken::Tcp(_)) {
            self.stats.queries_tcp += 1;
        }
        self.cache.expire(now);
        let Some(h) = Header::parse(msg) else {
            self.stats.malformed += 1;
            return;
        };
        if h.is_response() {
            self.stats.dropped_not_query += 1;
            return;
        }
        if h.opcode() != 0 {
            self.stats.notimp_sent += 1;
            self.deliver(client, 512, raw::error_reply(msg, raw::RCODE_NOTIMP));
            return;
        }
        let parsed = if h.qdcount == 1 && msg.len() <= MAX_QUERY_LEN {
            Message::from_vec(msg)
                .ok()
                .filter(|m| m.queries.len() == 1)
                .zip(Question::parse(msg).map(|(q, _)| q))
        } else {
            None
        };
        let Some((parsed, question)) = parsed else {
            self.stats.malformed += 1;
            self.stats.formerr_sent += 1;
            self.deliver(client, 512, raw::error_reply(msg, raw::RCODE_FORMERR));
            return;
        };
        let udp_limit = usize::from(
            parsed
                .edns
                .as_ref()
                .map_or(512, |e| e.max_payload())
                .clamp(512, self.cfg.max_udp_payload),
        );
        if self.by_client.contains_key(&(client, h.id)) {
            self.stats.dropped_duplicate += 1;
            return;
        }

        if let Some(reply) = self.answer_static(&parsed, &question) {
            self.stats.answered_static += 1;
            self.deliver(client, udp_limit, reply);
            return;
        }

        let cache_key = (self.cfg.cache_entries > 0).then(|| CacheKey {
            question: question.clone(),
            dnssec_ok: parsed.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
            cd: h.flags & raw::CD != 0,
        });
        if let Some(key) = &cache_key {
            if let Some(reply) = self.answer_cached(&parsed, key, now) {
                self.stats.cache_hits += 1;
                self.deliver(client, udp_limit, reply);
                return;
            }
            self.stats.cache_misses += 1;
        }

        let is_address = (question.qtype == raw::TYPE_A || question.qtype == raw::TYPE_AAAA)
            && question.qclass == raw::CLASS_IN;
        let kind = if let Some(servers) = self.zone_servers(&question) {
            Some(vec![servers])
        } else if self.cfg.mode == DnsMode::System && is_address {
            None
        } else if !self.cfg.upstream_groups.is_empty() {
            Some(self.cfg.upstream_groups.clone())
        } else if self.cfg.mode == DnsMode::System {
            self.stats.notimp_sent += 1;
            return self.answer_empty(client, &parsed, ResponseCode::NotImp, udp_limit);
        } else {
            self.stats.no_upstream += 1;
            self.stats.servfail_sent += 1;
            return self.answer_empty(client, &parsed, ResponseCode::ServFail, udp_limit);
        };

        if self.pending.len() >= self.cfg.max_inflight {
            self.stats.inflight_limited += 1;
            self.stats.servfail_sent += 1;
            return self.answer_empty(client, &parsed, ResponseCode::ServFail, udp_limit);
        }

        let key = self.next_key;
        self.next_key += 1;
        let mut p = Pending {
            client,
            guest_id: h.id,
            query: msg.to_vec(),
            udp_limit,
            question,
            cache_key,
            deadline: now + self.cfg.timeout,
            wake: None,
            kind: Kind::System,
        };
        match kind {
            Some(groups) => {
                let via = match client {
                    ClientToken::Udp(_) => UpstreamTransport::Udp,
                    ClientToken::Tcp(_) => UpstreamTransport::Tcp,
                };
                let group = self.choose_group(&groups, 0);
                p.kind = Kind::Forward(Forward {
                    groups,
                    via,
                    group,
                    rounds: 0,
                    round: Vec::new(),
                    ids: Vec::new(),
                    next_retx: now + self.cfg.retransmit,
                    last_bad: None,
                });
                self.stats.forwarded += 1;
                self.send_round(key, &mut p, now);
            }
            None => {
                let Some(name) = p.question.dotted().filter(|n| !n.is_empty()) else {
                    let reply = local_reply(
                        &parsed,
                        ResponseCode::NXDomain,
                        Vec::new(),
                        false,
                        udp_limit,
                    );
                    self.deliver(client, udp_limit, reply);
                    return;
                };
                self.stats.resolve_requests += 1;
                let qtype = p.question.qtype;
                self.push(DnsOutput::Resolve {
                    req: ResolveId(key),
                    name,
                    want_v4: qtype == raw::TYPE_A,
                    want_v6: qtype == raw::TYPE_AAAA,
                });
            }
        }
        self.by_client.insert((client, h.id), key);
        self.arm(key, &mut p);
        self.pending.insert(key, p);
    }

    /// The guest's TCP connection (or whatever `client` names) is gone: forget its queries.
    pub fn cancel_client(&mut self, client: ClientToken) {
        let keys: Vec<u64> = self
            .by_client
            .range((client, 0)..=(client, u16::MAX))
            .map(|(_, k)| *k)
            .collect();
        for k in keys {
            if self.finish(k).is_some() {
                self.stats.cancelled += 1;
            }
        }
    }

    /// An answer from an upstream, over UDP or TCP (TCP: one de-framed message).
    pub fn handle_upstream(
        &mut self,
        now: Instant,
        from: SocketAddr,
        via: UpstreamTransport,
        msg: &[u8],
    ) {
        self.stats.upstream_received += 1;
        let Some(h) = Header::parse(msg) else {
            self.stats.upstream_malformed += 1;
            return;
        };
        let Some(sent) = self.sent.get(&h.id).copied() else {
            self.stats.dropped_unknown_id += 1;
            return;
        };
        if sent.server != from || sent.via != via {
            self.stats.dropped_wrong_source += 1;
            return;
        }
        let Some(p) = self.pending.remove(&sent.key) else {
            // Cannot happen (IDs are removed with their query); forget the ID anyway.
            self.sent.remove(&h.id);
            self.stats.dropped_unknown_id += 1;
            return;
        };
        let key = sent.key;
        let error_rcode = matches!(
            h.rcode(),
            raw::RCODE_SERVFAIL | raw::RCODE_REFUSED | raw::RCODE_NOTIMP | raw::RCODE_FORMERR
        );
        let question = if h.qdcount == 1 {
            Question::parse(msg).map(|(q, _)| q)
        } else {
            None
        };
        let same_question = question.as_ref() == Some(&p.question);
        // An error answer without a question (as some servers send REFUSED) still tells
        // that this server will not help; it is never passed on.
        let questionless_error = error_rcode && h.qdcount == 0;
        if !h.is_response() || h.opcode() != 0 || !(same_question || questionless_error) {
            self.stats.dropped_mismatch += 1;
            self.pending.insert(key, p);
            return;
        }
        self.sent.remove(&h.id);
        if error_rcode {
            self.stats.upstream_errors += 1;
            self.server_failed(from, now);
            self.bad_answer(key, p, h.id, same_question.then_some(msg), now);
            return;
        }
        self.stats.upstream_good += 1;
        self.server_ok(from);
        self.pending.insert(key, p);
        let Some(p) = self.finish(key) else { return };
        if let Some(ck) = p.cache_key.clone() {
            if h.flags & raw::TC == 0 {
                self.cache_answer(ck, msg, now);
            }
        }
        let mut bytes = msg.to_vec();
        raw::set_id(&mut bytes, p.guest_id);
        self.deliver(p.client, p.udp_limit, bytes);
    }

    /// Sending to `server` over `via` failed (TCP connect refused or reset before an answer,
    /// ICMP unreachable on the UDP socket): every query waiting for it counts that as a
    /// failed answer and moves on at once instead of at the retransmit.
    pub fn handle_upstream_error(
        &mut self,
        now: Instant,
        server: SocketAddr,
        via: UpstreamTransport,
    ) {
        let hit: Vec<(u16, u64)> = self
            .sent
            .iter()
            .filter(|(_, s)| s.server == server && s.via == via)
            .map(|(id, s)| (*id, s.key))
            .collect();
        if hit.is_empty() {
            return;
        }
        self.stats.upstream_errors += 1;
        self.server_failed(server, now);
        for (id, key) in hit {
            self.sent.remove(&id);
            if let Some(p) = self.pending.remove(&key) {
                self.bad_answer(key, p, id, None, now);
            }
        }
    }

    /// System mode: the host resolver's answer for `req`.
    pub fn handle_resolved(
        &mut self,
        _now: Instant,
        req: ResolveId,
        result: Result<Vec<IpAddr>, ResolveError>,
    ) {
        if !matches!(self.pending.get(&req.0), Some(p) if matches!(p.kind, Kind::System)) {
            self.stats.stale_resolves += 1;
            return;
        }
        let Some(p) = self.finish(req.0) else { return };
        let Ok(q) = Message::from_vec(&p.query) else {
            return;
        };
        let (rcode, addrs) = match result {
            Ok(a) => (ResponseCode::NoError, a),
            Err(ResolveError::NoName) => (ResponseCode::NXDomain, Vec::new()),
            Err(ResolveError::NoData) => (ResponseCode::NoError, Vec::new()),
            Err(ResolveError::Failed) => {
                self.stats.servfail_sent += 1;
                (ResponseCode::ServFail, Vec::new())
            }
        };
        let mut seen = Vec::new();
        for a in addrs {
            if !seen.contains(&a) && seen.len() < MAX_RESOLVED {
                seen.push(a);
            }
        }
        let records = address_records(&q, p.question.qtype, &seen, self.cfg.system_ttl);
        self.stats.answered_system += 1;
        let reply = local_reply(&q, rcode, records, false, p.udp_limit);
        self.deliver(p.client, p.udp_limit, reply);
    }

    /// Retransmit, move on to the next group, or give up (SERVFAIL) for every query whose
    /// time has come. Call at (or after) [`Dns::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.cache.expire(now);
        while let Some(&(t, key)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            let Some(mut p) = self.pending.remove(&key) else {
                continue;
            };
            p.wake = None;
            if now >= p.deadline {
                if let Kind::Forward(f) = &p.kind {
                    self.stats.upstream_timeouts += 1;
                    let unanswered: Vec<SocketAddr> = f
                        .round
                        .iter()
                        .filter(|a| !a.answered)
                        .map(|a| a.server)
                        .collect();
                    for s in unanswered {
                        self.server_failed(s, now);
                    }
                }
                self.pending.insert(key, p);
                if let Some(p) = self.finish(key) {
                    self.servfail_to(&p);
                }
                continue;
            }
            if matches!(&p.kind, Kind::Forward(f) if now >= f.next_retx) {
                self.next_round(key, &mut p, now, true);
            }
            self.arm(key, &mut p);
            self.pending.insert(key, p);
        }
    }

    fn servfail_to(&mut self, p: &Pending) {
        self.stats.servfail_sent += 1;
        let reply = match Message::from_vec(&p.query) {
            Ok(q) => local_reply(&q, ResponseCode::ServFail, Vec::new(), false, p.udp_limit),
            Err(_) => raw::error_reply(&p.query, raw::RCODE_SERVFAIL),
        };
        self.deliver(p.client, p.udp_limit, reply);
    }

    /// An error answer (or a questionless error) for `id` of query `key`.
    fn bad_answer(&mut self, key: u64, mut p: Pending, id: u16, msg: Option<&[u8]>, now: Instant) {
        let Kind::Forward(f) = &mut p.kind else {
            self.pending.insert(key, p);
            return;
        };
        if let Some(m) = msg {
            f.last_bad = Some(m.to_vec());
        }
        for a in f.round.iter_mut().filter(|a| a.id == id) {
            a.answered = true;
        }
        let round_over = f.round.iter().all(|a| a.answered);
        if !round_over {
            self.pending.insert(key, p);
            return;
        }
        if f.rounds + 1 >= f.groups.len() {
            // Every group has had its turn and failed: pass the last error on now rather
            // than make the guest wait for the timeout.
            let last = f.last_bad.take();
            self.pending.insert(key, p);
            if let Some(p) = self.finish(key) {
                match last {
                    Some(mut b) => {
                        raw::set_id(&mut b, p.guest_id);
                        self.deliver(p.client, p.udp_limit, b);
                    }
                    None => self.servfail_to(&p),
                }
            }
            return;
        }
        self.next_round(key, &mut p, now, false);
        self.arm(key, &mut p);
        self.pending.insert(key, p);
    }

    /// Start the next round: the next usable group (or the same one again).
    fn next_round(&mut self, key: u64, p: &mut Pending, now: Instant, count_failures: bool) {
        let Kind::Forward(f) = &mut p.kind else {
            return;
        };
        let unanswered: Vec<SocketAddr> = f
            .round
            .iter()
            .filter(|a| !a.answered)
            .map(|a| a.server)
            .collect();
        if count_failures {
            for s in unanswered {
                self.server_failed(s, now);
            }
        }
        let Kind::Forward(f) = &mut p.kind else {
            return;
        };
        let groups = std::mem::take(&mut f.groups);
        f.group = self.choose_group(&groups, f.group + 1);
        let Kind::Forward(f) = &mut p.kind else {
            return;
        };
        f.groups = groups;
        f.rounds += 1;
        f.next_retx = now + self.cfg.retransmit;
        self.stats.retransmits += 1;
        self.send_round(key, p, now);
    }

    /// The first group from `start` (cyclically) with a server that is up; `start` itself
    /// when every server is down.
    fn choose_group(&self, groups: &[UpstreamGroup], start: usize) -> usize {
        let n = groups.len();
        if n == 0 {
            return 0;
        }
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&g| groups[g].iter().any(|s| !self.is_down(*s)))
            .unwrap_or(start % n)
    }

    fn probe_due(&self, s: SocketAddr, now: Instant) -> bool {
        self.servers
            .get(&s)
            .is_some_and(|st| st.down && st.next_probe.is_none_or(|t| now >= t))
    }

    fn mark_probed(&mut self, s: SocketAddr, now: Instant) {
        let next = now + self.cfg.probe_interval;
        if let Some(st) = self.servers.get_mut(&s) {
            st.next_probe = Some(next);
        }
    }

    /// Send the query to the servers of the current group that are up, plus every server
    /// that is down and due for a probe (in any group of this query); to the whole group if
    /// all of it is down.
    fn send_round(&mut self, key: u64, p: &mut Pending, now: Instant) {
        let Kind::Forward(f) = &mut p.kind else {
            return;
        };
        let n = f.groups.len();
        if n == 0 {
            return;
        }
        let g = f.group % n;
        let mut targets: Vec<SocketAddr> = Vec::new();
        let mut probed: Vec<SocketAddr> = Vec::new();
        for s in &f.groups[g] {
            if targets.contains(s) {
                continue;
            }
            if !self.is_down(*s) {
                targets.push(*s);
            } else if self.probe_due(*s, now) {
                targets.push(*s);
                probed.push(*s);
            }
        }
        if targets.is_empty() {
            for s in &f.groups[g] {
                if !targets.contains(s) {
                    targets.push(*s);
                    probed.push(*s);
                }
            }
        }
        for (i, grp) in f.groups.iter().enumerate() {
            if i == g {
                continue;
            }
            for s in grp {
                if !targets.contains(s) && self.probe_due(*s, now) {
                    targets.push(*s);
                    probed.push(*s);
                }
            }
        }
        for s in probed {
            self.mark_probed(s, now);
        }
        let Kind::Forward(f) = &mut p.kind else {
            return;
        };
        f.round.clear();
        for server in targets {
            if f.ids.len() >= MAX_SENDS_PER_QUERY {
                break;
            }
            let Some(id) = fresh_id(&mut self.rng, &self.sent) else {
                self.stats.ids_exhausted += 1;
                break;
            };
            self.sent.insert(
                id,
                Sent {
                    server,
                    via: f.via,
                    key,
                },
            );
            f.ids.push(id);
            f.round.push(Ask {
                id,
                server,
                answered: false,
            });
            let mut bytes = p.query.clone();
            raw::set_id(&mut bytes, id);
            self.stats.upstream_sent += 1;
            let via = f.via;
            if self.outputs.len() >= MAX_OUTPUTS {
                self.stats.outputs_dropped += 1;
            } else {
                self.outputs
                    .push_back(DnsOutput::ToUpstream { server, via, bytes });
            }
        }
    }

    fn server_failed(&mut self, s: SocketAddr, now: Instant) {
        let down_after = self.cfg.down_after;
        let probe = self.cfg.probe_interval;
        let st = self.servers.entry(s).or_default();
        st.failures = st.failures.saturating_add(1);
        if !st.down && st.failures >= down_after {
            st.down = true;
            st.next_probe = Some(now + probe);
            self.stats.servers_marked_down += 1;
        }
    }

    fn server_ok(&mut self, s: SocketAddr) {
        if let Some(st) = self.servers.get_mut(&s) {
            st.failures = 0;
            if st.down {
                st.down = false;
                st.next_probe = None;
                self.stats.servers_recovered += 1;
            }
        }
    }

    /// Put query `key`'s wake-up time in the timer set.
    fn arm(&mut self, key: u64, p: &mut Pending) {
        let t = match &p.kind {
            Kind::Forward(f) => f.next_retx.min(p.deadline),
            Kind::System => p.deadline,
        };
        if p.wake == Some(t) {
            return;
        }
        if let Some(old) = p.wake {
            self.timers.remove(&(old, key));
        }
        self.timers.insert((t, key));
        p.wake = Some(t);
    }

    /// Forget query `key` and everything that points at it.
    fn finish(&mut self, key: u64) -> Option<Pending> {
        let p = self.pending.remove(&key)?;
        if let Some(t) = p.wake {
            self.timers.remove(&(t, key));
        }
        self.by_client.remove(&(p.client, p.guest_id));
        if let Kind::Forward(f) = &p.kind {
            for id in &f.ids {
                if self.sent.get(id).is_some_and(|s| s.key == key) {
                    self.sent.remove(id);
                }
            }
        }
        Some(p)
    }

    /// The servers of the longest configured zone that `q`'s name is in or under.
    fn zone_servers(&self, q: &Question) -> Option<Vec<SocketAddr>> {
        let labels = wire_labels(&q.name);
        let mut best: Option<(usize, &Vec<SocketAddr>)> = None;
        for (zone, servers) in &self.cfg.zones {
            let z = zone.trim().trim_end_matches('.').to_ascii_lowercase();
            let zl: Vec<&[u8]> = if z.is_empty() {
                Vec::new()
            } else {
                z.split('.').map(str::as_bytes).collect()
            };
            if zl.len() > labels.len() || servers.is_empty() {
                continue;
            }
            let tail = &labels[labels.len() - zl.len()..];
            if tail.iter().zip(&zl).all(|(a, b)| a == b) && best.is_none_or(|(n, _)| zl.len() > n) {
                best = Some((zl.len(), servers));
            }
        }
        best.map(|(_, s)| s.clone())
    }

    /// A local answer if the name is static (or a reverse name of a static address).
    fn answer_static(&self, q: &Message, question: &Question) -> Option<Vec<u8>> {
        if question.qclass != raw::CLASS_IN && question.qclass != raw::TYPE_ANY {
            return None;
        }
        let name = question.dotted()?;
        let ttl = self.cfg.static_ttl;
        let limit = usize::from(self.cfg.max_udp_payload);
        if let Some(addrs) = self
            .cfg
            .static_names
            .get(&name)
            .or_else(|| self.hosts.get(&name))
        {
            let records = address_records(q, question.qtype, addrs, ttl);
            return Some(local_reply(q, ResponseCode::NoError, records, true, limit));
        }
        if question.qtype == raw::TYPE_PTR || question.qtype == raw::TYPE_ANY {
            let addr = names::reverse_addr(&name)?;
            let target = self.reverse.get(&addr)?;
            let qname = q.queries.first()?.name().clone();
            let mut tn = Name::from_ascii(target).ok()?;
            tn.set_fqdn(true);
            let rec = Record::from_rdata(qname, ttl, RData::PTR(PTR(tn)));
            return Some(local_reply(
                q,
                ResponseCode::NoError,
                vec![rec],
                true,
                limit,
            ));
        }
        None
    }

    fn answer_cached(&mut self, q: &Message, key: &CacheKey, now: Instant) -> Option<Vec<u8>> {
        let (cached, age) = self.cache.get(key, now)?;
        let mut m = cached.clone();
        m.metadata.id = q.metadata.id;
        m.metadata.recursion_desired = q.metadata.recursion_desired;
        m.metadata.checking_disabled = q.metadata.checking_disabled;
        m.queries = q.queries.clone();
        for r in m
            .answers
            .iter_mut()
            .chain(m.authorities.iter_mut())
            .chain(m.additionals.iter_mut())
        {
            r.decrement_ttl(age);
        }
        if q.edns.is_none() {
            m.edns = None;
        }
        m.to_vec().ok()
    }

    fn cache_answer(&mut self, key: CacheKey, msg: &[u8], now: Instant) {
        let Ok(m) = Message::from_vec(msg) else {
            return;
        };
        let rcode = Header::parse(msg).map_or(0xff, |h| h.rcode());
        let positive = rcode == raw::RCODE_NOERROR && !m.answers.is_empty();
        let ttl = if positive {
            m.answers
                .iter()
                .chain(&m.authorities)
                .chain(&m.additionals)
                .map(|r| r.ttl)
                .min()
                .unwrap_or(0)
                .min(self.cfg.cache_max_ttl)
        } else if rcode == raw::RCODE_NOERROR || rcode == raw::RCODE_NXDOMAIN {
            // RFC 2308 5: the SOA's TTL, bounded by its MINIMUM field.
            m.authorities
                .iter()
                .find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })
                .unwrap_or(0)
                .min(self.cfg.cache_max_negative_ttl)
        } else {
            0
        };
        if ttl == 0 {
            return;
        }
        // Served TTLs count down from what the entry is cached for (RFC 2308 5: a negative
        // answer's SOA carries the negative TTL).
        let mut m = m;
        for r in m
            .answers
            .iter_mut()
            .chain(m.authorities.iter_mut())
            .chain(m.additionals.iter_mut())
        {
            r.ttl = r.ttl.min(ttl);
        }
        if let Some(evicted) = self.cache.insert(key, m, msg.len(), ttl, now) {
            self.stats.cache_inserts += 1;
            self.stats.cache_evictions += evicted as u64;
        }
    }
}

fn fresh_id(rng: &mut Rng, sent: &BTreeMap<u16, Sent>) -> Option<u16> {
    (0..64)
        .map(|_| rng.next_u32() as u16)
        .find(|id| !sent.contains_key(id))
}

/// The labels of a wire-format name.
fn wire_labels(name: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&len) = name.get(i) {
        if len == 0 {
            break;
        }
        match name.get(i + 1..i + 1 + usize::from(len)) {
            Some(l) => out.push(l),
            None => break,
        }
        i += 1 + usize::from(len);
    }
    out
}

/// A / AAAA records of `addrs` that fit `qtype` (both for ANY), named as the guest asked.
fn address_records(q: &Message, qtype: u16, addrs: &[IpAddr], ttl: u32) -> Vec<Record> {
    let Some(name) = q.queries.first().map(|x| x.name().clone()) else {
        return Vec::new();
    };
    addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v4) if qtype == raw::TYPE_A || qtype == raw::TYPE_ANY => {
                Some(RData::A(A(*v4)))
            }
            IpAddr::V6(v6) if qtype == raw::TYPE_AAAA || qtype == raw::TYPE_ANY => {
                Some(RData::AAAA(AAAA(*v6)))
            }
            _ => None,
        })
        .map(|d| Record::from_rdata(name.clone(), ttl, d))
        .collect()
}

/// An answer made here for query `q`: its ID, question and RD/CD bits, RA set, EDNS when
/// the query had it.
fn local_reply(
    q: &Message,
    rcode: ResponseCode,
    answers: Vec<Record>,
    authoritative: bool,
    udp_limit: usize,
) -> Vec<u8> {
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.checking_disabled = q.metadata.checking_disabled;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = authoritative;
    m.metadata.response_code = rcode;
    m.queries = q.queries.clone();
    m.answers = answers;
    if q.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(u16::try_from(udp_limit).unwrap_or(u16::MAX).max(512));
        m.edns = Some(e);
    }
    match m.to_vec() {
        Ok(b) => b,
        Err(_) => {
            let mut query = Vec::new();
            Header {
                id: q.metadata.id,
                flags: 0,
                qdcount: 0,
                ancount: 0,
                nscount: 0,
                arcount: 0,
            }
            .emit(&mut query);
            raw::error_reply(&query, rcode.low())
        }
    }
}
