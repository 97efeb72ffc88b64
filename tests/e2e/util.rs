//! Shared helpers for the end-to-end tests, which drive the real `lifeboat`
//! binary the way a user would. They build a source tree that exercises every
//! kind of file metadata a backup must preserve, run the binary against a
//! throw-away repository with a fast key derivation, and compare a restored
//! tree with its original, listing every difference at once so that a single
//! failing run shows the whole picture rather than the first symptom.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsStr};
use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// One mebibyte, the unit most sizes in these tests are expressed in.
const MIB: u64 = 1 << 20;

/// Block size for streamed reads and writes. Large enough to keep the number
/// of system calls low, small enough that no test ever holds a whole file.
const BLOCK: usize = 256 * 1024;

/// Path of the lifeboat binary under test.
pub fn lifeboat_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lifeboat"))
}

/// Which metadata cases `make_metadata_tree` managed to create (some need root or filesystem support).
#[derive(Debug, Default, Clone)]
pub struct Created {
    /// `user.*` extended attributes were set on a file and a directory.
    pub xattrs: bool,
    /// A character device and a block device node exist under `devices/`.
    pub devices: bool,
    /// `owned-by-1234.txt` and `links/owned-by-1234` belong to uid 1234, gid 5678.
    pub chown: bool,
    /// The FIFO `fifo` exists.
    pub fifo: bool,
}

