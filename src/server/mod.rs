//! A replica: the primary serves relayed requests from its store and replicates every write to
//! its backup before answering; the backup applies what the primary sends, pings it, and takes
//! over when the proxy (the witness) grants it.
//!
//! Tasks: the store thread (`store`), stream tasks (`links`), and this module's event loop, which
//! feeds the replica state machine (`ha::replica`: role, epoch, commit and release of replies,
//! backups, promotion) and carries out its actions. Nothing slow (connecting, binding, starting
//! or stopping processes, saving) runs in the event loop: it is spawned and reports back as an
//! event. All tasks end when asked.

pub mod args;
pub mod links;
pub mod scan;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::durable::wal::{self, Durable, WalHooks, WalOptions};
use crate::durable::{self as dur, Position, recover};
use crate::ha::Millis;
use crate::ha::replica::{self, Action, BackupId, Input, Timing};
use crate::metrics::ServerMetrics;
use crate::net::endpoint::{self, LinkParams, ListenLimits, NetError};
use crate::net::tls::{self, Identity};
use crate::notify::notify;
use crate::space::{self, Space};
use crate::wire::NODE_ALPN;
use crate::wire::node::{RelayReply, Repl, ReplicaInfo, Role, ToProxy, ToServer};

pub use args::ServerArgs;
use links::{BackupLink, ConnectOutcome, Event, ProxyLink};
use store::{DirectLog, DirectWriter, StoreInit, StoreMsg, StoreOut, StoreStats, StoreTx};

/// Errors that stop a server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{what}: {source}")]
    Net { what: String, source: NetError },
    #[error("{0}")]
    Init(#[from] space::SnapshotError),
    #[error("cannot start the store thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Durable(#[from] crate::durable::DurableError),
}

/// How a server run ended.
pub use crate::ha::replica::ExitReason as Exit;

struct Replica {
    cfg: Arc<Config>,
    args: ServerArgs,
    params: LinkParams,
    limits: ListenLimits,
    id: Identity,
    client_cfg: quinn::ClientConfig,
    dial_ep: quinn::Endpoint,
    store: StoreTx,
    stats: StoreStats,
    events: mpsc::UnboundedSender<Event>,
    machine: replica::Replica<RelayReply>,
    origin: Instant,
    actions: Vec<Action<RelayReply>>,
    /// Our epoch, shared with the replication listener (refuses older primaries).
    epoch: Arc<AtomicU64>,
    info: ReplicaInfo,
    proxy: Option<ProxyLink>,
    proxy_generation: u64,
    control_ep: Option<quinn::Endpoint>,
    heartbeat_ep: Option<quinn::Endpoint>,
    backup_ep: Option<quinn::Endpoint>,
    /// The attached backup's replication link.
    backup: Option<(BackupId, BackupLink)>,
    /// Backup processes started here, by id.
    children: HashMap<BackupId, tokio::process::Child>,
    ping_stop: CancellationToken,
    exit: Option<(Exit, bool)>,
    shutdown_from_proxy: bool,
    /// True once this replica is the primary: relayed requests reach the store only then.
    serving: tokio::sync::watch::Sender<bool>,
    /// What the local log holds durably (None: no log).
    durable: Option<tokio::sync::watch::Receiver<Durable>>,
    /// The highest epoch handed to the store (and so to the log).
    logged_epoch: u64,
    /// This replica's directory under the data root, its lock, and the root.
    data: Option<DataDir>,
    /// Recorded, never read back.
    metrics: Arc<ServerMetrics>,
    /// The update whose replication is being timed, and when it was handed to the backup link.
    probe: Option<(u64, Instant)>,
    /// The highest update the backup has acknowledged (its initial copy included).
    acked: u64,
    /// A backup's replication reader appends updates to the log itself (until promoted).
    direct: Option<Arc<DirectLog>>,
}

/// A replica's own directory under the data root, locked while the process lives.
struct DataDir {
    root: PathBuf,
    dir: PathBuf,
    _lock: std::fs::File,
    /// Superseded copies have been removed (done once this copy is complete and durable).
    tidied: bool,
}

fn bind(
    id: &Identity,
    (params, limits): (&LinkParams, &ListenLimits),
    sap: std::net::SocketAddr,
    what: &str,
) -> Result<quinn::Endpoint, ServerError> {
    endpoint::server_endpoint(sap, id, NODE_ALPN, params, limits).map_err(|source| {
        ServerError::Net {
            what: format!("cannot open {what}"),
            source,
        }
    })
}

/// Binds `sap`, retrying while a previous owner (a killed primary, a promoted backup) lets go.
/// `wait: None` = until it succeeds (logging every few seconds).
async fn bind_retry(
    id: &Identity,
    params: (&LinkParams, &ListenLimits),
    sap: std::net::SocketAddr,
    what: &str,
    wait: Option<Duration>,
    pause: Duration,
) -> Result<quinn::Endpoint, ServerError> {
    let start = Instant::now();
    let mut next_log = start + Duration::from_secs(2);
    loop {
        match bind(id, params, sap, what) {
            Ok(ep) => return Ok(ep),
            Err(e) if wait.is_some_and(|w| start.elapsed() >= w) => return Err(e),
            Err(e) => {
                if Instant::now() >= next_log {
                    warn!("{e}; still retrying (the previous owner has not let go)");
                    next_log = Instant::now() + Duration::from_secs(2);
                } else {
                    debug!("{e}; retrying");
                }
                tokio::time::sleep(pause).await
            }
        }
    }
}

