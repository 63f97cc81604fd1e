//! The top-level state machine: the switch in front, smoltcp for the guest side of TCP,
//! and our own NAT for UDP and ICMP echo.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use rand_chacha::rand_core::{Rng as _, SeedableRng};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress, HardwareAddress, IpCidr};

use crate::config::{Config, ConfigError};
use crate::device::{
    write_eth, FrameQueue, GuestDevice, Neighbors, BROADCAST_MAC, ETHERTYPE_ARP, ETHERTYPE_IPV4,
    ETH_HDR,
};
use crate::dhcp::{DhcpServer, DhcpServerConfig};
use crate::dns::Dns;
use crate::icmp::{PingFlow, PingKey};
use crate::stats::{DropReason, Stats};
use crate::tcp::{Phase, TcpFlow, TcpFlowInfo, TcpKey};
use crate::udp::UdpFlow;
use crate::wire::{self, IcmpEcho, Ipv4, TcpPorts, Udp};
use crate::Rng;

#[path = "gateway_dns.rs"]
mod gateway_dns;
use gateway_dns::DnsTcpUpstream;
pub use gateway_dns::ResolveRequest;

#[path = "proxy_flow.rs"]
mod proxy_flow;
use crate::proxy::ProxyConfig;

/// Names one flow (TCP connection, UDP NAT entry or ping session) in commands and events.
/// Never reused within one [`Stack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId(pub u64);

/// One guest's open flows, by protocol ([`Stack::flows_by_guest`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestFlows {
    pub tcp: usize,
    pub udp: usize,
    pub ping: usize,
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Why a host connect failed. Every kind ends the same way for the guest (a RST); the
/// kind is kept for counters and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectError {
    Refused,
    Unreachable,
    TimedOut,
    Other,
}

/// Why a connection into the guest could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundError {
    /// The flow table is full.
    FlowLimit,
    /// A flow with the same addresses and ports exists.
    Busy,
    /// The guest address or port cannot be connected to (port 0, not unicast, or IPv6
    /// until the IPv6 packet path exists).
    Unaddressable,
}

impl fmt::Display for InboundError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InboundError::FlowLimit => "the flow table is full",
            InboundError::Busy => "a flow with the same addresses exists",
            InboundError::Unaddressable => "the guest address or port cannot be connected to",
        })
    }
}

impl std::error::Error for InboundError {}

/// Work for the host side. Borrowed payloads are valid until the next `poll_command`.
#[derive(Debug, PartialEq, Eq)]
pub enum HostCommand<'a> {
    /// Open a TCP connection to `dst`; answer with [`Stack::tcp_connected`] or
    /// [`Stack::tcp_connect_failed`].
    TcpConnect { flow: FlowId, dst: SocketAddr },
    /// The flow has bytes for the host ([`Stack::tcp_to_host`]) or room again for host
    /// bytes ([`Stack::tcp_from_host`]): move what can be moved now.
    TcpReady { flow: FlowId },
    /// The guest finished sending and every byte was handed over: shut down the host
    /// socket's write side (the other direction keeps flowing).
    TcpShutdownWrite { flow: FlowId },
    /// Both directions are finished: close the host socket and forget the flow.
    TcpClose { flow: FlowId },
    /// Reset the host connection (or cancel the connect) and forget the flow.
    TcpAbort { flow: FlowId },
    /// Send a datagram from this flow's host socket (open one on first use).
    UdpSend {
        flow: FlowId,
        dst: SocketAddr,
        payload: &'a [u8],
    },
    /// The NAT entry expired or was evicted: close its host socket.
    UdpClose { flow: FlowId },
    /// Send an ICMP echo request from this flow's ping socket (open one on first use).
    PingSend {
        flow: FlowId,
        dst: IpAddr,
        seq: u16,
        payload: &'a [u8],
    },
    /// The ping session expired: close its socket.
    PingClose { flow: FlowId },
}

/// An owned command in the queue; payloads live in the command arena.
#[derive(Debug)]
enum Cmd {
    TcpConnect(FlowId, SocketAddr),
    TcpReady(FlowId),
    TcpShutdownWrite(FlowId),
    TcpClose(FlowId),
    TcpAbort(FlowId),
    UdpSend(FlowId, SocketAddr, std::ops::Range<usize>),
    UdpClose(FlowId),
    PingSend(FlowId, IpAddr, u16, std::ops::Range<usize>),
    PingClose(FlowId),
}

/// The sans-IO network stack for one virtual switch.
pub struct Stack {
    config: Config,
    iface: Interface,
    sockets: Sockets,
    /// When smoltcp next needs an egress pass for a timer (retransmission, delayed ACK,
    /// keep-alive), as of the last pass; valid while `sockets` is untouched.
    egress_at: Option<Instant>,
    frames: FrameQueue,
    neighbors: Neighbors,
    stats: Stats,
    dhcp: DhcpServer,
    rng: Rng,
    next_flow: u64,
    ip_ident: u16,

    tcp: BTreeMap<FlowId, TcpFlow>,
    tcp_by_key: BTreeMap<TcpKey, FlowId>,
    tcp_pending: usize,
    /// Flows whose state may have changed since the last `poll`.
    dirty: Vec<FlowId>,
    all_dirty: bool,

    udp: BTreeMap<FlowId, UdpFlow>,
    udp_by_guest: BTreeMap<SocketAddr, FlowId>,
    /// Port-forward flows by (guest address, the client's address as the guest sees it).
    udp_inbound: BTreeMap<(SocketAddr, SocketAddr), FlowId>,
    /// No UDP entry expires before this (a lower bound, refreshed when reached).
    udp_next_expiry: Option<Instant>,

    pings: BTreeMap<FlowId, PingFlow>,
    ping_by_key: BTreeMap<PingKey, FlowId>,
    ping_next_expiry: Option<Instant>,

    /// The gateway's DNS service.
    dns: Option<Dns>,
    /// Internal UDP flows that carry DNS queries upstream, per family (IPv4, IPv6).
    dns_udp: [Option<FlowId>; 2],
    /// DNS-over-TCP exchanges with upstreams, one connection per query.
    dns_tcp: BTreeMap<FlowId, DnsTcpUpstream>,
    resolves: VecDeque<ResolveRequest>,
    /// Servicing flows queued bytes or a close that the next egress pass must send.
    egress_pending: bool,
    /// The transparent/explicit proxy (`None`: no interception).
    proxy: Option<ProxyConfig>,
    /// TCP flows with proxy state.
    proxy_flows: usize,
    /// Proxied flows whose host connect runs (they count against the pending limit).
    proxy_connecting: usize,

    commands: VecDeque<Cmd>,
    arena: Vec<u8>,
    scratch: Vec<u8>,
    last_now: Instant,
}

/// smoltcp's sockets, noting whether any may have changed since the last egress pass.
/// A pass walks every socket (and `poll_at` again after it), so a poll that follows no
/// change and no due timer skips it: on a request/response exchange that halves the
/// passes. Every mutable access counts as a change; reads go through [`Sockets::get`].
struct Sockets {
    set: SocketSet<'static>,
    touched: bool,
}

impl Sockets {
    fn get<T: smoltcp::socket::AnySocket<'static>>(&self, h: SocketHandle) -> &T {
        self.set.get(h)
    }

    fn get_mut<T: smoltcp::socket::AnySocket<'static>>(&mut self, h: SocketHandle) -> &mut T {
        self.touched = true;
        self.set.get_mut(h)
    }

    fn add(&mut self, socket: tcp::Socket<'static>) -> SocketHandle {
        self.touched = true;
        self.set.add(socket)
    }

    fn remove(&mut self, h: SocketHandle) {
        self.touched = true;
        self.set.remove(h);
    }

    /// The whole set, for smoltcp's ingress (which may change any socket).
    fn set_mut(&mut self) -> &mut SocketSet<'static> {
        self.touched = true;
        &mut self.set
    }
}

