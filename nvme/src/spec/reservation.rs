//! Reservations: the four commands (Base §7.2 Reservation Acquire, §7.3 Register, §7.4
//! Release, §7.5 Report), their data structures, the reservation types and actions (§8.19),
//! the status codes, the Reservation Notification log page (§5.16.1.23, log identifier
//! 0x80) and the two features (§5.27.1.21 Reservation Notification Mask 0x82, §5.27.1.22
//! Reservation Persistence 0x83).
//!
//! Every command has a decoder (what a target does with an SQE and its data) and an encoder
//! (what an initiator sends); the two are inverses, which the tests pin.

use crate::spec::{Status, SubmissionQueueEntry};
use crate::{assert_wire_offset, assert_wire_size, wire_struct};

/// Reservation opcodes of the NVM command set (Base Figure "Opcodes for I/O Commands").
pub mod opcode {
    pub const REGISTER: u8 = 0x0d;
    pub const REPORT: u8 = 0x0e;
    pub const ACQUIRE: u8 = 0x11;
    pub const RELEASE: u8 = 0x15;
}

/// Reservation status codes (Base §4.2.3.1, generic command status).
pub mod status {
    use crate::spec::status::{Status, StatusCodeType};

    /// Reservation Conflict: the command is not allowed for this host under the current
    /// reservation (SCT 0, SC 0x83).
    pub const RESERVATION_CONFLICT: Status = Status::new(StatusCodeType::Generic, 0x83);
    /// Host Identifier Inconsistent Format: a Report without the extended data structure
    /// where hosts use 128-bit host identifiers (SCT 0, SC 0x18).
    pub const HOST_ID_INCONSISTENT_FORMAT: Status = Status::new(StatusCodeType::Generic, 0x18);
}

/// Identify Controller ONCS bit 5: reservations supported.
pub const ONCS_RESERVATIONS: u16 = 1 << 5;
/// Identify Controller CTRATT bit 0: 128-bit host identifiers.
pub const CTRATT_HOST_ID_128: u32 = 1;
/// Identify Namespace RESCAP (byte 31): PTPL (bit 0), the six types (bits 1..=6) and the
/// revision 1.3 meaning of IEKEY (bit 7).
pub const RESCAP_ALL: u8 = 0xff;
/// Identify Namespace RESCAP bit 0: Persist Through Power Loss supported.
pub const RESCAP_PTPL: u8 = 1;

/// Log identifier of the Reservation Notification log page.
pub const LOG_RESERVATION_NOTIFICATION: u8 = 0x80;
/// Feature identifier: Reservation Notification Mask (namespace specific).
pub const FEATURE_NOTIFICATION_MASK: u8 = 0x82;
/// Feature identifier: Reservation Persistence (namespace specific; CDW11 bit 0 PTPL).
pub const FEATURE_PERSISTENCE: u8 = 0x83;
/// Asynchronous event type "I/O command specific status" (Base §5.2, Figure "Asynchronous
/// Event Information - Completion Queue Entry"), info 0: Reservation Log Page Available.
pub const AER_TYPE_IO_COMMAND_SET: u8 = 6;

/// The six reservation types (Base §8.19, Figure "Reservation Type Encoding").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReservationType {
    WriteExclusive = 1,
    ExclusiveAccess = 2,
    WriteExclusiveRegistrantsOnly = 3,
    ExclusiveAccessRegistrantsOnly = 4,
    WriteExclusiveAllRegistrants = 5,
    ExclusiveAccessAllRegistrants = 6,
}

impl ReservationType {
    /// Every type, in encoding order.
    pub const ALL: [Self; 6] = [
        Self::WriteExclusive,
        Self::ExclusiveAccess,
        Self::WriteExclusiveRegistrantsOnly,
        Self::ExclusiveAccessRegistrantsOnly,
        Self::WriteExclusiveAllRegistrants,
        Self::ExclusiveAccessAllRegistrants,
    ];

