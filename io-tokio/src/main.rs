//! The `usernet` daemon.

use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use rand_chacha::rand_core::SeedableRng;
use usernet::api;
use usernet::cli::{Cli, CliError, Command, CtlAction, NetArgs};
use usernet::driver::ForwardLimits;
use usernet::listen::{ListenOptions, ListenSpec, StreamFraming};
use usernet::netns::{spawn_in_new_netns, NetnsSetup};
use usernet::stream::{self, StreamTransport};
use usernet::tap::{open_tap, TapTransport};
use usernet::vswitch::VirtualSwitch;
use usernet::{Driver, FrameTransport, TokioNet};
use usernet_core::SwitchConfig;
use usernet_core::{Config, Rng, Stack};

fn main() -> ExitCode {
    // Every TCP flow allocates its two ring buffers zeroed. With a fixed mmap threshold
    // glibc serves them as fresh zero pages (touched only as far as data fills them)
    // instead of recycling heap memory it must clear first: that clearing was a fifth of
    // the CPU time of connection-heavy loads.
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    let cli = Cli::parse_from(usernet::cli::vpnkit_argv(std::env::args_os().collect()));
    if let Command::Ctl { api, action } = &cli.command {
        return ctl(api, action);
    }
    let verbose = match &cli.command {
        Command::Vpnkit { debug: true, .. } => cli.verbose.max(1),
        _ => cli.verbose,
    };
    let default_level = match verbose {
        // `run` is a wrapper around a command: it stays quiet unless something is wrong.
        0 if matches!(cli.command, Command::Run { .. }) => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("usernet: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The loop runs as a spawned task rather than as the runtime's main future: a task
    // woken by an I/O event on the runtime's own thread is queued locally, while waking
    // the main future always costs an eventfd write (one syscall per host event).
    match runtime.block_on(async { tokio::spawn(serve(cli.command)).await }) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("usernet: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("usernet: internal error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `usernet ctl`: one request to the daemon's API; the answer printed plainly.
fn ctl(path: &std::path::Path, action: &CtlAction) -> ExitCode {
    let fail = |m: String| {
        eprintln!("usernet: {m}");
        ExitCode::FAILURE
    };
    let (method, uri, body) = match action.request() {
        Ok(r) => r,
        Err(e) => return fail(e.0),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let r = runtime.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            api::call(path, method, uri, body.as_ref()),
        )
        .await
    });
    match r {
        Err(_) => fail(format!(
            "{}: the daemon did not answer within 30 s",
            path.display()
        )),
        Ok(Err(e)) => fail(format!("{}: {e}", path.display())),
        Ok(Ok((200, value))) => {
            print!("{}", action.render(&value));
            ExitCode::SUCCESS
        }
        Ok(Ok((status, value))) => match value["message"].as_str() {
            Some(m) => fail(m.to_string()),
            None => fail(format!("the daemon answered {status}: {value}")),
        },
    }
}

/// Removes the API socket when the daemon stops.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The driver with the port forwards of `-p` bound (any failure is fatal, as in Docker)
/// and the control API listening when `--api` asks for it.
async fn new_driver(
    net: &NetArgs,
    default_guest: Option<std::net::Ipv4Addr>,
) -> Result<(Driver<TokioNet>, Option<RemoveOnDrop>), CliError> {
    let mut driver = Driver::new(TokioNet);
    driver.set_listen_backlog(net.listen_backlog);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus > 1 {
        driver.set_poll_max(std::time::Duration::from_micros(net.poll_max_us));
    }
    driver.set_proxy_settings(net.proxy_settings(), net.proxy_config.clone());
    if let Some(path) = &net.hosts {
        driver.set_hosts_file(path.clone());
    }
    driver.set_forward_limits(ForwardLimits {
        per_forward: net.forward_max_connections,
        total: net.forward_max_total,
    });
    driver.set_default_guest(default_guest);
    if let Some(p) = net.pcap.open().map_err(|e| CliError(e.to_string()))? {
        driver.set_pcap(p);
    }
    for f in net.forwards() {
        driver
            .expose(f)
            .await
            .map_err(|e| CliError(format!("{e} (forward {f})")))?;
    }
    let guard = match &net.api {
        Some(path) => {
            let listener = api::bind(path).map_err(|e| {
                CliError(format!(
                    "cannot create the API socket {}: {e}",
                    path.display()
                ))
            })?;
            let guard = RemoveOnDrop(path.clone());
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(api::serve(listener, tx));
            driver.set_control(rx);
            tracing::info!(path = %path.display(), "control API listening");
            Some(guard)
        }
        None => None,
    };
    Ok((driver, guard))
}

fn seed(fixed: Option<u64>) -> u64 {
    fixed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        // The daemon (not the core) may use the OS's randomness.
        if std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .is_err()
        {
            b = (std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes();
        }
        u64::from_le_bytes(b)
    })
}

fn new_stack(config: Config, seed: u64, driver: &Driver<TokioNet>) -> Result<Stack, CliError> {
    Stack::new(config, Rng::seed_from_u64(seed), driver.now())
        .map_err(|e| CliError(format!("bad configuration: {e}")))
}

/// Resolves on SIGINT or SIGTERM.
async fn terminated() {
    // The signals are awaited in a task of their own and handed over by a oneshot: the
    // driver polls its stop future only when that future's waker fired, and one atomic
    // load is all such a poll costs.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tx.send(());
    });
    let _ = rx.await;
}

