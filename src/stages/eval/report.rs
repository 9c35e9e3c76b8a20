//! The eval report, `reports/eval.json` by default: scores, gate results and samples,
//! written as pretty JSON with every object's keys sorted, so that the same results give
//! the same bytes.

use std::path::Path;

use serde::Serialize;

use super::gates::GateResult;
use super::score::Score;
use crate::model::StopCause;

/// Everything an eval found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Workspace-relative paths as configured.
    pub base_model: String,
    pub adapter: Option<String>,
    pub data: String,
    /// The evaluated model (base + adapter, or the base alone).
    pub eval: Score,
    /// The base model alone, with `compare_base`.
    pub base: Option<Score>,
    /// `(base.loss - eval.loss) / base.loss`.
    pub improvement_over_base: Option<f64>,
    pub gates: Vec<GateResult>,
    /// Whether every gate passed.
    pub passed: bool,
    pub samples: Vec<Sample>,
    /// The same prompts through the base alone, with `compare_base` and an adapter;
    /// empty otherwise.
    pub base_samples: Vec<Sample>,
}

/// One generated sample.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub prompt: String,
    /// The generated text only (special tokens left out).
    pub text: String,
    /// Tokens generated (the stop token not counted).
    pub tokens: usize,
    pub stop: StopCause,
}

impl Report {
    /// The report as JSON text with sorted keys.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        let value = sort_keys(serde_json::to_value(self)?);
        let mut text = serde_json::to_string_pretty(&value)?;
        text.push('\n');
        Ok(text)
    }

    /// Writes the report to `path`, creating its folder.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let text = self.to_json().map_err(|e| e.to_string())?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("{}: cannot create: {e}", parent.display()))?;
        }
        std::fs::write(path, text).map_err(|e| format!("{}: cannot write: {e}", path.display()))
    }
}

/// Rebuilds every object of `v` with its keys in sorted order (serde_json keeps insertion
/// order in this crate).
pub fn sort_keys(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_out_sorted_at_every_level() {
        let v = serde_json::json!({"b": 1, "a": [{"z": 1, "y": 2}], "c": {"q": 0, "p": 1}});
        let text = serde_json::to_string(&sort_keys(v)).unwrap();
        assert_eq!(text, r#"{"a":[{"y":2,"z":1}],"b":1,"c":{"p":1,"q":0}}"#);
    }
}
