//! `forget`: the one engine that removes snapshots, for the CLI and the
//! agent alike (selection, policy, lock check, delete).
//!
//! It judges only snapshots that verified (`snapshot_list`): an object
//! that did not is reported and left where it is, never deleted and never
//! counted. A snapshot dated in the future by the store's clock is left
//! out of the policy altogether, so it cannot take the place of a real one
//! in a `--keep-daily` slot, and `--keep-within` counts from now. A
//! snapshot's own `locked_until` is believed only in a repository with a
//! lock policy, and before it stops anything the store is asked: a forged
//! date in 2099 cannot make a snapshot unforgettable.
//!
//! What a stolen credential can still do here: write many snapshots for its
//! own host, which a count rule (`--keep-last`) then keeps instead of older
//! real ones. Time-bucket rules and Object Lock are the defence; `forget`
//! warns when a host's snapshots arrive far faster than they used to.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backend::Retained;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::object::{ObjectKind, Rejected};
use crate::repo::Repository;
use crate::retention::{apply_policy, GroupBy, GroupDecision, KeepPolicy, SnapshotInfo};
use crate::snapshot_list::{Listed, Selector, SnapshotList};
use crate::tree::Snapshot;

/// What to forget.
pub enum ForgetWhat<'a> {
    /// These snapshots, by ID prefix (or `latest` within the selector).
    Ids(Vec<String>, Selector),
    /// Whatever `policy` does not keep among the snapshots `filter`
    /// selects, judged per group.
    Policy {
        /// The keep rules.
        policy: KeepPolicy,
        /// How snapshots are grouped.
        group_by: GroupBy,
        /// Which snapshots are judged (others are left alone).
        filter: &'a dyn Fn(&Snapshot) -> bool,
    },
}

/// How to forget.
pub struct ForgetOptions<'a> {
    /// The selection.
    pub what: ForgetWhat<'a>,
    /// Decide and report, delete nothing.
    pub dry_run: bool,
}

/// What `forget` did (or would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ForgetReport {
    /// Per group, the policy's verdicts (empty for explicit IDs).
    pub groups: Vec<GroupDecision>,
    /// Snapshots removed (or, in a dry run, to be removed).
    pub removed: Vec<Id>,
    /// Snapshots left out of the policy, and why (dated in the future).
    pub left_alone: Vec<String>,
    /// Objects that did not verify: neither judged nor deleted.
    pub untrusted: Vec<Rejected>,
    /// Things to tell the user (a host writing snapshots unusually fast).
    pub warnings: Vec<String>,
}

/// Forgets snapshots: see the module docs. Explicit IDs of snapshots the
/// store still locks are refused, naming them, and nothing is removed.
pub fn forget(repo: &Repository, opts: &ForgetOptions<'_>) -> Result<ForgetReport> {
    repo.require_full_key("forget")?;
    let list = repo.snapshots()?;
    let lock_now = crate::prune::lock_clock(repo)?;
    let mut report = ForgetReport {
        untrusted: list.rejected.clone(),
        ..ForgetReport::default()
    };
    let remove: Vec<&Listed> = match &opts.what {
        ForgetWhat::Ids(specs, sel) => {
            let chosen = specs
                .iter()
                .map(|spec| list.find(spec, sel))
                .collect::<Result<Vec<_>>>()?;
            refuse_locked(repo, &chosen, lock_now)?;
            chosen
        }
        ForgetWhat::Policy {
            policy,
            group_by,
            filter,
        } => by_policy(
            repo,
            &list,
            policy,
            *group_by,
            *filter,
            lock_now,
            &mut report,
        )?,
    };
    for l in &remove {
        if !opts.dry_run {
            repo.delete_object(ObjectKind::Snapshot, &l.id)?;
        }
        report.removed.push(l.id);
    }
    Ok(report)
}

