//! The virtual switch: every guest connection on every listener is a port, the stack is
//! the gateway's port. Frames between guests are switched here at layer 2 (decided by the
//! core's [`Switch`]); frames for the gateway go to the driver, which sees the whole
//! switch as one [`FrameTransport`].
//!
//! Listeners run as tasks of their own (accepting, handshaking) and hand finished ports
//! over an mpsc channel ([`PortSender`]); ports come and go while the driver runs.
//!
//! Backpressure is per port: the driver only stops draining the core while the port the
//! next frame goes to has much queued ([`FrameTransport::pending_for`]). A port that
//! writes nothing for [`STALL`] (a paused VM) stops holding the others back: frames for
//! it are queued up to [`PORT_TX_CAP`] and then dropped (counted), as a switch drops at a
//! full egress queue.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use usernet_core::switch::{PortId, Switch, SwitchConfig, Verdict};
use usernet_core::Instant;

use crate::transport::{FrameTransport, GuestInfo, Port};

/// Bytes queued towards one guest beyond which its frames are dropped.
pub const PORT_TX_CAP: usize = 1024 * 1024;
/// Bytes queued towards one guest beyond which another guest's unicast to it waits in
/// the sender's buffer (the sender's reads stop: backpressure between guests).
pub const PORT_HIGH: usize = 256 * 1024;
/// A port with queued bytes that wrote nothing for this long no longer holds the core.
pub const STALL: Duration = Duration::from_secs(2);

/// A port ready to join the switch, with a label for logs and `/stats`.
pub struct NewPort {
    pub port: Box<dyn Port>,
    pub label: String,
    /// An address the guest asked for before it runs DHCP (vmnet's Preferred_ipv4), with
    /// the MAC it will ask from.
    pub preferred: Option<([u8; 6], std::net::Ipv4Addr)>,
}

/// How listener tasks hand ports to the switch.
pub type PortSender = mpsc::Sender<NewPort>;

struct Slot {
    id: PortId,
    port: Box<dyn Port>,
    label: String,
    /// Frames are buffered in the port.
    readable: bool,
    /// Its next frame waits for a full destination port.
    held: bool,
    /// Written since the last complete flush: the port may still hold bytes of its own
    /// (stdout's line buffer) even when its queue is empty.
    dirty: bool,
    /// Since when queued bytes are waiting without any being written.
    blocked_since: Option<tokio::time::Instant>,
}

impl Slot {
    fn stalled(&self, now: tokio::time::Instant) -> bool {
        self.blocked_since.is_some_and(|t| now - t >= STALL)
    }
}

/// The switch as the driver's transport.
pub struct VirtualSwitch {
    core: Switch,
    slots: Vec<Slot>,
    incoming: Option<mpsc::Receiver<NewPort>>,
    /// The core's clock starts here.
    start: tokio::time::Instant,
    /// The slot being drained by `next_frame`.
    cur: usize,
    /// A frame handed to the driver, to pop on the next call: (slot index, port).
    handed: Option<(usize, PortId)>,
    /// Wakes the loop when a blocked port becomes stalled.
    stall_timer: Pin<Box<tokio::time::Sleep>>,
    /// Ports refused because the switch was full.
    pub refused: u64,
    /// `--pcap`: frames carried between guests (the driver records the gateway's).
    pcap: Option<crate::pcap::Pcap>,
    /// MACs of guests that left, for the driver to end their flows.
    departed: Vec<[u8; 6]>,
    /// Addresses guests asked for at their handshake, for the driver to hand the core.
    preferred: Vec<([u8; 6], std::net::Ipv4Addr)>,
}

impl VirtualSwitch {
    /// A switch whose gateway (the stack) has `gateway_mac`, taking new ports from
    /// `incoming`. With no port left and every sender gone, `recv` reports the end.
    pub fn new(config: SwitchConfig, incoming: mpsc::Receiver<NewPort>) -> Self {
        VirtualSwitch {
            core: Switch::new(config),
            slots: Vec::new(),
            incoming: Some(incoming),
            start: tokio::time::Instant::now(),
            cur: 0,
            handed: None,
            stall_timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            refused: 0,
            pcap: None,
            departed: Vec::new(),
            preferred: Vec::new(),
        }
    }

    /// Record the frames this switch carries from guest to guest in `pcap`.
    pub fn set_pcap(&mut self, pcap: crate::pcap::Pcap) {
        self.pcap = Some(pcap);
    }

