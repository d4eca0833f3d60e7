//! One fio thread's queue pair on a [`Device`]: byte offsets and lengths become LBAs, NVMe
//! statuses become errno values, and a completion whose buffer the mirror still lends to a
//! leg (an error after a leg's I/O timeout) is held back until the buffer is free, because
//! fio reuses an `io_u`'s buffer as soon as it sees the completion.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{Completion, IoCommand, IoOp, QueuePair, SubmitError as QpFull};

use crate::Device;

/// What fio asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// fio's `fsync`/`fdatasync` (DDIR_SYNC, DDIR_DATASYNC).
    Flush,
    Trim,
}

/// Why a command was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// `iodepth` commands are in flight: reap some first.
    Full,
    /// The offset or length is not whole blocks, or too long for one command.
    Invalid,
}

/// How long closing waits for the last commands (a hung leg is timed out by the volume well
/// before this).
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// A queue pair and the completions waiting to be handed to fio.
#[derive(Debug)]
pub struct Queue {
    dev: Arc<Device>,
    qp: Box<dyn QueuePair>,
    lba_shift: u32,
    scratch: Vec<Completion>,
    released: Vec<u64>,
    /// (tag, errno) ready for fio.
    ready: VecDeque<(u64, i32)>,
    /// Failed commands whose buffer a leg may still use.
    lent: Vec<(u64, i32)>,
}

impl Queue {
    /// A queue pair of `depth` on `dev`.
    pub fn open(dev: Arc<Device>, depth: u32) -> Result<Self, String> {
        let depth = depth.max(1);
        let qp = dev
            .target
            .device
            .open_qpair(depth)
            .map_err(|e| format!("opening a queue pair of depth {depth}: {e}"))?;
        let n = depth as usize;
        Ok(Self {
            lba_shift: dev.lba_size().trailing_zeros(),
            dev,
            qp,
            scratch: vec![Completion::default(); n],
            released: vec![0; n],
            ready: VecDeque::with_capacity(n),
            lent: Vec::with_capacity(n),
        })
    }

    /// Queues one command for `len` bytes at byte `offset`, `buf` its data (reads and
    /// writes); it goes to the legs at the next [`poll`](Self::poll).
    ///
    /// # Safety
    /// For reads and writes `buf` must point to `len` bytes that stay allocated, and that the
    /// caller leaves alone, until `poll` returns `tag`.
    pub unsafe fn submit(
        &mut self,
        op: Op,
        offset: u64,
        len: u64,
        buf: *mut u8,
        tag: u64,
    ) -> Result<(), SubmitError> {
        let mask = (1u64 << self.lba_shift) - 1;
        let cmd = if op == Op::Flush {
            IoCommand::new(IoOp::Flush, 0, 0, tag)
        } else {
            if offset & mask != 0 || len & mask != 0 || len == 0 {
                return Err(SubmitError::Invalid);
            }
            let nlb = u32::try_from(len >> self.lba_shift).map_err(|_| SubmitError::Invalid)?;
            let slba = offset >> self.lba_shift;
            match op {
                Op::Read | Op::Write => {
                    let io = if op == Op::Read {
                        IoOp::Read
                    } else {
                        IoOp::Write
                    };
                    let b = IoBuf::from_raw(buf, len as usize);
                    IoCommand::with_buf(io, slba, nlb, b, tag)
                }
                Op::Trim | Op::Flush => IoCommand::new(IoOp::Deallocate, slba, nlb, tag),
            }
        };
        // SAFETY: the caller keeps the buffer alive and untouched until `poll` returns `tag`,
        // which it does only once the queue pair has reaped the command and no leg holds it.
        unsafe { self.qp.submit(cmd) }.map_err(|QpFull::QueueFull| SubmitError::Full)
    }

    /// Sends what was queued, reaps completions, and writes up to `tags.len()` of them
    /// (tag, and errno 0 or EIO) into `tags` and `errs`; returns how many. Completions that do
    /// not fit wait for the next call.
    pub fn poll(&mut self, tags: &mut [u64], errs: &mut [i32]) -> usize {
        let max = tags.len().min(errs.len());
        let mut k = 0;
        while k < max {
            let Some((t, e)) = self.ready.pop_front() else {
                break;
            };
            (tags[k], errs[k]) = (t, e);
            k += 1;
        }
        let n = self.qp.poll(&mut self.scratch);
        for c in &self.scratch[..n] {
            let e = if c.status.is_success() {
                0
            } else if self.qp.buffer_lent(c.tag) {
                self.lent.push((c.tag, libc::EIO));
                continue;
            } else {
                libc::EIO
            };
            if k < max {
                (tags[k], errs[k]) = (c.tag, e);
                k += 1;
            } else {
                self.ready.push_back((c.tag, e));
            }
        }
        if !self.lent.is_empty() {
            let r = self.qp.poll_released(&mut self.released);
            for &t in &self.released[..r] {
                if let Some(i) = self.lent.iter().position(|&(tag, _)| tag == t) {
                    self.ready.push_back(self.lent.swap_remove(i));
                }
            }
        }
        k
    }

