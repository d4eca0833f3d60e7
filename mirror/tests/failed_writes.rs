//! Writes that fail or time out on every in-sync leg (docs/mirror.md, ack rule): the legs
//! may differ in their regions afterwards, so the regions stay marked until reconciled, and a
//! host retry is never overtaken by the abandoned original.

mod bitmap_rig;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitmap_rig::{raw_read, raw_write, LBA};
use nvmirror_mirror::{Volume, VolumeConfig};
use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice, OpFilter};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{
    read_all, BlockDevice, Completion, Geometry, IoCommand, IoOp, QueuePair, Status, SubmitError,
};

const REGION: u64 = 64 << 10;

fn mem(name: &str) -> Arc<dyn BlockDevice> {
    Arc::new(
        MemDevice::new(4 << 20, LBA, LatencyModel::None)
            .unwrap()
            .with_name(name.to_string()),
    )
}

/// Submits one command and polls until it completes (or `limit` passes: `None`).
fn run(qp: &mut dyn QueuePair, cmd: IoCommand, limit: Duration) -> Option<Status> {
    // SAFETY: the callers' buffers outlive this call, and a command that does not complete
    // within `limit` keeps its buffer alive in the caller until the test ends.
    unsafe { qp.submit(cmd) }.unwrap();
    wait(qp, cmd.tag, limit)
}

fn wait(qp: &mut dyn QueuePair, tag: u64, limit: Duration) -> Option<Status> {
    let start = Instant::now();
    let mut cpl = [Completion::default(); 8];
    while start.elapsed() < limit {
        let n = qp.poll(&mut cpl);
        if let Some(c) = cpl[..n].iter().find(|c| c.tag == tag) {
            return Some(c.status);
        }
        std::thread::yield_now();
    }
    None
}

/// A persistent volume named `name` over two fault-injecting mem legs; with the first data LBA.
fn two_faulty_legs(name: &str) -> (Vec<Arc<FaultyDevice>>, Volume, u64) {
    let faults: Vec<Arc<FaultyDevice>> = (0..2)
        .map(|i| Arc::new(FaultyDevice::wrap(mem(&format!("mem://{name}{i}")))))
        .collect();
    let devs: Vec<Arc<dyn BlockDevice>> = faults
        .iter()
        .map(|f| Arc::clone(f) as Arc<dyn BlockDevice>)
        .collect();
    let cfg = VolumeConfig {
        region_size: REGION,
        ..VolumeConfig::default()
    };
    let vol = Volume::format(name, devs, cfg, false).unwrap();
    let data_lba = vol.metadata_layout().unwrap().data_offset / u64::from(LBA);
    (faults, vol, data_lba)
}

/// Writes to `[slba, slba + nlb)` of every leg (device LBAs) fail with Write Fault.
fn fail_writes_on_every_leg(faults: &[Arc<FaultyDevice>], slba: u64, nlb: u32) {
    for f in faults {
        f.injector().arm(Fault::FailRange {
            ops: OpFilter::Writes,
            slba,
            nlb: u64::from(nlb),
            status: Status::WRITE_FAULT,
        });
    }
}

#[test]
fn a_write_failed_on_every_leg_stays_marked_until_reconciled() {
    let (faults, vol, data_lba) = two_faulty_legs("fw");
    let mut qp = vol.open_qpair(8).unwrap();
    // Region 3 of the namespace fails on both legs...
    let slba = 3 * REGION / u64::from(LBA);
    fail_writes_on_every_leg(&faults, data_lba + slba, 8);
    // ...although the primary applied it (a failed write may have changed the medium).
    let mut applied = vec![0xa5u8; 8 * LBA as usize];
    raw_write(
        &**faults[0].inner(),
        (data_lba + slba) * u64::from(LBA),
        &mut applied,
    );
    let mut buf = vec![0xa5u8; 8 * LBA as usize];
    let cmd = IoCommand::with_buf(IoOp::Write, slba, 8, IoBuf::from_slice(&mut buf), 1);
    let status = run(&mut *qp, cmd, Duration::from_secs(5)).expect("completes");
    assert!(
        !status.is_success(),
        "a write failed on every leg is an error"
    );
    assert_eq!(vol.unreconciled_regions(), vec![3]);

    // The clearer leaves it alone however idle it is.
    let idle = Instant::now() + Duration::from_secs(3600);
    for i in 0..3 {
        vol.clear_idle_regions(idle + Duration::from_secs(10 * i))
            .unwrap();
    }
    assert!(vol.region_marked(3), "an unreconciled region was cleared");

    for f in &faults {
        f.injector().clear_all();
    }
    assert_eq!(vol.reconcile_failed_writes().unwrap(), 1);
    assert!(vol.unreconciled_regions().is_empty());
    let l = vol.metadata_layout().unwrap();
    let range = l.data_offset as usize..(l.data_offset + l.data_blocks * u64::from(LBA)) as usize;
    let a = read_all(&*vol.leg_device(0).unwrap()).unwrap();
    let b = read_all(&*vol.leg_device(1).unwrap()).unwrap();
    assert!(
        a[range.clone()] == b[range],
        "legs differ after the reconcile"
    );
    // Reconciled: now the clearer may clear it (a region kept by one pass counts as touched
    // in that epoch, so it goes at the next).
    let later = Instant::now() + Duration::from_secs(7200);
    for i in 0..3 {
        vol.clear_idle_regions(later + Duration::from_secs(10 * i))
            .unwrap();
    }
    assert!(!vol.region_marked(3));
}

