//! The `usernet` command line: clap definitions and their translation into a core
//! [`Config`].

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use usernet_core::config::{DEFAULT_TAP_MTU, DEFAULT_VM_MTU};
use usernet_core::{Config, Subnet};

use crate::forward::{parse_publish, Forward, Protocol};

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
    /// Talk to a running daemon's control API (`--api PATH`): expose and unexpose port
    /// forwards, list them, show DHCP leases and counters.
    Ctl {
        /// The daemon's API socket.
        #[arg(long, value_name = "PATH")]
        api: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
}

/// What `usernet ctl` asks.
#[derive(Subcommand, Debug, Clone)]
pub enum CtlAction {
    /// Forward LOCAL on the host to REMOTE in the guest.
    Expose {
        /// Host address to listen on: ADDR:PORT, or :PORT for every address.
        local: String,
        /// Guest address: ADDR:PORT, or :PORT for the guest's leased address.
        remote: String,
        #[arg(long, default_value = "tcp", value_name = "tcp|udp")]
        protocol: String,
    },
    /// Stop forwarding LOCAL (its listener closes at once; open connections keep running).
    Unexpose {
        /// The forward's host address, as exposed.
        local: String,
        #[arg(long, default_value = "tcp", value_name = "tcp|udp")]
        protocol: String,
    },
    /// List the forwards: PROTOCOL LOCAL -> REMOTE.
    List,
    /// List the DHCP leases: ADDRESS MAC.
    Leases,
    /// Print the counters (JSON).
    Stats,
}

/// The forwards of one `-p` value (a range gives several).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish(pub Vec<Forward>);

fn parse_publish_arg(s: &str) -> Result<Publish, String> {
    parse_publish(s).map(Publish).map_err(|e| e.0)
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
    /// Backlog of every listening socket usernet creates (port forwards included).
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub listen_backlog: u32,
    /// Forward a host port into the guest (Docker's syntax; repeatable; ranges like
    /// 8000-8009:8000-8009). Without HOST_IP the forward listens on 127.0.0.1 only (write
    /// 0.0.0.0:8080:80 to listen on every address). GUEST_PORT is on the guest's DHCP
    /// lease (the only one), or under `usernet run` the address usernet configured. The
    /// guest sees each client's own address as the source (a client on the host's
    /// loopback appears as the host alias). usernet exits if a forward cannot be bound at
    /// start (address in use, privileged port, address not on this host), as Docker does.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]",
        value_parser = parse_publish_arg
    )]
    pub publish: Vec<Publish>,
    /// Serve the control API (HTTP/JSON, gvisor-tap-vsock's forwarder shapes) on a UNIX
    /// socket at PATH, created mode 0600 and removed on exit; `usernet ctl` talks to it.
    #[arg(long, value_name = "PATH")]
    pub api: Option<PathBuf>,
    /// Open TCP connections allowed per port forward; more are reset (and counted).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub forward_max_connections: usize,
    /// Open TCP connections allowed through all port forwards together.
    #[arg(long, default_value_t = 8192, value_name = "N")]
    pub forward_max_total: usize,
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

impl NetArgs {
    /// Every forward of the `-p` options, in order.
    pub fn forwards(&self) -> Vec<Forward> {
        self.publish
            .iter()
            .flat_map(|p| p.0.iter().copied())
            .collect()
    }
}

impl Command {
    /// The network options of a transport (`None` for `ctl`).
    pub fn net(&self) -> Option<&NetArgs> {
        match self {
            Command::Run { net, .. } | Command::Tap { net, .. } | Command::Stream { net, .. } => {
                Some(net)
            }
            Command::Ctl { .. } => None,
        }
    }
    pub fn default_mtu(&self) -> u16 {
        match self {
            Command::Run { .. } | Command::Tap { .. } | Command::Ctl { .. } => DEFAULT_TAP_MTU,
            Command::Stream { .. } => DEFAULT_VM_MTU,
        }
    }
}

