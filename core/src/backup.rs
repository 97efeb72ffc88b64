//! The backup engine: walk, chunk, dedup, compress, pack, encrypt, upload,
//! then commit a snapshot.
//!
//! Shape: the calling thread walks the file system in name order and builds
//! trees; it hands each regular file that must be read (not unchanged
//! according to the file cache) to a pool of file readers, one per core,
//! which read it, cut it into content-defined chunks (FastCDC) and name each
//! chunk with the keyed BLAKE3 hash. Chunks the repository does not have yet
//! go through a bounded channel to a pool of workers, one per core, which
//! compress them, append them to the open pack of their kind, and whoever
//! fills a pack encrypts and uploads it. A directory's tree is written once
//! its files' answers are in. Bounded channels are the backpressure that
//! keeps memory flat whatever the file sizes; hard-linked files are read by
//! the walker itself, in order, so later links find the content.
//!
//! Commit order is what makes a crash harmless: packs, then index objects
//! (every few packs, so an interrupted run's uploads are found and reused by
//! the next one), then the snapshot, last. Until the snapshot exists nothing
//! refers to the new data, and prune's age floor and grace period keep it
//! safe meanwhile.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::backend::Retention;
use crate::cache::{CacheEntry, FileCache};
use crate::chunker::Chunker;
use crate::error::{Error, Result};
use crate::fsmeta;
use crate::id::Id;
use crate::index::{Index, IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::pack::{BlobEncoder, BlobKind, PackBuilder};
use crate::repo::{pack_key, Repository};
use crate::tree::{Bytes, Node, NodeKind, Snapshot, Summary, Tree, Xattr};

/// Packs per index object written during a backup.
const PACKS_PER_INDEX: usize = 4;

/// What to back up and how.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Paths to back up.
    pub paths: Vec<PathBuf>,
    /// Glob patterns to exclude: without `/` they match a name anywhere,
    /// with `/` the whole absolute path.
    pub excludes: Vec<String>,
    /// Do not cross into other file systems.
    pub one_file_system: bool,
    /// Host name to record (default: this host).
    pub host: Option<String>,
    /// Tags to record.
    pub tags: Vec<String>,
    /// Where the file cache lives; `None` disables it.
    pub cache_dir: Option<PathBuf>,
}

/// Live counters a progress display can poll.
#[derive(Debug, Default)]
pub struct Progress {
    /// Entries processed.
    pub files: AtomicU64,
    /// Bytes read from files (or stdin).
    pub bytes_read: AtomicU64,
    /// Bytes of files skipped thanks to the cache.
    pub bytes_cached: AtomicU64,
    /// Bytes stored after compression.
    pub bytes_stored: AtomicU64,
    /// Set it to stop the backup at the next safe point (the next file or
    /// chunk): it then returns [`Error::Interrupted`] without a snapshot,
    /// and what it uploaded so far is reused by the next backup.
    pub cancel: std::sync::atomic::AtomicBool,
}

impl Progress {
    fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// The outcome of a backup.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The new snapshot's ID.
    pub snapshot_id: Id,
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Problems that did not stop the backup (unreadable or changing files).
    pub warnings: Vec<String>,
}

/// A source of data for `backup --stdin`.
pub struct StdinSource<'a> {
    /// The data.
    pub reader: Box<dyn Read + 'a>,
    /// File name to store it under.
    pub name: String,
}

/// Backs up `opts.paths` into the repository.
pub fn backup(
    repo: &Repository,
    opts: &BackupOptions,
    progress: &Progress,
) -> Result<BackupReport> {
    if opts.paths.is_empty() {
        return Err(Error::Invalid(
            "nothing to back up: give at least one path".into(),
        ));
    }
    let mut roots = Vec::new();
    for p in &opts.paths {
        roots.push(absolute_path(p)?);
    }
    run(repo, opts, progress, Input::Paths(roots))
}

/// Backs up the bytes of a reader as one file named `source.name`.
pub fn backup_stdin(
    repo: &Repository,
    opts: &BackupOptions,
    progress: &Progress,
    source: StdinSource<'_>,
) -> Result<BackupReport> {
    if !fsmeta::is_safe_name(source.name.as_bytes()) {
        return Err(Error::Invalid(format!(
            "--stdin-filename {:?} must be a plain file name without '/'",
            source.name
        )));
    }
    run(repo, opts, progress, Input::Stdin(source))
}

enum Input<'a> {
    Paths(Vec<PathBuf>),
    Stdin(StdinSource<'a>),
}

/// Makes `p` absolute and lexically normal, resolving symlinks in its parent
/// directories but not in its last component (a symlink given on the command
/// line is backed up as a symlink).
fn absolute_path(p: &Path) -> Result<PathBuf> {
    std::fs::symlink_metadata(p).map_err(|e| Error::io(p, e))?;
    let abs = std::path::absolute(p).map_err(|e| Error::io(p, e))?;
    let mut normal = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    match (normal.parent(), normal.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = std::fs::canonicalize(parent).map_err(|e| Error::io(parent, e))?;
            Ok(parent.join(name))
        }
        _ => Ok(normal),
    }
}

/// Selection of what to back up below the file system root.
enum Sel {
    All,
    Some(BTreeMap<Vec<u8>, Sel>),
}

fn insert_selection(sel: &mut BTreeMap<Vec<u8>, Sel>, comps: &[Vec<u8>]) {
    let Some((first, rest)) = comps.split_first() else {
        return;
    };
    if rest.is_empty() {
        sel.insert(first.clone(), Sel::All);
        return;
    }
    let entry = sel
        .entry(first.clone())
        .or_insert_with(|| Sel::Some(BTreeMap::new()));
    if let Sel::Some(children) = entry {
        insert_selection(children, rest);
    }
}

/// State shared with the compression workers.
struct Shared<'r> {
    repo: &'r Repository,
    /// The Object Lock retention of this backup's packs and index objects.
    retention: Option<Retention>,
    /// The index objects this backup wrote (re-read if its own packs'
    /// locks must be extended at commit).
    index_objects: Mutex<Vec<Id>>,
    packers: Mutex<HashMap<BlobKind, PackBuilder>>,
    unindexed: Mutex<Vec<IndexPack>>,
    written_packs: Mutex<Vec<Id>>,
    /// Hands sealed packs to the upload threads; `None` once they are told
    /// to finish (the last partly filled packs then upload inline).
    uploads: Mutex<Option<Sender<SealedPack>>>,
    error: Mutex<Option<Error>>,
    blobs_added: AtomicU64,
    raw_added: AtomicU64,
    stored_added: AtomicU64,
    /// Data packs open, sealed or uploading. A new one starts only below
    /// `max_data_packs`: otherwise every producing thread could fill and
    /// seal a pack of its own while uploads lag (slow `fsync`, a slow
    /// store), each holding 8 MiB, and peak memory followed the store's
    /// latency.
    data_packs: Mutex<usize>,
    data_pack_done: std::sync::Condvar,
    max_data_packs: usize,
    /// Buffers of uploaded data packs, handed to the next ones: a backup
    /// allocates at most `max_data_packs` pack buffers, so their pages are
    /// faulted in once (the CLI has glibc serve buffers this large with
    /// their own mappings during a backup).
    spare_packs: Mutex<Vec<Vec<u8>>>,
}

