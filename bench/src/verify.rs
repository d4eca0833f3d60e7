//! `--verify crc32c`: stamped blocks and the ledger of what each job wrote.
//!
//! A *verify block* is one logical block of the device (its LBA size), whatever the job's `bs`:
//! an I/O carries one stamp per logical block, so a job can check blocks that another job wrote
//! with other I/O sizes. Every written block starts with a 32-byte stamp, little endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `NVMB` |
//! | 4..8 | CRC32C of bytes 8.. of the block (stamp rest and payload) |
//! | 8..16 | first LBA of the block |
//! | 16..24 | generation: the writing job thread's write counter |
//! | 24..32 | the writing job thread's seed |
//!
//! A thread's generations start at the wall-clock time of its start in nanoseconds and count
//! up by one per write, so a block left over from an earlier run (or an earlier job section)
//! carries an older generation than any write of this run.
//!
//! The ledger keeps, per block of the thread's range, the generation of the last write that
//! was acknowledged and whether an I/O to it is in flight; a job never has two I/Os in flight
//! to one block, so the generation a read must find is never ambiguous.

use std::fmt;

use crate::engine::VerifyStats;
use crate::pattern::ThreadRange;

/// First bytes of every stamped block.
pub const STAMP_MAGIC: [u8; 4] = *b"NVMB";

/// Bytes of the stamp at the start of each block.
pub const STAMP_LEN: usize = 32;

/// Why a block failed verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyFault {
    /// The block carries no stamp (never written by a verify job, or overwritten).
    NoStamp,
    /// The stamp names another block.
    WrongLba { found: u64 },
    /// The CRC32C does not match the block's contents.
    BadCrc { stored: u32, computed: u32 },
    /// The block holds an older write than the last one acknowledged (or, in the read-back
    /// pass, not exactly the last one).
    Generation { found: u64, expected: u64 },
    /// A block this thread wrote carries another writer's seed.
    WrongSeed { found: u64, expected: u64 },
}

impl fmt::Display for VerifyFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoStamp => f.write_str("no verify stamp"),
            Self::WrongLba { found } => write!(f, "stamp names LBA {found}"),
            Self::BadCrc { stored, computed } => {
                write!(
                    f,
                    "CRC32C {computed:#010x} does not match the stamp's {stored:#010x}"
                )
            }
            Self::Generation { found, expected } => {
                write!(f, "generation {found}, expected {expected}")
            }
            Self::WrongSeed { found, expected } => {
                write!(f, "written by seed {found}, expected {expected}")
            }
        }
    }
}

/// The first failure of a job: where and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyFailure {
    pub lba: u64,
    pub fault: VerifyFault,
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LBA {}: {}", self.lba, self.fault)
    }
}

/// A stamp as read back from a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub lba: u64,
    pub generation: u64,
    pub seed: u64,
}

