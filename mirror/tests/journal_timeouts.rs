//! `async-journal` legs whose devices stop answering: the journal threads give a command up
//! at `io_timeout` instead of waiting for it for good. A journal device that hangs fails the
//! writes it holds and the journal stays failed (the volume faults the leg; the host carries
//! on); a far device whose connection went silent is given up and reached again on a new
//! queue pair.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_mirror::{JournalConfig, JournaledLeg, LegState, Volume, VolumeConfig};
use nvmirror_nvme::backend::{Fault, FaultyDevice, OpFilter};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{
    open_leg, read_all, BlockDevice, Completion, Fence, Geometry, IoCommand, IoOp, QueuePair,
    SubmitError,
};

const BS: usize = 4096;

fn cfg() -> JournalConfig {
    JournalConfig {
        io_timeout: Duration::from_millis(300),
        ..JournalConfig::default()
    }
}

/// A queue pair that takes commands and never answers them (a connection gone silent). It
/// never touches their buffers, so closing it fences nothing.
#[derive(Debug)]
struct Silent {
    depth: u32,
    held: u32,
}

impl QueuePair for Silent {
    fn depth(&self) -> u32 {
        self.depth
    }
    fn outstanding(&self) -> u32 {
        self.held
    }
    unsafe fn submit(&mut self, _cmd: IoCommand) -> Result<(), SubmitError> {
        if self.held == self.depth {
            return Err(SubmitError::QueueFull);
        }
        self.held += 1;
        Ok(())
    }
    fn poll(&mut self, _out: &mut [Completion]) -> usize {
        0
    }
    fn close(self: Box<Self>) -> Fence {
        Fence::done()
    }
}

/// A device whose first queue pair is [`Silent`]; later ones are the wrapped device's.
#[derive(Debug)]
struct FirstSilent {
    inner: Arc<dyn BlockDevice>,
    opened: AtomicU32,
}

impl BlockDevice for FirstSilent {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        if self.opened.fetch_add(1, Ordering::AcqRel) == 0 {
            return Ok(Box::new(Silent { depth, held: 0 }));
        }
        self.inner.open_qpair(depth)
    }
    fn name(&self) -> &str {
        "first-silent"
    }
}

/// A volume of `local` and the journaled leg.
fn volume(local: &Arc<dyn BlockDevice>, leg: &Arc<JournaledLeg>) -> Volume {
    Volume::new(
        "jt",
        vec![Arc::clone(local), Arc::clone(leg) as Arc<dyn BlockDevice>],
        VolumeConfig::default(),
    )
    .unwrap()
}

/// Writes `n` 4 KiB blocks at LBAs 0.. through `qp`, one at a time; every write must succeed.
fn write_blocks(qp: &mut dyn QueuePair, n: u64, fill: u8) {
    let mut pool = DmaPool::new(1, BS);
    let mut buf = pool.get().unwrap();
    let mut cpl = [Completion::default()];
    for lba in 0..n {
        buf.as_mut_slice().fill(fill.wrapping_add(lba as u8));
        let cmd = IoCommand::with_buf(IoOp::Write, lba, 1, buf.io_buf(), lba);
        // SAFETY: the buffer is written again only after the completion is reaped.
        unsafe { qp.submit(cmd) }.unwrap();
        let t = Instant::now();
        while qp.poll(&mut cpl) == 0 {
            assert!(t.elapsed() < Duration::from_secs(30), "write {lba} hangs");
            std::thread::yield_now();
        }
        assert!(cpl[0].status.is_success(), "write {lba}: {}", cpl[0].status);
    }
}

#[test]
fn a_far_connection_gone_silent_is_given_up_and_the_journal_ships_on_a_new_one() {
    let local = open_leg("mem://4MiB?lba=4096").unwrap();
    let far_mem = open_leg("mem://4MiB?lba=4096").unwrap();
    let far: Arc<dyn BlockDevice> = Arc::new(FirstSilent {
        inner: Arc::clone(&far_mem),
        opened: AtomicU32::new(0),
    });
    let journal = open_leg("mem://64MiB?lba=4096").unwrap();
    let leg = Arc::new(JournaledLeg::open(far, journal, cfg()).unwrap());
    let vol = volume(&local, &leg);
    let mut qp = vol.open_qpair(4).unwrap();
    write_blocks(&mut *qp, 64, 0x30);
    // The shipper's first queue pair never answers: without a timeout the journal would
    // never reach the far side.
    assert!(
        leg.wait_applied(Duration::from_secs(20)),
        "{:?}",
        leg.replication()
    );
    drop(qp);
    assert!(vol.leg_states().iter().all(|l| l.state == LegState::InSync));
    assert_eq!(read_all(&*local).unwrap(), read_all(&*far_mem).unwrap());
}

#[test]
fn a_journal_device_that_hangs_fails_its_writes_at_the_timeout_and_the_host_carries_on() {
    let local = open_leg("mem://4MiB?lba=4096").unwrap();
    let far = open_leg("mem://4MiB?lba=4096").unwrap();
    let journal = Arc::new(FaultyDevice::wrap(
        open_leg("mem://64MiB?lba=4096").unwrap(),
    ));
    let leg = Arc::new(
        JournaledLeg::open(
            Arc::clone(&far),
            Arc::clone(&journal) as Arc<dyn BlockDevice>,
            cfg(),
        )
        .unwrap(),
    );
    let hang = journal.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    // Straight to the leg: the journal write is given up at the timeout and the write fails
    // (through a volume, the leg would be faulted and the host acknowledged by the local leg).
    let mut lqp = leg.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(1, BS);
    let buf = pool.get().unwrap();
    let cmd = IoCommand::with_buf(IoOp::Write, 0, 1, buf.io_buf(), 1);
    // SAFETY: the buffer outlives the command, which is reaped below.
    unsafe { lqp.submit(cmd) }.unwrap();
    let mut cpl = [Completion::default()];
    let t = Instant::now();
    while lqp.poll(&mut cpl) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the journal write was never given up: {:?}",
            leg.replication()
        );
        std::thread::yield_now();
    }
    assert!(
        !cpl[0].status.is_success(),
        "a write the journal never took succeeded"
    );
    assert_eq!(leg.replication().unwrap().state, "failed");
    drop(lqp);

    // The journal stays failed (a write given up may still land where the next segment
    // would go): through a volume, the leg is faulted and the host carries on on its local
    // leg, the bitmap recording what the far leg misses.
    journal.injector().clear(hang);
    let vol = volume(&local, &leg);
    let mut qp = vol.open_qpair(4).unwrap();
    write_blocks(&mut *qp, 32, 0x50);
    let states: Vec<_> = vol.leg_states().iter().map(|l| l.state).collect();
    assert_eq!(states, [LegState::InSync, LegState::Faulted]);
    assert_eq!(leg.replication().unwrap().state, "failed");
    drop(qp);
    let image = read_all(&*local).unwrap();
    for lba in 0..32usize {
        assert!(image[lba * BS..(lba + 1) * BS]
            .iter()
            .all(|&x| x == 0x50u8.wrapping_add(lba as u8)));
    }
}
