//! The local file cache: which blobs a file had the last time it was read.
//!
//! Keyed by absolute path; an entry is trusted only when size, mtime, ctime
//! and inode all match and every blob it names is still in the repository
//! index, so deleting the cache (or pruning the repository) costs speed and
//! never correctness. Because every hit is checked against the index, new
//! entries can be committed in short batches as the backup goes: several
//! backups on one host share the file (WAL mode, a busy timeout, and no
//! transaction held for a whole backup).
//!
//! An entry also says whether the file had no extended attributes, so an
//! unchanged file costs a backup one `stat` instead of a `stat` and a
//! `listxattr` (each a walk of the whole path). Setting or removing an
//! attribute moves the file's ctime, which the entry must match.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::id::Id;

/// Bumped whenever the table layout changes; an old cache is dropped,
/// except version 1, which gains the `no_xattrs` column (unknown in its
/// entries) and keeps them.
const SCHEMA_VERSION: i64 = 2;

/// What the cache remembers about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// File size.
    pub size: u64,
    /// Modification time in nanoseconds.
    pub mtime_ns: i64,
    /// Change time in nanoseconds.
    pub ctime_ns: i64,
    /// Inode number.
    pub inode: u64,
    /// The file's blobs.
    pub content: Vec<Id>,
    /// The file had no extended attributes (false also when unknown).
    pub no_xattrs: bool,
}

/// An open file cache for one repository.
pub struct FileCache {
    conn: Connection,
    path: PathBuf,
    /// Entries recorded but not yet written.
    pending: std::cell::RefCell<Vec<(Vec<u8>, CacheEntry)>>,
    /// Lookups run inside one read transaction (between batches of
    /// writes): a transaction per lookup cost two fcntl locks each.
    reading: std::cell::Cell<bool>,
}

/// Entries written per transaction.
const BATCH: usize = 4096;

/// True for SQLite errors that mean another connection holds the lock.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy) | Some(rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// True for SQLite errors that mean the file is damaged (as opposed to busy).
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt) | Some(rusqlite::ErrorCode::NotADatabase)
    )
}

