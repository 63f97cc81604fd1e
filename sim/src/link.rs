//! The guest link: our own event-driven model of an Ethernet segment between the daemon and
//! its guests. Two directions, each a queue of frames with delivery times; every random
//! choice comes from a ChaCha stream of the run's seed (one stream per purpose and
//! direction). Faults: independent and bursty (Gilbert-Elliott) loss, duplication,
//! reordering and jitter, latency, a bandwidth limit with a drop-tail queue, down windows,
//! and an MTU limit that can change mid-run.
//!
//! The link also watches what crosses it: checksums of every frame the daemon emits (an
//! oracle), and TCP segments per direction to count retransmissions and duplicate ACKs.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, TcpPacket,
    UdpPacket,
};

use crate::rng::Draw;
use crate::scenario::FaultBounds;
use crate::trace::Trace;

pub const ETH_HDR: usize = 14;

/// Direction of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Guest to daemon.
    G2d = 0,
    /// Daemon to guest.
    D2g = 1,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Dir::G2d => "g>d",
            Dir::D2g => "d>g",
        }
    }
}

/// The faults of one run, drawn from the scenario's bounds by the swarm stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkParams {
    pub latency_us: u64,
    pub jitter_us: u64,
    pub loss: f64,
    /// Gilbert-Elliott in continuous time: (mean good period µs, mean bad period µs, loss
    /// in the bad state). Bursts last a time, not a number of frames, so a sparse flow in
    /// RTO backoff is not stuck in one endless burst.
    pub burst: Option<(u64, u64, f64)>,
    /// Faults stop at this time (µs): loss, bursts, duplication, reordering, jitter and
    /// down windows end, latency and bandwidth stay. Liveness is judged after it.
    pub heal_us: u64,
    pub dup: f64,
    pub reorder: f64,
    pub reorder_delay_us: u64,
    pub bandwidth_bps: Option<u64>,
    pub queue_bytes: u64,
    /// (start, end) in µs.
    pub down: Vec<(u64, u64)>,
}

impl LinkParams {
    /// Draw this seed's fault mix within `b`.
    pub fn draw(b: &FaultBounds, seed: u64) -> Self {
        let mut d = Draw::new(seed, "swarm");
        let on = |name: &str, d: &mut Draw| -> bool {
            // Always draw, so that the stream does not depend on which faults are given.
            let coin = d.unit();
            b.no_swarm || b.required.iter().any(|r| r == name) || coin >= 1.0 / 3.0
        };
        let mut p = LinkParams {
            queue_bytes: 256 * 1024,
            heal_us: (b.heal_s * 1e6) as u64,
            ..Default::default()
        };
        if let Some([lo, hi]) = b.latency_ms {
            // Latency is not a fault: always on.
            p.latency_us = (d.range_f(lo, hi) * 1000.0) as u64;
        }
        if let Some([lo, hi]) = b.jitter_ms {
            if on("jitter", &mut d) {
                p.jitter_us = (d.range_f(lo, hi) * 1000.0) as u64;
            }
        }
        if let Some([lo, hi]) = b.loss {
            if on("loss", &mut d) {
                p.loss = d.range_f(lo, hi);
            }
        }
        if let Some([lo, hi]) = b.burst_loss {
            if on("burst_loss", &mut d) {
                let good = d.range_u(200_000, 5_000_000);
                let bad = d.range_u(5_000, 200_000);
                p.burst = Some((good, bad, d.range_f(lo, hi)));
            }
        }
        if let Some([lo, hi]) = b.dup {
            if on("dup", &mut d) {
                p.dup = d.range_f(lo, hi);
            }
        }
        if let Some([lo, hi]) = b.reorder {
            if on("reorder", &mut d) {
                p.reorder = d.range_f(lo, hi);
                p.reorder_delay_us = d.range_u(1_000, 20_000);
            }
        }
        if let Some([lo, hi]) = b.bandwidth_mbps {
            if on("bandwidth", &mut d) {
                let (l, h) = (lo.max(0.01).ln(), hi.max(0.01).ln());
                p.bandwidth_bps = Some((d.range_f(l, h).exp() * 1e6) as u64);
                if let Some([lo, hi]) = b.queue_kb {
                    p.queue_bytes = (d.range_f(lo, hi) * 1024.0) as u64;
                }
            }
        }
        if let Some(db) = &b.down {
            if on("down", &mut d) {
                let n = d.range_u(u64::from(db.count[0]), u64::from(db.count[1]));
                for _ in 0..n {
                    let start = (d.range_f(0.0, db.before_s) * 1e6) as u64;
                    let len = (d.range_f(db.ms[0], db.ms[1]) * 1000.0) as u64;
                    p.down.push((start, start + len));
                }
                p.down.sort_unstable();
            }
        }
        p
    }

