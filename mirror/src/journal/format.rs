//! The journal's on-device format (`docs/journal.md`): a header block, two commit blocks
//! written in turn, then a ring of segments in the shape of the AIM seed — a segment header,
//! a table of I/O control blocks (one per record: LBA, length, op, payload CRC) and the
//! records' data, packed in that order. Every integer is little-endian; every structure ends in
//! a CRC32C over its bytes with the CRC field zero.

use nvmirror_nvme::{IoOp, Uuid};

/// Block 0: what the journal is.
pub(crate) const HEADER_MAGIC: &[u8; 8] = b"NVMJRNL1";
/// Blocks 1 and 2: how far the far side has applied it.
pub(crate) const COMMIT_MAGIC: &[u8; 8] = b"NVMJCMT1";
/// The first block of every segment.
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"NVMJSEG1";
pub(crate) const VERSION: u32 = 1;
/// Block index of the first commit block (the second follows it).
pub(crate) const COMMIT_BLOCK: u64 = 1;
/// Block index where the segment ring starts.
pub(crate) const RING_START: u64 = 3;
/// Bytes of a segment header before its I/O control block table.
pub(crate) const SEGMENT_HEADER_LEN: usize = 72;
/// Bytes of one I/O control block.
pub(crate) const IOCB_LEN: usize = 24;

/// The journal header (block 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub uuid: Uuid,
    pub lba_size: u32,
    /// Blocks of the journal device; the ring is `[RING_START, blocks)`.
    pub blocks: u64,
}

impl Header {
    pub(crate) const LEN: usize = 48;

    pub(crate) fn encode(&self, out: &mut [u8]) {
        out[..Self::LEN].fill(0);
        out[0..8].copy_from_slice(HEADER_MAGIC);
        put32(out, 8, VERSION);
        put32(out, 12, self.lba_size);
        put64(out, 16, self.blocks);
        out[24..40].copy_from_slice(&self.uuid.0);
        let crc = crc32c::crc32c(&out[..Self::LEN]);
        put32(out, 44, crc);
    }

    /// `None` for a block that holds no journal header (blank or foreign); `Err` for one
    /// that claims to and is damaged or of another version.
    pub(crate) fn decode(b: &[u8]) -> Result<Option<Self>, String> {
        if b.len() < Self::LEN || &b[0..8] != HEADER_MAGIC {
            return Ok(None);
        }
        check_crc(&b[..Self::LEN], 44).map_err(|e| format!("journal header: {e}"))?;
        let version = get32(b, 8);
        if version != VERSION {
            return Err(format!(
                "journal header: version {version}, expected {VERSION}"
            ));
        }
        let mut uuid = [0; 16];
        uuid.copy_from_slice(&b[24..40]);
        Ok(Some(Self {
            uuid: Uuid(uuid),
            lba_size: get32(b, 12),
            blocks: get64(b, 16),
        }))
    }
}

/// A commit block: the far side holds every record up to `seq` (on the image, or, for an
/// `async-cycle` leg's catch-up staged in pieces, in its staging area), and the segment with
/// the next record starts at block `offset`. Two blocks take turns (by the parity of `counter`)
/// so a torn write loses at most the newer one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Commit {
    /// Write counter of the commit blocks (the higher valid one wins).
    pub counter: u64,
    /// Last record the far side holds (0: none yet).
    pub seq: u64,
    /// Block of the segment holding record `seq + 1`.
    pub offset: u64,
    /// Payload bytes of records `1..=seq`.
    pub bytes: u64,
    /// When record `seq` was made durable in the journal (Unix time, ms).
    pub unix_ms: u64,
}

impl Commit {
    pub(crate) const LEN: usize = 72;
    pub(crate) const ZERO: Self = Self {
        counter: 0,
        seq: 0,
        offset: 0,
        bytes: 0,
        unix_ms: 0,
    };

    /// The block (index) this commit is written to.
    pub(crate) fn block(&self) -> u64 {
        COMMIT_BLOCK + (self.counter & 1)
    }

