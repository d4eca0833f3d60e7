//! The reservation rules as tables (type × role × access, and command × situation → outcome)
//! and as properties over random command sequences.

use super::*;
use nvmirror_nvme::spec::reservation::status::RESERVATION_CONFLICT;
use proptest::prelude::*;

const A: HostId = [0xa; 16];
const B: HostId = [0xb; 16];
const C: HostId = [0xc; 16];

fn reg(action: RegisterAction, crkey: u64, nrkey: u64) -> Command {
    Command::Register(RegisterCommand {
        action,
        iekey: false,
        cptpl: ChangePtpl::NoChange,
        crkey,
        nrkey,
    })
}

fn register(key: u64) -> Command {
    reg(RegisterAction::Register, 0, key)
}

fn acq(action: AcquireAction, rtype: ReservationType, crkey: u64, prkey: u64) -> Command {
    Command::Acquire(AcquireCommand {
        action,
        iekey: false,
        rtype,
        crkey,
        prkey,
    })
}

fn acquire(rtype: ReservationType, key: u64) -> Command {
    acq(AcquireAction::Acquire, rtype, key, 0)
}

fn rel(action: ReleaseAction, rtype: u8, crkey: u64) -> Command {
    Command::Release(ReleaseCommand {
        action,
        iekey: false,
        rtype,
        crkey,
    })
}

fn ok(s: &mut ReservationState, host: HostId, cmd: Command) -> Vec<Notice> {
    let o = s.apply(&host, &cmd);
    assert!(o.status.is_success(), "{cmd:?} from {host:?}: {}", o.status);
    o.notices
}

/// A holds a reservation of type `t` with key 1; B is registered with key 2; C is not.
fn reserved(t: ReservationType) -> ReservationState {
    let mut s = ReservationState::default();
    ok(&mut s, A, register(1));
    ok(&mut s, B, register(2));
    ok(&mut s, A, acquire(t, 1));
    s
}

fn conflict_st() -> Status {
    RESERVATION_CONFLICT.with_dnr()
}

#[test]
fn access_by_type_and_role_matches_the_spec_table() {
    use ReservationType as T;
    // (type, holder r/w, registrant r/w, non-registrant r/w): Base Figure "Command Behavior
    // in the Presence of a Reservation".
    let table = [
        (T::WriteExclusive, (1, 1), (1, 0), (1, 0)),
        (T::ExclusiveAccess, (1, 1), (0, 0), (0, 0)),
        (T::WriteExclusiveRegistrantsOnly, (1, 1), (1, 1), (1, 0)),
        (T::ExclusiveAccessRegistrantsOnly, (1, 1), (1, 1), (0, 0)),
        (T::WriteExclusiveAllRegistrants, (1, 1), (1, 1), (1, 0)),
        (T::ExclusiveAccessAllRegistrants, (1, 1), (1, 1), (0, 0)),
    ];
    let acc = |(r, w): (u8, u8)| Access {
        read: r == 1,
        write: w == 1,
    };
    for (t, holder, registrant, other) in table {
        let s = reserved(t);
        assert_eq!(s.access(&A), acc(holder), "{t:?} holder");
        assert_eq!(s.access(&B), acc(registrant), "{t:?} registrant");
        assert_eq!(s.access(&C), acc(other), "{t:?} non-registrant");
        assert_eq!(s.holds(&B), t.all_registrants(), "{t:?}: B holds");
    }
    let free = ReservationState::default();
    assert_eq!(free.access(&C), Access::ALL);
}

#[test]
fn register_actions() {
    let mut s = ReservationState::default();
    ok(&mut s, A, register(1));
    assert_eq!(s.generation, 1);
    // The same key again is fine; another key is a conflict and changes nothing.
    ok(&mut s, A, register(1));
    let before = s.clone();
    assert_eq!(s.apply(&A, &register(9)).status, conflict_st());
    assert_eq!(s, before);
    // Replace needs the current key, or IEKEY.
    assert_eq!(
        s.apply(&A, &reg(RegisterAction::Replace, 5, 7)).status,
        conflict_st()
    );
    ok(&mut s, A, reg(RegisterAction::Replace, 1, 7));
    assert_eq!(s.registrants[0].key, 7);
    let mut iekey = RegisterCommand {
        action: RegisterAction::Replace,
        iekey: true,
        cptpl: ChangePtpl::Set,
        crkey: 99,
        nrkey: 8,
    };
    ok(&mut s, A, Command::Register(iekey));
    assert_eq!((s.registrants[0].key, s.ptpl), (8, true));
    // Unregister / Replace by a host that is not registered.
    assert_eq!(
        s.apply(&B, &reg(RegisterAction::Unregister, 0, 0)).status,
        conflict_st()
    );
    assert_eq!(
        s.apply(&B, &reg(RegisterAction::Replace, 0, 3)).status,
        conflict_st()
    );
    // Unregister with the wrong key, then with IEKEY.
    assert_eq!(
        s.apply(&A, &reg(RegisterAction::Unregister, 1, 0)).status,
        conflict_st()
    );
    iekey.action = RegisterAction::Unregister;
    iekey.cptpl = ChangePtpl::Clear;
    ok(&mut s, A, Command::Register(iekey));
    assert!(s.registrants.is_empty());
    assert!(!s.ptpl);
    assert_eq!(s.generation, 5);
}

