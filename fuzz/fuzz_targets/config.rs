//! The repository's plaintext `config` object, read before any key opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_core::internals::parse_config;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(config) = parse_config(bytes) {
        let _ = config.digest();
    }
});
