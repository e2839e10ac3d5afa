//! Durability of a replica: a write-ahead log with group-committed `fdatasync`, snapshots that
//! compact it, and recovery from the most advanced copy on this host.
//!
//! Layout (one directory per replica process, under the data root, so that a primary and its
//! backup on the same host never share a file):
//!
//! ```text
//! <data root>/replica-<millis>-<pid>/LOCK            held (flock) while the process lives
//!                                   /snapshot        the space at (epoch, seq), atomic (tmp+rename)
//!                                   /wal-<n>         log segments, replayed in order after it
//!                                   /wal.spare       the next segment, preallocated (zeros)
//! ```
//!
//! Log and snapshot are sequences of frames `[len: u32 LE][crc32(payload): u32 LE][payload]`, the
//! payload one CBOR [`Record`] (log) or [`SnapRecord`] (snapshot). Log segments are preallocated
//! (`wal_segment_bytes` of zeros, synced before use), so a segment's frames are followed by zeros:
//! a zero frame header with nothing but zeros after it is the end of the segment. A crash
//! mid-append leaves a torn last frame (cut short, or ending in zeros the write never reached);
//! a flipped bit fails the checksum; zeros followed by data are not an end either: in every such
//! case the log is cut at the last good frame, with a warning naming the file and offset (see
//! [`recover`]).
//!
//! The store thread sends every change to the log writer ([`wal`]) in the order it applies
//! them; the writer appends everything that arrived while the previous `fdatasync` ran and syncs
//! it in one call (group commit), then publishes the [`Position`] that is now durable. A primary
//! releases a reply only once its own log and its backup hold the write; a backup acknowledges an
//! update only once its log holds it.

pub mod dedupe;
pub mod recover;
pub mod wal;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::space::Change;
use crate::wire::cbor::{write_head, write_text};
use crate::wire::node::Reply;

/// When the log writer calls `fdatasync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// After every group of appends, before any of them counts as held (survives a power cut).
    #[default]
    Always,
    /// Every `fsync_interval_ms`; an append counts as held once written to the OS (survives a
    /// crash of the process, loses up to the interval on a power cut).
    Interval,
    /// Never; the OS writes back when it likes (survives a crash of the process only).
    Never,
}

/// A position in a replica's history: the epoch it last served or acknowledged at and the last
/// update it holds. Copies are ordered by epoch, then sequence number.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    pub epoch: u64,
    pub seq: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {}, update {}", self.epoch, self.seq)
    }
}

/// One log record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// Start of a base copy (a backup's initial copy, or a primary's init file): empty space.
    Reset,
    /// Pairs of a base copy (key text, value text).
    Pairs(Vec<(String, String)>),
    /// Entries of a base copy's dedupe table, in chunks (between its pairs and `Base`).
    Dedupe(Vec<(u64, Reply)>),
    /// End of a base copy: the space as of update `seq` at `epoch`, with the rest of the dedupe
    /// table (empty since the table is logged in `Dedupe` chunks; older logs hold it all here).
    /// Until this record a directory holds no usable copy.
    Base {
        epoch: u64,
        seq: u64,
        dedupe: Vec<(u64, Reply)>,
    },
    /// One applied write, with what the dedupe table needs.
    Change {
        epoch: u64,
        seq: u64,
        rid: u64,
        change: Change,
        reply: Reply,
    },
    /// The replica's epoch rose (welcomed, granted, promoted).
    Epoch(u64),
}

/// One snapshot record: a header, pair chunks, an end marker (a snapshot without it is torn).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SnapRecord {
    Header {
        format: String,
        version: u32,
        epoch: u64,
        seq: u64,
        /// The first log segment to replay after this snapshot (older ones are obsolete).
        next_segment: u64,
        /// Empty from version 2 on (the table follows in `Dedupe` records).
        dedupe: Vec<(u64, Reply)>,
    },
    /// Entries of the dedupe table, in chunks (version 2).
    Dedupe(Vec<(u64, Reply)>),
    Pairs(Vec<(String, String)>),
    End {
        pairs: u64,
    },
}

