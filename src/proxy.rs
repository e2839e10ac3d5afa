//! The proxy: serves clients, relays every request with a connection indicator to the current
//! primary, relays each answer back, and runs the witness (`ha::witness`) over the links it holds
//! to both replicas.
//!
//! Tasks: one per client stream (reads frames, answers protocol errors itself, forwards data
//! operations), one per server stream, and one *router* that owns the pending-request table and
//! the witness. They talk through channels only. The router never blocks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::ha::Millis;
use crate::ha::router::{self, INCARNATION_MASK, Outcome};
use crate::ha::witness::{Action, Durable, Input, LinkId, Witness};
use crate::metrics::{self, OpLabel, ProxyMetrics};
use crate::net::endpoint::{self, LinkParams, ListenLimits, NetError};
use crate::net::stream::{BATCH_BYTES, FramedRecv, FramedSend, RecvError};
use crate::net::tls::{self, Identity, SapKind};
use crate::notify::notify;
use crate::wire::cbor::RawItem;
use crate::wire::client::{
    self, BackupState, CloseCode, ClusterStatus, Command, Op, Response, Status,
};
use crate::wire::frame::{self, FrameError};
use crate::wire::node::{
    Relay, RelayAnswer, RelayRequestRef, ReplicaInfo, Role, StreamKind, ToProxy, ToServer,
};
use crate::wire::{CLIENT_ALPN, NODE_ALPN};

/// Errors that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{what}: {source}")]
    Net {
        what: &'static str,
        source: NetError,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("proxy state file `{path}` {what}")]
    State {
        path: std::path::PathBuf,
        what: String,
    },
}

/// The three SAPs of SPEC §2.
#[derive(Clone, Debug)]
pub struct ProxySaps {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub shutdown: SocketAddr,
}

/// An answer for a client stream: made here, or the primary's (already in the client's
/// encoding, with a null id: the stream puts the client's id in and copies the rest).
enum Answer {
    Made(Response),
    Relayed { id: u64, response: RawItem },
}

/// Where a client stream's answers go. Each is counted in the connection's reply budget (its
/// estimated client encoding) from the moment it is sent until its stream has encoded it.
#[derive(Clone)]
struct RespTx {
    tx: mpsc::UnboundedSender<(Answer, Charge)>,
    replies: Arc<ConnReplies>,
}

impl RespTx {
    fn channel(replies: Arc<ConnReplies>) -> (RespTx, mpsc::UnboundedReceiver<(Answer, Charge)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (RespTx { tx, replies }, rx)
    }

    /// False if the stream is gone (the answer is dropped).
    fn send(&self, r: Response) -> bool {
        let n = client::response_len(&r);
        self.send_answer(Answer::Made(r), n)
    }

    /// The primary's answer to the client's request `id`.
    fn send_relayed(&self, id: u64, response: RawItem) -> bool {
        // Its bytes, the id put in, and the frame's length.
        let n = response.as_bytes().len() + 16;
        self.send_answer(Answer::Relayed { id, response }, n)
    }

    fn send_answer(&self, a: Answer, n: usize) -> bool {
        self.replies.charge(n);
        let charge = Charge {
            replies: self.replies.clone(),
            n,
        };
        self.tx.send((a, charge)).is_ok()
    }
}

/// An answer's place in its connection's reply budget, given back on drop.
struct Charge {
    replies: Arc<ConnReplies>,
    n: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.replies.release(self.n);
    }
}

enum RouterMsg {
    Request {
        cmd: Command,
        client: u64,
        /// The client stream it came on (unique in this proxy).
        stream: u64,
        id: u64,
        reply: RespTx,
        permit: Permit,
        /// When the request was read (for the latency metric only).
        start: Instant,
    },
    /// A client stream that sent requests that may wait has ended: those still waiting are
    /// cancelled (PROTOCOL.md §4a).
    StreamGone {
        stream: u64,
    },
    Admin {
        op: Op,
        /// The admin connection (STATUS's count is ordered after its earlier requests).
        client: u64,
        id: u64,
        reply: RespTx,
    },
    ServerHello {
        link: LinkId,
        role: Role,
        epoch: u64,
        info: ReplicaInfo,
        primary: Option<String>,
        control: mpsc::UnboundedSender<ToServer>,
        conn: quinn::Connection,
    },
    RelayReady {
        link: LinkId,
        relay: mpsc::UnboundedSender<Vec<RelayItem>>,
    },
    Replies {
        link: LinkId,
        replies: Vec<RelayAnswer>,
        /// Their place in the link's relay budget (`max_relay_reply_bytes`), given back once the
        /// router has handed them on (they then count in the clients' reply budgets).
        _held: tokio::sync::OwnedSemaphorePermit,
    },
    FromServer {
        link: LinkId,
        msg: ToProxy,
    },
    LinkDown {
        link: LinkId,
    },
    /// A client connection has ended: the primary need not compute its reads still queued.
    ClientGone {
        client: u64,
    },
    /// The durable state is on disk (or writing it failed).
    Persisted(Result<(), String>),
}

/// A client request as the router keeps it until it is answered.
#[derive(Clone)]
struct Req {
    cmd: Command,
    client: u64,
    stream: u64,
    /// Numbers the requests that may wait (0: it may not), to find them when their stream goes.
    wait_no: u64,
    id: u64,
    reply: RespTx,
    /// Its place in the connection's and the proxy's pending budgets, given back when the
    /// router forgets the request (answered, even if the client's stream is gone). None for
    /// STATUS's count (one per admin request, answered within `status_timeout_ms`).
    #[allow(dead_code)]
    permit: Option<Permit>,
    /// When the request was read (for the latency metric only).
    start: Instant,
    /// STATUS's count of the pairs: the token of the STATUS waiting for it.
    status: Option<u64>,
}

/// A request's share of the pending budgets (one place per connection, its bytes globally).
type Permit = Arc<(
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
)>;

/// The pending budgets a client connection's streams draw from.
#[derive(Clone)]
struct Budgets {
    connection: Arc<tokio::sync::Semaphore>,
    bytes: Arc<tokio::sync::Semaphore>,
}

impl Budgets {
    /// Waits until the connection may have one more request of `len` bytes pending.
    async fn acquire(self, len: usize) -> Option<Permit> {
        let one = self.connection.clone().acquire_owned().await.ok()?;
        let n = u32::try_from(len.max(1)).unwrap_or(u32::MAX);
        let bytes = self.bytes.clone().acquire_many_owned(n).await.ok()?;
        Some(Arc::new((one, bytes)))
    }

    /// The same without waiting: None if either budget is spent now.
    fn try_acquire(&self, len: usize) -> Option<Permit> {
        let one = self.connection.clone().try_acquire_owned().ok()?;
        let n = u32::try_from(len.max(1)).unwrap_or(u32::MAX);
        let bytes = self.bytes.clone().try_acquire_many_owned(n).ok()?;
        Some(Arc::new((one, bytes)))
    }
}

/// Answers the proxy holds for client connections that QUIC has not taken yet (their clients
/// are not reading them): counted per connection (`max_reply_bytes_per_connection`: above it the
/// connection's streams stop reading requests, and after `slow_reader_timeout_ms` it is closed)
/// and all together (`max_reply_bytes`: an answer that passes it closes the connection holding
/// the most). Both close with SLOW_READER.
struct ReplyBudget {
    /// All connections together, connections already cut excluded.
    held: Mutex<usize>,
    max: usize,
    per_connection: usize,
    conns: Mutex<HashMap<u64, Weak<ConnReplies>>>,
}

impl ReplyBudget {
    fn new(cfg: &Config) -> Arc<ReplyBudget> {
        Arc::new(ReplyBudget {
            held: Mutex::new(0),
            max: cfg.max_reply_bytes,
            per_connection: cfg.max_reply_bytes_per_connection,
            conns: Mutex::new(HashMap::new()),
        })
    }

    fn held(&self) -> usize {
        *lock(&self.held)
    }

