//! End-to-end tests: the real `lifeboat` binary against real directories
//! and local repositories, the way an operator uses it. Each test names the
//! behaviour it proves; shared helpers are in `util`.

mod agent;
mod browser;
mod drills;
mod packaging;
mod provenance;
mod ransomware;
mod reliability;
mod s3;
mod servers;
mod util;

use std::path::{Path, PathBuf};
use std::process::Command;

use util::{assert_trees_equal, flip_byte, make_metadata_tree, write_random_file, Lb};

/// Where a restore puts an absolute source path below its target.
fn under(target: &Path, src: &Path) -> PathBuf {
    target.join(src.strip_prefix("/").unwrap())
}

fn code(out: &std::process::Output) -> i32 {
    out.status.code().expect("exited normally")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn new_repo(tmp: &Path) -> Lb {
    let lb = Lb::new(tmp, Some("correct horse battery staple"));
    lb.ok(&["init"]);
    lb
}

#[test]
fn every_kind_of_metadata_survives_backup_and_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let created = make_metadata_tree(&src);
    // Each case the tree could not create would go untested: fail instead
    // of passing quietly. Devices and foreign ownership need root.
    assert!(
        created.xattrs && created.fifo,
        "xattrs or FIFO could not be created here: {created:?}"
    );
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            created.devices && created.chown,
            "as root, device nodes and chown must work: {created:?}"
        );
    } else {
        eprintln!("not root: device nodes and foreign ownership are not exercised ({created:?})");
    }
    let lb = new_repo(tmp.path());
    lb.ok(&["backup", src.to_str().unwrap()]);
    let target = tmp.path().join("restored");
    lb.ok(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--verify",
    ]);
    assert_trees_equal(&src, &under(&target, &src));
}

