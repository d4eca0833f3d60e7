//! A persistent volume's on-leg metadata outside the write path: superblocks (identity,
//! member states, event counter, clean flag) and synchronous control-plane I/O — format,
//! start-up reads, clearing flushes and recovery copies. None of this runs per host I/O or on
//! a reactor: state changes go to the metadata thread (`recorder`), and the write path's
//! bitmap pages go through the per-core queue pairs (`qpair/intent.rs`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvmirror_nvme::dma::{DmaBuf, DmaPool, IoBuf};
use nvmirror_nvme::{BlockDevice, Fence, IoCommand, IoOp, QueuePair};

use crate::bitmap::{MetadataLayout, BITMAP_PAGE};
use crate::legs::{LegSnapshot, LegState, MAX_LEGS};
use crate::recorder::StateRecorder;
use crate::superblock::{MemberState, Role, Superblock, Uuid, HEADER_LEN};
use crate::volume::VolumeShared;
use crate::wait::Waited;

/// Bytes moved per control-plane command (recovery copies, bitmap reads).
pub(crate) const CHUNK: usize = 1 << 20;

/// Control-plane commands given up at the timeout, per leg: counted in the leg's timeouts
/// (status, metrics) and, until the leg can no longer act on them, in its busy count (a
/// resync of the leg waits, as for the data path's abandoned commands).
#[derive(Debug, Default)]
pub(crate) struct ControlTimeouts {
    /// Commands given up since the volume started.
    total: [AtomicU64; MAX_LEGS],
    /// Of those, the ones whose closed queue pair's fence is not done yet.
    unreaped: [Arc<AtomicU32>; MAX_LEGS],
}

impl ControlTimeouts {
    /// Commands given up on leg `leg` so far.
    pub(crate) fn total(&self, leg: usize) -> u64 {
        self.total[leg].load(Ordering::Relaxed)
    }

    /// Commands given up on leg `leg` that its device may still act on.
    pub(crate) fn unreaped(&self, leg: usize) -> u32 {
        self.unreaped[leg].load(Ordering::Acquire)
    }

    /// A command on `leg` was given up; `fence` is done once the leg cannot act on it.
    fn record(&self, leg: usize, fence: &Fence) {
        self.total[leg].fetch_add(1, Ordering::Relaxed);
        if fence.is_done() {
            return;
        }
        let unreaped = Arc::clone(&self.unreaped[leg]);
        unreaped.fetch_add(1, Ordering::Relaxed);
        fence.then(move || {
            unreaped.fetch_sub(1, Ordering::Release);
        });
    }
}

/// Synchronous queue pairs on the legs, for the control plane.
#[derive(Debug)]
pub(crate) struct ControlIo {
    qps: Vec<Option<Box<dyn QueuePair>>>,
    /// One page buffer and one chunk buffer, aligned for O_DIRECT.
    page: DmaPool,
    chunk: DmaPool,
    timeout: Duration,
    /// The end of a command given up at the timeout, while the buffer it was given may
    /// still be read or filled by the leg: that buffer is parked on it, not reused.
    abandoned: Option<Fence>,
    /// Where commands given up at the timeout are counted.
    timeouts: Arc<ControlTimeouts>,
}

/// Which of [`ControlIo`]'s pools a buffer came from.
#[derive(Clone, Copy)]
enum Pool {
    Page,
    Chunk,
}

impl ControlIo {
    /// One queue-pair slot per possible leg, so legs added at run time have one too.
    pub(crate) fn new(timeout: Duration) -> Self {
        Self::counted(timeout, Arc::default())
    }

    /// As [`new`](Self::new), counting commands given up at the timeout in `timeouts`.
    pub(crate) fn counted(timeout: Duration, timeouts: Arc<ControlTimeouts>) -> Self {
        Self {
            qps: (0..MAX_LEGS).map(|_| None).collect(),
            page: DmaPool::new(1, BITMAP_PAGE as usize),
            chunk: DmaPool::new(1, CHUNK),
            timeout,
            abandoned: None,
            timeouts,
        }
    }

    /// Takes the buffer of pool `which`.
    fn take(&mut self, which: Pool) -> std::result::Result<DmaBuf, String> {
        match which {
            Pool::Page => &mut self.page,
            Pool::Chunk => &mut self.chunk,
        }
        .get()
        .ok_or_else(|| "no control buffer".to_string())
    }