    /// One line for failure reports and snapshots.
    pub fn describe(&self) -> String {
        let mut s = format!("latency={}ms", self.latency_us as f64 / 1000.0);
        if self.jitter_us > 0 {
            let _ = write!(s, " jitter={}ms", self.jitter_us as f64 / 1000.0);
        }
        if self.loss > 0.0 {
            let _ = write!(s, " loss={:.4}", self.loss);
        }
        if let Some((g, b, l)) = self.burst {
            let _ = write!(
                s,
                " burst(good={}ms,bad={}ms,loss={l:.3})",
                g / 1000,
                b / 1000
            );
        }
        if self.dup > 0.0 {
            let _ = write!(s, " dup={:.4}", self.dup);
        }
        if self.reorder > 0.0 {
            let _ = write!(
                s,
                " reorder={:.4}/{}ms",
                self.reorder,
                self.reorder_delay_us as f64 / 1000.0
            );
        }
        if let Some(bw) = self.bandwidth_bps {
            let _ = write!(s, " bw={:.2}Mbit/s", bw as f64 / 1e6);
            if self.queue_bytes != 256 * 1024 {
                let _ = write!(s, " queue={}KiB", self.queue_bytes / 1024);
            }
        }
        for (a, b) in &self.down {
            let _ = write!(s, " down[{:.3}s..{:.3}s]", *a as f64 / 1e6, *b as f64 / 1e6);
        }
        let _ = write!(s, " heal={}s", self.heal_us as f64 / 1e6);
        s
    }
}

/// Counters of one direction.
#[derive(Clone, Debug, Default)]
pub struct DirStats {
    pub frames: u64,
    pub bytes: u64,
    pub delivered: u64,
    pub lost: u64,
    pub down_dropped: u64,
    pub queue_dropped: u64,
    pub mtu_dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub tcp_segments: u64,
    pub tcp_payload: u64,
    pub tcp_retrans: u64,
    pub tcp_dup_acks: u64,
    pub keepalives: u64,
    /// Times the daemon's transport was held back (backpressure).
    pub held: u64,
    pub syns: u64,
    pub rsts: u64,
    pub fins: u64,
}

#[derive(Default)]
struct SegWatch {
    /// Highest sequence number seen + length (next expected new byte).
    max_end: Option<u32>,
    last_ack: Option<u32>,
}

struct DirState {
    loss: Draw,
    burst: Draw,
    dup: Draw,
    delay: Draw,
    reorder: Draw,
    bad: bool,
    /// When the Gilbert-Elliott chain changes state next.
    switch_at: Option<u64>,
    /// When the wire is free again (bandwidth limit).
    busy_until: u64,
    /// Latest delivery time given so far (jitter keeps order unless a frame is reordered).
    last_delivery: u64,
    /// Frames with delivery times.
    stats: DirStats,
    watch: BTreeMap<(Ipv4Addr, u16, Ipv4Addr, u16), SegWatch>,
    /// IP MTU limit of this direction (frames above are dropped).
    mtu: Option<usize>,
    /// Frames above `mtu` count as a failure of whoever sent them (they were told).
    mtu_strict: bool,
}

