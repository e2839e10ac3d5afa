//! Benchmarks for the tuple space on 1,000,000 pairs (`user,N` -> `valueN`):
//! indexed GETs, a full scan, PUT of a fresh key, and snapshot save/load.
//!
//! Benchmarks only; the 1M-pair space is built once, never inside a
//! measured loop.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tuplespace::space::{
    Change, IndexHint, Pair, Pattern, PatternLimits, Space, TupleLimits, load_snapshot,
    save_snapshot,
};

const N: usize = 1_000_000;

fn build() -> Space {
    (0..N)
        .map(|i| (format!("user,{i}"), format!("value{i}")))
        .collect()
}

fn pat(src: &str) -> Pattern {
    Pattern::compile(src, &PatternLimits::default()).expect("bench pattern compiles")
}

fn bench_space(c: &mut Criterion) {
    let mut space = build();
    let any = pat(".*");

    let exact = pat("user,500000");
    assert_eq!(exact.hint(), &IndexHint::Exact("user,500000".into()));
    assert_eq!(space.get(&exact, &any).len(), 1);
    c.bench_function("get_exact_literal_1M", |b| {
        b.iter(|| black_box(space.get(black_box(&exact), &any)))
    });

    // Range scan over the 11 keys starting `user,12345`; 10 match.
    let prefix = pat(r"user,12345\d");
    assert_eq!(prefix.hint(), &IndexHint::Prefix("user,12345".into()));
    assert_eq!(space.get(&prefix, &any).len(), 10);
    c.bench_function("get_prefix_10_of_1M", |b| {
        b.iter(|| black_box(space.get(black_box(&prefix), &any)))
    });

    c.bench_function("compile_pattern_literal", |b| {
        b.iter(|| black_box(pat(black_box("user,500000"))))
    });
    c.bench_function("compile_pattern_prefix", |b| {
        b.iter(|| black_box(pat(black_box(r"user,12345\d"))))
    });

    // Uniquely owned map: the common case between snapshots. Only the PUTs
    // are timed; the keys are removed again afterwards so the map stays 1M.
    c.bench_function("put_fresh_key_1M", |b| {
        b.iter_custom(|iters| {
            let batches: Vec<Vec<Option<Pair>>> = (0..iters)
                .map(|i| vec![Some(Pair::new(format!("fresh,{i}"), "v"))])
                .collect();
            let start = Instant::now();
            for batch in batches {
                black_box(space.put(batch));
            }
            let elapsed = start.elapsed();
            let keys = (0..iters).map(|i| format!("fresh,{i}")).collect();
            space.apply(&Change::Remove(keys));
            elapsed
        })
    });
    assert_eq!(space.len(), N);

    // Right after an O(1) clone (snapshot/resync) every touched node is
    // shared, so the first PUT pays for path copying.
    c.bench_function("put_fresh_key_after_clone_1M", |b| {
        b.iter_batched(
            || space.clone(),
            |mut s| {
                black_box(s.put(vec![Some(Pair::new("fresh,1", "v"))]));
                s
            },
            BatchSize::SmallInput,
        )
    });

    let mut slow = c.benchmark_group("slow_1M");
    slow.sample_size(10);
    let scan = pat(r".*,99999\d");
    assert_eq!(scan.hint(), &IndexHint::Scan);
    slow.bench_function("get_full_scan_1M", |b| {
        b.iter(|| black_box(space.get(black_box(&scan), &any)))
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("snap.json");
    // Written up front so the load bench also works when run on its own.
    save_snapshot(&path, &space).expect("save");
    slow.bench_function("save_snapshot_1M", |b| {
        b.iter(|| save_snapshot(&path, &space).expect("save"))
    });
    slow.bench_function("load_snapshot_1M", |b| {
        b.iter(|| black_box(load_snapshot(&path, &TupleLimits::default()).expect("load")))
    });
    slow.finish();
}

criterion_group!(benches, bench_space);
criterion_main!(benches);