impl CtlAction {
    /// The API request: method, path and JSON body.
    pub fn request(
        &self,
    ) -> Result<(&'static str, &'static str, Option<serde_json::Value>), CliError> {
        let proto = |p: &str| {
            p.parse::<Protocol>()
                .map(|p| p.as_str())
                .map_err(|e| CliError(e.0))
        };
        Ok(match self {
            CtlAction::Expose {
                local,
                remote,
                protocol,
            } => (
                "POST",
                "/services/forwarder/expose",
                Some(
                    serde_json::json!({"local": local, "remote": remote, "protocol": proto(protocol)?}),
                ),
            ),
            CtlAction::Unexpose { local, protocol } => (
                "POST",
                "/services/forwarder/unexpose",
                Some(serde_json::json!({"local": local, "protocol": proto(protocol)?})),
            ),
            CtlAction::List => ("GET", "/services/forwarder/all", None),
            CtlAction::Leases => ("GET", "/leases", None),
            CtlAction::Stats => ("GET", "/stats", None),
        })
    }

    /// The plain text `usernet ctl` prints for a successful answer.
    pub fn render(&self, body: &serde_json::Value) -> String {
        let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
        let forward = |f: &serde_json::Value| {
            format!(
                "{} {} -> {}",
                s(&f["protocol"]),
                s(&f["local"]),
                s(&f["remote"])
            )
        };
        match self {
            CtlAction::Expose { .. } => format!("exposed {}\n", forward(body)),
            CtlAction::Unexpose { .. } => format!("unexposed {}\n", forward(body)),
            CtlAction::List => body
                .as_array()
                .map(|a| a.iter().map(|f| forward(f) + "\n").collect())
                .unwrap_or_default(),
            CtlAction::Leases => body
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(ip, mac)| format!("{ip} {}\n", s(mac)))
                        .collect()
                })
                .unwrap_or_default(),
            CtlAction::Stats => serde_json::to_string_pretty(body).unwrap_or_default() + "\n",
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
        let c = cli
            .command
            .net()
            .unwrap()
            .config(cli.command.default_mtu())
            .unwrap();
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
        let e = cli.command.net().unwrap().config(1500).unwrap_err();
        assert!(e.0.contains("not inside the subnet"), "{e}");
        assert!(parse_dns("nonsense").is_err());
        let cli = Cli::try_parse_from(["usernet", "run", "--", "sh", "-c", "true"]).unwrap();
        let Command::Run { cmd, .. } = cli.command else {
            panic!()
        };
        assert_eq!(cmd, ["sh", "-c", "true"]);
    }

    #[test]
    fn publish_and_ctl_options() {
        let cli = Cli::try_parse_from([
            "usernet",
            "run",
            "-p",
            "8080:80",
            "--publish",
            "0.0.0.0:5353:53/udp",
            "-p",
            "9000-9001:9000-9001",
            "--api",
            "/tmp/a.sock",
            "--",
            "true",
        ])
        .unwrap();
        let net = cli.command.net().unwrap();
        let f = net.forwards();
        assert_eq!(f.len(), 4);
        assert_eq!(f[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(f[1].protocol, Protocol::Udp);
        assert_eq!(
            net.api.as_deref(),
            Some(std::path::Path::new("/tmp/a.sock"))
        );
        let e = Cli::try_parse_from(["usernet", "tap", "--tap", "t", "-p", "80"]).unwrap_err();
        assert!(e.to_string().contains("HOST_PORT:GUEST_PORT"), "{e}");
        let cli = Cli::try_parse_from([
            "usernet",
            "ctl",
            "--api",
            "/tmp/a.sock",
            "expose",
            ":8080",
            "192.168.65.3:80",
            "--protocol",
            "udp",
        ])
        .unwrap();
        let Command::Ctl { action, .. } = cli.command else {
            panic!()
        };
        let (m, p, body) = action.request().unwrap();
        assert_eq!((m, p), ("POST", "/services/forwarder/expose"));
        assert_eq!(body.unwrap()["protocol"], "udp");
        let listed =
            serde_json::json!([{"local":"127.0.0.1:8080","remote":":80","protocol":"tcp"}]);
        assert_eq!(
            CtlAction::List.render(&listed),
            "tcp 127.0.0.1:8080 -> :80\n"
        );
        let bad = CtlAction::Unexpose {
            local: ":1".into(),
            protocol: "sctp".into(),
        };
        assert!(bad.request().is_err());
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
