//! Linearizability checker for tuple-space histories.
//!
//! The tuple space is treated as a set of independent registers, one per key: a key is either
//! absent or holds one value. Linearizability is compositional (P-compositionality), so every
//! key is checked on its own, starting from the key being absent.
//!
//! The per-key search is the Wing–Gong–Lowe algorithm with Lowe's memoisation, as in porcupine's
//! `checkSingle`: the history becomes a doubly-linked list of call and return entries sorted by
//! time (calls before returns at equal times); a depth-first search linearizes a call it can
//! (its sequential step accepts the recorded outcome), lifts it out of the list and starts again
//! from the head; reaching a return entry means the op pending there cannot be linearized on
//! this path, so the search backtracks. A cache of (set of linearized ops, state) prunes
//! configurations already explored.
//!
//! Ops without an answer ([`Outcome::Unknown`]) have a call entry but no return entry: they may
//! take effect at any point after their call, or never, and their outcome is unconstrained. The
//! history is accepted once every completed op is linearized. [`Outcome::Failed`] ops had no
//! effect and are removed before checking, as are unknown GETs (they constrain nothing).
//!
//! Refinements over the plain search, each sound and complete (and cross-checked against a
//! brute-force search in the tests):
//! - candidates are tried in passes (see [`Pass`]): a read-only op that fits is linearized with
//!   no alternatives, then writes branch, then unknown ops, only where they are needed;
//! - an unknown op is placed only where it changes the register, and of unknown ops with the
//!   same request only the earliest invoked still pending (they are interchangeable);
//! - values no completed op observed are merged into one, and the cache prunes a configuration
//!   when one with the same completed ops and state but fewer unknown ops placed was seen;
//! - a read of a value no write applied, or may have applied, is reported without a search.
//!
//! The search is bounded by a step budget ([`DEFAULT_MAX_STEPS`]); a key whose search runs over
//! it gets [`Verdict::Inconclusive`]. That takes many unknown ops on one key in a history that
//! is not linearizable; spreading a workload over more keys keeps every search small.
//!
//! Pure: no I/O, no clocks, no async. [`check`] uses two threads to check keys in parallel.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

/// Search steps allowed per key before giving up with [`Verdict::Inconclusive`].
///
/// A linearizable history of n ops with concurrency c usually needs a few times n·c steps; a
/// step costs 20–150 ns in a release build, so the budget is about 0.5–3 s of search.
pub const DEFAULT_MAX_STEPS: u64 = 20_000_000;

/// What an op asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    /// Read the key's value.
    Get,
    /// Insert the value if the key is absent.
    Put(String),
    /// Replace the value if the key is present.
    Post(String),
    /// Remove the key, returning its value.
    Delete,
}

/// What the client saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// GET: the value read (None = key absent).
    Read(Option<String>),
    /// PUT/POST: the pair was applied (not in `rejected`).
    Applied,
    /// PUT/POST: the pair came back in `rejected` (PUT: key present; POST: key absent).
    Rejected,
    /// DELETE: the value removed (None = nothing matched).
    Deleted(Option<String>),
    /// No answer (timeout, `unknown` status, connection lost): may or may not have taken effect.
    Unknown,
    /// Definitely not applied (`unavailable` status): the op had no effect. Dropped from the check.
    Failed,
}

/// One recorded operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Identifies the op in reports.
    pub id: u64,
    /// The client that issued it.
    pub client: u32,
    /// The key (register) it touched.
    pub key: String,
    /// What it asked for.
    pub kind: OpKind,
    /// When it was sent.
    pub invoke_ns: u64,
    /// None = never completed (Unknown).
    pub complete_ns: Option<u64>,
    /// What came back.
    pub outcome: Outcome,
}

/// The result of checking one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Some total order of the ops respects real time and the sequential spec.
    Linearizable,
    /// No such order exists.
    NotLinearizable {
        /// The op that could not be linearized on the deepest search path, with its times and
        /// the register's value there.
        detail: String,
    },
    /// The search ran out of steps before deciding.
    Inconclusive {
        /// How far the search got.
        detail: String,
    },
}

/// The result of checking a whole history.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Ops in the history (`Failed` ones included).
    pub ops: usize,
    /// Distinct keys in the history.
    pub keys: usize,
    /// (key, detail) for every key that is not linearizable, sorted by key.
    pub not_linearizable: Vec<(String, String)>,
    /// (key, detail) for every key whose search ran out of steps, sorted by key.
    pub inconclusive: Vec<(String, String)>,
    /// True only when every key was found linearizable (no violation and nothing inconclusive).
    pub linearizable: bool,
}

/// Checks the ops of one key (the `key` field is not looked at) with [`DEFAULT_MAX_STEPS`].
pub fn check_key(ops: &[Op]) -> Verdict {
    check_key_with_limit(ops, DEFAULT_MAX_STEPS)
}

/// Checks the ops of one key, giving up after `max_steps` search steps.
pub fn check_key_with_limit(ops: &[Op], max_steps: u64) -> Verdict {
    let refs: Vec<&Op> = ops.iter().collect();
    check_refs(&refs, max_steps)
}

/// Groups `history` by key and checks every key with [`DEFAULT_MAX_STEPS`].
pub fn check(history: &[Op]) -> Report {
    check_with_limit(history, DEFAULT_MAX_STEPS)
}

/// Groups `history` by key and checks every key (two keys at a time), giving up on a key after
/// `max_steps` search steps.
pub fn check_with_limit(history: &[Op], max_steps: u64) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let groups: Vec<(&str, Vec<&Op>)> = by_key.into_iter().collect();

    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((_, ops)) = groups.get(i) else { break };
            done.push((i, check_refs(ops, max_steps)));
        }
        done
    };
    let mut verdicts: Vec<Option<Verdict>> = vec![None; groups.len()];
    let threads = groups.len().min(2);
    if threads <= 1 {
        for (i, v) in work() {
            verdicts[i] = Some(v);
        }
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
            for handle in handles {
                // A panicking worker leaves its keys without a verdict: reported below.
                if let Ok(done) = handle.join() {
                    for (i, v) in done {
                        verdicts[i] = Some(v);
                    }
                }
            }
        });
    }

    let mut not_linearizable = Vec::new();
    let mut inconclusive = Vec::new();
    for ((key, _), verdict) in groups.iter().zip(verdicts) {
        match verdict {
            Some(Verdict::Linearizable) => {}
            Some(Verdict::NotLinearizable { detail }) => {
                not_linearizable.push(((*key).to_owned(), detail));
            }
            Some(Verdict::Inconclusive { detail }) => {
                inconclusive.push(((*key).to_owned(), detail));
            }
            None => inconclusive.push(((*key).to_owned(), "checker thread panicked".to_owned())),
        }
    }
    Report {
        ops: history.len(),
        keys: groups.len(),
        linearizable: not_linearizable.is_empty() && inconclusive.is_empty(),
        not_linearizable,
        inconclusive,
    }
}

