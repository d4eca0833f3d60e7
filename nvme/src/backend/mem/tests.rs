use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::backend::conformance::{check_against_model, model_op, run};
use crate::backend::{Fault, FaultyDevice, OpFilter};
use crate::dma::IoBuf;
use crate::queue::read_all;

use crate::backend::conformance::io;

#[test]
fn write_read_round_trip_and_untouched_reads_zero() {
    let dev = MemDevice::new(1 << 30, 512, LatencyModel::None).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let mut data: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
    // A write that straddles a 64 KiB chunk boundary.
    assert!(io(&mut *qp, IoOp::Write, 120, &mut data, 512).is_success());
    let mut back = vec![0xffu8; 8192];
    assert!(io(&mut *qp, IoOp::Read, 120, &mut back, 512).is_success());
    assert_eq!(back, data);
    let mut far = vec![0xffu8; 4096];
    assert!(io(&mut *qp, IoOp::Read, 1_000_000, &mut far, 512).is_success());
    assert!(far.iter().all(|&b| b == 0));
    assert!(
        dev.resident_bytes() <= 2 * 65536,
        "sparse: only touched chunks are resident"
    );
}

#[test]
fn terabyte_namespace_is_sparse() {
    let dev = MemDevice::new(1 << 40, 4096, LatencyModel::None).unwrap();
    let mut qp = dev.open_qpair(1).unwrap();
    let mut b = vec![1u8; 4096];
    let last = dev.geometry().num_blocks - 1;
    assert!(io(&mut *qp, IoOp::Write, last, &mut b, 4096).is_success());
    assert_eq!(dev.resident_bytes(), 65536);
}

#[test]
fn out_of_range_is_rejected_without_touching_data() {
    let dev = MemDevice::new(1 << 20, 512, LatencyModel::None).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let blocks = dev.geometry().num_blocks;
    let mut pattern = vec![0x5au8; 1024];
    assert!(io(&mut *qp, IoOp::Write, blocks - 2, &mut pattern, 512).is_success());
    // Straddles the end: must fail and must not write the in-range block.
    let mut other = vec![0xa5u8; 1024];
    assert_eq!(
        io(&mut *qp, IoOp::Write, blocks - 1, &mut other, 512),
        Status::LBA_OUT_OF_RANGE
    );
    let cmd = IoCommand::new(IoOp::WriteZeroes, blocks - 1, 2, 9);
    assert_eq!(
        run(&mut *qp, cmd, Duration::from_secs(1)),
        Some(Status::LBA_OUT_OF_RANGE)
    );
    let cmd = IoCommand::new(IoOp::Deallocate, u64::MAX, 1, 9);
    assert_eq!(
        run(&mut *qp, cmd, Duration::from_secs(1)),
        Some(Status::LBA_OUT_OF_RANGE)
    );
    let mut back = vec![0u8; 1024];
    assert!(io(&mut *qp, IoOp::Read, blocks - 2, &mut back, 512).is_success());
    assert_eq!(back, pattern);
    // A buffer smaller than the transfer is an error too.
    let mut small = vec![0u8; 512];
    let cmd = IoCommand::with_buf(IoOp::Read, 0, 2, IoBuf::from_slice(&mut small), 3);
    assert_eq!(
        run(&mut *qp, cmd, Duration::from_secs(1)),
        Some(Status::DATA_SGL_LENGTH_INVALID)
    );
}

#[test]
fn queue_full_is_reported_and_clears_after_poll() {
    let dev = MemDevice::new(1 << 20, 512, LatencyModel::None).unwrap();
    let mut qp = dev.open_qpair(2).unwrap();
    for tag in 0..2 {
        // SAFETY: no data buffer.
        unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, tag)) }.unwrap();
    }
    // SAFETY: no data buffer.
    let full = unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 2)) };
    assert_eq!(full, Err(SubmitError::QueueFull));
    let mut cpl = [Completion::default(); 8];
    assert_eq!(qp.poll(&mut cpl), 2);
    assert_eq!(qp.outstanding(), 0);
    // SAFETY: no data buffer.
    unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 3)) }.unwrap();
}

#[test]
fn fixed_latency_holds_completions_back() {
    let dev = MemDevice::new(1 << 20, 512, LatencyModel::Fixed(Duration::from_millis(20))).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let start = Instant::now();
    let status = run(
        &mut *qp,
        IoCommand::new(IoOp::Flush, 0, 0, 1),
        Duration::from_secs(5),
    );
    assert_eq!(status, Some(Status::SUCCESS));
    assert!(start.elapsed() >= Duration::from_millis(20));
}

