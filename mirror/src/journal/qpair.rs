//! A queue pair on a [`JournaledLeg`](super::JournaledLeg): writes go to the journal writer,
//! reads to the far device once every write completed before them is applied there.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use nvmirror_nvme::{Completion, Fence, IoCommand, IoOp, QueuePair, SubmitError};
use nvmirror_poller::Ring;

use super::{Channel, Req, Shared, MODE_ASYNC, MODE_SYNC};

#[derive(Debug)]
pub(crate) struct JournalQueuePair {
    sh: Arc<Shared>,
    chan: Arc<Channel>,
    /// Reads, on the far device (`None` once closed).
    far: Option<Box<dyn QueuePair>>,
    closed: bool,
    depth: u32,
    outstanding: u32,
    /// Journaled commands the shared ring had no room for yet (capacity = depth).
    overflow: VecDeque<IoCommand>,
    /// Reads waiting until the far device has every write journaled before them: the
    /// journal's last record when they were submitted (capacity = depth).
    reads: VecDeque<(u64, IoCommand)>,
    /// Completions made here (range errors) (capacity = depth).
    ready: VecDeque<Completion>,
}

impl JournalQueuePair {
    pub(crate) fn new(sh: Arc<Shared>, far: Box<dyn QueuePair>, depth: u32) -> Self {
        let d = depth as usize;
        Self {
            chan: Arc::new(Channel {
                cpl: Ring::new(d),
                inflight: AtomicU32::new(0),
                closed: AtomicBool::new(false),
                signal: Mutex::new(None),
            }),
            sh,
            far: Some(far),
            closed: false,
            depth,
            outstanding: 0,
            overflow: VecDeque::with_capacity(d),
            reads: VecDeque::with_capacity(d),
            ready: VecDeque::with_capacity(d),
        }
    }

    /// Sends a write on its way by the leg's mode: to the journal writer, or straight to
    /// the far device; false when it has to wait (no room, or the journal is draining).
    fn hand_over(&mut self, cmd: IoCommand) -> bool {
        // Counted before the mode is read, so that a switch to `sync` (which sets the mode,
        // then waits for the count to reach zero) sees every write that can still enter the
        // journal.
        self.sh.journaled_inflight.fetch_add(1, Ordering::SeqCst);
        let mode = self.sh.mode.load(Ordering::SeqCst);
        if mode != MODE_ASYNC {
            self.sh.journaled_inflight.fetch_sub(1, Ordering::SeqCst);
        }
        match mode {
            MODE_SYNC => {
                let Some(far) = self.far.as_mut() else {
                    return false;
                };
                // SAFETY: the caller's promise for `cmd.buf` (our own `submit` contract)
                // carries over: the write completes to the caller only once the far device
                // completed it.
                unsafe { far.submit(cmd) }.is_ok()
            }
            MODE_ASYNC => {
                self.chan.inflight.fetch_add(1, Ordering::SeqCst);
                match self.sh.sub.push(Req {
                    cmd,
                    chan: Arc::clone(&self.chan),
                }) {
                    Ok(()) => true,
                    Err(_) => {
                        self.sh.journaled_inflight.fetch_sub(1, Ordering::SeqCst);
                        self.chan.inflight.fetch_sub(1, Ordering::SeqCst);
                        false
                    }
                }
            }
            _ => false,
        }
    }

    fn start_reads(&mut self) {
        let applied = self.sh.applied_seq.load(Ordering::Acquire);
        // While the cuts are held the leg is not whole: a read sees the far image as it is.
        let held = self.sh.catching_up();
        while let Some(&(barrier, cmd)) = self.reads.front() {
            if barrier > applied && !held {
                // An async-cycle leg ships at once for a waiting read.
                if self.sh.cycle.interval.is_some() {
                    self.sh.cycle.asked.store(true, Ordering::Relaxed);
                }
                return;
            }
            let Some(far) = self.far.as_mut() else {
                return;
            };
            // SAFETY: the caller's promise for `cmd.buf` (our own `submit` contract) carries
            // over: the read completes to the caller only once the far device completed it.
            match unsafe { far.submit(cmd) } {
                Ok(()) => {
                    self.reads.pop_front();
                }
                Err(SubmitError::QueueFull) => return,
            }
        }
    }
}

impl QueuePair for JournalQueuePair {
    fn depth(&self) -> u32 {
        self.depth
    }

    fn outstanding(&self) -> u32 {
        self.outstanding
    }

    unsafe fn submit(&mut self, cmd: IoCommand) -> Result<(), SubmitError> {
        if self.outstanding >= self.depth {
            return Err(SubmitError::QueueFull);
        }
        self.outstanding += 1;
        if let Err(status) = cmd.check(&self.sh.geo) {
            self.ready.push_back(Completion {
                tag: cmd.tag,
                status,
            });
            return Ok(());
        }
        if cmd.op == IoOp::Read {
            let barrier = self.sh.written_seq.load(Ordering::Acquire);
            self.reads.push_back((barrier, cmd));
            self.start_reads();
        } else if !self.overflow.is_empty() || !self.hand_over(cmd) {
            self.overflow.push_back(cmd);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        while let Some(&cmd) = self.overflow.front() {
            if !self.hand_over(cmd) {
                break;
            }
            self.overflow.pop_front();
        }
        if !self.reads.is_empty() {
            self.start_reads();
        }
        let mut n = 0;
        while n < out.len() {
            if let Some(c) = self.ready.pop_front() {
                out[n] = c;
                n += 1;
                continue;
            }
            // SAFETY: this queue pair is its channel's only consumer.
            match unsafe { self.chan.cpl.pop() } {
                Some(c) => {
                    out[n] = c;
                    n += 1;
                }
                None => break,
            }
        }
        if n < out.len() {
            if let Some(far) = self.far.as_mut() {
                n += far.poll(&mut out[n..]);
            }
        }
        self.outstanding -= n as u32;
        n
    }

    /// Commands already handed to the writer finish there (it copies their data before it
    /// completes them); the fence is done once the last has, and the far device's reads are
    /// fenced by its own close. Commands not handed over yet are simply dropped.
    fn close(self: Box<Self>) -> Fence {
        let mut this = self;
        this.closed = true;
        let far = this.far.take().map_or_else(Fence::done, |q| q.close());
        let chan = Arc::clone(&this.chan);
        let (fence, signal) = Fence::pending();
        *chan
            .signal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(signal);
        chan.closed.store(true, Ordering::SeqCst);
        if chan.inflight.load(Ordering::SeqCst) == 0 {
            chan.end_fence();
        }
        Fence::all(vec![far, fence])
    }
}

impl Drop for JournalQueuePair {
    fn drop(&mut self) {
        // A queue pair dropped without close: the writer may still read the buffers of the
        // commands it holds; wait for them (they complete within one segment write).
        while !self.closed
            && self.chan.inflight.load(Ordering::SeqCst) != 0
            && !self.sh.stop.load(Ordering::Acquire)
        {
            std::thread::yield_now();
        }
    }
}
