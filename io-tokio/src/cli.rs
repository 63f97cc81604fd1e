//! The `usernet` command line: clap definitions and their translation into a core
//! [`Config`].

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use usernet_core::config::{DEFAULT_TAP_MTU, DEFAULT_VM_MTU};
use usernet_core::dns::{DnsConfig, DnsMode};
use usernet_core::{Config, Subnet};

use crate::forward::{parse_publish, Forward, Protocol};
use crate::listen::ListenSpec;

/// The TAP MTU `usernet guest` sets by default: the daemon's default on VM transports.
pub const DEFAULT_GUEST_MTU: u32 = DEFAULT_VM_MTU as u32;

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
    /// Run inside a guest (or a network namespace): create a TAP device, bring it up and
    /// carry its frames to a usernet daemon over a UNIX or vsock stream, reconnecting
    /// when the daemon restarts. Addressing is left to the guest's DHCP client.
    Guest(crate::guest::GuestArgs),
    /// Serve several guests on one virtual switch: every connection on every listener is
    /// a port; each guest gets its own DHCP lease and guests reach each other at layer 2.
    Serve {
        #[command(flatten)]
        net: NetArgs,
        /// A listener: unix:PATH[,framing=qemu|u16le|vmnet] (QEMU stream, gvisor-tap-vsock,
        /// VPNKit/hyperkit; Firecracker and Cloud Hypervisor vsock: PATH is
        /// `<uds_path>_<port>`), unixgram:PATH (vfkit, libkrun), vsock:PORT[,framing=...]
        /// (u16le by default) or stdio (u16 LE frames on stdin/stdout). Repeatable.
        #[arg(long = "listen", required = true, value_name = "SPEC", value_parser = parse_listen)]
        listen: Vec<ListenSpec>,
    },
    /// Behave as VPNKit (also when started as `vpnkit`, e.g. through a symlink): VPNKit's
    /// flags and defaults (192.168.65.0/24, gateway .1, host .2, guests from .3, MTU
    /// 1500), the vmnet protocol on --ethernet. Other VPNKit flags are accepted and
    /// ignored with a log line.
    Vpnkit {
        #[command(flatten)]
        net: NetArgs,
        /// Path of the vmnet protocol socket (hyperkit, Docker Desktop, rootlesskit).
        #[arg(long, value_name = "PATH")]
        ethernet: PathBuf,
        /// Log at debug level.
        #[arg(long)]
        debug: bool,
        #[command(flatten)]
        ignored: Box<VpnkitIgnored>,
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

/// VPNKit flags usernet accepts and does not act on.
#[derive(Args, Debug, Clone, Default)]
pub struct VpnkitIgnored {
    #[arg(long, hide = true)]
    pub port: Vec<String>,
    #[arg(long, hide = true)]
    pub diagnostics: Option<String>,
    #[arg(long, hide = true)]
    pub vsock_path: Option<String>,
    #[arg(long, hide = true)]
    pub host_names: Option<String>,
    #[arg(long, hide = true)]
    pub gateway_names: Option<String>,
    #[arg(long, hide = true)]
    pub vm_names: Option<String>,
    #[arg(long, hide = true)]
    pub dns_path: Option<String>,
    #[arg(long, hide = true)]
    pub http: Option<String>,
    #[arg(long, hide = true)]
    pub gc_compact_interval: Option<String>,
    #[arg(long, hide = true)]
    pub max_connections: Option<String>,
    #[arg(long, hide = true)]
    pub log_destination: Option<String>,
}

impl VpnkitIgnored {
    /// `--flag value` of every ignored flag given, for the log.
    pub fn given(&self) -> Vec<String> {
        let mut v: Vec<String> = self.port.iter().map(|p| format!("--port {p}")).collect();
        for (name, val) in [
            ("--diagnostics", &self.diagnostics),
            ("--vsock-path", &self.vsock_path),
            ("--host-names", &self.host_names),
            ("--gateway-names", &self.gateway_names),
            ("--vm-names", &self.vm_names),
            ("--dns-path", &self.dns_path),
            ("--http", &self.http),
            ("--gc-compact-interval", &self.gc_compact_interval),
            ("--max-connections", &self.max_connections),
            ("--log-destination", &self.log_destination),
        ] {
            if let Some(x) = val {
                v.push(format!("{name} {x}"));
            }
        }
        v
    }
}

fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    s.parse()
}