#[test]
fn random_latency_models_complete_everything() {
    for model in [
        LatencyModel::Uniform {
            mean: Duration::from_micros(50),
            spread: Duration::from_micros(40),
        },
        LatencyModel::LogNormal {
            mean: Duration::from_micros(50),
            sigma: 0.8,
        },
    ] {
        let dev = MemDevice::new(1 << 20, 512, model).unwrap();
        let mut qp = dev.open_qpair(64).unwrap();
        for tag in 0..64 {
            // SAFETY: no data buffer.
            unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, tag)) }.unwrap();
        }
        let mut seen = [false; 64];
        let mut cpl = [Completion::default(); 16];
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.iter().any(|s| !s) && Instant::now() < deadline {
            let n = qp.poll(&mut cpl);
            for c in &cpl[..n] {
                assert!(!seen[c.tag as usize], "completed twice");
                seen[c.tag as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s), "{model:?} lost completions");
        assert_eq!(qp.outstanding(), 0);
    }
}

fn faulty() -> (FaultyDevice, Box<dyn QueuePair>) {
    let inner: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(1 << 20, 512, LatencyModel::None).unwrap());
    let dev = FaultyDevice::wrap(inner);
    let qp = dev.open_qpair(8).unwrap();
    (dev, qp)
}

#[test]
fn fault_fail_range_hits_only_its_ops_and_lbas() {
    let (dev, mut qp) = faulty();
    let status = Status::WRITE_FAULT.with_dnr();
    let id = dev.injector().arm(Fault::FailRange {
        ops: OpFilter::Writes,
        slba: 100,
        nlb: 10,
        status,
    });
    let mut b = vec![1u8; 1024];
    assert_eq!(io(&mut *qp, IoOp::Write, 109, &mut b, 512), status);
    assert!(io(&mut *qp, IoOp::Write, 110, &mut b, 512).is_success());
    assert!(
        io(&mut *qp, IoOp::Read, 100, &mut b, 512).is_success(),
        "reads are not affected"
    );
    let cmd = IoCommand::new(IoOp::WriteZeroes, 95, 10, 1);
    assert_eq!(run(&mut *qp, cmd, Duration::from_secs(1)), Some(status));
    assert!(dev.injector().clear(id));
    assert!(io(&mut *qp, IoOp::Write, 100, &mut b, 512).is_success());

    let read_err = Status::UNRECOVERED_READ_ERROR;
    dev.injector().arm(Fault::FailRange {
        ops: OpFilter::Reads,
        slba: 0,
        nlb: 1,
        status: read_err,
    });
    assert_eq!(io(&mut *qp, IoOp::Read, 0, &mut b, 512), read_err);
}

#[test]
fn fault_fail_after_n_ops() {
    let (dev, mut qp) = faulty();
    dev.injector().arm(Fault::FailAfter {
        n: 3,
        status: Status::INTERNAL_ERROR,
    });
    let mut b = vec![1u8; 512];
    for _ in 0..3 {
        assert!(io(&mut *qp, IoOp::Write, 0, &mut b, 512).is_success());
    }
    for _ in 0..3 {
        assert_eq!(
            io(&mut *qp, IoOp::Read, 0, &mut b, 512),
            Status::INTERNAL_ERROR
        );
    }
    dev.injector().clear_all();
    assert!(io(&mut *qp, IoOp::Read, 0, &mut b, 512).is_success());
}

#[test]
fn fault_hang_holds_until_cleared_then_completes_late() {
    let (dev, mut qp) = faulty();
    let id = dev.injector().arm(Fault::Hang { ops: OpFilter::All });
    let cmd = IoCommand::new(IoOp::Flush, 0, 0, 42);
    assert_eq!(
        run(&mut *qp, cmd, Duration::from_millis(50)),
        None,
        "hung command completed"
    );
    assert_eq!(qp.outstanding(), 1);
    dev.injector().clear(id);
    let mut cpl = [Completion::default(); 4];
    let n = qp.poll(&mut cpl);
    assert_eq!(
        &cpl[..n],
        &[Completion {
            tag: 42,
            status: Status::SUCCESS
        }]
    );
    assert_eq!(qp.outstanding(), 0);
}

