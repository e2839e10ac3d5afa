//! The thread that owns a replica's tuple space.
//!
//! A plain OS thread, not an async task: a regex scan over a million pairs or a DELETE over the
//! whole space blocks only this thread, never the event loops that carry heartbeats. Writes are
//! applied here one after another in arrival order, which is the order the proxy sent them.
//! This thread never compiles or runs a regular expression on a request's behalf and never scans
//! a range of keys: such GETs and DELETEs go to the scan threads (`scan`), which work on O(1)
//! copies of the space, so a slow or expensive pattern does not hold up later writes. Requests of
//! one client connection still take effect in the order they were sent: while one of its requests
//! is with the scan threads, the connection's later requests wait here.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::durable::dedupe::{self, DEDUPE_CHUNK_BYTES, Dedupe};
use crate::durable::wal::{Wal, WalMsg};
use crate::durable::{Position, Record, SNAPSHOT_CHUNK};
use crate::metrics::{OpLabel, ServerMetrics};
use crate::space::waiters::{Action as WaitAction, Millis, Refused, Waiter, Waiters};
use crate::space::{self, Change, IndexHint, Pair, Pattern, Space};
use crate::wire::cbor::RawItem;
use crate::wire::client::{AnswerSize, Command, pair_from_raw};
use crate::wire::node::{RelayReply, Reply};

use super::scan::{self, Done, Job, Kind, Outcome, Pat, Pool, Work};

/// Rounds a DELETE's match is brought up to date on the scan threads while writes keep coming;
/// after them the store does it over the keys changed during the last round.
const OFFLOAD_ROUNDS: u32 = 3;
/// Compiled patterns kept for reuse (clients repeat the same patterns).
const PATTERN_CACHE: usize = 1024;
/// Only short patterns are cached: a compiled regex may be as large as `regex_size_limit`, and a
/// client must not be able to pin thousands of those in memory.
const PATTERN_CACHE_MAX_SOURCE: usize = 64;
/// Least time between two warnings that the dedupe table dropped entries.
const EVICTION_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A copy of the space, the update it reflects, and the dedupe table (for a new backup).
pub type SpaceCopy = (Space, u64, Vec<(u64, Reply)>);

/// Work for the store thread.
pub enum StoreMsg {
    /// Relayed requests, in order, with the gate of the proxy link they came on.
    Requests(Relayed, Arc<crate::server::links::RelayGate>),
    /// The proxy has answered every rid below this.
    Watermark(u64),
    /// A backup applies a primary's update (with the reply, for dedupe). `logged`: the
    /// replication reader already handed it to the log writer ([`DirectLog`]); else the store
    /// logs it.
    Apply {
        seq: u64,
        rid: u64,
        change: Change,
        reply: Reply,
        logged: bool,
    },
    /// Replace the whole space (backup: initial copy).
    Load {
        pairs: Vec<(String, String)>,
        reset: bool,
    },
    /// Entries of the dedupe table of an initial copy (after its pairs, before `Synced`).
    LoadDedupe(Vec<(u64, Reply)>),
    /// End of an initial copy: the copy reflects the primary's update `seq`.
    Synced {
        seq: u64,
        dedupe: Vec<(u64, Reply)>,
    },
    /// A copy of the space and the seq it reflects (for resync and saving).
    Snapshot(oneshot::Sender<SpaceCopy>),
    /// Save to the save file; answers the number of pairs saved.
    Save(oneshot::Sender<Result<u64, String>>),
    /// A promoted backup takes over the save file.
    SetSaveFile(Option<PathBuf>),
    /// The replica's epoch rose: logged, and carried by every later logged change.
    Epoch(u64),
    /// A scan thread starts a job: a copy of the space and the update it reflects.
    ScanCopy(std::sync::mpsc::SyncSender<(Space, u64)>),
    /// A scan thread finished a job.
    ScanDone(Box<Done>),
    /// The proxy cancels these waiting requests (their client stream has gone).
    Cancel(Vec<u64>),
    /// The client connection has ended: its waiting requests are cancelled.
    ClientGone(u64),
    /// Nothing to do but wake: the thread sends what a relay reader's batch left for the log
    /// writer ([`StoreView::try_handle`]) and looks at the waiters' next deadline again.
    Nudge,
    Stop,
}

/// The sending end of the store thread's queue. It counts the messages sent and not yet
/// handled: a relay reader may handle a batch on its own thread only when none is queued (then
/// the batch takes effect exactly where the thread would have handled it).
#[derive(Clone)]
pub struct StoreTx {
    tx: std::sync::mpsc::Sender<StoreMsg>,
    queued: Arc<AtomicU64>,
}

impl StoreTx {
    pub fn send(&self, m: StoreMsg) -> Result<(), std::sync::mpsc::SendError<StoreMsg>> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.tx.send(m).inspect_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        })
    }
}

/// What the store starts from.
pub struct StoreInit {
    pub space: Space,
    pub seq: u64,
    pub epoch: u64,
    pub dedupe: Vec<(u64, Reply)>,
    /// The replica's log, if it keeps one.
    pub wal: Option<Wal>,
    /// The log does not yet hold `space` (a new directory): log it as a base copy first.
    pub log_base: bool,
    /// A backup's replication reader appends updates to the log itself (with `wal`).
    pub direct: Option<Arc<DirectLog>>,
}

/// A backup's replication reader hands each update to the log writer itself, in stream order,
/// while the store applies it: the append (and its sync) starts without waiting for the store
/// thread to wake. The log still holds its records in an order the store could have logged
/// them in; the rules (each with a unit test):
/// - the reader appends an update only once the store has handed the log writer every record of
///   the reader's earlier messages that the store logs itself (initial copy, updates the reader
///   did not append): `relayed` counts those, the reader compares it with what it sent;
/// - a snapshot of the store's space goes to the log writer only once the store has applied
///   every update appended directly, and no direct append starts from that check until the
///   snapshot is queued (`Gate::pause`), so records before a snapshot are in it and records
///   after it are not;
/// - an update appended directly carries the epoch of the last `Epoch` record the store logged;
/// - once the replica is the primary the reader never appends again (`retire`, before any
///   request reaches the store), so its own updates never interleave with a former primary's.
pub struct DirectLog {
    gate: Mutex<Gate>,
    /// Messages of the reader that the store logged itself (counted once handed to the writer).
    relayed: AtomicU64,
    /// The epoch of the last `Epoch` record the store logged.
    epoch: AtomicU64,
}

struct Gate {
    /// A snapshot waits for the store to apply the updates appended directly.
    pause: bool,
    /// The log writer; `None` once retired (the primary now, or the store has stopped): no
    /// more direct appends, and the writer may end once the store lets go of it too.
    wal: Option<Wal>,
    /// Updates appended directly so far.
    sent: u64,
}

impl DirectLog {
    pub fn new(wal: Wal, epoch: u64) -> Arc<Self> {
        Arc::new(DirectLog {
            gate: Mutex::new(Gate {
                pause: false,
                wal: Some(wal),
                sent: 0,
            }),
            relayed: AtomicU64::new(0),
            epoch: AtomicU64::new(epoch),
        })
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The replica is the primary now (or the store stopped): from here on the store logs
    /// everything it applies.
    pub fn retire(&self) {
        self.gate().wal = None;
    }
}

/// The replication reader's side of a [`DirectLog`].
pub struct DirectWriter {
    log: Arc<DirectLog>,
    /// Messages sent to the store that it logs itself.
    issued: u64,
    /// Where an update appended directly may also be applied without the store thread
    /// ([`StoreView::try_apply`]); empty: always through the thread.
    view: Arc<OnceLock<StoreView>>,
}

impl DirectWriter {
    pub fn new(log: Arc<DirectLog>) -> Self {
        DirectWriter {
            log,
            issued: 0,
            view: Arc::default(),
        }
    }

    /// Applies updates on the reader's thread when the store thread is idle (see
    /// [`StoreView::try_apply`]).
    pub fn applying(mut self, view: Arc<OnceLock<StoreView>>) -> Self {
        self.view = view;
        self
    }

    /// Sends the store a message that it logs itself (`Load`, `LoadDedupe`, `Synced`).
    pub fn via_store(&mut self, store: &StoreTx, m: StoreMsg) {
        self.issued += 1;
        let _ = store.send(m);
    }