impl Shared<'_> {
    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().expect("error slot poisoned");
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn failed(&self) -> bool {
        self.error.lock().expect("error slot poisoned").is_some()
    }

    /// Takes a slot for a new data pack if one is free (or the backup has
    /// failed, when nothing is waited for any more).
    fn try_start_data_pack(&self) -> bool {
        let mut n = self.data_packs.lock().expect("poisoned");
        if *n < self.max_data_packs || self.failed() {
            *n += 1;
            true
        } else {
            false
        }
    }

    /// Waits until a data pack slot may be free.
    fn wait_for_data_pack(&self) {
        let n = self.data_packs.lock().expect("poisoned");
        if *n >= self.max_data_packs && !self.failed() {
            // Woken by an upload's end; the timeout rechecks for failure.
            let _ = self
                .data_pack_done
                .wait_timeout(n, std::time::Duration::from_millis(100));
        }
    }

    fn end_data_pack(&self) {
        *self.data_packs.lock().expect("poisoned") -= 1;
        self.data_pack_done.notify_one();
    }

    /// Seals a full pack (encrypted as it was built) and hands it to an
    /// upload thread (or uploads it here once those have finished).
    fn flush_pack(&self, pack: PackBuilder, progress: &Progress) -> Result<()> {
        let kind = pack.kind();
        // Encrypted as it was built (`PackBuilder::sealed`).
        let (ciphertext, header) = pack.finish();
        let sealed = SealedPack {
            id: Id::of_bytes(&ciphertext),
            kind,
            blobs: header.blobs,
            ciphertext,
        };
        let sender = self.uploads.lock().expect("poisoned").clone();
        match sender {
            Some(tx) => match tx.send(sealed) {
                Ok(()) => Ok(()),
                // The upload threads only stop early after an error, which
                // the caller finds in the error slot.
                Err(returned) => self.upload_pack(returned.into_inner(), progress),
            },
            None => self.upload_pack(sealed, progress),
        }
    }

    /// Stores a sealed pack, then records it for the index; every fourth
    /// pack writes an index object so an interrupted backup leaves its
    /// uploaded packs usable by the next one.
    fn upload_pack(&self, pack: SealedPack, progress: &Progress) -> Result<()> {
        /// Frees the pack's slot however the upload ends.
        struct Slot<'s, 'r>(&'s Shared<'r>);
        impl Drop for Slot<'_, '_> {
            fn drop(&mut self) {
                self.0.end_data_pack();
            }
        }
        let _slot = (pack.kind == BlobKind::Data).then(|| Slot(self));
        let SealedPack {
            id,
            kind,
            blobs,
            ciphertext,
        } = pack;
        let size = ciphertext.len() as u64;
        // Shared, not lent: the store's layers keep a reference instead of
        // a copy of the pack (the timeout layer's request thread did).
        let bytes = bytes::Bytes::from(ciphertext);
        self.repo
            .put_object(&pack_key(&id), bytes.clone(), self.retention.as_ref())?;
        // Back to the pool, unless a layer still holds the bytes (a request
        // thread abandoned past its deadline).
        if kind == BlobKind::Data {
            if let Ok(buf) = bytes.try_into_mut() {
                self.spare_packs.lock().expect("poisoned").push(buf.into());
            }
        }
        progress.bytes_stored.fetch_add(size, Ordering::Relaxed);
        self.written_packs.lock().expect("poisoned").push(id);
        let full = {
            let mut unindexed = self.unindexed.lock().expect("poisoned");
            unindexed.push(IndexPack {
                locked_until: self.retention.map(|r| r.until),
                id,
                kind,
                size,
                blobs,
            });
            if unindexed.len() >= PACKS_PER_INDEX {
                std::mem::take(&mut *unindexed)
            } else {
                Vec::new()
            }
        };
        if !full.is_empty() {
            let ids = save_index(self.repo, full, self.retention.as_ref())?;
            self.index_objects.lock().expect("poisoned").extend(ids);
        }
        Ok(())
    }
}

/// An encrypted pack waiting for upload.
struct SealedPack {
    id: Id,
    kind: BlobKind,
    blobs: Vec<crate::pack::PackEntry>,
    ciphertext: Vec<u8>,
}

/// Uploads sealed packs until the channel closes. The backend's
/// concurrency decides how many of these run: a remote store hides its
/// latency behind several requests in flight, while the compression workers
/// go on with the next pack.
fn uploader(shared: &Shared<'_>, rx: Receiver<SealedPack>, progress: &Progress) {
    for pack in rx {
        if shared.failed() {
            continue;
        }
        if let Err(e) = shared.upload_pack(pack, progress) {
            shared.fail(e);
        }
    }
}

struct Job {
    id: Id,
    kind: BlobKind,
    data: Vec<u8>,
}

fn worker(shared: &Shared<'_>, rx: Receiver<Job>, progress: &Progress) {
    let mut encoder = BlobEncoder::new(shared.repo.config().compression);
    let mut frame = Vec::new();
    for job in rx {
        if shared.failed() {
            continue;
        }
        pack_blob(shared, &mut encoder, &mut frame, job, progress);
    }
}

/// Compresses one blob, appends it to the open pack of its kind, and
/// seals and hands over the pack when it is full. Failures go to the
/// error slot.
fn pack_blob(
    shared: &Shared<'_>,
    encoder: &mut BlobEncoder,
    frame: &mut Vec<u8>,
    job: Job,
    progress: &Progress,
) {
    let pack_size = shared.repo.config().pack_size as usize;
    frame.clear();
    encoder.encode_into(&job.data, frame);
    shared.blobs_added.fetch_add(1, Ordering::Relaxed);
    shared
        .raw_added
        .fetch_add(job.data.len() as u64, Ordering::Relaxed);
    shared
        .stored_added
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    let full = loop {
        let mut packers = shared.packers.lock().expect("packers poisoned");
        if !packers.contains_key(&job.kind) {
            if job.kind == BlobKind::Data && !shared.try_start_data_pack() {
                drop(packers);
                shared.wait_for_data_pack();
                continue;
            }
            // Data packs fill up at once; tree packs are often small, so
            // they grow as needed instead of reserving a whole pack up front.
            let capacity = match job.kind {
                BlobKind::Data => pack_size + pack_size / 8,
                BlobKind::Tree => 256 * 1024,
            };
            let spare = match job.kind {
                BlobKind::Data => shared.spare_packs.lock().expect("poisoned").pop(),
                BlobKind::Tree => None,
            };
            let pack = PackBuilder::sealed_into(
                job.kind,
                shared.repo.recipients(),
                spare.unwrap_or_default(),
                capacity,
            );
            packers.insert(job.kind, pack);
        }
        let pb = packers.get_mut(&job.kind).expect("just made sure");
        pb.add(job.id, job.data.len() as u32, frame);
        break if pb.len() >= pack_size {
            packers.remove(&job.kind)
        } else {
            None
        };
    };
    if let Some(pack) = full {
        if let Err(e) = shared.flush_pack(pack, progress) {
            shared.fail(e);
        }
    }
}

