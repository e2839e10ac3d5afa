//! The log writer: a thread of its own that appends records in the order the store sends them,
//! syncs them per the fsync policy with one `fdatasync` for everything that arrived while the
//! previous one ran (group commit), publishes what is durable, and compacts the log with
//! snapshots written by a further thread, so neither the store nor any event loop ever waits on
//! the disk.
//!
//! Segments are preallocated (`wal_segment_bytes`): a further thread writes the next one with
//! zeros and syncs it (`wal.spare`) while the writer fills the current one; the writer renames it
//! into place when the current one is full or a snapshot starts a new one. An `fdatasync` then
//! only writes data into blocks the file already owns: no size change or allocation for the
//! filesystem to commit. Without a spare ready (just started, or the disk slower than the log)
//! the writer appends to a new, empty segment instead and moves to the spare once it is ready.
//!
//! With `fsync = "always"`, a preallocated segment is written with `O_DIRECT` where the
//! filesystem allows it: whole aligned blocks from an aligned buffer (the last, partial block
//! is kept and written again with the next group, as the page cache would write its page), then
//! `fdatasync` for the device's cache. The page cache has nothing to copy or write back: on
//! this project's test VM an append + sync costs ~37 µs of CPU and ~88 µs against ~50 µs and
//! ~105 µs buffered (docs/BENCHMARKS.md).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::{
    DurableError, FsyncPolicy, Position, Record, SPARE_FILE, SPARE_TMP, encode_record,
    segment_index, segment_name, write_snapshot,
};
use crate::space::Space;
use crate::wire::node::Reply;

/// Nice value of snapshot threads (background work).
const SNAPSHOT_NICE: libc::c_int = 10;

/// Largest group written and synced at once (bytes of encoded records); more waits for the next.
const GROUP_MAX_BYTES: usize = 8 << 20;

/// Alignment and size unit of `O_DIRECT` appends: a page, a multiple of every device's logical
/// block size up to 4 KiB.
const DIRECT_BLOCK: usize = 4096;

/// Zeros written per call when preparing a spare segment.
const ZERO_CHUNK: usize = 1 << 20;

/// States of the spare segment.
const SPARE_NONE: u8 = 0;
const SPARE_PREPARING: u8 = 1;
const SPARE_READY: u8 = 2;

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
    /// Answers whether the current segment is written with `O_DIRECT` (tests).
    #[cfg(test)]
    Direct(std::sync::mpsc::Sender<bool>),
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
    /// Preallocated segment size; 0 = append to segments that change only at snapshots.
    pub segment_bytes: u64,
    /// Snapshots and spare segments sync their data every this many bytes (0 = at the end).
    pub background_sync_bytes: u64,
    /// Where the writer records its append and sync times (observations only).
    pub metrics: Option<Arc<crate::metrics::WalMetrics>>,
}

impl WalOptions {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        WalOptions {
            policy: cfg.fsync,
            interval: Duration::from_millis(cfg.fsync_interval_ms),
            snapshot_every_changes: cfg.snapshot_every_changes,
            snapshot_every_bytes: cfg.snapshot_every_bytes,
            queue: cfg.wal_queue_records,
            segment_bytes: cfg.wal_segment_bytes,
            background_sync_bytes: cfg.background_sync_bytes,
            metrics: None,
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

    /// Queues a message if the queue has room, without waiting. False if it is full or the
    /// writer has stopped (the message is dropped).
    pub fn try_send(&self, m: WalMsg) -> bool {
        self.tx.try_send(m).is_ok()
    }

    /// Queues a message if the queue has room, without waiting; gives it back if the queue is
    /// full (`Some`), drops it if the writer has stopped (`None`).
    pub fn try_send_back(&self, m: WalMsg) -> Result<(), Option<WalMsg>> {
        match self.tx.try_send(m) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(m)) => Err(Some(m)),
            Err(TrySendError::Disconnected(_)) => Err(None),
        }
    }

    /// Writes and syncs everything queued so far (bounded wait).
    pub fn flush(&self, wait: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(WalMsg::Flush(tx)) && rx.recv_timeout(wait).is_ok()
    }
}

