//! A repository in a local directory (or any mounted filesystem).
//!
//! Puts are atomic and durable in the order a crash-safe store needs: the
//! bytes go to a temporary file in the destination directory, the file is
//! fsynced, hard-linked to its final name (which, unlike `rename`, fails
//! instead of replacing an existing object, so put-if-absent holds even
//! between processes), the temporary name is removed and the directory is
//! fsynced so the new entry survives power loss. Newly created directories
//! are fsynced into their parent the same way.
//!
//! Objects of 1 MiB and more (packs) are written and read with `O_DIRECT`
//! where the file system allows it (falling back to the page cache where
//! it does not): a backup's packs are not read again soon, so caching
//! them only evicts the server's own working set, and copying them into
//! and out of the page cache was a tenth of a backup's CPU time.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{validate_key, Backend, BackendError, ObjectInfo, PutOutcome};

/// Temporary files of in-progress puts start with this; `list` skips them
/// and `prune` removes stale ones.
pub(crate) const TEMP_PREFIX: &str = ".lbtmp-";

/// Objects at least this large bypass the page cache (see the module docs).
const DIRECT_MIN: usize = 1 << 20;
/// Alignment `O_DIRECT` wants of buffers, lengths and offsets.
const DIRECT_ALIGN: usize = 4096;
/// Size of the aligned bounce buffer a direct write copies through.
const DIRECT_STEP: usize = 1 << 20;

