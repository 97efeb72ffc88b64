//! The reliability suite's engine-level half (issue 8): storage that fails
//! every kind of request at random, bit rot in every kind of object, and
//! several hosts backing up while forget and prune run. Each test counts
//! what it injected and asserts on every injection; loops are bounded by
//! count (`LIFEBOAT_RELIABILITY_ROUNDS` raises them for a long run) and
//! every store call by the retry layer's time budget. The process-level
//! half (kill -9, clocks, hostile sources) is in `tests/e2e/reliability.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::resilience::{
    resilient, BreakerPolicy, FaultPolicy, Faulty, ResiliencePolicy, RetryPolicy,
};
use crate::backend::{Backend, LocalBackend, MemoryBackend};
use crate::backup::{backup, BackupOptions, Progress};
use crate::check::{check, CheckOptions};
use crate::object::ObjectKind;
use crate::prune::{prune, PruneOptions};
use crate::repo::{InitOptions, Repository};
use crate::restore::{restore, RestoreOptions};
use crate::{Error, Id};

/// Rounds of the randomised tests: a short run in CI, more on request.
fn rounds(short: usize) -> usize {
    std::env::var("LIFEBOAT_RELIABILITY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(short)
}

fn opts() -> InitOptions {
    InitOptions {
        kdf_work_factor: 10,
        pack_size: 1024 * 1024,
        ..InitOptions::default()
    }
}

/// A small tree that depends on `seed`: text, incompressible data spanning
/// several chunks and packs, and a subdirectory.
fn make_tree(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(
        root.join("notes.txt"),
        format!("seed {seed}\n").repeat(2000),
    )
    .unwrap();
    std::fs::write(
        root.join("sub/data.bin"),
        crate::testutil::pseudo_random(3 << 20, seed),
    )
    .unwrap();
    std::fs::write(
        root.join("sub/small.bin"),
        crate::testutil::pseudo_random(100_000, seed + 1000),
    )
    .unwrap();
}

/// Every regular file below `root`, by path relative to it.
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    if !root.exists() {
        return out;
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

fn backup_of(
    repo: &Repository,
    dir: &Path,
    host: &str,
) -> crate::Result<crate::backup::BackupReport> {
    backup(
        repo,
        &BackupOptions {
            paths: vec![dir.to_path_buf()],
            host: Some(host.to_string()),
            ..BackupOptions::default()
        },
        &Progress::default(),
    )
}

fn restore_into(
    repo: &Repository,
    tree: &Id,
    target: &Path,
) -> crate::Result<crate::restore::RestoreReport> {
    let snapshot = crate::Snapshot {
        version: 1,
        time: chrono::Utc::now(),
        host: "h".into(),
        user: "u".into(),
        paths: vec![],
        tags: vec![],
        tree: *tree,
        incomplete: false,
        summary: crate::Summary {
            dirs: 10_000,
            ..Default::default()
        },
        program: "test".into(),
        locked_until: None,
    };
    restore(
        repo,
        &snapshot,
        &RestoreOptions {
            target: target.to_path_buf(),
            ..Default::default()
        },
    )
}

fn read_all() -> CheckOptions {
    CheckOptions {
        read_data: true,
        subset_percent: None,
    }
}

/// A repository handle whose every request may fail: before the store acts,
/// after it acted (the reply lost), with a truncated body, or slowly; the
/// retry layer has a small budget, so many faults reach the engines.
fn flaky(store: Arc<dyn Backend>, seed: u64, rate: f64) -> (Repository, Arc<Faulty>) {
    let faulty = Arc::new(Faulty::new(
        store,
        FaultPolicy {
            error_rate: rate,
            error_after_rate: rate,
            truncate_rate: rate,
            latency: std::time::Duration::from_millis(1),
            seed,
        },
    ));
    let policy = ResiliencePolicy {
        retry: RetryPolicy {
            max_attempts: 2,
            base_delay: std::time::Duration::from_millis(1),
            max_delay: std::time::Duration::from_millis(5),
            max_elapsed: std::time::Duration::from_secs(2),
        },
        breaker: BreakerPolicy {
            failure_threshold: 1000,
            cool_down: std::time::Duration::from_millis(10),
            max_cool_down: std::time::Duration::from_millis(10),
        },
        timeout: Some(std::time::Duration::from_secs(5)),
        ..ResiliencePolicy::default()
    };
    let stack = resilient(faulty.clone(), &policy).backend;
    let repo = loop {
        // Opening reads the config and a key through the faults too.
        if let Ok(repo) = Repository::open(stack.clone(), "pw") {
            break repo;
        }
    };
    (repo, faulty)
}

#[test]
fn under_random_faults_of_every_request_kind_nothing_returns_wrong_bytes_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let store: Arc<dyn Backend> = Arc::new(LocalBackend::new(tmp.path().join("repo")));
    Repository::init(store.clone(), "pw", &opts()).unwrap();
    let mut committed: Vec<(Id, u64)> = Vec::new();
    let (mut injected, mut calls) = (0, 0);
    let (mut backups_failed, mut restores_failed, mut prunes_failed) = (0, 0, 0);
    let n = rounds(10);
    for round in 0..n as u64 {
        let src = tmp.path().join(format!("src{round}"));
        make_tree(&src, round);
        let (repo, faulty) = flaky(store.clone(), round, 0.06);
        match backup_of(&repo, &src, "h") {
            Ok(r) => committed.push((r.snapshot.tree, round)),
            Err(_) => backups_failed += 1,
        }
        // A restore through the faults gives the right bytes or an error.
        if let Some(&(tree, seed)) = committed.last() {
            let out = tmp.path().join(format!("out{round}"));
            match restore_into(&repo, &tree, &out) {
                Ok(r) => {
                    let failed: Vec<&str> = r.failures.iter().map(|f| f.path.as_str()).collect();
                    let restored = files(
                        &out.join(tmp.path().strip_prefix("/").unwrap())
                            .join(format!("src{seed}")),
                    );
                    let expected = files(&tmp.path().join(format!("src{seed}")));
                    for (path, bytes) in &restored {
                        assert_eq!(
                            Some(bytes),
                            expected.get(path),
                            "round {round}: {} restored with wrong bytes",
                            path.display()
                        );
                    }
                    if failed.is_empty() {
                        assert_eq!(restored.len(), expected.len(), "round {round}");
                    } else {
                        restores_failed += 1;
                    }
                }
                Err(_) => restores_failed += 1,
            }
            std::fs::remove_dir_all(&out).ok();
        }
        if round % 2 == 1 {
            let r = prune(
                &repo,
                &PruneOptions {
                    grace: std::time::Duration::ZERO,
                    min_pack_age: std::time::Duration::ZERO,
                    ..PruneOptions::default()
                },
            );
            if r.is_err() {
                prunes_failed += 1;
            }
        }
        injected += faulty.injected();
        calls += faulty.calls();
    }
    // Through a healthy store: the repository is intact, and every snapshot
    // that was committed restores exactly.
    let repo = Repository::open(store, "pw").unwrap();
    let report = check(&repo, &read_all()).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    for (tree, seed) in &committed {
        let out = tmp.path().join(format!("final{seed}"));
        let r = restore_into(&repo, tree, &out).unwrap();
        assert!(r.failures.is_empty(), "{r:?}");
        assert_eq!(
            files(
                &out.join(tmp.path().strip_prefix("/").unwrap())
                    .join(format!("src{seed}"))
            ),
            files(&tmp.path().join(format!("src{seed}")))
        );
    }
    eprintln!(
        "storage faults: {injected} injected in {calls} calls over {n} rounds; \
         {backups_failed} backups, {restores_failed} restores and {prunes_failed} prunes \
         failed cleanly; {} snapshots committed, all intact",
        committed.len()
    );
    assert!(injected > 30, "faults were injected: {injected}");
    assert!(!committed.is_empty(), "some backups got through");
    assert!(
        backups_failed + restores_failed + prunes_failed > 0,
        "some faults reached the engines"
    );
}

/// What a flipped byte in one object did.
struct Rot {
    key: String,
    detected: bool,
}

#[test]
fn bit_rot_in_any_object_is_detected_by_check_and_unaffected_files_still_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryBackend::new());
    let repo = Repository::init(mem.clone(), "pw", &opts()).unwrap();
    let mut sources = HashMap::new();
    for seed in [1u64, 2] {
        let src = tmp.path().join(format!("src{seed}"));
        make_tree(&src, seed);
        // Many small files, so a damaged pack spares some of them.
        for i in 0..30 {
            std::fs::write(
                src.join(format!("f{i:02}.bin")),
                crate::testutil::pseudo_random(60_000, seed * 100 + i),
            )
            .unwrap();
        }
        let r = backup_of(&repo, &src, "h").unwrap();
        sources.insert(r.snapshot_id, (r.snapshot.tree, src));
    }
    let index = repo.load_index().unwrap();
    let tree_packs: std::collections::HashSet<String> = index
        .packs()
        .iter()
        .filter(|p| p.kind == crate::pack::BlobKind::Tree)
        .map(|p| crate::repo::pack_key(&p.id))
        .collect();
    let mut targets: Vec<(String, &str)> = Vec::new();
    for o in mem.list("").unwrap() {
        let kind = if o.key.starts_with("data/") {
            if tree_packs.contains(&o.key) {
                "tree pack"
            } else {
                "data pack"
            }
        } else if o.key.starts_with("index/") {
            "index"
        } else if o.key.starts_with("snapshots/") {
            "snapshot"
        } else {
            continue;
        };
        targets.push((o.key, kind));
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let n = rounds(24);
    let mut rots = Vec::new();
    let mut kinds_hit = std::collections::BTreeSet::new();
    for round in 0..n {
        // Every kind early, then at random.
        let (key, kind) = if round < 4 {
            let wanted = ["data pack", "tree pack", "index", "snapshot"][round];
            targets.iter().find(|t| t.1 == wanted).unwrap().clone()
        } else {
            targets[next() as usize % targets.len()].clone()
        };
        kinds_hit.insert(kind);
        let original = mem.get(&key, None).unwrap();
        let mut rotten = original.clone();
        let at = next() as usize % rotten.len();
        rotten[at] ^= 1 << (next() % 8);
        mem.corrupt(&key, rotten);

        let report = check(&repo, &read_all()).unwrap();
        let detected = !report.errors.is_empty();
        assert!(
            detected,
            "round {round}: a flipped bit in {kind} {key} went unnoticed"
        );
        // Every snapshot that can still be read restores: a file is lost
        // only if check named it (or its directory), and no file comes back
        // wrong. (Damage confined to a pack's trailer loses nothing, since
        // the index has the offsets: check reports the pack and names no
        // file.)
        for (snap_id, (tree, src)) in &sources {
            let out = tmp.path().join("out");
            let named: Vec<&str> = report
                .affected
                .iter()
                .filter(|a| snap_id.to_hex().starts_with(&a.snapshot))
                .map(|a| a.path.as_str())
                .collect();
            match restore_into(&repo, tree, &out) {
                Ok(r) => {
                    let restored = files(&out.join(src.strip_prefix("/").unwrap()));
                    let expected = files(src);
                    for (path, bytes) in &restored {
                        assert_eq!(Some(bytes), expected.get(path), "{}", path.display());
                    }
                    for path in expected.keys() {
                        let full = format!("{}/{}", src.display(), path.display());
                        let lost = !restored.contains_key(path);
                        assert!(
                            !lost || named.iter().any(|n| full.starts_with(n)) || kind == "index",
                            "round {round}: {full} was lost to damage in {kind} but check did not name it: {:?}; check said {:?}; restore said {:?}",
                            report.affected,
                            report.errors,
                            r.failures
                        );
                    }
                    let _ = r;
                }
                Err(e) => assert!(
                    matches!(e, Error::Corrupt { .. } | Error::Missing { .. }),
                    "round {round}: restore failed unclearly: {e}"
                ),
            }
            std::fs::remove_dir_all(&out).ok();
        }
        mem.corrupt(&key, original);
        rots.push(Rot { key, detected });
    }
    assert!(check(&repo, &read_all()).unwrap().errors.is_empty());
    let detected = rots.iter().filter(|r| r.detected).count();
    eprintln!(
        "bit rot: {detected} of {} corruptions detected ({} objects, kinds {:?})",
        rots.len(),
        rots.iter()
            .map(|r| &r.key)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        kinds_hit
    );
    assert_eq!(detected, rots.len());
}

