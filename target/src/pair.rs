//! The decisions of an active/standby pair of nodes serving one volume (`docs/pair.md`): a
//! state machine fed with what the membership store (etcd) and the data path report, which
//! answers with the actions to take, in order. It holds no connection and reads no clock of
//! its own, so every rule — the partition case above all — is tested as a table.
//!
//! The rules:
//! - The node holding the volume's key (created under its lease) is the only one that may
//!   acknowledge writes; the key's revision is the fencing epoch.
//! - The active node stops acknowledging writes, and goes inaccessible, once its lease *may*
//!   have expired at the store: at `sent + ttl - margin`, where `sent` is when the last
//!   answered keep-alive was sent (the store refreshed the lease no earlier than that, so it
//!   cannot expire it before `sent + ttl`). A node cut off from the store therefore fences
//!   itself before the standby can take the key.
//! - The standby campaigns only when the key is gone (the old lease expired or was revoked),
//!   and before it acknowledges anything it fences the old active's access to the legs
//!   (reservation preempt-and-abort under the new epoch), bumps the epoch in the superblocks
//!   and sets its listener optimized.
//! - A Reservation Conflict on a write, the key seen under another holder, or the lease
//!   reported gone fence an active node at once.
//! - A fenced node stays fenced until it is restarted (and then starts as a standby).

use std::time::{Duration, Instant};

/// Where this node stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serves nothing (its listener inaccessible); watches the key.
    Standby,
    /// Trying to create the key under its own lease.
    Campaigning,
    /// Holds the key (epoch = its revision); fencing the old active and bumping the epoch.
    Promoting { epoch: u64 },
    /// Holds the key and serves (listener optimized).
    Active { epoch: u64 },
    /// Handing the volume over (failback): stopped acknowledging, giving up the key.
    Resigning,
    /// Must not serve until restarted.
    Fenced { why: String },
}

/// What the store or the data path reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key as the watch sees it: its holder (`None`: nobody) and revision.
    Key {
        holder: Option<String>,
        revision: u64,
    },
    /// The campaign created the key at `revision`; the lease was granted by a request sent
    /// at `sent`.
    Won { revision: u64, sent: Instant },
    /// The campaign found the key held by `holder`.
    Lost { holder: String },
    /// A keep-alive sent at `sent` was answered: the lease holds until at least
    /// `sent + ttl` at the store.
    KeepAliveOk { sent: Instant },
    /// The store says the lease no longer exists (expired or revoked).
    LeaseGone,
    /// The promotion's steps all succeeded.
    PromoteDone,
    /// A promotion step failed.
    PromoteFailed { why: String },
    /// A write to a leg got Reservation Conflict: a newer epoch holds the legs.
    ReservationConflict,
    /// The operator hands the volume to the peer (failback).
    Resign,
    /// The key has been deleted after a resignation.
    Resigned,
}

/// What to do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Stop acknowledging writes at once (the volume's fence) and set the listener
    /// inaccessible.
    Fence { why: String },
    /// Create the key under this node's lease if nobody holds it.
    Campaign,
    /// Preempt-and-abort the old holder's reservations with the key of `epoch`, write
    /// `epoch` to the superblocks, then report `PromoteDone` or `PromoteFailed`.
    Promote { epoch: u64 },
    /// Set the listener ANA-optimized: hosts send I/O here.
    SetOptimized,
    /// Revoke this node's lease (which deletes the key).
    Revoke,
}

/// The pair controller of one node for one volume.
#[derive(Debug)]
pub struct PairController {
    node: String,
    ttl: Duration,
    margin: Duration,
    role: Role,
    /// Until when the lease surely holds at the store (by this node's clock), less the
    /// margin; the active node fences itself when it passes.
    lease_until: Option<Instant>,
}

