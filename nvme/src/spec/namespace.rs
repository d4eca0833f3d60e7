//! Namespace geometry (NVM §4.1.5.1, Identify Namespace: NSZE and LBA formats).

use super::Status;

/// Size and block size of a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size in bytes: 512 or 4096.
    pub lba_size: u32,
    /// Namespace size in logical blocks (NSZE).
    pub num_blocks: u64,
}

impl Geometry {
    /// A geometry of `bytes` rounded down to whole blocks. `lba_size` must be 512 or 4096.
    pub fn from_bytes(bytes: u64, lba_size: u32) -> Option<Self> {
        if lba_size != 512 && lba_size != 4096 {
            return None;
        }
        Some(Self {
            lba_size,
            num_blocks: bytes / u64::from(lba_size),
        })
    }

    /// Capacity in bytes.
    pub fn bytes(&self) -> u64 {
        self.num_blocks * u64::from(self.lba_size)
    }

    /// log2 of the block size.
    pub fn lba_shift(&self) -> u32 {
        self.lba_size.trailing_zeros()
    }

    /// Checks an LBA range against the namespace: LBA Out of Range if any block of
    /// `[slba, slba + nlb)` lies past the end (NVM §3.2.4), Invalid Field for `nlb == 0`.
    #[inline]
    pub fn check_range(&self, slba: u64, nlb: u32) -> Result<(), Status> {
        if nlb == 0 {
            return Err(Status::INVALID_FIELD);
        }
        match slba.checked_add(u64::from(nlb)) {
            Some(end) if end <= self.num_blocks => Ok(()),
            _ => Err(Status::LBA_OUT_OF_RANGE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_check_catches_the_last_block_and_overflow() {
        let g = Geometry::from_bytes(1 << 20, 4096).unwrap();
        assert_eq!(g.num_blocks, 256);
        assert_eq!(g.check_range(255, 1), Ok(()));
        assert_eq!(g.check_range(255, 2), Err(Status::LBA_OUT_OF_RANGE));
        assert_eq!(g.check_range(u64::MAX, 1), Err(Status::LBA_OUT_OF_RANGE));
        assert_eq!(g.check_range(0, 0), Err(Status::INVALID_FIELD));
        assert!(Geometry::from_bytes(4096, 1024).is_none());
    }
}
