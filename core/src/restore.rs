//! The restore engine.
//!
//! The snapshot is walked once, parents before children, and restored in
//! batches of entries, so memory stays the same whatever the snapshot's
//! size. The order keeps a hostile snapshot inside the target: every name
//! was validated when its tree was parsed (no `/`, `.`, `..` or NUL, and
//! unique within its directory); directories are created as real
//! directories when the walk meets them; file data is written to a file
//! without a name (`O_TMPFILE`, for one-blob files) or under a temporary
//! name with `O_NOFOLLOW`, and linked or renamed into place only when
//! complete and carrying its metadata; a batch's symlinks are created after
//! its data, and since names are unique no later path lies below one. A
//! directory gets its metadata once everything below it is written. An
//! existing entry that differs from the snapshot is left alone unless
//! `overwrite` is set.
//!
//! Data is read pack by pack on one thread per core while the walk goes
//! on: each pack is fetched and decrypted once for the batches in flight,
//! and every blob in it is written to every place they need it. A file
//! whose blobs cannot be read is reported and removed; the other files
//! still restore. Files appear under their final names only
//! when complete, so a second run after an interruption finds them, checks
//! each by hashing it against the snapshot (size and mtime alone are not
//! trusted), skips those that match and rewrites only what is missing.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::fsmeta;
use crate::id::Id;
use crate::index::{BlobLocation, Index};
use crate::pack::{FrameDecoder, FrameError};
use crate::repo::Repository;
use crate::repo::{PackRead, PackStream, SalvagedPack};
use crate::tree::{Node, NodeKind};

/// What to restore and how.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Directory to restore into (created if missing).
    pub target: PathBuf,
    /// Only entries matching these globs (and what is below them); all if empty.
    pub includes: Vec<String>,
    /// Skip entries matching these globs (and what is below them).
    pub excludes: Vec<String>,
    /// Report only; write nothing.
    pub dry_run: bool,
    /// Re-read every restored file and check it against the snapshot.
    pub verify: bool,
    /// Replace existing entries that differ from the snapshot.
    pub overwrite: bool,
    /// Set it to stop the restore between packs; it then returns
    /// [`Error::Interrupted`] (drills use this for their time limit).
    pub cancel: Option<std::sync::Arc<AtomicBool>>,
    /// Entries planned and written at a time (0 means [`DEFAULT_BATCH`]).
    /// A restore holds a few batches, so its memory does not grow with the
    /// snapshot; a larger batch rereads fewer packs whose blobs straddle
    /// batches.
    pub batch: usize,
    /// The local cache directory whose copy of the blob index (the file
    /// backups keep there) is mapped instead of loading every index object,
    /// when it holds a valid one. A restore never writes it: on a machine
    /// without one (a disaster recovery) the index is loaded from the
    /// repository as before, with no file to build on the way.
    pub index_cache: Option<PathBuf>,
}

/// Entries a restore plans and writes at a time, unless told otherwise.
pub const DEFAULT_BATCH: usize = 4096;

/// Blob references that also end a batch (a few very large files).
const BATCH_BLOBS: usize = 1 << 16;

/// Open files a pack worker keeps for the next blob of the same file.
const MAX_OPEN_FILES: usize = 64;

/// Batches handed to the pack workers and not yet completed, besides the
/// newest: enough that the workers do not wait for the walk.
const MAX_IN_FLIGHT: usize = 2;

/// One entry that could not be restored.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreFailure {
    /// Path inside the snapshot.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// The outcome of a restore.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    /// Regular files written.
    pub files_restored: u64,
    /// Regular files already correct in the target, left untouched.
    pub files_unchanged: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks, devices, FIFOs and hard links.
    pub others: u64,
    /// File bytes written.
    pub bytes_written: u64,
    /// Total size of the selected files.
    pub bytes_total: u64,
    /// Files checked by `verify`.
    pub files_verified: u64,
    /// Existing entries that differ and were left alone (no `overwrite`).
    pub conflicts: Vec<String>,
    /// Entries that failed.
    pub failures: Vec<RestoreFailure>,
    /// Metadata that could not be applied (e.g. ownership when not root).
    pub warnings: Vec<String>,
    /// Where the time went (drill reports show it).
    pub timings: RestoreTimings,
}

/// Time spent in a restore's phases. The data phase is a pipeline of
/// worker threads, so its parts are reported as thread-seconds summed
/// over the workers: they overlap, and together exceed the phase's wall
/// time when the workers run in parallel.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreTimings {
    /// Loading the index and walking the snapshot up to its first batch
    /// (wall seconds).
    pub plan_secs: f64,
    /// From the first batch on: writing file data, links and special files,
    /// while the walk goes on alongside (wall seconds).
    pub data_secs: f64,
    /// Re-reading restored files against the snapshot (wall seconds).
    pub verify_secs: f64,
    /// Directory metadata, deepest first (wall seconds).
    pub finish_secs: f64,
    /// Worker time reading packs from the store and decrypting them.
    pub fetch_thread_secs: f64,
    /// Worker time decompressing blobs and checking their IDs.
    pub decode_thread_secs: f64,
    /// Worker time writing file data.
    pub write_thread_secs: f64,
}

struct Entry {
    /// Path inside the snapshot, `/`-separated, starting with `/`.
    snap_path: Vec<u8>,
    node: Node,
    /// Nothing was at its place before this restore: a directory this
    /// restore created, or an entry in one. Its place is not looked up
    /// first. (A directory recreated by `--overwrite`, and the first entry
    /// below directories an include selects late, are conservatively not
    /// fresh.)
    fresh: bool,
}

impl Entry {
    fn display(&self) -> String {
        String::from_utf8_lossy(&self.snap_path).into_owned()
    }
    fn rel(&self) -> &Path {
        Path::new(fsmeta::os(&self.snap_path[1..]))
    }
}

struct Filter {
    include: Option<globset::GlobSet>,
    exclude_names: globset::GlobSet,
    exclude_paths: globset::GlobSet,
}

fn glob(p: &str) -> Result<globset::Glob> {
    globset::GlobBuilder::new(p.trim_end_matches('/'))
        .literal_separator(true)
        .build()
        .map_err(|e| Error::Invalid(format!("pattern {p:?}: {e}")))
}

impl Filter {
    fn new(opts: &RestoreOptions) -> Result<Filter> {
        let include = if opts.includes.is_empty() {
            None
        } else {
            let mut b = globset::GlobSetBuilder::new();
            for p in &opts.includes {
                // Patterns are matched against the path in the snapshot; a
                // pattern without a leading `/` matches at any depth.
                let p = if p.starts_with('/') {
                    p.clone()
                } else {
                    format!("**/{p}")
                };
                b.add(glob(&p)?);
            }
            Some(b.build().map_err(|e| Error::Invalid(e.to_string()))?)
        };
        let mut names = globset::GlobSetBuilder::new();
        let mut paths = globset::GlobSetBuilder::new();
        for p in &opts.excludes {
            if p.trim_end_matches('/').contains('/') {
                paths.add(glob(p)?);
            } else {
                names.add(glob(p)?);
            }
        }
        Ok(Filter {
            include,
            exclude_names: names.build().map_err(|e| Error::Invalid(e.to_string()))?,
            exclude_paths: paths.build().map_err(|e| Error::Invalid(e.to_string()))?,
        })
    }

    fn excluded(&self, path: &[u8], name: &[u8]) -> bool {
        self.exclude_names.is_match(fsmeta::os(name))
            || self.exclude_paths.is_match(fsmeta::os(path))
    }
}

/// Whether `p` lies strictly below the directory `dir` (both snapshot paths).
fn is_below(dir: &[u8], p: &[u8]) -> bool {
    p.len() > dir.len() && p.starts_with(dir) && p[dir.len()] == b'/'
}

/// Whether `dir` is the directory holding `p` (both snapshot paths).
fn is_parent(dir: &[u8], p: &[u8]) -> bool {
    is_below(dir, p) && !p[dir.len() + 1..].contains(&b'/')
}

/// A directory on one of the walk's stacks, by its snapshot path.
trait WalkDir {
    fn dir_path(&self) -> &[u8];
}

impl WalkDir for Vec<u8> {
    fn dir_path(&self) -> &[u8] {
        self
    }
}

impl WalkDir for Entry {
    fn dir_path(&self) -> &[u8] {
        &self.snap_path
    }
}

/// Pops the directories the walk has left, deepest first, and hands each
/// to `left`: each stack holds directories on the path to the walk's
/// position `p`, outermost first.
fn leave<T: WalkDir>(stack: &mut Vec<T>, p: &[u8], mut left: impl FnMut(T)) {
    while stack.last().is_some_and(|d| !is_below(d.dir_path(), p)) {
        left(stack.pop().expect("checked above"));
    }
}

/// A restored file that later names may be hard links to.
struct LinkTarget {
    snap_path: Vec<u8>,
    /// Digest of its blob IDs: only a name with the same content is linked.
    content: blake3::Hash,
    /// Whether it was restored or found intact; `None` until its batch is written.
    restored: Option<bool>,
}

fn content_digest(content: &[Id]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for id in content {
        h.update(&id.0);
    }
    h.finalize()
}

