//! The deterministic simulator (`tuplespace::sim`) on a bounded number of random seeds, and one
//! named regression run per failure scenario of the failover issue (each a fixed fault plan with
//! a fixed seed for the rest of the randomness). Every run checks linearizability (no
//! acknowledged write lost, none applied twice), one writer per epoch, and liveness after the
//! faults heal. Many more seeds: `tuplespace simulate --seeds 1000000` (docs/FAULTS.md).

use tuplespace::sim::{self, Fault, Plan, Report, SimParams, Target};

fn scripted(seed: u64, faults: Vec<(u64, Fault)>, remote: bool) -> Report {
    let r = sim::run(
        seed,
        &SimParams::default(),
        &Plan::Scripted { faults, remote },
    );
    assert!(
        r.ok(),
        "{}\nreplay with the trace: a test calling sim::run with SimParams {{ trace: true, .. }}",
        r.describe()
    );
    assert!(
        r.acknowledged_writes > 50,
        "the run did too little to mean anything: {}",
        r.describe()
    );
    r
}

#[test]
fn random_seeds_bounded_run() {
    let (ran, failures) = sim::run_many(0, 3000, 2, &SimParams::default(), 5, &|_| {});
    assert_eq!(ran, 3000);
    let text: Vec<String> = failures.iter().map(|(_, r)| r.describe()).collect();
    assert!(
        failures.is_empty(),
        "failing seeds (replay: tuplespace simulate --seed N --verbose):\n{}",
        text.join("\n")
    );
}

#[test]
fn the_same_seed_replays_exactly() {
    let p = SimParams {
        trace: true,
        ..SimParams::default()
    };
    let a = sim::run(4242, &p, &Plan::Random);
    let b = sim::run(4242, &p, &Plan::Random);
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.ops, b.ops);
}

/// Table row 1-2: `kill -9` of the proxy, restarted within a second, twice, under load: nothing
/// lost, no request id reused (a reused rid would be answered from a dedupe table with another
/// request's reply: linearizability catches it), nobody fenced, no failover.
#[test]
fn proxy_kill9_and_restart_within_1s_twice() {
    let r = scripted(
        1,
        vec![
            (
                1000,
                Fault::ProxyRestart {
                    after: 800,
                    with_state: true,
                },
            ),
            (
                3500,
                Fault::ProxyRestart {
                    after: 100,
                    with_state: true,
                },
            ),
        ],
        false,
    );
    assert_eq!(r.failovers, 0, "{}", r.describe());
}

/// Table row 3: SIGSTOP of the proxy for 3 s: replicas stay, nobody is fenced.
#[test]
fn proxy_paused_3s() {
    let r = scripted(2, vec![(1500, Fault::Pause(Target::Proxy, 3000))], false);
    assert_eq!(r.failovers, 0, "{}", r.describe());
}

/// The proxy cut from both replicas for 3 s (both ways), then healed.
#[test]
fn proxy_cut_from_both_replicas_3s() {
    let cut = |b| Fault::Cut {
        a: Target::Proxy,
        b,
        one_way: false,
        ms: 3000,
    };
    let r = scripted(
        3,
        vec![(1500, cut(Target::Primary)), (1500, cut(Target::Backup))],
        false,
    );
    assert_eq!(r.failovers, 0, "{}", r.describe());
}

/// Table row 4: the backup paused far longer than every timeout: the primary goes on alone,
/// stops the stale backup once the witness confirms it, and a replacement synchronises.
#[test]
fn backup_paused_long() {
    scripted(4, vec![(1500, Fault::Pause(Target::Backup, 8000))], false);
}

/// Table row 5: the primary paused where the backup was started by a launch command (the old
/// primary is fenced by a terminate message it cannot receive while paused, and holds its SAPs).
#[test]
fn primary_paused_with_launch_command() {
    let r = scripted(5, vec![(1500, Fault::Pause(Target::Primary, 3000))], true);
    assert!(r.failovers >= 1, "{}", r.describe());
}

/// Table row 6: primary and backup killed together: safety holds (liveness needs the durable
/// log of the next issue).
#[test]
fn primary_and_backup_killed_together() {
    let r = sim::run(
        6,
        &SimParams::default(),
        &Plan::Scripted {
            faults: vec![
                (2000, Fault::Kill(Target::Primary)),
                (2000, Fault::Kill(Target::Backup)),
            ],
            remote: false,
        },
    );
    assert!(r.ok(), "{}", r.describe());
    assert!(!r.liveness_checked);
}

/// A proxy restart during a failover.
#[test]
fn proxy_restart_during_a_failover() {
    let r = scripted(
        7,
        vec![
            (1500, Fault::Kill(Target::Primary)),
            (
                1650,
                Fault::ProxyRestart {
                    after: 300,
                    with_state: true,
                },
            ),
        ],
        false,
    );
    assert!(r.failovers >= 1, "{}", r.describe());
}

/// A deposed primary coming back (paused past a failover, then continued).
#[test]
fn deposed_primary_comes_back() {
    let r = scripted(8, vec![(1500, Fault::Pause(Target::Primary, 2500))], false);
    assert!(r.failovers >= 1, "{}", r.describe());
}

/// A second fault during a resync: the new primary killed while its new backup synchronises.
#[test]
fn second_fault_during_resync() {
    let r = sim::run(
        9,
        &SimParams::default(),
        &Plan::Scripted {
            faults: vec![
                (1500, Fault::Kill(Target::Primary)),
                (1840, Fault::Kill(Target::Primary)),
            ],
            remote: false,
        },
    );
    assert!(r.ok(), "{}", r.describe());
}

/// A proxy restarted without its state file and no deposed primary around: still safe and live.
#[test]
fn proxy_restart_without_state_file() {
    scripted(
        10,
        vec![(
            2000,
            Fault::ProxyRestart {
                after: 500,
                with_state: false,
            },
        )],
        false,
    );
}

/// Found by the simulator (seed 565667 of the first million): the primary killed while cut from
/// the proxy one way, the proxy paused right after granting the backup the office. The backup,
/// which never heard the grant, comes back as a backup: it is the office holder all the same.
#[test]
fn the_office_holder_that_missed_its_grant_comes_back_as_a_backup() {
    let r = scripted(
        565_667,
        vec![
            (
                2197,
                Fault::Cut {
                    a: Target::Primary,
                    b: Target::Proxy,
                    one_way: true,
                    ms: 1538,
                },
            ),
            (2434, Fault::Kill(Target::Primary)),
            (2476, Fault::Pause(Target::Proxy, 1053)),
        ],
        false,
    );
    assert!(r.liveness_checked, "{}", r.describe());
}
