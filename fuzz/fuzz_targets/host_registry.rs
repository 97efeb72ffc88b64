//! A host registry entry and an adoption record, as a full-key host reads
//! them after their signature verified: JSON, and a host name that must be
//! plain.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_core::internals::{check_host_name, AdoptionRecord, HostRecord};

fuzz_target!(|json: &[u8]| {
    if let Ok(record) = serde_json::from_slice::<HostRecord>(json) {
        let _ = check_host_name(&record.host);
        let _ = record.key.as_deref().and_then(lifeboat_core::PublicKey::from_hex);
    }
    if let Ok(record) = serde_json::from_slice::<AdoptionRecord>(json) {
        let _ = serde_json::to_vec(&record);
    }
});