/// Blobs up to this size (every file below the default chunker minimum,
/// and trees) are compressed by the thread that produced them instead of going
/// through the compression workers: for the many small files of a typical
/// tree, the hand-over cost more (two context switches per file) than the
/// compression itself. Chunks of larger files still go to the workers, so
/// one big file is compressed on every core.
const INLINE_BLOB_MAX: usize = 512 * 1024;

thread_local! {
    /// The encoder (with its zstd level) and frame buffer of a thread that
    /// compresses small blobs itself.
    static INLINE_ENCODER: std::cell::RefCell<Option<(i32, BlobEncoder, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Compiled exclude patterns.
struct Excludes {
    names: globset::GlobSet,
    paths: globset::GlobSet,
}

impl Excludes {
    fn new(patterns: &[String]) -> Result<Excludes> {
        let mut names = globset::GlobSetBuilder::new();
        let mut paths = globset::GlobSetBuilder::new();
        for p in patterns {
            let glob = globset::GlobBuilder::new(p.trim_end_matches('/'))
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| Error::Invalid(format!("exclude pattern {p:?}: {e}")))?;
            if p.trim_end_matches('/').contains('/') {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        let build = |b: globset::GlobSetBuilder| {
            b.build()
                .map_err(|e| Error::Invalid(format!("exclude patterns: {e}")))
        };
        Ok(Excludes {
            names: build(names)?,
            paths: build(paths)?,
        })
    }

    fn excluded(&self, path: &Path, name: &[u8]) -> bool {
        (!self.names.is_empty() && self.names.is_match(fsmeta::os(name)))
            || (!self.paths.is_empty() && self.paths.is_match(path))
    }
}

/// What the walker and the file readers share to store blobs: the dedup
/// state and the channel to the compression workers.
struct Storer<'a, 'r> {
    repo: &'r Repository,
    index: &'a Index,
    seen: Mutex<HashSet<Id>>,
    reused_packs: Mutex<HashSet<u32>>,
    tx: Mutex<Option<Sender<Job>>>,
    shared: &'a Shared<'r>,
    progress: &'a Progress,
    seed: u64,
}

impl Storer<'_, '_> {
    fn check_workers(&self) -> Result<()> {
        if let Some(e) = self.shared.error.lock().expect("poisoned").take() {
            return Err(e);
        }
        Ok(())
    }

    /// Names a blob and queues it for storage unless the repository (or this
    /// backup) already has it.
    fn store_blob(&self, kind: BlobKind, data: Vec<u8>) -> Result<Id> {
        let id = self.repo.ids().id_for(kind, &data);
        self.store_named(id, kind, data)?;
        Ok(id)
    }

    fn store_named(&self, id: Id, kind: BlobKind, data: Vec<u8>) -> Result<()> {
        self.progress.check_cancel()?;
        if let Some((_, loc)) = self.index.get(&id) {
            self.reused_packs.lock().expect("poisoned").insert(loc.pack);
            return Ok(());
        }
        if !self.seen.lock().expect("poisoned").insert(id) {
            return Ok(());
        }
        if data.len() <= INLINE_BLOB_MAX {
            let level = self.repo.config().compression;
            INLINE_ENCODER.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().is_none_or(|(l, _, _)| *l != level) {
                    *slot = Some((level, BlobEncoder::new(level), Vec::new()));
                }
                let (_, encoder, frame) = slot.as_mut().expect("just set");
                let job = Job { id, kind, data };
                pack_blob(self.shared, encoder, frame, job, self.progress);
            });
            return self.check_workers();
        }
        let tx = self.tx.lock().expect("poisoned").clone();
        match tx {
            Some(tx) if tx.send(Job { id, kind, data }).is_ok() => Ok(()),
            _ => {
                self.check_workers()?;
                Err(Error::Invalid("backup workers stopped unexpectedly".into()))
            }
        }
    }

    /// Closes the channel so the compression workers drain and exit.
    fn close(&self) {
        self.tx.lock().expect("poisoned").take();
    }

    /// Reads and chunks a stream, storing its chunks; returns their IDs.
    fn store_stream(
        &self,
        reader: impl Read,
        size_hint: u64,
    ) -> std::io::Result<Result<(Vec<Id>, u64)>> {
        let p = self.repo.config().chunker;
        if size_hint < p.min as u64 {
            // Small files are one chunk whatever the chunker says; read them
            // directly instead of through an 8 MiB chunker buffer.
            let mut data = Vec::with_capacity(size_hint as usize + 1);
            let mut reader = reader;
            reader.read_to_end(&mut data)?;
            if data.len() < p.min as usize {
                let mut ids = Vec::new();
                let total = data.len() as u64;
                self.progress.bytes_read.fetch_add(total, Ordering::Relaxed);
                if !data.is_empty() {
                    match self.store_blob(BlobKind::Data, data) {
                        Ok(id) => ids.push(id),
                        Err(e) => return Ok(Err(e)),
                    }
                }
                return Ok(Ok((ids, total)));
            }
            // The file grew past the chunker minimum while we read it.
            return self.store_chunks(std::io::Cursor::new(data));
        }
        self.store_chunks(reader)
    }

    fn store_chunks(&self, reader: impl Read) -> std::io::Result<Result<(Vec<Id>, u64)>> {
        thread_local! {
            /// The chunker's buffer (the maximum chunk size), kept for the
            /// thread's next file rather than allocated and faulted in anew.
            static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let buf = BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
        let mut chunker = Chunker::with_buffer(reader, self.repo.config().chunker, self.seed, buf);
        let mut ids = Vec::new();
        let mut total = 0u64;
        let result = (|| {
            for chunk in chunker.by_ref() {
                let chunk = chunk?;
                let len = chunk.len() as u64;
                total += len;
                self.progress.bytes_read.fetch_add(len, Ordering::Relaxed);
                match self.store_blob(BlobKind::Data, chunk) {
                    Ok(id) => ids.push(id),
                    Err(e) => return Ok(Err(e)),
                }
            }
            Ok(Ok(()))
        })();
        BUFFER.with(|b| *b.borrow_mut() = chunker.into_buffer());
        result.map(|r| r.map(|()| (ids, total)))
    }
}

/// A file read by a file worker.
struct FileRead {
    ids: Vec<Id>,
    size: u64,
    /// Size, mtime or ctime moved while it was read.
    changed: bool,
}

/// Reads one file into the repository. The outer error is fatal (storage);
/// the inner one is a warning about this file (unreadable).
fn read_file(
    storer: &Storer<'_, '_>,
    path: &Path,
    m: &Metadata,
) -> Result<Result<FileRead, String>> {
    let file = match open_noatime(path) {
        Ok(f) => f,
        Err(e) => return Ok(Err(format!("{}: {e}", path.display()))),
    };
    let (ids, size) = match storer.store_stream(&file, m.size()) {
        Ok(r) => r?,
        Err(e) => return Ok(Err(format!("{}: read failed: {e}", path.display()))),
    };
    let after = file.metadata().map_err(|e| Error::io(path, e))?;
    let changed = after.size() != m.size()
        || mtime_ns(&after) != mtime_ns(m)
        || ctime_ns(&after) != ctime_ns(m)
        || size != m.size();
    Ok(Ok(FileRead { ids, size, changed }))
}

/// A file handed to the file workers.
struct FileJob {
    /// The pending directory the file is in, and its place there.
    dir: usize,
    slot: usize,
    path: PathBuf,
    meta: Metadata,
    reply: Sender<FileDone>,
}

/// A file worker's answer.
struct FileDone {
    dir: usize,
    slot: usize,
    result: Result<Result<FileRead, String>>,
}

fn file_worker(storer: &Storer<'_, '_>, rx: Receiver<FileJob>) {
    for job in rx {
        // Every job is answered, even if reading panics: the walker waits
        // for each answer (holding a sender itself, it would not see the
        // channel close).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_file(storer, &job.path, &job.meta)
        }))
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Invalid(format!(
                "{}: reading the file failed unexpectedly (a bug in lifeboat): {why}",
                job.path.display()
            )))
        });
        let _ = job.reply.send(FileDone {
            dir: job.dir,
            slot: job.slot,
            result,
        });
    }
}

