//! End-to-end tests against real S3 servers on loopback: Garage (a
//! production S3-compatible store, single node and a 3-node cluster) and
//! moto (AWS's behaviour, including enforced conditional writes). The
//! backend conformance suite runs against both; the binary runs the whole
//! backup life cycle on Garage, with concurrent writers, a node failing
//! mid-backup, and the store going away entirely.
//!
//! The servers come from `servers`, which fails with an install hint when
//! one is missing: these tests never skip.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat_core::backend::{conformance, Backend, S3Backend, S3Options};

use crate::servers::{Garage, Moto, S3Target};
use crate::util::{assert_trees_equal, write_random_file, Lb};
use crate::{stderr, under};

const PASSPHRASE: &str = "correct horse battery staple";

/// A backend on `target` under `prefix`, with the given multipart settings.
pub(crate) fn connect(target: &S3Target, prefix: &str, multipart_threshold: usize) -> S3Backend {
    let mut opts = S3Options::from_url(&target.url(prefix)).unwrap();
    opts.endpoint = Some(target.endpoint.clone());
    opts.path_style = Some(true);
    opts.region = Some(target.region.clone());
    opts.credentials = Some(lifeboat_core::backend::S3Credentials {
        access_key_id: target.access_key_id.clone(),
        secret_access_key: target.secret_access_key.clone(),
    });
    opts.multipart_threshold = multipart_threshold;
    opts.part_size = 5 << 20;
    S3Backend::connect(opts).unwrap_or_else(|e| panic!("connect to {}: {e}", target.endpoint))
}

/// A source tree with compressible text, incompressible data and small files.
pub(crate) fn make_source(root: &Path, seed: u64, big_mib: u64) {
    std::fs::create_dir_all(root.join("etc/conf.d")).unwrap();
    for i in 0..40 {
        std::fs::write(
            root.join(format!("etc/conf.d/{i:02}.conf")),
            format!("# setting {i} seed {seed}\nkey = value {i}\n").repeat(20),
        )
        .unwrap();
    }
    write_random_file(&root.join("data.bin"), big_mib << 20, seed);
    std::fs::write(
        root.join("log.txt"),
        format!("line {seed}\n").repeat(50_000),
    )
    .unwrap();
}

fn restore_and_compare(lb: &Lb, snapshot: &str, src: &Path, target: &Path) {
    lb.ok(&[
        "restore",
        snapshot,
        "--target",
        target.to_str().unwrap(),
        "--verify",
    ]);
    assert_trees_equal(src, &under(target, src));
}