#[test]
fn hosts_backing_up_while_forget_and_prune_run_never_lose_referenced_data() {
    let tmp = tempfile::tempdir().unwrap();
    let store: Arc<dyn Backend> = Arc::new(LocalBackend::new(tmp.path().join("repo")));
    Repository::init(store.clone(), "pw", &opts()).unwrap();
    let n = rounds(15);
    let hosts = ["alpha", "beta", "gamma"];
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (committed, refused, prunes) = std::thread::scope(|s| {
        let workers: Vec<_> = hosts
            .iter()
            .enumerate()
            .map(|(h, host)| {
                let store = store.clone();
                let tmp = tmp.path().to_path_buf();
                s.spawn(move || {
                    let repo = Repository::open(store, "pw").unwrap();
                    let mut done = Vec::new();
                    let mut refused = 0;
                    for round in 0..n as u64 {
                        let seed = 1000 * h as u64 + round;
                        let src = tmp.join(format!("{host}-{round}"));
                        make_tree(&src, seed);
                        match backup_of(&repo, &src, host) {
                            Ok(r) => done.push((r.snapshot_id, r.snapshot.tree, src)),
                            // The documented refusal when a concurrent prune
                            // condemned what this backup used.
                            Err(Error::Invalid(m)) if m.contains("run the backup again") => {
                                refused += 1
                            }
                            Err(e) => panic!("{host} round {round}: {e}"),
                        }
                    }
                    (done, refused)
                })
            })
            .collect();
        let maintenance = s.spawn(|| {
            let repo = Repository::open(store.clone(), "pw").unwrap();
            let mut prunes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Forget all but each host's newest snapshot, then prune with a
                // short grace (the protocol's guarantees, at test speed).
                let snaps = repo.snapshots().unwrap().pairs();
                let mut newest: HashMap<&str, chrono::DateTime<chrono::Utc>> = HashMap::new();
                for (_, s) in &snaps {
                    let e = newest.entry(s.host.as_str()).or_insert(s.time);
                    *e = (*e).max(s.time);
                }
                for (id, s) in &snaps {
                    if newest[s.host.as_str()] != s.time {
                        repo.delete_object(ObjectKind::Snapshot, id).unwrap();
                    }
                }
                prune(
                    &repo,
                    &PruneOptions {
                        grace: std::time::Duration::from_millis(300),
                        min_pack_age: std::time::Duration::from_secs(2),
                        ..PruneOptions::default()
                    },
                )
                .unwrap();
                prunes += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            prunes
        });
        // Stop the maintenance loop before looking at how the hosts ended:
        // a host that panicked must fail the test, not leave it waiting
        // for a loop that never stops.
        let ended: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let prunes = maintenance.join().unwrap();
        let mut committed = Vec::new();
        let mut refused = 0;
        for e in ended {
            let (done, r) = e.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            committed.extend(done);
            refused += r;
        }
        (committed, refused, prunes)
    });
    // Whatever survived forget restores exactly, and the repository is clean.
    let repo = Repository::open(store, "pw").unwrap();
    let report = check(&repo, &read_all()).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let alive: std::collections::HashSet<Id> = repo
        .snapshots()
        .unwrap()
        .snapshots
        .into_iter()
        .map(|l| l.id)
        .collect();
    let mut restored = 0;
    for (id, tree, src) in &committed {
        if !alive.contains(id) {
            continue;
        }
        let out = tmp.path().join(format!("out-{}", id.short()));
        let r = restore_into(&repo, tree, &out).unwrap();
        assert!(r.failures.is_empty(), "{r:?}");
        assert_eq!(files(&out.join(src.strip_prefix("/").unwrap())), files(src));
        restored += 1;
    }
    eprintln!(
        "concurrency: {} hosts x {n} rounds, {} backups committed, {refused} refused to commit \
         (documented), {prunes} forget+prune passes; {restored} surviving snapshots restore exactly",
        hosts.len(),
        committed.len()
    );
    assert!(prunes >= 2 && restored >= hosts.len() - 1);
}