/// Pause between two attempts to bind a SAP that a previous owner still holds.
const BIND_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// The replica state machine's timing, from the configuration.
pub fn timing(cfg: &Config) -> Timing {
    Timing {
        heartbeat_timeout: cfg.heartbeat_timeout_ms,
        proxy_loss_timeout: cfg.proxy_loss_timeout_ms,
        backup_sync_timeout: cfg.backup_sync_timeout_ms,
        backup_ack_timeout: cfg.backup_ack_timeout_ms.max(cfg.heartbeat_timeout_ms),
        backup_retry_backoff: cfg.backup_retry_backoff_ms,
        backup_retry_doublings: cfg.backup_start_retries,
        reconnect_pause: cfg.heartbeat_interval_ms * 2,
    }
}

/// Runs a server until it is shut down, fenced, or loses the proxy.
pub async fn run(
    args: ServerArgs,
    certs: &Path,
    cfg: Config,
    stop: CancellationToken,
) -> Result<Exit, ServerError> {
    let cfg = Arc::new(cfg);
    let id = Identity::load(certs, "node")?;
    let params = LinkParams {
        idle_timeout: cfg.node_idle_timeout(),
        keep_alive: Some(cfg.node_keep_alive()),
        max_bidi_streams: 8,
        udp_buffer_bytes: cfg.udp_buffer_bytes,
    };
    let limits = ListenLimits::from_config(&cfg);
    let role = if args.primary_handle.is_none() {
        Role::Primary
    } else {
        Role::Backup
    };
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();

    // SAPs belong to roles (SPEC §2).
    let (control_ep, heartbeat_ep, backup_ep) = match role {
        Role::Primary => {
            let c = bind(&id, (&params, &limits), args.shutdown_sap, "SHUTDOWN_SAP")?;
            let h = bind(&id, (&params, &limits), args.heartbeat_sap, "HEARTBEAT_SAP")?;
            (Some(c), Some(h), None)
        }
        Role::Backup => {
            // A previous backup may still hold the SAP for a moment (it is being stopped).
            let b = bind_retry(
                &id,
                (&params, &limits),
                args.backup_sap,
                "BACKUP_SAP",
                Some(cfg.connect_timeout()),
                BIND_RETRY_PAUSE,
            )
            .await?;
            (None, None, Some(b))
        }
    };
    for ep in [&control_ep, &heartbeat_ep, &backup_ep]
        .into_iter()
        .flatten()
    {
        info!(sap = %ep.local_addr().map(|a| a.to_string()).unwrap_or_default(), ?role, "server listening");
    }
    // What the log holds durably, published by its writer thread; its failures become events.
    let (dur_tx, mut dur_rx) = tokio::sync::watch::channel(Durable::default());
    let storage_events = ev_tx.clone();
    let start = {
        let args = args.clone();
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || open_data(&args, &cfg, role))
            .await
            .map_err(|e| ServerError::Thread(std::io::Error::other(e)))??
    };
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<StoreOut>();
    let metrics = Arc::new(ServerMetrics::default());
    let stats = StoreStats {
        metrics: metrics.clone(),
        ..StoreStats::default()
    };
    let metrics_stop = stop.child_token();
    crate::metrics::spawn(
        cfg.metrics_sap.as_deref(),
        match role {
            Role::Primary => "primary",
            Role::Backup => "backup",
        },
        ServerMetrics::registry(
            &metrics,
            start.data.is_some(),
            stats.pairs.clone(),
            stats.seq.clone(),
        ),
        &cfg,
        metrics_stop.clone(),
    );
    let save_file = if role == Role::Primary {
        args.save_file.clone()
    } else {
        None
    };
    let mut wal_thread = None;
    let (wal, data, log_base, durable) = match start.data {
        Some((dir, lock, root, last_segment, held)) => {
            dur_tx.send_replace(held);
            if let Ok(t) = std::fs::metadata(dir.join(dur::SNAPSHOT_FILE))
                .and_then(|m| m.modified())
                .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default())
            {
                metrics
                    .wal
                    .last_snapshot_unix_ms
                    .store(t.as_millis() as u64, Ordering::Relaxed);
            }
            let (w, h) = wal::spawn(
                dir.clone(),
                last_segment,
                held,
                WalOptions {
                    metrics: Some(metrics.wal.clone()),
                    ..WalOptions::from_config(&cfg)
                },
                WalHooks {
                    on_durable: Box::new(move |d| {
                        dur_tx.send_replace(d);
                    }),
                    on_error: Box::new(move |e| {
                        let _ = storage_events.send(Event::StorageFailed(e));
                    }),
                },
            )?;
            wal_thread = Some(h);
            let data = DataDir {
                root,
                dir,
                _lock: lock,
                tidied: false,
            };
            (
                Some(w),
                Some(data),
                !held.base && role == Role::Primary,
                Some(dur_rx.clone()),
            )
        }
        None => (None, None, false, None),
    };
    let direct = match (&wal, role) {
        (Some(w), Role::Backup) => Some(DirectLog::new(w.clone(), start.pos.epoch)),
        _ => None,
    };
    let (store_tx, store_thread) = store::spawn(
        StoreInit {
            space: start.space,
            seq: start.pos.seq,
            epoch: start.pos.epoch,
            dedupe: start.dedupe,
            wal,
            log_base,
            direct: direct.clone(),
        },
        cfg.clone(),
        save_file,
        out_tx,
        stats.clone(),
    )
    .map_err(ServerError::Thread)?;

    let client_cfg =
        endpoint::client_config(&id, NODE_ALPN, &params).map_err(|source| ServerError::Net {
            what: "client configuration".into(),
            source,
        })?;
    let dial_ep =
        endpoint::client_endpoint(args.proxy_sap, &params).map_err(|source| ServerError::Net {
            what: "cannot open a socket to reach the proxy".into(),
            source,
        })?;
    let info = ReplicaInfo {
        handle: std::process::id().to_string(),
        sap: match role {
            Role::Primary => args.shutdown_sap_text.clone(),
            Role::Backup => args.backup_sap_text.clone(),
        },
        pid: std::process::id(),
    };
    let origin = Instant::now();
    let mut r = Replica {
        cfg: cfg.clone(),
        args,
        params,
        limits,
        id,
        client_cfg,
        dial_ep,
        store: store_tx.clone(),
        stats,
        events: ev_tx.clone(),
        machine: match &durable {
            Some(_) => replica::Replica::new(role, timing(&cfg), 0)
                .with_log(start.pos.epoch, start.pos.seq),
            None => replica::Replica::new(role, timing(&cfg), 0),
        },
        origin,
        actions: Vec::new(),
        epoch: Arc::new(AtomicU64::new(0)),
        info,
        proxy: None,
        proxy_generation: 0,
        control_ep,
        heartbeat_ep,
        backup_ep,
        backup: None,
        children: HashMap::new(),
        ping_stop: CancellationToken::new(),
        exit: None,
        shutdown_from_proxy: false,
        serving: tokio::sync::watch::Sender::new(role == Role::Primary),
        durable,
        logged_epoch: start.pos.epoch,
        data,
        metrics,
        probe: None,
        acked: 0,
        direct,
    };
    r.start_listeners();
    let mut hb = tokio::time::interval(cfg.heartbeat_interval());
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let (exit, save) = loop {
        if let Some(e) = r.exit {
            break e;
        }
        tokio::select! {
            Some(o) = out_rx.recv() => {
                r.on_store(o);
                while let Ok(o) = out_rx.try_recv() { r.on_store(o); }
            }
            Some(ev) = ev_rx.recv() => r.on_event(ev),
            Ok(()) = dur_rx.changed(), if r.durable.is_some() => {
                let d = *dur_rx.borrow_and_update();
                r.on_durable(d);
            }
            _ = hb.tick() => {
                r.step(Input::Tick);
                r.record();
            }
            _ = stop.cancelled() => {
                let save = r.machine.role() == Role::Primary;
                break (Exit::Shutdown, save);
            }
        }
    };
    if save {
        // The backup stops and the store thread saves while this loop goes on heartbeating the
        // witness (the machine decides nothing more; a save of millions of pairs takes seconds).
        let backup = r.backup.take().map(|(_, b)| b);
        let children: Vec<_> = r.children.drain().map(|(_, c)| c).collect();
        let (store, save_file, timeout) = (
            r.store.clone(),
            r.args.save_file.clone(),
            r.cfg.shutdown_timeout(),
        );
        let work = async move {
            stop_backup(backup, children).await;
            save_space(&store, save_file.as_deref(), timeout).await
        };
        tokio::pin!(work);
        let saved = loop {
            tokio::select! {
                saved = &mut work => break saved,
                Some(ev) = ev_rx.recv() => r.on_event_while_saving(ev),
                _ = hb.tick() => r.step(Input::Tick),
            }
        };
        if r.shutdown_from_proxy
            && let Some(l) = &r.proxy
        {
            let _ = l.control.send(ToProxy::ShutdownDone {
                saved: if saved {
                    r.args.save_file.as_ref().map(|p| p.display().to_string())
                } else {
                    None
                },
                pairs: r.stats.pairs.load(Ordering::Relaxed),
            });
            // Wait (bounded) for the proxy to read the answer and close the link.
            let _ = tokio::time::timeout(Duration::from_secs(2), l.conn.closed()).await;
        }
    } else {
        // Never kill a backup here: it may be the promoted primary now.
        r.release_children();
    }
    r.ping_stop.cancel();
    let _ = store_tx.send(StoreMsg::Stop);
    let _ = tokio::task::spawn_blocking(move || {
        let _ = store_thread.join();
        // The store's last flush is done; the writer ends when the store's sender is gone.
        if let Some(h) = wal_thread {
            let _ = h.join();
        }
    })
    .await;
    for ep in [&r.control_ep, &r.heartbeat_ep, &r.backup_ep]
        .into_iter()
        .flatten()
    {
        ep.close(0u32.into(), b"stopping");
    }
    if let Some(p) = &r.proxy {
        p.conn.close(0u32.into(), b"stopping");
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), r.dial_ep.wait_idle()).await;
    metrics_stop.cancel();
    Ok(exit)
}

