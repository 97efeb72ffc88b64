//! `lifeboat upgrade`: moves a format-2 repository to format 3 (signed
//! provenance), so that what its write-only hosts wrote before can be told
//! from what a stolen credential writes after.
//!
//! Nobody signed anything in format 2, so the full key vouches for it once:
//!
//! 1. every pack the (unsigned) index objects list is read and each listed
//!    blob checked against its keyed ID; what verifies is listed again in
//!    index objects signed by the admin key, a batch at a time (with
//!    `trust_existing`, the listings are re-signed unread: only for a
//!    repository no writer credential could have been stolen from);
//! 2. the snapshots are adopted: an adoption record (`adopt/`, signed by
//!    the admin key) lists their IDs, and the unsigned index objects whose
//!    listings are now signed;
//! 3. every host those snapshots name is recorded in the host registry
//!    (without a key: `key export-writer --host` gives each its key);
//! 4. the config becomes format 3, with the admin key's public half;
//! 5. the unsigned index objects now superseded are deleted (where no
//!    Object Lock holds them).
//!
//! Each step writes only new, content-named objects until the config, and
//! the config is replaced atomically, so an interrupted upgrade leaves a
//! valid format-2 repository (format-2 readers ignore signatures and
//! records), and running it again resumes: packs already vouched for,
//! snapshots already adopted and hosts already registered are skipped.
//! Once the config is format 3 only objects the store received before it
//! are adopted, so nothing a writer puts later can slip in this way.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{merge_listing, IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::pack::{decode_blob, PackEntry};
use crate::provenance::{AdoptionRecord, IndexTrust};
use crate::repo::Repository;

/// How to upgrade.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpgradeOptions {
    /// Say what would be done; write nothing.
    pub dry_run: bool,
    /// Re-sign the existing listings without reading the packs.
    pub trust_existing: bool,
}

/// What `upgrade` did (or would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpgradeReport {
    /// The format the repository had.
    pub from_version: u32,
    /// The format it has now (or would have).
    pub to_version: u32,
    /// Packs read and vouched for now.
    pub packs_vouched: usize,
    /// Packs listed but not stored, or whose listed blobs did not all
    /// verify (those blobs were not vouched for), with why.
    pub packs_failed: Vec<String>,
    /// Snapshots adopted now.
    pub snapshots_adopted: usize,
    /// Snapshot objects that could not be read, so not adopted.
    pub snapshots_failed: Vec<String>,
    /// Host names registered now.
    pub hosts_registered: Vec<String>,
    /// Unsigned index objects superseded now.
    pub index_superseded: usize,
    /// Superseded index objects deleted.
    pub index_deleted: usize,
    /// The config was rewritten as format 3.
    pub config_upgraded: bool,
}

/// Packs vouched for per signed index object written as the upgrade goes
/// (so an interrupted upgrade keeps what it checked).
const PACKS_PER_BATCH: usize = 64;

/// Upgrades the repository (full key only): see the module docs.
pub fn upgrade(repo: &Repository, opts: &UpgradeOptions) -> Result<UpgradeReport> {
    repo.require_full_key("upgrade")?;
    let version = repo.config().version;
    if version < 2 {
        return Err(Error::Invalid(format!(
            "repository {} is format 1, which predates writer credentials; it keeps working as it is, and cannot move to format 3: create a new repository and back up into it to use write-only hosts",
            &repo.config().id[..8]
        )));
    }
    let mut report = UpgradeReport {
        from_version: version,
        to_version: crate::repo::FORMAT_VERSION,
        ..UpgradeReport::default()
    };
    // After the switch, only what the store received before it.
    let cutoff = match version {
        3 => Some(repo.backend().stat("config")?.modified),
        _ => None,
    };
    let before = |info: &crate::backend::ObjectInfo| cutoff.is_none_or(|c| info.modified < c);
    let legacy = legacy_index(repo, &before)?;
    vouch(repo, opts, &legacy, &mut report)?;
    let adopted = adopt(repo, opts, &legacy, &before, &mut report)?;
    register(repo, opts, &adopted, &mut report)?;
    if version == 2 && !opts.dry_run {
        repo.write_upgraded_config()?;
        report.config_upgraded = true;
    }
    if !opts.dry_run {
        for id in &legacy.objects {
            match repo.delete_object(ObjectKind::Index, id) {
                Ok(()) => report.index_deleted += 1,
                Err(e) => log::warn!("the superseded index/{id} stays: {e}"),
            }
        }
    }
    Ok(report)
}

/// The unsigned index objects (written before the switch) and the union
/// of their listings, and the packs already vouched for by signed ones.
struct Legacy {
    objects: Vec<Id>,
    packs: HashMap<Id, IndexPack>,
    vouched: HashSet<Id>,
}

