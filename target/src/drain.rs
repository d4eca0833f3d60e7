//! Waiting for a back end to give up the commands of a connection that is closing: the one
//! wait both front ends (`nbd::transmission`, `nvme_tcp::connection`) do at teardown.
//!
//! The wait is bounded twice: by the front end's own limit, and by the process's shutdown
//! deadline (`[service] shutdown_timeout`, set by [`crate::failstop`] when a stop signal
//! starts the shutdown) when that comes first. It does not busy-spin: after a poll that
//! reaped nothing it sleeps, doubling the pause from 10 µs up to 1 ms, and starts again from
//! 10 µs after any progress. It runs only at teardown, never per I/O.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// When the process gives up its shutdown (set once, at the stop signal).
static SHUTDOWN_DEADLINE: OnceLock<Instant> = OnceLock::new();

const FIRST_PAUSE: Duration = Duration::from_micros(10);
const MAX_PAUSE: Duration = Duration::from_millis(1);

/// Records the process's shutdown deadline: drains that start from now end by then.
pub(crate) fn set_shutdown_deadline(at: Instant) {
    let _ = SHUTDOWN_DEADLINE.set(at);
}

/// `limit` from now, or the shutdown deadline when that is earlier.
pub(crate) fn deadline(limit: Duration) -> Instant {
    capped(Instant::now() + limit, SHUTDOWN_DEADLINE.get().copied())
}

/// `own`, or `shutdown` when that is earlier.
fn capped(own: Instant, shutdown: Option<Instant>) -> Instant {
    shutdown.map_or(own, |d| d.min(own))
}

/// What one poll of a draining back end found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Drain {
    /// Nothing is left.
    Done,
    /// Some commands were reaped; more are left.
    Progress,
    /// Nothing was reaped.
    Idle,
}

/// Calls `poll` until it reports [`Drain::Done`] (true) or `until` passes (false), pausing
/// after idle polls as the module says.
pub(crate) fn wait(until: Instant, mut poll: impl FnMut() -> Drain) -> bool {
    let mut pause = FIRST_PAUSE;
    loop {
        match poll() {
            Drain::Done => return true,
            Drain::Progress => pause = FIRST_PAUSE,
            Drain::Idle => {
                let now = Instant::now();
                if now >= until {
                    return false;
                }
                std::thread::sleep(pause.min(until - now));
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_ends_when_the_back_end_is_empty() {
        let mut left = 3;
        let mut idle = 0;
        let done = wait(Instant::now() + Duration::from_secs(5), || {
            if left == 0 {
                return Drain::Done;
            }
            idle += 1;
            if idle % 4 == 0 {
                left -= 1;
                Drain::Progress
            } else {
                Drain::Idle
            }
        });
        assert!(done);
    }

    #[test]
    fn a_back_end_that_never_answers_is_given_up_at_the_bound_without_spinning() {
        let start = Instant::now();
        let mut polls = 0u32;
        let done = wait(start + Duration::from_millis(100), || {
            polls += 1;
            Drain::Idle
        });
        let took = start.elapsed();
        assert!(!done);
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        // About 100 pauses of up to 1 ms; a spinning wait polls millions of times.
        assert!(polls < 1000, "{polls} polls in {took:?}");
    }

    #[test]
    fn the_shutdown_deadline_caps_a_longer_own_limit() {
        let now = Instant::now();
        let (own, shutdown) = (
            now + Duration::from_secs(5),
            now + Duration::from_millis(50),
        );
        assert_eq!(capped(own, Some(shutdown)), shutdown);
        assert_eq!(capped(shutdown, Some(own)), shutdown);
        assert_eq!(capped(own, None), own);
    }
}