    /// The type an RTYPE byte encodes; `None` for 0 and 7..=255.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v).wrapping_sub(1)).copied()
    }

    /// Non-holders may not read either (the Exclusive Access family).
    pub fn excludes_reads(self) -> bool {
        matches!(
            self,
            Self::ExclusiveAccess
                | Self::ExclusiveAccessRegistrantsOnly
                | Self::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants get the holder's access (the Registrants Only and All Registrants types).
    pub fn admits_registrants(self) -> bool {
        !matches!(self, Self::WriteExclusive | Self::ExclusiveAccess)
    }

    /// Every registrant is a holder (the All Registrants types).
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }
}

/// Reservation Register Action (RREGA, CDW10 bits 2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RegisterAction {
    Register = 0,
    Unregister = 1,
    Replace = 2,
}

/// Reservation Acquire Action (RACQA, CDW10 bits 2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AcquireAction {
    Acquire = 0,
    Preempt = 1,
    PreemptAndAbort = 2,
}

/// Reservation Release Action (RRELA, CDW10 bits 2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReleaseAction {
    Release = 0,
    Clear = 1,
}

/// Change Persist Through Power Loss State (CPTPL, Register CDW10 bits 31:30).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangePtpl {
    /// 00b: leave PTPL as it is.
    NoChange,
    /// 10b: reservations are released and registrants cleared on a power loss.
    Clear,
    /// 11b: reservations and registrants persist across a power loss.
    Set,
}

impl ChangePtpl {
    fn bits(self) -> u32 {
        match self {
            Self::NoChange => 0,
            Self::Clear => 2,
            Self::Set => 3,
        }
    }
}

/// Ignore Existing Key (CDW10 bit 3).
const CDW10_IEKEY: u32 = 1 << 3;

wire_struct! {
    /// Reservation Register data (Base §7.3, Figure "Reservation Register Data Structure").
    pub struct RegisterData {
        /// Current Reservation Key.
        pub crkey: u64,
        /// New Reservation Key.
        pub nrkey: u64,
    }
}
assert_wire_size!(RegisterData, 16);
assert_wire_offset!(RegisterData, nrkey, 8);

wire_struct! {
    /// Reservation Acquire data (Base §7.2, Figure "Reservation Acquire Data Structure").
    pub struct AcquireData {
        /// Current Reservation Key.
        pub crkey: u64,
        /// Preempt Reservation Key.
        pub prkey: u64,
    }
}
assert_wire_size!(AcquireData, 16);
assert_wire_offset!(AcquireData, prkey, 8);

wire_struct! {
    /// Reservation Release data (Base §7.4, Figure "Reservation Release Data Structure").
    pub struct ReleaseData {
        /// Current Reservation Key.
        pub crkey: u64,
    }
}
assert_wire_size!(ReleaseData, 8);

wire_struct! {
    /// Reservation Status header (Base §7.5, Figure "Reservation Status Data Structure"),
    /// followed by one [`RegisteredController`] per registrant.
    pub struct ReservationStatus {
        /// Generation: a wrapping counter of registration and preemption changes.
        pub gen: u32,
        /// Reservation type held, 0 for none.
        pub rtype: u8,
        /// Number of registrants (REGCTL), little endian.
        pub regctl: [u8; 2],
        pub rsvd7: [u8; 2],
        /// Persist Through Power Loss State.
        pub ptpls: u8,
        pub rsvd10: [u8; 14],
    }
}
assert_wire_size!(ReservationStatus, 24);
assert_wire_offset!(ReservationStatus, rtype, 4);
assert_wire_offset!(ReservationStatus, regctl, 5);
assert_wire_offset!(ReservationStatus, ptpls, 9);

