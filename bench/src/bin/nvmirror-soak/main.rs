//! `nvmirror-soak`: a chaos soak of `nvmirror serve` (see `docs/operations.md`, "Chaos soak").
//!
//! It starts `serve` on file legs in a work directory, runs two verifying writers (one over
//! NVMe/TCP, one over NBD, disjoint ranges, every acknowledged write recorded) and, while they
//! run, injects leg faults, detach/attach, leg_add/leg_remove, resync pause/resume/cancel,
//! verify with repair, host disconnects and `kill -9` with a restart. Then it heals the
//! volume and checks: no acknowledged write lost, the legs byte-identical, the server's RSS
//! growth bounded, no panic in its log, a clean SIGTERM exit. Exit status 1 on any failure.

mod chaos;
mod serve;
mod writer;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use chaos::{Action, ChaosLog, Outcome};
use serve::{ServeProcess, VOLUME};
use writer::{Model, Proto, WriterControl, UNIT};

#[derive(Debug, Parser)]
#[command(name = "nvmirror-soak", about = "Chaos soak of nvmirror serve")]
struct Args {
    /// How long the chaos runs, in minutes.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Seed of every random choice (printed; default from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// The nvmirror binary (default: next to this one).
    #[arg(long)]
    nvmirror: Option<PathBuf>,
    /// Work directory for the leg images, the configuration and the server log (emptied).
    #[arg(long, default_value = "build/soak")]
    dir: PathBuf,
    /// Size of each leg image.
    #[arg(long, default_value = "64MiB")]
    leg_size: String,
    /// The volume's leg I/O timeout (short, so hung legs resolve quickly).
    #[arg(long, default_value = "200ms")]
    io_timeout: String,
    /// Bytes each writer owns, in MiB.
    #[arg(long, default_value_t = 8)]
    range_mib: u64,
    /// Largest allowed RSS growth of one server process, in MiB.
    #[arg(long, default_value_t = 64)]
    rss_bound_mib: u64,
}

/// RSS of one server process: after its warm-up, and the largest seen since.
#[derive(Clone, Copy, Debug, Default)]
struct RssSpan {
    base: Option<u64>,
    max: u64,
}

/// Samples taken this long after a start are the baseline.
const RSS_WARMUP: Duration = Duration::from_secs(5);
/// How long healing the volume at the end may take.
const HEAL_DEADLINE: Duration = Duration::from_secs(180);

