//! The log writer: a thread of its own that appends records in the order the store sends them,
//! syncs them per the fsync policy with one `fdatasync` for everything that arrived while the
//! previous one ran (group commit), publishes what is durable, and compacts the log with
//! snapshots written by a further thread, so neither the store nor any event loop ever waits on
//! the disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::{
    DurableError, FsyncPolicy, Position, Record, encode_frame, segment_index, segment_name,
    write_snapshot,
};
use crate::space::Space;
use crate::wire::node::Reply;

/// Nice value of snapshot threads (background work).
const SNAPSHOT_NICE: libc::c_int = 10;

/// Largest group written and synced at once (bytes of encoded records); more waits for the next.
const GROUP_MAX_BYTES: usize = 8 << 20;

/// Work for the log writer.
pub enum WalMsg {
    Record(Record),
    /// A consistent copy of the space at `pos` (sent by the store in order, when asked through
    /// `snapshot_wanted`): records before it are in it, records after it are not.
    Snapshot {
        space: Space,
        pos: Position,
        dedupe: Vec<(u64, Reply)>,
    },
    /// Write and sync everything queued, then answer (graceful stop, tests).
    Flush(std::sync::mpsc::Sender<()>),
}

/// What is durable now (per the fsync policy): the position, and whether the directory holds a
/// complete base copy (a backup's initial copy has been logged to the end).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    pub pos: Position,
    pub base: bool,
    /// Base records held (a backup's initial copies, counted since this process started).
    pub bases: u64,
}

#[derive(Clone, Debug)]
pub struct WalOptions {
    pub policy: FsyncPolicy,
    pub interval: Duration,
    pub snapshot_every_changes: u64,
    pub snapshot_every_bytes: u64,
    pub queue: usize,
}

impl WalOptions {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        WalOptions {
            policy: cfg.fsync,
            interval: Duration::from_millis(cfg.fsync_interval_ms),
            snapshot_every_changes: cfg.snapshot_every_changes,
            snapshot_every_bytes: cfg.snapshot_every_bytes,
            queue: cfg.wal_queue_records,
        }
    }
}

/// The sending side of the log writer.
#[derive(Clone)]
pub struct Wal {
    tx: SyncSender<WalMsg>,
    /// Set by the writer when the log has grown past a snapshot threshold; the store answers
    /// with a [`WalMsg::Snapshot`].
    pub snapshot_wanted: Arc<AtomicBool>,
}

