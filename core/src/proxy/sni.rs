//! The server name of a TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3), read without
//! terminating TLS: the bytes go on to the server unchanged.

/// What the bytes so far tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sni {
    /// A ClientHello may follow but is not complete yet.
    NeedMore,
    /// A ClientHello with this server name (lowercase).
    Name(String),
    /// A ClientHello without a (usable) server name, or one larger than the limit.
    NoName,
    /// Not a TLS handshake.
    NotTls,
}

const RECORD_HDR: usize = 5;
const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
/// A record's payload at most (RFC 8446 5.1, plus expansion).
const MAX_RECORD: usize = 16384 + 2048;

/// Read the server name from the start of a connection (`buf`: every byte so far).
/// A ClientHello larger than `limit` gives [`Sni::NoName`].
pub fn read_sni(buf: &[u8], limit: usize) -> Sni {
    // The handshake message may span records: gather it, bounded by `limit`.
    let mut hs: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(hdr) = buf.get(pos..pos + RECORD_HDR) else {
            return if pos >= limit {
                Sni::NoName
            } else if buf.len() > pos && !plausible_prefix(&buf[pos..]) {
                Sni::NotTls
            } else {
                Sni::NeedMore
            };
        };
        if hdr[0] != HANDSHAKE || hdr[1] != 3 || hdr[2] > 4 {
            return Sni::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        if len == 0 || len > MAX_RECORD {
            return Sni::NotTls;
        }
        if pos + RECORD_HDR + len > limit {
            return Sni::NoName;
        }
        let Some(body) = buf.get(pos + RECORD_HDR..pos + RECORD_HDR + len) else {
            return Sni::NeedMore;
        };
        hs.extend_from_slice(body);
        pos += RECORD_HDR + len;
        if hs.len() >= 4 {
            if hs[0] != CLIENT_HELLO {
                return Sni::NotTls;
            }
            let need =
                4 + (usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]));
            if hs.len() >= need {
                return match client_hello_sni(&hs[4..need]) {
                    Some(Ok(name)) => Sni::Name(name),
                    Some(Err(())) | None => Sni::NoName,
                };
            }
            if need > limit {
                return Sni::NoName;
            }
        }
    }
}

/// Whether a partial record header could still be a TLS handshake record.
fn plausible_prefix(p: &[u8]) -> bool {
    p[0] == HANDSHAKE && p.get(1).is_none_or(|&v| v == 3) && p.get(2).is_none_or(|&v| v <= 4)
}

/// `None`: no server name extension; `Some(Err)`: a malformed hello or name.
fn client_hello_sni(b: &[u8]) -> Option<Result<String, ()>> {
    let mut r = Reader(b);
    let parsed = (|| {
        r.take(2 + 32)?; // legacy_version, random
        let n = r.u8()?;
        r.take(usize::from(n))?; // session id
        let n = r.u16()?;
        r.take(usize::from(n))?; // cipher suites
        let n = r.u8()?;
        r.take(usize::from(n))?; // compression methods
        if r.0.is_empty() {
            return Some(None); // no extensions at all
        }
        let n = r.u16()?;
        let mut exts = Reader(r.take(usize::from(n))?);
        while !exts.0.is_empty() {
            let ty = exts.u16()?;
            let n = exts.u16()?;
            let data = exts.take(usize::from(n))?;
            if ty != 0 {
                continue;
            }
            let mut d = Reader(data);
            let n = d.u16()?;
            let mut list = Reader(d.take(usize::from(n))?);
            while !list.0.is_empty() {
                let kind = list.u8()?;
                let n = list.u16()?;
                let name = list.take(usize::from(n))?;
                if kind == 0 {
                    return Some(Some(name));
                }
            }
            return Some(None);
        }
        Some(None)
    })();
    match parsed {
        None => Some(Err(())),
        Some(None) => None,
        Some(Some(name)) => Some(valid_name(name).ok_or(())),
    }
}

fn valid_name(name: &[u8]) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    ok.then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on loopback: `openssl s_client -servername example.test`, the same with
    // `-noservername`, and `curl -k https://www.example.test:PORT/`.
    const OPENSSL_SNI: &[u8] = include_bytes!("testdata/openssl-sni-example.test.bin");
    const OPENSSL_NO_SNI: &[u8] = include_bytes!("testdata/openssl-no-sni.bin");
    const CURL_SNI: &[u8] = include_bytes!("testdata/curl-sni-www.example.test.bin");

    #[test]
    fn real_client_hellos() {
        assert_eq!(
            read_sni(OPENSSL_SNI, 16384),
            Sni::Name("example.test".into())
        );
        assert_eq!(
            read_sni(CURL_SNI, 16384),
            Sni::Name("www.example.test".into())
        );
        assert_eq!(read_sni(OPENSSL_NO_SNI, 16384), Sni::NoName);
    }

    #[test]
    fn every_prefix_needs_more_then_the_name() {
        for hello in [OPENSSL_SNI, CURL_SNI] {
            for cut in 0..hello.len() {
                assert_eq!(read_sni(&hello[..cut], 16384), Sni::NeedMore, "cut {cut}");
            }
        }
    }

    /// Re-frame a ClientHello into records of at most `size` bytes, as a client may.
    fn split_records(hello: &[u8], size: usize) -> Vec<u8> {
        let body = &hello[RECORD_HDR..];
        let mut out = Vec::new();
        for c in body.chunks(size) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(c.len() as u16).to_be_bytes());
            out.extend_from_slice(c);
        }
        out
    }

    #[test]
    fn hello_split_across_records_and_segments() {
        let split = split_records(CURL_SNI, 100);
        assert!(split.len() > CURL_SNI.len() + 20);
        for cut in [1, 5, 104, 200, split.len() - 1] {
            assert_eq!(read_sni(&split[..cut], 16384), Sni::NeedMore);
        }
        assert_eq!(
            read_sni(&split, 16384),
            Sni::Name("www.example.test".into())
        );
        // Trailing bytes after the hello do not matter.
        let mut more = OPENSSL_SNI.to_vec();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(read_sni(&more, 16384), Sni::Name("example.test".into()));
    }

    #[test]
    fn not_tls_limits_and_garbage() {
        assert_eq!(read_sni(b"GET / HTTP/1.1\r\n", 16384), Sni::NotTls);
        assert_eq!(read_sni(b"\x16\x02", 16384), Sni::NotTls);
        assert_eq!(read_sni(b"\x16\x03\x01\x00\x00", 16384), Sni::NotTls);
        assert_eq!(read_sni(b"\x16\x03\x01\xff\xff", 16384), Sni::NotTls);
        // A handshake that is no ClientHello.
        assert_eq!(
            read_sni(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", 16384),
            Sni::NotTls
        );
        // Over the limit: no name, fall back to the address.
        assert_eq!(read_sni(OPENSSL_SNI, 100), Sni::NoName);
        assert_eq!(read_sni(&OPENSSL_SNI[..100], 100), Sni::NoName);
        // A truncated hello body inside a complete message: no name.
        let mut bad = OPENSSL_SNI.to_vec();
        bad[RECORD_HDR + 4 + 34] = 0xff; // session id length past the end
        assert_eq!(read_sni(&bad, 16384), Sni::NoName);
        // A name with a bad character.
        let mut bad = OPENSSL_SNI.to_vec();
        let i = bad.windows(12).position(|w| w == b"example.test").unwrap();
        bad[i] = b'/';
        assert_eq!(read_sni(&bad, 16384), Sni::NoName);
    }
}
