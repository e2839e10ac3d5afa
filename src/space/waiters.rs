//! Requests waiting for a match (PROTOCOL.md §4a: `wait_ms` on GET and DELETE), sans-IO.
//!
//! A primary's store registers a GET or DELETE here when nothing in the space matches it. Inputs:
//! the pairs each PUT or POST wrote, the clock, cancellations; outputs: [`Action`]s the store
//! carries out (answer a read, remove and answer a take as a logged, replicated write, answer a
//! timeout or a cancellation). No clock, no I/O: time comes in as milliseconds.
//!
//! Invariant kept by the caller: a registered waiter matches nothing in the space. So when a write
//! lands, only the pairs it wrote can satisfy a waiter, and the waiter's answer is its first
//! `limit` matches among them (ascending by key). Waiters are served in the order they started
//! waiting; a take removes its pairs from what later waiters of the same write can have, so two
//! takes never get the same pair.
//!
//! Index: a waiter whose key pattern allows only keys with a literal prefix (or a few exact keys,
//! [`IndexHint`]) is filed under that text; a write looks up, for each key it wrote, that key's
//! prefixes of the lengths in use, so a PUT costs the same whether 0 or 10,000 such waiters wait.
//! Waiters without a usable prefix are in a list every write tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{IndexHint, Pair, Pattern};

/// Milliseconds on the caller's clock.
pub type Millis = u64;

/// Bounds on waiting requests (`max_waiters`, `max_waiters_per_connection`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaiterLimits {
    pub total: usize,
    pub per_client: usize,
}

/// A request that waits.
#[derive(Clone, Debug)]
pub struct Waiter {
    pub rid: u64,
    /// The client connection it came from.
    pub client: u64,
    /// A DELETE (it removes what it gets) rather than a GET.
    pub take: bool,
    pub key: Pattern,
    pub value: Pattern,
    /// At most this many pairs.
    pub limit: usize,
    pub deadline: Millis,
}

/// Why a waiter was not registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `max_waiters` requests wait already.
    Full { limit: usize },
    /// The connection has `max_waiters_per_connection` waiting already.
    ClientFull { limit: usize },
    /// This request id waits already (a re-sent request): the first registration answers it.
    Duplicate,
}

/// What the store must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Answer the GET `rid` with these pairs (ascending).
    Read { rid: u64, pairs: Vec<Pair> },
    /// Remove these pairs (ascending) for the DELETE `rid` and answer them: a write like any
    /// DELETE (logged, replicated, in the dedupe table).
    Take { rid: u64, pairs: Vec<Pair> },
    /// `rid` waited its time: answer `ok`, no pairs, saying so; nothing changed.
    TimedOut { rid: u64 },
    /// `rid` was cancelled (its stream or connection closed): answer it empty; nothing changed.
    Cancelled { rid: u64 },
}

#[derive(Debug)]
struct Entry {
    waiter: Waiter,
    /// Texts it is filed under (empty: in the unindexed list).
    prefixes: Vec<String>,
}

/// The waiting requests of one primary.
#[derive(Debug)]
pub struct Waiters {
    limits: WaiterLimits,
    /// Order of arrival, the key of every other table.
    next: u64,
    entries: BTreeMap<u64, Entry>,
    by_rid: HashMap<u64, u64>,
    by_prefix: HashMap<String, BTreeSet<u64>>,
    /// Prefix lengths in use (bytes) and how many texts of that length `by_prefix` holds.
    prefix_lens: BTreeMap<usize, usize>,
    unindexed: BTreeSet<u64>,
    deadlines: BTreeSet<(Millis, u64)>,
    by_client: HashMap<u64, BTreeSet<u64>>,
}

/// The texts a key pattern's matches must start with, or none if it has no useful bound.
fn prefixes_of(key: &Pattern) -> Vec<String> {
    match key.hint() {
        IndexHint::Exact(k) => vec![k.clone()],
        IndexHint::AnyOf(ks) => ks.clone(),
        IndexHint::Prefix(p) if !p.is_empty() => vec![p.clone()],
        IndexHint::Prefix(_) | IndexHint::Scan => vec![],
    }
}

