//! What storage engineers' own tools make of `nvmirror serve`: `promtool check metrics` on the
//! `/metrics` exposition (histograms included), and SPDK's `rpc.py` (`spdk-rpc`, from
//! `pip install spdk`) listing the volumes and subsystems. Each tool test skips with a note when
//! its tool is missing, unless `NVMIRROR_REQUIRE_TOOLS=1` (CI installs both).

mod serve_rig;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::open_leg;

use serve_rig::{write, Server, NQN};

fn required() -> bool {
    std::env::var_os("NVMIRROR_REQUIRE_TOOLS").is_some_and(|v| v == "1")
}

/// `name` on PATH or at one of `also`.
fn tool(name: &str, also: &[PathBuf]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let found = on_path
        .into_iter()
        .chain(also.iter().cloned())
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            !required(),
            "{name} is required (NVMIRROR_REQUIRE_TOOLS=1) but missing"
        );
        eprintln!("skipping: {name} not found");
    }
    found
}

/// Writes a few blocks through NVMe/TCP so the latency histograms have samples.
fn some_writes(srv: &Server) {
    let dev = open_leg(&format!("nvme-tcp://{}/{NQN}", srv.nvme_tcp)).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(4, 4096);
    for i in 0..16 {
        write(&mut *qp, &mut pool, i * 8, 8, i as u8);
    }
}

#[test]
fn promtool_accepts_the_exposition_with_histograms() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let srv = Server::start(dir.path());
    srv.wait_in_sync();
    some_writes(&srv);
    let resp = srv.scrape();
    let body = resp.split_once("\r\n\r\n").unwrap().1.to_string();
    // The histograms are there and consistent: per leg and per volume, +Inf equals _count.
    for family in [
        "nvmirror_leg_latency_seconds",
        "nvmirror_volume_latency_seconds",
    ] {
        assert!(
            body.contains(&format!("# TYPE {family} histogram")),
            "{body}"
        );
    }
    let value = |prefix: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {body}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let count = value("nvmirror_volume_latency_seconds_count{volume=\"vol0\"}");
    assert!(count >= 16.0, "{count}");
    assert_eq!(
        value("nvmirror_volume_latency_seconds_bucket{volume=\"vol0\",le=\"+Inf\"}"),
        count
    );
    assert!(value("nvmirror_volume_latency_seconds_sum{volume=\"vol0\"}") > 0.0);
    assert!(value("nvmirror_leg_latency_seconds_count{volume=\"vol0\",leg=\"1\"") >= 16.0);

    let Some(promtool) = tool("promtool", &[]) else {
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{body}"
    );
    srv.stop();
}
