//! A simulated guest: a second smoltcp instance (Ethernet, DHCP client) on the link, driven
//! by a workload of TCP and UDP jobs whose every byte is checked.
//!
//! smoltcp's TCP does no path-MTU discovery. So that the guest copes with an MTU black hole
//! as a real guest kernel would, the sim guest implements a tiny PMTUD: when it receives an
//! ICMP "fragmentation needed" (type 3 code 4) it lowers its interface MTU to the advertised
//! value (rebuilding the interface; sockets keep their state and resegment).
//!
//! Rebuilding the interface would also forget its ARP cache, which a real guest keeps
//! across an MTU change; the sim guest re-teaches it the gateway with a synthetic ARP reply.
//! (smoltcp disarms its retransmission timer before a fast retransmit is emitted, so a
//! fast retransmit lost to a neighbour-cache miss stalls the connection for good: another
//! smoltcp bug the sim found, mtu_told seed 68; the daemon is immune since its device
//! never refuses a frame.)
//!
//! smoltcp also drops a packet whose next hop is not in its neighbour cache (60 s lifetime)
//! instead of queueing it, and never resends a dropped ACK; Linux keeps using a stale entry
//! while it re-probes. So the sim guest refreshes the gateway's entry (a synthetic ARP reply)
//! whenever it hears from the gateway after 20 s, as Linux's reachability confirmation does.
//! Without it, an idle guest never answers the daemon's keep-alives.
//!
//! smoltcp also takes a RST in TIME-WAIT (a duplicate of its last ACK reached the daemon,
//! which has forgotten the flow and answers with a RST, as any kernel does) and then
//! discards received bytes the application has not read yet; Linux keeps them readable.
//! The sim guest ignores RSTs for sockets in TIME-WAIT (RFC 1337; found with
//! slow_reader seed 34).
//!
//! smoltcp also enters fast retransmit on three duplicate ACKs when only its FIN is
//! outstanding: there is no data to resend, nothing is sent, and the retransmission timer
//! has been disarmed, so the FIN is never sent again (found with chaos seed 1124: the
//! daemon, missing the FIN, answers the guest's retransmissions with identical ACKs). The
//! sim guest drops such duplicate ACKs for sockets with only a FIN outstanding.
//!
//! smoltcp also sends its ACKs with the sequence number rewound by a retransmission
//! timeout (`remote_last_seq`), and drops segments that lie wholly before its window
//! without looking at their ACK. Two smoltcp endpoints that both time out while each has
//! received data whose ACKs were lost then deadlock: each discards the other's ACKs for
//! good (found by the sim: mtu_told seed 4, two_guests seed 35). Linux sends pure ACKs with
//! SND.NXT never rewound (`tcp_acceptable_seq`), so a Linux guest never meets the daemon's
//! smoltcp in that state. The sim guest behaves like Linux here: its "NIC" rewrites the
//! sequence number of outgoing pure ACKs to the highest sequence number sent (unless the
//! guest spec sets `smoltcp_ack_seq = true`).

mod services;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::rc::Rc;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{dhcpv4, tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, Icmpv4Packet, IpCidr,
    IpProtocol, Ipv4Cidr, Ipv4Packet,
};
use tokio::sync::Notify;

use crate::link::Dir;
use crate::rng::{Draw, Fnv, Pattern};
use crate::scenario::{GuestSpec, Job, JobKind};
use crate::world::{Mutation, World};

/// How one connection (or one datagram) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Complete {
        bytes: u64,
        at_us: u64,
    },
    /// Reset (or closed) before completing; `established`: after the handshake.
    Reset {
        established: bool,
        at_us: u64,
    },
    /// The peer closed before everything arrived.
    Truncated {
        got: u64,
        at_us: u64,
    },
    /// Bytes differ from what was sent: a safety violation.
    Corrupt(String),
    /// Not finished by the job's deadline.
    Timeout {
        detail: String,
    },
    /// DNS: the gateway answered SERVFAIL.
    Servfail {
        at_us: u64,
    },
    /// HTTP: an error response (of the daemon's proxy), then the connection closed.
    HttpError {
        status: u16,
        at_us: u64,
    },
}

impl Outcome {
    pub fn at_us(&self) -> Option<u64> {
        match self {
            Outcome::Complete { at_us, .. }
            | Outcome::Reset { at_us, .. }
            | Outcome::Truncated { at_us, .. }
            | Outcome::Servfail { at_us }
            | Outcome::HttpError { at_us, .. } => Some(*at_us),
            _ => None,
        }
    }
}

/// What the guest reports to the world.
#[derive(Clone, Debug, Default)]
pub struct GuestShared {
    pub mac: [u8; 6],
    pub lease: Option<(Ipv4Addr, u64)>,
    /// Per job, the outcome of each connection.
    pub outcomes: Vec<Vec<Outcome>>,
    pub done: bool,
    pub done_at: Option<u64>,
    /// A new MTU the guest is told of (MtuTold).
    pub pending_mtu: Option<u16>,
    pub mtu_changes: Vec<(u64, u16, &'static str)>,
    /// Per job, extra lines for the summary (DNS answers by server, server sources).
    pub notes: Vec<Vec<String>>,
}

struct Dev<'a> {
    inbox: &'a mut VecDeque<Vec<u8>>,
    outbox: &'a mut Vec<Vec<u8>>,
    mtu: usize,
}

impl phy::Device for Dev<'_> {
    type RxToken<'b>
        = Rx
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _t: Instant) -> Option<(Rx, Tx<'_>)> {
        let f = self.inbox.pop_front()?;
        Some((Rx(f), Tx(self.outbox)))
    }
    fn transmit(&mut self, _t: Instant) -> Option<Tx<'_>> {
        Some(Tx(self.outbox))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.mtu + 14;
        c
    }
}

struct Rx(Vec<u8>);
impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
struct Tx<'a>(&'a mut Vec<Vec<u8>>);
impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

/// Stage of one TCP connection.
struct Conn {
    id: u32,
    handle: SocketHandle,
    kind: JobKind,
    total: u64,
    /// Bytes to send before the body (request line).
    request: Vec<u8>,
    request_sent: usize,
    body_sent: u64,
    tx: Pattern,
    rx: Pattern,
    tx_hash: Fnv,
    recvd: u64,
    /// Reply header (sink reply, HTTP header).
    header: Vec<u8>,
    header_done: bool,
    body_expected: u64,
    established: bool,
    half_closed: bool,
    eof: bool,
    corrupt: Option<String>,
    /// HTTP: the status of an error response; its body is not checked.
    http_status: Option<u16>,
    /// Echo with a pause: sending resumes at this time (0: no pause pending).
    pause_us: u64,
    resume_at: Option<u64>,
    /// Slow reader: bytes per second, tokens, last refill.
    read_rate: Option<u64>,
    read_tokens: f64,
    read_refill: u64,
}

