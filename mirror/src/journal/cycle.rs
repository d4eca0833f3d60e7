//! The cycle shipper of an `async-cycle` leg (`docs/cycles.md`): instead of applying the
//! journal segment by segment, it freezes it at a cut once a cycle, and moves the image from
//! one cut to the next atomically, through a staging area at the far site.
//!
//! One cycle:
//! 1. **Freeze**: the cut is the journal position of the last durable segment (never right
//!    after a piece of a split write); one pass over the frozen segments builds the
//!    changed-chunk table, a map from block to the last record that wrote it.
//! 2. **Stage**: the winning runs go to the staging area, then their table, then a Flush.
//! 3. **Commit**: the staging header says *committed*, with FUA.
//! 4. **Apply**: the winning runs go to the image, then a Flush.
//! 5. **Advance**: the journal's commit block moves to the cut; the header says *applied*.
//!
//! While a resync of the leg runs (a catch-up) no cut is committed; when the journal fills
//! meanwhile, its frozen part is staged as a *piece* of the catch-up (the header says
//! *open*, the image is untouched) and the journal is freed up to there. The catch-up's
//! cycle then holds every piece and is applied from the staging area.
//!
//! A block rewritten a hundred times in the cycle crosses the link once per copy. A crash
//! before step 3 leaves the image at the previous cut (the next start ships the cycle again);
//! after it, whoever opens the staging area rolls the cycle forward from the staging area
//! alone (`roll::roll_forward`), so the image is only ever seen at a cut.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, QueuePair, SubmitError};
use rangemap::RangeMap;

use super::dev_io::{kills_queue, DevIo};
use super::format::{segment_buffer_len, Commit, Iocb, RecordOp, SegmentHeader};
use super::recover::{read_blocks, read_segment, write_blocks, Journal, SegBuf};
use super::roll::roll_forward;
use super::shipper::{reap, write_commit, NotApplied, DEPTH};
use super::staging::{decode_table, CycleState, Run, RunOp, StagingHeader, DATA_START, RUN_LEN};
use super::{unix_ms, Shared, FAILED, MODE_ASYNC};
use crate::wait::pause;

/// The record that last wrote a block in the frozen cycle: (segment, record, op).
type Winner = (u32, u32, RecordOp);

/// Where the winning runs go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Staging,
    Image,
}

pub(crate) struct CycleShipper {
    sh: Arc<Shared>,
    /// The cycle period; `None` for an `async-journal` leg with a staging area, which ships
    /// segment by segment while it keeps up and a backlog as one batch ([`Self::run`]).
    interval: Option<Duration>,
    /// A far-site applier applies committed cycles (`FarApplier`); this side only stages.
    far_apply: bool,
    journal: DevIo,
    far: DevIo,
    stg: DevIo,
    stg_blocks: u64,
    j: Journal,
    buf: SegBuf,
    /// The buffers a walk reads segments into, in turn.
    walk_bufs: Vec<SegBuf>,
    /// One block: a commit block or a staging header.
    cbuf: SegBuf,
    /// The run table.
    tbuf: SegBuf,
    iocbs: Vec<Iocb>,
    commit: Commit,
    cpl: Vec<Completion>,
    /// The last durable staging header (read when the shipper starts).
    header: Option<StagingHeader>,
    /// The frozen segments (start block, header), the changed-chunk table and the runs.
    segs: Vec<(u64, SegmentHeader)>,
    map: RangeMap<u64, Winner>,
    /// Whether each frozen segment holds a winning record (only those are read again).
    wins: Vec<bool>,
    runs: Vec<Run>,
    /// Where the next staged run goes (after an open catch-up's pieces and their table).
    stage_at: u64,
    /// The committed cycle holds pieces no longer in the journal: it is applied from the
    /// staging area.
    from_staging: bool,
    /// When the cycle being shipped was frozen.
    started: Instant,
}

/// How a cycle step ended short.
pub(super) enum Short {
    Stopped,
    /// Worth trying again (the far side refused or did not answer).
    Retry(String),
    /// The cut does not fit in the staging area (`need` blocks, of which `pieces` hold the
    /// pieces an open catch-up staged before).
    TooLarge {
        need: u64,
        pieces: u64,
    },
    /// The journal cannot be read back.
    Damaged(String),
}

impl From<NotApplied> for Short {
    fn from(e: NotApplied) -> Self {
        match e {
            NotApplied::Stopped => Self::Stopped,
            other => Self::Retry(other.to_string()),
        }
    }
}

impl CycleShipper {
    pub(crate) fn new(
        sh: Arc<Shared>,
        (interval, far_apply): (Option<Duration>, bool),
        journal: Arc<dyn BlockDevice>,
        far: Arc<dyn BlockDevice>,
        staging: Arc<dyn BlockDevice>,
        commit: Commit,
    ) -> Result<Self, String> {
        let len = segment_buffer_len(sh.cfg.max_records, sh.cfg.max_segment_bytes, sh.lba_size);
        let stg = staging.geometry();
        let stg_blocks = stg.num_blocks;
        let image = sh.geo.num_blocks * u64::from(sh.geo.lba_size);
        if stg.num_blocks * u64::from(stg.lba_size) < image {
            tracing::warn!(
                leg = %sh.name,
                staging_bytes = stg.num_blocks * u64::from(stg.lba_size),
                image_bytes = image,
                "the staging area is smaller than the image: a catch-up of the whole leg (a new or replaced far side) cannot be staged and will fail the leg (docs/cycles.md, Sizing)"
            );
        }
        let mut journal = DevIo::new(journal, 2, sh.cfg.io_timeout);
        journal.qp().map_err(|e| e.to_string())?;
        Ok(Self {
            interval,
            far_apply,
            journal,
            far: DevIo::new(far, DEPTH, sh.cfg.io_timeout)
                .watching_conflicts(Arc::clone(&sh.fenced)),
            stg: DevIo::new(staging, DEPTH, sh.cfg.io_timeout)
                .watching_conflicts(Arc::clone(&sh.fenced)),
            stg_blocks,
            j: Journal {
                uuid: sh.uuid,
                lba_size: sh.lba_size,
                ring_end: sh.ring_end,
            },
            buf: SegBuf::new(len),
            walk_bufs: (0..WALK_BUFS).map(|_| SegBuf::new(WALK_START)).collect(),
            cbuf: SegBuf::new(sh.geo.lba_size.max(sh.lba_size) as usize),
            tbuf: SegBuf::new(sh.geo.lba_size as usize),
            iocbs: Vec::with_capacity(sh.cfg.max_records),
            commit,
            cpl: vec![Completion::default(); DEPTH as usize],
            header: None,
            segs: Vec::new(),
            map: RangeMap::new(),
            wins: Vec::new(),
            runs: Vec::new(),
            stage_at: DATA_START,
            from_staging: false,
            started: Instant::now(),
            sh,
        })
    }

