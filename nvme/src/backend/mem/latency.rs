//! Injected completion latency for the mem back end.
//!
//! Due times come from `quanta`'s TSC clock: the model reads the clock once per command and
//! once per poll, and a vDSO `clock_gettime` (about 18 ns here, and a likely cache miss on
//! its data page after the data copies) would make the device model itself a visible share
//! of a mirrored write's CPU time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use quanta::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};

use crate::queue::Completion;

/// How long a mem command takes to complete.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LatencyModel {
    /// Completes at the next poll.
    None,
    /// Exactly this long.
    Fixed(Duration),
    /// Uniform in `mean ± spread`.
    Uniform { mean: Duration, spread: Duration },
    /// Log-normal with this mean and shape `sigma` (the usual long-tailed device curve).
    LogNormal { mean: Duration, sigma: f64 },
}

/// Completions waiting for their due time.
#[derive(Debug)]
pub(super) enum DelayQueue {
    Immediate,
    /// Fixed latency: due times are monotonic, so FIFO.
    Fifo {
        latency: Duration,
        q: VecDeque<(Instant, Completion)>,
    },
    /// Random latency: a min-heap on due time.
    Heap {
        model: LatencyModel,
        rng: SmallRng,
        heap: BinaryHeap<Reverse<Entry>>,
        seq: u64,
    },
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Entry {
    due: Instant,
    seq: u64,
    tag: u64,
    status: u16,
}

impl DelayQueue {
    pub(super) fn new(model: &LatencyModel, depth: usize) -> Self {
        match *model {
            LatencyModel::None => Self::Immediate,
            LatencyModel::Fixed(d) if d.is_zero() => Self::Immediate,
            LatencyModel::Fixed(latency) => Self::Fifo {
                latency,
                q: VecDeque::with_capacity(depth),
            },
            model => Self::Heap {
                model,
                rng: SmallRng::from_entropy(),
                heap: BinaryHeap::with_capacity(depth),
                seq: 0,
            },
        }
    }

    #[inline]
    pub(super) fn is_immediate(&self) -> bool {
        matches!(self, Self::Immediate)
    }

    pub(super) fn is_empty(&self) -> bool {
        match self {
            Self::Immediate => true,
            Self::Fifo { q, .. } => q.is_empty(),
            Self::Heap { heap, .. } => heap.is_empty(),
        }
    }

    pub(super) fn push(&mut self, cpl: Completion) {
        let now = Instant::now();
        match self {
            Self::Immediate => unreachable!("immediate completions bypass the delay queue"),
            Self::Fifo { latency, q } => q.push_back((now + *latency, cpl)),
            Self::Heap {
                model,
                rng,
                heap,
                seq,
            } => {
                let due = now + sample(model, rng);
                *seq += 1;
                heap.push(Reverse(Entry {
                    due,
                    seq: *seq,
                    tag: cpl.tag,
                    status: cpl.status.raw(),
                }));
            }
        }
    }

    pub(super) fn release_due(&mut self, now: Instant, out: &mut VecDeque<Completion>) {
        match self {
            Self::Immediate => {}
            Self::Fifo { q, .. } => {
                while q.front().is_some_and(|(due, _)| *due <= now) {
                    out.push_back(q.pop_front().expect("front exists").1);
                }
            }
            Self::Heap { heap, .. } => {
                while heap.peek().is_some_and(|e| e.0.due <= now) {
                    let e = heap.pop().expect("peeked").0;
                    out.push_back(Completion {
                        tag: e.tag,
                        status: crate::spec::Status::from_raw(e.status),
                    });
                }
            }
        }
    }
}

fn sample(model: &LatencyModel, rng: &mut SmallRng) -> Duration {
    match *model {
        LatencyModel::None => Duration::ZERO,
        LatencyModel::Fixed(d) => d,
        LatencyModel::Uniform { mean, spread } => {
            let lo = mean.saturating_sub(spread).as_nanos() as u64;
            let hi = (mean + spread).as_nanos() as u64;
            Duration::from_nanos(rng.gen_range(lo..=hi))
        }
        LatencyModel::LogNormal { mean, sigma } => {
            let mean_ns = mean.as_nanos() as f64;
            let mu = mean_ns.ln() - sigma * sigma / 2.0;
            match LogNormal::new(mu, sigma) {
                Ok(d) => Duration::from_nanos(d.sample(rng).min(60e9) as u64),
                Err(_) => mean,
            }
        }
    }
}