    /// Over the global budget: closes the connections holding the most until it fits.
    fn shed(&self) {
        let mut victims: Vec<(usize, Arc<ConnReplies>)> = lock(&self.conns)
            .values()
            .filter_map(Weak::upgrade)
            .map(|c| (c.held(), c))
            .collect();
        victims.sort_by_key(|v| std::cmp::Reverse(v.0));
        for (held, c) in victims {
            if self.held() <= self.max {
                break;
            }
            warn!(
                conn_id = c.id,
                held,
                max = self.max,
                "closing the client connection holding the most unread answers: the proxy's reply memory is full"
            );
            c.cut(format!(
                "slow reader: the proxy's memory for unread answers (max_reply_bytes {}) is full and this connection holds the most ({held} bytes); read answers as they come or ask for less at once",
                self.max
            ));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One client connection's share of the [`ReplyBudget`].
struct ConnReplies {
    id: u64,
    conn: quinn::Connection,
    budget: Arc<ReplyBudget>,
    /// Bytes held, and whether the connection was cut (its bytes no longer count globally).
    state: Mutex<(usize, bool)>,
    /// True while the connection holds more than its budget: its streams read no requests.
    over: watch::Sender<bool>,
    /// Set once it is cut: its streams stop taking answers at once.
    is_cut: std::sync::atomic::AtomicBool,
}

impl ConnReplies {
    fn new(id: u64, conn: quinn::Connection, budget: Arc<ReplyBudget>) -> Arc<ConnReplies> {
        let c = Arc::new(ConnReplies {
            id,
            conn,
            budget,
            state: Mutex::new((0, false)),
            over: watch::Sender::new(false),
            is_cut: std::sync::atomic::AtomicBool::new(false),
        });
        lock(&c.budget.conns).insert(id, Arc::downgrade(&c));
        c
    }

    fn held(&self) -> usize {
        lock(&self.state).0
    }

    fn set_over(&self, held: usize) {
        let now = held > self.budget.per_connection;
        self.over
            .send_if_modified(|o| std::mem::replace(o, now) != now);
    }

    fn charge(&self, n: usize) {
        {
            let mut st = lock(&self.state);
            st.0 += n;
            if !st.1 {
                *lock(&self.budget.held) += n;
            }
            self.set_over(st.0);
        }
        if self.budget.held() > self.budget.max {
            self.budget.shed();
        }
    }

    fn release(&self, n: usize) {
        let mut st = lock(&self.state);
        st.0 = st.0.saturating_sub(n);
        if !st.1 {
            let mut g = lock(&self.budget.held);
            *g = g.saturating_sub(n);
        }
        self.set_over(st.0);
    }

    /// Closes the connection with SLOW_READER; its answers stop counting at once (they are freed
    /// as its streams end).
    fn cut(&self, why: String) {
        {
            let mut st = lock(&self.state);
            if st.1 {
                return;
            }
            st.1 = true;
            self.is_cut.store(true, Ordering::Relaxed);
            let mut g = lock(&self.budget.held);
            *g = g.saturating_sub(st.0);
        }
        self.conn
            .close(CloseCode::SlowReader.code().into(), why.as_bytes());
    }
}

impl Drop for ConnReplies {
    fn drop(&mut self) {
        let st = lock(&self.state);
        if !st.1 {
            let mut g = lock(&self.budget.held);
            *g = g.saturating_sub(st.0);
        }
        drop(st);
        lock(&self.budget.conns).remove(&self.id);
    }
}

/// Resolves once the connection has stayed above its reply budget for `timeout` without a break.
async fn slow_reader(mut over: watch::Receiver<bool>, timeout: Duration) {
    loop {
        if over.wait_for(|o| *o).await.is_err() {
            return std::future::pending().await;
        }
        if tokio::time::timeout(timeout, over.wait_for(|o| !*o))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Size of the buffers [`Chunks`] packs small writes into (a write at least this large gets a
/// buffer of its own size).
const OUTBOX_CHUNK: usize = 64 * 1024;

/// Bytes queued for a stream, as a queue of buffers each allocated at its final size and freed
/// once taken, so the memory held stays close to the bytes held. (One growing `Vec` doubles its
/// allocation and copies everything it holds each time it fills: holding 123 MiB, it briefly
/// took 123 + 247 MiB; docs/BENCHMARKS.md, slow reader.)
#[derive(Default)]
struct Chunks {
    bufs: VecDeque<Vec<u8>>,
    /// Bytes of the first buffer already taken.
    pos: usize,
    /// Bytes not taken yet.
    held: usize,
}

impl Chunks {
    /// Appends what `write` writes, expected to be about `size` bytes: into the last buffer if it
    /// has room, else into a new one of `size` (at least [`OUTBOX_CHUNK`]). Returns the bytes
    /// written.
    fn push_with(&mut self, size: usize, write: impl FnOnce(&mut Vec<u8>)) -> usize {
        if self
            .bufs
            .back()
            .is_none_or(|c| c.capacity() - c.len() < size)
        {
            // An empty buffer is only ever the sole one, kept for reuse: replace it.
            if self.bufs.back().is_some_and(Vec::is_empty) {
                self.bufs.pop_back();
            }
            self.bufs
                .push_back(Vec::with_capacity(size.max(OUTBOX_CHUNK)));
        }
        let sole = self.bufs.len() == 1;
        let Some(last) = self.bufs.back_mut() else {
            return 0;
        };
        let before = last.len();
        write(last);
        let n = last.len() - before;
        // Nothing written: no empty buffer behind others, nor a large one kept.
        if last.is_empty() && (!sole || last.capacity() > OUTBOX_CHUNK) {
            self.bufs.pop_back();
        }
        self.held += n;
        n
    }

    /// The bytes to take next (the rest of the first buffer).
    fn pending(&self) -> &[u8] {
        self.bufs
            .front()
            .and_then(|c| c.get(self.pos..))
            .unwrap_or_default()
    }

    /// `n` more bytes of [`Chunks::pending`] were taken.
    fn taken(&mut self, n: usize) {
        self.pos += n;
        self.held -= n;
        let only = self.bufs.len() == 1;
        let Some(first) = self.bufs.front_mut() else {
            return;
        };
        if self.pos < first.len() {
            return;
        }
        self.pos = 0;
        if only && first.capacity() <= OUTBOX_CHUNK {
            // Kept for the next writes; a large answer's buffer is not kept.
            first.clear();
        } else {
            self.bufs.pop_front();
        }
    }

    /// Bytes allocated.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.bufs.iter().map(Vec::capacity).sum()
    }
}

/// Answers of one client stream waiting for QUIC to take them (already encoded: the decoded
/// answer is freed at once), counted in the connection's reply budget until taken.
struct Outbox {
    bytes: Chunks,
    replies: Arc<ConnReplies>,
}

impl Outbox {
    fn new(replies: Arc<ConnReplies>) -> Outbox {
        Outbox {
            bytes: Chunks::default(),
            replies,
        }
    }

    fn push(&mut self, r: &Response) {
        let n = self
            .bytes
            .push_with(client::response_len(r), |buf| r.encode_into(buf));
        self.replies.charge(n);
    }

    fn push_answer(&mut self, a: &Answer) {
        match a {
            Answer::Made(r) => self.push(r),
            Answer::Relayed { id, response } => {
                let body = response.as_bytes();
                let mut ok = true;
                // The length, its bytes, the id put in (at most 9 bytes for the null's 1).
                let n = self.bytes.push_with(body.len() + 12, |buf| {
                    let before = buf.len();
                    if !put_id(*id, body, buf) {
                        buf.truncate(before);
                        ok = false;
                    }
                });
                self.replies.charge(n);
                if !ok {
                    // Not the form our servers write (a null id first): the slow way.
                    self.push(&relayed_fallback(*id, response));
                }
            }
        }
    }

    fn pending(&self) -> &[u8] {
        self.bytes.pending()
    }

    fn is_empty(&self) -> bool {
        self.bytes.held == 0
    }

    /// QUIC took `n` more bytes.
    fn taken(&mut self, n: usize) {
        self.bytes.taken(n);
        self.replies.release(n);
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.replies.release(self.bytes.held);
    }
}

/// Appends the frame of a client response whose encoding `response` the primary wrote with a
/// null id in first place (`RelayAnswer`), with `id` in its place instead. False (and something
/// written) if `response` does not start that way.
fn put_id(id: u64, response: &[u8], out: &mut Vec<u8>) -> bool {
    const NULL_ID: [u8; 4] = [0x62, b'i', b'd', 0xf6];
    let (Some(&map), Some(rest)) = (response.first(), response.get(5..)) else {
        return false;
    };
    if map >> 5 != 5 || map & 0x1f >= 24 || response[1..5] != NULL_ID {
        return false;
    }
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(map);
    out.extend_from_slice(&NULL_ID[..3]);
    crate::wire::cbor::write_head(out, 0, id);
    out.extend_from_slice(rest);
    let Ok(len) = u32::try_from(out.len() - start - 4) else {
        return false;
    };
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    true
}

/// The status of a relayed answer (its entry after the null id), for the metrics; `unknown` if it
/// is not in the form our servers write (the client then gets `relayed_fallback`'s answer).
/// Our servers write both texts with short heads (every status name is under 24 bytes), and
/// the bytes are compared as they are: no general CBOR read per answer.
fn relayed_status(response: &[u8]) -> Status {
    const KEY: &[u8] = b"\x66status";
    let value = response
        .get(5..)
        .and_then(|r| r.strip_prefix(KEY))
        .and_then(|r| {
            let (&h, rest) = r.split_first()?;
            let n = usize::from(h & 0x1f);
            (h >> 5 == 3 && n < 24).then_some(())?;
            rest.get(..n)
        });
    value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(Status::parse)
        .unwrap_or(Status::Unknown)
}

/// A relayed answer not in the expected form: decoded, its id replaced.
fn relayed_fallback(id: u64, response: &RawItem) -> Response {
    match response.to_value().as_ref().and_then(Response::from_value) {
        Some(r) => Response { id: Some(id), ..r },
        None => Response::error(
            Some(id),
            Status::Unknown,
            "the primary's answer could not be read; the request may or may not have been applied: re-read to find out",
        ),
    }
}

/// Connections per client certificate on one SAP (`max_connections_per_identity`).
#[derive(Default)]
struct Identities {
    held: Mutex<HashMap<Vec<u8>, usize>>,
}

/// One connection's place among its certificate's; given back on drop.
struct IdentitySlot {
    ids: Arc<Identities>,
    key: Vec<u8>,
}

impl Identities {
    fn enter(self: &Arc<Self>, key: Vec<u8>, max: usize) -> Option<IdentitySlot> {
        let mut held = lock(&self.held);
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IdentitySlot {
            ids: self.clone(),
            key,
        })
    }
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut held = lock(&self.ids.held);
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

type Machine = router::Router<Req, RawItem>;
type MAction = router::Action<Req, RawItem>;

/// Part of what the router hands a relay stream's writer, in order.
enum RelayItem {
    /// Frames the router encoded (a batch's small messages: GET/DELETE, watermarks, cancels).
    Frames(Vec<u8>),
    /// A PUT/POST, whose elements are handles on the bytes the client sent: encoded by the
    /// writer as it sends, so a link that does not drain holds no second copy of them beside
    /// the pending request (`max_pending_bytes` counts one).
    Request(Relay),
}

/// A link's relay stream, seen from the router: small frames are encoded here as the router
/// decides them, and what one router batch sends goes to the stream's writer as one message.
struct RelayOut {
    tx: mpsc::UnboundedSender<Vec<RelayItem>>,
    buf: Vec<u8>,
    items: Vec<RelayItem>,
}

impl RelayOut {
    fn new(tx: mpsc::UnboundedSender<Vec<RelayItem>>) -> Self {
        RelayOut {
            tx,
            buf: Vec::new(),
            items: Vec::new(),
        }
    }

    fn send<T: serde::Serialize>(&mut self, m: &T) {
        frame::encode_into(m, &mut self.buf);
    }

    /// A request, after what was encoded before it.
    fn send_request(&mut self, rid: u64, client: u64, cmd: &Command) {
        if matches!(cmd, Command::Put(_) | Command::Post(_)) {
            if !self.buf.is_empty() {
                self.items
                    .push(RelayItem::Frames(std::mem::take(&mut self.buf)));
            }
            self.items.push(RelayItem::Request(Relay::Request {
                rid,
                client: Some(client),
                cmd: cmd.clone(),
            }));
        } else {
            self.send(&RelayRequestRef::Request {
                rid,
                client: Some(client),
                cmd,
            });
        }
    }

    /// Hands what was sent to the writer (after each router batch).
    fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.items
                .push(RelayItem::Frames(std::mem::take(&mut self.buf)));
        }
        if !self.items.is_empty() {
            let _ = self.tx.send(std::mem::take(&mut self.items));
        }
    }
}

/// A relay stream's writer: what the router sent, many frames per write, and never more than
/// [`BATCH_BYTES`] (plus one item) encoded and not yet taken by QUIC.
async fn relay_writer(mut out: FramedSend, mut rx: mpsc::UnboundedReceiver<Vec<RelayItem>>) {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(items) = next.take() {
            for item in items {
                match item {
                    RelayItem::Frames(b) => out.queue_with(|buf| {
                        if buf.is_empty() {
                            *buf = b;
                        } else {
                            buf.extend_from_slice(&b);
                        }
                    }),
                    RelayItem::Request(r) => out.queue_with(|buf| Relay::encode_into(&r, buf)),
                }
                if out.queued() >= BATCH_BYTES && out.flush().await.is_err() {
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if out.flush().await.is_err() {
            return;
        }
    }
}

struct Link {
    control: mpsc::UnboundedSender<ToServer>,
    relay: Option<RelayOut>,
    conn: quinn::Connection,
    /// Pairs the server last reported in a heartbeat (the metrics gauge; STATUS counts exactly).
    pairs: u64,
    /// Replication lag the server last reported (primary with a synchronised backup).
    lag: Option<u64>,
}

/// A STATUS waiting for the primary to count its pairs.
struct StatusWait {
    id: u64,
    reply: RespTx,
    deadline: Instant,
}

/// The router's executor: feeds the state machine (`ha::router`, which wraps the witness) and
/// carries out its actions. It decides nothing itself.
struct Router {
    cfg: Arc<Config>,
    machine: Machine,
    origin: Instant,
    /// The time of the message being handled (read once per message, see `router_loop` and
    /// `RouterTx::handle_now`).
    clock: Instant,
    links: HashMap<LinkId, Link>,
    /// Where the witness's durable state lives (None: kept in memory only).
    state: Option<ProxyStateFile>,
    /// Actions waiting for a `Persist` to finish, in order.
    held: VecDeque<MAction>,
    persisting: bool,
    actions: Vec<MAction>,
    self_tx: mpsc::UnboundedSender<RouterMsg>,
    clients: Arc<AtomicUsize>,
    shutdown_waiters: Vec<(u64, RespTx)>,
    shutdown_deadline: Option<Instant>,
    /// STATUS requests waiting for the primary's count, by token.
    statuses: HashMap<u64, StatusWait>,
    next_status: u64,
    stop: CancellationToken,
    /// Recorded, never read back.
    metrics: Arc<ProxyMetrics>,
    /// Requests that may wait, by client stream (their `wait_no`s), until answered.
    waits: HashMap<u64, HashSet<u64>>,
    /// The rid each of those was last forwarded with.
    wait_rids: HashMap<u64, u64>,
    /// Those whose stream has gone: the primary was told to cancel them, and is told again if
    /// they are re-sent to a new primary.
    wait_cancelled: HashSet<u64>,
    next_wait_no: u64,
    /// Set when the router task ends: nothing more is handled.
    stopped: bool,
}

impl Router {
    /// Handles `msgs` in order, each at the time it is taken, then sends what they produced on
    /// each relay stream in one message.
    fn handle_all(&mut self, msgs: impl IntoIterator<Item = RouterMsg>) {
        for m in msgs {
            self.clock = Instant::now();
            self.handle(m);
        }
        self.flush_relays();
    }

    /// What was sent on each relay stream since the last flush leaves in one message.
    fn flush_relays(&mut self) {
        for l in self.links.values_mut() {
            if let Some(relay) = l.relay.as_mut() {
                relay.flush();
            }
        }
    }

    fn now(&self) -> Millis {
        self.clock.duration_since(self.origin).as_millis() as Millis
    }

    fn step(&mut self, input: router::Input<Req, RawItem>) {
        let now = self.now();
        let mut actions = std::mem::take(&mut self.actions);
        self.machine.step(now, input, &mut actions);
        for a in actions.drain(..) {
            if self.persisting {
                self.held.push_back(a);
            } else {
                self.apply(a);
            }
        }
        self.actions = actions;
    }

    fn persisted(&mut self, r: Result<(), String>) {
        if let Err(e) = r {
            // Without the state on disk a restarted proxy could accept a deposed primary; going
            // on is still better than stopping the service: say so loudly.
            warn!(
                "could not write the proxy state file: {e}; a restart of this proxy may not recognise a deposed primary"
            );
        }
        self.persisting = false;
        while !self.persisting {
            let Some(a) = self.held.pop_front() else {
                break;
            };
            self.apply(a);
        }
        // The heartbeat acknowledgements held behind it are out: the witness counts echoes again.
        self.step(router::Input::Witness(Input::Persisted));
    }

    fn apply(&mut self, a: MAction) {
        match a {
            MAction::Forward { link, rid } => {
                if let (Some(relay), Some(p)) = (
                    self.links.get_mut(&link).and_then(|l| l.relay.as_mut()),
                    self.machine.payload(rid),
                ) {
                    relay.send_request(rid, p.client, &p.cmd);
                    if p.wait_no != 0 {
                        self.wait_rids.insert(p.wait_no, rid);
                        if self.wait_cancelled.contains(&p.wait_no) {
                            relay.send(&Relay::Cancel { rids: vec![rid] });
                        }
                    }
                }
            }
            MAction::Answer { payload, outcome } => {
                if payload.wait_no != 0 {
                    self.wait_rids.remove(&payload.wait_no);
                    self.wait_cancelled.remove(&payload.wait_no);
                    if let Some(set) = self.waits.get_mut(&payload.stream) {
                        set.remove(&payload.wait_no);
                        if set.is_empty() {
                            self.waits.remove(&payload.stream);
                        }
                    }
                }
                if let Some(token) = payload.status {
                    let pairs = match &outcome {
                        Outcome::Reply(r) => RelayAnswer::count(r),
                        _ => None,
                    };
                    return self.answer_status(token, pairs);
                }
                let op = OpLabel::of_command(&payload.cmd);
                let took = self.clock.saturating_duration_since(payload.start);
                self.metrics.latency.observe(op, took);
                self.metrics.in_flight.dec();
                let resp = match outcome {
                    Outcome::Reply(r) => {
                        self.metrics.requests.inc(op, relayed_status(r.as_bytes()));
                        let _ = payload.reply.send_relayed(payload.id, r);
                        return;
                    }
                    Outcome::Unknown => Response::error(
                        Some(payload.id),
                        Status::Unknown,
                        "the primary did not answer within the request timeout; the write may or may not have been applied: re-read to find out",
                    ),
                    Outcome::Unavailable => Response::error(
                        Some(payload.id),
                        Status::Unavailable,
                        format!(
                            "no replica could serve the request within {} ms; it was not applied; retry later",
                            self.cfg.request_timeout_ms
                        ),
                    ),
                };
                self.metrics.requests.inc(op, resp.status);
                let _ = payload.reply.send(resp);
            }
            MAction::Watermark { link, rid } => {
                if let Some(relay) = self.links.get_mut(&link).and_then(|l| l.relay.as_mut()) {
                    relay.send(&Relay::Watermark(rid));
                }
            }
            MAction::Witness(w) => self.witness_action(w),
        }
    }

    fn witness_action(&mut self, a: Action) {
        match a {
            Action::Persist(d) => {
                let Some(state) = self.state.clone() else {
                    // Nothing to write: done at once.
                    self.step(router::Input::Witness(Input::Persisted));
                    return;
                };
                self.persisting = true;
                let tx = self.self_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let r = state.write(&d).map_err(|e| e.to_string());
                    let _ = tx.send(RouterMsg::Persisted(r));
                });
            }
            Action::Welcome { link, role, epoch } => {
                if let Some(l) = self.links.get(&link) {
                    let _ = l.control.send(ToServer::Welcome { role, epoch });
                }
            }
            Action::HeartbeatAck { link, epoch, n } => {
                if let Some(l) = self.links.get(&link) {
                    let _ = l.control.send(ToServer::HeartbeatAck { epoch, n });
                }
            }
            Action::Grant { link, epoch } => {
                if let Some(l) = self.links.get(&link) {
                    let _ = l.control.send(ToServer::Grant { epoch });
                }
            }
            Action::Fence { link, epoch } => {
                if let Some(l) = self.links.remove(&link) {
                    let _ = l.control.send(ToServer::Fence { epoch });
                    close_soon(l.conn, b"fenced");
                }
            }
            Action::Drop { link } => {
                if let Some(l) = self.links.remove(&link) {
                    close_soon(l.conn, b"replaced by a newer link or to be retried");
                }
            }
            Action::RouteTo { link, epoch } => {
                info!(link, epoch, "routing requests to the primary");
            }
            Action::NoPrimary => {
                // Said as an event (primary-lost) by the witness when it is a failure.
                debug!("no primary: requests wait for one (up to request_timeout_ms)");
            }
            Action::Notify { kind, detail } => {
                if kind == "failover" {
                    self.metrics.failovers.inc();
                }
                notify(self.cfg.notify_command.as_deref(), "proxy", kind, &detail);
            }
        }
    }

    fn handle(&mut self, msg: RouterMsg) {
        match msg {
            RouterMsg::Request {
                cmd,
                client,
                stream,
                id,
                reply,
                permit,
                start,
            } => {
                let write = cmd.is_write();
                let wait = cmd.wait_ms(self.cfg.max_wait_ms);
                let mut wait_no = 0;
                if wait > 0 {
                    self.next_wait_no += 1;
                    wait_no = self.next_wait_no;
                    self.waits.entry(stream).or_default().insert(wait_no);
                }
                self.step(router::Input::Request {
                    payload: Req {
                        cmd,
                        client,
                        stream,
                        wait_no,
                        id,
                        reply,
                        permit: Some(permit),
                        start,
                        status: None,
                    },
                    write,
                    wait,
                });
            }
            RouterMsg::StreamGone { stream } => {
                let Some(nos) = self.waits.remove(&stream) else {
                    return;
                };
                let mut rids = Vec::with_capacity(nos.len());
                for no in nos {
                    self.wait_cancelled.insert(no);
                    if let Some(rid) = self.wait_rids.get(&no) {
                        rids.push(*rid);
                    }
                }
                if let (false, Some(relay)) = (
                    rids.is_empty(),
                    self.machine
                        .route()
                        .and_then(|p| self.links.get_mut(&p))
                        .and_then(|l| l.relay.as_mut()),
                ) {
                    relay.send(&Relay::Cancel { rids });
                }
            }
            RouterMsg::Admin {
                op,
                client,
                id,
                reply,
            } => match op {
                Op::Status => self.start_status(client, id, reply),
                Op::Shutdown => self.start_shutdown(id, reply),
                _ => {
                    self.metrics
                        .requests
                        .inc(OpLabel::of_op(&op), Status::Forbidden);
                    let _ = reply.send(Response::error(
                        Some(id),
                        Status::Forbidden,
                        "not an admin operation",
                    ));
                }
            },
            RouterMsg::ServerHello {
                link,
                role,
                epoch,
                info,
                primary,
                control,
                conn,
            } => {
                self.links.insert(
                    link,
                    Link {
                        control,
                        relay: None,
                        conn,
                        pairs: 0,
                        lag: None,
                    },
                );
                self.step(router::Input::Witness(Input::Hello {
                    link,
                    role,
                    epoch,
                    info,
                    primary,
                }));
            }
            RouterMsg::RelayReady { link, relay } => {
                if let Some(l) = self.links.get_mut(&link) {
                    // What the router encoded for a stream this one replaces still goes out.
                    if let Some(mut old) = l.relay.replace(RelayOut::new(relay)) {
                        old.flush();
                    }
                    self.step(router::Input::RelayReady { link });
                }
            }
            RouterMsg::Replies { link, replies, .. } => {
                let replies = replies.into_iter().map(|r| (r.rid, r.response)).collect();
                self.step(router::Input::Replies { link, replies });
            }
            RouterMsg::FromServer { link, msg } => match msg {
                ToProxy::Heartbeat {
                    epoch,
                    info,
                    synced_backup,
                    echo,
                    lag,
                    pairs,
                } => {
                    self.machine.witness_mut().update_info(link, info);
                    if let Some(l) = self.links.get_mut(&link) {
                        l.pairs = pairs;
                        l.lag = lag;
                    }
                    self.step(router::Input::Witness(Input::Heartbeat {
                        link,
                        epoch,
                        synced_backup,
                        echo,
                    }));
                }
                ToProxy::PeerLost { epoch } => {
                    self.step(router::Input::Witness(Input::PeerLost { link, epoch }));
                }
                ToProxy::ShutdownDone { saved, pairs } => {
                    info!(?saved, pairs, "primary saved its space and stopped");
                    let msg = match saved {
                        Some(f) => format!("service stopped; {pairs} pairs saved to {f}"),
                        None => format!("service stopped; {pairs} pairs (no save file configured)"),
                    };
                    self.finish_shutdown(Status::Ok, msg);
                }
                ToProxy::Hello { .. } => {}
            },
            RouterMsg::LinkDown { link } => {
                if self.links.remove(&link).is_none() {
                    // Already dropped or fenced by the witness.
                    return;
                }
                self.step(router::Input::Witness(Input::LinkDown { link }));
                if self.shutdown_deadline.is_some() && self.machine.witness().primary().is_none() {
                    self.finish_shutdown(
                        Status::Ok,
                        "service stopped (primary closed its link)".into(),
                    );
                }
            }
            RouterMsg::ClientGone { client } => {
                if let Some(relay) = self
                    .machine
                    .witness()
                    .primary()
                    .and_then(|p| self.links.get_mut(&p))
                    .and_then(|l| l.relay.as_mut())
                {
                    relay.send(&Relay::ClientGone { client });
                }
            }
            RouterMsg::Persisted(r) => self.persisted(r),
        }
    }

    fn start_shutdown(&mut self, id: u64, reply: RespTx) {
        self.shutdown_waiters.push((id, reply));
        if self.shutdown_deadline.is_some() {
            return;
        }
        // From here the replicas leaving is the expected end, not a failure (the witness knows).
        if !self.machine.witness().stopping() {
            self.step(router::Input::Witness(Input::Stopping));
        }
        let now = self.now();
        match self
            .machine
            .witness()
            .primary()
            .and_then(|p| self.links.get(&p))
        {
            Some(_) if !self.machine.witness().primary_heard_recently(now) => {
                // Both replicas died (or the primary is cut off): nobody can save, and waiting
                // for shutdown_timeout_ms helps no one. Every acknowledged write is in the logs.
                warn!("shutdown requested while the primary is silent: stopping without a save");
                self.finish_shutdown(
                    Status::Ok,
                    "service stopped; the primary was not heard within heartbeat_timeout_ms, so nothing was saved (the replicas' logs hold every acknowledged write)".into(),
                )
            }
            Some(l) => {
                info!("shutdown requested: asking the primary to stop its backup and save");
                let _ = l.control.send(ToServer::Shutdown);
                self.shutdown_deadline = Some(Instant::now() + self.cfg.shutdown_timeout());
            }
            None => self.finish_shutdown(
                Status::Ok,
                "service stopped; no primary was registered, nothing saved".into(),
            ),
        }
    }

    fn finish_shutdown(&mut self, status: Status, message: String) {
        for (id, tx) in self.shutdown_waiters.drain(..) {
            self.metrics.requests.inc(OpLabel::Shutdown, status);
            let _ = tx.send(Response {
                message: Some(message.clone()),
                ..Response::error(Some(id), status, "")
            });
        }
        self.shutdown_deadline = None;
        if status == Status::Ok {
            // Let the answer leave before connections are closed.
            let stop = self.stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                stop.cancel();
            });
        }
    }

    fn tick(&mut self) {
        self.step(router::Input::Tick);
        self.record();
        let now = Instant::now();
        let late: Vec<u64> = self
            .statuses
            .iter()
            .filter(|(_, w)| now >= w.deadline)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            self.answer_status(token, None);
        }
        // The primary heartbeats on while it stops its backup and saves: silence means it died
        // or was cut off after we asked it to save.
        if self.shutdown_deadline.is_some()
            && !self.machine.witness().primary_heard_recently(self.now())
        {
            // The primary died (or was cut off) after we asked it to save.
            warn!("the primary fell silent during shutdown: stopping without its save");
            self.finish_shutdown(
                Status::Ok,
                "service stopped; the primary fell silent before confirming its save (the replicas' logs hold every acknowledged write)".into(),
            );
        } else if let Some(d) = self.shutdown_deadline
            && now >= d
        {
            // The service goes on: a replica leaving is a failure again.
            self.step(router::Input::Witness(Input::StopAborted));
            self.finish_shutdown(
                Status::Unavailable,
                "the primary did not confirm its save within shutdown_timeout_ms; the service was not stopped".into(),
            );
        }
    }

