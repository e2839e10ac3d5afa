//! The proxy's view of the replica pair: who is primary, the epoch, who may be promoted.
//!
//! The proxy is the witness that breaks ties when primary and backup lose each other: a backup
//! becomes primary, and a primary goes on without its backup, only with the witness's grant and a
//! new epoch. Whatever a replica of an older epoch says afterwards is ignored (and it is fenced).
//! Time is an input (`now`), never read here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::wire::node::{ReplicaInfo, Role};

/// Identifies one server connection at the proxy.
pub type LinkId = u64;

#[derive(Clone, Debug, PartialEq)]
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
        /// Reported by a primary: its backup holds every acknowledged update and acks synchronously.
        backup_synced: bool,
        /// The last `HeartbeatAck` number the replica received from us.
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
    Tick,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
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
    /// Requests now go to `link`; everything unanswered is re-sent there.
    RouteTo { link: LinkId, epoch: u64 },
    /// No replica can serve: requests wait (until the request timeout) for one to register.
    NoPrimary,
    /// An operator-visible event (logged, and the notify command is run).
    Notify { kind: &'static str, detail: String },
}

#[derive(Clone, Debug)]
struct Member {
    info: ReplicaInfo,
    last_heard: Instant,
    /// Heartbeat acks sent to it, the highest number it echoed, and when that last went up.
    acks_sent: u64,
    echo_seen: u64,
    echo_at: Instant,
}

impl Member {
    fn new(info: ReplicaInfo, now: Instant) -> Member {
        Member {
            info,
            last_heard: now,
            acks_sent: 0,
            echo_seen: 0,
            echo_at: now,
        }
    }
}

/// The witness state machine.
#[derive(Debug)]
pub struct Witness {
    epoch: u64,
    /// Epoch at which the current (or last) primary took office: a primary claiming an older
    /// epoch has been replaced since and is refused.
    office_epoch: u64,
    primary: Option<LinkId>,
    backup: Option<LinkId>,
    backup_synced: bool,
    members: BTreeMap<LinkId, Member>,
    heartbeat_timeout: Duration,
    last_tick: Option<Instant>,
}

