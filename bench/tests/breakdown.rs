//! `--breakdown` end to end: real runs against mirrored `mem://` volumes.

use clap::Parser;
use nvmirror_bench::breakdown::{StageReport, JSON_KEY};
use nvmirror_bench::cli::Cli;
use nvmirror_bench::report::FioOutput;

fn run(args: &[&str]) -> nvmirror_bench::Result<String> {
    let mut argv = vec!["nvmirror-bench"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).unwrap();
    let mut out = Vec::new();
    nvmirror_bench::run_cli(&cli, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

const DELAYED: &[&str] = &[
    "--leg",
    "mem://64MiB",
    "--leg",
    "mem://64MiB?latency=200us",
    "--rw",
    "randwrite",
    "--iodepth",
    "8",
    "--runtime",
    "300ms",
    "--ramp_time",
    "50ms",
];

#[test]
fn json_carries_the_breakdown_next_to_fio_fields_and_names_the_delayed_leg_last() {
    let mut args = DELAYED.to_vec();
    args.extend(["--breakdown", "--output-format", "json"]);
    let text = run(&args).unwrap();
    // fio's fields still parse as before.
    let fio: FioOutput = serde_json::from_str(&text).unwrap();
    let writes = fio.jobs[0].write.total_ios;
    assert!(writes > 100, "{writes} writes");

    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let st: StageReport = serde_json::from_value(v[JSON_KEY].clone()).unwrap();
    assert_eq!(st.unit, "ns");
    assert!(!st.bitmap);
    assert!(st.read.is_empty());
    assert_eq!(st.out_of_order, 0);
    let stages: Vec<&str> = st.write.iter().map(|r| r.stage.as_str()).collect();
    assert_eq!(
        stages,
        [
            "received_to_submit",
            "submit_to_leg0",
            "submit_to_leg1",
            "last_leg_to_joined",
            "joined_to_acked",
            "received_to_acked"
        ]
    );
    let total = st.write.last().unwrap();
    // Ramp I/Os are left out; the drained tail after the window is in (at most iodepth).
    let diff = total.count.abs_diff(writes);
    assert!(
        diff <= 8 + writes / 50,
        "{} recorded vs {writes} counted",
        total.count
    );
    for r in &st.write {
        assert_eq!(r.count, total.count, "{}", r.stage);
        assert!(
            r.p50 <= r.p99 && r.p99 <= r.p999 && r.p999 <= r.max,
            "{r:?}"
        );
    }

    let slow = st.last_leg.iter().find(|l| l.leg == 1).unwrap();
    assert!(slow.share > 0.98, "{:?}", st.last_leg);
    assert!(slow.name.contains("latency=200us"), "{}", slow.name);
    let gap = slow.gap_ns.p50;
    assert!((160_000..=400_000).contains(&gap), "gap p50 {gap} ns");
}

#[test]
fn normal_output_ends_with_the_stage_table_and_the_bitmap_stage_shows_when_on() {
    let mut args = DELAYED.to_vec();
    args.extend(["--breakdown", "--bitmap", "on"]);
    let text = run(&args).unwrap();
    let table = text
        .split("breakdown, write (usec):")
        .nth(1)
        .unwrap_or_else(|| panic!("no table in:\n{text}"));
    for stage in [
        "received_to_bitmap",
        "bitmap_to_submit",
        "submit_to_leg1",
        "received_to_acked",
    ] {
        assert!(table.contains(stage), "{stage} missing:\n{text}");
    }
    assert!(text.contains("last leg of mirrored writes"), "{text}");
    assert!(text.contains("leg1 mem://64MiB?latency=200us: "), "{text}");
}

#[test]
fn without_the_flag_there_is_no_breakdown_and_without_a_volume_it_is_refused() {
    let mut args = DELAYED.to_vec();
    args.extend(["--output-format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&run(&args).unwrap()).unwrap();
    assert!(v.get(JSON_KEY).is_none());
    let text = run(DELAYED).unwrap();
    assert!(!text.contains("breakdown"), "{text}");

    let err = run(&["--leg", "mem://16MiB", "--runtime", "10ms", "--breakdown"]).unwrap_err();
    assert!(err.to_string().starts_with("--breakdown:"), "{err}");
}
