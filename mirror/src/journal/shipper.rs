//! The shipper: applies the journal to the far device in sequence order (`docs/journal.md`,
//! "Shipping").
//!
//! Segment by segment: read it back from the journal, send all its records to the far device
//! at once (they never overlap and were all in flight together at the host), then a Flush,
//! then the commit block with FUA. Only then does the next segment go out, so at every instant
//! the far device's medium holds the writes up to one segment boundary plus some of the next
//! segment's (a crash-consistent image, through a power loss of its volatile write cache
//! too), and the journal is freed only of segments the medium holds. A segment the far side
//! refuses is sent again (idempotent) until it takes it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, Status, SubmitError};

use super::dev_io::{kills_queue, note_conflict, DevIo, IoError};
use super::format::{segment_buffer_len, Commit, Iocb, RecordOp, SegmentHeader};
use super::recover::{read_segment, write_blocks, Journal, SegBuf};
use super::{Shared, FAILED};
use crate::wait::{pause, poll_until, Backoff, Polled};

/// Commands sent to the far device at once.
pub(super) const DEPTH: u32 = 64;

pub(crate) struct Shipper {
    sh: Arc<Shared>,
    journal: DevIo,
    /// Opened when first needed, so a far side unreachable at start is retried like one
    /// lost later.
    far: DevIo,
    j: Journal,
    buf: SegBuf,
    cbuf: SegBuf,
    iocbs: Vec<Iocb>,
    commit: Commit,
    cpl: Vec<Completion>,
}

impl Shipper {
    pub(crate) fn new(
        sh: Arc<Shared>,
        journal: Arc<dyn BlockDevice>,
        far: Arc<dyn BlockDevice>,
        commit: Commit,
    ) -> Result<Self, String> {
        let len = segment_buffer_len(sh.cfg.max_records, sh.cfg.max_segment_bytes, sh.lba_size);
        let mut journal = DevIo::new(journal, 2, sh.cfg.io_timeout);
        journal.qp().map_err(|e| e.to_string())?;
        let mut far =
            DevIo::new(far, DEPTH, sh.cfg.io_timeout).watching_conflicts(Arc::clone(&sh.fenced));
        // Unreachable now is retried like lost later.
        let _ = far.qp();
        Ok(Self {
            journal,
            far,
            j: Journal {
                uuid: sh.uuid,
                lba_size: sh.lba_size,
                ring_end: sh.ring_end,
            },
            buf: SegBuf::new(len),
            cbuf: SegBuf::new(sh.lba_size as usize),
            iocbs: Vec::with_capacity(sh.cfg.max_records),
            commit,
            cpl: vec![Completion::default(); DEPTH as usize],
            sh,
        })
    }

