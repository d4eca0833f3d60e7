//! The io_uring back end through leg URIs, as the rest of nvmirror opens it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nvmirror_nvme::dma::DmaPool;
use nvmirror_nvme::{open_leg, read_all, Completion, Error, IoCommand, IoOp, Status};

/// A directory on the disk the workspace builds on (`NVMIRROR_TEST_DIR` overrides it), so
/// O_DIRECT is exercised on a real file system.
fn scratch_dir() -> tempfile::TempDir {
    let root = std::env::var_os("NVMIRROR_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../build/test-io")));
    std::fs::create_dir_all(&root).unwrap();
    tempfile::tempdir_in(root).unwrap()
}

fn wait(qp: &mut dyn nvmirror_nvme::QueuePair, want: usize) -> Vec<Completion> {
    let mut got = Vec::new();
    let mut cpl = [Completion::default(); 16];
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < want {
        assert!(Instant::now() < deadline, "completions lost");
        let n = qp.poll(&mut cpl);
        got.extend_from_slice(&cpl[..n]);
    }
    got
}

#[test]
fn file_leg_round_trips_with_registered_buffers() {
    let dir = scratch_dir();
    let uri = format!("file://{}/leg.img?create=16MiB", dir.path().display());
    let dev = open_leg(&uri).unwrap();
    assert_eq!(dev.geometry().bytes(), 16 << 20);
    assert_eq!(dev.geometry().lba_size, 512);
    let mut qp = dev.open_qpair(16).unwrap();
    let mut pool = DmaPool::new(16, 64 << 10);
    // SAFETY: `pool` outlives `qp` (dropped explicitly below).
    unsafe { qp.register_buffers(&pool) }.unwrap();
    let mut bufs: Vec<_> = (0..16).map(|_| pool.get().unwrap()).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        for (j, x) in b.as_mut_slice().iter_mut().enumerate() {
            *x = (i * 31 + j / 512) as u8;
        }
        let cmd = IoCommand::with_buf(IoOp::Write, i as u64 * 256, 128, b.io_buf(), i as u64);
        // SAFETY: the buffers are not touched until every completion is reaped.
        unsafe { qp.submit(cmd) }.unwrap();
    }
    assert!(wait(&mut *qp, 16).iter().all(|c| c.status.is_success()));
    let flush = IoCommand::new(IoOp::Flush, 0, 0, 99);
    // SAFETY: no data buffer.
    unsafe { qp.submit(flush) }.unwrap();
    assert_eq!(wait(&mut *qp, 1)[0].status, Status::SUCCESS);
    drop(qp);
    drop(pool);

    let image = std::fs::read(dir.path().join("leg.img")).unwrap();
    assert_eq!(image.len(), 16 << 20);
    for i in 0..16usize {
        let at = i * 256 * 512;
        for blk in 0..128 {
            let want = (i * 31 + blk) as u8;
            let b = &image[at + blk * 512..at + (blk + 1) * 512];
            assert!(b.iter().all(|&x| x == want), "command {i} block {blk}");
        }
    }
}

#[test]
fn a_claimed_leg_cannot_be_opened_twice() {
    let dir = scratch_dir();
    let uri = format!("file://{}/leg.img?create=1MiB", dir.path().display());
    let first = open_leg(&uri).unwrap();
    let err = open_leg(&uri).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(first);
    let again = open_leg(&format!("{uri}&buffered=1")).unwrap();
    assert_eq!(again.geometry().bytes(), 1 << 20);
}

