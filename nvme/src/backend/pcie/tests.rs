//! The driver against the fake controller: bring-up, Identify, I/O with every PRP shape,
//! MDTS splitting, the shared conformance checks, and every error path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::{FakeConfig, FakeController, FakeFault, PcieDevice, PcieOptions};
use crate::backend::conformance::{check_against_model, io, model_op, run};
use crate::dma::{DmaPool, IoBuf};
use crate::queue::{BlockDevice, IoCommand, IoOp, QueuePair};
use crate::spec::Status;
use crate::Error;

fn opts() -> PcieOptions {
    PcieOptions {
        timeout: Duration::from_millis(300),
        ..PcieOptions::default()
    }
}

fn open(cfg: FakeConfig, opts: &PcieOptions) -> (FakeController, PcieDevice) {
    let fake = FakeController::new(cfg);
    let dev = PcieDevice::new(Arc::new(fake.clone()), opts).expect("bring-up");
    (fake, dev)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 7 + i / 4096) as u8))
        .collect()
}

/// Writes `data` from `buf` at `slba` and reads it back into the same buffer region.
fn write_read(qp: &mut dyn QueuePair, buf: IoBuf, slba: u64, data: &[u8], lba: usize) {
    // SAFETY: `buf` is valid for `data.len()` bytes and idle (no command outstanding).
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.as_ptr(), data.len()) };
    let nlb = (data.len() / lba) as u32;
    let b = buf.prefix(data.len());
    let w = run(
        qp,
        IoCommand::with_buf(IoOp::Write, slba, nlb, b, 1),
        Duration::from_secs(2),
    );
    assert_eq!(w, Some(Status::SUCCESS));
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(buf.as_ptr(), 0, data.len()) };
    let r = run(
        qp,
        IoCommand::with_buf(IoOp::Read, slba, nlb, b, 2),
        Duration::from_secs(2),
    );
    assert_eq!(r, Some(Status::SUCCESS));
    let mut back = vec![0u8; data.len()];
    // SAFETY: as above; the read was reaped.
    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), back.as_mut_ptr(), data.len()) };
    assert!(back == data, "read back differs");
}

#[test]
fn bring_up_identifies_the_namespace_and_applies_mdts() {
    let cfg = FakeConfig {
        bytes: 8 << 20,
        lba_size: 4096,
        mdts: 3,
        ..FakeConfig::default()
    };
    let (fake, dev) = open(cfg, &opts());
    assert_eq!(dev.geometry().lba_size, 4096);
    assert_eq!(dev.geometry().num_blocks, 2048);
    assert_eq!(dev.max_transfer(), 32 << 10, "MDTS 3 = 8 pages");
    assert_eq!(
        dev.model_serial(),
        ("nvmirror fake controller", "NVMIRRORFAKE0001")
    );
    // Identify Controller, Identify Namespace, Set Features Number of Queues.
    assert_eq!(fake.stats().admin_commands, 3);
    let qp = dev.open_qpair(16).unwrap();
    assert_eq!(fake.io_queues(), 1);
    drop(qp);
    assert_eq!(
        fake.io_queues(),
        0,
        "closing a queue pair deletes its SQ and CQ"
    );
}

#[test]
fn bring_up_waits_cap_to_for_ready_and_then_fails() {
    let cfg = FakeConfig {
        ready_delay: None,
        to: 1,
        ..FakeConfig::default()
    };
    let fake = FakeController::new(cfg);
    let t = Instant::now();
    let err = PcieDevice::new(Arc::new(fake), &opts()).unwrap_err();
    let waited = t.elapsed();
    assert!(
        matches!(&err, Error::Pcie { step, .. } if step.contains("CSTS.RDY=1")),
        "{err}"
    );
    assert!(
        waited >= Duration::from_millis(500),
        "CAP.TO = 1 is 500 ms, waited {waited:?}"
    );
    // A slow controller within CAP.TO is fine.
    let slow = FakeConfig {
        ready_delay: Some(Duration::from_millis(200)),
        to: 1,
        ..FakeConfig::default()
    };
    open(slow, &opts());
}

