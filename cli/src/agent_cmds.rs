//! The agent's commands: `agent` (the daemon), `status`, `run`,
//! `config check` and `catalog rebuild`. They resolve the configuration
//! file and hand over to `lifeboat-agent`; only the daemon needs an async
//! runtime, which is built here, around the agent, and nowhere else in
//! the CLI.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use chrono::{Local, Utc};
use lifeboat_agent::catalog::{records_from_snapshots, Catalog, Health};
use lifeboat_agent::config::Config;
use lifeboat_agent::jobs::Agent;
use lifeboat_agent::scheduler::{JobId, JobSpec, Runner};
use lifeboat_agent::status::statuses;
use lifeboat_agent::{catalog_path, job_specs, RunOptions};
use serde_json::{json, Value};

use crate::args::{AgentArgs, ConfigArgs, Global};
use crate::output::{self, bytes};

/// Exit code of `status` when a target is breached.
pub const BREACHED: u8 = 4;

fn load(path: &Path) -> Result<Config> {
    Config::load(path).map_err(|errors| anyhow!("{errors}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lifeboat-agent")
        .build()
        .context("cannot start the async runtime")
}

/// `lifeboat agent`.
pub fn agent(g: &Global, a: &AgentArgs) -> Result<u8> {
    output::set_json_logs(a.log_format == "json");
    if !g.quiet && g.verbose == 0 {
        // A daemon's log is its record: job starts and ends are shown.
        log::set_max_level(log::LevelFilter::Info);
    }
    let path = &a.config.config;
    let config = load(path)?;
    let rt = runtime()?;
    let result = rt.block_on(async {
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => log::info!("SIGTERM received"),
                        _ = int.recv() => log::info!("SIGINT received"),
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        lifeboat_agent::run(config, path, RunOptions { once: a.once }, shutdown).await
    });
    // Jobs that did not stop in time run on blocking threads; they are
    // abandoned here (the repository is valid at every instant).
    rt.shutdown_timeout(Duration::from_secs(1));
    result.map_err(|e| anyhow!(e))?;
    output::ok()
}

/// `lifeboat status`.
pub fn status(g: &Global, a: &ConfigArgs) -> Result<u8> {
    let config = load(&a.config)?;
    let file = catalog_path(&config);
    let catalog = match Catalog::open_read_only(&file)? {
        Some(c) => c,
        // No catalog yet: nothing has run; every RPO is unknown.
        None => Catalog::open(&std::env::temp_dir().join(format!(
            "lifeboat-empty-catalog-{}.sqlite",
            std::process::id()
        )))?,
    };
    let now = Utc::now();
    let list = statuses(&config, &catalog, now).map_err(|e| anyhow!(e))?;
    let breached = list.iter().any(|s| s.state == Health::Breached);
    if g.json {
        crate::commands::print_json(&json!({
            "time": now.to_rfc3339(),
            "catalog": file.display().to_string(),
            "sources": list,
            "breached": breached,
        }))?;
    } else {
        println!(
            "{:<16} {:<19} {:>17} {:<19} {:>17} {:<9} {:<16}",
            "source",
            "last snapshot",
            "RPO actual/target",
            "last drill",
            "RTO est./target",
            "state",
            "next run"
        );
        for s in &list {
            let last = s
                .last_snapshot
                .as_ref()
                .map(|l| {
                    l.time
                        .with_timezone(&Local)
                        .format("%Y-%m-%d %H:%M:%S")
                        .to_string()
                })
                .unwrap_or_else(|| "never".into());
            let drill = s
                .last_drill
                .as_ref()
                .map(|d| {
                    d.time
                        .with_timezone(&Local)
                        .format("%Y-%m-%d %H:%M:%S")
                        .to_string()
                })
                .unwrap_or_else(|| "never".into());
            let rpo = format!(
                "{}/{}",
                s.rpo_seconds.map(human).unwrap_or_else(|| "-".into()),
                human(s.rpo_target_seconds)
            );
            let rto = format!(
                "{}/{}",
                s.rto_seconds.map(human).unwrap_or_else(|| "-".into()),
                s.rto_target_seconds
                    .map(human)
                    .unwrap_or_else(|| "-".into())
            );
            let next = s
                .next_run
                .map(|t| format!("in {}", human((t - now).num_seconds().max(0) as f64)))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<16} {:<19} {:>17} {:<19} {:>17} {:<9} {:<16}",
                s.source,
                last,
                rpo,
                drill,
                rto,
                s.state.to_string(),
                next
            );
        }
        if !catalog_exists(&file) {
            println!(
                "(no catalog at {} yet: the agent has not run)",
                file.display()
            );
        }
    }
    Ok(if breached { BREACHED } else { output::OK })
}

fn catalog_exists(path: &Path) -> bool {
    path.exists()
}

