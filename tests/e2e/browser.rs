//! Headless Chromium for the end-to-end tests of Lifeboat's HTML output (the
//! drill reports): [`render`] loads a page the way a reader's browser would,
//! saves a screenshot to attach to a CI failure, and returns the DOM as the
//! browser built it, so that a test asserts on what the page shows rather
//! than on the bytes Lifeboat wrote.
//!
//! Like the S3 servers in `servers`, the browser is real and required: a
//! missing `chromium` is a failure with an install hint, never a skipped
//! test. Each Chromium run gets a fresh profile directory (so no state leaks
//! between runs or from a developer's own browser), has networking features
//! that would reach out on their own turned off, runs in its own process
//! group and is killed with all its helper processes if it takes longer than
//! [`RUN_TIMEOUT`]. Its output goes to files rather than pipes, because the
//! helper processes inherit the descriptors and could hold a pipe open after
//! the browser itself has gone.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where Debian's `chromium` package installs the browser.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMIUM_MISSING: &str = "chromium is not installed: apt-get install chromium";
/// How long one Chromium run may take before it is killed.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a running Chromium is checked for completion.
const POLL: Duration = Duration::from_millis(50);
/// The screenshot's viewport: wide enough for the report's tables, tall
/// enough for its first sections.
const WINDOW_SIZE: &str = "1200,1600";
/// The eight bytes every PNG file starts with (PNG specification, 5.2).
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
/// Bytes of Chromium's stderr quoted in a failure message (its end, where
/// the reason is; the start is mostly D-Bus noise in a container).
const STDERR_TAIL: usize = 8 * 1024;

/// Flags for every run: headless, no sandbox (CI runs as root, where the
/// sandbox refuses to start), and nothing that phones home or updates itself
/// in the background, so that a run neither needs nor uses the network.
const COMMON_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// Renders `html_file` in headless Chromium (Debian package `chromium`,
/// binary /usr/bin/chromium; panics with "chromium is not installed:
/// apt-get install chromium" if missing — never skips), saves a PNG
/// screenshot to `png_out`, and returns the DOM as Chromium serialised it
/// (`--dump-dom`), so a test can assert what the page shows.
///
/// Two runs, each with a fresh profile: one takes the screenshot at a
/// 1200×1600 window, one dumps the DOM. Panics with Chromium's stderr if a
/// run fails, exceeds one minute, or leaves no valid PNG.
pub fn render(html_file: &Path, png_out: &Path) -> String {
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM_MISSING}");
    let page = fs::canonicalize(html_file)
        .unwrap_or_else(|e| panic!("page to render {}: {e}", html_file.display()));
    let url = file_url(&page);
    let png = absolute(png_out);
    // A screenshot left by an earlier run must not pass for this one's.
    match fs::remove_file(&png) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing the old screenshot {}: {e}", png.display()),
    }

    let mut screenshot_flag = std::ffi::OsString::from("--screenshot=");
    screenshot_flag.push(png.as_os_str());
    let shot = run_chromium(&[
        screenshot_flag,
        format!("--window-size={WINDOW_SIZE}").into(),
        url.clone().into(),
    ]);
    let mut signature = [0u8; 8];
    let read = fs::File::open(&png).and_then(|mut f| f.read_exact(&mut signature));
    assert!(
        read.is_ok() && signature == PNG_SIGNATURE,
        "chromium did not write a PNG screenshot of {url} to {} ({read:?}, first bytes {signature:02x?}); its stderr:\n{}",
        png.display(),
        shot.stderr_tail,
    );

    let dump = run_chromium(&["--dump-dom".into(), url.clone().into()]);
    assert!(
        !dump.stdout.trim().is_empty(),
        "chromium dumped no DOM for {url}; its stderr:\n{}",
        dump.stderr_tail
    );
    dump.stdout
}

/// What one successful Chromium run printed.
struct Run {
    stdout: String,
    stderr_tail: String,
}

/// Runs Chromium with [`COMMON_FLAGS`], a fresh profile and `args`; panics
/// with its stderr unless it exits successfully within [`RUN_TIMEOUT`].
fn run_chromium(args: &[std::ffi::OsString]) -> Run {
    let scratch = ScratchDir::new();
    let profile = scratch.path.join("profile");
    let stdout_path = scratch.path.join("stdout");
    let stderr_path = scratch.path.join("stderr");
    let create =
        |p: &Path| fs::File::create(p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
    let mut profile_flag = std::ffi::OsString::from("--user-data-dir=");
    profile_flag.push(profile.as_os_str());

    let mut cmd = Command::new(CHROMIUM);
    cmd.args(COMMON_FLAGS)
        .arg(profile_flag)
        .args(args)
        .stdin(Stdio::null())
        .stdout(create(&stdout_path))
        .stderr(create(&stderr_path))
        // Its own process group, so that a timeout kills the renderer, GPU
        // and zygote helpers along with the browser.
        .process_group(0);
    let described = format!("{cmd:?}");
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{CHROMIUM_MISSING}"),
        Err(e) => panic!("starting {described}: {e}"),
    };

    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => sleep(POLL),
            Err(e) => panic!("waiting for {described}: {e}"),
        }
    };
    // Helpers outlive the browser at times; end the whole group either way
    // (harmless when it is already empty).
    kill_group(child.id());
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }

    let stderr_tail = tail(&fs::read(&stderr_path).unwrap_or_default(), STDERR_TAIL);
    match status {
        None => panic!(
            "chromium did not finish within {RUN_TIMEOUT:?} and was killed: {described}\nits stderr:\n{stderr_tail}"
        ),
        Some(status) if !status.success() => {
            panic!("chromium failed ({status}): {described}\nits stderr:\n{stderr_tail}")
        }
        Some(_) => {}
    }
    let stdout =
        fs::read(&stdout_path).unwrap_or_else(|e| panic!("reading {}: {e}", stdout_path.display()));
    Run {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr_tail,
    }
}

/// Sends SIGKILL to the process group `pgid` through kill(1), the std-only
/// way to signal a group.
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last `max` bytes of `bytes` as text, marked when cut.
fn tail(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    format!(
        "[… {} earlier bytes]\n{}",
        bytes.len() - max,
        String::from_utf8_lossy(&bytes[bytes.len() - max..])
    )
}

/// A `file://` URL for an absolute path, percent-encoding every byte
/// outside RFC 3986's unreserved characters and `/` (so spaces, `#`, `?` and
/// non-UTF-8 names survive).
fn file_url(path: &Path) -> String {
    let mut url = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// `p` made absolute against the current directory (it need not exist yet).
fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .expect("the current directory is readable")
            .join(p)
    }
}

/// A new, empty directory under the system's temporary directory, removed
/// on drop: Chromium's profile and the files its output goes to.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new() -> ScratchDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        loop {
            let path = std::env::temp_dir().join(format!(
                "lifeboat-e2e-chromium-{}-{}-{nanos}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            // `create_dir` fails if the name exists, so the directory is ours.
            match fs::create_dir(&path) {
                Ok(()) => return ScratchDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("creating {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