    /// A channel for listener tasks and the switch taking its ports.
    pub fn channel(config: SwitchConfig) -> (PortSender, Self) {
        let (tx, rx) = mpsc::channel(64);
        (tx, Self::new(config, rx))
    }

    /// Add a port directly (a stdio or datagram port that exists from the start).
    pub fn add(&mut self, new: NewPort) -> Option<PortId> {
        let Some(id) = self.core.add_port() else {
            self.refused += 1;
            tracing::warn!(
                label = %new.label,
                max = self.core.config().max_ports,
                "the switch is full: guest refused"
            );
            return None;
        };
        tracing::info!(port = %id, label = %new.label, "guest joined the switch");
        if let Some(p) = new.preferred {
            self.preferred.push(p);
        }
        self.slots.push(Slot {
            id,
            port: new.port,
            label: new.label,
            readable: false,
            held: false,
            dirty: false,
            blocked_since: None,
        });
        Some(id)
    }

    pub fn port_count(&self) -> usize {
        self.slots.len()
    }

    /// The core switch (MAC table, counters).
    pub fn core(&self) -> &Switch {
        &self.core
    }

    fn now(&self) -> Instant {
        Instant::from_micros((tokio::time::Instant::now() - self.start).as_micros() as i64)
    }

    /// Take slot `i` off the switch (the caller reports "ready": the driver takes a turn,
    /// which is how tests and logs see the change promptly).
    fn remove(&mut self, i: usize, why: &str) {
        let slot = self.slots.remove(i);
        // Addresses still learnt on this port (not on another one: a guest that came back
        // on a new connection keeps its flows) are the guest's that left.
        let now = self.now();
        let macs: Vec<[u8; 6]> = self.core.macs_of(now, slot.id).collect();
        self.departed.extend(macs);
        let stats = self.core.remove_port(slot.id).unwrap_or_default();
        tracing::info!(
            port = %slot.id, label = %slot.label, rx_frames = stats.rx_frames,
            tx_frames = stats.tx_frames, tx_dropped = stats.tx_dropped,
            "guest left the switch: {why}"
        );
        if self.cur > i {
            self.cur -= 1;
        }
        if self.cur >= self.slots.len() {
            self.cur = 0;
        }
    }

    fn pop_handed(&mut self) {
        if let Some((i, id)) = self.handed.take() {
            if let Some(slot) = self.slots.get_mut(i).filter(|s| s.id == id) {
                slot.port.pop_frame();
            }
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        self.pop_handed();
        let mut ready = false;
        while let Some(rx) = self.incoming.as_mut() {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(p)) => {
                    self.add(p);
                    ready = true;
                }
                Poll::Ready(None) => self.incoming = None,
                Poll::Pending => break,
            }
        }
        let now = tokio::time::Instant::now();
        let mut stall_at: Option<tokio::time::Instant> = None;
        let mut i = 0;
        while i < self.slots.len() {
            let slot = &mut self.slots[i];
            let before = slot.port.pending();
            if before > 0 || slot.dirty {
                match slot.port.poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        slot.blocked_since = None;
                        slot.dirty = false;
                        ready |= before > 0;
                    }
                    Poll::Ready(Err(e)) => {
                        self.remove(i, &format!("write error: {e}"));
                        ready = true;
                        continue;
                    }
                    Poll::Pending if slot.port.pending() < before => {
                        slot.blocked_since = None;
                        ready = true;
                    }
                    Poll::Pending => {
                        let since = *slot.blocked_since.get_or_insert(now);
                        if now - since < STALL {
                            let at = since + STALL;
                            stall_at = Some(stall_at.map_or(at, |s| s.min(at)));
                        }
                    }
                }
            } else {
                slot.blocked_since = None;
            }
            let slot = &mut self.slots[i];
            if slot.readable {
                ready |= !slot.held;
            } else {
                match slot.port.poll_recv(cx) {
                    Poll::Ready(Ok(true)) => {
                        slot.readable = true;
                        ready = true;
                    }
                    Poll::Ready(Ok(false)) => {
                        self.remove(i, "disconnected");
                        ready = true;
                        continue;
                    }
                    Poll::Ready(Err(e)) => {
                        let why = if e.kind() == io::ErrorKind::InvalidData {
                            tracing::warn!(label = %slot.label, "protocol error: {e}; dropping the guest");
                            "protocol error".to_string()
                        } else {
                            format!("read error: {e}")
                        };
                        self.remove(i, &why);
                        ready = true;
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            i += 1;
        }
        if let Some(at) = stall_at {
            if self.stall_timer.deadline() != at {
                self.stall_timer.as_mut().reset(at);
            }
            if self.stall_timer.as_mut().poll(cx).is_ready() {
                ready = true;
            }
        }
        if ready {
            // Whatever moved may have made room for held frames: try them again.
            for s in &mut self.slots {
                s.held = false;
            }
            return Poll::Ready(Ok(true));
        }
        if self.incoming.is_none() && self.slots.is_empty() {
            return Poll::Ready(Ok(false));
        }
        Poll::Pending
    }

    /// Queue `frame` on slot `j`, unless its queue is over the cap.
    fn queue(core: &mut Switch, slot: &mut Slot, frame: &[u8]) {
        let ok = slot.port.pending() < PORT_TX_CAP && slot.port.send_frame(frame);
        slot.dirty |= ok;
        core.count_tx(slot.id, frame.len(), ok);
    }

    fn index_of(&self, id: PortId) -> Option<usize> {
        self.slots.iter().position(|s| s.id == id)
    }
}

