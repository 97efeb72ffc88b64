//! Tests of the engines working together on real directories and a local
//! repository: round trips, incremental backups, crash safety, prune's
//! protocol, and hostile repositories. (The end-to-end tests in `tests/`
//! drive the binary; these reach inside to simulate crashes and forge
//! hostile objects.)

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::backend::resilience::{
    resilient, BreakerPolicy, FaultPolicy, Faulty, ResiliencePolicy, RetryPolicy,
};
use crate::backend::{Backend, BackendError, LocalBackend, ObjectInfo, PutOutcome};
use crate::backup::{backup, BackupOptions, Progress};
use crate::check::{check, CheckOptions};
use crate::index::{IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::pack::{BlobEncoder, BlobKind, PackBuilder};
use crate::prune::{prune, PruneOptions};
use crate::repo::{pack_key, InitOptions, Repository};
use crate::restore::{restore, RestoreOptions};
use crate::tree::Snapshot;
use crate::Id;

fn opts() -> InitOptions {
    InitOptions {
        kdf_work_factor: 10,
        pack_size: 1024 * 1024,
        ..InitOptions::default()
    }
}

/// A snapshot of the hand-made tree `tree`, declaring room for a few
/// thousand entries.
fn snapshot_of(tree: Id) -> Snapshot {
    Snapshot {
        version: 1,
        time: chrono::Utc::now(),
        host: "test".into(),
        user: "test".into(),
        paths: vec!["/".into()],
        tags: vec![],
        tree,
        incomplete: false,
        summary: crate::Summary {
            dirs: 1000,
            ..Default::default()
        },
        program: "test".into(),
        locked_until: None,
    }
}

/// Restores `snap` into `target` with default options.
fn restore_to(
    repo: &Repository,
    tree: &Snapshot,
    target: &Path,
    overwrite: bool,
) -> crate::Result<crate::restore::RestoreReport> {
    restore(
        repo,
        tree,
        &RestoreOptions {
            target: target.to_path_buf(),
            overwrite,
            ..Default::default()
        },
    )
}

/// A small tree: text files, a multi-chunk random file, a subdirectory, a symlink.
fn make_tree(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("a.txt"), format!("hello {seed}\n").repeat(1000)).unwrap();
    std::fs::write(
        root.join("sub/big.bin"),
        crate::testutil::pseudo_random(6 * 1024 * 1024, seed),
    )
    .unwrap();
    std::fs::write(root.join("sub/deeper/empty"), b"").unwrap();
    std::os::unix::fs::symlink("../a.txt", root.join("sub/link")).unwrap();
}

fn backup_dir(
    repo: &Repository,
    dir: &Path,
    cache: Option<&Path>,
) -> crate::Result<crate::backup::BackupReport> {
    let o = BackupOptions {
        paths: vec![dir.to_path_buf()],
        cache_dir: cache.map(Path::to_path_buf),
        ..BackupOptions::default()
    };
    backup(repo, &o, &Progress::default())
}

fn same_files(a: &Path, b: &Path) {
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa).unwrap(),
            std::fs::symlink_metadata(&pb).unwrap(),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{}", rel.display());
        if ma.is_dir() {
            let mut na: Vec<_> = std::fs::read_dir(&pa)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            let mut nb: Vec<_> = std::fs::read_dir(&pb)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            na.sort();
            nb.sort();
            assert_eq!(na, nb, "entries of {}", rel.display());
            stack.extend(na.into_iter().map(|n| rel.join(n)));
        } else if ma.is_file() {
            assert_eq!(
                std::fs::read(&pa).unwrap(),
                std::fs::read(&pb).unwrap(),
                "{}",
                rel.display()
            );
        } else if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&pa).unwrap(),
                std::fs::read_link(&pb).unwrap()
            );
        }
    }
}

fn restored_root(target: &Path, src: &Path) -> std::path::PathBuf {
    target.join(src.strip_prefix("/").unwrap())
}

/// A new local repository at `path`.
fn local_repo(path: &Path) -> Repository {
    Repository::init(Arc::new(LocalBackend::new(path)), "pw", &opts()).unwrap()
}

/// The tree ID of directory `dir` in `snapshot`.
fn subtree_of(repo: &Repository, snapshot: &crate::tree::Snapshot, dir: &Path) -> Id {
    let index = repo.load_index().unwrap();
    crate::walk::find(
        repo,
        &index,
        &snapshot.tree,
        dir.as_os_str().as_encoded_bytes(),
    )
    .unwrap()
    .and_then(|node| node.subtree)
    .expect("the directory is in the snapshot")
}

/// Two small trees `a` and `b` (from `seeds`) under `tmp`, and an empty
/// local repository beside them.
fn two_trees_and_a_repo(tmp: &Path, seeds: (u64, u64)) -> (PathBuf, PathBuf, Repository) {
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    make_tree(&a, seeds.0);
    make_tree(&b, seeds.1);
    (a, b, local_repo(&tmp.join("repo")))
}

/// Prune options that condemn at once and delete only after an hour.
fn prune_condemning() -> PruneOptions {
    PruneOptions {
        grace: std::time::Duration::from_secs(3600),
        // Zero stands in for the hours that pass in real life.
        min_pack_age: std::time::Duration::ZERO,
        ..Default::default()
    }
}

/// Prune options that execute every plan now.
fn prune_executing() -> PruneOptions {
    PruneOptions {
        grace: std::time::Duration::ZERO,
        ..Default::default()
    }
}