/// Builds under `root` (which exists and is empty) a tree exercising every metadata case a backup must keep:
///
/// - `empty`: an empty regular file;
/// - `hello.txt`, `notes.md`: small text files (`hello.txt` carries the file
///   extended attributes);
/// - `random-12mib.bin`: 12 MiB of deterministic pseudo-random bytes, enough
///   to span several content-defined chunks;
/// - `script.sh` (mode 0750), `setuid-tool` (mode 4755) and the directory
///   `setgid-dir` (mode 2775, holding `inside.txt`);
/// - `nested/level1/level2/level3/deep.txt`: a chain of directories
///   (`nested/level1` carries the directory extended attribute), and the
///   empty directory `empty-dir`;
/// - `links/relative` (to `../hello.txt`), `links/absolute` (to
///   `/etc/hostname`), `links/dangling`, `links/to-dir` (to `../nested`) and
///   `links/owned-by-1234` (to `../owned-by-1234.txt`);
/// - `hardlinks/original.txt`, `hardlinks/second.txt` and
///   `nested/level1/third-link.txt`: three names for one inode;
/// - `sparse.img`: 64 MiB with 4 KiB of data at offset 0, at 20 MiB and at
///   the very end, and holes in between;
/// - `fifo`; `devices/null-char` (1:3) and `devices/loop200-block` (7:200);
/// - `owned-by-1234.txt`, owned (like its symlink) by uid 1234, gid 5678;
/// - `caf\xe9.txt`, a name that is not UTF-8, and
///   `name with spaces\nand a newline.txt`.
///
/// Every entry below `root` (but not `root` itself) gets an mtime with
/// non-zero nanoseconds. The returned [`Created`] says which of the cases that
/// need privileges or filesystem support exist; the others are left out.
pub fn make_metadata_tree(root: &Path) -> Created {
    let mut created = Created::default();

    // Plain regular files of various sizes.
    write_file(&root.join("empty"), b"");
    write_file(&root.join("hello.txt"), b"Hello, lifeboat!\n");
    write_file(
        &root.join("notes.md"),
        "# Notes\n\nA small text file with\ttabs and UTF-8: \u{fc}n\u{ef}c\u{f6}d\u{e9} \u{2713}\n"
            .as_bytes(),
    );
    write_random_file(&root.join("random-12mib.bin"), 12 * MIB, 0x5eed_0001);

    // Special permission bits. Modes are applied with an explicit chmod after
    // creation because creation itself is filtered through the umask, and the
    // content is written first because writing can clear the setuid bit.
    let script = root.join("script.sh");
    write_file(&script, b"#!/bin/sh\necho lifeboat\n");
    chmod(&script, 0o750);
    let setuid = root.join("setuid-tool");
    write_file(&setuid, b"#!/bin/sh\nid -u\n");
    chmod(&setuid, 0o4755);
    let setgid = root.join("setgid-dir");
    make_dir(&setgid);
    write_file(
        &setgid.join("inside.txt"),
        b"inherits the directory's group\n",
    );
    chmod(&setgid, 0o2775);

    // A chain of nested directories, and a directory with nothing in it.
    let deep = root.join("nested/level1/level2/level3");
    make_dir(&deep);
    write_file(&deep.join("deep.txt"), b"four levels down\n");
    make_dir(&root.join("empty-dir"));

    // A file whose ownership is changed below when running as root. It is
    // created regardless so the tree has the same shape for every user.
    let owned = root.join("owned-by-1234.txt");
    write_file(&owned, b"owned by somebody else\n");

    // Symlinks of every flavour; a backup must store them, never follow them.
    let links = root.join("links");
    make_dir(&links);
    make_symlink("../hello.txt", &links.join("relative"));
    make_symlink("/etc/hostname", &links.join("absolute"));
    make_symlink("../does/not/exist", &links.join("dangling"));
    make_symlink("../nested", &links.join("to-dir"));
    let owned_link = links.join("owned-by-1234");
    make_symlink("../owned-by-1234.txt", &owned_link);

    // Three names for one inode, two in one directory and one elsewhere.
    let hard = root.join("hardlinks");
    make_dir(&hard);
    let original = hard.join("original.txt");
    write_file(&original, b"one inode, three names\n");
    make_hard_link(&original, &hard.join("second.txt"));
    make_hard_link(&original, &root.join("nested/level1/third-link.txt"));

    make_sparse_file(&root.join("sparse.img"));

    // Names that are awkward for text-based tools and formats.
    write_file(
        &root.join(OsStr::from_bytes(b"caf\xe9.txt")),
        b"the name is Latin-1, not UTF-8\n",
    );
    write_file(
        &root.join("name with spaces\nand a newline.txt"),
        b"spaces and a newline in the name\n",
    );

    created.xattrs = set_test_xattrs(&root.join("hello.txt"), &root.join("nested/level1"));

    // Some filesystems (and some sandboxes) refuse FIFOs; that is a gap in
    // coverage, not a test failure.
    let fifo = root.join("fifo");
    created.fifo = mkfifo(&fifo, 0o644).is_ok();
    if created.fifo {
        chmod(&fifo, 0o640);
    }

    if is_root() {
        created.devices = make_devices(&root.join("devices"));
        // Containers may grant root but map no other ids, so a failure here
        // only means ownership cannot be tested.
        created.chown = std::os::unix::fs::lchown(owned, Some(1234), Some(5678))
            .and_then(|()| std::os::unix::fs::lchown(owned_link, Some(1234), Some(5678)))
            .is_ok();
    }

    // Timestamps come last: creating, removing or renaming an entry updates
    // its directory's mtime, so any earlier setting would be overwritten.
    // Deepest entries go first for the same reason.
    let mut entries = Vec::new();
    collect_entries(root, Path::new(""), &mut entries);
    entries.sort_by_key(|rel| std::cmp::Reverse(rel.components().count()));
    for (rel, k) in entries.iter().zip(0_u32..) {
        let secs = 1_600_000_000 + libc::time_t::from(k) * 86_461;
        let nanos = 1 + (libc::c_long::from(k) * 7_919_113) % 999_999_998;
        let path = root.join(rel);
        set_times(&path, secs, nanos)
            .unwrap_or_else(|e| panic!("cannot set the mtime of {path:?}: {e}"));
    }

    created
}

/// Compares two trees entry by entry and panics with a message listing EVERY difference found (path + what differs), not just the first.
///
/// Symlinks are never followed. For every entry below the two roots (the
/// roots' own metadata is not compared, since where a restore lands is the
/// caller's choice) this checks the names in each directory, file type,
/// permission bits (except on symlinks), owner, group, mtime to the
/// nanosecond, regular file content, symlink targets, device numbers,
/// extended attributes other than `security.*` and `system.*`, which paths
/// share an inode, and that sparse files are restored with their holes.
pub fn assert_trees_equal(expected: &Path, actual: &Path) {
    let mut cmp = TreeComparison::default();
    cmp.compare_dir(expected, actual, Path::new(""));
    cmp.compare_hard_links();
    if !cmp.diffs.is_empty() {
        let count = cmp.diffs.len();
        let list = cmp.diffs.join("\n  - ");
        panic!(
            "trees differ: {count} difference(s) between expected {expected:?} \
             and actual {actual:?}:\n  - {list}"
        );
    }
}

