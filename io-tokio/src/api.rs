//! The control API: HTTP/1.1 with JSON bodies on a UNIX socket (mode 0600), in the shapes
//! of gvisor-tap-vsock's forwarder so that existing tools can drive it:
//!
//! - `GET /services/forwarder/all` → `[{"local","remote","protocol"}]`
//! - `POST /services/forwarder/expose` with `{"local","remote","protocol"}`
//! - `POST /services/forwarder/unexpose` with `{"local","protocol"}`
//! - `GET /leases` → `{"192.168.65.3": "5a:94:ef:e4:0c:ee"}`
//! - `GET /stats` → counters
//! - `GET /proxy` → the proxy settings in use (passwords hidden); `PUT /proxy` with
//!   settings (the shape of a `--proxy-config` JSON file) replaces them for new
//!   connections
//!
//! Errors are `{"message": "..."}` with a 4xx/5xx status. The socket lives on the host
//! only: nothing in the guest's network reaches it.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::forward::{parse_local, parse_remote, Forward, Protocol};

/// Request heads larger than this are refused (431).
const MAX_HEAD: usize = 16 * 1024;
/// Request bodies larger than this are refused (413).
const MAX_BODY: usize = 64 * 1024;

/// The forwarder API's JSON shape of a forward.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardJson {
    pub local: String,
    #[serde(default)]
    pub remote: String,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "tcp".into()
}

impl From<&Forward> for ForwardJson {
    fn from(f: &Forward) -> Self {
        ForwardJson {
            local: f.local.to_string(),
            remote: f.remote.to_string(),
            protocol: f.protocol.as_str().into(),
        }
    }
}

/// What the daemon is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    List,
    Expose(Forward),
    Unexpose {
        local: std::net::SocketAddr,
        protocol: Protocol,
    },
    Leases,
    Stats,
    GetProxy,
    SetProxy(crate::proxy::ProxySettings),
}

/// The daemon's answer: a JSON body, or an error status and message.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Ok(Value),
    Err(u16, String),
}

/// Requests travel to the driver loop with a channel for the answer.
pub type Control = (Request, oneshot::Sender<Reply>);

