//! The guest's DNS jobs (queries to the gateway over UDP, with the TCP fallback after a
//! truncated answer, and pipelined over TCP) and its server for port forwards.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use smoltcp::socket::{tcp, udp};
use smoltcp::wire::IpAddress;

use super::{ipv4_of, Guest, Outcome};
use crate::dnsmsg;
use crate::scenario::JobKind;

/// Attempts (fresh IDs) per UDP query at most.
const DNS_ATTEMPTS: u32 = 16;
/// TCP connections per query (or per DNS-over-TCP job) at most.
const DNS_TCP_TRIES: u32 = 8;
/// A listening guest server keeps this many spare listening sockets (one per SYN).
const SPARE_LISTENERS: usize = 4;

/// One UDP query in flight.
struct UdpQuery {
    i: u32,
    attempts: u32,
    last_send: u64,
}

/// A DNS-over-TCP connection to the gateway and the queries it carries.
struct TcpConn {
    handle: smoltcp::iface::SocketHandle,
    /// (query index, message ID) of the queries on it, unanswered ones only.
    queries: Vec<(u32, u16)>,
    out: Vec<u8>,
    sent: usize,
    inbuf: Vec<u8>,
    established: bool,
}

/// The state of a DNS job.
#[derive(Default)]
pub(super) struct DnsRun {
    udp: Option<smoltcp::iface::SocketHandle>,
    next: u32,
    active: Vec<UdpQuery>,
    tcp: Vec<TcpConn>,
    /// TCP connections opened per query (fallbacks) or for the job (DNS over TCP).
    tcp_tries: BTreeMap<u32, u32>,
    /// Message ID -> (query index, when that attempt was sent).
    ids: BTreeMap<u16, (u32, u64)>,
    next_id: u16,
    done: BTreeMap<u32, ()>,
    /// Which upstream's address each good answer carried, and the slowest answer.
    pub from: BTreeMap<Ipv4Addr, u32>,
    pub max_latency_us: u64,
    pub tc_fallbacks: u32,
}

/// A connection accepted by the guest's server.
struct ServeConn {
    handle: smoltcp::iface::SocketHandle,
    header: Vec<u8>,
    echoed: u64,
    established: bool,
    peer_ok: bool,
}

#[derive(Default)]
pub(super) struct ServeRun {
    listeners: Vec<smoltcp::iface::SocketHandle>,
    conns: Vec<ServeConn>,
    pub sources: BTreeMap<Ipv4Addr, u32>,
    /// `udp_serve`: its socket and the bytes it echoed.
    udp: Option<smoltcp::iface::SocketHandle>,
    echoed: u64,
}

/// Note when a UDP DNS query first leaves the guest (by message ID).
pub(super) fn note_dns_send(wire: &mut BTreeMap<u16, u64>, f: &[u8], now_us: u64) {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, UdpPacket};
    let Ok(eth) = EthernetFrame::new_checked(f) else {
        return;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return;
    };
    if ip.next_header() != IpProtocol::Udp {
        return;
    }
    let Ok(u) = UdpPacket::new_checked(ip.payload()) else {
        return;
    };
    if u.dst_port() == 53 && u.payload().len() >= 2 {
        let id = u16::from_be_bytes([u.payload()[0], u.payload()[1]]);
        wire.entry(id).or_insert(now_us);
    }
}

impl Guest {
    fn dns_new_id(run: &mut DnsRun, ji: usize, i: u32, now_us: u64) -> u16 {
        loop {
            let id = ((ji as u16 & 0xf) << 12) | (run.next_id & 0x0fff);
            run.next_id = run.next_id.wrapping_add(1);
            if let std::collections::btree_map::Entry::Vacant(e) = run.ids.entry(id) {
                e.insert((i, now_us));
                return id;
            }
        }
    }

    fn dns_finish(&mut self, ji: usize, i: u32, outcome: Outcome, now_us: u64) {
        let run = self.jobs[ji].dns.as_mut().expect("dns job");
        if run.done.insert(i, ()).is_some() {
            return;
        }
        run.active.retain(|q| q.i != i);
        let wire = &mut self.dns_wire;
        run.ids.retain(|id, (q, _)| {
            if *q == i {
                wire.remove(id);
            }
            *q != i
        });
        let desc = format!("{outcome:?}");
        self.jobs[ji].outcomes.push(outcome);
        self.event(now_us, "dns-done", u64::from(i), || {
            format!("job{ji} query{i} {desc}")
        });
    }