/// How the names [`temp_path`] makes begin.
const TEMP_PREFIX: &str = ".lb-restore-";

/// Name of the temporary file a file is written to before it is complete
/// (unless it is nameless). Deterministic, so a rerun reuses or removes a
/// leftover instead of leaving it behind.
fn temp_path(final_path: &Path) -> PathBuf {
    let h = blake3::hash(final_path.as_os_str().as_encoded_bytes());
    let name = format!("{TEMP_PREFIX}{}.tmp", &h.to_hex()[..16]);
    final_path.with_file_name(name)
}

/// True for a name of the form [`temp_path`] makes: a snapshot entry of
/// such a name is refused, so no entry can lie in wait for a file's
/// temporary name (a FIFO there used to hang the restore).
fn is_temp_name(name: &[u8]) -> bool {
    name.starts_with(TEMP_PREFIX.as_bytes()) && name.ends_with(b".tmp")
}

/// An error reaching `path`, with the way out when the path is longer
/// than the kernel takes (`PATH_MAX`): a snapshot path that fitted where
/// it was backed up may not fit below a deep target.
fn explain(path: &Path, err: &std::io::Error) -> String {
    let len = path.as_os_str().len();
    if err.raw_os_error() == Some(libc::ENAMETOOLONG) && len >= libc::PATH_MAX as usize {
        format!(
            "the path {} is {len} bytes, longer than this system allows ({} bytes); \
             restore into a shorter --target",
            if path
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(TEMP_PREFIX.as_bytes()))
            {
                "with its temporary name"
            } else {
                "restored"
            },
            libc::PATH_MAX - 1
        )
    } else {
        err.to_string()
    }
}

/// What a restore has learned about nameless files (`O_TMPFILE`) on its
/// target, so a file system without them costs one failed open, not one
/// per file.
#[derive(Default)]
struct Nameless {
    /// `O_TMPFILE` failed: the file system (or kernel) lacks it.
    unsupported: AtomicBool,
    /// `linkat` with `AT_EMPTY_PATH` was refused (it needs
    /// `CAP_DAC_READ_SEARCH`): link through `/proc/self/fd` instead.
    via_proc: AtomicBool,
}

/// Creates a nameless file in `path`'s directory, or `None` where the file
/// system has no `O_TMPFILE` (the caller then uses a temporary name). It
/// gets the permission bits `mode` (less the umask or a default ACL):
/// nobody can open it before it is placed, and a file created as it will
/// stay needs no `fchmod` (setuid, setgid and sticky bits come later).
fn open_anonymous(path: &Path, mode: u32, nameless: &Nameless) -> Option<File> {
    if nameless.unsupported.load(Ordering::Relaxed) {
        return None;
    }
    let dir = path.parent()?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    // O_NOFOLLOW: a real directory, as the walk checked or made it (a
    // symlinked --target only sends its top-level files the named way).
    // Readable too: should linking fail, its bytes are copied out.
    match OpenOptions::new()
        .read(true)
        .write(true)
        .mode(mode & 0o777)
        .custom_flags(libc::O_TMPFILE | libc::O_NOFOLLOW)
        .open(dir)
    {
        Ok(f) => Some(f),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            nameless.unsupported.store(true, Ordering::Relaxed);
            None
        }
        // Anything else (no space, no permission) shows again, with the
        // file's own name, on the named path.
        Err(_) => None,
    }
}

/// Gives a complete nameless file its metadata (`meta`, which returns its
/// warnings) and its name `path`. An existing `path` is replaced only with
/// `overwrite`, in one step: the file is linked under `temp` and that is
/// renamed over it. A file system that made the file but will not link it
/// (no /proc to link through, ...) gets a copy under `temp`, with the
/// metadata, renamed into place; the rest of the restore then uses names
/// from the start.
fn place_nameless(
    file: &File,
    path: &Path,
    temp: &Path,
    overwrite: bool,
    nameless: &Nameless,
    meta: impl Fn(&File) -> Vec<String>,
) -> std::io::Result<Vec<String>> {
    let warnings = meta(file);
    let linked = match link_fd(file, path, nameless) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && overwrite => {
            // A leftover of an interrupted run may hold the temporary name.
            let _ = std::fs::remove_file(temp);
            link_fd(file, temp, nameless).map(|()| true)
        }
        other => other.map(|()| false),
    };
    match linked {
        Ok(false) => Ok(warnings),
        Ok(true) => match std::fs::rename(temp, path) {
            Ok(()) => Ok(warnings),
            Err(e) => {
                let _ = std::fs::remove_file(temp);
                Err(e)
            }
        },
        // Without `overwrite`, whatever holds the name stays.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        // The name, not the linking, is at fault: later files can still be
        // made nameless (and a name too long for its path would usually be
        // too long with a temporary name too).
        Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => Err(e),
        Err(_) => {
            nameless.unsupported.store(true, Ordering::Relaxed);
            let copy = copy_to_named(file, temp)?;
            let warnings = meta(&copy);
            drop(copy);
            rename_into_place(temp, path, overwrite)?;
            Ok(warnings)
        }
    }
}

/// Copies a nameless file's bytes to a new file at `temp`, in place of
/// any leftover there (holes stay holes where the kernel's copy keeps
/// them).
fn copy_to_named(file: &File, temp: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(temp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut copy = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(temp)?;
    let len = file.metadata()?.len();
    copy.set_len(len)?;
    let mut from = file;
    std::io::Seek::seek(&mut from, std::io::SeekFrom::Start(0))?;
    let copied = std::io::copy(&mut from, &mut copy)?;
    if copied != len {
        return Err(std::io::Error::other(format!(
            "copied {copied} of {len} bytes"
        )));
    }
    Ok(copy)
}

/// Renames a complete file from its temporary name to `path`. Without
/// `overwrite`, an entry that took `path` meanwhile stays (`EEXIST`),
/// where the file system can tell (`RENAME_NOREPLACE`).
fn rename_into_place(temp: &Path, path: &Path, overwrite: bool) -> std::io::Result<()> {
    if !overwrite {
        match fsmeta::rename_noreplace(temp, path) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            other => return other,
        }
    }
    std::fs::rename(temp, path)
}

/// Links an open (nameless) file at `to`: by descriptor where allowed,
/// else through its `/proc/self/fd` entry.
fn link_fd(file: &File, to: &Path, nameless: &Nameless) -> std::io::Result<()> {
    if !nameless.via_proc.load(Ordering::Relaxed) {
        match fsmeta::link_fd(file, to) {
            // Without CAP_DAC_READ_SEARCH older kernels answer ENOENT.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                nameless.via_proc.store(true, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    fsmeta::link_fd_via_proc(file, to)
}

/// Every place one blob goes in a batch: (file job, offset in the file).
type Places = Vec<(usize, u64)>;

/// For one pack: each needed blob, its location, and every place it goes.
type PackPlan = HashMap<Id, BlobPlan>;

/// One blob a pack is read for.
struct BlobPlan {
    loc: BlobLocation,
    places: Places,
    /// Packs whose copy of it failed already (it is being read from
    /// another copy): its pieces are then written whole, zeros too, over
    /// whatever the failed copy left.
    tried: Vec<u32>,
}

struct FileJob {
    entry: usize,
    remaining: AtomicUsize,
    failed: Mutex<Option<String>>,
    /// Whether the file exists yet, and how: it is created by whichever
    /// worker brings the first blob, so a one-blob file costs one open.
    created: Mutex<Created>,
}

/// How a file being restored exists before it is complete.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Created {
    /// Not yet: no blob has reached it.
    No,
    /// Under its temporary name ([`temp_path`]), reopened by that name.
    Named,
    /// Without a name (`O_TMPFILE`): only the handle that created it
    /// reaches it, and [`place_nameless`] gives it its final name.
    Anonymous,
}

/// A batch's files, shared by the walking thread and the pack workers.
struct Batch<'a> {
    opts: &'a RestoreOptions,
    is_root: bool,
    entries: Vec<Entry>,
    jobs: Vec<FileJob>,
    /// Packs not yet written; the batch's data is complete at zero.
    packs_left: AtomicUsize,
    bytes_written: AtomicU64,
    warnings: Mutex<Vec<String>>,
    /// What the restore learned about nameless files on the target.
    nameless: Arc<Nameless>,
}

