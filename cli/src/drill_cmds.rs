//! `lifeboat drill`: run a restore drill against `--repo` now, and read the
//! reports drills leave in the repository (so they outlive the host that
//! ran them).

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use lifeboat_agent::config::{parse_duration, parse_size};
use restore_drills::{
    render, DrillOutcome, DrillReport, DrillSpec, Scope, SnapshotChoice, Validation,
};

use crate::args::{DrillCommand, DrillRunArgs, Global};
use crate::output;

/// Runs a `drill` subcommand.
pub fn drill(g: &Global, cmd: &DrillCommand) -> Result<u8> {
    match cmd {
        DrillCommand::Run(a) => run(g, a),
        DrillCommand::List => list(g),
        DrillCommand::Show(a) => show(g, a.id.as_deref(), &a.format),
        DrillCommand::Report(a) => report(g, &a.out),
    }
}

fn duration(what: &str, text: &str) -> Result<Duration> {
    parse_duration(text).map_err(|e| anyhow!("{what}: {e}"))
}

fn run(g: &Global, a: &DrillRunArgs) -> Result<u8> {
    let repo = crate::commands::open(g)?;
    let scope = match (&a.sample, a.path.is_empty()) {
        (Some(p), _) if !(0.0..=100.0).contains(p) || *p == 0.0 => {
            bail!("--sample is a percentage above 0 and at most 100")
        }
        (Some(p), _) if *p < 100.0 => Scope::Sample(*p),
        (_, false) => Scope::Paths(a.path.clone()),
        _ => Scope::Full,
    };
    let spec = DrillSpec {
        name: "adhoc".into(),
        source: a.source.clone().unwrap_or_else(|| "any".into()),
        source_tag: a
            .source
            .as_deref()
            .map(lifeboat_agent::catalog::source_tag)
            .unwrap_or_default(),
        host: a.host.clone(),
        snapshot: match (&a.snapshot, &a.random_within) {
            (Some(id), _) => SnapshotChoice::Given(id.clone()),
            (None, Some(w)) => SnapshotChoice::RandomWithin(duration("--random-within", w)?),
            (None, None) => SnapshotChoice::Latest,
        },
        scope,
        scratch_dir: a.scratch.clone().unwrap_or_else(std::env::temp_dir),
        max_disk_bytes: a
            .max_disk
            .as_deref()
            .map(parse_size)
            .transpose()
            .map_err(|e| anyhow!("--max-disk: {e}"))?,
        time_limit: duration("--time-limit", &a.time_limit)?,
        validations: a
            .validate
            .iter()
            .map(|c| {
                Ok(Validation {
                    command: c.clone(),
                    timeout: duration("--validate-timeout", &a.validate_timeout)?,
                })
            })
            .collect::<Result<_>>()?,
        keep: a.keep,
        rto_target: a.rto.as_deref().map(|r| duration("--rto", r)).transpose()?,
        rpo_target: None,
    };
    let host = lifeboat_core::hostname();
    let report = restore_drills::run(&repo, &spec, &host, &AtomicBool::new(false));
    if g.json || a.format == "json" {
        crate::commands::print_json(&serde_json::to_value(&report)?)?;
    } else if !g.quiet {
        print!("{}", render::markdown(&report));
    }
    match report.outcome {
        DrillOutcome::Passed => output::ok(),
        other => bail!(
            "drill {}: {}",
            match other {
                DrillOutcome::Failed => "failed",
                DrillOutcome::TimedOut => "timed out",
                DrillOutcome::Refused => "refused to start",
                DrillOutcome::Passed => "passed",
            },
            report.summary.unwrap_or_default()
        ),
    }
}

fn stored(g: &Global) -> Result<Vec<DrillReport>> {
    let repo = crate::commands::open(g)?;
    restore_drills::stored_reports(&repo).map_err(|e| anyhow!(e))
}

fn list(g: &Global) -> Result<u8> {
    let reports = stored(g)?;
    if g.json {
        let rows: Vec<_> = reports
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "name": r.name, "source": r.source, "started": r.started,
                    "outcome": r.outcome, "full_restore_seconds": r.rto.as_ref().map(|x| x.full_restore_seconds),
                })
            })
            .collect();
        crate::commands::print_json(&serde_json::Value::Array(rows))?;
        return output::ok();
    }
    println!(
        "{:<12} {:<19} {:<12} {:<14} {:<10} {:>12}",
        "id", "started", "drill", "source", "outcome", "full restore"
    );
    for r in &reports {
        println!(
            "{:<12} {:<19} {:<12} {:<14} {:<10} {:>12}",
            &r.id[..12.min(r.id.len())],
            r.started
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S"),
            r.name,
            r.source,
            format!("{:?}", r.outcome).to_lowercase(),
            r.rto
                .as_ref()
                .map(|x| render::human_duration(x.full_restore_seconds))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!("{} drill(s)", reports.len());
    output::ok()
}

/// The report with its source's history filled in.
fn with_history(mut r: DrillReport, all: &[DrillReport]) -> DrillReport {
    r.history = all
        .iter()
        .rev()
        .filter(|o| o.source == r.source && o.id != r.id)
        .take(10)
        .map(|o| restore_drills::HistoryEntry {
            time: o.started,
            outcome: format!("{:?}", o.outcome).to_lowercase(),
            full_restore_seconds: o.rto.as_ref().map(|x| x.full_restore_seconds),
        })
        .collect();
    r
}

fn show(g: &Global, id: Option<&str>, format: &str) -> Result<u8> {
    let all = stored(g)?;
    let found = match id {
        None => all.last().cloned(),
        Some(prefix) => {
            let matching: Vec<_> = all.iter().filter(|r| r.id.starts_with(prefix)).collect();
            if matching.len() > 1 {
                bail!("drill ID prefix {prefix:?} is ambiguous; give more characters");
            }
            matching.first().map(|r| (*r).clone())
        }
    }
    .ok_or_else(|| {
        anyhow!(
            "no drill report found (run `lifeboat drill run`; `lifeboat drill list` shows them)"
        )
    })?;
    let r = with_history(found, &all);
    match (g.json, format) {
        (true, _) | (_, "json") => crate::commands::print_json(&serde_json::to_value(&r)?)?,
        (_, "html") => print!("{}", render::html(&r)),
        _ => print!("{}", render::markdown(&r)),
    }
    output::ok()
}

fn report(g: &Global, out: &std::path::Path) -> Result<u8> {
    let all = stored(g)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // The latest drill per source, with its history.
    let mut latest: Vec<DrillReport> = Vec::new();
    for r in all.iter().rev() {
        if !latest.iter().any(|l| l.source == r.source) {
            latest.push(with_history(r.clone(), &all));
        }
    }
    latest.sort_by(|a, b| a.source.cmp(&b.source));
    let mut pages = Vec::new();
    for r in latest {
        let name = format!("{}.html", sanitize(&r.source));
        std::fs::write(out.join(&name), render::html(&r))
            .with_context(|| format!("writing {}", out.join(&name).display()))?;
        pages.push((r, name));
    }
    std::fs::write(out.join("index.html"), render::html_index(&pages))
        .with_context(|| format!("writing {}", out.join("index.html").display()))?;
    if !g.quiet {
        println!(
            "wrote {} report(s) and index.html to {}",
            pages.len(),
            out.display()
        );
    }
    output::ok()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
