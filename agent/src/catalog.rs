//! The catalog: the agent's local history and its cache of the repository.
//!
//! It records every job run (backups, retention, checks, drills) with its
//! outcome, the snapshots each source has in the repository, and the results
//! of restore drills, so that `lifeboat status`, the metrics endpoint and the
//! RPO/RTO assessment answer without reading the repository. It is one SQLite
//! file in WAL mode and every write is one transaction committed with
//! `synchronous = FULL`, so a crash or a power cut at any moment leaves each
//! write either whole or absent, and a write that returned has reached the
//! disk. The file carries its schema version in `PRAGMA user_version`: opening
//! migrates an older catalog forward, one transaction per step, and refuses a
//! newer one (written by a newer lifeboat) with a clear message, without
//! touching it. Nothing in it is the only copy of anything that matters: the
//! snapshot table can be rebuilt from the repository (`lifeboat catalog
//! rebuild`, see [`records_from_snapshots`]) because every snapshot the agent
//! takes carries a tag `source:<name>` that maps it back to its source. So a
//! damaged file is moved aside and replaced by a fresh one rather than
//! stopping the agent (as the core does with its file cache); only the run
//! and drill history is lost then.
//!
//! Timestamps are stored as fixed-width UTC text (`2024-05-01T03:00:00.000000Z`)
//! so that SQLite's text ordering is time ordering; plain RFC 3339 would sort
//! `…:00Z` after `…:00.5Z`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, Type, ValueRef};
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Row, ToSql, Transaction, TransactionBehavior,
};

/// Schema migrations in order: step `i` takes a catalog from version `i` to
/// version `i + 1`. Append only: never edit a step that has been released,
/// catalogs in the field have already run it.
const MIGRATIONS: &[&str] = &[
    // Version 1: runs, snapshots, drills and a small key/value table.
    "CREATE TABLE runs (
         id INTEGER PRIMARY KEY,
         kind TEXT NOT NULL,
         source TEXT,
         started TEXT NOT NULL,
         ended TEXT,
         outcome TEXT NOT NULL,
         bytes_added INTEGER NOT NULL DEFAULT 0,
         snapshot_id TEXT,
         error TEXT,
         attempt INTEGER NOT NULL DEFAULT 1
     );
     CREATE INDEX runs_kind_source_started ON runs (kind, source, started);
     CREATE INDEX runs_started ON runs (started);
     CREATE TABLE snapshots (
         id TEXT PRIMARY KEY,
         source TEXT NOT NULL,
         time TEXT NOT NULL,
         bytes_added INTEGER NOT NULL,
         total_bytes INTEGER NOT NULL,
         files INTEGER NOT NULL,
         incomplete INTEGER NOT NULL
     );
     CREATE INDEX snapshots_source_time ON snapshots (source, time);
     CREATE TABLE drills (
         id INTEGER PRIMARY KEY,
         source TEXT NOT NULL,
         time TEXT NOT NULL,
         snapshot_id TEXT NOT NULL,
         restore_secs REAL NOT NULL,
         restored_bytes INTEGER NOT NULL,
         verified INTEGER NOT NULL,
         estimated_full_restore_secs REAL,
         report_path TEXT,
         error TEXT
     );
     CREATE INDEX drills_source_time ON drills (source, time);
     CREATE TABLE state (
         key TEXT PRIMARY KEY,
         value TEXT NOT NULL
     ) WITHOUT ROWID;",
];

/// The schema version this code writes: the number of migration steps.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Extra attempts (100 ms apart) at opening while another process holds the
/// lock: switching to WAL can answer "locked" at once, without the busy
/// handler (see `core/src/cache.rs`).
const OPEN_ATTEMPTS: u32 = 100;

/// Fixed-width UTC with microseconds: text order is time order.
const TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// The tag prefix that maps a snapshot back to its source.
pub const SOURCE_TAG_PREFIX: &str = "source:";

/// Key of the row [`Catalog::is_writable`] writes and rolls back.
const PROBE_KEY: &str = "readyz.probe";

/// What can go wrong with the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// SQLite failed on the catalog file.
    #[error(
        "catalog {}: {source} (if this persists: the catalog is only a cache and history, so \
         stop the agent, move the file away and run `lifeboat catalog rebuild`)",
        path.display()
    )]
    Sqlite {
        /// The catalog file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The catalog was written by a newer lifeboat; it is left untouched.
    #[error(
        "catalog {} has schema version {found}, but this lifeboat understands versions up to \
         {supported}; upgrade lifeboat, or (it is only a cache and history) move the file away \
         and run `lifeboat catalog rebuild`",
        path.display()
    )]
    NewerSchema {
        /// The catalog file.
        path: PathBuf,
        /// The version found in the file.
        found: i64,
        /// The newest version this code understands.
        supported: i64,
    },
    /// A file system operation on the catalog's file or directory failed.
    #[error(
        "catalog {}: {source} (the agent's user must be able to create and write it)",
        path.display()
    )]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Result with a [`CatalogError`].
pub type Result<T> = std::result::Result<T, CatalogError>;

/// A name that is not one of a fixed set (a job kind, an outcome).
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown {what} {name:?} (expected one of: {expected})")]
pub struct UnknownName {
    what: &'static str,
    name: String,
    expected: &'static str,
}

/// The kinds of job the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// A backup of one source.
    Backup,
    /// Forgetting snapshots by the retention policy (and pruning).
    Retention,
    /// A repository check.
    Check,
    /// A restore drill of one source.
    Drill,
}

impl JobKind {
    /// Every kind, in a stable order (for metrics that list all of them).
    pub const ALL: [JobKind; 4] = [
        JobKind::Backup,
        JobKind::Retention,
        JobKind::Check,
        JobKind::Drill,
    ];

