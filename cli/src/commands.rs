//! Each command: resolve settings, call the core, print the result.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use lifeboat_core::backend::{open_store, StoreOptions};
use lifeboat_core::backup::{BackupOptions, Progress, StdinSource};
use lifeboat_core::check::CheckOptions;
use lifeboat_core::forget::{ForgetOptions, ForgetWhat};
use lifeboat_core::prune::PruneOptions;
use lifeboat_core::restore::RestoreOptions;
use lifeboat_core::retention::{self, GroupBy, KeepPolicy};
use lifeboat_core::{Backend, Id, InitOptions, Node, NodeKind, Repository, Snapshot};
use serde_json::json;

use crate::args::*;
use crate::output::{self, bytes, ProgressLine};

/// Runs the parsed command line; returns the exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let g = &cli.global;
    if g.writer_key.is_some() {
        refuse_write_only(&cli.command)?;
    }
    match &cli.command {
        Command::Init(a) => init(g, a),
        Command::Backup(a) => backup(g, a),
        Command::Snapshots(a) => snapshots(g, a),
        Command::Ls(a) => ls(g, a),
        Command::Diff(a) => diff(g, a),
        Command::Restore(a) => restore(g, a),
        Command::Dump(a) => dump(g, a),
        Command::Check(a) => check(g, a),
        Command::Forget(a) => forget(g, a),
        Command::Prune(a) => prune(g, a),
        Command::Key(k) => key(g, k),
        Command::Upgrade(a) => upgrade(g, a),
        Command::Agent(a) => crate::agent_cmds::agent(g, a),
        Command::Status(a) => crate::agent_cmds::status(g, a),
        Command::Run(a) => crate::agent_cmds::run_job(g, &a.job, &a.config),
        Command::Config(ConfigCommand::Check(a)) => crate::agent_cmds::config_check(g, a),
        Command::Catalog(CatalogCommand::Rebuild(a)) => crate::agent_cmds::catalog_rebuild(g, a),
        Command::Drill(d) => crate::drill_cmds::drill(g, d),
        Command::GenerateAssets { out } => generate_assets(out),
    }
}

/// With a writer credential, only what adds snapshots can run: everything
/// else reads or deletes what the credential cannot. Refused before the
/// repository is touched, naming the command.
fn refuse_write_only(command: &Command) -> Result<()> {
    let name = match command {
        // The agent and its commands read repository.writer_key from
        // their configuration and refuse jobs that need more there.
        Command::Backup(_)
        | Command::Config(_)
        | Command::Status(_)
        | Command::Agent(_)
        | Command::Run(_)
        | Command::GenerateAssets { .. } => return Ok(()),
        Command::Init(_) => "init",
        Command::Snapshots(_) => "snapshots",
        Command::Ls(_) => "ls",
        Command::Diff(_) => "diff",
        Command::Restore(_) => "restore",
        Command::Dump(_) => "dump",
        Command::Check(_) => "check",
        Command::Forget(_) => "forget",
        Command::Prune(_) => "prune",
        Command::Key(_) => "key",
        Command::Upgrade(_) => "upgrade",
        Command::Catalog(_) => "catalog rebuild",
        Command::Drill(_) => "drill",
    };
    Err(lifeboat_core::Error::NeedsFullKey {
        operation: format!("`lifeboat {name}`"),
    }
    .into())
}

/// Opens the repository for a backup: with the writer credential when one
/// is given, otherwise with the passphrase.
fn open_for_backup(g: &Global) -> Result<Repository> {
    let Some(path) = &g.writer_key else {
        return open(g);
    };
    let writer = read_writer_key(path)?;
    Ok(Repository::open_writer(backend(g)?, writer)?)
}

/// Reads a writer credential file.
pub(crate) fn read_writer_key(path: &std::path::Path) -> Result<lifeboat_core::WriterKey> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "reading the writer credential {} (create it on a host with the passphrase: `lifeboat key export-writer --out FILE`)",
            path.display()
        )
    })?;
    Ok(lifeboat_core::WriterKey::from_file(
        &bytes,
        &path.display().to_string(),
    )?)
}

/// Opens the repository's store, wrapped in the resilience layers (retry,
/// circuit breaker, concurrency limit, timeouts; see
/// `lifeboat_core::backend::resilience`).
fn backend(g: &Global) -> Result<Arc<dyn Backend>> {
    open_backend(g, false, false)
}

