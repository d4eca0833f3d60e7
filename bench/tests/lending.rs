//! Buffer lending (`QueuePair::buffer_lent`): a command that failed while the back end may
//! still use its buffer keeps that buffer out of use until the queue pair gives it back, so
//! the load generator never submits a command on a buffer a late completion can land in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvmirror_bench::engine;
use nvmirror_bench::job::{JobSpec, RwMode};
use nvmirror_nvme::queue::SubmitError;
use nvmirror_nvme::{open_leg, BlockDevice, Completion, Geometry, IoCommand, QueuePair, Status};

/// Counts shared by the device and the test.
#[derive(Debug, Default)]
struct Counts {
    lent: AtomicU64,
    released: AtomicU64,
    /// Commands submitted on a buffer that was still lent.
    reused_while_lent: AtomicU64,
}

/// A device whose every fourth command fails with its buffer lent for the next 50 polls.
#[derive(Debug)]
struct Lending {
    inner: Arc<dyn BlockDevice>,
    counts: Arc<Counts>,
}

#[derive(Debug)]
struct LendingQp {
    inner: Box<dyn QueuePair>,
    counts: Arc<Counts>,
    seen: u64,
    /// Failed at submission: completed by the next poll.
    failed: Vec<u64>,
    /// Lent: (tag, buffer address, polls left).
    lent: Vec<(u64, usize, u32)>,
}

impl BlockDevice for Lending {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn open_qpair(&self, depth: u32) -> nvmirror_nvme::Result<Box<dyn QueuePair>> {
        Ok(Box::new(LendingQp {
            inner: self.inner.open_qpair(depth)?,
            counts: Arc::clone(&self.counts),
            seen: 0,
            failed: Vec::new(),
            lent: Vec::new(),
        }))
    }
    fn name(&self) -> &str {
        "lending"
    }
}

impl QueuePair for LendingQp {
    fn depth(&self) -> u32 {
        self.inner.depth()
    }
    fn outstanding(&self) -> u32 {
        self.inner.outstanding() + self.failed.len() as u32
    }
    unsafe fn submit(&mut self, cmd: IoCommand) -> Result<(), SubmitError> {
        let addr = cmd.buf.as_ptr() as usize;
        if self.lent.iter().any(|&(_, a, _)| a == addr) {
            self.counts
                .reused_while_lent
                .fetch_add(1, Ordering::Relaxed);
        }
        self.seen += 1;
        if self.seen % 4 == 0 {
            self.failed.push(cmd.tag);
            self.lent.push((cmd.tag, addr, 50));
            self.counts.lent.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // SAFETY: the caller's promise about `cmd.buf` is passed on unchanged.
        unsafe { self.inner.submit(cmd) }
    }
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        for l in &mut self.lent {
            l.2 = l.2.saturating_sub(1);
        }
        let mut n = 0;
        while n < out.len() {
            let Some(tag) = self.failed.pop() else { break };
            out[n] = Completion {
                tag,
                status: Status::ABORTED_BY_HOST,
            };
            n += 1;
        }
        n + self.inner.poll(&mut out[n..])
    }
    fn buffer_lent(&self, tag: u64) -> bool {
        self.lent.iter().any(|&(t, _, _)| t == tag)
    }
    fn poll_released(&mut self, out: &mut [u64]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(k) = self.lent.iter().position(|&(_, _, left)| left == 0) else {
                break;
            };
            out[n] = self.lent.swap_remove(k).0;
            n += 1;
        }
        self.counts.released.fetch_add(n as u64, Ordering::Relaxed);
        n
    }
}

#[test]
fn a_lent_buffer_is_not_reused_until_it_is_given_back() {
    let counts = Arc::new(Counts::default());
    let target: Arc<dyn BlockDevice> = Arc::new(Lending {
        inner: open_leg("mem://4MiB").unwrap(),
        counts: Arc::clone(&counts),
    });
    for rw in [RwMode::RandRead, RwMode::RandWrite] {
        let run = engine::run(
            &target,
            &JobSpec {
                rw,
                iodepth: 8,
                size: Some(1 << 20),
                runtime: Duration::from_millis(200),
                time_based: true,
                ..JobSpec::default()
            },
        )
        .unwrap();
        assert!(run.stats.errors > 0, "{rw:?}: the failures were counted");
        assert_eq!(
            run.stats.unfinished, 0,
            "{rw:?}: every lent buffer came back"
        );
    }
    assert!(counts.lent.load(Ordering::Relaxed) > 100);
    assert_eq!(
        counts.released.load(Ordering::Relaxed),
        counts.lent.load(Ordering::Relaxed),
        "the drain waits for lent buffers"
    );
    assert_eq!(counts.reused_while_lent.load(Ordering::Relaxed), 0);
}
