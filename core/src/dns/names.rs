//! Static names: the built-in aliases and the entries of a hosts file.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Names at most in one [`StaticNames`] (a hosts file beyond is cut off).
pub const MAX_STATIC_NAMES: usize = 65536;
/// Addresses at most for one name.
pub const MAX_ADDRS_PER_NAME: usize = 64;

/// Names answered locally: name (lower case, no final dot) to addresses, in the order given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StaticNames {
    names: BTreeMap<String, Vec<IpAddr>>,
}

/// A name as the map keeps it, or `None` if it cannot be a DNS name.
fn normalize(name: &str) -> Option<String> {
    let n = name.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|c| c.is_ascii_graphic() && c != b'\\')
        });
    ok.then_some(n)
}

impl StaticNames {
    pub fn new() -> Self {
        StaticNames::default()
    }

    /// The built-in names: `gateway.usernet.internal` for the gateway and, when there is a
    /// host alias, `host.usernet.internal`, `host.docker.internal` and
    /// `host.containers.internal` for it.
    pub fn defaults(gateway: IpAddr, host_alias: Option<IpAddr>) -> Self {
        let mut s = StaticNames::new();
        s.insert("gateway.usernet.internal", gateway);
        if let Some(h) = host_alias {
            for n in [
                "host.usernet.internal",
                "host.docker.internal",
                "host.containers.internal",
            ] {
                s.insert(n, h);
            }
        }
        s
    }

    /// Add an address for `name`; false if the name is not usable or a limit is reached.
    pub fn insert(&mut self, name: &str, addr: IpAddr) -> bool {
        let Some(n) = normalize(name) else {
            return false;
        };
        if !self.names.contains_key(&n) && self.names.len() >= MAX_STATIC_NAMES {
            return false;
        }
        let v = self.names.entry(n).or_default();
        if v.contains(&addr) {
            return true;
        }
        if v.len() >= MAX_ADDRS_PER_NAME {
            return false;
        }
        v.push(addr);
        true
    }

    /// Parse hosts-file text (`ADDRESS NAME [ALIAS...]`, `#` comments). Lines that do not
    /// parse are skipped; IPv6 zone suffixes (`fe80::1%eth0`) are not usable and skipped.
    pub fn parse_hosts(text: &str) -> Self {
        let mut s = StaticNames::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let Some(Ok(addr)) = words.next().map(str::parse::<IpAddr>) else {
                continue;
            };
            for name in words {
                s.insert(name, addr);
            }
        }
        s
    }

    /// The addresses of `name` (any case, with or without the final dot).
    pub fn get(&self, name: &str) -> Option<&[IpAddr]> {
        let n = name.trim_end_matches('.');
        if n.bytes().any(|c| c.is_ascii_uppercase()) {
            self.names.get(&n.to_ascii_lowercase()).map(Vec::as_slice)
        } else {
            self.names.get(n).map(Vec::as_slice)
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Every name and its addresses, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[IpAddr])> {
        self.names.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

/// The address named by a reverse-lookup name (`4.3.2.1.in-addr.arpa`,
/// nibbles`.ip6.arpa`), if it is a complete one.
pub(crate) fn reverse_addr(name: &str) -> Option<IpAddr> {
    let n = name.to_ascii_lowercase();
    if let Some(rest) = n.strip_suffix(".in-addr.arpa") {
        let parts: Vec<&str> = rest.split('.').collect();
        if parts.len() != 4 {
            return None;
        }
        let mut o = [0u8; 4];
        for (i, p) in parts.iter().rev().enumerate() {
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            o[i] = p.parse().ok()?;
        }
        return Some(IpAddr::V4(Ipv4Addr::from(o)));
    }
    if let Some(rest) = n.strip_suffix(".ip6.arpa") {
        let parts: Vec<&str> = rest.split('.').collect();
        if parts.len() != 32 {
            return None;
        }
        let mut v: u128 = 0;
        for p in parts.iter().rev() {
            if p.len() != 1 {
                return None;
            }
            v = (v << 4) | u128::from(p.chars().next()?.to_digit(16)?);
        }
        return Some(IpAddr::V6(Ipv6Addr::from(v)));
    }
    None
}
