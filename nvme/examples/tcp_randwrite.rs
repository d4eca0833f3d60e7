//! Random writes through the NVMe/TCP initiator at a fixed queue depth, against any
//! NVMe/TCP target (for nvmirror's own: `cargo run --release -p nvmirror-target --example
//! serve_mem`).
//!
//! ```text
//! cargo run --release -p nvmirror-nvme --example tcp_randwrite -- \
//!     nvme-tcp://127.0.0.1:4420/nqn.2024-01.io.nvmirror:mem0 [SECONDS] [--qd 32] [--bs 4096] \
//!     [--yield]
//! ```
//!
//! The loop polls without pause, like a dedicated reactor core; `--yield` gives the CPU away
//! after every poll that found nothing (useful when the target shares the machine's cores).
//!
//! Prints one line: `iops=… seconds=… qd=… bs=… errors=… p50_us=… p99_us=… p999_us=…`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, Completion, IoCommand, IoOp, QueuePair};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

struct Args {
    uri: String,
    seconds: f64,
    qd: u32,
    bs: usize,
    yield_idle: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        uri: String::new(),
        seconds: 10.0,
        qd: 32,
        bs: 4096,
        yield_idle: false,
    };
    let mut it = std::env::args().skip(1);
    let mut positional = 0;
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--qd" => args.qd = value("--qd")?.parse().map_err(|e| format!("--qd: {e}"))?,
            "--bs" => args.bs = value("--bs")?.parse().map_err(|e| format!("--bs: {e}"))?,
            "--yield" => args.yield_idle = true,
            _ if positional == 0 => {
                args.uri = a;
                positional += 1;
            }
            _ if positional == 1 => {
                args.seconds = a.parse().map_err(|e| format!("seconds '{a}': {e}"))?;
                positional += 1;
            }
            _ => return Err(format!("unexpected argument '{a}'")),
        }
    }
    if args.uri.is_empty() {
        return Err(
            "usage: tcp_randwrite nvme-tcp://HOST:PORT/SUBNQN[?…] [SECONDS] [--qd N] \
             [--bs BYTES] [--yield]"
                .into(),
        );
    }
    if args.qd == 0 || args.bs == 0 || !args.seconds.is_finite() || args.seconds <= 0.0 {
        return Err("--qd, --bs and SECONDS must be positive".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let dev = match open_leg(&args.uri) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let geo = dev.geometry();
    if args.bs % geo.lba_size as usize != 0 || args.bs as u64 > geo.bytes() {
        eprintln!("--bs {} does not fit {}", args.bs, dev.name());
        return ExitCode::FAILURE;
    }
    let nlb = (args.bs / geo.lba_size as usize) as u32;
    let slots = geo.num_blocks / u64::from(nlb);
    let mut qp = match dev.open_qpair(args.qd) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let qd = qp.depth();
    let mut pool = DmaPool::new(qd, args.bs);
    let bufs: Vec<_> = (0..qd)
        .map(|_| {
            let mut b = pool.get().expect("pool sized to the queue depth");
            b.as_mut_slice().fill(0x5a);
            b
        })
        .collect();
    let mut rng = SmallRng::from_entropy();
    let mut started = vec![Instant::now(); qd as usize];
    let mut submit = |qp: &mut dyn QueuePair, started: &mut [Instant], i: usize, now: Instant| {
        let slba = rng.gen_range(0..slots) * u64::from(nlb);
        let cmd = IoCommand::with_buf(IoOp::Write, slba, nlb, bufs[i].io_buf(), i as u64);
        started[i] = now;
        // SAFETY: write buffers are never modified while the run lasts and outlive `qp`.
        unsafe { qp.submit(cmd) }.expect("a slot was free");
    };
    let start = Instant::now();
    for i in 0..qd as usize {
        submit(&mut *qp, &mut started, i, start);
    }
    let run = Duration::from_secs_f64(args.seconds);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
    let mut done: u64 = 0;
    let mut errors: u64 = 0;
    let mut cpl = [Completion::default(); 64];
    loop {
        let n = qp.poll(&mut cpl);
        if n == 0 && args.yield_idle {
            std::thread::yield_now();
        }
        let now = Instant::now();
        let elapsed = now - start;
        for c in &cpl[..n] {
            let i = c.tag as usize;
            if !c.status.is_success() {
                errors += 1;
                if errors == 1 {
                    eprintln!("first error: {}", c.status);
                }
            }
            if elapsed < run {
                let _ = hist.record((now - started[i]).as_nanos() as u64);
                done += 1;
                submit(&mut *qp, &mut started, i, now);
            }
        }
        if elapsed >= run && qp.outstanding() == 0 {
            break;
        }
    }
    drop(qp);
    let secs = run.as_secs_f64();
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "iops={:.0} seconds={secs:.2} qd={qd} bs={} errors={errors} p50_us={:.1} p99_us={:.1} \
         p999_us={:.1}",
        done as f64 / secs,
        args.bs,
        us(0.5),
        us(0.99),
        us(0.999)
    );
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