impl DirState {
    fn new(seed: u64, dir: Dir) -> Self {
        let n = dir.name();
        DirState {
            loss: Draw::new(seed, &format!("link-loss-{n}")),
            burst: Draw::new(seed, &format!("link-burst-{n}")),
            dup: Draw::new(seed, &format!("link-dup-{n}")),
            delay: Draw::new(seed, &format!("link-delay-{n}")),
            reorder: Draw::new(seed, &format!("link-reorder-{n}")),
            bad: false,
            switch_at: None,
            busy_until: 0,
            last_delivery: 0,
            stats: DirStats::default(),
            watch: BTreeMap::new(),
            mtu: None,
            mtu_strict: false,
        }
    }
}

/// The link between the daemon and every guest.
pub struct Link {
    pub params: LinkParams,
    dirs: [DirState; 2],
    /// Frames on their way to the daemon, by (delivery time, order).
    to_daemon: BTreeMap<(u64, u64), Vec<u8>>,
    /// Frames on their way to each guest.
    to_guest: Vec<BTreeMap<(u64, u64), Vec<u8>>>,
    guest_macs: Vec<[u8; 6]>,
    order: u64,
    /// TCP payload bytes carried (both directions), for byte-triggered events.
    pub tcp_bytes: u64,
    /// Safety violations seen on the wire.
    pub violations: Vec<String>,
    /// Towards the guests, a full queue holds the daemon back (the stream transport stops
    /// reading) instead of dropping: the production backpressure path.
    pub backpressure: bool,
}

/// What the link did with a frame.
pub enum Sent {
    Queued,
    Dropped,
}

impl Link {
    pub fn new(params: LinkParams, seed: u64, guest_macs: Vec<[u8; 6]>) -> Self {
        Link {
            params,
            dirs: [DirState::new(seed, Dir::G2d), DirState::new(seed, Dir::D2g)],
            to_daemon: BTreeMap::new(),
            to_guest: guest_macs.iter().map(|_| BTreeMap::new()).collect(),
            guest_macs,
            order: 0,
            tcp_bytes: 0,
            violations: Vec::new(),
            backpressure: false,
        }
    }

    pub fn stats(&self, dir: Dir) -> &DirStats {
        &self.dirs[dir as usize].stats
    }

    /// Limit the IP MTU of a direction; `strict`: a bigger frame is a sender's bug.
    pub fn set_mtu(&mut self, dir: Dir, mtu: Option<usize>, strict: bool) {
        self.dirs[dir as usize].mtu = mtu;
        self.dirs[dir as usize].mtu_strict = strict;
    }

    fn is_down(&self, now: u64) -> bool {
        now < self.params.heal_us
            && self
                .params
                .down
                .iter()
                .any(|(a, b)| (*a..*b).contains(&now))
    }