/// A way of invoking the binary against one repository: runs lifeboat with
/// `--repo`, the given passphrase in `LIFEBOAT_PASSPHRASE` (or none at all),
/// `LIFEBOAT_CACHE_DIR` set to `cache`, and a cheap key derivation.
#[derive(Debug, Clone)]
pub struct Lb {
    /// The repository passed as `--repo`.
    pub repo: PathBuf,
    /// The cache directory passed as `LIFEBOAT_CACHE_DIR`.
    pub cache: PathBuf,
    /// The passphrase passed as `LIFEBOAT_PASSPHRASE`; `None` removes it.
    pub passphrase: Option<String>,
    /// Extra environment, e.g. an S3 endpoint and credentials.
    pub env: Vec<(String, String)>,
}

impl Lb {
    /// Uses `base/repo` as the repository and `base/cache` as the cache.
    pub fn new(base: &Path, passphrase: Option<&str>) -> Self {
        Self {
            repo: base.join("repo"),
            cache: base.join("cache"),
            passphrase: passphrase.map(str::to_owned),
            env: Vec::new(),
        }
    }

    /// Uses the repository `url` (e.g. `s3://bucket/prefix`) with `env`
    /// (endpoint and credentials) and `base/cache` as the cache.
    pub fn remote(base: &Path, url: &str, env: Vec<(String, String)>, passphrase: &str) -> Self {
        Self {
            repo: PathBuf::from(url),
            cache: base.join("cache"),
            passphrase: Some(passphrase.to_owned()),
            env,
        }
    }

    /// `lifeboat --repo <repo>` with this repository's environment: the
    /// passphrase in `LIFEBOAT_PASSPHRASE` (or none), `LIFEBOAT_CACHE_DIR`,
    /// a cheap key derivation, and no controlling terminal. Callers add
    /// arguments and choose stdin and outputs.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(lifeboat_bin());
        cmd.arg("--repo").arg(&self.repo);
        // Settings from the developer's own environment must not leak into
        // the tests, so every inherited LIFEBOAT_* variable is dropped first.
        for (key, _) in std::env::vars_os() {
            if key.as_bytes().starts_with(b"LIFEBOAT_") {
                cmd.env_remove(key);
            }
        }
        match &self.passphrase {
            Some(passphrase) => cmd.env("LIFEBOAT_PASSPHRASE", passphrase),
            None => cmd.env_remove("LIFEBOAT_PASSPHRASE"),
        };
        cmd.env("LIFEBOAT_CACHE_DIR", &self.cache)
            .env("LIFEBOAT_KDF_WORK_FACTOR", "10");
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        // A new session has no controlling terminal, so a passphrase prompt
        // that opens /dev/tty fails at once instead of hanging a test run
        // started from an interactive shell.
        //
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setsid, which is async-signal-safe and does not allocate.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
        }
        cmd
    }

    /// [`command`](Self::command) run under another program, e.g.
    /// `faketime -f +10h` or `strace …`: `program prefix… lifeboat --repo
    /// <repo>` with the same environment. Callers add arguments.
    pub fn command_under(&self, program: &str, prefix: &[&OsStr]) -> Command {
        let own = self.command();
        let mut cmd = Command::new(program);
        cmd.args(prefix).arg(own.get_program()).args(own.get_args());
        for (key, value) in own.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd
    }

    /// Runs `lifeboat --repo <repo> <args>` to completion and returns its
    /// exit status and captured output, whatever they are.
    pub fn run(&self, args: &[&OsStr]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", lifeboat_bin()))
    }

    /// Runs lifeboat, asserts that it succeeded (the panic message carries
    /// its stdout and stderr) and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let out = self.run(&args);
        if !out.status.success() {
            let command = self.describe(&args);
            let transcript = transcript(&out);
            panic!("`{command}` failed\n{transcript}");
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs lifeboat, asserts that it failed cleanly and returns its output.
    ///
    /// A clean failure is a non-zero exit code: being killed by a signal or
    /// panicking also counts as a test failure, because an error the tool
    /// did not handle is a bug even when an error was expected.
    pub fn fails(&self, args: &[&str]) -> Output {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let out = self.run(&args);
        let command = self.describe(&args);
        let transcript = transcript(&out);
        assert!(
            !out.status.success(),
            "`{command}` succeeded but was expected to fail\n{transcript}"
        );
        assert!(
            out.status.code().is_some(),
            "`{command}` was killed by a signal instead of failing with an error\n{transcript}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked at"),
            "`{command}` panicked instead of failing with an error\n{transcript}"
        );
        out
    }

    /// The command line, for failure messages.
    fn describe(&self, args: &[&OsStr]) -> String {
        let mut words = vec![
            "lifeboat".to_owned(),
            "--repo".to_owned(),
            self.repo.to_string_lossy().into_owned(),
        ];
        words.extend(args.iter().map(|arg| arg.to_string_lossy().into_owned()));
        words.join(" ")
    }
}

