//! Measures the memory the blob index needs per blob, with a synthetic index
//! of N blob IDs (default 10 million, about 10 TB of data at 1 MiB chunks):
//! `cargo run --release -p lifeboat-core --example index_memory [N]`.
//!
//! Prints, for comparison with restic (56) and rustic (48) bytes per blob:
//! the resident memory of the index held in memory (what restore, check and
//! a backup without a cache directory use); then the same index written to
//! an index cache file and mapped, as a backup with a cache directory uses
//! it, with the process memory and the mapped (page cache) pages it touches
//! over a million lookups.

use lifeboat_core::internals::{
    open_index_cache, write_index_cache, BlobKind, IndexBuilder, IndexFile, IndexPack, PackEntry,
};
use lifeboat_core::Id;

/// Resident anonymous (process) and file-backed (mapped) memory, in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .expect("a status field")
            * 1024
    };
    (field("RssAnon:"), field("RssFile:"))
}

fn id_of(x: u64) -> Id {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&x.to_le_bytes());
    id[8..16].copy_from_slice(&(x.rotate_left(17) ^ 0xDEAD_BEEF).to_le_bytes());
    Id(id)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let per_pack = 16;
    let step = 0x9E37_79B9_7F4A_7C15u64;
    let (anon0, file0) = rss();
    let mut builder = IndexBuilder::new();
    let mut x = 0u64;
    for p in 0..n.div_ceil(per_pack) {
        let blobs = (0..per_pack)
            .map(|i| {
                x = x.wrapping_add(step);
                PackEntry {
                    id: id_of(x),
                    offset: i as u32 * 1_048_576,
                    length: 1_000_000,
                    raw_length: 1_048_576,
                }
            })
            .collect();
        // Feed packs one index file at a time, as loading does.
        builder.add_file(&IndexFile::of(vec![IndexPack {
            locked_until: None,
            id: Id::of_bytes(&(p as u64).to_le_bytes()),
            kind: BlobKind::Data,
            size: 16 << 20,
            blobs,
        }]));
    }
    let index = builder.build();
    let (anon1, _) = rss();
    assert!(!index.contains(&Id::of_bytes(b"absent")));
    let blobs = index.len();
    println!(
        "in memory: {blobs} blobs in {} packs: process memory grew by {:.1} MiB = {:.1} bytes per blob (restic: 56, rustic: 48)",
        index.packs().len(),
        mib(anon1 - anon0),
        (anon1 - anon0) as f64 / blobs as f64
    );

    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = std::time::Instant::now();
    write_index_cache(dir.path(), "bench", &[7; 32], &index).expect("cache written");
    let wrote = clock.elapsed();
    drop(index);
    let (anon2, file2) = rss();
    let clock = std::time::Instant::now();
    let mapped = open_index_cache(dir.path(), "bench", &[7; 32]).expect("cache opens");
    let opened = clock.elapsed();
    let (anon3, file3) = rss();
    println!(
        "cache file: {:.1} MiB, written in {:.2} s, verified and mapped in {:.2} s; process memory {:+.1} MiB ({:.2} bytes per blob), mapped pages {:+.1} MiB",
        mib(std::fs::metadata(dir.path().join("bench/index.bin")).unwrap().len()),
        wrote.as_secs_f64(),
        opened.as_secs_f64(),
        mib(anon3 - anon2.min(anon3)),
        (anon3 as f64 - anon0 as f64) / blobs as f64,
        mib(file3 - file2.min(file3)),
    );
    // A million lookups, half of stored blobs (spread over the whole
    // index), half of absent ones.
    let lookups = 1_000_000u64;
    let clock = std::time::Instant::now();
    let mut found = 0;
    for k in 0..lookups {
        let id = if k % 2 == 0 {
            id_of(step.wrapping_mul(1 + (k * 7919) % blobs as u64))
        } else {
            Id::of_bytes(&k.to_le_bytes())
        };
        found += mapped.contains(&id) as u64;
    }
    let took = clock.elapsed();
    assert_eq!(found, lookups / 2, "every stored blob is found");
    let (anon4, file4) = rss();
    println!(
        "{lookups} lookups on the mapped index: {:.0} ns each; process memory {:.2} bytes per blob in all; mapped pages touched {:.1} MiB (page cache the kernel may reclaim; file-backed memory before mapping: {:.1} MiB)",
        took.as_nanos() as f64 / lookups as f64,
        (anon4 as f64 - anon0 as f64) / blobs as f64,
        mib(file4 - file3.min(file4)),
        mib(file0),
    );
}
