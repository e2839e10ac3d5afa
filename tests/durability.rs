//! Durability under crashes and power cuts, with real processes: `tuplespace up` with the shipped
//! configuration in a directory of its own (free loopback ports), `tuplespace nemesis`'s load and
//! checker (run in-process, one history across the restart), and `kill -9`:
//!
//! 1. of the primary and the backup at once; the old proxy and `up` are then stopped and `up`
//!    runs again in the same directory;
//! 2. of every process (`up`, proxy, primary, backup) at once, then `up` again;
//! 3. (2) with the data directory on lazyfs (the `lazyfs` example, a FUSE filesystem that keeps
//!    unsynced writes in memory) and every unsynced write dropped right after the kill — a power
//!    cut: with `fsync = "always"` nothing acknowledged is lost; with `fsync = "never"` writes
//!    *are* lost, which shows the test can fail. Skipped, with the reason printed, where FUSE
//!    cannot be mounted (no /dev/fuse; not root and no fusermount3).
//!
//! and damage to the logs after a `kill -9` of everything: a torn tail (the last record of the
//! newest log segment a few bytes short: zeros where a write into the preallocated segment did
//! not get to) and a flipped byte in the middle of a log, first on one replica's copy
//! (the other, more advanced copy is recovered: nothing is lost), then on both copies (the log is
//! cut at the last good record: the service starts and serves a prefix of the writes). Every
//! damage must be reported by a WARN naming the file and the offset.
//!
//! And a slow disk under the proxy's state file (lazyfs `--fsync-delay-ms`) while the backup is
//! killed: the backup the primary starts meanwhile is kept.
//!
//! Each cut happens once the load has stored at least [`CUT_PAIRS`] pairs (STATUS, polled), so a
//! round cannot pass on an idle service. Tests take a lock and run one at a time.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ciborium::Value;
use common::{
    EXIT_TIMEOUT, Lazyfs, READY_TIMEOUT, UpService, lazyfs_binary, pats, signal, tpair, wait_gone,
};
use nix::sys::signal::Signal;
use tuplespace::config::Config;
use tuplespace::durable::{FrameReader, Record};
use tuplespace::nemesis::runner::{self, Fault, NemesisOptions, NemesisReport};
use tuplespace::wire::client::{ClusterStatus, Status};

/// One test at a time: each runs three or four processes under load, with fsync.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Seconds of nemesis load per round (the cut comes after [`CUT_PAIRS`] pairs, ~2 s in).
const LOAD: Duration = Duration::from_secs(8);
/// Pairs the load must have stored before the cut.
const CUT_PAIRS: u64 = 150;
/// Longest the restarted service may take to acknowledge its first write.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// Rounds of the fsync = "never" power cut that may pass before the test gives up expecting a
/// loss.
const NEVER_ROUNDS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// kill -9 of primary and backup; the old proxy/up stopped; up again.
    Replicas,
    /// kill -9 of up, proxy, primary and backup; up again.
    All,
}

/// What one crash round gave.
struct Round {
    report: NemesisReport,
    recovery: Duration,
    /// The new primary's `recovered the most advanced copy ...` line, if any.
    recovered: Option<String>,
    /// lazyfs's `dropped N unsynced bytes in M files`, for a power cut.
    dropped: Option<String>,
    primary: u32,
    backup: u32,
}

impl Round {
    fn describe(&self) -> String {
        let r = &self.report;
        format!(
            "{}: {} ops ({} ok, {} unknown, {} unavailable), {} fresh inserts acknowledged, lost {}, duplicated {}, not linearizable {}, inconclusive {}; recovery {} ms; recovered: {}; {}; details: {:?}",
            r.verdict,
            r.ops,
            r.ok,
            r.unknown,
            r.failed,
            r.fresh_acked,
            r.lost,
            r.duplicated,
            r.not_linearizable,
            r.inconclusive,
            self.recovery.as_millis(),
            self.recovered.as_deref().unwrap_or("(no copy recovered)"),
            self.dropped.as_deref().unwrap_or("no power cut"),
            r.details
        )
    }

