//! A replica: the primary serves relayed requests from its store and replicates every write to
//! its backup before answering; the backup applies what the primary sends, pings it, and takes
//! over when the proxy (the witness) grants it.
//!
//! Tasks: the store thread (`store`), stream tasks (`links`), and this module's event loop, which
//! owns the role, the epoch and the release of replies. All end when asked.

pub mod args;
pub mod links;
pub mod store;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::net::endpoint::{self, LinkParams, NetError};
use crate::net::tls::{self, Identity};
use crate::notify::notify;
use crate::space::{self, Space};
use crate::wire::NODE_ALPN;
use crate::wire::node::{RelayReply, Repl, ReplicaInfo, Role, ToProxy, ToServer};

pub use args::ServerArgs;
use links::{BackupLink, ConnectOutcome, Event, ProxyLink};
use store::{StoreMsg, StoreOut, StoreStats};

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
}

/// How a server run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shut down on request (SHUTDOWN or signal), after saving (primary).
    Shutdown,
    /// Lost the proxy for longer than proxy_loss_timeout.
    ProxyLost,
    /// Deposed or refused by the witness, or terminated by a newer primary.
    Fenced,
    /// Could not (re)start a backup within the configured retries; saved and stopped.
    BackupRetriesExhausted,
}

struct Replica {
    cfg: Arc<Config>,
    args: ServerArgs,
    params: LinkParams,
    id: Identity,
    client_cfg: quinn::ClientConfig,
    dial_ep: quinn::Endpoint,
    store: std::sync::mpsc::Sender<StoreMsg>,
    stats: StoreStats,
    events: mpsc::UnboundedSender<Event>,
    role: Role,
    epoch: u64,
    info: ReplicaInfo,
    // proxy link
    proxy: Option<ProxyLink>,
    proxy_lost_since: Option<Instant>,
    reconnect_at: Instant,
    /// Last heartbeat-ack number from the proxy, echoed back in our heartbeats.
    proxy_echo: u64,
    // primary side
    control_ep: Option<quinn::Endpoint>,
    heartbeat_ep: Option<quinn::Endpoint>,
    backup: Option<BackupState>,
    /// Acknowledge writes without a backup (no synchronised backup, with the witness's consent).
    solo: bool,
    /// Lost a synchronised backup: writes wait until the witness grants solo service.
    awaiting_grant: bool,
    latest_seq: u64,
    committed: u64,
    solo_hw: u64,
    release: VecDeque<(u64, RelayReply)>,
    backup_attempts: u32,
    next_backup_at: Option<Instant>,
    backup_connecting: bool,
    backup_child: Option<tokio::process::Child>,
    // backup side
    backup_ep: Option<quinn::Endpoint>,
    last_pong: Instant,
    peer_lost_sent: bool,
    ping_stop: CancellationToken,
}

struct BackupState {
    link: BackupLink,
    synced: bool,
    acked: u64,
    last_ping: Instant,
    /// Last time an acknowledgement arrived or the backup was fully caught up.
    last_ack: Instant,
    since: Instant,
}

fn bind(
    id: &Identity,
    params: &LinkParams,
    sap: std::net::SocketAddr,
    what: &str,
) -> Result<quinn::Endpoint, ServerError> {
    endpoint::server_endpoint(sap, id, NODE_ALPN, params).map_err(|source| ServerError::Net {
        what: format!("cannot open {what}"),
        source,
    })
}

