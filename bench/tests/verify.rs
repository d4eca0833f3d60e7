//! `--verify crc32c`: clean runs pass on a leg and on a mirrored volume; damaged, stale and
//! overwritten blocks are caught, named by LBA, and fail the run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvmirror_bench::engine::{self, RunResult};
use nvmirror_bench::job::{JobSpec, RwMode, VerifyMode};
use nvmirror_bench::report::normal_text;
use nvmirror_bench::verify::VerifyFault;
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::queue::SubmitError;
use nvmirror_nvme::{
    open_leg, BlockDevice, Completion, Geometry, IoCommand, IoOp, QueuePair, Status,
};

fn verified(rw: RwMode) -> JobSpec {
    JobSpec {
        rw,
        iodepth: 16,
        size: Some(1 << 20),
        runtime: Duration::from_millis(200),
        time_based: true,
        verify: VerifyMode::Crc32c,
        ..JobSpec::default()
    }
}

fn assert_clean(run: &RunResult) {
    let st = &run.stats;
    assert_eq!(
        (st.errors, st.verify.failures),
        (0, 0),
        "{}",
        normal_text(run)
    );
    assert!(!nvmirror_bench::run_failed(run));
}

#[test]
fn verify_passes_on_a_mem_leg_and_checks_every_block_written() {
    let target = open_leg("mem://4MiB").unwrap();
    let run = engine::run(&target, &verified(RwMode::RandWrite)).unwrap();
    assert_clean(&run);
    // 1 MiB of 512-byte logical blocks, all written many times over in 200 ms, all read
    // back once.
    assert_eq!(run.stats.verify.blocks_checked, 2048);
    let mixed = engine::run(
        &target,
        &JobSpec {
            bsrange: Some(nvmirror_bench::job::BsRange {
                min: 4096,
                max: 32768,
            }),
            numjobs: 2,
            ..verified(RwMode::RandRw)
        },
    )
    .unwrap();
    assert_clean(&mixed);
    assert!(mixed.stats.verify.blocks_checked > 2048);
    assert!(normal_text(&mixed).contains(", 0 failed"));
    // A read job after a write job checks the stamps the writer left.
    let read = engine::run(&target, &verified(RwMode::RandRead)).unwrap();
    assert_clean(&read);
    assert_eq!(read.stats.verify.blocks_checked, read.stats.read.len() * 8);
}

#[test]
fn verify_passes_on_a_mirrored_volume_of_two_mem_legs() {
    let legs = vec![
        open_leg("mem://4MiB").unwrap(),
        open_leg("mem://4MiB").unwrap(),
    ];
    let volume = nvmirror_bench::build_target(legs).unwrap();
    for rw in [RwMode::RandWrite, RwMode::RandRw, RwMode::Write] {
        let run = engine::run(&volume, &verified(rw)).unwrap();
        assert_clean(&run);
        assert!(run.stats.verify.blocks_checked >= 2048, "{rw}");
    }
}

/// Edits the 4 KiB block at `lba` straight on the device, behind the job's back.
fn overwrite(dev: &dyn BlockDevice, lba: u64, edit: impl Fn(&mut [u8])) {
    let mut qp = dev.open_qpair(1).unwrap();
    let mut block = vec![0u8; dev.geometry().lba_size as usize * 8];
    for op in [IoOp::Read, IoOp::Write] {
        if op == IoOp::Write {
            edit(&mut block);
        }
        let buf = IoBuf::from_slice(&mut block);
        // SAFETY: `block` outlives the command, reaped below before it is touched again.
        unsafe { qp.submit(IoCommand::with_buf(op, lba, 8, buf, 0)) }.unwrap();
        let mut c = [Completion::default()];
        while qp.poll(&mut c) == 0 {
            std::hint::spin_loop();
        }
        assert!(c[0].status.is_success());
    }
}

#[test]
fn a_block_changed_behind_the_job_is_caught_by_a_read_verify_job() {
    let leg = open_leg("mem://4MiB").unwrap();
    // One sequential pass over 1 MiB stamps every block exactly once.
    let fill = JobSpec {
        time_based: false,
        ..verified(RwMode::Write)
    };
    let run = engine::run(&leg, &fill).unwrap();
    assert_clean(&run);
    assert_eq!(run.stats.write.len(), 256);

    overwrite(&*leg, 40, |b| b[100] ^= 0x10);
    overwrite(&*leg, 80, |b| b.fill(0x33));
    let check = engine::run(
        &leg,
        &JobSpec {
            time_based: false,
            ..verified(RwMode::Read)
        },
    )
    .unwrap();
    let v = check.stats.verify;
    // One flipped byte in LBA 40; all eight logical blocks of the 4 KiB at LBA 80.
    assert_eq!(v.failures, 9, "{}", normal_text(&check));
    assert_eq!(v.blocks_checked, 2048);
    let first = v.first.unwrap();
    assert_eq!(first.lba, 40);
    assert!(matches!(first.fault, VerifyFault::BadCrc { .. }), "{first}");
    assert!(nvmirror_bench::run_failed(&check));
    let text = normal_text(&check);
    assert!(text.contains("9 failed, first: LBA 40: CRC32C"), "{text}");
    let json = nvmirror_bench::report::FioOutput::from_run(&check);
    assert_eq!(json.jobs[0].verify_errors, 9);
}