#[test]
fn acquire_needs_a_registered_issuer_and_its_key() {
    let mut s = ReservationState::default();
    let t = ReservationType::WriteExclusive;
    assert_eq!(s.apply(&A, &acquire(t, 1)).status, conflict_st());
    ok(&mut s, A, register(1));
    assert_eq!(s.apply(&A, &acquire(t, 2)).status, conflict_st());
    let mut c = AcquireCommand {
        action: AcquireAction::Acquire,
        iekey: true,
        rtype: t,
        crkey: 1,
        prkey: 0,
    };
    assert_eq!(
        s.apply(&A, &Command::Acquire(c)).status,
        Status::INVALID_FIELD.with_dnr()
    );
    c.iekey = false;
    let g = s.generation;
    ok(&mut s, A, Command::Acquire(c));
    assert_eq!(s.generation, g, "Acquire leaves the generation");
    // Again with the same type: no change; another type: conflict.
    ok(&mut s, A, Command::Acquire(c));
    assert_eq!(
        s.apply(&A, &acquire(ReservationType::ExclusiveAccess, 1))
            .status,
        conflict_st()
    );
    // Another registrant cannot acquire a held reservation.
    ok(&mut s, B, register(2));
    assert_eq!(s.apply(&B, &acquire(t, 2)).status, conflict_st());
}

#[test]
fn all_registrants_types_make_every_registrant_a_holder() {
    for t in [
        ReservationType::WriteExclusiveAllRegistrants,
        ReservationType::ExclusiveAccessAllRegistrants,
    ] {
        let mut s = reserved(t);
        // B holds too: it may acquire the same type and release it for everyone.
        ok(&mut s, B, acquire(t, 2));
        // The first holder leaving keeps the reservation while a registrant is left.
        ok(&mut s, A, reg(RegisterAction::Unregister, 1, 0));
        assert_eq!(s.reservation, Some((t, Holder::AllRegistrants)));
        ok(&mut s, B, reg(RegisterAction::Unregister, 2, 0));
        assert_eq!(s.reservation, None, "{t:?} ends with the last registrant");
    }
}

#[test]
fn unregistering_the_holder_releases_and_registrants_only_types_notify() {
    for t in ReservationType::ALL {
        let mut s = reserved(t);
        let n = ok(&mut s, A, reg(RegisterAction::Unregister, 1, 0));
        if t.all_registrants() {
            assert_eq!(s.reservation, Some((t, Holder::AllRegistrants)));
            assert!(n.is_empty());
        } else {
            assert_eq!(s.reservation, None, "{t:?}");
            let want = if t.admits_registrants() {
                vec![Notice {
                    host: B,
                    kind: NotificationType::ReservationReleased,
                }]
            } else {
                vec![]
            };
            assert_eq!(n, want, "{t:?}");
        }
    }
}

