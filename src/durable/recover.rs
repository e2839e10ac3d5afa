//! Recovery: find the replica directories under a data root, read how far each got (epoch, then
//! sequence number), load the most advanced complete one (snapshot + log replay), cut a torn or
//! corrupt log at the last good record, and remove copies that a newer durable one supersedes.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::{
    DurableError, FrameEnd, FrameReader, LOCK_FILE, Position, REPLICA_PREFIX, Record,
    SNAPSHOT_FILE, SNAPSHOT_FORMAT, SNAPSHOT_VERSION, SnapRecord, segment_index, segment_name,
};
use crate::space::Space;
use crate::wire::node::Reply;

/// Where a log had to be cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    pub file: PathBuf,
    pub offset: u64,
    /// Bytes after the cut in that file, up to its last byte that is not zero.
    pub discarded: u64,
    /// Later segments, unusable after the cut.
    pub later: Vec<PathBuf>,
    pub why: String,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "log `{}` {} at offset {}: {} bytes after it{} discarded",
            self.file.display(),
            self.why,
            self.offset,
            self.discarded,
            if self.later.is_empty() {
                String::new()
            } else {
                format!(" and {} later segment(s)", self.later.len())
            }
        )
    }
}

/// What one replica directory holds.
#[derive(Debug)]
pub struct Copy {
    pub dir: PathBuf,
    pub pos: Position,
    /// A complete copy (snapshot, or a base copy logged to its end).
    pub base: bool,
    pub from_snapshot: bool,
    pub last_segment: Option<u64>,
    pub cut: Option<Cut>,
    /// Held by a running process.
    pub in_use: bool,
    /// Records replayed after the snapshot.
    pub replayed: u64,
    pub space: Space,
    pub dedupe: BTreeMap<u64, Reply>,
}

/// A loaded copy, its directory locked by this process.
#[derive(Debug)]
pub struct Recovered {
    pub copy: Copy,
    pub lock: File,
}

/// An exclusive lock on a replica directory, held until dropped (or the process dies).
pub fn try_lock(dir: &Path) -> Result<Option<File>, DurableError> {
    let path = dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DurableError::io("cannot open lock file", &path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(DurableError::io("cannot lock data directory", &path, e))
        }
    }
}

/// Creates a new, locked replica directory under `root`.
pub fn create_dir(root: &Path) -> Result<(PathBuf, File), DurableError> {
    std::fs::create_dir_all(root)
        .map_err(|e| DurableError::io("cannot create data directory", root, e))?;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut n = 0u32;
    let dir = loop {
        let dir = root.join(format!(
            "{REPLICA_PREFIX}{millis}-{}{}",
            std::process::id(),
            if n == 0 {
                String::new()
            } else {
                format!("-{n}")
            }
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(DurableError::io("cannot create replica directory", &dir, e)),
        }
    };
    let lock = try_lock(&dir)?.ok_or_else(|| {
        DurableError::io(
            "cannot lock new replica directory",
            &dir,
            std::io::Error::other("locked by another process"),
        )
    })?;
    super::sync_dir(root)?;
    Ok((dir, lock))
}

/// The replica directories under `root` (none if it does not exist).
pub fn replica_dirs(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(root) {
        Ok(rd) => rd
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(REPLICA_PREFIX))
                    && e.path().is_dir()
            })
            .map(|e| e.path())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Reads replica directory `dir`. `build`: load the space (else only positions are computed).
pub fn read_copy(
    dir: &Path,
    max_frame: usize,
    max_dedupe: usize,
    build: bool,
) -> Result<Copy, DurableError> {
    let mut c = Copy {
        dir: dir.to_owned(),
        pos: Position::default(),
        base: false,
        from_snapshot: false,
        last_segment: None,
        cut: None,
        in_use: false,
        replayed: 0,
        space: Space::new(),
        dedupe: BTreeMap::new(),
    };
    let mut first_segment = 0;
    let snap = dir.join(SNAPSHOT_FILE);
    if snap.exists() {
        first_segment = read_snapshot(&snap, &mut c, max_frame, build)?;
        c.from_snapshot = true;
        c.base = true;
    }
    let mut segments: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| DurableError::io("cannot list replica directory", dir, e))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(segment_index))
        .collect();
    segments.sort_unstable();
    c.last_segment = segments.last().copied();
    let live: Vec<u64> = segments
        .into_iter()
        .filter(|i| *i >= first_segment)
        .collect();
    for (k, &i) in live.iter().enumerate() {
        let path = dir.join(segment_name(i));
        let f = File::open(&path).map_err(|e| DurableError::io("cannot open log", &path, e))?;
        let mut r = FrameReader::new(std::io::BufReader::with_capacity(1 << 20, f), max_frame);
        let end = loop {
            // A record that reads well but cannot be applied is cut off with what follows: the
            // cut goes before it, or it would stay in the log and cut off every later segment
            // (the writes made since) at the next recovery.
            let start = r.offset();
            match r.read::<Record>() {
                Ok(rec) => {
                    if let Err(why) = apply(&mut c, rec, max_dedupe, build) {
                        break FrameEnd::Corrupt { offset: start, why };
                    }
                }
                Err(end) => break end,
            }
        };
        let (offset, why) = match end {
            FrameEnd::Eof => continue,
            FrameEnd::Torn { offset } => (offset, "ends in a torn record".to_string()),
            FrameEnd::Corrupt { offset, why } => (offset, format!("is corrupt ({why})")),
        };
        // Up to the last byte that is not zero: a preallocated segment's zeros are not data.
        let end = super::data_end(&path).unwrap_or(offset);
        c.cut = Some(Cut {
            discarded: end.saturating_sub(offset),
            file: path,
            offset,
            later: live[k + 1..]
                .iter()
                .map(|j| dir.join(segment_name(*j)))
                .collect(),
            why,
        });
        break;
    }
    Ok(c)
}