    fn lost_something(&self) -> bool {
        self.report.lost > 0 || self.report.not_linearizable > 0 || self.report.duplicated > 0
    }
}

fn pid_of(status: &ClusterStatus, who: &str) -> u32 {
    status
        .pid_of(who)
        .unwrap_or_else(|| panic!("STATUS has no {who} pid: {status:?}"))
}

/// Polls STATUS until the primary holds at least `n` pairs and has a synchronised backup;
/// returns that STATUS.
async fn wait_pairs(svc: &UpService, n: u64, timeout: Duration) -> ClusterStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let st = svc.status().await;
        let pairs = st.as_ref().and_then(|s| s.pairs).unwrap_or(0);
        if let Some(st) = &st
            && pairs >= n
            && st.backup_synced
        {
            return st.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the load stored only {pairs} pairs in {timeout:?} (want {n}, with a synchronised backup): {st:?}\n{}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `up` in `svc`, waits for a synchronised backup, runs nemesis for [`LOAD`], and at
/// [`CUT_PAIRS`] pairs kills per `scenario` (then drops lazyfs's unsynced writes, if given),
/// starts `up` again and measures how long until a write is acknowledged. The nemesis history
/// spans the restart.
async fn crash_round(
    svc: &mut UpService,
    scenario: Scenario,
    lazy: Option<&mut Lazyfs>,
    round: usize,
) -> Round {
    svc.start();
    let st = svc.wait_ready(READY_TIMEOUT).await;
    let epoch = st.epoch;
    let out = svc.dir().join(format!("nemesis-{round}"));
    let opts = NemesisOptions {
        sap: svc.client_sap.clone(),
        admin_sap: svc.shutdown_sap.clone(),
        certs: svc.certs.clone(),
        duration: LOAD,
        clients: 4,
        keys: 5,
        fault: Fault::None,
        fault_at: Duration::ZERO,
        fault_for: Duration::ZERO,
        fault_cmd: None,
        heal_cmd: None,
        op_timeout: Duration::from_secs(3),
        out,
        timeline_bucket: Duration::from_millis(100),
        takers: 0,
        take_wait: Duration::ZERO,
    };
    let nemesis = tokio::spawn(runner::run(opts, Config::default()));

    // Nemesis keys its pairs by run, so the pairs of earlier rounds count too.
    let before = st.pairs.unwrap_or(0);
    let st = wait_pairs(svc, before + CUT_PAIRS, Duration::from_secs(30)).await;
    let epoch_at_cut = st.epoch;
    if epoch_at_cut != epoch {
        eprintln!("note: a failover before the cut (epoch {epoch} -> {epoch_at_cut})");
    }
    let (primary, backup) = (pid_of(&st, "primary"), pid_of(&st, "backup"));
    let up = svc.up_pid();
    let proxy = svc
        .proxy_pid()
        .unwrap_or_else(|| panic!("no proxy child of up {up}\n{}", svc.logs()));

    // The cut: one kill(2) after another, nothing in between.
    let victims: Vec<u32> = match scenario {
        Scenario::Replicas => vec![primary, backup],
        Scenario::All => vec![up, proxy, primary, backup],
    };
    for &p in &victims {
        signal(p, Signal::SIGKILL);
    }
    assert!(
        wait_gone(&[primary, backup], EXIT_TIMEOUT).await,
        "replicas alive after SIGKILL"
    );
    let dropped = match lazy {
        Some(fs) => Some(fs.power_cut().await),
        None => None,
    };
    if scenario == Scenario::Replicas {
        // The operator stops the old `up` (Ctrl-C). With both replicas dead nobody can save:
        // it must stop at once, not after shutdown_timeout_ms (10 s) of waiting for a save.
        signal(up, Signal::SIGINT);
        assert!(
            wait_gone(&[proxy, up], Duration::from_secs(6)).await,
            "the old `up` did not stop within 6 s of SIGINT with both replicas dead\n{}",
            svc.logs()
        );
    }
    svc.kill_everything().await;

    svc.start();
    let recovery = svc
        .first_write(&format!("probe,{round}"), "after-restart", RECOVERY_LIMIT)
        .await
        .unwrap_or_else(|| {
            panic!(
                "no write acknowledged within {RECOVERY_LIMIT:?} of the restart\n{}",
                svc.logs()
            )
        });
    let report = nemesis
        .await
        .expect("nemesis task")
        .unwrap_or_else(|e| panic!("nemesis failed: {e}\n{}", svc.logs()));
    let recovered = svc
        .log(svc.starts)
        .lines()
        .find(|l| l.contains("recovered the most advanced copy"))
        .map(str::to_owned);
    let r = Round {
        report,
        recovery,
        recovered,
        dropped,
        primary,
        backup,
    };
    eprintln!("{scenario:?} round {round}: {}", r.describe());
    r
}

/// A round with fsync = "always" (the shipped default) must lose nothing and recover a copy.
fn assert_nothing_lost(r: &Round, svc: &UpService) {
    let rep = &r.report;
    assert!(
        rep.verdict == "PASS"
            && rep.lost == 0
            && rep.duplicated == 0
            && rep.not_linearizable == 0
            && rep.inconclusive == 0,
        "{}\n{}",
        r.describe(),
        svc.logs()
    );
    // In-flight inserts (one per client) may be unknown; the rest of what was stored is acked.
    assert!(
        rep.fresh_acked as u64 >= CUT_PAIRS - 10,
        "too few acknowledged inserts for a meaningful round: {}",
        r.describe()
    );
    let line = r.recovered.as_deref().unwrap_or_else(|| {
        panic!(
            "the restarted primary did not recover a copy\n{}",
            svc.logs()
        )
    });
    let update: u64 = line
        .split("update ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no position in `{line}`"));
    assert!(
        update >= CUT_PAIRS,
        "the recovered copy holds only {update} updates: `{line}`"
    );
    assert!(
        line.contains(&format!("-{}", r.primary)) || line.contains(&format!("-{}", r.backup)),
        "recovered neither the primary's nor the backup's copy: `{line}`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_primary_and_backup_then_up_again_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut svc = UpService::new(&[]);
    let r = crash_round(&mut svc, Scenario::Replicas, None, 1).await;
    assert_nothing_lost(&r, &svc);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_every_process_then_up_again_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut svc = UpService::new(&[]);
    let r = crash_round(&mut svc, Scenario::All, None, 1).await;
    assert_nothing_lost(&r, &svc);
    svc.stop().await;
}

/// lazyfs mounted on the service's data directory, or None (and why, printed) where it cannot be.
async fn lazyfs_for(svc: &UpService, test: &str) -> Option<Lazyfs> {
    let bin = match lazyfs_binary() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
    };
    match Lazyfs::mount(
        &bin,
        &svc.data_dir(),
        &svc.dir().join("lazyfs-backing"),
        &svc.dir().join("lazyfs.log"),
    )
    .await
    {
        Ok(fs) => Some(fs),
        Err(why) => {
            eprintln!("SKIPPED {test}: lazyfs cannot mount here: {why}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_on_lazyfs_with_fsync_always_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut svc = UpService::new(&["fsync=\"always\""]);
    let Some(mut fs) =
        lazyfs_for(&svc, "power_cut_on_lazyfs_with_fsync_always_loses_nothing").await
    else {
        return;
    };
    let r = crash_round(&mut svc, Scenario::All, Some(&mut fs), 1).await;
    assert_nothing_lost(&r, &svc);
    svc.stop().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_on_lazyfs_with_fsync_never_loses_writes() {
    let _serial = SERIAL.lock().await;
    let mut svc = UpService::new(&["fsync=\"never\""]);
    let Some(mut fs) = lazyfs_for(&svc, "power_cut_on_lazyfs_with_fsync_never_loses_writes").await
    else {
        return;
    };
    let mut seen = Vec::new();
    for round in 1..=NEVER_ROUNDS {
        let r = crash_round(&mut svc, Scenario::All, Some(&mut fs), round).await;
        let lost = r.lost_something();
        seen.push(r.describe());
        // Whatever was lost, the restarted service serves (the probe write was acknowledged).
        svc.stop().await;
        if lost {
            eprintln!(
                "as expected, fsync = \"never\" lost acknowledged writes at a power cut (round {round})"
            );
            return;
        }
    }
    panic!(
        "fsync = \"never\" on lazyfs lost nothing in {NEVER_ROUNDS} power cuts: the power-cut test cannot tell a missing fdatasync\n{}\n{}",
        seen.join("\n"),
        svc.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// Damaged logs
// ---------------------------------------------------------------------------------------------

/// The replica directory under `root` of process `pid` (`replica-<millis>-<pid>`).
fn replica_dir_of(root: &Path, pid: u32) -> PathBuf {
    std::fs::read_dir(root)
        .expect("data root")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("replica-") && n.ends_with(&format!("-{pid}")))
        })
        .unwrap_or_else(|| panic!("no replica directory of pid {pid} under {}", root.display()))
}

fn replica_dirs(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .expect("data root")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("replica-"))
        })
        .collect();
    v.sort();
    v
}

