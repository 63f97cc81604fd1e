//! Upstream hosts: turmoil hosts serving TCP echo, echo-after-EOF (half-close), a bulk sink
//! and a bulk source that check what they move, a tiny HTTP server and UDP echo.

use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::{TcpListener, TcpStream, UdpSocket};

use crate::dnsmsg;
use crate::rng::{Fnv, Pattern};
use crate::scenario::{DnsBehaviour, ProxyBehaviour};

pub const PORT_ECHO: u16 = 7;
pub const PORT_AFTER_EOF: u16 = 8;
pub const PORT_SINK: u16 = 9;
pub const PORT_SOURCE: u16 = 19;
pub const PORT_HTTP: u16 = 80;
pub const PORT_PROXY: u16 = 3128;

const CHUNK: usize = 16 * 1024;

/// The software of an upstream host (restarted by `bounce`); with `dns`, also a DNS
/// server on port 53 behaving so; with `proxy`, an HTTP proxy on port 3128.
pub async fn serve(
    me: Ipv4Addr,
    dns: Option<(DnsBehaviour, u64)>,
    proxy: Option<ProxyBehaviour>,
) -> turmoil::Result {
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    if let Some((b, delay_ms)) = dns {
        dns_servers(me, b, Duration::from_millis(delay_ms)).await?;
    }
    if let Some(b) = proxy.filter(|b| *b != ProxyBehaviour::Refuse) {
        let l = TcpListener::bind(any(PORT_PROXY)).await?;
        tokio::task::spawn_local(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::task::spawn_local(async move {
                    let _ = proxy_conn(s, b).await;
                });
            }
        });
    }
    for port in [PORT_ECHO, PORT_AFTER_EOF, PORT_SINK, PORT_SOURCE, PORT_HTTP] {
        let l = TcpListener::bind(any(port)).await?;
        tokio::task::spawn_local(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::task::spawn_local(async move {
                    let _ = match port {
                        PORT_ECHO => echo(s).await,
                        PORT_AFTER_EOF => echo_after_eof(s).await,
                        PORT_SINK => sink(s).await,
                        PORT_SOURCE => source(s).await,
                        _ => http(s).await,
                    };
                });
            }
        });
    }
    let udp = UdpSocket::bind(any(PORT_ECHO)).await?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = udp.recv_from(&mut buf).await?;
        let _ = udp.send_to(&buf[..n], from).await;
    }
}

async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await?;
    }
    shutdown(&mut s).await
}

/// Read everything until the peer's FIN, then send it all back: data after a half-close.
async fn echo_after_eof(mut s: TcpStream) -> std::io::Result<()> {
    let mut all = Vec::new();
    s.read_to_end(&mut all).await?;
    for chunk in all.chunks(CHUNK) {
        s.write_all(chunk).await?;
    }
    shutdown(&mut s).await
}

/// Count and hash until EOF; answer with 8 bytes count and 8 bytes FNV-1a hash.
async fn sink(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut hash = Fnv::default();
    let mut count = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hash.write(&buf[..n]);
        count += n as u64;
    }
    let mut reply = count.to_be_bytes().to_vec();
    reply.extend_from_slice(&hash.0.to_be_bytes());
    s.write_all(&reply).await?;
    shutdown(&mut s).await
}

/// Request: 8 bytes length, 8 bytes key; reply: that many bytes of the key's pattern.
async fn source(mut s: TcpStream) -> std::io::Result<()> {
    let mut req = [0u8; 16];
    s.read_exact(&mut req).await?;
    let len = u64::from_be_bytes(req[0..8].try_into().expect("8"));
    let key = u64::from_be_bytes(req[8..16].try_into().expect("8"));
    send_pattern(&mut s, key, len).await?;
    shutdown(&mut s).await
}

async fn send_pattern(s: &mut TcpStream, key: u64, len: u64) -> std::io::Result<()> {
    let mut p = Pattern::new(key);
    let mut left = len;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        p.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// The request head of a connection (`None`: EOF or too long first).
async fn read_head(s: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 || req.len() > 8192 {
            return Ok(None);
        }
        req.extend_from_slice(&buf[..n]);
    }
    Ok(Some(String::from_utf8_lossy(&req).into_owned()))
}

