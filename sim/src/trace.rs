//! The trace of a run: a hash over every link and workload event (FNV-1a, fixed: never
//! std's RandomState) and, on request, a readable log of the same events.

use crate::rng::Fnv;

#[derive(Default)]
pub struct Trace {
    hash: Fnv,
    pub events: u64,
    log: Option<Vec<String>>,
}

impl Trace {
    pub fn new(keep_log: bool) -> Self {
        Trace {
            hash: Fnv::default(),
            events: 0,
            log: keep_log.then(Vec::new),
        }
    }

    pub fn hash(&self) -> u64 {
        self.hash.0
    }

    pub fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// Record an event at `t_us`: its kind, a number and some bytes (a frame).
    pub fn event(&mut self, t_us: u64, kind: &str, n: u64, bytes: &[u8]) {
        self.events += 1;
        self.hash.write_u64(t_us);
        self.hash.write(kind.as_bytes());
        self.hash.write_u64(n);
        self.hash.write_u64(bytes.len() as u64);
        self.hash.write(bytes);
    }

    /// Append a readable line (only when logging; build it lazily).
    pub fn log(&mut self, t_us: u64, line: impl FnOnce() -> String) {
        if let Some(log) = &mut self.log {
            log.push(format!("{:>10.6} {}", t_us as f64 / 1e6, line()));
        }
    }

    pub fn take_log(&mut self) -> Vec<String> {
        self.log.take().unwrap_or_default()
    }
}