wire_struct! {
    /// Reservation Status Extended header (Base §7.5, Figure "Reservation Status Extended
    /// Data Structure"): the header padded to 64 bytes, followed by one
    /// [`RegisteredControllerExt`] per registrant.
    pub struct ReservationStatusExt {
        pub gen: u32,
        pub rtype: u8,
        pub regctl: [u8; 2],
        pub rsvd7: [u8; 2],
        pub ptpls: u8,
        pub rsvd10: [u8; 54],
    }
}
assert_wire_size!(ReservationStatusExt, 64);
assert_wire_offset!(ReservationStatusExt, ptpls, 9);

wire_struct! {
    /// Registered Controller data structure (64-bit host identifier).
    pub struct RegisteredController {
        /// Controller ID, 0xFFFF under the dynamic controller model.
        pub cntlid: u16,
        /// Reservation Status: bit 0 set when this registrant holds the reservation.
        pub rcsts: u8,
        pub rsvd3: [u8; 5],
        pub hostid: u64,
        /// Reservation Key.
        pub rkey: u64,
    }
}
assert_wire_size!(RegisteredController, 24);
assert_wire_offset!(RegisteredController, hostid, 8);
assert_wire_offset!(RegisteredController, rkey, 16);

wire_struct! {
    /// Registered Controller Extended data structure (128-bit host identifier).
    pub struct RegisteredControllerExt {
        pub cntlid: u16,
        pub rcsts: u8,
        pub rsvd3: [u8; 5],
        pub rkey: u64,
        pub hostid: [u8; 16],
        pub rsvd32: [u8; 32],
    }
}
assert_wire_size!(RegisteredControllerExt, 64);
assert_wire_offset!(RegisteredControllerExt, rkey, 8);
assert_wire_offset!(RegisteredControllerExt, hostid, 16);

/// Reservation Notification log page types (Base §5.16.1.23).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NotificationType {
    /// The page holds no notification.
    Empty = 0,
    /// This host's registration was removed by another host's Preempt.
    RegistrationPreempted = 1,
    /// The reservation this host is registered for was released.
    ReservationReleased = 2,
    /// The reservation this host is registered for was preempted or cleared.
    ReservationPreempted = 3,
}

impl NotificationType {
    /// Its bit in the Reservation Notification Mask feature (CDW11): REGPRE 1, RESREL 2,
    /// RESPRE 3; 0 for [`Empty`](Self::Empty).
    pub fn mask_bit(self) -> u32 {
        match self {
            Self::Empty => 0,
            t => 1 << (t as u32),
        }
    }
}

/// The bits of the Reservation Notification Mask a host may set.
pub const NOTIFICATION_MASK_BITS: u32 = 0b1110;

wire_struct! {
    /// Reservation Notification log page (log identifier 0x80).
    pub struct ReservationNotificationLog {
        /// Log Page Count: a per-controller counter of notifications, 0 when empty.
        pub count: u64,
        /// Reservation Notification Log Page Type ([`NotificationType`]).
        pub lptype: u8,
        /// Number of Available Log Pages: notifications still queued after this one.
        pub nalp: u8,
        pub rsvd10: [u8; 2],
        /// The namespace the notification is about.
        pub nsid: u32,
        pub rsvd16: [u8; 48],
    }
}
assert_wire_size!(ReservationNotificationLog, 64);
assert_wire_offset!(ReservationNotificationLog, lptype, 8);
assert_wire_offset!(ReservationNotificationLog, nalp, 9);
assert_wire_offset!(ReservationNotificationLog, nsid, 12);

fn sqe(opcode: u8, cid: u16, nsid: u32, cdw10: u32) -> SubmissionQueueEntry {
    SubmissionQueueEntry {
        opcode,
        cid,
        nsid,
        cdw10,
        ..Default::default()
    }
}

fn short_data() -> Status {
    Status::DATA_SGL_LENGTH_INVALID.with_dnr()
}

fn invalid() -> Status {
    Status::INVALID_FIELD.with_dnr()
}

/// A decoded Reservation Register command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterCommand {
    pub action: RegisterAction,
    pub iekey: bool,
    pub cptpl: ChangePtpl,
    pub crkey: u64,
    pub nrkey: u64,
}