/// An HTTP proxy that answers as the origin (`works`: `GET http://HOST/SIZE/KEY` gets the
/// body `http` would send; a request not in absolute form gets 400), or that closes
/// after the head (`reset`).
async fn proxy_conn(mut s: TcpStream, b: ProxyBehaviour) -> std::io::Result<()> {
    let Some(head) = read_head(&mut s).await? else {
        return Ok(());
    };
    if b == ProxyBehaviour::Reset {
        return Ok(());
    }
    let target = head.split_whitespace().nth(1).unwrap_or("");
    let Some(rest) = target.strip_prefix("http://") else {
        s.write_all(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await?;
        return shutdown(&mut s).await;
    };
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    respond(&mut s, path).await
}

/// `GET /SIZE/KEY HTTP/1.0`: a body of SIZE pattern bytes.
async fn http(mut s: TcpStream) -> std::io::Result<()> {
    let Some(line) = read_head(&mut s).await? else {
        return Ok(());
    };
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    respond(&mut s, &path).await
}

async fn respond(s: &mut TcpStream, path: &str) -> std::io::Result<()> {
    let mut parts = path.trim_start_matches('/').split('/');
    let size: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let key: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {size}\r\nContent-Type: application/octet-stream\r\n\r\n");
    s.write_all(head.as_bytes()).await?;
    send_pattern(s, key, size).await?;
    shutdown(s).await
}

/// Shut down the write side once the peer's receive queue has room: turmoil parks a FIN
/// that arrives at a full queue until another segment comes (see `hostnet::SimTcp`).
async fn shutdown(s: &mut TcpStream) -> std::io::Result<()> {
    s.writable().await?;
    s.shutdown().await
}

/// What a DNS upstream sends back for `query` (None: nothing).
pub fn dns_answer(me: Ipv4Addr, b: DnsBehaviour, tcp: bool, query: &[u8]) -> Option<Vec<u8>> {
    let (_, name) = dnsmsg::question(query)?;
    let n = dnsmsg::records_asked(&name);
    let full = || {
        let addrs: Vec<Ipv4Addr> = (0..n).map(|k| dnsmsg::record_addr(me, k)).collect();
        dnsmsg::answer(query, 0, &addrs)
    };
    match b {
        DnsBehaviour::Answer | DnsBehaviour::Slow => full(),
        DnsBehaviour::Drop => None,
        DnsBehaviour::Servfail => dnsmsg::answer(query, dnsmsg::RCODE_SERVFAIL, &[]),
        DnsBehaviour::Truncate if tcp => full(),
        DnsBehaviour::Truncate => dnsmsg::answer(query, dnsmsg::FLAG_TC, &[]),
        DnsBehaviour::Garbage => {
            // Deterministic junk keyed by the query: a header with the query's ID but a
            // question that is not the one asked, then noise.
            let mut g = vec![0u8; 40];
            Pattern::new(u64::from(u16::from_be_bytes([query[0], query[1]]))).fill(&mut g);
            g[0..2].copy_from_slice(&query[0..2]);
            g[2] |= 0x80;
            Some(g)
        }
        DnsBehaviour::WrongId => {
            let mut a = full()?;
            a[0] ^= 0x5a;
            a[1] ^= 0xa5;
            Some(a)
        }
    }
}

/// The DNS servers of an upstream: UDP and TCP (2-byte length framing) on port 53.
async fn dns_servers(me: Ipv4Addr, b: DnsBehaviour, delay: Duration) -> std::io::Result<()> {
    let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 53));
    let udp = Rc::new(UdpSocket::bind(any).await?);
    tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let Some(reply) = dns_answer(me, b, false, &buf[..n]) else {
                continue;
            };
            if b == DnsBehaviour::Slow {
                let udp = udp.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(delay).await;
                    let _ = udp.send_to(&reply, from).await;
                });
            } else {
                let _ = udp.send_to(&reply, from).await;
            }
        }
    });
    let l = TcpListener::bind(any).await?;
    tokio::task::spawn_local(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::task::spawn_local(dns_tcp(s, me, b, delay));
        }
    });
    Ok(())
}

async fn dns_tcp(
    mut s: TcpStream,
    me: Ipv4Addr,
    b: DnsBehaviour,
    delay: Duration,
) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).await.is_err() {
            break;
        }
        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut q).await?;
        let Some(reply) = dns_answer(me, b, true, &q) else {
            continue;
        };
        if b == DnsBehaviour::Slow {
            tokio::time::sleep(delay).await;
        }
        let mut out = (reply.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&reply);
        s.write_all(&out).await?;
    }
    shutdown(&mut s).await
}
