//! Tests of the two halves of ransomware-proof backups: writer credentials
//! (a host that can add snapshots and read none) and Object Lock (objects
//! the store keeps immutable, which prune and forget must never try to
//! delete). Object Lock runs on the memory store's strict lock, which
//! refuses a delete of a retained object outright; `tests/e2e/s3.rs` runs
//! the same rules against moto.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::backend::{
    Backend, BackendError, LocalBackend, LockMode, MemoryBackend, ObjectInfo, PutOutcome, Retention,
};
use crate::backup::{backup, BackupOptions, Progress};
use crate::check::{check, CheckOptions};
use crate::crypto::WriterKey;
use crate::index::{IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::pack::{BlobEncoder, BlobKind, PackBuilder};
use crate::prune::{prune, PruneOptions};
use crate::repo::{pack_key, InitOptions, LockPolicy, Repository};
use crate::restore::{restore, RestoreOptions};
use crate::{Error, Id};

fn opts(lock: Option<LockPolicy>) -> InitOptions {
    InitOptions {
        kdf_work_factor: 10,
        pack_size: 1024 * 1024,
        lock,
        ..InitOptions::default()
    }
}

fn write_tree(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(
        root.join("notes.txt"),
        format!("line {seed}\n").repeat(5000),
    )
    .unwrap();
    std::fs::write(
        root.join("sub/data.bin"),
        crate::testutil::pseudo_random(3 << 20, seed),
    )
    .unwrap();
}

fn backup_of(
    repo: &Repository,
    dir: &Path,
    cache: Option<&Path>,
) -> crate::Result<crate::backup::BackupReport> {
    backup(
        repo,
        &BackupOptions {
            paths: vec![dir.to_path_buf()],
            cache_dir: cache.map(Path::to_path_buf),
            ..BackupOptions::default()
        },
        &Progress::default(),
    )
}

fn needs_full_key<T: std::fmt::Debug>(result: crate::Result<T>) -> bool {
    matches!(result, Err(Error::NeedsFullKey { .. }))
}

#[test]
fn a_writer_backs_up_with_dedup_reads_nothing_and_the_full_key_restores_it() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, 1);
    let store: Arc<dyn Backend> = Arc::new(LocalBackend::new(tmp.path().join("repo")));
    let full = Repository::init(store.clone(), "pw", &opts(None)).unwrap();
    backup_of(&full, &src, None).unwrap();

    // The credential survives its file format.
    let file = full.writer_key(Some("writer")).unwrap().to_file();
    let writer_key = WriterKey::from_file(&file, "writer.key").unwrap();
    let writer = Repository::open_writer(store.clone(), writer_key.clone()).unwrap();
    assert!(writer.is_write_only());

    // Same tree plus one new file, with no file cache: every file is read,
    // and only the new file's bytes are stored.
    std::fs::write(src.join("new.txt"), "a new file\n".repeat(100)).unwrap();
    // Files written this second are deliberately not cached (racy mtime):
    // age them, and let their ctime leave the racy window.
    for f in ["notes.txt", "sub/data.bin", "new.txt"] {
        crate::fsmeta::set_mtime(&src.join(f), 1_600_000_000, 5).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(2100));
    // The cache lives outside the backed-up tree's parent.
    let cache_tmp = tempfile::tempdir().unwrap();
    let cache = cache_tmp.path().join("cache");
    let first = backup_of(&writer, &src, Some(&cache)).unwrap();
    let s = &first.snapshot.summary;
    assert!(s.bytes_read > 3 << 20, "every file was read: {s:?}");
    assert!(
        s.bytes_added_raw < 64 * 1024,
        "only the new file and trees are new data: {s:?}"
    );
    // Its own file cache makes the next backup cheap without reading any
    // snapshot.
    let second = backup_of(&writer, &src, Some(&cache)).unwrap();
    assert_eq!(second.snapshot.summary.bytes_read, 0);

    // Everything that reads or deletes needs the full key.
    assert!(needs_full_key(writer.snapshots()));
    assert!(needs_full_key(
        writer.find_snapshot("latest", &Default::default())
    ));
    assert!(needs_full_key(writer.list_keys()));
    assert!(needs_full_key(writer.add_key("other", 10)));
    assert!(needs_full_key(writer.writer_key(Some("writer"))));
    assert!(needs_full_key(check(&writer, &CheckOptions::default())));
    assert!(needs_full_key(prune(&writer, &PruneOptions::default())));
    let target = tmp.path().join("target");
    assert!(needs_full_key(restore(
        &writer,
        &first.snapshot,
        &RestoreOptions {
            target: target.clone(),
            ..Default::default()
        }
    )));
    assert!(!target.exists(), "a refused restore writes nothing");
    let index = writer.load_index().unwrap();
    assert!(needs_full_key(
        writer.load_tree(&index, &first.snapshot.tree)
    ));
    let pack = index.packs()[0].id;
    assert!(needs_full_key(writer.read_pack(&pack)));

    // No pack or snapshot opens with the credential; index objects and
    // plans are what it is for.
    let mut sealed = 0;
    for prefix in ["data/", "snapshots/"] {
        for obj in store.list(prefix).unwrap() {
            let bytes = store.get(&obj.key, None).unwrap();
            let opened = writer_key.decrypt(&bytes, &|| obj.key.clone());
            assert!(needs_full_key(opened), "{} opened", obj.key);
            sealed += 1;
        }
    }
    assert!(sealed >= 5, "packs and snapshots were tried: {sealed}");
    for obj in store.list("index/").unwrap() {
        let bytes = store.get(&obj.key, None).unwrap();
        writer_key.decrypt(&bytes, &|| obj.key.clone()).unwrap();
    }

    // The full key reads what the writer wrote.
    let full = Repository::open(store, "pw").unwrap();
    let report = check(
        &full,
        &CheckOptions {
            read_data: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    restore(
        &full,
        &first.snapshot,
        &RestoreOptions {
            target: target.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    let restored = target.join(src.strip_prefix("/").unwrap());
    for f in ["notes.txt", "sub/data.bin", "new.txt"] {
        assert_eq!(
            std::fs::read(restored.join(f)).unwrap(),
            std::fs::read(src.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// A store whose credentials may not delete anything, like a backup host
/// under `docs/iam/writer-policy.json`.
#[derive(Debug)]
struct NoDelete(Arc<MemoryBackend>);

impl Backend for NoDelete {
    fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        self.0.put(key, data)
    }
    fn get(&self, key: &str, range: Option<std::ops::Range<u64>>) -> Result<Vec<u8>, BackendError> {
        self.0.get(key, range)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.0.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), BackendError> {
        panic!("a write-only host deleted {key}");
    }
    fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
        self.0.stat(key)
    }
    fn location(&self) -> String {
        "no-delete".into()
    }
    fn object_lock(&self) -> bool {
        self.0.object_lock()
    }
    fn put_retained(
        &self,
        key: &str,
        data: &[u8],
        retention: &Retention,
    ) -> Result<PutOutcome, BackendError> {
        self.0.put_retained(key, data, retention)
    }
    fn extend_retention(&self, key: &str, retention: &Retention) -> Result<(), BackendError> {
        self.0.extend_retention(key, retention)
    }
}

#[test]
fn a_writer_backs_up_and_extends_locks_without_ever_deleting() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, 5);
    let (mem, repo) = locked_repo();
    backup_of(&repo, &src, None).unwrap();
    let writer_store: Arc<dyn Backend> = Arc::new(NoDelete(mem.clone()));
    let writer =
        Repository::open_writer(writer_store, repo.writer_key(Some("writer")).unwrap()).unwrap();
    std::fs::write(src.join("more.txt"), "more\n".repeat(1000)).unwrap();
    let report = backup_of(&writer, &src, None).unwrap();
    assert!(report.snapshot.locked_until.is_some());
    // Reused packs that need a longer lock are extended by the writer too.
    let index = writer.load_index().unwrap();
    let all: HashSet<u32> = (0..index.packs().len() as u32).collect();
    let lock = LockPolicy {
        mode: LockMode::Compliance,
        days: 10,
    };
    let needed = chrono::Utc::now() + chrono::Duration::days(9);
    let stale = crate::backup::packs_to_extend(&index, &all, needed);
    crate::backup::extend_locks(&writer, stale, lock).unwrap();
    for p in index.packs() {
        assert!(mem.retained_until(&pack_key(&p.id)).unwrap() > needed);
    }
    assert_eq!(repo.snapshots().unwrap().len(), 2);
}

#[test]
fn a_writer_refuses_another_repository_and_a_config_altered_in_any_way() {
    let tmp = tempfile::tempdir().unwrap();
    let a: Arc<dyn Backend> = Arc::new(LocalBackend::new(tmp.path().join("a")));
    let b: Arc<dyn Backend> = Arc::new(LocalBackend::new(tmp.path().join("b")));
    let repo_a = Repository::init(a.clone(), "pw", &opts(None)).unwrap();
    Repository::init(b.clone(), "pw", &opts(None)).unwrap();
    let key = repo_a.writer_key(Some("writer")).unwrap();
    let err = Repository::open_writer(b, key.clone()).unwrap_err();
    assert!(err.to_string().contains("belongs to repository"), "{err}");

    // An attacker with write access swaps the recipients for their own, or
    // changes any other setting (say, drops the lock policy).
    let config_path = tmp.path().join("a/config");
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let mut swapped = original.clone();
    swapped["recipients"] = serde_json::json!([crate::crypto::MasterKey::generate().recipient()]);
    let mut altered = original.clone();
    altered["compression"] = serde_json::json!(0);
    for config in [swapped, altered] {
        std::fs::remove_file(&config_path).unwrap();
        std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
        let err = Repository::open_writer(a.clone(), key.clone()).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { detail, .. } if detail.contains("pins")),
            "{err}"
        );
    }
}

#[test]
fn a_forged_index_listing_a_pack_without_its_blobs_hides_nothing_from_restore_or_prune() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, 6);
    let store: Arc<dyn Backend> = Arc::new(LocalBackend::new(tmp.path().join("repo")));
    let full = Repository::init(store.clone(), "pw", &opts(None)).unwrap();
    let report = backup_of(&full, &src, None).unwrap();
    // A writer (all an attacker on a backup host holds) lists every pack
    // again, with no blobs.
    let writer =
        Repository::open_writer(store.clone(), full.writer_key(Some("writer")).unwrap()).unwrap();
    let index = writer.load_index().unwrap();
    let forged: Vec<IndexPack> = index
        .packs()
        .iter()
        .map(|p| IndexPack {
            id: p.id,
            kind: p.kind,
            size: p.size,
            blobs: vec![],
            locked_until: None,
        })
        .collect();
    writer
        .save(ObjectKind::Index, &IndexFile::of(forged))
        .unwrap();
    assert_eq!(full.load_index().unwrap().len(), index.len());
    let pruned = prune(
        &full,
        &PruneOptions {
            grace: std::time::Duration::ZERO,
            min_pack_age: std::time::Duration::ZERO,
            ..PruneOptions::default()
        },
    )
    .unwrap();
    assert_eq!(pruned.packs_condemned, 0, "{pruned:?}");
    let target = tmp.path().join("target");
    restore(
        &full,
        &report.snapshot,
        &RestoreOptions {
            target: target.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    let restored = target.join(src.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read(restored.join("sub/data.bin")).unwrap(),
        std::fs::read(src.join("sub/data.bin")).unwrap()
    );
}

#[test]
fn a_writer_credential_file_that_is_damaged_says_how_to_make_one() {
    let err = WriterKey::from_file(b"{\"format\":\"something else\"}", "/etc/w.key").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("/etc/w.key") && text.contains("export-writer"),
        "{text}"
    );
}

