//! A device that applies each command after a random delay, as real devices apply queued
//! commands in any order: two legs then apply one mirrored write at different moments, which
//! is what a job comparing or copying legs must not be fooled by.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::{BlockDevice, Completion, Geometry, IoCommand, QueuePair, SubmitError};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Debug)]
pub struct DelayedDevice {
    pub inner: Arc<dyn BlockDevice>,
    pub max_delay: Duration,
}

impl BlockDevice for DelayedDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        Ok(Box::new(DelayedQueuePair {
            inner: self.inner.open_qpair(depth)?,
            held: Vec::with_capacity(depth as usize),
            rng: SmallRng::from_entropy(),
            max_delay: self.max_delay,
            depth,
        }))
    }

    fn name(&self) -> &str {
        self.inner.name()
    }
}

#[derive(Debug)]
struct DelayedQueuePair {
    inner: Box<dyn QueuePair>,
    held: Vec<(Instant, IoCommand)>,
    rng: SmallRng,
    max_delay: Duration,
    depth: u32,
}

impl QueuePair for DelayedQueuePair {
    fn depth(&self) -> u32 {
        self.depth
    }

    fn outstanding(&self) -> u32 {
        self.inner.outstanding() + self.held.len() as u32
    }

    unsafe fn submit(&mut self, cmd: IoCommand) -> Result<(), SubmitError> {
        if self.outstanding() >= self.depth {
            return Err(SubmitError::QueueFull);
        }
        let delay = self.rng.gen_range(Duration::ZERO..=self.max_delay);
        self.held.push((Instant::now() + delay, cmd));
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].0 <= now {
                let (_, cmd) = self.held.swap_remove(i);
                // SAFETY: our caller made the submit promise for `cmd`; it still holds.
                unsafe { self.inner.submit(cmd) }.expect("inner queue has room");
            } else {
                i += 1;
            }
        }
        self.inner.poll(out)
    }
}
