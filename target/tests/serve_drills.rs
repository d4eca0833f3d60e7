//! The README's fault drills through `nvmirror serve`, under a verifying host load over
//! NVMe/TCP: `hang` on a leg (its commands time out and are abandoned), then
//! `leg_fault_clear` (the abandoned commands complete late, into the buffers they were given)
//! and `leg_attach`. Every block the host reads back must be the last one it was told was
//! written: a late read or write landing in a recycled buffer would show up as a wrong block.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, Completion, IoCommand, IoOp};

mod serve_rig;
use serve_rig::{file_leg, Server, NQN};

const BLOCKS: u64 = 4096; // 2 MiB of 512-byte blocks, 8 per I/O
const QD: usize = 16;

/// Block contents: LBA and a generation in every 8-byte word.
fn stamp(buf: &mut [u8], lba: u64, gen: u64) {
    for (i, w) in buf.chunks_exact_mut(16).enumerate() {
        let b = lba + (i * 16 / 512) as u64;
        w[..8].copy_from_slice(&b.to_le_bytes());
        w[8..].copy_from_slice(&gen.to_le_bytes());
    }
}

/// Runs until `stop`; returns (blocks checked, commands failed) and counts wrong reads.
fn load(addr: String, stop: Arc<AtomicBool>, wrong: Arc<AtomicU64>) -> (u64, u64) {
    let mut pool = DmaPool::new(QD as u32, 4096);
    let mut bufs: Vec<_> = (0..QD).map(|_| pool.get().unwrap()).collect();
    let dev = open_leg(&format!("nvme-tcp://{addr}/{NQN}")).unwrap();
    let mut qp = dev.open_qpair(QD as u32).unwrap();
    // Per 8-block unit: the generation acknowledged last; None while a write to it failed
    // (its content is then either) or none was made.
    let units = (BLOCKS / 8) as usize;
    let mut acked: Vec<Option<u64>> = vec![None; units];
    let mut busy = vec![false; units];
    let mut slots: HashMap<u64, (usize, bool, u64)> = HashMap::new(); // tag -> (unit, write, gen)
    let (mut checked, mut failed, mut gen, mut next) = (0u64, 0u64, 1u64, 0usize);
    let mut cpl = [Completion::default(); QD];
    let mut free: Vec<usize> = (0..QD).collect();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    while !stop.load(Ordering::Relaxed) || !slots.is_empty() {
        while !stop.load(Ordering::Relaxed) && !free.is_empty() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let unit = (rng % units as u64) as usize;
            if busy[unit] {
                next += 1;
                if next % 64 == 0 {
                    break;
                }
                continue;
            }
            let b = free.pop().unwrap();
            let write = acked[unit].is_none() || rng & 1 == 0;
            let lba = unit as u64 * 8;
            let op = if write {
                stamp(bufs[b].as_mut_slice(), lba, gen);
                IoOp::Write
            } else {
                IoOp::Read
            };
            let cmd = IoCommand::with_buf(op, lba, 8, bufs[b].io_buf(), b as u64);
            // SAFETY: the buffers outlive the queue pair (declared first).
            unsafe { qp.submit(cmd) }.unwrap();
            slots.insert(b as u64, (unit, write, gen));
            busy[unit] = true;
            gen += 1;
        }
        let n = qp.poll(&mut cpl);
        for c in &cpl[..n] {
            let (unit, write, g) = slots.remove(&c.tag).unwrap();
            busy[unit] = false;
            let b = c.tag as usize;
            if !c.status.is_success() {
                failed += 1;
                if write {
                    acked[unit] = None;
                }
            } else if write {
                acked[unit] = Some(g);
            } else if let Some(want) = acked[unit] {
                let data = &bufs[b].as_slice()[..4096];
                let lba = unit as u64 * 8;
                let mut expect = vec![0u8; 4096];
                stamp(&mut expect, lba, want);
                checked += 8;
                if data != &expect[..] {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
            }
            free.push(b);
        }
    }
    drop(qp);
    (checked, failed)
}

