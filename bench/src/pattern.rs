//! The stream of commands one job thread issues: direction, first LBA and length of each I/O.

use nvmirror_nvme::IoOp;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::job::{IoLayout, JobSpec, RwMode, VerifyMode};

/// One I/O of the pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextIo {
    pub op: IoOp,
    /// First unit, counted from the start of the region.
    pub unit: u64,
    /// Length in units (1 unless `bsrange` is set).
    pub units: u32,
}

/// The units of the region one job thread works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadRange {
    /// First unit, counted from the start of the region.
    pub first: u64,
    /// Number of units.
    pub len: u64,
}

impl ThreadRange {
    /// Thread `job`'s range. Threads share the whole region, except with `verify`, where each
    /// owns an equal share so no two threads ever write the same block.
    pub fn of(spec: &JobSpec, layout: IoLayout, job: u32) -> Self {
        if spec.verify == VerifyMode::None {
            return Self {
                first: 0,
                len: layout.units,
            };
        }
        let share = layout.units / u64::from(spec.numjobs.max(1));
        Self {
            first: share * u64::from(job),
            len: share,
        }
    }
}

/// A random permutation of `[0, n)`, walked one value at a time: fio's random map without
/// the map. A keyed bijection on the `m`-bit numbers (`2^m >= n`), applied again while the
/// result is `n` or more (cycle walking), maps `[0, n)` onto itself; under 2 steps per value
/// on average, no memory, and every value comes exactly once per pass.
#[derive(Clone, Copy, Debug)]
pub struct RandomMap {
    n: u64,
    mask: u64,
    shift: u32,
    key: u64,
    next: u64,
}