impl RegisterCommand {
    /// Decodes CDW10 and the 16 data bytes; reserved actions and CPTPL 01b are Invalid Field.
    pub fn decode(sqe: &SubmissionQueueEntry, data: &[u8]) -> Result<Self, Status> {
        let action = match sqe.cdw10 & 7 {
            0 => RegisterAction::Register,
            1 => RegisterAction::Unregister,
            2 => RegisterAction::Replace,
            _ => return Err(invalid()),
        };
        let cptpl = match sqe.cdw10 >> 30 {
            0 => ChangePtpl::NoChange,
            2 => ChangePtpl::Clear,
            3 => ChangePtpl::Set,
            _ => return Err(invalid()),
        };
        if data.len() < RegisterData::SIZE {
            return Err(short_data());
        }
        let d = RegisterData::read_from(data);
        Ok(Self {
            action,
            iekey: sqe.cdw10 & CDW10_IEKEY != 0,
            cptpl,
            crkey: d.crkey,
            nrkey: d.nrkey,
        })
    }

    /// The SQE (data pointer left for the transport to fill) and its 16 data bytes.
    pub fn encode(&self, cid: u16, nsid: u32) -> (SubmissionQueueEntry, [u8; RegisterData::SIZE]) {
        let cdw10 = self.action as u32
            | if self.iekey { CDW10_IEKEY } else { 0 }
            | (self.cptpl.bits() << 30);
        let mut data = [0u8; RegisterData::SIZE];
        RegisterData {
            crkey: self.crkey,
            nrkey: self.nrkey,
        }
        .write_to(&mut data);
        (sqe(opcode::REGISTER, cid, nsid, cdw10), data)
    }
}

/// A decoded Reservation Acquire command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcquireCommand {
    pub action: AcquireAction,
    pub iekey: bool,
    pub rtype: ReservationType,
    pub crkey: u64,
    pub prkey: u64,
}

impl AcquireCommand {
    /// Decodes CDW10 (RACQA, IEKEY, RTYPE 15:8) and the 16 data bytes.
    pub fn decode(sqe: &SubmissionQueueEntry, data: &[u8]) -> Result<Self, Status> {
        let action = match sqe.cdw10 & 7 {
            0 => AcquireAction::Acquire,
            1 => AcquireAction::Preempt,
            2 => AcquireAction::PreemptAndAbort,
            _ => return Err(invalid()),
        };
        let rtype = ReservationType::from_u8((sqe.cdw10 >> 8) as u8).ok_or(invalid())?;
        if data.len() < AcquireData::SIZE {
            return Err(short_data());
        }
        let d = AcquireData::read_from(data);
        Ok(Self {
            action,
            iekey: sqe.cdw10 & CDW10_IEKEY != 0,
            rtype,
            crkey: d.crkey,
            prkey: d.prkey,
        })
    }

    /// The SQE and its 16 data bytes.
    pub fn encode(&self, cid: u16, nsid: u32) -> (SubmissionQueueEntry, [u8; AcquireData::SIZE]) {
        let cdw10 = self.action as u32
            | if self.iekey { CDW10_IEKEY } else { 0 }
            | ((self.rtype as u32) << 8);
        let mut data = [0u8; AcquireData::SIZE];
        AcquireData {
            crkey: self.crkey,
            prkey: self.prkey,
        }
        .write_to(&mut data);
        (sqe(opcode::ACQUIRE, cid, nsid, cdw10), data)
    }
}

/// A decoded Reservation Release command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseCommand {
    pub action: ReleaseAction,
    pub iekey: bool,
    /// RTYPE as sent: checked against the reservation by Release, ignored by Clear.
    pub rtype: u8,
    pub crkey: u64,
}

