//! One engine test per attack a stolen writer credential could make
//! (ARCHITECTURE.md, "Write-only hosts"). Each forges only from what a
//! writer credential holds (the public recipients, the index identity, the
//! chunk key and its own host's signing key, and put rights under `data/`,
//! `index/`, `snapshots/` and `pending/`), never from the master key, and
//! shows that the full-key operation loses nothing, restores every real
//! snapshot byte for byte, and reports the forged object.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, MemoryBackend};
use crate::backup::{backup, BackupOptions, BackupReport, Progress};
use crate::check::{check, CheckOptions};
use crate::crypto::Recipients;
use crate::forget::{forget, ForgetOptions, ForgetWhat};
use crate::id::Id;
use crate::index::{IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::pack::{BlobEncoder, BlobKind, PackBuilder, PackEntry};
use crate::prune::{prune, PruneOptions, PrunePlan};
use crate::repo::{pack_key, InitOptions, Repository};
use crate::restore::{restore, RestoreOptions};
use crate::retention::{GroupBy, KeepPolicy};
use crate::snapshot_list::Selector;
use crate::tree::{Bytes, Node, NodeKind, Snapshot, Summary, Tree};
use crate::Error;

/// A repository with two write-only hosts: db1, whose data is at stake,
/// and web1, whose credential the attacker stole.
struct Fleet {
    tmp: tempfile::TempDir,
    store: Arc<MemoryBackend>,
    admin: Repository,
    db1: Repository,
    web1: Repository,
    db1_src: PathBuf,
    db1_first: BackupReport,
    /// The packs db1's first backup wrote.
    db1_packs: std::collections::HashSet<Id>,
}

/// Every pack the store holds.
fn stored_packs(store: &MemoryBackend) -> std::collections::HashSet<Id> {
    store
        .list("data/")
        .unwrap()
        .into_iter()
        .map(|o| o.key.rsplit('/').next().unwrap().parse().unwrap())
        .collect()
}

fn opts() -> InitOptions {
    InitOptions {
        kdf_work_factor: 10,
        pack_size: 1024 * 1024,
        ..InitOptions::default()
    }
}

fn write_files(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/app.conf"),
        format!("setting = {seed}\n").repeat(200),
    )
    .unwrap();
    std::fs::write(
        root.join("data.bin"),
        crate::testutil::pseudo_random(2 << 20, seed),
    )
    .unwrap();
}

fn backup_as(repo: &Repository, src: &Path) -> BackupReport {
    backup(
        repo,
        &BackupOptions {
            paths: vec![src.to_path_buf()],
            tags: vec!["source:files".into()],
            ..BackupOptions::default()
        },
        &Progress::default(),
    )
    .unwrap()
}

fn fleet() -> Fleet {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryBackend::new());
    let b: Arc<dyn Backend> = store.clone();
    let admin = Repository::init(b.clone(), "pw", &opts()).unwrap();
    let writer = |host: &str| {
        Repository::open_writer(b.clone(), admin.writer_key(Some(host)).unwrap()).unwrap()
    };
    let (db1, web1) = (writer("db1"), writer("web1"));
    let db1_src = tmp.path().join("db1");
    write_files(&db1_src, 1);
    let db1_first = backup_as(&db1, &db1_src);
    let db1_packs = stored_packs(&store);
    let web1_src = tmp.path().join("web1");
    write_files(&web1_src, 2);
    backup_as(&web1, &web1_src);
    Fleet {
        tmp,
        store,
        admin,
        db1,
        web1,
        db1_src,
        db1_first,
        db1_packs,
    }
}