#[test]
fn bring_up_names_a_gone_device_a_bad_namespace_and_a_fatal_start() {
    let fake = FakeController::new(FakeConfig::default());
    fake.inject(FakeFault::Remove);
    let err = PcieDevice::new(Arc::new(fake), &opts()).unwrap_err();
    assert!(err.to_string().contains("all-ones"), "{err}");

    let fake = FakeController::new(FakeConfig::default());
    let o = PcieOptions { nsid: 2, ..opts() };
    let err = PcieDevice::new(Arc::new(fake), &o).unwrap_err();
    assert!(err.to_string().contains("Identify Namespace 2"), "{err}");

    // A controller whose admin queue cannot hold two entries refuses to start (CFS).
    let fake = FakeController::new(FakeConfig {
        mqes: 1,
        ..FakeConfig::default()
    });
    let err = PcieDevice::new(Arc::new(fake), &opts()).unwrap_err();
    assert!(err.to_string().contains("CSTS.CFS"), "{err}");
}

#[test]
fn io_with_one_two_and_list_prps_direct_and_unaligned() {
    let (fake, dev) = open(FakeConfig::default(), &opts());
    let mut qp = dev.open_qpair(8).unwrap();
    let mut pool = DmaPool::new(2, 64 << 10);
    // SAFETY: the pool outlives the queue pair.
    unsafe { qp.register_buffers(&pool) }.unwrap();
    let buf = pool.get().unwrap().io_buf();
    for (len, off, want_pages) in [
        (4096, 0, 1),
        (8192, 0, 2),
        (32 << 10, 0, 8),
        // 512 bytes into a page: 4 KiB spans two pages, 12 KiB four (a PRP list).
        (4096, 512, 2),
        (12 << 10, 512, 4),
    ] {
        let b = buf.offset(off);
        let data = pattern(len, len as u8);
        write_read(&mut *qp, b, 100, &data, 512);
        assert_eq!(fake.read_media(100 * 512, len), data);
        assert!(fake.stats().max_pages >= want_pages);
    }
    assert!(
        fake.stats().prp_list_pages >= 2,
        "8-page and 4-page transfers use lists"
    );
    drop(qp);
    assert_eq!(fake.mapped_bytes() % 4096, 0);
}

#[test]
fn prp_lists_chain_across_list_pages() {
    let cfg = FakeConfig {
        bytes: 8 << 20,
        mdts: 0,
        ..FakeConfig::default()
    };
    let o = PcieOptions {
        max_transfer: 4 << 20,
        queue_size: 4,
        ..opts()
    };
    let (fake, dev) = open(cfg, &o);
    assert_eq!(dev.max_transfer(), 4 << 20);
    let mut qp = dev.open_qpair(2).unwrap();
    let mut pool = DmaPool::new(1, 4 << 20);
    // SAFETY: the pool outlives the queue pair.
    unsafe { qp.register_buffers(&pool) }.unwrap();
    let buf = pool.get().unwrap().io_buf();
    let before = fake.stats();
    let data = pattern(4 << 20, 3);
    write_read(&mut *qp, buf, 0, &data, 512);
    let after = fake.stats();
    assert_eq!(
        after.io_commands - before.io_commands,
        2,
        "no split under MDTS 0"
    );
    assert_eq!(after.max_pages, 1024);
    // 1023 list entries per command: 511 + chain, then 512: two list pages each.
    assert_eq!(after.prp_list_pages - before.prp_list_pages, 4);
    assert!(fake.read_media(0, 4 << 20) == data);
}

