//! `null://` — discards writes, reads zeroes, completes at the next poll (like SPDK's null
//! bdev): measures the stack without any medium.

use std::collections::VecDeque;

use crate::queue::{BlockDevice, Completion, IoCommand, IoOp, QueuePair, SubmitError};
use crate::spec::{Geometry, Status};
use crate::{Error, Result};

/// A namespace with no medium.
#[derive(Debug)]
pub struct NullDevice {
    name: String,
    geo: Geometry,
}

impl NullDevice {
    pub fn new(bytes: u64, lba_size: u32) -> Result<Self> {
        let geo = Geometry::from_bytes(bytes, lba_size)
            .filter(|g| g.num_blocks > 0)
            .ok_or_else(|| Error::Geometry(format!("{bytes} bytes at {lba_size}-byte blocks")))?;
        Ok(Self {
            name: format!("null://{}", geo.bytes()),
            geo,
        })
    }

    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl BlockDevice for NullDevice {
    fn geometry(&self) -> Geometry {
        self.geo
    }

    fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>> {
        if depth == 0 {
            return Err(Error::QueuePair("depth 0".into()));
        }
        Ok(Box::new(NullQueuePair {
            geo: self.geo,
            depth,
            ready: VecDeque::with_capacity(depth as usize),
        }))
    }

    fn volatile_write_cache(&self) -> bool {
        false
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Debug)]
struct NullQueuePair {
    geo: Geometry,
    depth: u32,
    ready: VecDeque<Completion>,
}

impl QueuePair for NullQueuePair {
    fn depth(&self) -> u32 {
        self.depth
    }

    fn outstanding(&self) -> u32 {
        self.ready.len() as u32
    }

    #[inline]
    unsafe fn submit(&mut self, cmd: IoCommand) -> std::result::Result<(), SubmitError> {
        if self.ready.len() as u32 >= self.depth {
            return Err(SubmitError::QueueFull);
        }
        let status = match cmd.check(&self.geo) {
            Err(status) => status,
            Ok(()) => {
                if cmd.op == IoOp::Read {
                    let len = (cmd.nlb as usize) << self.geo.lba_shift();
                    // SAFETY: `check` proved the buffer holds `len` bytes; the caller keeps it
                    // valid and untouched until completion.
                    unsafe { std::ptr::write_bytes(cmd.buf.as_ptr(), 0, len) };
                }
                Status::SUCCESS
            }
        };
        self.ready.push_back(Completion {
            tag: cmd.tag,
            status,
        });
        Ok(())
    }

    #[inline]
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let n = out.len().min(self.ready.len());
        for (slot, cpl) in out.iter_mut().zip(self.ready.drain(..n)) {
            *slot = cpl;
        }
        n
    }
}
