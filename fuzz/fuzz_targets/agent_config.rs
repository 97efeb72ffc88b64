//! The agent's TOML configuration, with every error reported by line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        match lifeboat_agent::config::Config::parse(text, std::path::Path::new("fuzz.toml")) {
            Ok(_) => {}
            Err(errors) => {
                let _ = errors.to_string();
            }
        }
    }
});