#[test]
fn buffered_leg_reads_what_it_wrote_through_any_buffer() {
    let dir = scratch_dir();
    let uri = format!(
        "file://{}/leg.img?create=1MiB&buffered=1&lba=4096",
        dir.path().display()
    );
    let dev = open_leg(&uri).unwrap();
    assert_eq!(dev.geometry().lba_size, 4096);
    let mut qp = dev.open_qpair(2).unwrap();
    let mut data: Vec<u8> = (0..8192 + 3).map(|i| (i % 241) as u8).collect();
    let buf = nvmirror_nvme::dma::IoBuf::from_slice(&mut data[3..]);
    // SAFETY: `data` is not touched until the completion is reaped.
    unsafe { qp.submit(IoCommand::with_buf(IoOp::Write, 5, 2, buf, 1)) }.unwrap();
    assert!(wait(&mut *qp, 1)[0].status.is_success());
    let image = read_all(&*dev).unwrap();
    assert_eq!(&image[5 * 4096..7 * 4096], &data[3..]);
    assert!(image[..5 * 4096].iter().all(|&b| b == 0));
}

#[test]
fn a_missing_leg_without_create_names_its_path() {
    let dir = scratch_dir();
    let uri = format!("file://{}/nope.img", dir.path().display());
    let err = open_leg(&uri).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err}");
    assert!(err.to_string().contains("nope.img"), "{err}");
}

#[test]
fn a_directory_is_not_a_leg() {
    let dir = scratch_dir();
    let err = open_leg(&format!("file://{}", dir.path().display())).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

/// Runs only when `NVMIRROR_TEST_BLOCK_DEVICE` names a scratch block device (a loop device is
/// fine: `losetup -f --show -b 4096 scratch.img`). Its contents are destroyed.
#[test]
fn block_device_leg_reports_its_geometry_and_is_claimed() {
    let Some(path) = std::env::var_os("NVMIRROR_TEST_BLOCK_DEVICE") else {
        eprintln!("NVMIRROR_TEST_BLOCK_DEVICE not set; skipped");
        return;
    };
    let path = PathBuf::from(path);
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let sys = |attr: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/class/block/{name}/{attr}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let uri = path.display().to_string();
    let dev = open_leg(&uri).unwrap();
    let geo = dev.geometry();
    assert_eq!(u64::from(geo.lba_size), sys("queue/logical_block_size"));
    assert_eq!(geo.bytes(), sys("size") * 512);
    assert_eq!(dev.name(), uri);
    assert!(matches!(open_leg(&uri), Err(Error::Busy { .. })));

    let lba = geo.lba_size as usize;
    let mut qp = dev.open_qpair(4).unwrap();
    let mut pool = DmaPool::new(1, 64 * lba);
    let mut buf = pool.get().unwrap();
    buf.as_mut_slice().fill(0xc3);
    let last = geo.num_blocks - 64;
    let cmds = [
        IoCommand::with_buf(IoOp::Write, last, 64, buf.io_buf(), 0),
        IoCommand::new(IoOp::WriteZeroes, last + 8, 8, 1),
        IoCommand::new(IoOp::Deallocate, last + 32, 8, 2),
        IoCommand::new(IoOp::Flush, 0, 0, 3),
    ];
    for cmd in cmds {
        // SAFETY: `buf` is not touched until the completions are reaped.
        unsafe { qp.submit(cmd) }.unwrap();
        let c = wait(&mut *qp, 1);
        assert_eq!(c[0].status, Status::SUCCESS, "{cmd:?}");
    }
    let past = IoCommand::new(IoOp::WriteZeroes, geo.num_blocks, 1, 4);
    // SAFETY: no data buffer.
    unsafe { qp.submit(past) }.unwrap();
    assert_eq!(wait(&mut *qp, 1)[0].status, Status::LBA_OUT_OF_RANGE);
    let read = IoCommand::with_buf(IoOp::Read, last, 64, buf.io_buf(), 5);
    // SAFETY: as above.
    unsafe { qp.submit(read) }.unwrap();
    assert!(wait(&mut *qp, 1)[0].status.is_success());
    for (i, block) in buf.as_slice().chunks(lba).enumerate() {
        let zero = (8..16).contains(&i) || (32..40).contains(&i);
        let want = if zero { 0 } else { 0xc3 };
        assert!(block.iter().all(|&b| b == want), "block {i}");
    }
    drop(qp);
    drop(dev);
    open_leg(&uri).expect("claim released");
}
