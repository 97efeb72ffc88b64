//! Drills against real repositories on disk: a healthy one passes with real
//! timings; damage, a failing validation, the disk cap and the time limit
//! each end the drill the way the report says.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_core::backend::resilience::{FaultPolicy, Faulty};
use lifeboat_core::backend::{Backend, LocalBackend};
use lifeboat_core::backup::{backup, BackupOptions, Progress};
use lifeboat_core::{InitOptions, Repository};

use super::*;

fn init(dir: &Path) -> Repository {
    let opts = InitOptions {
        kdf_work_factor: 10,
        pack_size: 1024 * 1024,
        ..InitOptions::default()
    };
    Repository::init(Arc::new(LocalBackend::new(dir.join("repo"))), "pw", &opts).unwrap()
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A source tree: a few MiB of data, text files, a link; backed up with
/// the source tag the agent uses.
fn backed_up(dir: &Path) -> Repository {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("big.bin"), random(3 << 20, 1)).unwrap();
    std::fs::write(src.join("sub/other.bin"), random(2 << 20, 2)).unwrap();
    for i in 0..20 {
        std::fs::write(
            src.join(format!("sub/note-{i}.txt")),
            format!("note {i}\n").repeat(200),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("sub/note-1.txt", src.join("link")).unwrap();
    let repo = init(dir);
    backup(
        &repo,
        &BackupOptions {
            paths: vec![src],
            tags: vec!["source:db".into()],
            ..BackupOptions::default()
        },
        &Progress::default(),
    )
    .unwrap();
    repo
}

fn spec(dir: &Path) -> DrillSpec {
    DrillSpec {
        name: "test".into(),
        source: "db".into(),
        source_tag: "source:db".into(),
        host: None,
        snapshot: SnapshotChoice::Latest,
        scope: Scope::Full,
        scratch_dir: dir.join("scratch"),
        max_disk_bytes: None,
        time_limit: Duration::from_secs(120),
        validations: Vec::new(),
        keep: false,
        rto_target: Some(Duration::from_secs(3600)),
        rpo_target: None,
    }
}

fn no_cancel() -> AtomicBool {
    AtomicBool::new(false)
}

#[test]
fn a_drill_on_a_healthy_repository_passes_with_real_timings_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = backed_up(tmp.path());
    let mut s = spec(tmp.path());
    s.validations.push(Validation {
        command: "find {restore_dir} -name big.bin | grep -q big.bin".into(),
        timeout: Duration::from_secs(30),
    });
    let r = run(&repo, &s, &lifeboat_core::hostname(), &no_cancel());
    assert_eq!(
        r.outcome,
        DrillOutcome::Passed,
        "{:?} {:?}",
        r.summary,
        r.problems
    );
    assert_eq!(r.files_restored, 22);
    assert_eq!(r.files_verified, 22);
    assert!(r.entries_checked >= 25, "{}", r.entries_checked);
    assert!(r.bytes_restored >= 5 << 20);
    let restore = r.phases.iter().find(|p| p.name == "restore").unwrap();
    assert!(restore.seconds > 0.0);
    assert!(r.throughput_bytes_per_sec > 0.0);
    let rto = r.rto.as_ref().unwrap();
    assert_eq!(rto.full_restore_seconds, rto.measured_restore_seconds);
    assert_eq!(rto.status, "OK");
    assert!(r.validations[0].passed, "{:?}", r.validations);
    assert!(!Path::new(&r.sandbox).exists(), "the sandbox is removed");
    // The report is kept in the repository.
    let stored = stored_reports(&repo).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, r.id);
}

#[test]
fn a_sample_drill_restores_part_and_extrapolates_the_full_restore_time() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = backed_up(tmp.path());
    let mut s = spec(tmp.path());
    s.scope = Scope::Sample(10.0);
    let r = run(&repo, &s, &lifeboat_core::hostname(), &no_cancel());
    assert_eq!(r.outcome, DrillOutcome::Passed, "{:?}", r.summary);
    let rto = r.rto.unwrap();
    assert!(rto.restored_bytes < rto.snapshot_bytes, "{rto:?}");
    assert!(rto.method.starts_with("extrapolated"), "{}", rto.method);
    assert!(rto.full_restore_seconds >= rto.measured_restore_seconds);
}

