//! Commands on file legs: data, statuses, queue depth, zeroing, the model checks.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::bounce::Bounced;
use super::*;
use crate::backend::conformance::{check_against_model, model_op, run};
use crate::dma::{DmaPool, IoBuf};
use crate::queue::{read_all, IoOp, SubmitError};

#[test]
fn direct_round_trip_at_queue_depth() {
    let dir = scratch_dir();
    let dev = UringDevice::open(&dir.path().join("leg.img"), &opts(8 << 20)).unwrap();
    assert_eq!(dev.geometry().bytes(), 8 << 20);
    assert_eq!(
        dev.name(),
        format!("file://{}", dir.path().join("leg.img").display())
    );
    let mut qp = dev.open_qpair(32).unwrap();
    let mut pool = DmaPool::new(32, 8192);
    let mut bufs: Vec<_> = (0..32).map(|_| pool.get().unwrap()).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        b.as_mut_slice().fill(i as u8 + 1);
    }
    let writes: Vec<_> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| IoCommand::with_buf(IoOp::Write, i as u64 * 40, 16, b.io_buf(), i as u64))
        .collect();
    assert!(run_all(&mut *qp, &writes).iter().all(|s| s.is_success()));
    for b in &mut bufs {
        b.as_mut_slice().fill(0);
    }
    let reads: Vec<_> = writes
        .iter()
        .map(|w| IoCommand {
            op: IoOp::Read,
            ..*w
        })
        .collect();
    assert!(run_all(&mut *qp, &reads).iter().all(|s| s.is_success()));
    for (i, b) in bufs.iter().enumerate() {
        assert!(b.as_slice().iter().all(|&x| x == i as u8 + 1), "buffer {i}");
    }
    // The data is in the file itself, not only in this queue pair's view.
    let image = std::fs::read(dir.path().join("leg.img")).unwrap();
    assert!(image[40 * 512..56 * 512].iter().all(|&x| x == 2));
    assert!(image[56 * 512..80 * 512].iter().all(|&x| x == 0));
}

#[test]
fn one_enter_per_poll_for_a_whole_batch() {
    let dir = scratch_dir();
    let dev = UringDevice::open(&dir.path().join("leg.img"), &opts(1 << 20)).unwrap();
    let mut qp = dev.open_uring_qpair(32).unwrap();
    let mut pool = DmaPool::new(32, 4096);
    let bufs: Vec<_> = (0..32).map(|_| pool.get().unwrap()).collect();
    for (i, b) in bufs.iter().enumerate() {
        let cmd = IoCommand::with_buf(IoOp::Write, i as u64 * 8, 8, b.io_buf(), i as u64);
        // SAFETY: the buffers outlive the queue pair, whose drop waits for the kernel.
        unsafe { qp.submit(cmd) }.unwrap();
    }
    assert_eq!(qp.enter_calls(), 0, "submit must not enter the kernel");
    let mut cpl = [Completion::default(); 32];
    let mut done = qp.poll(&mut cpl);
    assert_eq!(qp.enter_calls(), 1, "32 SQEs, one io_uring_enter");
    let mut polls = 1;
    while done < 32 {
        done += qp.poll(&mut cpl);
        polls += 1;
        assert!(polls < 10_000_000, "writes never completed");
    }
    assert!(qp.enter_calls() <= polls);
}

#[test]
fn out_of_range_is_rejected_without_touching_data() {
    let dir = scratch_dir();
    let dev = UringDevice::open(&dir.path().join("leg.img"), &opts(1 << 20)).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let blocks = dev.geometry().num_blocks;
    let mut pool = DmaPool::new(2, 1024);
    let mut pattern = pool.get().unwrap();
    pattern.as_mut_slice().fill(0x5a);
    let mut other = pool.get().unwrap();
    other.as_mut_slice().fill(0xa5);
    let write = |b: &crate::dma::DmaBuf, slba| {
        IoCommand::with_buf(IoOp::Write, slba, 2, b.io_buf().prefix(1024), 1)
    };
    let t = Duration::from_secs(5);
    assert_eq!(
        run(&mut *qp, write(&pattern, blocks - 2), t),
        Some(Status::SUCCESS)
    );
    assert_eq!(
        run(&mut *qp, write(&other, blocks - 1), t),
        Some(Status::LBA_OUT_OF_RANGE)
    );
    for op in [IoOp::WriteZeroes, IoOp::Deallocate] {
        let cmd = IoCommand::new(op, blocks - 1, 2, 9);
        assert_eq!(run(&mut *qp, cmd, t), Some(Status::LBA_OUT_OF_RANGE));
    }
    let cmd = IoCommand::new(IoOp::Deallocate, u64::MAX, 1, 9);
    assert_eq!(run(&mut *qp, cmd, t), Some(Status::LBA_OUT_OF_RANGE));
    let cmd = IoCommand::new(IoOp::WriteZeroes, 0, 0, 9);
    assert_eq!(run(&mut *qp, cmd, t), Some(Status::INVALID_FIELD));
    let image = std::fs::read(dir.path().join("leg.img")).unwrap();
    assert_eq!(image.len(), 1 << 20, "the file grew");
    assert!(image[(1 << 20) - 1024..].iter().all(|&b| b == 0x5a));
    // A buffer smaller than the transfer never reaches the kernel either.
    let cmd = IoCommand::with_buf(IoOp::Read, 0, 4, other.io_buf().prefix(1024), 3);
    assert_eq!(run(&mut *qp, cmd, t), Some(Status::DATA_SGL_LENGTH_INVALID));
}