impl Replica {
    /// The log holds more: releases may follow; once this copy is complete and durable, copies
    /// it supersedes on this host are removed (in the background).
    fn on_durable(&mut self, d: Durable) {
        self.step(Input::LogDurable {
            epoch: d.pos.epoch,
            seq: d.pos.seq,
        });
        if let Some(data) = &mut self.data
            && d.base
            && !data.tidied
        {
            data.tidied = true;
            let (root, dir) = (data.root.clone(), data.dir.clone());
            let max_frame = dur::max_frame(&self.cfg);
            tokio::task::spawn_blocking(move || {
                for gone in recover::remove_superseded(&root, &dir, d.pos, max_frame) {
                    info!(dir = %gone.display(), "removed a copy superseded by this one");
                }
            });
        }
    }

    fn now(&self) -> Millis {
        self.origin.elapsed().as_millis() as Millis
    }

    /// Copies what the metrics mirror of the state machine and the links (each heartbeat tick).
    fn record(&mut self) {
        let m = &self.metrics;
        let role = self.machine.role();
        m.role.only(match role {
            Role::Primary => "primary",
            Role::Backup => "backup",
        });
        m.epoch.set(self.machine.epoch() as i64);
        m.held.set(self.machine.held() as i64);
        m.connections.set("proxy", i64::from(self.proxy.is_some()));
        m.connections
            .set("backup", i64::from(self.backup.is_some()));
        let state = match (role, self.machine.backup_id()) {
            (Role::Primary, Some(_)) if self.machine.has_promotable_backup() => "synced",
            (Role::Primary, Some(_)) => "syncing",
            _ => "absent",
        };
        m.backup_state.only(state);
        if state == "synced" {
            let seq = self.stats.seq.load(Ordering::Relaxed);
            m.lag_updates.set(seq.saturating_sub(self.acked) as i64);
        } else {
            m.lag_updates.set(0);
            m.lag.restart();
            self.probe = None;
        }
    }

