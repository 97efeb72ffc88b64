//! Restore drills: proof that recovery works, and how long it takes.
//!
//! A drill restores a snapshot for real into a sandbox, through the same
//! engine an operator's restore uses and reading from the repository (on
//! S3 it measures the real download path); verifies every restored entry
//! against the snapshot (content hash, size, type, mode, symlink target);
//! runs the configured validation commands against the restored tree;
//! removes the sandbox; and writes a [`DrillReport`]. The report is stored
//! in the repository too (`drills/<id>`, encrypted like every object), so
//! it survives the loss of the host.
//!
//! RTO: the measured duration of the restore; for a sample, the
//! full-restore time extrapolated from the measured throughput and the
//! snapshot's total size, plus the measured fixed cost of planning (the
//! method is written into the report).

pub mod render;
pub mod report;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use lifeboat_core::restore::{restore, RestoreOptions};
use lifeboat_core::{Id, Listed, Node, NodeKind, ObjectKind, Repository, Selector, Snapshot};
use rand::seq::SliceRandom;

use crate::render::human_bytes as bytes;

pub use report::*;

/// Which snapshot a drill restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotChoice {
    /// The source's newest snapshot.
    Latest,
    /// A random snapshot of the source from the last N days (exercises old
    /// data too, not just the newest packs).
    RandomWithin(Duration),
    /// A given snapshot (ID or unique prefix).
    Given(String),
}

/// What a drill restores.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// Everything.
    Full,
    /// A random sample of files holding about this percentage of the bytes.
    Sample(f64),
    /// These paths (and what is below them).
    Paths(Vec<String>),
}

/// A command run against the restored tree; `{restore_dir}` is replaced by
/// the sandbox path.
#[derive(Debug, Clone)]
pub struct Validation {
    /// The command, run with `/bin/sh -c`.
    pub command: String,
    /// How long it may run.
    pub timeout: Duration,
}

/// A drill to run.
#[derive(Debug, Clone)]
pub struct DrillSpec {
    /// The drill's name.
    pub name: String,
    /// The source's name (for the report).
    pub source: String,
    /// Snapshots carrying this tag are the source's (`source:NAME`); empty
    /// means every snapshot.
    pub source_tag: String,
    /// Only snapshots taken on this host; `None` means any host. A drill
    /// host (one that holds the passphrase) drills write-only hosts'
    /// snapshots this way.
    pub host: Option<String>,
    /// Which snapshot.
    pub snapshot: SnapshotChoice,
    /// What to restore.
    pub scope: Scope,
    /// Directory in which the sandbox is created.
    pub scratch_dir: PathBuf,
    /// Refuse to start when the restore would need more than this.
    pub max_disk_bytes: Option<u64>,
    /// Stop the drill after this long.
    pub time_limit: Duration,
    /// Commands run against the restored tree.
    pub validations: Vec<Validation>,
    /// Keep the sandbox afterwards.
    pub keep: bool,
    /// The source's RTO target.
    pub rto_target: Option<Duration>,
    /// The source's RPO target.
    pub rpo_target: Option<Duration>,
}

/// Space kept free on the scratch file system whatever the cap says.
const FREE_SPACE_MARGIN: u64 = 256 << 20;

