//! The real [`PciFunction`]: a PCI function bound to `vfio-pci`, reached through
//! `vfio-ioctls` (container, group, IOMMU type 1, device fd), with BAR0 mapped into the
//! process and DMA mapped `iova = vaddr`.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use super::region::DmaRegion;
use super::PciFunction;
use crate::{Error, Result};

/// VFIO region index of BAR0 and of the configuration space (`VFIO_PCI_*_REGION_INDEX`).
const BAR0_REGION: u32 = 0;
const CONFIG_REGION: u32 = 7;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
const REGION_FLAG_MMAP: u32 = 1 << 2;
/// PCI Command register (offset 04h): memory space enable (bit 1), bus master enable (bit 2).
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// A PCI function bound to `vfio-pci`.
pub struct VfioFunction {
    bdf: String,
    container: Arc<VfioContainer>,
    _device: VfioDevice,
    bar: *mut u8,
    bar_len: usize,
    hugepages: bool,
}

// SAFETY: `bar` points at the device's BAR0 mapping, which lives as long as this value and is
// only accessed with volatile 32-bit operations; MMIO registers tolerate concurrent access
// from several threads (each doorbell is written by the one queue pair owning it).
unsafe impl Send for VfioFunction {}
// SAFETY: as for Send.
unsafe impl Sync for VfioFunction {}

impl std::fmt::Debug for VfioFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioFunction")
            .field("bdf", &self.bdf)
            .field("bar_len", &self.bar_len)
            .finish()
    }
}

impl VfioFunction {
    /// VFIO bring-up, in order: container (`/dev/vfio/vfio`, API version), the function's
    /// IOMMU group attached to it with the type 1 IOMMU, the device fd, bus mastering on,
    /// BAR0 mapped.
    /// DMA memory comes from 2 MiB hugetlbfs pages if `hugepages`, else ordinary pages.
    pub fn open(bdf: &str, hugepages: bool) -> Result<Self> {
        let err = |step: &str, reason: String| Error::Pcie {
            device: bdf.to_string(),
            step: step.to_string(),
            reason,
        };
        let sysfs = PathBuf::from("/sys/bus/pci/devices").join(bdf);
        if !sysfs.exists() {
            return Err(err(
                "find the PCI function",
                format!("{} does not exist", sysfs.display()),
            ));
        }
        let container = Arc::new(
            VfioContainer::new(None)
                .map_err(|e| err("open the VFIO container /dev/vfio/vfio", e.to_string()))?,
        );
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&sysfs, ops, false).map_err(|e| {
            err(
                "open the VFIO group and device (is it bound to vfio-pci, is /dev/vfio/N accessible?)",
                e.to_string(),
            )
        })?;
        let mut cmd = [0u8; 2];
        device.region_read(CONFIG_REGION, &mut cmd, PCI_COMMAND);
        let v = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        device.region_write(CONFIG_REGION, &v.to_le_bytes(), PCI_COMMAND);
        if device.get_region_flags(BAR0_REGION) & REGION_FLAG_MMAP == 0 {
            return Err(err("map BAR0", "VFIO does not allow mapping BAR0".into()));
        }
        let bar_len = device.get_region_size(BAR0_REGION) as usize;
        let offset = device.get_region_offset(BAR0_REGION);
        if bar_len < 0x2000 {
            return Err(err("map BAR0", format!("BAR0 is only {bar_len} bytes")));
        }
        // SAFETY: a fresh shared mapping of the device fd's BAR0 region at an address the
        // kernel picks; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bar_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(err("map BAR0", std::io::Error::last_os_error().to_string()));
        }
        Ok(Self {
            bdf: bdf.to_string(),
            container,
            _device: device,
            bar: p.cast(),
            bar_len,
            hugepages,
        })
    }

    #[inline]
    fn reg(&self, off: u32) -> *mut u32 {
        let off = off as usize;
        assert!(
            off % 4 == 0 && off + 4 <= self.bar_len,
            "BAR0 access at {off:#x}"
        );
        self.bar.wrapping_add(off).cast()
    }
}

impl PciFunction for VfioFunction {
    #[inline]
    fn read32(&self, off: u32) -> u32 {
        // SAFETY: `reg` checked bounds and alignment inside the live BAR0 mapping.
        u32::from_le(unsafe { self.reg(off).read_volatile() })
    }

    #[inline]
    fn write32(&self, off: u32, val: u32) {
        // SAFETY: as in `read32`.
        unsafe { self.reg(off).write_volatile(val.to_le()) }
    }

    fn alloc_dma(&self, len: usize) -> Result<DmaRegion> {
        let r = if self.hugepages {
            DmaRegion::hugepages(len)?
        } else {
            DmaRegion::heap(len)?
        };
        // SAFETY: fresh memory no reference points into, unmapped by the hook below before
        // it is freed.
        unsafe { self.map_dma(r.as_ptr(), r.len()) }?;
        let container = self.container.clone();
        Ok(r.on_drop(Box::new(move |iova, len| {
            let _ = container.vfio_dma_unmap(iova, len);
        })))
    }

    unsafe fn map_dma(&self, ptr: *mut u8, len: usize) -> Result<()> {
        // SAFETY: the caller keeps the memory allocated and reference-free while mapped.
        unsafe { self.container.vfio_dma_map(ptr as u64, len, ptr) }.map_err(|e| Error::Pcie {
            device: self.bdf.clone(),
            step: "VFIO_IOMMU_MAP_DMA".into(),
            reason: e.to_string(),
        })
    }

    fn unmap_dma(&self, ptr: *mut u8, len: usize) {
        if let Err(e) = self.container.vfio_dma_unmap(ptr as u64, len) {
            tracing::warn!(device = %self.bdf, "VFIO_IOMMU_UNMAP_DMA: {e}");
        }
    }

    fn name(&self) -> &str {
        &self.bdf
    }
}

impl Drop for VfioFunction {
    fn drop(&mut self) {
        // SAFETY: mapped in `open` with this length, unmapped only here.
        unsafe { libc::munmap(self.bar.cast(), self.bar_len) };
    }
}
