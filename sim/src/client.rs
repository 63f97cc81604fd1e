//! Client hosts: turmoil hosts that connect to the daemon host's forwarded ports. Each
//! connection first sends the client's own address and port (6 bytes: the guest's server
//! checks that it sees this very source), then `bytes` of a keyed pattern, reads the echo
//! of all of it, half-closes and waits for the server's FIN.
//!
//! A connection that ends (EOF or reset) before any echoed byte arrived is reported as
//! refused (`Reset { established: false }`): from the client's side the guest refused it,
//! whether the daemon's listener answered the SYN or there was no listener at all.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::guest::Outcome;
use crate::rng::{derive, Pattern};
use crate::scenario::{ClientSpec, Job};
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
        tasks.push(tokio::task::spawn_local(async move {
            run_job(idx, ji, job, daemon, key, world).await
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
