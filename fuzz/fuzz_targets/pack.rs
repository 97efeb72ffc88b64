//! A decrypted pack's plaintext: the trailer (length, magic, JSON header)
//! is parsed, then every blob frame the header names is decoded, as restore
//! and check do. Hostile lengths and offsets must be refused, never panic
//! or allocate what the frame does not hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_core::internals::{decode_blob, parse_pack};

fuzz_target!(|plain: &[u8]| {
    let Ok(header) = parse_pack(plain) else {
        return;
    };
    for blob in header.blobs.iter().take(64) {
        let start = blob.offset as usize;
        let Some(end) = start.checked_add(blob.length as usize) else {
            continue;
        };
        if let Some(frame) = plain.get(start..end) {
            let _ = decode_blob(frame, blob.raw_length);
        }
    }
});
