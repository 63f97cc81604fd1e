//! The proxy's parsers on hostile bytes: request heads (and their rewrites), the chunked
//! body tracker, the TLS ClientHello reader, the CONNECT reply reader and the
//! configuration parsers. Never a panic; what parses keeps its invariants.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use usernet_core::proxy::connect::parse_connect_response;
use usernet_core::proxy::http::{
    parse_request, split_absolute, write_for_origin, write_for_proxy, Body, ChunkedDecoder, Framing,
};
use usernet_core::proxy::sni::{read_sni, Sni};
use usernet_core::proxy::{parse_no_proxy, parse_ports, parse_proxy_url};

#[derive(Arbitrary, Debug)]
enum Input {
    Head {
        data: Vec<u8>,
        limit: u16,
    },
    Chunked {
        data: Vec<u8>,
        cuts: Vec<u16>,
    },
    Hello {
        data: Vec<u8>,
        limit: u16,
    },
    Reply {
        data: Vec<u8>,
        limit: u16,
    },
    Config {
        url: String,
        no_proxy: String,
        ports: String,
        host: String,
    },
}

fuzz_target!(|input: Input| match input {
    Input::Head { data, limit } => {
        let limit = usize::from(limit).max(1);
        let Ok(Some(h)) = parse_request(&data, limit) else {
            return;
        };
        assert!(h.len <= data.len() && h.len <= limit);
        // The rewrite for an upstream proxy is itself a request head with the same
        // method and framing (what the upstream sees is what was checked).
        let mut out = Vec::new();
        let auth = h.host.clone().unwrap_or_else(|| "10.0.0.1:80".into());
        write_for_proxy(&h, &auth, Some("Basic dTpw"), &mut out);
        let again = parse_request(&out, usize::MAX)
            .expect("the rewrite parses")
            .expect("the rewrite is complete");
        assert_eq!(again.len, out.len());
        assert_eq!(again.method, h.method);
        assert_eq!(again.framing, h.framing);
        if let Some((_, _, path)) = split_absolute(&h.target) {
            let mut out = Vec::new();
            write_for_origin(&h, &path, &mut out);
            let again = parse_request(&out, usize::MAX).unwrap().unwrap();
            assert_eq!(again.framing, h.framing);
        }
    }
    Input::Chunked { data, cuts } => {
        // Fed in pieces or at once, the body ends at the same byte (or fails alike).
        let mut whole = ChunkedDecoder::default();
        let all = whole.feed(&data);
        let mut pieces = ChunkedDecoder::default();
        let mut pos = 0;
        let mut got: Result<usize, _> = Ok(0);
        for c in cuts.iter().map(|c| usize::from(*c)).chain([data.len()]) {
            let end = c.clamp(pos, data.len());
            match pieces.feed(&data[pos..end]) {
                Ok(n) => {
                    got = got.map(|g| g + n);
                    if n < end - pos {
                        break;
                    }
                }
                Err(e) => {
                    got = Err(e);
                    break;
                }
            }
            pos = end;
        }
        match (all, got) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b);
                assert_eq!(whole.done(), pieces.done());
            }
            (Err(_), Err(_)) => {}
            (a, b) => panic!("whole {a:?} pieces {b:?}"),
        }
        let b = Body::new(Framing::Chunked);
        assert_eq!(b.limit(&data).ok(), all.ok());
    }
    Input::Hello { data, limit } => {
        if let Sni::Name(n) = read_sni(&data, usize::from(limit)) {
            assert!(!n.is_empty() && n.len() <= 253);
            assert!(n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
        }
    }
    Input::Reply { data, limit } => {
        if let Ok(Some((_, n))) = parse_connect_response(&data, usize::from(limit)) {
            assert!(n <= data.len());
        }
    }
    Input::Config {
        url,
        no_proxy,
        ports,
        host,
    } => {
        if let Ok(u) = parse_proxy_url(&url) {
            assert!(!u.host.is_empty());
        }
        if let Ok(rules) = parse_no_proxy(&no_proxy) {
            for r in rules {
                let _ = r.matches(Some(&host), host.parse().ok());
            }
        }
        if let Ok(p) = parse_ports(&ports) {
            assert!(p.len() <= 1024 && !p.contains(&0));
        }
    }
});