fn spawn(lb: &Lb, args: &[&str]) -> Child {
    lb.command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a child at most `limit`; kills it and fails the test if it
/// takes longer.
fn wait_bounded(child: Child, limit: Duration, what: &str) -> std::process::Output {
    let started = Instant::now();
    let mut child = child;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{what} ran longer than {limit:?}\n{}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_s3_backend_passes_the_conformance_suite_on_garage() {
    let garage = Garage::start();
    let backend = connect(&garage.target(), "conformance", 16 << 20);
    conformance::run_all(&backend);
}

#[test]
fn the_s3_backend_passes_the_conformance_suite_on_moto() {
    let moto = Moto::start();
    let backend = connect(&moto.target("conformance"), "repo", 16 << 20);
    conformance::run_all(&backend);
}

#[test]
fn conditional_writes_are_probed_not_assumed() {
    // moto enforces If-None-Match as AWS does; Garage accepts the header and
    // overwrites. The backend must find out which, and stay put-if-absent
    // on both (the conformance suite checks the latter).
    let moto = Moto::start();
    assert!(
        connect(&moto.target("probe"), "", 16 << 20)
            .capabilities()
            .conditional_writes,
        "moto enforces If-None-Match"
    );
    let garage = Garage::start();
    let caps = connect(&garage.target(), "", 16 << 20).capabilities();
    eprintln!("garage capabilities: {caps:?}");
    let backend = connect(&garage.target(), "probe2", 16 << 20);
    backend.put("config", b"first").unwrap();
    assert_eq!(
        backend.put("config", b"second").unwrap(),
        lifeboat_core::backend::PutOutcome::AlreadyExists
    );
    assert_eq!(backend.get("config", None).unwrap(), b"first");
}

/// Large objects go up in parts; a multipart upload left behind by a crash
/// is aborted by the stale-upload sweep that prune runs.
///
/// `real_upload_times` is false for moto, whose upload listing reports a
/// fixed initiation date in 2010, so every upload looks stale there.
fn multipart_round_trip_and_stale_upload_sweep(target: &S3Target, real_upload_times: bool) {
    let backend = connect(target, "mp", 6 << 20);
    let data: Vec<u8> = (0..(17u32 << 20)).map(|i| (i % 251) as u8).collect();
    backend.put("data/aa/big", &data).unwrap();
    assert_eq!(backend.get("data/aa/big", None).unwrap(), data);
    assert_eq!(
        backend
            .get("data/aa/big", Some(10 << 20..(10 << 20) + 5))
            .unwrap(),
        &data[10 << 20..(10 << 20) + 5]
    );
    assert_eq!(
        backend.put("data/aa/big", &data).unwrap(),
        lifeboat_core::backend::PutOutcome::AlreadyExists
    );
    // A crashed upload: started with another client, never completed.
    let script = format!(
        "import boto3\n\
         s3 = boto3.client('s3', endpoint_url='{}', region_name='{}', \
           aws_access_key_id='{}', aws_secret_access_key='{}')\n\
         s3.create_multipart_upload(Bucket='{}', Key='mp/data/bb/crashed')\n",
        target.endpoint,
        target.region,
        target.access_key_id,
        target.secret_access_key,
        target.bucket
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "boto3 (installed with moto) creates the dangling upload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if real_upload_times {
        assert_eq!(
            backend
                .remove_stale_temp_files(Duration::from_secs(3600), std::time::SystemTime::now())
                .unwrap(),
            0,
            "a young upload may belong to a running backup and is left alone"
        );
    }
    assert_eq!(
        backend
            .remove_stale_temp_files(Duration::ZERO, std::time::SystemTime::now())
            .unwrap(),
        1,
        "the dangling upload is aborted"
    );
    assert_eq!(
        backend
            .remove_stale_temp_files(Duration::ZERO, std::time::SystemTime::now())
            .unwrap(),
        0
    );
}

#[test]
fn multipart_uploads_round_trip_and_stale_ones_are_aborted_on_garage() {
    let garage = Garage::start();
    multipart_round_trip_and_stale_upload_sweep(&garage.target(), true);
}

#[test]
fn multipart_uploads_round_trip_and_stale_ones_are_aborted_on_moto() {
    let moto = Moto::start();
    multipart_round_trip_and_stale_upload_sweep(&moto.target("multipart"), false);
}

#[test]
fn init_creates_a_missing_bucket_and_a_backup_round_trips_on_moto() {
    let moto = Moto::start();
    let mut target = moto.target("existing");
    target.bucket = "created-by-init".to_string();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src, 1, 3);
    let lb = Lb::remote(tmp.path(), &target.url("host1"), target.env(), PASSPHRASE);
    lb.ok(&["init"]);
    lb.ok(&["backup", src.to_str().unwrap()]);
    lb.ok(&["check", "--read-data"]);
    restore_and_compare(&lb, "latest", &src, &tmp.path().join("out"));
}

#[test]
fn the_whole_life_cycle_runs_on_garage() {
    let garage = Garage::start();
    let target = garage.target();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src, 2, 20);
    let lb = Lb::remote(tmp.path(), &target.url("life"), target.env(), PASSPHRASE);
    lb.ok(&["init"]);
    let out = lb.fails(&["init"]);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    lb.ok(&["backup", src.to_str().unwrap()]);
    restore_and_compare(&lb, "latest", &src, &tmp.path().join("first"));
    write_random_file(&src.join("data.bin"), 20 << 20, 3);
    lb.ok(&["backup", src.to_str().unwrap()]);
    lb.ok(&["check", "--read-data"]);
    lb.ok(&["forget", "--keep-last", "1"]);
    lb.ok(&["prune", "--grace", "0s"]);
    lb.ok(&["check", "--read-data"]);
    restore_and_compare(&lb, "latest", &src, &tmp.path().join("second"));
    let snaps: serde_json::Value = serde_json::from_str(&lb.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1);
}

#[test]
fn two_backups_and_a_prune_at_once_on_garage_leave_a_clean_repository() {
    let garage = Garage::start();
    let target = garage.target();
    let tmp = tempfile::tempdir().unwrap();
    let lb = Lb::remote(tmp.path(), &target.url("shared"), target.env(), PASSPHRASE);
    lb.ok(&["init"]);
    // Something for the prune to delete while the backups run.
    let old = tmp.path().join("old");
    make_source(&old, 10, 8);
    lb.ok(&["backup", "--host", "old", old.to_str().unwrap()]);
    let snaps: serde_json::Value = serde_json::from_str(&lb.ok(&["snapshots", "--json"])).unwrap();
    let old_id = snaps[0]["id"].as_str().unwrap().to_string();
    lb.ok(&["forget", &old_id]);
    let sources: Vec<_> = (0..2)
        .map(|i| {
            let src = tmp.path().join(format!("host{i}"));
            make_source(&src, 20 + i, 6);
            // Shared content: both may upload it; dedup must cope.
            write_random_file(&src.join("shared.bin"), 4 << 20, 99);
            src
        })
        .collect();
    let mut children: Vec<Child> = sources
        .iter()
        .enumerate()
        .map(|(i, src)| {
            spawn(
                &lb,
                &[
                    "backup",
                    "--host",
                    &format!("host{i}"),
                    src.to_str().unwrap(),
                ],
            )
        })
        .collect();
    // A zero grace period deletes in the same run, the hardest case: a
    // backup whose uploads the prune condemned must refuse to commit (and
    // succeed when run again); one that commits must keep all its data.
    children.push(spawn(&lb, &["prune", "--grace", "0s"]));
    let mut refused = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = wait_bounded(child, Duration::from_secs(300), "a concurrent job");
        if out.status.success() {
            continue;
        }
        assert!(
            i < 2 && stderr(&out).contains("the snapshot was not committed"),
            "job {i} failed otherwise: {}",
            stderr(&out)
        );
        refused.push(i);
    }
    for &i in &refused {
        lb.ok(&[
            "backup",
            "--host",
            &format!("host{i}"),
            sources[i].to_str().unwrap(),
        ]);
    }
    eprintln!("backups refused by the concurrent prune: {refused:?}");
    lb.ok(&["check", "--read-data"]);
    let snaps: serde_json::Value = serde_json::from_str(&lb.ok(&["snapshots", "--json"])).unwrap();
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    for (i, src) in sources.iter().enumerate() {
        let id = snaps
            .iter()
            .find(|s| s["host"] == format!("host{i}"))
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        restore_and_compare(&lb, &id, src, &tmp.path().join(format!("out{i}")));
    }
}

