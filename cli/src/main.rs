//! The `lifeboat` command: a thin layer that parses arguments (clap),
//! resolves them into validated settings (passphrase, cache directory,
//! repository location), calls `lifeboat-core`, and prints results for
//! humans or, with `--json`, for programs. Errors map to documented exit
//! codes (see `EXIT CODES` in `--help`).

mod args;
mod commands;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A closed pipe (`lifeboat ls … | head`) ends the process quietly, as
    // Unix tools do, instead of surfacing as an I/O error.
    // SAFETY: resetting a signal disposition at start-up, before any threads.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tune_allocator();
    exit_130_on_interrupt();
    let cli = args::Cli::parse();
    output::init_logging(cli.global.verbose, cli.global.quiet);
    let json = cli.global.json;
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let code = output::exit_code(&err);
            output::print_error(&err, json, code);
            ExitCode::from(code)
        }
    }
}

/// Keeps glibc from serving each large buffer (chunks, packs: 1 to 16 MiB)
/// with a fresh mmap that is returned on free: every byte backed up would
/// otherwise pass through several newly faulted, kernel-zeroed pages, which
/// showed up as more system than user time in profiles. Freed memory is
/// reused instead; peak memory is still bounded by the engines' queues.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any
    // allocation-heavy work and before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        // One arena: with one per thread, each kept its own freed pack
        // buffers and peak memory grew by a third, for no measurable speed.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Ctrl-C ends the process at once with the documented exit code 130. No
/// cleanup is needed for safety: the repository is valid at every instant
/// (a snapshot exists only once its last object is written), and leftovers
/// of an interrupted write are removed by a later prune.
fn exit_130_on_interrupt() {
    extern "C" fn on_sigint(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) }
    }
    // SAFETY: installs a handler that only calls an async-signal-safe function.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}
