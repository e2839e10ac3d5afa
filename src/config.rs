//! Every timeout, limit and tunable constant of the service, in one place.
//!
//! Loaded from `config/tuplespace.toml` (all keys optional, documented defaults below), then
//! overridden by command-line flags, then checked by [`Config::validate`]. Nothing else in the crate
//! may hard-code a timeout or a limit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::space::{PatternLimits, TupleLimits};

/// The scheduling policy of service processes ([`Config::cpu_policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CpuPolicy {
    /// `SCHED_BATCH`: no wake-up preemption.
    #[default]
    Batch,
    /// `SCHED_OTHER`, the OS default.
    Normal,
}

impl CpuPolicy {
    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            CpuPolicy::Batch => "batch",
            CpuPolicy::Normal => "normal",
        }
    }

    /// Puts the calling thread, and the threads it starts afterwards (they inherit it), under
    /// this policy. Elsewhere than on Linux it does nothing.
    pub fn apply(self) -> Result<(), std::io::Error> {
        #[cfg(target_os = "linux")]
        {
            let p = match self {
                CpuPolicy::Batch => libc::SCHED_BATCH,
                CpuPolicy::Normal => libc::SCHED_OTHER,
            };
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sched_setscheduler only reads `param`; pid 0 is the calling thread.
            if unsafe { libc::sched_setscheduler(0, p, &param) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot set the scheduling policy `cpu_policy = \"{}\"`: {e}",
                        self.name()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Errors loading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}; check the path or pass --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "config file `{path}` is not valid: {source}; fix the named key (see config/tuplespace.toml for every key)"
    )]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// All tunables. Times are in milliseconds so that the TOML file stays plain integers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    // ---- limits (PROTOCOL.md §2, §3) ----
    /// Largest request frame a client may send (bytes of CBOR after the 4-byte length).
    pub max_request_bytes: usize,
    /// Largest response the service will produce; a bigger answer gets `too-large`.
    pub max_response_bytes: usize,
    /// Most elements in one tuple.
    pub max_tuple_arity: usize,
    /// Most UTF-8 bytes in one tuple element.
    pub max_element_bytes: usize,
    /// Most elements in one PUT/POST request (more -> `malformed`).
    pub max_pairs_per_request: usize,
    /// Longest regular expression source accepted, in bytes.
    pub max_pattern_bytes: usize,
    /// Compiled-size limit handed to the regex engine (bigger -> malformed pattern).
    pub regex_size_limit: usize,
    /// Client connections the proxy accepts at once; the next one is refused.
    pub max_clients: usize,
    /// Bidirectional streams a client may have open at once on one connection.
    pub max_streams_per_connection: u32,
    /// Requests a client may have outstanding on one stream before the service stops reading it.
    pub max_outstanding_per_stream: usize,
    /// Requests one client connection may have pending at the proxy, all its streams together
    /// (reset streams included: a request counts until the service has answered it).
    pub max_pending_per_connection: usize,
    /// Bytes of client requests the proxy holds pending, all connections together; reading from
    /// clients pauses (back-pressure) while the budget is spent. A request counts what it holds
    /// in memory once read (its bytes and one handle per PUT/POST element), not its frame length.
    pub max_pending_bytes: usize,
    /// Replies a replica keeps for answering re-sent requests (dedupe table), at most; the oldest
    /// go first (with a warning) when the proxy's watermark does not trim them in time.
    pub max_dedupe_entries: usize,
    /// ... and at most this many bytes of them (estimated memory; the newest reply is always
    /// kept). The table travels to a new backup and into the log in chunks of about 1 MiB.
    pub max_dedupe_bytes: usize,
    /// Threads of a replica that compile client patterns and run GET/DELETE scans, away from the
    /// store thread that applies writes.
    pub scan_threads: usize,
    /// Bytes of answers the proxy holds for one client connection that QUIC has not taken yet (the
    /// client is not reading them). Above it the connection's streams stop reading requests
    /// (throttle); a connection that stays above it for `slow_reader_timeout_ms` is closed with
    /// SLOW_READER.
    pub max_reply_bytes_per_connection: usize,
    /// Bytes of such unread answers the proxy holds, all connections together. An answer that
    /// would pass it closes the connection holding the most (SLOW_READER).
    pub max_reply_bytes: usize,
    /// Client connections one client certificate may hold at once on one SAP (the next is closed
    /// with SERVICE_REFUSED), so that one certificate cannot take every `max_clients` slot.
    pub max_connections_per_identity: usize,
    /// QUIC handshakes in progress at once on one listening SAP (proxy and servers). Above it a
    /// new attempt from an address not yet validated gets a stateless Retry (it costs the service
    /// nothing until the peer proves its address); others wait for a slot.
    pub max_handshakes: usize,
    /// Of those, at most this many for addresses QUIC has not validated (a peer that never
    /// completes holds one until `connect_timeout_ms`): beyond it such an attempt gets a stateless
    /// Retry, so that a flood of them never takes the slots a real peer needs. 0 = always Retry.
    pub max_unvalidated_handshakes: usize,
    /// Connection attempts a listening SAP holds before the service has started their handshake
    /// (waiting for a slot included); beyond it QUIC refuses new attempts at once.
    pub max_incoming: usize,
    /// Bytes QUIC buffers for connection attempts not yet started, all together per SAP.
    pub incoming_buffer_bytes: u64,
    /// Server side: bytes of answers queued for the proxy that QUIC has not taken yet. Above it
    /// the primary's store stops starting new requests until the proxy has read enough.
    pub max_relay_reply_bytes: usize,
    /// Requests waiting for a match (PROTOCOL.md §4a `wait_ms`) a primary holds at once, all
    /// connections together; one more is answered at once (`ok`, no pairs, a message).
    pub max_waiters: usize,
    /// ... and at most this many of one client connection.
    pub max_waiters_per_connection: usize,
    /// A limited GET/DELETE (`limit`) whose patterns are compiled already is matched on the store
    /// thread when it needs to look at no more than this many keys (a work-queue take: the first
    /// key under a prefix); otherwise it goes to the scan threads. 0 = always the scan threads.
    pub max_inline_visits: usize,

    // ---- timeouts (ms) ----
    /// QUIC idle timeout on client connections.
    pub idle_timeout_ms: u64,
    /// QUIC keep-alive interval sent by our own client (must be below every idle timeout).
    pub keep_alive_ms: u64,
    /// QUIC idle timeout on links between proxy and servers and between the two servers.
    pub node_idle_timeout_ms: u64,
    /// QUIC keep-alive interval on node links.
    pub node_keep_alive_ms: u64,
    /// How long a QUIC connect may take before it is abandoned (also the deadline for a peer's
    /// handshake on every listening SAP).
    pub connect_timeout_ms: u64,
    /// How long a client connection may stay above `max_reply_bytes_per_connection` (its answers
    /// unread) before it is closed with SLOW_READER.
    pub slow_reader_timeout_ms: u64,
    /// How long the proxy waits for some replica to answer a request before `unavailable`.
    pub request_timeout_ms: u64,
    /// Longest a GET or DELETE may wait for a match (`wait_ms` of PROTOCOL.md §4a is capped to
    /// it). The proxy waits this plus `request_timeout_ms` for the answer of a waiting request.
    pub max_wait_ms: u64,
    /// Interval between application heartbeats (server -> proxy, backup <-> primary).
    pub heartbeat_interval_ms: u64,
    /// Heartbeats missing for this long = the peer is considered failed.
    pub heartbeat_timeout_ms: u64,
    /// How long a primary keeps serving without the proxy before it saves and exits.
    pub proxy_loss_timeout_ms: u64,
    /// How long a graceful shutdown (stop backup, save) may take before giving up.
    pub shutdown_timeout_ms: u64,
    /// How long STATUS waits for the primary to count its pairs; past it `pairs` is null.
    pub status_timeout_ms: u64,
    /// Refresh period of `tuplespace client status --watch`.
    pub status_watch_interval_ms: u64,
    /// Pause between attempts to (re)start a backup, doubled at each failed attempt.
    pub backup_retry_backoff_ms: u64,
    /// Doublings of the backup retry pause (after this many failed attempts in a row it stops
    /// growing); the primary serves alone and keeps retrying.
    pub backup_start_retries: u32,
    /// How long a new backup may take to start, connect and synchronise.
    pub backup_sync_timeout_ms: u64,
    /// How long a synchronised backup that still receives every update (its heartbeats say how
    /// far it has applied) may leave them unacknowledged — its log is slow to sync — before the
    /// primary drops it. A backup that receives nothing new is dropped after
    /// `heartbeat_timeout_ms` as before (a cut replication link). Taken as
    /// `heartbeat_timeout_ms` where that is longer.
    pub backup_ack_timeout_ms: u64,

    // ---- operations ----
    /// Async worker threads of a proxy or server process; 0 = one thread (current-thread
    /// runtime), which is fastest on small machines where several processes share the cores.
    pub runtime_threads: usize,
    /// Linux scheduling policy of proxy and server processes (all their threads): "batch"
    /// (`SCHED_BATCH`: a thread woken by a packet or a hand-off does not preempt the one running,
    /// so each runs its batch to the end; fewer context switches per request) or "normal"
    /// (`SCHED_OTHER`). Same priority either way.
    pub cpu_policy: CpuPolicy,
    /// UDP socket receive/send buffer size asked of the kernel (bytes); 0 = OS default.
    pub udp_buffer_bytes: usize,
    /// Command run (via `sh -c`) on every operator-visible event; details in TS_EVENT_* vars.
    pub notify_command: Option<String>,
    /// Command template to start a backup on another host; `{args}` is replaced by the server
    /// arguments. Empty = start the backup locally as a child process.
    pub backup_launch_command: Option<String>,
    /// Where the proxy keeps its durable state (the epoch it last granted, who holds the office,
    /// its incarnation for request ids). Without it a restarted proxy cannot recognise a deposed
    /// primary. `up` puts it next to the save file.
    pub proxy_state_file: Option<PathBuf>,
    /// A proxy started without a state file waits this long (or until a primary and a backup
    /// have said hello) to learn the replicas' epochs before it accepts a primary, so that it
    /// never seats a deposed one.
    pub proxy_fresh_wait_ms: u64,

    // ---- metrics ----
    /// Where this process serves OpenMetrics text at `GET /metrics` (plain HTTP/1.1, TCP), e.g.
    /// "127.0.0.1:7403". None or "" = no metrics. `up` sets it for the proxy and the first
    /// primary.
    pub metrics_sap: Option<String>,
    /// Where a backup started by this server serves its metrics. The backup is started with
    /// `metrics_sap` = this and `backup_metrics_sap` = the starting server's `metrics_sap`, so
    /// after a failover the next backup takes the address the old primary had. None or "" = the
    /// backup serves no metrics.
    pub backup_metrics_sap: Option<String>,
    /// Deadline for one metrics connection (reading the request and writing the answer); also
    /// the pause between attempts to bind a `metrics_sap` that another process still holds.
    pub metrics_timeout_ms: u64,
    /// Metrics connections served at once; more are closed at once.
    pub max_metrics_connections: usize,

    // ---- durability ----
    /// Where replicas keep their logs and snapshots (one `replica-*` directory per process).
    /// Empty = `<SAVE_FILE>.d`; with neither, a replica keeps the space in memory only.
    pub data_dir: Option<PathBuf>,
    /// When the log is synced: "always" (before a write is acknowledged; survives a power cut),
    /// "interval" (every `fsync_interval_ms`), "never" (the OS decides; survives a process crash).
    pub fsync: crate::durable::FsyncPolicy,
    /// Sync period of the "interval" policy.
    pub fsync_interval_ms: u64,
    /// A snapshot is written (and the log truncated) after this many logged changes (0 = never).
    pub snapshot_every_changes: u64,
    /// ... or after this many bytes of log (0 = never).
    pub snapshot_every_bytes: u64,
    /// Log records queued for the log writer before the store waits for it (back-pressure).
    pub wal_queue_records: usize,
    /// Size of a log segment. Each is preallocated (written with zeros and synced in the
    /// background before it is used) so that an `fdatasync` after an append has no file size or
    /// block allocation to commit; the writer moves to the next segment when one is full.
    /// 0 = no preallocation: segments grow by appending and change only at snapshots.
    pub wal_segment_bytes: u64,
    /// Snapshots and preallocated log segments, written in the background, sync their data
    /// every this many bytes as they are written (0 = once, at the end): the disk then never
    /// holds much of them unsynced, so a log sync after an append waits behind at most this much
    /// of their data instead of all of it (a snapshot of millions of pairs is hundreds of MiB).
    pub background_sync_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_request_bytes: 1 << 20,
            max_response_bytes: 64 << 20,
            max_tuple_arity: 64,
            max_element_bytes: 4096,
            max_pairs_per_request: 100_000,
            max_pattern_bytes: 8192,
            regex_size_limit: 1 << 20,
            max_clients: 1024,
            max_streams_per_connection: 16,
            max_outstanding_per_stream: 1024,
            max_pending_per_connection: 4096,
            max_pending_bytes: 256 << 20,
            max_dedupe_entries: 1_000_000,
            max_dedupe_bytes: 256 << 20,
            scan_threads: 1,
            max_reply_bytes_per_connection: 64 << 20,
            max_reply_bytes: 256 << 20,
            max_connections_per_identity: 256,
            max_handshakes: 64,
            max_unvalidated_handshakes: 32,
            max_incoming: 1024,
            incoming_buffer_bytes: 4 << 20,
            max_relay_reply_bytes: 64 << 20,
            max_waiters: 100_000,
            max_waiters_per_connection: 4096,
            max_inline_visits: 1024,
            idle_timeout_ms: 30_000,
            keep_alive_ms: 5_000,
            node_idle_timeout_ms: 2_000,
            node_keep_alive_ms: 100,
            connect_timeout_ms: 3_000,
            slow_reader_timeout_ms: 10_000,
            request_timeout_ms: 10_000,
            max_wait_ms: 60_000,
            heartbeat_interval_ms: 50,
            heartbeat_timeout_ms: 300,
            proxy_loss_timeout_ms: 5_000,
            shutdown_timeout_ms: 10_000,
            status_timeout_ms: 1_000,
            status_watch_interval_ms: 1_000,
            backup_retry_backoff_ms: 200,
            backup_start_retries: 5,
            backup_sync_timeout_ms: 60_000,
            backup_ack_timeout_ms: 2_000,
            runtime_threads: 0,
            cpu_policy: CpuPolicy::Batch,
            udp_buffer_bytes: 4 << 20,
            notify_command: None,
            backup_launch_command: None,
            proxy_state_file: None,
            proxy_fresh_wait_ms: 10_000,
            metrics_sap: None,
            backup_metrics_sap: None,
            metrics_timeout_ms: 5_000,
            max_metrics_connections: 16,
            data_dir: None,
            fsync: crate::durable::FsyncPolicy::Always,
            fsync_interval_ms: 100,
            snapshot_every_changes: 1_000_000,
            snapshot_every_bytes: 256 << 20,
            wal_queue_records: 65_536,
            wal_segment_bytes: 16 << 20,
            background_sync_bytes: 4 << 20,
        }
    }
}

