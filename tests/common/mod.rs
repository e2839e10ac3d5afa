//! Test harness: real `tuplespace` processes on free loopback ports, clients from the library, and
//! raw QUIC access for protocol-violation tests.
//!
//! Every wait is a condition polled against a deadline (`wait_until`), never a fixed sleep. Child
//! processes run in their own process group (so that a backup a server starts is in it too) and
//! the whole group is killed with SIGKILL when the `Cluster` is dropped; their stderr goes to files
//! in the cluster's temporary directory and is printed when a test fails.

#![allow(dead_code)]

use std::collections::HashSet;
use std::future::Future;
use std::net::UdpSocket;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ciborium::Value;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tempfile::TempDir;
use tuplespace::client::Client;
use tuplespace::config::Config;
use tuplespace::net::endpoint::{self, LinkParams, NetError};
use tuplespace::net::stream::{FramedRecv, RecvError};
use tuplespace::net::tls::{self, CertRole, Identity};
use tuplespace::wire::client::{ClusterStatus, Response, Status, request_value};
use tuplespace::wire::frame;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tuplespace");

/// The client ALPN of PROTOCOL §1.
pub const ALPN: &[u8] = b"tuplespace/1";

/// Longest a cluster may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a process may take to exit when it is expected to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest we wait for one answer on a raw stream.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Ports, waiting, configs
// ---------------------------------------------------------------------------------------------

/// The kernel's ephemeral port range (`ip_local_port_range`): sockets bound to port 0 (every QUIC
/// client endpoint in the processes under test) take ports from here at any moment.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// A loopback port that is free now and cannot be handed to another socket before the process
/// under test binds it: it lies outside the ephemeral range (a port the OS gave out and we released
/// was once taken by a client endpoint of a parallel test before our server could bind it). Each
/// test binary starts at its own offset (from its pid) so binaries running at once rarely meet; a
/// port is tried with a bind of `kind` before it is given, and never given twice in one binary.
fn free_port_of(kind: fn(u16) -> bool) -> u16 {
    static GIVEN: Mutex<Option<(HashSet<u16>, u32)>> = Mutex::new(None);
    let (eph_lo, eph_hi) = ephemeral_range();
    // The largest stretch of ports above 1024 outside the ephemeral range.
    let (lo, hi) = if eph_lo.saturating_sub(1025) >= 65535 - eph_hi {
        (1025u32, u32::from(eph_lo))
    } else {
        (u32::from(eph_hi) + 1, 65536u32)
    };
    let span = hi - lo;
    let mut guard = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (given, next) =
        guard.get_or_insert_with(|| (HashSet::new(), (std::process::id() * 61) % span));
    for _ in 0..span {
        let port = (lo + *next % span) as u16;
        *next = (*next + 1) % span;
        if !given.contains(&port) && kind(port) {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port outside the ephemeral range {eph_lo}-{eph_hi}");
}

/// A free loopback UDP port (see `free_port_of`).
pub fn free_port() -> u16 {
    free_port_of(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
}

/// `127.0.0.1:PORT` on a free port.
pub fn free_sap() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// `127.0.0.1:PORT` on a free loopback TCP port (for metrics), never the same twice.
pub fn free_tcp_sap() -> String {
    let port = free_port_of(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
    format!("127.0.0.1:{port}")
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Client configuration for tests: short connect timeout, bounded waits for answers.
pub fn client_cfg() -> Config {
    Config {
        connect_timeout_ms: 2_000,
        request_timeout_ms: 5_000,
        ..Config::default()
    }
}

/// Waits (bounded) for a child to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Same as [`wait_exit`], without blocking the async runtime's thread.
pub async fn wait_exit_async(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `sig` to one process we started.
pub fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig)
        .unwrap_or_else(|e| panic!("cannot send {sig:?} to {pid}: {e}"));
}

/// True while process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name: `PID (comm) S ...`.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Starts `tuplespace ARGS` with stderr (and stdout) to `log`, in its own process group, in
/// directory `cwd` (so no stray config file applies).
pub fn spawn_logged(args: &[String], cwd: &Path, log: &Path) -> Child {
    spawn_logged_under(&[], args, cwd, log)
}

/// Like [`spawn_logged`], run through the command `wrap` (e.g. `chrt -i 0`, which execs the
/// binary: the child's pid is still the binary's).
pub fn spawn_logged_under(wrap: &[String], args: &[String], cwd: &Path, log: &Path) -> Child {
    let err = std::fs::File::create(log).expect("create log file");
    let out = err.try_clone().expect("clone log file");
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"))
}

/// Like [`spawn_logged`], but appends to `log` (after a line saying why) instead of truncating
/// it: for a process started again with the same command line, whose earlier output is kept.
pub fn spawn_logged_append(args: &[String], cwd: &Path, log: &Path, why: &str) -> Child {
    use std::io::Write;
    let mut err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log file for appending");
    let _ = writeln!(err, "==== {why} ====");
    let out = err.try_clone().expect("clone log file");
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"))
}

/// A process stopped with SIGSTOP; SIGCONT is sent by [`Stopped::resume`], or on drop (so that a
/// failing test never leaves a process stopped).
#[must_use = "the process is continued when this is dropped"]
pub struct Stopped {
    pid: u32,
    resumed: bool,
}

/// Sends SIGSTOP to `pid` (a process of the test's clusters).
pub fn stop_process(pid: u32) -> Stopped {
    signal(pid, Signal::SIGSTOP);
    Stopped {
        pid,
        resumed: false,
    }
}

impl Stopped {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends SIGCONT.
    /// Sends SIGCONT; a process that is gone already (killed while stopped, e.g. a lost backup
    /// stopped by its primary) has nothing to continue.
    pub fn resume(mut self) {
        self.resumed = true;
        match kill(Pid::from_raw(self.pid as i32), Signal::SIGCONT) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => panic!("cannot send SIGCONT to {}: {e}", self.pid),
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.resumed {
            // The process may be gone already (killed while stopped): nothing to continue.
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGCONT);
        }
    }
}

/// SIGSTOP `pid`, hold it stopped for `hold`, then SIGCONT.
pub async fn pause_for(pid: u32, hold: Duration) {
    let stopped = stop_process(pid);
    tokio::time::sleep(hold).await;
    stopped.resume();
}

/// Runs `tuplespace ARGS` to completion (bounded by `timeout`; killed after), in `cwd`.
pub fn run_to_end(
    args: &[String],
    cwd: &Path,
    timeout: Duration,
) -> (Option<ExitStatus>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let status = wait_exit(&mut child, timeout);
    if status.is_none() {
        let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
    }
    (
        status,
        out_t.join().unwrap_or_default(),
        err_t.join().unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------------------------
// CBOR helpers
// ---------------------------------------------------------------------------------------------

pub fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// A tuple as CBOR: an array of text strings.
pub fn tuple(elems: &[&str]) -> Value {
    Value::Array(elems.iter().map(|e| text(e)).collect())
}

/// A pair as CBOR.
pub fn pair(k: &[&str], v: &[&str]) -> Value {
    Value::Array(vec![tuple(k), tuple(v)])
}

/// A pair given as text forms (`user,1` = `alice`).
pub fn tpair(k: &str, v: &str) -> Value {
    let k: Vec<&str> = k.split(',').collect();
    let v: Vec<&str> = v.split(',').collect();
    pair(&k, &v)
}

/// `[keyexp, valexp]`.
pub fn pats(k: &str, v: &str) -> Option<Value> {
    Some(Value::Array(vec![text(k), text(v)]))
}

/// A request map with an explicit id.
pub fn req(id: u64, op: &str, args: Option<Value>) -> Value {
    request_value(id, op, args)
}

/// A map with text keys.
pub fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(entries.iter().map(|(k, v)| (text(k), v.clone())).collect())
}

/// The value under text key `key` of a CBOR map.
pub fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| matches!(k, Value::Text(t) if t == key))
            .map(|(_, v)| v),
        _ => None,
    }
}

pub fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

pub fn as_text(v: &Value) -> Option<&str> {
    match v {
        Value::Text(t) => Some(t),
        _ => None,
    }
}

/// CBOR bytes of one item (no frame).
pub fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("encode CBOR");
    out
}

