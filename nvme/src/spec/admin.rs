//! Admin commands and their data structures (Base §5): Identify pages, log pages, features,
//! and the NVMe-oF discovery log page (NVMe-oF §5.3).

use super::status::StatusCodeType;
use super::Status;
use crate::{assert_wire_offset, assert_wire_size, wire_struct};

/// Admin opcodes nvmirror implements (Base §5, figure "Opcodes for Admin Commands").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminOpcode {
    GetLogPage = 0x02,
    Identify = 0x06,
    Abort = 0x08,
    SetFeatures = 0x09,
    GetFeatures = 0x0a,
    AsyncEventRequest = 0x0c,
    KeepAlive = 0x18,
}

impl AdminOpcode {
    /// Decodes an opcode byte; `None` for unimplemented opcodes.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x02 => Self::GetLogPage,
            0x06 => Self::Identify,
            0x08 => Self::Abort,
            0x09 => Self::SetFeatures,
            0x0a => Self::GetFeatures,
            0x0c => Self::AsyncEventRequest,
            0x18 => Self::KeepAlive,
            _ => return None,
        })
    }
}

/// Identify CNS values (Base §5.17.1, CDW10 bits 7:0).
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NAMESPACES: u8 = 0x02;
    pub const NS_ID_DESCRIPTORS: u8 = 0x03;
    /// I/O command set specific Identify Controller (CSI in CDW11 bits 31:24).
    pub const CS_CONTROLLER: u8 = 0x06;
}

/// Log page identifiers (Base §5.16.1).
pub mod log_page {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NAMESPACES: u8 = 0x04;
    pub const DISCOVERY: u8 = 0x70;
}

/// Feature identifiers (Base §5.27.1).
pub mod feature {
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
}

/// Admin command-specific status codes (SCT 1, Base §5).
pub mod status {
    use super::{Status, StatusCodeType};
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: Status =
        Status::new(StatusCodeType::CommandSpecific, 0x05);
    pub const INVALID_LOG_PAGE: Status = Status::new(StatusCodeType::CommandSpecific, 0x09);
    pub const FEATURE_NOT_SAVEABLE: Status = Status::new(StatusCodeType::CommandSpecific, 0x0d);
    /// Generic: a transport error the host may retry (e.g. a data digest mismatch).
    pub const TRANSIENT_TRANSPORT_ERROR: Status = Status::new(StatusCodeType::Generic, 0x22);
    /// Generic: the SGL offset is invalid.
    pub const SGL_OFFSET_INVALID: Status = Status::new(StatusCodeType::Generic, 0x16);
}

/// Controller type of Identify Controller (CNTRLTYPE).
pub mod cntrltype {
    pub const IO: u8 = 1;
    pub const DISCOVERY: u8 = 2;
}

/// Length of an Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

