//! 128-bit identifiers (volume and leg UUIDs, NGUIDs, host IDs), printed and parsed in the
//! usual 8-4-4-4-12 form.

use std::fmt;

/// A 128-bit identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A random (version 4) UUID.
    pub fn new_random() -> Self {
        let mut b: [u8; 16] = rand::random();
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Self(b)
    }

    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses 32 hex digits, with or without the dashes of the 8-4-4-4-12 form.
    pub fn parse(s: &str) -> Option<Self> {
        let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
        if hex.len() != 32 || s.len() - hex.len() > 4 {
            return None;
        }
        let mut b = [0u8; 16];
        for (out, pair) in b.iter_mut().zip(hex.chunks_exact(2)) {
            *out = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Self(b))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses_the_8_4_4_4_12_form() {
        let u = Uuid([
            0x6e, 0x76, 0x6d, 0x69, 0x72, 0x72, 0x6f, 0x72, 0, 0, 0, 0, 0, 0, 0, 1,
        ]);
        assert_eq!(u.to_string(), "6e766d69-7272-6f72-0000-000000000001");
        assert_eq!(Uuid::parse("6e766d69-7272-6f72-0000-000000000001"), Some(u));
        assert_eq!(Uuid::parse("6e766d6972726f720000000000000001"), Some(u));
        assert_eq!(Uuid::parse("6e766d69-7272-6f72-0000-00000000001"), None);
        assert_eq!(Uuid::parse("zz766d69-7272-6f72-0000-000000000001"), None);
        assert_eq!(Uuid::parse("6e76-6d69-7272-6f72-0000-0000-0000-01"), None);
        let r = Uuid::new_random();
        assert_eq!(
            (r.0[6] >> 4, r.0[8] >> 6),
            (4, 2),
            "version 4, RFC 4122 variant"
        );
        assert_eq!(Uuid::parse(&r.to_string()), Some(r));
        assert!(Uuid::default().is_nil() && !r.is_nil());
    }
}