/// The newest log segment (`wal-<n>`, highest n) of a replica directory.
fn newest_wal(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("replica dir")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let n: u64 = name.strip_prefix("wal-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("no log segment in {}", dir.display()))
}

/// `(offset, payload length)` of every whole frame of a log segment (up to the zeros of its
/// preallocated rest).
fn frames(path: &Path) -> Vec<(u64, u64)> {
    let data = std::fs::read(path).expect("read log");
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 8 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 || at + 8 + len > data.len() {
            break;
        }
        out.push((at as u64, len as u64));
        at += 8 + len;
    }
    out
}

/// The records of a log segment up to its first bad frame.
fn records(path: &Path) -> Vec<Record> {
    let f = std::fs::File::open(path).expect("open log");
    let mut r = FrameReader::new(std::io::BufReader::new(f), 1 << 30);
    let mut v = Vec::new();
    while let Ok(rec) = r.read::<Record>() {
        v.push(rec);
    }
    v
}

/// Where the frames of a log segment end.
fn frames_end(path: &Path) -> u64 {
    frames(path).last().map_or(0, |(s, l)| s + 8 + l)
}

/// Zeroes the last `n` bytes of the last record of `path` (a write cut short: in a preallocated
/// segment the bytes it did not reach stay zero); returns where the intact frames end.
fn tear(path: &Path, n: u64) -> u64 {
    let end = frames_end(path);
    let (start, len) = *frames(path).last().expect("a record to tear");
    assert!(len > n, "{} is too short to tear", path.display());
    let mut data = std::fs::read(path).expect("read log");
    eprintln!(
        "tearing {}: records end at {end}, file {} bytes ({})",
        path.display(),
        data.len(),
        if data.len() as u64 > end {
            "preallocated"
        } else {
            "appended"
        }
    );
    data[(end - n) as usize..end as usize].fill(0);
    std::fs::write(path, &data).expect("write log");
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .expect("sync");
    start
}