wire_struct! {
    /// Identify Controller data structure (Base §5.17.2.1, CNS 01h).
    pub struct IdentifyController {
        pub vid: u16,
        pub ssvid: u16,
        /// Serial number, ASCII, space padded.
        pub sn: [u8; 20],
        /// Model number, ASCII, space padded.
        pub mn: [u8; 40],
        /// Firmware revision.
        pub fr: [u8; 8],
        pub rab: u8,
        pub ieee: [u8; 3],
        pub cmic: u8,
        /// Maximum data transfer size, 2^n units of CAP.MPSMIN; 0 = no limit.
        pub mdts: u8,
        pub cntlid: u16,
        pub ver: u32,
        pub rtd3r: u32,
        pub rtd3e: u32,
        pub oaes: u32,
        pub ctratt: u32,
        pub rrls: u16,
        pub rsvd102: [u8; 9],
        pub cntrltype: u8,
        pub fguid: [u8; 16],
        pub crdt: [u16; 3],
        pub rsvd134: [u8; 119],
        pub nvmsr: u8,
        pub vwci: u8,
        pub mec: u8,
        pub oacs: u16,
        pub acl: u8,
        /// Asynchronous event request limit, 0's based.
        pub aerl: u8,
        pub frmw: u8,
        /// Log page attributes.
        pub lpa: u8,
        /// Error log page entries, 0's based.
        pub elpe: u8,
        pub npss: u8,
        pub avscc: u8,
        pub apsta: u8,
        pub wctemp: u16,
        pub cctemp: u16,
        pub mtfa: u16,
        pub hmpre: u32,
        pub hmmin: u32,
        pub tnvmcap: [u8; 16],
        pub unvmcap: [u8; 16],
        pub rpmbs: u32,
        pub edstt: u16,
        pub dsto: u8,
        pub fwug: u8,
        /// Keep alive support: granularity in 100 ms units.
        pub kas: u16,
        pub hctma: u16,
        pub mntmt: u16,
        pub mxtmt: u16,
        pub sanicap: u32,
        pub hmminds: u32,
        pub hmmaxd: u16,
        pub nvmsetidmax: u16,
        pub endgidmax: u16,
        pub anatt: u8,
        pub anacap: u8,
        pub anagrpmax: u32,
        pub nanagrpid: u32,
        pub pels: u32,
        pub rsvd356: [u8; 156],
        pub sqes: u8,
        pub cqes: u8,
        pub maxcmd: u16,
        /// Number of namespaces (highest valid NSID).
        pub nn: u32,
        /// Optional NVM command support.
        pub oncs: u16,
        pub fuses: u16,
        pub fna: u8,
        /// Volatile write cache present (bit 0).
        pub vwc: u8,
        pub awun: u16,
        pub awupf: u16,
        pub icsvscc: u8,
        pub nwpc: u8,
        pub acwu: u16,
        pub rsvd534: [u8; 2],
        /// SGL support.
        pub sgls: u32,
        pub mnan: u32,
        pub rsvd544: [u8; 224],
        pub subnqn: [u8; 256],
        pub rsvd1024: [u8; 768],
        /// I/O queue command capsule supported size, 16-byte units.
        pub ioccsz: u32,
        /// I/O queue response capsule supported size, 16-byte units.
        pub iorcsz: u32,
        /// In-capsule data offset, 16-byte units.
        pub icdoff: u16,
        pub fcatt: u8,
        pub msdbd: u8,
        pub ofcs: u16,
        pub rsvd1806: [u8; 242],
        pub psd: [u8; 1024],
        pub vs: [u8; 1024],
    }
}
assert_wire_size!(IdentifyController, 4096);
assert_wire_offset!(IdentifyController, sn, 4);
assert_wire_offset!(IdentifyController, mn, 24);
assert_wire_offset!(IdentifyController, fr, 64);
assert_wire_offset!(IdentifyController, mdts, 77);
assert_wire_offset!(IdentifyController, cntlid, 78);
assert_wire_offset!(IdentifyController, ver, 80);
assert_wire_offset!(IdentifyController, oaes, 92);
assert_wire_offset!(IdentifyController, cntrltype, 111);
assert_wire_offset!(IdentifyController, oacs, 256);
assert_wire_offset!(IdentifyController, aerl, 259);
assert_wire_offset!(IdentifyController, lpa, 261);
assert_wire_offset!(IdentifyController, kas, 320);
assert_wire_offset!(IdentifyController, sqes, 512);
assert_wire_offset!(IdentifyController, maxcmd, 514);
assert_wire_offset!(IdentifyController, nn, 516);
assert_wire_offset!(IdentifyController, oncs, 520);
assert_wire_offset!(IdentifyController, vwc, 525);
assert_wire_offset!(IdentifyController, sgls, 536);
assert_wire_offset!(IdentifyController, subnqn, 768);
assert_wire_offset!(IdentifyController, ioccsz, 1792);
assert_wire_offset!(IdentifyController, iorcsz, 1796);
assert_wire_offset!(IdentifyController, icdoff, 1800);
assert_wire_offset!(IdentifyController, msdbd, 1803);
assert_wire_offset!(IdentifyController, psd, 2048);
assert_wire_offset!(IdentifyController, vs, 3072);

/// ONCS bits (Identify Controller byte 520).
pub mod oncs {
    pub const DATASET_MANAGEMENT: u16 = 1 << 2;
    pub const WRITE_ZEROES: u16 = 1 << 3;
}

/// SGLS bits (Identify Controller byte 536).
pub mod sgls {
    /// SGLs supported, no alignment requirement.
    pub const SUPPORTED: u32 = 1;
    /// SGL offset in data block descriptors (in-capsule data) supported.
    pub const OFFSET: u32 = 1 << 20;
}

