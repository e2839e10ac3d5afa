//! Stream tasks of a replica: the proxy link (control + relay), replication (primary -> backup,
//! snapshot then updates), and heartbeats (backup -> primary pings). Each task ends when its
//! stream or channel ends; each reports to the replica's event loop through `Event`s.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::store::{DirectWriter, Relayed, SpaceCopy, StoreMsg, StoreTx, StoreView};
use crate::config::Config;
use crate::durable::dedupe;
use crate::durable::wal::Durable;
use crate::ha::replica::BackupId;
use crate::metrics::{ReplicationLag, ServerMetrics};
use crate::net::endpoint::{self, ListenLimits};
use crate::net::stream::{BATCH_BYTES, FramedRecv, FramedSend};
use crate::net::tls::{self, SapKind};
use crate::wire::client::pairs_node_len;
use crate::wire::frame;
use crate::wire::node::{
    Beat, Relay, RelayAnswer, RelayReply, Repl, ReplAck, ReplicaInfo, Reply, Role, StreamKind,
    ToProxy, ToServer,
};

/// Everything the stream tasks tell the replica's event loop. Proxy events carry the link's
/// generation and backup events the backup's id, so that news from a link already replaced is
/// recognised as such.
#[derive(Debug)]
pub enum Event {
    Control(u64, ToServer),
    ProxyDown(u64),
    /// The background attempt to reach the proxy ended.
    ProxyConnected(Result<(ProxyLink, u64), ConnectOutcome>),
    /// Primary side.
    BackupAck(BackupId, u64),
    BackupSynced(BackupId, u64, String),
    BackupDown(BackupId, String),
    /// A heartbeat from the backup, with the last update it has applied (received, maybe not yet
    /// logged).
    Ping {
        received: u64,
    },
    BackupConnected(BackupId, BackupLink),
    BackupStartFailed(BackupId, String),
    /// A promotion took the primary's SAPs.
    PromotionDone {
        control: quinn::Endpoint,
        heartbeat: quinn::Endpoint,
    },
    /// Backup side.
    Pong,
    PrimaryStop,
    ReplicationDown,
    Terminate(u64),
    /// The log writer failed.
    StorageFailed(String),
}

/// Primary side: a connected backup.
pub struct BackupLink {
    pub conn: quinn::Connection,
    pub tx: mpsc::UnboundedSender<Repl>,
    pub snap_tx: mpsc::UnboundedSender<SpaceCopy>,
}

impl std::fmt::Debug for BackupLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupLink").finish_non_exhaustive()
    }
}

pub type Events = mpsc::UnboundedSender<Event>;

/// Handles to a live proxy link.
pub struct ProxyLink {
    pub generation: u64,
    pub control: mpsc::UnboundedSender<ToProxy>,
    pub relay_out: RelayOut,
    pub conn: quinn::Connection,
}

/// What the store must know of one proxy link's relay stream: how many bytes of answers wait for
/// the proxy to read them (the store starts no new request above `max_relay_reply_bytes`), and
/// which client connections have ended at the proxy (their reads need not be computed).
pub struct RelayGate {
    /// Bytes of answers queued, and how many threads wait for room (told only if any do:
    /// a notify is a system call).
    queued: Mutex<(usize, usize)>,
    room: Condvar,
    max: usize,
    /// Longest the store waits for room: past it, it goes on (and says so) rather than stall on
    /// a link that neither drains nor fails.
    wait_at_most: Duration,
    gone: Mutex<(HashSet<u64>, VecDeque<u64>)>,
    max_gone: usize,
    /// Batches of requests the link's relay reader sent to the store, and how many of them the
    /// store has handled: equal when nothing sent on this link waits for the store thread.
    sent: AtomicU64,
    handled: AtomicU64,
}

impl RelayGate {
    pub fn new(cfg: &Config) -> Arc<RelayGate> {
        Arc::new(RelayGate {
            queued: Mutex::new((0, 0)),
            room: Condvar::new(),
            max: cfg.max_relay_reply_bytes,
            wait_at_most: cfg.request_timeout(),
            gone: Mutex::new((HashSet::new(), VecDeque::new())),
            max_gone: cfg.max_clients,
            sent: AtomicU64::new(0),
            handled: AtomicU64::new(0),
        })
    }

