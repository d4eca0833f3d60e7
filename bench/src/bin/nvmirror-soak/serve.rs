//! `nvmirror serve` as a child process the soak can kill and restart, its addresses after
//! every start, and `nvmirror rpc` with a deadline.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The subsystem the NVMe/TCP writer connects to.
pub const NQN: &str = "nqn.2026-11.io.nvmirror:vol0";
/// The volume (and NBD export).
pub const VOLUME: &str = "vol0";
/// How long one RPC may take before the soak calls the control path hung.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a start may take (claims of a killed predecessor included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the running server listens; `epoch` counts starts, so a writer sees a restart.
#[derive(Clone, Debug, Default)]
pub struct Addrs {
    pub epoch: u64,
    pub nvme_tcp: String,
    pub nbd: String,
    pub socket: String,
}

/// The addresses of the current server, shared with the writers.
pub type SharedAddrs = Arc<Mutex<Addrs>>;

/// One `nvmirror serve` at a time, restarted in the same data directory.
#[derive(Debug)]
pub struct ServeProcess {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    started: Instant,
    pub addrs: SharedAddrs,
}

impl ServeProcess {
    /// Writes the configuration (two file legs of `leg_size`, `io_timeout`) into `dir`.
    pub fn new(bin: &Path, dir: &Path, leg_size: &str, io_timeout: &str) -> std::io::Result<Self> {
        let config = dir.join("nvmirror.toml");
        let leg = |n: u32| format!("file://{}/leg{n}.img?create={leg_size}", dir.display());
        std::fs::write(
            &config,
            format!(
                "[nvme_tcp]\nlisten = \"127.0.0.1:0\"\n\n[nbd]\nlisten = \"127.0.0.1:0\"\n\n\
                 [rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
                 [service]\nshutdown_timeout = \"20s\"\nclaim_timeout = \"20s\"\n\n\
                 [[volume]]\nname = \"{VOLUME}\"\nio_timeout = \"{io_timeout}\"\n\
                 legs = [\"{}\", \"{}\"]\n\n\
                 [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"{VOLUME}\"]\n",
                leg(0),
                leg(1)
            ),
        )?;
        Ok(Self {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            config,
            log: dir.join("serve.log"),
            child: None,
            started: Instant::now(),
            addrs: SharedAddrs::default(),
        })
    }

    /// The server's stderr, across every start.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Time since the current server started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Starts the server and waits for its banner; the addresses are published with a new
    /// epoch.
    pub fn start(&mut self) -> Result<(), String> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let _ = writeln!(log, "---- soak: serve starts");
        let stderr = log.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| format!("{}: {e}", self.bin.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        // The banner is read on a thread so a server that never prints it cannot block us.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let (mut tcp, mut nbd) = (None, None);
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                let first = |rest: &str| rest.split_whitespace().next().map(str::to_string);
                if let Some(rest) = line.strip_prefix("NVMe/TCP ") {
                    tcp = first(rest);
                } else if let Some(rest) = line.strip_prefix("NBD ") {
                    nbd = first(rest);
                } else if let Some(rest) = line.strip_prefix("RPC ") {
                    let _ = tx.send((tcp.take(), nbd.take(), Some(rest.trim().to_string())));
                    break;
                }
            }
            lines.for_each(drop);
        });
        let banner = rx.recv_timeout(START_TIMEOUT);
        let Ok((Some(tcp), Some(nbd), Some(socket))) = banner else {
            let _ = child.kill();
            let status = child.wait().ok();
            return Err(format!(
                "serve did not start (exit {status:?}); last log lines:\n{}",
                self.log_tail(20)
            ));
        };
        self.child = Some(child);
        self.started = Instant::now();
        let mut a = self.addrs.lock().unwrap_or_else(|e| e.into_inner());
        a.epoch += 1;
        a.nvme_tcp = tcp;
        a.nbd = nbd;
        a.socket = socket;
        Ok(())
    }

    /// `Some(status)` when the server ended on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL, reaped.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; the exit status, or an error past `within`.
    pub fn terminate(&mut self, within: Duration) -> Result<ExitStatus, String> {
        let Some(mut c) = self.child.take() else {
            return Err("serve is not running".into());
        };
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Err(format!("serve did not stop within {within:?} of SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nvmirror rpc METHOD PARAMS`: the result, or the refusal's text. `Err(None)` is a
    /// control path that did not answer within the deadline.
    pub fn rpc(&self, method: &str, params: &Value) -> Result<Value, Option<String>> {
        let socket = self
            .addrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .socket
            .clone();
        let mut child = Command::new(&self.bin)
            .args(["rpc", "--socket", &socket, method, &params.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Some(e.to_string()))?;
        let deadline = Instant::now() + RPC_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(None);
                }
            }
        }
        let out = child.wait_with_output().map_err(|e| Some(e.to_string()))?;
        if out.status.success() {
            serde_json::from_slice(&out.stdout).map_err(|e| Some(format!("bad JSON: {e}")))
        } else {
            Err(Some(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ))
        }
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Resident set size of the running server in bytes (`VmRSS`).
    pub fn rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The log lines that tell of a panic.
pub fn panics_in(log: &Path) -> Vec<String> {
    let Ok(f) = File::open(log) else {
        return Vec::new();
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.to_ascii_lowercase().contains("panic"))
        .collect()
}