#[test]
fn a_restore_in_batches_of_one_two_or_three_entries_equals_one_in_a_single_batch() {
    // Tiny batches put hard links, symlinks and the last entries of
    // directories on every side of a batch boundary.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_metadata_tree(&src);
    let lb = new_repo(tmp.path());
    lb.ok(&["backup", src.to_str().unwrap()]);
    let restore = |name: &str, extra: &[&str]| {
        let target = tmp.path().join(name);
        let mut args = vec!["restore", "latest", "--target", target.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = lb.ok(&args);
        (target, out)
    };
    for batch in ["1", "2", "3"] {
        let (target, _) = restore(&format!("whole-{batch}"), &["--batch", batch, "--verify"]);
        assert_trees_equal(&src, &under(&target, &src));
    }
    // A partial restore creates the directories above what it selects,
    // with their metadata, however the entries fall into batches.
    let partial = ["--include", "hardlinks", "--include", "**/level2/level3"];
    let (single, _) = restore("partial-single", &partial);
    for batch in ["1", "2"] {
        let mut extra = partial.to_vec();
        extra.extend(["--batch", batch]);
        let (target, _) = restore(&format!("partial-{batch}"), &extra);
        assert_trees_equal(&single, &target);
    }
    let root = under(&single, &src);
    assert!(root.join("hardlinks/second.txt").exists());
    assert!(root.join("nested/level1/level2/level3/deep.txt").exists());
    assert!(!root.join("hello.txt").exists(), "only what was included");
    let refused = lb.fails(&["restore", "latest", "--target", "x", "--batch", "0"]);
    assert!(stderr(&refused).contains("--batch"), "{}", stderr(&refused));
}

#[test]
fn a_restore_of_many_copies_of_one_file_fits_in_128_file_descriptors() {
    // The copies share one blob, written to every copy in one go; holding
    // a descriptor per copy failed with "Too many open files" once the
    // copies outnumbered the limit (systemd's default soft limit is 1024).
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let body = "one license text, copied into every package\n".repeat(100);
    for i in 0..600 {
        std::fs::write(src.join(format!("copy-{i:03}")), &body).unwrap();
    }
    let lb = new_repo(tmp.path());
    lb.ok(&["backup", src.to_str().unwrap()]);
    let target = tmp.path().join("restored");
    let out = lb
        .command_under("prlimit", &["--nofile=128:128".as_ref(), "--".as_ref()])
        .args(["restore", "latest", "--target", target.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_trees_equal(&src, &under(&target, &src));
}

#[test]
fn a_corrupted_byte_in_a_pack_fails_check_and_names_the_affected_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_random_file(&src.join("precious.db"), 3 << 20, 42);
    std::fs::write(src.join("small.txt"), "small\n").unwrap();
    let lb = new_repo(tmp.path());
    lb.ok(&["backup", src.to_str().unwrap()]);
    lb.ok(&["check", "--read-data"]);
    // The largest pack holds the random file's data.
    let pack = walk_files(&lb.repo.join("data"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let len = std::fs::metadata(&pack).unwrap().len();
    flip_byte(&pack, len / 2);
    let out = lb.fails(&["check", "--read-data"]);
    assert_eq!(
        code(&out),
        13,
        "corruption has its own exit code: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("precious.db"),
        "check names the affected file: {err}"
    );
    assert!(
        err.contains(&pack.file_name().unwrap().to_string_lossy()[..8]),
        "and the pack: {err}"
    );
    // The undamaged file still restores; the damaged one is reported.
    let target = tmp.path().join("out");
    let out = lb.fails(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("precious.db"));
    let small = under(&target, &src).join("small.txt");
    assert_eq!(
        std::fs::read_to_string(&small).unwrap_or_else(|e| panic!(
            "{}: {e}\n{}{}",
            small.display(),
            stderr(&out),
            String::from_utf8_lossy(&out.stdout)
        )),
        "small\n"
    );
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn exit_codes_distinguish_missing_repository_and_wrong_passphrase() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = Lb::new(tmp.path(), Some("right"));
    let out = lb.fails(&["snapshots"]);
    assert_eq!(code(&out), 10, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("lifeboat init"),
        "says how to fix it: {}",
        stderr(&out)
    );
    lb.ok(&["init"]);
    let out = lb.fails(&["init"]);
    assert!(stderr(&out).contains("already exists"));
    let wrong = Lb {
        passphrase: Some("wrong".into()),
        ..lb.clone()
    };
    let out = wrong.fails(&["snapshots"]);
    assert_eq!(code(&out), 12, "{}", stderr(&out));
    let none = Lb {
        passphrase: None,
        ..lb.clone()
    };
    let out = none.fails(&["snapshots"]);
    assert!(
        stderr(&out).contains("LIFEBOAT_PASSPHRASE"),
        "{}",
        stderr(&out)
    );
    let json = wrong.fails(&["snapshots", "--json"]);
    let v: serde_json::Value =
        serde_json::from_slice(&json.stderr).expect("JSON error under --json");
    assert_eq!(v["exit_code"], 12);
}

#[test]
fn passphrase_file_and_key_management_work_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = new_repo(tmp.path());
    let second = tmp.path().join("second.pass");
    std::fs::write(&second, "second passphrase\n").unwrap();
    lb.ok(&[
        "key",
        "add",
        "--new-passphrase-file",
        second.to_str().unwrap(),
    ]);
    let keys: serde_json::Value = serde_json::from_str(&lb.ok(&["key", "list", "--json"])).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let other = Lb {
        passphrase: None,
        ..lb.clone()
    };
    other.ok(&["snapshots", "--passphrase-file", second.to_str().unwrap()]);
    let second_id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["current"] == false)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    lb.ok(&["key", "remove", &second_id]);
    assert_eq!(
        code(&other.fails(&["snapshots", "--passphrase-file", second.to_str().unwrap()])),
        12
    );
    std::fs::write(&second, "third\n").unwrap();
    lb.ok(&[
        "key",
        "passwd",
        "--new-passphrase-file",
        second.to_str().unwrap(),
    ]);
    assert_eq!(
        code(&lb.fails(&["snapshots"])),
        12,
        "the old passphrase no longer opens it"
    );
    other.ok(&["snapshots", "--passphrase-file", second.to_str().unwrap()]);
}

#[test]
fn stdin_backups_round_trip_through_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = new_repo(tmp.path());
    let dump_src = tmp.path().join("db.sql");
    write_random_file(&dump_src, 2 << 20, 7);
    let out = lb
        .command()
        .args([
            "backup",
            "--stdin",
            "--stdin-filename",
            "db.sql",
            "--tag",
            "db",
        ])
        .stdin(std::fs::File::open(&dump_src).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = lb
        .command()
        .args(["dump", "latest", "/db.sql"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        out.stdout == std::fs::read(&dump_src).unwrap(),
        "dump returns the exact bytes"
    );
    let snaps: serde_json::Value =
        serde_json::from_str(&lb.ok(&["snapshots", "--json", "--tag", "db"])).unwrap();
    assert_eq!(snaps[0]["paths"][0], "/db.sql");
}

#[test]
fn an_unreadable_file_or_subtree_is_a_warning_the_snapshot_is_saved_as_incomplete_and_the_same_user_restores_it(
) {
    let tmp = tempfile::tempdir().unwrap();
    // Run as an unprivileged user so that permissions apply (tests run as root).
    let base = tmp.path().join("world");
    std::fs::create_dir(&base).unwrap();
    set_mode(&base, 0o777);
    set_mode(tmp.path(), 0o755);
    let src = base.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("readable"), "ok").unwrap();
    std::fs::write(src.join("secret"), "no").unwrap();
    set_mode(&src.join("secret"), 0o600);
    // A whole subtree nobody but its owner may enter.
    std::fs::create_dir_all(src.join("private/deeper")).unwrap();
    std::fs::write(src.join("private/deeper/key"), "k").unwrap();
    set_mode(&src.join("private"), 0o700);
    set_mode(&src.join("readable"), 0o644);
    set_mode(&src, 0o755);
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(util::lifeboat_bin())
            .args(["--repo", base.join("repo").to_str().unwrap()])
            .args(args)
            .env("LIFEBOAT_PASSPHRASE", "pw")
            .env("LIFEBOAT_KDF_WORK_FACTOR", "10")
            .env("LIFEBOAT_CACHE_DIR", base.join("cache"))
            .output()
            .unwrap()
    };
    let out = as_nobody(&["init"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = as_nobody(&["backup", src.to_str().unwrap()]);
    assert_eq!(
        code(&out),
        3,
        "incomplete snapshot exit code: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("secret") && stderr(&out).contains("private"),
        "the warnings name the file and the subtree: {}",
        stderr(&out)
    );
    let out = as_nobody(&["snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["incomplete"], true);
    let out = as_nobody(&["ls", "latest"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("/readable")
            && !listing.contains("/secret")
            && !listing.contains("/private/deeper"),
        "{listing}"
    );
    // The same user restores what was read, nameless files included: newer
    // kernels let their creator link them by descriptor; older ones want
    // CAP_DAC_READ_SEARCH for that, and restore then links them through
    // /proc/self/fd (`restore::tests::linking_through_proc_...`).
    let restored = base.join("restored");
    let out = as_nobody(&[
        "restore",
        "latest",
        "--target",
        restored.to_str().unwrap(),
        "--verify",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let file = under(&restored, &src).join("readable");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "ok");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o644, 65534));
    let leftovers: Vec<_> = std::fs::read_dir(under(&restored, &src))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".lb-restore"))
        .collect();
    assert!(leftovers.is_empty(), "temporary names left: {leftovers:?}");
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn incremental_backup_diff_ls_and_partial_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("keep")).unwrap();
    std::fs::write(src.join("keep/a.txt"), "a").unwrap();
    std::fs::write(src.join("b.txt"), "b").unwrap();
    std::fs::write(src.join("junk.tmp"), "junk").unwrap();
    // Files changed in the last two seconds are never trusted from the cache
    // (their timestamps could hide a second change); let these age.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let lb = new_repo(tmp.path());
    let first: serde_json::Value = serde_json::from_str(&lb.ok(&[
        "backup",
        "--json",
        "--exclude",
        "*.tmp",
        src.to_str().unwrap(),
    ]))
    .unwrap();
    std::fs::write(src.join("b.txt"), "bb").unwrap();
    std::fs::write(src.join("c.txt"), "c").unwrap();
    let second: serde_json::Value = serde_json::from_str(&lb.ok(&[
        "backup",
        "--json",
        "--exclude",
        "*.tmp",
        src.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(second["summary"]["files_new"], 1, "{second}");
    assert_eq!(second["summary"]["files_changed"], 1, "{second}");
    assert_eq!(second["summary"]["files_unmodified"], 1, "{second}");
    let listing = lb.ok(&["ls", "latest"]);
    assert!(!listing.contains("junk.tmp"), "excluded: {listing}");
    let first_id = first["snapshot"].as_str().unwrap();
    let diff = lb.ok(&["diff", &first_id[..10], "latest"]);
    assert!(diff.contains("+ ") && diff.contains("c.txt"), "{diff}");
    assert!(diff.contains("M ") && diff.contains("b.txt"), "{diff}");
    let target = tmp.path().join("partial");
    lb.ok(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--include",
        "**/keep",
    ]);
    let root = under(&target, &src);
    assert_eq!(
        std::fs::read_to_string(root.join("keep/a.txt")).unwrap(),
        "a"
    );
    assert!(
        !root.join("b.txt").exists(),
        "only the included path is restored"
    );
    let dry = lb.ok(&[
        "restore",
        "latest",
        "--target",
        tmp.path().join("dry").to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(
        dry.contains("would restore") && !tmp.path().join("dry").exists(),
        "{dry}"
    );
}

#[test]
fn forget_explains_its_decisions_and_prune_frees_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let lb = new_repo(tmp.path());
    for i in 0..3 {
        write_random_file(&src.join("data"), 1 << 20, i);
        lb.ok(&["backup", src.to_str().unwrap()]);
    }
    let dry = lb.ok(&["forget", "--keep-last", "1", "--dry-run"]);
    assert!(
        dry.contains("keep") && dry.contains("last snapshot") && dry.contains("remove"),
        "{dry}"
    );
    assert!(dry.contains("would remove 2 snapshots"), "{dry}");
    lb.ok(&["forget", "--keep-last", "1"]);
    let before = walk_files(&lb.repo.join("data")).len();
    let out = lb.ok(&["prune", "--grace", "0s"]);
    let after = walk_files(&lb.repo.join("data")).len();
    assert!(
        after < before,
        "prune deleted packs ({before} -> {after}): {out}"
    );
    lb.ok(&["check", "--read-data"]);
    let target = tmp.path().join("out");
    lb.ok(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--verify",
    ]);
    let out = lb.fails(&["forget"]);
    assert!(
        stderr(&out).contains("keep"),
        "an empty policy is refused: {}",
        stderr(&out)
    );
}

#[test]
fn a_pack_opens_with_the_standard_age_and_zstd_tools() {
    for tool in ["age", "zstd"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        assert!(found, "the `{tool}` command is needed for this test: apt-get install {tool} (.ci/run installs it)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(
        src.join("letter.txt"),
        "if found, please return to the SRE team\n".repeat(50),
    )
    .unwrap();
    let lb = new_repo(tmp.path());
    lb.ok(&["backup", src.to_str().unwrap()]);
    let identity = tmp.path().join("identity.txt");
    lb.ok(&[
        "key",
        "export-identity",
        "--out",
        identity.to_str().unwrap(),
    ]);
    let mut found = false;
    for pack in walk_files(&lb.repo.join("data")) {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "age -d -i '{}' '{}' | zstd -d",
                identity.display(),
                pack.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "age | zstd failed: {}", stderr(&out));
        found |= String::from_utf8_lossy(&out.stdout).contains("please return to the SRE team");
    }
    assert!(
        found,
        "the file's text is in a pack opened without lifeboat"
    );
    let snap = walk_files(&lb.repo.join("snapshots")).pop().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "age -d -i '{}' '{}' | zstd -d",
            identity.display(),
            snap.display()
        ))
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("snapshot is age + zstd + JSON");
    assert!(v["tree"].is_string());
}

#[test]
fn two_processes_back_up_into_one_repository_at_the_same_time() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = new_repo(tmp.path());
    let sources: Vec<PathBuf> = (0..2)
        .map(|i| {
            let src = tmp.path().join(format!("host{i}"));
            std::fs::create_dir(&src).unwrap();
            write_random_file(&src.join("unique.bin"), 4 << 20, 100 + i);
            // Shared content: both processes may upload it; dedup must cope.
            write_random_file(&src.join("shared.bin"), 4 << 20, 7);
            src
        })
        .collect();
    let children: Vec<_> = sources
        .iter()
        .enumerate()
        .map(|(i, src)| {
            // Both share one cache directory, as two backups on one host do.
            lb.command()
                .args([
                    "backup",
                    "--host",
                    &format!("host{i}"),
                    src.to_str().unwrap(),
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    lb.ok(&["check", "--read-data"]);
    let snaps: serde_json::Value = serde_json::from_str(&lb.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 2);
    for (i, src) in sources.iter().enumerate() {
        let target = tmp.path().join(format!("out{i}"));
        let id = snaps
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["host"] == format!("host{i}"))
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        lb.ok(&[
            "restore",
            &id,
            "--target",
            target.to_str().unwrap(),
            "--verify",
        ]);
        assert_trees_equal(src, &under(&target, src));
    }
}

#[test]
fn init_accepts_a_relative_one_word_repository_path() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(util::lifeboat_bin())
        .args(["--repo", "repo", "init"])
        .current_dir(tmp.path())
        .env("LIFEBOAT_PASSPHRASE", "pw")
        .env("LIFEBOAT_KDF_WORK_FACTOR", "10")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(tmp.path().join("repo/config").exists());
}

#[test]
fn ctrl_c_exits_130_and_leaves_the_repository_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = new_repo(tmp.path());
    let mut child = lb
        .command()
        .args(["backup", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Feed some data, then interrupt while the backup waits for more.
    use std::io::Write;
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(&vec![7u8; 3 << 20])
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    lb.ok(&["check", "--read-data"]);
    let snaps: serde_json::Value = serde_json::from_str(&lb.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(
        snaps.as_array().unwrap().len(),
        0,
        "no snapshot from an interrupted backup"
    );
}

#[test]
fn a_reader_closing_the_pipe_early_ends_ls_quietly() {
    // Regression: with SIGPIPE at its default the S3 client died on a
    // dropped connection; with it ignored, `println!` must not panic when
    // the reader of stdout goes away.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..3000 {
        std::fs::write(
            src.join(format!("a-file-with-a-rather-long-name-{i:05}.txt")),
            b"x",
        )
        .unwrap();
    }
    let lb = new_repo(tmp.path());
    lb.ok(&["backup", src.to_str().unwrap()]);
    let mut child = lb
        .command()
        .args(["ls", "latest"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 141)),
        "exits on its own, not killed by SIGPIPE: {:?}: {}",
        out.status,
        stderr(&out)
    );
    assert!(
        stderr(&out).is_empty(),
        "nothing on stderr: {}",
        stderr(&out)
    );
}