wire_struct! {
    /// Identify Namespace data structure (NVM §4.1.5.1, CNS 00h).
    pub struct IdentifyNamespace {
        /// Namespace size in logical blocks.
        pub nsze: u64,
        pub ncap: u64,
        pub nuse: u64,
        pub nsfeat: u8,
        /// Number of LBA formats, 0's based.
        pub nlbaf: u8,
        /// Formatted LBA size: index into `lbaf`.
        pub flbas: u8,
        pub mc: u8,
        pub dpc: u8,
        pub dps: u8,
        pub nmic: u8,
        pub rescap: u8,
        pub fpi: u8,
        /// Deallocate logical block features: bits 2:0 = 001b reads of deallocated blocks
        /// return zeroes.
        pub dlfeat: u8,
        pub nawun: u16,
        pub nawupf: u16,
        pub nacwu: u16,
        pub nabsn: u16,
        pub nabo: u16,
        pub nabspf: u16,
        pub noiob: u16,
        pub nvmcap: [u8; 16],
        pub npwg: u16,
        pub npwa: u16,
        pub npdg: u16,
        pub npda: u16,
        pub nows: u16,
        pub mssrl: u16,
        pub mcl: u32,
        pub msrc: u8,
        pub rsvd81: u8,
        pub nulbaf: u8,
        pub rsvd83: [u8; 9],
        pub anagrpid: u32,
        pub rsvd96: [u8; 3],
        pub nsattr: u8,
        pub nvmsetid: u16,
        pub endgid: u16,
        pub nguid: [u8; 16],
        pub eui64: [u8; 8],
        /// LBA formats: MS bits 15:0, LBADS (log2 block size) bits 23:16, RP bits 25:24.
        pub lbaf: [u32; 64],
        pub vs: [u8; 3712],
    }
}
assert_wire_size!(IdentifyNamespace, 4096);
assert_wire_offset!(IdentifyNamespace, nsfeat, 24);
assert_wire_offset!(IdentifyNamespace, flbas, 26);
assert_wire_offset!(IdentifyNamespace, dlfeat, 33);
assert_wire_offset!(IdentifyNamespace, nvmcap, 48);
assert_wire_offset!(IdentifyNamespace, anagrpid, 92);
assert_wire_offset!(IdentifyNamespace, nguid, 104);
assert_wire_offset!(IdentifyNamespace, eui64, 120);
assert_wire_offset!(IdentifyNamespace, lbaf, 128);
assert_wire_offset!(IdentifyNamespace, vs, 384);

/// An LBA format entry with `lba_size` bytes per block and no metadata.
pub fn lba_format(lba_size: u32) -> u32 {
    lba_size.trailing_zeros() << 16
}

wire_struct! {
    /// Namespace identification descriptor header (Base §5.17.2.3, CNS 03h); NIDL bytes of
    /// identifier follow.
    pub struct NsIdDescriptorHeader {
        /// Identifier type ([`nidt`]).
        pub nidt: u8,
        /// Identifier length.
        pub nidl: u8,
        pub rsvd: u16,
    }
}
assert_wire_size!(NsIdDescriptorHeader, 4);

/// Namespace identifier types.
pub mod nidt {
    pub const EUI64: u8 = 1;
    pub const NGUID: u8 = 2;
    pub const UUID: u8 = 3;
    pub const CSI: u8 = 4;
}

wire_struct! {
    /// SMART / Health Information log page (Base §5.16.1.3, LID 02h), 512 bytes.
    pub struct SmartLog {
        pub critical_warning: u8,
        /// Composite temperature in kelvins, little endian.
        pub temperature: [u8; 2],
        pub avail_spare: u8,
        pub spare_thresh: u8,
        pub percent_used: u8,
        pub endu_grp_crit_warn: u8,
        pub rsvd7: [u8; 25],
        /// In thousands of 512-byte units.
        pub data_units_read: [u64; 2],
        pub data_units_written: [u64; 2],
        pub host_reads: [u64; 2],
        pub host_writes: [u64; 2],
        pub ctrl_busy_time: [u64; 2],
        pub power_cycles: [u64; 2],
        pub power_on_hours: [u64; 2],
        pub unsafe_shutdowns: [u64; 2],
        pub media_errors: [u64; 2],
        pub num_err_log_entries: [u64; 2],
        pub rsvd192: [u8; 320],
    }
}
assert_wire_size!(SmartLog, 512);
assert_wire_offset!(SmartLog, temperature, 1);
assert_wire_offset!(SmartLog, avail_spare, 3);
assert_wire_offset!(SmartLog, data_units_read, 32);
assert_wire_offset!(SmartLog, host_writes, 80);
assert_wire_offset!(SmartLog, media_errors, 160);

wire_struct! {
    /// Firmware Slot Information log page (Base §5.16.1.4, LID 03h), 512 bytes.
    pub struct FirmwareSlotLog {
        /// Active firmware info: bits 2:0 the active slot.
        pub afi: u8,
        pub rsvd1: [u8; 7],
        /// Firmware revision per slot 1..=7.
        pub frs: [[u8; 8]; 7],
        pub rsvd64: [u8; 448],
    }
}
assert_wire_size!(FirmwareSlotLog, 512);
assert_wire_offset!(FirmwareSlotLog, frs, 8);

