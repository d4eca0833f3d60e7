//! `pcie://0000:01:00.0?nsid=1` — a userspace, polled-mode driver for a PCIe NVMe controller
//! bound to `vfio-pci`: no kernel driver, no interrupts, one I/O queue pair per core.
//!
//! The driver talks to the hardware through one seam, [`PciFunction`]: BAR0 register reads
//! and writes, DMA memory with its bus address, and IOMMU mappings of caller memory. Two
//! implementations exist: [`VfioFunction`] (the real device through `/dev/vfio`) and
//! [`FakeController`] (an in-process model of a controller, so every CI run exercises the
//! driver). See `docs/pcie.md` for the bring-up sequence and the real-hardware set-up.
//!
//! Files by concern: [`regs`] (register map), [`region`] (DMA memory), [`prp`] (PRP entries
//! and lists), `admin.rs` (bring-up, admin queue, reset), `queue.rs` (I/O queue pairs),
//! `device.rs` (the [`BlockDevice`](crate::BlockDevice)), `vfio.rs`, [`fake`].

mod admin;
pub mod cmd;
mod device;
pub mod fake;
pub mod prp;
mod queue;
pub mod region;
pub mod regs;
#[cfg(test)]
mod tests;
#[cfg(target_os = "linux")]
mod vfio;

use std::fmt::Debug;
use std::time::Duration;

pub use device::PcieDevice;
pub use fake::{FakeConfig, FakeController, FakeFault, FakeStats};
pub use region::DmaRegion;
#[cfg(target_os = "linux")]
pub use vfio::VfioFunction;

use crate::Result;

/// The device side of the driver: a PCI function's BAR0 and its DMA.
///
/// Register offsets are BAR0 offsets; accesses are 32-bit (64-bit registers are two 32-bit
/// accesses, low dword first, as NVMe Base 2.0 §3.1.3 allows).
pub trait PciFunction: Send + Sync + Debug {
    /// A 32-bit register read; all-ones when the device is gone.
    fn read32(&self, off: u32) -> u32;

    /// A 32-bit register write (doorbells included).
    fn write32(&self, off: u32, val: u32);

    /// A 64-bit register read (CAP).
    fn read64(&self, off: u32) -> u64 {
        let lo = self.read32(off);
        let hi = self.read32(off + 4);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// A 64-bit register write (ASQ, ACQ).
    fn write64(&self, off: u32, val: u64) {
        self.write32(off, val as u32);
        self.write32(off + 4, (val >> 32) as u32);
    }

    /// `len` bytes (rounded up to a page) of zeroed DMA memory mapped for the device at
    /// `iova = vaddr`; the mapping goes when the region is dropped.
    fn alloc_dma(&self, len: usize) -> Result<DmaRegion>;

    /// Maps caller memory for the device at `iova = vaddr` (a registered buffer pool).
    ///
    /// # Safety
    /// The memory must stay allocated until [`unmap_dma`](Self::unmap_dma) is called with the
    /// same range, and may only be accessed through raw pointers while the device can
    /// write it.
    unsafe fn map_dma(&self, ptr: *mut u8, len: usize) -> Result<()>;

    /// Removes a mapping made by [`map_dma`](Self::map_dma).
    fn unmap_dma(&self, ptr: *mut u8, len: usize);

    /// A short name (the PCI address).
    fn name(&self) -> &str;
}

/// Options of a `pcie://` leg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcieOptions {
    /// Namespace to expose.
    pub nsid: u32,
    /// Per-command timeout (admin and I/O); expiry resets the controller.
    pub timeout: Duration,
    /// Largest transfer of one NVMe command in bytes; MDTS lowers it further.
    pub max_transfer: usize,
    /// I/O queue pairs to ask for (Set Features Number of Queues).
    pub io_queues: u16,
    /// Entries per I/O queue at most (CAP.MQES lowers it further).
    pub queue_size: u16,
    /// Allocate queue memory from 2 MiB hugetlbfs pages (VFIO only; the fake ignores it).
    pub hugepages: bool,
}

impl Default for PcieOptions {
    fn default() -> Self {
        Self {
            nsid: 1,
            timeout: Duration::from_secs(30),
            max_transfer: 128 << 10,
            io_queues: 64,
            queue_size: 1024,
            hugepages: true,
        }
    }
}