#[test]
fn a_corrupted_pack_fails_the_drill_and_names_the_files_and_the_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = backed_up(tmp.path());
    // Flip a byte in the middle of every data pack.
    let backend = LocalBackend::new(tmp.path().join("repo"));
    let packs = backend.list("data/").unwrap();
    // Only the data packs (the large ones): the trees stay readable, so
    // the damage is traced to the files it hits.
    for p in packs.iter().filter(|p| p.size > 512 * 1024) {
        let path = tmp.path().join("repo").join(&p.key);
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        let mut perm = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
        std::fs::set_permissions(&path, perm).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    let repo = {
        drop(repo);
        Repository::open(Arc::new(LocalBackend::new(tmp.path().join("repo"))), "pw").unwrap()
    };
    let r = run(
        &repo,
        &spec(tmp.path()),
        &lifeboat_core::hostname(),
        &no_cancel(),
    );
    assert_eq!(r.outcome, DrillOutcome::Failed, "{r:?}");
    assert!(!r.problems.is_empty());
    let text: Vec<String> = r
        .problems
        .iter()
        .map(|p| format!("{}: {}", p.path, p.reason))
        .collect();
    assert!(
        text.iter()
            .any(|t| t.contains(".bin") && t.contains("pack")),
        "names a file and the pack: {text:?}"
    );
    assert!(r.summary.unwrap().contains("failed to restore or verify"));
}

#[test]
fn a_failing_validation_command_fails_the_drill_with_its_output() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = backed_up(tmp.path());
    let mut s = spec(tmp.path());
    s.validations.push(Validation {
        command: "echo 'pg_restore: error: input file is too short'; exit 3".into(),
        timeout: Duration::from_secs(30),
    });
    let r = run(&repo, &s, &lifeboat_core::hostname(), &no_cancel());
    assert_eq!(r.outcome, DrillOutcome::Failed);
    let v = &r.validations[0];
    assert_eq!(v.exit_code, Some(3));
    assert!(v.output.contains("input file is too short"), "{v:?}");
    assert!(r.summary.unwrap().contains("validation failed"));
}

#[test]
fn a_drill_for_one_host_restores_only_that_hosts_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = backed_up(tmp.path());
    let mut s = spec(tmp.path());
    s.host = Some("another-host".into());
    let r = run(&repo, &s, "drill-host", &no_cancel());
    assert_eq!(r.outcome, DrillOutcome::Refused, "{:?}", r.summary);
    assert_eq!(r.files_restored, 0);
    s.host = Some(lifeboat_core::hostname());
    let r = run(&repo, &s, "drill-host", &no_cancel());
    assert_eq!(r.outcome, DrillOutcome::Passed, "{:?}", r.summary);
}

#[test]
fn a_drill_over_its_disk_cap_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = backed_up(tmp.path());
    let mut s = spec(tmp.path());
    s.max_disk_bytes = Some(1 << 20);
    let r = run(&repo, &s, &lifeboat_core::hostname(), &no_cancel());
    assert_eq!(r.outcome, DrillOutcome::Refused);
    assert!(
        r.summary.as_ref().unwrap().contains("disk cap"),
        "{:?}",
        r.summary
    );
    assert_eq!(r.files_restored, 0);
    assert!(r.sandbox.is_empty(), "no sandbox was made");
}

#[test]
fn a_drill_past_its_time_limit_is_stopped_reported_and_its_sandbox_removed() {
    let tmp = tempfile::tempdir().unwrap();
    drop(backed_up(tmp.path()));
    // A slow store: every request takes about 300 ms.
    let slow: Arc<dyn Backend> = Arc::new(Faulty::new(
        Arc::new(LocalBackend::new(tmp.path().join("repo"))),
        FaultPolicy {
            latency: Duration::from_millis(400),
            ..FaultPolicy::default()
        },
    ));
    let repo = Repository::open(slow, "pw").unwrap();
    let mut s = spec(tmp.path());
    s.time_limit = Duration::from_secs(3);
    let started = std::time::Instant::now();
    let r = run(&repo, &s, &lifeboat_core::hostname(), &no_cancel());
    assert_eq!(r.outcome, DrillOutcome::TimedOut, "{:?}", r.summary);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(!Path::new(&r.sandbox).exists(), "the sandbox is removed");
}