// ---------- the sequential spec, on interned values ----------

/// An interned value.
type Val = u32;
/// The register: None = key absent.
type State = Option<Val>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Get,
    Put(Val),
    Post(Val),
    Delete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    Read(State),
    Applied,
    Rejected,
    Deleted(State),
    /// Unconstrained.
    Any,
}

/// Runs `kind` on `state`: the new state and the outcome the spec gives.
fn apply(state: State, kind: Kind) -> (State, Out) {
    match kind {
        Kind::Get => (state, Out::Read(state)),
        Kind::Put(v) => match state {
            None => (Some(v), Out::Applied),
            Some(_) => (state, Out::Rejected),
        },
        Kind::Post(v) => match state {
            Some(_) => (Some(v), Out::Applied),
            None => (None, Out::Rejected),
        },
        Kind::Delete => (None, Out::Deleted(state)),
    }
}

/// The new state if the spec accepts `out` for `kind` on `state`.
fn step(state: State, kind: Kind, out: Out) -> Option<State> {
    let (next, expected) = apply(state, kind);
    (out == Out::Any || out == expected).then_some(next)
}

/// Whether `outcome` is one `kind` can produce at all.
fn compatible(kind: &OpKind, outcome: &Outcome) -> bool {
    matches!(
        (kind, outcome),
        (_, Outcome::Unknown | Outcome::Failed)
            | (OpKind::Get, Outcome::Read(_))
            | (
                OpKind::Put(_) | OpKind::Post(_),
                Outcome::Applied | Outcome::Rejected
            )
            | (OpKind::Delete, Outcome::Deleted(_))
    )
}

/// Interns the values completed ops observed (read or deleted). Every other value is written
/// as [`UNREAD`]: values are only ever compared with observed ones, so values nobody observed
/// are indistinguishable, and merging them lets the cache and the unknown-op symmetry treat
/// them as one (many lost unknown writes collapse to one).
#[derive(Default)]
struct Interner<'a> {
    ids: HashMap<&'a str, Val>,
    names: Vec<&'a str>,
}

/// The value standing for every value no completed op observed.
const UNREAD: Val = Val::MAX;

impl<'a> Interner<'a> {
    fn observe(&mut self, s: &'a Option<String>) -> State {
        let s = s.as_deref()?;
        if let Some(&id) = self.ids.get(s) {
            return Some(id);
        }
        let id = self.names.len() as Val;
        self.names.push(s);
        self.ids.insert(s, id);
        Some(id)
    }

    fn written(&self, s: &str) -> Val {
        self.ids.get(s).copied().unwrap_or(UNREAD)
    }

    fn show(&self, state: State) -> String {
        match state {
            None => "absent".to_owned(),
            Some(UNREAD) => "a value no completed op read".to_owned(),
            Some(v) => match self.names.get(v as usize) {
                Some(s) => format!("{s:?}"),
                None => "?".to_owned(),
            },
        }
    }
}

// ---------- the set of linearized ops, with a compact canonical form for the cache ----------

/// Linearized ops. Completed ops have indices `0..completed`, unknown ones the indices above.
///
/// Besides the membership bits, the set is kept as: every index below `prefix` is a member,
/// `prefix` itself is not (unless it equals `completed`), and `rest` holds the members above it.
/// Only ops concurrent with the first unlinearized one (plus linearized unknown ops) can be
/// above it, so `rest` stays short and the cache key is small and cheap to build.
struct LinSet {
    bits: Vec<u64>,
    completed: usize,
    prefix: usize,
    /// Sorted.
    rest: Vec<usize>,
}

/// The completed part of a configuration: the completed ops linearized and the register's value.
#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    prefix: usize,
    /// Completed members above `prefix`, sorted.
    rest: Box<[usize]>,
    state: State,
}

/// Configurations already explored, or being explored on the current path.
///
/// A configuration is (linearized set, state). Placing an unknown op is optional, so (S, s)
/// can do everything (S ∪ U, s) can for a set U of unknown ops: the latter is pruned when the
/// former was seen. So the cache maps the completed part of a configuration to the sets of
/// placed unknown ops seen with it, and a lookup looks for a subset.
#[derive(Default)]
struct Cache {
    seen: HashMap<CacheKey, Vec<Box<[usize]>>>,
}

impl Cache {
    /// Records the configuration; false if it, or one that can do everything it can, was seen.
    fn insert(&mut self, set: &LinSet, state: State) -> bool {
        let split = set.rest.partition_point(|&i| i < set.completed);
        let (completed, unknown) = set.rest.split_at(split);
        let key = CacheKey {
            prefix: set.prefix,
            rest: completed.into(),
            state,
        };
        let sets = self.seen.entry(key).or_default();
        if sets.iter().any(|seen| is_subset(seen, unknown)) {
            return false;
        }
        sets.push(unknown.into());
        true
    }
}

/// Whether sorted `a` is a subset of sorted `b`.
fn is_subset(a: &[usize], b: &[usize]) -> bool {
    let mut b = b.iter();
    a.iter().all(|x| b.any(|y| y == x))
}

impl LinSet {
    fn new(n: usize, completed: usize) -> Self {
        LinSet {
            bits: vec![0; n.div_ceil(64)],
            completed,
            prefix: 0,
            rest: Vec::new(),
        }
    }

    fn contains(&self, i: usize) -> bool {
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    fn insert(&mut self, i: usize) {
        self.bits[i / 64] |= 1 << (i % 64);
        if i == self.prefix && i < self.completed {
            self.prefix += 1;
            // Members right above the old prefix are at the front of `rest`.
            let mut absorbed = 0;
            while self.prefix < self.completed && self.contains(self.prefix) {
                absorbed += 1;
                self.prefix += 1;
            }
            self.rest.drain(..absorbed);
        } else if let Err(at) = self.rest.binary_search(&i) {
            self.rest.insert(at, i);
        }
    }

    fn remove(&mut self, i: usize) {
        self.bits[i / 64] &= !(1 << (i % 64));
        if i < self.prefix {
            self.rest.splice(0..0, i + 1..self.prefix);
            self.prefix = i;
        } else if let Ok(at) = self.rest.binary_search(&i) {
            self.rest.remove(at);
        }
    }
}

// ---------- the search ----------

const NIL: usize = usize::MAX;
/// Head of the list of completed ops' calls and returns.
const HEAD: usize = 0;
/// Head of the list of unknown ops' calls (they have no returns). A separate list, so that the
/// unknown ops still pending, which pile up, cost nothing when completed ops are tried.
const UNKNOWN_HEAD: usize = 1;

/// The two doubly-linked lists, sorted by time; entries 0 and 1 are their head sentinels.
struct Entries {
    /// Op index of each entry (unused for the heads).
    op: Vec<usize>,
    /// Time of each entry.
    time: Vec<u64>,
    /// Whether each entry is a call.
    is_call: Vec<bool>,
    /// For a call: its return entry, or NIL for an unknown op.
    ret: Vec<usize>,
    prev: Vec<usize>,
    next: Vec<usize>,
}

impl Entries {
    fn unlink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = e;
        if n != NIL {
            self.prev[n] = e;
        }
    }

