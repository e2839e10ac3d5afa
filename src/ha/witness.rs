//! The proxy's view of the replica pair: who is primary, the epoch, who may be promoted.
//!
//! The proxy is the witness that breaks ties when primary and backup lose each other: a backup
//! becomes primary, and a primary goes on without its backup, only with the witness's grant and a
//! new epoch. Whatever a replica of an older epoch says afterwards is ignored (and it is fenced).
//! Time is an input (`now`, in [`Millis`]), never read here.
//!
//! Replicas are known by their *handle* (pid or SAP), not by the connection they use: a replica
//! that reconnects (a cut link healed, a paused or restarted proxy) replaces its old link and keeps
//! its place. What a restarted proxy must remember to refuse a deposed primary is [`Durable`]:
//! the witness emits [`Action::Persist`] whenever it changes, *before* the actions that depend on
//! it (grants, routes), and the executor holds those actions until the state is on disk.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Millis;
use crate::wire::node::{ReplicaInfo, Role};

/// Identifies one server connection at the proxy.
pub type LinkId = u64;

/// The witness state that must survive a proxy restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Durable {
    /// The epoch last granted.
    pub epoch: u64,
    /// The epoch at which the current primary took office: an older primary is deposed.
    pub office_epoch: u64,
    /// Handle and SAP of the replica that holds (or was granted) the office.
    pub primary: Option<(String, String)>,
    /// Handle of a backup known to hold every acknowledged write at `epoch`.
    pub synced_backup: Option<String>,
    /// A promotion not yet confirmed by the promoted replica (no heartbeat at the new epoch and
    /// no answer from it reached us): the previous holder (handle, SAP) and its office epoch.
    /// Until confirmed, nothing was acknowledged at the new epoch, so if the promoted replica
    /// fails the previous holder, which still has every acknowledged write, takes the office
    /// back instead of being fenced.
    pub unconfirmed_from: Option<(String, String, u64)>,
    /// A synchronised backup dropped so that the primary could go on alone, while the primary
    /// has not yet shown it serves at the new epoch: if the primary fails first, this backup
    /// still holds every acknowledged write and may be promoted.
    pub unconfirmed_drop: Option<String>,
    /// The epoch raised (promotion, solo grant, revert, new office) and its holder has not yet
    /// shown it serves at the new one: nothing was acknowledged at it, so a copy recovered from a
    /// log of this epoch still holds every acknowledged write. None: a recovered copy must be of
    /// the current epoch.
    #[serde(default)]
    pub copy_floor: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Hello {
        link: LinkId,
        role: Role,
        epoch: u64,
        info: ReplicaInfo,
        /// A backup's PRIMARY_HANDLE (the pid or SHUTDOWN_SAP of the primary that started it).
        primary: Option<String>,
    },
    Heartbeat {
        link: LinkId,
        epoch: u64,
        /// Reported by a primary: the handle of its backup if that backup holds every
        /// acknowledged update and acknowledges synchronously.
        synced_backup: Option<String>,
        /// The last `HeartbeatAck` number the replica received on this link.
        echo: u64,
    },
    /// The replica at `link` lost its peer (a primary its backup; a backup its primary).
    PeerLost {
        link: LinkId,
        epoch: u64,
    },
    /// The connection to `link` closed.
    LinkDown {
        link: LinkId,
    },
    /// An answer from `link` reached the proxy (the router tells us).
    Answered {
        link: LinkId,
    },
    /// The service is being stopped on purpose (SHUTDOWN): the primary stops its backup, saves
    /// and exits. From now on the replicas leaving is the expected end, not a failure: the
    /// state moves as it would (a stop that does not complete leaves a consistent witness), but
    /// no failure is reported for it.
    Stopping,
    /// The stop did not complete (the primary did not confirm in time): the service goes on, and
    /// a replica leaving is a failure again.
    StopAborted,
    /// A `Persist` this witness asked for is done (written, or given up on): the actions held
    /// behind it, heartbeat acknowledgements included, are on their way.
    Persisted,
    Tick,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Write `Durable` to stable storage; every later action waits until it is written.
    Persist(Durable),
    /// Acknowledge a heartbeat with number `n`; the replica echoes it back in its next one.
    HeartbeatAck { link: LinkId, epoch: u64, n: u64 },
    Welcome {
        link: LinkId,
        role: Role,
        epoch: u64,
    },
    /// Promotion (to a backup) or permission to acknowledge alone (to a primary), at `epoch`.
    Grant { link: LinkId, epoch: u64 },
    /// Deposed or refused: the replica must stop; the proxy drops the link.
    Fence { link: LinkId, epoch: u64 },
    /// Close the link without fencing (replaced by a newer link of the same replica, or a
    /// registration that must be retried later).
    Drop { link: LinkId },
    /// Requests now go to `link`; everything unanswered is re-sent there.
    RouteTo { link: LinkId, epoch: u64 },
    /// No replica can serve: requests wait (until the request timeout) for one to register.
    NoPrimary,
    /// An operator-visible event (logged, and the notify command is run).
    Notify { kind: &'static str, detail: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Member {
    info: ReplicaInfo,
    /// For a backup: the handle or SAP of the primary that started it, as it said in its hello.
    primary_of: Option<String>,
    last_heard: Millis,
    /// The link closed: the member is silent until it says hello on a new one.
    down: bool,
    /// Heartbeat acks sent to it, the highest number it echoed, and when that last went up.
    acks_sent: u64,
    echo_seen: u64,
    echo_at: Millis,
}

impl Member {
    fn new(info: ReplicaInfo, now: Millis) -> Member {
        Member {
            info,
            primary_of: None,
            last_heard: now,
            down: false,
            acks_sent: 0,
            echo_seen: 0,
            echo_at: now,
        }
    }
}

/// The witness state machine.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Witness {
    durable: Durable,
    primary: Option<LinkId>,
    backup: Option<LinkId>,
    backup_synced: bool,
    members: BTreeMap<LinkId, Member>,
    heartbeat_timeout: Millis,
    /// After a restart, how long the office holder has to come back before a backup known to
    /// hold every acknowledged write is promoted in its place.
    restart_grace: Millis,
    started: Option<Millis>,
    last_tick: Option<Millis>,
    /// A proxy without durable state learning the replicas' epochs before it seats a primary.
    learning: Option<Learning>,
    /// The service is being stopped on purpose ([`Input::Stopping`]).
    stopping: bool,
    /// `Persist` actions not yet reported done ([`Input::Persisted`]). The executor holds every
    /// action behind a `Persist` until the state is on disk, heartbeat acknowledgements too, so
    /// meanwhile no replica can echo a new one: its heartbeats count without a fresh echo.
    persisting: u32,
}

/// What a fresh witness has heard while it learns (see [`Witness::learning`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Learning {
    wait: Millis,
    /// Set by the first hello that claims an epoch (evidence of a history).
    until: Option<Millis>,
    max_claim: u64,
    saw_primary: bool,
    saw_backup: bool,
}

impl Witness {
    pub fn new(heartbeat_timeout: Millis) -> Self {
        Self::restore(heartbeat_timeout, heartbeat_timeout, Durable::default())
    }

    /// A witness that starts from what a previous incarnation of the proxy persisted.
    /// `restart_grace`: how long after the start the office holder may take to reconnect (its
    /// link to the previous proxy must time out first) before its synchronised backup, if that
    /// registers, is promoted instead.
    pub fn restore(heartbeat_timeout: Millis, restart_grace: Millis, durable: Durable) -> Self {
        Witness {
            durable,
            primary: None,
            backup: None,
            backup_synced: false,
            members: BTreeMap::new(),
            heartbeat_timeout,
            restart_grace,
            started: None,
            last_tick: None,
            learning: None,
            stopping: false,
            persisting: 0,
        }
    }

    /// A witness with no durable state (a proxy on a new host, or without its state file) that
    /// hears a replica claim an epoch waits up to `wait` (or until a primary and a backup have
    /// both said hello) and then seats only a primary of the highest epoch it heard, so that it
    /// never seats a deposed one. A first primary of epoch 0 (a new deployment) is seated at once.
    pub fn learning(mut self, wait: Millis) -> Self {
        if self.durable == Durable::default() && wait > 0 {
            self.learning = Some(Learning {
                wait,
                until: None,
                max_claim: 0,
                saw_primary: false,
                saw_backup: false,
            });
        }
        self
    }

