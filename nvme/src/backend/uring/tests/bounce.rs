//! A test view of a device whose queue pairs copy through aligned bounce buffers.

use crate::dma::{DmaPool, IoBuf};
use crate::queue::{BlockDevice, Completion, IoCommand, IoOp, QueuePair, SubmitError};
use crate::spec::Geometry;
use crate::Result;

use super::super::UringDevice;

/// A view of a device whose queue pairs copy through page-aligned bounce buffers, so
/// the shared conformance checks (which use plain `Vec`s) can drive an O_DIRECT leg.
#[derive(Debug)]
pub(super) struct Bounced<'a>(pub(super) &'a UringDevice);

impl BlockDevice for Bounced<'_> {
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }

    fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>> {
        Ok(Box::new(BouncedQueuePair {
            inner: self.0.open_qpair(depth)?,
            pending: Vec::new(),
        }))
    }

    fn name(&self) -> &str {
        self.0.name()
    }
}

#[derive(Debug)]
pub(super) struct BouncedQueuePair {
    inner: Box<dyn QueuePair>,
    /// Tag, op, the caller's buffer, the bounce buffer's pool.
    pending: Vec<(u64, IoOp, IoBuf, DmaPool)>,
}

impl QueuePair for BouncedQueuePair {
    fn depth(&self) -> u32 {
        self.inner.depth()
    }

    fn outstanding(&self) -> u32 {
        self.inner.outstanding()
    }

    unsafe fn submit(&mut self, mut cmd: IoCommand) -> std::result::Result<(), SubmitError> {
        if cmd.op.has_data() && !cmd.buf.is_empty() {
            let mut pool = DmaPool::new(1, cmd.buf.len());
            let bounce = pool.get().unwrap().io_buf().prefix(cmd.buf.len());
            if cmd.op == IoOp::Write {
                // SAFETY: both views are valid for their length (our caller's promise, and
                // our own pool) and do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(cmd.buf.as_ptr(), bounce.as_ptr(), bounce.len())
                };
            }
            self.pending.push((cmd.tag, cmd.op, cmd.buf, pool));
            cmd.buf = bounce;
        }
        // SAFETY: the bounce buffer lives in `pending` until the completion is reaped.
        unsafe { self.inner.submit(cmd) }
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let n = self.inner.poll(out);
        for c in &out[..n] {
            if let Some(i) = self.pending.iter().position(|p| p.0 == c.tag) {
                let (_, op, user, pool) = self.pending.swap_remove(i);
                if op == IoOp::Read {
                    // SAFETY: the user buffer is still covered by the submit contract; the
                    // bounce buffer is the pool's first one and as long.
                    unsafe {
                        std::ptr::copy_nonoverlapping(pool.base(), user.as_ptr(), user.len())
                    };
                }
            }
        }
        n
    }
}
