//! What every io_uring queue pair shares, whatever its entry sizes: building the ring, and
//! the reaper that waits out a closed ring's commands on its own thread. The file back end
//! ([`UringQueuePair`](super::UringQueuePair), 64-byte SQEs) and the NVMe passthrough back end
//! ([`NgQueuePair`](crate::backend::ng::NgQueuePair), 128-byte SQEs and 32-byte CQEs) both use
//! them.

use std::io;
use std::sync::{Arc, Mutex};

use io_uring::{cqueue, opcode, squeue, IoUring};

use crate::fence::Fence;

/// A ring of `entries` SQEs (twice as many CQEs, so it never overflows: at most `depth`
/// commands are in the kernel). Without SQPOLL, task work runs only when we enter the kernel
/// and is flagged in the SQ ring (COOP_TASKRUN + TASKRUN_FLAG); kernels older than 5.19
/// refuse those flags and get a plain ring. The entry types pick SQE128/CQE32.
pub(crate) fn build_ring<S, C>(entries: u32, sqpoll: Option<u32>) -> io::Result<IoUring<S, C>>
where
    S: squeue::EntryMarker,
    C: cqueue::EntryMarker,
{
    let mut builder = IoUring::<S, C>::builder();
    match sqpoll {
        Some(idle_ms) => {
            builder.setup_sqpoll(idle_ms);
        }
        None => {
            builder.setup_coop_taskrun().setup_taskrun_flag();
        }
    }
    match builder.build(entries) {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && sqpoll.is_none() => {
            IoUring::<S, C>::builder()
                .build(entries)
                .map_err(|e| super::sys::named("io_uring_setup", e))
        }
        Err(e) => Err(super::sys::named("io_uring_setup", e)),
    }
}

/// User data of `ASYNC_CANCEL` SQEs: above every command's (its slot index), so CQEs at or
/// above the depth are skipped.
const CANCEL_USER_DATA: u64 = u64::MAX;

/// Queues an `ASYNC_CANCEL` of the command whose user data is `target`; `false` when the SQ
/// is full.
pub(crate) fn push_cancel<E: squeue::EntryMarker>(
    sq: &mut squeue::SubmissionQueue<'_, E>,
    target: u64,
) -> bool {
    let entry = E::from(
        opcode::AsyncCancel::new(target)
            .build()
            .user_data(CANCEL_USER_DATA),
    );
    // SAFETY: a cancel SQE points at no memory.
    unsafe { sq.push(&entry) }.is_ok()
}

/// A closed queue pair's ring with commands still in the kernel, and what they use (`keep`:
/// buffers, range lists) so it outlives them.
struct Retired<S: squeue::EntryMarker, C: cqueue::EntryMarker, K> {
    ring: IoUring<S, C>,
    _keep: K,
    /// CQEs with user data below this are commands; the rest (cancels) are skipped.
    depth: u64,
    /// Commands whose last CQE has not come yet.
    in_kernel: usize,
}

impl<S: squeue::EntryMarker, C: cqueue::EntryMarker, K> Retired<S, C, K> {
    /// Waits for every command still in the kernel, then unregisters the files (ending the
    /// device's claim). Blocks: runs on the reaper thread.
    fn reap(&mut self) {
        while self.in_kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, in_kernel = self.in_kernel, "io_uring reaper cannot wait; the commands' buffers are kept for good");
                    return;
                }
            }
            for cqe in self.ring.completion() {
                if cqueue::EntryMarker::user_data(&cqe) < self.depth {
                    self.in_kernel -= 1;
                }
            }
        }
        let _ = self.ring.submitter().unregister_files();
    }
}

/// Ends a closed queue pair's ring without blocking the caller. With nothing in the kernel
/// the files are unregistered at once. Otherwise the caller has queued its cancels already;
/// they (and any SQE not yet sent) are submitted from this thread, and a reaper thread waits
/// for the `in_kernel` commands whose user data is below `depth`, unregisters the files, drops
/// `keep` and signals the returned fence. Where no thread can be started it waits here.
pub(crate) fn retire_ring<S, C, K>(
    ring: IoUring<S, C>,
    keep: K,
    depth: u64,
    in_kernel: usize,
) -> Fence
where
    S: squeue::EntryMarker + 'static,
    C: cqueue::EntryMarker + 'static,
    K: Send + 'static,
{
    if in_kernel == 0 {
        let _ = ring.submitter().unregister_files();
        return Fence::done();
    }
    // Sends the cancels (and any SQE not yet sent); waits for nothing.
    let _ = ring.submitter().submit();
    tracing::debug!(
        in_kernel,
        "io_uring queue pair closed with commands in the kernel; a reaper waits for them"
    );
    let (fence, signal) = Fence::pending();
    let retired = Arc::new(Mutex::new(Some(Retired {
        ring,
        _keep: keep,
        depth,
        in_kernel,
    })));
    let theirs = Arc::clone(&retired);
    let spawned = std::thread::Builder::new()
        .name("uring-reaper".into())
        .spawn(move || {
            let taken = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(mut r) = taken {
                r.reap();
                if r.in_kernel == 0 {
                    drop(r);
                    signal.signal();
                } else {
                    // The kernel may still use the buffers: never let them be freed.
                    std::mem::forget(r);
                }
            }
        });
    if let Err(e) = spawned {
        // No thread to hand it to (its signal went with it): the one safe answer left is to
        // wait here.
        tracing::error!(error = %e, "cannot start an io_uring reaper; waiting for the commands on this thread");
        let taken = retired.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut r) = taken {
            r.reap();
            if r.in_kernel == 0 {
                return Fence::done();
            }
            // The kernel may still use the buffers: never let them be freed.
            std::mem::forget(r);
        }
    }
    fence
}
