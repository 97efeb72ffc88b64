//! `check`: prove the repository is whole, or say exactly what is not.
//!
//! The structural pass reads every index, snapshot and tree and confirms
//! that every blob a snapshot needs is indexed and every indexed pack is
//! stored with the recorded size. `read_data` additionally downloads packs
//! (all, or a random percentage), checks each against its name, decrypts
//! it, and decompresses and re-hashes every blob. Whatever is damaged is
//! then traced back to the snapshots and file paths that need it, so the
//! report names what a restore would lose.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Index, IndexPack};
use crate::object::ObjectKind;
use crate::pack::{decode_blob, parse_pack};
use crate::provenance::IndexTrust;
use crate::repo::Repository;
use crate::tree::{NodeKind, Snapshot};

/// What `check` reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Read and verify pack contents.
    pub read_data: bool,
    /// Read only this percentage of packs (with `read_data`).
    pub subset_percent: Option<f64>,
}

/// A file or directory a problem makes unrestorable.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Affected {
    /// Snapshot ID.
    pub snapshot: String,
    /// Path in the snapshot.
    pub path: String,
    /// What it needs that is damaged.
    pub reason: String,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Snapshots checked.
    pub snapshots: usize,
    /// Distinct trees read.
    pub trees: usize,
    /// Packs known to the index.
    pub packs: usize,
    /// Packs read and verified.
    pub packs_read: usize,
    /// Blobs decompressed and re-hashed.
    pub blobs_verified: usize,
    /// Packs stored but in no index (left by an interrupted backup; prune removes them).
    pub unindexed_packs: usize,
    /// Packs only hosts' own listings named, verified whole by this check
    /// and now vouched for (every host may dedup against them).
    pub packs_vouched: usize,
    /// Problems found, objects that do not verify among them. Empty means
    /// the repository is healthy.
    pub errors: Vec<String>,
    /// Things worth knowing that are not damage (snapshots dated in the
    /// future).
    pub warnings: Vec<String>,
    /// Files and directories affected by the problems.
    pub affected: Vec<Affected>,
}

/// Checks the repository.
pub fn check(repo: &Repository, opts: &CheckOptions) -> Result<CheckReport> {
    // A writer credential would see every snapshot as unreadable, which is
    // not damage: refuse instead of reporting it as such.
    repo.require_full_key("check")?;
    // Trees are read fresh: packs this handle decrypted earlier (a
    // long-lived agent or test) must not stand in for damaged ones.
    repo.clear_pack_cache();
    let mut report = CheckReport::default();
    for r in &repo.trust()?.rejected {
        report.errors.push(r.to_string());
    }
    check_plans(repo, &mut report)?;
    let listings = read_listings(repo, &mut report)?;
    let index = &listings.index;
    report.packs = listings.packs.len();

    // Packs against storage.
    let stored: HashMap<Id, u64> = repo
        .stored_packs()?
        .into_iter()
        .map(|(id, o)| (id, o.size))
        .collect();
    let mut bad_blobs: HashMap<Id, String> = HashMap::new();
    check_stored(&listings.packs, &stored, &mut report, &mut bad_blobs);

    // Snapshots and trees.
    let list = repo.snapshots()?;
    for r in &list.rejected {
        report.errors.push(r.to_string());
    }
    report.warnings.extend(
        list.warnings()
            .into_iter()
            .filter(|w| !w.contains(" is not trusted: ")),
    );
    let snapshots: Vec<(Id, Snapshot)> = list
        .snapshots
        .into_iter()
        .map(|l| (l.id, l.snapshot))
        .collect();
    report.snapshots = snapshots.len();
    let (bad_trees, missing_blobs) = check_trees(repo, index, &snapshots, &mut report);

    // Pack contents.
    if opts.read_data {
        read_data(repo, opts, &listings, &stored, &mut report, &mut bad_blobs);
    }

    // Trace damage to files.
    for b in &missing_blobs {
        bad_blobs
            .entry(*b)
            .or_insert_with(|| format!("blob {} is missing", b.short()));
    }
    if !bad_blobs.is_empty() || !bad_trees.is_empty() {
        for (snap_id, snap) in &snapshots {
            trace(
                repo,
                index,
                snap_id,
                &snap.tree,
                &bad_blobs,
                &bad_trees,
                &mut report.affected,
            );
        }
        report.affected.sort();
        report.affected.dedup();
    }
    report.errors.sort();
    report.errors.dedup();
    Ok(report)
}

