//! End to end: `nvmirror serve` as a process on free ports, driven by `nvmirror rpc` and by
//! the project's own NVMe/TCP initiator; a leg is detached, writes go on, and the leg images
//! are checked after a clean shutdown.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, Completion, IoCommand, IoOp, QueuePair};

const NVMIRROR: &str = env!("CARGO_BIN_EXE_nvmirror");
const NQN: &str = "nqn.2026-11.io.nvmirror:vol0";

struct Server {
    child: Child,
    nvme_tcp: String,
    socket: String,
}

/// A server left running by a failing test is killed, not leaked.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &Path) -> Self {
        let leg = |n: &str| format!("file://{}/{n}.img?create=64MiB", dir.display());
        let mut child = Command::new(NVMIRROR)
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--leg", &leg("primary"), "--leg", &leg("mirror")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("nvmirror starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut nvme_tcp, mut socket) = (None, None);
        while nvme_tcp.is_none() || socket.is_none() {
            let line = lines.next().expect("banner line").unwrap();
            if let Some(rest) = line.strip_prefix("NVMe/TCP ") {
                nvme_tcp = rest.split_whitespace().next().map(str::to_string);
            }
            if let Some(rest) = line.strip_prefix("RPC ") {
                socket = Some(rest.trim().to_string());
            }
        }
        Self {
            child,
            nvme_tcp: nvme_tcp.unwrap(),
            socket: socket.unwrap(),
        }
    }

    /// `nvmirror rpc METHOD PARAMS`: (exit success, stdout JSON or stderr text).
    fn rpc(&self, method: &str, params: &str) -> (bool, String) {
        let out = Command::new(NVMIRROR)
            .args(["rpc", "--socket", &self.socket, method, params])
            .output()
            .unwrap();
        let text = if out.status.success() {
            out.stdout
        } else {
            out.stderr
        };
        (
            out.status.success(),
            String::from_utf8_lossy(&text).into_owned(),
        )
    }

    fn status(&self) -> Value {
        let (ok, text) = self.rpc("volume_status", r#"{"name":"vol0"}"#);
        assert!(ok, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Polls `volume_status` until every leg is in sync (30 s at most); returns it.
    fn wait_in_sync(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.status();
            let legs = st["legs"].as_array().unwrap();
            // The leg goes in sync before its resync job records the end (the superblocks
            // are written in between): wait for both.
            if legs.iter().all(|l| l["state"] == "in_sync") && st["resync"]["state"] != "running" {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "legs not in sync after 30 s: {st}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        // SAFETY: sending SIGTERM to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "nvmirror serve exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nvmirror serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Writes `fill` to blocks `[slba, slba + nlb)` through a queue pair and waits.
fn write(qp: &mut dyn QueuePair, pool: &mut DmaPool, slba: u64, nlb: u32, fill: u8) {
    let mut buf = pool.get().unwrap();
    buf.as_mut_slice().fill(fill);
    let cmd = IoCommand::with_buf(IoOp::Write, slba, nlb, buf.io_buf(), slba);
    // SAFETY: `buf` is not touched until the completion is reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    let mut cpl = [Completion::default()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while qp.poll(&mut cpl) == 0 {
        assert!(Instant::now() < deadline, "write timed out");
    }
    assert!(
        cpl[0].status.is_success(),
        "write at {slba}: {}",
        cpl[0].status
    );
    pool.put(buf);
}

/// Blocks of the exported namespace as stored in a leg image (after its metadata area).
fn blocks(image: &Path, data_offset: u64, slba: u64, nlb: u64) -> Vec<u8> {
    let data = std::fs::read(image).unwrap();
    let start = (data_offset + slba * 512) as usize;
    data[start..start + (nlb * 512) as usize].to_vec()
}

#[test]
fn serve_detach_write_and_check_legs() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let server = Server::start(dir.path());

    let list: Value = serde_json::from_str(&server.rpc("volume_list", "null").1).unwrap();
    assert_eq!(list[0]["name"], "vol0");
    assert_eq!(list[0]["legs_in_sync"], 2);
    let st = server.status();
    assert_eq!(st["legs"][0]["role"], "primary");
    assert_eq!(st["legs"][1]["state"], "in_sync");
    let data_offset = st["bitmap"]["data_offset"]
        .as_u64()
        .expect("a persistent volume");
    assert!(data_offset >= 8192 && data_offset % 4096 == 0, "{st}");

    // Host access lists change at run time.
    let allowed = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-00000000a11d";
    let other = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000bd";
    let (ok, text) = server.rpc(
        "subsystem_add_host",
        &format!(r#"{{"nqn":"{NQN}","host":"{allowed}"}}"#),
    );
    assert!(ok && text.contains(allowed), "{text}");
    let uri = |host: &str| format!("nvme-tcp://{}/{NQN}?hostnqn={host}", server.nvme_tcp);
    let err = open_leg(&uri(other)).unwrap_err().to_string();
    assert!(err.contains("host"), "{err}");
    drop(open_leg(&uri(allowed)).unwrap());
    let (ok, text) = server.rpc(
        "subsystem_remove_host",
        &format!(r#"{{"nqn":"{NQN}","host":"{allowed}"}}"#),
    );
    assert!(ok && text.contains("[]"), "{text}");

    let dev = open_leg(&format!("nvme-tcp://{}/{NQN}", server.nvme_tcp)).unwrap();
    assert_eq!(dev.geometry().bytes(), (64 << 20) - data_offset);
    let mut qp = dev.open_qpair(8).unwrap();
    let mut pool = DmaPool::new(1, 65536);
    write(&mut *qp, &mut pool, 0, 128, 0xa1);
    write(&mut *qp, &mut pool, 4096, 128, 0xa2);

    // Bad parameters: non-zero exit with the reason.
    let (ok, err) = server.rpc("leg_detach", r#"{"volume":"vol0","leg":7}"#);
    assert!(!ok && err.contains("no leg 7"), "{err}");
    let (ok, err) = server.rpc("volume_status", r#"{"name":"nope"}"#);
    assert!(!ok && err.contains("no volume named 'nope'"), "{err}");

    let (ok, text) = server.rpc("leg_detach", r#"{"volume":"vol0","leg":1}"#);
    assert!(ok, "{text}");
    assert_eq!(server.status()["legs"][1]["state"], "detached");

    // Writes go on to the primary alone; the mirror's missed regions are counted.
    write(&mut *qp, &mut pool, 0, 128, 0xb1);
    write(&mut *qp, &mut pool, 8192, 128, 0xb2);
    let st = server.status();
    assert_eq!(st["legs"][1]["missed_regions"], 2, "{st}");

    // Re-attach: the resync copies exactly the two missed regions and the leg is in sync.
    let (ok, text) = server.rpc("leg_attach", r#"{"volume":"vol0","leg":1}"#);
    assert!(ok, "{text}");
    let st = server.wait_in_sync();
    assert_eq!(st["resync"]["state"], "done", "{st}");
    let region = st["region_size"].as_u64().unwrap();
    assert_eq!(
        st["resync"]["bytes_copied"].as_u64().unwrap(),
        2 * region,
        "{st}"
    );

    // Detach again and write; the detach outlives a restart: the mirror comes back detached
    // (not resynced behind the operator's back) until it is attached.
    assert!(server.rpc("leg_detach", r#"{"volume":"vol0","leg":1}"#).0);
    write(&mut *qp, &mut pool, 16384, 128, 0xc1);
    drop(qp);
    drop(dev);
    server.stop();
    let (p, m) = (
        dir.path().join("primary.img"),
        dir.path().join("mirror.img"),
    );
    let at = |img: &Path, slba, nlb| blocks(img, data_offset, slba, nlb);
    assert!(at(&p, 16384, 128).iter().all(|&b| b == 0xc1));
    assert!(
        at(&m, 16384, 128).iter().all(|&b| b == 0),
        "the detached leg got a write"
    );

    let server = Server::start(dir.path());
    let st = server.status();
    assert_eq!(st["legs"][1]["state"], "detached", "{st}");
    assert!(st["resync"].is_null(), "{st}");
    assert!(server.rpc("leg_attach", r#"{"volume":"vol0","leg":1}"#).0);
    server.wait_in_sync();

    // A leg that failed a write (not taken out by the operator) is rebuilt by a restart
    // by itself.
    let dev = open_leg(&format!("nvme-tcp://{}/{NQN}", server.nvme_tcp)).unwrap();
    let mut qp = dev.open_qpair(8).unwrap();
    let (ok, text) = server.rpc(
        "leg_fault_inject",
        r#"{"volume":"vol0","leg":1,"fault":"fail_writes"}"#,
    );
    assert!(ok, "{text}");
    write(&mut *qp, &mut pool, 20480, 128, 0xd1);
    assert_eq!(server.status()["legs"][1]["state"], "faulted");
    drop(qp);
    drop(dev);
    server.stop();

    let server = Server::start(dir.path());
    let st = server.wait_in_sync();
    assert_eq!(st["legs"][0]["state"], "in_sync", "{st}");
    server.stop();

    let size = (64 << 20) - data_offset;
    let (pi, mi) = (at(&p, 0, size / 512), at(&m, 0, size / 512));
    assert!(pi == mi, "the legs differ after resync");
    for (slba, fill) in [
        (0, 0xb1),
        (4096, 0xa2),
        (8192, 0xb2),
        (16384, 0xc1),
        (20480, 0xd1),
    ] {
        assert!(
            at(&m, slba, 128).iter().all(|&b| b == fill),
            "block {slba} is not {fill:#x}"
        );
    }
}

/// Runs `nvmirror serve` on free ports with `legs`, expects it to refuse to start, and
/// returns what it printed on stderr.
fn refused(dir: &Path, legs: &[&str]) -> String {
    let mut cmd = Command::new(NVMIRROR);
    cmd.args(["serve", "--data-dir"]).arg(dir).args([
        "--listen",
        "127.0.0.1:0",
        "--nbd-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    for leg in legs {
        cmd.args(["--leg", leg]);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "serve started with {legs:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_refuses_to_start_with_the_field() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[[volume]]\nname = \"v\"\nlegs = [\"mem://1GiB\", \"mem://2GiB\"]\nregion_size = \"1MiB\"\nspeed = 3\n").unwrap();
    let out = Command::new(NVMIRROR)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("speed") && err.contains("line 5"),
        "{err}"
    );

    let err = refused(dir.path(), &["mem://64MiB", "mem://128MiB"]);
    assert!(
        err.contains("legs differ in size") && err.contains("leg 1: 134217728 bytes"),
        "{err}"
    );

    let missing = format!("file://{}/nope/leg.img", dir.path().display());
    let err = refused(dir.path(), &[&missing]);
    assert!(
        err.contains("leg 0") && err.contains("nope/leg.img"),
        "{err}"
    );
}