async fn serve_transport<T: FrameTransport>(
    mut driver: Driver<TokioNet>,
    config: Config,
    seed: u64,
    transport: &mut T,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), CliError> {
    let mut stack = new_stack(config, seed, &driver)?;
    driver
        .load_proxy(&mut stack)
        .await
        .map_err(|e| CliError(format!("proxy settings: {e}")))?;
    let r = driver.run(&mut stack, transport, stop).await;
    tracing::info!(stats = ?stack.stats(), driver = ?driver.stats, "stopped");
    r.map_err(|e| CliError(format!("guest link failed: {e}")))
}

/// Every listener's connections as ports of one virtual switch.
async fn serve_switch(
    net: &NetArgs,
    config: Config,
    seed: u64,
    listen: &[ListenSpec],
) -> Result<(), CliError> {
    let (ports, mut switch) = VirtualSwitch::channel(SwitchConfig::new(config.gateway_mac));
    let opts = ListenOptions {
        backlog: net.listen_backlog,
        mtu: config.mtu,
    };
    for spec in listen {
        usernet::listen::start(spec, opts, ports.clone())
            .await
            .map_err(|e| CliError(format!("--listen {spec}: {e}")))?;
    }
    // The listener tasks hold their senders: the switch ends when they are all gone
    // and no guest is left (a lone stdio guest closing its end stops the daemon).
    drop(ports);
    let (driver, _api) = new_driver(net, None).await?;
    if let Some(p) = driver.pcap() {
        switch.set_pcap(p.clone());
    }
    serve_transport(driver, config, seed, &mut switch, terminated()).await
}

async fn serve(command: Command) -> Result<ExitCode, CliError> {
    if let Command::Guest(args) = command {
        usernet::guest::serve(args, terminated())
            .await
            .map_err(CliError)?;
        return Ok(ExitCode::SUCCESS);
    }
    let net = command
        .net()
        .ok_or_else(|| CliError("not a transport".into()))?
        .clone();
    let config = net.config(command.default_mtu())?;
    let seed = seed(net.seed);
    tracing::info!(
        subnet = %config.subnet, gateway = %config.gateway, host_alias = ?config.host_alias,
        mtu = config.mtu, dns = ?config.dns.as_ref().map(|d| &d.upstream_groups), "usernet starting"
    );
    match command {
        Command::Tap { netns, tap, .. } => {
            let fd = open_tap(netns.as_deref(), &tap).map_err(|e| CliError(e.to_string()))?;
            let mut transport =
                TapTransport::new(fd).map_err(|e| CliError(format!("tap {tap}: {e}")))?;
            let (driver, _api) = new_driver(&net, None).await?;
            serve_transport(driver, config, seed, &mut transport, terminated()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stream { socket, .. } => {
            let listener = stream::bind(&socket, net.listen_backlog)
                .map_err(|e| CliError(format!("cannot listen on {}: {e}", socket.display())))?;
            tracing::info!(path = %socket.display(), "waiting for a VMM (-netdev stream)");
            let mut transport = StreamTransport::new(listener);
            let (driver, _api) = new_driver(&net, None).await?;
            serve_transport(driver, config, seed, &mut transport, terminated()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl { .. } | Command::Guest(_) => Err(CliError("not a daemon subcommand".into())),
        Command::Serve { listen, .. } => {
            serve_switch(&net, config, seed, &listen).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Vpnkit {
            ethernet, ignored, ..
        } => {
            for flag in ignored.given() {
                tracing::info!("vpnkit compatibility: ignoring {flag}");
            }
            let spec = ListenSpec::Unix {
                path: ethernet,
                framing: StreamFraming::Vmnet,
            };
            serve_switch(&net, config, seed, &[spec]).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            tap,
            no_configure,
            cmd,
            ..
        } => {
            let setup = NetnsSetup {
                tap_name: tap.clone(),
                mtu: u32::from(config.mtu),
                guest_addr: (!no_configure)
                    .then_some((config.first_guest, config.subnet.prefix_len())),
                gateway: (!no_configure).then_some(config.gateway),
            };
            // Forwards and the API first: a port that cannot be bound stops usernet before
            // the command runs.
            let (driver, _api) =
                new_driver(&net, (!no_configure).then_some(config.first_guest)).await?;
            let mut sandbox =
                spawn_in_new_netns(&setup, &cmd).map_err(|e| CliError(e.to_string()))?;
            let fd = sandbox
                .take_tap()
                .ok_or_else(|| CliError("the namespace did not hand over its tap".into()))?;
            let mut transport =
                TapTransport::new(fd).map_err(|e| CliError(format!("tap {tap}: {e}")))?;
            let mut status = None;
            let child = async {
                tokio::select! {
                    s = sandbox.wait() => status = Some(s),
                    _ = terminated() => {}
                }
            };
            serve_transport(driver, config, seed, &mut transport, child).await?;
            match status {
                Some(Ok(s)) => {
                    use std::os::unix::process::ExitStatusExt;
                    let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
                    Ok(ExitCode::from(code as u8))
                }
                Some(Err(e)) => Err(CliError(format!("cannot wait for the command: {e}"))),
                None => {
                    let _ = sandbox.kill();
                    Ok(ExitCode::from(130))
                }
            }
        }
    }
}