    /// Ends learning: epochs below the highest claimed are deposed from now on.
    fn end_learning(&mut self, out: &mut Vec<Action>) {
        if let Some(l) = self.learning.take()
            && l.max_claim > 0
        {
            self.durable.epoch = self.durable.epoch.max(l.max_claim);
            self.durable.office_epoch = self.durable.office_epoch.max(l.max_claim);
            out.push(Action::Notify {
                kind: "epochs-learned",
                detail: format!(
                    "no durable state: the highest epoch the replicas claimed is {}; older primaries are refused",
                    l.max_claim
                ),
            });
        }
    }

    /// While learning, whether this hello must wait (it is dropped, and retried by the replica).
    fn still_learning(
        &mut self,
        now: Millis,
        role: Role,
        epoch: u64,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(l) = &mut self.learning else {
            return false;
        };
        if role == Role::Primary && epoch == 0 && l.until.is_none() {
            // A new deployment: nothing to learn.
            self.learning = None;
            return false;
        }
        if l.until.is_none() {
            l.until = Some(now + l.wait);
            out.push(Action::Notify {
                kind: "learning-epochs",
                detail: format!(
                    "no durable state and a replica claims epoch {epoch}: waiting up to {} ms for the primary and its backup before seating a primary",
                    l.wait
                ),
            });
        }
        l.max_claim = l.max_claim.max(epoch);
        match role {
            Role::Primary => l.saw_primary = true,
            Role::Backup => l.saw_backup = true,
        }
        let done = (l.saw_primary && l.saw_backup) || l.until.is_some_and(|u| now >= u);
        if done {
            self.end_learning(out);
            return false;
        }
        true
    }

    /// The epoch a primary that does not hold the office (a copy recovered from a log) must
    /// claim: the current one, or the one before an unconfirmed raise (see `copy_floor`).
    fn copy_floor(&self) -> u64 {
        self.durable.copy_floor.unwrap_or(self.durable.epoch)
    }

    pub fn epoch(&self) -> u64 {
        self.durable.epoch
    }
    pub fn durable(&self) -> &Durable {
        &self.durable
    }
    pub fn primary(&self) -> Option<LinkId> {
        self.primary
    }
    pub fn backup(&self) -> Option<LinkId> {
        self.backup
    }
    /// Whether the service is being stopped on purpose.
    pub fn stopping(&self) -> bool {
        self.stopping
    }
    pub fn backup_synced(&self) -> bool {
        self.backup.is_some() && self.backup_synced
    }
    pub fn info(&self, link: LinkId) -> Option<&ReplicaInfo> {
        self.members.get(&link).map(|m| &m.info)
    }

    /// Records what a member says about itself now (its SAP changes when it is promoted).
    pub fn update_info(&mut self, link: LinkId, info: ReplicaInfo) {
        if let Some(m) = self.members.get_mut(&link) {
            if Some(link) == self.primary
                && let Some((h, _)) = &self.durable.primary
                && *h == info.handle
            {
                // The SAP is what backups name their primary by; it is not worth a disk write
                // (a restarted proxy learns it at the next heartbeat).
                self.durable.primary = Some((info.handle.clone(), info.sap.clone()));
            }
            m.info = info;
        }
    }

    /// Feeds one input observed at `now`; returns what the proxy must do, in order.
    pub fn step(&mut self, now: Millis, input: Input) -> Vec<Action> {
        let before = self.durable.clone();
        self.started.get_or_insert(now);
        let mut out = Vec::new();
        match input {
            Input::Hello {
                link,
                role,
                epoch,
                info,
                primary,
            } => self.hello(now, link, role, epoch, info, primary, &mut out),
            Input::Heartbeat {
                link,
                epoch,
                synced_backup,
                echo,
            } => self.heartbeat(now, link, epoch, synced_backup, echo, &mut out),
            Input::PeerLost { link, epoch } => self.peer_lost(link, epoch, &mut out),
            Input::LinkDown { link } => {
                if Some(link) == self.primary || Some(link) == self.backup {
                    // Decided at the next tick, like a lapse: if both links went down at once
                    // it is more likely our own network than two failures.
                    if let Some(m) = self.members.get_mut(&link) {
                        m.down = true;
                    }
                } else {
                    self.members.remove(&link);
                }
            }
            Input::Answered { link } => self.confirm(link),
            Input::Stopping => self.stopping = true,
            Input::StopAborted => self.stopping = false,
            Input::Persisted => {
                self.persisting = self.persisting.saturating_sub(1);
                if self.persisting == 0 {
                    // What was held meanwhile (acknowledgements, welcomes) leaves now: every
                    // replica gets a whole window to answer it, as after a stall of our own.
                    self.new_windows(now);
                }
            }
            Input::Tick => self.tick(now, &mut out),
        }
        if self.durable.epoch > before.epoch
            && before.epoch > 0
            && self.durable.copy_floor.is_none()
        {
            self.durable.copy_floor = Some(before.epoch);
        }
        if self.durable != before {
            // Whatever depends on the new state (grants, routes) must wait for it to be stable.
            out.insert(0, Action::Persist(self.durable.clone()));
            self.persisting += 1;
        }
        out
    }

    fn heartbeat(
        &mut self,
        now: Millis,
        link: LinkId,
        epoch: u64,
        synced_backup: Option<String>,
        echo: u64,
        out: &mut Vec<Action>,
    ) {
        if epoch < self.durable.epoch
            && Some(link) != self.backup
            && Some(link) != self.primary
            && self.members.contains_key(&link)
        {
            // A replica of an older epoch that is neither of ours: it was deposed.
            self.members.remove(&link);
            out.push(Action::Fence {
                link,
                epoch: self.durable.epoch,
            });
            return;
        }
        let Some(m) = self.members.get_mut(&link) else {
            return;
        };
        m.acks_sent += 1;
        out.push(Action::HeartbeatAck {
            link,
            epoch,
            n: m.acks_sent,
        });
        if echo > m.echo_seen && echo <= m.acks_sent {
            m.echo_seen = echo;
            m.echo_at = now;
        }
        // A replica we hear but that no longer hears us (a one-way cut towards it) is as good as
        // silent: its heartbeat does not count. Not while our acknowledgements wait for our own
        // state to reach the disk: a slow disk here is not a cut there.
        if self.persisting == 0 && now.saturating_sub(m.echo_at) > self.heartbeat_timeout {
            return;
        }
        m.last_heard = now;
        if Some(link) == self.primary && epoch == self.durable.epoch {
            self.confirm(link);
        }
        if Some(link) == self.primary {
            let ours = match (
                self.backup.and_then(|b| self.members.get(&b)),
                &synced_backup,
            ) {
                (Some(b), Some(h)) => b.info.handle == *h,
                _ => false,
            };
            if epoch == self.durable.epoch {
                let synced = ours;
                if synced && !self.backup_synced {
                    out.push(Action::Notify {
                        kind: "backup-synced",
                        detail: format!("backup synchronised at epoch {}", self.durable.epoch),
                    });
                }
                self.backup_synced = synced;
                self.durable.synced_backup = if synced { synced_backup } else { None };
            } else if epoch < self.durable.epoch {
                // The primary missed our last grant (it was lost with a link): say it again.
                self.grant_solo(link, out);
            }
        }
    }

    fn peer_lost(&mut self, link: LinkId, epoch: u64, out: &mut Vec<Action>) {
        if Some(link) == self.primary {
            // The primary lost its backup: it goes on alone at a new epoch, so the lost backup
            // can never be promoted.
            if let Some(b) = self.backup {
                self.drop_backup(b, "primary lost its backup", out);
            } else {
                // Already without a backup (it missed the grant): grant again.
                self.grant_solo(link, out);
            }
        } else if Some(link) == self.backup && epoch >= self.durable.epoch && !self.stopping {
            // The backup lost its primary. It may simply notice a dead primary before we do, so
            // nothing is decided here: if the primary is dead its heartbeats lapse (Tick
            // promotes); if it is alive, it loses the backup too and says so.
            out.push(Action::Notify {
                kind: "backup-suspects-primary",
                detail:
                    "backup reports it lost the primary; waiting for the heartbeat window to decide"
                        .into(),
            });
        }
    }