    /// Relay reader: one more batch of this link's requests goes to the store.
    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::SeqCst);
    }

    /// Store thread: it has handled one more batch of this link's requests.
    pub fn handled(&self) {
        self.handled.fetch_add(1, Ordering::SeqCst);
    }

    /// True if the store has handled every batch this link sent it.
    pub fn caught_up(&self) -> bool {
        self.handled.load(Ordering::SeqCst) == self.sent.load(Ordering::SeqCst)
    }

    /// True if the answers queued for the proxy are within the budget.
    pub fn has_room(&self) -> bool {
        self.queued.lock().unwrap_or_else(|e| e.into_inner()).0 <= self.max
    }

    /// Store thread: waits while the answers queued for the proxy pass the budget (back-pressure
    /// from a proxy that reads slower than the store answers).
    pub fn wait_for_room(&self) {
        let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        if q.0 <= self.max {
            return;
        }
        q.1 += 1;
        let (mut q, t) = self
            .room
            .wait_timeout_while(q, self.wait_at_most, |q| q.0 > self.max)
            .unwrap_or_else(|e| e.into_inner());
        q.1 -= 1;
        if t.timed_out() {
            warn!(
                queued = q.0,
                max = self.max,
                "answers for the proxy did not drain within {:?}; going on",
                self.wait_at_most
            );
        }
    }

    pub(crate) fn charge(&self, n: usize) {
        self.queued.lock().unwrap_or_else(|e| e.into_inner()).0 += n;
    }

    pub(crate) fn release(&self, n: usize) {
        let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        q.0 = q.0.saturating_sub(n);
        if q.0 <= self.max && q.1 > 0 {
            self.room.notify_all();
        }
    }

    fn client_gone(&self, client: u64) {
        let mut g = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        if g.0.insert(client) {
            g.1.push_back(client);
        }
        while g.1.len() > self.max_gone {
            if let Some(old) = g.1.pop_front() {
                g.0.remove(&old);
            }
        }
    }

    /// True if the proxy said this client connection has ended.
    pub fn is_gone(&self, client: u64) -> bool {
        self.gone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .contains(&client)
    }
}

/// An answer on its way to the proxy, counted in its link's [`RelayGate`] until QUIC has taken
/// it (or it is dropped with the link).
struct Charged {
    reply: RelayReply,
    bytes: usize,
    gate: Arc<RelayGate>,
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.gate.release(self.bytes);
    }
}

/// The sending end of a proxy link's relay stream.
pub struct RelayOut {
    tx: mpsc::UnboundedSender<Charged>,
    gate: Arc<RelayGate>,
}

impl RelayOut {
    /// Queues an answer for the proxy; false if the link is gone.
    pub fn send(&self, reply: RelayReply) -> bool {
        let bytes = reply_len(&reply.reply);
        self.gate.charge(bytes);
        self.tx
            .send(Charged {
                reply,
                bytes,
                gate: self.gate.clone(),
            })
            .is_ok()
    }
}

/// About the size of a reply in the node encoding (the budget needs a bound, not the exact size).
fn reply_len(r: &Reply) -> usize {
    let envelope = 64;
    envelope
        + match r {
            Reply::Pairs { pairs, message } => {
                pairs_node_len(pairs) + message.as_ref().map_or(0, String::len)
            }
            Reply::Rejected(v) => v.iter().map(|r| r.as_bytes().len()).sum(),
            Reply::TooLarge(m) | Reply::Malformed(m) => m.len(),
            Reply::Count(_) => 9,
        }
}

impl std::fmt::Debug for ProxyLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyLink")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub enum ConnectOutcome {
    Fenced(u64),
    Failed(String),
}