fn word(block: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&block[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Writes the stamp of `lba` at generation `generation` into `block` (at least
/// [`STAMP_LEN`] bytes) and seals it with the CRC32C of the block.
#[inline]
pub fn stamp_block(block: &mut [u8], lba: u64, generation: u64, seed: u64) {
    block[0..4].copy_from_slice(&STAMP_MAGIC);
    block[8..16].copy_from_slice(&lba.to_le_bytes());
    block[16..24].copy_from_slice(&generation.to_le_bytes());
    block[24..32].copy_from_slice(&seed.to_le_bytes());
    let crc = crc32c::crc32c(&block[8..]);
    block[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads and checks the stamp of a block that should be `lba`: magic, LBA and CRC32C.
#[inline]
pub fn check_block(block: &[u8], lba: u64) -> Result<Stamp, VerifyFault> {
    if block[0..4] != STAMP_MAGIC {
        return Err(VerifyFault::NoStamp);
    }
    let found = word(block, 8);
    if found != lba {
        return Err(VerifyFault::WrongLba { found });
    }
    let mut b = [0u8; 4];
    b.copy_from_slice(&block[4..8]);
    let stored = u32::from_le_bytes(b);
    let computed = crc32c::crc32c(&block[8..]);
    if stored != computed {
        return Err(VerifyFault::BadCrc { stored, computed });
    }
    Ok(Stamp {
        lba,
        generation: word(block, 16),
        seed: word(block, 24),
    })
}

/// Ledger value of a block whose contents are unknown (a failed or unfinished write).
const UNKNOWN: u64 = u64::MAX >> 1;
/// Ledger bit of a block with an I/O in flight.
const BUSY: u64 = 1 << 63;

/// What one job thread knows about the blocks of its range.
#[derive(Debug)]
pub struct BlockLedger {
    /// First block (counted from the start of the job's region).
    first: u64,
    /// Per block: the last acknowledged generation (0: not written by this thread,
    /// `UNKNOWN`: contents unknown), with `BUSY` set while an I/O is in flight to it.
    blocks: Vec<u64>,
    /// With [`record_acked`](Self::record_acked): per block, the last acknowledged
    /// generation, kept when a later write fails (for `--verify-ledger`).
    acked: Option<Vec<u64>>,
    next_generation: u64,
    /// The seed this thread stamps its writes with.
    pub seed: u64,
}

impl BlockLedger {
    /// An empty ledger over `len` blocks from `first`; writes get generations from
    /// `first_generation` (at least 1) on.
    pub fn new(first: u64, len: u64, seed: u64, first_generation: u64) -> Self {
        Self {
            first,
            blocks: vec![0; len as usize],
            acked: None,
            next_generation: first_generation.clamp(1, UNKNOWN >> 1),
            seed,
        }
    }

    /// Keeps the last acknowledged generation of every block as well, whatever later writes
    /// to it do ([`acked`](Self::acked)).
    pub fn record_acked(&mut self) {
        self.acked = Some(vec![0; self.blocks.len()]);
    }

    /// With [`record_acked`](Self::record_acked): every block with an acknowledged write and
    /// the generation of the last one, in order. A block may hold a later generation whose
    /// write was never acknowledged.
    pub fn acked(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.acked
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, &g)| (g != 0).then_some((self.first + i as u64, g)))
    }

    fn idx(&self, block: u64) -> usize {
        (block - self.first) as usize
    }

    /// Marks `units` blocks from `unit` in flight, unless one of them already is.
    #[inline]
    pub fn try_claim(&mut self, unit: u64, units: u32) -> bool {
        let i = self.idx(unit);
        let blocks = &mut self.blocks[i..i + units as usize];
        if blocks.iter().any(|b| b & BUSY != 0) {
            return false;
        }
        for b in blocks {
            *b |= BUSY;
        }
        true
    }

    /// The generation for the next write.
    #[inline]
    pub fn next_generation(&mut self) -> u64 {
        let g = self.next_generation;
        self.next_generation += 1;
        g
    }

    /// The generation a read of block `unit` must find at least, while the block is claimed;
    /// `None` when this thread does not know (never written, or the write's outcome unknown).
    #[inline]
    pub fn expected(&self, unit: u64) -> Option<u64> {
        let g = self.blocks[self.idx(unit)] & !BUSY;
        (g != 0 && g != UNKNOWN).then_some(g)
    }

    /// Ends the I/O on `units` blocks from `unit`; a write records `generation` (0 for a
    /// read, which changes nothing; [`None`] for a write whose outcome is unknown).
    #[inline]
    pub fn release(&mut self, unit: u64, units: u32, write: Option<u64>) {
        let i = self.idx(unit);
        if let (Some(acked), Some(g @ 1..)) = (&mut self.acked, write) {
            acked[i..i + units as usize].fill(g);
        }
        for b in &mut self.blocks[i..i + units as usize] {
            *b = match write {
                Some(0) => *b & !BUSY,
                Some(g) => g,
                None => UNKNOWN,
            };
        }
    }

    /// Blocks whose latest write is known, with its generation, in order.
    pub fn written(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.blocks.iter().enumerate().filter_map(|(i, &g)| {
            let g = g & !BUSY;
            (g != 0 && g != UNKNOWN).then_some((self.first + i as u64, g))
        })
    }
}

/// The verify state of one job thread: its ledger, and how the job's units map onto logical
/// blocks.
#[derive(Debug)]
pub struct BlockVerifier {
    ledger: BlockLedger,
    /// LBA of the job region's first block.
    first_lba: u64,
    /// Logical blocks per job unit.
    unit_nlb: u64,
    /// Bytes per logical block.
    block_bytes: usize,
    /// The job writes: blocks it has not written may carry no stamp yet.
    writer: bool,
}

impl BlockVerifier {
    /// The verifier of a thread working on `range` (in units of `unit_nlb` blocks of
    /// `block_bytes`) of a region starting at `first_lba`.
    pub fn new(
        range: ThreadRange,
        first_lba: u64,
        unit_nlb: u32,
        block_bytes: u32,
        writer: bool,
        seed: u64,
        first_generation: u64,
    ) -> Self {
        let unit_nlb = u64::from(unit_nlb);
        Self {
            ledger: BlockLedger::new(
                range.first * unit_nlb,
                range.len * unit_nlb,
                seed,
                first_generation,
            ),
            first_lba,
            unit_nlb,
            block_bytes: block_bytes as usize,
            writer,
        }
    }

    /// Whether the job writes (and so ends with a read-back pass).
    pub fn writer(&self) -> bool {
        self.writer
    }

    /// Bytes per verify block.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// The LBA of `block`.
    pub fn lba(&self, block: u64) -> u64 {
        self.first_lba + block
    }

    /// Claims the blocks of an I/O of `units` units from `unit`, unless one is in flight.
    #[inline]
    pub fn claim(&mut self, unit: u64, units: u32) -> bool {
        self.ledger
            .try_claim(unit * self.unit_nlb, units * self.unit_nlb as u32)
    }

    /// Ends an I/O (see [`BlockLedger::release`]).
    #[inline]
    pub fn release(&mut self, unit: u64, units: u32, write: Option<u64>) {
        self.ledger
            .release(unit * self.unit_nlb, units * self.unit_nlb as u32, write);
    }

    /// The generation of the next write.
    #[inline]
    pub fn next_generation(&mut self) -> u64 {
        self.ledger.next_generation()
    }

    /// Stamps every block of a write of `units` units from `unit` at `generation`.
    pub fn stamp(&self, buf: &mut [u8], unit: u64, units: u32, generation: u64) {
        let first = unit * self.unit_nlb;
        let count = (u64::from(units) * self.unit_nlb) as usize;
        for (k, block) in buf
            .chunks_exact_mut(self.block_bytes)
            .take(count)
            .enumerate()
        {
            stamp_block(
                block,
                self.lba(first + k as u64),
                generation,
                self.ledger.seed,
            );
        }
    }

    /// Checks the blocks a read of `units` units from `unit` returned.
    pub fn check_io(&self, buf: &[u8], unit: u64, units: u32, out: &mut VerifyStats) {
        let count = u64::from(units) * self.unit_nlb;
        self.check_blocks(buf, unit * self.unit_nlb, count, false, out);
    }

    /// Checks `count` blocks from `first` in `buf`. `exact`: the read-back pass, where each
    /// block must hold exactly the last acknowledged generation.
    pub fn check_blocks(
        &self,
        buf: &[u8],
        first: u64,
        count: u64,
        exact: bool,
        out: &mut VerifyStats,
    ) {
        for (k, block) in buf
            .chunks_exact(self.block_bytes)
            .take(count as usize)
            .enumerate()
        {
            let b = first + k as u64;
            let lba = self.lba(b);
            let expected = self.ledger.expected(b);
            let outcome = match check_block(block, lba) {
                Err(VerifyFault::NoStamp) if expected.is_none() && self.writer => continue,
                Err(fault) => Err(fault),
                Ok(stamp) => match expected {
                    Some(_) if stamp.seed != self.ledger.seed => Err(VerifyFault::WrongSeed {
                        found: stamp.seed,
                        expected: self.ledger.seed,
                    }),
                    Some(g) if stamp.generation < g || (exact && stamp.generation != g) => {
                        Err(VerifyFault::Generation {
                            found: stamp.generation,
                            expected: g,
                        })
                    }
                    _ => Ok(()),
                },
            };
            out.blocks_checked += 1;
            if let Err(fault) = outcome {
                out.fail(VerifyFailure { lba, fault });
            }
        }
    }

    /// Keeps every block's last acknowledged generation for [`write_ledger`](Self::write_ledger).
    pub fn record_acked(&mut self) {
        self.ledger.record_acked();
    }

    /// Writes the acknowledged writes to `path` for a checker outside this process (after
    /// [`record_acked`](Self::record_acked)): a `# lba generation seed` header, then one
    /// line per block with an acknowledged write, in LBA order: its LBA, the generation of
    /// the last acknowledged write to it and this thread's seed (decimal). The block holds
    /// that generation or a later one whose write was not acknowledged (it failed, or was
    /// in flight when the target went away).
    pub fn write_ledger(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(out, "# lba generation seed")?;
        for (b, g) in self.ledger.acked() {
            writeln!(out, "{} {g} {}", self.lba(b), self.ledger.seed)?;
        }
        out.flush()
    }

    /// The blocks this thread wrote whose last write is known, as runs of at most
    /// `max_blocks` consecutive blocks: `(first block, count)`.
    pub fn written_runs(&self, max_blocks: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (b, _) in self.ledger.written() {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == b && *n < max_blocks => *n += 1,
                _ => runs.push((b, 1)),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_block_checks_and_each_kind_of_damage_is_named() {
        let mut block = vec![0x5au8; 4096];
        stamp_block(&mut block, 77, 3, 9);
        assert_eq!(
            check_block(&block, 77),
            Ok(Stamp {
                lba: 77,
                generation: 3,
                seed: 9
            })
        );
        assert_eq!(
            check_block(&block, 78),
            Err(VerifyFault::WrongLba { found: 77 })
        );
        let mut flipped = block.clone();
        flipped[4000] ^= 1;
        assert!(matches!(
            check_block(&flipped, 77),
            Err(VerifyFault::BadCrc { .. })
        ));
        assert_eq!(check_block(&[0u8; 512], 0), Err(VerifyFault::NoStamp));
        let f = VerifyFailure {
            lba: 77,
            fault: VerifyFault::Generation {
                found: 2,
                expected: 3,
            },
        };
        assert_eq!(f.to_string(), "LBA 77: generation 2, expected 3");
    }

    #[test]
    fn the_ledger_refuses_overlapping_claims_and_records_generations() {
        let mut l = BlockLedger::new(10, 8, 1, 1);
        assert!(l.try_claim(10, 4));
        assert!(!l.try_claim(13, 2), "block 13 is in flight");
        assert!(l.try_claim(14, 2));
        let g = l.next_generation();
        l.release(10, 4, Some(g));
        l.release(14, 2, None);
        assert!(l.try_claim(12, 1));
        assert_eq!(l.expected(12), Some(g));
        l.release(12, 1, Some(0));
        assert_eq!(l.expected(12), Some(g));
        assert_eq!(l.expected(14), None, "the write of 14 failed");
        assert_eq!(l.expected(16), None, "16 was never written");
        let written: Vec<_> = l.written().collect();
        assert_eq!(written, [(10, 1), (11, 1), (12, 1), (13, 1)]);
    }

    #[test]
    fn the_acked_record_keeps_the_last_acknowledged_write_through_a_failed_one() {
        let range = ThreadRange { first: 0, len: 4 };
        let mut v = BlockVerifier::new(range, 100, 1, 512, true, 7, 50);
        v.record_acked();
        assert!(v.claim(0, 2));
        let g = v.next_generation();
        v.release(0, 2, Some(g));
        // A later write to block 1 fails: its content is unknown to the read-back, but it
        // holds generation g or the failed one, never less.
        assert!(v.claim(1, 1));
        let _ = v.next_generation();
        v.release(1, 1, None);
        assert!(v.claim(3, 1));
        v.release(3, 1, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        v.write_ledger(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!("# lba generation seed\n100 {g} 7\n101 {g} 7\n")
        );
    }

    #[test]
    fn the_verifier_stamps_each_logical_block_and_reads_back_in_runs() {
        // Units of 8 blocks of 512 bytes; the thread owns units 2..6 of a region at LBA 100.
        let range = ThreadRange { first: 2, len: 4 };
        let mut v = BlockVerifier::new(range, 100, 8, 512, true, 7, 1000);
        let mut buf = vec![0xeeu8; 2 * 4096];
        assert!(v.claim(3, 2));
        assert!(!v.claim(4, 1), "unit 4 is in flight");
        let g = v.next_generation();
        v.stamp(&mut buf, 3, 2, g);
        for (k, block) in buf.chunks(512).enumerate() {
            let stamp = check_block(block, 100 + 24 + k as u64).unwrap();
            assert_eq!((stamp.generation, stamp.seed), (1000, 7));
        }
        v.release(3, 2, Some(g));
        let mut out = VerifyStats::default();
        v.check_io(&buf, 3, 2, &mut out);
        assert_eq!((out.blocks_checked, out.failures), (16, 0));
        // Another job's 4 KiB reads see the same blocks: a read of unit 4 alone.
        v.check_blocks(&buf[4096..], 32, 8, true, &mut out);
        assert_eq!((out.blocks_checked, out.failures), (24, 0));
        buf[4096 + 600] ^= 1;
        v.check_io(&buf, 3, 2, &mut out);
        assert_eq!(out.failures, 1);
        assert_eq!(out.first.unwrap().lba, 100 + 33);
        assert_eq!(v.written_runs(6), [(24, 6), (30, 6), (36, 4)]);
    }
}
