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
//! ```
//!
//! Log and snapshot are sequences of frames `[len: u32 LE][crc32(payload): u32 LE][payload]`, the
//! payload one CBOR [`Record`] (log) or [`SnapRecord`] (snapshot). A crash mid-append leaves a torn
//! last frame; a flipped bit fails the checksum: either way the log is cut at the last good
//! frame, with a warning naming the file and offset (see [`recover`]).
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
    let payload = &out[start + FRAME_HEADER..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What ended a frame sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameEnd {
    /// Clean end of file.
    Eof,
    /// A frame was cut short (crash mid-append) at `offset`.
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
        fill(&mut self.inner, &mut head, self.offset, true)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > self.max_frame {
            return Err(FrameEnd::Corrupt {
                offset: self.offset,
                why: format!(
                    "frame length {len} exceeds the largest record ({})",
                    self.max_frame
                ),
            });
        }
        self.buf.resize(len, 0);
        fill(&mut self.inner, &mut self.buf, self.offset, false)?;
        if crc32fast::hash(&self.buf) != crc {
            return Err(FrameEnd::Corrupt {
                offset: self.offset,
                why: "checksum mismatch".into(),
            });
        }
        let v = crate::wire::frame::decode::<T>(&self.buf).map_err(|e| FrameEnd::Corrupt {
            offset: self.offset,
            why: format!("undecodable record: {e}"),
        })?;
        self.offset += (FRAME_HEADER + len) as u64;
        Ok(v)
    }
}

/// Fills `buf` from `r`. A short read is a torn frame at `offset`, except that nothing at all
/// where a frame may start (`may_end`) is the clean end of the sequence.
fn fill(r: &mut impl Read, buf: &mut [u8], offset: u64, may_end: bool) -> Result<(), FrameEnd> {
    match read_full(r, buf) {
        Ok(0) if may_end => Err(FrameEnd::Eof),
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

/// Writes a snapshot of `space` atomically to `dir/snapshot` (tmp, fsync, rename, fsync dir).
pub fn write_snapshot(
    dir: &Path,
    space: &crate::space::Space,
    pos: Position,
    next_segment: u64,
    dedupe: Vec<(u64, Reply)>,
) -> Result<u64, DurableError> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let file = std::fs::File::create(&tmp)
        .map_err(|e| DurableError::io("cannot create snapshot", &tmp, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(1 << 16);
    let put = |rec: &SnapRecord, buf: &mut Vec<u8>, w: &mut std::io::BufWriter<std::fs::File>| {
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
        .map_err(|e| DurableError::io("cannot write snapshot", &tmp, e.into_error()))?;
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
}
