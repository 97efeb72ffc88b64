//! The restore engine.
//!
//! Plan, then act in an order that keeps a hostile snapshot inside the
//! target: every name was validated when its tree was parsed (no `/`, `.`,
//! `..` or NUL); all directories are created first, as real directories;
//! file data is written to a temporary name with `O_NOFOLLOW` and renamed
//! into place only when complete and carrying its metadata; symlinks are
//! created last, so no path we write through can be one. An existing entry
//! that differs from the snapshot is left alone unless `overwrite` is set.
//!
//! Data is read pack by pack on one thread per core: each pack is fetched
//! and decrypted once, and every blob in it is written to every place it
//! occurs. A file whose blobs cannot be read is reported and removed; the
//! other files still restore. Files appear under their final names only
//! when complete, so a second run after an interruption finds them, checks
//! each by hashing it against the snapshot (size and mtime alone are not
//! trusted), skips those that match and rewrites only what is missing.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

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
}

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
    /// Loading the index and walking the snapshot's trees (wall seconds).
    pub plan_secs: f64,
    /// Creating directories, writing file data, links and special files
    /// (wall seconds).
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

/// Walks the snapshot and selects entries, parents before children.
fn plan(
    repo: &Repository,
    index: &Index,
    root: &Id,
    filter: &Filter,
    failures: &mut Vec<RestoreFailure>,
) -> Result<Vec<Entry>> {
    let mut all: Vec<Entry> = Vec::new();
    // Whether each entry matched the include patterns (only kept when
    // there are some): a separate vector, so that without includes `all`
    // is returned as it is instead of being copied into a second one.
    let mut chosen: Vec<bool> = Vec::new();
    // Prefixes of excluded or included directories; entries below inherit.
    let mut excluded_dirs: Vec<Vec<u8>> = Vec::new();
    let mut included_dirs: Vec<Vec<u8>> = Vec::new();
    let under = |dirs: &[Vec<u8>], p: &[u8]| {
        dirs.iter()
            .any(|d| p.len() > d.len() && p.starts_with(d) && p[d.len()] == b'/')
    };
    let mut on_error = |dir: &[u8], e: Error| {
        failures.push(RestoreFailure {
            path: String::from_utf8_lossy(dir).into_owned(),
            reason: format!("directory listing unreadable, nothing below it restored: {e}"),
        })
    };
    crate::walk::walk_tolerant(
        repo,
        index,
        root,
        &mut |path, node| {
            if under(&excluded_dirs, path) {
                return Ok(());
            }
            if filter.excluded(path, &node.name.0) {
                if node.kind == NodeKind::Dir {
                    excluded_dirs.push(path.to_vec());
                }
                return Ok(());
            }
            let selected = match &filter.include {
                None => true,
                Some(set) => under(&included_dirs, path) || set.is_match(fsmeta::os(path)),
            };
            if selected && node.kind == NodeKind::Dir && filter.include.is_some() {
                included_dirs.push(path.to_vec());
            }
            all.push(Entry {
                snap_path: path.to_vec(),
                node: node.clone(),
            });
            if filter.include.is_some() {
                chosen.push(selected);
            }
            Ok(())
        },
        &mut on_error,
    )?;
    if filter.include.is_none() {
        return Ok(all);
    }
    // Keep the ancestors of selected entries so they have somewhere to go.
    let mut needed: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    for (e, sel) in all.iter().zip(&chosen) {
        if *sel {
            let mut p = e.snap_path.as_slice();
            while let Some(pos) = p.iter().rposition(|&b| b == b'/') {
                p = &p[..pos];
                if p.is_empty() || !needed.insert(p.to_vec()) {
                    break;
                }
            }
        }
    }
    Ok(all
        .into_iter()
        .zip(chosen)
        .filter(|(e, sel)| *sel || needed.contains(&e.snap_path))
        .map(|(e, _)| e)
        .collect())
}

