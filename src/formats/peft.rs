//! Reading Hugging Face PEFT LoRA adapters: `adapter_config.json` plus
//! `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`.
//!
//! Settings whose effect taper does not reproduce (DoRA, `modules_to_save`, biases,
//! `fan_in_fan_out`, other PEFT types, ...) are refused with the key that asks for them.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::adapter::{
    read_json, read_tensors, Adapter, AdapterFormat, AdapterModule, ADAPTER_CONFIG,
};
use super::error::FormatError;
use crate::model::lora_config::{layer_index, LayerSelection, LoraConfig, Targets, LORA_TARGETS};

/// The weights file name.
pub const WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before module paths.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The PEFT key of `module`'s A (`"A"`) or B (`"B"`) matrix.
pub fn key(module: &str, which: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_{which}.weight")
}

/// Reads the PEFT adapter in `dir`.
pub fn read(dir: &Path) -> Result<Adapter, FormatError> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let json = read_json(&config_path)?;
    let mut config = parse_config(&json, &config_path)?;
    let weights_path = dir.join(WEIGHTS);
    let tensors = read_tensors(&weights_path)?;

    let unexpected = |name: &str, message: &str| FormatError::UnexpectedTensor {
        file: weights_path.clone(),
        name: name.to_string(),
        message: message.to_string(),
    };
    let mut pairs: BTreeMap<String, (Option<candle_core::Tensor>, Option<candle_core::Tensor>)> =
        BTreeMap::new();
    for (name, t) in tensors {
        let Some(rest) = name.strip_prefix(KEY_PREFIX) else {
            return Err(unexpected(
                &name,
                &format!("keys must start with `{KEY_PREFIX}`"),
            ));
        };
        let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(unexpected(
                &name,
                "only lora_A / lora_B weights are supported (DoRA magnitudes, biases, \
                 embeddings and saved modules are not)",
            ));
        };
        let short = module.rsplit('.').next().unwrap_or(module);
        if !LORA_TARGETS.contains(&short) || layer_index(module).is_none() {
            return Err(unexpected(
                &name,
                &format!(
                    "LoRA is only supported on {} of a decoder block",
                    LORA_TARGETS.join(", ")
                ),
            ));
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
        let missing = |which: &str| FormatError::MissingTensor {
            file: weights_path.clone(),
            name: key(&module, which),
        };
        let a = pair.0.ok_or_else(|| missing("A"))?;
        let b = pair.1.ok_or_else(|| missing("B"))?;
        let r = config.rank_for(&module);
        let shape =
            |t: &candle_core::Tensor, which: &str, expected: String| FormatError::ShapeMismatch {
                file: weights_path.clone(),
                name: key(&module, which),
                expected,
                found: t.dims().to_vec(),
            };
        let (a_dims, b_dims) = (a.dims().to_vec(), b.dims().to_vec());
        if a_dims.len() != 2 || a_dims[0] != r {
            return Err(shape(
                &a,
                "A",
                format!("[{r}, in] (rank {r} from the config)"),
            ));
        }
        if b_dims.len() != 2 || b_dims[1] != r {
            return Err(shape(
                &b,
                "B",
                format!("[out, {r}] (rank {r} from the config)"),
            ));
        }
        let scale = config.scale_for(&module);
        modules.insert(module, AdapterModule { a, b, scale });
    }
    if modules.is_empty() {
        return Err(FormatError::MissingTensor {
            file: weights_path,
            name: format!("{KEY_PREFIX}*.lora_A.weight"),
        });
    }
    config.targets = targets_present(modules.keys());
    Ok(Adapter {
        format: AdapterFormat::Peft,
        config,
        modules,
    })
}

/// The short names of the modules present, as [`Targets`].
pub(crate) fn targets_present<'a>(modules: impl Iterator<Item = &'a String>) -> Targets {
    let mut names: Vec<&str> = modules.map(|m| m.rsplit('.').next().unwrap_or(m)).collect();
    names.sort_by_key(|n| LORA_TARGETS.iter().position(|t| t == n));
    names.dedup();
    if names.len() == LORA_TARGETS.len() {
        Targets::AllLinear
    } else {
        Targets::Modules(names.into_iter().map(String::from).collect())
    }
}

