//! NVMe over Fabrics commands and controller properties (NVMe-oF 1.1 §3.3 "Fabrics
//! Commands", Base §3.1.3 "Controller Properties").

use super::status::StatusCodeType;
use super::{Status, SubmissionQueueEntry};
use crate::{assert_wire_offset, assert_wire_size, wire_struct};

/// Opcode of every fabrics command.
pub const FABRICS_OPCODE: u8 = 0x7f;
/// The well-known discovery subsystem NQN (NVMe-oF §5).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Length of an NQN field in Connect data and log pages.
pub const NQN_FIELD_LEN: usize = 256;
/// Longest NQN a host may send (NVMe-oF §4.5: 223 bytes).
pub const NQN_MAX_LEN: usize = 223;
/// The controller ID a host sends to ask for a dynamic controller.
pub const CNTLID_DYNAMIC: u16 = 0xffff;

/// Fabrics command types (FCTYPE, NVMe-oF §3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FabricsCommandType {
    PropertySet = 0x00,
    Connect = 0x01,
    PropertyGet = 0x04,
    AuthenticationSend = 0x05,
    AuthenticationReceive = 0x06,
    Disconnect = 0x08,
}

impl FabricsCommandType {
    /// Decodes FCTYPE (SQE byte 4).
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x00 => Self::PropertySet,
            0x01 => Self::Connect,
            0x04 => Self::PropertyGet,
            0x05 => Self::AuthenticationSend,
            0x06 => Self::AuthenticationReceive,
            0x08 => Self::Disconnect,
            _ => return None,
        })
    }

    /// FCTYPE of a fabrics SQE (byte 4, where other commands hold NSID).
    pub fn of(sqe: &SubmissionQueueEntry) -> u8 {
        sqe.nsid as u8
    }
}

/// Fabrics status codes (SCT 1, NVMe-oF §2.2.1).
pub mod status {
    use super::{Status, StatusCodeType};
    pub const INCOMPATIBLE_FORMAT: Status = Status::new(StatusCodeType::CommandSpecific, 0x80);
    pub const CONTROLLER_BUSY: Status = Status::new(StatusCodeType::CommandSpecific, 0x81);
    pub const CONNECT_INVALID_PARAMETERS: Status =
        Status::new(StatusCodeType::CommandSpecific, 0x82);
    pub const RESTART_DISCOVERY: Status = Status::new(StatusCodeType::CommandSpecific, 0x83);
    pub const CONNECT_INVALID_HOST: Status = Status::new(StatusCodeType::CommandSpecific, 0x84);
    pub const INVALID_QUEUE_TYPE: Status = Status::new(StatusCodeType::CommandSpecific, 0x85);
    /// The queue must authenticate first (Base §8.13.1).
    pub const AUTHENTICATION_REQUIRED: Status = Status::new(StatusCodeType::CommandSpecific, 0x91);
}

wire_struct! {
    /// Connect command SQE (NVMe-oF §3.3, figure "Connect Command").
    pub struct ConnectCommand {
        pub opcode: u8,
        pub rsvd1: u8,
        pub cid: u16,
        pub fctype: u8,
        pub rsvd2: [u8; 19],
        /// SGL descriptor of the 1024-byte Connect data.
        pub sgl1: [u8; 16],
        /// Record format, 0.
        pub recfmt: u16,
        /// Queue ID: 0 for the admin queue.
        pub qid: u16,
        /// Submission queue size, 0's based.
        pub sqsize: u16,
        /// Connect attributes: bit 2 disables SQ flow control.
        pub cattr: u8,
        pub rsvd3: u8,
        /// Keep alive timeout in milliseconds (admin queue only).
        pub kato: u32,
        pub rsvd4: [u8; 12],
    }
}
assert_wire_size!(ConnectCommand, 64);
assert_wire_offset!(ConnectCommand, fctype, 4);
assert_wire_offset!(ConnectCommand, sgl1, 24);
assert_wire_offset!(ConnectCommand, recfmt, 40);
assert_wire_offset!(ConnectCommand, qid, 42);
assert_wire_offset!(ConnectCommand, sqsize, 44);
assert_wire_offset!(ConnectCommand, cattr, 46);
assert_wire_offset!(ConnectCommand, kato, 48);

