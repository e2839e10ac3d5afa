//! A replica: the primary serves relayed requests from its store and (with a backup) replicates
//! every write before answering; the backup applies what the primary sends and waits to be
//! promoted by the proxy's grant.
//!
//! Tasks: the store thread (`store`), a proxy link (control + relay streams), and the replica's
//! main event loop, which owns the role and the release of replies. All end when asked.

pub mod args;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::net::endpoint::{self, LinkParams, NetError};
use crate::net::stream::{FramedRecv, FramedSend};
use crate::net::tls::{self, Identity};
use crate::notify::notify;
use crate::space::{self, Space};
use crate::wire::NODE_ALPN;
use crate::wire::frame;
use crate::wire::node::{Relay, RelayReply, ReplicaInfo, Role, StreamKind, ToProxy, ToServer};

pub use args::ServerArgs;
use store::{StoreMsg, StoreOut, StoreStats};

/// Errors that stop a server from starting or make it stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{what}: {source}")]
    Net {
        what: String,
        source: NetError,
    },
    #[error("{0}")]
    Init(#[from] space::SnapshotError),
    #[error("cannot start the store thread: {0}")]
    Thread(std::io::Error),
    #[error("the proxy at {sap} could not be reached for {waited:?}; start the proxy first or check PROXY_SAP")]
    ProxyUnreachable { sap: String, waited: Duration },
    #[error("refused by the proxy (fenced at epoch {0}): another primary is serving")]
    Fenced(u64),
    #[error("saving to `{path}` failed: {reason}")]
    Save { path: String, reason: String },
}

/// How a server run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shut down on request (SHUTDOWN or signal) after saving.
    Shutdown,
    /// Lost the proxy for longer than proxy_loss_timeout; saved and stopped.
    ProxyLost,
    /// Deposed by the witness.
    Fenced,
}

struct ProxyLink {
    control: mpsc::UnboundedSender<ToProxy>,
    relay_out: mpsc::UnboundedSender<RelayReply>,
    conn: quinn::Connection,
}

enum Event {
    Control(ToServer),
    LinkDown,
}

