//! Any stored object as it comes back from the store: the age header is
//! parsed by the age crate and, for damaged packs, by lifeboat's own
//! segment-by-segment salvage, which must never panic or over-allocate.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lifeboat_core::internals::MasterKey;

fn key() -> &'static MasterKey {
    static KEY: OnceLock<MasterKey> = OnceLock::new();
    KEY.get_or_init(MasterKey::generate)
}

fuzz_target!(|bytes: &[u8]| {
    let _ = key().decrypt(bytes, &|| "fuzz".to_string());
    if let Ok((plain, bad)) = key().decrypt_salvage(bytes) {
        assert!(plain.len() <= bytes.len());
        assert!(bad.iter().all(|r| r.start <= plain.len()));
    }
});
