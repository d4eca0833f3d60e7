//! Two sites and a host in network namespaces on one machine: the rig of the site drills
//! (`docs/sites.md`).
//!
//! ```text
//!  host ns (nvm-<pid>-<n>-h)      site A ns (…-a)                       site B ns (…-b)
//!  nvmirror-bench --verify  ──►  nvmirror serve  vol0 = file leg  ──►  nvmirror serve
//!  10.77.1.1            veth     10.77.1.2       + nvme-tcp leg  veth  10.77.2.2
//!                       ha/ah    10.77.2.1 ─────────────────────  ab/ba exports its file leg
//!  10.77.3.1 ──────────────────── veth hb/bh ──────────────────────── 10.77.3.2 (a promoted B)
//! ```
//!
//! Each [`Sites`] creates its own three namespaces (named after this process and a counter, so
//! parallel test binaries never meet) and deletes them on drop, failing test or not; namespaces
//! left by a process that died are deleted when the next one starts. Link faults use the kernel's
//! own tools inside site A's namespace: `ip link set down` ([`Sites::link_down`]) and an nftables
//! table that drops A↔B packets without a reset ([`Sites::blackhole`]). Latency comes from
//! `nvmirror-netdelay` run inside site A ([`Sites::spawn_in`]); this kernel has no netem.
//!
//! A drill is a function that starts the sites ([`Sites::start_b`], [`Sites::start_a`]), runs
//! the verifying host writer ([`HostWriter`]) and applies faults; the drills that need the remote
//! leg's reconnect, reservations or `volume_promote` are further such functions over this API
//! (`docs/sites.md`, "Adding a drill").

#![allow(dead_code)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::serve_rig::Server;

pub mod ledger;
pub mod promotion;
pub mod writer;
pub use writer::HostWriter;

/// The host's address, on its veth to site A.
pub const HOST_ADDR: &str = "10.77.1.1";
/// Site A's address facing the host.
pub const A_HOST_ADDR: &str = "10.77.1.2";
/// Site A's address facing site B.
pub const A_REPL_ADDR: &str = "10.77.2.1";
/// Site B's address.
pub const B_ADDR: &str = "10.77.2.2";
/// NVMe/TCP port of both sites.
pub const PORT: u16 = 4420;
/// The subsystem site A exports to the host.
pub const NQN_A: &str = crate::serve_rig::NQN;
/// The subsystem site B exports to site A.
pub const NQN_B: &str = "nqn.2026-11.io.nvmirror:siteb";
/// The host's address on its link to site B, and B's end of it.
pub const HOST_B_ADDR: &str = "10.77.3.1";
pub const B_HOST_ADDR: &str = "10.77.3.2";
/// Site A's interface towards site B (inside A's namespace).
pub const A_TO_B_IF: &str = "ab";
/// The nftables table of [`Sites::blackhole`] (inside A's namespace).
const BLACKHOLE_TABLE: &str = "nvmirror_drill";
/// Set to `1` (CI does) to make a missing prerequisite a failure instead of a skip.
pub const REQUIRE_ENV: &str = "NVMIRROR_REQUIRE_NETNS";

/// One namespace of the rig.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    Host,
    A,
    B,
}

impl Site {
    fn suffix(self) -> &'static str {
        match self {
            Self::Host => "h",
            Self::A => "a",
            Self::B => "b",
        }
    }
}

/// Drills run one at a time: each starts three servers and a load, and the machine is shared.
static SERIAL: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Three namespaces joined by two veth pairs; deleted on drop.
#[derive(Debug)]
pub struct Sites {
    /// `nvm-<pid>-<n>`: every namespace name starts with it.
    prefix: String,
    /// Configurations, server logs, writer logs.
    pub dir: tempfile::TempDir,
    /// Leg images: in `/dev/shm` where there is one (the drills measure the link, not a
    /// shared disk), else beside `dir`.
    pub legs: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

/// Skips the calling test: prints `SKIPPED: why` and returns `None`, or fails it when
/// [`REQUIRE_ENV`] is `1`.
pub fn skip<T>(why: &str) -> Option<T> {
    if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
        panic!("{REQUIRE_ENV}=1 but the site drills cannot run: {why}");
    }
    println!("SKIPPED: {why}");
    eprintln!("SKIPPED: {why}");
    None
}

/// Runs a command to completion; its output, or why it failed (the command line and stderr).
pub fn sh(program: &str, args: &[&str]) -> Result<Output, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out)
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Deletes `nvm-<pid>-…` namespaces whose process is gone (left by a killed test run).
fn delete_stale_namespaces() {
    let Ok(out) = sh("ip", &["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("nvm-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh("ip", &["netns", "del", name]);
        }
    }
}