/// Holds the first write submitted while armed until released, then hands it on: a leg that
/// answers one command very late and others at once.
#[derive(Debug)]
struct HoldFirstWrite {
    inner: Arc<dyn BlockDevice>,
    /// 0 idle, 1 armed, 2 holding, 3 released.
    state: Arc<AtomicU8>,
}

impl BlockDevice for HoldFirstWrite {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        Ok(Box::new(HoldQueuePair {
            inner: self.inner.open_qpair(depth)?,
            state: Arc::clone(&self.state),
            held: None,
        }))
    }

    fn name(&self) -> &str {
        self.inner.name()
    }
}

#[derive(Debug)]
struct HoldQueuePair {
    inner: Box<dyn QueuePair>,
    state: Arc<AtomicU8>,
    held: Option<IoCommand>,
}

impl QueuePair for HoldQueuePair {
    fn depth(&self) -> u32 {
        self.inner.depth()
    }

    fn outstanding(&self) -> u32 {
        self.inner.outstanding() + u32::from(self.held.is_some())
    }

    unsafe fn submit(&mut self, cmd: IoCommand) -> Result<(), SubmitError> {
        if cmd.op == IoOp::Write
            && self
                .state
                .compare_exchange(1, 2, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.held = Some(cmd);
            return Ok(());
        }
        // SAFETY: forwarded from our caller's promise.
        unsafe { self.inner.submit(cmd) }
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if self.state.load(Ordering::Acquire) == 3 {
            if let Some(cmd) = self.held.take() {
                // SAFETY: submitted to us under the submit contract, not completed yet.
                unsafe { self.inner.submit(cmd) }.unwrap();
            }
        }
        self.inner.poll(out)
    }
}

#[test]
fn a_retry_after_a_timeout_is_not_overtaken_by_the_late_original() {
    let state = Arc::new(AtomicU8::new(0));
    let leg0 = mem("mem://late0");
    let devs: Vec<Arc<dyn BlockDevice>> = vec![
        Arc::new(HoldFirstWrite {
            inner: Arc::clone(&leg0),
            state: Arc::clone(&state),
        }),
        mem("mem://late1"),
    ];
    let cfg = VolumeConfig {
        io_timeout: Duration::from_millis(100),
        ..VolumeConfig::default()
    };
    let vol = Volume::new("late", devs, cfg).unwrap();
    // Degraded: leg 0 is the only leg in sync.
    vol.fault_leg(1).unwrap();
    let mut qp = vol.open_qpair(8).unwrap();

    state.store(1, Ordering::Release);
    let mut w = vec![1u8; 8 * LBA as usize];
    let cmd = IoCommand::with_buf(IoOp::Write, 0, 8, IoBuf::from_slice(&mut w), 1);
    let status = run(&mut *qp, cmd, Duration::from_secs(5)).expect("the timeout answers");
    assert_eq!(status, Status::ABORTED_BY_HOST);

    // The host retries with new data while W is still queued on the leg.
    let mut w2 = vec![2u8; 8 * LBA as usize];
    let retry = IoCommand::with_buf(IoOp::Write, 0, 8, IoBuf::from_slice(&mut w2), 2);
    let early = run(&mut *qp, retry, Duration::from_millis(50));
    // The leg applies W late; then W2 may go.
    state.store(3, Ordering::Release);
    let status = early.or_else(|| wait(&mut *qp, 2, Duration::from_secs(5)));
    assert_eq!(status, Some(Status::SUCCESS));
    assert_eq!(
        early, None,
        "the retry went to the leg before the original was reaped"
    );
    drop(qp);
    let mut got = vec![0u8; 8 * LBA as usize];
    raw_read(&*leg0, 0, &mut got);
    assert!(
        got.iter().all(|&b| b == 2),
        "the late original overwrote the retry"
    );
}

#[test]
fn a_repairing_verify_reconciles_failed_writes_before_it_reports() {
    let (faults, vol, data_lba) = two_faulty_legs("vr");
    let mut qp = vol.open_qpair(8).unwrap();
    let slba = 5 * REGION / u64::from(LBA);
    fail_writes_on_every_leg(&faults, data_lba + slba, 8);
    let mut buf = vec![0x3cu8; 8 * LBA as usize];
    let cmd = IoCommand::with_buf(IoOp::Write, slba, 8, IoBuf::from_slice(&mut buf), 1);
    let status = run(&mut *qp, cmd, Duration::from_secs(5)).expect("completes");
    assert!(!status.is_success());
    assert_eq!(vol.unreconciled_regions(), vec![5]);
    for f in &faults {
        f.injector().clear_all();
    }
    drop(qp);
    let done = vol.verify_start(true).unwrap().run().join().unwrap();
    assert!(done.mismatched_regions.is_empty(), "{done:?}");
    assert!(
        vol.unreconciled_regions().is_empty(),
        "the repair reported clean over a write that failed on every leg"
    );
}
