//! A recording leg for the write-intent tests: it forwards every command to a mem device
//! and keeps, per leg, a model of the on-disk bitmap (updated when a bitmap page write
//! *completes*) and the data writes in flight. A data write submitted for a region whose bit
//! is not in the model, or a completed page write that clears a bit while a data write to
//! that region is in flight, is a violation.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvmirror_mirror::bitmap::MetadataLayout;
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{BlockDevice, Completion, Geometry, IoCommand, IoOp, QueuePair, SubmitError};

pub const LBA: u32 = 512;

/// What a recording leg saw.
#[derive(Debug, Default)]
pub struct Record {
    /// Layout, set once the volume is formatted.
    pub layout: Option<MetadataLayout>,
    /// The on-disk bitmap as of the last completed page writes.
    pub bits: Vec<u8>,
    /// Data writes in flight per region.
    pub inflight: HashMap<u64, u32>,
    pub violations: Vec<String>,
    pub meta_writes: u64,
    pub data_writes: u64,
}

#[derive(Debug)]
pub struct RecordingLeg {
    inner: Arc<dyn BlockDevice>,
    pub rec: Arc<Mutex<Record>>,
    name: String,
}

impl RecordingLeg {
    pub fn new(name: &str, bytes: u64, latency: LatencyModel) -> Arc<Self> {
        let mem = MemDevice::new(bytes, LBA, latency)
            .unwrap()
            .with_name(name.to_string());
        Arc::new(Self {
            inner: Arc::new(mem),
            rec: Arc::new(Mutex::new(Record::default())),
            name: name.to_string(),
        })
    }

    /// Starts checking against `layout` (after format/open wrote the initial metadata);
    /// `bits` is the on-disk bitmap at that point.
    pub fn watch(&self, layout: MetadataLayout, bits: Vec<u8>) {
        let mut r = self.rec.lock().unwrap();
        r.layout = Some(layout);
        r.bits = bits;
    }

    pub fn violations(&self) -> Vec<String> {
        self.rec.lock().unwrap().violations.clone()
    }

    pub fn meta_writes(&self) -> u64 {
        self.rec.lock().unwrap().meta_writes
    }

    pub fn data_writes(&self) -> u64 {
        self.rec.lock().unwrap().data_writes
    }
}

impl BlockDevice for RecordingLeg {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        Ok(Box::new(RecordingQp {
            inner: self.inner.open_qpair(depth)?,
            rec: Arc::clone(&self.rec),
            pending: HashMap::new(),
            next: 0,
        }))
    }
    fn name(&self) -> &str {
        &self.name
    }
}

enum Pending {
    Meta { offset: u64, bytes: Vec<u8> },
    Data { first: u64, last: u64 },
    Other,
}

#[derive(Debug)]
struct RecordingQp {
    inner: Box<dyn QueuePair>,
    rec: Arc<Mutex<Record>>,
    /// Our tag → (caller's tag, what it was).
    #[allow(clippy::type_complexity)]
    pending: HashMap<u64, (u64, PendingBox)>,
    next: u64,
}

#[derive(Debug)]
struct PendingBox(Box<Pending>);

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("pending")
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn bit(bits: &[u8], r: u64) -> bool {
    bits.get((r / 8) as usize)
        .is_some_and(|b| b & (1 << (r % 8)) != 0)
}

