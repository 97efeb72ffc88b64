//! The `lifeboat` command: a thin layer that parses arguments (clap),
//! resolves them into validated settings (passphrase, cache directory,
//! repository location), calls `lifeboat-core`, and prints results for
//! humans or, with `--json`, for programs. Errors map to documented exit
//! codes (see `EXIT CODES` in `--help`).

mod agent_cmds;
mod args;
mod commands;
mod drill_cmds;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // SIGPIPE stays ignored (Rust's default): the S3 client writes to
    // sockets with writev, which raises SIGPIPE when the store drops the
    // connection, and that must be an error to retry, not death. A closed
    // stdout (`lifeboat ls … | head`) is handled where it surfaces instead.
    quiet_exit_on_closed_stdout();
    exit_130_on_interrupt();
    let cli = args::Cli::parse();
    tune_allocator(matches!(cli.command, args::Command::Backup(_)));
    output::init_logging(cli.global.verbose, cli.global.quiet);
    let json = cli.global.json;
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) if output::is_broken_pipe(&err) => ExitCode::from(output::CLOSED_PIPE),
        Err(err) => {
            let code = output::exit_code(&err);
            output::print_error(&err, json, code);
            ExitCode::from(code)
        }
    }
}

/// Keeps glibc from serving each large buffer (chunks, packs: 1 to 16 MiB)
/// with a fresh mmap that is returned on free: every byte restored or
/// checked would otherwise pass through several newly faulted,
/// kernel-zeroed pages, which showed up as more system than user time in
/// profiles. Freed memory is reused instead; peak memory is still bounded
/// by the engines' queues. Above 32 MiB allocations are mmapped again: the
/// one such buffer is the key derivation's 64 MiB scrypt block, which is
/// then returned to the system when the repository is open instead of
/// staying in the heap, where fragments of it added tens of MiB to every
/// command's peak.
///
/// A `backup` maps buffers from 2 MiB up instead. Its chunk buffers (256
/// KiB to 8 MiB, freed in no set order) and 9 MiB pack buffers otherwise
/// left holes in the one heap that later buffers did not fit, and the heap
/// grew 30 to 40 MiB past what was live (heaptrack: 40 to 60 MiB live, 85
/// to 95 MiB of heap). The backup reuses its pack buffers, so what is
/// faulted in anew is only the chunks above 2 MiB. A restore keeps 32 MiB:
/// there the same setting cost 90,000 more page faults and 0.1 to 0.3 s.
fn tune_allocator(backup: bool) {
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = backup;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any
    // allocation-heavy work and before threads start.
    unsafe {
        let mmap_from: i32 = if backup { 2 << 20 } else { 32 << 20 };
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_from);
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

/// `println!` panics when stdout is a closed pipe; a reader that stopped
/// early (`head`) is not an error, so that panic ends the process quietly
/// with the status a shell shows for SIGPIPE. Every other panic is reported
/// as usual.
fn quiet_exit_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(output::CLOSED_PIPE.into());
        }
        default(info);
    }));
}
