//! `nvmirror serve` as a child process on free ports, driven by `nvmirror rpc` and by the
//! project's own NVMe/TCP initiator: the rig of the end-to-end tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{Completion, IoCommand, IoOp, QueuePair};

pub const NVMIRROR: &str = env!("CARGO_BIN_EXE_nvmirror");
pub const NQN: &str = "nqn.2026-11.io.nvmirror:vol0";

pub struct Server {
    pub child: Child,
    pub nvme_tcp: String,
    pub socket: String,
    pub metrics: Option<String>,
}

/// A server left running by a failing test is killed, not leaked.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback TCP port free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A test directory with the data directories of site A and site B.
pub fn two_sites() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    (dir, da, db)
}

/// `file://DIR/NAME.img?create=SIZE`.
pub fn file_leg(dir: &Path, name: &str, size: &str) -> String {
    format!("file://{}/{name}.img?create={size}", dir.display())
}

impl Server {
    /// The end-to-end default: two 64 MiB file legs in `dir`.
    pub fn start(dir: &Path) -> Self {
        let legs = [
            file_leg(dir, "primary", "64MiB"),
            file_leg(dir, "mirror", "64MiB"),
        ];
        Self::with_legs(dir, &legs, &[])
    }

    /// `serve --config DIR/nvmirror.toml --data-dir DIR` on free ports, `toml` written as that
    /// file; what serve printed when it did not start.
    pub fn try_with_config(dir: &Path, toml: &str) -> Result<Self, String> {
        Self::spawn(&Self::config_args(dir, toml), &[])
    }

