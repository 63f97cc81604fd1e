//! HTTP/1.x request heads for the proxy: bounded parsing with httparse, the rewrite to
//! absolute form for an upstream proxy, body framing (Content-Length, chunked) that only
//! finds where a body ends, and the short error responses the proxy gives itself.

use std::fmt::Write as _;

/// Headers in one request head at most (beyond: 431).
pub const MAX_HEADERS: usize = 100;

/// Why a request head cannot be forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x, or framing that cannot be trusted: 400.
    Malformed,
    /// Larger than the limit, or too many headers: 431.
    TooLarge,
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::Malformed => 400,
            HeadError::TooLarge => 431,
        }
    }
}

/// How the bytes after a head are framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// A parsed request head; header bytes are kept as they came, for the rewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Bytes of the head, final CRLF CRLF included.
    pub len: usize,
    /// The Host header's value.
    pub host: Option<String>,
    pub framing: Framing,
    /// `Upgrade` with `Connection: upgrade` (websocket): after the response the
    /// connection is no longer HTTP.
    pub upgrade: bool,
    /// The headers, name and raw value.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl RequestHead {
    pub fn is_connect(&self) -> bool {
        self.method.eq_ignore_ascii_case("CONNECT")
    }
}

/// Parse the request head at the start of `buf`: `Ok(None)` when more bytes are needed
/// (and `buf` is still under `limit`).
pub fn parse_request(buf: &[u8], limit: usize) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let window = &buf[..buf.len().min(limit)];
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limit => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let method = req.method.ok_or(HeadError::Malformed)?.to_string();
    let target = req.path.ok_or(HeadError::Malformed)?.to_string();
    let version = req.version.ok_or(HeadError::Malformed)?;
    let mut host = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut te = false;
    let mut upgrade_hdr = false;
    let mut conn_upgrade = false;
    let mut out = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let v = h.value;
        if h.name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(HeadError::Malformed);
            }
            let s = std::str::from_utf8(v)
                .map_err(|_| HeadError::Malformed)?
                .trim();
            if s.is_empty() || !valid_authority(s) {
                return Err(HeadError::Malformed);
            }
            host = Some(s.to_string());
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let s = std::str::from_utf8(v)
                .map_err(|_| HeadError::Malformed)?
                .trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::Malformed);
            }
            let n: u64 = s.parse().map_err(|_| HeadError::Malformed)?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Malformed);
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            let s = std::str::from_utf8(v).map_err(|_| HeadError::Malformed)?;
            // Chunked must be the last coding; any coding after it leaves no framing.
            chunked = s
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade_hdr = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            conn_upgrade |= token_list_has(v, "upgrade");
        }
        out.push((h.name.to_string(), v.to_vec()));
    }
    // Both framings, or a transfer coding without chunked, is how requests are smuggled:
    // refuse rather than guess (RFC 9112 6.1, 6.3).
    if te && (!chunked || length.is_some()) {
        return Err(HeadError::Malformed);
    }
    let framing = if chunked {
        Framing::Chunked
    } else {
        Framing::Length(length.unwrap_or(0))
    };
    Ok(Some(RequestHead {
        method,
        target,
        version,
        len,
        host,
        framing,
        upgrade: upgrade_hdr && conn_upgrade,
        headers: out,
    }))
}

