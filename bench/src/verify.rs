//! `--verify crc32c`: stamped blocks and the ledger of what each job wrote.
//!
//! A *verify block* is one unit of the job (`bs`, or the low end of `bsrange`); an I/O of
//! several units carries one stamp per unit. Every written block starts with a 32-byte stamp,
//! little endian:
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
    range: ThreadRange,
    /// Per block: the last acknowledged generation (0: not written by this thread,
    /// `UNKNOWN`: contents unknown), with `BUSY` set while an I/O is in flight to it.
    blocks: Vec<u64>,
    next_generation: u64,
    /// The seed this thread stamps its writes with.
    pub seed: u64,
}

impl BlockLedger {
    /// An empty ledger over `range`; writes get generations from `first_generation` (at
    /// least 1) on.
    pub fn new(range: ThreadRange, seed: u64, first_generation: u64) -> Self {
        Self {
            range,
            blocks: vec![0; range.len as usize],
            next_generation: first_generation.clamp(1, UNKNOWN >> 1),
            seed,
        }
    }

    fn idx(&self, unit: u64) -> usize {
        (unit - self.range.first) as usize
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
            (g != 0 && g != UNKNOWN).then_some((self.range.first + i as u64, g))
        })
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
        let mut l = BlockLedger::new(ThreadRange { first: 10, len: 8 }, 1, 1);
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
}
