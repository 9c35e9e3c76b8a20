//! `taper init [PATH]` (a commented starter pipeline) and `taper completions SHELL`.

use super::exit::{self, Failure};
use clap::{Args, CommandFactory};
use std::io::Write;
use std::path::PathBuf;

/// The starter pipeline `taper init` writes: every stage kind, commented, on the data the
/// taper repository embeds in `datasets/`.
pub const STARTER: &str = include_str!("starter.yaml");

/// `taper init` options.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The pipeline file to write; an existing file is never overwritten.
    #[arg(default_value = "pipeline.yaml")]
    pub path: PathBuf,
}

/// `taper completions` options.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// `taper init`.
pub fn init(a: &InitArgs) -> Result<i32, Failure> {
    let fail = |e: std::io::Error| {
        let what = if e.kind() == std::io::ErrorKind::AlreadyExists {
            "it already exists; taper init never overwrites a file".to_string()
        } else {
            e.to_string()
        };
        Failure::new(
            exit::ERROR,
            format!("error: cannot write {}: {what}", a.path.display()),
        )
    };
    // `create_new` refuses an existing file atomically (no check-then-write race).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&a.path)
        .map_err(fail)?;
    f.write_all(STARTER.as_bytes()).map_err(fail)?;
    eprintln!(
        "wrote {}; run it from the taper repository root with: taper run {}",
        a.path.display(),
        a.path.display()
    );
    Ok(exit::SUCCESS)
}

/// `taper completions`.
pub fn completions(a: &CompletionsArgs) -> Result<i32, Failure> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "taper", &mut std::io::stdout());
    Ok(exit::SUCCESS)
}