/// The snapshots `policy` does not keep among those `filter` selects.
fn by_policy<'l>(
    repo: &Repository,
    list: &'l SnapshotList,
    policy: &KeepPolicy,
    group_by: GroupBy,
    filter: &dyn Fn(&Snapshot) -> bool,
    lock_now: chrono::DateTime<chrono::Utc>,
    report: &mut ForgetReport,
) -> Result<Vec<&'l Listed>> {
    let believe_locks = repo.lock_policy().is_some();
    let mut judged: BTreeMap<String, &Listed> = BTreeMap::new();
    let mut infos = Vec::new();
    for l in list.snapshots.iter().filter(|l| filter(&l.snapshot)) {
        if l.future {
            report.left_alone.push(format!(
                "{} ({}): dated {}, after the store received it; retention leaves it alone",
                l.id.short(),
                l.snapshot.host,
                l.snapshot
                    .time
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
            continue;
        }
        infos.push(SnapshotInfo {
            id: l.id.to_hex(),
            time: l.snapshot.time,
            host: l.snapshot.host.clone(),
            paths: l.snapshot.paths.clone(),
            tags: l.snapshot.tags.clone(),
            locked_until: l.snapshot.locked_until.filter(|_| believe_locks),
        });
        judged.insert(l.id.to_hex(), l);
    }
    report.warnings.extend(flood_warnings(&judged));
    let mut groups = apply_policy(&infos, policy, group_by, lock_now, &chrono::Local)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let mut remove = Vec::new();
    for d in groups.iter_mut().flat_map(|g| g.decisions.iter_mut()) {
        let l = judged[&d.id];
        if d.keep && only_locked(&d.reasons) && !store_locks(repo, l, lock_now)? {
            d.keep = false;
            d.reasons = vec!["its recorded lock is not one the store holds".into()];
        }
        if !d.keep {
            remove.push(l);
        }
    }
    report.groups = groups;
    Ok(remove)
}

/// True when the only reason to keep a snapshot is its recorded lock.
fn only_locked(reasons: &[String]) -> bool {
    !reasons.is_empty() && reasons.iter().all(|r| r.starts_with("locked until "))
}

/// Whether the store still retains `l`'s object: asked where it can tell,
/// else its recorded date (in a repository with a lock policy) stands.
fn store_locks(
    repo: &Repository,
    l: &Listed,
    lock_now: chrono::DateTime<chrono::Utc>,
) -> Result<bool> {
    match repo
        .backend()
        .retained_until(&ObjectKind::Snapshot.key(&l.id))?
    {
        Retained::Until(until) => Ok(until > lock_now),
        Retained::No => Ok(false),
        Retained::Unknown => {
            Ok(repo.lock_policy().is_some()
                && l.snapshot.locked_until.is_some_and(|u| u > lock_now))
        }
    }
}

/// Refuses explicitly named snapshots that the store still locks.
fn refuse_locked(
    repo: &Repository,
    chosen: &[&Listed],
    lock_now: chrono::DateTime<chrono::Utc>,
) -> Result<()> {
    let mut locked = Vec::new();
    for l in chosen {
        let claimed = repo.lock_policy().is_some() && l.snapshot.locked_until.is_some();
        if claimed && store_locks(repo, l, lock_now)? {
            locked.push(format!(
                "{} (until {})",
                l.id.short(),
                l.snapshot
                    .locked_until
                    .map(|u| u.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default()
            ));
        }
    }
    if locked.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "refusing to forget {} snapshot(s) still under Object Lock: {}; nothing was removed. They can be forgotten after those dates",
        locked.len(),
        locked.join(", ")
    )))
}

/// Snapshots a host must have written before its pace is judged.
const FLOOD_HISTORY: usize = 20;
/// The newest snapshots whose pace is compared with the host's usual one.
const FLOOD_RECENT: usize = 10;

/// A warning per host whose newest snapshots reached the store (by the
/// store's clock, which a host cannot set) at least ten times faster than
/// its earlier ones: the sign of a stolen credential flooding a count rule.
fn flood_warnings(judged: &BTreeMap<String, &Listed>) -> Vec<String> {
    let mut by_host: BTreeMap<&str, Vec<chrono::DateTime<chrono::Utc>>> = BTreeMap::new();
    for l in judged.values() {
        by_host.entry(&l.snapshot.host).or_default().push(l.written);
    }
    let mut out = Vec::new();
    for (host, mut times) in by_host {
        if times.len() < FLOOD_HISTORY {
            continue;
        }
        times.sort();
        let gaps: Vec<i64> = times
            .windows(2)
            .map(|w| (w[1] - w[0]).num_seconds())
            .collect();
        let (older, recent) = gaps.split_at(gaps.len() - (FLOOD_RECENT - 1));
        let (usual, now) = (median(older), median(recent));
        if usual >= 60 && now.saturating_mul(10) < usual {
            out.push(format!(
                "host {host}'s newest {FLOOD_RECENT} snapshots reached the store one every {now} s, where it used to write one every {usual} s: if that host is not yours to trust any more, a --keep-last rule keeps its new snapshots instead of older real ones (time rules such as --keep-daily and Object Lock are not fooled)"
            ));
        }
    }
    out
}

fn median(v: &[i64]) -> i64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}