/// `check --read-data` finds nothing wrong, and each snapshot tree restores
/// (verified) equal to its source.
fn check_clean_and_restores_equal(repo: &Repository, restores: &[(&Snapshot, &Path)]) {
    let c = check(
        repo,
        &CheckOptions {
            read_data: true,
            subset_percent: None,
        },
    )
    .unwrap();
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    for (tree, src) in restores {
        let out = tempfile::tempdir().unwrap();
        let r = restore(
            repo,
            tree,
            &RestoreOptions {
                target: out.path().to_path_buf(),
                verify: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.failures.is_empty(), "{r:?}");
        same_files(src, &restored_root(out.path(), src));
    }
}

#[test]
fn backup_then_restore_round_trips_a_tree_and_check_is_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 1);
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    let report = backup_dir(&repo, &src, None).unwrap();
    assert!(!report.snapshot.incomplete);
    let out = tmp.path().join("out");
    let r = restore(
        &repo,
        &report.snapshot,
        &RestoreOptions {
            target: out.clone(),
            verify: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(r.failures.is_empty() && r.conflicts.is_empty(), "{r:?}");
    same_files(&src, &restored_root(&out, &src));
    let c = check(
        &repo,
        &CheckOptions {
            read_data: true,
            subset_percent: None,
        },
    )
    .unwrap();
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    assert!(c.blobs_verified > 5);
}

#[test]
fn unchanged_rebackup_with_the_cache_reads_and_adds_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 2);
    // Files written this second are deliberately not cached (racy mtime); age them.
    for f in ["a.txt", "sub/big.bin", "sub/deeper/empty"] {
        crate::fsmeta::set_mtime(&src.join(f), 1_600_000_000, 5).unwrap();
    }
    // ... and let their ctime (which set_mtime just bumped) leave the racy window.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    // The cache lives outside the backed-up tree's parent, whose mtime is in the snapshot.
    let cache_tmp = tempfile::tempdir().unwrap();
    let cache = cache_tmp.path().join("cache");
    let first = backup_dir(&repo, &src, Some(&cache)).unwrap();
    let second = backup_dir(&repo, &src, Some(&cache)).unwrap();
    // The snapshot also holds the directories above `src` (`/`, `/tmp`,
    // ...), and tests running alongside create and remove entries in
    // `/tmp`, so those few trees may change between backups (that made
    // this test fail now and then). Everything from `src` down must not.
    let above = src.ancestors().count() as u64 - 1;
    let src_tree = |snapshot: &crate::tree::Snapshot| subtree_of(&repo, snapshot, &src);
    let s = &second.snapshot.summary;
    assert_eq!(s.bytes_read, 0, "{s:?}");
    assert_eq!(s.files_unmodified, 3);
    assert!(s.blobs_added <= above, "unchanged trees dedup too: {s:?}");
    assert_eq!(src_tree(&second.snapshot), src_tree(&first.snapshot));
    // Deleting the cache costs only reading.
    std::fs::remove_dir_all(&cache).unwrap();
    let third = backup_dir(&repo, &src, Some(&cache)).unwrap();
    assert!(third.snapshot.summary.bytes_read > 6_000_000);
    assert!(third.snapshot.summary.blobs_added <= above);
    assert_eq!(src_tree(&third.snapshot), src_tree(&second.snapshot));
}

#[test]
fn cached_files_keep_their_extended_attributes_and_a_new_one_is_seen() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let (plain, tagged) = (src.join("plain"), src.join("tagged"));
    std::fs::write(&plain, b"no attributes").unwrap();
    std::fs::write(&tagged, b"one attribute").unwrap();
    if crate::fsmeta::set_xattr(&tagged, b"user.lb", b"1").is_err() {
        eprintln!("skipped: the test directory has no user extended attributes");
        return;
    }
    for f in [&plain, &tagged] {
        crate::fsmeta::set_mtime(f, 1_600_000_000, 5).unwrap();
    }
    // Out of the racy window, so both files are cached.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let repo = local_repo(&tmp.path().join("repo"));
    let cache = tempfile::tempdir().unwrap();
    let attributes = |report: &crate::backup::BackupReport| -> Vec<(String, Vec<String>)> {
        let tree = subtree_of(&repo, &report.snapshot, &src);
        let index = repo.load_index().unwrap();
        repo.load_tree(&index, &tree)
            .unwrap()
            .nodes
            .iter()
            .map(|n| {
                let names = n
                    .xattrs
                    .iter()
                    .map(|x| String::from_utf8_lossy(&x.name.0).into_owned())
                    .collect();
                (String::from_utf8_lossy(&n.name.0).into_owned(), names)
            })
            .collect()
    };
    let want = |plain: &[&str]| {
        vec![
            (
                "plain".to_string(),
                plain.iter().map(|s| s.to_string()).collect(),
            ),
            ("tagged".to_string(), vec!["user.lb".to_string()]),
        ]
    };
    let first = backup_dir(&repo, &src, Some(cache.path())).unwrap();
    assert_eq!(attributes(&first), want(&[]));
    // Unchanged: nothing read, and the attributes are as they were (the
    // plain file's from the cache, the tagged file's read again).
    let second = backup_dir(&repo, &src, Some(cache.path())).unwrap();
    assert_eq!(second.snapshot.summary.files_unmodified, 2);
    assert_eq!(attributes(&second), want(&[]));
    // An attribute set since moves the ctime, so the cache is not trusted.
    crate::fsmeta::set_xattr(&plain, b"user.new", b"2").unwrap();
    let third = backup_dir(&repo, &src, Some(cache.path())).unwrap();
    assert_eq!(attributes(&third), want(&["user.new"]));
}

/// A backend that fails every pack upload after a number of them, like a
/// process killed mid-backup.
#[derive(Debug)]
struct DiesAfter {
    inner: LocalBackend,
    puts_left: AtomicUsize,
}

