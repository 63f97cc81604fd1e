//! A DHCPv4 server (RFC 2131) for the guest link, as a plain state machine.
//!
//! [`DhcpServer::handle`] takes the UDP payload a guest sent to port 67 and the current time,
//! and writes the reply's UDP payload (if any) into a caller-supplied buffer. The caller wraps
//! it in UDP (67 -> 68), IPv4 (from the server address to [`DhcpReply::dst_ip`]) and Ethernet
//! (to [`DhcpReply::dst_mac`]; never ARP for it, the client may not have its address yet).
//!
//! Leases are stable per MAC address: a MAC keeps its address across RELEASE and expiry for
//! as long as the pool has room. Only when the pool is exhausted is the address of the least
//! recently seen MAC without an active lease handed to someone else. The tables are bounded
//! by the pool size, and every decision is deterministic (`BTreeMap`s, lowest free address).
//!
//! `handle` does not check that the BOOTP `chaddr` matches the Ethernet source of the frame;
//! the caller may want to.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use smoltcp::time::{Duration, Instant};

use crate::config::{Config, Subnet};

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHERNET: u8 = 1;
const MAGIC_COOKIE: [u8; 4] = [0x63, 0x82, 0x53, 0x63];
/// Fixed BOOTP header plus the magic cookie; options follow.
const HEADER_LEN: usize = 240;
const FLAG_BROADCAST: u16 = 0x8000;

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_DOMAIN_NAME: u8 = 15;
const OPT_INTERFACE_MTU: u8 = 26;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_MAX_SIZE: u8 = 57;
const OPT_RENEWAL_TIME: u8 = 58;
const OPT_REBINDING_TIME: u8 = 59;
const OPT_DOMAIN_SEARCH: u8 = 119;
const OPT_END: u8 = 255;

/// Every DHCP client must accept a 576-byte IP datagram (RFC 2131 section 2).
const MIN_DATAGRAM: usize = 576;
/// IPv4 (without options) and UDP headers.
const IP_UDP_HEADERS: usize = 28;
/// Some BOOTP-era clients drop messages shorter than this (RFC 1542 section 2.1).
const BOOTP_MIN_LEN: usize = 300;
/// How long an OFFER holds its address against eviction when the pool runs out.
const OFFER_HOLD: Duration = Duration::from_secs(60);
/// A domain name on the wire is at most this long (RFC 1035 section 2.3.4).
const MAX_NAME_WIRE_LEN: usize = 255;
/// Cap on the encoded search list (several options 119 per RFC 3396).
const MAX_SEARCH_LEN: usize = 1024;
/// DNS servers sent at most.
const MAX_DNS_SERVERS: usize = 3;

/// DHCP message types (option 53).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }
}

/// The parts of a client message the server looks at.
#[derive(Clone, Copy, Debug)]
struct ClientMsg {
    kind: MessageType,
    xid: [u8; 4],
    broadcast: bool,
    ciaddr: Ipv4Addr,
    giaddr: Ipv4Addr,
    chaddr: [u8; 6],
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    max_size: Option<u16>,
}

fn ip_at(p: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3])
}

fn ip_opt(data: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(data).ok().map(Ipv4Addr::from)
}

impl ClientMsg {
    fn parse(p: &[u8]) -> Result<Self, DhcpError> {
        if p.len() < HEADER_LEN {
            return Err(DhcpError::Malformed);
        }
        if p[0] != BOOTREQUEST {
            return Err(DhcpError::NotBootRequest);
        }
        if p[1] != HTYPE_ETHERNET || p[2] != 6 {
            return Err(DhcpError::Malformed);
        }
        if p[236..240] != MAGIC_COOKIE {
            return Err(DhcpError::BadMagicCookie);
        }
        let mut kind = None;
        let mut requested_ip = None;
        let mut server_id = None;
        let mut max_size = None;
        let mut rest = &p[HEADER_LEN..];
        // The first instance of each option counts; a truncated option or a missing END is an
        // error.
        loop {
            match rest {
                [OPT_END, ..] => break,
                [] => return Err(DhcpError::Malformed),
                [OPT_PAD, tail @ ..] => rest = tail,
                [code, len, tail @ ..] if tail.len() >= usize::from(*len) => {
                    let (data, tail) = tail.split_at(usize::from(*len));
                    rest = tail;
                    match (*code, data) {
                        (OPT_MESSAGE_TYPE, [t]) => {
                            kind = kind.or(Some(*t));
                        }
                        (OPT_REQUESTED_IP, _) => requested_ip = requested_ip.or(ip_opt(data)),
                        (OPT_SERVER_ID, _) => server_id = server_id.or(ip_opt(data)),
                        (OPT_MAX_SIZE, [a, b]) => {
                            max_size = max_size.or(Some(u16::from_be_bytes([*a, *b])));
                        }
                        _ => {}
                    }
                }
                _ => return Err(DhcpError::Malformed),
            }
        }
        let kind = kind.ok_or(DhcpError::NoMessageType)?;
        let kind = match MessageType::from_u8(kind) {
            Some(
                k @ (MessageType::Discover
                | MessageType::Request
                | MessageType::Decline
                | MessageType::Release
                | MessageType::Inform),
            ) => k,
            _ => return Err(DhcpError::UnsupportedMessageType(kind)),
        };
        let mut chaddr = [0; 6];
        chaddr.copy_from_slice(&p[28..34]);
        Ok(ClientMsg {
            kind,
            xid: [p[4], p[5], p[6], p[7]],
            broadcast: u16::from_be_bytes([p[10], p[11]]) & FLAG_BROADCAST != 0,
            ciaddr: ip_at(p, 12),
            giaddr: ip_at(p, 24),
            chaddr,
            requested_ip,
            server_id,
            max_size,
        })
    }
}

fn put_opt(out: &mut Vec<u8>, code: u8, data: &[u8]) {
    debug_assert!(data.len() <= usize::from(u8::MAX));
    out.push(code);
    out.push(data.len() as u8);
    out.extend_from_slice(data);
}

/// What the DHCP server hands out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpServerConfig {
    /// The server identifier: the gateway.
    pub server_ip: Ipv4Addr,
    pub subnet: Subnet,
    /// Option 3.
    pub router: Ipv4Addr,
    /// Option 6; at most three are sent, and `server_ip` when empty.
    pub dns_servers: Vec<Ipv4Addr>,
    /// The pool, inclusive.
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    /// Addresses never handed out (e.g. the host alias).
    pub reserved: Vec<Ipv4Addr>,
    pub lease_time: Duration,
    /// Option 15.
    pub domain_name: Option<String>,
    /// Option 119.
    pub search: Vec<String>,
    /// Option 26.
    pub mtu: u16,
}

