//! The deterministic simulator (`tuplespace::sim`) on a bounded number of random seeds, and one
//! named regression run per failure scenario of the failover issue and of the durability layer
//! (each a fixed fault plan with a fixed seed for the rest of the randomness). Every run checks
//! linearizability (no acknowledged write lost, none applied twice, also across restarts from
//! the replicas' logs), one writer per epoch, and liveness after the faults heal. Many more
//! seeds: `tuplespace simulate --seeds 1000000` (docs/FAULTS.md).

use tuplespace::sim::{self, Fault, Plan, Report, SimParams, Target};

fn scripted(seed: u64, faults: Vec<(u64, Fault)>, remote: bool) -> Report {
    scripted_with(seed, &SimParams::default(), faults, remote)
}

fn scripted_with(seed: u64, p: &SimParams, faults: Vec<(u64, Fault)>, remote: bool) -> Report {
    let r = sim::run(seed, p, &Plan::Scripted { faults, remote });
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

/// The proxy's state file takes longer to write than the heartbeat timeout (every write 1.2-1.6x
/// it, under the connect timeout: a stalled disk), and the backup is killed twice: each loss is a new epoch to record, and
/// every action behind it (acknowledgements, welcomes) waits for the write. A slow disk at the
/// proxy is not a cut between it and the replicas: the primary is never deposed, and each new
/// backup is taken in.
#[test]
fn a_proxy_state_file_slower_than_the_heartbeat_timeout_is_not_a_failure() {
    let d = SimParams::default();
    let p = SimParams {
        proxy_disk_delay: (d.heartbeat_timeout * 6 / 5, d.heartbeat_timeout * 8 / 5),
        proxy_slow_disk: (0.0, 0),
        ..d
    };
    assert!(p.proxy_disk_delay.1 < p.connect_timeout);
    for seed in 0..20 {
        let r = scripted_with(
            seed,
            &p,
            vec![
                (1000, Fault::Kill(Target::Backup)),
                (3000, Fault::Kill(Target::Backup)),
            ],
            false,
        );
        assert_eq!(r.failovers, 0, "{}", r.describe());
    }
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

/// Table row 6: primary and backup killed together: an operator restarts a primary from the
/// logs, nothing acknowledged is lost, and the service comes back.
#[test]
fn primary_and_backup_killed_together() {
    let r = scripted(
        6,
        vec![
            (2000, Fault::Kill(Target::Primary)),
            (2000, Fault::Kill(Target::Backup)),
        ],
        false,
    );
    assert!(r.liveness_checked && r.restarts >= 1, "{}", r.describe());
}

/// Without logs (the model before the durability layer), a double kill loses the data: the run
/// is only checked for safety, as before.
#[test]
fn without_logs_the_old_model_still_passes() {
    let p = SimParams {
        logs: false,
        ..SimParams::default()
    };
    let (ran, failures) = sim::run_many(0, 500, 2, &p, 5, &|_| {});
    assert_eq!(ran, 500);
    let text: Vec<String> = failures.iter().map(|(_, r)| r.describe()).collect();
    assert!(failures.is_empty(), "{}", text.join("\n"));
    let r = sim::run(
        6,
        &p,
        &Plan::Scripted {
            faults: vec![
                (2000, Fault::Kill(Target::Primary)),
                (2000, Fault::Kill(Target::Backup)),
            ],
            remote: false,
        },
    );
    assert!(r.ok() && !r.liveness_checked, "{}", r.describe());
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

// ---- the durability layer: power cuts and restarts from the replicas' logs ----

/// A power cut of every host, the proxy's included, under load; the proxy comes back with its
/// state file and an operator restarts a primary from the most advanced copy in the logs: every
/// acknowledged write is there, none is applied twice, and writes succeed again.
#[test]
fn power_cut_of_everything_under_load_then_restart_from_the_logs() {
    let r = scripted(
        21,
        vec![(
            2500,
            Fault::PowerCutAll {
                proxy_after: 400,
                restart_after: 700,
            },
        )],
        false,
    );
    assert!(r.liveness_checked && r.restarts >= 1, "{}", r.describe());
    assert!(r.recoveries.iter().all(|x| x.copy.is_some()));
}

/// A power cut of the host both replicas run on (`up`'s layout), the proxy on another host
/// surviving, under load; then a restart from the logs. (While the proxy keeps the silent
/// primary seated, a new primary is refused: the operator runs `up` again, restarting the proxy
/// with its state file; see `a_primary_restarted_while_the_proxy_keeps_the_dead_one_seated`.)
#[test]
fn power_cut_of_both_replicas_under_load_then_restart_from_the_logs() {
    let r = scripted(22, vec![(2500, Fault::PowerCut(Target::Primary))], false);
    assert!(r.liveness_checked && r.restarts >= 1, "{}", r.describe());
}

/// The primary killed; the backup, on another host, is promoted and its host loses power before
/// it confirms the new epoch (the grant reached it, its log may or may not hold the epoch): the
/// witness reverts the promotion, and an operator restarts a primary from the most advanced
/// copy. (The revert's fresh epoch makes the proxy refuse every copy until its state file is set
/// aside; see `a_reverted_promotion_refuses_every_copy_after_a_power_cut`.)
#[test]
fn power_cut_during_a_promotion() {
    let r = scripted(
        11,
        vec![
            (2000, Fault::Kill(Target::Primary)),
            (2495, Fault::PowerCut(Target::Primary)),
        ],
        true,
    );
    assert!(r.failovers >= 1 && r.restarts >= 1, "{}", r.describe());
    assert!(r.liveness_checked, "{}", r.describe());
}

/// The backup killed, then the primary a moment later, before the witness gave it solo service:
/// the primary's own log is the most advanced copy; restarted from it (with the epoch it
/// recorded, below the one the witness granted while it was dead), it is accepted and serves.
#[test]
fn a_replica_restarting_from_its_own_log() {
    let r = scripted(
        23,
        vec![
            (1500, Fault::Kill(Target::Backup)),
            (1560, Fault::Kill(Target::Primary)),
        ],
        false,
    );
    assert!(r.liveness_checked, "{}", r.describe());
    let first = &r.recoveries[0];
    assert_eq!(first.from, 1, "recovered another copy: {}", r.describe());
    assert!(
        first.copy.is_some_and(|(_, seq)| seq > 0),
        "{}",
        r.describe()
    );
}

/// The model can fail: an executor that counts a log record as held once it is handed to the OS
/// (as `fsync = "never"` does), with power cuts losing what was not synced, loses acknowledged
/// writes, and the checks find it within a few thousand seeds.
#[test]
fn counting_appends_as_durable_before_the_sync_loses_acknowledged_writes() {
    let p = SimParams {
        ack_before_sync: true,
        ..SimParams::default()
    };
    let (_, failures) = sim::run_many(0, 3000, 2, &p, 100, &|_| {});
    assert!(
        failures
            .iter()
            .any(|(_, r)| r.violations.iter().any(|v| v.contains("not linearizable"))),
        "no seed of 3000 lost an acknowledged write: {:?}",
        failures.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    // The same seeds with the real executor are fine.
    for (seed, _) in failures.iter().take(5) {
        let r = sim::run(*seed, &SimParams::default(), &Plan::Random);
        assert!(r.ok(), "{}", r.describe());
    }
}

// ---- protocol problems the simulator found (src/ha), not fixed here: each test fails today ----

/// Two hosts (launch-command mode): the backup is dropped (cut from the proxy), the primary goes
/// on alone at epoch 2 and acknowledges writes, then it is killed. The backup's copy, on the
/// other host, is at epoch 1 (the office epoch: solo grants do not raise it); a primary started
/// from it claims epoch 1 and the witness accepts it (`epoch >= office epoch`), losing the writes
/// acknowledged alone at epoch 2. OPERATIONS.md tells the operator to pick the host with the most
/// advanced copy and says the proxy refuses an older one: it does not.
#[test]
fn a_copy_from_before_a_solo_grant_is_refused() {
    let p = SimParams {
        careful_operator: false,
        ..SimParams::default()
    };
    scripted_with(
        1503,
        &p,
        vec![
            (
                1860,
                Fault::Cut {
                    a: Target::Backup,
                    b: Target::Proxy,
                    one_way: false,
                    ms: 965,
                },
            ),
            (2236, Fault::Kill(Target::Primary)),
        ],
        true,
    );
}

/// Both replicas lose power at once, the proxy lives: it sees the primary lapse a moment before
/// the backup, promotes the backup at epoch 2, then reverts the promotion, giving the office back
/// to the (dead) primary at a fresh epoch 3 (`revert`: office epoch 3). Neither replica ever
/// logged epoch 3, so every copy (epoch 1 or 2) holds every acknowledged write but is refused as
/// deposed, also by a proxy restarted with its state file: the service stays down until the
/// state file is set aside (the operator's last resort in the default parameters).
#[test]
fn a_reverted_promotion_refuses_every_copy_after_a_power_cut() {
    let p = SimParams {
        operator_escalation: 1,
        ..SimParams::default()
    };
    scripted_with(
        105,
        &p,
        vec![(3005, Fault::PowerCut(Target::Primary))],
        false,
    );
}

/// Both replicas die at once, the proxy lives: both heartbeats lapse together, so the witness
/// waits ("more likely our own network") and keeps the dead primary seated; a primary restarted
/// from the logs is refused ("another primary is serving") for as long as the proxy runs.
#[test]
fn a_primary_restarted_while_the_proxy_keeps_the_dead_one_seated() {
    let p = SimParams {
        operator_escalation: 0,
        ..SimParams::default()
    };
    scripted_with(59, &p, vec![(2003, Fault::PowerCut(Target::Backup))], false);
}

/// Both replicas `kill -9`ed (what the log writer had handed to the OS stays in the page cache,
/// unsynced), the proxy restarted, a primary started from the logs at once: recovery replays the
/// unsynced tail of the old segment and counts it as held (`open_data`: `held = c.pos`), the new
/// primary acknowledges writes logged after it in a new segment, and a power cut of the host
/// before the OS writes the old pages back loses that tail: the next recovery finds updates
/// missing at the start of the new segment and cuts the log there, losing acknowledged writes.
/// (Recovery would have to sync the segments it replays before counting them as held.)
#[test]
fn a_power_cut_after_a_restart_loses_writes_acknowledged_after_an_unsynced_tail() {
    let p = SimParams {
        kill_keeps_page_cache: true,
        ..SimParams::default()
    };
    scripted_with(
        21,
        &p,
        vec![
            (2000, Fault::Kill(Target::Primary)),
            (2000, Fault::Kill(Target::Backup)),
            (
                2000,
                Fault::ProxyRestart {
                    after: 30,
                    with_state: true,
                },
            ),
            (2100, Fault::Restart),
            (2126, Fault::PowerCut(Target::Primary)),
        ],
        false,
    );
}