impl Backend for DiesAfter {
    fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        // Only pack uploads count: with two upload threads, which of a
        // pack and the index object after the fourth pack goes first is a
        // race, and counting both made the test fail when it lost.
        if key.starts_with("data/")
            && self
                .puts_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            return Err(BackendError::Permanent {
                key: key.into(),
                message: "simulated crash".into(),
            });
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str, range: Option<std::ops::Range<u64>>) -> Result<Vec<u8>, BackendError> {
        self.inner.get(key, range)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.inner.delete(key)
    }
    fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
        self.inner.stat(key)
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

#[test]
fn directories_finished_out_of_walk_order_give_the_same_trees_and_restore_equal() {
    // Directories' trees are stored when their last file is read, not in
    // walk order: many small directories, files of very different sizes
    // (so reads finish out of order), nesting and empty directories.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for d in 0..40u64 {
        let dir = src.join(format!("d{d:02}")).join(format!("inner{}", d % 3));
        std::fs::create_dir_all(&dir).unwrap();
        let big = if d % 7 == 0 { 3 << 20 } else { 100 };
        std::fs::write(dir.join("big"), crate::testutil::pseudo_random(big, d)).unwrap();
        std::fs::write(dir.join("small"), format!("file {d}")).unwrap();
        std::fs::write(dir.parent().unwrap().join("beside"), vec![d as u8; 5000]).unwrap();
        if d % 10 == 0 {
            std::fs::create_dir_all(dir.join("empty")).unwrap();
        }
    }
    let repo = local_repo(&tmp.path().join("repo"));
    let first = backup_dir(&repo, &src, None).unwrap();
    let second = backup_dir(&repo, &src, None).unwrap();
    let src_tree = |snapshot: &crate::tree::Snapshot| subtree_of(&repo, snapshot, &src);
    assert_eq!(src_tree(&first.snapshot), src_tree(&second.snapshot));
    assert_eq!(first.snapshot.summary.files_new, 120);
    let out = tempfile::tempdir().unwrap();
    let r = restore_to(&repo, &second.snapshot, out.path(), false).unwrap();
    assert!(r.failures.is_empty(), "{r:?}");
    same_files(&src, &restored_root(out.path(), &src));
}

#[test]
fn a_tree_deeper_than_the_directories_the_walk_keeps_open_backs_up_whole() {
    // Above `MAX_OPEN_LEVELS` entries are stat'ed through their open
    // directory, below it by path; both halves must give the same nodes.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut dir = src.clone();
    for level in 0..crate::backup::MAX_OPEN_LEVELS + 20 {
        dir = dir.join("d");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), format!("level {level}")).unwrap();
        std::os::unix::fs::symlink("f", dir.join("l")).unwrap();
    }
    let repo = local_repo(&tmp.path().join("repo"));
    let first = backup_dir(&repo, &src, None).unwrap();
    assert_eq!(
        first.snapshot.summary.files_new,
        crate::backup::MAX_OPEN_LEVELS as u64 + 20
    );
    let out = tempfile::tempdir().unwrap();
    let r = restore_to(&repo, &first.snapshot, out.path(), false).unwrap();
    assert!(r.failures.is_empty(), "{r:?}");
    same_files(&src, &restored_root(out.path(), &src));
}

#[test]
fn entries_whose_restored_path_is_too_long_fail_alone_and_the_rest_is_restored() {
    // Each level's path fits where it is backed up, but not all of them
    // fit below a deep target: the directory and the files that cross
    // PATH_MAX (nameless, named and empty ones) fail with the way out,
    // everything above them is restored, and so on a second run, when the
    // directories are there already.
    const MAX: usize = libc::PATH_MAX as usize; // including the NUL
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let name = "d".repeat(200);
    let mut levels = vec![src.clone()];
    while levels.last().unwrap().as_os_str().len() + 2 * (name.len() + 1) < MAX - 100 {
        levels.push(levels.last().unwrap().join(&name));
    }
    std::fs::create_dir_all(levels.last().unwrap()).unwrap();
    for (i, dir) in levels.iter().enumerate() {
        std::fs::write(dir.join("f"), format!("level {i}")).unwrap();
    }
    let fits = &levels[levels.len() - 2];
    // Several blobs: written under a temporary name.
    std::fs::write(
        fits.join("g"),
        crate::testutil::pseudo_random(6 * 1024 * 1024, 3),
    )
    .unwrap();
    std::fs::write(fits.join("e"), b"").unwrap();
    let repo = local_repo(&tmp.path().join("repo"));
    let snap = backup_dir(&repo, &src, None).unwrap().snapshot;
    assert_eq!(snap.summary.files_new, levels.len() as u64 + 2);

    // A target whose length puts the second-deepest directory at 4,094
    // bytes: it fits, the file in it (two bytes more) does not, nor does
    // the directory below.
    let out = tempfile::tempdir().unwrap();
    let mut pad = MAX - 2 - restored_root(out.path(), fits).as_os_str().len();
    assert!(
        pad >= 2,
        "the temporary directory's path is too long for this test"
    );
    let mut target = out.path().to_path_buf();
    while pad > 0 {
        let n = pad.min(200);
        // Leave no remainder of one byte: it cannot take its own separator.
        let n = if pad - n == 1 { n - 1 } else { n };
        target = target.join("t".repeat(n - 1));
        pad -= n;
    }
    let deepest = restored_root(&target, fits);
    assert_eq!(deepest.as_os_str().len(), MAX - 2);

    let shown = |p: &Path| p.to_str().unwrap().to_string();
    let mut expected: Vec<String> = ["f", "g", "e"].map(|n| shown(&fits.join(n))).into();
    expected.push(shown(levels.last().unwrap()));
    expected.sort();
    let fits_files = levels.len() as u64 - 2;
    for run in ["first", "second"] {
        let r = restore_to(&repo, &snap, &target, false).unwrap();
        let mut failed: Vec<&str> = r.failures.iter().map(|f| f.path.as_str()).collect();
        failed.sort();
        assert_eq!(failed, expected, "{run} run: {r:?}");
        for f in &r.failures {
            assert!(
                f.reason.contains("longer than this system allows")
                    && f.reason.contains("shorter --target"),
                "{run} run: {f:?}"
            );
        }
        let done = r.files_restored + r.files_unchanged;
        assert_eq!(done, fits_files, "{run} run: {r:?}");
        for (i, dir) in levels[..levels.len() - 2].iter().enumerate() {
            let at = restored_root(&target, dir).join("f");
            assert_eq!(std::fs::read(&at).unwrap(), format!("level {i}").as_bytes());
        }
        assert!(std::fs::metadata(&deepest).unwrap().is_dir());
    }
}