/// `leg_attach` of `leg`, asked again until taken (up to 20 s).
fn attach(server: &Server, leg: usize, round: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, text) = server.rpc("leg_attach", &format!(r#"{{"volume":"vol0","leg":{leg}}}"#));
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "round {round}: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `leg`'s resync to make it whole. With a 300 ms I/O timeout a copy command on a
/// loaded machine may time out, which ends the resync failed (the leg stays faulted, as it
/// must): the operator's answer, another `leg_attach`, is given up to five times.
fn resync_until_in_sync(server: &Server, leg: usize, round: usize) {
    for _ in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let st = loop {
            let st = server.status();
            if st["resync"]["state"] != "running" && st["legs"][leg]["state"] != "resyncing" {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: resync still running: {st}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if st["legs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["state"] == "in_sync")
        {
            return;
        }
        let why = st["resync"]["error"].as_str().unwrap_or_default();
        assert!(
            why.contains("timed out"),
            "round {round}: resync failed: {st}"
        );
        eprintln!("round {round}: {why}; attaching leg {leg} again");
        attach(server, leg, round);
    }
    panic!("round {round}: leg {leg} not in sync after five resyncs");
}

/// `serve` on `legs` with a 300 ms I/O timeout; the drills on each leg in turn under the
/// load; then a scrub of the legs.
fn drill(legs: [String; 2]) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let server = Server::with_config(d, &format!(
            "[nvme_tcp]\nlisten = \"127.0.0.1:0\"\n\n[rpc]\nsocket = \"@DATA_DIR@/nvmirror.sock\"\n\n\
             [[volume]]\nname = \"vol0\"\nio_timeout = \"300ms\"\nlegs = [\"{}\", \"{}\"]\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nnamespaces = [\"vol0\"]\n",
            legs[0], legs[1]
        ));
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicU64::new(0));
    let (addr, s2, w2) = (
        server.nvme_tcp.clone(),
        Arc::clone(&stop),
        Arc::clone(&wrong),
    );
    let loader = std::thread::spawn(move || load(addr, s2, w2));
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..4 {
        let leg = round % 2;
        let armed = server.rpc_ok(
            "leg_fault_inject",
            &format!(r#"{{"volume":"vol0","leg":{leg},"fault":"hang"}}"#),
        );
        // The hung commands time out and the leg is faulted (on a loaded machine the other
        // leg may time out too now and then: those writes fail on both, and later ones fault
        // the hung leg).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = server.status();
            if st["legs"][leg]["state"] == "faulted" {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: {st}");
            std::thread::sleep(Duration::from_millis(50));
        }
        server.rpc_ok(
            "leg_fault_clear",
            &format!(r#"{{"volume":"vol0","leg":{leg},"id":{}}}"#, armed["id"]),
        );
        std::thread::sleep(Duration::from_millis(200));
        attach(&server, leg, round);
        resync_until_in_sync(&server, leg, round);
    }
    stop.store(true, Ordering::Relaxed);
    let (checked, failed) = loader.join().unwrap();
    let wrong = wrong.load(Ordering::Relaxed);
    eprintln!("{legs:?}: blocks checked {checked}, commands failed {failed}, wrong {wrong}");
    assert!(
        checked > 1000 && failed > 0,
        "the load and the drill both ran"
    );
    assert_eq!(wrong, 0, "blocks read back wrong");
    // The legs agree on every block.
    server.rpc_ok("verify_start", r#"{"volume":"vol0","repair":false}"#);
    let deadline = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v = server.rpc_ok("verify_status", r#"{"volume":"vol0"}"#);
        if v["state"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "verify did not finish: {v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        v["mismatched_regions"].as_array().map(Vec::len),
        Some(0),
        "{v}"
    );
    assert!(v["regions_checked"].as_u64().unwrap() > 0, "{v}");
    server.stop();
}

#[test]
fn hang_then_clear_on_file_legs_loses_nothing() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path().to_path_buf();
    drill([file_leg(&d, "a", "16MiB"), file_leg(&d, "b", "16MiB")]);
}

/// Legs that answer 1 ms after they copy: a read's buffer holds its data for that long before
/// the host is sent it, which is when a late completion into a recycled buffer would land.
#[test]
fn hang_then_clear_on_slow_mem_legs_loses_nothing() {
    drill([
        "mem://16MiB?latency=1ms".into(),
        "mem://16MiB?latency=1ms".into(),
    ]);
}
