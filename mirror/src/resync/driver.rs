//! What the resync and verify jobs share about being driven: a non-blocking step, an end,
//! and a status — run on a reactor as a poller, or to the end on a thread of their own.

use std::time::{Duration, Instant};

use nvmirror_poller::PollStatus;

/// A background job over a volume's legs.
pub(crate) trait BackgroundJob {
    type Status;

    /// Does a bounded amount of work; true if there was any.
    fn step(&mut self, now: Instant) -> bool;

    /// Whether the job has ended (done, cancelled or failed).
    fn ended(&self) -> bool;

    /// The job's progress now.
    fn report(&self) -> Self::Status;
}

/// One reactor iteration of `job`: Busy when it worked, Done once it has ended.
pub(crate) fn reactor_step(job: &mut impl BackgroundJob, now: Instant) -> PollStatus {
    if job.step(now) {
        PollStatus::Busy
    } else if job.ended() {
        PollStatus::Done
    } else {
        PollStatus::Idle
    }
}

/// Steps `job` on this thread until it ends, napping briefly while it is idle.
pub(crate) fn run_to_end<J: BackgroundJob>(job: &mut J) -> J::Status {
    while !job.ended() {
        if !job.step(Instant::now()) {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    job.report()
}