#[test]
fn an_interrupted_backup_leaves_no_snapshot_and_its_uploads_are_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Chunk boundaries depend on the repository's random chunker seed, so
    // the number of 1 MiB packs varies from run to run: 12 MiB made six or
    // fewer now and then, the crash never came and the test failed. 24 MiB
    // makes far more than the four that upload before the crash.
    const SIZE: u64 = 24 * 1024 * 1024;
    std::fs::write(
        src.join("big"),
        crate::testutil::pseudo_random(SIZE as usize, 9),
    )
    .unwrap();
    let local = LocalBackend::new(tmp.path().join("repo"));
    Repository::init(Arc::new(local.clone()), "pw", &opts()).unwrap();
    // Four packs, then the index object written after every fourth.
    let dying = Arc::new(DiesAfter {
        inner: local.clone(),
        puts_left: AtomicUsize::new(4),
    });
    let repo = Repository::open(dying, "pw").unwrap();
    assert!(
        backup_dir(&repo, &src, None).is_err(),
        "the simulated crash stops the backup"
    );
    let repo = Repository::open(Arc::new(local), "pw").unwrap();
    assert!(
        repo.snapshots().unwrap().is_empty(),
        "no snapshot without its last object"
    );
    let c = check(
        &repo,
        &CheckOptions {
            read_data: true,
            subset_percent: None,
        },
    )
    .unwrap();
    assert!(
        c.errors.is_empty(),
        "the repository stays valid: {:?}",
        c.errors
    );
    assert!(
        repo.load_index().unwrap().len() >= 4,
        "uploads before the crash were indexed"
    );
    let next = backup_dir(&repo, &src, None).unwrap();
    let s = &next.snapshot.summary;
    // The four packs uploaded before the crash hold at least 4 MiB.
    assert!(
        s.bytes_added_raw < SIZE * 7 / 8,
        "reused earlier uploads: {s:?}"
    );
}

#[test]
fn forget_then_prune_frees_space_and_keeps_what_remaining_snapshots_need() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, repo) = two_trees_and_a_repo(tmp.path(), (3, 4));
    let ra = backup_dir(&repo, &a, None).unwrap();
    let rb = backup_dir(&repo, &b, None).unwrap();
    let packs_before = repo.backend().list("data/").unwrap().len();
    repo.backend()
        .delete(&format!("snapshots/{}", ra.snapshot_id))
        .unwrap();

    // With a grace period, the first prune only condemns.
    let waiting = prune(&repo, &prune_condemning()).unwrap();
    assert!(
        waiting.packs_condemned > 0 && waiting.packs_deleted == 0,
        "{waiting:?}"
    );
    assert_eq!(repo.backend().list("data/").unwrap().len(), packs_before);

    // A backup during the grace period does not lean on condemned packs.
    let again = backup_dir(&repo, &a, None).unwrap();
    assert!(
        again.snapshot.summary.bytes_added_raw > 6_000_000,
        "re-uploads instead of reusing condemned data"
    );

    // Past the grace period the plan executes, sparing nothing the new snapshot needs
    // (its data lives in new packs).
    let done = prune(&repo, &prune_executing()).unwrap();
    assert!(done.packs_deleted > 0, "{done:?}");
    check_clean_and_restores_equal(&repo, &[(&rb.snapshot, &b), (&again.snapshot, &a)]);
}

#[test]
fn a_cached_index_never_lets_a_backup_reuse_condemned_or_pruned_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, repo) = two_trees_and_a_repo(tmp.path(), (5, 6));
    let cache_tmp = tempfile::tempdir().unwrap();
    let cache = cache_tmp.path().join("cache");
    let key = repo.index_cache_key();
    let cached =
        || crate::index_cache::open(&cache, &repo.config().id, &key).expect("a cache file");
    let listed = || {
        let mut ids = repo.list_ids(ObjectKind::Index).unwrap();
        ids.sort();
        ids
    };
    // A backup caches the index as it found it (its own index objects are
    // added by the next backup).
    let ra = backup_dir(&repo, &a, Some(&cache)).unwrap();
    let before = listed();
    backup_dir(&repo, &b, Some(&cache)).unwrap();
    assert_eq!(
        cached().covers(),
        before,
        "the second backup writes the cache"
    );
    let before = listed();
    backup_dir(&repo, &b, Some(&cache)).unwrap();
    assert_eq!(cached().covers(), before, "b's index object is folded in");
    repo.backend()
        .delete(&format!("snapshots/{}", ra.snapshot_id))
        .unwrap();
    assert!(prune(&repo, &prune_condemning()).unwrap().packs_condemned > 0);
    // The cache still lists a's packs; the backup must not lean on them.
    let during = backup_dir(&repo, &a, Some(&cache)).unwrap();
    assert!(
        during.snapshot.summary.bytes_added_raw > 6_000_000,
        "re-uploads instead of reusing condemned data: {:?}",
        during.snapshot.summary
    );
    repo.backend()
        .delete(&format!("snapshots/{}", during.snapshot_id))
        .unwrap();
    assert!(prune(&repo, &prune_condemning()).unwrap().packs_condemned > 0);
    assert!(prune(&repo, &prune_executing()).unwrap().packs_deleted > 0);
    // Executed plans are kept for a while and would set a's packs aside on
    // their own; once they are gone, only the cache's check stands.
    for plan in repo.list_ids(ObjectKind::Plan).unwrap() {
        repo.backend().delete(&format!("pending/{plan}")).unwrap();
    }
    let stale = cached();
    assert!(
        stale.covers().iter().any(|c| !listed().contains(c)),
        "prune replaced index objects the cache covers"
    );
    // A cache covering deleted index objects is rebuilt, so a's data,
    // whose packs are gone, is uploaded again.
    let before_after = listed();
    let after = backup_dir(&repo, &a, Some(&cache)).unwrap();
    assert!(
        after.snapshot.summary.bytes_added_raw > 6_000_000,
        "re-uploads instead of trusting a stale cache: {:?}",
        after.snapshot.summary
    );
    assert_eq!(cached().covers(), before_after);
    check_clean_and_restores_equal(&repo, &[(&after.snapshot, &a)]);
}

