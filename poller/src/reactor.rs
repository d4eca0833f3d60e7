//! One reactor: the loop a pinned core runs — a batch of cross-core messages, every
//! registered poller, then due timers — with busy/idle time accounting.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pool::{ReactorHandle, Shared};
use crate::timer::{Timer, TimerAction, TimerFn};

/// What one call of a poller achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollStatus {
    /// Did work.
    Busy,
    /// Found nothing to do.
    Idle,
    /// Finished for good: unregister it.
    Done,
}

/// Work a reactor runs on every iteration (a connection, a queue pair, a resync job).
pub trait Poller: Send {
    /// Does a bounded amount of work and says whether there was any.
    fn poll(&mut self, ctx: &mut ReactorContext) -> PollStatus;

    /// Called once on the reactor when the poller is removed (by `Done` or shutdown).
    fn stop(&mut self, _ctx: &mut ReactorContext) {}
}

/// A cross-core message: a closure run on the target reactor.
pub type Message = Box<dyn FnOnce(&mut ReactorContext) + Send>;

/// What the reactor loop does when an iteration found no work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IdlePolicy {
    /// Busy-poll forever (lowest latency; the SPDK default).
    #[default]
    Spin,
    /// Spin for `spin`, then sleep up to `sleep` at a time until a message or timer is due.
    SpinThenSleep { spin: Duration, sleep: Duration },
}

/// Counters of one reactor, readable from any thread.
#[derive(Debug, Default)]
pub struct ReactorStats {
    /// Nanoseconds spent in iterations that did work.
    pub busy_ns: AtomicU64,
    /// Nanoseconds spent in iterations that found nothing (sleep included).
    pub idle_ns: AtomicU64,
    /// Loop iterations.
    pub iterations: AtomicU64,
    /// Messages run.
    pub messages: AtomicU64,
    /// Pollers registered now.
    pub pollers: AtomicU64,
}

impl ReactorStats {
    /// Busy share of the accounted time, 0.0..=1.0.
    pub fn busy_ratio(&self) -> f64 {
        let busy = self.busy_ns.load(Ordering::Relaxed) as f64;
        let idle = self.idle_ns.load(Ordering::Relaxed) as f64;
        if busy + idle == 0.0 {
            0.0
        } else {
            busy / (busy + idle)
        }
    }
}

/// What pollers, timers and messages see of their reactor.
#[derive(Debug)]
pub struct ReactorContext {
    index: usize,
    handle: ReactorHandle,
    new_pollers: Vec<Box<dyn Poller>>,
    timers: Vec<Timer>,
    new_timers: Vec<Timer>,
    now: Instant,
}

impl std::fmt::Debug for dyn Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Poller")
    }
}

impl ReactorContext {
    /// Index of this reactor in its pool.
    pub fn index(&self) -> usize {
        self.index
    }

    /// A handle for messaging any reactor of the pool.
    pub fn handle(&self) -> &ReactorHandle {
        &self.handle
    }

    /// The time at the start of this loop iteration.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Adds a poller to this reactor; it runs from the next iteration on.
    pub fn register_poller(&mut self, poller: Box<dyn Poller>) {
        self.new_pollers.push(poller);
    }

    /// Runs `f` on this reactor every `period`, first after one period.
    pub fn add_timer(&mut self, period: Duration, f: TimerFn) {
        self.new_timers.push(Timer {
            due: self.now + period,
            period,
            f,
        });
    }
}

pub(crate) struct Reactor {
    ctx: ReactorContext,
    pollers: Vec<Box<dyn Poller>>,
    shared: Arc<Shared>,
    idle: IdlePolicy,
}

/// Messages run per iteration before the pollers get their turn.
const MESSAGE_BATCH: usize = 32;

impl Reactor {
    pub(crate) fn new(
        index: usize,
        handle: ReactorHandle,
        shared: Arc<Shared>,
        idle: IdlePolicy,
    ) -> Self {
        let ctx = ReactorContext {
            index,
            handle,
            new_pollers: Vec::new(),
            timers: Vec::new(),
            new_timers: Vec::new(),
            now: Instant::now(),
        };
        Self {
            ctx,
            pollers: Vec::new(),
            shared,
            idle,
        }
    }

