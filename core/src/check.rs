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

use crate::error::Result;
use crate::id::Id;
use crate::index::{Index, IndexFile};
use crate::pack::{decode_blob, parse_pack};
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
    /// Problems found. Empty means the repository is healthy.
    pub errors: Vec<String>,
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

    // Indexes.
    let mut index = crate::index::IndexBuilder::new();
    let mut index_packs: HashMap<Id, crate::index::IndexPack> = HashMap::new();
    for id in repo.list_ids("index")? {
        match repo.load_json::<IndexFile>("index", &id) {
            Ok(file) => {
                index.add_file(&file);
                for p in file.packs {
                    index_packs.entry(p.id).or_insert(p);
                }
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    let index = index.build();
    report.packs = index_packs.len();

    // Packs against storage.
    let stored: HashMap<Id, u64> = repo
        .stored_packs()?
        .into_iter()
        .map(|(id, o)| (id, o.size))
        .collect();
    let mut bad_blobs: HashMap<Id, String> = HashMap::new();
    let mark_pack = |bad: &mut HashMap<Id, String>, pack: &Id, why: &str| {
        if let Some(p) = index_packs.get(pack) {
            for b in &p.blobs {
                bad.entry(b.id)
                    .or_insert_with(|| format!("pack {} {why}", pack.short()));
            }
        }
    };
    for (id, p) in &index_packs {
        match stored.get(id) {
            None => {
                report
                    .errors
                    .push(format!("pack {} is missing from storage", id.short()));
                mark_pack(&mut bad_blobs, id, "is missing");
            }
            Some(&size) if size != p.size => {
                report.errors.push(format!(
                    "pack {} has {size} bytes, the index says {} (truncated or altered)",
                    id.short(),
                    p.size
                ));
                mark_pack(&mut bad_blobs, id, "has the wrong size");
            }
            _ => {}
        }
    }
    report.unindexed_packs = stored
        .keys()
        .filter(|id| !index_packs.contains_key(id))
        .count();

    // Snapshots and trees.
    let mut snapshots: Vec<(Id, Snapshot)> = Vec::new();
    for id in repo.list_ids("snapshots")? {
        match repo.load_json::<Snapshot>("snapshots", &id) {
            Ok(s) => snapshots.push((id, s)),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    report.snapshots = snapshots.len();
    let mut seen_trees: HashSet<Id> = HashSet::new();
    let mut bad_trees: HashMap<Id, String> = HashMap::new();
    let mut missing_blobs: HashSet<Id> = HashSet::new();
    for (_, snap) in &snapshots {
        let mut stack = vec![snap.tree];
        while let Some(t) = stack.pop() {
            if !seen_trees.insert(t) {
                continue;
            }
            match repo.load_tree(&index, &t) {
                Ok(tree) => {
                    for n in tree.nodes {
                        match n.kind {
                            NodeKind::Dir => stack.extend(n.subtree),
                            NodeKind::File => {
                                for b in n.content {
                                    if !index.contains(&b) && missing_blobs.insert(b) {
                                        report.errors.push(format!(
                                            "data blob {} is not in any index",
                                            b.short()
                                        ));
                                    }
                                }
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

    // Pack contents.
    if opts.read_data {
        let mut packs: Vec<Id> = index_packs
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
        let results = Mutex::new((
            Vec::<String>::new(),
            HashMap::<Id, String>::new(),
            0usize,
            0usize,
        ));
        let _ = crate::parallel::map(
            packs,
            crate::parallel::pack_threads(repo.backend()),
            |pack_id| {
                let (errs, bad, verified) = verify_pack(repo, &pack_id, index_packs.get(&pack_id));
                let mut r = results.lock().expect("poisoned");
                r.0.extend(errs);
                r.1.extend(bad);
                r.2 += verified;
                r.3 += 1;
            },
        );
        let (errs, bad, verified, read) = results.into_inner().expect("poisoned");
        report.errors.extend(errs);
        for (k, v) in bad {
            bad_blobs.entry(k).or_insert(v);
        }
        report.blobs_verified = verified;
        report.packs_read = read;
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
                &index,
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
    if let Some(why) = damaged(root) {
        out.push(Affected {
            snapshot,
            path: "/".into(),
            reason: why.clone(),
        });
        return;
    }
    let mut stack: Vec<(Id, String)> = vec![(*root, String::new())];
    while let Some((t, prefix)) = stack.pop() {
        let Ok(tree) = repo.load_tree(index, &t) else {
            continue;
        };
        for n in tree.nodes {
            let path = format!("{prefix}/{}", n.name.lossy());
            match n.kind {
                NodeKind::Dir => {
                    if let Some(sub) = n.subtree {
                        if let Some(why) = damaged(&sub) {
                            out.push(Affected {
                                snapshot: snapshot.clone(),
                                path: format!("{path}/"),
                                reason: why.clone(),
                            });
                        } else {
                            stack.push((sub, path));
                        }
                    }
                }
                NodeKind::File => {
                    if let Some(why) = n.content.iter().find_map(|b| bad_blobs.get(b)) {
                        out.push(Affected {
                            snapshot: snapshot.clone(),
                            path,
                            reason: why.clone(),
                        });
                    }
                }
                _ => {}
            }
        }
    }
}
