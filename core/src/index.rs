//! The blob index: which pack holds each blob, and where.
//!
//! Index objects (`index/<id>`) are written by every backup after its packs
//! and before its snapshot, and merged by prune. Loaded, the index is one or
//! more sorted runs of 48-byte records (blob ID and location) plus a table of
//! packs. A backup with a cache directory maps the bulk of it from the index
//! cache file (`index_cache`) rather than holding it in memory, so the index
//! of a large repository costs page cache the kernel can reclaim, not
//! process memory.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::fsmeta::Mapped;
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
    /// In an object a full-key host signed: the host whose own (signed)
    /// listings it relays unchanged, when it vouches for them no further
    /// than that host did (prune's consolidation). Absent: the signer
    /// vouches for them itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl IndexFile {
    /// An index object of `packs`, in the signer's own name.
    pub fn of(packs: Vec<IndexPack>) -> IndexFile {
        IndexFile {
            version: 1,
            packs,
            origin: None,
        }
    }

    /// Index objects of `packs` relaying `origin`'s listings (or in the
    /// signer's own name), each of at most
    /// [`MAX_BLOBS_PER_INDEX`](crate::object::MAX_BLOBS_PER_INDEX) blobs so
    /// that every reader's size limit holds.
    pub fn split(packs: Vec<IndexPack>, origin: Option<&str>) -> Vec<IndexFile> {
        let mut out = Vec::new();
        let mut current = Vec::new();
        let mut blobs = 0;
        for p in packs {
            if !current.is_empty() && blobs + p.blobs.len() > crate::object::MAX_BLOBS_PER_INDEX {
                out.push(std::mem::take(&mut current));
                blobs = 0;
            }
            blobs += p.blobs.len();
            current.push(p);
        }
        if !current.is_empty() {
            out.push(current);
        }
        out.into_iter()
            .map(|packs| IndexFile {
                version: 1,
                packs,
                origin: origin.map(str::to_string),
            })
            .collect()
    }
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
    /// Records by tier (lookups try tier 0 first; see `add_object`).
    tiers: [Vec<(Id, BlobLocation)>; TIERS],
    /// The packs of the base index, then the packs added here.
    packs: Vec<PackInfo>,
    /// Positions of the packs added here (base packs are found in
    /// `base.by_id`).
    pack_pos: HashMap<Id, u32>,
    /// The index this one adds to ([`IndexBuilder::over`]).
    base: Option<Index>,
    /// The index objects added by ID.
    covers: Vec<Id>,
    /// The index objects read and left out (not for this index's use).
    excluded: Vec<Id>,
}

/// How many trust tiers an index keeps apart (see [`IndexBuilder::add_object`]).
pub const TIERS: usize = 3;

impl IndexBuilder {
    /// An empty builder.
    pub fn new() -> IndexBuilder {
        IndexBuilder::default()
    }

    /// A builder whose index adds to `base` (a cached index): base blobs
    /// keep their records, base packs their positions, and a listing of a
    /// base pack (a lock extension) updates that pack's retention. With
    /// `same_use`, the objects the base left out stay out; otherwise (a
    /// reader on a backup's cache) they are read again.
    pub fn over(mut base: Index, same_use: bool) -> IndexBuilder {
        if !same_use {
            base.excluded.clear();
        }
        IndexBuilder {
            packs: std::mem::take(&mut base.packs),
            covers: base.covers.clone(),
            excluded: base.excluded.clone(),
            base: Some(base),
            ..IndexBuilder::default()
        }
    }

    /// Adds every pack of an index object, in tier 0.
    pub fn add_file(&mut self, file: &IndexFile) {
        for pack in &file.packs {
            self.add_pack(pack, 0);
        }
    }

    /// Adds every pack of the index object `id` in `tier` (below
    /// [`TIERS`]: lookups find tier-0 records first), and records that the index covers that
    /// object (what the index cache is keyed on).
    pub fn add_object(&mut self, id: Id, file: &IndexFile, tier: u8) {
        for pack in &file.packs {
            self.add_pack(pack, tier);
        }
        self.covers.push(id);
    }

