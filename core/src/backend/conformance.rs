//! The one conformance suite every [`Backend`] implementation runs.
//!
//! Each check takes a fresh, empty backend and asserts one clause of the
//! contract written on the trait. Tests for the in-memory and local backends
//! call [`run_all`]; backends added later (S3 on Garage and moto) call the same
//! function, so no implementation can quietly weaken the contract.

use super::{Backend, BackendError, PutOutcome};

/// Runs every check against `backend`, which must be empty. Panics with the
/// name of the clause that failed.
pub fn run_all(backend: &dyn Backend) {
    put_then_get_returns_the_same_bytes(backend);
    put_is_put_if_absent(backend);
    a_shared_put_stores_what_a_put_stores(backend);
    get_of_missing_object_is_not_found(backend);
    ranged_get_returns_the_range_and_clips_at_the_end(backend);
    list_returns_exactly_the_keys_under_a_prefix(backend);
    delete_removes_and_is_idempotent(backend);
    stat_reports_size_and_not_found(backend);
    empty_objects_round_trip(backend);
    large_objects_of_any_size_round_trip(backend);
    prefetched_objects_read_back_whole_and_hints_never_fail(backend);
    invalid_keys_are_refused(backend);
    concurrent_puts_of_one_key_leave_one_whole_object(backend);
}

fn put_then_get_returns_the_same_bytes(b: &dyn Backend) {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(
        b.put("conf/a", &data).unwrap(),
        PutOutcome::Created,
        "put creates a new object"
    );
    assert_eq!(
        b.get("conf/a", None).unwrap(),
        data,
        "get returns what put stored"
    );
}

/// Objects of a pack's size, aligned to 4 KiB or not (the local backend
/// moves these with direct I/O and its unaligned tail through the cache).
fn large_objects_of_any_size_round_trip(b: &dyn Backend) {
    for (i, len) in [1 << 20, (3 << 20) + 4096, (3 << 20) + 12_345, (1 << 20) + 1]
        .into_iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..len as u32)
            .map(|x| (x.wrapping_mul(31) >> 3) as u8)
            .collect();
        let key = format!("conf/large{i}");
        assert_eq!(b.put(&key, &data).unwrap(), PutOutcome::Created);
        let back = b.get(&key, None).unwrap();
        assert!(
            back == data,
            "a {len}-byte object reads back whole and unchanged"
        );
        assert_eq!(b.get(&key, Some(5..4101)).unwrap(), &data[5..4101]);
        b.delete(&key).unwrap();
    }
}

/// A prefetch hint changes nothing a read returns: not for large objects
/// (the local backend then reads them through the page cache instead of
/// directly), not for ranges, not for a second read; and a hint for a
/// missing or invalid key is ignored.
fn prefetched_objects_read_back_whole_and_hints_never_fail(b: &dyn Backend) {
    for (i, len) in [(3 << 20) + 12_345, 100].into_iter().enumerate() {
        let data: Vec<u8> = (0..len as u32)
            .map(|x| (x.wrapping_mul(29) >> 2) as u8)
            .collect();
        let key = format!("conf/prefetched{i}");
        b.put(&key, &data).unwrap();
        b.prefetch(&key);
        assert!(
            b.get(&key, None).unwrap() == data,
            "a prefetched {len}-byte object reads back whole"
        );
        assert!(b.get(&key, None).unwrap() == data, "and again");
        b.prefetch(&key);
        assert_eq!(b.get(&key, Some(7..90)).unwrap(), &data[7..90]);
        assert!(
            b.get(&key, None).unwrap() == data,
            "a hint outlives a ranged read"
        );
        b.delete(&key).unwrap();
    }
    b.prefetch("conf/never-written");
    b.prefetch("../outside");
    assert!(b
        .get("conf/never-written", None)
        .unwrap_err()
        .is_not_found());
}

fn put_is_put_if_absent(b: &dyn Backend) {
    b.put("conf/once", b"first").unwrap();
    assert_eq!(
        b.put("conf/once", b"second").unwrap(),
        PutOutcome::AlreadyExists,
        "a second put of the same key reports AlreadyExists"
    );
    assert_eq!(
        b.get("conf/once", None).unwrap(),
        b"first",
        "a second put never overwrites"
    );
}

