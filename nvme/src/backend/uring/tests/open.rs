//! Opening, claiming and creating file legs.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use super::*;
use crate::backend::conformance::{io, run};
use crate::dma::DmaPool;
use crate::queue::IoOp;

#[test]
fn create_is_sparse_and_never_resizes() {
    let dir = scratch_dir();
    let path = dir.path().join("sparse.img");
    let dev = UringDevice::open(&path, &opts(1 << 30)).unwrap();
    assert_eq!(dev.geometry().num_blocks, (1 << 30) / 512);
    drop(dev);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    // An existing file keeps its size whatever create= says.
    let dev = UringDevice::open(&path, &opts(2 << 30)).unwrap();
    assert_eq!(dev.geometry().bytes(), 1 << 30);
    drop(dev);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
    // Without create= a missing file is an open error naming the path.
    let missing = dir.path().join("missing.img");
    let err = UringDevice::open(&missing, &UringOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err}");
    assert!(err.to_string().contains("missing.img"));
    assert!(!missing.exists());
}

#[test]
fn second_open_is_busy_until_the_first_is_dropped() {
    let dir = scratch_dir();
    let path = dir.path().join("claimed.img");
    let dev = UringDevice::open(&path, &opts(1 << 20)).unwrap();
    let qp = dev.open_qpair(4).unwrap();
    let err = UringDevice::open(&path, &buffered(1 << 20)).unwrap_err();
    assert!(
        matches!(&err, Error::Busy { path: p } if *p == path),
        "{err}"
    );
    // Another process sees the claim too.
    let other = std::process::Command::new("flock")
        .args(["--nonblock", "--exclusive"])
        .arg(&path)
        .arg("true")
        .status();
    if let Ok(status) = other {
        assert!(!status.success(), "another process took the claim");
    }
    drop(dev);
    // The ring holds the file open: the claim lasts while a queue pair is alive.
    assert!(matches!(
        UringDevice::open(&path, &opts(1 << 20)),
        Err(Error::Busy { .. })
    ));
    drop(qp);
    let again = UringDevice::open(&path, &opts(1 << 20)).unwrap();
    drop(again);
    if let Ok(status) = std::process::Command::new("flock")
        .args(["--nonblock", "--exclusive"])
        .arg(&path)
        .arg("true")
        .status()
    {
        assert!(status.success(), "claim not released");
    }
}

/// tmpfs has no `FALLOC_FL_ZERO_RANGE` (and before Linux 6.6 no O_DIRECT): the queue pair
/// must fall back to writing zeroes by itself, and a refused O_DIRECT must say so.
#[test]
fn tmpfs_refusals_fall_back_or_explain() {
    let shm = std::path::Path::new("/dev/shm");
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let c_path = c"/dev/shm";
    // SAFETY: a valid C string and a statfs the kernel may write for the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 || fs.f_type != libc::TMPFS_MAGIC {
        eprintln!("no tmpfs at /dev/shm; skipped");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let path = dir.path().join("leg.img");
    let dev = match UringDevice::open(&path, &opts(1 << 20)) {
        Ok(dev) => dev,
        Err(err) => {
            assert!(matches!(err, Error::DirectIoUnsupported { .. }), "{err}");
            assert!(err.to_string().contains("?buffered=1"));
            UringDevice::open(&path, &buffered(1 << 20)).unwrap()
        }
    };
    let mut qp = dev.open_uring_qpair(4).unwrap();
    let mut pool = DmaPool::new(1, 1 << 20);
    let mut ones = pool.get().unwrap();
    ones.as_mut_slice().fill(0xff);
    let t = Duration::from_secs(5);
    let w = IoCommand::with_buf(IoOp::Write, 0, 2048, ones.io_buf(), 1);
    assert_eq!(run(&mut qp, w, t), Some(Status::SUCCESS));
    let z = IoCommand::new(IoOp::WriteZeroes, 10, 1000, 2);
    assert_eq!(run(&mut qp, z, t), Some(Status::SUCCESS));
    assert!(!qp.fallocate_modes().0, "tmpfs took FALLOC_FL_ZERO_RANGE");
    let r = IoCommand::with_buf(IoOp::Read, 0, 2048, ones.io_buf(), 3);
    assert_eq!(run(&mut qp, r, t), Some(Status::SUCCESS));
    for (i, block) in ones.as_slice().chunks(512).enumerate() {
        let want = if (10..1010).contains(&i) { 0 } else { 0xff };
        assert!(block.iter().all(|&b| b == want), "block {i}");
    }
}

#[test]
fn buffered_flag_skips_o_direct_and_takes_any_buffer() {
    let dir = scratch_dir();
    for buffered_io in [false, true] {
        let path = dir.path().join(format!("b{buffered_io}.img"));
        let o = UringOptions {
            buffered: buffered_io,
            ..opts(1 << 20)
        };
        let dev = UringDevice::open(&path, &o).unwrap();
        // SAFETY: F_GETFL reads the descriptor's flags only.
        let fl = unsafe { libc::fcntl(dev.file().as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_DIRECT != 0, !buffered_io);
        if buffered_io {
            let mut qp = dev.open_qpair(2).unwrap();
            let mut data: Vec<u8> = (0..1536).map(|i| (i % 253) as u8).collect();
            let mut skewed = vec![0u8; 1537];
            let (back, _) = skewed[1..].split_at_mut(1536);
            assert!(io(&mut *qp, IoOp::Write, 3, &mut data, 512).is_success());
            assert!(io(&mut *qp, IoOp::Read, 3, back, 512).is_success());
            assert_eq!(back, &data[..]);
        }
    }
}

#[test]
fn o_direct_refusal_asks_for_buffered() {
    let path = std::path::Path::new("/x/leg.img");
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let err = open_error(path, einval(), true);
    assert!(matches!(err, Error::DirectIoUnsupported { .. }), "{err}");
    assert!(err.to_string().contains("?buffered=1"), "{err}");
    assert!(matches!(
        open_error(path, einval(), false),
        Error::Open { .. }
    ));
    let busy = io::Error::from_raw_os_error(libc::EBUSY);
    assert!(matches!(open_error(path, busy, true), Error::Busy { .. }));
    let enoent = io::Error::from_raw_os_error(libc::ENOENT);
    assert!(matches!(open_error(path, enoent, true), Error::Open { .. }));
}