/// A file node whose content a file worker is reading.
struct Ticket {
    path: PathBuf,
    meta: Metadata,
    cached: bool,
    /// It had no extended attributes (recorded in the file cache).
    no_xattrs: bool,
}

/// A directory whose tree cannot be stored yet: files of it are still
/// being read, or subdirectories' trees are not stored yet. The walker
/// goes on to the next directory meanwhile (waiting at the end of each
/// directory left the file workers idle while it listed the next one), and
/// the tree is stored as soon as the last of these arrives.
struct Pending {
    /// The directory's entries in name order (`None`: skipped).
    nodes: Vec<Option<Node>>,
    /// Files being read, by slot.
    tickets: HashMap<usize, Ticket>,
    /// Subdirectories whose trees are not stored yet.
    open_dirs: usize,
    /// Every entry has been visited.
    listed: bool,
    /// Where the stored tree goes.
    parent: Parent,
}

/// Who waits for a pending directory.
#[derive(Clone, Copy)]
enum Parent {
    /// The node at `slot` of pending directory `dir` (its `subtree`).
    Dir { dir: usize, slot: usize },
    /// [`Walker::nodes_for`], which takes the nodes themselves.
    Top,
}

/// What a new node still waits for.
enum Waiting {
    Nothing,
    /// Its content, from a file worker.
    File(Box<Ticket>),
    /// Its subtree: the pending directory's tree.
    Dir,
}

/// The walker: everything the calling thread owns during a backup.
struct Walker<'a, 'r> {
    storer: &'a Storer<'a, 'r>,
    files: Option<Sender<FileJob>>,
    cache: Option<FileCache>,
    excludes: Excludes,
    one_file_system: bool,
    summary: Summary,
    warnings: Vec<String>,
    hardlinks: HashMap<(u64, u64), Vec<Id>>,
    progress: &'a Progress,
    started: std::time::SystemTime,
    /// Directories whose trees are not stored yet, by number.
    pending: HashMap<usize, Pending>,
    next_dir: usize,
    /// The file workers' answers, for every pending directory.
    replies: (Sender<FileDone>, Receiver<FileDone>),
    /// The nodes of the finished [`Parent::Top`] directory.
    top: Option<Vec<Node>>,
}

