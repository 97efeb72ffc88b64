//! A writer credential file, as a backup host reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_core::WriterKey;

fuzz_target!(|bytes: &[u8]| {
    let _ = WriterKey::from_file(bytes, "fuzz.key");
});
