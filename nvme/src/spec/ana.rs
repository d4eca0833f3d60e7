//! Asymmetric Namespace Access (Base §8.1.1 "Asymmetric Namespace Access Reporting") and the
//! asynchronous event pieces that go with it: the ANA log page (Base §5.16.1.13, log 0Ch),
//! the Identify fields that advertise ANA, the path-related status codes a controller
//! returns for I/O through a path that is not usable, and the Asynchronous Event Request
//! notice encoding (Base §5.2).

use super::status::StatusCodeType;
use super::Status;
use crate::{assert_wire_offset, assert_wire_size, wire_struct};

/// Log page identifier of the ANA log page.
pub const LOG_ANA: u8 = 0x0c;
/// Get Log Page CDW10 bit 8 (LSP bit 0) for the ANA log: Return Groups Only (descriptors
/// without their NSID lists).
pub const GET_LOG_RGO: u32 = 1 << 8;
/// Get Log Page CDW10 bit 15: Retain Asynchronous Event (reading the page does not re-arm
/// the event that pointed at it).
pub const GET_LOG_RAE: u32 = 1 << 15;

/// Identify Controller CMIC bit 1: the NVM subsystem may have two or more controllers.
pub const CMIC_MULTI_CONTROLLER: u8 = 1 << 1;
/// Identify Controller CMIC bit 3: the controller reports ANA.
pub const CMIC_ANA_REPORTING: u8 = 1 << 3;

/// Identify Controller ANACAP bits (Base §5.17.2.1).
pub mod anacap {
    pub const OPTIMIZED: u8 = 1 << 0;
    pub const NON_OPTIMIZED: u8 = 1 << 1;
    pub const INACCESSIBLE: u8 = 1 << 2;
    pub const PERSISTENT_LOSS: u8 = 1 << 3;
    pub const CHANGE: u8 = 1 << 4;
    /// A namespace's ANAGRPID does not change while it is attached.
    pub const GRPID_STATIC: u8 = 1 << 6;
    /// Non-zero ANAGRPID values are supported in Namespace Management.
    pub const GRPID_NONZERO: u8 = 1 << 7;
}

/// Identify Controller OAES and Asynchronous Event Configuration (feature 0Bh) bits of the
/// notices this controller can send (Base §5.27.1.8).
pub mod aen {
    /// Namespace Attribute Notices (notice 00h, log 04h).
    pub const NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
    /// ANA Change Notices (notice 03h, log 0Ch).
    pub const ANA_CHANGE: u32 = 1 << 11;
}

/// Asynchronous Event Type 2: Notice (Base §5.2, figure "Asynchronous Event Information -
/// Notice").
pub const AER_TYPE_NOTICE: u8 = 2;
/// Notice information: Namespace Attribute Changed.
pub const NOTICE_NAMESPACE_ATTRIBUTE: u8 = 0x00;
/// Notice information: Asymmetric Namespace Access Change.
pub const NOTICE_ANA_CHANGE: u8 = 0x03;

/// Completion DW0 of an Asynchronous Event Request: type 2:0, information 15:8, log page
/// 23:16.
pub const fn aer_dw0(ty: u8, info: u8, lid: u8) -> u32 {
    (ty as u32 & 0x7) | ((info as u32) << 8) | ((lid as u32) << 16)
}

/// Path-related status codes of ANA (SCT 3, Base §4.2.3.4). A host with another path retries
/// there, so none of them carries Do Not Retry.
pub mod status {
    use super::{Status, StatusCodeType};
    /// The group is in ANA Persistent Loss state.
    pub const ANA_PERSISTENT_LOSS: Status = Status::new(StatusCodeType::PathRelated, 0x01);
    /// The group is in ANA Inaccessible state.
    pub const ANA_INACCESSIBLE: Status = Status::new(StatusCodeType::PathRelated, 0x02);
    /// The group is in ANA Change state (in transition).
    pub const ANA_TRANSITION: Status = Status::new(StatusCodeType::PathRelated, 0x03);
}

