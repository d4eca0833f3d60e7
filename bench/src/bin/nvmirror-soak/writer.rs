//! A verifying writer: one connection (NVMe/TCP or NBD) to the volume, a disjoint range of
//! 4 KiB units, every block stamped with its LBA and a generation, and a model of what each
//! block may hold.
//!
//! A unit's model is the generation of its last acknowledged write and the generations of
//! writes that failed since (or were in flight when the connection died): the block holds one
//! of those, nothing else. A read finding anything else is a lost or corrupt block. The model
//! outlives connections and server restarts: an acknowledged write must survive `kill -9`.
//! Units whose writes were in flight on a connection the writer dropped are not written again
//! for [`QUARANTINE`], so a write the server still executes from the dead connection cannot
//! land after a newer one and pass for a lost ack.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{open_leg, BlockDevice, Completion, IoCommand, IoOp, QueuePair};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::serve::{SharedAddrs, NQN, VOLUME};

/// Bytes of one I/O and of one model unit.
pub const UNIT: usize = 4096;
/// Logical block size the stamps assume.
pub const BLOCK: usize = 512;
const BLOCKS_PER_UNIT: u64 = (UNIT / BLOCK) as u64;
/// Commands in flight per writer.
const QD: usize = 8;
/// A command outstanding this long is a hung data path.
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);
/// How long a unit written on a dropped connection is left alone.
const QUARANTINE: Duration = Duration::from_secs(3);
/// How long a writer keeps trying to connect before it calls the server unreachable.
const CONNECT_DEADLINE: Duration = Duration::from_secs(90);
/// Consecutive failed commands after which the writer reconnects.
const ERRORS_BEFORE_RECONNECT: u32 = 32;

/// Which front end a writer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    NvmeTcp,
    Nbd,
}

impl Proto {
    pub fn uri(self, addrs: &crate::serve::Addrs) -> String {
        match self {
            Self::NvmeTcp => format!("nvme-tcp://{}/{NQN}?kato=5s", addrs.nvme_tcp),
            Self::Nbd => format!("nbd://{}/{VOLUME}?timeout=20s", addrs.nbd),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::NvmeTcp => "nvme-tcp",
            Self::Nbd => "nbd",
        }
    }
}

/// What one unit may hold.
#[derive(Clone, Debug, Default)]
struct UnitModel {
    /// Generation of the last acknowledged write; 0: never written (zeros).
    acked: u64,
    /// Generations written since without an acknowledgement.
    uncertain: Vec<u64>,
    /// Not written again before this.
    quarantine: Option<Instant>,
}

impl UnitModel {
    fn allows(&self, gen: u64) -> bool {
        gen == self.acked || self.uncertain.contains(&gen)
    }
}

/// A writer's range and model.
#[derive(Debug)]
pub struct Model {
    pub proto: Proto,
    /// First LBA of the range.
    pub first_lba: u64,
    units: Vec<UnitModel>,
}

/// Counters of one writer.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub writes_acked: AtomicU64,
    pub writes_failed: AtomicU64,
    pub reads_failed: AtomicU64,
    pub blocks_checked: AtomicU64,
    /// Blocks with a valid stamp of a generation the model does not allow (a lost ack).
    pub lost: AtomicU64,
    /// Blocks that are not a stamp of their LBA at all.
    pub corrupt: AtomicU64,
    pub reconnects: AtomicU64,
    /// Commands outstanding past [`COMMAND_DEADLINE`], and connections that could not be made.
    pub hangs: AtomicU64,
}

/// Requests from the driver.
#[derive(Debug, Default)]
pub struct WriterControl {
    pub stop: AtomicBool,
    /// Drop the connection now, commands in flight and all (a host disconnect).
    pub disconnect: AtomicBool,
    pub stats: WriterStats,
}

/// Fills `buf` (one unit at `lba`) with the stamp of `gen`: every 16 bytes hold the block's
/// LBA and the generation.
fn stamp(buf: &mut [u8], lba: u64, gen: u64) {
    for (b, block) in buf.chunks_exact_mut(BLOCK).enumerate() {
        let l = lba + b as u64;
        for w in block.chunks_exact_mut(16) {
            w[..8].copy_from_slice(&l.to_le_bytes());
            w[8..].copy_from_slice(&gen.to_le_bytes());
        }
    }
}