#[test]
fn misaligned_buffer_under_o_direct_is_refused() {
    let dir = scratch_dir();
    let dev = UringDevice::open(&dir.path().join("leg.img"), &opts(1 << 20)).unwrap();
    let mut qp = dev.open_qpair(2).unwrap();
    let mut pool = DmaPool::new(1, 8192);
    let buf = pool.get().unwrap();
    let skewed = buf.io_buf().offset(1).prefix(4096);
    let cmd = IoCommand::with_buf(IoOp::Read, 0, 8, skewed, 1);
    let want = if dev.mem_align > 1 {
        qpair::PRP_OFFSET_INVALID
    } else {
        Status::SUCCESS
    };
    assert_eq!(run(&mut *qp, cmd, Duration::from_secs(5)), Some(want));
}

#[test]
fn queue_full_counts_rejected_commands_until_polled() {
    let dir = scratch_dir();
    let dev = UringDevice::open(&dir.path().join("leg.img"), &opts(1 << 20)).unwrap();
    let mut qp = dev.open_qpair(3).unwrap();
    let blocks = dev.geometry().num_blocks;
    let cmds = [
        IoCommand::new(IoOp::Flush, 0, 0, 0),
        IoCommand::new(IoOp::WriteZeroes, blocks, 1, 1),
        IoCommand::new(IoOp::WriteZeroes, 0, 8, 2),
    ];
    for cmd in cmds {
        // SAFETY: no data buffers.
        unsafe { qp.submit(cmd) }.unwrap();
    }
    assert_eq!(qp.outstanding(), 3);
    // SAFETY: no data buffer.
    let full = unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 3)) };
    assert_eq!(full, Err(SubmitError::QueueFull));
    let mut seen = Vec::new();
    let mut cpl = [Completion::default(); 1];
    while seen.len() < 3 {
        let n = qp.poll(&mut cpl);
        seen.extend_from_slice(&cpl[..n]);
    }
    // The rejected command comes back at the first poll, before any kernel completion.
    assert_eq!(
        seen[0],
        Completion {
            tag: 1,
            status: Status::LBA_OUT_OF_RANGE
        }
    );
    assert!(seen[1..].iter().all(|c| c.status.is_success()));
    assert_eq!(qp.outstanding(), 0);
    // SAFETY: no data buffer.
    unsafe { qp.submit(IoCommand::new(IoOp::Flush, 0, 0, 4)) }.unwrap();
}

/// Fills blocks 0..2048 with 0xff, zeroes/deallocates `[100, 100 + 1500)` and checks exactly
/// those blocks read back zero.
fn check_zeroing(dev: &UringDevice, op: IoOp) {
    let lba = dev.geometry().lba_size as usize;
    let dev = Bounced(dev);
    let mut qp = dev.open_qpair(4).unwrap();
    let mut ones = vec![0xffu8; 2048 * lba];
    let blocks = ones.len() / lba;
    let cmd = IoCommand::with_buf(
        IoOp::Write,
        0,
        blocks as u32,
        IoBuf::from_slice(&mut ones),
        1,
    );
    assert_eq!(
        run(&mut *qp, cmd, Duration::from_secs(5)),
        Some(Status::SUCCESS)
    );
    let cmd = IoCommand::new(op, 100, 1500, 2);
    assert_eq!(
        run(&mut *qp, cmd, Duration::from_secs(5)),
        Some(Status::SUCCESS),
        "{op:?}"
    );
    let image = read_all(&dev).unwrap();
    for (i, block) in image[..blocks * lba].chunks(lba).enumerate() {
        let want = if (100..1600).contains(&i) { 0 } else { 0xff };
        assert!(block.iter().all(|&b| b == want), "{op:?}: block {i}");
    }
}