/// One frame: 4-byte big-endian length, then `body`.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// The pairs of an `ok` GET/DELETE answer, as text forms, panicking with the answer otherwise.
pub fn pairs_of(r: &Response) -> Vec<(String, String)> {
    assert_eq!(r.status, Status::Ok, "expected ok, got {r:?}");
    r.pairs
        .as_ref()
        .unwrap_or_else(|| panic!("ok answer to GET/DELETE without `pairs`: {r:?}"))
        .iter()
        .map(|p| (p.key.clone(), p.value.clone()))
        .collect()
}

/// The `rejected` list of an `ok` PUT/POST answer.
pub fn rejected_of(r: &Response) -> Vec<Value> {
    assert_eq!(r.status, Status::Ok, "expected ok, got {r:?}");
    r.rejected
        .clone()
        .unwrap_or_else(|| panic!("ok answer to PUT/POST without `rejected`: {r:?}"))
        .iter()
        .map(|x| x.to_value().expect("a rejected element decodes"))
        .collect()
}

pub fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Raw QUIC
// ---------------------------------------------------------------------------------------------

/// A QUIC connection opened with any certificate and ALPN.
pub struct RawConn {
    pub ep: quinn::Endpoint,
    pub conn: quinn::Connection,
}

/// Connects to `sap` presenting `certs/NAME.pem` (trusting `certs/ca.pem`) and offering `alpn`.
pub async fn raw_connect(
    sap: &str,
    certs: &Path,
    name: &str,
    alpn: &[u8],
) -> Result<RawConn, NetError> {
    let addr = endpoint::resolve_sap(sap)?;
    let id = Identity::load(certs, name)?;
    let params = LinkParams {
        idle_timeout: Duration::from_secs(30),
        keep_alive: Some(Duration::from_secs(5)),
        max_bidi_streams: 0,
        udp_buffer_bytes: 0,
    };
    let ep = endpoint::client_endpoint(addr, &params)?;
    let cfg = endpoint::client_config(&id, alpn, &params)?;
    let conn = endpoint::connect(
        &ep,
        cfg,
        addr,
        &endpoint::sap_host(sap),
        Duration::from_secs(5),
    )
    .await?;
    Ok(RawConn { ep, conn })
}