    /// A frame enters the link at `now` (µs).
    pub fn send(&mut self, trace: &mut Trace, dir: Dir, now: u64, frame: &[u8]) -> Sent {
        let d = dir as usize;
        trace.event(now, dir.name(), 0, frame);
        {
            let st = &mut self.dirs[d].stats;
            st.frames += 1;
            st.bytes += frame.len() as u64;
        }
        let tag = self.watch(dir, now, frame);
        if trace.logging() {
            let desc = describe(frame);
            trace.log(now, || format!("{} send {desc}{tag}", dir.name()));
        }
        if self.is_down(now) {
            self.dirs[d].stats.down_dropped += 1;
            return self.drop(trace, dir, now, "down");
        }
        if let Some(mtu) = self.dirs[d].mtu {
            if frame.len() > mtu + ETH_HDR {
                self.dirs[d].stats.mtu_dropped += 1;
                if self.dirs[d].mtu_strict || dir == Dir::D2g {
                    self.violations.push(format!(
                        "{}: a {}-byte frame exceeds the MTU {} its sender was told of at {:.6}s",
                        dir.name(),
                        frame.len(),
                        mtu,
                        now as f64 / 1e6
                    ));
                }
                return self.drop(trace, dir, now, "mtu");
            }
        }
        let params = &self.params;
        let ds = &mut self.dirs[d];
        let faulty = now < params.heal_us;
        // Loss: independent, then Gilbert-Elliott.
        let mut lost = ds.loss.chance(params.loss) && faulty;
        if let Some((good, bad, lb)) = params.burst {
            let mut at = *ds.switch_at.get_or_insert_with(|| exp(&mut ds.burst, good));
            while at <= now {
                ds.bad = !ds.bad;
                at += exp(&mut ds.burst, if ds.bad { bad } else { good });
            }
            ds.switch_at = Some(at);
            let l = ds.burst.unit();
            if ds.bad && l < lb && faulty {
                lost = true;
            }
        }
        if lost {
            ds.stats.lost += 1;
            return self.drop(trace, dir, now, "loss");
        }
        // Bandwidth: serialise behind what is already on the wire; drop-tail queue.
        let mut depart = now;
        if let Some(bw) = params.bandwidth_bps {
            let start = ds.busy_until.max(now);
            let backlog_bytes = (start - now) * bw / 8_000_000;
            // With backpressure the sender waits instead (see `Link::d2g_wait`).
            if backlog_bytes > params.queue_bytes && !(dir == Dir::D2g && self.backpressure) {
                ds.stats.queue_dropped += 1;
                return self.drop(trace, dir, now, "queue");
            }
            ds.busy_until = start + (frame.len() as u64 * 8 * 1_000_000).div_ceil(bw);
            depart = ds.busy_until;
        }
        let jitter = if params.jitter_us > 0 && faulty {
            ds.delay.range_u(0, params.jitter_us)
        } else {
            0
        };
        let mut at = (depart + params.latency_us + jitter).max(ds.last_delivery);
        let reordered = ds.reorder.chance(params.reorder) && faulty;
        if reordered {
            // Held back: later frames overtake it.
            at += params.reorder_delay_us;
            ds.stats.reordered += 1;
        } else {
            ds.last_delivery = at;
        }
        let dup = ds.dup.chance(params.dup) && faulty;
        let dup_at = at + ds.dup.range_u(0, 2_000);
        if dup {
            ds.stats.duplicated += 1;
        }
        trace.event(now, "queued", at, &[u8::from(dup), u8::from(reordered)]);
        trace.log(now, || {
            format!(
                "{} queued for {:.6}s{}{}",
                dir.name(),
                at as f64 / 1e6,
                if reordered { " (reordered)" } else { "" },
                if dup { " (duplicated)" } else { "" }
            )
        });
        self.enqueue(dir, at, frame);
        if dup {
            self.enqueue(dir, dup_at, frame);
        }
        Sent::Queued
    }

    fn drop(&mut self, trace: &mut Trace, dir: Dir, now: u64, why: &str) -> Sent {
        trace.event(now, "drop", 0, why.as_bytes());
        trace.log(now, || format!("{} DROP ({why})", dir.name()));
        Sent::Dropped
    }

    fn enqueue(&mut self, dir: Dir, at: u64, frame: &[u8]) {
        self.order += 1;
        let key = (at, self.order);
        match dir {
            Dir::G2d => {
                self.to_daemon.insert(key, frame.to_vec());
            }
            Dir::D2g => {
                let dst: [u8; 6] = frame[0..6].try_into().expect("ethernet");
                let mut any = false;
                for (i, mac) in self.guest_macs.iter().enumerate() {
                    if dst == *mac || dst[0] & 1 == 1 {
                        self.to_guest[i].insert(key, frame.to_vec());
                        any = true;
                    }
                }
                if !any {
                    self.violations
                        .push(format!("d>g: frame to unknown MAC {}", fmt_mac(&dst)));
                }
            }
        }
    }

