//! The tuple space itself: an ordered map from key text to value text, with
//! GET/PUT/POST/DELETE semantics and replayable change records.
//!
//! Pure, synchronous logic. Must never do I/O, block, or panic on client
//! input; concurrency and persistence belong to the callers.

use std::ops::Bound;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use super::pattern::{IndexHint, Pattern};
use super::tuple::Pair;

/// What a mutating request actually did, so a backup can replay it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Pairs inserted by PUT, in request order.
    Insert(Vec<Pair>),
    /// Pairs whose value POST replaced, in request order.
    Replace(Vec<Pair>),
    /// Key texts removed by DELETE, ascending.
    Remove(Vec<String>),
}

impl Change {
    /// True if replaying this change would do nothing (nothing to replicate).
    pub fn is_empty(&self) -> bool {
        match self {
            Change::Insert(p) | Change::Replace(p) => p.is_empty(),
            Change::Remove(k) => k.is_empty(),
        }
    }
}

/// The tuple space. Cloning is O(1) (structural sharing), which is what makes
/// snapshots and backup resyncs cheap.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct Space {
    map: OrdMap<String, String>,
}

impl Space {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// All pairs, ascending by key text.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.map.iter()
    }

    /// The value stored under an exact key text, if any.
    pub fn value_of(&self, key: &str) -> Option<&String> {
        self.map.get(key)
    }

    /// Every pair whose key and value fully match, ascending by key text.
    pub fn get(&self, key: &Pattern, value: &Pattern) -> Vec<Pair> {
        let mut out = Vec::new();
        self.for_each_match(key, value, |k, v| {
            out.push(Pair::new(k, v));
            true
        });
        out
    }

    /// Like [`Space::get`], but stops as soon as `keep(key, value)` says no for a match: returns
    /// the pairs matched so far and whether the scan was complete (`false`: stopped early, the
    /// refused pair not included). Lets a caller bound an answer while it is built.
    pub fn get_while(
        &self,
        key: &Pattern,
        value: &Pattern,
        mut keep: impl FnMut(&str, &str) -> bool,
    ) -> (Vec<Pair>, bool) {
        let mut out = Vec::new();
        let complete = self.for_each_match(key, value, |k, v| {
            if keep(k, v) {
                out.push(Pair::new(k, v));
                true
            } else {
                false
            }
        });
        (out, complete)
    }

    /// The first `limit` pairs (ascending) matching both patterns, looking at no more than
    /// `max_visits` keys the key pattern's hint allows: `None` if that was not enough to find
    /// them (or to reach the last candidate).
    pub fn first_matches(
        &self,
        key: &Pattern,
        value: &Pattern,
        limit: usize,
        max_visits: usize,
    ) -> Option<Vec<Pair>> {
        let mut out = Vec::new();
        let mut visits = 0usize;
        let mut exhausted = false;
        self.for_each_candidate(key, |k, v| {
            if out.len() >= limit {
                return false;
            }
            if visits >= max_visits {
                exhausted = true;
                return false;
            }
            visits += 1;
            if key.is_match(k) && value.is_match(v) {
                out.push(Pair::new(k, v));
            }
            true
        });
        (!exhausted).then_some(out)
    }

    /// The changes between this space and `newer` (a later version of the same space), ascending
    /// by key: `(key, Some(value))` for a key added or changed, `(key, None)` for one removed.
    /// Fast when `newer` shares most of its structure with `self` (an O(1) copy since changed):
    /// shared subtrees are not visited.
    pub fn changes_to<'a>(
        &'a self,
        newer: &'a Space,
    ) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
        self.map.diff(&newer.map).map(|d| match d {
            imbl::ordmap::DiffItem::Add(k, v) => (k.as_str(), Some(v.as_str())),
            imbl::ordmap::DiffItem::Update { new: (k, v), .. } => (k.as_str(), Some(v.as_str())),
            imbl::ordmap::DiffItem::Remove(k, _) => (k.as_str(), None),
        })
    }

    /// In order, inserts each well-formed (`Some`) candidate whose key is
    /// absent. Everything else is rejected by index, including a key inserted
    /// earlier in the same request.
    pub fn put(&mut self, candidates: Vec<Option<Pair>>) -> (Change, Vec<usize>) {
        let mut applied = Vec::new();
        let mut rejected = Vec::new();
        for (i, candidate) in candidates.into_iter().enumerate() {
            match candidate {
                Some(pair) if !self.map.contains_key(&pair.key) => {
                    self.map.insert(pair.key.clone(), pair.value.clone());
                    applied.push(pair);
                }
                _ => rejected.push(i),
            }
        }
        (Change::Insert(applied), rejected)
    }

    /// In order, replaces the value of each well-formed candidate whose key is
    /// present. Everything else is rejected by index.
    pub fn post(&mut self, candidates: Vec<Option<Pair>>) -> (Change, Vec<usize>) {
        let mut applied = Vec::new();
        let mut rejected = Vec::new();
        for (i, candidate) in candidates.into_iter().enumerate() {
            match candidate {
                Some(pair) => match self.map.get_mut(&pair.key) {
                    Some(slot) => {
                        slot.clone_from(&pair.value);
                        applied.push(pair);
                    }
                    None => rejected.push(i),
                },
                None => rejected.push(i),
            }
        }
        (Change::Replace(applied), rejected)
    }

    /// Removes and returns (ascending) exactly what [`Space::get`] would return.
    pub fn delete(&mut self, key: &Pattern, value: &Pattern) -> (Change, Vec<Pair>) {
        let removed = self.get(key, value);
        let mut keys = Vec::with_capacity(removed.len());
        for pair in &removed {
            self.map.remove(&pair.key);
            keys.push(pair.key.clone());
        }
        (Change::Remove(keys), removed)
    }

    /// Replays a change recorded by another space.
    ///
    /// Insert and Replace both set key -> value (an upsert) and Remove ignores
    /// absent keys, so replaying is deterministic and idempotent, and a
    /// backup that somehow diverged converges on the keys the change touches.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Insert(pairs) | Change::Replace(pairs) => {
                for pair in pairs {
                    self.map.insert(pair.key.clone(), pair.value.clone());
                }
            }
            Change::Remove(keys) => {
                for key in keys {
                    self.map.remove(key);
                }
            }
        }
    }

    /// Sets key -> value without checks; for loaders that validated already.
    pub fn insert_raw(&mut self, key: String, value: String) {
        self.map.insert(key, value);
    }

    /// Calls `f` for each matching pair, ascending, visiting only the keys
    /// the key pattern's hint allows, until `f` returns false. Returns true if
    /// every candidate was visited.
    fn for_each_match(
        &self,
        key: &Pattern,
        value: &Pattern,
        mut f: impl FnMut(&str, &str) -> bool,
    ) -> bool {
        // The hint only narrows; both regexes still decide.
        self.for_each_candidate(key, |k, v| {
            !(key.is_match(k) && value.is_match(v)) || f(k, v)
        })
    }

    /// Calls `check` for each pair the key pattern's hint allows, ascending, until it returns
    /// false. Returns true if every candidate was visited.
    fn for_each_candidate(
        &self,
        key: &Pattern,
        mut check: impl FnMut(&String, &String) -> bool,
    ) -> bool {
        match key.hint() {
            IndexHint::Exact(k) => match self.map.get_key_value(k.as_str()) {
                Some((k, v)) => check(k, v),
                None => true,
            },
            IndexHint::AnyOf(keys) => {
                // Sorted by the pattern module, so results come out ascending.
                keys.iter()
                    .all(|k| match self.map.get_key_value(k.as_str()) {
                        Some((k, v)) => check(k, v),
                        None => true,
                    })
            }
            IndexHint::Prefix(prefix) => self
                .map
                .range::<_, str>((Bound::Included(prefix.as_str()), Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                .all(|(k, v)| check(k, v)),
            IndexHint::Scan => self.map.iter().all(|(k, v)| check(k, v)),
        }
    }
}

impl FromIterator<(String, String)> for Space {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Space {
            map: iter.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::pattern::PatternLimits;

    fn pat(s: &str) -> Pattern {
        Pattern::compile(s, &PatternLimits::default()).unwrap()
    }

    fn some(k: &str, v: &str) -> Option<Pair> {
        Some(Pair::new(k, v))
    }

    fn sample() -> Space {
        let mut s = Space::new();
        let (_, rej) = s.put(vec![
            some("user,2", "bob"),
            some("user,1", "alice"),
            some("user,10", "carol"),
            some("group,1", "admins"),
        ]);
        assert!(rej.is_empty());
        s
    }

    #[test]
    fn get_is_ascending_and_full_match() {
        let s = sample();
        let got = s.get(&pat("user,.*"), &pat(".*"));
        let keys: Vec<_> = got.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["user,1", "user,10", "user,2"]);
        assert_eq!(
            s.get(&pat("user,1"), &pat(".*")),
            vec![Pair::new("user,1", "alice")]
        );
        assert!(s.get(&pat("user,1"), &pat("bob")).is_empty());
        assert!(s.get(&pat("user"), &pat(".*")).is_empty());
        assert_eq!(s.get(&pat(".*"), &pat("a.*")).len(), 2);
        assert_eq!(
            s.get(&pat("user,2|group,1"), &pat(".*")),
            vec![Pair::new("group,1", "admins"), Pair::new("user,2", "bob")]
        );
    }

    #[test]
    fn put_rejects_duplicates_and_ill_formed() {
        let mut s = sample();
        let (change, rej) = s.put(vec![
            some("user,3", "dave"),
            None,
            some("user,3", "eve"),
            some("user,1", "mallory"),
        ]);
        assert_eq!(change, Change::Insert(vec![Pair::new("user,3", "dave")]));
        assert_eq!(rej, vec![1, 2, 3]);
        assert_eq!(s.value_of("user,3").map(String::as_str), Some("dave"));
        assert_eq!(s.value_of("user,1").map(String::as_str), Some("alice"));
    }

    #[test]
    fn post_only_replaces_present_keys() {
        let mut s = sample();
        let (change, rej) = s.post(vec![some("user,9", "x"), some("user,1", "ann"), None]);
        assert_eq!(change, Change::Replace(vec![Pair::new("user,1", "ann")]));
        assert_eq!(rej, vec![0, 2]);
        assert_eq!(s.value_of("user,1").map(String::as_str), Some("ann"));
        assert_eq!(s.value_of("user,9"), None);
    }

    #[test]
    fn delete_returns_removed_ascending() {
        let mut s = sample();
        let (change, removed) = s.delete(&pat(r"user,\d+"), &pat(".*"));
        assert_eq!(
            removed,
            vec![
                Pair::new("user,1", "alice"),
                Pair::new("user,10", "carol"),
                Pair::new("user,2", "bob"),
            ]
        );
        assert_eq!(
            change,
            Change::Remove(vec!["user,1".into(), "user,10".into(), "user,2".into()])
        );
        assert_eq!(s.len(), 1);
        let (change, removed) = s.delete(&pat("nothing"), &pat(".*"));
        assert!(change.is_empty() && removed.is_empty());
    }

    #[test]
    fn apply_reproduces_primary() {
        let mut primary = Space::new();
        let mut backup = Space::new();
        // vec! evaluates in order, so these run against the primary in sequence.
        let changes = vec![
            primary
                .put(vec![some("a", "1"), some("b", "2"), some("a", "3")])
                .0,
            primary.post(vec![some("b", "4"), some("c", "5")]).0,
            primary.delete(&pat("a"), &pat(".*")).0,
            primary.put(vec![some("a", "6")]).0,
        ];
        for c in &changes {
            backup.apply(c);
        }
        assert_eq!(primary, backup);
        // Replaying again changes nothing.
        for c in &changes {
            backup.apply(c);
        }
        assert_eq!(primary, backup);
    }

    #[test]
    fn get_while_stops_early() {
        let s = sample();
        let mut n = 0;
        let (got, complete) = s.get_while(&pat(".*"), &pat(".*"), |_, _| {
            n += 1;
            n <= 2
        });
        assert!(!complete);
        assert_eq!(got.len(), 2);
        let (got, complete) = s.get_while(&pat("user,.*"), &pat(".*"), |_, _| true);
        assert!(complete);
        assert_eq!(got, s.get(&pat("user,.*"), &pat(".*")));
    }

    #[test]
    fn changes_to_lists_what_a_later_copy_changed() {
        let mut s: Space = (0..10_000)
            .map(|i| (format!("k,{i}"), "v".to_owned()))
            .collect();
        let old = s.clone();
        s.put(vec![some("new", "x")]);
        s.post(vec![some("k,5", "w")]);
        s.delete(&pat("k,7"), &pat(".*"));
        let got: Vec<_> = old.changes_to(&s).collect();
        assert_eq!(
            got,
            vec![("k,5", Some("w")), ("k,7", None), ("new", Some("x"))]
        );
        assert_eq!(s.changes_to(&s).count(), 0);
    }

    #[test]
    fn first_matches_stops_at_the_limit_or_the_visit_budget() {
        let s: Space = (0..100)
            .map(|i| {
                (
                    format!("job,{i:03}"),
                    if i % 10 == 0 { "x" } else { "y" }.to_owned(),
                )
            })
            .collect();
        let keys = |v: Vec<Pair>| v.into_iter().map(|p| p.key).collect::<Vec<_>>();
        let got = s.first_matches(&pat("job,.*"), &pat(".*"), 2, 10).unwrap();
        assert_eq!(keys(got), ["job,000", "job,001"]);
        let got = s.first_matches(&pat("job,.*"), &pat("x"), 2, 100).unwrap();
        assert_eq!(keys(got), ["job,000", "job,010"]);
        // 2 matches need 11 visits here.
        assert!(s.first_matches(&pat("job,.*"), &pat("x"), 2, 10).is_none());
        // Fewer matches than the limit: every candidate is visited (a prefix hint, 100 keys).
        assert_eq!(
            s.first_matches(&pat("job,.*"), &pat("x"), 50, 100)
                .unwrap()
                .len(),
            10
        );
        assert!(s.first_matches(&pat("job,.*"), &pat("x"), 50, 99).is_none());
        assert!(
            s.first_matches(&pat("nope,.*"), &pat(".*"), 1, 0)
                .unwrap()
                .is_empty()
        );
        let all = s.get(&pat("job,.*"), &pat("x"));
        assert_eq!(
            s.first_matches(&pat("job,.*"), &pat("x"), 3, usize::MAX)
                .unwrap(),
            all[..3]
        );
    }

    #[test]
    fn clone_is_a_snapshot() {
        let mut s = sample();
        let snap = s.clone();
        s.put(vec![some("new", "x")]);
        assert_eq!(snap.len() + 1, s.len());
        assert_eq!(snap.value_of("new"), None);
    }
}
