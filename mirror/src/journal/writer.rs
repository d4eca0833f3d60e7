//! The journal writer: group commit (`docs/journal.md`, "Writing").
//!
//! One thread per journal takes every command the queue pairs handed over since the last
//! segment, packs them into one segment (header, I/O control blocks, data) and writes it with
//! FUA in one command; when that completes, every command in it completes. A record that
//! overlaps one already in the segment starts the next segment, so the records of a segment
//! can be applied in any order; a write larger than the segment's room is split across
//! segments and completes with its last piece.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{BlockDevice, Completion, Status};

use super::dev_io::DevIo;
use super::format::{segment_buffer_len, Iocb, RecordOp, SegmentHeader, RING_START};
use super::recover::{write_blocks, SegBuf};
use super::{unix_ms, Channel, Req, Shared, FAILED, REPLICATING, STEPPED_DOWN};
use crate::wait::Backoff;

/// One record of the segment being built.
struct Piece {
    iocb: Iocb,
    /// Its payload, in the command's buffer (empty for records without one).
    src: IoBuf,
    /// The command it completes when the segment is durable (`None` for all pieces of a
    /// split write but the last).
    done: Option<(Arc<Channel>, u64)>,
}

pub(crate) struct Writer {
    sh: Arc<Shared>,
    io: DevIo,
    buf: SegBuf,
    pieces: Vec<Piece>,
    iocbs: Vec<Iocb>,
    /// A command whose blocks from `.1` on go in the next segment.
    carry: Option<(Req, u32)>,
    next_seq: u64,
    tail: u64,
    bytes: u64,
}

impl Writer {
    pub(crate) fn new(
        sh: Arc<Shared>,
        journal: Arc<dyn BlockDevice>,
        next_seq: u64,
        tail: u64,
    ) -> Result<Self, String> {
        let mut io = DevIo::new(journal, 2, sh.cfg.io_timeout);
        io.qp().map_err(|e| e.to_string())?;
        let len = segment_buffer_len(sh.cfg.max_records, sh.cfg.max_segment_bytes, sh.lba_size);
        Ok(Self {
            io,
            buf: SegBuf::new(len),
            pieces: Vec::with_capacity(sh.cfg.max_records),
            iocbs: Vec::with_capacity(sh.cfg.max_records),
            carry: None,
            next_seq,
            tail,
            bytes: sh.written_bytes.load(Ordering::Relaxed),
            sh,
        })
    }

    pub(crate) fn run(mut self) {
        let mut idle = Backoff::new();
        loop {
            if self.sh.stop.load(Ordering::Acquire) {
                self.fail_all(Status::ABORTED_SQ_DELETION);
                return;
            }
            if self.gather() == 0 {
                idle.wait();
                continue;
            }
            idle.worked();
            self.commit();
        }
    }

    /// Takes commands into the segment until it is full, a command overlaps one in it, or
    /// none are waiting. Returns the number of records.
    fn gather(&mut self) -> usize {
        let lba_size = self.sh.geo.lba_size;
        let max_payload_blocks = (self.sh.cfg.max_segment_bytes / lba_size as usize) as u32;
        let mut payload_blocks = 0u32;
        while self.pieces.len() < self.sh.cfg.max_records {
            let (req, from) = match self.carry.take() {
                Some(c) => c,
                // SAFETY: the writer is the ring's only consumer.
                None => match unsafe { self.sh.sub.pop() } {
                    Some(r) => (r, 0),
                    None => break,
                },
            };
            let Some(op) = RecordOp::of(req.cmd.op) else {
                // Reads never reach the writer; answer one that did rather than lose it.
                self.sh.journaled_inflight.fetch_sub(1, Ordering::SeqCst);
                req.chan.complete(Completion {
                    tag: req.cmd.tag,
                    status: Status::INTERNAL_ERROR,
                });
                continue;
            };
            let (lba, nlb) = if op == RecordOp::Flush {
                (0, 0)
            } else {
                (req.cmd.slba + u64::from(from), req.cmd.nlb - from)
            };
            let overlaps = op != RecordOp::Flush
                && self.pieces.iter().any(|p| {
                    p.iocb.op != RecordOp::Flush
                        && p.iocb.lba < lba + u64::from(nlb)
                        && lba < p.iocb.lba + u64::from(p.iocb.nlb)
                });
            let room = max_payload_blocks - payload_blocks;
            if overlaps || (op == RecordOp::Write && room == 0) {
                self.carry = Some((req, from));
                break;
            }
            let take = if op == RecordOp::Write {
                nlb.min(room)
            } else {
                nlb
            };
            let src = if op == RecordOp::Write {
                payload_blocks += take;
                let at = from as usize * lba_size as usize;
                IoBuf::from_raw(
                    req.cmd.buf.as_ptr().wrapping_add(at),
                    take as usize * lba_size as usize,
                )
            } else {
                IoBuf::EMPTY
            };
            let iocb = Iocb {
                op,
                fua: req.cmd.wants_fua(),
                lba,
                nlb: take,
                more: take < nlb,
                catch_up: self.sh.catching_up(),
                crc: 0,
            };
            if take < nlb {
                self.pieces.push(Piece {
                    iocb,
                    src,
                    done: None,
                });
                self.carry = Some((req, from + take));
                break;
            }
            self.pieces.push(Piece {
                iocb,
                src,
                done: Some((req.chan, req.cmd.tag)),
            });
        }
        self.pieces.len()
    }