/// Names every prune plan that does not verify (only a full-key host
/// writes plans; backups and prune ignore the others).
fn check_plans(repo: &Repository, report: &mut CheckReport) -> Result<()> {
    for (id, info) in repo.list_objects(ObjectKind::Plan)? {
        match repo.load_admin_listed::<crate::prune::PrunePlan>(
            ObjectKind::Plan,
            &id,
            Some(info.size),
        ) {
            Ok(_) => {}
            Err(e @ Error::Backend(_)) => return Err(e),
            Err(Error::Untrusted { object, reason }) => report
                .errors
                .push(format!("{object} is not trusted: {reason}")),
            Err(e) => report
                .errors
                .push(format!("{}: {e}", ObjectKind::Plan.key(&id))),
        }
    }
    Ok(())
}

/// What the index objects say, as check uses it.
struct CheckListings {
    /// Every trusted listing, for reading trees.
    index: Index,
    /// Per pack, the union of its trusted listings (prune's rule too).
    packs: HashMap<Id, IndexPack>,
    /// Packs only hosts' own listings name: `read_data` vouches for those
    /// it verifies whole.
    unvouched: HashSet<Id>,
}

/// Reads every index object; names those that cannot be read or do not
/// verify (a writer's forgeries among them) as errors.
fn read_listings(repo: &Repository, report: &mut CheckReport) -> Result<CheckListings> {
    let mut builder = crate::index::IndexBuilder::new();
    let mut packs: HashMap<Id, IndexPack> = HashMap::new();
    let mut vouched: HashSet<Id> = HashSet::new();
    for (id, info) in repo.list_objects(ObjectKind::Index)? {
        let (file, trust) = match repo.load_index_object(&id, Some(info.size)) {
            Ok(loaded) => loaded,
            Err(e @ Error::Backend(_)) => return Err(e),
            Err(e) => {
                report
                    .errors
                    .push(format!("{}: {e}", ObjectKind::Index.key(&id)));
                continue;
            }
        };
        let tier = match &trust {
            IndexTrust::Vouched => 0,
            IndexTrust::Host(_) => 1,
            IndexTrust::Superseded | IndexTrust::Foreign => continue,
            IndexTrust::Untrusted(why) => {
                report
                    .errors
                    .push(format!("index/{id} is not trusted: {why}"));
                continue;
            }
        };
        builder.add_object(id, &file, tier);
        for p in file.packs {
            if tier == 0 {
                vouched.insert(p.id);
            }
            crate::index::merge_listing(&mut packs, p);
        }
    }
    let unvouched = packs
        .keys()
        .filter(|p| !vouched.contains(p))
        .copied()
        .collect();
    Ok(CheckListings {
        index: builder.build(),
        packs,
        unvouched,
    })
}

/// Checks every listed pack against what the store holds.
fn check_stored(
    packs: &HashMap<Id, IndexPack>,
    stored: &HashMap<Id, u64>,
    report: &mut CheckReport,
    bad_blobs: &mut HashMap<Id, String>,
) {
    let mut mark_pack = |pack: &Id, why: &str| {
        if let Some(p) = packs.get(pack) {
            for b in &p.blobs {
                bad_blobs
                    .entry(b.id)
                    .or_insert_with(|| format!("pack {} {why}", pack.short()));
            }
        }
    };
    for (id, p) in packs {
        match stored.get(id) {
            None => {
                report
                    .errors
                    .push(format!("pack {} is missing from storage", id.short()));
                mark_pack(id, "is missing");
            }
            Some(&size) if size != p.size => {
                report.errors.push(format!(
                    "pack {} has {size} bytes, the index says {} (truncated or altered)",
                    id.short(),
                    p.size
                ));
                mark_pack(id, "has the wrong size");
            }
            _ => {}
        }
    }
    report.unindexed_packs = stored.keys().filter(|id| !packs.contains_key(id)).count();
}