fn token_list_has(v: &[u8], token: &str) -> bool {
    std::str::from_utf8(v)
        .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// A `host[:port]` that can go into a request line: no spaces, slashes or controls.
pub fn valid_authority(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255 + 8
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
}

/// `host[:port]` split, brackets removed from an IPv6 literal.
pub fn split_authority(a: &str, default_port: u16) -> Option<(String, u16)> {
    let (h, p) = crate::proxy::config::split_host_port(a).ok()?;
    if h.is_empty() {
        return None;
    }
    Some((h.to_ascii_lowercase(), p.unwrap_or(default_port)))
}

/// `host:port` for a request line or CONNECT, brackets around an IPv6 literal.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An absolute-form target `http://authority/path` split into (host, port, origin-form).
pub fn split_absolute(target: &str) -> Option<(String, u16, String)> {
    let scheme_end = target.find("://")?;
    if !target[..scheme_end].eq_ignore_ascii_case("http") {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    let (auth, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.contains('@') || !valid_authority(auth) {
        return None;
    }
    let (host, port) = split_authority(auth, 80)?;
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Some((host, port, path))
}

fn is_hop_proxy_header(name: &str) -> bool {
    name.eq_ignore_ascii_case("proxy-authorization")
        || name.eq_ignore_ascii_case("proxy-connection")
}

/// Write `head` for an upstream proxy: the target in absolute form (`http://` and
/// `authority` for an origin-form target, as is when already absolute), the headers as
/// they came except the guest's own proxy credentials when ours replace them, and ours.
pub fn write_for_proxy(
    head: &RequestHead,
    authority: &str,
    authorization: Option<&str>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    if head.is_connect() || head.target.contains("://") {
        out.extend_from_slice(head.target.as_bytes());
    } else {
        out.extend_from_slice(b"http://");
        out.extend_from_slice(authority.as_bytes());
        if head.target.starts_with('/') {
            out.extend_from_slice(head.target.as_bytes());
        } else {
            // `OPTIONS *` and other oddities: the server's root.
            out.push(b'/');
        }
    }
    let _ = write!(VecWriter(out), " HTTP/1.{}\r\n", head.version);
    for (name, value) in &head.headers {
        if authorization.is_some() && name.eq_ignore_ascii_case("proxy-authorization") {
            continue;
        }
        write_header(out, name, value);
    }
    if let Some(a) = authorization {
        write_header(out, "Proxy-Authorization", a.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Write `head` for an origin server reached directly by the explicit proxy: origin-form
/// target, no proxy headers, and `Connection: close` (the next request on the guest's
/// connection may be for another server).
pub fn write_for_origin(head: &RequestHead, path: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    let _ = write!(VecWriter(out), " HTTP/1.{}\r\n", head.version);
    for (name, value) in &head.headers {
        if is_hop_proxy_header(name)
            || name.eq_ignore_ascii_case("connection")
            || name.eq_ignore_ascii_case("keep-alive")
        {
            continue;
        }
        write_header(out, name, value);
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
}

fn write_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A short `text/plain` response the proxy gives itself, closing the connection.
pub fn error_response(status: u16, detail: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!("usernet proxy: {detail}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The response to a CONNECT the explicit proxy opened itself.
pub const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

// ---------------------------------------------------------------- body framing

/// Where a request body ends, fed the bytes as they pass (unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    Length(u64),
    Chunked(ChunkedDecoder),
}

impl Body {
    pub fn new(f: Framing) -> Body {
        match f {
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(ChunkedDecoder::default()),
        }
    }

    pub fn done(&self) -> bool {
        match self {
            Body::Length(n) => *n == 0,
            Body::Chunked(c) => c.done(),
        }
    }

    /// How many bytes at the start of `data` belong to the body, without advancing.
    pub fn limit(&self, data: &[u8]) -> Result<usize, ChunkError> {
        let mut copy = *self;
        copy.advance(data)
    }

    /// Account for bytes that passed; returns how many of them belonged to the body.
    pub fn advance(&mut self, data: &[u8]) -> Result<usize, ChunkError> {
        match self {
            Body::Length(n) => {
                let k = (*n).min(data.len() as u64);
                *n -= k;
                Ok(k as usize)
            }
            Body::Chunked(c) => c.feed(data),
        }
    }
}

/// A chunked body that is not (RFC 9112 7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkError;

/// Chunk-size lines, extensions and trailers allowed at most, in bytes per line.
const MAX_CHUNK_LINE: u32 = 4096;
/// Trailer bytes at most.
const MAX_TRAILERS: u32 = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    FinalLf,
    Done,
}

/// Finds the end of a chunked body; the bytes themselves pass unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    size: u64,
    digits: u8,
    line: u32,
    trailers: u32,
}

impl ChunkedDecoder {
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Feed bytes; returns how many belong to the body (all of them until its end).
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data => {
                    let k = self.size.min((data.len() - i) as u64);
                    self.size -= k;
                    i += k as usize;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // 15 hex digits: no more than 2^60 bytes, and no overflow.
                        if self.digits >= 15 {
                            return Err(ChunkError);
                        }
                        self.digits += 1;
                        self.size =
                            self.size * 16 + u64::from((b as char).to_digit(16).unwrap_or(0));
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => {
                        self.state = ChunkState::Ext;
                        self.line = 0;
                    }
                    b'\r' if self.digits > 0 => self.state = ChunkState::SizeLf,
                    b'\n' if self.digits > 0 => self.end_size_line(),
                    _ => return Err(ChunkError),
                },
                ChunkState::Ext => match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => self.end_size_line(),
                    _ => {
                        self.line += 1;
                        if self.line > MAX_CHUNK_LINE {
                            return Err(ChunkError);
                        }
                    }
                },
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.end_size_line();
                }
                ChunkState::DataCr => match b {
                    b'\r' => self.state = ChunkState::DataLf,
                    b'\n' => self.next_chunk(),
                    _ => return Err(ChunkError),
                },
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.next_chunk();
                }
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::FinalLf,
                    b'\n' => self.state = ChunkState::Done,
                    _ => {
                        self.state = ChunkState::TrailerLine;
                        self.count_trailer()?;
                    }
                },
                ChunkState::TrailerLine => {
                    self.count_trailer()?;
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::FinalLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::Done;
                }
            }
            i += 1;
        }
        Ok(i)
    }

    fn end_size_line(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
    }

    fn next_chunk(&mut self) {
        self.state = ChunkState::Size;
        self.size = 0;
        self.digits = 0;
    }

    fn count_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(ChunkError);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(s.as_bytes(), 16 * 1024)
    }

    fn proxied(s: &str, auth: Option<&str>) -> String {
        let h = parse(s).unwrap().unwrap();
        let mut out = Vec::new();
        let a = h.host.clone().unwrap_or_else(|| "10.0.0.9:80".into());
        write_for_proxy(&h, &a, auth, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn origin_form_becomes_absolute_with_credentials() {
        let s = "GET /a?b=1 HTTP/1.1\r\nHost: example.test:8080\r\nUser-Agent: x\r\nProxy-Authorization: guest\r\n\r\n";
        assert_eq!(
            proxied(s, Some("Basic Zm9v")),
            "GET http://example.test:8080/a?b=1 HTTP/1.1\r\nHost: example.test:8080\r\nUser-Agent: x\r\nProxy-Authorization: Basic Zm9v\r\n\r\n"
        );
        // Without our credentials the guest's own pass.
        assert!(proxied(s, None).contains("Proxy-Authorization: guest\r\n"));
    }

    #[test]
    fn no_host_uses_the_destination_and_http10_is_kept() {
        assert_eq!(
            proxied("GET / HTTP/1.0\r\n\r\n", None),
            "GET http://10.0.0.9:80/ HTTP/1.0\r\n\r\n"
        );
        // Already absolute: unchanged.
        assert_eq!(
            proxied("GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n", None),
            "GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n"
        );
        assert_eq!(
            proxied("OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n", None),
            "OPTIONS http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"
        );
    }

    #[test]
    fn framing_upgrade_and_errors() {
        let h = parse(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.len), (Framing::Length(5), 69));
        let h = parse("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let h = parse("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap().unwrap();
        assert!(h.upgrade);
        let h = parse("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.upgrade);
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        for bad in [
            "GET / HTTP/2.0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "\x16\x03\x01\x00\x05hello",
        ] {
            assert_eq!(parse(bad), Err(HeadError::Malformed), "{bad:?}");
        }
        // Over the limit, complete or not; too many headers.
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(100));
        assert_eq!(parse_request(long.as_bytes(), 64), Err(HeadError::TooLarge));
        let many: String = (0..101).map(|i| format!("X-{i}: y\r\n")).collect();
        let s = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse(&s), Err(HeadError::TooLarge));
        assert_eq!(HeadError::TooLarge.status(), 431);
        assert_eq!(HeadError::Malformed.status(), 400);
    }

    #[test]
    fn explicit_targets_and_origin_rewrite() {
        assert_eq!(
            split_absolute("http://A.test:81/x?y"),
            Some(("a.test".into(), 81, "/x?y".into()))
        );
        assert_eq!(
            split_absolute("http://a.test"),
            Some(("a.test".into(), 80, "/".into()))
        );
        assert_eq!(
            split_absolute("http://[::1]:8/"),
            Some(("::1".into(), 8, "/".into()))
        );
        assert_eq!(split_absolute("http://u@a.test/"), None);
        assert_eq!(split_absolute("https://a.test/"), None);
        assert_eq!(split_absolute("/x"), None);
        let h = parse("GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n").unwrap().unwrap();
        let mut out = Vec::new();
        write_for_origin(&h, "/x", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(authority("::1", 443), "[::1]:443");
        assert_eq!(authority("a", 443), "a:443");
    }

    #[test]
    fn error_responses_are_complete_and_close() {
        let r = String::from_utf8(error_response(502, "the upstream proxy refused")).unwrap();
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(r.as_bytes()).unwrap() {
            httparse::Status::Complete(n) => n,
            _ => panic!("partial"),
        };
        assert_eq!(resp.code, Some(502));
        let cl: usize = r
            .split("Content-Length: ")
            .nth(1)
            .unwrap()
            .split('\r')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(r.len() - n, cl);
        assert!(r.contains("Connection: close\r\n"));
    }

    #[test]
    fn chunked_body_end_found_byte_by_byte_and_at_once() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(body), Ok(end));
        assert!(d.done());
        let mut d = ChunkedDecoder::default();
        let mut n = 0;
        for b in body.iter() {
            n += d.feed(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(n, end);
        // `limit` does not advance.
        let b = Body::new(Framing::Chunked);
        assert_eq!(b.limit(b"0\r\n\r\nGET"), Ok(5));
        assert!(!b.done());
        let mut l = Body::new(Framing::Length(3));
        assert_eq!(l.advance(b"abcdef"), Ok(3));
        assert!(l.done());
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloX",
            b"\r\n",
            b"1234567890abcdef0\r\n",
            b"0\r\n\rX",
        ] {
            assert_eq!(
                ChunkedDecoder::default().feed(bad),
                Err(ChunkError),
                "{bad:?}"
            );
        }
        // An endless extension or trailer is cut off.
        let mut d = ChunkedDecoder::default();
        assert_eq!(
            d.feed(&[b"1;".as_slice(), &[b'a'; 5000]].concat()),
            Err(ChunkError)
        );
        let mut d = ChunkedDecoder::default();
        d.feed(b"0\r\n").unwrap();
        assert_eq!(d.feed(&[b'a'; 20000]), Err(ChunkError));
    }
}