    /// Runs until the pool is shut down.
    pub(crate) fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let me = &shared.reactors[self.ctx.index];
        let stop: &AtomicBool = &shared.stop;
        let mut idle_since: Option<Instant> = None;
        let mut last = Instant::now();
        while !stop.load(Ordering::Acquire) {
            self.ctx.now = last;
            let busy = self.iterate();
            let now = Instant::now();
            let spent = now.duration_since(last).as_nanos() as u64;
            let counter = if busy {
                &me.stats.busy_ns
            } else {
                &me.stats.idle_ns
            };
            counter.fetch_add(spent, Ordering::Relaxed);
            me.stats.iterations.fetch_add(1, Ordering::Relaxed);
            last = now;
            if busy {
                idle_since = None;
                continue;
            }
            match self.idle {
                IdlePolicy::Spin => std::hint::spin_loop(),
                IdlePolicy::SpinThenSleep { spin, sleep } => {
                    let since = *idle_since.get_or_insert(now);
                    if now.duration_since(since) >= spin {
                        let nap = self.next_timer_in(now).map_or(sleep, |t| t.min(sleep));
                        me.sleeping.store(true, Ordering::SeqCst);
                        if me.ring.is_empty() && !stop.load(Ordering::SeqCst) {
                            std::thread::park_timeout(nap);
                        }
                        me.sleeping.store(false, Ordering::SeqCst);
                        let woke = Instant::now();
                        me.stats.idle_ns.fetch_add(
                            woke.duration_since(last).as_nanos() as u64,
                            Ordering::Relaxed,
                        );
                        last = woke;
                    }
                }
            }
        }
        let ctx = &mut self.ctx;
        for mut p in self
            .pollers
            .drain(..)
            .chain(ctx.new_pollers.drain(..).collect::<Vec<_>>())
        {
            p.stop(ctx);
        }
        me.stats.pollers.store(0, Ordering::Relaxed);
    }

    /// One iteration: messages, pollers, timers. True if anything did work.
    fn iterate(&mut self) -> bool {
        let me = &self.shared.reactors[self.ctx.index];
        let mut busy = false;
        for _ in 0..MESSAGE_BATCH {
            // SAFETY: a reactor's ring is popped by that reactor's thread alone.
            match unsafe { me.ring.pop() } {
                Some(msg) => {
                    msg(&mut self.ctx);
                    me.stats.messages.fetch_add(1, Ordering::Relaxed);
                    busy = true;
                }
                None => break,
            }
        }
        let mut i = 0;
        while i < self.pollers.len() {
            match self.pollers[i].poll(&mut self.ctx) {
                PollStatus::Busy => {
                    busy = true;
                    i += 1;
                }
                PollStatus::Idle => i += 1,
                PollStatus::Done => {
                    let mut p = self.pollers.swap_remove(i);
                    p.stop(&mut self.ctx);
                    busy = true;
                }
            }
        }
        if !self.ctx.new_pollers.is_empty() {
            self.pollers.append(&mut self.ctx.new_pollers);
        }
        me.stats
            .pollers
            .store(self.pollers.len() as u64, Ordering::Relaxed);
        if !self.ctx.new_timers.is_empty() {
            self.ctx.timers.append(&mut self.ctx.new_timers);
        }
        if !self.ctx.timers.is_empty() {
            busy |= self.run_timers();
        }
        busy
    }

    fn run_timers(&mut self) -> bool {
        let now = Instant::now();
        if !self.ctx.timers.iter().any(|t| t.due <= now) {
            return false;
        }
        let mut timers = std::mem::take(&mut self.ctx.timers);
        timers.retain_mut(|t| {
            if t.due > now {
                return true;
            }
            t.due = now + t.period;
            (t.f)(&mut self.ctx) == TimerAction::Repeat
        });
        timers.append(&mut self.ctx.timers);
        self.ctx.timers = timers;
        true
    }

    fn next_timer_in(&self, now: Instant) -> Option<Duration> {
        self.ctx
            .timers
            .iter()
            .map(|t| t.due.saturating_duration_since(now))
            .min()
    }
}