fn a_shared_put_stores_what_a_put_stores(b: &dyn Backend) {
    let data: Vec<u8> = (0..70_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let shared = bytes::Bytes::from(data.clone());
    assert_eq!(
        b.put_shared("conf/shared", shared, None).unwrap(),
        PutOutcome::Created,
        "a shared put creates a new object"
    );
    assert_eq!(
        b.get("conf/shared", None).unwrap(),
        data,
        "get returns what a shared put stored"
    );
    assert_eq!(
        b.put_shared("conf/shared", bytes::Bytes::from_static(b"other"), None)
            .unwrap(),
        PutOutcome::AlreadyExists,
        "a shared put is put-if-absent"
    );
    assert_eq!(
        b.get("conf/shared", None).unwrap(),
        data,
        "a refused shared put leaves the object untouched"
    );
}

fn get_of_missing_object_is_not_found(b: &dyn Backend) {
    match b.get("conf/missing", None) {
        Err(BackendError::NotFound { .. }) => {}
        other => panic!("get of a missing object must be NotFound, got {other:?}"),
    }
    match b.get("conf/missing", Some(0..4)) {
        Err(BackendError::NotFound { .. }) => {}
        other => panic!("ranged get of a missing object must be NotFound, got {other:?}"),
    }
}

fn ranged_get_returns_the_range_and_clips_at_the_end(b: &dyn Backend) {
    b.put("conf/range", b"0123456789").unwrap();
    assert_eq!(b.get("conf/range", Some(2..5)).unwrap(), b"234");
    assert_eq!(
        b.get("conf/range", Some(8..100)).unwrap(),
        b"89",
        "range past the end is clipped"
    );
    assert_eq!(
        b.get("conf/range", Some(10..20)).unwrap(),
        b"",
        "range at the end is empty"
    );
    assert_eq!(b.get("conf/range", Some(0..10)).unwrap(), b"0123456789");
}

fn list_returns_exactly_the_keys_under_a_prefix(b: &dyn Backend) {
    for k in ["list/a/1", "list/a/2", "list/b/1", "list/ab"] {
        b.put(k, k.as_bytes()).unwrap();
    }
    let mut keys: Vec<String> = b
        .list("list/a/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["list/a/1", "list/a/2"],
        "list returns only keys under the prefix"
    );
    let mut keys: Vec<String> = b
        .list("list/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["list/a/1", "list/a/2", "list/ab", "list/b/1"],
        "list descends"
    );
    let info = b.list("list/ab").unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].size, 7, "list reports sizes");
    assert!(
        b.list("nothing-here/").unwrap().is_empty(),
        "an unused prefix lists nothing"
    );
}

fn delete_removes_and_is_idempotent(b: &dyn Backend) {
    b.put("conf/del", b"x").unwrap();
    b.delete("conf/del").unwrap();
    assert!(
        b.get("conf/del", None).unwrap_err().is_not_found(),
        "deleted object is gone"
    );
    b.delete("conf/del")
        .expect("deleting a missing object succeeds");
    assert_eq!(
        b.put("conf/del", b"y").unwrap(),
        PutOutcome::Created,
        "a deleted key can be reused"
    );
}

fn stat_reports_size_and_not_found(b: &dyn Backend) {
    b.put("conf/stat", &[1u8; 1234]).unwrap();
    let info = b.stat("conf/stat").unwrap();
    assert_eq!(info.size, 1234);
    assert_eq!(info.key, "conf/stat");
    assert!(b.stat("conf/nostat").unwrap_err().is_not_found());
}

fn empty_objects_round_trip(b: &dyn Backend) {
    b.put("conf/empty", b"").unwrap();
    assert_eq!(b.get("conf/empty", None).unwrap(), b"");
    assert_eq!(b.stat("conf/empty").unwrap().size, 0);
}

fn invalid_keys_are_refused(b: &dyn Backend) {
    for key in ["", "../escape", "a//b", "a/./b", "UPPER", "a/b/"] {
        let err = b.put(key, b"x").expect_err("invalid keys are refused");
        assert!(!err.is_temporary() && !err.is_not_found(), "{key:?}: {err}");
    }
}

fn concurrent_puts_of_one_key_leave_one_whole_object(b: &dyn Backend) {
    let payloads: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 256 * 1024]).collect();
    let created = std::thread::scope(|s| {
        let handles: Vec<_> = payloads
            .iter()
            .map(|p| s.spawn(move || b.put("conf/race", p).unwrap()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|o| *o == PutOutcome::Created)
            .count()
    });
    if b.exclusive_create() {
        assert_eq!(
            created, 1,
            "exactly one of several racing puts creates the object"
        );
    } else {
        // A store without enforced conditional writes (Garage) can only
        // check, then write: racing writers may each see no object. The
        // repository never depends on this (see `Backend::exclusive_create`).
        assert!(created >= 1, "at least one racing put creates the object");
    }
    let got = b.get("conf/race", None).unwrap();
    assert!(
        payloads.contains(&got),
        "the stored object is one whole payload, never a mix"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{LocalBackend, MemoryBackend};

    #[test]
    fn memory_backend_passes_the_conformance_suite() {
        run_all(&MemoryBackend::new());
    }

    #[test]
    fn local_backend_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        run_all(&LocalBackend::new(dir.path().join("repo")));
    }

    #[test]
    fn local_backend_list_skips_temporary_files_of_crashed_puts() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.put("snapshots/abc", b"x").unwrap();
        std::fs::write(dir.path().join("snapshots/.lbtmp-dead"), b"partial").unwrap();
        let keys: Vec<String> = b
            .list("snapshots/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["snapshots/abc"]);
        assert_eq!(
            b.remove_stale_temp_files(std::time::Duration::ZERO, std::time::SystemTime::now())
                .unwrap(),
            1
        );
    }
}
