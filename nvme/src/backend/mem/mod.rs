//! `mem://` — a sparse RAM namespace with injectable completion latency.
//!
//! Data is copied at submission; the completion is released at once or after a delay drawn
//! from a [`LatencyModel`]. Faults are injected by wrapping the device in a
//! [`FaultyDevice`](super::FaultyDevice), like any other back end.

mod latency;
mod store;

use std::collections::VecDeque;
use std::sync::Arc;

use latency::DelayQueue;
pub use latency::LatencyModel;
use store::SparseStore;

use crate::queue::{BlockDevice, Completion, IoCommand, IoOp, QueuePair, SubmitError};
use crate::spec::{Geometry, Status};
use crate::{Error, Result};

/// A RAM namespace shared by all cores; only touched 64 KiB chunks cost memory.
#[derive(Debug)]
pub struct MemDevice {
    name: String,
    geo: Geometry,
    latency: LatencyModel,
    store: Arc<SparseStore>,
}

impl MemDevice {
    /// A zero-filled namespace of `bytes` (rounded down to whole blocks).
    pub fn new(bytes: u64, lba_size: u32, latency: LatencyModel) -> Result<Self> {
        let geo = Geometry::from_bytes(bytes, lba_size)
            .filter(|g| g.num_blocks > 0)
            .ok_or_else(|| Error::Geometry(format!("{bytes} bytes at {lba_size}-byte blocks")))?;
        let name = format!("mem://{}", geo.bytes());
        Ok(Self {
            name,
            geo,
            latency,
            store: Arc::new(SparseStore::new(geo.bytes())),
        })
    }

    /// Renames the device (the URI it was opened from).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Bytes of RAM the touched chunks use.
    pub fn resident_bytes(&self) -> u64 {
        self.store.resident_bytes()
    }
}

impl BlockDevice for MemDevice {
    fn geometry(&self) -> Geometry {
        self.geo
    }

    fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>> {
        if depth == 0 {
            return Err(Error::QueuePair("depth 0".into()));
        }
        Ok(Box::new(MemQueuePair {
            store: Arc::clone(&self.store),
            geo: self.geo,
            depth,
            outstanding: 0,
            ready: VecDeque::with_capacity(depth as usize),
            delayed: DelayQueue::new(&self.latency, depth as usize),
        }))
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// One core's queue pair on a [`MemDevice`].
#[derive(Debug)]
struct MemQueuePair {
    store: Arc<SparseStore>,
    geo: Geometry,
    depth: u32,
    outstanding: u32,
    /// Completions due now, in submission order.
    ready: VecDeque<Completion>,
    /// Completions waiting for their injected latency.
    delayed: DelayQueue,
}

impl MemQueuePair {
    /// Executes the command against the store; the returned status goes into the completion.
    ///
    /// # Safety
    /// `cmd.buf` must satisfy the [`QueuePair::submit`] contract.
    #[inline]
    unsafe fn execute(&self, cmd: &IoCommand) -> Status {
        if let Err(status) = cmd.check(&self.geo) {
            return status;
        }
        let shift = self.geo.lba_shift();
        let off = cmd.slba << shift;
        let len = (cmd.nlb as usize) << shift;
        // Memory is the medium: a completed write is as durable as it gets, so FUA and Flush
        // have nothing to do.
        match cmd.op {
            // SAFETY: `check` proved the buffer holds `len` bytes; the caller keeps it valid.
            IoOp::Read => unsafe { self.store.read(off, cmd.buf.as_ptr(), len) },
            // SAFETY: as above.
            IoOp::Write => unsafe { self.store.write(off, cmd.buf.as_ptr(), len) },
            IoOp::WriteZeroes | IoOp::Deallocate => self.store.zero(off, len as u64),
            IoOp::Flush => {}
        }
        Status::SUCCESS
    }
}

impl QueuePair for MemQueuePair {
    fn depth(&self) -> u32 {
        self.depth
    }

    fn outstanding(&self) -> u32 {
        self.outstanding
    }

    #[inline]
    unsafe fn submit(&mut self, cmd: IoCommand) -> std::result::Result<(), SubmitError> {
        if self.outstanding >= self.depth {
            return Err(SubmitError::QueueFull);
        }
        self.outstanding += 1;
        // SAFETY: forwarded from our caller's promise.
        let status = unsafe { self.execute(&cmd) };
        let cpl = Completion {
            tag: cmd.tag,
            status,
        };
        if self.delayed.is_immediate() {
            self.ready.push_back(cpl);
        } else {
            self.delayed.push(cpl);
        }
        Ok(())
    }

    #[inline]
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if !self.delayed.is_empty() {
            self.delayed
                .release_due(quanta::Instant::now(), &mut self.ready);
        }
        let n = out.len().min(self.ready.len());
        for (slot, cpl) in out.iter_mut().zip(self.ready.drain(..n)) {
            *slot = cpl;
        }
        self.outstanding -= n as u32;
        n
    }
}

#[cfg(test)]
mod tests;