impl DhcpServerConfig {
    /// The server for a stack configuration: the gateway is server, router and (by default)
    /// DNS server; the host alias is reserved.
    pub fn from_config(cfg: &Config) -> Self {
        DhcpServerConfig {
            server_ip: cfg.gateway,
            subnet: cfg.subnet,
            router: cfg.gateway,
            dns_servers: cfg.dhcp.dns_servers.clone(),
            first: cfg.first_guest,
            last: cfg.last_guest,
            reserved: cfg.host_alias.into_iter().collect(),
            lease_time: cfg.dhcp.lease_time,
            domain_name: cfg.dhcp.domain_name.clone(),
            search: cfg.dhcp.search.clone(),
            mtu: cfg.mtu,
        }
    }
}

/// Where to send a reply written by [`DhcpServer::handle`] (UDP port 68).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DhcpReply {
    /// `255.255.255.255`, or the client's address (`ciaddr`, else `yiaddr`) per RFC 2131 4.1.
    pub dst_ip: Ipv4Addr,
    /// `ff:ff:ff:ff:ff:ff` with a broadcast `dst_ip`, else the client's `chaddr`.
    pub dst_mac: [u8; 6],
    /// Bytes written to `out`.
    pub len: usize,
}

/// Why a message got no reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DhcpError {
    /// Too short, not Ethernet, or unparseable.
    Malformed,
    /// `op` is not BOOTREQUEST.
    NotBootRequest,
    /// The magic cookie is missing.
    BadMagicCookie,
    /// No DHCP message type option (plain BOOTP is not served).
    NoMessageType,
    /// A message type a client does not send (OFFER, ACK, NAK, unknown).
    UnsupportedMessageType(u8),
    /// `chaddr` is not a unicast MAC address.
    BadClientAddress,
    /// A REQUEST with neither a requested address nor `ciaddr`.
    NoRequestedAddress,
    /// No address is free and none can be reclaimed.
    PoolExhausted,
    /// A preferred address outside the pool, or the gateway's own.
    NotInPool(Ipv4Addr),
    /// A preferred address another client holds.
    Taken(Ipv4Addr),
}

impl fmt::Display for DhcpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DhcpError::Malformed => write!(f, "malformed DHCP message"),
            DhcpError::NotBootRequest => write!(f, "DHCP message is not a BOOTREQUEST"),
            DhcpError::BadMagicCookie => write!(f, "DHCP message has no magic cookie"),
            DhcpError::NoMessageType => write!(f, "DHCP message has no message type option"),
            DhcpError::UnsupportedMessageType(t) => {
                write!(f, "DHCP message type {t} is not sent by clients")
            }
            DhcpError::BadClientAddress => {
                write!(f, "DHCP client hardware address is not a unicast MAC")
            }
            DhcpError::NoRequestedAddress => {
                write!(
                    f,
                    "DHCPREQUEST names neither a requested address nor ciaddr"
                )
            }
            DhcpError::PoolExhausted => write!(f, "DHCP address pool exhausted"),
            DhcpError::NotInPool(ip) => write!(f, "{ip} is not in the DHCP address pool"),
            DhcpError::Taken(ip) => write!(f, "{ip} is leased to another client"),
        }
    }
}

impl std::error::Error for DhcpError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Offered, not yet requested; held until then.
    Offered(Instant),
    /// Acknowledged, valid until then.
    Bound(Instant),
    /// Released, or offered to a client that chose another server.
    Idle,
}

#[derive(Clone, Copy, Debug)]
struct Binding {
    ip: Ipv4Addr,
    state: State,
    last_seen: Instant,
}

