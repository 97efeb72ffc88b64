//! The blob index: which pack holds each blob, and where.
//!
//! Index objects (`index/<id>`) are written by every backup after its packs
//! and before its snapshot, and merged by prune. In memory the whole index is
//! one hash map from blob ID to a 16-byte location plus a table of packs, so a
//! lookup is one probe. (Issue 3 revisits the per-blob memory.)

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::id::Id;
use crate::pack::{BlobKind, PackEntry};

/// One pack as recorded in an index object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPack {
    /// Pack ID (hash of the stored, encrypted bytes).
    pub id: Id,
    /// What the pack's blobs are.
    #[serde(rename = "type")]
    pub kind: BlobKind,
    /// Stored size of the pack in bytes.
    pub size: u64,
    /// The pack's blobs.
    pub blobs: Vec<PackEntry>,
    /// End of the pack's Object Lock retention as of this index object
    /// (a later index object may record an extension; the latest wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// The JSON of an index object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    /// Index format version.
    pub version: u32,
    /// Packs covered.
    pub packs: Vec<IndexPack>,
}

/// A blob's location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    /// Position of the pack in [`Index::packs`].
    pub pack: u32,
    /// Offset of the blob frame in the pack plaintext.
    pub offset: u32,
    /// Frame length.
    pub length: u32,
    /// Plaintext length.
    pub raw_length: u32,
}

/// Facts about a pack known to the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackInfo {
    /// Pack ID.
    pub id: Id,
    /// Blob kind of the pack.
    pub kind: BlobKind,
    /// Stored size.
    pub size: u64,
    /// End of its Object Lock retention, the latest any index object records.
    pub locked_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// Collects index objects; [`IndexBuilder::build`] freezes them into an
/// [`Index`]. (A separate type so that an index cannot be queried before it
/// is sorted.)
#[derive(Debug, Default)]
pub struct IndexBuilder {
    entries: Vec<(Id, BlobLocation)>,
    packs: Vec<PackInfo>,
    pack_pos: HashMap<Id, u32>,
}

impl IndexBuilder {
    /// An empty builder.
    pub fn new() -> IndexBuilder {
        IndexBuilder::default()
    }

    /// Adds every pack of an index object.
    pub fn add_file(&mut self, file: &IndexFile) {
        for pack in &file.packs {
            self.add_pack(pack);
        }
    }

    /// Adds one pack.
    pub fn add_pack(&mut self, pack: &IndexPack) {
        let pos = match self.pack_pos.get(&pack.id) {
            Some(&pos) => {
                // The same pack in several index objects (a lock extension,
                // a consolidation racing a backup): every listing counts,
                // so a forged listing with fewer blobs cannot hide any
                // (repeats are dropped in `build`), and the latest
                // retention wins.
                let info = &mut self.packs[pos as usize];
                info.locked_until = info.locked_until.max(pack.locked_until);
                pos
            }
            None => {
                let pos = self.packs.len() as u32;
                self.packs.push(PackInfo {
                    id: pack.id,
                    kind: pack.kind,
                    size: pack.size,
                    locked_until: pack.locked_until,
                });
                self.pack_pos.insert(pack.id, pos);
                pos
            }
        };
        self.entries.extend(pack.blobs.iter().map(|e| {
            (
                e.id,
                BlobLocation {
                    pack: pos,
                    offset: e.offset,
                    length: e.length,
                    raw_length: e.raw_length,
                },
            )
        }));
    }

    /// Sorts and freezes the index. A blob present in several packs keeps
    /// every location (duplicates arise from concurrent backups and
    /// repacking; either copy is valid, and dropping one would make the
    /// other invisible once its pack is set aside by `without_packs`).
    pub fn build(mut self) -> Index {
        self.entries
            .sort_unstable_by_key(|(id, l)| (*id, l.pack, l.offset, l.length, l.raw_length));
        self.entries.dedup();
        self.entries.shrink_to_fit();
        // buckets[b] = first entry whose ID starts with the 16 bits b.
        let mut buckets = vec![0u32; BUCKETS + 1];
        let mut e = 0usize;
        for (b, slot) in buckets.iter_mut().enumerate() {
            while e < self.entries.len() && bucket_of(&self.entries[e].0) < b {
                e += 1;
            }
            *slot = e as u32;
        }
        Index {
            entries: self.entries,
            packs: self.packs,
            buckets,
        }
    }
}

