//! Real-process faults of the proxy and of a paused replica, under continuous write load.
//!
//! Every test runs a proxy, a primary and its backup as real processes over QUIC on free loopback
//! ports (the `Cluster` harness), with a few closed-loop writer clients, and then:
//!
//! 1. `kill -9` of the proxy and the same command line again at once, twice in a row;
//! 2. SIGSTOP of the proxy for 3 s, then SIGCONT;
//! 3. SIGSTOP of the backup for 5 s (heartbeat timeout 300 ms), then SIGCONT;
//! 4. SIGSTOP of the primary for 5 s with a `backup_launch_command` that starts backups locally,
//!    then SIGCONT.
//!
//! What every test checks:
//! - load really flowed before the fault and flows again after it (at least [`FLOW`] acknowledged
//!   writes in each phase), so a test cannot pass on an idle or dead service;
//! - every acknowledged write is in the final space with its last acknowledged value, nothing
//!   deleted comes back, nothing that was never written appears; a write whose outcome is unknown
//!   (its connection died, or the answer was `unknown`) may be present or not, but only with one of
//!   the values it could have;
//! - a PUT of a fresh key is never rejected (it would mean a write was applied twice), a POST or
//!   DELETE of a key known to be present always finds it with its last acknowledged value;
//! - at the end STATUS shows a primary serving and a synchronised backup;
//! - per fault: which replica processes must still be the same pids, and how the epoch may move.
//!
//! The proxy is always given `proxy_state_file` (in the cluster's directory), as in production:
//! its epoch must survive a restart.
//!
//! The tests take a lock so that they run one at a time: each holds several processes with 50 ms
//! heartbeats, and timing assertions (promotion within a few seconds) must not depend on how many
//! other clusters the machine is running at once.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ciborium::Value;
use common::{BIN, Cluster, ClusterBuilder, alive, stop_process};
use tokio::task::JoinHandle;
use tuplespace::client::Client;
use tuplespace::config::Config;
use tuplespace::net::tls::CertRole;
use tuplespace::wire::client::{ClusterStatus, Status};

/// One test at a time (see the module documentation).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Writer clients per test.
const WRITERS: usize = 3;
/// Acknowledged writes that show the load is flowing in one phase (before / after a fault).
const FLOW: u64 = 40;
/// Longest a writer may go without a connection to the proxy before it gives up (and the test
/// fails).
const RECONNECT_LIMIT: Duration = Duration::from_secs(15);
/// Longest the cluster may take to be back to the expected replicas after a fault.
const RECOVERY: Duration = Duration::from_secs(10);
/// How long the replicas are watched after a proxy fault for a late failover or fence (more than
/// the 2 s node idle timeout plus the heartbeat timeout).
const STEADY: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------------------------

/// What a writer may see without the test failing.
#[derive(Clone, Copy, Debug)]
struct Policy {
    /// Connections that die (or answers that do not come within `answer_within`): the write's
    /// outcome is unknown, the writer reconnects.
    lost_connections: bool,
    /// `unknown` answers (outcome unknown).
    unknown_answers: bool,
    /// `unavailable` answers (not applied).
    unavailable_answers: bool,
    /// Longest a writer waits for one answer before it takes the connection for dead. None: the
    /// client's own timeout (request_timeout_ms + 5 s).
    answer_within: Option<Duration>,
}

impl Policy {
    /// Nothing may disturb a client.
    const STRICT: Policy = Policy {
        lost_connections: false,
        unknown_answers: false,
        unavailable_answers: false,
        answer_within: None,
    };
}

/// Timestamped notes from the writers, for failure messages.
#[derive(Clone)]
struct Events {
    t0: Instant,
    list: Arc<Mutex<Vec<String>>>,
}

impl Events {
    fn note(&self, s: String) {
        let line = format!("[{:>6.2}s] {s}", self.t0.elapsed().as_secs_f64());
        self.list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    fn last(&self, n: usize) -> Vec<String> {
        let l = self.list.lock().unwrap_or_else(|e| e.into_inner());
        l[l.len().saturating_sub(n)..].to_vec()
    }

    fn count(&self) -> usize {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// What one writer knows about its keys.
#[derive(Debug, Default)]
struct Model {
    /// Every key the writer ever sent a write for -> the states it may be in now (None = absent).
    /// One state = known for certain (the last write to it was acknowledged, or certainly not
    /// applied); more = the outcome of the last write is unknown (the key is never written again).
    keys: BTreeMap<String, BTreeSet<Option<String>>>,
    /// Things that must never happen whatever the policy.
    violations: Vec<String>,
    /// Disturbances the policy does not allow.
    disallowed: Vec<String>,
    acked: u64,
    uncertain: u64,
    unavailable: u64,
}

fn certain(v: Option<String>) -> BTreeSet<Option<String>> {
    BTreeSet::from([v])
}

fn pair(k: &str, v: &str) -> Value {
    let t = |s: &str| Value::Array(s.split(',').map(|e| Value::Text(e.into())).collect());
    Value::Array(vec![t(k), t(v)])
}

/// A write of the closed loop, on a key whose state the writer knows for certain.
enum Op {
    /// PUT of a fresh key.
    Put { key: String, val: String },
    /// POST of a key known to be present with `old`.
    Post {
        key: String,
        old: String,
        new: String,
    },
    /// DELETE of a key known to be present with `old`.
    Delete { key: String, old: String },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Put { .. } => "PUT",
            Op::Post { .. } => "POST",
            Op::Delete { .. } => "DELETE",
        }
    }

    fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Post { key, .. } | Op::Delete { key, .. } => key,
        }
    }

    fn args(&self) -> Value {
        match self {
            Op::Put { key, val } => Value::Array(vec![pair(key, val)]),
            Op::Post { key, new, .. } => Value::Array(vec![pair(key, new)]),
            // Keys are `w<digits>,<digits>`: their text form is also a regex matching only them.
            Op::Delete { key, .. } => {
                Value::Array(vec![Value::Text(key.clone()), Value::Text(".*".into())])
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Op::Put { key, val } => format!("PUT {key}={val}"),
            Op::Post { key, old, new } => format!("POST {key}={new} (was {old})"),
            Op::Delete { key, old } => format!("DELETE {key} (was {old})"),
        }
    }
}

