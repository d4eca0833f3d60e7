//! Abandoned leg commands are cancelled and fenced (docs/mirror.md, "Abandoned commands"): a
//! leg whose timed-out command its back end cancels is free at once; a leg whose commands a
//! back end still holds after its queue pair closed, or a resync window that timed out, stays
//! busy — attaching it is refused — until the command is reaped or fenced.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmirror_mirror::{Error, JobState, LegState, Volume, VolumeConfig};
use nvmirror_nvme::backend::{Fault, FaultyDevice, LatencyModel, MemDevice, OpFilter};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{
    read_all, BlockDevice, Completion, Fence, FenceSignal, Geometry, IoCommand, IoOp, QueuePair,
    Status, SubmitError,
};

const LBA: u32 = 512;

fn mem(name: &str) -> Arc<dyn BlockDevice> {
    Arc::new(
        MemDevice::new(4 << 20, LBA, LatencyModel::None)
            .unwrap()
            .with_name(name.to_string()),
    )
}

fn timeout(ms: u64) -> VolumeConfig {
    VolumeConfig {
        io_timeout: Duration::from_millis(ms),
        ..VolumeConfig::default()
    }
}

/// Polls until `tag` completes or `limit` passes (`None`).
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

/// Polls `qp` for `d` (late completions, cancels), discarding what completes.
fn spin(qp: &mut dyn QueuePair, d: Duration) {
    let start = Instant::now();
    let mut cpl = [Completion::default(); 8];
    while start.elapsed() < d {
        qp.poll(&mut cpl);
        std::thread::yield_now();
    }
}

/// A back end that cannot cancel: writes are held while `stall` is set, and a queue pair
/// closed with held writes leaves them to a "reaper" — the test, which ends them by firing
/// the signals it finds in `reaper`.
#[derive(Debug, Default)]
struct Stall {
    stall: AtomicBool,
    /// Writes held so far.
    held: AtomicU32,
    reaper: Mutex<Vec<FenceSignal>>,
}

impl Stall {
    fn reap_all(&self) -> usize {
        let signals = std::mem::take(&mut *self.reaper.lock().unwrap());
        let n = signals.len();
        signals.into_iter().for_each(FenceSignal::signal);
        n
    }
}

#[derive(Debug)]
struct StallDevice {
    inner: Arc<dyn BlockDevice>,
    stall: Arc<Stall>,
}

impl BlockDevice for StallDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        Ok(Box::new(StallQueuePair {
            inner: self.inner.open_qpair(depth)?,
            stall: Arc::clone(&self.stall),
            held: Vec::new(),
        }))
    }

    fn name(&self) -> &str {
        self.inner.name()
    }
}

#[derive(Debug)]
struct StallQueuePair {
    inner: Box<dyn QueuePair>,
    stall: Arc<Stall>,
    held: Vec<IoCommand>,
}

impl QueuePair for StallQueuePair {
    fn depth(&self) -> u32 {
        self.inner.depth()
    }

    fn outstanding(&self) -> u32 {
        self.inner.outstanding() + self.held.len() as u32
    }

    unsafe fn submit(&mut self, cmd: IoCommand) -> Result<(), SubmitError> {
        if cmd.op == IoOp::Write && self.stall.stall.load(Ordering::Acquire) {
            self.stall.held.fetch_add(1, Ordering::AcqRel);
            self.held.push(cmd);
            return Ok(());
        }
        // SAFETY: forwarded from our caller's promise.
        unsafe { self.inner.submit(cmd) }
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        self.inner.poll(out)
    }

    fn close(self: Box<Self>) -> Fence {
        if self.held.is_empty() {
            return self.inner.close();
        }
        let (fence, signal) = Fence::pending();
        self.stall.reaper.lock().unwrap().push(signal);
        fence
    }
}

fn stalled_pair(cfg: VolumeConfig) -> (Volume, Arc<Stall>) {
    let stall = Arc::new(Stall::default());
    let devs: Vec<Arc<dyn BlockDevice>> = vec![
        mem("mem://c0"),
        Arc::new(StallDevice {
            inner: mem("mem://c1"),
            stall: Arc::clone(&stall),
        }),
    ];
    (Volume::new("cancel", devs, cfg).unwrap(), stall)
}

/// Faults leg 1, then writes 8 blocks of `fill` at LBA 0 (a region for leg 1 to resync).
fn fault_leg_1_and_write(vol: &Volume, fill: u8) {
    vol.fault_leg(1).unwrap();
    let mut qp = vol.open_qpair(8).unwrap();
    let mut w = vec![fill; 8 * LBA as usize];
    let cmd = IoCommand::with_buf(IoOp::Write, 0, 8, IoBuf::from_slice(&mut w), 1);
    // SAFETY: `w` outlives the command, which completes below.
    unsafe { qp.submit(cmd) }.unwrap();
    assert_eq!(
        wait(&mut *qp, 1, Duration::from_secs(5)),
        Some(Status::SUCCESS)
    );
}

fn busy(r: Result<nvmirror_mirror::ResyncJob, Error>) -> bool {
    matches!(r, Err(Error::LegBusy { .. }))
}