    /// The name stored in the catalog and shown to people, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Retention => "retention",
            JobKind::Check => "check",
            JobKind::Drill => "drill",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = UnknownName;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "job kind",
                name: s.to_string(),
                expected: "backup, retention, check, drill",
            })
    }
}

/// How a run ended (or that it has not yet).
///
/// Serialised in snake case, which for every variant but `TimedOut`
/// (`timed_out`) is its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Started and not finished.
    Running,
    /// Finished and did what it was for.
    Success,
    /// Finished with an error.
    Failed,
    /// Stopped by a shutdown or a crash before it finished.
    Interrupted,
    /// Stopped because it ran past its time limit.
    TimedOut,
}

impl Outcome {
    /// Every outcome, in a stable order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Running,
        Outcome::Success,
        Outcome::Failed,
        Outcome::Interrupted,
        Outcome::TimedOut,
    ];

    /// The name stored in the catalog and shown to people, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Interrupted => "interrupted",
            Outcome::TimedOut => "timed_out",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = UnknownName;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "outcome",
                name: s.to_string(),
                expected: "running, success, failed, interrupted, timed_out",
            })
    }
}

impl ToSql for JobKind {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl FromSql for JobKind {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value
            .as_str()?
            .parse()
            .map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

impl ToSql for Outcome {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl FromSql for Outcome {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value
            .as_str()?
            .parse()
            .map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

/// One job run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    /// The catalog's number for the run.
    pub id: i64,
    /// What kind of job.
    pub kind: JobKind,
    /// The source it was for (none for repository-wide jobs such as checks).
    pub source: Option<String>,
    /// When it started.
    pub started: DateTime<Utc>,
    /// When it ended (none while running).
    pub ended: Option<DateTime<Utc>>,
    /// How it ended.
    pub outcome: Outcome,
    /// Bytes it added to the repository (stored size, after compression).
    pub bytes_added: u64,
    /// The snapshot it wrote, if any.
    pub snapshot_id: Option<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Which attempt this was (1 for the first, higher for retries).
    pub attempt: u32,
}

/// One snapshot of a source, as the catalog remembers it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotRecord {
    /// The snapshot's ID (full hex).
    pub id: String,
    /// The source it belongs to.
    pub source: String,
    /// When its backup started (the point in time it captures).
    pub time: DateTime<Utc>,
    /// Bytes its backup added to the repository (stored size).
    pub bytes_added: u64,
    /// Total size of the files in it.
    pub total_bytes: u64,
    /// Number of files in it.
    pub files: u64,
    /// Some entries could not be read; it does not count for the RPO.
    pub incomplete: bool,
}

/// The result of one restore drill.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrillRecord {
    /// The catalog's number for the drill (ignored by [`Catalog::record_drill`],
    /// which assigns it).
    pub id: i64,
    /// The source drilled.
    pub source: String,
    /// When the drill ran.
    pub time: DateTime<Utc>,
    /// The snapshot restored.
    pub snapshot_id: String,
    /// Wall time of the restore, in seconds.
    pub restore_secs: f64,
    /// Bytes restored.
    pub restored_bytes: u64,
    /// The restored data matched the snapshot.
    pub verified: bool,
    /// The restore time extrapolated to the whole source (the RTO actual),
    /// when the drill restored only a sample.
    pub estimated_full_restore_secs: Option<f64>,
    /// Where the drill's report was written.
    pub report_path: Option<String>,
    /// Why the drill failed, if it did.
    pub error: Option<String>,
}

/// Runs per (kind, source, outcome), for the metrics counters.
pub type RunCount = (JobKind, Option<String>, Outcome, u64);

/// An open catalog. Safe to share between threads; calls block (run them
/// off the async reactor, e.g. in `spawn_blocking`).
pub struct Catalog {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Catalog").field("path", &self.path).finish()
    }
}

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