/// An ANA state of a group through one controller (Base §8.1.1.2-8.1.1.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AnaState {
    Optimized = 0x01,
    NonOptimized = 0x02,
    Inaccessible = 0x03,
    PersistentLoss = 0x04,
    Change = 0x0f,
}

impl AnaState {
    pub const ALL: [Self; 5] = [
        Self::Optimized,
        Self::NonOptimized,
        Self::Inaccessible,
        Self::PersistentLoss,
        Self::Change,
    ];

    /// Decodes the state byte of a group descriptor.
    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u8 == b)
    }

    /// The name used in configuration and RPC (`non-optimized`, `persistent-loss`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Optimized => "optimized",
            Self::NonOptimized => "non-optimized",
            Self::Inaccessible => "inaccessible",
            Self::PersistentLoss => "persistent-loss",
            Self::Change => "change",
        }
    }

    /// Parses [`as_str`](Self::as_str) (underscores are accepted for dashes).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.replace('_', "-");
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The status I/O to a namespace of a group in this state completes with, or `Ok` when
    /// the path is usable.
    pub fn io_status(self) -> Result<(), Status> {
        match self {
            Self::Optimized | Self::NonOptimized => Ok(()),
            Self::Inaccessible => Err(status::ANA_INACCESSIBLE),
            Self::PersistentLoss => Err(status::ANA_PERSISTENT_LOSS),
            Self::Change => Err(status::ANA_TRANSITION),
        }
    }
}

wire_struct! {
    /// ANA log page header (Base §5.16.1.13, figure "Asymmetric Namespace Access Log").
    pub struct AnaLogHeader {
        /// Change Count: bumped each time the page's content changes (0 never follows a
        /// change: it wraps to 1).
        pub chgcnt: u64,
        /// Number of ANA Group Descriptors.
        pub ngrps: u16,
        pub rsvd10: [u8; 6],
    }
}
assert_wire_size!(AnaLogHeader, 16);
assert_wire_offset!(AnaLogHeader, ngrps, 8);

wire_struct! {
    /// ANA Group Descriptor (figure "ANA Group Descriptor format"), followed on the wire by
    /// `nnsids` NSIDs of 4 bytes each, ascending.
    pub struct AnaGroupDescriptor {
        pub grpid: u32,
        /// Number of NSID values that follow (0 with Return Groups Only).
        pub nnsids: u32,
        /// Change Count of this group.
        pub chgcnt: u64,
        /// ANA state in bits 3:0.
        pub state: u8,
        pub rsvd17: [u8; 15],
    }
}
assert_wire_size!(AnaGroupDescriptor, 32);
assert_wire_offset!(AnaGroupDescriptor, nnsids, 4);
assert_wire_offset!(AnaGroupDescriptor, chgcnt, 8);
assert_wire_offset!(AnaGroupDescriptor, state, 16);

/// One group as the ANA log page reports it.
#[derive(Clone, Copy, Debug)]
pub struct AnaGroup<'a> {
    pub grpid: u32,
    pub chgcnt: u64,
    pub state: AnaState,
    /// Namespaces in the group, ascending.
    pub nsids: &'a [u32],
}

