//! The thread that owns a replica's tuple space.
//!
//! A plain OS thread, not an async task: a regex scan over a million pairs or a DELETE over the
//! whole space blocks only this thread, never the event loops that carry heartbeats. Writes are
//! applied here one after another in arrival order, which is the order the proxy sent them.
//! Full-scan GETs run on a copy-on-write snapshot (O(1) clone) in the blocking pool so that a slow
//! read does not hold up later writes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ciborium::Value;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::durable::wal::{Wal, WalMsg};
use crate::durable::{Position, Record, SNAPSHOT_CHUNK};
use crate::space::{self, Change, IndexHint, Pair, Pattern, Space};
use crate::wire::client::{Command, pairs_node_len, pairs_response_len};
use crate::wire::node::{RelayReply, Reply};

/// Spaces at least this large have full-scan GETs moved off the store thread.
const OFFLOAD_SCAN_ABOVE: usize = 10_000;
/// Compiled patterns kept for reuse (clients repeat the same patterns).
const PATTERN_CACHE: usize = 1024;
/// Only short patterns are cached: a compiled regex may be as large as `regex_size_limit`, and a
/// client must not be able to pin thousands of those in memory.
const PATTERN_CACHE_MAX_SOURCE: usize = 64;
/// Dedupe entries kept at most, whatever the watermark says (bounds memory).
pub const MAX_DEDUPE: usize = 1_000_000;

/// A copy of the space, the update it reflects, and the dedupe table (for a new backup).
pub type SpaceCopy = (Space, u64, Vec<(u64, Reply)>);

/// Work for the store thread.
pub enum StoreMsg {
    /// Relayed requests, in order.
    Requests(Vec<(u64, Option<u64>, Command)>),
    /// The proxy has answered every rid below this.
    Watermark(u64),
    /// A backup applies a primary's update (with the reply, for dedupe).
    Apply {
        seq: u64,
        rid: u64,
        change: Change,
        reply: Reply,
    },
    /// Replace the whole space (backup: initial copy).
    Load {
        pairs: Vec<(String, String)>,
        reset: bool,
    },
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
    Stop,
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
    dedupe: BTreeMap<u64, Reply>,
    save_file: Option<PathBuf>,
    out: mpsc::UnboundedSender<StoreOut>,
    len: Arc<AtomicU64>,
    seq_pub: Arc<AtomicU64>,
    rt: tokio::runtime::Handle,
}

/// Shared counters the async side reads without asking the thread.
#[derive(Clone, Default)]
pub struct StoreStats {
    pub pairs: Arc<AtomicU64>,
    pub seq: Arc<AtomicU64>,
}