#[test]
fn a_backup_survives_a_garage_node_failing_in_a_three_node_cluster() {
    let mut garage = Garage::start_cluster(3);
    let target = garage.target();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src, 4, 48);
    let lb = Lb::remote(tmp.path(), &target.url("cluster"), target.env(), PASSPHRASE);
    lb.ok(&["init"]);
    let child = spawn(&lb, &["backup", src.to_str().unwrap()]);
    // Let the backup get going, then fail a node that is not the endpoint.
    std::thread::sleep(Duration::from_millis(1500));
    garage.stop_node(2);
    let out = wait_bounded(child, Duration::from_secs(300), "the backup");
    assert!(
        out.status.success(),
        "backup with one of three nodes down: {}",
        stderr(&out)
    );
    lb.ok(&["check", "--read-data"]);
    restore_and_compare(&lb, "latest", &src, &tmp.path().join("out"));
}

#[test]
fn a_backup_fails_in_bounded_time_when_the_store_goes_away_and_the_repository_stays_valid() {
    let mut garage = Garage::start();
    let target = garage.target();
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    make_source(&first, 5, 2);
    let lb = Lb::remote(tmp.path(), &target.url("outage"), target.env(), PASSPHRASE);
    lb.ok(&["init"]);
    lb.ok(&["backup", first.to_str().unwrap()]);
    let src = tmp.path().join("src");
    make_source(&src, 6, 160);
    let started = Instant::now();
    let child = lb
        .command()
        .args(["--retry-secs", "5", "backup", src.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    garage.stop_node(0);
    let out = wait_bounded(
        child,
        Duration::from_secs(120),
        "the backup against a dead store",
    );
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a storage failure exits 1 ({:?}): {err}",
        out.status
    );
    assert!(
        err.contains(&target.endpoint) || err.contains("gave up"),
        "the message says what failed and where: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    eprintln!("backup gave up after {:?}: {err}", started.elapsed());
    garage.restart_node(0);
    lb.ok(&["check"]);
    restore_and_compare(&lb, "latest", &first, &tmp.path().join("out"));
    // The next backup completes and reuses what the failed one uploaded.
    lb.ok(&["backup", src.to_str().unwrap()]);
    lb.ok(&["check", "--read-data"]);
}

#[test]
fn an_unreachable_endpoint_fails_at_once_with_a_message_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let env = vec![
        ("LIFEBOAT_S3_ENDPOINT".to_string(), endpoint.clone()),
        ("AWS_ACCESS_KEY_ID".to_string(), "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), "test".to_string()),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
        ("AWS_EC2_METADATA_DISABLED".to_string(), "true".to_string()),
    ];
    let lb = Lb::remote(tmp.path(), "s3://nowhere/repo", env, PASSPHRASE);
    let started = Instant::now();
    let out = lb.fails(&["snapshots"]);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(stderr(&out).contains(&endpoint), "{}", stderr(&out));
}

#[test]
fn s3_objects_hold_only_ciphertext() {
    // The credentials of a store are not the keys to the data: every object
    // but the config and the sealed key files is age ciphertext.
    let garage = Garage::start();
    let target = garage.target();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src, 7, 1);
    let lb = Lb::remote(tmp.path(), &target.url("secret"), target.env(), PASSPHRASE);
    lb.ok(&["init"]);
    lb.ok(&["backup", src.to_str().unwrap()]);
    let backend: Arc<dyn Backend> = Arc::new(connect(&target, "secret", 16 << 20));
    let objects = backend.list("").unwrap();
    assert!(objects.iter().any(|o| o.key.starts_with("data/")));
    for o in objects {
        if o.key == "config" || o.key.starts_with("keys/") || o.key.starts_with("probe/") {
            continue;
        }
        let bytes = backend.get(&o.key, None).unwrap();
        assert!(
            bytes.starts_with(b"age-encryption.org/v1"),
            "{} is age ciphertext",
            o.key
        );
    }
}
