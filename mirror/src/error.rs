//! The crate's error type.

/// Errors of the mirror engine. Variants are named after the failing operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An `async-journal` leg's journal cannot be opened or used.
    #[error("leg '{leg}': journal '{journal}': {reason}")]
    Journal {
        leg: String,
        journal: String,
        reason: String,
    },
    /// A volume needs between 1 and [`MAX_LEGS`](crate::MAX_LEGS) legs.
    #[error("volume '{volume}': {count} legs given, a volume has 1 to {max}")]
    LegCount {
        volume: String,
        count: usize,
        max: usize,
    },
    /// The same device was given twice.
    #[error("volume '{volume}': leg {second} ('{name}') is the same device as leg {first}")]
    DuplicateLeg {
        volume: String,
        name: String,
        first: usize,
        second: usize,
    },
    /// Legs must share one logical block size.
    #[error(
        "volume '{volume}': leg {leg} ('{name}') has {lba_size}-byte blocks, the primary has {expected}-byte blocks"
    )]
    LbaSizeMismatch {
        volume: String,
        leg: usize,
        name: String,
        lba_size: u32,
        expected: u32,
    },
    /// A configuration value that cannot work.
    #[error("volume '{volume}': invalid configuration: {reason}")]
    Config { volume: String, reason: String },
    /// A leg index that the volume does not have.
    #[error("volume '{volume}' has no leg {leg}")]
    NoSuchLeg { volume: String, leg: usize },
    /// A state change that would leave the volume without an in-sync leg.
    #[error("volume '{volume}': leg {leg} is the last in-sync leg; refusing to take it out")]
    LastInSyncLeg { volume: String, leg: usize },
    /// The leg is already detached.
    #[error("volume '{volume}': leg {leg} is already detached")]
    AlreadyDetached { volume: String, leg: usize },
    /// The leg is the primary, which this request may not take out.
    #[error("volume '{volume}': leg {leg} is the primary")]
    LegIsPrimary { volume: String, leg: usize },
    /// The leg still has timed-out commands its back end has not answered.
    #[error(
        "volume '{volume}': leg {leg} still has {abandoned} timed-out command(s) its device has \
         not answered; it can be attached once the device answers them, fails them, or is reset"
    )]
    LegBusy {
        volume: String,
        leg: usize,
        abandoned: u32,
    },
    /// A remote leg lost its connection with commands on the wire that the remote may still
    /// execute: it may be resynchronised once the remote has given the old connection up.
    #[error(
        "volume '{volume}': leg {leg} lost its connection with {commands} command(s) on the wire; \
         it may be resynchronised in {remaining_ms} ms, once the remote has given the old \
         connection up (keep-alive timeout plus a quiesce delay)"
    )]
    LegFenced {
        volume: String,
        leg: usize,
        commands: u32,
        remaining_ms: u64,
    },
    /// The leg is not in a state the request starts from.
    #[error("volume '{volume}': leg {leg} is {state}")]
    LegState {
        volume: String,
        leg: usize,
        state: crate::LegState,
    },
    /// A new leg does not fit the volume.
    #[error("volume '{volume}': cannot add '{name}': {reason}")]
    AddLeg {
        volume: String,
        name: String,
        reason: String,
    },
    /// A resync or verify is already running on the volume.
    #[error("volume '{volume}': a {what} is already running")]
    JobRunning { volume: String, what: &'static str },
    /// No resync or verify was ever started on the volume.
    #[error("volume '{volume}': no {what} has been started")]
    NoJob { volume: String, what: &'static str },
    /// Opening a queue pair on a leg failed.
    #[error("volume '{volume}': cannot open a queue pair on leg {leg} ('{name}'): {source}")]
    OpenLegQueuePair {
        volume: String,
        leg: usize,
        name: String,
        #[source]
        source: Box<nvmirror_nvme::Error>,
    },
    /// Formatting found data on a leg and `force` was not given.
    #[error("volume '{volume}': leg {leg} ('{name}') is not blank: {found}; format it with force to overwrite")]
    LegNotBlank {
        volume: String,
        leg: usize,
        name: String,
        found: String,
    },
    /// A leg that belongs to another volume, or sits at another index of this one.
    #[error("volume '{volume}': leg {leg} ('{name}') is not this volume's leg {leg}: {reason}")]
    ForeignLeg {
        volume: String,
        leg: usize,
        name: String,
        reason: String,
    },
    /// A leg's metadata could not be read, written or trusted.
    #[error("volume '{volume}': leg {leg} ('{name}'): metadata: {reason}")]
    Metadata {
        volume: String,
        leg: usize,
        name: String,
        reason: String,
    },
    /// The operation needs a persistent volume (one with a superblock and bitmap).
    #[error("volume '{volume}' has no persistent metadata")]
    NotPersistent { volume: String },
    /// The volume is still in use.
    #[error("volume '{volume}' is busy: {reason}")]
    Busy { volume: String, reason: String },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