impl Binding {
    fn active(&self, now: Instant) -> bool {
        match self.state {
            State::Offered(until) | State::Bound(until) => until > now,
            State::Idle => false,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReplyKind {
    Offer,
    Ack,
    InformAck,
    Nak,
}

/// Preferred addresses remembered at most (see [`DhcpServer::prefer`]).
const MAX_PREFERRED: usize = 4096;

/// The DHCPv4 server state: one address binding per MAC.
#[derive(Clone, Debug)]
pub struct DhcpServer {
    cfg: DhcpServerConfig,
    /// The pool clamped to the subnet's host addresses; empty when `first > last`.
    first: u32,
    last: u32,
    reserved: BTreeSet<Ipv4Addr>,
    bindings: BTreeMap<[u8; 6], Binding>,
    /// Inverse of `bindings`.
    owners: BTreeMap<Ipv4Addr, [u8; 6]>,
    /// Declined addresses and until when they stay out of use.
    declined: BTreeMap<Ipv4Addr, Instant>,
    /// Addresses clients asked for out of band (VPNKit's Preferred_ipv4), offered to them
    /// first while free. At most one per MAC and [`MAX_PREFERRED`] in all.
    preferred: BTreeMap<[u8; 6], Ipv4Addr>,
    /// Option 15 data, when valid.
    domain_name: Option<Vec<u8>>,
    /// Option 119 data (RFC 1035 names, uncompressed).
    search: Vec<u8>,
}

impl DhcpServer {
    pub fn new(cfg: DhcpServerConfig) -> Self {
        let net = u32::from(cfg.subnet.network());
        let bcast = u32::from(cfg.subnet.broadcast());
        let first = u32::from(cfg.first).max(net.saturating_add(1));
        let last = u32::from(cfg.last).min(bcast.saturating_sub(1));
        let reserved = cfg.reserved.iter().copied().collect();
        let domain_name = cfg
            .domain_name
            .as_deref()
            .map(|d| d.as_bytes().to_vec())
            .filter(|d| !d.is_empty() && d.len() <= usize::from(u8::MAX));
        let mut search = Vec::new();
        for name in &cfg.search {
            if let Some(enc) = encode_name(name) {
                if search.len() + enc.len() <= MAX_SEARCH_LEN {
                    search.extend_from_slice(&enc);
                }
            }
        }
        DhcpServer {
            cfg,
            first,
            last,
            reserved,
            bindings: BTreeMap::new(),
            owners: BTreeMap::new(),
            declined: BTreeMap::new(),
            preferred: BTreeMap::new(),
            domain_name,
            search,
        }
    }

    pub fn config(&self) -> &DhcpServerConfig {
        &self.cfg
    }

    /// Handle the UDP payload of a packet a client sent to port 67. Writes the reply's UDP
    /// payload into `out` (cleared first) and says where to send it, or `Ok(None)` when no
    /// reply is due (RELEASE, DECLINE, a REQUEST for another server).
    pub fn handle(
        &mut self,
        now: Instant,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<DhcpReply>, DhcpError> {
        out.clear();
        let req = ClientMsg::parse(payload)?;
        let mac = req.chaddr;
        // Unicast (I/G bit clear) and not all-zero.
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(DhcpError::BadClientAddress);
        }

        self.declined.retain(|_, until| *until > now);
        if let Some(b) = self.bindings.get_mut(&mac) {
            b.last_seen = now;
        }
        let server_ip = self.cfg.server_ip;
        let ours = move |sid: Option<Ipv4Addr>| sid.is_none_or(|s| s == server_ip);

        match req.kind {
            MessageType::Discover => {
                let ip = self.allocate(now, mac, req.requested_ip)?;
                self.reply(ReplyKind::Offer, &req, ip, out).map(Some)
            }
            MessageType::Request => {
                if !ours(req.server_id) {
                    // The client chose another server: our offer is free to go.
                    if let Some(b) = self.bindings.get_mut(&mac) {
                        if matches!(b.state, State::Offered(_)) {
                            b.state = State::Idle;
                        }
                    }
                    return Ok(None);
                }
                let ip = req
                    .requested_ip
                    .or_else(|| nonzero(req.ciaddr))
                    .ok_or(DhcpError::NoRequestedAddress)?;
                if self.available_to(mac, ip, now) {
                    let until = add(now, self.cfg.lease_time);
                    self.bind(mac, ip, State::Bound(until), now);
                    self.reply(ReplyKind::Ack, &req, ip, out).map(Some)
                } else {
                    self.reply(ReplyKind::Nak, &req, Ipv4Addr::UNSPECIFIED, out)
                        .map(Some)
                }
            }
            MessageType::Decline => {
                let ip = req.requested_ip.or_else(|| nonzero(req.ciaddr));
                if let Some(ip) = ip.filter(|_| ours(req.server_id)) {
                    if self.owners.get(&ip) == Some(&mac) {
                        // Someone else uses it: forget the binding and rest the address.
                        self.owners.remove(&ip);
                        self.bindings.remove(&mac);
                        self.declined.insert(ip, add(now, self.cfg.lease_time));
                    }
                }
                Ok(None)
            }
            MessageType::Release => {
                if ours(req.server_id) {
                    if let Some(b) = self.bindings.get_mut(&mac) {
                        if b.ip == req.ciaddr {
                            b.state = State::Idle;
                        }
                    }
                }
                Ok(None)
            }
            MessageType::Inform => self
                .reply(ReplyKind::InformAck, &req, Ipv4Addr::UNSPECIFIED, out)
                .map(Some),
            k @ (MessageType::Offer | MessageType::Ack | MessageType::Nak) => {
                Err(DhcpError::UnsupportedMessageType(k as u8))
            }
        }
    }

    /// The address acknowledged to `mac` and not released or declined since. Expiry is not
    /// checked here (there is no clock); it is applied when the server handles messages.
    pub fn lease(&self, mac: [u8; 6]) -> Option<Ipv4Addr> {
        self.bindings
            .get(&mac)
            .filter(|b| matches!(b.state, State::Bound(_)))
            .map(|b| b.ip)
    }

    /// All [`lease`](Self::lease)s, ordered by MAC.
    pub fn leases(&self) -> impl Iterator<Item = ([u8; 6], Ipv4Addr)> + '_ {
        self.bindings
            .iter()
            .filter(|(_, b)| matches!(b.state, State::Bound(_)))
            .map(|(mac, b)| (*mac, b.ip))
    }

    /// Offer `ip` to `mac` from now on while nobody else holds it (VPNKit's
    /// Preferred_ipv4, sent before the guest runs DHCP). Refused for an address outside
    /// the pool or held by another client; the guest then gets an address the usual way.
    pub fn prefer(&mut self, now: Instant, mac: [u8; 6], ip: Ipv4Addr) -> Result<(), DhcpError> {
        if !self.usable(ip) {
            return Err(DhcpError::NotInPool(ip));
        }
        if !self.available_to(mac, ip, now) {
            return Err(DhcpError::Taken(ip));
        }
        if self.preferred.len() >= MAX_PREFERRED && !self.preferred.contains_key(&mac) {
            // Bounded: the oldest-keyed entry goes (a client that comes back asks again).
            self.preferred.pop_first();
        }
        self.preferred.insert(mac, ip);
        Ok(())
    }

    /// Forget everything about `mac` (the guest left); its address becomes free.
    pub fn release_mac(&mut self, mac: [u8; 6]) {
        if let Some(b) = self.bindings.remove(&mac) {
            self.owners.remove(&b.ip);
        }
    }

    /// In the pool and never excluded by configuration.
    fn usable(&self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        self.first <= n
            && n <= self.last
            && ip != self.cfg.server_ip
            && ip != self.cfg.router
            && !self.reserved.contains(&ip)
    }

    /// `mac` may have `ip`: usable, and bound to `mac` or to nobody (and not declined).
    fn available_to(&self, mac: [u8; 6], ip: Ipv4Addr, now: Instant) -> bool {
        if !self.usable(ip) {
            return false;
        }
        match self.owners.get(&ip) {
            Some(owner) => *owner == mac,
            None => self.declined.get(&ip).is_none_or(|until| *until <= now),
        }
    }

    fn allocate(
        &mut self,
        now: Instant,
        mac: [u8; 6],
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, DhcpError> {
        let preferred = self.preferred.get(&mac).copied();
        let ip = if let Some(ip) = requested.filter(|ip| self.available_to(mac, *ip, now)) {
            ip
        } else if let Some(ip) = preferred.filter(|ip| self.available_to(mac, *ip, now)) {
            ip
        } else if let Some(b) = self.bindings.get(&mac) {
            b.ip
        } else if let Some(ip) = self.lowest_free(now) {
            ip
        } else if let Some(ip) = self.evict_lru(now) {
            ip
        } else {
            return Err(DhcpError::PoolExhausted);
        };
        // An active lease survives a DISCOVER (the client may come back to it); anything
        // else becomes an offer.
        let state = match self.bindings.get(&mac) {
            Some(b) if b.ip == ip && b.active(now) && matches!(b.state, State::Bound(_)) => b.state,
            _ => State::Offered(add(now, OFFER_HOLD.min(self.cfg.lease_time))),
        };
        self.bind(mac, ip, state, now);
        Ok(ip)
    }

    /// The lowest address of the pool nobody has.
    fn lowest_free(&self, now: Instant) -> Option<Ipv4Addr> {
        let mut n = self.first;
        while n <= self.last {
            let ip = Ipv4Addr::from(n);
            if !self.owners.contains_key(&ip) && self.available_to([0; 6], ip, now) {
                return Some(ip);
            }
            n = n.checked_add(1)?;
        }
        None
    }

    /// Take the address of the least recently seen MAC without an active lease.
    fn evict_lru(&mut self, now: Instant) -> Option<Ipv4Addr> {
        let (mac, ip) = self
            .bindings
            .iter()
            .filter(|(_, b)| !b.active(now))
            .min_by_key(|(mac, b)| (b.last_seen, **mac))
            .map(|(mac, b)| (*mac, b.ip))?;
        self.bindings.remove(&mac);
        self.owners.remove(&ip);
        Some(ip)
    }

    /// Bind `mac` to `ip` (free or already `mac`'s), dropping any other address it had.
    fn bind(&mut self, mac: [u8; 6], ip: Ipv4Addr, state: State, now: Instant) {
        let binding = Binding {
            ip,
            state,
            last_seen: now,
        };
        if let Some(old) = self.bindings.insert(mac, binding) {
            if old.ip != ip {
                self.owners.remove(&old.ip);
            }
        }
        self.owners.insert(ip, mac);
    }

    fn reply(
        &self,
        kind: ReplyKind,
        req: &ClientMsg,
        yiaddr: Ipv4Addr,
        out: &mut Vec<u8>,
    ) -> Result<DhcpReply, DhcpError> {
        out.clear();
        let (msg_type, ciaddr) = match kind {
            ReplyKind::Offer => (MessageType::Offer, Ipv4Addr::UNSPECIFIED),
            ReplyKind::Ack | ReplyKind::InformAck => (MessageType::Ack, req.ciaddr),
            ReplyKind::Nak => (MessageType::Nak, Ipv4Addr::UNSPECIFIED),
        };
        let flags = if req.broadcast { FLAG_BROADCAST } else { 0 };
        // op, htype, hlen, hops, xid, secs, flags.
        out.extend_from_slice(&[BOOTREPLY, HTYPE_ETHERNET, 6, 0]);
        out.extend_from_slice(&req.xid);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&flags.to_be_bytes());
        // ciaddr, yiaddr, siaddr, giaddr, chaddr (16 bytes), sname (64), file (128).
        out.extend_from_slice(&ciaddr.octets());
        out.extend_from_slice(&yiaddr.octets());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&req.giaddr.octets());
        out.extend_from_slice(&req.chaddr);
        out.resize(236, 0);
        out.extend_from_slice(&MAGIC_COOKIE);
        debug_assert_eq!(out.len(), HEADER_LEN);

        put_opt(out, OPT_MESSAGE_TYPE, &[msg_type as u8]);
        put_opt(out, OPT_SERVER_ID, &self.cfg.server_ip.octets());
        if matches!(kind, ReplyKind::Offer | ReplyKind::Ack) {
            let lease = u32::try_from(self.cfg.lease_time.secs())
                .unwrap_or(u32::MAX)
                .min(u32::MAX - 1);
            let t2 = (u64::from(lease) * 7 / 8) as u32;
            put_opt(out, OPT_LEASE_TIME, &lease.to_be_bytes());
            put_opt(out, OPT_RENEWAL_TIME, &(lease / 2).to_be_bytes());
            put_opt(out, OPT_REBINDING_TIME, &t2.to_be_bytes());
        }
        if kind != ReplyKind::Nak {
            put_opt(out, OPT_SUBNET_MASK, &self.cfg.subnet.netmask().octets());
            put_opt(out, OPT_ROUTER, &self.cfg.router.octets());
            let mut dns = [0; 4 * MAX_DNS_SERVERS];
            let mut n = 0;
            let servers = if self.cfg.dns_servers.is_empty() {
                std::slice::from_ref(&self.cfg.server_ip)
            } else {
                &self.cfg.dns_servers[..]
            };
            for ip in servers.iter().take(MAX_DNS_SERVERS) {
                dns[n..n + 4].copy_from_slice(&ip.octets());
                n += 4;
            }
            put_opt(out, OPT_DNS, &dns[..n]);
            put_opt(out, OPT_INTERFACE_MTU, &self.cfg.mtu.to_be_bytes());

            // Fit the client's limit (and our link): drop the search list, then the domain
            // name, when they do not.
            let client_max = req
                .max_size
                .map_or(MIN_DATAGRAM, usize::from)
                .max(MIN_DATAGRAM);
            let link_max = usize::from(self.cfg.mtu).max(MIN_DATAGRAM);
            let room = (client_max.min(link_max) - IP_UDP_HEADERS).saturating_sub(out.len() + 1);
            let domain_len = self.domain_name.as_ref().map_or(0, |d| 2 + d.len());
            let search_len: usize = self
                .search
                .chunks(usize::from(u8::MAX))
                .map(|c| 2 + c.len())
                .sum();
            if let Some(d) = self.domain_name.as_ref().filter(|_| domain_len <= room) {
                put_opt(out, OPT_DOMAIN_NAME, d);
            }
            if domain_len + search_len <= room {
                for chunk in self.search.chunks(usize::from(u8::MAX)) {
                    put_opt(out, OPT_DOMAIN_SEARCH, chunk);
                }
            }
        }
        out.push(OPT_END);
        if out.len() < BOOTP_MIN_LEN {
            out.resize(BOOTP_MIN_LEN, OPT_PAD);
        }

        let broadcast = (Ipv4Addr::BROADCAST, [0xff; 6]);
        let (dst_ip, dst_mac) = if kind == ReplyKind::Nak {
            broadcast
        } else if let Some(ciaddr) = nonzero(req.ciaddr) {
            (ciaddr, req.chaddr)
        } else if req.broadcast || kind == ReplyKind::InformAck {
            broadcast
        } else {
            (yiaddr, req.chaddr)
        };
        Ok(DhcpReply {
            dst_ip,
            dst_mac,
            len: out.len(),
        })
    }
}

fn nonzero(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    (!ip.is_unspecified()).then_some(ip)
}

fn add(now: Instant, d: Duration) -> Instant {
    let micros = i64::try_from(d.total_micros()).unwrap_or(i64::MAX);
    Instant::from_micros(now.total_micros().saturating_add(micros))
}

/// A domain name in RFC 1035 wire form (labels, no compression), or `None` if invalid.
fn encode_name(name: &str) -> Option<Vec<u8>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return None;
    }
    let mut enc = Vec::with_capacity(name.len() + 2);
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        enc.push(label.len() as u8);
        enc.extend_from_slice(label.as_bytes());
    }
    enc.push(0);
    (enc.len() <= MAX_NAME_WIRE_LEN).then_some(enc)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 65, 1);
    const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 65, 2);
    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

    fn cfg() -> DhcpServerConfig {
        DhcpServerConfig {
            server_ip: SERVER,
            subnet: Subnet::new(Ipv4Addr::new(192, 168, 65, 0), 24).unwrap(),
            router: SERVER,
            dns_servers: Vec::new(),
            first: Ipv4Addr::new(192, 168, 65, 3),
            last: Ipv4Addr::new(192, 168, 65, 254),
            reserved: vec![HOST],
            lease_time: Duration::from_secs(3600),
            domain_name: Some("example.internal".into()),
            search: vec!["example.internal".into(), "corp.example.com.".into()],
            mtu: 1400,
        }
    }

    fn t(secs: u64) -> Instant {
        Instant::from_secs(secs as i64)
    }

    /// A client message, as tests build it.
    struct Msg {
        kind: MessageType,
        mac: [u8; 6],
        client_ip: Ipv4Addr,
        broadcast: bool,
        requested_ip: Option<Ipv4Addr>,
        server_identifier: Option<Ipv4Addr>,
        max_size: Option<u16>,
    }

    fn encode(m: &Msg) -> Vec<u8> {
        let mut p = vec![0u8; 236];
        p[..4].copy_from_slice(&[1, 1, 6, 0]);
        p[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        if m.broadcast {
            p[10] = 0x80;
        }
        p[12..16].copy_from_slice(&m.client_ip.octets());
        p[28..34].copy_from_slice(&m.mac);
        p.extend_from_slice(&MAGIC_COOKIE);
        put_opt(&mut p, OPT_MESSAGE_TYPE, &[m.kind as u8]);
        let mut client_id = vec![1];
        client_id.extend_from_slice(&m.mac);
        put_opt(&mut p, 61, &client_id);
        if let Some(ip) = m.requested_ip {
            put_opt(&mut p, OPT_REQUESTED_IP, &ip.octets());
        }
        if let Some(ip) = m.server_identifier {
            put_opt(&mut p, OPT_SERVER_ID, &ip.octets());
        }
        if let Some(n) = m.max_size {
            put_opt(&mut p, OPT_MAX_SIZE, &n.to_be_bytes());
        }
        put_opt(&mut p, 55, &[1, 3, 6, 15, 26, 119]);
        p.push(OPT_END);
        p
    }

    fn msg(kind: MessageType, mac: [u8; 6], f: impl FnOnce(&mut Msg)) -> Vec<u8> {
        let mut m = Msg {
            kind,
            mac,
            client_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested_ip: None,
            server_identifier: None,
            max_size: None,
        };
        f(&mut m);
        encode(&m)
    }

    fn discover(mac: [u8; 6]) -> Vec<u8> {
        msg(MessageType::Discover, mac, |_| {})
    }

    fn select(mac: [u8; 6], ip: Ipv4Addr, server: Ipv4Addr) -> Vec<u8> {
        msg(MessageType::Request, mac, |r| {
            r.requested_ip = Some(ip);
            r.server_identifier = Some(server);
        })
    }

    /// A reply, decoded independently of the server's code.
    struct Parsed {
        kind: MessageType,
        yiaddr: Ipv4Addr,
        ciaddr: Ipv4Addr,
        xid: u32,
        broadcast: bool,
        chaddr: [u8; 6],
        server_id: Option<Ipv4Addr>,
        mask: Option<Ipv4Addr>,
        router: Option<Ipv4Addr>,
        dns: Option<Vec<Ipv4Addr>>,
        lease: Option<u32>,
        options: Vec<(u8, Vec<u8>)>,
    }

    impl Parsed {
        fn opt(&self, kind: u8) -> Option<&[u8]> {
            self.options
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, d)| d.as_slice())
        }
        fn kinds(&self) -> Vec<u8> {
            self.options.iter().map(|(k, _)| *k).collect()
        }
    }

    fn parse(out: &[u8]) -> Parsed {
        assert!(out.len() >= 240);
        assert_eq!(&out[..4], &[2, 1, 6, 0], "BOOTREPLY, Ethernet");
        assert_eq!(&out[236..240], &[99, 130, 83, 99], "magic cookie");
        assert!(
            out[34..236].iter().all(|b| *b == 0),
            "chaddr padding, sname, file"
        );
        let mut options = Vec::new();
        let mut i = 240;
        loop {
            match out[i] {
                0 => i += 1,
                255 => break,
                k => {
                    let n = usize::from(out[i + 1]);
                    options.push((k, out[i + 2..i + 2 + n].to_vec()));
                    i += 2 + n;
                }
            }
        }
        assert!(out[i + 1..].iter().all(|b| *b == 0), "padding after END");
        let ip = |d: &[u8]| Ipv4Addr::from(<[u8; 4]>::try_from(d).unwrap());
        let find = |k: u8| {
            options
                .iter()
                .find(|(o, _)| *o == k)
                .map(|(_, d)| d.clone())
        };
        let types: Vec<_> = options.iter().filter(|(k, _)| *k == 53).collect();
        assert_eq!(types.len(), 1);
        Parsed {
            kind: MessageType::from_u8(types[0].1[0]).unwrap(),
            yiaddr: ip(&out[16..20]),
            ciaddr: ip(&out[12..16]),
            xid: u32::from_be_bytes(out[4..8].try_into().unwrap()),
            broadcast: out[10] & 0x80 != 0,
            chaddr: out[28..34].try_into().unwrap(),
            server_id: find(54).map(|d| ip(&d)),
            mask: find(1).map(|d| ip(&d)),
            router: find(3).map(|d| ip(&d)),
            dns: find(6).map(|d| d.chunks(4).map(ip).collect()),
            lease: find(51).map(|d| u32::from_be_bytes(d.try_into().unwrap())),
            options,
        }
    }

    /// Runs `payload` through `s`, expecting a reply.
    fn exchange(s: &mut DhcpServer, now: Instant, payload: &[u8]) -> (DhcpReply, Parsed) {
        let mut out = Vec::new();
        let reply = s.handle(now, payload, &mut out).unwrap().expect("a reply");
        assert_eq!(reply.len, out.len());
        assert!(out.len() >= BOOTP_MIN_LEN && out.len() <= MIN_DATAGRAM - IP_UDP_HEADERS);
        (reply, parse(&out))
    }

    fn no_reply(s: &mut DhcpServer, now: Instant, payload: &[u8]) {
        let mut out = vec![1, 2, 3];
        assert_eq!(s.handle(now, payload, &mut out), Ok(None));
        assert!(out.is_empty());
    }

    fn dora(s: &mut DhcpServer, now: Instant, mac: [u8; 6]) -> Ipv4Addr {
        let (_, offer) = exchange(s, now, &discover(mac));
        assert_eq!(offer.kind, MessageType::Offer);
        let (_, ack) = exchange(s, now, &select(mac, offer.yiaddr, SERVER));
        assert_eq!(ack.kind, MessageType::Ack);
        assert_eq!(ack.yiaddr, offer.yiaddr);
        ack.yiaddr
    }

    fn check_config_options(p: &Parsed) {
        assert_eq!(p.server_id, Some(SERVER));
        assert_eq!(p.mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(p.router, Some(SERVER));
        assert_eq!(p.dns, Some(vec![SERVER]));
        assert_eq!(p.lease, Some(3600));
        assert_eq!(p.opt(58), Some(&1800u32.to_be_bytes()[..]));
        assert_eq!(p.opt(59), Some(&3150u32.to_be_bytes()[..]));
        assert_eq!(p.opt(26), Some(&1400u16.to_be_bytes()[..]));
        assert_eq!(p.opt(15), Some(&b"example.internal"[..]));
        let search: &[u8] = b"\x07example\x08internal\x00\x04corp\x07example\x03com\x00";
        assert_eq!(p.opt(119), Some(search));
        // No client identifier echoed (RFC 2131 table 3).
        assert_eq!(p.opt(61), None);
    }

    #[test]
    fn full_dora_for_two_macs() {
        let mut s = DhcpServer::new(cfg());
        let (reply, offer) = exchange(&mut s, t(0), &discover(MAC_A));
        assert_eq!(offer.kind, MessageType::Offer);
        assert_eq!(offer.yiaddr, Ipv4Addr::new(192, 168, 65, 3));
        assert_eq!(offer.xid, 0x1234_5678);
        assert_eq!(offer.chaddr, MAC_A);
        assert_eq!(offer.kinds()[0], 53);
        check_config_options(&offer);
        // Unicast to yiaddr at chaddr without the broadcast flag.
        assert_eq!(reply.dst_ip, offer.yiaddr);
        assert_eq!(reply.dst_mac, MAC_A);
        assert_eq!(s.lease(MAC_A), None, "an offer is not a lease");

        let (_, ack) = exchange(&mut s, t(1), &select(MAC_A, offer.yiaddr, SERVER));
        assert_eq!(ack.kind, MessageType::Ack);
        assert_eq!(ack.yiaddr, offer.yiaddr);
        check_config_options(&ack);
        assert_eq!(s.lease(MAC_A), Some(offer.yiaddr));

        let b = dora(&mut s, t(2), MAC_B);
        assert_ne!(b, offer.yiaddr);
        let pool = u32::from(cfg().first)..=u32::from(cfg().last);
        assert!(pool.contains(&u32::from(b)));
        assert_eq!(b, Ipv4Addr::new(192, 168, 65, 4));
        assert_eq!(
            s.leases().collect::<Vec<_>>(),
            vec![(MAC_A, offer.yiaddr), (MAC_B, b)]
        );
    }

    #[test]
    fn a_preferred_address_is_offered_while_free() {
        let mut s = DhcpServer::new(cfg());
        let want = Ipv4Addr::new(192, 168, 65, 50);
        assert_eq!(s.prefer(t(0), MAC_A, want), Ok(()));
        let (_, offer) = exchange(&mut s, t(0), &discover(MAC_A));
        assert_eq!(offer.yiaddr, want);
        // Held by A now: B cannot prefer it, and out-of-pool addresses are refused.
        assert_eq!(s.prefer(t(0), MAC_B, want), Err(DhcpError::Taken(want)));
        let gw = Ipv4Addr::new(192, 168, 65, 1);
        assert_eq!(s.prefer(t(0), MAC_B, gw), Err(DhcpError::NotInPool(gw)));
        let outside = Ipv4Addr::new(10, 0, 0, 5);
        assert_eq!(
            s.prefer(t(0), MAC_B, outside),
            Err(DhcpError::NotInPool(outside))
        );
        // B gets the usual lowest free address.
        let (_, offer_b) = exchange(&mut s, t(0), &discover(MAC_B));
        assert_eq!(offer_b.yiaddr, Ipv4Addr::new(192, 168, 65, 3));
    }

    #[test]
    fn dns_servers_capped_and_optional_options_absent() {
        let mut c = cfg();
        c.dns_servers = (1..=5).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        c.domain_name = None;
        c.search = Vec::new();
        let mut s = DhcpServer::new(c);
        let (_, offer) = exchange(&mut s, t(0), &discover(MAC_A));
        let want: Vec<_> = (1..=3).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(offer.dns, Some(want));
        assert_eq!(offer.opt(15), None);
        assert_eq!(offer.opt(119), None);
        assert!(offer.opt(26).is_some());
    }

    #[test]
    fn long_search_list_is_dropped_to_fit_max_size() {
        let mut c = cfg();
        c.search = (0..20)
            .map(|i| format!("domain-number-{i}.example.com"))
            .collect();
        let mut s = DhcpServer::new(c);
        // Default limit (576): the search list does not fit and is left out.
        let (_, offer) = exchange(&mut s, t(0), &discover(MAC_A));
        assert_eq!(offer.opt(119), None);
        assert!(offer.opt(15).is_some() && offer.opt(26).is_some());
        // A client accepting 1500 bytes gets it, split across several options 119.
        let mut out = Vec::new();
        let big = msg(MessageType::Discover, MAC_A, |r| r.max_size = Some(1500));
        let reply = s.handle(t(0), &big, &mut out).unwrap().unwrap();
        assert!(reply.len <= 1500 - IP_UDP_HEADERS);
        let p = parse(&out);
        let search: Vec<u8> = p
            .options
            .iter()
            .filter(|(k, _)| *k == 119)
            .flat_map(|(_, d)| d.iter().copied())
            .collect();
        assert!(p.kinds().iter().filter(|k| **k == 119).count() > 1);
        assert!(search.starts_with(b"\x0fdomain-number-0\x07example\x03com\x00"));
    }

    #[test]
    fn same_mac_gets_same_address_after_release_and_expiry() {
        let mut s = DhcpServer::new(cfg());
        let a = dora(&mut s, t(0), MAC_A);
        let b = dora(&mut s, t(0), MAC_B);
        let release = msg(MessageType::Release, MAC_A, |r| {
            r.client_ip = a;
            r.server_identifier = Some(SERVER);
        });
        no_reply(&mut s, t(10), &release);
        assert_eq!(s.lease(MAC_A), None);
        assert_eq!(dora(&mut s, t(20), MAC_A), a);
        // After expiry too, even though another MAC arrived meanwhile.
        let c = dora(&mut s, t(100_000), [0x02, 0, 0, 0, 0, 0xc]);
        assert!(c != a && c != b);
        assert_eq!(dora(&mut s, t(200_000), MAC_B), b);
        // release_mac forgets: the address goes to the next newcomer.
        s.release_mac(MAC_A);
        assert_eq!(s.lease(MAC_A), None);
        assert_eq!(dora(&mut s, t(200_001), [0x02, 0, 0, 0, 0, 0xd]), a);
    }

    #[test]
    fn requested_ip_in_discover_is_honoured_when_free() {
        let mut s = DhcpServer::new(cfg());
        let a = dora(&mut s, t(0), MAC_A);
        let want = Ipv4Addr::new(192, 168, 65, 77);
        let d = msg(MessageType::Discover, MAC_B, |r| {
            r.requested_ip = Some(want)
        });
        assert_eq!(exchange(&mut s, t(1), &d).1.yiaddr, want);
        // Taken, reserved or outside the pool: lowest free instead.
        for bad in [a, HOST, SERVER, Ipv4Addr::new(10, 0, 0, 5)] {
            let d = msg(MessageType::Discover, [2, 0, 0, 0, 1, 1], |r| {
                r.requested_ip = Some(bad)
            });
            assert_eq!(
                exchange(&mut s, t(1), &d).1.yiaddr,
                Ipv4Addr::new(192, 168, 65, 4)
            );
        }
    }

    #[test]
    fn init_reboot_and_renew() {
        let mut s = DhcpServer::new(cfg());
        // INIT-REBOOT for a free pool address: ACK.
        let ip = Ipv4Addr::new(192, 168, 65, 50);
        let r = msg(MessageType::Request, MAC_A, |r| r.requested_ip = Some(ip));
        let (reply, ack) = exchange(&mut s, t(0), &r);
        assert_eq!(ack.kind, MessageType::Ack);
        assert_eq!(reply.dst_ip, ip);
        // RENEWING: ciaddr, unicast back to it.
        let r = msg(MessageType::Request, MAC_A, |r| r.client_ip = ip);
        let (reply, ack) = exchange(&mut s, t(1800), &r);
        assert_eq!(ack.kind, MessageType::Ack);
        assert_eq!((ack.yiaddr, reply.dst_ip, reply.dst_mac), (ip, ip, MAC_A));
        assert_eq!(ack.ciaddr, ip);
        // Neither: no reply.
        let r = msg(MessageType::Request, MAC_A, |_| {});
        let mut out = Vec::new();
        assert_eq!(
            s.handle(t(2), &r, &mut out),
            Err(DhcpError::NoRequestedAddress)
        );
    }

    #[test]
    fn request_foreign_or_taken_address_is_naked() {
        let mut s = DhcpServer::new(cfg());
        let a = dora(&mut s, t(0), MAC_A);
        for (ip, sid) in [
            (Ipv4Addr::new(10, 0, 0, 9), Some(SERVER)),
            (Ipv4Addr::new(10, 0, 0, 9), None),
            (HOST, None),
            (a, Some(SERVER)),
            (a, None),
        ] {
            let r = msg(MessageType::Request, MAC_B, |r| {
                r.requested_ip = Some(ip);
                r.server_identifier = sid;
            });
            let mut out = Vec::new();
            let reply = s.handle(t(1), &r, &mut out).unwrap().unwrap();
            let nak = parse(&out);
            assert_eq!(nak.kind, MessageType::Nak, "{ip}");
            assert_eq!(nak.yiaddr, Ipv4Addr::UNSPECIFIED);
            assert_eq!(nak.kinds(), vec![53, 54]);
            assert_eq!(
                (reply.dst_ip, reply.dst_mac),
                (Ipv4Addr::BROADCAST, [0xff; 6])
            );
        }
        assert_eq!(s.lease(MAC_A), Some(a));
        assert_eq!(s.lease(MAC_B), None);
    }

    #[test]
    fn request_for_another_server_gets_no_reply() {
        let mut s = DhcpServer::new(cfg());
        let (_, offer) = exchange(&mut s, t(0), &discover(MAC_A));
        no_reply(
            &mut s,
            t(1),
            &select(MAC_A, offer.yiaddr, Ipv4Addr::new(192, 168, 65, 9)),
        );
        assert_eq!(s.lease(MAC_A), None);
        // Release/decline naming another server are ignored too.
        let decline = msg(MessageType::Decline, MAC_A, |r| {
            r.requested_ip = Some(offer.yiaddr);
            r.server_identifier = Some(Ipv4Addr::new(192, 168, 65, 9));
        });
        no_reply(&mut s, t(1), &decline);
        assert_eq!(
            exchange(&mut s, t(2), &discover(MAC_A)).1.yiaddr,
            offer.yiaddr
        );
    }

    #[test]
    fn declined_address_rests_for_a_lease_time() {
        let mut s = DhcpServer::new(cfg());
        let a = dora(&mut s, t(0), MAC_A);
        let decline = msg(MessageType::Decline, MAC_A, |r| {
            r.requested_ip = Some(a);
            r.server_identifier = Some(SERVER);
        });
        no_reply(&mut s, t(1), &decline);
        assert_eq!(s.lease(MAC_A), None);
        let a2 = dora(&mut s, t(2), MAC_A);
        assert_ne!(a2, a);
        assert_ne!(dora(&mut s, t(3), MAC_B), a);
        let r = msg(MessageType::Request, [2, 0, 0, 0, 1, 1], |r| {
            r.requested_ip = Some(a)
        });
        assert_eq!(exchange(&mut s, t(4), &r).1.kind, MessageType::Nak);
        // After a lease time it is usable again.
        assert_eq!(exchange(&mut s, t(3602), &r).1.kind, MessageType::Ack);
        // A client cannot decline someone else's address.
        let steal = msg(MessageType::Decline, MAC_A, |r| r.requested_ip = Some(a));
        no_reply(&mut s, t(3603), &steal);
        assert!(s.leases().any(|(_, ip)| ip == a));
    }

    #[test]
    fn inform_gets_ack_without_address_or_lease() {
        let mut s = DhcpServer::new(cfg());
        let ip = Ipv4Addr::new(192, 168, 65, 200);
        let inform = msg(MessageType::Inform, MAC_A, |r| r.client_ip = ip);
        let (reply, ack) = exchange(&mut s, t(0), &inform);
        assert_eq!(ack.kind, MessageType::Ack);
        assert_eq!(ack.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(ack.lease, None);
        assert_eq!(ack.opt(58), None);
        assert_eq!(ack.mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(ack.opt(26), Some(&1400u16.to_be_bytes()[..]));
        assert_eq!((reply.dst_ip, reply.dst_mac), (ip, MAC_A));
        assert_eq!(s.leases().count(), 0);
    }

    #[test]
    fn pool_exhaustion_and_reuse_of_expired_bindings() {
        let mut c = cfg();
        // A /29-sized pool: .3 to .10 minus the reserved .5.
        c.last = Ipv4Addr::new(192, 168, 65, 10);
        c.reserved = vec![Ipv4Addr::new(192, 168, 65, 5)];
        let mut s = DhcpServer::new(c);
        let mut got = Vec::new();
        for i in 0..7u8 {
            got.push(dora(&mut s, t(u64::from(i)), [2, 0, 0, 0, 0, i]));
        }
        let want: Vec<_> = [3, 4, 6, 7, 8, 9, 10]
            .map(|n| Ipv4Addr::new(192, 168, 65, n))
            .into();
        assert_eq!(got, want);
        let mut out = vec![9];
        let late = discover([2, 0, 0, 0, 0, 99]);
        assert_eq!(
            s.handle(t(10), &late, &mut out),
            Err(DhcpError::PoolExhausted)
        );
        assert!(out.is_empty());
        // Bounded: a flood of MACs does not grow the table.
        for i in 0..1000u16 {
            let [x, y] = i.to_be_bytes();
            let _ = s.handle(t(11), &discover([2, 1, 0, 0, x, y]), &mut out);
        }
        assert_eq!(s.bindings.len(), 7);
        assert_eq!(s.owners.len(), 7);
        // Once the leases expire, the least recently seen MAC's address is reused.
        let (_, offer) = exchange(&mut s, t(5000), &late);
        assert_eq!(offer.yiaddr, Ipv4Addr::new(192, 168, 65, 3));
        assert_eq!(s.bindings.len(), 7);
    }

    #[test]
    fn broadcast_flag_means_broadcast_reply() {
        let mut s = DhcpServer::new(cfg());
        let d = msg(MessageType::Discover, MAC_A, |r| r.broadcast = true);
        let (reply, offer) = exchange(&mut s, t(0), &d);
        assert_eq!(
            (reply.dst_ip, reply.dst_mac),
            (Ipv4Addr::BROADCAST, [0xff; 6])
        );
        assert!(offer.broadcast);
        assert_eq!(offer.ciaddr, Ipv4Addr::UNSPECIFIED);
        let r = msg(MessageType::Request, MAC_A, |r| {
            r.broadcast = true;
            r.requested_ip = Some(offer.yiaddr);
            r.server_identifier = Some(SERVER);
        });
        let (reply, ack) = exchange(&mut s, t(0), &r);
        assert_eq!(ack.kind, MessageType::Ack);
        assert_eq!(reply.dst_ip, Ipv4Addr::BROADCAST);
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let mut s = DhcpServer::new(cfg());
        let mut out = vec![7];
        let good = discover(MAC_A);
        assert_eq!(s.handle(t(0), &[], &mut out), Err(DhcpError::Malformed));
        assert!(out.is_empty());
        // Every truncation: an error, never a panic.
        for n in 0..good.len() {
            let r = s.handle(t(0), &good[..n], &mut out);
            assert!(r.is_err(), "prefix {n}: {r:?}");
        }
        assert!(s.bindings.is_empty());

        let mut bad = good.clone();
        bad[0] = 2;
        assert_eq!(
            s.handle(t(0), &bad, &mut out),
            Err(DhcpError::NotBootRequest)
        );
        let mut bad = good.clone();
        bad[236..240].copy_from_slice(&[0; 4]);
        assert_eq!(
            s.handle(t(0), &bad, &mut out),
            Err(DhcpError::BadMagicCookie)
        );
        let mut bad = good.clone();
        bad.truncate(240);
        bad.push(255);
        assert_eq!(
            s.handle(t(0), &bad, &mut out),
            Err(DhcpError::NoMessageType)
        );
        let mut bad = good.clone();
        bad[242] = 2; // DHCPOFFER from a client
        assert_eq!(bad[240], 53);
        assert_eq!(
            s.handle(t(0), &bad, &mut out),
            Err(DhcpError::UnsupportedMessageType(2))
        );
        let mut bad = good.clone();
        bad[1] = 6; // htype IEEE 802
        assert_eq!(s.handle(t(0), &bad, &mut out), Err(DhcpError::Malformed));
        let mut bad = good.clone();
        bad[2] = 16; // hlen
        assert_eq!(s.handle(t(0), &bad, &mut out), Err(DhcpError::Malformed));
        let bad = msg(MessageType::Discover, [0xff; 6], |_| {});
        assert_eq!(
            s.handle(t(0), &bad, &mut out),
            Err(DhcpError::BadClientAddress)
        );
        // An option running past the end.
        let mut bad = good.clone();
        bad.truncate(243);
        bad.extend_from_slice(&[50, 200, 1, 2]);
        assert_eq!(s.handle(t(0), &bad, &mut out), Err(DhcpError::Malformed));
        // Missing END.
        assert_eq!(
            s.handle(t(0), &good[..good.len() - 1], &mut out),
            Err(DhcpError::Malformed)
        );
        // Padding after END and unknown options are fine.
        let mut ok = good[..240].to_vec();
        ok.extend_from_slice(&[0, 0, 200, 3, 1, 2, 3, 53, 1, 1, 255, 0, 0, 0]);
        assert!(s.handle(t(0), &ok, &mut out).unwrap().is_some());
        assert!(s.bindings.len() == 1);
    }

    #[test]
    fn fuzzish_random_bytes_never_panic() {
        let mut s = DhcpServer::new(cfg());
        let good = select(MAC_A, Ipv4Addr::new(192, 168, 65, 3), SERVER);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut out = Vec::new();
        for i in 0..20_000u32 {
            let mut p = good.clone();
            for _ in 0..(i % 8) + 1 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % p.len();
                p[at] = (x >> 32) as u8;
            }
            p.truncate(p.len() - (x >> 40) as usize % 16);
            if let Ok(Some(r)) = s.handle(t(u64::from(i)), &p, &mut out) {
                assert_eq!(r.len, out.len());
                assert!(out.len() <= MIN_DATAGRAM - IP_UDP_HEADERS);
            }
        }
        assert!(s.bindings.len() <= 252);
    }

    #[test]
    fn encode_name_rejects_invalid() {
        assert_eq!(encode_name("a.b").unwrap(), b"\x01a\x01b\x00");
        assert_eq!(encode_name("a.b.").unwrap(), b"\x01a\x01b\x00");
        assert!(encode_name("").is_none());
        assert!(encode_name("a..b").is_none());
        assert!(encode_name(&"x".repeat(64)).is_none());
        let long = vec!["abcdefghij"; 30].join(".");
        assert!(encode_name(&long).is_none());
    }

    #[test]
    fn server_config_from_stack_config() {
        let c = DhcpServerConfig::from_config(&Config::default());
        assert_eq!(c.server_ip, Ipv4Addr::new(192, 168, 65, 1));
        assert_eq!(c.reserved, vec![Ipv4Addr::new(192, 168, 65, 2)]);
        let mut s = DhcpServer::new(c);
        assert_eq!(dora(&mut s, t(0), MAC_A), Ipv4Addr::new(192, 168, 65, 3));
    }
}