impl Wal {
    /// Queues a message; blocks while the queue is full (back-pressure on the store). False if
    /// the writer has stopped (it failed: the server is told through `on_error`).
    pub fn send(&self, m: WalMsg) -> bool {
        match self.tx.try_send(m) {
            Ok(()) => true,
            Err(TrySendError::Full(m)) => self.tx.send(m).is_ok(),
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Writes and syncs everything queued so far (bounded wait).
    pub fn flush(&self, wait: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(WalMsg::Flush(tx)) && rx.recv_timeout(wait).is_ok()
    }
}

/// Callbacks from the writer thread.
pub struct WalHooks {
    pub on_durable: Box<dyn Fn(Durable) + Send>,
    pub on_error: Box<dyn Fn(String) + Send>,
}

/// Starts the writer for replica directory `dir`, appending to a new segment after `last_segment`.
/// `start`: what the directory already holds durably (recovered), `base`: whether it is a
/// complete copy.
pub fn spawn(
    dir: PathBuf,
    last_segment: Option<u64>,
    start: Durable,
    opts: WalOptions,
    hooks: WalHooks,
) -> Result<(Wal, std::thread::JoinHandle<()>), DurableError> {
    let index = last_segment.map_or(0, |n| n + 1);
    let file = open_segment(&dir, index)?;
    let (tx, rx) = std::sync::mpsc::sync_channel(opts.queue);
    let wanted = Arc::new(AtomicBool::new(false));
    let mut w = Writer {
        dir,
        index,
        file,
        durable: start,
        pos: start,
        buf: Vec::with_capacity(1 << 16),
        opts,
        changes_since: 0,
        bytes_since: 0,
        wanted: wanted.clone(),
        requested: false,
        snapshotting: Arc::new(AtomicBool::new(false)),
        dirty: false,
        next_sync: Instant::now(),
        hooks,
    };
    let h = std::thread::Builder::new()
        .name("wal".into())
        .spawn(move || w.run(rx))
        .map_err(|e| DurableError::io("cannot start the log writer thread", Path::new("-"), e))?;
    Ok((
        Wal {
            tx,
            snapshot_wanted: wanted,
        },
        h,
    ))
}

fn open_segment(dir: &Path, index: u64) -> Result<File, DurableError> {
    let path = dir.join(segment_name(index));
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| DurableError::io("cannot open log segment", &path, e))?;
    super::sync_dir(dir)?;
    Ok(f)
}

struct Writer {
    dir: PathBuf,
    index: u64,
    file: File,
    /// Durable so far.
    durable: Durable,
    /// Appended so far (written or queued in `buf`).
    pos: Durable,
    buf: Vec<u8>,
    opts: WalOptions,
    changes_since: u64,
    bytes_since: u64,
    wanted: Arc<AtomicBool>,
    /// A snapshot was asked for and the store's copy has not arrived yet.
    requested: bool,
    snapshotting: Arc<AtomicBool>,
    /// Written but not synced (interval policy).
    dirty: bool,
    next_sync: Instant,
    hooks: WalHooks,
}

impl Writer {
    fn run(&mut self, rx: Receiver<WalMsg>) {
        if let Err(e) = self.serve(rx) {
            (self.hooks.on_error)(e.to_string());
        }
    }

    fn serve(&mut self, rx: Receiver<WalMsg>) -> Result<(), DurableError> {
        loop {
            let first = if self.opts.policy == FsyncPolicy::Interval && self.dirty {
                match rx.recv_timeout(self.next_sync.saturating_duration_since(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return self.sync(),
                }
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return self.sync(),
                }
            };
            let mut flushes = Vec::new();
            if let Some(m) = first {
                self.take(m, &mut flushes)?;
                while self.buf.len() < GROUP_MAX_BYTES {
                    match rx.try_recv() {
                        Ok(m) => self.take(m, &mut flushes)?,
                        Err(_) => break,
                    }
                }
            }
            self.write_group(!flushes.is_empty())?;
            for f in flushes {
                let _ = f.send(());
            }
            self.maybe_want_snapshot();
        }
    }

    fn take(
        &mut self,
        m: WalMsg,
        flushes: &mut Vec<std::sync::mpsc::Sender<()>>,
    ) -> Result<(), DurableError> {
        match m {
            WalMsg::Record(r) => {
                let before = self.buf.len();
                encode_frame(&r, &mut self.buf);
                self.bytes_since += (self.buf.len() - before) as u64;
                match &r {
                    Record::Reset => self.pos.base = false,
                    Record::Pairs(_) | Record::Dedupe(_) => {}
                    Record::Base { epoch, seq, .. } => {
                        self.pos.pos = Position {
                            epoch: *epoch,
                            seq: *seq,
                        };
                        self.pos.base = true;
                        self.pos.bases += 1;
                    }
                    Record::Change { epoch, seq, .. } => {
                        self.changes_since += 1;
                        self.pos.pos.epoch = self.pos.pos.epoch.max(*epoch);
                        self.pos.pos.seq = *seq;
                    }
                    Record::Epoch(e) => self.pos.pos.epoch = self.pos.pos.epoch.max(*e),
                }
            }
            WalMsg::Snapshot { space, pos, dedupe } => {
                // Everything before the copy goes to the old segment, everything after to a new
                // one; the copy replaces the old segments once it is on disk.
                self.write_group(true)?;
                self.index += 1;
                self.file = open_segment(&self.dir, self.index)?;
                self.changes_since = 0;
                self.bytes_since = 0;
                self.start_snapshot(space, pos, dedupe);
            }
            WalMsg::Flush(tx) => flushes.push(tx),
        }
        Ok(())
    }