    fn notify(&self, kind: &str, detail: &str) {
        let who = format!("server {} ({:?})", self.info.pid, self.machine.role());
        notify(self.cfg.notify_command.as_deref(), &who, kind, detail);
    }

    /// Feeds the state machine and carries out what it decides.
    fn step(&mut self, input: Input<RelayReply>) {
        let now = self.now();
        let mut actions = std::mem::take(&mut self.actions);
        self.machine.step(now, input, &mut actions);
        self.epoch.store(self.machine.epoch(), Ordering::Relaxed);
        if self.machine.epoch() > self.logged_epoch {
            self.logged_epoch = self.machine.epoch();
            let _ = self.store.send(StoreMsg::Epoch(self.logged_epoch));
        }
        if self.machine.role() == Role::Primary
            && let Some(d) = self.direct.take()
        {
            // Before any request can reach the store (`serving` below).
            d.retire();
        }
        self.serving
            .send_if_modified(|s| std::mem::replace(s, self.machine.role() == Role::Primary) != *s);
        for a in actions.drain(..) {
            self.apply(a);
        }
        self.actions = actions;
    }

    fn apply(&mut self, a: Action<RelayReply>) {
        match a {
            Action::Release(r) => {
                if let Some(p) = &self.proxy {
                    let _ = p.relay_out.send(r);
                }
            }
            Action::Heartbeat {
                epoch,
                synced_backup,
                echo,
            } => {
                if let Some(p) = &self.proxy {
                    let _ = p.control.send(ToProxy::Heartbeat {
                        epoch,
                        info: self.info.clone(),
                        pairs: self.stats.pairs.load(Ordering::Relaxed),
                        synced_backup,
                        echo,
                        lag: self.machine.backup_lag(),
                    });
                }
            }
            Action::PeerLost { epoch } => {
                if let Some(p) = &self.proxy {
                    let _ = p.control.send(ToProxy::PeerLost { epoch });
                }
            }
            Action::ConnectProxy { role, epoch } => self.connect_proxy(role, epoch),
            Action::StartBackup { id, attempt } => self.start_backup(id, attempt),
            Action::SendSnapshot { id } => {
                if let Some((bid, b)) = &self.backup
                    && *bid == id
                {
                    info!("backup connected: sending the space");
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let _ = self.store.send(StoreMsg::Snapshot(tx));
                    let snap_tx = b.snap_tx.clone();
                    tokio::spawn(async move {
                        if let Ok(s) = rx.await {
                            let _ = snap_tx.send(s);
                        }
                    });
                }
            }
            Action::CloseBackup { id } => {
                if self.backup.as_ref().is_some_and(|(b, _)| *b == id)
                    && let Some((_, b)) = self.backup.take()
                {
                    b.conn.close(0u32.into(), b"backup dropped");
                }
                // Not killed: it may have been promoted (we may be the one cut off).
            }
            Action::KillBackup { id } => {
                if let Some(mut c) = self.children.remove(&id) {
                    let _ = c.start_kill();
                    tokio::spawn(async move {
                        let _ = c.wait().await;
                    });
                }
            }
            Action::Promote { epoch } => {
                self.metrics.promotions.inc();
                self.promote(epoch)
            }
            Action::TakeOver { epoch } => self.take_over(epoch),
            Action::Exit { reason, save } => self.exit = Some((reason, save)),
            Action::Notify { kind, detail } => self.notify(kind, &detail),
        }
    }

