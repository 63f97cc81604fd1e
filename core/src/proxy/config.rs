//! Proxy configuration: upstream proxy URLs, the exclude list (no_proxy semantics) and the
//! intercepted ports. Parsing only: names in URLs stay names here, the driver resolves
//! them when it loads a configuration.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// One upstream proxy as the core uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// The `Proxy-Authorization` value, `Basic base64(user:pass)`, when the URL had
    /// credentials.
    pub authorization: Option<String>,
}

/// The transparent and explicit proxy settings of a [`crate::Stack`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Where plain HTTP (the `http_ports`) goes; `None`: not intercepted.
    pub http: Option<Upstream>,
    /// Where TLS (the `https_ports`) goes by `CONNECT`; `None`: not intercepted.
    pub https: Option<Upstream>,
    /// Destinations that go direct.
    pub exclude: Vec<ExcludeRule>,
    pub http_ports: Vec<u16>,
    pub https_ports: Vec<u16>,
    /// The gateway's explicit proxy port (`None`: off).
    pub explicit_port: Option<u16>,
    /// The largest request head (or ClientHello) read before deciding, in bytes.
    pub head_limit: usize,
}

/// The default limit of a request head or ClientHello.
pub const DEFAULT_HEAD_LIMIT: usize = 16 * 1024;
/// The default explicit proxy port on the gateway.
pub const DEFAULT_EXPLICIT_PORT: u16 = 3128;

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            http: None,
            https: None,
            exclude: Vec::new(),
            http_ports: vec![80],
            https_ports: vec![443],
            explicit_port: Some(DEFAULT_EXPLICIT_PORT),
            head_limit: DEFAULT_HEAD_LIMIT,
        }
    }
}

impl ProxyConfig {
    /// Whether a destination (its name when known, and its address) goes direct.
    pub fn excluded(&self, host: Option<&str>, ip: Option<IpAddr>) -> bool {
        self.exclude.iter().any(|r| r.matches(host, ip))
    }
}

/// A proxy URL as written: `http://user:pass@host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyUrl {
    /// A name or an address literal (brackets removed).
    pub host: String,
    pub port: u16,
    pub authorization: Option<String>,
}

impl ProxyUrl {
    /// The host as an address, when it is a literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyConfigError {
    /// Only `http://` proxies are supported (the scheme seen).
    Scheme(String),
    NoHost,
    BadPort(String),
    /// A `%` escape that is not two hex digits, or credentials that are not UTF-8.
    BadEscape,
    /// An exclude entry that is none of the known forms.
    BadExclude(String),
}

impl fmt::Display for ProxyConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyConfigError::Scheme(s) => {
                write!(f, "unsupported proxy scheme {s:?} (only http:// is)")
            }
            ProxyConfigError::NoHost => f.write_str("the proxy URL has no host"),
            ProxyConfigError::BadPort(p) => write!(f, "bad port {p:?}"),
            ProxyConfigError::BadEscape => f.write_str("bad %-escape in the proxy credentials"),
            ProxyConfigError::BadExclude(e) => write!(f, "bad no_proxy entry {e:?}"),
        }
    }
}

impl std::error::Error for ProxyConfigError {}

/// Parse `http://[user[:pass]@]host[:port][/]`; a URL without scheme is taken as http,
/// without port as 3128 (as curl does for proxies without a port: 1080 is socks).
pub fn parse_proxy_url(url: &str) -> Result<ProxyUrl, ProxyConfigError> {
    let url = url.trim();
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => return Err(ProxyConfigError::Scheme(scheme.to_string())),
        None => url,
    };
    let rest = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (host, port) = split_host_port(hostport)?;
    let port = port.unwrap_or(3128);
    if host.is_empty() {
        return Err(ProxyConfigError::NoHost);
    }
    let authorization = match userinfo {
        Some(u) => {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            let user = percent_decode(user)?;
            let pass = percent_decode(pass)?;
            Some(format!(
                "Basic {}",
                base64(format!("{user}:{pass}").as_bytes())
            ))
        }
        None => None,
    };
    Ok(ProxyUrl {
        host: host.to_string(),
        port,
        authorization,
    })
}

/// Split `host[:port]` or `[v6][:port]`. A bare IPv6 literal (several colons) has no port.
pub fn split_host_port(s: &str) -> Result<(&str, Option<u16>), ProxyConfigError> {
    let bad = |p: &str| ProxyConfigError::BadPort(p.to_string());
    if let Some(r) = s.strip_prefix('[') {
        let (host, after) = r.split_once(']').ok_or(ProxyConfigError::NoHost)?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, Some(p.parse().map_err(|_| bad(p))?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(bad(after)),
        };
    }
    if s.matches(':').count() > 1 {
        return Ok((s, None));
    }
    match s.split_once(':') {
        Some((h, p)) => Ok((h, Some(p.parse().map_err(|_| bad(p))?))),
        None => Ok((s, None)),
    }
}

