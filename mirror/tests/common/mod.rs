//! A test rig: a volume over fault-injectable mem legs, one host queue pair, and a model of
//! every acknowledged write.
#![allow(dead_code)]

pub mod cached_disk;
pub mod delayed;
pub mod far_site;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_mirror::{LegState, Volume, VolumeConfig};
use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{read_all, BlockDevice, Completion, IoCommand, IoOp, QueuePair, Status};

pub const LBA: usize = 512;
pub const VOLUME_BYTES: u64 = 4 << 20;

/// Waits up to 10 s for `f` to hold; fails the test with `what` if it never does.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub struct Rig {
    pub vol: Arc<Volume>,
    pub faults: Vec<Arc<FaultyDevice>>,
    pub qp: Box<dyn QueuePair>,
    /// Expected bytes of every acknowledged write (None: never acknowledged).
    model: Vec<Option<u8>>,
    /// Buffers of every command: kept alive because an abandoned leg command may still
    /// touch its buffer after the host completion.
    keep: Vec<Vec<u8>>,
    /// Submitted commands not yet completed: tag → (command, index into `keep`).
    inflight: HashMap<u64, (IoCommand, usize)>,
    /// Completions reaped, by tag.
    done: HashMap<u64, Status>,
    next_tag: u64,
}

/// Deterministic content for a write.
pub fn pattern(slba: u64, nlb: u32, seed: u8) -> Vec<u8> {
    (0..nlb as usize * LBA)
        .map(|i| (i as u64 * 31 + slba * 7 + u64::from(seed) * 131 % 251) as u8 ^ seed)
        .collect()
}

impl Rig {
    pub fn new(legs: usize, cfg: VolumeConfig) -> Self {
        Self::with_latency(legs, cfg, LatencyModel::None)
    }

    pub fn with_latency(legs: usize, cfg: VolumeConfig, latency: LatencyModel) -> Self {
        let faults: Vec<Arc<FaultyDevice>> = (0..legs)
            .map(|i| {
                let mem = MemDevice::new(VOLUME_BYTES, LBA as u32, latency)
                    .unwrap()
                    .with_name(format!("mem://leg{i}"));
                Arc::new(FaultyDevice::wrap(Arc::new(mem)))
            })
            .collect();
        let devs = faults
            .iter()
            .map(|f| Arc::clone(f) as Arc<dyn BlockDevice>)
            .collect();
        let vol = Arc::new(Volume::new("vol", devs, cfg).unwrap());
        let qp = vol.open_qpair(32).unwrap();
        Self {
            vol,
            faults,
            qp,
            model: vec![None; VOLUME_BYTES as usize],
            keep: Vec::new(),
            inflight: HashMap::new(),
            done: HashMap::new(),
            next_tag: 1,
        }
    }

    pub fn arm(&self, leg: usize, fault: Fault) -> u64 {
        self.faults[leg].injector().arm(fault)
    }

    pub fn clear(&self, leg: usize, id: u64) {
        assert!(self.faults[leg].injector().clear(id));
    }