fn sqlite_error(path: &Path, source: rusqlite::Error) -> CatalogError {
    CatalogError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

fn io_error(path: &Path, source: std::io::Error) -> CatalogError {
    CatalogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `path` with `suffix` appended to its file name (`x.sqlite` → `x.sqlite-wal`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

/// Refuses a version this code does not understand (newer, or negative,
/// which no lifeboat writes).
fn check_version(path: &Path, found: i64) -> Result<()> {
    if (0..=SCHEMA_VERSION).contains(&found) {
        Ok(())
    } else {
        Err(CatalogError::NewerSchema {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        })
    }
}

/// Creates the catalog's directory (0700) and file (0600) if they are
/// missing, so that SQLite (which creates its `-wal` and `-shm` files with
/// the database's mode) never makes them readable by others. Existing ones
/// are left as they are.
fn create_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error(dir, e))?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    Ok(())
}

/// Moves a damaged catalog (and its WAL, which belongs with it) to
/// `<name>.corrupt-<unix time>` and returns where it went.
fn move_aside(path: &Path) -> Result<PathBuf> {
    let now = Utc::now().timestamp();
    let mut aside = with_suffix(path, &format!(".corrupt-{now}"));
    let mut n = 1;
    while aside.exists() {
        aside = with_suffix(path, &format!(".corrupt-{now}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &aside).map_err(|e| io_error(path, e))?;
    // A WAL left behind would be replayed into the fresh database (and the
    // shared-memory index describes it): keep the WAL with the damaged file,
    // drop the index, which SQLite rebuilds.
    let wal = with_suffix(path, "-wal");
    if wal.exists() {
        let wal_aside = with_suffix(&aside, "-wal");
        std::fs::rename(&wal, &wal_aside).map_err(|e| io_error(&wal, e))?;
    }
    let shm = with_suffix(path, "-shm");
    match std::fs::remove_file(&shm) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error(&shm, e)),
        _ => {}
    }
    Ok(aside)
}

/// Opens the file read-write, retrying while another process holds the lock.
fn open_read_write(path: &Path) -> Result<Connection> {
    let mut attempts = 0;
    loop {
        match setup_read_write(path) {
            Err(CatalogError::Sqlite { source, .. })
                if is_busy(&source) && attempts < OPEN_ATTEMPTS =>
            {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Opens the file in WAL mode and migrates it to the current schema.
fn setup_read_write(path: &Path) -> Result<Connection> {
    let sqlite = |source: rusqlite::Error| sqlite_error(path, source);
    // Not SQLITE_OPEN_CREATE: `create_file` made the file with its mode.
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
    // The version is read before anything writes, so that a newer catalog
    // is refused without being modified (not even its journal mode).
    check_version(path, user_version(&conn).map_err(sqlite)?)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(sqlite)?;
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!(
            "catalog {}: SQLite kept journal mode {mode:?} instead of WAL; \
             writes stay safe but block readers",
            path.display()
        );
    }
    // FULL rather than NORMAL: the catalog sees a few writes per job, and
    // with FULL a commit that returned survives a power cut too.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(sqlite)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Applies the migration steps the file has not had, one transaction each.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let sqlite = |source: rusqlite::Error| sqlite_error(path, source);
    if user_version(conn).map_err(sqlite)? == SCHEMA_VERSION {
        return Ok(());
    }
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite)?;
        // Read again under the write lock: another process may have
        // migrated the file meanwhile, possibly past this version.
        let version = user_version(&tx).map_err(sqlite)?;
        check_version(path, version)?;
        let Some(step) = usize::try_from(version)
            .ok()
            .and_then(|v| MIGRATIONS.get(v))
        else {
            // Up to date; dropping `tx` ends the empty transaction.
            return Ok(());
        };
        tx.execute_batch(step).map_err(sqlite)?;
        tx.pragma_update(None, "user_version", version + 1)
            .map_err(sqlite)?;
        tx.commit().map_err(sqlite)?;
        if version > 0 {
            log::info!(
                "catalog {}: migrated schema from version {version} to {}",
                path.display(),
                version + 1
            );
        }
    }
}

/// Formats a time for storage (see the module docs).
fn timestamp(t: DateTime<Utc>) -> String {
    t.format(TIME_FORMAT).to_string()
}

/// Reads a stored time from column `idx`.
fn time_column(row: &Row<'_>, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    let text: String = row.get(idx)?;
    parse_time(&text, idx)
}

/// Reads an optional stored time from column `idx`.
fn optional_time_column(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|t| parse_time(&t, idx)).transpose()
}

fn parse_time(text: &str, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
}

/// SQLite integers are signed; sizes beyond `i64::MAX` (8 EiB) are clamped.
fn to_sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads a size or count from column `idx`; a negative value (which this
/// code never writes) reads as 0.
fn u64_column(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// The columns `run_from_row` reads, in order.
macro_rules! run_columns {
    () => {
        "id, kind, source, started, ended, outcome, bytes_added, snapshot_id, error, attempt"
    };
}

fn run_from_row(row: &Row<'_>) -> rusqlite::Result<RunRecord> {
    let attempt: i64 = row.get(9)?;
    Ok(RunRecord {
        id: row.get(0)?,
        kind: row.get(1)?,
        source: row.get(2)?,
        started: time_column(row, 3)?,
        ended: optional_time_column(row, 4)?,
        outcome: row.get(5)?,
        bytes_added: u64_column(row, 6)?,
        snapshot_id: row.get(7)?,
        error: row.get(8)?,
        attempt: u32::try_from(attempt).unwrap_or(0),
    })
}

/// The columns `snapshot_from_row` reads, in order.
macro_rules! snapshot_columns {
    () => {
        "id, source, time, bytes_added, total_bytes, files, incomplete"
    };
}

fn snapshot_from_row(row: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        id: row.get(0)?,
        source: row.get(1)?,
        time: time_column(row, 2)?,
        bytes_added: u64_column(row, 3)?,
        total_bytes: u64_column(row, 4)?,
        files: u64_column(row, 5)?,
        incomplete: row.get(6)?,
    })
}

/// The columns `drill_from_row` reads, in order.
macro_rules! drill_columns {
    () => {
        "id, source, time, snapshot_id, restore_secs, restored_bytes, verified, \
         estimated_full_restore_secs, report_path, error"
    };
}

fn drill_from_row(row: &Row<'_>) -> rusqlite::Result<DrillRecord> {
    Ok(DrillRecord {
        id: row.get(0)?,
        source: row.get(1)?,
        time: time_column(row, 2)?,
        snapshot_id: row.get(3)?,
        restore_secs: row.get(4)?,
        restored_bytes: u64_column(row, 5)?,
        verified: row.get(6)?,
        estimated_full_restore_secs: row.get(7)?,
        report_path: row.get(8)?,
        error: row.get(9)?,
    })
}

/// Inserts or replaces one snapshot row.
fn upsert_snapshot(tx: &Transaction<'_>, s: &SnapshotRecord) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO snapshots (id, source, time, bytes_added, total_bytes, files, incomplete)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (id) DO UPDATE SET
             source = excluded.source,
             time = excluded.time,
             bytes_added = excluded.bytes_added,
             total_bytes = excluded.total_bytes,
             files = excluded.files,
             incomplete = excluded.incomplete",
    )?
    .execute(params![
        s.id,
        s.source,
        timestamp(s.time),
        to_sql_u64(s.bytes_added),
        to_sql_u64(s.total_bytes),
        to_sql_u64(s.files),
        s.incomplete,
    ])?;
    Ok(())
}

impl Catalog {
    /// Opens the catalog at `path` for the agent, creating its directory
    /// (mode 0700) and file (0600) if needed, and migrating it to the
    /// current schema. A file SQLite reports as damaged is moved aside to
    /// `<name>.corrupt-<unix time>` and a fresh catalog takes its place; a
    /// catalog from a newer lifeboat is refused and left untouched.
    pub fn open(path: &Path) -> Result<Catalog> {
        create_file(path)?;
        let conn = match open_read_write(path) {
            Err(CatalogError::Sqlite { source, .. }) if is_damage(&source) => {
                // Only a cache and history: start again rather than stop the
                // agent. (Never for "busy": another process may be using it.)
                let aside = move_aside(path)?;
                log::warn!(
                    "catalog {} is damaged ({source}); moved it to {} and started a fresh \
                     one: run history is lost, run `lifeboat catalog rebuild` to restore \
                     the snapshot list",
                    path.display(),
                    aside.display()
                );
                create_file(path)?;
                open_read_write(path)?
            }
            other => other?,
        };
        Ok(Catalog {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    /// Opens the catalog read-only, for `lifeboat status` while the agent
    /// owns the file: nothing is created, migrated or moved, and writes
    /// fail. `Ok(None)` when the file does not exist or holds no catalog
    /// this version can read yet (the agent has not created the schema, or
    /// has not yet migrated an older one, which it does when it starts).
    pub fn open_read_only(path: &Path) -> Result<Option<Catalog>> {
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(path, e)),
        }
        let sqlite = |source: rusqlite::Error| sqlite_error(path, source);
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
        let found = user_version(&conn).map_err(sqlite)?;
        check_version(path, found)?;
        if found < SCHEMA_VERSION {
            if found > 0 {
                log::warn!(
                    "catalog {} has schema version {found}; the agent upgrades it to \
                     {SCHEMA_VERSION} when it next starts",
                    path.display()
                );
            }
            return Ok(None);
        }
        Ok(Some(Catalog {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        }))
    }

    /// The catalog file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A thread that panicked while holding the lock left nothing half
        // done: its open transaction rolled back as the guard unwound.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn err(&self, source: rusqlite::Error) -> CatalogError {
        sqlite_error(&self.path, source)
    }

    /// Runs `f` on the connection (one statement is its own transaction).
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.lock();
        f(&conn).map_err(|e| self.err(e))
    }

    /// Runs `f` in one write transaction, committed if it succeeds and
    /// rolled back otherwise. IMMEDIATE takes the write lock up front (with
    /// the busy timeout), so the transaction cannot fail later on upgrading
    /// a read lock.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let value = f(&tx).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(value)
    }

    /// Records that a run started (outcome `Running`) and returns its ID,
    /// for [`Catalog::finish_run`].
    pub fn start_run(
        &self,
        kind: JobKind,
        source: Option<&str>,
        started: DateTime<Utc>,
        attempt: u32,
    ) -> Result<i64> {
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO runs (kind, source, started, outcome, bytes_added, attempt)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5)",
            )?
            .execute(params![
                kind,
                source,
                timestamp(started),
                Outcome::Running,
                attempt
            ])?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Records how run `id` ended. A run the catalog does not have (the
    /// file was replaced while the job ran) is logged and skipped: losing
    /// history must not fail the job.
    pub fn finish_run(
        &self,
        id: i64,
        ended: DateTime<Utc>,
        outcome: Outcome,
        bytes_added: u64,
        snapshot_id: Option<&str>,
        error: Option<&str>,
    ) -> Result<()> {
        let changed = self.write(|tx| {
            tx.prepare_cached(
                "UPDATE runs
                 SET ended = ?2, outcome = ?3, bytes_added = ?4, snapshot_id = ?5, error = ?6
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                timestamp(ended),
                outcome,
                to_sql_u64(bytes_added),
                snapshot_id,
                error
            ])
        })?;
        if changed == 0 {
            log::warn!(
                "catalog {}: run {id} is not in the catalog; \
                 its outcome ({outcome}) is not recorded",
                self.path.display()
            );
        }
        Ok(())
    }

    /// Marks every run still `Running` as `Interrupted`, ended at `now`,
    /// and returns how many there were. Called when the agent starts: no run
    /// of its own is in flight yet, so these were cut short by a crash or a
    /// kill.
    pub fn mark_unfinished_interrupted(&self, now: DateTime<Utc>) -> Result<usize> {
        self.write(|tx| {
            tx.prepare_cached(
                "UPDATE runs
                 SET outcome = ?1, ended = ?2,
                     error = COALESCE(error, 'the agent stopped before the run finished')
                 WHERE outcome = ?3",
            )?
            .execute(params![
                Outcome::Interrupted,
                timestamp(now),
                Outcome::Running
            ])
        })
    }

    /// Records a snapshot, replacing any record with the same ID.
    pub fn record_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        self.write(|tx| upsert_snapshot(tx, s))
    }

    /// Records a drill result and returns the ID the catalog gave it
    /// (`d.id` is ignored).
    pub fn record_drill(&self, d: &DrillRecord) -> Result<i64> {
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO drills (source, time, snapshot_id, restore_secs, restored_bytes,
                                     verified, estimated_full_restore_secs, report_path, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                d.source,
                timestamp(d.time),
                d.snapshot_id,
                d.restore_secs,
                to_sql_u64(d.restored_bytes),
                d.verified,
                d.estimated_full_restore_secs,
                d.report_path,
                d.error,
            ])?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// The newest *complete* snapshot of `source`: the one the RPO counts
    /// from (an incomplete snapshot does not protect the files it missed).
    pub fn last_snapshot(&self, source: &str) -> Result<Option<SnapshotRecord>> {
        self.read(|conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                snapshot_columns!(),
                " FROM snapshots WHERE source = ?1 AND incomplete = 0
                  ORDER BY time DESC, id DESC LIMIT 1"
            ))?
            .query_row(params![source], snapshot_from_row)
            .optional()
        })
    }

    /// The newest drill of `source`, whether it passed or not.
    pub fn last_drill(&self, source: &str) -> Result<Option<DrillRecord>> {
        self.read(|conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                drill_columns!(),
                " FROM drills WHERE source = ?1 ORDER BY time DESC, id DESC LIMIT 1"
            ))?
            .query_row(params![source], drill_from_row)
            .optional()
        })
    }

    /// The most recently started run of `kind` for `source` (`None` matches
    /// repository-wide runs), whatever its outcome.
    pub fn last_run(&self, kind: JobKind, source: Option<&str>) -> Result<Option<RunRecord>> {
        self.read(|conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                run_columns!(),
                " FROM runs WHERE kind = ?1 AND source IS ?2
                  ORDER BY started DESC, id DESC LIMIT 1"
            ))?
            .query_row(params![kind, source], run_from_row)
            .optional()
        })
    }

    /// The most recently started successful run of `kind` for `source`
    /// (`None` matches repository-wide runs).
    pub fn last_success(&self, kind: JobKind, source: Option<&str>) -> Result<Option<RunRecord>> {
        self.read(|conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                run_columns!(),
                " FROM runs WHERE kind = ?1 AND source IS ?2 AND outcome = ?3
                  ORDER BY started DESC, id DESC LIMIT 1"
            ))?
            .query_row(params![kind, source, Outcome::Success], run_from_row)
            .optional()
        })
    }

    /// Up to `limit` runs, most recently started first.
    pub fn recent_runs(&self, limit: usize) -> Result<Vec<RunRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                run_columns!(),
                " FROM runs ORDER BY started DESC, id DESC LIMIT ?1"
            ))?
            .query_map(params![limit], run_from_row)?
            .collect()
        })
    }

    /// The number of runs per (kind, source, outcome), for the metrics
    /// counters; sorted by kind, source and outcome name.
    pub fn run_counts(&self) -> Result<Vec<RunCount>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT kind, source, outcome, COUNT(*) FROM runs
                 GROUP BY kind, source, outcome
                 ORDER BY kind, source, outcome",
            )?
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, u64_column(row, 3)?))
            })?
            .collect()
        })
    }

    /// Replaces the whole snapshot table with `snaps` in one transaction
    /// (`lifeboat catalog rebuild`): readers see the old list or the new
    /// one, never a mix. A snapshot ID given twice keeps its last record.
    pub fn replace_snapshots(&self, snaps: &[SnapshotRecord]) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM snapshots", [])?;
            for s in snaps {
                upsert_snapshot(tx, s)?;
            }
            Ok(())
        })
    }

    /// Sets `key` to `value` in the small key/value table (e.g. the last
    /// alert sent per source, for webhook de-duplication, or the last
    /// scheduler tick).
    pub fn set_state(&self, key: &str, value: &str) -> Result<()> {
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO state (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![key, value])?;
            Ok(())
        })
    }

    /// The value of `key` in the key/value table, if set.
    pub fn state(&self, key: &str) -> Result<Option<String>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT value FROM state WHERE key = ?1")?
                .query_row(params![key], |row| row.get(0))
                .optional()
        })
    }

    /// Succeeds when the catalog can take a write now (for `/readyz`): takes
    /// the write lock, writes a row and rolls the write back. Fails on a
    /// read-only catalog, a file the agent can no longer write, or a lock
    /// held past the busy timeout.
    pub fn is_writable(&self) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT OR REPLACE INTO state (key, value) VALUES (?1, '')",
            params![PROBE_KEY],
        )
        .map_err(|e| self.err(e))?;
        tx.rollback().map_err(|e| self.err(e))
    }
}

