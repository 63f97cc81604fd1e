//! QEMU stream / passt framing over a real UNIX socket: splitting, batching, protocol
//! errors, reconnects, the send path and socket-file handling.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use usernet::stream::{bind, FramedStream, StreamTransport, MAX_FRAME};
use usernet::transport::FrameTransport;

const T: Duration = Duration::from_secs(5);

/// A unique socket path under /tmp, removed (if still there) on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new() -> TempPath {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        TempPath(PathBuf::from(format!(
            "/tmp/usernet-sf-{}-{n}.sock",
            std::process::id()
        )))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(i as u8).wrapping_mul(31))
        .collect()
}

fn wire(f: &[u8]) -> Vec<u8> {
    let mut v = (f.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(f);
    v
}

/// Receive `n` frames through `recv`/`next_frame`, bounded by a timeout.
async fn collect<F: FrameTransport>(t: &mut F, n: usize) -> Vec<Vec<u8>> {
    tokio::time::timeout(T, async {
        let mut got = Vec::new();
        while got.len() < n {
            assert!(t.recv().await.expect("recv"), "transport closed");
            while let Some(f) = t.next_frame() {
                got.push(f.to_vec());
            }
        }
        got
    })
    .await
    .expect("frames did not arrive in time")
}

async fn pause() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

#[tokio::test]
async fn split_batched_and_header_split_frames_arrive_in_order() {
    let path = TempPath::new();
    let mut t = StreamTransport::new(bind(&path.0, 8).unwrap());
    let a = frame(100, 1);
    let b = frame(14, 2);
    let c = frame(1514, 3);
    let d = frame(60, 4);
    let e = frame(MAX_FRAME, 5);
    let frames = vec![a.clone(), b.clone(), c.clone(), d.clone(), e.clone()];

    let p = path.0.clone();
    let client = tokio::spawn(async move {
        let mut s = UnixStream::connect(&p).await.unwrap();
        // A frame split across two writes (inside the payload).
        let wa = wire(&a);
        s.write_all(&wa[..50]).await.unwrap();
        pause().await;
        s.write_all(&wa[50..]).await.unwrap();
        pause().await;
        // Two frames in one write.
        let mut wbc = wire(&b);
        wbc.extend_from_slice(&wire(&c));
        s.write_all(&wbc).await.unwrap();
        pause().await;
        // The header split across writes.
        let wd = wire(&d);
        s.write_all(&wd[..2]).await.unwrap();
        pause().await;
        s.write_all(&wd[2..]).await.unwrap();
        pause().await;
        // A maximal frame.
        s.write_all(&wire(&e)).await.unwrap();
        s
    });
    let got = collect(&mut t, frames.len()).await;
    assert_eq!(got.len(), frames.len());
    for (i, (g, w)) in got.iter().zip(&frames).enumerate() {
        assert!(g == w, "frame {i} differs (len {} vs {})", g.len(), w.len());
    }
    assert!(t.next_frame().is_none());
    let _s = client.await.unwrap();
}

#[tokio::test]
async fn recv_is_cancel_safe() {
    let path = TempPath::new();
    let mut t = StreamTransport::new(bind(&path.0, 8).unwrap());
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(20 + 7 * i, i as u8)).collect();
    let bytes: Vec<u8> = frames.iter().flat_map(|f| wire(f)).collect();
    let p = path.0.clone();
    let client = tokio::spawn(async move {
        let mut s = UnixStream::connect(&p).await.unwrap();
        // Trickle in small pieces while the server keeps cancelling `recv`.
        for chunk in bytes.chunks(3) {
            s.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        s
    });
    let got = tokio::time::timeout(T, async {
        let mut got = Vec::new();
        let mut cancelled = 0;
        while got.len() < frames.len() {
            match tokio::time::timeout(Duration::from_millis(1), t.recv()).await {
                Err(_) => cancelled += 1,
                Ok(r) => assert!(r.unwrap()),
            }
            while let Some(f) = t.next_frame() {
                got.push(f.to_vec());
            }
        }
        assert!(cancelled > 0, "the test never cancelled recv");
        got
    })
    .await
    .expect("frames did not arrive in time");
    assert_eq!(got, frames);
    let _s = client.await.unwrap();
}

#[tokio::test]
async fn oversized_length_drops_the_connection_then_a_new_client_works() {
    let path = TempPath::new();
    let mut t = StreamTransport::new(bind(&path.0, 8).unwrap());
    let good = frame(64, 9);

    let p = path.0.clone();
    let g = good.clone();
    let bad_client = tokio::spawn(async move {
        let mut s = UnixStream::connect(&p).await.unwrap();
        let mut bytes = wire(&g);
        bytes.extend_from_slice(&70000u32.to_be_bytes());
        bytes.extend_from_slice(&[0u8; 100]);
        s.write_all(&bytes).await.unwrap();
        // The daemon must hang up on us.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .expect("no EOF in time");
        matches!(n, Ok(0))
            || matches!(&n, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    });
    // The good frame before the bad header is still delivered.
    assert_eq!(collect(&mut t, 1).await, vec![good.clone()]);
    assert_eq!(t.connections(), 1);

    // The next recv hits the bad header, drops the connection and waits for a new one.
    let p = path.0.clone();
    let second = frame(42, 10);
    let s2 = second.clone();
    let new_client = tokio::spawn(async move {
        // Connect only after the first client has seen its EOF.
        assert!(bad_client.await.unwrap(), "the bad client did not see EOF");
        let mut s = UnixStream::connect(&p).await.unwrap();
        s.write_all(&wire(&s2)).await.unwrap();
        // Read one frame sent by the daemon.
        let mut hdr = [0u8; 4];
        tokio::time::timeout(T, s.read_exact(&mut hdr))
            .await
            .unwrap()
            .unwrap();
        let len = u32::from_be_bytes(hdr) as usize;
        let mut body = vec![0u8; len];
        tokio::time::timeout(T, s.read_exact(&mut body))
            .await
            .unwrap()
            .unwrap();
        (hdr, body)
    });
    assert_eq!(collect(&mut t, 1).await, vec![second]);
    assert_eq!(t.connections(), 2);
    assert!(t.is_connected());

    // The send path: length header + frame.
    let reply = frame(1000, 11);
    t.send_frame(&reply).unwrap();
    assert_eq!(t.pending(), 1004);
    tokio::time::timeout(T, t.flush()).await.unwrap().unwrap();
    assert_eq!(t.pending(), 0);
    let (hdr, body) = new_client.await.unwrap();
    assert_eq!(hdr, 1000u32.to_be_bytes());
    assert_eq!(body, reply);
}

#[tokio::test]
async fn undersized_length_is_a_protocol_error_too() {
    let path = TempPath::new();
    let mut t = StreamTransport::new(bind(&path.0, 8).unwrap());
    let p = path.0.clone();
    let client = tokio::spawn(async move {
        let mut s = UnixStream::connect(&p).await.unwrap();
        s.write_all(&13u32.to_be_bytes()).await.unwrap();
        s.write_all(&[0u8; 13]).await.unwrap();
        let mut buf = [0u8; 4];
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .expect("no EOF in time");
        assert!(!matches!(n, Ok(n) if n > 0));
        // Then a good client.
        let mut s = UnixStream::connect(&p).await.unwrap();
        s.write_all(&wire(&frame(14, 1))).await.unwrap();
        s
    });
    assert_eq!(collect(&mut t, 1).await, vec![frame(14, 1)]);
    assert_eq!(t.connections(), 2);
    let _s = client.await.unwrap();
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_one() {
    let path = TempPath::new();
    let mut t = StreamTransport::new(bind(&path.0, 8).unwrap());
    let mut first = UnixStream::connect(&path.0).await.unwrap();
    first.write_all(&wire(&frame(30, 1))).await.unwrap();
    assert_eq!(collect(&mut t, 1).await, vec![frame(30, 1)]);

    // QEMU restarted: a second connection while the first one is still open.
    let mut second = UnixStream::connect(&path.0).await.unwrap();
    second.write_all(&wire(&frame(31, 2))).await.unwrap();
    assert_eq!(collect(&mut t, 1).await, vec![frame(31, 2)]);
    assert_eq!(t.connections(), 2);

    // The old connection was closed by the daemon.
    let mut buf = [0u8; 4];
    let n = tokio::time::timeout(T, first.read(&mut buf)).await.unwrap();
    assert!(!matches!(n, Ok(n) if n > 0), "old connection still open");

    // Frames go to the new connection.
    t.send_frame(&frame(20, 3)).unwrap();
    t.flush().await.unwrap();
    let mut got = vec![0u8; 24];
    tokio::time::timeout(T, second.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, wire(&frame(20, 3)));
}

#[tokio::test]
async fn sending_without_a_connection_drops_and_a_dead_peer_is_not_fatal() {
    let path = TempPath::new();
    let mut t = StreamTransport::new(bind(&path.0, 8).unwrap());
    t.send_frame(&frame(60, 1)).unwrap();
    assert_eq!(t.pending(), 0);
    t.flush().await.unwrap();

    let mut c = UnixStream::connect(&path.0).await.unwrap();
    c.write_all(&wire(&frame(60, 2))).await.unwrap();
    assert_eq!(collect(&mut t, 1).await.len(), 1);
    drop(c);
    // Lots of data to a closed peer: the write fails, flush still returns Ok.
    for _ in 0..64 {
        t.send_frame(&frame(MAX_FRAME, 3)).unwrap();
    }
    tokio::time::timeout(T, t.flush()).await.unwrap().unwrap();
    assert_eq!(t.pending(), 0);
    assert!(!t.is_connected(), "the dead connection was not dropped");
    // Invalid sizes are dropped.
    t.send_frame(&[0u8; 13]).unwrap();
    assert_eq!(t.pending(), 0);
}

#[tokio::test]
async fn bind_refuses_a_live_socket_and_replaces_a_stale_one() {
    let path = TempPath::new();
    let live = bind(&path.0, 4).unwrap();
    let e = bind(&path.0, 4).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    assert!(e.to_string().contains("address in use"), "{e}");
    // The failed bind did not remove the live socket.
    assert!(path.0.exists());
    UnixStream::connect(&path.0)
        .await
        .expect("the live listener still works");
    drop(live);
    assert!(!path.0.exists(), "socket file not removed on drop");

    // A stale socket: bound, then closed without unlinking.
    drop(std::os::unix::net::UnixListener::bind(&path.0).unwrap());
    assert!(path.0.exists());
    let l = bind(&path.0, 4).expect("stale socket should be replaced");
    UnixStream::connect(&path.0)
        .await
        .expect("connect to the new listener");
    drop(l);

    // A path that is not a socket is left alone.
    std::fs::write(&path.0, b"not a socket").unwrap();
    let e = bind(&path.0, 4).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&path.0).unwrap(), b"not a socket");
}

#[tokio::test]
async fn framed_stream_over_a_duplex_pipe() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut left = FramedStream::new(a);
    let mut right = FramedStream::new(b);
    let frames: Vec<Vec<u8>> = (0..10).map(|i| frame(14 + 150 * i, i as u8)).collect();
    for f in &frames {
        left.send_frame(f).unwrap();
    }
    assert!(left.pending() > 0);
    left.flush().await.unwrap();
    assert_eq!(left.pending(), 0);
    assert_eq!(collect(&mut right, frames.len()).await, frames);

    // EOF: recv reports the peer gone.
    drop(left);
    assert!(!tokio::time::timeout(T, right.recv())
        .await
        .unwrap()
        .unwrap());

    // A framing error is an InvalidData error.
    let (a, b) = tokio::io::duplex(1024);
    let mut right = FramedStream::new(b);
    let mut a = a;
    a.write_all(&100_000u32.to_be_bytes()).await.unwrap();
    let e = tokio::time::timeout(T, right.recv())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
}