/// The arguments as clap should see them: started as `vpnkit` (a symlink named so),
/// usernet runs its `vpnkit` subcommand.
pub fn vpnkit_argv(mut args: Vec<OsString>) -> Vec<OsString> {
    let invoked_as_vpnkit = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "vpnkit" || n == "vpnkit.exe");
    if invoked_as_vpnkit {
        args.insert(1, "vpnkit".into());
    }
    args
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
    /// Show the proxy settings in use, or replace them with those of FILE (JSON, or
    /// TOML when the name ends in .toml; the shape of --proxy-config).
    Proxy {
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
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
    /// An upstream DNS server group for the gateway's DNS service (UDP and TCP on port
    /// 53): ADDR[:PORT], or several joined by commas to be asked in parallel. Repeatable:
    /// groups are tried in order, failing over after the retransmit interval. Default: the
    /// nameservers of /etc/resolv.conf (or the file given with --resolv-conf), in order.
    #[arg(long, value_name = "ADDR[:PORT][,...]")]
    pub dns: Vec<String>,
    /// Read the default upstreams from this resolv.conf-style file.
    #[arg(long, value_name = "PATH", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Queries for ZONE (and names under it) go only to these servers, asked in
    /// parallel: ZONE=ADDR[:PORT][,...]. Repeatable; the longest matching zone wins.
    #[arg(long, value_name = "ZONE=ADDR[,...]")]
    pub dns_zone: Vec<String>,
    /// `forward`: every query to the upstreams. `system`: A and AAAA through the host's
    /// own resolver (getaddrinfo, which follows VPN split-DNS), other types forwarded when
    /// upstreams are given, else answered NOTIMP.
    #[arg(long, value_name = "MODE", default_value = "forward", value_parser = ["forward", "system"])]
    pub dns_mode: String,
    /// Answers cached at most (TTLs honoured and counted down); 0 turns the cache off.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub dns_cache: usize,
    /// Ask again (the next group) after this many milliseconds without an answer.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub dns_retransmit_ms: u64,
    /// Answer SERVFAIL after this many milliseconds without a good answer.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub dns_timeout_ms: u64,
    /// A static name answered by the gateway itself: NAME=IP[,IP...]. Repeatable. Built
    /// in: host.usernet.internal, host.docker.internal, host.containers.internal (the
    /// host alias) and gateway.usernet.internal (the gateway).
    #[arg(long, value_name = "NAME=IP[,...]")]
    pub dns_name: Vec<String>,
    /// A hosts file (/etc/hosts syntax) answered by the gateway; re-read when it changes.
    #[arg(long, value_name = "PATH")]
    pub hosts: Option<PathBuf>,
    /// No DNS service on the gateway.
    #[arg(long, conflicts_with_all = ["dns", "dns_zone", "dns_name", "hosts"])]
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
    /// Busy-poll for up to this many microseconds before sleeping, while traffic keeps
    /// arriving within that time (adaptive, like QEMU's poll-max-ns: the window grows
    /// while waits are short and drops to nothing after a longer one, so an idle daemon
    /// never spins). Cuts request/response latency, above all on virtual machines, where
    /// waking an idle CPU is slow; costs CPU time while exchanges are that quick. 0 = off;
    /// always off on a single CPU, where polling would hold back the very peer it waits for.
    #[arg(long, default_value_t = 100, value_name = "MICROSECONDS")]
    pub poll_max_us: u64,
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
    /// Upstream proxy for the guest's plain HTTP (port 80, see --proxy-http-ports):
    /// http://[USER:PASS@]HOST[:PORT]. Requests are rewritten for the proxy, with
    /// credentials as Proxy-Authorization. Without any proxy option nothing is
    /// intercepted.
    #[arg(long, value_name = "URL")]
    pub http_proxy: Option<String>,
    /// Upstream proxy for the guest's TLS (port 443): tunnelled with CONNECT to the name
    /// in the ClientHello (SNI), or to the address without one.
    #[arg(long, value_name = "URL")]
    pub https_proxy: Option<String>,
    /// Destinations that go direct: names (and names under them), .domain, *.domain,
    /// addresses, CIDR blocks, or *; separated by commas.
    #[arg(long, value_name = "LIST")]
    pub no_proxy: Option<String>,
    /// Ports intercepted as HTTP (default 80).
    #[arg(long, value_name = "PORTS")]
    pub proxy_http_ports: Option<String>,
    /// Ports intercepted as TLS (default 443).
    #[arg(long, value_name = "PORTS")]
    pub proxy_https_ports: Option<String>,
    /// The gateway's explicit HTTP proxy port for guests that set http_proxy (default
    /// 3128 when a proxy is configured; 0 disables it; given alone it turns the explicit
    /// proxy on, going direct).
    #[arg(long, value_name = "PORT")]
    pub proxy_explicit_port: Option<u16>,
    /// Proxy settings from a JSON file (TOML when the name ends in .toml), re-read when it
    /// changes: http_proxy, https_proxy, no_proxy, http_ports, https_ports,
    /// explicit_port, head_limit. Fields it leaves out take the flags' values.
    #[arg(long, value_name = "FILE")]
    pub proxy_config: Option<PathBuf>,
    /// Seed for the stack's randomness (TCP sequence numbers, IP identifiers); default:
    /// fresh from the OS. A fixed seed makes a run reproducible.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub pcap: crate::pcap::PcapArgs,
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

/// The `nameserver`s of a resolv.conf text, in order.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// `ADDR[:PORT][,ADDR[:PORT]...]`: one group of servers asked in parallel.
fn parse_group(s: &str) -> Result<Vec<SocketAddr>, CliError> {
    s.split(',').map(|a| parse_dns(a.trim())).collect()
}

impl NetArgs {
    /// The gateway's DNS service these options describe (`None` with --no-dns).
    pub fn dns_config(
        &self,
        gateway: Ipv4Addr,
        host_alias: Option<Ipv4Addr>,
    ) -> Result<Option<DnsConfig>, CliError> {
        if self.no_dns {
            return Ok(None);
        }
        let mut d = DnsConfig::new(gateway.into(), host_alias.map(Into::into));
        d.upstream_groups = self
            .dns
            .iter()
            .map(|g| parse_group(g))
            .collect::<Result<_, _>>()?;
        if d.upstream_groups.is_empty() {
            // resolv.conf lists servers to try in turn: each is a group of its own.
            let text = std::fs::read_to_string(&self.resolv_conf).unwrap_or_default();
            d.upstream_groups = resolv_conf_nameservers(&text)
                .into_iter()
                .map(|a| vec![a])
                .collect();
        }
        for z in &self.dns_zone {
            let (zone, servers) = z
                .split_once('=')
                .ok_or_else(|| CliError(format!("--dns-zone {z:?} is not ZONE=ADDR[,ADDR...]")))?;
            d.zones
                .push((zone.trim().to_string(), parse_group(servers)?));
        }
        d.mode = if self.dns_mode == "system" {
            DnsMode::System
        } else {
            DnsMode::Forward
        };
        d.cache_entries = self.dns_cache;
        if self.dns_retransmit_ms == 0 || self.dns_timeout_ms < self.dns_retransmit_ms {
            return Err(CliError(
                "--dns-retransmit-ms must be at least 1 and at most --dns-timeout-ms".into(),
            ));
        }
        d.retransmit = usernet_core::Duration::from_millis(self.dns_retransmit_ms);
        d.timeout = usernet_core::Duration::from_millis(self.dns_timeout_ms);
        for n in &self.dns_name {
            let (name, addrs) = n
                .split_once('=')
                .ok_or_else(|| CliError(format!("--dns-name {n:?} is not NAME=IP[,IP...]")))?;
            let addrs: Vec<IpAddr> = addrs
                .split(',')
                .map(|a| {
                    a.trim()
                        .parse()
                        .map_err(|_| CliError(format!("--dns-name {n:?}: {a:?} is not an address")))
                })
                .collect::<Result<_, _>>()?;
            for a in addrs {
                if !d.static_names.insert(name.trim(), a) {
                    return Err(CliError(format!("--dns-name {n:?} is not a usable name")));
                }
            }
        }
        Ok(Some(d))
    }
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
        c.dns = self.dns_config(c.gateway, c.host_alias)?;
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
    /// The proxy settings of the flags (a --proxy-config file goes over them).
    pub fn proxy_settings(&self) -> crate::proxy::ProxySettings {
        use crate::proxy::Ports;
        crate::proxy::ProxySettings {
            http_proxy: self.http_proxy.clone(),
            https_proxy: self.https_proxy.clone(),
            no_proxy: self.no_proxy.clone().map(crate::proxy::NoProxy::Text),
            http_ports: self.proxy_http_ports.clone().map(Ports::Text),
            https_ports: self.proxy_https_ports.clone().map(Ports::Text),
            explicit_port: self.proxy_explicit_port,
            head_limit: None,
        }
    }

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
            Command::Run { net, .. }
            | Command::Tap { net, .. }
            | Command::Stream { net, .. }
            | Command::Serve { net, .. }
            | Command::Vpnkit { net, .. } => Some(net),
            Command::Ctl { .. } | Command::Guest(_) => None,
        }
    }
    pub fn default_mtu(&self) -> u16 {
        match self {
            Command::Run { .. } | Command::Tap { .. } | Command::Ctl { .. } => DEFAULT_TAP_MTU,
            Command::Stream { .. }
            | Command::Serve { .. }
            | Command::Vpnkit { .. }
            | Command::Guest(_) => DEFAULT_VM_MTU,
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
            CtlAction::Proxy { file: None } => ("GET", "/proxy", None),
            CtlAction::Proxy { file: Some(f) } => {
                let settings = crate::proxy::ProxySettings::load(f).map_err(CliError)?;
                (
                    "PUT",
                    "/proxy",
                    Some(serde_json::to_value(settings).map_err(|e| CliError(e.to_string()))?),
                )
            }
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
            CtlAction::Stats | CtlAction::Proxy { .. } => {
                serde_json::to_string_pretty(body).unwrap_or_default() + "\n"
            }
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
    fn started_as_vpnkit_takes_vpnkits_flags_and_defaults() {
        let argv = vpnkit_argv(
            [
                "/usr/local/bin/vpnkit",
                "--ethernet",
                "/run/x/vpnkit-ethernet.sock",
                "--mtu",
                "1500",
                "--host-ip",
                "0.0.0.0",
                "--port",
                "/tmp/port.sock",
                "--diagnostics",
                "/tmp/diag.sock",
                "--debug",
            ]
            .map(OsString::from)
            .to_vec(),
        );
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Vpnkit {
            net,
            ethernet,
            debug,
            ignored,
        } = &cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(ethernet, &PathBuf::from("/run/x/vpnkit-ethernet.sock"));
        assert!(debug);
        assert_eq!(
            ignored.given(),
            vec!["--port /tmp/port.sock", "--diagnostics /tmp/diag.sock"]
        );
        let c = net.config(cli.command.default_mtu()).unwrap();
        assert_eq!(c.subnet.to_string(), "192.168.65.0/24");
        assert_eq!(c.gateway, Ipv4Addr::new(192, 168, 65, 1));
        assert_eq!(
            c.host_alias, None,
            "--host-ip 0.0.0.0 disables the host alias"
        );
        assert_eq!(c.first_guest, Ipv4Addr::new(192, 168, 65, 3));
        assert_eq!(c.mtu, 1500);
        // Without the host-ip flag, the host is .2; `usernet vpnkit` works as well.
        let cli = Cli::try_parse_from(["usernet", "vpnkit", "--ethernet", "/e"]).unwrap();
        let c = cli.command.net().unwrap().config(1500).unwrap();
        assert_eq!(c.host_alias, Some(Ipv4Addr::new(192, 168, 65, 2)));
        // Another name is not vpnkit.
        let argv = vpnkit_argv(vec!["usernet".into(), "serve".into()]);
        assert_eq!(argv.len(), 2);
    }

    #[test]
    fn serve_takes_several_listeners() {
        let cli = Cli::try_parse_from([
            "usernet",
            "serve",
            "--listen",
            "unix:/tmp/q.sock",
            "--listen",
            "unix:/tmp/v.sock,framing=vmnet",
            "--listen",
            "unixgram:/tmp/g.sock",
            "--listen",
            "vsock:1024",
        ])
        .unwrap();
        let Command::Serve { listen, .. } = &cli.command else {
            panic!()
        };
        assert_eq!(listen.len(), 4);
        assert!(Cli::try_parse_from(["usernet", "serve"]).is_err());
        let e = Cli::try_parse_from(["usernet", "serve", "--listen", "tcp:1"]).unwrap_err();
        assert!(e.to_string().contains("unknown kind"), "{e}");
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
        let d = c.dns.expect("a DNS service");
        assert_eq!(
            d.upstream_groups,
            vec![vec!["127.0.0.1:5353".parse().unwrap()]]
        );
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
    fn resolv_conf_nameservers_in_order() {
        let t = "# comment\nsearch example\nnameserver 127.0.0.53\nnameserver 1.1.1.1\n";
        let want: Vec<SocketAddr> = vec![
            "127.0.0.53:53".parse().unwrap(),
            "1.1.1.1:53".parse().unwrap(),
        ];
        assert_eq!(resolv_conf_nameservers(t), want);
        assert_eq!(
            resolv_conf_nameservers("nameserver fe80::1%eth0"),
            vec!["[fe80::1]:53".parse().unwrap()]
        );
        assert!(resolv_conf_nameservers("").is_empty());
    }

    #[test]
    fn dns_options() {
        let cli = Cli::try_parse_from([
            "usernet",
            "tap",
            "--tap",
            "t",
            "--dns",
            "127.0.0.1:5301,127.0.0.2",
            "--dns",
            "127.0.0.3:5303",
            "--dns-zone",
            "corp.example=127.0.0.9:53",
            "--dns-name",
            "db.test=10.0.0.5,fd00::5",
            "--dns-mode",
            "system",
            "--dns-cache",
            "0",
        ])
        .unwrap();
        let net = cli.command.net().unwrap();
        let d = net
            .dns_config(Ipv4Addr::new(192, 168, 65, 1), None)
            .unwrap()
            .unwrap();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            d.upstream_groups,
            vec![
                vec![a("127.0.0.1:5301"), a("127.0.0.2:53")],
                vec![a("127.0.0.3:5303")]
            ]
        );
        assert_eq!(
            d.zones,
            vec![("corp.example".to_string(), vec![a("127.0.0.9:53")])]
        );
        assert_eq!(d.mode, DnsMode::System);
        assert_eq!(d.cache_entries, 0);
        assert_eq!(d.static_names.get("db.test").map(|v| v.len()), Some(2));
        // Upstreams from a resolv.conf-style file, each a group of its own.
        let dir = std::env::temp_dir().join(format!("usernet-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rc = dir.join("resolv.conf");
        std::fs::write(&rc, "nameserver 127.0.0.7\nnameserver 127.0.0.8\n").unwrap();
        let cli = Cli::try_parse_from([
            "usernet",
            "tap",
            "--tap",
            "t",
            "--resolv-conf",
            rc.to_str().unwrap(),
        ])
        .unwrap();
        let d = cli
            .command
            .net()
            .unwrap()
            .dns_config(Ipv4Addr::new(192, 168, 65, 1), None)
            .unwrap()
            .unwrap();
        assert_eq!(
            d.upstream_groups,
            vec![vec![a("127.0.0.7:53")], vec![a("127.0.0.8:53")]]
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(Cli::try_parse_from([
            "usernet", "tap", "--tap", "t", "--no-dns", "--dns", "1.1.1.1"
        ])
        .is_err());
        let cli =
            Cli::try_parse_from(["usernet", "tap", "--tap", "t", "--dns-name", "bad"]).unwrap();
        assert!(cli
            .command
            .net()
            .unwrap()
            .dns_config(Ipv4Addr::new(192, 168, 65, 1), None)
            .is_err());
    }
}
