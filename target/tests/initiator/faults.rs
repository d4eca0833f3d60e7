//! Failures: refused connects name their reason, a vanished target fails every command with
//! a path error, queue IDs run out and come back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_nvme::backend::{LatencyModel, MemDevice, NvmeTcpOptions};
use nvmirror_nvme::dma::IoBuf;
use nvmirror_nvme::{BlockDevice, Completion, IoCommand, IoOp, QueuePair, Status};

use super::harness::{pattern, read, run, start, start_with, write, SUBNQN};

#[test]
fn a_disallowed_host_is_refused_by_name() {
    let t = start(|c| c.subsystems[0].allowed_hosts = vec!["nqn.2024-01.io.nvmirror:ok".into()]);
    let err = t
        .connect("hostnqn=nqn.2024-01.io.nvmirror:intruder")
        .unwrap_err()
        .to_string();
    assert!(err.contains("admin Connect"), "{err}");
    assert!(err.contains("invalid host"), "{err}");
    assert!(err.contains("nqn.2024-01.io.nvmirror:intruder"), "{err}");
    assert_eq!(t.controllers(), 0);
    let ok = t.connect("hostnqn=nqn.2024-01.io.nvmirror:ok").unwrap();
    assert_eq!(ok.host_nqn(), "nqn.2024-01.io.nvmirror:ok");
    let mut qp = ok.open_qpair(2).unwrap();
    assert!(read(&mut *qp, 0, 512, 512).0.is_success());
}

#[test]
fn bring_up_failures_name_their_step() {
    let t = start(|_| {});
    let err = t
        .connect_with(&NvmeTcpOptions::new("nqn.2024-01.io.nvmirror:nope"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin Connect") && err.contains("subsystem NQN"),
        "{err}"
    );
    let err = t.connect("nsid=5").unwrap_err().to_string();
    assert!(
        err.contains("Identify Namespace 5") && err.contains("invalid namespace"),
        "{err}"
    );
    let err = t
        .connect_with(&NvmeTcpOptions::new(
            nvmirror_nvme::spec::fabrics::DISCOVERY_NQN,
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("discovery"), "{err}");
    // Nothing listens on a port that was just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = nvmirror_nvme::open_leg(&format!("nvme-tcp://127.0.0.1:{port}/{SUBNQN}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("TCP connect"), "{err}");
}

#[test]
fn the_target_going_away_fails_every_outstanding_command_with_a_path_error() {
    // Every command sits in the target's back end for 500 ms.
    let slow: Arc<dyn BlockDevice> = Arc::new(
        MemDevice::new(
            4 << 20,
            512,
            LatencyModel::Fixed(Duration::from_millis(500)),
        )
        .unwrap(),
    );
    let mut t = start_with(vec![slow], |_| {});
    let dev = t.connect("").unwrap();
    let mut qp = dev.open_tcp_qpair(32).unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|k| pattern(16 * 1024, k)).collect();
    for (k, b) in bufs.iter_mut().enumerate() {
        let op = if k % 2 == 0 { IoOp::Write } else { IoOp::Read };
        let cmd = IoCommand::with_buf(op, k as u64 * 32, 32, IoBuf::from_slice(b), k as u64);
        // SAFETY: `bufs` outlives `qp`'s use of them: every command is reaped below.
        unsafe { qp.submit(cmd) }.unwrap();
    }
    // Let everything reach the target, then take the target away.
    let mut cpl = [Completion::default(); 32];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(100) {
        assert_eq!(
            qp.poll(&mut cpl),
            0,
            "nothing completes within the injected latency"
        );
        std::thread::yield_now();
    }
    t.stop();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < 32 {
        assert!(Instant::now() < deadline, "{} of 32 completed", got.len());
        let n = qp.poll(&mut cpl);
        got.extend_from_slice(&cpl[..n]);
        std::thread::yield_now();
    }
    for c in &got {
        assert_eq!(c.status, Status::HOST_PATHING_ERROR, "command {}", c.tag);
    }
    let mut tags: Vec<u64> = got.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..32).collect::<Vec<_>>());
    assert!(qp.dead_reason().is_some());
    assert_eq!(qp.outstanding(), 0);
    // Later commands fail the same way, at once.
    let mut data = pattern(512, 1);
    assert_eq!(
        write(&mut qp, 0, &mut data, 512),
        Status::HOST_PATHING_ERROR
    );
    assert_eq!(
        run(&mut qp, IoCommand::new(IoOp::Flush, 0, 0, 9)),
        Status::HOST_PATHING_ERROR
    );
    // Opening another queue on the vanished controller fails with its step named.
    let err = dev.open_qpair(4).unwrap_err().to_string();
    assert!(err.contains("I/O queue"), "{err}");
}