/// Registers with the proxy; returns the link and the epoch/role granted.
#[allow(clippy::too_many_arguments)]
pub async fn connect_proxy(
    ep: &quinn::Endpoint,
    client_cfg: &quinn::ClientConfig,
    proxy_sap: std::net::SocketAddr,
    proxy_sap_text: &str,
    cfg: &Arc<Config>,
    role: Role,
    epoch: u64,
    generation: u64,
    info: &ReplicaInfo,
    primary_handle: Option<&str>,
    store: &StoreTx,
    reads: Option<StoreView>,
    serving: &tokio::sync::watch::Receiver<bool>,
    events: &Events,
) -> Result<(ProxyLink, u64), ConnectOutcome> {
    let fail = |e: String| ConnectOutcome::Failed(e);
    let conn = endpoint::connect(
        ep,
        client_cfg.clone(),
        proxy_sap,
        &endpoint::sap_host(proxy_sap_text),
        cfg.connect_timeout(),
    )
    .await
    .map_err(|e| fail(e.to_string()))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
    let mut out = FramedSend::new(send);
    let mut input = FramedRecv::new(recv, cfg.node_frame_limit());
    out.queue(&StreamKind::Control);
    out.queue(&ToProxy::Hello {
        role,
        epoch,
        info: info.clone(),
        primary: primary_handle.map(str::to_owned),
    });
    out.flush().await.map_err(|e| fail(e.to_string()))?;
    let welcome = tokio::time::timeout(cfg.connect_timeout(), input.next())
        .await
        .map_err(|_| fail("no welcome from the proxy".into()))?
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail("proxy closed the control stream".into()))?;
    let epoch = match frame::decode::<ToServer>(&welcome) {
        Ok(ToServer::Welcome { epoch, .. }) => epoch,
        Ok(ToServer::Fence { epoch }) => return Err(ConnectOutcome::Fenced(epoch)),
        other => return Err(fail(format!("unexpected answer to hello: {other:?}"))),
    };
    // The relay stream is opened by both roles, so a promoted backup needs no new stream.
    let (rsend, rrecv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
    let mut rout = FramedSend::new(rsend);
    rout.send(&StreamKind::Relay { epoch })
        .await
        .map_err(|e| fail(e.to_string()))?;
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<ToProxy>();
    let (rel_tx, mut rel_rx) = mpsc::unbounded_channel::<Charged>();
    let gate = RelayGate::new(cfg);

    tokio::spawn(async move { out.pump(&mut ctl_rx, |_| true).await });
    let ev = events.clone();
    tokio::spawn(async move {
        while let Ok(Some(b)) = input.next().await {
            match frame::decode::<ToServer>(&b) {
                Ok(m) => {
                    if ev.send(Event::Control(generation, m)).is_err() {
                        return;
                    }
                }
                Err(e) => warn!("bad control frame from the proxy: {e}"),
            }
        }
        let _ = ev.send(Event::ProxyDown(generation));
    });
    tokio::spawn(async move {
        // Answers stay counted in the gate until QUIC has taken them.
        let mut written = Vec::new();
        let mut scratch = Vec::new();
        // In the client's encoding: the proxy forwards the bytes with the client's id put in.
        let mut queue = |out: &mut FramedSend, mut m: Charged, written: &mut Vec<Charged>| {
            let reply = std::mem::replace(&mut m.reply.reply, Reply::Rejected(Vec::new()));
            out.queue_with(|buf| RelayAnswer::encode_into(m.reply.rid, reply, &mut scratch, buf));
            written.push(m);
        };
        while let Some(m) = rel_rx.recv().await {
            queue(&mut rout, m, &mut written);
            while rout.queued() < BATCH_BYTES {
                match rel_rx.try_recv() {
                    Ok(m) => queue(&mut rout, m, &mut written),
                    Err(_) => break,
                }
            }
            if rout.flush().await.is_err() {
                break;
            }
            written.clear();
        }
    });
    let store = store.clone();
    let relay_gate = gate.clone();
    let max = cfg.node_frame_limit();
    let mut serving = serving.clone();
    let relay_conn = conn.clone();
    tokio::spawn(async move {
        // A backup the proxy routes to has been granted the office, but the grant travels on the
        // control stream and may arrive after the first requests: they wait for it here.
        while !*serving.borrow_and_update() {
            tokio::select! {
                r = serving.changed() => if r.is_err() { return },
                _ = relay_conn.closed() => return,
            }
        }
        let mut input = FramedRecv::new(rrecv, max);
        let gate = relay_gate;
        let to_store = |reqs: Relayed| {
            gate.sent();
            store.send(StoreMsg::Requests(reqs, gate.clone())).is_ok()
        };
        // A barrier: no read is answered here before the store has handled everything sent to
        // it before this link served (a promoted backup's last updates from its primary).
        if !to_store(Vec::new()) {
            return;
        }
        while let Ok(Some(first)) = input.next().await {
            let mut reqs = Vec::new();
            let mut next = Some(first);
            while let Some(frame) = next {
                // Read in place, as the proxy wrote it; take what is already buffered.
                let m = Relay::read(&frame);
                next = input.try_next().ok().flatten();
                match m {
                    // Only while nothing of this batch waits to be sent: requests of one
                    // connection take effect in the order sent.
                    Ok(Relay::Request {
                        rid,
                        client: Some(c),
                        cmd,
                    }) if reqs.is_empty()
                        && reads
                            .as_ref()
                            .is_some_and(|v| v.try_read(&gate, rid, c, &cmd)) => {}
                    Ok(Relay::Request { rid, client, cmd }) => reqs.push((rid, client, cmd)),
                    Ok(Relay::Watermark(w)) => {
                        if !reqs.is_empty() {
                            to_store(std::mem::take(&mut reqs));
                        }
                        let _ = store.send(StoreMsg::Watermark(w));
                    }
                    Ok(Relay::ClientGone { client }) => {
                        gate.client_gone(client);
                        // Counted by the gate like every batch (its reads wait for it).
                        if !reqs.is_empty() {
                            to_store(std::mem::take(&mut reqs));
                        }
                        let _ = store.send(StoreMsg::ClientGone(client));
                    }
                    Ok(Relay::Cancel { rids }) => {
                        // Counted by the gate like every batch (its reads wait for it).
                        if !reqs.is_empty() {
                            to_store(std::mem::take(&mut reqs));
                        }
                        let _ = store.send(StoreMsg::Cancel(rids));
                    }
                    Err(e) => warn!("bad relay frame from the proxy: {e}"),
                }
            }
            if reqs.is_empty() {
                continue;
            }
            // On this thread if the store keeps up, else through its queue.
            let reqs = match &reads {
                Some(v) => match v.try_handle(&gate, reqs) {
                    Ok(()) => continue,
                    Err(reqs) => reqs,
                },
                None => reqs,
            };
            if !to_store(reqs) {
                break;
            }
        }
    });
    Ok((
        ProxyLink {
            generation,
            control: ctl_tx,
            relay_out: RelayOut { tx: rel_tx, gate },
            conn,
        },
        epoch,
    ))
}

