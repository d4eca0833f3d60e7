//! The far site's staging area of an `async-cycle` leg (`docs/cycles.md`, "Format"): two
//! header blocks written in turn (the higher valid counter wins), then the staged data of one
//! cycle, then its run table. A cycle whose header says *committed* is whole in the staging
//! area and can be rolled forward onto the image by whoever reads it, with or without the
//! journal; *applied* means the image holds it; *open* means a catch-up is being staged in
//! pieces (the image still holds `cycle`, whose cut the header keeps).

use nvmirror_nvme::Uuid;

use super::format::{check_crc, get32, get64, put32, put64, Commit};

pub(crate) const STAGING_MAGIC: &[u8; 8] = b"NVMSTG01";
/// Version 2 adds the open state and the staged cut (bytes 128..160); version 1 headers
/// (128 bytes) are still read.
pub(crate) const STAGING_VERSION: u32 = 2;
/// The first block of staged data (blocks 0 and 1 hold the headers).
pub(crate) const DATA_START: u64 = 2;
/// Bytes of one run in the run table.
pub(crate) const RUN_LEN: usize = 32;

/// A cycle's state in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CycleState {
    /// Staged whole: the image may hold part of it; roll it forward.
    Committed = 1,
    /// On the image.
    Applied = 2,
    /// A catch-up staged in pieces, not whole yet: the image holds `cycle`; the pieces are
    /// committed with the rest of the catch-up as cycle `cycle + 1`.
    Open = 3,
}

/// A staging header (block 0 or 1, by the parity of `counter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StagingHeader {
    /// One more at each header write: each write goes to the other block, so a torn one
    /// leaves the previous header whole.
    pub counter: u64,
    pub cycle: u64,
    pub state: CycleState,
    pub lba_size: u32,
    /// Blocks of the staging device.
    pub blocks: u64,
    /// The journal the cycle came from.
    pub journal: Uuid,
    /// The journal position of the cut: the cycle holds every record up to `cut.seq`.
    pub cut: Commit,
    /// *Open*: the journal position up to which the pieces staged so far hold the records
    /// (the journal is free up to there). Zero otherwise.
    pub staged: Commit,
    /// Where the run table starts, its runs and their CRC32C.
    pub table_lba: u64,
    pub runs: u32,
    pub table_crc: u32,
    /// Distinct bytes the cycle changes (the payload of its runs).
    pub data_bytes: u64,
    /// When the cycle was committed (Unix ms).
    pub unix_ms: u64,
}

impl StagingHeader {
    pub(crate) const LEN: usize = 160;
    const LEN_V1: usize = 128;

    /// The header of a blank staging area: cycle 0, applied, no runs.
    pub(crate) fn blank(lba_size: u32, blocks: u64, journal: Uuid) -> Self {
        Self {
            counter: 1,
            cycle: 0,
            state: CycleState::Applied,
            lba_size,
            blocks,
            journal,
            cut: Commit::ZERO,
            staged: Commit::ZERO,
            table_lba: DATA_START,
            runs: 0,
            table_crc: crc32c::crc32c(&[]),
            data_bytes: 0,
            unix_ms: 0,
        }
    }

    /// The block this header goes to.
    pub(crate) fn block(&self) -> u64 {
        self.counter % 2
    }

    /// Blocks the run table takes.
    pub(crate) fn table_blocks(&self) -> u64 {
        (self.runs as usize * RUN_LEN).div_ceil(self.lba_size as usize) as u64
    }

    pub(crate) fn encode(&self, out: &mut [u8]) {
        out[..Self::LEN].fill(0);
        out[0..8].copy_from_slice(STAGING_MAGIC);
        put32(out, 8, STAGING_VERSION);
        put32(out, 12, self.lba_size);
        put64(out, 16, self.blocks);
        out[24..40].copy_from_slice(&self.journal.0);
        put64(out, 40, self.counter);
        put64(out, 48, self.cycle);
        out[56] = self.state as u8;
        put64(out, 64, self.cut.seq);
        put64(out, 72, self.cut.offset);
        put64(out, 80, self.cut.bytes);
        put64(out, 88, self.cut.unix_ms);
        put64(out, 96, self.table_lba);
        put32(out, 104, self.runs);
        put32(out, 108, self.table_crc);
        put64(out, 112, self.data_bytes);
        put64(out, 120, self.unix_ms);
        put64(out, 128, self.staged.seq);
        put64(out, 136, self.staged.offset);
        put64(out, 144, self.staged.bytes);
        put64(out, 152, self.staged.unix_ms);
        let crc = crc32c::crc32c(&out[..Self::LEN]);
        put32(out, 60, crc);
    }

