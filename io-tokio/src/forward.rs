//! Port forwards: host ports carried into the guest. This module holds their description
//! and its two spellings: Docker's `-p [HOST_IP:]HOST_PORT:GUEST_PORT[/PROTO]` and the
//! gvisor-tap-vsock forwarder API's `{"local","remote","protocol"}`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

/// Transport protocol of a forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = ForwardError;
    fn from_str(s: &str) -> Result<Self, ForwardError> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" | "" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(ForwardError(format!(
                "protocol {other:?} is not tcp or udp"
            ))),
        }
    }
}

/// Where a forward leads in the guest: an address, or "the guest's leased address" (the
/// only guest, resolved when a connection arrives).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Remote {
    Addr(SocketAddrV4),
    Leased(u16),
}

impl Remote {
    pub fn port(&self) -> u16 {
        match self {
            Remote::Addr(a) => a.port(),
            Remote::Leased(p) => *p,
        }
    }
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Remote::Addr(a) => write!(f, "{a}"),
            Remote::Leased(p) => write!(f, ":{p}"),
        }
    }
}

/// One forward: a host listening address and the guest address it leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Forward {
    pub protocol: Protocol,
    pub local: SocketAddr,
    pub remote: Remote,
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}",
            self.protocol.as_str(),
            self.local,
            self.remote
        )
    }
}

/// Why a forward description was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardError(pub String);

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ForwardError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ForwardError> {
    Err(ForwardError(msg.into()))
}

/// Ports at most in one `-p` range.
pub const MAX_RANGE: usize = 1024;

fn parse_port(s: &str, what: &str) -> Result<u16, ForwardError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => err(format!("{what} {s:?} is not a port from 1 to 65535")),
    }
}

fn parse_ports(s: &str, what: &str) -> Result<(u16, u16), ForwardError> {
    match s.split_once('-') {
        None => {
            let p = parse_port(s, what)?;
            Ok((p, p))
        }
        Some((a, b)) => {
            let (a, b) = (parse_port(a, what)?, parse_port(b, what)?);
            if a > b {
                return err(format!("{what} range {s:?} runs backwards"));
            }
            if usize::from(b - a) >= MAX_RANGE {
                return err(format!(
                    "{what} range {s:?} has more than {MAX_RANGE} ports"
                ));
            }
            Ok((a, b))
        }
    }
}

/// Parse Docker's `-p` syntax: `[HOST_IP:]HOST_PORT[-END]:GUEST_PORT[-END][/tcp|/udp]`.
/// IPv6 host addresses go in brackets. Without a host address the forward listens on
/// 127.0.0.1 only (Docker's default is every address; here exposing a guest port beyond
/// this machine is an explicit choice: write `0.0.0.0:8080:80`).
pub fn parse_publish(spec: &str) -> Result<Vec<Forward>, ForwardError> {
    let (body, proto) = match spec.rsplit_once('/') {
        Some((b, p)) => (b, p.parse::<Protocol>()?),
        None => (spec, Protocol::Tcp),
    };
    // Split off the host address: either "[v6]:" or "v4:" before the last two fields.
    let (host_ip, ports) = if let Some(rest) = body.strip_prefix('[') {
        let (ip, rest) = rest
            .split_once("]:")
            .ok_or_else(|| ForwardError(format!("{spec:?}: unclosed [")))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| ForwardError(format!("{spec:?}: {ip:?} is not an address")))?;
        (ip, rest)
    } else {
        let parts: Vec<&str> = body.split(':').collect();
        match parts.len() {
            2 => (IpAddr::V4(Ipv4Addr::LOCALHOST), body),
            3 => {
                let ip: IpAddr = parts[0].parse().map_err(|_| {
                    ForwardError(format!("{spec:?}: {:?} is not an address", parts[0]))
                })?;
                (ip, &body[parts[0].len() + 1..])
            }
            _ => {
                return err(format!(
                    "{spec:?} is not [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]"
                ))
            }
        }
    };
    let (host, guest) = ports.split_once(':').ok_or_else(|| {
        ForwardError(format!(
            "{spec:?} is not [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]"
        ))
    })?;
    let (h0, h1) = parse_ports(host, "host port")?;
    let (g0, g1) = parse_ports(guest, "guest port")?;
    if h1 - h0 != g1 - g0 {
        return err(format!(
            "{spec:?}: the host and guest ranges differ in length"
        ));
    }
    Ok((0..=h1 - h0)
        .map(|i| Forward {
            protocol: proto,
            local: SocketAddr::new(host_ip, h0 + i),
            remote: Remote::Leased(g0 + i),
        })
        .collect())
}