/// A repository on a store with Object Lock, one day for snapshots.
fn locked_repo() -> (Arc<MemoryBackend>, Repository) {
    let mem = Arc::new(MemoryBackend::with_object_lock());
    let lock = LockPolicy {
        mode: LockMode::Compliance,
        days: 1,
    };
    let repo = Repository::init(mem.clone(), "pw", &opts(Some(lock))).unwrap();
    (mem, repo)
}

#[test]
fn with_a_lock_policy_snapshots_packs_and_index_objects_are_retained() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, 2);
    let (mem, repo) = locked_repo();
    let before = chrono::Utc::now();
    let report = backup_of(&repo, &src, None).unwrap();
    let after = chrono::Utc::now();
    let day = chrono::Duration::days(1);

    let snap_key = format!("snapshots/{}", report.snapshot_id);
    let until = mem.retained_until(&snap_key).expect("snapshot retained");
    assert!(before + day <= until && until <= after + day, "{until}");
    assert_eq!(report.snapshot.locked_until, Some(until));
    for prefix in ["data/", "index/"] {
        let objects = mem.list(prefix).unwrap();
        assert!(!objects.is_empty());
        for o in objects {
            let until = mem.retained_until(&o.key).expect("retained");
            assert!(until >= before + day * 3 / 2, "{} until {until}", o.key);
        }
    }
    // The index records each pack's retention, so prune knows it.
    let index = repo.load_index().unwrap();
    assert!(index.packs().iter().all(|p| p.locked_until.is_some()));

    // The store refuses to delete the snapshot; the repository is intact.
    assert!(mem.delete(&snap_key).is_err());
    assert_eq!(repo.snapshots().unwrap().len(), 1);
}