struct UdpRun {
    handle: SocketHandle,
    next: u32,
    attempts: u32,
    last_send: u64,
}

struct JobRun {
    spec: Job,
    dst: SocketAddrV4,
    started: u32,
    active: Vec<Conn>,
    outcomes: Vec<Outcome>,
    udp: Option<UdpRun>,
    /// Ping: next sequence, attempts, last send.
    ping: Option<(u32, u32, u64)>,
    dns: Option<services::DnsRun>,
    serve: Option<services::ServeRun>,
    /// DNS: the upstream every answer must come from.
    from_ip: Option<Ipv4Addr>,
    finished: bool,
}

const UDP_RETRY_US: u64 = 400_000;
const UDP_ATTEMPTS: u32 = 40;
/// A closed connection's socket stays at most this long to finish its FIN handshake.
const LINGER_US: u64 = 120_000_000;

pub struct Guest {
    idx: usize,
    mac: [u8; 6],
    iface: Interface,
    sockets: SocketSet<'static>,
    dhcp: SocketHandle,
    addr: Option<Ipv4Cidr>,
    router: Option<Ipv4Addr>,
    mtu: usize,
    rng: Draw,
    jobs: Vec<JobRun>,
    closing: Vec<(SocketHandle, u64)>,
    next_port: u16,
    /// Local port range (inclusive).
    ports: (u16, u16),
    buffer: usize,
    inbox: VecDeque<Vec<u8>>,
    outbox: Vec<Vec<u8>>,
    world: Rc<RefCell<World>>,
    notify: Rc<Notify>,
    daemon_notify: Rc<Notify>,
    control: Rc<Notify>,
    mutation: Mutation,
    reported: bool,
    /// Highest sequence number sent per connection (local port, remote address, port).
    snd_max: std::collections::BTreeMap<(u16, Ipv4Addr, u16), u32>,
    linux_ack_seq: bool,
    /// The gateway's MAC, learnt from received frames.
    gw_mac: Option<[u8; 6]>,
    /// When the gateway's neighbour entry was last refreshed.
    arp_refreshed: u64,
    /// ICMP echo replies taken off the inbox: (identifier, sequence, payload).
    echo_replies: Vec<(u16, u16, Vec<u8>)>,
    /// Last ACK (number, window) received per connection.
    last_acks: std::collections::BTreeMap<(u16, Ipv4Addr, u16), (u32, u16)>,
    /// The upstreams (name, address): DNS answers must carry one of them.
    upstreams: Vec<(String, Ipv4Addr)>,
    upstream_ips: Vec<Ipv4Addr>,
    /// When each DNS query (by message ID) first left on the wire: latency bounds count
    /// from there, not from an ARP wait inside the guest.
    dns_wire: std::collections::BTreeMap<u16, u64>,
}

/// Rewrite a pure ACK's sequence number to the highest one sent (Linux behaviour).
fn linux_ack_seq(
    snd_max: &mut std::collections::BTreeMap<(u16, Ipv4Addr, u16), u32>,
    frame: &mut [u8],
) {
    use smoltcp::wire::{IpAddress, TcpPacket, TcpSeqNumber};
    let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
        return;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(&mut frame[14..]) else {
        return;
    };
    if ip.next_header() != IpProtocol::Tcp {
        return;
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let seg_len = ip.payload_mut().len();
    let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) else {
        return;
    };
    let data_len = seg_len.saturating_sub(usize::from(tcp.header_len())) as u32;
    if tcp.rst() {
        return;
    }
    let key = (tcp.src_port(), dst, tcp.dst_port());
    let seq = tcp.seq_number().0 as u32;
    let len = data_len + u32::from(tcp.syn()) + u32::from(tcp.fin());
    if tcp.syn() && !tcp.ack() {
        snd_max.insert(key, seq.wrapping_add(len));
        return;
    }
    let max = snd_max.entry(key).or_insert(seq.wrapping_add(len));
    if len > 0 {
        if (seq.wrapping_add(len).wrapping_sub(*max) as i32) > 0 {
            *max = seq.wrapping_add(len);
        }
    } else if tcp.ack() && (max.wrapping_sub(seq) as i32) > 0 {
        tcp.set_seq_number(TcpSeqNumber(*max as i32));
        tcp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
    }
}