impl Batch<'_> {
    fn final_path(&self, j: usize) -> PathBuf {
        self.opts
            .target
            .join(self.entries[self.jobs[j].entry].rel())
    }

    /// Opens a job's temporary file, creating it on first use. With
    /// `keep` (the caller holds the handle until the file is finalized), a
    /// one-blob file is created without a name (`O_TMPFILE`): it then
    /// needs no temporary name to be made and renamed away, and an
    /// interrupted restore leaves nothing of it behind.
    fn open_temp(&self, j: usize, keep: bool) -> std::io::Result<File> {
        let job = &self.jobs[j];
        let mut created = job.created.lock().expect("poisoned");
        let node = &self.entries[job.entry].node;
        let path = self.final_path(j);
        if *created == Created::Anonymous {
            // Only the handle that created it reaches it; a caller that
            // does not hold it must not write elsewhere.
            return Err(std::io::Error::other(
                "a nameless temporary file reopened (internal error)",
            ));
        }
        let fresh = *created == Created::No;
        let nameless = if fresh && keep && node.content.len() == 1 {
            open_anonymous(&path, node.mode, &self.nameless)
        } else {
            None
        };
        let (f, how) = match nameless {
            Some(f) => (f, Created::Anonymous),
            None => {
                let mut o = OpenOptions::new();
                // Never follows a link, never blocks on a FIFO, and a
                // fresh file is made anew (a leftover under the name is
                // removed first): the name is predictable, so what holds
                // it must not be trusted.
                o.write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
                if fresh {
                    o.create_new(true).mode(0o600);
                }
                // The temporary name is derived again rather than stored: a
                // path per file held for the whole batch was a tenth of its
                // memory.
                let temp = temp_path(&path);
                if fresh {
                    match std::fs::remove_file(&temp) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(std::io::Error::new(e.kind(), explain(&temp, &e)))
                        }
                        _ => {}
                    }
                }
                let f = o
                    .open(&temp)
                    .map_err(|e| std::io::Error::new(e.kind(), explain(&temp, &e)))?;
                if !f.metadata()?.is_file() {
                    return Err(std::io::Error::other(format!(
                        "{} is not a regular file",
                        temp.display()
                    )));
                }
                (f, Created::Named)
            }
        };
        if fresh && node.sparse {
            // Sparse files get their size up front so skipped zeros stay
            // holes. Should that fail, the file counts as not created.
            f.set_len(node.size)?;
        }
        *created = how;
        Ok(f)
    }

    /// Gives a complete file its metadata and moves it into place, or
    /// removes it if any of its blobs failed.
    fn finalize(&self, j: usize, handle: Option<File>) {
        let job = &self.jobs[j];
        let e = &self.entries[job.entry];
        let path = self.final_path(j);
        let temp = temp_path(&path);
        let anonymous = *job.created.lock().expect("poisoned") == Created::Anonymous;
        let failed = job.failed.lock().expect("poisoned").is_some();
        // A failed named file's temporary name goes. A nameless file has
        // none, but outside a directory this restore created an interrupted
        // run may have left one.
        if (failed && !anonymous) || (anonymous && !e.fresh) {
            let _ = std::fs::remove_file(&temp);
        }
        if failed {
            return;
        }
        let file = match handle.map_or_else(|| self.open_temp(j, false), Ok) {
            Ok(f) => f,
            Err(err) => {
                self.fail(j, format!("cannot create: {err}"));
                return;
            }
        };
        let xattrs: Vec<(&[u8], &[u8])> = e
            .node
            .xattrs
            .iter()
            .map(|x| (x.name.0.as_slice(), x.value.0.as_slice()))
            .collect();
        let meta = |file: &File| -> Vec<String> {
            fsmeta::apply_to_fd(
                file,
                self.is_root.then_some((e.node.uid, e.node.gid)),
                e.node.mode & 0o7777,
                &xattrs,
                (e.node.mtime, e.node.mtime_nsec),
            )
            .into_iter()
            .map(|(what, err)| format!("{}: cannot {what}: {err}", e.display()))
            .collect()
        };
        let overwrite = self.opts.overwrite;
        let placed = if anonymous {
            place_nameless(&file, &path, &temp, overwrite, &self.nameless, meta)
        } else {
            let w = meta(&file);
            drop(file);
            rename_into_place(&temp, &path, overwrite).map(|()| w)
        };
        match placed {
            Ok(w) => self.warnings.lock().expect("poisoned").extend(w),
            Err(err) => {
                let reason = if err.kind() == std::io::ErrorKind::AlreadyExists {
                    "another entry took its place during the restore and was left alone \
                     (on a case-insensitive file system: a name differing only in case); \
                     --overwrite replaces it"
                        .to_string()
                } else {
                    format!("cannot move into place: {}", explain(&path, &err))
                };
                self.fail(j, reason);
                let _ = std::fs::remove_file(&temp);
            }
        }
    }

    /// Gives up a worker's handle on a file whose blob is to be read from
    /// another copy, by another worker: a nameless file (one blob, so it
    /// holds nothing else) goes with its handle and is made afresh.
    fn drop_handle(&self, j: usize, handle: Option<File>) {
        let mut created = self.jobs[j].created.lock().expect("poisoned");
        if *created == Created::Anonymous {
            *created = Created::No;
        }
        drop(handle);
    }

    /// Marks a file failed (the first reason stands).
    fn fail(&self, j: usize, reason: String) {
        let mut slot = self.jobs[j].failed.lock().expect("poisoned");
        if slot.is_none() {
            *slot = Some(reason);
        }
    }

    /// Counts one of a file's blobs as handled; the last one finalizes it.
    fn blob_done(&self, j: usize, handle: Option<File>) {
        if self.jobs[j].remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finalize(j, handle);
        }
    }
}

/// One pack, and what each batch in flight needs from it.
struct Work<'a> {
    pack: u32,
    parts: Parts<'a>,
}

/// The parts of one pack for the batches that need it.
type Parts<'a> = Vec<(Arc<Batch<'a>>, PackPlan)>;

/// The pack workers' queue, oldest pack first. A pack that a newer batch
/// also needs takes that batch's part while it waits, or while a worker
/// holds it: a worker keeps the last pack it read until it takes another,
/// and writes late parts from the same bytes. A pack whose blobs straddle
/// two batches is then usually fetched once.
struct Queue<'a> {
    state: Mutex<QueueState<'a>>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct QueueState<'a> {
    waiting: std::collections::VecDeque<Work<'a>>,
    /// Packs a worker holds, with the parts that arrived for them.
    held: HashMap<u32, Parts<'a>>,
    closed: bool,
}

impl<'a> Queue<'a> {
    fn new() -> Self {
        Queue {
            state: Mutex::new(QueueState::default()),
            ready: std::sync::Condvar::new(),
        }
    }

    fn push(&self, batch: &Arc<Batch<'a>>, pack: u32, plan: PackPlan) {
        let mut state = self.state.lock().expect("poisoned");
        let part = (batch.clone(), plan);
        if let Some(late) = state.held.get_mut(&pack) {
            late.push(part);
            drop(state);
            // Wake the worker that holds it, whichever it is.
            self.ready.notify_all();
            return;
        }
        match state.waiting.iter_mut().find(|w| w.pack == pack) {
            Some(waiting) => waiting.parts.push(part),
            None => state.waiting.push_back(Work {
                pack,
                parts: vec![part],
            }),
        }
        drop(state);
        self.ready.notify_one();
    }

    /// What a worker that holds `held` does next: the late parts of the
    /// pack it holds, else the next pack (it then holds that one instead),
    /// else `None` once the queue is closed and empty.
    fn next(&self, held: Option<u32>) -> Option<Work<'a>> {
        let mut state = self.state.lock().expect("poisoned");
        loop {
            if let Some(pack) = held {
                let late = state.held.get_mut(&pack).map(std::mem::take);
                if let Some(parts) = late.filter(|p| !p.is_empty()) {
                    return Some(Work { pack, parts });
                }
            }
            if let Some(work) = state.waiting.pop_front() {
                if let Some(pack) = held {
                    state.held.remove(&pack);
                }
                state.held.insert(work.pack, Vec::new());
                return Some(work);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).expect("poisoned");
        }
    }

    /// The pack the next worker to ask will take, if one is waiting.
    fn upcoming(&self) -> Option<u32> {
        self.state
            .lock()
            .expect("poisoned")
            .waiting
            .front()
            .map(|w| w.pack)
    }

    fn close(&self) {
        self.state.lock().expect("poisoned").closed = true;
        self.ready.notify_all();
    }
}

/// Counts a pack of a batch as written when dropped, even by a worker
/// that skipped it (cancelled) or panicked, so the walking thread never
/// waits for a pack nobody will write.
struct PackDone<'b, 'a> {
    batch: &'b Batch<'a>,
    done: &'b mpsc::Sender<()>,
}

impl Drop for PackDone<'_, '_> {
    fn drop(&mut self) {
        if self.batch.packs_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.done.send(());
        }
    }
}

/// Stops the restore if its worker panics, so the walking thread does not
/// wait for parts only that worker would have written.
struct PanicAlarm<'b> {
    stop: &'b AtomicBool,
    done: &'b mpsc::Sender<()>,
}

impl Drop for PanicAlarm<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.stop.store(true, Ordering::Relaxed);
            let _ = self.done.send(());
        }
    }
}

/// Thread-seconds the pack workers spent, summed over them.
#[derive(Default)]
struct WorkerTime {
    fetch_ns: AtomicU64,
    decode_ns: AtomicU64,
    write_ns: AtomicU64,
}

/// Where a restore thread reads one pack's frames from.
enum PackSource {
    /// Front to back, authenticating as it goes (the usual case).
    Stream(PackStream),
    /// Decrypted whole with damaged segments zeroed, or why it could not be.
    Salvaged(Result<SalvagedPack>),
}