/// Flips one bit in the payload of the frame holding the middle of `path`'s records; returns
/// that frame's offset (where the log must be cut).
fn flip_mid(path: &Path) -> u64 {
    let mut data = std::fs::read(path).expect("read log");
    let mid = frames_end(path) / 2;
    let (start, len) = frames(path)
        .into_iter()
        .find(|(s, l)| *s <= mid && mid < s + 8 + l)
        .or_else(|| frames(path).last().copied())
        .expect("a frame");
    assert!(len > 0, "empty frame at {start}");
    let at = (start + 8 + len / 2) as usize;
    data[at] ^= 0x20;
    std::fs::write(path, &data).expect("write log");
    start
}

/// `prefix,i = v,i` for every i in `range`, one acknowledged PUT at a time.
async fn put_seq(svc: &UpService, prefix: &str, range: std::ops::Range<u32>) {
    let mut c = svc.client().await;
    for i in range {
        let r = c
            .request(
                "PUT",
                Some(Value::Array(vec![tpair(
                    &format!("{prefix},{i}"),
                    &format!("v,{i}"),
                )])),
            )
            .await
            .unwrap_or_else(|e| panic!("PUT {prefix},{i}: {e}\n{}", svc.logs()));
        assert_eq!(r.status, Status::Ok, "PUT {prefix},{i}: {r:?}");
        assert!(
            r.rejected.as_ref().is_none_or(|x| x.is_empty()),
            "PUT {prefix},{i} rejected: {r:?}"
        );
    }
    c.close();
}