#[test]
fn release_and_clear() {
    use ReservationType as T;
    for t in T::ALL {
        let mut s = reserved(t);
        // Wrong key: conflict; not registered: conflict; IEKEY: invalid field.
        assert_eq!(
            s.apply(&A, &rel(ReleaseAction::Release, t as u8, 9)).status,
            conflict_st()
        );
        assert_eq!(
            s.apply(&C, &rel(ReleaseAction::Release, t as u8, 0)).status,
            conflict_st()
        );
        let wrong = if t == T::WriteExclusive { 2 } else { 1 };
        assert_eq!(
            s.apply(&A, &rel(ReleaseAction::Release, wrong, 1)).status,
            Status::INVALID_FIELD.with_dnr(),
            "{t:?}: release of another type"
        );
        if !t.all_registrants() {
            // A registrant that does not hold it: success, no effect.
            let before = s.clone();
            ok(&mut s, B, rel(ReleaseAction::Release, t as u8, 2));
            assert_eq!(s, before);
        }
        let g = s.generation;
        let n = ok(&mut s, A, rel(ReleaseAction::Release, t as u8, 1));
        assert_eq!(s.reservation, None);
        assert_eq!(s.generation, g, "Release leaves the generation");
        assert_eq!(s.registrants.len(), 2, "Release keeps registrations");
        let want: Vec<Notice> = if t.admits_registrants() {
            vec![Notice {
                host: B,
                kind: NotificationType::ReservationReleased,
            }]
        } else {
            vec![]
        };
        assert_eq!(n, want, "{t:?}");
        // Release with nothing reserved: success.
        ok(&mut s, A, rel(ReleaseAction::Release, t as u8, 1));
    }
    let mut s = reserved(T::ExclusiveAccess);
    let g = s.generation;
    // Clear by a registrant that is not the holder, and RTYPE does not matter.
    let n = ok(&mut s, B, rel(ReleaseAction::Clear, 0, 2));
    assert_eq!(
        n,
        vec![Notice {
            host: A,
            kind: NotificationType::ReservationPreempted
        }]
    );
    assert_eq!((s.reservation, s.registrants.len()), (None, 0));
    assert_eq!(s.generation, g + 1);
}

#[test]
fn preempt_outcomes() {
    use AcquireAction::{Preempt, PreemptAndAbort};
    use ReservationType as T;
    for action in [Preempt, PreemptAndAbort] {
        // Preempting the holder's key: B takes the reservation, A is unregistered.
        for t in [T::WriteExclusive, T::ExclusiveAccessRegistrantsOnly] {
            let mut s = reserved(t);
            ok(&mut s, C, register(3));
            let g = s.generation;
            let n = ok(&mut s, B, acq(action, T::ExclusiveAccess, 2, 1));
            assert_eq!(s.reservation, Some((T::ExclusiveAccess, Holder::Host(B))));
            assert!(s.registrant(&A).is_none());
            assert_eq!(s.generation, g + 1);
            assert!(n.contains(&Notice {
                host: A,
                kind: NotificationType::RegistrationPreempted
            }));
            // The type changed: the remaining registrant (C) hears it was released.
            assert!(n.contains(&Notice {
                host: C,
                kind: NotificationType::ReservationReleased
            }));
            assert_eq!(s.access(&A), Access::default(), "preempted host fenced");
        }
        // A key that is not the holder's removes those registrants, the reservation stays.
        let mut s = reserved(T::WriteExclusive);
        ok(&mut s, C, register(3));
        ok(&mut s, B, acq(action, T::WriteExclusive, 2, 3));
        assert!(s.registrant(&C).is_none());
        assert_eq!(s.reservation, Some((T::WriteExclusive, Holder::Host(A))));
        // ... and a key nobody has is a conflict; PRKEY 0 is an invalid field.
        assert_eq!(
            s.apply(&B, &acq(action, T::WriteExclusive, 2, 77)).status,
            conflict_st()
        );
        assert_eq!(
            s.apply(&B, &acq(action, T::WriteExclusive, 2, 0)).status,
            Status::INVALID_FIELD.with_dnr()
        );
        // The holder preempting itself changes the type and keeps everyone registered.
        ok(&mut s, A, acq(action, T::ExclusiveAccess, 1, 1));
        assert_eq!(s.reservation, Some((T::ExclusiveAccess, Holder::Host(A))));
        assert_eq!(s.registrants.len(), 2);
        // All Registrants with PRKEY 0: everyone else goes, the issuer holds the new type.
        let mut s = reserved(T::WriteExclusiveAllRegistrants);
        ok(&mut s, C, register(3));
        let n = ok(&mut s, B, acq(action, T::ExclusiveAccess, 2, 0));
        assert_eq!(s.reservation, Some((T::ExclusiveAccess, Holder::Host(B))));
        assert_eq!(s.registrants.len(), 1);
        assert_eq!(n.len(), 2);
        // No reservation: preempt only removes registrations with that key.
        let mut s = ReservationState::default();
        ok(&mut s, A, register(1));
        ok(&mut s, B, register(2));
        ok(&mut s, A, acq(action, T::WriteExclusive, 1, 2));
        assert_eq!(s.reservation, None);
        assert_eq!(s.registrants.len(), 1);
        // An unregistered or wrong-key issuer is a conflict.
        assert_eq!(
            s.apply(&C, &acq(action, T::WriteExclusive, 0, 1)).status,
            conflict_st()
        );
    }
}

