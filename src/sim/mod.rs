//! Deterministic simulation of the whole failover protocol: the real state machines (`ha::router`
//! with its witness, `ha::replica`) driven by a simulated clock and network, with random faults
//! and random client operations, the history checked by the linearizability checker.
//!
//! One seed is one run: every random choice comes from a generator seeded with it, so a failing
//! seed replays exactly (`tuplespace simulate --seed N --verbose`). In the spirit of
//! FoundationDB's and TigerBeetle's simulation testing, the executors here mirror `src/proxy.rs`
//! and `src/server/` closely (what each action does, what a link failure looks like), and the
//! store is a per-key model of `server/store.rs` (apply in order, sequence numbers, dedupe table
//! trimmed by the watermark, snapshots).
//!
//! The network: every connection is a set of ordered streams (control, relay, replication,
//! heartbeat), each delivering in order with its own random delay, so messages on different
//! streams interleave freely. A cut (one-way or both ways) holds a connection's packets; one held
//! longer than the idle timeout kills the connection at both ends, as QUIC does. A paused process
//! handles nothing (nor does its log writer); its peers' connections to it die after the idle
//! timeout. `kill -9` ends a process at once; its peers notice only by the idle timeout.
//! Duplicated control messages are injected too (a re-sent grant, fence, report).
//!
//! The disks (`disk.rs`, mirroring `src/durable`): every replica process has a log directory on
//! the host it runs on (one host, as `up` lays it out; two in launch-command mode, a backup on
//! the host its primary is not on). The store's records (applied writes, a backup's initial
//! copy, epoch rises) are appended in store order; the log writer syncs them in groups after a
//! random disk delay and publishes what is held, which the executor steps as `LogDurable`; a
//! backup acknowledges its copy and updates only once held (`links::acknowledge`). A process
//! that dies loses what was not synced (a power cut of a host may keep part of the group being
//! synced: a torn tail); an operator restarts a primary from the most advanced complete copy on
//! a host (`durable::recover`), which claims that copy's epoch in its hello. Faults added: power
//! cuts of a host or of everything, and restarts from the logs.
//!
//! Properties checked on every run: every client history is linearizable per key (so no
//! acknowledged write is lost and none is applied twice, since every written value is unique,
//! also across restarts from the logs); at most one replica releases writes in an epoch (a
//! primary restarted from a copy may go on in that copy's epoch once the replica that served it
//! is gone, and only if the copy holds every update released in it); and, once every fault has
//! healed and an operator has restarted a primary from the logs if none runs, a write succeeds
//! within a bounded time (without logs: unless both replicas' data is gone).

mod disk;
pub mod rng;
pub mod world;

pub use world::{Fault, Plan, Recovery, Report, SimParams, Target, run};

/// Runs seeds `start..start+count` on `threads` threads; returns the failing seeds with their
/// reports (first `keep` failures) and how many ran.
pub fn run_many(
    start: u64,
    count: u64,
    threads: usize,
    params: &SimParams,
    keep: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> (u64, Vec<(u64, Report)>) {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    let next = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let seed = start + i;
                    let r = run(seed, params, &Plan::Random);
                    if !r.ok()
                        && let Ok(mut f) = failures.lock()
                        && f.len() < keep
                    {
                        f.push((seed, r));
                    }
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if d.is_multiple_of(10_000) {
                        progress(d);
                    }
                }
            });
        }
    });
    let mut f = failures.into_inner().unwrap_or_default();
    f.sort_by_key(|(s, _)| *s);
    (done.load(Ordering::Relaxed), f)
}