    /// `None` for a block without a valid header (blank, foreign or torn).
    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < Self::LEN || &b[0..8] != STAGING_MAGIC {
            return None;
        }
        let version = get32(b, 8);
        let len = match version {
            1 => Self::LEN_V1,
            STAGING_VERSION => Self::LEN,
            _ => return None,
        };
        check_crc(&b[..len], 60).ok()?;
        let state = match b[56] {
            1 => CycleState::Committed,
            2 => CycleState::Applied,
            3 if version >= 2 => CycleState::Open,
            _ => return None,
        };
        let staged = if version >= 2 {
            Commit {
                counter: 0,
                seq: get64(b, 128),
                offset: get64(b, 136),
                bytes: get64(b, 144),
                unix_ms: get64(b, 152),
            }
        } else {
            Commit::ZERO
        };
        let mut journal = [0; 16];
        journal.copy_from_slice(&b[24..40]);
        Some(Self {
            lba_size: get32(b, 12),
            blocks: get64(b, 16),
            journal: Uuid(journal),
            counter: get64(b, 40),
            cycle: get64(b, 48),
            state,
            cut: Commit {
                counter: 0,
                seq: get64(b, 64),
                offset: get64(b, 72),
                bytes: get64(b, 80),
                unix_ms: get64(b, 88),
            },
            table_lba: get64(b, 96),
            runs: get32(b, 104),
            table_crc: get32(b, 108),
            data_bytes: get64(b, 112),
            unix_ms: get64(b, 120),
            staged,
        })
    }

    /// The newer of the two header blocks `b0` and `b1`. `Ok(None)`: both blank (a fresh
    /// staging area); `Err` when the device holds other data.
    pub(crate) fn newest(b0: &[u8], b1: &[u8]) -> Result<Option<Self>, String> {
        let found = [Self::decode(b0), Self::decode(b1)]
            .into_iter()
            .flatten()
            .max_by_key(|h| h.counter);
        match found {
            Some(h) => Ok(Some(h)),
            None if b0.iter().chain(b1).all(|&x| x == 0) => Ok(None),
            None => Err(
                "the device is neither a staging area nor blank (its first blocks hold other data)"
                    .into(),
            ),
        }
    }
}

/// What a run does to the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunOp {
    /// Data staged at `staged_lba`.
    Write = 1,
    WriteZeroes = 2,
    Deallocate = 3,
}

/// One run of the table: blocks `[lba, lba + nlb)` of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub lba: u64,
    pub nlb: u32,
    pub op: RunOp,
    /// Where its data is in the staging area (writes only).
    pub staged_lba: u64,
    /// CRC32C of its data (writes only).
    pub crc: u32,
}

impl Run {
    pub(crate) fn encode(&self, out: &mut [u8]) {
        out[..RUN_LEN].fill(0);
        put64(out, 0, self.lba);
        put64(out, 8, self.staged_lba);
        put32(out, 16, self.nlb);
        out[20] = self.op as u8;
        put32(out, 24, self.crc);
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        let op = match b[20] {
            1 => RunOp::Write,
            2 => RunOp::WriteZeroes,
            3 => RunOp::Deallocate,
            _ => return None,
        };
        Some(Self {
            lba: get64(b, 0),
            staged_lba: get64(b, 8),
            nlb: get32(b, 16),
            op,
            crc: get32(b, 24),
        })
    }
}

