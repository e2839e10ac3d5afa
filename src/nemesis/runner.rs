//! `tuplespace nemesis`: several clients do random operations on a small key set with unique
//! written values while a fault is applied; the history (invoke, complete, result; unknown on
//! timeout) is checked for linearizability per key, and for lost and duplicated writes (every
//! client also inserts fresh keys that must each be applied exactly once). With `takers` > 0,
//! that many more clients take the fresh keys with waiting takes (DELETE, `limit` 1, `wait_ms`:
//! PROTOCOL.md §4a), and the check adds: no pair taken twice, every acknowledged insert either
//! taken or still there, and each take linearizable on its key at the moment it removed the pair
//! (after the insert it returns, before the final read that finds the key gone). Prints a
//! verdict, writes `history.jsonl`, `report.json` and `timeline.svg` (see [`crate::plot`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ciborium::Value;

use crate::wire::client::ClusterStatus;
use serde::Serialize;

use super::checker::{self, Op, OpKind, Outcome};
use crate::client::{Client, Request};
use crate::config::Config;
use crate::net::tls::CertRole;
use crate::plot::{self, Ending, FaultWindow, Sample};
use crate::wire::client::{Response, Status};

/// The fault to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    KillPrimary,
    StopPrimary,
    KillBackup,
    /// Run `fault_cmd` at the fault time and `heal_cmd` after `fault_for`.
    Cmd,
}

impl Fault {
    pub fn parse(s: &str) -> Result<Fault, String> {
        Ok(match s {
            "none" => Fault::None,
            "kill-primary" => Fault::KillPrimary,
            "stop-primary" => Fault::StopPrimary,
            "kill-backup" => Fault::KillBackup,
            "cmd" => Fault::Cmd,
            other => {
                return Err(format!(
                    "unknown fault `{other}`: none, kill-primary, stop-primary, kill-backup, cmd"
                ));
            }
        })
    }
}

#[derive(Clone, Debug)]
pub struct NemesisOptions {
    pub sap: String,
    pub admin_sap: String,
    pub certs: PathBuf,
    pub duration: Duration,
    pub clients: u32,
    pub keys: u32,
    pub fault: Fault,
    pub fault_at: Duration,
    pub fault_for: Duration,
    pub fault_cmd: Option<String>,
    pub heal_cmd: Option<String>,
    /// A request with no answer after this is recorded as unknown.
    pub op_timeout: Duration,
    /// Directory for history.jsonl, report.json and timeline.svg.
    pub out: PathBuf,
    /// Clients that take fresh keys with waiting takes (0: none).
    pub takers: u32,
    /// How long each take waits for a key.
    pub take_wait: Duration,
    /// Width of a bucket of the timeline (operations per second and latency percentiles).
    pub timeline_bucket: Duration,
}

#[derive(Debug, Serialize)]
pub struct NemesisReport {
    pub ops: usize,
    pub ok: usize,
    pub unknown: usize,
    pub failed: usize,
    pub fresh_acked: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub not_linearizable: usize,
    pub inconclusive: usize,
    pub longest_unavailable_ms: u64,
    /// Waiting takes answered with a pair / answered empty (timed out) / without an answer.
    pub takes: usize,
    pub take_timeouts: usize,
    pub take_unknown: usize,
    /// Pairs returned by two takes.
    pub taken_twice: usize,
    pub fault: String,
    pub epoch_before: u64,
    pub epoch_after: u64,
    pub verdict: String,
    pub details: Vec<String>,
}

fn t(s: &str) -> Value {
    Value::Text(s.to_owned())
}
fn tuple(s: &str) -> Value {
    Value::Array(s.split(',').map(t).collect())
}
fn pair(k: &str, v: &str) -> Value {
    Value::Array(vec![tuple(k), tuple(v)])
}
fn patterns(k: &str) -> Value {
    // Keys are plain literals of [a-z0-9,] (and `.*` suffixes): no escaping needed.
    Value::Array(vec![t(k), t(".*")])
}

struct Shared {
    start: Instant,
    stop: AtomicBool,
    /// Prefix of every key this run touches, so runs against the same service never see each
    /// other's data (the checker assumes every key starts absent).
    tag: String,
}

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