#[cfg(test)]
impl Wal {
    /// Whether the writer's current segment is written with `O_DIRECT`.
    pub(crate) fn direct_for_tests(&self, wait: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(WalMsg::Direct(tx)) && rx.recv_timeout(wait).unwrap_or(false)
    }

    /// A sender whose messages the caller reads itself (no writer thread).
    pub(crate) fn stub(queue: usize) -> (Wal, Receiver<WalMsg>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(queue);
        let wal = Wal {
            tx,
            snapshot_wanted: Arc::new(AtomicBool::new(false)),
        };
        (wal, rx)
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
    let spare = Arc::new(AtomicU8::new(leftover_spare(&dir, opts.segment_bytes)));
    let (tx, rx) = std::sync::mpsc::sync_channel(opts.queue);
    let wanted = Arc::new(AtomicBool::new(false));
    let (file, offset, cap, direct) = open_segment(&dir, index, &spare, &opts)?;
    let mut w = Writer {
        dir,
        index,
        file,
        direct,
        aligned: Aligned::new(),
        offset,
        cap,
        spare,
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
    w.prepare_spare();
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

/// A spare left by an earlier process in this directory: usable if complete (it is renamed to
/// its name only once written and synced) and of the configured size; anything else is removed.
fn leftover_spare(dir: &Path, segment_bytes: u64) -> u8 {
    let _ = std::fs::remove_file(dir.join(SPARE_TMP));
    let spare = dir.join(SPARE_FILE);
    match std::fs::metadata(&spare) {
        Ok(m) if segment_bytes > 0 && m.len() == segment_bytes => SPARE_READY,
        Ok(_) => {
            let _ = std::fs::remove_file(&spare);
            SPARE_NONE
        }
        Err(_) => SPARE_NONE,
    }
}

/// Opens segment `index` (a new name): the spare renamed into place if one is ready, else a new
/// empty file. Returns the file, the offset to write at, its preallocated size (0: none), and
/// whether it was opened with `O_DIRECT` (with `fsync = "always"`, only a preallocated segment,
/// and only where the filesystem accepts it).
fn open_segment(
    dir: &Path,
    index: u64,
    spare: &AtomicU8,
    opts: &WalOptions,
) -> Result<(File, u64, u64, bool), DurableError> {
    let segment_bytes = opts.segment_bytes;
    let path = dir.join(segment_name(index));
    let mut cap = 0;
    if spare
        .compare_exchange(SPARE_READY, SPARE_NONE, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        match std::fs::rename(dir.join(SPARE_FILE), &path) {
            Ok(()) => cap = segment_bytes,
            Err(e) => warn!(
                "cannot use the preallocated log segment `{}`: {e}; appending to a new file instead",
                dir.join(SPARE_FILE).display()
            ),
        }
    }
    let opened_direct = (opts.policy == FsyncPolicy::Always && cap > 0)
        .then(|| {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .inspect_err(|e| {
                    debug!(path = %path.display(), "log segment without O_DIRECT: {e}");
                })
                .ok()
        })
        .flatten();
    let direct = opened_direct.is_some();
    let f = match opened_direct {
        Some(f) => f,
        None => OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| DurableError::io("cannot open log segment", &path, e))?,
    };
    // A new file is empty; a spare holds only zeros, written from its start.
    let offset = if cap > 0 {
        0
    } else {
        f.metadata()
            .map_err(|e| DurableError::io("cannot open log segment", &path, e))?
            .len()
    };
    // The new name (created or renamed) must survive a power cut before records go in.
    super::sync_dir(dir)?;
    Ok((f, offset, cap, direct))
}

/// A page-aligned buffer for `O_DIRECT` appends. Its first block holds the segment's last,
/// partial block as written (the bytes before `offset % DIRECT_BLOCK`).
struct Aligned {
    blocks: Vec<AlignedBlock>,
}

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct AlignedBlock([u8; DIRECT_BLOCK]);

impl Aligned {
    fn new() -> Aligned {
        Aligned {
            blocks: vec![AlignedBlock([0; DIRECT_BLOCK])],
        }
    }

    /// The first `n` blocks as bytes (grown with zeros as needed).
    fn bytes(&mut self, n: usize) -> &mut [u8] {
        if self.blocks.len() < n {
            self.blocks.resize(n, AlignedBlock([0; DIRECT_BLOCK]));
        }
        // SAFETY: `AlignedBlock` is `repr(C)` over `[u8; DIRECT_BLOCK]` (no padding: its size
        // equals its alignment), so `n <= len` blocks are `n * DIRECT_BLOCK` initialised bytes,
        // borrowed mutably through `self` for the slice's lifetime.
        unsafe {
            std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), n * DIRECT_BLOCK)
        }
    }

