//! Signed provenance through the binary: a stolen writer credential forges
//! an index object and snapshots (with nothing but what the credential file
//! holds, through the library), on a local repository and on Garage, and
//! the full-key commands (`snapshots`, `restore`, `forget`, `prune`,
//! `check`) lose nothing, pick nothing forged, and name every forgery.

use std::path::Path;
use std::sync::Arc;

use lifeboat_core::backend::Backend;
use lifeboat_core::internals::{IndexFile, IndexPack, PackBuilder};
use lifeboat_core::{Id, ObjectKind, Repository, Snapshot, WriterKey};

use crate::s3::make_source;
use crate::servers::Garage;
use crate::util::{assert_trees_equal, json, Lb};
use crate::{stderr, under};

const PASSPHRASE: &str = "correct horse battery staple";

/// The same repository through a writer credential.
fn writer_of(lb: &Lb, key: &Path, cache: &Path) -> Lb {
    let mut writer = lb.clone();
    writer.passphrase = None;
    writer.cache = cache.to_path_buf();
    writer
        .env
        .push(("LIFEBOAT_WRITER_KEY".into(), key.display().to_string()));
    writer
}

/// The JSON of an index object, as a writer credential reads it.
fn read_index(store: &dyn Backend, writer: &WriterKey, key: &str) -> IndexFile {
    let bytes = store.get(key, None).unwrap();
    let plain = writer.decrypt(&bytes, &|| key.to_string()).unwrap();
    // Past the signature frame (a zstd skippable frame), if any.
    let skip = if plain[..4] == 0x184D_2A51u32.to_le_bytes() {
        8 + u32::from_le_bytes(plain[4..8].try_into().unwrap()) as usize
    } else {
        0
    };
    let json = zstd::decode_all(&plain[skip..]).unwrap();
    serde_json::from_slice(&json).unwrap()
}

/// Puts bytes that are no snapshot under `snapshots/`, named by their hash.
fn put_garbage(store: &dyn Backend, prefix: &str, bytes: &[u8]) -> Id {
    let id = Id::of_bytes(bytes);
    store.put(&format!("{prefix}/{id}"), bytes).unwrap();
    id
}

/// What web1's stolen credential forges; returns the forged objects' IDs.
struct Forged {
    claims_db1: Id,
    future_web1: Id,
    garbage: Id,
    unsigned_index: Id,
}

fn forge(store: Arc<dyn Backend>, key_file: &Path) -> Forged {
    let key = WriterKey::from_file(&std::fs::read(key_file).unwrap(), "writer.key").unwrap();
    let web1 = Repository::open_writer(store.clone(), key.clone()).unwrap();
    // Every data blob any host listed, placed by a signed web1 listing in a
    // pack of garbage frames: prune must not take db1's packs for copies.
    let mut claimed = Vec::new();
    for obj in store.list("index/").unwrap() {
        for p in read_index(store.as_ref(), &key, &obj.key).packs {
            if p.kind == lifeboat_core::internals::BlobKind::Data {
                claimed.extend(p.blobs.iter().map(|b| b.id));
            }
        }
    }
    let mut pb = PackBuilder::sealed(
        lifeboat_core::internals::BlobKind::Data,
        web1.recipients(),
        0,
    );
    for id in &claimed {
        pb.add(*id, 16, &[0u8; 32]);
    }
    let (ct, header) = pb.finish();
    let pack = Id::of_bytes(&ct);
    let size = ct.len() as u64;
    let hex = pack.to_hex();
    store
        .put(&format!("data/{}/{hex}", &hex[..2]), &ct)
        .unwrap();
    web1.save(
        ObjectKind::Index,
        &IndexFile::of(vec![IndexPack {
            id: pack,
            kind: lifeboat_core::internals::BlobKind::Data,
            size,
            blobs: header.blobs,
            locked_until: None,
        }]),
    )
    .unwrap();
    let snapshot = |host: &str, days: i64| Snapshot {
        version: 1,
        time: chrono::Utc::now() + chrono::Duration::days(days),
        host: host.into(),
        user: "root".into(),
        paths: vec!["/srv".into()],
        tags: vec!["source:files".into()],
        tree: Id::of_bytes(b"a tree of the attacker's"),
        incomplete: false,
        summary: Default::default(),
        program: "forged".into(),
        locked_until: chrono::DateTime::from_timestamp(4_070_908_800, 0),
    };
    let plain_index = zstd::encode_all(&b"{\"version\":1,\"packs\":[]}"[..], 3).unwrap();
    let mut with_index = web1.config().recipients.clone();
    with_index.extend(web1.config().index_recipient.clone());
    let index_recipients = lifeboat_core::internals::Recipients::parse(&with_index).unwrap();
    Forged {
        claims_db1: web1
            .save(ObjectKind::Snapshot, &snapshot("db1", 30))
            .unwrap(),
        future_web1: web1
            .save(ObjectKind::Snapshot, &snapshot("web1", 30))
            .unwrap(),
        garbage: put_garbage(store.as_ref(), "snapshots", b"not an age file at all"),
        unsigned_index: put_garbage(
            store.as_ref(),
            "index",
            &index_recipients.encrypt(&plain_index),
        ),
    }
}

