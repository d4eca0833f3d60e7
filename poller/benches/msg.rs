//! Cross-core message round trip: the bench thread sends reactor 0 a message that flips a
//! flag the bench thread spins on (one reactor, so on a two-core machine the two spinning
//! threads each have a core), and the ring's own push+pop cost on one thread. The bare
//! ring's cross-thread round trip (a value to an echo thread on one ring and back on another,
//! no reactor, no boxed closure) shows what the ring itself costs between cores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use nvmirror_poller::{ReactorConfig, ReactorPool, Ring};

fn rings(c: &mut Criterion) {
    let mut g = c.benchmark_group("message");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));

    let ring = Ring::new(1024);
    g.bench_function("ring_push_pop_same_thread", |b| {
        b.iter(|| {
            ring.push(std::hint::black_box(7u64)).unwrap();
            // SAFETY: this ring is popped by this thread only.
            std::hint::black_box(unsafe { ring.pop() })
        })
    });

    // The echo thread is the only consumer of `to_echo`, the bench thread of `back`.
    let to_echo = Arc::new(Ring::<u64>::new(64));
    let back = Arc::new(Ring::<u64>::new(64));
    let echo = {
        let (rx, tx) = (Arc::clone(&to_echo), Arc::clone(&back));
        std::thread::spawn(move || loop {
            // SAFETY: this ring is popped by this thread only.
            match unsafe { rx.pop() } {
                Some(u64::MAX) => return,
                Some(v) => {
                    while tx.push(v).is_err() {
                        std::hint::spin_loop();
                    }
                }
                None => std::hint::spin_loop(),
            }
        })
    };
    let mut v = 0u64;
    g.bench_function("ring_round_trip_two_threads", |b| {
        b.iter(|| {
            v += 1;
            to_echo.push(v).unwrap();
            loop {
                // SAFETY: this ring is popped by this thread only.
                if let Some(got) = unsafe { back.pop() } {
                    assert_eq!(got, v);
                    break;
                }
                std::hint::spin_loop();
            }
        })
    });
    to_echo.push(u64::MAX).unwrap();
    echo.join().unwrap();

    let pool = ReactorPool::start(ReactorConfig::unpinned(1)).unwrap();
    let h = pool.handle();
    let flag = Arc::new(AtomicU64::new(0));
    let mut n = 0u64;
    g.bench_function("round_trip_caller_to_reactor_and_back", |b| {
        b.iter(|| {
            n += 1;
            let (f, target) = (Arc::clone(&flag), n);
            h.send_msg(0, move |_| f.store(target, Ordering::Release))
                .unwrap();
            while flag.load(Ordering::Acquire) != n {
                std::hint::spin_loop();
            }
        })
    });
    g.finish();
    pool.shutdown();
}

criterion_group!(benches, rings);
criterion_main!(benches);