    fn tick(&mut self, now: Millis, out: &mut Vec<Action>) {
        // If we ourselves were not running (paused, starved of CPU) for a good part of the
        // window, silence is our fault, not theirs: start the window again.
        let stalled = self
            .last_tick
            .is_some_and(|t| now.saturating_sub(t) > self.heartbeat_timeout / 2);
        self.last_tick = Some(now);
        if self
            .learning
            .as_ref()
            .is_some_and(|l| l.until.is_some_and(|u| now >= u))
        {
            self.end_learning(out);
        }
        if stalled {
            self.new_windows(now);
            return;
        }
        if self.persisting > 0 {
            // Our own state is not on disk yet and everything we would send waits behind it
            // (a replica that registered meanwhile has not even been welcomed): silence now is
            // ours. Nothing is decided until it is written; then every replica gets a window.
            return;
        }
        if self.primary.is_none()
            && self.durable.unconfirmed_from.is_some()
            && self
                .started
                .is_some_and(|t| now.saturating_sub(t) >= self.restart_grace)
        {
            // We restarted during an unconfirmed promotion and the promoted replica never came
            // back: the previous holder may.
            self.revert(out);
        }
        if self.primary.is_none()
            && let Some(b) = self.backup
            && self.backup_synced
            && self.heard_recently(b, now)
            && self
                .started
                .is_some_and(|t| now.saturating_sub(t) >= self.restart_grace)
            && self
                .members
                .get(&b)
                .is_some_and(|m| now.saturating_sub(m.echo_at) <= self.heartbeat_timeout)
        {
            // We restarted, and the primary that held the office never came back; its backup
            // holds every acknowledged write (we recorded that before the restart).
            self.promote(
                None,
                b,
                "the primary did not come back after the proxy restarted",
                out,
            );
            return;
        }
        let primary_lapsed = self.primary.is_some_and(|p| !self.heard_recently(p, now));
        let backup_lapsed = self.backup.is_some_and(|b| !self.heard_recently(b, now));
        if primary_lapsed && backup_lapsed {
            // Both silent at once: more likely our own network than two failures. Wait;
            // requests time out meanwhile, and replicas that reconnect are taken back.
            return;
        }
        if primary_lapsed && let Some(p) = self.primary {
            let why = if self.members.get(&p).is_some_and(|m| m.down) {
                "connection to the primary closed"
            } else {
                "primary heartbeats lapsed"
            };
            self.primary_failed(p, why, out);
        }
        // Without a primary there is nobody to go on alone: a silent backup (perhaps the only
        // full copy) is kept, and taken back when it reconnects.
        if backup_lapsed
            && self.primary.is_some()
            && let Some(b) = self.backup
        {
            let why = if self.members.get(&b).is_some_and(|m| m.down) {
                "connection to the backup closed"
            } else {
                "backup heartbeats lapsed"
            };
            self.drop_backup(b, why, out);
        }
    }

    /// Silence so far was ours, not theirs: every replica's heartbeat window and echo window
    /// start again at `now`.
    fn new_windows(&mut self, now: Millis) {
        for m in self.members.values_mut() {
            m.last_heard = now;
            m.echo_at = now;
        }
    }

    /// The primary at `link` has shown it serves at the current epoch.
    fn confirm(&mut self, link: LinkId) {
        if Some(link) == self.primary {
            self.durable.unconfirmed_from = None;
            self.durable.unconfirmed_drop = None;
            self.durable.copy_floor = None;
        }
    }

    /// Whether the witness waits for the primary at `link` to confirm its epoch.
    pub fn awaits_confirmation(&self) -> bool {
        self.durable.unconfirmed_from.is_some()
            || self.durable.unconfirmed_drop.is_some()
            || self.durable.copy_floor.is_some()
    }

    /// The promoted replica failed before it confirmed: the previous holder gets the office back.
    fn revert(&mut self, out: &mut Vec<Action>) {
        if let Some((h, sap, office)) = self.durable.unconfirmed_from.take() {
            out.push(Action::Notify {
                kind: "promotion-reverted",
                detail: format!(
                    "the promoted replica failed before serving at epoch {}; primary {h} keeps the office",
                    self.durable.epoch
                ),
            });
            // The promoted replica was its synchronised backup and acknowledged nothing since:
            // it still holds every acknowledged write (and may be promoted again).
            self.durable.synced_backup = self
                .durable
                .primary
                .as_ref()
                .map(|(promoted, _)| promoted.clone());
            self.durable.primary = Some((h, sap));
            // A fresh epoch for the reinstated holder: the promoted replica may have released
            // answers at the old one (none reached us), and must never be taken back at it.
            let _ = office;
            self.durable.epoch += 1;
            self.durable.office_epoch = self.durable.epoch;
        }
    }

    fn is_previous_holder(&self, info: &ReplicaInfo) -> bool {
        self.durable
            .unconfirmed_from
            .as_ref()
            .is_some_and(|(h, _, _)| *h == info.handle)
    }

    /// Whether the seated primary was heard within the heartbeat timeout (an orderly stop
    /// need not wait for one that is gone).
    pub fn primary_heard_recently(&self, now: Millis) -> bool {
        self.primary.is_some_and(|p| self.heard_recently(p, now))
    }

    fn heard_recently(&self, link: LinkId, now: Millis) -> bool {
        self.members
            .get(&link)
            .is_some_and(|m| !m.down && now.saturating_sub(m.last_heard) < self.heartbeat_timeout)
    }

    fn is_office_holder(&self, info: &ReplicaInfo) -> bool {
        self.durable
            .primary
            .as_ref()
            .is_some_and(|(h, _)| *h == info.handle)
    }

    /// Replaces `old` (a link of the same replica) by `link`.
    fn relink(
        &mut self,
        old: LinkId,
        link: LinkId,
        info: ReplicaInfo,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        let primary_of = self.members.remove(&old).and_then(|m| m.primary_of);
        let mut member = Member::new(info, now);
        member.primary_of = primary_of;
        self.members.insert(link, member);
        out.push(Action::Drop { link: old });
    }