/// The life cycle on one repository: db1 backs up through its credential,
/// web1's credential forges, and the full-key commands behave.
fn forged_objects_are_named_skipped_and_lose_nothing(lb: &Lb, tmp: &Path, store: Arc<dyn Backend>) {
    let src = tmp.join("db1");
    make_source(&src, 7, 3);
    let db1_key = tmp.join("db1.key");
    let web1_key = tmp.join("web1.key");
    lb.ok(&[
        "key",
        "export-writer",
        "--host",
        "db1",
        "--out",
        db1_key.to_str().unwrap(),
    ]);
    lb.ok(&[
        "key",
        "export-writer",
        "--host",
        "web1",
        "--out",
        web1_key.to_str().unwrap(),
    ]);
    let db1 = writer_of(lb, &db1_key, &tmp.join("db1-cache"));
    let made = json(&db1.ok(&[
        "--json",
        "backup",
        "--tag",
        "source:files",
        src.to_str().unwrap(),
    ]));
    let db1_snapshot = made["snapshot"].as_str().unwrap().to_string();
    // A writer cannot name another host.
    let out = db1.fails(&["backup", "--host", "web1", src.to_str().unwrap()]);
    assert!(
        stderr(&out).contains("writes as host db1"),
        "{}",
        stderr(&out)
    );

    let forged = forge(store, &web1_key);

    // Listing: the forgeries are named on stderr and left out.
    let out = lb.command().args(["--json", "snapshots"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = json(&String::from_utf8_lossy(&out.stdout));
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(!ids.contains(&forged.claims_db1.to_hex().as_str()));
    assert!(!ids.contains(&forged.garbage.to_hex().as_str()));
    let err = stderr(&out);
    assert!(
        err.contains(&forged.claims_db1.to_hex()) && err.contains("web1's key"),
        "{err}"
    );
    assert!(err.contains(&forged.garbage.to_hex()), "{err}");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == forged.future_web1.to_hex() && s["future"] == true),
        "{listed}"
    );

    // `latest`, retention and prune pick and keep the real ones.
    let target = tmp.join("restored");
    lb.ok(&[
        "restore",
        "latest",
        "--host",
        "db1",
        "--target",
        target.to_str().unwrap(),
        "--verify",
    ]);
    assert_trees_equal(&src, &under(&target, &src));
    let out = lb.ok(&["forget", "--keep-daily", "1", "--keep-within", "1d"]);
    assert!(out.contains("removed 0 snapshots"), "{out}");
    let out = lb.fails(&[
        "restore",
        &forged.claims_db1.to_hex()[..12],
        "--target",
        tmp.join("never").to_str().unwrap(),
    ]);
    assert!(stderr(&out).contains("is not trusted"), "{}", stderr(&out));
    assert!(!tmp.join("never").exists());
    for _ in 0..2 {
        lb.ok(&["prune", "--grace", "0s", "--max-unused", "0"]);
    }
    let again = tmp.join("restored-after-prune");
    lb.ok(&[
        "restore",
        "latest",
        "--host",
        "db1",
        "--target",
        again.to_str().unwrap(),
        "--verify",
    ]);
    assert_trees_equal(&src, &under(&again, &src));

    // check names every forged object (and nothing else is wrong with db1's).
    let out = lb.fails(&["check"]);
    let err = stderr(&out);
    for id in [forged.claims_db1, forged.garbage, forged.unsigned_index] {
        assert!(
            err.contains(&id.to_hex()),
            "check does not name {}: {err}",
            id.short()
        );
    }
    // Only the forged web1 snapshot's (missing) tree is affected, never db1's.
    assert!(
        !err.contains(&format!("affected: snapshot {}", &db1_snapshot[..8])),
        "{err}"
    );
}