/// Runs a drill and returns its report (which is also saved in the
/// repository). Never panics on bad input: every failure is an outcome.
pub fn run(repo: &Repository, spec: &DrillSpec, host: &str, cancel: &AtomicBool) -> DrillReport {
    let started = Utc::now();
    let mut report = DrillReport {
        version: REPORT_VERSION,
        id: hex(&rand::random::<[u8; 16]>()),
        name: spec.name.clone(),
        source: spec.source.clone(),
        host: host.to_string(),
        started,
        finished: started,
        outcome: DrillOutcome::Passed,
        summary: None,
        snapshot_id: None,
        snapshot_time: None,
        snapshot_choice: match &spec.snapshot {
            SnapshotChoice::Latest => "latest".into(),
            SnapshotChoice::RandomWithin(d) => {
                format!("random within {}", render::human_duration(d.as_secs_f64()))
            }
            SnapshotChoice::Given(s) => format!("given ({s})"),
        },
        scope: match &spec.scope {
            Scope::Full => "full".into(),
            Scope::Sample(p) => format!("sample {p}%"),
            Scope::Paths(p) => format!("paths: {}", p.join(", ")),
        },
        sandbox: String::new(),
        kept: spec.keep,
        files_restored: 0,
        files_verified: 0,
        entries_checked: 0,
        bytes_restored: 0,
        throughput_bytes_per_sec: 0.0,
        phases: Vec::new(),
        problems: Vec::new(),
        validations: Vec::new(),
        rto: None,
        rpo_seconds: None,
        rpo_target_seconds: spec.rpo_target.map(|d| d.as_secs_f64()),
        history: Vec::new(),
    };
    let deadline = Instant::now() + spec.time_limit;
    let result = drill(repo, spec, host, &mut report, deadline, cancel);
    if let Err((outcome, why)) = result {
        report.outcome = outcome;
        report.summary = Some(why);
    }
    report.finished = Utc::now();
    match repo.save(ObjectKind::Drill, &report) {
        Ok(id) => log::info!("drill report saved in the repository as drills/{id}"),
        Err(e) => log::warn!("drill report not saved in the repository: {e}"),
    }
    report
}

type Failure = (DrillOutcome, String);

fn refused(why: impl Into<String>) -> Failure {
    (DrillOutcome::Refused, why.into())
}