#[derive(Default)]
struct ClientLog {
    ops: Vec<Op>,
    fresh: Vec<(String, Outcome)>,
    /// The same inserts as operations (for the check of the takes).
    fresh_ops: Vec<Op>,
    successes: Vec<u64>,
    /// Every operation with its start and end, for the timeline.
    samples: Vec<Sample>,
}

async fn connect(o: &NemesisOptions, cfg: &Config) -> Option<Client> {
    Client::connect(&o.sap, &o.certs, CertRole::Client, cfg)
        .await
        .ok()
}

/// Pause of a client or taker loop after a failed connection attempt, before the next one.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// Connects `conn` if it holds no connection; false (after [`RECONNECT_PAUSE`]) if that failed.
async fn ensure_connected(conn: &mut Option<Client>, o: &NemesisOptions, cfg: &Config) -> bool {
    if conn.is_none() {
        *conn = connect(o, cfg).await;
        if conn.is_none() {
            tokio::time::sleep(RECONNECT_PAUSE).await;
            return false;
        }
    }
    true
}

fn outcome_of(kind: &OpKind, r: &Response) -> Outcome {
    match r.status {
        Status::Ok => match kind {
            OpKind::Get => Outcome::Read(
                r.pairs
                    .as_ref()
                    .and_then(|p| p.first())
                    .map(|p| p.value.clone()),
            ),
            OpKind::Delete => Outcome::Deleted(
                r.pairs
                    .as_ref()
                    .and_then(|p| p.first())
                    .map(|p| p.value.clone()),
            ),
            OpKind::Put(_) | OpKind::Post(_) => {
                if r.rejected.as_ref().is_some_and(|x| !x.is_empty()) {
                    Outcome::Rejected
                } else {
                    Outcome::Applied
                }
            }
        },
        Status::Unavailable => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

async fn client_loop(
    o: Arc<NemesisOptions>,
    cfg: Arc<Config>,
    sh: Arc<Shared>,
    cid: u32,
) -> ClientLog {
    let mut log = ClientLog::default();
    let mut conn: Option<Client> = None;
    let mut rng = (u64::from(cid) + 7).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut seq = 0u64;
    let mut fresh_n = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        if !ensure_connected(&mut conn, &o, &cfg).await {
            continue;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        seq += 1;
        let roll = rng % 100;
        let key = format!("n{},{}", sh.tag, (rng >> 20) % u64::from(o.keys.max(1)));
        let value = format!("c{cid}x{seq}");
        let (op, args, kind, fresh) = if roll < 10 {
            fresh_n += 1;
            let k = format!("u{},{cid},{fresh_n}", sh.tag);
            (
                "PUT",
                Value::Array(vec![pair(&k, &value)]),
                OpKind::Put(value.clone()),
                Some(k),
            )
        } else if roll < 45 {
            ("GET", patterns(&key), OpKind::Get, None)
        } else if roll < 65 {
            (
                "PUT",
                Value::Array(vec![pair(&key, &value)]),
                OpKind::Put(value.clone()),
                None,
            )
        } else if roll < 88 {
            (
                "POST",
                Value::Array(vec![pair(&key, &value)]),
                OpKind::Post(value.clone()),
                None,
            )
        } else {
            ("DELETE", patterns(&key), OpKind::Delete, None)
        };
        let invoke = sh.now();
        let Some(c) = conn.as_mut() else { continue };
        let res = tokio::time::timeout(o.op_timeout, c.request(op, Some(args))).await;
        let (outcome, complete) = match res {
            Ok(Ok(r)) => {
                let oc = outcome_of(&kind, &r);
                if oc == Outcome::Unknown {
                    (oc, None)
                } else {
                    (oc, Some(sh.now()))
                }
            }
            // No answer or a broken connection: it may or may not have been applied.
            _ => {
                conn = None;
                (Outcome::Unknown, None)
            }
        };
        if let Some(c) = complete
            && outcome != Outcome::Failed
        {
            log.successes.push(c);
        }
        log.samples.push(Sample {
            op,
            start_ns: invoke,
            end_ns: complete.unwrap_or_else(|| sh.now()),
            ending: match outcome {
                Outcome::Unknown => Ending::Unknown,
                Outcome::Failed => Ending::Unavailable,
                _ => Ending::Ok,
            },
        });
        if let Some(k) = fresh {
            log.fresh_ops.push(Op {
                id: 0,
                client: cid,
                key: k.clone(),
                kind: kind.clone(),
                invoke_ns: invoke,
                complete_ns: complete,
                outcome: outcome.clone(),
            });
            log.fresh.push((k, outcome.clone()));
        } else {
            log.ops.push(Op {
                id: 0,
                client: cid,
                key,
                kind,
                invoke_ns: invoke,
                complete_ns: complete,
                outcome,
            });
        }
    }
    if let Some(c) = conn {
        c.close();
    }
    log
}

/// What one taker saw.
#[derive(Default)]
struct TakeLog {
    /// (key, value, invoke, complete) of each take answered with a pair.
    taken: Vec<(String, String, u64, u64)>,
    timeouts: usize,
    /// Invocation times of takes without an answer (each may have removed a key).
    unknown: Vec<u64>,
    successes: Vec<u64>,
    samples: Vec<Sample>,
}

/// A consumer: waiting takes of the fresh keys, one at a time, until the run stops.
async fn taker_loop(o: Arc<NemesisOptions>, cfg: Arc<Config>, sh: Arc<Shared>) -> TakeLog {
    let mut log = TakeLog::default();
    let mut conn: Option<Client> = None;
    let take = Request::take(&format!("u{},.*", sh.tag), ".*").wait(o.take_wait);
    while !sh.stop.load(Ordering::Relaxed) {
        if !ensure_connected(&mut conn, &o, &cfg).await {
            continue;
        }
        let Some(c) = conn.as_mut() else { continue };
        let invoke = sh.now();
        let res = tokio::time::timeout(o.op_timeout + o.take_wait, c.call(&take)).await;
        let ending = match res {
            Ok(Ok(r)) if r.status == Status::Ok => {
                let now = sh.now();
                log.successes.push(now);
                match r.pairs.as_deref() {
                    Some([p]) => log
                        .taken
                        .push((p.key.clone(), p.value.clone(), invoke, now)),
                    _ => log.timeouts += 1,
                }
                Ending::Ok
            }
            // Not applied (no primary in time): nothing was removed.
            Ok(Ok(r)) if r.status == Status::Unavailable => Ending::Unavailable,
            _ => {
                conn = None;
                log.unknown.push(invoke);
                Ending::Unknown
            }
        };
        log.samples.push(Sample {
            op: "TAKE",
            start_ns: invoke,
            end_ns: sh.now(),
            ending,
        });
    }
    if let Some(c) = conn {
        c.close();
    }
    log
}

async fn status(o: &NemesisOptions, cfg: &Config) -> Option<ClusterStatus> {
    let mut a = Client::connect(&o.admin_sap, &o.certs, CertRole::Admin, cfg)
        .await
        .ok()?;
    let r = a.request("STATUS", None).await.ok()?;
    a.close();
    r.cluster.map(|c| *c)
}

fn pid_of(st: &Option<ClusterStatus>, who: &str) -> Option<i32> {
    let p = st.as_ref().and_then(|s| s.pid_of(who))?;
    (p > 0).then_some(p as i32)
}

fn signal(pid: Option<i32>, sig: nix::sys::signal::Signal) -> String {
    match pid {
        Some(p) => match nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig) {
            Ok(()) => format!("sent {sig:?} to {p}"),
            Err(e) => format!("cannot send {sig:?} to {p}: {e}"),
        },
        None => "no such process in STATUS".into(),
    }
}

fn sh(cmd: &str) -> String {
    match std::process::Command::new("sh").arg("-c").arg(cmd).status() {
        Ok(s) => format!("`{cmd}` exited {s}"),
        Err(e) => format!("`{cmd}` failed to start: {e}"),
    }
}

/// Applies the fault at `fault_at` and heals after `fault_for`; returns what it did and the
/// fault window (from just before the fault to just after the heal; a kill is not healed, its
/// window is the `fault_for` after it).
async fn nemesis(
    o: Arc<NemesisOptions>,
    cfg: Arc<Config>,
    shared: Arc<Shared>,
) -> (Vec<String>, Option<FaultWindow>) {
    use nix::sys::signal::Signal;
    let mut done = vec![];
    if o.fault == Fault::None {
        return (done, None);
    }
    tokio::time::sleep(o.fault_at).await;
    let st = status(&o, &cfg).await;
    let primary = pid_of(&st, "primary");
    let backup = pid_of(&st, "backup");
    let fault_cmd = o.fault_cmd.clone();
    let start_ns = shared.now();
    done.push(match o.fault {
        Fault::KillPrimary => signal(primary, Signal::SIGKILL),
        Fault::StopPrimary => signal(primary, Signal::SIGSTOP),
        Fault::KillBackup => signal(backup, Signal::SIGKILL),
        Fault::Cmd => match fault_cmd {
            Some(c) => tokio::task::spawn_blocking(move || sh(&c))
                .await
                .unwrap_or_default(),
            None => "no --fault-cmd".into(),
        },
        Fault::None => String::new(),
    });
    tokio::time::sleep(o.fault_for).await;
    let heal_cmd = o.heal_cmd.clone();
    match o.fault {
        Fault::StopPrimary => done.push(signal(primary, Signal::SIGCONT)),
        Fault::Cmd => done.push(match heal_cmd {
            Some(c) => tokio::task::spawn_blocking(move || sh(&c))
                .await
                .unwrap_or_default(),
            None => "no --heal-cmd".into(),
        }),
        _ => {}
    }
    let window = FaultWindow {
        start_ns,
        end_ns: shared.now(),
        label: format!("{:?}: {}", o.fault, done.join("; ")),
    };
    (done, Some(window))
}

/// Final reads after the run: the value of every key, and the set of fresh keys present.
async fn final_state(
    o: &NemesisOptions,
    cfg: &Config,
    tag: &str,
) -> Result<(BTreeMap<String, String>, BTreeSet<String>), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(mut c) = connect(o, cfg).await {
            let a = c
                .request("GET", Some(patterns(&format!("n{tag},.*"))))
                .await;
            let b = c
                .request("GET", Some(patterns(&format!("u{tag},.*"))))
                .await;
            c.close();
            if let (Ok(a), Ok(b)) = (a, b)
                && a.status == Status::Ok
                && b.status == Status::Ok
            {
                let regs = a
                    .pairs
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| (p.key, p.value))
                    .collect();
                let fresh = b
                    .pairs
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| p.key)
                    .collect();
                return Ok((regs, fresh));
            }
        }
        if Instant::now() >= deadline {
            return Err("the service did not answer the final reads within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the whole experiment.
pub async fn run(o: NemesisOptions, cfg: Config) -> Result<NemesisReport, String> {
    std::fs::create_dir_all(&o.out)
        .map_err(|e| format!("cannot create {}: {e}", o.out.display()))?;
    let o = Arc::new(o);
    let cfg = Arc::new(Config {
        connect_timeout_ms: cfg.connect_timeout_ms.min(2000),
        ..cfg
    });
    let epoch_before = status(&o, &cfg).await.map(|s| s.epoch).unwrap_or(0);
    let tag = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
        .to_string();
    let sh = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        tag: tag.clone(),
    });
    let clients: Vec<_> = (0..o.clients)
        .map(|c| tokio::spawn(client_loop(o.clone(), cfg.clone(), sh.clone(), c)))
        .collect();
    let takers: Vec<_> = (0..o.takers)
        .map(|_| tokio::spawn(taker_loop(o.clone(), cfg.clone(), sh.clone())))
        .collect();
    let faults = tokio::spawn(nemesis(o.clone(), cfg.clone(), sh.clone()));
    tokio::time::sleep(o.duration).await;
    sh.stop.store(true, Ordering::Relaxed);
    let mut ops = vec![];
    let mut fresh = vec![];
    let mut successes = vec![];
    let mut samples = vec![];
    let mut fresh_puts = vec![];
    for c in clients {
        let l = c.await.map_err(|e| e.to_string())?;
        ops.extend(l.ops);
        fresh.extend(l.fresh);
        fresh_puts.extend(l.fresh_ops);
        successes.extend(l.successes);
        samples.extend(l.samples);
    }
    let mut takes = TakeLog::default();
    for t in takers {
        let l = t.await.map_err(|e| e.to_string())?;
        takes.taken.extend(l.taken);
        takes.timeouts += l.timeouts;
        takes.unknown.extend(l.unknown);
        successes.extend(l.successes);
        samples.extend(l.samples);
    }
    let (mut details, window) = faults.await.map_err(|e| e.to_string())?;
    let (regs, present) = final_state(&o, &cfg, &tag).await?;
    let end = sh.now();
    // The final reads are part of the history: one read per key, after everything else.
    for k in 0..o.keys {
        let key = format!("n{tag},{k}");
        ops.push(Op {
            id: 0,
            client: u32::MAX,
            key: key.clone(),
            kind: OpKind::Get,
            invoke_ns: end,
            complete_ns: Some(end + 1),
            outcome: Outcome::Read(regs.get(&key).cloned()),
        });
    }
    let taken_twice = take_history(&takes.taken, &fresh_puts, &present, end, &mut ops);
    for (i, op) in ops.iter_mut().enumerate() {
        op.id = i as u64;
    }
    let check_ops = ops.clone();
    let report = tokio::task::spawn_blocking(move || checker::check(&check_ops))
        .await
        .map_err(|e| e.to_string())?;
    // Exactly once for fresh inserts: an acknowledged insert must be there; one answered
    // "rejected" was applied twice (its own first application made the key present).
    let fresh_acked = fresh
        .iter()
        .filter(|(_, oc)| *oc == Outcome::Applied)
        .count();
    let taken: BTreeSet<&String> = takes.taken.iter().map(|t| &t.0).collect();
    let (lost, note) = lost_inserts(&fresh, &present, &taken, takes.unknown.len());
    details.extend(note);
    let duplicated: Vec<&String> = fresh
        .iter()
        .filter(|(_, oc)| *oc == Outcome::Rejected)
        .map(|(k, _)| k)
        .collect();
    let sent: BTreeSet<&String> = fresh.iter().map(|(k, _)| k).collect();
    let phantom: Vec<&String> = present
        .iter()
        .chain(taken.iter().copied())
        .filter(|k| !sent.contains(k))
        .collect();
    successes.sort_unstable();
    let mut longest = 0u64;
    let mut prev = 0u64;
    let run_end = o.duration.as_nanos() as u64;
    // Within the run: a take still waiting when it ends is answered up to `take_wait` later.
    for s in successes
        .iter()
        .filter(|s| **s <= run_end)
        .chain(std::iter::once(&run_end))
    {
        longest = longest.max(s.saturating_sub(prev));
        prev = prev.max(*s);
    }
    for (k, d) in &report.not_linearizable {
        details.push(format!("not linearizable: key {k}: {d}"));
    }
    for (k, d) in &report.inconclusive {
        details.push(format!("inconclusive: key {k}: {d}"));
    }
    for k in lost.iter().take(10) {
        details.push(format!("lost: acknowledged insert {k} is missing"));
    }
    for k in duplicated.iter().take(10) {
        details.push(format!(
            "duplicated: insert {k} was answered rejected (applied twice)"
        ));
    }
    for k in taken_twice.iter().take(10) {
        details.push(format!("taken twice: {k} was returned by two takes"));
    }
    for k in phantom.iter().take(10) {
        details.push(format!("phantom: {k} present but never written"));
    }
    let epoch_after = status(&o, &cfg).await.map(|s| s.epoch).unwrap_or(0);
    let unknown = ops.iter().filter(|x| x.outcome == Outcome::Unknown).count()
        + fresh
            .iter()
            .filter(|(_, oc)| *oc == Outcome::Unknown)
            .count();
    let failed = ops.iter().filter(|x| x.outcome == Outcome::Failed).count()
        + fresh
            .iter()
            .filter(|(_, oc)| *oc == Outcome::Failed)
            .count();
    let total = ops.len() + fresh.len();
    let pass = report.linearizable
        && report.inconclusive.is_empty()
        && lost.is_empty()
        && duplicated.is_empty()
        && phantom.is_empty()
        && taken_twice.is_empty();
    let r = NemesisReport {
        ops: total,
        ok: total - unknown - failed,
        unknown,
        failed,
        fresh_acked,
        lost: lost.len(),
        duplicated: duplicated.len(),
        not_linearizable: report.not_linearizable.len(),
        inconclusive: report.inconclusive.len(),
        longest_unavailable_ms: longest / 1_000_000,
        takes: takes.taken.len(),
        take_timeouts: takes.timeouts,
        take_unknown: takes.unknown.len(),
        taken_twice: taken_twice.len(),
        fault: format!("{:?}", o.fault),
        epoch_before,
        epoch_after,
        verdict: if pass { "PASS".into() } else { "FAIL".into() },
        details,
    };
    let history = o.out.join("history.jsonl");
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(&history)
            .map_err(|e| format!("cannot write {}: {e}", history.display()))?,
    );
    let io = |e: std::io::Error| format!("cannot write {}: {e}", history.display());
    for op in &ops {
        serde_json::to_writer(&mut w, op).map_err(|e| e.to_string())?;
        w.write_all(b"\n").map_err(io)?;
    }
    for (k, oc) in &fresh {
        serde_json::to_writer(
            &mut w,
            &serde_json::json!({"fresh_insert": k, "outcome": oc}),
        )
        .map_err(|e| e.to_string())?;
        w.write_all(b"\n").map_err(io)?;
    }
    w.flush().map_err(io)?;
    let report_path = o.out.join("report.json");
    std::fs::write(
        &report_path,
        serde_json::to_vec_pretty(&r).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("cannot write {}: {e}", report_path.display()))?;
    let title = format!(
        "tuplespace nemesis: {} clients, fault {} ({}), {}",
        o.clients,
        r.fault,
        window.as_ref().map_or_else(
            || "none".to_string(),
            |w| format!(
                "{:.1}-{:.1} s",
                w.start_ns as f64 / 1e9,
                w.end_ns as f64 / 1e9
            )
        ),
        r.verdict
    );
    let svg = plot::timeline_svg(
        &title,
        &samples,
        window.as_slice(),
        o.duration.as_nanos() as u64,
        o.timeline_bucket.as_nanos() as u64,
    )
    .map_err(|e| e.to_string())?;
    plot::write(&o.out.join("timeline.svg"), &svg).map_err(|e| e.to_string())?;
    Ok(r)
}

