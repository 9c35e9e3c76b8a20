//! The `taper` binary: parse arguments, run, map the outcome to an exit code.

use clap::Parser;
use taper::cli::{Cli, Command};
use taper::model::device::CacheAligned;

/// Large buffers start on a cache line (`CacheAligned`'s docs say why).
#[global_allocator]
static ALLOC: CacheAligned = CacheAligned;

fn main() {
    taper::model::device::keep_freed_buffers();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_) | Command::Schedule(_)) {
        die_quietly_on_closed_pipe();
    }
    let code = match taper::cli::run(cli) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("{}", f.message);
            f.code
        }
    };
    std::process::exit(code);
}

/// Commands that only print (`inspect`, `runs`, `dag`, ...) end quietly, like other Unix
/// tools, when the reader of their output goes away (`taper inspect DIR | head`) instead
/// of panicking on the write. `run` and `schedule` keep Rust's default (the write fails,
/// the run goes on and ends as it would), since they hold the workspace lock and state.
fn die_quietly_on_closed_pipe() {
    // SAFETY: restoring the default disposition of a signal is async-signal-safe and has
    // no other effect on the process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