/// Binds `sap`, retrying while a previous owner (a killed primary, a promoted backup) lets go.
async fn bind_retry(
    id: &Identity,
    params: &LinkParams,
    sap: std::net::SocketAddr,
    what: &str,
    wait: Duration,
) -> Result<quinn::Endpoint, ServerError> {
    let deadline = Instant::now() + wait;
    loop {
        match bind(id, params, sap, what) {
            Ok(ep) => return Ok(ep),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                debug!("{e}; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await
            }
        }
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
    let role = if args.primary_handle.is_none() {
        Role::Primary
    } else {
        Role::Backup
    };
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();

    // SAPs belong to roles (SPEC §2).
    let (control_ep, heartbeat_ep, backup_ep) = match role {
        Role::Primary => {
            let c = bind(&id, &params, args.shutdown_sap, "SHUTDOWN_SAP")?;
            let h = bind(&id, &params, args.heartbeat_sap, "HEARTBEAT_SAP")?;
            (Some(c), Some(h), None)
        }
        Role::Backup => {
            let b = bind_retry(
                &id,
                &params,
                args.backup_sap,
                "BACKUP_SAP",
                cfg.connect_timeout(),
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
    let space = match &args.init_file {
        Some(path) => {
            let s = space::load_snapshot(path, &cfg.tuple_limits())?;
            info!(file = %path.display(), pairs = s.len(), "loaded init file");
            s
        }
        None => Space::new(),
    };
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<StoreOut>();
    let stats = StoreStats::default();
    let save_file = if role == Role::Primary {
        args.save_file.clone()
    } else {
        None
    };
    let (store_tx, store_thread) =
        store::spawn(space, cfg.clone(), save_file, out_tx, stats.clone())
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
    let mut r = Replica {
        cfg: cfg.clone(),
        args,
        params,
        id,
        client_cfg,
        dial_ep,
        store: store_tx.clone(),
        stats,
        events: ev_tx.clone(),
        role,
        epoch: 0,
        info,
        proxy: None,
        proxy_lost_since: Some(Instant::now()),
        reconnect_at: Instant::now(),
        proxy_echo: 0,
        control_ep,
        heartbeat_ep,
        backup: None,
        solo: true,
        awaiting_grant: false,
        latest_seq: 0,
        committed: 0,
        solo_hw: 0,
        release: VecDeque::new(),
        backup_attempts: 0,
        next_backup_at: None,
        backup_connecting: false,
        backup_child: None,
        backup_ep,
        last_pong: Instant::now(),
        peer_lost_sent: false,
        ping_stop: CancellationToken::new(),
    };
    r.start_listeners();
    let mut hb = tokio::time::interval(cfg.heartbeat_interval());
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let exit = loop {
        if r.proxy.is_none() && Instant::now() >= r.reconnect_at {
            match r.connect_proxy().await {
                Ok(()) => {}
                Err(ConnectOutcome::Fenced(e)) => {
                    r.notify(
                        "fenced",
                        &format!("the proxy refused this server (epoch {e})"),
                    );
                    break Exit::Fenced;
                }
                Err(ConnectOutcome::Failed(msg)) => {
                    debug!("cannot reach the proxy: {msg}");
                    r.reconnect_at = Instant::now() + Duration::from_millis(100);
                }
            }
        }
        if let Some(since) = r.proxy_lost_since
            && since.elapsed() >= cfg.proxy_loss_timeout()
        {
            r.notify(
                "proxy-lost",
                &format!(
                    "no proxy at {} for {} ms: stopping",
                    r.args.proxy_sap_text, cfg.proxy_loss_timeout_ms
                ),
            );
            break Exit::ProxyLost;
        }
        tokio::select! {
            Some(o) = out_rx.recv() => {
                r.on_store(o);
                while let Ok(o) = out_rx.try_recv() { r.on_store(o); }
                r.try_release();
            }
            Some(ev) = ev_rx.recv() => {
                if let Some(exit) = r.on_event(ev).await { break exit; }
            }
            _ = hb.tick() => {
                if let Some(exit) = r.on_tick().await { break exit; }
            }
            _ = stop.cancelled() => break Exit::Shutdown,
        }
    };
    if r.role == Role::Primary
        && matches!(
            exit,
            Exit::Shutdown | Exit::ProxyLost | Exit::BackupRetriesExhausted
        )
    {
        r.stop_backup().await;
        r.save().await;
    }
    r.ping_stop.cancel();
    let _ = store_tx.send(StoreMsg::Stop);
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
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
    Ok(exit)
}

impl Replica {
    fn notify(&self, kind: &str, detail: &str) {
        let who = format!("server {} ({:?})", self.info.pid, self.role);
        notify(self.cfg.notify_command.as_deref(), &who, kind, detail);
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
                0,
                self.events.clone(),
            ));
            tokio::spawn(links::ping_primary(
                self.dial_ep.clone(),
                self.client_cfg.clone(),
                self.args.heartbeat_sap,
                self.args.heartbeat_sap_text.clone(),
                self.cfg.clone(),
                self.events.clone(),
                self.ping_stop.clone(),
            ));
        }
    }

    async fn connect_proxy(&mut self) -> Result<(), ConnectOutcome> {
        let (link, epoch) = links::connect_proxy(
            &self.dial_ep,
            &self.client_cfg,
            self.args.proxy_sap,
            &self.args.proxy_sap_text,
            &self.cfg,
            self.role,
            self.epoch,
            self.role == Role::Primary,
            &self.info,
            match self.role {
                Role::Backup => self.args.primary_handle.as_deref(),
                Role::Primary => None,
            },
            &self.store,
            &self.events,
        )
        .await?;
        info!(epoch, role = ?self.role, "registered with the proxy");
        if self.role == Role::Primary
            && self.epoch == 0
            && self.next_backup_at.is_none()
            && self.backup.is_none()
        {
            // First registration of a primary: now start its backup.
            self.next_backup_at = Some(Instant::now());
        }
        self.epoch = self.epoch.max(epoch);
        self.proxy = Some(link);
        self.proxy_lost_since = None;
        Ok(())
    }

    fn on_store(&mut self, o: StoreOut) {
        match o {
            StoreOut::Write {
                seq,
                rid,
                change,
                reply,
            } => {
                self.latest_seq = seq;
                if let Some(b) = &self.backup {
                    let _ = b.link.tx.send(Repl::Update {
                        seq,
                        rid,
                        change,
                        reply: reply.clone(),
                    });
                }
                if self.solo && !self.awaiting_grant {
                    self.committed = seq;
                    self.solo_hw = seq;
                }
                self.release.push_back((seq, RelayReply { rid, reply }));
            }
            StoreOut::Read { after_seq, reply } | StoreOut::Dedup { after_seq, reply } => {
                self.release.push_back((after_seq, reply));
            }
            StoreOut::Watermark(w) => {
                if let Some(b) = &self.backup {
                    let _ = b.link.tx.send(Repl::Watermark(w));
                }
            }
        }
    }

    /// Releases answers whose writes (and every write they may have observed) are durable.
    fn try_release(&mut self) {
        while let Some((need, _)) = self.release.front() {
            if *need > self.committed {
                break;
            }
            if let Some((_, reply)) = self.release.pop_front()
                && let Some(p) = &self.proxy
            {
                let _ = p.relay_out.send(reply);
            }
        }
    }

    fn backup_promotable(&self) -> bool {
        self.backup
            .as_ref()
            .is_some_and(|b| b.synced && b.acked >= self.solo_hw)
    }

    async fn on_tick(&mut self) -> Option<Exit> {
        let now = Instant::now();
        if let Some(p) = &self.proxy {
            let _ = p.control.send(ToProxy::Heartbeat {
                epoch: self.epoch,
                info: self.info.clone(),
                pairs: self.stats.pairs.load(Ordering::Relaxed),
                backup_synced: self.role == Role::Primary && self.backup_promotable(),
                backup: None,
                echo: self.proxy_echo,
            });
        }
        match self.role {
            Role::Primary => {
                let latest = self.latest_seq;
                if let Some(b) = &mut self.backup
                    && b.acked >= latest
                {
                    b.last_ack = now;
                }
                if let Some(b) = &self.backup
                    && now.duration_since(b.last_ping) > self.cfg.heartbeat_timeout()
                {
                    self.lose_backup("backup heartbeats lapsed");
                }
                if let Some(b) = &self.backup
                    && b.synced
                    && b.acked < self.latest_seq
                    && now.duration_since(b.last_ack) > self.cfg.heartbeat_timeout()
                {
                    // Pings flow but updates are not acknowledged: the replication direction is cut.
                    self.lose_backup("backup stopped acknowledging updates");
                }
                if let Some(b) = &self.backup
                    && !b.synced
                    && now.duration_since(b.since)
                        > Duration::from_millis(self.cfg.backup_sync_timeout_ms)
                {
                    self.lose_backup("backup did not synchronise within backup_sync_timeout_ms");
                }
                if let Some(at) = self.next_backup_at
                    && now >= at
                    && !self.backup_connecting
                    && self.proxy.is_some()
                {
                    self.next_backup_at = None;
                    if self.backup_attempts > self.cfg.backup_start_retries {
                        self.notify(
                            "backup-retries-exhausted",
                            &format!("could not start a backup after {} attempts: saving and shutting down", self.backup_attempts),
                        );
                        return Some(Exit::BackupRetriesExhausted);
                    }
                    self.start_backup().await;
                }
            }
            Role::Backup => {
                if now.duration_since(self.last_pong) > self.cfg.heartbeat_timeout()
                    && !self.peer_lost_sent
                {
                    self.peer_lost_sent = true;
                    self.notify("primary-unreachable", "no heartbeat answer from the primary; asking the proxy (witness) to decide");
                    if let Some(p) = &self.proxy {
                        let _ = p.control.send(ToProxy::PeerLost { epoch: self.epoch });
                    }
                }
            }
        }
        None
    }

    async fn on_event(&mut self, ev: Event) -> Option<Exit> {
        match ev {
            Event::Control(ToServer::Shutdown) => {
                info!("shutdown requested by the proxy");
                self.stop_backup().await;
                let saved = self.save().await;
                let pairs = self.stats.pairs.load(Ordering::Relaxed);
                if let Some(l) = &self.proxy {
                    let _ = l.control.send(ToProxy::ShutdownDone {
                        saved: if saved {
                            self.args
                                .save_file
                                .as_ref()
                                .map(|p| p.display().to_string())
                        } else {
                            None
                        },
                        pairs,
                    });
                    // Wait (bounded) for the proxy to read the answer and close the link.
                    let _ = tokio::time::timeout(Duration::from_secs(2), l.conn.closed()).await;
                }
                // Already saved: skip the save on the way out.
                self.role = Role::Backup;
                return Some(Exit::Shutdown);
            }
            Event::Control(ToServer::Fence { epoch }) => {
                self.notify(
                    "fenced",
                    &format!("deposed by the proxy at epoch {epoch}: stopping without serving"),
                );
                // Never kill the backup here: it may be the promoted primary now.
                self.release_backup_child();
                return Some(Exit::Fenced);
            }
            Event::Control(ToServer::Grant { epoch }) => {
                if epoch <= self.epoch && self.role == Role::Primary && !self.awaiting_grant {
                    return None;
                }
                match self.role {
                    Role::Primary => {
                        info!(epoch, "witness grants solo service");
                        self.epoch = epoch;
                        if self.backup.is_some() {
                            // The witness dropped our backup (e.g. it lost the proxy).
                            self.lose_backup("the witness dropped the backup");
                        }
                        self.go_solo();
                    }
                    Role::Backup => self.promote(epoch).await,
                }
            }
            Event::Control(ToServer::HeartbeatAck { n, .. }) => self.proxy_echo = n,
            Event::Control(ToServer::Welcome { .. }) => {}
            Event::ProxyDown => {
                if self.proxy.take().is_some() {
                    self.notify("proxy-link-down", "link to the proxy closed; reconnecting");
                    self.proxy_lost_since = Some(Instant::now());
                    self.reconnect_at = Instant::now();
                }
            }
            Event::Terminate(epoch) => {
                if epoch > self.epoch {
                    self.notify(
                        "terminated",
                        &format!("terminated by the primary of epoch {epoch}"),
                    );
                    self.release_backup_child();
                    return Some(Exit::Fenced);
                }
            }
            Event::Ping => {
                if let Some(b) = &mut self.backup {
                    b.last_ping = Instant::now();
                }
            }
            Event::BackupConnected(link) => {
                self.backup_connecting = false;
                if self.role != Role::Primary {
                    return None;
                }
                info!("backup connected: sending the space");
                let now = Instant::now();
                self.backup = Some(BackupState {
                    link,
                    synced: false,
                    acked: 0,
                    last_ping: now,
                    last_ack: now,
                    since: now,
                });
                let (tx, rx) = tokio::sync::oneshot::channel();
                let _ = self.store.send(StoreMsg::Snapshot(tx));
                if let Some(b) = &self.backup {
                    let snap_tx = b.link.snap_tx.clone();
                    tokio::spawn(async move {
                        if let Ok(s) = rx.await {
                            let _ = snap_tx.send(s);
                        }
                    });
                }
            }
            Event::BackupStartFailed(why) => {
                self.backup_connecting = false;
                warn!("backup start failed: {why}");
                self.kill_backup_child();
                self.schedule_backup();
            }
            Event::BackupSynced(seq) => {
                if let Some(b) = &mut self.backup {
                    b.synced = true;
                    b.acked = b.acked.max(seq);
                    // From now on every write waits for the backup's acknowledgement.
                    self.solo = false;
                    self.backup_attempts = 0;
                    self.notify(
                        "backup-synced",
                        &format!(
                            "backup holds the space as of update {seq}; replication is synchronous"
                        ),
                    );
                }
            }
            Event::BackupAck(seq) => {
                if let Some(b) = &mut self.backup {
                    b.acked = b.acked.max(seq);
                    b.last_ack = Instant::now();
                    if b.synced && !self.solo && !self.awaiting_grant {
                        self.committed = self.committed.max(b.acked);
                        self.try_release();
                    }
                }
            }
            Event::BackupDown(why) => {
                if self.backup.is_some() {
                    self.lose_backup(&why);
                }
            }
            Event::Pong => {
                self.last_pong = Instant::now();
                self.peer_lost_sent = false;
            }
            Event::PrimaryStop => {
                info!("the primary is shutting the service down");
                return Some(Exit::Shutdown);
            }
            Event::ReplicationUp => {}
            Event::ReplicationDown => {
                if self.role == Role::Backup && !self.peer_lost_sent {
                    self.peer_lost_sent = true;
                    if let Some(p) = &self.proxy {
                        let _ = p.control.send(ToProxy::PeerLost { epoch: self.epoch });
                    }
                }
            }
        }
        None
    }

    fn go_solo(&mut self) {
        self.awaiting_grant = false;
        self.solo = true;
        self.committed = self.latest_seq;
        self.solo_hw = self.latest_seq;
        self.try_release();
    }

    fn lose_backup(&mut self, why: &str) {
        let Some(b) = self.backup.take() else { return };
        b.link.conn.close(0u32.into(), b"backup dropped");
        // Not killed: a backup we lost may have been promoted by the witness (we may be the one
        // cut off). A fenced backup stops by itself; a stale one gives up its SAP when it exits.
        self.release_backup_child();
        if b.synced && !self.solo {
            // Writes now wait for the witness: only it may let this primary go on alone.
            self.awaiting_grant = true;
        }
        self.notify(
            "backup-lost",
            &format!("{why}; asking the witness to go on alone, then starting a new backup"),
        );
        if let Some(p) = &self.proxy {
            let _ = p.control.send(ToProxy::PeerLost { epoch: self.epoch });
        }
        self.schedule_backup();
    }

    fn schedule_backup(&mut self) {
        let backoff = self
            .cfg
            .backup_retry_backoff_ms
            .saturating_mul(1 << self.backup_attempts.min(10));
        self.next_backup_at = Some(Instant::now() + Duration::from_millis(backoff));
    }

    /// Stops tracking the backup process (reaped in the background when it exits).
    fn release_backup_child(&mut self) {
        if let Some(mut c) = self.backup_child.take() {
            tokio::spawn(async move {
                let _ = c.wait().await;
            });
        }
    }

    /// Kills a backup process that never got to replicate (start failed): it cannot have been
    /// promoted, since only a synchronised backup can be.
    fn kill_backup_child(&mut self) {
        if let Some(mut c) = self.backup_child.take() {
            let _ = c.start_kill();
            tokio::spawn(async move {
                let _ = c.wait().await;
            });
        }
    }

    /// Starts a backup (local child, launch command, or none: an operator starts it) and connects
    /// to its BACKUP_SAP in the background.
    async fn start_backup(&mut self) {
        self.backup_attempts += 1;
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
                                self.backup_attempts,
                                c.id().unwrap_or(0)
                            ),
                        );
                        self.backup_child = Some(c);
                    }
                    Err(e) => {
                        let _ = self.events.send(Event::BackupStartFailed(format!(
                            "cannot start a backup process: {e}"
                        )));
                        self.backup_connecting = true;
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
                // Nothing was started here, so nothing failed: waiting for an operator does not
                // use up the start retries.
                self.backup_attempts = 0;
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
                    &format!(
                        "launching backup (attempt {}): {line}",
                        self.backup_attempts
                    ),
                );
                match tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(&line)
                    .stdin(std::process::Stdio::null())
                    .spawn()
                {
                    Ok(c) => self.backup_child = Some(c),
                    Err(e) => {
                        let _ = self.events.send(Event::BackupStartFailed(format!(
                            "cannot run the launch command: {e}"
                        )));
                        self.backup_connecting = true;
                        return;
                    }
                }
            }
        }
        self.backup_connecting = true;
        let ep = self.dial_ep.clone();
        let ccfg = self.client_cfg.clone();
        let sap = a.backup_sap;
        let sap_text = a.backup_sap_text.clone();
        let cfg = self.cfg.clone();
        let epoch = self.epoch;
        let info = self.info.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            // A backup that is not reachable within a few connect timeouts did not start (or was
            // refused by the witness): try again rather than wait for the whole sync timeout.
            let reach =
                Duration::from_millis(cfg.backup_sync_timeout_ms).min(cfg.connect_timeout() * 5);
            let deadline = Instant::now() + reach;
            loop {
                match links::connect_backup(&ep, &ccfg, sap, &sap_text, &cfg, epoch, &info, &events)
                    .await
                {
                    Ok((conn, tx, snap_tx)) => {
                        let _ =
                            events.send(Event::BackupConnected(BackupLink { conn, tx, snap_tx }));
                        return;
                    }
                    Err(e) if Instant::now() >= deadline => {
                        let _ = events.send(Event::BackupStartFailed(format!(
                            "backup at {sap_text} unreachable: {e}"
                        )));
                        return;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }

    /// Tells the backup to stop (service shutdown).
    async fn stop_backup(&mut self) {
        if let Some(b) = self.backup.take() {
            let _ = b.link.tx.send(Repl::Stop);
            let _ = tokio::time::timeout(Duration::from_secs(2), b.link.conn.closed()).await;
        }
        if let Some(mut c) = self.backup_child.take()
            && tokio::time::timeout(Duration::from_secs(3), c.wait())
                .await
                .is_err()
        {
            let _ = c.kill().await;
        }
    }

    /// Backup -> primary, on the witness's grant.
    async fn promote(&mut self, epoch: u64) {
        let t0 = Instant::now();
        self.epoch = epoch;
        self.role = Role::Primary;
        self.ping_stop.cancel();
        // Fence the old primary: SIGKILL when local (also ends a SIGSTOPped process), an
        // authenticated terminate when remote.
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
        // Take the primary's SAPs (freed once the old primary is gone).
        let wait = Duration::from_secs(3);
        match bind_retry(
            &self.id,
            &self.params,
            self.args.shutdown_sap,
            "SHUTDOWN_SAP",
            wait,
        )
        .await
        {
            Ok(ep) => self.control_ep = Some(ep),
            Err(e) => error!("{e}"),
        }
        match bind_retry(
            &self.id,
            &self.params,
            self.args.heartbeat_sap,
            "HEARTBEAT_SAP",
            wait,
        )
        .await
        {
            Ok(ep) => self.heartbeat_ep = Some(ep),
            Err(e) => error!("{e}"),
        }
        self.start_listeners();
        self.latest_seq = self.stats.seq.load(Ordering::Relaxed);
        self.info.sap = self.args.shutdown_sap_text.clone();
        // Tell the witness our new SAP at once: the next backup names us by it.
        if let Some(p) = &self.proxy {
            let _ = p.control.send(ToProxy::Heartbeat {
                epoch,
                info: self.info.clone(),
                pairs: self.stats.pairs.load(Ordering::Relaxed),
                backup_synced: false,
                backup: None,
                echo: self.proxy_echo,
            });
        }
        self.go_solo();
        // The new primary saves to SAVE_FILE from now on.
        let _ = self
            .store
            .send(StoreMsg::SetSaveFile(self.args.save_file.clone()));
        self.notify(
            "promoted",
            &format!(
                "backup promoted to primary at epoch {epoch} in {} ms; old primary {handle} fenced",
                t0.elapsed().as_millis()
            ),
        );
        self.backup_attempts = 0;
        self.next_backup_at = Some(Instant::now());
    }

    async fn save(&self) -> bool {
        let Some(path) = &self.args.save_file else {
            return false;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.store.send(StoreMsg::Save(tx)).is_err() {
            return false;
        }
        match tokio::time::timeout(self.cfg.shutdown_timeout(), rx).await {
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
