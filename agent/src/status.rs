//! Where every source stands against its objectives, and the metrics and
//! readiness answers built from it.
//!
//! Everything here is computed from the configuration and the catalog at
//! the moment it is asked, so `lifeboat status` gives the same answer
//! whether or not the agent runs, and a scrape of `/metrics` never shows a
//! number older than the catalog.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Local, Utc};
use lifeboat_core::Backend;

use crate::catalog::{assess, rpo_actual, Catalog, DrillRecord, Health, JobKind, SnapshotRecord};
use crate::config::Config;
use crate::http::{Probe, ReadinessCheck};
use crate::jobs::Agent;
use crate::metrics::{MetricType, Registry};

/// One source's standing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceStatus {
    /// The source.
    pub source: String,
    /// Its last complete snapshot.
    pub last_snapshot: Option<SnapshotRecord>,
    /// Seconds since that snapshot.
    pub rpo_seconds: Option<f64>,
    /// The RPO target in seconds.
    pub rpo_target_seconds: f64,
    /// RPO against its target.
    pub rpo: Health,
    /// The latest restore drill.
    pub last_drill: Option<DrillRecord>,
    /// Full-restore time the latest drill measured or extrapolated.
    pub rto_seconds: Option<f64>,
    /// The RTO target in seconds, if set.
    pub rto_target_seconds: Option<f64>,
    /// RTO against its target (`Unknown` without a target or a drill).
    pub rto: Health,
    /// The worse of the two (an unknown RTO without a target does not count).
    pub state: Health,
    /// When the backup runs next by its schedule (without the agent's splay).
    pub next_run: Option<DateTime<Utc>>,
}

