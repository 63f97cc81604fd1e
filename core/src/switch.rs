//! A layer-2 learning switch joining several guests and the gateway (the [`Stack`]).
//!
//! Sans-IO like the rest of the core: the owner tells the switch which ports exist and
//! hands it each frame's bytes; the switch learns source addresses and answers where the
//! frame goes ([`Verdict`]). Moving the bytes is the owner's job. Guest-to-guest unicast
//! never enters the stack: it is forwarded here, at layer 2.
//!
//! The MAC table is bounded ([`SwitchConfig::max_macs`]) and its entries age out
//! ([`SwitchConfig::aging`]); a port that leaves takes its entries with it, so a
//! reconnecting guest is learnt afresh wherever it reappears.
//!
//! [`Stack`]: crate::Stack

use std::collections::BTreeMap;

use crate::{Duration, Instant};

/// A guest port. Ids are never reused, so a stale id names no port rather than a newer
/// guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId(pub u64);

impl std::fmt::Display for PortId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "port{}", self.0)
    }
}

/// Limits and identity of the switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// The gateway's (the stack's) MAC address: frames for it go to the stack.
    pub gateway_mac: [u8; 6],
    /// Guest ports at most; [`Switch::add_port`] refuses more.
    pub max_ports: usize,
    /// Learnt addresses at most. When full, a new address is not learnt (frames to it
    /// are flooded) until aged entries make room.
    pub max_macs: usize,
    /// An address not seen for this long is forgotten.
    pub aging: Duration,
}

impl SwitchConfig {
    pub fn new(gateway_mac: [u8; 6]) -> Self {
        SwitchConfig {
            gateway_mac,
            max_ports: 256,
            max_macs: 4096,
            aging: Duration::from_secs(300),
        }
    }
}

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// To the stack only.
    Gateway,
    /// To this guest port only.
    Port(PortId),
    /// To every guest port but the one it came in on, and to the stack if `gateway`.
    Flood { gateway: bool },
    /// Nowhere.
    Drop(SwitchDrop),
}

/// Why the switch dropped a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SwitchDrop {
    /// Shorter than an Ethernet header.
    Runt,
    /// A multicast source address is never legitimate.
    MulticastSource,
    /// A guest sent with the gateway's address as its source.
    GatewaySpoof,
    /// The destination sits on the port the frame came in on.
    SamePort,
    /// The ingress port is not (or no longer) on the switch.
    UnknownPort,
}

impl SwitchDrop {
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchDrop::Runt => "runt",
            SwitchDrop::MulticastSource => "multicast_source",
            SwitchDrop::GatewaySpoof => "gateway_spoof",
            SwitchDrop::SamePort => "same_port",
            SwitchDrop::UnknownPort => "unknown_port",
        }
    }
}

/// Counters of one guest port. `rx` is from the guest, `tx` towards it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from this guest the switch dropped ([`SwitchDrop`]).
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames for this guest its owner could not queue (the guest reads too slowly).
    pub tx_dropped: u64,
}

#[derive(Clone, Copy, Debug)]
struct MacEntry {
    port: PortId,
    seen: Instant,
}

/// The switch: its ports, their counters and the MAC table.
#[derive(Debug)]
pub struct Switch {
    config: SwitchConfig,
    ports: BTreeMap<PortId, PortStats>,
    next_port: u64,
    macs: BTreeMap<[u8; 6], MacEntry>,
    /// When aged entries were last swept (a sweep walks the table: at most once per
    /// aging/8 even when a guest floods new source addresses).
    last_sweep: Option<Instant>,
    /// Addresses not learnt because the table was full.
    pub learn_refused: u64,
}

fn is_multicast(mac: &[u8]) -> bool {
    mac[0] & 1 == 1
}

impl Switch {
    pub fn new(config: SwitchConfig) -> Self {
        Switch {
            config,
            ports: BTreeMap::new(),
            next_port: 1,
            macs: BTreeMap::new(),
            last_sweep: None,
            learn_refused: 0,
        }
    }

    pub fn config(&self) -> &SwitchConfig {
        &self.config
    }

    /// A new guest port, or `None` when [`SwitchConfig::max_ports`] are in use.
    pub fn add_port(&mut self) -> Option<PortId> {
        if self.ports.len() >= self.config.max_ports {
            return None;
        }
        let id = PortId(self.next_port);
        self.next_port += 1;
        self.ports.insert(id, PortStats::default());
        Some(id)
    }

