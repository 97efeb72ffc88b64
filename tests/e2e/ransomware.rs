//! Ransomware-proof backups through the binary: a write-only host (`key
//! export-writer`, `--writer-key`) that backs up with full dedup and can
//! read or delete nothing, and Object Lock on moto (which enforces it) that
//! keeps locked snapshots from `forget`, `prune` and the S3 API itself.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::s3::make_source;
use crate::servers::Moto;
use crate::util::{assert_trees_equal, json, Lb};
use crate::{code, new_repo, stderr, under};

const PASSPHRASE: &str = "correct horse battery staple";

/// The same repository through a writer credential: no passphrase at all.
fn writer_of(lb: &Lb, key: &Path, cache: &Path) -> Lb {
    let mut writer = lb.clone();
    writer.passphrase = None;
    writer.cache = cache.to_path_buf();
    writer
        .env
        .push(("LIFEBOAT_WRITER_KEY".into(), key.display().to_string()));
    writer
}

#[test]
fn a_write_only_host_backs_up_with_dedup_and_every_read_or_delete_command_exits_14() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src, 1, 4);
    let full = new_repo(tmp.path());
    full.ok(&["backup", src.to_str().unwrap()]);

    let key = tmp.path().join("writer.key");
    full.ok(&[
        "key",
        "export-writer",
        "--host",
        "web1",
        "--out",
        key.to_str().unwrap(),
    ]);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the credential is private");
    let again = full.fails(&[
        "key",
        "export-writer",
        "--host",
        "web1",
        "--out",
        key.to_str().unwrap(),
    ]);
    assert!(
        stderr(&again).contains("must not exist yet"),
        "{}",
        stderr(&again)
    );

    // A host with a fresh cache dedups against what the full-key host stored.
    let writer = writer_of(&full, &key, &tmp.path().join("writer-cache"));
    std::fs::write(src.join("new.txt"), "only this is new\n".repeat(50)).unwrap();
    let out = json(&writer.ok(&["--json", "backup", src.to_str().unwrap()]));
    let added = out["summary"]["bytes_added_raw"].as_u64().unwrap();
    assert!(
        added < 64 * 1024,
        "dedup against the whole repository: {out}"
    );

    let restore_to = tmp.path().join("refused");
    let refused: [&[&str]; 11] = [
        &["snapshots"],
        &["ls", "latest"],
        &["diff", "latest", "latest"],
        &[
            "restore",
            "latest",
            "--target",
            restore_to.to_str().unwrap(),
        ],
        &["dump", "latest", "/etc/hostname"],
        &["check", "--read-data"],
        &["forget", "--keep-last", "1"],
        &["prune"],
        &["key", "list"],
        &["key", "export-identity", "--out", "/tmp/never"],
        &["drill", "run"],
    ];
    for args in refused {
        let out = writer.fails(args);
        assert_eq!(code(&out), 14, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("needs the repository's full key"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(!restore_to.exists());
    assert!(!Path::new("/tmp/never").exists());

    // The full key restores what the writer backed up, byte for byte.
    let target = tmp.path().join("restored");
    full.ok(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--verify",
    ]);
    assert_trees_equal(&src, &under(&target, &src));
    full.ok(&["check", "--read-data"]);
}

#[test]
fn a_writer_credential_of_another_repository_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let a = new_repo(&tmp.path().join("a"));
    let b = new_repo(&tmp.path().join("b"));
    let key = tmp.path().join("a.key");
    a.ok(&[
        "key",
        "export-writer",
        "--host",
        "web1",
        "--out",
        key.to_str().unwrap(),
    ]);
    let writer = writer_of(&b, &key, &tmp.path().join("cache"));
    let out = writer.fails(&["backup", "/etc/hostname"]);
    assert!(
        stderr(&out).contains("belongs to repository"),
        "{}",
        stderr(&out)
    );
}