fn read_snapshot(
    path: &Path,
    c: &mut Copy,
    max_frame: usize,
    build: bool,
) -> Result<u64, DurableError> {
    let bad = |why: String| DurableError::Snapshot {
        path: path.to_owned(),
        why,
    };
    let f = File::open(path).map_err(|e| DurableError::io("cannot open snapshot", path, e))?;
    let mut r = FrameReader::new(std::io::BufReader::with_capacity(1 << 20, f), max_frame);
    let next_segment = match r.read::<SnapRecord>() {
        Ok(SnapRecord::Header {
            format,
            version,
            epoch,
            seq,
            next_segment,
            dedupe,
        }) => {
            if format != SNAPSHOT_FORMAT || !(1..=SNAPSHOT_VERSION).contains(&version) {
                return Err(bad(format!(
                    "format `{format}` version {version}, expected `{SNAPSHOT_FORMAT}` version 1 to {SNAPSHOT_VERSION}"
                )));
            }
            c.pos = Position { epoch, seq };
            c.dedupe = dedupe.into_iter().collect();
            next_segment
        }
        Ok(_) => return Err(bad("it does not start with a header".into())),
        Err(e) => return Err(bad(format!("{e:?}"))),
    };
    if !build {
        return Ok(next_segment);
    }
    let mut n = 0u64;
    loop {
        match r.read::<SnapRecord>() {
            Ok(SnapRecord::Dedupe(entries)) => {
                c.dedupe.extend(entries);
            }
            Ok(SnapRecord::Pairs(ps)) => {
                n += ps.len() as u64;
                for (k, v) in ps {
                    c.space.insert_raw(k, v);
                }
            }
            Ok(SnapRecord::End { pairs }) if pairs == n => return Ok(next_segment),
            Ok(SnapRecord::End { pairs }) => {
                return Err(bad(format!("it announces {pairs} pairs but holds {n}")));
            }
            Ok(SnapRecord::Header { .. }) => return Err(bad("a second header".into())),
            Err(e) => {
                return Err(bad(format!(
                    "{e:?} after {n} pairs (no end marker: the file is incomplete)"
                )));
            }
        }
    }
}

/// Applies one log record; an error means the log cannot be trusted from here on.
fn apply(c: &mut Copy, rec: Record, max_dedupe: usize, build: bool) -> Result<(), String> {
    match rec {
        Record::Reset => {
            c.base = false;
            c.space = Space::new();
            c.dedupe.clear();
        }
        Record::Pairs(ps) => {
            if build {
                for (k, v) in ps {
                    c.space.insert_raw(k, v);
                }
            }
        }
        Record::Dedupe(entries) => {
            if build {
                c.dedupe.extend(entries);
            }
        }
        Record::Base { epoch, seq, dedupe } => {
            c.base = true;
            c.pos = Position { epoch, seq };
            // The table came in `Dedupe` records after the `Reset` (older logs: all of it here).
            if build {
                c.dedupe.extend(dedupe);
            }
            c.replayed += 1;
        }
        Record::Change {
            epoch,
            seq,
            rid,
            change,
            reply,
        } => {
            if !c.base {
                return Err("an update before any base copy".into());
            }
            if seq <= c.pos.seq {
                // Already in the snapshot.
                return Ok(());
            }
            if seq != c.pos.seq + 1 {
                return Err(format!(
                    "updates {}..{} are missing",
                    c.pos.seq + 1,
                    seq - 1
                ));
            }
            if build {
                c.space.apply(&change);
                c.dedupe.insert(rid, reply);
                while c.dedupe.len() > max_dedupe {
                    c.dedupe.pop_first();
                }
            }
            c.pos.seq = seq;
            c.pos.epoch = c.pos.epoch.max(epoch);
            c.replayed += 1;
        }
        Record::Epoch(e) => c.pos.epoch = c.pos.epoch.max(e),
    }
    Ok(())
}

