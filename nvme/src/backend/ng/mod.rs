//! `nvme-ng:///dev/ng0n1` — an NVMe namespace through the kernel's generic char device, with
//! io_uring NVMe passthrough (`IORING_OP_URING_CMD`, Linux 5.19+).
//!
//! The kernel's NVMe driver keeps the controller (queues, interrupts, resets, error recovery)
//! and this back end hands it ready-made NVMe commands: no block layer scheduling, no page
//! cache, no file system, and NVMe statuses come back as the controller gave them. That is
//! the kernel-bypass-lite path: most of what `pcie://` saves, without unbinding the device
//! from the kernel or needing an IOMMU.
//!
//! [`NgDevice::open`] checks that the path is a character device, opens it read-write and
//! claims it with a non-blocking exclusive `flock` (architecture invariant 6: only the volume
//! writes a leg; the claim binds every nvmirror process, not other programs, and not the
//! namespace's block device `/dev/nvme0n1`). It asks the driver for the namespace ID
//! (`NVME_IOCTL_ID`), reads Identify Controller (MDTS) and Identify Namespace (size, LBA
//! format) through the admin passthrough ioctl, and sends one Flush through a passthrough
//! ring, so a kernel without NVMe `uring_cmd` support fails at open with a message that says
//! so rather than at the first write.
//!
//! Each queue pair owns one ring with the char device registered as fixed file 0; see
//! [`NgQueuePair`] for how commands map to NVMe.

mod cmd;
mod qpair;
mod sys;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cmd::{NvmePassthruCmd, NvmeUringCmd};
pub use qpair::NgQueuePair;
use qpair::QueueConfig;

use crate::queue::{BlockDevice, QueuePair};
use crate::spec::admin::{cns, AdminOpcode, IdentifyController, IdentifyNamespace, IDENTIFY_LEN};
use crate::spec::Geometry;
use crate::{Error, Result};

/// How long an idle SQPOLL kernel thread spins before it sleeps.
const SQPOLL_IDLE_MS: u32 = 1000;
/// The transfer limit when neither the URI nor the controller's MDTS sets a lower one: 256
/// KiB keeps a buffer of scattered 4 KiB pages within the driver's 127 segments.
pub const DEFAULT_MAX_TRANSFER: u32 = 256 << 10;

/// How to open an `nvme-ng://` leg.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NgOptions {
    /// Let a kernel thread poll the submission queue.
    pub sqpoll: bool,
    /// Per-command timeout handed to the driver (`timeout_ms`); `None` takes its
    /// `nvme_core.io_timeout`.
    pub timeout: Option<Duration>,
    /// Longest read or write in one NVMe command; `None` is the smaller of the controller's
    /// MDTS and [`DEFAULT_MAX_TRANSFER`].
    pub max_transfer: Option<u32>,
}

/// An NVMe namespace's generic char device opened for passthrough queue pairs.
#[derive(Debug)]
pub struct NgDevice {
    name: String,
    path: PathBuf,
    nsid: u32,
    geo: Geometry,
    /// The claimed char device: its `flock` is released when it (and every ring that
    /// registered it) closes.
    file: File,
    sqpoll: bool,
    max_transfer: u32,
    timeout_ms: u32,
}