    /// A guest left: its port and every address learnt on it are gone. Returns the
    /// port's final counters.
    pub fn remove_port(&mut self, port: PortId) -> Option<PortStats> {
        let stats = self.ports.remove(&port)?;
        self.macs.retain(|_, e| e.port != port);
        Some(stats)
    }

    /// The guest ports, in the order they joined.
    pub fn ports(&self) -> impl Iterator<Item = (PortId, &PortStats)> + '_ {
        self.ports.iter().map(|(p, s)| (*p, s))
    }

    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    pub fn port_stats(&self, port: PortId) -> Option<&PortStats> {
        self.ports.get(&port)
    }

    /// Addresses learnt on `port` and not aged out at `now`.
    pub fn macs_of(&self, now: Instant, port: PortId) -> impl Iterator<Item = [u8; 6]> + '_ {
        let aging = self.config.aging;
        self.macs
            .iter()
            .filter(move |(_, e)| e.port == port && now - e.seen < aging)
            .map(|(m, _)| *m)
    }

    pub fn mac_count(&self) -> usize {
        self.macs.len()
    }

    /// The port `mac` was last seen on, unless aged out.
    pub fn lookup(&self, now: Instant, mac: &[u8; 6]) -> Option<PortId> {
        self.macs
            .get(mac)
            .filter(|e| now - e.seen < self.config.aging)
            .map(|e| e.port)
    }

    /// The guest port a frame's unicast destination was learnt on, without learning or
    /// counting anything (to check the destination can take it before switching).
    pub fn destination(&self, now: Instant, frame: &[u8]) -> Option<PortId> {
        let dst: [u8; 6] = frame.get(0..6)?.try_into().ok()?;
        if is_multicast(&dst) || dst == self.config.gateway_mac {
            return None;
        }
        self.lookup(now, &dst)
    }

    /// A frame from guest `port`: learn its source, count it, say where it goes.
    pub fn from_guest(&mut self, now: Instant, port: PortId, frame: &[u8]) -> Verdict {
        let Some(stats) = self.ports.get_mut(&port) else {
            return Verdict::Drop(SwitchDrop::UnknownPort);
        };
        stats.rx_frames += 1;
        stats.rx_bytes += frame.len() as u64;
        let verdict = self.decide(now, port, frame);
        if matches!(verdict, Verdict::Drop(_)) {
            if let Some(s) = self.ports.get_mut(&port) {
                s.rx_dropped += 1;
            }
        }
        verdict
    }

    fn decide(&mut self, now: Instant, port: PortId, frame: &[u8]) -> Verdict {
        if frame.len() < 14 {
            return Verdict::Drop(SwitchDrop::Runt);
        }
        let dst: [u8; 6] = frame[0..6].try_into().expect("6 bytes");
        let src: [u8; 6] = frame[6..12].try_into().expect("6 bytes");
        if is_multicast(&src) {
            return Verdict::Drop(SwitchDrop::MulticastSource);
        }
        if src == self.config.gateway_mac {
            return Verdict::Drop(SwitchDrop::GatewaySpoof);
        }
        self.learn(now, src, port);
        if is_multicast(&dst) {
            return Verdict::Flood { gateway: true };
        }
        if dst == self.config.gateway_mac {
            return Verdict::Gateway;
        }
        match self.lookup(now, &dst) {
            Some(p) if p == port => Verdict::Drop(SwitchDrop::SamePort),
            Some(p) => Verdict::Port(p),
            // Unknown unicast: every other guest may be it; the stack is not.
            None => Verdict::Flood { gateway: false },
        }
    }

    fn learn(&mut self, now: Instant, src: [u8; 6], port: PortId) {
        if let Some(e) = self.macs.get_mut(&src) {
            // A guest that moved (reconnected on a new port) is followed at once.
            e.port = port;
            e.seen = now;
            return;
        }
        if self.macs.len() >= self.config.max_macs {
            let due = self
                .last_sweep
                .is_none_or(|t| now - t >= self.config.aging / 8);
            if due {
                self.last_sweep = Some(now);
                let aging = self.config.aging;
                self.macs.retain(|_, e| now - e.seen < aging);
            }
            if self.macs.len() >= self.config.max_macs {
                self.learn_refused += 1;
                return;
            }
        }
        self.macs.insert(src, MacEntry { port, seen: now });
    }

    /// A frame from the stack: to the guest that owns its destination, or to all.
    pub fn from_gateway(&self, now: Instant, frame: &[u8]) -> Verdict {
        if frame.len() < 14 {
            return Verdict::Drop(SwitchDrop::Runt);
        }
        let dst: [u8; 6] = frame[0..6].try_into().expect("6 bytes");
        if is_multicast(&dst) {
            return Verdict::Flood { gateway: false };
        }
        match self.lookup(now, &dst) {
            Some(p) => Verdict::Port(p),
            None => Verdict::Flood { gateway: false },
        }
    }

    /// Count a frame handed to guest `port` (`queued`), or dropped because the port
    /// could not take it.
    pub fn count_tx(&mut self, port: PortId, len: usize, queued: bool) {
        if let Some(s) = self.ports.get_mut(&port) {
            if queued {
                s.tx_frames += 1;
                s.tx_bytes += len as u64;
            } else {
                s.tx_dropped += 1;
            }
        }
    }

    /// Forget aged addresses now (the owner may call this on a timer; lookups ignore
    /// aged entries either way).
    pub fn expire(&mut self, now: Instant) {
        let aging = self.config.aging;
        self.macs.retain(|_, e| now - e.seen < aging);
        self.last_sweep = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const C: [u8; 6] = [2, 0, 0, 0, 0, 0xc];
    const BCAST: [u8; 6] = [0xff; 6];

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = Vec::with_capacity(60);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, 0);
        f
    }

    fn t(s: u64) -> Instant {
        Instant::from_secs(s as i64)
    }

    fn switch() -> Switch {
        Switch::new(SwitchConfig::new(GW))
    }

    #[test]
    fn unknown_unicast_floods_then_learnt_goes_straight() {
        let mut s = switch();
        let p1 = s.add_port().unwrap();
        let p2 = s.add_port().unwrap();
        // B is not known yet: every other guest gets it, the stack does not.
        assert_eq!(
            s.from_guest(t(0), p1, &frame(B, A)),
            Verdict::Flood { gateway: false }
        );
        // B answers: A was learnt on p1, so the reply goes there only (layer 2, no stack).
        assert_eq!(s.from_guest(t(0), p2, &frame(A, B)), Verdict::Port(p1));
        assert_eq!(s.from_guest(t(0), p1, &frame(B, A)), Verdict::Port(p2));
        assert_eq!(s.destination(t(0), &frame(B, A)), Some(p2));
        assert_eq!(s.destination(t(0), &frame(GW, A)), None);
        assert_eq!(s.destination(t(0), &frame(C, A)), None);
        assert_eq!(s.destination(t(0), &[0u8; 3]), None);
        assert_eq!(s.from_gateway(t(0), &frame(B, GW)), Verdict::Port(p2));
        assert_eq!(
            s.from_gateway(t(0), &frame(C, GW)),
            Verdict::Flood { gateway: false }
        );
        let st = s.port_stats(p1).unwrap();
        assert_eq!((st.rx_frames, st.rx_bytes, st.rx_dropped), (2, 120, 0));
    }

    #[test]
    fn broadcast_reaches_guests_and_gateway_and_gateway_unicast_only_the_stack() {
        let mut s = switch();
        let p1 = s.add_port().unwrap();
        assert_eq!(
            s.from_guest(t(0), p1, &frame(BCAST, A)),
            Verdict::Flood { gateway: true }
        );
        let mcast = [0x01, 0x00, 0x5e, 0, 0, 0xfb];
        assert_eq!(
            s.from_guest(t(0), p1, &frame(mcast, A)),
            Verdict::Flood { gateway: true }
        );
        assert_eq!(s.from_guest(t(0), p1, &frame(GW, A)), Verdict::Gateway);
        assert_eq!(
            s.from_gateway(t(0), &frame(BCAST, GW)),
            Verdict::Flood { gateway: false }
        );
    }

    #[test]
    fn hostile_frames_are_dropped_and_counted() {
        let mut s = switch();
        let p1 = s.add_port().unwrap();
        assert_eq!(
            s.from_guest(t(0), p1, &[0u8; 13]),
            Verdict::Drop(SwitchDrop::Runt)
        );
        assert_eq!(
            s.from_guest(t(0), p1, &frame(GW, BCAST)),
            Verdict::Drop(SwitchDrop::MulticastSource)
        );
        // Claiming the gateway's address must not steal the stack's frames.
        assert_eq!(
            s.from_guest(t(0), p1, &frame(BCAST, GW)),
            Verdict::Drop(SwitchDrop::GatewaySpoof)
        );
        assert_eq!(s.lookup(t(0), &GW), None);
        assert_eq!(
            s.from_guest(t(0), p1, &frame(B, A)),
            Verdict::Flood { gateway: false }
        );
        assert_eq!(
            s.from_guest(t(0), p1, &frame(A, A)),
            Verdict::Drop(SwitchDrop::SamePort)
        );
        assert_eq!(
            s.from_guest(t(0), PortId(99), &frame(GW, A)),
            Verdict::Drop(SwitchDrop::UnknownPort)
        );
        assert_eq!(s.port_stats(p1).unwrap().rx_dropped, 4);
        assert_eq!(s.port_stats(p1).unwrap().rx_frames, 5);
    }

    #[test]
    fn leaving_frees_the_port_and_its_addresses_and_ids_are_not_reused() {
        let mut s = switch();
        let p1 = s.add_port().unwrap();
        let p2 = s.add_port().unwrap();
        s.from_guest(t(0), p1, &frame(GW, A));
        s.from_guest(t(0), p1, &frame(GW, C));
        s.from_guest(t(0), p2, &frame(GW, B));
        assert_eq!(s.macs_of(t(0), p1).collect::<Vec<_>>(), vec![A, C]);
        let gone = s.remove_port(p1).unwrap();
        assert_eq!(gone.rx_frames, 2);
        assert_eq!(s.mac_count(), 1);
        assert_eq!(s.lookup(t(0), &A), None);
        assert!(s.remove_port(p1).is_none());
        // The same guest back on a new port is learnt there.
        let p3 = s.add_port().unwrap();
        assert!(p3 > p2);
        s.from_guest(t(1), p3, &frame(GW, A));
        assert_eq!(s.from_guest(t(1), p2, &frame(A, B)), Verdict::Port(p3));
    }

    #[test]
    fn a_moved_address_follows_its_guest() {
        let mut s = switch();
        let p1 = s.add_port().unwrap();
        let p2 = s.add_port().unwrap();
        s.from_guest(t(0), p1, &frame(GW, A));
        s.from_guest(t(0), p2, &frame(GW, A));
        assert_eq!(s.lookup(t(0), &A), Some(p2));
        assert_eq!(s.macs_of(t(0), p1).count(), 0);
    }

    #[test]
    fn entries_age_out() {
        let mut s = switch();
        let p1 = s.add_port().unwrap();
        s.from_guest(t(0), p1, &frame(GW, A));
        assert_eq!(s.lookup(t(299), &A), Some(p1));
        assert_eq!(s.lookup(t(300), &A), None);
        assert_eq!(
            s.from_gateway(t(300), &frame(A, GW)),
            Verdict::Flood { gateway: false }
        );
        s.expire(t(300));
        assert_eq!(s.mac_count(), 0);
    }

    #[test]
    fn the_table_and_the_ports_are_bounded() {
        let mut c = SwitchConfig::new(GW);
        c.max_macs = 2;
        c.max_ports = 2;
        let mut s = Switch::new(c);
        let p1 = s.add_port().unwrap();
        let _p2 = s.add_port().unwrap();
        assert_eq!(s.add_port(), None);
        s.from_guest(t(0), p1, &frame(GW, A));
        s.from_guest(t(0), p1, &frame(GW, B));
        // Full: C is not learnt, its frames still pass, and frames to it are flooded.
        assert_eq!(s.from_guest(t(1), p1, &frame(GW, C)), Verdict::Gateway);
        assert_eq!(s.learn_refused, 1);
        assert_eq!(s.lookup(t(1), &C), None);
        // Once A and B age out, C is learnt.
        s.from_guest(t(400), p1, &frame(GW, C));
        assert_eq!(s.lookup(t(400), &C), Some(p1));
        assert_eq!(s.mac_count(), 1);
        // Many new addresses while full: bounded, never more than max_macs.
        for i in 0..1000u32 {
            let mut m = [2, 1, 0, 0, 0, 0];
            m[2..6].copy_from_slice(&i.to_be_bytes());
            s.from_guest(t(400), p1, &frame(GW, m));
        }
        assert_eq!(s.mac_count(), 2);
    }

    #[test]
    fn tx_is_counted_per_port() {
        let mut s = switch();
        let p1 = s.add_port().unwrap();
        s.count_tx(p1, 60, true);
        s.count_tx(p1, 60, false);
        s.count_tx(PortId(77), 60, true);
        let st = s.port_stats(p1).unwrap();
        assert_eq!((st.tx_frames, st.tx_bytes, st.tx_dropped), (1, 60, 1));
    }
}
