//! Scan threads: compiling client patterns and matching them over the space, away from the store
//! thread that applies writes.
//!
//! Compiling a regular expression can take tens of milliseconds and matching one over a large
//! space seconds; on the store thread either would hold up every write behind it. The store runs
//! only requests that need no regex and at most a few map lookups itself; every other GET and
//! DELETE becomes a [`Job`] for a small pool of scan threads (`scan_threads`), which match it on an
//! O(1) copy of the space (a copy taken when the job starts, so a queued job pins no old version).
//!
//! A GET takes effect at its copy. A DELETE is matched on a copy and applied later by the store:
//! the match is brought up to date with what changed in between (`Space::changes_to`, which
//! visits only changed parts of the tree), in further rounds here while writes keep coming, and a
//! last time by the store over the few keys changed during the last round. Answers are bounded
//! while they are built: a scan stops as soon as its answer passes `max_response_bytes`.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use crate::space::{Pair, Pattern, PatternLimits, Space};
use crate::wire::client::AnswerSize;
use crate::wire::node::Reply;

/// A pattern as the store hands it over: compiled already (cache hit), or its source.
#[derive(Clone, Debug)]
pub enum Pat {
    Compiled(Pattern),
    Source(String),
    /// Known not to compile, and why.
    Invalid(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Get,
    Delete,
}

/// What a job does.
#[derive(Debug)]
pub enum Work {
    /// Compile the patterns and match them over a copy of the space.
    Scan { key: Pat, value: Pat },
    /// Bring a DELETE's match from `base` up to date with a newer copy.
    Revalidate {
        key: Pattern,
        value: Pattern,
        base: Space,
        matched: Vec<Pair>,
        size: AnswerSize,
    },
}

/// One request for a scan thread.
#[derive(Debug)]
pub struct Job {
    pub rid: u64,
    pub client: u64,
    pub kind: Kind,
    /// At most this many pairs, the first in key order (PROTOCOL.md §4a).
    pub limit: Option<u64>,
    /// How long the request may wait for a match, in ms (0: it does not wait).
    pub wait_ms: u64,
    pub work: Work,
    /// Rounds of matching done so far for this request.
    pub round: u32,
    /// The copy to work on, when the store could hand it over at once (a thread was idle).
    pub copy: Option<(Space, u64)>,
    /// When the store took the request (for the apply-latency metric only).
    pub started: std::time::Instant,
}

/// What a scan thread found.
#[derive(Debug)]
// One per job, moved once (inside a boxed `Done`): the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// Answer this (a pattern that does not compile, or an answer past the limit): nothing to
    /// apply.
    Answer(Reply),
    /// The matching pairs (ascending) in `copy`.
    Matched {
        key: Pattern,
        value: Pattern,
        pairs: Vec<Pair>,
        size: AnswerSize,
        copy: Space,
    },
}

#[derive(Debug)]
pub struct Done {
    pub rid: u64,
    pub client: u64,
    pub kind: Kind,
    pub limit: Option<u64>,
    pub wait_ms: u64,
    pub round: u32,
    /// The update the copy reflects.
    pub seq: u64,
    pub outcome: Outcome,
    /// Patterns compiled for this job (for the store's cache).
    pub compiled: Vec<(String, Result<Pattern, String>)>,
    /// The job's `started`.
    pub started: std::time::Instant,
}

/// The answer a scan gives when it stops at `max`.
pub fn too_large(size: &AnswerSize, max: usize) -> Reply {
    Reply::TooLarge(format!(
        "the answer would hold more than {} pairs (over {max} bytes, max_response_bytes); nothing was changed: narrow the pattern",
        size.pairs()
    ))
}

/// Every pair of `space` matching both patterns (the first `limit` of them, ascending, if there
/// is a limit), unless the answer passes `max` bytes.
pub fn matching(
    space: &Space,
    key: &Pattern,
    value: &Pattern,
    max: usize,
    limit: Option<u64>,
) -> Result<(Vec<Pair>, AnswerSize), AnswerSize> {
    let limit = limit_of(limit);
    let mut size = AnswerSize::default();
    let mut over = false;
    let (pairs, _) = space.get_while(key, value, |k, v| {
        if size.pairs() >= limit {
            return false;
        }
        size.add(k, v);
        over = size.bytes() > max;
        !over
    });
    if over { Err(size) } else { Ok((pairs, size)) }
}

