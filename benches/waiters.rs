//! The waiter index (`space::waiters`, PROTOCOL.md §4a): what a PUT costs the primary's store
//! (insert into a 100,000-pair space, then find the waiters it satisfies) with no waiting
//! request, with 10,000 waiting takes on distinct literal prefixes (`queue,N,.*`) that it does
//! not satisfy, and with 100 waiting takes without a usable prefix (tested on every write).
//! Issue 13's target: with 10,000 prefixed waiters a PUT costs at most 2x the no-waiter PUT.
//!
//! Run: `cargo bench --bench waiters` (figures in docs/BENCHMARKS.md).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tuplespace::space::waiters::{Action, Waiter, WaiterLimits, Waiters};
use tuplespace::space::{Change, Pair, Pattern, PatternLimits, Space};

fn pat(s: &str) -> Pattern {
    Pattern::compile(s, &PatternLimits::default()).expect("bench pattern compiles")
}

fn take(rid: u64, key: &str) -> Waiter {
    Waiter {
        rid,
        client: rid,
        take: true,
        key: pat(key),
        value: pat(".*"),
        limit: 1,
        deadline: u64::MAX,
    }
}

fn waiters(prefixed: u64, unindexed: u64) -> Waiters {
    let mut w = Waiters::new(WaiterLimits {
        total: 1 << 20,
        per_client: 1 << 20,
    });
    for i in 0..prefixed {
        w.add(take(i, &format!("queue,{i},.*"))).expect("room");
    }
    for i in 0..unindexed {
        w.add(take(prefixed + i, &format!(".*,nomatch{i}")))
            .expect("room");
    }
    assert_eq!(w.len() as u64, prefixed + unindexed);
    assert_eq!(
        w.unindexed() as u64,
        unindexed,
        "prefixed waiters are indexed"
    );
    w
}

/// A PUT of `key` as the primary's store does it: insert, then the waiters of what it wrote.
fn put(space: &mut Space, w: &mut Waiters, key: String) -> Vec<Action> {
    let (change, _) = space.put(vec![Some(Pair::new(key, "payload"))]);
    let mut out = vec![];
    if let Change::Insert(pairs) = &change {
        w.on_write(pairs, &mut out);
    }
    out
}

fn bench(c: &mut Criterion) {
    let space: Space = (0..100_000u64)
        .map(|i| (format!("job,{i}"), format!("value{i}")))
        .collect();

    // The index finds the one waiter a write satisfies, among 10,000.
    let mut w = waiters(10_000, 0);
    let out = put(&mut space.clone(), &mut w, "queue,4321,job".into());
    assert!(
        matches!(&out[..], [Action::Take { rid: 4321, pairs }] if pairs.len() == 1),
        "{out:?}"
    );

    let mut g = c.benchmark_group("put_with_waiters");
    for (name, prefixed, unindexed) in [
        ("none", 0, 0),
        ("10000_prefix", 10_000, 0),
        ("100_unindexed", 0, 100),
    ] {
        let mut w = waiters(prefixed, unindexed);
        let mut n = 0u64;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    n += 1;
                    // `queue,xN,job`: shares the `queue,` prefix with every waiter, satisfies none.
                    (space.clone(), format!("queue,x{n},job"))
                },
                |(mut s, key)| {
                    let out = put(&mut s, &mut w, key);
                    black_box((s, out))
                },
                BatchSize::SmallInput,
            )
        });
        assert_eq!(w.len() as u64, prefixed + unindexed, "no waiter was served");
    }
    g.finish();

    // The same without the copy-on-write clone (which dominates the group above): a PUT of a
    // fresh key into the store's own space, its waiters, then the key removed again (a
    // `Change::Remove` applied, no pattern) so the space stays at 100,000 pairs.
    let mut g = c.benchmark_group("put_remove_with_waiters");
    for (name, prefixed, unindexed) in [
        ("none", 0, 0),
        ("10000_prefix", 10_000, 0),
        ("100_unindexed", 0, 100),
    ] {
        let mut w = waiters(prefixed, unindexed);
        let mut s = space.clone();
        let mut n = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                let key = format!("queue,x{n},job");
                let out = put(&mut s, &mut w, key.clone());
                s.apply(&Change::Remove(vec![key]));
                black_box(out)
            })
        });
        assert_eq!(s.len(), 100_000);
        assert_eq!(w.len() as u64, prefixed + unindexed, "no waiter was served");
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
