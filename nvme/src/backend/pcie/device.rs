//! The [`BlockDevice`] over a brought-up controller's namespace.

use std::sync::Arc;

use super::admin::Controller;
use super::queue::PcieQueuePair;
use super::{PciFunction, PcieOptions};
use crate::queue::{BlockDevice, QueuePair};
use crate::spec::Geometry;
use crate::Result;

/// One namespace of a PCIe NVMe controller; each `open_qpair` creates an I/O queue pair.
#[derive(Debug)]
pub struct PcieDevice {
    ctrl: Arc<Controller>,
    name: String,
}

impl PcieDevice {
    /// Brings up the controller behind `func` and identifies `opts.nsid`.
    pub fn new(func: Arc<dyn PciFunction>, opts: &PcieOptions) -> Result<Self> {
        let name = format!("pcie://{}?nsid={}", func.name(), opts.nsid);
        let ctrl = Controller::init(func, &name, opts)?;
        Ok(Self {
            ctrl: Arc::new(ctrl),
            name,
        })
    }

    /// Opens PCI function `bdf` (`0000:01:00.0`, bound to `vfio-pci`) through VFIO.
    #[cfg(target_os = "linux")]
    pub fn open_vfio(bdf: &str, opts: &PcieOptions) -> Result<Self> {
        let func = super::VfioFunction::open(bdf, opts.hugepages)?;
        Self::new(Arc::new(func), opts)
    }

    /// Renames the device (the URI it was opened from).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Bytes one NVMe command transfers at most (MDTS and `max_transfer`).
    pub fn max_transfer(&self) -> usize {
        self.ctrl.max_transfer
    }

    /// Identify Controller's model and serial number.
    pub fn model_serial(&self) -> (&str, &str) {
        (&self.ctrl.model, &self.ctrl.serial)
    }

    /// Whether the controller failed (reset after CSTS.CFS or a timeout) or is gone.
    pub fn is_failed(&self) -> bool {
        self.ctrl.failure().is_some()
    }

    /// Whether the device is gone (registers read all-ones).
    pub fn is_gone(&self) -> bool {
        self.ctrl.failure() == Some(super::admin::Failure::Gone)
    }
}

impl BlockDevice for PcieDevice {
    fn geometry(&self) -> Geometry {
        self.ctrl.geo
    }

    fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>> {
        Ok(Box::new(PcieQueuePair::open(self.ctrl.clone(), depth)?))
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn volatile_write_cache(&self) -> bool {
        self.ctrl.volatile_cache
    }
}