    /// Where a segment of `n` blocks goes: at the tail, or at the ring's start when it does
    /// not fit before the end; `None` when the ring has no room before the oldest segment
    /// still needed.
    fn place(&self, n: u64) -> Option<u64> {
        let commit = self.sh.commit_offset.load(Ordering::Acquire);
        let end = self.sh.ring_end;
        if self.tail >= commit {
            if self.tail + n <= end {
                return Some(self.tail);
            }
            (RING_START + n < commit).then_some(RING_START)
        } else {
            (self.tail + n < commit).then_some(self.tail)
        }
    }

    /// Where `n` more blocks go, unless the journal's bound refuses them or the ring has no
    /// room.
    fn fit(&self, n: u64) -> Option<u64> {
        if self.over_bound(n) {
            None
        } else {
            self.place(n)
        }
    }

    /// Whether the journal's bound refuses `n` more blocks: bytes in use, or the age of the
    /// oldest write not yet applied.
    ///
    /// Once stepped down, the leg stays down until the journal has drained below half its
    /// bound (both bounds), so it does not flap at the edge.
    fn over_bound(&self, n: u64) -> bool {
        let used = (self.sh.used_blocks() + n) * u64::from(self.sh.lba_size);
        // While a resync of an async-cycle leg runs its cuts are held: the age bound waits
        // for the copy to end (the byte bound stays).
        let rpo = if self.sh.catching_up() {
            0.0
        } else {
            self.sh.rpo_seconds()
        };
        let max_lag = self.sh.cfg.max_lag.as_secs_f64();
        if self.sh.state.load(Ordering::Relaxed) == STEPPED_DOWN {
            return self.sh.cfg.max_bytes.is_some_and(|max| used > max / 2) || rpo > max_lag / 2.0;
        }
        self.sh.cfg.max_bytes.is_some_and(|max| used > max) || rpo > max_lag
    }