fn worse(a: Health, b: Health) -> Health {
    let rank = |h: Health| match h {
        Health::Ok => 0,
        Health::Unknown => 1,
        Health::AtRisk => 2,
        Health::Breached => 3,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// The standing of every configured source at `now`.
pub fn statuses(
    config: &Config,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> Result<Vec<SourceStatus>, String> {
    let mut out = Vec::new();
    for src in &config.sources {
        let last = catalog
            .last_snapshot(&src.name)
            .map_err(|e| e.to_string())?;
        let rpo_actual = rpo_actual(last.as_ref(), now);
        let rpo = assess(rpo_actual, src.rpo);
        let drill = catalog.last_drill(&src.name).map_err(|e| e.to_string())?;
        let rto_seconds = drill
            .as_ref()
            .filter(|d| d.verified)
            .map(|d| d.estimated_full_restore_secs.unwrap_or(d.restore_secs));
        let rto = match src.rto {
            Some(target) => assess(rto_seconds.map(Duration::from_secs_f64), target),
            None => Health::Unknown,
        };
        let state = match src.rto {
            Some(_) => worse(rpo, rto),
            None => rpo,
        };
        out.push(SourceStatus {
            source: src.name.clone(),
            rpo_seconds: rpo_actual.map(|d| d.as_secs_f64()),
            rpo_target_seconds: src.rpo.as_secs_f64(),
            rpo,
            last_snapshot: last,
            last_drill: drill,
            rto_seconds,
            rto_target_seconds: src.rto.map(|d| d.as_secs_f64()),
            rto,
            state,
            next_run: src
                .schedule
                .next_after(now.with_timezone(&Local))
                .map(|t| t.with_timezone(&Utc)),
        });
    }
    Ok(out)
}

/// What `/metrics` and `/readyz` read: the agent plus the scheduler's
/// heartbeat and a store handle for the reachability check.
pub struct AgentProbe {
    /// The agent.
    pub agent: Arc<Agent>,
    /// Unix time of the scheduler's last wake-up.
    pub tick: Arc<AtomicI64>,
    /// When the agent started.
    pub started: DateTime<Utc>,
    /// The store, opened on first use by the readiness check.
    store: Mutex<Option<Arc<dyn Backend>>>,
}

impl AgentProbe {
    /// A probe for `agent`.
    pub fn new(agent: Arc<Agent>, tick: Arc<AtomicI64>) -> AgentProbe {
        AgentProbe {
            agent,
            tick,
            started: Utc::now(),
            store: Mutex::new(None),
        }
    }

    fn store(&self, config: &Config) -> Result<Arc<dyn Backend>, String> {
        let mut slot = self.store.lock().expect("poisoned");
        if let Some(s) = &*slot {
            return Ok(s.clone());
        }
        let r = &config.repository;
        let opts = lifeboat_core::backend::StoreOptions {
            connections: Some(2),
            // A readiness probe must answer quickly: no long retries.
            retry_for: Some(Duration::from_secs(2)),
            ..r.store_options()
        };
        let store = lifeboat_core::backend::open_store(std::path::Path::new(&r.location), &opts)
            .map_err(|e| e.to_string())?
            .backend;
        *slot = Some(store.clone());
        Ok(store)
    }
}

/// Catalog state key holding the repository's size in bytes.
pub const REPOSITORY_BYTES: &str = "repository_bytes";

/// Longest time between scheduler wake-ups before `/readyz` says it hangs.
const TICK_STALE: i64 = 90;

impl Probe for AgentProbe {
    fn metrics(&self) -> String {
        let config = self.agent.config();
        let now = Utc::now();
        render_metrics(
            &config,
            &self.agent,
            self.tick.load(Ordering::Relaxed),
            self.started,
            now,
        )
    }

    fn readiness(&self) -> Vec<ReadinessCheck> {
        let config = self.agent.config();
        let now = Utc::now();
        let mut checks = Vec::new();
        let catalog = self.agent.catalog.is_writable();
        checks.push(ReadinessCheck {
            name: "catalog".into(),
            ok: catalog.is_ok(),
            detail: match catalog {
                Ok(()) => format!("{} is writable", self.agent.catalog.path().display()),
                Err(e) => e.to_string(),
            },
        });
        let repo = self.store(&config).and_then(|s| {
            s.stat("config")
                .map(|_| s.location())
                .map_err(|e| e.to_string())
        });
        checks.push(ReadinessCheck {
            name: "repository".into(),
            ok: repo.is_ok(),
            detail: match repo {
                Ok(location) => format!("{location} answers"),
                Err(e) => e,
            },
        });
        let tick = self.tick.load(Ordering::Relaxed);
        let age = now.timestamp() - tick;
        checks.push(ReadinessCheck {
            name: "scheduler".into(),
            ok: tick > 0 && age <= TICK_STALE,
            detail: if tick == 0 {
                "has not started".into()
            } else {
                format!("last woke {age} s ago")
            },
        });
        match statuses(&config, &self.agent.catalog, now) {
            Ok(list) => {
                let breached: Vec<String> = list
                    .iter()
                    .filter(|s| s.state == Health::Breached)
                    .map(|s| s.source.clone())
                    .collect();
                checks.push(ReadinessCheck {
                    name: "objectives".into(),
                    ok: breached.is_empty(),
                    detail: if breached.is_empty() {
                        format!("{} source(s) within their targets", list.len())
                    } else {
                        format!("breached: {}", breached.join(", "))
                    },
                });
            }
            Err(e) => checks.push(ReadinessCheck {
                name: "objectives".into(),
                ok: false,
                detail: e,
            }),
        }
        checks
    }
}

fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// The Prometheus exposition of the agent's state.
pub fn render_metrics(
    config: &Config,
    agent: &Agent,
    tick: i64,
    started: DateTime<Utc>,
    now: DateTime<Utc>,
) -> String {
    let mut reg = Registry::new();
    reg.family(
        "lifeboat_build_info",
        "Lifeboat's version, as a label.",
        MetricType::Gauge,
    )
    .sample(&[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    reg.family(
        "lifeboat_agent_start_time_seconds",
        "When the agent started (Unix time).",
        MetricType::Gauge,
    )
    .sample(&[], ts(started));
    reg.family(
        "lifeboat_scheduler_last_tick_timestamp_seconds",
        "When the scheduler last woke up (Unix time); it wakes at least every 30 s.",
        MetricType::Gauge,
    )
    .sample(&[], tick as f64);
    let catalog = &agent.catalog;
    let list = statuses(config, catalog, now).unwrap_or_default();
    macro_rules! per_source {
        ($name:expr, $help:expr, $value:expr) => {{
            let fam = reg.family($name, $help, MetricType::Gauge);
            for s in &list {
                if let Some(v) = $value(s) {
                    fam.sample(&[("source", s.source.as_str())], v);
                }
            }
        }};
    }
    per_source!(
        "lifeboat_source_rpo_seconds",
        "Age of the source's last complete snapshot.",
        |s: &SourceStatus| s.rpo_seconds
    );
    per_source!(
        "lifeboat_source_rpo_target_seconds",
        "The source's RPO target.",
        |s: &SourceStatus| Some(s.rpo_target_seconds)
    );
    per_source!(
        "lifeboat_source_rto_seconds",
        "Full-restore time measured or extrapolated by the source's latest verified drill.",
        |s: &SourceStatus| s.rto_seconds
    );
    per_source!(
        "lifeboat_source_rto_target_seconds",
        "The source's RTO target.",
        |s: &SourceStatus| s.rto_target_seconds
    );
    per_source!(
        "lifeboat_source_last_snapshot_timestamp_seconds",
        "Time of the source's last complete snapshot (Unix time).",
        |s: &SourceStatus| s.last_snapshot.as_ref().map(|l| ts(l.time))
    );
    per_source!(
        "lifeboat_source_last_snapshot_bytes_added",
        "Bytes the source's last snapshot added to the repository (after compression).",
        |s: &SourceStatus| s.last_snapshot.as_ref().map(|l| l.bytes_added as f64)
    );
    per_source!(
        "lifeboat_source_last_drill_verified",
        "1 if the source's latest restore drill verified every byte, 0 if it failed.",
        |s: &SourceStatus| s
            .last_drill
            .as_ref()
            .map(|d| if d.verified { 1.0 } else { 0.0 })
    );
    {
        let fam = reg.family(
            "lifeboat_source_objective_state",
            "1 for the state each objective (rpo, rto) of each source is in: ok, at_risk (over 80 % of target), breached, unknown.",
            MetricType::Gauge,
        );
        for s in &list {
            for (objective, health) in [("rpo", s.rpo), ("rto", s.rto)] {
                for (name, h) in [
                    ("ok", Health::Ok),
                    ("at_risk", Health::AtRisk),
                    ("breached", Health::Breached),
                    ("unknown", Health::Unknown),
                ] {
                    fam.sample(
                        &[
                            ("source", s.source.as_str()),
                            ("objective", objective),
                            ("state", name),
                        ],
                        if health == h { 1.0 } else { 0.0 },
                    );
                }
            }
        }
    }
    {
        let fam = reg.family(
            "lifeboat_job_runs_total",
            "Job runs recorded in the catalog, by kind, source and outcome.",
            MetricType::Counter,
        );
        for (kind, source, outcome, n) in catalog.run_counts().unwrap_or_default() {
            fam.sample(
                &[
                    ("kind", kind.as_str()),
                    ("source", source.as_deref().unwrap_or("")),
                    ("outcome", outcome.as_str()),
                ],
                n as f64,
            );
        }
    }
    let mut jobs: Vec<(JobKind, Option<String>)> = config
        .sources
        .iter()
        .map(|s| (JobKind::Backup, Some(s.name.clone())))
        .collect();
    if config.retention.is_some() {
        jobs.push((JobKind::Retention, None));
    }
    if config.check.is_some() {
        jobs.push((JobKind::Check, None));
    }
    {
        let fam = reg.family(
            "lifeboat_job_last_duration_seconds",
            "Duration of each job's last finished run.",
            MetricType::Gauge,
        );
        for (kind, source) in &jobs {
            if let Ok(Some(run)) = catalog.last_run(*kind, source.as_deref()) {
                if let Some(end) = run.ended {
                    fam.sample(
                        &[
                            ("kind", kind.as_str()),
                            ("source", source.as_deref().unwrap_or("")),
                        ],
                        (end - run.started).num_milliseconds() as f64 / 1000.0,
                    );
                }
            }
        }
    }
    {
        let fam = reg.family(
            "lifeboat_job_last_success_timestamp_seconds",
            "When each job last succeeded (Unix time).",
            MetricType::Gauge,
        );
        for (kind, source) in &jobs {
            if let Ok(Some(run)) = catalog.last_success(*kind, source.as_deref()) {
                fam.sample(
                    &[
                        ("kind", kind.as_str()),
                        ("source", source.as_deref().unwrap_or("")),
                    ],
                    ts(run.ended.unwrap_or(run.started)),
                );
            }
        }
    }
    let breaker = agent.breaker.lock().expect("poisoned").clone();
    {
        let fam = reg.family(
            "lifeboat_backend_circuit_breaker_open",
            "1 while the storage circuit breaker is open or half-open (the store keeps failing).",
            MetricType::Gauge,
        );
        if let Some(b) = &breaker {
            let open = b.state() != lifeboat_core::backend::resilience::BreakerState::Closed;
            fam.sample(&[], if open { 1.0 } else { 0.0 });
        }
    }
    reg.family(
        "lifeboat_backend_circuit_breaker_opened_total",
        "Times a storage circuit breaker opened since the agent started.",
        MetricType::Counter,
    )
    .sample(
        &[],
        lifeboat_core::backend::resilience::breaker_opened_total() as f64,
    );
    {
        let fam = reg.family(
            "lifeboat_repository_size_bytes",
            "Bytes stored in the repository, as measured after the last backup or retention job.",
            MetricType::Gauge,
        );
        if let Ok(Some(v)) = catalog.state(REPOSITORY_BYTES) {
            if let Ok(n) = v.parse::<u64>() {
                fam.sample(&[], n as f64);
            }
        }
    }
    reg.family(
        "lifeboat_backend_retries_total",
        "Storage requests retried after a temporary error since the agent started.",
        MetricType::Counter,
    )
    .sample(
        &[],
        lifeboat_core::backend::resilience::retries_total() as f64,
    );
    {
        let fam = reg.family(
            "lifeboat_source_snapshot_bytes",
            "Size of the source's data in its last snapshot, as a restore writes it.",
            MetricType::Gauge,
        );
        for s in &list {
            if let Some(l) = &s.last_snapshot {
                fam.sample(&[("source", s.source.as_str())], l.total_bytes as f64);
            }
        }
    }
    reg.render()
}
