//! The system calls the io_uring back end makes outside the ring, at open time: the exclusive
//! claim, the block device ioctls, the direct-I/O alignment query and the O_DIRECT probe.
//! Each failure names the call and keeps the errno.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::dma::DmaPool;

/// `BLKGETSIZE64` (linux/fs.h): device size in bytes, `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::Ioctl = libc::_IOR::<u64>(0x12, 114);

/// Wraps `err` so that its message names the failing call; the kind is kept.
pub(crate) fn named(call: &str, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{call}: {err}"))
}

/// Takes a non-blocking exclusive `flock` on `file`. It lasts as long as the open file
/// description (this `File` and any duplicate of it, such as an io_uring registered file).
/// Fails with `EWOULDBLOCK` when another open file description holds it.
pub(crate) fn flock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock only reads its integer arguments; the descriptor is open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The size of a block device in bytes.
pub(super) fn block_device_bytes(file: &File) -> io::Result<u64> {
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes as *mut u64) };
    if rc == 0 {
        Ok(bytes)
    } else {
        Err(named("ioctl(BLKGETSIZE64)", io::Error::last_os_error()))
    }
}

/// The logical sector size of a block device.
pub(super) fn block_device_sector_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size as *mut _) };
    if rc != 0 {
        return Err(named("ioctl(BLKSSZGET)", io::Error::last_os_error()));
    }
    u32::try_from(size).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("ioctl(BLKSSZGET) returned {size}"),
        )
    })
}

/// What O_DIRECT demands of I/O on a file (statx `STATX_DIOALIGN`, Linux 6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DirectIoAlignment {
    /// Required alignment of the memory buffer.
    pub mem: u32,
    /// Required alignment of the file offset and length.
    pub offset: u32,
}

/// The direct-I/O alignment of `file`, or `None` where the kernel or file system does not
/// report it (older kernels; then the probe read and the block size are all we have).
pub(super) fn direct_io_alignment(file: &File) -> Option<DirectIoAlignment> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH queries the open descriptor itself; the kernel
    // writes at most one `statx` through the pointer, which is valid for the call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(DirectIoAlignment {
        mem: stx.stx_dio_mem_align.max(1),
        offset: stx.stx_dio_offset_align,
    })
}

/// Reads the first page of an O_DIRECT `file` into an aligned buffer: file systems that
/// accept the O_DIRECT flag at open but cannot honour it fail here with `EINVAL`.
pub(super) fn probe_direct_read(file: &File) -> io::Result<()> {
    let mut pool = DmaPool::new(1, 4096);
    let Some(buf) = pool.get() else {
        return Err(io::Error::other("probe buffer"));
    };
    // SAFETY: the buffer is 4096 bytes, page aligned, owned by `pool` for the call, and nothing
    // else refers to it.
    let rc = unsafe { libc::pread(file.as_raw_fd(), buf.io_buf().as_ptr().cast(), buf.len(), 0) };
    pool.put(buf);
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
