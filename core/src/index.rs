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
}

/// The merged in-memory index.
#[derive(Debug, Default, Clone)]
pub struct Index {
    blobs: HashMap<Id, BlobLocation>,
    packs: Vec<PackInfo>,
    pack_pos: HashMap<Id, u32>,
}

impl Index {
    /// An empty index.
    pub fn new() -> Index {
        Index::default()
    }

    /// Adds every pack of an index object. A blob present in several packs
    /// keeps its first location (duplicates arise from concurrent backups and
    /// repacking, and either copy is valid).
    pub fn add_file(&mut self, file: &IndexFile) {
        for pack in &file.packs {
            self.add_pack(pack);
        }
    }

    /// Adds one pack.
    pub fn add_pack(&mut self, pack: &IndexPack) {
        let pos = match self.pack_pos.get(&pack.id) {
            Some(&pos) => pos,
            None => {
                let pos = self.packs.len() as u32;
                self.packs.push(PackInfo {
                    id: pack.id,
                    kind: pack.kind,
                    size: pack.size,
                });
                self.pack_pos.insert(pack.id, pos);
                pos
            }
        };
        for e in &pack.blobs {
            self.blobs.entry(e.id).or_insert(BlobLocation {
                pack: pos,
                offset: e.offset,
                length: e.length,
                raw_length: e.raw_length,
            });
        }
    }

    /// Where a blob is.
    pub fn get(&self, id: &Id) -> Option<(&PackInfo, BlobLocation)> {
        self.blobs
            .get(id)
            .map(|loc| (&self.packs[loc.pack as usize], *loc))
    }

    /// True when the blob is stored.
    pub fn contains(&self, id: &Id) -> bool {
        self.blobs.contains_key(id)
    }

    /// Every pack.
    pub fn packs(&self) -> &[PackInfo] {
        &self.packs
    }

    /// The pack at a position.
    pub fn pack(&self, pos: u32) -> &PackInfo {
        &self.packs[pos as usize]
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Iterates over every blob and its location.
    pub fn iter(&self) -> impl Iterator<Item = (&Id, &BlobLocation)> {
        self.blobs.iter()
    }

    /// A copy without the given packs (used to ignore packs that a pending
    /// prune has condemned, so new backups do not reuse their blobs).
    pub fn without_packs(&self, condemned: &std::collections::HashSet<Id>) -> Index {
        if condemned.is_empty() {
            return self.clone();
        }
        let mut out = Index::new();
        let mut by_pack: HashMap<u32, Vec<PackEntry>> = HashMap::new();
        for (id, loc) in &self.blobs {
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
            out.add_pack(&IndexPack {
                id: info.id,
                kind: info.kind,
                size: info.size,
                blobs: by_pack.remove(&(pos as u32)).unwrap_or_default(),
            });
        }
        out
    }
}
