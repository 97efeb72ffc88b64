//! An in-memory backend: the reference implementation of the [`Backend`]
//! contract, used by unit tests and as the simplest thing the conformance
//! suite can be checked against.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::SystemTime;

use super::{clip_range, validate_key, Backend, BackendError, ObjectInfo, PutOutcome};

/// A [`Backend`] holding objects in a map in memory.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    objects: Mutex<BTreeMap<String, (Vec<u8>, SystemTime)>>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
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
}
