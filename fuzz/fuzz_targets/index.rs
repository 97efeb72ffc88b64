//! An index object's JSON, merged into an in-memory index and queried, as
//! every backup, restore and prune does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_core::internals::{IndexBuilder, IndexFile};

fuzz_target!(|json: &[u8]| {
    let Ok(file) = serde_json::from_slice::<IndexFile>(json) else {
        return;
    };
    let mut builder = IndexBuilder::new();
    builder.add_file(&file);
    builder.add_file(&file);
    let index = builder.build();
    for pack in file.packs.iter().take(16) {
        for blob in pack.blobs.iter().take(16) {
            let _ = index.get(&blob.id);
        }
    }
    let _ = index.len();
});
