//! `with:` of an eval stage: the serde mirror of the YAML (unknown keys rejected) and the
//! checks that serde cannot make.
//!
//! ```yaml
//! with:
//!   base_model: models/base          # model folder (config.json, safetensors, tokenizer.json)
//!   adapter: adapters/run            # optional; any adapter format taper reads
//!   data: tokens/valid               # a folder of token shards from the tokenize stage
//!   compare_base: true               # also score (and sample) the base alone (default false)
//!   batch_size: 4                    # rows per forward pass (default 4)
//!   device: auto                     # cpu | cuda | metal | auto (default auto)
//!   dtype: f32                       # f32 | bf16 (default f32)
//!   report: reports/eval.json        # where the report goes (default reports/eval.json)
//!   samples:                         # optional generations recorded in the report
//!     prompts: datasets/prompts.txt  # one prompt per non-empty line
//!     max_new_tokens: 64             # default 64
//!     temperature: 0.7               # default 0 = greedy
//!     top_k: 50                      # default off
//!     top_p: 0.9                     # default off
//!     repetition_penalty: 1.1        # default 1 = off
//!     seed: 1                        # default 0
//!     chat: true                     # wrap prompts in chat_template (default false)
//!     chat_template: chatml          # chatml | llama3 (default chatml, as tokenize)
//!   gates:                           # each: {min: x} and/or {max: y}
//!     eval_loss: {max: 2.5}
//!     perplexity: {max: 40}
//!     base_loss: {max: 3}
//!     base_perplexity: {max: 60}
//!     improvement_over_base: {min: 0.05}   # (base_loss - eval_loss) / base_loss
//! ```

use serde::{Deserialize, Serialize};

use crate::model::sampling::SamplingConfig;
use crate::model::{ChatTemplate, DeviceChoice};

/// The default report path.
pub const DEFAULT_REPORT: &str = "reports/eval.json";

/// `with:` of `kind: eval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Model folder, workspace-relative.
    pub base_model: String,
    /// Adapter folder applied unmerged; absent = evaluate the base model.
    #[serde(default)]
    pub adapter: Option<String>,
    /// Folder of `part-*.parquet` token shards (`input_ids`, `loss_mask`).
    pub data: String,
    /// Also score the base model alone, for `base_*` metrics and the improvement.
    #[serde(default)]
    pub compare_base: bool,
    /// Rows per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// cpu | cuda | metal | auto.
    #[serde(default = "default_device")]
    pub device: String,
    /// Compute dtype: f32 | bf16.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Report path, workspace-relative; must be (under) a declared output.
    #[serde(default = "default_report")]
    pub report: String,
    /// Sample generations.
    #[serde(default)]
    pub samples: Option<SamplesConfig>,
    /// Conditions on the metrics; a failed one fails the stage.
    #[serde(default)]
    pub gates: GatesConfig,
}

/// `samples:` — text generated for each prompt, recorded in the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplesConfig {
    /// Text file, one prompt per non-empty line, workspace-relative.
    pub prompts: String,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default = "default_penalty")]
    pub repetition_penalty: f64,
    #[serde(default)]
    pub seed: u64,
    /// Wrap each prompt as a user turn in `chat_template`.
    #[serde(default)]
    pub chat: bool,
    #[serde(default)]
    pub chat_template: ChatTemplate,
}

impl SamplesConfig {
    /// The sampling settings.
    pub fn sampling(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
        }
    }
}

/// `gates:` — one optional bound per metric.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatesConfig {
    /// Mean token loss of the evaluated model (with the adapter, if any).
    #[serde(default)]
    pub eval_loss: Option<Bound>,
    /// `exp(eval_loss)`.
    #[serde(default)]
    pub perplexity: Option<Bound>,
    /// Mean token loss of the base model alone (needs `compare_base`).
    #[serde(default)]
    pub base_loss: Option<Bound>,
    /// `exp(base_loss)` (needs `compare_base`).
    #[serde(default)]
    pub base_perplexity: Option<Bound>,
    /// Relative drop of the loss, `(base_loss - eval_loss) / base_loss` (needs an
    /// adapter and `compare_base`).
    #[serde(default)]
    pub improvement_over_base: Option<Bound>,
}

impl GatesConfig {
    /// `(metric name, bound)` of every gate set, in a fixed order.
    pub fn list(&self) -> Vec<(&'static str, Bound)> {
        [
            ("eval_loss", self.eval_loss),
            ("perplexity", self.perplexity),
            ("base_loss", self.base_loss),
            ("base_perplexity", self.base_perplexity),
            ("improvement_over_base", self.improvement_over_base),
        ]
        .into_iter()
        .filter_map(|(n, b)| b.map(|b| (n, b)))
        .collect()
    }
}

/// Lower and/or upper bound of a metric (inclusive).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bound {
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

