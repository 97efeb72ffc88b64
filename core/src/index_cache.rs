//! The index cache file: the merged blob index of one repository, kept on
//! local disk in the form lookups use, so that a backup maps it instead of
//! downloading, parsing and holding every index object in memory.
//!
//! `<cache dir>/<repository ID>/index.bin` holds, little-endian:
//!
//! | part | size |
//! |---|---|
//! | magic `LBIDX002`, then the number of covered index objects, of left-out ones, of packs and of records (u64 each) | 40 |
//! | the IDs of the index objects it was built from, sorted | 32 each |
//! | the IDs of the index objects read and left out (listings this host may not dedup against), sorted | 32 each |
//! | packs: ID, stored size (u64), lock end (i64 seconds, u32 nanoseconds, u8 set), kind (u8), 2 zero bytes | 56 each |
//! | records: blob ID, pack position, offset, frame length, plaintext length (u32 each), sorted and unique | 48 each |
//! | bucket table: first record of each 16-bit ID prefix, and the record count | 4 × 65,537 |
//! | keyed BLAKE3 of the repository ID and everything before (a MAC: the key is derived from the repository's chunk key) | 32 |
//!
//! Opening reads the file once, front to back, through a small buffer (page
//! cache, not process memory): it checks the MAC (so neither damage nor
//! someone who can write the cache directory but holds no repository key
//! can plant records that would make a backup skip data), that records are
//! sorted and unique and name known packs, and that the bucket table matches
//! them; only then are the records mapped. A file that fails any check is
//! removed and rebuilt from the repository, so a damaged cache costs time,
//! never a wrong dedup decision. The file is written under a temporary name
//! and renamed, never changed in place (the map relies on that).
//!
//! A cached index is used only while every index object it covers still
//! exists; index objects added since (new backups) are loaded on top of it
//! in memory, and folded into a new file once they are an eighth of it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fsmeta::Mapped;
use crate::id::Id;
use crate::index::{
    decode_record, encode_record, record_key, BlobLocation, BucketCounts, Index, PackInfo, Records,
    Run, BUCKETS, RECORD,
};
use crate::pack::BlobKind;

const MAGIC: &[u8; 8] = b"LBIDX002";
const HEADER: usize = 40;
const PACK: usize = 56;
const TRAILER: usize = 32;
const BUCKET_TABLE: usize = 4 * (BUCKETS + 1);

/// Where the index cache of repository `repo_id` lives under `dir`.
pub(crate) fn path(dir: &Path, repo_id: &str) -> PathBuf {
    dir.join(repo_id).join("index.bin")
}

/// What the MAC key of the index cache is derived for (from the chunk key).
pub(crate) const MAC_PURPOSE: &str = "lifeboat 2026 index cache file v1";

fn hasher(key: &[u8; 32], repo_id: &str) -> blake3::Hasher {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&(repo_id.len() as u64).to_le_bytes());
    h.update(repo_id.as_bytes());
    h
}

/// Opens and verifies the index cache of `repo_id` under `dir`, whose MAC
/// key is `key`. `None` when there is none, or when it cannot be used (a
/// damaged file is removed; the reason is logged).
pub fn open(dir: &Path, repo_id: &str, key: &[u8; 32]) -> Option<Index> {
    let path = path(dir, repo_id);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!(
                "index cache {}: {e}; loading the index from the repository",
                path.display()
            );
            return None;
        }
    };
    match verify(&file, repo_id, key) {
        Ok(index) => Some(index),
        Err(Damage::Io(e)) => {
            log::warn!(
                "index cache {}: {e}; loading the index from the repository",
                path.display()
            );
            None
        }
        Err(Damage::Bad(why)) => {
            log::warn!(
                "index cache {} is damaged ({why}); removing it and loading the index from the repository",
                path.display()
            );
            // Unless another backup has just renamed a new file into place.
            use std::os::unix::fs::MetadataExt;
            let same = |m: std::io::Result<std::fs::Metadata>| m.map(|m| (m.dev(), m.ino())).ok();
            if same(file.metadata()).is_some()
                && same(file.metadata()) == same(std::fs::metadata(&path))
            {
                let _ = std::fs::remove_file(&path);
            }
            None
        }
    }
}

enum Damage {
    Io(std::io::Error),
    Bad(String),
}

impl From<std::io::Error> for Damage {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Damage::Bad("shorter than its header says".into())
        } else {
            Damage::Io(e)
        }
    }
}