    /// Removes a call and its return (dancing links: undone by `unlift` in reverse order).
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        let r = self.ret[call];
        if r != NIL {
            self.unlink(r);
        }
    }

    fn unlift(&mut self, call: usize) {
        let r = self.ret[call];
        if r != NIL {
            self.relink(r);
        }
        self.relink(call);
    }
}

/// Where the search got stuck, kept for the deepest path.
struct Stuck {
    /// Completed ops linearized on that path.
    depth: usize,
    /// The op whose return was reached (None: ran off the end of the list).
    op: Option<usize>,
    state: State,
    /// The op linearized last on that path.
    last: Option<usize>,
}

fn describe(op: &Op) -> String {
    let kind = match &op.kind {
        OpKind::Get => "GET".to_owned(),
        OpKind::Put(v) => format!("PUT({v:?})"),
        OpKind::Post(v) => format!("POST({v:?})"),
        OpKind::Delete => "DELETE".to_owned(),
    };
    let outcome = match &op.outcome {
        Outcome::Read(v) => format!("read {}", show(v)),
        Outcome::Applied => "applied".to_owned(),
        Outcome::Rejected => "rejected".to_owned(),
        Outcome::Deleted(v) => format!("deleted {}", show(v)),
        Outcome::Unknown => "unknown".to_owned(),
        Outcome::Failed => "failed".to_owned(),
    };
    let mut s = format!(
        "op {} (client {}, {kind} -> {outcome}, invoked {} ns, ",
        op.id, op.client, op.invoke_ns
    );
    let _ = match (op.complete_ns, &op.outcome) {
        (_, Outcome::Unknown) | (None, _) => write!(s, "never completed)"),
        (Some(t), _) => write!(s, "completed {t} ns)"),
    };
    s
}

fn show(v: &Option<String>) -> String {
    match v {
        Some(s) => format!("{s:?}"),
        None => "absent".to_owned(),
    }
}

fn check_refs(all: &[&Op], max_steps: u64) -> Verdict {
    for op in all {
        if !compatible(&op.kind, &op.outcome) {
            return Verdict::NotLinearizable {
                detail: format!(
                    "malformed: {} (outcome impossible for that request)",
                    describe(op)
                ),
            };
        }
    }
    // Completed ops get indices 0..m, unknown ones m..n, each group in invocation order (which
    // keeps the cache keys short); unknown GETs and failed ops are dropped.
    let mut ops: Vec<&Op> = all
        .iter()
        .copied()
        .filter(|op| !matches!(op.outcome, Outcome::Unknown | Outcome::Failed))
        .collect();
    let m = ops.len();
    ops.extend(
        all.iter()
            .copied()
            .filter(|op| op.outcome == Outcome::Unknown && op.kind != OpKind::Get),
    );
    let n = ops.len();
    ops[..m].sort_by_key(|op| op.invoke_ns);
    ops[m..].sort_by_key(|op| op.invoke_ns);
    if m == 0 {
        return Verdict::Linearizable;
    }
    if let Some(detail) = unwritten_observation(&ops) {
        return Verdict::NotLinearizable { detail };
    }

    let mut values = Interner::default();
    let mut outs = Vec::with_capacity(n);
    for op in &ops {
        outs.push(match &op.outcome {
            Outcome::Read(v) => Out::Read(values.observe(v)),
            Outcome::Applied => Out::Applied,
            Outcome::Rejected => Out::Rejected,
            Outcome::Deleted(v) => Out::Deleted(values.observe(v)),
            Outcome::Unknown | Outcome::Failed => Out::Any,
        });
    }
    let mut kinds = Vec::with_capacity(n);
    let mut passes = Vec::with_capacity(n);
    for op in &ops {
        kinds.push(match &op.kind {
            OpKind::Get => Kind::Get,
            OpKind::Put(v) => Kind::Put(values.written(v)),
            OpKind::Post(v) => Kind::Post(values.written(v)),
            OpKind::Delete => Kind::Delete,
        });
        passes.push(match &op.outcome {
            Outcome::Read(_) | Outcome::Rejected | Outcome::Deleted(None) => Pass::ReadOnly,
            Outcome::Applied | Outcome::Deleted(Some(_)) => Pass::Writing,
            Outcome::Unknown | Outcome::Failed => Pass::Unknown,
        });
    }
    // Unknown ops with the same request are interchangeable once both are invoked, so only the
    // earliest-invoked one not yet linearized is ever placed: `rank` is an unknown op's position
    // among those with its request, `placed` counts the placed ones per request.
    let mut class_of: HashMap<Kind, usize> = HashMap::new();
    let mut class = vec![0; n];
    let mut rank = vec![0; n];
    let mut placed: Vec<usize> = Vec::new();
    for i in m..n {
        let next_class = class_of.len();
        let c = *class_of.entry(kinds[i]).or_insert(next_class);
        if c == placed.len() {
            placed.push(0);
        }
        class[i] = c;
        rank[i] = placed[c];
        placed[c] += 1;
    }
    placed.fill(0);

    // (time, 0 = call / 1 = return, op index): calls sort before returns at equal times.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * m);
    let mut unknown_calls: Vec<(u64, u8, usize)> = Vec::with_capacity(n - m);
    for (i, op) in ops.iter().enumerate() {
        if i < m {
            events.push((op.invoke_ns, 0, i));
            // A completed op without a completion time could have returned any time later;
            // a completion before the invocation is clamped to it.
            let done = op.complete_ns.unwrap_or(u64::MAX).max(op.invoke_ns);
            events.push((done, 1, i));
        } else {
            unknown_calls.push((op.invoke_ns, 0, i));
        }
    }
    events.sort_unstable();
    unknown_calls.sort_unstable();
    let len = 2 + events.len() + unknown_calls.len();
    let mut list = Entries {
        op: vec![0; len],
        time: vec![0; len],
        is_call: vec![false; len],
        ret: vec![NIL; len],
        prev: vec![NIL; len],
        next: vec![NIL; len],
    };
    let mut call_of = vec![NIL; n];
    let mut e = 2;
    for (head, sorted) in [(HEAD, &events), (UNKNOWN_HEAD, &unknown_calls)] {
        let mut last = head;
        for &(time, tag, i) in sorted {
            list.op[e] = i;
            list.time[e] = time;
            if tag == 0 {
                list.is_call[e] = true;
                call_of[i] = e;
            } else {
                list.ret[call_of[i]] = e;
            }
            list.prev[e] = last;
            list.next[last] = e;
            last = e;
            e += 1;
        }
    }

    let mut linearized = LinSet::new(n, m);
    let mut cache = Cache::default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut state: State = None;
    let mut remaining = m;
    let mut entry = list.next[HEAD];
    let mut pass = Pass::ReadOnly;
    // In the unknown pass: the time of the node's first return entry. Unknown ops invoked
    // after it are not candidates.
    let mut limit = u64::MAX;
    let mut stuck: Option<Stuck> = None;
    let mut steps: u64 = 0;

    while remaining > 0 {
        steps += 1;
        if steps > max_steps {
            let mut detail = format!(
                "search gave up after {max_steps} steps ({} of {m} completed ops linearized on \
                 the deepest path",
                stuck.as_ref().map_or(0, |s| s.depth)
            );
            if let Some(s) = &stuck {
                let _ = write!(detail, "; {}", explain(s, &ops, &values));
            }
            detail.push(')');
            return Verdict::Inconclusive { detail };
        }
        let candidate = entry != NIL
            && match pass {
                Pass::Unknown => list.time[entry] <= limit,
                Pass::ReadOnly | Pass::Writing => list.is_call[entry],
            };
        let mut fail = false;
        if candidate {
            let i = list.op[entry];
            let unknown = pass == Pass::Unknown;
            if passes[i] == pass
                && (!unknown || rank[i] == placed[class[i]])
                && let Some(next) = step(state, kinds[i], outs[i])
                // Placing an unknown op that changes nothing is the same as leaving it out.
                && !(unknown && next == state)
            {
                linearized.insert(i);
                if cache.insert(&linearized, next) {
                    stack.push(Frame {
                        call: entry,
                        state,
                        pass,
                        limit,
                    });
                    state = next;
                    if unknown {
                        placed[class[i]] += 1;
                    } else {
                        remaining -= 1;
                    }
                    list.lift(entry);
                    entry = list.next[HEAD];
                    pass = Pass::ReadOnly;
                    continue;
                }
                linearized.remove(i);
                // A read-only op goes first if anything works (see `Pass`): this
                // configuration already failed, so this node fails too.
                fail = pass == Pass::ReadOnly;
            }
            if !fail {
                entry = list.next[entry];
                continue;
            }
        } else if pass == Pass::ReadOnly {
            pass = Pass::Writing;
            entry = list.next[HEAD];
            continue;
        } else if pass == Pass::Writing {
            // The op returning here could not be linearized before its return (`entry` is NIL
            // only once every completed op is linearized, which ends the search).
            let depth = m - remaining;
            if stuck.as_ref().is_none_or(|s| depth > s.depth) {
                stuck = Some(Stuck {
                    depth,
                    op: (entry != NIL).then(|| list.op[entry]),
                    state,
                    last: stack.last().map(|f| list.op[f.call]),
                });
            }
            if n > m {
                pass = Pass::Unknown;
                limit = if entry == NIL {
                    u64::MAX
                } else {
                    list.time[entry]
                };
                entry = list.next[UNKNOWN_HEAD];
                continue;
            }
        }
        // Backtrack: undo linearizations until one leaves alternatives to try.
        loop {
            let Some(frame) = stack.pop() else {
                let detail = match &stuck {
                    Some(s) => explain(s, &ops, &values),
                    None => "no linearization exists".to_owned(),
                };
                return Verdict::NotLinearizable { detail };
            };
            let i = list.op[frame.call];
            linearized.remove(i);
            if i < m {
                remaining += 1;
            } else {
                placed[class[i]] -= 1;
            }
            state = frame.state;
            list.unlift(frame.call);
            if frame.pass != Pass::ReadOnly {
                pass = frame.pass;
                limit = frame.limit;
                entry = list.next[frame.call];
                break;
            }
        }
    }
    Verdict::Linearizable
}

