//! A disk with a volatile write cache, for power-loss tests: a write is acknowledged once it
//! is in the cache and becomes durable only through a Flush, a FUA write or a random
//! eviction; a power cut keeps a random subset of the cached blocks (a torn cache, at block
//! granularity) and drops the rest. Commands fail while the power is off; queue pairs opened
//! before work again after it, as an NVMe/TCP initiator's queue pairs come back on a new
//! association, and a disk made [`remote`](CachedDisk::remote) reports that association's
//! generation as such a device does.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use nvmirror_nvme::{
    BlockDevice, Completion, Geometry, IoCommand, IoOp, QueuePair, Status, SubmitError,
};

/// A small deterministic generator (xorshift64*), so a failing cut can be replayed by seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The medium and the volatile cache of one disk.
#[derive(Debug)]
struct Media {
    lba: u32,
    durable: Vec<u8>,
    /// Latest cached contents per block, not yet on the medium.
    cache: BTreeMap<u64, Vec<u8>>,
    powered: bool,
    /// Bumped by every power cut (the association the disk is reached by is new).
    generation: u64,
    rng: Rng,
}

impl Media {
    fn block(&self, lba: u64) -> &[u8] {
        let bs = self.lba as usize;
        let at = lba as usize * bs;
        self.cache
            .get(&lba)
            .map_or(&self.durable[at..at + bs], |b| &b[..])
    }

    fn persist(&mut self, lba: u64, data: &[u8]) {
        let bs = self.lba as usize;
        let at = lba as usize * bs;
        self.durable[at..at + bs].copy_from_slice(data);
    }

    fn flush(&mut self) {
        for (lba, data) in std::mem::take(&mut self.cache) {
            self.persist(lba, &data);
        }
    }

    /// The cache writes one block back on its own.
    fn maybe_evict(&mut self) {
        if self.cache.is_empty() || !self.rng.chance(30) {
            return;
        }
        let nth = self.rng.below(self.cache.len() as u64) as usize;
        let lba = *self.cache.keys().nth(nth).expect("nth < len");
        let data = self.cache.remove(&lba).expect("present");
        self.persist(lba, &data);
    }
}

/// A disk with a volatile write cache.
#[derive(Debug)]
pub struct CachedDisk {
    name: String,
    remote: bool,
    geo: Geometry,
    media: Arc<Mutex<Media>>,
}

impl CachedDisk {
    /// A blank disk of `bytes` in blocks of `lba` bytes; `seed` drives its evictions and
    /// what a power cut keeps.
    pub fn new(name: String, seed: u64, lba: u32, bytes: u64) -> Self {
        Self {
            name,
            remote: false,
            geo: Geometry {
                lba_size: lba,
                num_blocks: bytes / u64::from(lba),
            },
            media: Arc::new(Mutex::new(Media {
                lba,
                durable: vec![0; bytes as usize],
                cache: BTreeMap::new(),
                powered: true,
                generation: 0,
                rng: Rng::new(seed),
            })),
        }
    }

    /// A disk reached over a link: [`BlockDevice::link`] reports its power as the connection
    /// and counts power cuts as reconnections.
    pub fn remote(mut self) -> Self {
        self.remote = true;
        self
    }

    /// What the medium holds (the image a power cut now would leave, less the cached
    /// blocks that would make it).
    pub fn durable(&self) -> Vec<u8> {
        self.media.lock().unwrap().durable.clone()
    }

    /// Power fails: each cached block reaches the medium or not (torn), the rest is lost,
    /// and every command from now on fails until [`power_on`](Self::power_on).
    pub fn cut_power(&self) {
        let mut m = self.media.lock().unwrap();
        for (lba, data) in std::mem::take(&mut m.cache) {
            if m.rng.chance(50) {
                m.persist(lba, &data);
            }
        }
        m.powered = false;
        m.generation += 1;
    }

    pub fn power_on(&self) {
        self.media.lock().unwrap().powered = true;
    }
}

impl BlockDevice for CachedDisk {
    fn geometry(&self) -> Geometry {
        self.geo
    }

    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        Ok(Box::new(CachedQueuePair {
            geo: self.geo,
            media: Arc::clone(&self.media),
            depth,
            done: VecDeque::new(),
        }))
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn link(&self) -> Option<nvmirror_nvme::LinkStatus> {
        let m = self.media.lock().unwrap();
        self.remote.then(|| nvmirror_nvme::LinkStatus {
            connected: m.powered,
            generation: m.generation + 1,
            ..Default::default()
        })
    }
}

#[derive(Debug)]
struct CachedQueuePair {
    geo: Geometry,
    media: Arc<Mutex<Media>>,
    depth: u32,
    done: VecDeque<Completion>,
}

impl CachedQueuePair {
    /// # Safety
    /// `cmd.buf` as the submit contract promises it.
    unsafe fn execute(&self, cmd: &IoCommand) -> Status {
        if let Err(s) = cmd.check(&self.geo) {
            return s;
        }
        let mut m = self.media.lock().unwrap();
        if !m.powered {
            return Status::HOST_PATHING_ERROR;
        }
        let bs = self.geo.lba_size as usize;
        match cmd.op {
            IoOp::Flush => m.flush(),
            IoOp::Read => {
                for i in 0..cmd.nlb as usize {
                    let src = m.block(cmd.slba + i as u64).as_ptr();
                    // SAFETY: `check` proved the buffer holds `nlb` blocks; the caller keeps
                    // it valid and untouched until the completion is reaped.
                    unsafe { std::ptr::copy_nonoverlapping(src, cmd.buf.as_ptr().add(i * bs), bs) };
                }
            }
            IoOp::Write | IoOp::WriteZeroes | IoOp::Deallocate => {
                for i in 0..cmd.nlb as usize {
                    let lba = cmd.slba + i as u64;
                    let data = if cmd.op == IoOp::Write {
                        // SAFETY: as for reads; a write's buffer is only read.
                        unsafe { std::slice::from_raw_parts(cmd.buf.as_ptr().add(i * bs), bs) }
                            .to_vec()
                    } else {
                        vec![0; bs]
                    };
                    if cmd.wants_fua() {
                        m.cache.remove(&lba);
                        m.persist(lba, &data);
                    } else {
                        m.cache.insert(lba, data);
                    }
                }
                m.maybe_evict();
            }
        }
        Status::SUCCESS
    }
}

impl QueuePair for CachedQueuePair {
    fn depth(&self) -> u32 {
        self.depth
    }

    fn outstanding(&self) -> u32 {
        self.done.len() as u32
    }

    unsafe fn submit(&mut self, cmd: IoCommand) -> Result<(), SubmitError> {
        if self.outstanding() >= self.depth {
            return Err(SubmitError::QueueFull);
        }
        // SAFETY: forwarded from our caller's promise.
        let status = unsafe { self.execute(&cmd) };
        self.done.push_back(Completion {
            tag: cmd.tag,
            status,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let n = out.len().min(self.done.len());
        for (o, c) in out.iter_mut().zip(self.done.drain(..n)) {
            *o = c;
        }
        n
    }
}