impl PairController {
    /// A node named `node` with leases of `ttl`, fencing itself `margin` before the lease
    /// could expire (`margin` covers clock-rate differences and the time to stop the data
    /// path). Starts as a standby.
    pub fn new(node: impl Into<String>, ttl: Duration, margin: Duration) -> Self {
        Self {
            node: node.into(),
            ttl,
            margin: margin.min(ttl),
            role: Role::Standby,
            lease_until: None,
        }
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    /// Until when the lease surely holds (less the margin), while this node holds it.
    pub fn lease_until(&self) -> Option<Instant> {
        self.lease_until
    }

    fn fence(&mut self, why: impl Into<String>) -> Vec<Action> {
        let why = why.into();
        let revoke = matches!(
            self.role,
            Role::Promoting { .. } | Role::Active { .. } | Role::Resigning
        );
        self.role = Role::Fenced { why: why.clone() };
        self.lease_until = None;
        let mut out = vec![Action::Fence { why }];
        if revoke {
            out.push(Action::Revoke);
        }
        out
    }

    fn extend_lease(&mut self, sent: Instant) {
        let until = sent + self.ttl - self.margin;
        self.lease_until = Some(self.lease_until.map_or(until, |u| u.max(until)));
    }

    /// Feeds one event; the actions to take, in order.
    pub fn on(&mut self, ev: Event, now: Instant) -> Vec<Action> {
        if matches!(self.role, Role::Fenced { .. }) {
            return Vec::new();
        }
        // A lease past its time fences first, whatever the event says.
        let mut out = self.tick(now);
        if matches!(self.role, Role::Fenced { .. }) {
            return out;
        }
        let holds = matches!(self.role, Role::Promoting { .. } | Role::Active { .. });
        match (ev, &self.role) {
            (Event::ReservationConflict, _) if holds => {
                out.extend(
                    self.fence("a leg answered Reservation Conflict: a newer epoch holds it"),
                );
            }
            (Event::ReservationConflict, _) => {}
            (Event::LeaseGone, _) if holds || self.role == Role::Resigning => {
                out.extend(self.fence("the lease is gone at the store"));
            }
            (Event::LeaseGone, _) => {}
            (Event::Key { holder: None, .. }, Role::Standby) => {
                self.role = Role::Campaigning;
                out.push(Action::Campaign);
            }
            (
                Event::Key {
                    holder: Some(h), ..
                },
                _,
            ) if holds && h != self.node => {
                out.extend(self.fence(format!("the key is held by {h}")));
            }
            (Event::Key { holder: None, .. }, _) if holds => {
                out.extend(self.fence("the key is gone"));
            }
            (Event::Key { .. }, _) => {}
            (Event::Won { revision, sent }, Role::Campaigning) => {
                self.extend_lease(sent);
                self.role = Role::Promoting { epoch: revision };
                out.push(Action::Promote { epoch: revision });
            }
            (Event::Won { .. }, _) => {}
            (Event::Lost { .. }, Role::Campaigning) => self.role = Role::Standby,
            (Event::Lost { .. }, _) => {}
            (Event::KeepAliveOk { sent }, _) if holds || self.role == Role::Resigning => {
                self.extend_lease(sent);
            }
            (Event::KeepAliveOk { .. }, _) => {}
            (Event::PromoteDone, Role::Promoting { epoch }) => {
                self.role = Role::Active { epoch: *epoch };
                out.push(Action::SetOptimized);
            }
            (Event::PromoteDone, _) => {}
            (Event::PromoteFailed { why }, Role::Promoting { .. }) => {
                out.extend(self.fence(format!("the promotion failed: {why}")));
            }
            (Event::PromoteFailed { .. }, _) => {}
            (Event::Resign, Role::Active { .. }) => {
                self.role = Role::Resigning;
                out.push(Action::Fence {
                    why: "handing the volume to the peer".into(),
                });
                out.push(Action::Revoke);
            }
            (Event::Resign, _) => {}
            (Event::Resigned, Role::Resigning) => {
                self.role = Role::Standby;
                self.lease_until = None;
            }
            (Event::Resigned, _) => {}
        }
        out
    }

    /// The clock moved to `now`: a node holding the key whose lease may have expired at the
    /// store fences itself.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let holds = matches!(self.role, Role::Promoting { .. } | Role::Active { .. });
        match self.lease_until {
            Some(until) if holds && now >= until => self
                .fence("the lease may have expired at the store (no keep-alive answered in time)"),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);
    const MARGIN: Duration = Duration::from_secs(2);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn fenced(a: &[Action]) -> bool {
        matches!(a.first(), Some(Action::Fence { .. }))
    }

    /// A standby that has won the key at `t0` and finished its promotion.
    fn active(t0: Instant) -> PairController {
        let mut p = PairController::new("b", TTL, MARGIN);
        p.on(
            Event::Key {
                holder: None,
                revision: 7,
            },
            t0,
        );
        p.on(
            Event::Won {
                revision: 8,
                sent: t0,
            },
            t0,
        );
        assert_eq!(p.on(Event::PromoteDone, t0), [Action::SetOptimized]);
        assert_eq!(p.role(), &Role::Active { epoch: 8 });
        p
    }

    #[test]
    fn events_and_actions_follow_the_table() {
        let t0 = Instant::now();
        // (role set up by `setup`, event, expected actions, expected role)
        type Setup = fn(Instant) -> PairController;
        fn standby(_: Instant) -> PairController {
            PairController::new("b", TTL, MARGIN)
        }
        fn campaigning(t: Instant) -> PairController {
            let mut p = standby(t);
            p.on(
                Event::Key {
                    holder: None,
                    revision: 1,
                },
                t,
            );
            p
        }
        fn promoting(t: Instant) -> PairController {
            let mut p = campaigning(t);
            p.on(
                Event::Won {
                    revision: 9,
                    sent: t,
                },
                t,
            );
            p
        }
        let (standby, campaigning, promoting): (Setup, Setup, Setup) =
            (standby, campaigning, promoting);
        let act: Setup = active;
        let cases: Vec<(Setup, Event, Vec<&str>, &str)> = vec![
            (
                standby,
                Event::Key {
                    holder: Some("a".into()),
                    revision: 3,
                },
                vec![],
                "standby",
            ),
            (
                standby,
                Event::Key {
                    holder: None,
                    revision: 3,
                },
                vec!["campaign"],
                "campaigning",
            ),
            (standby, Event::ReservationConflict, vec![], "standby"),
            (standby, Event::LeaseGone, vec![], "standby"),
            (standby, Event::Resign, vec![], "standby"),
            (
                campaigning,
                Event::Lost { holder: "a".into() },
                vec![],
                "standby",
            ),
            (
                campaigning,
                Event::Won {
                    revision: 9,
                    sent: t0,
                },
                vec!["promote 9"],
                "promoting",
            ),
            (promoting, Event::PromoteDone, vec!["optimized"], "active"),
            (
                promoting,
                Event::PromoteFailed { why: "x".into() },
                vec!["fence", "revoke"],
                "fenced",
            ),
            (
                promoting,
                Event::ReservationConflict,
                vec!["fence", "revoke"],
                "fenced",
            ),
            (
                act,
                Event::ReservationConflict,
                vec!["fence", "revoke"],
                "fenced",
            ),
            (act, Event::LeaseGone, vec!["fence", "revoke"], "fenced"),
            (
                act,
                Event::Key {
                    holder: Some("a".into()),
                    revision: 20,
                },
                vec!["fence", "revoke"],
                "fenced",
            ),
            (
                act,
                Event::Key {
                    holder: None,
                    revision: 20,
                },
                vec!["fence", "revoke"],
                "fenced",
            ),
            (
                act,
                Event::Key {
                    holder: Some("b".into()),
                    revision: 8,
                },
                vec![],
                "active",
            ),
            (act, Event::KeepAliveOk { sent: t0 }, vec![], "active"),
            (act, Event::Resign, vec!["fence", "revoke"], "resigning"),
        ];
        for (i, (setup, ev, want, role)) in cases.into_iter().enumerate() {
            let mut p = setup(t0);
            let got: Vec<String> = p
                .on(ev.clone(), t0)
                .iter()
                .map(|a| match a {
                    Action::Fence { .. } => "fence".to_string(),
                    Action::Campaign => "campaign".into(),
                    Action::Promote { epoch } => format!("promote {epoch}"),
                    Action::SetOptimized => "optimized".into(),
                    Action::Revoke => "revoke".into(),
                })
                .collect();
            assert_eq!(got, want, "case {i}: {ev:?}");
            let r = match p.role() {
                Role::Standby => "standby",
                Role::Campaigning => "campaigning",
                Role::Promoting { .. } => "promoting",
                Role::Active { .. } => "active",
                Role::Resigning => "resigning",
                Role::Fenced { .. } => "fenced",
            };
            assert_eq!(r, role, "case {i}: {ev:?}");
        }
    }

    #[test]
    fn an_active_node_cut_off_from_the_store_fences_itself_before_the_lease_can_expire() {
        let t0 = Instant::now();
        let mut a = active(t0);
        // Keep-alives sent at 3 s and 6 s are answered (late: at 5 s and 9 s).
        a.on(Event::KeepAliveOk { sent: t0 + s(3) }, t0 + s(5));
        a.on(Event::KeepAliveOk { sent: t0 + s(6) }, t0 + s(9));
        // The lease is refreshed no earlier than 6 s at the store, so it cannot expire there
        // before 16 s; the node stops at 14 s (16 s less the margin), measured from the send.
        assert_eq!(a.lease_until(), Some(t0 + s(14)));
        // Then the partition: no more answers.
        assert!(a.tick(t0 + s(13)).is_empty());
        assert_eq!(a.role(), &Role::Active { epoch: 8 });
        let acts = a.tick(t0 + s(14));
        assert!(fenced(&acts), "{acts:?}");
        assert!(matches!(a.role(), Role::Fenced { .. }));
        // The standby sees the key gone only after the store expires it, at 16 s or later:
        // by then the old active has stopped (no two writers, ever).
        let mut b = PairController::new("b2", TTL, MARGIN);
        assert_eq!(
            b.on(
                Event::Key {
                    holder: None,
                    revision: 30
                },
                t0 + s(16)
            ),
            [Action::Campaign]
        );
        // A late answer cannot bring the fenced node back.
        assert!(a
            .on(Event::KeepAliveOk { sent: t0 + s(13) }, t0 + s(15))
            .is_empty());
        assert!(matches!(a.role(), Role::Fenced { .. }));
    }

    #[test]
    fn an_answer_to_an_old_keep_alive_never_shortens_the_lease() {
        let t0 = Instant::now();
        let mut a = active(t0);
        a.on(Event::KeepAliveOk { sent: t0 + s(6) }, t0 + s(7));
        a.on(Event::KeepAliveOk { sent: t0 + s(3) }, t0 + s(8));
        assert_eq!(a.lease_until(), Some(t0 + s(14)));
    }

    #[test]
    fn any_event_past_the_lease_fences_first() {
        let t0 = Instant::now();
        let mut a = active(t0);
        // The lease from the campaign (sent at t0) runs to 8 s; an event at 9 s finds it
        // past and fences, even a keep-alive answer.
        let acts = a.on(Event::KeepAliveOk { sent: t0 + s(1) }, t0 + s(9));
        assert!(fenced(&acts), "{acts:?}");
        // A promotion that takes longer than the lease fences too.
        let mut p = PairController::new("b", TTL, MARGIN);
        p.on(
            Event::Key {
                holder: None,
                revision: 1,
            },
            t0,
        );
        p.on(
            Event::Won {
                revision: 2,
                sent: t0,
            },
            t0,
        );
        assert!(fenced(&p.on(Event::PromoteDone, t0 + s(8))));
    }

    #[test]
    fn failback_hands_the_key_over_and_the_node_waits_as_a_standby() {
        let t0 = Instant::now();
        let mut a = active(t0);
        let acts = a.on(Event::Resign, t0 + s(1));
        assert!(
            fenced(&acts) && acts.last() == Some(&Action::Revoke),
            "{acts:?}"
        );
        assert_eq!(a.role(), &Role::Resigning);
        a.on(Event::Resigned, t0 + s(1));
        assert_eq!(a.role(), &Role::Standby);
        // Another node holds the key now: nothing to do.
        assert!(a
            .on(
                Event::Key {
                    holder: Some("a".into()),
                    revision: 40
                },
                t0 + s(2)
            )
            .is_empty());
    }
}
