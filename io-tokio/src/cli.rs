//! The `usernet` command line: clap definitions and their translation into a core
//! [`Config`].

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use usernet_core::config::{DEFAULT_TAP_MTU, DEFAULT_VM_MTU};
use usernet_core::{Config, Subnet};

#[derive(Parser, Debug)]
#[command(
    name = "usernet",
    version,
    about = "A user-mode network stack for virtual machines and containers",
    long_about = "usernet takes the Ethernet frames a VM or a network namespace sends and turns \
them into ordinary host socket calls: TCP and UDP flows, ping and DHCP. The guest reaches every \
destination at its own address, and the host's 127.0.0.1 through the host alias address."
)]
pub struct Cli {
    /// Log more: -v for debug, -vv for trace (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run CMD in a fresh network namespace (inside a new user namespace when not root),
    /// connected through usernet; exit with CMD's status.
    Run {
        #[command(flatten)]
        net: NetArgs,
        /// Name of the TAP device inside the namespace.
        #[arg(long, default_value = "tap0")]
        tap: String,
        /// Leave the TAP unconfigured inside (the command runs its own DHCP client).
        #[arg(long)]
        no_configure: bool,
        /// The command and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        cmd: Vec<OsString>,
    },
    /// Serve an existing TAP device in a network namespace (the daemon itself stays in the
    /// host namespace).
    Tap {
        #[command(flatten)]
        net: NetArgs,
        /// The namespace holding the TAP: a path like /run/netns/NAME or /proc/PID/ns/net.
        /// Without it, the TAP is looked up in usernet's own namespace.
        #[arg(long, value_name = "PATH")]
        netns: Option<PathBuf>,
        /// Name of the TAP device (created with `ip tuntap add NAME mode tap`).
        #[arg(long, value_name = "NAME")]
        tap: String,
    },
    /// Listen on a UNIX stream socket speaking QEMU's `-netdev stream` framing (a u32
    /// big-endian length before each frame; passt's too). A VMM that reconnects is served
    /// again.
    Stream {
        #[command(flatten)]
        net: NetArgs,
        /// Path of the listening socket (removed on exit).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
}

/// Options shared by every transport.
#[derive(Args, Debug, Clone)]
pub struct NetArgs {
    /// The guest subnet.
    #[arg(long, default_value = "192.168.65.0/24", value_name = "CIDR")]
    pub subnet: Subnet,
    /// The gateway address (default: .1 of the subnet). ARP, DHCP and DNS live here.
    #[arg(long, value_name = "IP")]
    pub gateway_ip: Option<Ipv4Addr>,
    /// The host alias: TCP, UDP and ping to it reach the host's 127.0.0.1 (default: .2 of
    /// the subnet; 0.0.0.0 disables it). May equal the gateway, as in slirp.
    #[arg(long, value_name = "IP")]
    pub host_ip: Option<Ipv4Addr>,
    /// First address the DHCP server hands out (default: .3 of the subnet).
    #[arg(long, value_name = "IP")]
    pub lowest_ip: Option<Ipv4Addr>,
    /// Last address the DHCP server hands out (default: the last before broadcast).
    #[arg(long, value_name = "IP")]
    pub highest_ip: Option<Ipv4Addr>,
    /// IP MTU of the guest link (default: 65520 on TAP, 1500 on VM transports).
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u16>,
    /// Relay UDP DNS sent to the gateway's port 53 to this server (ADDR or ADDR:PORT).
    /// Default: the first nameserver in /etc/resolv.conf.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub dns: Option<String>,
    /// Do not relay DNS at all.
    #[arg(long, conflicts_with = "dns")]
    pub no_dns: bool,
    /// Domain name handed out by DHCP (option 15).
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
    /// A domain for the DHCP search list (option 119); repeatable.
    #[arg(long, value_name = "NAME")]
    pub search: Vec<String>,
    /// DHCP lease time in seconds.
    #[arg(long, default_value_t = 7200, value_name = "SECONDS")]
    pub lease_time: u64,
    /// Backlog of every listening socket usernet creates.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub listen_backlog: u32,
    /// Per-flow TCP buffer in each direction, in KiB.
    #[arg(long, default_value_t = 512, value_name = "KIB")]
    pub tcp_buffer_kib: usize,
    /// Seed for the stack's randomness (TCP sequence numbers, IP identifiers); default:
    /// fresh from the OS. A fixed seed makes a run reproducible.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

/// Parse `ADDR` or `ADDR:PORT` (IPv6 as `[ADDR]:PORT`), port 53 by default.
pub fn parse_dns(s: &str) -> Result<SocketAddr, CliError> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| CliError(format!("--dns {s:?} is not an address or address:port")))
}