/// Parses a command's JSON output, naming the text when it is not JSON.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Writes `len` pseudo-random bytes to `path` (replacing any existing file).
/// The same `seed` always gives the same bytes, and the data does not
/// compress, so it exercises chunking and storage honestly.
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    let mut file = File::create(path).unwrap_or_else(|e| panic!("cannot create {path:?}: {e}"));
    let mut rng = XorShift64::new(seed);
    let mut buf = vec![0u8; BLOCK];
    let mut remaining = len;
    while remaining > 0 {
        let n = usize::try_from(remaining).map_or(BLOCK, |r| r.min(BLOCK));
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("cannot write {path:?}: {e}"));
        remaining -= n as u64;
    }
}

/// Inverts every bit of the byte at `offset` in `path`, simulating
/// corruption of a repository file. Panics if the file is shorter.
pub fn flip_byte(path: &Path, offset: u64) {
    // Repository files may well be read-only; corruption does not care, so
    // write permission is granted for the edit and the old mode put back.
    let old_mode = fs::metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {path:?}: {e}"))
        .permissions()
        .mode();
    if old_mode & 0o200 == 0 {
        chmod(path, old_mode | 0o200);
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {path:?} for writing: {e}"));
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset)
        .unwrap_or_else(|e| panic!("cannot read byte {offset} of {path:?}: {e}"));
    byte[0] ^= 0xff;
    file.write_all_at(&byte, offset)
        .unwrap_or_else(|e| panic!("cannot write byte {offset} of {path:?}: {e}"));
    drop(file);
    if old_mode & 0o200 == 0 {
        chmod(path, old_mode);
    }
}

