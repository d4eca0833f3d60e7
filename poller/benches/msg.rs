//! Cross-core message round trip: the bench thread sends reactor 0 a message that flips a
//! flag the bench thread spins on (one reactor, so on a two-core machine the two spinning
//! threads each have a core), and the ring's own push+pop cost on one thread.

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
            std::hint::black_box(ring.pop())
        })
    });

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