    /// Gives back a buffer taken with [`take`](Self::take). After a command was given up at
    /// the timeout, the buffer stays with that command until its fence (the leg may still
    /// read or fill it) and the pool is replaced by a fresh one.
    fn give_back(&mut self, which: Pool, buf: DmaBuf) {
        let (pool, len) = match which {
            Pool::Page => (&mut self.page, BITMAP_PAGE as usize),
            Pool::Chunk => (&mut self.chunk, CHUNK),
        };
        match self.abandoned.take() {
            Some(fence) if !fence.is_done() => {
                fence.then(move || drop(buf));
                *pool = DmaPool::new(1, len);
            }
            _ => pool.put(buf),
        }
    }

    /// Sets the time one command may take.
    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs one command on `dev` (leg `leg`) and waits for it, up to the timeout.
    pub(crate) fn run(
        &mut self,
        leg: usize,
        dev: &dyn BlockDevice,
        op: IoOp,
        lba: u64,
        buf: IoBuf,
    ) -> std::result::Result<(), String> {
        self.run_command(leg, dev, op, lba, buf, false)
    }

    /// A write with Force Unit Access: on stable storage when this returns `Ok`.
    pub(crate) fn write_durable(
        &mut self,
        leg: usize,
        dev: &dyn BlockDevice,
        lba: u64,
        buf: IoBuf,
    ) -> std::result::Result<(), String> {
        self.run_command(leg, dev, IoOp::Write, lba, buf, true)
    }

    /// Flushes leg `leg`'s volatile write cache.
    pub(crate) fn flush(
        &mut self,
        leg: usize,
        dev: &dyn BlockDevice,
    ) -> std::result::Result<(), String> {
        self.run_command(leg, dev, IoOp::Flush, 0, IoBuf::EMPTY, false)
    }

    fn run_command(
        &mut self,
        leg: usize,
        dev: &dyn BlockDevice,
        op: IoOp,
        lba: u64,
        buf: IoBuf,
        fua: bool,
    ) -> std::result::Result<(), String> {
        let nlb = (buf.len() as u64 >> dev.geometry().lba_shift()) as u32;
        if self.qps[leg].is_none() {
            self.qps[leg] = Some(dev.open_qpair(4).map_err(|e| e.to_string())?);
        }
        let qp = self.qps[leg].as_mut().expect("opened above");
        let cmd = IoCommand::with_buf(op, lba, nlb.max(1), buf, 0);
        let cmd = if fua { cmd.with_fua() } else { cmd };
        // SAFETY: the caller keeps `buf` alive and untouched until this returns, and this
        // returns only after the completion is reaped — or, on a timeout, closes the queue
        // pair and records its fence, on which the caller's `give_back` parks the buffer.
        match unsafe { crate::wait::run_one(&mut **qp, cmd, self.timeout, None) } {
            Waited::Done(c) if c.status.is_success() => Ok(()),
            Waited::Done(c) => Err(format!("{op:?} at LBA {lba}: {}", c.status)),
            Waited::Refused(e) => Err(format!("{e:?}")),
            Waited::TimedOut | Waited::Stopped => {
                let fence = self.qps[leg].take().expect("opened above").close();
                self.timeouts.record(leg, &fence);
                // Only a command that was given a buffer leaves one to park.
                self.abandoned = (!buf.is_empty()).then_some(fence);
                Err(format!("{op:?} at LBA {lba} timed out"))
            }
        }
    }

    /// Reads `len` bytes at byte `offset` of `dev` into a vector.
    pub(crate) fn read_bytes(
        &mut self,
        leg: usize,
        dev: &dyn BlockDevice,
        offset: u64,
        len: usize,
    ) -> std::result::Result<Vec<u8>, String> {
        let shift = dev.geometry().lba_shift();
        let mut out = Vec::with_capacity(len);
        let buf = self.take(Pool::Chunk)?;
        let mut done = 0;
        let mut res = Ok(());
        while done < len {
            let n = (len - done).min(CHUNK);
            let io = buf.io_buf().prefix(n);
            res = self.run(leg, dev, IoOp::Read, (offset + done as u64) >> shift, io);
            if res.is_err() {
                break;
            }
            out.extend_from_slice(&buf.as_slice()[..n]);
            done += n;
        }
        self.give_back(Pool::Chunk, buf);
        res.map(|()| out)
    }

