//! Errors of the NBD front end.

use std::io;
use std::net::SocketAddr;

/// Errors of the NBD front end. Variants are named after the failing operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server configuration cannot be served.
    #[error("NBD configuration: {0}")]
    Config(String),
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A socket operation failed.
    #[error("{op} failed: {source}")]
    Socket {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// A queue pair could not be opened on an exported device.
    #[error("cannot open a queue pair on {device}: {source}")]
    Device {
        device: String,
        #[source]
        source: nvmirror_nvme::Error,
    },
    /// A connection's payload buffers could not be allocated (memory exhausted, or a limit
    /// such as `vm.overcommit_memory=2`): the connection is refused, the process goes on.
    #[error(
        "cannot allocate the connection's {bytes}-byte payload buffers ({count} of {size} bytes)"
    )]
    BufferAlloc { bytes: u64, count: u32, size: usize },
    /// The reactors could not be reached.
    #[error("reactor: {0}")]
    Reactor(#[from] nvmirror_poller::Error),
}

/// The NBD front end's result type.
pub type Result<T> = std::result::Result<T, Error>;
