//! `nvmirror-bench plot`: SVGs drawn from reports of real runs, and errors that name the file.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use nvmirror_bench::cli::Cli;
use nvmirror_bench::plot::{plot, PlotArgs};

/// Runs a tiny job and saves its JSON report as `dir/name.json`.
fn save_run(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let mut argv = vec![
        "nvmirror-bench",
        "--runtime",
        "50ms",
        "--output-format",
        "json",
    ];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).unwrap();
    let mut out = Vec::new();
    nvmirror_bench::run_cli(&cli, &mut out).unwrap();
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, out).unwrap();
    path
}

fn args(runs: &[PathBuf], output: PathBuf) -> PlotArgs {
    PlotArgs {
        runs: runs.to_vec(),
        output,
        title: "t".into(),
    }
}

#[test]
fn two_real_runs_give_an_svg_with_each_runs_legend() {
    let dir = tempfile::tempdir().unwrap();
    let single = save_run(
        dir.path(),
        "single",
        &["--leg", "mem://16MiB", "--rw", "randrw", "--iodepth", "4"],
    );
    let mirrored = save_run(
        dir.path(),
        "mirrored",
        &[
            "--leg",
            "mem://16MiB",
            "--leg",
            "mem://16MiB",
            "--rw",
            "randwrite",
            "--iodepth",
            "4",
            "--breakdown",
        ],
    );
    let svg = dir.path().join("lat.svg");
    plot(&args(&[single, mirrored], svg.clone())).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(200)]);
    for label in [
        "single randrw read",
        "single randrw write",
        "mirrored randwrite write",
        "99.99%",
        "IOPS",
    ] {
        assert!(text.contains(label), "{label} is not in the SVG");
    }
    // One latency curve per run and direction, and its legend line (both 2 px wide).
    assert_eq!(
        text.matches(r#"stroke-width="2""#).count(),
        3 + 3,
        "curves and legend lines"
    );
}

#[test]
fn a_malformed_report_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = save_run(dir.path(), "good", &["--leg", "null://1GiB"]);
    let bad = dir.path().join("broken.json");
    std::fs::write(&bad, "{\"jobs\": [ {\"jobname\": ").unwrap();
    let svg = dir.path().join("lat.svg");
    let err = plot(&args(&[good.clone(), bad.clone()], svg.clone()))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&bad.display().to_string()), "{err}");
    assert!(
        !svg.exists(),
        "nothing is written when a run cannot be read"
    );

    let missing = dir.path().join("missing.json");
    let err = plot(&args(std::slice::from_ref(&missing), svg.clone()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.json"), "{err}");

    let err = plot(&args(
        std::slice::from_ref(&good),
        dir.path().join("lat.png"),
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("PNG"), "{err}");
    let err = plot(&args(&[good], dir.path().join("lat.pdf")))
        .unwrap_err()
        .to_string();
    assert!(err.contains(".svg"), "{err}");
}

#[test]
fn the_binary_dispatches_plot_before_the_job_parser() {
    let dir = tempfile::tempdir().unwrap();
    let run = save_run(dir.path(), "one", &["--leg", "null://1GiB"]);
    let svg = dir.path().join("out.svg");
    let bin = env!("CARGO_BIN_EXE_nvmirror-bench");
    let ok = Command::new(bin)
        .arg("plot")
        .arg(&run)
        .arg("-o")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(std::fs::read_to_string(&svg)
        .unwrap()
        .contains("one read read"));

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "not json").unwrap();
    let out = Command::new(bin)
        .arg("plot")
        .arg(&bad)
        .arg("-o")
        .arg(&svg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.json"), "{stderr}");
}
