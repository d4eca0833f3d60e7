//! Fault injection for any back end: wrap a device in a [`FaultyDevice`] and arm [`Fault`]s on
//! its [`FaultInjector`] at run time (tests, drills, the `leg_fault_inject` RPC).
//!
//! While nothing is armed, a command costs one relaxed atomic load more. Armed faults are
//! evaluated under a mutex: fault drills are not a hot path.
//!
//! A command held by a [`Fault::Hang`] never reached the wrapped device, so it can always be
//! cancelled: [`QueuePair::cancel`] completes it with Command Abort Requested at the next poll,
//! and closing the queue pair simply forgets it. Cancels for other commands go to the wrapped
//! device. [`FaultInjector::refuse_cancels`] models a back end that cannot cancel (a
//! controller that ignores Abort): hung commands then stay held until their fault is cleared.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::queue::{BlockDevice, Completion, IoCommand, IoOp, QueuePair, SubmitError};
use crate::spec::{Geometry, Status};
use crate::Result;

/// Which commands a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpFilter {
    Reads,
    /// Writes, Write Zeroes and Deallocate.
    Writes,
    All,
}

impl OpFilter {
    fn matches(self, op: IoOp) -> bool {
        match self {
            Self::Reads => op == IoOp::Read,
            Self::Writes => op.modifies(),
            Self::All => true,
        }
    }
}

/// A fault to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Commands of kind `ops` touching `[slba, slba + nlb)` fail with `status`.
    FailRange {
        ops: OpFilter,
        slba: u64,
        nlb: u64,
        status: Status,
    },
    /// The next `n` commands succeed; every command after them fails with `status`.
    FailAfter { n: u64, status: Status },
    /// Commands of kind `ops` never complete while armed; clearing the fault lets them go on.
    Hang { ops: OpFilter },
    /// As `Hang`, for commands of kind `ops` touching `[slba, slba + nlb)` only (a leg's
    /// metadata area, say, while its data blocks keep working).
    HangRange { ops: OpFilter, slba: u64, nlb: u64 },
    /// The device is gone: every command fails with a path error, DNR set.
    Gone,
}

/// What the injector decided for one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail(Status),
    Hang,
}

#[derive(Debug)]
struct Armed {
    id: u64,
    fault: Fault,
    /// Commands seen since arming (for `FailAfter`).
    seen: u64,
}

/// The shared fault switchboard of one device.
#[derive(Debug, Default)]
pub struct FaultInjector {
    /// Number of armed faults; zero means the fast path.
    armed: AtomicU64,
    /// Bumped whenever a fault is cleared, so hung queues re-check.
    epoch: AtomicU64,
    faults: Mutex<Vec<Armed>>,
    next_id: AtomicU64,
    /// Cancels of hung commands are refused (see [`refuse_cancels`](Self::refuse_cancels)).
    cancels_refused: AtomicBool,
}

