//! Bodies of the fuzz targets in `fuzz/fuzz_targets/` (run with `scripts/fuzz.sh`), kept in the
//! library so that `tests/fuzz_corpus.rs` replays every file of `fuzz/corpus/<target>/` through
//! the very same code in `cargo test` (stable toolchain, no `cargo fuzz` needed in CI).
//!
//! Each body feeds untrusted bytes to one decoder the way the service does, and checks cheap
//! properties on what comes out; a violated property panics, which the fuzzer reports as a crash.
//! Not behind a feature: the module is small and adds no dependency, and with a feature a plain
//! `cargo test` (what CI runs) would skip the corpus test silently.
//!
//! | target | input | code under test |
//! |---|---|---|
//! | `client_frame` | `[chunk size][bytes of a client stream]` | `wire::frame::FrameDecoder`, `decode_value`, `wire::client::parse_request` / `command_of` (and `fast_command` against them), the relay wrapping, tuple checks, patterns |
//! | `node_message` | one frame body | `wire::frame::decode` of every node message type |
//! | `log_loader` | `[flags][log segment]` | `durable::FrameReader`, `durable::recover::recover` over a replica directory |
//! | `snapshot_loader` | `[flags][file]` | `space::load_snapshot` (JSON save file) and the replica `snapshot` file through `recover` |
//! | `pattern` | `keyexp 0xFF valexp 0xFF text 0xFF text ...` | `space::Pattern::compile`, `is_match`, index hints, `Space::get` / `delete` |

use std::path::{Path, PathBuf};

use ciborium::Value;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Config, RESPONSE_ENVELOPE_BYTES};
use crate::durable::recover::{self, Recovered};
use crate::durable::{
    self, DurableError, FrameEnd, FrameReader, Position, Record, SNAPSHOT_FILE, SnapRecord,
};
use crate::space::{
    self, Change, IndexHint, Pair, Pattern, SnapshotError, Space, check_tuple, split_text,
};
use crate::wire::cbor::RawItem;
use crate::wire::client::{self, Command, Op, Response};
use crate::wire::frame::{self, FrameDecoder};
use crate::wire::node::{
    Beat, Relay, RelayAnswer, RelayReply, Repl, ReplAck, ReplicaInfo, Reply, Role, StreamKind,
    ToProxy, ToServer,
};

/// Every target, as named in `fuzz/Cargo.toml` and `fuzz/corpus/`.
pub const TARGETS: &[&str] = &[
    "client_frame",
    "node_message",
    "log_loader",
    "snapshot_loader",
    "pattern",
];

/// Runs the body of `target` on `data`; `scratch` is a directory the file targets may fill and
/// empty again (it must exist). Panics on an unknown target.
pub fn run(target: &str, data: &[u8], scratch: &Path) {
    match target {
        "client_frame" => client_frame(data),
        "node_message" => node_message(data),
        "log_loader" => log_loader(data, scratch),
        "snapshot_loader" => snapshot_loader(data, scratch),
        "pattern" => pattern(data),
        other => panic!("unknown fuzz target `{other}`; the targets are {TARGETS:?}"),
    }
}

