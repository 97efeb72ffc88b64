//! Lifeboat's agent: the daemon that keeps every source within its RPO.
//!
//! [`run`] is the whole daemon, shaped like mini-redis: a thin `main`
//! (`lifeboat agent` in the CLI) parses the configuration and hands it
//! here with a shutdown future. Inside, one task schedules jobs
//! ([`scheduler`]), jobs drive the core engines on the blocking pool
//! ([`jobs`]), every run lands in the SQLite [`catalog`], and the
//! [`control`] socket and the HTTP endpoint ([`http`], [`metrics`],
//! [`status`]) answer from the catalog. SIGHUP reloads the configuration
//! (an invalid file is refused and the old one kept); SIGTERM stops taking
//! jobs and gives running ones a bounded time to reach a safe point.
//! Only this crate knows cron and the catalog.

pub mod alerts;
pub mod catalog;
pub mod config;
pub mod control;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod notify;
pub mod scheduler;
pub mod status;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use chrono::{Local, Utc};
use tokio::sync::{mpsc, oneshot, watch};

use crate::catalog::{Catalog, JobKind};
use crate::config::Config;
use crate::jobs::Agent;
use crate::scheduler::{Class, JobId, JobSpec, Request, Runner, SystemClock};

/// The catalog's file inside the state directory.
pub fn catalog_path(config: &Config) -> PathBuf {
    config.agent.state_dir.join("catalog.sqlite")
}

/// The jobs a configuration defines.
pub fn job_specs(config: &Config) -> Vec<JobSpec> {
    let mut jobs: Vec<JobSpec> = config
        .sources
        .iter()
        .map(|s| JobSpec {
            id: JobId::backup(&s.name),
            schedule: s.schedule.clone(),
            timeout: s.timeout,
            class: Class::Backup,
        })
        .collect();
    if let Some(r) = &config.retention {
        jobs.push(JobSpec {
            id: JobId {
                kind: JobKind::Retention,
                source: None,
            },
            schedule: r.schedule.clone(),
            timeout: r.timeout,
            class: Class::Maintenance,
        });
    }
    for d in &config.drills {
        jobs.push(JobSpec {
            id: JobId {
                kind: JobKind::Drill,
                source: Some(d.name.clone()),
            },
            schedule: d.schedule.clone(),
            timeout: d.timeout,
            class: Class::Maintenance,
        });
    }
    if let Some(c) = &config.check {
        jobs.push(JobSpec {
            id: JobId {
                kind: JobKind::Check,
                source: None,
            },
            schedule: c.schedule.clone(),
            timeout: c.timeout,
            class: Class::Maintenance,
        });
    }
    jobs
}

/// How `run` should behave beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run every job that is due now once, then exit (for trying it out
    /// and for cron-driven hosts).
    pub once: bool,
}

/// When each job last started, from the catalog.
fn last_started(catalog: &Catalog, jobs: &[JobSpec]) -> HashMap<JobId, chrono::DateTime<Utc>> {
    let mut map = HashMap::new();
    for job in jobs {
        match catalog.last_run(job.id.kind, job.id.source.as_deref()) {
            Ok(Some(run)) => {
                map.insert(job.id.clone(), run.started);
            }
            Ok(None) => {}
            Err(e) => log::warn!("{}: cannot read its last run from the catalog: {e}", job.id),
        }
    }
    map
}

