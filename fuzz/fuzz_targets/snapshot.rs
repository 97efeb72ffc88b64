//! A snapshot object's JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_core::Snapshot;

fuzz_target!(|json: &[u8]| {
    if let Ok(snapshot) = serde_json::from_slice::<Snapshot>(json) {
        let _ = serde_json::to_vec(&snapshot);
    }
});