#[test]
fn mdts_splits_a_large_command_and_bounces_unregistered_buffers() {
    let cfg = FakeConfig {
        mdts: 1,
        ..FakeConfig::default()
    };
    let (fake, dev) = open(cfg, &opts());
    assert_eq!(dev.max_transfer(), 8192);
    let mut qp = dev.open_qpair(4).unwrap();
    let mut data = pattern(64 << 10, 9);
    let before = fake.stats().io_commands;
    assert_eq!(
        io(&mut *qp, IoOp::Write, 8, &mut data.clone(), 512),
        Status::SUCCESS
    );
    assert_eq!(
        fake.stats().io_commands - before,
        8,
        "64 KiB at 8 KiB per command"
    );
    assert!(fake.read_media(8 * 512, 64 << 10) == data);
    let mut back = vec![0u8; 64 << 10];
    assert_eq!(io(&mut *qp, IoOp::Read, 8, &mut back, 512), Status::SUCCESS);
    assert!(back == data);
    // An error in one part fails the whole command.
    fake.inject(FakeFault::Status {
        status: Status::WRITE_FAULT,
        count: 1,
    });
    assert_eq!(
        io(&mut *qp, IoOp::Write, 8, &mut data, 512),
        Status::WRITE_FAULT
    );
}

#[test]
fn invalid_commands_complete_with_their_status_without_the_controller() {
    let (fake, dev) = open(FakeConfig::default(), &opts());
    let mut qp = dev.open_qpair(4).unwrap();
    let blocks = dev.geometry().num_blocks;
    let before = fake.stats().io_commands;
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        io(&mut *qp, IoOp::Read, blocks - 1, &mut buf, 512),
        Status::LBA_OUT_OF_RANGE
    );
    let short = IoCommand::with_buf(IoOp::Write, 0, 16, IoBuf::from_slice(&mut buf), 5);
    assert_eq!(
        run(&mut *qp, short, Duration::from_secs(1)),
        Some(Status::DATA_SGL_LENGTH_INVALID)
    );
    assert_eq!(fake.stats().io_commands, before);
    assert_eq!(qp.outstanding(), 0);
}

#[test]
fn injected_status_reaches_the_caller() {
    let (fake, dev) = open(FakeConfig::default(), &opts());
    let mut qp = dev.open_qpair(4).unwrap();
    fake.inject(FakeFault::Status {
        status: Status::UNRECOVERED_READ_ERROR,
        count: 1,
    });
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        io(&mut *qp, IoOp::Read, 0, &mut buf, 512),
        Status::UNRECOVERED_READ_ERROR
    );
    assert_eq!(io(&mut *qp, IoOp::Read, 0, &mut buf, 512), Status::SUCCESS);
    assert!(!dev.is_failed());
}

#[test]
fn a_command_that_never_completes_times_out_resets_and_faults() {
    let (fake, dev) = open(FakeConfig::default(), &opts());
    let mut qp = dev.open_qpair(4).unwrap();
    fake.inject(FakeFault::Hang { count: 1 });
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    let got = run(
        &mut *qp,
        IoCommand::with_buf(IoOp::Write, 0, 8, IoBuf::from_slice(&mut buf), 3),
        Duration::from_secs(5),
    );
    assert_eq!(got, Some(Status::INTERNAL_PATH_ERROR.with_dnr()));
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "the timeout is 300 ms"
    );
    assert!(dev.is_failed() && !dev.is_gone());
    assert_eq!(
        fake.stats().resets,
        1,
        "the controller was reset (CC.EN = 0)"
    );
    assert_eq!(fake.held(), 0, "the reset dropped the held command");
    // Later commands fail at once; a new queue pair is refused.
    assert_eq!(
        io(&mut *qp, IoOp::Read, 0, &mut buf, 512),
        Status::INTERNAL_PATH_ERROR.with_dnr()
    );
    assert!(dev.open_qpair(4).is_err());
}

#[test]
fn controller_fatal_status_fails_every_queue_pair() {
    let (fake, dev) = open(FakeConfig::default(), &opts());
    let mut a = dev.open_qpair(4).unwrap();
    let mut b = dev.open_qpair(4).unwrap();
    let mut buf = vec![0u8; 4096];
    fake.inject(FakeFault::Fatal);
    assert_eq!(
        io(&mut *a, IoOp::Write, 0, &mut buf, 512),
        Status::INTERNAL_PATH_ERROR.with_dnr()
    );
    assert!(dev.is_failed());
    assert_eq!(
        io(&mut *b, IoOp::Read, 0, &mut buf, 512),
        Status::INTERNAL_PATH_ERROR.with_dnr()
    );
    assert_eq!(fake.stats().resets, 1);
}