/// How [`Tampering`] misbehaves.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// Flips one byte of every block read from `lba`.
    FlipOnRead { lba: u64 },
    /// Acknowledges writes to `lba` without applying them, once `armed` is set.
    LoseWrites { lba: u64 },
}

/// A device that damages data in one of the ways [`Tamper`] names.
#[derive(Debug)]
struct Tampering {
    inner: Arc<dyn BlockDevice>,
    how: Tamper,
    armed: Arc<AtomicBool>,
}

#[derive(Debug)]
struct TamperingQp {
    inner: Box<dyn QueuePair>,
    how: Tamper,
    armed: Arc<AtomicBool>,
    lba_size: usize,
    /// Reads in flight that cover the damaged block: tag → where its bytes land.
    reads: HashMap<u64, (*mut u8, usize)>,
    /// Lost writes, completed at the next poll.
    lost: Vec<u64>,
}

// SAFETY: the raw pointers name buffers of commands this queue pair owns until their
// completions are reaped; the queue pair moves between threads only as a whole.
unsafe impl Send for TamperingQp {}

impl BlockDevice for Tampering {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        Ok(Box::new(TamperingQp {
            inner: self.inner.open_qpair(depth)?,
            how: self.how,
            armed: Arc::clone(&self.armed),
            lba_size: self.inner.geometry().lba_size as usize,
            reads: HashMap::new(),
            lost: Vec::new(),
        }))
    }
    fn name(&self) -> &str {
        "tampering"
    }
}

impl QueuePair for TamperingQp {
    fn depth(&self) -> u32 {
        self.inner.depth()
    }
    fn outstanding(&self) -> u32 {
        self.inner.outstanding() + self.lost.len() as u32
    }
    unsafe fn submit(&mut self, cmd: IoCommand) -> Result<(), SubmitError> {
        let covers = |lba: u64| (cmd.slba..cmd.slba + u64::from(cmd.nlb)).contains(&lba);
        match self.how {
            Tamper::LoseWrites { lba }
                if cmd.op == IoOp::Write && covers(lba) && self.armed.load(Ordering::Relaxed) =>
            {
                self.lost.push(cmd.tag);
                return Ok(());
            }
            Tamper::FlipOnRead { lba } if cmd.op == IoOp::Read && covers(lba) => {
                let off = (lba - cmd.slba) as usize * self.lba_size + 200;
                self.reads.insert(cmd.tag, (cmd.buf.as_ptr(), off));
            }
            _ => {}
        }
        // SAFETY: the caller's promise about `cmd.buf` is passed on unchanged.
        unsafe { self.inner.submit(cmd) }
    }
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(tag) = self.lost.pop() else { break };
            out[n] = Completion {
                tag,
                status: Status::SUCCESS,
            };
            n += 1;
        }
        let got = self.inner.poll(&mut out[n..]);
        for c in &out[n..n + got] {
            if let Some((ptr, off)) = self.reads.remove(&c.tag) {
                // SAFETY: the read just completed into the caller's buffer, which is still
                // alive (the caller has not reaped it yet) and at least `off + 1` bytes long.
                unsafe { *ptr.add(off) ^= 0x01 };
            }
        }
        n + got
    }
}

fn tampering(how: Tamper) -> (Arc<dyn BlockDevice>, Arc<AtomicBool>) {
    let armed = Arc::new(AtomicBool::new(false));
    let dev = Tampering {
        inner: open_leg("mem://4MiB").unwrap(),
        how,
        armed: Arc::clone(&armed),
    };
    (Arc::new(dev), armed)
}

#[test]
fn a_device_that_corrupts_reads_fails_the_read_back_pass() {
    let (dev, _) = tampering(Tamper::FlipOnRead { lba: 808 });
    let run = engine::run(&dev, &verified(RwMode::RandWrite)).unwrap();
    let v = run.stats.verify;
    assert_eq!(v.failures, 1, "{}", normal_text(&run));
    assert_eq!(v.first.unwrap().lba, 808);
    assert!(matches!(v.first.unwrap().fault, VerifyFault::BadCrc { .. }));
    assert!(nvmirror_bench::run_failed(&run));
    // Reads in a mixed job are checked as they complete, not only in the read-back pass.
    let (dev, _) = tampering(Tamper::FlipOnRead { lba: 808 });
    let mixed = engine::run(&dev, &verified(RwMode::RandRw)).unwrap();
    assert!(mixed.stats.verify.failures > 1, "{}", normal_text(&mixed));
}

#[test]
fn a_device_that_loses_writes_is_caught_by_the_generation_check() {
    let (dev, armed) = tampering(Tamper::LoseWrites { lba: 96 });
    // Stamp every block once, then lose every later write to block 96.
    let fill = JobSpec {
        time_based: false,
        ..verified(RwMode::Write)
    };
    assert_clean(&engine::run(&dev, &fill).unwrap());
    armed.store(true, Ordering::Relaxed);
    let run = engine::run(&dev, &fill).unwrap();
    let first = run.stats.verify.first.expect("the lost write is caught");
    assert_eq!(first.lba, 96);
    // The block still holds the first run's stamp: same seed, same LBA, a valid CRC, but an
    // older generation than the write the second run had acknowledged.
    assert!(
        matches!(first.fault, VerifyFault::Generation { found, expected } if found < expected),
        "{first}"
    );
    // Every logical block of the lost 4 KiB write.
    assert_eq!(run.stats.verify.failures, 8);
}
