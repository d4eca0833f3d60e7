//! Fail-stop through `nvmirror serve`: a panic or a stuck reactor ends the process instead of
//! leaving it alive with a dead data path; a shutdown is bounded; a restart right after a
//! crash waits for the dead process's claim on the legs instead of failing.

use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, Completion, IoCommand, IoOp};

mod serve_rig;
use serve_rig::{file_leg, Server, NQN};

const HOOKS: (&str, &str) = ("NVMIRROR_TEST_HOOKS", "1");

fn two_legs(dir: &std::path::Path) -> Vec<String> {
    vec![file_leg(dir, "a", "16MiB"), file_leg(dir, "b", "16MiB")]
}

fn abnormal(status: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt as _;
    !status.success() && (status.code().is_some() || status.signal().is_some())
}

#[test]
fn a_reactor_panic_ends_the_process_within_a_second() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut server = Server::with_legs(dir.path(), &two_legs(dir.path()), &[HOOKS]);
    server.rpc_ok("test_reactor_panic", r#"{"reactor":0}"#);
    let t0 = Instant::now();
    let status = server
        .wait_exit(Duration::from_secs(1))
        .expect("the process outlived a reactor panic by more than 1 s");
    assert!(abnormal(status), "{status}");
    eprintln!("exited {status} after {:?}", t0.elapsed());
    // Crash recovery brings the volume back.
    let server = Server::with_legs(dir.path(), &two_legs(dir.path()), &[]);
    server.wait_in_sync();
    server.stop();
}

#[test]
fn the_hooks_are_absent_without_the_variable() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let server = Server::with_legs(dir.path(), &two_legs(dir.path()), &[]);
    let (ok, err) = server.rpc("test_reactor_panic", r#"{"reactor":0}"#);
    assert!(!ok, "{err}");
    server.stop();
}

fn with_service_config(dir: &std::path::Path, service: &str) -> Vec<String> {
    let cfg = dir.join("nvmirror.toml");
    let legs = two_legs(dir);
    std::fs::write(
        &cfg,
        format!(
            "[service]\n{service}\n\n[nvme_tcp]\nlisten = \"127.0.0.1:0\"\n\n[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"vol0\"\nlegs = [\"{}\", \"{}\"]\n\n[[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
            legs[0], legs[1]
        ),
    )
    .unwrap();
    vec![
        "--config".into(),
        cfg.display().to_string(),
        "--data-dir".into(),
        dir.display().to_string(),
    ]
}

#[test]
fn a_stuck_reactor_ends_the_process() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let args = with_service_config(dir.path(), "stall_timeout = \"500ms\"");
    let mut server = Server::spawn(&args, &[HOOKS]).unwrap();
    server.rpc_ok("test_reactor_stall", r#"{"reactor":0}"#);
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("a stuck reactor did not end the process");
    assert!(abnormal(status), "{status}");
}

#[test]
fn shutdown_is_bounded_with_a_stuck_reactor_and_a_host_connected() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let args = with_service_config(
        dir.path(),
        "stall_timeout = \"0\"\nshutdown_timeout = \"1s\"",
    );
    let mut server = Server::spawn(&args, &[HOOKS]).unwrap();
    let dev = open_leg(&format!("nvme-tcp://{}/{NQN}", server.nvme_tcp)).unwrap();
    let _qp = dev.open_qpair(8).unwrap();
    server.rpc_ok("test_reactor_stall", r#"{"reactor":0}"#);
    server.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let status = server
        .wait_exit(Duration::from_secs(6))
        .expect("SIGTERM did not end the process within its bound");
    assert_eq!(status.code(), Some(3), "{status}");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
}

/// kill -9 under a write load, then an immediate restart: every start must succeed at the
/// first try (the leg's claim is still held for a while by the dead process's rings) and
/// recover.
#[test]
fn kill9_under_load_then_restart_at_once_twenty_times() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let legs = two_legs(dir.path());
    let mut slow = Duration::ZERO;
    for round in 0..20 {
        let t0 = Instant::now();
        let server = Server::try_with_legs(dir.path(), &legs, &[])
            .unwrap_or_else(|e| panic!("restart {round} failed: {e}"));
        slow = slow.max(t0.elapsed());
        let stop = Arc::new(AtomicBool::new(false));
        let addr = server.nvme_tcp.clone();
        let stop2 = Arc::clone(&stop);
        let load = std::thread::spawn(move || {
            // The buffers are declared first so they outlive the queue pair.
            let mut pool = DmaPool::new(32, 4096);
            let bufs: Vec<_> = (0..32).map(|_| pool.get().unwrap()).collect();
            let Ok(dev) = open_leg(&format!("nvme-tcp://{addr}/{NQN}")) else {
                return 0;
            };
            let Ok(mut qp) = dev.open_qpair(32) else {
                return 0;
            };
            let mut done = 0u64;
            let mut cpl = [Completion::default(); 32];
            let mut next = 0u64;
            for b in &bufs {
                let cmd = IoCommand::with_buf(IoOp::Write, next % 20000, 8, b.io_buf(), 0);
                // SAFETY: the buffers live until the end of this thread, after the queue pair.
                if unsafe { qp.submit(cmd) }.is_err() {
                    return done;
                }
                next += 8;
            }
            while !stop2.load(Ordering::Relaxed) {
                let n = qp.poll(&mut cpl);
                for c in &cpl[..n] {
                    if !c.status.is_success() {
                        return done;
                    }
                    done += 1;
                    let b = &bufs[(next / 8 % 32) as usize];
                    let cmd = IoCommand::with_buf(IoOp::Write, next % 20000, 8, b.io_buf(), 0);
                    // SAFETY: as above.
                    if unsafe { qp.submit(cmd) }.is_err() {
                        return done;
                    }
                    next += 8;
                }
            }
            drop(qp);
            done
        });
        std::thread::sleep(Duration::from_millis(150));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        let _ = load.join();
    }
    eprintln!("slowest start: {slow:?}");
    let server = Server::with_legs(dir.path(), &legs, &[]);
    server.wait_in_sync();
    server.stop();
}