#[test]
fn prune_never_tries_to_delete_a_locked_pack_and_says_when_it_can() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, 3);
    let (mem, repo) = locked_repo();
    backup_of(&repo, &src, None).unwrap();

    // Two unused, locked packs: one indexed, one no index knows (as a
    // crashed backup leaves them).
    let retention = repo
        .lock_policy()
        .unwrap()
        .pack_retention(chrono::Utc::now());
    let mut stray = Vec::new();
    for i in 0..2u8 {
        let mut pb = PackBuilder::new(BlobKind::Data, 0);
        let data = vec![i; 1000];
        let mut frame = Vec::new();
        BlobEncoder::new(3).encode_into(&data, &mut frame);
        pb.add(repo.ids().blob_id(&data), data.len() as u32, &frame);
        let (plain, header) = pb.finish();
        let ct = repo.recipients().encrypt(&plain);
        let id = Id::of_bytes(&ct);
        repo.put_object(&pack_key(&id), ct.clone(), Some(&retention))
            .unwrap();
        if i == 0 {
            repo.save_retained(
                ObjectKind::Index,
                &IndexFile::of(vec![IndexPack {
                    id,
                    kind: BlobKind::Data,
                    size: ct.len() as u64,
                    blobs: header.blobs,
                    locked_until: Some(retention.until),
                }]),
                Some(&retention),
            )
            .unwrap();
        }
        stray.push(id);
    }
    let packs_before = repo.stored_packs().unwrap().len();
    // The memory store fails any delete of a retained object, so a prune
    // that tried would fail here.
    let report = prune(
        &repo,
        &PruneOptions {
            grace: std::time::Duration::ZERO,
            min_pack_age: std::time::Duration::ZERO,
            ..PruneOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.packs_locked, 2, "{report:?}");
    assert_eq!(report.packs_condemned, 0, "{report:?}");
    assert_eq!(report.packs_deleted, 0, "{report:?}");
    assert!(report.next_unlock.is_some());
    assert_eq!(repo.stored_packs().unwrap().len(), packs_before);
    for id in &stray {
        assert!(mem.retained_until(&pack_key(id)).is_some());
    }
    let check = check(&repo, &CheckOptions::default()).unwrap();
    assert!(check.errors.is_empty(), "{:?}", check.errors);
}