    /// Copies what the metrics mirror of the witness and the router (each tick).
    fn record(&self) {
        let m = &self.metrics;
        let w = self.machine.witness();
        m.epoch.set(w.epoch() as i64);
        m.pending.set(self.machine.pending_len() as i64);
        let primary = w.primary();
        m.primary_up.set(i64::from(primary.is_some()));
        m.connections.set(
            "primary",
            i64::from(primary.is_some_and(|p| self.links.contains_key(&p))),
        );
        m.connections.set(
            "backup",
            i64::from(w.backup().is_some_and(|b| self.links.contains_key(&b))),
        );
        m.backup_state.only(match (w.backup(), w.backup_synced()) {
            (None, _) => "absent",
            (Some(_), false) => "syncing",
            (Some(_), true) => "synced",
        });
        if let Some(l) = primary.and_then(|p| self.links.get(&p)) {
            m.pairs.set(l.pairs as i64);
        }
    }

    /// STATUS: asks the primary to count its pairs through the relay, ordered after every write
    /// answered before (the answer comes in `answer_status`); without a primary, answers now.
    fn start_status(&mut self, client: u64, id: u64, reply: RespTx) {
        if self.machine.witness().primary().is_none() {
            self.metrics.requests.inc(OpLabel::Status, Status::Ok);
            let _ = reply.send(self.status_response(id, None));
            return;
        }
        let token = self.next_status;
        self.next_status += 1;
        self.statuses.insert(
            token,
            StatusWait {
                id,
                reply: reply.clone(),
                deadline: Instant::now() + self.cfg.status_timeout(),
            },
        );
        self.step(router::Input::Request {
            payload: Req {
                cmd: Command::Count,
                client,
                stream: 0,
                wait_no: 0,
                id,
                reply,
                permit: None,
                start: Instant::now(),
                status: Some(token),
            },
            write: false,
            wait: 0,
        });
    }