/// A linearized op on the search path.
struct Frame {
    /// Its call entry.
    call: usize,
    /// The state before it.
    state: State,
    /// The pass that found it, and that pass's `limit`: where to resume after undoing it.
    pass: Pass,
    limit: u64,
}

/// The candidates of a search node (the calls before the first return entry) are tried in
/// three passes; together they try every candidate, as the plain search does.
///
/// 1. `ReadOnly`: completed ops whose outcome says they changed nothing, in any state that
///    accepts it (GETs, rejected PUTs and POSTs, DELETEs of nothing). If one is accepted now,
///    some linearization starts with it whenever any does: in any linearization, moving it to
///    the front leaves every state as it was, and as a candidate it was invoked before any
///    remaining op returned. So it is linearized with no alternatives.
/// 2. `Writing`: the other completed ops (applied writes, deletes of a value); each is a branch.
/// 3. `Unknown`: unknown ops that change the state (placing one that changes nothing is the same
///    as leaving it out), tried last so they are only placed where the completed ops cannot go
///    on without them. Unknown ops with the same request are interchangeable once invoked, so
///    only the earliest invoked of those still pending is tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    ReadOnly,
    Writing,
    Unknown,
}

/// A completed op that read or deleted a value no write applied (or may have applied): caught
/// up front, as the search would have to try every placement of the unknown ops to prove it.
fn unwritten_observation(ops: &[&Op]) -> Option<String> {
    let written: HashSet<&str> = ops
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Applied | Outcome::Unknown))
        .filter_map(|op| match &op.kind {
            OpKind::Put(v) | OpKind::Post(v) => Some(v.as_str()),
            OpKind::Get | OpKind::Delete => None,
        })
        .collect();
    ops.iter().find_map(|op| match &op.outcome {
        Outcome::Read(Some(v)) | Outcome::Deleted(Some(v)) if !written.contains(v.as_str()) => {
            Some(format!(
                "{} cannot be linearized: no write of {v:?} was applied or may have been",
                describe(op)
            ))
        }
        _ => None,
    })
}