    /// [`with_config`](Self::with_config) with the NVMe/TCP listener on `listen` (a restart
    /// at the same address is the same site to its peers).
    pub fn with_config_at(dir: &Path, toml: &str, listen: &str) -> Self {
        Self::spawn_at(&Self::config_args(dir, toml), &[], listen).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `toml` written as `DIR/nvmirror.toml`; the arguments that serve it from `dir`.
    fn config_args(dir: &Path, toml: &str) -> Vec<String> {
        let cfg = dir.join("nvmirror.toml");
        std::fs::write(&cfg, toml).unwrap();
        vec![
            "--config".into(),
            cfg.display().to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
        ]
    }

    /// [`try_with_config`](Self::try_with_config), panicking with serve's output.
    pub fn with_config(dir: &Path, toml: &str) -> Self {
        Self::try_with_config(dir, toml).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `serve --data-dir DIR` on free ports with `legs` and the environment `env`.
    pub fn with_legs(dir: &Path, legs: &[String], env: &[(&str, &str)]) -> Self {
        Self::try_with_legs(dir, legs, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`with_legs`](Self::with_legs), or what it printed when it did not start.
    pub fn try_with_legs(
        dir: &Path,
        legs: &[String],
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let mut args: Vec<String> = vec!["--data-dir".into(), dir.display().to_string()];
        for l in legs {
            args.push("--leg".into());
            args.push(l.clone());
        }
        Self::spawn(&args, env)
    }

    /// `serve ARGS` on free ports (listeners given as 127.0.0.1:0).
    pub fn spawn(args: &[String], env: &[(&str, &str)]) -> Result<Self, String> {
        Self::spawn_via(&[], "127.0.0.1:0", args, env)
    }

    /// `serve ARGS` with its NVMe/TCP listener on `listen` (a restarted remote site keeps its
    /// address), the other listeners on free ports.
    pub fn spawn_at(args: &[String], env: &[(&str, &str)], listen: &str) -> Result<Self, String> {
        Self::spawn_via(&[], listen, args, env)
    }

    /// `PREFIX… nvmirror serve ARGS` with its NVMe/TCP listener on `listen` (NBD and metrics
    /// on free loopback ports). `PREFIX` runs the server under another program, e.g.
    /// `["ip", "netns", "exec", NS]` to start it inside a network namespace; the prefix must
    /// exec the server, so that the child is the server itself.
    pub fn spawn_via(
        prefix: &[&str],
        listen: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        Self::launch(prefix, None, listen, args, env)
    }

    /// `serve ARGS` on free ports, run in the working directory `cwd` (relative paths in
    /// ARGS are relative to it).
    pub fn spawn_in(cwd: &Path, args: &[String], env: &[(&str, &str)]) -> Result<Self, String> {
        Self::launch(&[], Some(cwd), "127.0.0.1:0", args, env)
    }

    fn launch(
        prefix: &[&str],
        cwd: Option<&Path>,
        listen: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let mut cmd = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(NVMIRROR);
                c
            }
            None => Command::new(NVMIRROR),
        };
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .arg("serve")
            .args(args)
            .args(["--listen", listen, "--nbd-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nvmirror starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut nvme_tcp, mut socket, mut metrics) = (None, None, None);
        while nvme_tcp.is_none() || socket.is_none() || metrics.is_none() {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.wait();
                let mut err = String::new();
                use std::io::Read as _;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                return Err(format!("nvmirror serve did not start: {err}"));
            };
            if let Some(rest) = line.strip_prefix("NVMe/TCP ") {
                nvme_tcp = rest.split_whitespace().next().map(str::to_string);
            }
            if let Some(rest) = line.strip_prefix("RPC ") {
                socket = Some(rest.trim().to_string());
            }
            if let Some(rest) = line.strip_prefix("metrics http://") {
                metrics = rest.split('/').next().map(str::to_string);
            }
        }
        // Keep draining stderr so a chatty server never blocks on a full pipe.
        // With SERVE_RIG_LOG=FILE set, every server's log is appended there (debugging).
        let mut stderr = child.stderr.take().unwrap();
        let log = std::env::var_os("SERVE_RIG_LOG").and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        std::thread::spawn(move || match log {
            Some(mut f) => std::io::copy(&mut stderr, &mut f),
            None => std::io::copy(&mut stderr, &mut std::io::sink()),
        });
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self {
            child,
            nvme_tcp: nvme_tcp.unwrap(),
            socket: socket.unwrap(),
            metrics,
        })
    }

    /// `nvmirror rpc METHOD PARAMS`: (exit success, stdout JSON or stderr text).
    pub fn rpc(&self, method: &str, params: &str) -> (bool, String) {
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

    /// `METHOD PARAMS` over the RPC socket from this process, without an `nvmirror rpc`
    /// child (what a test timing the server uses: spawning a process can take seconds on a
    /// loaded machine); the result, or the error's text.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        nvmirror_target::rpc::call(Path::new(&self.socket), method, params)
            .map_err(|e| e.to_string())
    }

    /// Calls `method` on a thread of its own, for a call that waits (`cycle_now`) while the
    /// test acts; join it for the result, or leave it to a kill of the server.
    pub fn rpc_in_background(
        &self,
        method: &'static str,
        params: Value,
    ) -> std::thread::JoinHandle<Result<Value, String>> {
        let socket = self.socket.clone();
        std::thread::spawn(move || {
            nvmirror_target::rpc::call(Path::new(&socket), method, params)
                .map_err(|e| e.to_string())
        })
    }

    /// [`rpc`](Self::rpc) that must succeed; its result.
    pub fn rpc_ok(&self, method: &str, params: &str) -> Value {
        let (ok, text) = self.rpc(method, params);
        assert!(ok, "{method} {params}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub fn status(&self) -> Value {
        self.rpc_ok("volume_status", r#"{"name":"vol0"}"#)
    }

    /// Polls `volume_status` until `pred` holds (at most `within`); the last status.
    pub fn wait_for(&self, within: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let st = self.status();
            if pred(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}: {st}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port of the NVMe/TCP listener.
    pub fn port(&self) -> u16 {
        self.nvme_tcp.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Polls `volume_status` until every leg that is not removed is in sync (60 s at most).
    pub fn wait_in_sync(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = self.status();
            let legs = st["legs"].as_array().unwrap();
            // A leg goes in sync just before its resync job records the end (the
            // superblocks are written in between): wait for both.
            if legs
                .iter()
                .all(|l| l["state"] == "in_sync" || l["state"] == "removed")
                && st["resync"]["state"] != "running"
            {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "legs not in sync after 60 s: {st}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /metrics`.
    pub fn scrape(&self) -> String {
        use std::io::{Read as _, Write as _};
        let addr = self.metrics.as_ref().expect("a metrics listener");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits up to `within` for the process to end.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM; the server must stop cleanly within 20 s.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let status = self
            .wait_exit(Duration::from_secs(20))
            .expect("nvmirror serve did not stop on SIGTERM");
        assert!(status.success(), "nvmirror serve exited with {status}");
    }

    /// SIGKILL, and reaped.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `fill` to blocks `[slba, slba + nlb)` through a queue pair and waits.
pub fn write(qp: &mut dyn QueuePair, pool: &mut DmaPool, slba: u64, nlb: u32, fill: u8) {
    let mut buf = pool.get().unwrap();
    buf.as_mut_slice().fill(fill);
    let cmd = IoCommand::with_buf(IoOp::Write, slba, nlb, buf.io_buf(), slba);
    // SAFETY: `buf` is not touched until the completion is reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    let cpl = wait_one(qp, "write");
    assert!(cpl.status.is_success(), "write at {slba}: {}", cpl.status);
    pool.put(buf);
}

/// Writes `fill` to blocks `[slba, slba + nlb)` through a queue pair; returns the status.
pub fn try_write(
    qp: &mut dyn QueuePair,
    pool: &mut DmaPool,
    slba: u64,
    nlb: u32,
    fill: u8,
) -> nvmirror_nvme::Status {
    let mut buf = pool.get().unwrap();
    buf.as_mut_slice().fill(fill);
    let cmd = IoCommand::with_buf(IoOp::Write, slba, nlb, buf.io_buf(), slba);
    // SAFETY: `buf` is not touched until the completion is reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    let cpl = wait_one(qp, "write");
    pool.put(buf);
    cpl.status
}

/// Reads blocks `[slba, slba + nlb)` through a queue pair.
pub fn read(qp: &mut dyn QueuePair, pool: &mut DmaPool, slba: u64, nlb: u32) -> Vec<u8> {
    let buf = pool.get().unwrap();
    let len = (nlb as usize) * 512;
    let cmd = IoCommand::with_buf(IoOp::Read, slba, nlb, buf.io_buf(), slba);
    // SAFETY: `buf` is not touched until the completion is reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    let cpl = wait_one(qp, "read");
    assert!(cpl.status.is_success(), "read at {slba}: {}", cpl.status);
    let out = buf.as_slice()[..len].to_vec();
    pool.put(buf);
    out
}

fn wait_one(qp: &mut dyn QueuePair, what: &str) -> Completion {
    let mut cpl = [Completion::default()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while qp.poll(&mut cpl) == 0 {
        assert!(
            Instant::now() < deadline,
            "{what} timed out: the data path is dead"
        );
    }
    cpl[0]
}

/// Blocks of the exported namespace as stored in a leg image (after its metadata area).
pub fn blocks(image: &Path, data_offset: u64, slba: u64, nlb: u64) -> Vec<u8> {
    let data = std::fs::read(image).unwrap();
    let start = (data_offset + slba * 512) as usize;
    data[start..start + (nlb * 512) as usize].to_vec()
}

/// A site exporting one 64 MiB file leg (`b.img` in `dir`) over NVMe/TCP on `listen`: the
/// far side of a remote leg.
pub fn site_b(dir: &Path, listen: &str) -> Server {
    let args: Vec<String> = [
        "--data-dir".into(),
        dir.display().to_string(),
        "--leg".into(),
        file_leg(dir, "b", "64MiB"),
    ]
    .into();
    Server::spawn_at(&args, &[], listen).unwrap_or_else(|e| panic!("{e}"))
}

/// Blocks of 512 bytes stamped with the id of the write that wrote them.
pub fn stamped_write(
    qp: &mut dyn nvmirror_nvme::QueuePair,
    pool: &mut DmaPool,
    slba: u64,
    nlb: u32,
    id: u64,
) {
    let mut buf = pool.get().unwrap();
    for blk in buf.as_mut_slice()[..nlb as usize * 512].chunks_mut(512) {
        blk.fill(id as u8);
        blk[..8].copy_from_slice(&id.to_le_bytes());
    }
    let cmd =
        nvmirror_nvme::IoCommand::with_buf(nvmirror_nvme::IoOp::Write, slba, nlb, buf.io_buf(), id);
    // SAFETY: `buf` is not touched until the completion is reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    let mut cpl = [nvmirror_nvme::Completion::default()];
    let t = std::time::Instant::now();
    while qp.poll(&mut cpl) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "write {id} timed out"
        );
    }
    assert!(cpl[0].status.is_success(), "write {id}: {}", cpl[0].status);
    pool.put(buf);
}

/// With writes issued one at a time (`writes[i]` is write `i + 1`), checks that the data area
/// `image` holds exactly the state after writes `1..=k` for some `k`; returns `k`.
pub fn assert_prefix(image: &[u8], writes: &[(u64, u32)]) -> u64 {
    let stamp = |b: u64| u64::from_le_bytes(image[b as usize * 512..][..8].try_into().unwrap());
    let k = writes
        .iter()
        .flat_map(|&(s, n)| s..s + u64::from(n))
        .map(stamp)
        .max()
        .unwrap_or(0);
    let mut expect = std::collections::HashMap::new();
    for (i, &(s, n)) in writes.iter().enumerate().take(k as usize) {
        for b in s..s + u64::from(n) {
            expect.insert(b, i as u64 + 1);
        }
    }
    for &(s, n) in writes {
        for b in s..s + u64::from(n) {
            let want = expect.get(&b).copied().unwrap_or(0);
            assert_eq!(
                stamp(b),
                want,
                "block {b}: the far image is not the state after writes 1..={k}"
            );
        }
    }
    k
}

/// Writes of 1 to 16 blocks at random places in the first `area` blocks, one at a time,
/// stamped with their number (`writes[i]` is write `i + 1`; see [`assert_prefix`]).
pub fn stamped_writes(
    qp: &mut dyn QueuePair,
    pool: &mut DmaPool,
    rng: &mut rand::rngs::SmallRng,
    n: usize,
    area: u64,
    writes: &mut Vec<(u64, u32)>,
) {
    use rand::Rng;
    for _ in 0..n {
        let nlb = rng.gen_range(1..=16u32);
        let slba = rng.gen_range(0..=area - u64::from(nlb));
        writes.push((slba, nlb));
        stamped_write(qp, pool, slba, nlb, writes.len() as u64);
    }
}