    /// Check one answer (UDP, or one message of a TCP connection).
    fn dns_reply(&mut self, ji: usize, msg: &[u8], over_tcp: bool, now_us: u64) {
        let Some(id0) = msg.get(0..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return;
        };
        let run = self.jobs[ji].dns.as_mut().expect("dns job");
        let Some(&(i, sent)) = run.ids.get(&id0) else {
            // A late or duplicated answer to a query already done.
            return;
        };
        let sent = self.dns_wire.get(&id0).copied().unwrap_or(sent);
        if run.done.contains_key(&i) {
            return;
        }
        let spec = &self.jobs[ji].spec;
        let want_name = dnsmsg::query_name(spec.records, self.idx, ji, i);
        let r = match dnsmsg::parse_reply(msg) {
            Ok(r) => r,
            Err(e) => {
                return self.dns_finish(ji, i, Outcome::Corrupt(format!("query {i}: {e}")), now_us)
            }
        };
        if r.name != want_name {
            let o = Outcome::Corrupt(format!("query {i}: answer for {:?}", r.name));
            return self.dns_finish(ji, i, o, now_us);
        }
        if r.rcode() == dnsmsg::RCODE_SERVFAIL {
            let latency = now_us - sent;
            let bound = self.jobs[ji].spec.within_s.map(|s| (s * 1e6) as u64);
            let run = self.jobs[ji].dns.as_mut().expect("dns job");
            run.max_latency_us = run.max_latency_us.max(latency);
            let o = match bound {
                Some(b) if latency > b => Outcome::Timeout {
                    detail: format!(
                        "query {i}: SERVFAIL after {:.3}s, bound {:.3}s",
                        latency as f64 / 1e6,
                        b as f64 / 1e6
                    ),
                },
                _ => Outcome::Servfail { at_us: now_us },
            };
            return self.dns_finish(ji, i, o, now_us);
        }
        if r.rcode() != 0 {
            let o = Outcome::Corrupt(format!("query {i}: rcode {}", r.rcode()));
            return self.dns_finish(ji, i, o, now_us);
        }
        if r.truncated() {
            if over_tcp {
                let o = Outcome::Corrupt(format!("query {i}: TC over TCP"));
                return self.dns_finish(ji, i, o, now_us);
            }
            // Retry over TCP, as a resolver does; the UDP attempts stop.
            let run = self.jobs[ji].dns.as_mut().expect("dns job");
            run.active.retain(|q| q.i != i);
            if !run.tcp.iter().any(|c| c.queries.iter().any(|q| q.0 == i)) {
                run.tc_fallbacks += 1;
                self.dns_open_tcp(ji, vec![i], now_us);
            }
            return;
        }
        let records = self.jobs[ji].spec.records;
        let first = r.addrs.first().copied();
        let from_ok = match (first, self.jobs[ji].from_ip) {
            (Some(f), Some(want)) => f == want,
            (Some(f), None) => self.upstream_ips.contains(&f),
            (None, _) => false,
        };
        let seq_ok = r.addrs.len() == records as usize
            && r.addrs
                .iter()
                .enumerate()
                .skip(1)
                .all(|(k, a)| *a == dnsmsg::record_addr(Ipv4Addr::UNSPECIFIED, k as u32));
        if !from_ok || !seq_ok {
            let o = Outcome::Corrupt(format!(
                "query {i}: {} records, first {first:?} (want {records}, from {:?})",
                r.addrs.len(),
                self.jobs[ji].from_ip
            ));
            return self.dns_finish(ji, i, o, now_us);
        }
        let latency = now_us - sent;
        let bound = self.jobs[ji].spec.within_s.map(|s| (s * 1e6) as u64);
        let run = self.jobs[ji].dns.as_mut().expect("dns job");
        run.max_latency_us = run.max_latency_us.max(latency);
        *run.from.entry(first.expect("checked")).or_default() += 1;
        let o = match bound {
            Some(b) if latency > b && !over_tcp => Outcome::Timeout {
                detail: format!(
                    "query {i}: answered after {:.3}s, bound {:.3}s",
                    latency as f64 / 1e6,
                    b as f64 / 1e6
                ),
            },
            _ => Outcome::Complete {
                bytes: msg.len() as u64,
                at_us: now_us,
            },
        };
        self.dns_finish(ji, i, o, now_us);
    }

