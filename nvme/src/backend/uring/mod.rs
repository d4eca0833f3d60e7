//! `file://` and `/dev/…` — regular files and block devices through io_uring.
//!
//! [`UringDevice::open`] claims the file exclusively (architecture invariant 6: only the volume
//! writes a leg): block devices with `O_EXCL`, regular files with a non-blocking `flock` that
//! lasts as long as the device and its queue pairs. Data moves with `O_DIRECT` unless the leg
//! asks for the page cache (`?buffered=1`).
//!
//! Each queue pair owns one ring with the file registered as fixed file 0; see [`UringQueuePair`] for
//! how commands map to SQEs.

mod qpair;
pub(crate) mod ring;
pub(crate) mod sys;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub(crate) use qpair::status_for_errno;
pub use qpair::UringQueuePair;
use qpair::{QueueConfig, SQPOLL_IDLE_MS};

use crate::queue::{BlockDevice, QueuePair};
use crate::spec::Geometry;
use crate::{Error, Result};

/// How to open a file or block device leg.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UringOptions {
    /// Use the page cache instead of O_DIRECT.
    pub buffered: bool,
    /// Let a kernel thread poll the submission queue.
    pub sqpoll: bool,
    /// Logical block size; detected for block devices, 512 for files by default.
    pub lba_size: Option<u32>,
    /// Create a sparse file of this size if the file does not exist.
    pub create_size: Option<u64>,
}

/// A file or block device opened for io_uring queue pairs.
#[derive(Debug)]
pub struct UringDevice {
    name: String,
    path: PathBuf,
    geo: Geometry,
    /// The claimed file: its `flock` (or `O_EXCL` open) is released when it closes.
    file: File,
    sqpoll: bool,
    /// Buffer address alignment O_DIRECT needs; 1 when buffered.
    mem_align: u32,
    /// Whether Write Zeroes and Deallocate try `fallocate` before writing zeroes.
    fallocate: bool,
}

impl UringDevice {
    /// Opens and claims `path`. See the module docs for the claim and [`UringOptions`].
    pub fn open(path: &Path, opts: &UringOptions) -> Result<Self> {
        let direct = !opts.buffered;
        let is_block = match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_block_device() => true,
            Ok(meta) if meta.is_file() => false,
            Ok(_) => {
                return Err(Error::Open {
                    path: path.to_path_buf(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not a regular file or block device",
                    ),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && opts.create_size.is_some() => {
                let bytes = opts.create_size.unwrap_or_default();
                create_sparse(path, bytes)?;
                false
            }
            Err(source) => {
                return Err(Error::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };

        let mut flags = 0;
        if direct {
            flags |= libc::O_DIRECT;
        }
        if is_block {
            // On a block device O_EXCL without O_CREAT is an exclusive claim: EBUSY while
            // the device is mounted or claimed by anyone else.
            flags |= libc::O_EXCL;
        }
        // std adds O_CLOEXEC to every open.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| open_error(path, e, direct))?;
        if !is_block {
            sys::flock_exclusive(&file).map_err(|e| claim_error(path, e))?;
        }
        if direct {
            sys::probe_direct_read(&file).map_err(|e| open_error(path, e, direct))?;
        }

        let geo = geometry(path, &file, is_block, opts)?;
        let mem_align = if direct {
            sys::direct_io_alignment(&file).map_or(512, |a| a.mem)
        } else {
            1
        };
        let name = if is_block {
            path.display().to_string()
        } else {
            format!("file://{}", path.display())
        };
        Ok(Self {
            name,
            path: path.to_path_buf(),
            geo,
            file,
            sqpoll: opts.sqpoll,
            mem_align,
            fallocate: true,
        })
    }

    /// The path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a queue pair as its concrete type, for callers that use its inherent methods
    /// (buffer registration, counters).
    pub fn open_uring_qpair(&self, depth: u32) -> Result<UringQueuePair> {
        UringQueuePair::new(&QueueConfig {
            fd: self.file.as_raw_fd(),
            geo: self.geo,
            depth,
            sqpoll: self.sqpoll.then_some(SQPOLL_IDLE_MS),
            mem_align: self.mem_align,
            fallocate: self.fallocate,
        })
        .map_err(|e| Error::QueuePair(format!("{}: {e}", self.name)))
    }

    /// Makes queue pairs opened from now on write zeroes instead of calling `fallocate`,
    /// as they do on file systems without it.
    #[cfg(test)]
    pub(crate) fn without_fallocate(mut self) -> Self {
        self.fallocate = false;
        self
    }

    #[cfg(test)]
    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}

impl BlockDevice for UringDevice {
    fn geometry(&self) -> Geometry {
        self.geo
    }

    fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>> {
        Ok(Box::new(self.open_uring_qpair(depth)?))
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Creates `path` as a sparse file of `bytes`. Fails if it appeared meanwhile: an existing
/// file is never truncated or resized.
fn create_sparse(path: &Path, bytes: u64) -> Result<()> {
    let err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => f,
        // Created by someone else since we looked: open it as it is.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(err(sys::named("create", e))),
    };
    file.set_len(bytes)
        .map_err(|e| err(sys::named("ftruncate", e)))
}

/// Maps an `open(2)`/probe failure: `EINVAL` under O_DIRECT means the file system refuses
/// direct I/O; `EBUSY` means a block device is claimed elsewhere.
pub(crate) fn open_error(path: &Path, err: io::Error, direct: bool) -> Error {
    match err.raw_os_error() {
        Some(libc::EINVAL) if direct => Error::DirectIoUnsupported {
            path: path.to_path_buf(),
            source: err,
        },
        Some(libc::EBUSY) => Error::Busy {
            path: path.to_path_buf(),
        },
        _ => Error::Open {
            path: path.to_path_buf(),
            source: err,
        },
    }
}

/// Maps a `flock` failure: another open file description holds the claim.
fn claim_error(path: &Path, err: io::Error) -> Error {
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Error::Busy {
            path: path.to_path_buf(),
        }
    } else {
        Error::Open {
            path: path.to_path_buf(),
            source: sys::named("flock", err),
        }
    }
}

/// Size and block size: the file length or `BLKGETSIZE64`; the block size from `BLKSSZGET`,
/// the options, or 512 — raised to 4096 when O_DIRECT on this file needs 4096-byte I/O.
fn geometry(path: &Path, file: &File, is_block: bool, opts: &UringOptions) -> Result<Geometry> {
    let open_err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let (bytes, min_lba) = if is_block {
        let bytes = sys::block_device_bytes(file).map_err(open_err)?;
        (
            bytes,
            sys::block_device_sector_size(file).map_err(open_err)?,
        )
    } else {
        let bytes = file
            .metadata()
            .map_err(|e| open_err(sys::named("fstat", e)))?
            .len();
        let align = if opts.buffered {
            None
        } else {
            sys::direct_io_alignment(file)
        };
        (bytes, align.map_or(512, |a| a.offset.max(512)))
    };
    let lba_size = match opts.lba_size {
        Some(lba) if lba < min_lba => {
            return Err(Error::Geometry(format!(
                "{}: {lba}-byte blocks are smaller than the {min_lba} bytes the device needs",
                path.display()
            )))
        }
        Some(lba) => lba,
        None => min_lba,
    };
    Geometry::from_bytes(bytes, lba_size)
        .filter(|g| g.num_blocks > 0)
        .ok_or_else(|| {
            Error::Geometry(format!(
                "{}: {bytes} bytes at {lba_size}-byte blocks (block size must be 512 or 4096, \
                 size at least one block)",
                path.display()
            ))
        })
}

#[cfg(test)]
mod tests;
