//! Prune: delete data no snapshot needs, safely while other hosts back up.
//!
//! Deletion is two-phase, with no locks (after kopia and duplicacy):
//!
//! 1. **Condemn.** A prune computes which packs no snapshot needs (and
//!    repacks the live blobs of mostly-empty packs into new packs), then
//!    writes a *plan* object `pending/<id>` naming the condemned packs. It
//!    deletes nothing.
//! 2. **Delete.** A later prune executes every plan older than the grace
//!    period, measured with the storage's own timestamps (so a host whose
//!    clock is hours off cannot shorten it). It re-reads the snapshots first
//!    and spares any condemned pack that a snapshot committed since needs.
//!    It writes a consolidated index, removes the old index objects it read,
//!    and then the packs. Plan objects stay for [`PLAN_RETENTION`] after.
//!
//! Backups cooperate in two cheap ways. At start they drop every condemned
//! pack from their dedup index, so they never newly depend on one. Before
//! committing their snapshot they re-list the plans; if a plan they had not
//! seen names a pack they reused or wrote, they refuse to commit (their data
//! stays, and the next run reuses it). A snapshot is therefore either visible
//! to the delete phase's re-check or was never committed.
//!
//! With Object Lock, prune never tries to delete a retained object: packs
//! whose retention (as the index records it) has not ended are neither
//! condemned, repacked nor deleted, and index objects are kept while any
//! pack they list could still be locked. The report says how much waits
//! for a lock to end, and from when. "Now" is the store's clock, the one
//! that enforces the locks.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{IndexFile, IndexPack};
use crate::pack::{parse_pack, BlobKind, PackBuilder};
use crate::repo::{pack_key, Repository};
use crate::tree::NodeKind;

/// How long executed plans are kept, so that even a very long backup that
/// started before a plan sees it at commit time.
pub const PLAN_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Unreferenced packs are condemned only when at least this old (or the
/// grace period, if longer): younger ones may belong to a backup still
/// running, whose snapshot does not exist yet. A backup running longer than
/// this may lose the race, and then refuses to commit (see module docs).
const MIN_PACK_AGE: Duration = Duration::from_secs(6 * 3600);

/// A prune plan: packs condemned by phase one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrunePlan {
    /// Plan format version.
    pub version: u32,
    /// When (by the pruning host's clock, for humans only).
    pub created: chrono::DateTime<chrono::Utc>,
    /// Host that made the plan.
    pub host: String,
    /// Condemned packs.
    pub packs: Vec<Id>,
}

/// Settings for prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// How old a plan must be before its packs are deleted.
    pub grace: Duration,
    /// Repack packs whose unused fraction exceeds this (0.0..=1.0).
    pub max_unused: f64,
    /// Report only.
    pub dry_run: bool,
    /// Unreferenced packs younger than this are
    /// left alone: they may belong to a backup still running. Ignored when
    /// `grace` is zero.
    pub min_pack_age: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace: Duration::from_secs(3600),
            max_unused: 0.5,
            dry_run: false,
            min_pack_age: MIN_PACK_AGE,
        }
    }
}

/// What prune did (or would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Packs condemned now (deleted by a later prune after the grace period).
    pub packs_condemned: usize,
    /// Bytes in those packs.
    pub bytes_condemned: u64,
    /// Packs whose live blobs were copied into new packs.
    pub packs_repacked: usize,
    /// Packs deleted now (from plans past their grace period).
    pub packs_deleted: usize,
    /// Bytes freed now.
    pub bytes_deleted: u64,
    /// Condemned packs kept because a newer snapshot needs them.
    pub packs_spared: usize,
    /// Plans still waiting for their grace period.
    pub plans_waiting: usize,
    /// Earliest time a waiting plan can be executed (RFC 3339).
    pub next_deletion_after: Option<String>,
    /// Unreferenced packs left alone because they are younger than the
    /// minimum age (they may belong to a backup still running).
    pub packs_too_young: usize,
    /// Temporary files of interrupted writes removed.
    pub temp_files_removed: usize,
    /// Unused packs kept because their Object Lock has not ended.
    pub packs_locked: usize,
    /// Bytes in those packs.
    pub bytes_locked: u64,
    /// When the first of those locks ends (RFC 3339): a prune after it frees space.
    pub next_unlock: Option<String>,
    /// Total packs in the repository.
    pub packs_total: usize,
    /// Packs in use.
    pub packs_used: usize,
}

