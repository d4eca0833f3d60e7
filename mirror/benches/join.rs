//! The join table's slot lifecycle on the real table (`JoinTableBench` drives the calls a
//! volume queue pair makes): reserve a slot for a command, deliver one completion per leg,
//! fire once on the last and release the slot — for 2 and 3 legs. Criterion's time is per
//! command.
//!
//! `one_at_a_time` cycles one command through the table; `32_in_flight` keeps 32 commands
//! reserved and completes their legs interleaved (leg 0 of every command, then leg 1, …), the
//! order a poll that reaps several legs' queue pairs sees them in. `shared_slot` is the
//! lock-free `JoinSlot::complete` path (for results from another core) on one slot.
//!
//! Run with `cargo bench -p nvmirror-mirror --bench join`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use nvmirror_mirror::join::{JoinSlot, LegOutcome};
use nvmirror_mirror::JoinTableBench;
use nvmirror_nvme::{IoCommand, IoOp, Status};

const IN_FLIGHT: usize = 32;

fn join(c: &mut Criterion) {
    let mut g = c.benchmark_group("join");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let cmd = IoCommand::new(IoOp::Write, 0, 8, 1);
    g.throughput(criterion::Throughput::Elements(1));
    for legs in [2usize, 3] {
        let mask = (1u8 << legs) - 1;

        let mut t = JoinTableBench::new(128);
        g.bench_function(format!("one_at_a_time/{legs}_legs"), |b| {
            b.iter(|| {
                let tag = t.reserve(black_box(cmd), mask).expect("a free slot");
                for leg in 1..legs {
                    let r = t.leg_completion(tag, leg, Status::SUCCESS);
                    debug_assert!(r.is_none());
                }
                let r = t.leg_completion(tag, 0, Status::SUCCESS);
                black_box(r.expect("the last leg fires"))
            })
        });

        let mut t = JoinTableBench::new(128);
        let mut tags = [0u64; IN_FLIGHT];
        g.throughput(criterion::Throughput::Elements(IN_FLIGHT as u64));
        g.bench_function(format!("{IN_FLIGHT}_in_flight/{legs}_legs"), |b| {
            b.iter(|| {
                for tag in &mut tags {
                    *tag = t.reserve(black_box(cmd), mask).expect("a free slot");
                }
                let mut fired = 0;
                for leg in 0..legs {
                    for &tag in &tags {
                        fired += usize::from(t.leg_completion(tag, leg, Status::SUCCESS).is_some());
                    }
                }
                assert_eq!(fired, IN_FLIGHT);
            })
        });
        g.throughput(criterion::Throughput::Elements(1));

        let slot = JoinSlot::new();
        let mut generation = 0u32;
        g.bench_function(format!("shared_slot/{legs}_legs"), |b| {
            b.iter(|| {
                generation = generation.wrapping_add(1);
                slot.arm(generation, mask);
                let mut last = None;
                for leg in 0..legs {
                    if let LegOutcome::Last(r) = slot.complete(generation, leg, Status::SUCCESS) {
                        last = Some(r);
                    }
                }
                black_box(last.expect("the last leg fires"))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, join);
criterion_main!(benches);