    /// Hands update `seq` to the log writer, then to the store to apply, if the rules allow
    /// (`fresh`: the reader knows the store holds the stream's initial copy and no update at or
    /// past `seq`); else to the store, which logs it. True if appended directly.
    pub fn update(
        &mut self,
        store: &StoreTx,
        fresh: bool,
        (seq, rid, change, reply): (u64, u64, Change, Reply),
    ) -> bool {
        let log = &self.log;
        if fresh && log.relayed.load(Ordering::Acquire) == self.issued {
            let mut g = log.gate();
            if !g.pause
                && let Some(wal) = &g.wal
            {
                let rec = Record::Change {
                    epoch: log.epoch.load(Ordering::Acquire),
                    seq,
                    rid,
                    change: change.clone(),
                    reply: reply.clone(),
                };
                if wal.try_send(WalMsg::Record(rec)) {
                    g.sent += 1;
                    // Under the lock: a snapshot check or `retire` that follows it finds this
                    // update applied, or in the store's queue.
                    let (change, reply) = match self.view.get() {
                        Some(v) => match v.try_apply(seq, rid, change, reply) {
                            Ok(()) => return true,
                            Err(back) => back,
                        },
                        None => (change, reply),
                    };
                    let _ = store.send(StoreMsg::Apply {
                        seq,
                        rid,
                        change,
                        reply,
                        logged: true,
                    });
                    return true;
                }
            }
        }
        self.via_store(
            store,
            StoreMsg::Apply {
                seq,
                rid,
                change,
                reply,
                logged: false,
            },
        );
        false
    }
}

/// What the store produced, in order.
#[derive(Debug)]
pub enum StoreOut {
    /// Answer to a read; may be released once every write up to `after_seq` is replicated.
    Read { after_seq: u64, reply: RelayReply },
    /// An applied write: must reach the backup before `reply` is released.
    Write {
        seq: u64,
        rid: u64,
        change: Change,
        reply: Reply,
    },
    /// A re-sent request already applied: answered from the dedupe table.
    Dedup { after_seq: u64, reply: RelayReply },
    /// The proxy's watermark, to be passed on to the backup so its dedupe table shrinks too.
    Watermark(u64),
}

struct Store {
    space: Space,
    seq: u64,
    epoch: u64,
    wal: Option<Wal>,
    cfg: Arc<Config>,
    patterns: HashMap<String, Result<Pattern, String>>,
    dedupe: Dedupe,
    last_eviction_warning: Option<std::time::Instant>,
    scans: Pool,
    /// Client connections with a request on the scan threads, and their requests that arrived
    /// since (run in order once it is done).
    waiting: HashMap<u64, VecDeque<(u64, Command, std::time::Instant)>>,
    /// Requests waiting for a match (PROTOCOL.md §4a).
    waiters: Waiters,
    /// Rids the proxy cancelled before they started waiting (oldest first, at most
    /// `max_waiters`): such a request is answered at once instead of waiting.
    cancelled: (HashSet<u64>, VecDeque<u64>),
    /// The clock of `waiters`.
    clock: std::time::Instant,
    /// The relay gate of the proxy link the latest requests came on.
    gate: Option<Arc<crate::server::links::RelayGate>>,
    save_file: Option<PathBuf>,
    out: mpsc::UnboundedSender<StoreOut>,
    len: Arc<AtomicU64>,
    seq_pub: Arc<AtomicU64>,
    metrics: Arc<ServerMetrics>,
    /// The request being answered and when the store took it (for the metrics only).
    current: (OpLabel, std::time::Instant),
    direct: Option<Arc<DirectLog>>,
    /// Updates the reader appended directly that this thread has applied.
    direct_applied: u64,
    /// The log writer asked for a snapshot that is not sent yet.
    snapshot_due: bool,
    /// Messages in the thread's queue not handled yet ([`StoreTx`]).
    queued: Arc<AtomicU64>,
    /// A relay reader is handling a batch on its own (async) thread: nothing may wait for the
    /// log writer's queue, so what does not fit waits in `overflow` for the store thread.
    inline: Cell<bool>,
    /// Messages for the log writer that did not fit its queue during an inline batch, sent by the
    /// store thread (in order, before anything else) when it next wakes. Holds at most one
    /// batch's records: no batch is handled inline while it is not empty.
    overflow: RefCell<VecDeque<WalMsg>>,
}

/// Shared counters the async side reads without asking the thread.
#[derive(Clone, Default)]
pub struct StoreStats {
    pub pairs: Arc<AtomicU64>,
    pub seq: Arc<AtomicU64>,
    /// Where the store records answers and their latency (observations only).
    pub metrics: Arc<ServerMetrics>,
    /// Set once the thread runs: where exact-key reads may be answered without it.
    pub view: Arc<OnceLock<StoreView>>,
}

/// The store as a relay reader may see it between two of the thread's messages: an exact-key
/// GET that nothing queued for the thread can change the answer of is answered on the reader's
/// own thread (no hand-off to the store thread and back). The answer goes out through the same
/// channel as the thread's own, held by the replica machine like every read (`after_seq`).
/// It does not keep the store alive: the thread owns it, and it ends with the thread.
#[derive(Clone)]
pub struct StoreView {
    store: std::sync::Weak<Mutex<Store>>,
    /// To wake the thread when a batch handled here leaves it work (see `try_handle`).
    tx: StoreTx,
}

/// Requests relayed by the proxy: rid, connection indicator, command.
pub type Relayed = Vec<(u64, Option<u64>, Command)>;

impl StoreView {
    /// Answers `cmd` now and returns true if it is an exact-key GET (`is_exact_read`) and the
    /// answer is the one the store thread would give: every request sent before it on this link
    /// has been handled (`RelayGate::caught_up`), none of its connection waits behind a scan,
    /// and the thread is between two messages (never waits for it: false if it is busy). The
    /// caller sends everything else to the thread, and then every later request of the batch.
    pub fn try_read(
        &self,
        gate: &crate::server::links::RelayGate,
        rid: u64,
        client: u64,
        cmd: &Command,
    ) -> bool {
        let Command::Get { key, value, .. } = cmd else {
            return false;
        };
        let started = std::time::Instant::now();
        let Some(shared) = self.store.upgrade() else {
            return false;
        };
        let Ok(s) = shared.try_lock() else {
            return false;
        };
        // A GET that may wait (PROTOCOL.md §4a) goes to the thread: only it registers waiters.
        if !is_exact_read(key, value, s.cfg.max_pattern_bytes)
            || cmd.wait_ms(s.cfg.max_wait_ms) != 0
            || !gate.caught_up()
            || !gate.has_room()
            || gate.is_gone(client)
            || s.waiting.contains_key(&client)
            || s.dedupe.get(rid).is_some()
        {
            return false;
        }
        let pairs = s
            .space
            .value_of(key)
            .map(|v| vec![Pair::new(key.clone(), v.clone())])
            .unwrap_or_default();
        let reply = Reply::Pairs {
            pairs,
            message: None,
        };
        s.metrics
            .requests
            .inc(OpLabel::Get, crate::metrics::reply_status(&reply));
        s.metrics.apply.observe(OpLabel::Get, started.elapsed());
        s.emit(StoreOut::Read {
            after_seq: s.seq,
            reply: RelayReply { rid, reply },
        });
        true
    }

    /// A backup's replication reader applies an update it has just appended to the log
    /// ([`DirectWriter::update`], under the [`DirectLog`]'s gate) on its own thread, exactly as
    /// the store thread would, when that changes nothing: the thread is between two messages
    /// (never waited for: the gate is held, and the thread takes the gate while holding the
    /// store), none is queued for it (so every earlier message of the reader is applied), and
    /// no snapshot waits. It is counted as applied at once, so a snapshot check finds it. A
    /// snapshot the log writer asks for is left to the thread, which is woken for it. Gives the
    /// update back if it must go to the thread.
    pub fn try_apply(
        &self,
        seq: u64,
        rid: u64,
        change: Change,
        reply: Reply,
    ) -> Result<(), (Change, Reply)> {
        self.when_idle((change, reply), |s, (change, reply)| {
            s.apply_update(seq, rid, change, reply, true);
            s.settle();
            if s.wal
                .as_ref()
                .is_some_and(|w| w.snapshot_wanted.load(Ordering::Acquire))
            {
                let _ = self.tx.send(StoreMsg::Nudge);
            }
            Ok(())
        })
    }

    /// Runs `f` on the store beside its thread if the thread is between two messages (never
    /// waits for it), none is queued for it, no log record of an inline batch waits for it, and
    /// no snapshot is due; else gives `v` back. `f` may decline too, giving `v` back.
    fn when_idle<V, R>(&self, v: V, f: impl FnOnce(&mut Store, V) -> Result<R, V>) -> Result<R, V> {
        let Some(shared) = self.store.upgrade() else {
            return Err(v);
        };
        let Ok(mut s) = shared.try_lock() else {
            return Err(v);
        };
        if s.queued.load(Ordering::SeqCst) != 0 || !s.overflow.borrow().is_empty() || s.snapshot_due
        {
            return Err(v);
        }
        f(&mut s, v)
    }