/// A xorshift64 generator: deterministic, dependency-free and plenty random
/// for test data, though useless for anything cryptographic.
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> Self {
        // Xorshift is stuck at zero forever, so the seed is scrambled and a
        // zero state replaced by an arbitrary non-zero constant.
        let state = seed ^ 0x9e37_79b9_7f4a_7c15;
        Self(if state == 0 {
            0x2545_f491_4f6c_dd1d
        } else {
            state
        })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Creates the 64 MiB sparse file: three 4 KiB data regions (at the start,
/// at 20 MiB and at the very end) separated by holes.
fn make_sparse_file(path: &Path) {
    const SIZE: u64 = 64 * MIB;
    const REGION: usize = 4096;
    let file = File::create(path).unwrap_or_else(|e| panic!("cannot create {path:?}: {e}"));
    file.set_len(SIZE)
        .unwrap_or_else(|e| panic!("cannot extend {path:?}: {e}"));
    let mut rng = XorShift64::new(0x5ba5_5e00);
    let mut data = [0u8; REGION];
    for offset in [0, 20 * MIB, SIZE - REGION as u64] {
        rng.fill(&mut data);
        file.write_all_at(&data, offset)
            .unwrap_or_else(|e| panic!("cannot write {path:?} at {offset}: {e}"));
    }
}

/// Sets the test's `user.*` attributes, one with a binary value that is not
/// valid UTF-8 and contains a NUL, on a file and on a directory. Returns
/// false if the filesystem does not support them.
fn set_test_xattrs(file: &Path, dir: &Path) -> bool {
    match set_xattr(file, "user.comment", b"a plain text attribute") {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return false,
        Err(e) => panic!("cannot set an extended attribute on {file:?}: {e}"),
    }
    let attrs: [(&Path, &str, &[u8]); 2] = [
        (
            file,
            "user.binary",
            &[0x00, 0xff, 0xfe, 0x80, 0x7f, 0x00, 0xc3, 0x28],
        ),
        (
            dir,
            "user.dir-note",
            "directory attribute \u{2713}".as_bytes(),
        ),
    ];
    for (path, name, value) in attrs {
        set_xattr(path, name, value)
            .unwrap_or_else(|e| panic!("cannot set {name} on {path:?}: {e}"));
    }
    true
}

/// Creates a character and a block device node in `dir`. Even root may lack
/// the capability (many containers drop it), in which case nothing is left
/// behind and false is returned.
fn make_devices(dir: &Path) -> bool {
    make_dir(dir);
    let char_dev = dir.join("null-char");
    let block_dev = dir.join("loop200-block");
    let made = mknod(&char_dev, libc::S_IFCHR | 0o600, libc::makedev(1, 3))
        .and_then(|()| mknod(&block_dev, libc::S_IFBLK | 0o600, libc::makedev(7, 200)));
    if made.is_ok() {
        chmod(&char_dev, 0o620);
        chmod(&block_dev, 0o640);
        true
    } else {
        // Removal failures are irrelevant: at most one node exists here.
        let _ = fs::remove_file(char_dev);
        let _ = fs::remove_file(block_dev);
        let _ = fs::remove_dir(dir);
        false
    }
}

/// Collects the relative path of every entry below `root.join(rel)`,
/// descending into directories but never through symlinks.
fn collect_entries(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    let dir = root.join(rel);
    let names = sorted_children(&dir).unwrap_or_else(|e| panic!("cannot list {dir:?}: {e}"));
    for name in names {
        let child = rel.join(OsStr::from_bytes(&name));
        let path = root.join(&child);
        let meta =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("cannot stat {path:?}: {e}"));
        if meta.is_dir() {
            collect_entries(root, &child, out);
        }
        out.push(child);
    }
}

/// The names in `dir`, sorted as raw bytes.
fn sorted_children(dir: &Path) -> io::Result<BTreeSet<Vec<u8>>> {
    fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name().into_vec()))
        .collect()
}

/// The kinds of directory entries a backup distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
    Unknown,
}

impl Kind {
    fn of(ft: fs::FileType) -> Self {
        if ft.is_symlink() {
            Self::Symlink
        } else if ft.is_dir() {
            Self::Dir
        } else if ft.is_file() {
            Self::File
        } else if ft.is_fifo() {
            Self::Fifo
        } else if ft.is_char_device() {
            Self::CharDevice
        } else if ft.is_block_device() {
            Self::BlockDevice
        } else if ft.is_socket() {
            Self::Socket
        } else {
            Self::Unknown
        }
    }
}

/// The state of one `assert_trees_equal` run: the differences found so far,
/// and the inode of every non-directory present in both trees, so that the
/// hard-link structure can be compared once the walk is complete.
#[derive(Default)]
struct TreeComparison {
    diffs: Vec<String>,
    expected_inodes: BTreeMap<PathBuf, (u64, u64)>,
    actual_inodes: BTreeMap<PathBuf, (u64, u64)>,
}

impl TreeComparison {
    fn diff(&mut self, rel: &Path, what: impl Display) {
        self.diffs.push(format!("{rel:?}: {what}"));
    }

    fn compare_dir(&mut self, expected: &Path, actual: &Path, rel: &Path) {
        let (exp_names, act_names) = match (sorted_children(expected), sorted_children(actual)) {
            (Ok(e), Ok(a)) => (e, a),
            (Err(err), _) => {
                self.diff(rel, format!("cannot list the expected directory: {err}"));
                return;
            }
            (_, Err(err)) => {
                self.diff(rel, format!("cannot list the actual directory: {err}"));
                return;
            }
        };
        for name in exp_names.union(&act_names) {
            let name = OsStr::from_bytes(name);
            let child = rel.join(name);
            let in_expected = exp_names.contains(name.as_bytes());
            let in_actual = act_names.contains(name.as_bytes());
            if in_expected && in_actual {
                self.compare_entry(&expected.join(name), &actual.join(name), &child);
            } else if in_expected {
                self.diff(&child, "missing from the actual tree");
            } else {
                self.diff(
                    &child,
                    "present in the actual tree but not in the expected one",
                );
            }
        }
    }