/// A private scratch directory for the file targets, removed when dropped. Made under `$TMPDIR`
/// if set, else under `/dev/shm` if there is one (in memory: recovery's fsyncs cost nothing, a
/// replay of the log_loader corpus took 0.8 s instead of 21.6 s), else under the system temp dir.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> std::io::Result<Scratch> {
        let shm = Path::new("/dev/shm");
        let base = match std::env::var_os("TMPDIR") {
            Some(t) if !t.is_empty() => PathBuf::from(t),
            _ if shm.is_dir() => shm.to_owned(),
            _ => std::env::temp_dir(),
        };
        for n in 0u32.. {
            let p = base.join(format!("tuplespace-fuzz-{tag}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(Scratch(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => {}
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// CBOR bytes of `x` (one frame body), to compare values that may hold a NaN.
fn cbor<T: Serialize + ?Sized>(x: &T) -> Vec<u8> {
    frame::encode(x).split_off(4)
}

/// `x` survives encode -> decode, and encoding again gives the same bytes.
fn round_trips<T: Serialize + DeserializeOwned>(x: &T, what: &str) {
    let bytes = cbor(x);
    let back: T = frame::decode(&bytes)
        .unwrap_or_else(|e| panic!("{what}: our own encoding does not decode: {e}"));
    assert_eq!(
        bytes,
        cbor(&back),
        "{what}: encode -> decode -> encode changed the bytes"
    );
}

// ---------------------------------------------------------------------------------------------
// client_frame

/// Heap and inline bytes of a decoded CBOR value (capacities, not lengths: what is allocated).
pub fn value_bytes(v: &Value) -> usize {
    std::mem::size_of::<Value>() + value_heap(v)
}

fn value_heap(v: &Value) -> usize {
    match v {
        Value::Text(s) => s.capacity(),
        Value::Bytes(b) => b.capacity(),
        Value::Array(a) => {
            a.capacity() * std::mem::size_of::<Value>() + a.iter().map(value_heap).sum::<usize>()
        }
        Value::Map(m) => {
            m.capacity() * std::mem::size_of::<(Value, Value)>()
                + m.iter()
                    .map(|(k, v)| value_heap(k) + value_heap(v))
                    .sum::<usize>()
        }
        Value::Tag(_, inner) => value_bytes(inner),
        _ => 0,
    }
}

/// Most memory a decoded client frame may take per byte of frame: every CBOR head is at least
/// one byte and adds at most one slot to a `Vec` whose capacity is at most four times its length
/// (a one-element array gets room for four). No length announced in a header is trusted.
pub const DECODED_BYTES_PER_FRAME_BYTE: usize = 4 * std::mem::size_of::<Value>();

/// Largest re-encoding of a decoded request body of `len` bytes: indefinite-length arrays, maps
/// and strings come back definite, which costs at most 3 bytes per 65,536 elements.
fn reencoded_bound(len: usize) -> usize {
    len + 3 * (len / 65_536 + 1)
}

/// A client stream: the first byte is the read chunk size (0 = everything at once), the rest the
/// bytes of one request stream, decoded and handled the way the proxy and the store do.
pub fn client_frame(data: &[u8]) {
    let cfg = Config::default();
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = if chunk == 0 {
        stream.len().max(1)
    } else {
        usize::from(chunk)
    };
    // Frames come out the same however the stream is cut into reads.
    let whole = frames_of(stream, stream.len().max(1), cfg.max_request_bytes);
    let pieces = frames_of(stream, chunk, cfg.max_request_bytes);
    assert_eq!(whole, pieces, "frames depend on how the stream was cut");
    let (frames, _end) = whole;
    let mut consumed = 0;
    for body in &frames {
        assert!(!body.is_empty() && body.len() <= cfg.max_request_bytes);
        consumed += 4 + body.len();
        client_request(body, &cfg);
    }
    assert!(consumed <= stream.len());
}

/// True if `body` (one CBOR item) holds an indefinite-length byte or text string with an
/// indefinite-length string among its chunks, which RFC 8949 §3.2.3 forbids (chunks are
/// definite-length strings of the same type) and ciborium reads anyway. A walk over CBOR heads
/// independent of `wire::cbor`; false for anything malformed in another way.
pub fn nested_indefinite_chunk(body: &[u8]) -> bool {
    /// (major type, argument; None = indefinite)
    fn head(b: &[u8], at: &mut usize) -> Option<(u8, Option<u64>)> {
        let ib = *b.get(*at)?;
        *at += 1;
        let (major, ai) = (ib >> 5, ib & 31);
        let n = match ai {
            0..=23 => return Some((major, Some(u64::from(ai)))),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            31 if matches!(major, 2..=5 | 7) => return Some((major, None)),
            _ => return None,
        };
        let bytes = b.get(*at..*at + n)?;
        *at += n;
        Some((
            major,
            Some(bytes.iter().fold(0u64, |v, x| (v << 8) | u64::from(*x))),
        ))
    }
    fn skip(b: &[u8], at: &mut usize, n: u64) -> Option<()> {
        *at = at
            .checked_add(usize::try_from(n).ok()?)
            .filter(|e| *e <= b.len())?;
        Some(())
    }
    /// Walks one item; Some(found) if well-formed apart from nested chunks.
    fn item(b: &[u8], at: &mut usize, depth: usize) -> Option<bool> {
        let depth = depth.checked_sub(1)?;
        let (mut major, mut arg) = head(b, at)?;
        while major == 6 {
            (major, arg) = head(b, at)?;
        }
        match (major, arg) {
            (0 | 1, _) => Some(false),
            (7, Some(_)) => Some(false),
            (2 | 3, Some(n)) => skip(b, at, n).map(|()| false),
            (2 | 3, None) => string_chunks(b, at, major),
            (4, Some(n)) => (0..n).try_fold(false, |f, _| Some(f | item(b, at, depth)?)),
            (5, Some(n)) => {
                (0..n.checked_mul(2)?).try_fold(false, |f, _| Some(f | item(b, at, depth)?))
            }
            (4 | 5, None) => {
                let mut found = false;
                while *b.get(*at)? != 0xff {
                    found |= item(b, at, depth)?;
                }
                *at += 1;
                Some(found)
            }
            _ => None,
        }
    }
    /// The chunks of an indefinite string of `major`, up to and with its break. Counts nested
    /// strings as ciborium does (no recursion: they may nest a million deep).
    fn string_chunks(b: &[u8], at: &mut usize, major: u8) -> Option<bool> {
        let (mut nested, mut found) = (1usize, false);
        loop {
            match head(b, at)? {
                (7, None) => {
                    nested -= 1;
                    if nested == 0 {
                        return Some(found);
                    }
                }
                (m, Some(n)) if m == major => skip(b, at, n)?,
                (m, None) if m == major => {
                    nested += 1;
                    found = true;
                }
                _ => return None,
            }
        }
    }
    let mut at = 0;
    item(body, &mut at, 512) == Some(true) && at == body.len()
}

type Frames = (Vec<Vec<u8>>, Result<(), crate::wire::frame::FrameError>);

fn frames_of(stream: &[u8], chunk: usize, max: usize) -> Frames {
    let mut d = FrameDecoder::new(max);
    let mut out = Vec::new();
    for piece in stream.chunks(chunk) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => out.push(f.to_vec()),
                Ok(None) => break,
                Err(e) => return (out, Err(e)),
            }
        }
    }
    (out, d.finish())
}

