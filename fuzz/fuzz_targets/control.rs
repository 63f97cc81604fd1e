//! Hostile control-plane input: `-p` specifications and control API requests (method,
//! path, JSON body). Every one must parse or be refused with a reason, never panic; what
//! parses must stay within the limits (ranges of at most `MAX_RANGE` ports, no port 0).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use usernet::api::{route, Reply, Request};
use usernet::forward::{parse_local, parse_publish, parse_remote, Remote, MAX_RANGE};

#[derive(Arbitrary, Debug)]
enum Input {
    Publish(String),
    Local(String),
    Remote(String),
    Api { post: bool, path: u8, body: Vec<u8> },
    /// `PUT /proxy` bodies, and proxy settings files (TOML or JSON).
    Proxy { toml: bool, body: Vec<u8> },
}

const PATHS: [&str; 6] = [
    "/services/forwarder/all",
    "/services/forwarder/expose",
    "/services/forwarder/unexpose",
    "/leases",
    "/stats",
    "/other",
];

fuzz_target!(|input: Input| match input {
    Input::Publish(spec) => {
        if let Ok(forwards) = parse_publish(&spec) {
            assert!(!forwards.is_empty() && forwards.len() <= MAX_RANGE);
            for f in forwards {
                assert_ne!(f.local.port(), 0);
                assert_ne!(f.remote.port(), 0);
            }
        }
    }
    Input::Local(s) => {
        let _ = parse_local(&s);
    }
    Input::Remote(s) => {
        if let Ok(r) = parse_remote(&s) {
            assert_ne!(r.port(), 0);
            if let Remote::Addr(a) = r {
                assert_ne!(a.port(), 0);
            }
        }
    }
    Input::Api { post, path, body } => {
        let method = if post { "POST" } else { "GET" };
        match route(method, PATHS[usize::from(path) % PATHS.len()], &body) {
            Ok(Request::Expose(f)) => assert_ne!(f.remote.port(), 0),
            Ok(_) => {}
            Err(Reply::Err(status, message)) => assert!((400..600).contains(&status) && !message.is_empty()),
            Err(Reply::Ok(_)) => panic!("an error reply that is not an error"),
        }
    }
    Input::Proxy { toml, body } => {
        match route("PUT", "/proxy", &body) {
            // What the API takes is checked but for the proxy host names.
            Ok(Request::SetProxy(s)) => assert!(s.prepare().is_ok()),
            Ok(r) => panic!("PUT /proxy became {r:?}"),
            Err(Reply::Err(status, _)) => assert_eq!(status, 400),
            Err(Reply::Ok(_)) => panic!("an error reply that is not an error"),
        }
        if let Ok(text) = std::str::from_utf8(&body) {
            if let Ok(s) = usernet::proxy::ProxySettings::parse(text, toml) {
                if let Ok(Some(p)) = s.prepare() {
                    let _ = p.finish(|_| Some(std::net::Ipv4Addr::LOCALHOST.into()));
                }
            }
        }
    }
});