impl ConnectCommand {
    /// CATTR bit: the host disables SQ flow control (SQHD not maintained).
    pub const CATTR_DISABLE_SQFLOW: u8 = 1 << 2;

    /// Decodes the Connect fields of a fabrics SQE.
    pub fn from_sqe(sqe: &SubmissionQueueEntry) -> Self {
        Self::read_from(&sqe.to_bytes())
    }
}

wire_struct! {
    /// Connect data, sent as the 1024-byte data of a Connect command (NVMe-oF §3.3.1).
    pub struct ConnectData {
        pub hostid: [u8; 16],
        /// 0xFFFF on the admin queue for a dynamic controller; the controller's ID on I/O
        /// queues.
        pub cntlid: u16,
        pub rsvd1: [u8; 238],
        pub subnqn: [u8; 256],
        pub hostnqn: [u8; 256],
        pub rsvd2: [u8; 256],
    }
}
assert_wire_size!(ConnectData, 1024);
assert_wire_offset!(ConnectData, cntlid, 16);
assert_wire_offset!(ConnectData, subnqn, 256);
assert_wire_offset!(ConnectData, hostnqn, 512);

/// Where an invalid Connect parameter sits, reported in DW0 of the failed completion
/// (NVMe-oF §3.3, "Connect Response": IATTR bits 23:16, IPO bits 15:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectParam {
    /// A field of the Connect SQE at this byte offset.
    Command(u16),
    /// A field of the Connect data at this byte offset.
    Data(u16),
}

impl ConnectParam {
    pub const QID: Self = Self::Command(42);
    pub const SQSIZE: Self = Self::Command(44);
    pub const RECFMT: Self = Self::Command(40);
    pub const CNTLID: Self = Self::Data(16);
    pub const SUBNQN: Self = Self::Data(256);
    pub const HOSTNQN: Self = Self::Data(512);

    /// The DW0 of a completion rejecting this parameter.
    pub fn dw0(self) -> u32 {
        match self {
            Self::Command(off) => u32::from(off),
            Self::Data(off) => (1 << 16) | u32::from(off),
        }
    }
}

wire_struct! {
    /// Property Get command SQE (NVMe-oF §3.3.4).
    pub struct PropertyGetCommand {
        pub opcode: u8,
        pub rsvd1: u8,
        pub cid: u16,
        pub fctype: u8,
        pub rsvd2: [u8; 35],
        /// Bits 2:0: size, 0 = 4 bytes, 1 = 8 bytes.
        pub attrib: u8,
        pub rsvd3: [u8; 3],
        /// Property offset.
        pub offset: u32,
        pub rsvd4: [u8; 16],
    }
}
assert_wire_size!(PropertyGetCommand, 64);
assert_wire_offset!(PropertyGetCommand, attrib, 40);
assert_wire_offset!(PropertyGetCommand, offset, 44);

wire_struct! {
    /// Property Set command SQE (NVMe-oF §3.3.5).
    pub struct PropertySetCommand {
        pub opcode: u8,
        pub rsvd1: u8,
        pub cid: u16,
        pub fctype: u8,
        pub rsvd2: [u8; 35],
        pub attrib: u8,
        pub rsvd3: [u8; 3],
        pub offset: u32,
        pub value: u64,
        pub rsvd4: [u8; 8],
    }
}
assert_wire_size!(PropertySetCommand, 64);
assert_wire_offset!(PropertySetCommand, attrib, 40);
assert_wire_offset!(PropertySetCommand, offset, 44);
assert_wire_offset!(PropertySetCommand, value, 48);

impl PropertyGetCommand {
    /// Decodes the Property Get fields of a fabrics SQE.
    pub fn from_sqe(sqe: &SubmissionQueueEntry) -> Self {
        Self::read_from(&sqe.to_bytes())
    }