/// Pairs per snapshot message: big enough to batch, small enough not to stall the writer.
const SNAPSHOT_CHUNK: usize = 4096;
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Primary side: connects to the backup's BACKUP_SAP and runs the replication stream. The writer
/// first sends the snapshot, then every update from `updates` newer than the snapshot.
#[allow(clippy::too_many_arguments)]
pub async fn connect_backup(
    ep: &quinn::Endpoint,
    client_cfg: &quinn::ClientConfig,
    backup_sap: std::net::SocketAddr,
    backup_sap_text: &str,
    cfg: &Arc<Config>,
    epoch: u64,
    info: &ReplicaInfo,
    id: BackupId,
    events: &Events,
    metrics: &Arc<ServerMetrics>,
) -> Result<
    (
        quinn::Connection,
        mpsc::UnboundedSender<Repl>,
        mpsc::UnboundedSender<SpaceCopy>,
    ),
    String,
> {
    // Short attempts: the backup process is starting and binds within milliseconds; a long
    // attempt would sit in QUIC's 1 s initial retransmission timer.
    let attempt = cfg
        .connect_timeout()
        .min(std::time::Duration::from_millis(250));
    let conn = endpoint::connect(
        ep,
        client_cfg.clone(),
        backup_sap,
        &endpoint::sap_host(backup_sap_text),
        attempt,
    )
    .await
    .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut out = FramedSend::new(send);
    out.send(&Repl::Hello {
        epoch,
        primary: info.clone(),
    })
    .await
    .map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Repl>();
    let (snap_tx, mut snap_rx) = mpsc::unbounded_channel::<SpaceCopy>();
    let ev = events.clone();
    let m = metrics.clone();
    tokio::spawn(async move {
        let Some((space, snap_seq, dedupe)) = snap_rx.recv().await else {
            return;
        };
        m.sync
            .pairs_total
            .store(space.len() as u64, Ordering::Relaxed);
        m.sync.pairs_sent.store(0, Ordering::Relaxed);
        let mut chunk = Vec::with_capacity(SNAPSHOT_CHUNK);
        let mut bytes = 0;
        for (k, v) in space.iter() {
            bytes += k.len() + v.len();
            chunk.push((k.clone(), v.clone()));
            if chunk.len() == SNAPSHOT_CHUNK || bytes > SNAPSHOT_CHUNK_BYTES {
                bytes = 0;
                m.sync
                    .pairs_sent
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                out.queue(&Repl::Snapshot {
                    pairs: std::mem::take(&mut chunk),
                });
                if out.flush().await.is_err() {
                    return;
                }
            }
        }
        m.sync
            .pairs_sent
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        out.queue(&Repl::Snapshot { pairs: chunk });
        // The dedupe table may hold a million replies or a few large ones: chunks of ~1 MiB,
        // each far below the node frame limit (one reply alone is at most max_response_bytes).
        for c in dedupe::chunks(dedupe, dedupe::DEDUPE_CHUNK_BYTES) {
            out.queue(&Repl::Dedupe(c));
            if out.flush().await.is_err() {
                return;
            }
        }
        out.queue(&Repl::SnapshotDone {
            seq: snap_seq,
            dedupe: vec![],
        });
        if out.flush().await.is_err() {
            return;
        }
        drop(space);
        // Updates the snapshot already contains are skipped.
        pump_updates(&mut out, &mut rx, snap_seq, &m.lag).await;
        out.finish();
    });
    let lag = metrics.lag.clone();
    let max = cfg.node_frame_limit();
    tokio::spawn(async move {
        let mut input = FramedRecv::new(recv, max);
        let why = loop {
            match input.next_batch::<ReplAck>().await {
                Ok(Some(batch)) => {
                    let mut last = None;
                    for m in batch {
                        match m {
                            Ok(ReplAck::Ack { seq }) => last = Some(seq),
                            Ok(ReplAck::Synced { seq, handle }) => {
                                let _ = ev.send(Event::BackupSynced(id, seq, handle));
                            }
                            Err(e) => warn!("bad ack frame from the backup: {e}"),
                        }
                    }
                    if let Some(s) = last {
                        lag.acked(s);
                        let _ = ev.send(Event::BackupAck(id, s));
                    }
                }
                Ok(None) => break "backup ended the replication stream".to_string(),
                Err(e) => break format!("replication stream failed: {e}"),
            }
        };
        let _ = ev.send(Event::BackupDown(id, why));
    });
    Ok((conn, tx, snap_tx))
}