#[test]
fn write_zeroes_and_deallocate_read_back_zeroes() {
    let dir = scratch_dir();
    for (i, op) in [IoOp::WriteZeroes, IoOp::Deallocate]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("fallocate{i}.img"));
        let dev = UringDevice::open(&path, &opts(4 << 20)).unwrap();
        check_zeroing(&dev, op);
        drop(dev);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4 << 20,
            "size kept"
        );
        // Without fallocate the zeroes are written in chunks (1500 blocks > one zero buffer).
        let path = dir.path().join(format!("zerofill{i}.img"));
        let dev = UringDevice::open(&path, &opts(4 << 20))
            .unwrap()
            .without_fallocate();
        check_zeroing(&dev, op);
    }
}

#[test]
fn deallocate_punches_a_hole() {
    let dir = scratch_dir();
    let path = dir.path().join("hole.img");
    let dev = UringDevice::open(&path, &buffered(4 << 20)).unwrap();
    let mut qp = dev.open_qpair(4).unwrap();
    let mut ones = vec![0xffu8; 4 << 20];
    let t = Duration::from_secs(5);
    let cmd = IoCommand::with_buf(IoOp::Write, 0, 8192, IoBuf::from_slice(&mut ones), 1);
    assert_eq!(run(&mut *qp, cmd, t), Some(Status::SUCCESS));
    let flush = IoCommand::new(IoOp::Flush, 0, 0, 2);
    assert_eq!(run(&mut *qp, flush, t), Some(Status::SUCCESS));
    let before = dev.file().metadata().unwrap().blocks() * 512;
    let trim = IoCommand::new(IoOp::Deallocate, 0, 4096, 3);
    assert_eq!(run(&mut *qp, trim, t), Some(Status::SUCCESS));
    let after = dev.file().metadata().unwrap().blocks() * 512;
    assert!(
        after + (2 << 20) <= before,
        "{before} -> {after} bytes allocated"
    );
    assert_eq!(dev.file().metadata().unwrap().len(), 4 << 20, "size kept");
}

#[test]
fn errno_maps_to_nvme_status() {
    use qpair::status_for_errno as map;
    assert_eq!(map(IoOp::Read, libc::EIO), Status::UNRECOVERED_READ_ERROR);
    for op in [
        IoOp::Write,
        IoOp::WriteZeroes,
        IoOp::Deallocate,
        IoOp::Flush,
    ] {
        assert_eq!(map(op, libc::EIO), Status::WRITE_FAULT);
    }
    assert_eq!(map(IoOp::Write, libc::ENOSPC), Status::CAPACITY_EXCEEDED);
    assert_eq!(map(IoOp::Write, libc::EBADF), Status::INTERNAL_ERROR);
    assert_eq!(map(IoOp::Read, libc::EFAULT), Status::INTERNAL_ERROR);
    for s in [map(IoOp::Read, libc::EIO), map(IoOp::Write, libc::ENOSPC)] {
        assert!(!s.dnr() && !s.more(), "{s:?} carries context");
    }
}

#[test]
fn read_past_a_shrunken_file_is_a_transfer_error() {
    let dir = scratch_dir();
    let path = dir.path().join("shrink.img");
    let dev = UringDevice::open(&path, &opts(1 << 20)).unwrap();
    let mut qp = dev.open_qpair(2).unwrap();
    // Someone truncates the file behind the claim (flock is advisory).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(512 << 10)
        .unwrap();
    let mut pool = DmaPool::new(1, 8192);
    let buf = pool.get().unwrap();
    let t = Duration::from_secs(5);
    // Entirely past the new end: nothing moves.
    let cmd = IoCommand::with_buf(IoOp::Read, 2000, 16, buf.io_buf(), 1);
    assert_eq!(run(&mut *qp, cmd, t), Some(Status::DATA_TRANSFER_ERROR));
    // Straddling it: the first half is read, the resubmitted rest moves nothing.
    let cmd = IoCommand::with_buf(IoOp::Read, 1016, 16, buf.io_buf(), 2);
    assert_eq!(run(&mut *qp, cmd, t), Some(Status::DATA_TRANSFER_ERROR));
    let cmd = IoCommand::with_buf(IoOp::Read, 1000, 16, buf.io_buf(), 3);
    assert_eq!(run(&mut *qp, cmd, t), Some(Status::SUCCESS));
}

