//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Errors of the load generator. Variants are named after the failing operation; option
/// errors name the offending flag.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value that cannot describe a job, or does not fit the device.
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    /// A `--leg` URI could not be parsed or opened.
    #[error("--leg {uri}: {source}")]
    OpenLeg {
        uri: String,
        #[source]
        source: nvmirror_nvme::Error,
    },
    /// A `--target` URI could not be parsed or opened.
    #[error("--target {uri}: {source}")]
    OpenTarget {
        uri: String,
        #[source]
        source: nvmirror_nvme::Error,
    },
    /// A job file could not be read.
    #[error("{path}: {source}")]
    ReadJobFile {
        path: String,
        #[source]
        source: io::Error,
    },
    /// A job file line that is not valid; `key` is empty for lines without one.
    #[error("{path}:{line}: {key}{sep}{reason}", sep = if key.is_empty() { "" } else { ": " })]
    JobFile {
        path: String,
        line: usize,
        key: String,
        reason: String,
    },
    /// A job could not open its queue pair on the target.
    #[error("job {job}: {source}")]
    OpenQueuePair {
        job: u32,
        #[source]
        source: nvmirror_nvme::Error,
    },
    /// A job thread could not be started.
    #[error("cannot start job thread {job}: {source}")]
    SpawnJob {
        job: u32,
        #[source]
        source: io::Error,
    },
    /// A job thread panicked.
    #[error("job {job} panicked")]
    JobPanicked { job: u32 },
    /// Latency histograms could not be created or merged.
    #[error("latency histogram: {0}")]
    Histogram(String),
    /// An HdrHistogram interval log could not be written.
    #[error("--hdr-log {}: {reason}", path.display())]
    HdrLog {
        path: std::path::PathBuf,
        reason: String,
    },
    /// Writing the report failed.
    #[error("cannot write the report: {0}")]
    WriteReport(#[source] io::Error),
    /// Encoding the JSON report failed.
    #[error("cannot encode the JSON report: {0}")]
    EncodeJson(#[source] serde_json::Error),
    /// A saved run could not be read.
    #[error("{}: {source}", path.display())]
    ReadRun {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A saved run is not fio JSON.
    #[error("{}: not a JSON report of a run: {source}", path.display())]
    ParseRun {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A plot could not be drawn from, or written to, `path`.
    #[error("{}: {reason}", path.display())]
    Plot { path: PathBuf, reason: String },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