    #[allow(clippy::too_many_arguments)]
    fn hello(
        &mut self,
        now: Millis,
        link: LinkId,
        role: Role,
        epoch: u64,
        info: ReplicaInfo,
        primary_of_backup: Option<String>,
        out: &mut Vec<Action>,
    ) {
        if self.still_learning(now, role, epoch, out) {
            out.push(Action::Drop { link });
            return;
        }
        let handle_of = |w: &Witness, l: Option<LinkId>| {
            l.and_then(|l| w.members.get(&l).map(|m| (l, m.info.handle.clone())))
        };
        match role {
            Role::Primary => {
                if let Some((p, h)) = handle_of(self, self.primary) {
                    if h == info.handle {
                        // The current primary on a new connection (a cut healed, or it noticed our
                        // restart or pause before we noticed it).
                        self.relink(p, link, info, now, out);
                        self.primary = Some(link);
                        self.welcome_primary(link, epoch, out);
                        return;
                    }
                    if self.is_previous_holder(&info) {
                        // Until the promoted replica confirms, this one may get the office back.
                        out.push(Action::Drop { link });
                        return;
                    }
                    if self.heard_recently(p, now) || epoch == 0 || epoch < self.copy_floor() {
                        self.refuse(
                            link,
                            &info,
                            "primary",
                            epoch,
                            "another primary is serving",
                            out,
                        );
                        return;
                    }
                    // The seated primary fell silent (both replicas died at once, and we waited
                    // as for a fault of our own network): a copy recovered from a log that holds
                    // every acknowledged write takes its place, at a new epoch.
                    self.members.remove(&p);
                    self.primary = None;
                    out.push(Action::Drop { link: p });
                }
                if self.is_previous_holder(&info) {
                    // The promoted replica is not registered (we restarted): wait for it, or for
                    // the grace period after which this one gets the office back.
                    out.push(Action::Drop { link });
                    return;
                }
                let full_copy = [&self.durable.synced_backup, &self.durable.unconfirmed_drop]
                    .iter()
                    .any(|h| h.as_ref() == Some(&info.handle));
                if full_copy && !self.is_office_holder(&info) {
                    // A replica recorded as holding every acknowledged write (a backup whose
                    // promotion was reverted, or that was dropped before its primary served
                    // alone), while the office holder is away: it takes the office.
                    self.members.insert(link, Member::new(info.clone(), now));
                    self.take_office(
                        link,
                        &info,
                        "a full copy came back while the primary is away",
                        out,
                    );
                    return;
                }
                let holder = self.is_office_holder(&info);
                if !(holder || epoch == 0 || epoch >= self.copy_floor()) {
                    // A deposed primary coming back.
                    self.refuse(link, &info, "primary", epoch, "it was deposed", out);
                    return;
                }
                if !holder && epoch == 0 && self.durable.primary.is_some() && self.backup.is_some()
                {
                    // A fresh server while the holder's backup is still with us: wait for the
                    // holder (or its promotion) rather than start a second history.
                    self.refuse(
                        link,
                        &info,
                        "primary",
                        epoch,
                        "the office holder's backup is registered",
                        out,
                    );
                    return;
                }
                self.durable.epoch = self.durable.epoch.max(epoch).max(1);
                if !holder && self.durable.primary.is_some() {
                    // A new office: a previous holder that comes back is deposed.
                    self.durable.epoch += 1;
                    if epoch == 0 {
                        out.push(Action::Notify {
                            kind: "empty-primary",
                            detail: format!(
                                "primary {} holds no copy (epoch 0) although epoch {} had a primary: what was acknowledged before is only in copies elsewhere",
                                info.handle,
                                self.durable.epoch - 1
                            ),
                        });
                    }
                }
                if !holder {
                    self.durable.office_epoch = self.durable.epoch;
                    self.durable.synced_backup = None;
                    // Whatever backup is registered holds none of the new office's writes.
                    self.backup_synced = false;
                }
                self.durable.primary = Some((info.handle.clone(), info.sap.clone()));
                self.members.insert(link, Member::new(info.clone(), now));
                self.primary = Some(link);
                out.push(Action::Notify {
                    kind: "primary-registered",
                    detail: format!(
                        "primary {} at {} (epoch {})",
                        info.handle, info.sap, self.durable.epoch
                    ),
                });
                self.welcome_primary(link, epoch, out);
                // A backup that registered before its primary (after our restart) stays only
                // if it belongs to this primary.
                if let Some(b) = self.backup
                    && !self.belongs(b)
                {
                    self.drop_backup(b, "backup belongs to another primary", out);
                }
            }
            Role::Backup => {
                if let Some((b, h)) = handle_of(self, self.backup) {
                    if h == info.handle {
                        self.relink(b, link, info, now, out);
                        self.backup = Some(link);
                        out.push(Action::Welcome {
                            link,
                            role: Role::Backup,
                            epoch: self.durable.epoch,
                        });
                        return;
                    }
                    if !self.heard_recently(b, now) {
                        self.drop_backup(b, "backup replaced by a new one", out);
                    }
                }
                if self.is_office_holder(&info) {
                    // We granted it the office and it never heard (we restarted, or the link
                    // was cut): it is the primary, on this new link.
                    if let Some(old) = self.primary.take() {
                        self.members.remove(&old);
                        out.push(Action::Drop { link: old });
                    }
                    self.members.insert(link, Member::new(info.clone(), now));
                    self.primary = Some(link);
                    self.seat_primary(link, out);
                    return;
                }
                if self.durable.unconfirmed_drop.as_ref() == Some(&info.handle) {
                    // Dropped, but possibly still needed: come back later.
                    out.push(Action::Drop { link });
                    return;
                }
                let current = self.primary.and_then(|p| self.members.get(&p));
                let ours = match (&primary_of_backup, current, &self.durable.primary) {
                    (Some(h), Some(m), _) => *h == m.info.handle || *h == m.info.sap,
                    (None, Some(_), _) => true,
                    // No primary registered yet (we restarted): the holder's backup waits here.
                    (Some(h), None, Some((ph, ps))) => h == ph || h == ps,
                    _ => false,
                };
                // A backup of an older epoch was dropped since, unless it is the one we recorded
                // as holding every acknowledged write (a promotion of it was reverted).
                let stale = epoch != 0
                    && epoch < self.durable.epoch
                    && self.durable.synced_backup.as_ref() != Some(&info.handle);
                if !ours || self.backup.is_some() || stale {
                    if self.primary.is_none() && !stale {
                        // Nobody to judge it by yet: let it try again later, unharmed.
                        out.push(Action::Drop { link });
                        return;
                    }
                    self.refuse(
                        link,
                        &info,
                        "backup",
                        epoch,
                        "it is not the current primary's backup",
                        out,
                    );
                    return;
                }
                // Before its primary registers (we restarted), a backup we recorded as holding
                // every acknowledged write at this epoch still does.
                self.backup_synced = self.primary.is_none()
                    && self.durable.synced_backup.as_ref() == Some(&info.handle);
                let mut member = Member::new(info.clone(), now);
                member.primary_of = primary_of_backup;
                self.members.insert(link, member);
                self.backup = Some(link);
                out.push(Action::Welcome {
                    link,
                    role: Role::Backup,
                    epoch: self.durable.epoch,
                });
                out.push(Action::Notify {
                    kind: "backup-registered",
                    detail: format!(
                        "backup {} at {} (epoch {})",
                        info.handle, info.sap, self.durable.epoch
                    ),
                });
            }
        }
    }

    /// Whether the registered backup `b` was started by the registered primary (by the handle or
    /// SAP it named in its hello; one that named none is not known to be this primary's).
    fn belongs(&self, b: LinkId) -> bool {
        let (Some(p), Some(m)) = (
            self.primary.and_then(|p| self.members.get(&p)),
            self.members.get(&b),
        ) else {
            return false;
        };
        m.primary_of
            .as_ref()
            .is_some_and(|h| *h == p.info.handle || *h == p.info.sap)
    }

    fn welcome_primary(&mut self, link: LinkId, claimed: u64, out: &mut Vec<Action>) {
        out.push(Action::Welcome {
            link,
            role: Role::Primary,
            epoch: self.durable.epoch,
        });
        if claimed != 0 && claimed < self.durable.epoch {
            // It missed a grant (its backup was dropped, or an incomplete one fenced).
            self.grant_solo(link, out);
        }
        out.push(Action::RouteTo {
            link,
            epoch: self.durable.epoch,
        });
    }

    /// Lets the primary at `link` acknowledge alone at the current epoch. A backup recorded as
    /// holding every acknowledged write but not attached to it stops being one once the primary
    /// confirms; until then it may still be promoted.
    fn grant_solo(&mut self, link: LinkId, out: &mut Vec<Action>) {
        let attached = self
            .backup
            .and_then(|b| self.members.get(&b))
            .map(|m| m.info.handle.clone());
        if self.durable.synced_backup.is_some() && self.durable.synced_backup != attached {
            self.durable.unconfirmed_drop = self.durable.synced_backup.take();
        }
        out.push(Action::Grant {
            link,
            epoch: self.durable.epoch,
        });
    }

    fn refuse(
        &mut self,
        link: LinkId,
        info: &ReplicaInfo,
        role: &str,
        epoch: u64,
        why: &str,
        out: &mut Vec<Action>,
    ) {
        out.push(Action::Fence {
            link,
            epoch: self.durable.epoch,
        });
        out.push(Action::Notify {
            kind: if role == "primary" {
                "primary-refused"
            } else {
                "backup-refused"
            },
            detail: format!(
                "refused server {} claiming {role} at epoch {epoch} (current epoch {}): {why}",
                info.handle, self.durable.epoch
            ),
        });
    }

    fn drop_backup(&mut self, b: LinkId, why: &str, out: &mut Vec<Action>) {
        let was_synced = self.backup_synced;
        self.backup = None;
        self.backup_synced = false;
        self.durable.synced_backup = None;
        let handle = self
            .members
            .remove(&b)
            .map(|m| m.info.handle)
            .unwrap_or_default();
        self.durable.epoch += 1;
        if was_synced && self.primary.is_some() {
            // Until the primary shows it serves alone at the new epoch, nothing was acknowledged
            // without this backup: if the primary fails first, the backup is still a full copy.
            // So it is let go, not fenced (the primary stops it once it has our grant).
            self.durable.unconfirmed_drop = Some(handle.clone());
            out.push(Action::Drop { link: b });
        } else {
            out.push(Action::Fence {
                link: b,
                epoch: self.durable.epoch,
            });
        }
        if let Some(p) = self.primary {
            out.push(Action::Grant {
                link: p,
                epoch: self.durable.epoch,
            });
        }
        if !self.stopping {
            // (While the service stops, the primary stopping its backup is the expected end.)
            out.push(Action::Notify {
                kind: "backup-lost",
                detail: format!(
                    "{why}: backup {handle} dropped; primary goes on alone at epoch {}",
                    self.durable.epoch
                ),
            });
        }
    }

