//! Feeds an arbitrary byte stream to the NVMe/TCP target's connection state machine, as a
//! host on the other end of the socket would send it: fresh, after the admin queue's
//! Connect, or as an I/O queue of an enabled controller (the first byte picks; see
//! `nvmirror_target::fuzzing::nvme_tcp_connection`). It must answer or close, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nvmirror_target::fuzzing::nvme_tcp_connection(data));
