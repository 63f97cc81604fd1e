//! Configuration of a [`crate::Stack`]: addresses, limits and timers.
//!
//! The guest-facing link is IPv4 today (ARP and DHCPv4 are IPv4 protocols), but everything
//! that names a host-side destination uses `IpAddr`/`SocketAddr` so that IPv6 slots in.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use smoltcp::time::Duration;

/// An IPv4 subnet: network address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    addr: Ipv4Addr,
    prefix_len: u8,
}

impl Subnet {
    /// A subnet; host bits in `addr` are cleared.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, ConfigError> {
        if !(8..=30).contains(&prefix_len) {
            return Err(ConfigError::PrefixLen(prefix_len));
        }
        let mask = u32::MAX << (32 - prefix_len);
        Ok(Subnet {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len,
        })
    }
    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.prefix_len))
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !(u32::MAX << (32 - self.prefix_len)))
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix_len);
        u32::from(ip) & mask == u32::from(self.addr)
    }
    /// The `n`th address of the subnet (`.1` is `host(1)`).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + n)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl std::str::FromStr for Subnet {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| ConfigError::Parse(s.to_string()))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| ConfigError::Parse(s.to_string()))?;
        let prefix: u8 = p.parse().map_err(|_| ConfigError::Parse(s.to_string()))?;
        Subnet::new(addr, prefix)
    }
}

/// Why a configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    PrefixLen(u8),
    Parse(String),
    OutsideSubnet {
        what: &'static str,
        addr: Ipv4Addr,
        subnet: Subnet,
    },
    BadRange {
        first: Ipv4Addr,
        last: Ipv4Addr,
    },
    Clash {
        what: &'static str,
        addr: Ipv4Addr,
    },
    Mtu(u16),
    Zero(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::PrefixLen(p) => write!(f, "prefix length /{p} is not between /8 and /30"),
            ConfigError::Parse(s) => write!(f, "{s:?} is not an IPv4 subnet like 192.168.65.0/24"),
            ConfigError::OutsideSubnet { what, addr, subnet } => {
                write!(f, "the {what} {addr} is not inside the subnet {subnet}")
            }
            ConfigError::BadRange { first, last } => {
                write!(f, "the guest address range {first}..{last} is empty")
            }
            ConfigError::Clash { what, addr } => {
                write!(f, "the {what} {addr} is also used for another purpose")
            }
            ConfigError::Mtu(m) => write!(f, "MTU {m} is not between 576 and 65521"),
            ConfigError::Zero(what) => write!(f, "{what} must be greater than zero"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// DHCP server options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpConfig {
    /// Lease time handed to clients.
    pub lease_time: Duration,
    /// Option 15.
    pub domain_name: Option<String>,
    /// Option 119 (domain search list).
    pub search: Vec<String>,
    /// Option 6. Empty means "the gateway" (where the DNS forwarder lives).
    pub dns_servers: Vec<Ipv4Addr>,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        DhcpConfig {
            lease_time: Duration::from_secs(7200),
            domain_name: None,
            search: Vec::new(),
            dns_servers: Vec::new(),
        }
    }
}

/// TCP relay options and limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// Bytes buffered from the guest towards the host per flow (the guest's receive window).
    pub rx_buffer: usize,
    /// Bytes buffered from the host towards the guest per flow.
    pub tx_buffer: usize,
    /// Flows at most; a SYN beyond gets a RST and is counted.
    pub max_flows: usize,
    /// Host connects in progress at most; a SYN beyond gets a RST and is counted.
    pub max_pending_connects: usize,
    /// A host connect that has not finished by then is failed (guest gets a RST).
    pub connect_timeout: Duration,
    /// Delayed-ACK timer towards the guest.
    pub ack_delay: Option<Duration>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            rx_buffer: 512 * 1024,
            tx_buffer: 512 * 1024,
            max_flows: 16384,
            max_pending_connects: 1024,
            connect_timeout: Duration::from_secs(30),
            ack_delay: Some(Duration::from_millis(1)),
        }
    }
}

/// UDP NAT options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpConfig {
    /// A NAT entry without traffic either way for this long is removed.
    pub idle_timeout: Duration,
    /// NAT entries at most; the least recently used is evicted to make room.
    pub max_flows: usize,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            idle_timeout: Duration::from_secs(60),
            max_flows: 4096,
        }
    }
}

/// ICMP echo relay options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpConfig {
    pub idle_timeout: Duration,
    pub max_flows: usize,
}

impl Default for IcmpConfig {
    fn default() -> Self {
        IcmpConfig {
            idle_timeout: Duration::from_secs(30),
            max_flows: 1024,
        }
    }
}

