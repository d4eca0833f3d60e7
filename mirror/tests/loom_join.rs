//! Model-checks the join-table slot protocol with loom:
//!
//!     RUSTFLAGS="--cfg loom" cargo test -p nvmirror-mirror --release --test loom_join
//!
//! Leg results arrive from several threads; exactly one observes the last one, with every
//! leg's status merged; a duplicate result (a timeout abandoning a leg racing the leg's real
//! completion) counts once; a result for an old generation never touches the slot once it
//! has been reused.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use nvmirror_mirror::join::{JoinSlot, LegOutcome};
use nvmirror_nvme::Status;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

#[test]
fn exactly_one_of_three_legs_is_last_and_sees_every_status() {
    model(|| {
        let slot = Arc::new(JoinSlot::new());
        slot.arm(1, 0b111);
        let statuses = [Status::SUCCESS, Status::WRITE_FAULT, Status::SUCCESS];
        let handles: Vec<_> = (0..3)
            .map(|leg| {
                let slot = Arc::clone(&slot);
                thread::spawn(move || slot.complete(1, leg, statuses[leg]))
            })
            .collect();
        let outcomes: Vec<LegOutcome> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let lasts: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                LegOutcome::Last(r) => Some(*r),
                _ => None,
            })
            .collect();
        assert_eq!(lasts.len(), 1, "{outcomes:?}");
        assert!(outcomes.iter().all(|o| *o != LegOutcome::Stale));
        let r = lasts[0];
        assert_eq!(r.legs, 0b111);
        assert_eq!(r.failed, 0b010);
        assert_eq!(r.status(1), Status::WRITE_FAULT);
    });
}

#[test]
fn a_duplicate_result_counts_once_and_an_old_generation_never_touches_a_reused_slot() {
    model(|| {
        let slot = Arc::new(JoinSlot::new());
        slot.arm(1, 0b11);
        // Leg 0's real completion, leg 1's, and a timeout abandoning leg 0. Whoever is last
        // reuses the slot for generation 2 at once, racing the others.
        let results = [
            (0, Status::SUCCESS),
            (1, Status::WRITE_FAULT),
            (0, Status::ABORTED_BY_HOST),
        ];
        let handles: Vec<_> = results
            .iter()
            .map(|&(leg, status)| {
                let slot = Arc::clone(&slot);
                thread::spawn(move || {
                    let outcome = slot.complete(1, leg, status);
                    if let LegOutcome::Last(_) = outcome {
                        slot.arm(2, 0b11);
                    }
                    outcome
                })
            })
            .collect();
        let outcomes: Vec<LegOutcome> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let stale = outcomes.iter().filter(|o| **o == LegOutcome::Stale).count();
        assert_eq!(
            stale, 1,
            "exactly one of leg 0's two results is dropped: {outcomes:?}"
        );
        assert!(
            outcomes[0] == LegOutcome::Stale || outcomes[2] == LegOutcome::Stale,
            "{outcomes:?}"
        );
        let lasts: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                LegOutcome::Last(r) => Some(*r),
                _ => None,
            })
            .collect();
        assert_eq!(lasts.len(), 1, "{outcomes:?}");
        let winner = if outcomes[0] == LegOutcome::Stale {
            2
        } else {
            0
        };
        assert_eq!(lasts[0].status(0), results[winner].1);
        assert_eq!(lasts[0].status(1), Status::WRITE_FAULT);
        // Generation 2 is untouched by anything of generation 1.
        assert_eq!(slot.complete(2, 0, Status::SUCCESS), LegOutcome::Counted);
        assert_eq!(slot.complete(1, 1, Status::SUCCESS), LegOutcome::Stale);
        match slot.complete(2, 1, Status::SUCCESS) {
            LegOutcome::Last(r) => assert_eq!((r.legs, r.failed), (0b11, 0)),
            o => panic!("generation 2 did not close: {o:?}"),
        }
    });
}