    pub(crate) fn run(mut self) {
        let mut idle = Backoff::new();
        let mut said_damage = false;
        loop {
            if self.sh.stop.load(Ordering::Acquire) {
                return;
            }
            let next = self.commit.seq + 1;
            if self.sh.written_seq.load(Ordering::Acquire) < next {
                idle.wait();
                continue;
            }
            idle.worked();
            let found = read_segment(
                &mut self.journal,
                &self.j,
                self.commit.offset,
                next,
                &mut self.buf,
                &mut self.iocbs,
                &self.sh.stop,
                true,
            );
            let (start, h) = match found {
                Ok(Some(s)) => s,
                other => {
                    if self.sh.stop.load(Ordering::Acquire) {
                        return;
                    }
                    if !said_damage {
                        let why = match other {
                            Err(e) => e,
                            _ => format!(
                                "no valid segment with record {next} at block {}",
                                self.commit.offset
                            ),
                        };
                        tracing::error!(leg = %self.sh.name, error = %why, "cannot read the journal back: shipping stops");
                        self.sh
                            .report(Some(format!("cannot read the journal back: {why}")));
                        said_damage = true;
                    }
                    self.sh.state.store(FAILED, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            self.sh.next_unix_ms.store(h.unix_ms, Ordering::Release);
            if !self.apply_until_taken(&h) {
                return;
            }
            let payload: u64 = self
                .iocbs
                .iter()
                .map(|r| r.payload_len(h.data_lba_size) as u64)
                .sum();
            let commit = Commit {
                counter: self.commit.counter + 1,
                seq: h.seq_first + u64::from(h.count) - 1,
                offset: start + u64::from(h.total_blocks),
                bytes: h.bytes_before + payload,
                unix_ms: h.unix_ms,
            };
            if !self.write_commit(commit) {
                return;
            }
            self.commit = commit;
            self.sh
                .commit_offset
                .store(commit.offset, Ordering::Release);
            self.sh.applied_bytes.store(commit.bytes, Ordering::Release);
            self.sh
                .applied_unix_ms
                .store(commit.unix_ms, Ordering::Release);
            self.sh.applied_seq.store(commit.seq, Ordering::Release);
            self.sh.next_unix_ms.store(0, Ordering::Release);
        }
    }

    /// Applies the segment in the buffer until the far side takes it; false on stop.
    fn apply_until_taken(&mut self, h: &SegmentHeader) -> bool {
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.apply(h) {
                Ok(()) => {
                    if self.sh.retrying.swap(false, Ordering::Relaxed) {
                        tracing::info!(leg = %self.sh.name, "the far side takes the journal again");
                        self.sh.report(None);
                    }
                    return true;
                }
                Err(NotApplied::Stopped) => return false,
                Err(why) if self.sh.is_fenced() => {
                    return self
                        .sh
                        .park_fenced(&format!("journal segment #{}: {why}", h.seq_first))
                }
                Err(why) => {
                    // The reason first, so a status that shows `retrying` shows why.
                    if !self.sh.retrying.load(Ordering::Relaxed) {
                        self.sh.report(Some(format!(
                            "the far side did not take journal segment #{}: {why}",
                            h.seq_first
                        )));
                        self.sh.retrying.store(true, Ordering::Relaxed);
                        tracing::warn!(leg = %self.sh.name, %why, seq = h.seq_first, "the far side did not take a journal segment; it is sent again until taken");
                    }
                    if !pause(backoff, &self.sh.stop) {
                        return false;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Sends the segment in the buffer to the far device ([`send_segment`]).
    fn apply(&mut self, h: &SegmentHeader) -> Result<(), NotApplied> {
        send_segment(
            &mut self.far,
            &self.sh,
            &mut self.buf,
            &self.iocbs,
            &mut self.cpl,
            h,
        )
    }

    fn write_commit(&mut self, c: Commit) -> bool {
        write_commit(&self.sh, &mut self.journal, &mut self.cbuf, c)
    }
}

/// Sends every record of segment `h` (in `buf`, its records in `iocbs`) to the far device,
/// then a Flush: the segment is on the far medium before the commit moves past it and before
/// the next segment's writes go out (a volatile write cache may write back in any order, and
/// lose what it holds). After a failure the queue pair and the buffer are left safe for the
/// next try ([`after_failure`]).
pub(super) fn send_segment(
    far: &mut DevIo,
    sh: &Shared,
    buf: &mut SegBuf,
    iocbs: &[Iocb],
    cpl: &mut [Completion],
    h: &SegmentHeader,
) -> Result<(), NotApplied> {
    let res = send_records(far, sh, buf, iocbs, cpl, h);
    after_failure(far, buf, &res);
    res
}

fn send_records(
    dev: &mut DevIo,
    sh: &Shared,
    buf: &mut SegBuf,
    iocbs: &[Iocb],
    cpl: &mut [Completion],
    h: &SegmentHeader,
) -> Result<(), NotApplied> {
    let timeout = dev.timeout;
    let far = dev.qp()?;
    let hlen = h.header_blocks as usize * sh.lba_size as usize;
    let mut off = hlen;
    let mut failed = None;
    let mut outstanding = 0u32;
    for (i, r) in iocbs.iter().enumerate() {
        if r.op == RecordOp::Flush {
            continue;
        }
        let n = r.payload_len(h.data_lba_size);
        let cmd = if n > 0 {
            IoCommand::with_buf(IoOp::Write, r.lba, r.nlb, buf.io(off, n), i as u64)
        } else {
            IoCommand::new(r.op.io_op(), r.lba, r.nlb, i as u64)
        };
        off += n;
        loop {
            // SAFETY: the segment buffer is the caller's and is neither touched nor freed
            // until every command on it is reaped below, or, when they are given up, parked
            // on the queue pair's fence (`send_segment`).
            match unsafe { far.submit(cmd) } {
                Ok(()) => {
                    outstanding += 1;
                    break;
                }
                Err(SubmitError::QueueFull) => {
                    outstanding -= reap(far, sh, cpl, &mut failed, timeout)?;
                }
            }
        }
    }
    while outstanding > 0 {
        outstanding -= reap(far, sh, cpl, &mut failed, timeout)?;
    }
    if let Some(s) = failed {
        return Err(NotApplied::Refused(s));
    }
    let c = dev.flush(&sh.stop)?;
    if !c.status.is_success() {
        return Err(NotApplied::Refused(c.status));
    }
    Ok(())
}

/// After a failed try on `dev` whose commands lie in `buf`: a path error may leave the queue
/// pair dead, so the next try opens a new one (every command was reaped: nothing holds the
/// buffer); commands given up may still read the buffer, so it is parked on the close's fence.
fn after_failure(dev: &mut DevIo, buf: &mut SegBuf, res: &Result<(), NotApplied>) {
    match res {
        Err(NotApplied::Refused(s)) if kills_queue(*s) => {
            drop(dev.give_up());
        }
        Err(NotApplied::TimedOut(_) | NotApplied::Stopped) => {
            let fence = dev.give_up();
            buf.park_on(fence);
        }
        _ => {}
    }
}

/// Makes `c` durable in its commit block of the journal (`cbuf`: one block); false on stop.
pub(super) fn write_commit(sh: &Shared, journal: &mut DevIo, cbuf: &mut SegBuf, c: Commit) -> bool {
    let bs = sh.lba_size as usize;
    let mut failed = false;
    loop {
        c.encode(sh.uuid, &mut cbuf.bytes()[..bs]);
        cbuf.bytes()[Commit::LEN..bs].fill(0);
        match write_blocks(journal, c.block(), cbuf, 0, bs, sh.lba_size, &sh.stop) {
            Ok(()) => {
                if failed {
                    sh.report(None);
                }
                return true;
            }
            Err(e) => {
                if sh.stop.load(Ordering::Acquire) {
                    return false;
                }
                tracing::error!(leg = %sh.name, error = %e, "cannot write the journal's commit block; retrying");
                sh.report(Some(format!(
                    "cannot write the journal's commit block: {e}"
                )));
                failed = true;
                sh.state.store(FAILED, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Why a segment was not applied.
#[derive(Debug)]
pub(super) enum NotApplied {
    /// The shipper is stopping.
    Stopped,
    /// The far device failed a command.
    Refused(Status),
    /// The far device did not answer within the timeout; its commands were given up.
    TimedOut(Duration),
    /// No queue pair could be opened on the far device.
    Unreachable(String),
}

impl std::fmt::Display for NotApplied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stopped => f.write_str("stopped"),
            Self::Refused(s) => write!(f, "refused: {s}"),
            Self::TimedOut(t) => write!(f, "no answer within {t:?}"),
            Self::Unreachable(e) => write!(f, "unreachable: {e}"),
        }
    }
}

impl From<IoError> for NotApplied {
    fn from(e: IoError) -> Self {
        match e {
            IoError::Stopped => Self::Stopped,
            IoError::TimedOut(t) => Self::TimedOut(t),
            IoError::Open(e) => Self::Unreachable(e),
            e @ IoError::Reconnected => Self::Unreachable(e.to_string()),
        }
    }
}

/// Waiting this long for the far device shows the leg as `retrying` while it waits on.
const SLOW: Duration = Duration::from_secs(1);

/// Waits for completions from the far device, at most `timeout`; returns how many came and
/// notes the first failure.
pub(super) fn reap(
    far: &mut dyn nvmirror_nvme::QueuePair,
    sh: &Shared,
    cpl: &mut [Completion],
    failed: &mut Option<Status>,
    timeout: Duration,
) -> Result<u32, NotApplied> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        let until = if sh.retrying.load(Ordering::Relaxed) {
            deadline
        } else {
            (start + SLOW).min(deadline)
        };
        match poll_until(far, cpl, until, Some(&sh.stop)) {
            Polled::Got(n) => {
                for c in &cpl[..n] {
                    if !c.status.is_success() {
                        note_conflict(&sh.fenced, c.status);
                        failed.get_or_insert(c.status);
                    }
                }
                return Ok(n as u32);
            }
            Polled::Stopped => return Err(NotApplied::Stopped),
            Polled::TimedOut if Instant::now() >= deadline => {
                return Err(NotApplied::TimedOut(timeout))
            }
            Polled::TimedOut => sh.retrying.store(true, Ordering::Relaxed),
        }
    }
}
