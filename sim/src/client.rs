//! Client hosts: turmoil hosts that connect to the daemon host's forwarded ports. Each
//! connection first sends the client's own address and port (6 bytes: the guest's server
//! checks that it sees this very source), then `bytes` of a keyed pattern, reads the echo
//! of all of it, half-closes and waits for the server's FIN.
//!
//! A connection that ends (EOF or reset) before any echoed byte arrived is reported as
//! refused (`Reset { established: false }`): from the client's side the guest refused it,
//! whether the daemon's listener answered the SYN or there was no listener at all.
//!
//! A `udp_echo` job sends datagrams to a UDP forward, one at a time, each retried every
//! `retry_ms` until answered (one outcome per datagram). Each carries the client's own
//! address and port (the guest's service checks its source against them), a sequence
//! number and a keyed pattern. Every reply must come from the forward's address, carry
//! the client's address and a sequence number already sent, and its pattern intact. A
//! datagram first sent after the link's faults healed must be answered at its first
//! attempt, exactly once: the delivery ratio once the link is clean is 1.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::guest::Outcome;
use crate::rng::{derive, Pattern};
use crate::scenario::{ClientSpec, Job, JobKind};
use crate::world::World;

/// What a client host reports to the world.
#[derive(Clone, Debug, Default)]
pub struct ClientShared {
    pub name: String,
    /// Per job, the outcome of each connection.
    pub outcomes: Vec<Vec<Outcome>>,
    pub done: bool,
}

type Slot = Rc<RefCell<Option<Rc<RefCell<World>>>>>;

fn now_us() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_micros() as u64)
}

fn record(world: &Rc<RefCell<World>>, what: &str, n: u64, line: impl FnOnce() -> String) {
    let w = &mut *world.borrow_mut();
    let t = now_us();
    w.trace.event(t, what, n, &[]);
    w.trace.log(t, line);
}

