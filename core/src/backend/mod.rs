//! The storage contract every repository backend honours, and its implementations.
//!
//! A backend is a flat key/value object store with five operations. The
//! repository format above it is designed so that these five are all it needs:
//! every object name is content-derived or random, objects are never rewritten,
//! and a snapshot becomes visible only when its last object is written. That is
//! what lets a local directory, an in-memory map and S3 share one
//! contract and one conformance suite ([`conformance`]), in the manner of
//! restic's `backend/test.Suite`.
//!
//! The trait is synchronous on purpose: the engines that call it run on plain
//! worker threads doing CPU work (chunking, compression, encryption), and a
//! network backend can own an async runtime and block on it from those threads.

use std::fmt;
use std::ops::Range;
use std::time::SystemTime;

pub mod conformance;
mod local;
mod mem;
pub mod resilience;
mod s3;

pub use local::LocalBackend;
pub use mem::MemoryBackend;
pub use s3::{Capabilities, S3Backend, S3Credentials, S3Options};

/// What a successful [`Backend::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object did not exist and now holds the given bytes.
    Created,
    /// An object of that name already existed and was left untouched.
    AlreadyExists,
}

/// Facts about one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's full key, e.g. `data/3f/3fa2…`.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When the store says the object was written (the store's clock, not ours).
    pub modified: SystemTime,
}

/// Why a backend operation failed, shaped by what callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The object does not exist.
    #[error("object {key} not found")]
    NotFound {
        /// The missing key.
        key: String,
    },
    /// A failure that may succeed if retried (timeouts, throttling, 5xx).
    #[error("temporary storage error on {key}: {message}")]
    Temporary {
        /// The key the operation was about.
        key: String,
        /// What went wrong.
        message: String,
    },
    /// A failure that will not go away by retrying (permissions, bad request, full disk).
    #[error("storage error on {key}: {message}")]
    Permanent {
        /// The key the operation was about.
        key: String,
        /// What went wrong.
        message: String,
    },
}

impl BackendError {
    /// True when retrying the same call may succeed.
    pub fn is_temporary(&self) -> bool {
        matches!(self, BackendError::Temporary { .. })
    }

    /// True for [`BackendError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, BackendError::NotFound { .. })
    }

    pub(crate) fn from_io(key: &str, err: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match err.kind() {
            NotFound => BackendError::NotFound {
                key: key.to_string(),
            },
            Interrupted | TimedOut | WouldBlock => BackendError::Temporary {
                key: key.to_string(),
                message: err.to_string(),
            },
            _ => BackendError::Permanent {
                key: key.to_string(),
                message: err.to_string(),
            },
        }
    }
}

/// Object Lock retention mode (S3's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` may still delete or shorten.
    Governance,
    /// Nobody, the bucket owner included, can delete or shorten.
    Compliance,
}

impl LockMode {
    /// The lower-case name (`governance`, `compliance`).
    pub fn as_str(&self) -> &'static str {
        match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        }
    }
}

impl std::str::FromStr for LockMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "governance" => Ok(LockMode::Governance),
            "compliance" => Ok(LockMode::Compliance),
            other => Err(format!(
                "lock mode {other:?} is not one of governance, compliance"
            )),
        }
    }
}

/// What a store says of an object's Object Lock retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retained {
    /// The store cannot tell (no Object Lock API).
    Unknown,
    /// The object has no retention (or it has ended).
    No,
    /// The object cannot be deleted before this instant.
    Until(chrono::DateTime<chrono::Utc>),
}

/// An object's retention: it cannot be deleted or overwritten before `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Governance or compliance.
    pub mode: LockMode,
    /// The end of the retention period.
    pub until: chrono::DateTime<chrono::Utc>,
}

