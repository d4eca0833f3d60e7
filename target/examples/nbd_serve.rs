//! Serves one leg as NBD export `vol0` until killed.
//!
//! ```text
//! cargo run --release -p nvmirror-target --example nbd_serve -- --leg mem://1GiB --listen 127.0.0.1:10809
//! qemu-img info nbd://127.0.0.1:10809/vol0
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nvmirror_poller::{IdlePolicy, ReactorConfig, ReactorPool};
use nvmirror_target::nbd::{NbdConfig, NbdServer};

/// Serve a leg over NBD as export `vol0`.
#[derive(Debug, Parser)]
struct Args {
    /// Leg URI (mem://1GiB, null://1TiB, file:///path, /dev/…). Give it once.
    #[arg(long = "leg", required = true)]
    legs: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// Export name.
    #[arg(long, default_value = "vol0")]
    export: String,
    /// Reactor threads serving connections.
    #[arg(long, default_value_t = 1)]
    reactors: usize,
    /// Pin the reactors to these CPUs (comma-separated; overrides --reactors).
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Busy-poll (0, the default), or after this many microseconds without work nap for as
    /// long (frees the CPU on a shared machine; adds up to that much latency when idle).
    #[arg(long, default_value_t = 0)]
    idle_sleep_us: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd_serve: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.legs.len() > 1 {
        return Err(format!(
            "{} legs given: this example serves a single leg; mirroring is wired in `nvmirror serve`",
            args.legs.len()
        )
        .into());
    }
    let device = nvmirror_nvme::open_leg(&args.legs[0])?;
    let reactors = if args.cpus.is_empty() {
        ReactorConfig::unpinned(args.reactors.max(1))
    } else {
        ReactorConfig::pinned(&args.cpus)
    };
    let reactors = match args.idle_sleep_us {
        0 => reactors.with_idle(IdlePolicy::Spin),
        us => reactors.with_idle(IdlePolicy::SpinThenSleep {
            spin: Duration::from_micros(us),
            sleep: Duration::from_micros(us),
        }),
    };
    let pool = ReactorPool::start(reactors)?;
    let cfg = NbdConfig {
        listen: args.listen,
        exports: vec![(args.export.clone(), device)],
    };
    let server = NbdServer::start(cfg, &pool.handle())?;
    // Scripts wait for this line to know the port.
    println!(
        "listening on {} export {}",
        server.local_addr(),
        args.export
    );
    loop {
        std::thread::park();
    }
}