/// Arena bytes kept across polls at most; a burst beyond is released.
const ARENA_KEEP: usize = 1 << 20;
/// smoltcp egress passes per poll at most (each sends up to one segment per flow).
const EGRESS_PASSES: usize = 64;
/// Frames for the guest queued by one poll at most, in bytes: beyond, the owner drains
/// the queue first (backpressure from a slow guest link).
const EGRESS_QUEUE_BYTES: usize = 2 << 20;
/// A guest silent for this long (keep-alives unanswered, data unacknowledged) is gone.
pub const TCP_GUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Keep-alive interval towards the guest on idle flows (Linux's `tcp_keepalive_intvl`).
pub const TCP_KEEP_ALIVE: Duration = Duration::from_secs(75);

impl Stack {
    /// A stack for `config`. `rng` seeds everything random (TCP initial sequence numbers,
    /// IP identifiers): the same seed, inputs and times give the same outputs.
    pub fn new(config: Config, mut rng: Rng, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut frames = FrameQueue::default();
        let neighbors = Neighbors::default();
        let mut stats = Stats::default();
        let iface = Self::build_iface(&config, &mut rng, &mut frames, &neighbors, &mut stats, now);
        let mut reserved = vec![config.gateway];
        reserved.extend(config.host_alias);
        let dhcp = DhcpServer::new(DhcpServerConfig {
            server_ip: config.gateway,
            subnet: config.subnet,
            router: config.gateway,
            dns_servers: config.dhcp.dns_servers.clone(),
            first: config.first_guest,
            last: config.last_guest,
            reserved,
            lease_time: config.dhcp.lease_time,
            domain_name: config.dhcp.domain_name.clone(),
            search: config.dhcp.search.clone(),
            mtu: config.mtu,
        });
        let ip_ident = rng.next_u32() as u16;
        // Its own stream, so that DNS traffic does not shift every other random choice.
        let dns = config
            .dns
            .clone()
            .map(|c| Dns::new(c, Rng::seed_from_u64(rng.next_u64())));
        Ok(Stack {
            config,
            iface,
            sockets: Sockets {
                set: SocketSet::new(Vec::new()),
                touched: false,
            },
            egress_at: None,
            frames,
            neighbors,
            stats,
            dhcp,
            rng,
            next_flow: 1,
            ip_ident,
            tcp: BTreeMap::new(),
            tcp_by_key: BTreeMap::new(),
            tcp_pending: 0,
            dirty: Vec::new(),
            all_dirty: false,
            udp: BTreeMap::new(),
            udp_by_guest: BTreeMap::new(),
            udp_inbound: BTreeMap::new(),
            udp_next_expiry: None,
            pings: BTreeMap::new(),
            ping_by_key: BTreeMap::new(),
            ping_next_expiry: None,
            dns,
            dns_udp: [None; 2],
            dns_tcp: BTreeMap::new(),
            resolves: VecDeque::new(),
            egress_pending: false,
            proxy: None,
            proxy_flows: 0,
            proxy_connecting: 0,
            commands: VecDeque::new(),
            arena: Vec::new(),
            scratch: Vec::new(),
            last_now: now,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The DHCP leases handed out, by MAC address.
    pub fn leases(&self) -> impl Iterator<Item = ([u8; 6], Ipv4Addr)> + '_ {
        self.dhcp.leases()
    }

    /// A seeded random number for the owner's own protocol choices (e.g. DNS IDs).
    pub fn random_u32(&mut self) -> u32 {
        self.rng.next_u32()
    }

    fn new_flow_id(&mut self) -> FlowId {
        let id = FlowId(self.next_flow);
        self.next_flow += 1;
        id
    }

    fn next_ident(&mut self) -> u16 {
        self.ip_ident = self.ip_ident.wrapping_add(1);
        self.ip_ident
    }

    // ---------------------------------------------------------------- guest input

    /// Take one Ethernet frame from the guest. Replies and host commands come out of
    /// [`Stack::poll`] and the drains; call `poll` after a batch of inputs.
    pub fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
        self.last_now = now;
        self.stats.frames_in += 1;
        self.stats.bytes_in += frame.len() as u64;
        if let Err(reason) = self.switch(now, frame) {
            self.stats.drop(reason);
        }
    }

    fn switch(&mut self, now: Instant, frame: &[u8]) -> Result<(), DropReason> {
        if frame.len() < ETH_HDR {
            return Err(DropReason::Truncated);
        }
        let dst: [u8; 6] = frame[0..6].try_into().expect("6 bytes");
        let src: [u8; 6] = frame[6..12].try_into().expect("6 bytes");
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        if src[0] & 1 == 1 {
            // A multicast source address is never legitimate.
            return Err(DropReason::Malformed);
        }
        let for_us = dst == self.config.gateway_mac;
        if !for_us && dst != BROADCAST_MAC {
            return Err(if dst[0] & 1 == 1 {
                DropReason::NotUnicast
            } else {
                DropReason::UnknownDestination
            });
        }
        let payload = &frame[ETH_HDR..];
        match ethertype {
            ETHERTYPE_ARP => self.handle_arp(src, payload),
            ETHERTYPE_IPV4 => {
                let ip = Ipv4::parse(payload)?;
                if ip.packet.len() > usize::from(self.config.mtu) {
                    // Path MTU discovery for the guest: it sent more than the link carries
                    // now (the MTU may have shrunk under it). A DF packet is answered with
                    // "fragmentation needed" naming the MTU, as a router would.
                    if ip.dont_frag && !ip.src.is_unspecified() {
                        self.learn(ip.src, src);
                        self.send_frag_needed(&ip);
                    }
                    return Err(DropReason::TooBig);
                }
                if !ip.src.is_unspecified() {
                    self.learn(ip.src, src);
                }
                self.handle_ipv4(now, src, for_us, ip)
            }
            _ => Err(DropReason::UnknownEthertype),
        }
    }

    fn handle_arp(&mut self, src_mac: [u8; 6], payload: &[u8]) -> Result<(), DropReason> {
        let packet = ArpPacket::new_checked(payload).map_err(|_| DropReason::Truncated)?;
        let repr = ArpRepr::parse(&packet).map_err(|_| DropReason::Malformed)?;
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = repr
        else {
            return Err(DropReason::Malformed);
        };
        if source_hardware_addr.0 != src_mac {
            return Err(DropReason::Malformed);
        }
        self.learn(source_protocol_addr, src_mac);
        let ours = target_protocol_addr == self.config.gateway
            || Some(target_protocol_addr) == self.config.host_alias;
        if operation != ArpOperation::Request || !ours {
            return Ok(());
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(self.config.gateway_mac),
            source_protocol_addr: target_protocol_addr,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let gw = self.config.gateway_mac;
        self.frames.push_with(ETH_HDR + reply.buffer_len(), |f| {
            write_eth(f, src_mac, gw, ETHERTYPE_ARP);
            reply.emit(&mut ArpPacket::new_unchecked(&mut f[ETH_HDR..]));
        });
        self.stats.arp_replies += 1;
        Ok(())
    }

    fn handle_ipv4(
        &mut self,
        now: Instant,
        src_mac: [u8; 6],
        for_us: bool,
        ip: Ipv4<'_>,
    ) -> Result<(), DropReason> {
        // DHCP is the one thing a guest may send before it has an address, and broadcast.
        if ip.protocol == wire::PROTO_UDP {
            let udp = Udp::parse(&ip)?;
            if udp.dst_port == 67 && (ip.dst.is_broadcast() || ip.dst == self.config.gateway) {
                return self.handle_dhcp(now, src_mac, udp.payload);
            }
            if !for_us || !self.unicast_dst(ip.dst) || ip.src.is_unspecified() {
                return Err(DropReason::NotUnicast);
            }
            return self.handle_udp(now, &ip, &udp);
        }
        if !for_us || !self.unicast_dst(ip.dst) || ip.src.is_unspecified() {
            return Err(DropReason::NotUnicast);
        }
        match ip.protocol {
            wire::PROTO_TCP => self.handle_tcp(now, &ip),
            wire::PROTO_ICMP => self.handle_icmp(now, &ip),
            _ => Err(DropReason::UnsupportedProtocol),
        }
    }

    fn unicast_dst(&self, dst: Ipv4Addr) -> bool {
        !(dst.is_broadcast()
            || dst.is_multicast()
            || dst.is_unspecified()
            || dst == self.config.subnet.broadcast())
    }

    /// Where a destination the guest names is reached on the host.
    fn host_target(&self, dst: IpAddr) -> IpAddr {
        if self.config.host_alias.map(IpAddr::V4) == Some(dst) {
            self.config.host_loopback
        } else {
            dst
        }
    }

    /// Push an IPv4 packet of `ip_len` bytes for `dst`, built by `fill`.
    fn push_ip(&mut self, dst: Ipv4Addr, ip_len: usize, fill: impl FnOnce(&mut [u8])) {
        let mac = self.neighbors.get(dst);
        let gw = self.config.gateway_mac;
        self.frames.push_with(ETH_HDR + ip_len, |f| {
            write_eth(f, mac.unwrap_or(BROADCAST_MAC), gw, ETHERTYPE_IPV4);
            fill(&mut f[ETH_HDR..]);
        });
        if mac.is_none() && self.frames.park_last(dst) {
            self.stats.drop(DropReason::NoNeighbor);
        }
        self.send_wanted_arp();
    }

    /// ARP requests for the addresses frames are waiting for.
    fn send_wanted_arp(&mut self) {
        for ip in std::mem::take(&mut self.frames.arp_wanted) {
            self.send_arp_request(ip);
        }
    }

    /// Remember where a guest is, and send what was waiting for it.
    fn learn(&mut self, ip: Ipv4Addr, mac: [u8; 6]) {
        if self.neighbors.learn(ip, mac) {
            self.frames.release(ip, mac);
        }
    }

    fn send_frag_needed(&mut self, ip: &Ipv4<'_>) {
        let len = wire::icmp_frag_needed_len(ip.packet);
        let ident = self.next_ident();
        let (gw, dst, mtu) = (self.config.gateway, ip.src, self.config.mtu);
        let original = ip.packet;
        self.push_ip(dst, len, |b| {
            wire::emit_icmp_frag_needed(b, gw, dst, mtu, original, ident)
        });
    }

    /// Change the guest link's MTU while running (the link was renegotiated, or the
    /// operator learnt it is smaller). smoltcp reads the MTU once, at interface creation,
    /// so the interface is rebuilt; sockets live apart from it and keep their state, and
    /// their next segments (retransmissions included) fit the new MTU.
    pub fn set_mtu(&mut self, now: Instant, mtu: u16) -> Result<(), ConfigError> {
        let mut config = self.config.clone();
        config.mtu = mtu;
        config.validate()?;
        self.config = config;
        self.iface = Self::build_iface(
            &self.config,
            &mut self.rng,
            &mut self.frames,
            &self.neighbors,
            &mut self.stats,
            now,
        );
        self.all_dirty = true;
        self.sockets.touched = true;
        Ok(())
    }

    fn build_iface(
        config: &Config,
        rng: &mut Rng,
        frames: &mut FrameQueue,
        neighbors: &Neighbors,
        stats: &mut Stats,
        now: Instant,
    ) -> Interface {
        let mut iface_cfg = IfaceConfig::new(HardwareAddress::Ip);
        iface_cfg.random_seed = rng.next_u64();
        let mut device = GuestDevice {
            rx: None,
            tx: frames,
            neighbors,
            stats,
            gateway_mac: config.gateway_mac,
            mtu: usize::from(config.mtu),
        };
        let mut iface = Interface::new(iface_cfg, &mut device, now);
        // smoltcp accepts packets for any address whose route leads through one of its own
        // addresses ("any IP"): that is how it terminates guest connections to the whole
        // internet. The gateway is its address and the default route.
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(
                config.gateway.into(),
                config.subnet.prefix_len(),
            ));
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(config.gateway)
            .expect("the route table has room for one route");
        iface
    }

    // ---------------------------------------------------------------- DHCP

    fn handle_dhcp(
        &mut self,
        now: Instant,
        src_mac: [u8; 6],
        payload: &[u8],
    ) -> Result<(), DropReason> {
        let mut out = std::mem::take(&mut self.scratch);
        let result = self.dhcp.handle(now, payload, &mut out);
        let reply = match result {
            Ok(Some(reply)) => reply,
            Ok(None) => {
                self.scratch = out;
                return Ok(());
            }
            Err(_) => {
                self.scratch = out;
                return Err(DropReason::Dhcp);
            }
        };
        let dst_mac = if reply.dst_ip.is_broadcast() {
            BROADCAST_MAC
        } else {
            reply.dst_mac
        };
        let _ = src_mac;
        let gw_mac = self.config.gateway_mac;
        let gw = self.config.gateway;
        let ident = self.next_ident();
        let ip_len = wire::IPV4_HDR + wire::UDP_HDR + reply.len;
        let data = &out[..reply.len];
        self.frames.push_with(ETH_HDR + ip_len, |f| {
            write_eth(f, dst_mac, gw_mac, ETHERTYPE_IPV4);
            wire::emit_udp(&mut f[ETH_HDR..], gw, 67, reply.dst_ip, 68, data, ident);
        });
        if !reply.dst_ip.is_broadcast() {
            self.learn(reply.dst_ip, reply.dst_mac);
        }
        self.stats.dhcp_replies += 1;
        self.scratch = out;
        Ok(())
    }

    // ---------------------------------------------------------------- UDP

    fn handle_udp(&mut self, now: Instant, ip: &Ipv4<'_>, udp: &Udp<'_>) -> Result<(), DropReason> {
        let guest = SocketAddr::V4(SocketAddrV4::new(ip.src, udp.src_port));
        let to = SocketAddr::V4(SocketAddrV4::new(ip.dst, udp.dst_port));
        // A reply to a port forward's client goes back through the forward's socket.
        if let Some(&flow) = self.udp_inbound.get(&(guest, to)) {
            let entry = self.udp.get_mut(&flow).expect("indexed");
            entry.last_active = now;
            let client = entry.inbound.expect("an inbound flow").0;
            let range = self.arena_push(udp.payload);
            self.commands.push_back(Cmd::UdpSend(flow, client, range));
            return Ok(());
        }
        let dst = if ip.dst == self.config.gateway && udp.dst_port == 53 && self.dns.is_some() {
            self.dns_query_udp(now, guest, udp.payload);
            return Ok(());
        } else if ip.dst == self.config.gateway && Some(ip.dst) != self.config.host_alias {
            // Nothing else listens on the gateway.
            return Err(DropReason::UnsupportedProtocol);
        } else {
            SocketAddr::new(self.host_target(IpAddr::V4(ip.dst)), udp.dst_port)
        };
        let flow = match self.udp_by_guest.get(&guest) {
            Some(id) => *id,
            None => {
                if self.udp.len() >= self.config.udp.max_flows {
                    self.evict_oldest_udp();
                }
                let id = self.new_flow_id();
                self.udp.insert(
                    id,
                    UdpFlow {
                        guest,
                        last_active: now,
                        dns_internal: false,
                        inbound: None,
                    },
                );
                self.udp_by_guest.insert(guest, id);
                self.stats.udp_flows_opened += 1;
                let expiry = now + self.config.udp.idle_timeout;
                self.udp_next_expiry = Some(self.udp_next_expiry.map_or(expiry, |e| e.min(expiry)));
                id
            }
        };
        self.udp.get_mut(&flow).expect("indexed").last_active = now;
        let range = self.arena_push(udp.payload);
        self.commands.push_back(Cmd::UdpSend(flow, dst, range));
        Ok(())
    }

    fn evict_oldest_udp(&mut self) {
        let oldest = self
            .udp
            .iter()
            .min_by_key(|(id, f)| (f.last_active, **id))
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.remove_udp(id);
            self.stats.drop(DropReason::UdpEvicted);
        }
    }

    /// A datagram from a host client of a UDP port forward, for `guest`. The flow (one per
    /// client and guest address) carries the guest's replies back as `UdpSend` to the
    /// client, which the host sends from the forward's own socket; it expires when idle.
    pub fn udp_inbound(
        &mut self,
        now: Instant,
        client: SocketAddr,
        guest: SocketAddr,
        payload: &[u8],
    ) -> Result<FlowId, InboundError> {
        self.last_now = now;
        let visible = self.inbound_source(client)?;
        // The packet path is IPv4-only: an IPv6 guest address cannot be reached (yet).
        let guest_v4 = match guest {
            SocketAddr::V4(g) if g.port() != 0 && self.unicast_dst(*g.ip()) => g,
            _ => return Err(InboundError::Unaddressable),
        };
        let flow = match self.udp_inbound.get(&(guest, SocketAddr::V4(visible))) {
            Some(&id) => id,
            None => {
                if self.udp.len() >= self.config.udp.max_flows {
                    self.evict_oldest_udp();
                }
                let id = self.new_flow_id();
                let entry = UdpFlow {
                    guest,
                    last_active: now,
                    dns_internal: false,
                    inbound: Some((client, SocketAddr::V4(visible))),
                };
                self.udp.insert(id, entry);
                self.udp_inbound
                    .insert((guest, SocketAddr::V4(visible)), id);
                self.stats.udp_flows_opened += 1;
                let expiry = now + self.config.udp.idle_timeout;
                self.udp_next_expiry = Some(self.udp_next_expiry.map_or(expiry, |e| e.min(expiry)));
                id
            }
        };
        self.udp.get_mut(&flow).expect("indexed").last_active = now;
        self.send_udp_to_guest(visible, guest_v4, payload);
        Ok(flow)
    }

    fn remove_udp(&mut self, id: FlowId) {
        if let Some(f) = self.udp.remove(&id) {
            match f.inbound {
                Some((_, visible)) => {
                    self.udp_inbound.remove(&(f.guest, visible));
                }
                None if f.dns_internal => {}
                None => {
                    self.udp_by_guest.remove(&f.guest);
                }
            }
            self.commands.push_back(Cmd::UdpClose(id));
        }
    }

    /// A datagram arrived on a UDP flow's host socket from `from`.
    pub fn udp_from_host(&mut self, now: Instant, flow: FlowId, from: SocketAddr, payload: &[u8]) {
        self.last_now = now;
        let Some(entry) = self.udp.get_mut(&flow) else {
            self.stats.drop(DropReason::StaleHostEvent);
            return;
        };
        entry.last_active = now;
        if entry.dns_internal {
            self.dns_from_upstream_udp(now, from, payload);
            return;
        }
        let guest = entry.guest;
        let Some(src) = self.guest_visible(from) else {
            self.stats.drop(DropReason::UnsupportedProtocol);
            return;
        };
        // Flows are IPv4 until the IPv6 packet path exists: an IPv6 guest cannot arise
        // yet, and is dropped like an IPv6 peer rather than emitted.
        let SocketAddr::V4(guest) = guest else {
            self.stats.drop(DropReason::UnsupportedProtocol);
            return;
        };
        self.send_udp_to_guest(src, guest, payload);
    }

    /// A UDP datagram from `src` to the guest, fragmented if it is larger than the link.
    fn send_udp_to_guest(&mut self, src: SocketAddrV4, guest: SocketAddrV4, payload: &[u8]) {
        let ip_len = wire::IPV4_HDR + wire::UDP_HDR + payload.len();
        let ident = self.next_ident();
        if ip_len <= usize::from(self.config.mtu) {
            self.push_ip(*guest.ip(), ip_len, |b| {
                wire::emit_udp(
                    b,
                    *src.ip(),
                    src.port(),
                    *guest.ip(),
                    guest.port(),
                    payload,
                    ident,
                )
            });
            return;
        }
        // Larger than the guest link: fragment, as a router would (a DNS answer over 1472
        // bytes on a 1500-byte link is the common case).
        if ip_len > 65535 {
            self.stats.drop(DropReason::HostTooBig);
            return;
        }
        let mut seg = std::mem::take(&mut self.scratch);
        seg.clear();
        seg.resize(wire::UDP_HDR + payload.len(), 0);
        wire::emit_udp_segment(
            &mut seg,
            *src.ip(),
            src.port(),
            *guest.ip(),
            guest.port(),
            payload,
        );
        let step = (usize::from(self.config.mtu) - wire::IPV4_HDR) & !7;
        for (i, chunk) in seg.chunks(step).enumerate() {
            let offset = i * step;
            let more = offset + chunk.len() < seg.len();
            self.push_ip(*guest.ip(), wire::IPV4_HDR + chunk.len(), |b| {
                wire::emit_ipv4_fragment(
                    b,
                    *src.ip(),
                    *guest.ip(),
                    wire::PROTO_UDP,
                    ident,
                    offset,
                    more,
                    chunk,
                )
            });
        }
        self.scratch = seg;
    }

    /// The address a host-side peer appears as to the guest.
    fn guest_visible(&self, from: SocketAddr) -> Option<SocketAddrV4> {
        match (from.ip(), self.config.host_alias) {
            (ip, Some(alias)) if ip == self.config.host_loopback => {
                Some(SocketAddrV4::new(alias, from.port()))
            }
            (IpAddr::V4(v4), _) => Some(SocketAddrV4::new(v4, from.port())),
            (IpAddr::V6(_), _) => None,
        }
    }

    fn arena_push(&mut self, data: &[u8]) -> std::ops::Range<usize> {
        let start = self.arena.len();
        self.arena.extend_from_slice(data);
        start..self.arena.len()
    }

    // ---------------------------------------------------------------- ICMP

    fn handle_icmp(&mut self, now: Instant, ip: &Ipv4<'_>) -> Result<(), DropReason> {
        let Some(echo) = IcmpEcho::parse(ip)? else {
            return Err(DropReason::UnsupportedProtocol);
        };
        if !echo.request {
            return Err(DropReason::UnsupportedProtocol);
        }
        self.stats.icmp_echo_requests += 1;
        if ip.dst == self.config.gateway && Some(ip.dst) != self.config.host_alias {
            // The gateway is this stack: answering for it is the truth, not a forgery.
            let reply = IcmpEcho {
                request: false,
                ..echo
            };
            let ident = self.next_ident();
            let len = wire::IPV4_HDR + wire::ICMP_HDR + echo.data.len();
            let (src, dst) = (ip.dst, ip.src);
            self.push_ip(dst, len, |b| {
                wire::emit_icmp_echo(b, src, dst, &reply, ident)
            });
            self.stats.icmp_echo_replies += 1;
            return Ok(());
        }
        let key = PingKey {
            guest: IpAddr::V4(ip.src),
            ident: echo.ident,
            dst: IpAddr::V4(ip.dst),
        };
        let flow = match self.ping_by_key.get(&key) {
            Some(id) => *id,
            None => {
                if self.pings.len() >= self.config.icmp.max_flows {
                    return Err(DropReason::IcmpFlowLimit);
                }
                let id = self.new_flow_id();
                self.pings.insert(
                    id,
                    PingFlow {
                        key,
                        last_active: now,
                    },
                );
                self.ping_by_key.insert(key, id);
                let expiry = now + self.config.icmp.idle_timeout;
                self.ping_next_expiry =
                    Some(self.ping_next_expiry.map_or(expiry, |e| e.min(expiry)));
                id
            }
        };
        self.pings.get_mut(&flow).expect("indexed").last_active = now;
        let dst = self.host_target(IpAddr::V4(ip.dst));
        let range = self.arena_push(echo.data);
        self.commands
            .push_back(Cmd::PingSend(flow, dst, echo.seq, range));
        Ok(())
    }

    /// An echo reply arrived for a ping flow. The guest sees its own identifier.
    pub fn ping_reply(&mut self, now: Instant, flow: FlowId, seq: u16, payload: &[u8]) {
        self.last_now = now;
        let Some(p) = self.pings.get_mut(&flow) else {
            self.stats.drop(DropReason::StaleHostEvent);
            return;
        };
        p.last_active = now;
        let key = p.key;
        // Ping flows are IPv4 until the IPv6 packet path (ICMPv6) exists: an IPv6 key
        // cannot arise yet, and is dropped rather than emitted.
        let (IpAddr::V4(guest), IpAddr::V4(dst)) = (key.guest, key.dst) else {
            self.stats.drop(DropReason::UnsupportedProtocol);
            return;
        };
        let len = wire::IPV4_HDR + wire::ICMP_HDR + payload.len();
        if len > usize::from(self.config.mtu) {
            self.stats.drop(DropReason::HostTooBig);
            return;
        }
        let reply = IcmpEcho {
            request: false,
            ident: key.ident,
            seq,
            data: payload,
        };
        let ident = self.next_ident();
        self.push_ip(guest, len, |b| {
            wire::emit_icmp_echo(b, dst, guest, &reply, ident)
        });
        self.stats.icmp_echo_replies += 1;
    }

    // ---------------------------------------------------------------- TCP

    fn handle_tcp(&mut self, now: Instant, ip: &Ipv4<'_>) -> Result<(), DropReason> {
        let seg = TcpPorts::parse(ip)?;
        let key = TcpKey {
            guest: SocketAddr::V4(SocketAddrV4::new(ip.src, seg.src_port)),
            dst: SocketAddr::V4(SocketAddrV4::new(ip.dst, seg.dst_port)),
        };
        if let Some(&id) = self.tcp_by_key.get(&key) {
            let flow = self.tcp.get_mut(&id).expect("indexed");
            match flow.phase {
                // A retransmitted SYN (or anything else) while the host connect runs is
                // absorbed: the guest will retransmit, and the flow answers once connected.
                Phase::Connecting { .. } => return Ok(()),
                Phase::Open { .. } => {
                    self.feed_smoltcp(now, ip.packet);
                    self.dirty.push(id);
                    return Ok(());
                }
            }
        }
        if !(seg.syn && !seg.ack_flag && !seg.rst) {
            // Not a new connection: let smoltcp answer it (RST for a stray segment).
            self.feed_smoltcp(now, ip.packet);
            return Ok(());
        }
        let dns_service = ip.dst == self.config.gateway && seg.dst_port == 53 && self.dns.is_some();
        let proxy_kind = if self.proxy.is_some() && seg.src_port != 0 {
            self.proxy_kind(key.dst)
        } else {
            None
        };
        let refuse = if self.tcp.len() >= self.config.tcp.max_flows {
            Some(DropReason::TcpFlowLimit)
        } else if dns_service || proxy_kind.is_some() {
            None
        } else if self.tcp_pending + self.proxy_connecting >= self.config.tcp.max_pending_connects {
            Some(DropReason::TcpPendingLimit)
        } else if (ip.dst == self.config.gateway && Some(ip.dst) != self.config.host_alias)
            || seg.dst_port == 0
            || seg.src_port == 0
        {
            // No TCP service on the gateway yet, and port 0 is no port: refuse at once.
            Some(DropReason::TcpRejected)
        } else {
            None
        };
        if let Some(reason) = refuse {
            self.send_rst(key, &seg);
            return Err(reason);
        }
        let id = self.new_flow_id();
        let deadline = now + self.config.tcp.connect_timeout;
        self.tcp
            .insert(id, TcpFlow::new(key, ip.packet.to_vec(), deadline));
        self.tcp_by_key.insert(key, id);
        self.tcp_pending += 1;
        self.stats.tcp_flows_opened += 1;
        if dns_service {
            // The gateway itself answers: no host connect, the handshake completes now.
            self.tcp.get_mut(&id).expect("inserted").local_dns = Some(Vec::new());
            self.tcp_connected(now, id);
            return Ok(());
        }
        if let Some(kind) = proxy_kind {
            // The head (or ClientHello) decides where this goes: the guest's handshake
            // completes first.
            self.proxy_accept(now, id, kind);
            return Ok(());
        }
        let dst = SocketAddr::new(self.host_target(IpAddr::V4(ip.dst)), seg.dst_port);
        self.commands.push_back(Cmd::TcpConnect(id, dst));
        Ok(())
    }

    fn send_rst(&mut self, key: TcpKey, seg: &TcpPorts) {
        // Keys are IPv4 until the IPv6 packet path exists: an IPv6 key cannot arise yet,
        // and gets no (IPv4) RST.
        let (SocketAddr::V4(guest), SocketAddr::V4(dst)) = (key.guest, key.dst) else {
            self.stats.drop(DropReason::UnsupportedProtocol);
            return;
        };
        let ident = self.next_ident();
        let len = wire::IPV4_HDR + wire::TCP_HDR;
        self.push_ip(*guest.ip(), len, |b| {
            wire::emit_tcp_rst(
                b,
                *dst.ip(),
                dst.port(),
                *guest.ip(),
                guest.port(),
                seg,
                ident,
            )
        });
    }

    fn feed_smoltcp(&mut self, now: Instant, packet: &[u8]) {
        let mut device = GuestDevice {
            rx: Some(packet),
            tx: &mut self.frames,
            neighbors: &self.neighbors,
            stats: &mut self.stats,
            gateway_mac: self.config.gateway_mac,
            mtu: usize::from(self.config.mtu),
        };
        self.iface
            .poll_ingress_single(now, &mut device, self.sockets.set_mut());
        self.send_wanted_arp();
    }

    /// A host client connected to a forwarded port: open a TCP connection into the guest
    /// at `guest`. The guest sees the client's own address as the source (a client on the
    /// host's loopback appears as the host alias). Bytes then flow as for guest-opened
    /// connections: `TcpReady` once the guest accepted, `TcpAbort` if it refuses.
    pub fn tcp_open_inbound(
        &mut self,
        now: Instant,
        guest: SocketAddr,
        client: SocketAddr,
    ) -> Result<FlowId, InboundError> {
        self.last_now = now;
        let remote = self.inbound_source(client)?;
        // The packet path (and smoltcp here) is IPv4-only: an IPv6 guest address cannot
        // be reached (yet).
        let guest_v4 = match guest {
            SocketAddr::V4(g) if g.port() != 0 && self.unicast_dst(*g.ip()) => g,
            _ => return Err(InboundError::Unaddressable),
        };
        if self.tcp.len() >= self.config.tcp.max_flows {
            self.stats.drop(DropReason::TcpFlowLimit);
            return Err(InboundError::FlowLimit);
        }
        let key = TcpKey {
            guest,
            dst: SocketAddr::V4(remote),
        };
        if self.tcp_by_key.contains_key(&key) {
            return Err(InboundError::Busy);
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.config.tcp.rx_buffer]),
            tcp::SocketBuffer::new(vec![0; self.config.tcp.tx_buffer]),
        );
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(self.config.tcp.ack_delay);
        // Until the guest answers, the connect timeout; once established, the dead-guest
        // timeout and keep-alives of guest-opened flows (see `service_tcp`).
        socket.set_timeout(Some(self.config.tcp.connect_timeout));
        let local = smoltcp::wire::IpListenEndpoint {
            addr: Some((*remote.ip()).into()),
            port: remote.port(),
        };
        socket
            .connect(
                self.iface.context(),
                (*guest_v4.ip(), guest_v4.port()),
                local,
            )
            .map_err(|_| InboundError::Unaddressable)?;
        let handle = self.sockets.add(socket);
        let id = self.new_flow_id();
        self.tcp.insert(id, TcpFlow::inbound(key, handle));
        self.tcp_by_key.insert(key, id);
        self.stats.tcp_flows_opened += 1;
        self.dirty.push(id);
        Ok(id)
    }

    /// The address a host client of a port forward appears as to the guest.
    fn inbound_source(&self, client: SocketAddr) -> Result<SocketAddrV4, InboundError> {
        let src = match self.guest_visible(client) {
            Some(r) => r,
            // An IPv6 client has no IPv4 face: it appears as the host alias.
            None => match self.config.host_alias {
                Some(alias) => SocketAddrV4::new(alias, client.port()),
                None => return Err(InboundError::Unaddressable),
            },
        };
        if src.port() == 0 || src.ip().is_unspecified() {
            return Err(InboundError::Unaddressable);
        }
        Ok(src)
    }

    fn send_arp_request(&mut self, target: Ipv4Addr) {
        let req = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(self.config.gateway_mac),
            source_protocol_addr: self.config.gateway,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        let gw = self.config.gateway_mac;
        self.frames.push_with(ETH_HDR + req.buffer_len(), |f| {
            write_eth(f, BROADCAST_MAC, gw, ETHERTYPE_ARP);
            req.emit(&mut ArpPacket::new_unchecked(&mut f[ETH_HDR..]));
        });
    }

    /// The host connect for `flow` succeeded: the guest now gets its SYN-ACK.
    pub fn tcp_connected(&mut self, now: Instant, flow: FlowId) {
        self.last_now = now;
        if self.dns_tcp_connected(flow) || self.proxy_connected(flow) {
            return;
        }
        self.accept_guest(now, flow);
    }

    /// Give a connecting flow its smoltcp socket and replay the guest's SYN into it.
    fn accept_guest(&mut self, now: Instant, flow: FlowId) {
        let Some(f) = self.tcp.get_mut(&flow) else {
            self.stats.drop(DropReason::StaleHostEvent);
            return;
        };
        let Phase::Connecting { syn, .. } = &mut f.phase else {
            self.stats.drop(DropReason::StaleHostEvent);
            return;
        };
        let syn = std::mem::take(syn);
        let key = f.key;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.config.tcp.rx_buffer]),
            tcp::SocketBuffer::new(vec![0; self.config.tcp.tx_buffer]),
        );
        // Bytes are relayed as they come: coalescing is the endpoints' business.
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(self.config.tcp.ack_delay);
        // Detects a guest that vanished. smoltcp's timeout counts from the last segment the
        // guest sent, idle or not, so keep-alives (which a live guest answers) are what keep
        // an idle connection open; without them every flow idle for 5 minutes was reset
        // (found by the simulator: scenarios/idle_connection.toml). They also end a flow
        // whose guest vanished in FIN-WAIT-2, where nothing else is outstanding.
        socket.set_timeout(Some(TCP_GUEST_TIMEOUT));
        socket.set_keep_alive(Some(TCP_KEEP_ALIVE));
        // smoltcp runs IPv4 only, as the packet path does: an IPv6 key (which cannot arise
        // yet) is refused as a failed listen is.
        let listened = match key.dst {
            SocketAddr::V4(dst) => {
                let listen = smoltcp::wire::IpListenEndpoint {
                    addr: Some((*dst.ip()).into()),
                    port: dst.port(),
                };
                socket.listen(listen).is_ok()
            }
            SocketAddr::V6(_) => false,
        };
        if !listened {
            self.stats.drop(DropReason::TcpRejected);
            self.close_tcp(flow, true);
            return;
        }
        let handle = self.sockets.add(socket);
        f.phase = Phase::Open { handle };
        self.tcp_pending -= 1;
        self.feed_smoltcp(now, &syn);
        let state = self.sockets.get::<tcp::Socket>(handle).state();
        if state != tcp::State::SynReceived {
            // smoltcp did not take the SYN (it should): never leave a listener that could
            // pick up another flow's SYN.
            self.stats.drop(DropReason::TcpRejected);
            self.close_tcp(flow, true);
            return;
        }
        self.dirty.push(flow);
    }

    /// The host connect for `flow` failed: the guest gets a RST.
    pub fn tcp_connect_failed(&mut self, now: Instant, flow: FlowId, err: ConnectError) {
        self.last_now = now;
        if self.dns_tcp_failed(now, flow) || self.proxy_connect_failed(flow, err) {
            return;
        }
        let Some(f) = self.tcp.get(&flow) else {
            self.stats.drop(DropReason::StaleHostEvent);
            return;
        };
        let Phase::Connecting { syn, .. } = &f.phase else {
            self.stats.drop(DropReason::StaleHostEvent);
            return;
        };
        let syn = syn.clone();
        let key = f.key;
        self.stats.tcp_connects_failed += 1;
        if let Ok(ip) = Ipv4::parse(&syn) {
            if let Ok(seg) = TcpPorts::parse(&ip) {
                self.send_rst(key, &seg);
            }
        }
        self.remove_tcp(flow);
    }

    fn socket(&mut self, flow: FlowId) -> Option<&mut tcp::Socket<'static>> {
        let handle = self.tcp.get(&flow)?.handle()?;
        Some(self.sockets.get_mut::<tcp::Socket>(handle))
    }

    /// Bytes the guest sent that are waiting for the host (a contiguous chunk; after
    /// consuming it there may be more). Empty when there are none.
    pub fn tcp_to_host(&mut self, flow: FlowId) -> &[u8] {
        if self.dns_tcp.contains_key(&flow) {
            return self.dns_tcp_to_host(flow).unwrap_or(&[]);
        }
        if self.proxy_flows > 0 && self.tcp.get(&flow).is_some_and(|f| f.proxy.is_some()) {
            return self.proxy_to_host(flow);
        }
        match self.socket(flow) {
            Some(s) => s.peek(usize::MAX).unwrap_or(&[]),
            None => &[],
        }
    }

    /// The host accepted `n` bytes of [`Stack::tcp_to_host`].
    pub fn tcp_consume_to_host(&mut self, flow: FlowId, n: usize) {
        if self.dns_tcp_consumed(flow, n) {
            return;
        }
        if self.proxy_flows > 0 && self.tcp.get(&flow).is_some_and(|f| f.proxy.is_some()) {
            self.proxy_consumed(flow, n);
            return;
        }
        if let Some(s) = self.socket(flow) {
            let _ = s.recv(|b| (n.min(b.len()), ()));
            self.dirty.push(flow);
        }
    }

    /// Room for bytes from the host.
    pub fn tcp_room(&mut self, flow: FlowId) -> usize {
        if let Some(room) = self.dns_tcp_room(flow).or_else(|| self.proxy_room(flow)) {
            return room;
        }
        match self.socket(flow) {
            Some(s) if s.may_send() => s.send_capacity() - s.send_queue(),
            _ => 0,
        }
    }

    /// Let `fill` write host bytes into the flow's send buffer: it gets the free space
    /// (a contiguous chunk) and returns how many bytes it wrote and a value passed back.
    /// Returns `None` when the flow cannot take bytes now (no flow, or no room: the stack
    /// will emit `TcpReady` once there is room).
    pub fn tcp_from_host<R>(
        &mut self,
        flow: FlowId,
        fill: impl FnOnce(&mut [u8]) -> (usize, R),
    ) -> Option<R> {
        if self.dns_tcp.contains_key(&flow) {
            return self.dns_tcp_from_host(flow, fill).flatten();
        }
        if self.proxy_takes_host_bytes(flow) {
            return self.proxy_reply_from_host(flow, fill);
        }
        let f = self.tcp.get_mut(&flow)?;
        let handle = f.handle()?;
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        if !s.may_send() || s.send_capacity() == s.send_queue() {
            f.host_read_blocked = true;
            return None;
        }
        let before = s.send_queue();
        // The start of the response to an `Upgrade` request is looked at on its way.
        let watch = f.proxy.is_some() && self.proxy_watches_status(flow);
        let (f, s) = match (self.tcp.get_mut(&flow), handle) {
            (Some(f), h) => (f, self.sockets.get_mut::<tcp::Socket>(h)),
            (None, _) => return None,
        };
        let mut status = [0u8; 16];
        let mut status_len = 0;
        let r = s
            .send(|buf| {
                let (n, r) = fill(buf);
                if watch {
                    status_len = n.min(buf.len()).min(status.len());
                    status[..status_len].copy_from_slice(&buf[..status_len]);
                }
                (n, r)
            })
            .ok();
        if let Some(p) = f.proxy.as_deref_mut() {
            p.response_seen |= s.send_queue() > before;
        }
        if s.send_capacity() == s.send_queue() {
            f.host_read_blocked = true;
        }
        self.dirty.push(flow);
        if watch && status_len > 0 {
            self.proxy_status_bytes(flow, &status[..status_len]);
        }
        r
    }

    /// The host closed its write side: the guest gets a FIN after the queued bytes.
    pub fn tcp_host_eof(&mut self, flow: FlowId) {
        if self.dns_tcp_failed(self.last_now, flow) {
            // The upstream closed before a whole answer.
            self.commands.push_back(Cmd::TcpClose(flow));
            return;
        }
        if self.proxy_host_eof(flow) {
            return;
        }
        let Some(f) = self.tcp.get_mut(&flow) else {
            return;
        };
        f.host_eof = true;
        if let Some(h) = f.handle() {
            self.sockets.get_mut::<tcp::Socket>(h).close();
        }
        self.dirty.push(flow);
    }

    /// The host connection was reset (or failed): the guest gets a RST.
    pub fn tcp_host_reset(&mut self, flow: FlowId) {
        if self.dns_tcp_failed(self.last_now, flow) || self.proxy_host_reset(flow) {
            return;
        }
        let Some(f) = self.tcp.get(&flow) else {
            return;
        };
        if let Some(h) = f.handle() {
            self.sockets.get_mut::<tcp::Socket>(h).abort();
            // Let the RST go out before the socket is removed.
            self.flush_egress(self.last_now);
        }
        self.remove_tcp(flow);
    }

    /// Forget a flow; its host side has been told (or is told by the caller).
    fn remove_tcp(&mut self, flow: FlowId) {
        if let Some(f) = self.tcp.remove(&flow) {
            self.tcp_by_key.remove(&f.key);
            if let Some(p) = &f.proxy {
                self.proxy_flows -= 1;
                if p.holds_connect_slot() {
                    self.proxy_connecting -= 1;
                }
            }
            debug_assert!(self.proxy_connecting <= self.proxy_flows);
            match f.phase {
                Phase::Connecting { .. } => self.tcp_pending -= 1,
                Phase::Open { handle } => {
                    self.sockets.remove(handle);
                }
            }
        }
    }

    /// End a flow and tell the host: `abort` resets, otherwise a clean close.
    fn close_tcp(&mut self, flow: FlowId, abort: bool) {
        if self.tcp.get(&flow).is_some_and(|f| f.local_dns.is_some()) {
            self.remove_tcp(flow);
            self.dns_tcp_closed(flow);
            return;
        }
        self.remove_tcp(flow);
        self.commands.push_back(if abort {
            Cmd::TcpAbort(flow)
        } else {
            Cmd::TcpClose(flow)
        });
    }

    /// Look at one flow after something happened to it and tell the host what follows.
    fn service_tcp(&mut self, id: FlowId) {
        let Some(f) = self.tcp.get_mut(&id) else {
            return;
        };
        let Some(handle) = f.handle() else {
            return;
        };
        // Read-only unless the state calls for a change: servicing must not count as a
        // change to the socket (that would force the next egress pass).
        let state = self.sockets.get::<tcp::Socket>(handle).state();
        let last = std::mem::replace(&mut f.last_state, state);
        if f.inbound && state == tcp::State::Established && last != tcp::State::Established {
            let s = self.sockets.get_mut::<tcp::Socket>(handle);
            s.set_timeout(Some(TCP_GUEST_TIMEOUT));
            s.set_keep_alive(Some(TCP_KEEP_ALIVE));
        }
        let s = self.sockets.get::<tcp::Socket>(handle);
        let queued = s.recv_queue();
        // smoltcp keeps `may_recv` true while bytes are buffered, so this turns true only
        // once the guest's FIN arrived and everything before it was handed over.
        if !s.may_recv()
            && !matches!(
                state,
                tcp::State::SynReceived | tcp::State::SynSent | tcp::State::Listen
            )
        {
            f.guest_fin = true;
        }
        match state {
            tcp::State::Listen => {
                // The guest reset its half-open connection: smoltcp went back to
                // listening. Never keep that listener.
                self.close_tcp(id, true);
                return;
            }
            tcp::State::Closed
                if !matches!(
                    last,
                    tcp::State::LastAck | tcp::State::TimeWait | tcp::State::Closing
                ) =>
            {
                // Reset by the guest (or given up on): the host connection is reset too,
                // and undelivered bytes are discarded, as a kernel does on RST.
                self.close_tcp(id, true);
                return;
            }
            tcp::State::Closed | tcp::State::TimeWait if queued == 0 => {
                // Both FINs exchanged. The guest keeps its own TIME-WAIT; a late
                // retransmission gets a RST, harmlessly.
                let clean = f.host_eof && f.guest_fin;
                self.close_tcp(id, !clean);
                return;
            }
            _ => {}
        }
        if f.local_dns.is_some() {
            self.service_dns_tcp(self.last_now, id);
            return;
        }
        if f.proxy.is_some() {
            self.service_proxy(id);
            return;
        }
        let room = s.may_send() && s.send_capacity() > s.send_queue();
        let mut ready = queued > 0;
        if f.host_read_blocked && room {
            f.host_read_blocked = false;
            ready = true;
        }
        if ready && !f.ready_queued {
            f.ready_queued = true;
            self.commands.push_back(Cmd::TcpReady(id));
        }
        if f.guest_fin && queued == 0 && !f.shutdown_sent {
            f.shutdown_sent = true;
            self.commands.push_back(Cmd::TcpShutdownWrite(id));
        }
    }

    // ---------------------------------------------------------------- time

    /// Run everything that is due: smoltcp's transmissions and timers, flow bookkeeping,
    /// expiry of idle NAT entries and of host connects that took too long. Call it after
    /// every batch of inputs and whenever [`Stack::poll_timeout`] passes.
    pub fn poll(&mut self, now: Instant) {
        self.last_now = now;
        self.expire(now);
        if let Some(dns) = self.dns.as_mut() {
            if dns.poll_timeout().is_some_and(|t| t <= now) {
                dns.handle_timeout(now);
                self.drain_dns(now);
            }
        }
        // What the inputs changed first: the owner can start host I/O (a write to the
        // host socket) before this round's egress pass, and the pass then carries the
        // window updates that the write made possible.
        self.service_dirty();
        // Egress may change socket states (timers, retransmission give-ups); servicing the
        // changes may queue more egress (the gateway's own DNS answers): then a second
        // round sends it. Most polls need one round, and a round walks every socket, so
        // it is skipped when no socket changed and no smoltcp timer is due.
        for _ in 0..2 {
            self.egress_pending = false;
            if self.sockets.touched || self.egress_at.is_some_and(|t| t <= now) {
                self.flush_egress(now);
            }
            self.service_dirty();
            if !self.egress_pending {
                break;
            }
        }
        self.send_wanted_arp();
    }

    /// Look at the flows inputs changed and queue the host commands that follow, without
    /// an egress pass: lets the owner carry out a guest's write on the host before the
    /// (costlier) [`Stack::poll`], which it must still call.
    pub fn service(&mut self) {
        self.service_dirty();
    }

    fn flush_egress(&mut self, now: Instant) {
        let mut device = GuestDevice {
            rx: None,
            tx: &mut self.frames,
            neighbors: &self.neighbors,
            stats: &mut self.stats,
            gateway_mac: self.config.gateway_mac,
            mtu: usize::from(self.config.mtu),
        };
        // smoltcp sends at most one segment per socket and pass: pass again while it
        // still has something to send, until the guest's queue holds enough for now
        // (the owner drains it, and the next poll continues).
        for _ in 0..EGRESS_PASSES {
            if device.tx.bytes() >= EGRESS_QUEUE_BYTES {
                break;
            }
            let r = self
                .iface
                .poll_egress(now, &mut device, &mut self.sockets.set);
            if r != smoltcp::iface::PollResult::SocketStateChanged {
                break;
            }
            // Timers (retransmission, keep-alive) act on any socket.
            self.all_dirty = true;
        }
        self.sockets.touched = false;
        self.egress_at = self.iface.poll_at(now, &self.sockets.set);
        self.send_wanted_arp();
    }

    fn service_dirty(&mut self) {
        if self.all_dirty {
            self.all_dirty = false;
            self.dirty.clear();
            let ids: Vec<FlowId> = self.tcp.keys().copied().collect();
            for id in ids {
                self.service_tcp(id);
            }
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty.drain(..) {
            self.service_tcp(id);
        }
        self.dirty = dirty;
    }

    fn expire(&mut self, now: Instant) {
        self.proxy_expire(now);
        // Host connects past their deadline.
        if self.tcp_pending > 0 {
            let late: Vec<FlowId> = self
                .tcp
                .iter()
                .filter(|(_, f)| matches!(f.phase, Phase::Connecting { deadline, .. } if deadline <= now))
                .map(|(id, _)| *id)
                .collect();
            for id in late {
                self.tcp_connect_failed(now, id, ConnectError::TimedOut);
                self.commands.push_back(Cmd::TcpAbort(id));
            }
        }
        if self.udp_next_expiry.is_some_and(|t| t <= now) {
            let idle = self.config.udp.idle_timeout;
            let dead: Vec<FlowId> = self
                .udp
                .iter()
                .filter(|(_, f)| f.last_active + idle <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in dead {
                self.remove_udp(id);
            }
            self.udp_next_expiry = self.udp.values().map(|f| f.last_active + idle).min();
        }
        if self.ping_next_expiry.is_some_and(|t| t <= now) {
            let idle = self.config.icmp.idle_timeout;
            let dead: Vec<FlowId> = self
                .pings
                .iter()
                .filter(|(_, f)| f.last_active + idle <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in dead {
                if let Some(p) = self.pings.remove(&id) {
                    self.ping_by_key.remove(&p.key);
                    self.commands.push_back(Cmd::PingClose(id));
                }
            }
            self.ping_next_expiry = self.pings.values().map(|f| f.last_active + idle).min();
        }
    }

    /// When [`Stack::poll`] must run next at the latest (`None`: only on input).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let now = self.last_now;
        let mut t = if self.sockets.touched {
            self.iface.poll_at(now, &self.sockets.set)
        } else {
            self.egress_at
        };
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        consider(self.dns.as_ref().and_then(|d| d.poll_timeout()));
        consider(self.udp_next_expiry);
        consider(self.ping_next_expiry);
        consider(self.proxy_poll_timeout());
        if self.tcp_pending > 0 {
            consider(
                self.tcp
                    .values()
                    .filter_map(|f| match f.phase {
                        Phase::Connecting { deadline, .. } => Some(deadline),
                        _ => None,
                    })
                    .min(),
            );
        }
        t
    }

    // ---------------------------------------------------------------- output

    /// The next frame for the guest, if any.
    pub fn peek_frame(&self) -> Option<&[u8]> {
        self.frames.front()
    }

    /// Remove the frame [`Stack::peek_frame`] returned.
    pub fn pop_frame(&mut self) {
        if let Some(len) = self.frames.pop() {
            self.stats.frames_out += 1;
            self.stats.bytes_out += len as u64;
        }
    }

    /// Frames queued for the guest.
    pub fn frames_queued(&self) -> usize {
        self.frames.len()
    }

    /// Bytes of the frames queued for the guest.
    pub fn frames_queued_bytes(&self) -> usize {
        self.frames.bytes()
    }

    /// The next command for the host, if any.
    /// Whether [`Stack::poll_command`] or [`Stack::poll_resolve`] has something.
    pub fn has_commands(&self) -> bool {
        !self.commands.is_empty() || !self.resolves.is_empty()
    }

    pub fn poll_command(&mut self) -> Option<HostCommand<'_>> {
        let Some(cmd) = self.commands.pop_front() else {
            self.arena.clear();
            if self.arena.capacity() > ARENA_KEEP {
                self.arena.shrink_to(ARENA_KEEP);
            }
            return None;
        };
        Some(match cmd {
            Cmd::TcpConnect(flow, dst) => HostCommand::TcpConnect { flow, dst },
            Cmd::TcpReady(flow) => {
                if let Some(f) = self.tcp.get_mut(&flow) {
                    f.ready_queued = false;
                }
                HostCommand::TcpReady { flow }
            }
            Cmd::TcpShutdownWrite(flow) => HostCommand::TcpShutdownWrite { flow },
            Cmd::TcpClose(flow) => HostCommand::TcpClose { flow },
            Cmd::TcpAbort(flow) => HostCommand::TcpAbort { flow },
            Cmd::UdpSend(flow, dst, r) => HostCommand::UdpSend {
                flow,
                dst,
                payload: &self.arena[r],
            },
            Cmd::UdpClose(flow) => HostCommand::UdpClose { flow },
            Cmd::PingSend(flow, dst, seq, r) => HostCommand::PingSend {
                flow,
                dst,
                seq,
                payload: &self.arena[r],
            },
            Cmd::PingClose(flow) => HostCommand::PingClose { flow },
        })
    }

    // ---------------------------------------------------------------- introspection

    /// Every TCP flow, in flow order.
    pub fn tcp_flows(&self) -> Vec<TcpFlowInfo> {
        self.tcp
            .iter()
            .map(|(id, f)| {
                let (state, rq, sq) = match f.phase {
                    Phase::Connecting { .. } => ("connecting".to_string(), 0, 0),
                    Phase::Open { handle } => {
                        let s = self.sockets.get::<tcp::Socket>(handle);
                        (s.state().to_string(), s.recv_queue(), s.send_queue())
                    }
                };
                TcpFlowInfo {
                    flow: *id,
                    guest: f.key.guest,
                    dst: f.key.dst,
                    state,
                    to_host_queued: rq,
                    to_guest_queued: sq,
                }
            })
            .collect()
    }

    /// TCP flows, the gateway's own DNS exchanges with upstreams included.
    pub fn tcp_flow_count(&self) -> usize {
        self.tcp.len() + self.dns_tcp.len()
    }

    pub fn udp_flow_count(&self) -> usize {
        self.udp.len()
    }

    pub fn ping_flow_count(&self) -> usize {
        self.pings.len()
    }

    /// Lease `ip` to the guest at `mac` when it asks (VPNKit's Preferred_ipv4), if the
    /// address is in the pool and free.
    pub fn prefer_address(
        &mut self,
        now: Instant,
        mac: [u8; 6],
        ip: Ipv4Addr,
    ) -> Result<(), crate::dhcp::DhcpError> {
        self.last_now = now;
        self.dhcp.prefer(now, mac, ip)
    }

    /// The guest at `mac` left for good (its switch port closed): end the flows of the
    /// addresses it was last seen at, resetting their host sockets, and forget where it
    /// was. Its DHCP lease stays, so it gets the same address when it comes back. Without
    /// this a departed guest's TCP flows would wait for keep-alives to give up and its UDP
    /// flows for the idle timeout. Returns how many flows ended.
    pub fn guest_left(&mut self, now: Instant, mac: [u8; 6]) -> usize {
        self.last_now = now;
        let ips = self.neighbors.forget_mac(mac);
        if ips.is_empty() {
            return 0;
        }
        // Neighbours are learnt by ARP: only IPv4 flows can match them.
        let gone = |ip: IpAddr| matches!(ip, IpAddr::V4(v4) if ips.contains(&v4));
        let tcp: Vec<FlowId> = self
            .tcp
            .iter()
            .filter(|(_, f)| gone(f.key.guest.ip()))
            .map(|(id, _)| *id)
            .collect();
        for &id in &tcp {
            self.close_tcp(id, true);
        }
        let udp: Vec<FlowId> = self
            .udp
            .iter()
            .filter(|(_, f)| !f.dns_internal && gone(f.guest.ip()))
            .map(|(id, _)| *id)
            .collect();
        for &id in &udp {
            self.remove_udp(id);
        }
        let pings: Vec<FlowId> = self
            .pings
            .iter()
            .filter(|(_, f)| gone(f.key.guest))
            .map(|(id, _)| *id)
            .collect();
        for &id in &pings {
            if let Some(p) = self.pings.remove(&id) {
                self.ping_by_key.remove(&p.key);
                self.commands.push_back(Cmd::PingClose(id));
            }
        }
        tcp.len() + udp.len() + pings.len()
    }

    /// Open flows per guest, by the MAC address its flows' source address was last seen
    /// at, and protocol (the gateway's own DNS flows are not a guest's and are left out).
    pub fn flows_by_guest(&self) -> BTreeMap<[u8; 6], GuestFlows> {
        let mut m: BTreeMap<[u8; 6], GuestFlows> = BTreeMap::new();
        let mut count = |ip: IpAddr, f: fn(&mut GuestFlows)| {
            // Neighbours are learnt by ARP: only IPv4 guests are found.
            let IpAddr::V4(ip) = ip else {
                return;
            };
            if let Some(mac) = self.neighbors.get(ip) {
                f(m.entry(mac).or_default());
            }
        };
        for fl in self.tcp.values() {
            count(fl.key.guest.ip(), |g| g.tcp += 1);
        }
        for fl in self.udp.values().filter(|f| !f.dns_internal) {
            count(fl.guest.ip(), |g| g.udp += 1);
        }
        for fl in self.pings.values() {
            count(fl.key.guest, |g| g.ping += 1);
        }
        m
    }

    /// No flow of any kind, no frame and no command waiting.
    pub fn is_idle(&self) -> bool {
        self.tcp.is_empty()
            && self.dns_tcp.is_empty()
            && self.udp.is_empty()
            && self.pings.is_empty()
            && self.frames.len() == 0
            && self.commands.is_empty()
    }
}
