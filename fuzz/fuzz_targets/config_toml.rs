//! Parses and validates arbitrary text as `nvmirror serve`'s TOML configuration: a
//! configuration or an error naming what is wrong, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmirror_target::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse_str(text, "fuzz.toml");
    }
});
