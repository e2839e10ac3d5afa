//! A server's side of the failover protocol, sans-IO: when a reply may be released (commit), when
//! a primary may acknowledge alone (solo service, grants), when a backup is started, dropped or
//! stopped, when a backup promotes itself, and when the process must stop (and whether it saves).
//!
//! The executor (`crate::server`) feeds it what happened (store results, link events, proxy
//! messages, ticks) and carries out the actions; it makes no decision of its own. `R` is the
//! executor's reply payload (released in commit order).

use std::collections::VecDeque;

use super::Millis;
use crate::wire::node::Role;

/// Identifies one backup the primary started (attempt number).
pub type BackupId = u64;

/// Timing the state machine needs (from `Config`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Timing {
    pub heartbeat_timeout: Millis,
    pub proxy_loss_timeout: Millis,
    pub backup_sync_timeout: Millis,
    /// How long a synchronised backup that still receives updates may leave them
    /// unacknowledged (a slow log) before it is dropped (at least `heartbeat_timeout`).
    pub backup_ack_timeout: Millis,
    pub backup_retry_backoff: Millis,
    /// Doublings of the backoff before it stops growing.
    pub backup_retry_doublings: u32,
    /// Pause between attempts to reach the proxy.
    pub reconnect_pause: Millis,
}

