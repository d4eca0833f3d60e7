//! Fences: learning, without blocking, when a closed queue pair's commands are over.
//!
//! [`QueuePair::close`](crate::QueuePair::close) never waits for the device. A queue pair that
//! still has commands in a back end that cannot stop them at once (io_uring block I/O already
//! in the kernel) hands them to a reaper and returns a pending [`Fence`]; the reaper signals
//! it once every command is reaped or cancelled. Until then the back end may still write the
//! medium and read or fill the commands' buffers, so a caller keeps the buffers alive (and
//! the leg busy) until the fence is done: it polls [`Fence::is_done`] or hangs the release
//! on [`Fence::then`].
//!
//! A fence is a control-path object (closing a queue pair allocates anyway): its state sits
//! behind a mutex and the callbacks are boxed.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

type Callback = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct FenceState {
    /// Set once, by the signal, before the callbacks run.
    done: AtomicBool,
    /// Callbacks waiting for the signal (empty once `done`).
    then: Mutex<Vec<Callback>>,
}

/// The end of a closed queue pair's commands: done once none of them can touch its buffers
/// or the medium any more. Cloning shares the same end.
#[derive(Clone, Default)]
pub struct Fence {
    /// `None`: done from the start.
    state: Option<Arc<FenceState>>,
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fence")
            .field("done", &self.is_done())
            .finish()
    }
}

/// The other end of a pending [`Fence`], held by whoever reaps the commands. Dropping it
/// without [`signal`](Self::signal) leaves the fence pending for good: a reaper that cannot
/// prove its commands are over must not claim they are.
pub struct FenceSignal {
    state: Arc<FenceState>,
}

impl fmt::Debug for FenceSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FenceSignal")
    }
}

impl Fence {
    /// A fence that is done already (a queue pair closed with nothing in flight).
    pub fn done() -> Self {
        Self { state: None }
    }

    /// A pending fence and the signal that ends it.
    pub fn pending() -> (Self, FenceSignal) {
        let state = Arc::new(FenceState::default());
        (
            Self {
                state: Some(Arc::clone(&state)),
            },
            FenceSignal { state },
        )
    }

    /// Whether every command is reaped or cancelled.
    pub fn is_done(&self) -> bool {
        match &self.state {
            None => true,
            Some(s) => s.done.load(Ordering::Acquire),
        }
    }

    /// Runs `f` once the fence is done: now, on this thread, if it is already; otherwise on
    /// the thread that signals it, right after the signal.
    pub fn then(&self, f: impl FnOnce() + Send + 'static) {
        let Some(state) = &self.state else {
            f();
            return;
        };
        let mut then = state.then.lock().unwrap_or_else(|e| e.into_inner());
        if state.done.load(Ordering::Acquire) {
            drop(then);
            f();
        } else {
            then.push(Box::new(f));
        }
    }

    /// A fence that is done when every one of `fences` is.
    pub fn all(fences: impl IntoIterator<Item = Fence>) -> Self {
        let pending: Vec<Fence> = fences.into_iter().filter(|f| !f.is_done()).collect();
        if pending.is_empty() {
            return Self::done();
        }
        let (fence, signal) = Self::pending();
        let left = Arc::new(AtomicUsize::new(pending.len()));
        let signal = Arc::new(Mutex::new(Some(signal)));
        for f in pending {
            let (left, signal) = (Arc::clone(&left), Arc::clone(&signal));
            f.then(move || {
                if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let s = signal.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(s) = s {
                        s.signal();
                    }
                }
            });
        }
        fence
    }
}

impl FenceSignal {
    /// Every command is over: marks the fence done and runs its callbacks.
    pub fn signal(self) {
        let callbacks = {
            let mut then = self.state.then.lock().unwrap_or_else(|e| e.into_inner());
            self.state.done.store(true, Ordering::Release);
            std::mem::take(&mut *then)
        };
        for f in callbacks {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_run_once_at_the_signal_or_at_once_when_done() {
        let ran = Arc::new(AtomicUsize::new(0));
        let bump = |ran: &Arc<AtomicUsize>| {
            let ran = Arc::clone(ran);
            move || {
                ran.fetch_add(1, Ordering::SeqCst);
            }
        };
        Fence::done().then(bump(&ran));
        assert_eq!(ran.load(Ordering::SeqCst), 1);

        let (fence, signal) = Fence::pending();
        fence.then(bump(&ran));
        fence.clone().then(bump(&ran));
        assert!(!fence.is_done());
        assert_eq!(
            ran.load(Ordering::SeqCst),
            1,
            "nothing runs before the signal"
        );
        signal.signal();
        assert!(fence.is_done());
        assert_eq!(ran.load(Ordering::SeqCst), 3);
        fence.then(bump(&ran));
        assert_eq!(ran.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn all_waits_for_every_fence_and_a_dropped_signal_never_ends_one() {
        let (a, sa) = Fence::pending();
        let (b, sb) = Fence::pending();
        let both = Fence::all([a, Fence::done(), b]);
        assert!(!both.is_done());
        sa.signal();
        assert!(!both.is_done(), "one is still out");
        sb.signal();
        assert!(both.is_done());
        assert!(Fence::all([]).is_done());

        let (c, sc) = Fence::pending();
        drop(sc);
        assert!(!c.is_done());
    }
}
