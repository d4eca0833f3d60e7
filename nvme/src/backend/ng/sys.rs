//! The ioctls the passthrough back end makes outside the ring, at open time: the namespace ID
//! and admin commands (Identify) through the driver's passthrough ioctl. Each failure names
//! the call and keeps the errno.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::cmd::{NvmePassthruCmd, NVME_IOCTL_ADMIN_CMD, NVME_IOCTL_ID};
pub(super) use crate::backend::uring::sys::{flock_exclusive, named};
use crate::spec::Status;

/// The namespace ID of the namespace `file` is the generic char device of (`ENOTTY`: not
/// an NVMe namespace device). The error is the bare errno.
pub(super) fn namespace_id(file: &File) -> io::Result<u32> {
    // SAFETY: NVME_IOCTL_ID takes no argument and touches no memory of ours.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), NVME_IOCTL_ID as libc::Ioctl) };
    if rc <= 0 {
        let err = if rc == 0 {
            io::Error::new(io::ErrorKind::InvalidData, "namespace ID 0")
        } else {
            io::Error::last_os_error()
        };
        return Err(err);
    }
    Ok(rc as u32)
}

/// How an admin command through the ioctl ended.
#[derive(Debug)]
pub(super) enum AdminError {
    /// The ioctl itself failed.
    Sys(io::Error),
    /// The controller completed it with an error status.
    Status(Status),
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sys(e) => write!(f, "{e}"),
            Self::Status(s) => write!(f, "NVMe status {s:?}"),
        }
    }
}

/// Runs the admin command `cmd` (its `addr`/`data_len` set to `data`) through
/// `NVME_IOCTL_ADMIN_CMD`; blocks until it completes. Returns the completion's DW0.
pub(super) fn admin_command(
    file: &File,
    mut cmd: NvmePassthruCmd,
    data: &mut [u8],
) -> Result<u32, AdminError> {
    cmd.addr = data.as_mut_ptr() as u64;
    cmd.data_len = u32::try_from(data.len()).map_err(|_| {
        AdminError::Sys(io::Error::new(
            io::ErrorKind::InvalidInput,
            "admin data over 4 GiB",
        ))
    })?;
    // SAFETY: the command is a valid `struct nvme_passthru_cmd` for the call; the kernel reads
    // it, writes its `result`, and moves at most `data_len` bytes into `data`, which is
    // borrowed mutably for the call.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            NVME_IOCTL_ADMIN_CMD as libc::Ioctl,
            &mut cmd as *mut NvmePassthruCmd,
        )
    };
    match rc {
        0 => Ok(cmd.result),
        rc if rc < 0 => Err(AdminError::Sys(named(
            "ioctl(NVME_IOCTL_ADMIN_CMD)",
            io::Error::last_os_error(),
        ))),
        status => Err(AdminError::Status(Status::from_raw(status as u16))),
    }
}