#[derive(Clone)]
struct WriterCtx {
    id: usize,
    client_sap: String,
    certs: std::path::PathBuf,
    cfg: Config,
    policy: Policy,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    events: Events,
}

/// The result of one request, as the writer classifies it.
enum Outcome {
    Acked(tuplespace::wire::client::Response),
    /// Maybe applied, maybe not.
    Uncertain(String),
    /// Certainly not applied.
    NotApplied(String),
    /// An answer that must never come.
    Wrong(String),
}

/// One closed-loop writer: PUTs of fresh keys, POSTs to its newest live key (every 3rd write),
/// DELETEs of its oldest live key (every 7th), reconnecting (bounded) whenever its connection dies.
async fn writer(ctx: WriterCtx) -> Model {
    let id = ctx.id;
    let mut m = Model::default();
    // Keys certainly present, oldest first, with their value.
    let mut live: VecDeque<(String, String)> = VecDeque::new();
    let mut client: Option<Client> = None;
    let mut down_since: Option<Instant> = None;
    let mut n = 0u64;
    while !ctx.stop.load(Ordering::Relaxed) {
        let cl = match client.as_mut() {
            Some(c) => c,
            None => match Client::connect(&ctx.client_sap, &ctx.certs, CertRole::Client, &ctx.cfg)
                .await
            {
                Ok(c) => {
                    if let Some(t) = down_since.take() {
                        ctx.events.note(format!(
                            "writer {id}: reconnected after {:.2}s",
                            t.elapsed().as_secs_f64()
                        ));
                    }
                    client.insert(c)
                }
                Err(e) => {
                    let since = *down_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > RECONNECT_LIMIT {
                        let msg = format!(
                            "writer {id}: could not reconnect to the proxy for {RECONNECT_LIMIT:?}: {e}"
                        );
                        ctx.events.note(msg.clone());
                        m.violations.push(msg);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        n += 1;
        let op = if n.is_multiple_of(3) && !live.is_empty() {
            let (key, old) = live.pop_back().expect("non-empty");
            Op::Post {
                key,
                old,
                new: format!("p{n}"),
            }
        } else if n.is_multiple_of(7) && live.len() > 1 {
            let (key, old) = live.pop_front().expect("non-empty");
            Op::Delete { key, old }
        } else {
            Op::Put {
                key: format!("w{id},{n}"),
                val: format!("v{n}"),
            }
        };
        let request = cl.request(op.name(), Some(op.args()));
        let answer = match ctx.policy.answer_within {
            Some(d) => match tokio::time::timeout(d, request).await {
                Ok(r) => r,
                Err(_) => Err(tuplespace::client::ClientError::Timeout(d)),
            },
            None => request.await,
        };
        let outcome = match answer {
            Ok(r) => match r.status {
                Status::Ok => Outcome::Acked(r),
                Status::Unknown => Outcome::Uncertain(format!("answered unknown: {:?}", r.message)),
                Status::Unavailable => {
                    Outcome::NotApplied(format!("answered unavailable: {:?}", r.message))
                }
                other => Outcome::Wrong(format!("answered {other:?}: {:?}", r.message)),
            },
            Err(e) => {
                // The connection (or at least this stream) is unusable: its answer may still come
                // and would be taken for the next request's.
                if let Some(c) = client.take() {
                    c.close();
                }
                down_since.get_or_insert_with(Instant::now);
                Outcome::Uncertain(format!("no answer, connection dropped: {e}"))
            }
        };
        let key = op.key().to_owned();
        let violations_before = m.violations.len();
        match outcome {
            Outcome::Acked(r) => {
                m.acked += 1;
                ctx.acks.fetch_add(1, Ordering::Relaxed);
                let rejected = r.rejected.as_ref().map(|x| x.len()).unwrap_or(0);
                match op {
                    Op::Put { key, val } => {
                        if rejected != 0 {
                            m.violations.push(format!(
                                "writer {id}: PUT of the fresh key {key}={val} was rejected: \
                                 the write was applied twice"
                            ));
                        }
                        m.keys.insert(key.clone(), certain(Some(val.clone())));
                        live.push_back((key, val));
                    }
                    Op::Post { key, old, new } => {
                        if rejected != 0 {
                            m.violations.push(format!(
                                "writer {id}: POST {key}={new} was rejected, but {key}={old} had \
                                 been acknowledged: an acknowledged write was lost"
                            ));
                            m.keys.insert(key, certain(None));
                        } else {
                            m.keys.insert(key.clone(), certain(Some(new.clone())));
                            live.push_back((key, new));
                        }
                    }
                    Op::Delete { key, old } => {
                        let removed: Vec<(String, String)> = r
                            .pairs
                            .unwrap_or_default()
                            .into_iter()
                            .map(|p| (p.key, p.value))
                            .collect();
                        if removed != [(key.clone(), old.clone())] {
                            m.violations.push(format!(
                                "writer {id}: DELETE {key} removed {removed:?}, expected exactly \
                                 the acknowledged {key}={old}"
                            ));
                        }
                        m.keys.insert(key, certain(None));
                    }
                }
            }
            Outcome::Uncertain(why) => {
                m.uncertain += 1;
                let allowed = if why.starts_with("answered unknown") {
                    ctx.policy.unknown_answers
                } else {
                    ctx.policy.lost_connections
                };
                let msg = format!("writer {id}: {} outcome unknown ({why})", op.describe());
                ctx.events.note(msg.clone());
                if !allowed {
                    m.disallowed.push(msg);
                }
                let states = match &op {
                    Op::Put { val, .. } => BTreeSet::from([None, Some(val.clone())]),
                    Op::Post { old, new, .. } => {
                        BTreeSet::from([Some(old.clone()), Some(new.clone())])
                    }
                    Op::Delete { old, .. } => BTreeSet::from([Some(old.clone()), None]),
                };
                // Never written again: `live` no longer holds it.
                m.keys.insert(key, states);
            }
            Outcome::NotApplied(why) => {
                m.unavailable += 1;
                let msg = format!("writer {id}: {} not applied ({why})", op.describe());
                ctx.events.note(msg.clone());
                if !ctx.policy.unavailable_answers {
                    m.disallowed.push(msg);
                }
                match op {
                    Op::Put { key, .. } => {
                        m.keys.insert(key, certain(None));
                    }
                    Op::Post { key, old, .. } => live.push_back((key, old)),
                    Op::Delete { key, old } => live.push_front((key, old)),
                }
            }
            Outcome::Wrong(why) => {
                m.violations
                    .push(format!("writer {id}: {} {why}", op.describe()));
                // Treat as unknown for the final check.
                let states = match &op {
                    Op::Put { val, .. } => BTreeSet::from([None, Some(val.clone())]),
                    Op::Post { old, new, .. } => {
                        BTreeSet::from([Some(old.clone()), Some(new.clone())])
                    }
                    Op::Delete { old, .. } => BTreeSet::from([Some(old.clone()), None]),
                };
                m.keys.insert(key, states);
            }
        }
        // Also in the running log, so that a failure before the end shows them.
        for v in &m.violations[violations_before..] {
            ctx.events.note(format!("VIOLATION: {v}"));
        }
    }
    if let Some(c) = client {
        c.close();
    }
    m
}

// ---------------------------------------------------------------------------------------------
// The cluster as STATUS shows it
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct View {
    epoch: u64,
    primary: Option<u32>,
    backup: Option<u32>,
    synced: bool,
    raw: ClusterStatus,
}

/// STATUS now, or None if the admin SAP does not answer within 1.5 s.
async fn view(c: &Cluster) -> Option<View> {
    let cfg = Config {
        connect_timeout_ms: 500,
        request_timeout_ms: 1_000,
        ..Config::default()
    };
    let ask = async {
        let mut a = Client::connect(&c.shutdown_sap, &c.certs, CertRole::Admin, &cfg)
            .await
            .ok()?;
        let r = a.request("STATUS", None).await.ok();
        a.close();
        r?.cluster.map(|c| *c)
    };
    let raw = tokio::time::timeout(Duration::from_millis(1_500), ask)
        .await
        .ok()
        .flatten()?;
    Some(View {
        epoch: raw.epoch,
        primary: raw.pid_of("primary"),
        backup: raw.pid_of("backup"),
        synced: raw.backup_synced,
        raw,
    })
}

/// For faults that must not change the replicas: `Ok(true)` once STATUS shows primary `p` and
/// backup `b` synchronised at an epoch in `[epoch, epoch + 1]`; `Err` as soon as anything shows
/// that a replica was replaced, fenced or went away, or the epoch left that range.
fn same_replicas(v: &View, p: u32, b: u32, epoch: u64) -> Result<bool, String> {
    if !alive(p) {
        return Err(format!(
            "the primary (pid {p}) is gone: it was fenced, or gave up on the proxy"
        ));
    }
    if !alive(b) {
        return Err(format!(
            "the backup (pid {b}) is gone: it was fenced, promoted and killed, or gave up"
        ));
    }
    if v.epoch < epoch {
        return Err(format!(
            "the epoch went back from {epoch} to {}: the proxy lost its epoch",
            v.epoch
        ));
    }
    if v.epoch > epoch + 1 {
        return Err(format!(
            "the epoch moved from {epoch} to {} (at most one step allowed)",
            v.epoch
        ));
    }
    if let Some(x) = v.primary
        && x != p
    {
        return Err(format!(
            "the primary changed from pid {p} to pid {x}: a failover happened"
        ));
    }
    if let Some(x) = v.backup
        && x != b
    {
        return Err(format!(
            "the backup changed from pid {b} to pid {x}: the backup was replaced"
        ));
    }
    Ok(v.primary == Some(p) && v.backup == Some(b) && v.synced)
}

// ---------------------------------------------------------------------------------------------
// One test run: a cluster, its writers, and checks that fail with context
// ---------------------------------------------------------------------------------------------

struct Run {
    c: Cluster,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    events: Events,
    writers: Vec<JoinHandle<Model>>,
    t0: Instant,
}

impl Run {
    /// Starts the cluster, waits for a synchronised backup, starts the writers and waits for
    /// [`FLOW`] acknowledged writes. Returns the run and the synchronised view.
    async fn start(builder: ClusterBuilder, policy: Policy) -> (Run, View) {
        let t0 = Instant::now();
        let c = builder.start().await;
        let events = Events {
            t0,
            list: Arc::new(Mutex::new(Vec::new())),
        };
        let mut run = Run {
            c,
            stop: Arc::new(AtomicBool::new(false)),
            acks: Arc::new(AtomicU64::new(0)),
            events,
            writers: Vec::new(),
            t0,
        };
        let v = run
            .wait_view(
                Duration::from_secs(15),
                "cluster start: a primary with a synchronised backup",
                |v| Ok(v.primary.is_some() && v.backup.is_some() && v.synced),
            )
            .await;
        let cfg = Config {
            connect_timeout_ms: 1_000,
            request_timeout_ms: 3_000,
            ..Config::default()
        };
        for id in 0..WRITERS {
            let ctx = WriterCtx {
                id,
                client_sap: run.c.client_sap.clone(),
                certs: run.c.certs.clone(),
                cfg: cfg.clone(),
                policy,
                stop: run.stop.clone(),
                acks: run.acks.clone(),
                events: run.events.clone(),
            };
            run.writers.push(tokio::spawn(writer(ctx)));
        }
        run.wait_acks(FLOW, Duration::from_secs(10), "load before any fault")
            .await;
        (run, v)
    }

    fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }

    fn say(&self, s: &str) {
        eprintln!("[{:>6.2}s] {s}", self.t0.elapsed().as_secs_f64());
    }

    /// Panics with `msg` and what the writers saw lately (the cluster's logs follow, from
    /// `Cluster`'s drop).
    fn fail(&self, msg: &str) -> ! {
        let recent = self.events.last(25);
        panic!(
            "{msg}\n  ({} writes acknowledged so far, {} writer events; the last ones:)\n    {}",
            self.acks(),
            self.events.count(),
            if recent.is_empty() {
                "(none)".to_owned()
            } else {
                recent.join("\n    ")
            }
        );
    }

    /// Waits until at least `n` writes have been acknowledged in all.
    async fn wait_acks(&self, n: u64, within: Duration, what: &str) {
        let t = Instant::now();
        let ok = common::wait_until(within, || async { self.acks() >= n }).await;
        if !ok {
            self.fail(&format!(
                "{what}: only {} writes acknowledged within {within:?}, expected at least {n}",
                self.acks()
            ));
        }
        self.say(&format!(
            "{what}: {} acknowledged writes after {:.2}s",
            self.acks(),
            t.elapsed().as_secs_f64()
        ));
    }

    /// Polls STATUS until `cond` says Ok(true); fails at once on Err, or at the deadline.
    async fn wait_view(
        &self,
        within: Duration,
        what: &str,
        mut cond: impl FnMut(&View) -> Result<bool, String>,
    ) -> View {
        let deadline = Instant::now() + within;
        let mut last: Option<View> = None;
        loop {
            if let Some(v) = view(&self.c).await {
                match cond(&v) {
                    Ok(true) => return v,
                    Ok(false) => {}
                    Err(e) => self.fail(&format!("{what}: {e}\n  STATUS: {:?}", v.raw)),
                }
                last = Some(v);
            }
            if Instant::now() >= deadline {
                let last = last
                    .map(|v| format!("{:?}", v.raw))
                    .unwrap_or_else(|| "STATUS never answered".into());
                self.fail(&format!(
                    "{what}: not reached within {within:?}\n  last STATUS: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Watches STATUS for `window` (the fault's after-effects have that long to show: lapsed
    /// heartbeats, idle timeouts, a late fence): fails at once if `cond` says Err, then waits
    /// (bounded) for `cond` to say Ok(true). Returns that view.
    async fn hold_steady(
        &self,
        window: Duration,
        what: &str,
        mut cond: impl FnMut(&View) -> Result<bool, String>,
    ) -> View {
        let end = Instant::now() + window;
        while Instant::now() < end {
            if let Some(v) = view(&self.c).await
                && let Err(e) = cond(&v)
            {
                self.fail(&format!("{what}: {e}\n  STATUS: {:?}", v.raw));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_view(RECOVERY, what, cond).await
    }

    /// Stops the writers, reads the whole space and checks every writer's keys; then waits for a
    /// primary with a synchronised backup. Returns that final view.
    async fn finish(mut self) -> View {
        self.stop.store(true, Ordering::Relaxed);
        let mut models = Vec::new();
        for w in std::mem::take(&mut self.writers) {
            match tokio::time::timeout(Duration::from_secs(12), w).await {
                Ok(Ok(m)) => models.push(m),
                Ok(Err(e)) => self.fail(&format!("a writer task failed: {e}")),
                Err(_) => self.fail("a writer did not stop within 12 s"),
            }
        }
        let acked: u64 = models.iter().map(|m| m.acked).sum();
        let uncertain: u64 = models.iter().map(|m| m.uncertain).sum();
        let unavailable: u64 = models.iter().map(|m| m.unavailable).sum();
        self.say(&format!(
            "writers stopped: {acked} acknowledged, {uncertain} unknown outcome, \
             {unavailable} unavailable"
        ));
        let violations: Vec<&String> = models.iter().flat_map(|m| &m.violations).collect();
        if !violations.is_empty() {
            self.fail(&format!(
                "writers saw {} answers that must never happen:\n    {}",
                violations.len(),
                violations
                    .iter()
                    .take(30)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n    ")
            ));
        }
        let disallowed: Vec<&String> = models.iter().flat_map(|m| &m.disallowed).collect();
        if !disallowed.is_empty() {
            self.fail(&format!(
                "clients were disturbed by a fault that must be invisible to them ({} times):\n    {}",
                disallowed.len(),
                disallowed
                    .iter()
                    .take(30)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n    ")
            ));
        }
        let stored = self.read_all().await;
        let mut problems = Vec::new();
        let mut known = BTreeSet::new();
        for m in &models {
            for (k, states) in &m.keys {
                known.insert(k.clone());
                let actual = stored.get(k).cloned();
                if states.contains(&actual) {
                    continue;
                }
                let one = (states.len() == 1).then(|| states.iter().next().cloned().flatten());
                problems.push(match (one, actual) {
                    (Some(Some(v)), None) => format!("acknowledged write {k}={v} was lost"),
                    (Some(Some(v)), Some(w)) => {
                        format!("acknowledged write {k}={v} reads back as {k}={w}")
                    }
                    (Some(None), Some(w)) => format!(
                        "{k}={w} is present, but its deletion was acknowledged (or its PUT was \
                         answered unavailable)"
                    ),
                    (_, actual) => format!(
                        "{k} reads back as {actual:?}, none of its possible outcomes {states:?}"
                    ),
                });
            }
        }
        for (k, v) in &stored {
            if !known.contains(k) {
                problems.push(format!("{k}={v} is present but no writer ever wrote it"));
            }
        }
        if !problems.is_empty() {
            self.fail(&format!(
                "the final space does not match the acknowledged writes ({} problems):\n    {}",
                problems.len(),
                problems
                    .iter()
                    .take(30)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n    ")
            ));
        }
        // Each phase already waited for FLOW of its own; this only guards the bookkeeping.
        if acked < 2 * FLOW {
            self.fail(&format!(
                "only {acked} writes acknowledged in the whole run: the test did not test much"
            ));
        }
        self.wait_view(
            RECOVERY,
            "at the end: a primary serving with a synchronised backup",
            |v| Ok(v.primary.is_some() && v.backup.is_some() && v.synced),
        )
        .await
    }

    /// GET of every writer key (retried, bounded, while the service is not answering).
    async fn read_all(&self) -> BTreeMap<String, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let last = match Client::connect(
                &self.c.client_sap,
                &self.c.certs,
                CertRole::Client,
                &common::client_cfg(),
            )
            .await
            {
                Ok(mut cl) => {
                    let args =
                        Value::Array(vec![Value::Text("w.*".into()), Value::Text(".*".into())]);
                    match cl.request("GET", Some(args)).await {
                        Ok(r) if r.status == Status::Ok => {
                            cl.close();
                            return r
                                .pairs
                                .unwrap_or_default()
                                .into_iter()
                                .map(|p| (p.key, p.value))
                                .collect();
                        }
                        Ok(r) => {
                            cl.close();
                            format!("GET answered {:?}: {:?}", r.status, r.message)
                        }
                        Err(e) => {
                            cl.close();
                            format!("GET: {e}")
                        }
                    }
                }
                Err(e) => format!("connect: {e}"),
            };
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "the final read did not succeed within 10 s: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Every cluster here: the proxy keeps its durable state (epoch, office holder) in a file in the
/// cluster's directory, as in production, so that it survives a proxy restart.
fn builder() -> ClusterBuilder {
    Cluster::builder().proxy_set_path("proxy_state_file", "proxy-state")
}

/// Sleeps until `t` (holding a fault for its stated duration).
async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 of the proxy, restarted at once with the same command line, twice
// ---------------------------------------------------------------------------------------------

/// The proxy is killed with SIGKILL and started again with the same command line (and the same
/// `proxy_state_file`) at once, twice. The replicas must not notice beyond a reconnection: both
/// stay the same processes (no failover, nobody fenced), the epoch stays or moves by one per
/// restart (never back), writes resume within a few seconds, and every acknowledged write is kept.
///
/// A proxy killed with SIGKILL sends no close, so a client only learns of it by not getting an
/// answer: the writers here give up on an answer after 2 s (outcome unknown) and reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_kill9_and_restart_twice_keeps_replicas_and_writes() {
    let _serial = SERIAL.lock().await;
    let builder = builder();
    let policy = Policy {
        lost_connections: true,
        unknown_answers: true,
        unavailable_answers: true,
        answer_within: Some(Duration::from_secs(2)),
    };
    let (mut run, v0) = Run::start(builder, policy).await;
    let (p, b) = (v0.primary.expect("primary"), v0.backup.expect("backup"));
    let mut epoch = v0.epoch;
    run.say(&format!("primary {p}, backup {b}, epoch {epoch}"));
    for round in 1..=2 {
        let before = run.acks();
        run.wait_acks(
            before + FLOW,
            Duration::from_secs(10),
            &format!("round {round}: load before the proxy kill"),
        )
        .await;
        let restarted_at = Instant::now();
        let down = run.c.restart_proxy();
        assert!(
            down < Duration::from_secs(1),
            "round {round}: the proxy took {down:?} to restart (the scenario is: within 1 s)"
        );
        let at = run.acks();
        run.say(&format!(
            "round {round}: proxy killed and started again (no proxy for {down:?}), {at} acks"
        ));
        let v = run
            .wait_view(
                RECOVERY,
                &format!(
                    "round {round}: after the proxy restart, the same primary {p} and backup {b}, \
                     synchronised, at epoch {epoch} or {}",
                    epoch + 1
                ),
                |v| same_replicas(v, p, b, epoch),
            )
            .await;
        run.say(&format!(
            "round {round}: replicas back with the new proxy after {:.2}s, epoch {}",
            restarted_at.elapsed().as_secs_f64(),
            v.epoch
        ));
        // A few answers of the old proxy may still have been on their way: 20 are new ones.
        let first_by = Duration::from_secs(6).saturating_sub(restarted_at.elapsed());
        run.wait_acks(
            at + 20,
            first_by,
            &format!("round {round}: writes resume within 6 s of the proxy restart"),
        )
        .await;
        run.wait_acks(
            at + FLOW,
            Duration::from_secs(10),
            &format!("round {round}: load after the proxy restart"),
        )
        .await;
        // Not a passing glance: the same replicas for a while after the restart (longer than the
        // node idle timeout), while writes go on.
        let v = run
            .hold_steady(
                STEADY,
                &format!("round {round}: the same replicas in the {STEADY:?} after the restart"),
                |v| same_replicas(v, p, b, epoch),
            )
            .await;
        let at = run.acks();
        run.wait_acks(
            at + FLOW,
            Duration::from_secs(10),
            &format!("round {round}: load once steady"),
        )
        .await;
        epoch = v.epoch;
    }
    let end = run.finish().await;
    assert_eq!(
        (end.primary, end.backup),
        (Some(p), Some(b)),
        "at the end: the replicas must be the original primary {p} and backup {b}: {:?}",
        end.raw
    );
    assert!(
        end.epoch <= v0.epoch + 2 && end.epoch >= v0.epoch,
        "at the end: epoch {} after two proxy restarts from epoch {}",
        end.epoch,
        v0.epoch
    );
}

// ---------------------------------------------------------------------------------------------
// 2. SIGSTOP of the proxy for 3 s
// ---------------------------------------------------------------------------------------------

/// The proxy is stopped for 3 s (longer than the 2 s node idle timeout, so its QUIC links to the
/// replicas die) and continued. Nothing may fail over: the same primary and backup serve after
/// it, at the same epoch or one more; writes resume; every acknowledged write is kept. Client
/// connections must survive (a 3 s pause is well within their 30 s idle timeout); `unknown`
/// answers are tolerated for writes that were in flight on the lost replica links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sigstop_3s_keeps_replicas_and_writes() {
    let _serial = SERIAL.lock().await;
    let policy = Policy {
        unknown_answers: true,
        ..Policy::STRICT
    };
    let (run, v0) = Run::start(builder(), policy).await;
    let (p, b) = (v0.primary.expect("primary"), v0.backup.expect("backup"));
    let epoch = v0.epoch;
    run.say(&format!("primary {p}, backup {b}, epoch {epoch}"));
    let proxy = run.c.proxy_pid();
    let stopped = stop_process(proxy);
    let at_stop = run.acks();
    let hold_end = Instant::now() + Duration::from_secs(3);
    run.say(&format!("proxy {proxy} stopped, {at_stop} acks"));
    sleep_until(hold_end).await;
    let during = run.acks() - at_stop;
    stopped.resume();
    let at_cont = run.acks();
    run.say(&format!("proxy continued, {at_cont} acks"));
    assert!(
        during <= WRITERS as u64,
        "{during} writes were acknowledged while the proxy was stopped: it was not stopped"
    );
    let v = run
        .wait_view(
            RECOVERY,
            &format!(
                "after SIGCONT of the proxy, the same primary {p} and backup {b}, synchronised, \
                 at epoch {epoch} or {}",
                epoch + 1
            ),
            |v| same_replicas(v, p, b, epoch),
        )
        .await;
    run.wait_acks(
        at_cont + 20,
        Duration::from_secs(5),
        "writes resume within 5 s of SIGCONT",
    )
    .await;
    run.wait_acks(
        at_cont + FLOW,
        Duration::from_secs(10),
        "load after SIGCONT",
    )
    .await;
    // STATUS right after SIGCONT can be the proxy's view from before the pause: watch it while
    // the proxy notices its lost links (and the replicas notice theirs).
    let v2 = run
        .hold_steady(
            STEADY,
            &format!("the same replicas in the {STEADY:?} after SIGCONT"),
            |v| same_replicas(v, p, b, epoch),
        )
        .await;
    let at = run.acks();
    run.wait_acks(at + FLOW, Duration::from_secs(10), "load once steady")
        .await;
    assert!(
        v2.epoch >= v.epoch && v2.epoch <= epoch + 1,
        "epoch {} -> {} -> {}: at most one step allowed for a proxy pause",
        epoch,
        v.epoch,
        v2.epoch
    );
    let end = run.finish().await;
    assert_eq!(
        (end.primary, end.backup),
        (Some(p), Some(b)),
        "at the end: the replicas must be the original primary {p} and backup {b}: {:?}",
        end.raw
    );
    assert!(
        end.epoch <= epoch + 1,
        "at the end: epoch {} after one proxy pause from epoch {epoch}",
        end.epoch
    );
}

// ---------------------------------------------------------------------------------------------
// 3. SIGSTOP of the backup past the heartbeat timeout
// ---------------------------------------------------------------------------------------------

/// The backup is stopped for 5 s with a 300 ms heartbeat timeout. The primary must go on serving
/// (same pid, epoch + 1 for its solo grant) and, while the old backup is still stopped, start a
/// replacement backup that synchronises. After SIGCONT the old backup must go away (exit or be
/// killed) without disturbing anything: same primary, same new backup, same epoch, writes go on.
/// No client may see an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_sigstop_5s_is_replaced_while_stopped() {
    let _serial = SERIAL.lock().await;
    const HOLD: Duration = Duration::from_secs(5);
    let builder = builder().set("heartbeat_timeout_ms=300");
    let (run, v0) = Run::start(builder, Policy::STRICT).await;
    let (p, b) = (v0.primary.expect("primary"), v0.backup.expect("backup"));
    let epoch = v0.epoch;
    run.say(&format!("primary {p}, backup {b}, epoch {epoch}"));
    let stopped = stop_process(b);
    let t_stop = Instant::now();
    let hold_end = t_stop + HOLD;
    let at_stop = run.acks();
    run.say(&format!("backup {b} stopped, {at_stop} acks"));
    run.wait_acks(
        at_stop + FLOW,
        hold_end.saturating_duration_since(Instant::now()),
        &format!("the primary goes on serving while the backup is stopped ({HOLD:?})"),
    )
    .await;
    let v1 = run
        .wait_view(
            hold_end.saturating_duration_since(Instant::now()),
            &format!(
                "while the old backup {b} is stopped ({HOLD:?}): primary {p} with a new, \
                 synchronised backup (on one host the replacement needs the BACKUP_SAP that the \
                 stopped backup still holds; the primary started it, knows its pid, and once \
                 granted solo service knows it can never be promoted)"
            ),
            |v| {
                if !alive(p) {
                    return Err(format!("the primary (pid {p}) is gone"));
                }
                if let Some(x) = v.primary
                    && x != p
                {
                    return Err(format!(
                        "the primary changed from {p} to {x}: a paused backup must not cause a \
                         failover"
                    ));
                }
                Ok(v.primary == Some(p) && v.backup.is_some_and(|x| x != b) && v.synced)
            },
        )
        .await;
    let b2 = v1.backup.expect("new backup");
    run.say(&format!(
        "replacement backup {b2} synchronised {:.2}s after the stop, epoch {}",
        t_stop.elapsed().as_secs_f64(),
        v1.epoch
    ));
    assert_eq!(
        v1.epoch,
        epoch + 1,
        "losing the backup must move the epoch by exactly one (the primary's solo grant): {:?}",
        v1.raw
    );
    sleep_until(hold_end).await;
    stopped.resume();
    let at_cont = run.acks();
    run.say(&format!("old backup {b} continued, {at_cont} acks"));
    if !common::wait_until(Duration::from_secs(10), || async { !alive(b) }).await {
        run.fail(&format!(
            "the old backup (pid {b}) is still running 10 s after SIGCONT: it must exit or be \
             killed once replaced"
        ));
    }
    run.say(&format!("old backup {b} is gone"));
    run.wait_acks(
        at_cont + FLOW,
        Duration::from_secs(10),
        "load after the old backup was continued",
    )
    .await;
    let undisturbed = |v: &View| {
        if v.primary != Some(p) || v.backup != Some(b2) || v.epoch != v1.epoch {
            return Err(format!(
                "after SIGCONT of the old backup the cluster changed: expected primary {p}, \
                 backup {b2}, epoch {}",
                v1.epoch
            ));
        }
        Ok(v.synced)
    };
    run.wait_view(
        RECOVERY,
        "after the old backup is gone: nothing changed",
        undisturbed,
    )
    .await;
    let end = run.finish().await;
    if let Err(e) = undisturbed(&end) {
        panic!("at the end: {e}: {:?}", end.raw);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. SIGSTOP of the primary, backups started by a launch command
// ---------------------------------------------------------------------------------------------

/// The primary is stopped for 5 s; backups are started through `backup_launch_command` (a local
/// `exec` of the binary, so a backup knows its primary by SHUTDOWN_SAP and fences it remotely, as
/// across hosts). The backup must be promoted within 3 s (epoch + 1) and writes go on without any
/// client error while the old primary is stopped. After SIGCONT the old primary must be fenced and
/// exit, a new backup must be synchronised (while the old primary was stopped, or at the latest
/// once it is gone: on one host the new primary may need ports the stopped one still holds), and
/// nothing else may change (same promoted primary, same new backup, same epoch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_sigstop_5s_with_launch_command_fails_over() {
    let _serial = SERIAL.lock().await;
    const HOLD: Duration = Duration::from_secs(5);
    const PROMOTE_WITHIN: Duration = Duration::from_secs(3);
    let launch = format!("backup_launch_command=exec '{BIN}' {{args}}");
    let builder = builder()
        .set("heartbeat_timeout_ms=300")
        .server_set(&launch);
    let (run, v0) = Run::start(builder, Policy::STRICT).await;
    let (p, b) = (v0.primary.expect("primary"), v0.backup.expect("backup"));
    let epoch = v0.epoch;
    run.say(&format!("primary {p}, backup {b}, epoch {epoch}"));
    assert_eq!(
        p,
        run.c.server_pid(),
        "the primary is the server process the test started"
    );
    let stopped = stop_process(p);
    let t_stop = Instant::now();
    let hold_end = t_stop + HOLD;
    let at_stop = run.acks();
    run.say(&format!("primary {p} stopped, {at_stop} acks"));
    let v1 = run
        .wait_view(
            PROMOTE_WITHIN,
            &format!(
                "the backup {b} is promoted within {PROMOTE_WITHIN:?} of stopping the primary"
            ),
            |v| match v.primary {
                Some(x) if x != p && x != b => Err(format!(
                    "pid {x}, neither the old primary nor its backup, is primary"
                )),
                _ => Ok(v.primary == Some(b)),
            },
        )
        .await;
    run.say(&format!(
        "backup {b} promoted after {:.2}s, epoch {}",
        t_stop.elapsed().as_secs_f64(),
        v1.epoch
    ));
    assert_eq!(
        v1.epoch,
        epoch + 1,
        "a promotion moves the epoch by exactly one: {:?}",
        v1.raw
    );
    run.wait_acks(
        at_stop + FLOW,
        hold_end.saturating_duration_since(Instant::now()),
        "writes go on after the promotion, while the old primary is stopped",
    )
    .await;
    // A new backup. On one host it may need SAPs that the stopped primary still holds (a backup
    // started by a launch command knows its primary only by SHUTDOWN_SAP, as across hosts), so it
    // is accepted while the old primary is stopped or once that one is gone after SIGCONT.
    let new_backup = |v: &View| {
        if v.primary != Some(b) {
            return Err(format!("the primary is no longer the promoted {b}"));
        }
        if v.epoch != v1.epoch {
            return Err(format!("the epoch moved again, from {}", v1.epoch));
        }
        Ok(v.backup.is_some_and(|x| x != p && x != b) && v.synced)
    };
    let mut b2 = None;
    while b2.is_none() && Instant::now() < hold_end {
        if let Some(v) = view(&run.c).await {
            match new_backup(&v) {
                Err(e) => run.fail(&format!(
                    "while the old primary {p} is stopped: {e}\n  STATUS: {:?}",
                    v.raw
                )),
                Ok(true) => b2 = v.backup,
                Ok(false) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(x) = b2 {
        run.say(&format!(
            "new backup {x} synchronised {:.2}s after the stop, while the old primary is stopped",
            t_stop.elapsed().as_secs_f64()
        ));
    }
    sleep_until(hold_end).await;
    stopped.resume();
    let at_cont = run.acks();
    run.say(&format!("old primary {p} continued, {at_cont} acks"));
    if !common::wait_until(Duration::from_secs(10), || async { !alive(p) }).await {
        run.fail(&format!(
            "the old primary (pid {p}) is still running 10 s after SIGCONT: it must be fenced \
             and exit"
        ));
    }
    run.say(&format!("old primary {p} is gone"));
    let b2 = match b2 {
        Some(x) => x,
        None => {
            let v = run
                .wait_view(
                    RECOVERY,
                    &format!(
                        "once the old primary {p} is gone: the promoted {b} with a new, \
                         synchronised backup"
                    ),
                    new_backup,
                )
                .await;
            let x = v.backup.expect("new backup");
            run.say(&format!(
                "new backup {x} synchronised {:.2}s after the stop (after SIGCONT)",
                t_stop.elapsed().as_secs_f64()
            ));
            x
        }
    };
    run.wait_acks(
        at_cont + FLOW,
        Duration::from_secs(10),
        "load after the old primary was continued",
    )
    .await;
    let undisturbed = |v: &View| {
        if v.primary != Some(b) || v.backup != Some(b2) || v.epoch != v1.epoch {
            return Err(format!(
                "after SIGCONT of the old primary the cluster changed: expected primary {b}, \
                 backup {b2}, epoch {}",
                v1.epoch
            ));
        }
        Ok(v.synced)
    };
    run.wait_view(
        RECOVERY,
        "after the old primary is gone: nothing changed",
        undisturbed,
    )
    .await;
    let end = run.finish().await;
    if let Err(e) = undisturbed(&end) {
        panic!("at the end: {e}: {:?}", end.raw);
    }
}