/// Writes updates (those after `snap_seq`) and the rest of what `rx` brings to the backup, many
/// frames per write (as [`FramedSend::pump`]), noting each update's size for the replication lag
/// metric.
async fn pump_updates(
    out: &mut FramedSend,
    rx: &mut mpsc::UnboundedReceiver<Repl>,
    snap_seq: u64,
    lag: &ReplicationLag,
) {
    lag.restart();
    let queue = |out: &mut FramedSend, m: Repl| match &m {
        Repl::Update { seq, .. } if *seq <= snap_seq => {}
        Repl::Update { seq, .. } => {
            let before = out.queued();
            out.queue_with(|buf| Repl::encode_into(&m, buf));
            lag.sent(*seq, out.queued() - before);
        }
        _ => out.queue(&m),
    };
    out.pump_with(rx, queue).await
}

/// Backup side: accepts the primary's replication connections on BACKUP_SAP and applies what
/// arrives. Ends when the endpoint is closed. With a log (`direct`), each update goes to the log
/// writer from here, before the store applies it, when the rules of
/// [`super::store::DirectLog`] allow; otherwise the store logs it.
///
/// Handshakes run each in a task of their own, with a deadline and the limits of
/// [`endpoint::accept_each`], so that strangers knocking (a flood of Initials that never complete)
/// never keep the primary waiting; the replication streams of node peers are then served one at
/// a time, in the order they arrived.
#[allow(clippy::too_many_arguments)]
pub async fn serve_replication(
    ep: quinn::Endpoint,
    cfg: Arc<Config>,
    store: StoreTx,
    min_epoch: Arc<AtomicU64>,
    handle: String,
    durable: Option<watch::Receiver<Durable>>,
    mut direct: Option<DirectWriter>,
    events: Events,
    metrics: Arc<ServerMetrics>,
) {
    type Arrived = (quinn::Connection, quinn::SendStream, quinn::RecvStream);
    let (arrived_tx, mut arrived) = mpsc::channel::<Arrived>(cfg.max_handshakes);
    let wait = cfg.connect_timeout();
    tokio::spawn(endpoint::accept_each(
        ep,
        ListenLimits::from_config(&cfg),
        CancellationToken::new(),
        move |conn| {
            let arrived_tx = arrived_tx.clone();
            async move {
                if !tls::peer_allowed(&conn, SapKind::Node) {
                    conn.close(2u32.into(), b"forbidden: node certificate required");
                    return;
                }
                let Ok(Ok((send, recv))) = tokio::time::timeout(wait, conn.accept_bi()).await
                else {
                    conn.close(0u32.into(), b"no replication stream opened in time");
                    return;
                };
                let _ = arrived_tx.send((conn, send, recv)).await;
            }
        },
    ));
    // Initial copies handed to the store so far: the n-th is acknowledged once the log holds
    // n base records (a primary may send a second copy to this process after a cut).
    let mut bases_sent = 0u64;
    while let Some((conn, send, recv)) = arrived.recv().await {
        let out = FramedSend::new(send);
        let mut input = FramedRecv::new(recv, cfg.node_frame_limit());
        match tokio::time::timeout(wait, input.next()).await {
            Ok(Ok(Some(b))) => match frame::decode::<Repl>(&b) {
                Ok(Repl::Hello { epoch, primary })
                    if epoch >= min_epoch.load(Ordering::Relaxed) =>
                {
                    debug!(epoch, primary = %primary.handle, "replication from the primary");
                }
                other => {
                    warn!("refusing replication stream: {other:?}");
                    conn.close(2u32.into(), b"stale epoch");
                    continue;
                }
            },
            _ => continue,
        }
        let (acks, need) = mpsc::unbounded_channel::<AckNeed>();
        let acker = tokio::spawn(acknowledge(out, need, durable.clone(), handle.clone()));
        metrics.connections.inc("primary");
        let mut first_chunk = true;
        // The update the store holds once it has taken this stream's messages so far (known
        // from this stream's initial copy on): later updates may go to the log directly.
        let mut held: Option<u64> = None;
        // Messages the store logs itself go through the direct writer, which counts them.
        let to_store = |direct: &mut Option<DirectWriter>, m: StoreMsg| match direct {
            Some(d) => d.via_store(&store, m),
            None => {
                let _ = store.send(m);
            }
        };
        'stream: while let Ok(Some(batch)) = input.next_batch_by(Repl::read).await {
            let mut last = None;
            for m in batch {
                match m {
                    Ok(Repl::Snapshot { pairs }) => {
                        to_store(
                            &mut direct,
                            StoreMsg::Load {
                                pairs,
                                reset: first_chunk,
                            },
                        );
                        first_chunk = false;
                    }
                    Ok(Repl::Dedupe(entries)) => {
                        to_store(&mut direct, StoreMsg::LoadDedupe(entries));
                    }
                    Ok(Repl::SnapshotDone { seq, dedupe }) => {
                        if first_chunk {
                            to_store(
                                &mut direct,
                                StoreMsg::Load {
                                    pairs: vec![],
                                    reset: true,
                                },
                            );
                        }
                        to_store(&mut direct, StoreMsg::Synced { seq, dedupe });
                        held = Some(seq);
                        bases_sent += 1;
                        let _ = acks.send(AckNeed::Synced(seq, bases_sent));
                    }
                    Ok(Repl::Update {
                        seq,
                        rid,
                        change,
                        reply,
                    }) => {
                        match &mut direct {
                            Some(d) => {
                                let fresh = held.is_some_and(|h| seq > h);
                                d.update(&store, fresh, (seq, rid, change, reply));
                            }
                            None => {
                                let _ = store.send(StoreMsg::Apply {
                                    seq,
                                    rid,
                                    change,
                                    reply,
                                    logged: false,
                                });
                            }
                        }
                        held = held.map(|h| h.max(seq));
                        last = Some(seq);
                    }
                    Ok(Repl::Watermark(w)) => {
                        let _ = store.send(StoreMsg::Watermark(w));
                    }
                    Ok(Repl::Stop) => {
                        let _ = events.send(Event::PrimaryStop);
                        break 'stream;
                    }
                    Ok(Repl::Hello { .. }) => {}
                    Err(e) => warn!("bad replication frame: {e}"),
                }
            }
            if let Some(seq) = last {
                let _ = acks.send(AckNeed::Upto(seq));
            }
            if acker.is_finished() {
                break;
            }
        }
        drop(acks);
        let _ = acker.await;
        metrics.connections.dec("primary");
        let _ = events.send(Event::ReplicationDown);
    }
}