    pub(crate) fn encode(&self, uuid: Uuid, out: &mut [u8]) {
        out[..Self::LEN].fill(0);
        out[0..8].copy_from_slice(COMMIT_MAGIC);
        out[8..24].copy_from_slice(&uuid.0);
        put64(out, 24, self.counter);
        put64(out, 32, self.seq);
        put64(out, 40, self.offset);
        put64(out, 48, self.bytes);
        put64(out, 56, self.unix_ms);
        let crc = crc32c::crc32c(&out[..Self::LEN]);
        put32(out, 64, crc);
    }

    /// `None` for a block that holds no valid commit of journal `uuid`.
    pub(crate) fn decode(b: &[u8], uuid: Uuid) -> Option<Self> {
        if b.len() < Self::LEN || &b[0..8] != COMMIT_MAGIC || b[8..24] != uuid.0 {
            return None;
        }
        check_crc(&b[..Self::LEN], 64).ok()?;
        Some(Self {
            counter: get64(b, 24),
            seq: get64(b, 32),
            offset: get64(b, 40),
            bytes: get64(b, 48),
            unix_ms: get64(b, 56),
        })
    }
}

/// What a record does on the far side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecordOp {
    Write = 1,
    WriteZeroes = 2,
    Deallocate = 3,
    /// A barrier: the far side is flushed once every record before it is applied.
    Flush = 4,
}

impl RecordOp {
    pub(crate) fn of(op: IoOp) -> Option<Self> {
        match op {
            IoOp::Write => Some(Self::Write),
            IoOp::WriteZeroes => Some(Self::WriteZeroes),
            IoOp::Deallocate => Some(Self::Deallocate),
            IoOp::Flush => Some(Self::Flush),
            IoOp::Read => None,
        }
    }

    pub(crate) fn io_op(self) -> IoOp {
        match self {
            Self::Write => IoOp::Write,
            Self::WriteZeroes => IoOp::WriteZeroes,
            Self::Deallocate => IoOp::Deallocate,
            Self::Flush => IoOp::Flush,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::WriteZeroes,
            3 => Self::Deallocate,
            4 => Self::Flush,
            _ => return None,
        })
    }
}

/// One I/O control block: a record of the segment. Its payload (writes only) follows the
/// previous record's in the segment's data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Iocb {
    pub op: RecordOp,
    pub fua: bool,
    pub lba: u64,
    pub nlb: u32,
    /// A piece of a write split across segments that is not its last: a cut of the journal
    /// (`async-cycle`) never falls right after it.
    pub more: bool,
    /// Journaled while a catch-up of an `async-cycle` leg was held (byte 15; old journals
    /// read 0): a restart finding one past the commit holds the leg's cuts until its volume
    /// says whether the leg is whole (`docs/cycles.md`).
    pub catch_up: bool,
    /// CRC32C of the payload (0 for records without one).
    pub crc: u32,
}

impl Iocb {
    fn encode(&self, out: &mut [u8]) {
        out[..IOCB_LEN].fill(0);
        put64(out, 0, self.lba);
        put32(out, 8, self.nlb);
        out[12] = self.op as u8;
        out[13] = u8::from(self.fua);
        out[14] = u8::from(self.more);
        out[15] = u8::from(self.catch_up);
        put32(out, 16, self.crc);
    }

    fn decode(b: &[u8]) -> Option<Self> {
        Some(Self {
            lba: get64(b, 0),
            nlb: get32(b, 8),
            op: RecordOp::from_u8(b[12])?,
            fua: b[13] != 0,
            more: b[14] != 0,
            catch_up: b[15] != 0,
            crc: get32(b, 16),
        })
    }

    /// Payload bytes of this record on a device with `lba_size`-byte blocks.
    pub(crate) fn payload_len(&self, lba_size: u32) -> usize {
        if self.op == RecordOp::Write {
            self.nlb as usize * lba_size as usize
        } else {
            0
        }
    }
}