/// Adds the takes to the history checked for linearizability: for each key taken, its insert (as
/// its client saw it), each take of it (a DELETE that returned the pair, from its invocation to
/// its answer) and the final read at `end` (present or not). So a take must fall after its
/// insert took effect and return the value inserted, and once taken the key stays gone. Returns
/// the keys returned by more than one take.
fn take_history<'a>(
    taken: &'a [(String, String, u64, u64)],
    fresh_puts: &[Op],
    present: &BTreeSet<String>,
    end: u64,
    ops: &mut Vec<Op>,
) -> Vec<&'a String> {
    let mut taken_by: BTreeMap<&String, usize> = BTreeMap::new();
    for (k, ..) in taken {
        *taken_by.entry(k).or_default() += 1;
    }
    let fresh_ops: BTreeMap<&String, &Op> = fresh_puts.iter().map(|op| (&op.key, op)).collect();
    let mut checked: BTreeSet<&String> = BTreeSet::new();
    for (k, v, invoke, complete) in taken {
        if checked.insert(k)
            && let Some(put) = fresh_ops.get(k)
        {
            ops.push((*put).clone());
            ops.push(Op {
                id: 0,
                client: u32::MAX,
                key: k.clone(),
                kind: OpKind::Get,
                invoke_ns: end,
                complete_ns: Some(end + 1),
                outcome: Outcome::Read(present.contains(k).then(|| v.clone())),
            });
        }
        ops.push(Op {
            id: 0,
            client: u32::MAX - 1,
            key: k.clone(),
            kind: OpKind::Delete,
            invoke_ns: *invoke,
            complete_ns: Some(*complete),
            outcome: Outcome::Deleted(Some(v.clone())),
        });
    }
    taken_by
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(k, _)| k)
        .collect()
}