fn legacy_index(
    repo: &Repository,
    before: &dyn Fn(&crate::backend::ObjectInfo) -> bool,
) -> Result<Legacy> {
    let mut out = Legacy {
        objects: Vec::new(),
        packs: HashMap::new(),
        vouched: HashSet::new(),
    };
    for (id, info) in repo.list_objects(ObjectKind::Index)? {
        let raw = match repo.read_object(ObjectKind::Index, &id, Some(info.size)) {
            Ok(raw) => raw,
            Err(e @ Error::Backend(_)) => return Err(e),
            Err(e) => {
                log::warn!("{e}; its listings are not vouched for");
                continue;
            }
        };
        let file: IndexFile = raw.parse()?;
        if raw.signature.is_some() {
            // Judged by signature even before the switch: a forged frame
            // must not make a pack look vouched for, and so skipped.
            if matches!(signed_trust(repo, &raw, &file), IndexTrust::Vouched) {
                out.vouched.extend(file.packs.iter().map(|p| p.id));
            }
            continue;
        }
        if !before(&info) {
            continue;
        }
        out.objects.push(id);
        for p in file.packs {
            merge_listing(&mut out.packs, p);
        }
    }
    Ok(out)
}

/// The trust of a signed index object (as a format-3 reader judges it).
fn signed_trust(repo: &Repository, raw: &crate::repo::RawObject, file: &IndexFile) -> IndexTrust {
    crate::provenance::judge_index(file.origin.as_deref(), repo.signer_of(raw), false, false)
}

/// Step 1: reads every legacy-listed pack not yet vouched for and writes
/// signed listings of what verifies.
fn vouch(
    repo: &Repository,
    opts: &UpgradeOptions,
    legacy: &Legacy,
    report: &mut UpgradeReport,
) -> Result<()> {
    let stored = repo.stored_packs()?;
    let mut todo: Vec<&IndexPack> = legacy
        .packs
        .values()
        .filter(|p| !legacy.vouched.contains(&p.id))
        .collect();
    todo.sort_by_key(|p| p.id);
    let mut batch = Vec::new();
    for p in todo {
        if !stored.contains_key(&p.id) {
            report
                .packs_failed
                .push(format!("pack {} is listed but not stored", p.id.short()));
            continue;
        }
        if opts.dry_run {
            report.packs_vouched += 1;
            continue;
        }
        let listing = if opts.trust_existing {
            p.clone()
        } else {
            match verified_listing(repo, p) {
                Ok(listing) => listing,
                Err(e @ Error::Backend(_)) => return Err(e),
                Err(e) => {
                    report.packs_failed.push(e.to_string());
                    continue;
                }
            }
        };
        if listing.blobs.len() < p.blobs.len() {
            report.packs_failed.push(format!(
                "pack {}: {} of its {} listed blobs do not verify and are not vouched for",
                p.id.short(),
                p.blobs.len() - listing.blobs.len(),
                p.blobs.len()
            ));
        }
        batch.push(listing);
        report.packs_vouched += 1;
        if batch.len() >= PACKS_PER_BATCH {
            save_vouched(repo, std::mem::take(&mut batch))?;
        }
    }
    save_vouched(repo, batch)
}

/// Writes listings signed by the admin key, whatever the config's format
/// says yet (the signature is what makes them count once it is format 3).
fn save_vouched(repo: &Repository, packs: Vec<IndexPack>) -> Result<()> {
    for file in IndexFile::split(packs, None) {
        repo.save_signed_by_admin(ObjectKind::Index, &file)?;
    }
    Ok(())
}

/// The entries of `p` that verify: the pack's bytes checked against its
/// name, each listed frame decoded and checked against its keyed ID.
fn verified_listing(repo: &Repository, p: &IndexPack) -> Result<IndexPack> {
    let pack = repo.read_pack_salvage(&p.id)?;
    let verifies = |b: &PackEntry| {
        pack.frame(b.offset, b.length)
            .and_then(|frame| decode_blob(frame, b.raw_length).ok())
            .is_some_and(|data| repo.ids().id_for(p.kind, &data) == b.id)
    };
    let blobs: Vec<PackEntry> = p.blobs.iter().filter(|b| verifies(b)).copied().collect();
    Ok(IndexPack { blobs, ..p.clone() })
}