#[test]
fn a_hung_command_is_cancelled_with_abort_requested_while_the_fault_stays_armed() {
    let (dev, mut qp) = faulty();
    dev.injector().arm(Fault::Hang {
        ops: OpFilter::Writes,
    });
    let mut b = vec![7u8; 512];
    let w = IoCommand::with_buf(IoOp::Write, 3, 1, IoBuf::from_slice(&mut b), 42);
    // SAFETY: `b` outlives the command, which is reaped (cancelled) below.
    unsafe { qp.submit(w) }.unwrap();
    assert_eq!(
        run(
            &mut *qp,
            IoCommand::new(IoOp::Flush, 0, 0, 43),
            Duration::from_secs(1)
        ),
        Some(Status::SUCCESS)
    );
    assert_eq!(qp.outstanding(), 1, "the write hangs");
    assert_eq!(qp.cancel(&[7, 43]), 0, "no such command outstanding");
    assert_eq!(qp.cancel(&[42]), 1);
    let mut cpl = [Completion::default(); 4];
    let n = qp.poll(&mut cpl);
    assert_eq!(
        &cpl[..n],
        &[Completion {
            tag: 42,
            status: Status::ABORT_REQUESTED
        }]
    );
    assert_eq!(qp.outstanding(), 0);
    // The cancelled write never reached the medium, and does not once the fault is cleared.
    dev.injector().clear_all();
    assert_eq!(qp.poll(&mut cpl), 0);
    let mut back = vec![0xffu8; 512];
    assert!(io(&mut *qp, IoOp::Read, 3, &mut back, 512).is_success());
    assert!(back.iter().all(|&x| x == 0));
}

#[test]
fn closing_a_queue_pair_with_hung_commands_is_fenced_at_once() {
    let (dev, mut qp) = faulty();
    dev.injector().arm(Fault::Hang { ops: OpFilter::All });
    // SAFETY: a flush carries no buffer.
    unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 1)) }.unwrap();
    assert_eq!(qp.outstanding(), 1);
    assert!(
        qp.close().is_done(),
        "a hung command never reached the device"
    );
}

#[test]
fn unaligned_copies_round_trip_byte_for_byte() {
    let store = store::SparseStore::new(1 << 20);
    let src: Vec<u8> = (0..300u32).map(|i| (i * 7 + 1) as u8).collect();
    for off in [0u64, 1, 5, 8, 65533] {
        for len in [1usize, 7, 8, 9, 300] {
            // SAFETY: both vectors hold `len` bytes; the range is inside the store.
            unsafe { store.write(off, src.as_ptr(), len) };
            let mut back = vec![0u8; len + 2];
            // SAFETY: `back` holds `len + 2` bytes.
            unsafe { store.read(off, back.as_mut_ptr().add(1), len) };
            assert_eq!(&back[1..=len], &src[..len], "off {off} len {len}");
            assert_eq!(
                (back[0], back[len + 1]),
                (0, 0),
                "nothing outside the range"
            );
        }
    }
    store.zero(3, 10);
    let mut back = [0xffu8; 16];
    // SAFETY: as above.
    unsafe { store.read(0, back.as_mut_ptr(), 16) };
    assert_eq!(&back[3..13], &[0; 10]);
    // Bytes around the zeroed range keep the last writes (at offsets 1 and 8).
    assert_eq!((back[2], back[13]), (src[1], src[5]));
}

#[test]
fn fault_gone_fails_everything_with_a_path_error() {
    let (dev, mut qp) = faulty();
    dev.injector().arm(Fault::Gone);
    let mut b = vec![1u8; 512];
    for op in [IoOp::Read, IoOp::Write] {
        let s = io(&mut *qp, op, 0, &mut b, 512);
        assert_eq!(s, Status::HOST_PATHING_ERROR.with_dnr());
        assert!(s.dnr());
    }
    let cmd = IoCommand::new(IoOp::Flush, 0, 0, 1);
    assert_eq!(
        run(&mut *qp, cmd, Duration::from_secs(1)),
        Some(Status::HOST_PATHING_ERROR.with_dnr())
    );
}

