//! `taper inspect` and `taper forward`: for people who debug models.

use super::exit::{self, Failure};
use crate::model::{self, DeviceChoice};
use clap::Args;
use std::path::PathBuf;

/// `taper inspect` options.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A model folder (config.json + safetensors) or an adapter folder (PEFT, mlx-lm,
    /// taper).
    pub dir: PathBuf,
}

/// `taper forward` options.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// Model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folder (any format taper reads), applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSON file `{"input_ids": [[...], ...]}`.
    #[arg(long)]
    pub input_ids: PathBuf,
    /// Output safetensors file; holds `logits` f32 [batch, seq, vocab].
    #[arg(long)]
    pub out: PathBuf,
    /// cpu | cuda | metal | auto
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32 | bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::ERROR, format!("error: {e}"))
}

/// `taper inspect`.
pub fn inspect(a: &InspectArgs) -> Result<i32, Failure> {
    let report = model::inspect(&a.dir).map_err(fail)?;
    print!("{report}");
    Ok(exit::SUCCESS)
}

/// `taper forward`.
pub fn forward(a: &ForwardArgs) -> Result<i32, Failure> {
    let device: DeviceChoice = a.device.parse().map_err(fail)?;
    let device = device.open().map_err(fail)?;
    let dtype = model::parse_compute_dtype(&a.dtype).map_err(fail)?;
    let ids = model::read_input_ids(&a.input_ids).map_err(fail)?;
    let logits =
        model::forward_logits(&a.model, a.adapter.as_deref(), ids, &device, dtype).map_err(fail)?;
    model::write_logits(&a.out, &logits).map_err(fail)?;
    Ok(exit::SUCCESS)
}
