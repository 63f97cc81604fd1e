//! The glue between smoltcp and the guest link: a queue of outgoing frames with recycled
//! buffers, the neighbour table, and the `smoltcp::phy::Device` smoltcp polls.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::stats::{DropReason, Stats};

pub(crate) const ETH_HDR: usize = 14;
pub(crate) const ETHERTYPE_IPV4: u16 = 0x0800;
pub(crate) const ETHERTYPE_ARP: u16 = 0x0806;
pub(crate) const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Frames waiting for the guest. Buffers are recycled, so the steady state allocates nothing.
#[derive(Default)]
pub(crate) struct FrameQueue {
    frames: VecDeque<Vec<u8>>,
    pool: Vec<Vec<u8>>,
    /// Bytes queued (Ethernet frames).
    bytes: usize,
    /// Frames for a guest address whose MAC is not known yet, waiting for its ARP reply
    /// (as a kernel's neighbour queue does), oldest first.
    parked: VecDeque<(Ipv4Addr, Vec<u8>)>,
    /// Addresses to send an ARP request for.
    pub arp_wanted: Vec<Ipv4Addr>,
}

/// Frames parked for unresolved neighbours at most; beyond, the oldest is dropped.
const PARKED_MAX: usize = 64;

/// Buffers kept for reuse at most: enough for a burst, bounded so a burst cannot pin memory.
const POOL_MAX: usize = 256;

impl FrameQueue {
    /// Move the frame just pushed aside until `dst` resolves. Returns whether one older
    /// frame had to be dropped to make room.
    pub fn park_last(&mut self, dst: Ipv4Addr) -> bool {
        let Some(f) = self.frames.pop_back() else {
            return false;
        };
        self.bytes -= f.len();
        if !self.arp_wanted.contains(&dst) {
            self.arp_wanted.push(dst);
        }
        self.parked.push_back((dst, f));
        if self.parked.len() > PARKED_MAX {
            self.parked.pop_front();
            return true;
        }
        false
    }

    /// `ip` resolved to `mac`: send what waited for it.
    pub fn release(&mut self, ip: Ipv4Addr, mac: [u8; 6]) {
        if self.parked.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.parked.len() {
            if self.parked[i].0 == ip {
                let (_, mut f) = self.parked.remove(i).expect("in range");
                f[0..6].copy_from_slice(&mac);
                self.bytes += f.len();
                self.frames.push_back(f);
            } else {
                i += 1;
            }
        }
    }

    /// Append a frame of `len` bytes filled by `fill`.
    pub fn push_with<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = fill(&mut buf);
        self.bytes += len;
        self.frames.push_back(buf);
        r
    }

    pub fn front(&self) -> Option<&[u8]> {
        self.frames.front().map(|f| f.as_slice())
    }

    pub fn pop(&mut self) -> Option<usize> {
        let f = self.frames.pop_front()?;
        let len = f.len();
        self.bytes -= len;
        if self.pool.len() < POOL_MAX {
            self.pool.push(f);
        }
        Some(len)
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// IPv4 address to MAC address, learnt from what guests send.
#[derive(Default)]
pub(crate) struct Neighbors {
    map: BTreeMap<Ipv4Addr, [u8; 6]>,
}

/// Neighbours remembered at most (one /16 worth); beyond, new guests are still learnt but
/// the table is cleared first, which only costs a re-learn.
const NEIGHBORS_MAX: usize = 65536;

impl Neighbors {
    /// Remember `ip` at `mac`; true when that is news.
    pub fn learn(&mut self, ip: Ipv4Addr, mac: [u8; 6]) -> bool {
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || mac[0] & 1 == 1 {
            return false;
        }
        // Every frame from a guest teaches what is almost always known already.
        if self.map.get(&ip) == Some(&mac) {
            return false;
        }
        if self.map.len() >= NEIGHBORS_MAX && !self.map.contains_key(&ip) {
            self.map.clear();
        }
        self.map.insert(ip, mac) != Some(mac)
    }
    pub fn get(&self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.map.get(&ip).copied()
    }
    /// Forget every address at `mac`; returns them.
    pub fn forget_mac(&mut self, mac: [u8; 6]) -> Vec<Ipv4Addr> {
        let gone: Vec<Ipv4Addr> = self
            .map
            .iter()
            .filter(|(_, m)| **m == mac)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &gone {
            self.map.remove(ip);
        }
        gone
    }
}

/// Write an Ethernet header at the start of `frame`.
pub(crate) fn write_eth(frame: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// What smoltcp sees: an IP-medium device whose receive side is at most one borrowed packet
/// and whose transmit side appends Ethernet frames to the queue.
pub(crate) struct GuestDevice<'a> {
    pub rx: Option<&'a [u8]>,
    pub tx: &'a mut FrameQueue,
    pub neighbors: &'a Neighbors,
    pub stats: &'a mut Stats,
    pub gateway_mac: [u8; 6],
    pub mtu: usize,
}

impl phy::Device for GuestDevice<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let packet = self.rx.take()?;
        Some((
            RxToken { packet },
            TxToken {
                tx: self.tx,
                neighbors: self.neighbors,
                stats: self.stats,
                gateway_mac: self.gateway_mac,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            tx: self.tx,
            neighbors: self.neighbors,
            stats: self.stats,
            gateway_mac: self.gateway_mac,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // The switch already checked the IPv4 header checksum of every guest packet.
        let mut sums = ChecksumCapabilities::default();
        sums.ipv4 = Checksum::Tx;
        caps.checksum = sums;
        caps
    }
}

pub(crate) struct RxToken<'a> {
    packet: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.packet)
    }
}

pub(crate) struct TxToken<'a> {
    tx: &'a mut FrameQueue,
    neighbors: &'a Neighbors,
    stats: &'a mut Stats,
    gateway_mac: [u8; 6],
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let gateway_mac = self.gateway_mac;
        let neighbors = self.neighbors;
        let mut unknown = None;
        let r = self.tx.push_with(ETH_HDR + len, |frame| {
            let r = f(&mut frame[ETH_HDR..]);
            // smoltcp only sends IPv4 here; the destination decides the Ethernet address.
            write_eth(frame, BROADCAST_MAC, gateway_mac, ETHERTYPE_IPV4);
            if frame.len() >= ETH_HDR + 20 {
                let d = &frame[ETH_HDR + 16..ETH_HDR + 20];
                let ip = Ipv4Addr::new(d[0], d[1], d[2], d[3]);
                match neighbors.get(ip) {
                    Some(mac) => frame[0..6].copy_from_slice(&mac),
                    None => unknown = Some(ip),
                }
            }
            r
        });
        if let Some(ip) = unknown {
            // A connection into a guest not heard from yet (a port forward): hold the
            // frame until the guest answers the ARP request, rather than broadcast it.
            if self.tx.park_last(ip) {
                self.stats.drop(DropReason::NoNeighbor);
            }
        }
        r
    }
}