/// Acknowledged fresh inserts that are neither present at the end nor returned by a take. A take
/// without an answer may have removed one key: up to that many missing keys are not counted as
/// lost (the note says so); beyond, every missing key is.
fn lost_inserts<'a>(
    fresh: &'a [(String, Outcome)],
    present: &BTreeSet<String>,
    taken: &BTreeSet<&String>,
    unanswered_takes: usize,
) -> (Vec<&'a String>, Option<String>) {
    let missing: Vec<&String> = fresh
        .iter()
        .filter(|(k, oc)| *oc == Outcome::Applied && !present.contains(k) && !taken.contains(k))
        .map(|(k, _)| k)
        .collect();
    if missing.is_empty() {
        (missing, None)
    } else if missing.len() <= unanswered_takes {
        let note = format!(
            "{} acknowledged inserts are neither present nor returned by a take; {} takes got no \
             answer and may have taken them",
            missing.len(),
            unanswered_takes
        );
        (vec![], Some(note))
    } else {
        (missing, None)
    }
}

/// A readable summary.
pub fn summary(r: &NemesisReport) -> String {
    let mut s = format!(
        "{}: {} ops ({} ok, {} unknown, {} unavailable), fault {}, epoch {} -> {}\n  lost {}  duplicated {}  not linearizable {}  inconclusive {}  longest unavailability {} ms  ({} fresh inserts acknowledged)\n",
        r.verdict,
        r.ops,
        r.ok,
        r.unknown,
        r.failed,
        r.fault,
        r.epoch_before,
        r.epoch_after,
        r.lost,
        r.duplicated,
        r.not_linearizable,
        r.inconclusive,
        r.longest_unavailable_ms,
        r.fresh_acked
    );
    if r.takes + r.take_timeouts + r.take_unknown > 0 {
        s.push_str(&format!(
            "  takes: {} with a pair, {} timed out, {} unanswered; taken twice {}\n",
            r.takes, r.take_timeouts, r.take_unknown, r.taken_twice
        ));
    }
    for d in &r.details {
        s.push_str(&format!("  - {d}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, invoke: u64, complete: u64) -> Op {
        Op {
            id: 0,
            client: 0,
            key: key.into(),
            kind: OpKind::Put(value.into()),
            invoke_ns: invoke,
            complete_ns: Some(complete),
            outcome: Outcome::Applied,
        }
    }

    fn checked(
        taken: &[(String, String, u64, u64)],
        puts: &[Op],
        present: &[&str],
    ) -> (checker::Report, usize) {
        let present: BTreeSet<String> = present.iter().map(|k| k.to_string()).collect();
        let mut ops = vec![];
        let twice = take_history(taken, puts, &present, 1000, &mut ops).len();
        for (i, op) in ops.iter_mut().enumerate() {
            op.id = i as u64;
        }
        (checker::check(&ops), twice)
    }

    fn take(key: &str, value: &str, invoke: u64, complete: u64) -> (String, String, u64, u64) {
        (key.into(), value.into(), invoke, complete)
    }

    #[test]
    fn a_waiting_take_linearizes_when_it_removed_its_pair() {
        let puts = [put("u,1", "a", 100, 200), put("u,2", "b", 300, 400)];
        // Waiting since before the insert, answered after it: fine.
        let (r, twice) = checked(
            &[take("u,1", "a", 10, 250), take("u,2", "b", 350, 500)],
            &puts,
            &[],
        );
        assert!(r.linearizable, "{r:?}");
        assert_eq!(twice, 0);
        // Answered before the insert was even sent: not linearizable.
        let (r, _) = checked(&[take("u,1", "a", 10, 50)], &puts, &[]);
        assert!(!r.linearizable, "a take before its insert passed");
        // A value that was never inserted.
        let (r, _) = checked(&[take("u,1", "zz", 10, 250)], &puts, &[]);
        assert!(!r.linearizable, "a take of another value passed");
        // Taken, yet still there at the end.
        let (r, _) = checked(&[take("u,1", "a", 10, 250)], &puts, &["u,1"]);
        assert!(!r.linearizable, "a take that removed nothing passed");
        // Two takes of one pair.
        let (r, twice) = checked(
            &[take("u,1", "a", 10, 250), take("u,1", "a", 20, 260)],
            &puts,
            &[],
        );
        assert_eq!(twice, 1);
        assert!(!r.linearizable, "a pair taken twice passed");
    }

    #[test]
    fn an_acknowledged_insert_neither_present_nor_taken_is_lost() {
        let fresh = vec![
            ("u,1".to_string(), Outcome::Applied),
            ("u,2".to_string(), Outcome::Applied),
            ("u,3".to_string(), Outcome::Applied),
            ("u,4".to_string(), Outcome::Unknown),
        ];
        let present: BTreeSet<String> = ["u,1".to_string()].into();
        let k2 = "u,2".to_string();
        let taken: BTreeSet<&String> = [&k2].into();
        let (lost, note) = lost_inserts(&fresh, &present, &taken, 0);
        assert_eq!(lost, [&"u,3".to_string()], "u,4 was never acknowledged");
        assert!(note.is_none());
        // One take without an answer may have removed u,3.
        let (lost, note) = lost_inserts(&fresh, &present, &taken, 1);
        assert!(lost.is_empty());
        assert!(note.is_some_and(|n| n.contains("may have taken")));
        let (lost, _) = lost_inserts(&fresh, &present, &BTreeSet::new(), 1);
        assert_eq!(lost.len(), 2, "two missing, one unanswered take");
    }
}