/// An object store holding one repository.
///
/// # Contract
///
/// * Keys are `/`-separated ASCII strings made of `[a-z0-9._-]` segments; no
///   segment is empty, `.` or `..`.
/// * [`put`](Backend::put) is *put-if-absent* and atomic: readers see either
///   no object or the whole object, never a prefix. If the key exists the
///   stored object is left untouched and `AlreadyExists` is returned (for
///   two puts racing on one key, see [`Backend::exclusive_create`]). Because
///   every name in a repository is content-derived or random, a retried put is
///   idempotent. When `put` returns, the object is durable.
/// * [`get`](Backend::get) returns the whole object or the given byte range;
///   a range reaching past the end is truncated to the end, and a range that
///   starts at or past the end returns an empty vector.
/// * [`list`](Backend::list) returns every object whose key starts with the
///   prefix, in no particular order, never temporary files of in-progress puts.
/// * [`delete`](Backend::delete) of a missing key succeeds (deletion is idempotent).
/// * Every operation returns [`BackendError::NotFound`] only for a missing
///   object, [`BackendError::Temporary`] only for errors worth retrying.
/// * Implementations are safe to call from many threads at once, and from
///   many processes on the same store.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Stores `data` under `key` unless an object already exists there.
    fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError>;
    /// Reads an object, or the byte `range` of it.
    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError>;
    /// Lists objects whose key starts with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError>;
    /// Removes an object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> Result<(), BackendError>;
    /// Size and modification time of one object.
    fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError>;
    /// A human-readable location, e.g. the directory or URL.
    fn location(&self) -> String;
    /// True when [`put`](Backend::put) is put-if-absent even against a
    /// *concurrent* put of the same key (exactly one caller sees
    /// `Created`). Stores without enforced conditional writes can only
    /// check, then write; they never tear an object and never overwrite
    /// one that existed before the put began, but racing writers of one key
    /// may all see `Created`. Every repository object is named by its
    /// content or at random, so racing writers write equal bytes; `init`
    /// reads the config back to catch the one exception.
    fn exclusive_create(&self) -> bool {
        true
    }
    /// Hints that `key` is about to be read, so a store that can start
    /// fetching it now does (the read itself still goes through
    /// [`get`](Backend::get)); the default ignores the hint.
    fn prefetch(&self, key: &str) {
        let _ = key;
    }
    /// How many requests the store serves well at once. Engines size their
    /// upload and download pools by it: a local disk wants few, a remote
    /// object store many, to hide each request's latency.
    fn concurrency(&self) -> usize {
        2
    }
    /// Removes leftovers of writes interrupted longer ago than `older_than`
    /// (temporary files, unfinished multipart uploads); returns how many.
    /// Ages are measured against `now`, *the store's* clock (prune measures
    /// it by writing an object): a host whose clock runs hours ahead must
    /// not remove a running backup's temporary files. Stores without such
    /// leftovers keep the default.
    fn remove_stale_temp_files(
        &self,
        older_than: std::time::Duration,
        now: std::time::SystemTime,
    ) -> Result<usize, BackendError> {
        let _ = (older_than, now);
        Ok(0)
    }
    /// True when the store can retain objects (S3 Object Lock).
    fn object_lock(&self) -> bool {
        false
    }
    /// [`put`](Backend::put) with a retention: until then the object cannot
    /// be deleted or overwritten, by anyone (compliance) or by anyone
    /// without the right to bypass it (governance).
    fn put_retained(
        &self,
        key: &str,
        data: &[u8],
        retention: &Retention,
    ) -> Result<PutOutcome, BackendError> {
        let _ = (data, retention);
        Err(no_object_lock(key, &self.location()))
    }
    /// Moves an object's retention to `retention.until` (never earlier
    /// than it is: stores refuse to shorten a lock).
    fn extend_retention(&self, key: &str, retention: &Retention) -> Result<(), BackendError> {
        let _ = retention;
        Err(no_object_lock(key, &self.location()))
    }
    /// Stores `data` under `key` whether or not an object is there,
    /// atomically (readers see the old object or the new one, whole). Only
    /// `upgrade` uses it, for the one object whose name is not its content:
    /// `config`. The default refuses.
    fn put_replacing(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        let _ = data;
        Err(BackendError::Permanent {
            key: key.to_string(),
            message: format!("{} cannot replace objects", self.location()),
        })
    }
    /// The object's retention as the store records it (the store, not a
    /// snapshot's own word, decides whether a delete would be refused).
    /// The default cannot tell.
    fn retained_until(&self, key: &str) -> Result<Retained, BackendError> {
        let _ = key;
        Ok(Retained::Unknown)
    }
    /// [`put`](Backend::put), or [`put_retained`](Backend::put_retained)
    /// when a retention is given, of bytes the caller shares instead of
    /// lending. A layer that must keep them past the call (a request
    /// thread that may outlive its deadline, an HTTP body) then keeps a
    /// reference, where a lent slice costs it a copy of the whole object.
    /// The default lends them.
    fn put_shared(
        &self,
        key: &str,
        data: bytes::Bytes,
        retention: Option<&Retention>,
    ) -> Result<PutOutcome, BackendError> {
        match retention {
            Some(r) => self.put_retained(key, &data, r),
            None => self.put(key, &data),
        }
    }
}

