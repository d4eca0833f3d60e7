//! A journal thread's queue pair on one device (the journal, or the far leg): opened when
//! first needed, every command waited for with a timeout (`wait.rs`). A command given up at
//! the timeout closes the queue pair (the next command opens a new one), and the buffer it
//! was given is parked on the close's fence, never reused while the device may still read or
//! fill it, as `ControlIo` does for the control plane.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use nvmirror_nvme::{BlockDevice, Completion, Fence, IoCommand, QueuePair};

use super::recover::SegBuf;
use crate::wait::{run_one, Waited};

pub(crate) struct DevIo {
    dev: Arc<dyn BlockDevice>,
    qp: Option<Box<dyn QueuePair>>,
    depth: u32,
    /// The time one command may take.
    pub(crate) timeout: Duration,
}

/// Why a command gave no completion.
#[derive(Debug)]
pub(crate) enum IoError {
    /// No queue pair could be opened, or it refused the command.
    Open(String),
    /// No completion within the timeout; the queue pair was closed.
    TimedOut(Duration),
    /// The thread is stopping.
    Stopped,
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open(e) => f.write_str(e),
            Self::TimedOut(t) => write!(f, "no answer within {t:?}"),
            Self::Stopped => f.write_str("stopped"),
        }
    }
}

impl DevIo {
    pub(crate) fn new(dev: Arc<dyn BlockDevice>, depth: u32, timeout: Duration) -> Self {
        Self {
            dev,
            qp: None,
            depth,
            timeout,
        }
    }

    /// The queue pair, opened if there is none.
    pub(crate) fn qp(&mut self) -> Result<&mut dyn QueuePair, IoError> {
        if self.qp.is_none() {
            let qp = self
                .dev
                .open_qpair(self.depth)
                .map_err(|e| IoError::Open(format!("{}: {e}", self.dev.name())))?;
            self.qp = Some(qp);
        }
        Ok(&mut **self.qp.as_mut().expect("opened above"))
    }

    /// Gives up on the commands in flight: closes the queue pair (the next command opens a
    /// new one). Their buffers belong to them until the returned fence is done.
    pub(crate) fn give_up(&mut self) -> Fence {
        self.qp.take().map_or_else(Fence::done, |qp| qp.close())
    }

    /// Runs `cmd`, whose buffer (if any) lies in `buf`, and waits for it up to the timeout.
    /// A command given up closes the queue pair and parks `buf` on its fence (`buf` is then
    /// a fresh buffer of the same size).
    pub(crate) fn run(
        &mut self,
        cmd: IoCommand,
        buf: Option<&mut SegBuf>,
        stop: &AtomicBool,
    ) -> Result<Completion, IoError> {
        let timeout = self.timeout;
        let qp = self.qp()?;
        // SAFETY: `cmd`'s buffer lies in `buf`, which the caller lends to this call: it is
        // untouched until the completion is reaped, or, when the command is given up, parked
        // on the queue pair's fence below and replaced.
        let err = match unsafe { run_one(qp, cmd, timeout, Some(stop)) } {
            Waited::Done(c) => return Ok(c),
            Waited::Refused(e) => return Err(IoError::Open(format!("{e:?}"))),
            Waited::TimedOut => IoError::TimedOut(timeout),
            Waited::Stopped => IoError::Stopped,
        };
        let fence = self.give_up();
        if let Some(b) = buf {
            b.park_on(fence);
        }
        Err(err)
    }
}