    /// Commands fio has not seen complete yet.
    pub fn in_flight(&self) -> usize {
        self.qp.outstanding() as usize + self.lent.len() + self.ready.len()
    }

    /// Waits for every command to be over, so that fio may free the buffers; a command still
    /// out after a minute ends the process (a buffer freed under a leg would be worse).
    pub fn drain(&mut self) {
        let start = Instant::now();
        let (mut tags, mut errs) = ([0u64; 64], [0i32; 64]);
        while self.qp.outstanding() > 0 || !self.lent.is_empty() {
            self.poll(&mut tags, &mut errs);
            if start.elapsed() > DRAIN_LIMIT {
                eprintln!(
                    "nvmirror fio engine: {} commands still out after {DRAIN_LIMIT:?} at close; \
                     aborting rather than freeing buffers a leg may still use",
                    self.qp.outstanding() as usize + self.lent.len()
                );
                std::process::abort();
            }
            std::thread::yield_now();
        }
        self.ready.clear();
    }

    /// The device this queue runs on.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reap(q: &mut Queue, want: usize) -> Vec<(u64, i32)> {
        let mut got = Vec::new();
        let (mut tags, mut errs) = ([0u64; 8], [0i32; 8]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < want {
            let n = q.poll(&mut tags, &mut errs);
            got.extend(tags[..n].iter().copied().zip(errs[..n].iter().copied()));
            assert!(Instant::now() < deadline, "only {got:?}");
        }
        got
    }

    #[test]
    fn writes_land_on_every_leg_and_read_back() {
        let dev = Device::open("mem://4MiB\nmem://4MiB\nmem://4MiB", false).unwrap();
        let mut q = Queue::open(Arc::clone(&dev), 4).unwrap();
        let mut data = vec![0x5au8; 8192];
        // SAFETY: `data` outlives the command, reaped below.
        unsafe { q.submit(Op::Write, 4096, 8192, data.as_mut_ptr(), 1) }.unwrap();
        assert_eq!(reap(&mut q, 1), vec![(1, 0)]);
        let mut back = vec![0u8; 8192];
        // SAFETY: as above.
        unsafe { q.submit(Op::Read, 4096, 8192, back.as_mut_ptr(), 2) }.unwrap();
        // SAFETY: a flush carries no buffer.
        unsafe { q.submit(Op::Flush, 0, 0, std::ptr::null_mut(), 3) }.unwrap();
        let mut got = reap(&mut q, 2);
        got.sort();
        assert_eq!(got, vec![(2, 0), (3, 0)]);
        assert_eq!(back, data);
        let v = dev.target.volume.as_ref().unwrap();
        assert_eq!(v.leg_count(), 3);
    }

    #[test]
    fn partial_blocks_and_ranges_past_the_end_are_refused_or_fail() {
        let dev = Device::open("mem://1MiB\nmem://1MiB", false).unwrap();
        let mut q = Queue::open(dev, 2).unwrap();
        let mut b = vec![0u8; 4096];
        // SAFETY: refused before any use of the buffer.
        let r = unsafe { q.submit(Op::Write, 100, 4096, b.as_mut_ptr(), 1) };
        assert_eq!(r, Err(SubmitError::Invalid));
        // SAFETY: as above.
        let r = unsafe { q.submit(Op::Read, 0, 0, b.as_mut_ptr(), 1) };
        assert_eq!(r, Err(SubmitError::Invalid));
        // SAFETY: `b` outlives the command, reaped below.
        unsafe { q.submit(Op::Write, 1 << 20, 4096, b.as_mut_ptr(), 7) }.unwrap();
        assert_eq!(reap(&mut q, 1), vec![(7, libc::EIO)]);
    }

    #[test]
    fn a_full_queue_says_so() {
        let dev = Device::open("mem://1MiB", false).unwrap();
        let mut q = Queue::open(dev, 2).unwrap();
        let mut b = vec![0u8; 3 * 4096];
        let p = b.as_mut_ptr();
        for t in 0..2u64 {
            // SAFETY: `b` outlives the commands, reaped below.
            unsafe {
                q.submit(
                    Op::Write,
                    t * 4096,
                    4096,
                    p.wrapping_add(t as usize * 4096),
                    t,
                )
            }
            .unwrap();
        }
        // SAFETY: refused before any use.
        let r = unsafe { q.submit(Op::Write, 8192, 4096, p.wrapping_add(8192), 9) };
        assert_eq!(r, Err(SubmitError::Full));
        assert_eq!(reap(&mut q, 2).len(), 2);
        assert_eq!(q.in_flight(), 0);
    }
}
