//! Fail-stop: `nvmirror serve` never lives on with a dead data path.
//!
//! - A panic on any thread (reactor, front end, RPC, metrics, bitmap clearer) logs one line
//!   naming the thread and where, then aborts the process: a volume whose reactor died would
//!   otherwise look alive while every host I/O on that core hangs. Crash recovery (superblock
//!   and write-intent bitmap) brings the volumes back at the next start.
//! - A reactor that has not finished a loop iteration for `stall_timeout` is stuck (a poller
//!   that blocks, a leg that never returns): the watchdog aborts the process the same way.
//! - A stop signal starts a deadline: when draining takes longer than `shutdown_timeout`, the
//!   process exits with status 1 without marking the volumes clean; a second signal exits at
//!   once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_poller::ReactorHandle;

/// Exit status after a shutdown that had to give up draining.
pub const EXIT_SHUTDOWN_TIMEOUT: i32 = 3;

/// Makes every panic end the process (after the default report and one error log line).
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            thread = name,
            at,
            "panic: aborting (fail-stop); restart to recover"
        );
        eprintln!("nvmirror: panic on thread '{name}' at {at}: aborting (fail-stop)");
        std::process::abort();
    }));
}

/// Aborts the process when a reactor stops making progress for `limit`.
pub fn start_watchdog(reactors: ReactorHandle, limit: Duration, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("nvmirror-watchdog".into())
        .spawn(move || {
            let n = reactors.count();
            let count = |i: usize| {
                reactors
                    .stats(i)
                    .map(|s| s.iterations.load(Ordering::Relaxed))
                    .unwrap_or(0)
            };
            let mut last: Vec<(u64, Instant)> =
                (0..n).map(|i| (count(i), Instant::now())).collect();
            let tick = (limit / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(tick);
                let now = Instant::now();
                for (i, seen) in last.iter_mut().enumerate() {
                    let c = count(i);
                    if c != seen.0 {
                        *seen = (c, now);
                    } else if now.duration_since(seen.1) >= limit && !stop.load(Ordering::Acquire) {
                        tracing::error!(
                            reactor = i,
                            stalled_s = now.duration_since(seen.1).as_secs_f64(),
                            "reactor stuck: aborting (fail-stop); restart to recover"
                        );
                        eprintln!(
                            "nvmirror: reactor {i} made no progress for {:?}: aborting (fail-stop)",
                            now.duration_since(seen.1)
                        );
                        std::process::abort();
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no reactor watchdog: {e}");
    }
}

/// Bounds the shutdown that starts now: after `limit` the process exits with
/// [`EXIT_SHUTDOWN_TIMEOUT`], whatever is still draining.
pub fn start_shutdown_deadline(limit: Duration) {
    // Front ends waiting for their back ends at teardown stop waiting by then (`drain`).
    crate::drain::set_shutdown_deadline(Instant::now() + limit);
    let spawned = std::thread::Builder::new()
        .name("nvmirror-deadline".into())
        .spawn(move || {
            std::thread::sleep(limit);
            tracing::error!(
                timeout_s = limit.as_secs_f64(),
                "shutdown did not finish in time: exiting without marking volumes clean; \
                 the next start recovers from the write-intent bitmap"
            );
            eprintln!("nvmirror: shutdown gave up after {limit:?}");
            std::process::exit(EXIT_SHUTDOWN_TIMEOUT);
        });
    if let Err(e) = spawned {
        tracing::warn!("no shutdown deadline: {e}");
    }
}
