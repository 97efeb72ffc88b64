//! How results and errors are shown: exit codes for error classes, one clear
//! error line (or a JSON object under `--json`), byte sizes for humans, and
//! a progress line on a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lifeboat_core::Error;

/// Exit code: success.
pub const OK: u8 = 0;
/// Exit code: generic failure.
pub const FAILURE: u8 = 1;
/// Exit code: snapshot saved but incomplete, or restore partly failed.
pub const INCOMPLETE: u8 = 3;
/// Exit code: no repository at the location.
pub const NO_REPOSITORY: u8 = 10;
/// Exit code: wrong passphrase.
pub const WRONG_PASSPHRASE: u8 = 12;
/// Exit code: corruption found.
pub const CORRUPT: u8 = 13;
/// Exit code: the command needs the full key, and only a writer credential is held.
pub const NEEDS_FULL_KEY: u8 = 14;
/// Exit code: interrupted (Ctrl-C, or the agent stopping a job).
pub const INTERRUPTED: u8 = 130;

/// Exit status when stdout was closed early by its reader (128 + SIGPIPE,
/// what a shell reports for a process SIGPIPE killed).
pub const CLOSED_PIPE: u8 = 141;

/// True when the error is a write to a closed stdout.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Maps an error to its documented exit code.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Error>() {
        Some(Error::NoRepository { .. }) => NO_REPOSITORY,
        Some(Error::WrongPassphrase) => WRONG_PASSPHRASE,
        Some(Error::Corrupt { .. })
        | Some(Error::Missing { .. })
        | Some(Error::Untrusted { .. }) => CORRUPT,
        Some(Error::Interrupted) => INTERRUPTED,
        Some(Error::NeedsFullKey { .. }) => NEEDS_FULL_KEY,
        _ => FAILURE,
    }
}

/// Prints an error: one line plus its causes, or JSON.
pub fn print_error(err: &anyhow::Error, json: bool, code: u8) {
    if json {
        let v = serde_json::json!({
            "error": format!("{err:#}"),
            "exit_code": code,
        });
        eprintln!("{v}");
    } else {
        eprintln!("lifeboat: {err:#}");
    }
}

/// Formats a byte count with binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A progress line redrawn on stderr while work runs, only when stderr is a
/// terminal (nothing in a pipe or a log).
pub struct ProgressLine {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ProgressLine {
    /// Starts redrawing `render()` every 200 ms, if enabled and on a terminal.
    pub fn start(enabled: bool, render: impl Fn() -> String + Send + 'static) -> ProgressLine {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = (enabled && std::io::stderr().is_terminal()).then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    eprint!("\r\x1b[2K{}", render());
                    std::thread::sleep(Duration::from_millis(200));
                }
                eprint!("\r\x1b[2K");
            })
        });
        ProgressLine { stop, handle }
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Success exit code helper, so commands read `Ok(output::OK)`.
pub fn ok() -> anyhow::Result<u8> {
    Ok(OK)
}

/// Log lines from the core (retries, the circuit breaker, store
/// capabilities) go to stderr as `lifeboat: warning: ...`. Warnings show by
/// default, errors only under `--quiet`, more with `-v` and `-vv`.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        // Only our own crates log: the AWS SDK's internals are not for users.
        if !self.enabled(record.metadata()) || !record.target().starts_with("lifeboat") {
            return;
        }
        let level = match record.level() {
            log::Level::Error => "error",
            log::Level::Warn => "warning",
            log::Level::Info => "info",
            log::Level::Debug | log::Level::Trace => "debug",
        };
        if JSON_LOGS.load(Ordering::Relaxed) {
            let line = serde_json::json!({
                "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "level": level,
                "target": record.target(),
                "message": record.args().to_string(),
            });
            eprintln!("{line}");
        } else {
            eprintln!("lifeboat: {level}: {}", record.args());
        }
    }

    fn flush(&self) {}
}

static JSON_LOGS: AtomicBool = AtomicBool::new(false);

/// Log lines as JSON objects (`time`, `level`, `target`, `message`), for
/// log shippers; text otherwise.
pub fn set_json_logs(json: bool) {
    JSON_LOGS.store(json, Ordering::Relaxed);
}

/// Installs the stderr logger at the level the flags ask for.
pub fn init_logging(verbose: u8, quiet: bool) {
    static LOGGER: StderrLogger = StderrLogger;
    let level = match (quiet, verbose) {
        (true, _) => log::LevelFilter::Error,
        (false, 0) => log::LevelFilter::Warn,
        (false, 1) => log::LevelFilter::Info,
        (false, _) => log::LevelFilter::Debug,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
