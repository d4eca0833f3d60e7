//! Model-checks the write-intent bitmap's clear handshake with loom:
//!
//!     RUSTFLAGS="--cfg loom" cargo test -p nvmirror-mirror --release --test loom_bitmap
//!
//! A writer counts itself in flight, then looks at the bits; the clearer clears the bits,
//! then looks at the counter and puts them back if a writer is in (`bitmap/clear.rs`). In
//! every interleaving: a writer that saw its region marked and durable (and so sent data to
//! the legs) is never left with that region cleared while it is in flight, and a clear that
//! backs off leaves the bit marked and durable as it was.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use nvmirror_mirror::WriteGateBench;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    // Setting up a bitmap page touches its 2 x 512 words once each before the threads start.
    builder.max_branches = 50_000;
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// A tiny bitmap (64 KiB regions over 4 MiB) with region 0 marked and durable.
fn marked() -> WriteGateBench {
    let b = WriteGateBench::new(4 << 20, 512, 64 << 10).unwrap();
    b.mark(0, 1);
    b.persist_all();
    b
}

#[test]
fn a_writer_that_passed_the_gate_never_loses_its_bit() {
    model(|| {
        let b = Arc::new(marked());
        let w = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.enter_and_check(0, 8))
        };
        let c = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.try_clear(0))
        };
        let passed = w.join().unwrap();
        let cleared = c.join().unwrap();
        // The writer is still in flight here.
        assert!(
            !(passed && cleared),
            "a clear raced a write that went to the legs"
        );
        if !cleared {
            assert!(b.is_marked(0), "a backed-off clear left the bit cleared");
        }
        if passed {
            assert!(b.is_marked(0));
        }
    });
}

#[test]
fn two_writers_and_a_clearer() {
    model(|| {
        let b = Arc::new(marked());
        let writers: Vec<_> = (0..2)
            .map(|i| {
                let b = Arc::clone(&b);
                thread::spawn(move || b.enter_and_check(i * 4, 4))
            })
            .collect();
        let cleared = b.try_clear(0);
        let passed: Vec<bool> = writers.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(!(cleared && passed.iter().any(|&p| p)));
    });
}