impl Witness {
    pub fn new(heartbeat_timeout: Duration) -> Self {
        Witness {
            epoch: 0,
            office_epoch: 0,
            primary: None,
            backup: None,
            backup_synced: false,
            members: BTreeMap::new(),
            heartbeat_timeout,
            last_tick: None,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn primary(&self) -> Option<LinkId> {
        self.primary
    }
    pub fn backup(&self) -> Option<LinkId> {
        self.backup
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
            m.info = info;
        }
    }

    /// Feeds one input observed at `now`; returns what the proxy must do, in order.
    pub fn step(&mut self, now: Instant, input: Input) -> Vec<Action> {
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
                backup_synced,
                echo,
            } => {
                if epoch < self.epoch && Some(link) != self.backup {
                    // A replica of an older epoch: it was deposed and must stop.
                    if self.members.contains_key(&link) && Some(link) != self.primary {
                        self.members.remove(&link);
                        out.push(Action::Fence {
                            link,
                            epoch: self.epoch,
                        });
                    }
                    return out;
                }
                let Some(m) = self.members.get_mut(&link) else {
                    return out;
                };
                m.acks_sent += 1;
                out.push(Action::HeartbeatAck {
                    link,
                    epoch,
                    n: m.acks_sent,
                });
                if echo > m.echo_seen {
                    m.echo_seen = echo;
                    m.echo_at = now;
                }
                // A replica we hear but that no longer hears us (a one-way cut towards it) is as
                // good as silent: its heartbeat does not count.
                if now.saturating_duration_since(m.echo_at) > self.heartbeat_timeout {
                    return out;
                }
                m.last_heard = now;
                if Some(link) == self.primary && epoch == self.epoch {
                    if backup_synced && !self.backup_synced && self.backup.is_some() {
                        out.push(Action::Notify {
                            kind: "backup-synced",
                            detail: format!("backup synchronised at epoch {}", self.epoch),
                        });
                    }
                    self.backup_synced = backup_synced && self.backup.is_some();
                }
            }
            Input::PeerLost { link, epoch } => {
                // The current primary may repeat an old report (it missed our grant): re-grant.
                if epoch < self.epoch && Some(link) != self.backup && Some(link) != self.primary {
                    return out;
                }
                if Some(link) == self.primary {
                    // The primary lost its backup: it goes on alone at a new epoch, so the lost
                    // backup can never be promoted.
                    if let Some(b) = self.backup {
                        self.drop_backup(b, "primary lost its backup", &mut out);
                    } else {
                        // Already without a backup: re-grant at the current epoch.
                        if let Some(p) = self.primary {
                            out.push(Action::Grant {
                                link: p,
                                epoch: self.epoch,
                            });
                        }
                    }
                } else if Some(link) == self.backup {
                    // The backup lost its primary. It may simply notice a dead primary before we
                    // do, so nothing is decided here: if the primary is dead its heartbeats lapse
                    // (Tick promotes); if it is alive, it loses the backup too and says so.
                    out.push(Action::Notify {
                        kind: "backup-suspects-primary",
                        detail: "backup reports it lost the primary; waiting for the heartbeat window to decide".into(),
                    });
                }
            }
            Input::LinkDown { link } => {
                if Some(link) == self.primary {
                    self.primary_failed(link, "connection to the primary closed", &mut out);
                } else if Some(link) == self.backup {
                    self.drop_backup(link, "connection to the backup closed", &mut out);
                } else {
                    self.members.remove(&link);
                }
            }
            Input::Tick => {
                // If we ourselves were not running (paused, starved of CPU) for a good part of the
                // window, silence is our fault, not theirs: start the window again.
                let stalled = self
                    .last_tick
                    .is_some_and(|t| now.saturating_duration_since(t) > self.heartbeat_timeout / 2);
                self.last_tick = Some(now);
                if stalled {
                    for m in self.members.values_mut() {
                        m.last_heard = now;
                    }
                    return out;
                }
                let primary_lapsed = self.primary.is_some_and(|p| !self.heard_recently(p, now));
                let backup_lapsed = self.backup.is_some_and(|b| !self.heard_recently(b, now));
                if primary_lapsed && backup_lapsed {
                    // Both silent at once: more likely our own network than two failures. Wait;
                    // requests time out meanwhile, and the link-down path handles real deaths.
                    return out;
                }
                if primary_lapsed && let Some(p) = self.primary {
                    self.primary_failed(p, "primary heartbeats lapsed", &mut out);
                }
                if backup_lapsed && let Some(b) = self.backup {
                    self.drop_backup(b, "backup heartbeats lapsed", &mut out);
                }
            }
        }
        out
    }

    fn heard_recently(&self, link: LinkId, now: Instant) -> bool {
        self.members
            .get(&link)
            .is_some_and(|m| now.saturating_duration_since(m.last_heard) < self.heartbeat_timeout)
    }

    #[allow(clippy::too_many_arguments)]
    fn hello(
        &mut self,
        now: Instant,
        link: LinkId,
        role: Role,
        epoch: u64,
        info: ReplicaInfo,
        primary_of_backup: Option<String>,
        out: &mut Vec<Action>,
    ) {
        match role {
            Role::Primary => {
                // epoch 0 = a freshly started server (e.g. an operator restarting the service from
                // its save file); a server with an older non-zero epoch was deposed.
                if self.primary.is_some() || (epoch != 0 && epoch < self.office_epoch) {
                    // A deposed primary coming back, or a second primary: refuse it.
                    out.push(Action::Fence {
                        link,
                        epoch: self.epoch,
                    });
                    out.push(Action::Notify {
                        kind: "primary-refused",
                        detail: format!(
                            "refused server {} claiming primary at epoch {epoch} (current epoch {})",
                            info.handle, self.epoch
                        ),
                    });
                    return;
                }
                self.epoch = self.epoch.max(epoch).max(1);
                self.office_epoch = self.epoch;
                self.members.insert(link, Member::new(info.clone(), now));
                self.primary = Some(link);
                out.push(Action::Welcome {
                    link,
                    role: Role::Primary,
                    epoch: self.epoch,
                });
                out.push(Action::RouteTo {
                    link,
                    epoch: self.epoch,
                });
                out.push(Action::Notify {
                    kind: "primary-registered",
                    detail: format!(
                        "primary {} at {} (epoch {})",
                        info.handle, info.sap, self.epoch
                    ),
                });
            }
            Role::Backup => {
                let stale_backup = self.backup.filter(|b| !self.heard_recently(*b, now));
                if let Some(b) = stale_backup {
                    self.drop_backup(b, "backup replaced by a new one", out);
                }
                // A backup belongs to the primary that started it: one started by a deposed
                // primary (which may not know yet) must not become the current primary's backup.
                let current = self.primary.and_then(|p| self.members.get(&p));
                let ours = match (&primary_of_backup, current) {
                    (Some(h), Some(m)) => *h == m.info.handle || *h == m.info.sap,
                    (None, Some(_)) => true,
                    (_, None) => false,
                };
                if !ours || self.backup.is_some() || (epoch != 0 && epoch < self.epoch) {
                    let detail = format!(
                        "refused backup {} (its primary: {}; current primary: {})",
                        info.handle,
                        primary_of_backup.as_deref().unwrap_or("?"),
                        current.map(|m| m.info.handle.as_str()).unwrap_or("none")
                    );
                    out.push(Action::Fence {
                        link,
                        epoch: self.epoch,
                    });
                    out.push(Action::Notify {
                        kind: "backup-refused",
                        detail,
                    });
                    return;
                }
                self.members.insert(link, Member::new(info.clone(), now));
                self.backup = Some(link);
                self.backup_synced = false;
                out.push(Action::Welcome {
                    link,
                    role: Role::Backup,
                    epoch: self.epoch,
                });
                out.push(Action::Notify {
                    kind: "backup-registered",
                    detail: format!(
                        "backup {} at {} (epoch {})",
                        info.handle, info.sap, self.epoch
                    ),
                });
            }
        }
    }

    fn drop_backup(&mut self, b: LinkId, why: &str, out: &mut Vec<Action>) {
        self.backup = None;
        self.backup_synced = false;
        let handle = self
            .members
            .remove(&b)
            .map(|m| m.info.handle)
            .unwrap_or_default();
        self.epoch += 1;
        out.push(Action::Fence {
            link: b,
            epoch: self.epoch,
        });
        if let Some(p) = self.primary {
            out.push(Action::Grant {
                link: p,
                epoch: self.epoch,
            });
        }
        out.push(Action::Notify {
            kind: "backup-lost",
            detail: format!(
                "{why}: backup {handle} dropped; primary goes on alone at epoch {}",
                self.epoch
            ),
        });
    }

    fn primary_failed(&mut self, p: LinkId, why: &str, out: &mut Vec<Action>) {
        let handle = self
            .members
            .remove(&p)
            .map(|m| m.info.handle)
            .unwrap_or_default();
        self.primary = None;
        out.push(Action::Fence {
            link: p,
            epoch: self.epoch + 1,
        });
        match self.backup.take() {
            Some(b) if self.backup_synced => {
                self.epoch += 1;
                self.backup_synced = false;
                self.primary = Some(b);
                self.office_epoch = self.epoch;
                out.push(Action::Grant {
                    link: b,
                    epoch: self.epoch,
                });
                out.push(Action::RouteTo {
                    link: b,
                    epoch: self.epoch,
                });
                out.push(Action::Notify {
                    kind: "failover",
                    detail: format!(
                        "{why}: primary {handle} failed; backup {} promoted at epoch {}",
                        self.members
                            .get(&b)
                            .map(|m| m.info.handle.as_str())
                            .unwrap_or(""),
                        self.epoch
                    ),
                });
            }
            other => {
                if let Some(b) = other {
                    // A backup that was still synchronising holds an incomplete copy: it cannot
                    // take over (a second failure); it is dropped.
                    self.members.remove(&b);
                    out.push(Action::Fence {
                        link: b,
                        epoch: self.epoch + 1,
                    });
                    self.epoch += 1;
                }
                // Nobody was promoted: the failed primary still holds the only full copy and may
                // come back (e.g. after a link cut) at its epoch.
                out.push(Action::NoPrimary);
                out.push(Action::Notify {
                    kind: "primary-lost",
                    detail: format!("{why}: primary {handle} failed and no synchronised backup can take over; waiting for a primary"),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_millis(300);

    fn info(n: &str) -> ReplicaInfo {
        ReplicaInfo {
            handle: n.into(),
            sap: format!("127.0.0.1:{n}"),
            pid: 1,
        }
    }

    struct Fx {
        w: Witness,
        t0: Instant,
    }

    impl Fx {
        fn new() -> Fx {
            Fx {
                w: Witness::new(HB),
                t0: Instant::now(),
            }
        }
        /// A heartbeat built with `hb` echoes every ack sent so far (a healthy two-way link).
        fn at(&mut self, ms: u64, i: Input) -> Vec<Action> {
            let i = match i {
                Input::Heartbeat {
                    link,
                    epoch,
                    backup_synced,
                    echo: 0,
                } => Input::Heartbeat {
                    link,
                    epoch,
                    backup_synced,
                    echo: self.w.members.get(&link).map_or(0, |m| m.acks_sent),
                },
                other => other,
            };
            self.w.step(self.t0 + Duration::from_millis(ms), i)
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
            backup_synced: synced,
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
                    backup_synced: true,
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
        assert!(has(&a, |x| matches!(x, Action::Fence { link: 1, .. })));
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
    fn has(actions: &[Action], pred: impl Fn(&Action) -> bool) -> bool {
        actions.iter().any(pred)
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
        assert!(has(&a, |x| matches!(x, Action::Fence { link: 1, .. })));
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
        // Old primary comes back over a new connection claiming primary at epoch 1.
        let a = f.at(500, hello(3, Role::Primary, 1));
        assert!(has(&a, |x| matches!(x, Action::Fence { link: 3, .. })));
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
        assert!(has(&a, |x| matches!(x, Action::Fence { link: 2, .. })));
        assert!(has(&a, |x| *x == Action::Grant { link: 1, epoch: 2 }));
        assert_eq!(f.w.backup(), None);
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
        assert!(has(&a, |x| matches!(x, Action::Fence { link: 2, .. })));
        assert!(has(&a, |x| *x == Action::Grant { link: 1, epoch: 2 }));
    }

    #[test]
    fn proxy_backup_cut_replaces_backup() {
        let mut f = Fx::pair();
        f.at(250, hb(1, 1, true));
        let a = f.at(320, Input::Tick);
        assert!(has(&a, |x| matches!(x, Action::Fence { link: 2, .. })));
        assert!(has(&a, |x| *x == Action::Grant { link: 1, epoch: 2 }));
        assert_eq!(f.w.primary(), Some(1));
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
        let a = f.at(5, Input::LinkDown { link: 1 });
        assert!(has(&a, |x| *x == Action::NoPrimary));
        // The same primary reconnecting (a cut link healed) is accepted back: nobody replaced it.
        let a = f.at(10, hello(2, Role::Primary, 1));
        assert!(has(&a, |x| matches!(x, Action::RouteTo { link: 2, .. })));
        assert_eq!(f.w.epoch(), 1);
    }
}
