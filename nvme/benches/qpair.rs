//! Cost of one 4 KiB I/O through a queue pair with zero device latency: 32 submissions, then
//! polls until all 32 are reaped, repeated. Criterion's time is per I/O (`iter_custom` counts
//! each I/O as one iteration).
//!
//! Offsets walk a span of the device sequentially; the span is written once before measuring
//! so `mem://` pays no first-touch page faults. The 1 MiB span keeps the data cache-resident
//! and measures the queue-pair path itself; the 64 MiB span adds the memory traffic of a
//! working set larger than the caches.
//!
//! Run with `cargo bench -p nvmirror-nvme --bench qpair`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use nvmirror_nvme::dma::{DmaBuf, DmaPool};
use nvmirror_nvme::{open_leg, BlockDevice, Completion, IoCommand, IoOp, QueuePair};

const DEPTH: u32 = 32;
const BS: usize = 4096;

/// One device, one queue pair, 32 buffers, and where the next I/O goes.
struct Rig {
    _dev: std::sync::Arc<dyn BlockDevice>,
    qp: Box<dyn QueuePair>,
    _pool: DmaPool,
    bufs: Vec<DmaBuf>,
    cpl: Vec<Completion>,
    nlb: u32,
    units: u64,
    cursor: u64,
}

impl Rig {
    fn new(uri: &str, span: u64) -> Self {
        let dev = open_leg(uri).expect("leg URI");
        let geo = dev.geometry();
        let qp = dev.open_qpair(DEPTH).expect("queue pair");
        let mut pool = DmaPool::new(DEPTH, BS);
        let mut bufs: Vec<DmaBuf> = std::iter::from_fn(|| pool.get()).collect();
        for b in &mut bufs {
            b.as_mut_slice().fill(0x5a);
        }
        let mut rig = Self {
            _dev: dev,
            qp,
            _pool: pool,
            bufs,
            cpl: vec![Completion::default(); DEPTH as usize],
            nlb: (BS >> geo.lba_shift()) as u32,
            units: span.min(geo.bytes()) / BS as u64,
            cursor: 0,
        };
        // Touch the whole span once.
        rig.run(IoOp::Write, rig.units);
        rig
    }

    /// Issues `ios` I/Os of `op` in batches of `DEPTH` and waits for each batch.
    fn run(&mut self, op: IoOp, ios: u64) -> Duration {
        let start = Instant::now();
        let mut left = ios;
        while left > 0 {
            let batch = left.min(u64::from(DEPTH)) as usize;
            for (i, buf) in self.bufs[..batch].iter().enumerate() {
                let slba = self.cursor * u64::from(self.nlb);
                self.cursor += 1;
                if self.cursor == self.units {
                    self.cursor = 0;
                }
                let cmd = IoCommand::with_buf(op, slba, self.nlb, buf.io_buf(), i as u64);
                // SAFETY: the buffers live in the rig's pool for the rig's whole life, and
                // each one is reused only after the batch that used it has been reaped below.
                unsafe { self.qp.submit(cmd) }.expect("a batch never exceeds the depth");
            }
            let mut reaped = 0;
            while reaped < batch {
                let n = self.qp.poll(&mut self.cpl);
                debug_assert!(self.cpl[..n].iter().all(|c| c.status.is_success()));
                reaped += n;
            }
            black_box(&self.cpl);
            left -= batch as u64;
        }
        start.elapsed()
    }
}

fn qpair_4k_qd32(c: &mut Criterion) {
    let mut g = c.benchmark_group("qpair_4k_qd32_per_io");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    for (name, uri, span, op) in [
        ("mem_write_1MiB_span", "mem://1GiB", 1 << 20, IoOp::Write),
        ("mem_read_1MiB_span", "mem://1GiB", 1 << 20, IoOp::Read),
        ("mem_write_64MiB_span", "mem://1GiB", 64 << 20, IoOp::Write),
        ("null_write", "null://1TiB", 1 << 20, IoOp::Write),
        ("null_read", "null://1TiB", 1 << 20, IoOp::Read),
    ] {
        let mut rig = Rig::new(uri, span);
        g.bench_function(name, |b| b.iter_custom(|iters| rig.run(op, iters)));
    }
    g.finish();
}

criterion_group!(benches, qpair_4k_qd32);
criterion_main!(benches);
