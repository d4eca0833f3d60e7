//! A job's own queue pairs on the legs it reads and writes, opened when first needed. They are
//! separate from every host queue pair, so the job never touches a core's join table.

use nvmirror_nvme::{Completion, Fence, IoCommand, IoOp, QueuePair, SubmitError};

use crate::legs::MAX_LEGS;
use crate::volume::VolumeShared;

/// One queue pair per leg, opened lazily.
#[derive(Debug)]
pub(crate) struct LegChannels {
    qps: [Option<Box<dyn QueuePair>>; MAX_LEGS],
    /// Commands submitted and not yet reaped, per leg.
    inflight: [u32; MAX_LEGS],
    depth: u32,
    /// First block of the exported namespace on every leg (after a persistent volume's
    /// metadata area): job commands carry volume LBAs and are shifted by it here.
    data_lba: u64,
}

impl LegChannels {
    pub(crate) fn new(depth: u32) -> Self {
        Self {
            qps: Default::default(),
            inflight: [0; MAX_LEGS],
            depth,
            data_lba: 0,
        }
    }

    /// Opens a queue pair on `leg` if there is none yet.
    pub(crate) fn open(&mut self, vol: &VolumeShared, leg: usize) -> Result<(), String> {
        self.data_lba = vol.data_lba;
        if self.qps[leg].is_some() {
            return Ok(());
        }
        let shared = vol
            .leg(leg)
            .ok_or_else(|| format!("leg {leg} does not exist"))?;
        let qp = shared
            .dev
            .open_qpair(self.depth)
            .map_err(|e| format!("cannot open a queue pair on leg {leg}: {e}"))?;
        self.qps[leg] = Some(qp);
        Ok(())
    }

    /// Hands `cmd` to `leg`'s queue pair; false when it is not open or full (the job sizes
    /// its queues so that this does not happen).
    ///
    /// # Safety
    /// As [`QueuePair::submit`]: `cmd.buf` stays valid and untouched until the completion
    /// has been reaped by [`poll`](Self::poll).
    pub(crate) unsafe fn submit(&mut self, leg: usize, mut cmd: IoCommand) -> bool {
        let Some(qp) = self.qps[leg].as_mut() else {
            return false;
        };
        if cmd.op != IoOp::Flush {
            cmd.slba += self.data_lba;
        }
        // SAFETY: the caller keeps the promise for `cmd.buf`.
        match unsafe { qp.submit(cmd) } {
            Ok(()) => {
                self.inflight[leg] += 1;
                true
            }
            Err(SubmitError::QueueFull) => false,
        }
    }

    /// Reaps `leg`'s completions into `out`.
    pub(crate) fn poll(&mut self, leg: usize, out: &mut [Completion]) -> usize {
        if self.inflight[leg] == 0 {
            return 0;
        }
        let Some(qp) = self.qps[leg].as_mut() else {
            return 0;
        };
        let n = qp.poll(out);
        self.inflight[leg] -= n as u32;
        n
    }

    /// Asks `leg`'s back end to cancel the job's command tagged `tag` (one it gave up on).
    pub(crate) fn cancel(&mut self, leg: usize, tag: u64) {
        if let Some(qp) = self.qps[leg].as_mut() {
            qp.cancel(&[tag]);
        }
    }

    /// Closes every queue pair without blocking; the fence is done once none of their
    /// commands can touch a buffer or a leg any more.
    pub(crate) fn close(&mut self) -> Fence {
        Fence::all(
            self.qps
                .iter_mut()
                .filter_map(Option::take)
                .map(QueuePair::close),
        )
    }
}