/// Validates `adapter_config.json` and turns it into a [`LoraConfig`].
fn parse_config(json: &Value, path: &Path) -> Result<LoraConfig, FormatError> {
    let unsupported = |key: &str, what: &str| FormatError::Unsupported {
        path: path.to_path_buf(),
        key: key.to_string(),
        what: what.to_string(),
    };
    let invalid = |key: &str, message: &str| FormatError::Invalid {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: message.to_string(),
    };
    let get = |key: &str| json.get(key).filter(|v| !v.is_null());
    let truthy = |key: &str| get(key).is_some_and(|v| v.as_bool() != Some(false));
    let non_empty = |key: &str| {
        get(key).is_some_and(|v| match v {
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => true,
        })
    };

    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => return Err(unsupported("peft_type", &format!("PEFT type {other}"))),
        None => return Err(invalid("peft_type", "missing")),
    }
    if truthy("use_dora") {
        return Err(unsupported("use_dora", "DoRA"));
    }
    if non_empty("modules_to_save") {
        return Err(unsupported(
            "modules_to_save",
            "fully trained extra modules",
        ));
    }
    match get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(other) => return Err(unsupported("bias", &format!("bias = \"{other}\""))),
    }
    for (key, what) in [
        ("fan_in_fan_out", "transposed (Conv1D-style) base weights"),
        ("lora_bias", "a bias on lora_B"),
        ("use_qalora", "QA-LoRA"),
    ] {
        if truthy(key) {
            return Err(unsupported(key, what));
        }
    }
    for (key, what) in [
        ("layer_replication", "layer replication"),
        ("trainable_token_indices", "trainable token embeddings"),
        ("target_parameters", "LoRA on parameters"),
        ("alora_invocation_tokens", "activated LoRA"),
        ("megatron_config", "Megatron layers"),
    ] {
        if non_empty(key) {
            return Err(unsupported(key, what));
        }
    }

    let r = match get("r").and_then(Value::as_u64) {
        Some(r) if r > 0 => r as usize,
        _ => return Err(invalid("r", "must be a positive integer")),
    };
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| invalid("lora_alpha", "must be a number"))?;
    let mut config = LoraConfig::new(r, alpha);
    config.rslora = truthy("use_rslora");
    config.dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    config.layers = match get("layers_to_transform") {
        None => LayerSelection::All,
        Some(Value::Number(n)) => LayerSelection::List(vec![n
            .as_u64()
            .ok_or_else(|| invalid("layers_to_transform", "must be a layer index"))?
            as usize]),
        Some(Value::Array(a)) => LayerSelection::List(
            a.iter()
                .map(|v| v.as_u64().map(|i| i as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("layers_to_transform", "must be layer indices"))?,
        ),
        Some(_) => return Err(invalid("layers_to_transform", "must be an index or a list")),
    };
    config.rank_pattern = pattern(get("rank_pattern"), "rank_pattern", path, |v| {
        v.as_u64().filter(|r| *r > 0).map(|r| r as usize)
    })?;
    config.alpha_pattern = pattern(get("alpha_pattern"), "alpha_pattern", path, Value::as_f64)?;
    config
        .validate()
        .map_err(|e| invalid("lora", &e.to_string()))?;
    Ok(config)
}

fn pattern<T>(
    value: Option<&Value>,
    key: &str,
    path: &Path,
    convert: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<(String, T)>, FormatError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let invalid = |message: String| FormatError::Invalid {
        path: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    let Value::Object(map) = value else {
        return Err(invalid("must be an object".into()));
    };
    map.iter()
        .map(|(k, v)| {
            convert(v)
                .map(|v| (k.clone(), v))
                .ok_or_else(|| invalid(format!("bad value for `{k}`: {v}")))
        })
        .collect()
}
