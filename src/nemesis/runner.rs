//! `tuplespace nemesis`: several clients do random operations on a small key set with unique
//! written values while a fault is applied; the history (invoke, complete, result; unknown on
//! timeout) is checked for linearizability per key, and for lost and duplicated writes (every
//! client also inserts fresh keys that must each be applied exactly once). Prints a verdict,
//! writes `history.jsonl`, `report.json` and `timeline.svg` (see [`crate::plot`]).

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
use crate::client::Client;
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
    successes: Vec<u64>,
    /// Every operation with its start and end, for the timeline.
    samples: Vec<Sample>,
}

async fn connect(o: &NemesisOptions, cfg: &Config) -> Option<Client> {
    Client::connect(&o.sap, &o.certs, CertRole::Client, cfg)
        .await
        .ok()
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
        if conn.is_none() {
            conn = connect(&o, &cfg).await;
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
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
    let faults = tokio::spawn(nemesis(o.clone(), cfg.clone(), sh.clone()));
    tokio::time::sleep(o.duration).await;
    sh.stop.store(true, Ordering::Relaxed);
    let mut ops = vec![];
    let mut fresh = vec![];
    let mut successes = vec![];
    let mut samples = vec![];
    for c in clients {
        let l = c.await.map_err(|e| e.to_string())?;
        ops.extend(l.ops);
        fresh.extend(l.fresh);
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
    let lost: Vec<&String> = fresh
        .iter()
        .filter(|(k, oc)| *oc == Outcome::Applied && !present.contains(k))
        .map(|(k, _)| k)
        .collect();
    let duplicated: Vec<&String> = fresh
        .iter()
        .filter(|(_, oc)| *oc == Outcome::Rejected)
        .map(|(k, _)| k)
        .collect();
    let sent: BTreeSet<&String> = fresh.iter().map(|(k, _)| k).collect();
    let phantom: Vec<&String> = present.iter().filter(|k| !sent.contains(k)).collect();
    successes.sort_unstable();
    let mut longest = 0u64;
    let mut prev = 0u64;
    for s in successes
        .iter()
        .chain(std::iter::once(&(o.duration.as_nanos() as u64)))
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
        && phantom.is_empty();
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
    for d in &r.details {
        s.push_str(&format!("  - {d}\n"));
    }
    s
}
