//! The core's error type, shaped by what callers branch on: a missing
//! repository, a wrong passphrase, a format this binary does not understand,
//! corruption (with the object named), and storage errors that may or may
//! not be temporary.

use std::path::PathBuf;

use crate::backend::BackendError;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// There is no repository at the location.
    #[error("no repository at {location} (run `lifeboat init --repo {location}` to create one)")]
    NoRepository {
        /// Where we looked.
        location: String,
    },
    /// `init` found a repository already there.
    #[error("a repository already exists at {location}; refusing to overwrite it")]
    AlreadyInitialised {
        /// Where.
        location: String,
    },
    /// No key file opens with the passphrase given.
    #[error("wrong passphrase: no key of this repository opens with it (list keys with `lifeboat key list` using a passphrase that works)")]
    WrongPassphrase,
    /// The repository was written by a newer (or unknown) format version.
    #[error("repository format version {found} is not supported by this lifeboat (it understands version {supported}); {hint}")]
    UnsupportedVersion {
        /// The version found in the repository.
        found: u32,
        /// The version this binary writes.
        supported: u32,
        /// What to do about it.
        hint: &'static str,
    },
    /// An object is damaged: it fails to decrypt, decompress, parse or hash.
    #[error(
        "{object} is corrupt ({detail}); run `lifeboat check --read-data` to see what it affects"
    )]
    Corrupt {
        /// The object or blob, e.g. `pack 3fa2…` or `tree 9c1e…`.
        object: String,
        /// What is wrong with it.
        detail: String,
    },
    /// An object is readable but not believed: unsigned, badly signed, or
    /// signed by a host other than the one it speaks for (format 3).
    #[error("{object} is not trusted: {reason}; it is skipped (run `lifeboat check` to list every such object)")]
    Untrusted {
        /// The object's key, e.g. `snapshots/3fa2…`.
        object: String,
        /// Why it is not believed.
        reason: String,
    },
    /// An object the repository refers to does not exist.
    #[error(
        "{object} is missing from the repository; run `lifeboat check` to see what it affects"
    )]
    Missing {
        /// The missing object.
        object: String,
    },
    /// A storage error.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A local filesystem error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A snapshot name matched nothing.
    #[error("no snapshot matches {0:?} (list them with `lifeboat snapshots`)")]
    SnapshotNotFound(String),
    /// A snapshot ID prefix matched several snapshots.
    #[error("snapshot prefix {0:?} is ambiguous; give more characters")]
    AmbiguousSnapshot(String),
    /// The local cache database failed.
    #[error("local cache {}: {source} (it is only a cache: delete it and run again)", path.display())]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The operation was stopped on request (shutdown, timeout) at a safe
    /// point; nothing was committed.
    #[error("interrupted before it finished; nothing was committed, and the next run reuses what was uploaded")]
    Interrupted,
    /// A host holding only a write-only credential tried to read or delete
    /// what only the full key may.
    #[error("{operation} needs the repository's full key (a passphrase), and this host holds only a write-only credential; run it on a host that can open the repository with a passphrase, such as a drill host")]
    NeedsFullKey {
        /// What was attempted, e.g. `restore` or `reading snapshots object 3fa2…`.
        operation: String,
    },
    /// The caller asked for something invalid.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Attaches a path to an I/O error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A corruption error about `object`.
    pub fn corrupt(object: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            detail: detail.into(),
        }
    }
}

/// Result with the core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