    fn dns_open_tcp(&mut self, ji: usize, queries: Vec<u32>, now_us: u64) {
        let Some(gw) = self.router else { return };
        let Some(port) = self.alloc_port() else {
            return;
        };
        let buf = self.buffer;
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buf]),
            tcp::SocketBuffer::new(vec![0; buf]),
        );
        s.set_nagle_enabled(false);
        if s.connect(self.iface.context(), (gw, 53), port).is_err() {
            return;
        }
        let handle = self.sockets.add(s);
        let records = self.jobs[ji].spec.records;
        let idx = self.idx;
        let run = self.jobs[ji].dns.as_mut().expect("dns job");
        let mut out = Vec::new();
        let mut qs = Vec::new();
        for i in queries {
            *run.tcp_tries.entry(i).or_default() += 1;
            let id = Self::dns_new_id(run, ji, i, now_us);
            let q = dnsmsg::query(id, &dnsmsg::query_name(records, idx, ji, i));
            out.extend_from_slice(&(q.len() as u16).to_be_bytes());
            out.extend_from_slice(&q);
            qs.push((i, id));
        }
        let n = qs.len() as u64;
        run.tcp.push(TcpConn {
            handle,
            queries: qs,
            out,
            sent: 0,
            inbuf: Vec::new(),
            established: false,
        });
        self.event(now_us, "dns-tcp-open", n, || {
            format!("job{ji} DNS over TCP :{port} -> {gw}:53 with {n} queries")
        });
    }

    /// Advance a DNS job; true on progress.
    pub(super) fn dns_step(&mut self, ji: usize, now_us: u64) -> bool {
        let mut progress = false;
        let Some(gw) = self.router else {
            return false;
        };
        let kind = self.jobs[ji].spec.kind;
        let count = self.jobs[ji].spec.count;
        let deadline = (self.jobs[ji].spec.deadline_s * 1e6) as u64;
        if self.jobs[ji].dns.is_none() {
            self.jobs[ji].dns = Some(DnsRun::default());
            progress = true;
            if kind == JobKind::DnsTcp {
                self.dns_open_tcp(ji, (0..count).collect(), now_us);
                self.jobs[ji].dns.as_mut().expect("set").next = count;
            }
        }
        // UDP: the socket, answers, new queries and retries.
        if kind == JobKind::DnsUdp {
            if self.jobs[ji].dns.as_ref().expect("set").udp.is_none() {
                let Some(port) = self.alloc_port() else {
                    return progress;
                };
                let mut s = udp::Socket::new(
                    udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 65536]),
                    udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 65536]),
                );
                let _ = s.bind(port);
                let h = self.sockets.add(s);
                self.jobs[ji].dns.as_mut().expect("set").udp = Some(h);
            }
            let h = self.jobs[ji].dns.as_ref().expect("set").udp.expect("set");
            let mut got = Vec::new();
            {
                let s = self.sockets.get_mut::<udp::Socket>(h);
                while let Ok((data, meta)) = s.recv() {
                    if meta.endpoint.addr == IpAddress::Ipv4(gw) && meta.endpoint.port == 53 {
                        got.push(data.to_vec());
                    }
                }
            }
            for m in got {
                progress = true;
                self.dns_reply(ji, &m, false, now_us);
            }
            let records = self.jobs[ji].spec.records;
            let parallel = self.jobs[ji].spec.parallel as usize;
            let retry = self.jobs[ji].spec.retry_ms * 1000;
            let idx = self.idx;
            let mut sends = Vec::new();
            let mut timeouts = Vec::new();
            {
                let run = self.jobs[ji].dns.as_mut().expect("set");
                while run.next < count && run.active.len() < parallel && now_us < deadline {
                    run.active.push(UdpQuery {
                        i: run.next,
                        attempts: 0,
                        last_send: 0,
                    });
                    run.next += 1;
                }
                for k in 0..run.active.len() {
                    let q = &run.active[k];
                    if q.attempts > 0 && now_us < q.last_send + retry {
                        continue;
                    }
                    if q.attempts >= DNS_ATTEMPTS || now_us >= deadline {
                        timeouts.push((q.i, q.attempts));
                        continue;
                    }
                    let i = q.i;
                    let id = Self::dns_new_id(run, ji, i, now_us);
                    let q = &mut run.active[k];
                    q.attempts += 1;
                    q.last_send = now_us;
                    sends.push(dnsmsg::query(id, &dnsmsg::query_name(records, idx, ji, i)));
                }
            }
            let s = self.sockets.get_mut::<udp::Socket>(h);
            for m in sends {
                if s.send_slice(&m, (gw, 53)).is_ok() {
                    progress = true;
                }
            }
            for (i, n) in timeouts {
                let o = Outcome::Timeout {
                    detail: format!("query {i} unanswered after {n} attempts"),
                };
                self.dns_finish(ji, i, o, now_us);
                progress = true;
            }
        }
        progress |= self.dns_tcp_step(ji, now_us, deadline);
        let run = self.jobs[ji].dns.as_ref().expect("set");
        if run.done.len() as u32 >= count && run.tcp.is_empty() {
            if let Some(h) = run.udp {
                self.sockets.remove(h);
            }
            self.jobs[ji].dns.as_mut().expect("set").udp = None;
            self.jobs[ji].finished = true;
            progress = true;
        }
        progress
    }

    fn dns_tcp_step(&mut self, ji: usize, now_us: u64, deadline: u64) -> bool {
        let mut progress = false;
        let mut k = 0;
        let mut replies = Vec::new();
        let mut reopen = Vec::new();
        loop {
            let run = self.jobs[ji].dns.as_mut().expect("set");
            if k >= run.tcp.len() {
                break;
            }
            let c = &mut run.tcp[k];
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if s.state() == tcp::State::Established {
                c.established = true;
            }
            while c.sent < c.out.len() && s.can_send() {
                let n = s.send_slice(&c.out[c.sent..]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                c.sent += n;
                progress = true;
            }
            while s.can_recv() {
                let inbuf = &mut c.inbuf;
                let _ = s.recv(|b| {
                    inbuf.extend_from_slice(b);
                    (b.len(), ())
                });
                progress = true;
            }
            while c.inbuf.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([c.inbuf[0], c.inbuf[1]]));
                if c.inbuf.len() < 2 + len {
                    break;
                }
                let m: Vec<u8> = c.inbuf.drain(..2 + len).skip(2).collect();
                if m.len() >= 2 {
                    let id = u16::from_be_bytes([m[0], m[1]]);
                    c.queries.retain(|q| q.1 != id);
                }
                replies.push(m);
            }
            let closed = s.state() == tcp::State::Closed || (!s.may_recv() && c.established);
            if c.queries.is_empty() || closed || now_us >= deadline {
                // Done with it (or it failed): close, and retry what is unanswered.
                if s.state() != tcp::State::Closed {
                    s.close();
                }
                let c = run.tcp.swap_remove(k);
                if !c.queries.is_empty() && now_us < deadline {
                    reopen.extend(c.queries.iter().map(|q| q.0));
                }
                self.closing.push((c.handle, now_us));
                progress = true;
                continue;
            }
            k += 1;
        }
        for m in replies {
            self.dns_reply(ji, &m, true, now_us);
        }
        let run = self.jobs[ji].dns.as_mut().expect("set");
        reopen.retain(|i| !run.done.contains_key(i));
        let (retry, give_up): (Vec<u32>, Vec<u32>) = reopen
            .into_iter()
            .partition(|i| run.tcp_tries.get(i).copied().unwrap_or(0) < DNS_TCP_TRIES);
        for i in give_up {
            let o = Outcome::Timeout {
                detail: format!("query {i}: {DNS_TCP_TRIES} TCP connections failed"),
            };
            self.dns_finish(ji, i, o, now_us);
        }
        if !retry.is_empty() {
            self.dns_open_tcp(ji, retry, now_us);
        }
        // Queries past the deadline that nothing carries any more.
        let run = self.jobs[ji].dns.as_ref().expect("set");
        if now_us >= deadline {
            let open: Vec<u32> = (0..run.next)
                .filter(|i| !run.done.contains_key(i))
                .filter(|i| !run.active.iter().any(|q| q.i == *i))
                .collect();
            for i in open {
                let o = Outcome::Timeout {
                    detail: format!("query {i}: no answer over TCP by the deadline"),
                };
                self.dns_finish(ji, i, o, now_us);
            }
        }
        progress
    }

    /// The next time a DNS job needs a look without any frame arriving.
    pub(super) fn dns_timer(&self, ji: usize) -> Option<u64> {
        let j = &self.jobs[ji];
        let run = j.dns.as_ref()?;
        let retry = j.spec.retry_ms * 1000;
        run.active
            .iter()
            .filter(|q| q.attempts > 0)
            .map(|q| q.last_send + retry)
            .min()
    }

    /// Advance the guest's server; true on progress.
    pub(super) fn serve_step(&mut self, ji: usize, now_us: u64) -> bool {
        let mut progress = false;
        let port = self.jobs[ji].spec.port();
        let deadline = (self.jobs[ji].spec.deadline_s * 1e6) as u64;
        let buf = self.buffer;
        let run = self.jobs[ji].serve.get_or_insert_with(ServeRun::default);
        // Listening sockets that took a SYN become connections; keep spares listening.
        let mut k = 0;
        while k < run.listeners.len() {
            let h = run.listeners[k];
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match s.state() {
                tcp::State::Listen => k += 1,
                tcp::State::Closed => {
                    let _ = s.listen(port);
                    k += 1;
                }
                _ => {
                    run.listeners.swap_remove(k);
                    run.conns.push(ServeConn {
                        handle: h,
                        header: Vec::new(),
                        echoed: 0,
                        established: false,
                        peer_ok: false,
                    });
                    progress = true;
                }
            }
        }
        let clients_done = self.world.borrow().clients_left == 0;
        while !clients_done && run.listeners.len() < SPARE_LISTENERS {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; buf]),
                tcp::SocketBuffer::new(vec![0; buf]),
            );
            s.set_nagle_enabled(false);
            let _ = s.listen(port);
            run.listeners.push(self.sockets.add(s));
            progress = true;
        }
        let mut finished = Vec::new();
        let mut k = 0;
        while k < run.conns.len() {
            let c = &mut run.conns[k];
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            let state = s.state();
            if matches!(state, tcp::State::Established | tcp::State::CloseWait) {
                c.established = true;
            }
            let mut outcome = None;
            // Echo what fits in the send buffer.
            while s.can_recv() && s.can_send() {
                let room = s.send_capacity() - s.send_queue();
                let mut chunk = Vec::new();
                let _ = s.recv(|b| {
                    let n = b.len().min(room);
                    chunk.extend_from_slice(&b[..n]);
                    (n, ())
                });
                if chunk.is_empty() {
                    break;
                }
                if c.header.len() < 6 {
                    let need = 6 - c.header.len();
                    c.header.extend_from_slice(&chunk[..need.min(chunk.len())]);
                    if c.header.len() == 6 {
                        let ip = Ipv4Addr::new(c.header[0], c.header[1], c.header[2], c.header[3]);
                        let p = u16::from_be_bytes([c.header[4], c.header[5]]);
                        let seen = s.remote_endpoint();
                        let want = smoltcp::wire::IpEndpoint::new(IpAddress::Ipv4(ip), p);
                        if seen != Some(want) {
                            outcome = Some(Outcome::Corrupt(format!(
                                "guest server saw source {seen:?}, the client is {ip}:{p}"
                            )));
                        } else {
                            c.peer_ok = true;
                            *run.sources.entry(ip).or_default() += 1;
                        }
                    }
                }
                let _ = s.send_slice(&chunk);
                c.echoed += chunk.len() as u64;
                progress = true;
            }
            if outcome.is_none() {
                if c.established && !s.may_recv() && !s.can_recv() {
                    if state == tcp::State::CloseWait {
                        s.close();
                    }
                    outcome = Some(if c.peer_ok {
                        Outcome::Complete {
                            bytes: c.echoed,
                            at_us: now_us,
                        }
                    } else {
                        Outcome::Truncated {
                            got: c.echoed,
                            at_us: now_us,
                        }
                    });
                } else if state == tcp::State::Closed {
                    if c.established {
                        outcome = Some(Outcome::Reset {
                            established: true,
                            at_us: now_us,
                        });
                    } else {
                        // A half-open connection that never completed: nothing to report.
                        let h = c.handle;
                        run.conns.swap_remove(k);
                        self.sockets.remove(h);
                        progress = true;
                        continue;
                    }
                } else if now_us >= deadline {
                    outcome = Some(Outcome::Timeout {
                        detail: format!("guest server: state {state}, echoed {}", c.echoed),
                    });
                    s.abort();
                }
            } else {
                s.abort();
            }
            if let Some(o) = outcome {
                let c = run.conns.swap_remove(k);
                finished.push((c.handle, o));
                progress = true;
                continue;
            }
            k += 1;
        }
        if clients_done && run.conns.is_empty() {
            for h in std::mem::take(&mut run.listeners) {
                self.sockets.remove(h);
            }
            self.jobs[ji].finished = true;
            progress = true;
        }
        for (h, o) in finished {
            let desc = format!("{o:?}");
            self.event(now_us, "serve-end", 0, || format!("job{ji} server {desc}"));
            self.jobs[ji].outcomes.push(o);
            self.closing.push((h, now_us));
        }
        progress
    }

    /// Advance the guest's UDP echo service; true on progress. A datagram is the
    /// client's address and port, then anything: the source must be that address.
    pub(super) fn udp_serve_step(&mut self, ji: usize, now_us: u64) -> bool {
        let mut progress = false;
        let port = self.jobs[ji].spec.port();
        let run = self.jobs[ji].serve.get_or_insert_with(ServeRun::default);
        let h = match run.udp {
            Some(h) => h,
            None => {
                let mut s = udp::Socket::new(
                    udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 65536]),
                    udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 65536]),
                );
                let _ = s.bind(port);
                let h = self.sockets.add(s);
                run.udp = Some(h);
                progress = true;
                h
            }
        };
        let s = self.sockets.get_mut::<udp::Socket>(h);
        let (mut received, mut echoed) = (0u64, 0u64);
        let mut bad = Vec::new();
        // Echo what the send buffer takes; the rest waits in the receive buffer.
        while s.can_recv() && s.can_send() {
            let Ok((data, meta)) = s.recv() else { break };
            let data = data.to_vec();
            received += 1;
            progress = true;
            let from = meta.endpoint;
            let claimed = (data.len() >= 6).then(|| {
                let ip = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
                (ip, u16::from_be_bytes([data[4], data[5]]))
            });
            match claimed {
                Some((ip, p)) if from.addr == IpAddress::Ipv4(ip) && from.port == p => {
                    *run.sources.entry(ip).or_default() += 1;
                }
                _ => bad.push(Outcome::Corrupt(format!(
                    "guest UDP service: a datagram from {from} claims {claimed:?}"
                ))),
            }
            if s.send_slice(&data, from).is_ok() {
                echoed += 1;
                run.echoed += data.len() as u64;
            }
        }
        let clients_done = self.world.borrow().clients_left == 0;
        let finished = clients_done && !s.can_recv();
        let total = run.echoed;
        if finished {
            run.udp = None;
            self.sockets.remove(h);
            bad.push(Outcome::Complete {
                bytes: total,
                at_us: now_us,
            });
            self.jobs[ji].finished = true;
            progress = true;
        }
        {
            let w = &mut *self.world.borrow_mut();
            w.udp_fwd.guest_received += received;
            w.udp_fwd.guest_echoed += echoed;
        }
        self.jobs[ji].outcomes.extend(bad);
        progress
    }

    /// A SYN for a connection a socket already holds goes to that socket only (Linux
    /// looks connections up by 4-tuple first); smoltcp would hand it to a spare listening
    /// socket earlier in its set and open a second connection.
    pub(super) fn drop_syn_for_known_connection(&mut self) {
        use smoltcp::wire::{IpProtocol, TcpPacket};
        if !self.jobs.iter().any(|j| j.spec.kind == JobKind::Serve) {
            return;
        }
        let sockets = &self.sockets;
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
            if !t.syn() || t.ack() {
                return true;
            }
            let (src, sport, dport) = (ip.src_addr(), t.src_port(), t.dst_port());
            !sockets.iter().any(|(_, sock)| match sock {
                smoltcp::socket::Socket::Tcp(s) => {
                    !matches!(s.state(), tcp::State::Listen | tcp::State::TimeWait)
                        && s.local_endpoint().is_some_and(|e| e.port == dport)
                        && s.remote_endpoint()
                            .is_some_and(|e| e.port == sport && e.addr == IpAddress::Ipv4(src))
                }
                _ => false,
            })
        });
    }
}