impl Fleet {
    /// Restores `snap` with the full key and compares it with `src`.
    fn restores_exactly(&self, snap: &Snapshot, src: &Path) -> crate::restore::RestoreReport {
        let out = tempfile::tempdir_in(self.tmp.path()).unwrap();
        let r = restore(
            &self.admin,
            snap,
            &RestoreOptions {
                target: out.path().to_path_buf(),
                verify: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        let root = out.path().join(src.strip_prefix("/").unwrap());
        for f in ["etc/app.conf", "data.bin"] {
            assert_eq!(
                std::fs::read(root.join(f)).unwrap(),
                std::fs::read(src.join(f)).unwrap(),
                "{f}"
            );
        }
        r
    }

    /// Prunes twice with the full key, executing every plan at once: the
    /// grace period passed twice over.
    fn prune_twice(&self) -> crate::prune::PruneReport {
        let now = PruneOptions {
            grace: Duration::ZERO,
            min_pack_age: Duration::ZERO,
            max_unused: 0.0,
            ..PruneOptions::default()
        };
        prune(&self.admin, &now).unwrap();
        prune(&self.admin, &now).unwrap()
    }

    /// What the attacker holds to encrypt an object of `kind`.
    fn attacker_recipients(&self, kind: ObjectKind) -> Recipients {
        let mut list = self.web1.config().recipients.clone();
        if kind.for_writers() {
            list.extend(self.web1.config().index_recipient.clone());
        }
        Recipients::parse(&list).unwrap()
    }

    /// Puts an unsigned object of `kind` holding `json`, as the attacker can.
    fn forge_unsigned(&self, kind: ObjectKind, json: &[u8]) -> Id {
        let plain = zstd::bulk::compress(json, 3).unwrap();
        self.put_raw(kind, self.attacker_recipients(kind).encrypt(&plain))
    }

    /// Puts `bytes` under `kind`'s prefix, named by their hash.
    fn put_raw(&self, kind: ObjectKind, bytes: Vec<u8>) -> Id {
        let id = Id::of_bytes(&bytes);
        self.store.put(&kind.key(&id), &bytes).unwrap();
        id
    }

    /// A pack of the attacker's whose header claims `claims` (IDs with
    /// whatever frames it likes), and a web1-signed listing of it.
    fn forge_pack(&self, kind: BlobKind, claims: &[(Id, Vec<u8>)]) -> IndexPack {
        let mut pb = PackBuilder::sealed(kind, self.web1.recipients(), 0);
        for (id, frame) in claims {
            pb.add(*id, frame.len() as u32, frame);
        }
        let (ct, header) = pb.finish();
        let id = Id::of_bytes(&ct);
        let size = ct.len() as u64;
        self.web1.put_object(&pack_key(&id), ct, None).unwrap();
        let listing = IndexPack {
            id,
            kind,
            size,
            blobs: header.blobs,
            locked_until: None,
        };
        self.web1
            .save(ObjectKind::Index, &IndexFile::of(vec![listing.clone()]))
            .unwrap();
        listing
    }

    /// Writes `trees` (and `data` blobs) as web1, as a hostile snapshot's
    /// content: real packs, web1-signed listings. Returns the tree IDs.
    fn write_as_web1(&self, trees: &[Tree], data: &[Vec<u8>]) -> Vec<Id> {
        let mut ids = Vec::new();
        for (kind, blobs) in [
            (
                BlobKind::Tree,
                trees.iter().map(Tree::to_bytes).collect::<Vec<_>>(),
            ),
            (BlobKind::Data, data.to_vec()),
        ] {
            if blobs.is_empty() {
                continue;
            }
            let mut pb = PackBuilder::sealed(kind, self.web1.recipients(), 0);
            let mut enc = BlobEncoder::new(3);
            for b in &blobs {
                let id = self.web1.ids().id_for(kind, b);
                let mut frame = Vec::new();
                enc.encode_into(b, &mut frame);
                pb.add(id, b.len() as u32, &frame);
                if kind == BlobKind::Tree {
                    ids.push(id);
                }
            }
            let (ct, header) = pb.finish();
            let id = Id::of_bytes(&ct);
            let size = ct.len() as u64;
            self.web1.put_object(&pack_key(&id), ct, None).unwrap();
            self.web1
                .save(
                    ObjectKind::Index,
                    &IndexFile::of(vec![IndexPack {
                        id,
                        kind,
                        size,
                        blobs: header.blobs,
                        locked_until: None,
                    }]),
                )
                .unwrap();
        }
        ids
    }

    /// The listings of db1's data packs, as the attacker reads them from
    /// the index objects its credential opens (whoever signed them).
    fn db1_data_listing(&self) -> Vec<IndexPack> {
        let mut packs = std::collections::HashMap::new();
        for id in self.web1.list_ids(ObjectKind::Index).unwrap() {
            let file: IndexFile = self.web1.load(ObjectKind::Index, &id).unwrap();
            for p in file.packs {
                if p.kind == BlobKind::Data && self.db1_packs.contains(&p.id) {
                    packs.insert(p.id, p);
                }
            }
        }
        let mut out: Vec<IndexPack> = packs.into_values().collect();
        out.sort_by_key(|p| p.id);
        assert!(!out.is_empty());
        out
    }
}

/// A snapshot record pointing at `tree`, claiming `host`.
fn snapshot_claiming(host: &str, tree: Id, time: chrono::DateTime<chrono::Utc>) -> Snapshot {
    Snapshot {
        version: 1,
        time,
        host: host.into(),
        user: "root".into(),
        paths: vec!["/srv".into()],
        tags: vec!["source:files".into()],
        tree,
        incomplete: false,
        summary: Summary {
            dirs: 10,
            files_new: 10,
            ..Summary::default()
        },
        program: "forged".into(),
        locked_until: None,
    }
}

fn node(name: &str, kind: NodeKind) -> Node {
    Node {
        name: Bytes(name.as_bytes().to_vec()),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        user: None,
        group: None,
        mtime: 1_600_000_000,
        mtime_nsec: 0,
        size: 0,
        content: vec![],
        subtree: None,
        target: None,
        rdev: None,
        hardlink: None,
        sparse: false,
        xattrs: vec![],
    }
}

fn rejected(list: &crate::snapshot_list::SnapshotList, id: &Id) -> Option<String> {
    list.rejected
        .iter()
        .find(|r| r.object == ObjectKind::Snapshot.key(id))
        .map(|r| r.reason.clone())
}

// ------------------------------------------------------- 1: prune ---

#[test]
fn a_forged_listing_of_live_blobs_in_another_pack_never_makes_prune_delete_them() {
    let f = fleet();
    // The attacker names every blob of db1's packs in a pack of its own,
    // at made-up offsets (the frames are garbage), and in a listing that
    // claims web1's real pack holds them.
    let db1_packs = f.db1_data_listing();
    // It grinds until its pack's ID sorts first, in case a tie between
    // copies were broken by the smallest ID.
    let lowest = db1_packs.iter().map(|p| p.id).min().unwrap();
    for attempt in 0u8..=200 {
        let claims: Vec<(Id, Vec<u8>)> = db1_packs
            .iter()
            .flat_map(|p| p.blobs.iter().map(|b| (b.id, vec![attempt; 64])))
            .collect();
        if f.forge_pack(BlobKind::Data, &claims).id < lowest {
            break;
        }
        assert!(attempt < 200, "no pack ID sorted first");
    }
    let mut moved = db1_packs[0].clone();
    moved.id = f
        .forge_pack(BlobKind::Data, &[(Id::of_bytes(b"x"), vec![1; 8])])
        .id;
    f.web1
        .save(ObjectKind::Index, &IndexFile::of(vec![moved]))
        .unwrap();

    f.prune_twice();
    for p in &db1_packs {
        assert!(
            f.store.stat(&pack_key(&p.id)).is_ok(),
            "db1's pack {} was deleted",
            p.id.short()
        );
    }
    f.restores_exactly(&f.db1_first.snapshot, &f.db1_src);
}

#[test]
fn repacking_copies_only_frames_that_verify_against_their_ids() {
    let f = fleet();
    // db1's second snapshot changes data.bin; forgetting the first leaves
    // db1's old packs partly unused, so prune repacks them. The attacker
    // adds listings placing db1's live blobs at wrong offsets in them.
    let first_packs = f.db1_data_listing();
    let mut shifted = first_packs.clone();
    for p in &mut shifted {
        for b in &mut p.blobs {
            *b = PackEntry {
                offset: b.offset + 7,
                ..*b
            };
        }
    }
    f.web1
        .save(ObjectKind::Index, &IndexFile::of(shifted))
        .unwrap();
    std::fs::write(
        f.db1_src.join("data.bin"),
        crate::testutil::pseudo_random(2 << 20, 99),
    )
    .unwrap();
    let second = backup_as(&f.db1, &f.db1_src);
    f.admin
        .delete_object(ObjectKind::Snapshot, &f.db1_first.snapshot_id)
        .unwrap();
    let report = f.prune_twice();
    assert!(
        report.repack_refused.is_empty(),
        "{:?}",
        report.repack_refused
    );
    f.restores_exactly(&second.snapshot, &f.db1_src);
    let c = check(
        &f.admin,
        &CheckOptions {
            read_data: true,
            subset_percent: None,
        },
    )
    .unwrap();
    assert!(
        c.errors
            .iter()
            .all(|e| !e.contains("does not match its ID")),
        "a repacked frame is bad: {:?}",
        c.errors
    );
}

// ------------------------------------------ 2: host, time and lock ---

#[test]
fn snapshots_a_host_signs_for_another_host_are_rejected_and_never_latest() {
    let f = fleet();
    // A hostile tree: a setuid root file, signed by web1 but claiming db1.
    let mut suid = node("sh", NodeKind::File);
    suid.mode = 0o4755;
    let tree = f.write_as_web1(&[Tree { nodes: vec![suid] }], &[])[0];
    let future = chrono::Utc::now() + chrono::Duration::days(365);
    let forged = f
        .web1
        .save(
            ObjectKind::Snapshot,
            &snapshot_claiming("db1", tree, future),
        )
        .unwrap();

    let list = f.admin.snapshots().unwrap();
    let why = rejected(&list, &forged).expect("the forgery is rejected");
    assert!(why.contains("signed by host web1's key"), "{why}");
    let (latest, _) = f
        .admin
        .find_snapshot("latest", &Selector::host("db1"))
        .unwrap();
    assert_eq!(latest, f.db1_first.snapshot_id);
    let global = f
        .admin
        .find_snapshot("latest", &Selector::default())
        .unwrap();
    assert_ne!(global.0, forged);
    // Asked for by its ID, it is refused with the reason.
    let err = f
        .admin
        .find_snapshot(&forged.to_hex()[..12], &Selector::default())
        .unwrap_err();
    assert!(matches!(err, Error::Untrusted { .. }), "{err}");
    // A writer cannot even ask its own engine to name another host.
    let err = backup(
        &f.web1,
        &BackupOptions {
            paths: vec![f.db1_src.clone()],
            host: Some("db1".into()),
            ..BackupOptions::default()
        },
        &Progress::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("writes as host web1"), "{err}");
}

#[test]
fn a_future_dated_snapshot_never_takes_a_real_ones_retention_slot_or_latest() {
    let f = fleet();
    // web1 floods its own host with snapshots dated in the coming days.
    let web1_real = f
        .admin
        .find_snapshot("latest", &Selector::host("web1"))
        .unwrap();
    let mut forged = Vec::new();
    for days in 1..=5 {
        let at = chrono::Utc::now() + chrono::Duration::days(days);
        let mut s = snapshot_claiming("web1", web1_real.1.tree, at);
        s.paths = web1_real.1.paths.clone();
        forged.push(f.web1.save(ObjectKind::Snapshot, &s).unwrap());
    }
    let list = f.admin.snapshots().unwrap();
    assert!(forged
        .iter()
        .all(|id| list.snapshots.iter().any(|l| l.id == *id && l.future)));
    let (latest, _) = f
        .admin
        .find_snapshot("latest", &Selector::host("web1"))
        .unwrap();
    assert_eq!(
        latest, web1_real.0,
        "a future-dated snapshot is never latest"
    );

    let all = |_: &Snapshot| true;
    let report = forget(
        &f.admin,
        &ForgetOptions {
            what: ForgetWhat::Policy {
                policy: KeepPolicy {
                    daily: Some(1),
                    ..KeepPolicy::default()
                },
                group_by: GroupBy::host_and_paths(),
                filter: &all,
            },
            dry_run: false,
        },
    )
    .unwrap();
    assert!(report.removed.is_empty(), "{:?}", report.removed);
    assert_eq!(
        report.left_alone.len(),
        forged.len(),
        "{:?}",
        report.left_alone
    );
    f.restores_exactly(&f.db1_first.snapshot, &f.db1_src);
}

#[test]
fn a_forged_lock_date_on_a_repository_without_a_lock_policy_stops_nothing() {
    let f = fleet();
    let web1_real = f
        .admin
        .find_snapshot("latest", &Selector::host("web1"))
        .unwrap();
    let mut s = web1_real.1.clone();
    s.time -= chrono::Duration::hours(1);
    s.locked_until = chrono::DateTime::from_timestamp(4_070_908_800, 0); // 2099
    let pinned = f.web1.save(ObjectKind::Snapshot, &s).unwrap();
    forget(
        &f.admin,
        &ForgetOptions {
            what: ForgetWhat::Ids(vec![pinned.to_hex()], Selector::default()),
            dry_run: false,
        },
    )
    .expect("no lock policy, so no lock to honour");
    assert!(f.store.stat(&ObjectKind::Snapshot.key(&pinned)).is_err());
}

// ------------------------------------------------ 3: one bad object ---

#[test]
fn one_undecodable_or_oversized_object_stops_no_command() {
    let f = fleet();
    let garbage = f.put_raw(ObjectKind::Snapshot, b"not an age file".to_vec());
    let wrong_key = f.put_raw(
        ObjectKind::Snapshot,
        Recipients::parse(&[crate::crypto::MasterKey::generate().recipient()])
            .unwrap()
            .encrypt(b"x"),
    );
    let big = f.put_raw(ObjectKind::Snapshot, vec![7u8; 5 << 20]);
    let bad_index = f.forge_unsigned(ObjectKind::Index, b"{ broken");
    let bad_plan = f.put_raw(ObjectKind::Plan, b"garbage".to_vec());

    let list = f.admin.snapshots().unwrap();
    for id in [garbage, wrong_key, big] {
        assert!(rejected(&list, &id).is_some(), "{}", id.short());
    }
    assert!(rejected(&list, &big).unwrap().contains("was not read"));
    // Restore by explicit ID, forget, prune, check: all go on.
    let (id, snap) = f
        .admin
        .find_snapshot(
            &f.db1_first.snapshot_id.to_hex()[..10],
            &Selector::default(),
        )
        .unwrap();
    assert_eq!(id, f.db1_first.snapshot_id);
    f.restores_exactly(&snap, &f.db1_src);
    let db1_only = |s: &Snapshot| s.host == "db1";
    forget(
        &f.admin,
        &ForgetOptions {
            what: ForgetWhat::Policy {
                policy: KeepPolicy {
                    last: Some(1),
                    ..KeepPolicy::default()
                },
                group_by: GroupBy::host_and_paths(),
                filter: &db1_only,
            },
            dry_run: true,
        },
    )
    .unwrap();
    let pruned = f.prune_twice();
    assert!(pruned
        .untrusted
        .iter()
        .any(|r| r.object.contains(&bad_index.to_hex())));
    let c = check(&f.admin, &CheckOptions::default()).unwrap();
    for id in [garbage, wrong_key, big, bad_index, bad_plan] {
        assert!(
            c.errors
                .iter()
                .any(|e| e.contains(&id.to_hex()) || e.contains(&id.short())),
            "check names {}: {:?}",
            id.short(),
            c.errors
        );
    }
    f.restores_exactly(&f.db1_first.snapshot, &f.db1_src);
    // The bad objects are reported, not deleted.
    assert!(f.store.stat(&ObjectKind::Snapshot.key(&garbage)).is_ok());
}

// --------------------------------------------- 4: unbounded resources ---

#[test]
fn a_snapshot_that_decompresses_to_more_than_any_snapshot_is_refused_unread_to_the_end() {
    let f = fleet();
    // 64 MiB of spaces in a JSON string compress to a few kilobytes.
    let mut json = b"{\"paths\":[\"".to_vec();
    json.extend(std::iter::repeat_n(b' ', 64 << 20));
    json.extend_from_slice(b"\"]}");
    let bomb = f.forge_unsigned(ObjectKind::Snapshot, &json);
    let size = f.store.stat(&ObjectKind::Snapshot.key(&bomb)).unwrap().size;
    assert!(size < 100_000, "the bomb is small: {size}");
    let list = f.admin.snapshots().unwrap();
    let why = rejected(&list, &bomb).unwrap();
    assert!(why.contains("decompresses to more than"), "{why}");
}

#[test]
fn trees_that_share_subtrees_are_walked_within_what_the_snapshot_declares() {
    let f = fleet();
    // 40 trees, each naming the next twice: 2^40 directories if expanded.
    let mut trees = vec![Tree::default()];
    let mut below = f.web1.ids().tree_id(&Tree::default().to_bytes());
    for _ in 0..40 {
        let mut a = node("a", NodeKind::Dir);
        a.subtree = Some(below);
        let mut b = node("b", NodeKind::Dir);
        b.subtree = Some(below);
        let t = Tree { nodes: vec![a, b] };
        below = f.web1.ids().tree_id(&t.to_bytes());
        trees.push(t);
    }
    let root = *f.write_as_web1(&trees, &[]).last().unwrap();
    let now = chrono::Utc::now() - chrono::Duration::minutes(1);
    let id = f
        .web1
        .save(ObjectKind::Snapshot, &snapshot_claiming("web1", root, now))
        .unwrap();
    let (_, snap) = f
        .admin
        .find_snapshot(&id.to_hex(), &Selector::default())
        .unwrap();
    let started = std::time::Instant::now();
    let index = f.admin.load_index().unwrap();
    let walked = crate::walk::walk(&f.admin, &index, &snap, &mut |_, _| Ok(()));
    let err = walked.unwrap_err().to_string();
    assert!(err.contains("far more entries than it declares"), "{err}");
    let out = tempfile::tempdir_in(f.tmp.path()).unwrap();
    assert!(restore(
        &f.admin,
        &snap,
        &RestoreOptions {
            target: out.path().to_path_buf(),
            ..Default::default()
        }
    )
    .is_err());
    // Prune and check read each shared tree once.
    f.prune_twice();
    check(&f.admin, &CheckOptions::default()).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    f.restores_exactly(&f.db1_first.snapshot, &f.db1_src);
}

// ------------------------------------------------ 5: declared sizes ---

#[test]
fn a_file_whose_blobs_exceed_its_declared_size_is_refused_before_anything_is_written() {
    let f = fleet();
    let chunk = crate::testutil::pseudo_random(64 * 1024, 5);
    let blob = f.web1.ids().blob_id(&chunk);
    let mut bomb = node("bomb", NodeKind::File);
    bomb.content = vec![blob; 100];
    bomb.size = 0;
    let root = f.write_as_web1(&[Tree { nodes: vec![bomb] }], &[chunk])[0];
    let now = chrono::Utc::now() - chrono::Duration::minutes(1);
    let id = f
        .web1
        .save(ObjectKind::Snapshot, &snapshot_claiming("web1", root, now))
        .unwrap();
    let (_, snap) = f
        .admin
        .find_snapshot(&id.to_hex(), &Selector::default())
        .unwrap();
    let out = tempfile::tempdir_in(f.tmp.path()).unwrap();
    let r = restore(
        &f.admin,
        &snap,
        &RestoreOptions {
            target: out.path().to_path_buf(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
    assert!(
        r.failures[0].reason.contains("declares 0 bytes"),
        "{:?}",
        r.failures
    );
    assert_eq!(r.bytes_written, 0);
    assert!(std::fs::read_dir(out.path().join("srv")).map_or(true, |mut d| d.next().is_none()));
}

// ------------------------------------------------------ 6: fallback ---

#[test]
fn restore_falls_back_to_an_intact_copy_and_says_so() {
    let f = fleet();
    // The admin backs up the same files: its dedup does not trust db1's
    // listings, so it stores a second, vouched-for copy, which readers try
    // first. Damage that copy: the restore reads db1's.
    let before = stored_packs(&f.store);
    let admin_copy = backup_as(&f.admin, &f.db1_src);
    assert!(
        admin_copy.snapshot.summary.bytes_added_raw > 1 << 20,
        "a second copy"
    );
    let index = f.admin.load_index().unwrap();
    let admin_packs: Vec<Id> = stored_packs(&f.store)
        .difference(&before)
        .filter(|id| {
            index
                .packs()
                .iter()
                .any(|p| p.id == **id && p.kind == BlobKind::Data)
        })
        .copied()
        .collect();
    assert!(!admin_packs.is_empty());
    for p in &admin_packs {
        let key = pack_key(p);
        let mut bytes = f.store.get(&key, None).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xFF;
        f.store.corrupt(&key, bytes);
    }
    let r = f.restores_exactly(&f.db1_first.snapshot, &f.db1_src);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("restored from its copy in pack")),
        "{:?}",
        r.warnings
    );
}

// ----------------------------------------------- 7: temporary names ---

#[test]
fn an_entry_named_like_a_temporary_file_is_refused_and_the_restore_does_not_hang() {
    let f = fleet();
    let chunks: Vec<Vec<u8>> = (0..2)
        .map(|i| crate::testutil::pseudo_random(600 * 1024, 40 + i))
        .collect();
    let mut big = node("big", NodeKind::File);
    big.content = chunks.iter().map(|c| f.web1.ids().blob_id(c)).collect();
    big.size = chunks.iter().map(|c| c.len() as u64).sum();
    // The FIFO takes the name the restore would give big's temporary file.
    let target = tempfile::tempdir_in(f.tmp.path()).unwrap();
    let final_path = target.path().join("srv/big");
    let h = blake3::hash(final_path.as_os_str().as_encoded_bytes());
    let trap = node(
        &format!(".lb-restore-{}.tmp", &h.to_hex()[..16]),
        NodeKind::Fifo,
    );
    let mut nodes = vec![big, trap];
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let root = f.write_as_web1(&[Tree { nodes }], &chunks)[0];
    let now = chrono::Utc::now() - chrono::Duration::minutes(1);
    let mut s = snapshot_claiming("web1", root, now);
    s.paths = vec!["/".into()];
    let id = f.web1.save(ObjectKind::Snapshot, &s).unwrap();
    let (_, snap) = f
        .admin
        .find_snapshot(&id.to_hex(), &Selector::default())
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let r = restore(
                &f.admin,
                &snap,
                &RestoreOptions {
                    target: target.path().join("srv"),
                    batch: 1,
                    ..Default::default()
                },
            );
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the restore hung")
            .unwrap();
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        assert!(
            r.failures[0].reason.contains("temporary files"),
            "{:?}",
            r.failures
        );
        let restored = std::fs::read(target.path().join("srv/big")).unwrap();
        assert_eq!(restored, chunks.concat());
    });
}

// ----------------------------------------------------- 8: plans ---

#[test]
fn a_forged_plan_neither_stops_backups_nor_is_executed() {
    let f = fleet();
    let every_pack: Vec<Id> = f
        .store
        .list("data/")
        .unwrap()
        .into_iter()
        .map(|o| o.key.rsplit('/').next().unwrap().parse().unwrap())
        .collect();
    let plan = PrunePlan {
        version: 1,
        created: chrono::Utc::now() - chrono::Duration::days(3),
        host: "admin".into(),
        packs: every_pack.clone(),
    };
    let signed = f.web1.save(ObjectKind::Plan, &plan).unwrap();
    let unsigned = f.forge_unsigned(ObjectKind::Plan, &serde_json::to_vec(&plan).unwrap());
    // A backup that started before the forged plans appeared would have
    // refused to commit on seeing them: it does not.
    let packs: std::collections::HashSet<Id> = every_pack.iter().copied().collect();
    crate::prune::check_no_new_condemnation(&f.db1, &Default::default(), &packs)
        .expect("a plan the admin key did not sign condemns nothing");
    // A backup that reuses those packs still commits.
    std::fs::write(f.db1_src.join("new.txt"), "new\n").unwrap();
    let second = backup_as(&f.db1, &f.db1_src);
    let report = f.prune_twice();
    assert_eq!(report.packs_deleted, 0, "{report:?}");
    for id in [signed, unsigned] {
        assert!(report
            .untrusted
            .iter()
            .any(|r| r.object == ObjectKind::Plan.key(&id)));
    }
    f.restores_exactly(&second.snapshot, &f.db1_src);
}

// -------------------------------------------------- 9: dedup poisoning ---

#[test]
fn a_listing_that_claims_guessable_content_does_not_stop_another_host_storing_it() {
    let f = fleet();
    // The attacker guesses a file db1 will back up (a config template),
    // computes its blob ID with the chunk key, and claims it in a pack
    // that holds garbage.
    let template = b"# the distribution's default config\n".repeat(1000);
    let guessed = f.web1.ids().blob_id(&template);
    f.forge_pack(BlobKind::Data, &[(guessed, vec![0u8; 100])]);
    std::fs::write(f.db1_src.join("etc/default.conf"), &template).unwrap();
    let second = backup_as(&f.db1, &f.db1_src);
    assert!(
        second.snapshot.summary.bytes_added_raw >= template.len() as u64,
        "db1 stored the file itself: {:?}",
        second.snapshot.summary
    );
    let out = tempfile::tempdir_in(f.tmp.path()).unwrap();
    let r = restore(
        &f.admin,
        &second.snapshot,
        &RestoreOptions {
            target: out.path().to_path_buf(),
            verify: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let root = out.path().join(f.db1_src.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read(root.join("etc/default.conf")).unwrap(),
        template
    );
}

#[test]
fn cross_host_dedup_starts_once_check_has_vouched_for_the_data() {
    let f = fleet();
    // web1 backs up db1's files: db1's listings are not web1's to trust.
    let copy = backup_as(&f.web1, &f.db1_src);
    assert!(
        copy.snapshot.summary.bytes_added_raw > 1 << 20,
        "{:?}",
        copy.snapshot.summary
    );
    let c = check(
        &f.admin,
        &CheckOptions {
            read_data: true,
            subset_percent: None,
        },
    )
    .unwrap();
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    assert!(c.packs_vouched > 0);
    let elsewhere = f.tmp.path().join("again");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::copy(f.db1_src.join("data.bin"), elsewhere.join("data.bin")).unwrap();
    let host2 = Repository::open_writer(
        f.store.clone() as Arc<dyn Backend>,
        f.admin.writer_key(Some("app2")).unwrap(),
    )
    .unwrap();
    let third = backup(
        &host2,
        &BackupOptions {
            paths: vec![elsewhere],
            ..BackupOptions::default()
        },
        &Progress::default(),
    )
    .unwrap();
    assert!(
        third.snapshot.summary.bytes_added_raw < 64 * 1024,
        "dedup against vouched data: {:?}",
        third.snapshot.summary
    );
}

// -------------------------------------------------------- check ---

#[test]
fn check_names_every_forged_object() {
    let f = fleet();
    let web1_real = f
        .admin
        .find_snapshot("latest", &Selector::host("web1"))
        .unwrap();
    let claims_db1 = f
        .web1
        .save(
            ObjectKind::Snapshot,
            &snapshot_claiming("db1", web1_real.1.tree, chrono::Utc::now()),
        )
        .unwrap();
    let unsigned_snap = f.forge_unsigned(
        ObjectKind::Snapshot,
        &serde_json::to_vec(&snapshot_claiming(
            "db1",
            web1_real.1.tree,
            chrono::Utc::now(),
        ))
        .unwrap(),
    );
    let unsigned_index = f.forge_unsigned(
        ObjectKind::Index,
        &serde_json::to_vec(&IndexFile::of(vec![])).unwrap(),
    );
    let forged_plan = f
        .web1
        .save(
            ObjectKind::Plan,
            &PrunePlan {
                version: 1,
                created: chrono::Utc::now(),
                host: "x".into(),
                packs: vec![],
            },
        )
        .unwrap();
    let c = check(&f.admin, &CheckOptions::default()).unwrap();
    for (what, id) in [
        ("snapshot claiming db1", claims_db1),
        ("unsigned snapshot", unsigned_snap),
        ("unsigned index", unsigned_index),
        ("plan", forged_plan),
    ] {
        assert!(
            c.errors.iter().any(|e| e.contains(&id.to_hex())),
            "{what} {} not named: {:?}",
            id.short(),
            c.errors
        );
    }
}
