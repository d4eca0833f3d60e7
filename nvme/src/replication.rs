//! The replication state of a leg that is mirrored asynchronously (an `async-journal` leg):
//! [`BlockDevice::replication`](crate::BlockDevice::replication).

/// Where an asynchronous leg stands, for status pages and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicationStatus {
    /// `async-journal`.
    pub mode: &'static str,
    /// `replicating` (shipping keeps up or catches up), `retrying` (the far side refuses
    /// writes; the journal holds them), `stepped-down` (the journal hit its bound: writes are
    /// refused and the volume tracks them in its bitmap instead), `failed` (the journal
    /// itself cannot be read or written).
    pub state: &'static str,
    /// Age of the oldest acknowledged write the far side does not have yet; 0 when it has
    /// them all.
    pub rpo_seconds: f64,
    /// Payload bytes acknowledged and not yet applied on the far side.
    pub lag_bytes: u64,
    /// Writes (journal records) acknowledged and not yet applied.
    pub lag_writes: u64,
    /// Whether the far image is known to be a crash-consistent point in time: false for an
    /// `async-journal` leg from the start of a resync (or a volume start that found the leg
    /// out of sync) until the copy's records are all applied.
    pub consistent: bool,
    /// The far side holds exactly the writes up to this sequence number (a crash-consistent
    /// point in time, when `consistent`).
    pub consistent_seq: u64,
    /// When the record at `consistent_seq` was made durable in the journal (Unix time, ms);
    /// 0 before the first record.
    pub consistent_unix_ms: u64,
    /// Bytes of payload taken into the journal since it was opened.
    pub host_bytes: u64,
    /// Bytes written to the journal device for them (headers and padding included).
    pub journal_bytes: u64,
    /// Journal bytes in use (written and not yet trimmed) and the ring's capacity.
    pub journal_used: u64,
    pub journal_capacity: u64,
    /// Times the journal refused writes because of its bound.
    pub step_downs: u64,
    /// Where the cycles of an `async-cycle` leg stand; `None` for `async-journal`.
    pub cycle: Option<CycleStatus>,
    /// Why shipping is stuck (the far side refuses, the journal cannot be read, a cycle
    /// does not fit the staging area); `None` while it works.
    pub error: Option<String>,
}

/// The cycles of an `async-cycle` leg (`docs/cycles.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CycleStatus {
    /// The last cycle the far image holds whole (0 before the first).
    pub cycle: u64,
    /// When its cut was taken (Unix ms; 0 before the first).
    pub cycle_unix_ms: u64,
    /// The cycle period.
    pub interval_ms: u64,
    /// Distinct bytes the last cycle changed, and all cycles since the leg was opened.
    pub cycle_bytes: u64,
    pub changed_bytes: u64,
    /// Bytes sent to the staging area (data and run tables) since the leg was opened; the
    /// image gets the data once more.
    pub staged_bytes: u64,
    /// Bytes this side wrote to the image (the apply); 0 when the far site applies.
    pub image_bytes: u64,
    /// Whether the far site applies the cycles (the link carries each block once).
    pub far_apply: bool,
    /// How long the last cycle took to ship (freeze to applied), in µs.
    pub ship_us: u64,
}
