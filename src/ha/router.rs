//! The proxy's request table, sans-IO: request ids, the pending table, routing to the primary the
//! witness chose, re-sending after a failover, and the choice between `unknown` and
//! `unavailable` when a request cannot be answered. It wraps the [`Witness`], so one proxy is one
//! state machine: inputs (client requests, replica replies, witness inputs, ticks) in, actions out.
//!
//! Request ids carry the proxy's *incarnation* in their top bits. A restarted proxy starts a new
//! incarnation (persisted, see `Durable` and the executor), so it never reuses an id that a
//! replica's dedupe table may still remember from its previous life; the first watermark of the
//! new incarnation trims every older entry.

use std::collections::{BTreeMap, BTreeSet};

use super::Millis;
use super::witness::{self, LinkId, Witness};

/// Bits of a request id that count requests within one incarnation (2^40: over a month at
/// 300k requests/s); the incarnation takes the bits above.
pub const RID_COUNTER_BITS: u32 = 40;
/// Incarnations wrap after this many proxy starts (2^24).
pub const INCARNATION_MASK: u64 = (1 << (64 - RID_COUNTER_BITS)) - 1;

/// How a request ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome<R> {
    Reply(R),
    /// It was sent to a replica that may have applied it, and no answer came.
    Unknown,
    /// No replica could take it; it was not applied.
    Unavailable,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input<P, R> {
    /// A client request; `write` says whether it changes the space, `wait` how long it may wait
    /// for a match at the primary (PROTOCOL.md §4a; 0 for most), which its deadline adds to the
    /// request timeout.
    Request {
        payload: P,
        write: bool,
        wait: Millis,
    },
    /// Answers that arrived on `link`'s relay stream.
    Replies {
        link: LinkId,
        replies: Vec<(u64, R)>,
    },
    /// `link`'s relay stream is open: requests can be sent on it.
    RelayReady {
        link: LinkId,
    },
    Witness(witness::Input),
    Tick,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action<P, R> {
    Witness(witness::Action),
    /// Send request `rid` (its payload: [`Router::payload`]) on `link`'s relay stream.
    Forward {
        link: LinkId,
        rid: u64,
    },
    /// Answer the client.
    Answer {
        payload: P,
        outcome: Outcome<R>,
    },
    /// Every rid below `rid` has been answered: the replicas may forget them.
    Watermark {
        link: LinkId,
        rid: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Pending<P> {
    payload: P,
    write: bool,
    deadline: Millis,
    /// The link it was last sent to (None: waiting for a primary).
    sent_to: Option<LinkId>,
    /// Ever sent to some replica (a write that was may have been applied).
    sent: bool,
}

/// The router state machine (one per proxy).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Router<P, R> {
    witness: Witness,
    incarnation: u64,
    next: u64,
    /// Boxed: the map moves its entries about as it grows and shrinks; a request's payload is
    /// large, its box is not.
    pending: BTreeMap<u64, Box<Pending<P>>>,
    /// Deadlines of pending requests (not in rid order: some may wait for a match).
    deadlines: BTreeSet<(Millis, u64)>,
    route: Option<LinkId>,
    ready: BTreeSet<LinkId>,
    request_timeout: Millis,
    _reply: std::marker::PhantomData<R>,
}

impl<P: Clone, R> Router<P, R> {
    pub fn new(witness: Witness, incarnation: u64, request_timeout: Millis) -> Self {
        Router {
            witness,
            incarnation: incarnation & INCARNATION_MASK,
            next: 0,
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            route: None,
            ready: BTreeSet::new(),
            request_timeout,
            _reply: std::marker::PhantomData,
        }
    }

    pub fn witness(&self) -> &Witness {
        &self.witness
    }
    pub fn witness_mut(&mut self) -> &mut Witness {
        &mut self.witness
    }
    pub fn route(&self) -> Option<LinkId> {
        self.route
    }
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
    /// The payload of a pending request (to serialise a `Forward`).
    pub fn payload(&self, rid: u64) -> Option<&P> {
        self.pending.get(&rid).map(|p| &p.payload)
    }

    fn next_rid(&self) -> u64 {
        (self.incarnation << RID_COUNTER_BITS) | self.next
    }

    /// Feeds one input observed at `now`; appends what the proxy must do, in order.
    pub fn step(&mut self, now: Millis, input: Input<P, R>, out: &mut Vec<Action<P, R>>) {
        match input {
            Input::Request {
                payload,
                write,
                wait,
            } => {
                let rid = self.next_rid();
                self.next += 1;
                let deadline = now + self.request_timeout + wait;
                self.deadlines.insert((deadline, rid));
                let mut p = Pending {
                    payload,
                    write,
                    deadline,
                    sent_to: None,
                    sent: false,
                };
                if let Some(link) = self.live_route() {
                    p.sent_to = Some(link);
                    p.sent = true;
                    out.push(Action::Forward { link, rid });
                }
                self.pending.insert(rid, Box::new(p));
            }
            Input::Replies { link, replies } => {
                if self.route != Some(link) {
                    // A deposed or replaced link's late answers: the requests were re-sent.
                    return;
                }
                if self.witness.awaits_confirmation() {
                    // The first answer from the primary after a promotion or a dropped backup
                    // confirms that it serves at the new epoch; that must be on disk before any
                    // of its answers is passed on.
                    let actions = self.witness.step(now, witness::Input::Answered { link });
                    self.witness_actions(actions, out);
                }
                for (rid, r) in replies {
                    if let Some(p) = self.pending.remove(&rid) {
                        self.deadlines.remove(&(p.deadline, rid));
                        out.push(Action::Answer {
                            payload: p.payload,
                            outcome: Outcome::Reply(r),
                        });
                    }
                }
            }
            Input::RelayReady { link } => {
                self.ready.insert(link);
                if self.route == Some(link) {
                    self.resend_all(out);
                }
            }
            Input::Witness(i) => {
                if let witness::Input::LinkDown { link } = i {
                    self.ready.remove(&link);
                    if self.route == Some(link) {
                        // Requests wait for the witness to route again (the same replica on a new
                        // link, or a promoted backup).
                        self.unroute();
                    }
                }
                let actions = self.witness.step(now, i);
                self.witness_actions(actions, out);
            }
            Input::Tick => {
                let actions = self.witness.step(now, witness::Input::Tick);
                self.witness_actions(actions, out);
                self.expire(now, out);
                if let Some(link) = self.live_route() {
                    let rid = self
                        .pending
                        .keys()
                        .next()
                        .copied()
                        .unwrap_or_else(|| self.next_rid());
                    out.push(Action::Watermark { link, rid });
                }
            }
        }
    }

    fn live_route(&self) -> Option<LinkId> {
        self.route.filter(|l| self.ready.contains(l))
    }

    fn unroute(&mut self) {
        self.route = None;
        for p in self.pending.values_mut() {
            p.sent_to = None;
        }
    }

    fn witness_actions(&mut self, actions: Vec<witness::Action>, out: &mut Vec<Action<P, R>>) {
        for a in actions {
            match &a {
                witness::Action::RouteTo { link, .. } => {
                    let link = *link;
                    out.push(Action::Witness(a));
                    self.route = Some(link);
                    self.resend_all(out);
                    continue;
                }
                witness::Action::NoPrimary => self.unroute(),
                witness::Action::Fence { link, .. } | witness::Action::Drop { link } => {
                    self.ready.remove(link);
                    if self.route == Some(*link) {
                        self.unroute();
                    }
                }
                _ => {}
            }
            out.push(Action::Witness(a));
        }
    }

    /// Sends every pending request not yet on the current route (after a failover or a
    /// reconnection: the replica answers already-applied ones from its dedupe table).
    fn resend_all(&mut self, out: &mut Vec<Action<P, R>>) {
        let Some(link) = self.live_route() else {
            return;
        };
        for (rid, p) in self.pending.iter_mut() {
            if p.sent_to != Some(link) {
                p.sent_to = Some(link);
                p.sent = true;
                out.push(Action::Forward { link, rid: *rid });
            }
        }
    }

    fn expire(&mut self, now: Millis, out: &mut Vec<Action<P, R>>) {
        while let Some(&(deadline, rid)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(p) = self.pending.remove(&rid) {
                Self::expired(*p, out);
            }
        }
    }

    fn expired(p: Pending<P>, out: &mut Vec<Action<P, R>>) {
        let outcome = if p.sent && p.write {
            Outcome::Unknown
        } else {
            Outcome::Unavailable
        };
        out.push(Action::Answer {
            payload: p.payload,
            outcome,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::node::{ReplicaInfo, Role};

    type R = Router<u32, &'static str>;

    fn hello(link: LinkId, role: Role) -> Input<u32, &'static str> {
        Input::Witness(witness::Input::Hello {
            link,
            role,
            epoch: 0,
            info: ReplicaInfo {
                handle: link.to_string(),
                sap: format!("sap{link}"),
                pid: link as u32,
            },
            primary: None,
        })
    }

    fn run(r: &mut R, now: Millis, i: Input<u32, &'static str>) -> Vec<Action<u32, &'static str>> {
        let mut out = vec![];
        r.step(now, i, &mut out);
        out
    }

    fn forwards(a: &[Action<u32, &'static str>]) -> Vec<(LinkId, u64)> {
        a.iter()
            .filter_map(|x| match x {
                Action::Forward { link, rid } => Some((*link, *rid)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn rids_carry_the_incarnation_and_never_repeat_across_restarts() {
        let mut a = R::new(Witness::new(300), 7, 1000);
        let mut b = R::new(Witness::new(300), 8, 1000);
        run(&mut a, 0, hello(1, Role::Primary));
        run(&mut a, 0, Input::RelayReady { link: 1 });
        run(&mut b, 0, hello(1, Role::Primary));
        run(&mut b, 0, Input::RelayReady { link: 1 });
        let ra = forwards(&run(
            &mut a,
            1,
            Input::Request {
                payload: 1,
                write: true,
                wait: 0,
            },
        ));
        let rb = forwards(&run(
            &mut b,
            1,
            Input::Request {
                payload: 1,
                write: true,
                wait: 0,
            },
        ));
        assert_eq!(ra[0].1 >> RID_COUNTER_BITS, 7);
        assert_eq!(rb[0].1 >> RID_COUNTER_BITS, 8);
        assert!(
            rb[0].1 > ra[0].1,
            "a later incarnation's rids are above every earlier one"
        );
    }

    #[test]
    fn requests_wait_for_a_primary_then_go_out_in_order() {
        let mut r = R::new(Witness::new(300), 1, 1000);
        run(
            &mut r,
            0,
            Input::Request {
                payload: 1,
                write: true,
                wait: 0,
            },
        );
        run(
            &mut r,
            0,
            Input::Request {
                payload: 2,
                write: false,
                wait: 0,
            },
        );
        run(&mut r, 1, hello(1, Role::Primary));
        let a = run(&mut r, 2, Input::RelayReady { link: 1 });
        let f = forwards(&a);
        assert_eq!(f.len(), 2);
        assert!(f[0].1 < f[1].1);
        assert_eq!(r.payload(f[0].1), Some(&1));
        let a = run(
            &mut r,
            3,
            Input::Replies {
                link: 1,
                replies: vec![(f[1].1, "b"), (f[0].1, "a")],
            },
        );
        assert_eq!(
            a,
            vec![
                Action::Answer {
                    payload: 2,
                    outcome: Outcome::Reply("b")
                },
                Action::Answer {
                    payload: 1,
                    outcome: Outcome::Reply("a")
                },
            ]
        );
        assert_eq!(r.pending_len(), 0);
    }

    #[test]
    fn a_waiting_request_gets_its_wait_on_top_of_the_timeout_and_holds_up_no_other() {
        let mut r = R::new(Witness::new(300), 1, 1000);
        run(&mut r, 0, hello(1, Role::Primary));
        run(&mut r, 0, Input::RelayReady { link: 1 });
        let req = |payload, wait| Input::Request {
            payload,
            write: true,
            wait,
        };
        run(&mut r, 0, req(1, 5000));
        run(&mut r, 10, req(2, 0));
        let answered = |a: Vec<Action<u32, &'static str>>| -> Vec<u32> {
            a.iter()
                .filter_map(|x| match x {
                    Action::Answer { payload, .. } => Some(*payload),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(answered(run(&mut r, 1010, Input::Tick)), vec![2]);
        assert_eq!(answered(run(&mut r, 5999, Input::Tick)), Vec::<u32>::new());
        assert_eq!(answered(run(&mut r, 6000, Input::Tick)), vec![1]);
        assert_eq!(r.pending_len(), 0);
        assert!(r.deadlines.is_empty());
    }

    #[test]
    fn unanswered_writes_that_were_sent_are_unknown_the_rest_unavailable() {
        let mut r = R::new(Witness::new(300), 1, 1000);
        run(
            &mut r,
            0,
            Input::Request {
                payload: 1,
                write: true,
                wait: 0,
            },
        ); // never sent
        run(&mut r, 0, hello(1, Role::Primary));
        run(&mut r, 0, Input::RelayReady { link: 1 });
        run(
            &mut r,
            10,
            Input::Request {
                payload: 2,
                write: true,
                wait: 0,
            },
        ); // sent
        run(
            &mut r,
            10,
            Input::Request {
                payload: 3,
                write: false,
                wait: 0,
            },
        ); // sent, a read
        let a = run(&mut r, 2000, Input::Tick);
        let outcomes: Vec<_> = a
            .iter()
            .filter_map(|x| match x {
                Action::Answer { payload, outcome } => Some((*payload, outcome.clone())),
                _ => None,
            })
            .collect();
        // Request 1 was re-sent when the primary came: it was sent, so unknown too.
        assert_eq!(
            outcomes,
            vec![
                (1, Outcome::Unknown),
                (2, Outcome::Unknown),
                (3, Outcome::Unavailable)
            ]
        );
    }

    #[test]
    fn a_reconnecting_primary_gets_every_pending_request_again() {
        let mut r = R::new(Witness::new(300), 1, 10_000);
        run(&mut r, 0, hello(1, Role::Primary));
        run(&mut r, 0, Input::RelayReady { link: 1 });
        let f = forwards(&run(
            &mut r,
            1,
            Input::Request {
                payload: 1,
                write: true,
                wait: 0,
            },
        ));
        run(
            &mut r,
            5,
            Input::Witness(witness::Input::LinkDown { link: 1 }),
        );
        // Same replica (handle "1") on a new link 5.
        let mut i = hello(5, Role::Primary);
        if let Input::Witness(witness::Input::Hello { info, epoch, .. }) = &mut i {
            info.handle = "1".into();
            *epoch = 1;
        }
        let a = run(&mut r, 6, i);
        assert!(
            a.contains(&Action::Witness(witness::Action::Drop { link: 1 })),
            "{a:?}"
        );
        let a = run(&mut r, 7, Input::RelayReady { link: 5 });
        assert_eq!(forwards(&a), vec![(5, f[0].1)]);
        // Late answers on the old link are ignored; the new link's are taken.
        assert!(
            run(
                &mut r,
                8,
                Input::Replies {
                    link: 1,
                    replies: vec![(f[0].1, "old")]
                }
            )
            .is_empty()
        );
        let a = run(
            &mut r,
            9,
            Input::Replies {
                link: 5,
                replies: vec![(f[0].1, "new")],
            },
        );
        assert_eq!(
            a,
            vec![Action::Answer {
                payload: 1,
                outcome: Outcome::Reply("new")
            }]
        );
    }
}
