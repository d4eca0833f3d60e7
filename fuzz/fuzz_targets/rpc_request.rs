//! Feeds arbitrary bytes, as the control socket would receive them, to the JSON-RPC methods
//! `serve` offers over a fresh two-leg RAM volume. Every request must get a result or an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nvmirror_target::fuzzing::rpc_request(data));
