//! Random writes through the io_uring back end at a fixed queue depth, for comparison with
//! `fio --ioengine=io_uring` on the same file (see `scripts/bench-uring.sh`).
//!
//! ```text
//! cargo run --release -p nvmirror-nvme --example uring_randwrite -- \
//!     /path/file.img [SECONDS] [--qd 32] [--bs 4096] [--fixed] [--sqpoll] [--buffered] [--yield]
//! ```
//!
//! The loop polls without pause, like a dedicated reactor core. `--yield` gives the CPU away
//! after every poll that found nothing: on a machine where the kernel's completion work
//! (interrupts, the file system's I/O-completion workers) shares the core, a pure spin starves
//! it and measures the scheduler rather than the back end. `--fixed` registers the buffers.
//!
//! Prints one line: `iops=… seconds=… qd=… bs=… errors=… enters_per_io=…`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use nvmirror_nvme::backend::{UringDevice, UringOptions};
use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, QueuePair};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

struct Args {
    path: String,
    seconds: f64,
    qd: u32,
    bs: usize,
    fixed: bool,
    sqpoll: bool,
    buffered: bool,
    yield_idle: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        path: String::new(),
        seconds: 10.0,
        qd: 32,
        bs: 4096,
        fixed: false,
        sqpoll: false,
        buffered: false,
        yield_idle: false,
    };
    let mut it = std::env::args().skip(1);
    let mut positional = 0;
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--qd" => args.qd = value("--qd")?.parse().map_err(|e| format!("--qd: {e}"))?,
            "--bs" => args.bs = value("--bs")?.parse().map_err(|e| format!("--bs: {e}"))?,
            "--fixed" => args.fixed = true,
            "--sqpoll" => args.sqpoll = true,
            "--buffered" => args.buffered = true,
            "--yield" => args.yield_idle = true,
            _ if positional == 0 => {
                args.path = a;
                positional += 1;
            }
            _ if positional == 1 => {
                args.seconds = a.parse().map_err(|e| format!("seconds '{a}': {e}"))?;
                positional += 1;
            }
            _ => return Err(format!("unexpected argument '{a}'")),
        }
    }
    if args.path.is_empty() {
        return Err(
            "usage: uring_randwrite PATH [SECONDS] [--qd N] [--bs BYTES] [--fixed] \
                    [--sqpoll] [--buffered] [--yield]"
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
    let path = match std::fs::canonicalize(&args.path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}: {e}", args.path);
            return ExitCode::FAILURE;
        }
    };
    let opts = UringOptions {
        buffered: args.buffered,
        sqpoll: args.sqpoll,
        ..UringOptions::default()
    };
    let dev = match UringDevice::open(&path, &opts) {
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
    let mut qp = match dev.open_uring_qpair(args.qd) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut pool = DmaPool::new(args.qd, args.bs);
    if args.fixed {
        // SAFETY: `pool` outlives `qp`, which is dropped first at the end of main.
        if let Err(e) = unsafe { qp.register_buffers(&pool) } {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    let bufs: Vec<_> = (0..args.qd)
        .map(|_| {
            let mut b = pool.get().expect("pool sized to the queue depth");
            b.as_mut_slice().fill(0x5a);
            b
        })
        .collect();
    let mut rng = SmallRng::from_entropy();
    let mut submit = |qp: &mut dyn QueuePair, i: usize| {
        let slba = rng.gen_range(0..slots) * u64::from(nlb);
        let cmd = IoCommand::with_buf(IoOp::Write, slba, nlb, bufs[i].io_buf(), i as u64);
        // SAFETY: write buffers are never modified while the run lasts and outlive `qp`.
        unsafe { qp.submit(cmd) }.expect("a slot was free");
    };
    for i in 0..args.qd as usize {
        submit(&mut qp, i);
    }
    let run = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let mut done: u64 = 0;
    let mut errors: u64 = 0;
    let mut cpl = [Completion::default(); 64];
    loop {
        let n = qp.poll(&mut cpl);
        if n == 0 && args.yield_idle {
            std::thread::yield_now();
        }
        let elapsed = start.elapsed();
        for c in &cpl[..n] {
            if !c.status.is_success() {
                errors += 1;
            }
            if elapsed < run {
                done += 1;
                submit(&mut qp, c.tag as usize);
            }
        }
        if elapsed >= run && qp.outstanding() == 0 {
            break;
        }
    }
    // Like fio: I/O completed within the run, over the run.
    let secs = run.as_secs_f64();
    let enters = qp.enter_calls();
    drop(qp);
    println!(
        "iops={:.0} seconds={secs:.2} qd={} bs={} errors={errors} enters_per_io={:.3}",
        done as f64 / secs,
        args.qd,
        args.bs,
        enters as f64 / done.max(1) as f64
    );
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
