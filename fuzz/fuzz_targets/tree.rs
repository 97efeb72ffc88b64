//! A tree blob's bytes: names, modes, targets, xattrs, hard links. Whatever
//! parses must satisfy the path-component rules restore relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_core::Tree;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(tree) = Tree::from_bytes(bytes) {
        for node in &tree.nodes {
            let name = &node.name.0;
            assert!(!name.is_empty() && name != b"." && name != b"..");
            assert!(!name.contains(&b'/') && !name.contains(&0));
        }
        let _ = tree.to_bytes();
    }
});