#[test]
fn on_a_local_repository_a_writers_forgeries_are_named_skipped_and_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = Lb::new(tmp.path(), Some(PASSPHRASE));
    lb.ok(&["init"]);
    let store: Arc<dyn Backend> = Arc::new(lifeboat_core::backend::LocalBackend::new(&lb.repo));
    forged_objects_are_named_skipped_and_lose_nothing(&lb, tmp.path(), store);
}

#[test]
fn on_garage_a_writers_forgeries_are_named_skipped_and_lose_nothing() {
    let garage = Garage::start();
    let target = garage.target();
    let tmp = tempfile::tempdir().unwrap();
    let lb = Lb::remote(
        tmp.path(),
        &target.url("provenance"),
        target.env(),
        PASSPHRASE,
    );
    lb.ok(&["init"]);
    let store: Arc<dyn Backend> = Arc::new(crate::s3::connect(&target, "provenance", 16 << 20));
    forged_objects_are_named_skipped_and_lose_nothing(&lb, tmp.path(), store);
}

#[test]
fn upgrading_the_previous_releases_repository_keeps_it_restorable_and_re_credentials_writers() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/format2");
    let repo = tmp.path().join("repo");
    assert!(std::process::Command::new("cp")
        .args(["-a", &format!("{fixture}/repo"), repo.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    let lb = Lb::new(tmp.path(), Some("fixture-passphrase"));
    let restore = |name: &str| {
        let target = tmp.path().join(name);
        lb.ok(&[
            "restore",
            "latest",
            "--host",
            "db1",
            "--target",
            target.to_str().unwrap(),
            "--verify",
        ]);
        let got = target.join("tmp/fx/src/data/blob.bin");
        assert_eq!(
            std::fs::read(got).unwrap(),
            std::fs::read(format!("{fixture}/src/data/blob.bin")).unwrap()
        );
    };
    restore("before");
    let out = lb.ok(&["upgrade", "--dry-run"]);
    assert!(out.contains("would vouch for"), "{out}");
    let out = lb.ok(&["upgrade"]);
    assert!(out.contains("now format 3"), "{out}");
    let out = lb.ok(&["upgrade"]);
    assert!(out.contains("already format 3"), "{out}");
    restore("after");
    lb.ok(&["check", "--read-data"]);
    // The previous release's credential is refused with the way out.
    let old = writer_of(
        &lb,
        Path::new(&format!("{fixture}/writer.key")),
        &tmp.path().join("c1"),
    );
    let out = old.fails(&["backup", "/etc/hostname"]);
    assert!(
        stderr(&out).contains("export-writer --host"),
        "{}",
        stderr(&out)
    );
    let key = tmp.path().join("web1.key");
    lb.ok(&[
        "key",
        "export-writer",
        "--host",
        "web1",
        "--out",
        key.to_str().unwrap(),
    ]);
    let web1 = writer_of(&lb, &key, &tmp.path().join("c2"));
    web1.ok(&["backup", "/etc/hostname"]);
    let out = lb.ok(&["snapshots", "--host", "web1"]);
    assert!(
        out.contains("3 snapshots") || out.contains("2 snapshots"),
        "{out}"
    );
}