    /// Move frames due by `now` towards the daemon into `out`.
    pub fn take_for_daemon(&mut self, trace: &mut Trace, now: u64, out: &mut VecDeque<Vec<u8>>) {
        while let Some(entry) = self.to_daemon.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let f = entry.remove();
            self.dirs[0].stats.delivered += 1;
            trace.event(now, "deliver-d", 0, &[]);
            out.push_back(f);
        }
    }

    /// Count a backpressure wait.
    pub fn note_held(&mut self) {
        self.dirs[Dir::D2g as usize].stats.held += 1;
    }

    /// With backpressure, when the daemon may put its next frame on the link (`None`: now).
    pub fn d2g_wait(&self, now: u64) -> Option<u64> {
        let bw = self.params.bandwidth_bps?;
        if !self.backpressure {
            return None;
        }
        let busy = self.dirs[Dir::D2g as usize].busy_until;
        let queue_us = self.params.queue_bytes * 8_000_000 / bw;
        let ready = busy.saturating_sub(queue_us);
        (ready > now).then_some(ready)
    }

    pub fn next_for_daemon(&self) -> Option<u64> {
        self.to_daemon.keys().next().map(|k| k.0)
    }

    pub fn take_for_guest(
        &mut self,
        trace: &mut Trace,
        guest: usize,
        now: u64,
        out: &mut VecDeque<Vec<u8>>,
    ) {
        while let Some(entry) = self.to_guest[guest].first_entry() {
            if entry.key().0 > now {
                break;
            }
            let f = entry.remove();
            self.dirs[1].stats.delivered += 1;
            trace.event(now, "deliver-g", guest as u64, &[]);
            out.push_back(f);
        }
    }

    pub fn next_for_guest(&self, guest: usize) -> Option<u64> {
        self.to_guest[guest].keys().next().map(|k| k.0)
    }

    /// Check what crosses the wire: checksums of the daemon's frames, TCP bookkeeping.
    /// Returns a tag for the log (retransmission, duplicate ACK, keep-alive).
    fn watch(&mut self, dir: Dir, now: u64, frame: &[u8]) -> &'static str {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            if dir == Dir::D2g {
                self.violations.push(format!(
                    "d>g: truncated Ethernet frame ({} bytes)",
                    frame.len()
                ));
            }
            return "";
        };
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            return "";
        }
        let bad = |what: &str| {
            format!(
                "d>g at {:.6}s: {what}: {}",
                now as f64 / 1e6,
                describe(frame)
            )
        };
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            if dir == Dir::D2g {
                self.violations.push(bad("malformed IPv4 header"));
            }
            return "";
        };
        if dir == Dir::D2g {
            if !ip.verify_checksum() {
                self.violations.push(bad("bad IPv4 header checksum"));
            }
            if usize::from(ip.total_len()) != eth.payload().len() {
                self.violations
                    .push(bad("IPv4 length does not match the frame"));
            }
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let (s, d) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
        match ip.next_header() {
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                    if dir == Dir::D2g {
                        self.violations.push(bad("malformed TCP header"));
                    }
                    return "";
                };
                if dir == Dir::D2g && !tcp.verify_checksum(&s, &d) {
                    self.violations.push(bad("bad TCP checksum"));
                }
                let len = tcp.payload().len() as u32;
                let st = &mut self.dirs[dir as usize];
                st.stats.tcp_segments += 1;
                st.stats.tcp_payload += u64::from(len);
                self.tcp_bytes += u64::from(len);
                if tcp.syn() {
                    st.stats.syns += 1;
                }
                if tcp.fin() {
                    st.stats.fins += 1;
                }
                if tcp.rst() {
                    st.stats.rsts += 1;
                    return "";
                }
                let key = (src, tcp.src_port(), dst, tcp.dst_port());
                let seq = tcp.seq_number().0 as u32;
                let w = st.watch.entry(key).or_default();
                // A SYN (or SYN-ACK) starts a new connection on this 4-tuple, unless it
                // repeats the last one.
                if tcp.syn() {
                    let again = w.max_end == Some(seq.wrapping_add(1));
                    if again {
                        st.stats.tcp_retrans += 1;
                    }
                    *w = SegWatch {
                        max_end: Some(seq.wrapping_add(1)),
                        last_ack: None,
                    };
                    return if again { " RETRANSMISSION" } else { "" };
                }
                let seg_len = len + u32::from(tcp.syn()) + u32::from(tcp.fin());
                let mut tag = "";
                if seg_len > 0 {
                    let end = seq.wrapping_add(seg_len);
                    match w.max_end {
                        // A keep-alive: one old byte (or none) just below the next new one.
                        Some(m)
                            if len <= 1 && !tcp.syn() && !tcp.fin() && seq == m.wrapping_sub(1) =>
                        {
                            st.stats.keepalives += 1;
                            tag = " KEEP-ALIVE";
                        }
                        Some(m) if (seq.wrapping_sub(m) as i32) < 0 => {
                            st.stats.tcp_retrans += 1;
                            tag = " RETRANSMISSION";
                            if (end.wrapping_sub(m) as i32) > 0 {
                                w.max_end = Some(end);
                            }
                        }
                        _ => w.max_end = Some(end),
                    }
                } else if tcp.ack() && w.last_ack == Some(tcp.ack_number().0 as u32) {
                    st.stats.tcp_dup_acks += 1;
                    tag = " DUP-ACK";
                }
                if tcp.ack() {
                    w.last_ack = Some(tcp.ack_number().0 as u32);
                }
                return tag;
            }
            IpProtocol::Udp if dir == Dir::D2g => match UdpPacket::new_checked(ip.payload()) {
                Ok(udp) => {
                    if udp.checksum() != 0 && !udp.verify_checksum(&s, &d) {
                        self.violations.push(bad("bad UDP checksum"));
                    }
                }
                Err(_) => self.violations.push(bad("malformed UDP header")),
            },
            IpProtocol::Icmp if dir == Dir::D2g => match Icmpv4Packet::new_checked(ip.payload()) {
                Ok(icmp) => {
                    if !icmp.verify_checksum() {
                        self.violations.push(bad("bad ICMP checksum"));
                    }
                }
                Err(_) => self.violations.push(bad("malformed ICMP header")),
            },
            _ => {}
        }
        ""
    }
}