#[test]
fn queue_ids_run_out_and_come_back() {
    let t = start(|c| c.max_io_queues = 2);
    let dev = t.connect("").unwrap();
    assert_eq!(dev.controller().io_queues, 2);
    let a = dev.open_tcp_qpair(4).unwrap();
    let b = dev.open_tcp_qpair(4).unwrap();
    assert_ne!(a.qid(), b.qid());
    let err = dev.open_qpair(4).unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    drop(a);
    // The queue ID comes back as soon as the target has closed the old queue.
    let mut c = dev.open_qpair(4).unwrap();
    let mut data = pattern(4096, 4);
    assert!(write(&mut *c, 8, &mut data, 512).is_success());
    drop(b);
    for _ in 0..5 {
        let mut q = dev.open_qpair(2).unwrap();
        assert_eq!(read(&mut *q, 8, 4096, 512).1, data);
    }
}

#[test]
fn a_queue_pair_outlives_its_target_restarting_and_holds_commands_for_fast_io_fail_tmo() {
    let mut t = start(|_| {});
    let (addr, namespaces) = (t.addr, t.namespaces.clone());
    let dev = t
        .connect("kato=1s&reconnect_delay=50ms&fast_io_fail_tmo=20s")
        .unwrap();
    let mut qp = dev.open_tcp_qpair(8).unwrap();
    let mut first = pattern(4096, 1);
    assert!(write(&mut qp, 0, &mut first, 512).is_success());
    assert_eq!(dev.link_status().generation, 1);
    // The first Keep Alive goes out as the admin thread starts; its round trip is known soon
    // after, not necessarily before the first write completes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while dev.link_status().rtt.is_none() {
        assert!(
            Instant::now() < deadline,
            "no Keep Alive round trip measured"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // The target goes away: the queue dies, and a write submitted now is held, not failed.
    t.stop();
    drop(t);
    let deadline = Instant::now() + Duration::from_secs(5);
    while qp.dead_reason().is_none() {
        let mut cpl = [Completion::default(); 4];
        assert_eq!(qp.poll(&mut cpl), 0);
        assert!(
            Instant::now() < deadline,
            "the queue never noticed the loss"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!dev.link_status().connected);
    let mut second = pattern(4096, 2);
    let cmd = IoCommand::with_buf(IoOp::Write, 64, 8, IoBuf::from_slice(&mut second), 7);
    // SAFETY: `second` outlives the command, which is reaped below.
    unsafe { qp.submit(cmd) }.unwrap();
    let mut cpl = [Completion::default(); 4];
    for _ in 0..20 {
        assert_eq!(qp.poll(&mut cpl), 0, "held while the target is away");
        std::thread::sleep(Duration::from_millis(10));
    }

    // The target returns on its address: the device reconnects, the queue pair takes its new
    // I/O queue and the held write goes out on it.
    let _t = start_with(namespaces, |cfg| cfg.listen = addr);
    let done = super::harness::reap(&mut qp, 1);
    assert_eq!(done[0].tag, 7);
    assert!(done[0].status.is_success(), "{}", done[0].status);
    assert!(qp.dead_reason().is_none());
    let st = dev.link_status();
    assert!(st.connected && st.generation == 2, "{st:?}");
    assert!(st.reconnect_attempts >= 1, "{st:?}");
    assert_eq!(read(&mut qp, 0, 4096, 512).1, first);
    assert_eq!(read(&mut qp, 64, 4096, 512).1, second);
    // A new queue pair opens on the new association too.
    let mut other = dev.open_tcp_qpair(4).unwrap();
    assert_eq!(read(&mut other, 64, 4096, 512).1, second);
}