/// Turn an HTTP method, path and body into a request, or the error reply.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Request, Reply> {
    let bad = |m: String| Reply::Err(400, m);
    let parse = |body: &[u8]| -> Result<ForwardJson, Reply> {
        serde_json::from_slice::<ForwardJson>(body).map_err(|e| bad(format!("bad JSON body: {e}")))
    };
    match (method, path) {
        ("GET", "/services/forwarder/all") => Ok(Request::List),
        ("POST", "/services/forwarder/expose") => {
            let f = parse(body)?;
            let protocol: Protocol = f
                .protocol
                .parse()
                .map_err(|e: crate::forward::ForwardError| bad(e.0))?;
            let local = parse_local(&f.local).map_err(|e| bad(e.0))?;
            let remote = parse_remote(&f.remote).map_err(|e| bad(e.0))?;
            Ok(Request::Expose(Forward {
                protocol,
                local,
                remote,
            }))
        }
        ("POST", "/services/forwarder/unexpose") => {
            let f = parse(body)?;
            let protocol: Protocol = f
                .protocol
                .parse()
                .map_err(|e: crate::forward::ForwardError| bad(e.0))?;
            let local = parse_local(&f.local).map_err(|e| bad(e.0))?;
            Ok(Request::Unexpose { local, protocol })
        }
        ("GET", "/leases") => Ok(Request::Leases),
        ("GET", "/stats") => Ok(Request::Stats),
        ("GET", "/proxy") => Ok(Request::GetProxy),
        ("PUT", "/proxy") => {
            let settings = crate::proxy::ProxySettings::parse(
                std::str::from_utf8(body).map_err(|_| bad("the body is not UTF-8".into()))?,
                false,
            )
            .map_err(|e| bad(format!("bad proxy settings: {e}")))?;
            // Everything but the names is checked here: a bad request is refused whole.
            settings.prepare().map_err(bad)?;
            Ok(Request::SetProxy(settings))
        }
        (
            _,
            "/services/forwarder/all"
            | "/services/forwarder/expose"
            | "/services/forwarder/unexpose",
        )
        | (_, "/leases" | "/stats" | "/proxy") => Err(Reply::Err(
            405,
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(Reply::Err(404, format!("no such endpoint: {path}"))),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

async fn respond(stream: &mut UnixStream, reply: Reply) -> io::Result<()> {
    let (status, body) = match reply {
        Reply::Ok(v) => (200, v),
        Reply::Err(s, m) => (s, json!({ "message": m })),
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// Read one request from `stream`: (method, path, body), or the error reply.
async fn read_request(
    stream: &mut UnixStream,
) -> io::Result<Result<(String, String, Vec<u8>), Reply>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(Reply::Err(
                400,
                "the request ended before its head".into(),
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_string();
                let path = req
                    .path
                    .unwrap_or("")
                    .split('?')
                    .next()
                    .unwrap_or("")
                    .to_string();
                let len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .unwrap_or(0);
                if len > MAX_BODY {
                    return Ok(Err(Reply::Err(
                        413,
                        format!("bodies are limited to {MAX_BODY} bytes"),
                    )));
                }
                let mut body = buf[head_len..].to_vec();
                while body.len() < len {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(Err(Reply::Err(
                            400,
                            "the request ended inside its body".into(),
                        )));
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                body.truncate(len);
                return Ok(Ok((method, path, body)));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Ok(Err(Reply::Err(
                    431,
                    format!("request heads are limited to {MAX_HEAD} bytes"),
                )))
            }
            Err(e) => return Ok(Err(Reply::Err(400, format!("malformed request: {e}")))),
        }
    }
}

/// Serve the API on `listener` until the driver goes away.
pub async fn serve(listener: tokio::net::UnixListener, control: mpsc::Sender<Control>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move {
            let reply = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                read_request(&mut stream),
            )
            .await
            {
                Ok(Ok(Ok((method, path, body)))) => match route(&method, &path, &body) {
                    Ok(req) => {
                        let (tx, rx) = oneshot::channel();
                        if control.send((req, tx)).await.is_err() {
                            return;
                        }
                        rx.await
                            .unwrap_or(Reply::Err(503, "the daemon is stopping".into()))
                    }
                    Err(reply) => reply,
                },
                Ok(Ok(Err(reply))) => reply,
                Ok(Err(_)) | Err(_) => return,
            };
            let _ = respond(&mut stream, reply).await;
        });
    }
}

/// Bind the API socket at `path`, readable and writable by its owner only.
pub fn bind(path: &Path) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another daemon is listening there",
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Created under a umask that leaves no access to others, then tightened to 0600.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let r = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = r?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// A client call: send `method path` with an optional JSON body, return status and body.
pub async fn call(
    path: &Path,
    method: &str,
    uri: &str,
    body: Option<&Value>,
) -> io::Result<(u16, Value)> {
    let mut stream = UnixStream::connect(path).await?;
    let body = body
        .map(|b| serde_json::to_vec(b).unwrap_or_default())
        .unwrap_or_default();
    let head = format!(
        "{method} {uri} HTTP/1.1\r\nHost: usernet\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    let mut resp = Vec::new();
    stream.take(16 * 1024 * 1024).read_to_end(&mut resp).await?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head_len = match r.parse(&resp) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed response from the daemon",
            ))
        }
    };
    let status = r.code.unwrap_or(0);
    let value = if resp.len() > head_len {
        serde_json::from_slice(&resp[head_len..]).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad JSON from the daemon: {e}"),
            )
        })?
    } else {
        Value::Null
    };
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::Remote;

    #[test]
    fn routes_and_their_errors() {
        assert_eq!(
            route("GET", "/services/forwarder/all", b""),
            Ok(Request::List)
        );
        let body = br#"{"local":"127.0.0.1:8080","remote":"192.168.65.3:80","protocol":"tcp"}"#;
        assert_eq!(
            route("POST", "/services/forwarder/expose", body),
            Ok(Request::Expose(Forward {
                protocol: Protocol::Tcp,
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: Remote::Addr("192.168.65.3:80".parse().unwrap()),
            }))
        );
        let body = br#"{"local":":8080","remote":":80"}"#;
        let Ok(Request::Expose(f)) = route("POST", "/services/forwarder/expose", body) else {
            panic!()
        };
        assert_eq!((f.protocol, f.remote), (Protocol::Tcp, Remote::Leased(80)));
        assert_eq!(
            route(
                "POST",
                "/services/forwarder/unexpose",
                br#"{"local":"127.0.0.1:8080","protocol":"udp"}"#
            ),
            Ok(Request::Unexpose {
                local: "127.0.0.1:8080".parse().unwrap(),
                protocol: Protocol::Udp
            })
        );
        assert!(matches!(
            route("POST", "/services/forwarder/expose", b"{"),
            Err(Reply::Err(400, _))
        ));
        assert!(matches!(
            route("POST", "/services/forwarder/expose", br#"{"local":"x","remote":":80"}"#),
            Err(Reply::Err(400, m)) if m.contains("local")
        ));
        assert!(matches!(
            route("DELETE", "/leases", b""),
            Err(Reply::Err(405, _))
        ));
        assert!(matches!(
            route("GET", "/nope", b""),
            Err(Reply::Err(404, _))
        ));
    }

    #[tokio::test]
    async fn http_round_trip_over_the_socket() {
        let dir = std::env::temp_dir().join(format!("usernet-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = bind(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(bind(&path).is_err(), "a live socket is not replaced");
        let (tx, mut rx) = mpsc::channel::<Control>(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(match req {
                    Request::Leases => Reply::Ok(json!({"192.168.65.3": "02:00:00:00:00:01"})),
                    _ => Reply::Err(409, "busy".into()),
                });
            }
        });
        let (status, body) = call(&path, "GET", "/leases", None).await.unwrap();
        assert_eq!(
            (status, body),
            (200, json!({"192.168.65.3": "02:00:00:00:00:01"}))
        );
        let (status, body) = call(&path, "GET", "/stats", None).await.unwrap();
        assert_eq!((status, body["message"].as_str()), (409, Some("busy")));
        let (status, _) = call(&path, "GET", "/missing", None).await.unwrap();
        assert_eq!(status, 404);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
