//! An object's plaintext as it comes out of age: the signature frame in
//! front of the zstd frame is split off and checked, which must never
//! panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_core::internals::split_signed;

fuzz_target!(|plain: &[u8]| {
    if let Ok((Some(sig), rest)) = split_signed(plain) {
        assert!(rest.len() + 109 == plain.len());
        let _ = sig.verifies("snapshot", "0123456789abcdef0123456789abcdef", rest);
    }
});