fn mtime_ns(m: &Metadata) -> i64 {
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

fn ctime_ns(m: &Metadata) -> i64 {
    m.ctime() * 1_000_000_000 + m.ctime_nsec()
}

impl<'a, 'r> Walker<'a, 'r> {
    fn check_workers(&self) -> Result<()> {
        self.storer.check_workers()
    }

    fn warn(&mut self, msg: String) {
        self.summary.errors += 1;
        self.warnings.push(msg);
    }

    fn store_blob(&mut self, kind: BlobKind, data: Vec<u8>) -> Result<Id> {
        self.storer.store_blob(kind, data)
    }

    fn base_node(&self, name: &[u8], kind: NodeKind, m: &Metadata) -> Node {
        Node {
            name: Bytes(name.to_vec()),
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            user: fsmeta::user_name(m.uid()),
            group: fsmeta::group_name(m.gid()),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            size: 0,
            content: Vec::new(),
            subtree: None,
            target: None,
            rdev: None,
            hardlink: None,
            sparse: false,
            xattrs: Vec::new(),
        }
    }

    fn xattrs(&mut self, path: &Path) -> Vec<Xattr> {
        match fsmeta::read_xattrs(path) {
            Ok(list) => list
                .into_iter()
                .map(|(n, v)| Xattr {
                    name: Bytes(n),
                    value: Bytes(v),
                })
                .collect(),
            Err(e) => {
                self.warn(format!(
                    "{}: cannot read extended attributes: {e}",
                    path.display()
                ));
                Vec::new()
            }
        }
    }

    /// Builds the node for one entry, at `slot` of pending directory `dir`;
    /// `None` when it is skipped. A regular file that must be read is
    /// handed to the file workers: its node comes back with a [`Ticket`]
    /// and gets its content in [`Walker::answer`]. A subdirectory whose tree
    /// waits for files gets its subtree in [`Walker::finish`].
    fn node(&mut self, child: &Child, dir: usize, slot: usize) -> Result<Option<(Node, Waiting)>> {
        let (path, name, root_dev) = (child.path.as_path(), child.name.as_slice(), child.root_dev);
        self.check_workers()?;
        self.progress.check_cancel()?;
        // From the directory's open handle where there is one: only the
        // last name is looked up, not every component of the path.
        let m = match child
            .entry
            .as_ref()
            .map_or_else(|| std::fs::symlink_metadata(path), |e| e.metadata())
        {
            Ok(m) => m,
            Err(e) => {
                self.warn(format!("{}: {e}", path.display()));
                return Ok(None);
            }
        };
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        let ft = m.file_type();
        let mut node;
        let mut waiting = Waiting::Nothing;
        if ft.is_dir() {
            node = self.base_node(name, NodeKind::Dir, &m);
            self.summary.dirs += 1;
            if self.one_file_system && m.dev() != root_dev {
                let tree = Tree::default();
                node.subtree = Some(self.store_blob(BlobKind::Tree, tree.to_bytes())?);
            } else {
                let sub = self.open_dir(Parent::Dir { dir, slot });
                let children = self.children(path, root_dev);
                self.walk(sub, children)?;
                match self.seal(sub)? {
                    Some(id) => node.subtree = Some(id),
                    None => waiting = Waiting::Dir,
                }
            }
        } else if ft.is_file() {
            node = self.base_node(name, NodeKind::File, &m);
            node.sparse = m.blocks() * 512 < m.size() && m.size() > 0;
            if m.nlink() > 1 {
                node.hardlink = Some((m.dev(), m.ino()));
            }
            let cached = self.cached_content(path, &m)?;
            node.xattrs = match cached {
                Cached::Hit {
                    no_xattrs: true, ..
                } => Vec::new(),
                _ => self.xattrs(path),
            };
            let no_xattrs = node.xattrs.is_empty();
            match cached {
                Cached::Hit { content, .. } => {
                    node.content = content;
                    node.size = m.size();
                    self.summary.total_bytes += node.size;
                }
                Cached::Miss { cached } if m.nlink() > 1 => {
                    // Hard-linked files are read here, in order, so that the
                    // next link to the same inode finds the content.
                    let result = read_file(self.storer, path, &m);
                    match self.finish_read(path, &m, cached, no_xattrs, result)? {
                        Some((content, size)) => {
                            node.content = content;
                            node.size = size;
                        }
                        None => return Ok(None),
                    }
                }
                Cached::Miss { cached } => {
                    let job = FileJob {
                        dir,
                        slot,
                        path: path.to_path_buf(),
                        meta: m.clone(),
                        reply: self.replies.0.clone(),
                    };
                    let files = self.files.as_ref().expect("file workers run while walking");
                    if files.send(job).is_err() {
                        return Err(Error::Invalid(
                            "backup file readers stopped unexpectedly".into(),
                        ));
                    }
                    waiting = Waiting::File(Box::new(Ticket {
                        path: path.to_path_buf(),
                        meta: m.clone(),
                        cached,
                        no_xattrs,
                    }));
                }
            }
        } else if ft.is_symlink() {
            node = self.base_node(name, NodeKind::Symlink, &m);
            match std::fs::read_link(path) {
                Ok(t) => node.target = Some(Bytes(t.as_os_str().as_bytes().to_vec())),
                Err(e) => {
                    self.warn(format!("{}: cannot read symlink: {e}", path.display()));
                    return Ok(None);
                }
            }
            self.summary.others += 1;
        } else {
            let kind = if ft.is_fifo() {
                NodeKind::Fifo
            } else if ft.is_char_device() {
                NodeKind::Chardev
            } else if ft.is_block_device() {
                NodeKind::Blockdev
            } else {
                NodeKind::Socket
            };
            node = self.base_node(name, kind, &m);
            if matches!(kind, NodeKind::Chardev | NodeKind::Blockdev) {
                node.rdev = Some(m.rdev());
            }
            self.summary.others += 1;
        }
        if !ft.is_file() {
            node.xattrs = self.xattrs(path);
        }
        Ok(Some((node, waiting)))
    }

    /// The content of a regular file from the cache (or from an earlier
    /// hard link to it), when it is unchanged.
    fn cached_content(&mut self, path: &Path, m: &Metadata) -> Result<Cached> {
        if m.nlink() > 1 {
            if let Some(ids) = self.hardlinks.get(&(m.dev(), m.ino())) {
                self.summary.files_unmodified += 1;
                return Ok(Cached::Hit {
                    content: ids.clone(),
                    no_xattrs: false,
                });
            }
        }
        let cached = match &self.cache {
            Some(c) => c.lookup(path.as_os_str().as_bytes())?,
            None => None,
        };
        let Some(entry) = cached else {
            return Ok(Cached::Miss { cached: false });
        };
        let index = self.storer.index;
        let unchanged = entry.size == m.size()
            && entry.mtime_ns == mtime_ns(m)
            && entry.ctime_ns == ctime_ns(m)
            && entry.inode == m.ino();
        // Trusted only if every blob is still in the repository.
        let packs: Option<Vec<u32>> = if unchanged {
            entry
                .content
                .iter()
                .map(|id| index.get(id).map(|(_, loc)| loc.pack))
                .collect()
        } else {
            None
        };
        if let Some(packs) = packs {
            self.storer
                .reused_packs
                .lock()
                .expect("poisoned")
                .extend(packs);
            self.summary.files_unmodified += 1;
            self.progress
                .bytes_cached
                .fetch_add(m.size(), Ordering::Relaxed);
            if m.nlink() > 1 {
                self.hardlinks
                    .insert((m.dev(), m.ino()), entry.content.clone());
            }
            return Ok(Cached::Hit {
                content: entry.content,
                no_xattrs: entry.no_xattrs,
            });
        }
        Ok(Cached::Miss { cached: true })
    }

    /// Books a file read: counts, warnings, the cache entry. Returns its
    /// content, or `None` when it could not be read (a warning).
    fn finish_read(
        &mut self,
        path: &Path,
        m: &Metadata,
        cached: bool,
        no_xattrs: bool,
        result: Result<Result<FileRead, String>>,
    ) -> Result<Option<(Vec<Id>, u64)>> {
        let read = match result? {
            Ok(read) => read,
            Err(warning) => {
                self.warn(warning);
                return Ok(None);
            }
        };
        self.summary.bytes_read += read.size;
        self.summary.total_bytes += read.size;
        if cached {
            self.summary.files_changed += 1;
        } else {
            self.summary.files_new += 1;
        }
        if read.changed {
            // Reported, not fatal: the snapshot holds what was read.
            self.warnings.push(format!(
                "{}: file changed while being read; the snapshot holds the bytes read",
                path.display()
            ));
        } else if let Some(cache) = &self.cache {
            // A file modified within the last seconds could change again
            // without its mtime moving (coarse timestamps); leave it uncached.
            let racy = std::time::Duration::from_secs(2);
            let recent = |ns: i64| {
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
                t + racy > self.started
            };
            if !recent(mtime_ns(m)) && !recent(ctime_ns(m)) {
                cache.record(
                    path.as_os_str().as_bytes(),
                    &CacheEntry {
                        size: read.size,
                        mtime_ns: mtime_ns(m),
                        ctime_ns: ctime_ns(m),
                        inode: m.ino(),
                        content: read.ids.clone(),
                        no_xattrs,
                    },
                )?;
            }
        }
        if m.nlink() > 1 {
            self.hardlinks.insert((m.dev(), m.ino()), read.ids.clone());
        }
        Ok(Some((read.ids, read.size)))
    }

    /// Starts a pending directory.
    fn open_dir(&mut self, parent: Parent) -> usize {
        let dir = self.next_dir;
        self.next_dir += 1;
        self.pending.insert(
            dir,
            Pending {
                nodes: Vec::new(),
                tickets: HashMap::new(),
                open_dirs: 0,
                listed: false,
                parent,
            },
        );
        dir
    }

    fn pending(&mut self, dir: usize) -> &mut Pending {
        self.pending.get_mut(&dir).expect("a pending directory")
    }

    /// Visits `children` into pending directory `dir`, booking the file
    /// workers' answers as they come.
    fn walk(&mut self, dir: usize, children: Vec<Child>) -> Result<()> {
        for child in children {
            let slot = self.pending(dir).nodes.len();
            let Some((node, waiting)) = self.node(&child, dir, slot)? else {
                continue;
            };
            let p = self.pending(dir);
            p.nodes.push(Some(node));
            match waiting {
                Waiting::Nothing => {}
                Waiting::File(t) => {
                    p.tickets.insert(slot, *t);
                }
                Waiting::Dir => p.open_dirs += 1,
            }
            while let Ok(done) = self.replies.1.try_recv() {
                self.answer(done)?;
            }
        }
        Ok(())
    }

    /// Marks pending directory `dir` fully visited. When nothing is
    /// outstanding it is done at once: a subdirectory's tree is stored and
    /// its ID returned (the caller places it), a [`Parent::Top`]'s nodes go
    /// to `top` (and `None` is returned). Otherwise `None`, and
    /// [`Walker::finish`] completes it later.
    fn seal(&mut self, dir: usize) -> Result<Option<Id>> {
        self.pending(dir).listed = true;
        let Some((parent, nodes)) = self.take_if_done(dir) else {
            return Ok(None);
        };
        match parent {
            Parent::Top => {
                self.top = Some(nodes);
                Ok(None)
            }
            Parent::Dir { .. } => Ok(Some(
                self.store_blob(BlobKind::Tree, Tree { nodes }.to_bytes())?,
            )),
        }
    }

    /// Removes pending directory `dir` once it is sealed and waits for
    /// nothing; returns who waits for it and its nodes.
    fn take_if_done(&mut self, dir: usize) -> Option<(Parent, Vec<Node>)> {
        let p = self.pending(dir);
        if !p.listed || !p.tickets.is_empty() || p.open_dirs > 0 {
            return None;
        }
        let p = self.pending.remove(&dir).expect("a pending directory");
        Some((p.parent, p.nodes.into_iter().flatten().collect()))
    }

    /// Books a file worker's answer into its node.
    fn answer(&mut self, done: FileDone) -> Result<()> {
        let Some(t) = self.pending(done.dir).tickets.remove(&done.slot) else {
            return Ok(());
        };
        let read = self.finish_read(&t.path, &t.meta, t.cached, t.no_xattrs, done.result)?;
        let nodes = &mut self.pending(done.dir).nodes;
        match read {
            Some((content, size)) => {
                if let Some(node) = nodes[done.slot].as_mut() {
                    node.content = content;
                    node.size = size;
                }
            }
            None => nodes[done.slot] = None,
        }
        self.finish(done.dir)
    }

    /// Stores the tree of `dir` if it was sealed and nothing is outstanding,
    /// then does the same for its parent, which it completes.
    fn finish(&mut self, mut dir: usize) -> Result<()> {
        loop {
            let Some((parent, nodes)) = self.take_if_done(dir) else {
                return Ok(());
            };
            let Parent::Dir { dir: up, slot } = parent else {
                self.top = Some(nodes);
                return Ok(());
            };
            let id = self.store_blob(BlobKind::Tree, Tree { nodes }.to_bytes())?;
            let parent = self.pending(up);
            if let Some(node) = parent.nodes[slot].as_mut() {
                node.subtree = Some(id);
            }
            parent.open_dirs -= 1;
            dir = up;
        }
    }

    /// Builds nodes for `children` of one directory, walking everything
    /// below them and reading files in parallel; returns when all of it is
    /// stored.
    fn nodes_for(&mut self, children: Vec<Child>) -> Result<Vec<Node>> {
        let dir = self.open_dir(Parent::Top);
        self.walk(dir, children)?;
        self.seal(dir)?;
        while self.top.is_none() {
            let done =
                self.replies.1.recv().map_err(|_| {
                    Error::Invalid("backup file readers stopped unexpectedly".into())
                })?;
            self.answer(done)?;
        }
        Ok(self.top.take().expect("just finished"))
    }

    /// The entries of a directory to visit, in name order, without
    /// excluded ones.
    fn children(&mut self, path: &Path, root_dev: u64) -> Vec<Child> {
        let mut names: Vec<(Vec<u8>, std::fs::DirEntry)> = match std::fs::read_dir(path) {
            Ok(rd) => {
                let mut names = Vec::new();
                for entry in rd {
                    match entry {
                        Ok(e) => names.push((e.file_name().as_bytes().to_vec(), e)),
                        Err(e) => {
                            self.warn(format!("{}: {e}", path.display()));
                            break;
                        }
                    }
                }
                names
            }
            Err(e) => {
                self.warn(format!("{}: cannot list directory: {e}", path.display()));
                Vec::new()
            }
        };
        names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // A listed entry keeps its directory open until it is visited, so
        // the walk holds one descriptor per level above it; deeper than
        // this, entries are dropped and stat'ed by path instead. So are
        // entries whose path is too long for the kernel: stat'ed relative
        // to their directory they would be found, but not listed, read or
        // restored, so they are skipped with a warning as before.
        let keep = path.components().count() <= MAX_OPEN_LEVELS;
        let mut children = Vec::with_capacity(names.len());
        for (name, entry) in names {
            let child = path.join(fsmeta::os(&name));
            if self.excludes.excluded(&child, &name) {
                continue;
            }
            children.push(Child {
                name,
                entry: (keep && child.as_os_str().len() < libc::PATH_MAX as usize).then_some(entry),
                path: child,
                root_dev,
            });
        }
        children
    }

    /// The tree of a directory and everything below it.
    fn dir_tree(&mut self, path: &Path, root_dev: u64) -> Result<Tree> {
        let children = self.children(path, root_dev);
        Ok(Tree {
            nodes: self.nodes_for(children)?,
        })
    }

    /// Builds the tree of the selected paths below `dir`.
    fn selected_tree(&mut self, dir: &Path, sel: &BTreeMap<Vec<u8>, Sel>) -> Result<Tree> {
        let mut nodes = Vec::new();
        for (name, child_sel) in sel {
            let path = dir.join(fsmeta::os(name));
            match child_sel {
                Sel::All => {
                    let dev = std::fs::symlink_metadata(&path)
                        .map_err(|e| Error::io(&path, e))?
                        .dev();
                    nodes.extend(self.nodes_for(vec![Child {
                        name: name.clone(),
                        path,
                        root_dev: dev,
                        entry: None,
                    }])?);
                }
                Sel::Some(children) => {
                    let m = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
                    let mut node = self.base_node(name, NodeKind::Dir, &m);
                    node.xattrs = self.xattrs(&path);
                    let tree = self.selected_tree(&path, children)?;
                    node.subtree = Some(self.store_blob(BlobKind::Tree, tree.to_bytes())?);
                    nodes.push(node);
                }
            }
        }
        Ok(Tree { nodes })
    }
}

/// Directory levels (path components) down to which the walk stats
/// entries through their open directory: the descriptors it holds.
pub(crate) const MAX_OPEN_LEVELS: usize = 48;

/// One entry to visit: its name, path and the device of the walk's root,
/// and (when it was listed) its directory entry, which stats it relative
/// to the open directory.
struct Child {
    name: Vec<u8>,
    path: PathBuf,
    root_dev: u64,
    entry: Option<std::fs::DirEntry>,
}

/// What the cache says about a file.
enum Cached {
    /// Unchanged: its blobs, and whether it had no extended attributes
    /// (then not read again: setting one would have moved its ctime).
    Hit { content: Vec<Id>, no_xattrs: bool },
    /// Must be read; `cached` says whether an (outdated) entry existed.
    Miss { cached: bool },
}

/// Opens a file for reading without updating its access time where the
/// kernel allows it (O_NOATIME needs ownership or CAP_FOWNER).
fn open_noatime(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(path),
        other => other,
    }
}

