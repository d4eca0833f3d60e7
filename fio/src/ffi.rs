//! The C ABI the C half of the engine (`engine/nvmirror.c`) calls. Pointers handed out are
//! `Arc<Device>` and `Box<Queue>` turned raw; each `*_close` takes one back. Errors come back
//! as text in the caller's buffer (NUL-terminated, cut to fit) or as negative errno values.

use std::ffi::{c_char, c_int, CStr};
use std::sync::Arc;

use crate::{Device, Op, Queue, SubmitError};

/// `nvmirror_fio_submit` return values besides 0 (queued) and -errno.
pub const SUBMIT_BUSY: c_int = 1;

/// Copies `msg` into `err` (`len` bytes, NUL-terminated).
///
/// # Safety
/// `err` is null or points to `len` writable bytes.
unsafe fn put_err(err: *mut c_char, len: usize, msg: &str) {
    if err.is_null() || len == 0 {
        return;
    }
    let n = msg.len().min(len - 1);
    // SAFETY: `err` has room for `len` > `n` bytes (caller's contract).
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
        *err.add(n) = 0;
    }
}

/// Opens (or shares) the volume of `legs`: URIs separated by newlines. `bitmap` non-zero
/// formats the legs as a persistent volume. Null on error, with the reason in `err`.
///
/// # Safety
/// `legs` is a NUL-terminated string; `err` as for [`put_err`].
#[no_mangle]
pub unsafe extern "C" fn nvmirror_fio_open(
    legs: *const c_char,
    bitmap: c_int,
    err: *mut c_char,
    err_len: usize,
) -> *const Device {
    // SAFETY: NUL-terminated by the caller's contract.
    let legs = unsafe { CStr::from_ptr(legs) }.to_string_lossy();
    match Device::open(&legs, bitmap != 0) {
        Ok(d) => Arc::into_raw(d),
        Err(e) => {
            // SAFETY: the caller's buffer.
            unsafe { put_err(err, err_len, &e) };
            std::ptr::null()
        }
    }
}

/// Lets go of a volume from [`nvmirror_fio_open`].
///
/// # Safety
/// `dev` came from `nvmirror_fio_open` and is not used again.
#[no_mangle]
pub unsafe extern "C" fn nvmirror_fio_close(dev: *const Device) {
    if !dev.is_null() {
        // SAFETY: one of the references `nvmirror_fio_open` handed out.
        drop(unsafe { Arc::from_raw(dev) });
    }
}

/// Exported bytes.
///
/// # Safety
/// `dev` is open.
#[no_mangle]
pub unsafe extern "C" fn nvmirror_fio_size(dev: *const Device) -> u64 {
    // SAFETY: open by the caller's contract.
    unsafe { &*dev }.size()
}

/// Logical block size.
///
/// # Safety
/// `dev` is open.
#[no_mangle]
pub unsafe extern "C" fn nvmirror_fio_lba_size(dev: *const Device) -> u32 {
    // SAFETY: open by the caller's contract.
    unsafe { &*dev }.lba_size()
}

/// A queue pair of `depth` entries on `dev` for one fio thread. Null on error.
///
/// # Safety
/// `dev` is open; `err` as for [`put_err`].
#[no_mangle]
pub unsafe extern "C" fn nvmirror_fio_queue_open(
    dev: *const Device,
    depth: u32,
    err: *mut c_char,
    err_len: usize,
) -> *mut Queue {
    // SAFETY: `dev` is one of `nvmirror_fio_open`'s references: count one more for the queue.
    let d = unsafe {
        Arc::increment_strong_count(dev);
        Arc::from_raw(dev)
    };
    match Queue::open(d, depth) {
        Ok(q) => Box::into_raw(Box::new(q)),
        Err(e) => {
            // SAFETY: the caller's buffer.
            unsafe { put_err(err, err_len, &e) };
            std::ptr::null_mut()
        }
    }
}

/// Waits for the queue's commands to be over, then closes it.
///
/// # Safety
/// `q` came from `nvmirror_fio_queue_open` and is not used again.
#[no_mangle]
pub unsafe extern "C" fn nvmirror_fio_queue_close(q: *mut Queue) {
    if !q.is_null() {
        // SAFETY: handed out by `nvmirror_fio_queue_open`.
        drop(unsafe { Box::from_raw(q) });
    }
}