/// Runs a boto3 script against moto and returns its stdout.
fn boto3(moto_endpoint: &str, script: &str) -> String {
    let full = format!(
        "import boto3, json, botocore\n\
         s3 = boto3.client('s3', endpoint_url='{moto_endpoint}', region_name='us-east-1', \
           aws_access_key_id='test', aws_secret_access_key='test')\n{script}"
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &full])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "boto3 script failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        full
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn object_lock_on_moto_keeps_locked_snapshots_from_forget_prune_and_the_s3_api() {
    let moto = Moto::start();
    // init creates the bucket, with Object Lock because of --lock-days.
    let mut target = moto.target("unrelated");
    target.bucket = "locked-by-init".to_string();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src, 2, 4);
    let lb = Lb::remote(tmp.path(), &target.url("host1"), target.env(), PASSPHRASE);
    let out = lb.ok(&["init", "--lock-days", "1", "--lock-mode", "compliance"]);
    assert!(out.contains("immutable for 1 days"), "{out}");
    lb.ok(&["backup", src.to_str().unwrap()]);

    // A write-only host adds a snapshot to the locked repository.
    let key = tmp.path().join("writer.key");
    lb.ok(&[
        "key",
        "export-writer",
        "--host",
        "web1",
        "--out",
        key.to_str().unwrap(),
    ]);
    let writer = writer_of(&lb, &key, &tmp.path().join("writer-cache"));
    std::fs::write(src.join("later.txt"), "written later\n").unwrap();
    writer.ok(&["backup", src.to_str().unwrap()]);

    let snaps = json(&lb.ok(&["--json", "snapshots"]));
    let snaps = snaps.as_array().expect("a list of snapshots");
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    let first = snaps[0]["id"].as_str().unwrap().to_string();
    assert!(
        snaps.iter().all(|s| s["locked_until"].is_string()),
        "{snaps:?}"
    );

    // Through lifeboat: forget refuses by name; a policy keeps locked ones.
    let out = lb.fails(&["forget", &first]);
    assert!(
        stderr(&out).contains("still under Object Lock") && stderr(&out).contains(&first[..8]),
        "{}",
        stderr(&out)
    );
    let out = lb.ok(&["forget", "--keep-last", "1"]);
    assert!(out.contains("locked until"), "{out}");
    assert!(out.contains("removed 0 snapshots"), "{out}");
    let out = lb.ok(&["prune", "--grace", "0s"]);
    assert!(out.contains("delete 0 packs"), "{out}");

    // Through the S3 API: every snapshot, pack and index object carries a
    // compliance retention, and deleting a version of one is refused.
    // (moto 5 answers GetObjectRetention with a 500; HEAD shows the lock.)
    let report = boto3(
        moto.endpoint(),
        "bucket = 'locked-by-init'\n\
         listing = s3.list_object_versions(Bucket=bucket, Prefix='host1/')\n\
         versions = listing['Versions']\n\
         out = {'objects': 0, 'locked': 0, 'refused': 0, 'markers': len(listing.get('DeleteMarkers', [])),\n\
         \x20      'leftovers': sum(1 for v in versions if '/probe/' in v['Key'] or '/pending/clock-' in v['Key'])}\n\
         for v in versions:\n\
         \x20   key = v['Key']\n\
         \x20   if not any(key.startswith('host1/' + p) for p in ('snapshots/', 'data/', 'index/')):\n\
         \x20       continue\n\
         \x20   out['objects'] += 1\n\
         \x20   head = s3.head_object(Bucket=bucket, Key=key, VersionId=v['VersionId'])\n\
         \x20   if head.get('ObjectLockMode') == 'COMPLIANCE' and 'ObjectLockRetainUntilDate' in head:\n\
         \x20       out['locked'] += 1\n\
         \x20   if key.startswith('host1/snapshots/'):\n\
         \x20       try:\n\
         \x20           s3.delete_object(Bucket=bucket, Key=key, VersionId=v['VersionId'])\n\
         \x20       except botocore.exceptions.ClientError as e:\n\
         \x20           out['refused'] += 1\n\
         print(json.dumps(out))\n",
    );
    let report = json(report.trim());
    let objects = report["objects"].as_u64().unwrap();
    assert!(objects >= 6, "{report}");
    assert_eq!(report["locked"].as_u64(), Some(objects), "{report}");
    assert_eq!(report["refused"].as_u64(), Some(2), "{report}");
    // Deletes in a versioned bucket remove versions by ID: the probes and
    // prune's clock object are gone, not hidden behind delete markers.
    assert_eq!(report["markers"].as_u64(), Some(0), "{report}");
    assert_eq!(report["leftovers"].as_u64(), Some(0), "{report}");

    // And the data is all there.
    lb.ok(&["check", "--read-data"]);
    let target_dir = tmp.path().join("restored");
    lb.ok(&[
        "restore",
        "latest",
        "--target",
        target_dir.to_str().unwrap(),
        "--verify",
    ]);
    assert_trees_equal(&src, &under(&target_dir, &src));
}
