//! Decodes arbitrary bytes as a leg's superblock (a decoded one must encode and decode to
//! itself) and opens a persistent volume from a leg holding them, bitmap area included.
//! Errors are fine; panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nvmirror_mirror::fuzzing::superblock_and_bitmap(data));