/// Number of buckets of the lookup table: one per value of an ID's first
/// 16 bits (IDs are uniform hashes, so buckets are even).
const BUCKETS: usize = 1 << 16;

fn bucket_of(id: &Id) -> usize {
    u16::from_be_bytes([id.0[0], id.0[1]]) as usize
}

/// The merged in-memory index: one sorted array of (blob ID, location),
/// 48 bytes per blob with no per-entry overhead (a hash map costs half as
/// much again in empty slots and control bytes). A fixed 256 KiB table of
/// where each 16-bit prefix starts narrows a lookup to one small, cache-local
/// range before the binary search (a plain binary search over millions of
/// entries was a cache miss per step, and a fifth of an unchanged
/// re-backup of a million files).
#[derive(Debug, Clone)]
pub struct Index {
    entries: Vec<(Id, BlobLocation)>,
    packs: Vec<PackInfo>,
    buckets: Vec<u32>,
}

impl Default for Index {
    fn default() -> Self {
        IndexBuilder::new().build()
    }
}

impl Index {
    /// An empty index.
    pub fn new() -> Index {
        Index::default()
    }

    fn position(&self, id: &Id) -> Option<usize> {
        let b = bucket_of(id);
        let (start, end) = (self.buckets[b] as usize, self.buckets[b + 1] as usize);
        self.entries[start..end]
            .binary_search_by(|e| e.0.cmp(id))
            .ok()
            .map(|i| start + i)
    }

    /// The index records of the packs at `positions` (blobs in offset
    /// order), with their known retention: what a backup writes again when
    /// it extends those packs' Object Lock.
    pub fn index_packs(&self, positions: &std::collections::HashSet<u32>) -> Vec<IndexPack> {
        let mut blobs: HashMap<u32, Vec<PackEntry>> = HashMap::new();
        for (id, loc) in self
            .entries
            .iter()
            .filter(|e| positions.contains(&e.1.pack))
        {
            blobs.entry(loc.pack).or_default().push(PackEntry {
                id: *id,
                offset: loc.offset,
                length: loc.length,
                raw_length: loc.raw_length,
            });
        }
        let mut out: Vec<IndexPack> = blobs
            .into_iter()
            .map(|(pos, mut blobs)| {
                blobs.sort_by_key(|b| b.offset);
                let info = &self.packs[pos as usize];
                IndexPack {
                    locked_until: info.locked_until,
                    id: info.id,
                    kind: info.kind,
                    size: info.size,
                    blobs,
                }
            })
            .collect();
        out.sort_by_key(|p| p.id);
        out
    }

    /// Where a blob is.
    pub fn get(&self, id: &Id) -> Option<(&PackInfo, BlobLocation)> {
        self.position(id).map(|i| {
            let loc = self.entries[i].1;
            (&self.packs[loc.pack as usize], loc)
        })
    }

    /// True when the blob is stored.
    pub fn contains(&self, id: &Id) -> bool {
        self.position(id).is_some()
    }

    /// Every pack.
    pub fn packs(&self) -> &[PackInfo] {
        &self.packs
    }

    /// The pack at a position.
    pub fn pack(&self, pos: u32) -> &PackInfo {
        &self.packs[pos as usize]
    }

    /// Number of blob locations (a blob stored twice counts twice).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A copy without the given packs (used to ignore packs that a pending
    /// prune has condemned, so new backups do not reuse their blobs).
    pub fn without_packs(self, condemned: &std::collections::HashSet<Id>) -> Index {
        if condemned.is_empty() {
            return self;
        }
        let mut b = IndexBuilder::new();
        let mut by_pack: HashMap<u32, Vec<PackEntry>> = HashMap::new();
        for (id, loc) in &self.entries {
            by_pack.entry(loc.pack).or_default().push(PackEntry {
                id: *id,
                offset: loc.offset,
                length: loc.length,
                raw_length: loc.raw_length,
            });
        }
        for (pos, info) in self.packs.iter().enumerate() {
            if condemned.contains(&info.id) {
                continue;
            }
            b.add_pack(&IndexPack {
                locked_until: info.locked_until,
                id: info.id,
                kind: info.kind,
                size: info.size,
                blobs: by_pack.remove(&(pos as u32)).unwrap_or_default(),
            });
        }
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seed: u8, offset: u32) -> PackEntry {
        PackEntry {
            id: Id::of_bytes(&[seed]),
            offset,
            length: 10,
            raw_length: 20,
        }
    }