/// Where an actual value stands against its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    /// Comfortably within the target (below 80 % of it).
    Ok,
    /// Within the target but close to it (80 % up to 100 %).
    AtRisk,
    /// Past the target.
    Breached,
    /// Nothing measured yet.
    Unknown,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Ok => "OK",
            Health::AtRisk => "AT RISK",
            Health::Breached => "BREACHED",
            Health::Unknown => "UNKNOWN",
        })
    }
}

/// Where an actual value stands against its target: OK below 80 % of the
/// target, AT RISK from 80 % up to the target, BREACHED above it; Unknown
/// when there is no measurement.
pub fn assess(actual: Option<Duration>, target: Duration) -> Health {
    let Some(actual) = actual else {
        return Health::Unknown;
    };
    // In whole nanoseconds, so that exactly 80 % is AT RISK (no float
    // rounding at the boundary). u128 cannot overflow: both are < 2^94.
    let (actual, target) = (actual.as_nanos(), target.as_nanos());
    if actual * 5 < target * 4 {
        Health::Ok
    } else if actual <= target {
        Health::AtRisk
    } else {
        Health::Breached
    }
}

/// RPO actual for a source: `now` − the time of its last complete snapshot
/// (`None` if it has none). A snapshot dated in the future (clock skew)
/// counts as zero.
pub fn rpo_actual(last: Option<&SnapshotRecord>, now: DateTime<Utc>) -> Option<Duration> {
    last.map(|s| (now - s.time).to_std().unwrap_or(Duration::ZERO))
}