/// A segment header: records `seq_first ..= seq_first + count - 1`, durable together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub uuid: Uuid,
    pub seq_first: u64,
    pub count: u32,
    /// Blocks of header and I/O control block table.
    pub header_blocks: u32,
    /// Blocks of the whole segment (header and data).
    pub total_blocks: u32,
    /// Block size of the records' LBAs (the far device's), which sizes their payloads.
    pub data_lba_size: u32,
    /// When the segment was written (Unix time, ms).
    pub unix_ms: u64,
    /// Payload bytes of every record before this segment.
    pub bytes_before: u64,
}

impl SegmentHeader {
    /// Blocks a header with `count` records needs.
    pub(crate) fn blocks_for(count: usize, lba_size: u32) -> u32 {
        (SEGMENT_HEADER_LEN + count * IOCB_LEN).div_ceil(lba_size as usize) as u32
    }

    /// Writes the header and `iocbs` into `out` (the segment's first `header_blocks`).
    pub(crate) fn encode(&self, iocbs: &[Iocb], out: &mut [u8]) {
        let len = SEGMENT_HEADER_LEN + iocbs.len() * IOCB_LEN;
        out[..len].fill(0);
        out[0..8].copy_from_slice(SEGMENT_MAGIC);
        out[8..24].copy_from_slice(&self.uuid.0);
        put64(out, 24, self.seq_first);
        put32(out, 32, self.count);
        put32(out, 36, self.header_blocks);
        put32(out, 40, self.total_blocks);
        put32(out, 44, self.data_lba_size);
        put64(out, 48, self.unix_ms);
        put64(out, 56, self.bytes_before);
        for (i, iocb) in iocbs.iter().enumerate() {
            let at = SEGMENT_HEADER_LEN + i * IOCB_LEN;
            iocb.encode(&mut out[at..at + IOCB_LEN]);
        }
        let crc = crc32c::crc32c(&out[..len]);
        put32(out, 64, crc);
    }

    /// Reads the fixed part of a segment header from its first block: `None` unless it is a
    /// segment of journal `uuid` whose first record is `seq` (a segment of an earlier lap of
    /// the ring has a lower one).
    pub(crate) fn peek(b: &[u8], uuid: Uuid, seq: u64) -> Option<Self> {
        if b.len() < SEGMENT_HEADER_LEN || &b[0..8] != SEGMENT_MAGIC || b[8..24] != uuid.0 {
            return None;
        }
        let h = Self {
            uuid,
            seq_first: get64(b, 24),
            count: get32(b, 32),
            header_blocks: get32(b, 36),
            total_blocks: get32(b, 40),
            data_lba_size: get32(b, 44),
            unix_ms: get64(b, 48),
            bytes_before: get64(b, 56),
        };
        (h.seq_first == seq
            && h.count > 0
            && h.header_blocks > 0
            && h.total_blocks >= h.header_blocks
            && h.data_lba_size.is_power_of_two()
            && h.data_lba_size >= 512)
            .then_some(h)
    }

    /// Checks the header's CRC over its whole table (in `b`, at least `header_blocks` long)
    /// and returns the I/O control blocks; `None` when damaged.
    pub(crate) fn iocbs(&self, b: &[u8], out: &mut Vec<Iocb>) -> Option<()> {
        let len = SEGMENT_HEADER_LEN.checked_add((self.count as usize).checked_mul(IOCB_LEN)?)?;
        if b.len() < len {
            return None;
        }
        check_crc(&b[..len], 64).ok()?;
        out.clear();
        for i in 0..self.count as usize {
            let at = SEGMENT_HEADER_LEN + i * IOCB_LEN;
            out.push(Iocb::decode(&b[at..at + IOCB_LEN])?);
        }
        Some(())
    }
}

