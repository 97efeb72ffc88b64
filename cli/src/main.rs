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
    let cli = args::Cli::parse();
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
