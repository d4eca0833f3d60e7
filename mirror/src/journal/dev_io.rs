//! A journal thread's queue pair on one device (the journal, or the far leg): opened when
//! first needed, every command waited for with a timeout (`wait.rs`). A command given up at
//! the timeout closes the queue pair (the next command opens a new one), and the buffer it
//! was given is parked on the close's fence, never reused while the device may still read or
//! fill it, as `ControlIo` does for the control plane. A command that completes with a
//! path error closes it too.
//!
//! **Flushes across a reconnection.** A Flush covers the writes completed before it on the
//! same controller. When a remote device's association is new since the first write after
//! the last Flush (the far side lost its connection, perhaps its power and its volatile
//! cache with it), a Flush on the new one proves nothing about them: [`DevIo::flush`] then
//! fails with [`IoError::Reconnected`] and the caller sends them again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvmirror_nvme::spec::status::StatusCodeType;
use nvmirror_nvme::{BlockDevice, Completion, Fence, IoCommand, IoOp, QueuePair, Status};

use super::recover::SegBuf;
use crate::wait::{run_one, Waited};

/// A status after which the queue pair may be dead (a path error: the link or the controller
/// went away): the next command opens a new one instead of waiting on it.
#[inline]
pub(crate) fn kills_queue(status: Status) -> bool {
    status.sct() == StatusCodeType::PathRelated
}

pub(crate) struct DevIo {
    dev: Arc<dyn BlockDevice>,
    qp: Option<Box<dyn QueuePair>>,
    depth: u32,
    /// The time one command may take.
    pub(crate) timeout: Duration,
    /// The device's association generation when a command first went out after the last
    /// Flush that completed (0 for a device without a link).
    unflushed: Option<u64>,
    /// Set when the device answers Reservation Conflict ([`DevIo::watching_conflicts`]).
    conflict: ConflictWatch,
}

/// A flag set at the first Reservation Conflict a device answers: another host holds its
/// reservation (the far site was promoted), and nothing sent there will be taken.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConflictWatch(Option<Arc<AtomicBool>>);

impl ConflictWatch {
    /// Notes the status of a command the device completed.
    #[inline]
    pub(crate) fn saw(&self, s: Status) {
        if let Some(flag) = &self.0 {
            note_conflict(flag, s);
        }
    }
}

/// Sets `fenced` when `s` is a Reservation Conflict: another host holds the device now.
#[inline]
pub(crate) fn note_conflict(fenced: &AtomicBool, s: Status) {
    if crate::fencing::is_conflict(s) {
        fenced.store(true, Ordering::Release);
    }
}