/// The tag the agent puts on a snapshot of `source`, which maps it back to
/// the source when the catalog is rebuilt.
pub fn source_tag(source: &str) -> String {
    format!("{SOURCE_TAG_PREFIX}{source}")
}

/// The snapshots of a repository listing that belong to sources, by their
/// `source:<name>` tag, as records for [`Catalog::replace_snapshots`].
/// Snapshots without such a tag (taken by hand) are left out; a snapshot
/// with several belongs to the first.
pub fn records_from_snapshots(
    snaps: &[(lifeboat_core::Id, lifeboat_core::Snapshot)],
) -> Vec<SnapshotRecord> {
    snaps
        .iter()
        .filter_map(|(id, snap)| {
            let source = snap
                .tags
                .iter()
                .filter_map(|t| t.strip_prefix(SOURCE_TAG_PREFIX))
                .find(|name| !name.is_empty())?;
            let summary = &snap.summary;
            Some(SnapshotRecord {
                id: id.to_hex(),
                source: source.to_string(),
                time: snap.time,
                bytes_added: summary.bytes_added_stored,
                total_bytes: summary.total_bytes,
                files: summary
                    .files_new
                    .saturating_add(summary.files_changed)
                    .saturating_add(summary.files_unmodified),
                incomplete: snap.incomplete,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// A fixed time `secs` seconds after a base instant.
    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn snapshot(id: &str, source: &str, time: DateTime<Utc>, incomplete: bool) -> SnapshotRecord {
        SnapshotRecord {
            id: id.to_string(),
            source: source.to_string(),
            time,
            bytes_added: 10,
            total_bytes: 100,
            files: 3,
            incomplete,
        }
    }

    fn drill(source: &str, time: DateTime<Utc>) -> DrillRecord {
        DrillRecord {
            id: 0,
            source: source.to_string(),
            time,
            snapshot_id: "abc".to_string(),
            restore_secs: 12.5,
            restored_bytes: 4096,
            verified: true,
            estimated_full_restore_secs: Some(600.0),
            report_path: Some("/var/lib/lifeboat/drills/1.json".to_string()),
            error: None,
        }
    }

    fn new_catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog.sqlite")).unwrap();
        (dir, catalog)
    }

    #[test]
    fn runs_round_trip() {
        let (_dir, catalog) = new_catalog();
        let started = at(0) + chrono::Duration::microseconds(123_456);
        let id = catalog
            .start_run(JobKind::Backup, Some("home"), started, 1)
            .unwrap();
        let running = catalog
            .last_run(JobKind::Backup, Some("home"))
            .unwrap()
            .unwrap();
        assert_eq!(running.id, id);
        assert_eq!(running.outcome, Outcome::Running);
        assert_eq!(running.started, started);
        assert_eq!(running.ended, None);
        assert!(catalog
            .last_success(JobKind::Backup, Some("home"))
            .unwrap()
            .is_none());

        catalog
            .finish_run(id, at(60), Outcome::Success, 5000, Some("snap1"), None)
            .unwrap();
        let second = catalog
            .start_run(JobKind::Backup, Some("home"), at(120), 2)
            .unwrap();
        catalog
            .finish_run(
                second,
                at(130),
                Outcome::TimedOut,
                0,
                None,
                Some("took too long"),
            )
            .unwrap();
        let check = catalog.start_run(JobKind::Check, None, at(200), 1).unwrap();
        catalog
            .finish_run(check, at(210), Outcome::Success, 0, None, None)
            .unwrap();

        let success = catalog
            .last_success(JobKind::Backup, Some("home"))
            .unwrap()
            .unwrap();
        assert_eq!(success.id, id);
        assert_eq!(success.ended, Some(at(60)));
        assert_eq!(success.bytes_added, 5000);
        assert_eq!(success.snapshot_id.as_deref(), Some("snap1"));
        assert_eq!(success.attempt, 1);

        let last = catalog
            .last_run(JobKind::Backup, Some("home"))
            .unwrap()
            .unwrap();
        assert_eq!(last.id, second);
        assert_eq!(last.outcome, Outcome::TimedOut);
        assert_eq!(last.error.as_deref(), Some("took too long"));
        assert_eq!(last.attempt, 2);

        // `None` means repository-wide runs, not "any source".
        assert_eq!(
            catalog.last_run(JobKind::Check, None).unwrap().unwrap().id,
            check
        );
        assert!(catalog.last_run(JobKind::Backup, None).unwrap().is_none());
        assert!(catalog
            .last_run(JobKind::Backup, Some("other"))
            .unwrap()
            .is_none());

        let recent: Vec<i64> = catalog
            .recent_runs(2)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(recent, vec![check, second]);

        let counts = catalog.run_counts().unwrap();
        assert_eq!(
            counts,
            vec![
                (
                    JobKind::Backup,
                    Some("home".to_string()),
                    Outcome::Success,
                    1
                ),
                (
                    JobKind::Backup,
                    Some("home".to_string()),
                    Outcome::TimedOut,
                    1
                ),
                (JobKind::Check, None, Outcome::Success, 1),
            ]
        );
    }

    #[test]
    fn kinds_and_outcomes_parse_their_names_and_serialise_the_same() {
        for kind in JobKind::ALL {
            assert_eq!(kind.as_str().parse::<JobKind>().unwrap(), kind);
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.as_str())
            );
        }
        for outcome in Outcome::ALL {
            assert_eq!(outcome.as_str().parse::<Outcome>().unwrap(), outcome);
            assert_eq!(
                serde_json::to_value(outcome).unwrap(),
                serde_json::json!(outcome.as_str())
            );
        }
        assert!("backups".parse::<JobKind>().is_err());
        assert!("ok".parse::<Outcome>().is_err());
    }

    #[test]
    fn unfinished_runs_become_interrupted() {
        let (_dir, catalog) = new_catalog();
        let crashed = catalog
            .start_run(JobKind::Backup, Some("home"), at(0), 1)
            .unwrap();
        let done = catalog
            .start_run(JobKind::Backup, Some("etc"), at(0), 1)
            .unwrap();
        catalog
            .finish_run(done, at(10), Outcome::Success, 1, Some("s"), None)
            .unwrap();

        assert_eq!(catalog.mark_unfinished_interrupted(at(100)).unwrap(), 1);
        let run = catalog
            .last_run(JobKind::Backup, Some("home"))
            .unwrap()
            .unwrap();
        assert_eq!(run.id, crashed);
        assert_eq!(run.outcome, Outcome::Interrupted);
        assert_eq!(run.ended, Some(at(100)));
        assert!(run.error.is_some());
        let other = catalog
            .last_run(JobKind::Backup, Some("etc"))
            .unwrap()
            .unwrap();
        assert_eq!(other.outcome, Outcome::Success);
        assert_eq!(catalog.mark_unfinished_interrupted(at(200)).unwrap(), 0);
    }

    #[test]
    fn last_snapshot_ignores_incomplete_ones_and_picks_the_newest() {
        let (_dir, catalog) = new_catalog();
        assert!(catalog.last_snapshot("home").unwrap().is_none());
        // Half a second after a whole second: plain RFC 3339 text ("…:20Z"
        // against "…:20.500Z") would sort these the wrong way round.
        let whole = at(20);
        let later = at(20) + chrono::Duration::milliseconds(500);
        catalog
            .record_snapshot(&snapshot("b", "home", later, false))
            .unwrap();
        catalog
            .record_snapshot(&snapshot("a", "home", whole, false))
            .unwrap();
        catalog
            .record_snapshot(&snapshot("c", "home", at(30), true))
            .unwrap();
        catalog
            .record_snapshot(&snapshot("d", "etc", at(40), false))
            .unwrap();

        let last = catalog.last_snapshot("home").unwrap().unwrap();
        assert_eq!(last.id, "b");
        assert_eq!(last.time, later);
        assert_eq!(
            (last.bytes_added, last.total_bytes, last.files),
            (10, 100, 3)
        );

        // Recording an ID again replaces it: "b" turns out incomplete.
        catalog
            .record_snapshot(&snapshot("b", "home", later, true))
            .unwrap();
        assert_eq!(catalog.last_snapshot("home").unwrap().unwrap().id, "a");

        // A rebuild replaces the whole list.
        catalog
            .replace_snapshots(&[snapshot("e", "home", at(50), false)])
            .unwrap();
        assert_eq!(catalog.last_snapshot("home").unwrap().unwrap().id, "e");
        assert!(catalog.last_snapshot("etc").unwrap().is_none());
    }

    #[test]
    fn drills_round_trip_and_the_newest_is_last() {
        let (_dir, catalog) = new_catalog();
        assert!(catalog.last_drill("home").unwrap().is_none());
        let first = catalog.record_drill(&drill("home", at(0))).unwrap();
        let mut failed = drill("home", at(10));
        failed.verified = false;
        failed.estimated_full_restore_secs = None;
        failed.report_path = None;
        failed.error = Some("mismatch in /etc/passwd".to_string());
        let second = catalog.record_drill(&failed).unwrap();
        assert_ne!(first, second);

        let last = catalog.last_drill("home").unwrap().unwrap();
        assert_eq!(last.id, second);
        assert_eq!(last.time, at(10));
        assert!(!last.verified);
        assert_eq!(last.estimated_full_restore_secs, None);
        assert_eq!(last.error.as_deref(), Some("mismatch in /etc/passwd"));
        assert_eq!(last.restore_secs, 12.5);
        assert_eq!(last.restored_bytes, 4096);
        assert!(catalog.last_drill("etc").unwrap().is_none());
    }

    #[test]
    fn state_round_trips_and_the_catalog_is_writable() {
        let (_dir, catalog) = new_catalog();
        assert_eq!(catalog.state("alert.home").unwrap(), None);
        catalog.set_state("alert.home", "breached").unwrap();
        catalog.set_state("alert.home", "ok").unwrap();
        assert_eq!(catalog.state("alert.home").unwrap().as_deref(), Some("ok"));
        catalog.is_writable().unwrap();
        // The probe's write was rolled back.
        assert_eq!(catalog.state(PROBE_KEY).unwrap(), None);
    }

    #[test]
    fn assess_thresholds() {
        let target = Duration::from_secs(100);
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(assess(secs(0), target), Health::Ok);
        assert_eq!(assess(secs(79), target), Health::Ok);
        assert_eq!(assess(secs(80), target), Health::AtRisk);
        assert_eq!(assess(secs(100), target), Health::AtRisk);
        assert_eq!(assess(secs(101), target), Health::Breached);
        assert_eq!(assess(None, target), Health::Unknown);
        assert_eq!(Health::AtRisk.to_string(), "AT RISK");
        assert_eq!(
            serde_json::to_value(Health::AtRisk).unwrap(),
            serde_json::json!("AT_RISK")
        );
    }

    #[test]
    fn rpo_actual_counts_from_the_last_complete_snapshot() {
        let snap = snapshot("a", "home", at(0), false);
        assert_eq!(
            rpo_actual(Some(&snap), at(90)),
            Some(Duration::from_secs(90))
        );
        // Clock skew: a snapshot from the future is zero old, not an error.
        assert_eq!(rpo_actual(Some(&snap), at(-5)), Some(Duration::ZERO));
        assert_eq!(rpo_actual(None, at(0)), None);
    }

    #[test]
    fn a_newer_schema_is_refused_and_the_file_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")
                .unwrap();
        }
        let before = std::fs::read(&path).unwrap();

        match Catalog::open(&path) {
            Err(CatalogError::NewerSchema {
                found, supported, ..
            }) => assert_eq!((found, supported), (99, SCHEMA_VERSION)),
            other => panic!("expected NewerSchema, got {other:?}"),
        }
        assert!(matches!(
            Catalog::open_read_only(&path),
            Err(CatalogError::NewerSchema { found: 99, .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!with_suffix(&path, "-wal").exists());
        let message = Catalog::open(&path).unwrap_err().to_string();
        assert!(message.contains("catalog rebuild"), "{message}");
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_a_fresh_catalog_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        let garbage = b"this is not a database, only some text".repeat(10);
        std::fs::write(&path, &garbage).unwrap();

        let catalog = Catalog::open(&path).unwrap();
        catalog
            .record_snapshot(&snapshot("a", "home", at(0), false))
            .unwrap();
        assert_eq!(catalog.last_snapshot("home").unwrap().unwrap().id, "a");

        let aside: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("catalog.sqlite.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::read(&aside[0]).unwrap(), garbage);
    }

    #[test]
    fn reopening_keeps_committed_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        let run;
        {
            let catalog = Catalog::open(&path).unwrap();
            run = catalog
                .start_run(JobKind::Backup, Some("home"), at(0), 1)
                .unwrap();
            catalog
                .record_snapshot(&snapshot("a", "home", at(0), false))
                .unwrap();
            catalog.set_state("tick", "1").unwrap();
            // Dropped without any shutdown step, as in a crash: every write
            // above was already committed.
        }
        let catalog = Catalog::open(&path).unwrap();
        assert_eq!(catalog.mark_unfinished_interrupted(at(5)).unwrap(), 1);
        assert_eq!(catalog.recent_runs(10).unwrap()[0].id, run);
        assert_eq!(catalog.last_snapshot("home").unwrap().unwrap().id, "a");
        assert_eq!(catalog.state("tick").unwrap().as_deref(), Some("1"));
    }

    #[test]
    fn read_only_open_of_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        assert!(Catalog::open_read_only(&path).unwrap().is_none());
        assert!(!path.exists());
    }

    #[test]
    fn read_only_open_sees_the_agents_writes_and_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        let agent = Catalog::open(&path).unwrap();
        agent
            .record_snapshot(&snapshot("a", "home", at(0), false))
            .unwrap();

        // While the agent has the file open.
        let status = Catalog::open_read_only(&path).unwrap().unwrap();
        assert_eq!(status.last_snapshot("home").unwrap().unwrap().id, "a");
        agent
            .record_snapshot(&snapshot("b", "home", at(10), false))
            .unwrap();
        assert_eq!(status.last_snapshot("home").unwrap().unwrap().id, "b");
        assert!(status.is_writable().is_err());
        assert!(status.set_state("k", "v").is_err());
        drop(status);

        // And after the agent closed it (SQLite removes the WAL then).
        drop(agent);
        let status = Catalog::open_read_only(&path).unwrap().unwrap();
        assert_eq!(status.last_snapshot("home").unwrap().unwrap().id, "b");
    }

    #[test]
    fn the_catalog_directory_and_file_are_private() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/lifeboat/catalog.sqlite");
        let _catalog = Catalog::open(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn records_from_snapshots_maps_source_tags() {
        fn snap(tags: &[&str], incomplete: bool) -> lifeboat_core::Snapshot {
            lifeboat_core::Snapshot {
                version: 1,
                time: at(0),
                host: "host".to_string(),
                user: "root".to_string(),
                paths: vec!["/home".to_string()],
                tags: tags.iter().map(|t| t.to_string()).collect(),
                tree: lifeboat_core::Id::of_bytes(b"tree"),
                incomplete,
                summary: lifeboat_core::Summary {
                    files_new: 2,
                    files_changed: 3,
                    files_unmodified: 4,
                    total_bytes: 1000,
                    bytes_added_raw: 500,
                    bytes_added_stored: 200,
                    ..Default::default()
                },
                program: "lifeboat 0.1.0".to_string(),
                locked_until: None,
            }
        }
        let tagged = lifeboat_core::Id::of_bytes(b"one");
        let by_hand = lifeboat_core::Id::of_bytes(b"two");
        let partial = lifeboat_core::Id::of_bytes(b"three");
        let records = records_from_snapshots(&[
            (tagged, snap(&["daily", source_tag("home").as_str()], false)),
            (by_hand, snap(&["manual", "source:"], false)),
            (partial, snap(&["source:etc"], true)),
        ]);

        assert_eq!(records.len(), 2);
        let home = &records[0];
        assert_eq!(home.id, tagged.to_hex());
        assert_eq!(home.source, "home");
        assert_eq!(home.time, at(0));
        assert_eq!(home.bytes_added, 200);
        assert_eq!(home.total_bytes, 1000);
        assert_eq!(home.files, 9);
        assert!(!home.incomplete);
        assert_eq!(records[1].id, partial.to_hex());
        assert_eq!(records[1].source, "etc");
        assert!(records[1].incomplete);

        let (_dir, catalog) = new_catalog();
        catalog.replace_snapshots(&records).unwrap();
        assert_eq!(
            catalog.last_snapshot("home").unwrap().unwrap().id,
            tagged.to_hex()
        );
        assert!(catalog.last_snapshot("etc").unwrap().is_none());
    }
}