/// Room for a response's envelope (id, status, keys) around an echoed request.
pub const RESPONSE_ENVELOPE_BYTES: usize = 1024;

/// Bounds of `wal_segment_bytes` (when not 0): a segment holds many groups of appends, and a
/// spare one is written in the background, so it must neither be tiny nor take minutes.
pub const MIN_WAL_SEGMENT_BYTES: u64 = 1 << 20;
pub const MAX_WAL_SEGMENT_BYTES: u64 = 4 << 30;

/// Smallest `background_sync_bytes` other than 0 (a sync per few KiB would make snapshots crawl).
pub const MIN_BACKGROUND_SYNC_BYTES: u64 = 64 << 10;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "config/tuplespace.toml";

impl Config {
    /// Loads `path`, applies `KEY=VALUE` overrides (TOML values), and validates the result. A
    /// missing file at the *default* path gives the defaults (so the binary works from any
    /// directory); a missing file that the user named is an error.
    pub fn load_with(
        path: &Path,
        explicit: bool,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = match std::fs::read_to_string(path) {
            Ok(t) => toml::from_str(&t).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                source: Box::new(e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => toml::Table::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        for o in overrides {
            let Some((k, v)) = o.split_once('=') else {
                return Err(ConfigError::Invalid {
                    key: "--set",
                    problem: format!("`{o}` is not KEY=VALUE"),
                });
            };
            let one: toml::Table = toml::from_str(&format!("{} = {}", k.trim(), v.trim()))
                .or_else(|_| toml::from_str(&format!("{} = {:?}", k.trim(), v.trim())))
                .map_err(|e| ConfigError::Invalid {
                    key: "--set",
                    problem: format!("`{o}`: {e}"),
                })?;
            table.extend(one);
        }
        let cfg: Config = table.try_into().map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuses values that would make the service misbehave, saying which key and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, problem: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                problem: problem.into(),
            })
        }
        let positive: [(&'static str, u64); 16] = [
            ("max_request_bytes", self.max_request_bytes as u64),
            ("max_response_bytes", self.max_response_bytes as u64),
            ("max_tuple_arity", self.max_tuple_arity as u64),
            ("max_element_bytes", self.max_element_bytes as u64),
            ("max_pairs_per_request", self.max_pairs_per_request as u64),
            ("max_pattern_bytes", self.max_pattern_bytes as u64),
            ("max_clients", self.max_clients as u64),
            (
                "max_streams_per_connection",
                self.max_streams_per_connection as u64,
            ),
            (
                "max_outstanding_per_stream",
                self.max_outstanding_per_stream as u64,
            ),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("node_idle_timeout_ms", self.node_idle_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("status_timeout_ms", self.status_timeout_ms),
            ("status_watch_interval_ms", self.status_watch_interval_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
        ];
        for (key, v) in [
            ("max_dedupe_entries", self.max_dedupe_entries),
            ("max_dedupe_bytes", self.max_dedupe_bytes),
            ("scan_threads", self.scan_threads),
        ] {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if self.max_waiters_per_connection > self.max_waiters {
            return bad("max_waiters_per_connection", "must be at most max_waiters");
        }
        if self.max_wait_ms > 24 * 3_600_000 {
            return bad("max_wait_ms", "must be at most a day (86400000)");
        }
        if self.scan_threads > 256 {
            return bad("scan_threads", "must be at most 256");
        }
        if self.max_pending_per_connection == 0 {
            return bad("max_pending_per_connection", "must be greater than 0");
        }
        if self.max_pending_bytes > (usize::MAX >> 4) {
            return bad("max_pending_bytes", "is too large");
        }
        if self.max_pending_bytes < self.max_request_bytes {
            return bad(
                "max_pending_bytes",
                "must be at least max_request_bytes (one request must fit)",
            );
        }
        for (key, v) in [
            (
                "max_connections_per_identity",
                self.max_connections_per_identity,
            ),
            ("max_handshakes", self.max_handshakes),
            ("max_incoming", self.max_incoming),
            ("max_relay_reply_bytes", self.max_relay_reply_bytes),
        ] {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if self.max_unvalidated_handshakes > self.max_handshakes {
            return bad(
                "max_unvalidated_handshakes",
                "must be at most max_handshakes",
            );
        }
        if self.slow_reader_timeout_ms == 0 {
            return bad("slow_reader_timeout_ms", "must be greater than 0");
        }
        if self.incoming_buffer_bytes == 0 {
            return bad("incoming_buffer_bytes", "must be greater than 0");
        }
        if self.max_reply_bytes_per_connection < self.max_response_bytes {
            return bad(
                "max_reply_bytes_per_connection",
                "must be at least max_response_bytes (one full answer must fit)",
            );
        }
        if self.max_reply_bytes < self.max_reply_bytes_per_connection {
            return bad(
                "max_reply_bytes",
                "must be at least max_reply_bytes_per_connection",
            );
        }
        if self.max_reply_bytes > (usize::MAX >> 4) {
            return bad("max_reply_bytes", "is too large");
        }
        if self.metrics_timeout_ms == 0 {
            return bad("metrics_timeout_ms", "must be greater than 0");
        }
        if self.max_metrics_connections == 0 {
            return bad("max_metrics_connections", "must be greater than 0");
        }
        for (key, v) in [
            ("metrics_sap", &self.metrics_sap),
            ("backup_metrics_sap", &self.backup_metrics_sap),
        ] {
            if let Some(sap) = v
                && !sap.is_empty()
                && !sap.contains(':')
            {
                return bad(
                    key,
                    format!("`{sap}` is not HOST:PORT (leave the key out for no metrics)"),
                );
            }
        }
        if self.fsync_interval_ms == 0 {
            return bad("fsync_interval_ms", "must be greater than 0");
        }
        if self.wal_queue_records == 0 {
            return bad("wal_queue_records", "must be greater than 0");
        }
        if self.wal_segment_bytes != 0
            && !(MIN_WAL_SEGMENT_BYTES..=MAX_WAL_SEGMENT_BYTES).contains(&self.wal_segment_bytes)
        {
            return bad(
                "wal_segment_bytes",
                format!(
                    "must be 0 (no preallocation) or between {MIN_WAL_SEGMENT_BYTES} and {MAX_WAL_SEGMENT_BYTES}"
                ),
            );
        }
        if self.background_sync_bytes != 0 && self.background_sync_bytes < MIN_BACKGROUND_SYNC_BYTES
        {
            return bad(
                "background_sync_bytes",
                format!(
                    "must be 0 (sync once, at the end) or at least {MIN_BACKGROUND_SYNC_BYTES}"
                ),
            );
        }
        for (key, v) in positive {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if self.max_request_bytes > u32::MAX as usize {
            return bad(
                "max_request_bytes",
                "must fit the 4-byte frame length (< 4 GiB)",
            );
        }
        if self.max_response_bytes > u32::MAX as usize {
            return bad(
                "max_response_bytes",
                "must fit the 4-byte frame length (< 4 GiB)",
            );
        }
        if self.max_response_bytes < self.max_request_bytes + RESPONSE_ENVELOPE_BYTES {
            return bad(
                "max_response_bytes",
                format!(
                    "must be at least max_request_bytes + {RESPONSE_ENVELOPE_BYTES} (a PUT's `rejected` list echoes the whole request)"
                ),
            );
        }
        if self.keep_alive_ms >= self.idle_timeout_ms {
            return bad("keep_alive_ms", "must be below idle_timeout_ms");
        }
        if self.node_keep_alive_ms >= self.node_idle_timeout_ms {
            return bad("node_keep_alive_ms", "must be below node_idle_timeout_ms");
        }
        if self.heartbeat_timeout_ms < 2 * self.heartbeat_interval_ms {
            return bad(
                "heartbeat_timeout_ms",
                "must be at least twice heartbeat_interval_ms, or one late heartbeat fails a replica over",
            );
        }
        if self.proxy_loss_timeout_ms <= self.heartbeat_timeout_ms {
            return bad("proxy_loss_timeout_ms", "must exceed heartbeat_timeout_ms");
        }
        if self.idle_timeout_ms > 600_000 || self.node_idle_timeout_ms > 600_000 {
            return bad("idle_timeout_ms", "must be at most 600000 (10 minutes)");
        }
        Ok(())
    }

    pub fn tuple_limits(&self) -> TupleLimits {
        TupleLimits {
            max_arity: self.max_tuple_arity,
            max_element_bytes: self.max_element_bytes,
        }
    }

    pub fn dedupe_limits(&self) -> crate::durable::dedupe::DedupeLimits {
        crate::durable::dedupe::DedupeLimits {
            entries: self.max_dedupe_entries,
            bytes: self.max_dedupe_bytes,
        }
    }

    pub fn pattern_limits(&self) -> PatternLimits {
        PatternLimits {
            max_pattern_bytes: self.max_pattern_bytes,
            regex_size_limit: self.regex_size_limit,
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn keep_alive(&self) -> Duration {
        Duration::from_millis(self.keep_alive_ms)
    }
    pub fn node_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.node_idle_timeout_ms)
    }
    pub fn node_keep_alive(&self) -> Duration {
        Duration::from_millis(self.node_keep_alive_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn slow_reader_timeout(&self) -> Duration {
        Duration::from_millis(self.slow_reader_timeout_ms)
    }
    pub fn waiter_limits(&self) -> crate::space::waiters::WaiterLimits {
        crate::space::waiters::WaiterLimits {
            total: self.max_waiters,
            per_client: self.max_waiters_per_connection,
        }
    }

    /// How long the proxy waits for an answer to a request that may wait `wait_ms`.
    pub fn request_timeout_with_wait(&self, wait_ms: u64) -> Duration {
        Duration::from_millis(
            self.request_timeout_ms
                .saturating_add(wait_ms.min(self.max_wait_ms)),
        )
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }
    pub fn proxy_loss_timeout(&self) -> Duration {
        Duration::from_millis(self.proxy_loss_timeout_ms)
    }
    /// Largest frame any node link (proxy <-> server, primary <-> backup) accepts: a reply is at
    /// most `max_response_bytes` in its node encoding (the store checks that encoding too), an
    /// update at most a request's pairs, a reply and a removal list, a snapshot chunk ~1 MiB.
    pub fn node_frame_limit(&self) -> usize {
        3 * self.max_response_bytes + 4 * self.max_request_bytes + (2 << 20)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
    pub fn status_timeout(&self) -> Duration {
        Duration::from_millis(self.status_timeout_ms)
    }
    pub fn status_watch_interval(&self) -> Duration {
        Duration::from_millis(self.status_watch_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn cpu_policy_applies_to_the_calling_thread_and_the_threads_it_starts() {
        // On a thread of its own, so the test harness's threads keep their policy.
        let seen = std::thread::spawn(|| {
            let mut seen = Vec::new();
            for p in [CpuPolicy::Batch, CpuPolicy::Normal, CpuPolicy::Batch] {
                p.apply()
                    .expect("an unprivileged thread may choose batch or normal");
                // SAFETY: sched_getscheduler has no memory arguments.
                let here = unsafe { libc::sched_getscheduler(0) };
                let child = std::thread::spawn(|| unsafe { libc::sched_getscheduler(0) })
                    .join()
                    .unwrap();
                seen.push((here, child));
            }
            seen
        })
        .join()
        .unwrap();
        let (b, n) = (libc::SCHED_BATCH, libc::SCHED_OTHER);
        assert_eq!(seen, vec![(b, b), (n, n), (b, b)]);
    }

    #[test]
    fn cpu_policy_names_are_the_config_values() {
        for p in [CpuPolicy::Batch, CpuPolicy::Normal] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
    }

    #[test]
    fn shipped_file_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let cfg = Config::load_with(&path, true, &[]).unwrap();
        cfg.validate().unwrap();
        let d = Config::default();
        assert_eq!(
            toml::to_string(&cfg).unwrap(),
            toml::to_string(&d).unwrap(),
            "config/tuplespace.toml must document the defaults"
        );
    }

    #[test]
    fn zero_and_unknown_keys_are_refused() {
        let cfg: Config = toml::from_str("max_clients = 0").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("max_clients"), "{err}");
        assert!(toml::from_str::<Config>("max_cleints = 3").is_err());
    }

    #[test]
    fn keep_alive_must_be_below_idle() {
        let cfg: Config = toml::from_str("keep_alive_ms = 40000").unwrap();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("keep_alive_ms")
        );
    }
}