#[test]
fn a_restore_maps_a_valid_index_cache_never_writes_one_and_survives_a_damaged_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, repo) = two_trees_and_a_repo(tmp.path(), (7, 8));
    let cache = tmp.path().join("cache");
    let ra = backup_dir(&repo, &a, Some(&cache)).unwrap();
    // The second backup writes the cache file (covering a's index object);
    // b's own index object stays outside it.
    let rb = backup_dir(&repo, &b, Some(&cache)).unwrap();
    let file = crate::index_cache::path(&cache, &repo.config().id);
    assert!(file.exists(), "the second backup writes the cache file");
    let restore_with = |tree: &Snapshot, src: &Path, dir: &Path| {
        let out = tempfile::tempdir().unwrap();
        let r = restore(
            &repo,
            tree,
            &RestoreOptions {
                target: out.path().to_path_buf(),
                index_cache: Some(dir.to_path_buf()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.failures.is_empty(), "{r:?}");
        same_files(src, &restored_root(out.path(), src));
    };

    // A machine without a cache (a disaster recovery) restores from the
    // index objects and is left without a file to clean up.
    let empty = tmp.path().join("no-cache-yet");
    restore_with(&ra.snapshot, &a, &empty);
    assert!(!empty.exists(), "a restore wrote into the cache directory");

    // With the file, the index is mapped, with b's object loaded on top.
    let index = repo.load_index_reusing_cache(&cache, None).unwrap();
    assert!(
        matches!(
            index.runs()[0].records,
            crate::index::Records::Mapped { .. }
        ),
        "the valid cache file is mapped"
    );
    assert_eq!(index.len(), repo.load_index().unwrap().len());
    drop(index);
    restore_with(&ra.snapshot, &a, &cache);
    restore_with(&rb.snapshot, &b, &cache);

    // A damaged file is set aside, and the restore still completes.
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    restore_with(&rb.snapshot, &b, &cache);
    assert!(!file.exists(), "the damaged cache file is removed");
}

#[test]
fn a_backup_refuses_to_commit_when_a_newer_plan_condemns_a_pack_it_used() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    let pack = Id::of_bytes(b"some pack");
    let seen = std::collections::HashSet::new();
    let used: std::collections::HashSet<Id> = [pack].into_iter().collect();
    crate::prune::check_no_new_condemnation(&repo, &seen, &used).unwrap();
    let plan = crate::prune::PrunePlan {
        version: 1,
        created: chrono::Utc::now(),
        host: "h".into(),
        packs: vec![pack],
    };
    repo.save(ObjectKind::Plan, &plan).unwrap();
    let err = crate::prune::check_no_new_condemnation(&repo, &seen, &used).unwrap_err();
    assert!(err.to_string().contains("run the backup again"), "{err}");
}

#[test]
fn a_corrupted_pack_is_found_by_check_and_only_its_files_fail_to_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 5);
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    let report = backup_dir(&repo, &src, None).unwrap();
    let index = repo.load_index().unwrap();
    // Damage the pack holding a.txt's only blob.
    let mut a_txt = None;
    crate::walk::walk(&repo, &index, &report.snapshot, &mut |p, n| {
        if p.ends_with(b"/a.txt") {
            a_txt = Some(n.content[0]);
        }
        Ok(())
    })
    .unwrap();
    let (pack, loc) = index.get(&a_txt.unwrap()).unwrap();
    let path = tmp.path().join("repo").join(pack_key(&pack.id));
    let mut bytes = std::fs::read(&path).unwrap();
    // Map the blob's plaintext offset to the ciphertext: after the age header
    // and nonce, 64 KiB segments each carry a 16-byte tag.
    let mac = bytes.windows(5).position(|w| w == b"\n--- ").unwrap();
    let header_end = mac + 1 + bytes[mac + 1..].iter().position(|&b| b == b'\n').unwrap() + 1;
    let off = loc.offset as usize + 10;
    bytes[header_end + 16 + off / 65536 * (65536 + 16) + off % 65536] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();

    let c = check(
        &repo,
        &CheckOptions {
            read_data: true,
            subset_percent: None,
        },
    )
    .unwrap();
    assert!(!c.errors.is_empty());
    assert!(
        c.affected.iter().any(|a| a.path.ends_with("/a.txt")),
        "{:?}",
        c.affected
    );
    let out = tmp.path().join("out");
    let r = restore(
        &repo,
        &report.snapshot,
        &RestoreOptions {
            target: out.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        r.failures.iter().any(|f| f.path.ends_with("/a.txt")),
        "{r:?}"
    );
    let root = restored_root(&out, &src);
    assert!(
        !root.join("a.txt").exists(),
        "a damaged file is not left half-written"
    );
    for other in ["sub/deeper/empty", "sub/link"] {
        assert!(
            std::fs::symlink_metadata(root.join(other)).is_ok(),
            "{other} still restores"
        );
    }
}