/// The first `nameserver` of a resolv.conf text.
pub fn resolv_conf_nameserver(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

impl NetArgs {
    /// The core configuration these options describe, with `default_mtu` for the
    /// transport.
    pub fn config(&self, default_mtu: u16) -> Result<Config, CliError> {
        let mut c = Config::for_subnet(self.subnet);
        if let Some(g) = self.gateway_ip {
            c.gateway = g;
        }
        match self.host_ip {
            Some(ip) if ip.is_unspecified() => c.host_alias = None,
            Some(ip) => c.host_alias = Some(ip),
            None => {}
        }
        if let Some(ip) = self.lowest_ip {
            c.first_guest = ip;
        }
        if let Some(ip) = self.highest_ip {
            c.last_guest = ip;
        }
        c.mtu = self.mtu.unwrap_or(default_mtu);
        c.dhcp.domain_name = self.domain.clone();
        c.dhcp.search = self.search.clone();
        if self.lease_time == 0 {
            return Err(CliError("--lease-time must be at least 1 second".into()));
        }
        c.dhcp.lease_time = usernet_core::Duration::from_secs(self.lease_time);
        c.dns_forward = if self.no_dns {
            None
        } else if let Some(d) = &self.dns {
            Some(parse_dns(d)?)
        } else {
            std::fs::read_to_string("/etc/resolv.conf")
                .ok()
                .and_then(|t| resolv_conf_nameserver(&t))
        };
        let buf = self
            .tcp_buffer_kib
            .checked_mul(1024)
            .filter(|b| *b >= 4096 && *b <= 64 << 20)
            .ok_or_else(|| {
                CliError(format!(
                    "--tcp-buffer-kib {} is not between 4 and 65536",
                    self.tcp_buffer_kib
                ))
            })?;
        c.tcp.rx_buffer = buf;
        c.tcp.tx_buffer = buf;
        c.validate()
            .map_err(|e| CliError(format!("bad network options: {e}")))?;
        Ok(c)
    }
}

impl Command {
    pub fn net(&self) -> &NetArgs {
        match self {
            Command::Run { net, .. } | Command::Tap { net, .. } | Command::Stream { net, .. } => {
                net
            }
        }
    }
    pub fn default_mtu(&self) -> u16 {
        match self {
            Command::Run { .. } | Command::Tap { .. } => DEFAULT_TAP_MTU,
            Command::Stream { .. } => DEFAULT_VM_MTU,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn options_become_config() {
        let cli = Cli::try_parse_from([
            "usernet",
            "tap",
            "--tap",
            "t0",
            "--subnet",
            "10.0.2.0/24",
            "--gateway-ip",
            "10.0.2.2",
            "--host-ip",
            "10.0.2.2",
            "--dns",
            "127.0.0.1:5353",
            "--mtu",
            "9000",
        ])
        .unwrap();
        let c = cli.command.net().config(cli.command.default_mtu()).unwrap();
        assert_eq!(c.gateway, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(c.host_alias, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(c.first_guest, Ipv4Addr::new(10, 0, 2, 3));
        assert_eq!(c.mtu, 9000);
        assert_eq!(c.dns_forward, Some("127.0.0.1:5353".parse().unwrap()));
    }

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        assert!(
            Cli::try_parse_from(["usernet", "tap", "--tap", "t", "--subnet", "10.0.0.0/40"])
                .is_err()
        );
        let cli = Cli::try_parse_from([
            "usernet",
            "stream",
            "--socket",
            "/tmp/x",
            "--gateway-ip",
            "1.2.3.4",
        ])
        .unwrap();
        let e = cli.command.net().config(1500).unwrap_err();
        assert!(e.0.contains("not inside the subnet"), "{e}");
        assert!(parse_dns("nonsense").is_err());
        let cli = Cli::try_parse_from(["usernet", "run", "--", "sh", "-c", "true"]).unwrap();
        let Command::Run { cmd, .. } = cli.command else {
            panic!()
        };
        assert_eq!(cmd, ["sh", "-c", "true"]);
    }

    #[test]
    fn resolv_conf_first_nameserver() {
        let t = "# comment\nsearch example\nnameserver 127.0.0.53\nnameserver 1.1.1.1\n";
        assert_eq!(
            resolv_conf_nameserver(t),
            Some("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(
            resolv_conf_nameserver("nameserver fe80::1%eth0"),
            Some("[fe80::1]:53".parse().unwrap())
        );
        assert_eq!(resolv_conf_nameserver(""), None);
    }
}