fn explain(s: &Stuck, ops: &[&Op], values: &Interner) -> String {
    let mut out = match s.op.and_then(|i| ops.get(i)) {
        Some(op) => format!("{} cannot be linearized", describe(op)),
        None => "the history cannot be linearized".to_owned(),
    };
    let _ = write!(
        out,
        ": on the deepest path ({} completed ops linearized) the key is {}",
        s.depth,
        values.show(s.state)
    );
    if let Some(op) = s.last.and_then(|i| ops.get(i)) {
        let _ = write!(out, " after {}", describe(op));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K: &str = "k";

    fn op(id: u64, kind: OpKind, t: (u64, Option<u64>), outcome: Outcome) -> Op {
        Op {
            id,
            client: id as u32,
            key: K.to_owned(),
            kind,
            invoke_ns: t.0,
            complete_ns: t.1,
            outcome,
        }
    }
    fn put(id: u64, v: &str, t: (u64, Option<u64>), outcome: Outcome) -> Op {
        op(id, OpKind::Put(v.to_owned()), t, outcome)
    }
    fn post(id: u64, v: &str, t: (u64, Option<u64>), outcome: Outcome) -> Op {
        op(id, OpKind::Post(v.to_owned()), t, outcome)
    }
    fn get(id: u64, t: (u64, Option<u64>), read: Option<&str>) -> Op {
        op(id, OpKind::Get, t, Outcome::Read(read.map(str::to_owned)))
    }
    fn del(id: u64, t: (u64, Option<u64>), deleted: Option<&str>) -> Op {
        op(
            id,
            OpKind::Delete,
            t,
            Outcome::Deleted(deleted.map(str::to_owned)),
        )
    }
    fn at(invoke: u64, complete: u64) -> (u64, Option<u64>) {
        (invoke, Some(complete))
    }
    const NEVER: Option<u64> = None;

    fn assert_rejected(ops: &[Op], mentions: &str) {
        match check_key(ops) {
            Verdict::NotLinearizable { detail } => {
                assert!(
                    detail.contains(mentions),
                    "detail {detail:?} should mention {mentions:?}"
                )
            }
            v => panic!("expected NotLinearizable, got {v:?} for {ops:#?}"),
        }
    }
    fn assert_accepted(ops: &[Op]) {
        assert_eq!(check_key(ops), Verdict::Linearizable, "{ops:#?}");
    }

    // ---------- broken histories ----------

    #[test]
    fn lost_write_is_rejected() {
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            get(2, at(20, 30), None),
        ];
        assert_rejected(&h, "op 2");
    }

    #[test]
    fn reapplied_old_write_is_rejected() {
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            post(2, "b", at(20, 30), Outcome::Applied),
            get(3, at(40, 50), Some("a")),
        ];
        assert_rejected(&h, "op 3");
    }

    #[test]
    fn write_applied_twice_is_rejected() {
        // The same PUT applied twice: the key was known present the second time.
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            put(2, "a", at(20, 30), Outcome::Applied),
        ];
        assert_rejected(&h, "op 2");
        // Known present through a read in between.
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            get(2, at(20, 30), Some("a")),
            put(3, "b", at(40, 50), Outcome::Applied),
        ];
        assert_rejected(&h, "op 3");
    }

    #[test]
    fn stale_read_is_rejected() {
        // Write b completes, then a non-overlapping read returns the older a.
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            post(2, "b", at(20, 30), Outcome::Applied),
            get(3, at(25, 28), Some("b")),
            get(4, at(40, 50), Some("a")),
        ];
        assert_rejected(&h, "op 4");
        // New-then-old reads while the write is still pending.
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            post(2, "b", at(20, 100), Outcome::Applied),
            get(3, at(30, 40), Some("b")),
            get(4, at(50, 60), Some("a")),
        ];
        assert_rejected(&h, "op 4");
        // A read of a deleted value.
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            del(2, at(20, 30), Some("a")),
            get(3, at(40, 50), Some("a")),
        ];
        assert_rejected(&h, "op 3");
    }

    #[test]
    fn read_of_value_never_written_is_rejected() {
        assert_rejected(&[get(1, at(0, 10), Some("z"))], "op 1");
        let h = [
            put(1, "a", at(0, 100), Outcome::Applied),
            get(2, at(10, 20), Some("z")),
        ];
        assert_rejected(&h, "op 2");
    }

    #[test]
    fn wrong_outcomes_are_rejected() {
        // DELETE returning a value the key did not hold.
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            del(2, at(20, 30), Some("b")),
        ];
        assert_rejected(&h, "op 2");
        // POST rejected although the key is present; PUT rejected although absent.
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            post(2, "b", at(20, 30), Outcome::Rejected),
        ];
        assert_rejected(&h, "op 2");
        assert_rejected(&[put(1, "a", at(0, 10), Outcome::Rejected)], "op 1");
    }

    #[test]
    fn unknown_write_cannot_act_before_its_call() {
        let h = [
            get(1, at(0, 10), Some("a")),
            put(2, "a", (20, NEVER), Outcome::Unknown),
        ];
        assert_rejected(&h, "op 1");
    }

    #[test]
    fn malformed_ops_are_reported() {
        let h = [op(1, OpKind::Get, at(0, 10), Outcome::Applied)];
        assert_rejected(&h, "malformed");
    }

    #[test]
    fn detail_names_times_and_state() {
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            get(2, at(20, 30), None),
        ];
        let Verdict::NotLinearizable { detail } = check_key(&h) else {
            panic!()
        };
        assert!(
            detail.contains("invoked 20 ns") && detail.contains("completed 30 ns"),
            "{detail}"
        );
        assert!(detail.contains("\"a\""), "{detail}");
    }

    // ---------- valid histories ----------

    #[test]
    fn empty_history_is_linearizable() {
        assert_accepted(&[]);
        assert!(check(&[]).linearizable);
    }

    #[test]
    fn concurrent_ops_in_either_order() {
        // Two overlapping PUTs: either may win.
        for (first, second) in [
            (Outcome::Applied, Outcome::Rejected),
            (Outcome::Rejected, Outcome::Applied),
        ] {
            let winner = if first == Outcome::Applied { "a" } else { "b" };
            let h = [
                put(1, "a", at(0, 20), first.clone()),
                put(2, "b", at(5, 15), second.clone()),
                get(3, at(30, 40), Some(winner)),
            ];
            assert_accepted(&h);
        }
        // A read overlapping a write sees either value; later ones see the write.
        for read in [None, Some("a")] {
            let h = [
                put(1, "a", at(0, 100), Outcome::Applied),
                get(2, at(10, 20), read),
                get(3, at(110, 120), Some("a")),
            ];
            assert_accepted(&h);
        }
        // Overlapping reads may see the write in either order relative to each other...
        let h = [
            put(1, "a", at(0, 100), Outcome::Applied),
            get(2, at(10, 50), Some("a")),
            get(3, at(20, 60), None),
        ];
        assert_accepted(&h);
        // ...and ops touching at the same instant count as concurrent.
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            get(2, at(10, 20), None),
        ];
        assert_accepted(&h);
    }

    #[test]
    fn unknown_write_that_took_effect() {
        let h = [
            put(1, "a", (0, NEVER), Outcome::Unknown),
            get(2, at(50, 60), Some("a")),
        ];
        assert_accepted(&h);
        // Its completion time, if recorded, is ignored: it may act much later.
        let h = [
            put(1, "a", (0, Some(10)), Outcome::Unknown),
            get(2, at(50, 60), None),
            get(3, at(70, 80), Some("a")),
        ];
        assert_accepted(&h);
        // An unknown DELETE explains a vanished value.
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            op(2, OpKind::Delete, (20, NEVER), Outcome::Unknown),
            get(3, at(30, 40), None),
        ];
        assert_accepted(&h);
    }

    #[test]
    fn unknown_write_that_did_not_take_effect() {
        let h = [
            put(1, "a", (0, NEVER), Outcome::Unknown),
            get(2, at(50, 60), None),
            put(3, "b", at(70, 80), Outcome::Applied),
            get(4, at(90, 100), Some("b")),
        ];
        assert_accepted(&h);
    }

    #[test]
    fn failed_ops_are_ignored() {
        let h = [
            put(1, "a", at(0, 10), Outcome::Failed),
            get(2, at(20, 30), None),
            op(3, OpKind::Delete, at(40, 50), Outcome::Failed),
            op(4, OpKind::Get, (60, NEVER), Outcome::Failed),
        ];
        assert_accepted(&h);
        // A failed write cannot explain a read.
        let h = [
            put(1, "a", at(0, 10), Outcome::Failed),
            get(2, at(20, 30), Some("a")),
        ];
        assert_rejected(&h, "op 2");
    }

    #[test]
    fn delete_returns_the_right_value() {
        let h = [
            del(1, at(0, 10), None),
            put(2, "a", at(20, 30), Outcome::Applied),
            post(3, "b", at(40, 50), Outcome::Applied),
            del(4, at(60, 70), Some("b")),
            get(5, at(80, 90), None),
            post(6, "c", at(100, 110), Outcome::Rejected),
            put(7, "c", at(120, 130), Outcome::Applied),
            get(8, at(140, 150), Some("c")),
        ];
        assert_accepted(&h);
    }

    #[test]
    fn check_groups_by_key() {
        let mut h = vec![
            put(1, "a", at(0, 10), Outcome::Applied),
            get(2, at(20, 30), Some("a")),
        ];
        let mut bad = vec![
            put(3, "a", at(0, 10), Outcome::Applied),
            get(4, at(20, 30), None),
        ];
        for o in &mut bad {
            o.key = "bad".to_owned();
        }
        h.append(&mut bad);
        h.push(op(5, OpKind::Get, at(0, 1), Outcome::Failed));
        let report = check(&h);
        assert_eq!(report.ops, 5);
        assert_eq!(report.keys, 2);
        assert!(!report.linearizable);
        assert!(report.inconclusive.is_empty());
        assert_eq!(report.not_linearizable.len(), 1);
        assert_eq!(report.not_linearizable[0].0, "bad");
        assert!(report.not_linearizable[0].1.contains("op 4"));
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"not_linearizable\""));
    }

    #[test]
    fn step_limit_gives_inconclusive() {
        let h = [
            put(1, "a", at(0, 10), Outcome::Applied),
            get(2, at(20, 30), Some("a")),
            del(3, at(40, 50), Some("a")),
        ];
        assert!(matches!(
            check_key_with_limit(&h, 2),
            Verdict::Inconclusive { .. }
        ));
        assert_eq!(check_key_with_limit(&h, 100), Verdict::Linearizable);
        let report = check_with_limit(&h, 2);
        assert!(!report.linearizable);
        assert_eq!(report.inconclusive.len(), 1);
    }

    #[test]
    fn ops_round_trip_through_json() {
        let o = put(1, "a", (5, NEVER), Outcome::Unknown);
        let back: Op = serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
        assert_eq!(back, o);
    }

    #[test]
    fn write_of_the_current_value_is_still_a_write() {
        // POST("a") on "a" changes nothing here, but it must not be placed before POST("b"):
        // the DELETE then sees "b".
        let h = [
            put(1, "a", at(0, 0), Outcome::Applied),
            post(2, "b", at(77, 97), Outcome::Applied),
            post(3, "a", at(97, 117), Outcome::Applied),
            del(4, at(117, 117), Some("a")),
        ];
        assert_accepted(&h);
    }

    #[test]
    fn unread_values_are_interchangeable_but_not_with_read_ones() {
        // Lost unknown writes of values nobody read, and a PUT rejected because one of them
        // made the key present.
        let h = [
            put(1, "x", (0, NEVER), Outcome::Unknown),
            put(2, "y", (1, NEVER), Outcome::Unknown),
            put(3, "z", (2, NEVER), Outcome::Unknown),
            put(4, "a", at(10, 20), Outcome::Rejected),
            del(5, at(30, 40), Some("z")),
            get(6, at(50, 60), None),
        ];
        assert_accepted(&h);
        // The value PUT 4 saw must be one an unknown write wrote: not "a" (it was rejected).
        let h = [
            put(1, "x", (0, NEVER), Outcome::Unknown),
            put(4, "a", at(10, 20), Outcome::Rejected),
            get(5, at(30, 40), Some("a")),
        ];
        assert_rejected(&h, "no write of \"a\"");
        // An unknown write cannot be read before a completed one overwrote it... twice.
        let h = [
            put(1, "x", (0, NEVER), Outcome::Unknown),
            get(2, at(10, 20), Some("x")),
            post(3, "b", at(30, 40), Outcome::Applied),
            get(4, at(50, 60), Some("x")),
        ];
        assert_rejected(&h, "op 4");
    }

    #[test]
    fn completed_op_without_completion_time_may_act_late() {
        let h = [
            put(1, "a", (0, NEVER), Outcome::Applied),
            get(2, at(10, 20), None),
            get(3, at(30, 40), Some("a")),
        ];
        assert_accepted(&h);
        // ...but it must act.
        let h = [
            put(1, "a", (0, NEVER), Outcome::Applied),
            del(2, at(10, 20), None),
        ];
        assert_accepted(&h);
        let h = [
            put(1, "a", (0, NEVER), Outcome::Applied),
            put(2, "b", (0, NEVER), Outcome::Applied),
        ];
        assert_rejected(&h, "cannot be linearized");
    }

    // ---------- generated histories ----------

    /// What happened to a generated op.
    #[derive(Clone, Copy, Debug)]
    enum Fate {
        Completed,
        UnknownApplied,
        UnknownLost,
        Failed,
    }

    fn fate() -> impl Strategy<Value = Fate> {
        prop_oneof![
            12 => Just(Fate::Completed),
            1 => Just(Fate::UnknownApplied),
            1 => Just(Fate::UnknownLost),
            1 => Just(Fate::Failed),
        ]
    }

    /// More unknown ops, for small histories.
    fn fate_often_unknown() -> impl Strategy<Value = Fate> {
        prop_oneof![
            4 => Just(Fate::Completed),
            2 => Just(Fate::UnknownApplied),
            2 => Just(Fate::UnknownLost),
            1 => Just(Fate::Failed),
        ]
    }

    fn kind() -> impl Strategy<Value = OpKind> {
        let value = proptest::sample::select(&["a", "b", "c"][..]).prop_map(str::to_owned);
        prop_oneof![
            3 => Just(OpKind::Get),
            2 => value.clone().prop_map(OpKind::Put),
            2 => value.prop_map(OpKind::Post),
            1 => Just(OpKind::Delete),
        ]
    }

    /// Runs `op` on the model, returning the outcome.
    fn run(state: &mut Option<String>, kind: &OpKind) -> Outcome {
        match kind {
            OpKind::Get => Outcome::Read(state.clone()),
            OpKind::Put(v) if state.is_none() => {
                *state = Some(v.clone());
                Outcome::Applied
            }
            OpKind::Post(v) if state.is_some() => {
                *state = Some(v.clone());
                Outcome::Applied
            }
            OpKind::Put(_) | OpKind::Post(_) => Outcome::Rejected,
            OpKind::Delete => Outcome::Deleted(state.take()),
        }
    }

    /// A generated op before execution: its interval and linearization point.
    struct Planned {
        op: Op,
        point: u64,
        fate: Fate,
    }

    /// Executes planned ops atomically at their points (per-key models) and fills in outcomes.
    fn execute(mut planned: Vec<Planned>) -> Vec<Op> {
        planned.sort_by_key(|p| (p.point, p.op.id));
        let mut models: HashMap<String, Option<String>> = HashMap::new();
        for p in &mut planned {
            let state = models.entry(p.op.key.clone()).or_default();
            p.op.outcome = match p.fate {
                Fate::Completed => run(state, &p.op.kind),
                Fate::UnknownApplied => {
                    run(state, &p.op.kind);
                    Outcome::Unknown
                }
                Fate::UnknownLost => Outcome::Unknown,
                Fate::Failed => Outcome::Failed,
            };
            if matches!(p.fate, Fate::UnknownApplied | Fate::UnknownLost) {
                p.op.complete_ns = None;
            }
        }
        let mut ops: Vec<Op> = planned.into_iter().map(|p| p.op).collect();
        ops.sort_by_key(|o| o.id);
        ops
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn sequential_histories_are_linearizable(
            plan in prop::collection::vec((kind(), fate(), 0..2usize), 0..60)
        ) {
            let keys = ["k", "j"];
            let planned = plan
                .into_iter()
                .enumerate()
                .map(|(i, (kind, fate, key))| {
                    let t = i as u64 * 10;
                    Planned {
                        op: Op {
                            id: i as u64,
                            client: (i % 3) as u32,
                            key: keys[key].to_owned(),
                            kind,
                            invoke_ns: t,
                            complete_ns: Some(t + 5),
                            outcome: Outcome::Unknown,
                        },
                        point: t + 2,
                        fate,
                    }
                })
                .collect();
            let ops = execute(planned);
            let report = check(&ops);
            prop_assert!(report.linearizable, "{report:?} for {ops:#?}");
        }

        #[test]
        fn concurrent_histories_are_linearizable(
            clients in prop::collection::vec(
                prop::collection::vec((kind(), fate(), 0..2usize, 0..20u64, 0..30u64, any::<u64>()), 0..25),
                1..6,
            )
        ) {
            let keys = ["k", "j"];
            let mut planned = Vec::new();
            let mut id = 0;
            for (c, ops) in clients.into_iter().enumerate() {
                let mut t = 0;
                for (kind, fate, key, gap, dur, frac) in ops {
                    let invoke = t + gap;
                    let complete = invoke + dur;
                    planned.push(Planned {
                        op: Op {
                            id,
                            client: c as u32,
                            key: keys[key].to_owned(),
                            kind,
                            invoke_ns: invoke,
                            complete_ns: Some(complete),
                            outcome: Outcome::Unknown,
                        },
                        point: invoke + frac % (dur + 1),
                        fate,
                    });
                    id += 1;
                    t = complete;
                }
            }
            let ops = execute(planned);
            let report = check(&ops);
            prop_assert!(report.linearizable, "{report:?} for {ops:#?}");
        }

        #[test]
        fn agrees_with_brute_force_on_small_histories(
            clients in prop::collection::vec(
                prop::collection::vec(
                    (kind(), fate_often_unknown(), 0..4u64, 0..6u64, any::<u64>()),
                    0..4,
                ),
                1..4,
            ),
            tampered in prop::collection::vec((any::<prop::sample::Index>(), outcome()), 0..3),
        ) {
            let mut planned = Vec::new();
            let mut id = 0;
            for (c, ops) in clients.into_iter().enumerate() {
                let mut t = 0;
                for (kind, fate, gap, dur, frac) in ops {
                    let invoke = t + gap;
                    let complete = invoke + dur;
                    planned.push(Planned {
                        op: Op {
                            id,
                            client: c as u32,
                            key: K.to_owned(),
                            kind,
                            invoke_ns: invoke,
                            complete_ns: Some(complete),
                            outcome: Outcome::Unknown,
                        },
                        point: invoke + frac % (dur + 1),
                        fate,
                    });
                    id += 1;
                    t = complete;
                }
            }
            let mut ops = execute(planned);
            // Replace some outcomes with arbitrary (well-formed) ones, often breaking the history.
            for (index, outcome) in tampered {
                if ops.is_empty() {
                    break;
                }
                let at = index.index(ops.len());
                let op = &mut ops[at];
                op.outcome = outcome.for_kind(&op.kind);
            }
            let expected = brute_force(&ops);
            let verdict = check_key(&ops);
            prop_assert_eq!(
                verdict == Verdict::Linearizable,
                expected,
                "checker said {:?} for {:#?}",
                verdict,
                ops
            );
        }
    }

    /// An arbitrary outcome, made well-formed for a request by `for_kind`.
    #[derive(Clone, Debug)]
    struct AnyOutcome(u8, Option<String>);

    impl AnyOutcome {
        fn for_kind(&self, kind: &OpKind) -> Outcome {
            match (kind, self.0 % 4) {
                (_, 3) => Outcome::Unknown,
                (OpKind::Get, _) => Outcome::Read(self.1.clone()),
                (OpKind::Delete, _) => Outcome::Deleted(self.1.clone()),
                (_, 0) => Outcome::Applied,
                _ => Outcome::Rejected,
            }
        }
    }

    fn outcome() -> impl Strategy<Value = AnyOutcome> {
        let value = prop::option::of(proptest::sample::select(&["a", "b", "c"][..]));
        (any::<u8>(), value).prop_map(|(tag, v)| AnyOutcome(tag, v.map(str::to_owned)))
    }

    /// Linearizability by trying every order (tiny histories only).
    fn brute_force(ops: &[Op]) -> bool {
        let ops: Vec<&Op> = ops
            .iter()
            .filter(|o| o.outcome != Outcome::Failed)
            .collect();
        // a must precede b when a returned before b was invoked.
        let before = |a: &Op, b: &Op| {
            a.outcome != Outcome::Unknown && a.complete_ns.is_some_and(|c| c < b.invoke_ns)
        };
        fn go(
            ops: &[&Op],
            done: &mut Vec<bool>,
            state: Option<String>,
            before: &dyn Fn(&Op, &Op) -> bool,
        ) -> bool {
            if ops
                .iter()
                .zip(done.iter())
                .all(|(o, &d)| d || o.outcome == Outcome::Unknown)
            {
                return true;
            }
            for i in 0..ops.len() {
                let ready = !done[i] && (0..ops.len()).all(|j| done[j] || !before(ops[j], ops[i]));
                if !ready {
                    continue;
                }
                let mut next = state.clone();
                let outcome = run(&mut next, &ops[i].kind);
                if ops[i].outcome == Outcome::Unknown || ops[i].outcome == outcome {
                    done[i] = true;
                    if go(ops, done, next, before) {
                        return true;
                    }
                    done[i] = false;
                }
            }
            false
        }
        go(&ops, &mut vec![false; ops.len()], None, &before)
    }

    // ---------- performance ----------

    /// splitmix64: deterministic, dependency-free.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// `total` ops on one key from `clients` clients, each op executed atomically at a random
    /// point of its interval; `unknown` of them (spread out) get no answer, half of those applied.
    fn generated(seed: u64, clients: u32, total: usize, unknown: usize) -> Vec<Op> {
        generated_with(seed, clients, total, unknown, false)
    }

    fn generated_with(
        seed: u64,
        clients: u32,
        total: usize,
        unknown: usize,
        unique: bool,
    ) -> Vec<Op> {
        let mut rng = Rng(seed);
        let values = ["a", "b", "c", "d"];
        let mut planned = Vec::with_capacity(total);
        let mut clock = vec![0u64; clients as usize];
        for id in 0..total as u64 {
            let c = rng.below(u64::from(clients)) as usize;
            let v = if unique {
                format!("v{id}")
            } else {
                values[rng.below(values.len() as u64) as usize].to_owned()
            };
            let kind = match rng.below(8) {
                0..=2 => OpKind::Get,
                3 | 4 => OpKind::Put(v),
                5 | 6 => OpKind::Post(v),
                _ => OpKind::Delete,
            };
            let invoke = clock[c] + rng.below(50);
            let dur = 1 + rng.below(200);
            let fate = if unknown > 0 && id % (total / unknown) as u64 == 7 {
                if rng.below(2) == 0 {
                    Fate::UnknownApplied
                } else {
                    Fate::UnknownLost
                }
            } else {
                Fate::Completed
            };
            planned.push(Planned {
                op: Op {
                    id,
                    client: c as u32,
                    key: K.to_owned(),
                    kind,
                    invoke_ns: invoke,
                    complete_ns: Some(invoke + dur),
                    outcome: Outcome::Unknown,
                },
                point: invoke + rng.below(dur + 1),
                fate,
            });
            clock[c] = invoke + dur;
        }
        execute(planned)
    }

    /// The check's verdict and the CPU time this thread spent on it (not wall time: the bound
    /// guards the checker's complexity, and other processes on a loaded machine must not move it).
    fn timed(ops: &[Op]) -> (Verdict, std::time::Duration) {
        let cpu = crate::metrics::thread_cpu_time;
        let start = cpu();
        let v = check_key(ops);
        (v, cpu() - start)
    }

    /// Appends a GET, after everything else, of the value the first applied PUT wrote: stale,
    /// as long as values are unique.
    fn with_stale_read_at_end(mut ops: Vec<Op>) -> Vec<Op> {
        let v0 = ops
            .iter()
            .find_map(|o| match (&o.kind, &o.outcome) {
                (OpKind::Put(v), Outcome::Applied) => Some(v.clone()),
                _ => None,
            })
            .unwrap();
        let end = ops.iter().filter_map(|o| o.complete_ns).max().unwrap();
        ops.push(get(1_000_000, at(end + 10, end + 20), Some(&v0)));
        ops
    }

    fn assert_fast(took: std::time::Duration) {
        if !cfg!(debug_assertions) {
            assert!(took.as_secs_f64() < 2.0, "took {took:?}");
        }
    }

    #[test]
    fn twenty_thousand_ops_four_clients_check_fast() {
        let ops = generated(1, 4, 20_000, 0);
        let (v, took) = timed(&ops);
        eprintln!("20k ops, 4 clients: {took:?}");
        assert_eq!(v, Verdict::Linearizable);
        assert_fast(took);
    }

    #[test]
    fn twenty_thousand_ops_eight_clients_with_unknowns_check_fast() {
        for (unknown, unique) in [(6, false), (20, true)] {
            let ops = generated_with(2, 8, 20_000, unknown, unique);
            let (v, took) = timed(&ops);
            eprintln!("20k ops, 8 clients, {unknown} unknown: {took:?}");
            assert_eq!(v, Verdict::Linearizable);
            assert_fast(took);
        }
    }

    #[test]
    fn twenty_thousand_ops_with_a_late_stale_read_are_rejected() {
        // The worst case for the search: it has to rule out every placement of the unknown
        // ops over the whole history.
        for (clients, unknown) in [(4, 0), (8, 6)] {
            let ops = with_stale_read_at_end(generated_with(3, clients, 20_000, unknown, true));
            let (v, took) = timed(&ops);
            eprintln!(
                "20k ops, {clients} clients, {unknown} unknown, stale read at the end: {took:?}"
            );
            let Verdict::NotLinearizable { detail } = v else {
                panic!("{v:?}")
            };
            assert!(detail.contains("op 1000000"), "{detail}");
            assert_fast(took);
        }
    }

    #[test]
    fn many_unknown_ops_on_one_key_still_check() {
        // 200 unknown ops (half of them lost, all pending forever), unique values.
        let ops = generated_with(4, 8, 20_000, 200, true);
        let (v, took) = timed(&ops);
        eprintln!("20k ops, 8 clients, 200 unknown: {took:?}");
        assert_eq!(v, Verdict::Linearizable);
        assert_fast(took);
    }

    #[test]
    fn never_written_value_is_caught_without_search() {
        let mut ops = generated_with(5, 8, 20_000, 200, true);
        ops.push(get(1_000_000, at(100, 200), Some("never")));
        let (v, took) = timed(&ops);
        let Verdict::NotLinearizable { detail } = v else {
            panic!("{v:?}")
        };
        assert!(
            detail.contains("op 1000000") && detail.contains("no write"),
            "{detail}"
        );
        assert!(took.as_secs_f64() < 2.0, "took {took:?}");
    }
}