/// Reads through a buffer, hashing every byte read.
struct Hashing<R> {
    inner: R,
    hash: blake3::Hasher,
}

impl<R: Read> Hashing<R> {
    fn take(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact(buf)?;
        self.hash.update(buf);
        Ok(())
    }

    fn u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

fn bad<T>(why: impl Into<String>) -> std::result::Result<T, Damage> {
    Err(Damage::Bad(why.into()))
}

fn verify(file: &File, repo_id: &str, key: &[u8; 32]) -> std::result::Result<Index, Damage> {
    use std::io::Seek;
    let size = file.metadata()?.len();
    let mut start = file;
    start.rewind()?;
    let mut r = Hashing {
        inner: BufReader::with_capacity(1 << 20, file),
        hash: hasher(key, repo_id),
    };
    let mut magic = [0u8; 8];
    r.take(&mut magic)?;
    if &magic != MAGIC {
        return bad("not an index cache file of this version");
    }
    let (n_covers, n_excluded, n_packs, n_records) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
    let records_at = ((n_covers as u128 + n_excluded as u128) * 32
        + n_packs as u128 * PACK as u128)
        + HEADER as u128;
    let expected =
        records_at + n_records as u128 * RECORD as u128 + BUCKET_TABLE as u128 + TRAILER as u128;
    if expected != size as u128 || n_records > u32::MAX as u64 || n_packs > u32::MAX as u64 {
        return bad(format!("{size} bytes where its header implies {expected}"));
    }
    let covers = read_ids(&mut r, n_covers)?;
    let excluded = read_ids(&mut r, n_excluded)?;
    let mut packs = Vec::with_capacity(n_packs as usize);
    for _ in 0..n_packs {
        let mut p = [0u8; PACK];
        r.take(&mut p)?;
        packs.push(decode_pack(&p).ok_or_else(|| Damage::Bad("a pack entry is invalid".into()))?);
    }
    // Records, a batch at a time: in order, unique, naming known packs.
    let mut counts = BucketCounts::new();
    let mut prev: Option<(Id, BlobLocation)> = None;
    let mut batch = vec![0u8; RECORD * 4096];
    let mut left = n_records as usize;
    while left > 0 {
        let n = left.min(4096);
        let buf = &mut batch[..n * RECORD];
        r.take(buf)?;
        for raw in buf.chunks_exact(RECORD) {
            let rec = decode_record(raw);
            if rec.1.pack as u64 >= n_packs {
                return bad("a record names a pack the file does not list");
            }
            if prev.is_some_and(|p| record_key(&p) >= record_key(&rec)) {
                return bad("records out of order");
            }
            counts.add(&rec.0);
            prev = Some(rec);
        }
        left -= n;
    }
    let buckets = counts.table();
    let mut table = vec![0u8; BUCKET_TABLE];
    r.take(&mut table)?;
    let matches = table
        .chunks_exact(4)
        .zip(&buckets)
        .all(|(b, &want)| u32::from_le_bytes(b.try_into().expect("4")) == want);
    if !matches {
        return bad("bucket table does not match the records");
    }
    let mut sum = [0u8; 32];
    r.inner.read_exact(&mut sum)?;
    if r.hash.finalize() != blake3::Hash::from_bytes(sum) {
        return bad("MAC mismatch: damaged, or written for another repository or key");
    }
    let records = if n_records == 0 {
        Records::Owned(Vec::new())
    } else {
        Records::Mapped {
            map: Arc::new(Mapped::new(file, size as usize)?),
            start: records_at as usize,
            count: n_records as usize,
        }
    };
    let mut index = Index::from_parts(Run { records, buckets }, packs, covers);
    index.set_excluded(excluded);
    Ok(index)
}

/// Reads `n` sorted, unique object IDs.
fn read_ids<R: Read>(r: &mut Hashing<R>, n: u64) -> std::result::Result<Vec<Id>, Damage> {
    let mut ids = Vec::with_capacity(n.min(1 << 20) as usize);
    for _ in 0..n {
        let mut id = [0u8; 32];
        r.take(&mut id)?;
        if ids.last().is_some_and(|last: &Id| last.0 >= id) {
            return bad("index object list out of order");
        }
        ids.push(Id(id));
    }
    Ok(ids)
}

fn encode_pack(p: &PackInfo, out: &mut Vec<u8>) {
    out.extend_from_slice(&p.id.0);
    out.extend_from_slice(&p.size.to_le_bytes());
    let (secs, nanos, set) = match p.locked_until {
        Some(t) => (t.timestamp(), t.timestamp_subsec_nanos(), 1u8),
        None => (0, 0, 0),
    };
    out.extend_from_slice(&secs.to_le_bytes());
    out.extend_from_slice(&nanos.to_le_bytes());
    out.push(set);
    out.push(match p.kind {
        BlobKind::Data => 0,
        BlobKind::Tree => 1,
    });
    out.extend_from_slice(&[0, 0]);
}

fn decode_pack(p: &[u8; PACK]) -> Option<PackInfo> {
    let secs = i64::from_le_bytes(p[40..48].try_into().ok()?);
    let nanos = u32::from_le_bytes(p[48..52].try_into().ok()?);
    let locked_until = match p[52] {
        0 => None,
        1 => Some(chrono::DateTime::from_timestamp(secs, nanos)?),
        _ => return None,
    };
    let kind = match p[53] {
        0 => BlobKind::Data,
        1 => BlobKind::Tree,
        _ => return None,
    };
    Some(PackInfo {
        id: Id(p[..32].try_into().ok()?),
        size: u64::from_le_bytes(p[32..40].try_into().ok()?),
        locked_until,
        kind,
    })
}

/// Writes `index` (its runs merged, repeats dropped; packs set aside are
/// kept, since setting aside is one backup's view) as the index cache of
/// `repo_id` under `dir` with MAC key `key`, and returns it opened from the
/// new file.
pub fn write(dir: &Path, repo_id: &str, key: &[u8; 32], index: &Index) -> Result<Index> {
    let path = path(dir, repo_id);
    let parent = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    remove_abandoned(parent);
    let temp = parent.join(format!(
        "index.bin.{}-{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = write_to(&temp, repo_id, key, index)
        .map_err(|e| Error::io(&temp, e))
        .and_then(|file| {
            std::fs::rename(&temp, &path).map_err(|e| Error::io(&path, e))?;
            Ok(file)
        });
    let file = match written {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
    };
    verify(&file, repo_id, key).map_err(|d| match d {
        Damage::Io(e) => Error::io(&path, e),
        Damage::Bad(why) => Error::io(
            &path,
            std::io::Error::other(format!(
                "the index cache just written reads back wrong: {why}"
            )),
        ),
    })
}

/// How old a temporary cache file must be before another backup takes it
/// for the leftover of a killed one (writing one takes seconds).
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes temporary index cache files that a killed backup left behind
/// (each can be as large as the index); best effort.
fn remove_abandoned(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("index.bin.") && name.ends_with(".tmp")) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > ABANDONED_AFTER));
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn write_to(temp: &Path, repo_id: &str, key: &[u8; 32], index: &Index) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)?;
    let runs = index.runs();
    // The merged count is known only after merging; count first (a second
    // pass over the runs, without allocating).
    let n_records = merged(runs).count();
    if n_records > u32::MAX as usize {
        return Err(std::io::Error::other("more than 2^32 blob records"));
    }
    let mut w = BufWriter::with_capacity(1 << 20, &file);
    let mut hash = hasher(key, repo_id);
    let mut buf = Vec::with_capacity(1 << 16);
    let mut flush = |buf: &mut Vec<u8>, w: &mut BufWriter<&File>| -> std::io::Result<()> {
        hash.update(buf);
        w.write_all(buf)?;
        buf.clear();
        Ok(())
    };
    buf.extend_from_slice(MAGIC);
    for n in [
        index.covers().len(),
        index.excluded().len(),
        index.packs().len(),
        n_records,
    ] {
        buf.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for id in index.covers().iter().chain(index.excluded()) {
        buf.extend_from_slice(&id.0);
        if buf.len() >= 1 << 15 {
            flush(&mut buf, &mut w)?;
        }
    }
    flush(&mut buf, &mut w)?;
    for p in index.packs() {
        encode_pack(p, &mut buf);
        if buf.len() >= 1 << 15 {
            flush(&mut buf, &mut w)?;
        }
    }
    let mut counts = BucketCounts::new();
    for (id, loc) in merged(runs) {
        counts.add(&id);
        encode_record(&id, &loc, &mut buf);
        if buf.len() >= 1 << 15 {
            flush(&mut buf, &mut w)?;
        }
    }
    for start in counts.table() {
        buf.extend_from_slice(&start.to_le_bytes());
    }
    flush(&mut buf, &mut w)?;
    w.write_all(hash.finalize().as_bytes())?;
    w.flush()?;
    drop(w);
    Ok(file)
}

