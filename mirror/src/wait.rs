//! Waiting for commands off the data path. The control plane (`metadata.rs`) and the journal
//! threads (`journal/`) submit a few commands and wait for them on threads of their own, never
//! on a reactor. They wait by one rule: spin for a moment after work (the next completion of
//! a busy device is microseconds away), then yield, then sleep in short steps, so a thread
//! waiting on a slow or distant device does not hold a core; and every wait has a deadline,
//! so a device that stops answering ends the wait instead of stalling the thread for good.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nvmirror_nvme::{Completion, IoCommand, QueuePair, SubmitError};

/// Spin, then yield, then sleep, measured from the last work.
pub(crate) struct Backoff {
    since: Option<Instant>,
}

impl Backoff {
    /// Spinning this long after the last work.
    const SPIN: Duration = Duration::from_micros(50);
    /// Yielding until this long after it; sleeping after that.
    const YIELD: Duration = Duration::from_millis(2);
    /// One sleep.
    const SLEEP: Duration = Duration::from_micros(50);

    pub(crate) fn new() -> Self {
        Self { since: None }
    }

    /// Work was found: the next wait spins again.
    pub(crate) fn worked(&mut self) {
        self.since = None;
    }

    /// Waits a little, longer the longer nothing has come.
    pub(crate) fn wait(&mut self) {
        let idle = self.since.get_or_insert_with(Instant::now).elapsed();
        if idle < Self::SPIN {
            std::hint::spin_loop();
        } else if idle < Self::YIELD {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Self::SLEEP);
        }
    }
}

/// Sleeps `d` in short steps; false as soon as `stop` is set.
pub(crate) fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5).min(d));
    }
    true
}

/// How a wait for completions ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Polled {
    /// This many completions are in the output.
    Got(usize),
    /// Nothing came before the deadline.
    TimedOut,
    /// The stop flag was set first.
    Stopped,
}

/// Polls `qp` into `out` until a completion comes, `deadline` passes or `stop` is set.
pub(crate) fn poll_until(
    qp: &mut dyn QueuePair,
    out: &mut [Completion],
    deadline: Instant,
    stop: Option<&AtomicBool>,
) -> Polled {
    let mut backoff = Backoff::new();
    loop {
        let n = qp.poll(out);
        if n > 0 {
            return Polled::Got(n);
        }
        if stop.is_some_and(|s| s.load(Ordering::Acquire)) {
            return Polled::Stopped;
        }
        if Instant::now() >= deadline {
            return Polled::TimedOut;
        }
        backoff.wait();
    }
}

/// How one command waited for ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Waited {
    /// Its completion.
    Done(Completion),
    /// The queue pair did not take it.
    Refused(SubmitError),
    /// No completion within the timeout: the device may still act on the command.
    TimedOut,
    /// The stop flag was set first: the device may still act on the command.
    Stopped,
}

/// Submits `cmd` on `qp`, which has nothing else in flight, and waits for its completion, at
/// most `timeout`.
///
/// # Safety
///
/// As [`QueuePair::submit`]: `cmd`'s buffer stays valid and untouched until the command is
/// reaped. After [`Waited::TimedOut`] or [`Waited::Stopped`] it is not: the buffer then
/// belongs to the command until the queue pair is closed and its fence is done.
pub(crate) unsafe fn run_one(
    qp: &mut dyn QueuePair,
    cmd: IoCommand,
    timeout: Duration,
    stop: Option<&AtomicBool>,
) -> Waited {
    // SAFETY: the caller's promise for the buffer, as documented above.
    if let Err(e) = unsafe { qp.submit(cmd) } {
        return Waited::Refused(e);
    }
    let mut out = [Completion::default()];
    match poll_until(qp, &mut out, Instant::now() + timeout, stop) {
        Polled::Got(_) => Waited::Done(out[0]),
        Polled::TimedOut => Waited::TimedOut,
        Polled::Stopped => Waited::Stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice, OpFilter};
    use nvmirror_nvme::{BlockDevice, IoOp};
    use std::sync::Arc;

    fn mem() -> Arc<dyn BlockDevice> {
        Arc::new(MemDevice::new(1 << 20, 512, LatencyModel::None).unwrap())
    }

    #[test]
    fn a_command_that_completes_is_done_and_one_that_hangs_times_out() {
        let mut qp = mem().open_qpair(2).unwrap();
        // SAFETY: no buffer.
        let w = unsafe {
            run_one(
                &mut *qp,
                IoCommand::new(IoOp::Flush, 0, 0, 7),
                Duration::from_secs(5),
                None,
            )
        };
        assert!(matches!(w, Waited::Done(c) if c.tag == 7 && c.status.is_success()));

        let faulty = FaultyDevice::wrap(mem());
        faulty.injector().arm(Fault::Hang { ops: OpFilter::All });
        let mut qp = faulty.open_qpair(2).unwrap();
        let t0 = Instant::now();
        // SAFETY: no buffer.
        let w = unsafe {
            run_one(
                &mut *qp,
                IoCommand::new(IoOp::Flush, 0, 0, 8),
                Duration::from_millis(50),
                None,
            )
        };
        assert!(matches!(w, Waited::TimedOut), "{w:?}");
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let stop = AtomicBool::new(true);
        let mut out = [Completion::default()];
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            poll_until(&mut *qp, &mut out, far, Some(&stop)),
            Polled::Stopped
        );
    }
}
