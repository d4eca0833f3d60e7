//! Completion status field (Base §4.2.3, "Status Field Definition").

use std::fmt;

/// Status code type (SCT, bits 11:9 of the status field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StatusCodeType {
    Generic = 0,
    CommandSpecific = 1,
    MediaAndDataIntegrity = 2,
    PathRelated = 3,
    VendorSpecific = 7,
    Reserved = 4,
}

/// The 15-bit NVMe status field without the phase tag: SC in bits 7:0, SCT in 10:8,
/// CRD in 12:11, More in 13, DNR in 14 (the CQE layout shifted right by one).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status(u16);

impl Status {
    pub const SUCCESS: Self = Self::generic(0x00);
    pub const INVALID_OPCODE: Self = Self::generic(0x01);
    pub const INVALID_FIELD: Self = Self::generic(0x02);
    pub const COMMAND_ID_CONFLICT: Self = Self::generic(0x03);
    pub const DATA_TRANSFER_ERROR: Self = Self::generic(0x04);
    pub const INTERNAL_ERROR: Self = Self::generic(0x06);
    pub const ABORT_REQUESTED: Self = Self::generic(0x07);
    pub const ABORTED_SQ_DELETION: Self = Self::generic(0x08);
    pub const INVALID_NAMESPACE: Self = Self::generic(0x0b);
    pub const COMMAND_SEQUENCE_ERROR: Self = Self::generic(0x0c);
    pub const DATA_SGL_LENGTH_INVALID: Self = Self::generic(0x0f);
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Self = Self::generic(0x11);
    /// The namespace is write protected (Base §4.2.3.1, "Namespace is Write Protected").
    pub const NAMESPACE_WRITE_PROTECTED: Self = Self::generic(0x20);
    pub const LBA_OUT_OF_RANGE: Self = Self::generic(0x80);
    pub const CAPACITY_EXCEEDED: Self = Self::generic(0x81);
    pub const NAMESPACE_NOT_READY: Self = Self::generic(0x82);
    /// Media: write fault (Base §4.2.3.3).
    pub const WRITE_FAULT: Self = Self::new(StatusCodeType::MediaAndDataIntegrity, 0x80);
    /// Media: unrecovered read error.
    pub const UNRECOVERED_READ_ERROR: Self = Self::new(StatusCodeType::MediaAndDataIntegrity, 0x81);
    /// Path: internal path error (Base §4.2.3.4).
    pub const INTERNAL_PATH_ERROR: Self = Self::new(StatusCodeType::PathRelated, 0x00);
    /// Path: the host lost its path to the controller; used for a device that is gone.
    pub const HOST_PATHING_ERROR: Self = Self::new(StatusCodeType::PathRelated, 0x70);
    /// Path: command aborted by host (e.g. an I/O timeout abandoned it).
    pub const ABORTED_BY_HOST: Self = Self::new(StatusCodeType::PathRelated, 0x71);

    /// A status with the given type and code, no flags.
    pub const fn new(sct: StatusCodeType, sc: u8) -> Self {
        Self(((sct as u16) << 8) | sc as u16)
    }

    const fn generic(sc: u8) -> Self {
        Self::new(StatusCodeType::Generic, sc)
    }

    /// From the 15-bit field (CQE status word shifted right by one).
    pub const fn from_raw(raw: u16) -> Self {
        Self(raw & 0x7fff)
    }

    /// The 15-bit field.
    pub const fn raw(self) -> u16 {
        self.0
    }

    /// Status code.
    pub const fn sc(self) -> u8 {
        self.0 as u8
    }

    /// Status code type.
    pub const fn sct(self) -> StatusCodeType {
        match (self.0 >> 8) & 7 {
            0 => StatusCodeType::Generic,
            1 => StatusCodeType::CommandSpecific,
            2 => StatusCodeType::MediaAndDataIntegrity,
            3 => StatusCodeType::PathRelated,
            7 => StatusCodeType::VendorSpecific,
            _ => StatusCodeType::Reserved,
        }
    }

    /// Do Not Retry.
    pub const fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// More (additional information in the error log page).
    pub const fn more(self) -> bool {
        self.0 & (1 << 13) != 0
    }

    /// The same status with DNR set.
    pub const fn with_dnr(self) -> Self {
        Self(self.0 | (1 << 14))
    }

    /// True for SCT 0, SC 0 (flags ignored).
    pub const fn is_success(self) -> bool {
        self.0 & 0x7ff == 0
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status(sct={:?}, sc={:#04x}", self.sct(), self.sc())?;
        if self.dnr() {
            f.write_str(", dnr")?;
        }
        if self.more() {
            f.write_str(", more")?;
        }
        f.write_str(")")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match (self.0 >> 8 & 7, self.sc()) {
            (0, 0x00) => "success",
            (0, 0x01) => "invalid opcode",
            (0, 0x02) => "invalid field",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x07) => "abort requested",
            (0, 0x0b) => "invalid namespace",
            (0, 0x0c) => "command sequence error",
            (0, 0x20) => "namespace is write protected",
            (0, 0x80) => "LBA out of range",
            (0, 0x81) => "capacity exceeded",
            (0, 0x82) => "namespace not ready",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (3, 0x70) => "host pathing error",
            (3, 0x71) => "aborted by host",
            _ => "status",
        };
        write!(
            f,
            "{name} (sct {:#x}, sc {:#04x})",
            self.0 >> 8 & 7,
            self.sc()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_decode() {
        let s = Status::UNRECOVERED_READ_ERROR.with_dnr();
        assert_eq!(s.sct(), StatusCodeType::MediaAndDataIntegrity);
        assert_eq!(s.sc(), 0x81);
        assert!(s.dnr());
        assert!(!s.more());
        assert!(!s.is_success());
        assert!(Status::SUCCESS.with_dnr().is_success());
        assert_eq!(Status::from_raw(s.raw()), s);
    }
}
