//! Every random choice of a run comes from ChaCha streams derived from the one seed, one
//! stream per purpose, so that adding draws for one purpose never shifts another's.

use rand_chacha::rand_core::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The stream named `purpose` of `seed`.
pub fn stream(seed: u64, purpose: &str) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(splitmix(seed ^ splitmix(fnv1a(purpose.as_bytes()))))
}

/// A u64 derived from `seed` for `purpose` (e.g. turmoil's own seed).
pub fn derive(seed: u64, purpose: &str) -> u64 {
    splitmix(seed ^ splitmix(fnv1a(purpose.as_bytes())))
}

/// Draw helpers on a ChaCha stream.
pub struct Draw(pub ChaCha8Rng);

impl Draw {
    pub fn new(seed: u64, purpose: &str) -> Self {
        Draw(stream(seed, purpose))
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
    pub fn range_f(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    /// Uniform integer in [lo, hi].
    pub fn range_u(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.0.next_u64() % (hi - lo + 1)
    }
    pub fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}

/// A deterministic byte pattern keyed by a seed: what the bulk source sends and what the
/// guest checks, byte by byte, in order.
#[derive(Clone)]
pub struct Pattern {
    state: u64,
    buf: [u8; 8],
    pos: usize,
}

impl Pattern {
    pub fn new(key: u64) -> Self {
        Pattern {
            state: splitmix(key),
            buf: [0; 8],
            pos: 8,
        }
    }
    pub fn next_byte(&mut self) -> u8 {
        if self.pos == 8 {
            self.state = splitmix(self.state);
            self.buf = self.state.to_le_bytes();
            self.pos = 0;
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        b
    }
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.next_byte();
        }
    }
    /// Compare `data` with the next bytes of the pattern; the offset of the first mismatch.
    pub fn check(&mut self, data: &[u8]) -> Option<usize> {
        data.iter().position(|b| *b != self.next_byte())
    }
}

/// FNV-1a, fed incrementally.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn write_u64(&mut self, v: u64) {
        self.write(&v.to_le_bytes());
    }
}
