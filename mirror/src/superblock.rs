//! The leg superblock (ARCHITECTURE.md §4): identity, role, freshness and the location of the
//! write-intent bitmap, at the start of every leg's reserved metadata area.
//!
//! Wire layout (little endian), 256 bytes at byte 0 of the leg, the rest of the first 4 KiB
//! zero. CRC32C (Castagnoli) over bytes 0..252 is stored at 252.
//!
//! | off | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `NVMIRROR` |
//! | 8 | 4 | format version (2; version 1, without the epoch, is still read) |
//! | 12 | 4 | size of this header (256) |
//! | 16 | 16 | volume UUID |
//! | 32 | 16 | leg UUID |
//! | 48 | 1 | role (0 primary, 1 mirror) |
//! | 49 | 1 | leg index in the volume |
//! | 50 | 1 | number of legs |
//! | 51 | 1 | flags (bit 0: clean shutdown) |
//! | 52 | 4 | logical block size |
//! | 56 | 8 | event counter |
//! | 64 | 8 | region size in bytes |
//! | 72 | 8 | bitmap area offset in bytes |
//! | 80 | 8 | bitmap area length in bytes |
//! | 88 | 8 | data offset in bytes (start of the exported namespace) |
//! | 96 | 8 | exported size in logical blocks |
//! | 104 | 64 | UUIDs of the volume's legs, by index (zero when unused) |
//! | 168 | 64 | volume name, UTF-8, zero padded |
//! | 232 | 4 | state of each member leg as this leg last knew it (0 unused, 1 in sync, 2 stale) |
//! | 236 | 8 | fencing epoch (version 2; 0 in version 1): bumped by every promotion (docs/promotion.md) |
//! | 244 | 8 | reserved, zero |
//! | 252 | 4 | CRC32C of bytes 0..252 |

use crate::MAX_LEGS;

/// First bytes of every nvmirror leg.
pub const MAGIC: [u8; 8] = *b"NVMIRROR";
/// The on-disk format version this code writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this code still reads (no fencing epoch: it reads as 0).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Bytes of the encoded header.
pub const HEADER_LEN: usize = 256;
/// Smallest and largest region size.
pub const REGION_SIZE_RANGE: (u64, u64) = (64 << 10, 64 << 20);
const CRC_OFFSET: usize = 252;
const FLAG_CLEAN: u8 = 1;

pub use nvmirror_nvme::Uuid;

/// A leg's role in its volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Mirror,
}

/// What a leg's superblock records about each member of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MemberState {
    /// No leg at this index.
    #[default]
    Unused,
    /// Holds every acknowledged write.
    InSync,
    /// Missed writes: must resync from the write-intent bitmap (or fully) before it is used.
    Stale,
    /// Taken out by the operator: missed writes like a stale leg, but stays out of I/O,
    /// across restarts, until it is attached again.
    Detached,
    /// Retired by the operator (`leg_remove`): the slot stays taken, receives nothing and is
    /// never resynced; the device may since have been reused elsewhere.
    Removed,
}

impl MemberState {
    fn code(self) -> u8 {
        match self {
            Self::Unused => 0,
            Self::InSync => 1,
            Self::Stale => 2,
            Self::Detached => 3,
            Self::Removed => 4,
        }
    }
}

/// The decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub volume_uuid: Uuid,
    pub leg_uuid: Uuid,
    pub role: Role,
    pub leg_index: u8,
    pub leg_count: u8,
    /// Set by a clean shutdown; cleared on the first write after start.
    pub clean: bool,
    pub lba_size: u32,
    /// Bumped on every membership or state change; the highest is the freshest leg.
    pub event_counter: u64,
    pub region_size: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub data_offset: u64,
    pub data_blocks: u64,
    pub leg_uuids: [Uuid; MAX_LEGS],
    pub volume_name: String,
    /// Member states by leg index, as this leg last knew them.
    pub member_states: [MemberState; MAX_LEGS],
    /// Fencing epoch: which promotion of the volume this leg last served under. The
    /// reservation key on remote legs is derived from it (`fence.rs`).
    pub epoch: u64,
}