/// Connects to `sap` presenting no certificate at all (trusting `certs/ca.pem`).
pub async fn raw_connect_without_certificate(sap: &str, certs: &Path) -> Result<RawConn, String> {
    use std::sync::Arc;
    tls::install_crypto_provider();
    let addr = endpoint::resolve_sap(sap).map_err(|e| e.to_string())?;
    // Any identity from the directory, only for its trust roots.
    let id = Identity::load(certs, "client").map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(id.roots.clone())
        .with_no_client_auth();
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|e| e.to_string())?;
    let cfg = quinn::ClientConfig::new(Arc::new(quic));
    let params = LinkParams {
        idle_timeout: Duration::from_secs(30),
        keep_alive: Some(Duration::from_secs(5)),
        max_bidi_streams: 0,
        udp_buffer_bytes: 0,
    };
    let ep = endpoint::client_endpoint(addr, &params).map_err(|e| e.to_string())?;
    let conn = endpoint::connect(
        &ep,
        cfg,
        addr,
        &endpoint::sap_host(sap),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(RawConn { ep, conn })
}

/// How a connection ended: the application close code and reason, or another description.
#[derive(Debug)]
pub enum Ended {
    App {
        code: u64,
        reason: String,
    },
    Other(String),
    /// Still open after the wait.
    Open,
}

