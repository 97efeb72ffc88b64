//! The agent's job runner: backups, retention and checks, driven through
//! the core engines and recorded in the catalog.
//!
//! The engines are synchronous CPU work, so each job runs on tokio's
//! blocking pool (STYLE.md, item 6) while an async loop beside it streams
//! progress, watches the job's deadline and the agent's shutdown, and asks
//! the job to stop at its next safe point when either comes (the core's
//! `Progress::cancel`: no snapshot is committed, and the next backup reuses
//! what was uploaded). A backup of a command's output (`pg_dump`) fails,
//! and commits nothing, when the command exits non-zero.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::Utc;
use lifeboat_core::backend::open_store;
use lifeboat_core::backend::resilience::BreakerHandle;
use lifeboat_core::backup::{backup, backup_stdin, BackupOptions, Progress, StdinSource};
use lifeboat_core::check::{check, CheckOptions};
use lifeboat_core::forget::{forget, ForgetOptions, ForgetWhat};
use lifeboat_core::prune::{prune, PruneOptions};
use lifeboat_core::retention::GroupBy;
use lifeboat_core::{Error, Repository};
use tokio::sync::{mpsc, watch};

use crate::catalog::{source_tag, Catalog, JobKind, Outcome, SnapshotRecord, SOURCE_TAG_PREFIX};
use crate::config::{Config, SourceConfig, SourceInput};
use crate::scheduler::{BoxFuture, Event, JobSpec, RunResult, Runner};

/// What jobs, the control socket and the metrics endpoint share.
pub struct Agent {
    config: RwLock<Arc<Config>>,
    /// The catalog.
    pub catalog: Arc<Catalog>,
    /// The circuit breaker of the store the last job opened, for metrics.
    pub breaker: Mutex<Option<BreakerHandle>>,
    /// Becomes true when the agent is stopping.
    shutdown: watch::Receiver<bool>,
    /// This host's name, recorded in snapshots and used by retention.
    pub host: String,
}