impl FileCache {
    /// Opens (creating if needed) the cache for repository `repo_id` under `dir`.
    pub fn open(dir: &Path, repo_id: &str) -> Result<FileCache> {
        let dir = dir.join(repo_id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join("files.sqlite");
        match Self::open_at(&path) {
            Ok(c) => Ok(c),
            Err(Error::Cache { source, .. }) if is_damage(&source) => {
                // A damaged cache is only a cache: start a new one. (Never for
                // "busy": another backup may be using the file.)
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(path.with_extension("sqlite-wal"));
                let _ = std::fs::remove_file(path.with_extension("sqlite-shm"));
                Self::open_at(&path)
            }
            Err(e) => Err(e),
        }
    }

    fn open_at(path: &Path) -> Result<FileCache> {
        // Switching to WAL and creating the schema need a write lock, and
        // SQLite answers "locked" at once (without its busy handler) while
        // another backup on this host does the same; try again for a while.
        let mut attempts = 0;
        loop {
            match Self::setup(path) {
                Err(e) if is_busy(&e) && attempts < 600 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(source) => {
                    return Err(Error::Cache {
                        path: path.to_path_buf(),
                        source,
                    })
                }
                Ok(conn) => {
                    return Ok(FileCache {
                        conn,
                        path: path.to_path_buf(),
                        pending: std::cell::RefCell::new(Vec::new()),
                        reading: std::cell::Cell::new(false),
                    })
                }
            }
        }
    }

    /// Opens the database in WAL mode with the current schema.
    fn setup(path: &Path) -> rusqlite::Result<Connection> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(60))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            // Read again under the write lock: another backup may have
            // upgraded the file meanwhile.
            let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            let layout = match version {
                SCHEMA_VERSION => "",
                1 => "ALTER TABLE files ADD COLUMN no_xattrs INTEGER;",
                _ => {
                    "DROP TABLE IF EXISTS files;
                     CREATE TABLE files (
                         path BLOB PRIMARY KEY,
                         size INTEGER NOT NULL,
                         mtime_ns INTEGER NOT NULL,
                         ctime_ns INTEGER NOT NULL,
                         inode INTEGER NOT NULL,
                         content BLOB NOT NULL,
                         no_xattrs INTEGER
                     ) WITHOUT ROWID;"
                }
            };
            let created = conn
                .execute_batch(layout)
                .and_then(|()| conn.pragma_update(None, "user_version", SCHEMA_VERSION));
            match created {
                Ok(()) => conn.execute_batch("COMMIT")?,
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            }
        }
        Ok(conn)
    }

    fn err(&self, source: rusqlite::Error) -> Error {
        Error::Cache {
            path: self.path.clone(),
            source,
        }
    }

    /// The entry for `path`, if any.
    pub fn lookup(&self, path: &[u8]) -> Result<Option<CacheEntry>> {
        if !self.reading.get() {
            self.conn.execute_batch("BEGIN").map_err(|e| self.err(e))?;
            self.reading.set(true);
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT size, mtime_ns, ctime_ns, inode, content, no_xattrs FROM files
                 WHERE path = ?1",
            )
            .map_err(|e| self.err(e))?;
        let row = stmt
            .query_row(params![path], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, Option<bool>>(5)?,
                ))
            })
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(
            row.and_then(|(size, mtime_ns, ctime_ns, inode, content, no_xattrs)| {
                if content.len() % 32 != 0 {
                    return None;
                }
                Some(CacheEntry {
                    size: size as u64,
                    mtime_ns,
                    ctime_ns,
                    inode: inode as u64,
                    content: content
                        .chunks_exact(32)
                        .map(|c| Id(c.try_into().expect("32 bytes")))
                        .collect(),
                    no_xattrs: no_xattrs.unwrap_or(false),
                })
            }),
        )
    }

    /// Records (or replaces) the entry for `path`; written in batches.
    pub fn record(&self, path: &[u8], entry: &CacheEntry) -> Result<()> {
        let full = {
            let mut pending = self.pending.borrow_mut();
            pending.push((path.to_vec(), entry.clone()));
            pending.len() >= BATCH
        };
        if full {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the pending entries in one short transaction.
    fn flush(&self) -> Result<()> {
        if self.reading.replace(false) {
            self.conn.execute_batch("COMMIT").map_err(|e| self.err(e))?;
        }
        let batch = std::mem::take(&mut *self.pending.borrow_mut());
        if batch.is_empty() {
            return Ok(());
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))?;
        let result = (|| -> rusqlite::Result<()> {
            let mut stmt = self.conn.prepare_cached(
                "INSERT OR REPLACE INTO files
                 (path, size, mtime_ns, ctime_ns, inode, content, no_xattrs)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for (path, entry) in &batch {
                let mut content = Vec::with_capacity(entry.content.len() * 32);
                for id in &entry.content {
                    content.extend_from_slice(&id.0);
                }
                stmt.execute(params![
                    path,
                    entry.size as i64,
                    entry.mtime_ns,
                    entry.ctime_ns,
                    entry.inode as i64,
                    content,
                    entry.no_xattrs
                ])?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => self.conn.execute_batch("COMMIT").map_err(|e| self.err(e)),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(self.err(e))
            }
        }
    }

    /// Writes every pending entry.
    pub fn commit(self) -> Result<()> {
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_commit_and_two_backups_can_share_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let entry = CacheEntry {
            size: 5,
            mtime_ns: 1,
            ctime_ns: 2,
            inode: 3,
            content: vec![Id::of_bytes(b"a"), Id::of_bytes(b"b")],
            no_xattrs: true,
        };
        let cache = FileCache::open(dir.path(), "r").unwrap();
        cache.record(b"/x", &entry).unwrap();
        cache.commit().unwrap();
        // Two connections at once, as two backups on one host.
        let one = FileCache::open(dir.path(), "r").unwrap();
        let two = FileCache::open(dir.path(), "r").unwrap();
        assert_eq!(one.lookup(b"/x").unwrap(), Some(entry.clone()));
        assert_eq!(two.lookup(b"/x").unwrap(), Some(entry.clone()));
        one.record(b"/y", &entry).unwrap();
        two.record(b"/z", &entry).unwrap();
        two.commit().unwrap();
        one.commit().unwrap();
        let cache = FileCache::open(dir.path(), "r").unwrap();
        assert!(cache.lookup(b"/y").unwrap().is_some());
        assert!(cache.lookup(b"/z").unwrap().is_some());
    }

    #[test]
    fn a_version_1_cache_keeps_its_entries_with_attributes_unknown() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("r")).unwrap();
        let old = Connection::open(dir.path().join("r/files.sqlite")).unwrap();
        old.execute_batch(
            "CREATE TABLE files (
                 path BLOB PRIMARY KEY,
                 size INTEGER NOT NULL,
                 mtime_ns INTEGER NOT NULL,
                 ctime_ns INTEGER NOT NULL,
                 inode INTEGER NOT NULL,
                 content BLOB NOT NULL
             ) WITHOUT ROWID;
             PRAGMA user_version = 1;",
        )
        .unwrap();
        let id = Id::of_bytes(b"a");
        old.execute(
            "INSERT INTO files VALUES (?1, 5, 1, 2, 3, ?2)",
            params![b"/x".as_slice(), id.0.as_slice()],
        )
        .unwrap();
        drop(old);
        let cache = FileCache::open(dir.path(), "r").unwrap();
        let entry = cache.lookup(b"/x").unwrap().expect("kept");
        assert_eq!((entry.size, entry.content), (5, vec![id]));
        assert!(!entry.no_xattrs, "unknown reads the attributes");
    }

    #[test]
    fn a_garbage_cache_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("r")).unwrap();
        std::fs::write(dir.path().join("r/files.sqlite"), b"not a database at all").unwrap();
        let cache = FileCache::open(dir.path(), "r").unwrap();
        assert_eq!(cache.lookup(b"/x").unwrap(), None);
    }
}
