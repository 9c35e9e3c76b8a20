//! `taper migrate` and `taper merge`: the migrate and merge stages as commands, for
//! adapters and models outside a pipeline.

use super::exit::{self, Failure};
use crate::formats::{self, MigrateFormat, MigrateOptions, Rounding, DEFAULT_SHARD_SIZE};
use clap::Args;
use std::path::PathBuf;

/// `taper migrate` options.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The input's format: an adapter (peft, mlx, taper) or a GGUF file (gguf).
    #[arg(long, value_parser = ["peft", "mlx", "taper", "gguf"])]
    pub from: String,
    /// The output's format: an adapter (peft, mlx, taper) or, from gguf, a Hugging Face
    /// model folder (hf).
    #[arg(long, value_parser = ["peft", "mlx", "taper", "hf"])]
    pub to: String,
    /// The adapter folder, or the `.gguf` file.
    #[arg(value_name = "IN")]
    pub input: PathBuf,
    /// The folder to write; must not exist or be empty.
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// The base model folder: the adapter is checked against it (targets, shapes, the
    /// base identity a taper adapter records); mlx output needs it to count blocks.
    #[arg(long, value_name = "DIR")]
    pub base: Option<PathBuf>,
    /// GGUF import only: the dtype of the written weights.
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    pub dtype: Option<String>,
}

/// `taper merge` options.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model folder (config.json + safetensors).
    #[arg(long, value_name = "DIR")]
    pub base: PathBuf,
    /// The adapter folder (PEFT, mlx-lm or taper; detected).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// The model folder to write; must not exist or be empty.
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// How half-precision weights are rounded: peft `half(W + Δ)`, mlx
    /// `half(W + half(Δ))`.
    #[arg(long, value_parser = ["peft", "mlx"], default_value = "peft")]
    pub rounding: String,
    /// Largest safetensors shard (`5GB`, `500MB`, `2GiB` or bytes). Default: 5GB.
    #[arg(long, value_name = "SIZE")]
    pub shard_size: Option<String>,
}

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::ERROR, format!("error: {e}"))
}

/// `taper migrate`.
pub fn migrate(a: &MigrateArgs) -> Result<i32, Failure> {
    let from: MigrateFormat = a.from.parse().map_err(fail)?;
    let to: MigrateFormat = a.to.parse().map_err(fail)?;
    let options = MigrateOptions {
        base: a.base.clone(),
        dtype: a.dtype.clone(),
    };
    let report = formats::migrate(from, to, &a.input, &a.output, &options).map_err(fail)?;
    let what = if from == MigrateFormat::Gguf {
        "tensors"
    } else {
        "modules"
    };
    println!(
        "{} -> {}: {} {what} written to {}",
        a.from,
        a.to,
        report.tensors,
        a.output.display()
    );
    Ok(exit::SUCCESS)
}

/// `taper merge`.
pub fn merge(a: &MergeArgs) -> Result<i32, Failure> {
    let rounding: Rounding = a.rounding.parse().map_err(fail)?;
    let shard_size = match &a.shard_size {
        None => DEFAULT_SHARD_SIZE,
        Some(s) => formats::merge::parse_size(s).ok_or_else(|| {
            fail(format!(
                "--shard-size {s}: expected a size such as 5GB, 500MB or a byte count"
            ))
        })?,
    };
    let report =
        formats::merge(&a.base, &a.adapter, &a.output, rounding, shard_size).map_err(fail)?;
    println!(
        "merged {} tensors, copied {}, {} shard{} ({} bytes) written to {}",
        report.merged,
        report.copied,
        report.shards,
        if report.shards == 1 { "" } else { "s" },
        report.bytes,
        a.output.display()
    );
    Ok(exit::SUCCESS)
}