fn percent_decode(s: &str) -> Result<String, ProxyConfigError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(ProxyConfigError::BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| ProxyConfigError::BadEscape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ProxyConfigError::BadEscape)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ProxyConfigError::BadEscape)
}

/// Standard base64 with padding (RFC 4648), for `Basic` credentials.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// One no_proxy entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExcludeRule {
    /// `*`: everything goes direct.
    All,
    /// `example.com` (that name and every name under it), `.example.com` and
    /// `*.example.com` (names under it only). Stored lowercase without dots around.
    Domain { name: String, subdomains_only: bool },
    /// An address, or a CIDR block.
    Net { addr: IpAddr, prefix: u8 },
}

impl ExcludeRule {
    pub fn parse(entry: &str) -> Result<ExcludeRule, ProxyConfigError> {
        let e = entry.trim();
        let bad = || ProxyConfigError::BadExclude(entry.to_string());
        if e == "*" {
            return Ok(ExcludeRule::All);
        }
        if let Some((a, p)) = e.split_once('/') {
            let addr: IpAddr = a
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| bad())?;
            let prefix: u8 = p.parse().map_err(|_| bad())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if prefix > max {
                return Err(bad());
            }
            return Ok(ExcludeRule::Net { addr, prefix });
        }
        let bare = e.trim_start_matches('[').trim_end_matches(']');
        if let Ok(addr) = bare.parse::<IpAddr>() {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            return Ok(ExcludeRule::Net { addr, prefix });
        }
        // A name, possibly with a port (curl ignores it; so do we).
        let name = match split_host_port(e) {
            Ok((h, _)) => h,
            Err(_) => return Err(bad()),
        };
        let (name, subdomains_only) = if let Some(n) = name.strip_prefix("*.") {
            (n, true)
        } else if let Some(n) = name.strip_prefix('.') {
            (n, true)
        } else {
            (name, false)
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(bad());
        }
        Ok(ExcludeRule::Domain {
            name,
            subdomains_only,
        })
    }

    /// Whether a destination with this name (when known) and address (when known)
    /// matches.
    pub fn matches(&self, host: Option<&str>, ip: Option<IpAddr>) -> bool {
        match self {
            ExcludeRule::All => true,
            ExcludeRule::Domain {
                name,
                subdomains_only,
            } => {
                let Some(h) = host else { return false };
                // Bytes, not chars: a hostile name may hold any UTF-8.
                let h = h.trim_end_matches('.').as_bytes();
                if h.len() < name.len() {
                    return false;
                }
                let (head, tail) = h.split_at(h.len() - name.len());
                if !tail.eq_ignore_ascii_case(name.as_bytes()) {
                    return false;
                }
                if head.is_empty() {
                    !subdomains_only
                } else {
                    head.ends_with(b".")
                }
            }
            ExcludeRule::Net { addr, prefix } => {
                // A name that is an address literal counts as that address.
                let lit = host.and_then(|h| {
                    h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .ok()
                });
                [ip, lit]
                    .into_iter()
                    .flatten()
                    .any(|ip| in_net(ip, *addr, *prefix))
            }
        }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V4(_)) => match a.to_ipv4_mapped() {
            Some(a) => in_net(IpAddr::V4(a), net, prefix),
            None => false,
        },
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    }
}

/// Parse a no_proxy list: entries separated by commas or whitespace.
pub fn parse_no_proxy(list: &str) -> Result<Vec<ExcludeRule>, ProxyConfigError> {
    list.split([',', ' ', '\t', '\n'])
        .filter(|e| !e.trim().is_empty())
        .map(ExcludeRule::parse)
        .collect()
}

