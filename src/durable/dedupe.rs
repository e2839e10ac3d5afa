//! The dedupe table: the reply given to each applied write, by request id, so that a request the
//! proxy re-sends after a failover is answered instead of applied twice.
//!
//! Bounded by entries and by bytes (`max_dedupe_entries`, `max_dedupe_bytes`): the proxy's
//! watermark normally keeps it small; when a limit is reached anyway the oldest entries go first
//! (with a warning: a request re-sent after that could be applied a second time). The newest entry
//! is always kept, so one reply larger than the byte limit is still remembered.
//!
//! A table can be far larger than one frame (a million replies, or a few large DELETE answers), so
//! it travels to a new backup, into the log and into snapshots in chunks of about
//! [`DEDUPE_CHUNK_BYTES`] (one entry per chunk when a reply is larger).

use std::collections::BTreeMap;

use crate::wire::node::Reply;

/// Target size of one chunk of dedupe entries in a frame or record (estimated by
/// [`Reply::mem_bytes`], which is at least the reply's encoded size).
pub const DEDUPE_CHUNK_BYTES: usize = 1 << 20;

/// Bounds of a dedupe table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupeLimits {
    pub entries: usize,
    pub bytes: usize,
}

impl DedupeLimits {
    /// No bound (for reading positions only).
    pub const UNBOUNDED: DedupeLimits = DedupeLimits {
        entries: usize::MAX,
        bytes: usize::MAX,
    };
}

/// Memory one entry takes besides its reply's own (key, map slot).
const ENTRY_OVERHEAD: usize = 64;

fn entry_bytes(r: &Reply) -> usize {
    ENTRY_OVERHEAD + r.mem_bytes()
}

/// Request id -> reply, bounded; see the module documentation.
#[derive(Debug, Clone)]
pub struct Dedupe {
    map: BTreeMap<u64, Reply>,
    bytes: usize,
    limits: DedupeLimits,
    /// Entries dropped by a limit (not by the watermark) since the table was made.
    evicted: u64,
}

impl Dedupe {
    pub fn new(limits: DedupeLimits) -> Dedupe {
        Dedupe {
            map: BTreeMap::new(),
            bytes: 0,
            limits,
            evicted: 0,
        }
    }

    /// A table holding `entries` (trimmed to the limits, oldest first).
    pub fn from_entries(entries: Vec<(u64, Reply)>, limits: DedupeLimits) -> Dedupe {
        let mut d = Dedupe::new(limits);
        d.extend(entries);
        d
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Estimated memory held by the entries.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries dropped by a limit so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    pub fn get(&self, rid: u64) -> Option<&Reply> {
        self.map.get(&rid)
    }

    /// Remembers `reply` for `rid`; returns how many older entries a limit pushed out.
    pub fn insert(&mut self, rid: u64, reply: Reply) -> usize {
        self.bytes += entry_bytes(&reply);
        if let Some(old) = self.map.insert(rid, reply) {
            self.bytes -= entry_bytes(&old);
        }
        self.trim()
    }

    pub fn extend(&mut self, entries: impl IntoIterator<Item = (u64, Reply)>) -> usize {
        let mut n = 0;
        for (rid, reply) in entries {
            n += self.insert(rid, reply);
        }
        n
    }

    fn trim(&mut self) -> usize {
        let mut n = 0;
        while self.map.len() > 1
            && (self.map.len() > self.limits.entries || self.bytes > self.limits.bytes)
        {
            if let Some((_, r)) = self.map.pop_first() {
                self.bytes -= entry_bytes(&r);
                n += 1;
            }
        }
        self.evicted += n as u64;
        n
    }

    /// Forgets every entry below `watermark` (the proxy answered them all).
    pub fn trim_below(&mut self, watermark: u64) {
        let keep = self.map.split_off(&watermark);
        let gone = std::mem::replace(&mut self.map, keep);
        for r in gone.values() {
            self.bytes -= entry_bytes(r);
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    /// The entries, oldest first.
    pub fn to_vec(&self) -> Vec<(u64, Reply)> {
        self.map.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    pub fn into_vec(self) -> Vec<(u64, Reply)> {
        self.map.into_iter().collect()
    }
}

/// Splits `entries` into chunks of about `chunk_bytes` each (a chunk holds at least one entry).
pub fn chunks(entries: Vec<(u64, Reply)>, chunk_bytes: usize) -> Vec<Vec<(u64, Reply)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0;
    for e in entries {
        let b = entry_bytes(&e.1);
        if !cur.is_empty() && size + b > chunk_bytes {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += b;
        cur.push(e);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::Pair;

    fn big(n: usize) -> Reply {
        Reply::Pairs {
            pairs: (0..n)
                .map(|i| Pair::new(format!("k,{i}"), "v".repeat(100)))
                .collect(),
            message: None,
        }
    }

    #[test]
    fn bounded_by_entries_and_bytes_oldest_first() {
        let mut d = Dedupe::new(DedupeLimits {
            entries: 3,
            bytes: usize::MAX,
        });
        for rid in 0..5 {
            d.insert(rid, Reply::Rejected(vec![]));
        }
        assert_eq!(d.len(), 3);
        assert!(d.get(1).is_none() && d.get(2).is_some());
        assert_eq!(d.evicted(), 2);

        let one = entry_bytes(&big(100));
        let mut d = Dedupe::new(DedupeLimits {
            entries: 1000,
            bytes: 3 * one,
        });
        for rid in 0..10 {
            d.insert(rid, big(100));
            assert!(d.bytes() <= 3 * one, "{} > {}", d.bytes(), 3 * one);
        }
        assert_eq!(d.len(), 3);
        assert!(d.get(6).is_none() && d.get(7).is_some() && d.get(9).is_some());
        // The newest entry stays even when it alone passes the limit.
        d.insert(10, big(1000));
        assert_eq!(d.len(), 1);
        assert!(d.get(10).is_some());
        // Watermark and clear keep the byte count right.
        d.insert(11, big(1));
        d.trim_below(11);
        assert_eq!(d.len(), 1);
        assert_eq!(d.bytes(), entry_bytes(&big(1)));
        d.clear();
        assert_eq!(d.bytes(), 0);
        // Replacing an entry does not count it twice.
        d.insert(1, big(10));
        d.insert(1, big(10));
        assert_eq!(d.bytes(), entry_bytes(&big(10)));
    }

    #[test]
    fn chunks_fit_the_target_and_keep_order() {
        let entries: Vec<(u64, Reply)> = (0..100).map(|i| (i, big(50))).collect();
        let one = entry_bytes(&big(50));
        let cs = chunks(entries.clone(), 10 * one);
        assert_eq!(cs.len(), 10);
        assert!(cs.iter().all(|c| c.len() == 10));
        assert_eq!(cs.concat(), entries);
        // Each chunk's encoding fits the target.
        for c in &cs {
            assert!(crate::wire::frame::encode(c).len() <= 10 * one);
        }
        // An entry larger than the target travels alone.
        let cs = chunks(vec![(1, big(10)), (2, big(10_000)), (3, big(10))], 4 * one);
        assert_eq!(cs.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
        assert!(chunks(vec![], 10).is_empty());
    }
}