    /// Writes `data` at byte `offset` of `dev`, with FUA (metadata: the zeroed or union
    /// bitmap is on stable storage before a superblock or a data write relies on it).
    pub(crate) fn write_bytes(
        &mut self,
        leg: usize,
        dev: &dyn BlockDevice,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<(), String> {
        let shift = dev.geometry().lba_shift();
        let mut buf = self.take(Pool::Chunk)?;
        let mut res = Ok(());
        for (i, part) in data.chunks(CHUNK).enumerate() {
            buf.as_mut_slice()[..part.len()].copy_from_slice(part);
            let at = offset + (i * CHUNK) as u64;
            res = self.write_durable(leg, dev, at >> shift, buf.io_buf().prefix(part.len()));
            if res.is_err() {
                break;
            }
        }
        self.give_back(Pool::Chunk, buf);
        res
    }

    /// Copies `len` bytes at byte `offset` from leg `from` to leg `to`.
    pub(crate) fn copy(
        &mut self,
        from: (usize, &dyn BlockDevice),
        to: (usize, &dyn BlockDevice),
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), String> {
        let shift = from.1.geometry().lba_shift();
        let buf = self.take(Pool::Chunk)?;
        let mut done = 0u64;
        let mut res = Ok(());
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let lba = (offset + done) >> shift;
            let io = buf.io_buf().prefix(n);
            res = self
                .run(from.0, from.1, IoOp::Read, lba, io)
                .and_then(|()| self.run(to.0, to.1, IoOp::Write, lba, io));
            if res.is_err() {
                break;
            }
            done += n as u64;
        }
        self.give_back(Pool::Chunk, buf);
        res
    }

    /// Writes one 4 KiB block (a superblock or a bitmap page) at byte `offset`, with FUA: it
    /// is on stable storage, not in the leg's write cache, when this returns `Ok`.
    pub(crate) fn write_page(
        &mut self,
        leg: usize,
        dev: &dyn BlockDevice,
        offset: u64,
        bytes: &[u8],
    ) -> std::result::Result<(), String> {
        let mut buf = self.take(Pool::Page)?;
        let page = buf.as_mut_slice();
        page.fill(0);
        page[..bytes.len()].copy_from_slice(bytes);
        let io = buf.io_buf();
        let res = self.write_durable(leg, dev, offset >> dev.geometry().lba_shift(), io);
        self.give_back(Pool::Page, buf);
        res
    }
}

/// What a persistent volume keeps about its metadata.
#[derive(Debug)]
pub(crate) struct PersistentMeta {
    pub(crate) volume_uuid: Uuid,
    pub(crate) leg_uuids: [Uuid; MAX_LEGS],
    pub(crate) layout: MetadataLayout,
    /// The event counter last written.
    pub(crate) events: AtomicU64,
    /// The fencing epoch the superblocks carry (bumped by a promotion, `fence.rs`).
    pub(crate) epoch: AtomicU64,
    /// Serialises the control plane's I/O: clearing flushes and pages, recovery copies,
    /// start-up reads. No reactor takes it.
    pub(crate) io: Mutex<ControlIo>,
    /// The metadata thread's queue pairs: superblock writes and whole-bitmap writes
    /// (`recorder`). No reactor takes it either.
    pub(crate) sb_io: Mutex<ControlIo>,
    /// Commands `io` and `sb_io` gave up at the timeout.
    pub(crate) timeouts: Arc<ControlTimeouts>,
    /// Hands leg-state changes to the metadata thread and their durability back.
    pub(crate) recorder: std::sync::Arc<StateRecorder>,
}

impl PersistentMeta {
    pub(crate) fn new(
        volume_uuid: Uuid,
        leg_uuids: [Uuid; MAX_LEGS],
        layout: MetadataLayout,
        events: u64,
        epoch: u64,
        timeout: Duration,
    ) -> Self {
        let timeouts = Arc::<ControlTimeouts>::default();
        Self {
            volume_uuid,
            leg_uuids,
            layout,
            events: AtomicU64::new(events),
            epoch: AtomicU64::new(epoch),
            io: Mutex::new(ControlIo::counted(timeout, Arc::clone(&timeouts))),
            sb_io: Mutex::new(ControlIo::counted(timeout, Arc::clone(&timeouts))),
            timeouts,
            recorder: std::sync::Arc::default(),
        }
    }

