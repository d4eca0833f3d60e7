//! NVM command set I/O opcodes (NVM §3, "Opcodes for NVM Commands").

/// The I/O opcodes nvmirror implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NvmOpcode {
    Flush = 0x00,
    Write = 0x01,
    Read = 0x02,
    WriteZeroes = 0x08,
    DatasetManagement = 0x09,
}

impl NvmOpcode {
    /// Decodes an opcode byte; `None` for opcodes nvmirror does not implement.
    pub fn from_u8(op: u8) -> Option<Self> {
        Some(match op {
            0x00 => Self::Flush,
            0x01 => Self::Write,
            0x02 => Self::Read,
            0x08 => Self::WriteZeroes,
            0x09 => Self::DatasetManagement,
            _ => return None,
        })
    }
}

/// Dataset Management attribute: deallocate (NVM §3.2.3, CDW11 bit 2).
pub const DSM_ATTR_DEALLOCATE: u32 = 1 << 2;

/// Length of one Dataset Management range.
pub const DSM_RANGE_LEN: usize = 16;

/// One Dataset Management range (NVM §3.2.3.1): context attributes (none), length in logical
/// blocks (1's based), starting LBA; little endian.
pub fn dsm_range(slba: u64, nlb: u32) -> [u8; DSM_RANGE_LEN] {
    let mut range = [0u8; DSM_RANGE_LEN];
    range[4..8].copy_from_slice(&nlb.to_le_bytes());
    range[8..16].copy_from_slice(&slba.to_le_bytes());
    range
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_round_trip() {
        for op in [0x00u8, 0x01, 0x02, 0x08, 0x09] {
            assert_eq!(NvmOpcode::from_u8(op).map(|o| o as u8), Some(op));
        }
        assert_eq!(NvmOpcode::from_u8(0x05), None);
    }

    #[test]
    fn dsm_range_layout() {
        let r = dsm_range(0x0102_0304_0506_0708, 0x1122_3344);
        assert_eq!(&r[..4], &[0; 4], "context attributes");
        assert_eq!(&r[4..8], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&r[8..], &[8, 7, 6, 5, 4, 3, 2, 1]);
    }
}