    /// Tells the replica at `link` it is the primary at the current epoch, lets it serve, and
    /// routes requests to it.
    fn seat_primary(&self, link: LinkId, out: &mut Vec<Action>) {
        let epoch = self.durable.epoch;
        out.push(Action::Welcome {
            link,
            role: Role::Primary,
            epoch,
        });
        out.push(Action::Grant { link, epoch });
        out.push(Action::RouteTo { link, epoch });
    }

    /// The replica at `link`, known to hold every acknowledged write, takes the office at a new
    /// epoch (the holder it replaces may get it back until it confirms).
    fn take_office(&mut self, link: LinkId, info: &ReplicaInfo, why: &str, out: &mut Vec<Action>) {
        self.durable.unconfirmed_from = self
            .durable
            .primary
            .clone()
            .map(|(h, sap)| (h, sap, self.durable.office_epoch));
        self.durable.epoch += 1;
        self.durable.office_epoch = self.durable.epoch;
        self.durable.primary = Some((info.handle.clone(), info.sap.clone()));
        self.durable.synced_backup = None;
        self.durable.unconfirmed_drop = None;
        self.primary = Some(link);
        self.seat_primary(link, out);
        out.push(Action::Notify {
            kind: "failover",
            detail: format!(
                "{why}: {} takes the office at epoch {}",
                info.handle, self.durable.epoch
            ),
        });
    }

    /// The synchronised backup `b` takes the office at a new epoch; the failed primary `p` (if
    /// registered) is let go.
    fn promote(&mut self, p: Option<LinkId>, b: LinkId, why: &str, out: &mut Vec<Action>) {
        let handle = p
            .and_then(|p| self.members.remove(&p))
            .map(|m| m.info.handle)
            .or_else(|| self.durable.primary.as_ref().map(|(h, _)| h.clone()))
            .unwrap_or_default();
        self.primary = Some(b);
        self.backup = None;
        self.backup_synced = false;
        self.durable.unconfirmed_from = self
            .durable
            .primary
            .clone()
            .map(|(h, sap)| (h, sap, self.durable.office_epoch));
        self.durable.epoch += 1;
        self.durable.office_epoch = self.durable.epoch;
        let info = self.members.get(&b).map(|m| m.info.clone());
        self.durable.primary = info.as_ref().map(|i| (i.handle.clone(), i.sap.clone()));
        self.durable.synced_backup = None;
        if let Some(p) = p {
            // Not fenced: until the promoted replica confirms, the old primary may be the only
            // full copy. The promoted replica fences it (kill or terminate) once it serves, and
            // the witness refuses it once the promotion is confirmed.
            out.push(Action::Drop { link: p });
        }
        out.push(Action::Grant {
            link: b,
            epoch: self.durable.epoch,
        });
        out.push(Action::RouteTo {
            link: b,
            epoch: self.durable.epoch,
        });
        out.push(Action::Notify {
            kind: "failover",
            detail: format!(
                "{why}: primary {handle} failed; backup {} promoted at epoch {}",
                info.map(|i| i.handle).unwrap_or_default(),
                self.durable.epoch
            ),
        });
    }