    fn start_listeners(&mut self) {
        for ep in [&self.control_ep, &self.heartbeat_ep].into_iter().flatten() {
            tokio::spawn(links::serve_beats(
                ep.clone(),
                self.cfg.clone(),
                self.events.clone(),
            ));
        }
        if let Some(ep) = &self.backup_ep {
            tokio::spawn(links::serve_replication(
                ep.clone(),
                self.cfg.clone(),
                self.store.clone(),
                self.epoch.clone(),
                self.info.handle.clone(),
                self.durable.clone(),
                self.direct
                    .clone()
                    .map(|d| DirectWriter::new(d).applying(self.stats.view.clone())),
                self.events.clone(),
                self.metrics.clone(),
            ));
            tokio::spawn(links::ping_primary(
                self.dial_ep.clone(),
                self.client_cfg.clone(),
                self.args.heartbeat_sap,
                self.args.heartbeat_sap_text.clone(),
                self.cfg.clone(),
                self.events.clone(),
                self.stats.seq.clone(),
                self.ping_stop.clone(),
            ));
        }
    }

    /// Reaches the proxy in the background; the outcome comes back as an event.
    fn connect_proxy(&mut self, role: Role, epoch: u64) {
        self.proxy_generation += 1;
        let generation = self.proxy_generation;
        let ep = self.dial_ep.clone();
        let ccfg = self.client_cfg.clone();
        let sap = self.args.proxy_sap;
        let sap_text = self.args.proxy_sap_text.clone();
        let cfg = self.cfg.clone();
        let info = self.info.clone();
        let primary = match role {
            Role::Backup => self.args.primary_handle.clone(),
            Role::Primary => None,
        };
        let store = self.store.clone();
        let reads = self.stats.view.get().cloned();
        let serving = self.serving.subscribe();
        let events = self.events.clone();
        tokio::spawn(async move {
            let r = links::connect_proxy(
                &ep,
                &ccfg,
                sap,
                &sap_text,
                &cfg,
                role,
                epoch,
                generation,
                &info,
                primary.as_deref(),
                &store,
                reads,
                &serving,
                &events,
            )
            .await;
            let _ = events.send(Event::ProxyConnected(r));
        });
    }