    fn compare_entry(&mut self, expected: &Path, actual: &Path, rel: &Path) {
        let (em, am) = match (fs::symlink_metadata(expected), fs::symlink_metadata(actual)) {
            (Ok(e), Ok(a)) => (e, a),
            (Err(err), _) => {
                self.diff(rel, format!("cannot stat the expected entry: {err}"));
                return;
            }
            (_, Err(err)) => {
                self.diff(rel, format!("cannot stat the actual entry: {err}"));
                return;
            }
        };
        let kind = Kind::of(em.file_type());
        let actual_kind = Kind::of(am.file_type());
        if kind != actual_kind {
            // Nothing else is comparable between entries of different types.
            self.diff(
                rel,
                format!("file type: expected {kind:?}, actual {actual_kind:?}"),
            );
            return;
        }

        // Symlink permissions are always 0777 on Linux and cannot be set.
        let (exp_mode, act_mode) = (em.mode() & 0o7777, am.mode() & 0o7777);
        if kind != Kind::Symlink && exp_mode != act_mode {
            self.diff(
                rel,
                format!("permissions: expected {exp_mode:04o}, actual {act_mode:04o}"),
            );
        }
        if em.uid() != am.uid() {
            self.diff(
                rel,
                format!("owner: expected uid {}, actual uid {}", em.uid(), am.uid()),
            );
        }
        if em.gid() != am.gid() {
            self.diff(
                rel,
                format!("group: expected gid {}, actual gid {}", em.gid(), am.gid()),
            );
        }
        let exp_mtime = (em.mtime(), em.mtime_nsec());
        let act_mtime = (am.mtime(), am.mtime_nsec());
        if exp_mtime != act_mtime {
            self.diff(
                rel,
                format!(
                    "mtime: expected {}.{:09}, actual {}.{:09}",
                    exp_mtime.0, exp_mtime.1, act_mtime.0, act_mtime.1
                ),
            );
        }
        self.compare_xattrs(expected, actual, rel);

        if kind == Kind::Dir {
            self.compare_dir(expected, actual, rel);
            return;
        }
        // Directories cannot be hard-linked (and their link counts mean
        // something else), so only other entries take part in that check.
        self.expected_inodes
            .insert(rel.to_path_buf(), (em.dev(), em.ino()));
        self.actual_inodes
            .insert(rel.to_path_buf(), (am.dev(), am.ino()));
        match kind {
            Kind::File => {
                self.compare_contents(expected, actual, rel, em.size(), am.size());
                let exp_alloc = em.blocks() * 512;
                let act_alloc = am.blocks() * 512;
                if exp_alloc < em.size() / 2 && act_alloc > exp_alloc + MIB {
                    self.diff(
                        rel,
                        format!(
                            "holes not restored: expected {exp_alloc} bytes allocated for a \
                             {}-byte sparse file, actual has {act_alloc}",
                            em.size()
                        ),
                    );
                }
            }
            Kind::Symlink => match (fs::read_link(expected), fs::read_link(actual)) {
                (Ok(e), Ok(a)) => {
                    let (e, a) = (e.into_os_string().into_vec(), a.into_os_string().into_vec());
                    if e != a {
                        self.diff(
                            rel,
                            format!(
                                "symlink target: expected \"{}\", actual \"{}\"",
                                e.escape_ascii(),
                                a.escape_ascii()
                            ),
                        );
                    }
                }
                (Err(err), _) | (_, Err(err)) => {
                    self.diff(rel, format!("cannot read the symlink target: {err}"));
                }
            },
            Kind::CharDevice | Kind::BlockDevice if em.rdev() != am.rdev() => {
                let (e, a) = (em.rdev(), am.rdev());
                self.diff(
                    rel,
                    format!(
                        "device number: expected {}:{}, actual {}:{}",
                        libc::major(e),
                        libc::minor(e),
                        libc::major(a),
                        libc::minor(a)
                    ),
                );
            }
            _ => {}
        }
    }