impl FaultInjector {
    /// Arms a fault; returns its id for [`clear`](Self::clear).
    pub fn arm(&self, fault: Fault) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults.push(Armed { id, fault, seen: 0 });
        self.armed.store(faults.len() as u64, Ordering::Release);
        id
    }

    /// Clears one fault; false if no such id is armed.
    pub fn clear(&self, id: u64) -> bool {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let before = faults.len();
        faults.retain(|a| a.id != id);
        self.armed.store(faults.len() as u64, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::Release);
        faults.len() != before
    }

    /// Clears every fault.
    pub fn clear_all(&self) {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults.clear();
        self.armed.store(0, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::Release);
    }

    /// While `refuse` is set, a cancel of a command held by a hang is refused: the command
    /// stays held, as on a controller that ignores Abort, until its fault is cleared.
    pub fn refuse_cancels(&self, refuse: bool) {
        self.cancels_refused.store(refuse, Ordering::Release);
    }

    /// The faults armed now.
    pub fn armed(&self) -> Vec<(u64, Fault)> {
        let faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults.iter().map(|a| (a.id, a.fault)).collect()
    }

    #[inline]
    fn verdict(&self, cmd: &IoCommand) -> Verdict {
        if self.armed.load(Ordering::Acquire) == 0 {
            return Verdict::Pass;
        }
        self.verdict_slow(cmd)
    }

    #[cold]
    fn verdict_slow(&self, cmd: &IoCommand) -> Verdict {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let mut verdict = Verdict::Pass;
        for a in faults.iter_mut() {
            let v = match a.fault {
                Fault::Gone => Verdict::Fail(Status::HOST_PATHING_ERROR.with_dnr()),
                Fault::FailAfter { n, status } => {
                    a.seen += 1;
                    if a.seen > n {
                        Verdict::Fail(status)
                    } else {
                        Verdict::Pass
                    }
                }
                Fault::FailRange {
                    ops,
                    slba,
                    nlb,
                    status,
                } => {
                    let end = cmd.slba.saturating_add(u64::from(cmd.nlb));
                    let hits = cmd.op != IoOp::Flush
                        && ops.matches(cmd.op)
                        && cmd.slba < slba.saturating_add(nlb)
                        && slba < end;
                    if hits {
                        Verdict::Fail(status)
                    } else {
                        Verdict::Pass
                    }
                }
                Fault::Hang { ops } if ops.matches(cmd.op) => Verdict::Hang,
                Fault::Hang { .. } => Verdict::Pass,
                Fault::HangRange { ops, slba, nlb } => {
                    let end = cmd.slba.saturating_add(u64::from(cmd.nlb));
                    let hits = cmd.op != IoOp::Flush
                        && ops.matches(cmd.op)
                        && cmd.slba < slba.saturating_add(nlb)
                        && slba < end;
                    if hits {
                        Verdict::Hang
                    } else {
                        Verdict::Pass
                    }
                }
            };
            if verdict == Verdict::Pass {
                verdict = v;
            }
        }
        verdict
    }

    fn hang_armed(&self) -> bool {
        let faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults
            .iter()
            .any(|a| matches!(a.fault, Fault::Hang { .. } | Fault::HangRange { .. }))
    }
}

/// Any device, with a [`FaultInjector`] in front of it.
#[derive(Debug)]
pub struct FaultyDevice {
    inner: Arc<dyn BlockDevice>,
    injector: Arc<FaultInjector>,
}

impl FaultyDevice {
    pub fn wrap(inner: Arc<dyn BlockDevice>) -> Self {
        Self {
            inner,
            injector: Arc::new(FaultInjector::default()),
        }
    }

    /// The switchboard shared by every queue pair of this device.
    pub fn injector(&self) -> &Arc<FaultInjector> {
        &self.injector
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
}

impl BlockDevice for FaultyDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>> {
        Ok(Box::new(FaultyQueuePair {
            inner: self.inner.open_qpair(depth)?,
            injector: Arc::clone(&self.injector),
            failed: VecDeque::with_capacity(depth as usize),
            hung: Vec::with_capacity(depth as usize),
            hung_epoch: 0,
        }))
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn link(&self) -> Option<crate::LinkStatus> {
        self.inner.link()
    }

    fn link_generation(&self) -> Option<u64> {
        self.inner.link_generation()
    }

    fn volatile_write_cache(&self) -> bool {
        self.inner.volatile_write_cache()
    }

    fn reservations(&self) -> Option<&dyn crate::Reservations> {
        self.inner.reservations()
    }

    fn staging_reservations(&self) -> Option<&dyn crate::Reservations> {
        self.inner.staging_reservations()
    }

    fn replication(&self) -> Option<crate::ReplicationStatus> {
        self.inner.replication()
    }

    fn set_replication_mode(
        &self,
        mode: &str,
        limit: std::time::Duration,
    ) -> Option<std::result::Result<(), String>> {
        self.inner.set_replication_mode(mode, limit)
    }

