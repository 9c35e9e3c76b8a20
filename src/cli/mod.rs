//! The `taper` command line: clap definitions and one file per group of subcommands.

pub mod dag;
pub mod exit;
pub mod export;
pub mod formats;
pub mod generate;
pub mod history;
pub mod init;
pub mod kinds;
pub mod load;
pub mod model;
pub mod plan;
pub mod report;
pub mod reporter;
pub mod run;
pub mod schedule;

use clap::{Args, Parser, Subcommand};
use exit::Failure;
use std::path::PathBuf;

/// LoRA fine-tuning of language models from declarative pipeline files.
#[derive(Debug, Parser)]
#[command(name = "taper", version, about, propagate_version = true)]
pub struct Cli {
    /// The workspace: paths in pipeline files are relative to it, and its state lives in
    /// `<workspace>/.taper/`. Default: the current folder.
    #[arg(short = 'C', long, global = true, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run what is out of date, in parallel.
    #[command(after_long_help = kinds::help_text())]
    Run(run::RunArgs),
    /// Show what `run` would do, and why, without doing it.
    Plan(plan::PlanArgs),
    /// Per stage: up to date, stale (and why), failed or running.
    Status(plan::StatusArgs),
    /// Print the stage graph.
    Dag(dag::DagArgs),
    /// Check pipeline files without running anything.
    Validate(plan::ValidateArgs),
    /// Run history from the ledger.
    Runs(history::RunsArgs),
    /// One run: stages, durations, output hashes, metrics.
    Show(history::ShowArgs),
    /// Re-hash a run's outputs and compare them with the hashes the ledger recorded.
    Verify(history::VerifyArgs),
    /// Write a run's HTML report: stage graph, loss curves, eval results, outputs.
    Report(report::ReportArgs),
    /// Every stage kind's `with:` keys and their defaults.
    Kinds(kinds::KindsArgs),
    /// Write a commented starter pipeline (never overwrites a file).
    Init(init::InitArgs),
    /// Print a shell completion script: `taper completions bash > ~/.local/share/bash-completion/completions/taper`.
    Completions(init::CompletionsArgs),
    /// Compact the ledger (merge its files) and empty `.taper/trash`; with
    /// `--keep-runs N`, first remove each pipeline's runs beyond its newest N.
    Gc(history::GcArgs),
    /// Run a pipeline on its `schedule:` (foreground), or list its next fire times.
    Schedule(schedule::ScheduleArgs),
    /// Write the pipeline for another scheduler or engine (systemd, Argo Workflows).
    Export(export::ExportArgs),
    /// Architecture, parameter count, dtypes and tensors of a model or adapter folder.
    Inspect(model::InspectArgs),
    /// One forward pass over token ids; writes the logits as safetensors.
    Forward(model::ForwardArgs),
    /// Generate text from a model (and an adapter); the text goes to stdout.
    Generate(generate::GenerateArgs),
    /// Convert an adapter between PEFT, mlx-lm and taper, or import a GGUF checkpoint.
    Migrate(formats::MigrateArgs),
    /// Merge an adapter into its base model; writes a Hugging Face model folder.
    Merge(formats::MergeArgs),
}

/// Options that select what runs (shared by `run` and `plan`).
#[derive(Debug, Args, Clone, Default)]
pub struct Selection {
    /// Override a parameter: `--set lr=3e-4` sets `params.lr` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Run this stage even if it is up to date (repeatable; a fan-out base name selects
    /// all its stages).
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Run every selected stage even if up to date.
    #[arg(long)]
    pub force_all: bool,
    /// Run only this stage and what it needs (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub target: Vec<String>,
    /// With --target: also run what depends on the targets.
    #[arg(long, requires = "target")]
    pub downstream: bool,
    /// Run exactly this stage, after checking that the stages it needs are up to date.
    #[arg(long, value_name = "STAGE", conflicts_with_all = ["target", "downstream"])]
    pub only: Option<String>,
}

impl Selection {
    /// As planner options.
    pub fn plan_options(&self) -> crate::plan::PlanOptions {
        crate::plan::PlanOptions {
            force: self.force.clone(),
            force_all: self.force_all,
            targets: self.target.clone(),
            downstream: self.downstream,
            only: self.only.clone(),
        }
    }
}

/// Runs the parsed command line; returns the exit code or a failure to print.
pub fn run(cli: Cli) -> Result<i32, Failure> {
    let root = match &cli.workspace {
        Some(w) => w.clone(),
        None => std::env::current_dir()
            .map_err(|e| Failure::new(exit::ERROR, format!("error: no current folder: {e}")))?,
    };
    let layout = crate::state::Layout::new(root);
    match cli.command {
        Command::Run(a) => run::run(&layout, &a),
        Command::Plan(a) => plan::plan(&layout, &a),
        Command::Status(a) => plan::status(&layout, &a),
        Command::Dag(a) => dag::dag(&a),
        Command::Validate(a) => plan::validate(&layout, &a),
        Command::Runs(a) => history::runs(&layout, &a),
        Command::Show(a) => history::show(&layout, &a),
        Command::Verify(a) => history::verify(&layout, &a),
        Command::Report(a) => report::report(&layout, &a),
        Command::Kinds(a) => kinds::kinds(&a),
        Command::Init(a) => init::init(&a),
        Command::Completions(a) => init::completions(&a),
        Command::Gc(a) => history::gc(&layout, &a),
        Command::Schedule(a) => schedule::schedule(&layout, &a),
        Command::Export(a) => export::export(&layout, &a),
        Command::Inspect(a) => model::inspect(&a),
        Command::Forward(a) => model::forward(&a),
        Command::Generate(a) => generate::generate(&a),
        Command::Migrate(a) => formats::migrate(&a),
        Command::Merge(a) => formats::merge(&a),
    }
}
