//! `kind: migrate` — converts an adapter between taper, PEFT and mlx-lm layouts, or
//! imports a GGUF checkpoint as a model directory ([`crate::formats::migrate`]).
//!
//! ```yaml
//! to_mlx:
//!   kind: migrate
//!   inputs: [adapters/run]
//!   outputs: [export/mlx]
//!   with: {from: taper, to: mlx, base_model: models/base}
//! ```

use serde::Deserialize;

use super::context::{StageContext, StageError, StageEvent};
use crate::formats::{migrate, MigrateFormat, MigrateOptions};

/// Bumped when the way a migrate stage converts changes what it produces.
pub const VERSION: u32 = 1;

/// Every `with:` key: (key, default, meaning), printed by `taper kinds`.
pub const KEYS: &[(&str, &str, &str)] = &[
    ("from", "required", "taper, peft, mlx or gguf"),
    (
        "to",
        "required",
        "taper, peft, mlx, or hf (for a GGUF import)",
    ),
    (
        "base_model",
        "none",
        "base model folder to check the adapter against",
    ),
    (
        "dtype",
        "from the file",
        "GGUF import: f32, f16 or bf16 weights",
    ),
];

/// `with:` of a migrate stage.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrateConfig {
    /// `taper`, `peft`, `mlx` or `gguf`.
    pub from: String,
    /// `taper`, `peft`, `mlx` or `hf` (for GGUF).
    pub to: String,
    /// Workspace-relative base model directory, to check the adapter against.
    #[serde(default)]
    pub base_model: Option<String>,
    /// GGUF import: dtype of the written weights (`f32`, `f16`, `bf16`).
    #[serde(default)]
    pub dtype: Option<String>,
}

/// Runs one attempt: reads the stage's only input, writes its only output.
pub fn run(cfg: &MigrateConfig, ctx: &StageContext<'_>) -> Result<(), StageError> {
    let failed = |e: crate::formats::FormatError| StageError::Failed(e.to_string());
    let from: MigrateFormat = cfg.from.parse().map_err(failed)?;
    let to: MigrateFormat = cfg.to.parse().map_err(failed)?;
    let (input, output) = single_io(ctx, "migrate")?;
    let options = MigrateOptions {
        base: cfg.base_model.as_ref().map(|b| ctx.workspace.join(b)),
        dtype: cfg.dtype.clone(),
    };
    ctx.check_cancelled()?;
    let report = migrate(
        from,
        to,
        &ctx.workspace.join(input),
        &ctx.staged(output),
        &options,
    )
    .map_err(failed)?;
    ctx.metric(0, "tensors", report.tensors as f64);
    ctx.emit(StageEvent::Progress {
        done: 1,
        total: Some(1),
        unit: "conversions".into(),
        message: format!("{} -> {}", cfg.from, cfg.to),
    });
    Ok(())
}

/// The one input and one output of a stage that reads a path and writes a path.
pub(crate) fn single_io<'a>(
    ctx: &'a StageContext<'_>,
    kind: &str,
) -> Result<(&'a str, &'a str), StageError> {
    match (&ctx.stage.inputs[..], &ctx.stage.outputs[..]) {
        ([i], [o]) => Ok((i.path.as_str(), o.path.as_str())),
        _ => Err(StageError::Failed(format!(
            "a {kind} stage needs exactly one input and one output"
        ))),
    }
}
