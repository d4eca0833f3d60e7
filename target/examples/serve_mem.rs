//! Serves one RAM namespace over NVMe/TCP until killed — the peer for interop scripts
//! until `nvmirror serve` exists.
//!
//! ```text
//! cargo run --release -p nvmirror-target --example serve_mem -- \
//!     [--listen 127.0.0.1:4420] [--nqn NQN] [--leg mem://256MiB] [--cores 1]
//! ```

use std::time::Duration;

use nvmirror_nvme::open_leg;
use nvmirror_poller::{IdlePolicy, ReactorConfig, ReactorPool};
use nvmirror_target::{NvmeTcpTarget, SubsystemConfig, TargetConfig};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut listen = "127.0.0.1:4420".to_string();
    let mut nqn = "nqn.2024-01.io.nvmirror:mem0".to_string();
    let mut legs = Vec::new();
    let mut cores = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next().unwrap_or_else(|| {
                eprintln!("{a} needs a value");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--listen" => listen = val(),
            "--nqn" => nqn = val(),
            "--leg" => legs.push(val()),
            "--cores" => cores = val().parse().unwrap_or(1),
            _ => {
                eprintln!(
                    "usage: serve_mem [--listen ADDR:PORT] [--nqn NQN] [--leg URI]... [--cores N]"
                );
                std::process::exit(2);
            }
        }
    }
    if legs.is_empty() {
        legs.push("mem://256MiB".into());
    }
    let namespaces = legs
        .iter()
        .map(|l| open_leg(l).unwrap_or_else(|e| fail(&e)))
        .collect();
    let cfg = TargetConfig {
        listen: listen.parse().unwrap_or_else(|e| fail(&e)),
        subsystems: vec![SubsystemConfig::new(nqn.clone(), namespaces)],
        ..TargetConfig::default()
    };
    let pool = ReactorPool::start(ReactorConfig::unpinned(cores.max(1)).with_idle(
        IdlePolicy::SpinThenSleep {
            spin: Duration::from_millis(1),
            sleep: Duration::from_millis(1),
        },
    ))
    .unwrap_or_else(|e| fail(&e));
    let target = NvmeTcpTarget::start(cfg, &pool.handle()).unwrap_or_else(|e| fail(&e));
    println!("serving {nqn} on {}", target.local_addr());
    loop {
        std::thread::park();
    }
}

fn fail(e: &dyn std::fmt::Display) -> ! {
    eprintln!("serve_mem: {e}");
    std::process::exit(1)
}
