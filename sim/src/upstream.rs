//! Upstream hosts: turmoil hosts serving TCP echo, echo-after-EOF (half-close), a bulk sink
//! and a bulk source that check what they move, a tiny HTTP server and UDP echo.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::{TcpListener, TcpStream, UdpSocket};

use crate::rng::{Fnv, Pattern};

pub const PORT_ECHO: u16 = 7;
pub const PORT_AFTER_EOF: u16 = 8;
pub const PORT_SINK: u16 = 9;
pub const PORT_SOURCE: u16 = 19;
pub const PORT_HTTP: u16 = 80;

const CHUNK: usize = 16 * 1024;

/// The software of an upstream host (restarted by `bounce`).
pub async fn serve() -> turmoil::Result {
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
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

/// `GET /SIZE/KEY HTTP/1.0`: a body of SIZE pattern bytes.
async fn http(mut s: TcpStream) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 || req.len() > 8192 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let mut parts = path.trim_start_matches('/').split('/');
    let size: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let key: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {size}\r\nContent-Type: application/octet-stream\r\n\r\n");
    s.write_all(head.as_bytes()).await?;
    send_pattern(&mut s, key, size).await?;
    shutdown(&mut s).await
}

/// Shut down the write side once the peer's receive queue has room: turmoil parks a FIN
/// that arrives at a full queue until another segment comes (see `hostnet::SimTcp`).
async fn shutdown(s: &mut TcpStream) -> std::io::Result<()> {
    s.writable().await?;
    s.shutdown().await
}