    /// Answers the STATUS `token` (if it is still waiting) with the primary's count.
    fn answer_status(&mut self, token: u64, pairs: Option<u64>) {
        if let Some(w) = self.statuses.remove(&token) {
            self.metrics.requests.inc(OpLabel::Status, Status::Ok);
            let _ = w.reply.send(self.status_response(w.id, pairs));
        }
    }

    fn status_response(&self, id: u64, pairs: Option<u64>) -> Response {
        let mut r = Response::ok(Some(id));
        if pairs.is_none() && self.machine.witness().primary().is_some() {
            r.message = Some(format!(
                "the primary did not count its pairs within status_timeout_ms ({} ms)",
                self.cfg.status_timeout_ms
            ));
        }
        r.cluster = Some(Box::new(self.status(pairs)));
        r
    }

    fn status(&self, pairs: Option<u64>) -> ClusterStatus {
        let w = self.machine.witness();
        let primary = w.primary();
        let backup_state = match (w.backup(), w.backup_synced()) {
            (None, _) => BackupState::Absent,
            (Some(_), false) => BackupState::Syncing,
            (Some(_), true) => BackupState::Synced,
        };
        ClusterStatus {
            epoch: w.epoch(),
            primary: primary.and_then(|p| w.info(p)).cloned(),
            backup: w.backup().and_then(|b| w.info(b)).cloned(),
            backup_synced: w.backup_synced(),
            clients: self.clients.load(Ordering::Relaxed) as u64,
            pairs,
            pending: self.machine.pending_len() as u64,
            backup_state,
            replication_lag: match backup_state {
                BackupState::Synced => primary.and_then(|p| self.links.get(&p)).and_then(|l| l.lag),
                _ => None,
            },
        }
    }
}