/// Why a server stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// Shut down on request (SHUTDOWN, or the primary stopping the service).
    Shutdown,
    /// Lost the proxy for longer than proxy_loss_timeout.
    ProxyLost,
    /// Deposed or refused by the witness, or terminated by a newer primary.
    Fenced,
    /// The log could not be written or synced: nothing more can be made durable here.
    StorageFailed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input<R> {
    Tick,
    /// The proxy link is up and we were welcomed at `epoch`.
    ProxyUp {
        epoch: u64,
    },
    /// An attempt to reach the proxy failed (we try again later).
    ProxyConnectFailed,
    /// The proxy refused our hello (fenced) at `epoch`.
    ProxyRefused {
        epoch: u64,
    },
    ProxyDown,
    Grant {
        epoch: u64,
    },
    Fence {
        epoch: u64,
    },
    /// The witness acknowledged our heartbeat at `epoch` (it takes us for who we said we are).
    HeartbeatAck {
        epoch: u64,
        n: u64,
    },
    /// The proxy asks the service to stop.
    Shutdown,
    /// The store applied a write numbered `seq`; `reply` may go out once it is committed.
    Write {
        seq: u64,
        reply: R,
    },
    /// A read (or a dedupe answer) that observed every write up to `after_seq`.
    Read {
        after_seq: u64,
        reply: R,
    },
    /// The local log holds every record up to update `seq` and epoch `epoch` (per the fsync
    /// policy). Only with a log (see [`Replica::with_log`]).
    LogDurable {
        epoch: u64,
        seq: u64,
    },
    /// The local log failed (write or sync error).
    StorageFailed {
        why: String,
    },
    // ---- primary side ----
    BackupConnected {
        id: BackupId,
    },
    BackupStartFailed {
        id: BackupId,
        why: String,
    },
    /// The backup holds the space as of `seq`; `handle` is its own (its pid).
    BackupSynced {
        id: BackupId,
        seq: u64,
        handle: String,
    },
    BackupAck {
        id: BackupId,
        seq: u64,
    },
    BackupDown {
        id: BackupId,
        why: String,
    },
    /// A heartbeat from our backup, with the last update it has applied (0: it does not say).
    Ping {
        received: u64,
    },
    /// The primary's SAPs are ours (after a promotion).
    PromotionDone,
    /// An authenticated terminate from the primary of `epoch`.
    Terminate {
        epoch: u64,
    },
    // ---- backup side ----
    /// The primary answered a heartbeat.
    Pong,
    /// The replication stream from the primary ended (`stop`: the primary is stopping the service).
    ReplicationDown {
        stop: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action<R> {
    /// Reach the proxy (hello with this role and epoch) in the background; answer with
    /// `ProxyUp`, `ProxyConnectFailed` or `ProxyRefused`.
    ConnectProxy {
        role: Role,
        epoch: u64,
    },
    Heartbeat {
        epoch: u64,
        /// Our backup's handle if it is promotable (holds every acknowledged write).
        synced_backup: Option<String>,
        echo: u64,
    },
    PeerLost {
        epoch: u64,
    },
    /// Send this reply to the proxy.
    Release(R),
    /// Start backup `id` (process or launch command) and connect to it in the background.
    StartBackup {
        id: BackupId,
        attempt: u32,
    },
    /// Send backup `id` a snapshot of the space, then the updates that follow it.
    SendSnapshot {
        id: BackupId,
    },
    /// Close the replication link to backup `id`; leave its process alone (it may have been
    /// promoted).
    CloseBackup {
        id: BackupId,
    },
    /// Kill backup `id`'s process if we started it locally (the witness has granted us an epoch
    /// past it, so it cannot be the primary).
    KillBackup {
        id: BackupId,
    },
    /// Become the primary at `epoch`: stop pinging, give up BACKUP_SAP and the replication
    /// stream, take over the save file, and serve.
    Promote {
        epoch: u64,
    },
    /// The promotion is confirmed by the witness: stop the old primary (kill by pid, or an
    /// authenticated terminate) and take its SAPs in the background; answer `PromotionDone`.
    /// (Not before: until confirmed, the witness may give the office back to the old primary.)
    TakeOver {
        epoch: u64,
    },
    /// Stop the process (after stopping the backup and saving, if `save`). While it saves, the
    /// replica still heartbeats the witness ([`Replica::step`] takes `Tick`, `HeartbeatAck`,
    /// `ProxyUp` and `ProxyDown`), so that a long save is not taken for a dead primary.
    Exit {
        reason: ExitReason,
        save: bool,
    },
    Notify {
        kind: &'static str,
        detail: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Backup {
    id: BackupId,
    synced: bool,
    handle: Option<String>,
    acked: u64,
    last_ping: Millis,
    /// Last time an acknowledgement arrived or the backup was fully caught up.
    last_ack: Millis,
    /// The last update its heartbeats said it applied, and when that last grew or covered every
    /// update (the replication link delivers: late acknowledgements are its log's, not a cut).
    received: u64,
    last_recv: Millis,
    since: Millis,
}

/// The replica state machine.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Replica<R> {
    t: Timing,
    role: Role,
    epoch: u64,
    exited: bool,
    /// Exited with a save to make: heartbeats go on until the process ends.
    saving: bool,
    // proxy link
    proxy_up: bool,
    connecting: bool,
    proxy_lost_since: Option<Millis>,
    reconnect_at: Millis,
    echo: u64,
    // primary side
    backup: Option<Backup>,
    next_backup_id: BackupId,
    /// Backup being started (process + connect), not yet connected.
    starting: Option<BackupId>,
    next_backup_at: Option<Millis>,
    attempts: u32,
    /// Backups lost, with the epoch at which they were lost: killed once the witness grants an
    /// epoch past that (proof that it did not promote them).
    lost: Vec<(BackupId, u64)>,
    /// Lost backups to stop once the witness confirms our epoch.
    kill_pending: Vec<BackupId>,
    /// Acknowledge writes without a backup (no synchronised backup, with the witness's consent).
    solo: bool,
    /// Lost a synchronised backup: nothing is released until the witness grants solo service.
    awaiting_grant: bool,
    /// The primary's SAPs are bound (false while a promotion takes them over).
    saps_ready: bool,
    /// Promoted, waiting for the witness to confirm before stopping the old primary.
    takeover_pending: bool,
    latest_seq: u64,
    committed: u64,
    solo_hw: u64,
    release: VecDeque<(u64, R)>,
    /// With a local log: the epoch and update it holds durably. A primary releases a reply only
    /// once its own log holds what the reply depends on, and heartbeats as the primary of an
    /// epoch only once its log records that epoch (so a confirmed promotion survives a power cut).
    log: Option<(u64, u64)>,
    // backup side
    last_pong: Millis,
    peer_lost: bool,
}

impl<R> Replica<R> {
    /// A server starting as `role` (a primary is solo until its first backup synchronises).
    pub fn new(role: Role, t: Timing, now: Millis) -> Self {
        Replica {
            t,
            role,
            epoch: 0,
            exited: false,
            saving: false,
            proxy_up: false,
            connecting: false,
            proxy_lost_since: Some(now),
            reconnect_at: now,
            echo: 0,
            backup: None,
            next_backup_id: 1,
            starting: None,
            next_backup_at: None,
            attempts: 0,
            lost: Vec::new(),
            kill_pending: Vec::new(),
            solo: true,
            awaiting_grant: false,
            saps_ready: true,
            takeover_pending: false,
            latest_seq: 0,
            committed: 0,
            solo_hw: 0,
            release: VecDeque::new(),
            log: None,
            last_pong: now,
            peer_lost: false,
        }
    }

    /// A replica with a local log that recovered a copy at `epoch` and update `seq` (0, 0 for a
    /// new one): it claims that epoch when it says hello, and its updates continue from `seq`.
    pub fn with_log(mut self, epoch: u64, seq: u64) -> Self {
        self.log = Some((epoch, seq));
        self.epoch = epoch;
        self.latest_seq = seq;
        self.committed = seq;
        self.solo_hw = seq;
        self
    }

    /// True when the local log holds this replica's current epoch (or there is no log).
    fn epoch_durable(&self) -> bool {
        self.log.is_none_or(|(e, _)| e >= self.epoch)
    }

    pub fn role(&self) -> Role {
        self.role
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn committed(&self) -> u64 {
        self.committed
    }
    pub fn exited(&self) -> bool {
        self.exited
    }
    /// The backup currently attached (id), if any.
    pub fn backup_id(&self) -> Option<BackupId> {
        self.backup.as_ref().map(|b| b.id)
    }
    /// Whether a backup holds every acknowledged write (it may be promoted).
    pub fn has_promotable_backup(&self) -> bool {
        self.promotable_backup().is_some()
    }
    /// Updates applied that the synchronised backup has not acknowledged yet (None without a
    /// synchronised backup).
    pub fn backup_lag(&self) -> Option<u64> {
        self.backup
            .as_ref()
            .filter(|b| b.synced)
            .map(|b| self.latest_seq.saturating_sub(b.acked))
    }
    /// Replies held until their writes are replicated.
    pub fn held(&self) -> usize {
        self.release.len()
    }

    fn promotable_backup(&self) -> Option<String> {
        self.backup
            .as_ref()
            .filter(|b| b.synced && b.acked >= self.solo_hw && !self.awaiting_grant)
            .and_then(|b| b.handle.clone())
    }

    fn exit(&mut self, reason: ExitReason, save: bool, out: &mut Vec<Action<R>>) {
        self.exited = true;
        self.saving = save;
        out.push(Action::Exit { reason, save });
    }

    /// Feeds one input observed at `now`; appends what the server must do, in order.
    pub fn step(&mut self, now: Millis, input: Input<R>, out: &mut Vec<Action<R>>) {
        if self.exited {
            if self.saving {
                self.step_saving(input, out);
            }
            return;
        }
        match input {
            Input::Tick => self.tick(now, out),
            Input::ProxyUp { epoch } => {
                self.connecting = false;
                self.proxy_up = true;
                self.proxy_lost_since = None;
                // A new link: the previous link's ack numbers mean nothing to it.
                self.echo = 0;
                if self.epoch == 0 || self.role == Role::Backup {
                    // A primary's epoch moves only by grants (it may be awaiting one); a fresh
                    // server and a backup take the witness's word.
                    self.epoch = self.epoch.max(epoch);
                }
                if self.role == Role::Primary
                    && self.backup.is_none()
                    && self.starting.is_none()
                    && self.next_backup_at.is_none()
                {
                    self.next_backup_at = Some(now);
                }
                // Whatever the previous proxy (or link) may have missed, say it again.
                if self.awaiting_grant || (self.role == Role::Backup && self.peer_lost) {
                    out.push(Action::PeerLost { epoch: self.epoch });
                }
            }
            Input::ProxyConnectFailed => {
                self.connecting = false;
                self.reconnect_at = now + self.t.reconnect_pause;
            }
            Input::ProxyRefused { epoch } => {
                self.connecting = false;
                out.push(Action::Notify {
                    kind: "fenced",
                    detail: format!(
                        "the proxy refused this server (epoch {epoch}): stopping without serving"
                    ),
                });
                self.exit(ExitReason::Fenced, false, out);
            }
            Input::ProxyDown => {
                if self.proxy_up {
                    self.proxy_up = false;
                    self.proxy_lost_since = Some(now);
                    self.reconnect_at = now;
                    out.push(Action::Notify {
                        kind: "proxy-link-down",
                        detail: "link to the proxy closed; reconnecting".into(),
                    });
                }
            }
            Input::HeartbeatAck { epoch, n } => {
                self.echo = n;
                if self.role == Role::Primary && epoch == self.epoch {
                    for id in std::mem::take(&mut self.kill_pending) {
                        out.push(Action::KillBackup { id });
                    }
                }
                if self.takeover_pending && self.role == Role::Primary && epoch == self.epoch {
                    // The witness took our heartbeat as the primary's at our epoch: the
                    // promotion is confirmed (and recorded), so the old primary may be stopped.
                    self.takeover_pending = false;
                    out.push(Action::TakeOver { epoch });
                }
            }
            Input::Grant { epoch } => self.grant(now, epoch, out),
            Input::Fence { epoch } => {
                out.push(Action::Notify {
                    kind: "fenced",
                    detail: format!(
                        "deposed by the proxy at epoch {epoch}: stopping without serving"
                    ),
                });
                // The witness never fences the only full copy: a newer primary holds every
                // acknowledged write, so nothing is saved over its file.
                self.exit(ExitReason::Fenced, false, out);
            }
            Input::Terminate { epoch } => {
                if epoch > self.epoch {
                    out.push(Action::Notify {
                        kind: "terminated",
                        detail: format!("terminated by the primary of epoch {epoch}"),
                    });
                    self.exit(ExitReason::Fenced, false, out);
                }
            }
            Input::Shutdown => {
                let save = self.role == Role::Primary;
                self.exit(ExitReason::Shutdown, save, out);
            }
            Input::Write { seq, reply } => {
                self.latest_seq = self.latest_seq.max(seq);
                if self.solo && !self.awaiting_grant {
                    self.committed = self.committed.max(seq);
                    self.solo_hw = self.committed;
                }
                self.release.push_back((seq, reply));
                self.release_committed(out);
            }
            Input::Read { after_seq, reply } => {
                if self.solo && !self.awaiting_grant {
                    // Alone with the witness's consent: whatever the store applied is committed.
                    self.committed = self.committed.max(after_seq);
                    self.solo_hw = self.solo_hw.max(self.committed);
                }
                self.release.push_back((after_seq, reply));
                self.release_committed(out);
            }
            Input::LogDurable { epoch, seq } => {
                // Exactly what the log holds now, not a maximum: a backup's log position drops
                // when it starts over from a new initial copy (publications arrive in order).
                if let Some(held) = &mut self.log {
                    *held = (epoch, seq);
                }
                self.release_committed(out);
            }
            Input::StorageFailed { why } => {
                out.push(Action::Notify {
                    kind: "storage-failed",
                    detail: format!("{why}: stopping (nothing more can be made durable here)"),
                });
                self.exit(ExitReason::StorageFailed, false, out);
            }
            Input::BackupConnected { id } => {
                if self.starting == Some(id) {
                    self.starting = None;
                }
                if self.role != Role::Primary || self.backup.is_some() {
                    out.push(Action::CloseBackup { id });
                    return;
                }
                self.backup = Some(Backup {
                    id,
                    synced: false,
                    handle: None,
                    acked: 0,
                    last_ping: now,
                    last_ack: now,
                    received: 0,
                    last_recv: now,
                    since: now,
                });
                out.push(Action::SendSnapshot { id });
            }
            Input::BackupStartFailed { id, why } => {
                if self.starting == Some(id) {
                    self.starting = None;
                    out.push(Action::Notify {
                        kind: "backup-start-failed",
                        detail: format!(
                            "backup start (attempt {}) failed: {why}; going on alone and retrying",
                            self.attempts
                        ),
                    });
                    out.push(Action::KillBackup { id });
                    self.schedule_backup(now);
                }
            }
            Input::BackupSynced { id, seq, handle } => {
                if let Some(b) = self.backup.as_mut().filter(|b| b.id == id) {
                    b.synced = true;
                    b.handle = Some(handle);
                    b.acked = b.acked.max(seq);
                    b.last_ack = now;
                    b.last_recv = now;
                    // From now on every write waits for the backup's acknowledgement.
                    self.solo = false;
                    self.attempts = 0;
                    out.push(Action::Notify {
                        kind: "backup-synced",
                        detail: format!(
                            "backup holds the space as of update {seq}; replication is synchronous"
                        ),
                    });
                    self.advance(out);
                }
            }
            Input::BackupAck { id, seq } => {
                if let Some(b) = self.backup.as_mut().filter(|b| b.id == id) {
                    b.acked = b.acked.max(seq);
                    b.last_ack = now;
                    b.last_recv = now;
                    self.advance(out);
                }
            }
            Input::BackupDown { id, why } => {
                if self.backup.as_ref().is_some_and(|b| b.id == id) {
                    self.lose_backup(now, &why, out);
                } else if self.starting == Some(id) {
                    self.starting = None;
                    self.schedule_backup(now);
                }
            }
            Input::Ping { received } => {
                if let Some(b) = &mut self.backup {
                    b.last_ping = now;
                    if received > b.received {
                        b.received = received;
                        b.last_recv = now;
                    }
                }
            }
            Input::PromotionDone => {
                self.saps_ready = true;
                self.attempts = 0;
                if self.backup.is_none() && self.starting.is_none() {
                    self.next_backup_at = Some(now);
                }
            }
            Input::Pong => {
                self.last_pong = now;
                self.peer_lost = false;
            }
            Input::ReplicationDown { stop } => {
                if self.role != Role::Backup {
                    return;
                }
                if stop {
                    self.exit(ExitReason::Shutdown, false, out);
                    return;
                }
                self.suspect_primary("the replication stream from the primary ended", out);
            }
        }
    }

    fn suspect_primary(&mut self, why: &str, out: &mut Vec<Action<R>>) {
        if self.peer_lost {
            return;
        }
        self.peer_lost = true;
        out.push(Action::Notify {
            kind: "primary-unreachable",
            detail: format!("{why}; asking the proxy (witness) to decide"),
        });
        if self.proxy_up {
            out.push(Action::PeerLost { epoch: self.epoch });
        }
    }

    fn grant(&mut self, now: Millis, epoch: u64, out: &mut Vec<Action<R>>) {
        match self.role {
            Role::Primary => {
                if epoch < self.epoch || (epoch == self.epoch && !self.awaiting_grant) {
                    return;
                }
                // A backup attached while we waited for this grant was never reported to the
                // witness (`promotable_backup`): the grant answers the loss we reported and did
                // not drop it. Dropping it would make every backup that joins while the witness
                // is slow to answer (its state file on a slow disk) a loss of its own.
                let kept = self.awaiting_grant;
                if self.backup.is_some() && !kept {
                    // The witness dropped our backup (it lost it): so do we (at the old epoch, so
                    // that this grant proves it cannot be the primary).
                    self.lose_backup(now, "the witness dropped the backup", out);
                }
                self.epoch = epoch;
                // The lost backups were dropped by the witness before this epoch: none of them
                // can be the primary, so they may be stopped (they would hold BACKUP_SAP).
                // They are stopped once the witness confirms us as the primary at this epoch
                // (our next heartbeat acknowledged): until then it might still give the office
                // to one of them, if we failed first.
                let (dead, keep): (Vec<_>, Vec<_>) =
                    self.lost.drain(..).partition(|(_, at)| *at < epoch);
                self.lost = keep;
                self.kill_pending.extend(dead.into_iter().map(|(id, _)| id));
                self.go_solo(out);
                if kept && self.backup.as_ref().is_some_and(|b| b.synced) {
                    // What waited for the grant is released; from now on every write waits for
                    // the kept backup's acknowledgement again, as after `BackupSynced`.
                    self.solo = false;
                }
            }
            Role::Backup => {
                // The witness grants a backup only to promote it (a welcome may already have
                // told it the new epoch).
                if epoch < self.epoch {
                    return;
                }
                self.epoch = epoch;
                self.role = Role::Primary;
                self.saps_ready = false;
                self.takeover_pending = true;
                self.peer_lost = false;
                out.push(Action::Promote { epoch });
                out.push(Action::Notify {
                    kind: "promoted",
                    detail: format!("backup promoted to primary at epoch {epoch}"),
                });
                self.go_solo(out);
            }
        }
    }

    fn go_solo(&mut self, out: &mut Vec<Action<R>>) {
        self.awaiting_grant = false;
        self.solo = true;
        self.committed = self.committed.max(self.latest_seq);
        self.solo_hw = self.committed;
        self.release_committed(out);
    }

    /// Synchronous replication: what the backup acknowledged is committed.
    fn advance(&mut self, out: &mut Vec<Action<R>>) {
        if let Some(b) = &self.backup
            && b.synced
            && !self.solo
            && !self.awaiting_grant
        {
            self.committed = self.committed.max(b.acked);
            self.release_committed(out);
        }
    }

    fn release_committed(&mut self, out: &mut Vec<Action<R>>) {
        let limit = match self.log {
            None => self.committed,
            Some(_) if self.role == Role::Primary && !self.epoch_durable() => return,
            Some((_, s)) => self.committed.min(s),
        };
        while self.release.front().is_some_and(|(need, _)| *need <= limit) {
            if let Some((_, r)) = self.release.pop_front() {
                out.push(Action::Release(r));
            }
        }
    }

    fn lose_backup(&mut self, now: Millis, why: &str, out: &mut Vec<Action<R>>) {
        let Some(b) = self.backup.take() else { return };
        out.push(Action::CloseBackup { id: b.id });
        self.lost.push((b.id, self.epoch));
        if b.synced && !self.solo {
            // Writes now wait for the witness: only it may let this primary go on alone.
            self.awaiting_grant = true;
        }
        out.push(Action::Notify {
            kind: "backup-lost",
            detail: format!("{why}; asking the witness to go on alone, then starting a new backup"),
        });
        if self.proxy_up {
            out.push(Action::PeerLost { epoch: self.epoch });
        }
        self.schedule_backup(now);
    }

    fn schedule_backup(&mut self, now: Millis) {
        let doublings = self.attempts.min(self.t.backup_retry_doublings);
        let backoff = self
            .t
            .backup_retry_backoff
            .saturating_mul(1 << doublings.min(20));
        self.next_backup_at = Some(now + backoff);
    }

    fn tick(&mut self, now: Millis, out: &mut Vec<Action<R>>) {
        if !self.proxy_up && !self.connecting && now >= self.reconnect_at {
            self.connecting = true;
            out.push(Action::ConnectProxy {
                role: self.role,
                epoch: self.epoch,
            });
        }
        if let Some(since) = self.proxy_lost_since
            && now.saturating_sub(since) >= self.t.proxy_loss_timeout
        {
            out.push(Action::Notify {
                kind: "proxy-lost",
                detail: format!("no proxy for {} ms: stopping", self.t.proxy_loss_timeout),
            });
            let save = self.role == Role::Primary;
            self.exit(ExitReason::ProxyLost, save, out);
            return;
        }
        self.heartbeat(out);
        match self.role {
            Role::Primary => self.primary_tick(now, out),
            Role::Backup => {
                if now.saturating_sub(self.last_pong) > self.t.heartbeat_timeout {
                    self.suspect_primary("no heartbeat answer from the primary", out);
                }
            }
        }
    }

    /// A heartbeat for the witness, if the link is up: a primary speaks for an epoch only once
    /// its log records it.
    fn heartbeat(&self, out: &mut Vec<Action<R>>) {
        if self.proxy_up && (self.role == Role::Backup || self.epoch_durable()) {
            out.push(Action::Heartbeat {
                epoch: self.epoch,
                synced_backup: if self.role == Role::Primary {
                    self.promotable_backup()
                } else {
                    None
                },
                echo: self.echo,
            });
        }
    }

    /// After `Exit { save: true }`, while the server stops its backup and saves: nothing is
    /// decided any more, but the witness goes on hearing from a live primary (a save of millions
    /// of pairs takes seconds; silence would read as a failure). The proxy link is followed so
    /// that heartbeats go only where they can.
    fn step_saving(&mut self, input: Input<R>, out: &mut Vec<Action<R>>) {
        match input {
            Input::Tick => self.heartbeat(out),
            Input::HeartbeatAck { n, .. } => self.echo = n,
            Input::ProxyUp { .. } => {
                self.proxy_up = true;
                self.echo = 0;
            }
            Input::ProxyDown => self.proxy_up = false,
            _ => {}
        }
    }

    fn primary_tick(&mut self, now: Millis, out: &mut Vec<Action<R>>) {
        let latest = self.latest_seq;
        let hb = self.t.heartbeat_timeout;
        let mut lost = None;
        if let Some(b) = &mut self.backup {
            if b.acked >= latest {
                b.last_ack = now;
            }
            if b.received >= latest {
                b.last_recv = now;
            }
            let unacked = now.saturating_sub(b.last_ack);
            if now.saturating_sub(b.last_ping) > hb {
                lost = Some("backup heartbeats lapsed");
            } else if b.synced && b.acked < latest && unacked > hb {
                if now.saturating_sub(b.last_recv) > hb {
                    // Pings flow but updates neither arrive nor are acknowledged: the
                    // replication direction is cut.
                    lost = Some("backup stopped acknowledging updates");
                } else if unacked > self.t.backup_ack_timeout {
                    // Updates arrive, its log does not keep up: writes have waited long enough.
                    lost = Some(
                        "backup receives updates but has not acknowledged them within backup_ack_timeout_ms (its log is too slow)",
                    );
                }
            } else if !b.synced && now.saturating_sub(b.since) > self.t.backup_sync_timeout {
                lost = Some("backup did not synchronise within backup_sync_timeout_ms");
            }
        }
        if let Some(why) = lost {
            self.lose_backup(now, why, out);
        }
        if let Some(at) = self.next_backup_at
            && now >= at
            && self.starting.is_none()
            && self.backup.is_none()
            && self.proxy_up
            && self.saps_ready
        {
            self.next_backup_at = None;
            self.attempts = self.attempts.saturating_add(1);
            let id = self.next_backup_id;
            self.next_backup_id += 1;
            self.starting = Some(id);
            out.push(Action::StartBackup {
                id,
                attempt: self.attempts,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            heartbeat_timeout: 300,
            proxy_loss_timeout: 5000,
            backup_sync_timeout: 60_000,
            backup_ack_timeout: 2_000,
            backup_retry_backoff: 200,
            backup_retry_doublings: 5,
            reconnect_pause: 100,
        }
    }

    fn run(r: &mut Replica<u32>, now: Millis, i: Input<u32>) -> Vec<Action<u32>> {
        let mut out = vec![];
        r.step(now, i, &mut out);
        out
    }

    fn released(a: &[Action<u32>]) -> Vec<u32> {
        a.iter()
            .filter_map(|x| match x {
                Action::Release(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    /// A primary welcomed at epoch 1 with backup 1 synchronised.
    fn primary_with_backup() -> Replica<u32> {
        let mut r = Replica::new(Role::Primary, timing(), 0);
        assert!(matches!(
            run(&mut r, 0, Input::Tick)[..],
            [Action::ConnectProxy { .. }]
        ));
        run(&mut r, 1, Input::ProxyUp { epoch: 1 });
        let a = run(&mut r, 2, Input::Tick);
        assert!(
            a.contains(&Action::StartBackup { id: 1, attempt: 1 }),
            "{a:?}"
        );
        run(&mut r, 3, Input::BackupConnected { id: 1 });
        run(
            &mut r,
            4,
            Input::BackupSynced {
                id: 1,
                seq: 0,
                handle: "b1".into(),
            },
        );
        r
    }

    #[test]
    fn a_write_is_released_only_after_the_backup_acknowledges_it() {
        let mut r = primary_with_backup();
        assert!(released(&run(&mut r, 10, Input::Write { seq: 1, reply: 1 })).is_empty());
        // A read that saw write 1 waits for it too.
        assert!(
            released(&run(
                &mut r,
                11,
                Input::Read {
                    after_seq: 1,
                    reply: 2
                }
            ))
            .is_empty()
        );
        assert_eq!(
            released(&run(&mut r, 12, Input::BackupAck { id: 1, seq: 1 })),
            vec![1, 2]
        );
    }

    /// Runs a synchronised backup's heartbeats (every 50 ms from `from` to `to`, each saying it
    /// applied `received`) with ticks; the first action list that closes the backup, if any.
    fn beats_until_lost(
        r: &mut Replica<u32>,
        from: Millis,
        to: Millis,
        received: u64,
    ) -> Option<(Millis, Vec<Action<u32>>)> {
        let mut t = from;
        while t <= to {
            let mut a = run(r, t, Input::Ping { received });
            a.extend(run(r, t, Input::Tick));
            if a.contains(&Action::CloseBackup { id: 1 }) {
                return Some((t, a));
            }
            t += 50;
        }
        None
    }

    /// Write 1 applied at 10 and never acknowledged, heartbeats from 20 saying the backup
    /// applied `received`: when the backup is dropped, and why (the `backup-lost` detail).
    fn dropped_with_write_1_unacked(received: u64) -> (Millis, String) {
        let mut r = primary_with_backup();
        run(&mut r, 10, Input::Write { seq: 1, reply: 1 });
        let (t, a) = beats_until_lost(&mut r, 20, 5000, received).expect("dropped in the end");
        let why = a
            .into_iter()
            .find_map(|x| match x {
                Action::Notify {
                    kind: "backup-lost",
                    detail,
                } => Some(detail),
                _ => None,
            })
            .expect("a backup-lost notification");
        (t, why)
    }

    #[test]
    fn a_backup_whose_log_is_slow_is_kept_until_backup_ack_timeout_a_cut_one_is_not() {
        // Its heartbeats say it has write 1 (applied, not yet logged): the link delivers, only
        // its log is slow. Kept past heartbeat_timeout (300), dropped after
        // backup_ack_timeout (2000) of no acknowledgement; the reply waits meanwhile.
        let (t, why) = dropped_with_write_1_unacked(1);
        assert!((2010..=2100).contains(&t), "dropped at {t}");
        assert!(why.contains("backup_ack_timeout_ms"), "{why}");
        // Its acknowledgement before then releases the write and keeps it.
        let mut r = primary_with_backup();
        run(&mut r, 10, Input::Write { seq: 1, reply: 1 });
        assert!(beats_until_lost(&mut r, 20, 1500, 1).is_none());
        assert_eq!(
            released(&run(&mut r, 1510, Input::BackupAck { id: 1, seq: 1 })),
            vec![1]
        );
        assert!(beats_until_lost(&mut r, 1520, 5000, 1).is_none());
        // Heartbeats that say it never got write 1 (or say nothing, 0): the replication
        // direction is cut, dropped after heartbeat_timeout.
        let (t, why) = dropped_with_write_1_unacked(0);
        assert!((310..=400).contains(&t), "dropped at {t}");
        assert!(why.contains("stopped acknowledging"), "{why}");
    }

    #[test]
    fn losing_a_synced_backup_holds_replies_until_the_witness_grants() {
        let mut r = primary_with_backup();
        run(&mut r, 10, Input::Write { seq: 1, reply: 1 });
        let a = run(
            &mut r,
            11,
            Input::BackupDown {
                id: 1,
                why: "cut".into(),
            },
        );
        assert!(a.contains(&Action::PeerLost { epoch: 1 }), "{a:?}");
        assert!(a.contains(&Action::CloseBackup { id: 1 }));
        assert!(
            !a.iter().any(|x| matches!(x, Action::KillBackup { .. })),
            "never killed before the grant: {a:?}"
        );
        assert!(released(&run(&mut r, 12, Input::Write { seq: 2, reply: 2 })).is_empty());
        // The proxy link drops and comes back: the request is said again.
        run(&mut r, 13, Input::ProxyDown);
        let a = run(&mut r, 14, Input::ProxyUp { epoch: 2 });
        assert!(a.contains(&Action::PeerLost { epoch: 1 }), "{a:?}");
        let a = run(&mut r, 15, Input::Grant { epoch: 2 });
        assert_eq!(released(&a), vec![1, 2]);
        assert!(
            !a.iter().any(|x| matches!(x, Action::KillBackup { .. })),
            "{a:?}"
        );
        assert_eq!(r.epoch(), 2);
        // Stopped once the witness acknowledges us as the primary at the new epoch.
        let a = run(&mut r, 16, Input::HeartbeatAck { epoch: 2, n: 1 });
        assert!(a.contains(&Action::KillBackup { id: 1 }), "{a:?}");
    }

    #[test]
    fn a_backup_that_joined_while_we_waited_for_the_grant_is_kept() {
        // The witness is slow to answer (its state file on a slow disk): a new backup is started,
        // connects and synchronises before the grant for the lost one arrives. The grant answers
        // our own report; the witness never heard of the new backup, so it did not drop it.
        let mut r = primary_with_backup();
        run(&mut r, 10, Input::Write { seq: 1, reply: 1 });
        let a = run(
            &mut r,
            11,
            Input::BackupDown {
                id: 1,
                why: "cut".into(),
            },
        );
        assert!(a.contains(&Action::PeerLost { epoch: 1 }), "{a:?}");
        assert!(released(&run(&mut r, 12, Input::Write { seq: 2, reply: 2 })).is_empty());
        let a = run(&mut r, 300, Input::Tick);
        assert!(
            a.contains(&Action::StartBackup { id: 2, attempt: 1 }),
            "{a:?}"
        );
        run(&mut r, 301, Input::BackupConnected { id: 2 });
        let a = run(
            &mut r,
            302,
            Input::BackupSynced {
                id: 2,
                seq: 2,
                handle: "b2".into(),
            },
        );
        assert!(
            released(&a).is_empty(),
            "still waiting for the grant: {a:?}"
        );
        let beat = |a: &[Action<u32>]| {
            a.iter().find_map(|x| match x {
                Action::Heartbeat { synced_backup, .. } => Some(synced_backup.clone()),
                _ => None,
            })
        };
        assert_eq!(
            beat(&run(&mut r, 303, Input::Tick)),
            Some(None),
            "not reported while the grant is awaited"
        );
        let a = run(&mut r, 400, Input::Grant { epoch: 2 });
        assert_eq!(released(&a), vec![1, 2]);
        assert!(
            !a.iter()
                .any(|x| matches!(x, Action::CloseBackup { id: 2 } | Action::PeerLost { .. })),
            "the new backup is kept: {a:?}"
        );
        assert_eq!(r.epoch(), 2);
        // Writes wait for the kept backup again, and the witness hears of it.
        assert!(released(&run(&mut r, 401, Input::Write { seq: 3, reply: 3 })).is_empty());
        assert_eq!(
            released(&run(&mut r, 402, Input::BackupAck { id: 2, seq: 3 })),
            vec![3]
        );
        assert_eq!(
            beat(&run(&mut r, 403, Input::Tick)),
            Some(Some("b2".into()))
        );
    }

    #[test]
    fn a_stale_grant_never_kills_a_lost_backup() {
        let mut r = primary_with_backup();
        run(
            &mut r,
            11,
            Input::BackupDown {
                id: 1,
                why: "cut".into(),
            },
        );
        // A duplicate of an old grant at our own epoch proves nothing.
        let a = run(&mut r, 12, Input::Grant { epoch: 1 });
        assert!(
            !a.iter().any(|x| matches!(x, Action::KillBackup { .. })),
            "{a:?}"
        );
    }

    #[test]
    fn a_backup_that_cannot_be_started_never_stops_the_primary() {
        let mut r = Replica::<u32>::new(Role::Primary, timing(), 0);
        run(&mut r, 0, Input::Tick);
        run(&mut r, 1, Input::ProxyUp { epoch: 1 });
        let mut starts = 0;
        let mut t = 2;
        while t < 200_000 {
            for a in run(&mut r, t, Input::Tick) {
                match a {
                    Action::StartBackup { id, .. } => {
                        starts += 1;
                        run(
                            &mut r,
                            t,
                            Input::BackupStartFailed {
                                id,
                                why: "no".into(),
                            },
                        );
                    }
                    Action::Exit { .. } => panic!("the primary stopped"),
                    _ => {}
                }
            }
            t += 50;
        }
        assert!(starts > 10, "keeps retrying: {starts}");
        // Solo all along: writes are answered.
        assert_eq!(
            released(&run(&mut r, t, Input::Write { seq: 1, reply: 7 })),
            vec![7]
        );
    }

    #[test]
    fn a_backup_promotes_itself_only_on_a_grant_and_serves_at_once() {
        let mut r = Replica::<u32>::new(Role::Backup, timing(), 0);
        run(&mut r, 0, Input::Tick);
        run(&mut r, 1, Input::ProxyUp { epoch: 1 });
        run(&mut r, 2, Input::Pong);
        let a = run(&mut r, 400, Input::Tick);
        assert!(a.contains(&Action::PeerLost { epoch: 1 }), "{a:?}");
        assert_eq!(r.role(), Role::Backup);
        let a = run(&mut r, 410, Input::Grant { epoch: 2 });
        assert!(a.contains(&Action::Promote { epoch: 2 }));
        assert!(
            !a.iter().any(|x| matches!(x, Action::TakeOver { .. })),
            "{a:?}"
        );
        assert_eq!(r.role(), Role::Primary);
        // The old primary is stopped only once the witness confirms us at the new epoch.
        assert!(run(&mut r, 412, Input::HeartbeatAck { epoch: 1, n: 1 }).is_empty());
        let a = run(&mut r, 413, Input::HeartbeatAck { epoch: 2, n: 2 });
        assert_eq!(a, vec![Action::TakeOver { epoch: 2 }]);
        assert_eq!(
            released(&run(
                &mut r,
                411,
                Input::Read {
                    after_seq: 9,
                    reply: 3
                }
            )),
            vec![3]
        );
        // No backup is started before the primary's SAPs are taken.
        let a = run(&mut r, 420, Input::Tick);
        assert!(
            !a.iter().any(|x| matches!(x, Action::StartBackup { .. })),
            "{a:?}"
        );
        run(&mut r, 430, Input::PromotionDone);
        let a = run(&mut r, 440, Input::Tick);
        assert!(
            a.iter().any(|x| matches!(x, Action::StartBackup { .. })),
            "{a:?}"
        );
    }

    #[test]
    fn a_primary_that_saves_heartbeats_on_and_decides_nothing_more() {
        let mut r = primary_with_backup();
        let a = run(&mut r, 10, Input::Shutdown);
        assert!(a.contains(&Action::Exit {
            reason: ExitReason::Shutdown,
            save: true
        }));
        // While it saves: heartbeats with the latest echo, on whichever link is up; nothing else.
        run(&mut r, 11, Input::HeartbeatAck { epoch: 1, n: 7 });
        let a = run(&mut r, 400, Input::Tick);
        assert_eq!(
            a,
            vec![Action::Heartbeat {
                epoch: 1,
                synced_backup: Some("b1".into()),
                echo: 7
            }]
        );
        assert!(run(&mut r, 401, Input::Write { seq: 1, reply: 1 }).is_empty());
        assert!(run(&mut r, 402, Input::ProxyDown).is_empty());
        assert!(run(&mut r, 403, Input::Tick).is_empty());
        assert!(run(&mut r, 404, Input::ProxyUp { epoch: 1 }).is_empty());
        assert!(matches!(
            run(&mut r, 405, Input::Tick)[..],
            [Action::Heartbeat { echo: 0, .. }]
        ));
        // A server that stops without a save falls silent at once.
        let mut b = Replica::<u32>::new(Role::Backup, timing(), 0);
        run(&mut b, 1, Input::ProxyUp { epoch: 1 });
        let a = run(&mut b, 2, Input::Shutdown);
        assert!(a.contains(&Action::Exit {
            reason: ExitReason::Shutdown,
            save: false
        }));
        assert!(run(&mut b, 3, Input::Tick).is_empty());
    }

    #[test]
    fn heartbeats_echo_the_new_links_acks_only() {
        let mut r = primary_with_backup();
        run(&mut r, 5, Input::HeartbeatAck { epoch: 1, n: 900 });
        run(&mut r, 6, Input::ProxyDown);
        run(&mut r, 7, Input::ProxyUp { epoch: 1 });
        let a = run(&mut r, 8, Input::Tick);
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Heartbeat { echo: 0, .. })),
            "{a:?}"
        );
    }

    #[test]
    fn fenced_or_terminated_servers_stop_without_saving_proxy_loss_saves_the_primary() {
        let mut r = primary_with_backup();
        let a = run(&mut r, 5, Input::Fence { epoch: 3 });
        assert!(a.contains(&Action::Exit {
            reason: ExitReason::Fenced,
            save: false
        }));
        let mut r = primary_with_backup();
        run(&mut r, 5, Input::ProxyDown);
        let a = run(&mut r, 5006, Input::Tick);
        assert!(
            a.contains(&Action::Exit {
                reason: ExitReason::ProxyLost,
                save: true
            }),
            "{a:?}"
        );
    }

    #[test]
    fn a_reply_waits_for_the_log_even_after_the_log_position_dropped() {
        // Found by the model checker (tests/model.rs disks_slow_syncs_and_a_proxy_restart): a
        // backup's log held update 1, then it started over from a new initial copy at update 0;
        // promoted, its first write (update 1) must wait until the log holds it again.
        let mut r = Replica::<u32>::new(Role::Primary, timing(), 0).with_log(1, 0);
        run(&mut r, 0, Input::Tick);
        run(&mut r, 1, Input::ProxyUp { epoch: 1 });
        run(&mut r, 2, Input::LogDurable { epoch: 1, seq: 1 });
        run(&mut r, 3, Input::LogDurable { epoch: 1, seq: 0 });
        run(&mut r, 4, Input::Grant { epoch: 1 });
        let a = run(&mut r, 5, Input::Write { seq: 1, reply: 1 });
        assert!(
            released(&a).is_empty(),
            "released before the log holds it: {a:?}"
        );
        assert_eq!(
            released(&run(&mut r, 6, Input::LogDurable { epoch: 1, seq: 1 })),
            vec![1]
        );
    }
}