/// The generation a block holds: `Some(0)` for zeros, `None` for anything that is not a
/// stamp of `lba`.
fn stamped_gen(block: &[u8], lba: u64) -> Option<u64> {
    if block.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let gen = u64::from_le_bytes(block[8..16].try_into().ok()?);
    block
        .chunks_exact(16)
        .all(|w| w[..8] == lba.to_le_bytes() && w[8..] == gen.to_le_bytes())
        .then_some(gen)
}

impl Model {
    pub fn new(proto: Proto, first_lba: u64, units: usize) -> Self {
        Self {
            proto,
            first_lba,
            units: vec![UnitModel::default(); units],
        }
    }

    fn lba(&self, unit: usize) -> u64 {
        self.first_lba + unit as u64 * BLOCKS_PER_UNIT
    }

    /// Checks one unit's data; returns (blocks lost, blocks corrupt), and logs the first.
    fn check(&self, unit: usize, data: &[u8]) -> (u64, u64) {
        let m = &self.units[unit];
        let (mut lost, mut corrupt) = (0, 0);
        for (b, block) in data.chunks_exact(BLOCK).enumerate() {
            let lba = self.lba(unit) + b as u64;
            match stamped_gen(block, lba) {
                Some(g) if m.allows(g) => {}
                Some(g) => {
                    lost += 1;
                    eprintln!(
                        "soak: {} LBA {lba}: generation {g}, expected {} (or one of {:?})",
                        self.proto.name(),
                        m.acked,
                        m.uncertain
                    );
                }
                None => {
                    corrupt += 1;
                    eprintln!(
                        "soak: {} LBA {lba}: not a stamp of this LBA: {:02x?}",
                        self.proto.name(),
                        &block[..32]
                    );
                }
            }
        }
        (lost, corrupt)
    }

    /// Units whose last acknowledged write the final read-back checks.
    pub fn acked_units(&self) -> usize {
        self.units.iter().filter(|u| u.acked != 0).count()
    }
}

/// One command in flight.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    unit: usize,
    write: Option<u64>,
    since: Instant,
}

/// A connection and the buffers its commands use. The queue pair is declared first so it is
/// dropped before the buffers it may still refer to.
struct Conn {
    qp: Box<dyn QueuePair>,
    _dev: Arc<dyn BlockDevice>,
    epoch: u64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("epoch", &self.epoch).finish()
    }
}