/// Reads every tree the snapshots reach, each once (a tree many
/// directories share, or a hostile graph of trees, costs one read).
/// Returns the trees that failed and the data blobs no index lists.
fn check_trees(
    repo: &Repository,
    index: &Index,
    snapshots: &[(Id, Snapshot)],
    report: &mut CheckReport,
) -> (HashMap<Id, String>, HashSet<Id>) {
    let mut seen_trees: HashSet<Id> = HashSet::new();
    let mut bad_trees: HashMap<Id, String> = HashMap::new();
    let mut missing_blobs: HashSet<Id> = HashSet::new();
    for (_, snap) in snapshots {
        let mut stack = vec![snap.tree];
        while let Some(t) = stack.pop() {
            if !seen_trees.insert(t) {
                continue;
            }
            match repo.load_tree(index, &t) {
                Ok(tree) => {
                    for n in tree.nodes {
                        match n.kind {
                            NodeKind::Dir => stack.extend(n.subtree),
                            NodeKind::File => {
                                check_file(index, &n, report, &mut missing_blobs);
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => {
                    report.errors.push(format!("tree {}: {e}", t.short()));
                    bad_trees.insert(t, e.to_string());
                }
            }
        }
    }
    report.trees = seen_trees.len();
    (bad_trees, missing_blobs)
}

/// Checks that a file's blobs are listed and add up to its size.
fn check_file(
    index: &Index,
    n: &crate::tree::Node,
    report: &mut CheckReport,
    missing_blobs: &mut HashSet<Id>,
) {
    let mut total = 0u64;
    let mut known = true;
    for b in &n.content {
        match index.get(b) {
            Some((_, loc)) => total += loc.raw_length as u64,
            None => {
                known = false;
                if missing_blobs.insert(*b) {
                    report
                        .errors
                        .push(format!("data blob {} is not in any index", b.short()));
                }
            }
        }
    }
    if known && total != n.size {
        report.errors.push(format!(
            "file {:?} declares {} bytes but its blobs hold {total}; restore refuses it",
            n.name.lossy(),
            n.size
        ));
    }
}

/// Reads packs (all, or a random share) and verifies every blob; vouches,
/// in an index object signed by the admin key, for each pack only hosts'
/// own listings named and that verified whole, so that every host may
/// dedup against it from now on.
fn read_data(
    repo: &Repository,
    opts: &CheckOptions,
    listings: &CheckListings,
    stored: &HashMap<Id, u64>,
    report: &mut CheckReport,
    bad_blobs: &mut HashMap<Id, String>,
) {
    let mut packs: Vec<Id> = listings
        .packs
        .keys()
        .filter(|id| stored.contains_key(id))
        .copied()
        .collect();
    packs.sort();
    if let Some(pct) = opts.subset_percent {
        let pct = pct.clamp(0.0, 100.0);
        let want = ((packs.len() as f64 * pct / 100.0).ceil() as usize).min(packs.len());
        use rand::seq::SliceRandom;
        packs.shuffle(&mut rand::thread_rng());
        packs.truncate(want);
    }
    let results = Mutex::new(ReadResults::default());
    let _ = crate::parallel::map(
        packs,
        crate::parallel::pack_threads(repo.backend()),
        |pack_id| {
            let listed = listings.packs.get(&pack_id);
            let (errs, bad, verified) = verify_pack(repo, &pack_id, listed);
            let mut r = results.lock().expect("poisoned");
            if errs.is_empty() && bad.is_empty() && listings.unvouched.contains(&pack_id) {
                r.to_vouch.extend(listed.cloned());
            }
            r.errors.extend(errs);
            r.bad.extend(bad);
            r.verified += verified;
            r.read += 1;
        },
    );
    let r = results.into_inner().expect("poisoned");
    report.errors.extend(r.errors);
    for (k, v) in r.bad {
        bad_blobs.entry(k).or_insert(v);
    }
    report.blobs_verified = r.verified;
    report.packs_read = r.read;
    if repo.config().version >= 3 && !r.to_vouch.is_empty() {
        let n = r.to_vouch.len();
        match crate::backup::save_index(repo, r.to_vouch, None) {
            Ok(_) => report.packs_vouched = n,
            Err(e) => report.warnings.push(format!(
                "could not record that {n} verified pack(s) are vouched for: {e}"
            )),
        }
    }
}

/// What the pack readers found.
#[derive(Default)]
struct ReadResults {
    errors: Vec<String>,
    bad: HashMap<Id, String>,
    verified: usize,
    read: usize,
    to_vouch: Vec<IndexPack>,
}

/// Reads one pack and verifies every blob in it. Returns errors, damaged
/// blobs with reasons, and how many blobs verified.
fn verify_pack(
    repo: &Repository,
    id: &Id,
    indexed: Option<&crate::index::IndexPack>,
) -> (Vec<String>, HashMap<Id, String>, usize) {
    let mut errors = Vec::new();
    let mut bad = HashMap::new();
    let mark_all = |bad: &mut HashMap<Id, String>, why: &str| {
        if let Some(p) = indexed {
            for b in &p.blobs {
                bad.insert(b.id, format!("pack {} {why}", id.short()));
            }
        }
    };
    let pack = match repo.read_pack_salvage(id) {
        Ok(p) => p,
        Err(e) => {
            errors.push(e.to_string());
            mark_all(&mut bad, "is unreadable");
            return (errors, bad, 0);
        }
    };
    if let Some(damage) = &pack.damage {
        errors.push(damage.clone());
    }
    // The header is at the end of the pack; if it is damaged, the index
    // still says where the blobs are.
    let mut kind = indexed
        .map(|p| p.kind)
        .unwrap_or(crate::pack::BlobKind::Data);
    let header_blobs: Vec<crate::pack::PackEntry> = match parse_pack(&pack.plain) {
        Ok(h) => {
            kind = h.kind;
            h.blobs
        }
        Err(e) => {
            errors.push(format!("pack {} has a damaged header ({e})", id.short()));
            indexed.map(|p| p.blobs.clone()).unwrap_or_default()
        }
    };
    let in_header: HashMap<Id, &crate::pack::PackEntry> =
        header_blobs.iter().map(|b| (b.id, b)).collect();
    let mut verified = 0;
    if let Some(p) = indexed {
        for b in &p.blobs {
            if in_header.get(&b.id).map(|h| (h.offset, h.length)) != Some((b.offset, b.length)) {
                errors.push(format!(
                    "pack {}: blob {} is not where the index says",
                    id.short(),
                    b.id.short()
                ));
                bad.insert(
                    b.id,
                    format!("pack {} does not hold it where indexed", id.short()),
                );
            }
        }
    }
    for b in &header_blobs {
        let Some(frame) = pack.frame(b.offset, b.length) else {
            bad.insert(
                b.id,
                format!("blob {} in pack {} is corrupt", b.id.short(), id.short()),
            );
            continue;
        };
        match decode_blob(frame, b.raw_length) {
            Ok(data) if repo.ids().id_for(kind, &data) == b.id => verified += 1,
            Ok(_) => {
                errors.push(format!(
                    "pack {}: blob {} does not match its ID",
                    id.short(),
                    b.id.short()
                ));
                bad.insert(
                    b.id,
                    format!("blob {} in pack {} is corrupt", b.id.short(), id.short()),
                );
            }
            Err(e) => {
                errors.push(format!("pack {}: blob {}: {e}", id.short(), b.id.short()));
                bad.insert(
                    b.id,
                    format!("blob {} in pack {} is corrupt", b.id.short(), id.short()),
                );
            }
        }
    }
    (errors, bad, verified)
}

/// Affected paths named per snapshot at most: a damaged tree that many
/// directories share (or a hostile graph of trees) would otherwise name
/// exponentially many.
const MAX_AFFECTED: usize = 10_000;

/// Names the paths of one snapshot that the damage makes unrestorable,
/// descending only into trees below which there is damage.
fn trace(
    repo: &Repository,
    index: &Index,
    snap_id: &Id,
    root: &Id,
    bad_blobs: &HashMap<Id, String>,
    bad_trees: &HashMap<Id, String>,
    out: &mut Vec<Affected>,
) {
    let snapshot = snap_id.short();
    // A tree is damaged if it failed to load or if reading its pack found
    // its frame damaged.
    let damaged = |t: &Id| bad_trees.get(t).or_else(|| bad_blobs.get(t));
    let leads = trees_leading_to_damage(repo, index, root, &damaged, bad_blobs);
    let mut named = 0usize;
    let mut push = |out: &mut Vec<Affected>, path: String, reason: &String| {
        named += 1;
        if named <= MAX_AFFECTED {
            out.push(Affected {
                snapshot: snapshot.clone(),
                path,
                reason: reason.clone(),
            });
        }
        named < MAX_AFFECTED
    };
    if let Some(why) = damaged(root) {
        push(out, "/".into(), why);
        return;
    }
    let mut stack: Vec<(Id, String)> = vec![(*root, String::new())];
    while let Some((t, prefix)) = stack.pop() {
        let Ok(tree) = repo.load_tree(index, &t) else {
            continue;
        };
        for n in tree.nodes {
            let path = format!("{prefix}/{}", n.name.lossy());
            let more = match (n.kind, n.subtree) {
                (NodeKind::Dir, Some(sub)) => match damaged(&sub) {
                    Some(why) => push(out, format!("{path}/"), why),
                    None => {
                        if leads.get(&sub) == Some(&true) {
                            stack.push((sub, path));
                        }
                        true
                    }
                },
                (NodeKind::File, _) => match n.content.iter().find_map(|b| bad_blobs.get(b)) {
                    Some(why) => push(out, path, why),
                    None => true,
                },
                _ => true,
            };
            if !more {
                out.push(Affected {
                    snapshot: snapshot.clone(),
                    path: "…".into(),
                    reason: format!(
                        "more than {MAX_AFFECTED} paths are affected; only the first are named"
                    ),
                });
                return;
            }
        }
    }
}

/// A tree once read: whether its own files are damaged, and its subtrees.
type Expanded = (bool, Vec<Id>);

/// For every tree below `root`, whether damage lies below it: each tree
/// is read once, however many directories share it.
fn trees_leading_to_damage<'a>(
    repo: &Repository,
    index: &Index,
    root: &Id,
    damaged: &dyn Fn(&Id) -> Option<&'a String>,
    bad_blobs: &HashMap<Id, String>,
) -> HashMap<Id, bool> {
    let mut memo: HashMap<Id, bool> = HashMap::new();
    let mut stack: Vec<(Id, Option<Expanded>)> = vec![(*root, None)];
    let mut open: HashSet<Id> = HashSet::new();
    while let Some((t, expanded)) = stack.pop() {
        if memo.contains_key(&t) {
            continue;
        }
        if damaged(&t).is_some() {
            memo.insert(t, true);
            continue;
        }
        match expanded {
            Some((files_bad, subs)) => {
                let below = subs.iter().any(|s| memo.get(s) == Some(&true));
                memo.insert(t, files_bad || below);
                open.remove(&t);
            }
            None => {
                let Ok(tree) = repo.load_tree(index, &t) else {
                    memo.insert(t, true);
                    continue;
                };
                let files_bad = tree.nodes.iter().any(|n| {
                    n.kind == NodeKind::File && n.content.iter().any(|b| bad_blobs.contains_key(b))
                });
                let subs: Vec<Id> = tree
                    .nodes
                    .iter()
                    .filter(|n| n.kind == NodeKind::Dir)
                    .filter_map(|n| n.subtree)
                    .collect();
                open.insert(t);
                let pending: Vec<Id> = subs
                    .iter()
                    .filter(|s| !memo.contains_key(*s) && !open.contains(*s))
                    .copied()
                    .collect();
                stack.push((t, Some((files_bad, subs))));
                stack.extend(pending.into_iter().map(|s| (s, None)));
            }
        }
    }
    memo
}