/// Runs a server until it is shut down, fenced, or loses the proxy.
pub async fn run(args: ServerArgs, certs: &Path, cfg: Config, stop: CancellationToken) -> Result<Exit, ServerError> {
    let cfg = Arc::new(cfg);
    let id = Identity::load(certs, "node")?;
    let node_params = LinkParams {
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
    // SAPs by role (SPEC §2): the primary owns SHUTDOWN_SAP and HEARTBEAT_SAP.
    let bind = |sap: std::net::SocketAddr, what: &str| {
        endpoint::server_endpoint(sap, &id, NODE_ALPN, &node_params).map_err(|source| ServerError::Net {
            what: format!("cannot open {what}"),
            source,
        })
    };
    let control_ep = bind(args.shutdown_sap, "SHUTDOWN_SAP")?;
    let heartbeat_ep = bind(args.heartbeat_sap, "HEARTBEAT_SAP")?;
    info!(
        shutdown_sap = %control_ep.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        heartbeat_sap = %heartbeat_ep.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        ?role,
        "server listening"
    );
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
    let (store_tx, store_thread) =
        store::spawn(space, cfg.clone(), args.save_file.clone(), out_tx, stats.clone()).map_err(ServerError::Thread)?;

    let info = ReplicaInfo {
        handle: std::process::id().to_string(),
        sap: args.shutdown_sap_text.clone(),
        pid: std::process::id(),
    };
    let client_cfg = endpoint::client_config(&id, NODE_ALPN, &node_params).map_err(|source| ServerError::Net {
        what: "client configuration".into(),
        source,
    })?;
    let dial_ep = endpoint::client_endpoint(args.proxy_sap, &node_params).map_err(|source| ServerError::Net {
        what: "cannot open a socket to reach the proxy".into(),
        source,
    })?;

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let mut epoch: u64 = 0;
    let mut link: Option<ProxyLink> = None;
    let mut proxy_lost_since: Option<Instant> = Some(Instant::now());
    let mut hb = tokio::time::interval(cfg.heartbeat_interval());
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconnect_at = Instant::now();
    let mut ever_connected = false;

    let exit = loop {
        if link.is_none() && Instant::now() >= reconnect_at {
            match connect_proxy(&dial_ep, &client_cfg, &args, &cfg, role, epoch, &info, &store_tx, &ev_tx).await {
                Ok((l, e)) => {
                    if e != epoch {
                        info!(epoch = e, "registered with the proxy");
                    }
                    epoch = e;
                    link = Some(l);
                    proxy_lost_since = None;
                    ever_connected = true;
                }
                Err(ConnectOutcome::Fenced(e)) => {
                    notify(cfg.notify_command.as_deref(), "server", "fenced", &format!("the proxy refused this server (epoch {e})"));
                    break Exit::Fenced;
                }
                Err(ConnectOutcome::Failed(msg)) => {
                    debug!("cannot reach the proxy: {msg}");
                    reconnect_at = Instant::now() + Duration::from_millis(200);
                }
            }
        }
        if let Some(since) = proxy_lost_since
            && since.elapsed() >= cfg.proxy_loss_timeout()
        {
            if !ever_connected {
                error!("{}", ServerError::ProxyUnreachable { sap: args.proxy_sap_text.clone(), waited: cfg.proxy_loss_timeout() });
            }
            notify(
                cfg.notify_command.as_deref(),
                "server",
                "proxy-lost",
                &format!("no proxy for {} ms: saving and stopping", cfg.proxy_loss_timeout_ms),
            );
            break Exit::ProxyLost;
        }
        tokio::select! {
            Some(o) = out_rx.recv() => {
                // No backup yet: every write is durable once applied here.
                let mut batch = vec![o];
                while let Ok(o) = out_rx.try_recv() { batch.push(o); }
                if let Some(l) = &link {
                    for o in batch {
                        let r = match o {
                            StoreOut::Read { reply, .. } | StoreOut::Dedup { reply, .. } => reply,
                            StoreOut::Write { rid, reply, .. } => RelayReply { rid, reply },
                        };
                        let _ = l.relay_out.send(r);
                    }
                }
            }
            Some(ev) = ev_rx.recv() => match ev {
                Event::Control(ToServer::Shutdown) => {
                    info!("shutdown requested by the proxy");
                    let saved = save(&store_tx, &args, &cfg).await;
                    let pairs = stats.pairs.load(Ordering::Relaxed);
                    if let Some(l) = &link {
                        let _ = l.control.send(ToProxy::ShutdownDone {
                            saved: saved.then(|| args.save_file.as_ref().map(|p| p.display().to_string())).flatten(),
                            pairs,
                        });
                        // Wait (bounded) for the proxy to read the answer and close the link.
                        let _ = tokio::time::timeout(Duration::from_secs(2), l.conn.closed()).await;
                    }
                    let _ = store_tx.send(StoreMsg::Stop);
                    let _ = store_thread.join();
                    return Ok(Exit::Shutdown);
                }
                Event::Control(ToServer::Fence { epoch: e }) => {
                    notify(cfg.notify_command.as_deref(), "server", "fenced", &format!("deposed by the proxy at epoch {e}: stopping without serving"));
                    let _ = store_tx.send(StoreMsg::Stop);
                    return Ok(Exit::Fenced);
                }
                Event::Control(ToServer::Grant { epoch: e }) => {
                    info!(epoch = e, "granted by the proxy");
                    epoch = epoch.max(e);
                }
                Event::Control(ToServer::Welcome { .. } | ToServer::HeartbeatAck { .. }) => {}
                Event::LinkDown => {
                    if link.take().is_some() {
                        warn!("lost the link to the proxy; reconnecting");
                        notify(cfg.notify_command.as_deref(), "server", "proxy-link-down", "link to the proxy closed; reconnecting");
                        proxy_lost_since = Some(Instant::now());
                        reconnect_at = Instant::now();
                    }
                }
            },
            _ = hb.tick() => {
                if let Some(l) = &link {
                    let _ = l.control.send(ToProxy::Heartbeat {
                        epoch,
                        pairs: stats.pairs.load(Ordering::Relaxed),
                        backup_synced: false,
                        backup: None,
                    });
                }
            }
            _ = stop.cancelled() => break Exit::Shutdown,
        }
    };
    if exit != Exit::Fenced {
        save(&store_tx, &args, &cfg).await;
    }
    let _ = store_tx.send(StoreMsg::Stop);
    let _ = store_thread.join();
    control_ep.close(0u32.into(), b"stopping");
    heartbeat_ep.close(0u32.into(), b"stopping");
    Ok(exit)
}

async fn save(store: &std::sync::mpsc::Sender<StoreMsg>, args: &ServerArgs, cfg: &Config) -> bool {
    let Some(path) = &args.save_file else { return false };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if store.send(StoreMsg::Save(tx)).is_err() {
        return false;
    }
    match tokio::time::timeout(cfg.shutdown_timeout(), rx).await {
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

enum ConnectOutcome {
    Fenced(u64),
    Failed(String),
}

#[allow(clippy::too_many_arguments)]
async fn connect_proxy(
    ep: &quinn::Endpoint,
    client_cfg: &quinn::ClientConfig,
    args: &ServerArgs,
    cfg: &Arc<Config>,
    role: Role,
    epoch: u64,
    info: &ReplicaInfo,
    store: &std::sync::mpsc::Sender<StoreMsg>,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(ProxyLink, u64), ConnectOutcome> {
    let fail = |e: String| ConnectOutcome::Failed(e);
    let server_name = endpoint::sap_host(&args.proxy_sap_text);
    let conn = endpoint::connect(ep, client_cfg.clone(), args.proxy_sap, &server_name, cfg.connect_timeout())
        .await
        .map_err(|e| fail(e.to_string()))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
    let mut out = FramedSend::new(send);
    let mut input = FramedRecv::new(recv, cfg.max_response_bytes + 4096);
    out.queue(&StreamKind::Control);
    out.queue(&ToProxy::Hello {
        role,
        epoch,
        info: info.clone(),
        synced: role == Role::Primary,
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
    // Relay stream: requests in, replies out.
    let (rsend, rrecv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
    let mut rout = FramedSend::new(rsend);
    rout.send(&StreamKind::Relay { epoch }).await.map_err(|e| fail(e.to_string()))?;
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<ToProxy>();
    let (rel_tx, mut rel_rx) = mpsc::unbounded_channel::<RelayReply>();

    // Control writer.
    tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            out.queue(&m);
            while let Ok(m) = ctl_rx.try_recv() {
                out.queue(&m);
            }
            if out.flush().await.is_err() {
                break;
            }
        }
    });
    // Control reader.
    let ev = events.clone();
    tokio::spawn(async move {
        loop {
            match input.next().await {
                Ok(Some(b)) => match frame::decode::<ToServer>(&b) {
                    Ok(m) => {
                        if ev.send(Event::Control(m)).is_err() {
                            break;
                        }
                    }
                    Err(e) => warn!("bad control frame from the proxy: {e}"),
                },
                _ => break,
            }
        }
        let _ = ev.send(Event::LinkDown);
    });
    // Relay writer: replies batched into as few writes as possible.
    tokio::spawn(async move {
        while let Some(r) = rel_rx.recv().await {
            rout.queue(&r);
            while rout.queued() < 256 * 1024 {
                match rel_rx.try_recv() {
                    Ok(r) => rout.queue(&r),
                    Err(_) => break,
                }
            }
            if rout.flush().await.is_err() {
                break;
            }
        }
    });
    // Relay reader: requests go to the store thread in batches, in order.
    let store = store.clone();
    let max = cfg.max_request_bytes * 2 + 4096;
    tokio::spawn(async move {
        let mut input = FramedRecv::new(rrecv, max);
        loop {
            let first = match input.next().await {
                Ok(Some(b)) => b,
                _ => break,
            };
            let mut reqs = Vec::with_capacity(16);
            let mut b = Some(first);
            while let Some(body) = b {
                match frame::decode::<Relay>(&body) {
                    Ok(Relay::Request { rid, client, cmd }) => reqs.push((rid, client, cmd)),
                    Ok(Relay::Watermark(w)) => {
                        if !reqs.is_empty() {
                            let _ = store.send(StoreMsg::Requests(std::mem::take(&mut reqs)));
                        }
                        let _ = store.send(StoreMsg::Watermark(w));
                    }
                    Err(e) => warn!("bad relay frame from the proxy: {e}"),
                }
                b = input.try_next().ok().flatten();
            }
            if !reqs.is_empty() && store.send(StoreMsg::Requests(reqs)).is_err() {
                break;
            }
        }
    });
    Ok((
        ProxyLink {
            control: ctl_tx,
            relay_out: rel_tx,
            conn,
        },
        epoch,
    ))
}

/// Resolves the path argument `null` to None.
pub fn null_path(s: &str) -> Option<PathBuf> {
    (s != "null").then(|| PathBuf::from(s))
}