impl RandomMap {
    /// A permutation of `[0, n)` chosen by `seed`.
    pub fn new(n: u64, seed: u64) -> Self {
        let bits = (64 - n.max(2).saturating_sub(1).leading_zeros()).max(1);
        Self {
            n: n.max(1),
            mask: if bits >= 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            },
            shift: (bits / 2).max(1),
            key: splitmix(seed),
            next: 0,
        }
    }

    /// The bijection on `[0, 2^m)`: each step (xor with the key, multiply by an odd constant
    /// modulo 2^m, xor with a right shift of itself) is invertible.
    #[inline]
    fn mix(&self, mut x: u64) -> u64 {
        x = (x ^ self.key) & self.mask;
        x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15) & self.mask;
        x ^= x >> self.shift;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) & self.mask;
        x ^= x >> self.shift;
        x = x.wrapping_mul(0x94d0_49bb_1331_11eb) & self.mask;
        x ^ (x >> self.shift)
    }

    /// The next value; after `n` of them the pass starts again with another order.
    #[inline]
    pub fn next_value(&mut self) -> u64 {
        let mut y = self.mix(self.next);
        while y >= self.n {
            y = self.mix(y);
        }
        self.next += 1;
        if self.next == self.n {
            self.next = 0;
            self.key = splitmix(self.key);
        }
        y
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The commands of one job thread.
#[derive(Debug)]
pub struct IoPattern {
    rng: SmallRng,
    /// Random offsets of fixed-size I/Os, unless `norandommap`.
    map: Option<RandomMap>,
    rw: RwMode,
    rwmixread: u32,
    range: ThreadRange,
    max_units: u32,
    /// Next unit of a sequential job, relative to the range.
    cursor: u64,
}

impl IoPattern {
    /// The pattern of job thread `job` of `numjobs`. Sequential threads sharing the region start
    /// spread evenly over it so they do not write the same blocks at once; each wraps at the end.
    pub fn new(spec: &JobSpec, layout: IoLayout, job: u32) -> Self {
        let range = ThreadRange::of(spec, layout, job);
        let cursor = if range.len == layout.units {
            layout.units / u64::from(spec.numjobs.max(1)) * u64::from(job)
        } else {
            0
        };
        let seed = spec.seed.wrapping_add(u64::from(job));
        let fixed = layout.max_units <= 1;
        Self {
            map: (spec.rw.is_random() && fixed && !spec.norandommap)
                .then(|| RandomMap::new(range.len, seed)),
            rng: SmallRng::seed_from_u64(seed),
            rw: spec.rw,
            rwmixread: spec.rwmixread,
            range,
            max_units: layout.max_units.max(1),
            cursor: cursor % range.len.max(1),
        }
    }

    /// The units this thread works on.
    pub fn range(&self) -> ThreadRange {
        self.range
    }

    /// The next I/O.
    #[inline]
    pub fn next_io(&mut self) -> NextIo {
        let op = if self.rw.is_mixed() {
            if self.rng.gen_range(0..100) < self.rwmixread {
                IoOp::Read
            } else {
                IoOp::Write
            }
        } else {
            self.rw.op()
        };
        let units = if self.max_units > 1 {
            self.rng.gen_range(1..=self.max_units)
        } else {
            1
        };
        let len = u64::from(units);
        let unit = if let Some(map) = self.map.as_mut() {
            map.next_value()
        } else if self.rw.is_random() {
            self.rng.gen_range(0..self.range.len - len + 1)
        } else {
            if self.cursor + len > self.range.len {
                self.cursor = 0;
            }
            let u = self.cursor;
            self.cursor += len;
            if self.cursor == self.range.len {
                self.cursor = 0;
            }
            u
        };
        NextIo {
            op,
            unit: self.range.first + unit,
            units,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::BsRange;

    fn layout(units: u64, max_units: u32) -> IoLayout {
        IoLayout {
            nlb: 8,
            units,
            max_units,
            first_lba: 0,
        }
    }

    #[test]
    fn the_random_map_visits_every_block_once_per_pass() {
        for n in [1u64, 2, 3, 7, 1000, 4096, (1 << 20) + 7] {
            let mut map = RandomMap::new(n, 42);
            for pass in 0..2 {
                let mut seen = vec![false; n as usize];
                for _ in 0..n {
                    let v = map.next_value();
                    assert!(v < n, "n={n}: {v} out of range");
                    assert!(!seen[v as usize], "n={n} pass {pass}: {v} twice");
                    seen[v as usize] = true;
                }
            }
        }
        // Not the identity, and seeds and passes give other orders.
        let take = |m: &mut RandomMap| (0..64).map(|_| m.next_value()).collect::<Vec<_>>();
        let mut a = RandomMap::new(4096, 1);
        let first = take(&mut a);
        assert_ne!(first, (0..64).collect::<Vec<_>>());
        assert_ne!(first, take(&mut RandomMap::new(4096, 2)));
        for _ in 0..(4096 / 64 - 1) {
            take(&mut a);
        }
        assert_ne!(first, take(&mut a), "the second pass repeats the first");
    }

    #[test]
    fn random_jobs_use_the_map_unless_norandommap() {
        let spec = JobSpec {
            rw: RwMode::RandWrite,
            ..JobSpec::default()
        };
        let distinct = |spec: &JobSpec| {
            let mut p = IoPattern::new(spec, layout(256, 1), 0);
            let mut v: Vec<u64> = (0..256).map(|_| p.next_io().unit).collect();
            v.sort_unstable();
            v.dedup();
            v.len()
        };
        assert_eq!(distinct(&spec), 256, "one pass covers every unit once");
        let repeats = JobSpec {
            norandommap: true,
            ..spec
        };
        assert!(distinct(&repeats) < 256, "independent draws repeat");
    }

    #[test]
    fn sequential_walks_and_wraps_random_stays_in_range() {
        let spec = JobSpec {
            rw: RwMode::Write,
            numjobs: 2,
            ..JobSpec::default()
        };
        let mut p = IoPattern::new(&spec, layout(4, 1), 1);
        let units: Vec<u64> = (0..5).map(|_| p.next_io().unit).collect();
        assert_eq!(units, [2, 3, 0, 1, 2]);

        let spec = JobSpec {
            rw: RwMode::RandRw,
            rwmixread: 30,
            ..JobSpec::default()
        };
        let mut p = IoPattern::new(&spec, layout(1000, 1), 0);
        let mut reads = 0;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let io = p.next_io();
            assert!(io.unit < 1000 && io.units == 1);
            seen.insert(io.unit);
            reads += u32::from(io.op == IoOp::Read);
        }
        assert!((2700..3300).contains(&reads), "{reads} reads of 10000");
        assert!(seen.len() > 900, "only {} distinct offsets", seen.len());
    }

    #[test]
    fn bsrange_sizes_are_spread_and_every_io_fits() {
        let spec = JobSpec {
            rw: RwMode::RandWrite,
            bsrange: Some(BsRange {
                min: 4096,
                max: 16384,
            }),
            ..JobSpec::default()
        };
        let mut p = IoPattern::new(&spec, layout(10, 4), 0);
        let mut sizes = [0u32; 5];
        for _ in 0..4000 {
            let io = p.next_io();
            assert!(io.unit + u64::from(io.units) <= 10, "{io:?}");
            sizes[io.units as usize] += 1;
        }
        assert_eq!(sizes[0], 0);
        assert!(sizes[1..].iter().all(|&n| n > 800), "{sizes:?}");

        // A sequential job wraps before an I/O would run past the end.
        let seq = JobSpec {
            rw: RwMode::Trim,
            ..spec
        };
        let mut p = IoPattern::new(&seq, layout(10, 4), 0);
        for _ in 0..1000 {
            let io = p.next_io();
            assert_eq!(io.op, IoOp::Deallocate);
            assert!(io.unit + u64::from(io.units) <= 10, "{io:?}");
        }
    }

    #[test]
    fn verify_gives_each_thread_its_own_share() {
        let spec = JobSpec {
            rw: RwMode::RandWrite,
            numjobs: 3,
            verify: VerifyMode::Crc32c,
            ..JobSpec::default()
        };
        for job in 0..3 {
            let mut p = IoPattern::new(&spec, layout(100, 1), job);
            assert_eq!(
                p.range(),
                ThreadRange {
                    first: 33 * u64::from(job),
                    len: 33
                }
            );
            for _ in 0..1000 {
                let u = p.next_io().unit;
                assert!((33 * u64::from(job)..33 * u64::from(job + 1)).contains(&u));
            }
        }
    }
}
