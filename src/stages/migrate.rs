//! `kind: migrate` — converts an adapter between taper, PEFT and mlx-lm layouts, or
//! imports a GGUF checkpoint as a model directory ([`crate::formats::migrate`]).
//!
//! ```yaml
//! to_mlx:
//!   kind: migrate
//!   inputs: [adapters/run, models/base]
//!   outputs: [export/mlx]
//!   with: {from: taper, to: mlx, base_model: models/base}
//! ```
//!
//! The stage converts its one input other than `base_model`; declaring the base as an
//! input too makes a changed base re-run the conversion (and its check).

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

/// Runs one attempt: converts the stage's input (the one that is not the base) into its
/// only output.
pub fn run(cfg: &MigrateConfig, ctx: &StageContext<'_>) -> Result<(), StageError> {
    let failed = |e: crate::formats::FormatError| StageError::Failed(e.to_string());
    let from: MigrateFormat = cfg.from.parse().map_err(failed)?;
    let to: MigrateFormat = cfg.to.parse().map_err(failed)?;
    let (input, output) = io(ctx, cfg.base_model.as_deref())?;
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

/// The input to convert (the only one that is not `base`) and the only output.
fn io<'a>(ctx: &'a StageContext<'_>, base: Option<&str>) -> Result<(&'a str, &'a str), StageError> {
    let inputs: Vec<&str> = ctx
        .stage
        .inputs
        .iter()
        .map(|i| i.path.as_str())
        .filter(|p| Some(*p) != base)
        .collect();
    match (&inputs[..], &ctx.stage.outputs[..]) {
        ([i], [o]) => Ok((i, o.path.as_str())),
        _ => Err(StageError::Failed(
            "a migrate stage needs one input to convert (besides `base_model`) and one output"
                .into(),
        )),
    }
}
