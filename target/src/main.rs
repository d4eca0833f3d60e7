//! `nvmirror`: serve mirrored volumes over NVMe/TCP and NBD, and control them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::Value;

use nvmirror_target::{rpc, serve, status, watch};

#[derive(Parser, Debug)]
#[command(name = "nvmirror", version = VERSION, about = "NVMe mirror target")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the configured volumes (the embedded default without --config).
    Serve(serve::ServeArgs),
    /// Call a JSON-RPC method and print its result.
    Rpc {
        /// RPC socket (SPDK's `-s`).
        #[arg(short = 's', long, default_value = "./nvmirror-data/nvmirror.sock")]
        socket: PathBuf,
        /// Seconds to wait for the reply (SPDK's `-t`).
        #[arg(short = 't', long, default_value_t = 60.0)]
        timeout: f64,
        /// Method name (`rpc_get_methods` lists them).
        method: String,
        /// Parameters as JSON.
        params: Option<String>,
    },
    /// Write man pages or shell completions.
    Gen {
        #[command(subcommand)]
        what: Generate,
    },
    /// Far-site recovery of an async-cycle leg: roll a committed cycle from the staging area
    /// onto the image (docs/cycles.md). Run it before exporting the image elsewhere.
    CycleRecover {
        /// The image (the far leg), a leg URI.
        #[arg(long)]
        image: String,
        /// Its staging area, a leg URI.
        #[arg(long)]
        staging: String,
        /// The time one command may take.
        #[arg(long, default_value = "10s", value_parser = parse_interval)]
        io_timeout: Duration,
    },
    /// Show volumes, legs, rates, latency and resync progress.
    Status {
        #[arg(long, default_value = "./nvmirror-data/nvmirror.sock")]
        socket: PathBuf,
        /// Redraw every interval until interrupted.
        #[arg(long)]
        watch: bool,
        /// Sampling interval for rates.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: Duration,
    },
}

/// `--version`: the crate version and the git commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("NVMIRROR_GIT_COMMIT"),
    ")"
);

#[derive(Subcommand, Debug)]
enum Generate {
    /// Man pages (nvmirror.1 and one per subcommand) into DIR.
    Man {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
    /// A completion script for SHELL on stdout.
    Completions { shell: clap_complete::Shell },
}

/// Writes what `gen` asks for.
fn generate(what: Generate) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    match what {
        Generate::Man { dir } => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(cmd, &dir)
        }
        Generate::Completions { shell } => {
            clap_complete::generate(shell, &mut cmd, "nvmirror", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    nvmirror_nvme::uri::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Command::Serve(args) => match serve::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nvmirror serve: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Gen { what } => match generate(what) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nvmirror gen: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Rpc {
            socket,
            timeout,
            method,
            params,
        } => {
            let Some(timeout) = Some(timeout)
                .filter(|t| t.is_finite() && *t > 0.0)
                .map(Duration::from_secs_f64)
            else {
                eprintln!("nvmirror rpc: -t must be a positive number of seconds");
                return ExitCode::FAILURE;
            };
            let params = match params.as_deref().map(serde_json::from_str::<Value>) {
                None => Value::Null,
                Some(Ok(v)) => v,
                Some(Err(e)) => {
                    eprintln!("nvmirror rpc: params are not JSON: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rpc::call_with_timeout(&socket, &method, params, timeout) {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nvmirror rpc {method}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CycleRecover {
            image,
            staging,
            io_timeout,
        } => match cycle_recover(&image, &staging, io_timeout) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nvmirror cycle-recover: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Status {
            socket,
            watch,
            interval,
        } => match show_status(&socket, watch, interval) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nvmirror status: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Opens both devices and rolls the image forward; what it did, as one JSON line.
fn cycle_recover(image: &str, staging: &str, io_timeout: Duration) -> Result<String, String> {
    let open = |what: &str, uri: &str| {
        nvmirror_nvme::open_leg(uri).map_err(|e| format!("{what} {uri}: {e}"))
    };
    let r = nvmirror_mirror::recover_cycle(
        open("image", image)?,
        open("staging area", staging)?,
        io_timeout,
    )?;
    Ok(serde_json::json!({
        "cycle": r.cycle,
        "rolled_forward": r.rolled_forward,
        "cut_seq": r.cut_seq,
        "cut_unix_ms": r.cut_unix_ms,
    })
    .to_string())
}

/// Fetches every volume's status.
fn sample(socket: &std::path::Path) -> Result<Vec<Value>, rpc::RpcError> {
    let list = rpc::call(socket, "volume_list", Value::Null)?;
    let names: Vec<String> = list
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.get("name").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names
        .iter()
        .map(|n| rpc::call(socket, "volume_status", serde_json::json!({ "name": n })))
        .collect()
}

fn show_status(
    socket: &std::path::Path,
    watch: bool,
    interval: Duration,
) -> Result<(), rpc::RpcError> {
    let mut prev = sample(socket)?;
    let mut taken = Instant::now();
    // On a terminal, --watch redraws in place with live progress bars; piped, it prints the
    // plain view once per interval.
    let mut live = Some(watch::Watch::stdout()).filter(|w| watch && w.is_visible());
    if let Some(live) = live.as_mut() {
        live.update(&prev, None, Duration::ZERO);
    }
    loop {
        std::thread::sleep(interval);
        let now = sample(socket)?;
        let dt = taken.elapsed();
        taken = Instant::now();
        match live.as_mut() {
            Some(live) => live.update(&now, Some(&prev), dt),
            None => print!("{}", status::render(&now, Some(&prev), dt)),
        }
        if !watch {
            return Ok(());
        }
        prev = now;
    }
}