/// Runs the agent until `shutdown` resolves (or, with `once`, until every
/// due job ran). `config_path` is re-read on SIGHUP.
pub async fn run(
    config: Config,
    config_path: &Path,
    opts: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let catalog_file = catalog_path(&config);
    let catalog = Arc::new(Catalog::open(&catalog_file).map_err(|e| e.to_string())?);
    let interrupted = catalog
        .mark_unfinished_interrupted(Utc::now())
        .map_err(|e| e.to_string())?;
    if interrupted > 0 {
        log::warn!(
            "{interrupted} job run(s) were cut short by the agent's last exit; marked interrupted"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let jobs = job_specs(&config);
    let agent = Arc::new(Agent::new(config.clone(), catalog.clone(), stop_rx));
    let runner: Arc<dyn Runner> = Arc::new(agent.clone());

    if opts.once {
        return run_once(&agent, runner, jobs).await;
    }

    let tick = Arc::new(AtomicI64::new(0));
    let (requests_tx, requests_rx) = mpsc::channel::<Request>(16);
    let notifier = Arc::new(notify::Notifier::from_env());

    let listener = control::bind(&config.agent.control_socket)?;
    let control_task = tokio::spawn(control::serve(
        listener,
        config.agent.control_socket.clone(),
        requests_tx.clone(),
        wait_for(stop_tx.subscribe()),
    ));
    let mut http_task = None;
    if let Some(addr) = config.agent.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} for metrics: {e}"))?;
        log::info!(
            "metrics on http://{}/metrics",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        let probe = Arc::new(status::AgentProbe::new(agent.clone(), tick.clone()));
        http_task = Some(tokio::spawn(http::serve(
            listener,
            probe,
            wait_for(stop_tx.subscribe()),
        )));
    }

    let settings = scheduler::Settings {
        max_backups: config.agent.max_backups,
        max_maintenance: config.agent.max_maintenance,
        splay: config.agent.splay,
        last_started: last_started(&catalog, &jobs),
        tick: tick.clone(),
    };
    let grace = config.agent.shutdown_grace;
    let sched = tokio::spawn(scheduler::run(
        jobs,
        settings,
        Arc::new(SystemClock),
        runner,
        requests_rx,
        wait_for(stop_tx.subscribe()),
        grace,
    ));

    // Readiness, status text and the watchdog for systemd.
    notifier.ready(&format!(
        "watching {} source(s); catalog {}",
        config.sources.len(),
        catalog_file.display()
    ));
    let alerts_task = tokio::spawn(alerts::run(agent.clone(), wait_for(stop_tx.subscribe())));
    let status_task = tokio::spawn(systemd_status(
        notifier.clone(),
        requests_tx.clone(),
        wait_for(stop_tx.subscribe()),
    ));

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangup.recv() => {
                notifier.reloading();
                match Config::load(config_path) {
                    Ok(new) => {
                        log::info!("reloaded {}", config_path.display());
                        let _ = requests_tx.send(Request::Replace(job_specs(&new))).await;
                        agent.set_config(new);
                    }
                    Err(errors) => {
                        log::error!("keeping the running configuration: {} is invalid:\n{errors}", config_path.display());
                    }
                }
                notifier.status("running");
                notifier.notify("READY=1");
            }
        }
    }
    log::info!(
        "stopping: no new jobs; running ones get {} s to reach a safe point",
        grace.as_secs()
    );
    notifier.stopping();
    let _ = stop_tx.send(true);
    let left = sched
        .await
        .map_err(|e| format!("scheduler task failed: {e}"))?;
    for job in &left {
        log::warn!("{job} did not stop within the grace period; it resumes cheaply next run");
    }
    let _ = control_task.await;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    status_task.abort();
    alerts_task.abort();
    Ok(())
}

/// Resolves when the watched flag becomes true (or its sender is gone).
async fn wait_for(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// `--once`: runs every job that is due now (catch-up rules of the
/// scheduler), one after another, and reports whether all succeeded.
async fn run_once(
    agent: &Arc<Agent>,
    runner: Arc<dyn Runner>,
    jobs: Vec<JobSpec>,
) -> Result<(), String> {
    let last = last_started(&agent.catalog, &jobs);
    let now = Local::now();
    let mut failed = Vec::new();
    let mut ran = 0;
    for job in jobs {
        let due = match last.get(&job.id) {
            Some(t) => job
                .schedule
                .next_after(t.with_timezone(&Local))
                .is_some_and(|next| next <= now),
            None => job.id.kind == JobKind::Backup,
        };
        if !due {
            log::info!("{}: not due", job.id);
            continue;
        }
        ran += 1;
        let id = job.id.clone();
        let result = runner.run(job, 1, None).await;
        if result.outcome != catalog::Outcome::Success {
            failed.push(format!(
                "{id}: {}",
                result
                    .error
                    .unwrap_or_else(|| result.outcome.as_str().to_string())
            ));
        }
    }
    log::info!("ran {ran} due job(s)");
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Keeps systemd's status line ("next: backup:etc in 14m") and watchdog fed.
async fn systemd_status(
    notifier: Arc<notify::Notifier>,
    scheduler: mpsc::Sender<Request>,
    stop: impl Future<Output = ()>,
) {
    let every = notifier
        .watchdog_interval()
        .unwrap_or(Duration::from_secs(30))
        .min(Duration::from_secs(30));
    tokio::pin!(stop);
    loop {
        let (reply, answer) = oneshot::channel();
        if scheduler.send(Request::NextRuns(reply)).await.is_ok() {
            if let Ok(Ok(list)) = tokio::time::timeout(Duration::from_secs(5), answer).await {
                let now = Utc::now();
                let running: Vec<String> = list
                    .iter()
                    .filter(|(_, _, r)| *r)
                    .map(|(id, _, _)| id.to_string())
                    .collect();
                let next = list
                    .iter()
                    .filter(|(_, _, r)| !*r)
                    .min_by_key(|(_, t, _)| *t);
                let mut text = String::new();
                if !running.is_empty() {
                    text.push_str(&format!("running: {}; ", running.join(", ")));
                }
                if let Some((id, t, _)) = next {
                    let mins = (*t - now).num_minutes().max(0);
                    text.push_str(&format!("next: {id} in {mins}m"));
                }
                notifier.status(&text);
                notifier.watchdog();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut stop => return,
        }
    }
}
