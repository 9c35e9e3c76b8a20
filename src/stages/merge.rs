//! `kind: merge` — merges a LoRA adapter (taper, PEFT or mlx-lm) into its base and writes
//! a Hugging Face model directory ([`crate::formats::merge()`]).
//!
//! ```yaml
//! merged:
//!   kind: merge
//!   inputs: [adapters/run, models/base]
//!   outputs: [models/merged]
//!   with: {base_model: models/base, adapter: adapters/run, rounding: peft, shard_size: 2GB}
//! ```

use serde::Deserialize;

use super::context::{StageContext, StageError, StageEvent};
use crate::formats::merge::parse_size;
use crate::formats::{merge_with_progress, Rounding, DEFAULT_SHARD_SIZE};

/// Bumped when the way a merge stage computes changes what it produces.
pub const VERSION: u32 = 1;

/// Every `with:` key: (key, default, meaning), printed by `taper kinds`.
pub const KEYS: &[(&str, &str, &str)] = &[
    ("base_model", "required", "base model folder"),
    (
        "adapter",
        "the input that is not the base",
        "adapter folder (taper, PEFT or mlx-lm)",
    ),
    (
        "rounding",
        "peft",
        "how half-precision weights are rounded: peft or mlx",
    ),
    (
        "shard_size",
        "5GB",
        "largest shard: 5GB, 500MB, 2GiB or a byte count",
    ),
];

/// `with:` of a merge stage.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// Workspace-relative base model directory.
    pub base_model: String,
    /// Workspace-relative adapter directory; default: the one input that is not the base.
    #[serde(default)]
    pub adapter: Option<String>,
    /// `peft` (default) or `mlx`: how half-precision weights are rounded.
    #[serde(default)]
    pub rounding: Option<String>,
    /// Largest shard, e.g. `5GB`, `500MB`, or a byte count; default 5GB.
    #[serde(default)]
    pub shard_size: Option<String>,
}

/// Runs one attempt.
pub fn run(cfg: &MergeConfig, ctx: &StageContext<'_>) -> Result<(), StageError> {
    let failed = |e: crate::formats::FormatError| StageError::Failed(e.to_string());
    let rounding: Rounding = cfg
        .rounding
        .as_deref()
        .unwrap_or("peft")
        .parse()
        .map_err(failed)?;
    let shard_size = match &cfg.shard_size {
        None => DEFAULT_SHARD_SIZE,
        Some(s) => parse_size(s).ok_or_else(|| {
            StageError::Failed(format!(
                "shard_size `{s}`: expected a size such as 5GB, 500MB or a byte count"
            ))
        })?,
    };
    let adapter = match &cfg.adapter {
        Some(a) => a.clone(),
        None => {
            let others: Vec<&str> = ctx
                .stage
                .inputs
                .iter()
                .map(|i| i.path.as_str())
                .filter(|p| *p != cfg.base_model)
                .collect();
            match others[..] {
                [one] => one.to_string(),
                _ => {
                    return Err(StageError::Failed(
                        "say which input is the adapter (`with: {adapter: ...}`)".into(),
                    ))
                }
            }
        }
    };
    let [output] = &ctx.stage.outputs[..] else {
        return Err(StageError::Failed(
            "a merge stage needs exactly one output".into(),
        ));
    };
    let mut progress = |done: usize, total: usize| {
        ctx.emit(StageEvent::Progress {
            done: done as u64,
            total: Some(total as u64),
            unit: "tensors".into(),
            message: String::new(),
        });
        !ctx.cancel.is_cancelled()
    };
    let result = merge_with_progress(
        &ctx.workspace.join(&cfg.base_model),
        &ctx.workspace.join(&adapter),
        &ctx.staged(&output.path),
        rounding,
        shard_size,
        &mut progress,
    );
    match result {
        Ok(report) => {
            ctx.metric(0, "merged_tensors", report.merged as f64);
            ctx.metric(0, "copied_tensors", report.copied as f64);
            ctx.metric(0, "shards", report.shards as f64);
            ctx.metric(0, "bytes", report.bytes as f64);
            Ok(())
        }
        Err(crate::formats::FormatError::Cancelled) => {
            ctx.check_cancelled()?;
            Err(StageError::Failed("merge stopped".into()))
        }
        Err(e) => Err(failed(e)),
    }
}