/// Chooses the snapshot, then restores, verifies and validates it.
fn drill(
    repo: &Repository,
    spec: &DrillSpec,
    host: &str,
    report: &mut DrillReport,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<(), Failure> {
    // List: choose the snapshot and what to restore.
    let list_clock = Instant::now();
    let (id, snap) = choose_snapshot(repo, spec, host, report)?;
    report.snapshot_id = Some(id.to_hex());
    report.snapshot_time = Some(snap.time);
    let index = repo
        .load_index_for_host(&snap.host)
        .map_err(|e| refused(format!("cannot load the index: {e}")))?;
    let mut files: Vec<(String, u64)> = Vec::new();
    // A damaged tree is a finding, not a reason to stop: the rest of the
    // snapshot is still drilled, and the drill fails naming the directory.
    lifeboat_core::walk::walk_tolerant(
        repo,
        &index,
        &snap,
        &mut |path, node| {
            if node.kind == NodeKind::File {
                files.push((slash_path(path), node.size));
            }
            Ok(())
        },
        &mut |dir, e| {
            report.problems.push(FileProblem {
                path: slash_path(dir),
                reason: format!("directory cannot be read: {e}"),
            });
        },
    )
    .map_err(|e| refused(format!("cannot read the snapshot's trees: {e}")))?;
    let total: u64 = files.iter().map(|(_, s)| s).sum();
    let (includes, selected_bytes) = select(&files, &spec.scope, total);
    report.phases.push(Phase {
        name: "list".into(),
        seconds: list_clock.elapsed().as_secs_f64(),
        note: Some("choose the snapshot, read its trees, pick the scope".into()),
    });

    // Disk space: refuse rather than fill the disk.
    std::fs::create_dir_all(&spec.scratch_dir).map_err(|e| {
        refused(format!(
            "cannot create scratch directory {}: {e}",
            spec.scratch_dir.display()
        ))
    })?;
    if let Some(cap) = spec.max_disk_bytes {
        if selected_bytes > cap {
            return Err(refused(format!(
                "the restore needs {} but the drill's disk cap is {}; raise max_disk or drill a sample",
                bytes(selected_bytes),
                bytes(cap)
            )));
        }
    }
    let free = free_space(&spec.scratch_dir).unwrap_or(u64::MAX);
    if selected_bytes.saturating_add(FREE_SPACE_MARGIN) > free {
        return Err(refused(format!(
            "the restore needs {} and {} has {} free (keeping {} spare)",
            bytes(selected_bytes),
            spec.scratch_dir.display(),
            bytes(free),
            bytes(FREE_SPACE_MARGIN)
        )));
    }
    let sandbox = spec
        .scratch_dir
        .join(format!("lifeboat-drill-{}", &report.id[..12]));
    report.sandbox = sandbox.display().to_string();

    let outcome = restore_verify_validate(
        repo, spec, report, &sandbox, &snap, includes, total, deadline, cancel,
    );
    let cleanup_clock = Instant::now();
    if !spec.keep {
        if let Err(e) = std::fs::remove_dir_all(&sandbox) {
            if sandbox.exists() {
                report.problems.push(FileProblem {
                    path: sandbox.display().to_string(),
                    reason: format!("could not remove the sandbox: {e}"),
                });
            }
        }
        report.kept = false;
    }
    report.phases.push(Phase {
        name: "cleanup".into(),
        seconds: cleanup_clock.elapsed().as_secs_f64(),
        note: None,
    });
    outcome
}

#[allow(clippy::too_many_arguments)]
fn restore_verify_validate(
    repo: &Repository,
    spec: &DrillSpec,
    report: &mut DrillReport,
    sandbox: &Path,
    tree: &Snapshot,
    includes: Vec<String>,
    snapshot_bytes: u64,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<(), Failure> {
    // Restore, on a thread, so the time limit can be enforced from here.
    let restore_clock = Instant::now();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let opts = RestoreOptions {
        target: sandbox.to_path_buf(),
        includes,
        verify: true,
        cancel: Some(stop.clone()),
        // No index cache: a drill proves recovery from the repository
        // alone, as on a machine that lost its own.
        index_cache: None,
        ..RestoreOptions::default()
    };
    let mut timed_out = false;
    let restored = std::thread::scope(|s| {
        let job = s.spawn(|| restore(repo, tree, &opts));
        loop {
            if job.is_finished() {
                return job.join();
            }
            if !stop.load(Ordering::Relaxed)
                && (Instant::now() >= deadline || cancel.load(Ordering::Relaxed))
            {
                // The engine stops between packs and returns Interrupted.
                timed_out = Instant::now() >= deadline;
                stop.store(true, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let r = match restored {
        Err(_) => return Err((DrillOutcome::Failed, "the restore panicked".into())),
        Ok(Err(lifeboat_core::Error::Interrupted)) if timed_out => {
            return Err((
                DrillOutcome::TimedOut,
                format!(
                "the restore did not finish within the drill's time limit of {}; it was stopped",
                render::human_duration(spec.time_limit.as_secs_f64())
            ),
            ))
        }
        Ok(Err(e)) => return Err((DrillOutcome::Failed, format!("the restore failed: {e}"))),
        Ok(Ok(r)) => r,
    };
    let restore_secs = restore_clock.elapsed().as_secs_f64() - r.timings.verify_secs;
    let t = &r.timings;
    report.phases.push(Phase {
        name: "restore".into(),
        seconds: restore_secs,
        note: Some(
            "wall time of the restore without verification: this is the measured RTO".into(),
        ),
    });
    let pipeline = "worker thread-seconds inside the pipelined restore; the parts overlap";
    for (name, secs) in [
        ("download+decrypt", t.fetch_thread_secs),
        ("decompress+hash", t.decode_thread_secs),
        ("write", t.write_thread_secs),
    ] {
        report.phases.push(Phase {
            name: name.into(),
            seconds: secs,
            note: Some(pipeline.into()),
        });
    }
    report.files_restored = r.files_restored;
    report.files_verified = r.files_verified;
    report.bytes_restored = r.bytes_written;
    report.throughput_bytes_per_sec = if restore_secs > 0.0 {
        r.bytes_written as f64 / restore_secs
    } else {
        0.0
    };
    for f in &r.failures {
        report.problems.push(FileProblem {
            path: f.path.clone(),
            reason: f.reason.clone(),
        });
    }

    // Verify: content was hashed by the engine; here, type, size, mode and
    // symlink targets of every restored entry.
    let verify_clock = Instant::now();
    let failed: HashSet<String> = r.failures.iter().map(|f| f.path.clone()).collect();
    let index = repo
        .load_index_for_host(&tree.host)
        .map_err(|e| (DrillOutcome::Failed, format!("cannot load the index: {e}")))?;
    let selected = |p: &str| -> bool {
        sandbox
            .join(p.trim_start_matches('/'))
            .symlink_metadata()
            .is_ok()
    };
    let mut checked = 0u64;
    let mut found = Vec::new();
    lifeboat_core::walk::walk_tolerant(
        repo,
        &index,
        tree,
        &mut |path, node| {
            let p = slash_path(path);
            if failed.contains(&p) || !selected(&p) {
                return Ok(());
            }
            checked += 1;
            if let Some(problem) = check_entry(&sandbox.join(p.trim_start_matches('/')), node) {
                found.push(FileProblem {
                    path: p,
                    reason: problem,
                });
            }
            Ok(())
        },
        // Damaged trees were reported while listing.
        &mut |_, _| {},
    )
    .map_err(|e| {
        (
            DrillOutcome::Failed,
            format!("cannot re-read the snapshot's trees: {e}"),
        )
    })?;
    report.problems.extend(found);
    report.entries_checked = checked;
    report.phases.push(Phase {
        name: "verify".into(),
        seconds: t.verify_secs + verify_clock.elapsed().as_secs_f64(),
        note: Some("content hashes by the engine, then type, size, mode and link targets".into()),
    });

    // Validate.
    let validate_clock = Instant::now();
    for v in &spec.validations {
        let remaining = deadline.saturating_duration_since(Instant::now());
        report
            .validations
            .push(validate(v, sandbox, v.timeout.min(remaining)));
    }
    report.phases.push(Phase {
        name: "validate".into(),
        seconds: validate_clock.elapsed().as_secs_f64(),
        note: None,
    });

    // RTO.
    let plan = t.plan_secs;
    let full = match &spec.scope {
        Scope::Full => restore_secs,
        _ if r.bytes_written > 0 && restore_secs > plan => {
            plan + (restore_secs - plan) * snapshot_bytes as f64 / r.bytes_written as f64
        }
        _ => restore_secs,
    };
    let method = match &spec.scope {
        Scope::Full => "measured: the wall time of restoring the whole snapshot".to_string(),
        _ => format!(
            "extrapolated: planning ({}) plus the data phase scaled by bytes ({} of {} restored, at {}/s)",
            render::human_duration(plan),
            bytes(r.bytes_written),
            bytes(snapshot_bytes),
            bytes(report.throughput_bytes_per_sec as u64)
        ),
    };
    let status = match spec.rto_target {
        None => "UNKNOWN",
        Some(target) => {
            let ratio = full / target.as_secs_f64().max(f64::MIN_POSITIVE);
            if ratio > 1.0 {
                "BREACHED"
            } else if ratio >= 0.8 {
                "AT RISK"
            } else {
                "OK"
            }
        }
    };
    report.rto = Some(RtoEstimate {
        measured_restore_seconds: restore_secs,
        restored_bytes: r.bytes_written,
        snapshot_bytes,
        full_restore_seconds: full,
        method,
        target_seconds: spec.rto_target.map(|d| d.as_secs_f64()),
        status: status.into(),
    });

    if Instant::now() > deadline {
        return Err((
            DrillOutcome::TimedOut,
            "the drill ran past its time limit during validation".into(),
        ));
    }
    let failed_validations: Vec<&str> = report
        .validations
        .iter()
        .filter(|v| !v.passed)
        .map(|v| v.command.as_str())
        .collect();
    if !report.problems.is_empty() || !failed_validations.is_empty() {
        let mut why = Vec::new();
        if !report.problems.is_empty() {
            why.push(format!(
                "{} entr{} failed to restore or verify",
                report.problems.len(),
                if report.problems.len() == 1 {
                    "y"
                } else {
                    "ies"
                }
            ));
        }
        if !failed_validations.is_empty() {
            why.push(format!(
                "validation failed: {}",
                failed_validations.join("; ")
            ));
        }
        return Err((DrillOutcome::Failed, why.join("; ")));
    }
    Ok(())
}

/// The snapshot a drill restores: only among the verified, complete
/// snapshots of the host it means (its spec's, else the drilling host's
/// own) and of its source, never one dated in the future by the store's
/// clock (it could be a forgery that would make the drill prove nothing).
/// Records the RPO of the newest one.
fn choose_snapshot(
    repo: &Repository,
    spec: &DrillSpec,
    host: &str,
    report: &mut DrillReport,
) -> Result<(Id, Snapshot), Failure> {
    let list = repo
        .snapshots()
        .map_err(|e| refused(format!("cannot list snapshots: {e}")))?;
    for w in list.warnings() {
        log::warn!("{w}");
    }
    let sel = Selector {
        host: Some(spec.host.clone().unwrap_or_else(|| host.to_string())),
        tags: if spec.source_tag.is_empty() {
            Vec::new()
        } else {
            vec![spec.source_tag.clone()]
        },
        ..Selector::default()
    };
    let ours: Vec<&Listed> = list
        .select(&sel)
        .filter(|l| !l.snapshot.incomplete && !l.future)
        .collect();
    if let Some(newest) = ours.last() {
        report.rpo_seconds =
            Some((Utc::now() - newest.snapshot.time).num_milliseconds() as f64 / 1000.0);
    }
    choose(&ours, &spec.snapshot)
        .map(|l| (l.id, l.snapshot.clone()))
        .map_err(|why| {
            refused(format!(
                "{why}; looked among host {}'s snapshots{}",
                sel.host.as_deref().unwrap_or_default(),
                if spec.source_tag.is_empty() {
                    String::new()
                } else {
                    format!(" tagged {}", spec.source_tag)
                }
            ))
        })
}

fn choose<'a>(ours: &[&'a Listed], choice: &SnapshotChoice) -> Result<&'a Listed, String> {
    let found = match choice {
        SnapshotChoice::Latest => ours.last().copied(),
        SnapshotChoice::RandomWithin(window) => {
            let since = Utc::now() - chrono::Duration::from_std(*window).unwrap_or_default();
            let recent: Vec<_> = ours.iter().filter(|l| l.snapshot.time >= since).collect();
            recent.choose(&mut rand::thread_rng()).map(|l| **l)
        }
        SnapshotChoice::Given(prefix) => {
            let matching: Vec<_> = ours
                .iter()
                .filter(|l| l.id.to_hex().starts_with(prefix.as_str()))
                .collect();
            if matching.len() > 1 {
                return Err(format!("snapshot prefix {prefix:?} is ambiguous"));
            }
            matching.first().map(|l| **l)
        }
    };
    found.ok_or_else(|| {
        "no complete snapshot of the source matches (has it been backed up?)".to_string()
    })
}

/// Includes (escaped glob patterns) and the bytes they select.
fn select(files: &[(String, u64)], scope: &Scope, total: u64) -> (Vec<String>, u64) {
    match scope {
        Scope::Full => (Vec::new(), total),
        Scope::Paths(paths) => {
            let bytes = files
                .iter()
                .filter(|(p, _)| {
                    paths.iter().any(|q| {
                        let q = q.trim_end_matches('/');
                        p == q || p.starts_with(&format!("{q}/"))
                    })
                })
                .map(|(_, s)| s)
                .sum();
            (paths.iter().map(|p| escape_glob(p)).collect(), bytes)
        }
        Scope::Sample(percent) => {
            let want = (total as f64 * percent / 100.0).ceil() as u64;
            let mut order: Vec<&(String, u64)> = files.iter().collect();
            order.shuffle(&mut rand::thread_rng());
            let mut picked = Vec::new();
            let mut got = 0u64;
            for (p, s) in order {
                if got >= want && !picked.is_empty() {
                    break;
                }
                picked.push(escape_glob(p));
                got += s;
            }
            if picked.is_empty() {
                // An empty snapshot: restore it all (nothing).
                return (Vec::new(), 0);
            }
            (picked, got)
        }
    }
}

fn escape_glob(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if matches!(c, '\\' | '*' | '?' | '[' | ']' | '{' | '}') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn slash_path(path: &[u8]) -> String {
    let p = String::from_utf8_lossy(path);
    if p.starts_with('/') {
        p.into_owned()
    } else {
        format!("/{p}")
    }
}

/// Compares one restored entry with its node; returns what differs.
fn check_entry(path: &Path, node: &Node) -> Option<String> {
    let m = match path.symlink_metadata() {
        Ok(m) => m,
        Err(e) => return Some(format!("missing after restore: {e}")),
    };
    let ft = m.file_type();
    let kind_ok = match node.kind {
        NodeKind::File => ft.is_file(),
        NodeKind::Dir => ft.is_dir(),
        NodeKind::Symlink => ft.is_symlink(),
        _ => !ft.is_file() && !ft.is_dir() && !ft.is_symlink(),
    };
    if !kind_ok {
        return Some(format!("type differs: expected {:?}", node.kind));
    }
    if node.kind == NodeKind::File && m.len() != node.size {
        return Some(format!(
            "size differs: {} bytes, snapshot has {}",
            m.len(),
            node.size
        ));
    }
    if node.kind == NodeKind::Symlink {
        let target = std::fs::read_link(path).map(|t| t.into_os_string());
        let want = node
            .target
            .as_ref()
            .map(|t| t.0.clone())
            .unwrap_or_default();
        match target {
            Ok(t) if std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str()) == want.as_slice() => {}
            Ok(t) => return Some(format!("symlink target differs: {t:?}")),
            Err(e) => return Some(format!("cannot read symlink: {e}")),
        }
    } else if m.permissions().mode() & 0o7777 != node.mode & 0o7777 {
        return Some(format!(
            "mode differs: {:o}, snapshot has {:o}",
            m.permissions().mode() & 0o7777,
            node.mode & 0o7777
        ));
    }
    let _ = m.mtime();
    None
}

/// Runs one validation command against the sandbox: its output is read
/// while it runs (the last 8 KiB kept), and on its timeout its whole
/// process group is stopped.
fn validate(v: &Validation, sandbox: &Path, timeout: Duration) -> ValidationResult {
    let command = v
        .command
        .replace("{restore_dir}", &sandbox.display().to_string());
    let clock = Instant::now();
    let mut result = ValidationResult {
        command: v.command.clone(),
        exit_code: None,
        passed: false,
        seconds: 0.0,
        output: String::new(),
        error: None,
    };
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", &command]).current_dir(sandbox);
    let finished = match lifeboat_core::child::run(&mut cmd, timeout, 8 * 1024) {
        Ok(f) => f,
        Err(e) => {
            result.error = Some(format!("cannot start /bin/sh: {e}"));
            return result;
        }
    };
    result.seconds = clock.elapsed().as_secs_f64();
    result.output = finished.output;
    match finished.status {
        Some(s) => {
            result.exit_code = s.code();
            result.passed = s.success();
            if !s.success() {
                result.error = Some(format!("exited with {s}"));
            }
        }
        None => {
            result.error = Some(format!(
                "did not finish within {} and was killed",
                render::human_duration(timeout.as_secs_f64())
            ));
        }
    }
    result
}

fn free_space(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str())).ok()?;
    // SAFETY: statvfs writes into the struct we own; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Loads every drill report stored in the repository, oldest first.
pub fn stored_reports(repo: &Repository) -> Result<Vec<DrillReport>, String> {
    let mut out = Vec::new();
    for id in repo
        .list_ids(ObjectKind::Drill)
        .map_err(|e| e.to_string())?
    {
        // Only what a full-key host signed: a drill report is evidence.
        match repo.load_admin::<DrillReport>(ObjectKind::Drill, &id) {
            Ok(r) => out.push(r),
            Err(e) => log::warn!("drill report {}: {e}", id.short()),
        }
    }
    out.sort_by_key(|r| r.started);
    Ok(out)
}