fn run(
    repo: &Repository,
    opts: &BackupOptions,
    progress: &Progress,
    input: Input<'_>,
) -> Result<BackupReport> {
    let started_at = chrono::Utc::now();
    let clock = std::time::Instant::now();
    let excludes = Excludes::new(&opts.excludes)?;
    let host = snapshot_host(repo, opts.host.as_deref())?;
    // Only listings this host may trust: its own, and what a full-key host
    // vouched for. Another host's listing could name blobs it never stored.
    let index = match &opts.cache_dir {
        Some(dir) => repo.load_index_cached(dir)?,
        None => repo.load_dedup_index()?,
    };
    let (plans_seen, condemned) = crate::prune::condemned_packs(repo)?;
    let index = index.without_packs(&condemned);
    let cache = match &opts.cache_dir {
        Some(dir) => Some(FileCache::open(dir, &repo.config().id)?),
        None => None,
    };
    let lock = repo.lock_policy();
    let shared = Shared {
        repo,
        retention: lock.map(|l| l.pack_retention(started_at)),
        index_objects: Mutex::new(Vec::new()),
        packers: Mutex::new(HashMap::new()),
        unindexed: Mutex::new(Vec::new()),
        written_packs: Mutex::new(Vec::new()),
        uploads: Mutex::new(None),
        error: Mutex::new(None),
        blobs_added: AtomicU64::new(0),
        raw_added: AtomicU64::new(0),
        stored_added: AtomicU64::new(0),
        data_packs: Mutex::new(0),
        data_pack_done: std::sync::Condvar::new(),
        // One filling, one sealed and waiting, one per upload thread.
        max_data_packs: repo.backend().concurrency().clamp(1, 64) + 2,
        spare_packs: Mutex::new(Vec::new()),
    };
    let workers = crate::parallel::worker_count();
    let (tx, rx) = bounded::<Job>(workers);
    let (files_tx, files_rx) = bounded::<FileJob>(workers * 4);
    let storer = Storer {
        repo,
        index: &index,
        seen: Mutex::new(HashSet::new()),
        reused_packs: Mutex::new(HashSet::new()),
        tx: Mutex::new(Some(tx)),
        shared: &shared,
        progress,
        seed: chunker_seed(repo.ids()),
    };
    let mut walker = Walker {
        storer: &storer,
        files: Some(files_tx),
        cache,
        excludes,
        one_file_system: opts.one_file_system,
        summary: Summary::default(),
        warnings: Vec::new(),
        hardlinks: HashMap::new(),
        progress,
        started: std::time::SystemTime::now(),
        pending: HashMap::new(),
        next_dir: 0,
        replies: crossbeam_channel::unbounded(),
        top: None,
    };
    // A rendezvous channel: a sealed pack waits in its worker until an
    // upload thread takes it, so memory holds at most one pack per thread.
    let (uploads_tx, uploads_rx) = bounded::<SealedPack>(0);
    *shared.uploads.lock().expect("poisoned") = Some(uploads_tx);
    let upload_threads = repo.backend().concurrency().clamp(1, 64);
    let (paths, root) = std::thread::scope(|s| -> Result<(Vec<String>, Id)> {
        for _ in 0..upload_threads {
            let rx = uploads_rx.clone();
            let shared = &shared;
            s.spawn(move || uploader(shared, rx, progress));
        }
        drop(uploads_rx);
        let compressors: Vec<_> = (0..workers)
            .map(|_| {
                let rx = rx.clone();
                let shared = &shared;
                s.spawn(move || worker(shared, rx, progress))
            })
            .collect();
        drop(rx);
        // File readers: read, chunk and hash files in parallel, feeding the
        // compression workers above.
        for _ in 0..workers {
            let files_rx = files_rx.clone();
            let storer = &storer;
            s.spawn(move || file_worker(storer, files_rx));
        }
        drop(files_rx);
        let result = (|| -> Result<(Vec<String>, Id)> {
            let (paths, tree) = match input {
                Input::Paths(roots) => {
                    let mut sel = BTreeMap::new();
                    for r in &roots {
                        let comps: Vec<Vec<u8>> = r
                            .components()
                            .filter_map(|c| match c {
                                Component::Normal(n) => Some(n.as_bytes().to_vec()),
                                _ => None,
                            })
                            .collect();
                        insert_selection(&mut sel, &comps);
                    }
                    // Backing up "/" itself selects everything: the root
                    // tree is the file system root's listing.
                    let tree = if roots.iter().any(|r| r.parent().is_none()) {
                        let dev = std::fs::symlink_metadata("/")
                            .map_err(|e| Error::io("/", e))?
                            .dev();
                        walker.dir_tree(Path::new("/"), dev)?
                    } else {
                        walker.selected_tree(Path::new("/"), &sel)?
                    };
                    (
                        roots.iter().map(|r| r.display().to_string()).collect(),
                        tree,
                    )
                }
                Input::Stdin(source) => {
                    let (content, size) = storer
                        .store_stream(source.reader, u64::MAX)
                        .map_err(|e| Error::io("stdin", e))??;
                    walker.summary.files_new += 1;
                    walker.summary.bytes_read += size;
                    walker.summary.total_bytes += size;
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    let uid = fsmeta::euid();
                    // SAFETY: getegid cannot fail.
                    let gid = unsafe { libc::getegid() };
                    let node = Node {
                        name: Bytes(source.name.clone().into_bytes()),
                        kind: NodeKind::File,
                        mode: 0o600,
                        uid,
                        gid,
                        user: fsmeta::user_name(uid),
                        group: fsmeta::group_name(gid),
                        mtime: now.as_secs() as i64,
                        mtime_nsec: now.subsec_nanos(),
                        size,
                        content,
                        subtree: None,
                        target: None,
                        rdev: None,
                        hardlink: None,
                        sparse: false,
                        xattrs: Vec::new(),
                    };
                    (
                        vec![format!("/{}", source.name)],
                        Tree { nodes: vec![node] },
                    )
                }
            };
            let root = walker.store_blob(BlobKind::Tree, tree.to_bytes())?;
            Ok((paths, root))
        })();
        // Closing the channels lets the readers, then the workers, then the
        // upload threads drain and exit.
        walker.files = None;
        storer.close();
        for handle in compressors {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        shared.uploads.lock().expect("poisoned").take();
        result
    })?;
    walker.check_workers()?;
    // Flush the partly filled packs, then the remaining index entries.
    let leftovers: Vec<PackBuilder> = shared
        .packers
        .lock()
        .expect("poisoned")
        .drain()
        .map(|(_, p)| p)
        .collect();
    for pack in leftovers.into_iter().filter(|p| !p.is_empty()) {
        shared.flush_pack(pack, progress)?;
    }
    let rest = std::mem::take(&mut *shared.unindexed.lock().expect("poisoned"));
    if !rest.is_empty() {
        let ids = save_index(repo, rest, shared.retention.as_ref())?;
        shared.index_objects.lock().expect("poisoned").extend(ids);
    }
    // A prune that started after us may have condemned packs we reused; if
    // so, committing would reference data about to be deleted.
    let reused_packs = storer.reused_packs.lock().expect("poisoned").clone();
    let mut depends_on: HashSet<Id> = reused_packs.iter().map(|&pos| index.pack(pos).id).collect();
    depends_on.extend(
        shared
            .written_packs
            .lock()
            .expect("poisoned")
            .iter()
            .copied(),
    );
    crate::prune::check_no_new_condemnation(repo, &plans_seen, &depends_on)?;
    let snapshot_retention = lock.map(|l| l.snapshot_retention(chrono::Utc::now()));
    if let (Some(lock), Some(needed)) = (lock, snapshot_retention) {
        let mut packs = packs_to_extend(&index, &reused_packs, needed.until);
        // A backup that ran longer than half the lock period committed
        // after its own first packs' locks would have ended.
        if shared.retention.is_some_and(|r| r.until < needed.until) {
            for id in shared.index_objects.lock().expect("poisoned").iter() {
                packs.extend(repo.load::<IndexFile>(ObjectKind::Index, id)?.packs);
            }
        }
        extend_locks(repo, packs, lock)?;
    }

    let mut summary = walker.summary.clone();
    summary.blobs_added = shared.blobs_added.load(Ordering::Relaxed);
    summary.bytes_added_raw = shared.raw_added.load(Ordering::Relaxed);
    summary.bytes_added_stored = shared.stored_added.load(Ordering::Relaxed);
    summary.duration_secs = clock.elapsed().as_secs_f64();
    let snapshot = Snapshot {
        version: 1,
        time: started_at,
        host,
        user: fsmeta::username(),
        paths,
        tags: opts.tags.clone(),
        tree: root,
        incomplete: summary.errors > 0,
        summary,
        program: format!("lifeboat {}", env!("CARGO_PKG_VERSION")),
        locked_until: snapshot_retention.map(|r| r.until),
    };
    let snapshot_id =
        repo.save_retained(ObjectKind::Snapshot, &snapshot, snapshot_retention.as_ref())?;
    if let Some(cache) = walker.cache.take() {
        cache.commit()?;
    }
    Ok(BackupReport {
        snapshot_id,
        snapshot,
        warnings: walker.warnings,
    })
}

/// The host a backup's snapshot names: the one a writer credential writes
/// as (asking for another is refused, as its signature would give the lie
/// to the name), else the one asked for, else this machine's name.
fn snapshot_host(repo: &Repository, asked: Option<&str>) -> Result<String> {
    match (repo.identity(), asked) {
        (Some(crate::provenance::Signer::Host(me)), Some(other)) if other != me => {
            Err(Error::Invalid(format!(
                "this writer credential writes as host {me}, so its snapshots cannot name host {other}; export a credential for {other} with `lifeboat key export-writer --host {other}`"
            )))
        }
        (Some(crate::provenance::Signer::Host(me)), _) => Ok(me.clone()),
        (_, Some(asked)) => Ok(asked.to_string()),
        (_, None) => Ok(fsmeta::hostname()),
    }
}

/// Writes index objects listing `packs` (split so that each fits every
/// reader's limit), with `retention`; returns their IDs.
pub(crate) fn save_index(
    repo: &Repository,
    packs: Vec<IndexPack>,
    retention: Option<&Retention>,
) -> Result<Vec<Id>> {
    IndexFile::split(packs, None)
        .iter()
        .map(|file| repo.save_retained(ObjectKind::Index, file, retention))
        .collect()
}

/// The FastCDC gear seed, derived from the chunk key so that chunk
/// boundaries (and so blob sizes) do not fingerprint known files.
pub(crate) fn chunker_seed(key: &crate::crypto::ChunkKey) -> u64 {
    let id = key.blob_id(b"lifeboat chunker seed v1");
    u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"))
}

/// The index records of the reused packs whose recorded Object Lock ends
/// before `needed` (the new snapshot's own retention).
pub(crate) fn packs_to_extend(
    index: &crate::index::Index,
    reused: &HashSet<u32>,
    needed: chrono::DateTime<chrono::Utc>,
) -> Vec<IndexPack> {
    let stale: HashSet<u32> = reused
        .iter()
        .copied()
        .filter(|&pos| index.pack(pos).locked_until.is_none_or(|u| u < needed))
        .collect();
    if stale.is_empty() {
        return Vec::new();
    }
    index.index_packs(&stale)
}

/// Extends the Object Lock of `packs` so a locked snapshot never depends
/// on a pack that could already be deleted. The extension goes to a full
/// pack retention from now (half as long again as a snapshot's), so a
/// pack is extended about once per `days / 2` however often it is reused.
/// The new dates are recorded first, in index objects retained as long,
/// then the store's retention is extended: a failure in between leaves the
/// index claiming a longer lock than the store holds, which only makes
/// prune keep the packs longer.
pub(crate) fn extend_locks(
    repo: &Repository,
    mut packs: Vec<IndexPack>,
    lock: crate::repo::LockPolicy,
) -> Result<()> {
    if packs.is_empty() {
        return Ok(());
    }
    let retention = lock.pack_retention(chrono::Utc::now());
    for p in &mut packs {
        p.locked_until = Some(retention.until);
    }
    save_index(repo, packs.clone(), Some(&retention))?;
    let extended = crate::parallel::map(
        packs.iter().map(|p| p.id).collect(),
        crate::parallel::io_threads(repo.backend()),
        |id: Id| repo.backend().extend_retention(&pack_key(&id), &retention),
    );
    for r in extended {
        r?;
    }
    log::info!(
        "extended the Object Lock of {} pack(s) to {}",
        packs.len(),
        retention.until
    );
    Ok(())
}
