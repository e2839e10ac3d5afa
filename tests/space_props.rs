//! Property tests for the tuple space: the store against a brute-force
//! model, index hints against full scans, snapshot round-trips, and
//! primary/backup replay.
//!
//! Tests only; must never depend on the network or on wall-clock time.

use std::collections::BTreeMap;

use ciborium::Value;
use proptest::prelude::*;
use tuplespace::space::{
    Change, IndexHint, Pair, Pattern, PatternLimits, Space, TupleLimits, check_tuple,
    load_snapshot, pair_from_value, save_snapshot, split_text, text_form, tuple_from_value,
};

// ---------- generators ----------

// `é`/`è` share their first UTF-8 byte and `日`/`旦` their first two, which
// exercises cutting a common prefix back to a char boundary.
const KEY_ELEMS: &[&str] = &["a", "b", "ab", "1", "é", "è", "日", "旦"];
const MULTIBYTE: &[&str] = &["é", "è", "日", "旦"];
const VALUE_ELEMS: &[&str] = &["x", "y", "1"];
const BAD_ELEMS: &[&str] = &["", "a-b", "a,b", " ", "_"];

fn pick(options: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    proptest::sample::select(options).prop_map(str::to_owned)
}

fn key_text() -> impl Strategy<Value = String> + Clone {
    prop::collection::vec(pick(KEY_ELEMS), 1..=3).prop_map(|v| text_form(&v))
}

fn value_text() -> impl Strategy<Value = String> + Clone {
    prop::collection::vec(pick(VALUE_ELEMS), 1..=2).prop_map(|v| text_form(&v))
}

/// Element lists that are usually, but not always, well-formed tuples.
fn raw_tuple(good: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    let elem = prop_oneof![9 => pick(good), 1 => pick(BAD_ELEMS)];
    prop_oneof![
        20 => prop::collection::vec(elem, 1..=3),
        1 => Just(Vec::new()),
    ]
}

fn tuple_value(elems: &[String]) -> Value {
    Value::Array(elems.iter().map(|e| Value::Text(e.clone())).collect())
}

/// A request element as it arrives on the wire, plus what the model thinks
/// it is (`None` = ill-formed).
fn wire_pair() -> impl Strategy<Value = (Value, Option<Pair>)> {
    let shaped = (raw_tuple(KEY_ELEMS), raw_tuple(VALUE_ELEMS)).prop_map(|(k, v)| {
        let expected = if model_well_formed(&k) && model_well_formed(&v) {
            Some(Pair::new(k.join(","), v.join(",")))
        } else {
            None
        };
        (
            Value::Array(vec![tuple_value(&k), tuple_value(&v)]),
            expected,
        )
    });
    prop_oneof![
        20 => shaped,
        1 => Just((Value::Text("junk".into()), None)),
        1 => Just((Value::Array(vec![tuple_value(&["a".into()])]), None)),
    ]
}

/// Independent restatement of the well-formedness rule.
fn model_well_formed(elems: &[String]) -> bool {
    !elems.is_empty()
        && elems.len() <= 64
        && elems
            .iter()
            .all(|e| !e.is_empty() && e.len() <= 4096 && e.chars().all(char::is_alphanumeric))
}

/// Always-valid regexes over the key alphabet, covering literals, classes,
/// repetition and nested alternation.
fn regex_tree() -> impl Strategy<Value = String> {
    let atom = proptest::sample::select(&[
        "a", "b", "ab", "1", "é", "日", ",", ".", r"\d", r"\w", "[ab]", "[a1]", r"\,", "[^a]",
        "[éè]",
    ])
    .prop_map(str::to_owned);
    atom.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4).prop_map(|v| v.concat()),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("(?:{a}|{b})")),
            (
                inner,
                proptest::sample::select(&["*", "+", "?", "{1,2}", "{2}"])
            )
                .prop_map(|(a, op)| format!("(?:{a}){op}")),
        ]
    })
}