fn main() -> ExitCode {
    let args = Args::parse();
    match soak(&args) {
        Ok(failures) if failures.is_empty() => {
            println!("soak: PASS");
            ExitCode::SUCCESS
        }
        Ok(failures) => {
            for f in &failures {
                println!("soak: FAIL: {f}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            println!("soak: FAIL: {e}");
            ExitCode::from(2)
        }
    }
}

fn nvmirror_path(args: &Args) -> Result<PathBuf, String> {
    if let Some(p) = &args.nvmirror {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    Ok(me.with_file_name("nvmirror"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Runs the soak; the failures found, or why it could not run.
fn soak(args: &Args) -> Result<Vec<String>, String> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!(
        "soak: seed {seed}, {} minutes (rerun with --seed {seed})",
        args.minutes
    );
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let dir = args.dir.canonicalize().map_err(|e| e.to_string())?;
    let bin = nvmirror_path(args)?;
    let mut serve = ServeProcess::new(&bin, &dir, &args.leg_size, &args.io_timeout)
        .map_err(|e| e.to_string())?;
    serve.start()?;
    let mut failures = Vec::new();
    let status = serve
        .rpc("volume_status", &json!({"name": VOLUME}))
        .map_err(|e| format!("volume_status: {e:?}"))?;
    let num_blocks = status["num_blocks"].as_u64().ok_or("no num_blocks")?;
    let units = ((args.range_mib << 20) / UNIT as u64).min(num_blocks * 512 / UNIT as u64 / 2);
    let range_blocks = units * (UNIT / 512) as u64;

    let mut writers = Vec::new();
    for (i, proto) in [Proto::NvmeTcp, Proto::Nbd].into_iter().enumerate() {
        let ctl = Arc::new(WriterControl::default());
        let model = Model::new(proto, i as u64 * range_blocks, units as usize);
        let (addrs, c) = (Arc::clone(&serve.addrs), Arc::clone(&ctl));
        let wseed = seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let join = std::thread::Builder::new()
            .name(format!("soak-{}", proto.name()))
            .spawn(move || writer::run(model, addrs, c, wseed))
            .map_err(|e| e.to_string())?;
        writers.push((ctl, join));
    }

    // ---- chaos
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut log = ChaosLog::default();
    let mut spans: Vec<RssSpan> = vec![RssSpan::default()];
    let mut first_rss = None;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.minutes * 60.0);
    let mut next_report = start + Duration::from_secs(30);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(rng.gen_range(500..1500)));
        if let Some(st) = serve.exited() {
            failures.push(format!(
                "serve exited on its own ({st}); log:\n{}",
                serve.log_tail(30)
            ));
            break;
        }
        sample_rss(&serve, spans.last_mut().expect("a span"), &mut first_rss);
        let status = match serve.rpc("volume_status", &json!({"name": VOLUME})) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("volume_status did not answer: {e:?}"));
                break;
            }
        };
        // An action with nothing to act on (no leg out to attach) makes way for another.
        let (mut action, mut outcome) = (Action::Kill9, Outcome::Skipped);
        for _ in 0..4 {
            action = chaos::draw(&mut rng);
            outcome = chaos::act(action, &status, &serve, &mut rng, &dir, writers.len());
            log.record(action, &outcome);
            if !matches!(outcome, Outcome::Skipped) {
                break;
            }
        }
        match outcome {
            Outcome::Disconnect(w) => writers[w].0.disconnect.store(true, Ordering::Relaxed),
            Outcome::Kill9 => {
                serve.kill9();
                if let Err(e) = serve.start() {
                    failures.push(format!("restart after kill -9 failed: {e}"));
                    break;
                }
                spans.push(RssSpan::default());
            }
            Outcome::Refused(ref t) if t.contains("no answer") => {
                failures.push(format!("{}: {t}", action.name()));
                break;
            }
            _ => {}
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(30);
            let w: Vec<String> = writers
                .iter()
                .map(|(c, _)| {
                    format!(
                        "acked {} lost {}",
                        c.stats.writes_acked.load(Ordering::Relaxed),
                        c.stats.lost.load(Ordering::Relaxed)
                            + c.stats.corrupt.load(Ordering::Relaxed)
                    )
                })
                .collect();
            println!(
                "soak: {:>5.0} s: {} actions, restarts {}, writers [{}]",
                start.elapsed().as_secs_f64(),
                log.tally.values().map(|t| t.done + t.refused).sum::<u64>(),
                spans.len() - 1,
                w.join("; ")
            );
        }
    }

    // ---- stop the load, heal the volume
    for (c, _) in &writers {
        c.stop.store(true, Ordering::Relaxed);
    }
    let mut models = Vec::new();
    let mut ctls = Vec::new();
    for (c, j) in writers {
        models.push(j.join().map_err(|_| "a writer panicked")?);
        ctls.push(c);
    }
    // After a failed restart there is nothing left to heal or read back.
    let running = serve.pid().is_some() && serve.exited().is_none();
    if running {
        if let Err(e) = heal(&serve) {
            failures.push(e);
        }
    }
    let status = running
        .then(|| serve.rpc("volume_status", &json!({"name": VOLUME})).ok())
        .flatten();

    // ---- final read-back of every block of both writers
    let mut checked_total = 0;
    let mut acked_units = 0;
    let mut lost_total = 0;
    for m in models.iter().filter(|_| running) {
        acked_units += m.acked_units();
        match writer::read_back(m, &serve.addrs) {
            Ok((checked, lost, corrupt)) => {
                checked_total += checked;
                lost_total += lost + corrupt;
                if lost + corrupt > 0 {
                    failures.push(format!(
                        "{}: final read-back: {lost} blocks lost, {corrupt} corrupt",
                        m.proto.name()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", m.proto.name())),
        }
    }
    sample_rss(&serve, spans.last_mut().expect("a span"), &mut first_rss);
    let last_rss = serve.rss();
    match serve.terminate(Duration::from_secs(30)) {
        Ok(st) if st.success() => {}
        Ok(st) => failures.push(format!("serve exited with {st} on SIGTERM")),
        Err(e) if running => failures.push(e),
        Err(_) => {}
    }

    // ---- the legs agree
    let identical = match &status {
        Some(st) => match compare_legs(st) {
            Ok(n) => {
                println!("soak: {n} in-sync leg images byte-identical over the data area");
                true
            }
            Err(e) => {
                failures.push(e);
                false
            }
        },
        None => {
            failures.push("no final volume_status".into());
            false
        }
    };

    // ---- counters
    println!(
        "soak: summary (seed {seed}, {:.0} s of chaos, {} restarts)",
        (end.min(Instant::now()) - start).as_secs_f64(),
        spans.len() - 1
    );
    for (a, t) in &log.tally {
        println!(
            "  {:<22} done {:>4}  refused {:>4}  skipped {:>4}",
            a.name(),
            t.done,
            t.refused,
            t.skipped
        );
    }
    for (text, n) in &log.refusals {
        println!("  refusal x{n}: {text}");
    }
    for (c, m) in ctls.iter().zip(&models) {
        let s = &c.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        println!(
            "  writer {:<8} writes acked {} failed {}, reads failed {}, blocks checked by reads {}, reconnects {}, lost {}, corrupt {}, hangs {}",
            m.proto.name(),
            load(&s.writes_acked),
            load(&s.writes_failed),
            load(&s.reads_failed),
            load(&s.blocks_checked),
            load(&s.reconnects),
            load(&s.lost),
            load(&s.corrupt),
            load(&s.hangs)
        );
        if load(&s.lost) + load(&s.corrupt) > 0 {
            failures.push(format!(
                "{}: {} blocks read back lost and {} corrupt during the run",
                m.proto.name(),
                load(&s.lost),
                load(&s.corrupt)
            ));
        }
        if load(&s.hangs) > 0 {
            failures.push(format!("{}: {} hangs", m.proto.name(), load(&s.hangs)));
        }
        if load(&s.writes_acked) == 0 {
            failures.push(format!("{}: no write was acknowledged", m.proto.name()));
        }
    }
    println!(
        "  final read-back: {checked_total} blocks checked, {acked_units} units with an acknowledged write, lost {lost_total}, legs identical: {identical}"
    );
    let bound = args.rss_bound_mib << 20;
    let worst = spans
        .iter()
        .filter_map(|s| s.base.map(|b| s.max.saturating_sub(b)))
        .max()
        .unwrap_or(0);
    println!(
        "  serve RSS: first {:.1} MiB, last {:.1} MiB, largest growth of one process {:.1} MiB (bound {} MiB, {} processes)",
        mib(first_rss.unwrap_or(0)),
        mib(last_rss.unwrap_or(0)),
        mib(worst),
        args.rss_bound_mib,
        spans.len()
    );
    if worst > bound {
        failures.push(format!(
            "serve RSS grew by {:.1} MiB in one process (bound {} MiB)",
            mib(worst),
            args.rss_bound_mib
        ));
    }
    let panics = serve::panics_in(serve.log_path());
    println!("  panics in the serve log: {}", panics.len());
    if !panics.is_empty() {
        failures.push(format!("panic in the serve log:\n{}", panics.join("\n")));
    }
    println!("  serve log: {}", serve.log_path().display());
    Ok(failures)
}

fn sample_rss(serve: &ServeProcess, span: &mut RssSpan, first: &mut Option<u64>) {
    let Some(rss) = serve.rss() else { return };
    if serve.uptime() < RSS_WARMUP {
        return;
    }
    if span.base.is_none() {
        span.base = Some(rss);
        first.get_or_insert(rss);
    }
    span.max = span.max.max(rss);
}

/// Clears every fault, resumes a paused resync and attaches every leg that is out, until all
/// legs are in sync.
fn heal(serve: &ServeProcess) -> Result<(), String> {
    let deadline = Instant::now() + HEAL_DEADLINE;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let st = serve
            .rpc("volume_status", &json!({"name": VOLUME}))
            .map_err(|e| format!("volume_status while healing: {e:?}"))?;
        let legs = st["legs"].as_array().cloned().unwrap_or_default();
        for l in &legs {
            let i = l["index"].as_u64().unwrap_or(0);
            if l["faults_armed"].as_u64().unwrap_or(0) > 0 {
                let _ = serve.rpc("leg_fault_clear", &json!({"volume": VOLUME, "leg": i}));
            }
            if l["state"] == "faulted" || l["state"] == "detached" {
                let _ = serve.rpc("leg_attach", &json!({"volume": VOLUME, "leg": i}));
            }
        }
        if st["resync"]["state"] == "paused" {
            let _ = serve.rpc("resync_resume", &json!({"volume": VOLUME}));
        }
        let all_in = legs
            .iter()
            .all(|l| l["state"] == "in_sync" || l["state"] == "removed");
        let resync_running = matches!(
            st["resync"]["state"].as_str(),
            Some("running" | "starting" | "paused")
        );
        let verify = serve.rpc("verify_status", &json!({"volume": VOLUME}));
        let verify_running = verify.is_ok_and(|v| v["state"] == "running");
        if all_in && !resync_running && !verify_running {
            return Ok(());
        }
        last = st;
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "legs not in sync {HEAL_DEADLINE:?} after the chaos stopped: {last}"
    ))
}

/// Compares the data areas of every in-sync leg image; how many there were.
fn compare_legs(status: &Value) -> Result<usize, String> {
    let offset = status["bitmap"]["data_offset"]
        .as_u64()
        .ok_or("no bitmap.data_offset")?;
    let len = status["capacity_bytes"].as_u64().ok_or("no capacity")?;
    let mut first: Option<(String, Vec<u8>)> = None;
    let mut n = 0;
    for l in status["legs"].as_array().into_iter().flatten() {
        if l["state"] != "in_sync" {
            continue;
        }
        let uri = l["uri"].as_str().unwrap_or("");
        let path = uri
            .strip_prefix("file://")
            .and_then(|p| p.split('?').next())
            .ok_or_else(|| format!("leg {uri} is not a file"))?;
        let data = read_range(Path::new(path), offset, len)?;
        n += 1;
        match &first {
            None => first = Some((path.to_string(), data)),
            Some((p0, d0)) => {
                if let Some(at) = d0.iter().zip(&data).position(|(a, b)| a != b) {
                    return Err(format!(
                        "legs differ: {p0} and {path} at data byte {at} (block {})",
                        at / 512
                    ));
                }
            }
        }
    }
    if n < 2 {
        return Err(format!("only {n} in-sync legs at the end"));
    }
    Ok(n)
}

fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut data = Vec::with_capacity(len as usize);
    f.take(len)
        .read_to_end(&mut data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // A sparse image shorter than the namespace reads as zeros past its end.
    data.resize(len as usize, 0);
    Ok(data)
}