    /// Submits a command with a buffer of `data` (empty for no data); returns its tag.
    pub fn submit(&mut self, op: IoOp, slba: u64, nlb: u32, data: Vec<u8>) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.keep.push(data);
        let idx = self.keep.len() - 1;
        let buf = if self.keep[idx].is_empty() {
            IoBuf::EMPTY
        } else {
            IoBuf::from_slice(&mut self.keep[idx])
        };
        let cmd = IoCommand::with_buf(op, slba, nlb, buf, tag);
        // SAFETY: the buffer lives in `keep` until the rig is dropped.
        unsafe { self.qp.submit(cmd) }.expect("volume queue has room");
        self.inflight.insert(tag, (cmd, idx));
        tag
    }

    pub fn submit_write(&mut self, slba: u64, nlb: u32, seed: u8) -> u64 {
        self.submit(IoOp::Write, slba, nlb, pattern(slba, nlb, seed))
    }

    /// Polls once; records completions and updates the model for acknowledged writes.
    pub fn poll_once(&mut self) -> usize {
        let mut cpl = [Completion::default(); 16];
        let n = self.qp.poll(&mut cpl);
        for c in &cpl[..n] {
            let (cmd, idx) = self
                .inflight
                .remove(&c.tag)
                .unwrap_or_else(|| panic!("completion for unknown or completed tag {}", c.tag));
            assert!(
                self.done.insert(c.tag, c.status).is_none(),
                "tag {} completed twice",
                c.tag
            );
            if c.status.is_success() {
                let off = cmd.slba as usize * LBA;
                let len = cmd.nlb as usize * LBA;
                match cmd.op {
                    IoOp::Write => {
                        for (m, &b) in self.model[off..off + len].iter_mut().zip(&self.keep[idx]) {
                            *m = Some(b);
                        }
                    }
                    IoOp::WriteZeroes | IoOp::Deallocate => {
                        self.model[off..off + len].fill(Some(0));
                    }
                    _ => {}
                }
            }
        }
        n
    }

    /// Polls until `tag` completes (panics after 10 s).
    pub fn wait(&mut self, tag: u64) -> Status {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.done.get(&tag) {
                return *s;
            }
            assert!(Instant::now() < deadline, "tag {tag} never completed");
            self.poll_once();
        }
    }

    /// Polls until nothing is in flight; returns the statuses by tag.
    pub fn wait_all(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.inflight.is_empty() {
            assert!(Instant::now() < deadline, "commands never completed");
            self.poll_once();
        }
    }

    pub fn status(&self, tag: u64) -> Option<Status> {
        self.done.get(&tag).copied()
    }

    /// Polls for `d`; asserts that no host completion shows up.
    pub fn pump_expecting_nothing(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            assert_eq!(self.poll_once(), 0, "unexpected host completion");
        }
    }

    /// Polls until leg `leg` has seen `n` late completions (panics after 5 s); asserts that no
    /// host completion shows up meanwhile.
    pub fn pump_until_late_completions(&mut self, leg: usize, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.vol.stats().legs[leg].late_completions < n {
            assert!(Instant::now() < deadline, "late completion never arrived");
            assert_eq!(self.poll_once(), 0, "unexpected host completion");
        }
        assert_eq!(self.vol.stats().legs[leg].late_completions, n);
        self.pump_expecting_nothing(Duration::from_millis(5));
    }

    pub fn write(&mut self, slba: u64, nlb: u32, seed: u8) -> Status {
        let tag = self.submit_write(slba, nlb, seed);
        self.wait(tag)
    }

    pub fn op(&mut self, op: IoOp, slba: u64, nlb: u32) -> Status {
        let tag = self.submit(op, slba, nlb, Vec::new());
        self.wait(tag)
    }

    pub fn read(&mut self, slba: u64, nlb: u32) -> (Status, Vec<u8>) {
        let tag = self.submit(IoOp::Read, slba, nlb, vec![0xee; nlb as usize * LBA]);
        let status = self.wait(tag);
        let idx = self.keep.len() - 1;
        (status, self.keep[idx].clone())
    }

    pub fn states(&self) -> Vec<LegState> {
        self.vol.leg_states().iter().map(|l| l.state).collect()
    }

    /// The expected bytes of `[slba, slba + nlb)` from acknowledged writes (unknown → 0).
    pub fn expected(&self, slba: u64, nlb: u32) -> Vec<u8> {
        let off = slba as usize * LBA;
        self.model[off..off + nlb as usize * LBA]
            .iter()
            .map(|b| b.unwrap_or(0))
            .collect()
    }

    /// Every acknowledged write is present on every in-sync leg. Returns how many legs
    /// were checked.
    pub fn assert_acked_writes_on_in_sync_legs(&self) -> usize {
        let mut checked = 0;
        for (leg, state) in self.states().into_iter().enumerate() {
            if state != LegState::InSync {
                continue;
            }
            let data = read_all(&**self.faults[leg].inner()).unwrap();
            for (i, (want, got)) in self.model.iter().zip(&data).enumerate() {
                if let Some(w) = want {
                    assert_eq!(
                        w,
                        got,
                        "leg {leg} differs at byte {i} (LBA {}) from an acknowledged write",
                        i / LBA
                    );
                }
            }
            checked += 1;
        }
        assert!(checked > 0, "no in-sync leg left");
        checked
    }

    /// Raw bytes of one leg (bypassing faults).
    pub fn leg_bytes(&self, leg: usize, slba: u64, nlb: u32) -> Vec<u8> {
        let data = read_all(&**self.faults[leg].inner()).unwrap();
        let off = slba as usize * LBA;
        data[off..off + nlb as usize * LBA].to_vec()
    }
}

/// A config with a short I/O timeout, for hang tests.
pub fn short_timeout() -> VolumeConfig {
    VolumeConfig {
        io_timeout: Duration::from_millis(50),
        ..VolumeConfig::default()
    }
}

/// A device whose `open_qpair` fails while `refuse` is set.
#[derive(Debug)]
pub struct RefusingDevice {
    pub inner: Arc<dyn BlockDevice>,
    pub refuse: std::sync::atomic::AtomicBool,
}

impl BlockDevice for RefusingDevice {
    fn geometry(&self) -> nvmirror_nvme::Geometry {
        self.inner.geometry()
    }

    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(nvmirror_nvme::Error::QueuePair("refused".into()));
        }
        self.inner.open_qpair(depth)
    }

    fn name(&self) -> &str {
        self.inner.name()
    }
}