/// Closes a connection after a moment, so that a last control frame (a fence) can leave.
fn close_soon(conn: quinn::Connection, why: &'static [u8]) {
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        conn.close(0u32.into(), why);
    });
}

/// The proxy's durable state: its incarnation (so request ids never repeat across restarts) and
/// the witness's [`Durable`] state (so a restarted proxy never accepts a deposed primary).
#[derive(Clone, Debug)]
struct ProxyStateFile {
    path: std::path::PathBuf,
    incarnation: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ProxyStateDoc {
    incarnation: u64,
    witness: Durable,
}

impl ProxyStateFile {
    /// Reads the previous state (if any), starts the next incarnation and records it.
    fn open(path: &Path) -> Result<(ProxyStateFile, Durable), ProxyError> {
        let bad = |what: String| ProxyError::State {
            path: path.to_owned(),
            what,
        };
        let prev: Option<ProxyStateDoc> = match std::fs::read(path) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| {
                bad(format!(
                    "is not a proxy state file ({e}); move it away to start afresh"
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(bad(format!("cannot be read: {e}"))),
        };
        let (incarnation, durable) = match prev {
            Some(d) => ((d.incarnation + 1) & INCARNATION_MASK, d.witness),
            // A random start: replicas recovered from their logs keep dedupe entries of earlier
            // proxies, whose request ids a new deployment's proxy must never reuse.
            None => (
                (rand::random::<u64>() & INCARNATION_MASK).max(1),
                Durable::default(),
            ),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| bad(format!("directory cannot be created: {e}")))?;
        }
        let f = ProxyStateFile {
            path: path.to_owned(),
            incarnation,
        };
        f.write(&durable)
            .map_err(|e| bad(format!("cannot be written: {e}")))?;
        Ok((f, durable))
    }

    /// Writes atomically and durably (temporary file, fsync, rename).
    fn write(&self, d: &Durable) -> std::io::Result<()> {
        use std::io::Write;
        let doc = ProxyStateDoc {
            incarnation: self.incarnation,
            witness: d.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&doc).map_err(std::io::Error::other)?;
        let mut f = atomic_write_file::AtomicWriteFile::options().open(&self.path)?;
        f.write_all(&bytes)?;
        f.commit()
    }
}

/// How tasks reach the router. The primary's answers are handed to it directly: the relay
/// reader takes the router's lock and steps it, so an answer goes from the reader to its client
/// stream with no hand-off to the router task in between (measured: GET (16,16) 7 % less proxy
/// CPU per request, docs/BENCHMARKS.md). Everything else, client requests included, goes through
/// the router task's channel, which batches what arrives together into one relay message and
/// runs the clock.
#[derive(Clone)]
struct RouterTx {
    tx: mpsc::UnboundedSender<RouterMsg>,
    router: Arc<Mutex<Router>>,
}

impl RouterTx {
    /// Queues a message for the router task.
    fn send(&self, msg: RouterMsg) -> Result<(), Box<mpsc::error::SendError<RouterMsg>>> {
        self.tx.send(msg).map_err(Box::new)
    }