    /// Property size in bytes (4 or 8).
    pub fn size(&self) -> u32 {
        if self.attrib & 7 == 1 {
            8
        } else {
            4
        }
    }
}

impl PropertySetCommand {
    /// Decodes the Property Set fields of a fabrics SQE.
    pub fn from_sqe(sqe: &SubmissionQueueEntry) -> Self {
        Self::read_from(&sqe.to_bytes())
    }

    /// Property size in bytes (4 or 8).
    pub fn size(&self) -> u32 {
        if self.attrib & 7 == 1 {
            8
        } else {
            4
        }
    }
}

/// Controller property offsets and fields (Base §3.1.3, figure "Property Definition").
pub mod property {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// Controller Configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// Controller Status (4 bytes).
    pub const CSTS: u32 = 0x1c;
    /// NVM Subsystem Reset (4 bytes, optional).
    pub const NSSR: u32 = 0x20;

    /// VS value for a version.
    pub const fn version(major: u32, minor: u32) -> u32 {
        (major << 16) | (minor << 8)
    }

    /// CAP: maximum queue entries supported (0's based), bits 15:0.
    pub const CAP_MQES_SHIFT: u32 = 0;
    /// CAP: contiguous queues required, bit 16.
    pub const CAP_CQR: u64 = 1 << 16;
    /// CAP: timeout in 500 ms units, bits 31:24.
    pub const CAP_TO_SHIFT: u32 = 24;
    /// CAP: NVM command set supported (CSS bit 0), bit 37.
    pub const CAP_CSS_NVM: u64 = 1 << 37;
    /// CAP: memory page size minimum, bits 51:48 (2^(12+n)).
    pub const CAP_MPSMIN_SHIFT: u32 = 48;
    /// CAP: memory page size maximum, bits 55:52.
    pub const CAP_MPSMAX_SHIFT: u32 = 52;

    /// CC: enable.
    pub const CC_EN: u32 = 1;
    /// CC: shutdown notification, bits 15:14.
    pub const CC_SHN_SHIFT: u32 = 14;
    pub const CC_SHN_MASK: u32 = 3 << CC_SHN_SHIFT;

    /// CSTS: ready.
    pub const CSTS_RDY: u32 = 1;
    /// CSTS: controller fatal status.
    pub const CSTS_CFS: u32 = 1 << 1;
    /// CSTS: shutdown status, bits 3:2.
    pub const CSTS_SHST_SHIFT: u32 = 2;
    pub const CSTS_SHST_MASK: u32 = 3 << CSTS_SHST_SHIFT;
    /// CSTS.SHST: shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 2 << CSTS_SHST_SHIFT;
}

/// Builds a fabrics SQE of the given type (for hosts and tests).
pub fn fabrics_sqe(fctype: FabricsCommandType, cid: u16) -> SubmissionQueueEntry {
    SubmissionQueueEntry {
        opcode: FABRICS_OPCODE,
        cid,
        nsid: fctype as u32,
        ..Default::default()
    }
}

/// The SQE of a Connect command for queue `qid` of `sqsize + 1` entries.
pub fn connect_sqe(cid: u16, qid: u16, sqsize: u16, kato_ms: u32) -> SubmissionQueueEntry {
    let mut sqe = fabrics_sqe(FabricsCommandType::Connect, cid);
    sqe.cdw10 = u32::from(qid) << 16;
    sqe.cdw11 = u32::from(sqsize);
    sqe.cdw12 = kato_ms;
    sqe
}

/// The SQE of a Property Get of `size` (4 or 8) bytes at `offset`.
pub fn property_get_sqe(cid: u16, offset: u32, size: u32) -> SubmissionQueueEntry {
    let mut sqe = fabrics_sqe(FabricsCommandType::PropertyGet, cid);
    sqe.cdw10 = u32::from(size == 8);
    sqe.cdw11 = offset;
    sqe
}

