//! Opening a journal: its header and commit position, and the chain of segments after it
//! (`docs/journal.md`, "Recovery"). Reading one segment back is shared with the shipper.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{BlockDevice, Fence, IoCommand, IoOp, Uuid};

use super::dev_io::DevIo;
use super::format::{
    segment_buffer_len, Commit, Header, Iocb, SegmentHeader, COMMIT_BLOCK, RING_START,
};
use super::JournalConfig;

/// The least time one command may take while a journal is opened (as for a volume's
/// start-up metadata I/O: a device busy after a crash is not yet a failed one).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A buffer for whole segments, grown (off the data path) when a segment is larger than
/// the configured maximum (one written under an older configuration).
pub(crate) struct SegBuf {
    buf: DmaBuf,
}

impl SegBuf {
    pub(crate) fn new(len: usize) -> Self {
        let mut pool = DmaPool::new(1, len.max(4096));
        let buf = pool.get().expect("a fresh pool has a buffer");
        Self { buf }
    }

    pub(crate) fn ensure(&mut self, len: usize) {
        if self.buf.len() < len {
            *self = Self::new(len);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn bytes(&mut self) -> &mut [u8] {
        self.buf.as_mut_slice()
    }

    /// Leaves the buffer to a command given up on until `fence` is done (the device may
    /// still read or fill it), and takes a fresh one of the same size.
    pub(crate) fn park_on(&mut self, fence: Fence) {
        if fence.is_done() {
            return;
        }
        let old = std::mem::replace(self, Self::new(self.buf.len()));
        fence.then(move || drop(old));
    }

    /// `len` bytes at `off` as a command buffer.
    pub(crate) fn io(&mut self, off: usize, len: usize) -> IoBuf {
        let s = &mut self.buf.as_mut_slice()[off..off + len];
        IoBuf::from_slice(s)
    }
}

/// Reads blocks `[lba, lba + nlb)` of the journal into `buf` at `off`.
pub(crate) fn read_blocks(
    io: &mut DevIo,
    lba: u64,
    nlb: u32,
    buf: &mut SegBuf,
    off: usize,
    lba_size: u32,
    stop: &AtomicBool,
) -> Result<(), String> {
    let len = nlb as usize * lba_size as usize;
    let cmd = IoCommand::with_buf(IoOp::Read, lba, nlb, buf.io(off, len), 0);
    match io.run(cmd, Some(buf), stop) {
        Ok(c) if c.status.is_success() => Ok(()),
        Ok(c) => Err(format!("reading journal blocks {lba}+{nlb}: {}", c.status)),
        Err(e) => Err(format!("reading journal blocks {lba}+{nlb}: {e}")),
    }
}

/// Writes `len` bytes of `buf` at `off` to journal block `lba`, with FUA.
pub(crate) fn write_blocks(
    io: &mut DevIo,
    lba: u64,
    buf: &mut SegBuf,
    off: usize,
    len: usize,
    lba_size: u32,
    stop: &AtomicBool,
) -> Result<(), String> {
    let nlb = (len / lba_size as usize) as u32;
    let cmd = IoCommand::with_buf(IoOp::Write, lba, nlb, buf.io(off, len), 0).with_fua();
    match io.run(cmd, Some(buf), stop) {
        Ok(c) if c.status.is_success() => Ok(()),
        Ok(c) => Err(format!("writing journal blocks {lba}+{nlb}: {}", c.status)),
        Err(e) => Err(format!("writing journal blocks {lba}+{nlb}: {e}")),
    }
}

/// Where a journal is, as read from its device.
#[derive(Debug)]
pub(crate) struct Journal {
    pub uuid: Uuid,
    pub lba_size: u32,
    pub ring_end: u64,
}

/// Reads segment `seq` (the next in the chain) at block `at`, or at the ring's start when the
/// writer wrapped there. `Ok(None)` at the end of the chain: no segment `seq` there, or one
/// whose table or payload is damaged (a torn last write, never acknowledged). On success the
/// segment is in `buf` and its records in `iocbs`; returns its start block and header.
/// Without `data` only the header and its table are read and checked (for a segment known
/// durable, whose records are all that is wanted).
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_segment(
    qp: &mut DevIo,
    j: &Journal,
    at: u64,
    seq: u64,
    buf: &mut SegBuf,
    iocbs: &mut Vec<Iocb>,
    stop: &AtomicBool,
    data: bool,
) -> Result<Option<(u64, SegmentHeader)>, String> {
    let bs = j.lba_size as usize;
    let mut found = None;
    for start in [at, RING_START] {
        if start >= j.ring_end || (start == RING_START && found.is_some()) {
            continue;
        }
        read_blocks(qp, start, 1, buf, 0, j.lba_size, stop)?;
        if let Some(h) = SegmentHeader::peek(&buf.bytes()[..bs], j.uuid, seq) {
            found = Some((start, h));
            break;
        }
        if start == RING_START {
            break;
        }
    }
    let Some((start, h)) = found else {
        return Ok(None);
    };
    if start + u64::from(h.total_blocks) > j.ring_end {
        return Ok(None);
    }
    let blocks = if data {
        h.total_blocks
    } else {
        h.header_blocks
    };
    let len = blocks as usize * bs;
    buf.ensure(len);
    if blocks > 1 {
        // The first block is read again with the rest when the buffer had to grow.
        read_blocks(qp, start, blocks, buf, 0, j.lba_size, stop)?;
    }
    let bytes = buf.bytes();
    let hlen = h.header_blocks as usize * bs;
    if h.iocbs(&bytes[..hlen], iocbs).is_none() {
        return Ok(None);
    }
    if !data {
        return Ok(Some((start, h)));
    }
    let mut off = hlen;
    for r in iocbs.iter() {
        let n = r.payload_len(h.data_lba_size);
        if off + n > len || (n > 0 && crc32c::crc32c(&bytes[off..off + n]) != r.crc) {
            return Ok(None);
        }
        off += n;
    }
    Ok(Some((start, h)))
}

/// What opening found.
#[derive(Debug)]
pub(crate) struct Found {
    pub uuid: Uuid,
    pub lba_size: u32,
    pub ring_end: u64,
    /// The durable commit position.
    pub commit: Commit,
    /// The next record's sequence number and where its segment goes.
    pub next_seq: u64,
    pub tail: u64,
    /// Payload bytes of records `1..next_seq`.
    pub bytes: u64,
    pub last_unix_ms: u64,
    /// A record past the commit was journaled during a catch-up (`Iocb::catch_up`).
    pub catch_up: bool,
}

/// Opens (or formats, when blank) the journal on `dev` and walks its chain of segments.
pub(crate) fn recover(dev: &Arc<dyn BlockDevice>, cfg: &JournalConfig) -> Result<Found, String> {
    let geo = dev.geometry();
    let bs = geo.lba_size;
    let stop = AtomicBool::new(false);
    let mut qp = DevIo::new(Arc::clone(dev), 1, cfg.io_timeout.max(OPEN_TIMEOUT));
    qp.qp().map_err(|e| e.to_string())?;
    let seg_len = segment_buffer_len(cfg.max_records, cfg.max_segment_bytes, bs);
    let min_blocks = RING_START + 2 * (seg_len as u64).div_ceil(u64::from(bs));
    if geo.num_blocks < min_blocks {
        return Err(format!(
            "the journal device holds {} blocks; with max_segment_bytes = {} it needs at least {min_blocks}",
            geo.num_blocks, cfg.max_segment_bytes
        ));
    }
    let mut buf = SegBuf::new(seg_len.max(3 * bs as usize));
    read_blocks(&mut qp, 0, 3, &mut buf, 0, bs, &stop)?;
    let bsz = bs as usize;
    let header = match Header::decode(&buf.bytes()[..bsz])? {
        Some(h) => h,
        None if buf.bytes()[..bsz].iter().all(|&b| b == 0) => {
            let h = Header {
                uuid: Uuid::new_random(),
                lba_size: bs,
                blocks: geo.num_blocks,
            };
            let first = Commit {
                counter: 0,
                seq: 0,
                offset: RING_START,
                bytes: 0,
                unix_ms: 0,
            };
            let b = buf.bytes();
            b[..3 * bsz].fill(0);
            h.encode(&mut b[..bsz]);
            first.encode(h.uuid, &mut b[bsz..2 * bsz]);
            write_blocks(&mut qp, 0, &mut buf, 0, 3 * bsz, bs, &stop)?;
            tracing::info!(journal = dev.name(), uuid = %h.uuid, "formatted a blank journal");
            h
        }
        None => {
            return Err(
                "the device is neither a journal nor blank (its first block holds other data)"
                    .into(),
            )
        }
    };
    if header.lba_size != bs || header.blocks != geo.num_blocks {
        return Err(format!(
            "the journal was made on a device of {} blocks of {} bytes; this one has {} of {}",
            header.blocks, header.lba_size, geo.num_blocks, bs
        ));
    }
    let b = buf.bytes();
    let first = COMMIT_BLOCK as usize;
    let commit = [first, first + 1]
        .into_iter()
        .filter_map(|i| Commit::decode(&b[i * bsz..(i + 1) * bsz], header.uuid))
        .max_by_key(|c| c.counter)
        .ok_or("no valid commit block (blocks 1 and 2)")?;
    if commit.offset < RING_START || commit.offset > geo.num_blocks {
        return Err(format!(
            "commit block points at block {}, outside the ring",
            commit.offset
        ));
    }
    let j = Journal {
        uuid: header.uuid,
        lba_size: bs,
        ring_end: geo.num_blocks,
    };
    let (mut seq, mut at, mut bytes, mut last_ms) =
        (commit.seq + 1, commit.offset, commit.bytes, commit.unix_ms);
    let mut iocbs = Vec::new();
    let mut catch_up = false;
    while let Some((start, h)) =
        read_segment(&mut qp, &j, at, seq, &mut buf, &mut iocbs, &stop, true)?
    {
        catch_up |= iocbs.iter().any(|r| r.catch_up);
        seq += u64::from(h.count);
        bytes = h.bytes_before
            + iocbs
                .iter()
                .map(|r| r.payload_len(h.data_lba_size) as u64)
                .sum::<u64>();
        at = start + u64::from(h.total_blocks);
        last_ms = h.unix_ms;
    }
    Ok(Found {
        uuid: header.uuid,
        lba_size: bs,
        ring_end: geo.num_blocks,
        commit,
        next_seq: seq,
        tail: at,
        bytes,
        last_unix_ms: last_ms,
        catch_up,
    })
}