impl Sites {
    /// The three namespaces, linked and addressed; `None` (after printing `SKIPPED: …`) when
    /// this machine cannot make them (not root, no `ip`, no network namespaces).
    pub fn up() -> Option<Self> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return skip("the site drills need root (network namespaces, veth, nftables)");
        }
        if !have("ip") {
            return skip("the site drills need `ip` (apt-get install iproute2)");
        }
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        delete_stale_namespaces();
        let prefix = format!(
            "nvm-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let legs = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")))
            .unwrap();
        let sites = Self {
            prefix,
            dir,
            legs,
            _serial: serial,
        };
        match sites.link() {
            Ok(()) => Some(sites),
            Err(e) => skip(&format!(
                "cannot create network namespaces and veth pairs: {e}"
            )),
        }
    }

    fn link(&self) -> Result<(), String> {
        for site in [Site::Host, Site::A, Site::B] {
            sh("ip", &["netns", "add", &self.ns(site)])?;
            self.ip(site, &["link", "set", "lo", "up"])?;
        }
        let pairs = [
            (Site::Host, "ha", HOST_ADDR, Site::A, "ah", A_HOST_ADDR),
            (Site::A, A_TO_B_IF, A_REPL_ADDR, Site::B, "ba", B_ADDR),
            (Site::Host, "hb", HOST_B_ADDR, Site::B, "bh", B_HOST_ADDR),
        ];
        for (s1, if1, addr1, s2, if2, addr2) in pairs {
            let (ns1, ns2) = (self.ns(s1), self.ns(s2));
            sh(
                "ip",
                &[
                    "link", "add", if1, "netns", &ns1, "type", "veth", "peer", "name", if2,
                    "netns", &ns2,
                ],
            )?;
            for (s, ifname, addr) in [(s1, if1, addr1), (s2, if2, addr2)] {
                self.ip(s, &["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
                self.ip(s, &["link", "set", ifname, "up"])?;
            }
        }
        // The host reaches B's address through its own link to B (a promoted B serves the
        // host), never through A.
        self.ip(
            Site::Host,
            &["route", "add", &format!("{B_ADDR}/32"), "via", B_HOST_ADDR],
        )?;
        Ok(())
    }

    /// The namespace of `site`.
    pub fn ns(&self, site: Site) -> String {
        format!("{}-{}", self.prefix, site.suffix())
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, site: Site, args: &[&str]) -> Result<Output, String> {
        let ns = self.ns(site);
        let mut full = vec!["-n", &ns];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// `ip netns exec NS PROGRAM ARGS` to completion.
    pub fn exec(&self, site: Site, program: &str, args: &[&str]) -> Result<Output, String> {
        let ns = self.ns(site);
        let mut full = vec!["netns", "exec", &ns, program];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// `PROGRAM ARGS` started inside `site`'s namespace; killed when the guard drops.
    pub fn spawn_in(&self, site: Site, program: &str, args: &[String]) -> ChildGuard {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(site), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("ip netns exec … {program}: {e}"));
        ChildGuard(child)
    }

    /// Cuts A's link to B: `ip link set ab down` in A (sends fail locally, nothing arrives).
    pub fn link_down(&self) {
        self.ip(Site::A, &["link", "set", A_TO_B_IF, "down"])
            .unwrap();
    }

    /// Restores A's link to B.
    pub fn link_up(&self) {
        self.ip(Site::A, &["link", "set", A_TO_B_IF, "up"]).unwrap();
    }

    /// Whether nftables is usable (the black-hole drill skips without it).
    pub fn have_nft(&self) -> bool {
        have("nft")
    }

    /// A silent black hole between A and B: an nftables table in A that drops every packet to
    /// and from B, so neither side sees a reset or an error (the worst case for TCP).
    pub fn blackhole(&self) {
        let rules = format!(
            "table inet {BLACKHOLE_TABLE} {{\n\
             chain input {{ type filter hook input priority -10; policy accept; ip saddr {B_ADDR} drop; }}\n\
             chain output {{ type filter hook output priority -10; policy accept; ip daddr {B_ADDR} drop; }}\n\
             }}\n"
        );
        let path = self.dir.path().join("blackhole.nft");
        std::fs::write(&path, rules).unwrap();
        self.exec(Site::A, "nft", &["-f", path.to_str().unwrap()])
            .unwrap();
    }

    /// Removes [`blackhole`](Self::blackhole)'s table.
    pub fn heal(&self) {
        self.exec(
            Site::A,
            "nft",
            &["delete", "table", "inet", BLACKHOLE_TABLE],
        )
        .unwrap();
    }

    /// Site B: `nvmirror serve` in B's namespace exporting one file leg of `size` as
    /// [`NQN_B`] on `B_ADDR:PORT` (its namespace is `size` less B's own metadata area).
    pub fn start_b(&self, size: &str) -> Server {
        let d = self.dir.path().join("b");
        std::fs::create_dir_all(&d).unwrap();
        let img = self.legs.path().join("b-local.img");
        let cfg = format!(
            "[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"vol0\"\nlegs = [\"file://{}?create={size}\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN_B}\"\nnamespaces = [\"vol0\"]\n",
            img.display()
        );
        self.serve(Site::B, &d, &cfg, &format!("{B_ADDR}:{PORT}"))
    }

    /// The `nvme-tcp://` URI of site B's export as seen from A, through `via` (a proxy's
    /// `ADDR:PORT` inside A) or directly.
    pub fn b_uri(&self, via: Option<&str>, query: &str) -> String {
        let addr = via.map_or(format!("{B_ADDR}:{PORT}"), str::to_string);
        format!("nvme-tcp://{addr}/{NQN_B}{query}")
    }

    /// Site A: `nvmirror serve` in A's namespace with a local file leg (primary) the size of
    /// site `b`'s export and `remote` (B's export, directly or through a proxy), the volume's
    /// `io_timeout`, exported as [`NQN_A`] on `A_HOST_ADDR:PORT`.
    pub fn start_a(&self, b: &Server, remote: &str, io_timeout: &str) -> Server {
        let st = b.status();
        let bytes = st["capacity_bytes"].as_u64().expect("site B's capacity");
        self.start_a_sized(bytes, remote, io_timeout)
    }

    /// [`start_a`](Self::start_a) with a local leg of `bytes` (B's export's size).
    pub fn start_a_sized(&self, bytes: u64, remote: &str, io_timeout: &str) -> Server {
        let d = self.dir.path().join("a");
        std::fs::create_dir_all(&d).unwrap();
        let img = self.legs.path().join("a-local.img");
        let cfg = format!(
            "[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"vol0\"\nio_timeout = \"{io_timeout}\"\n\
             legs = [\"file://{}?create={bytes}\", \"{remote}\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN_A}\"\nnamespaces = [\"vol0\"]\n",
            img.display()
        );
        self.serve(Site::A, &d, &cfg, &format!("{A_HOST_ADDR}:{PORT}"))
    }

    /// `nvmirror serve --config CFG --data-dir DIR` inside `site`, NVMe/TCP on `listen`.
    pub fn serve(&self, site: Site, dir: &Path, cfg: &str, listen: &str) -> Server {
        let path = dir.join("nvmirror.toml");
        std::fs::write(&path, cfg).unwrap();
        let args = vec![
            "--config".into(),
            path.display().to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        let ns = self.ns(site);
        // The server's log (stderr) is kept after the test, for a drill that failed.
        let log = self.log(site);
        let redirect = format!("exec \"$0\" \"$@\" 2>>'{}'", log.display());
        Server::spawn_via(
            &["ip", "netns", "exec", &ns, "sh", "-c", &redirect],
            listen,
            &args,
            &[],
        )
        .unwrap_or_else(|e| panic!("site {site:?}: {e} (log {})", log.display()))
    }

    /// Where `site`'s server logs: `build/tmp/sites-logs/<namespace>.log`, kept after the test.
    pub fn log(&self, site: Site) -> PathBuf {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sites-logs");
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(format!("{}.log", self.ns(site)))
    }

    /// The URI of site A's volume for a host in the host namespace.
    pub fn a_uri(&self) -> String {
        format!("nvme-tcp://{A_HOST_ADDR}:{PORT}/{NQN_A}")
    }

    /// A directory for one drill's files.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it (and so their peers) and the nftables
        // tables; processes still inside keep it alive until they exit, nameless.
        for site in [Site::Host, Site::A, Site::B] {
            let _ = sh("ip", &["netns", "del", &self.ns(site)]);
        }
    }
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Waits for the process to end within `within`; its exit status and stdout, stderr.
    pub fn finish(mut self, within: Duration) -> (std::process::ExitStatus, String, String) {
        let mut out = self.0.stdout.take().unwrap();
        let mut err = self.0.stderr.take().unwrap();
        let o = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let e = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "process did not end within {within:?}: it hangs"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, o.join().unwrap(), e.join().unwrap())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `volume_status` of `vol0` over the socket from this process.
pub fn status(server: &Server) -> Value {
    server
        .call("volume_status", serde_json::json!({"name": "vol0"}))
        .unwrap_or_else(|e| panic!("volume_status: {e}"))
}

/// Polls `volume_status` until leg `leg` is in `state` (or `deadline` passes); how long it took.
pub fn wait_leg_state(server: &Server, leg: usize, state: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let st = status(server);
        if st["legs"][leg]["state"] == state {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "leg {leg} not {state} within {within:?}: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Scrubs the volume (`verify_start` without repair): the regions checked and mismatched.
pub fn scrub(server: &Server) -> (u64, usize) {
    let vol = serde_json::json!({"volume": "vol0"});
    server
        .call(
            "verify_start",
            serde_json::json!({"volume": "vol0", "repair": false}),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let v = server.call("verify_status", vol.clone()).unwrap();
        if v["state"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "verify did not finish: {v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        v["regions_checked"].as_u64().unwrap_or(0),
        v["mismatched_regions"]
            .as_array()
            .map_or(usize::MAX, Vec::len),
    )
}
