//! The crate's error type.

/// Errors of the reactor layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// No reactor with that index.
    #[error("no reactor {index} (there are {count})")]
    NoSuchReactor { index: usize, count: usize },
    /// The reactor's message ring is full.
    #[error("message ring of reactor {0} is full")]
    RingFull(usize),
    /// The reactors are shutting down.
    #[error("reactors are shut down")]
    ShutDown,
    /// A reactor thread could not be started.
    #[error("cannot start reactor thread {index}: {reason}")]
    Spawn { index: usize, reason: String },
    /// The configuration cannot be used.
    #[error("reactor configuration: {0}")]
    Config(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
