//! Feeds an arbitrary byte stream to an NBD server connection: the handshake from the
//! client flags on, or the transmission phase after `NBD_OPT_GO` (the first byte picks; see
//! `nvmirror_target::fuzzing::nbd_session`). It must answer or close, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nvmirror_target::fuzzing::nbd_session(data));