    fn compare_contents(
        &mut self,
        expected: &Path,
        actual: &Path,
        rel: &Path,
        exp_size: u64,
        act_size: u64,
    ) {
        if exp_size != act_size {
            self.diff(
                rel,
                format!("size: expected {exp_size} bytes, actual {act_size}"),
            );
        }
        match first_difference(expected, actual) {
            // Past the shorter file's end the size message says it all.
            Ok(Some(offset)) if offset < exp_size.min(act_size) => {
                self.diff(
                    rel,
                    format!("content differs, first at byte offset {offset}"),
                );
            }
            Ok(_) => {}
            Err(err) => self.diff(rel, format!("cannot compare the contents: {err}")),
        }
    }

    fn compare_xattrs(&mut self, expected: &Path, actual: &Path, rel: &Path) {
        let (exp, act) = match (read_xattrs(expected), read_xattrs(actual)) {
            (Ok(e), Ok(a)) => (e, a),
            (Err(err), _) => {
                self.diff(
                    rel,
                    format!("cannot read the expected extended attributes: {err}"),
                );
                return;
            }
            (_, Err(err)) => {
                self.diff(
                    rel,
                    format!("cannot read the actual extended attributes: {err}"),
                );
                return;
            }
        };
        let names: BTreeSet<&Vec<u8>> = exp.keys().chain(act.keys()).collect();
        for name in names {
            let shown = name.escape_ascii();
            match (exp.get(name), act.get(name)) {
                (Some(_), None) => self.diff(rel, format!("extended attribute {shown} missing")),
                (None, Some(_)) => self.diff(rel, format!("unexpected extended attribute {shown}")),
                (Some(e), Some(a)) if e != a => self.diff(
                    rel,
                    format!(
                        "extended attribute {shown}: expected \"{}\", actual \"{}\"",
                        e.escape_ascii(),
                        a.escape_ascii()
                    ),
                ),
                _ => {}
            }
        }
    }

    /// Checks that every path shares its inode with exactly the same set of
    /// other paths in both trees, reporting each differing grouping once.
    fn compare_hard_links(&mut self) {
        let exp_groups = inode_groups(&self.expected_inodes);
        let act_groups = inode_groups(&self.actual_inodes);
        let mut reported = BTreeSet::new();
        let mut diffs = Vec::new();
        for (rel, exp_key) in &self.expected_inodes {
            let Some(act_key) = self.actual_inodes.get(rel) else {
                continue;
            };
            let exp_group = &exp_groups[exp_key];
            let act_group = &act_groups[act_key];
            if exp_group != act_group && reported.insert((exp_group, act_group)) {
                diffs.push(format!(
                    "{rel:?}: hard links: expected it to share an inode with exactly \
                     {exp_group:?}, but in the actual tree it shares one with {act_group:?}"
                ));
            }
        }
        self.diffs.extend(diffs);
    }
}

/// Groups relative paths by the inode they name. Each group comes out
/// sorted, because the map is iterated in path order.
fn inode_groups(inodes: &BTreeMap<PathBuf, (u64, u64)>) -> HashMap<(u64, u64), Vec<PathBuf>> {
    let mut groups: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    for (rel, key) in inodes {
        groups.entry(*key).or_default().push(rel.clone());
    }
    groups
}