    /// Handles a relay reader's batch on the reader's own thread, exactly as the store thread
    /// would, when that changes nothing: the thread is between two messages (never waited for)
    /// and none is queued for it, and every earlier batch of this link is handled. Where the
    /// thread would wait for the proxy to read answers (`RelayGate::wait_for_room`), the rest
    /// of the batch goes to the thread instead. This saves the hand-off to the store
    /// thread and back on every batch while the store keeps up. Nothing here waits: messages for
    /// the log writer that do not fit its queue stay for the store thread, which is woken for
    /// them, as it is when a new waiter's deadline is earlier than the one it sleeps towards or
    /// the log writer wants a snapshot (a copy of the dedupe table is the thread's work).
    /// Gives the batch back if it must go to the thread.
    pub fn try_handle(
        &self,
        gate: &Arc<crate::server::links::RelayGate>,
        reqs: Relayed,
    ) -> Result<(), Relayed> {
        self.when_idle(reqs, |s, reqs| {
            if !gate.caught_up() {
                return Err(reqs);
            }
            let deadline = s.waiters.next_deadline();
            gate.sent();
            s.inline.set(true);
            if let Some(rest) = s.requests(reqs, gate) {
                // The thread would wait for the proxy here: the rest of the batch waits there.
                gate.sent();
                let _ = self.tx.send(StoreMsg::Requests(rest, gate.clone()));
            }
            gate.handled();
            s.settle();
            s.inline.set(false);
            let sooner = match (deadline, s.waiters.next_deadline()) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(a), Some(b)) => b < a,
            };
            let snapshot = s
                .wal
                .as_ref()
                .is_some_and(|w| w.snapshot_wanted.load(Ordering::Acquire));
            if sooner || snapshot || !s.overflow.borrow().is_empty() {
                let _ = self.tx.send(StoreMsg::Nudge);
            }
            Ok(())
        })
    }
}