    fn primary_failed(&mut self, p: LinkId, why: &str, out: &mut Vec<Action>) {
        let handle = self
            .members
            .get(&p)
            .map(|m| m.info.handle.clone())
            .unwrap_or_default();
        match self.backup {
            Some(b) if self.backup_synced => self.promote(Some(p), b, why, out),
            other => {
                // Nobody can be promoted: the failed primary holds the only full copy. It is not
                // fenced; it may come back (a cut link healed) and is taken back then.
                self.members.remove(&p);
                self.primary = None;
                out.push(Action::Drop { link: p });
                if let Some(b) = other {
                    // A backup that was still synchronising holds an incomplete copy: it cannot
                    // take over (a second failure); it is dropped, and the epoch moves so that
                    // it can never come back as a backup of this history.
                    self.backup = None;
                    self.members.remove(&b);
                    self.durable.epoch += 1;
                    self.durable.synced_backup = None;
                    out.push(Action::Fence {
                        link: b,
                        epoch: self.durable.epoch,
                    });
                }
                self.revert(out);
                if let Some(h) = self.durable.unconfirmed_drop.take() {
                    // The primary failed before serving alone: the backup it lost still holds
                    // every acknowledged write.
                    self.durable.synced_backup = Some(h);
                }
                out.push(Action::NoPrimary);
                if !self.stopping {
                    // (While the service stops, the primary leaving is the expected end.)
                    out.push(Action::Notify {
                        kind: "primary-lost",
                        detail: format!("{why}: primary {handle} failed and no synchronised backup can take over; waiting for it to come back"),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Millis = 300;

    fn info(n: &str) -> ReplicaInfo {
        ReplicaInfo {
            handle: n.into(),
            sap: format!("127.0.0.1:{n}"),
            pid: 1,
        }
    }

    struct Fx {
        w: Witness,
        /// `Persist` is reported done at once (`Input::Persisted` right after), unless a test
        /// holds it to play a slow disk.
        hold_persists: bool,
    }

    impl Fx {
        fn new() -> Fx {
            Fx {
                w: Witness::new(HB),
                hold_persists: false,
            }
        }
        /// A heartbeat built with `hb` echoes every ack sent so far (a healthy two-way link).
        fn at(&mut self, ms: u64, i: Input) -> Vec<Action> {
            let i = match i {
                Input::Heartbeat {
                    link,
                    epoch,
                    synced_backup,
                    echo: 0,
                } => Input::Heartbeat {
                    link,
                    epoch,
                    synced_backup,
                    echo: self.w.members.get(&link).map_or(0, |m| m.acks_sent),
                },
                other => other,
            };
            let mut out = self.w.step(ms, i);
            if !self.hold_persists {
                for _ in 0..out
                    .iter()
                    .filter(|a| matches!(a, Action::Persist(_)))
                    .count()
                {
                    out.extend(self.w.step(ms, Input::Persisted));
                }
            }
            out
        }
        /// Primary link 1 and synced backup link 2 at epoch 1.
        fn pair() -> Fx {
            let mut f = Fx::new();
            f.at(0, hello(1, Role::Primary, 0));
            f.at(0, hello(2, Role::Backup, 1));
            f.at(10, hb(1, 1, true));
            f.at(10, hb(2, 1, false));
            assert!(f.w.backup_synced());
            f
        }
    }

    fn hello(link: LinkId, role: Role, epoch: u64) -> Input {
        Input::Hello {
            link,
            role,
            epoch,
            info: info(&link.to_string()),
            primary: None,
        }
    }

    /// A hello from the replica with handle `handle` on link `link`.
    fn hello_as(link: LinkId, role: Role, epoch: u64, handle: &str) -> Input {
        Input::Hello {
            link,
            role,
            epoch,
            info: info(handle),
            primary: None,
        }
    }

    fn backup_of(link: LinkId, primary: &str) -> Input {
        Input::Hello {
            link,
            role: Role::Backup,
            epoch: 0,
            info: info(&link.to_string()),
            primary: Some(primary.into()),
        }
    }

    #[test]
    fn a_backup_started_by_a_deposed_primary_is_refused() {
        let mut f = Fx::pair();
        // Primary 1 is cut from the proxy; backup 2 is promoted.
        f.at(250, hb(2, 1, false));
        let a = f.at(320, Input::Tick);
        assert!(has(&a, |x| *x == Action::Grant { link: 2, epoch: 2 }));
        // The deposed primary, not knowing yet, starts a backup that registers: refused.
        let a = f.at(330, backup_of(3, "1"));
        assert!(
            has(&a, |x| matches!(x, Action::Fence { link: 3, .. })),
            "{a:?}"
        );
        assert_eq!(f.w.backup(), None);
        // The new primary's own backup is accepted.
        let a = f.at(340, backup_of(4, "2"));
        assert!(
            has(&a, |x| *x
                == Action::Welcome {
                    link: 4,
                    role: Role::Backup,
                    epoch: 2
                }),
            "{a:?}"
        );
        // Also when named by the primary's SAP (remote backups know their primary that way).
        let mut f = Fx::new();
        f.at(0, hello(1, Role::Primary, 0));
        let a = f.at(1, backup_of(2, "127.0.0.1:1"));
        assert!(
            has(&a, |x| matches!(x, Action::Welcome { link: 2, .. })),
            "{a:?}"
        );
    }
    fn hb(link: LinkId, epoch: u64, synced: bool) -> Input {
        Input::Heartbeat {
            link,
            epoch,
            // In these tests the backup is link 2 (handle "2") unless a test says otherwise.
            synced_backup: synced.then(|| "2".to_string()),
            echo: 0,
        }
    }

    #[test]
    fn a_replica_that_stops_echoing_our_acks_is_as_good_as_silent() {
        // Proxy -> primary cut one way: the primary's heartbeats still arrive, but it no longer
        // receives our acks, so its echo stops going up. That is a failure of the primary link.
        let mut f = Fx::pair();
        let stuck = f.w.members.get(&1).map_or(0, |m| m.acks_sent);
        let mut a = vec![];
        // The last echo that went up counts for one heartbeat window, then the primary lapses.
        for t in (50..=1000).step_by(50) {
            a.extend(f.at(
                t,
                Input::Heartbeat {
                    link: 1,
                    epoch: 1,
                    synced_backup: Some("2".into()),
                    echo: stuck,
                },
            ));
            a.extend(f.at(t, hb(2, 1, false)));
            a.extend(f.at(t, Input::Tick));
        }
        assert!(
            has(&a, |x| *x == Action::Grant { link: 2, epoch: 2 }),
            "{a:?}"
        );
        assert!(has(&a, |x| *x == Action::Drop { link: 1 }));
        // Every heartbeat, counted or not, is acknowledged with a rising number.
        let acks: Vec<u64> = a
            .iter()
            .filter_map(|x| match x {
                Action::HeartbeatAck { link: 2, n, .. } => Some(*n),
                _ => None,
            })
            .collect();
        assert!(acks.windows(2).all(|w| w[1] == w[0] + 1), "{acks:?}");
    }
    #[test]
    fn heartbeats_count_without_a_fresh_echo_while_our_acks_wait_for_our_disk() {
        // The proxy's state file takes long to sync (a backup dropped: a new epoch to record):
        // every action after the Persist is held, our acks too, so neither replica can echo a new
        // one. A slow disk here is not a cut there: nobody lapses meanwhile.
        let mut f = Fx::pair();
        f.hold_persists = true;
        let mut a = f.at(20, Input::PeerLost { link: 1, epoch: 1 });
        assert!(has(&a, |x| matches!(x, Action::Persist(_))), "{a:?}");
        let stuck = f.w.members.get(&1).map_or(0, |m| m.acks_sent);
        a.extend(beats_with_echo(&mut f, 50..=1000, stuck));
        assert!(
            !has(&a, |x| matches!(
                x,
                Action::Drop { link: 1 } | Action::NoPrimary
            )),
            "{a:?}"
        );
        assert_eq!(f.w.primary(), Some(1));
        // A new backup registers meanwhile: its welcome waits behind the write, so it cannot
        // heartbeat yet; it is not dropped for that.
        a = f.at(1000, hello(3, Role::Backup, 2));
        for t in (1050..=1500).step_by(50) {
            a.extend(f.at(t, Input::Tick));
        }
        assert!(!has(&a, |x| matches!(x, Action::Drop { link: 3 })), "{a:?}");
        // Written (each write reported): the held acks leave, and from now on an echo that does
        // not rise is a cut again, after one window.
        while f.w.persisting > 0 {
            f.at(1500, Input::Persisted);
        }
        f.hold_persists = false;
        a = beats_with_echo(&mut f, 1550..=2500, stuck);
        assert_eq!(f.w.primary(), None, "{a:?}");
    }

    /// Every 50 ms over `span`: a heartbeat from primary link 1 at epoch 1 echoing `echo`
    /// (no synced backup), then a tick.
    fn beats_with_echo(f: &mut Fx, span: std::ops::RangeInclusive<u64>, echo: u64) -> Vec<Action> {
        let mut a = vec![];
        for t in span.step_by(50) {
            a.extend(f.at(
                t,
                Input::Heartbeat {
                    link: 1,
                    epoch: 1,
                    synced_backup: None,
                    echo,
                },
            ));
            a.extend(f.at(t, Input::Tick));
        }
        a
    }

    fn has(actions: &[Action], pred: impl Fn(&Action) -> bool) -> bool {
        actions.iter().any(pred)
    }

    /// What an orderly stop looks like to the witness: the primary stops its backup (its link
    /// closes, the primary reports the peer lost), then the primary's own link closes.
    fn orderly_stop(f: &mut Fx) -> Vec<Action> {
        let mut a = vec![];
        a.extend(f.at(100, Input::PeerLost { link: 1, epoch: 1 }));
        a.extend(f.at(100, Input::LinkDown { link: 2 }));
        a.extend(f.at(110, Input::LinkDown { link: 1 }));
        for t in (150..=1000).step_by(50) {
            a.extend(f.at(t, Input::Tick));
        }
        a
    }

    #[test]
    fn an_orderly_stop_reports_no_failure() {
        let failure = |x: &Action| matches!(x, Action::Notify { .. });
        // The control: the same sequence without `Stopping` is two failures.
        let mut f = Fx::pair();
        let a = orderly_stop(&mut f);
        let kinds: Vec<&str> = a
            .iter()
            .filter_map(|x| match x {
                Action::Notify { kind, .. } => Some(*kind),
                _ => None,
            })
            .collect();
        assert_eq!(kinds, ["backup-lost", "primary-lost"], "{a:?}");
        let (epoch, durable) = (f.w.epoch(), f.w.durable().clone());

        let mut f = Fx::pair();
        assert!(f.at(90, Input::Stopping).is_empty());
        assert!(f.w.stopping());
        let a = orderly_stop(&mut f);
        assert!(!has(&a, failure), "{a:?}");
        // The state moves exactly as it would: a restarted proxy sees the same durable state.
        assert_eq!((f.w.epoch(), f.w.durable()), (epoch, &durable));
        assert!(has(&a, |x| *x == Action::NoPrimary), "{a:?}");

        // A stop that did not complete: failures are failures again.
        let mut f = Fx::pair();
        f.at(90, Input::Stopping);
        f.at(95, Input::StopAborted);
        let a = orderly_stop(&mut f);
        assert!(has(&a, failure), "{a:?}");
    }

    #[test]
    fn first_primary_is_welcomed_at_epoch_1() {
        let mut f = Fx::new();
        let a = f.at(0, hello(1, Role::Primary, 0));
        assert!(has(&a, |x| *x
            == Action::Welcome {
                link: 1,
                role: Role::Primary,
                epoch: 1
            }));
        assert!(has(&a, |x| *x == Action::RouteTo { link: 1, epoch: 1 }));
        assert_eq!(f.w.primary(), Some(1));
    }

    #[test]
    fn second_primary_is_fenced() {
        let mut f = Fx::new();
        f.at(0, hello(1, Role::Primary, 0));
        let a = f.at(1, hello(2, Role::Primary, 0));
        assert!(has(&a, |x| matches!(x, Action::Fence { link: 2, .. })));
        assert_eq!(f.w.primary(), Some(1));
    }

    #[test]
    fn primary_lapse_promotes_synced_backup_with_new_epoch() {
        let mut f = Fx::pair();
        f.at(200, hb(2, 1, false));
        let a = f.at(320, Input::Tick);
        assert!(has(&a, |x| *x == Action::Grant { link: 2, epoch: 2 }));
        assert!(has(&a, |x| *x == Action::RouteTo { link: 2, epoch: 2 }));
        // The old primary is let go, not fenced: until the new one confirms, it may be needed.
        assert!(has(&a, |x| *x == Action::Drop { link: 1 }));
        assert!(!has(&a, |x| matches!(x, Action::Fence { .. })));
        assert!(f.w.durable().unconfirmed_from.is_some());
        let a = f.at(330, hb(2, 2, false));
        assert!(
            has(
                &a,
                |x| matches!(x, Action::Persist(d) if d.unconfirmed_from.is_none())
            ),
            "{a:?}"
        );
        assert_eq!(f.w.epoch(), 2);
        assert_eq!(f.w.primary(), Some(2));
        assert_eq!(f.w.backup(), None);
    }

    #[test]
    fn a_stalled_witness_does_not_blame_the_replicas() {
        let mut f = Fx::pair();
        f.at(100, Input::Tick);
        // The proxy was paused for a second: nothing was heard, but nothing failed either.
        let a = f.at(1100, Input::Tick);
        assert!(a.is_empty(), "{a:?}");
        f.at(1110, hb(1, 1, true));
        f.at(1110, hb(2, 1, false));
        assert!(f.at(1150, Input::Tick).is_empty());
        assert_eq!(f.w.epoch(), 1);
        // But a real lapse after that is still detected.
        let mut a = vec![];
        for t in (1200..=1500).step_by(50) {
            f.at(t, hb(2, 1, false));
            a.extend(f.at(t, Input::Tick));
        }
        assert!(
            has(&a, |x| *x == Action::Grant { link: 2, epoch: 2 }),
            "{a:?}"
        );
    }

    #[test]
    fn both_replicas_silent_changes_nothing() {
        let mut f = Fx::pair();
        for t in (50..1000).step_by(50) {
            assert!(f.at(t, Input::Tick).is_empty());
        }
        assert_eq!(f.w.primary(), Some(1));
        assert_eq!(f.w.epoch(), 1);
    }

    #[test]
    fn no_failover_while_heartbeats_arrive() {
        let mut f = Fx::pair();
        for t in (50..2000).step_by(50) {
            f.at(t, hb(1, 1, true));
            f.at(t, hb(2, 1, false));
            assert!(f.at(t, Input::Tick).is_empty());
        }
        assert_eq!(f.w.epoch(), 1);
    }

    #[test]
    fn unsynced_backup_is_not_promoted_second_failure_while_syncing() {
        let mut f = Fx::new();
        f.at(0, hello(1, Role::Primary, 0));
        f.at(0, hello(2, Role::Backup, 1));
        f.at(10, hb(1, 1, false)); // backup still syncing
        f.at(200, hb(2, 1, false));
        let a = f.at(400, Input::Tick);
        assert!(has(&a, |x| *x == Action::NoPrimary));
        assert!(!has(&a, |x| matches!(x, Action::Grant { .. })));
        assert_eq!(f.w.primary(), None);
    }

    #[test]
    fn proxy_primary_cut_promotes_backup_and_deposed_primary_coming_back_is_fenced() {
        let mut f = Fx::pair();
        // Primary's heartbeats stop reaching the proxy; backup reports the primary lost.
        f.at(150, hb(2, 1, false));
        let a = f.at(160, Input::PeerLost { link: 2, epoch: 1 });
        assert!(
            !has(&a, |x| matches!(
                x,
                Action::Grant { .. } | Action::Fence { .. }
            )),
            "the witness waits for the lapse before promoting: {a:?}"
        );
        let a = f.at(320, Input::Tick);
        assert!(has(&a, |x| *x == Action::Grant { link: 2, epoch: 2 }));
        // The promoted replica serves at epoch 2 (confirmed).
        f.at(330, hb(2, 2, false));
        // Old primary comes back over a new connection claiming primary at epoch 1.
        let a = f.at(500, hello_as(3, Role::Primary, 1, "1"));
        assert!(
            has(&a, |x| matches!(x, Action::Fence { link: 3, .. })),
            "{a:?}"
        );
        // So does any other copy of epoch 1 (a replica restarted from an old log).
        let a = f.at(505, hello(4, Role::Primary, 1));
        assert!(
            has(&a, |x| matches!(x, Action::Fence { link: 4, .. })),
            "{a:?}"
        );
        // Old heartbeat on the old link is ignored.
        let a = f.at(510, hb(1, 1, true));
        assert!(!has(&a, |x| matches!(
            x,
            Action::Grant { .. } | Action::RouteTo { .. }
        )));
        assert_eq!(f.w.primary(), Some(2));
    }

    #[test]
    fn primary_backup_cut_primary_goes_alone_backup_replaced() {
        let mut f = Fx::pair();
        let a = f.at(50, Input::PeerLost { link: 1, epoch: 1 });
        // A synchronised backup is let go, not fenced, until the primary confirms the new epoch.
        assert!(has(&a, |x| matches!(
            x,
            Action::Drop { link: 2 } | Action::Fence { link: 2, .. }
        )));
        assert!(has(&a, |x| *x == Action::Grant { link: 1, epoch: 2 }));
        assert_eq!(f.w.backup(), None);
        assert_eq!(f.w.durable().unconfirmed_drop.as_deref(), Some("2"));
        // Until then it is told to come back later.
        let a = f.at(55, hello(2, Role::Backup, 1));
        assert!(
            has(&a, |x| matches!(
                x,
                Action::Drop { link: 2 } | Action::Fence { link: 2, .. }
            )),
            "{a:?}"
        );
        // The primary heartbeats at the new epoch: the drop is final, the old backup is refused.
        f.at(56, hb(1, 2, false));
        assert_eq!(f.w.durable().unconfirmed_drop, None);
        let a = f.at(57, hello(2, Role::Backup, 1));
        assert!(
            has(&a, |x| matches!(x, Action::Fence { link: 2, .. })),
            "{a:?}"
        );
        // The backup's own complaint, arriving later at an old epoch, changes nothing.
        let a = f.at(60, Input::PeerLost { link: 2, epoch: 1 });
        assert!(!has(&a, |x| matches!(
            x,
            Action::Grant { .. } | Action::Fence { .. } | Action::RouteTo { .. }
        )));
        assert_eq!(f.w.primary(), Some(1));
        // A fresh backup joins at the new epoch.
        let a = f.at(70, hello(4, Role::Backup, 2));
        assert!(has(&a, |x| *x
            == Action::Welcome {
                link: 4,
                role: Role::Backup,
                epoch: 2
            }));
    }

    #[test]
    fn backup_reports_peer_lost_first_while_primary_alive() {
        // The backup may notice a dead primary before the proxy does: its report alone must not
        // drop it (that would leave no one to promote).
        let mut f = Fx::pair();
        f.at(40, hb(1, 1, true));
        f.at(200, hb(2, 1, false));
        let a = f.at(250, Input::PeerLost { link: 2, epoch: 1 });
        assert!(!has(&a, |x| matches!(
            x,
            Action::Fence { .. } | Action::Grant { .. }
        )));
        let a = f.at(350, Input::Tick);
        assert!(
            has(&a, |x| *x == Action::Grant { link: 2, epoch: 2 }),
            "{a:?}"
        );
        // If instead the primary is alive, its own report decides: the backup is replaced.
        let mut f = Fx::pair();
        f.at(40, Input::PeerLost { link: 2, epoch: 1 });
        let a = f.at(50, Input::PeerLost { link: 1, epoch: 1 });
        assert!(has(&a, |x| matches!(
            x,
            Action::Drop { link: 2 } | Action::Fence { link: 2, .. }
        )));
        assert!(has(&a, |x| *x == Action::Grant { link: 1, epoch: 2 }));
    }

    #[test]
    fn proxy_backup_cut_replaces_backup() {
        let mut f = Fx::pair();
        f.at(250, hb(1, 1, true));
        let a = f.at(320, Input::Tick);
        assert!(has(&a, |x| matches!(
            x,
            Action::Drop { link: 2 } | Action::Fence { link: 2, .. }
        )));
        assert!(has(&a, |x| *x == Action::Grant { link: 1, epoch: 2 }));
        assert_eq!(f.w.primary(), Some(1));
    }

    #[test]
    fn a_primary_that_fails_before_serving_alone_leaves_its_dropped_backup_promotable() {
        // The backup is cut from the proxy and dropped; the primary dies before it gets the grant.
        let mut f = Fx::pair();
        f.at(250, hb(1, 1, true));
        let a = f.at(320, Input::Tick);
        assert!(has(&a, |x| matches!(
            x,
            Action::Drop { link: 2 } | Action::Fence { link: 2, .. }
        )));
        let mut a = vec![];
        for t in (350..=700).step_by(50) {
            a.extend(f.at(t, Input::Tick));
        }
        assert!(has(&a, |x| *x == Action::NoPrimary), "{a:?}");
        assert_eq!(f.w.durable().synced_backup.as_deref(), Some("2"));
        // The backup comes back (its primary is pid "1"): it is taken and promoted.
        let a = f.at(
            800,
            Input::Hello {
                link: 5,
                role: Role::Backup,
                epoch: 1,
                info: info("2"),
                primary: Some("1".into()),
            },
        );
        let a2 = f.at(810, hello_hb(5, 1));
        let a3 = f.at(820, Input::Tick);
        let all: Vec<_> = a.into_iter().chain(a2).chain(a3).collect();
        assert!(
            has(&all, |x| matches!(x, Action::Grant { link: 5, .. })),
            "{all:?}"
        );
    }

    /// A heartbeat of a backup at `epoch` (not synced: backups never claim it).
    fn hello_hb(link: LinkId, epoch: u64) -> Input {
        hb(link, epoch, false)
    }

    #[test]
    fn duplicate_and_reordered_messages_are_harmless() {
        let mut f = Fx::pair();
        let a = f.at(50, Input::PeerLost { link: 1, epoch: 1 });
        assert_eq!(f.w.epoch(), 2);
        assert!(has(&a, |x| matches!(x, Action::Grant { .. })));
        // Duplicate: re-grants at the same epoch, no second bump.
        let a = f.at(51, Input::PeerLost { link: 1, epoch: 1 });
        assert_eq!(f.w.epoch(), 2);
        assert!(has(&a, |x| *x == Action::Grant { link: 1, epoch: 2 }));
        // Duplicate hello of the current primary on another link is fenced.
        let a = f.at(52, hello(9, Role::Primary, 2));
        assert!(has(&a, |x| matches!(x, Action::Fence { link: 9, .. })));
        // A stale synced report from the old epoch does not mark a (missing) backup synced.
        f.at(53, hb(1, 1, true));
        assert!(!f.w.backup_synced());
        // LinkDown twice.
        f.at(54, Input::LinkDown { link: 1 });
        let a = f.at(55, Input::LinkDown { link: 1 });
        assert!(a.is_empty());
    }

    #[test]
    fn primary_link_down_without_backup_means_no_primary() {
        let mut f = Fx::new();
        f.at(0, hello(1, Role::Primary, 0));
        assert!(f.at(5, Input::LinkDown { link: 1 }).is_empty());
        let a = f.at(10, Input::Tick);
        assert!(has(&a, |x| *x == Action::NoPrimary), "{a:?}");
        assert!(
            !has(&a, |x| matches!(x, Action::Fence { .. })),
            "the only copy is never fenced: {a:?}"
        );
        // The same primary reconnecting (a cut link healed) is accepted back: nobody replaced it.
        let a = f.at(20, hello_as(2, Role::Primary, 1, "1"));
        assert!(has(&a, |x| matches!(x, Action::RouteTo { link: 2, .. })));
        assert_eq!(f.w.epoch(), 1);
    }

    #[test]
    fn a_witness_without_state_learns_epochs_before_seating_a_primary() {
        // A new deployment (first primary at epoch 0) is seated at once.
        let mut w = Witness::new(HB).learning(1000);
        let a = w.step(0, hello(1, Role::Primary, 0));
        assert!(
            has(&a, |x| matches!(x, Action::RouteTo { link: 1, .. })),
            "{a:?}"
        );

        // A proxy on a new host: a deposed primary (epoch 3) says hello first and must wait;
        // the current primary (epoch 4) and its backup come; the deposed one is then refused.
        let mut w = Witness::new(HB).learning(1000);
        let a = w.step(0, hello(1, Role::Primary, 3));
        assert!(has(&a, |x| *x == Action::Drop { link: 1 }), "{a:?}");
        let a = w.step(10, hello(2, Role::Primary, 4));
        assert!(
            has(&a, |x| matches!(
                x,
                Action::Drop { link: 2 } | Action::Fence { link: 2, .. }
            )),
            "{a:?}"
        );
        let a = w.step(20, hello(3, Role::Backup, 4));
        assert!(
            has(
                &a,
                |x| matches!(x, Action::Persist(d) if d.office_epoch == 4)
            ),
            "{a:?}"
        );
        let a = w.step(30, hello(4, Role::Primary, 3));
        assert!(
            has(&a, |x| matches!(x, Action::Fence { link: 4, .. })),
            "{a:?}"
        );
        let a = w.step(40, hello(5, Role::Primary, 4));
        assert!(
            has(&a, |x| matches!(x, Action::RouteTo { link: 5, .. })),
            "{a:?}"
        );

        // Alone, a recovered primary is seated once the wait is over.
        let mut w = Witness::new(HB).learning(1000);
        assert!(has(&w.step(0, hello(1, Role::Primary, 2)), |x| *x
            == Action::Drop { link: 1 }));
        w.step(500, Input::Tick);
        w.step(1001, Input::Tick);
        let a = w.step(1010, hello(2, Role::Primary, 2));
        assert!(
            has(&a, |x| matches!(x, Action::RouteTo { link: 2, epoch: 2 })),
            "{a:?}"
        );
        // A witness with durable state never learns.
        let d = Durable {
            epoch: 5,
            office_epoch: 5,
            ..Durable::default()
        };
        let mut w = Witness::restore(HB, HB, d).learning(1000);
        let a = w.step(0, hello(1, Role::Primary, 5));
        assert!(
            has(&a, |x| matches!(x, Action::RouteTo { link: 1, .. })),
            "{a:?}"
        );
    }

    #[test]
    fn during_an_unconfirmed_promotion_a_copy_of_the_previous_office_epoch_may_serve() {
        // The proxy restarted while the promotion of "b" at epoch 3 was unconfirmed; after a
        // power cut both come back with new handles, the newest copy still at epoch 2.
        let d = Durable {
            epoch: 3,
            office_epoch: 3,
            primary: Some(("b".into(), "sap-b".into())),
            synced_backup: None,
            unconfirmed_from: Some(("a".into(), "sap-a".into(), 2)),
            unconfirmed_drop: None,
            copy_floor: Some(2),
        };
        let mut w = Witness::restore(HB, HB, d.clone());
        let a = w.step(0, hello(7, Role::Primary, 2));
        assert!(
            has(&a, |x| matches!(x, Action::RouteTo { link: 7, .. })),
            "{a:?}"
        );
        // Once confirmed, an epoch-2 copy is deposed.
        let mut d2 = d;
        d2.unconfirmed_from = None;
        d2.copy_floor = None;
        let mut w = Witness::restore(HB, HB, d2);
        let a = w.step(0, hello(7, Role::Primary, 2));
        assert!(
            has(&a, |x| matches!(x, Action::Fence { link: 7, .. })),
            "{a:?}"
        );
    }

    #[test]
    fn a_new_office_after_a_restart_unseats_the_old_holders_synced_backup() {
        // Found by the model checker (tests/model.rs disks_a_restarted_primary_dies_after_a_
        // proxy_restart): the proxy restarted; "b", recorded as the synchronised backup of "a",
        // registers first; "c", a primary restarted from its log, takes a new office. "b" holds
        // none of c's writes: it must not stay registered as synchronised (nor at all: it
        // belongs to "a"), or c's death would promote it and lose c's acknowledged writes.
        let d = Durable {
            epoch: 1,
            office_epoch: 1,
            primary: Some(("a".into(), "sap-a".into())),
            synced_backup: Some("b".into()),
            ..Durable::default()
        };
        let mut w = Witness::restore(HB, HB, d);
        let a = w.step(
            0,
            Input::Hello {
                link: 2,
                role: Role::Backup,
                epoch: 1,
                info: info("b"),
                primary: Some("a".into()),
            },
        );
        assert!(
            has(&a, |x| matches!(x, Action::Welcome { link: 2, .. })),
            "{a:?}"
        );
        assert!(
            w.backup_synced(),
            "the recorded backup is synchronised until its primary is known"
        );
        let a = w.step(1, hello_as(3, Role::Primary, 1, "c"));
        assert!(
            has(&a, |x| matches!(x, Action::RouteTo { link: 3, epoch: 2 })),
            "{a:?}"
        );
        assert!(!w.backup_synced(), "{a:?}");
        assert!(
            has(&a, |x| matches!(
                x,
                Action::Drop { link: 2 } | Action::Fence { link: 2, .. }
            )),
            "b belongs to a: {a:?}"
        );
        // c falls silent: nobody is promoted.
        let a = w.step(10 * HB, Input::Tick);
        assert!(
            !has(&a, |x| matches!(
                x,
                Action::RouteTo { link: 2, .. } | Action::Grant { link: 2, .. }
            )),
            "{a:?}"
        );
    }
}