impl ReleaseCommand {
    /// Decodes CDW10 (RRELA, IEKEY, RTYPE 15:8) and the 8 data bytes.
    pub fn decode(sqe: &SubmissionQueueEntry, data: &[u8]) -> Result<Self, Status> {
        let action = match sqe.cdw10 & 7 {
            0 => ReleaseAction::Release,
            1 => ReleaseAction::Clear,
            _ => return Err(invalid()),
        };
        if data.len() < ReleaseData::SIZE {
            return Err(short_data());
        }
        Ok(Self {
            action,
            iekey: sqe.cdw10 & CDW10_IEKEY != 0,
            rtype: (sqe.cdw10 >> 8) as u8,
            crkey: ReleaseData::read_from(data).crkey,
        })
    }

    /// The SQE and its 8 data bytes.
    pub fn encode(&self, cid: u16, nsid: u32) -> (SubmissionQueueEntry, [u8; ReleaseData::SIZE]) {
        let cdw10 = self.action as u32
            | if self.iekey { CDW10_IEKEY } else { 0 }
            | (u32::from(self.rtype) << 8);
        let mut data = [0u8; ReleaseData::SIZE];
        ReleaseData { crkey: self.crkey }.write_to(&mut data);
        (sqe(opcode::RELEASE, cid, nsid, cdw10), data)
    }
}

/// A decoded Reservation Report command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportCommand {
    /// Bytes the host asks for (NUMD + 1 dwords).
    pub len: u32,
    /// Extended Data Structure (CDW11 bit 0): 128-bit host identifiers.
    pub eds: bool,
}

impl ReportCommand {
    pub fn decode(sqe: &SubmissionQueueEntry) -> Self {
        Self {
            len: sqe.cdw10.saturating_add(1).saturating_mul(4),
            eds: sqe.cdw11 & 1 != 0,
        }
    }

    /// The SQE; `len` is rounded down to whole dwords (at least one).
    pub fn encode(&self, cid: u16, nsid: u32) -> SubmissionQueueEntry {
        let mut s = sqe(opcode::REPORT, cid, nsid, (self.len / 4).max(1) - 1);
        s.cdw11 = u32::from(self.eds);
        s
    }
}

/// One registrant as a Report lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportedRegistrant {
    pub cntlid: u16,
    pub holds: bool,
    pub hostid: [u8; 16],
    pub rkey: u64,
}

/// A Reservation Report's data as a host reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub gen: u32,
    /// The type held, `None` when the namespace is not reserved.
    pub rtype: Option<ReservationType>,
    pub ptpl: bool,
    /// Registrants counted in REGCTL (the data may list fewer when it was cut short).
    pub regctl: u16,
    pub registrants: Vec<ReportedRegistrant>,
}

impl Report {
    /// Writes the report in the extended (`eds`) or 64-bit-host-ID form into `out`, as far
    /// as `out` goes; returns the bytes the whole report needs.
    pub fn write_to(&self, eds: bool, out: &mut [u8]) -> usize {
        let (head, each) = if eds {
            (ReservationStatusExt::SIZE, RegisteredControllerExt::SIZE)
        } else {
            (ReservationStatus::SIZE, RegisteredController::SIZE)
        };
        let need = head + each * self.registrants.len();
        let mut buf = vec![0u8; need];
        let h = ReservationStatus {
            gen: self.gen,
            rtype: self.rtype.map_or(0, |t| t as u8),
            regctl: self.regctl.to_le_bytes(),
            rsvd7: [0; 2],
            ptpls: u8::from(self.ptpl),
            rsvd10: [0; 14],
        };
        h.write_to(&mut buf);
        for (k, r) in self.registrants.iter().enumerate() {
            let o = head + k * each;
            if eds {
                RegisteredControllerExt {
                    cntlid: r.cntlid,
                    rcsts: u8::from(r.holds),
                    rsvd3: [0; 5],
                    rkey: r.rkey,
                    hostid: r.hostid,
                    rsvd32: [0; 32],
                }
                .write_to(&mut buf[o..]);
            } else {
                let mut id = [0u8; 8];
                id.copy_from_slice(&r.hostid[..8]);
                RegisteredController {
                    cntlid: r.cntlid,
                    rcsts: u8::from(r.holds),
                    rsvd3: [0; 5],
                    hostid: u64::from_le_bytes(id),
                    rkey: r.rkey,
                }
                .write_to(&mut buf[o..]);
            }
        }
        let n = out.len().min(need);
        out[..n].copy_from_slice(&buf[..n]);
        need
    }