fn lock(m: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the store thread.
pub fn spawn(
    init: StoreInit,
    cfg: Arc<Config>,
    save_file: Option<PathBuf>,
    out: mpsc::UnboundedSender<StoreOut>,
    stats: StoreStats,
) -> std::io::Result<(StoreTx, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let queued = Arc::new(AtomicU64::new(0));
    let tx = StoreTx {
        tx,
        queued: queued.clone(),
    };
    let scans = {
        let (copy_tx, done_tx) = (tx.clone(), tx.clone());
        Pool::start(
            cfg.scan_threads,
            cfg.pattern_limits(),
            cfg.max_response_bytes,
            move || {
                let (t, r) = std::sync::mpsc::sync_channel(1);
                copy_tx.send(StoreMsg::ScanCopy(t)).ok()?;
                r.recv().ok()
            },
            move |d| done_tx.send(StoreMsg::ScanDone(Box::new(d))).is_ok(),
        )?
    };
    stats
        .pairs
        .store(init.space.len() as u64, Ordering::Relaxed);
    stats.seq.store(init.seq, Ordering::Relaxed);
    let store = Store {
        space: init.space,
        seq: init.seq,
        epoch: init.epoch,
        wal: init.wal,
        cfg: cfg.clone(),
        patterns: HashMap::new(),
        dedupe: Dedupe::from_entries(init.dedupe, cfg.dedupe_limits()),
        last_eviction_warning: None,
        scans,
        waiting: HashMap::new(),
        waiters: Waiters::new(cfg.waiter_limits()),
        cancelled: (HashSet::new(), VecDeque::new()),
        clock: std::time::Instant::now(),
        gate: None,
        save_file,
        out,
        len: stats.pairs,
        seq_pub: stats.seq,
        metrics: stats.metrics,
        current: (OpLabel::Other, std::time::Instant::now()),
        direct: init.direct,
        direct_applied: 0,
        snapshot_due: false,
        queued: queued.clone(),
        inline: Cell::new(false),
        overflow: RefCell::new(VecDeque::new()),
    };
    // Held by the thread while it handles a message; relay readers only ever try it.
    let shared = Arc::new(Mutex::new(store));
    let _ = stats.view.set(StoreView {
        store: Arc::downgrade(&shared),
        tx: tx.clone(),
    });
    let h = std::thread::Builder::new()
        .name("store".into())
        .spawn(move || {
            if init.log_base {
                lock(&shared).log_base();
            }
            loop {
                // Waiting requests time out while no message comes.
                let next = lock(&shared).waiters.next_deadline();
                let msg = match next {
                    None => match rx.recv() {
                        Ok(m) => m,
                        Err(_) => break,
                    },
                    Some(d) => {
                        let wait = d.saturating_sub(lock(&shared).now());
                        match rx.recv_timeout(std::time::Duration::from_millis(wait)) {
                            Ok(m) => m,
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                lock(&shared).expire();
                                continue;
                            }
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    }
                };
                let mut store = lock(&shared);
                store.drain_overflow();
                let go_on = store.handle(msg);
                store.queued.fetch_sub(1, Ordering::SeqCst);
                if !go_on {
                    break;
                }
                store.after_message();
            }
            let store = lock(&shared);
            store.drain_overflow();
            if let Some(d) = &store.direct {
                // The writer ends once every sender is gone (the reader's too).
                d.retire();
            }
            if let Some(w) = &store.wal
                && !w.flush(store.cfg.shutdown_timeout())
            {
                tracing::warn!("the log writer did not confirm its last sync before stopping");
            }
        })?;
    Ok((tx, h))
}

impl Store {
    fn log(&self, r: Record) {
        if self.wal.is_some() {
            self.to_wal(WalMsg::Record(r));
        }
    }

    /// Queues a message for the log writer: waits for room on the store thread; never on a relay
    /// reader's thread (`inline`), where what does not fit goes to `overflow`.
    fn to_wal(&self, m: WalMsg) {
        let Some(w) = &self.wal else { return };
        if self.inline.get() {
            let mut o = self.overflow.borrow_mut();
            if o.is_empty() {
                match w.try_send_back(m) {
                    Ok(()) | Err(None) => {}
                    Err(Some(m)) => o.push_back(m),
                }
            } else {
                o.push_back(m);
            }
        } else {
            self.drain_overflow();
            // False only if the writer failed, which the server hears about and acts on.
            let _ = w.send(m);
        }
    }

    /// Store thread: sends what an inline batch left for the log writer.
    fn drain_overflow(&self) {
        let Some(w) = &self.wal else { return };
        let mut o = self.overflow.borrow_mut();
        while let Some(m) = o.pop_front() {
            let _ = w.send(m);
        }
    }

    /// What follows every message: [`Store::settle`], and a snapshot if the log writer asked for
    /// one.
    fn after_message(&mut self) {
        self.settle();
        self.maybe_snapshot();
    }

    /// What follows every message or batch: waiters past their deadline, the published counters.
    fn settle(&mut self) {
        self.expire();
        self.len.store(self.space.len() as u64, Ordering::Relaxed);
        self.seq_pub.store(self.seq, Ordering::Relaxed);
    }

    /// Handles relayed requests in order. On a relay reader's thread (`inline`) it stops where
    /// the store thread would wait for the proxy to read answers, and gives back the rest.
    fn requests(
        &mut self,
        reqs: Relayed,
        gate: &Arc<crate::server::links::RelayGate>,
    ) -> Option<Relayed> {
        self.gate = Some(gate.clone());
        let mut reqs = reqs.into_iter();
        while let Some((rid, client, cmd)) = reqs.next() {
            if self.inline.get() && !gate.has_room() {
                return Some(std::iter::once((rid, client, cmd)).chain(reqs).collect());
            }
            self.request(rid, client, cmd);
        }
        None
    }

    /// Logs dedupe entries in chunks that each fit a log record.
    fn log_dedupe(&self, entries: Vec<(u64, Reply)>) {
        if self.wal.is_some() {
            for c in dedupe::chunks(entries, DEDUPE_CHUNK_BYTES) {
                self.log(Record::Dedupe(c));
            }
        }
    }

    /// Logs the whole space as a base copy (a new replica directory).
    fn log_base(&self) {
        self.log(Record::Reset);
        let mut chunk = Vec::with_capacity(SNAPSHOT_CHUNK);
        for (k, v) in self.space.iter() {
            chunk.push((k.clone(), v.clone()));
            if chunk.len() == SNAPSHOT_CHUNK {
                self.log(Record::Pairs(std::mem::take(&mut chunk)));
            }
        }
        if !chunk.is_empty() {
            self.log(Record::Pairs(chunk));
        }
        self.log_dedupe(self.dedupe.to_vec());
        self.log(Record::Base {
            epoch: self.epoch,
            seq: self.seq,
            dedupe: vec![],
        });
    }

    /// Hands the log writer a copy of the space when it asks for one (O(1) clone); with a
    /// [`DirectLog`], once every update the reader appended is applied (until then the reader
    /// appends no more).
    fn maybe_snapshot(&mut self) {
        let Some(w) = &self.wal else { return };
        if !self.snapshot_due {
            if !w.snapshot_wanted.swap(false, Ordering::AcqRel) {
                return;
            }
            self.snapshot_due = true;
        }
        if let Some(d) = &self.direct {
            let mut g = d.gate();
            g.pause = true;
            if g.sent != self.direct_applied {
                // Those updates are in this thread's queue: checked again after each message.
                return;
            }
        }
        self.to_wal(WalMsg::Snapshot {
            space: self.space.clone(),
            pos: Position {
                epoch: self.epoch,
                seq: self.seq,
            },
            dedupe: self.dedupe.to_vec(),
        });
        self.snapshot_due = false;
        if let Some(d) = &self.direct {
            d.gate().pause = false;
        }
    }

    /// A message of the reader that this thread logged (see [`DirectLog`]).
    fn relayed(&self) {
        if let Some(d) = &self.direct {
            d.relayed.fetch_add(1, Ordering::Release);
        }
    }

    /// A pattern this thread may use: a cached one, or one that needs no regex and no parser
    /// (a plain key, `.*`). Anything else is for the scan threads to compile.
    fn cheap_pattern(&self, src: &str) -> Pat {
        if let Some(p) = self.patterns.get(src) {
            return match p {
                Ok(p) => Pat::Compiled(p.clone()),
                // A known error: the scan thread answers it without compiling again.
                Err(m) => Pat::Invalid(m.clone()),
            };
        }
        match Pattern::plain(src, &self.cfg.pattern_limits()) {
            Some(p) => Pat::Compiled(p),
            None => Pat::Source(src.to_owned()),
        }
    }

    fn cache_pattern(&mut self, src: String, p: Result<Pattern, String>) {
        if src.len() <= PATTERN_CACHE_MAX_SOURCE {
            if self.patterns.len() >= PATTERN_CACHE {
                self.patterns.clear();
            }
            self.patterns.insert(src, p);
        }
    }

    fn emit(&self, o: StoreOut) {
        let _ = self.out.send(o);
    }

    /// Counts the answer to the current request and its time in the store.
    fn record(&self, reply: &Reply) {
        let (op, started) = self.current;
        self.metrics
            .requests
            .inc(op, crate::metrics::reply_status(reply));
        self.metrics.apply.observe(op, started.elapsed());
    }

    fn answer(&self, rid: u64, after_seq: u64, reply: Reply) {
        self.record(&reply);
        self.emit(StoreOut::Read {
            after_seq,
            reply: RelayReply { rid, reply },
        });
    }

    /// A backup applies a primary's update (`StoreMsg::Apply`; `logged`: the replication reader
    /// already appended it to the log, see [`DirectLog`]).
    fn apply_update(&mut self, seq: u64, rid: u64, change: Change, reply: Reply, logged: bool) {
        if seq > self.seq {
            // Logged before it is applied: the append starts as early as it can.
            if !logged && self.wal.is_some() {
                self.log(Record::Change {
                    epoch: self.epoch,
                    seq,
                    rid,
                    change: change.clone(),
                    reply: reply.clone(),
                });
            }
            self.space.apply(&change);
            self.seq = seq;
            self.remember(rid, reply);
        } else if logged {
            // The reader appends only updates past what the store holds.
            tracing::warn!(
                seq,
                held = self.seq,
                "an update appended to the log directly was already held"
            );
        }
        if logged {
            self.direct_applied += 1;
        } else {
            self.relayed();
        }
    }

    /// Returns false to stop the thread.
    fn handle(&mut self, msg: StoreMsg) -> bool {
        match msg {
            StoreMsg::Requests(reqs, gate) => {
                // Never inline here: every request is handled.
                self.requests(reqs, &gate);
                gate.handled();
            }
            StoreMsg::Watermark(w) => {
                self.dedupe.trim_below(w);
                self.emit(StoreOut::Watermark(w));
            }
            StoreMsg::Apply {
                seq,
                rid,
                change,
                reply,
                logged,
            } => self.apply_update(seq, rid, change, reply, logged),
            StoreMsg::Load { pairs, reset } => {
                if reset {
                    self.space = Space::new();
                    self.dedupe.clear();
                    self.log(Record::Reset);
                }
                if self.wal.is_some() && !pairs.is_empty() {
                    self.log(Record::Pairs(pairs.clone()));
                }
                for (k, v) in pairs {
                    self.space.insert_raw(k, v);
                }
                self.relayed();
            }
            StoreMsg::LoadDedupe(entries) => {
                if self.wal.is_some() {
                    self.log(Record::Dedupe(entries.clone()));
                }
                self.remember_all(entries);
                self.relayed();
            }
            StoreMsg::Synced { seq, dedupe } => {
                self.seq = seq;
                // The entries came in `LoadDedupe` chunks (a primary of an older version sends
                // them all here).
                self.log_dedupe(dedupe.clone());
                self.remember_all(dedupe);
                self.log(Record::Base {
                    epoch: self.epoch,
                    seq,
                    dedupe: vec![],
                });
                self.relayed();
            }
            StoreMsg::Epoch(e) => {
                if e > self.epoch {
                    self.epoch = e;
                    self.log(Record::Epoch(e));
                    if let Some(d) = &self.direct {
                        d.epoch.store(e, Ordering::Release);
                    }
                }
            }
            StoreMsg::Snapshot(tx) => {
                let _ = tx.send((self.space.clone(), self.seq, self.dedupe.to_vec()));
            }
            StoreMsg::Save(tx) => {
                let r = match &self.save_file {
                    None => Ok(self.space.len() as u64),
                    Some(path) => space::save_snapshot(path, &self.space)
                        .map(|_| self.space.len() as u64)
                        .map_err(|e| e.to_string()),
                };
                let _ = tx.send(r);
            }
            StoreMsg::SetSaveFile(f) => self.save_file = f,
            StoreMsg::ScanCopy(tx) => {
                let _ = tx.send((self.space.clone(), self.seq));
            }
            StoreMsg::ScanDone(done) => self.scan_done(*done),
            StoreMsg::Cancel(rids) => {
                let mut acts = vec![];
                for rid in rids {
                    if !self.waiters.cancel(rid, &mut acts) {
                        // Not waiting (yet): if it comes to wait, it is answered at once.
                        let (set, order) = &mut self.cancelled;
                        if set.insert(rid) {
                            order.push_back(rid);
                        }
                        while order.len() > self.cfg.max_waiters.max(1) {
                            if let Some(old) = order.pop_front() {
                                set.remove(&old);
                            }
                        }
                    }
                }
                self.carry_out(acts);
            }
            StoreMsg::ClientGone(client) => {
                let mut acts = vec![];
                self.waiters.cancel_client(client, &mut acts);
                self.carry_out(acts);
            }
            StoreMsg::Nudge => {}
            StoreMsg::Stop => return false,
        }
        true
    }

    fn remember(&mut self, rid: u64, reply: Reply) {
        let n = self.dedupe.insert(rid, reply);
        self.evicted(n);
    }

    fn remember_all(&mut self, entries: Vec<(u64, Reply)>) {
        let n = self.dedupe.extend(entries);
        self.evicted(n);
    }

    fn evicted(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = std::time::Instant::now();
        if self
            .last_eviction_warning
            .is_none_or(|t| now.duration_since(t) >= EVICTION_WARNING_EVERY)
        {
            self.last_eviction_warning = Some(now);
            tracing::warn!(
                entries = self.dedupe.len(),
                bytes = self.dedupe.bytes(),
                evicted_total = self.dedupe.evicted(),
                max_dedupe_entries = self.cfg.max_dedupe_entries,
                max_dedupe_bytes = self.cfg.max_dedupe_bytes,
                "the dedupe table is full and dropped its oldest answers: a request re-sent after a failover from among them could be applied twice; the proxy's watermark is not keeping up (raise max_dedupe_entries / max_dedupe_bytes, or look for a client that never reads its answers)"
            );
        }
    }

    fn request(&mut self, rid: u64, client: Option<u64>, cmd: Command) {
        self.current = (OpLabel::of_command(&cmd), std::time::Instant::now());
        let Some(client) = client else {
            // SPEC §3: a request without a connection indicator is rejected by the primary.
            self.answer(
                rid,
                0,
                Reply::Malformed(
                    "request carries no connection indicator; only the proxy may relay requests"
                        .into(),
                ),
            );
            return;
        };
        // Requests on one stream take effect in the order they were sent (PROTOCOL §3): while a
        // request of this connection is on the scan threads, the later ones wait for it.
        if let Some(q) = self.waiting.get_mut(&client) {
            q.push_back((rid, cmd, self.current.1));
            return;
        }
        self.run(rid, client, cmd);
    }

    /// The connection's request on the scan threads is done: runs what waited behind it, until
    /// one of those goes to the scan threads in turn.
    fn release(&mut self, client: u64) {
        let Some(mut queue) = self.waiting.remove(&client) else {
            return;
        };
        while let Some((rid, cmd, started)) = queue.pop_front() {
            self.current.1 = started;
            self.run(rid, client, cmd);
            if let Some(q) = self.waiting.get_mut(&client) {
                *q = queue;
                return;
            }
        }
    }

    fn offload(&mut self, job: Job, urgent: bool) {
        self.waiting.entry(job.client).or_default();
        let (space, seq) = (&self.space, self.seq);
        self.scans.submit(job, urgent, || (space.clone(), seq));
    }

    fn run(&mut self, rid: u64, client: u64, cmd: Command) {
        self.current.0 = OpLabel::of_command(&cmd);
        if let Some(gate) = &self.gate {
            // Back-pressure: no new answer while the proxy has too many unread ones (a relay
            // reader handling a batch checks before each request and leaves the rest to this
            // thread instead of waiting).
            if !self.inline.get() {
                gate.wait_for_room();
            }
            if matches!(cmd, Command::Get { .. }) && gate.is_gone(client) {
                return self.answer(
                    rid,
                    self.seq,
                    Reply::Pairs {
                        pairs: vec![],
                        message: Some("not computed: the client's connection has ended".into()),
                    },
                );
            }
        }
        if let Some(r) = self.dedupe.get(rid) {
            self.record(r);
            self.emit(StoreOut::Dedup {
                after_seq: self.seq,
                reply: RelayReply {
                    rid,
                    reply: r.clone(),
                },
            });
            return;
        }
        let limits = self.cfg.tuple_limits();
        let wait = cmd.wait_ms(self.cfg.max_wait_ms);
        match cmd {
            Command::Get { key, value, .. }
                if wait == 0 && is_exact_read(&key, &value, self.cfg.max_pattern_bytes) =>
            {
                // The commonest read, an exact key with any value: a map lookup, no regex (at
                // most one pair, so a limit changes nothing).
                let pairs = self
                    .space
                    .value_of(&key)
                    .map(|v| vec![Pair::new(key.clone(), v.clone())])
                    .unwrap_or_default();
                self.answer(
                    rid,
                    self.seq,
                    Reply::Pairs {
                        pairs,
                        message: None,
                    },
                );
            }
            Command::Get {
                key, value, limit, ..
            } => self.match_request(rid, client, Kind::Get, key, value, limit, wait),
            Command::Delete {
                key, value, limit, ..
            } => self.match_request(rid, client, Kind::Delete, key, value, limit, wait),
            // STATUS: the pairs as of every write applied before (ordered like a read).
            Command::Count => self.answer(rid, self.seq, Reply::Count(self.space.len() as u64)),
            Command::Put(elems) | Command::Post(elems) if elems.is_empty() => {
                self.answer(rid, self.seq, Reply::Rejected(vec![]));
            }
            Command::Put(elems) => {
                let cands = elems.iter().map(|v| pair_from_raw(v, &limits)).collect();
                let (change, rejected) = self.space.put(cands);
                let reply = Reply::Rejected(pick(elems, &rejected));
                let written = self.write(rid, change, reply);
                self.serve_waiters(&written);
            }
            Command::Post(elems) => {
                let cands = elems.iter().map(|v| pair_from_raw(v, &limits)).collect();
                let (change, rejected) = self.space.post(cands);
                let reply = Reply::Rejected(pick(elems, &rejected));
                let written = self.write(rid, change, reply);
                self.serve_waiters(&written);
            }
        }
    }

    /// A GET or DELETE: here if it needs no regex and only looks keys up (or, with a limit and
    /// compiled patterns, finds its pairs within `max_inline_visits` keys), else on a scan thread.
    #[allow(clippy::too_many_arguments)]
    fn match_request(
        &mut self,
        rid: u64,
        client: u64,
        kind: Kind,
        key: String,
        value: String,
        limit: Option<u64>,
        wait_ms: u64,
    ) {
        let (kp, vp) = (self.cheap_pattern(&key), self.cheap_pattern(&value));
        if let (Pat::Compiled(k), Pat::Compiled(v)) = (&kp, &vp) {
            let max = self.cfg.max_response_bytes;
            let found = if matches!(k.hint(), IndexHint::Exact(_) | IndexHint::AnyOf(_))
                && !k.uses_regex()
                && !v.uses_regex()
            {
                Some(scan::matching(&self.space, k, v, max, limit))
            } else if limit.is_some() {
                self.inline_match(k, v, limit, self.cfg.max_inline_visits)
            } else {
                None
            };
            if let Some(found) = found {
                let m = Matched {
                    rid,
                    client,
                    kind,
                    key: k.clone(),
                    value: v.clone(),
                    limit,
                    wait_ms,
                };
                return match found {
                    Err(size) => self.answer(rid, self.seq, scan::too_large(&size, max)),
                    Ok((pairs, _)) => self.matched(m, pairs),
                };
            }
        }
        let job = Job {
            rid,
            client,
            kind,
            limit,
            wait_ms,
            work: Work::Scan { key: kp, value: vp },
            round: 0,
            copy: None,
            started: self.current.1,
        };
        self.offload(job, false);
    }

    /// The first `limit` matches in the current space if at most `visits` keys give them (None:
    /// more needed), Err if the answer passes `max_response_bytes`.
    fn inline_match(
        &self,
        key: &Pattern,
        value: &Pattern,
        limit: Option<u64>,
        visits: usize,
    ) -> Option<Result<(Vec<Pair>, AnswerSize), AnswerSize>> {
        let pairs = self
            .space
            .first_matches(key, value, scan::limit_of(limit), visits)?;
        let mut size = AnswerSize::default();
        for p in &pairs {
            size.add(&p.key, &p.value);
        }
        Some(if size.bytes() > self.cfg.max_response_bytes {
            Err(size)
        } else {
            Ok((pairs, size))
        })
    }

    /// A GET or DELETE has its current match: answers it, or removes and answers it, or (nothing
    /// matched and it may wait) makes it wait.
    fn matched(&mut self, m: Matched, pairs: Vec<Pair>) {
        if pairs.is_empty() && m.wait_ms > 0 {
            return self.wait(m);
        }
        match m.kind {
            Kind::Get => self.answer(
                m.rid,
                self.seq,
                Reply::Pairs {
                    pairs,
                    message: None,
                },
            ),
            Kind::Delete => self.delete(m.rid, pairs),
        }
    }

    fn now(&self) -> Millis {
        self.clock.elapsed().as_millis() as Millis
    }

    /// Nothing matches `m` in the current space: it waits for a write that makes something match
    /// (or is answered at once if it may not wait).
    fn wait(&mut self, m: Matched) {
        let refused = if self.cancelled.0.remove(&m.rid)
            || self.gate.as_ref().is_some_and(|g| g.is_gone(m.client))
        {
            Some("cancelled: the client's stream or connection closed before a match".to_owned())
        } else {
            let w = Waiter {
                rid: m.rid,
                client: m.client,
                take: m.kind == Kind::Delete,
                key: m.key,
                value: m.value,
                limit: scan::limit_of(m.limit),
                // `now` is whole milliseconds rounded down: +1 so it never times out early.
                deadline: self.now().saturating_add(m.wait_ms).saturating_add(1),
            };
            match self.waiters.add(w) {
                Ok(()) => None,
                // The first registration answers it.
                Err(Refused::Duplicate) => return,
                Err(Refused::Full { limit }) => Some(format!(
                    "not waiting: {limit} requests wait already (max_waiters); nothing matched, nothing changed; retry later"
                )),
                Err(Refused::ClientFull { limit }) => Some(format!(
                    "not waiting: this connection has {limit} requests waiting already (max_waiters_per_connection); nothing matched, nothing changed"
                )),
            }
        };
        if let Some(message) = refused {
            self.answer(
                m.rid,
                self.seq,
                Reply::Pairs {
                    pairs: vec![],
                    message: Some(message),
                },
            );
        }
    }

    /// Answers the waiting requests whose time is up.
    fn expire(&mut self) {
        if self
            .waiters
            .next_deadline()
            .is_some_and(|d| d <= self.now())
        {
            let mut acts = vec![];
            self.waiters.tick(self.now(), &mut acts);
            self.carry_out(acts);
        }
    }

    /// A PUT or POST wrote `change`: the waiting requests it satisfies are answered, in the order
    /// they started waiting (takes remove their pairs as writes of their own). The pairs of one
    /// write fit in `max_request_bytes`, so an answer made of them never passes
    /// `max_response_bytes`.
    fn serve_waiters(&mut self, change: &Change) {
        if self.waiters.is_empty() {
            return;
        }
        if let Change::Insert(pairs) | Change::Replace(pairs) = change {
            let mut acts = vec![];
            self.waiters.on_write(pairs, &mut acts);
            self.carry_out(acts);
        }
    }

    fn carry_out(&mut self, acts: Vec<WaitAction>) {
        let saved = self.current;
        for a in acts {
            // Metrics: a waiter's answer counts under its own operation; its time in the store
            // does not include the wait.
            self.current = (
                match a {
                    WaitAction::Read { .. } => OpLabel::Get,
                    _ => OpLabel::Delete,
                },
                std::time::Instant::now(),
            );
            match a {
                WaitAction::Read { rid, pairs } => self.answer(
                    rid,
                    self.seq,
                    Reply::Pairs {
                        pairs,
                        message: None,
                    },
                ),
                WaitAction::Take { rid, pairs } => self.delete(rid, pairs),
                WaitAction::TimedOut { rid } => self.answer(
                    rid,
                    self.seq,
                    Reply::Pairs {
                        pairs: vec![],
                        message: Some(
                            "timed out: nothing matched within wait_ms; nothing changed".into(),
                        ),
                    },
                ),
                WaitAction::Cancelled { rid } => self.answer(
                    rid,
                    self.seq,
                    Reply::Pairs {
                        pairs: vec![],
                        message: Some(
                            "cancelled: the client's stream or connection closed; nothing changed"
                                .into(),
                        ),
                    },
                ),
            }
        }
        self.current = saved;
    }

    /// Removes `pairs` (the current match of a DELETE) and answers them.
    fn delete(&mut self, rid: u64, pairs: Vec<Pair>) {
        let change = Change::Remove(pairs.iter().map(|p| p.key.clone()).collect());
        self.space.apply(&change);
        self.write(
            rid,
            change,
            Reply::Pairs {
                pairs,
                message: None,
            },
        );
    }

    /// A scan thread finished: answer a GET; apply a DELETE once its match is up to date.
    fn scan_done(&mut self, d: Done) {
        self.current = (
            match d.kind {
                Kind::Get => OpLabel::Get,
                Kind::Delete => OpLabel::Delete,
            },
            d.started,
        );
        for (src, p) in d.compiled {
            self.cache_pattern(src, p);
        }
        let max = self.cfg.max_response_bytes;
        match d.outcome {
            Outcome::Answer(reply) => self.answer(d.rid, d.seq, reply),
            Outcome::Matched {
                key,
                value,
                pairs,
                size,
                copy,
            } => {
                let m = Matched {
                    rid: d.rid,
                    client: d.client,
                    kind: d.kind,
                    key: key.clone(),
                    value: value.clone(),
                    limit: d.limit,
                    wait_ms: d.wait_ms,
                };
                if d.kind == Kind::Get && pairs.is_empty() && d.wait_ms > 0 && d.seq != self.seq {
                    // A GET that would wait must match nothing now, not only at its copy.
                    let limit = scan::limit_of(d.limit);
                    match scan::revalidate(&copy, &self.space, pairs, size, &key, &value, max) {
                        Ok((mut pairs, _)) => {
                            pairs.truncate(limit);
                            self.matched(m, pairs)
                        }
                        Err(size) => self.answer(d.rid, self.seq, scan::too_large(&size, max)),
                    }
                } else if d.kind == Kind::Get || d.seq == self.seq {
                    // A GET takes effect at its copy; a DELETE whose copy is current has its
                    // match.
                    self.matched(m, pairs);
                } else if d.limit.is_some() {
                    // The first N at the copy may have gone since: find the first N now, here if
                    // that is quick, else in another round (here at any cost after the last).
                    let visits = if d.round < OFFLOAD_ROUNDS {
                        self.cfg.max_inline_visits
                    } else {
                        usize::MAX
                    };
                    match self.inline_match(&key, &value, d.limit, visits) {
                        Some(Ok((pairs, _))) => self.matched(m, pairs),
                        Some(Err(size)) => {
                            self.answer(d.rid, self.seq, scan::too_large(&size, max))
                        }
                        None => {
                            let job = Job {
                                rid: d.rid,
                                client: d.client,
                                kind: d.kind,
                                limit: d.limit,
                                wait_ms: d.wait_ms,
                                work: Work::Scan {
                                    key: Pat::Compiled(key),
                                    value: Pat::Compiled(value),
                                },
                                round: d.round,
                                copy: None,
                                started: d.started,
                            };
                            return self.offload(job, true);
                        }
                    }
                } else if d.round < OFFLOAD_ROUNDS {
                    let job = Job {
                        rid: d.rid,
                        client: d.client,
                        kind: Kind::Delete,
                        limit: None,
                        wait_ms: d.wait_ms,
                        work: Work::Revalidate {
                            key,
                            value,
                            base: copy,
                            matched: pairs,
                            size,
                        },
                        round: d.round,
                        copy: None,
                        started: d.started,
                    };
                    // The connection keeps waiting.
                    return self.offload(job, true);
                } else {
                    match scan::revalidate(&copy, &self.space, pairs, size, &key, &value, max) {
                        Ok((pairs, _)) => self.matched(m, pairs),
                        Err(size) => self.answer(d.rid, self.seq, scan::too_large(&size, max)),
                    }
                }
            }
        }
        self.release(d.client);
    }

    /// Records an applied write; gives back its change when requests wait (to serve them), else
    /// an empty one.
    fn write(&mut self, rid: u64, change: Change, reply: Reply) -> Change {
        let kept = if self.waiters.is_empty() || matches!(change, Change::Remove(_)) {
            Change::Insert(vec![])
        } else {
            change.clone()
        };
        self.record(&reply);
        self.seq += 1;
        if self.wal.is_some() {
            self.log(Record::Change {
                epoch: self.epoch,
                seq: self.seq,
                rid,
                change: change.clone(),
                reply: reply.clone(),
            });
        }
        self.remember(rid, reply.clone());
        self.emit(StoreOut::Write {
            seq: self.seq,
            rid,
            change,
            reply,
        });
        kept
    }
}

/// The commonest read: an exact key (a plain key no longer than `max_pattern_bytes`) with any
/// value, answered by a map lookup.
fn is_exact_read(key: &str, value: &str, max_pattern_bytes: usize) -> bool {
    is_plain_key(key) && key.len() <= max_pattern_bytes && value == ".*"
}

/// A GET or DELETE whose patterns compiled, on its way to an answer.
struct Matched {
    rid: u64,
    client: u64,
    kind: Kind,
    key: Pattern,
    value: Pattern,
    limit: Option<u64>,
    wait_ms: u64,
}

/// A key pattern that can only match itself: alphanumerics and commas, no regex syntax at all.
fn is_plain_key(p: &str) -> bool {
    !p.is_empty() && p.chars().all(|c| c == ',' || c.is_alphanumeric())
}

/// The elements at `idx` (ascending), moved out of `elems`, exactly as sent.
fn pick(elems: Vec<RawItem>, idx: &[usize]) -> Vec<RawItem> {
    let mut want = idx.iter().peekable();
    elems
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| {
            if want.peek() == Some(&&i) {
                want.next();
                Some(v)
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::Value;

    /// An empty space at epoch 1, update 0, without a log.
    fn empty_init() -> StoreInit {
        StoreInit {
            space: Space::new(),
            seq: 0,
            epoch: 1,
            dedupe: vec![],
            wal: None,
            log_base: false,
            direct: None,
        }
    }

    fn start(cfg: Config) -> (StoreTx, mpsc::UnboundedReceiver<StoreOut>) {
        let (out, rx) = mpsc::unbounded_channel();
        let init = empty_init();
        let (tx, _h) = spawn(init, Arc::new(cfg), None, out, StoreStats::default()).unwrap();
        (tx, rx)
    }

    fn pair(k: &str, v: &str) -> RawItem {
        let t = |s: &str| Value::Array(s.split(',').map(|e| Value::Text(e.into())).collect());
        RawItem::from_value(&Value::Array(vec![t(k), t(v)]))
    }

    fn table(tx: &StoreTx) -> Vec<(u64, Reply)> {
        let (t, r) = tokio::sync::oneshot::channel();
        tx.send(StoreMsg::Snapshot(t)).unwrap();
        r.blocking_recv().unwrap().2
    }

    #[test]
    fn a_backup_store_takes_a_chunked_dedupe_table_within_its_byte_limit() {
        let big = |rid: u64| {
            (
                rid,
                Reply::Pairs {
                    pairs: (0..100)
                        .map(|i| Pair::new(format!("k,{i}"), "v".repeat(90)))
                        .collect(),
                    message: None,
                },
            )
        };
        let one = 64 + big(0).1.mem_bytes();
        let cfg = Config {
            max_dedupe_bytes: 50 * one,
            ..Config::default()
        };
        let (tx, _rx) = start(cfg);
        tx.send(StoreMsg::Load {
            pairs: vec![("a".into(), "1".into())],
            reset: true,
        })
        .unwrap();
        let entries: Vec<_> = (0..200).map(big).collect();
        for c in dedupe::chunks(entries, 20 * one) {
            tx.send(StoreMsg::LoadDedupe(c)).unwrap();
        }
        tx.send(StoreMsg::Synced {
            seq: 9,
            dedupe: vec![],
        })
        .unwrap();
        let got = table(&tx);
        assert_eq!(got.len(), 50, "bounded by bytes");
        assert_eq!(got.first().map(|e| e.0), Some(150), "the newest are kept");
        assert_eq!(got.last().map(|e| e.0), Some(199));
        // A reset (a new initial copy) empties it.
        tx.send(StoreMsg::Load {
            pairs: vec![],
            reset: true,
        })
        .unwrap();
        assert!(table(&tx).is_empty());
    }

    #[test]
    fn a_connection_waits_behind_its_scan_and_others_do_not() {
        let (tx, mut rx) = start(Config::default());
        let gate = crate::server::links::RelayGate::new(&Config::default());
        let elems: Vec<RawItem> = (0..1000).map(|i| pair(&format!("k,{i}"), "v")).collect();
        tx.send(StoreMsg::Requests(
            vec![(1, Some(7), Command::Put(elems))],
            gate.clone(),
        ))
        .unwrap();
        tx.send(StoreMsg::Requests(
            vec![
                (2, Some(7), Command::get(r"k,\d+", ".*")),
                (3, Some(7), Command::Put(vec![pair("k,5000", "v")])),
                (4, Some(8), Command::Put(vec![pair("other", "v")])),
                (5, Some(7), Command::delete(r"k,\d+", "v")),
                (6, Some(7), Command::Put(vec![pair("k,1", "w")])),
            ],
            gate,
        ))
        .unwrap();
        let mut order = Vec::new();
        while order.len() < 6 {
            match rx.blocking_recv().unwrap() {
                StoreOut::Read { reply, .. } => order.push((reply.rid, reply.reply)),
                StoreOut::Write { rid, reply, .. } => order.push((rid, reply)),
                other => panic!("{other:?}"),
            }
        }
        let rids: Vec<u64> = order.iter().map(|o| o.0).collect();
        // Connection 8 is not held up by connection 7's scan; 7's requests keep their order.
        assert_eq!(rids, vec![1, 4, 2, 3, 5, 6]);
        let n = |i: usize| match &order[i].1 {
            Reply::Pairs { pairs, .. } => pairs.len(),
            r => panic!("{r:?}"),
        };
        assert_eq!(n(2), 1000, "the GET does not see the later PUT");
        assert_eq!(n(4), 1001, "the DELETE sees it");
        assert!(
            matches!(&order[5].1, Reply::Rejected(r) if r.is_empty()),
            "k,1 was free again"
        );
    }

    /// A store with a log writer stub (the test reads what it is sent) and a direct log.
    fn start_direct() -> (
        StoreTx,
        DirectWriter,
        Arc<DirectLog>,
        std::sync::mpsc::Receiver<WalMsg>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let (tx, w, log, rx, wanted, _) = start_direct_with(false);
        (tx, w, log, rx, wanted)
    }

    /// `inline`: the writer also applies updates on its own thread when the store is idle.
    fn start_direct_with(
        inline: bool,
    ) -> (
        StoreTx,
        DirectWriter,
        Arc<DirectLog>,
        std::sync::mpsc::Receiver<WalMsg>,
        Arc<std::sync::atomic::AtomicBool>,
        StoreStats,
    ) {
        // Nothing here answers requests: what the store emits is not read.
        let (out, _) = mpsc::unbounded_channel();
        let (wal, log_rx) = Wal::stub(64);
        let wanted = wal.snapshot_wanted.clone();
        let direct = DirectLog::new(wal.clone(), 1);
        let init = StoreInit {
            wal: Some(wal),
            direct: Some(direct.clone()),
            ..empty_init()
        };
        let cfg = Arc::new(Config::default());
        let stats = StoreStats::default();
        let (tx, _h) = spawn(init, cfg, None, out, stats.clone()).unwrap();
        let mut w = DirectWriter::new(direct.clone());
        if inline {
            w = w.applying(stats.view.clone());
        }
        (tx, w, direct, log_rx, wanted, stats)
    }

    /// Holds the store thread until the returned receiver is read.
    fn hold(tx: &StoreTx) -> std::sync::mpsc::Receiver<(Space, u64)> {
        let (t, r) = std::sync::mpsc::sync_channel(0);
        tx.send(StoreMsg::ScanCopy(t)).unwrap();
        r
    }

    fn upd(seq: u64) -> (u64, u64, Change, Reply) {
        let change = Change::Insert(vec![Pair::new(format!("k,{seq}"), "v")]);
        (seq, 100 + seq, change, Reply::Rejected(vec![]))
    }

    /// The next `n` messages to the log writer, in order, as short descriptions.
    fn logged(rx: &std::sync::mpsc::Receiver<WalMsg>, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                match rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .expect("a log record")
                {
                    WalMsg::Record(Record::Reset) => "reset".into(),
                    WalMsg::Record(Record::Pairs(p)) => format!("pairs {}", p.len()),
                    WalMsg::Record(Record::Dedupe(d)) => format!("dedupe {}", d.len()),
                    WalMsg::Record(Record::Base { seq, .. }) => format!("base {seq}"),
                    WalMsg::Record(Record::Change { epoch, seq, .. }) => {
                        format!("change {seq} e{epoch}")
                    }
                    WalMsg::Record(Record::Epoch(e)) => format!("epoch {e}"),
                    WalMsg::Snapshot { space, pos, .. } => {
                        format!("snapshot {} ({} pairs)", pos.seq, space.len())
                    }
                    WalMsg::Flush(_) => "flush".into(),
                    WalMsg::Direct(_) => "direct?".into(),
                }
            })
            .collect()
    }

    fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::yield_now();
        }
    }

    fn initial_copy(tx: &StoreTx, w: &mut DirectWriter, seq: u64) {
        let load = StoreMsg::Load {
            pairs: vec![("a".into(), "1".into())],
            reset: true,
        };
        w.via_store(tx, load);
        w.via_store(
            tx,
            StoreMsg::Synced {
                seq,
                dedupe: vec![],
            },
        );
    }

    #[test]
    fn a_direct_append_waits_until_the_store_logged_the_readers_earlier_messages() {
        let (tx, mut w, log, rx, _) = start_direct();
        let held = hold(&tx);
        initial_copy(&tx, &mut w, 5);
        // The store has not logged the initial copy yet: update 6 goes through it.
        assert!(
            !w.update(&tx, true, upd(6)),
            "appended before the base copy"
        );
        held.recv().unwrap();
        until("the store logged update 6", || {
            log.relayed.load(Ordering::Acquire) == 3
        });
        assert!(w.update(&tx, true, upd(7)), "appended directly once it may");
        assert_eq!(
            logged(&rx, 5),
            ["reset", "pairs 1", "base 5", "change 6 e1", "change 7 e1"]
        );
        // A direct append carries the epoch the store logged last, and follows its record.
        tx.send(StoreMsg::Epoch(3)).unwrap();
        until("the store logged epoch 3", || {
            log.epoch.load(Ordering::Acquire) == 3
        });
        assert!(w.update(&tx, true, upd(8)));
        // Not past what the store holds (`fresh` false): through the store.
        assert!(!w.update(&tx, false, upd(8)));
        // Once primary, never again.
        log.retire();
        assert!(!w.update(&tx, true, upd(9)));
        assert_eq!(logged(&rx, 3), ["epoch 3", "change 8 e3", "change 9 e3"]);
        let (t, r) = tokio::sync::oneshot::channel();
        tx.send(StoreMsg::Snapshot(t)).unwrap();
        let (space, seq, _) = r.blocking_recv().unwrap();
        assert_eq!((space.len(), seq), (5, 9), "every update applied once");
    }

    #[test]
    fn a_snapshot_waits_until_the_store_applied_every_update_appended_directly() {
        snapshot_after_direct_appends(false);
        snapshot_after_direct_appends(true);
    }

    /// The backup's reader applies an update it appended on its own thread only while the store
    /// thread is idle with nothing queued: never ahead of a message queued before it, and what
    /// it applies is in the store (published seq, later snapshots).
    #[test]
    fn a_backup_update_is_applied_beside_the_store_thread_only_when_it_is_idle() {
        let (tx, mut w, log, rx, _, stats) = start_direct_with(true);
        initial_copy(&tx, &mut w, 5);
        until("the store logged the copy", || {
            log.relayed.load(Ordering::Acquire) == 2
        });
        until("the store is idle", || {
            tx.queued.load(Ordering::SeqCst) == 0
        });
        assert!(w.update(&tx, true, upd(6)));
        assert_eq!(
            tx.queued.load(Ordering::SeqCst),
            0,
            "update 6 went through the store's queue"
        );
        assert_eq!(stats.seq.load(Ordering::Relaxed), 6, "update 6 not applied");
        // The store is busy: 7 goes through its queue, and 8 must not overtake it.
        let held = hold(&tx);
        assert!(w.update(&tx, true, upd(7)));
        assert!(w.update(&tx, true, upd(8)));
        assert_eq!(tx.queued.load(Ordering::SeqCst), 3, "7 and 8 not queued");
        held.recv().unwrap();
        until("7 and 8 applied", || stats.seq.load(Ordering::Relaxed) == 8);
        assert!(w.update(&tx, true, upd(9)));
        let (t, r) = oneshot::channel();
        tx.send(StoreMsg::Snapshot(t)).unwrap();
        let (space, seq, dedupe) = r.blocking_recv().unwrap();
        assert_eq!(seq, 9);
        for n in 6..=9 {
            assert!(space.value_of(&format!("k,{n}")).is_some(), "k,{n} missing");
            assert!(
                dedupe.iter().any(|(rid, _)| *rid == 100 + n),
                "rid of {n} missing"
            );
        }
        assert_eq!(log.gate().sent, 4);
        assert_eq!(
            logged(&rx, 7),
            [
                "reset",
                "pairs 1",
                "base 5",
                "change 6 e1",
                "change 7 e1",
                "change 8 e1",
                "change 9 e1"
            ]
        );
    }

    fn snapshot_after_direct_appends(inline: bool) {
        let (tx, mut w, log, rx, wanted, _) = start_direct_with(inline);
        initial_copy(&tx, &mut w, 0);
        until("the store logged the copy", || {
            log.relayed.load(Ordering::Acquire) == 2
        });
        assert_eq!(logged(&rx, 3), ["reset", "pairs 1", "base 0"]);
        // The store is busy while update 1 is appended and the writer asks for a snapshot:
        // a copy of the space as the store holds it (without update 1) must not follow update
        // 1 in the log (a snapshot replaces every record before it).
        let held = hold(&tx);
        assert!(w.update(&tx, true, upd(1)));
        wanted.store(true, Ordering::Release);
        held.recv().unwrap();
        until("the store saw the request", || {
            !wanted.load(Ordering::Acquire)
        });
        // Whether update 2 is appended directly (the snapshot is out) or by the store (it
        // waits) depends on timing; the order of the log does not.
        w.update(&tx, true, upd(2));
        assert_eq!(
            logged(&rx, 3),
            ["change 1 e1", "snapshot 1 (2 pairs)", "change 2 e1"]
        );
        // The gate opens again after the snapshot.
        until("direct appends resume", || !log.gate().pause);
        assert!(w.update(&tx, true, upd(3)));
        assert_eq!(logged(&rx, 1), ["change 3 e1"]);
    }

    /// Where the store thread would wait for the proxy to read answers, a batch handled beside
    /// it stops and leaves the rest to the thread, which waits, then answers once there is room.
    #[test]
    fn a_batch_without_room_for_its_answers_is_left_to_the_thread() {
        let (out, mut rx) = mpsc::unbounded_channel();
        let stats = StoreStats::default();
        let cfg = Config::default();
        let (tx, _h) = spawn(
            empty_init(),
            Arc::new(cfg.clone()),
            None,
            out,
            stats.clone(),
        )
        .unwrap();
        let view = stats.view.get().unwrap().clone();
        let gate = crate::server::links::RelayGate::new(&cfg);
        let over = cfg.max_relay_reply_bytes + 1;
        gate.charge(over);
        let put = (1, Some(7), Command::Put(vec![pair("a", "v")]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut batch = Some(vec![put]);
        while let Some(b) = batch.take() {
            if let Err(b) = view.try_handle(&gate, b) {
                assert!(std::time::Instant::now() < deadline, "never taken");
                std::thread::yield_now();
                batch = Some(b);
            }
        }
        // The batch went to the thread, which waits for room: not handled yet.
        assert!(!gate.caught_up());
        assert!(rx.try_recv().is_err());
        gate.release(over);
        assert!(matches!(
            rx.blocking_recv().unwrap(),
            StoreOut::Write { seq: 1, rid: 1, .. }
        ));
        let _ = tx.send(StoreMsg::Stop);
    }

    #[test]
    fn the_store_lets_go_of_the_log_writer_when_it_stops_though_the_reader_lives_on() {
        let (tx, w, log, rx, _) = start_direct();
        tx.send(StoreMsg::Stop).unwrap();
        let wait = std::time::Duration::from_secs(10);
        match rx.recv_timeout(wait) {
            Ok(WalMsg::Flush(done)) => done.send(()).unwrap(),
            _ => panic!("the store flushes the log when it stops"),
        }
        // The writer thread ends when every sender is gone; the server waits for it.
        assert!(
            matches!(
                rx.recv_timeout(wait),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
            ),
            "a sender of the log writer is left"
        );
        drop((w, log));
    }

    /// A relay reader's batch is handled on its own thread only when nothing is queued for the
    /// store thread; what does not fit the log writer's queue waits for the thread (woken for it),
    /// in order, and no batch is handled beside the thread until it has been sent.
    #[test]
    fn a_batch_is_handled_beside_the_thread_only_when_nothing_waits_and_its_log_stays_in_order() {
        let (out, mut rx) = mpsc::unbounded_channel();
        let (wal, log_rx) = Wal::stub(1);
        let init = StoreInit {
            wal: Some(wal),
            ..empty_init()
        };
        let stats = StoreStats::default();
        let cfg = Config::default();
        let (tx, _h) = spawn(init, Arc::new(cfg.clone()), None, out, stats.clone()).unwrap();
        let view = stats.view.get().unwrap().clone();
        let gate = crate::server::links::RelayGate::new(&cfg);
        let put = |rid: u64, k: &str| (rid, Some(7), Command::Put(vec![pair(k, "v")]));
        // A batch of this link still with the thread: the next one must wait behind it.
        gate.sent();
        assert!(view.try_handle(&gate, vec![put(1, "a")]).is_err());
        gate.handled();
        // Three writes, one log slot: one record queued, two left for the thread, which is
        // woken for them (it then waits for room in the log writer's queue).
        let batch = vec![put(2, "b"), put(3, "c"), put(4, "d")];
        let mut batch = Some(batch);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while let Some(b) = batch.take() {
            if let Err(b) = view.try_handle(&gate, b) {
                assert!(std::time::Instant::now() < deadline, "never handled");
                std::thread::yield_now();
                batch = Some(b);
            }
        }
        for seq in 1..=3 {
            assert!(
                matches!(rx.blocking_recv().unwrap(), StoreOut::Write { seq: s, .. } if s == seq)
            );
        }
        // While records wait for the thread, no batch is handled beside it.
        assert!(view.try_handle(&gate, vec![put(5, "e")]).is_err());
        let mut seqs = vec![];
        while seqs.len() < 3 {
            if let WalMsg::Record(Record::Change { seq, rid, .. }) = log_rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap()
            {
                seqs.push((seq, rid));
            }
        }
        assert_eq!(seqs, vec![(1, 2), (2, 3), (3, 4)], "logged in order");
        // Once the thread has sent them, batches are handled beside it again.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut batch = Some(vec![put(6, "f")]);
        while let Some(b) = batch.take() {
            if let Err(b) = view.try_handle(&gate, b) {
                assert!(std::time::Instant::now() < deadline, "never handled again");
                std::thread::yield_now();
                batch = Some(b);
            }
        }
        assert!(matches!(
            rx.blocking_recv().unwrap(),
            StoreOut::Write { seq: 4, rid: 6, .. }
        ));
        assert!(matches!(
            log_rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap(),
            WalMsg::Record(Record::Change { seq: 4, .. })
        ));
        let _ = tx.send(StoreMsg::Stop);
    }

    #[test]
    fn an_exact_read_is_answered_beside_the_thread_only_when_nothing_before_it_waits() {
        let (out, mut rx) = mpsc::unbounded_channel();
        let init = empty_init();
        let stats = StoreStats::default();
        let cfg = Config::default();
        let (tx, _h) = spawn(init, Arc::new(cfg.clone()), None, out, stats.clone()).unwrap();
        let view = stats.view.get().unwrap().clone();
        let gate = crate::server::links::RelayGate::new(&cfg);
        let get = |key: &str, value: &str| Command::get(key, value);
        // Sent but not yet handled (the batch is still on its way): the thread must answer.
        gate.sent();
        assert!(!view.try_read(&gate, 2, 7, &get("a", ".*")));
        tx.send(StoreMsg::Requests(
            vec![(1, Some(7), Command::Put(vec![pair("a", "1")]))],
            gate.clone(),
        ))
        .unwrap();
        assert!(matches!(
            rx.blocking_recv().unwrap(),
            StoreOut::Write { seq: 1, .. }
        ));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !view.try_read(&gate, 2, 7, &get("a", ".*")) {
            assert!(std::time::Instant::now() < deadline, "never caught up");
            std::thread::yield_now();
        }
        match rx.blocking_recv().unwrap() {
            StoreOut::Read { after_seq, reply } => {
                assert_eq!(after_seq, 1, "held until the write it saw is committed");
                assert_eq!(reply.rid, 2);
                assert!(
                    matches!(&reply.reply, Reply::Pairs { pairs, .. } if pairs.len() == 1 && pairs[0].value == "1"),
                    "{reply:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Anything but an exact key with any value goes to the thread.
        assert!(!view.try_read(&gate, 3, 7, &get("a", "1")));
        assert!(!view.try_read(&gate, 3, 7, &get("a|b", ".*")));
        // And a GET that may wait (PROTOCOL.md §4a): only the thread registers waiters.
        let waiting = Command::Get {
            key: "a".into(),
            value: ".*".into(),
            limit: Some(1),
            wait_ms: Some(1000),
        };
        assert!(!view.try_read(&gate, 3, 7, &waiting));
        assert!(!view.try_read(&gate, 3, 7, &Command::Put(vec![pair("b", "2")])));
        // So does a read of a connection with a request on the scan threads.
        let elems: Vec<RawItem> = (0..1000).map(|i| pair(&format!("k,{i}"), "v")).collect();
        gate.sent();
        tx.send(StoreMsg::Requests(
            vec![
                (4, Some(8), Command::Put(elems)),
                (5, Some(8), get(r"k,\d+", ".*")),
            ],
            gate.clone(),
        ))
        .unwrap();
        assert!(matches!(
            rx.blocking_recv().unwrap(),
            StoreOut::Write { seq: 2, .. }
        ));
        let mut answered = false;
        while !gate.caught_up() {
            assert!(std::time::Instant::now() < deadline, "never caught up");
            std::thread::yield_now();
        }
        // Until the scan is done (then its answer is already out).
        if view.try_read(&gate, 6, 8, &get("a", ".*")) {
            answered = true;
        }
        let mut rids = Vec::new();
        while rids.len() < 1 + usize::from(answered) {
            match rx.blocking_recv().unwrap() {
                StoreOut::Read { reply, .. } => rids.push(reply.rid),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            rids[0], 5,
            "the read of connection 8 came before its scan: {rids:?}"
        );
        drop(tx);
    }
}