    /// Records that the index object `id` was read and left out.
    pub fn exclude(&mut self, id: Id) {
        self.excluded.push(id);
    }

    /// True when the index object `id` is in the base this builder adds
    /// to, or was left out by it (so loading it again is not needed).
    pub fn accounts_for(&self, id: &Id) -> bool {
        self.base.as_ref().is_some_and(|b| {
            b.covers.binary_search(id).is_ok() || b.excluded.binary_search(id).is_ok()
        })
    }

    fn position_of(&self, pack: &Id) -> Option<u32> {
        if let Some(&pos) = self.pack_pos.get(pack) {
            return Some(pos);
        }
        let by_id = &self.base.as_ref()?.by_id;
        by_id
            .binary_search_by(|&pos| self.packs[pos as usize].id.cmp(pack))
            .ok()
            .map(|i| by_id[i])
    }

    /// Adds one pack's listing in `tier`.
    pub fn add_pack(&mut self, pack: &IndexPack, tier: u8) {
        let pos = match self.position_of(&pack.id) {
            Some(pos) => {
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
        let entries = &mut self.tiers[(tier as usize).min(TIERS - 1)];
        entries.extend(pack.blobs.iter().map(|e| {
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
    pub fn build(self) -> Index {
        let mut runs = Vec::new();
        if let Some(base) = self.base {
            runs = base.runs;
        }
        for (tier, entries) in self.tiers.into_iter().enumerate() {
            if !entries.is_empty() || (tier == 0 && runs.is_empty()) {
                runs.push(Run::sorted(entries));
            }
        }
        let mut covers = self.covers;
        covers.sort_unstable();
        covers.dedup();
        let mut excluded = self.excluded;
        excluded.sort_unstable();
        excluded.dedup();
        let mut index = Index::assemble(runs, self.packs, covers);
        index.excluded = excluded;
        index
    }
}

/// Adds one index object's listing of a pack. A pack listed by several
/// index objects keeps the union of their blobs (a forged listing with
/// fewer blobs must not make live blobs look unused) and the latest lock.
pub(crate) fn merge_listing(packs: &mut HashMap<Id, IndexPack>, listing: IndexPack) {
    match packs.entry(listing.id) {
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(listing);
        }
        std::collections::hash_map::Entry::Occupied(mut o) => {
            let known = o.get_mut();
            known.locked_until = known.locked_until.max(listing.locked_until);
            if known.blobs != listing.blobs {
                let seen: std::collections::HashSet<(Id, u32)> =
                    known.blobs.iter().map(|b| (b.id, b.offset)).collect();
                known.blobs.extend(
                    listing
                        .blobs
                        .into_iter()
                        .filter(|b| !seen.contains(&(b.id, b.offset))),
                );
                known.blobs.sort_by_key(|b| b.offset);
            }
        }
    }
}

/// The order records are sorted in: by blob ID, then by location (so that
/// repeats are adjacent and dropped).
pub(crate) fn record_key(r: &(Id, BlobLocation)) -> (Id, u32, u32, u32, u32) {
    let (id, l) = r;
    (*id, l.pack, l.offset, l.length, l.raw_length)
}

/// Counts records per 16-bit ID prefix, for a run's bucket table (built in
/// memory, written to and checked in the index cache file alike).
pub(crate) struct BucketCounts(Vec<u32>);

impl BucketCounts {
    pub(crate) fn new() -> BucketCounts {
        BucketCounts(vec![0; BUCKETS])
    }

    /// Counts one record.
    pub(crate) fn add(&mut self, id: &Id) {
        self.0[bucket_of(id)] += 1;
    }

    /// The bucket table of the counted (sorted) records: where the records
    /// of each prefix start, then their total.
    pub(crate) fn table(&self) -> Vec<u32> {
        let mut table = Vec::with_capacity(BUCKETS + 1);
        let mut sum = 0u32;
        for count in &self.0 {
            table.push(sum);
            sum += count;
        }
        table.push(sum);
        table
    }
}

/// Number of buckets of the lookup table: one per value of an ID's first
/// 16 bits (IDs are uniform hashes, so buckets are even).
pub(crate) const BUCKETS: usize = 1 << 16;

/// The bucket of an ID: its first 16 bits.
pub(crate) fn bucket_of(id: &Id) -> usize {
    u16::from_be_bytes([id.0[0], id.0[1]]) as usize
}

/// Bytes of one record in the index cache file: blob ID, then pack
/// position, offset, frame length and plaintext length (little-endian u32).
pub(crate) const RECORD: usize = 48;

/// Where a run's records live.
#[derive(Debug, Clone)]
pub(crate) enum Records {
    /// Sorted in memory.
    Owned(Vec<(Id, BlobLocation)>),
    /// Mapped from a verified index cache file: `count` records of
    /// [`RECORD`] bytes from byte `start`.
    Mapped {
        /// The whole file.
        map: Arc<Mapped>,
        /// Offset of the first record.
        start: usize,
        /// Number of records.
        count: usize,
    },
}

/// One sorted run of (blob ID, location) records with its bucket table.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) records: Records,
    /// `buckets[b]` = first record whose ID starts with the 16 bits b.
    pub(crate) buckets: Vec<u32>,
}

impl Run {
    /// A run of `entries`, sorted, repeats dropped.
    fn sorted(mut entries: Vec<(Id, BlobLocation)>) -> Run {
        entries.sort_unstable_by_key(record_key);
        entries.dedup();
        entries.shrink_to_fit();
        let mut counts = BucketCounts::new();
        for (id, _) in &entries {
            counts.add(id);
        }
        Run {
            buckets: counts.table(),
            records: Records::Owned(entries),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.records {
            Records::Owned(v) => v.len(),
            Records::Mapped { count, .. } => *count,
        }
    }

    fn raw(map: &[u8], start: usize, i: usize) -> &[u8] {
        &map[start + i * RECORD..start + (i + 1) * RECORD]
    }

    pub(crate) fn id(&self, i: usize) -> &[u8; 32] {
        match &self.records {
            Records::Owned(v) => &v[i].0 .0,
            Records::Mapped { map, start, .. } => Self::raw(map, *start, i)[..32]
                .try_into()
                .expect("32 bytes"),
        }
    }

    pub(crate) fn record(&self, i: usize) -> (Id, BlobLocation) {
        match &self.records {
            Records::Owned(v) => v[i],
            Records::Mapped { map, start, .. } => decode_record(Self::raw(map, *start, i)),
        }
    }

    /// The records whose ID is `id`.
    fn find(&self, id: &Id) -> std::ops::Range<usize> {
        let b = bucket_of(id);
        let (mut lo, mut hi) = (self.buckets[b] as usize, self.buckets[b + 1] as usize);
        // The first record not below `id` (a partition point).
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.id(mid) < &id.0 {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut end = lo;
        while end < self.len() && self.id(end) == &id.0 {
            end += 1;
        }
        lo..end
    }
}

/// Decodes one [`RECORD`]-byte record.
pub(crate) fn decode_record(r: &[u8]) -> (Id, BlobLocation) {
    let word = |i: usize| u32::from_le_bytes(r[32 + 4 * i..36 + 4 * i].try_into().expect("4"));
    (
        Id(r[..32].try_into().expect("32 bytes")),
        BlobLocation {
            pack: word(0),
            offset: word(1),
            length: word(2),
            raw_length: word(3),
        },
    )
}

/// Encodes one record as [`RECORD`] bytes.
pub(crate) fn encode_record(id: &Id, l: &BlobLocation, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.0);
    for w in [l.pack, l.offset, l.length, l.raw_length] {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// The merged index: sorted runs of (blob ID, location), 48 bytes per blob
/// with no per-entry overhead (a hash map costs half as much again in empty
/// slots and control bytes). A fixed 256 KiB table per run of where each
/// 16-bit prefix starts narrows a lookup to one small, cache-local range
/// before the binary search (a plain binary search over millions of entries
/// was a cache miss per step, and a fifth of an unchanged re-backup of a
/// million files).
///
/// A backup with a cache directory maps its first run from the index cache
/// file (see `index_cache`) instead of holding it in memory, and adds the
/// index objects written since in a second, in-memory run.
#[derive(Debug, Clone)]
pub struct Index {
    runs: Vec<Run>,
    packs: Vec<PackInfo>,
    /// Pack positions in pack ID order.
    by_id: Vec<u32>,
    /// Per pack: set aside by [`Index::without_packs`].
    set_aside: Vec<bool>,
    /// The index objects this index was built from, sorted.
    covers: Vec<Id>,
    /// The index objects read and left out for this index's use, sorted.
    excluded: Vec<Id>,
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

    /// An index of one run (from the index cache file).
    pub(crate) fn from_parts(run: Run, packs: Vec<PackInfo>, covers: Vec<Id>) -> Index {
        Index::assemble(vec![run], packs, covers)
    }

    /// An index of `runs` over `packs`, nothing set aside.
    fn assemble(runs: Vec<Run>, packs: Vec<PackInfo>, covers: Vec<Id>) -> Index {
        let mut by_id: Vec<u32> = (0..packs.len() as u32).collect();
        by_id.sort_unstable_by_key(|&pos| packs[pos as usize].id);
        Index {
            runs,
            set_aside: vec![false; packs.len()],
            packs,
            by_id,
            covers,
            excluded: Vec::new(),
        }
    }

    /// The runs, oldest first.
    pub(crate) fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// The index objects this index was built from (empty unless built with
    /// [`IndexBuilder::add_object`]), sorted.
    pub fn covers(&self) -> &[Id] {
        &self.covers
    }

    /// The index objects read and left out (not for this index's use:
    /// another host's listings in a backup's index), sorted.
    pub fn excluded(&self) -> &[Id] {
        &self.excluded
    }

    /// Sets the objects left out (from the index cache file).
    pub(crate) fn set_excluded(&mut self, excluded: Vec<Id>) {
        self.excluded = excluded;
    }

    /// Every record, run by run (each run in ID order).
    fn records(&self) -> impl Iterator<Item = (Id, BlobLocation)> + '_ {
        self.runs
            .iter()
            .flat_map(|run| (0..run.len()).map(move |i| run.record(i)))
    }

    /// The index records of the packs at `positions` (blobs in offset
    /// order), with their known retention: what a backup writes again when
    /// it extends those packs' Object Lock.
    pub fn index_packs(&self, positions: &std::collections::HashSet<u32>) -> Vec<IndexPack> {
        let mut blobs: HashMap<u32, Vec<PackEntry>> = HashMap::new();
        for (id, loc) in self.records().filter(|e| positions.contains(&e.1.pack)) {
            blobs.entry(loc.pack).or_default().push(PackEntry {
                id,
                offset: loc.offset,
                length: loc.length,
                raw_length: loc.raw_length,
            });
        }
        let mut out: Vec<IndexPack> = blobs
            .into_iter()
            .map(|(pos, mut blobs)| {
                blobs.sort_by_key(|b| b.offset);
                blobs.dedup();
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

    /// Where a blob is (in a pack not set aside). A record naming a pack
    /// the index does not list (which a verified cache file cannot hold)
    /// counts as absent rather than panicking.
    pub fn get(&self, id: &Id) -> Option<(&PackInfo, BlobLocation)> {
        self.runs.iter().find_map(|run| {
            run.find(id).find_map(|i| {
                let l = run.record(i).1;
                let pos = l.pack as usize;
                match (self.set_aside.get(pos), self.packs.get(pos)) {
                    (Some(false), Some(info)) => Some((info, l)),
                    _ => None,
                }
            })
        })
    }

    /// Every location of a blob (in packs not set aside), run by run: the
    /// better-trusted tier first. A reader tries them in turn until one
    /// verifies.
    pub fn locations<'a>(
        &'a self,
        id: &'a Id,
    ) -> impl Iterator<Item = (&'a PackInfo, BlobLocation)> + 'a {
        self.runs.iter().flat_map(move |run| {
            run.find(id).filter_map(move |i| {
                let l = run.record(i).1;
                let pos = l.pack as usize;
                match (self.set_aside.get(pos), self.packs.get(pos)) {
                    (Some(false), Some(info)) => Some((info, l)),
                    _ => None,
                }
            })
        })
    }

    /// True when the blob is stored (in a pack not set aside).
    pub fn contains(&self, id: &Id) -> bool {
        self.get(id).is_some()
    }

    /// Every pack.
    pub fn packs(&self) -> &[PackInfo] {
        &self.packs
    }

    /// The pack at a position.
    pub fn pack(&self, pos: u32) -> &PackInfo {
        &self.packs[pos as usize]
    }

    /// Number of blob records (a blob stored twice counts twice, and
    /// records in packs set aside count too).
    pub fn len(&self) -> usize {
        self.runs.iter().map(Run::len).sum()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same index with the given packs set aside: lookups no longer
    /// find blobs there (used to ignore packs that a pending prune has
    /// condemned, so new backups do not reuse their blobs). Records are
    /// kept, so this costs nothing per blob.
    pub fn without_packs(mut self, condemned: &std::collections::HashSet<Id>) -> Index {
        for (info, aside) in self.packs.iter().zip(self.set_aside.iter_mut()) {
            *aside |= condemned.contains(&info.id);
        }
        self
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
    fn a_pack_listed_twice_keeps_every_blob_and_the_latest_lock_and_setting_it_aside_hides_them() {
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
                b.add_pack(p, 0);
            }
            let index = b.build();
            assert_eq!(index.len(), 2, "every blob once");
            assert!(index.contains(&entry(1, 0).id) && index.contains(&entry(2, 0).id));
            assert_eq!(index.packs()[0].locked_until, Some(late));
            let p1 = std::collections::HashSet::from([Id::of_bytes(b"p1")]);
            let index = index.without_packs(&p1);
            assert!(!index.contains(&entry(1, 0).id) && !index.contains(&entry(2, 0).id));
            assert_eq!(
                index.packs()[0].locked_until,
                Some(late),
                "setting aside keeps the lock"
            );
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
        b.add_file(&IndexFile::of(vec![p1, p2]));
        let idx = b.build();
        assert_eq!(idx.len(), 4, "both copies of blob 2 are kept");
        for seed in [1u8, 2, 3] {
            assert!(idx.contains(&Id::of_bytes(&[seed])), "blob {seed} is found");
        }
        let (pack, _) = idx.get(&Id::of_bytes(&[2])).unwrap();
        assert!(pack.id == Id::of_bytes(b"p1") || pack.id == Id::of_bytes(b"p2"));
        assert!(idx.get(&Id::of_bytes(&[9])).is_none());
        let without = idx.without_packs(&[Id::of_bytes(b"p1")].into_iter().collect());
        assert!(
            !without.contains(&Id::of_bytes(&[1])),
            "blob 1 was only in p1"
        );
        assert!(without.contains(&Id::of_bytes(&[3])));
        assert_eq!(
            without.get(&Id::of_bytes(&[2])).unwrap().0.id,
            Id::of_bytes(b"p2")
        );
    }

    proptest! {
        #[test]
        fn index_files_round_trip_through_json(n in 0usize..50) {
            let file = IndexFile::of(vec![IndexPack {
                    locked_until: None,
                    id: Id::of_bytes(b"p"),
                    kind: BlobKind::Tree,
                    size: 99,
                    blobs: (0..n).map(|i| entry(i as u8, i as u32 * 10)).collect(),
                }]);
            let json = serde_json::to_vec(&file).unwrap();
            prop_assert_eq!(serde_json::from_slice::<IndexFile>(&json).unwrap(), file);
        }
    }
}
