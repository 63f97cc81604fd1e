//! `CONNECT` towards an upstream proxy: the request, and the proxy's response head.

use super::http::HeadError;

/// Write `CONNECT authority HTTP/1.1` with our credentials.
pub fn write_connect(authority: &str, authorization: Option<&str>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"CONNECT ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(a) = authorization {
        out.extend_from_slice(b"Proxy-Authorization: ");
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The proxy's answer to a CONNECT: its status and the length of its head (bytes after
/// it belong to the tunnel). `Ok(None)`: incomplete, and under `limit`.
pub fn parse_connect_response(buf: &[u8], limit: usize) -> Result<Option<(u16, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; super::http::MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&buf[..buf.len().min(limit)]) {
        Ok(httparse::Status::Complete(n)) => Ok(Some((resp.code.ok_or(HeadError::Malformed)?, n))),
        Ok(httparse::Status::Partial) if buf.len() >= limit => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_and_responses() {
        let mut out = Vec::new();
        write_connect("example.test:443", Some("Basic eDp5"), &mut out);
        assert_eq!(
            out,
            b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\nProxy-Authorization: Basic eDp5\r\n\r\n"
        );
        let ok = b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n\x16\x03";
        assert_eq!(
            parse_connect_response(ok, 1024),
            Ok(Some((200, ok.len() - 2)))
        );
        assert_eq!(parse_connect_response(&ok[..20], 1024), Ok(None));
        assert_eq!(
            parse_connect_response(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n", 1024),
            Ok(Some((407, 46)))
        );
        assert_eq!(
            parse_connect_response(b"SSH-2.0-x\r\n", 1024),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            parse_connect_response(&[b'H'; 64], 32),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            parse_connect_response(b"HTTP/1.1 200 OK\r\nA: b\r\n", 16),
            Err(HeadError::TooLarge)
        );
    }
}