#[test]
fn a_backup_extends_the_lock_of_reused_packs_that_would_end_before_its_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, 4);
    let (mem, repo) = locked_repo();
    backup_of(&repo, &src, None).unwrap();
    let index = repo.load_index().unwrap();
    let all: HashSet<u32> = (0..index.packs().len() as u32).collect();
    let old: Vec<_> = index
        .packs()
        .iter()
        .map(|p| (p.id, p.locked_until.unwrap()))
        .collect();

    // A snapshot that needs the packs for longer than they are locked (as
    // one taken days later would): every pack is extended, and an index
    // object records the new date.
    let needed = chrono::Utc::now() + chrono::Duration::days(30);
    let lock = LockPolicy {
        mode: LockMode::Compliance,
        days: 40,
    };
    let stale = crate::backup::packs_to_extend(&index, &all, needed);
    assert_eq!(stale.len(), old.len());
    crate::backup::extend_locks(&repo, stale, lock).unwrap();
    let index = repo.load_index().unwrap();
    for (id, before) in old {
        let stored = mem.retained_until(&pack_key(&id)).unwrap();
        assert!(stored > needed, "pack {id} extended: {stored}");
        let recorded = index
            .packs()
            .iter()
            .find(|p| p.id == id)
            .and_then(|p| p.locked_until)
            .unwrap();
        assert!(recorded > before && recorded <= stored, "{recorded}");
    }
    // Packs already locked long enough are left alone.
    assert!(crate::backup::packs_to_extend(&index, &all, needed).is_empty());
}

#[test]
fn init_with_a_lock_policy_on_a_store_without_object_lock_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store: Arc<dyn Backend> = Arc::new(LocalBackend::new(tmp.path().join("repo")));
    let lock = LockPolicy {
        mode: LockMode::Governance,
        days: 7,
    };
    let err = Repository::init(store.clone(), "pw", &opts(Some(lock))).unwrap_err();
    assert!(err.to_string().contains("no Object Lock"), "{err}");
    assert!(store.list("").unwrap().is_empty(), "nothing was written");
}