impl QueuePair for RecordingQp {
    fn depth(&self) -> u32 {
        self.inner.depth()
    }
    fn outstanding(&self) -> u32 {
        self.inner.outstanding()
    }
    unsafe fn submit(&mut self, cmd: IoCommand) -> Result<(), SubmitError> {
        let what = {
            let mut r = self.rec.lock().unwrap();
            match r.layout {
                Some(l) if cmd.op.modifies() => {
                    let start = cmd.slba * u64::from(LBA);
                    if start < l.data_offset {
                        r.meta_writes += 1;
                        let len = cmd.nlb as usize * LBA as usize;
                        // SAFETY: the caller keeps the write's buffer alive and unchanged until
                        // its completion; we only read it here.
                        let bytes =
                            unsafe { std::slice::from_raw_parts(cmd.buf.as_ptr(), len) }.to_vec();
                        Pending::Meta {
                            offset: start,
                            bytes,
                        }
                    } else {
                        r.data_writes += 1;
                        let first = (start - l.data_offset) / l.region_size;
                        let last = (start - l.data_offset + u64::from(cmd.nlb) * u64::from(LBA)
                            - 1)
                            / l.region_size;
                        for reg in first..=last {
                            if !bit(&r.bits, reg) {
                                let v = format!(
                                    "data write to region {reg} (#{}) before its bit was on disk",
                                    SEQ.fetch_add(1, Ordering::Relaxed)
                                );
                                r.violations.push(v);
                            }
                            *r.inflight.entry(reg).or_default() += 1;
                        }
                        Pending::Data { first, last }
                    }
                }
                _ => Pending::Other,
            }
        };
        let tag = self.next;
        self.next += 1;
        let inner = IoCommand { tag, ..cmd };
        // SAFETY: forwarded under the caller's own promise for `cmd.buf`.
        match unsafe { self.inner.submit(inner) } {
            Ok(()) => {
                self.pending
                    .insert(tag, (cmd.tag, PendingBox(Box::new(what))));
                Ok(())
            }
            Err(e) => {
                if let Pending::Data { first, last } = what {
                    let mut r = self.rec.lock().unwrap();
                    for reg in first..=last {
                        *r.inflight.get_mut(&reg).unwrap() -= 1;
                    }
                }
                Err(e)
            }
        }
    }
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let n = self.inner.poll(out);
        for c in out.iter_mut().take(n) {
            let (tag, what) = self.pending.remove(&c.tag).expect("a tag we issued");
            c.tag = tag;
            let mut r = self.rec.lock().unwrap();
            match *what.0 {
                Pending::Meta { offset, bytes } if c.status.is_success() => {
                    let l = r.layout.unwrap();
                    if offset >= l.bitmap_offset {
                        let at = (offset - l.bitmap_offset) as usize;
                        let end = (at + bytes.len()).min(r.bits.len());
                        for i in at..end {
                            let new = bytes[i - at];
                            let cleared = r.bits[i] & !new;
                            for b in 0..8 {
                                let reg = i as u64 * 8 + b;
                                if cleared & (1 << b) != 0
                                    && r.inflight.get(&reg).copied().unwrap_or(0) > 0
                                {
                                    r.violations.push(format!(
                                        "region {reg} cleared with a write in flight"
                                    ));
                                }
                            }
                            r.bits[i] = new;
                        }
                    }
                }
                Pending::Data { first, last } => {
                    for reg in first..=last {
                        *r.inflight.get_mut(&reg).unwrap() -= 1;
                    }
                }
                _ => {}
            }
        }
        n
    }
}

/// Writes `data` at byte `offset` of `dev` (bypassing any volume).
pub fn raw_write(dev: &dyn BlockDevice, offset: u64, data: &mut [u8]) {
    raw_io(dev, IoOp::Write, offset, data);
}

/// Reads `data.len()` bytes at byte `offset` of `dev`.
pub fn raw_read(dev: &dyn BlockDevice, offset: u64, data: &mut [u8]) {
    raw_io(dev, IoOp::Read, offset, data);
}

fn raw_io(dev: &dyn BlockDevice, op: IoOp, offset: u64, data: &mut [u8]) {
    let shift = dev.geometry().lba_shift();
    let mut qp = dev.open_qpair(1).unwrap();
    let nlb = (data.len() >> shift) as u32;
    let buf = IoBuf::from_slice(data);
    // SAFETY: `data` outlives the command, reaped below.
    unsafe { qp.submit(IoCommand::with_buf(op, offset >> shift, nlb, buf, 0)) }.unwrap();
    let mut c = [Completion::default()];
    while qp.poll(&mut c) == 0 {}
    assert!(c[0].status.is_success(), "{:?}", c[0].status);
}

/// Runs `cmds` writes through `qp` with up to `depth` in flight; every one must succeed.
pub fn run_writes(qp: &mut dyn QueuePair, writes: &[(u64, u32)], depth: usize, fill: u8) {
    let max_nlb = writes.iter().map(|w| w.1).max().unwrap_or(1) as usize;
    let mut bufs: Vec<Vec<u8>> = (0..depth)
        .map(|_| vec![fill; max_nlb * LBA as usize])
        .collect();
    let mut free: Vec<usize> = (0..depth).collect();
    let mut next = 0;
    let mut done = 0;
    let mut cpl = vec![Completion::default(); depth];
    while done < writes.len() {
        while next < writes.len() {
            let Some(b) = free.pop() else { break };
            let (slba, nlb) = writes[next];
            let buf = IoBuf::from_slice(&mut bufs[b][..nlb as usize * LBA as usize]);
            // SAFETY: `bufs` outlives every command; a buffer is reused only after its
            // completion.
            match unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, slba, nlb, buf, b as u64)) } {
                Ok(()) => next += 1,
                Err(_) => {
                    free.push(b);
                    break;
                }
            }
        }
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            assert!(c.status.is_success(), "{:?}", c.status);
            free.push(c.tag as usize);
            done += 1;
        }
    }
}
