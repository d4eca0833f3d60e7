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
}