/// Parse a port list: `80,8080` (ranges `8000-8010` too, at most 1024 ports).
pub fn parse_ports(list: &str) -> Result<Vec<u16>, ProxyConfigError> {
    let mut out = Vec::new();
    for p in list.split([',', ' ']).filter(|p| !p.is_empty()) {
        let bad = || ProxyConfigError::BadPort(p.to_string());
        let (a, b) = match p.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let x: u16 = p.parse().map_err(|_| bad())?;
                (x, x)
            }
        };
        if a == 0 || b < a || out.len() + usize::from(b - a) >= 1024 {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_with_credentials_and_defaults() {
        let u = parse_proxy_url("http://us%40er:p%3Ass@proxy.corp:8080/").unwrap();
        assert_eq!(u.host, "proxy.corp");
        assert_eq!(u.port, 8080);
        // base64("us@er:p:ss")
        assert_eq!(u.authorization.as_deref(), Some("Basic dXNAZXI6cDpzcw=="));
        let u = parse_proxy_url("10.0.0.1").unwrap();
        assert_eq!(
            (u.ip(), u.port, u.authorization),
            (Some("10.0.0.1".parse().unwrap()), 3128, None)
        );
        let u = parse_proxy_url("http://[::1]:3129").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 3129));
        let u = parse_proxy_url("http://user@h:1").unwrap();
        assert_eq!(u.authorization.as_deref(), Some("Basic dXNlcjo="));
        assert_eq!(
            parse_proxy_url("https://h:1"),
            Err(ProxyConfigError::Scheme("https".into()))
        );
        assert_eq!(parse_proxy_url("http://:1"), Err(ProxyConfigError::NoHost));
        assert!(matches!(
            parse_proxy_url("http://h:99999"),
            Err(ProxyConfigError::BadPort(_))
        ));
        assert_eq!(
            parse_proxy_url("http://a%zz@h"),
            Err(ProxyConfigError::BadEscape)
        );
        assert_eq!(
            parse_proxy_url("http://a%f@h"),
            Err(ProxyConfigError::BadEscape)
        );
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    fn excluded(list: &str, host: Option<&str>, ip: Option<&str>) -> bool {
        let c = ProxyConfig {
            exclude: parse_no_proxy(list).unwrap(),
            ..ProxyConfig::default()
        };
        c.excluded(host, ip.map(|i| i.parse().unwrap()))
    }

    #[test]
    fn exclude_every_pattern_form() {
        // Exact name and domain suffix.
        assert!(excluded("example.com", Some("example.com"), None));
        assert!(excluded("example.com", Some("WWW.Example.COM."), None));
        assert!(!excluded("example.com", Some("notexample.com"), None));
        assert!(!excluded("example.com", Some("example.com.evil"), None));
        // Found by the fuzzer: a name with multi-byte characters.
        assert!(!excluded("z", Some("zzNߑ"), None));
        assert!(excluded("z", Some("ߑ.z"), None));
        // `.domain` and `*.domain`: names under it only.
        for l in [".example.com", "*.example.com"] {
            assert!(excluded(l, Some("a.b.example.com"), None));
            assert!(!excluded(l, Some("example.com"), None));
            assert!(!excluded(l, Some("xexample.com"), None));
        }
        // Addresses: the destination's, or a literal name.
        assert!(excluded("10.1.2.3", None, Some("10.1.2.3")));
        assert!(excluded("10.1.2.3", Some("10.1.2.3"), None));
        assert!(!excluded("10.1.2.3", Some("h"), Some("10.1.2.4")));
        assert!(excluded("::1", None, Some("::1")));
        assert!(excluded("[fd00::1]", Some("[fd00::1]"), None));
        // CIDR.
        assert!(excluded("10.0.0.0/8", Some("name"), Some("10.200.0.1")));
        assert!(!excluded("10.0.0.0/8", None, Some("11.0.0.1")));
        assert!(excluded("0.0.0.0/0", None, Some("1.2.3.4")));
        assert!(excluded("fd00::/8", None, Some("fd12::1")));
        assert!(!excluded("fd00::/8", None, Some("fe80::1")));
        assert!(!excluded("fd00::/8", None, Some("10.0.0.1")));
        // A name rule never matches an address-only destination, and `*` matches all.
        assert!(!excluded("example.com", None, Some("1.2.3.4")));
        assert!(excluded("*", None, None));
        // Lists, with a port that is ignored.
        assert!(excluded(
            "a.test, b.test:8080 ,10.0.0.1",
            Some("x.b.test"),
            None
        ));
        // Bad entries are refused, not ignored.
        for bad in ["10.0.0.0/33", "a b/c", "ex ample", "*.", "::1/129", "[x"] {
            assert!(parse_no_proxy(bad).is_err() || bad.contains(' '), "{bad}");
        }
        assert!(ExcludeRule::parse("10.0.0.0/33").is_err());
        assert!(ExcludeRule::parse("ex$ample").is_err());
        assert!(ExcludeRule::parse("*.").is_err());
    }

    #[test]
    fn port_lists() {
        assert_eq!(
            parse_ports("80,8080 8000-8002").unwrap(),
            vec![80, 8000, 8001, 8002, 8080]
        );
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("9-8").is_err());
        assert!(parse_ports("1-65535").is_err());
        assert_eq!(parse_ports("").unwrap(), Vec::<u16>::new());
    }
}