/// Everything a [`crate::Stack`] needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub subnet: Subnet,
    /// The gateway: ARP, DHCP, DNS and the default route live here.
    pub gateway: Ipv4Addr,
    pub gateway_mac: [u8; 6],
    /// TCP and UDP to this address go to `host_loopback`; `None` disables the alias.
    pub host_alias: Option<Ipv4Addr>,
    /// Where the host alias leads.
    pub host_loopback: IpAddr,
    /// DHCP pool, inclusive.
    pub first_guest: Ipv4Addr,
    pub last_guest: Ipv4Addr,
    /// IP MTU of the guest link (an Ethernet frame is 14 bytes more).
    pub mtu: u16,
    /// The gateway's DNS service (UDP and TCP on port 53). `None`: no DNS service.
    pub dns: Option<crate::dns::DnsConfig>,
    pub dhcp: DhcpConfig,
    pub tcp: TcpConfig,
    pub udp: UdpConfig,
    pub icmp: IcmpConfig,
}

/// MTU of VM transports (VPNKit's and QEMU's default).
pub const DEFAULT_VM_MTU: u16 = 1500;
/// MTU of TAP transports: the largest an IPv4 packet on a TAP can usefully be (as pasta).
pub const DEFAULT_TAP_MTU: u16 = 65520;

impl Default for Config {
    /// VPNKit's layout: 192.168.65.0/24, gateway .1, host alias .2, guests from .3.
    fn default() -> Self {
        let subnet = Subnet::new(Ipv4Addr::new(192, 168, 65, 0), 24).expect("valid");
        Config {
            gateway: subnet.host(1),
            // Locally administered, unicast.
            gateway_mac: [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee],
            host_alias: Some(subnet.host(2)),
            host_loopback: IpAddr::V4(Ipv4Addr::LOCALHOST),
            first_guest: subnet.host(3),
            last_guest: Ipv4Addr::from(u32::from(subnet.broadcast()) - 1),
            subnet,
            mtu: DEFAULT_VM_MTU,
            dns: None,
            dhcp: DhcpConfig::default(),
            tcp: TcpConfig::default(),
            udp: UdpConfig::default(),
            icmp: IcmpConfig::default(),
        }
    }
}

impl Config {
    /// A configuration for `subnet` with the default layout (.1 gateway, .2 host, .3.. guests).
    pub fn for_subnet(subnet: Subnet) -> Self {
        Config {
            gateway: subnet.host(1),
            host_alias: Some(subnet.host(2)),
            first_guest: subnet.host(3),
            last_guest: Ipv4Addr::from(u32::from(subnet.broadcast()) - 1),
            subnet,
            ..Config::default()
        }
    }

    /// Check that the addresses fit together and the limits are usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = self.subnet;
        let inside = |what, addr| {
            if s.contains(addr) && addr != s.network() && addr != s.broadcast() {
                Ok(())
            } else {
                Err(ConfigError::OutsideSubnet {
                    what,
                    addr,
                    subnet: s,
                })
            }
        };
        inside("gateway", self.gateway)?;
        inside("first guest address", self.first_guest)?;
        inside("last guest address", self.last_guest)?;
        if let Some(h) = self.host_alias {
            inside("host alias", h)?;
        }
        if u32::from(self.first_guest) > u32::from(self.last_guest) {
            return Err(ConfigError::BadRange {
                first: self.first_guest,
                last: self.last_guest,
            });
        }
        let in_pool = |a: Ipv4Addr| {
            (u32::from(self.first_guest)..=u32::from(self.last_guest)).contains(&u32::from(a))
        };
        if in_pool(self.gateway) {
            return Err(ConfigError::Clash {
                what: "gateway",
                addr: self.gateway,
            });
        }
        if let Some(h) = self.host_alias.filter(|h| in_pool(*h)) {
            return Err(ConfigError::Clash {
                what: "host alias",
                addr: h,
            });
        }
        if !(576..=65521).contains(&self.mtu) {
            return Err(ConfigError::Mtu(self.mtu));
        }
        for (what, v) in [
            ("tcp rx buffer", self.tcp.rx_buffer),
            ("tcp tx buffer", self.tcp.tx_buffer),
            ("tcp max flows", self.tcp.max_flows),
            ("tcp max pending connects", self.tcp.max_pending_connects),
            ("udp max flows", self.udp.max_flows),
            ("icmp max flows", self.icmp.max_flows),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(what));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_vpnkit_layout_and_valid() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.gateway, Ipv4Addr::new(192, 168, 65, 1));
        assert_eq!(c.host_alias, Some(Ipv4Addr::new(192, 168, 65, 2)));
        assert_eq!(c.first_guest, Ipv4Addr::new(192, 168, 65, 3));
        assert_eq!(c.last_guest, Ipv4Addr::new(192, 168, 65, 254));
    }

    #[test]
    fn rejects_bad_layouts() {
        let c = Config {
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            ..Config::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::OutsideSubnet { .. })
        ));
        let mut c = Config::default();
        c.gateway = c.first_guest;
        assert!(matches!(c.validate(), Err(ConfigError::Clash { .. })));
        let c = Config {
            mtu: 100,
            ..Config::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Mtu(100)));
        assert!("10.0.2.0/33".parse::<Subnet>().is_err());
        assert_eq!(
            "10.0.2.7/24".parse::<Subnet>().unwrap().network(),
            Ipv4Addr::new(10, 0, 2, 0)
        );
    }
}