/// Connects to the current server, retrying while it restarts (and until `stop`).
fn connect(
    proto: Proto,
    addrs: &SharedAddrs,
    stats: &WriterStats,
    stop: &AtomicBool,
) -> Option<Conn> {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    let mut last = String::new();
    while Instant::now() < deadline {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let a = addrs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match open_leg(&proto.uri(&a)).and_then(|dev| Ok((dev.open_qpair(QD as u32)?, dev))) {
            Ok((qp, dev)) => {
                assert_eq!(dev.geometry().lba_size as usize, BLOCK, "512-byte blocks");
                return Some(Conn {
                    qp,
                    _dev: dev,
                    epoch: a.epoch,
                });
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stats.hangs.fetch_add(1, Ordering::Relaxed);
    eprintln!(
        "soak: {}: no connection within {CONNECT_DEADLINE:?}: {last}",
        proto.name()
    );
    None
}

/// Runs the load until `ctl.stop`; returns the model for the final read-back.
pub fn run(mut model: Model, addrs: SharedAddrs, ctl: Arc<WriterControl>, seed: u64) -> Model {
    let stats = &ctl.stats;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut pool = DmaPool::new(QD as u32, UNIT);
    let mut bufs: Vec<DmaBuf> = (0..QD).map(|_| pool.get().expect("a buffer")).collect();
    let mut slots: Vec<Option<InFlight>> = vec![None; QD];
    let mut busy = vec![false; model.units.len()];
    let mut gen = 1u64;
    let mut errors_in_row = 0u32;
    let mut cpl = [Completion::default(); QD];
    let mut conn: Option<Conn> = None;
    while !ctl.stop.load(Ordering::Relaxed) {
        let epoch = addrs.lock().unwrap_or_else(|e| e.into_inner()).epoch;
        let stale = conn.as_ref().is_some_and(|c| c.epoch != epoch);
        if stale
            || ctl.disconnect.swap(false, Ordering::Relaxed)
            || errors_in_row >= ERRORS_BEFORE_RECONNECT
        {
            if let Some(c) = conn.take() {
                drop(c);
                abandon(&mut model, &mut slots, &mut busy);
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            errors_in_row = 0;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(model.proto, &addrs, stats, &ctl.stop) {
                Some(c) => conn.insert(c),
                None => {
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            },
        };
        // Fill the queue.
        let now = Instant::now();
        for (s, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let unit = rng.gen_range(0..model.units.len());
            if busy[unit] {
                continue;
            }
            let m = &mut model.units[unit];
            let quarantined = m.quarantine.is_some_and(|t| t > now);
            let write = !quarantined && (m.acked == 0 || rng.gen_bool(0.6));
            let lba = model.first_lba + unit as u64 * BLOCKS_PER_UNIT;
            let op = if write {
                stamp(bufs[s].as_mut_slice(), lba, gen);
                m.quarantine = None;
                IoOp::Write
            } else {
                IoOp::Read
            };
            let cmd =
                IoCommand::with_buf(op, lba, BLOCKS_PER_UNIT as u32, bufs[s].io_buf(), s as u64);
            // SAFETY: the buffers outlive every queue pair (they are dropped after `conn`)
            // and a slot's buffer is not touched until its completion is reaped or its
            // connection dropped.
            if unsafe { c.qp.submit(cmd) }.is_err() {
                break;
            }
            *slot = Some(InFlight {
                unit,
                write: write.then_some(gen),
                since: now,
            });
            busy[unit] = true;
            if write {
                gen += 1;
            }
        }
        let n = c.qp.poll(&mut cpl);
        if n == 0 {
            let oldest = slots.iter().flatten().map(|f| f.since).min();
            if oldest.is_some_and(|t| t.elapsed() > COMMAND_DEADLINE) {
                stats.hangs.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "soak: {}: a command outstanding for {COMMAND_DEADLINE:?}: dropping the connection",
                    model.proto.name()
                );
                ctl.disconnect.store(true, Ordering::Relaxed);
            }
            std::thread::yield_now();
            continue;
        }
        for c in &cpl[..n] {
            let s = c.tag as usize;
            let f = slots[s].take().expect("a command in this slot");
            busy[f.unit] = false;
            let m = &mut model.units[f.unit];
            match (c.status.is_success(), f.write) {
                (true, Some(g)) => {
                    m.acked = g;
                    m.uncertain.clear();
                    stats.writes_acked.fetch_add(1, Ordering::Relaxed);
                    errors_in_row = 0;
                }
                (false, Some(g)) => {
                    m.uncertain.push(g);
                    stats.writes_failed.fetch_add(1, Ordering::Relaxed);
                    errors_in_row += 1;
                }
                (true, None) => {
                    let (lost, corrupt) = model.check(f.unit, &bufs[s].as_slice()[..UNIT]);
                    stats
                        .blocks_checked
                        .fetch_add(BLOCKS_PER_UNIT, Ordering::Relaxed);
                    stats.lost.fetch_add(lost, Ordering::Relaxed);
                    stats.corrupt.fetch_add(corrupt, Ordering::Relaxed);
                    errors_in_row = 0;
                }
                (false, None) => {
                    stats.reads_failed.fetch_add(1, Ordering::Relaxed);
                    errors_in_row += 1;
                }
            }
        }
    }
    // Let what is in flight finish, so the model ends exact where it can.
    if let Some(mut c) = conn.take() {
        let deadline = Instant::now() + COMMAND_DEADLINE;
        while slots.iter().any(Option::is_some) && Instant::now() < deadline {
            let n = c.qp.poll(&mut cpl);
            for cp in &cpl[..n] {
                let f = slots[cp.tag as usize]
                    .take()
                    .expect("a command in this slot");
                busy[f.unit] = false;
                let m = &mut model.units[f.unit];
                match (cp.status.is_success(), f.write) {
                    (true, Some(g)) => {
                        m.acked = g;
                        m.uncertain.clear();
                        stats.writes_acked.fetch_add(1, Ordering::Relaxed);
                    }
                    (false, Some(g)) => m.uncertain.push(g),
                    _ => {}
                }
            }
        }
        drop(c);
        abandon(&mut model, &mut slots, &mut busy);
    }
    drop(bufs);
    model
}

/// Commands of a dropped connection: their writes may or may not land.
fn abandon(model: &mut Model, slots: &mut [Option<InFlight>], busy: &mut [bool]) {
    let until = Instant::now() + QUARANTINE;
    for f in slots.iter_mut().filter_map(Option::take) {
        busy[f.unit] = false;
        if let Some(g) = f.write {
            let m = &mut model.units[f.unit];
            m.uncertain.push(g);
            m.quarantine = Some(until);
        }
    }
}

/// Reads back every unit of the model over a fresh connection; (blocks checked, lost,
/// corrupt), or why it could not.
pub fn read_back(model: &Model, addrs: &SharedAddrs) -> Result<(u64, u64, u64), String> {
    let stats = WriterStats::default();
    let mut c = connect(model.proto, addrs, &stats, &AtomicBool::new(false))
        .ok_or("no connection for the read-back")?;
    let mut pool = DmaPool::new(1, UNIT);
    let buf = pool.get().expect("a buffer");
    let (mut checked, mut lost, mut corrupt) = (0, 0, 0);
    let mut cpl = [Completion::default()];
    for unit in 0..model.units.len() {
        let lba = model.lba(unit);
        let cmd = IoCommand::with_buf(IoOp::Read, lba, BLOCKS_PER_UNIT as u32, buf.io_buf(), 0);
        // SAFETY: `buf` is not touched until the completion is reaped below, and outlives
        // the queue pair.
        unsafe { c.qp.submit(cmd) }.map_err(|e| format!("submit: {e:?}"))?;
        let deadline = Instant::now() + COMMAND_DEADLINE;
        while c.qp.poll(&mut cpl) == 0 {
            if Instant::now() > deadline {
                return Err(format!("read-back of LBA {lba} hung"));
            }
        }
        if !cpl[0].status.is_success() {
            return Err(format!("read-back of LBA {lba} failed: {}", cpl[0].status));
        }
        let (l, k) = model.check(unit, &buf.as_slice()[..UNIT]);
        checked += BLOCKS_PER_UNIT;
        lost += l;
        corrupt += k;
    }
    drop(c);
    pool.put(buf);
    Ok((checked, lost, corrupt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_as_its_generation() {
        let mut buf = vec![0u8; UNIT];
        assert_eq!(stamped_gen(&buf[..BLOCK], 7), Some(0));
        stamp(&mut buf, 40, 9);
        assert_eq!(stamped_gen(&buf[BLOCK..2 * BLOCK], 41), Some(9));
        assert_eq!(stamped_gen(&buf[..BLOCK], 41), None);
        buf[100] ^= 1;
        assert_eq!(stamped_gen(&buf[..BLOCK], 40), None);
    }

    #[test]
    fn the_model_allows_the_acked_and_the_unacknowledged() {
        let mut m = Model::new(Proto::Nbd, 0, 1);
        m.units[0].acked = 3;
        m.units[0].uncertain.push(5);
        let mut buf = vec![0u8; UNIT];
        for (g, ok) in [(3, true), (5, true), (4, false), (0, false)] {
            if g == 0 {
                buf.fill(0);
            } else {
                stamp(&mut buf, 0, g);
            }
            assert_eq!(m.check(0, &buf) == (0, 0), ok, "generation {g}");
        }
    }
}