impl Agent {
    /// An agent for `config`, recording into `catalog`.
    pub fn new(config: Config, catalog: Arc<Catalog>, shutdown: watch::Receiver<bool>) -> Agent {
        Agent {
            config: RwLock::new(Arc::new(config)),
            catalog,
            breaker: Mutex::new(None),
            shutdown,
            host: lifeboat_core::hostname(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock poisoned").clone()
    }

    /// Replaces the configuration (after a successful reload).
    pub fn set_config(&self, config: Config) {
        *self.config.write().expect("config lock poisoned") = Arc::new(config);
    }

    /// Opens the repository the configuration names.
    pub fn open_repository(&self, config: &Config) -> Result<Repository, String> {
        let r = &config.repository;
        let opts = r.store_options();
        let store = open_store(std::path::Path::new(&r.location), &opts)
            .map_err(|e| format!("cannot open the repository's store: {e}"))?;
        *self.breaker.lock().expect("poisoned") = Some(store.breaker.clone());
        if let Some(path) = &r.writer_key {
            let bytes = std::fs::read(path).map_err(|e| {
                format!(
                    "cannot read the writer credential {} (repository.writer_key): {e}",
                    path.display()
                )
            })?;
            let writer = lifeboat_core::WriterKey::from_file(&bytes, &path.display().to_string())
                .map_err(|e| e.to_string())?;
            return Repository::open_writer(store.backend, writer).map_err(|e| e.to_string());
        }
        let passphrase = config
            .passphrase
            .as_ref()
            .ok_or("no [passphrase] in the configuration")?
            .read()?;
        Repository::open(store.backend, &passphrase).map_err(|e| e.to_string())
    }

    fn cache_dir(&self, config: &Config) -> PathBuf {
        config
            .repository
            .cache_dir
            .clone()
            .unwrap_or_else(|| config.agent.state_dir.join("cache"))
    }
}

/// What one job produced.
struct Done {
    snapshot: Option<SnapshotRecord>,
    bytes_added: u64,
}

impl Runner for Arc<Agent> {
    fn run(
        &self,
        job: JobSpec,
        attempt: u32,
        events: Option<mpsc::UnboundedSender<Event>>,
    ) -> BoxFuture<RunResult> {
        let agent = self.clone();
        Box::pin(async move { agent.run_job(job, attempt, events).await })
    }
}

/// How often a running job reports progress to a watching client.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long a job asked to stop gets to reach its safe point before the
/// runner reports it and moves on (the job's thread finishes on its own).
const STOP_WAIT: Duration = Duration::from_secs(20);

impl Agent {
    async fn run_job(
        self: Arc<Agent>,
        job: JobSpec,
        attempt: u32,
        events: Option<mpsc::UnboundedSender<Event>>,
    ) -> RunResult {
        let config = self.config();
        let kind = job.id.kind;
        let source = job.id.source.clone();
        let catalog = self.catalog.clone();
        let run_id = match catalog.start_run(kind, source.as_deref(), Utc::now(), attempt) {
            Ok(id) => Some(id),
            Err(e) => {
                log::error!("{}: cannot record the run in the catalog: {e}", job.id);
                None
            }
        };
        let progress = Arc::new(Progress::default());
        let work = {
            let agent = self.clone();
            let progress = progress.clone();
            let config = config.clone();
            tokio::task::spawn_blocking(move || {
                agent.execute(&config, kind, source.as_deref(), &progress)
            })
        };
        tokio::pin!(work);
        let deadline = tokio::time::Instant::now() + job.timeout;
        let mut shutdown = self.shutdown.clone();
        let mut stop_reason: Option<Outcome> = None;
        let mut stopped_at = None;
        let joined = loop {
            tokio::select! {
                joined = &mut work => break Some(joined),
                _ = tokio::time::sleep(PROGRESS_EVERY) => {
                    if let Some(events) = &events {
                        let _ = events.send(Event::Progress {
                            files: progress.files.load(Ordering::Relaxed),
                            bytes_read: progress.bytes_read.load(Ordering::Relaxed),
                            bytes_stored: progress.bytes_stored.load(Ordering::Relaxed),
                        });
                    }
                    if let Some(at) = stopped_at {
                        if tokio::time::Instant::now() >= at + STOP_WAIT {
                            break None;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline), if stop_reason.is_none() => {
                    log::warn!("{}: timeout of {} s reached; stopping it", job.id, job.timeout.as_secs());
                    stop_reason = Some(Outcome::TimedOut);
                    stopped_at = Some(tokio::time::Instant::now());
                    progress.cancel.store(true, Ordering::Relaxed);
                }
                changed = shutdown.changed(), if stop_reason.is_none() => {
                    if changed.is_err() || *shutdown.borrow() {
                        log::info!("{}: the agent is stopping; asking the job to stop", job.id);
                        stop_reason = Some(Outcome::Interrupted);
                        stopped_at = Some(tokio::time::Instant::now());
                        progress.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
        };
        let result: Result<Done, String> = match joined {
            Some(Ok(r)) => r,
            Some(Err(panic)) => Err(format!("the job panicked: {panic}")),
            None => Err("did not reach a safe point in time; its thread was left to finish".into()),
        };
        let (outcome, error, snapshot, bytes) = match (result, stop_reason) {
            (Ok(done), _) => (Outcome::Success, None, done.snapshot, done.bytes_added),
            (Err(e), Some(reason)) => (reason, Some(e), None, 0),
            (Err(e), None) => (Outcome::Failed, Some(e), None, 0),
        };
        if let Some(snap) = &snapshot {
            if let Err(e) = catalog.record_snapshot(snap) {
                log::error!("{}: cannot record snapshot in the catalog: {e}", job.id);
            }
        }
        if let Some(id) = run_id {
            if let Err(e) = catalog.finish_run(
                id,
                Utc::now(),
                outcome,
                bytes,
                snapshot.as_ref().map(|s| s.id.as_str()),
                error.as_deref(),
            ) {
                log::error!("{}: cannot record the result in the catalog: {e}", job.id);
            }
        }
        RunResult {
            outcome,
            snapshot: snapshot.map(|s| s.id),
            error,
        }
    }

    /// Runs one job to completion on the current (blocking) thread.
    fn execute(
        &self,
        config: &Config,
        kind: JobKind,
        source: Option<&str>,
        progress: &Progress,
    ) -> Result<Done, String> {
        match kind {
            JobKind::Backup => {
                let name = source.ok_or("a backup job needs a source")?;
                let src = config
                    .source(name)
                    .ok_or_else(|| format!("source {name:?} is no longer in the configuration"))?;
                self.backup_source(config, src, progress)
            }
            JobKind::Retention => self.retention(config),
            JobKind::Check => self.check(config),
            JobKind::Drill => {
                let name = source.ok_or("a drill job needs a drill name")?;
                self.drill(config, name, progress)
            }
        }
    }

    fn backup_source(
        &self,
        config: &Config,
        src: &SourceConfig,
        progress: &Progress,
    ) -> Result<Done, String> {
        if let Some(hook) = &src.before {
            run_hook("before", hook, src.timeout)?;
        }
        let result = self.backup_inner(config, src, progress);
        if let Some(hook) = &src.after {
            // The after hook runs whatever happened (it typically restarts
            // a service the before hook stopped).
            if let Err(e) = run_hook("after", hook, src.timeout) {
                return Err(match result {
                    Ok(_) => e,
                    Err(first) => format!("{first}; and {e}"),
                });
            }
        }
        result
    }

    fn backup_inner(
        &self,
        config: &Config,
        src: &SourceConfig,
        progress: &Progress,
    ) -> Result<Done, String> {
        let repo = self.open_repository(config)?;
        let mut tags = src.tags.clone();
        tags.push(source_tag(&src.name));
        // A writer credential writes as its own host, whatever this
        // machine is called.
        let host = match repo.identity() {
            Some(lifeboat_core::Signer::Host(h)) => h.clone(),
            _ => self.host.clone(),
        };
        let mut opts = BackupOptions {
            host: Some(host),
            tags,
            cache_dir: Some(self.cache_dir(config)),
            ..BackupOptions::default()
        };
        let report = match &src.input {
            SourceInput::Paths {
                paths,
                exclude,
                one_file_system,
            } => {
                opts.paths = paths.clone();
                opts.excludes = exclude.clone();
                opts.one_file_system = *one_file_system;
                backup(&repo, &opts, progress).map_err(|e| e.to_string())?
            }
            SourceInput::Command {
                argv,
                stdin_filename,
            } => {
                // A process group of its own: stopping the backup stops
                // everything the command started.
                let child = Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .process_group(0)
                    .spawn()
                    .map_err(|e| format!("cannot start {:?}: {e}", argv[0]))?;
                let reader = CommandOutput::new(child, argv[0].clone());
                let stderr_tail = reader.stderr_tail.clone();
                backup_stdin(
                    &repo,
                    &opts,
                    progress,
                    StdinSource {
                        reader: Box::new(reader),
                        name: stdin_filename.clone(),
                    },
                )
                .map_err(|e| match e {
                    Error::Io { source, .. } => {
                        let tail = stderr_tail.lock().expect("poisoned").clone();
                        if tail.is_empty() {
                            source.to_string()
                        } else {
                            format!("{source}; its stderr ended with: {}", tail.trim())
                        }
                    }
                    other => other.to_string(),
                })?
            }
        };
        self.measure_repository(&repo);
        let s = &report.snapshot;
        if s.incomplete {
            log::warn!(
                "{}: snapshot {} is incomplete: {}",
                src.name,
                report.snapshot_id.short(),
                report.warnings.join("; ")
            );
        }
        Ok(Done {
            bytes_added: s.summary.bytes_added_stored,
            snapshot: Some(SnapshotRecord {
                id: report.snapshot_id.to_hex(),
                source: src.name.clone(),
                time: s.time,
                bytes_added: s.summary.bytes_added_stored,
                total_bytes: s.summary.total_bytes,
                files: s.summary.files_new + s.summary.files_changed + s.summary.files_unmodified,
                incomplete: s.incomplete,
            }),
        })
    }

    /// Forgets this host's snapshots of configured sources by the policy,
    /// and those of the hosts `[retention] hosts` names, then prunes if
    /// asked. Other hosts' snapshots are theirs to manage.
    fn retention(&self, config: &Config) -> Result<Done, String> {
        let retention = config
            .retention
            .as_ref()
            .ok_or("no [retention] section in the configuration")?;
        let repo = self.open_repository(config)?;
        let ours = |s: &lifeboat_core::Snapshot| {
            if s.host == self.host {
                config
                    .sources
                    .iter()
                    .any(|src| s.tags.contains(&source_tag(&src.name)))
            } else {
                // Another host's (say, a write-only one's) snapshots, as
                // its agent tagged them.
                retention.hosts.contains(&s.host)
                    && s.tags.iter().any(|t| t.starts_with(SOURCE_TAG_PREFIX))
            }
        };
        let report = forget(
            &repo,
            &ForgetOptions {
                what: ForgetWhat::Policy {
                    policy: retention.policy.clone(),
                    group_by: GroupBy::host_and_paths(),
                    filter: &ours,
                },
                dry_run: false,
            },
        )
        .map_err(|e| e.to_string())?;
        for w in report
            .untrusted
            .iter()
            .map(ToString::to_string)
            .chain(report.left_alone.iter().map(|l| format!("left alone: {l}")))
            .chain(report.warnings.iter().cloned())
        {
            log::warn!("retention: {w}");
        }
        let removed = report.removed.len();
        log::info!("retention: removed {removed} snapshot(s)");
        if retention.prune {
            let report = prune(&repo, &PruneOptions::default()).map_err(|e| e.to_string())?;
            log::info!(
                "retention: prune condemned {} pack(s), deleted {}",
                report.packs_condemned,
                report.packs_deleted
            );
        }
        self.measure_repository(&repo);
        Ok(Done {
            snapshot: None,
            bytes_added: 0,
        })
    }

    /// Runs a configured drill, records it in the catalog and writes its
    /// JSON and HTML reports under `<state_dir>/drills/`.
    fn drill(&self, config: &Config, name: &str, progress: &Progress) -> Result<Done, String> {
        let d = config
            .drills
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| format!("drill {name:?} is no longer in the configuration"))?;
        let source = config.source(&d.source);
        let repo = self.open_repository(config)?;
        let scope = if !d.paths.is_empty() {
            restore_drills::Scope::Paths(d.paths.clone())
        } else {
            match d.sample_percent {
                Some(p) if p < 100 => restore_drills::Scope::Sample(f64::from(p)),
                _ => restore_drills::Scope::Full,
            }
        };
        let spec = restore_drills::DrillSpec {
            name: d.name.clone(),
            source: d.source.clone(),
            source_tag: source_tag(&d.source),
            host: d.host.clone(),
            snapshot: match d.random_within {
                Some(w) => restore_drills::SnapshotChoice::RandomWithin(w),
                None => restore_drills::SnapshotChoice::Latest,
            },
            scope,
            scratch_dir: d
                .scratch_dir
                .clone()
                .unwrap_or_else(|| config.agent.state_dir.join("drills").join("sandbox")),
            max_disk_bytes: d.max_disk,
            time_limit: d.timeout,
            validations: d
                .validate
                .iter()
                .map(|c| restore_drills::Validation {
                    command: c.clone(),
                    timeout: d.validate_timeout,
                })
                .collect(),
            keep: false,
            rto_target: source.and_then(|s| s.rto).or(d.rto),
            rpo_target: source.map(|s| s.rpo),
        };
        let report = restore_drills::run(&repo, &spec, &self.host, &progress.cancel);
        let dir = config.agent.state_dir.join("drills");
        let json_path = dir.join(format!("{}.json", report.id));
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| {
                std::fs::write(
                    &json_path,
                    serde_json::to_vec_pretty(&report).unwrap_or_default(),
                )
            })
            .and_then(|()| {
                std::fs::write(
                    dir.join(format!("{}.html", report.id)),
                    restore_drills::render::html(&report),
                )
            });
        if let Err(e) = written {
            log::warn!(
                "drill {name}: cannot write its report under {}: {e}",
                dir.display()
            );
        }
        let rto = report.rto.as_ref();
        let record = crate::catalog::DrillRecord {
            id: 0,
            source: d.source.clone(),
            time: report.started,
            snapshot_id: report.snapshot_id.clone().unwrap_or_default(),
            restore_secs: rto.map(|r| r.measured_restore_seconds).unwrap_or(0.0),
            restored_bytes: report.bytes_restored,
            verified: report.outcome == restore_drills::DrillOutcome::Passed,
            estimated_full_restore_secs: rto.map(|r| r.full_restore_seconds),
            report_path: Some(json_path.display().to_string()),
            error: report.summary.clone(),
        };
        if let Err(e) = self.catalog.record_drill(&record) {
            log::error!("drill {name}: cannot record it in the catalog: {e}");
        }
        match report.outcome {
            restore_drills::DrillOutcome::Passed => {
                log::info!(
                    "drill {name}: passed; full restore {} s ({})",
                    rto.map(|r| r.full_restore_seconds.round()).unwrap_or(0.0),
                    rto.map(|r| r.method.as_str()).unwrap_or("")
                );
                Ok(Done {
                    snapshot: None,
                    bytes_added: 0,
                })
            }
            other => Err(format!(
                "drill {name} {:?}: {}",
                other,
                report.summary.unwrap_or_default()
            )),
        }
    }

    /// Records the repository's stored size for the metrics (one listing).
    fn measure_repository(&self, repo: &Repository) {
        match repo.backend().list("") {
            Ok(objects) => {
                let bytes: u64 = objects.iter().map(|o| o.size).sum();
                if let Err(e) = self
                    .catalog
                    .set_state(crate::status::REPOSITORY_BYTES, &bytes.to_string())
                {
                    log::warn!("cannot record the repository size: {e}");
                }
            }
            Err(e) => log::warn!("cannot measure the repository: {e}"),
        }
    }

    fn check(&self, config: &Config) -> Result<Done, String> {
        let settings = config
            .check
            .as_ref()
            .ok_or("no [check] section in the configuration")?;
        let repo = self.open_repository(config)?;
        let subset = settings.read_data_subset;
        let report = check(
            &repo,
            &CheckOptions {
                read_data: subset > 0,
                subset_percent: (subset > 0 && subset < 100).then_some(f64::from(subset)),
            },
        )
        .map_err(|e| e.to_string())?;
        if report.errors.is_empty() {
            Ok(Done {
                snapshot: None,
                bytes_added: 0,
            })
        } else {
            Err(format!(
                "check found {} problem(s): {}",
                report.errors.len(),
                report.errors.join("; ")
            ))
        }
    }
}

/// Runs a hook with `/bin/sh -c`, failing on a non-zero exit or after
/// `timeout`. Its output is read while it runs (the last 2 KiB kept for
/// the message), and on the timeout its whole process group is stopped.
fn run_hook(which: &str, command: &str, timeout: Duration) -> Result<(), String> {
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", command]);
    let done = lifeboat_core::child::run(&mut cmd, timeout, 2000)
        .map_err(|e| format!("{which} hook: cannot start /bin/sh: {e}"))?;
    let said = if done.output.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", done.output.trim())
    };
    match done.status {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!("{which} hook `{command}` failed ({status}){said}")),
        None => Err(format!(
            "{which} hook `{command}` did not finish within {} s and was stopped, with everything it started{said}",
            timeout.as_secs()
        )),
    }
}

/// A command's stdout as a reader that turns a non-zero exit into a read
/// error at the end, so the backup of a failed dump is never committed.
struct CommandOutput {
    child: Child,
    stdout: std::process::ChildStdout,
    name: String,
    stderr_tail: Arc<Mutex<String>>,
    finished: bool,
}

impl CommandOutput {
    fn new(mut child: Child, name: String) -> CommandOutput {
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let tail = stderr_tail.clone();
            // Drain stderr so the command never blocks on a full pipe;
            // keep its last lines for the error message.
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut t = tail.lock().expect("poisoned");
                    t.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if t.len() > 2000 {
                        let cut = t.len() - 2000;
                        let cut = (cut..t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(0);
                        t.drain(..cut);
                    }
                }
            });
        }
        CommandOutput {
            child,
            stdout,
            name,
            stderr_tail,
            finished: false,
        }
    }
}