/// Streams both files and returns the offset of the first byte at which they
/// differ (a file ending early counts), or `None` if they are identical.
fn first_difference(expected: &Path, actual: &Path) -> io::Result<Option<u64>> {
    let mut exp_file = File::open(expected)?;
    let mut act_file = File::open(actual)?;
    let mut exp_buf = vec![0u8; BLOCK];
    let mut act_buf = vec![0u8; BLOCK];
    let mut offset = 0u64;
    loop {
        let exp_len = read_full(&mut exp_file, &mut exp_buf)?;
        let act_len = read_full(&mut act_file, &mut act_buf)?;
        let common = exp_len.min(act_len);
        // Slice equality is a memcmp even in unoptimised test builds, so the
        // byte-by-byte search only runs on a block known to differ.
        if exp_buf[..common] != act_buf[..common] {
            let pos = exp_buf[..common]
                .iter()
                .zip(&act_buf[..common])
                .position(|(e, a)| e != a)
                .unwrap_or(common);
            return Ok(Some(offset + pos as u64));
        }
        if exp_len != act_len {
            return Ok(Some(offset + common as u64));
        }
        if exp_len == 0 {
            return Ok(None);
        }
        offset += exp_len as u64;
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads the extended attributes of `path` itself (never a symlink's target)
/// as a sorted name-to-value map, leaving out the `security.*` and
/// `system.*` namespaces, which belong to the kernel and security modules
/// rather than to the data being backed up. No support means no attributes.
fn read_xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let p = cpath(path);
    let list = match xattr_buffer(|buf| {
        // SAFETY: `p` is a valid NUL-terminated path, and `buf` is writable
        // for the length passed; both outlive the call.
        unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    }) {
        Ok(list) => list,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut attrs = BTreeMap::new();
    for name in list.split(|&b| b == 0).filter(|name| !name.is_empty()) {
        if name.starts_with(b"security.") || name.starts_with(b"system.") {
            continue;
        }
        let cname = CString::new(name).expect("a name split at NUL bytes contains none");
        let value = xattr_buffer(|buf| {
            // SAFETY: `p` and `cname` are valid NUL-terminated strings, and
            // `buf` is writable for the length passed; all outlive the call.
            unsafe {
                libc::lgetxattr(
                    p.as_ptr(),
                    cname.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            }
        });
        match value {
            Ok(value) => {
                attrs.insert(name.to_vec(), value);
            }
            // The attribute was removed between listing and reading it.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(attrs)
}

/// Drives one of the size-probing xattr calls: asks for the size with an
/// empty buffer, then fetches into a buffer of that size, starting over if
/// the data grew in between (ERANGE).
fn xattr_buffer(mut call: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    loop {
        let size = call(&mut [0u8; 0]);
        let size = usize::try_from(size).map_err(|_| io::Error::last_os_error())?;
        let mut buf = vec![0u8; size];
        let len = call(&mut buf);
        match usize::try_from(len) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::ERANGE) {
                    return Err(err);
                }
            }
        }
    }
}

/// Converts a path for libc. Test paths never contain NUL bytes, so one that
/// does is a bug in the test itself.
fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes())
        .unwrap_or_else(|_| panic!("path {path:?} contains a NUL byte"))
}

/// Turns a libc status return into an `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = cpath(path);
    let name = CString::new(name).expect("xattr names in the tests contain no NUL");
    // SAFETY: `p` and `name` are valid NUL-terminated strings and `value` is
    // readable for the length passed; all outlive the call.
    cvt(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

fn mkfifo(path: &Path, mode: libc::mode_t) -> io::Result<()> {
    let p = cpath(path);
    // SAFETY: `p` is a valid NUL-terminated path that outlives the call.
    cvt(unsafe { libc::mkfifo(p.as_ptr(), mode) })
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let p = cpath(path);
    // SAFETY: `p` is a valid NUL-terminated path that outlives the call.
    cvt(unsafe { libc::mknod(p.as_ptr(), mode, dev) })
}

/// Sets both access and modification time of `path` itself, even when it is
/// a symlink, with nanosecond precision.
fn set_times(path: &Path, secs: libc::time_t, nanos: libc::c_long) -> io::Result<()> {
    let p = cpath(path);
    let time = libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    let times = [time, time];
    // SAFETY: `p` is a valid NUL-terminated path and `times` holds the two
    // timespecs utimensat reads; both outlive the call.
    cvt(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

fn write_file(path: &Path, contents: &[u8]) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {path:?}: {e}"));
}

fn make_dir(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("cannot create directory {path:?}: {e}"));
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {path:?} to {mode:o}: {e}"));
}

fn make_symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link)
        .unwrap_or_else(|e| panic!("cannot create symlink {link:?} -> {target:?}: {e}"));
}

fn make_hard_link(original: &Path, link: &Path) {
    fs::hard_link(original, link)
        .unwrap_or_else(|e| panic!("cannot link {link:?} to {original:?}: {e}"));
}

/// Status, stdout and stderr of a finished command, for failure messages.
fn transcript(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
