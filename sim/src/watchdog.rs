//! A process-wide watchdog for sweeps and tests: a run that spins inside one turmoil step
//! never returns to the in-run watchdog, so a monitor thread prints the runs in flight
//! (scenario, seed, replay command) and aborts the process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs in flight by id: scenario, seed, start.
type InFlight = BTreeMap<u64, (String, u64, Instant)>;

#[derive(Clone)]
pub struct Watchdog {
    inner: Arc<Mutex<(u64, InFlight)>>,
}

pub struct Guard {
    wd: Watchdog,
    id: u64,
}

impl Watchdog {
    /// Start the monitor: a run older than `limit` aborts the process.
    pub fn new(limit: Duration) -> Self {
        let wd = Watchdog {
            inner: Arc::new(Mutex::new((0, BTreeMap::new()))),
        };
        let w = wd.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let g = w.inner.lock().expect("not poisoned");
            if g.1.values().any(|(_, _, t)| t.elapsed() > limit) {
                for (name, seed, t) in g.1.values() {
                    eprintln!(
                        "WATCHDOG: scenario {name} seed {seed} running for {:?} (limit {limit:?})\n  replay: cargo run -p sim --release -- run {name} --seed {seed}",
                        t.elapsed()
                    );
                }
                std::process::abort();
            }
        });
        wd
    }

    pub fn start(&self, scenario: &str, seed: u64) -> Guard {
        let mut g = self.inner.lock().expect("not poisoned");
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, (scenario.to_string(), seed, Instant::now()));
        Guard {
            wd: self.clone(),
            id,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.wd
            .inner
            .lock()
            .expect("not poisoned")
            .1
            .remove(&self.id);
    }
}