fn client_request(body: &[u8], cfg: &Config) {
    // ciborium's view of the frame (a value tree: what the service no longer builds), for the
    // cross-checks below.
    let tree = frame::decode_value(body).ok();
    if let Some(v) = &tree {
        let mem = value_bytes(v);
        assert!(
            mem <= std::mem::size_of::<Value>() + DECODED_BYTES_PER_FRAME_BYTE * body.len(),
            "a {}-byte frame decoded into {mem} bytes",
            body.len()
        );
        let again = cbor(v);
        assert!(
            again.len() <= reencoded_bound(body.len()),
            "a {}-byte request re-encodes into {} bytes",
            body.len(),
            again.len()
        );
    }
    // The proxy's one-pass readers of the usual GET/DELETE and PUT/POST: whatever they accept,
    // the general reader reads as the same id and command.
    let fast = client::fast_command(body, cfg.max_pairs_per_request);
    if let Some((id, cmd)) = &fast {
        let req = client::parse_request(body).expect("the fast reader accepted a malformed frame");
        assert_eq!(req.id, *id, "the fast reader read another id");
        let general = client::command_of(req, cfg.max_pairs_per_request)
            .expect("the fast reader accepted a malformed command");
        assert_eq!(&general, cmd, "the fast reader read another command");
    }
    // What the proxy does: read the request in place.
    let req = match client::parse_request(body) {
        Ok(r) => r,
        Err(m) => {
            if m.message.starts_with("request is not one CBOR item") && tree.is_some() {
                // ciborium tolerates one thing RFC 8949 §3.2.3 forbids: an indefinite-length
                // string as a chunk of an indefinite-length string of its type. Nothing else.
                assert!(
                    nested_indefinite_chunk(body),
                    "ciborium reads a frame the proxy refuses: {m:?}"
                );
            }
            let n = m.message.len();
            let mut out = Vec::new();
            m.response().encode_into(&mut out);
            assert!(out.len() < 128 + n);
            return;
        }
    };
    if !req.op.is_data() {
        assert!(matches!(req.op, Op::Other(_)) || req.op.is_admin());
        return;
    }
    let id = req.id;
    let cmd = match client::command_of(req, cfg.max_pairs_per_request) {
        Ok(c) => c,
        Err(m) => {
            assert_eq!(m.id, Some(id), "a malformed data request loses its id");
            return;
        }
    };
    // Relayed to the servers inside a node message: whatever the proxy accepted must decode
    // there (node frames use ciborium's default recursion limit) and fit a node frame.
    let relay = Relay::Request {
        rid: u64::MAX,
        client: Some(u64::MAX),
        cmd: cmd.clone(),
    };
    let relayed = frame::encode(&relay);
    assert!(relayed.len() <= cfg.node_frame_limit());
    match frame::decode::<Relay>(&relayed[4..]) {
        Ok(Relay::Request { cmd: back, .. }) => assert_eq!(
            cbor(&back),
            cbor(&cmd),
            "the relayed command differs from the one accepted"
        ),
        Ok(other) => panic!("relay decodes as {other:?}"),
        Err(e) => panic!("a request the proxy accepted does not decode at the server: {e}"),
    }
    let limits = cfg.tuple_limits();
    match cmd {
        Command::Put(elems) | Command::Post(elems) => {
            // What a request holds once read: its bytes and one handle per element.
            assert!(
                Command::Put(elems.clone()).mem_bytes()
                    <= 256 + body.len() + elems.len() * std::mem::size_of::<RawItem>()
            );
            let mut space = small_space();
            let cands: Vec<Option<Pair>> = elems
                .iter()
                .map(|v| client::pair_from_raw(v, &limits))
                .collect();
            // Read in place, an element gives the pair its value tree gives.
            for (e, c) in elems.iter().zip(&cands) {
                if let Some(v) = e.to_value() {
                    assert_eq!(c, &space::pair_from_value(&v, &limits), "{e:?}");
                }
            }
            for p in cands.iter().flatten() {
                check_tuple(&split_text(&p.key), &limits).expect("accepted key is well formed");
                check_tuple(&split_text(&p.value), &limits).expect("accepted value is well formed");
            }
            let n = elems.len();
            let (change, rejected) = space.put(cands);
            assert!(rejected.len() <= n && rejected.windows(2).all(|w| w[0] < w[1]));
            let Change::Insert(applied) = change else {
                panic!("put made {change:?}")
            };
            assert_eq!(applied.len() + rejected.len(), n);
            // The answer to a PUT whose every element is rejected echoes them all: it must fit
            // max_response_bytes, which Config::validate only makes max_request_bytes + envelope.
            let mut r = Response::ok(Some(id));
            r.rejected = Some(elems);
            let mut out = Vec::new();
            r.encode_into(&mut out);
            assert!(
                out.len() <= reencoded_bound(body.len()) + RESPONSE_ENVELOPE_BYTES,
                "a {}-byte PUT is echoed in a {}-byte answer",
                body.len(),
                out.len()
            );
        }
        Command::Get { key, value, .. } | Command::Delete { key, value, .. } => {
            let lim = cfg.pattern_limits();
            if let (Ok(k), Ok(v)) = (Pattern::compile(&key, &lim), Pattern::compile(&value, &lim)) {
                check_space_query(&small_space(), &k, &v);
            }
        }
        Command::Count => panic!("a client request was read as the proxy's internal COUNT"),
    }
}