    pub(crate) fn lock_io(&self) -> std::sync::MutexGuard<'_, ControlIo> {
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_sb_io(&self) -> std::sync::MutexGuard<'_, ControlIo> {
        self.sb_io.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leg `leg`'s superblock for the states in `snap`.
    pub(crate) fn superblock(
        &self,
        name: &str,
        legs: usize,
        leg: usize,
        snap: LegSnapshot,
        events: u64,
        clean: bool,
    ) -> Superblock {
        let l = &self.layout;
        // A leg added after formatting has no UUID yet: it gets one derived from the volume's,
        // stable because the superblocks carry it from then on.
        let leg_uuids: [Uuid; MAX_LEGS] = std::array::from_fn(|i| {
            let u = self.leg_uuids[i];
            if i < legs && u.is_nil() {
                let mut b = self.volume_uuid.0;
                b[15] ^= 0x5a ^ i as u8;
                b[14] ^= 0xa5;
                Uuid(b)
            } else {
                u
            }
        });
        Superblock {
            volume_uuid: self.volume_uuid,
            leg_uuid: leg_uuids[leg],
            role: if snap.primary() == leg {
                Role::Primary
            } else {
                Role::Mirror
            },
            leg_index: leg as u8,
            leg_count: legs as u8,
            clean,
            lba_size: l.lba_size,
            event_counter: events,
            region_size: l.region_size,
            bitmap_offset: l.bitmap_offset,
            bitmap_len: l.bitmap_len,
            data_offset: l.data_offset,
            data_blocks: l.data_blocks,
            leg_uuids,
            volume_name: name.to_string(),
            member_states: std::array::from_fn(|i| {
                if i >= legs {
                    MemberState::Unused
                } else {
                    match snap.state(i) {
                        LegState::InSync => MemberState::InSync,
                        LegState::Detached => MemberState::Detached,
                        LegState::Removed => MemberState::Removed,
                        _ => MemberState::Stale,
                    }
                }
            }),
            epoch: self.epoch.load(Ordering::Acquire),
        }
    }

    /// Bumps the event counter (when `bump`) and writes every in-sync leg's superblock with
    /// the member states of `snap` (a leg out of sync is named stale, or detached when an
    /// operator took it out). The caller holds `sb_io`. Returns the legs that failed.
    pub(crate) fn write_superblocks(
        &self,
        io: &mut ControlIo,
        vol: &VolumeShared,
        snap: LegSnapshot,
        clean: bool,
        bump: bool,
    ) -> u8 {
        let events = if bump {
            self.events.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.events.load(Ordering::SeqCst)
        };
        let mut failed = 0;
        for (i, leg) in vol
            .legs
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((i, l.get()?)))
        {
            if snap.state(i) != LegState::InSync {
                continue;
            }
            let sb = self.superblock(&vol.name, snap.leg_count(), i, snap, events, clean);
            if let Err(e) = io.write_page(i, &*leg.dev, 0, &sb.encode()[..HEADER_LEN]) {
                tracing::error!(volume = %vol.name, leg = i, error = %e, "superblock write failed");
                failed |= 1 << i;
            }
        }
        failed
    }

    /// Start-up and clean shutdown (no metadata thread running): writes the current states
    /// to every in-sync leg's superblock on this thread. Returns the legs that failed.
    pub(crate) fn write_superblocks_now(&self, vol: &VolumeShared, clean: bool, bump: bool) -> u8 {
        let mut io = self.lock_sb_io();
        let snap = vol.states.snapshot();
        let failed = self.write_superblocks(&mut io, vol, snap, clean, bump);
        if failed == 0 {
            self.recorder.mark_recorded(snap.events());
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice, OpFilter};

    use super::*;

    fn leg() -> FaultyDevice {
        let mem = MemDevice::new(4 << 20, 512, LatencyModel::None).unwrap();
        let leg = FaultyDevice::wrap(Arc::new(mem));
        // A back end that cannot cancel: a command given up stays with the leg.
        leg.injector().refuse_cancels(true);
        leg
    }

    #[test]
    fn a_write_given_up_at_the_timeout_keeps_its_buffer_until_the_leg_answers() {
        let (a, b) = (leg(), leg());
        let mut io = ControlIo::new(Duration::from_millis(50));
        let hang = a.injector().arm(Fault::Hang {
            ops: OpFilter::Writes,
        });
        let err = io.write_bytes(0, &a, 8192, &[0x11; 4096]).unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        // The next command uses a buffer of its own, not the one the hung write holds.
        io.write_bytes(1, &b, 8192, &[0xbb; 4096]).unwrap();
        // The hung write goes through now, late: with the data it was given.
        a.injector().clear(hang);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = io.read_bytes(0, &a, 8192, 4096).unwrap();
            if got.iter().all(|&x| x == 0x11) {
                break;
            }
            assert!(
                !got.contains(&0xbb),
                "the late write carried another command's data"
            );
            assert!(
                Instant::now() < deadline,
                "the late write never landed with its own data"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(io.read_bytes(1, &b, 8192, 4096).unwrap() == vec![0xbb; 4096]);
    }
}
