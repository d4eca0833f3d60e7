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
use serde_json::Value;

use serve_rig::{write, Server, NQN};

fn required() -> bool {
    std::env::var_os("NVMIRROR_REQUIRE_TOOLS").is_some_and(|v| v == "1")
}

/// `name` on PATH or at one of `also`.
fn find(name: &str, also: &[PathBuf]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(also.iter().cloned())
        .find(|p| p.is_file())
}

/// [`find`], which must succeed under `NVMIRROR_REQUIRE_TOOLS=1`.
fn tool(name: &str, also: &[PathBuf]) -> Option<PathBuf> {
    let found = find(name, also);
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
    // A resync and a verify, so the job gauges are there too.
    srv.rpc_ok("leg_detach", r#"{"volume":"vol0","leg":1}"#);
    srv.rpc_ok("leg_attach", r#"{"volume":"vol0","leg":1}"#);
    srv.wait_in_sync();
    srv.rpc_ok("verify_start", r#"{"volume":"vol0"}"#);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while srv.rpc_ok("verify_status", r#"{"volume":"vol0"}"#)["state"] != "done" {
        assert!(
            std::time::Instant::now() < deadline,
            "verify did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let resp = srv.scrape();
    let body = resp.split_once("\r\n\r\n").unwrap().1.to_string();
    // Every family the Grafana dashboard queries is served.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/grafana-nvmirror.json"
    ))
    .unwrap();
    let _: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut missing = Vec::new();
    for (at, _) in dashboard.match_indices("nvmirror_") {
        let name: String = dashboard[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        if !body.contains(&format!("# TYPE {family} ")) {
            missing.push(family.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, not served:\n{body}"
    );
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

/// SPDK's `rpc.py` (`spdk-rpc`): on PATH, or in the venv `.ci/run` makes under `build/`.
fn spdk_rpc() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/spdk-venv/bin/spdk-rpc");
    tool("spdk-rpc", &[venv])
}

/// `spdk-rpc -s SOCKET -t 10 ARGS`: its JSON output.
fn spdk(rpc: &PathBuf, socket: &str, args: &[&str]) -> Value {
    let out = Command::new(rpc)
        .args(["-s", socket, "-t", "10"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "spdk-rpc {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("spdk-rpc {args:?}: {e}: {text}"))
}

#[test]
fn spdk_rpc_py_lists_volumes_and_subsystems() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let srv = Server::start(dir.path());
    // nvmirror's own client takes SPDK's -s and -t, and documents every method's params.
    let out = Command::new(serve_rig::NVMIRROR)
        .args([
            "rpc",
            "-s",
            &srv.socket,
            "-t",
            "5",
            "rpc_get_methods",
            r#"{"detail":true}"#,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let methods: Value = serde_json::from_slice(&out.stdout).unwrap();
    let methods = methods.as_array().unwrap();
    assert!(methods.len() > 20, "{methods:?}");
    for m in methods {
        assert!(
            m["summary"].is_string() && m["params"].is_string(),
            "undocumented: {m}"
        );
    }
    let (ok, err) = srv.rpc("rpc_get_methods", "{}");
    assert!(ok && err.contains("nvmf_get_subsystems"), "{err}");

    let Some(rpc) = spdk_rpc() else {
        return;
    };
    let version = spdk(&rpc, &srv.socket, &["spdk_get_version"]);
    assert!(
        version["version"].as_str().unwrap().starts_with("nvmirror"),
        "{version}"
    );
    let subsystems = spdk(&rpc, &srv.socket, &["nvmf_get_subsystems"]);
    let nqns: Vec<&str> = subsystems
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["nqn"].as_str().unwrap())
        .collect();
    assert_eq!(
        nqns,
        ["nqn.2014-08.org.nvmexpress.discovery", NQN],
        "{subsystems}"
    );
    let sub = &subsystems[1];
    assert_eq!(sub["namespaces"][0]["nsid"], 1, "{sub}");
    assert_eq!(sub["namespaces"][0]["bdev_name"], "vol0", "{sub}");
    let port = srv.port().to_string();
    assert_eq!(
        sub["listen_addresses"][0]["trsvcid"],
        port.as_str(),
        "{sub}"
    );
    // One subsystem by NQN, as rpc.py passes it.
    let one = spdk(&rpc, &srv.socket, &["nvmf_get_subsystems", NQN]);
    assert_eq!(one.as_array().unwrap().len(), 1, "{one}");
    let bdevs = spdk(&rpc, &srv.socket, &["bdev_get_bdevs"]);
    assert_eq!(bdevs[0]["name"], "vol0", "{bdevs}");
    assert_eq!(bdevs[0]["block_size"], 512, "{bdevs}");
    let status = srv.status();
    assert_eq!(bdevs[0]["num_blocks"], status["num_blocks"], "{bdevs}");
    let one = spdk(&rpc, &srv.socket, &["bdev_get_bdevs", "-b", "vol0"]);
    assert_eq!(one.as_array().unwrap().len(), 1, "{one}");
    // An unknown bdev is an error rpc.py reports, not an empty success.
    let out = Command::new(&rpc)
        .args(["-s", &srv.socket, "bdev_get_bdevs", "-b", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    srv.stop();
}

#[test]
fn version_man_pages_and_completions() {
    let out = Command::new(serve_rig::NVMIRROR)
        .arg("--version")
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.starts_with(&format!("nvmirror {} (", env!("CARGO_PKG_VERSION")))
            && v.trim_end().ends_with(')'),
        "{v}"
    );
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let st = Command::new(serve_rig::NVMIRROR)
        .args(["gen", "man"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    for page in ["nvmirror.1", "nvmirror-serve.1", "nvmirror-rpc.1"] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
    let rpc = std::fs::read_to_string(dir.path().join("nvmirror-rpc.1")).unwrap();
    assert!(rpc.contains("timeout"), "{rpc}");
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(serve_rig::NVMIRROR)
            .args(["gen", "completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("serve") && text.contains("rpc"),
            "{shell}: {text}"
        );
    }
}

#[test]
fn systemd_unit_verifies_with_the_man_page_it_names() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/nvmirror.service"
    ))
    .unwrap();
    for want in [
        "Restart=on-failure",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(want), "the unit lacks {want}");
    }
    // systemd-analyze is not in every container; a host with systemd has it.
    let Some(analyze) = find("systemd-analyze", &[]) else {
        eprintln!("skipping: systemd-analyze not found");
        return;
    };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("nvmirror.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/nvmirror", serve_rig::NVMIRROR),
    )
    .unwrap();
    let man = dir.path().join("man/man1");
    let st = Command::new(serve_rig::NVMIRROR)
        .args(["gen", "man"])
        .arg(&man)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !said.contains("Unknown key"),
        "{said}"
    );
}
