//! The passthrough command the Linux NVMe driver takes (include/uapi/linux/nvme_ioctl.h), and
//! how an NVMe submission queue entry becomes one.
//!
//! `struct nvme_uring_cmd` rides in the 80-byte command area of a 128-byte io_uring SQE
//! (`IORING_OP_URING_CMD`, `cmd_op = NVME_URING_CMD_IO`); `struct nvme_passthru_cmd` is the
//! same 72 bytes with the completion's DW0 in the last word, for the `NVME_IOCTL_ADMIN_CMD`
//! ioctl. The kernel fills in the command identifier and builds the PRPs from `addr`/`data_len`
//! itself, so only the opcode, namespace and command dwords travel.

use crate::spec::SubmissionQueueEntry;
use crate::{assert_wire_offset, assert_wire_size};

/// `_IOC(dir, 'N', nr, size)` of the NVMe driver's ioctls (asm-generic/ioctl.h).
const fn nvme_ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'N' as u32) << 8) | nr
}
const IOC_NONE: u32 = 0;
const IOC_READ_WRITE: u32 = 3;

/// `NVME_IOCTL_ID`: `_IO('N', 0x40)`, returns the namespace ID of a namespace device.
pub(super) const NVME_IOCTL_ID: u32 = nvme_ioc(IOC_NONE, 0x40, 0);
/// `NVME_IOCTL_ADMIN_CMD`: `_IOWR('N', 0x41, struct nvme_admin_cmd)`.
pub(super) const NVME_IOCTL_ADMIN_CMD: u32 = nvme_ioc(IOC_READ_WRITE, 0x41, NvmePassthruCmd::SIZE);
/// `NVME_URING_CMD_IO`: `_IOWR('N', 0x80, struct nvme_uring_cmd)`, the `cmd_op` of an I/O
/// command on a generic char device.
pub(super) const NVME_URING_CMD_IO: u32 = nvme_ioc(IOC_READ_WRITE, 0x80, NvmeUringCmd::SIZE);

/// `struct nvme_uring_cmd`: one NVMe command for `IORING_OP_URING_CMD`. Fields are native
/// endian (the kernel copies them into the little-endian SQE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeUringCmd {
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    /// Metadata buffer address (unused: formats with metadata are refused at open).
    pub metadata: u64,
    /// Data buffer address; the kernel maps it and builds the PRPs.
    pub addr: u64,
    pub metadata_len: u32,
    /// Data buffer length in bytes.
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    /// The request's timeout; 0 takes the driver's `io_timeout`.
    pub timeout_ms: u32,
    pub rsvd2: u32,
}

assert_wire_size!(NvmeUringCmd, 72);
assert_wire_offset!(NvmeUringCmd, nsid, 4);
assert_wire_offset!(NvmeUringCmd, cdw2, 8);
assert_wire_offset!(NvmeUringCmd, metadata, 16);
assert_wire_offset!(NvmeUringCmd, addr, 24);
assert_wire_offset!(NvmeUringCmd, metadata_len, 32);
assert_wire_offset!(NvmeUringCmd, data_len, 36);
assert_wire_offset!(NvmeUringCmd, cdw10, 40);
assert_wire_offset!(NvmeUringCmd, cdw15, 60);
assert_wire_offset!(NvmeUringCmd, timeout_ms, 64);

impl NvmeUringCmd {
    pub const SIZE: usize = 72;

    /// The command for `sqe` (opcode, NSID, CDW2–3 and CDW10–15; its CID and data pointer
    /// are the kernel's business) with the data buffer at `addr`, `data_len` bytes long.
    pub fn from_sqe(sqe: &SubmissionQueueEntry, addr: u64, data_len: u32, timeout_ms: u32) -> Self {
        Self {
            opcode: sqe.opcode,
            flags: 0,
            rsvd1: 0,
            nsid: sqe.nsid,
            cdw2: sqe.cdw2,
            cdw3: sqe.cdw3,
            metadata: 0,
            addr,
            metadata_len: 0,
            data_len,
            cdw10: sqe.cdw10,
            cdw11: sqe.cdw11,
            cdw12: sqe.cdw12,
            cdw13: sqe.cdw13,
            cdw14: sqe.cdw14,
            cdw15: sqe.cdw15,
            timeout_ms,
            rsvd2: 0,
        }
    }

    /// The 80-byte command area of a 128-byte SQE holding this command (the tail zero).
    #[inline]
    pub fn to_sqe_cmd(&self) -> [u8; 80] {
        let mut out = [0u8; 80];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&[self.opcode, self.flags]);
        put(&self.rsvd1.to_ne_bytes());
        for w in [self.nsid, self.cdw2, self.cdw3] {
            put(&w.to_ne_bytes());
        }
        put(&self.metadata.to_ne_bytes());
        put(&self.addr.to_ne_bytes());
        for w in [
            self.metadata_len,
            self.data_len,
            self.cdw10,
            self.cdw11,
            self.cdw12,
            self.cdw13,
            self.cdw14,
            self.cdw15,
            self.timeout_ms,
            self.rsvd2,
        ] {
            put(&w.to_ne_bytes());
        }
        out
    }
}

/// `struct nvme_passthru_cmd` (alias `nvme_admin_cmd`): the ioctl form, whose last word
/// returns the completion's DW0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmePassthruCmd {
    /// Everything but the last word, as in [`NvmeUringCmd`].
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub addr: u64,
    pub metadata_len: u32,
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    pub timeout_ms: u32,
    /// Completion DW0, written by the kernel.
    pub result: u32,
}

assert_wire_size!(NvmePassthruCmd, 72);
assert_wire_offset!(NvmePassthruCmd, addr, 24);
assert_wire_offset!(NvmePassthruCmd, data_len, 36);
assert_wire_offset!(NvmePassthruCmd, cdw10, 40);
assert_wire_offset!(NvmePassthruCmd, timeout_ms, 64);
assert_wire_offset!(NvmePassthruCmd, result, 68);

impl NvmePassthruCmd {
    pub const SIZE: usize = 72;
}
