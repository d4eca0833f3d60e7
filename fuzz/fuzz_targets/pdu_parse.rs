//! Feeds arbitrary bytes to the NVMe/TCP PDU parser under every role and digest setting:
//! it must return a PDU, "need more bytes" or an error, never panic, and never claim more
//! bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmirror_nvme::spec::tcp::{parse_pdu, PduLimits, Role};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let lim = PduLimits {
        hdgst: sel & 1 != 0,
        ddgst: sel & 2 != 0,
        max_icdata: 8192,
        maxh2cdata: 131072,
        max_c2hdata: 1 << 20,
    };
    let role = if sel & 4 != 0 { Role::Host } else { Role::Controller };
    let mut rest = bytes;
    // Parse a stream of PDUs, as a connection would.
    while let Ok(Some((_, n))) = parse_pdu(rest, role, &lim) {
        assert!(n > 0 && n <= rest.len());
        rest = &rest[n..];
    }
    if let Err(e) = parse_pdu(rest, role, &lim) {
        assert!(e.echo_len <= rest.len().min(128));
    }
});
