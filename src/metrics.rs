//! Metrics: what each process (proxy, primary, backup) counts, served as OpenMetrics text at
//! `GET /metrics` on the optional `metrics_sap` (docs/METRICS.md lists every family).
//!
//! Metrics are observations only: the executors record them, nothing reads them back to decide
//! anything, and the state machines in `ha` know nothing of them. The hot path touches only
//! atomics set up in advance (a request's counter and histogram are picked by array index, never
//! looked up by label), so recording takes no lock and allocates nothing; gauges that mirror the
//! state machines are set on the executors' ticks; a few values are computed when scraped.
//!
//! The HTTP side is a small bounded responder: at most `max_metrics_connections` connections at
//! once (more are closed at once), each served by a task of its own with a deadline
//! (`metrics_timeout_ms`) on reading the request and on writing the answer.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::wire::client::{Command, Op, Status};

/// Upper bounds (seconds) of the latency histograms' buckets (+Inf follows). From 25 µs (a
/// request served from memory) to 10 s (`request_timeout_ms`'s default).
pub const LATENCY_BUCKETS: [f64; 18] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    500e-3, 1.0, 2.5, 5.0, 10.0,
];
const BUCKETS_NS: [u64; 18] = {
    let mut ns = [0u64; 18];
    let mut i = 0;
    while i < 18 {
        ns[i] = (LATENCY_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

/// Largest request head the responder reads (a `GET /metrics` and a few headers).
pub const MAX_REQUEST_HEAD_BYTES: usize = 8192;

/// A latency histogram of atomics: `observe` is a bucket search over 18 bounds and two relaxed
/// additions.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; 19],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS_NS.partition_point(|&b| b < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn encode_into(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); 19];
        for (i, b) in buckets.iter_mut().enumerate() {
            b.0 = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            b.1 = self.counts[i].load(Ordering::Relaxed);
        }
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.encode_into(encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The operation of a request, as a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpLabel {
    Get,
    Put,
    Post,
    Delete,
    Status,
    Shutdown,
    /// Not a known operation (or a frame that could not be read).
    Other,
}

impl OpLabel {
    pub const ALL: [OpLabel; 7] = [
        OpLabel::Get,
        OpLabel::Put,
        OpLabel::Post,
        OpLabel::Delete,
        OpLabel::Status,
        OpLabel::Shutdown,
        OpLabel::Other,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            OpLabel::Get => "get",
            OpLabel::Put => "put",
            OpLabel::Post => "post",
            OpLabel::Delete => "delete",
            OpLabel::Status => "status",
            OpLabel::Shutdown => "shutdown",
            OpLabel::Other => "other",
        }
    }
    pub fn of_command(c: &Command) -> OpLabel {
        match c {
            Command::Get { .. } => OpLabel::Get,
            Command::Put(_) => OpLabel::Put,
            Command::Post(_) => OpLabel::Post,
            Command::Delete { .. } => OpLabel::Delete,
            // Only STATUS asks for a count.
            Command::Count => OpLabel::Status,
        }
    }
    pub fn of_op(o: &Op) -> OpLabel {
        match o {
            Op::Get => OpLabel::Get,
            Op::Put => OpLabel::Put,
            Op::Post => OpLabel::Post,
            Op::Delete => OpLabel::Delete,
            Op::Status => OpLabel::Status,
            Op::Shutdown => OpLabel::Shutdown,
            Op::Other(_) => OpLabel::Other,
        }
    }
}

const STATUSES: [Status; 7] = [
    Status::Ok,
    Status::Malformed,
    Status::NotImplemented,
    Status::Forbidden,
    Status::TooLarge,
    Status::Unavailable,
    Status::Unknown,
];

fn status_index(s: Status) -> usize {
    match s {
        Status::Ok => 0,
        Status::Malformed => 1,
        Status::NotImplemented => 2,
        Status::Forbidden => 3,
        Status::TooLarge => 4,
        Status::Unavailable => 5,
        Status::Unknown => 6,
    }
}

/// The status a node reply becomes for the client.
pub fn reply_status(r: &crate::wire::node::Reply) -> Status {
    use crate::wire::node::Reply;
    match r {
        Reply::Pairs { .. } | Reply::Rejected(_) | Reply::Count(_) => Status::Ok,
        Reply::TooLarge(_) => Status::TooLarge,
        Reply::Malformed(_) => Status::Malformed,
    }
}

/// `..._total{op, status}`: one atomic per pair, picked by index.
#[derive(Debug)]
pub struct RequestCounts {
    counts: [[AtomicU64; 7]; 7],
}

impl Default for RequestCounts {
    fn default() -> Self {
        RequestCounts {
            counts: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl RequestCounts {
    pub fn inc(&self, op: OpLabel, status: Status) {
        self.counts[op as usize][status_index(status)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self, op: OpLabel, status: Status) -> u64 {
        self.counts[op as usize][status_index(status)].load(Ordering::Relaxed)
    }
}

impl EncodeMetric for RequestCounts {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for op in OpLabel::ALL {
            for s in STATUSES {
                let n = self.get(op, s);
                // Data operations always show their `ok` line, so a dashboard sees zeros.
                if n == 0 && !(s == Status::Ok && (op as usize) < 4) {
                    continue;
                }
                let labels = [("op", op.as_str()), ("status", s.as_str())];
                encoder
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// One histogram per data operation (`op` label).
#[derive(Debug, Default)]
pub struct OpLatency {
    by_op: [Histogram; 4],
}

impl OpLatency {
    pub fn observe(&self, op: OpLabel, d: Duration) {
        if let Some(h) = self.by_op.get(op as usize) {
            h.observe(d);
        }
    }
}

impl EncodeMetric for OpLatency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for op in &OpLabel::ALL[..4] {
            let labels = [("op", op.as_str())];
            self.by_op[*op as usize].encode_into(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A gauge with one fixed label and a few values, e.g. `role`.
#[derive(Debug)]
pub struct LabelledGauges<const N: usize> {
    label: &'static str,
    values: [&'static str; N],
    gauges: [AtomicI64; N],
}

impl<const N: usize> LabelledGauges<N> {
    pub fn new(label: &'static str, values: [&'static str; N]) -> Self {
        LabelledGauges {
            label,
            values,
            gauges: std::array::from_fn(|_| AtomicI64::new(0)),
        }
    }
    fn at(&self, value: &str) -> &AtomicI64 {
        let i = self.values.iter().position(|v| *v == value).unwrap_or(0);
        &self.gauges[i]
    }
    pub fn set(&self, value: &str, v: i64) {
        self.at(value).store(v, Ordering::Relaxed);
    }
    pub fn inc(&self, value: &str) {
        self.at(value).fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self, value: &str) {
        self.at(value).fetch_sub(1, Ordering::Relaxed);
    }
    /// Exactly one of the values is 1 (a state set).
    pub fn only(&self, value: &str) {
        for (i, v) in self.values.iter().enumerate() {
            self.gauges[i].store(i64::from(*v == value), Ordering::Relaxed);
        }
    }
    pub fn get(&self, value: &str) -> i64 {
        self.at(value).load(Ordering::Relaxed)
    }
}

impl<const N: usize> EncodeMetric for LabelledGauges<N> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (i, v) in self.values.iter().enumerate() {
            let labels = [(self.label, *v)];
            encoder
                .encode_family(&labels)?
                .encode_gauge(&self.gauges[i].load(Ordering::Relaxed))?;
        }
        Ok(())
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// A metric shared with the code that records it.
#[derive(Debug)]
struct Shared<T>(Arc<T>);

impl<T: EncodeMetric> EncodeMetric for Shared<T> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

/// A gauge computed when scraped.
pub struct Computed(Box<dyn Fn() -> f64 + Send + Sync>);

impl std::fmt::Debug for Computed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Computed")
    }
}

impl EncodeMetric for Computed {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&(self.0)())
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ------------------------------------------------------------------------------------------------
// Proxy
// ------------------------------------------------------------------------------------------------

/// What the proxy records.
#[derive(Debug)]
pub struct ProxyMetrics {
    /// Answers sent to clients, by operation and status.
    pub requests: Arc<RequestCounts>,
    /// From the moment a request is read to the moment its answer is handed to its stream.
    pub latency: Arc<OpLatency>,
    /// Requests the router holds unanswered.
    pub pending: Gauge,
    /// Client requests handed to the router and not yet answered (its queue included).
    pub in_flight: Gauge,
    /// Connections by role: client, admin, primary, backup.
    pub connections: Arc<LabelledGauges<4>>,
    pub epoch: Gauge,
    /// Failovers the witness carried out (a backup promoted).
    pub failovers: Counter,
    /// absent / syncing / synced, as the witness knows it.
    pub backup_state: Arc<LabelledGauges<3>>,
    /// 1 while a primary is registered and routed to.
    pub primary_up: Gauge,
    /// Pairs the primary holds, as of its last heartbeat.
    pub pairs: Gauge,
}

impl ProxyMetrics {
    /// The metrics and the registry that serves them.
    pub fn new() -> (Arc<ProxyMetrics>, Registry) {
        let m = ProxyMetrics {
            requests: Arc::default(),
            latency: Arc::default(),
            pending: Gauge::default(),
            in_flight: Gauge::default(),
            connections: Arc::new(LabelledGauges::new(
                "role",
                ["client", "admin", "primary", "backup"],
            )),
            epoch: Gauge::default(),
            failovers: Counter::default(),
            backup_state: Arc::new(LabelledGauges::new(
                "state",
                ["absent", "syncing", "synced"],
            )),
            primary_up: Gauge::default(),
            pairs: Gauge::default(),
        };
        let mut r = Registry::with_prefix("tuplespace");
        r.register(
            "requests",
            "Answers sent to clients, by operation and status",
            Shared(m.requests.clone()),
        );
        r.register_with_unit(
            "request_duration",
            "Proxy end to end: from reading a request to handing its answer to the client's stream",
            Unit::Seconds,
            Shared(m.latency.clone()),
        );
        r.register(
            "requests_pending",
            "Requests the router holds unanswered (sent to a replica or waiting for one)",
            m.pending.clone(),
        );
        r.register(
            "requests_in_flight",
            "Client requests handed to the router and not yet answered (its queue included)",
            m.in_flight.clone(),
        );
        r.register(
            "connections",
            "Open connections by role (client, admin, primary, backup)",
            Shared(m.connections.clone()),
        );
        r.register("epoch", "The witness's epoch", m.epoch.clone());
        r.register(
            "failovers",
            "Failovers carried out by this proxy (backup promoted)",
            m.failovers.clone(),
        );
        r.register(
            "backup_state",
            "The backup as the witness knows it: 1 for the current state (absent, syncing, synced)",
            Shared(m.backup_state.clone()),
        );
        r.register(
            "primary_up",
            "1 while a primary is registered with this proxy",
            m.primary_up.clone(),
        );
        r.register(
            "pairs",
            "Pairs in the space, as of the primary's last heartbeat",
            m.pairs.clone(),
        );
        (Arc::new(m), r)
    }
}

// ------------------------------------------------------------------------------------------------
// Server (primary or backup)
// ------------------------------------------------------------------------------------------------

/// The log writer's observations (set by its thread; present only with a log).
#[derive(Debug, Default)]
pub struct WalMetrics {
    /// One `fdatasync` of the log.
    pub fsync: Histogram,
    /// One group append (`write` of everything queued), sync excluded.
    pub write: Histogram,
    pub appended_bytes: AtomicU64,
    pub snapshots: AtomicU64,
    /// When the newest snapshot this replica wrote or recovered from was written (Unix ms; 0 =
    /// none).
    pub last_snapshot_unix_ms: AtomicU64,
}

/// A backup's initial copy, as the primary sends it.
#[derive(Debug, Default)]
pub struct SyncProgress {
    pub pairs_total: AtomicU64,
    pub pairs_sent: AtomicU64,
}

/// Updates in flight to a backup whose byte position is remembered for the lag in bytes; an
/// acknowledgement of an update further back leaves that figure as it was until the next one.
pub const LAG_RING: usize = 4096;

/// What the primary's link to its backup has written and had acknowledged, in bytes of updates:
/// the writer notes each update's end position in a ring of atomics (no lock), the reader of
/// acknowledgements looks the acknowledged update up there.
#[derive(Debug)]
pub struct ReplicationLag {
    /// Bytes of updates written to the replication stream (all backups so far).
    pub sent_bytes: AtomicU64,
    /// Of those, acknowledged by the backup (an update counts once its seq is acknowledged).
    pub acked_bytes: AtomicU64,
    ring: Box<[(AtomicU64, AtomicU64)]>,
}

impl Default for ReplicationLag {
    fn default() -> Self {
        ReplicationLag {
            sent_bytes: AtomicU64::new(0),
            acked_bytes: AtomicU64::new(0),
            ring: (0..LAG_RING)
                .map(|_| (AtomicU64::new(u64::MAX), AtomicU64::new(0)))
                .collect(),
        }
    }
}

impl ReplicationLag {
    /// A new backup: nothing of what was sent before is owed.
    pub fn restart(&self) {
        self.acked_bytes
            .store(self.sent_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    /// Update `seq` of `bytes` was written (writer task only).
    pub fn sent(&self, seq: u64, bytes: usize) {
        let end = self.sent_bytes.load(Ordering::Relaxed) + bytes as u64;
        self.sent_bytes.store(end, Ordering::Relaxed);
        let slot = &self.ring[(seq % LAG_RING as u64) as usize];
        slot.0.store(u64::MAX, Ordering::Release);
        slot.1.store(end, Ordering::Release);
        slot.0.store(seq, Ordering::Release);
    }
    /// The backup acknowledged every update up to `seq`.
    pub fn acked(&self, seq: u64) {
        let slot = &self.ring[(seq % LAG_RING as u64) as usize];
        if slot.0.load(Ordering::Acquire) != seq {
            return;
        }
        let end = slot.1.load(Ordering::Acquire);
        if slot.0.load(Ordering::Acquire) == seq {
            self.acked_bytes.fetch_max(end, Ordering::Relaxed);
        }
    }
}

/// What a replica records.
#[derive(Debug)]
pub struct ServerMetrics {
    /// Requests answered by this replica's store (as primary), by operation and status.
    pub requests: Arc<RequestCounts>,
    /// Store: from taking a request to its answer (scans on the scan threads included).
    pub apply: Arc<OpLatency>,
    /// From handing an update to the backup link to its acknowledgement (sampled: one update in
    /// flight at a time).
    pub replicate: Arc<Histogram>,
    /// Answers held until the backup and the log have what they depend on.
    pub held: Gauge,
    /// 1 for the current role (primary, backup).
    pub role: Arc<LabelledGauges<2>>,
    /// Connections by peer: proxy, backup (our backup's replication link), primary (the
    /// primary's replication link to us).
    pub connections: Arc<LabelledGauges<3>>,
    pub epoch: Gauge,
    /// Promotions of this replica (backup to primary).
    pub promotions: Counter,
    /// Primary: its backup, absent / syncing / synced.
    pub backup_state: Arc<LabelledGauges<3>>,
    pub sync: Arc<SyncProgress>,
    /// Primary: updates applied and not acknowledged by a synchronised backup.
    pub lag_updates: Gauge,
    pub lag: Arc<ReplicationLag>,
    pub wal: Arc<WalMetrics>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            requests: Arc::default(),
            apply: Arc::default(),
            replicate: Arc::default(),
            held: Gauge::default(),
            role: Arc::new(LabelledGauges::new("role", ["primary", "backup"])),
            connections: Arc::new(LabelledGauges::new("role", ["proxy", "backup", "primary"])),
            epoch: Gauge::default(),
            promotions: Counter::default(),
            backup_state: Arc::new(LabelledGauges::new(
                "state",
                ["absent", "syncing", "synced"],
            )),
            sync: Arc::default(),
            lag_updates: Gauge::default(),
            lag: Arc::default(),
            wal: Arc::default(),
        }
    }
}

impl ServerMetrics {
    /// The registry that serves `m`; `pairs` and `seq` are the store's own counters.
    pub fn registry(
        m: &Arc<ServerMetrics>,
        with_log: bool,
        pairs: Arc<AtomicU64>,
        seq: Arc<AtomicU64>,
    ) -> Registry {
        let mut r = Registry::with_prefix("tuplespace");
        r.register(
            "requests",
            "Requests this replica's store answered, by operation and status",
            Shared(m.requests.clone()),
        );
        r.register_with_unit(
            "apply_duration",
            "Store: from taking a request to producing its answer (scans included)",
            Unit::Seconds,
            Shared(m.apply.clone()),
        );
        r.register_with_unit(
            "replicate_duration",
            "Primary: from handing an update to the backup link to its acknowledgement (sampled)",
            Unit::Seconds,
            Shared(m.replicate.clone()),
        );
        r.register(
            "replies_held",
            "Answers held until the backup and the log hold what they depend on",
            m.held.clone(),
        );
        r.register("role", "1 for this replica's role", Shared(m.role.clone()));
        r.register(
            "connections",
            "Open links by peer (proxy, backup, primary)",
            Shared(m.connections.clone()),
        );
        r.register("epoch", "This replica's epoch", m.epoch.clone());
        r.register(
            "promotions",
            "Times this replica was promoted to primary",
            m.promotions.clone(),
        );
        r.register(
            "backup_state",
            "Primary: its backup, 1 for the current state (absent, syncing, synced)",
            Shared(m.backup_state.clone()),
        );
        let s = m.sync.clone();
        r.register(
            "backup_sync_copy_pairs",
            "Primary: pairs in the copy being sent to a new backup",
            Computed(Box::new(move || {
                s.pairs_total.load(Ordering::Relaxed) as f64
            })),
        );
        let s = m.sync.clone();
        r.register(
            "backup_sync_sent_pairs",
            "Primary: pairs of that copy sent so far",
            Computed(Box::new(move || {
                s.pairs_sent.load(Ordering::Relaxed) as f64
            })),
        );
        r.register(
            "replication_lag_updates",
            "Primary: updates applied that the backup has not acknowledged",
            m.lag_updates.clone(),
        );
        let l = m.lag.clone();
        r.register_with_unit(
            "replication_lag",
            "Primary: bytes of updates written to the backup link and not acknowledged",
            Unit::Bytes,
            Computed(Box::new(move || {
                l.sent_bytes
                    .load(Ordering::Relaxed)
                    .saturating_sub(l.acked_bytes.load(Ordering::Relaxed)) as f64
            })),
        );
        r.register(
            "seq",
            "Update number (seq) last applied",
            Computed(Box::new(move || seq.load(Ordering::Relaxed) as f64)),
        );
        r.register(
            "pairs",
            "Pairs resident in this replica",
            Computed(Box::new(move || pairs.load(Ordering::Relaxed) as f64)),
        );
        if with_log {
            let w = m.wal.clone();
            r.register_with_unit(
                "wal_fsync_duration",
                "One fdatasync of the write-ahead log",
                Unit::Seconds,
                Computed2::Hist(w.clone(), |w| &w.fsync),
            );
            r.register_with_unit(
                "wal_write_duration",
                "One group append to the write-ahead log (sync excluded)",
                Unit::Seconds,
                Computed2::Hist(w.clone(), |w| &w.write),
            );
            let x = w.clone();
            r.register_with_unit(
                "wal_appended",
                "Bytes appended to the write-ahead log",
                Unit::Bytes,
                Computed2::Counter(Box::new(move || x.appended_bytes.load(Ordering::Relaxed))),
            );
            let x = w.clone();
            r.register(
                "snapshots",
                "Snapshots written by this replica",
                Computed2::Counter(Box::new(move || x.snapshots.load(Ordering::Relaxed))),
            );
            let x = w;
            r.register_with_unit(
                "snapshot_age",
                "Time since the newest snapshot this replica wrote or recovered from (-1: none)",
                Unit::Seconds,
                Computed(Box::new(move || {
                    match x.last_snapshot_unix_ms.load(Ordering::Relaxed) {
                        0 => -1.0,
                        t => unix_ms().saturating_sub(t) as f64 / 1e3,
                    }
                })),
            );
        }
        r
    }
}

/// A histogram or counter that lives inside a shared struct.
enum Computed2 {
    Hist(Arc<WalMetrics>, fn(&WalMetrics) -> &Histogram),
    Counter(Box<dyn Fn() -> u64 + Send + Sync>),
}

impl std::fmt::Debug for Computed2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Computed2")
    }
}

impl EncodeMetric for Computed2 {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self {
            Computed2::Hist(w, pick) => pick(w).encode_into(encoder),
            Computed2::Counter(f) => encoder.encode_counter::<NoLabelSet, _, u64>(&f(), None),
        }
    }
    fn metric_type(&self) -> MetricType {
        match self {
            Computed2::Hist(..) => MetricType::Histogram,
            Computed2::Counter(_) => MetricType::Counter,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The responder
// ------------------------------------------------------------------------------------------------

/// The registry's OpenMetrics text (ends with `# EOF`).
pub fn render(registry: &Registry) -> String {
    let mut s = String::with_capacity(16 * 1024);
    if prometheus_client::encoding::text::encode(&mut s, registry).is_err() {
        s.clear();
        let _ = writeln!(s, "# EOF");
    }
    s
}

/// Binds `sap` and serves `GET /metrics` until `stop`. A SAP another process still holds (the
/// previous backup being stopped) is retried every `metrics_timeout_ms`, with a warning every
/// few attempts; metrics never stop the process.
pub fn spawn(
    sap: Option<&str>,
    what: &'static str,
    registry: Registry,
    cfg: &Config,
    stop: CancellationToken,
) {
    let Some(sap) = sap.filter(|s| !s.is_empty()) else {
        return;
    };
    let addr: SocketAddr = match crate::net::endpoint::resolve_sap(sap) {
        Ok(a) => a,
        Err(e) => {
            warn!("metrics_sap `{sap}`: {e}; {what} serves no metrics");
            return;
        }
    };
    let registry = Arc::new(registry);
    let timeout = Duration::from_millis(cfg.metrics_timeout_ms);
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_metrics_connections));
    tokio::spawn(async move {
        let mut attempts = 0u32;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    if attempts.is_multiple_of(10) {
                        warn!(
                            "cannot bind metrics_sap {addr}: {e}; retrying every {} ms (metrics_timeout_ms)",
                            timeout.as_millis()
                        );
                    }
                    attempts = attempts.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(timeout) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        };
        info!(metrics_sap = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "{what} serves metrics at GET /metrics");
        loop {
            let (sock, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => { debug!("metrics accept: {e}"); continue }
                },
                _ = stop.cancelled() => return,
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                debug!(%peer, "metrics: too many connections (max_metrics_connections); closing");
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if tokio::time::timeout(timeout, answer(sock, &registry))
                    .await
                    .is_err()
                {
                    debug!(%peer, "metrics: connection timed out (metrics_timeout_ms)");
                }
            });
        }
    });
}

/// Reads one request head (bounded) and answers it, then closes.
async fn answer(mut sock: tokio::net::TcpStream, registry: &Registry) {
    let mut buf = vec![0u8; MAX_REQUEST_HEAD_BYTES];
    let mut n = 0;
    let head_end = loop {
        if let Some(i) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(i);
        }
        if n == buf.len() {
            break None;
        }
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return,
            Ok(k) => n += k,
        }
    };
    let (status, ctype, body) = match head_end {
        None => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too large\n".to_owned(),
        ),
        Some(i) => {
            let head = String::from_utf8_lossy(&buf[..i]);
            let mut first = head.lines().next().unwrap_or("").split(' ');
            let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
            let path = target.split('?').next().unwrap_or("");
            match (method, path) {
                ("GET", "/metrics") => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render(registry),
                ),
                ("GET", _) => (
                    "404 Not Found",
                    "text/plain",
                    "not found: metrics are at /metrics\n".to_owned(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET /metrics is served\n".to_owned(),
                ),
            }
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if sock.write_all(head.as_bytes()).await.is_ok()
        && sock.write_all(body.as_bytes()).await.is_ok()
    {
        let _ = sock.shutdown().await;
    }
}

/// CPU time the calling thread has used (tests that bound work, not wall time).
#[cfg(test)]
pub(crate) fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_sum() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_secs(20));
        assert_eq!(h.count(), 3);
        assert_eq!(h.counts[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.counts[1].load(Ordering::Relaxed), 1);
        assert_eq!(h.counts[18].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn proxy_registry_renders_openmetrics() {
        let (m, r) = ProxyMetrics::new();
        m.requests.inc(OpLabel::Put, Status::Ok);
        m.latency.observe(OpLabel::Put, Duration::from_millis(1));
        m.connections.inc("client");
        let s = render(&r);
        assert!(s.ends_with("# EOF\n"), "{s}");
        assert!(
            s.contains("tuplespace_requests_total{op=\"put\",status=\"ok\"} 1"),
            "{s}"
        );
        assert!(s.contains("# TYPE tuplespace_request_duration_seconds histogram"));
    }

    /// What one request costs the proxy's recording: a clock reading, the counter, the histogram
    /// and the in-flight gauge up and down (the store records a little less). Timing, not a check:
    /// `cargo test --release --lib metrics::tests::recording_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn recording_cost() {
        fn cpu_ns() -> u128 {
            super::thread_cpu_time().as_nanos()
        }
        let (m, _r) = ProxyMetrics::new();
        let n = 20_000_000u32;
        let c = cpu_ns();
        let mut x = std::time::Duration::ZERO;
        for _ in 0..n {
            x += std::time::Instant::now().elapsed();
        }
        let clock = (cpu_ns() - c) as f64 / f64::from(n);
        assert!(x > std::time::Duration::ZERO);
        let c = cpu_ns();
        for i in 0..n {
            let start = std::time::Instant::now();
            let op = if i & 1 == 0 {
                OpLabel::Get
            } else {
                OpLabel::Put
            };
            m.in_flight.inc();
            m.requests.inc(op, Status::Ok);
            m.latency.observe(op, start.elapsed());
            m.in_flight.dec();
        }
        let ns = (cpu_ns() - c) as f64 / f64::from(n);
        println!(
            "{ns:.1} ns of thread CPU per request recorded, of which {clock:.1} ns the two clock readings (one thread, {n} requests)"
        );
        assert_eq!(m.latency.by_op[0].count(), u64::from(n / 2));
    }

    #[test]
    fn server_registry_renders() {
        let m = Arc::new(ServerMetrics::default());
        let r = ServerMetrics::registry(&m, true, Arc::default(), Arc::default());
        let s = render(&r);
        assert!(s.contains("tuplespace_snapshot_age_seconds -1"), "{s}");
        assert!(s.contains("# TYPE tuplespace_wal_fsync_duration_seconds histogram"));
    }
}