/// Seconds as a short human duration: 45s, 14m, 3h05m, 2d04h.
fn human(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=99 => format!("{s}s"),
        100..=5999 => format!("{}m", s / 60),
        6000..=172_799 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `lifeboat config check`.
pub fn config_check(g: &Global, a: &ConfigArgs) -> Result<u8> {
    let config = load(&a.config)?;
    let jobs = job_specs(&config);
    if g.json {
        crate::commands::print_json(&json!({
            "config": a.config.display().to_string(),
            "valid": true,
            "sources": config.sources.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
            "jobs": jobs.iter().map(|j| j.id.to_string()).collect::<Vec<_>>(),
        }))?;
    } else if !g.quiet {
        println!("{} is valid", a.config.display());
        let now = Local::now();
        for j in &jobs {
            let next = j
                .schedule
                .next_after(now)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "never".into());
            println!(
                "  {:<24} {:<20} next {next}",
                j.id.to_string(),
                j.schedule.as_str()
            );
        }
    }
    output::ok()
}

/// `lifeboat catalog rebuild`.
pub fn catalog_rebuild(g: &Global, a: &ConfigArgs) -> Result<u8> {
    let config = load(&a.config)?;
    let catalog = Arc::new(Catalog::open(&catalog_path(&config))?);
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let agent = Agent::new(config.clone(), catalog.clone(), stop_rx);
    let repo = agent.open_repository(&config).map_err(|e| anyhow!(e))?;
    // This host's own snapshots (never another host's that claim its
    // source tags), and none dated in the future.
    let list = repo.snapshots()?;
    for w in list.warnings() {
        eprintln!("warning: {w}");
    }
    let sel = lifeboat_core::Selector::host(&agent.host);
    let snaps: Vec<_> = list
        .select(&sel)
        .filter(|l| !l.future)
        .map(|l| (l.id, l.snapshot.clone()))
        .collect();
    let records = records_from_snapshots(&snaps);
    catalog.replace_snapshots(&records)?;
    if g.json {
        crate::commands::print_json(&json!({"snapshots": records.len(), "of": list.len()}))?;
    } else if !g.quiet {
        println!(
            "catalog {}: {} snapshot(s) of configured sources (of {} in the repository)",
            catalog.path().display(),
            records.len(),
            list.len()
        );
    }
    output::ok()
}

/// `lifeboat run JOB` and `lifeboat backup --source NAME`: through the
/// running agent's control socket, or in this process when none runs.
pub fn run_job(g: &Global, job: &str, a: &ConfigArgs) -> Result<u8> {
    let config = load(&a.config)?;
    let id: JobId = job.parse().map_err(|e: String| anyhow!(e))?;
    let spec = job_specs(&config)
        .into_iter()
        .find(|j| j.id == id)
        .ok_or_else(|| anyhow!("{id} is not a job of {}", a.config.display()))?;
    let show = |event: &Value| {
        if g.quiet {
            return;
        }
        if g.json {
            println!("{event}");
            return;
        }
        match event.get("event").and_then(Value::as_str) {
            Some("started") => eprintln!("{id}: started"),
            Some("progress") => eprintln!(
                "{id}: {} files, {} read, {} stored",
                event["files"],
                bytes(event["bytes_read"].as_u64().unwrap_or(0)),
                bytes(event["bytes_stored"].as_u64().unwrap_or(0))
            ),
            _ => {}
        }
    };
    let finished = match lifeboat_agent::control::request_run(
        &config.agent.control_socket,
        &id.to_string(),
        show,
    )
    .map_err(|e| anyhow!(e))?
    {
        Some(v) => v,
        None => {
            if !g.quiet && !g.json {
                eprintln!("no agent is running; running {id} here");
            }
            run_here(&config, spec, &show)?
        }
    };
    let outcome = finished["outcome"].as_str().unwrap_or("failed");
    if g.json {
        // Already printed as an event.
    } else if outcome == "success" {
        match finished["snapshot"].as_str() {
            Some(s) => println!("{id}: success, snapshot {}", &s[..s.len().min(8)]),
            None => println!("{id}: success"),
        }
    }
    if outcome == "success" {
        output::ok()
    } else {
        bail!(
            "{id}: {outcome}: {}",
            finished["error"].as_str().unwrap_or("no detail")
        )
    }
}

fn run_here(config: &Config, spec: JobSpec, show: &dyn Fn(&Value)) -> Result<Value> {
    let catalog = Arc::new(Catalog::open(&catalog_path(config))?);
    let rt = runtime()?;
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let agent = Arc::new(Agent::new(config.clone(), catalog, stop_rx));
    let result = rt.block_on(async {
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let job = agent.run(spec, 1, Some(events));
        tokio::pin!(job);
        loop {
            tokio::select! {
                result = &mut job => break result,
                Some(event) = rx.recv() => show(&serde_json::to_value(&event).unwrap_or_default()),
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(json!({
        "event": "finished",
        "outcome": result.outcome.as_str(),
        "snapshot": result.snapshot,
        "error": result.error,
    }))
}
