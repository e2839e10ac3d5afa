//! Snapshot files: save a [`Space`] as versioned JSON and load it back.
//!
//! The only module of `space` that does I/O, and only synchronous file I/O on
//! the path it is given. Saving must never leave a partial file behind (temp
//! file + fsync + rename) and must stream rather than build the document in
//! memory; loading must never panic on a bad file, and must say where it is
//! bad. Format: docs/SNAPSHOT_FORMAT.md.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use atomic_write_file::AtomicWriteFile;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, Serializer};

use super::store::Space;
use super::tuple::{TupleLimits, check_tuple, text_form};

/// Value of the `format` field.
pub const SNAPSHOT_FORMAT: &str = "tuplespace-snapshot";
/// The only `version` this build reads and writes.
pub const SNAPSHOT_VERSION: u64 = 1;

/// Why a snapshot could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "cannot read snapshot file `{}`: {source}; check the path and its permissions, \
         or pass null to start with an empty space",
        path.display()
    )]
    Read { path: PathBuf, source: io::Error },

    #[error(
        "snapshot file `{}` is not valid JSON at line {line}, column {column}{}: {message}; \
         fix the file or restore a good copy",
        path.display(),
        in_pair(*pair)
    )]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        /// Index of the pair being read, if the error is inside `pairs`.
        pair: Option<usize>,
        message: String,
    },

    #[error(
        "snapshot file `{}` is invalid at line {line}, column {column}{}: {reason}; \
         fix the file or restore a good copy",
        path.display(),
        in_pair(*pair)
    )]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        /// Index (0-based) of the offending pair, if the error is inside `pairs`.
        pair: Option<usize>,
        reason: String,
    },

    #[error(
        "cannot write snapshot file `{}`: {source}; check that its directory exists, is \
         writable and has free space (any previous snapshot there is left unchanged)",
        path.display()
    )]
    Write { path: PathBuf, source: io::Error },
}

fn in_pair(pair: Option<usize>) -> String {
    pair.map(|i| format!(" (pair {i})")).unwrap_or_default()
}

/// Writes `space` to `path` atomically: readers see the old file or the
/// complete new one, never a mix.
pub fn save_snapshot(path: &Path, space: &Space) -> Result<(), SnapshotError> {
    let write_err = |source| SnapshotError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = AtomicWriteFile::open(path).map_err(write_err)?;
    {
        let mut out = BufWriter::with_capacity(1 << 16, &mut file);
        write_document(&mut out, space).map_err(write_err)?;
        out.flush().map_err(write_err)?;
    }
    // Dropping without commit discards the temp file, so any error above
    // leaves the previous snapshot in place. commit() fsyncs, then renames.
    file.commit().map_err(write_err)
}

/// One pair per line so files diff well and load errors point at a line.
fn write_document<W: Write>(out: &mut W, space: &Space) -> io::Result<()> {
    write!(
        out,
        "{{\"format\":\"{SNAPSHOT_FORMAT}\",\"version\":{SNAPSHOT_VERSION},\"pairs\":["
    )?;
    for (i, (key, value)) in space.iter().enumerate() {
        out.write_all(if i == 0 { b"\n" } else { b",\n" })?;
        serde_json::to_writer(&mut *out, &(TextTuple(key), TextTuple(value)))?;
    }
    out.write_all(b"\n]}\n")
}

/// Serializes a text form as its array of elements without allocating them.
struct TextTuple<'a>(&'a str);

impl Serialize for TextTuple<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.split(','))
    }
}

/// Reads a snapshot, checking every tuple against `limits` and rejecting
/// duplicate keys. Pairs may appear in any order.
pub fn load_snapshot(path: &Path, limits: &TupleLimits) -> Result<Space, SnapshotError> {
    let file = File::open(path).map_err(|source| SnapshotError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut state = LoadState {
        limits,
        space: Space::new(),
        pair: None,
        failure: None,
    };
    // Stream from the file: a large snapshot is never held as one buffer.
    let mut de = serde_json::Deserializer::from_reader(BufReader::with_capacity(1 << 16, file));
    let result = DocSeed(&mut state)
        .deserialize(&mut de)
        .and_then(|()| de.end());
    match result {
        Ok(()) => Ok(state.space),
        Err(e) => Err(load_error(path, e, &mut state)),
    }
}

fn load_error(path: &Path, e: serde_json::Error, state: &mut LoadState<'_>) -> SnapshotError {
    let path = path.to_owned();
    let (line, column) = (e.line(), e.column());
    if e.is_io() {
        return SnapshotError::Read {
            path,
            source: e.into(),
        };
    }
    // A semantic failure we raised ourselves carries the precise reason.
    if let Some(f) = state.failure.take() {
        return SnapshotError::Invalid {
            path,
            line,
            column,
            pair: f.pair,
            reason: f.reason,
        };
    }
    let message = strip_position(&e.to_string());
    if e.is_data() {
        SnapshotError::Invalid {
            path,
            line,
            column,
            pair: state.pair,
            reason: message,
        }
    } else {
        SnapshotError::Syntax {
            path,
            line,
            column,
            pair: state.pair,
            message,
        }
    }
}

/// serde_json appends " at line L column C"; we report those separately.
fn strip_position(msg: &str) -> String {
    match msg.rsplit_once(" at line ") {
        Some((head, _)) => head.to_owned(),
        None => msg.to_owned(),
    }
}

struct LoadState<'l> {
    limits: &'l TupleLimits,
    space: Space,
    /// Index of the pair being read while inside `pairs`.
    pair: Option<usize>,
    failure: Option<Failure>,
}

