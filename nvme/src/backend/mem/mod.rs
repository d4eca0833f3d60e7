//! `mem://` — a RAM namespace with injectable completion latency.
//!
//! Data is copied at submission; the completion is released at once or after a delay drawn
//! from a [`LatencyModel`]. Faults are injected by wrapping the device in a
//! [`FaultyDevice`](super::FaultyDevice), like any other back end.
//!
//! By default the store is sparse: 64 KiB chunks allocated on first write, so a 1 TiB
//! namespace costs only what is written. [`MemOptions`] (`?hugepages=1`, `?prealloc=1`) back
//! it instead with one mapping of the whole namespace on transparent hugepages, faulted in at
//! open with prealloc, like SPDK's malloc bdev: no page faults during a run, and a TLB entry
//! per 2 MiB instead of per 4 KiB.

mod latency;
mod shared_copy;
mod store;

use std::collections::VecDeque;
use std::sync::Arc;

use latency::DelayQueue;
pub use latency::LatencyModel;
use store::SparseStore;

use crate::mmap::Hugepages;
use crate::queue::{BlockDevice, Completion, IoCommand, IoOp, QueuePair, SubmitError};
use crate::spec::{Geometry, Status};
use crate::{Error, Result};

/// How a [`MemDevice`]'s memory is laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemOptions {
    /// One mapping of the whole namespace advised for transparent hugepages
    /// (`madvise(MADV_HUGEPAGE)`) instead of sparse 64 KiB chunks. Where the kernel has none
    /// (THP `never`, or not built in) the device still opens, on 4 KiB pages, with a warning.
    pub hugepages: bool,
    /// Fault the whole namespace in at open (one mapping, as with `hugepages`), so a run takes
    /// no first-touch page fault. Refused when the namespace is larger than the memory
    /// available.
    pub prealloc: bool,
}

/// A RAM namespace shared by all cores; by default only touched 64 KiB chunks cost memory.
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
        Self::with_options(bytes, lba_size, latency, MemOptions::default())
    }

    /// A zero-filled namespace of `bytes` laid out as `opts` asks.
    pub fn with_options(
        bytes: u64,
        lba_size: u32,
        latency: LatencyModel,
        opts: MemOptions,
    ) -> Result<Self> {
        let geo = Geometry::from_bytes(bytes, lba_size)
            .filter(|g| g.num_blocks > 0)
            .ok_or_else(|| Error::Geometry(format!("{bytes} bytes at {lba_size}-byte blocks")))?;
        let name = format!("mem://{}", geo.bytes());
        let store = if opts.hugepages || opts.prealloc {
            if opts.prealloc {
                check_available(geo.bytes())?;
            }
            let store = SparseStore::mapped(geo.bytes(), opts.hugepages, opts.prealloc)?;
            if let Some(Hugepages::Unavailable(thp)) = store.hugepages() {
                tracing::warn!(
                    device = %name,
                    thp = ?thp,
                    "hugepages asked for, but transparent hugepages are not available \
                     (/sys/kernel/mm/transparent_hugepage/enabled): using 4 KiB pages"
                );
            }
            store
        } else {
            SparseStore::new(geo.bytes())
        };
        Ok(Self {
            name,
            geo,
            latency,
            store: Arc::new(store),
        })
    }

    /// Renames the device (the URI it was opened from).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Bytes of RAM the touched chunks use; for a mapped store (hugepages or prealloc), the
    /// whole mapping.
    pub fn resident_bytes(&self) -> u64 {
        self.store.resident_bytes()
    }

    /// What came of a hugepage request: `None` for the default sparse store.
    pub fn hugepages(&self) -> Option<Hugepages> {
        self.store.hugepages()
    }

    /// Bytes of a mapped store on transparent hugepages now (`AnonHugePages` in
    /// `/proc/self/smaps`); `None` for a sparse store or where smaps cannot be read.
    pub fn huge_bytes(&self) -> Option<u64> {
        self.store.huge_bytes()
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

    fn volatile_write_cache(&self) -> bool {
        false
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Refuses to preallocate more than the kernel says is available (`MemAvailable` in
/// `/proc/meminfo`), which would end in the OOM killer rather than an error.
fn check_available(bytes: u64) -> Result<()> {
    let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(());
    };
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10);
    match available {
        Some(available) if bytes > available => Err(Error::Prealloc { bytes, available }),
        _ => Ok(()),
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
