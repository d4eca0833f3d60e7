//! `--target nvme-tcp://…`: jobs driven over the project's own NVMe/TCP target, started
//! in-process on a free loopback port over a mem namespace.

mod common;

use std::sync::Arc;

use common::start;
use nvmirror_bench::cli::Cli;
use nvmirror_nvme::backend::{LatencyModel, MemDevice};
use nvmirror_nvme::BlockDevice;

fn run(args: &[&str]) -> (Vec<nvmirror_bench::engine::RunResult>, String) {
    let mut argv = vec!["nvmirror-bench"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_args(argv).unwrap();
    let mut out = Vec::new();
    let runs = nvmirror_bench::run_cli(&cli, &mut out).unwrap();
    (runs, String::from_utf8(out).unwrap())
}

#[test]
fn a_job_runs_over_nvme_tcp_with_its_own_queue_per_thread() {
    let ns: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(16 << 20, 512, LatencyModel::None).unwrap());
    let t = start(Arc::clone(&ns));
    let (runs, text) = run(&[
        "--target",
        &t.uri,
        "--rw",
        "randwrite",
        "--bs",
        "4k",
        "--iodepth",
        "8",
        "--numjobs",
        "2",
        "--runtime",
        "300ms",
        "--time_based",
    ]);
    let st = &runs[0].stats;
    assert_eq!(st.errors, 0, "{text}");
    assert!(st.write.len() > 50, "{} writes: {text}", st.write.len());
    assert!(text.contains(&format!("target={}", t.uri)), "{text}");
    let image = nvmirror_nvme::read_all(&*ns).unwrap();
    assert!(
        image.iter().any(|&b| b != 0),
        "nothing reached the namespace"
    );
}

#[test]
fn verify_and_trim_run_over_nvme_tcp() {
    let ns: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(8 << 20, 512, LatencyModel::None).unwrap());
    let t = start(Arc::clone(&ns));
    let (runs, text) = run(&[
        "--target",
        &t.uri,
        "--rw",
        "randrw",
        "--bsrange",
        "4k-16k",
        "--iodepth",
        "8",
        "--size",
        "1MiB",
        "--runtime",
        "300ms",
        "--time_based",
        "--verify",
        "crc32c",
    ]);
    let st = &runs[0].stats;
    assert_eq!((st.errors, st.verify.failures), (0, 0), "{text}");
    assert!(st.verify.blocks_checked > 256, "{text}");

    let (runs, text) = run(&[
        "--target",
        &t.uri,
        "--rw",
        "trim",
        "--bs",
        "64k",
        "--size",
        "1MiB",
        "--iodepth",
        "4",
    ]);
    let st = &runs[0].stats;
    assert_eq!(st.errors, 0, "{text}");
    assert_eq!(
        st.trim.len(),
        16,
        "one pass of 1 MiB in 64 KiB trims: {text}"
    );
    let image = nvmirror_nvme::read_all(&*ns).unwrap();
    assert!(
        image[..1 << 20].iter().all(|&b| b == 0),
        "trimmed blocks read back zero"
    );
}