/// Parse the API's `local` (`"127.0.0.1:8080"`, `":8080"` for every address, `"[::1]:8080"`).
pub fn parse_local(s: &str) -> Result<SocketAddr, ForwardError> {
    if let Some(port) = s.strip_prefix(':') {
        return Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            parse_port(port, "local port")?,
        ));
    }
    s.parse()
        .map_err(|_| ForwardError(format!("local {s:?} is not ADDR:PORT or :PORT")))
}

/// Parse the API's `remote` (`"192.168.65.3:80"`, or `":80"` for the guest's leased address).
pub fn parse_remote(s: &str) -> Result<Remote, ForwardError> {
    if let Some(port) = s.strip_prefix(':') {
        return Ok(Remote::Leased(parse_port(port, "remote port")?));
    }
    match s.parse::<SocketAddrV4>() {
        Ok(a) if a.port() != 0 => Ok(Remote::Addr(a)),
        _ => err(format!("remote {s:?} is not IPv4:PORT or :PORT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(spec: &str) -> Forward {
        let v = parse_publish(spec).unwrap();
        assert_eq!(v.len(), 1);
        v[0]
    }

    #[test]
    fn docker_publish_syntax() {
        assert_eq!(
            one("8080:80"),
            Forward {
                protocol: Protocol::Tcp,
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: Remote::Leased(80)
            }
        );
        assert_eq!(one("0.0.0.0:53:53/udp").protocol, Protocol::Udp);
        assert_eq!(
            one("0.0.0.0:53:53/udp").local,
            "0.0.0.0:53".parse().unwrap()
        );
        assert_eq!(one("[::1]:2222:22").local, "[::1]:2222".parse().unwrap());
        let range = parse_publish("127.0.0.2:8000-8002:9000-9002/tcp").unwrap();
        assert_eq!(range.len(), 3);
        assert_eq!(range[2].local.port(), 8002);
        assert_eq!(range[2].remote, Remote::Leased(9002));
    }

    #[test]
    fn bad_publish_specs_say_why() {
        for (spec, why) in [
            ("80", "is not"),
            ("x:80", "is not a port"),
            ("8000-8002:80", "differ in length"),
            ("9-8:9-8", "backwards"),
            ("1.2.3:80:80", "not an address"),
            ("80:80/sctp", "not tcp or udp"),
            ("0:80", "is not a port"),
            ("1-2000:1-2000", "more than"),
        ] {
            let e = parse_publish(spec).unwrap_err();
            assert!(e.0.contains(why), "{spec}: {e}");
        }
    }

    #[test]
    fn api_local_and_remote() {
        assert_eq!(
            parse_local(":8080").unwrap(),
            "0.0.0.0:8080".parse().unwrap()
        );
        assert_eq!(
            parse_local("127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert!(parse_local("8080").is_err());
        assert_eq!(parse_remote(":22").unwrap(), Remote::Leased(22));
        assert_eq!(
            parse_remote("192.168.65.3:80").unwrap(),
            Remote::Addr("192.168.65.3:80".parse().unwrap())
        );
        assert!(parse_remote("192.168.65.3:0").is_err());
        assert!(parse_remote("[::1]:80").is_err());
    }
}