struct Failure {
    pair: Option<usize>,
    reason: String,
}

impl LoadState<'_> {
    /// Records the precise reason and aborts parsing; serde_json adds the
    /// position to the error it returns.
    fn fail<E: de::Error>(&mut self, pair: Option<usize>, reason: String) -> E {
        let err = E::custom(&reason);
        self.failure = Some(Failure { pair, reason });
        err
    }
}

struct DocSeed<'s, 'l>(&'s mut LoadState<'l>);

impl<'de> DeserializeSeed<'de> for DocSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a snapshot object {\"format\":..., \"version\":..., \"pairs\":[...]}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let state = self.0;
        let (mut format, mut version, mut pairs) = (false, false, false);
        while let Some(field) = map.next_key::<String>()? {
            let seen = match field.as_str() {
                "format" => &mut format,
                "version" => &mut version,
                "pairs" => &mut pairs,
                other => {
                    return Err(state.fail(
                        None,
                        format!(
                            "unknown field `{other}` (a version {SNAPSHOT_VERSION} snapshot has \
                             only `format`, `version` and `pairs`)"
                        ),
                    ));
                }
            };
            if std::mem::replace(seen, true) {
                return Err(state.fail(None, format!("field `{field}` appears twice")));
            }
            match field.as_str() {
                "format" => {
                    let value: String = map.next_value()?;
                    if value != SNAPSHOT_FORMAT {
                        return Err(state.fail(
                            None,
                            format!(
                                "`format` is {value:?}, expected {SNAPSHOT_FORMAT:?} (this is \
                                 not a tuplespace snapshot)"
                            ),
                        ));
                    }
                }
                "version" => {
                    let value: u64 = map.next_value()?;
                    if value != SNAPSHOT_VERSION {
                        return Err(state.fail(
                            None,
                            format!(
                                "unsupported version {value} (this build reads version \
                                 {SNAPSHOT_VERSION}; use a matching tuplespace build)"
                            ),
                        ));
                    }
                }
                _ => map.next_value_seed(PairsSeed(state))?,
            }
        }
        for (present, name) in [(format, "format"), (version, "version"), (pairs, "pairs")] {
            if !present {
                return Err(state.fail(None, format!("missing field `{name}`")));
            }
        }
        Ok(())
    }
}

struct PairsSeed<'s, 'l>(&'s mut LoadState<'l>);

impl<'de> DeserializeSeed<'de> for PairsSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for PairsSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of pairs [[key elements], [value elements]]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let state = self.0;
        let mut index = 0usize;
        loop {
            state.pair = Some(index);
            let seed = PairSeed {
                state: &mut *state,
                index,
            };
            if seq.next_element_seed(seed)?.is_none() {
                break;
            }
            index += 1;
        }
        state.pair = None;
        Ok(())
    }
}