    /// Handles `msg` now, on the caller's task, and sends what it produced for the relay
    /// streams. False once the router task has ended (the message is dropped).
    fn handle_now(&self, msg: RouterMsg) -> bool {
        let mut r = lock(&self.router);
        if r.stopped {
            return false;
        }
        r.handle_all([msg]);
        true
    }
}

async fn router_loop(router: Arc<Mutex<Router>>, mut rx: mpsc::UnboundedReceiver<RouterMsg>) {
    let (period, stop) = {
        let r = lock(&router);
        let period = Duration::from_millis((r.cfg.heartbeat_interval_ms / 2).clamp(5, 100));
        (period, r.stop.clone())
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(256);
    loop {
        tokio::select! {
            // Messages first: heartbeats that queued up while we were busy count before the
            // tick judges anyone silent.
            biased;
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 { break; }
                lock(&router).handle_all(batch.drain(..));
            }
            _ = tick.tick() => {
                let mut r = lock(&router);
                r.clock = Instant::now();
                r.tick();
                r.flush_relays();
            }
            _ = stop.cancelled() => break,
        }
    }
    let mut r = lock(&router);
    // Requests handed to it from now on are dropped (their streams end).
    r.stopped = true;
    // Close every server link with SHUTTING_DOWN so servers do not wait for a lost proxy.
    for l in r.links.values() {
        l.conn.close(
            CloseCode::ShuttingDown.code().into(),
            b"service is stopping",
        );
    }
}

/// Runs the proxy until `stop` is cancelled or a SHUTDOWN completes.
pub async fn run(
    saps: ProxySaps,
    certs: &Path,
    cfg: Config,
    stop: CancellationToken,
) -> Result<(), ProxyError> {
    let cfg = Arc::new(cfg);
    let id = Identity::load(certs, "node")?;
    let client_params = LinkParams {
        idle_timeout: cfg.idle_timeout(),
        keep_alive: None,
        max_bidi_streams: cfg.max_streams_per_connection,
        udp_buffer_bytes: cfg.udp_buffer_bytes,
    };
    let node_params = LinkParams {
        idle_timeout: cfg.node_idle_timeout(),
        keep_alive: Some(cfg.node_keep_alive()),
        max_bidi_streams: 8,
        udp_buffer_bytes: cfg.udp_buffer_bytes,
    };
    let limits = ListenLimits::from_config(&cfg);
    let client_ep =
        endpoint::server_endpoint(saps.client, &id, CLIENT_ALPN, &client_params, &limits).map_err(
            |source| ProxyError::Net {
                what: "cannot open CLIENT_SAP",
                source,
            },
        )?;
    let server_ep = endpoint::server_endpoint(saps.server, &id, NODE_ALPN, &node_params, &limits)
        .map_err(|source| ProxyError::Net {
        what: "cannot open SERVER_SAP",
        source,
    })?;
    let shutdown_ep =
        endpoint::server_endpoint(saps.shutdown, &id, CLIENT_ALPN, &client_params, &limits)
            .map_err(|source| ProxyError::Net {
                what: "cannot open SHUTDOWN_SAP",
                source,
            })?;
    let local = |ep: &quinn::Endpoint| ep.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(
        client_sap = %local(&client_ep),
        server_sap = %local(&server_ep),
        shutdown_sap = %local(&shutdown_ep),
        "proxy listening"
    );

    let (proxy_metrics, registry) = ProxyMetrics::new();
    metrics::spawn(
        cfg.metrics_sap.as_deref(),
        "proxy",
        registry,
        &cfg,
        stop.clone(),
    );
    let clients = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::unbounded_channel();
    let (state, durable, incarnation) = match &cfg.proxy_state_file {
        Some(p) => {
            let (f, d) = ProxyStateFile::open(p)?;
            info!(file = %p.display(), incarnation = f.incarnation, epoch = d.epoch, "proxy state loaded");
            let inc = f.incarnation;
            (Some(f), d, inc)
        }
        None => {
            warn!(
                "no proxy_state_file configured: a restarted proxy cannot recognise a deposed primary; request ids use a random incarnation"
            );
            (None, Durable::default(), rand::random::<u64>())
        }
    };
    // A primary alive through our restart reconnects once its link to the previous proxy times
    // out: that long it keeps the office before its synchronised backup is promoted instead.
    let grace = cfg.node_idle_timeout_ms + cfg.heartbeat_timeout_ms;
    let witness = Witness::restore(cfg.heartbeat_timeout_ms, grace, durable)
        .learning(cfg.proxy_fresh_wait_ms);
    let router = Router {
        cfg: cfg.clone(),
        machine: router::Router::new(witness, incarnation, cfg.request_timeout_ms),
        origin: Instant::now(),
        clock: Instant::now(),
        links: HashMap::new(),
        state,
        held: VecDeque::new(),
        persisting: false,
        actions: Vec::new(),
        self_tx: tx.clone(),
        clients: clients.clone(),
        shutdown_waiters: Vec::new(),
        shutdown_deadline: None,
        statuses: HashMap::new(),
        next_status: 1,
        stop: stop.clone(),
        metrics: proxy_metrics.clone(),
        waits: HashMap::new(),
        wait_rids: HashMap::new(),
        wait_cancelled: HashSet::new(),
        next_wait_no: 0,
        stopped: false,
    };
    let router = Arc::new(Mutex::new(router));
    let router_task = tokio::spawn(router_loop(router.clone(), rx));
    let tx = RouterTx { tx, router };
    let conn_ids = Arc::new(AtomicU64::new(1));
    // Bytes of client requests the proxy holds until they are answered, all connections together.
    let pending_bytes = Arc::new(tokio::sync::Semaphore::new(cfg.max_pending_bytes));

    let shared = ClientShared {
        sap: SapKind::Client,
        router: tx.clone(),
        cfg: cfg.clone(),
        clients: clients.clone(),
        conn_ids: conn_ids.clone(),
        stop: stop.clone(),
        pending_bytes,
        // Answers not yet read, all connections of both SAPs together.
        replies: ReplyBudget::new(&cfg),
        identities: Arc::default(),
        metrics: proxy_metrics,
    };
    let admin = ClientShared {
        sap: SapKind::Shutdown,
        clients: Arc::new(AtomicUsize::new(0)),
        identities: Arc::default(),
        ..shared.clone()
    };
    let t_clients = tokio::spawn(accept_clients(client_ep.clone(), shared));
    let t_admin = tokio::spawn(accept_clients(shutdown_ep.clone(), admin));
    let t_servers = tokio::spawn(accept_servers(
        server_ep.clone(),
        tx.clone(),
        cfg.clone(),
        stop.clone(),
    ));
    drop(tx);

    stop.cancelled().await;
    info!("proxy stopping: closing every connection with SHUTTING_DOWN");
    let code = CloseCode::ShuttingDown.code().into();
    for ep in [&client_ep, &shutdown_ep, &server_ep] {
        ep.close(code, b"service is stopping");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = router_task.await;
        let _ = t_clients.await;
        let _ = t_admin.await;
        let _ = t_servers.await;
        client_ep.wait_idle().await;
        shutdown_ep.wait_idle().await;
        server_ep.wait_idle().await;
    })
    .await;
    info!("proxy stopped");
    Ok(())
}

/// What every client connection of one SAP shares.
#[derive(Clone)]
struct ClientShared {
    sap: SapKind,
    router: RouterTx,
    cfg: Arc<Config>,
    clients: Arc<AtomicUsize>,
    conn_ids: Arc<AtomicU64>,
    stop: CancellationToken,
    pending_bytes: Arc<tokio::sync::Semaphore>,
    replies: Arc<ReplyBudget>,
    identities: Arc<Identities>,
    metrics: Arc<ProxyMetrics>,
}

async fn accept_clients(ep: quinn::Endpoint, shared: ClientShared) {
    let limits = ListenLimits::from_config(&shared.cfg);
    let stop = shared.stop.clone();
    endpoint::accept_each(ep, limits, stop, move |conn| {
        let sh = shared.clone();
        let conn_id = sh.conn_ids.fetch_add(1, Ordering::Relaxed);
        async move {
            let (sap, cfg) = (sh.sap, sh.cfg.clone());
            if !tls::peer_allowed(&conn, sap) {
                warn!(remote = %conn.remote_address(), ?sap, "refusing peer: certificate role not allowed on this SAP");
                conn.close(
                    CloseCode::Forbidden.code().into(),
                    b"forbidden: certificate role not allowed on this SAP",
                );
                return;
            }
            let cert = tls::peer_certificate(&conn).unwrap_or_default();
            let Some(_slot) = sh.identities.enter(cert, cfg.max_connections_per_identity) else {
                warn!(remote = %conn.remote_address(), ?sap, limit = cfg.max_connections_per_identity, "service refused: too many connections with one certificate");
                conn.close(
                    CloseCode::ServiceRefused.code().into(),
                    format!(
                        "service refused: this certificate already holds {} connections (max_connections_per_identity); give each client a certificate of its own (tuplespace certs issue)",
                        cfg.max_connections_per_identity
                    )
                    .as_bytes(),
                );
                return;
            };
            if sap == SapKind::Client {
                let n = sh.clients.fetch_add(1, Ordering::SeqCst);
                if n >= cfg.max_clients {
                    sh.clients.fetch_sub(1, Ordering::SeqCst);
                    warn!(remote = %conn.remote_address(), limit = cfg.max_clients, "service refused: too many clients");
                    conn.close(
                        CloseCode::ServiceRefused.code().into(),
                        format!(
                            "service refused: too many clients (limit {})",
                            cfg.max_clients
                        )
                        .as_bytes(),
                    );
                    return;
                }
            }
            debug!(conn_id, remote = %conn.remote_address(), ?sap, "client connected");
            let role = match sap {
                SapKind::Client => "client",
                _ => "admin",
            };
            sh.metrics.connections.inc(role);
            serve_client_conn(conn, conn_id, &sh).await;
            sh.metrics.connections.dec(role);
            if sap == SapKind::Client {
                sh.clients.fetch_sub(1, Ordering::SeqCst);
            }
            let _ = sh.router.send(RouterMsg::ClientGone { client: conn_id });
            debug!(conn_id, "client disconnected");
        }
    })
    .await;
}

async fn serve_client_conn(conn: quinn::Connection, conn_id: u64, sh: &ClientShared) {
    let cfg = &sh.cfg;
    let budgets = Budgets {
        connection: Arc::new(tokio::sync::Semaphore::new(cfg.max_pending_per_connection)),
        bytes: sh.pending_bytes.clone(),
    };
    let replies = ConnReplies::new(conn_id, conn.clone(), sh.replies.clone());
    let slow = slow_reader(replies.over.subscribe(), cfg.slow_reader_timeout());
    tokio::pin!(slow);
    loop {
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => match s { Ok(s) => s, Err(_) => break },
            _ = sh.stop.cancelled() => break,
            _ = &mut slow => {
                let held = replies.held();
                warn!(conn_id, held, "closing a client connection that leaves its answers unread");
                replies.cut(format!(
                    "slow reader: {held} bytes of answers unread, over max_reply_bytes_per_connection ({}) for more than {} ms; read answers as they come or ask for less at once",
                    cfg.max_reply_bytes_per_connection, cfg.slow_reader_timeout_ms
                ));
                break;
            }
        };
        tokio::spawn(client_stream(
            conn.clone(),
            send,
            recv,
            conn_id,
            sh.sap,
            sh.router.clone(),
            cfg.clone(),
            budgets.clone(),
            replies.clone(),
            sh.metrics.clone(),
        ));
    }
}