fn open_backend(
    g: &Global,
    create_bucket: bool,
    bucket_object_lock: bool,
) -> Result<Arc<dyn Backend>> {
    let repo = g.repo.clone().ok_or_else(|| {
        anyhow!("no repository given: use --repo PATH (or s3://BUCKET/PREFIX) or set LIFEBOAT_REPOSITORY")
    })?;
    let opts = StoreOptions {
        s3_endpoint: g.s3_endpoint.clone(),
        s3_region: g.s3_region.clone(),
        s3_path_style: g.s3_path_style,
        s3_credentials: None,
        connections: g.connections.map(usize::from),
        retry_for: Some(std::time::Duration::from_secs(g.retry_secs)),
        create_bucket,
        bucket_object_lock,
    };
    Ok(open_store(&repo, &opts)?.backend)
}

/// Reads a passphrase: from a file, the environment, or a prompt.
fn passphrase(file: Option<&PathBuf>, env: &str, prompt: &str, confirm: bool) -> Result<String> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading passphrase file {}", f.display()))?;
        let line = text.lines().next().unwrap_or("").to_string();
        if line.is_empty() {
            bail!("passphrase file {} is empty", f.display());
        }
        return Ok(line);
    }
    if let Ok(p) = std::env::var(env) {
        if !p.is_empty() {
            return Ok(p);
        }
    }
    if !std::io::stdin().is_terminal() {
        bail!("no passphrase: give --passphrase-file FILE, set {env}, or run on a terminal to be asked");
    }
    let p = rpassword::prompt_password(prompt)?;
    if confirm && rpassword::prompt_password("Repeat it: ")? != p {
        bail!("the passphrases do not match");
    }
    Ok(p)
}

fn kdf_work_factor() -> Result<u8> {
    match std::env::var("LIFEBOAT_KDF_WORK_FACTOR") {
        Ok(v) => {
            let n: u8 = v
                .parse()
                .ok()
                .filter(|n| (10..=22).contains(n))
                .ok_or_else(|| {
                    anyhow!("LIFEBOAT_KDF_WORK_FACTOR must be a number from 10 to 22")
                })?;
            Ok(n)
        }
        Err(_) => Ok(lifeboat_core::DEFAULT_KDF_WORK_FACTOR),
    }
}

pub(crate) fn open(g: &Global) -> Result<Repository> {
    let b = backend(g)?;
    // Report a missing repository before asking for a passphrase.
    if b.stat("config").is_err_and(|e| e.is_not_found()) {
        return Err(lifeboat_core::Error::NoRepository {
            location: b.location(),
        }
        .into());
    }
    let p = passphrase(
        g.passphrase_file.as_ref(),
        "LIFEBOAT_PASSPHRASE",
        "Passphrase: ",
        false,
    )?;
    Ok(Repository::open(b, &p)?)
}