/// The pending plans and the union of their packs.
pub(crate) fn condemned_packs(repo: &Repository) -> Result<(HashSet<Id>, HashSet<Id>)> {
    let mut plans = HashSet::new();
    let mut packs = HashSet::new();
    for id in repo.list_ids("pending")? {
        let plan: PrunePlan = repo.load_json("pending", &id)?;
        packs.extend(plan.packs);
        plans.insert(id);
    }
    Ok((plans, packs))
}

/// Fails if a plan not in `seen` condemns one of `packs` (see module docs).
pub(crate) fn check_no_new_condemnation(
    repo: &Repository,
    seen: &HashSet<Id>,
    packs: &HashSet<Id>,
) -> Result<()> {
    for id in repo.list_ids("pending")? {
        if seen.contains(&id) {
            continue;
        }
        let plan: PrunePlan = repo.load_json("pending", &id)?;
        if let Some(p) = plan.packs.iter().find(|p| packs.contains(p)) {
            return Err(Error::Invalid(format!(
                "a prune running at the same time condemned pack {} that this backup uses; the snapshot was not committed, the data uploaded so far is kept, run the backup again",
                p.short()
            )));
        }
    }
    Ok(())
}

/// Blob IDs the snapshots with root trees `roots` need (trees and data).
/// Fails if any tree cannot be read: pruning on an incomplete picture could
/// delete live data. The roots must be listed *before* `index` is loaded:
/// a snapshot is written after its index objects, so every snapshot listed
/// first has its blobs in an index loaded after (a snapshot that a backup
/// commits in between is covered by the plan protocol instead).
pub fn used_blobs(
    index: &crate::index::Index,
    repo: &Repository,
    roots: Vec<Id>,
) -> Result<HashSet<Id>> {
    let mut used = HashSet::new();
    let mut stack = roots;
    while let Some(tree_id) = stack.pop() {
        if !used.insert(tree_id) {
            continue;
        }
        let tree = repo.load_tree(index, &tree_id).map_err(|e| {
            Error::Invalid(format!(
                "prune stopped: {e}; nothing was deleted (run `lifeboat check`)"
            ))
        })?;
        for node in tree.nodes {
            match node.kind {
                NodeKind::Dir => stack.extend(node.subtree),
                NodeKind::File => used.extend(node.content),
                _ => {}
            }
        }
    }
    Ok(used)
}

/// How long after its recorded end a lock is still treated as holding:
/// the store's nodes need not agree to the second, and a delete the store
/// refuses would stop a prune half way.
pub const LOCK_CLOCK_MARGIN: Duration = Duration::from_secs(600);

/// The instant before which an Object Lock counts as ended: the store's
/// clock (see [`storage_now`]) less [`LOCK_CLOCK_MARGIN`]. `forget` and
/// retention judge locks by it, so a host whose clock runs ahead cannot
/// try to delete a snapshot the store still holds. A repository without a
/// lock policy has no locks to judge: the host's clock, and no probe write.
pub fn lock_clock(repo: &Repository) -> Result<chrono::DateTime<chrono::Utc>> {
    if repo.lock_policy().is_none() {
        return Ok(chrono::Utc::now());
    }
    Ok(less_margin(storage_now(repo)?))
}

/// `now` less [`LOCK_CLOCK_MARGIN`].
fn less_margin(now: SystemTime) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::<chrono::Utc>::from(now)
        - chrono::Duration::from_std(LOCK_CLOCK_MARGIN).expect("small duration")
}

/// The storage's idea of "now": the modification time of an object we
/// write and delete again. Clocks of the hosts do not enter into it.
fn storage_now(repo: &Repository) -> Result<SystemTime> {
    let key = format!("pending/clock-{}", hex::encode(rand::random::<[u8; 8]>()));
    repo.backend().put(&key, b"")?;
    let t = repo.backend().stat(&key)?.modified;
    // A bucket with a default retention locks even this object; it is
    // empty, and its name is not a plan's, so leaving it costs nothing.
    if let Err(e) = repo.backend().delete(&key) {
        log::warn!("could not delete the clock probe {key}: {e}");
    }
    Ok(t)
}