/// What the backup owes the primary an acknowledgement for.
enum AckNeed {
    /// The initial copy up to this update, the n-th this process received.
    Synced(u64, u64),
    /// Updates up to this one.
    Upto(u64),
}

/// Backup side: acknowledges the initial copy and the updates once this replica holds them: in
/// its log (per the fsync policy) when it keeps one, else once queued to its store in order.
/// Ends when the reader is done (or the stream fails).
async fn acknowledge(
    mut out: FramedSend,
    mut need: mpsc::UnboundedReceiver<AckNeed>,
    mut durable: Option<watch::Receiver<Durable>>,
    handle: String,
) {
    let mut synced: Option<(u64, u64)> = None;
    let mut want = 0u64;
    let mut acked = 0u64;
    let mut open = true;
    while open {
        tokio::select! {
            n = need.recv() => match n {
                Some(AckNeed::Synced(seq, n)) => synced = Some((seq, n)),
                Some(AckNeed::Upto(seq)) => want = want.max(seq),
                None => open = false,
            },
            Ok(()) = async {
                match &mut durable {
                    Some(d) => d.changed().await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        while let Ok(n) = need.try_recv() {
            match n {
                AckNeed::Synced(seq, n) => synced = Some((seq, n)),
                AckNeed::Upto(seq) => want = want.max(seq),
            }
        }
        let held = durable.as_ref().map(|d| *d.borrow());
        if let Some((seq, n)) = synced {
            if held.is_some_and(|d| !d.base || d.bases < n || d.pos.seq < seq) {
                continue;
            }
            synced = None;
            acked = acked.max(seq);
            out.queue(&ReplAck::Synced {
                seq,
                handle: handle.clone(),
            });
        }
        let upto = match held {
            Some(d) => want.min(d.pos.seq),
            None => want,
        };
        if upto > acked {
            acked = upto;
            out.queue(&ReplAck::Ack { seq: upto });
        }
        if out.flush().await.is_err() {
            return;
        }
    }
    // The reader ended: say what is held before the stream closes.
    let _ = out.flush().await;
}

/// Backup side: pings the primary's HEARTBEAT_SAP, each ping with the last update the store
/// applied (`applied`, so the primary can tell a slow log from a cut link); each pong is an
/// event. Reconnects until `stop` is dropped.
#[allow(clippy::too_many_arguments)]
pub async fn ping_primary(
    ep: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    sap: std::net::SocketAddr,
    sap_text: String,
    cfg: Arc<Config>,
    events: Events,
    applied: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut n = 0u64;
    let host = endpoint::sap_host(&sap_text);
    while !stop.is_cancelled() {
        let conn = tokio::select! {
            c = endpoint::connect(&ep, client_cfg.clone(), sap, &host, cfg.connect_timeout()) => c,
            _ = stop.cancelled() => return,
        };
        let Ok(conn) = conn else {
            tokio::time::sleep(cfg.heartbeat_interval()).await;
            continue;
        };
        let Ok((send, recv)) = conn.open_bi().await else {
            continue;
        };
        let mut out = FramedSend::new(send);
        let mut input = FramedRecv::new(recv, 64 * 1024);
        let mut tick = tokio::time::interval(cfg.heartbeat_interval());
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    n += 1;
                    let received = applied.load(Ordering::Relaxed);
                    if out.send(&Beat::Ping { epoch: 0, n, received }).await.is_err() { break; }
                }
                f = input.next() => match f {
                    Ok(Some(b)) => if let Ok(Beat::Pong { .. }) = frame::decode::<Beat>(&b) {
                        let _ = events.send(Event::Pong);
                    },
                    _ => break,
                },
                _ = stop.cancelled() => { conn.close(0u32.into(), b"done"); return; }
            }
        }
        tokio::time::sleep(cfg.heartbeat_interval()).await;
    }
}

