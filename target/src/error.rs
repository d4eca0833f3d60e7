//! The crate's error type.

use std::io;
use std::net::SocketAddr;

/// Errors of the front ends. Variants are named after the failing operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A configuration that cannot be served.
    #[error("invalid target configuration: {0}")]
    Config(String),
    /// A reactor could not be reached.
    #[error("reactor: {0}")]
    Reactor(#[from] nvmirror_poller::Error),
    /// A back-end device refused an operation.
    #[error("device: {0}")]
    Device(#[from] nvmirror_nvme::Error),
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