/// Key patterns, weighted towards the shapes the index optimises.
fn key_pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => key_text(),
        2 => key_text().prop_map(|k| format!("{k}.*")),
        2 => key_text().prop_map(|k| format!("{k},.*")),
        1 => key_text().prop_map(|k| format!(r"{k},\w+")),
        2 => (key_text(), key_text()).prop_map(|(a, b)| format!("{a}|{b}")),
        1 => (key_text(), key_text()).prop_map(|(a, b)| format!("(?:{a}|{b}),.*")),
        1 => key_text().prop_map(|k| format!("(?i){k}")),
        1 => key_text().prop_map(|k| format!(r"{k}\Z")),
        3 => regex_tree(),
        1 => (regex_tree(), regex_tree()).prop_map(|(a, b)| format!("{a}|{b}")),
        1 => Just(".*".to_owned()),
        2 => (pick(MULTIBYTE), pick(MULTIBYTE), proptest::sample::select(&[".*", ",.*", r"\w*", ""]))
            .prop_map(|(a, b, rest)| format!("(?:{a}|{b}){rest}")),
    ]
}

fn value_pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(".*".to_owned()),
        1 => value_text(),
        1 => Just(r"x.*|\d".to_owned()),
        1 => Just("(?s).*".to_owned()),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Get(String, String),
    Put(Vec<(Value, Option<Pair>)>),
    Post(Vec<(Value, Option<Pair>)>),
    Delete(String, String),
}

fn op() -> impl Strategy<Value = Op> {
    let batch = || prop::collection::vec(wire_pair(), 0..6);
    prop_oneof![
        2 => (key_pattern(), value_pattern()).prop_map(|(k, v)| Op::Get(k, v)),
        4 => batch().prop_map(Op::Put),
        2 => batch().prop_map(Op::Post),
        1 => (key_pattern(), value_pattern()).prop_map(|(k, v)| Op::Delete(k, v)),
    ]
}

// ---------- brute-force model ----------

fn pat(src: &str) -> Pattern {
    Pattern::compile(src, &PatternLimits::default()).unwrap()
}

/// Full-match check via a separately built regex. Rust's `$` without the `m`
/// flag is end of text, i.e. Python's `\Z`.
fn brute(src: &str) -> regex::Regex {
    let translated = src.replace(r"\Z", "$");
    regex::Regex::new(&format!("^(?:{translated})$")).unwrap()
}

fn model_matches(model: &BTreeMap<String, String>, k: &str, v: &str) -> Vec<Pair> {
    let (kr, vr) = (brute(k), brute(v));
    model
        .iter()
        .filter(|(key, val)| kr.is_match(key) && vr.is_match(val))
        .map(|(key, val)| Pair::new(key.clone(), val.clone()))
        .collect()
}

fn decode(batch: &[(Value, Option<Pair>)]) -> Vec<Option<Pair>> {
    let limits = TupleLimits::default();
    batch
        .iter()
        .map(|(v, expected)| {
            let got = pair_from_value(v, &limits);
            assert_eq!(
                &got, expected,
                "pair_from_value disagrees with model for {v:?}"
            );
            got
        })
        .collect()
}

/// What the model does with one PUT/POST batch: applied pairs and rejected
/// indices. `want_present` is false for PUT, true for POST.
fn model_write(
    model: &mut BTreeMap<String, String>,
    batch: Vec<(Value, Option<Pair>)>,
    want_present: bool,
) -> (Vec<Pair>, Vec<usize>) {
    let mut applied = Vec::new();
    let mut rejected = Vec::new();
    for (i, (_, cand)) in batch.into_iter().enumerate() {
        match cand {
            Some(p) if model.contains_key(&p.key) == want_present => {
                model.insert(p.key.clone(), p.value.clone());
                applied.push(p);
            }
            _ => rejected.push(i),
        }
    }
    (applied, rejected)
}