/// A batch handed to the workers, and what is left to do once its data is
/// written.
struct InFlight<'a> {
    batch: Arc<Batch<'a>>,
    /// Files other names link to, by their key in `links`.
    primaries: Vec<(usize, (u64, u64))>,
    /// Names that are hard links to a file of this batch or an earlier one.
    secondary: Vec<(usize, (u64, u64))>,
    /// Files found intact in the target.
    done_files: Vec<usize>,
    /// Directories whose last entries are in this batch or an earlier one.
    closed_dirs: Vec<Entry>,
}

/// The restore's state while it walks the snapshot. Entries are selected
/// as the walk meets them and directories are created at once; everything
/// else is gathered into batches. A full batch is handed to the pack
/// workers, and the walk goes on while they write it; once its data is
/// written, its hard links, symlinks and special files are created, its
/// files verified, and the directories the walk has left get their
/// metadata. At most `MAX_IN_FLIGHT + 1` batches are in flight, each of at
/// most twice the batch size, so memory is a few batches and one path of
/// directories deep, whatever the snapshot's size.
struct Restorer<'a, 'q> {
    repo: &'a Repository,
    index: &'a Index,
    opts: &'a RestoreOptions,
    filter: Filter,
    is_root: bool,
    batch_limit: usize,
    report: RestoreReport,
    /// Excluded directories above the walk's position.
    excluded: Vec<Vec<u8>>,
    /// Directories above the walk's position that matched an include.
    included: Vec<Vec<u8>>,
    /// Directories above the walk's position that no include matched; they
    /// are restored when something below them is.
    unselected: Vec<Entry>,
    /// Directories above the walk's position whose place holds a
    /// conflicting non-directory: nothing below them is restored.
    blocked: Vec<Vec<u8>>,
    /// Restored directories above the walk's position; their metadata
    /// waits until everything below them is written.
    open_dirs: Vec<Entry>,
    /// Directories the walk has left, deepest first, since the last batch
    /// was handed off.
    closed_dirs: Vec<Entry>,
    /// Everything but directories, in walk order, not yet handed off.
    batch: Vec<Entry>,
    batch_blobs: usize,
    /// Packs the batch's files read.
    batch_packs: std::collections::HashSet<u32>,
    /// Files with other names (by device and inode in the snapshot).
    links: HashMap<(u64, u64), LinkTarget>,
    /// Shared with every batch: whether nameless files work on the target.
    nameless: Arc<Nameless>,
    /// The pack workers' queue.
    queue: &'q Queue<'a>,
    /// One message each time a batch's last pack is written, or a worker
    /// panics.
    done: mpsc::Receiver<()>,
    /// Set when a worker panics, or when the restore fails: queued packs
    /// are then skipped.
    stop: &'q AtomicBool,
    in_flight: std::collections::VecDeque<InFlight<'a>>,
    /// When the first batch was handed off: planning ends there.
    first_handoff: Option<std::time::Instant>,
}

