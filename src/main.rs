//! The `taper` binary: parse arguments, run, map the outcome to an exit code.

use clap::Parser;

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = taper::cli::Cli::parse();
    let code = match taper::cli::run(cli) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("{}", f.message);
            f.code
        }
    };
    std::process::exit(code);
}
