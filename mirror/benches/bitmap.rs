//! The write-intent bitmap on a volume's write path, on the real bitmap (`WriteGateBench`
//! drives the calls the write gate makes): a 4 KiB write whose region is already marked and
//! durable (the hit: range, in-flight count, durable check, touch, leave) and one whose region
//! needs a mark (the first touch: the same checks, then the mark that dirties a bitmap page).
//! Criterion's time is per write.
//!
//! The bitmap covers a 1 TiB leg in 1 MiB regions (the default region size): 1 Mi regions,
//! 32 bitmap pages. Hits walk the regions sequentially; first touches mark every region once,
//! and the bitmap is cleared (outside the timed part) whenever all are marked.
//!
//! Run with `cargo bench -p nvmirror-mirror --bench bitmap`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use nvmirror_mirror::WriteGateBench;

const LEG: u64 = 1 << 40;
const LBA: u32 = 512;
const REGION: u64 = 1 << 20;
/// A 4 KiB write.
const NLB: u32 = 8;

fn bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let gate = WriteGateBench::new(LEG, LBA, REGION).expect("layout");
    let regions = gate.regions();
    let bpr = gate.blocks_per_region();

    // Every region marked and durable.
    for r in 0..regions {
        gate.first_touch(r * bpr, NLB);
    }
    gate.persist_all();
    let mut r = 0u64;
    g.bench_function("hit_marked_region", |b| {
        b.iter(|| {
            r = if r + 1 == regions { 0 } else { r + 1 };
            let hit = gate.write_hit(black_box(r * bpr), NLB);
            debug_assert!(hit);
            hit
        })
    });
    // The same region again and again: the cache-hot best case.
    g.bench_function("hit_same_region", |b| {
        b.iter(|| gate.write_hit(black_box(0), NLB))
    });

    g.bench_function("first_touch_marks_region", |b| {
        b.iter_custom(|iters| {
            gate.reset();
            let mut next = 0u64;
            let mut spent = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(regions - next);
                let start = Instant::now();
                for i in next..next + n {
                    let page = gate.first_touch(black_box(i * bpr), NLB);
                    debug_assert!(page.is_some());
                    black_box(page);
                }
                spent += start.elapsed();
                left -= n;
                next += n;
                if next == regions {
                    gate.reset();
                    next = 0;
                }
            }
            spent
        })
    });
    g.finish();
}

criterion_group!(benches, bitmap);
criterion_main!(benches);