    /// Writes the gathered records as one segment and completes their commands.
    fn commit(&mut self) {
        if self.sh.is_fenced() {
            return self.complete(crate::fencing::FENCED_STATUS);
        }
        let bs = self.sh.lba_size as usize;
        let geo_bs = self.sh.geo.lba_size as usize;
        let header_blocks =
            super::format::SegmentHeader::blocks_for(self.pieces.len(), self.sh.lba_size);
        let payload: usize = self
            .pieces
            .iter()
            .map(|p| p.iocb.payload_len(geo_bs as u32))
            .sum();
        let data_blocks = payload.div_ceil(bs);
        let total = header_blocks as u64 + data_blocks as u64;
        if self.sh.state.load(Ordering::Relaxed) == FAILED {
            return self.complete(Status::WRITE_FAULT);
        }
        let mut place = self.fit(total);
        if place.is_none()
            && self.sh.catching_up()
            && self.sh.state.load(Ordering::Relaxed) != STEPPED_DOWN
        {
            // A catch-up (a resync of an async-cycle leg) fills the journal faster than its
            // pieces reach the staging area: hold the writes (up to half the I/O timeout)
            // while the shipper frees the journal, rather than fail the copy.
            let deadline = std::time::Instant::now() + self.sh.cfg.io_timeout / 2;
            while place.is_none()
                && std::time::Instant::now() < deadline
                && !self.sh.stop.load(Ordering::Acquire)
            {
                std::thread::sleep(std::time::Duration::from_micros(200));
                place = self.fit(total);
            }
        }
        let Some(start) = place else {
            if self.sh.state.swap(STEPPED_DOWN, Ordering::Relaxed) != STEPPED_DOWN {
                self.sh.step_downs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(leg = %self.sh.name, used_bytes = self.sh.used_blocks() * bs as u64, rpo_seconds = self.sh.rpo_seconds(), "journal bound reached: writes to the asynchronous leg are refused, and the volume tracks them in its bitmap");
            }
            return self.complete(Status::CAPACITY_EXCEEDED);
        };
        let hlen = header_blocks as usize * bs;
        let len = total as usize * bs;
        self.buf.ensure(len);
        self.iocbs.clear();
        {
            let out = self.buf.bytes();
            let mut off = hlen;
            for p in &mut self.pieces {
                let n = p.src.len();
                if n > 0 {
                    // SAFETY: `src` lies in a write command's buffer, which its submitter keeps
                    // allocated and unmodified until the command completes (the `submit`
                    // contract), and the command completes only after this segment is written.
                    let data = unsafe { std::slice::from_raw_parts(p.src.as_ptr(), n) };
                    out[off..off + n].copy_from_slice(data);
                    p.iocb.crc = crc32c::crc32c(data);
                    off += n;
                }
                self.iocbs.push(p.iocb);
            }
            out[off..len].fill(0);
            let now = unix_ms();
            SegmentHeader {
                uuid: self.sh.uuid,
                seq_first: self.next_seq,
                count: self.pieces.len() as u32,
                header_blocks,
                total_blocks: total as u32,
                data_lba_size: self.sh.geo.lba_size,
                unix_ms: now,
                bytes_before: self.bytes,
            }
            .encode(&self.iocbs, &mut out[..hlen]);
        }
        let res = write_blocks(
            &mut self.io,
            start,
            &mut self.buf,
            0,
            len,
            self.sh.lba_size,
            &self.sh.stop,
        );
        if let Err(e) = res {
            tracing::error!(leg = %self.sh.name, error = %e, "journal write failed: the asynchronous leg stops taking writes");
            self.sh.state.store(FAILED, Ordering::Relaxed);
            return self.complete(Status::WRITE_FAULT);
        }
        let _ = self.sh.state.compare_exchange(
            STEPPED_DOWN,
            REPLICATING,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.next_seq += self.pieces.len() as u64;
        self.tail = start + total;
        self.bytes += payload as u64;
        self.sh
            .host_bytes
            .fetch_add(payload as u64, Ordering::Relaxed);
        self.sh
            .journal_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.sh.tail_offset.store(self.tail, Ordering::Release);
        self.sh.written_bytes.store(self.bytes, Ordering::Release);
        self.sh.written_unix_ms.store(unix_ms(), Ordering::Release);
        self.sh
            .written_seq
            .store(self.next_seq - 1, Ordering::Release);
        self.complete(Status::SUCCESS);
    }

    /// Completes the gathered commands with `status` and empties the segment.
    fn complete(&mut self, status: Status) {
        // A split write whose piece failed fails whole: its rest is not journaled either.
        if !status.is_success() && self.pieces.last().is_some_and(|p| p.done.is_none()) {
            if let Some((req, _)) = self.carry.take() {
                self.sh.journaled_inflight.fetch_sub(1, Ordering::SeqCst);
                req.chan.complete(Completion {
                    tag: req.cmd.tag,
                    status,
                });
            }
        }
        for p in self.pieces.drain(..) {
            if let Some((chan, tag)) = p.done {
                self.sh.journaled_inflight.fetch_sub(1, Ordering::SeqCst);
                chan.complete(Completion { tag, status });
            }
        }
    }

    /// At stop: fails everything not yet journaled.
    fn fail_all(&mut self, status: Status) {
        self.complete(status);
        if let Some((req, _)) = self.carry.take() {
            self.sh.journaled_inflight.fetch_sub(1, Ordering::SeqCst);
            req.chan.complete(Completion {
                tag: req.cmd.tag,
                status,
            });
        }
        // SAFETY: the writer is the ring's only consumer.
        while let Some(req) = unsafe { self.sh.sub.pop() } {
            self.sh.journaled_inflight.fetch_sub(1, Ordering::SeqCst);
            req.chan.complete(Completion {
                tag: req.cmd.tag,
                status,
            });
        }
    }
}