fn cache_dir(g: &Global) -> Option<PathBuf> {
    if let Some(d) = &g.cache_dir {
        return Some(d.clone());
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("lifeboat"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lifeboat"))
}

pub(crate) fn print_json(v: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn init(g: &Global, a: &InitArgs) -> Result<u8> {
    let lock = match a.lock_days {
        Some(days) => Some(lifeboat_core::LockPolicy {
            mode: a.lock_mode.parse().map_err(|e: String| anyhow!(e))?,
            days,
        }),
        None => None,
    };
    let b = open_backend(g, true, lock.is_some())?;
    let p = passphrase(
        g.passphrase_file.as_ref(),
        "LIFEBOAT_PASSPHRASE",
        "New repository passphrase: ",
        true,
    )?;
    let opts = InitOptions {
        compression: a.compression,
        pack_size: a.pack_size.saturating_mul(1024 * 1024),
        kdf_work_factor: kdf_work_factor()?,
        lock,
        ..InitOptions::default()
    };
    let repo = match Repository::init(b.clone(), &p, &opts) {
        Err(lifeboat_core::Error::AlreadyInitialised { location }) if a.exists_ok => {
            if !g.quiet {
                println!("a repository already exists at {location}; leaving it as it is");
            }
            return output::ok();
        }
        other => other?,
    };
    if g.json {
        print_json(
            &json!({"repository": b.location(), "id": repo.config().id, "version": repo.config().version}),
        )?;
    } else if !g.quiet {
        println!(
            "created repository {} at {}",
            &repo.config().id[..8],
            b.location()
        );
        println!("keep the passphrase safe: without it the data cannot be recovered");
        if let Some(l) = lock {
            println!(
                "snapshots stay immutable for {} days (Object Lock, {} mode)",
                l.days,
                l.mode.as_str()
            );
        }
    }
    output::ok()
}

fn backup(g: &Global, a: &BackupArgs) -> Result<u8> {
    if let Some(source) = &a.source {
        return crate::agent_cmds::run_job(
            g,
            &format!("backup:{source}"),
            &ConfigArgs {
                config: a.config.clone(),
            },
        );
    }
    let repo = open_for_backup(g)?;
    let mut excludes = a.excludes.clone();
    for f in &a.exclude_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading exclude file {}", f.display()))?;
        excludes.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    let opts = BackupOptions {
        paths: a.paths.clone(),
        excludes,
        one_file_system: a.one_file_system,
        host: a.host.clone(),
        tags: a.tags.clone(),
        cache_dir: if a.no_cache { None } else { cache_dir(g) },
    };
    let progress = Arc::new(Progress::default());
    let line = {
        let p = progress.clone();
        let start = std::time::Instant::now();
        ProgressLine::start(!g.quiet && !g.json, move || {
            format!(
                "[{:.0}s] {} entries, {} read, {} unchanged, {} stored",
                start.elapsed().as_secs_f64(),
                p.files.load(Ordering::Relaxed),
                bytes(p.bytes_read.load(Ordering::Relaxed)),
                bytes(p.bytes_cached.load(Ordering::Relaxed)),
                bytes(p.bytes_stored.load(Ordering::Relaxed)),
            )
        })
    };
    let report = if a.stdin {
        let source = StdinSource {
            reader: Box::new(std::io::stdin().lock()),
            name: a.stdin_filename.clone(),
        };
        lifeboat_core::backup::backup_stdin(&repo, &opts, &progress, source)
    } else {
        lifeboat_core::backup::backup(&repo, &opts, &progress)
    };
    drop(line);
    let report = report?;
    let s = &report.snapshot.summary;
    if g.json {
        print_json(&json!({
            "snapshot": report.snapshot_id.to_hex(),
            "incomplete": report.snapshot.incomplete,
            "summary": s,
            "warnings": report.warnings,
        }))?;
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        if !g.quiet {
            println!(
                "files: {} new, {} changed, {} unchanged; {} dirs, {} other",
                s.files_new, s.files_changed, s.files_unmodified, s.dirs, s.others
            );
            println!(
                "read {} of {}; added {} to the repository ({} before compression, {} blobs)",
                bytes(s.bytes_read),
                bytes(s.total_bytes),
                bytes(s.bytes_added_stored),
                bytes(s.bytes_added_raw),
                s.blobs_added
            );
            println!(
                "snapshot {} saved in {:.2}s",
                report.snapshot_id.short(),
                s.duration_secs
            );
        }
        if report.snapshot.incomplete {
            eprintln!(
                "snapshot {} is incomplete: {} entries could not be read (see warnings above)",
                report.snapshot_id.short(),
                s.errors
            );
        }
    }
    Ok(if report.snapshot.incomplete {
        output::INCOMPLETE
    } else {
        output::OK
    })
}

/// Resolves `spec` within `filter`, telling on stderr what it skipped
/// (objects that did not verify, snapshots dated in the future) and, for
/// a bare `latest` across several hosts, whose it took.
fn find(g: &Global, repo: &Repository, spec: &str, filter: &FilterArgs) -> Result<(Id, Snapshot)> {
    let list = repo.snapshots()?;
    warn_all(g, &list.warnings());
    let sel = filter.selector();
    let found = list.find(spec, &sel)?;
    if spec == "latest" && sel.host.is_none() && !g.quiet && !g.json {
        let hosts: std::collections::BTreeSet<&str> = list
            .select(&sel)
            .map(|l| l.snapshot.host.as_str())
            .collect();
        if hosts.len() > 1 {
            eprintln!(
                "note: \"latest\" is host {}'s snapshot {}, the newest of {} hosts; give --host to choose",
                found.snapshot.host,
                found.id.short(),
                hosts.len()
            );
        }
    }
    Ok((found.id, found.snapshot.clone()))
}

/// Prints warnings on stderr (unless --json, whose output carries them).
fn warn_all(g: &Global, warnings: &[String]) {
    if !g.json {
        for w in warnings {
            eprintln!("warning: {w}");
        }
    }
}

fn local_time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.with_timezone(&chrono::Local)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

fn snapshots(g: &Global, f: &FilterArgs) -> Result<u8> {
    let repo = open(g)?;
    let list = repo.snapshots()?;
    let sel = f.selector();
    warn_all(g, &list.warnings());
    if g.json {
        let v: Vec<_> = list
            .select(&sel)
            .map(|l| {
                let mut v = serde_json::to_value(&l.snapshot).expect("snapshot serialises");
                v["id"] = json!(l.id.to_hex());
                v["trust"] = json!(l.trust);
                v["future"] = json!(l.future);
                v
            })
            .collect();
        // Objects that did not verify go to stderr, as one JSON line, so
        // the listing stays what it was.
        if !list.rejected.is_empty() {
            eprintln!("{}", json!({ "untrusted": list.rejected }));
        }
        print_json(&json!(v))?;
        return output::ok();
    }
    let snaps: Vec<(Id, Snapshot)> = list
        .select(&sel)
        .map(|l| (l.id, l.snapshot.clone()))
        .collect();
    println!(
        "{:<8}  {:<19}  {:<16}  {:>10}  {:<12}  paths",
        "id", "time", "host", "size", "tags"
    );
    for (id, s) in &snaps {
        println!(
            "{:<8}  {:<19}  {:<16}  {:>10}  {:<12}  {}{}",
            id.short(),
            local_time(&s.time),
            s.host,
            bytes(s.summary.total_bytes),
            s.tags.join(","),
            s.paths.join(" "),
            if s.incomplete { "  (incomplete)" } else { "" }
        );
    }
    if !g.quiet {
        println!("{} snapshots", snaps.len());
    }
    output::ok()
}

fn kind_char(k: NodeKind) -> char {
    match k {
        NodeKind::Dir => 'd',
        NodeKind::File => '-',
        NodeKind::Symlink => 'l',
        NodeKind::Fifo => 'p',
        NodeKind::Chardev => 'c',
        NodeKind::Blockdev => 'b',
        NodeKind::Socket => 's',
    }
}

fn mode_string(n: &Node) -> String {
    let mut s = String::new();
    s.push(kind_char(n.kind));
    let m = n.mode;
    for (i, c) in ['r', 'w', 'x', 'r', 'w', 'x', 'r', 'w', 'x']
        .iter()
        .enumerate()
    {
        let bit = 1 << (8 - i);
        s.push(if m & bit != 0 { *c } else { '-' });
    }
    s
}

fn ls(g: &Global, a: &LsArgs) -> Result<u8> {
    let repo = open(g)?;
    let (_, snap) = find(g, &repo, &a.snapshot, &a.filter)?;
    let index = repo.load_index_for_host(&snap.host)?;
    let prefix = a
        .path
        .as_deref()
        .map(|p| p.trim_end_matches('/').to_string())
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let mut items = Vec::new();
    lifeboat_core::walk::walk(&repo, &index, &snap, &mut |path, node| {
        let p = String::from_utf8_lossy(path);
        if !(prefix.is_empty() || p == prefix || p.starts_with(&format!("{prefix}/"))) {
            return Ok(());
        }
        if g.json {
            let mut v = serde_json::to_value(node).expect("node serialises");
            v["path"] = json!(p);
            v.as_object_mut().map(|o| o.remove("content"));
            items.push(v);
        } else if a.long {
            let t =
                chrono::DateTime::from_timestamp(node.mtime, node.mtime_nsec).unwrap_or_default();
            let _ = writeln!(
                out,
                "{} {:>8} {:>8} {:>12} {} {}{}",
                mode_string(node),
                node.user.clone().unwrap_or_else(|| node.uid.to_string()),
                node.group.clone().unwrap_or_else(|| node.gid.to_string()),
                node.size,
                local_time(&t),
                p,
                node.target
                    .as_ref()
                    .map(|t| format!(" -> {}", t.lossy()))
                    .unwrap_or_default()
            );
        } else {
            let _ = writeln!(out, "{p}");
        }
        Ok(())
    })?;
    if g.json {
        drop(out);
        print_json(&json!(items))?;
    }
    output::ok()
}

fn diff(g: &Global, a: &DiffArgs) -> Result<u8> {
    let repo = open(g)?;
    let index = repo.load_index()?;
    let collect = |spec: &str| -> Result<BTreeMap<Vec<u8>, Node>> {
        let (_, snap) = find(g, &repo, spec, &a.filter)?;
        let mut map = BTreeMap::new();
        lifeboat_core::walk::walk(&repo, &index, &snap, &mut |path, node| {
            map.insert(path.to_vec(), node.clone());
            Ok(())
        })?;
        Ok(map)
    };
    let from = collect(&a.from)?;
    let to = collect(&a.to)?;
    let mut changes = Vec::new();
    for (p, n) in &from {
        match to.get(p) {
            None => changes.push(("-", p, "removed")),
            Some(m) if m.kind != n.kind => changes.push(("T", p, "type changed")),
            Some(m) if m.content != n.content || m.target != n.target || m.size != n.size => {
                changes.push(("M", p, "content changed"))
            }
            Some(m)
                if m.kind != NodeKind::Dir
                    && (m.mode != n.mode
                        || m.uid != n.uid
                        || m.gid != n.gid
                        || m.mtime != n.mtime
                        || m.mtime_nsec != n.mtime_nsec
                        || m.xattrs != n.xattrs) =>
            {
                changes.push(("U", p, "metadata changed"))
            }
            _ => {}
        }
    }
    for p in to.keys() {
        if !from.contains_key(p) {
            changes.push(("+", p, "added"));
        }
    }
    changes.sort_by(|a, b| a.1.cmp(b.1));
    if g.json {
        let v: Vec<_> = changes
            .iter()
            .map(|(c, p, what)| json!({"change": c, "path": String::from_utf8_lossy(p), "what": what}))
            .collect();
        print_json(&json!(v))?;
    } else {
        let mut out = std::io::stdout().lock();
        for (c, p, _) in &changes {
            let _ = writeln!(out, "{c} {}", String::from_utf8_lossy(p));
        }
        if !g.quiet {
            let count = |c: &str| changes.iter().filter(|x| x.0 == c).count();
            let _ = writeln!(
                out,
                "{} added, {} removed, {} modified, {} metadata only, {} type changes",
                count("+"),
                count("-"),
                count("M"),
                count("U"),
                count("T")
            );
        }
    }
    output::ok()
}

fn restore(g: &Global, a: &RestoreArgs) -> Result<u8> {
    let repo = open(g)?;
    let (id, snap) = find(g, &repo, &a.snapshot, &a.filter)?;
    let opts = RestoreOptions {
        target: a.target.clone(),
        includes: a.includes.clone(),
        excludes: a.excludes.clone(),
        dry_run: a.dry_run,
        verify: a.verify,
        overwrite: a.overwrite,
        cancel: None,
        batch: a.batch as usize,
        index_cache: if a.no_cache { None } else { cache_dir(g) },
    };
    let start = std::time::Instant::now();
    let report = lifeboat_core::restore::restore(&repo, &snap, &opts)?;
    let secs = start.elapsed().as_secs_f64();
    if g.json {
        let mut v = serde_json::to_value(&report)?;
        v["snapshot"] = json!(id.to_hex());
        v["duration_secs"] = json!(secs);
        print_json(&v)?;
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        for c in &report.conflicts {
            eprintln!("conflict: {c} exists and differs from the snapshot; left as it is (use --overwrite to replace)");
        }
        for f in &report.failures {
            eprintln!("failed: {}: {}", f.path, f.reason);
        }
        if !g.quiet {
            let verb = if a.dry_run {
                "would restore"
            } else {
                "restored"
            };
            println!(
                "{verb} {} files ({}), {} dirs, {} other from snapshot {} into {}; {} files already up to date",
                report.files_restored,
                bytes(report.bytes_total),
                report.dirs,
                report.others,
                id.short(),
                a.target.display(),
                report.files_unchanged
            );
            if a.verify {
                println!(
                    "verified {} files against the snapshot",
                    report.files_verified
                );
            }
            if !a.dry_run {
                println!("done in {secs:.2}s");
            }
        }
    }
    if !report.failures.is_empty() || !report.conflicts.is_empty() {
        if !g.json {
            eprintln!(
                "restore incomplete: {} failed, {} conflicts",
                report.failures.len(),
                report.conflicts.len()
            );
        }
        return Ok(output::INCOMPLETE);
    }
    output::ok()
}

fn dump(g: &Global, a: &DumpArgs) -> Result<u8> {
    let repo = open(g)?;
    let (_, snap) = find(g, &repo, &a.snapshot, &a.filter)?;
    let mut out = std::io::stdout().lock();
    lifeboat_core::restore::dump(&repo, &snap, &a.path, &mut out)?;
    out.flush()?;
    output::ok()
}

fn check(g: &Global, a: &CheckArgs) -> Result<u8> {
    let repo = open(g)?;
    let subset = match &a.read_data_subset {
        None => None,
        Some(s) => {
            let v: f64 = s
                .trim_end_matches('%')
                .parse()
                .ok()
                .filter(|v: &f64| *v > 0.0 && *v <= 100.0)
                .ok_or_else(|| {
                    anyhow!("--read-data-subset takes a percentage from 0 to 100, e.g. 10 or 2.5%")
                })?;
            Some(v)
        }
    };
    let opts = CheckOptions {
        read_data: a.read_data || subset.is_some(),
        subset_percent: subset,
    };
    let report = lifeboat_core::check::check(&repo, &opts)?;
    if g.json {
        print_json(&serde_json::to_value(&report)?)?;
    } else {
        for e in &report.errors {
            eprintln!("error: {e}");
        }
        for f in &report.affected {
            eprintln!("affected: snapshot {} {}: {}", f.snapshot, f.path, f.reason);
        }
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        if !g.quiet {
            println!(
                "checked {} snapshots, {} trees, {} packs{}",
                report.snapshots,
                report.trees,
                report.packs,
                if opts.read_data {
                    format!(
                        "; read {} packs and verified {} blobs",
                        report.packs_read, report.blobs_verified
                    )
                } else {
                    String::new()
                }
            );
            if report.packs_vouched > 0 {
                println!(
                    "vouched for {} pack(s) only their own hosts had listed: every host may now deduplicate against them",
                    report.packs_vouched
                );
            }
            if report.unindexed_packs > 0 {
                println!(
                    "{} packs are not indexed (left by interrupted backups; prune removes them)",
                    report.unindexed_packs
                );
            }
        }
    }
    if report.errors.is_empty() {
        if !g.json && !g.quiet {
            println!("no errors found");
        }
        output::ok()
    } else {
        if !g.json {
            eprintln!(
                "{} errors found; the files listed as affected cannot be fully restored",
                report.errors.len()
            );
        }
        Ok(output::CORRUPT)
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("invalid duration {s:?}: use e.g. 30s, 15m, 1h, 2d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("invalid duration {s:?}: unit must be s, m, h or d"),
    };
    Ok(std::time::Duration::from_secs(secs))
}

fn forget(g: &Global, a: &ForgetArgs) -> Result<u8> {
    let repo = open(g)?;
    let sel = a.filter.selector();
    let filter = |s: &Snapshot| sel.matches(s);
    let what = if !a.snapshots.is_empty() {
        ForgetWhat::Ids(a.snapshots.clone(), sel.clone())
    } else {
        ForgetWhat::Policy {
            policy: KeepPolicy {
                last: a.keep_last,
                hourly: a.keep_hourly,
                daily: a.keep_daily,
                weekly: a.keep_weekly,
                monthly: a.keep_monthly,
                yearly: a.keep_yearly,
                within: a
                    .keep_within
                    .as_deref()
                    .map(retention::parse_within)
                    .transpose()?,
                tags: a.keep_tag.clone(),
            },
            group_by: group_by(&a.group_by)?,
            filter: &filter,
        }
    };
    let report = lifeboat_core::forget::forget(
        &repo,
        &ForgetOptions {
            what,
            dry_run: a.dry_run,
        },
    )?;
    if g.json {
        print_json(&json!({
            "dry_run": a.dry_run,
            "removed": report.removed.iter().map(|id| id.to_hex()).collect::<Vec<_>>(),
            "groups": report.groups,
            "left_alone": report.left_alone,
            "untrusted": report.untrusted,
            "warnings": report.warnings,
        }))?;
    } else {
        print_forget(g, a, &report);
    }
    if a.prune && !a.dry_run {
        return prune_repo(
            g,
            &repo,
            &PruneArgs {
                grace: "1h".into(),
                max_unused: 50.0,
                dry_run: false,
            },
        );
    }
    output::ok()
}

/// Parses `--group-by`.
fn group_by(fields: &str) -> Result<GroupBy> {
    let mut group_by = GroupBy::default();
    for f in fields.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        match f {
            "host" => group_by.host = true,
            "paths" | "path" => group_by.paths = true,
            "tags" | "tag" => group_by.tags = true,
            other => bail!("--group-by takes host, paths and tags, not {other:?}"),
        }
    }
    Ok(group_by)
}

/// Prints what `forget` decided, group by group.
fn print_forget(g: &Global, a: &ForgetArgs, report: &lifeboat_core::forget::ForgetReport) {
    for r in &report.untrusted {
        eprintln!("warning: {r}; it is neither judged nor removed");
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for l in &report.left_alone {
        eprintln!("left alone: {l}");
    }
    if g.quiet {
        return;
    }
    for grp in &report.groups {
        println!(
            "group host={} paths={} tags={}",
            grp.host.as_deref().unwrap_or("*"),
            grp.paths
                .as_ref()
                .map(|p| p.join(" "))
                .unwrap_or_else(|| "*".into()),
            grp.tags
                .as_ref()
                .map(|p| p.join(","))
                .unwrap_or_else(|| "*".into())
        );
        for d in &grp.decisions {
            println!(
                "  {} {}  {}  {}",
                if d.keep { "keep  " } else { "remove" },
                &d.id[..8],
                local_time(&d.time),
                d.reasons.join(", ")
            );
        }
    }
    println!(
        "{} {} snapshots",
        if a.dry_run { "would remove" } else { "removed" },
        report.removed.len()
    );
}

fn prune(g: &Global, a: &PruneArgs) -> Result<u8> {
    let repo = open(g)?;
    prune_repo(g, &repo, a)
}

fn prune_repo(g: &Global, repo: &Repository, a: &PruneArgs) -> Result<u8> {
    if !(0.0..=100.0).contains(&a.max_unused) {
        bail!("--max-unused is a percentage from 0 to 100");
    }
    let opts = PruneOptions {
        grace: parse_duration(&a.grace)?,
        max_unused: a.max_unused / 100.0,
        dry_run: a.dry_run,
        ..PruneOptions::default()
    };
    let r = lifeboat_core::prune::prune(repo, &opts)?;
    if !g.json {
        for u in &r.untrusted {
            eprintln!("warning: {u}; it keeps what it names from prune, and is not deleted");
        }
        for p in r.repack_refused.iter().chain(&r.unreadable_trees) {
            eprintln!("warning: {p}");
        }
    }
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else if !g.quiet {
        let verb = if a.dry_run { "would" } else { "did" };
        println!(
            "{} packs in the repository, {} in use",
            r.packs_total, r.packs_used
        );
        println!(
            "{verb} condemn {} packs ({}), repacking {} partly used ones",
            r.packs_condemned,
            bytes(r.bytes_condemned),
            r.packs_repacked
        );
        println!(
            "{verb} delete {} packs ({}) condemned earlier; {} spared",
            r.packs_deleted,
            bytes(r.bytes_deleted),
            r.packs_spared
        );
        if r.packs_too_young > 0 {
            println!(
                "{} unreferenced packs are younger than 6 hours and were left alone (a backup may still be writing them)",
                r.packs_too_young
            );
        }
        if r.temp_files_removed > 0 {
            println!(
                "removed {} leftovers of interrupted writes",
                r.temp_files_removed
            );
        }
        if r.packs_locked > 0 {
            println!(
                "{} unused packs ({}) are kept under Object Lock; a prune after {} can start removing them",
                r.packs_locked,
                bytes(r.bytes_locked),
                r.next_unlock.as_deref().unwrap_or("their locks end")
            );
        }
        if let Some(t) = &r.next_deletion_after {
            println!(
                "condemned data is deleted by a prune run after {t} (grace period {})",
                a.grace
            );
        }
    }
    output::ok()
}

fn upgrade(g: &Global, a: &UpgradeArgs) -> Result<u8> {
    let repo = open(g)?;
    let r = lifeboat_core::upgrade::upgrade(
        &repo,
        &lifeboat_core::upgrade::UpgradeOptions {
            dry_run: a.dry_run,
            trust_existing: a.trust_existing,
        },
    )?;
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
        return output::ok();
    }
    for f in r.packs_failed.iter().chain(&r.snapshots_failed) {
        eprintln!("warning: {f}");
    }
    if !g.quiet {
        let verb = |done: &str, would: &str| {
            if a.dry_run {
                would.to_string()
            } else {
                done.to_string()
            }
        };
        println!(
            "{} {} pack(s), adopted {} snapshot(s), registered {} host(s){}",
            verb("vouched for", "would vouch for"),
            r.packs_vouched,
            r.snapshots_adopted,
            r.hosts_registered.len(),
            if r.hosts_registered.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.hosts_registered.join(", "))
            }
        );
        if r.config_upgraded {
            println!(
                "repository is now format {}: every new snapshot, index object and plan is signed. Write-only hosts need new credentials: `lifeboat key export-writer --host NAME --out FILE` for each",
                r.to_version
            );
        } else if a.dry_run {
            println!("dry run: nothing was written");
        } else {
            println!(
                "repository was already format {}; nothing left to adopt",
                r.to_version
            );
        }
    }
    Ok(
        if r.packs_failed.is_empty() && r.snapshots_failed.is_empty() {
            output::OK
        } else {
            output::INCOMPLETE
        },
    )
}

/// Writes a secret to a new file of mode 0600, never replacing one.
fn write_secret_file(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn key(g: &Global, k: &KeyCommand) -> Result<u8> {
    let repo = open(g)?;
    match k {
        KeyCommand::List => {
            let keys = repo.list_keys()?;
            if g.json {
                print_json(&serde_json::to_value(&keys)?)?;
            } else {
                println!("  {:<32}  {:<20}  {:<16}  user", "id", "created", "host");
                for k in keys {
                    println!(
                        "{} {:<32}  {:<20}  {:<16}  {}",
                        if k.current { "*" } else { " " },
                        k.id,
                        k.file.created,
                        k.file.host,
                        k.file.user
                    );
                }
            }
        }
        KeyCommand::Add {
            new_passphrase_file,
        } => {
            let p = passphrase(
                new_passphrase_file.as_ref(),
                "LIFEBOAT_NEW_PASSPHRASE",
                "New passphrase: ",
                true,
            )?;
            let id = repo.add_key(&p, kdf_work_factor()?)?;
            if g.json {
                print_json(&json!({"added": id}))?;
            } else {
                println!("added key {id}");
            }
        }
        KeyCommand::Remove { id } => {
            repo.remove_key(id)?;
            if g.json {
                print_json(&json!({"removed": id}))?;
            } else {
                println!("removed key {id}");
            }
        }
        KeyCommand::ExportIdentity { out } => {
            let identity = repo.master_key("exporting the identity")?.identity_string();
            write_secret_file(
                out,
                format!(
                    "# lifeboat repository {} identity: decrypts every object\n{identity}\n",
                    repo.config().id
                )
                .as_bytes(),
            )?;
            if !g.quiet && !g.json {
                println!(
                    "wrote the repository identity to {}; keep it offline and secret",
                    out.display()
                );
            }
        }
        KeyCommand::ExportWriter { out, host } => {
            if out.exists() {
                bail!("creating {} (it must not exist yet)", out.display());
            }
            write_secret_file(out, &repo.writer_key(host.as_deref())?.to_file())?;
            if g.json {
                print_json(&json!({"writer_key": out, "repository": repo.config().id}))?;
            } else if !g.quiet {
                println!(
                    "wrote a write-only credential to {}: copy it to backup hosts and use it with --writer-key (or repository.writer_key in the agent's configuration); it can add snapshots and read none",
                    out.display()
                );
            }
        }
        KeyCommand::Passwd {
            new_passphrase_file,
        } => {
            let p = passphrase(
                new_passphrase_file.as_ref(),
                "LIFEBOAT_NEW_PASSPHRASE",
                "New passphrase: ",
                true,
            )?;
            let id = repo.change_passphrase(&p, kdf_work_factor()?)?;
            if g.json {
                print_json(&json!({"changed": id}))?;
            } else {
                println!("passphrase changed (new key {id})");
            }
        }
    }
    output::ok()
}

/// Man pages (one per command) and bash, zsh and fish completions, generated
/// from the clap definitions so they never drift from `--help`.
fn generate_assets(out: &std::path::Path) -> Result<u8> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::generate_to(cmd.clone(), &man).context("writing man pages")?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "lifeboat", &completions)
            .context("writing completions")?;
    }
    output::ok()
}