/// Step 2: adopts the unsigned snapshots and supersedes the legacy index
/// objects. Returns the host names of every adopted snapshot.
fn adopt(
    repo: &Repository,
    opts: &UpgradeOptions,
    legacy: &Legacy,
    before: &dyn Fn(&crate::backend::ObjectInfo) -> bool,
    report: &mut UpgradeReport,
) -> Result<BTreeSet<String>> {
    let trust = repo.trust()?;
    let mut record = AdoptionRecord {
        version: 1,
        ..AdoptionRecord::default()
    };
    let mut hosts = BTreeSet::new();
    for (id, info) in repo.list_objects(ObjectKind::Snapshot)? {
        if !before(&info) {
            continue;
        }
        let raw = match repo.read_object(ObjectKind::Snapshot, &id, Some(info.size)) {
            Ok(raw) => raw,
            Err(e @ Error::Backend(_)) => return Err(e),
            Err(e) => {
                report.snapshots_failed.push(e.to_string());
                continue;
            }
        };
        if raw.signature.is_some() {
            continue;
        }
        match raw.parse::<crate::tree::Snapshot>() {
            Ok(s) => {
                hosts.insert(s.host);
            }
            Err(e) => {
                report.snapshots_failed.push(e.to_string());
                continue;
            }
        }
        if !trust.is_adopted(&id) {
            record.snapshots.push(id);
        }
    }
    record.superseded_index = legacy
        .objects
        .iter()
        .filter(|id| !trust.is_superseded(id))
        .copied()
        .collect();
    report.snapshots_adopted = record.snapshots.len();
    report.index_superseded = record.superseded_index.len();
    if opts.dry_run || (record.snapshots.is_empty() && record.superseded_index.is_empty()) {
        return Ok(hosts);
    }
    record.snapshots.sort();
    record.superseded_index.sort();
    // Records of at most 100,000 IDs each (about 7 MB of JSON).
    for chunk in record.snapshots.chunks(100_000) {
        let part = AdoptionRecord {
            version: 1,
            snapshots: chunk.to_vec(),
            superseded_index: Vec::new(),
        };
        repo.save_signed_by_admin(ObjectKind::Adoption, &part)?;
    }
    for chunk in record.superseded_index.chunks(100_000) {
        let part = AdoptionRecord {
            version: 1,
            snapshots: Vec::new(),
            superseded_index: chunk.to_vec(),
        };
        repo.save_signed_by_admin(ObjectKind::Adoption, &part)?;
    }
    Ok(hosts)
}

/// Step 3: records every host the adopted snapshots name.
fn register(
    repo: &Repository,
    opts: &UpgradeOptions,
    hosts: &BTreeSet<String>,
    report: &mut UpgradeReport,
) -> Result<()> {
    let trust = repo.trust()?;
    for host in hosts {
        if trust.hosts.contains_key(host) {
            continue;
        }
        if let Err(e) = crate::provenance::check_host_name(host) {
            log::warn!("{e}: not registered; its snapshots are adopted all the same");
            continue;
        }
        if !opts.dry_run {
            repo.register_host(host, None)?;
        }
        report.hosts_registered.push(host.clone());
    }
    Ok(())
}