impl Guest {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        idx: usize,
        mac: [u8; 6],
        spec: &GuestSpec,
        upstream_ip: impl Fn(&str) -> Option<Ipv4Addr>,
        upstreams: Vec<(String, Ipv4Addr)>,
        seed: u64,
        mtu: usize,
        world: Rc<RefCell<World>>,
        notify: Rc<Notify>,
        daemon_notify: Rc<Notify>,
        control: Rc<Notify>,
        mutation: Mutation,
    ) -> Self {
        let mut rng = Draw::new(seed, &format!("guest-{idx}"));
        let now = Instant::ZERO;
        let mut inbox = VecDeque::new();
        let mut outbox = Vec::new();
        let iface = Self::build_iface(mac, mtu, &mut rng, &mut inbox, &mut outbox, now);
        let mut sockets = SocketSet::new(Vec::new());
        let mut dhcp = dhcpv4::Socket::new();
        // Faster than smoltcp's defaults (10 s DISCOVER) so that DHCP under loss finishes
        // in a few simulated seconds.
        let mut retry = dhcpv4::RetryConfig::default();
        retry.discover_timeout = Duration::from_secs(2);
        retry.initial_request_timeout = Duration::from_secs(1);
        retry.request_retries = 6;
        dhcp.set_retry_config(retry);
        let dhcp = sockets.add(dhcp);
        let jobs = spec
            .jobs
            .iter()
            .map(|j| JobRun {
                dst: SocketAddrV4::new(
                    upstream_ip(&j.upstream).unwrap_or(Ipv4Addr::new(10, 255, 255, 1)),
                    j.port(),
                ),
                spec: j.clone(),
                started: 0,
                active: Vec::new(),
                outcomes: Vec::new(),
                udp: None,
                ping: None,
                dns: None,
                serve: None,
                from_ip: j.from.as_deref().and_then(&upstream_ip),
                finished: false,
            })
            .collect();
        let ports = match spec.ports {
            Some([lo, hi]) if lo <= hi => (lo, hi),
            _ => (49152, 65535),
        };
        let next_port = ports.0 + (rng.u64() % (u64::from(ports.1 - ports.0) + 1)) as u16;
        Guest {
            idx,
            mac,
            iface,
            sockets,
            dhcp,
            addr: None,
            router: None,
            mtu,
            rng,
            jobs,
            closing: Vec::new(),
            next_port,
            ports,
            buffer: spec.tcp_buffer,
            inbox,
            outbox,
            world,
            notify,
            daemon_notify,
            control,
            mutation,
            reported: false,
            snd_max: Default::default(),
            linux_ack_seq: !spec.smoltcp_ack_seq,
            gw_mac: None,
            arp_refreshed: 0,
            echo_replies: Vec::new(),
            last_acks: Default::default(),
            upstream_ips: upstreams.iter().map(|u| u.1).collect(),
            upstreams,
            dns_wire: Default::default(),
        }
    }

    fn build_iface(
        mac: [u8; 6],
        mtu: usize,
        rng: &mut Draw,
        inbox: &mut VecDeque<Vec<u8>>,
        outbox: &mut Vec<Vec<u8>>,
        now: Instant,
    ) -> Interface {
        let mut cfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        cfg.random_seed = rng.u64();
        let mut dev = Dev { inbox, outbox, mtu };
        Interface::new(cfg, &mut dev, now)
    }

    /// Rebuild the interface for a new MTU (smoltcp reads it once); sockets keep their state.
    fn change_mtu(&mut self, now: Instant, mtu: usize) {
        self.mtu = mtu;
        self.iface = Self::build_iface(
            self.mac,
            mtu,
            &mut self.rng,
            &mut self.inbox,
            &mut self.outbox,
            now,
        );
        self.apply_addr();
        // Keep the gateway's ARP entry, as a real guest does across an MTU change.
        self.teach_gateway();
    }

    /// Put a synthetic ARP reply from the gateway at the head of the inbox.
    fn teach_gateway(&mut self) {
        if let (Some(gw), Some(router), Some(addr)) = (self.gw_mac, self.router, self.addr) {
            use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr};
            let repr = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: EthernetAddress(gw),
                source_protocol_addr: router,
                target_hardware_addr: EthernetAddress(self.mac),
                target_protocol_addr: addr.address(),
            };
            let mut f = vec![0u8; 14 + repr.buffer_len()];
            f[0..6].copy_from_slice(&self.mac);
            f[6..12].copy_from_slice(&gw);
            f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
            repr.emit(&mut ArpPacket::new_unchecked(&mut f[14..]));
            self.inbox.push_front(f);
        }
    }

    fn apply_addr(&mut self) {
        let addr = self.addr;
        self.iface.update_ip_addrs(|a| {
            a.clear();
            if let Some(c) = addr {
                let _ = a.push(IpCidr::Ipv4(c));
            }
        });
        self.iface.routes_mut().remove_default_ipv4_route();
        if let Some(r) = self.router {
            let _ = self.iface.routes_mut().add_default_ipv4_route(r);
        }
    }

    fn now_us(&self) -> u64 {
        self.world.borrow().now_us()
    }

    pub async fn run(mut self) {
        loop {
            let now_us = self.now_us();
            let ts = Instant::from_micros(now_us as i64);
            let told = {
                let w = &mut *self.world.borrow_mut();
                let World { link, trace, .. } = w;
                link.take_for_guest(trace, self.idx, now_us, &mut self.inbox);
                let m = w.guests[self.idx].pending_mtu.take();
                if let Some(m) = m {
                    w.guests[self.idx].mtu_changes.push((now_us, m, "told"));
                    w.link.set_mtu(Dir::G2d, Some(usize::from(m)), true);
                }
                m
            };
            if self.gw_mac.is_none() {
                self.gw_mac = self.inbox.front().map(|f| f[6..12].try_into().expect("6"));
            }
            if let Some(m) = told {
                self.change_mtu(ts, usize::from(m));
            } else if !self.inbox.is_empty() && now_us >= self.arp_refreshed + 20_000_000 {
                self.arp_refreshed = now_us;
                self.teach_gateway();
            }
            self.pmtud(ts, now_us);
            self.ignore_rst_in_time_wait(now_us);
            self.drop_syn_for_known_connection();
            self.take_echo_replies();
            self.drop_dup_acks_on_fin(now_us);
            for _ in 0..8 {
                let mut dev = Dev {
                    inbox: &mut self.inbox,
                    outbox: &mut self.outbox,
                    mtu: self.mtu,
                };
                self.iface.poll(ts, &mut dev, &mut self.sockets);
                let mut progress = self.dhcp_step(now_us);
                progress |= self.workload_step(now_us);
                self.flush_outbox(now_us);
                if !progress {
                    break;
                }
            }
            self.flush_outbox(now_us);
            if !self.reported && self.jobs.iter().all(|j| j.finished) {
                self.reported = true;
                let mut w = self.world.borrow_mut();
                let g = &mut w.guests[self.idx];
                g.done = true;
                g.done_at = Some(now_us);
                g.outcomes = self.jobs.iter().map(|j| j.outcomes.clone()).collect();
                g.notes = self.jobs.iter().map(|j| self.notes(j)).collect();
                drop(w);
                self.control.notify_one();
            }
            // Next wake-up.
            let mut wake = self
                .iface
                .poll_at(ts, &self.sockets)
                .map(|t| t.total_micros().max(0) as u64);
            let mut consider = |t: Option<u64>| {
                if let Some(t) = t {
                    wake = Some(wake.map_or(t, |w: u64| w.min(t)));
                }
            };
            consider(self.world.borrow().link.next_for_guest(self.idx));
            consider(self.next_timer(now_us));
            let wake = wake.map(|w| w.max(now_us + 1000));
            let base = self.world.borrow().base;
            let sleep = async {
                match wake {
                    Some(w) => {
                        tokio::time::sleep_until(base + std::time::Duration::from_micros(w)).await
                    }
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

    fn flush_outbox(&mut self, now_us: u64) {
        if self.outbox.is_empty() {
            return;
        }
        let w = &mut *self.world.borrow_mut();
        for mut f in self.outbox.drain(..) {
            services::note_dns_send(&mut self.dns_wire, &f, now_us);
            if self.linux_ack_seq {
                linux_ack_seq(&mut self.snd_max, &mut f);
            }
            w.link.send(&mut w.trace, Dir::G2d, now_us, &f);
        }
        self.daemon_notify.notify_one();
    }

    /// Drop duplicate pure ACKs for sockets whose only outstanding segment is their FIN (see
    /// the module docs).
    fn drop_dup_acks_on_fin(&mut self, now_us: u64) {
        use smoltcp::wire::TcpPacket;
        let sockets = &self.sockets;
        let snd_max = &self.snd_max;
        let last_acks = &mut self.last_acks;
        let mut dropped = 0;
        self.inbox.retain(|f| {
            let Some(ip) = ipv4_of(f) else {
                return true;
            };
            if ip.next_header() != IpProtocol::Tcp {
                return true;
            }
            let Ok(t) = TcpPacket::new_checked(ip.payload()) else {
                return true;
            };
            if !t.ack() || t.syn() || t.rst() {
                return true;
            }
            let key = (t.dst_port(), ip.src_addr(), t.src_port());
            let ack = (t.ack_number().0 as u32, t.window_len());
            let pure = t.payload().is_empty() && !t.fin();
            let dup = pure && last_acks.get(&key) == Some(&ack);
            last_acks.insert(key, ack);
            if !dup {
                return true;
            }
            // It acknowledges everything but the FIN (the FIN ends at the highest sequence
            // number sent), and the socket is waiting for its FIN to be acknowledged.
            let fin_only = snd_max.get(&key) == Some(&ack.0.wrapping_add(1))
                && sockets.iter().any(|(_, sock)| match sock {
                    smoltcp::socket::Socket::Tcp(s) => {
                        matches!(
                            s.state(),
                            tcp::State::FinWait1 | tcp::State::Closing | tcp::State::LastAck
                        ) && s.local_endpoint().is_some_and(|e| e.port == key.0)
                            && s.remote_endpoint().is_some_and(|e| {
                                e.port == key.2 && e.addr == smoltcp::wire::IpAddress::Ipv4(key.1)
                            })
                    }
                    _ => false,
                });
            if fin_only {
                dropped += 1;
            }
            !fin_only
        });
        if dropped > 0 {
            let w = &mut *self.world.borrow_mut();
            w.trace.event(now_us, "dupack-on-fin", dropped, &[]);
            let idx = self.idx;
            w.trace.log(now_us, || {
                format!("guest{idx} drops {dropped} duplicate ACK(s) with only its FIN outstanding")
            });
        }
    }

    /// ICMP echo replies for this guest go to its ping jobs (smoltcp has no ping socket here).
    fn take_echo_replies(&mut self) {
        let Some(me) = self.addr.map(|a| a.address()) else {
            return;
        };
        let replies = &mut self.echo_replies;
        self.inbox.retain(|f| {
            let Some(ip) = ipv4_of(f) else {
                return true;
            };
            if ip.next_header() != IpProtocol::Icmp || ip.dst_addr() != me {
                return true;
            }
            let Ok(icmp) = Icmpv4Packet::new_checked(ip.payload()) else {
                return true;
            };
            if u8::from(icmp.msg_type()) != 0 {
                return true;
            }
            replies.push((icmp.echo_ident(), icmp.echo_seq_no(), icmp.data().to_vec()));
            false
        });
    }

    /// An ICMP echo request frame from this guest.
    fn echo_request(&self, dst: Ipv4Addr, ident: u16, seq: u16, payload: &[u8]) -> Option<Vec<u8>> {
        let (gw, src) = (self.gw_mac?, self.addr?.address());
        let icmp_len = 8 + payload.len();
        let mut f = vec![0u8; 14 + 20 + icmp_len];
        f[0..6].copy_from_slice(&gw);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len((20 + icmp_len) as u16);
        ip.set_ident(seq);
        ip.set_dont_frag(true);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Icmp);
        ip.set_src_addr(src);
        ip.set_dst_addr(dst);
        ip.fill_checksum();
        let mut icmp = Icmpv4Packet::new_unchecked(&mut f[34..]);
        icmp.set_msg_type(smoltcp::wire::Icmpv4Message::EchoRequest);
        icmp.set_msg_code(0);
        icmp.set_echo_ident(ident);
        icmp.set_echo_seq_no(seq);
        icmp.data_mut().copy_from_slice(payload);
        icmp.fill_checksum();
        Some(f)
    }

    fn ping_step(&mut self, ji: usize, now_us: u64) -> bool {
        let ident = 0x5000 + (self.idx as u16) * 64 + ji as u16;
        let key = crate::rng::derive(self.idx as u64, &format!("ping-{ji}"));
        let size = self.jobs[ji].spec.bytes as usize;
        let payload = |seq: u32| {
            let mut p = vec![0u8; size];
            Pattern::new(key ^ u64::from(seq)).fill(&mut p);
            p
        };
        let mut progress = false;
        let (mut next, mut attempts, mut last) = self.jobs[ji].ping.unwrap_or((0, 0, 0));
        for (id, seq, data) in std::mem::take(&mut self.echo_replies) {
            if id != ident {
                self.echo_replies.push((id, seq, data));
                continue;
            }
            progress = true;
            let j = &mut self.jobs[ji];
            if u32::from(seq) > next || data != payload(u32::from(seq)) {
                j.outcomes.push(Outcome::Corrupt(format!(
                    "echo reply {seq} differs from the request"
                )));
            } else if u32::from(seq) == next && j.outcomes.len() == next as usize {
                j.outcomes.push(Outcome::Complete {
                    bytes: data.len() as u64,
                    at_us: now_us,
                });
                next += 1;
                attempts = 0;
            }
        }
        let j = &self.jobs[ji];
        let deadline = (j.spec.deadline_s * 1e6) as u64;
        if next < j.spec.count && (attempts == 0 || now_us >= last + UDP_RETRY_US) {
            if attempts >= UDP_ATTEMPTS || now_us >= deadline {
                self.jobs[ji].outcomes.push(Outcome::Timeout {
                    detail: format!("echo request {next} unanswered after {attempts} attempts"),
                });
                next += 1;
                attempts = 0;
                progress = true;
            } else if let Some(f) =
                self.echo_request(*j.dst.ip(), ident, next as u16, &payload(next))
            {
                self.outbox.push(f);
                attempts += 1;
                last = now_us;
                progress = true;
            }
        }
        let j = &mut self.jobs[ji];
        j.ping = Some((next, attempts, last));
        if next >= j.spec.count {
            j.finished = true;
            progress = true;
        }
        progress
    }

    /// RFC 1337: a RST for a connection in TIME-WAIT is dropped (see the module docs).
    fn ignore_rst_in_time_wait(&mut self, now_us: u64) {
        use smoltcp::wire::TcpPacket;
        let sockets = &self.sockets;
        let in_time_wait = |lport: u16, raddr: Ipv4Addr, rport: u16| {
            sockets.iter().any(|(_, sock)| match sock {
                smoltcp::socket::Socket::Tcp(t) => {
                    t.state() == tcp::State::TimeWait
                        && t.local_endpoint().is_some_and(|e| e.port == lport)
                        && t.remote_endpoint().is_some_and(|e| {
                            e.port == rport && e.addr == smoltcp::wire::IpAddress::Ipv4(raddr)
                        })
                }
                _ => false,
            })
        };
        let before = self.inbox.len();
        self.inbox.retain(|f| {
            let Some(ip) = ipv4_of(f) else {
                return true;
            };
            if ip.next_header() != IpProtocol::Tcp {
                return true;
            }
            let Ok(t) = TcpPacket::new_checked(ip.payload()) else {
                return true;
            };
            !(t.rst() && in_time_wait(t.dst_port(), ip.src_addr(), t.src_port()))
        });
        if self.inbox.len() != before {
            let w = &mut *self.world.borrow_mut();
            w.trace.event(now_us, "rfc1337", self.idx as u64, &[]);
            let idx = self.idx;
            w.trace.log(now_us, || {
                format!("guest{idx} ignores a RST in TIME-WAIT (RFC 1337)")
            });
        }
    }

    /// The tiny PMTUD: an ICMP fragmentation-needed lowers the interface MTU.
    fn pmtud(&mut self, ts: Instant, now_us: u64) {
        let mut lowest = None;
        for f in &self.inbox {
            let Ok(eth) = EthernetFrame::new_checked(&f[..]) else {
                continue;
            };
            if eth.ethertype() != EthernetProtocol::Ipv4 {
                continue;
            }
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                continue;
            };
            if ip.next_header() != IpProtocol::Icmp {
                continue;
            }
            let Ok(icmp) = Icmpv4Packet::new_checked(ip.payload()) else {
                continue;
            };
            if u8::from(icmp.msg_type()) == 3 && icmp.msg_code() == 4 && icmp.verify_checksum() {
                let p = ip.payload();
                let mtu = usize::from(u16::from_be_bytes([p[6], p[7]]));
                if (576..self.mtu).contains(&mtu) {
                    lowest = Some(lowest.map_or(mtu, |l: usize| l.min(mtu)));
                }
            }
        }
        if let Some(m) = lowest {
            {
                let w = &mut *self.world.borrow_mut();
                w.guests[self.idx]
                    .mtu_changes
                    .push((now_us, m as u16, "pmtud"));
                w.trace.event(now_us, "pmtud", m as u64, &[]);
                w.trace
                    .log(now_us, || format!("guest{} PMTUD: MTU {m}", self.idx));
            }
            self.change_mtu(ts, m);
        }
    }

    fn dhcp_step(&mut self, now_us: u64) -> bool {
        let ev = match self.sockets.get_mut::<dhcpv4::Socket>(self.dhcp).poll() {
            None => None,
            Some(dhcpv4::Event::Configured(c)) => Some(Some((c.address, c.router))),
            Some(dhcpv4::Event::Deconfigured) => Some(None),
        };
        match ev {
            None => false,
            Some(Some((address, router))) => {
                self.addr = Some(address);
                self.router = router;
                self.apply_addr();
                let ip = address.address();
                if self.mutation == Mutation::Panic {
                    panic!("mutation: guest{} panics on its lease {ip}", self.idx);
                }
                let w = &mut *self.world.borrow_mut();
                w.guests[self.idx].lease = Some((ip, now_us));
                w.trace
                    .event(now_us, "lease", self.idx as u64, &ip.octets());
                w.trace
                    .log(now_us, || format!("guest{} DHCP lease {ip}", self.idx));
                true
            }
            Some(None) => {
                self.addr = None;
                self.router = None;
                self.apply_addr();
                let w = &mut *self.world.borrow_mut();
                w.trace.event(now_us, "unlease", self.idx as u64, &[]);
                true
            }
        }
    }

    /// Summary lines of a job.
    fn notes(&self, j: &JobRun) -> Vec<String> {
        let name = |ip: &Ipv4Addr| {
            self.upstreams
                .iter()
                .find(|u| u.1 == *ip)
                .map_or(ip.to_string(), |u| u.0.clone())
        };
        let mut v = Vec::new();
        if let Some(d) = &j.dns {
            let from: Vec<String> = d
                .from
                .iter()
                .map(|(ip, n)| format!("{}={n}", name(ip)))
                .collect();
            v.push(format!(
                "answered by: {}; TCP fallbacks {}; slowest {:.3}s",
                if from.is_empty() {
                    "-".into()
                } else {
                    from.join(" ")
                },
                d.tc_fallbacks,
                d.max_latency_us as f64 / 1e6
            ));
        }
        if let Some(s) = &j.serve {
            let src: Vec<String> = s
                .sources
                .iter()
                .map(|(ip, n)| format!("{ip}={n}"))
                .collect();
            let what = if j.spec.kind == JobKind::UdpServe {
                "datagrams"
            } else {
                "connections"
            };
            v.push(format!("{what} from: {}", src.join(" ")));
        }
        v
    }

    fn next_timer(&self, now_us: u64) -> Option<u64> {
        let mut t: Option<u64> = None;
        for ji in 0..self.jobs.len() {
            if !self.jobs[ji].finished {
                if let Some(x) = self.dns_timer(ji) {
                    t = Some(t.map_or(x, |t: u64| t.min(x)));
                }
            }
        }
        let mut consider = |x: u64| t = Some(t.map_or(x, |t| t.min(x)));
        for j in &self.jobs {
            if j.finished {
                continue;
            }
            let start = (j.spec.start_s * 1e6) as u64;
            if now_us < start {
                consider(start);
            }
            consider((j.spec.deadline_s * 1e6) as u64);
            if let Some(u) = &j.udp {
                consider(u.last_send + UDP_RETRY_US);
            }
            if let Some((_, _, last)) = j.ping {
                consider(last + UDP_RETRY_US);
            }
            if matches!(j.spec.kind, JobKind::Serve | JobKind::UdpServe) {
                // Looks for the clients to be done.
                consider(now_us + 100_000);
            }
            for c in &j.active {
                if let (Some(t), true) = (c.resume_at, c.pause_us > 0) {
                    consider(t);
                }
                if c.read_rate.is_some() {
                    // A slow reader reads again when it has earned another segment.
                    consider(now_us + 10_000);
                }
            }
        }
        for (_, since) in &self.closing {
            consider(since + LINGER_US);
        }
        t
    }

    /// The next free local port of the guest's range, skipping ports whose sockets are
    /// still open (TIME-WAIT included), as a kernel's connect() does.
    fn alloc_port(&mut self) -> Option<u16> {
        let (lo, hi) = self.ports;
        let span = u32::from(hi - lo) + 1;
        for _ in 0..span {
            let p = self.next_port;
            self.next_port = if p >= hi { lo } else { p + 1 };
            let busy = self.sockets.iter().any(|(_, sock)| match sock {
                smoltcp::socket::Socket::Tcp(t) => t.local_endpoint().is_some_and(|e| e.port == p),
                smoltcp::socket::Socket::Udp(u) => u.endpoint().port == p,
                _ => false,
            });
            if !busy {
                return Some(p);
            }
        }
        None
    }

    fn event(&mut self, now_us: u64, what: &str, n: u64, line: impl FnOnce() -> String) {
        let w = &mut *self.world.borrow_mut();
        w.trace.event(now_us, what, n, &[self.idx as u8]);
        let idx = self.idx;
        w.trace.log(now_us, || format!("guest{idx} {}", line()));
    }

    /// Advance every job; true if anything happened that needs another poll.
    fn workload_step(&mut self, now_us: u64) -> bool {
        let mut progress = false;
        // Sockets that finished their work and wait for the close handshake. They stay
        // through TIME-WAIT (smoltcp's timer ends it) so that the last ACK goes out and a
        // retransmitted FIN is answered, as a real guest does.
        let mut i = 0;
        while i < self.closing.len() {
            let (h, since) = self.closing[i];
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::Closed {
                self.sockets.remove(h);
                self.closing.swap_remove(i);
                continue;
            }
            if now_us >= since + LINGER_US {
                s.abort();
                progress = true;
                self.closing[i].1 = now_us;
            }
            i += 1;
        }
        if self.addr.is_none() {
            return progress;
        }
        for ji in 0..self.jobs.len() {
            if self.jobs[ji].finished {
                continue;
            }
            let start = (self.jobs[ji].spec.start_s * 1e6) as u64;
            if now_us < start {
                continue;
            }
            if self.jobs[ji].spec.kind == JobKind::UdpEcho {
                progress |= self.udp_step(ji, now_us);
                continue;
            }
            if self.jobs[ji].spec.kind == JobKind::Ping {
                progress |= self.ping_step(ji, now_us);
                continue;
            }
            if matches!(self.jobs[ji].spec.kind, JobKind::DnsUdp | JobKind::DnsTcp) {
                progress |= self.dns_step(ji, now_us);
                continue;
            }
            if self.jobs[ji].spec.kind == JobKind::Serve {
                progress |= self.serve_step(ji, now_us);
                continue;
            }
            if self.jobs[ji].spec.kind == JobKind::UdpServe {
                progress |= self.udp_serve_step(ji, now_us);
                continue;
            }
            let deadline = (self.jobs[ji].spec.deadline_s * 1e6) as u64;
            // Open connections up to the parallelism (while local ports are free).
            while self.jobs[ji].started < self.jobs[ji].spec.count
                && (self.jobs[ji].active.len() as u32) < self.jobs[ji].spec.parallel
                && now_us < deadline
            {
                let Some(port) = self.alloc_port() else {
                    break;
                };
                progress |= self.open_conn(ji, port, now_us);
            }
            let mut k = 0;
            while k < self.jobs[ji].active.len() {
                let (done, p) = self.conn_step(ji, k, now_us, deadline);
                progress |= p;
                if let Some(outcome) = done {
                    let c = self.jobs[ji].active.swap_remove(k);
                    let ok = matches!(outcome, Outcome::Complete { .. });
                    let desc = format!("{:?}", outcome);
                    let id = c.id;
                    self.event(now_us, "conn-end", u64::from(id), || {
                        format!("job{ji} conn{id} {desc}")
                    });
                    self.jobs[ji].outcomes.push(outcome);
                    if ok && self.mutation == Mutation::GuestVanishes {
                        // Mutation: the guest forgets the socket without a word.
                        self.sockets.remove(c.handle);
                    } else {
                        self.closing.push((c.handle, now_us));
                    }
                    progress = true;
                } else {
                    k += 1;
                }
            }
            let j = &mut self.jobs[ji];
            if j.active.is_empty() && (j.started == j.spec.count || now_us >= deadline) {
                while (j.outcomes.len() as u32) < j.spec.count {
                    j.outcomes.push(Outcome::Timeout {
                        detail: "never started before the deadline".into(),
                    });
                }
                j.finished = true;
                progress = true;
            }
        }
        progress
    }

    fn open_conn(&mut self, ji: usize, port: u16, now_us: u64) -> bool {
        let id = self.jobs[ji].started;
        self.jobs[ji].started += 1;
        let buf = self.buffer;
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buf]),
            tcp::SocketBuffer::new(vec![0; buf]),
        );
        s.set_nagle_enabled(false);
        let dst = self.jobs[ji].dst;
        let key = self.rng.u64();
        let spec = &self.jobs[ji].spec;
        let total = spec.bytes;
        let kind = spec.kind;
        if let Err(e) = s.connect(self.iface.context(), (*dst.ip(), dst.port()), port) {
            self.jobs[ji]
                .outcomes
                .push(Outcome::Corrupt(format!("guest could not connect: {e}")));
            return true;
        }
        let handle = self.sockets.add(s);
        let request = match kind {
            JobKind::Download => {
                let mut r = total.to_be_bytes().to_vec();
                r.extend_from_slice(&key.to_be_bytes());
                r
            }
            JobKind::Http => {
                format!("GET /{total}/{key} HTTP/1.0\r\nHost: {}\r\n\r\n", dst.ip()).into_bytes()
            }
            _ => Vec::new(),
        };
        let pause_us = (self.jobs[ji].spec.pause_s * 1e6) as u64;
        let read_rate = self.jobs[ji].spec.read_kbps.map(|k| k * 1000 / 8);
        self.jobs[ji].active.push(Conn {
            id,
            handle,
            kind,
            total,
            request,
            request_sent: 0,
            body_sent: 0,
            tx: Pattern::new(key),
            rx: Pattern::new(key),
            tx_hash: Fnv::default(),
            recvd: 0,
            header: Vec::new(),
            header_done: false,
            body_expected: 0,
            established: false,
            half_closed: false,
            eof: false,
            corrupt: None,
            http_status: None,
            pause_us,
            resume_at: None,
            read_rate,
            read_tokens: 0.0,
            read_refill: now_us,
        });
        self.event(now_us, "conn-open", u64::from(id), || {
            format!("job{ji} conn{id} {kind:?} :{port} -> {dst}")
        });
        true
    }

    /// One connection's step: (outcome if finished, progress).
    fn conn_step(
        &mut self,
        ji: usize,
        k: usize,
        now_us: u64,
        deadline: u64,
    ) -> (Option<Outcome>, bool) {
        let c = &mut self.jobs[ji].active[k];
        let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
        let mut progress = false;
        let state = s.state();
        if !matches!(
            state,
            tcp::State::SynSent | tcp::State::Closed | tcp::State::Listen
        ) {
            c.established = true;
        }
        // Send.
        let sends_body = matches!(c.kind, JobKind::Upload | JobKind::Echo | JobKind::HalfClose);
        while s.can_send() && c.request_sent < c.request.len() {
            let n = s.send_slice(&c.request[c.request_sent..]).unwrap_or(0);
            if n == 0 {
                break;
            }
            c.request_sent += n;
            progress = true;
        }
        let mut limit = c.total;
        if c.pause_us > 0 {
            let half = c.total / 2;
            match c.resume_at {
                Some(t) if now_us >= t => c.pause_us = 0,
                Some(_) => limit = half,
                None => {
                    limit = half;
                    if c.recvd >= half {
                        c.resume_at = Some(now_us + c.pause_us);
                        progress = true;
                    }
                }
            }
        }
        if sends_body {
            while s.can_send() && c.body_sent < limit {
                let left = limit - c.body_sent;
                let (tx, hash) = (&mut c.tx, &mut c.tx_hash);
                let n = s
                    .send(|buf| {
                        let n = (buf.len() as u64).min(left) as usize;
                        tx.fill(&mut buf[..n]);
                        hash.write(&buf[..n]);
                        (n, n)
                    })
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                c.body_sent += n as u64;
                progress = true;
            }
            if c.body_sent == c.total && !c.half_closed && c.established {
                s.close();
                c.half_closed = true;
                progress = true;
            }
        }
        // Receive (at the application's pace, if it is slow).
        let mut budget = usize::MAX;
        if let Some(rate) = c.read_rate {
            let burst = (rate as f64 / 20.0).max(2000.0);
            c.read_tokens = (c.read_tokens
                + now_us.saturating_sub(c.read_refill) as f64 * rate as f64 / 1e6)
                .min(burst);
            c.read_refill = now_us;
            budget = c.read_tokens as usize;
        }
        while s.can_recv() && budget > 0 {
            let r = s.recv(|buf| {
                let n = buf.len().min(budget);
                (n, (n, Self::absorb(c, &buf[..n])))
            });
            progress = true;
            match r {
                Ok((n, ())) => {
                    budget -= n;
                    if c.read_rate.is_some() {
                        c.read_tokens -= n as f64;
                    }
                }
                Err(_) => break,
            }
        }
        if !s.may_recv() && c.established && state != tcp::State::Closed {
            c.eof = true;
        }
        if let Some(why) = c.corrupt.take() {
            s.abort();
            return (Some(Outcome::Corrupt(why)), true);
        }
        if let (true, Some(status)) = (c.eof, c.http_status) {
            if !c.half_closed {
                s.close();
            }
            return (
                Some(Outcome::HttpError {
                    status,
                    at_us: now_us,
                }),
                true,
            );
        }
        let complete = c.established && c.eof && Self::received_all(c);
        if complete {
            if !c.half_closed {
                s.close();
                c.half_closed = true;
            }
            return (
                Some(Outcome::Complete {
                    bytes: c.recvd.max(c.body_sent),
                    at_us: now_us,
                }),
                true,
            );
        }
        if c.eof {
            // The peer finished early.
            if !c.half_closed {
                s.close();
            }
            return (
                Some(Outcome::Truncated {
                    got: c.recvd,
                    at_us: now_us,
                }),
                true,
            );
        }
        if state == tcp::State::Closed {
            return (
                Some(Outcome::Reset {
                    established: c.established,
                    at_us: now_us,
                }),
                true,
            );
        }
        if now_us >= deadline {
            let detail = format!(
                "state {state}, sent {}+{} of {}, received {}, eof {}",
                c.request_sent, c.body_sent, c.total, c.recvd, c.eof
            );
            s.abort();
            return (Some(Outcome::Timeout { detail }), true);
        }
        (None, progress)
    }

    /// Check received bytes against what they must be.
    fn absorb(c: &mut Conn, mut buf: &[u8]) {
        if c.corrupt.is_some() {
            return;
        }
        match c.kind {
            JobKind::Download | JobKind::Echo | JobKind::HalfClose => {
                if c.recvd + buf.len() as u64 > c.total {
                    c.corrupt = Some(format!(
                        "received {} bytes, more than the {} sent",
                        c.recvd + buf.len() as u64,
                        c.total
                    ));
                    return;
                }
                if let Some(off) = c.rx.check(buf) {
                    c.corrupt = Some(format!(
                        "byte {} differs from what was sent",
                        c.recvd + off as u64
                    ));
                }
                c.recvd += buf.len() as u64;
            }
            JobKind::Upload => {
                c.header.extend_from_slice(buf);
                c.recvd += buf.len() as u64;
                if c.header.len() > 16 {
                    c.corrupt = Some("sink replied with more than 16 bytes".into());
                } else if c.header.len() == 16 {
                    let count = u64::from_be_bytes(c.header[0..8].try_into().expect("8"));
                    let hash = u64::from_be_bytes(c.header[8..16].try_into().expect("8"));
                    if count != c.total || hash != c.tx_hash.0 {
                        c.corrupt = Some(format!(
                            "sink got {count} bytes hash {hash:016x}; sent {} hash {:016x}",
                            c.total, c.tx_hash.0
                        ));
                    }
                }
            }
            JobKind::Http => {
                if c.http_status.is_some() {
                    return;
                }
                if !c.header_done {
                    let take = buf.len();
                    c.header.extend_from_slice(buf);
                    buf = &[];
                    if let Some(end) = c.header.windows(4).position(|w| w == b"\r\n\r\n") {
                        c.header_done = true;
                        let head = String::from_utf8_lossy(&c.header[..end]).to_string();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.trim().parse::<u64>().ok());
                        let status = head
                            .strip_prefix("HTTP/1.1 ")
                            .and_then(|r| r.get(..3))
                            .and_then(|s| s.parse::<u16>().ok())
                            .filter(|s| *s >= 500);
                        if let Some(status) = status {
                            // An error of the daemon's proxy (HTTP/1.1, Connection: close).
                            c.http_status = Some(status);
                            return;
                        }
                        if !head.starts_with("HTTP/1.0 200 ") || len != Some(c.total) {
                            c.corrupt = Some(format!("bad HTTP response header {head:?}"));
                            return;
                        }
                        c.body_expected = c.total;
                        let body = c.header.split_off(end + 4);
                        let _ = take;
                        Self::absorb_body(c, &body);
                    } else if c.header.len() > 4096 {
                        c.corrupt = Some("HTTP header too long".into());
                    }
                }
                if !buf.is_empty() {
                    Self::absorb_body(c, buf);
                }
            }
            JobKind::Refused => {
                c.corrupt = Some("data on a connection that should be refused".into());
            }
            JobKind::UdpEcho
            | JobKind::Ping
            | JobKind::DnsUdp
            | JobKind::DnsTcp
            | JobKind::Serve
            | JobKind::UdpServe => unreachable!(),
        }
    }

    fn absorb_body(c: &mut Conn, buf: &[u8]) {
        if c.recvd + buf.len() as u64 > c.body_expected {
            c.corrupt = Some("HTTP body longer than Content-Length".into());
            return;
        }
        if let Some(off) = c.rx.check(buf) {
            c.corrupt = Some(format!("HTTP body byte {} differs", c.recvd + off as u64));
        }
        c.recvd += buf.len() as u64;
    }

    fn received_all(c: &Conn) -> bool {
        match c.kind {
            JobKind::Download | JobKind::Echo | JobKind::HalfClose => {
                c.recvd == c.total
                    && c.body_sent
                        == if c.kind == JobKind::Download {
                            0
                        } else {
                            c.total
                        }
            }
            JobKind::Upload => c.header.len() == 16,
            JobKind::Http => c.header_done && c.recvd == c.body_expected,
            JobKind::Refused => false,
            JobKind::UdpEcho
            | JobKind::Ping
            | JobKind::DnsUdp
            | JobKind::DnsTcp
            | JobKind::Serve
            | JobKind::UdpServe => false,
        }
    }

    fn udp_payload(key: u64, i: u32, len: u64) -> Vec<u8> {
        let mut p = vec![0u8; (len as usize).max(4)];
        p[0..4].copy_from_slice(&i.to_be_bytes());
        Pattern::new(key ^ u64::from(i)).fill(&mut p[4..]);
        p
    }

    fn udp_step(&mut self, ji: usize, now_us: u64) -> bool {
        let mut progress = false;
        if self.jobs[ji].udp.is_none() {
            let Some(port) = self.alloc_port() else {
                return false;
            };
            let mut s = udp::Socket::new(
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 32], vec![0; 65536]),
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 32], vec![0; 65536]),
            );
            let _ = s.bind(port);
            let handle = self.sockets.add(s);
            self.jobs[ji].udp = Some(UdpRun {
                handle,
                next: 0,
                attempts: 0,
                last_send: 0,
            });
            progress = true;
        }
        let key = crate::rng::derive(self.idx as u64, &format!("udp-{ji}"));
        let j = &mut self.jobs[ji];
        let u = j.udp.as_mut().expect("set");
        let s = self.sockets.get_mut::<udp::Socket>(u.handle);
        // Replies.
        while let Ok((data, _meta)) = s.recv() {
            progress = true;
            if data.len() < 4 {
                j.outcomes.push(Outcome::Corrupt("runt UDP reply".into()));
                continue;
            }
            let i = u32::from_be_bytes(data[0..4].try_into().expect("4"));
            if i > u.next || data != &Self::udp_payload(key, i, j.spec.bytes)[..] {
                j.outcomes.push(Outcome::Corrupt(format!(
                    "UDP reply {i} differs from what was sent"
                )));
                continue;
            }
            if i == u.next && (u.next as usize) == j.outcomes.len() {
                j.outcomes.push(Outcome::Complete {
                    bytes: data.len() as u64,
                    at_us: now_us,
                });
                u.next += 1;
                u.attempts = 0;
            }
        }
        let deadline = (j.spec.deadline_s * 1e6) as u64;
        if u.next < j.spec.count && (u.attempts == 0 || now_us >= u.last_send + UDP_RETRY_US) {
            if u.attempts >= UDP_ATTEMPTS || now_us >= deadline {
                j.outcomes.push(Outcome::Timeout {
                    detail: format!(
                        "datagram {} unanswered after {} attempts",
                        u.next, u.attempts
                    ),
                });
                u.next += 1;
                u.attempts = 0;
                progress = true;
            } else {
                let p = Self::udp_payload(key, u.next, j.spec.bytes);
                if s.send_slice(&p, (*j.dst.ip(), j.dst.port())).is_ok() {
                    u.attempts += 1;
                    u.last_send = now_us;
                    progress = true;
                }
            }
        }
        if u.next >= j.spec.count {
            let h = u.handle;
            j.finished = true;
            j.udp = None;
            self.sockets.remove(h);
            progress = true;
        }
        progress
    }
}

/// The IPv4 packet an Ethernet frame carries, if it carries one.
pub(crate) fn ipv4_of(frame: &[u8]) -> Option<Ipv4Packet<&[u8]>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    Ipv4Packet::new_checked(eth.payload()).ok()
}