/// The software of client host `idx`.
pub async fn run(
    idx: usize,
    spec: ClientSpec,
    daemon: Ipv4Addr,
    seed: u64,
    heal_us: u64,
    slot: Slot,
) -> turmoil::Result {
    let world = loop {
        if let Some(w) = slot.borrow().clone() {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    // Clients start once the guest is up (holds a lease), as a harness waits for a
    // service to be ready; before that a forward refuses (no guest to go to).
    while !world.borrow().guests.iter().all(|g| g.lease.is_some()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut tasks = Vec::new();
    for (ji, job) in spec.jobs.iter().cloned().enumerate() {
        let world = world.clone();
        let key = derive(seed, &format!("client-{idx}-{ji}"));
        let me: Ipv4Addr = spec.ip.parse().expect("checked");
        tasks.push(tokio::task::spawn_local(async move {
            if job.kind == JobKind::UdpEcho {
                udp_job(idx, ji, job, me, daemon, key, heal_us, world).await
            } else {
                run_job(idx, ji, job, daemon, key, world).await
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let w = &mut *world.borrow_mut();
    w.clients[idx].done = true;
    w.clients_left -= 1;
    Ok(())
}

async fn run_job(
    idx: usize,
    ji: usize,
    job: Job,
    daemon: Ipv4Addr,
    key: u64,
    world: Rc<RefCell<World>>,
) {
    let start = Duration::from_secs_f64(job.start_s);
    let elapsed = Duration::from_micros(now_us());
    if start > elapsed {
        tokio::time::sleep(start - elapsed).await;
    }
    let deadline = Duration::from_secs_f64(job.deadline_s);
    let dst = SocketAddr::new(IpAddr::V4(daemon), job.port.unwrap_or(80));
    let next = Rc::new(std::cell::Cell::new(0u32));
    let mut lanes = Vec::new();
    for _ in 0..job.parallel.min(job.count) {
        let (next, world, job) = (next.clone(), world.clone(), job.clone());
        lanes.push(tokio::task::spawn_local(async move {
            loop {
                let c = next.get();
                if c >= job.count {
                    break;
                }
                next.set(c + 1);
                let left = deadline.saturating_sub(Duration::from_micros(now_us()));
                let k = key ^ u64::from(c).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                record(&world, "client-conn", u64::from(c), || {
                    format!("client{idx} job{ji} conn{c} -> {dst}")
                });
                let o = match tokio::time::timeout(left, conn(dst, &job, k)).await {
                    Ok(o) => o,
                    Err(_) => Outcome::Timeout {
                        detail: format!("client connection {c} not finished"),
                    },
                };
                let desc = format!("{o:?}");
                record(&world, "client-end", u64::from(c), || {
                    format!("client{idx} job{ji} conn{c} {desc}")
                });
                world.borrow_mut().clients[idx].outcomes[ji].push(o);
            }
        }));
    }
    for l in lanes {
        let _ = l.await;
    }
}

async fn conn(dst: SocketAddr, job: &Job, key: u64) -> Outcome {
    let refused = || Outcome::Reset {
        established: false,
        at_us: now_us(),
    };
    let Ok(s) = turmoil::net::TcpStream::connect(dst).await else {
        return refused();
    };
    let me = match s.local_addr() {
        Ok(SocketAddr::V4(a)) => a,
        _ => return Outcome::Corrupt("client without an IPv4 address".into()),
    };
    let mut head = me.ip().octets().to_vec();
    head.extend_from_slice(&me.port().to_be_bytes());
    let total = 6 + job.bytes;
    let (mut rd, mut wr) = s.into_split();
    let pause = Duration::from_secs_f64(job.pause_s);
    let half = job.bytes / 2;
    let received = Rc::new(std::cell::Cell::new(0u64));
    let writer = {
        let received = received.clone();
        async move {
            wr.write_all(&head).await?;
            let mut p = Pattern::new(key);
            let mut sent = 0u64;
            let mut buf = vec![0u8; 16 * 1024];
            while sent < job.bytes {
                if !pause.is_zero() && sent == half {
                    // Wait for the echo of the first half, stay silent, then go on.
                    while received.get() < 6 + half {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    tokio::time::sleep(pause).await;
                }
                let mut n = ((job.bytes - sent) as usize).min(buf.len());
                if !pause.is_zero() && sent < half {
                    n = n.min((half - sent) as usize);
                }
                p.fill(&mut buf[..n]);
                wr.write_all(&buf[..n]).await?;
                sent += n as u64;
            }
            // A FIN reaching a full turmoil queue is parked (see `hostnet::SimTcp`).
            let _ = wr.flush().await;
            wr.shutdown().await?;
            std::io::Result::Ok(wr)
        }
    };
    let reader = {
        let received = received.clone();
        async move {
            let mut want = head_pattern(me, key);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(n) => n,
                    Err(_) => return Err(received.get()),
                };
                if n == 0 {
                    return Ok(received.get());
                }
                let got = received.get();
                if got + n as u64 > total {
                    return Ok(u64::MAX);
                }
                let expect = want(n);
                if expect != buf[..n] {
                    return Ok(u64::MAX - 1);
                }
                received.set(got + n as u64);
            }
        }
    };
    let (w, r) = tokio::join!(writer, reader);
    let at_us = now_us();
    match r {
        Ok(u64::MAX) => Outcome::Corrupt(format!("more than the {total} bytes sent came back")),
        Ok(x) if x == u64::MAX - 1 => Outcome::Corrupt("echo differs from what was sent".into()),
        Ok(n) if n == total && w.is_ok() => Outcome::Complete { bytes: n, at_us },
        Ok(0) | Err(0) => refused(),
        Ok(n) => Outcome::Truncated { got: n, at_us },
        Err(_) => Outcome::Reset {
            established: true,
            at_us,
        },
    }
}

/// The bytes the echo must return, in order: the 6-byte header, then the pattern.
fn head_pattern(me: std::net::SocketAddrV4, key: u64) -> impl FnMut(usize) -> Vec<u8> {
    let mut head = me.ip().octets().to_vec();
    head.extend_from_slice(&me.port().to_be_bytes());
    let mut pos = 0usize;
    let mut p = Pattern::new(key);
    move |n| {
        let mut out = Vec::with_capacity(n);
        while out.len() < n && pos < 6 {
            out.push(head[pos]);
            pos += 1;
        }
        let rest = n - out.len();
        let start = out.len();
        out.resize(n, 0);
        p.fill(&mut out[start..start + rest]);
        out
    }
}

/// A `udp_echo` datagram: the client's address and port, the sequence number, the
/// attempt, then `bytes` of the pattern keyed by the sequence number.
fn udp_datagram(me: SocketAddr, key: u64, seq: u32, attempt: u16, bytes: u64) -> Vec<u8> {
    let mut d = Vec::with_capacity(12 + bytes as usize);
    if let SocketAddr::V4(a) = me {
        d.extend_from_slice(&a.ip().octets());
        d.extend_from_slice(&a.port().to_be_bytes());
    }
    d.extend_from_slice(&seq.to_be_bytes());
    d.extend_from_slice(&attempt.to_be_bytes());
    let start = d.len();
    d.resize(start + bytes as usize, 0);
    Pattern::new(key ^ u64::from(seq)).fill(&mut d[start..]);
    d
}

#[allow(clippy::too_many_arguments)]
async fn udp_job(
    idx: usize,
    ji: usize,
    job: Job,
    me_ip: Ipv4Addr,
    daemon: Ipv4Addr,
    key: u64,
    heal_us: u64,
    world: Rc<RefCell<World>>,
) {
    let start = Duration::from_secs_f64(job.start_s);
    let elapsed = Duration::from_micros(now_us());
    if start > elapsed {
        tokio::time::sleep(start - elapsed).await;
    }
    let deadline_us = (job.deadline_s * 1e6) as u64;
    let dst = SocketAddr::new(IpAddr::V4(daemon), job.port.unwrap_or(7));
    let retry = Duration::from_millis(job.retry_ms);
    let push = |o: Outcome| world.borrow_mut().clients[idx].outcomes[ji].push(o);
    let sock = match turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await {
        Ok(s) => s,
        Err(e) => {
            for _ in 0..job.count {
                push(Outcome::Corrupt(format!("client cannot bind: {e}")));
            }
            return;
        }
    };
    let me = SocketAddr::new(IpAddr::V4(me_ip), sock.local_addr().map_or(0, |a| a.port()));
    // Per sequence number: attempts, replies, first send time.
    let mut replies = vec![0u32; job.count as usize];
    let mut attempts = vec![0u16; job.count as usize];
    let mut first_send = vec![u64::MAX; job.count as usize];
    let mut buf = vec![0u8; 65536];
    let mut bad: Option<String> = None;
    // A reply: its sequence number when it is one this client sent, intact.
    let check = |n: usize, from: SocketAddr, buf: &[u8], sent: u32| -> Result<u32, String> {
        if from != dst {
            return Err(format!("a reply came from {from}, not the forward {dst}"));
        }
        if n < 12 {
            return Err(format!("a runt reply of {n} bytes"));
        }
        let seq = u32::from_be_bytes(buf[6..10].try_into().expect("4"));
        let attempt = u16::from_be_bytes(buf[10..12].try_into().expect("2"));
        if seq >= sent {
            return Err(format!("a reply to datagram {seq}, never sent"));
        }
        if buf[..n] != udp_datagram(me, key, seq, attempt, job.bytes)[..] {
            return Err(format!("the reply to datagram {seq} differs from it"));
        }
        Ok(seq)
    };
    let half = job.count / 2;
    'datagrams: for seq in 0..job.count {
        if job.pause_s > 0.0 && seq == half && seq > 0 {
            // Silent past the idle timeout: the forward's flow expires, a new one starts.
            tokio::time::sleep(Duration::from_secs_f64(job.pause_s)).await;
        }
        let i = seq as usize;
        loop {
            if now_us() >= deadline_us {
                push(Outcome::Timeout {
                    detail: format!("datagram {seq} unanswered after {} attempts", attempts[i]),
                });
                continue 'datagrams;
            }
            let d = udp_datagram(me, key, seq, attempts[i], job.bytes);
            if first_send[i] == u64::MAX {
                first_send[i] = now_us();
            }
            attempts[i] += 1;
            if sock.send_to(&d, dst).await.is_ok() {
                world.borrow_mut().udp_fwd.client_sent += 1;
            }
            let until = tokio::time::Instant::now() + retry;
            while tokio::time::Instant::now() < until {
                let r = tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await;
                let Ok(Ok((n, from))) = r else {
                    break;
                };
                world.borrow_mut().udp_fwd.client_replies += 1;
                match check(n, from, &buf, seq + 1) {
                    Err(why) => {
                        bad.get_or_insert(why);
                    }
                    Ok(s) => {
                        replies[s as usize] += 1;
                        if s == seq && replies[i] == 1 {
                            {
                                let w = &mut *world.borrow_mut();
                                w.udp_fwd.answered += 1;
                                if attempts[i] == 1 {
                                    w.udp_fwd.first_try += 1;
                                }
                            }
                            record(&world, "client-udp", u64::from(seq), || {
                                format!("client{idx} job{ji} datagram {seq} answered")
                            });
                            push(Outcome::Complete {
                                bytes: n as u64,
                                at_us: now_us(),
                            });
                            continue 'datagrams;
                        }
                    }
                }
            }
        }
    }
    // Late copies: anything still on its way.
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Ok((n, from))) = tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await {
        world.borrow_mut().udp_fwd.client_replies += 1;
        match check(n, from, &buf, job.count) {
            Ok(s) => replies[s as usize] += 1,
            Err(why) => {
                bad.get_or_insert(why);
            }
        }
    }
    for i in 0..job.count as usize {
        if first_send[i] >= heal_us
            && first_send[i] != u64::MAX
            && (attempts[i], replies[i]) != (1, 1)
        {
            bad.get_or_insert(format!(
                "datagram {i}, sent after the faults healed, took {} attempts and got {} replies (want 1 and 1)",
                attempts[i], replies[i]
            ));
        }
    }
    if let Some(why) = bad {
        // One outcome per datagram: the corrupt one replaces the last.
        if let Some(last) = world.borrow_mut().clients[idx].outcomes[ji].last_mut() {
            *last = Outcome::Corrupt(why);
        }
    }
}