/// Why bytes are not a valid superblock. Each names what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("superblock truncated: {len} bytes, need {HEADER_LEN}")]
    Truncated { len: usize },
    #[error("no nvmirror superblock (magic {found:02x?})")]
    NoMagic { found: [u8; 8] },
    #[error("superblock format version {0} is not supported (this build reads {OLDEST_FORMAT_VERSION}..={FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("superblock checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("superblock field {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("leg belongs to volume {found} ('{name}'), not {expected}")]
    WrongVolume {
        expected: Uuid,
        found: Uuid,
        name: String,
    },
}

impl Superblock {
    /// Encodes the 256-byte header with its checksum.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_uuid.0);
        b[32..48].copy_from_slice(&self.leg_uuid.0);
        b[48] = match self.role {
            Role::Primary => 0,
            Role::Mirror => 1,
        };
        b[49] = self.leg_index;
        b[50] = self.leg_count;
        b[51] = if self.clean { FLAG_CLEAN } else { 0 };
        b[52..56].copy_from_slice(&self.lba_size.to_le_bytes());
        for (i, v) in [
            self.event_counter,
            self.region_size,
            self.bitmap_offset,
            self.bitmap_len,
            self.data_offset,
            self.data_blocks,
        ]
        .iter()
        .enumerate()
        {
            b[56 + 8 * i..64 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        for (i, u) in self.leg_uuids.iter().enumerate() {
            b[104 + 16 * i..120 + 16 * i].copy_from_slice(&u.0);
        }
        let name = self.volume_name.as_bytes();
        let n = name.len().min(64);
        b[168..168 + n].copy_from_slice(&name[..n]);
        for (i, m) in self.member_states.iter().enumerate() {
            b[232 + i] = m.code();
        }
        b[236..244].copy_from_slice(&self.epoch.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header. Never panics, whatever the bytes.
    pub fn decode(b: &[u8]) -> Result<Self, SuperblockError> {
        if b.len() < HEADER_LEN {
            return Err(SuperblockError::Truncated { len: b.len() });
        }
        let magic: [u8; 8] = b[0..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(SuperblockError::NoMagic { found: magic });
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let uuid_at = |o: usize| Uuid(b[o..o + 16].try_into().expect("16 bytes"));
        let version = u32_at(8);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(SuperblockError::UnsupportedVersion(version));
        }
        let stored = u32_at(CRC_OFFSET);
        let computed = crc32c::crc32c(&b[..CRC_OFFSET]);
        if stored != computed {
            return Err(SuperblockError::Checksum { stored, computed });
        }
        let field = |field: &'static str, reason: String| SuperblockError::Field { field, reason };
        if u32_at(12) as usize != HEADER_LEN {
            return Err(field(
                "header size",
                format!("{} (expected {HEADER_LEN})", u32_at(12)),
            ));
        }
        let role = match b[48] {
            0 => Role::Primary,
            1 => Role::Mirror,
            r => {
                return Err(field(
                    "role",
                    format!("{r} is neither primary (0) nor mirror (1)"),
                ))
            }
        };
        let mut member_states = [MemberState::Unused; MAX_LEGS];
        for (i, m) in member_states.iter_mut().enumerate() {
            *m = match b[232 + i] {
                0 => MemberState::Unused,
                1 => MemberState::InSync,
                2 => MemberState::Stale,
                3 => MemberState::Detached,
                4 => MemberState::Removed,
                v => {
                    return Err(field(
                        "member states",
                        format!("leg {i}: unknown state {v}"),
                    ))
                }
            };
        }
        let sb = Self {
            volume_uuid: uuid_at(16),
            leg_uuid: uuid_at(32),
            role,
            leg_index: b[49],
            leg_count: b[50],
            clean: b[51] & FLAG_CLEAN != 0,
            lba_size: u32_at(52),
            event_counter: u64_at(56),
            region_size: u64_at(64),
            bitmap_offset: u64_at(72),
            bitmap_len: u64_at(80),
            data_offset: u64_at(88),
            data_blocks: u64_at(96),
            leg_uuids: std::array::from_fn(|i| uuid_at(104 + 16 * i)),
            volume_name: {
                let raw = &b[168..232];
                let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                String::from_utf8(raw[..end].to_vec())
                    .map_err(|_| field("volume name", "not UTF-8".into()))?
            },
            member_states,
            epoch: if version >= 2 { u64_at(236) } else { 0 },
        };
        sb.validate()?;
        Ok(sb)
    }

    /// Checks the fields' consistency (what `decode` enforces beyond the checksum).
    pub fn validate(&self) -> Result<(), SuperblockError> {
        let field =
            |field: &'static str, reason: String| Err(SuperblockError::Field { field, reason });
        if self.volume_uuid.is_nil() || self.leg_uuid.is_nil() {
            return field("uuid", "nil UUID".into());
        }
        if !(1..=MAX_LEGS as u8).contains(&self.leg_count) {
            return field("leg count", format!("{} (1..={MAX_LEGS})", self.leg_count));
        }
        if self.leg_index >= self.leg_count {
            return field(
                "leg index",
                format!("{} of {} legs", self.leg_index, self.leg_count),
            );
        }
        if self.leg_uuids[self.leg_index as usize] != self.leg_uuid {
            return field("leg uuids", "this leg's UUID is not at its index".into());
        }
        for (i, m) in self.member_states.iter().enumerate() {
            if (*m == MemberState::Unused) != (i >= self.leg_count as usize) {
                return field(
                    "member states",
                    format!("leg {i} is {m:?} in a volume of {} legs", self.leg_count),
                );
            }
        }
        if self.lba_size != 512 && self.lba_size != 4096 {
            return field("lba size", format!("{} (512 or 4096)", self.lba_size));
        }
        let (lo, hi) = REGION_SIZE_RANGE;
        if !self.region_size.is_power_of_two() || !(lo..=hi).contains(&self.region_size) {
            return field(
                "region size",
                format!("{} (a power of two, 64 KiB..=64 MiB)", self.region_size),
            );
        }
        let lba = u64::from(self.lba_size);
        if self.bitmap_offset < HEADER_LEN as u64 || self.bitmap_offset % lba != 0 {
            return field(
                "bitmap offset",
                format!("{} is inside the header or unaligned", self.bitmap_offset),
            );
        }
        match self.bitmap_offset.checked_add(self.bitmap_len) {
            Some(end) if end <= self.data_offset => {}
            _ => return field("bitmap length", "the bitmap overlaps the data area".into()),
        }
        if self.data_offset % lba != 0 {
            return field(
                "data offset",
                format!("{} is not block aligned", self.data_offset),
            );
        }
        let data_end = self
            .data_blocks
            .checked_mul(lba)
            .and_then(|b| b.checked_add(self.data_offset));
        if self.data_blocks == 0 || data_end.is_none() {
            return field("data blocks", format!("{}", self.data_blocks));
        }
        Ok(())
    }

    /// Checks that this leg belongs to `volume`.
    pub fn check_volume(&self, volume: Uuid) -> Result<(), SuperblockError> {
        if self.volume_uuid != volume {
            return Err(SuperblockError::WrongVolume {
                expected: volume,
                found: self.volume_uuid,
                name: self.volume_name.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Superblock {
        let leg = Uuid::new_random();
        let mut leg_uuids = [Uuid::default(); MAX_LEGS];
        leg_uuids[1] = leg;
        leg_uuids[0] = Uuid::new_random();
        Superblock {
            volume_uuid: Uuid::new_random(),
            leg_uuid: leg,
            role: Role::Mirror,
            leg_index: 1,
            leg_count: 2,
            clean: true,
            lba_size: 4096,
            event_counter: 42,
            region_size: 1 << 20,
            bitmap_offset: 8192,
            bitmap_len: 1 << 20,
            data_offset: 2 << 20,
            data_blocks: 262_144,
            leg_uuids,
            volume_name: "vol0".into(),
            member_states: [
                MemberState::InSync,
                MemberState::Stale,
                MemberState::Unused,
                MemberState::Unused,
            ],
            epoch: 7,
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
    }

    /// A version-1 superblock (written before the fencing epoch) still opens, at epoch 0.
    #[test]
    fn version_1_reads_with_epoch_0() {
        let sb = sample();
        let mut b = sb.encode();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[236..244].fill(0);
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Superblock::decode(&b),
            Ok(Superblock {
                epoch: 0,
                ..sb.clone()
            })
        );
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Superblock::decode(&b),
            Err(SuperblockError::UnsupportedVersion(3))
        );
    }

    #[test]
    fn the_epoch_is_at_byte_236() {
        let sb = Superblock {
            epoch: 0x0102_0304_0506_0708,
            ..sample()
        };
        let b = sb.encode();
        assert_eq!(b[236..244], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(b[244..252], [0; 8]);
    }

    #[test]
    fn uuid_is_version_4_and_prints_canonically() {
        let u = Uuid::new_random();
        let s = u.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert_eq!(
            Uuid([0xab; 16]).to_string(),
            "abababab-abab-abab-abab-abababababab"
        );
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let mut b = sample().encode();
        b[60] ^= 1;
        assert!(matches!(
            Superblock::decode(&b),
            Err(SuperblockError::Checksum { .. })
        ));
    }

    #[test]
    fn truncated_and_foreign_bytes_are_named() {
        let b = sample().encode();
        assert_eq!(
            Superblock::decode(&b[..100]),
            Err(SuperblockError::Truncated { len: 100 })
        );
        let zeros = [0u8; 4096];
        assert!(matches!(
            Superblock::decode(&zeros),
            Err(SuperblockError::NoMagic { .. })
        ));
        let mut v9 = b;
        v9[8] = 9;
        assert_eq!(
            Superblock::decode(&v9),
            Err(SuperblockError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn wrong_volume_names_both() {
        let sb = sample();
        let other = Uuid::new_random();
        let err = sb.check_volume(other).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&other.to_string()) && msg.contains(&sb.volume_uuid.to_string()));
        assert!(msg.contains("vol0"), "{msg}");
        assert_eq!(sb.check_volume(sb.volume_uuid), Ok(()));
    }

    #[test]
    fn inconsistent_fields_are_rejected_even_with_a_good_checksum() {
        type Mutation = Box<dyn Fn(&mut Superblock)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("region size", Box::new(|s| s.region_size = 3 << 20)),
            ("region size", Box::new(|s| s.region_size = 4096)),
            ("lba size", Box::new(|s| s.lba_size = 1024)),
            ("leg index", Box::new(|s| s.leg_index = 2)),
            ("bitmap length", Box::new(|s| s.bitmap_len = 4 << 20)),
            ("bitmap offset", Box::new(|s| s.bitmap_offset = 0)),
            ("leg count", Box::new(|s| s.leg_count = 9)),
            (
                "leg uuids",
                Box::new(|s| s.leg_uuids[1] = Uuid::new_random()),
            ),
        ];
        for (name, mutate) in cases {
            let mut sb = sample();
            mutate(&mut sb);
            match Superblock::decode(&sb.encode()) {
                Err(SuperblockError::Field { field, .. }) => assert_eq!(field, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Superblock::decode(&bytes);
        }

        #[test]
        fn arbitrary_bytes_with_magic_and_crc_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 256..300)) {
            bytes[0..8].copy_from_slice(&MAGIC);
            bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            let crc = crc32c::crc32c(&bytes[..CRC_OFFSET]);
            bytes[CRC_OFFSET..256].copy_from_slice(&crc.to_le_bytes());
            let _ = Superblock::decode(&bytes);
        }
    }
}
