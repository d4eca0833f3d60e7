//! The binary's exit status, like fio's: 0 on success, 1 when I/Os or verification failed
//! (the report is still printed), 2 when the job could not run.

use std::process::Command;

fn bench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nvmirror-bench"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_clean_verified_run_exits_zero() {
    let (code, out, err) = bench(&[
        "--leg",
        "mem://4MiB",
        "--rw",
        "randrw",
        "--size",
        "1MiB",
        "--iodepth",
        "8",
        "--runtime",
        "100ms",
        "--time_based",
        "--verify",
        "crc32c",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("verify: ") && out.contains(" 0 failed"),
        "{out}"
    );
}

#[test]
fn blocks_without_stamps_fail_a_read_verify_job_with_status_one() {
    // Nothing was ever written: every block read lacks its stamp.
    let (code, out, err) = bench(&[
        "--leg",
        "mem://4MiB",
        "--rw",
        "read",
        "--size",
        "64KiB",
        "--verify",
        "crc32c",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("128 failed, first: LBA 0: no verify stamp"),
        "{out}"
    );
}

#[test]
fn a_job_that_cannot_run_exits_two_naming_the_flag() {
    let (code, _, err) = bench(&["--leg", "mem://4MiB", "--rw", "trim", "--verify", "crc32c"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--verify: a trim job leaves nothing to verify"),
        "{err}"
    );
    let (code, _, err) = bench(&[
        "--target",
        "nvme-tcp://127.0.0.1:1/nqn.2026-11.io.nvmirror:x",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--target nvme-tcp://127.0.0.1:1/"), "{err}");
    let (code, _, err) = bench(&["--leg", "mem://4MiB", "--target", "nvme-tcp://h/nqn.x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--target"), "{err}");
}
