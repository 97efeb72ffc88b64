//! Measures the memory the in-memory blob index needs per blob, with a
//! synthetic index of N blob IDs (default 10 million, about 10 TB of data at
//! 1 MiB chunks): `cargo run --release -p lifeboat-core --example
//! index_memory [N]`. Prints resident memory before and after, and bytes per
//! blob, for comparison with restic (56) and rustic (48).

use lifeboat_core::internals::{BlobKind, IndexBuilder, IndexFile, IndexPack, PackEntry};
use lifeboat_core::Id;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("statm");
    pages * 4096
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let per_pack = 16;
    let before = rss_bytes();
    let mut builder = IndexBuilder::new();
    let mut x = 0u64;
    for p in 0..n.div_ceil(per_pack) {
        let blobs = (0..per_pack)
            .map(|i| {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&x.to_le_bytes());
                id[8..16].copy_from_slice(&(x.rotate_left(17) ^ 0xDEAD_BEEF).to_le_bytes());
                PackEntry {
                    id: Id(id),
                    offset: i as u32 * 1_048_576,
                    length: 1_000_000,
                    raw_length: 1_048_576,
                }
            })
            .collect();
        // Feed packs one index file at a time, as loading does.
        builder.add_file(&IndexFile {
            version: 1,
            packs: vec![IndexPack {
                locked_until: None,
                id: Id::of_bytes(&(p as u64).to_le_bytes()),
                kind: BlobKind::Data,
                size: 16 << 20,
                blobs,
            }],
        });
    }
    let index = builder.build();
    let after = rss_bytes();
    let probe = Id::of_bytes(b"absent");
    assert!(!index.contains(&probe));
    println!(
        "{} blobs in {} packs: resident memory grew by {:.1} MiB = {:.1} bytes per blob (restic: 56, rustic: 48)",
        index.len(),
        index.packs().len(),
        (after - before) as f64 / 1048576.0,
        (after - before) as f64 / index.len() as f64
    );
}