impl<'a> Restorer<'a, '_> {
    fn cancelled(&self) -> bool {
        self.opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Takes one entry from the walk (parents before children).
    fn visit(&mut self, path: &[u8], node: &Node) -> Result<()> {
        leave(&mut self.excluded, path, drop);
        leave(&mut self.included, path, drop);
        leave(&mut self.blocked, path, drop);
        leave(&mut self.unselected, path, drop);
        leave(&mut self.open_dirs, path, |dir| self.closed_dirs.push(dir));
        if !self.excluded.is_empty() {
            return Ok(());
        }
        if self.filter.excluded(path, &node.name.0) {
            if node.kind == NodeKind::Dir {
                self.excluded.push(path.to_vec());
            }
            return Ok(());
        }
        if is_temp_name(&node.name.0) {
            if node.kind == NodeKind::Dir {
                self.excluded.push(path.to_vec());
            }
            self.report.failures.push(RestoreFailure {
                path: String::from_utf8_lossy(path).into_owned(),
                reason: format!(
                    "its name has the form of lifeboat's temporary files ({TEMP_PREFIX}*.tmp), so it is not restored (nothing below it either)"
                ),
            });
            return Ok(());
        }
        // Below a directory this restore created, nothing can be in the
        // way (names are unique within a tree).
        let fresh = self
            .open_dirs
            .last()
            .is_some_and(|d| d.fresh && is_parent(&d.snap_path, path));
        let entry = || Entry {
            snap_path: path.to_vec(),
            node: node.clone(),
            fresh,
        };
        if let Some(set) = &self.filter.include {
            if self.included.is_empty() && !set.is_match(fsmeta::os(path)) {
                if node.kind == NodeKind::Dir {
                    self.unselected.push(entry());
                }
                return Ok(());
            }
            if node.kind == NodeKind::Dir {
                self.included.push(path.to_vec());
            }
            // Selected: its directories need to exist first.
            for dir in std::mem::take(&mut self.unselected) {
                self.place_dir(dir)?;
            }
        }
        if node.kind == NodeKind::Dir {
            return self.place_dir(entry());
        }
        if !self.blocked.is_empty() {
            return Ok(());
        }
        // A full batch still takes entries whose data lies in packs it
        // already reads, up to twice its size: cutting between two files
        // of one pack would fetch that pack twice.
        let full = self.batch.len() >= self.batch_limit || self.batch_blobs >= BATCH_BLOBS;
        let index = self.index;
        let packs = node.content.iter().filter_map(|id| index.get(id));
        if full
            && (self.batch.len() >= 2 * self.batch_limit
                || self.batch_blobs >= 2 * BATCH_BLOBS
                || packs
                    .clone()
                    .any(|(_, loc)| !self.batch_packs.contains(&loc.pack)))
        {
            self.hand_off()?;
        }
        self.batch_packs.extend(packs.map(|(_, loc)| loc.pack));
        self.batch_blobs += node.content.len();
        self.batch.push(entry());
        Ok(())
    }

    /// Creates a directory as a real directory (its metadata comes last).
    fn place_dir(&mut self, mut e: Entry) -> Result<()> {
        if !self.blocked.is_empty() {
            return Ok(());
        }
        self.report.dirs += 1;
        if self.opts.dry_run {
            return Ok(());
        }
        let path = self.opts.target.join(e.rel());
        let made = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) if self.opts.overwrite => {
                std::fs::remove_file(&path).and_then(|()| std::fs::create_dir(&path))
            }
            Ok(_) => {
                self.report.conflicts.push(e.display());
                self.blocked.push(e.snap_path);
                return Ok(());
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&path).map(|()| {
                    // Owner-writable while we fill it; final mode comes last.
                    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700));
                    e.fresh = true;
                })
            }
            Err(err) => Err(err),
        };
        match made {
            Ok(()) => self.open_dirs.push(e),
            // This one place is out of reach (its path is too long for
            // this system): the entry fails, and the rest of the snapshot
            // is still restored.
            Err(err) if err.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                self.report.dirs -= 1;
                self.report.failures.push(RestoreFailure {
                    path: e.display(),
                    reason: format!(
                        "cannot create directory: {}; nothing below it is restored",
                        explain(&path, &err)
                    ),
                });
                self.blocked.push(e.snap_path);
            }
            // Anything else (no permission, no space, a read-only or
            // failing file system) would fail most entries after it: the
            // restore stops here.
            Err(err) => return Err(Error::io(&path, err)),
        }
        Ok(())
    }

    /// Ends the walk: every directory is now complete.
    fn finish(&mut self) -> Result<()> {
        while let Some(dir) = self.open_dirs.pop() {
            self.closed_dirs.push(dir);
        }
        self.hand_off()?;
        while !self.in_flight.is_empty() {
            self.complete_oldest()?;
        }
        Ok(())
    }

    /// Decides what each file of the batch needs and queues its packs for
    /// the workers; then completes the oldest batches until at most
    /// `MAX_IN_FLIGHT` besides this one are in flight.
    fn hand_off(&mut self) -> Result<()> {
        if self.cancelled() {
            return Err(Error::Interrupted);
        }
        self.first_handoff
            .get_or_insert_with(std::time::Instant::now);
        let entries = std::mem::take(&mut self.batch);
        self.batch_blobs = 0;
        self.batch_packs.clear();
        let (opts, target, is_root) = (self.opts, &self.opts.target, self.is_root);

        let mut jobs: Vec<FileJob> = Vec::new();
        let mut primaries = Vec::new();
        let mut secondary = Vec::new();
        let mut done_files: Vec<usize> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.node.kind != NodeKind::File {
                continue;
            }
            if let Some(key) = e.node.hardlink {
                let content = content_digest(&e.node.content);
                if self.links.get(&key).is_some_and(|t| t.content == content) {
                    secondary.push((i, key));
                    continue;
                }
                self.links.insert(
                    key,
                    LinkTarget {
                        snap_path: e.snap_path.clone(),
                        content,
                        restored: None,
                    },
                );
                primaries.push((i, key));
            }
            self.report.bytes_total += e.node.size;
            let path = target.join(e.rel());
            let existing = if e.fresh {
                Err(std::io::ErrorKind::NotFound.into())
            } else {
                std::fs::symlink_metadata(&path)
            };
            match existing {
                Ok(m) if m.is_file() && m.len() == e.node.size => {
                    let same_time =
                        m.mtime() == e.node.mtime && m.mtime_nsec() == e.node.mtime_nsec as i64;
                    // Same size: read and hash it. Trusting size and mtime alone
                    // would keep a file whose bytes changed behind them.
                    if file_matches(self.repo, self.index, &path, &e.node).unwrap_or(false) {
                        self.report.files_unchanged += 1;
                        done_files.push(i);
                        if !same_time && !opts.dry_run {
                            apply_meta(&path, &e.node, is_root, &mut self.report.warnings);
                        }
                        continue;
                    }
                    if !opts.overwrite {
                        self.report.conflicts.push(e.display());
                        continue;
                    }
                }
                Ok(m) if m.is_dir() => {
                    self.report
                        .conflicts
                        .push(format!("{} (a directory is in the way)", e.display()));
                    continue;
                }
                Ok(_) if !opts.overwrite => {
                    self.report.conflicts.push(e.display());
                    continue;
                }
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) if err.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                    self.report.failures.push(RestoreFailure {
                        path: e.display(),
                        reason: format!("cannot create: {}", explain(&path, &err)),
                    });
                    continue;
                }
                Err(err) => return Err(Error::io(&path, err)),
            }
            self.report.files_restored += 1;
            if opts.dry_run {
                continue;
            }
            jobs.push(FileJob {
                entry: i,
                remaining: AtomicUsize::new(e.node.content.len()),
                failed: Mutex::new(None),
                created: Mutex::new(Created::No),
            });
        }
        if opts.dry_run {
            self.report.others += entries
                .iter()
                .filter(|e| e.node.kind != NodeKind::File)
                .count() as u64
                + secondary.len() as u64;
            return Ok(());
        }

        let mut by_pack: HashMap<u32, PackPlan> = HashMap::new();
        // (job, why it cannot be planned).
        let mut refused: Vec<(usize, String)> = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            let node = &entries[job.entry].node;
            let locations = match plan_file(self.index, node) {
                Ok(l) => l,
                Err(why) => {
                    refused.push((j, why));
                    continue;
                }
            };
            let mut offset = 0u64;
            for (id, loc) in node.content.iter().zip(locations) {
                by_pack
                    .entry(loc.pack)
                    .or_default()
                    .entry(*id)
                    .or_insert_with(|| BlobPlan {
                        loc,
                        places: Vec::new(),
                        tried: Vec::new(),
                    })
                    .places
                    .push((j, offset));
                offset += loc.raw_length as u64;
            }
        }
        let batch = Arc::new(Batch {
            opts,
            is_root,
            entries,
            jobs,
            packs_left: AtomicUsize::new(by_pack.len()),
            bytes_written: AtomicU64::new(0),
            warnings: Mutex::new(Vec::new()),
            nameless: self.nameless.clone(),
        });
        for (j, why) in refused {
            batch.fail(j, why);
            // None of its blobs was handed to a pack: they count down here,
            // so the file finalizes (as failed, leaving nothing behind).
            for _ in 0..batch.entries[batch.jobs[j].entry].node.content.len() {
                batch.blob_done(j, None);
            }
        }
        for (j, job) in batch.jobs.iter().enumerate() {
            if batch.entries[job.entry].node.content.is_empty() {
                job.remaining.store(1, Ordering::Release);
                batch.blob_done(j, None);
            }
        }
        // Packs in the order of the last file that needs them: the packs
        // this batch shares with the next hold its last files, so they are
        // still waiting when the next batch is handed off, and take its
        // part too.
        let mut by_pack: Vec<(u32, PackPlan)> = by_pack.into_iter().collect();
        by_pack.sort_by_cached_key(|(_, plan)| {
            plan.values()
                .flat_map(|b| b.places.iter().map(|&(j, _)| j))
                .max()
        });
        for (pack, plan) in by_pack {
            self.queue.push(&batch, pack, plan);
        }
        self.in_flight.push_back(InFlight {
            batch,
            primaries,
            secondary,
            done_files,
            closed_dirs: std::mem::take(&mut self.closed_dirs),
        });
        while self.in_flight.len() > MAX_IN_FLIGHT {
            self.complete_oldest()?;
        }
        Ok(())
    }

    /// Waits for the oldest batch's data, then creates its hard links,
    /// symlinks and special files, verifies it, and applies the metadata of
    /// the directories that were left before it was handed off.
    fn complete_oldest(&mut self) -> Result<()> {
        let Some(f) = self.in_flight.pop_front() else {
            return Ok(());
        };
        while f.batch.packs_left.load(Ordering::Acquire) > 0 {
            // A worker that panicked may have held parts nobody will write:
            // stop waiting (the scope then reports the panic).
            if self.stop.load(Ordering::Relaxed) || self.done.recv().is_err() {
                return Err(Error::Interrupted);
            }
        }
        if self.cancelled() {
            return Err(Error::Interrupted);
        }
        let (opts, target, is_root) = (self.opts, &self.opts.target, self.is_root);
        let batch = &f.batch;
        let entries = &batch.entries;
        self.report.bytes_written += batch.bytes_written.load(Ordering::Relaxed);
        self.report.warnings.extend(std::mem::take(
            &mut *batch.warnings.lock().expect("poisoned"),
        ));
        let mut ok_files: Vec<usize> = f.done_files;
        for job in &batch.jobs {
            match job.failed.lock().expect("poisoned").take() {
                Some(reason) => {
                    self.report.files_restored -= 1;
                    self.report.failures.push(RestoreFailure {
                        path: entries[job.entry].display(),
                        reason,
                    });
                }
                None => ok_files.push(job.entry),
            }
        }
        let ok_set: std::collections::HashSet<usize> = ok_files.iter().copied().collect();
        for (i, key) in f.primaries {
            if let Some(t) = self.links.get_mut(&key) {
                if t.snap_path == entries[i].snap_path {
                    t.restored = Some(ok_set.contains(&i));
                }
            }
        }

        // Hard links to files restored in this batch or an earlier one.
        for (i, key) in f.secondary {
            let e = &entries[i];
            let first = &self.links[&key];
            if first.restored != Some(true) {
                self.report.failures.push(RestoreFailure {
                    path: e.display(),
                    reason: format!(
                        "its hard-link target {} was not restored",
                        String::from_utf8_lossy(&first.snap_path)
                    ),
                });
                continue;
            }
            let path = target.join(e.rel());
            let first_path = target.join(fsmeta::os(&first.snap_path[1..]));
            match (
                std::fs::symlink_metadata(&path),
                std::fs::metadata(&first_path),
            ) {
                (Ok(a), Ok(b)) if a.ino() == b.ino() && a.dev() == b.dev() => {
                    self.report.others += 1;
                    continue;
                }
                (Ok(_), _) if !opts.overwrite => {
                    self.report.conflicts.push(e.display());
                    continue;
                }
                (Ok(m), _) if m.is_dir() => {
                    self.report
                        .conflicts
                        .push(format!("{} (a directory is in the way)", e.display()));
                    continue;
                }
                (Ok(_), _) => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {}
            }
            match std::fs::hard_link(&first_path, &path) {
                Ok(()) => self.report.others += 1,
                Err(err) => self.report.failures.push(RestoreFailure {
                    path: e.display(),
                    reason: format!("cannot create hard link: {err}"),
                }),
            }
        }

        // Symlinks, devices and FIFOs, now that this batch writes no more
        // data. Names are unique in a tree, so no later entry lies below one.
        for e in entries.iter() {
            if !matches!(
                e.node.kind,
                NodeKind::Dir | NodeKind::File | NodeKind::Socket
            ) {
                self.place_special(e);
            }
        }

        // Verify file contents against the snapshot.
        if opts.verify {
            let verify_clock = std::time::Instant::now();
            for &i in &ok_files {
                let e = &entries[i];
                let path = target.join(e.rel());
                match file_matches(self.repo, self.index, &path, &e.node) {
                    Ok(true) => self.report.files_verified += 1,
                    Ok(false) => self.report.failures.push(RestoreFailure {
                        path: e.display(),
                        reason: "verification failed: content differs from the snapshot".into(),
                    }),
                    Err(err) => self.report.failures.push(RestoreFailure {
                        path: e.display(),
                        reason: format!("verification failed: {err}"),
                    }),
                }
            }
            self.report.timings.verify_secs += verify_clock.elapsed().as_secs_f64();
        }

        // Metadata of the directories left behind, deepest first, so writing
        // into a directory does not change its restored mtime.
        let finish_clock = std::time::Instant::now();
        for e in f.closed_dirs {
            apply_meta(
                &target.join(e.rel()),
                &e.node,
                is_root,
                &mut self.report.warnings,
            );
        }
        self.report.timings.finish_secs += finish_clock.elapsed().as_secs_f64();
        Ok(())
    }

    /// Creates one symlink, device or FIFO, unless an equal one is there.
    fn place_special(&mut self, e: &Entry) {
        let (opts, report) = (self.opts, &mut self.report);
        let path = opts.target.join(e.rel());
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            let same = match e.node.kind {
                NodeKind::Symlink => {
                    m.file_type().is_symlink()
                        && std::fs::read_link(&path)
                            .ok()
                            .map(|t| t.into_os_string().into_encoded_bytes())
                            == e.node.target.as_ref().map(|t| t.0.clone())
                }
                NodeKind::Fifo => std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()),
                NodeKind::Chardev => {
                    std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type())
                        && Some(m.rdev()) == e.node.rdev
                }
                NodeKind::Blockdev => {
                    std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())
                        && Some(m.rdev()) == e.node.rdev
                }
                _ => false,
            };
            if same {
                apply_meta(&path, &e.node, self.is_root, &mut report.warnings);
                report.others += 1;
                return;
            }
            if !opts.overwrite || m.is_dir() {
                report.conflicts.push(e.display());
                return;
            }
            let _ = std::fs::remove_file(&path);
        }
        let created = match e.node.kind {
            NodeKind::Symlink => {
                let t = e
                    .node
                    .target
                    .as_ref()
                    .map(|t| t.0.clone())
                    .unwrap_or_default();
                std::os::unix::fs::symlink(fsmeta::os(&t), &path)
            }
            NodeKind::Fifo => fsmeta::mknod(&path, libc::S_IFIFO | e.node.mode, 0),
            NodeKind::Chardev => {
                fsmeta::mknod(&path, libc::S_IFCHR | e.node.mode, e.node.rdev.unwrap_or(0))
            }
            NodeKind::Blockdev => {
                fsmeta::mknod(&path, libc::S_IFBLK | e.node.mode, e.node.rdev.unwrap_or(0))
            }
            _ => Ok(()),
        };
        match created {
            Ok(()) => {
                apply_meta(&path, &e.node, self.is_root, &mut report.warnings);
                report.others += 1;
            }
            Err(err) => report.failures.push(RestoreFailure {
                path: e.display(),
                reason: err.to_string(),
            }),
        }
    }
}