/// An exponentially distributed duration of mean `mean` µs (at least 1).
fn exp(d: &mut Draw, mean: u64) -> u64 {
    let u = d.unit();
    ((-(1.0 - u).ln()) * mean as f64).max(1.0) as u64
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A one-line description of a frame, tcpdump style.
pub fn describe(frame: &[u8]) -> String {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return format!("runt {}B", frame.len());
    };
    match eth.ethertype() {
        EthernetProtocol::Arp => return format!("ARP {}B", frame.len()),
        EthernetProtocol::Ipv4 => {}
        other => return format!("ethertype {other} {}B", frame.len()),
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return format!("bad IPv4 {}B", frame.len());
    };
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    match ip.next_header() {
        IpProtocol::Tcp => match TcpPacket::new_checked(ip.payload()) {
            Ok(t) => {
                let mut flags = String::new();
                for (on, c) in [
                    (t.syn(), 'S'),
                    (t.fin(), 'F'),
                    (t.rst(), 'R'),
                    (t.psh(), 'P'),
                    (t.ack(), '.'),
                ] {
                    if on {
                        flags.push(c);
                    }
                }
                format!(
                    "TCP {src}:{} > {dst}:{} [{flags}] seq={} ack={} win={} len={}",
                    t.src_port(),
                    t.dst_port(),
                    t.seq_number().0 as u32,
                    t.ack_number().0 as u32,
                    t.window_len(),
                    t.payload().len()
                )
            }
            Err(_) => format!("TCP {src} > {dst} malformed"),
        },
        IpProtocol::Udp => match UdpPacket::new_checked(ip.payload()) {
            Ok(u) => format!(
                "UDP {src}:{} > {dst}:{} len={}",
                u.src_port(),
                u.dst_port(),
                u.payload().len()
            ),
            Err(_) => format!("UDP {src} > {dst} malformed"),
        },
        IpProtocol::Icmp => match Icmpv4Packet::new_checked(ip.payload()) {
            Ok(i) => format!(
                "ICMP {src} > {dst} type={} code={} len={}",
                u8::from(i.msg_type()),
                i.msg_code(),
                ip.total_len()
            ),
            Err(_) => format!("ICMP {src} > {dst} malformed"),
        },
        p => format!("IP proto {p} {src} > {dst}"),
    }
}