fn default_batch_size() -> usize {
    4
}
fn default_device() -> String {
    "auto".into()
}
fn default_dtype() -> String {
    "f32".into()
}
fn default_report() -> String {
    DEFAULT_REPORT.into()
}
fn default_max_new_tokens() -> usize {
    64
}
fn default_penalty() -> f64 {
    1.0
}

/// A configuration problem: the key under `with` and what is wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

impl EvalConfig {
    /// Checks what serde cannot. `outputs` are the stage's declared output paths.
    pub fn validate(&self, outputs: &[&str]) -> Result<(), ConfigProblem> {
        let problem = |key: &str, message: String| ConfigProblem {
            key: key.to_string(),
            message,
        };
        if self.batch_size == 0 {
            return Err(problem("batch_size", "must be at least 1".into()));
        }
        self.device
            .parse::<DeviceChoice>()
            .map_err(|m| problem("device", m))?;
        crate::model::parse_compute_dtype(&self.dtype)
            .map_err(|e| problem("dtype", e.to_string()))?;
        let covered = outputs.iter().any(|o| {
            let o = o.trim_end_matches('/');
            self.report == o || self.report.starts_with(&format!("{o}/"))
        });
        if !covered {
            return Err(problem(
                "report",
                format!(
                    "\"{}\" is not a declared output of the stage (add it to `outputs`)",
                    self.report
                ),
            ));
        }
        if let Some(s) = &self.samples {
            s.sampling().validate().map_err(|m| problem("samples", m))?;
        }
        for (name, bound) in self.gates.list() {
            let key = format!("gates.{name}");
            match (bound.min, bound.max) {
                (None, None) => return Err(problem(&key, "give `min`, `max` or both".into())),
                (Some(lo), Some(hi)) if lo > hi => {
                    return Err(problem(&key, format!("min {lo} is above max {hi}")))
                }
                _ => {}
            }
            if name.starts_with("base_") && !self.compare_base {
                return Err(problem(
                    &key,
                    "needs `compare_base: true` (the base model is not scored otherwise)".into(),
                ));
            }
            if name == "improvement_over_base" && (self.adapter.is_none() || !self.compare_base) {
                return Err(problem(
                    &key,
                    "needs an `adapter` and `compare_base: true`".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Every `with:` key of an eval stage: (key, default, meaning), for `taper kinds` and
/// `taper run --help`.
pub const KEYS: &[(&str, &str, &str)] = &[
    ("base_model", "required", "model folder"),
    ("adapter", "none", "adapter folder (any format taper reads), applied unmerged; none = the base alone"),
    ("data", "required", "folder of token shards (part-*.parquet) to score"),
    ("compare_base", "false", "also score the base model alone (base_* metrics, improvement) and, with samples, generate from it too (base_samples)"),
    ("batch_size", "4", "rows per forward pass"),
    ("device", "auto", "cpu | cuda | metal | auto"),
    ("dtype", "f32", "compute dtype: f32 | bf16"),
    ("report", "reports/eval.json", "JSON report path; must be (under) a declared output"),
    ("samples.prompts", "required with samples", "text file, one prompt per line"),
    ("samples.max_new_tokens", "64", "tokens to generate per prompt"),
    ("samples.temperature", "0", "0 = greedy"),
    ("samples.top_k / top_p", "none", "sampling cut-offs"),
    ("samples.repetition_penalty", "1.0", "penalty on tokens already present"),
    ("samples.seed", "0", "sampling seed"),
    ("samples.chat / chat_template", "false / chatml", "wrap each prompt as a user turn"),
    ("gates", "none", "eval_loss, perplexity, base_loss, base_perplexity, improvement_over_base: {min, max}; a failed gate fails the run (exit 5)"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EvalConfig {
        serde_json::from_value(serde_json::json!({
            "base_model": "m", "adapter": "a", "data": "d"
        }))
        .unwrap()
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = cfg();
        assert_eq!(
            (c.batch_size, c.compare_base, c.report.as_str()),
            (4, false, DEFAULT_REPORT)
        );
        assert!(c.validate(&["reports/eval.json"]).is_ok());
        assert!(c.validate(&["reports"]).is_ok());
    }

    #[test]
    fn problems_name_their_key() {
        let mut c = cfg();
        assert_eq!(c.validate(&["other.json"]).unwrap_err().key, "report");
        c.gates.improvement_over_base = Some(Bound {
            min: Some(0.05),
            max: None,
        });
        let p = c.validate(&["reports/eval.json"]).unwrap_err();
        assert_eq!(p.key, "gates.improvement_over_base");
        assert!(p.message.contains("compare_base"), "{}", p.message);
        c.compare_base = true;
        assert!(c.validate(&["reports/eval.json"]).is_ok());
        c.gates.perplexity = Some(Bound::default());
        assert_eq!(
            c.validate(&["reports/eval.json"]).unwrap_err().key,
            "gates.perplexity"
        );
    }
}