/// The indices i of every `prefix,i` present, checking each holds `v,i`.
async fn present(svc: &UpService, prefix: &str) -> Vec<u32> {
    let mut c = svc.client().await;
    let r = c
        .request("GET", pats(&format!("{prefix},.*"), ".*"))
        .await
        .unwrap_or_else(|e| panic!("GET: {e}\n{}", svc.logs()));
    c.close();
    assert_eq!(r.status, Status::Ok, "GET: {r:?}");
    let mut v: BTreeMap<u32, String> = BTreeMap::new();
    for p in r.pairs.unwrap_or_default() {
        let i: u32 = p
            .key
            .rsplit(',')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unexpected key {}", p.key));
        assert_eq!(p.value, format!("v,{i}"), "wrong value for {}", p.key);
        v.insert(i, p.value);
    }
    v.into_keys().collect()
}

/// The WARN lines of `log` that name `file` (its last two path components) and an offset.
fn warnings_about(log: &str, file: &Path) -> Vec<String> {
    let comps: Vec<_> = file.components().rev().take(2).collect();
    let tail = Path::new(comps[1].as_os_str()).join(comps[0].as_os_str());
    let tail = tail.to_string_lossy().into_owned();
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains(&tail) && l.contains("offset"))
        .map(str::to_owned)
        .collect()
}

/// Prints what recovery said (the damage warnings and the copy it used), for the test output.
fn show_recovery(what: &str, log: &str) {
    for l in log.lines().filter(|l| {
        l.contains("recovered the most advanced copy")
            || (l.contains("WARN") && l.contains("offset"))
            || l.contains("superseded")
    }) {
        eprintln!("{what}: {l}");
    }
}