pub const SNAPSHOT_FORMAT: &str = "tuplespace-replica-snapshot";
/// Version written; version 1 (the whole dedupe table in the header) is still read.
pub const SNAPSHOT_VERSION: u32 = 2;
/// Pairs per snapshot frame.
pub const SNAPSHOT_CHUNK: usize = 4096;
pub const LOCK_FILE: &str = "LOCK";
pub const SNAPSHOT_FILE: &str = "snapshot";
pub const SNAPSHOT_TMP: &str = "snapshot.tmp";
/// The preallocated segment the log writer moves to next (not a segment until renamed).
pub const SPARE_FILE: &str = "wal.spare";
/// A spare being written (removed at start: it may be incomplete).
pub const SPARE_TMP: &str = "wal.spare.tmp";
pub const REPLICA_PREFIX: &str = "replica-";
const FRAME_HEADER: usize = 8;

/// Errors of the durability layer; each says which file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error(
        "{what} `{path}`: {source}; check that the data directory is writable and the disk not full"
    )]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "snapshot `{path}` is unusable: {why}; recover from another replica's directory or a backup copy"
    )]
    Snapshot { path: PathBuf, why: String },
    #[error(
        "the most advanced copy ({pos}) is in `{dir}`, which another running process holds (LOCK); stop that process first, or remove the directory to start from an older copy"
    )]
    InUse { dir: PathBuf, pos: Position },
}