fn space_map(space: &Space) -> BTreeMap<String, String> {
    space.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn populated() -> impl Strategy<Value = Space> {
    prop::collection::btree_map(key_text(), value_text(), 0..40)
        .prop_map(|m| m.into_iter().collect::<Space>())
}

// ---------- properties ----------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (1) Random operation sequences behave exactly like the model, and
    /// (4) replaying every returned Change on a backup tracks the primary.
    #[test]
    fn ops_match_model_and_backup_tracks_primary(ops in prop::collection::vec(op(), 1..30)) {
        let mut space = Space::new();
        let mut backup = Space::new();
        let mut model: BTreeMap<String, String> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Get(k, v) => {
                    prop_assert_eq!(space.get(&pat(&k), &pat(&v)), model_matches(&model, &k, &v));
                }
                Op::Put(batch) => {
                    let (change, rejected) = space.put(decode(&batch));
                    let (applied, model_rejected) = model_write(&mut model, batch, false);
                    prop_assert_eq!(&change, &Change::Insert(applied));
                    prop_assert_eq!(rejected, model_rejected);
                    backup.apply(&change);
                }
                Op::Post(batch) => {
                    let (change, rejected) = space.post(decode(&batch));
                    let (applied, model_rejected) = model_write(&mut model, batch, true);
                    prop_assert_eq!(&change, &Change::Replace(applied));
                    prop_assert_eq!(rejected, model_rejected);
                    backup.apply(&change);
                }
                Op::Delete(k, v) => {
                    let expected = model_matches(&model, &k, &v);
                    for p in &expected {
                        model.remove(&p.key);
                    }
                    let (change, removed) = space.delete(&pat(&k), &pat(&v));
                    prop_assert_eq!(
                        &change,
                        &Change::Remove(expected.iter().map(|p| p.key.clone()).collect())
                    );
                    prop_assert_eq!(removed, expected);
                    backup.apply(&change);
                }
            }
            prop_assert_eq!(space_map(&space), model.clone());
            prop_assert_eq!(&backup, &space);
        }
    }

    /// (2) A GET through the index hint returns exactly what a full scan with
    /// the same pattern (and with an independently built regex) returns.
    #[test]
    fn hinted_get_equals_full_scan(space in populated(), extra in key_text(), src in key_pattern()) {
        let mut space = space;
        // Make sure literal-ish patterns have something to hit sometimes.
        space.insert_raw(extra, "x".to_owned());
        let p = pat(&src);
        let any = pat(".*");
        let hinted = space.get(&p, &any);
        let scanned: Vec<Pair> = space
            .iter()
            .filter(|(k, _)| p.is_match(k))
            .map(|(k, v)| Pair::new(k.clone(), v.clone()))
            .collect();
        prop_assert_eq!(&hinted, &scanned, "hint {:?} for {}", p.hint(), src);
        let reference = brute(&src);
        let independent: Vec<Pair> = space
            .iter()
            .filter(|(k, _)| reference.is_match(k))
            .map(|(k, v)| Pair::new(k.clone(), v.clone()))
            .collect();
        prop_assert_eq!(&hinted, &independent);
        // The hint itself must cover every match.
        for pair in &scanned {
            let covered = match p.hint() {
                IndexHint::Exact(k) => &pair.key == k,
                IndexHint::AnyOf(ks) => ks.contains(&pair.key),
                IndexHint::Prefix(pre) => pair.key.starts_with(pre.as_str()),
                IndexHint::Scan => true,
            };
            prop_assert!(covered, "hint {:?} misses {}", p.hint(), pair.key);
        }
    }

    /// (3) save -> load reproduces the space exactly.
    #[test]
    fn snapshot_round_trip(space in populated()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        save_snapshot(&path, &space).unwrap();
        let loaded = load_snapshot(&path, &TupleLimits::default()).unwrap();
        prop_assert_eq!(loaded, space);
    }

    /// Text form is a bijection on well-formed tuples, and the CBOR decoder
    /// agrees with `check_tuple`.
    #[test]
    fn text_form_bijection(elems in raw_tuple(KEY_ELEMS)) {
        let limits = TupleLimits::default();
        let ok = check_tuple(&elems, &limits).is_ok();
        prop_assert_eq!(ok, model_well_formed(&elems));
        let decoded = tuple_from_value(&tuple_value(&elems), &limits);
        prop_assert_eq!(decoded.is_some(), ok);
        if ok {
            let text = text_form(&elems);
            prop_assert_eq!(decoded, Some(text.clone()));
            prop_assert_eq!(split_text(&text), elems);
        }
    }
}

/// Replaying a whole change log twice ends in the same state as once: every
/// change is a set or a remove, so the last one touching a key wins.
#[test]
fn replay_twice_is_harmless() {
    let mut primary = Space::new();
    let mut log = vec![
        primary
            .put(vec![Some(Pair::new("a", "1")), Some(Pair::new("b", "2"))])
            .0,
    ];
    log.push(primary.post(vec![Some(Pair::new("a", "3"))]).0);
    log.push(primary.delete(&pat("b"), &pat(".*")).0);
    let mut backup = Space::new();
    for c in log.iter().chain(log.iter()) {
        backup.apply(c);
    }
    assert_eq!(backup, primary);
}