/// The SQE of a Property Set of `size` (4 or 8) bytes at `offset`.
pub fn property_set_sqe(cid: u16, offset: u32, size: u32, value: u64) -> SubmissionQueueEntry {
    let mut sqe = fabrics_sqe(FabricsCommandType::PropertySet, cid);
    sqe.cdw10 = u32::from(size == 8);
    sqe.cdw11 = offset;
    sqe.cdw12 = value as u32;
    sqe.cdw13 = (value >> 32) as u32;
    sqe
}

/// SGL descriptor type byte of a data block with the offset subtype: in-capsule data
/// (Base §4.1.2.1; NVMe/TCP §3.3.1).
pub const SGL_DATA_BLOCK_OFFSET: u8 = 0x01;
/// SGL descriptor type byte of a transport SGL data block (type 5h) with the transport
/// specific subtype (Ah): data moved by R2T/H2CData or C2HData (NVMe/TCP §3.3.1).
pub const SGL_TRANSPORT_DATA_BLOCK: u8 = 0x5a;
/// Position of PSDT in the SQE flags byte; 01b selects SGLs.
pub const PSDT_SHIFT: u8 = 6;

/// Points the SQE's data pointer at `len` bytes of in-capsule data.
pub fn sgl_in_capsule(sqe: &mut SubmissionQueueEntry, len: u32) {
    sqe.flags = (sqe.flags & 0x3f) | (1 << PSDT_SHIFT);
    sqe.dptr = [0, u64::from(len) | (u64::from(SGL_DATA_BLOCK_OFFSET) << 56)];
}

/// Points the SQE's data pointer at `len` bytes the transport moves (R2T/C2HData).
pub fn sgl_transport(sqe: &mut SubmissionQueueEntry, len: u32) {
    sqe.flags = (sqe.flags & 0x3f) | (1 << PSDT_SHIFT);
    sqe.dptr = [
        0,
        u64::from(len) | (u64::from(SGL_TRANSPORT_DATA_BLOCK) << 56),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_fields_sit_where_the_spec_puts_them() {
        let sqe = connect_sqe(9, 3, 127, 5000);
        let c = ConnectCommand::from_sqe(&sqe);
        assert_eq!(c.opcode, FABRICS_OPCODE);
        assert_eq!(c.cid, 9);
        assert_eq!(c.fctype, FabricsCommandType::Connect as u8);
        assert_eq!((c.qid, c.sqsize, c.kato), (3, 127, 5000));
        let b = sqe.to_bytes();
        assert_eq!(u16::from_le_bytes([b[42], b[43]]), 3);
        assert_eq!(u16::from_le_bytes([b[44], b[45]]), 127);
    }

    #[test]
    fn connect_data_round_trips() {
        let mut d = ConnectData::zeroed();
        d.cntlid = 0xffff;
        super::super::wire::put_nul_padded(&mut d.hostnqn, "nqn.host");
        let mut b = [0u8; 1024];
        assert_eq!(d.write_to(&mut b), 1024);
        assert_eq!(&b[512..520], b"nqn.host");
        assert_eq!(&b[16..18], &[0xff, 0xff]);
        assert_eq!(ConnectData::read_from(&b), d);
    }

    #[test]
    fn invalid_parameter_location_encodes_iattr_and_ipo() {
        assert_eq!(ConnectParam::HOSTNQN.dw0(), 0x1_0200);
        assert_eq!(ConnectParam::QID.dw0(), 42);
        assert_eq!(status::CONNECT_INVALID_HOST.sc(), 0x84);
    }

    #[test]
    fn property_commands_decode() {
        let g = PropertyGetCommand::from_sqe(&property_get_sqe(1, property::CAP, 8));
        assert_eq!((g.offset, g.size()), (0, 8));
        let s = PropertySetCommand::from_sqe(&property_set_sqe(2, property::CC, 4, 0x46_0001));
        assert_eq!((s.offset, s.size(), s.value), (0x14, 4, 0x46_0001));
    }
}
