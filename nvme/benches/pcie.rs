//! Submit + poll cost of one 4 KiB I/O through the `pcie://` driver on the fake controller,
//! next to `mem://`: 32 submissions, then polls until all 32 are reaped, repeated; criterion's
//! time is per I/O (`iter_custom` counts each I/O as one iteration).
//!
//! The fake controller executes each command inside the doorbell write, under a lock, and
//! copies data through its IOMMU check, so its figure is the driver's cost (SQE build, PRPs,
//! doorbells, phase-tag reaping) plus a model of the device — an upper bound on the driver's
//! own share. `registered` buffers go to the controller directly; `bounce` buffers are copied
//! through the queue pair's DMA memory.
//!
//! Run with `cargo bench -p nvmirror-nvme --bench pcie`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{open_leg, BlockDevice, Completion, IoCommand, IoOp, QueuePair};

const DEPTH: u32 = 32;
const BS: usize = 4096;
/// Blocks walked sequentially (1 MiB: cache-resident, measures the path itself).
const UNITS: u64 = 256;

fn run(
    qp: &mut dyn QueuePair,
    bufs: &[DmaBuf],
    cpl: &mut [Completion],
    op: IoOp,
    ios: u64,
) -> Duration {
    let start = Instant::now();
    let mut left = ios;
    let mut cursor = 0u64;
    while left > 0 {
        let batch = left.min(u64::from(DEPTH)) as usize;
        for (i, buf) in bufs[..batch].iter().enumerate() {
            let cmd = IoCommand::with_buf(op, cursor * 8, 8, buf.io_buf(), i as u64);
            cursor = (cursor + 1) % UNITS;
            // SAFETY: the buffers outlive the run and each is reused only after its batch
            // has been reaped below.
            unsafe { qp.submit(cmd) }.expect("a batch never exceeds the depth");
        }
        let mut reaped = 0;
        while reaped < batch {
            let n = qp.poll(cpl);
            debug_assert!(cpl[..n].iter().all(|c| c.status.is_success()));
            reaped += n;
        }
        black_box(&cpl);
        left -= batch as u64;
    }
    start.elapsed()
}

fn pcie_fake_4k_qd32(c: &mut Criterion) {
    let mut g = c.benchmark_group("pcie_fake_4k_qd32_per_io");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    for (name, uri, register, op) in [
        ("mem_write", "mem://64MiB", false, IoOp::Write),
        ("mem_read", "mem://64MiB", false, IoOp::Read),
        (
            "pcie_fake_write_registered",
            "pcie://fake?size=64MiB",
            true,
            IoOp::Write,
        ),
        (
            "pcie_fake_read_registered",
            "pcie://fake?size=64MiB",
            true,
            IoOp::Read,
        ),
        (
            "pcie_fake_write_bounce",
            "pcie://fake?size=64MiB",
            false,
            IoOp::Write,
        ),
        (
            "pcie_fake_read_bounce",
            "pcie://fake?size=64MiB",
            false,
            IoOp::Read,
        ),
    ] {
        let dev: std::sync::Arc<dyn BlockDevice> = open_leg(uri).expect("leg URI");
        let mut qp = dev.open_qpair(DEPTH).expect("queue pair");
        let mut pool = DmaPool::new(DEPTH, BS);
        if register {
            // SAFETY: `pool` outlives `qp` (dropped after it, below).
            unsafe { qp.register_buffers(&pool) }.expect("register");
        }
        let bufs: Vec<DmaBuf> = std::iter::from_fn(|| pool.get()).collect();
        let mut cpl = vec![Completion::default(); DEPTH as usize];
        run(&mut *qp, &bufs, &mut cpl, IoOp::Write, UNITS);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| run(&mut *qp, &bufs, &mut cpl, op, iters))
        });
        drop(qp);
        drop(pool);
    }
    g.finish();
}

criterion_group!(benches, pcie_fake_4k_qd32);
criterion_main!(benches);