/// The error of a store without Object Lock asked to retain an object.
pub(crate) fn no_object_lock(key: &str, location: &str) -> BackendError {
    BackendError::Permanent {
        key: key.to_string(),
        message: format!("{location} has no Object Lock, but the repository asks for retention"),
    }
}

/// How to reach a repository's store, beyond its location: what the CLI's
/// flags and the agent's configuration give.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Endpoint of an S3-compatible store; `None` is AWS (or the URL's own).
    pub s3_endpoint: Option<String>,
    /// S3 region; `None` takes the AWS configuration's.
    pub s3_region: Option<String>,
    /// Path-style addressing; `None` decides by the endpoint.
    pub s3_path_style: Option<bool>,
    /// Explicit S3 credentials; `None` uses the standard AWS chain.
    pub s3_credentials: Option<S3Credentials>,
    /// Requests in flight at once; `None` is the store's default.
    pub connections: Option<usize>,
    /// How long to keep retrying a failing request; `None` is the default.
    pub retry_for: Option<std::time::Duration>,
    /// Create a missing S3 bucket (for `init`).
    pub create_bucket: bool,
    /// Create that bucket with Object Lock enabled (`init --lock-days`).
    pub bucket_object_lock: bool,
}

/// Opens the store at `location` (a directory, `s3://BUCKET/PREFIX` or
/// `s3:http://HOST:PORT/BUCKET/PREFIX`) wrapped in the resilience layers
/// (see [`resilience`]). The returned handle also observes the circuit
/// breaker.
pub fn open_store(
    location: &std::path::Path,
    opts: &StoreOptions,
) -> Result<resilience::Resilient, BackendError> {
    let mut policy = resilience::ResiliencePolicy::default();
    if let Some(retry_for) = opts.retry_for {
        policy.retry.max_elapsed = retry_for;
    }
    let store: std::sync::Arc<dyn Backend> =
        match location.to_str().filter(|r| r.starts_with("s3:")) {
            Some(url) => {
                let mut s3 =
                    S3Options::from_url(url).map_err(|message| BackendError::Permanent {
                        key: String::new(),
                        message,
                    })?;
                if let Some(endpoint) = &opts.s3_endpoint {
                    s3.endpoint = Some(endpoint.clone());
                }
                s3.region = opts.s3_region.clone();
                if opts.s3_path_style.is_some() {
                    s3.path_style = opts.s3_path_style;
                }
                if let Some(n) = opts.connections {
                    s3.connections = n.max(1);
                }
                s3.credentials = opts.s3_credentials.clone();
                // The S3 backend enforces its own per-request deadlines,
                // which cancel the connection; the generic timeout layer
                // would only abandon a thread.
                policy.timeout = None;
                policy.max_in_flight = s3.connections * 2;
                if opts.create_bucket && S3Backend::create_bucket(&s3, opts.bucket_object_lock)? {
                    log::info!("created bucket {}", s3.bucket);
                }
                std::sync::Arc::new(S3Backend::connect(s3)?)
            }
            None => {
                if let Some(n) = opts.connections {
                    policy.max_in_flight = n.max(1);
                }
                std::sync::Arc::new(LocalBackend::new(location))
            }
        };
    Ok(resilience::resilient(store, &policy))
}

/// Checks that `key` obeys the key grammar in the [`Backend`] contract.
pub(crate) fn validate_key(key: &str) -> Result<(), BackendError> {
    let ok = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(BackendError::Permanent {
            key: key.to_string(),
            message: "invalid object key".to_string(),
        })
    }
}

/// Clips a requested range to an object of `len` bytes.
pub(crate) fn clip_range(range: Option<Range<u64>>, len: u64) -> Range<usize> {
    match range {
        None => 0..len as usize,
        Some(r) => {
            let start = r.start.min(len);
            let end = r.end.min(len).max(start);
            start as usize..end as usize
        }
    }
}
