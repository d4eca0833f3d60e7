//! `--journal`: the last leg is mirrored asynchronously, the run verifies through the volume,
//! and the end of the run reports the leg's replication state.

use std::process::Command;

fn bench(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nvmirror-bench"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_journaled_last_leg_verifies_and_reports_its_lag() {
    let (ok, err) = bench(&[
        "--leg",
        "mem://32MiB",
        "--leg",
        "mem://32MiB?latency=20us",
        "--journal",
        "mem://1GiB",
        "--rw",
        "randwrite",
        "--iodepth",
        "8",
        "--runtime",
        "1s",
        "--time_based",
        "--verify",
        "crc32c",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("async leg: replicating"), "{err}");
    assert!(err.contains("journal bytes per host byte"), "{err}");
}

#[test]
fn a_journal_without_a_second_leg_is_refused() {
    let (ok, err) = bench(&[
        "--leg",
        "mem://32MiB",
        "--journal",
        "mem://64MiB",
        "--rw",
        "randwrite",
        "--runtime",
        "1s",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--journal") && err.contains("two or more"),
        "{err}"
    );
}