impl Repository {
    /// Replaces the config with its format-3 form (the admin key's public
    /// half, a new MAC). The only object lifeboat ever replaces.
    fn write_upgraded_config(&self) -> Result<()> {
        let key = self.master_key("upgrade")?;
        let mut config = self.config().clone();
        config.version = crate::repo::FORMAT_VERSION;
        config.admin_key = Some(key.admin_signing().public().to_hex());
        config.mac = key.mac(&config.mac_input());
        let bytes = serde_json::to_vec_pretty(&config).expect("config serialises");
        self.backend().put_replacing("config", &bytes)?;
        let back = crate::repo::parse_config(&self.backend().get("config", None)?)?;
        if back != config {
            return Err(Error::Invalid(
                "the upgraded config did not read back as written; run `lifeboat upgrade` again"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, BackendError, LocalBackend, ObjectInfo, PutOutcome};
    use crate::snapshot_list::Selector;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/format2");

    /// A copy of the format-2 fixture repository (tests never change it).
    fn fixture_copy(dir: &Path) -> std::path::PathBuf {
        let to = dir.join("repo");
        let status = std::process::Command::new("cp")
            .args(["-a", &format!("{FIXTURE}/repo"), to.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
        to
    }

    /// A store whose puts fail once `left` of them have succeeded: a
    /// crash in the middle of an upgrade.
    #[derive(Debug)]
    struct CrashesAfter {
        inner: Arc<dyn Backend>,
        left: AtomicUsize,
    }

    impl CrashesAfter {
        fn step(&self, key: &str) -> Result<(), BackendError> {
            if self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
            {
                return Err(BackendError::Permanent {
                    key: key.into(),
                    message: "crashed".into(),
                });
            }
            Ok(())
        }
    }

    impl Backend for CrashesAfter {
        fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
            self.step(key)?;
            self.inner.put(key, data)
        }
        fn get(&self, key: &str, r: Option<std::ops::Range<u64>>) -> Result<Vec<u8>, BackendError> {
            self.inner.get(key, r)
        }
        fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<(), BackendError> {
            self.inner.delete(key)
        }
        fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
            self.inner.stat(key)
        }
        fn location(&self) -> String {
            self.inner.location()
        }
        fn put_replacing(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
            self.step(key)?;
            self.inner.put_replacing(key, data)
        }
    }

    /// Restores snapshot `spec` of `host` and checks the fixture's files.
    fn restores_the_fixture(repo: &Repository, host: &str, motd: bool) {
        let (_, snap) = repo.find_snapshot("latest", &Selector::host(host)).unwrap();
        let out = tempfile::tempdir().unwrap();
        let r = crate::restore::restore(
            repo,
            &snap,
            &crate::restore::RestoreOptions {
                target: out.path().to_path_buf(),
                verify: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        let root = out.path().join("tmp/fx/src");
        for f in [
            "data/blob.bin",
            "data/notes.txt",
            "etc/hostname",
            "etc/resolv.conf",
        ] {
            assert_eq!(
                std::fs::read(root.join(f)).unwrap(),
                std::fs::read(format!("{FIXTURE}/src/{f}")).unwrap(),
                "{f}"
            );
        }
        assert_eq!(
            std::fs::read_link(root.join("data/link")).unwrap(),
            Path::new("../etc/hostname")
        );
        assert_eq!(root.join("etc/motd").exists(), motd);
    }

    #[test]
    fn upgrading_the_format_2_fixture_keeps_every_snapshot_and_resumes_after_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let path = fixture_copy(tmp.path());
        let local: Arc<dyn Backend> = Arc::new(LocalBackend::new(&path));
        let repo = Repository::open(local.clone(), "fixture-passphrase").unwrap();
        assert_eq!(repo.config().version, 2);
        restores_the_fixture(&repo, "db1", false);
        restores_the_fixture(&repo, "web1", true);

        // Crash after a few writes, at every point up to the config.
        for crash_after in [0, 1, 3] {
            let crashing: Arc<dyn Backend> = Arc::new(CrashesAfter {
                inner: local.clone(),
                left: AtomicUsize::new(crash_after),
            });
            let half = Repository::open(crashing, "fixture-passphrase").unwrap();
            assert!(upgrade(&half, &UpgradeOptions::default()).is_err());
            let still = Repository::open(local.clone(), "fixture-passphrase").unwrap();
            assert_eq!(still.config().version, 2, "a crash leaves format 2");
            restores_the_fixture(&still, "db1", false);
        }
        let report = upgrade(&repo, &UpgradeOptions::default()).unwrap();
        assert!(report.config_upgraded, "{report:?}");
        assert!(report.packs_failed.is_empty(), "{report:?}");
        let repo = Repository::open(local.clone(), "fixture-passphrase").unwrap();
        assert_eq!(repo.config().version, 3);
        let hosts: Vec<String> = repo.trust().unwrap().hosts.keys().cloned().collect();
        assert_eq!(
            hosts,
            ["db1", "web1"],
            "every host the snapshots name is registered"
        );
        let list = repo.snapshots().unwrap();
        assert!(list.rejected.is_empty(), "{:?}", list.rejected);
        assert!(list
            .snapshots
            .iter()
            .all(|l| l.trust == crate::SnapshotTrust::Adopted));
        restores_the_fixture(&repo, "db1", false);
        restores_the_fixture(&repo, "web1", true);
        let c = crate::check::check(
            &repo,
            &crate::check::CheckOptions {
                read_data: true,
                subset_percent: None,
            },
        )
        .unwrap();
        assert!(c.errors.is_empty(), "{:?}", c.errors);

        // The old credential is refused with the way out; a new one works.
        let old = crate::WriterKey::from_file(
            &std::fs::read(format!("{FIXTURE}/writer.key")).unwrap(),
            "writer.key",
        )
        .unwrap();
        let err = Repository::open_writer(local.clone(), old)
            .unwrap_err()
            .to_string();
        assert!(err.contains("export-writer --host"), "{err}");
        let web1 =
            Repository::open_writer(local.clone(), repo.writer_key(Some("web1")).unwrap()).unwrap();
        let src = tmp.path().join("new");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), b"after the upgrade").unwrap();
        let b = crate::backup::backup(
            &web1,
            &crate::backup::BackupOptions {
                paths: vec![src.clone()],
                ..Default::default()
            },
            &crate::backup::Progress::default(),
        )
        .unwrap();
        assert_eq!(b.snapshot.host, "web1");
        let now = crate::prune::PruneOptions {
            grace: std::time::Duration::ZERO,
            min_pack_age: std::time::Duration::ZERO,
            ..Default::default()
        };
        crate::prune::prune(&repo, &now).unwrap();
        crate::prune::prune(&repo, &now).unwrap();
        restores_the_fixture(&repo, "db1", false);

        // Once done, running it again changes nothing.
        let again = upgrade(&repo, &UpgradeOptions::default()).unwrap();
        assert!(
            !again.config_upgraded && again.snapshots_adopted == 0 && again.packs_vouched == 0,
            "{again:?}"
        );
    }
}