    /// Writes what is buffered, syncs per policy (or when `force`), publishes what is durable.
    fn write_group(&mut self, force: bool) -> Result<(), DurableError> {
        if !self.buf.is_empty() {
            let path = || self.dir.join(segment_name(self.index));
            self.file
                .write_all(&self.buf)
                .map_err(|e| DurableError::io("cannot append to log", &path(), e))?;
            self.buf.clear();
            if self.buf.capacity() > GROUP_MAX_BYTES * 2 {
                self.buf.shrink_to(1 << 16);
            }
            self.dirty = true;
        }
        let sync_now = force
            || match self.opts.policy {
                FsyncPolicy::Always => self.dirty,
                FsyncPolicy::Interval => self.dirty && Instant::now() >= self.next_sync,
                FsyncPolicy::Never => false,
            };
        if sync_now {
            self.sync()?;
        }
        // With `interval` and `never`, an append counts as held once the OS has it.
        let durable = match self.opts.policy {
            FsyncPolicy::Always if self.dirty => self.durable,
            _ => self.pos,
        };
        if durable != self.durable {
            self.durable = durable;
            (self.hooks.on_durable)(durable);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), DurableError> {
        if self.dirty {
            self.file.sync_data().map_err(|e| {
                DurableError::io(
                    "cannot sync log",
                    &self.dir.join(segment_name(self.index)),
                    e,
                )
            })?;
            self.dirty = false;
        }
        self.next_sync = Instant::now() + self.opts.interval;
        if self.durable != self.pos {
            self.durable = self.pos;
            (self.hooks.on_durable)(self.pos);
        }
        Ok(())
    }

    fn maybe_want_snapshot(&mut self) {
        if self.requested || self.snapshotting.load(Ordering::Acquire) {
            return;
        }
        if (self.opts.snapshot_every_changes > 0
            && self.changes_since >= self.opts.snapshot_every_changes)
            || (self.opts.snapshot_every_bytes > 0
                && self.bytes_since >= self.opts.snapshot_every_bytes)
        {
            self.requested = true;
            self.wanted.store(true, Ordering::Release);
        }
    }

    fn start_snapshot(&mut self, space: Space, pos: Position, dedupe: Vec<(u64, Reply)>) {
        self.requested = false;
        if self.snapshotting.swap(true, Ordering::AcqRel) {
            // One at a time: the next one covers this one's segments too.
            return;
        }
        let busy = self.snapshotting.clone();
        let dir = self.dir.clone();
        let next = self.index;
        let spawned = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                // Background work: below the event loops that carry heartbeats (Linux nice values
                // are per thread; failure to lower it is harmless).
                // SAFETY: setpriority has no memory effects; 0 = the calling thread.
                let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, SNAPSHOT_NICE) };
                let start = Instant::now();
                match write_snapshot(&dir, &space, pos, next, dedupe) {
                    Ok(n) => {
                        let removed = remove_segments_before(&dir, next);
                        info!(
                            dir = %dir.display(),
                            pairs = n,
                            %pos,
                            segments_removed = removed,
                            ms = start.elapsed().as_millis() as u64,
                            "snapshot written; log compacted"
                        );
                    }
                    Err(e) => warn!("{e}; the log is kept and a snapshot tried again later"),
                }
                busy.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            warn!("cannot start a snapshot thread: {e}; the log is kept");
            self.snapshotting.store(false, Ordering::Release);
        }
    }
}

/// Removes the log segments older than `next` (a snapshot holds them); returns how many.
fn remove_segments_before(dir: &Path, next: u64) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            if let Some(i) = name.to_str().and_then(segment_index)
                && i < next
            {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => n += 1,
                    Err(err) => debug!("cannot remove {}: {err}", e.path().display()),
                }
            }
        }
    }
    n
}