    /// Parses report data as returned for a Report with `eds`; `None` when shorter than the
    /// header. Registrants past the end of `data` are left out.
    pub fn parse(data: &[u8], eds: bool) -> Option<Self> {
        let (head, each) = if eds {
            (ReservationStatusExt::SIZE, RegisteredControllerExt::SIZE)
        } else {
            (ReservationStatus::SIZE, RegisteredController::SIZE)
        };
        if data.len() < head {
            return None;
        }
        let h = ReservationStatus::read_from(data);
        let regctl = u16::from_le_bytes(h.regctl);
        let fit = (data.len() - head) / each;
        let registrants = (0..usize::from(regctl).min(fit))
            .map(|k| {
                let b = &data[head + k * each..];
                if eds {
                    let r = RegisteredControllerExt::read_from(b);
                    ReportedRegistrant {
                        cntlid: r.cntlid,
                        holds: r.rcsts & 1 != 0,
                        hostid: r.hostid,
                        rkey: r.rkey,
                    }
                } else {
                    let r = RegisteredController::read_from(b);
                    let mut hostid = [0u8; 16];
                    hostid[..8].copy_from_slice(&r.hostid.to_le_bytes());
                    ReportedRegistrant {
                        cntlid: r.cntlid,
                        holds: r.rcsts & 1 != 0,
                        hostid,
                        rkey: r.rkey,
                    }
                }
            })
            .collect();
        Some(Self {
            gen: h.gen,
            rtype: ReservationType::from_u8(h.rtype),
            ptpl: h.ptpls & 1 != 0,
            regctl,
            registrants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_decode_and_classify() {
        for (i, t) in ReservationType::ALL.iter().enumerate() {
            assert_eq!(ReservationType::from_u8(i as u8 + 1), Some(*t));
        }
        assert_eq!(ReservationType::from_u8(0), None);
        assert_eq!(ReservationType::from_u8(7), None);
        use ReservationType as T;
        let reads: Vec<_> = T::ALL.iter().map(|t| t.excludes_reads()).collect();
        assert_eq!(reads, [false, true, false, true, false, true]);
        let regs: Vec<_> = T::ALL.iter().map(|t| t.admits_registrants()).collect();
        assert_eq!(regs, [false, false, true, true, true, true]);
        let all: Vec<_> = T::ALL.iter().map(|t| t.all_registrants()).collect();
        assert_eq!(all, [false, false, false, false, true, true]);
    }

    #[test]
    fn register_round_trips_and_sits_where_the_spec_says() {
        let cmd = RegisterCommand {
            action: RegisterAction::Replace,
            iekey: true,
            cptpl: ChangePtpl::Set,
            crkey: 0x1122_3344_5566_7788,
            nrkey: 0xdead_beef,
        };
        let (sqe, data) = cmd.encode(7, 1);
        assert_eq!(sqe.opcode, 0x0d);
        assert_eq!(sqe.cdw10, 2 | 1 << 3 | 3 << 30);
        assert_eq!(&data[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(RegisterCommand::decode(&sqe, &data), Ok(cmd));
        assert_eq!(
            RegisterCommand::decode(&sqe, &data[..15]),
            Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr())
        );
        let mut bad = sqe;
        bad.cdw10 = 3;
        assert_eq!(RegisterCommand::decode(&bad, &data), Err(invalid()));
        bad.cdw10 = 1 << 30;
        assert_eq!(RegisterCommand::decode(&bad, &data), Err(invalid()));
    }

    #[test]
    fn acquire_and_release_round_trip() {
        for t in ReservationType::ALL {
            let a = AcquireCommand {
                action: AcquireAction::PreemptAndAbort,
                iekey: false,
                rtype: t,
                crkey: 1,
                prkey: 2,
            };
            let (sqe, data) = a.encode(1, 1);
            assert_eq!(sqe.opcode, 0x11);
            assert_eq!((sqe.cdw10 >> 8) as u8, t as u8);
            assert_eq!(AcquireCommand::decode(&sqe, &data), Ok(a));
        }
        let mut sqe = AcquireCommand {
            action: AcquireAction::Acquire,
            iekey: false,
            rtype: ReservationType::WriteExclusive,
            crkey: 1,
            prkey: 0,
        }
        .encode(1, 1)
        .0;
        sqe.cdw10 = 7 << 8;
        assert_eq!(AcquireCommand::decode(&sqe, &[0; 16]), Err(invalid()));
        let r = ReleaseCommand {
            action: ReleaseAction::Clear,
            iekey: false,
            rtype: 4,
            crkey: 9,
        };
        let (sqe, data) = r.encode(3, 2);
        assert_eq!((sqe.opcode, sqe.nsid, sqe.cdw10), (0x15, 2, 1 | 4 << 8));
        assert_eq!(ReleaseCommand::decode(&sqe, &data), Ok(r));
    }

    #[test]
    fn report_round_trips_in_both_forms_and_truncates() {
        let rep = Report {
            gen: 5,
            rtype: Some(ReservationType::ExclusiveAccessRegistrantsOnly),
            ptpl: true,
            regctl: 2,
            registrants: vec![
                ReportedRegistrant {
                    cntlid: 0xffff,
                    holds: true,
                    hostid: [0xab; 16],
                    rkey: 0x10,
                },
                ReportedRegistrant {
                    cntlid: 0xffff,
                    holds: false,
                    hostid: [0xcd; 16],
                    rkey: 0x20,
                },
            ],
        };
        let mut out = vec![0u8; 4096];
        assert_eq!(rep.write_to(true, &mut out), 64 + 2 * 64);
        assert_eq!(out[4], 4);
        assert_eq!(&out[5..7], &[2, 0]);
        assert_eq!(out[9], 1);
        assert_eq!(&out[64 + 16..64 + 32], &[0xab; 16]);
        assert_eq!(Report::parse(&out[..192], true), Some(rep.clone()));
        assert_eq!(rep.write_to(false, &mut out), 24 + 2 * 24);
        let short = Report::parse(&out[..72], false).unwrap();
        assert_eq!(short.registrants[1].hostid[..8], [0xcd; 8]);
        // Cut short: the header still counts both, the data lists one.
        let mut small = [0u8; 64 + 64];
        rep.write_to(true, &mut small);
        let cut = Report::parse(&small, true).unwrap();
        assert_eq!((cut.regctl, cut.registrants.len()), (2, 1));
        assert_eq!(Report::parse(&small[..63], true), None);
        let cmd = ReportCommand {
            len: 4096,
            eds: true,
        };
        assert_eq!(ReportCommand::decode(&cmd.encode(1, 1)), cmd);
    }

    #[test]
    fn notification_log_and_mask_bits() {
        let mut b = [0u8; 64];
        ReservationNotificationLog {
            count: 3,
            lptype: NotificationType::ReservationPreempted as u8,
            nalp: 1,
            rsvd10: [0; 2],
            nsid: 1,
            rsvd16: [0; 48],
        }
        .write_to(&mut b);
        assert_eq!((b[0], b[8], b[9], b[12]), (3, 3, 1, 1));
        assert_eq!(NotificationType::RegistrationPreempted.mask_bit(), 1 << 1);
        assert_eq!(NotificationType::ReservationReleased.mask_bit(), 1 << 2);
        assert_eq!(NotificationType::ReservationPreempted.mask_bit(), 1 << 3);
        assert_eq!(NOTIFICATION_MASK_BITS, 0b1110);
    }
}