/// What every pack worker shares.
struct Workers<'a, 'q> {
    repo: &'a Repository,
    index: &'a Index,
    queue: &'q Queue<'a>,
    time: &'q WorkerTime,
}

/// A pack worker's own decoder and hasher, reused for every blob.
struct WorkerState {
    decoder: Option<FrameDecoder>,
    hasher: blake3::Hasher,
}

/// A pack worker: takes packs from the queue until it closes.
fn pack_worker(w: &Workers<'_, '_>, done: &mpsc::Sender<()>, stop: &AtomicBool) {
    let (repo, index, queue) = (w.repo, w.index, w.queue);
    let _alarm = PanicAlarm { stop, done };
    let mut state = WorkerState {
        decoder: FrameDecoder::new().ok(),
        hasher: repo.ids().blob_hasher(),
    };
    // The pack this worker holds, and its bytes.
    let mut held: Option<(u32, Option<PackSource>)> = None;
    while let Some(work) = queue.next(held.as_ref().map(|(pack, _)| *pack)) {
        if held.as_ref().is_none_or(|(pack, _)| *pack != work.pack) {
            held = Some((work.pack, None));
            // Let the store fetch the pack after this one while this one
            // is decoded (a hint: local packs are read into the page cache
            // by the kernel, not into this process).
            if let Some(next) = queue.upcoming() {
                repo.prefetch_pack(&index.pack(next).id);
            }
        }
        let source = &mut held.as_mut().expect("set above").1;
        let (batches, plans): (Vec<_>, Vec<_>) = work.parts.into_iter().unzip();
        let _counted: Vec<PackDone> = batches
            .iter()
            .map(|batch| PackDone { batch, done })
            .collect();
        let cancelled = batches[0]
            .opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed));
        if !stop.load(Ordering::Relaxed) && !cancelled {
            restore_pack(w, &mut state, &batches, work.pack, plans, source);
        }
    }
}

/// Writes every blob the batches need from one pack to every place it goes
/// (`plans[i]` is what `batches[i]` needs). The pack is opened into
/// `source` unless it already was. A blob whose copy here fails is read
/// from another copy the index knows, where there is one.
fn restore_pack<'a>(
    w: &Workers<'a, '_>,
    state: &mut WorkerState,
    batches: &[Arc<Batch<'a>>],
    pack_pos: u32,
    plans: Vec<PackPlan>,
    source: &mut Option<PackSource>,
) {
    let (repo, index, time) = (w.repo, w.index, w.time);
    let (decoder, hasher) = (&mut state.decoder, &mut state.hasher);
    let add_ns = |counter: &AtomicU64, since: std::time::Instant| {
        counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    };
    let pack = index.pack(pack_pos);
    let fetch_start = std::time::Instant::now();
    // Read front to back, one frame at a time; a pack whose bytes
    // or segments fail is salvaged whole instead.
    let source = source.get_or_insert_with(|| match repo.open_pack(&pack.id) {
        Ok(PackRead::Stream(stream)) => PackSource::Stream(stream),
        Ok(PackRead::Salvaged(salvaged)) => PackSource::Salvaged(Ok(salvaged)),
        Err(e) => PackSource::Salvaged(Err(e)),
    });
    add_ns(&time.fetch_ns, fetch_start);
    // Every blob of every part, in offset order. A blob two batches both
    // need (rare) is decoded once for each.
    let mut blobs: Vec<(usize, Id, BlobPlan)> = plans
        .into_iter()
        .enumerate()
        .flat_map(|(b, plan)| plan.into_iter().map(move |(id, blob)| (b, id, blob)))
        .collect();
    blobs.sort_unstable_by_key(|(_, _, blob)| blob.loc.offset);
    let mut files: HashMap<(usize, usize), File> = HashMap::new();
    for (b, id, blob) in blobs {
        let batch = &batches[b];
        let (loc, targets, dense) = (blob.loc, &blob.places, !blob.tried.is_empty());
        let blob_start = std::time::Instant::now();
        let mut write_time = std::time::Duration::ZERO;
        let mut written: u64;
        let mut write_errors: Vec<(usize, String)> = Vec::new();
        // Each decoded piece is hashed and written to every place
        // the blob goes; the hash decides at the end whether those
        // writes stand (a file that got a bad blob is removed).
        let outcome = loop {
            hasher.reset();
            written = 0;
            write_errors.clear();
            let mut sink = |at: u64, piece: &[u8]| {
                hasher.update(piece);
                let start = std::time::Instant::now();
                for &(j, offset) in targets {
                    // Handles are kept for reuse up to a limit; a blob that
                    // many files share (copies of one file) would otherwise
                    // hold one descriptor per copy at once.
                    let mut transient = None;
                    let file = if files.len() < MAX_OPEN_FILES || files.contains_key(&(b, j)) {
                        match files.entry((b, j)) {
                            std::collections::hash_map::Entry::Occupied(o) => Ok(&*o.into_mut()),
                            std::collections::hash_map::Entry::Vacant(v) => {
                                batch.open_temp(j, true).map(|f| &*v.insert(f))
                            }
                        }
                    } else {
                        batch.open_temp(j, false).map(|f| &*transient.insert(f))
                    };
                    let sparse = !dense && batch.entries[batch.jobs[j].entry].node.sparse;
                    match file.and_then(|f| write_blob(f, piece, offset + at, sparse)) {
                        Ok(n) => written += n,
                        Err(e) => write_errors.push((j, format!("write failed: {e}"))),
                    }
                }
                write_time += start.elapsed();
            };
            let result = match (&mut *source, decoder.as_mut()) {
                (_, None) => Err(FrameError::Invalid("cannot create a zstd decoder".into())),
                (PackSource::Stream(stream), Some(d)) => {
                    match stream.frame(loc.offset, loc.length) {
                        Ok(mut frame) => d.decode(&mut frame, loc.raw_length, &mut sink),
                        Err(e) => Err(FrameError::Read(e)),
                    }
                }
                (PackSource::Salvaged(Ok(p)), Some(d)) => match p.frame(loc.offset, loc.length) {
                    Some(mut frame) => d.decode(&mut frame, loc.raw_length, &mut sink),
                    None => Err(FrameError::Invalid(
                        "it lies in a damaged part of the pack".into(),
                    )),
                },
                (PackSource::Salvaged(Err(e)), _) => Err(FrameError::Invalid(e.to_string())),
            };
            if matches!(result, Err(FrameError::Read(_))) && matches!(source, PackSource::Stream(_))
            {
                // A segment failed: salvage the pack and decode
                // this blob again from what survives.
                *source = PackSource::Salvaged(repo.read_pack_salvage(&pack.id));
                continue;
            }
            break result.map_err(|e| e.to_string()).and_then(|()| {
                if Id(*hasher.finalize().as_bytes()) == id {
                    Ok(())
                } else {
                    Err("content does not match its ID".to_string())
                }
            });
        };
        batch.bytes_written.fetch_add(written, Ordering::Relaxed);
        time.write_ns
            .fetch_add(write_time.as_nanos() as u64, Ordering::Relaxed);
        time.decode_ns.fetch_add(
            (blob_start.elapsed().saturating_sub(write_time)).as_nanos() as u64,
            Ordering::Relaxed,
        );
        for (j, reason) in write_errors.drain(..) {
            batch.fail(j, reason);
        }
        let corrupt = outcome.err().map(|e| {
            format!(
                "blob {} in pack {} is corrupt ({e}); run `lifeboat check --read-data`",
                id.short(),
                pack.id.short()
            )
        });
        if let Some(reason) = &corrupt {
            if let Some(next) = other_copy(index, &id, &blob, pack_pos) {
                for &(j, _) in targets {
                    batch.drop_handle(j, files.remove(&(b, j)));
                }
                read_elsewhere(w.queue, batch, pack_pos, id, blob, next, reason);
                continue;
            }
        }
        for &(j, _) in targets {
            if let Some(reason) = &corrupt {
                batch.fail(j, reason.clone());
            }
            // The last blob's writer finalizes the file through
            // its open handle.
            let handle = if batch.jobs[j].remaining.load(Ordering::Acquire) == 1 {
                files.remove(&(b, j))
            } else {
                None
            };
            batch.blob_done(j, handle);
        }
    }
}