/// Queues one command: `op` 0 read, 1 write, 2 flush, 3 trim; `len` bytes at byte
/// `offset`. Returns 0 (queued), [`SUBMIT_BUSY`] (queue full) or -EINVAL.
///
/// # Safety
/// `q` is open; for reads and writes `buf` points to `len` bytes that stay allocated and
/// untouched until [`nvmirror_fio_poll`] returns `tag`.
#[no_mangle]
pub unsafe extern "C" fn nvmirror_fio_submit(
    q: *mut Queue,
    op: c_int,
    offset: u64,
    len: u64,
    buf: *mut u8,
    tag: u64,
) -> c_int {
    let op = match op {
        0 => Op::Read,
        1 => Op::Write,
        2 => Op::Flush,
        3 => Op::Trim,
        _ => return -libc::EINVAL,
    };
    // SAFETY: `q` is open; the buffer contract is the caller's.
    match unsafe { (*q).submit(op, offset, len, buf, tag) } {
        Ok(()) => 0,
        Err(SubmitError::Full) => SUBMIT_BUSY,
        Err(SubmitError::Invalid) => -libc::EINVAL,
    }
}

/// Sends what is queued and reaps up to `max` completions: their tags into `tags` and errno
/// values (0 on success) into `errs`. Returns how many.
///
/// # Safety
/// `q` is open; `tags` and `errs` have room for `max` entries.
#[no_mangle]
pub unsafe extern "C" fn nvmirror_fio_poll(
    q: *mut Queue,
    tags: *mut u64,
    errs: *mut c_int,
    max: u32,
) -> u32 {
    if max == 0 {
        // SAFETY: `q` is open.
        return unsafe { (*q).poll(&mut [], &mut []) } as u32;
    }
    // SAFETY: room for `max` entries in each (caller's contract); `q` is open.
    let n = unsafe {
        let tags = std::slice::from_raw_parts_mut(tags, max as usize);
        let errs = std::slice::from_raw_parts_mut(errs, max as usize);
        (*q).poll(tags, errs)
    };
    n as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_c_abi_round_trips_a_write_and_reports_errors_as_text() {
        let mut err = [0 as c_char; 128];
        let legs = c"mem://2MiB\nmem://2MiB";
        // SAFETY: NUL-terminated strings and a 128-byte error buffer throughout.
        unsafe {
            let dev = nvmirror_fio_open(legs.as_ptr(), 0, err.as_mut_ptr(), err.len());
            assert!(!dev.is_null());
            assert_eq!(nvmirror_fio_size(dev), 2 << 20);
            assert_eq!(nvmirror_fio_lba_size(dev), 512);
            let q = nvmirror_fio_queue_open(dev, 4, err.as_mut_ptr(), err.len());
            assert!(!q.is_null());
            let mut data = vec![7u8; 4096];
            assert_eq!(nvmirror_fio_submit(q, 1, 0, 4096, data.as_mut_ptr(), 42), 0);
            assert_eq!(
                nvmirror_fio_submit(q, 9, 0, 4096, data.as_mut_ptr(), 43),
                -libc::EINVAL
            );
            let (mut tags, mut errs) = ([0u64; 4], [0 as c_int; 4]);
            let mut n = 0;
            while n == 0 {
                n = nvmirror_fio_poll(q, tags.as_mut_ptr(), errs.as_mut_ptr(), 4);
            }
            assert_eq!((n, tags[0], errs[0]), (1, 42, 0));
            nvmirror_fio_queue_close(q);
            nvmirror_fio_close(dev);

            let bad = c"mem://2MiB\nnope://";
            assert!(nvmirror_fio_open(bad.as_ptr(), 0, err.as_mut_ptr(), 16).is_null());
            let msg = CStr::from_ptr(err.as_ptr()).to_string_lossy();
            assert_eq!(msg.len(), 15, "cut to the buffer: {msg}");
        }
    }
}