#[test]
fn surprise_removal_marks_the_device_gone() {
    let (fake, dev) = open(FakeConfig::default(), &opts());
    let mut qp = dev.open_qpair(4).unwrap();
    let mut buf = vec![0u8; 4096];
    fake.inject(FakeFault::Remove);
    assert_eq!(
        io(&mut *qp, IoOp::Write, 0, &mut buf, 512),
        Status::HOST_PATHING_ERROR.with_dnr()
    );
    assert!(dev.is_gone());
    assert_eq!(fake.stats().resets, 0, "a gone device is not reset");
    drop(qp);
}

#[test]
fn queue_pairs_are_limited_to_the_granted_queues() {
    let cfg = FakeConfig {
        max_io_queues: 2,
        ..FakeConfig::default()
    };
    let (_fake, dev) = open(cfg, &opts());
    let a = dev.open_qpair(4).unwrap();
    let _b = dev.open_qpair(4).unwrap();
    let err = dev.open_qpair(4).unwrap_err();
    assert!(err.to_string().contains("granted"), "{err}");
    drop(a);
    dev.open_qpair(4)
        .expect("a closed queue pair's id is reused");
}

#[test]
fn batches_ring_one_doorbell_per_poll() {
    let (fake, dev) = open(FakeConfig::default(), &opts());
    let mut qp = dev.open_qpair(32).unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; 4096]).collect();
    let before = fake.stats();
    for (i, b) in bufs.iter_mut().enumerate() {
        let cmd = IoCommand::with_buf(IoOp::Read, i as u64 * 8, 8, IoBuf::from_slice(b), i as u64);
        // SAFETY: the buffers outlive the polls below.
        unsafe { qp.submit(cmd) }.unwrap();
    }
    let mut cpl = [crate::Completion::default(); 32];
    let n = qp.poll(&mut cpl);
    assert_eq!(n, 16);
    let after = fake.stats();
    assert_eq!(after.sq_doorbells - before.sq_doorbells, 1);
    assert_eq!(after.cq_doorbells - before.cq_doorbells, 1);
    assert!(cpl[..n].iter().all(|c| c.status.is_success()));
}

#[test]
fn trim_and_write_zeroes_reach_the_medium() {
    let (fake, dev) = open(FakeConfig::default(), &opts());
    let mut qp = dev.open_qpair(4).unwrap();
    let mut data = pattern(8192, 1);
    assert_eq!(
        io(&mut *qp, IoOp::Write, 0, &mut data, 512),
        Status::SUCCESS
    );
    let z = run(
        &mut *qp,
        IoCommand::new(IoOp::WriteZeroes, 0, 4, 9),
        Duration::from_secs(1),
    );
    let t = run(
        &mut *qp,
        IoCommand::new(IoOp::Deallocate, 8, 4, 9),
        Duration::from_secs(1),
    );
    assert_eq!((z, t), (Some(Status::SUCCESS), Some(Status::SUCCESS)));
    let media = fake.read_media(0, 8192);
    assert!(media[..2048].iter().all(|&b| b == 0));
    assert_eq!(media[2048..4096], data[2048..4096]);
    assert!(media[4096..6144].iter().all(|&b| b == 0));
    let f = run(
        &mut *qp,
        IoCommand::new(IoOp::Flush, 0, 0, 9),
        Duration::from_secs(1),
    );
    assert_eq!(f, Some(Status::SUCCESS));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn conformance_against_the_model(ops in proptest::collection::vec(model_op(512), 1..24)) {
        let cfg = FakeConfig { bytes: 256 << 10, mdts: 2, ..FakeConfig::default() };
        let (_fake, dev) = open(cfg, &opts());
        check_against_model(&dev, &ops);
    }
}