/// One pair `[[key elements], [value elements]]`, checked and inserted by its
/// own visitor (with a clear error for other arities, where a plain tuple type
/// would report "trailing characters").
///
/// The checks run here, while serde_json is still at the pair's closing `]`,
/// so the error it returns carries a position on the pair's own line. Raised
/// after the pair was returned, the error would carry the position of whatever
/// follows the pair (the next line, in files written by [`save_snapshot`]).
struct PairSeed<'s, 'l> {
    state: &'s mut LoadState<'l>,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for PairSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for PairSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a pair [[key elements], [value elements]]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let PairSeed { state, index } = self;
        let shape = "a pair must be exactly [[key elements], [value elements]]";
        let key: Vec<String> = seq
            .next_element()?
            .ok_or_else(|| de::Error::custom(shape))?;
        let value: Vec<String> = seq
            .next_element()?
            .ok_or_else(|| de::Error::custom(shape))?;
        // Looks at (but does not consume) the pair's closing `]`.
        if seq.next_element::<IgnoredAny>()?.is_some() {
            return Err(de::Error::custom(shape));
        }
        for (what, elems) in [("key", &key), ("value", &value)] {
            if let Err(e) = check_tuple(elems, state.limits) {
                return Err(state.fail(Some(index), format!("{what}: {e}")));
            }
        }
        let key = text_form(&key);
        if state.space.value_of(&key).is_some() {
            return Err(state.fail(
                Some(index),
                format!("duplicate key `{key}` (each key may appear only once)"),
            ));
        }
        state.space.insert_raw(key, text_form(&value));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::tuple::Pair;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load_text(text: &str) -> Result<Space, SnapshotError> {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "s.json", text);
        load_snapshot(&p, &TupleLimits::default())
    }

    fn sample() -> Space {
        let mut s = Space::new();
        s.put(vec![
            Some(Pair::new("user,1", "alice")),
            Some(Pair::new("user,2", "bob,x")),
            Some(Pair::new("日本,٣", "é")),
        ]);
        s
    }

    #[test]
    fn round_trip_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("snap.json");
        save_snapshot(&p, &sample()).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            "{\"format\":\"tuplespace-snapshot\",\"version\":1,\"pairs\":[\n\
             [[\"user\",\"1\"],[\"alice\"]],\n\
             [[\"user\",\"2\"],[\"bob\",\"x\"]],\n\
             [[\"日本\",\"٣\"],[\"é\"]]\n]}\n"
        );
        assert_eq!(
            load_snapshot(&p, &TupleLimits::default()).unwrap(),
            sample()
        );
        // Overwrite in place with an empty space.
        save_snapshot(&p, &Space::new()).unwrap();
        assert!(
            load_snapshot(&p, &TupleLimits::default())
                .unwrap()
                .is_empty()
        );
    }

    /// The example in docs/SNAPSHOT_FORMAT.md loads, and saving it again
    /// reproduces it byte for byte (the writer is canonical).
    #[test]
    fn documented_example_is_canonical() {
        let doc = include_str!("../../docs/SNAPSHOT_FORMAT.md");
        let start = doc.find("```json\n").unwrap() + "```json\n".len();
        let example = &doc[start..start + doc[start..].find("```").unwrap()];
        let space = load_text(example).unwrap();
        assert_eq!(space.len(), 5);
        assert_eq!(
            space.value_of("user,10").map(String::as_str),
            Some("carol,x")
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("again.json");
        save_snapshot(&p, &space).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), example);
    }

    #[test]
    fn accepts_any_order_and_whitespace() {
        let s = load_text(
            r#" { "pairs" : [ [["b"],["2"]], [["a"],["1"]] ], "version": 1,
                 "format": "tuplespace-snapshot" } "#,
        )
        .unwrap();
        let keys: Vec<_> = s.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
    }

    #[test]
    fn missing_file_names_path() {
        let e = load_snapshot(Path::new("/nonexistent/x.json"), &TupleLimits::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read snapshot file `/nonexistent/x.json`"),
            "{e}"
        );
        assert!(e.contains("pass null"), "{e}");
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let e = load_text("{\"format\":\"tuplespace-snapshot\",\n\"version\":1,\n\"pairs\":[[[\"a\"],[\"b\"]],,]}")
            .unwrap_err();
        match &e {
            SnapshotError::Syntax {
                line, column, pair, ..
            } => {
                assert_eq!(*line, 3);
                assert!(*column > 0);
                assert_eq!(*pair, Some(1));
            }
            other => panic!("expected syntax error, got {other:?}"),
        }
        assert!(e.to_string().contains("line 3"), "{e}");
        let e = load_text("{\"format\":").unwrap_err();
        assert!(matches!(e, SnapshotError::Syntax { .. }), "{e:?}");
        let e = load_text("{\"format\":\"tuplespace-snapshot\",\"version\":1,\"pairs\":[]} x")
            .unwrap_err();
        assert!(matches!(e, SnapshotError::Syntax { .. }), "{e:?}");
    }

    fn invalid(text: &str) -> (Option<usize>, String) {
        match load_text(text) {
            Err(SnapshotError::Invalid { pair, reason, .. }) => (pair, reason),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    const HEAD: &str = "{\"format\":\"tuplespace-snapshot\",\"version\":1,\"pairs\":";

    #[test]
    fn semantic_errors_name_the_pair() {
        let (pair, reason) = invalid(&format!("{HEAD}[[[\"a\"],[\"1\"]],[[\"a\"],[\"2\"]]]}}"));
        assert_eq!(pair, Some(1));
        assert!(reason.contains("duplicate key `a`"), "{reason}");

        let (pair, reason) = invalid(&format!("{HEAD}[[[\"a\"],[\"1\"]],[[\"b-c\"],[\"2\"]]]}}"));
        assert_eq!(pair, Some(1));
        assert!(reason.contains("key: element 0"), "{reason}");

        let (pair, reason) = invalid(&format!("{HEAD}[[[\"a\"],[]]]}}"));
        assert_eq!(pair, Some(0));
        assert!(reason.contains("value: tuple has no elements"), "{reason}");

        let (pair, reason) = invalid(&format!("{HEAD}[[[\"a\"],[\"1\"],[\"x\"]]]}}"));
        assert_eq!(pair, Some(0));
        assert!(reason.contains("exactly"), "{reason}");

        let (pair, reason) = invalid(&format!("{HEAD}[[[\"a\"],[1]]]}}"));
        assert_eq!(pair, Some(0));
        assert!(reason.contains("invalid type"), "{reason}");

        let (pair, _) = invalid(&format!("{HEAD}5}}"));
        assert_eq!(pair, None);
    }

    /// In the layout the saver writes (one pair per line), a semantic error
    /// names the line of the bad pair itself, not the line after it, whether
    /// the pair is followed by another one or is the last.
    #[test]
    fn semantic_error_names_the_line_of_the_bad_pair() {
        let head = format!("{HEAD}[\n");
        for (bad, why) in [
            ("[[\"a-b\"],[\"x\"]]", "key: element 0"),
            ("[[\"b\"],[]]", "value: tuple has no elements"),
            ("[[\"ok\"],[\"w\"]]", "duplicate key `ok`"),
        ] {
            for tail in [",\n[[\"z\"],[\"v\"]]\n]}\n", "\n]}\n"] {
                let text = format!("{head}[[\"ok\"],[\"v\"]],\n{bad}{tail}");
                let e = load_text(&text).unwrap_err();
                match &e {
                    SnapshotError::Invalid {
                        line,
                        column,
                        pair,
                        reason,
                        ..
                    } => {
                        assert_eq!(*line, 3, "{e}");
                        assert!((1..=bad.len()).contains(column), "{e}");
                        assert_eq!(*pair, Some(1), "{e}");
                        assert!(reason.contains(why), "{e}");
                    }
                    other => panic!("expected Invalid, got {other:?}"),
                }
                assert!(e.to_string().contains("line 3, column"), "{e}");
            }
        }
    }

    #[test]
    fn header_errors() {
        let (_, r) = invalid("{\"format\":\"other\",\"version\":1,\"pairs\":[]}");
        assert!(r.contains("not a tuplespace snapshot"), "{r}");
        let (_, r) = invalid("{\"format\":\"tuplespace-snapshot\",\"version\":2,\"pairs\":[]}");
        assert!(r.contains("unsupported version 2"), "{r}");
        let (_, r) = invalid("{\"format\":\"tuplespace-snapshot\",\"pairs\":[]}");
        assert!(r.contains("missing field `version`"), "{r}");
        let (_, r) =
            invalid("{\"format\":\"tuplespace-snapshot\",\"version\":1,\"pairs\":[],\"x\":0}");
        assert!(r.contains("unknown field `x`"), "{r}");
        let (_, r) = invalid(
            "{\"format\":\"tuplespace-snapshot\",\"version\":1,\"version\":1,\"pairs\":[]}",
        );
        assert!(r.contains("twice"), "{r}");
        let (_, r) = invalid("[]");
        assert!(r.contains("invalid type"), "{r}");
        let e = load_text("{\"format\":\"other\",\"version\":1,\"pairs\":[]}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1, column"), "{e}");
    }

    #[test]
    fn limits_apply_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "s.json",
            &format!("{HEAD}[[[\"a\",\"b\",\"c\"],[\"1\"]]]}}"),
        );
        let small = TupleLimits {
            max_arity: 2,
            max_element_bytes: 10,
        };
        let e = load_snapshot(&p, &small).unwrap_err();
        assert!(e.to_string().contains("tuple has 3 elements"), "{e}");
    }

    #[test]
    fn write_error_names_path() {
        let e = save_snapshot(Path::new("/nonexistent/dir/x.json"), &sample())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot write snapshot file `/nonexistent/dir/x.json`"),
            "{e}"
        );
    }
}
