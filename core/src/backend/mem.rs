//! An in-memory backend: the reference implementation of the [`Backend`]
//! contract, used by unit tests and as the simplest thing the conformance
//! suite can be checked against. [`MemoryBackend::with_object_lock`] makes
//! it retain objects the way S3 Object Lock does, strictly: deleting a
//! retained object fails (S3 in a versioned bucket would instead hide it
//! behind a delete marker), so tests catch any attempt to delete one.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::SystemTime;

use super::{clip_range, validate_key, Backend, BackendError, ObjectInfo, PutOutcome, Retention};

/// A [`Backend`] holding objects in a map in memory.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    objects: Mutex<BTreeMap<String, (Vec<u8>, SystemTime)>>,
    /// `Some` when Object Lock is on: each retained key's end of retention.
    retained: Option<Mutex<BTreeMap<String, chrono::DateTime<chrono::Utc>>>>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with Object Lock.
    pub fn with_object_lock() -> Self {
        MemoryBackend {
            retained: Some(Mutex::new(BTreeMap::new())),
            ..Self::default()
        }
    }

    /// The end of `key`'s retention, if it has one.
    pub fn retained_until(&self, key: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        self.retained
            .as_ref()?
            .lock()
            .expect("memory backend lock poisoned")
            .get(key)
            .copied()
    }

    fn retain(&self, key: &str, retention: &Retention) -> Result<(), BackendError> {
        let Some(retained) = &self.retained else {
            return Err(BackendError::Permanent {
                key: key.to_string(),
                message: "memory has no Object Lock".into(),
            });
        };
        let mut retained = retained.lock().expect("memory backend lock poisoned");
        let until = retained.entry(key.to_string()).or_insert(retention.until);
        *until = (*until).max(retention.until);
        Ok(())
    }

    /// Replaces an object's bytes in place. Only tests use this, to simulate
    /// bit rot; the [`Backend`] contract forbids overwrites.
    pub fn corrupt(&self, key: &str, bytes: Vec<u8>) {
        let mut map = self.objects.lock().expect("memory backend lock poisoned");
        map.insert(key.to_string(), (bytes, SystemTime::now()));
    }
}

impl Backend for MemoryBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        validate_key(key)?;
        let mut map = self.objects.lock().expect("memory backend lock poisoned");
        if map.contains_key(key) {
            return Ok(PutOutcome::AlreadyExists);
        }
        map.insert(key.to_string(), (data.to_vec(), SystemTime::now()));
        Ok(PutOutcome::Created)
    }

    fn put_replacing(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        validate_key(key)?;
        let mut map = self.objects.lock().expect("memory backend lock poisoned");
        map.insert(key.to_string(), (data.to_vec(), SystemTime::now()));
        Ok(())
    }

    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
        validate_key(key)?;
        let map = self.objects.lock().expect("memory backend lock poisoned");
        let (bytes, _) = map.get(key).ok_or_else(|| BackendError::NotFound {
            key: key.to_string(),
        })?;
        Ok(bytes[clip_range(range, bytes.len() as u64)].to_vec())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let map = self.objects.lock().expect("memory backend lock poisoned");
        Ok(map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, t))| ObjectInfo {
                key: k.clone(),
                size: v.len() as u64,
                modified: *t,
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        validate_key(key)?;
        if let Some(until) = self.retained_until(key) {
            if until > chrono::Utc::now() {
                return Err(BackendError::Permanent {
                    key: key.to_string(),
                    message: format!("access denied: the object is locked until {until}"),
                });
            }
        }
        self.objects
            .lock()
            .expect("memory backend lock poisoned")
            .remove(key);
        Ok(())
    }

    fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
        validate_key(key)?;
        let map = self.objects.lock().expect("memory backend lock poisoned");
        let (v, t) = map.get(key).ok_or_else(|| BackendError::NotFound {
            key: key.to_string(),
        })?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: v.len() as u64,
            modified: *t,
        })
    }

    fn location(&self) -> String {
        "memory".to_string()
    }

    fn object_lock(&self) -> bool {
        self.retained.is_some()
    }

    fn put_retained(
        &self,
        key: &str,
        data: &[u8],
        retention: &Retention,
    ) -> Result<PutOutcome, BackendError> {
        if !self.object_lock() {
            return Err(super::no_object_lock(key, &self.location()));
        }
        let outcome = self.put(key, data)?;
        if outcome == PutOutcome::Created {
            self.retain(key, retention)?;
        }
        Ok(outcome)
    }

    fn retained_until(&self, key: &str) -> Result<super::Retained, BackendError> {
        if !self.object_lock() {
            return Ok(super::Retained::Unknown);
        }
        Ok(match self.retained_until(key) {
            Some(until) if until > chrono::Utc::now() => super::Retained::Until(until),
            _ => super::Retained::No,
        })
    }

    fn extend_retention(&self, key: &str, retention: &Retention) -> Result<(), BackendError> {
        self.stat(key)?;
        self.retain(key, retention)
    }
}
