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
//! Nothing prune reads from the repository is believed for more than its
//! signer vouches (`provenance`). What a snapshot needs is the union of
//! every listing, trusted or not, and of every snapshot that can be read,
//! believed or not: a listing or a snapshot can only ever keep data, never
//! be a reason to delete it. But a blob counts as *available elsewhere*
//! (so that a pack holding it may go) only at a location a full-key host
//! vouched for, and repacking copies only frames whose plaintext it has
//! checked against their keyed IDs. So no listing a writer forges, naming
//! live blobs in some other pack, can make prune condemn the real one.
//! Only plans the admin key signed are executed or respected.
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
use crate::index::{merge_listing, IndexFile, IndexPack};
use crate::object::{ObjectKind, Rejected};
use crate::pack::{parse_pack, BlobKind, PackBuilder};
use crate::provenance::IndexTrust;
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
    /// Objects that did not verify (snapshots, index objects, plans): they
    /// were used for nothing but keeping what they name, and not deleted.
    pub untrusted: Vec<Rejected>,
    /// Packs that could not be repacked because a live blob in them did not
    /// verify (`check --read-data` says more): they were kept.
    pub repack_refused: Vec<String>,
    /// Trees verified snapshots need that could not be read (damaged, or
    /// listed nowhere), and so kept nothing below them.
    pub unreadable_trees: Vec<String>,
}

/// The plans a backup must respect: those the admin key signed (every
/// plan of a format-2 repository), and the union of their packs. A plan
/// that does not verify is skipped with a warning: a writer cannot stop
/// every backup with a forged plan.
pub(crate) fn condemned_packs(repo: &Repository) -> Result<(HashSet<Id>, HashSet<Id>)> {
    let mut plans = HashSet::new();
    let mut packs = HashSet::new();
    for (id, info) in repo.list_objects(ObjectKind::Plan)? {
        match load_plan(repo, &id, info.size) {
            Ok(plan) => {
                packs.extend(plan.packs);
                plans.insert(id);
            }
            Err(e @ Error::Backend(_)) => return Err(e),
            Err(e) => log::warn!("{e}"),
        }
    }
    Ok((plans, packs))
}

/// Reads a plan, which only a full-key host writes.
fn load_plan(repo: &Repository, id: &Id, size: u64) -> Result<PrunePlan> {
    repo.load_admin_listed(ObjectKind::Plan, id, Some(size))
}

