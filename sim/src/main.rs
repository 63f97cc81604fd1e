//! `sim run SCENARIO --seed S [--trace]` and `sim sweep SCENARIO --seeds N`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use sim::{Mutation, RunOptions, Scenario};

#[derive(Parser)]
#[command(about = "usernet's deterministic simulator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario with one seed; the last line is the trace hash.
    Run {
        scenario: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print a readable event log.
        #[arg(long)]
        trace: bool,
        /// Print the summary (what the snapshots hold).
        #[arg(long)]
        summary: bool,
        /// Switch on a deliberately broken behaviour (drop-byte, ignore-fin, skip-cleanup, guest-vanishes, panic).
        #[arg(long, default_value = "none")]
        mutation: Mutation,
    },
    /// Run seeds 1..=N (or from --first); print failing seeds, then a line of figures.
    Sweep {
        scenario: String,
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        #[arg(long, default_value_t = 1)]
        first: u64,
        /// Worker threads (default: available cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Run every seed twice and compare trace hashes.
        #[arg(long)]
        twice: bool,
    },
    /// List the scenarios.
    List,
}

fn main() -> ExitCode {
    #[cfg(feature = "smoltcp-log")]
    if std::env::var_os("SIM_LOG").is_some() {
        init_log();
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::List => {
            for n in Scenario::all_names() {
                let d = Scenario::load(&n)
                    .map(|s| s.description)
                    .unwrap_or_else(|e| e);
                println!("{n:24} {d}");
            }
            ExitCode::SUCCESS
        }
        Cmd::Run {
            scenario,
            seed,
            trace,
            summary,
            mutation,
        } => {
            let sc = match Scenario::load(&scenario) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let r = sim::run(
                &sc,
                seed,
                RunOptions {
                    trace_log: trace,
                    mutation,
                },
            );
            for l in &r.log {
                println!("{l}");
            }
            if summary || trace {
                print!("{}", r.summary);
            }
            if !r.ok() {
                print!("{}", r.failure_text());
            }
            println!(
                "simulated {:.3}s in {:.3}s wall ({:.0}x), {} trace events",
                r.sim_time.as_secs_f64(),
                r.wall_time.as_secs_f64(),
                r.sim_time.as_secs_f64() / r.wall_time.as_secs_f64().max(1e-9),
                r.trace_events
            );
            println!("trace {:016x}", r.trace_hash);
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Sweep {
            scenario,
            seeds,
            first,
            jobs,
            twice,
        } => {
            let sc = match Scenario::load(&scenario) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let jobs = jobs
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                .max(1);
            let start = Instant::now();
            let next = std::sync::atomic::AtomicU64::new(first);
            let end = first + seeds;
            let results = std::sync::Mutex::new(Vec::new());
            let wd = sim::watchdog::Watchdog::new(Duration::from_secs(300));
            std::thread::scope(|s| {
                for _ in 0..jobs {
                    s.spawn(|| loop {
                        let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if seed >= end {
                            break;
                        }
                        let _guard = wd.start(&sc.name, seed);
                        let mut r = sim::run(&sc, seed, RunOptions::default());
                        if twice {
                            let again = sim::run(&sc, seed, RunOptions::default());
                            if again.trace_hash != r.trace_hash {
                                r.failures.push(format!(
                                    "determinism: trace {:016x} then {:016x}",
                                    r.trace_hash, again.trace_hash
                                ));
                            }
                        }
                        if !r.ok() {
                            print!("{}", r.failure_text());
                        }
                        results
                            .lock()
                            .expect("not poisoned")
                            .push((seed, r.ok(), r.sim_time));
                    });
                }
            });
            let wall = start.elapsed();
            let results = results.into_inner().expect("not poisoned");
            let mut failing: Vec<u64> = results.iter().filter(|r| !r.1).map(|r| r.0).collect();
            failing.sort_unstable();
            let sim_total: Duration = results.iter().map(|r| r.2).sum();
            if !failing.is_empty() {
                println!("failing seeds: {failing:?}");
            }
            println!(
                "seeds {} failures {} seeds/s {:.1} sim/wall {:.0}x",
                results.len(),
                failing.len(),
                results.len() as f64 / wall.as_secs_f64(),
                sim_total.as_secs_f64() / wall.as_secs_f64()
            );
            if failing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(feature = "smoltcp-log")]
struct StderrLog;

#[cfg(feature = "smoltcp-log")]
impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        eprintln!("{} {}", r.target(), r.args());
    }
    fn flush(&self) {}
}

#[cfg(feature = "smoltcp-log")]
fn init_log() {
    let _ = log::set_logger(&StderrLog);
    log::set_max_level(log::LevelFilter::Debug);
}