    #[test]
    fn a_pack_listed_twice_keeps_every_blob_and_the_latest_lock_through_without_packs() {
        let early = chrono::DateTime::from_timestamp(1_000_000, 0).unwrap();
        let late = chrono::DateTime::from_timestamp(2_000_000, 0).unwrap();
        let full = IndexPack {
            locked_until: Some(early),
            id: Id::of_bytes(b"p1"),
            kind: BlobKind::Data,
            size: 1,
            blobs: vec![entry(1, 0), entry(2, 10)],
        };
        // A lock extension listing, and a forged one naming no blobs.
        let extension = IndexPack {
            locked_until: Some(late),
            ..full.clone()
        };
        let forged = IndexPack {
            locked_until: None,
            blobs: vec![],
            ..full.clone()
        };
        for order in [[&forged, &full, &extension], [&extension, &forged, &full]] {
            let mut b = IndexBuilder::new();
            for p in order {
                b.add_pack(p);
            }
            let index = b.build();
            assert_eq!(index.len(), 2, "every blob once");
            assert!(index.contains(&entry(1, 0).id) && index.contains(&entry(2, 0).id));
            let other = std::collections::HashSet::from([Id::of_bytes(b"other")]);
            let index = index.without_packs(&other);
            assert_eq!(index.packs()[0].locked_until, Some(late));
            assert_eq!(index.len(), 2);
        }
    }

    #[test]
    fn lookups_find_every_blob_and_a_duplicate_survives_losing_one_pack() {
        let mut b = IndexBuilder::new();
        let p1 = IndexPack {
            locked_until: None,
            id: Id::of_bytes(b"p1"),
            kind: BlobKind::Data,
            size: 1,
            blobs: vec![entry(1, 0), entry(2, 10)],
        };
        let p2 = IndexPack {
            locked_until: None,
            id: Id::of_bytes(b"p2"),
            kind: BlobKind::Data,
            size: 1,
            blobs: vec![entry(2, 0), entry(3, 10)],
        };
        b.add_file(&IndexFile {
            version: 1,
            packs: vec![p1, p2],
        });
        let idx = b.build();
        assert_eq!(idx.len(), 4, "both copies of blob 2 are kept");
        for seed in [1u8, 2, 3] {
            assert!(idx.contains(&Id::of_bytes(&[seed])), "blob {seed} is found");
        }
        let (pack, _) = idx.get(&Id::of_bytes(&[2])).unwrap();
        assert!(pack.id == Id::of_bytes(b"p1") || pack.id == Id::of_bytes(b"p2"));
        assert!(idx.get(&Id::of_bytes(&[9])).is_none());
        let without = idx.without_packs(&[Id::of_bytes(b"p1")].into_iter().collect());
        assert_eq!(without.len(), 2);
        assert_eq!(
            without.get(&Id::of_bytes(&[2])).unwrap().0.id,
            Id::of_bytes(b"p2")
        );
    }

    proptest! {
        #[test]
        fn index_files_round_trip_through_json(n in 0usize..50) {
            let file = IndexFile {
                version: 1,
                packs: vec![IndexPack {
                    locked_until: None,
                    id: Id::of_bytes(b"p"),
                    kind: BlobKind::Tree,
                    size: 99,
                    blobs: (0..n).map(|i| entry(i as u8, i as u32 * 10)).collect(),
                }],
            };
            let json = serde_json::to_vec(&file).unwrap();
            prop_assert_eq!(serde_json::from_slice::<IndexFile>(&json).unwrap(), file);
        }
    }
}