/// Adds one index object's listing of a pack. A pack listed by several
/// index objects keeps the union of their blobs (a forged listing with
/// fewer blobs must not make live blobs look unused) and the latest lock.
fn merge_listing(packs: &mut HashMap<Id, IndexPack>, listing: IndexPack) {
    match packs.entry(listing.id) {
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(listing);
        }
        std::collections::hash_map::Entry::Occupied(mut o) => {
            let known = o.get_mut();
            known.locked_until = known.locked_until.max(listing.locked_until);
            if known.blobs != listing.blobs {
                let seen: HashSet<(Id, u32)> =
                    known.blobs.iter().map(|b| (b.id, b.offset)).collect();
                known.blobs.extend(
                    listing
                        .blobs
                        .into_iter()
                        .filter(|b| !seen.contains(&(b.id, b.offset))),
                );
                known.blobs.sort_by_key(|b| b.offset);
            }
        }
    }
}

/// When each pack's Object Lock ends, as far as the repository knows.
struct Locks {
    /// The store's clock less the margin: a lock ending after it holds.
    now: chrono::DateTime<chrono::Utc>,
    /// Retention of packs no index lists, from their upload time (every
    /// pack of a locked repository is uploaded with a pack retention).
    unindexed: Option<crate::repo::LockPolicy>,
}

impl Locks {
    /// The end of `pack`'s lock if it has not passed.
    fn until(
        &self,
        indexed: Option<&IndexPack>,
        stored: Option<&crate::backend::ObjectInfo>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let until = match indexed {
            Some(p) => p.locked_until,
            None => match (self.unindexed, stored) {
                (Some(policy), Some(info)) => {
                    Some(policy.pack_retention(info.modified.into()).until)
                }
                _ => None,
            },
        };
        until.filter(|u| *u > self.now)
    }
}

fn note_locked(report: &mut PruneReport, until: chrono::DateTime<chrono::Utc>, bytes: u64) {
    report.packs_locked += 1;
    report.bytes_locked += bytes;
    let until = until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if report.next_unlock.as_ref().is_none_or(|d| *d > until) {
        report.next_unlock = Some(until);
    }
}

/// Runs both phases of prune. With a zero grace period the plan written by
/// this run is executed by this run too (safe only when no backup runs).
pub fn prune(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    repo.require_full_key("prune")?;
    let mut report = prune_once(repo, opts)?;
    let temp = report.temp_files_removed;
    if opts.grace.is_zero() && !opts.dry_run && report.packs_condemned > 0 {
        let second = prune_once(repo, opts)?;
        report.packs_deleted += second.packs_deleted;
        report.bytes_deleted += second.bytes_deleted;
        report.packs_spared += second.packs_spared;
        report.plans_waiting = second.plans_waiting;
        report.next_deletion_after = second.next_deletion_after;
        report.packs_total = second.packs_total;
        report.packs_locked = second.packs_locked;
        report.bytes_locked = second.bytes_locked;
        report.next_unlock = second.next_unlock;
        report.temp_files_removed = temp + second.temp_files_removed;
    }
    Ok(report)
}