/// Primary side: answers pings on HEARTBEAT_SAP (each ping is an event), and accepts an
/// epoch-fenced `Terminate` on SHUTDOWN_SAP. Ends when the endpoint is closed. Each handshake runs
/// in a task of its own with the limits of [`endpoint::accept_each`].
pub async fn serve_beats(ep: quinn::Endpoint, cfg: Arc<Config>, events: Events) {
    endpoint::accept_each(
        ep,
        ListenLimits::from_config(&cfg),
        CancellationToken::new(),
        move |conn| {
            let events = events.clone();
            async move {
                if !tls::peer_allowed(&conn, SapKind::Node) {
                    conn.close(2u32.into(), b"forbidden: node certificate required");
                    return;
                }
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let events = events.clone();
                    tokio::spawn(async move {
                        let mut out = FramedSend::new(send);
                        let mut input = FramedRecv::new(recv, 64 * 1024);
                        while let Ok(Some(b)) = input.next().await {
                            match frame::decode::<Beat>(&b) {
                                Ok(Beat::Ping { epoch, n, received }) => {
                                    let _ = events.send(Event::Ping { received });
                                    if out.send(&Beat::Pong { epoch, n }).await.is_err() {
                                        break;
                                    }
                                }
                                Ok(Beat::Terminate { epoch }) => {
                                    let _ = events.send(Event::Terminate(epoch));
                                }
                                _ => {}
                            }
                        }
                    });
                }
            }
        },
    )
    .await;
}

/// Sends an authenticated, epoch-fenced terminate to a (remote) deposed primary's SHUTDOWN_SAP.
pub async fn terminate_remote(
    ep: &quinn::Endpoint,
    client_cfg: &quinn::ClientConfig,
    sap_text: &str,
    epoch: u64,
    cfg: &Config,
) -> Result<(), String> {
    let sap = endpoint::resolve_sap(sap_text).map_err(|e| e.to_string())?;
    let conn = endpoint::connect(
        ep,
        client_cfg.clone(),
        sap,
        &endpoint::sap_host(sap_text),
        cfg.connect_timeout(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let (send, _recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut out = FramedSend::new(send);
    out.send(&Beat::Terminate { epoch })
        .await
        .map_err(|e| e.to_string())?;
    out.finish();
    let _ = tokio::time::timeout(cfg.connect_timeout(), conn.closed()).await;
    Ok(())
}