/// What a request frame becomes.
enum Classified {
    Admin(RouterMsg),
    /// A data request for the router, once it has its place in the pending budgets.
    Data {
        cmd: Command,
        id: u64,
    },
}

/// Decides what to do with one request frame: an immediate answer, or a message for the router.
fn classify(
    body: &[u8],
    conn_id: u64,
    sap: SapKind,
    cfg: &Config,
    tx: &RespTx,
) -> Result<Classified, (OpLabel, Box<Response>)> {
    // The usual GET, DELETE, PUT and POST in one pass; anything else by the general reader.
    if sap == SapKind::Client
        && let Some((id, cmd)) = client::fast_command(body, cfg.max_pairs_per_request)
    {
        return Ok(Classified::Data { cmd, id });
    }
    // Read in place: no value tree, so a frame of a million tiny items costs its bytes only.
    let req = client::parse_request(body).map_err(|m| (OpLabel::Other, Box::new(m.response())))?;
    let op = OpLabel::of_op(&req.op);
    classify_request(req, conn_id, sap, cfg, tx).map_err(|r| (op, r))
}

fn classify_request(
    req: client::Request,
    conn_id: u64,
    sap: SapKind,
    cfg: &Config,
    tx: &RespTx,
) -> Result<Classified, Box<Response>> {
    let id = req.id;
    match (&req.op, sap) {
        (Op::Other(name), _) => Err(Box::new(Response::error(
            Some(id),
            Status::NotImplemented,
            format!("operator {name} is not implemented"),
        ))),
        (op, SapKind::Client) if op.is_admin() => Err(Box::new(Response::error(
            Some(id),
            Status::Forbidden,
            "SHUTDOWN and STATUS are only allowed on the shutdown SAP with an admin certificate",
        ))),
        (op, SapKind::Shutdown) if op.is_data() => Err(Box::new(Response::error(
            Some(id),
            Status::Forbidden,
            "GET, PUT, POST and DELETE are not allowed on the shutdown SAP; use the client SAP",
        ))),
        (op, _) if op.is_admin() => Ok(Classified::Admin(RouterMsg::Admin {
            op: req.op.clone(),
            client: conn_id,
            id,
            reply: tx.clone(),
        })),
        _ => {
            let cmd = client::command_of(req, cfg.max_pairs_per_request)
                .map_err(|m| Box::new(m.response()))?;
            Ok(Classified::Data { cmd, id })
        }
    }
}

/// Numbers client streams (unique in this proxy).
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// Tells the router, when a client stream task ends, that requests of it still waiting for a
/// match are to be cancelled (only if it sent any that may wait).
struct StreamGone {
    router: RouterTx,
    stream: u64,
    waited: bool,
}

impl Drop for StreamGone {
    fn drop(&mut self) {
        if self.waited {
            let _ = self.router.send(RouterMsg::StreamGone {
                stream: self.stream,
            });
        }
    }
}

/// A data request waiting for its place in the pending budgets; the stream reads nothing more
/// meanwhile, so that requests keep their order.
type Waiting = (
    Command,
    u64,
    Pin<Box<dyn Future<Output = Option<Permit>> + Send>>,
    Instant,
);

#[allow(clippy::too_many_arguments)]
async fn client_stream(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    conn_id: u64,
    sap: SapKind,
    router: RouterTx,
    cfg: Arc<Config>,
    budgets: Budgets,
    replies: Arc<ConnReplies>,
    metrics: Arc<ProxyMetrics>,
) {
    let (tx, mut rx) = RespTx::channel(replies.clone());
    // However the stream ends, requests of it still waiting for a match are cancelled.
    let mut gone = StreamGone {
        router: router.clone(),
        stream: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
        waited: false,
    };
    let stream = gone.stream;
    let mut input = FramedRecv::new(recv, cfg.max_request_bytes);
    // Answers are taken from the router at once and held encoded, counted, until QUIC takes
    // them: a client that does not read is throttled and then cut, never buffered without limit.
    let mut out = Outbox::new(replies.clone());
    let mut over = replies.over.subscribe();
    let max_out = cfg.max_outstanding_per_stream;
    let mut outstanding = 0usize;
    let mut reading = true;
    let mut waiting: Option<Waiting> = None;
    loop {
        if !reading && outstanding == 0 && out.is_empty() && waiting.is_none() {
            let _ = send.finish();
            return;
        }
        // Throttled while the connection holds more unread answers than its budget.
        let throttled = *over.borrow_and_update();
        tokio::select! {
            biased;
            Some((resp, _estimate)) = rx.recv() => {
                outstanding -= 1;
                out.push_answer(&resp);
                while let Ok((r, _estimate)) = rx.try_recv() {
                    outstanding -= 1;
                    out.push_answer(&r);
                }
                if replies.is_cut.load(Ordering::Relaxed) {
                    return;
                }
            }
            w = send.write(out.pending()), if !out.is_empty() => match w {
                Ok(n) => out.taken(n),
                Err(e) => { debug!(conn_id, "client stream ended: {e}"); return; }
            },
            p = async {
                match waiting.as_mut() {
                    Some(w) => w.2.as_mut().await,
                    None => std::future::pending().await,
                }
            }, if waiting.is_some() => {
                let (Some((cmd, id, _, start)), Some(permit)) = (waiting.take(), p) else { return };
                outstanding += 1;
                gone.waited |= cmd.wait_ms(1) > 0;
                let msg = RouterMsg::Request { cmd, client: conn_id, stream, id, reply: tx.clone(), permit, start };
                if router.send(msg).is_err() { return; }
                metrics.in_flight.inc();
            }
            r = over.changed(), if throttled => if r.is_err() { return },
            f = input.next(), if reading && !throttled && waiting.is_none() && outstanding < max_out => {
                let mut next = f;
                // One clock reading for the frames read together.
                let start = Instant::now();
                loop {
                    match next {
                        Ok(Some(body)) => {
                            match classify(&body, conn_id, sap, &cfg, &tx) {
                                Ok(Classified::Admin(msg)) => {
                                    outstanding += 1;
                                    if router.send(msg).is_err() { return; }
                                }
                                Ok(Classified::Data { cmd, id }) => {
                                    // Back-pressure: this stream stops reading while the
                                    // connection (all its streams, reset ones included) or the
                                    // proxy as a whole has too much pending.
                                    // The budget counts what the request holds in memory
                                    // (its bytes and one handle per element), not its frame.
                                    let cost = cmd.mem_bytes().max(body.len()).min(cfg.max_pending_bytes);
                                    let Some(permit) = budgets.try_acquire(cost) else {
                                        let fut = budgets.clone().acquire(cost);
                                        waiting = Some((cmd, id, Box::pin(fut), start));
                                        break;
                                    };
                                    outstanding += 1;
                                    gone.waited |= cmd.wait_ms(1) > 0;
                                    let msg = RouterMsg::Request { cmd, client: conn_id, stream, id, reply: tx.clone(), permit, start };
                                    if router.send(msg).is_err() { return; }
                                    metrics.in_flight.inc();
                                }
                                Err((op, resp)) => {
                                    metrics.requests.inc(op, resp.status);
                                    out.push(&resp);
                                }
                            }
                        }
                        Ok(None) => { reading = false; break; }
                        Err(RecvError::Frame(e @ (FrameError::Empty | FrameError::TooLarge { .. }))) => {
                            warn!(conn_id, "closing client connection: {e}");
                            conn.close(CloseCode::FrameTooLarge.code().into(), format!("frame too large: {e}").as_bytes());
                            return;
                        }
                        Err(RecvError::Frame(FrameError::Truncated)) => {
                            // The client finished its side in the middle of a frame: answer what
                            // was read, say what was not, then finish.
                            out.push(&Response::error(None, Status::Malformed, "the stream ended in the middle of a frame"));
                            reading = false;
                            break;
                        }
                        Err(e) => { debug!(conn_id, "client stream ended: {e}"); return; }
                    }
                    if outstanding >= max_out || *over.borrow() { break; }
                    // Take what is already buffered so answers go out in one write.
                    next = match input.try_next() {
                        Ok(Some(b)) => Ok(Some(b)),
                        Ok(None) => break,
                        Err(e) => Err(e),
                    };
                }
            }
        }
    }
}

async fn accept_servers(
    ep: quinn::Endpoint,
    router: RouterTx,
    cfg: Arc<Config>,
    stop: CancellationToken,
) {
    let link_ids = Arc::new(AtomicU64::new(1));
    let limits = ListenLimits::from_config(&cfg);
    endpoint::accept_each(ep, limits, stop.clone(), move |conn| {
        let link = link_ids.fetch_add(1, Ordering::Relaxed);
        let (router, cfg, stop) = (router.clone(), cfg.clone(), stop.clone());
        async move {
            if !tls::peer_allowed(&conn, SapKind::Node) {
                warn!(remote = %conn.remote_address(), "refusing server link: certificate is not a node certificate");
                conn.close(
                    CloseCode::Forbidden.code().into(),
                    b"forbidden: node certificate required",
                );
                return;
            }
            serve_server_conn(conn, link, router, cfg, stop).await;
        }
    })
    .await;
}