/// Why a command gave no completion.
#[derive(Debug)]
pub(crate) enum IoError {
    /// No queue pair could be opened, or it refused the command.
    Open(String),
    /// No completion within the timeout; the queue pair was closed.
    TimedOut(Duration),
    /// A Flush completed on an association newer than the writes it was to cover.
    Reconnected,
    /// The thread is stopping.
    Stopped,
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open(e) => f.write_str(e),
            Self::TimedOut(t) => write!(f, "no answer within {t:?}"),
            Self::Reconnected => f.write_str(
                "the device reconnected after writes its Flush had to cover: they may be lost and are sent again",
            ),
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
            unflushed: None,
            conflict: ConflictWatch::default(),
        }
    }

    /// Sets `flag` at the first Reservation Conflict the device answers ([`ConflictWatch`]).
    pub(crate) fn watching_conflicts(mut self, flag: Arc<AtomicBool>) -> Self {
        self.conflict = ConflictWatch(Some(flag));
        self
    }

    /// The device's watch, for completions reaped from its queue pair directly.
    pub(crate) fn watch(&self) -> ConflictWatch {
        self.conflict.clone()
    }

    fn generation(&self) -> u64 {
        self.dev.link_generation().unwrap_or(0)
    }

    /// The queue pair, opened if there is none.
    pub(crate) fn qp(&mut self) -> Result<&mut dyn QueuePair, IoError> {
        if self.unflushed.is_none() {
            self.unflushed = Some(self.generation());
        }
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
            Waited::Done(c) => {
                self.conflict.saw(c.status);
                if kills_queue(c.status) {
                    drop(self.give_up());
                }
                return Ok(c);
            }
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

    /// Flushes the device: the writes completed before it are on its medium (nothing to send
    /// for a device without a volatile write cache). Fails with
    /// [`IoError::Reconnected`] when the association changed since the first of them went
    /// out (the module's doc).
    pub(crate) fn flush(&mut self, stop: &AtomicBool) -> Result<Completion, IoError> {
        if !self.dev.volatile_write_cache() {
            // What completed is on the medium already.
            self.unflushed = None;
            return Ok(Completion {
                tag: 0,
                status: nvmirror_nvme::Status::SUCCESS,
            });
        }
        let since = self.unflushed;
        let c = self.run(IoCommand::new(IoOp::Flush, 0, 0, 0), None, stop)?;
        if c.status.is_success() {
            self.unflushed = None;
            if since.is_some_and(|g| g != self.generation()) {
                return Err(IoError::Reconnected);
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use nvmirror_nvme::backend::{Fault, FaultyDevice};
    use nvmirror_nvme::{open_leg, Geometry, LinkStatus, Result};

    use super::*;

    /// A mem device reached "over a link" whose association generation the test moves.
    #[derive(Debug)]
    struct Linked {
        inner: Arc<dyn BlockDevice>,
        generation: AtomicU64,
    }

    impl BlockDevice for Linked {
        fn geometry(&self) -> Geometry {
            self.inner.geometry()
        }
        fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>> {
            self.inner.open_qpair(depth)
        }
        fn name(&self) -> &str {
            "linked"
        }
        fn link(&self) -> Option<LinkStatus> {
            Some(LinkStatus {
                connected: true,
                generation: self.generation.load(Ordering::Relaxed),
                ..LinkStatus::default()
            })
        }
    }

    /// A stop flag, a `DevIo` on `dev` and a one-block buffer.
    fn rig(dev: Arc<dyn BlockDevice>) -> (AtomicBool, DevIo, SegBuf) {
        let io = DevIo::new(dev, 4, Duration::from_secs(5));
        (AtomicBool::new(false), io, SegBuf::new(4096))
    }

    fn write(io: &mut DevIo, buf: &mut SegBuf, stop: &AtomicBool) -> Completion {
        let cmd = IoCommand::with_buf(IoOp::Write, 0, 1, buf.io(0, 4096), 0);
        io.run(cmd, Some(buf), stop).unwrap()
    }

    #[test]
    fn a_flush_on_a_newer_association_than_the_writes_fails_until_they_are_sent_again() {
        let dev = Arc::new(Linked {
            inner: open_leg("mem://1MiB?lba=4096").unwrap(),
            generation: AtomicU64::new(1),
        });
        let (stop, mut io, mut buf) = rig(Arc::clone(&dev) as Arc<dyn BlockDevice>);
        assert!(write(&mut io, &mut buf, &stop).status.is_success());
        assert!(io.flush(&stop).unwrap().status.is_success());
        // The device reconnects between a write and its Flush.
        assert!(write(&mut io, &mut buf, &stop).status.is_success());
        dev.generation.store(2, Ordering::Relaxed);
        assert!(matches!(io.flush(&stop), Err(IoError::Reconnected)));
        // Written again on the new association, the Flush covers it.
        assert!(write(&mut io, &mut buf, &stop).status.is_success());
        assert!(io.flush(&stop).unwrap().status.is_success());
        // A reconnect with nothing written since the last Flush changes nothing.
        dev.generation.store(3, Ordering::Relaxed);
        assert!(io.flush(&stop).unwrap().status.is_success());
    }

    #[test]
    fn a_device_without_a_volatile_cache_is_not_sent_flushes() {
        // Memory has no cache apart from its medium; the injector fails any command sent.
        let dev = Arc::new(FaultyDevice::wrap(open_leg("mem://1MiB?lba=4096").unwrap()));
        assert!(!dev.volatile_write_cache());
        let (stop, mut io, mut buf) = rig(Arc::clone(&dev) as Arc<dyn BlockDevice>);
        assert!(write(&mut io, &mut buf, &stop).status.is_success());
        dev.injector().arm(Fault::FailAfter {
            n: 0,
            status: nvmirror_nvme::Status::INTERNAL_ERROR,
        });
        assert!(io.flush(&stop).unwrap().status.is_success());
        assert!(!write(&mut io, &mut buf, &stop).status.is_success());
    }

    #[test]
    fn a_path_error_closes_the_queue_pair() {
        let dev = Arc::new(FaultyDevice::wrap(open_leg("mem://1MiB?lba=4096").unwrap()));
        let (stop, mut io, mut buf) = rig(Arc::clone(&dev) as Arc<dyn BlockDevice>);
        assert!(write(&mut io, &mut buf, &stop).status.is_success());
        assert!(io.qp.is_some());
        let id = dev.injector().arm(Fault::Gone);
        let c = write(&mut io, &mut buf, &stop);
        assert_eq!(c.status.sct(), StatusCodeType::PathRelated, "{}", c.status);
        assert!(io.qp.is_none(), "the next command opens a new queue pair");
        dev.injector().clear(id);
        assert!(write(&mut io, &mut buf, &stop).status.is_success());
    }
}