#[test]
fn a_timed_out_write_is_cancelled_and_its_leg_may_be_attached_while_the_fault_is_armed() {
    let leg1 = Arc::new(FaultyDevice::wrap(mem("mem://f1")));
    let devs: Vec<Arc<dyn BlockDevice>> = vec![mem("mem://f0"), Arc::clone(&leg1) as _];
    let vol = Volume::new("cancel", devs, timeout(50)).unwrap();
    let mut qp = vol.open_qpair(8).unwrap();
    let hang = leg1.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    let mut w = vec![3u8; 8 * LBA as usize];
    let cmd = IoCommand::with_buf(IoOp::Write, 16, 8, IoBuf::from_slice(&mut w), 1);
    // SAFETY: `w` outlives the queue pair.
    unsafe { qp.submit(cmd) }.unwrap();
    let status = wait(&mut *qp, 1, Duration::from_secs(5)).expect("the timeout answers");
    assert_eq!(
        status,
        Status::SUCCESS,
        "leg 0 has it; leg 1 is faulted out"
    );
    assert_eq!(vol.leg_states()[1].state, LegState::Faulted);
    // The engine cancelled the abandoned command; its aborted completion is reaped.
    spin(&mut *qp, Duration::from_millis(20));
    let job = vol.attach_leg(1);
    assert!(
        job.is_ok(),
        "the cancelled write still holds leg 1: {:?}",
        job.err()
    );
    drop(job);
    leg1.injector().clear(hang);
    spin(&mut *qp, Duration::from_millis(20));
    // The cancelled write never reached leg 1.
    let raw = read_all(&*leg1).unwrap();
    assert!(raw[16 * LBA as usize..24 * LBA as usize]
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn a_queue_pair_closed_with_commands_left_to_a_reaper_keeps_the_leg_busy_until_its_fence() {
    let (vol, stall) = stalled_pair(timeout(30_000));
    let mut qp = vol.open_qpair(8).unwrap();
    stall.stall.store(true, Ordering::Release);
    let mut w = vec![5u8; 8 * LBA as usize];
    let cmd = IoCommand::with_buf(IoOp::Write, 0, 8, IoBuf::from_slice(&mut w), 1);
    // SAFETY: `w` is kept until the fence below is done.
    unsafe { qp.submit(cmd) }.unwrap();
    assert_eq!(
        wait(&mut *qp, 1, Duration::from_millis(50)),
        None,
        "leg 1 holds it"
    );
    // A host disconnect: the queue pair closes without waiting for leg 1.
    let fence = qp.close();
    assert!(!fence.is_done(), "leg 1 still has the write");
    vol.fault_leg(1).unwrap();
    assert!(
        busy(vol.attach_leg(1)),
        "attach while a write may still land"
    );
    // The write keeps its blocks ordered: an overlapping write from another queue pair waits.
    let mut qp2 = vol.open_qpair(8).unwrap();
    let mut w2 = vec![6u8; 8 * LBA as usize];
    let cmd2 = IoCommand::with_buf(IoOp::Write, 4, 8, IoBuf::from_slice(&mut w2), 2);
    // SAFETY: `w2` outlives `qp2`.
    unsafe { qp2.submit(cmd2) }.unwrap();
    assert_eq!(
        wait(&mut *qp2, 2, Duration::from_millis(50)),
        None,
        "overtook the fenced write"
    );
    assert_eq!(stall.reap_all(), 1);
    assert!(fence.is_done());
    drop(w);
    assert_eq!(
        wait(&mut *qp2, 2, Duration::from_secs(5)),
        Some(Status::SUCCESS)
    );
    stall.stall.store(false, Ordering::Release);
    let status = vol.attach_leg(1).expect("free once reaped").run_blocking();
    assert_eq!(status.state, JobState::Done);
    drop(qp2);
    assert_eq!(
        read_all(&*vol.leg_device(0).unwrap()).unwrap(),
        read_all(&*vol.leg_device(1).unwrap()).unwrap()
    );
}

#[test]
fn a_resync_window_that_times_out_keeps_its_leg_busy_until_reaped() {
    let (vol, stall) = stalled_pair(timeout(50));
    fault_leg_1_and_write(&vol, 9);
    stall.stall.store(true, Ordering::Release);
    let mut job = vol.attach_leg(1).unwrap();
    let status = job.run_blocking();
    assert_eq!(status.state, JobState::Failed, "the copy window timed out");
    assert_eq!(vol.leg_states()[1].state, LegState::Faulted);
    // The job has ended, but its write to leg 1 has not.
    assert!(
        busy(vol.attach_leg(1)),
        "attach while the resync write may still land"
    );
    drop(job);
    assert!(
        busy(vol.attach_leg(1)),
        "closing the job's queue pairs does not end it"
    );
    assert_eq!(stall.reap_all(), 1);
    stall.stall.store(false, Ordering::Release);
    let status = vol.attach_leg(1).expect("free once reaped").run_blocking();
    assert_eq!(status.state, JobState::Done);
}

#[test]
fn a_resync_whose_leg_faults_while_a_window_hangs_still_times_the_window_out() {
    let (vol, stall) = stalled_pair(timeout(300));
    fault_leg_1_and_write(&vol, 7);
    stall.stall.store(true, Ordering::Release);
    let mut job = vol.attach_leg(1).unwrap();
    // The copy window's write to leg 1 is in flight (and will never answer) when the leg
    // faults: the job stops, and must still give the window up at the I/O timeout instead of
    // waiting for it (holding its region's guard) until the device answers.
    let start = Instant::now();
    while stall.held.load(Ordering::Acquire) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the copy window never wrote"
        );
        job.poll(Instant::now());
    }
    vol.fault_leg(1).unwrap();
    let done = std::thread::spawn(move || job.run_blocking());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the resync job waits for a hung window after its leg faulted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(done.join().unwrap().state, JobState::Failed);
    assert_eq!(stall.reap_all(), 1);
}