/// Cuts the chosen copy's log at the last good record: the bad tail is kept beside it as
/// `<segment>.corrupt-<offset>` (for inspection) and later segments are set aside the same way.
fn cut_log(cut: &Cut) -> Result<(), DurableError> {
    let aside = cut.file.with_file_name(format!(
        "{}.corrupt-{}",
        cut.file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("wal"),
        cut.offset
    ));
    if cut.discarded > 0 {
        let data = std::fs::read(&cut.file)
            .map_err(|e| DurableError::io("cannot read log", &cut.file, e))?;
        let end = cut.offset.saturating_add(cut.discarded) as usize;
        let tail = data
            .get(cut.offset as usize..end.min(data.len()))
            .unwrap_or(&[]);
        std::fs::write(&aside, tail)
            .map_err(|e| DurableError::io("cannot keep the discarded log tail", &aside, e))?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cut.file)
        .map_err(|e| DurableError::io("cannot open log to cut it", &cut.file, e))?;
    f.set_len(cut.offset)
        .and_then(|_| f.sync_all())
        .map_err(|e| DurableError::io("cannot cut log", &cut.file, e))?;
    for later in &cut.later {
        let to = later.with_extension("after-corrupt");
        std::fs::rename(later, &to)
            .map_err(|e| DurableError::io("cannot set aside log segment", later, e))?;
    }
    if let Some(dir) = cut.file.parent() {
        super::sync_dir(dir)?;
    }
    Ok(())
}

/// Syncs every log segment and the snapshot of a replica directory, then the directory.
fn sync_copy(dir: &Path) -> Result<(), DurableError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DurableError::io("cannot list", dir, e))?;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        if segment_index(n).is_some() || n == SNAPSHOT_FILE {
            File::open(e.path())
                .and_then(|f| f.sync_all())
                .map_err(|err| DurableError::io("cannot sync", &e.path(), err))?;
        }
    }
    super::sync_dir(dir)
}

/// Finds and loads the most advanced complete copy under `root` (locked for this process).
/// None if there is none. A newer copy held by a running process is an error: starting from an
/// older one would lose what it holds.
pub fn recover(
    root: &Path,
    max_frame: usize,
    max_dedupe: usize,
) -> Result<Option<Recovered>, DurableError> {
    let mut best: Option<(Copy, Option<File>)> = None;
    for dir in replica_dirs(root) {
        let lock = try_lock(&dir)?;
        let mut c = match read_copy(&dir, max_frame, max_dedupe, false) {
            Ok(c) => c,
            Err(e) => {
                warn!("{e}; this copy is skipped");
                continue;
            }
        };
        c.in_use = lock.is_none();
        if let Some(cut) = &c.cut {
            warn!("{cut} (copy `{}`, {})", dir.display(), c.pos);
        }
        if !c.base {
            info!(dir = %dir.display(), "incomplete copy (no complete base copy on disk): skipped");
            continue;
        }
        let better = match &best {
            None => true,
            Some((b, _)) => c.pos > b.pos || (c.pos == b.pos && b.in_use && !c.in_use),
        };
        if better {
            best = Some((c, lock));
        }
    }
    let Some((c, lock)) = best else {
        return Ok(None);
    };
    let Some(lock) = lock else {
        return Err(DurableError::InUse {
            dir: c.dir,
            pos: c.pos,
        });
    };
    let copy = read_copy(&c.dir, max_frame, max_dedupe, true)?;
    if let Some(cut) = &copy.cut {
        warn!("recovering from `{}`: {cut}", copy.dir.display());
        cut_log(cut)?;
    }
    // After a crash of the process (not of the host) the log may hold records that were written
    // but never synced: they are part of the copy now, so make them durable before anything is
    // served from them (a later power cut must not take back what a read has shown).
    sync_copy(&copy.dir)?;
    Ok(Some(Recovered { copy, lock }))
}