impl Waiters {
    pub fn new(limits: WaiterLimits) -> Waiters {
        Waiters {
            limits,
            next: 0,
            entries: BTreeMap::new(),
            by_rid: HashMap::new(),
            by_prefix: HashMap::new(),
            prefix_lens: BTreeMap::new(),
            unindexed: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            by_client: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, rid: u64) -> bool {
        self.by_rid.contains_key(&rid)
    }

    /// How many waiters have no literal prefix (every write tests them).
    pub fn unindexed(&self) -> usize {
        self.unindexed.len()
    }

    /// The earliest deadline, when the caller must call [`Waiters::tick`].
    pub fn next_deadline(&self) -> Option<Millis> {
        self.deadlines.first().map(|d| d.0)
    }

    /// Registers a waiter (the caller checked that nothing matches it now).
    pub fn add(&mut self, w: Waiter) -> Result<(), Refused> {
        if self.by_rid.contains_key(&w.rid) {
            return Err(Refused::Duplicate);
        }
        if self.entries.len() >= self.limits.total {
            return Err(Refused::Full {
                limit: self.limits.total,
            });
        }
        let mine = self.by_client.get(&w.client).map_or(0, BTreeSet::len);
        if mine >= self.limits.per_client {
            return Err(Refused::ClientFull {
                limit: self.limits.per_client,
            });
        }
        let order = self.next;
        self.next += 1;
        let prefixes = prefixes_of(&w.key);
        if prefixes.is_empty() {
            self.unindexed.insert(order);
        }
        for p in &prefixes {
            let set = self.by_prefix.entry(p.clone()).or_default();
            if set.is_empty() {
                *self.prefix_lens.entry(p.len()).or_default() += 1;
            }
            set.insert(order);
        }
        self.by_rid.insert(w.rid, order);
        self.deadlines.insert((w.deadline, order));
        self.by_client.entry(w.client).or_default().insert(order);
        self.entries.insert(
            order,
            Entry {
                waiter: w,
                prefixes,
            },
        );
        Ok(())
    }

    fn remove(&mut self, order: u64) -> Option<Waiter> {
        let e = self.entries.remove(&order)?;
        for p in &e.prefixes {
            if let Some(set) = self.by_prefix.get_mut(p) {
                set.remove(&order);
                if set.is_empty() {
                    self.by_prefix.remove(p);
                    if let Some(n) = self.prefix_lens.get_mut(&p.len()) {
                        *n -= 1;
                        if *n == 0 {
                            self.prefix_lens.remove(&p.len());
                        }
                    }
                }
            }
        }
        self.unindexed.remove(&order);
        self.by_rid.remove(&e.waiter.rid);
        self.deadlines.remove(&(e.waiter.deadline, order));
        if let Some(set) = self.by_client.get_mut(&e.waiter.client) {
            set.remove(&order);
            if set.is_empty() {
                self.by_client.remove(&e.waiter.client);
            }
        }
        Some(e.waiter)
    }

    /// The pairs a PUT or POST wrote (in request order; a key written twice counts with its last
    /// value): every waiter they satisfy, in the order the waiters started waiting.
    pub fn on_write(&mut self, written: &[Pair], out: &mut Vec<Action>) {
        if self.entries.is_empty() || written.is_empty() {
            return;
        }
        let mut avail: BTreeMap<&str, &str> = BTreeMap::new();
        for p in written {
            avail.insert(&p.key, &p.value);
        }
        let mut candidates: BTreeSet<u64> = self.unindexed.clone();
        for k in avail.keys() {
            for &len in self.prefix_lens.keys() {
                if len > k.len() {
                    break;
                }
                if !k.is_char_boundary(len) {
                    continue;
                }
                if let Some(set) = self.by_prefix.get(&k[..len]) {
                    candidates.extend(set.iter().copied());
                }
            }
        }
        for order in candidates {
            if avail.is_empty() {
                break;
            }
            let Some(e) = self.entries.get(&order) else {
                continue;
            };
            let w = &e.waiter;
            let got: Vec<Pair> = avail
                .iter()
                .filter(|(k, v)| w.key.is_match(k) && w.value.is_match(v))
                .take(w.limit)
                .map(|(k, v)| Pair::new(*k, *v))
                .collect();
            if got.is_empty() {
                continue;
            }
            let Some(w) = self.remove(order) else {
                continue;
            };
            if w.take {
                for p in &got {
                    avail.remove(p.key.as_str());
                }
                out.push(Action::Take {
                    rid: w.rid,
                    pairs: got,
                });
            } else {
                out.push(Action::Read {
                    rid: w.rid,
                    pairs: got,
                });
            }
        }
    }

    /// Every waiter whose deadline is at or before `now` times out.
    pub fn tick(&mut self, now: Millis, out: &mut Vec<Action>) {
        while let Some(&(deadline, order)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Some(w) = self.remove(order) {
                out.push(Action::TimedOut { rid: w.rid });
            } else {
                self.deadlines.pop_first();
            }
        }
    }

    /// Cancels the waiting request `rid` (false: it does not wait here).
    pub fn cancel(&mut self, rid: u64, out: &mut Vec<Action>) -> bool {
        let Some(&order) = self.by_rid.get(&rid) else {
            return false;
        };
        self.remove(order);
        out.push(Action::Cancelled { rid });
        true
    }

    /// Cancels every waiting request of a client connection.
    pub fn cancel_client(&mut self, client: u64, out: &mut Vec<Action>) {
        let Some(orders) = self.by_client.get(&client).cloned() else {
            return;
        };
        for order in orders {
            if let Some(w) = self.remove(order) {
                out.push(Action::Cancelled { rid: w.rid });
            }
        }
    }

    /// Forgets every waiter (the replica stops serving): the answers they get, if any, come from
    /// whoever serves the re-sent requests.
    pub fn clear(&mut self) -> Vec<u64> {
        let rids = self.by_rid.keys().copied().collect();
        *self = Waiters::new(self.limits);
        rids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::PatternLimits;

    fn pat(s: &str) -> Pattern {
        Pattern::compile(s, &PatternLimits::default()).unwrap()
    }

    fn waiter(rid: u64, client: u64, take: bool, key: &str, limit: usize, deadline: u64) -> Waiter {
        Waiter {
            rid,
            client,
            take,
            key: pat(key),
            value: pat(".*"),
            limit,
            deadline,
        }
    }

    fn lim() -> WaiterLimits {
        WaiterLimits {
            total: 100,
            per_client: 10,
        }
    }

    fn jobs(keys: &[&str]) -> Vec<Pair> {
        keys.iter().map(|k| Pair::new(*k, "x")).collect()
    }

    fn write(w: &mut Waiters, keys: &[&str]) -> Vec<Action> {
        let mut out = vec![];
        w.on_write(&jobs(keys), &mut out);
        out
    }

    #[test]
    fn takes_are_served_in_arrival_order_and_never_share_a_pair() {
        let mut w = Waiters::new(lim());
        for rid in 1..=4 {
            w.add(waiter(rid, rid, true, "job,.*", 1, 1000)).unwrap();
        }
        // One write of three jobs (out of key order): the first three waiters get one each, in
        // key order; the fourth keeps waiting.
        let out = write(&mut w, &["job,3", "job,1", "job,2", "other"]);
        assert_eq!(
            out,
            vec![
                Action::Take {
                    rid: 1,
                    pairs: jobs(&["job,1"])
                },
                Action::Take {
                    rid: 2,
                    pairs: jobs(&["job,2"])
                },
                Action::Take {
                    rid: 3,
                    pairs: jobs(&["job,3"])
                },
            ]
        );
        assert_eq!(w.len(), 1);
        assert!(write(&mut w, &["nothing"]).is_empty());
        assert_eq!(
            write(&mut w, &["job,9"]),
            vec![Action::Take {
                rid: 4,
                pairs: jobs(&["job,9"])
            }]
        );
        assert!(w.is_empty() && w.by_prefix.is_empty() && w.prefix_lens.is_empty());
    }

    #[test]
    fn reads_see_what_takes_after_them_remove_and_limits_hold() {
        let mut w = Waiters::new(lim());
        w.add(waiter(1, 1, false, "job,.*", usize::MAX, 1000))
            .unwrap();
        w.add(waiter(2, 1, true, "job,.*", 2, 1000)).unwrap();
        w.add(waiter(3, 2, true, "job,.*", usize::MAX, 1000))
            .unwrap();
        w.add(waiter(4, 2, false, "job,.*", usize::MAX, 1000))
            .unwrap();
        let out = write(&mut w, &["job,1", "job,2", "job,3"]);
        assert_eq!(
            out,
            vec![
                Action::Read {
                    rid: 1,
                    pairs: jobs(&["job,1", "job,2", "job,3"])
                },
                Action::Take {
                    rid: 2,
                    pairs: jobs(&["job,1", "job,2"])
                },
                Action::Take {
                    rid: 3,
                    pairs: jobs(&["job,3"])
                },
            ]
        );
        // The read that came after the takes found nothing left: it waits on.
        assert!(w.contains(4));
    }

    #[test]
    fn value_patterns_and_unindexed_waiters_decide_too() {
        let mut w = Waiters::new(lim());
        let mut a = waiter(1, 1, true, ".*", 1, 1000);
        a.value = pat("urgent");
        w.add(a).unwrap();
        w.add(waiter(2, 1, true, r"b\d", 1, 1000)).unwrap();
        w.add(waiter(3, 1, true, "exact,key", 1, 1000)).unwrap();
        assert_eq!(w.unindexed(), 1);
        let mut out = vec![];
        w.on_write(
            &[
                Pair::new("b7", "x"),
                Pair::new("exact,keys", "x"),
                Pair::new("zz", "urgent"),
            ],
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                Action::Take {
                    rid: 1,
                    pairs: vec![Pair::new("zz", "urgent")]
                },
                Action::Take {
                    rid: 2,
                    pairs: vec![Pair::new("b7", "x")]
                },
            ]
        );
        // A POST that writes a key twice counts with its last value.
        let mut out = vec![];
        w.on_write(
            &[Pair::new("exact,key", "a"), Pair::new("exact,key", "b")],
            &mut out,
        );
        assert_eq!(
            out,
            vec![Action::Take {
                rid: 3,
                pairs: vec![Pair::new("exact,key", "b")]
            }]
        );
    }

    #[test]
    fn deadlines_cancellation_and_bounds() {
        let mut w = Waiters::new(WaiterLimits {
            total: 3,
            per_client: 2,
        });
        w.add(waiter(1, 1, true, "a.*", 1, 100)).unwrap();
        w.add(waiter(2, 1, true, "a.*", 1, 50)).unwrap();
        assert_eq!(
            w.add(waiter(3, 1, true, "a.*", 1, 10)),
            Err(Refused::ClientFull { limit: 2 })
        );
        assert_eq!(
            w.add(waiter(2, 2, true, "a.*", 1, 10)),
            Err(Refused::Duplicate)
        );
        w.add(waiter(3, 2, false, "b.*", 1, 200)).unwrap();
        assert_eq!(
            w.add(waiter(4, 3, true, "a.*", 1, 10)),
            Err(Refused::Full { limit: 3 })
        );
        assert_eq!(w.next_deadline(), Some(50));
        let mut out = vec![];
        w.tick(49, &mut out);
        assert!(out.is_empty());
        w.tick(100, &mut out);
        assert_eq!(
            out,
            vec![Action::TimedOut { rid: 2 }, Action::TimedOut { rid: 1 }]
        );
        // A timed-out take gets nothing later.
        assert!(write(&mut w, &["a1"]).is_empty());
        let mut out = vec![];
        assert!(!w.cancel(1, &mut out));
        w.add(waiter(5, 2, true, "b.*", 1, 300)).unwrap();
        w.cancel_client(2, &mut out);
        assert_eq!(
            out,
            vec![Action::Cancelled { rid: 3 }, Action::Cancelled { rid: 5 }]
        );
        assert!(w.is_empty() && w.deadlines.is_empty() && w.by_client.is_empty());
        assert!(write(&mut w, &["b1"]).is_empty());
    }

    #[test]
    fn ten_thousand_prefix_waiters_cost_a_write_only_its_own_lookups() {
        let mut w = Waiters::new(WaiterLimits {
            total: 20_000,
            per_client: 20_000,
        });
        for i in 0..10_000u64 {
            w.add(waiter(i, 1, true, &format!("queue,{i},.*"), 1, 1000))
                .unwrap();
        }
        assert_eq!(w.unindexed(), 0);
        assert_eq!(
            write(&mut w, &["queue,4242,job", "queue,99999,job"]),
            vec![Action::Take {
                rid: 4242,
                pairs: jobs(&["queue,4242,job"])
            }]
        );
        assert_eq!(w.len(), 9_999);
    }
}