    /// Gives memory back after a large group, keeping the first block (the tail).
    fn shrink(&mut self) {
        if self.blocks.len() > 2 * GROUP_MAX_BYTES / DIRECT_BLOCK {
            self.blocks.truncate(16);
            self.blocks.shrink_to_fit();
        }
    }
}

/// Writes `bytes` of zeros to a new spare segment, syncs it and gives it its name; its data is
/// synced every `sync_every` bytes on the way (`SyncEvery`; 0 = at the end only).
pub(crate) fn make_spare(dir: &Path, bytes: u64, sync_every: u64) -> Result<(), DurableError> {
    let tmp = dir.join(SPARE_TMP);
    let io = |e| DurableError::io("cannot preallocate a log segment", &tmp, e);
    let mut f = super::SyncEvery::new(File::create(&tmp).map_err(io)?, sync_every);
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(ZERO_CHUNK as u64) as usize;
        f.write_all(&zeros[..n]).map_err(io)?;
        left -= n as u64;
    }
    let f = f.into_file();
    f.sync_all().map_err(io)?;
    drop(f);
    let spare = dir.join(SPARE_FILE);
    std::fs::rename(&tmp, &spare)
        .map_err(|e| DurableError::io("cannot name the preallocated log segment", &spare, e))
}

struct Writer {
    dir: PathBuf,
    index: u64,
    file: File,
    /// `file` is open with `O_DIRECT`: groups are written as whole blocks from `aligned`.
    direct: bool,
    aligned: Aligned,
    /// Where the next group goes in `file`.
    offset: u64,
    /// `file`'s preallocated size (0: not preallocated).
    cap: u64,
    /// State of the spare segment (SPARE_*), shared with the thread preparing it.
    spare: Arc<AtomicU8>,
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
                encode_record(&r, &mut self.buf);
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
                self.next_segment()?;
                self.changes_since = 0;
                self.bytes_since = 0;
                self.start_snapshot(space, pos, dedupe);
            }
            WalMsg::Flush(tx) => flushes.push(tx),
            #[cfg(test)]
            WalMsg::Direct(tx) => {
                let _ = tx.send(self.direct);
            }
        }
        Ok(())
    }

    /// Moves to a new segment (the spare if ready). What was written to the old one is synced
    /// first (with "always" it already is; with "never" it is left to the OS), but not published
    /// here: records may be buffered for the new one.
    fn next_segment(&mut self) -> Result<(), DurableError> {
        if self.opts.policy != FsyncPolicy::Never {
            self.sync_file()?;
        }
        let (file, offset, cap, direct) =
            open_segment(&self.dir, self.index + 1, &self.spare, &self.opts)?;
        self.index += 1;
        self.file = file;
        self.direct = direct;
        self.offset = offset;
        self.cap = cap;
        self.prepare_spare();
        Ok(())
    }

    /// Starts writing a spare segment in the background unless one is ready or on its way.
    fn prepare_spare(&self) {
        let bytes = self.opts.segment_bytes;
        let sync_every = self.opts.background_sync_bytes;
        if bytes == 0
            || self
                .spare
                .compare_exchange(
                    SPARE_NONE,
                    SPARE_PREPARING,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return;
        }
        let state = self.spare.clone();
        let dir = self.dir.clone();
        let spawned = std::thread::Builder::new()
            .name("wal-spare".into())
            .spawn(move || {
                // Background work, as snapshots.
                // SAFETY: setpriority has no memory effects; 0 = the calling thread.
                let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, SNAPSHOT_NICE) };
                let start = Instant::now();
                match make_spare(&dir, bytes, sync_every) {
                    Ok(()) => {
                        debug!(dir = %dir.display(), bytes, ms = start.elapsed().as_millis() as u64, "log segment preallocated");
                        state.store(SPARE_READY, Ordering::Release);
                    }
                    Err(e) => {
                        warn!("{e}; the log appends to new segments instead (tried again at the next one)");
                        state.store(SPARE_NONE, Ordering::Release);
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start a thread to preallocate a log segment: {e}");
            self.spare.store(SPARE_NONE, Ordering::Release);
        }
    }

    /// Whether the buffered group goes to a new segment first: the current one cannot hold it
    /// (and holds something), or it is not preallocated and a spare is ready.
    fn wants_new_segment(&self) -> bool {
        let size = self.opts.segment_bytes;
        if size == 0 {
            return false;
        }
        (self.offset > 0 && self.offset + self.buf.len() as u64 > size.max(self.cap))
            || (self.cap == 0 && self.spare.load(Ordering::Acquire) == SPARE_READY)
    }

    /// Writes what is buffered, syncs per policy (or when `force`), publishes what is durable.
    fn write_group(&mut self, force: bool) -> Result<(), DurableError> {
        if !self.buf.is_empty() {
            if self.wants_new_segment() {
                self.next_segment()?;
            }
            let t = Instant::now();
            let written = if self.direct {
                self.write_direct()
            } else {
                self.file.write_all_at(&self.buf, self.offset)
            };
            written.map_err(|e| {
                let path = self.dir.join(segment_name(self.index));
                DurableError::io("cannot append to log", &path, e)
            })?;
            if let Some(m) = &self.opts.metrics {
                m.write.observe(t.elapsed());
                m.appended_bytes
                    .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
            }
            self.offset += self.buf.len() as u64;
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

    /// Writes `buf` at `offset` as whole aligned blocks: the partial block before `offset` (kept
    /// in `aligned`'s first block) followed by `buf` and zeros to the block's end (the segment
    /// holds zeros there already), then keeps the new partial block.
    fn write_direct(&mut self) -> std::io::Result<()> {
        let head = (self.offset % DIRECT_BLOCK as u64) as usize;
        let total = head + self.buf.len();
        let blocks = total.div_ceil(DIRECT_BLOCK);
        let out = self.aligned.bytes(blocks);
        out[head..total].copy_from_slice(&self.buf);
        out[total..].fill(0);
        self.file.write_all_at(out, self.offset - head as u64)?;
        let full = total - total % DIRECT_BLOCK;
        out.copy_within(full..total, 0);
        self.aligned.shrink();
        Ok(())
    }

    /// Syncs the current segment if anything was written to it since the last sync.
    fn sync_file(&mut self) -> Result<(), DurableError> {
        if self.dirty {
            let t = Instant::now();
            self.file.sync_data().map_err(|e| {
                DurableError::io(
                    "cannot sync log",
                    &self.dir.join(segment_name(self.index)),
                    e,
                )
            })?;
            if let Some(m) = &self.opts.metrics {
                m.fsync.observe(t.elapsed());
            }
            self.dirty = false;
        }
        Ok(())
    }

    /// Syncs and publishes everything written as durable.
    fn sync(&mut self) -> Result<(), DurableError> {
        self.sync_file()?;
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
        let metrics = self.opts.metrics.clone();
        let sync_every = self.opts.background_sync_bytes;
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
                match write_snapshot(&dir, &space, pos, next, dedupe, sync_every) {
                    Ok(n) => {
                        if let Some(m) = &metrics {
                            m.snapshots.fetch_add(1, Ordering::Relaxed);
                            m.last_snapshot_unix_ms
                                .store(crate::metrics::unix_ms(), Ordering::Relaxed);
                        }
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
