//! `cargo test -p sim`: every scenario over a fixed seed set plus every kept regression
//! seed (each run twice: same trace hash), the mutations that prove the oracles can fail,
//! and one insta snapshot per scenario.

use std::sync::Mutex;

use sim::{Mutation, RunOptions, Scenario};

/// Seeds 1..=SEEDS run for every scenario.
const SEEDS: u64 = 6;

/// Run `f` over `items` on every core; collect what it returns.
fn parallel<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let items = Mutex::new(items.into_iter().enumerate().collect::<Vec<_>>());
    let out = Mutex::new(Vec::new());
    let n = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| loop {
                let Some((i, item)) = items.lock().unwrap().pop() else {
                    break;
                };
                let r = f(item);
                out.lock().unwrap().push((i, r));
            });
        }
    });
    let mut out = out.into_inner().unwrap();
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

fn scenarios() -> Vec<Scenario> {
    let names = Scenario::all_names();
    assert!(names.len() >= 12, "scenarios/ is missing cases: {names:?}");
    names
        .iter()
        .map(|n| Scenario::load(n).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

#[test]
fn every_scenario_fixed_seeds_and_kept_regressions_twice() {
    let scs = scenarios();
    let mut runs = Vec::new();
    for sc in &scs {
        let mut seeds: Vec<u64> = if sc.expect_failure.is_some() {
            Vec::new()
        } else {
            (1..=SEEDS).collect()
        };
        seeds.extend(&sc.regression_seeds);
        seeds.sort_unstable();
        seeds.dedup();
        for s in seeds {
            runs.push((sc, s));
        }
    }
    let total = runs.len();
    let wd = sim::watchdog::Watchdog::new(std::time::Duration::from_secs(300));
    let failures: Vec<String> = parallel(runs, |(sc, seed)| {
        let _guard = wd.start(&sc.name, seed);
        let a = sim::run(sc, seed, RunOptions::default());
        let b = sim::run(sc, seed, RunOptions::default());
        let mut r = a;
        if r.trace_hash != b.trace_hash {
            r.failures.push(format!(
                "determinism: trace {:016x} then {:016x}",
                r.trace_hash, b.trace_hash
            ));
        }
        match &sc.expect_failure {
            Some(want) if r.failures.iter().any(|f| f.contains(want.as_str())) => None,
            Some(want) => Some(format!(
                "{} seed {seed}: expected a failure containing {want:?}, got:\n{}",
                sc.name,
                r.failure_text()
            )),
            None => (!r.ok()).then(|| r.failure_text()),
        }
    })
    .into_iter()
    .flatten()
    .collect();
    eprintln!("{total} runs (each twice), {} failed", failures.len());
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn mutations_make_the_oracles_fail() {
    let cases = [
        (
            "bulk_download",
            Mutation::RelayDropsByte,
            "safety: byte 1000 differs",
        ),
        ("bulk_download", Mutation::RelayIgnoresFin, "liveness"),
        ("udp_loss", Mutation::SkipCleanup, "leak"),
        ("bulk_download", Mutation::GuestVanishes, "leak"),
        ("bulk_download", Mutation::Panic, "panic"),
        (
            "forward_udp",
            Mutation::UdpTwice,
            "safety: UDP forwards: the clients got",
        ),
    ];
    let results = parallel(cases.to_vec(), |(name, m, want)| {
        let sc = Scenario::load(name).unwrap();
        let r = sim::run(
            &sc,
            1,
            RunOptions {
                trace_log: false,
                mutation: m,
            },
        );
        (name, m, want, r)
    });
    for (name, m, want, r) in results {
        assert!(!r.ok(), "{name} with {m:?} passed: the oracles missed it");
        assert!(
            r.failures.iter().any(|f| f.contains(want)),
            "{name} with {m:?}: no {want:?} failure in {:?}",
            r.failures
        );
        let text = r.failure_text();
        assert!(text.contains(&format!("scenario {name} seed 1")), "{text}");
        assert!(
            text.contains(&format!(
                "cargo run -p sim --release -- run {name} --seed 1"
            )),
            "{text}"
        );
        assert!(text.contains("faults: "), "{text}");
    }
}

#[test]
fn snapshots() {
    let scs = scenarios();
    let runs = parallel(scs.iter().collect(), |sc| {
        (sc, sim::run(sc, sc.snapshot_seed, RunOptions::default()))
    });
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    let mut bad = Vec::new();
    for (sc, r) in runs {
        settings.set_description(sc.description.clone());
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            settings.bind(|| insta::assert_snapshot!(sc.name.clone(), r.summary));
        }));
        if res.is_err() {
            bad.push(sc.name.clone());
        }
        assert!(
            r.ok() || sc.expect_failure.is_some(),
            "{}",
            r.failure_text()
        );
    }
    assert!(
        bad.is_empty(),
        "snapshots changed: {bad:?} (review with `cargo insta review`)"
    );
}