/// Length of the ANA log page for these groups (`rgo`: Return Groups Only).
pub fn ana_log_len(groups: &[AnaGroup<'_>], rgo: bool) -> usize {
    AnaLogHeader::SIZE
        + groups
            .iter()
            .map(|g| AnaGroupDescriptor::SIZE + if rgo { 0 } else { 4 * g.nsids.len() })
            .sum::<usize>()
}

/// Encodes the whole ANA log page into `out` (which must hold [`ana_log_len`] bytes).
/// Returns the length written.
pub fn write_ana_log(out: &mut [u8], chgcnt: u64, groups: &[AnaGroup<'_>], rgo: bool) -> usize {
    let hdr = AnaLogHeader {
        chgcnt,
        ngrps: groups.len() as u16,
        rsvd10: [0; 6],
    };
    let mut o = hdr.write_to(out);
    for g in groups {
        let nsids: &[u32] = if rgo { &[] } else { g.nsids };
        let d = AnaGroupDescriptor {
            grpid: g.grpid,
            nnsids: nsids.len() as u32,
            chgcnt: g.chgcnt,
            state: g.state as u8,
            rsvd17: [0; 15],
        };
        o += d.write_to(&mut out[o..]);
        for id in nsids {
            out[o..o + 4].copy_from_slice(&id.to_le_bytes());
            o += 4;
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups() -> [AnaGroup<'static>; 2] {
        [
            AnaGroup {
                grpid: 1,
                chgcnt: 7,
                state: AnaState::Optimized,
                nsids: &[1],
            },
            AnaGroup {
                grpid: 2,
                chgcnt: 9,
                state: AnaState::Inaccessible,
                nsids: &[2, 3],
            },
        ]
    }

    #[test]
    fn log_page_layout_matches_the_spec() {
        let g = groups();
        let len = ana_log_len(&g, false);
        assert_eq!(len, 16 + 32 + 4 + 32 + 8);
        let mut b = vec![0xee; len];
        assert_eq!(write_ana_log(&mut b, 42, &g, false), len);
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 42);
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 2);
        assert_eq!(&b[10..16], &[0; 6]);
        // First descriptor at 16: grpid, nnsids, chgcnt, state, reserved, then NSID 1.
        assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 7);
        assert_eq!(b[32], 0x01);
        assert_eq!(&b[33..48], &[0; 15]);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 1);
        // Second descriptor at 52.
        let d = AnaGroupDescriptor::read_from(&b[52..]);
        assert_eq!((d.grpid, d.nnsids, d.chgcnt, d.state), (2, 2, 9, 0x03));
        assert_eq!(u32::from_le_bytes(b[84..88].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[88..92].try_into().unwrap()), 3);
    }

    #[test]
    fn return_groups_only_drops_the_nsid_lists() {
        let g = groups();
        let len = ana_log_len(&g, true);
        assert_eq!(len, 16 + 2 * 32);
        let mut b = vec![0; len];
        write_ana_log(&mut b, 1, &g, true);
        let d0 = AnaGroupDescriptor::read_from(&b[16..]);
        let d1 = AnaGroupDescriptor::read_from(&b[48..]);
        assert_eq!((d0.grpid, d0.nnsids), (1, 0));
        assert_eq!((d1.grpid, d1.nnsids, d1.state), (2, 0, 0x03));
    }

    #[test]
    fn states_and_their_io_status() {
        for s in AnaState::ALL {
            assert_eq!(AnaState::from_u8(s as u8), Some(s));
            assert_eq!(AnaState::parse(s.as_str()), Some(s));
        }
        assert_eq!(
            AnaState::parse("non_optimized"),
            Some(AnaState::NonOptimized)
        );
        assert_eq!(AnaState::parse("standby"), None);
        assert_eq!(AnaState::from_u8(0), None);
        assert!(AnaState::Optimized.io_status().is_ok());
        assert!(AnaState::NonOptimized.io_status().is_ok());
        let e = AnaState::Inaccessible.io_status().unwrap_err();
        assert_eq!((e.sct() as u8, e.sc(), e.dnr()), (3, 0x02, false));
        let e = AnaState::PersistentLoss.io_status().unwrap_err();
        assert_eq!((e.sct() as u8, e.sc()), (3, 0x01));
        let e = AnaState::Change.io_status().unwrap_err();
        assert_eq!((e.sct() as u8, e.sc()), (3, 0x03));
        assert_eq!(
            aer_dw0(AER_TYPE_NOTICE, NOTICE_ANA_CHANGE, LOG_ANA),
            0x000c_0302
        );
    }
}
