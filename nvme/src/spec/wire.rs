//! Little-endian encoding of fixed-layout wire structs, without `unsafe`.
//!
//! [`wire_struct!`](crate::wire_struct) declares a `#[repr(C)]` struct whose fields are
//! integers or arrays of them and generates `zeroed`, `write_to` and `read_from`, which walk
//! the fields in declaration order. Pair it with `assert_wire_size!`/`assert_wire_offset!` so
//! the declaration order provably matches the spec offsets.

/// A field type of a wire struct.
pub trait WireField: Copy {
    /// Encoded length.
    const LEN: usize;
    /// The all-zero value.
    const ZERO: Self;
    /// Writes the little-endian image into the start of `out`.
    fn put(&self, out: &mut [u8]);
    /// Reads the little-endian image from the start of `b`.
    fn get(b: &[u8]) -> Self;
}

macro_rules! int_field {
    ($($t:ty),*) => {$(
        impl WireField for $t {
            const LEN: usize = std::mem::size_of::<$t>();
            const ZERO: Self = 0;
            #[inline]
            fn put(&self, out: &mut [u8]) {
                out[..Self::LEN].copy_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(&b[..Self::LEN]);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}
int_field!(u8, u16, u32, u64);

impl<T: WireField, const N: usize> WireField for [T; N] {
    const LEN: usize = T::LEN * N;
    const ZERO: Self = [T::ZERO; N];
    fn put(&self, out: &mut [u8]) {
        for (i, v) in self.iter().enumerate() {
            v.put(&mut out[i * T::LEN..]);
        }
    }
    fn get(b: &[u8]) -> Self {
        let mut a = [T::ZERO; N];
        for (i, v) in a.iter_mut().enumerate() {
            *v = T::get(&b[i * T::LEN..]);
        }
        a
    }
}

/// Declares a wire struct and its encoder/decoder (see the module docs).
#[macro_export]
macro_rules! wire_struct {
    (
        $(#[$m:meta])*
        pub struct $name:ident {
            $( $(#[$fm:meta])* pub $f:ident : $t:ty ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fm])* pub $f: $t ),*
        }

        impl $name {
            /// Size on the wire.
            pub const SIZE: usize = ::core::mem::size_of::<$name>();

            /// All fields zero.
            pub const fn zeroed() -> Self {
                Self { $( $f: <$t as $crate::spec::wire::WireField>::ZERO ),* }
            }

            /// Writes the little-endian image into the first `SIZE` bytes of `out`.
            pub fn write_to(&self, out: &mut [u8]) -> usize {
                let mut o = 0;
                $(
                    $crate::spec::wire::WireField::put(&self.$f, &mut out[o..]);
                    o += <$t as $crate::spec::wire::WireField>::LEN;
                )*
                o
            }

            /// Decodes the first `SIZE` bytes of `b` (which must hold them).
            pub fn read_from(b: &[u8]) -> Self {
                let mut o = 0;
                $(
                    let $f = <$t as $crate::spec::wire::WireField>::get(&b[o..]);
                    o += <$t as $crate::spec::wire::WireField>::LEN;
                )*
                let _ = o;
                Self { $( $f ),* }
            }
        }
    };
}

/// Copies `s` into a fixed, space-padded ASCII field (serial and model numbers).
pub fn put_ascii_padded(field: &mut [u8], s: &str) {
    field.fill(b' ');
    for (d, c) in field.iter_mut().zip(s.bytes()) {
        *d = if c.is_ascii_graphic() || c == b' ' {
            c
        } else {
            b'_'
        };
    }
}

/// Copies `s` into a fixed, NUL-padded field (NQNs, addresses), truncating.
pub fn put_nul_padded(field: &mut [u8], s: &str) {
    field.fill(0);
    let n = s.len().min(field.len().saturating_sub(1));
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// The string in a NUL-padded field, if it is UTF-8 (up to the first NUL).
pub fn nul_padded_str(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end]).ok()
}