thread_local! {
    /// Each writing thread's bounce buffer for direct writes.
    static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Turns `O_DIRECT` on or off for an open file.
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a valid open descriptor with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Grows `buf` to hold `len` bytes starting at an `O_DIRECT`-aligned
/// address; returns where they start.
fn aligned(buf: &mut Vec<u8>, len: usize) -> usize {
    if buf.len() < len + DIRECT_ALIGN {
        buf.resize(len + DIRECT_ALIGN, 0);
    }
    buf.as_ptr().align_offset(DIRECT_ALIGN)
}

/// Writes `data` to the start of a new, empty file: large data through an
/// aligned bounce buffer with `O_DIRECT` (its unaligned tail through the
/// page cache), the rest, or all of it where direct I/O fails, as usual.
fn write_new_file(file: &mut File, data: &[u8]) -> io::Result<()> {
    if data.len() < DIRECT_MIN || set_direct(file, true).is_err() {
        return file.write_all(data);
    }
    let whole = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    let direct = BOUNCE.with(|bounce| -> io::Result<()> {
        let mut bounce = bounce.borrow_mut();
        for piece in data[..whole].chunks(DIRECT_STEP) {
            let start = aligned(&mut bounce, piece.len());
            let buf = &mut bounce[start..start + piece.len()];
            buf.copy_from_slice(piece);
            // A short direct write would leave the next one unaligned; it
            // counts as a failure and the whole file is rewritten below.
            if file.write(buf)? != buf.len() {
                return Err(io::Error::other("short direct write"));
            }
        }
        Ok(())
    });
    set_direct(file, false)?;
    match direct {
        Ok(()) => file.write_all(&data[whole..]),
        Err(_) => {
            // Some file systems accept the flag and refuse the writes.
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(data)
        }
    }
}

/// Reads a whole file of `len` bytes: a large one with `O_DIRECT` into an
/// aligned part of the returned vector, the rest, or all of it where direct
/// I/O fails, as usual.
fn read_whole_file(file: &mut File, len: usize) -> io::Result<Vec<u8>> {
    if len >= DIRECT_MIN && set_direct(file, true).is_ok() {
        let padded = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        // Room for one more block, so a file that grew is noticed.
        let mut buf = Vec::new();
        let start = aligned(&mut buf, padded + DIRECT_ALIGN);
        let region = &mut buf[start..start + padded + DIRECT_ALIGN];
        let mut filled = 0;
        let read_ok = loop {
            match file.read(&mut region[filled..]) {
                Ok(0) => break true,
                Ok(n) => {
                    filled += n;
                    // A short read is the end of the file (the next offset
                    // would be unaligned); a full region means it grew.
                    if filled % DIRECT_ALIGN != 0 || filled == region.len() {
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        set_direct(file, false)?;
        if read_ok && filled == len {
            buf.copy_within(start..start + len, 0);
            buf.truncate(len);
            return Ok(buf);
        }
        // A short or failed direct read: read it again through the cache.
        file.seek(SeekFrom::Start(0))?;
    }
    let mut buf = Vec::with_capacity(len);
    file.read_to_end(&mut buf)?;
    Ok(buf)
}

/// A [`Backend`] storing each object as a file under a root directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
    /// Keys [`Backend::prefetch`] started reading into the page cache: their
    /// next read goes through the cache (a direct read would ignore it)
    /// and then drops the pages again.
    prefetched: Arc<Mutex<HashSet<String>>>,
}

impl LocalBackend {
    /// A backend rooted at `root`. The directory need not exist yet: the first
    /// put creates it (that is how `init` makes a new repository).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            prefetched: Arc::default(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Creates `dir` and any missing parents, fsyncing each parent that gains
    /// an entry so the directory chain is durable before objects land in it.
    fn ensure_dir(&self, dir: &Path) -> io::Result<()> {
        // The parent of a relative one-word root is "": the current directory.
        if dir.as_os_str().is_empty() || dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.ensure_dir(parent)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => {
                if let Some(parent) = dir.parent() {
                    sync_dir(parent)?;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn walk(
        &self,
        dir: &Path,
        rel: &str,
        prefix: &str,
        out: &mut Vec<ObjectInfo>,
    ) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let key = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            // Prune the walk early: descend only where the prefix can still match.
            if !(key.starts_with(prefix) || prefix.starts_with(&key)) {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                self.walk(&entry.path(), &key, prefix, out)?;
            } else if meta.is_file() && key.starts_with(prefix) {
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                    modified: meta.modified()?,
                });
            }
        }
        Ok(())
    }

    /// Removes temporary files of puts that crashed, older than `age`. Returns
    /// how many were removed.
    fn remove_stale(
        &self,
        age: std::time::Duration,
        now: std::time::SystemTime,
    ) -> io::Result<usize> {
        fn visit(
            dir: &Path,
            age: std::time::Duration,
            now: std::time::SystemTime,
            n: &mut usize,
        ) -> io::Result<()> {
            // A backup running alongside links and removes its temporary
            // files while we walk: an entry gone by the time we look at or
            // remove it is not an error.
            let gone = |r: io::Result<()>| match r {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            };
            for entry in fs::read_dir(dir)? {
                gone((|| {
                    let entry = entry?;
                    let meta = entry.metadata()?;
                    if meta.is_dir() {
                        visit(&entry.path(), age, now, n)?;
                    } else if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
                        && now.duration_since(meta.modified()?).unwrap_or_default() > age
                    {
                        fs::remove_file(entry.path())?;
                        *n += 1;
                    }
                    Ok(())
                })())?;
            }
            Ok(())
        }
        let mut n = 0;
        if self.root.is_dir() {
            visit(&self.root, age, now, &mut n)?;
        }
        Ok(n)
    }
}

/// Fsyncs a directory so that entries created or removed in it are durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

impl Backend for LocalBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        validate_key(key)?;
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let err = |e| BackendError::from_io(key, e);
        if path.exists() {
            return Ok(PutOutcome::AlreadyExists);
        }
        self.ensure_dir(&dir).map_err(|e| BackendError::Permanent {
            key: key.to_string(),
            message: format!("cannot create directory {}: {e}", dir.display()),
        })?;
        let tmp = dir.join(format!(
            "{TEMP_PREFIX}{}",
            hex::encode(rand::random::<[u8; 12]>())
        ));
        let result = (|| -> io::Result<PutOutcome> {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            write_new_file(&mut file, data)?;
            file.sync_all()?;
            drop(file);
            let outcome = match fs::hard_link(&tmp, &path) {
                Ok(()) => PutOutcome::Created,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => PutOutcome::AlreadyExists,
                Err(e) => return Err(e),
            };
            fs::remove_file(&tmp)?;
            sync_dir(&dir)?;
            Ok(outcome)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(err)
    }

    fn put_replacing(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        validate_key(key)?;
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let tmp = dir.join(format!(
            "{TEMP_PREFIX}{}",
            hex::encode(rand::random::<[u8; 12]>())
        ));
        let result = (|| -> io::Result<()> {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            write_new_file(&mut file, data)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, &path)?;
            sync_dir(&dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| BackendError::from_io(key, e))
    }

    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
        validate_key(key)?;
        let err = |e| BackendError::from_io(key, e);
        let mut file = File::open(self.path(key)).map_err(err)?;
        match range {
            None => {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
                let prefetched = self.prefetched.lock().expect("poisoned").remove(key);
                if !prefetched {
                    return read_whole_file(&mut file, len).map_err(err);
                }
                let mut buf = Vec::with_capacity(len);
                file.read_to_end(&mut buf).map_err(err)?;
                // Packs stay out of the page cache, as with direct reads.
                let _ = crate::fsmeta::advise(&file, crate::fsmeta::Advice::DontNeed);
                Ok(buf)
            }
            Some(r) => {
                let len = file.metadata().map_err(err)?.len();
                let r = super::clip_range(Some(r), len);
                let mut buf = vec![0; r.len()];
                file.seek(SeekFrom::Start(r.start as u64)).map_err(err)?;
                file.read_exact(&mut buf).map_err(err)?;
                Ok(buf)
            }
        }
    }

    /// Starts the kernel reading the whole file into the page cache, so a
    /// restore worker finds its next pack there instead of waiting for the
    /// disk (direct reads cannot overlap with decoding the pack before).
    fn prefetch(&self, key: &str) {
        if validate_key(key).is_err() {
            return;
        }
        let Ok(file) = File::open(self.path(key)) else {
            return;
        };
        if crate::fsmeta::advise(&file, crate::fsmeta::Advice::WillNeed).is_ok() {
            let mut keys = self.prefetched.lock().expect("poisoned");
            // Hints are for the next few reads; forget stale ones.
            if keys.len() >= 64 {
                keys.clear();
            }
            keys.insert(key.to_string());
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let mut out = Vec::new();
        // Start the walk at the deepest directory the prefix names whole.
        let (dir_rel, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let start = if dir_rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_rel)
        };
        self.walk(&start, dir_rel, prefix, &mut out)
            .map_err(|e| BackendError::from_io(prefix, e))?;
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        validate_key(key)?;
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    sync_dir(dir).map_err(|e| BackendError::from_io(key, e))?;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::from_io(key, e)),
        }
    }

    fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
        validate_key(key)?;
        let meta = fs::metadata(self.path(key)).map_err(|e| BackendError::from_io(key, e))?;
        if !meta.is_file() {
            return Err(BackendError::NotFound {
                key: key.to_string(),
            });
        }
        Ok(ObjectInfo {
            key: key.to_string(),
            size: meta.len(),
            modified: meta.modified().map_err(|e| BackendError::from_io(key, e))?,
        })
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn remove_stale_temp_files(
        &self,
        older_than: std::time::Duration,
        now: std::time::SystemTime,
    ) -> Result<usize, BackendError> {
        self.remove_stale(older_than, now)
            .map_err(|e| BackendError::from_io(&self.root.display().to_string(), e))
    }
}