impl Ended {
    pub fn code(&self) -> Option<u64> {
        match self {
            Ended::App { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Waits (bounded) for `conn` to close and says how.
pub async fn ended(conn: &quinn::Connection, wait: Duration) -> Ended {
    match tokio::time::timeout(wait, conn.closed()).await {
        Err(_) => Ended::Open,
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Ended::App {
            code: c.error_code.into_inner(),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        Ok(other) => Ended::Other(other.to_string()),
    }
}

impl RawConn {
    pub async fn open(&self) -> RawStream {
        let (send, recv) = tokio::time::timeout(ANSWER_TIMEOUT, self.conn.open_bi())
            .await
            .expect("open_bi timed out")
            .expect("open a bidirectional stream");
        RawStream {
            send,
            recv: FramedRecv::new(recv, 64 << 20),
        }
    }

    pub async fn ended(&self, wait: Duration) -> Ended {
        ended(&self.conn, wait).await
    }
}

/// One bidirectional stream written byte by byte as the test wants.
pub struct RawStream {
    pub send: quinn::SendStream,
    pub recv: FramedRecv,
}

/// What reading one answer gave.
#[derive(Debug)]
pub enum Read {
    Answer(Response),
    End,
    Failed(String),
}

impl RawStream {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), quinn::WriteError> {
        self.send.write_all(bytes).await
    }

    /// Writes `body` as one frame.
    pub async fn write_frame(&mut self, body: &[u8]) {
        self.write(&framed(body)).await.expect("write a frame");
    }

    /// Writes one CBOR item as one frame.
    pub async fn write_value(&mut self, v: &Value) {
        self.write_frame(&cbor(v)).await;
    }

    pub fn finish(&mut self) {
        self.send.finish().expect("finish the send side");
    }

    /// Reads the next answer frame (bounded wait).
    pub async fn read(&mut self) -> Read {
        match tokio::time::timeout(ANSWER_TIMEOUT, self.recv.next()).await {
            Err(_) => Read::Failed("no answer in time".into()),
            Ok(Ok(None)) => Read::End,
            Ok(Ok(Some(body))) => {
                let v = frame::decode_value(&body)
                    .unwrap_or_else(|e| panic!("answer is not one CBOR item: {e}"));
                Read::Answer(
                    Response::from_value(&v)
                        .unwrap_or_else(|| panic!("answer is not a response: {v:?}")),
                )
            }
            Ok(Err(RecvError::Read(quinn::ReadError::ConnectionLost(c)))) => {
                Read::Failed(endpoint::describe_connection_error(&c))
            }
            Ok(Err(e)) => Read::Failed(e.to_string()),
        }
    }

    /// Reads the next frame body as it came (to check its size).
    pub async fn read_body(&mut self) -> Vec<u8> {
        match tokio::time::timeout(ANSWER_TIMEOUT, self.recv.next()).await {
            Ok(Ok(Some(body))) => body.to_vec(),
            other => panic!("expected an answer frame, got {other:?}"),
        }
    }

    /// Reads the next answer frame as a raw CBOR item (to see exactly which keys it has).
    pub async fn read_value(&mut self) -> Value {
        match tokio::time::timeout(ANSWER_TIMEOUT, self.recv.next()).await {
            Ok(Ok(Some(body))) => frame::decode_value(&body)
                .unwrap_or_else(|e| panic!("answer is not one CBOR item: {e}")),
            other => panic!("expected an answer frame, got {other:?}"),
        }
    }

    /// Reads the next answer, panicking if there is none.
    pub async fn answer(&mut self) -> Response {
        match self.read().await {
            Read::Answer(r) => r,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    /// Sends a request and reads its answer (checking the id is echoed).
    pub async fn call(&mut self, id: u64, op: &str, args: Option<Value>) -> Response {
        self.write_value(&req(id, op, args)).await;
        let r = self.answer().await;
        assert_eq!(r.id, Some(id), "answer for the wrong id: {r:?}");
        r
    }
}

/// A copy of `certs` where `NAME.pem`/`NAME.key` come from `foreign` (another CA) but `ca.pem` is
/// ours: a client that trusts the cluster and presents a certificate the cluster never issued.
pub fn mixed_certs(ours: &Path, foreign: &Path, out: &Path, name: &str) {
    std::fs::create_dir_all(out).expect("create dir");
    std::fs::copy(ours.join("ca.pem"), out.join("ca.pem")).expect("copy ca.pem");
    for ext in ["pem", "key"] {
        std::fs::copy(
            foreign.join(format!("{name}.{ext}")),
            out.join(format!("{name}.{ext}")),
        )
        .expect("copy cert");
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

/// How to start a cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterBuilder {
    sets: Vec<String>,
    proxy_sets: Vec<String>,
    server_sets: Vec<String>,
    max_clients: Option<usize>,
    init_file: Option<PathBuf>,
    no_server: bool,
    /// `(KEY, NAME)`: `--set KEY=<the cluster's temporary directory>/NAME` for the proxy only.
    proxy_path_sets: Vec<(String, String)>,
    /// A command the proxy and the server are started through (see [`spawn_logged_under`]).
    wrap: Vec<String>,
}

impl ClusterBuilder {
    /// `--set KEY=VALUE` for proxy and server.
    pub fn set(mut self, kv: &str) -> Self {
        self.sets.push(kv.to_owned());
        self
    }
    /// `--set KEY=VALUE` for the proxy only.
    pub fn proxy_set(mut self, kv: &str) -> Self {
        self.proxy_sets.push(kv.to_owned());
        self
    }
    /// `--set KEY=VALUE` for the server only.
    pub fn server_set(mut self, kv: &str) -> Self {
        self.server_sets.push(kv.to_owned());
        self
    }
    pub fn max_clients(mut self, n: usize) -> Self {
        self.max_clients = Some(n);
        self
    }
    pub fn init_file(mut self, p: &Path) -> Self {
        self.init_file = Some(p.to_owned());
        self
    }
    /// `--set KEY=<the cluster's temporary directory>/NAME` for the proxy only (the directory
    /// exists only once the cluster starts; the file is not created here).
    pub fn proxy_set_path(mut self, key: &str, name: &str) -> Self {
        self.proxy_path_sets.push((key.to_owned(), name.to_owned()));
        self
    }
    /// Starts the proxy and the server through `wrap` (a command that execs its arguments).
    pub fn under(mut self, wrap: &[&str]) -> Self {
        self.wrap = wrap.iter().map(|s| s.to_string()).collect();
        self
    }
    /// A proxy alone: no server is started.
    pub fn no_server(mut self) -> Self {
        self.no_server = true;
        self
    }

    pub async fn start(self) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        tls::create_cluster(&certs, &[], false).expect("create certificates");
        let mut c = Cluster {
            certs,
            client_sap: free_sap(),
            server_sap: free_sap(),
            shutdown_sap: free_sap(),
            primary_sap: free_sap(),
            backup_sap: free_sap(),
            heartbeat_sap: free_sap(),
            save_file: dir.path().join("save.json"),
            proxy_log: dir.path().join("proxy.log"),
            server_log: dir.path().join("server.log"),
            proxy: None,
            server: None,
            proxy_args: Vec::new(),
            dir,
        };
        let with_sets = |mut args: Vec<String>, extra: &[String]| {
            args.push("--certs".into());
            args.push(c.certs.display().to_string());
            for s in self.sets.iter().chain(extra) {
                args.push("--set".into());
                args.push(s.clone());
            }
            args
        };
        let mut proxy_sets = self.proxy_sets.clone();
        for (key, name) in &self.proxy_path_sets {
            proxy_sets.push(format!("{key}={}", c.dir.path().join(name).display()));
        }
        let mut proxy_args = with_sets(
            vec![
                "proxy".into(),
                c.client_sap.clone(),
                c.server_sap.clone(),
                c.shutdown_sap.clone(),
            ],
            &proxy_sets,
        );
        if let Some(n) = self.max_clients {
            proxy_args.push("--max-clients".into());
            proxy_args.push(n.to_string());
        }
        c.proxy = Some(spawn_logged_under(
            &self.wrap,
            &proxy_args,
            c.dir.path(),
            &c.proxy_log,
        ));
        c.proxy_args = proxy_args;
        if !self.no_server {
            let init = self
                .init_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "null".into());
            let server_args = with_sets(
                vec![
                    "server".into(),
                    c.primary_sap.clone(),
                    c.server_sap.clone(),
                    c.backup_sap.clone(),
                    c.heartbeat_sap.clone(),
                    c.save_file.display().to_string(),
                    "null".into(),
                    init,
                ],
                &self.server_sets,
            );
            c.server = Some(spawn_logged_under(
                &self.wrap,
                &server_args,
                c.dir.path(),
                &c.server_log,
            ));
        }
        c.wait_ready(!self.no_server).await;
        c
    }
}

/// A proxy and (usually) a primary server, killed on drop.
pub struct Cluster {
    pub dir: TempDir,
    pub certs: PathBuf,
    pub client_sap: String,
    pub server_sap: String,
    pub shutdown_sap: String,
    pub primary_sap: String,
    pub backup_sap: String,
    pub heartbeat_sap: String,
    pub save_file: PathBuf,
    pub proxy_log: PathBuf,
    pub server_log: PathBuf,
    pub proxy: Option<Child>,
    pub server: Option<Child>,
    /// The proxy's command line (after the binary), to start it again the same way.
    pub proxy_args: Vec<String>,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// A proxy and a primary with default settings.
    pub async fn start() -> Cluster {
        Cluster::builder().start().await
    }

    pub fn proxy_pid(&self) -> u32 {
        self.proxy.as_ref().expect("proxy running").id()
    }

    pub fn server_pid(&self) -> u32 {
        self.server.as_ref().expect("server started").id()
    }

    /// Both logs, for failure messages.
    pub fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|_| "(no log)".into());
        format!(
            "---- proxy stderr ({}) ----\n{}\n---- server stderr ({}) ----\n{}",
            self.proxy_log.display(),
            read(&self.proxy_log),
            self.server_log.display(),
            read(&self.server_log)
        )
    }

    fn check_alive(&mut self) {
        let mut early = None;
        for (name, child) in [("proxy", &mut self.proxy), ("server", &mut self.server)] {
            if let Some(c) = child
                && let Ok(Some(s)) = c.try_wait()
            {
                early = Some(format!("{name} exited early ({s}) while starting"));
            }
        }
        if let Some(e) = early {
            panic!("{e}\n{}", self.logs());
        }
    }

    async fn wait_ready(&mut self, need_primary: bool) {
        let cfg = Config {
            connect_timeout_ms: 500,
            request_timeout_ms: 2_000,
            ..Config::default()
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last;
            self.check_alive();
            match Client::connect(&self.shutdown_sap, &self.certs, CertRole::Admin, &cfg).await {
                Ok(mut admin) => {
                    match admin.request("STATUS", None).await {
                        Ok(r) if r.status == Status::Ok => {
                            if !need_primary
                                || r.cluster.as_ref().is_some_and(|c| c.primary.is_some())
                            {
                                admin.close();
                                return;
                            }
                            last = format!("no primary yet: {:?}", r.cluster);
                        }
                        Ok(r) => last = format!("STATUS answered {r:?}"),
                        Err(e) => last = e.to_string(),
                    }
                    admin.close();
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                let logs = self.logs();
                panic!("cluster not ready within {READY_TIMEOUT:?}: {last}\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// STATUS's `cluster`, or None when the admin SAP does not answer (during failover).
    pub async fn cluster_status(&self) -> Option<ClusterStatus> {
        let Ok(mut a) = Client::connect(
            &self.shutdown_sap,
            &self.certs,
            CertRole::Admin,
            &client_cfg(),
        )
        .await
        else {
            return None;
        };
        let r = a.request("STATUS", None).await.ok().and_then(|r| r.cluster);
        let r = r.map(|c| *c);
        a.close();
        r
    }

    /// A client on the client SAP with the client certificate.
    pub async fn client(&self) -> Client {
        self.client_as(CertRole::Client).await
    }

    pub async fn client_as(&self, role: CertRole) -> Client {
        Client::connect(&self.client_sap, &self.certs, role, &client_cfg())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the client SAP: {e}\n{}", self.logs()))
    }

    /// An admin on the shutdown SAP.
    pub async fn admin(&self) -> Client {
        Client::connect(
            &self.shutdown_sap,
            &self.certs,
            CertRole::Admin,
            &client_cfg(),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the shutdown SAP: {e}\n{}", self.logs()))
    }

    /// The `cluster` of a STATUS answer.
    pub async fn status(&self) -> ClusterStatus {
        let mut a = self.admin().await;
        let r = a.request("STATUS", None).await.expect("STATUS answered");
        a.close();
        assert_eq!(r.status, Status::Ok, "STATUS: {r:?}");
        match r.cluster {
            Some(c) => *c,
            None => panic!("STATUS ok without `cluster`: {r:?}"),
        }
    }

    /// A raw connection to the client SAP.
    pub async fn raw_client(&self) -> RawConn {
        raw_connect(&self.client_sap, &self.certs, "client", ALPN)
            .await
            .unwrap_or_else(|e| panic!("raw connect: {e}\n{}", self.logs()))
    }

    /// `kill -9` of the proxy (only the proxy: it has no children), waiting until it is gone.
    pub fn kill_proxy(&mut self) {
        let mut proxy = self.proxy.take().expect("proxy running");
        let _ = kill(Pid::from_raw(proxy.id() as i32), Signal::SIGKILL);
        let _ = proxy.wait();
    }

    /// Starts the proxy again with the command line it was first started with (same SAPs, same
    /// `--set`s); its output is appended to `proxy_log`. Does not wait for it to be ready.
    pub fn start_proxy_again(&mut self, why: &str) {
        assert!(self.proxy.is_none(), "the proxy is still running");
        self.proxy = Some(spawn_logged_append(
            &self.proxy_args,
            self.dir.path(),
            &self.proxy_log,
            why,
        ));
    }

    /// `kill -9` of the proxy, then the same command line again at once. Returns how long no
    /// proxy process existed (from the kill to the new process being started).
    pub fn restart_proxy(&mut self) -> Duration {
        let old = self.proxy_pid();
        let t0 = Instant::now();
        self.kill_proxy();
        self.start_proxy_again(&format!(
            "proxy pid {old} killed with SIGKILL by the test; started again with the same command line"
        ));
        t0.elapsed()
    }

    /// Sends SIGKILL to every process group we started.
    pub fn kill_all(&mut self) {
        for c in [self.server.as_mut(), self.proxy.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `tuplespace up` in a directory of its own, whole sessions, lazyfs (durability tests)
// ---------------------------------------------------------------------------------------------

/// The shipped configuration file.
pub const SHIPPED_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tuplespace.toml");

/// The session id of process `pid` (field 6 of `/proc/PID/stat`), if it exists.
pub fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `PID (comm) STATE PPID PGRP SESSION ...`: count after the parenthesised name.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// The parent of process `pid`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every live (not zombie) process of session `sid`.
pub fn session_pids(sid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|&p| session_of(p) == Some(sid) && alive(p))
        .collect()
}

/// SIGKILL to every process of session `sid` (a session we started with `setsid`).
pub fn kill_session(sid: u32) {
    for p in session_pids(sid) {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
    }
}

/// Polls (every 10 ms) until none of `pids` is alive; false if some still is after `timeout`.
pub async fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| !alive(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Text without ANSI colour sequences (log lines are matched as text).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `tuplespace up` with the shipped configuration in a temporary directory of its own, every SAP
/// on a free loopback port, so its data lives in `DIR/data/space.json.d` and the proxy's state
/// in `DIR/data/proxy.state`. Each `up` runs in a new session (`setsid`), so that everything it
/// starts (proxy, primary, the backups the primary starts) can be found and killed even after
/// `up` itself is gone; every session is killed when this is dropped. Start N's output goes to
/// `DIR/up-N.log`.
pub struct UpService {
    tmp: TempDir,
    pub certs: PathBuf,
    pub client_sap: String,
    pub server_sap: String,
    pub shutdown_sap: String,
    pub primary_sap: String,
    pub backup_sap: String,
    pub heartbeat_sap: String,
    /// Metrics SAPs (TCP) of the proxy, the first primary and the first backup.
    pub metrics_saps: [String; 3],
    /// `--set KEY=VALUE` for `up` (it hands them on to every process).
    pub sets: Vec<String>,
    /// The `up` of the latest start.
    pub up: Option<Child>,
    /// Starts so far (the latest log is `up-<starts>.log`).
    pub starts: u32,
    sessions: Vec<u32>,
}

impl UpService {
    /// Chooses the directory and ports; starts nothing (a caller may mount something on
    /// [`UpService::data_dir`] first).
    pub fn new(sets: &[&str]) -> UpService {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("data")).expect("create data dir");
        UpService {
            certs: tmp.path().join("certs"),
            tmp,
            client_sap: free_sap(),
            server_sap: free_sap(),
            shutdown_sap: free_sap(),
            primary_sap: free_sap(),
            backup_sap: free_sap(),
            heartbeat_sap: free_sap(),
            metrics_saps: std::array::from_fn(|_| free_tcp_sap()),
            sets: sets.iter().map(|s| s.to_string()).collect(),
            up: None,
            starts: 0,
            sessions: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `DIR/data`: the save file's directory (data root, proxy state).
    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// The replicas' data root, `DIR/data/space.json.d`.
    pub fn data_root(&self) -> PathBuf {
        self.data_dir().join("space.json.d")
    }

    pub fn log_path(&self, start: u32) -> PathBuf {
        self.dir().join(format!("up-{start}.log"))
    }

    /// The output of start `start` (1 = the first), without colours.
    pub fn log(&self, start: u32) -> String {
        strip_ansi(&std::fs::read_to_string(self.log_path(start)).unwrap_or_default())
    }

    /// Every start's output, for failure messages.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| format!("---- up-{n}.log ----\n{}", self.log(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts `up` (in a new session); does not wait for it to be ready.
    pub fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("create log file");
        let out = log.try_clone().expect("clone log file");
        let mut args: Vec<String> = vec![
            "up".into(),
            "--config".into(),
            SHIPPED_CONFIG.into(),
            "--certs".into(),
            "certs".into(),
            "--client-sap".into(),
            self.client_sap.clone(),
            "--server-sap".into(),
            self.server_sap.clone(),
            "--shutdown-sap".into(),
            self.shutdown_sap.clone(),
            "--primary-sap".into(),
            self.primary_sap.clone(),
            "--backup-sap".into(),
            self.backup_sap.clone(),
            "--heartbeat-sap".into(),
            self.heartbeat_sap.clone(),
            "--metrics-sap".into(),
            self.metrics_saps[0].clone(),
            "--primary-metrics-sap".into(),
            self.metrics_saps[1].clone(),
            "--backup-metrics-sap".into(),
            self.metrics_saps[2].clone(),
        ];
        for s in &self.sets {
            args.push("--set".into());
            args.push(s.clone());
        }
        let mut cmd = Command::new(BIN);
        cmd.args(&args)
            .current_dir(self.dir())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log));
        // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN} up: {e}"));
        self.sessions.push(child.id());
        self.up = Some(child);
    }

    pub fn up_pid(&self) -> u32 {
        self.up.as_ref().expect("up started").id()
    }

    /// The proxy `up` started (its child whose command line has `proxy`).
    pub fn proxy_pid(&self) -> Option<u32> {
        let up = self.up_pid();
        session_pids(up).into_iter().find(|&p| {
            parent_of(p) == Some(up)
                && std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"proxy"))
        })
    }

    /// STATUS's `cluster`, or None when the admin SAP does not answer.
    pub async fn status(&self) -> Option<ClusterStatus> {
        let cfg = Config {
            connect_timeout_ms: 500,
            request_timeout_ms: 2_000,
            ..Config::default()
        };
        let Ok(mut a) =
            Client::connect(&self.shutdown_sap, &self.certs, CertRole::Admin, &cfg).await
        else {
            return None;
        };
        let r = a.request("STATUS", None).await.ok().and_then(|r| r.cluster);
        let r = r.map(|c| *c);
        a.close();
        r
    }

    /// Polls STATUS until there is a primary with a synchronised backup; panics (with the logs)
    /// after `timeout` or if `up` exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> ClusterStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(up) = self.up.as_mut()
                && let Ok(Some(s)) = up.try_wait()
            {
                panic!("up exited ({s}) while starting\n{}", self.logs());
            }
            let st = self.status().await;
            if let Some(st) = &st
                && st.backup_synced
                && st.primary.is_some()
            {
                return st.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "no primary with a synchronised backup within {timeout:?}: {st:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client on the client SAP.
    pub async fn client(&self) -> Client {
        Client::connect(
            &self.client_sap,
            &self.certs,
            CertRole::Client,
            &client_cfg(),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the client SAP: {e}\n{}", self.logs()))
    }

    /// PUTs `key=value` (fresh connection each try) until one is acknowledged; how long that
    /// took, or None after `timeout`.
    pub async fn first_write(&self, key: &str, value: &str, timeout: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let cfg = Config {
            connect_timeout_ms: 250,
            request_timeout_ms: 5_000,
            ..Config::default()
        };
        let k: Vec<&str> = key.split(',').collect();
        let v: Vec<&str> = value.split(',').collect();
        loop {
            if let Ok(mut c) =
                Client::connect(&self.client_sap, &self.certs, CertRole::Client, &cfg).await
            {
                let r = c
                    .request("PUT", Some(Value::Array(vec![pair(&k, &v)])))
                    .await;
                c.close();
                if let Ok(r) = r
                    && r.status == Status::Ok
                {
                    return Some(t0.elapsed());
                }
            }
            if t0.elapsed() >= timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Reaps the current `up` if it has exited (so that it is no zombie).
    pub fn reap(&mut self) {
        if let Some(mut up) = self.up.take() {
            match up.try_wait() {
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => self.up = Some(up),
            }
        }
    }

    /// SIGKILL to everything every start left running, waiting until it is gone.
    pub async fn kill_everything(&mut self) {
        let mut pids = Vec::new();
        for &s in &self.sessions {
            pids.extend(session_pids(s));
            kill_session(s);
        }
        if let Some(mut up) = self.up.take() {
            let _ = up.kill();
            let _ = up.wait();
        }
        assert!(
            wait_gone(&pids, EXIT_TIMEOUT).await,
            "processes {pids:?} still alive after SIGKILL"
        );
    }

    /// Graceful stop: SIGTERM to `up` (it asks the service to save and stop), bounded wait, then
    /// SIGKILL to whatever is left.
    pub async fn stop(&mut self) {
        if let Some(up) = self.up.as_mut() {
            let _ = kill(Pid::from_raw(up.id() as i32), Signal::SIGTERM);
            let _ = wait_exit_async(up, Duration::from_secs(40)).await;
        }
        self.kill_everything().await;
    }
}

impl Drop for UpService {
    fn drop(&mut self) {
        for &s in &self.sessions {
            kill_session(s);
        }
        if let Some(mut up) = self.up.take() {
            let _ = up.kill();
            let _ = up.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// The `lazyfs` example (a FUSE filesystem that drops unsynced writes on SIGUSR1), or why it
/// cannot be used here (the reason is printed by tests that skip).
pub fn lazyfs_binary() -> Result<PathBuf, String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse does not exist".into());
    }
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
    };
    if !rustix::process::geteuid().is_root() && !on_path("fusermount3") && !on_path("fusermount") {
        return Err("not root and no fusermount3/fusermount on PATH: cannot mount FUSE".into());
    }
    // `cargo test` builds the examples beside the binaries: target/<profile>/examples/.
    let bin = Path::new(BIN)
        .parent()
        .map(|d| d.join("examples").join("lazyfs"))
        .ok_or("no directory for the binary under test")?;
    if !bin.exists() {
        return Err(format!(
            "{} is not built (cargo build --release --examples)",
            bin.display()
        ));
    }
    Ok(bin)
}

/// A lazyfs mount; unmounted (SIGTERM: flush and unmount; SIGKILL and a lazy unmount if that
/// does not work) when dropped.
pub struct Lazyfs {
    pub child: Child,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
}

impl Lazyfs {
    /// Mounts `backing` at `mountpoint` and waits (bounded) until it is mounted. Err: it could
    /// not mount (the test is skipped with that reason).
    pub async fn mount(
        bin: &Path,
        mountpoint: &Path,
        backing: &Path,
        log: &Path,
    ) -> Result<Lazyfs, String> {
        Self::mount_with(bin, mountpoint, backing, log, &[]).await
    }

    /// [`Lazyfs::mount`] with more options (e.g. `--fsync-delay-ms N`: a slow disk).
    pub async fn mount_with(
        bin: &Path,
        mountpoint: &Path,
        backing: &Path,
        log: &Path,
        options: &[&str],
    ) -> Result<Lazyfs, String> {
        std::fs::create_dir_all(backing).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(mountpoint).map_err(|e| e.to_string())?;
        let err = std::fs::File::create(log).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg(mountpoint)
            .arg(backing)
            .args(options)
            .stdin(Stdio::null())
            .stdout(Stdio::from(err.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut fs = Lazyfs {
            child,
            mountpoint: mountpoint.to_owned(),
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if fs.log_text().contains("lazyfs: mounted") {
                return Ok(fs);
            }
            if let Ok(Some(s)) = fs.child.try_wait() {
                return Err(format!("lazyfs exited ({s}): {}", fs.log_text().trim()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "lazyfs did not mount within 15 s: {}",
                    fs.log_text().trim()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Power cut: SIGUSR1, then waits for lazyfs to report it (`lazyfs: dropped N unsynced bytes
    /// in M files`); returns that line.
    pub async fn power_cut(&mut self) -> String {
        let drops = |t: &str| t.lines().filter(|l| l.contains("dropped")).count();
        let before = drops(&self.log_text());
        signal(self.child.id(), Signal::SIGUSR1);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = self.log_text();
            if drops(&t) > before {
                return t
                    .lines()
                    .rfind(|l| l.contains("dropped"))
                    .unwrap_or("")
                    .to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "lazyfs did not report the power cut: {t}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Lazyfs {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        if wait_exit(&mut self.child, Duration::from_secs(15)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Gone without unmounting (killed): detach the dead mount.
        let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
    }
}