/// Starts the store thread.
pub fn spawn(
    init: StoreInit,
    cfg: Arc<Config>,
    save_file: Option<PathBuf>,
    out: mpsc::UnboundedSender<StoreOut>,
    stats: StoreStats,
) -> std::io::Result<(
    std::sync::mpsc::Sender<StoreMsg>,
    std::thread::JoinHandle<()>,
)> {
    let (tx, rx) = std::sync::mpsc::channel();
    stats
        .pairs
        .store(init.space.len() as u64, Ordering::Relaxed);
    stats.seq.store(init.seq, Ordering::Relaxed);
    let mut store = Store {
        space: init.space,
        seq: init.seq,
        epoch: init.epoch,
        wal: init.wal,
        cfg,
        patterns: HashMap::new(),
        dedupe: init.dedupe.into_iter().collect(),
        save_file,
        out,
        len: stats.pairs,
        seq_pub: stats.seq,
        rt: tokio::runtime::Handle::current(),
    };
    let h = std::thread::Builder::new()
        .name("store".into())
        .spawn(move || {
            if init.log_base {
                store.log_base();
            }
            while let Ok(msg) = rx.recv() {
                if !store.handle(msg) {
                    break;
                }
                store.len.store(store.space.len() as u64, Ordering::Relaxed);
                store.seq_pub.store(store.seq, Ordering::Relaxed);
                store.maybe_snapshot();
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
        if let Some(w) = &self.wal {
            // False only if the writer failed, which the server hears about and acts on.
            let _ = w.send(WalMsg::Record(r));
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
        self.log(Record::Base {
            epoch: self.epoch,
            seq: self.seq,
            dedupe: self.dedupe_vec(),
        });
    }

    fn dedupe_vec(&self) -> Vec<(u64, Reply)> {
        self.dedupe.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Hands the log writer a copy of the space when it asks for one (O(1) clone).
    fn maybe_snapshot(&self) {
        if let Some(w) = &self.wal
            && w.snapshot_wanted.swap(false, Ordering::AcqRel)
        {
            let _ = w.send(WalMsg::Snapshot {
                space: self.space.clone(),
                pos: Position {
                    epoch: self.epoch,
                    seq: self.seq,
                },
                dedupe: self.dedupe_vec(),
            });
        }
    }

    fn pattern(&mut self, src: &str) -> Result<Pattern, String> {
        if let Some(p) = self.patterns.get(src) {
            return p.clone();
        }
        let p = Pattern::compile(src, &self.cfg.pattern_limits()).map_err(|e| e.to_string());
        if src.len() <= PATTERN_CACHE_MAX_SOURCE {
            if self.patterns.len() >= PATTERN_CACHE {
                self.patterns.clear();
            }
            self.patterns.insert(src.to_owned(), p.clone());
        }
        p
    }

    fn patterns(&mut self, k: &str, v: &str) -> Result<(Pattern, Pattern), String> {
        let kp = self.pattern(k);
        let vp = self.pattern(v);
        match (kp, vp) {
            (Ok(k), Ok(v)) => Ok((k, v)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// The compiled patterns, or None after answering `ok` with no pairs and a message saying
    /// which pattern does not compile (PROTOCOL §4: a bad pattern is not an error status).
    fn patterns_or_answer(&mut self, rid: u64, k: &str, v: &str) -> Option<(Pattern, Pattern)> {
        match self.patterns(k, v) {
            Ok(p) => Some(p),
            Err(m) => {
                self.emit(StoreOut::Read {
                    after_seq: self.seq,
                    reply: RelayReply {
                        rid,
                        reply: Reply::Pairs {
                            pairs: vec![],
                            message: Some(m),
                        },
                    },
                });
                None
            }
        }
    }

    fn too_large(&self, pairs: &[Pair]) -> Option<Reply> {
        too_large_reply(pairs, self.cfg.max_response_bytes)
    }

    fn emit(&self, o: StoreOut) {
        let _ = self.out.send(o);
    }

    /// Returns false to stop the thread.
    fn handle(&mut self, msg: StoreMsg) -> bool {
        match msg {
            StoreMsg::Requests(reqs) => {
                for (rid, client, cmd) in reqs {
                    self.request(rid, client, cmd);
                }
            }
            StoreMsg::Watermark(w) => {
                self.dedupe = self.dedupe.split_off(&w);
                self.emit(StoreOut::Watermark(w));
            }
            StoreMsg::Apply {
                seq,
                rid,
                change,
                reply,
            } => {
                if seq > self.seq {
                    self.space.apply(&change);
                    self.seq = seq;
                    if self.wal.is_some() {
                        self.log(Record::Change {
                            epoch: self.epoch,
                            seq,
                            rid,
                            change,
                            reply: reply.clone(),
                        });
                    }
                    self.remember(rid, reply);
                }
            }
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
            }
            StoreMsg::Synced { seq, dedupe } => {
                self.seq = seq;
                self.dedupe = dedupe.into_iter().collect();
                if self.wal.is_some() {
                    self.log(Record::Base {
                        epoch: self.epoch,
                        seq,
                        dedupe: self.dedupe_vec(),
                    });
                }
            }
            StoreMsg::Epoch(e) => {
                if e > self.epoch {
                    self.epoch = e;
                    self.log(Record::Epoch(e));
                }
            }
            StoreMsg::Snapshot(tx) => {
                let _ = tx.send((self.space.clone(), self.seq, self.dedupe_vec()));
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
            StoreMsg::Stop => return false,
        }
        true
    }

    fn remember(&mut self, rid: u64, reply: Reply) {
        self.dedupe.insert(rid, reply);
        while self.dedupe.len() > MAX_DEDUPE {
            self.dedupe.pop_first();
        }
    }

    fn request(&mut self, rid: u64, client: Option<u64>, cmd: Command) {
        if client.is_none() {
            // SPEC §3: a request without a connection indicator is rejected by the primary.
            self.emit(StoreOut::Read {
                after_seq: 0,
                reply: RelayReply {
                    rid,
                    reply: Reply::Malformed("request carries no connection indicator; only the proxy may relay requests".into()),
                },
            });
            return;
        }
        if let Some(r) = self.dedupe.get(&rid) {
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
        match cmd {
            Command::Get { key, value }
                if is_plain_key(&key)
                    && key.len() <= self.cfg.max_pattern_bytes
                    && value == ".*" =>
            {
                // The commonest read, an exact key with any value: a map lookup, no regex.
                let pairs = self
                    .space
                    .value_of(&key)
                    .map(|v| vec![Pair::new(key.clone(), v.clone())])
                    .unwrap_or_default();
                self.emit(StoreOut::Read {
                    after_seq: self.seq,
                    reply: RelayReply {
                        rid,
                        reply: Reply::Pairs {
                            pairs,
                            message: None,
                        },
                    },
                });
            }
            Command::Get { key, value } => {
                let Some((kp, vp)) = self.patterns_or_answer(rid, &key, &value) else {
                    return;
                };
                let after_seq = self.seq;
                if matches!(kp.hint(), IndexHint::Scan) && self.space.len() > OFFLOAD_SCAN_ABOVE {
                    let snap = self.space.clone();
                    let out = self.out.clone();
                    let max = self.cfg.max_response_bytes;
                    self.rt.spawn_blocking(move || {
                        let pairs = snap.get(&kp, &vp);
                        let reply = too_large_reply(&pairs, max).unwrap_or(Reply::Pairs {
                            pairs,
                            message: None,
                        });
                        let _ = out.send(StoreOut::Read {
                            after_seq,
                            reply: RelayReply { rid, reply },
                        });
                    });
                    return;
                }
                let pairs = self.space.get(&kp, &vp);
                let reply = self.too_large(&pairs).unwrap_or(Reply::Pairs {
                    pairs,
                    message: None,
                });
                self.emit(StoreOut::Read {
                    after_seq,
                    reply: RelayReply { rid, reply },
                });
            }
            Command::Delete { key, value } => {
                let Some((kp, vp)) = self.patterns_or_answer(rid, &key, &value) else {
                    return;
                };
                let matching = self.space.get(&kp, &vp);
                if let Some(r) = self.too_large(&matching) {
                    return self.emit(StoreOut::Read {
                        after_seq: self.seq,
                        reply: RelayReply { rid, reply: r },
                    });
                }
                let change = Change::Remove(matching.iter().map(|p| p.key.clone()).collect());
                self.space.apply(&change);
                self.write(
                    rid,
                    change,
                    Reply::Pairs {
                        pairs: matching,
                        message: None,
                    },
                );
            }
            Command::Put(elems) | Command::Post(elems) if elems.is_empty() => {
                self.emit(StoreOut::Read {
                    after_seq: self.seq,
                    reply: RelayReply {
                        rid,
                        reply: Reply::Rejected(vec![]),
                    },
                });
            }
            Command::Put(elems) => {
                let cands = elems
                    .iter()
                    .map(|v| space::pair_from_value(v, &limits))
                    .collect();
                let (change, rejected) = self.space.put(cands);
                let reply = Reply::Rejected(pick(elems, &rejected));
                self.write(rid, change, reply);
            }
            Command::Post(elems) => {
                let cands = elems
                    .iter()
                    .map(|v| space::pair_from_value(v, &limits))
                    .collect();
                let (change, rejected) = self.space.post(cands);
                let reply = Reply::Rejected(pick(elems, &rejected));
                self.write(rid, change, reply);
            }
        }
    }

    fn write(&mut self, rid: u64, change: Change, reply: Reply) {
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
    }
}

/// A key pattern that can only match itself: alphanumerics and commas, no regex syntax at all.
fn is_plain_key(p: &str) -> bool {
    !p.is_empty() && p.chars().all(|c| c == ',' || c.is_alphanumeric())
}

fn too_large_reply(pairs: &[Pair], max: usize) -> Option<Reply> {
    // One size rule for both encodings: what reaches the client also fits every node link.
    let n = pairs_response_len(pairs).max(pairs_node_len(pairs));
    (n > max).then(|| {
        Reply::TooLarge(format!(
            "the answer would hold {} pairs (~{n} bytes), more than max_response_bytes ({max}); nothing was changed: narrow the pattern",
            pairs.len()
        ))
    })
}

/// The elements at `idx` (ascending), moved out of `elems`, exactly as sent.
fn pick(elems: Vec<Value>, idx: &[usize]) -> Vec<Value> {
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