async fn serve_server_conn(
    conn: quinn::Connection,
    link: LinkId,
    router: RouterTx,
    cfg: Arc<Config>,
    stop: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let max = cfg.node_frame_limit();
    loop {
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => match s { Ok(s) => s, Err(e) => { debug!(link, "server link closed: {e}"); break } },
            _ = stop.cancelled() => break,
        };
        let mut input = FramedRecv::new(recv, max);
        let first = match tokio::time::timeout(cfg.connect_timeout(), input.next()).await {
            Ok(Ok(Some(b))) => b,
            _ => continue,
        };
        match frame::decode::<StreamKind>(&first) {
            Ok(StreamKind::Control) => {
                let hello = match tokio::time::timeout(cfg.connect_timeout(), input.next()).await {
                    Ok(Ok(Some(b))) => frame::decode::<ToProxy>(&b),
                    _ => continue,
                };
                let Ok(ToProxy::Hello {
                    role,
                    epoch,
                    info,
                    primary,
                    ..
                }) = hello
                else {
                    warn!(link, "server link: expected hello on control stream");
                    continue;
                };
                let (ctx, mut crx) = mpsc::unbounded_channel::<ToServer>();
                let _ = router.send(RouterMsg::ServerHello {
                    link,
                    role,
                    epoch,
                    info,
                    primary,
                    control: ctx,
                    conn: conn.clone(),
                });
                let mut out = FramedSend::new(send);
                tasks.spawn(async move { out.pump(&mut crx, |_| true).await });
                let router = router.clone();
                tasks.spawn(async move {
                    while let Ok(Some(b)) = input.next().await {
                        match frame::decode::<ToProxy>(&b) {
                            Ok(msg) => {
                                let _ = router.send(RouterMsg::FromServer { link, msg });
                            }
                            Err(e) => warn!(link, "bad control frame from server: {e}"),
                        }
                    }
                });
            }
            Ok(StreamKind::Relay { .. }) => {
                let (rtx, rrx) = mpsc::unbounded_channel::<Vec<RelayItem>>();
                let _ = router.send(RouterMsg::RelayReady { link, relay: rtx });
                tasks.spawn(relay_writer(FramedSend::new(send), rrx));
                let router = router.clone();
                let relay_conn = conn.clone();
                // Answers decoded here and not yet handed on by the router: bounded, so that a
                // router slower than this link holds the server back (QUIC flow control, then the
                // server's own relay budget) instead of growing this process.
                let budget = Arc::new(tokio::sync::Semaphore::new(cfg.max_relay_reply_bytes));
                let most = u32::try_from(cfg.max_relay_reply_bytes).unwrap_or(u32::MAX);
                tasks.spawn(async move {
                    loop {
                        let first = match input.next().await {
                            Ok(Some(b)) => b,
                            Ok(None) => break,
                            Err(RecvError::Read(quinn::ReadError::ConnectionLost(e))) => {
                                // The link itself ended (the server stopped, or it failed):
                                // the control stream's end tells the witness, which decides.
                                debug!(link, "relay stream ended with its link: {e}");
                                break;
                            }
                            Err(e) => {
                                // Never a silent end: without this stream no answer from this
                                // server arrives. Close the link: the server reconnects and
                                // everything unanswered is sent again.
                                error!(
                                    link,
                                    "relay stream from the server failed: {e}; closing the link"
                                );
                                relay_conn.close(0u32.into(), b"relay stream failed");
                                break;
                            }
                        };
                        // Read in place: each answer stays the bytes the server sent.
                        let mut replies = Vec::new();
                        let mut bytes = 0usize;
                        let mut next = Some(first);
                        while let Some(f) = next {
                            match RelayAnswer::read(&f) {
                                Ok(r) => {
                                    bytes += r.response.as_bytes().len();
                                    replies.push(r);
                                }
                                Err(e) => warn!(link, "bad relay frame from server: {e}"),
                            }
                            next = input.try_next().ok().flatten();
                        }
                        let n = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX).min(most);
                        let Ok(held) = budget.clone().acquire_many_owned(n).await else {
                            break;
                        };
                        let msg = RouterMsg::Replies {
                            link,
                            replies,
                            _held: held,
                        };
                        if !router.handle_now(msg) {
                            break;
                        }
                    }
                });
            }
            Err(e) => warn!(link, "server opened a stream of unknown kind: {e}"),
        }
    }
    // The stream tasks end by themselves: their streams fail once the connection is gone.
    tasks.detach_all();
    let _ = router.send(RouterMsg::LinkDown { link });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::Pair;
    use crate::wire::node::Reply;

    /// Takes everything queued, `step` bytes at most per call (as QUIC takes part of a write).
    fn drain(c: &mut Chunks, step: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while c.held > 0 {
            let p = c.pending();
            assert!(!p.is_empty(), "bytes held but none to take");
            let n = p.len().min(step);
            got.extend_from_slice(&p[..n]);
            c.taken(n);
        }
        got
    }

    #[test]
    fn queued_answers_hold_about_their_size_and_come_out_in_order() {
        // 200 answers of ~1 MB (a client that does not read): allocated = held, where one
        // growing Vec held up to twice (and copied it all at each doubling).
        let mut c = Chunks::default();
        let mut want = Vec::new();
        for i in 0..200u32 {
            let answer = vec![i as u8; 1_000_000 + i as usize];
            assert_eq!(
                c.push_with(answer.len(), |b| b.extend_from_slice(&answer)),
                answer.len()
            );
            want.extend_from_slice(&answer);
            assert_eq!(c.held, want.len());
            assert!(
                c.capacity() <= c.held + OUTBOX_CHUNK,
                "{} for {}",
                c.capacity(),
                c.held
            );
        }
        assert_eq!(drain(&mut c, 1 << 20), want);
        assert_eq!(c.capacity(), 0, "large buffers are freed once taken");
        c.push_with(1 << 20, |_| {});
        assert_eq!(
            (c.capacity(), c.held),
            (0, 0),
            "nothing written, nothing kept"
        );

        // Small answers share buffers; an estimate too small, or nothing written (the fallback
        // path), still leaves every byte in order and no empty buffer in front.
        let mut want = Vec::new();
        for i in 0..5000u32 {
            let answer = i.to_be_bytes().repeat(1 + (i % 50) as usize);
            let estimate = if i % 7 == 0 { 1 } else { answer.len() };
            c.push_with(estimate, |b| b.extend_from_slice(&answer));
            c.push_with(if i % 11 == 0 { 1 << 20 } else { 8 }, |_| {});
            want.extend_from_slice(&answer);
            if i % 997 == 0 {
                // Partly taken meanwhile, in odd steps.
                let got = drain(&mut c, 4093);
                assert_eq!(got, want);
                want.clear();
            }
        }
        assert!(c.capacity() <= want.len() + 2 * OUTBOX_CHUNK);
        assert_eq!(drain(&mut c, 1000), want);
        assert!(c.pending().is_empty());
        assert!(
            c.capacity() <= OUTBOX_CHUNK,
            "one small buffer kept for reuse"
        );
    }

    #[test]
    fn a_relayed_answer_gets_the_clients_id_and_is_otherwise_forwarded_as_sent() {
        let replies = [
            Reply::Pairs {
                pairs: vec![Pair::new("a,b", "1")],
                message: None,
            },
            Reply::Rejected(vec![RawItem::from_value(&ciborium::Value::Text(
                "junk".into(),
            ))]),
            Reply::Malformed("bad".into()),
            Reply::TooLarge("big".into()),
        ];
        for reply in replies {
            for id in [0, 23, 24, 1 << 40, u64::MAX] {
                let mut primary = Vec::new();
                reply.clone().into_response(None).encode_into(&mut primary);
                assert_eq!(
                    relayed_status(&primary[4..]),
                    reply.clone().into_response(None).status,
                    "{reply:?}"
                );
                let mut out = Vec::new();
                assert!(put_id(id, &primary[4..], &mut out));
                let mut want = Vec::new();
                reply.clone().into_response(Some(id)).encode_into(&mut want);
                assert_eq!(out, want, "{reply:?} {id}");
            }
        }
        // Anything else is refused (and answered the slow way).
        assert!(!put_id(1, &[0xa1, 0x62, b'i', b'd', 0x01], &mut Vec::new()));
        assert!(!put_id(1, &[0xf6], &mut Vec::new()));
        let mut primary = Vec::new();
        Reply::TooLarge("big".into())
            .into_response(None)
            .encode_into(&mut primary);
        assert_eq!(relayed_status(&primary[4..]), Status::TooLarge);
        assert_eq!(relayed_status(&[0xf6]), Status::Unknown);
        let odd = RawItem::from_value(&Response::ok(Some(9)).to_value());
        assert_eq!(relayed_fallback(3, &odd), Response::ok(Some(3)));
    }
}