#[test]
fn an_interrupted_restore_is_finished_by_a_second_run_and_differing_files_are_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 6);
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    let report = backup_dir(&repo, &src, None).unwrap();
    let out = tmp.path().join("out");
    let o = RestoreOptions {
        target: out.clone(),
        ..Default::default()
    };
    restore(&repo, &report.snapshot, &o).unwrap();
    let root = restored_root(&out, &src);
    std::fs::remove_file(root.join("sub/big.bin")).unwrap();
    std::fs::write(root.join("a.txt"), b"local edit").unwrap();
    let second = restore(&repo, &report.snapshot, &o).unwrap();
    assert_eq!(
        second.files_restored, 1,
        "only the missing file is rewritten: {second:?}"
    );
    assert_eq!(second.files_unchanged, 1);
    assert_eq!(second.conflicts.len(), 1);
    assert_eq!(
        std::fs::read(root.join("a.txt")).unwrap(),
        b"local edit",
        "never overwritten without --overwrite"
    );
    let third = restore(
        &repo,
        &report.snapshot,
        &RestoreOptions {
            overwrite: true,
            ..o
        },
    )
    .unwrap();
    assert!(third.conflicts.is_empty());
    same_files(&src, &root);
}

/// Stores a snapshot whose trees are the given raw JSON documents, bypassing
/// every check a honest backup makes: `trees[0]` is the root, and a tree
/// may name another by `{"$tree": n}` in place of a subtree ID.
fn forge_snapshot(repo: &Repository, trees: &[serde_json::Value]) -> Id {
    let mut ids = vec![Id::default(); trees.len()];
    let mut pb = PackBuilder::new(BlobKind::Tree, 0);
    let mut enc = BlobEncoder::new(3);
    for (i, t) in trees.iter().enumerate().rev() {
        let mut text = t.to_string();
        for (j, id) in ids.iter().enumerate() {
            text = text.replace(&format!("{{\"$tree\":{j}}}"), &format!("\"{id}\""));
        }
        let id = repo.ids().tree_id(text.as_bytes());
        let mut frame = Vec::new();
        enc.encode_into(text.as_bytes(), &mut frame);
        pb.add(id, text.len() as u32, &frame);
        ids[i] = id;
    }
    store_tree_pack(repo, pb);
    ids[0]
}

/// Encrypts and stores a pack of tree blobs and indexes it, as a backup
/// would, whatever IDs the builder was given.
fn store_tree_pack(repo: &Repository, pb: PackBuilder) {
    let (plain, header) = pb.finish();
    let ct = repo.recipients().encrypt(&plain);
    let pack_id = Id::of_bytes(&ct);
    repo.backend().put(&pack_key(&pack_id), &ct).unwrap();
    repo.save(
        ObjectKind::Index,
        &IndexFile::of(vec![IndexPack {
            locked_until: None,
            id: pack_id,
            kind: BlobKind::Tree,
            size: ct.len() as u64,
            blobs: header.blobs,
        }]),
    )
    .unwrap();
}

