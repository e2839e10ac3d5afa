//! Replays the fuzz corpus (`fuzz/corpus/<target>/*`, minimised, committed) and the seeds made by
//! the current encoders through the bodies of the fuzz targets (`tuplespace::fuzzing`), so CI
//! checks every input the fuzzer ever kept without a nightly toolchain. The fuzzer itself:
//! `scripts/fuzz.sh` (docs/SECURITY.md, "Fuzzing").
//!
//! `cargo test --release --test fuzz_corpus -- --ignored write_seeds` (re)writes the seeds into
//! `fuzz/corpus/<target>/seed-<name>`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tuplespace::fuzzing::{self, Scratch, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str) {
    let scratch = Scratch::new(target).unwrap();
    let started = Instant::now();
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "fuzz/corpus/{target} is empty");
    for f in &files {
        let data = std::fs::read(f).unwrap();
        // A failure names the input, which is all one needs to reproduce it with
        // `cargo +nightly fuzz run TARGET FILE`.
        eprintln!("{target}: {}", f.display());
        fuzzing::run(target, &data, scratch.path());
    }
    let seeds = fuzzing::seeds(scratch.path());
    let mine: Vec<_> = seeds.iter().filter(|(t, _, _)| *t == target).collect();
    assert!(!mine.is_empty());
    for (_, name, data) in &mine {
        eprintln!("{target}: seed {name}");
        fuzzing::run(target, data, scratch.path());
    }
    println!(
        "{target}: {} corpus files and {} seeds in {:?}",
        files.len(),
        mine.len(),
        started.elapsed()
    );
}

#[test]
fn client_frame_corpus() {
    replay("client_frame");
}

#[test]
fn node_message_corpus() {
    replay("node_message");
}

#[test]
fn log_loader_corpus() {
    replay("log_loader");
}

#[test]
fn snapshot_loader_corpus() {
    replay("snapshot_loader");
}

#[test]
fn pattern_corpus() {
    replay("pattern");
}

#[test]
fn every_target_is_replayed_and_has_a_fuzz_target() {
    let replayed = [
        "client_frame",
        "node_message",
        "log_loader",
        "snapshot_loader",
        "pattern",
    ];
    assert_eq!(TARGETS, replayed);
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
            .unwrap();
    for t in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{t}\"")),
            "fuzz/Cargo.toml has no [[bin]] {t}"
        );
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/fuzz_targets")
            .join(format!("{t}.rs"));
        assert!(src.exists(), "{} is missing", src.display());
    }
}

/// Writes the seeds into the corpus directories (not a check: run it by hand).
#[test]
#[ignore]
fn write_seeds() {
    let scratch = Scratch::new("seeds").unwrap();
    for (target, name, data) in fuzzing::seeds(scratch.path()) {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    }
}