fn small_space() -> Space {
    ["a,1", "a,2", "b", "user,1", "user,10", "日本,٣"]
        .iter()
        .map(|k| (k.to_string(), format!("v,{k}")))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// node_message

/// One node frame body, decoded as every message type a node link carries; whatever decodes
/// must round-trip.
pub fn node_message(data: &[u8]) {
    fn one<T: Serialize + DeserializeOwned>(data: &[u8], what: &str) {
        if let Ok(m) = frame::decode::<T>(data) {
            round_trips(&m, what);
        }
    }
    one::<StreamKind>(data, "StreamKind");
    one::<ToProxy>(data, "ToProxy");
    one::<ToServer>(data, "ToServer");
    one::<Relay>(data, "Relay");
    one::<RelayReply>(data, "RelayReply");
    one::<RelayAnswer>(data, "RelayAnswer");
    // The in-place readers agree with serde whenever both read the bytes.
    if let (Ok(a), Ok(b)) = (
        Relay::read(&bytes::Bytes::copy_from_slice(data)),
        frame::decode::<Relay>(data),
    ) {
        assert_eq!(a, b, "Relay::read and serde disagree");
    }
    if let (Ok(a), Ok(b)) = (
        RelayAnswer::read(&bytes::Bytes::copy_from_slice(data)),
        frame::decode::<RelayAnswer>(data),
    ) {
        assert_eq!(a, b, "RelayAnswer::read and serde disagree");
    }
    one::<Repl>(data, "Repl");
    one::<ReplAck>(data, "ReplAck");
    one::<Beat>(data, "Beat");
}

// ---------------------------------------------------------------------------------------------
// log_loader and snapshot_loader

/// Flag bit: recompute the checksum of every frame before use, so that mutations reach the
/// record decoder and the replay logic instead of stopping at a checksum mismatch.
pub const FIX_CHECKSUMS: u8 = 1;
/// Flag bit (`log_loader`): put a complete base copy in segment 0 before the fuzzed segment.
pub const BASE_FIRST: u8 = 2;

/// Sets the checksum of every whole `[len][crc][payload]` frame in `data`.
fn fix_checksums(data: &mut [u8]) {
    let mut at = 0;
    while at + 8 <= data.len() {
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|e| *e <= data.len()) else {
            return;
        };
        let crc = crc32fast::hash(&data[at + 8..end]);
        data[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// Reads every frame of `data` as `T`: offsets advance, end where they should, and every record
/// re-encodes into a frame that reads back the same.
fn read_frames<T: Serialize + DeserializeOwned>(data: &[u8], max_frame: usize) -> u64 {
    let mut r = FrameReader::new(data, max_frame);
    let mut last = 0;
    loop {
        match r.read::<T>() {
            Ok(rec) => {
                assert!(r.offset() > last && r.offset() <= data.len() as u64);
                last = r.offset();
                let mut buf = Vec::new();
                durable::encode_frame(&rec, &mut buf);
                let back: T = FrameReader::new(&buf[..], max_frame)
                    .read()
                    .expect("a record we encoded reads back");
                let mut again = Vec::new();
                durable::encode_frame(&back, &mut again);
                assert_eq!(buf, again, "record changed by encode -> read -> encode");
            }
            Err(FrameEnd::Eof) => {
                // The end of the data, or nothing but zeros after the last frame (the rest of a
                // preallocated segment).
                assert!(data[last as usize..].iter().all(|b| *b == 0));
                return last;
            }
            Err(FrameEnd::Torn { offset } | FrameEnd::Corrupt { offset, .. }) => {
                assert_eq!(offset, last);
                assert!(offset < data.len() as u64);
                return last;
            }
        }
    }
}

/// Empties `scratch` and makes `<scratch>/root/replica-0`; returns (root, replica dir).
fn fresh_root(scratch: &Path) -> (PathBuf, PathBuf) {
    let root = scratch.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root).expect("scratch directory can be emptied");
    }
    let dir = root.join(format!("{}0", durable::REPLICA_PREFIX));
    std::fs::create_dir_all(&dir).expect("scratch directory can be created");
    (root, dir)
}

/// What a recovered copy holds, comparable even with NaNs in dedupe replies.
fn summary(r: &Recovered) -> (PathBuf, Position, bool, Space, Vec<u8>) {
    let dedupe: Vec<(&u64, &Reply)> = r.copy.dedupe.iter().collect();
    (
        r.copy.dir.clone(),
        r.copy.pos,
        r.copy.base,
        r.copy.space.clone(),
        cbor(&dedupe),
    )
}

/// Recovers from `root`, then again: the second recovery finds a clean log (the first cut it at
/// the last good record) and the very same copy.
fn recover_twice(root: &Path, dir: &Path, cfg: &Config) -> Result<(), DurableError> {
    let max_frame = durable::max_frame(cfg);
    let max_dedupe = cfg.max_dedupe_entries;
    let Some(first) = recover::recover(root, max_frame, max_dedupe)? else {
        return Ok(());
    };
    assert_eq!(first.copy.dir, dir);
    assert!(first.copy.base, "an incomplete copy was recovered");
    let one = summary(&first);
    drop(first);
    let second = recover::recover(root, max_frame, max_dedupe)
        .expect("a copy recovered once recovers again")
        .expect("a copy recovered once is found again");
    assert_eq!(
        second.copy.cut, None,
        "the log was not cut at the last good record: the second recovery cuts it again"
    );
    assert!(
        one == summary(&second),
        "a second recovery gives another copy"
    );
    Ok(())
}

/// A log segment: `data[0]` holds flags ([`FIX_CHECKSUMS`], [`BASE_FIRST`]), the rest is the
/// segment, read in memory and then recovered from a replica directory (twice).
pub fn log_loader(data: &[u8], scratch: &Path) {
    let cfg = Config::default();
    let Some((&flags, log)) = data.split_first() else {
        return;
    };
    let mut log = log.to_vec();
    if flags & FIX_CHECKSUMS != 0 {
        fix_checksums(&mut log);
    }
    read_frames::<Record>(&log, durable::max_frame(&cfg));
    let (root, dir) = fresh_root(scratch);
    let mut first = 0;
    if flags & BASE_FIRST != 0 {
        let mut base = Vec::new();
        for r in base_copy(1, 0) {
            durable::encode_frame(&r, &mut base);
        }
        std::fs::write(dir.join(durable::segment_name(0)), base).expect("scratch is writable");
        first = 1;
    }
    std::fs::write(dir.join(durable::segment_name(first)), &log).expect("scratch is writable");
    // No snapshot here: nothing but the log can make recovery fail.
    recover_twice(&root, &dir, &cfg).expect("recovery from a log fails only on I/O errors");
}

/// `data[0]` holds flags ([`FIX_CHECKSUMS`]); the rest is loaded as a JSON save file
/// (`load_snapshot`, as SAVE_FILE / INIT_FILE) and as a replica directory's `snapshot` file.
pub fn snapshot_loader(data: &[u8], scratch: &Path) {
    let cfg = Config::default();
    let Some((&flags, file)) = data.split_first() else {
        return;
    };
    let (root, dir) = fresh_root(scratch);
    // The JSON save file.
    let json = root.join("save.json");
    std::fs::write(&json, file).expect("scratch is writable");
    let limits = cfg.tuple_limits();
    match space::load_snapshot(&json, &limits) {
        Ok(space) => {
            for (k, v) in space.iter() {
                check_tuple(&split_text(k), &limits).expect("loaded key is well formed");
                check_tuple(&split_text(v), &limits).expect("loaded value is well formed");
            }
            let again = root.join("again.json");
            space::save_snapshot(&again, &space).expect("scratch is writable");
            let back = space::load_snapshot(&again, &limits).expect("a saved space loads");
            assert_eq!(back, space, "save -> load changed the space");
        }
        Err(SnapshotError::Syntax { line, .. } | SnapshotError::Invalid { line, .. }) => {
            let lines = file.iter().filter(|b| **b == b'\n').count() + 1;
            assert!(line <= lines, "error on line {line} of a {lines}-line file");
        }
        Err(e) => panic!("unexpected error loading a save file: {e}"),
    }
    // The replica snapshot.
    let mut snap = file.to_vec();
    if flags & FIX_CHECKSUMS != 0 {
        fix_checksums(&mut snap);
    }
    read_frames::<SnapRecord>(&snap, durable::max_frame(&cfg));
    std::fs::write(dir.join(SNAPSHOT_FILE), &snap).expect("scratch is writable");
    match recover_twice(&root, &dir, &cfg) {
        Ok(()) | Err(DurableError::Snapshot { .. }) => {}
        Err(e) => panic!("unexpected error recovering from a snapshot: {e}"),
    }
}

/// The records of a base copy of two pairs at (`epoch`, `seq`).
fn base_copy(epoch: u64, seq: u64) -> Vec<Record> {
    vec![
        Record::Reset,
        Record::Pairs(vec![("a".into(), "1".into()), ("b,c".into(), "2".into())]),
        Record::Dedupe(vec![(6, Reply::Rejected(vec![]))]),
        Record::Base {
            epoch,
            seq,
            dedupe: vec![(7, Reply::Rejected(vec![]))],
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// pattern

fn covers(hint: &IndexHint, text: &str) -> bool {
    match hint {
        IndexHint::Exact(k) => k == text,
        IndexHint::AnyOf(ks) => ks.iter().any(|k| k == text),
        IndexHint::Prefix(p) => text.starts_with(p.as_str()),
        IndexHint::Scan => true,
    }
}

/// GET and DELETE on `space` return exactly the pairs a full scan finds.
fn check_space_query(space: &Space, k: &Pattern, v: &Pattern) {
    let expected: Vec<Pair> = space
        .iter()
        .filter(|(key, val)| k.is_match(key) && v.is_match(val))
        .map(|(key, val)| Pair::new(key.clone(), val.clone()))
        .collect();
    assert_eq!(space.get(k, v), expected, "GET misses or adds pairs");
    let mut s = space.clone();
    let (change, removed) = s.delete(k, v);
    assert_eq!(
        removed, expected,
        "DELETE removes other pairs than GET finds"
    );
    assert_eq!(s.len(), space.len() - expected.len());
    assert_eq!(
        change,
        Change::Remove(expected.into_iter().map(|p| p.key).collect())
    );
}

/// `keyexp 0xFF valexp 0xFF text 0xFF text ...` (0xFF never occurs in UTF-8): both patterns are
/// compiled; each must agree with a plain anchored regex where one can be built, never hint
/// away a text it matches, and GET/DELETE over a space of the texts must equal a full scan.
pub fn pattern(data: &[u8]) {
    let cfg = Config::default();
    let lim = cfg.pattern_limits();
    let mut parts = data
        .split(|b| *b == 0xff)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let key_src = parts.next().unwrap_or_default();
    let val_src = parts.next().unwrap_or_else(|| ".*".into());
    let texts: Vec<String> = parts.collect();
    let compile = |src: &str| -> Option<Pattern> {
        let p = Pattern::compile(src, &lim).ok()?;
        assert_eq!(p.source(), src);
        // The reference: the regex crate anchoring the pattern itself. Python's `\Z` and `(?x)`
        // comments (`#`) are where compile() must do more than this; skip them.
        let reference = (!src.contains(r"\Z") && !src.contains('#'))
            .then(|| {
                regex::RegexBuilder::new(&format!(r"\A(?:{src})\z"))
                    .size_limit(lim.regex_size_limit)
                    .dfa_size_limit(lim.regex_size_limit)
                    .build()
                    .ok()
            })
            .flatten();
        for t in texts.iter().map(String::as_str).chain(["", "a", "a,1"]) {
            let m = p.is_match(t);
            if let Some(r) = &reference {
                assert_eq!(m, r.is_match(t), "{src:?} on {t:?}: differs from the regex");
            }
            if m {
                assert!(
                    covers(p.hint(), t),
                    "{src:?}: hint {:?} excludes {t:?}",
                    p.hint()
                );
            }
        }
        Some(p)
    };
    let (Some(k), Some(v)) = (compile(&key_src), compile(&val_src)) else {
        return;
    };
    let n = texts.len();
    let space: Space = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), texts[(i + 1) % n].clone()))
        .collect();
    check_space_query(&space, &k, &v);
}

// ---------------------------------------------------------------------------------------------
// seeds

/// Seed inputs for every target, made by the service's own encoders: `(target, name, bytes)`.
/// `tests/fuzz_corpus.rs` replays them and can write them to `fuzz/corpus/<target>/seed-<name>`.
pub fn seeds(scratch: &Path) -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |t: &'static str, name: &str, bytes: Vec<u8>| out.push((t, name.into(), bytes));
    let text = |s: &str| Value::Text(s.into());
    let tuple = |s: &str| Value::Array(s.split(',').map(text).collect());
    let pair = |k: &str, v: &str| Value::Array(vec![tuple(k), tuple(v)]);

    // client_frame: a chunk-size byte, then a stream of request frames.
    let req = |id: u64, op: &str, args: Option<Value>| {
        frame::encode(&client::request_value(id, op, args))
    };
    let client_seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "get",
            req(
                1,
                "GET",
                Some(Value::Array(vec![text(r"user,\d+"), text(".*")])),
            ),
        ),
        (
            "get-exact",
            req(
                2,
                "get",
                Some(Value::Array(vec![text("user,1"), text(".*")])),
            ),
        ),
        (
            "put",
            req(
                3,
                "PUT",
                Some(Value::Array(vec![
                    pair("user,1", "alice"),
                    pair("user,2", "bob,x"),
                    text("junk"),
                    pair("日本,٣", "é"),
                ])),
            ),
        ),
        (
            "post",
            req(4, "post", Some(Value::Array(vec![pair("user,1", "carol")]))),
        ),
        (
            "delete",
            req(
                5,
                "DELETE",
                Some(Value::Array(vec![text("user,2"), text(".*")])),
            ),
        ),
        ("status", req(6, "STATUS", None)),
        ("shutdown", req(7, "shutdown", None)),
        ("other", req(8, "FROB", Some(Value::Integer(3.into())))),
        (
            "no-op",
            frame::encode(&Value::Map(vec![(text("id"), Value::Integer(9.into()))])),
        ),
        (
            "mixed-values",
            req(
                10,
                "PUT",
                Some(Value::Array(vec![
                    Value::Float(1.5),
                    Value::Bytes(vec![1, 2, 3]),
                    Value::Tag(2, Box::new(Value::Bytes(vec![1; 17]))),
                    Value::Map(vec![(Value::Null, Value::Bool(true))]),
                    Value::Integer((-5).into()),
                ])),
            ),
        ),
    ];
    let mut stream = Vec::new();
    for (name, f) in &client_seeds {
        add("client_frame", name, [&[0u8][..], f].concat());
        stream.extend_from_slice(f);
    }
    add(
        "client_frame",
        "stream-in-7-byte-reads",
        [&[7u8][..], &stream].concat(),
    );

    // node_message: one frame body of each message.
    let info = ReplicaInfo {
        handle: "1234".into(),
        sap: "127.0.0.1:7410".into(),
        pid: 1234,
    };
    let pairs = vec![Pair::new("user,1", "alice"), Pair::new("b", "x,y")];
    let reply = Reply::Pairs {
        pairs: pairs.clone(),
        message: Some("m".into()),
    };
    let fixed: Vec<(&str, Vec<u8>)> = vec![
        ("stream-control", cbor(&StreamKind::Control)),
        ("stream-relay", cbor(&StreamKind::Relay { epoch: 3 })),
        (
            "hello",
            cbor(&ToProxy::Hello {
                role: Role::Backup,
                epoch: 2,
                info: info.clone(),
                primary: Some("99".into()),
            }),
        ),
        (
            "heartbeat",
            cbor(&ToProxy::Heartbeat {
                epoch: 2,
                info: info.clone(),
                pairs: 10,
                synced_backup: Some("1235".into()),
                echo: 4,
                lag: Some(0),
            }),
        ),
        ("peer-lost", cbor(&ToProxy::PeerLost { epoch: 2 })),
        (
            "shutdown-done",
            cbor(&ToProxy::ShutdownDone {
                saved: Some("data/space.json".into()),
                pairs: 3,
            }),
        ),
        (
            "welcome",
            cbor(&ToServer::Welcome {
                role: Role::Primary,
                epoch: 1,
            }),
        ),
        (
            "heartbeat-ack",
            cbor(&ToServer::HeartbeatAck { epoch: 1, n: 7 }),
        ),
        ("grant", cbor(&ToServer::Grant { epoch: 5 })),
        ("fence", cbor(&ToServer::Fence { epoch: 5 })),
        ("shutdown", cbor(&ToServer::Shutdown)),
        ("watermark", cbor(&Relay::Watermark(77))),
        ("client-gone", cbor(&Relay::ClientGone { client: 7 })),
        (
            "relay-reply",
            cbor(&RelayReply {
                rid: 9,
                reply: reply.clone(),
            }),
        ),
        (
            "relay-reply-rejected",
            cbor(&RelayReply {
                rid: 10,
                reply: Reply::Rejected(vec![
                    RawItem::from_value(&text("junk")),
                    RawItem::from_value(&Value::Float(f64::NAN)),
                ]),
            }),
        ),
        (
            "relay-reply-too-large",
            cbor(&RelayReply {
                rid: 11,
                reply: Reply::TooLarge("too large".into()),
            }),
        ),
        (
            "repl-hello",
            cbor(&Repl::Hello {
                epoch: 3,
                primary: info.clone(),
            }),
        ),
        (
            "repl-snapshot",
            cbor(&Repl::Snapshot {
                pairs: vec![("a".into(), "1".into()), ("b".into(), "2,3".into())],
            }),
        ),
        (
            "repl-snapshot-done",
            cbor(&Repl::SnapshotDone {
                seq: 4,
                dedupe: vec![(1, Reply::Malformed("bad".into())), (2, reply.clone())],
            }),
        ),
        (
            "repl-dedupe",
            cbor(&Repl::Dedupe(vec![(
                3,
                Reply::Rejected(vec![RawItem::from_value(&text("junk"))]),
            )])),
        ),
        ("repl-stop", cbor(&Repl::Stop)),
        (
            "repl-update",
            cbor(&Repl::Update {
                seq: 5,
                rid: 12,
                change: Change::Replace(pairs.clone()),
                reply: Reply::Rejected(vec![]),
            }),
        ),
        ("repl-watermark", cbor(&Repl::Watermark(3))),
        (
            "repl-synced",
            cbor(&ReplAck::Synced {
                seq: 5,
                handle: "1235".into(),
            }),
        ),
        ("repl-ack", cbor(&ReplAck::Ack { seq: 5 })),
        (
            "ping",
            cbor(&Beat::Ping {
                epoch: 1,
                n: 2,
                received: 3,
            }),
        ),
        ("pong", cbor(&Beat::Pong { epoch: 1, n: 2 })),
        ("terminate", cbor(&Beat::Terminate { epoch: 4 })),
    ];
    let mut node: Vec<(String, Vec<u8>)> =
        fixed.into_iter().map(|(n, b)| (n.to_owned(), b)).collect();
    for (name, f) in &client_seeds {
        if let Ok(r) = client::parse_request(&f[4..])
            && let Ok(cmd) = client::command_of(r, 100)
        {
            let relay = Relay::Request {
                rid: 1,
                client: Some(2),
                cmd,
            };
            node.push((format!("relay-{name}"), cbor(&relay)));
        }
    }
    for (name, bytes) in node {
        add("node_message", &name, bytes);
    }

    // log_loader: a real log (base copy, changes, epochs), plain and with checksums to fix.
    let mut log = Vec::new();
    let mut records = base_copy(1, 0);
    records.extend([
        Record::Change {
            epoch: 1,
            seq: 1,
            rid: 1,
            change: Change::Insert(pairs.clone()),
            reply: Reply::Rejected(vec![RawItem::from_value(&text("junk"))]),
        },
        Record::Epoch(2),
        Record::Change {
            epoch: 2,
            seq: 2,
            rid: 2,
            change: Change::Remove(vec!["a".into()]),
            reply: reply.clone(),
        },
        Record::Change {
            epoch: 2,
            seq: 3,
            rid: 3,
            change: Change::Replace(vec![Pair::new("b,c", "3")]),
            reply: Reply::Rejected(vec![]),
        },
    ]);
    for r in &records {
        durable::encode_frame(r, &mut log);
    }
    add("log_loader", "log", [&[0u8][..], &log].concat());
    add(
        "log_loader",
        "log-fix-checksums",
        [&[FIX_CHECKSUMS][..], &log].concat(),
    );
    let mut changes = Vec::new();
    for r in &records[3..] {
        durable::encode_frame(r, &mut changes);
    }
    add(
        "log_loader",
        "changes-after-base",
        [&[BASE_FIRST | FIX_CHECKSUMS][..], &changes].concat(),
    );
    let torn = &log[..log.len() - 3];
    add("log_loader", "torn", [&[0u8][..], torn].concat());

    // snapshot_loader: a JSON save file and a replica snapshot, written by the real writers.
    let mut space = Space::new();
    space.put(pairs.iter().cloned().map(Some).collect());
    space.insert_raw("日本,٣".into(), "é".into());
    let json = scratch.join("seed.json");
    if space::save_snapshot(&json, &space).is_ok()
        && let Ok(bytes) = std::fs::read(&json)
    {
        add("snapshot_loader", "json", [&[0u8][..], &bytes].concat());
    }
    if durable::write_snapshot(
        scratch,
        &space,
        Position { epoch: 3, seq: 9 },
        2,
        vec![(5, reply.clone())],
        0,
    )
    .is_ok()
        && let Ok(bytes) = std::fs::read(scratch.join(SNAPSHOT_FILE))
    {
        add("snapshot_loader", "replica", [&[0u8][..], &bytes].concat());
        add(
            "snapshot_loader",
            "replica-fix-checksums",
            [&[FIX_CHECKSUMS][..], &bytes].concat(),
        );
    }

    // pattern: key pattern, value pattern, texts.
    let join = |parts: &[&str]| {
        let mut v = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                v.push(0xff);
            }
            v.extend_from_slice(p.as_bytes());
        }
        v
    };
    for (name, parts) in [
        (
            "prefix",
            &["user,.*", ".*", "user,1", "user,10", "use", "x"][..],
        ),
        ("digits", &[r"user,\d+", "(?s).*", "user,1", "user,a"]),
        ("alternation", &["a|b|abc", "v.*", "a", "b", "abc", "ab"]),
        ("case", &["(?i)ab,c", "x", "AB,c", "ab,C", "x"]),
        ("python-z", &[r"ab\Z", r"\w+", "ab", "abc"]),
        (
            "verbose",
            &["(?x) a b # comment\n", "[0-9]{1,3}", "ab", "12"],
        ),
        ("unicode", &["日本,.", "é|è", "日本,٣", "é"]),
        ("classes", &[r"[a-z]+,\d{2,}", r"\p{L}+", "abc,123", "ü"]),
        ("exact", &["user,1", ".*", "user,1", "user,2"]),
    ] {
        add("pattern", name, join(parts));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_indefinite_chunks_are_found_and_nothing_else() {
        for (hex, want) in [
            ("7f7fffff", true),
            ("7f61617f6162ffff", true),
            ("5f5f4101ffff", true),
            ("827f7fffff01", true),
            ("a161617f7fffff", true),
            ("c57f7fffff", true),
            ("7f6161ff", false),
            ("7fff", false),
            ("5f7fffff", false),
            ("7f7fffff00", false),
            ("7f7fff", false),
            ("9f7f6161ffff", false),
            ("", false),
        ] {
            let body = hex::decode(hex).unwrap();
            assert_eq!(nested_indefinite_chunk(&body), want, "{hex}");
            if want {
                assert!(frame::decode_value(&body).is_ok(), "ciborium reads {hex}");
            }
        }
    }
}