fn node(name: &str, kind: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({"name": name, "type": kind, "mode": 0o755, "uid": 0, "gid": 0, "mtime": 0});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[test]
fn a_hostile_tree_that_names_itself_as_its_subtree_ends_in_an_error_not_a_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    // A tree listing a directory whose subtree is the tree itself: its
    // index entry claims an ID its content does not hash to (a real cycle
    // would need a BLAKE3 fixed point).
    let cyclic = Id::of_bytes(b"claimed id");
    let text = serde_json::json!({"nodes": [node("loop", "dir", serde_json::json!({"subtree": cyclic.to_hex()}))]})
        .to_string();
    let mut pb = PackBuilder::new(BlobKind::Tree, 0);
    let mut frame = Vec::new();
    BlobEncoder::new(3).encode_into(text.as_bytes(), &mut frame);
    pb.add(cyclic, text.len() as u32, &frame);
    store_tree_pack(&repo, pb);
    let started = std::time::Instant::now();
    let target = tmp.path().join("target");
    match restore_to(&repo, &snapshot_of(cyclic), &target, false) {
        Ok(r) => assert!(!r.failures.is_empty(), "{r:?}"),
        Err(e) => assert!(e.to_string().contains("does not match"), "{e}"),
    }
    let index = repo.load_index().unwrap();
    let err = repo.load_tree(&index, &cyclic).unwrap_err();
    assert!(err.to_string().contains("does not match its ID"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn a_hostile_snapshot_cannot_write_outside_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let target = tmp.path().join("target");
    for bad_name in ["..", "../../etc/passwd", "/etc/passwd", ".", "a/b"] {
        let root = forge_snapshot(
            &repo,
            &[serde_json::json!({"nodes": [node(bad_name, "file", serde_json::json!({}))]})],
        );
        // The unreadable listing is reported as a failure; nothing is written.
        let r = restore_to(&repo, &snapshot_of(root), &target, false).unwrap();
        assert!(
            r.failures
                .iter()
                .any(|f| f.reason.contains("unsafe entry name")),
            "{bad_name}: {r:?}"
        );
        assert_eq!(r.files_restored + r.dirs + r.others, 0);
    }
    // Two entries of one name (a symlink out, then a directory through it).
    let dup = forge_snapshot(
        &repo,
        &[
            serde_json::json!({"nodes": [
                node("a", "dir", serde_json::json!({"subtree": {"$tree": 1}})),
                node("a", "symlink", serde_json::json!({"target": outside.to_str().unwrap()})),
            ]}),
            serde_json::json!({"nodes": [node("x", "file", serde_json::json!({}))]}),
        ],
    );
    let r = restore_to(&repo, &snapshot_of(dup), &target, false).unwrap();
    assert!(
        r.failures
            .iter()
            .any(|f| f.reason.contains("not sorted or not unique")),
        "{r:?}"
    );
    assert!(
        !target.join("a").exists(),
        "nothing of the forged tree is restored"
    );
    // A symlink restored by one snapshot, then a directory of the same name
    // from another snapshot: the symlink is never followed.
    let link = forge_snapshot(
        &repo,
        &[
            serde_json::json!({"nodes": [node("a", "symlink", serde_json::json!({"target": outside.to_str().unwrap()}))]}),
        ],
    );
    restore_to(&repo, &snapshot_of(link), &target, false).unwrap();
    let through = forge_snapshot(
        &repo,
        &[
            serde_json::json!({"nodes": [node("a", "dir", serde_json::json!({"subtree": {"$tree": 1}}))]}),
            serde_json::json!({"nodes": [node("x", "file", serde_json::json!({}))]}),
        ],
    );
    let r = restore_to(&repo, &snapshot_of(through), &target, false).unwrap();
    assert_eq!(r.conflicts.len(), 1, "{r:?}");
    let r = restore_to(&repo, &snapshot_of(through), &target, true).unwrap();
    assert!(r.conflicts.is_empty() && r.failures.is_empty(), "{r:?}");
    assert!(
        std::fs::symlink_metadata(target.join("a"))
            .unwrap()
            .is_dir(),
        "the symlink was replaced by a real directory"
    );
    assert!(target.join("a/x").exists());
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing was written outside the target"
    );
}

#[test]
fn snapshots_name_latest_and_unique_prefixes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    let first = backup_dir(&repo, &src, None).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let second = backup_dir(&repo, &src, None).unwrap();
    let latest: (Id, Snapshot) = repo.find_snapshot("latest", &Default::default()).unwrap();
    assert_eq!(latest.0, second.snapshot_id);
    assert_eq!(
        repo.find_snapshot(&first.snapshot_id.to_hex()[..8], &Default::default())
            .unwrap()
            .0,
        first.snapshot_id
    );
    assert!(matches!(
        repo.find_snapshot("zz", &Default::default()),
        Err(crate::Error::SnapshotNotFound(_))
    ));
    assert!(matches!(
        repo.find_snapshot("", &Default::default()),
        Err(crate::Error::AmbiguousSnapshot(_)) | Err(crate::Error::SnapshotNotFound(_))
    ));
}

#[test]
fn a_file_holding_an_empty_trees_json_does_not_collide_with_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("empty-dir")).unwrap();
    std::fs::write(src.join("looks-like-a-tree.json"), br#"{"nodes":[]}"#).unwrap();
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    let report = backup_dir(&repo, &src, None).unwrap();
    let out = tmp.path().join("out");
    let r = restore(
        &repo,
        &report.snapshot,
        &RestoreOptions {
            target: out.clone(),
            verify: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(r.failures.is_empty(), "{r:?}");
    same_files(&src, &restored_root(&out, &src));
    let c = check(
        &repo,
        &CheckOptions {
            read_data: true,
            subset_percent: None,
        },
    )
    .unwrap();
    assert!(c.errors.is_empty(), "{:?}", c.errors);
}

#[test]
fn overwrite_replaces_a_file_whose_bytes_changed_behind_an_unchanged_size_and_mtime() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"original").unwrap();
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    let report = backup_dir(&repo, &src, None).unwrap();
    let out = tmp.path().join("out");
    let o = RestoreOptions {
        target: out.clone(),
        ..Default::default()
    };
    restore(&repo, &report.snapshot, &o).unwrap();
    let f = restored_root(&out, &src).join("f");
    let m = std::fs::metadata(&f).unwrap();
    std::fs::write(&f, b"tampered").unwrap();
    crate::fsmeta::set_mtime(&f, m.mtime(), m.mtime_nsec() as u32).unwrap();
    let again = restore(&repo, &report.snapshot, &o).unwrap();
    assert_eq!(
        again.conflicts.len(),
        1,
        "same size and mtime but different bytes is a conflict: {again:?}"
    );
    restore(
        &repo,
        &report.snapshot,
        &RestoreOptions {
            overwrite: true,
            ..o
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"original");
}

#[test]
fn a_hostile_device_node_cannot_chmod_through_an_earlier_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"secret").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let target = tmp.path().join("target");
    let link = forge_snapshot(
        &repo,
        &[
            serde_json::json!({"nodes": [node("x", "symlink", serde_json::json!({"target": victim.to_str().unwrap()}))]}),
        ],
    );
    restore_to(&repo, &snapshot_of(link), &target, false).unwrap();
    let dev = forge_snapshot(
        &repo,
        &[
            serde_json::json!({"nodes": [node("x", "chardev", serde_json::json!({"rdev": 0, "mode": 0o666}))]}),
        ],
    );
    let _ = restore_to(&repo, &snapshot_of(dev), &target, false).unwrap();
    let mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the file behind the symlink kept its mode");
}

use std::os::unix::fs::MetadataExt;