/// Bytes of a segment buffer able to hold `max_records` records and `max_payload` bytes of
/// data.
pub(crate) fn segment_buffer_len(max_records: usize, max_payload: usize, lba_size: u32) -> usize {
    SegmentHeader::blocks_for(max_records, lba_size) as usize * lba_size as usize + max_payload
}

pub(super) fn check_crc(b: &[u8], at: usize) -> Result<(), String> {
    let stored = get32(b, at);
    // CRC over the bytes with the CRC field zero, without copying the structure.
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..at]), &[0; 4]);
    let crc = crc32c::crc32c_append(crc, &b[at + 4..]);
    if crc == stored {
        Ok(())
    } else {
        Err(format!("CRC {stored:#010x} stored, {crc:#010x} computed"))
    }
}

pub(super) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

pub(super) fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: Uuid = Uuid([7; 16]);

    #[test]
    fn a_header_round_trips_and_a_flipped_bit_is_caught() {
        let h = Header {
            uuid: U,
            lba_size: 512,
            blocks: 1 << 20,
        };
        let mut b = vec![0u8; 512];
        h.encode(&mut b);
        assert_eq!(Header::decode(&b), Ok(Some(h)));
        b[20] ^= 1;
        assert!(Header::decode(&b).is_err());
        assert_eq!(Header::decode(&[0u8; 512]), Ok(None));
    }

    #[test]
    fn commits_take_turns_and_belong_to_their_journal() {
        let c = Commit {
            counter: 5,
            seq: 42,
            offset: 17,
            bytes: 4096 * 42,
            unix_ms: 1,
        };
        assert_eq!(c.block(), 2);
        assert_eq!(Commit { counter: 6, ..c }.block(), 1);
        let mut b = vec![0u8; 512];
        c.encode(U, &mut b);
        assert_eq!(Commit::decode(&b, U), Some(c));
        assert_eq!(Commit::decode(&b, Uuid([8; 16])), None);
        b[33] ^= 0x80;
        assert_eq!(Commit::decode(&b, U), None);
    }

    #[test]
    fn a_segment_header_and_its_table_round_trip_and_only_the_expected_sequence_is_taken() {
        let iocbs: Vec<Iocb> = (0..30)
            .map(|i| Iocb {
                op: if i % 7 == 6 {
                    RecordOp::Flush
                } else {
                    RecordOp::Write
                },
                fua: i % 5 == 0,
                more: i % 11 == 3,
                catch_up: i % 13 == 4,
                lba: i * 8,
                nlb: 8,
                crc: i as u32 * 3,
            })
            .collect();
        let hb = SegmentHeader::blocks_for(iocbs.len(), 512);
        assert_eq!(hb, (72 + 30 * 24_u32).div_ceil(512));
        let h = SegmentHeader {
            uuid: U,
            seq_first: 100,
            count: 30,
            header_blocks: hb,
            total_blocks: hb + 30 * 8,
            data_lba_size: 512,
            unix_ms: 9,
            bytes_before: 12345,
        };
        let mut b = vec![0u8; hb as usize * 512];
        h.encode(&iocbs, &mut b);
        assert_eq!(SegmentHeader::peek(&b, U, 100), Some(h));
        assert_eq!(
            SegmentHeader::peek(&b, U, 99),
            None,
            "a segment of an earlier lap"
        );
        let mut out = Vec::new();
        assert!(h.iocbs(&b, &mut out).is_some());
        assert_eq!(out, iocbs);
        // Damage in the table (beyond the first block) is caught.
        b[600] ^= 1;
        assert!(h.iocbs(&b, &mut out).is_none());
    }

    #[test]
    fn sizes_match_the_documented_layout() {
        assert_eq!(SEGMENT_HEADER_LEN, 72);
        assert_eq!(IOCB_LEN, 24);
        assert_eq!(SegmentHeader::blocks_for(167, 4096), 1);
        assert_eq!(SegmentHeader::blocks_for(168, 4096), 2);
        const { assert!(Header::LEN <= 512 && Commit::LEN <= 512) };
    }
}