/// Length of one Error Information log entry (Base §5.16.1.2).
pub const ERROR_LOG_ENTRY_LEN: usize = 64;
/// Length of the Changed Namespace List log page (Base §5.16.1.5).
pub const CHANGED_NS_LOG_LEN: usize = 4096;

wire_struct! {
    /// Discovery log page header (NVMe-oF §5.3, LID 70h).
    pub struct DiscoveryLogHeader {
        /// Generation counter: changes whenever the entries change.
        pub genctr: u64,
        /// Number of records.
        pub numrec: u64,
        pub recfmt: u16,
        pub rsvd: [u8; 1006],
    }
}
assert_wire_size!(DiscoveryLogHeader, 1024);
assert_wire_offset!(DiscoveryLogHeader, numrec, 8);
assert_wire_offset!(DiscoveryLogHeader, recfmt, 16);

wire_struct! {
    /// Discovery log page entry (NVMe-oF §5.3, figure "Discovery Log Page Entry").
    pub struct DiscoveryLogEntry {
        /// Transport type ([`discovery::TRTYPE_TCP`]).
        pub trtype: u8,
        /// Address family ([`discovery::ADRFAM_IPV4`]).
        pub adrfam: u8,
        /// Subsystem type ([`discovery::SUBTYPE_NVME`]).
        pub subtype: u8,
        /// Transport requirements.
        pub treq: u8,
        pub portid: u16,
        pub cntlid: u16,
        /// Admin max SQ size.
        pub asqsz: u16,
        pub eflags: u16,
        pub rsvd12: [u8; 20],
        /// Transport service identifier (the port, as ASCII).
        pub trsvcid: [u8; 32],
        pub rsvd64: [u8; 192],
        pub subnqn: [u8; 256],
        /// Transport address (the IP, as ASCII).
        pub traddr: [u8; 256],
        /// Transport specific address subtype (TCP: byte 0 is SECTYPE).
        pub tsas: [u8; 256],
    }
}
assert_wire_size!(DiscoveryLogEntry, 1024);
assert_wire_offset!(DiscoveryLogEntry, portid, 4);
assert_wire_offset!(DiscoveryLogEntry, asqsz, 8);
assert_wire_offset!(DiscoveryLogEntry, trsvcid, 32);
assert_wire_offset!(DiscoveryLogEntry, subnqn, 256);
assert_wire_offset!(DiscoveryLogEntry, traddr, 512);
assert_wire_offset!(DiscoveryLogEntry, tsas, 768);

/// Discovery log entry field values (NVMe-oF §5.3).
pub mod discovery {
    pub const TRTYPE_TCP: u8 = 3;
    pub const ADRFAM_IPV4: u8 = 1;
    pub const ADRFAM_IPV6: u8 = 2;
    /// A discovery subsystem (referral).
    pub const SUBTYPE_DISCOVERY: u8 = 1;
    /// An NVM subsystem.
    pub const SUBTYPE_NVME: u8 = 2;
    /// The discovery subsystem being queried.
    pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;
    /// TREQ: secure channel not required.
    pub const TREQ_NOT_REQUIRED: u8 = 2;
    /// TREQ: SQ flow control may be disabled.
    pub const TREQ_DISABLE_SQFLOW: u8 = 1 << 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_controller_encodes_at_spec_offsets() {
        let mut id = IdentifyController::zeroed();
        id.cntlid = 0x1234;
        id.kas = 10;
        id.ioccsz = 0x204;
        id.subnqn[0] = b'n';
        let mut b = vec![0u8; IDENTIFY_LEN];
        assert_eq!(id.write_to(&mut b), IDENTIFY_LEN);
        assert_eq!(&b[78..80], &[0x34, 0x12]);
        assert_eq!(&b[320..322], &[10, 0]);
        assert_eq!(&b[1792..1796], &[0x04, 0x02, 0, 0]);
        assert_eq!(b[768], b'n');
        assert_eq!(IdentifyController::read_from(&b), id);
    }

    #[test]
    fn identify_namespace_lba_format() {
        let mut ns = IdentifyNamespace::zeroed();
        ns.nsze = 256;
        ns.lbaf[0] = lba_format(4096);
        let mut b = vec![0u8; IDENTIFY_LEN];
        ns.write_to(&mut b);
        assert_eq!(b[128 + 2], 12);
        assert_eq!(&b[0..8], &256u64.to_le_bytes());
    }

    #[test]
    fn admin_opcodes_decode() {
        for op in [0x02u8, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x18] {
            assert_eq!(AdminOpcode::from_u8(op).map(|o| o as u8), Some(op));
        }
        assert_eq!(AdminOpcode::from_u8(0x01), None);
    }
}