#[test]
fn a_file_whose_blob_is_not_indexed_fails_alone_and_the_restore_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        "pw",
        &opts(),
    )
    .unwrap();
    let absent = Id::of_bytes(b"never stored");
    let root = forge_snapshot(
        &repo,
        &[serde_json::json!({"nodes": [
            node("lost", "file", serde_json::json!({"size": 10, "content": [absent.to_hex(), absent.to_hex()]})),
            node("ok", "file", serde_json::json!({})),
        ]})],
    );
    let target = tmp.path().join("target");
    let r = restore_to(&repo, &snapshot_of(root), &target, false).unwrap();
    assert_eq!(r.failures.len(), 1, "{r:?}");
    assert!(
        r.failures[0].reason.contains("missing from the index"),
        "{r:?}"
    );
    assert!(!target.join("lost").exists());
    assert!(target.join("ok").exists());
}

/// A repository whose store answers through `Faulty` behind the retry,
/// breaker and limiter layers the binary uses, with delays short enough for
/// a unit test.
fn through_faults(
    store: Arc<dyn Backend>,
    faults: FaultPolicy,
    max_elapsed: std::time::Duration,
) -> (Repository, Arc<Faulty>) {
    let faulty = Arc::new(Faulty::new(store, faults));
    let policy = ResiliencePolicy {
        retry: RetryPolicy {
            max_attempts: 30,
            base_delay: std::time::Duration::from_millis(1),
            max_delay: std::time::Duration::from_millis(20),
            max_elapsed,
        },
        breaker: BreakerPolicy {
            failure_threshold: 5,
            cool_down: std::time::Duration::from_millis(50),
            max_cool_down: std::time::Duration::from_millis(200),
        },
        ..ResiliencePolicy::default()
    };
    let stack = resilient(faulty.clone(), &policy).backend;
    (Repository::open(stack, "pw").unwrap(), faulty)
}

#[test]
fn a_backup_through_a_store_failing_one_request_in_ten_completes_and_restores_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 31);
    let store: Arc<dyn Backend> = Arc::new(LocalBackend::new(tmp.path().join("repo")));
    Repository::init(store.clone(), "pw", &opts()).unwrap();
    // One request in ten goes wrong: refused before it reaches the store,
    // lost after the store acted on it, or answered with a truncated body.
    let faults = FaultPolicy {
        error_rate: 0.04,
        error_after_rate: 0.03,
        truncate_rate: 0.03,
        latency: std::time::Duration::from_millis(1),
        seed: 7,
    };
    std::fs::write(
        src.join("more.bin"),
        crate::testutil::pseudo_random(16 * 1024 * 1024, 33),
    )
    .unwrap();
    let (repo, faulty) = through_faults(store, faults, std::time::Duration::from_secs(30));
    let first = backup_dir(&repo, &src, None).unwrap();
    std::fs::write(src.join("a.txt"), "changed\n".repeat(5000)).unwrap();
    std::fs::write(
        src.join("sub/new.bin"),
        crate::testutil::pseudo_random(3 * 1024 * 1024, 32),
    )
    .unwrap();
    let second = backup_dir(&repo, &src, None).unwrap();
    let out = tmp.path().join("out");
    let r = restore_to(&repo, &second.snapshot, &out, false).unwrap();
    assert!(r.failures.is_empty() && r.conflicts.is_empty(), "{r:?}");
    same_files(&src, &restored_root(&out, &src));
    let out1 = tmp.path().join("out1");
    let r = restore_to(&repo, &first.snapshot, &out1, false).unwrap();
    assert!(r.failures.is_empty(), "{r:?}");
    let c = check(
        &repo,
        &CheckOptions {
            read_data: true,
            subset_percent: None,
        },
    )
    .unwrap();
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    assert!(
        faulty.injected() >= 5,
        "faults were injected ({} of {} calls)",
        faulty.injected(),
        faulty.calls()
    );
}

#[test]
fn a_backup_gives_up_in_bounded_time_when_the_store_goes_down_and_the_repository_stays_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let before = tmp.path().join("before");
    make_tree(&before, 41);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..12 {
        std::fs::write(
            src.join(format!("{i}.bin")),
            crate::testutil::pseudo_random(4 * 1024 * 1024, 50 + i),
        )
        .unwrap();
    }
    let store: Arc<dyn Backend> = Arc::new(LocalBackend::new(tmp.path().join("repo")));
    Repository::init(store.clone(), "pw", &opts()).unwrap();
    let faults = FaultPolicy {
        latency: std::time::Duration::from_millis(20),
        ..FaultPolicy::default()
    };
    let (repo, faulty) = through_faults(store, faults, std::time::Duration::from_secs(2));
    let kept = backup_dir(&repo, &before, None).unwrap();
    let started = std::time::Instant::now();
    let result = std::thread::scope(|s| {
        let job = s.spawn(|| backup_dir(&repo, &src, None));
        std::thread::sleep(std::time::Duration::from_millis(150));
        faulty.set_down(true);
        job.join().unwrap()
    });
    let elapsed = started.elapsed();
    let err = result.expect_err("a backup into a dead store fails");
    assert!(
        elapsed < std::time::Duration::from_secs(20),
        "gave up after {elapsed:?}"
    );
    assert!(
        err.to_string().contains("gave up") || err.to_string().contains("circuit breaker"),
        "{err}"
    );
    faulty.set_down(false);
    // The breaker lets a probe through after its cool-down.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let c = check(&repo, &CheckOptions::default()).unwrap();
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    assert_eq!(repo.snapshots().unwrap().len(), 1, "no half snapshot");
    let out = tmp.path().join("out");
    let r = restore_to(&repo, &kept.snapshot, &out, false).unwrap();
    assert!(r.failures.is_empty(), "{r:?}");
    same_files(&before, &restored_root(&out, &before));
}