/// Where each blob of a file is, checked against the size the file
/// declares before anything is written: a node that lists one 64 KiB blob
/// a hundred times and declares 0 bytes would otherwise write 6.5 MB (and
/// a drill's disk cap counts declared sizes).
fn plan_file(index: &Index, node: &Node) -> std::result::Result<Vec<BlobLocation>, String> {
    let mut locations = Vec::with_capacity(node.content.len());
    let mut total = 0u64;
    for id in &node.content {
        let Some((_, loc)) = index.get(id) else {
            return Err(format!("blob {} is missing from the index", id.short()));
        };
        if loc.raw_length > crate::pack::MAX_BLOB {
            return Err(format!(
                "blob {} is said to be implausibly large",
                id.short()
            ));
        }
        total += loc.raw_length as u64;
        locations.push(loc);
    }
    if total != node.size {
        return Err(format!(
            "it declares {} bytes but its {} blob(s) hold {total}: the snapshot is inconsistent (or hostile), so nothing of this file was written",
            node.size,
            node.content.len()
        ));
    }
    Ok(locations)
}

/// Another location of blob `id` than the packs `blob` was tried in and
/// `failed_in`, with the same plaintext length (the ID fixes the content,
/// so a copy of another length is false).
fn other_copy(
    index: &Index,
    id: &Id,
    blob: &BlobPlan,
    failed_in: u32,
) -> Option<(Id, BlobLocation)> {
    index
        .locations(id)
        .find(|(p, l)| {
            p.kind == crate::pack::BlobKind::Data
                && l.raw_length == blob.loc.raw_length
                && l.pack != failed_in
                && !blob.tried.contains(&l.pack)
        })
        .map(|(p, l)| (p.id, l))
}

/// Queues blob `id` (whose copy in pack `failed_in` failed for `reason`)
/// to be read from its copy at `next`, and says so in the report.
fn read_elsewhere<'a>(
    queue: &Queue<'a>,
    batch: &Arc<Batch<'a>>,
    failed_in: u32,
    id: Id,
    mut blob: BlobPlan,
    (next_pack, loc): (Id, BlobLocation),
    reason: &str,
) {
    batch.warnings.lock().expect("poisoned").push(format!(
        "{reason}; restored from its copy in pack {} instead",
        next_pack.short()
    ));
    blob.tried.push(failed_in);
    blob.loc = loc;
    // Counted before the part exists, so the batch never looks complete
    // in between.
    batch.packs_left.fetch_add(1, Ordering::AcqRel);
    queue.push(batch, loc.pack, HashMap::from([(id, blob)]));
}

/// Restores a snapshot's tree into `opts.target`.
pub fn restore(
    repo: &Repository,
    snapshot: &crate::tree::Snapshot,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    repo.require_full_key("restore")?;
    let clock = std::time::Instant::now();
    let index = match &opts.index_cache {
        Some(dir) => repo.load_index_reusing_cache(dir, Some(&snapshot.host))?,
        None => repo.load_index_for_host(&snapshot.host)?,
    };
    let filter = Filter::new(opts)?;
    repo.clear_pack_cache();
    if !opts.dry_run {
        std::fs::create_dir_all(&opts.target).map_err(|e| Error::io(&opts.target, e))?;
    }
    let queue = Queue::new();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let stop = AtomicBool::new(false);
    let time = WorkerTime::default();
    let mut unreadable: Vec<RestoreFailure> = Vec::new();
    let workers = Workers {
        repo,
        index: &index,
        queue: &queue,
        time: &time,
    };
    let outcome = std::thread::scope(|s| {
        let workers = &workers;
        for _ in 0..crate::parallel::pack_threads(repo.backend()) {
            let done = done_tx.clone();
            let stop = &stop;
            s.spawn(move || pack_worker(workers, &done, stop));
        }
        drop(done_tx);
        let mut restorer = Restorer {
            repo,
            index: &index,
            opts,
            filter,
            is_root: fsmeta::euid() == 0,
            batch_limit: if opts.batch == 0 {
                DEFAULT_BATCH
            } else {
                opts.batch
            },
            report: RestoreReport::default(),
            excluded: Vec::new(),
            included: Vec::new(),
            unselected: Vec::new(),
            blocked: Vec::new(),
            open_dirs: Vec::new(),
            closed_dirs: Vec::new(),
            batch: Vec::new(),
            batch_blobs: 0,
            batch_packs: std::collections::HashSet::new(),
            links: HashMap::new(),
            nameless: Arc::default(),
            queue: &queue,
            stop: &stop,
            done: done_rx,
            in_flight: std::collections::VecDeque::new(),
            first_handoff: None,
        };
        let walked = crate::walk::walk_tolerant(
            repo,
            &index,
            snapshot,
            &mut |path, node| restorer.visit(path, node),
            &mut |dir, e| {
                unreadable.push(RestoreFailure {
                    path: String::from_utf8_lossy(dir).into_owned(),
                    reason: format!("directory listing unreadable, nothing below it restored: {e}"),
                })
            },
        )
        .and_then(|()| restorer.finish());
        if walked.is_err() {
            // Whatever is still queued is skipped.
            stop.store(true, Ordering::Relaxed);
        }
        // Closing the queue lets the workers finish.
        queue.close();
        walked.map(|()| (restorer.report, restorer.first_handoff))
    });
    let (mut report, first_handoff) = outcome?;
    report.failures.splice(0..0, unreadable);
    let t = &mut report.timings;
    t.fetch_thread_secs = time.fetch_ns.into_inner() as f64 / 1e9;
    t.decode_thread_secs = time.decode_ns.into_inner() as f64 / 1e9;
    t.write_thread_secs = time.write_ns.into_inner() as f64 / 1e9;
    // Planning is everything before the first batch was handed off; after
    // it the walk runs alongside the writing, and counts as data.
    let total = clock.elapsed().as_secs_f64();
    t.plan_secs = first_handoff.map_or(total, |at| (at - clock).as_secs_f64());
    t.data_secs = (total - t.plan_secs - t.verify_secs - t.finish_secs).max(0.0);
    Ok(report)
}

/// Writes one blob at `offset`; in a sparse file, 4 KiB blocks of zeros are
/// skipped so they stay holes. Returns bytes written.
fn write_blob(file: &File, data: &[u8], offset: u64, sparse: bool) -> std::io::Result<u64> {
    if !sparse {
        file.write_all_at(data, offset)?;
        return Ok(data.len() as u64);
    }
    const BLOCK: u64 = 4096;
    let mut written = 0u64;
    let mut pos = 0usize;
    let mut run_start: Option<usize> = None;
    while pos < data.len() {
        let file_pos = offset + pos as u64;
        let next_boundary = ((file_pos / BLOCK) + 1) * BLOCK;
        let end = (pos + (next_boundary - file_pos) as usize).min(data.len());
        let zero = data[pos..end].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(s)) => {
                file.write_all_at(&data[s..pos], offset + s as u64)?;
                written += (pos - s) as u64;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = run_start {
        file.write_all_at(&data[s..], offset + s as u64)?;
        written += (data.len() - s) as u64;
    }
    Ok(written)
}

/// True when the file at `path` holds exactly the node's content.
fn file_matches(repo: &Repository, index: &Index, path: &Path, node: &Node) -> Result<bool> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    if file.metadata().map_err(|e| Error::io(path, e))?.len() != node.size {
        return Ok(false);
    }
    // The blob lengths must add up to the size before anything is read, and
    // none may exceed the blob limit (a hostile index could claim gigabytes).
    let mut total = 0u64;
    for id in &node.content {
        match index.get(id) {
            Some((_, loc)) if loc.raw_length <= crate::pack::MAX_BLOB => {
                total += loc.raw_length as u64
            }
            _ => return Ok(false),
        }
    }
    if total != node.size {
        return Ok(false);
    }
    let mut buf = Vec::new();
    for id in &node.content {
        let Some((_, loc)) = index.get(id) else {
            return Ok(false);
        };
        buf.resize(loc.raw_length as usize, 0);
        if file.read_exact(&mut buf).is_err() || repo.ids().blob_id(&buf) != *id {
            return Ok(false);
        }
    }
    let mut probe = [0u8; 1];
    Ok(file.read(&mut probe).map_err(|e| Error::io(path, e))? == 0)
}

