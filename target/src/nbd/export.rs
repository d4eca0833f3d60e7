//! What a client can connect to: a named block device and the properties advertised for it.

use std::sync::Arc;

use nvmirror_nvme::BlockDevice;

use super::proto::{transmission_flags as tf, MAX_PAYLOAD};

/// One export: a name and the device behind it.
#[derive(Debug, Clone)]
pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) device: Arc<dyn BlockDevice>,
    /// The largest read or write payload a connection buffers (advertised as the maximum
    /// block size; a connection's buffer pool holds one such request).
    pub(crate) max_payload: u32,
}

impl Export {
    /// An export whose connections may each buffer `budget` bytes: the maximum payload is
    /// the budget rounded down to whole chunks, between two chunks and [`MAX_PAYLOAD`].
    pub(crate) fn new(name: String, device: Arc<dyn BlockDevice>, budget: u64) -> Self {
        let chunk = super::transmission::CHUNK as u64;
        let max_payload = (budget / chunk).clamp(2, u64::from(MAX_PAYLOAD) / chunk) * chunk;
        Self {
            name,
            device,
            max_payload: max_payload as u32,
        }
    }
}

/// The transmission flags every export advertises: flush, FUA, trim and write-zeroes are
/// supported, and every connection reaches the same device, so flushes are visible across
/// connections (multi-conn).
pub(crate) const TRANSMISSION_FLAGS: u16 = tf::HAS_FLAGS
    | tf::SEND_FLUSH
    | tf::SEND_FUA
    | tf::SEND_TRIM
    | tf::SEND_WRITE_ZEROES
    | tf::CAN_MULTI_CONN;

impl Export {
    /// Size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.device.geometry().bytes()
    }

    /// `(minimum, preferred, maximum payload)` block sizes: requests must be aligned to the
    /// device's logical block size.
    pub(crate) fn block_sizes(&self) -> (u32, u32, u32) {
        let lba = self.device.geometry().lba_size;
        (lba, lba.max(4096), self.max_payload)
    }
}

/// The exports of one server, looked up by name. The empty name selects the first export
/// (the protocol's "default export").
#[derive(Debug, Clone)]
pub(crate) struct ExportTable(Arc<[Export]>);

impl ExportTable {
    pub(crate) fn new(exports: Vec<Export>) -> Self {
        Self(exports.into())
    }

    /// Index of the export called `name`.
    pub(crate) fn find(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return (!self.0.is_empty()).then_some(0);
        }
        self.0.iter().position(|e| e.name.as_bytes() == name)
    }

    /// The export at an index from [`find`](Self::find).
    pub(crate) fn get(&self, index: usize) -> Option<&Export> {
        self.0.get(index)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Export> {
        self.0.iter()
    }
}