    fn cycle_now(&self, limit: std::time::Duration) -> Option<std::result::Result<u64, String>> {
        self.inner.cycle_now(limit)
    }

    fn catch_up(&self, on: bool) {
        self.inner.catch_up(on);
    }
}

#[derive(Debug)]
struct FaultyQueuePair {
    inner: Box<dyn QueuePair>,
    injector: Arc<FaultInjector>,
    /// Completions the injector made up.
    failed: VecDeque<Completion>,
    /// Commands held by a `Hang` fault.
    hung: Vec<IoCommand>,
    /// Injector epoch when the hung commands were last checked.
    hung_epoch: u64,
}

impl QueuePair for FaultyQueuePair {
    fn depth(&self) -> u32 {
        self.inner.depth()
    }

    fn outstanding(&self) -> u32 {
        self.inner.outstanding() + (self.failed.len() + self.hung.len()) as u32
    }

    #[inline]
    unsafe fn submit(&mut self, cmd: IoCommand) -> std::result::Result<(), SubmitError> {
        match self.injector.verdict(&cmd) {
            // SAFETY: forwarded from our caller's promise.
            Verdict::Pass if self.failed.is_empty() && self.hung.is_empty() => unsafe {
                self.inner.submit(cmd)
            },
            verdict => {
                if self.outstanding() >= self.depth() {
                    return Err(SubmitError::QueueFull);
                }
                match verdict {
                    // SAFETY: forwarded from our caller's promise.
                    Verdict::Pass => unsafe { self.inner.submit(cmd) },
                    Verdict::Fail(status) => {
                        self.failed.push_back(Completion {
                            tag: cmd.tag,
                            status,
                        });
                        Ok(())
                    }
                    Verdict::Hang => {
                        self.hung.push(cmd);
                        Ok(())
                    }
                }
            }
        }
    }

    fn cancel(&mut self, tags: &[u64]) -> usize {
        let mut issued = 0;
        for &tag in tags {
            if let Some(i) = self.hung.iter().position(|c| c.tag == tag) {
                if self.injector.cancels_refused.load(Ordering::Acquire) {
                    continue;
                }
                self.hung.swap_remove(i);
                self.failed.push_back(Completion {
                    tag,
                    status: Status::ABORT_REQUESTED,
                });
                issued += 1;
            } else {
                issued += self.inner.cancel(std::slice::from_ref(&tag));
            }
        }
        issued
    }

    fn close(mut self: Box<Self>) -> crate::Fence {
        if self.hung.is_empty() || !self.injector.cancels_refused.load(Ordering::Acquire) {
            // Hung commands never reached the wrapped device: nothing can act on them.
            return self.inner.close();
        }
        // A back end that cannot cancel keeps what it was given: a reaper runs the hung
        // commands once the hang is cleared (late, into the buffers they were given) and
        // signals the fence when every one is reaped.
        let (fence, signal) = crate::Fence::pending();
        std::thread::spawn(move || {
            let mut out = [Completion::default(); 8];
            while self.outstanding() > 0 {
                self.poll(&mut out);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.inner.close().then(move || signal.signal());
        });
        fence
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if !self.hung.is_empty() {
            let epoch = self.injector.epoch.load(Ordering::Acquire);
            if epoch != self.hung_epoch {
                self.hung_epoch = epoch;
                if !self.injector.hang_armed() {
                    for cmd in std::mem::take(&mut self.hung) {
                        // SAFETY: the command was submitted to us under the submit contract,
                        // which still holds: it has not completed.
                        if unsafe { self.inner.submit(cmd) }.is_err() {
                            self.hung.push(cmd);
                        }
                    }
                }
            }
        }
        let mut n = 0;
        while n < out.len() {
            match self.failed.pop_front() {
                Some(c) => {
                    out[n] = c;
                    n += 1;
                }
                None => break,
            }
        }
        n + self.inner.poll(&mut out[n..])
    }
}
