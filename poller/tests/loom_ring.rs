//! Model check of the message ring: `RUSTFLAGS="--cfg loom" cargo test -p nvmirror-poller
//! --release --test loom_ring`.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use nvmirror_poller::Ring;

#[test]
fn two_producers_one_consumer_deliver_each_value_once() {
    loom::model(|| {
        let ring = Arc::new(Ring::new(2));
        let producers: Vec<_> = (0..2u32)
            .map(|p| {
                let ring = Arc::clone(&ring);
                thread::spawn(move || ring.push(p).is_ok())
            })
            .collect();
        let mut got = Vec::new();
        for _ in 0..3 {
            // SAFETY: this ring is popped by this thread only.
            if let Some(v) = unsafe { ring.pop() } {
                got.push(v);
            }
            thread::yield_now();
        }
        let pushed: u32 = producers
            .into_iter()
            .map(|p| p.join().unwrap() as u32)
            .sum();
        // SAFETY: this ring is popped by this thread only.
        while let Some(v) = unsafe { ring.pop() } {
            got.push(v);
        }
        got.sort();
        assert_eq!(pushed, 2, "a ring of two must take two values");
        assert_eq!(got, vec![0, 1]);
    });
}

#[test]
fn full_ring_wraps_without_losing_values() {
    loom::model(|| {
        let ring = Arc::new(Ring::new(2));
        ring.push(10u32).unwrap();
        ring.push(11).unwrap();
        let r = Arc::clone(&ring);
        let producer = thread::spawn(move || {
            let mut v = 12u32;
            loop {
                match r.push(v) {
                    Ok(()) => break,
                    Err(back) => {
                        v = back;
                        thread::yield_now();
                    }
                }
            }
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            // SAFETY: this ring is popped by this thread only.
            if let Some(v) = unsafe { ring.pop() } {
                got.push(v);
            } else {
                thread::yield_now();
            }
        }
        producer.join().unwrap();
        assert_eq!(got, vec![10, 11, 12]);
    });
}