#[test]
fn queues_on_different_threads_share_the_namespace() {
    let dev = Arc::new(MemDevice::new(64 << 20, 4096, LatencyModel::None).unwrap());
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                let mut qp = dev.open_qpair(8).unwrap();
                for i in 0..256u64 {
                    let mut b = vec![t + 1; 4096];
                    assert!(
                        io(&mut *qp, IoOp::Write, i * 4 + u64::from(t), &mut b, 4096).is_success()
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let all = read_all(&*dev).unwrap();
    for i in 0..1024usize {
        assert!(all[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == (i % 4) as u8 + 1));
    }
}

const PREALLOC: MemOptions = MemOptions {
    hugepages: true,
    prealloc: true,
};

#[test]
fn a_preallocated_store_reads_writes_and_trims_like_a_sparse_one() {
    for opts in [
        PREALLOC,
        MemOptions {
            hugepages: false,
            prealloc: true,
        },
        MemOptions {
            hugepages: true,
            prealloc: false,
        },
    ] {
        let dev = MemDevice::with_options(8 << 20, 512, LatencyModel::None, opts).unwrap();
        assert!(dev.hugepages().is_some(), "{opts:?}: one mapping");
        assert_eq!(dev.resident_bytes(), 8 << 20, "{opts:?}");
        let mut qp = dev.open_qpair(4).unwrap();
        let mut fresh = vec![0xffu8; 65536];
        assert!(io(&mut *qp, IoOp::Read, 1000, &mut fresh, 512).is_success());
        assert!(
            fresh.iter().all(|&b| b == 0),
            "{opts:?}: reads zero at first"
        );
        // Straddles a 64 KiB chunk and a 2 MiB hugepage boundary.
        let first = (2 << 20) / 512 - 9;
        let mut data: Vec<u8> = (0..20 * 512).map(|i| (i % 253) as u8 + 1).collect();
        assert!(io(&mut *qp, IoOp::Write, first, &mut data, 512).is_success());
        let mut back = vec![0u8; data.len()];
        assert!(io(&mut *qp, IoOp::Read, first, &mut back, 512).is_success());
        assert_eq!(back, data, "{opts:?}");
        // A trim over whole pages and partial ones zeroes exactly its blocks.
        let cmd = IoCommand::new(IoOp::Deallocate, first + 1, 18, 7);
        assert_eq!(
            run(&mut *qp, cmd, Duration::from_secs(1)),
            Some(Status::SUCCESS)
        );
        assert!(io(&mut *qp, IoOp::Read, first, &mut back, 512).is_success());
        assert_eq!(back[..512], data[..512], "{opts:?}");
        assert!(back[512..19 * 512].iter().all(|&b| b == 0), "{opts:?}");
        assert_eq!(back[19 * 512..], data[19 * 512..], "{opts:?}");
        // The last block, at the end of the mapping.
        let last = dev.geometry().num_blocks - 1;
        let mut one = vec![0x3cu8; 512];
        assert!(io(&mut *qp, IoOp::Write, last, &mut one, 512).is_success());
        let mut got = vec![0u8; 512];
        assert!(io(&mut *qp, IoOp::Read, last, &mut got, 512).is_success());
        assert_eq!(got, one);
    }
}

#[test]
fn a_preallocated_store_sits_on_hugepages_where_the_kernel_has_them() {
    let thp = crate::mmap::ThpMode::current();
    let dev = MemDevice::with_options(16 << 20, 512, LatencyModel::None, PREALLOC).unwrap();
    if !thp.allows_advised() {
        assert!(matches!(dev.hugepages(), Some(Hugepages::Unavailable(_))));
        eprintln!("transparent hugepages are {thp:?} here: nothing more to check");
        return;
    }
    assert_eq!(dev.hugepages(), Some(Hugepages::Advised));
    // Faulted in at open, before any write: the kernel may fail to find contiguous memory
    // for some of it, not for all.
    let huge = dev.huge_bytes().unwrap();
    assert!(huge >= 2 << 20, "AnonHugePages {huge} bytes of 16 MiB");
    // The default store stays sparse and off hugepages.
    assert_eq!(
        MemDevice::new(16 << 20, 512, LatencyModel::None)
            .unwrap()
            .hugepages(),
        None
    );
}

#[test]
fn prealloc_beyond_the_available_memory_is_refused() {
    let err = MemDevice::with_options(1 << 50, 4096, LatencyModel::None, PREALLOC).unwrap_err();
    assert!(
        matches!(err, Error::Prealloc { bytes, .. } if bytes == 1 << 50),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn mem_matches_a_model(ops in proptest::collection::vec(model_op(600), 1..40)) {
        let dev = MemDevice::new(600 * 512, 512, LatencyModel::None).unwrap();
        check_against_model(&dev, &ops);
    }

    #[test]
    fn mem_4k_matches_a_model(ops in proptest::collection::vec(model_op(80), 1..40)) {
        let dev = MemDevice::new(80 * 4096, 4096, LatencyModel::None).unwrap();
        check_against_model(&dev, &ops);
    }

    #[test]
    fn mapped_stores_match_a_model(
        ops in proptest::collection::vec(model_op(600), 1..40),
        prealloc in any::<bool>(),
    ) {
        let opts = MemOptions { hugepages: true, prealloc };
        let dev = MemDevice::with_options(600 * 512, 512, LatencyModel::None, opts).unwrap();
        check_against_model(&dev, &ops);
    }
}