#[test]
fn report_lists_registrants_and_the_holder() {
    let s = reserved(ReservationType::WriteExclusiveRegistrantsOnly);
    let r = s.report();
    assert_eq!(r.gen, 2);
    assert_eq!(
        r.rtype,
        Some(ReservationType::WriteExclusiveRegistrantsOnly)
    );
    assert_eq!(r.regctl, 2);
    assert_eq!(
        r.registrants
            .iter()
            .map(|g| (g.hostid, g.rkey, g.holds, g.cntlid))
            .collect::<Vec<_>>(),
        vec![(A, 1, true, 0xffff), (B, 2, false, 0xffff)]
    );
}

// ---- properties ---------------------------------------------------------------------------

fn host() -> impl Strategy<Value = HostId> {
    prop_oneof![Just(A), Just(B), Just(C)]
}

fn key() -> impl Strategy<Value = u64> {
    0u64..4
}

fn command() -> impl Strategy<Value = Command> {
    let rtype = (1u8..=6).prop_map(|v| ReservationType::from_u8(v).unwrap());
    prop_oneof![
        (0u8..3, any::<bool>(), 0u8..3, key(), key()).prop_map(|(a, iekey, p, crkey, nrkey)| {
            Command::Register(RegisterCommand {
                action: [
                    RegisterAction::Register,
                    RegisterAction::Unregister,
                    RegisterAction::Replace,
                ][usize::from(a)],
                iekey,
                cptpl: [ChangePtpl::NoChange, ChangePtpl::Clear, ChangePtpl::Set][usize::from(p)],
                crkey,
                nrkey,
            })
        }),
        (0u8..3, rtype, key(), key()).prop_map(|(a, rtype, crkey, prkey)| {
            Command::Acquire(AcquireCommand {
                action: [
                    AcquireAction::Acquire,
                    AcquireAction::Preempt,
                    AcquireAction::PreemptAndAbort,
                ][usize::from(a)],
                iekey: false,
                rtype,
                crkey,
                prkey,
            })
        }),
        (0u8..2, 0u8..8, key()).prop_map(|(a, rtype, crkey)| {
            Command::Release(ReleaseCommand {
                action: [ReleaseAction::Release, ReleaseAction::Clear][usize::from(a)],
                iekey: false,
                rtype,
                crkey,
            })
        }),
    ]
}

fn check_invariants(s: &ReservationState) -> Result<(), TestCaseError> {
    for (i, r) in s.registrants.iter().enumerate() {
        prop_assert!(
            s.registrants[i + 1..].iter().all(|o| o.host != r.host),
            "a host registered twice: {s:?}"
        );
    }
    match s.reservation {
        Some((t, Holder::Host(h))) => {
            prop_assert!(!t.all_registrants(), "{s:?}");
            prop_assert!(s.registrant(&h).is_some(), "holder not registered: {s:?}");
        }
        Some((t, Holder::AllRegistrants)) => {
            prop_assert!(t.all_registrants(), "{s:?}");
            prop_assert!(!s.registrants.is_empty(), "{s:?}");
        }
        None => {}
    }
    for h in [A, B, C] {
        let a = s.access(&h);
        if s.holds(&h) || s.reservation.is_none() {
            prop_assert_eq!(a, Access::ALL);
        }
        if s.reservation.is_some() && s.registrant(&h).is_none() {
            prop_assert!(!a.write, "a non-registrant may write: {s:?}");
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn random_command_sequences_keep_the_invariants(
        cmds in proptest::collection::vec((host(), command()), 1..40)
    ) {
        let mut s = ReservationState::default();
        for (h, cmd) in cmds {
            let before = s.clone();
            let o = s.apply(&h, &cmd);
            if !o.status.is_success() {
                prop_assert_eq!(&s, &before, "a failed command changed the state");
                prop_assert!(o.notices.is_empty());
            } else {
                let moved = s.generation.wrapping_sub(before.generation);
                let counts = match cmd {
                    Command::Register(_) => true,
                    Command::Acquire(c) => c.action != AcquireAction::Acquire,
                    Command::Release(c) => c.action == ReleaseAction::Clear,
                };
                prop_assert_eq!(moved, u32::from(counts), "generation after {:?}", cmd);
                if !matches!(cmd, Command::Register(_)) {
                    prop_assert_eq!(s.ptpl, before.ptpl);
                }
                for n in &o.notices {
                    prop_assert!(n.host != h, "the issuer notified of its own command");
                    prop_assert!(before.registrant(&n.host).is_some(), "notice to a non-registrant");
                }
            }
            // Only a registered issuer with its key gets anywhere but Register.
            if !matches!(cmd, Command::Register(_)) && before.registrant(&h).is_none() {
                prop_assert!(!o.status.is_success());
            }
            check_invariants(&s)?;
        }
    }
}