impl DurableError {
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        DurableError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// Appends one frame holding `item` to `out`.
pub fn encode_frame<T: Serialize>(item: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    if let Err(e) = ciborium::into_writer(item, &mut *out) {
        tracing::error!("internal error: cannot encode a log record: {e}");
        out.truncate(start);
        return;
    }
    seal_frame(out, start);
}

/// Writes the header (length, checksum) of the log frame that starts at `start`: everything
/// after the header is its payload.
fn seal_frame(out: &mut [u8], start: usize) {
    let payload = &out[start + FRAME_HEADER..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends one frame holding `rec`, as [`encode_frame`] does: a `Change` with a usual reply
/// written directly (the same bytes serde writes; a unit test compares them), anything else
/// through serde.
pub fn encode_record(rec: &Record, out: &mut Vec<u8>) {
    use crate::wire::node::{reply_is_plain, write_change, write_reply};
    let Record::Change {
        epoch,
        seq,
        rid,
        change,
        reply,
    } = rec
    else {
        return encode_frame(rec, out);
    };
    if !reply_is_plain(reply) {
        return encode_frame(rec, out);
    }
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    write_head(out, 5, 1);
    write_text(out, "Change");
    write_head(out, 5, 5);
    for (k, v) in [("epoch", *epoch), ("seq", *seq), ("rid", *rid)] {
        write_text(out, k);
        write_head(out, 0, v);
    }
    write_text(out, "change");
    write_change(out, change);
    write_text(out, "reply");
    write_reply(out, reply);
    seal_frame(out, start);
}

/// What ended a frame sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameEnd {
    /// Clean end: end of file, or nothing but zeros (preallocated space) where a frame would
    /// start.
    Eof,
    /// A frame was cut short (crash mid-append) at `offset`: the file ends inside it, or it fails
    /// its checksum with its last byte and everything after it zero (the write never got there).
    Torn { offset: u64 },
    /// A frame failed its checksum, or holds no valid record, at `offset`.
    Corrupt { offset: u64, why: String },
}

/// Reads frames from a file, stopping at the first bad one.
pub struct FrameReader<R> {
    inner: R,
    offset: u64,
    max_frame: usize,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, max_frame: usize) -> Self {
        FrameReader {
            inner,
            offset: 0,
            max_frame,
            buf: Vec::new(),
        }
    }

    /// Offset of the next frame (= end of the last good one).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next record, or how the sequence ended.
    pub fn read<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, FrameEnd> {
        let mut head = [0u8; FRAME_HEADER];
        let n = read_full(&mut self.inner, &mut head).map_err(|e| self.read_error(e))?;
        if head[..n].iter().all(|b| *b == 0) {
            // End of file, or zeros where the next frame would start: the preallocated rest of a
            // segment if nothing but zeros follows.
            return Err(match self.rest_is_zero() {
                Ok(true) => FrameEnd::Eof,
                Ok(false) => FrameEnd::Corrupt {
                    offset: self.offset,
                    why: "a zero frame header followed by data".into(),
                },
                Err(e) => self.read_error(e),
            });
        }
        if n < FRAME_HEADER {
            return Err(FrameEnd::Torn {
                offset: self.offset,
            });
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > self.max_frame {
            return Err(self.bad(
                false,
                format!(
                    "frame length {len} exceeds the largest record ({})",
                    self.max_frame
                ),
            ));
        }
        self.buf.resize(len, 0);
        fill(&mut self.inner, &mut self.buf, self.offset)?;
        if crc32fast::hash(&self.buf) != crc {
            let zero_end = self.buf.last().is_none_or(|b| *b == 0);
            return Err(self.bad(zero_end, "checksum mismatch".into()));
        }
        let v = crate::wire::frame::decode::<T>(&self.buf).map_err(|e| FrameEnd::Corrupt {
            offset: self.offset,
            why: format!("undecodable record: {e}"),
        })?;
        self.offset += (FRAME_HEADER + len) as u64;
        Ok(v)
    }

    /// A bad frame at the current offset: torn if `zero_end` (it ends in a zero byte) and only
    /// zeros follow it (a write cut short in preallocated space), else corrupt.
    fn bad(&mut self, zero_end: bool, why: String) -> FrameEnd {
        match self.rest_is_zero() {
            Ok(true) if zero_end => FrameEnd::Torn {
                offset: self.offset,
            },
            Ok(_) => FrameEnd::Corrupt {
                offset: self.offset,
                why,
            },
            Err(e) => self.read_error(e),
        }
    }

    fn read_error(&self, e: std::io::Error) -> FrameEnd {
        FrameEnd::Corrupt {
            offset: self.offset,
            why: format!("read error: {e}"),
        }
    }

    /// Reads the rest of the input: true if it holds nothing but zeros.
    fn rest_is_zero(&mut self) -> std::io::Result<bool> {
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            match self.inner.read(&mut chunk) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    if chunk[..n].iter().any(|b| *b != 0) {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The end of the data in a file: the offset after its last byte that is not zero (0 if none).
pub fn data_end(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut end = f.metadata()?.len();
    let mut chunk = vec![0u8; 1 << 20];
    while end > 0 {
        let n = (chunk.len() as u64).min(end) as usize;
        f.read_exact_at(&mut chunk[..n], end - n as u64)?;
        if let Some(i) = chunk[..n].iter().rposition(|b| *b != 0) {
            return Ok(end - n as u64 + i as u64 + 1);
        }
        end -= n as u64;
    }
    Ok(0)
}

/// Fills `buf` from `r`; a short read is a torn frame at `offset`.
fn fill(r: &mut impl Read, buf: &mut [u8], offset: u64) -> Result<(), FrameEnd> {
    match read_full(r, buf) {
        Ok(n) if n < buf.len() => Err(FrameEnd::Torn { offset }),
        Ok(_) => Ok(()),
        Err(e) => Err(FrameEnd::Corrupt {
            offset,
            why: format!("read error: {e}"),
        }),
    }
}

/// Reads until `buf` is full or end of file; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The largest frame a reader accepts: a record holds at most a request's worth of pairs and a
/// reply as large as the largest response, or a snapshot chunk.
pub fn max_frame(cfg: &crate::config::Config) -> usize {
    2 * cfg.max_response_bytes + 2 * cfg.max_request_bytes + (1 << 20)
}

/// Log segment file name for index `n`.
pub fn segment_name(n: u64) -> String {
    format!("wal-{n:020}")
}

/// The segment index of a file name, if it is one.
pub fn segment_index(name: &str) -> Option<u64> {
    name.strip_prefix("wal-")?.parse().ok()
}

/// The data root of a replica: `data_dir` if configured, else `<SAVE_FILE>.d`; None = no
/// durability (the space lives in memory only).
pub fn data_root(cfg: &crate::config::Config, save_file: Option<&Path>) -> Option<PathBuf> {
    if let Some(d) = &cfg.data_dir {
        return Some(d.clone());
    }
    save_file.map(|s| {
        let mut p = s.as_os_str().to_owned();
        p.push(".d");
        PathBuf::from(p)
    })
}

/// Fsyncs a directory (after a rename or create in it).
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| DurableError::io("cannot sync directory", dir, e))
}

/// A file written in the background (a snapshot, a spare log segment) that syncs its data every
/// `every` bytes written (0: never by itself). On a disk shared with the log, a log sync after an
/// append also waits for whatever of these files the disk holds unsynced: without this, for the
/// whole of a snapshot of millions of pairs (hundreds of MiB) at its final sync. Measured on this
/// project's VM: a log sync waited 47–84 ms behind a 0.5–1.2 GiB file synced at its end, 3–10 ms
/// with a sync every 4 MiB (docs/BENCHMARKS.md, "Background writes and the log's syncs").
#[derive(Debug)]
pub(crate) struct SyncEvery {
    file: std::fs::File,
    every: u64,
    since: u64,
    /// Syncs done so far (for tests).
    syncs: u64,
}

impl SyncEvery {
    pub(crate) fn new(file: std::fs::File, every: u64) -> Self {
        SyncEvery {
            file,
            every,
            since: 0,
            syncs: 0,
        }
    }

    /// The file, for its final sync.
    pub(crate) fn into_file(self) -> std::fs::File {
        self.file
    }
}

impl Write for SyncEvery {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(b)?;
        self.since += n as u64;
        if self.every > 0 && self.since >= self.every {
            self.file.sync_data()?;
            self.since = 0;
            self.syncs += 1;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes a snapshot of `space` atomically to `dir/snapshot` (tmp, fsync, rename, fsync dir),
/// syncing its data every `sync_every` bytes on the way ([`SyncEvery`]; 0 = at the end only).
pub fn write_snapshot(
    dir: &Path,
    space: &crate::space::Space,
    pos: Position,
    next_segment: u64,
    dedupe: Vec<(u64, Reply)>,
    sync_every: u64,
) -> Result<u64, DurableError> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let file = std::fs::File::create(&tmp)
        .map_err(|e| DurableError::io("cannot create snapshot", &tmp, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, SyncEvery::new(file, sync_every));
    let mut buf = Vec::with_capacity(1 << 16);
    let put = |rec: &SnapRecord, buf: &mut Vec<u8>, w: &mut std::io::BufWriter<SyncEvery>| {
        buf.clear();
        encode_frame(rec, buf);
        w.write_all(buf)
            .map_err(|e| DurableError::io("cannot write snapshot", &tmp, e))
    };
    put(
        &SnapRecord::Header {
            format: SNAPSHOT_FORMAT.into(),
            version: SNAPSHOT_VERSION,
            epoch: pos.epoch,
            seq: pos.seq,
            next_segment,
            dedupe: vec![],
        },
        &mut buf,
        &mut w,
    )?;
    // A table of a million replies would not fit one frame: chunks of ~1 MiB.
    for c in dedupe::chunks(dedupe, dedupe::DEDUPE_CHUNK_BYTES) {
        put(&SnapRecord::Dedupe(c), &mut buf, &mut w)?;
    }
    let mut chunk = Vec::with_capacity(SNAPSHOT_CHUNK);
    let mut n = 0u64;
    for (k, v) in space.iter() {
        chunk.push((k.clone(), v.clone()));
        n += 1;
        if chunk.len() == SNAPSHOT_CHUNK {
            put(
                &SnapRecord::Pairs(std::mem::take(&mut chunk)),
                &mut buf,
                &mut w,
            )?;
        }
    }
    if !chunk.is_empty() {
        put(&SnapRecord::Pairs(chunk), &mut buf, &mut w)?;
    }
    put(&SnapRecord::End { pairs: n }, &mut buf, &mut w)?;
    let file = w
        .into_inner()
        .map_err(|e| DurableError::io("cannot write snapshot", &tmp, e.into_error()))?
        .into_file();
    file.sync_all()
        .map_err(|e| DurableError::io("cannot sync snapshot", &tmp, e))?;
    drop(file);
    let dst = dir.join(SNAPSHOT_FILE);
    std::fs::rename(&tmp, &dst).map_err(|e| DurableError::io("cannot rename snapshot", &dst, e))?;
    sync_dir(dir)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A background file syncs once per `every` bytes written, not only at the end; 0 = never
    /// by itself; what it wrote is all there.
    #[test]
    fn a_background_file_syncs_on_the_way() {
        let t = tempfile::tempdir().unwrap();
        let write = |every: u64| {
            let path = t.path().join(format!("f{every}"));
            let mut w = std::io::BufWriter::with_capacity(
                4096,
                SyncEvery::new(std::fs::File::create(&path).unwrap(), every),
            );
            for i in 0..10_000u32 {
                w.write_all(&i.to_le_bytes()).unwrap();
            }
            let f = w.into_inner().unwrap();
            let syncs = f.syncs;
            drop(f.into_file());
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 40_000);
            syncs
        };
        // 40,000 bytes in writes of 4,096: a sync after each 8,192 or more.
        assert_eq!(write(8192), 4);
        assert_eq!(write(0), 0);
    }

    /// A change record written by hand is the same frame serde writes; other records go
    /// through serde.
    #[test]
    fn change_records_written_by_hand_equal_serde() {
        use crate::space::Pair;
        let recs = vec![
            Record::Change {
                epoch: 3,
                seq: u64::MAX,
                rid: 1 << 33,
                change: Change::Insert(vec![Pair::new("a,b", "x".repeat(30))]),
                reply: Reply::Rejected(vec![]),
            },
            Record::Change {
                epoch: 0,
                seq: 24,
                rid: 255,
                change: Change::Replace(vec![Pair::new("k".repeat(256), ""), Pair::new("", "v")]),
                reply: Reply::Rejected(vec![]),
            },
            Record::Change {
                epoch: 70_000,
                seq: 9,
                rid: 23,
                change: Change::Remove(vec!["k".into()]),
                reply: Reply::Pairs {
                    pairs: vec![Pair::new("k", "v")],
                    message: Some("m".into()),
                },
            },
            Record::Change {
                epoch: 1,
                seq: 2,
                rid: 3,
                change: Change::Insert(vec![]),
                reply: Reply::Count(4),
            },
            Record::Epoch(5),
        ];
        for r in recs {
            let (mut mine, mut serde) = (Vec::new(), Vec::new());
            encode_record(&r, &mut mine);
            encode_frame(&r, &mut serde);
            assert_eq!(mine, serde, "{r:?}");
        }
    }

    #[test]
    fn frames_round_trip_and_detect_torn_and_flipped_bytes() {
        let mut buf = Vec::new();
        for i in 0..3u64 {
            encode_frame(&Record::Epoch(i), &mut buf);
        }
        let mut r = FrameReader::new(&buf[..], 1 << 20);
        for i in 0..3u64 {
            assert_eq!(r.read::<Record>().unwrap(), Record::Epoch(i));
        }
        assert_eq!(r.read::<Record>().unwrap_err(), FrameEnd::Eof);
        let whole = buf.len();
        // Torn: the last frame loses its last byte.
        let mut r = FrameReader::new(&buf[..whole - 1], 1 << 20);
        r.read::<Record>().unwrap();
        let good = r.offset();
        r.read::<Record>().unwrap();
        let good2 = r.offset();
        assert!(good2 > good);
        assert_eq!(
            r.read::<Record>().unwrap_err(),
            FrameEnd::Torn { offset: good2 }
        );
        // Flipped byte in the second frame's payload.
        let mut bad = buf.clone();
        bad[good as usize + FRAME_HEADER] ^= 0x40;
        let mut r = FrameReader::new(&bad[..], 1 << 20);
        r.read::<Record>().unwrap();
        assert!(matches!(
            r.read::<Record>().unwrap_err(),
            FrameEnd::Corrupt { offset, .. } if offset == good
        ));
    }

    /// Frames of `Epoch(i)` for i in 0..n (each ends in a byte that is not zero).
    fn epochs(n: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        for i in 0..n {
            encode_frame(&Record::Epoch(1000 + i), &mut buf);
        }
        assert_ne!(*buf.last().unwrap(), 0);
        buf
    }

    fn read_all(data: &[u8]) -> (Vec<Record>, FrameEnd) {
        let mut r = FrameReader::new(data, 1 << 20);
        let mut v = Vec::new();
        loop {
            match r.read::<Record>() {
                Ok(rec) => v.push(rec),
                Err(end) => return (v, end),
            }
        }
    }

    #[test]
    fn zeros_after_the_frames_of_a_preallocated_segment_are_its_end() {
        let mut data = epochs(3);
        data.resize(data.len() + 4096, 0);
        let (v, end) = read_all(&data);
        assert_eq!(v.len(), 3);
        assert_eq!(end, FrameEnd::Eof);
        // A segment preallocated and never written to (a crash right after preallocation).
        let (v, end) = read_all(&[0u8; 4096]);
        assert!(v.is_empty());
        assert_eq!(end, FrameEnd::Eof);
        // A few zeros, fewer than a frame header.
        let mut data = epochs(1);
        data.extend_from_slice(&[0; 3]);
        assert_eq!(read_all(&data), (vec![Record::Epoch(1000)], FrameEnd::Eof));
    }

    #[test]
    fn a_torn_record_followed_by_zeros_is_torn_and_zeros_followed_by_data_are_corrupt() {
        let good = epochs(2);
        let whole = epochs(3);
        // The third record's write stopped 3 bytes short (they stayed zero), zeros after it.
        let mut data = whole.clone();
        let n = data.len();
        data[n - 3..].fill(0);
        data.resize(n + 4096, 0);
        let (v, end) = read_all(&data);
        assert_eq!(v.len(), 2);
        assert_eq!(
            end,
            FrameEnd::Torn {
                offset: good.len() as u64
            }
        );
        // Only the header made it.
        let mut data = whole.clone();
        data[good.len() + FRAME_HEADER..].fill(0);
        data.resize(n + 4096, 0);
        assert_eq!(
            read_all(&data).1,
            FrameEnd::Torn {
                offset: good.len() as u64
            }
        );
        // Part of the header made it (a length, no checksum).
        let mut data = whole.clone();
        data[good.len() + 2..].fill(0);
        data.resize(n + 4096, 0);
        assert_eq!(
            read_all(&data).1,
            FrameEnd::Torn {
                offset: good.len() as u64
            }
        );
        // The second record zeroed, the third intact: zeros followed by data are not an end.
        let one = epochs(1);
        let mut data = whole.clone();
        data[one.len()..good.len()].fill(0);
        data.resize(n + 4096, 0);
        let (v, end) = read_all(&data);
        assert_eq!(v.len(), 1);
        assert!(
            matches!(&end, FrameEnd::Corrupt { offset, why } if *offset == one.len() as u64 && why.contains("zero frame header followed by data")),
            "{end:?}"
        );
        // A flipped bit in the last record (which ends in a byte that is not zero), zeros after:
        // corrupt, not torn.
        let mut data = whole.clone();
        data[good.len() + FRAME_HEADER] ^= 0x04;
        data.resize(n + 4096, 0);
        assert!(
            matches!(read_all(&data).1, FrameEnd::Corrupt { offset, .. } if offset == good.len() as u64)
        );
        // A flipped bit in a middle record, zeros after the last: corrupt.
        let mut data = whole;
        data[one.len() + FRAME_HEADER] ^= 0x04;
        data.resize(n + 4096, 0);
        assert!(
            matches!(read_all(&data).1, FrameEnd::Corrupt { offset, .. } if offset == one.len() as u64)
        );
    }

    #[test]
    fn data_end_is_after_the_last_byte_that_is_not_zero() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, []).unwrap();
        assert_eq!(data_end(&p).unwrap(), 0);
        let mut data = vec![0u8; (3 << 20) + 17];
        data[5] = 1;
        std::fs::write(&p, &data).unwrap();
        assert_eq!(data_end(&p).unwrap(), 6);
        data[(2 << 20) + 3] = 9;
        std::fs::write(&p, &data).unwrap();
        assert_eq!(data_end(&p).unwrap(), (2 << 20) + 4);
    }
}