/// Starts `svc`, waits for a synchronised backup, returns (primary pid, backup pid).
async fn start_ready(svc: &mut UpService) -> (u32, u32) {
    svc.start();
    let st = svc.wait_ready(READY_TIMEOUT).await;
    (pid_of(&st, "primary"), pid_of(&st, "backup"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_is_reported_and_the_other_or_the_cut_copy_recovered() {
    let _serial = SERIAL.lock().await;
    let mut svc = UpService::new(&[]);
    let root = svc.data_root();

    // 1. A torn tail on the primary's copy only: the backup's copy holds every write.
    let (p, _b) = start_ready(&mut svc).await;
    put_seq(&svc, "torn", 0..40).await;
    svc.kill_everything().await;
    let pwal = newest_wal(&replica_dir_of(&root, p));
    let last_is_change = matches!(records(&pwal).last(), Some(Record::Change { .. }));
    let cut_at = tear(&pwal, 3);
    start_ready(&mut svc).await;
    let log = svc.log(svc.starts);
    show_recovery("torn tail on the primary's copy", &log);
    let warns = warnings_about(&log, &pwal);
    assert!(
        warns.iter().any(|w| w.contains("torn")),
        "no WARN naming the torn log {} (cut to {cut_at} bytes):\n{log}",
        pwal.display()
    );
    if last_is_change {
        let rec = log
            .lines()
            .find(|l| l.contains("recovered the most advanced copy"))
            .unwrap_or_else(|| panic!("nothing recovered:\n{log}"));
        assert!(
            !rec.contains(&format!("-{p} ")),
            "the torn copy (one update behind) was recovered instead of the backup's: {rec}"
        );
    }
    assert_eq!(
        present(&svc, "torn").await,
        (0..40).collect::<Vec<_>>(),
        "acknowledged writes missing after recovering from the other copy\n{log}"
    );

    // 2. Torn tails on both copies: the more advanced cut copy is recovered, cut at its last good
    //    record (the write torn off both copies is gone); the service starts and serves.
    put_seq(&svc, "torn", 40..60).await;
    svc.kill_everything().await;
    let wals: Vec<PathBuf> = replica_dirs(&root).iter().map(|d| newest_wal(d)).collect();
    assert!(wals.len() >= 2, "expected two copies: {wals:?}");
    for w in &wals {
        tear(w, 3);
    }
    start_ready(&mut svc).await;
    let log = svc.log(svc.starts);
    show_recovery("torn tails on both copies", &log);
    for w in &wals {
        assert!(
            warnings_about(&log, w).iter().any(|l| l.contains("torn")),
            "no WARN naming the torn log {}:\n{log}",
            w.display()
        );
    }
    assert!(
        log.contains("recovering from"),
        "the recovered copy's cut is not reported:\n{log}"
    );
    let got = present(&svc, "torn").await;
    assert!(
        got == (0..59).collect::<Vec<_>>() || got == (0..60).collect::<Vec<_>>(),
        "after tearing the last record off both copies, expected writes 0..59 (or all 60, if the torn record was not a write): got {got:?}\n{log}"
    );
    assert!(
        svc.first_write("torn,after", "ok", RECOVERY_LIMIT)
            .await
            .is_some(),
        "the service does not serve after the cut\n{log}"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_mid_log_is_reported_and_the_other_or_the_cut_copy_recovered() {
    let _serial = SERIAL.lock().await;
    let mut svc = UpService::new(&[]);
    let root = svc.data_root();

    // 1. One flipped bit in the middle of the primary's log: the backup's copy is recovered.
    let (p, b) = start_ready(&mut svc).await;
    put_seq(&svc, "flip", 0..200).await;
    svc.kill_everything().await;
    let pwal = newest_wal(&replica_dir_of(&root, p));
    let frame = flip_mid(&pwal);
    start_ready(&mut svc).await;
    let log = svc.log(svc.starts);
    show_recovery("flipped byte in the primary's copy", &log);
    let warns = warnings_about(&log, &pwal);
    assert!(
        warns
            .iter()
            .any(|w| w.contains("corrupt") && w.contains(&format!("offset {frame}"))),
        "no WARN naming {} as corrupt at offset {frame}:\n{log}",
        pwal.display()
    );
    let rec = log
        .lines()
        .find(|l| l.contains("recovered the most advanced copy"))
        .unwrap_or_else(|| panic!("nothing recovered:\n{log}"));
    assert!(
        rec.contains(&format!("-{b} ")),
        "expected the backup's intact copy to be recovered: {rec}"
    );
    assert_eq!(
        present(&svc, "flip").await,
        (0..200).collect::<Vec<_>>(),
        "acknowledged writes missing after recovering from the intact copy\n{log}"
    );

    // 2. A flipped bit in the middle of both copies: the log is cut at the bad frame; what is
    //    served is exactly a prefix of the writes, and the service takes new ones.
    put_seq(&svc, "flip", 200..300).await;
    svc.kill_everything().await;
    let flipped: Vec<(PathBuf, u64)> = replica_dirs(&root)
        .iter()
        .map(|d| {
            let w = newest_wal(d);
            let f = flip_mid(&w);
            (w, f)
        })
        .collect();
    assert!(flipped.len() >= 2, "expected two copies: {flipped:?}");
    start_ready(&mut svc).await;
    let log = svc.log(svc.starts);
    show_recovery("flipped bytes in both copies", &log);
    for (w, f) in &flipped {
        assert!(
            warnings_about(&log, w)
                .iter()
                .any(|l| l.contains("corrupt") && l.contains(&format!("offset {f}"))),
            "no WARN naming {} as corrupt at offset {f}:\n{log}",
            w.display()
        );
    }
    let got = present(&svc, "flip").await;
    let k = got.len() as u32;
    assert!(
        got == (0..k).collect::<Vec<_>>() && k < 300,
        "expected a strict prefix of the 300 writes after corrupting both copies, got {got:?}\n{log}"
    );
    assert!(
        svc.first_write("flip,after", "ok", RECOVERY_LIMIT)
            .await
            .is_some(),
        "the service does not serve after the cut\n{log}"
    );
    svc.stop().await;
}

/// The proxy's state file on a slow disk: every fsync takes [`SLOW_FSYNC_MS`] (lazyfs
/// `--fsync-delay-ms`), so each write of the witness's state (file, then directory) takes
/// several heartbeat timeouts, and everything behind it (acknowledgements, welcomes, the grant)
/// waits. The backup is killed: the primary starts a new backup at once, and it synchronises long
/// before the witness's grant for the lost one is on disk. That grant drops only the backup the
/// witness knew; the new one is kept (before the fix the primary took the grant for the loss of
/// its new backup and closed it, and then the next one: found by the simulator). One backup
/// lost, one new epoch, the same primary, no failover, every write acknowledged.
const SLOW_FSYNC_MS: u64 = 700;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_proxy_disk_keeps_the_backup_started_while_the_grant_is_written() {
    let _serial = SERIAL.lock().await;
    let test = "a_slow_proxy_disk_keeps_the_backup_started_while_the_grant_is_written";
    let mut svc = UpService::new(&[]);
    let bin = match lazyfs_binary() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            return;
        }
    };
    let disk = svc.dir().join("proxy-disk");
    let delay = SLOW_FSYNC_MS.to_string();
    let fs = match Lazyfs::mount_with(
        &bin,
        &disk,
        &svc.dir().join("proxy-disk-backing"),
        &svc.dir().join("lazyfs.log"),
        &["--fsync-delay-ms", &delay],
    )
    .await
    {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED {test}: lazyfs cannot mount here: {why}");
            return;
        }
    };
    let cfg = Config::default();
    assert!(
        SLOW_FSYNC_MS > 2 * cfg.heartbeat_timeout_ms && 2 * SLOW_FSYNC_MS < cfg.connect_timeout_ms,
        "the delay must outlast the heartbeat timeout and stay within the connect timeout"
    );
    svc.sets.push(format!(
        "proxy_state_file={:?}",
        disk.join("proxy.state").display().to_string()
    ));
    svc.start();
    let st0 = svc.wait_ready(READY_TIMEOUT).await;
    let (primary, backup) = (pid_of(&st0, "primary"), pid_of(&st0, "backup"));
    put_seq(&svc, "slow", 0..20).await;

    let killed = Instant::now();
    signal(backup, Signal::SIGKILL);
    // The grant (epoch + 1) is written, then a new backup is recorded as synchronised.
    let deadline = killed + Duration::from_secs(30);
    let st1 = loop {
        let st = svc.status().await;
        if let Some(st) = &st
            && st.epoch > st0.epoch
            && st.backup_synced
            && st.pid_of("backup").is_some_and(|b| b != backup)
        {
            break st.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no new synchronised backup 30 s after the kill: {st:?}\n{}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = killed.elapsed();
    // Writes go on through the kept backup.
    put_seq(&svc, "slow", 20..60).await;
    let st2 = svc.status().await.expect("STATUS");
    let log = svc.log(svc.starts);
    eprintln!(
        "{test}: new backup {} recorded synchronised {took:?} after the kill; epoch {} -> {}",
        pid_of(&st1, "backup"),
        st0.epoch,
        st2.epoch
    );
    let dropped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the witness dropped the backup"))
        .collect();
    assert!(
        dropped.is_empty(),
        "the primary dropped a backup on the grant for another: {dropped:?}\n{log}"
    );
    assert_eq!(
        log.matches("event=\"failover\"").count(),
        0,
        "a slow proxy disk is not a failure of the primary\n{log}"
    );
    assert_eq!(pid_of(&st2, "primary"), primary, "{st2:?}\n{log}");
    assert_eq!(
        pid_of(&st2, "backup"),
        pid_of(&st1, "backup"),
        "the new backup was replaced: {st2:?}\n{log}"
    );
    assert_eq!(
        st2.epoch,
        st0.epoch + 1,
        "one backup loss, one epoch: {st2:?}\n{log}"
    );
    assert_eq!(present(&svc, "slow").await, (0..60).collect::<Vec<_>>());
    svc.stop().await;
    drop(fs);
}