impl NgDevice {
    /// Opens and claims the generic char device at `path`. See the module docs.
    pub fn open(path: &Path, opts: &NgOptions) -> Result<Self> {
        let open_err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let step_err = |step: &str, reason: String| Error::NvmeNg {
            device: path.to_path_buf(),
            step: step.into(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                open_err(io::Error::new(
                    e.kind(),
                    format!("{e}: no such NVMe generic char device (is the nvme driver loaded? `ls /dev/ng*`)"),
                ))
            } else {
                open_err(e)
            }
        })?;
        if !meta.file_type().is_char_device() {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a character device: nvme-ng:// takes an NVMe generic char device such as \
                 /dev/ng0n1 (a block device or file is a file:// or /dev/nvme… leg)",
            )));
        }
        // std adds O_CLOEXEC to every open.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        sys::flock_exclusive(&file).map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Error::Busy {
                    path: path.to_path_buf(),
                }
            } else {
                open_err(sys::named("flock", e))
            }
        })?;
        let nsid = sys::namespace_id(&file).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::ENOTTY) {
                " (not an NVMe namespace's generic char device)"
            } else {
                ""
            };
            step_err("namespace ID", format!("ioctl(NVME_IOCTL_ID): {e}{hint}"))
        })?;

        let identify = |cns: u8, nsid: u32, step: &str| -> Result<Vec<u8>> {
            let mut page = vec![0u8; IDENTIFY_LEN];
            let cmd = NvmePassthruCmd {
                opcode: AdminOpcode::Identify as u8,
                nsid,
                cdw10: u32::from(cns),
                ..Default::default()
            };
            sys::admin_command(&file, cmd, &mut page).map_err(|e| step_err(step, e.to_string()))?;
            Ok(page)
        };
        let idc =
            IdentifyController::read_from(&identify(cns::CONTROLLER, 0, "Identify Controller")?);
        let step = format!("Identify Namespace {nsid}");
        let idn = IdentifyNamespace::read_from(&identify(cns::NAMESPACE, nsid, &step)?);
        let geo = namespace_geometry(&idn).map_err(|r| step_err(&step, r))?;

        // MDTS is in units of the minimum page size, which the char device does not show;
        // 4 KiB is every controller's minimum in practice (CAP.MPSMIN 0).
        let mdts = match idc.mdts {
            0 => u32::MAX,
            m => 4096u32.checked_shl(u32::from(m)).unwrap_or(u32::MAX),
        };
        let max_transfer = opts
            .max_transfer
            .unwrap_or(DEFAULT_MAX_TRANSFER)
            .min(mdts)
            .max(geo.lba_size)
            / geo.lba_size
            * geo.lba_size;
        let timeout_ms = opts
            .timeout
            .map_or(0, |t| t.as_millis().clamp(1, u128::from(u32::MAX)) as u32);

        let dev = Self {
            name: format!("nvme-ng://{}", path.display()),
            path: path.to_path_buf(),
            nsid,
            geo,
            file,
            sqpoll: opts.sqpoll,
            max_transfer,
            timeout_ms,
        };
        dev.probe_passthrough()
            .map_err(|r| step_err("io_uring passthrough probe", r))?;
        Ok(dev)
    }

    /// The path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace ID the char device stands for.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// Longest read or write sent as one NVMe command, in bytes.
    pub fn max_transfer(&self) -> u32 {
        self.max_transfer
    }

    /// Opens a queue pair as its concrete type.
    pub fn open_ng_qpair(&self, depth: u32) -> Result<NgQueuePair> {
        NgQueuePair::new(&self.queue_config(depth))
            .map_err(|e| Error::QueuePair(format!("{}: {e}", self.name)))
    }

    fn queue_config(&self, depth: u32) -> QueueConfig {
        QueueConfig {
            fd: self.file.as_raw_fd(),
            nsid: self.nsid,
            geo: self.geo,
            depth,
            sqpoll: self.sqpoll.then_some(SQPOLL_IDLE_MS),
            max_transfer: self.max_transfer,
            timeout_ms: self.timeout_ms,
        }
    }

    /// Sends one Flush through a passthrough ring and waits for it: a kernel whose io_uring or
    /// NVMe driver cannot do passthrough fails here with the reason.
    fn probe_passthrough(&self) -> std::result::Result<(), String> {
        let mut qp = NgQueuePair::new(&self.queue_config(1)).map_err(|e| e.to_string())?;
        match qp.probe_flush() {
            Ok(0) => Ok(()),
            Ok(res) if res < 0 => {
                let errno = -res;
                let err = io::Error::from_raw_os_error(errno);
                Err(match errno {
                    libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL => format!(
                        "{err}: the kernel's NVMe driver refuses io_uring passthrough on this device (needs Linux 5.19+ with the generic char device)"
                    ),
                    libc::EACCES | libc::EPERM => {
                        format!("{err}: passthrough needs write access to the device (or CAP_SYS_ADMIN)")
                    }
                    _ => err.to_string(),
                })
            }
            Ok(status) => Err(format!(
                "Flush completed with {:?}",
                crate::spec::Status::from_raw(status as u16)
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Size and block size from Identify Namespace: the formatted LBA format must be 512 or 4096
/// bytes without metadata, and the namespace active.
fn namespace_geometry(idn: &IdentifyNamespace) -> std::result::Result<Geometry, String> {
    // FLBAS bits 3:0 index the format; bits 6:5 extend it past 16 formats.
    let index = usize::from(idn.flbas & 0xf) | (usize::from(idn.flbas & 0x60) >> 1);
    let fmt = idn.lbaf.get(index).copied().unwrap_or(0);
    let lbads = (fmt >> 16) & 0xff;
    if fmt & 0xffff != 0 || !(lbads == 9 || lbads == 12) {
        return Err(format!(
            "LBA format {index} ({fmt:#x}): only 512 or 4096-byte blocks without metadata"
        ));
    }
    if idn.nsze == 0 {
        return Err("the namespace is not active (size 0)".into());
    }
    Ok(Geometry {
        lba_size: 1 << lbads,
        num_blocks: idn.nsze,
    })
}

impl BlockDevice for NgDevice {
    fn geometry(&self) -> Geometry {
        self.geo
    }

    fn open_qpair(&self, depth: u32) -> Result<Box<dyn QueuePair>> {
        Ok(Box::new(self.open_ng_qpair(depth)?))
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests;