/// Decodes a run table of `runs` entries from `b` and checks it against `crc`.
pub(crate) fn decode_table(b: &[u8], runs: u32, crc: u32) -> Result<Vec<Run>, String> {
    let len = runs as usize * RUN_LEN;
    if b.len() < len {
        return Err(format!("run table: {} bytes, {len} expected", b.len()));
    }
    let got = crc32c::crc32c(&b[..len]);
    if got != crc {
        return Err(format!(
            "run table: CRC {crc:#010x} in the header, {got:#010x} computed"
        ));
    }
    (0..runs as usize)
        .map(|i| {
            Run::decode(&b[i * RUN_LEN..(i + 1) * RUN_LEN])
                .ok_or_else(|| format!("run table: entry {i} has an unknown operation"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(counter: u64) -> StagingHeader {
        StagingHeader {
            counter,
            cycle: counter / 2,
            state: if counter % 2 == 1 {
                CycleState::Applied
            } else {
                CycleState::Committed
            },
            lba_size: 4096,
            blocks: 1 << 20,
            journal: Uuid([3; 16]),
            cut: Commit {
                counter: 0,
                seq: 77,
                offset: 900,
                bytes: 1 << 30,
                unix_ms: 5,
            },
            staged: Commit {
                counter: 0,
                seq: 99,
                offset: 1000,
                bytes: 1 << 31,
                unix_ms: 8,
            },
            table_lba: 1234,
            runs: 9,
            table_crc: 0xdead_beef,
            data_bytes: 4096 * 40,
            unix_ms: 6,
        }
    }

    #[test]
    fn a_header_round_trips_and_the_newest_valid_one_wins() {
        let (mut b0, mut b1) = (vec![0u8; 4096], vec![0u8; 4096]);
        assert_eq!(StagingHeader::newest(&b0, &b1), Ok(None));
        let (h6, h7) = (header(6), header(7));
        assert_eq!((h6.block(), h7.block()), (0, 1));
        h6.encode(&mut b0);
        h7.encode(&mut b1);
        assert_eq!(StagingHeader::decode(&b0), Some(h6));
        assert_eq!(StagingHeader::newest(&b0, &b1), Ok(Some(h7)));
        // A torn newer header leaves the older one.
        b1[70] ^= 1;
        assert_eq!(StagingHeader::newest(&b0, &b1), Ok(Some(h6)));
        b0[3] = b'X';
        assert!(StagingHeader::newest(&b0, &b1).is_err());
    }

    #[test]
    fn an_open_header_round_trips_and_a_version_1_header_is_still_read() {
        let mut b = vec![0u8; 512];
        let open = StagingHeader {
            state: CycleState::Open,
            ..header(9)
        };
        open.encode(&mut b);
        assert_eq!(StagingHeader::decode(&b), Some(open));
        // Version 1: 128 bytes, CRC over them, no staged cut.
        let v1 = StagingHeader {
            staged: Commit::ZERO,
            ..header(7)
        };
        v1.encode(&mut b);
        b[128..160].fill(0);
        put32(&mut b, 8, 1);
        put32(&mut b, 60, 0);
        let crc = crc32c::crc32c(&b[..128]);
        put32(&mut b, 60, crc);
        assert_eq!(StagingHeader::decode(&b), Some(v1));
        // ... and an open state in a version 1 header is not one.
        b[56] = 3;
        put32(&mut b, 60, 0);
        let crc = crc32c::crc32c(&b[..128]);
        put32(&mut b, 60, crc);
        assert_eq!(StagingHeader::decode(&b), None);
    }

    #[test]
    fn a_run_table_round_trips_and_a_flipped_bit_is_caught() {
        let runs: Vec<Run> = (0..5)
            .map(|i| Run {
                lba: i * 100,
                nlb: i as u32 + 1,
                op: if i == 3 {
                    RunOp::Deallocate
                } else {
                    RunOp::Write
                },
                staged_lba: DATA_START + i,
                crc: i as u32 * 7,
            })
            .collect();
        let mut b = vec![0u8; runs.len() * RUN_LEN];
        for (i, r) in runs.iter().enumerate() {
            r.encode(&mut b[i * RUN_LEN..]);
        }
        let crc = crc32c::crc32c(&b);
        assert_eq!(decode_table(&b, 5, crc).unwrap(), runs);
        b[40] ^= 4;
        assert!(decode_table(&b, 5, crc).unwrap_err().contains("CRC"));
    }
}