fn prune_once(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    let mut report = PruneReport::default();
    let backend = repo.backend();
    let now = storage_now(repo)?;
    let locks = Locks {
        now: less_margin(now),
        unindexed: repo.lock_policy(),
    };

    // Load the index files individually: we rewrite them. An index object
    // is retained as long as the shortest-locked pack it lists (see
    // `backup`), so it stays while that lock has not ended.
    let roots: Vec<Id> = repo.snapshots()?.into_iter().map(|(_, s)| s.tree).collect();
    let index_ids = repo.list_ids("index")?;
    let mut index_packs: HashMap<Id, IndexPack> = HashMap::new();
    let mut index_locked: HashSet<Id> = HashSet::new();
    let mut index = crate::index::IndexBuilder::new();
    for id in &index_ids {
        let file: IndexFile = repo.load_json("index", id)?;
        index.add_file(&file);
        let shortest = file.packs.iter().map(|p| p.locked_until).min().flatten();
        if shortest.is_some_and(|u| u > locks.now) {
            index_locked.insert(*id);
        }
        for p in file.packs {
            merge_listing(&mut index_packs, p);
        }
    }
    let stored: HashMap<Id, crate::backend::ObjectInfo> = repo.stored_packs()?;
    report.packs_total = stored.len();

    let index = index.build();
    let used = used_blobs(&index, repo, roots)?;

    // Phase two: execute plans past their grace period.
    let mut plans: Vec<(Id, PrunePlan, SystemTime)> = Vec::new();
    for info in backend.list("pending/")? {
        let Some(id) = info
            .key
            .rsplit('/')
            .next()
            .and_then(|n| n.parse::<Id>().ok())
        else {
            continue;
        };
        let plan: PrunePlan = repo.load_json("pending", &id)?;
        plans.push((id, plan, info.modified));
    }
    let mut condemned_all: HashSet<Id> = HashSet::new();
    let mut matured: HashSet<Id> = HashSet::new();
    for (id, plan, written) in &plans {
        let age = now.duration_since(*written).unwrap_or_default();
        condemned_all.extend(plan.packs.iter().copied());
        if age >= PLAN_RETENTION && !opts.dry_run {
            backend.delete(&format!("pending/{id}"))?;
            continue;
        }
        if age >= opts.grace {
            matured.extend(
                plan.packs
                    .iter()
                    .copied()
                    .filter(|p| stored.contains_key(p)),
            );
        } else {
            report.plans_waiting += 1;
            let due: chrono::DateTime<chrono::Utc> = (*written + opts.grace).into();
            let due = due.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            if report.next_deletion_after.as_ref().is_none_or(|d| *d > due) {
                report.next_deletion_after = Some(due);
            }
        }
    }
    // A matured pack is still needed if it holds a used blob with no copy
    // in a pack that stays.
    let survivors: HashSet<Id> = stored
        .keys()
        .filter(|p| !matured.contains(p))
        .copied()
        .collect();
    let mut available: HashSet<Id> = HashSet::new();
    for p in index_packs.values().filter(|p| survivors.contains(&p.id)) {
        available.extend(p.blobs.iter().map(|b| b.id));
    }
    let mut to_delete = Vec::new();
    for pack in &matured {
        if let Some(until) = locks.until(index_packs.get(pack), stored.get(pack)) {
            note_locked(&mut report, until, stored.get(pack).map_or(0, |o| o.size));
            continue;
        }
        let needed = index_packs
            .get(pack)
            .map(|p| {
                p.blobs
                    .iter()
                    .any(|b| used.contains(&b.id) && !available.contains(&b.id))
            })
            .unwrap_or(false);
        if needed {
            report.packs_spared += 1;
        } else {
            to_delete.push(*pack);
        }
    }
    let deleting: HashSet<Id> = to_delete.iter().copied().collect();

    // Phase one: condemn what no snapshot needs, among packs not already condemned.
    let mut located: HashMap<Id, Id> = HashMap::new();
    for p in index_packs.values() {
        if deleting.contains(&p.id) || !stored.contains_key(&p.id) {
            continue;
        }
        for b in &p.blobs {
            located.entry(b.id).or_insert(p.id);
        }
    }
    let mut newly_condemned = Vec::new();
    let mut to_repack: Vec<&IndexPack> = Vec::new();
    // With no grace period the caller promises no backup is running.
    let min_age = if opts.grace.is_zero() {
        Duration::ZERO
    } else {
        opts.min_pack_age
    };
    for (pack_id, info) in &stored {
        if condemned_all.contains(pack_id) || deleting.contains(pack_id) {
            continue;
        }
        let old_enough = now.duration_since(info.modified).unwrap_or_default() >= min_age;
        let locked = locks.until(index_packs.get(pack_id), Some(info));
        match index_packs.get(pack_id) {
            None => {
                if let (true, Some(until)) = (old_enough, locked) {
                    note_locked(&mut report, until, info.size);
                } else if old_enough {
                    newly_condemned.push(*pack_id);
                    report.bytes_condemned += info.size;
                } else {
                    report.packs_too_young += 1;
                }
            }
            Some(p) => {
                let total: u64 = p.blobs.iter().map(|b| b.length as u64).sum();
                let live: u64 = p
                    .blobs
                    .iter()
                    .filter(|b| used.contains(&b.id) && located.get(&b.id) == Some(pack_id))
                    .map(|b| b.length as u64)
                    .sum();
                if live == 0 && !old_enough {
                    report.packs_too_young += 1;
                } else if let (0, Some(until)) = (live, locked) {
                    note_locked(&mut report, until, info.size);
                } else if live == 0 {
                    newly_condemned.push(*pack_id);
                    report.bytes_condemned += info.size;
                } else {
                    report.packs_used += 1;
                    if total > 0
                        && (total - live) as f64 / total as f64 > opts.max_unused
                        && locked.is_none()
                    {
                        to_repack.push(p);
                    }
                }
            }
        }
    }
    if !opts.dry_run {
        report.temp_files_removed =
            backend.remove_stale_temp_files(min_age.max(Duration::from_secs(3600)), now)?;
    }
    if opts.dry_run {
        report.packs_condemned = newly_condemned.len() + to_repack.len();
        report.packs_repacked = to_repack.len();
        report.packs_deleted = to_delete.len();
        report.bytes_deleted = to_delete
            .iter()
            .filter_map(|p| stored.get(p))
            .map(|o| o.size)
            .sum();
        return Ok(report);
    }

    // Repack: copy live frames verbatim (no recompression) into new packs.
    // The new packs and their index object share one retention, so the
    // index object never outlives a pack's recorded lock.
    let retention = repo
        .lock_policy()
        .map(|l| l.pack_retention(chrono::Utc::now()));
    let mut new_packs: Vec<IndexPack> = Vec::new();
    for kind in [BlobKind::Data, BlobKind::Tree] {
        let mut builder = PackBuilder::new(kind, 0);
        for old in to_repack.iter().filter(|p| p.kind == kind) {
            let plain = repo.read_pack(&old.id)?;
            let header = parse_pack(&plain)
                .map_err(|e| Error::corrupt(format!("pack {}", old.id.short()), e))?;
            for b in header
                .blobs
                .iter()
                .filter(|b| used.contains(&b.id) && located.get(&b.id) == Some(&old.id))
            {
                let frame = &plain[b.offset as usize..(b.offset + b.length) as usize];
                builder.add(b.id, b.raw_length, frame);
                if builder.len() >= repo.config().pack_size as usize {
                    new_packs.push(write_pack(
                        repo,
                        std::mem::replace(&mut builder, PackBuilder::new(kind, 0)),
                        retention.as_ref(),
                    )?);
                }
            }
            newly_condemned.push(old.id);
            report.bytes_condemned += old.size;
            report.packs_repacked += 1;
        }
        if !builder.is_empty() {
            new_packs.push(write_pack(repo, builder, retention.as_ref())?);
        }
    }
    if !new_packs.is_empty() {
        repo.save_json_retained(
            "index",
            &IndexFile {
                version: 1,
                packs: new_packs.clone(),
            },
            retention.as_ref(),
        )?;
    }
    if !newly_condemned.is_empty() {
        newly_condemned.sort();
        let plan = PrunePlan {
            version: 1,
            created: chrono::Utc::now(),
            host: crate::fsmeta::hostname(),
            packs: newly_condemned.clone(),
        };
        repo.save_json("pending", &plan)?;
        report.packs_condemned = newly_condemned.len();
        report.plans_waiting += 1;
        let due: chrono::DateTime<chrono::Utc> = (now + opts.grace).into();
        let due = due.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        if report.next_deletion_after.as_ref().is_none_or(|d| *d > due) {
            report.next_deletion_after = Some(due);
        }
    }

    // Execute deletions: consolidated index first, then old index objects,
    // then the packs. A crash in between leaves unindexed packs, which a
    // later prune condemns again.
    if !to_delete.is_empty() {
        let keep: Vec<IndexPack> = index_packs
            .values()
            .filter(|p| !deleting.contains(&p.id) && stored.contains_key(&p.id))
            .cloned()
            .collect();
        for chunk in keep.chunks(1000) {
            repo.save_json(
                "index",
                &IndexFile {
                    version: 1,
                    packs: chunk.to_vec(),
                },
            )?;
        }
        for id in index_ids.iter().filter(|id| !index_locked.contains(id)) {
            backend.delete(&format!("index/{id}"))?;
        }
        for pack in &to_delete {
            if let Some(info) = stored.get(pack) {
                report.bytes_deleted += info.size;
            }
            backend.delete(&pack_key(pack))?;
            report.packs_deleted += 1;
        }
    }
    Ok(report)
}

fn write_pack(
    repo: &Repository,
    builder: PackBuilder,
    retention: Option<&crate::backend::Retention>,
) -> Result<IndexPack> {
    let kind = builder.kind();
    let (plain, header) = builder.finish();
    let ct = repo.recipients().encrypt(&plain);
    let id = Id::of_bytes(&ct);
    let size = ct.len() as u64;
    repo.put_object(&pack_key(&id), ct, retention)?;
    Ok(IndexPack {
        locked_until: retention.map(|r| r.until),
        id,
        kind,
        size,
        blobs: header.blobs,
    })
}