/// Name of the temporary file a file is written to before it is complete.
/// Deterministic, so a rerun reuses (truncates) a leftover instead of
/// leaving it behind.
fn temp_path(final_path: &Path) -> PathBuf {
    let h = blake3::hash(final_path.as_os_str().as_encoded_bytes());
    let name = format!(".lb-restore-{}.tmp", &h.to_hex()[..16]);
    final_path.with_file_name(name)
}

/// For one pack: each needed blob, its location, and every (file job, offset) it goes to.
type PackPlan = HashMap<Id, (BlobLocation, Vec<(usize, u64)>)>;

struct FileJob {
    entry: usize,
    remaining: AtomicUsize,
    failed: Mutex<Option<String>>,
    /// Whether the temporary file exists yet: it is created by whichever
    /// worker brings the first blob, so a one-blob file costs one open.
    created: Mutex<bool>,
}

/// Where a restore thread reads one pack's frames from.
enum PackSource {
    /// Front to back, authenticating as it goes (the usual case).
    Stream(PackStream),
    /// Decrypted whole with damaged segments zeroed, or why it could not be.
    Salvaged(Result<SalvagedPack>),
}

/// Restores a snapshot's tree into `opts.target`.
pub fn restore(
    repo: &Repository,
    snapshot_tree: &Id,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    repo.require_full_key("restore")?;
    let clock = std::time::Instant::now();
    let index = repo.load_index()?;
    let filter = Filter::new(opts)?;
    let mut report = RestoreReport::default();
    let entries = plan(repo, &index, snapshot_tree, &filter, &mut report.failures)?;
    report.timings.plan_secs = clock.elapsed().as_secs_f64();
    let data_clock = std::time::Instant::now();
    let fetch_ns = AtomicU64::new(0);
    let decode_ns = AtomicU64::new(0);
    let write_ns = AtomicU64::new(0);
    let add_ns = |counter: &AtomicU64, since: std::time::Instant| {
        counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    };
    repo.clear_pack_cache();
    let target = &opts.target;
    if !opts.dry_run {
        std::fs::create_dir_all(target).map_err(|e| Error::io(target, e))?;
    }
    let is_root = fsmeta::euid() == 0;
    // Directories whose subtree is blocked by a conflicting non-directory.
    let mut blocked: Vec<Vec<u8>> = Vec::new();
    let is_blocked = |blocked: &[Vec<u8>], p: &[u8]| {
        blocked
            .iter()
            .any(|d| p.starts_with(d) && (p.len() == d.len() || p[d.len()] == b'/'))
    };

    // Phase 1: directories, as real directories, parents first.
    for e in entries.iter().filter(|e| e.node.kind == NodeKind::Dir) {
        if is_blocked(&blocked, &e.snap_path) {
            continue;
        }
        report.dirs += 1;
        if opts.dry_run {
            continue;
        }
        let path = target.join(e.rel());
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) if opts.overwrite => {
                std::fs::remove_file(&path).map_err(|err| Error::io(&path, err))?;
                std::fs::create_dir(&path).map_err(|err| Error::io(&path, err))?;
            }
            Ok(_) => {
                report.conflicts.push(e.display());
                blocked.push(e.snap_path.clone());
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&path).map_err(|err| Error::io(&path, err))?;
                // Owner-writable while we fill it; final mode comes last.
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700));
            }
            Err(err) => return Err(Error::io(&path, err)),
        }
    }

    // Phase 2: decide what each regular file needs.
    let mut jobs: Vec<FileJob> = Vec::new();
    let mut primary: HashMap<(u64, u64), usize> = HashMap::new();
    let mut secondary: Vec<(usize, usize)> = Vec::new();
    let mut done_files: Vec<usize> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.node.kind != NodeKind::File || is_blocked(&blocked, &e.snap_path) {
            continue;
        }
        if let Some(key) = e.node.hardlink {
            if let Some(&first) = primary.get(&key) {
                if entries[first].node.content == e.node.content {
                    secondary.push((i, first));
                    continue;
                }
            }
            primary.insert(key, i);
        }
        report.bytes_total += e.node.size;
        let path = target.join(e.rel());
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() == e.node.size => {
                let same_time =
                    m.mtime() == e.node.mtime && m.mtime_nsec() == e.node.mtime_nsec as i64;
                // Same size: read and hash it. Trusting size and mtime alone
                // would keep a file whose bytes changed behind them.
                if file_matches(repo, &index, &path, &e.node).unwrap_or(false) {
                    report.files_unchanged += 1;
                    done_files.push(i);
                    if !same_time && !opts.dry_run {
                        apply_meta(&path, &e.node, is_root, &mut report.warnings);
                    }
                    continue;
                }
                if !opts.overwrite {
                    report.conflicts.push(e.display());
                    continue;
                }
            }
            Ok(m) if m.is_dir() => {
                report
                    .conflicts
                    .push(format!("{} (a directory is in the way)", e.display()));
                continue;
            }
            Ok(_) if !opts.overwrite => {
                report.conflicts.push(e.display());
                continue;
            }
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(Error::io(&path, err)),
        }
        report.files_restored += 1;
        if opts.dry_run {
            continue;
        }
        jobs.push(FileJob {
            entry: i,
            remaining: AtomicUsize::new(e.node.content.len()),
            failed: Mutex::new(None),
            created: Mutex::new(false),
        });
    }
    if opts.dry_run {
        report.others = entries
            .iter()
            .filter(|e| !matches!(e.node.kind, NodeKind::Dir | NodeKind::File))
            .count() as u64
            + secondary.len() as u64;
        return Ok(report);
    }

    // Phase 3: data, pack by pack.
    let mut by_pack: HashMap<u32, PackPlan> = HashMap::new();
    // (job, missing blob, how many of the file's blobs were not placed).
    let mut missing: Vec<(usize, Id, usize)> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let mut offset = 0u64;
        let content = &entries[job.entry].node.content;
        for (i, id) in content.iter().enumerate() {
            match index.get(id) {
                Some((_, loc)) => {
                    by_pack
                        .entry(loc.pack)
                        .or_default()
                        .entry(*id)
                        .or_insert_with(|| (loc, Vec::new()))
                        .1
                        .push((j, offset));
                    offset += loc.raw_length as u64;
                }
                None => {
                    missing.push((j, *id, content.len() - i));
                    // Without the blob we do not know its length; the file fails anyway.
                    break;
                }
            }
        }
    }
    let bytes_written = AtomicU64::new(0);
    let warnings = Mutex::new(Vec::new());
    // Opens a job's temporary file, creating it on first use.
    let open_temp = |job: &FileJob| -> std::io::Result<File> {
        let mut created = job.created.lock().expect("poisoned");
        let mut o = OpenOptions::new();
        o.write(true).custom_flags(libc::O_NOFOLLOW);
        if !*created {
            o.create(true).truncate(true).mode(0o600);
        }
        // The temporary name is derived again rather than stored: a path
        // per file held for the whole restore was a tenth of its memory.
        let f = o.open(temp_path(&target.join(entries[job.entry].rel())))?;
        if !*created {
            // Sparse files get their size up front so skipped zeros stay holes.
            let node = &entries[job.entry].node;
            if node.sparse {
                f.set_len(node.size)?;
            }
            *created = true;
        }
        Ok(f)
    };
    let finalize = |j: usize, handle: Option<File>| {
        let job = &jobs[j];
        let e = &entries[job.entry];
        let path = target.join(e.rel());
        let temp = temp_path(&path);
        if job.failed.lock().expect("poisoned").is_some() {
            let _ = std::fs::remove_file(&temp);
            return;
        }
        let handle = match handle {
            Some(f) => Ok(f),
            None => open_temp(job),
        };
        let file = match handle {
            Ok(f) => f,
            Err(err) => {
                *job.failed.lock().expect("poisoned") = Some(format!("cannot create: {err}"));
                return;
            }
        };
        let xattrs: Vec<(&[u8], &[u8])> = e
            .node
            .xattrs
            .iter()
            .map(|x| (x.name.0.as_slice(), x.value.0.as_slice()))
            .collect();
        let w: Vec<String> = fsmeta::apply_to_fd(
            &file,
            is_root.then_some((e.node.uid, e.node.gid)),
            e.node.mode & 0o7777,
            &xattrs,
            (e.node.mtime, e.node.mtime_nsec),
        )
        .into_iter()
        .map(|(what, err)| format!("{}: cannot {what}: {err}", e.display()))
        .collect();
        drop(file);
        if let Err(err) = std::fs::rename(&temp, &path) {
            *job.failed.lock().expect("poisoned") = Some(format!("cannot move into place: {err}"));
            let _ = std::fs::remove_file(&temp);
        }
        warnings.lock().expect("poisoned").extend(w);
    };
    let fail = |j: usize, reason: String| {
        let mut slot = jobs[j].failed.lock().expect("poisoned");
        if slot.is_none() {
            *slot = Some(reason);
        }
    };
    let blob_done = |j: usize, handle: Option<File>| {
        if jobs[j].remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            finalize(j, handle);
        }
    };
    for &(j, id, unplaced) in &missing {
        fail(j, format!("blob {} is missing from the index", id.short()));
        // The blobs never handed to a pack count down here, so the file
        // still finalizes (as failed) once the placed ones are written.
        for _ in 0..unplaced {
            blob_done(j, None);
        }
    }
    for (j, job) in jobs.iter().enumerate() {
        if entries[job.entry].node.content.is_empty() {
            job.remaining.store(1, Ordering::Release);
            blob_done(j, None);
        }
    }
    let packs: Mutex<Vec<(u32, PackPlan)>> = Mutex::new(by_pack.into_iter().collect());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..crate::parallel::pack_threads(repo.backend()) {
            s.spawn(|| {
                // One decoder and hasher per thread, reused for every blob.
                let mut decoder = FrameDecoder::new().ok();
                let mut hasher = repo.ids().blob_hasher();
                loop {
                    if stop.load(Ordering::Relaxed)
                        || opts
                            .cancel
                            .as_ref()
                            .is_some_and(|c| c.load(Ordering::Relaxed))
                    {
                        break;
                    }
                    let Some((pack_pos, blobs)) = packs.lock().expect("poisoned").pop() else {
                        break;
                    };
                    let pack = index.pack(pack_pos);
                    let fetch_start = std::time::Instant::now();
                    // Read front to back, one frame at a time; a pack whose bytes
                    // or segments fail is salvaged whole instead.
                    let mut source = match repo.open_pack(&pack.id) {
                        Ok(PackRead::Stream(stream)) => PackSource::Stream(stream),
                        Ok(PackRead::Salvaged(salvaged)) => PackSource::Salvaged(Ok(salvaged)),
                        Err(e) => PackSource::Salvaged(Err(e)),
                    };
                    add_ns(&fetch_ns, fetch_start);
                    let mut files: HashMap<usize, File> = HashMap::new();
                    let mut blobs: Vec<_> = blobs.into_iter().collect();
                    blobs.sort_unstable_by_key(|(_, (loc, _))| loc.offset);
                    for (id, (loc, targets)) in blobs {
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
                                for &(j, offset) in &targets {
                                    let job = &jobs[j];
                                    let file = match files.entry(j) {
                                        std::collections::hash_map::Entry::Occupied(o) => {
                                            Ok(o.into_mut())
                                        }
                                        std::collections::hash_map::Entry::Vacant(v) => {
                                            open_temp(job).map(|f| v.insert(f))
                                        }
                                    };
                                    let sparse = entries[job.entry].node.sparse;
                                    match file
                                        .and_then(|f| write_blob(f, piece, offset + at, sparse))
                                    {
                                        Ok(n) => written += n,
                                        Err(e) => {
                                            write_errors.push((j, format!("write failed: {e}")))
                                        }
                                    }
                                }
                                write_time += start.elapsed();
                            };
                            let result = match (&mut source, decoder.as_mut()) {
                                (_, None) => {
                                    Err(FrameError::Invalid("cannot create a zstd decoder".into()))
                                }
                                (PackSource::Stream(stream), Some(d)) => {
                                    match stream.frame(loc.offset, loc.length) {
                                        Ok(mut frame) => {
                                            d.decode(&mut frame, loc.raw_length, &mut sink)
                                        }
                                        Err(e) => Err(FrameError::Read(e)),
                                    }
                                }
                                (PackSource::Salvaged(Ok(p)), Some(d)) => {
                                    match p.frame(loc.offset, loc.length) {
                                        Some(mut frame) => {
                                            d.decode(&mut frame, loc.raw_length, &mut sink)
                                        }
                                        None => Err(FrameError::Invalid(
                                            "it lies in a damaged part of the pack".into(),
                                        )),
                                    }
                                }
                                (PackSource::Salvaged(Err(e)), _) => {
                                    Err(FrameError::Invalid(e.to_string()))
                                }
                            };
                            if matches!(result, Err(FrameError::Read(_)))
                                && matches!(source, PackSource::Stream(_))
                            {
                                // A segment failed: salvage the pack and decode
                                // this blob again from what survives.
                                source = PackSource::Salvaged(repo.read_pack_salvage(&pack.id));
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
                        bytes_written.fetch_add(written, Ordering::Relaxed);
                        write_ns.fetch_add(write_time.as_nanos() as u64, Ordering::Relaxed);
                        decode_ns.fetch_add(
                            (blob_start.elapsed().saturating_sub(write_time)).as_nanos() as u64,
                            Ordering::Relaxed,
                        );
                        for (j, reason) in write_errors.drain(..) {
                            fail(j, reason);
                        }
                        let corrupt = outcome.err().map(|e| {
                            format!(
                            "blob {} in pack {} is corrupt ({e}); run `lifeboat check --read-data`",
                            id.short(),
                            pack.id.short()
                        )
                        });
                        for (j, _) in targets {
                            if let Some(reason) = &corrupt {
                                fail(j, reason.clone());
                            }
                            // The last blob's writer finalizes the file through
                            // its open handle.
                            let handle = if jobs[j].remaining.load(Ordering::Acquire) == 1 {
                                files.remove(&j)
                            } else {
                                None
                            };
                            blob_done(j, handle);
                        }
                    }
                }
            });
        }
    });
    if opts
        .cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
    {
        return Err(Error::Interrupted);
    }
    report.bytes_written = bytes_written.load(Ordering::Relaxed);
    report.timings.fetch_thread_secs = fetch_ns.load(Ordering::Relaxed) as f64 / 1e9;
    report.timings.decode_thread_secs = decode_ns.load(Ordering::Relaxed) as f64 / 1e9;
    report.timings.write_thread_secs = write_ns.load(Ordering::Relaxed) as f64 / 1e9;
    report
        .warnings
        .extend(warnings.into_inner().expect("poisoned"));
    let mut ok_files: Vec<usize> = done_files;
    for job in &jobs {
        match job.failed.lock().expect("poisoned").take() {
            Some(reason) => {
                report.files_restored -= 1;
                report.failures.push(RestoreFailure {
                    path: entries[job.entry].display(),
                    reason,
                });
            }
            None => ok_files.push(job.entry),
        }
    }
    let ok_set: std::collections::HashSet<usize> = ok_files.iter().copied().collect();

    // Phase 4: hard links to files restored above.
    for (i, first) in secondary {
        let e = &entries[i];
        if !ok_set.contains(&first) {
            report.failures.push(RestoreFailure {
                path: e.display(),
                reason: format!(
                    "its hard-link target {} was not restored",
                    entries[first].display()
                ),
            });
            continue;
        }
        let path = target.join(e.rel());
        let first_path = target.join(entries[first].rel());
        match (
            std::fs::symlink_metadata(&path),
            std::fs::metadata(&first_path),
        ) {
            (Ok(a), Ok(b)) if a.ino() == b.ino() && a.dev() == b.dev() => {
                report.others += 1;
                continue;
            }
            (Ok(_), _) if !opts.overwrite => {
                report.conflicts.push(e.display());
                continue;
            }
            (Ok(m), _) if m.is_dir() => {
                report
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
            Ok(()) => report.others += 1,
            Err(err) => report.failures.push(RestoreFailure {
                path: e.display(),
                reason: format!("cannot create hard link: {err}"),
            }),
        }
    }

    // Phase 5: symlinks, devices and FIFOs, now that no more data is written.
    for e in entries.iter() {
        if matches!(
            e.node.kind,
            NodeKind::Dir | NodeKind::File | NodeKind::Socket
        ) || is_blocked(&blocked, &e.snap_path)
        {
            continue;
        }
        let path = target.join(e.rel());
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
                apply_meta(&path, &e.node, is_root, &mut report.warnings);
                report.others += 1;
                continue;
            }
            if !opts.overwrite || m.is_dir() {
                report.conflicts.push(e.display());
                continue;
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
                apply_meta(&path, &e.node, is_root, &mut report.warnings);
                report.others += 1;
            }
            Err(err) => report.failures.push(RestoreFailure {
                path: e.display(),
                reason: err.to_string(),
            }),
        }
    }

    report.timings.data_secs = data_clock.elapsed().as_secs_f64();
    let finish_clock = std::time::Instant::now();
    // Phase 6: verify file contents against the snapshot.
    let verify_clock = std::time::Instant::now();
    if opts.verify {
        for &i in &ok_files {
            let e = &entries[i];
            let path = target.join(e.rel());
            match file_matches(repo, &index, &path, &e.node) {
                Ok(true) => report.files_verified += 1,
                Ok(false) => report.failures.push(RestoreFailure {
                    path: e.display(),
                    reason: "verification failed: content differs from the snapshot".into(),
                }),
                Err(err) => report.failures.push(RestoreFailure {
                    path: e.display(),
                    reason: format!("verification failed: {err}"),
                }),
            }
        }
    }

    report.timings.verify_secs = verify_clock.elapsed().as_secs_f64();
    // Phase 7: directory metadata, deepest first, so writing into a
    // directory does not change its restored mtime.
    for e in entries
        .iter()
        .rev()
        .filter(|e| e.node.kind == NodeKind::Dir)
    {
        if is_blocked(&blocked, &e.snap_path) {
            continue;
        }
        apply_meta(
            &target.join(e.rel()),
            &e.node,
            is_root,
            &mut report.warnings,
        );
    }
    report.timings.finish_secs =
        (finish_clock.elapsed().as_secs_f64() - report.timings.verify_secs).max(0.0);
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
pub fn dump(repo: &Repository, root: &Id, path: &str, out: &mut dyn std::io::Write) -> Result<u64> {
    let index = repo.load_index()?;
    let node = crate::walk::find(repo, &index, root, path.as_bytes())?.ok_or_else(|| {
        Error::Invalid(format!(
            "{path:?} is not in the snapshot (see `lifeboat ls`)"
        ))
    })?;
    if node.kind != NodeKind::File {
        return Err(Error::Invalid(format!(
            "{path:?} is not a regular file; use `lifeboat restore --include` for directories"
        )));
    }
    let mut n = 0u64;
    for id in &node.content {
        let data = repo.read_blob(&index, id)?;
        out.write_all(&data).map_err(|e| Error::io("stdout", e))?;
        n += data.len() as u64;
    }
    Ok(n)
}