/// A request's `limit` as a count (none: no limit).
pub fn limit_of(limit: Option<u64>) -> usize {
    limit.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// `matched` (the pairs of `base` matching both patterns, ascending) as it is in `now`, a later
/// version of the same space: visits only what changed. Err if the answer passes `max`.
pub fn revalidate(
    base: &Space,
    now: &Space,
    matched: Vec<Pair>,
    mut size: AnswerSize,
    key: &Pattern,
    value: &Pattern,
    max: usize,
) -> Result<(Vec<Pair>, AnswerSize), AnswerSize> {
    let mut changes = base.changes_to(now).peekable();
    if changes.peek().is_none() {
        return Ok((matched, size));
    }
    let mut out = Vec::with_capacity(matched.len());
    let mut old = matched.into_iter().peekable();
    for (k, v) in changes {
        while let Some(p) = old.next_if(|p| p.key.as_str() < k) {
            out.push(p);
        }
        if let Some(p) = old.next_if(|p| p.key == k) {
            size.sub(&p.key, &p.value);
        }
        if let Some(v) = v
            && key.is_match(k)
            && value.is_match(v)
        {
            size.add(k, v);
            out.push(Pair::new(k, v));
        }
    }
    out.extend(old);
    if size.bytes() > max {
        Err(size)
    } else {
        Ok((out, size))
    }
}

/// Runs one job on `copy` (the space at update `seq`).
pub fn run(job: Job, copy: Space, seq: u64, limits: &PatternLimits, max: usize) -> Done {
    let mut compiled = Vec::new();
    let outcome = match job.work {
        Work::Scan { key, value } => {
            let mut get = |p: Pat| match p {
                Pat::Compiled(p) => Ok(p),
                Pat::Invalid(m) => Err(m),
                Pat::Source(src) => {
                    let r = Pattern::compile(&src, limits).map_err(|e| e.to_string());
                    compiled.push((src, r.clone()));
                    r
                }
            };
            let (k, v) = (get(key), get(value));
            match (k, v) {
                (Ok(k), Ok(v)) => match matching(&copy, &k, &v, max, job.limit) {
                    Ok((pairs, size)) => Outcome::Matched {
                        key: k,
                        value: v,
                        pairs,
                        size,
                        copy,
                    },
                    Err(size) => Outcome::Answer(too_large(&size, max)),
                },
                (Err(m), _) | (_, Err(m)) => Outcome::Answer(Reply::Pairs {
                    pairs: vec![],
                    message: Some(m),
                }),
            }
        }
        Work::Revalidate {
            key,
            value,
            base,
            matched,
            size,
        } => match revalidate(&base, &copy, matched, size, &key, &value, max) {
            Ok((pairs, size)) => Outcome::Matched {
                key,
                value,
                pairs,
                size,
                copy,
            },
            Err(size) => Outcome::Answer(too_large(&size, max)),
        },
    };
    Done {
        rid: job.rid,
        client: job.client,
        kind: job.kind,
        limit: job.limit,
        wait_ms: job.wait_ms,
        round: job.round + 1,
        seq,
        outcome,
        compiled,
        started: job.started,
    }
}

struct State {
    queue: VecDeque<Job>,
    idle: usize,
    closed: bool,
}

/// The scan threads and their queue. The queue holds at most one job per client connection (the
/// store runs a connection's requests one after another while one of them is here), so it is
/// bounded by the proxy's `max_clients`.
pub struct Pool {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Pool {
    /// Starts `threads` scan threads. `copy` asks the store thread for a copy of the space (and
    /// the update it reflects); `done` hands a finished job back. Both return false once the store
    /// is gone, which ends the thread.
    pub fn start(
        threads: usize,
        limits: PatternLimits,
        max: usize,
        copy: impl Fn() -> Option<(Space, u64)> + Send + Sync + 'static,
        done: impl Fn(Done) -> bool + Send + Sync + 'static,
    ) -> std::io::Result<Pool> {
        let shared = Arc::new((
            Mutex::new(State {
                queue: VecDeque::new(),
                idle: 0,
                closed: false,
            }),
            Condvar::new(),
        ));
        let copy = Arc::new(copy);
        let done = Arc::new(done);
        for i in 0..threads {
            let shared = shared.clone();
            let copy = copy.clone();
            let done = done.clone();
            std::thread::Builder::new()
                .name(format!("scan-{i}"))
                .spawn(move || {
                    while let Some(mut job) = next(&shared) {
                        let Some((space, seq)) = job.copy.take().or_else(|| copy()) else {
                            return;
                        };
                        if !done(run(job, space, seq, &limits, max)) {
                            return;
                        }
                    }
                })?;
        }
        Ok(Pool { shared })
    }

    /// Queues `job` (at the front: `urgent`, a DELETE being brought up to date). `copy` is called
    /// when a thread is idle to take the job at once: it then starts from that copy.
    pub fn submit(&self, mut job: Job, urgent: bool, copy: impl FnOnce() -> (Space, u64)) {
        let (m, cv) = &*self.shared;
        let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
        if s.idle > s.queue.len() {
            job.copy = Some(copy());
        }
        if urgent {
            s.queue.push_front(job);
        } else {
            s.queue.push_back(job);
        }
        cv.notify_one();
    }
}

fn next(shared: &(Mutex<State>, Condvar)) -> Option<Job> {
    let (m, cv) = shared;
    let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if s.closed {
            return None;
        }
        if let Some(j) = s.queue.pop_front() {
            return Some(j);
        }
        s.idle += 1;
        s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
        s.idle -= 1;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let (m, cv) = &*self.shared;
        m.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> Pattern {
        Pattern::compile(s, &PatternLimits::default()).unwrap()
    }

    #[test]
    fn revalidate_equals_a_fresh_match() {
        let mut s: Space = (0..2000)
            .map(|i| (format!("k,{i}"), format!("v{}", i % 7)))
            .collect();
        let (k, v) = (pat(r"k,\d*5\d*"), pat("v[0-3]"));
        let base = s.clone();
        let (m, size) = matching(&base, &k, &v, usize::MAX, None).unwrap();
        // Inserts that match and do not, a value changed to match and one to stop matching,
        // removals of a match and of a non-match.
        s.put(vec![
            Some(Pair::new("k,5555", "v1")),
            Some(Pair::new("k,55556", "v9")),
            Some(Pair::new("a", "v1")),
        ]);
        s.post(vec![
            Some(Pair::new("k,15", "v2")),
            Some(Pair::new("k,25", "v9")),
        ]);
        s.delete(&pat("k,35|k,45|k,1"), &pat(".*"));
        let (got, got_size) = revalidate(&base, &s, m, size, &k, &v, usize::MAX).unwrap();
        let (want, want_size) = matching(&s, &k, &v, usize::MAX, None).unwrap();
        assert_eq!(got, want);
        assert_eq!(got_size.bytes(), want_size.bytes());
        assert_eq!(got_size.pairs(), want_size.pairs());
    }

    #[test]
    fn scans_stop_at_the_limit() {
        let s: Space = (0..10_000)
            .map(|i| (format!("k,{i}"), "x".repeat(100)))
            .collect();
        let e = matching(&s, &pat(".*"), &pat(".*"), 10_000, None).unwrap_err();
        assert!(e.pairs() < 100, "stopped after {} pairs", e.pairs());
        assert!(matching(&s, &pat("k,1.*"), &pat(".*"), 1 << 20, None).is_ok());
        // A limit stops the scan before the size does.
        let (got, _) = matching(&s, &pat(".*"), &pat(".*"), 10_000, Some(3)).unwrap();
        let keys: Vec<_> = got.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["k,0", "k,1", "k,10"]);
    }

    #[test]
    fn a_pool_runs_jobs_and_reports_bad_patterns() {
        let space: Space = (0..100)
            .map(|i| (format!("k,{i}"), "v".to_owned()))
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let copy_space = space.clone();
        let pool = Pool::start(
            2,
            PatternLimits::default(),
            usize::MAX,
            move || Some((copy_space.clone(), 7)),
            move |d| tx.send(d).is_ok(),
        )
        .unwrap();
        for (rid, key) in [(1, r"k,\d"), (2, "(unclosed")] {
            pool.submit(
                Job {
                    rid,
                    client: 1,
                    kind: Kind::Get,
                    limit: None,
                    wait_ms: 0,
                    work: Work::Scan {
                        key: Pat::Source(key.into()),
                        value: Pat::Source(".*".into()),
                    },
                    round: 0,
                    copy: None,
                    started: std::time::Instant::now(),
                },
                false,
                || (space.clone(), 7),
            );
        }
        let mut got: Vec<Done> = (0..2)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap())
            .collect();
        got.sort_by_key(|d| d.rid);
        assert!(matches!(&got[0].outcome, Outcome::Matched { pairs, .. } if pairs.len() == 10));
        assert_eq!(got[0].seq, 7);
        assert!(matches!(&got[1].outcome,
            Outcome::Answer(Reply::Pairs { pairs, message: Some(m) }) if pairs.is_empty() && m.contains("does not compile")));
        assert_eq!(got[1].compiled.len(), 2);
    }
}
