//! The answer cache: bounded in entries and bytes, entries expire with their TTL.

use std::collections::BTreeMap;

use hickory_proto::op::Message;
use smoltcp::time::{Duration, Instant};

use super::raw::Question;

/// What an answer is cached under: the question plus the bits that change the answer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct CacheKey {
    pub question: Question,
    /// EDNS DO bit of the query (DNSSEC records wanted).
    pub dnssec_ok: bool,
    /// CD bit of the query (checking disabled).
    pub cd: bool,
}

struct Entry {
    msg: Message,
    stored: Instant,
    expires: Instant,
    seq: u64,
    size: usize,
}

pub(crate) struct Cache {
    max_entries: usize,
    max_bytes: usize,
    bytes: usize,
    seq: u64,
    map: BTreeMap<CacheKey, Entry>,
    by_expiry: BTreeMap<(Instant, u64), CacheKey>,
}

impl Cache {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Cache {
            max_entries,
            max_bytes,
            bytes: 0,
            seq: 0,
            map: BTreeMap::new(),
            by_expiry: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.by_expiry.clear();
        self.bytes = 0;
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(e) = self.map.remove(key) {
            self.by_expiry.remove(&(e.expires, e.seq));
            self.bytes -= e.size;
        }
    }

    /// Drop every entry that has expired by `now`; how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some((&(t, _), _)) = self.by_expiry.first_key_value() {
            if t > now {
                break;
            }
            let (_, key) = self.by_expiry.pop_first().expect("non-empty");
            if let Some(e) = self.map.remove(&key) {
                self.bytes -= e.size;
            }
            n += 1;
        }
        n
    }

    /// The cached answer and how many whole seconds it has been in the cache.
    pub fn get(&mut self, key: &CacheKey, now: Instant) -> Option<(&Message, u32)> {
        let e = self.map.get(key)?;
        if e.expires <= now {
            self.remove(key);
            return None;
        }
        let e = self.map.get(key)?;
        let age = (now.total_millis() - e.stored.total_millis()).max(0) / 1000;
        Some((&e.msg, u32::try_from(age).unwrap_or(u32::MAX)))
    }

    /// Cache `msg` for `ttl` seconds; `size` is its wire size (what the byte budget counts).
    /// Returns how many entries were evicted to make room, `None` if it was not cached.
    pub fn insert(
        &mut self,
        key: CacheKey,
        msg: Message,
        size: usize,
        ttl: u32,
        now: Instant,
    ) -> Option<usize> {
        if self.max_entries == 0 || ttl == 0 || size > self.max_bytes {
            return None;
        }
        self.remove(&key);
        let mut evicted = 0;
        while self.map.len() >= self.max_entries || self.bytes + size > self.max_bytes {
            // The entry closest to expiry goes first.
            let Some((_, k)) = self.by_expiry.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&k) {
                self.bytes -= e.size;
            }
            evicted += 1;
        }
        self.seq += 1;
        let expires = now + Duration::from_secs(u64::from(ttl));
        self.by_expiry.insert((expires, self.seq), key.clone());
        self.bytes += size;
        self.map.insert(
            key,
            Entry {
                msg,
                stored: now,
                expires,
                seq: self.seq,
                size,
            },
        );
        Some(evicted)
    }
}