impl Read for CommandOutput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.finished {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        let status = self.child.wait()?;
        self.finished = true;
        if status.success() {
            Ok(0)
        } else {
            Err(std::io::Error::other(format!(
                "{} exited with {status}; the backup was not committed",
                self.name
            )))
        }
    }
}

impl Drop for CommandOutput {
    fn drop(&mut self) {
        if !self.finished {
            // The backup stopped early (error or cancel): stop the command
            // and whatever it started.
            lifeboat_core::child::stop_group(&mut self.child);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_writing_a_mebibyte_to_stderr_completes() {
        let started = std::time::Instant::now();
        run_hook(
            "before",
            "head -c 1048576 /dev/zero >&2; head -c 1048576 /dev/zero",
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
        let err = run_hook(
            "after",
            "echo it broke >&2; exit 3",
            Duration::from_secs(30),
        )
        .unwrap_err();
        assert!(
            err.contains("it broke") && err.contains("exit status: 3"),
            "{err}"
        );
    }

    #[test]
    fn a_hook_whose_child_ignores_sigterm_is_gone_after_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let hook = format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; while :; do sleep 1; done' & wait",
            pid_file.display()
        );
        let err = run_hook("before", &hook, Duration::from_millis(500)).unwrap_err();
        assert!(err.contains("did not finish within"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        // Dead: gone, or a zombie its new parent has not reaped yet.
        let dead = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).map_or(true, |s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            })
        });
        assert!(dead, "the hook's child {} still runs", pid.trim());
    }
}
