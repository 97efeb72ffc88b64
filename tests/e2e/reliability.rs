//! The reliability suite's process-level half (issue 8): `kill -9` of
//! backup, prune and the agent at random moments over one repository
//! (local and Garage), a prune on a host whose clock is hours off, and
//! sources that change under the backup. Loops are bounded by count
//! (`LIFEBOAT_CHAOS_KILLS` raises the kill count for a long run) and every
//! wait by a deadline. Each test prints its figures (kills survived, ...).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::servers::Garage;
use crate::util::{json, lifeboat_bin, write_random_file, Lb};
use crate::{code, stderr};

/// How many kills a chaos test deals: a short run in CI, more on request.
fn kills(short: usize) -> usize {
    std::env::var("LIFEBOAT_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(short)
}

/// A deterministic delay in `[0, max)` for round `i` (xorshift of the seed).
fn delay(seed: u64, max: Duration) -> Duration {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    Duration::from_millis(x % max.as_millis().max(1) as u64)
}

fn spawn(lb: &Lb, args: &[&str]) -> Child {
    lb.command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("lifeboat starts")
}

/// SIGKILLs `child` after `after` unless it finished first; returns how
/// long it ran when it finished by itself, `None` when it was killed.
fn kill_after(mut child: Child, after: Duration) -> Option<Duration> {
    let started = Instant::now();
    let deadline = started + after;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if child.try_wait().unwrap().is_some() {
        return Some(started.elapsed());
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    None
}

/// Snapshot IDs by their `round-N` tag.
fn snapshots_by_round(lb: &Lb) -> Vec<(String, usize)> {
    let v = json(&lb.ok(&["--json", "snapshots"]));
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|s| {
            let round = s["tags"]
                .as_array()?
                .iter()
                .find_map(|t| t.as_str()?.strip_prefix("round-")?.parse().ok())?;
            Some((s["id"].as_str()?.to_string(), round))
        })
        .collect()
}

/// Index objects in a local repository (not the temporary files a killed
/// write leaves beside them).
fn index_objects(lb: &Lb) -> usize {
    match std::fs::read_dir(lb.repo.join("index")) {
        Ok(d) => d
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .count(),
        Err(_) => 0,
    }
}

/// Restores snapshot `id` (taken in `round`, when files `f0..=f{round}`
/// existed) and compares each file with the source, which only grows.
fn restores_exactly(lb: &Lb, id: &str, round: usize, src: &Path, scratch: &Path) {
    let out = scratch.join(format!("restore-{id}"));
    lb.ok(&["restore", id, "--target", out.to_str().unwrap(), "--verify"]);
    let root = crate::under(&out, src);
    let names: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = (0..=round).map(|r| format!("f{r:03}.bin")).collect();
    assert_eq!(names, expected, "snapshot {id} of round {round}");
    for name in &names {
        assert_eq!(
            std::fs::read(root.join(name)).unwrap(),
            std::fs::read(src.join(name)).unwrap(),
            "{name} in snapshot {id}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// Rounds of: add a file, start a backup, SIGKILL it at a random moment
/// (every third round a forget + prune instead), then prove the repository
/// whole: `check --read-data` clean, every committed snapshot restores
/// exactly, and the next backup succeeds, reusing what the killed one
/// indexed. Returns (kills, rounds).
fn survive_kills(
    lb: &Lb,
    src: &Path,
    scratch: &Path,
    rounds: usize,
    file_mib: u64,
    local: bool,
) -> (usize, usize) {
    std::fs::create_dir_all(src).unwrap();
    // Round 0 is not killed: it times a backup of one new file, and kills
    // then land at random moments within that span.
    write_random_file(&src.join("f000.bin"), file_mib << 20, 7);
    let started = Instant::now();
    lb.ok(&["backup", src.to_str().unwrap(), "--tag", "round-0"]);
    // How long a backup and a prune run, as far as the test can tell. A run
    // that outlives its kill moment sets its kind's window to the time it
    // really took, so a slow round 0 (a loaded CI host) does not leave
    // every later kill landing after the run has ended; each kill widens
    // the window a quarter, so kills also reach the ends of runs longer
    // than first seen (the commit of a snapshot, the end of a prune).
    let mut windows = [started.elapsed(); 2];
    let mut kills = 0;
    let mut reuse_checked = 0;
    for round in 1..=rounds {
        write_random_file(
            &src.join(format!("f{round:03}.bin")),
            file_mib << 20,
            round as u64 + 7,
        );
        let tag = format!("round-{round}");
        let before = if local { index_objects(lb) } else { 0 };
        let prune_round = round % 3 == 2;
        let child = if prune_round {
            lb.ok(&["backup", src.to_str().unwrap(), "--tag", &tag]);
            lb.ok(&["forget", "--keep-last", "2"]);
            spawn(lb, &["prune", "--grace", "0s", "--max-unused", "0"])
        } else {
            spawn(lb, &["backup", src.to_str().unwrap(), "--tag", &tag])
        };
        let window = &mut windows[usize::from(prune_round)];
        let at = *window / 10 + delay(round as u64, *window * 9 / 10);
        let killed = match kill_after(child, at) {
            Some(ran) => {
                *window = ran;
                false
            }
            None => {
                *window += *window / 4;
                true
            }
        };
        kills += usize::from(killed);
        let out = lb.run(&["check".as_ref(), "--read-data".as_ref()]);
        assert_eq!(
            code(&out),
            0,
            "round {round}: check after {} {} failed:\n{}",
            if killed { "killing" } else { "letting finish" },
            if prune_round { "prune" } else { "backup" },
            stderr(&out)
        );
        for (id, r) in snapshots_by_round(lb) {
            if r >= round.saturating_sub(1) || round == rounds {
                restores_exactly(lb, &id, r, src, scratch);
            }
        }
        if !prune_round {
            // The next backup completes; when the killed one had written an
            // index object, its packs are reused.
            let indexed = local && index_objects(lb) > before;
            let out = json(&lb.ok(&["--json", "backup", src.to_str().unwrap(), "--tag", &tag]));
            let added = out["summary"]["bytes_added_raw"].as_u64().unwrap();
            if killed && indexed {
                assert!(
                    added < file_mib << 20,
                    "round {round}: the backup after the kill re-uploaded {added} bytes of a {file_mib} MiB file the killed one had indexed"
                );
                reuse_checked += 1;
            }
        }
    }
    eprintln!("kill -9: {kills} kills survived in {rounds} rounds; {reuse_checked} recoveries reused indexed uploads");
    (kills, rounds)
}

#[test]
fn kill_9_of_backup_and_prune_at_random_moments_never_damages_a_local_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = Lb::new(tmp.path(), Some("pw"));
    lb.ok(&["init", "--pack-size", "1"]);
    let (killed, rounds) = survive_kills(
        &lb,
        &tmp.path().join("src"),
        tmp.path(),
        kills(15),
        12,
        true,
    );
    assert!(
        killed * 2 >= rounds,
        "most rounds were killed mid-way: {killed} of {rounds}"
    );
}

#[test]
fn kill_9_of_backup_and_prune_on_garage_never_damages_the_repository() {
    let garage = Garage::start();
    let target = garage.target();
    let tmp = tempfile::tempdir().unwrap();
    let lb = Lb::remote(tmp.path(), &target.url("chaos"), target.env(), "pw");
    lb.ok(&["init", "--pack-size", "1"]);
    let (killed, _) = survive_kills(&lb, &tmp.path().join("src"), tmp.path(), kills(6), 8, false);
    assert!(killed >= 1, "at least one kill landed mid-way");
}

#[test]
fn kill_9_of_the_agent_mid_backup_leaves_the_repository_and_catalog_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let lb = Lb::new(tmp.path(), Some("pw"));
    lb.ok(&["init", "--pack-size", "1"]);
    let state = tmp.path().join("state");
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[repository]\nlocation = \"{}\"\n\n[passphrase]\nenv = \"LIFEBOAT_PASSPHRASE\"\n\n\
             [agent]\nstate_dir = \"{}\"\ncontrol_socket = \"{}/agent.sock\"\n\n\
             [[source]]\nname = \"data\"\npaths = [\"{}\"]\nschedule = \"*/2 * * * * *\"\nrpo = \"1h\"\n",
            lb.repo.display(),
            state.display(),
            state.display(),
            src.display()
        ),
    )
    .unwrap();
    let agent = |args: &[&str]| {
        let mut cmd = Command::new(lifeboat_bin());
        cmd.args(args)
            .env("LIFEBOAT_CONFIG", &config)
            .env("LIFEBOAT_PASSPHRASE", "pw")
            .env("LIFEBOAT_KDF_WORK_FACTOR", "10")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    };
    let rounds = kills(3);
    let mut killed = 0;
    for round in 0..rounds {
        write_random_file(
            &src.join(format!("f{round:03}.bin")),
            16 << 20,
            round as u64 + 99,
        );
        let child = agent(&["agent"]).spawn().unwrap();
        killed += usize::from(
            kill_after(child, Duration::from_millis(400 + 300 * round as u64)).is_none(),
        );
        let out = lb.run(&["check".as_ref(), "--read-data".as_ref()]);
        assert_eq!(code(&out), 0, "round {round}: {}", stderr(&out));
    }
    // After the kills, the agent's own commands still work on its catalog
    // and a backup through it completes.
    let out = agent(&["run", "backup:data"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = agent(&["status", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    lb.ok(&["check", "--read-data"]);
    eprintln!("agent kill -9: {killed} kills survived in {rounds} rounds");
    assert!(killed >= 1);
}

#[test]
fn a_prune_on_a_host_whose_clock_is_hours_off_spares_a_running_backups_uploads() {
    // faketime (libfaketime) shifts the prune's clock; the store's clock
    // (file times, set by the kernel) is what prune must go by.
    let faketime = Command::new("faketime").arg("--version").output();
    assert!(
        faketime.is_ok(),
        "faketime is missing: install it (Debian: apt-get install faketime; .ci/run does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let lb = Lb::new(tmp.path(), Some("pw"));
    lb.ok(&["init", "--pack-size", "1"]);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..12 {
        write_random_file(&src.join(format!("f{i:02}.bin")), 8 << 20, i);
    }
    let skewed = |offset: &str, args: &[&str]| {
        lb.command_under("faketime", &["-f".as_ref(), offset.as_ref()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // faketime really moves lifeboat's clock: a snapshot taken under it is
    // dated ten hours ahead.
    let probe = tmp.path().join("probe");
    std::fs::create_dir(&probe).unwrap();
    std::fs::write(probe.join("x"), "x").unwrap();
    let out = skewed(
        "+10h",
        &["backup", probe.to_str().unwrap(), "--tag", "skewed"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let snaps = json(&lb.ok(&["--json", "snapshots"]));
    let time = snaps[0]["time"].as_str().unwrap();
    let taken = chrono::DateTime::parse_from_rfc3339(time).unwrap();
    let ahead = taken.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(
        ahead > chrono::Duration::hours(9),
        "faketime did not apply: {time}"
    );
    lb.ok(&["forget", snaps[0]["id"].as_str().unwrap()]);

    let mut survived = 0;
    for offset in ["+10h", "-10h"] {
        // A backup on the host with the right clock, paused mid-upload.
        let backup = lb
            .command()
            .args(["backup", src.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read_dir(lb.repo.join("data")).map_or(0, |d| d.count()) < 3 {
            assert!(Instant::now() < deadline, "the backup uploads packs");
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: signals to our own child.
        unsafe { libc::kill(backup.id() as i32, libc::SIGSTOP) };
        // Both phases of prune on the skewed host: condemn, then delete
        // past a one-second grace by its own clock.
        for _ in 0..2 {
            let out = skewed(offset, &["prune", "--grace", "1s"]);
            assert!(out.status.success(), "{}", stderr(&out));
            std::thread::sleep(Duration::from_millis(1100));
        }
        unsafe { libc::kill(backup.id() as i32, libc::SIGCONT) };
        let out = backup.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the paused backup commits after the prune at {offset}: {}",
            stderr(&out)
        );
        lb.ok(&["check", "--read-data"]);
        survived += 1;
    }
    let out = tmp.path().join("restored");
    lb.ok(&[
        "restore",
        "latest",
        "--target",
        out.to_str().unwrap(),
        "--verify",
    ]);
    crate::util::assert_trees_equal(&src, &crate::under(&out, &src));
    eprintln!("clock skew: backups survived prunes at +10 h and -10 h ({survived} of 2)");
}

#[test]
fn sources_that_change_vanish_or_refuse_while_being_read_never_hang_or_break_a_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = Lb::new(tmp.path(), Some("pw"));
    lb.ok(&["init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_random_file(&src.join("grows.bin"), 24 << 20, 1);
    write_random_file(&src.join("shrinks.bin"), 24 << 20, 2);
    write_random_file(&src.join("replaced.bin"), 24 << 20, 3);
    // A FIFO nobody writes to: reading it would block forever.
    let fifo = std::ffi::CString::new(src.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // A path longer than PATH_MAX (4096), built one directory at a time.
    let long = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import os\nos.chdir({:?})\nfor i in range(40):\n    d = 'd' * 120\n    os.mkdir(d)\n    os.chdir(d)\nopen('deep.txt', 'w').write('deep')\n",
            src.to_str().unwrap()
        ))
        .status()
        .unwrap();
    assert!(long.success());
    // Directories that appear and vanish under the walk. (Unreadable files
    // and subtrees need a non-root user: `an_unreadable_file_or_subtree_...`
    // in main.rs runs the backup as nobody.)
    std::fs::create_dir(src.join("churn")).unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mutator = {
        let stop = stop.clone();
        let src = src.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(src.join("grows.bin"))
                    .unwrap();
                f.write_all(&[i as u8; 4096]).unwrap();
                let len = std::fs::metadata(src.join("shrinks.bin")).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(src.join("shrinks.bin"))
                    .unwrap()
                    .set_len(len.saturating_sub(65_536))
                    .unwrap();
                let tmp = src.join(format!(".replacement{i}"));
                std::fs::write(&tmp, vec![i as u8; 100_000]).unwrap();
                std::fs::rename(&tmp, src.join("replaced.bin")).unwrap();
                let dir = src.join("churn").join(format!("d{}", i % 4));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).unwrap();
                } else {
                    std::fs::create_dir_all(dir.join("inner")).unwrap();
                    std::fs::write(dir.join("inner/file"), "x").unwrap();
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            i
        })
    };
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let child = lb
            .command()
            .args(["backup", src.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let out = wait_bounded(child, Duration::from_secs(120));
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "a changing source makes a backup complete or incomplete, never fail: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outcomes.push((out.status.code().unwrap(), started.elapsed()));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mutations = mutator.join().unwrap();
    lb.ok(&["check", "--read-data"]);
    let out = tmp.path().join("out");
    let r = lb.run(&[
        "restore".as_ref(),
        "latest".as_ref(),
        "--target".as_ref(),
        out.as_os_str(),
    ]);
    assert!(
        matches!(r.status.code(), Some(0) | Some(3)),
        "{}",
        stderr(&r)
    );
    let fifo = crate::under(&out, &src).join("fifo");
    assert!(
        std::os::unix::fs::FileTypeExt::is_fifo(
            &std::fs::symlink_metadata(&fifo).unwrap().file_type()
        ),
        "the FIFO is restored as a FIFO, never read"
    );
    eprintln!(
        "source trouble: {mutations} mutations during 3 backups, outcomes {outcomes:?}; \
         FIFO stored unread, a {}-byte path handled",
        40 * 121
    );
}

/// Waits for `child` at most `limit`, killing it (and failing) past that.
fn wait_bounded(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lifeboat hung for more than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One durability-relevant system call from an strace log.
#[derive(Debug)]
enum Sys {
    Mkdir(String),
    Fsync(String),
    Link(String),
}

/// Parses `strace -f -y -e trace=fsync,linkat,mkdir` output (joining
/// `<unfinished ...>` / `resumed>` halves) into the successful calls, in
/// completion order.
fn parse_trace(text: &str) -> Vec<Sys> {
    let mut pending: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let full = if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(pid, head.trim_end().to_string());
            continue;
        } else if rest.starts_with("<... ") {
            let Some((_, tail)) = rest.split_once("resumed>") else {
                continue;
            };
            match pending.remove(pid) {
                Some(head) => format!("{head}{tail}"),
                None => continue,
            }
        } else {
            rest.to_string()
        };
        if !full.trim_end().ends_with("= 0") {
            continue;
        }
        let quoted: Vec<&str> = full.split('"').skip(1).step_by(2).collect();
        if full.starts_with("mkdir(") {
            calls.push(Sys::Mkdir(quoted[0].to_string()));
        } else if full.starts_with("linkat(") {
            calls.push(Sys::Link(quoted[1].to_string()));
        } else if let Some(path) = full
            .strip_prefix("fsync(")
            .and_then(|r| r.split_once('<'))
            .and_then(|(_, r)| r.split_once(">)"))
            .map(|(p, _)| p)
        {
            calls.push(Sys::Fsync(path.to_string()));
        }
    }
    calls
}

fn parent(p: &str) -> String {
    Path::new(p).parent().unwrap().display().to_string()
}

#[test]
fn power_loss_at_any_moment_of_a_backup_leaves_a_valid_local_repository() {
    // The local backend writes a temporary file, fsyncs it, links it to its
    // name and fsyncs the directory. Traced with strace, each object is
    // durable from the first fsync of its directory after its link (and of
    // its directory's parent after a mkdir); a power cut at any moment keeps
    // exactly the durable objects. Cutting at every such moment must leave
    // a valid repository whose snapshot, if present, restores exactly.
    assert!(
        Command::new("strace").arg("-V").output().is_ok(),
        "strace is missing: install it (Debian: apt-get install strace; .ci/run does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let lb = Lb::new(tmp.path(), Some("pw"));
    lb.ok(&["init", "--pack-size", "1"]);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..3 {
        write_random_file(&src.join(format!("f{i}.bin")), 3 << 20, i + 40);
    }
    let trace = tmp.path().join("trace");
    let strace: Vec<&std::ffi::OsStr> = ["-f", "-y", "-qq", "-e", "trace=fsync,linkat,mkdir", "-o"]
        .iter()
        .map(std::ffi::OsStr::new)
        .chain([trace.as_os_str()])
        .collect();
    let out = lb
        .command_under("strace", &strace)
        .args(["backup", src.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let repo = lb.repo.display().to_string();
    let calls = parse_trace(&std::fs::read_to_string(&trace).unwrap());
    let fsynced_after = |dir: &str, after: usize| {
        calls
            .iter()
            .enumerate()
            .skip(after + 1)
            .find(|(_, c)| matches!(c, Sys::Fsync(p) if p == dir))
            .map(|(i, _)| i)
    };
    let mut dir_durable: std::collections::HashMap<String, usize> = Default::default();
    let mut objects: Vec<(String, usize, Option<usize>)> = Vec::new();
    for (i, c) in calls.iter().enumerate() {
        match c {
            Sys::Mkdir(d) if d.starts_with(&repo) => {
                let at = fsynced_after(&parent(d), i)
                    .expect("a new directory is fsynced into its parent");
                dir_durable.insert(d.clone(), at);
            }
            Sys::Link(f) if f.starts_with(&repo) => {
                let dir = parent(f);
                let durable = fsynced_after(&dir, i)
                    .map(|at| at.max(dir_durable.get(&dir).copied().unwrap_or(0)));
                objects.push((f.clone(), i, durable));
            }
            _ => {}
        }
    }
    let snapshot = objects
        .iter()
        .find(|(f, _, _)| f.contains("/snapshots/"))
        .expect("the backup wrote a snapshot")
        .clone();
    assert!(objects.len() > 5, "{objects:?}");
    // The ordering the format relies on: everything else is durable before
    // the snapshot object is even linked.
    for (f, _, durable) in &objects {
        if *f != snapshot.0 {
            let d = durable.unwrap_or_else(|| panic!("{f} is never made durable"));
            assert!(
                d < snapshot.1,
                "{f} becomes durable only after the snapshot is linked"
            );
        }
    }
    // Power cuts: just before and after each object becomes durable.
    let mut cuts: Vec<usize> = objects.iter().filter_map(|o| o.2).collect();
    cuts.push(snapshot.1);
    cuts.sort_unstable();
    cuts.dedup();
    let mut with_snapshot = 0;
    for (n, cut) in cuts.iter().enumerate() {
        let copy = tmp.path().join(format!("cut{n}"));
        let cp = Command::new("cp")
            .arg("-al")
            .arg(&lb.repo)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(cp.success());
        for (f, _, durable) in &objects {
            if durable.is_none_or(|d| d > *cut) {
                let lost = copy.join(Path::new(f).strip_prefix(&lb.repo).unwrap());
                std::fs::remove_file(lost).unwrap();
            }
        }
        let mut at_cut = lb.clone();
        at_cut.repo = copy.clone();
        at_cut.cache = tmp.path().join(format!("cache{n}"));
        at_cut.ok(&["check", "--read-data"]);
        let snaps = json(&at_cut.ok(&["--json", "snapshots"]));
        if !snaps.as_array().unwrap().is_empty() {
            with_snapshot += 1;
            let out = tmp.path().join(format!("out{n}"));
            at_cut.ok(&[
                "restore",
                "latest",
                "--target",
                out.to_str().unwrap(),
                "--verify",
            ]);
            crate::util::assert_trees_equal(&src, &crate::under(&out, &src));
            std::fs::remove_dir_all(&out).unwrap();
        }
        std::fs::remove_dir_all(&copy).unwrap();
    }
    eprintln!(
        "power loss: {} objects traced, {} cut points, all valid; the snapshot survived {with_snapshot} of them",
        objects.len(),
        cuts.len()
    );
    assert!(with_snapshot >= 1 && with_snapshot < cuts.len());
}

#[test]
fn a_directory_of_a_hundred_thousand_entries_backs_up_lists_and_restores() {
    // LIFEBOAT_BIG_DIR_ENTRIES=1000000 for the million-entry run.
    let entries: usize = std::env::var("LIFEBOAT_BIG_DIR_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let tmp = tempfile::tempdir().unwrap();
    let lb = Lb::new(tmp.path(), Some("pw"));
    lb.ok(&["init"]);
    let src = tmp.path().join("src");
    let big = src.join("big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..entries {
        std::fs::write(big.join(format!("e{i:07}")), i.to_le_bytes()).unwrap();
    }
    let started = Instant::now();
    let out = json(&lb.ok(&["--json", "backup", src.to_str().unwrap()]));
    let took = started.elapsed();
    assert_eq!(
        out["summary"]["files_new"].as_u64(),
        Some(entries as u64),
        "{out}"
    );
    let listing = lb.ok(&["ls", "latest", big.to_str().unwrap()]);
    assert_eq!(
        listing.lines().count(),
        entries + 1,
        "the directory and its entries"
    );
    let target = tmp.path().join("out");
    lb.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    let restored = crate::under(&target, &big);
    assert_eq!(std::fs::read_dir(&restored).unwrap().count(), entries);
    for i in [0, entries / 2, entries - 1] {
        assert_eq!(
            std::fs::read(restored.join(format!("e{i:07}"))).unwrap(),
            i.to_le_bytes()
        );
    }
    eprintln!("big directory: {entries} entries backed up in {took:?}");
}
