//! `file://` and `/dev/…` — files and block devices through io_uring.

use std::path::{Path, PathBuf};

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
}

impl UringDevice {
    pub fn open(path: &Path, _opts: &UringOptions) -> Result<Self> {
        Err(Error::Open {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::Unsupported, "io_uring back end"),
        })
    }
}

impl BlockDevice for UringDevice {
    fn geometry(&self) -> Geometry {
        self.geo
    }

    fn open_qpair(&self, _depth: u32) -> Result<Box<dyn QueuePair>> {
        Err(Error::QueuePair(format!(
            "{}: io_uring back end",
            self.path.display()
        )))
    }

    fn name(&self) -> &str {
        &self.name
    }
}