/// Fails if a plan not in `seen` condemns one of `packs` (see module docs).
pub(crate) fn check_no_new_condemnation(
    repo: &Repository,
    seen: &HashSet<Id>,
    packs: &HashSet<Id>,
) -> Result<()> {
    for (id, info) in repo.list_objects(ObjectKind::Plan)? {
        if seen.contains(&id) {
            continue;
        }
        let plan = match load_plan(repo, &id, info.size) {
            Ok(plan) => plan,
            Err(e @ Error::Backend(_)) => return Err(e),
            Err(e) => {
                log::warn!("{e}");
                continue;
            }
        };
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
/// Fails if the store fails: pruning on an incomplete picture could delete
/// live data. A tree that is damaged or listed nowhere is skipped (what
/// only it leads to cannot be restored through it anyway, and a writer
/// must not be able to stop prune with a snapshot of a tree it never
/// stored); `unreadable` collects why. The roots must be listed *before*
/// `index` is loaded:
/// a snapshot is written after its index objects, so every snapshot listed
/// first has its blobs in an index loaded after (a snapshot that a backup
/// commits in between is covered by the plan protocol instead). A tree
/// shared by many directories (or a hostile tree graph) is read once.
pub fn used_blobs(
    index: &crate::index::Index,
    repo: &Repository,
    roots: Vec<Id>,
    unreadable: &mut Vec<String>,
) -> Result<HashSet<Id>> {
    let mut used = HashSet::new();
    add_used(index, repo, roots, &mut used, Some(unreadable))?;
    Ok(used)
}

/// Adds what the trees below `roots` need to `used`. A tree that cannot
/// be read is skipped, and named in `unreadable` when one is given (the
/// trees of snapshots that did not verify are not worth naming); only the
/// store failing stops prune.
fn add_used(
    index: &crate::index::Index,
    repo: &Repository,
    roots: Vec<Id>,
    used: &mut HashSet<Id>,
    mut unreadable: Option<&mut Vec<String>>,
) -> Result<()> {
    let mut stack = roots;
    while let Some(tree_id) = stack.pop() {
        if !used.insert(tree_id) {
            continue;
        }
        let tree = match repo.load_tree(index, &tree_id) {
            Ok(tree) => tree,
            Err(e @ Error::Backend(_)) => {
                return Err(Error::Invalid(format!(
                    "prune stopped: {e}; nothing was deleted"
                )))
            }
            Err(e) => {
                if let Some(list) = unreadable.as_deref_mut() {
                    list.push(format!(
                        "{e}; what only it leads to is not kept (run `lifeboat check --read-data`)"
                    ));
                }
                continue;
            }
        };
        for node in tree.nodes {
            match node.kind {
                NodeKind::Dir => stack.extend(node.subtree),
                NodeKind::File => used.extend(node.content),
                _ => {}
            }
        }
    }
    Ok(())
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
pub(crate) fn storage_now(repo: &Repository) -> Result<SystemTime> {
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

/// When each pack's Object Lock ends, as far as the repository knows.
struct Locks {
    /// The store's clock less the margin: a lock ending after it holds.
    now: chrono::DateTime<chrono::Utc>,
    /// The repository's lock policy: without one, no recorded lock is
    /// believed (a writer could otherwise pin its garbage for ever), and
    /// with one, packs no index lists are retained from their upload time.
    policy: Option<crate::repo::LockPolicy>,
}

impl Locks {
    /// The end of `pack`'s lock if it has not passed.
    fn until(
        &self,
        indexed: Option<&IndexPack>,
        stored: Option<&crate::backend::ObjectInfo>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let policy = self.policy?;
        let until = match indexed {
            Some(p) => p.locked_until,
            None => stored.map(|info| policy.pack_retention(info.modified.into()).until),
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

/// One index object as prune read it.
struct IndexObject {
    id: Id,
    trust: IndexTrust,
    /// Retained (by its recorded pack locks) past the store's "now".
    locked: bool,
}

/// What every index object says, and who vouches for it.
#[derive(Default)]
struct Listings {
    objects: Vec<IndexObject>,
    /// Per pack, the union of every listing, believed or not: what it may
    /// hold, so what may make it live.
    claims: HashMap<Id, IndexPack>,
    /// Per pack, the listings of each signer prune may relay when it
    /// consolidates: `None` for what a full-key host vouched for, `Some(h)`
    /// for host h's own.
    by_origin: HashMap<Option<String>, HashMap<Id, IndexPack>>,
    /// Index objects that could not be read at all.
    unreadable: usize,
}

impl Listings {
    /// Reads every index object. `untrusted` collects those that do not
    /// verify.
    fn load(repo: &Repository, locks: &Locks, untrusted: &mut Vec<Rejected>) -> Result<Listings> {
        let mut out = Listings::default();
        for (id, info) in repo.list_objects(ObjectKind::Index)? {
            let (file, trust) = match repo.load_index_object(&id, Some(info.size)) {
                Ok(loaded) => loaded,
                Err(e @ Error::Backend(_)) => return Err(e),
                Err(e) => {
                    out.unreadable += 1;
                    untrusted.push(Rejected {
                        object: ObjectKind::Index.key(&id),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            let shortest = file.packs.iter().map(|p| p.locked_until).min().flatten();
            let locked = locks.policy.is_some() && shortest.is_some_and(|u| u > locks.now);
            let origin = match &trust {
                IndexTrust::Vouched => Some(None),
                IndexTrust::Host(h) => Some(Some(h.clone())),
                IndexTrust::Untrusted(why) => {
                    untrusted.push(Rejected {
                        object: ObjectKind::Index.key(&id),
                        reason: why.clone(),
                    });
                    None
                }
                IndexTrust::Superseded | IndexTrust::Foreign => None,
            };
            for p in file.packs {
                if let Some(origin) = &origin {
                    merge_listing(out.by_origin.entry(origin.clone()).or_default(), p.clone());
                }
                merge_listing(&mut out.claims, p);
            }
            out.objects.push(IndexObject { id, trust, locked });
        }
        Ok(out)
    }

    /// The listings a full-key host vouched for: the only places a blob
    /// counts as available for the sake of deleting another copy.
    fn vouched(&self) -> impl Iterator<Item = &IndexPack> {
        self.by_origin
            .get(&None)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// An index to read trees with: vouched listings first, then hosts'.
    fn reader_index(&self) -> crate::index::Index {
        let mut b = crate::index::IndexBuilder::new();
        for (origin, packs) in &self.by_origin {
            let tier = if origin.is_none() { 0 } else { 1 };
            for p in packs.values() {
                b.add_pack(p, tier);
            }
        }
        b.build()
    }
}

/// The blobs the repository's snapshots need: every tree a verified
/// snapshot reaches (only the store failing stops prune), and whatever the readable
/// trees of snapshots that did not verify reach (they may keep data, never
/// stop or steer prune).
fn needed(
    repo: &Repository,
    snapshots: &crate::snapshot_list::SnapshotList,
    index: &crate::index::Index,
    report: &mut PruneReport,
) -> Result<HashSet<Id>> {
    let roots: Vec<Id> = snapshots
        .snapshots
        .iter()
        .map(|l| l.snapshot.tree)
        .collect();
    let mut used = used_blobs(index, repo, roots, &mut report.unreadable_trees)?;
    add_used(
        index,
        repo,
        snapshots.untrusted_trees.clone(),
        &mut used,
        None,
    )?;
    Ok(used)
}

/// The plans prune may execute (signed by the admin key), with the time
/// the store received each.
fn load_plans(
    repo: &Repository,
    untrusted: &mut Vec<Rejected>,
) -> Result<Vec<(Id, PrunePlan, SystemTime)>> {
    let mut plans = Vec::new();
    for (id, info) in repo.list_objects(ObjectKind::Plan)? {
        match load_plan(repo, &id, info.size) {
            Ok(plan) => plans.push((id, plan, info.modified)),
            Err(e @ Error::Backend(_)) => return Err(e),
            Err(e) => untrusted.push(Rejected {
                object: ObjectKind::Plan.key(&id),
                reason: e.to_string(),
            }),
        }
    }
    Ok(plans)
}

/// What phase two decides: the packs to delete now, and every pack any
/// plan condemns (not to be judged again by phase one).
struct Matured {
    to_delete: Vec<Id>,
    condemned_all: HashSet<Id>,
}

/// Phase two: the packs of plans past their grace period that may go.
#[allow(clippy::too_many_arguments)]
fn phase_two(
    repo: &Repository,
    opts: &PruneOptions,
    now: SystemTime,
    locks: &Locks,
    plans: &[(Id, PrunePlan, SystemTime)],
    listings: &Listings,
    stored: &HashMap<Id, crate::backend::ObjectInfo>,
    used: &HashSet<Id>,
    report: &mut PruneReport,
) -> Result<Matured> {
    let mut condemned_all: HashSet<Id> = HashSet::new();
    let mut matured: HashSet<Id> = HashSet::new();
    for (id, plan, written) in plans {
        let age = now.duration_since(*written).unwrap_or_default();
        condemned_all.extend(plan.packs.iter().copied());
        if age >= PLAN_RETENTION && !opts.dry_run {
            repo.delete_object(ObjectKind::Plan, id)?;
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
            note_due(report, *written + opts.grace);
        }
    }
    // A matured pack is still needed if it may hold a used blob with no
    // vouched-for copy in a pack that stays.
    let available: HashSet<Id> = listings
        .vouched()
        .filter(|p| stored.contains_key(&p.id) && !matured.contains(&p.id))
        .flat_map(|p| p.blobs.iter().map(|b| b.id))
        .collect();
    let mut to_delete = Vec::new();
    for pack in &matured {
        let claims = listings.claims.get(pack);
        if let Some(until) = locks.until(claims, stored.get(pack)) {
            note_locked(report, until, stored.get(pack).map_or(0, |o| o.size));
            continue;
        }
        let needed = claims.is_some_and(|p| {
            p.blobs
                .iter()
                .any(|b| used.contains(&b.id) && !available.contains(&b.id))
        });
        if needed {
            report.packs_spared += 1;
        } else {
            to_delete.push(*pack);
        }
    }
    Ok(Matured {
        to_delete,
        condemned_all,
    })
}

/// Records that a plan becomes executable at `due`.
fn note_due(report: &mut PruneReport, due: SystemTime) {
    let due: chrono::DateTime<chrono::Utc> = due.into();
    let due = due.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if report.next_deletion_after.as_ref().is_none_or(|d| *d > due) {
        report.next_deletion_after = Some(due);
    }
}

/// What phase one decides: packs to condemn as they are, and packs whose
/// live blobs are to be copied out first.
struct Condemned<'l> {
    unused: Vec<Id>,
    to_repack: Vec<(&'l IndexPack, Vec<Id>)>,
}

/// Phase one: which packs no snapshot needs, among those no plan condemns.
/// A used blob keeps the pack that may hold it unless a vouched listing
/// places it in another pack that stays (`located`).
#[allow(clippy::too_many_arguments)]
fn phase_one<'l>(
    opts: &PruneOptions,
    now: SystemTime,
    locks: &Locks,
    listings: &'l Listings,
    stored: &HashMap<Id, crate::backend::ObjectInfo>,
    used: &HashSet<Id>,
    matured: &Matured,
    report: &mut PruneReport,
) -> Condemned<'l> {
    let deleting: HashSet<Id> = matured.to_delete.iter().copied().collect();
    // One vouched-for place per blob (the smallest pack ID, so the choice
    // is the same however the listings were read).
    let mut located: HashMap<Id, Id> = HashMap::new();
    for p in listings.vouched() {
        if deleting.contains(&p.id)
            || matured.condemned_all.contains(&p.id)
            || !stored.contains_key(&p.id)
        {
            continue;
        }
        for b in &p.blobs {
            let at = located.entry(b.id).or_insert(p.id);
            *at = (*at).min(p.id);
        }
    }
    let mut out = Condemned {
        unused: Vec::new(),
        to_repack: Vec::new(),
    };
    // With no grace period the caller promises no backup is running.
    let min_age = if opts.grace.is_zero() {
        Duration::ZERO
    } else {
        opts.min_pack_age
    };
    for (pack_id, info) in stored {
        if matured.condemned_all.contains(pack_id) || deleting.contains(pack_id) {
            continue;
        }
        let old_enough = now.duration_since(info.modified).unwrap_or_default() >= min_age;
        let claims = listings.claims.get(pack_id);
        let locked = locks.until(claims, Some(info));
        let Some(p) = claims else {
            // A pack no index lists, unless an unreadable index object
            // might list it: then it is kept until `check` explains.
            if listings.unreadable > 0 {
                report.packs_used += 1;
            } else if let (true, Some(until)) = (old_enough, locked) {
                note_locked(report, until, info.size);
            } else if old_enough {
                out.unused.push(*pack_id);
                report.bytes_condemned += info.size;
            } else {
                report.packs_too_young += 1;
            }
            continue;
        };
        let total: u64 = p.blobs.iter().map(|b| b.length as u64).sum();
        let live: Vec<&crate::pack::PackEntry> = p
            .blobs
            .iter()
            .filter(|b| used.contains(&b.id) && located.get(&b.id).is_none_or(|at| at == pack_id))
            .collect();
        let live_bytes: u64 = live.iter().map(|b| b.length as u64).sum();
        if live.is_empty() && !old_enough {
            report.packs_too_young += 1;
        } else if let (true, Some(until)) = (live.is_empty(), locked) {
            note_locked(report, until, info.size);
        } else if live.is_empty() {
            out.unused.push(*pack_id);
            report.bytes_condemned += info.size;
        } else {
            report.packs_used += 1;
            if total > 0
                && (total - live_bytes) as f64 / total as f64 > opts.max_unused
                && locked.is_none()
            {
                let mut ids: Vec<Id> = live.iter().map(|b| b.id).collect();
                ids.sort();
                ids.dedup();
                out.to_repack.push((p, ids));
            }
        }
    }
    out
}

fn prune_once(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    let mut report = PruneReport::default();
    let now = storage_now(repo)?;
    let locks = Locks {
        now: less_margin(now),
        policy: repo.lock_policy(),
    };
    // Snapshots are listed before the index is read (see `used_blobs`).
    let snapshots = repo.snapshots()?;
    report.untrusted.extend(snapshots.rejected.iter().cloned());
    let listings = Listings::load(repo, &locks, &mut report.untrusted)?;
    let stored: HashMap<Id, crate::backend::ObjectInfo> = repo.stored_packs()?;
    report.packs_total = stored.len();
    let used = needed(repo, &snapshots, &listings.reader_index(), &mut report)?;
    let plans = load_plans(repo, &mut report.untrusted)?;
    let matured = phase_two(
        repo,
        opts,
        now,
        &locks,
        &plans,
        &listings,
        &stored,
        &used,
        &mut report,
    )?;
    let condemned = phase_one(
        opts,
        now,
        &locks,
        &listings,
        &stored,
        &used,
        &matured,
        &mut report,
    );
    let min_age = if opts.grace.is_zero() {
        Duration::ZERO
    } else {
        opts.min_pack_age
    };
    if opts.dry_run {
        report.packs_condemned = condemned.unused.len() + condemned.to_repack.len();
        report.packs_repacked = condemned.to_repack.len();
        report.packs_deleted = matured.to_delete.len();
        report.bytes_deleted = matured
            .to_delete
            .iter()
            .filter_map(|p| stored.get(p))
            .map(|o| o.size)
            .sum();
        return Ok(report);
    }
    report.temp_files_removed = repo
        .backend()
        .remove_stale_temp_files(min_age.max(Duration::from_secs(3600)), now)?;
    let mut newly_condemned = condemned.unused;
    newly_condemned.extend(repack(repo, &condemned.to_repack, &stored, &mut report)?);
    write_plan(repo, opts, now, newly_condemned, &mut report)?;
    execute(repo, &listings, &stored, &matured.to_delete, &mut report)?;
    Ok(report)
}

/// Copies the live blobs of `to_repack` into new packs, each frame checked
/// against its keyed ID first (a listing's word is not enough to copy on);
/// returns the packs now safe to condemn. A pack one of whose live blobs
/// does not verify is kept whole, and named in the report.
fn repack(
    repo: &Repository,
    to_repack: &[(&IndexPack, Vec<Id>)],
    stored: &HashMap<Id, crate::backend::ObjectInfo>,
    report: &mut PruneReport,
) -> Result<Vec<Id>> {
    // The new packs and their index object share one retention, so the
    // index object never outlives a pack's recorded lock.
    let retention = repo
        .lock_policy()
        .map(|l| l.pack_retention(chrono::Utc::now()));
    let mut new_packs: Vec<IndexPack> = Vec::new();
    let mut condemned = Vec::new();
    for kind in [BlobKind::Data, BlobKind::Tree] {
        let mut builder = PackBuilder::new(kind, 0);
        for (old, live) in to_repack.iter().filter(|(p, _)| p.kind == kind) {
            let frames = match verified_frames(repo, old, live) {
                Ok(frames) => frames,
                Err(e @ Error::Backend(_)) => return Err(e),
                Err(e) => {
                    log::warn!("{e}; the pack is kept as it is");
                    report.repack_refused.push(e.to_string());
                    continue;
                }
            };
            for (id, raw_length, frame) in frames {
                builder.add(id, raw_length, &frame);
                if builder.len() >= repo.config().pack_size as usize {
                    new_packs.push(write_pack(
                        repo,
                        std::mem::replace(&mut builder, PackBuilder::new(kind, 0)),
                        retention.as_ref(),
                    )?);
                }
            }
            condemned.push(old.id);
            report.bytes_condemned += stored.get(&old.id).map_or(old.size, |o| o.size);
            report.packs_repacked += 1;
        }
        if !builder.is_empty() {
            new_packs.push(write_pack(repo, builder, retention.as_ref())?);
        }
    }
    // In the admin's own name: prune checked every frame it copied.
    crate::backup::save_index(repo, new_packs, retention.as_ref())?;
    Ok(condemned)
}

/// The frames of `live` in pack `old`, each decoded and checked against
/// its keyed ID: from the pack's own header where it lists the blob, else
/// where a listing says. Fails naming the first blob no place verifies.
fn verified_frames(
    repo: &Repository,
    old: &IndexPack,
    live: &[Id],
) -> Result<Vec<(Id, u32, Vec<u8>)>> {
    let what = || format!("pack {}", old.id.short());
    let plain = repo.read_pack(&old.id)?;
    let header = parse_pack(&plain).map_err(|e| Error::corrupt(what(), e))?;
    let mut out = Vec::with_capacity(live.len());
    for id in live {
        let candidates = header
            .blobs
            .iter()
            .chain(&old.blobs)
            .filter(|b| b.id == *id);
        let found = candidates.into_iter().find_map(|b| {
            let frame = plain
                .get(b.offset as usize..(b.offset as usize).checked_add(b.length as usize)?)?;
            let data = crate::pack::decode_blob(frame, b.raw_length).ok()?;
            (repo.ids().id_for(old.kind, &data) == *id).then(|| (*id, b.raw_length, frame.to_vec()))
        });
        match found {
            Some(f) => out.push(f),
            None => {
                return Err(Error::corrupt(
                    what(),
                    format!(
                        "live blob {} does not verify anywhere it is said to be in it, so it was not repacked",
                        id.short()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// Writes the plan condemning `packs` (signed by the admin key).
fn write_plan(
    repo: &Repository,
    opts: &PruneOptions,
    now: SystemTime,
    mut packs: Vec<Id>,
    report: &mut PruneReport,
) -> Result<()> {
    if packs.is_empty() {
        return Ok(());
    }
    packs.sort();
    report.packs_condemned = packs.len();
    let plan = PrunePlan {
        version: 1,
        created: chrono::Utc::now(),
        host: crate::fsmeta::hostname(),
        packs,
    };
    repo.save(ObjectKind::Plan, &plan)?;
    report.plans_waiting += 1;
    note_due(report, now + opts.grace);
    Ok(())
}

/// Executes deletions: the consolidated index first (each signer's
/// listings relayed under its own name, so consolidation never vouches for
/// more than was vouched for), then the old index objects it replaces,
/// then the packs. Index objects that did not verify are left alone: they
/// are garbage to report, not to delete. A crash in between leaves
/// unindexed packs, which a later prune condemns again.
fn execute(
    repo: &Repository,
    listings: &Listings,
    stored: &HashMap<Id, crate::backend::ObjectInfo>,
    to_delete: &[Id],
    report: &mut PruneReport,
) -> Result<()> {
    if to_delete.is_empty() {
        return Ok(());
    }
    let deleting: HashSet<Id> = to_delete.iter().copied().collect();
    let mut origins: Vec<&Option<String>> = listings.by_origin.keys().collect();
    origins.sort();
    for origin in origins {
        let mut keep: Vec<IndexPack> = listings.by_origin[origin]
            .values()
            .filter(|p| !deleting.contains(&p.id) && stored.contains_key(&p.id))
            .cloned()
            .collect();
        keep.sort_by_key(|p| p.id);
        for file in IndexFile::split(keep, origin.as_deref()) {
            repo.save(ObjectKind::Index, &file)?;
        }
    }
    for o in &listings.objects {
        // (Superseded objects are `upgrade`'s to remove.)
        let replaced = matches!(o.trust, IndexTrust::Vouched | IndexTrust::Host(_));
        if replaced && !o.locked {
            repo.delete_object(ObjectKind::Index, &o.id)?;
        }
    }
    for pack in to_delete {
        if let Some(info) = stored.get(pack) {
            report.bytes_deleted += info.size;
        }
        repo.backend().delete(&pack_key(pack))?;
        report.packs_deleted += 1;
    }
    Ok(())
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