/// Removes the copies under `root` other than `keep` that a durable copy at `pos` supersedes
/// (older or equal position, or incomplete) and that no running process holds. Returns them.
pub fn remove_superseded(
    root: &Path,
    keep: &Path,
    pos: Position,
    max_frame: usize,
) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for dir in replica_dirs(root) {
        if dir == keep {
            continue;
        }
        let Ok(Some(lock)) = try_lock(&dir) else {
            continue;
        };
        let stale = match read_copy(&dir, max_frame, usize::MAX, false) {
            Ok(c) => !c.base || c.pos <= pos,
            Err(_) => false,
        };
        if stale {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => removed.push(dir),
                Err(e) => warn!("cannot remove superseded copy `{}`: {e}", dir.display()),
            }
        }
        drop(lock);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::wal::{self, Durable, WalHooks, WalMsg, WalOptions};
    use crate::durable::{FsyncPolicy, Record, encode_frame};
    use crate::space::{Change, Pair};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    const MAX: usize = 1 << 20;

    fn opts() -> WalOptions {
        WalOptions {
            policy: FsyncPolicy::Always,
            interval: Duration::from_millis(100),
            snapshot_every_changes: 0,
            snapshot_every_bytes: 0,
            queue: 16,
            segment_bytes: 0,
            // Small, so that snapshots and spare segments in these tests sync on the way.
            background_sync_bytes: 64 << 10,
            metrics: None,
        }
    }

    /// Segments of `bytes`, preallocated.
    fn prealloc(bytes: u64) -> WalOptions {
        WalOptions {
            segment_bytes: bytes,
            ..opts()
        }
    }

    fn change(epoch: u64, seq: u64) -> Record {
        Record::Change {
            epoch,
            seq,
            rid: seq,
            change: Change::Insert(vec![Pair::new(format!("k,{seq}"), format!("v{seq}"))]),
            reply: Reply::Rejected(vec![]),
        }
    }

    /// A replica directory under `root` holding a base of 2 pairs at `epoch` and updates 1..=n.
    fn write_copy(root: &Path, epoch: u64, n: u64) -> (PathBuf, Durable) {
        write_copy_with(root, epoch, n, opts())
    }

    /// The same with options `o`; with preallocation, the first segment is a spare found in the
    /// directory (as one left by an earlier process), so the log starts in preallocated space.
    fn write_copy_with(root: &Path, epoch: u64, n: u64, o: WalOptions) -> (PathBuf, Durable) {
        let (dir, lock) = create_dir(root).unwrap();
        if o.segment_bytes > 0 {
            wal::make_spare(&dir, o.segment_bytes, o.background_sync_bytes).unwrap();
        }
        let seen = Arc::new(Mutex::new(Durable::default()));
        let s2 = seen.clone();
        let (w, h) = wal::spawn(
            dir.clone(),
            None,
            Durable::default(),
            o,
            WalHooks {
                on_durable: Box::new(move |d| *s2.lock().unwrap() = d),
                on_error: Box::new(|e| panic!("{e}")),
            },
        )
        .unwrap();
        w.send(WalMsg::Record(Record::Reset));
        w.send(WalMsg::Record(Record::Pairs(vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
        ])));
        w.send(WalMsg::Record(Record::Base {
            epoch,
            seq: 0,
            dedupe: vec![],
        }));
        for s in 1..=n {
            w.send(WalMsg::Record(change(epoch, s)));
        }
        assert!(w.flush(Duration::from_secs(10)));
        drop(w);
        h.join().unwrap();
        drop(lock);
        let d = *seen.lock().unwrap();
        (dir, d)
    }

    /// A dedupe table of `n` replies of about 1 KB each (far more than one 1 MiB frame).
    fn big_table(n: u64) -> Vec<(u64, Reply)> {
        (0..n)
            .map(|rid| {
                let junk = ciborium::Value::Text("x".repeat(1000) + &rid.to_string());
                (
                    rid,
                    Reply::Rejected(vec![crate::wire::cbor::RawItem::from_value(&junk)]),
                )
            })
            .collect()
    }

    #[test]
    fn a_dedupe_table_larger_than_a_frame_is_logged_in_chunks_and_recovered() {
        use crate::durable::dedupe::{DEDUPE_CHUNK_BYTES, chunks};
        let t = tempfile::tempdir().unwrap();
        let table = big_table(3000);
        assert!(crate::wire::frame::encode(&table).len() > 2 * MAX);
        let (dir, lock) = create_dir(t.path()).unwrap();
        let (w, h) = wal::spawn(
            dir.clone(),
            None,
            Durable::default(),
            opts(),
            WalHooks {
                on_durable: Box::new(|_| {}),
                on_error: Box::new(|e| panic!("{e}")),
            },
        )
        .unwrap();
        // As the store logs an initial copy: pairs, the table in chunks, then the base.
        w.send(WalMsg::Record(Record::Reset));
        w.send(WalMsg::Record(Record::Pairs(vec![(
            "a".into(),
            "1".into(),
        )])));
        let parts = chunks(table.clone(), DEDUPE_CHUNK_BYTES);
        assert!(parts.len() >= 3, "{} chunks", parts.len());
        for c in parts {
            w.send(WalMsg::Record(Record::Dedupe(c)));
        }
        w.send(WalMsg::Record(Record::Base {
            epoch: 1,
            seq: 0,
            dedupe: vec![],
        }));
        w.send(WalMsg::Record(change(1, 1)));
        assert!(w.flush(Duration::from_secs(10)));
        drop(w);
        h.join().unwrap();
        drop(lock);
        // Every record fits a reader limited to 2 MiB, which the whole table would not.
        let r = recover(t.path(), 2 * MAX, 1_000_000).unwrap().unwrap();
        assert!(r.copy.cut.is_none(), "{:?}", r.copy.cut);
        assert_eq!(r.copy.pos, Position { epoch: 1, seq: 1 });
        let mut want: BTreeMap<u64, Reply> = table.into_iter().collect();
        want.insert(1, Reply::Rejected(vec![]));
        assert_eq!(r.copy.dedupe, want);
    }

    #[test]
    fn a_snapshot_holds_a_large_dedupe_table_in_chunks_and_old_base_records_still_read() {
        let t = tempfile::tempdir().unwrap();
        let (dir, lock) = create_dir(t.path()).unwrap();
        let table = big_table(3000);
        let space: Space = [("a".to_owned(), "1".to_owned())].into_iter().collect();
        crate::durable::write_snapshot(
            &dir,
            &space,
            Position { epoch: 2, seq: 7 },
            0,
            table.clone(),
            64 << 10,
        )
        .unwrap();
        drop(lock);
        let r = recover(t.path(), 2 * MAX, 1_000_000).unwrap().unwrap();
        assert_eq!(r.copy.pos, Position { epoch: 2, seq: 7 });
        assert_eq!(r.copy.space, space);
        assert_eq!(r.copy.dedupe, table.iter().cloned().collect());
        drop(r);

        // A log written before the table was chunked: the whole table in `Base`.
        let t = tempfile::tempdir().unwrap();
        let (dir, lock) = create_dir(t.path()).unwrap();
        let small = big_table(10);
        let mut bytes = Vec::new();
        for rec in [
            Record::Reset,
            Record::Base {
                epoch: 1,
                seq: 0,
                dedupe: small.clone(),
            },
        ] {
            crate::durable::encode_frame(&rec, &mut bytes);
        }
        std::fs::write(segment(&dir), bytes).unwrap();
        drop(lock);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert_eq!(r.copy.dedupe, small.into_iter().collect());
    }

    #[test]
    fn a_log_is_replayed_and_the_durable_position_published() {
        let t = tempfile::tempdir().unwrap();
        let (dir, d) = write_copy(t.path(), 1, 50);
        assert_eq!(d.pos, Position { epoch: 1, seq: 50 });
        assert!(d.base);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert_eq!(r.copy.dir, dir);
        assert_eq!(r.copy.pos, Position { epoch: 1, seq: 50 });
        assert_eq!(r.copy.space.len(), 52);
        assert_eq!(r.copy.dedupe.len(), 50);
        assert!(r.copy.cut.is_none());
    }

    fn segment(dir: &Path) -> PathBuf {
        dir.join(segment_name(0))
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_good_record() {
        let t = tempfile::tempdir().unwrap();
        let (dir, _) = write_copy(t.path(), 1, 10);
        let seg = segment(&dir);
        let len = std::fs::metadata(&seg).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 3).unwrap();
        drop(f);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert_eq!(r.copy.pos.seq, 9, "the torn 10th update is dropped");
        assert_eq!(r.copy.space.len(), 2 + 9);
        let cut = r.copy.cut.clone().unwrap();
        assert!(cut.why.contains("torn"), "{cut}");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), cut.offset);
        // Recovering again finds a clean log.
        drop(r);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert!(r.copy.cut.is_none());
        assert_eq!(r.copy.pos.seq, 9);
    }

    #[test]
    fn a_flipped_byte_mid_log_is_detected_and_the_log_cut_there() {
        let t = tempfile::tempdir().unwrap();
        let (dir, _) = write_copy(t.path(), 1, 10);
        let seg = segment(&dir);
        let mut data = std::fs::read(&seg).unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0x10;
        std::fs::write(&seg, &data).unwrap();
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        let cut = r.copy.cut.clone().unwrap();
        assert!(cut.why.contains("corrupt"), "{cut}");
        assert!(
            cut.offset as usize <= mid && r.copy.pos.seq < 10,
            "{cut} {:?}",
            r.copy.pos
        );
        assert_eq!(r.copy.space.len() as u64, 2 + r.copy.pos.seq);
        // The discarded tail is kept beside the log for inspection.
        let aside = seg.with_file_name(format!("{}.corrupt-{}", segment_name(0), cut.offset));
        assert_eq!(
            std::fs::metadata(&aside).unwrap().len(),
            data.len() as u64 - cut.offset
        );
    }

    /// Found by the `log_loader` fuzz target: a record that passes its checksum but cannot be
    /// applied (here an update after a gap) was cut *after* itself, so it stayed in the log; the
    /// next recovery met it again and set aside every later segment, with the writes acknowledged
    /// since. fuzz/corpus/log_loader/regression-cut-before-unappliable-record is the input.
    #[test]
    fn an_unappliable_record_is_cut_off_and_later_writes_survive_the_next_recovery() {
        let t = tempfile::tempdir().unwrap();
        let (dir, _) = write_copy(t.path(), 1, 3);
        let seg = segment(&dir);
        let good = std::fs::metadata(&seg).unwrap().len();
        let mut gap = Vec::new();
        encode_frame(&change(1, 9), &mut gap);
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        std::io::Write::write_all(&mut f, &gap).unwrap();
        drop(f);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        let cut = r.copy.cut.clone().unwrap();
        assert!(cut.why.contains("updates 4..8 are missing"), "{cut}");
        assert_eq!(cut.offset, good, "the cut goes before the bad record");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), good);
        assert_eq!(r.copy.pos, Position { epoch: 1, seq: 3 });
        // The replica goes on: update 4 in a new segment, as a restarted primary writes it.
        let last = r.copy.last_segment;
        let lock = r.lock;
        let (w, h) = wal::spawn(
            dir.clone(),
            last,
            Durable::default(),
            opts(),
            WalHooks {
                on_durable: Box::new(|_| {}),
                on_error: Box::new(|e| panic!("{e}")),
            },
        )
        .unwrap();
        w.send(WalMsg::Record(change(1, 4)));
        assert!(w.flush(Duration::from_secs(10)));
        drop(w);
        h.join().unwrap();
        drop(lock);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert!(r.copy.cut.is_none(), "{:?}", r.copy.cut);
        assert_eq!(
            r.copy.pos,
            Position { epoch: 1, seq: 4 },
            "update 4 was lost"
        );
        assert_eq!(r.copy.space.len(), 2 + 4);
    }

    #[test]
    fn the_most_advanced_copy_wins_epoch_before_sequence_and_a_held_one_is_not_bypassed() {
        let t = tempfile::tempdir().unwrap();
        let (_old, _) = write_copy(t.path(), 1, 30);
        let (new, _) = write_copy(t.path(), 2, 5);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert_eq!(r.copy.dir, new);
        assert_eq!(r.copy.pos, Position { epoch: 2, seq: 5 });
        // While this process holds the newest copy, nobody else may start from an older one.
        let e = recover(t.path(), MAX, 1000).unwrap_err();
        assert!(matches!(e, DurableError::InUse { .. }), "{e}");
        // Superseded copies go, the kept one stays.
        let gone = remove_superseded(t.path(), &new, r.copy.pos, MAX);
        assert_eq!(gone.len(), 1);
        assert_eq!(replica_dirs(t.path()), vec![new]);
    }

    #[test]
    fn a_snapshot_compacts_the_log_and_recovery_replays_only_what_follows() {
        let t = tempfile::tempdir().unwrap();
        let (dir, lock) = create_dir(t.path()).unwrap();
        let (w, h) = wal::spawn(
            dir.clone(),
            None,
            Durable::default(),
            opts(),
            WalHooks {
                on_durable: Box::new(|_| {}),
                on_error: Box::new(|e| panic!("{e}")),
            },
        )
        .unwrap();
        let mut space = crate::space::Space::new();
        w.send(WalMsg::Record(Record::Reset));
        w.send(WalMsg::Record(Record::Base {
            epoch: 1,
            seq: 0,
            dedupe: vec![],
        }));
        for s in 1..=20 {
            let r = change(1, s);
            if let Record::Change { change, .. } = &r {
                space.apply(change);
            }
            w.send(WalMsg::Record(r));
            if s == 12 {
                w.send(WalMsg::Snapshot {
                    space: space.clone(),
                    pos: Position { epoch: 1, seq: 12 },
                    dedupe: vec![],
                });
            }
        }
        assert!(w.flush(Duration::from_secs(10)));
        drop(w);
        h.join().unwrap();
        drop(lock);
        // The snapshot thread finishes on its own; wait for the old segment to go (bounded).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while segment(&dir).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "segment 0 never removed"
            );
            std::thread::yield_now();
        }
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert!(r.copy.from_snapshot);
        assert_eq!(r.copy.pos, Position { epoch: 1, seq: 20 });
        assert_eq!(r.copy.replayed, 8);
        assert_eq!(r.copy.space, space);
    }

    /// Zeroes the last `n` bytes of the data in `path` (a write that stopped short in
    /// preallocated space); returns where the data now ends.
    fn tear_in_place(path: &Path, n: u64) -> u64 {
        let end = crate::durable::data_end(path).unwrap();
        let mut data = std::fs::read(path).unwrap();
        data[(end - n) as usize..end as usize].fill(0);
        std::fs::write(path, &data).unwrap();
        crate::durable::data_end(path).unwrap()
    }

    #[test]
    fn a_preallocated_segment_ends_at_its_zeros_and_a_torn_record_before_them_is_cut() {
        const SEG: u64 = 1 << 20;
        let t = tempfile::tempdir().unwrap();
        let (dir, d) = write_copy_with(t.path(), 1, 10, prealloc(SEG));
        assert_eq!(d.pos, Position { epoch: 1, seq: 10 });
        let seg = segment(&dir);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            SEG,
            "the log went to the preallocated segment"
        );
        let data_len = crate::durable::data_end(&seg).unwrap();
        assert!(data_len > 0 && data_len < SEG);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert_eq!(r.copy.pos, Position { epoch: 1, seq: 10 });
        assert!(r.copy.cut.is_none(), "zeros are the end, not damage");
        drop(r);
        // The last record's write stopped 3 bytes short; zeros follow.
        tear_in_place(&seg, 3);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert_eq!(r.copy.pos.seq, 9, "the torn 10th update is dropped");
        assert_eq!(r.copy.space.len(), 2 + 9);
        let cut = r.copy.cut.clone().unwrap();
        assert!(cut.why.contains("torn"), "{cut}");
        let frame = data_len - cut.offset;
        assert_eq!(cut.discarded, frame - 3, "the zeros are not counted: {cut}");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), cut.offset);
        let aside = seg.with_file_name(format!("{}.corrupt-{}", segment_name(0), cut.offset));
        assert_eq!(std::fs::metadata(&aside).unwrap().len(), frame - 3);
        drop(r);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert!(r.copy.cut.is_none());
        assert_eq!(r.copy.pos.seq, 9);
    }

    /// With "always" a preallocated segment is written with `O_DIRECT` in whole blocks, its
    /// last partial block written again with each group: groups of every size, one per sync,
    /// read back whole and in order, and the segment ends at its zeros.
    #[test]
    fn groups_of_every_size_written_directly_read_back_in_order() {
        const SEG: u64 = 1 << 20;
        let t = tempfile::tempdir().unwrap();
        let (dir, lock) = create_dir(t.path()).unwrap();
        wal::make_spare(&dir, SEG, 64 << 10).unwrap();
        let (w, h) = wal::spawn(
            dir.clone(),
            None,
            Durable::default(),
            prealloc(SEG),
            WalHooks {
                on_durable: Box::new(|_| {}),
                on_error: Box::new(|e| panic!("{e}")),
            },
        )
        .unwrap();
        assert!(w.direct_for_tests(Duration::from_secs(10)) || !direct_io_works(&dir));
        w.send(WalMsg::Record(Record::Reset));
        w.send(WalMsg::Record(Record::Base {
            epoch: 1,
            seq: 0,
            dedupe: vec![],
        }));
        let sizes = [1usize, 100, 1000, 4000, 4096, 5000, 9000, 3, 8191];
        let value = |s: u64| "v".repeat(sizes[s as usize % sizes.len()]) + &s.to_string();
        for s in 1..=60u64 {
            w.send(WalMsg::Record(Record::Change {
                epoch: 1,
                seq: s,
                rid: s,
                change: Change::Insert(vec![Pair::new(format!("k,{s}"), value(s))]),
                reply: Reply::Rejected(vec![]),
            }));
            // One group (and one sync) per record.
            assert!(w.flush(Duration::from_secs(10)));
        }
        drop(w);
        h.join().unwrap();
        drop(lock);
        let seg = segment(&dir);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), SEG);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert!(r.copy.cut.is_none(), "{:?}", r.copy.cut);
        assert_eq!(r.copy.pos, Position { epoch: 1, seq: 60 });
        assert_eq!(r.copy.space.len(), 60);
        for s in 1..=60u64 {
            let got = r.copy.space.iter().find(|(k, _)| **k == format!("k,{s}"));
            assert_eq!(
                got.map(|(_, v)| v.to_string()),
                Some(value(s)),
                "update {s}"
            );
        }
    }

    /// Whether this filesystem accepts `O_DIRECT` at all (tmpfs before Linux 6.6 does not).
    fn direct_io_works(dir: &Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        let ok = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_DIRECT)
            .open(dir.join("probe"))
            .is_ok();
        if !ok {
            eprintln!("O_DIRECT is refused here: the buffered path was tested instead");
        }
        ok
    }

    #[test]
    fn zeros_followed_by_records_in_a_preallocated_segment_are_corruption() {
        let t = tempfile::tempdir().unwrap();
        let (dir, _) = write_copy_with(t.path(), 1, 10, prealloc(1 << 20));
        let seg = segment(&dir);
        let mut data = std::fs::read(&seg).unwrap();
        let end = crate::durable::data_end(&seg).unwrap() as usize;
        // Zero a stretch in the middle of the records (whole frames or parts of them).
        data[end / 2..end / 2 + 40].fill(0);
        std::fs::write(&seg, &data).unwrap();
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        let cut = r.copy.cut.clone().unwrap();
        assert!(cut.why.contains("corrupt"), "{cut}");
        assert!(
            cut.offset as usize <= end / 2 && r.copy.pos.seq < 10,
            "{cut}"
        );
        assert_eq!(r.copy.space.len() as u64, 2 + r.copy.pos.seq);
    }

    #[test]
    fn a_crash_right_after_preallocation_loses_nothing_and_leaves_nothing_in_the_way() {
        const SEG: u64 = 1 << 20;
        let t = tempfile::tempdir().unwrap();
        let (dir, _) = write_copy(t.path(), 1, 10);
        // The writer had just moved to a new preallocated segment, a spare was half written and
        // another one complete.
        std::fs::rename(
            {
                wal::make_spare(&dir, SEG, 64 << 10).unwrap();
                dir.join(crate::durable::SPARE_FILE)
            },
            dir.join(segment_name(1)),
        )
        .unwrap();
        wal::make_spare(&dir, SEG, 64 << 10).unwrap();
        std::fs::write(dir.join(crate::durable::SPARE_TMP), vec![0u8; 1000]).unwrap();
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert_eq!(r.copy.pos, Position { epoch: 1, seq: 10 });
        assert!(r.copy.cut.is_none());
        assert_eq!(r.copy.last_segment, Some(1));
        // A writer started in this directory takes the complete spare as its first segment and
        // removes the half-written one.
        let (w, h) = wal::spawn(
            dir.clone(),
            r.copy.last_segment,
            Durable {
                pos: r.copy.pos,
                base: true,
                bases: 0,
            },
            prealloc(SEG),
            WalHooks {
                on_durable: Box::new(|_| {}),
                on_error: Box::new(|e| panic!("{e}")),
            },
        )
        .unwrap();
        // The writer's own preallocation of the next spare runs in the background and writes
        // the same temporary name: once its complete spare is named, the temporary is gone (the
        // half-written leftover was removed before, or overwritten by this one).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !dir.join(crate::durable::SPARE_FILE).exists() {
            assert!(std::time::Instant::now() < deadline, "no new spare in 10 s");
            std::thread::yield_now();
        }
        assert!(!dir.join(crate::durable::SPARE_TMP).exists());
        assert_eq!(
            std::fs::metadata(dir.join(segment_name(2))).unwrap().len(),
            SEG
        );
        w.send(WalMsg::Record(change(1, 11)));
        assert!(w.flush(Duration::from_secs(10)));
        drop(w);
        h.join().unwrap();
        drop(r);
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert_eq!(r.copy.pos, Position { epoch: 1, seq: 11 });
        assert!(r.copy.cut.is_none());
        drop(r);
        // A new directory whose first, preallocated segment never got a record: no copy, no
        // damage.
        let t2 = tempfile::tempdir().unwrap();
        let (d2, lock) = create_dir(t2.path()).unwrap();
        wal::make_spare(&d2, SEG, 64 << 10).unwrap();
        std::fs::rename(
            d2.join(crate::durable::SPARE_FILE),
            d2.join(segment_name(0)),
        )
        .unwrap();
        drop(lock);
        let c = read_copy(&d2, MAX, 1000, true).unwrap();
        assert!(c.cut.is_none() && !c.base);
        assert!(recover(t2.path(), MAX, 1000).unwrap().is_none());
    }

    #[test]
    fn full_segments_are_rotated_and_a_snapshot_removes_every_one_it_covers() {
        let t = tempfile::tempdir().unwrap();
        let (dir, lock) = create_dir(t.path()).unwrap();
        let (w, h) = wal::spawn(
            dir.clone(),
            None,
            Durable::default(),
            prealloc(4096),
            WalHooks {
                on_durable: Box::new(|_| {}),
                on_error: Box::new(|e| panic!("{e}")),
            },
        )
        .unwrap();
        let mut space = crate::space::Space::new();
        w.send(WalMsg::Record(Record::Reset));
        w.send(WalMsg::Record(Record::Base {
            epoch: 1,
            seq: 0,
            dedupe: vec![],
        }));
        let segments = |dir: &Path| -> Vec<u64> {
            let mut v: Vec<u64> = std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(crate::durable::segment_index)
                })
                .collect();
            v.sort_unstable();
            v
        };
        let mut before = Vec::new();
        for s in 1..=300 {
            let r = change(1, s);
            if let Record::Change { change, .. } = &r {
                space.apply(change);
            }
            w.send(WalMsg::Record(r));
            // Groups of at most ten records (~0.7 KB): a group is written whole into one segment,
            // so without this one group could take every record queued and leave one full segment
            // only, depending on how the writer and this thread are scheduled.
            if s % 10 == 0 {
                assert!(w.flush(Duration::from_secs(10)));
            }
            if s == 250 {
                before = segments(&dir);
                assert!(before.len() >= 3, "4 KiB segments rotated: {before:?}");
                w.send(WalMsg::Snapshot {
                    space: space.clone(),
                    pos: Position { epoch: 1, seq: 250 },
                    dedupe: vec![],
                });
            }
        }
        assert!(w.flush(Duration::from_secs(10)));
        drop(w);
        h.join().unwrap();
        drop(lock);
        // The snapshot thread finishes on its own: wait (bounded) until every segment that
        // existed before the snapshot is gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let segs = segments(&dir);
            if dir.join(crate::durable::SNAPSHOT_FILE).exists()
                && !segs.iter().any(|s| before.contains(s))
            {
                assert!(
                    !segs.is_empty() && segs[0] > *before.last().unwrap(),
                    "{segs:?}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "segments {before:?} never all removed: {segs:?}"
            );
            std::thread::yield_now();
        }
        let r = recover(t.path(), MAX, 1000).unwrap().unwrap();
        assert!(r.copy.from_snapshot);
        assert!(r.copy.cut.is_none());
        assert_eq!(r.copy.pos, Position { epoch: 1, seq: 300 });
        assert_eq!(r.copy.replayed, 50);
        assert_eq!(r.copy.space, space);
    }
}
