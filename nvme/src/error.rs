//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Errors of the device layer. Variants are named after the failing operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A leg URI could not be parsed; `part` names the offending piece.
    #[error("bad leg URI '{uri}' at '{part}': {reason}")]
    Uri {
        uri: String,
        part: String,
        reason: String,
    },
    /// Opening a file or block device failed.
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file system refused O_DIRECT.
    #[error(
        "{path}: the file system refuses O_DIRECT ({source}); pass ?buffered=1 in the leg URI to use the page cache"
    )]
    DirectIoUnsupported {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The device is already claimed (flock/O_EXCL).
    #[error("{path} is in use by another volume or process")]
    Busy { path: PathBuf },
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// Parameters that cannot describe a device.
    #[error("invalid geometry: {0}")]
    Geometry(String),
    /// A `mem://…?prealloc=1` namespace larger than the memory the kernel says is available.
    #[error("cannot preallocate {bytes} bytes: only {available} bytes of memory are available")]
    Prealloc { bytes: u64, available: u64 },
    /// A queue pair could not be created.
    #[error("cannot create queue pair: {0}")]
    QueuePair(String),
    /// A step of bringing up an NVMe/TCP controller or one of its queues failed: `step`
    /// names it (e.g. "admin Connect", "Identify Namespace 1"), `reason` gives the NVMe
    /// status, the termination request's FES or the socket error.
    #[error("nvme-tcp {target}: {step} failed: {reason}")]
    NvmeTcp {
        target: String,
        step: String,
        reason: String,
    },
    /// A step of connecting to an NBD export or opening one more connection to it failed:
    /// `step` names it (e.g. "TCP connect", "NBD_OPT_GO"), `reason` the server's answer or
    /// the socket error.
    #[error("nbd {target}: {step} failed: {reason}")]
    Nbd {
        target: String,
        step: String,
        reason: String,
    },
    /// A step of bringing up a PCIe NVMe controller (VFIO, registers, admin commands) failed:
    /// `step` names it (e.g. "wait for CSTS.RDY=1", "Identify Namespace 1"), `reason` says
    /// why (the errno, the NVMe status, the timeout).
    #[error("pcie {device}: {step} failed: {reason}")]
    Pcie {
        device: String,
        step: String,
        reason: String,
    },
    /// A step of opening an NVMe generic char device for io_uring passthrough failed: `step`
    /// names it (e.g. "Identify Namespace 1", "passthrough probe"), `reason` says why (the
    /// errno, the NVMe status, what the kernel lacks).
    #[error("nvme-ng {device}: {step} failed: {reason}")]
    NvmeNg {
        device: PathBuf,
        step: String,
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