    fn on_store(&mut self, o: StoreOut) {
        match o {
            StoreOut::Write {
                seq,
                rid,
                change,
                reply,
            } => {
                if let Some((_, b)) = &self.backup {
                    let _ = b.tx.send(Repl::Update {
                        seq,
                        rid,
                        change,
                        reply: reply.clone(),
                    });
                    if self.probe.is_none() && self.machine.has_promotable_backup() {
                        self.probe = Some((seq, Instant::now()));
                    }
                }
                self.step(Input::Write {
                    seq,
                    reply: RelayReply { rid, reply },
                });
            }
            StoreOut::Read { after_seq, reply } | StoreOut::Dedup { after_seq, reply } => {
                self.step(Input::Read { after_seq, reply });
            }
            StoreOut::Watermark(w) => {
                if let Some((_, b)) = &self.backup {
                    let _ = b.tx.send(Repl::Watermark(w));
                }
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        let current = |g: u64, s: &Self| s.proxy.as_ref().is_some_and(|p| p.generation == g);
        match ev {
            Event::ProxyConnected(Ok((link, epoch))) => {
                if link.generation != self.proxy_generation {
                    link.conn.close(0u32.into(), b"superseded");
                    return;
                }
                info!(epoch, role = ?self.machine.role(), "registered with the proxy");
                self.proxy = Some(link);
                self.step(Input::ProxyUp { epoch });
            }
            Event::ProxyConnected(Err(ConnectOutcome::Fenced(epoch))) => {
                self.step(Input::ProxyRefused { epoch })
            }
            Event::ProxyConnected(Err(ConnectOutcome::Failed(msg))) => {
                debug!("cannot reach the proxy: {msg}");
                self.step(Input::ProxyConnectFailed);
            }
            Event::ProxyDown(g) => {
                if current(g, self) {
                    self.proxy = None;
                    self.step(Input::ProxyDown);
                }
            }
            Event::Control(g, msg) => {
                if !current(g, self) {
                    return;
                }
                match msg {
                    ToServer::Shutdown => {
                        info!("shutdown requested by the proxy");
                        self.shutdown_from_proxy = true;
                        self.step(Input::Shutdown);
                    }
                    ToServer::Fence { epoch } => self.step(Input::Fence { epoch }),
                    ToServer::Grant { epoch } => self.step(Input::Grant { epoch }),
                    ToServer::HeartbeatAck { epoch, n } => {
                        self.step(Input::HeartbeatAck { epoch, n })
                    }
                    ToServer::Welcome { .. } => {}
                }
            }
            Event::Terminate(epoch) => self.step(Input::Terminate { epoch }),
            Event::StorageFailed(why) => {
                error!("{why}");
                self.step(Input::StorageFailed { why });
            }
            Event::Ping { received } => self.step(Input::Ping { received }),
            Event::Pong => self.step(Input::Pong),
            Event::PrimaryStop => {
                info!("the primary is shutting the service down");
                self.step(Input::ReplicationDown { stop: true });
            }
            Event::ReplicationDown => self.step(Input::ReplicationDown { stop: false }),
            Event::BackupConnected(id, link) => {
                let attach = self.machine.backup_id().is_none();
                if attach {
                    self.backup = Some((id, link));
                } else {
                    link.conn.close(0u32.into(), b"not wanted");
                }
                self.step(Input::BackupConnected { id });
            }
            Event::BackupStartFailed(id, why) => {
                warn!("backup start failed: {why}");
                self.step(Input::BackupStartFailed { id, why });
            }
            Event::BackupSynced(id, seq, handle) => {
                self.acked = seq;
                self.step(Input::BackupSynced { id, seq, handle })
            }
            Event::BackupAck(id, seq) => {
                self.acked = self.acked.max(seq);
                if let Some((s, t)) = self.probe
                    && s <= seq
                {
                    self.metrics.replicate.observe(t.elapsed());
                    self.probe = None;
                }
                self.step(Input::BackupAck { id, seq })
            }
            Event::BackupDown(id, why) => self.step(Input::BackupDown { id, why }),
            Event::PromotionDone { control, heartbeat } => {
                self.control_ep = Some(control);
                self.heartbeat_ep = Some(heartbeat);
                self.start_listeners();
                info!(shutdown_sap = %self.args.shutdown_sap_text, "serving on the primary's SAPs");
                self.step(Input::PromotionDone);
            }
        }
    }

    /// Stops tracking backup processes (reaped in the background when they exit).
    fn release_children(&mut self) {
        for (_, mut c) in self.children.drain() {
            tokio::spawn(async move {
                let _ = c.wait().await;
            });
        }
    }

    /// Starts a backup (local child, launch command, or none: an operator starts it) and connects
    /// to its BACKUP_SAP in the background.
    fn start_backup(&mut self, id: BackupId, attempt: u32) {
        let a = &self.args;
        let positional = [
            a.shutdown_sap_text.clone(),
            a.proxy_sap_text.clone(),
            a.backup_sap_text.clone(),
            a.heartbeat_sap_text.clone(),
            a.save_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "null".into()),
        ];
        let handle = match &self.cfg.backup_launch_command {
            // Remote backups know the primary by its SHUTDOWN_SAP.
            Some(_) => a.shutdown_sap_text.clone(),
            None => std::process::id().to_string(),
        };
        let mut argv: Vec<String> = vec!["server".into()];
        argv.extend(positional);
        argv.push(handle);
        argv.push("null".into());
        argv.extend(a.passthrough.iter().cloned());
        // The backup serves its metrics at our backup_metrics_sap, and starts its own backups
        // (after a promotion) at ours: the two addresses alternate (empty = none).
        let or_none = |s: &Option<String>| s.clone().unwrap_or_default();
        argv.extend([
            "--set".into(),
            format!("metrics_sap={}", or_none(&self.cfg.backup_metrics_sap)),
            "--set".into(),
            format!("backup_metrics_sap={}", or_none(&self.cfg.metrics_sap)),
        ]);
        match &self.cfg.backup_launch_command {
            None => {
                let exe = own_binary();
                let mut cmd = tokio::process::Command::new(exe);
                cmd.args(&argv).stdin(std::process::Stdio::null());
                match cmd.spawn() {
                    Ok(c) => {
                        self.notify(
                            "backup-start",
                            &format!(
                                "starting backup (attempt {}) as pid {}",
                                attempt,
                                c.id().unwrap_or(0)
                            ),
                        );
                        self.children.insert(id, c);
                    }
                    Err(e) => {
                        let _ = self.events.send(Event::BackupStartFailed(
                            id,
                            format!("cannot start a backup process: {e}"),
                        ));
                        return;
                    }
                }
            }
            Some(t) if t.trim().is_empty() => {
                self.notify(
                    "backup-wait",
                    &format!(
                        "waiting for an operator-started backup at {}",
                        a.backup_sap_text
                    ),
                );
            }
            Some(t) => {
                let quoted: Vec<String> = argv
                    .iter()
                    .map(|s| {
                        shlex::try_quote(s)
                            .map(|c| c.into_owned())
                            .unwrap_or_default()
                    })
                    .collect();
                let line = t
                    // {backup_host} first: {args} carries the template itself (--set
                    // backup_launch_command=...) for the backup, which must stay a template.
                    .replace("{backup_host}", &a.backup_sap.ip().to_string())
                    .replace("{args}", &quoted.join(" "));
                self.notify(
                    "backup-start",
                    &format!("launching backup (attempt {}): {line}", attempt),
                );
                match tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(&line)
                    .stdin(std::process::Stdio::null())
                    .spawn()
                {
                    Ok(c) => {
                        self.children.insert(id, c);
                    }
                    Err(e) => {
                        let _ = self.events.send(Event::BackupStartFailed(
                            id,
                            format!("cannot run the launch command: {e}"),
                        ));
                        return;
                    }
                }
            }
        }
        let ep = self.dial_ep.clone();
        let ccfg = self.client_cfg.clone();
        let sap = a.backup_sap;
        let sap_text = a.backup_sap_text.clone();
        let cfg = self.cfg.clone();
        let epoch = self.machine.epoch();
        let info = self.info.clone();
        let events = self.events.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            // A backup that is not reachable within a few connect timeouts did not start (or was
            // refused by the witness): try again rather than wait for the whole sync timeout.
            let reach =
                Duration::from_millis(cfg.backup_sync_timeout_ms).min(cfg.connect_timeout() * 5);
            let deadline = Instant::now() + reach;
            loop {
                match links::connect_backup(
                    &ep, &ccfg, sap, &sap_text, &cfg, epoch, &info, id, &events, &metrics,
                )
                .await
                {
                    Ok((conn, tx, snap_tx)) => {
                        let _ = events
                            .send(Event::BackupConnected(id, BackupLink { conn, tx, snap_tx }));
                        return;
                    }
                    Err(e) if Instant::now() >= deadline => {
                        let _ = events.send(Event::BackupStartFailed(
                            id,
                            format!("backup at {sap_text} unreachable: {e}"),
                        ));
                        return;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }

    /// While the primary saves at a shutdown: follows the proxy link and its heartbeat
    /// acknowledgements (the machine heartbeats on); everything else is moot now. A backup that
    /// connects now is not wanted.
    fn on_event_while_saving(&mut self, ev: Event) {
        match ev {
            Event::ProxyConnected(_) | Event::ProxyDown(_) => self.on_event(ev),
            Event::Control(_, ToServer::HeartbeatAck { .. }) => self.on_event(ev),
            Event::BackupConnected(_, link) => link.conn.close(0u32.into(), b"stopping"),
            _ => {}
        }
    }

    /// Backup -> primary, on the witness's grant (the state machine has already switched roles
    /// and serves): stop pinging, give up BACKUP_SAP, take over the save file.
    fn promote(&mut self, epoch: u64) {
        info!(epoch, "promoted: serving as the primary");
        self.ping_stop.cancel();
        // Multi-host: roles swap hosts. This host takes the primary's ports on its own address,
        // and the next backup goes to the old primary's host.
        if self.args.shutdown_sap.ip() != self.args.backup_sap.ip() {
            self.args = self.args.swapped_hosts();
            info!(
                shutdown_sap = %self.args.shutdown_sap_text,
                heartbeat_sap = %self.args.heartbeat_sap_text,
                backup_sap = %self.args.backup_sap_text,
                "multi-host promotion: serving on this host's address; next backup on the old primary's host"
            );
        }
        if let Some(ep) = self.backup_ep.take() {
            ep.close(0u32.into(), b"promoted");
            // Let go of BACKUP_SAP now, not after the closed connections drain, so the new
            // backup can bind it at once.
            if let Ok(sock) = std::net::UdpSocket::bind((self.args.backup_sap.ip(), 0)) {
                let _ = ep.rebind(sock);
            }
        }
        self.info.sap = self.args.shutdown_sap_text.clone();
        // The new primary saves to SAVE_FILE from now on.
        let _ = self
            .store
            .send(StoreMsg::SetSaveFile(self.args.save_file.clone()));
    }

    /// The witness confirmed the promotion: fence the old primary (SIGKILL when local, which also
    /// ends a SIGSTOPped process; an authenticated terminate when remote) and take its SAPs in
    /// the background, once it lets go of them.
    fn take_over(&mut self, epoch: u64) {
        let handle = self.args.primary_handle.clone().unwrap_or_default();
        match handle.parse::<i32>() {
            Ok(pid) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(_) => {
                let ep = self.dial_ep.clone();
                let ccfg = self.client_cfg.clone();
                let cfg = self.cfg.clone();
                let target = handle.clone();
                tokio::spawn(async move {
                    if let Err(e) = links::terminate_remote(&ep, &ccfg, &target, epoch, &cfg).await
                    {
                        warn!("could not send terminate to the old primary at {target}: {e}");
                    }
                });
            }
        }
        let id = self.id.clone();
        let (params, limits) = (self.params, self.limits);
        let (shutdown_sap, heartbeat_sap) = (self.args.shutdown_sap, self.args.heartbeat_sap);
        let events = self.events.clone();
        tokio::spawn(async move {
            let control = bind_retry(
                &id,
                (&params, &limits),
                shutdown_sap,
                "SHUTDOWN_SAP",
                None,
                BIND_RETRY_PAUSE,
            )
            .await;
            let heartbeat = bind_retry(
                &id,
                (&params, &limits),
                heartbeat_sap,
                "HEARTBEAT_SAP",
                None,
                BIND_RETRY_PAUSE,
            )
            .await;
            match (control, heartbeat) {
                (Ok(control), Ok(heartbeat)) => {
                    let _ = events.send(Event::PromotionDone { control, heartbeat });
                }
                (c, h) => {
                    for e in [c.err(), h.err()].into_iter().flatten() {
                        error!("{e}");
                    }
                }
            }
        });
    }
}

/// Tells the backup to stop (service shutdown) and waits (bounded) for it and any backup
/// process this server started.
async fn stop_backup(backup: Option<BackupLink>, children: Vec<tokio::process::Child>) {
    if let Some(b) = backup {
        let _ = b.tx.send(Repl::Stop);
        let _ = tokio::time::timeout(Duration::from_secs(2), b.conn.closed()).await;
    }
    for mut c in children {
        if tokio::time::timeout(Duration::from_secs(3), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
}

/// Has the store thread save the space to `save_file` (if any), waiting at most `timeout`;
/// whether it was saved.
async fn save_space(
    store: &StoreTx,
    save_file: Option<&std::path::Path>,
    timeout: Duration,
) -> bool {
    let Some(path) = save_file else {
        return false;
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if store.send(StoreMsg::Save(tx)).is_err() {
        return false;
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(Ok(n))) => {
            info!(file = %path.display(), pairs = n, "space saved");
            true
        }
        Ok(Ok(Err(e))) => {
            error!(file = %path.display(), "saving failed: {e}; the previous file (if any) is intact");
            false
        }
        _ => {
            error!(file = %path.display(), "saving did not finish within shutdown_timeout_ms");
            false
        }
    }
}

/// What a replica starts from.
struct Start {
    space: Space,
    pos: Position,
    dedupe: Vec<(u64, crate::wire::node::Reply)>,
    /// Its directory, lock, data root, last log segment, and what the log already holds.
    data: Option<(PathBuf, std::fs::File, PathBuf, Option<u64>, Durable)>,
}

/// Finds this replica's starting state. A primary recovers the most advanced complete copy under
/// its data root (or under INIT_FILE when that is a directory) and goes on in that copy's
/// directory; with none, it loads INIT_FILE (a save file) if given and starts a new directory.
/// A backup always starts a new, empty directory (its primary sends it the space).
fn open_data(args: &ServerArgs, cfg: &Config, role: Role) -> Result<Start, ServerError> {
    let limits = cfg.tuple_limits();
    let load_init = |path: &Path| -> Result<Space, ServerError> {
        let s = space::load_snapshot(path, &limits)?;
        info!(file = %path.display(), pairs = s.len(), "loaded init file");
        Ok(s)
    };
    let Some(root) = dur::data_root(cfg, args.save_file.as_deref()) else {
        warn!(
            "no SAVE_FILE and no data_dir: this replica keeps the space in memory only; a crash of both replicas loses it"
        );
        let space = match (&args.init_file, role) {
            (Some(p), Role::Primary) => load_init(p)?,
            _ => Space::new(),
        };
        return Ok(Start {
            space,
            pos: Position::default(),
            dedupe: Vec::new(),
            data: None,
        });
    };
    let new_dir = |space: Space| -> Result<Start, ServerError> {
        let (dir, lock) = recover::create_dir(&root)?;
        info!(dir = %dir.display(), policy = ?cfg.fsync, "new replica directory");
        Ok(Start {
            space,
            pos: Position::default(),
            dedupe: Vec::new(),
            data: Some((dir, lock, root.clone(), None, Durable::default())),
        })
    };
    if role == Role::Backup {
        return new_dir(Space::new());
    }
    let init_dir = args.init_file.as_ref().filter(|p| p.is_dir());
    let search = init_dir.cloned().unwrap_or_else(|| root.clone());
    let started = std::time::Instant::now();
    match recover::recover(&search, dur::max_frame(cfg), cfg.max_dedupe_entries)? {
        Some(rec) => {
            let c = rec.copy;
            info!(
                dir = %c.dir.display(),
                position = %c.pos,
                pairs = c.space.len(),
                from_snapshot = c.from_snapshot,
                replayed = c.replayed,
                ms = started.elapsed().as_millis() as u64,
                "recovered the most advanced copy"
            );
            if let Some(init) = args.init_file.as_ref().filter(|p| !p.is_dir()) {
                info!(
                    init = %init.display(),
                    "INIT_FILE not loaded: the data directory holds a copy ({}); move `{}` away to start from the file",
                    c.pos,
                    root.display()
                );
            }
            let held = Durable {
                pos: c.pos,
                base: true,
                bases: 0,
            };
            Ok(Start {
                space: c.space,
                pos: c.pos,
                dedupe: c.dedupe.into_iter().collect(),
                data: Some((c.dir, rec.lock, search, c.last_segment, held)),
            })
        }
        None => {
            let found = recover::replica_dirs(&search).len();
            if found > 0 {
                warn!(
                    root = %search.display(),
                    copies = found,
                    "the data root holds replica directories but no complete copy (with fsync \"never\" or \"interval\" a power cut may have taken them back): starting from {}",
                    args.init_file
                        .as_ref()
                        .filter(|p| !p.is_dir())
                        .map(|p| format!("INIT_FILE `{}`", p.display()))
                        .unwrap_or_else(|| "an empty space".into())
                );
            }
            let space = match &args.init_file {
                Some(p) if !p.is_dir() => load_init(p)?,
                _ => Space::new(),
            };
            new_dir(space)
        }
    }
}

/// This program's path, to start a backup as a copy of ourselves. After an upgrade in place
/// Linux reports the old file as `PATH (deleted)`: the new binary at PATH is what we want then.
pub fn own_binary() -> PathBuf {
    match std::env::current_exe() {
        Ok(p) => {
            let s = p.to_string_lossy();
            match s.strip_suffix(" (deleted)") {
                Some(live) => PathBuf::from(live),
                None => p,
            }
        }
        Err(_) => PathBuf::from("tuplespace"),
    }
}

/// Resolves the path argument `null` to None.
pub fn null_path(s: &str) -> Option<PathBuf> {
    (s != "null").then(|| PathBuf::from(s))
}