/// Applies ownership, permissions, xattrs and mtime, in that order (chown
/// clears setuid bits, and the mtime must be set last). Problems become
/// warnings: the data is there even if, say, ownership cannot be restored.
fn apply_meta(path: &Path, node: &Node, is_root: bool, warnings: &mut Vec<String>) {
    let shown = || path.display().to_string();
    if is_root {
        if let Err(e) = fsmeta::lchown(path, node.uid, node.gid) {
            warnings.push(format!("{}: cannot set owner: {e}", shown()));
        }
    }
    if node.kind != NodeKind::Symlink {
        if let Err(e) =
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(node.mode & 0o7777))
        {
            warnings.push(format!("{}: cannot set permissions: {e}", shown()));
        }
    }
    for x in &node.xattrs {
        if let Err(e) = fsmeta::set_xattr(path, &x.name.0, &x.value.0) {
            warnings.push(format!(
                "{}: cannot set xattr {}: {e}",
                shown(),
                x.name.lossy()
            ));
        }
    }
    if let Err(e) = fsmeta::set_mtime(path, node.mtime, node.mtime_nsec) {
        warnings.push(format!("{}: cannot set mtime: {e}", shown()));
    }
}

/// Writes the content of the file at `path` in a snapshot to `out`.
pub fn dump(
    repo: &Repository,
    snapshot: &crate::tree::Snapshot,
    path: &str,
    out: &mut dyn std::io::Write,
) -> Result<u64> {
    let index = repo.load_index_for_host(&snapshot.host)?;
    let node =
        crate::walk::find(repo, &index, &snapshot.tree, path.as_bytes())?.ok_or_else(|| {
            Error::Invalid(format!(
                "{path:?} is not in the snapshot (see `lifeboat ls`)"
            ))
        })?;
    if node.kind != NodeKind::File {
        return Err(Error::Invalid(format!(
            "{path:?} is not a regular file; use `lifeboat restore --include` for directories"
        )));
    }
    // The file's declared size must be what its blobs hold, as for restore.
    plan_file(&index, &node).map_err(|why| Error::corrupt(format!("file {path:?}"), why))?;
    let mut n = 0u64;
    for id in &node.content {
        let data = repo.read_blob(&index, id)?;
        out.write_all(&data).map_err(|e| Error::io("stdout", e))?;
        n += data.len() as u64;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    //! Nameless files: created without a name, placed whole; and the
    //! named files' rename that replaces nothing without `--overwrite`.

    use super::*;
    use std::io::Write;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn no_meta(_: &File) -> Vec<String> {
        Vec::new()
    }

    fn nameless_with(path: &Path, bytes: &[u8], nameless: &Nameless) -> File {
        let mut f =
            open_anonymous(path, 0o600, nameless).expect("the test file system has O_TMPFILE");
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn a_nameless_file_shows_no_name_until_it_is_placed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let nameless = Nameless::default();
        let f = nameless_with(&path, b"whole", &nameless);
        assert!(names(dir.path()).is_empty(), "nothing named while written");
        place_nameless(&f, &path, &temp_path(&path), false, &nameless, no_meta).unwrap();
        drop(f);
        assert_eq!(names(dir.path()), ["f"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
    }

    #[test]
    fn a_name_too_long_to_link_fails_that_file_and_keeps_nameless_files_on() {
        let dir = tempfile::tempdir().unwrap();
        // One byte over NAME_MAX: its temporary name would fit, it does not.
        let long = dir.path().join("n".repeat(256));
        let nameless = Nameless::default();
        let f = nameless_with(&long, b"bytes", &nameless);
        let err =
            place_nameless(&f, &long, &temp_path(&long), false, &nameless, no_meta).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG), "{err}");
        assert!(!nameless.unsupported.load(Ordering::Relaxed));
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn a_nameless_file_is_placed_with_exactly_its_mode_owner_and_mtime() {
        use std::os::unix::fs::MetadataExt;
        // Created with its permission bits less the umask; what the umask
        // took, the special bits and a new owner are set before placing.
        let dir = tempfile::tempdir().unwrap();
        let root = crate::fsmeta::euid() == 0;
        let me = std::fs::metadata(dir.path()).unwrap();
        let owners = [(me.uid(), me.gid()), (1234, 5678)];
        let nameless = Nameless::default();
        for (i, mode) in [0o777, 0o644, 0o444, 0o000, 0o4755, 0o2711, 0o1777]
            .into_iter()
            .enumerate()
        {
            for (k, owner) in owners.iter().enumerate().take(if root { 2 } else { 1 }) {
                let path = dir.path().join(format!("f{i}-{k}"));
                let mut f = open_anonymous(&path, mode, &nameless).unwrap();
                f.write_all(b"x").unwrap();
                let meta = |file: &File| {
                    let chown = root.then_some(*owner);
                    let e = crate::fsmeta::apply_to_fd(file, chown, mode, &[], (1_000_000, 7));
                    e.into_iter().map(|(w, e)| format!("{w}: {e}")).collect()
                };
                let w = place_nameless(&f, &path, &temp_path(&path), false, &nameless, meta);
                assert_eq!(w.unwrap(), Vec::<String>::new());
                let m = std::fs::symlink_metadata(&path).unwrap();
                assert_eq!(m.mode() & 0o7777, mode, "{}", path.display());
                assert_eq!((m.uid(), m.gid()), *owner, "{}", path.display());
                assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000, 7));
            }
        }
    }

    #[test]
    fn a_nameless_file_dropped_before_it_is_placed_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let nameless = Nameless::default();
        drop(nameless_with(&dir.path().join("f"), b"half", &nameless));
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn with_overwrite_a_nameless_file_replaces_an_existing_one_and_leaves_no_temporary_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "old").unwrap();
        // A leftover of an interrupted run under the temporary name.
        std::fs::write(temp_path(&path), "stale").unwrap();
        let nameless = Nameless::default();
        let f = nameless_with(&path, b"new", &nameless);
        place_nameless(&f, &path, &temp_path(&path), true, &nameless, no_meta).unwrap();
        assert_eq!(names(dir.path()), ["f"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn without_overwrite_an_entry_that_took_the_name_meanwhile_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "theirs").unwrap();
        let nameless = Nameless::default();
        let f = nameless_with(&path, b"ours", &nameless);
        let err =
            place_nameless(&f, &path, &temp_path(&path), false, &nameless, no_meta).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
        // The same for a file written under its temporary name.
        std::fs::write(temp_path(&path), "ours").unwrap();
        let err = rename_into_place(&temp_path(&path), &path, false).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
        rename_into_place(&temp_path(&path), &path, true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"ours");
    }

    #[test]
    fn a_nameless_file_the_file_system_will_not_link_is_copied_under_a_name() {
        // linkat cannot cross file systems (EXDEV): the nameless file lives
        // on tmpfs, its place on the disk the tests build on.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        assert_ne!(
            std::fs::metadata(shm.path()).unwrap().dev(),
            std::fs::metadata(disk.path()).unwrap().dev(),
            "the test needs /dev/shm and the source tree on different file systems"
        );
        let nameless = Nameless::default();
        let f = nameless_with(&shm.path().join("f"), &[7u8; 300_000], &nameless);
        let path = disk.path().join("f");
        let err = link_fd(&f, &path, &nameless).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
        // What restore does with it: the copy gets the file's metadata.
        let meta = |file: &File| {
            let t = (1_500_000_000, 5);
            fsmeta::apply_to_fd(file, None, 0o640, &[], t)
                .into_iter()
                .map(|(what, e)| format!("{what}: {e}"))
                .collect()
        };
        let warnings =
            place_nameless(&f, &path, &temp_path(&path), false, &nameless, meta).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 300_000]);
        assert_eq!(names(disk.path()), ["f"]);
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (m.mode() & 0o7777, m.mtime(), m.mtime_nsec()),
            (0o640, 1_500_000_000, 5)
        );
        assert!(
            nameless.unsupported.load(Ordering::Relaxed),
            "later files use names"
        );
    }

    #[test]
    fn copying_out_a_nameless_file_whose_temporary_name_links_to_it_keeps_its_bytes() {
        // A failed rename after linking under the temporary name leaves
        // that name on the file itself; truncating it would empty the copy.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let nameless = Nameless::default();
        let f = nameless_with(&path, b"keep me", &nameless);
        link_fd(&f, &temp_path(&path), &nameless).unwrap();
        let copy = copy_to_named(&f, &temp_path(&path)).unwrap();
        drop(copy);
        assert_eq!(std::fs::read(temp_path(&path)).unwrap(), b"keep me");
    }

    #[test]
    fn placing_through_proc_works_where_a_descriptor_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // As an unprivileged process on an older kernel finds after its
        // first ENOENT.
        let nameless = Nameless::default();
        nameless.via_proc.store(true, Ordering::Relaxed);
        let f = nameless_with(&path, b"via proc", &nameless);
        place_nameless(&f, &path, &temp_path(&path), false, &nameless, no_meta).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"via proc");
        assert!(!nameless.unsupported.load(Ordering::Relaxed));
    }
}