impl FrameTransport for VirtualSwitch {
    async fn recv(&mut self) -> io::Result<bool> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn next_frame(&mut self) -> Option<&[u8]> {
        self.pop_handed();
        let now = self.now();
        loop {
            let i = self.cur;
            if i >= self.slots.len() {
                self.cur = 0;
                return None;
            }
            if !self.slots[i].readable {
                self.cur += 1;
                continue;
            }
            let (before, rest) = self.slots.split_at_mut(i);
            let (slot, after) = rest.split_first_mut().expect("i < len");
            let Some(frame) = slot.port.peek_frame() else {
                slot.readable = false;
                self.cur += 1;
                continue;
            };
            // A unicast to a guest that is behind waits in the sender's buffer (and the
            // sender's reads with it) rather than being dropped at the receiver's cap.
            if let Some(q) = self.core.destination(now, frame).filter(|q| *q != slot.id) {
                let behind = before
                    .iter()
                    .chain(after.iter())
                    .find(|s| s.id == q)
                    .is_some_and(|d| {
                        d.port.pending() >= PORT_HIGH && !d.stalled(tokio::time::Instant::now())
                    });
                if behind {
                    slot.held = true;
                    self.cur += 1;
                    continue;
                }
            }
            let to_gateway = match self.core.from_guest(now, slot.id, frame) {
                Verdict::Gateway => true,
                Verdict::Port(q) => {
                    // The driver records what reaches the gateway; this frame never does.
                    if let Some(p) = &self.pcap {
                        p.record(frame);
                    }
                    if let Some(dst) = before
                        .iter_mut()
                        .chain(after.iter_mut())
                        .find(|s| s.id == q)
                    {
                        Self::queue(&mut self.core, dst, frame);
                    }
                    false
                }
                Verdict::Flood { gateway } => {
                    if let (false, Some(p)) = (gateway, &self.pcap) {
                        p.record(frame);
                    }
                    for dst in before.iter_mut().chain(after.iter_mut()) {
                        Self::queue(&mut self.core, dst, frame);
                    }
                    gateway
                }
                Verdict::Drop(why) => {
                    tracing::trace!(label = %slot.label, why = why.as_str(), "switch dropped a frame");
                    false
                }
            };
            if to_gateway {
                let id = slot.id;
                self.handed = Some((i, id));
                return self.slots[i].port.peek_frame();
            }
            slot.port.pop_frame();
        }
    }

    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.core.from_gateway(self.now(), frame) {
            Verdict::Port(q) => {
                if let Some(i) = self.index_of(q) {
                    Self::queue(&mut self.core, &mut self.slots[i], frame);
                }
            }
            Verdict::Flood { .. } => {
                for slot in &mut self.slots {
                    Self::queue(&mut self.core, slot, frame);
                }
            }
            Verdict::Gateway | Verdict::Drop(_) => {}
        }
        Ok(())
    }

    fn pending(&self) -> usize {
        self.slots.iter().map(|s| s.port.pending()).sum()
    }

    fn pending_for(&self, frame: &[u8]) -> usize {
        match self.core.from_gateway(self.now(), frame) {
            Verdict::Port(q) => match self.index_of(q) {
                Some(i) if !self.slots[i].stalled(tokio::time::Instant::now()) => {
                    self.slots[i].port.pending()
                }
                _ => 0,
            },
            // A flooded frame is dropped on any port that cannot take it.
            _ => 0,
        }
    }

    /// Writes what each port takes now and returns: one slow guest must not hold the
    /// loop. What is left is written as the ports become writable (`recv` waits for
    /// that too).
    async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| {
            let mut i = 0;
            while i < self.slots.len() {
                let slot = &mut self.slots[i];
                if slot.port.pending() > 0 || slot.dirty {
                    let before = slot.port.pending();
                    match slot.port.poll_flush(cx) {
                        Poll::Ready(Err(e)) => {
                            self.remove(i, &format!("write error: {e}"));
                            continue;
                        }
                        Poll::Ready(Ok(())) => {
                            slot.blocked_since = None;
                            slot.dirty = false;
                        }
                        Poll::Pending if slot.port.pending() < before => slot.blocked_since = None,
                        Poll::Pending => {}
                    }
                }
                i += 1;
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    fn take_departed(&mut self) -> Option<[u8; 6]> {
        self.departed.pop()
    }

    fn take_preferred(&mut self) -> Option<([u8; 6], std::net::Ipv4Addr)> {
        self.preferred.pop()
    }

    fn guests(&self) -> Vec<GuestInfo> {
        let now = self.now();
        self.slots
            .iter()
            .map(|s| GuestInfo {
                port: s.id.0,
                label: s.label.clone(),
                macs: self.core.macs_of(now, s.id).collect(),
                stats: self.core.port_stats(s.id).copied().unwrap_or_default(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::{FramedPort, Framing};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    const GW: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];

    fn frame(dst: [u8; 6], src: [u8; 6], fill: u8) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, fill);
        f
    }

    fn u16le(f: &[u8]) -> Vec<u8> {
        let mut v = (f.len() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(f);
        v
    }

    async fn read_frame(s: &mut UnixStream) -> Vec<u8> {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.unwrap();
        let mut f = vec![0u8; u16::from_le_bytes(h) as usize];
        s.read_exact(&mut f).await.unwrap();
        f
    }

    /// Drive the switch as the driver would, collecting frames for the gateway.
    async fn turn(sw: &mut VirtualSwitch, to_gw: &mut Vec<Vec<u8>>) {
        assert!(sw.recv().await.unwrap());
        while let Some(f) = sw.next_frame() {
            to_gw.push(f.to_vec());
        }
        sw.flush().await.unwrap();
    }

    #[tokio::test]
    async fn two_guests_reach_each_other_and_the_gateway() {
        let (tx, mut sw) = VirtualSwitch::channel(SwitchConfig::new(GW));
        let a_mac = [2, 0, 0, 0, 0, 0xa];
        let b_mac = [2, 0, 0, 0, 0, 0xb];
        let (a_sw, mut a) = UnixStream::pair().unwrap();
        let (b_sw, mut b) = UnixStream::pair().unwrap();
        for (s, l) in [(a_sw, "a"), (b_sw, "b")] {
            tx.send(NewPort {
                port: Box::new(FramedPort::new(s, Framing::U16Le)),
                label: l.into(),
                preferred: None,
            })
            .await
            .unwrap();
        }
        let mut to_gw = Vec::new();
        turn(&mut sw, &mut to_gw).await;
        assert_eq!(sw.port_count(), 2);
        // A broadcasts (ARP-like): B and the gateway get it.
        let bc = frame([0xff; 6], a_mac, 1);
        a.write_all(&u16le(&bc)).await.unwrap();
        while to_gw.is_empty() {
            turn(&mut sw, &mut to_gw).await;
        }
        assert_eq!(to_gw, vec![bc.clone()]);
        assert_eq!(read_frame(&mut b).await, bc);
        // B answers A by unicast: layer 2 only, the gateway sees nothing.
        let uni = frame(a_mac, b_mac, 2);
        b.write_all(&u16le(&uni)).await.unwrap();
        // And A talks to the gateway.
        let gw = frame(GW, a_mac, 3);
        a.write_all(&u16le(&gw)).await.unwrap();
        while to_gw.len() < 2 {
            turn(&mut sw, &mut to_gw).await;
        }
        assert_eq!(read_frame(&mut a).await, uni);
        assert_eq!(to_gw, vec![bc, gw]);
        // A maximal u16 LE frame (65535 bytes) from B to A, unchanged.
        let mut max = frame(a_mac, b_mac, 5);
        max.resize(65535, 6);
        b.write_all(&u16le(&max)).await.unwrap();
        let mut reader = tokio::spawn(async move {
            let f = read_frame(&mut a).await;
            (f, a)
        });
        let (f, a_back) = loop {
            tokio::select! {
                r = &mut reader => break r.unwrap(),
                _ = turn(&mut sw, &mut to_gw) => {}
            }
        };
        assert_eq!(f, max);
        let mut a = a_back;
        assert_eq!(to_gw.len(), 2);
        // The stack answers A: only A gets it.
        let reply = frame(a_mac, GW, 4);
        sw.send_frame(&reply).unwrap();
        assert_eq!(sw.pending_for(&reply), 62);
        sw.flush().await.unwrap();
        assert_eq!(read_frame(&mut a).await, reply);
        let g = sw.guests();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].macs, vec![a_mac]);
        assert_eq!(g[0].stats.rx_frames, 2);
        assert_eq!(g[0].stats.tx_frames, 3);
        assert_eq!(g[1].stats.tx_frames, 1);
        // B leaves: its port and address go.
        drop(b);
        let mut spins = 0;
        while sw.port_count() == 2 {
            spins += 1;
            assert!(spins < 100);
            let _ = sw.recv().await;
            while sw.next_frame().is_some() {}
        }
        assert_eq!(sw.core().lookup(sw.now(), &b_mac), None);
        // Everybody gone and no listener left: the switch ends.
        drop(a);
        drop(tx);
        let mut spins = 0;
        loop {
            spins += 1;
            assert!(spins < 100);
            if !sw.recv().await.unwrap() {
                break;
            }
            while sw.next_frame().is_some() {}
        }
    }

    /// One poll of `recv` without waiting (records ports that cannot write).
    async fn poke(sw: &mut VirtualSwitch) {
        poll_fn(|cx| {
            let _ = sw.poll_recv(cx);
            Poll::Ready(())
        })
        .await
    }

    /// A switch with two u16le guests, A (`..:0a`) and B (`..:0b`), both learnt: each sent
    /// the gateway one frame, which `to_gw` holds. The sender stays open for the ports.
    async fn two_guests() -> (
        mpsc::Sender<NewPort>,
        VirtualSwitch,
        UnixStream,
        UnixStream,
        Vec<Vec<u8>>,
    ) {
        let (tx, mut sw) = VirtualSwitch::channel(SwitchConfig::new(GW));
        let (a_sw, mut a) = UnixStream::pair().unwrap();
        let (b_sw, mut b) = UnixStream::pair().unwrap();
        for s in [a_sw, b_sw] {
            tx.send(NewPort {
                port: Box::new(FramedPort::new(s, Framing::U16Le)),
                label: "x".into(),
                preferred: None,
            })
            .await
            .unwrap();
        }
        let mut to_gw = Vec::new();
        a.write_all(&u16le(&frame(GW, A_MAC, 1))).await.unwrap();
        b.write_all(&u16le(&frame(GW, B_MAC, 1))).await.unwrap();
        while to_gw.len() < 2 {
            turn(&mut sw, &mut to_gw).await;
        }
        (tx, sw, a, b, to_gw)
    }

    const A_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    #[tokio::test(start_paused = true)]
    async fn a_guest_that_reads_nothing_holds_only_its_own_frames_then_nobody() {
        let (_tx, mut sw, mut a, mut b, mut to_gw) = two_guests().await;
        let (a_mac, b_mac) = (A_MAC, B_MAC);
        // A never reads: the stack's frames for A pile up in A's queue only.
        let mut fa = frame(a_mac, GW, 2);
        fa.resize(1500, 2);
        let mut fb = frame(b_mac, GW, 3);
        fb.resize(1500, 3);
        let high = 256 * 1024;
        for _ in 0..10_000 {
            if sw.pending_for(&fa) >= high {
                break;
            }
            sw.send_frame(&fa).unwrap();
            sw.flush().await.unwrap();
        }
        assert!(sw.pending_for(&fa) >= high, "A's queue fills");
        assert_eq!(sw.pending_for(&fb), 0, "B is not held back by A");
        sw.send_frame(&fb).unwrap();
        sw.flush().await.unwrap();
        assert_eq!(read_frame(&mut b).await, fb);
        // A writes nothing for STALL: it stops holding the core; past its cap its frames
        // are dropped and counted.
        poke(&mut sw).await;
        tokio::time::advance(STALL).await;
        poke(&mut sw).await;
        assert_eq!(sw.pending_for(&fa), 0);
        for _ in 0..2000 {
            sw.send_frame(&fa).unwrap();
        }
        assert!(sw.slots[0].port.pending() <= PORT_TX_CAP + 1502);
        let ga = &sw.guests()[0];
        assert!(ga.stats.tx_dropped > 0, "{:?}", ga.stats);
        // A reads again: everything queued for it arrives and it is no longer stalled.
        let total = ga.stats.tx_frames;
        // A's end comes back so that A stays on the switch while it is checked.
        let mut reader = tokio::spawn(async move {
            for _ in 0..total {
                let _ = read_frame(&mut a).await;
            }
            a
        });
        let _a = loop {
            tokio::select! {
                r = &mut reader => break r.unwrap(),
                _ = turn(&mut sw, &mut to_gw) => {}
            }
        };
        assert_eq!(sw.slots[0].port.pending(), 0);
        assert!(sw.slots[0].blocked_since.is_none());
    }

    #[tokio::test]
    async fn a_guest_sending_faster_than_another_reads_is_held_back_not_dropped() {
        let (_tx, mut sw, mut a, mut b, mut to_gw) = two_guests().await;
        let (a_mac, b_mac) = (A_MAC, B_MAC);
        // 2000 numbered frames (3 MB, three times the receiver's cap) from A to B.
        const N: u32 = 2000;
        let writer = tokio::spawn(async move {
            for i in 0..N {
                let mut f = frame(b_mac, a_mac, 0);
                f.resize(1500, 0);
                f[14..18].copy_from_slice(&i.to_be_bytes());
                a.write_all(&u16le(&f)).await.unwrap();
            }
            a
        });
        // B reads nothing yet: A ends up held, nothing is dropped.
        let mut turns = 0;
        while !sw.slots[0].held {
            turns += 1;
            assert!(turns < 100_000, "A never held");
            turn(&mut sw, &mut to_gw).await;
        }
        assert!(sw.slots[1].port.pending() >= PORT_HIGH);
        assert_eq!(sw.guests()[1].stats.tx_dropped, 0);
        // B reads: every frame arrives, in order.
        // The reader hands B's end back: were it dropped, B could leave the switch before
        // its counters are read.
        let mut reader = tokio::spawn(async move {
            for i in 0..N {
                let f = read_frame(&mut b).await;
                assert_eq!(f[14..18], i.to_be_bytes());
            }
            b
        });
        let _b = loop {
            tokio::select! {
                r = &mut reader => break r.unwrap(),
                _ = turn(&mut sw, &mut to_gw) => {}
            }
        };
        let _a = writer.await.unwrap();
        let g = sw.guests();
        assert_eq!(g[1].stats.tx_frames, u64::from(N));
        assert_eq!(g[1].stats.tx_dropped, 0);
        assert_eq!(
            g[0].stats.rx_frames,
            u64::from(N) + 1,
            "each frame counted once"
        );
    }

    #[tokio::test]
    async fn a_protocol_error_drops_that_guest_only() {
        let (tx, mut sw) = VirtualSwitch::channel(SwitchConfig::new(GW));
        let (a_sw, mut a) = UnixStream::pair().unwrap();
        let (b_sw, mut b) = UnixStream::pair().unwrap();
        for s in [a_sw, b_sw] {
            tx.send(NewPort {
                port: Box::new(FramedPort::new(s, Framing::U16Le)),
                label: "x".into(),
                preferred: None,
            })
            .await
            .unwrap();
        }
        let mut to_gw = Vec::new();
        turn(&mut sw, &mut to_gw).await;
        // A length of 5 is below an Ethernet header.
        a.write_all(&[5, 0]).await.unwrap();
        let mut spins = 0;
        while sw.port_count() == 2 {
            spins += 1;
            assert!(spins < 100);
            turn(&mut sw, &mut to_gw).await;
        }
        let f = frame(GW, [2, 0, 0, 0, 0, 0xb], 9);
        b.write_all(&u16le(&f)).await.unwrap();
        while to_gw.is_empty() {
            turn(&mut sw, &mut to_gw).await;
        }
        assert_eq!(to_gw, vec![f]);
        // A's socket was closed by the switch.
        let mut buf = [0u8; 1];
        assert_eq!(a.read(&mut buf).await.unwrap(), 0);
    }
}
