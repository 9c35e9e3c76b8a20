//! Reading mlx-lm LoRA adapters: `adapter_config.json` (`fine_tune_type`, `num_layers`
//! counted from the last block with -1 = all, `lora_parameters: {rank, scale, dropout,
//! keys}`) plus `adapters.safetensors` with `<module>.lora_a` `[in, r]` and
//! `<module>.lora_b` `[r, out]`, the transpose of PEFT's layout. `scale` is the
//! multiplier itself (there is no alpha); a missing `keys` means every linear of a block.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use super::adapter::{
    read_json, read_tensors, Adapter, AdapterFormat, AdapterModule, ADAPTER_CONFIG,
};
use super::error::FormatError;
use super::peft::targets_present;
use crate::model::lora_config::{layer_index, LayerSelection, LoraConfig, LORA_TARGETS};

/// The weights file name.
pub const WEIGHTS: &str = "adapters.safetensors";

/// Reads the mlx-lm adapter in `dir`.
pub fn read(dir: &Path) -> Result<Adapter, FormatError> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let json = read_json(&config_path)?;
    let Settings {
        rank,
        scale,
        dropout,
        all_layers,
    } = parse_config(&json, &config_path)?;
    let weights_path = dir.join(WEIGHTS);
    let tensors = read_tensors(&weights_path)?;

    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in tensors {
        let (module, which) = if let Some(m) = name.strip_suffix(".lora_a") {
            (m, 0)
        } else if let Some(m) = name.strip_suffix(".lora_b") {
            (m, 1)
        } else {
            return Err(FormatError::UnexpectedTensor {
                file: weights_path.clone(),
                name,
                message: "only lora_a / lora_b tensors are supported (DoRA magnitudes and \
                          fully trained weights are not)"
                    .into(),
            });
        };
        let short = module.rsplit('.').next().unwrap_or(module);
        if !LORA_TARGETS.contains(&short) || layer_index(module).is_none() {
            return Err(FormatError::UnexpectedTensor {
                file: weights_path.clone(),
                name: name.clone(),
                message: format!(
                    "LoRA is only supported on {} of a decoder block",
                    LORA_TARGETS.join(", ")
                ),
            });
        }
        let slot = pairs.entry(module.to_string()).or_default();
        if which == 0 {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }

    let mut modules = BTreeMap::new();
    for (module, pair) in pairs {
        let name = |which: &str| format!("{module}.lora_{which}");
        let missing = |which: &str| FormatError::MissingTensor {
            file: weights_path.clone(),
            name: name(which),
        };
        let lora_a = pair.0.ok_or_else(|| missing("a"))?;
        let lora_b = pair.1.ok_or_else(|| missing("b"))?;
        let shape = |t: &Tensor, which: &str, expected: String| FormatError::ShapeMismatch {
            file: weights_path.clone(),
            name: name(which),
            expected,
            found: t.dims().to_vec(),
        };
        if lora_a.dims().len() != 2 || lora_a.dims()[1] != rank {
            return Err(shape(
                &lora_a,
                "a",
                format!("[in, {rank}] (rank from the config)"),
            ));
        }
        if lora_b.dims().len() != 2 || lora_b.dims()[0] != rank {
            return Err(shape(
                &lora_b,
                "b",
                format!("[{rank}, out] (rank from the config)"),
            ));
        }
        let transpose = |t: Tensor, which: &str| {
            t.t()
                .and_then(|t| t.contiguous())
                .map_err(|e| FormatError::Safetensors {
                    file: weights_path.clone(),
                    message: format!("`{}`: {e}", name(which)),
                })
        };
        let a = transpose(lora_a, "a")?;
        let b = transpose(lora_b, "b")?;
        modules.insert(module, AdapterModule { a, b, scale });
    }
    if modules.is_empty() {
        return Err(FormatError::MissingTensor {
            file: weights_path,
            name: "*.lora_a".into(),
        });
    }

    // mlx-lm has no alpha: alpha = scale * rank keeps alpha / r == scale.
    let mut config = LoraConfig::new(rank, scale * rank as f64);
    config.dropout = dropout;
    config.targets = targets_present(modules.keys());
    config.layers = if all_layers {
        LayerSelection::All
    } else {
        let mut layers: Vec<usize> = modules.keys().filter_map(|m| layer_index(m)).collect();
        layers.dedup();
        LayerSelection::List(layers)
    };
    Ok(Adapter {
        format: AdapterFormat::Mlx,
        config,
        modules,
    })
}

struct Settings {
    rank: usize,
    scale: f64,
    dropout: f32,
    all_layers: bool,
}

fn parse_config(json: &Value, path: &Path) -> Result<Settings, FormatError> {
    let invalid = |key: &str, message: &str| FormatError::Invalid {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: message.to_string(),
    };
    match json.get("fine_tune_type").and_then(Value::as_str) {
        None | Some("lora") => {}
        Some(other) => {
            return Err(FormatError::Unsupported {
                path: path.to_path_buf(),
                key: "fine_tune_type".into(),
                what: format!("fine_tune_type \"{other}\""),
            })
        }
    }
    let num_layers = json
        .get("num_layers")
        .or_else(|| json.get("lora_layers"))
        .and_then(Value::as_i64)
        .unwrap_or(-1);
    if num_layers == 0 || num_layers < -1 {
        return Err(invalid(
            "num_layers",
            "must be -1 (all) or a positive count",
        ));
    }
    let params = json
        .get("lora_parameters")
        .ok_or_else(|| invalid("lora_parameters", "missing"))?;
    let rank = match params.get("rank").and_then(Value::as_u64) {
        Some(r) if r > 0 => r as usize,
        _ => {
            return Err(invalid(
                "lora_parameters.rank",
                "must be a positive integer",
            ))
        }
    };
    let scale = params
        .get("scale")
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite())
        .ok_or_else(|| invalid("lora_parameters.scale", "must be a number"))?;
    let dropout = params.get("dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    if !(0.0..1.0).contains(&dropout) {
        return Err(invalid("lora_parameters.dropout", "must be in [0, 1)"));
    }
    Ok(Settings {
        rank,
        scale,
        dropout,
        all_layers: num_layers == -1,
    })
}