    pub(crate) fn run(mut self) {
        if !self.retry("open the staging area", Self::open_staging) {
            return;
        }
        let mut last = Instant::now();
        let mut idle = crate::wait::Backoff::new();
        loop {
            if self.sh.stop.load(Ordering::Acquire) {
                return;
            }
            let pending = self.sh.written_seq.load(Ordering::Acquire) > self.commit.seq;
            if self.sh.catching_up() {
                // A resync is copying into the open cycle: a cut now would mix copied and
                // uncopied regions. A journal filling meanwhile is staged as a piece.
                if pending && self.piece_due() && !self.retry("stage a catch-up piece", Self::piece)
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let open = self.header.is_some_and(|h| h.state == CycleState::Open);
            let pending = pending || open;
            let Some(interval) = self.interval else {
                // async-journal: a segment as soon as it is durable; a backlog as one batch.
                if !pending {
                    idle.wait();
                    continue;
                }
                idle.worked();
                if !self.retry("ship the journal", Self::ship_journal) {
                    return;
                }
                continue;
            };
            let due = self.sh.cycle.asked.load(Ordering::Acquire)
                || self.sh.mode.load(Ordering::Acquire) != MODE_ASYNC
                || last.elapsed() >= interval;
            if !pending || !due {
                if !pending && due {
                    // Nothing to ship: the cycle is empty, the image is at the cut already.
                    self.sh.cycle.asked.store(false, Ordering::Release);
                    last = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            self.sh.cycle.asked.store(false, Ordering::Release);
            last = Instant::now();
            if !self.retry("ship a cycle", Self::cycle) {
                return;
            }
        }
    }

    /// Runs `step` until it succeeds, backing off between tries; false on stop.
    fn retry(&mut self, what: &str, mut step: impl FnMut(&mut Self) -> Result<(), Short>) -> bool {
        let mut backoff = Duration::from_millis(10);
        // The reason last reported: a new one is reported (and logged) in its place.
        let mut said: Option<String> = None;
        loop {
            // Why it failed, and whether that fails the leg (else the far side is retried).
            let (why, failed) = match step(self) {
                Ok(()) => {
                    if said.is_some() {
                        self.sh.report(None);
                    }
                    if self.sh.retrying.swap(false, Ordering::Relaxed) {
                        tracing::info!(leg = %self.sh.name, "the far side takes cycles again");
                    }
                    if said.is_some() {
                        let _ = self.sh.state.compare_exchange(
                            FAILED,
                            super::REPLICATING,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    return true;
                }
                Err(Short::Stopped) => return false,
                Err(Short::Retry(why)) => (why, false),
                Err(Short::TooLarge { need, pieces: 0 }) => (
                    format!(
                        "one segment of the journal needs {need} blocks of staging area; it has {}",
                        self.stg_blocks
                    ),
                    true,
                ),
                Err(Short::TooLarge { need, pieces }) => (
                    format!(
                        "the catch-up outgrew the staging area: its pieces hold {pieces} blocks and the next needs {} more, of {} in all; a catch-up is staged whole (the copy and every write during it) before it is applied, so the staging area must hold it",
                        need - pieces,
                        self.stg_blocks
                    ),
                    true,
                ),
                Err(Short::Damaged(why)) => (why, true),
            };
            if self.sh.is_fenced() {
                return self.sh.park_fenced(&format!("{what}: {why}"));
            }
            // The reason first, so a status that shows the state shows why.
            if said.as_deref() != Some(why.as_str()) {
                tracing::warn!(leg = %self.sh.name, %why, "cannot {what}; trying again until it can");
                self.sh.report(Some(format!("cannot {what}: {why}")));
                said = Some(why);
            }
            if failed {
                self.sh.state.store(FAILED, Ordering::Relaxed);
            } else {
                self.sh.retrying.store(true, Ordering::Relaxed);
            }
            if !pause(backoff, &self.sh.stop) {
                return false;
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Reads the staging header (formatting a blank area) and finishes a cycle a crash left
    /// committed: the image is rolled forward from the staging area, the journal's commit
    /// moves to its cut.
    fn open_staging(&mut self) -> Result<(), Short> {
        let bs = self.sh.geo.lba_size;
        let found = read_header(
            &mut self.stg,
            &mut self.tbuf,
            bs,
            self.stg_blocks,
            &self.sh.stop,
        )?;
        let mut h = match found {
            Some(h) => h,
            None => {
                let h = StagingHeader::blank(bs, self.stg_blocks, self.sh.uuid);
                write_header(&mut self.stg, &mut self.cbuf, &h, &self.sh.stop)?;
                tracing::info!(leg = %self.sh.name, "formatted a blank staging area");
                h
            }
        };
        if h.state == CycleState::Committed {
            tracing::info!(leg = %self.sh.name, cycle = h.cycle, "a committed cycle is rolled forward onto the image");
            h = apply_committed(
                &mut self.stg,
                &mut self.far,
                &mut self.walk_bufs,
                h,
                &self.sh.stop,
            )?;
        }
        // A cycle of this journal the commit block does not know of yet (rolled forward just
        // now, or applied before a crash ahead of the commit block's write).
        self.advance_journal(&h)?;
        if h.state == CycleState::Open && h.journal == self.sh.uuid {
            // Pieces of a catch-up: the journal is free up to them, the image is at `cycle`;
            // held until the volume says whether the leg is whole.
            self.sh.cycle.restored.store(true, Ordering::Release);
            if h.staged.seq > self.commit.seq {
                self.free_journal(h.staged)?;
            }
            let sh = &self.sh;
            sh.applied_seq.store(h.cut.seq, Ordering::Release);
            sh.applied_bytes.store(h.cut.bytes, Ordering::Release);
            sh.applied_unix_ms.store(h.cut.unix_ms, Ordering::Release);
            sh.next_unix_ms.store(h.cut.unix_ms, Ordering::Release);
            tracing::info!(leg = %sh.name, cycle = h.cycle, runs = h.runs, bytes = h.data_bytes, "a catch-up staged in pieces goes on");
        }
        self.sh.cycle.cycle.store(h.cycle, Ordering::Release);
        self.sh
            .cycle
            .cut_unix_ms
            .store(h.cut.unix_ms, Ordering::Release);
        self.header = Some(h);
        Ok(())
    }

    /// Moves the journal's commit to the cut of `h` when the image holds a cycle of this
    /// journal that the commit block does not know of yet (a crash between steps 4 and 5).
    fn advance_journal(&mut self, h: &StagingHeader) -> Result<(), Short> {
        if h.journal != self.sh.uuid || h.cut.seq <= self.commit.seq {
            return Ok(());
        }
        let cut = Commit {
            counter: self.commit.counter + 1,
            ..h.cut
        };
        self.publish(cut)
    }

    /// Moves the journal's commit block to `cut`: the segments before it are free.
    fn free_journal(&mut self, cut: Commit) -> Result<(), Short> {
        if !write_commit(&self.sh, &mut self.journal, &mut self.cbuf, cut) {
            return Err(Short::Stopped);
        }
        self.commit = cut;
        self.sh.commit_offset.store(cut.offset, Ordering::Release);
        Ok(())
    }

    /// Frees the journal up to `cut`, which the image now holds.
    fn publish(&mut self, cut: Commit) -> Result<(), Short> {
        self.free_journal(cut)?;
        let sh = &self.sh;
        sh.applied_bytes.store(cut.bytes, Ordering::Release);
        sh.applied_unix_ms.store(cut.unix_ms, Ordering::Release);
        sh.applied_seq.store(cut.seq, Ordering::Release);
        sh.next_unix_ms.store(0, Ordering::Release);
        Ok(())
    }

    /// `async-journal`: the next segment straight to the image when it is the last durable
    /// one, else every durable segment as one batch (a cycle). A cycle committed or a
    /// catch-up staged in pieces is finished first. A staging area too small for even one
    /// segment is passed by: that segment goes straight to the image.
    fn ship_journal(&mut self) -> Result<(), Short> {
        let prev = self.header.expect("read when the shipper started");
        if prev.state != CycleState::Applied || !self.segment(false)? {
            return match self.cycle() {
                Err(Short::TooLarge { pieces: 0, .. }) if prev.state == CycleState::Applied => {
                    self.segment(true).map(drop)
                }
                r => r,
            };
        }
        Ok(())
    }

    /// Applies the next segment to the image directly, as a leg without a staging area does
    /// (`shipper::send_segment`), and frees the journal of it, when it is the last durable
    /// one or when `force`d; whether it did.
    fn segment(&mut self, force: bool) -> Result<bool, Short> {
        let next = self.commit.seq + 1;
        let (start, h) = self.read_seg(self.commit.offset, next, false)?;
        let last = h.seq_first + u64::from(h.count) - 1;
        if !force && last < self.sh.written_seq.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.read_seg(start, next, true)?;
        self.sh.next_unix_ms.store(h.unix_ms, Ordering::Release);
        super::shipper::send_segment(
            &mut self.far,
            &self.sh,
            &mut self.buf,
            &self.iocbs,
            &mut self.cpl,
            &h,
        )?;
        let payload: u64 = self
            .iocbs
            .iter()
            .map(|r| r.payload_len(h.data_lba_size) as u64)
            .sum();
        self.publish(Commit {
            counter: self.commit.counter + 1,
            seq: last,
            offset: start + u64::from(h.total_blocks),
            bytes: h.bytes_before + payload,
            unix_ms: h.unix_ms,
        })?;
        Ok(true)
    }

    /// One whole cycle: freeze, stage, commit, apply, advance. A cycle whose commit is
    /// durable is only ever finished, never frozen again: its staged data must stay as
    /// committed until the image holds it.
    fn cycle(&mut self) -> Result<(), Short> {
        let prev = self.header.expect("read when the shipper started");
        if prev.state == CycleState::Committed {
            return self.finish(prev);
        }
        self.started = Instant::now();
        let open = prev.state == CycleState::Open;
        self.load_pieces(&prev)?;
        // A batch of an async-journal leg is bounded; a catch-up's cycle takes it all (its
        // cut must lie past the whole copy).
        let cap = self.interval.is_none() && !open;
        let cut = match self.freeze(false, cap)? {
            Some(cut) => cut,
            // The catch-up's pieces hold every record: commit them as they are.
            None if open => prev.staged,
            None => return Ok(()),
        };
        if !open {
            self.sh.next_unix_ms.store(0, Ordering::Release);
        }
        let (staged, sent) = self.stage(&prev)?;
        // Commit.
        self.from_staging = open;
        let h = StagingHeader {
            cycle: prev.cycle + 1,
            state: CycleState::Committed,
            journal: self.sh.uuid,
            cut,
            staged: Commit::ZERO,
            ..staged
        };
        self.write_staged_header(h, sent)?;
        self.finish(h)
    }

    /// Writes header `h` of what was just staged (`sent` bytes) with FUA and counts it.
    fn write_staged_header(&mut self, h: StagingHeader, sent: u64) -> Result<(), Short> {
        write_header(&mut self.stg, &mut self.cbuf, &h, &self.sh.stop)?;
        self.header = Some(h);
        self.sh
            .cycle
            .staged_bytes
            .fetch_add(sent, Ordering::Relaxed);
        Ok(())
    }

    /// Stages the frozen segments' winning runs after `prev`'s pieces (if it is *open*),
    /// then the table of all runs, then a Flush; the header that describes them (to be given
    /// its state and cut) and the bytes sent. The open cycle's age counts from its first
    /// frozen write unless an earlier one is still unapplied.
    fn stage(&mut self, prev: &StagingHeader) -> Result<(StagingHeader, u64), Short> {
        if self.sh.next_unix_ms.load(Ordering::Acquire) == 0 {
            self.sh.next_unix_ms.store(
                self.segs.first().map_or(0, |s| s.1.unix_ms),
                Ordering::Release,
            );
        }
        let data_blocks = self.walk(Target::Staging)?;
        let (table_lba, table_crc, table_len) = self.write_table(data_blocks)?;
        flush(&mut self.stg, &self.sh.stop)?;
        let data = data_blocks * u64::from(self.sh.geo.lba_size);
        let before = if prev.state == CycleState::Open {
            prev.data_bytes
        } else {
            0
        };
        let h = StagingHeader {
            counter: prev.counter + 1,
            table_lba,
            runs: self.runs.len() as u32,
            table_crc,
            data_bytes: before + data,
            unix_ms: unix_ms(),
            ..*prev
        };
        Ok((h, data + table_len as u64))
    }

    /// Whether the journal has filled enough during a catch-up to stage a piece of it: a
    /// quarter of its bound, so the writes keep room while the piece ships.
    fn piece_due(&self) -> bool {
        let cap = (self.sh.ring_end - super::format::RING_START) * u64::from(self.sh.lba_size);
        let bound = self.sh.cfg.max_bytes.map_or(cap, |m| m.min(cap));
        self.sh.used_blocks() * u64::from(self.sh.lba_size) >= bound / 4
    }

    /// Stages the journal up to a cut as one more piece of the running catch-up: the winning
    /// runs after the pieces staged before, the table of them all, a Flush, the header
    /// *open* with FUA (the image and its cycle are untouched), then the journal is freed up
    /// to the cut. Nothing is applied until the catch-up is whole.
    fn piece(&mut self) -> Result<(), Short> {
        let prev = self.header.expect("read when the shipper started");
        if prev.state == CycleState::Committed {
            return self.finish(prev);
        }
        self.load_pieces(&prev)?;
        let Some(cut) = self.freeze(true, false)? else {
            return Ok(());
        };
        let (staged, sent) = self.stage(&prev)?;
        let h = StagingHeader {
            state: CycleState::Open,
            staged: cut,
            ..staged
        };
        self.write_staged_header(h, sent)?;
        self.free_journal(cut)?;
        tracing::info!(leg = %self.sh.name, seq = cut.seq, runs = h.runs, staged_bytes = h.data_bytes, "catch-up piece staged; the journal is free up to it");
        Ok(())
    }

    /// Loads the runs of an open catch-up's pieces (none for another header) and places the
    /// next staged run after them and their table, which stays valid until a new header
    /// replaces it.
    fn load_pieces(&mut self, prev: &StagingHeader) -> Result<(), Short> {
        self.runs.clear();
        self.stage_at = DATA_START;
        if prev.state != CycleState::Open {
            return Ok(());
        }
        let bs = self.sh.geo.lba_size;
        let tb = prev.table_blocks();
        self.tbuf
            .ensure((tb as usize * bs as usize).max(bs as usize));
        if tb > 0 {
            read_blocks(
                &mut self.stg,
                prev.table_lba,
                tb as u32,
                &mut self.tbuf,
                0,
                bs,
                &self.sh.stop,
            )
            .map_err(Short::Retry)?;
        }
        self.runs =
            decode_table(self.tbuf.bytes(), prev.runs, prev.table_crc).map_err(Short::Damaged)?;
        self.stage_at = prev.table_lba + tb;
        Ok(())
    }

    /// Writes the run table (`self.runs`) after the `data_blocks` just staged; its block,
    /// CRC and length in bytes.
    fn write_table(&mut self, data_blocks: u64) -> Result<(u64, u32, usize), Short> {
        let table_lba = self.stage_at + data_blocks;
        let table_len = self.runs.len() * RUN_LEN;
        let bs = self.sh.geo.lba_size as usize;
        let table_blocks = table_len.div_ceil(bs);
        self.tbuf.ensure((table_blocks * bs).max(bs));
        let t = self.tbuf.bytes();
        t[..table_blocks * bs].fill(0);
        for (i, r) in self.runs.iter().enumerate() {
            r.encode(&mut t[i * RUN_LEN..]);
        }
        let table_crc = crc32c::crc32c(&t[..table_len]);
        if table_blocks > 0 {
            write_blocks(
                &mut self.stg,
                table_lba,
                &mut self.tbuf,
                0,
                table_blocks * bs,
                bs as u32,
                &self.sh.stop,
            )
            .map_err(Short::Retry)?;
        }
        Ok((table_lba, table_crc, table_len))
    }

    /// Steps 4 and 5 of the committed cycle `h`, whose frozen segments and table are in
    /// memory: apply, then advance.
    fn finish(&mut self, mut h: StagingHeader) -> Result<(), Short> {
        if self.far_apply {
            self.wait_far_applied(&h)?;
        } else {
            if self.from_staging {
                roll_forward(
                    &mut self.stg,
                    &mut self.far,
                    &h,
                    &mut self.walk_bufs,
                    &self.sh.stop,
                )?;
            } else {
                self.walk(Target::Image)?;
                flush(&mut self.far, &self.sh.stop)?;
            }
            self.sh
                .cycle
                .image_bytes
                .fetch_add(h.data_bytes, Ordering::Relaxed);
        }
        // The image holds the cycle whole: say so before the writes it holds show as
        // applied, so whoever waits for them sees this cycle's number.
        let c = &self.sh.cycle;
        c.cycle.store(h.cycle, Ordering::Release);
        c.cut_unix_ms.store(h.cut.unix_ms, Ordering::Release);
        c.cycle_bytes.store(h.data_bytes, Ordering::Release);
        c.changed_bytes.fetch_add(h.data_bytes, Ordering::Relaxed);
        c.ship_us
            .store(self.started.elapsed().as_micros() as u64, Ordering::Release);
        let cut = Commit {
            counter: self.commit.counter + 1,
            ..h.cut
        };
        self.publish(cut)?;
        h.counter += 1;
        h.state = CycleState::Applied;
        if !self.far_apply {
            write_header(&mut self.stg, &mut self.cbuf, &h, &self.sh.stop)?;
        }
        self.header = Some(h);
        tracing::debug!(leg = %self.sh.name, cycle = h.cycle, seq = cut.seq, data_bytes = h.data_bytes, runs = h.runs, "cycle applied");
        Ok(())
    }

    /// Waits until the far applier has marked the committed cycle `h` applied (it polls the
    /// staging header as this side does here); past `io_timeout` the try ends and is made
    /// again (the leg shows `retrying`).
    fn wait_far_applied(&mut self, h: &StagingHeader) -> Result<(), Short> {
        let bs = self.sh.geo.lba_size;
        let deadline = Instant::now() + self.sh.cfg.io_timeout;
        loop {
            let newest = read_header(
                &mut self.stg,
                &mut self.tbuf,
                bs,
                self.stg_blocks,
                &self.sh.stop,
            )?;
            if newest.is_some_and(|n| n.counter > h.counter) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Short::Retry(format!(
                    "the far site has not applied cycle {} within {:?}",
                    h.cycle, self.sh.cfg.io_timeout
                )));
            }
            if !pause(Duration::from_millis(1), &self.sh.stop) {
                return Err(Short::Stopped);
            }
        }
    }

    /// Reads the journal from the commit position up to the cut and builds the changed-chunk
    /// table; returns the cut. The cut is the durable end of the journal when the cycle
    /// starts, moved back to fit the staging area (and, when `cap`, to `BATCH_SEGMENTS`), and
    /// never right after a piece of a split write (unless it ends a `piece` of a catch-up).
    fn freeze(&mut self, piece: bool, cap: bool) -> Result<Option<Commit>, Short> {
        let target = self.sh.written_seq.load(Ordering::Acquire);
        self.segs.clear();
        // Segment counts at which a cut may fall.
        let mut cuts = vec![0];
        let (mut at, mut next) = (self.commit.offset, self.commit.seq + 1);
        let mut waiting = None;
        while next <= target || cuts.last() != Some(&self.segs.len()) {
            if cap && self.segs.len() >= BATCH_SEGMENTS && cuts.last() == Some(&self.segs.len()) {
                break;
            }
            if next > self.sh.written_seq.load(Ordering::Acquire) {
                // The rest of a split write is on its way, unless the write failed (the
                // journal refused its next piece): a failed write may be left torn.
                if self.sh.stop.load(Ordering::Acquire) {
                    return Err(Short::Stopped);
                }
                let since = *waiting.get_or_insert_with(Instant::now);
                if since.elapsed() > self.sh.cfg.io_timeout {
                    cuts.push(self.segs.len());
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            waiting = None;
            let (start, h) = self.read_seg(at, next, false)?;
            self.segs.push((start, h));
            // A piece of a catch-up is no point in time: it may end inside a split write
            // (whose rest may wait for the journal room this piece frees).
            if piece || !self.iocbs.last().is_some_and(|r| r.more) {
                cuts.push(self.segs.len());
            }
            next = h.seq_first + u64::from(h.count);
            at = start + u64::from(h.total_blocks);
        }
        // Fit the staging area: halve the cycle until its data and table fit.
        let mut n = self.segs.len();
        if n == 0 {
            return Ok(None);
        }
        loop {
            self.index(n)?;
            let (data, runs) = self.map.iter().fold((0u64, 0u64), |(d, r), (range, w)| {
                let blocks = if w.2 == RecordOp::Write {
                    range.end - range.start
                } else {
                    0
                };
                (d + blocks, r + 1)
            });
            let runs = runs + self.runs.len() as u64;
            let table = (runs * RUN_LEN as u64).div_ceil(u64::from(self.sh.geo.lba_size));
            let need = self.stage_at + data + table;
            if need <= self.stg_blocks {
                break;
            }
            let half = cuts.iter().copied().filter(|&c| c <= n / 2).max();
            match half {
                Some(c) if c > 0 => n = c,
                _ => {
                    return Err(Short::TooLarge {
                        need,
                        pieces: self.stage_at - DATA_START,
                    })
                }
            }
        }
        self.segs.truncate(n);
        let (start, h) = self.segs[n - 1];
        let payload: u64 = self.iocbs_payload(start, h)?;
        Ok(Some(Commit {
            counter: self.commit.counter + 1,
            seq: h.seq_first + u64::from(h.count) - 1,
            offset: start + u64::from(h.total_blocks),
            bytes: h.bytes_before + payload,
            unix_ms: h.unix_ms,
        }))
    }

    /// Payload bytes of the segment at `start`.
    fn iocbs_payload(&mut self, start: u64, h: SegmentHeader) -> Result<u64, Short> {
        self.read_seg(start, h.seq_first, false)?;
        Ok(self
            .iocbs
            .iter()
            .map(|r| r.payload_len(h.data_lba_size) as u64)
            .sum())
    }

    /// Builds the changed-chunk table of the first `n` frozen segments from their tables
    /// alone, and notes which segments hold a winner.
    fn index(&mut self, n: usize) -> Result<(), Short> {
        self.map.clear();
        for si in 0..n {
            let (start, h) = self.segs[si];
            self.read_seg(start, h.seq_first, false)?;
            for (ri, r) in self.iocbs.iter().enumerate() {
                if r.op != RecordOp::Flush && r.nlb > 0 {
                    self.map.insert(
                        r.lba..r.lba + u64::from(r.nlb),
                        (si as u32, ri as u32, r.op),
                    );
                }
            }
        }
        self.wins.clear();
        self.wins.resize(n, false);
        for (_, w) in self.map.iter() {
            self.wins[w.0 as usize] = true;
        }
        Ok(())
    }

    /// Reads the segment of record `seq` at `at`: its table, and its data when `data`.
    fn read_seg(&mut self, at: u64, seq: u64, data: bool) -> Result<(u64, SegmentHeader), Short> {
        read_seg_into(
            &mut self.journal,
            &self.j,
            &self.sh.stop,
            (at, seq, data),
            &mut self.buf,
            &mut self.iocbs,
        )
    }

    /// Sends the winning runs of the frozen segments to `target`; returns the data blocks
    /// sent. For the staging area the runs are laid out from `stage_at` in the order met, and
    /// added to `self.runs`. The runs never overlap (the image's are a partition of the
    /// changed blocks, the staging area's lie one after another), so they go out in any
    /// order: segments are read into the buffers of `self.walk_bufs` in turn while the
    /// commands of the ones before are still out, one far round trip for many segments.
    fn walk(&mut self, target: Target) -> Result<u64, Short> {
        let mut busy = [0u32; WALK_BUFS];
        let mut failed = None;
        let mut staged = 0u64;
        let res = self.walk_on(target, &mut busy, &mut failed, &mut staged);
        shrink(&mut self.walk_bufs, |i| busy[i] == 0);
        let dev = match target {
            Target::Staging => &mut self.stg,
            Target::Image => &mut self.far,
        };
        match &res {
            Ok(()) => {}
            // Commands still out may read their buffers: each is parked on the close's fence.
            Err(_) if busy.iter().any(|&n| n > 0) => {
                let fence = dev.give_up();
                for (b, &n) in self.walk_bufs.iter_mut().zip(&busy) {
                    if n > 0 {
                        b.park_on(fence.clone());
                    }
                }
            }
            // A path error may leave the queue pair dead: the next try opens a new one.
            Err(_) if failed.is_some_and(kills_queue) => {
                drop(dev.give_up());
            }
            Err(_) => {}
        }
        res.map(|()| staged)
    }

    fn walk_on(
        &mut self,
        target: Target,
        busy: &mut [u32; WALK_BUFS],
        failed: &mut Option<nvmirror_nvme::Status>,
        staged: &mut u64,
    ) -> Result<(), Short> {
        let bs = self.sh.geo.lba_size as usize;
        let dev = match target {
            Target::Staging => &mut self.stg,
            Target::Image => &mut self.far,
        };
        let timeout = dev.timeout;
        let qp = dev.qp().map_err(NotApplied::from)?;
        let (sh, cpl) = (&*self.sh, &mut self.cpl[..]);
        let mut mine: Vec<(Range<u64>, RecordOp)> = Vec::new();
        // Staged runs not sent yet, to go as one command: staged LBA, blocks, buffer offset.
        let mut merge: Option<(u64, u32, usize)> = None;
        let mut slot = 0;
        for si in 0..self.segs.len() {
            if !self.wins[si] {
                // Every record of it was overwritten later in the cycle.
                continue;
            }
            let (start, h) = self.segs[si];
            let len = h.total_blocks as usize * sh.lba_size as usize;
            // The slot's buffer is free, and the bytes out stay within the budget.
            loop {
                let out: usize = (0..WALK_BUFS)
                    .filter(|&b| busy[b] > 0)
                    .map(|b| self.walk_bufs[b].len())
                    .sum();
                if busy[slot] == 0 && (out == 0 || out + len <= WALK_BYTES) {
                    break;
                }
                reap_tagged(qp, sh, cpl, failed, timeout, busy)?;
            }
            let buf = &mut self.walk_bufs[slot];
            read_seg_into(
                &mut self.journal,
                &self.j,
                &sh.stop,
                (start, h.seq_first, true),
                buf,
                &mut self.iocbs,
            )?;
            let mut off = h.header_blocks as usize * sh.lba_size as usize;
            for (ri, r) in self.iocbs.iter().enumerate() {
                let rec_off = off;
                off += r.payload_len(h.data_lba_size);
                if r.op == RecordOp::Flush || r.nlb == 0 {
                    continue;
                }
                mine.clear();
                mine.extend(
                    self.map
                        .overlapping(r.lba..r.lba + u64::from(r.nlb))
                        .filter(|(_, w)| w.0 == si as u32 && w.1 == ri as u32)
                        .map(|(range, w)| (range.clone(), w.2)),
                );
                for (range, op) in mine.drain(..) {
                    let nlb = (range.end - range.start) as u32;
                    let cmd = if op == RecordOp::Write {
                        let at = rec_off + (range.start - r.lba) as usize * bs;
                        let n = nlb as usize * bs;
                        let lba = match target {
                            Target::Staging => {
                                let data = &buf.bytes()[at..at + n];
                                let lba = self.stage_at + *staged;
                                self.runs.push(Run {
                                    lba: range.start,
                                    nlb,
                                    op: RunOp::Write,
                                    staged_lba: lba,
                                    crc: crc32c::crc32c(data),
                                });
                                *staged += u64::from(nlb);
                                // Staged runs lie one after another, and so do the records
                                // of a segment in its buffer: one command carries as many
                                // as follow each other in both.
                                match &mut merge {
                                    Some((mlba, mnlb, mat))
                                        if *mlba + u64::from(*mnlb) == lba
                                            && *mat + *mnlb as usize * bs == at
                                            && (*mnlb + nlb) as usize * bs <= MERGE_BYTES =>
                                    {
                                        *mnlb += nlb;
                                    }
                                    _ => {
                                        if let Some((l, n, a)) = merge.replace((lba, nlb, at)) {
                                            let len = n as usize * bs;
                                            let cmd = IoCommand::with_buf(
                                                IoOp::Write,
                                                l,
                                                n,
                                                buf.io(a, len),
                                                slot as u64,
                                            );
                                            send(qp, cmd, slot, busy, (sh, cpl, failed, timeout))?;
                                        }
                                    }
                                }
                                continue;
                            }
                            Target::Image => range.start,
                        };
                        IoCommand::with_buf(IoOp::Write, lba, nlb, buf.io(at, n), slot as u64)
                    } else if target == Target::Staging {
                        self.runs.push(Run {
                            lba: range.start,
                            nlb,
                            op: if op == RecordOp::WriteZeroes {
                                RunOp::WriteZeroes
                            } else {
                                RunOp::Deallocate
                            },
                            staged_lba: 0,
                            crc: 0,
                        });
                        continue;
                    } else {
                        IoCommand::new(op.io_op(), range.start, nlb, slot as u64)
                    };
                    send(qp, cmd, slot, busy, (sh, cpl, failed, timeout))?;
                }
            }
            if let Some((l, n, a)) = merge.take() {
                let len = n as usize * bs;
                let cmd = IoCommand::with_buf(IoOp::Write, l, n, buf.io(a, len), slot as u64);
                send(qp, cmd, slot, busy, (sh, cpl, failed, timeout))?;
            }
            slot = (slot + 1) % WALK_BUFS;
        }
        while busy.iter().any(|&n| n > 0) {
            reap_tagged(qp, sh, cpl, failed, timeout, busy)?;
        }
        match failed {
            Some(s) => Err(NotApplied::Refused(*s).into()),
            None => Ok(()),
        }
    }
}

/// Segment buffers a walk reads ahead into while the commands of the ones before are out
/// (a segment under a light load holds a few writes: many are read ahead)...
const WALK_BUFS: usize = DEPTH as usize;
/// ...as long as the buffers of the segments out hold at most this many bytes.
const WALK_BYTES: usize = 8 << 20;
/// A walk buffer's size to start with; one grown past `WALK_KEEP` for a large segment is
/// made small again after the walk.
pub(super) const WALK_START: usize = 64 << 10;
const WALK_KEEP: usize = 1 << 20;

/// Makes the buffers grown past `WALK_KEEP` small again, those `idle` says no command holds.
pub(super) fn shrink(bufs: &mut [SegBuf], idle: impl Fn(usize) -> bool) {
    for (i, b) in bufs.iter_mut().enumerate() {
        if idle(i) && b.len() > WALK_KEEP {
            *b = SegBuf::new(WALK_START);
        }
    }
}

/// The most segments one batch of an `async-journal` leg takes (the rest go in the next):
/// a backlog of many small segments is frozen, staged and applied in steps of bounded time
/// and memory, and the far image moves at each.
const BATCH_SEGMENTS: usize = 8192;

/// The most one staging write carries (runs that follow each other in a segment).
const MERGE_BYTES: usize = 1 << 20;

/// What waiting for the far device needs: the leg, room for completions, the first failure
/// seen, and how long to wait.
type Reaping<'a> = (
    &'a Shared,
    &'a mut [Completion],
    &'a mut Option<nvmirror_nvme::Status>,
    Duration,
);

/// Submits `cmd`, whose buffer is `walk_bufs[slot]`, reaping while the queue is full.
fn send(
    qp: &mut dyn QueuePair,
    cmd: IoCommand,
    slot: usize,
    busy: &mut [u32; WALK_BUFS],
    (sh, cpl, failed, timeout): Reaping<'_>,
) -> Result<(), NotApplied> {
    loop {
        // SAFETY: the buffer of `cmd` is `walk_bufs[slot]`, neither touched nor freed until
        // every command on it is reaped (`busy[slot]` back at 0), or, when they are given up,
        // parked on the queue pair's fence (`walk`).
        match unsafe { qp.submit(cmd) } {
            Ok(()) => {
                busy[slot] += 1;
                return Ok(());
            }
            Err(SubmitError::QueueFull) => {
                reap_tagged(qp, sh, cpl, failed, timeout, busy)?;
            }
        }
    }
}

/// Reaps what completes (waiting at most `timeout`), counting each completion off the
/// buffer its tag names.
fn reap_tagged(
    qp: &mut dyn QueuePair,
    sh: &Shared,
    cpl: &mut [Completion],
    failed: &mut Option<nvmirror_nvme::Status>,
    timeout: Duration,
    busy: &mut [u32; WALK_BUFS],
) -> Result<(), NotApplied> {
    let n = reap(qp, sh, cpl, failed, timeout)? as usize;
    for c in &cpl[..n] {
        busy[c.tag as usize] -= 1;
    }
    Ok(())
}

/// Reads the segment of record `seq` at `at` (`what`: at, seq, and whether its data too) into
/// `buf` and its records into `iocbs`; its start block and header.
fn read_seg_into(
    journal: &mut DevIo,
    j: &Journal,
    stop: &AtomicBool,
    (at, seq, data): (u64, u64, bool),
    buf: &mut SegBuf,
    iocbs: &mut Vec<Iocb>,
) -> Result<(u64, SegmentHeader), Short> {
    match read_segment(journal, j, at, seq, buf, iocbs, stop, data) {
        Ok(Some(s)) => Ok(s),
        _ if stop.load(Ordering::Acquire) => Err(Short::Stopped),
        Ok(None) => Err(Short::Damaged(format!(
            "no valid journal segment with record {seq} at block {at}"
        ))),
        Err(e) => Err(Short::Damaged(e)),
    }
}

fn flush(dev: &mut DevIo, stop: &AtomicBool) -> Result<(), Short> {
    let c = dev.flush(stop)?;
    if c.status.is_success() {
        Ok(())
    } else {
        Err(Short::Retry(format!("flush refused: {}", c.status)))
    }
}

impl From<super::dev_io::IoError> for Short {
    fn from(e: super::dev_io::IoError) -> Self {
        NotApplied::from(e).into()
    }
}

/// The newer of the staging area's two headers; `None` for a blank area. A header made on
/// a device of another size or block size is refused.
fn read_header(
    stg: &mut DevIo,
    buf: &mut SegBuf,
    lba_size: u32,
    blocks: u64,
    stop: &AtomicBool,
) -> Result<Option<StagingHeader>, Short> {
    let bs = lba_size as usize;
    buf.ensure(2 * bs);
    read_blocks(stg, 0, 2, buf, 0, lba_size, stop).map_err(Short::Retry)?;
    let b = buf.bytes();
    let found = StagingHeader::newest(&b[..bs], &b[bs..2 * bs]).map_err(Short::Damaged)?;
    if let Some(h) = &found {
        if h.lba_size != lba_size || h.blocks != blocks {
            return Err(Short::Damaged(format!(
                "the staging area was made on a device of {} blocks of {} bytes; this one has {blocks} of {lba_size}",
                h.blocks, h.lba_size
            )));
        }
    }
    Ok(found)
}

/// Writes `h` to its header block with FUA (`buf`: at least one block).
fn write_header(
    stg: &mut DevIo,
    buf: &mut SegBuf,
    h: &StagingHeader,
    stop: &AtomicBool,
) -> Result<(), Short> {
    let bs = h.lba_size as usize;
    let b = &mut buf.bytes()[..bs];
    b.fill(0);
    h.encode(b);
    write_blocks(stg, h.block(), buf, 0, bs, h.lba_size, stop).map_err(Short::Retry)
}

/// Rolls the committed cycle `h` onto the image (through `bufs`, at least one) and marks it
/// applied; the applied header.
fn apply_committed(
    stg: &mut DevIo,
    image: &mut DevIo,
    bufs: &mut [SegBuf],
    mut h: StagingHeader,
    stop: &AtomicBool,
) -> Result<StagingHeader, Short> {
    roll_forward(stg, image, &h, bufs, stop)?;
    h.counter += 1;
    h.state = CycleState::Applied;
    write_header(stg, &mut bufs[0], &h, stop)?;
    Ok(h)
}

impl Short {
    /// What went wrong, for a caller that reports it as text.
    fn message(self) -> String {
        match self {
            Self::Retry(s) | Self::Damaged(s) => s,
            Self::TooLarge { need, .. } => format!("needs {need} blocks"),
            Self::Stopped => "stopped".into(),
        }
    }
}

/// What [`recover_cycle`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CycleRecovery {
    /// The cycle the image holds now.
    pub cycle: u64,
    /// Whether a committed cycle was rolled forward.
    pub rolled_forward: bool,
    /// The journal position of its cut, and when it was taken (Unix ms).
    pub cut_seq: u64,
    pub cut_unix_ms: u64,
    /// Distinct bytes the cycle changes.
    pub data_bytes: u64,
}

/// Brings the image of an `async-cycle` leg to its last committed cycle from the staging
/// area alone, as the far site does after losing the local one (`nvmirror cycle-recover`).
pub fn recover_cycle(
    image: Arc<dyn BlockDevice>,
    staging: Arc<dyn BlockDevice>,
    io_timeout: Duration,
) -> Result<CycleRecovery, String> {
    FarApplier::new(image, staging, io_timeout)?
        .apply()?
        .ok_or_else(|| "the staging area is blank: no cycle was ever committed to it".into())
}

/// The far site's side of an `async-cycle` leg shipped with `far_apply`: applies each cycle
/// committed to the staging area onto the image next to it, so the link carries the data
/// once (`docs/cycles.md`, "Link bytes"). [`apply`](Self::apply) is one look at the staging
/// header; call it in a loop.
pub struct FarApplier {
    stg: DevIo,
    img: DevIo,
    buf: SegBuf,
    /// The buffers of a roll-forward.
    bufs: Vec<SegBuf>,
    blocks: u64,
    lba_size: u32,
    stop: AtomicBool,
}

impl std::fmt::Debug for FarApplier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FarApplier")
            .field("blocks", &self.blocks)
            .field("lba_size", &self.lba_size)
            .finish()
    }
}

impl FarApplier {
    /// Refuses a staging area and an image of different block sizes.
    pub fn new(
        image: Arc<dyn BlockDevice>,
        staging: Arc<dyn BlockDevice>,
        io_timeout: Duration,
    ) -> Result<Self, String> {
        let geo = staging.geometry();
        if image.geometry().lba_size != geo.lba_size {
            return Err(format!(
                "the staging area has {}-byte blocks, the image {}-byte ones",
                geo.lba_size,
                image.geometry().lba_size
            ));
        }
        Ok(Self {
            stg: DevIo::new(staging, DEPTH, io_timeout),
            img: DevIo::new(image, DEPTH, io_timeout),
            buf: SegBuf::new(2 * geo.lba_size as usize),
            bufs: (0..WALK_BUFS).map(|_| SegBuf::new(WALK_START)).collect(),
            blocks: geo.num_blocks,
            lba_size: geo.lba_size,
            stop: AtomicBool::new(false),
        })
    }

    /// Reads the staging header and, when it says *committed*, rolls the cycle onto the
    /// image and marks it *applied*. `None` for a blank staging area.
    pub fn apply(&mut self) -> Result<Option<CycleRecovery>, String> {
        let found = read_header(
            &mut self.stg,
            &mut self.buf,
            self.lba_size,
            self.blocks,
            &self.stop,
        )
        .map_err(Short::message)?;
        let Some(mut h) = found else {
            return Ok(None);
        };
        let rolled_forward = h.state == CycleState::Committed;
        if rolled_forward {
            h = apply_committed(&mut self.stg, &mut self.img, &mut self.bufs, h, &self.stop)
                .map_err(Short::message)?;
        }
        Ok(Some(CycleRecovery {
            cycle: h.cycle,
            rolled_forward,
            cut_seq: h.cut.seq,
            cut_unix_ms: h.cut.unix_ms,
            data_bytes: h.data_bytes,
        }))
    }
}