/// The records of all runs in [`record_key`] order, repeats dropped.
fn merged(runs: &[Run]) -> impl Iterator<Item = (Id, BlobLocation)> + '_ {
    let mut heads: Vec<(usize, Option<(Id, BlobLocation)>)> = runs
        .iter()
        .map(|run| (0, (run.len() > 0).then(|| run.record(0))))
        .collect();
    let mut last: Option<(Id, BlobLocation)> = None;
    std::iter::from_fn(move || loop {
        let (r, _) = heads
            .iter()
            .enumerate()
            .filter_map(|(r, (_, head))| head.as_ref().map(|h| (r, record_key(h))))
            .min_by_key(|(_, key)| *key)?;
        let (i, head) = &mut heads[r];
        let rec = head.take().expect("the smallest head");
        *i += 1;
        if *i < runs[r].len() {
            *head = Some(runs[r].record(*i));
        }
        if last.is_some_and(|l| l == rec) {
            continue;
        }
        last = Some(rec);
        return Some(rec);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{IndexBuilder, IndexFile, IndexPack};
    use crate::pack::PackEntry;

    const KEY: [u8; 32] = [9; 32];

    fn pack(name: &str, kind: BlobKind, blobs: std::ops::Range<u32>) -> IndexPack {
        IndexPack {
            id: Id::of_bytes(name.as_bytes()),
            kind,
            size: 1000 + blobs.start as u64,
            locked_until: None,
            blobs: blobs
                .map(|b| PackEntry {
                    id: Id::of_bytes(&b.to_le_bytes()),
                    offset: b * 10,
                    length: 10,
                    raw_length: 20 + b,
                })
                .collect(),
        }
    }

    /// Three packs (one listed twice, with a lock the second time, and
    /// blob 50 stored in two packs) from two index objects.
    fn sample() -> Index {
        let mut b = IndexBuilder::new();
        let locked = IndexPack {
            locked_until: chrono::DateTime::from_timestamp(2_000_000_000, 7),
            ..pack("p1", BlobKind::Data, 0..60)
        };
        b.add_object(
            Id::of_bytes(b"object 1"),
            &IndexFile::of(vec![
                pack("p1", BlobKind::Data, 0..60),
                pack("t", BlobKind::Tree, 50..80),
            ]),
            0,
        );
        b.add_object(
            Id::of_bytes(b"object 2"),
            &IndexFile::of(vec![locked, pack("p2", BlobKind::Data, 100..3000)]),
            0,
        );
        b.build()
    }

    fn same_lookups(a: &Index, b: &Index) {
        for blob in 0..3100u32 {
            let id = Id::of_bytes(&blob.to_le_bytes());
            let (x, y) = (a.get(&id), b.get(&id));
            assert_eq!(
                x.map(|(p, l)| (p.clone(), l)),
                y.map(|(p, l)| (p.clone(), l))
            );
        }
    }

    #[test]
    fn a_written_index_cache_maps_back_to_the_same_index() {
        let dir = tempfile::tempdir().unwrap();
        let index = sample();
        let written = write(dir.path(), "repo", &KEY, &index).unwrap();
        let opened = open(dir.path(), "repo", &KEY).expect("a valid cache opens");
        for i in [&written, &opened] {
            assert!(
                matches!(
                    i.runs()[..],
                    [Run {
                        records: Records::Mapped { .. },
                        ..
                    }]
                ),
                "records are mapped, not held in memory"
            );
            assert_eq!(i.packs(), index.packs());
            assert_eq!(i.covers(), index.covers());
            assert_eq!(i.len(), index.len());
            same_lookups(i, &index);
        }
        assert_eq!(opened.covers().len(), 2);
        let lock = opened.packs().iter().find(|p| p.id == Id::of_bytes(b"p1"));
        assert_eq!(
            lock.unwrap().locked_until,
            chrono::DateTime::from_timestamp(2_000_000_000, 7),
            "the latest lock survives"
        );
    }

    #[test]
    fn objects_added_on_top_of_a_mapped_index_merge_into_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = write(dir.path(), "repo", &KEY, &sample()).unwrap();
        let mut b = IndexBuilder::over(base, true);
        b.add_object(
            Id::of_bytes(b"object 3"),
            // A new pack, and a lock extension of a mapped one.
            &IndexFile::of(vec![
                pack("p3", BlobKind::Data, 3000..3100),
                IndexPack {
                    locked_until: chrono::DateTime::from_timestamp(2_100_000_000, 0),
                    ..pack("p2", BlobKind::Data, 100..3000)
                },
            ]),
            0,
        );
        let layered = b.build();
        assert_eq!(layered.runs().len(), 2);
        assert!(layered.contains(&Id::of_bytes(&3050u32.to_le_bytes())));
        let folded = write(dir.path(), "repo", &KEY, &layered).unwrap();
        assert_eq!(folded.runs().len(), 1);
        assert_eq!(folded.covers().len(), 3);
        assert_eq!(
            folded.len(),
            60 + 30 + 2900 + 100,
            "repeated listings are stored once"
        );
        same_lookups(&folded, &layered);
        let p2 = folded.packs().iter().find(|p| p.id == Id::of_bytes(b"p2"));
        assert!(p2.unwrap().locked_until.is_some());
    }

    #[test]
    fn a_damaged_byte_anywhere_in_an_index_cache_is_caught_and_the_file_removed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "repo", &KEY, &sample()).unwrap();
        let file = path(dir.path(), "repo");
        let good = std::fs::read(&file).unwrap();
        let records_at = HEADER + 2 * 32 + 3 * PACK;
        // Header, covered objects, packs, a record's ID and its pack
        // position, the bucket table and the checksum.
        let spots = [
            0,
            9,
            HEADER + 3,
            HEADER + 64 + 40,
            records_at + 5,
            records_at + RECORD * 7 + 33,
            good.len() - TRAILER - 100,
            good.len() - 1,
        ];
        for at in spots {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&file, &bad).unwrap();
            assert!(
                open(dir.path(), "repo", &KEY).is_none(),
                "byte {at} flipped"
            );
            assert!(!file.exists(), "the damaged file is removed");
        }
        std::fs::write(&file, &good[..good.len() - 48]).unwrap();
        assert!(open(dir.path(), "repo", &KEY).is_none(), "truncated");
        std::fs::write(&file, &good).unwrap();
        assert!(
            open(dir.path(), "repo", &KEY).is_some(),
            "the intact file still opens"
        );
        std::fs::create_dir_all(dir.path().join("other")).unwrap();
        std::fs::write(path(dir.path(), "other"), &good).unwrap();
        assert!(
            open(dir.path(), "other", &KEY).is_none(),
            "another repository's cache is refused"
        );
        std::fs::write(&file, &good).unwrap();
        assert!(
            open(dir.path(), "repo", &[8; 32]).is_none(),
            "a file whose MAC needs another key is refused"
        );
    }

    #[test]
    fn writing_removes_temporary_files_abandoned_by_a_killed_backup_but_not_fresh_ones() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("repo");
        std::fs::create_dir_all(&sub).unwrap();
        let (old, fresh) = (sub.join("index.bin.1-0.tmp"), sub.join("index.bin.2-0.tmp"));
        for f in [&old, &fresh] {
            std::fs::write(f, b"partial").unwrap();
        }
        let hours_ago = std::time::SystemTime::now() - 2 * ABANDONED_AFTER;
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(hours_ago)
            .unwrap();
        write(dir.path(), "repo", &KEY, &sample()).unwrap();
        assert!(!old.exists(), "the abandoned file is removed");
        assert!(
            fresh.exists(),
            "a file another backup may be writing is kept"
        );
    }

    #[test]
    fn a_checksum_cannot_hide_records_out_of_order() {
        // A file whose checksum matches but whose records are not sorted
        // (a writer bug) would make lookups miss: it is refused.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "repo", &KEY, &sample()).unwrap();
        let file = path(dir.path(), "repo");
        let mut bytes = std::fs::read(&file).unwrap();
        let records_at = HEADER + 2 * 32 + 3 * PACK;
        let (a, b) = (records_at, records_at + RECORD);
        let first: Vec<u8> = bytes[a..b].to_vec();
        bytes.copy_within(b..b + RECORD, a);
        bytes[b..b + RECORD].copy_from_slice(&first);
        let body = bytes.len() - TRAILER;
        let mut h = hasher(&KEY, "repo");
        h.update(&bytes[..body]);
        let sum = *h.finalize().as_bytes();
        bytes[body..].copy_from_slice(&sum);
        std::fs::write(&file, &bytes).unwrap();
        assert!(open(dir.path(), "repo", &KEY).is_none());
    }
}