#[test]
fn sqpoll_queue_pair_round_trips() {
    let dir = scratch_dir();
    let o = UringOptions {
        sqpoll: true,
        ..opts(1 << 20)
    };
    let dev = UringDevice::open(&dir.path().join("sqpoll.img"), &o).unwrap();
    let mut qp = dev.open_qpair(8).unwrap();
    let mut pool = DmaPool::new(1, 4096);
    let mut buf = pool.get().unwrap();
    buf.as_mut_slice().fill(0x3c);
    let t = Duration::from_secs(5);
    let w = IoCommand::with_buf(IoOp::Write, 16, 8, buf.io_buf(), 1);
    assert_eq!(run(&mut *qp, w, t), Some(Status::SUCCESS));
    buf.as_mut_slice().fill(0);
    let r = IoCommand::with_buf(IoOp::Read, 16, 8, buf.io_buf(), 2);
    assert_eq!(run(&mut *qp, r, t), Some(Status::SUCCESS));
    assert!(buf.as_slice().iter().all(|&b| b == 0x3c));
}

#[test]
fn registered_pool_buffers_use_fixed_io() {
    let dir = scratch_dir();
    let dev = UringDevice::open(&dir.path().join("fixed.img"), &opts(1 << 20)).unwrap();
    let mut qp = dev.open_uring_qpair(8).unwrap();
    let mut pool = DmaPool::new(4, 8192);
    // SAFETY: `pool` is declared before `qp`'s last use and dropped after it.
    unsafe { qp.register_pool(&pool) }.unwrap();
    let registered = |buf| qp.registered_index(buf);
    let mut a = pool.get().unwrap();
    let b = pool.get().unwrap();
    assert_eq!(registered(a.io_buf()), Some(a.index() as u16));
    // A view spanning two pool buffers cannot be one fixed buffer.
    let span = IoBuf::from_raw(a.io_buf().as_ptr().wrapping_add(4096), 8192);
    assert_eq!(registered(span), None);
    let mut outside = DmaPool::new(1, 4096);
    let c = outside.get().unwrap();
    assert_eq!(registered(c.io_buf()), None);

    a.as_mut_slice().fill(0x11);
    let t = Duration::from_secs(5);
    let w = IoCommand::with_buf(IoOp::Write, 0, 16, a.io_buf(), 1);
    assert_eq!(run(&mut qp, w, t), Some(Status::SUCCESS));
    let r = IoCommand::with_buf(IoOp::Read, 0, 16, b.io_buf(), 2);
    assert_eq!(run(&mut qp, r, t), Some(Status::SUCCESS));
    assert!(b.as_slice().iter().all(|&x| x == 0x11));
    let r = IoCommand::with_buf(IoOp::Read, 0, 8, c.io_buf(), 3);
    assert_eq!(run(&mut qp, r, t), Some(Status::SUCCESS));
    assert!(c.as_slice().iter().all(|&x| x == 0x11));
    drop(qp);
}

#[test]
fn queue_pairs_on_different_threads_share_the_file() {
    let dir = scratch_dir();
    let dev = Arc::new(UringDevice::open(&dir.path().join("mt.img"), &opts(4 << 20)).unwrap());
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                let mut qp = dev.open_qpair(8).unwrap();
                let mut pool = DmaPool::new(1, 4096);
                let mut b = pool.get().unwrap();
                b.as_mut_slice().fill(t + 1);
                for i in 0..64u64 {
                    let slba = (i * 4 + u64::from(t)) * 8;
                    let cmd = IoCommand::with_buf(IoOp::Write, slba, 8, b.io_buf(), i);
                    let s = run(&mut *qp, cmd, Duration::from_secs(5));
                    assert_eq!(s, Some(Status::SUCCESS));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let all = read_all(&Bounced(&dev)).unwrap();
    for i in 0..256usize {
        let want = (i % 4) as u8 + 1;
        assert!(
            all[i * 4096..(i + 1) * 4096].iter().all(|&b| b == want),
            "{i}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn direct_file_matches_a_model(ops in proptest::collection::vec(model_op(600), 1..30)) {
        let dir = scratch_dir();
        let dev = UringDevice::open(&dir.path().join("m.img"), &opts(600 * 512)).unwrap();
        check_against_model(&Bounced(&dev), &ops);
    }

    #[test]
    fn direct_4k_file_matches_a_model(ops in proptest::collection::vec(model_op(80), 1..30)) {
        let dir = scratch_dir();
        let o = UringOptions { lba_size: Some(4096), ..opts(80 * 4096) };
        let dev = UringDevice::open(&dir.path().join("m.img"), &o).unwrap();
        check_against_model(&Bounced(&dev), &ops);
    }

    #[test]
    fn buffered_zero_filling_file_matches_a_model(
        ops in proptest::collection::vec(model_op(600), 1..30)
    ) {
        let dir = scratch_dir();
        let dev = UringDevice::open(&dir.path().join("m.img"), &buffered(600 * 512))
            .unwrap()
            .without_fallocate();
        check_against_model(&dev, &ops);
    }
}
