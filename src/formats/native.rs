//! taper's own adapter format, what the `train` stage writes:
//!
//! ```text
//! adapter_config.json   {"format": "taper.adapter.v1", r, alpha, rslora, dropout, targets,
//!                        layers, modules, rank_pattern, alpha_pattern, dtype,
//!                        base_model: {architecture, config_blake3, weights_blake3},
//!                        training: {...}}
//! adapter.safetensors   <module>.lora_A.weight [r, in], <module>.lora_B.weight [out, r], f32
//! ```
//!
//! Module names are model paths (`model.layers.0.self_attn.q_proj`), A and B in PEFT's
//! orientation, so a PEFT key is `base_model.model.` + the native key. The bytes are a
//! function of the content only: tensors in name order, JSON keys sorted, no timestamps,
//! no absolute paths.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::adapter::{
    read_json, read_tensors, Adapter, AdapterFormat, AdapterModule, ADAPTER_CONFIG,
};
use super::error::FormatError;
use super::peft::targets_present;
use crate::model::lora_config::{layer_index, LayerSelection, LoraConfig, LORA_TARGETS};
use crate::model::ModelDir;

/// The weights file name.
pub const WEIGHTS: &str = "adapter.safetensors";
/// The value of `format` in `adapter_config.json`.
pub const FORMAT: &str = "taper.adapter.v1";

/// Which base model an adapter was trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModel {
    /// `LlamaForCausalLM`, `Qwen2ForCausalLM`.
    pub architecture: String,
    /// blake3 (hex) of the model's `config.json`.
    pub config_blake3: String,
    /// blake3 (hex) of the weights file; for a sharded checkpoint, blake3 of the lines
    /// `<file name> <file blake3>\n` in file-name order.
    pub weights_blake3: String,
}

impl BaseModel {
    /// Hashes the model in `dir`.
    pub fn of_dir(dir: &Path) -> Result<Self, FormatError> {
        let model = ModelDir::open(dir).map_err(|e| FormatError::Invalid {
            path: dir.to_path_buf(),
            key: "base_model".into(),
            message: e.to_string(),
        })?;
        let config_blake3 = hash_file(&crate::model::config::config_path(dir))?;
        let mut files: Vec<&Path> = model.weights.paths().collect();
        files.sort();
        files.dedup();
        let weights_blake3 = match files.as_slice() {
            [one] => hash_file(one)?,
            many => {
                let mut lines = String::new();
                for f in many {
                    let name = f
                        .file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default();
                    lines.push_str(&format!("{name} {}\n", hash_file(f)?));
                }
                blake3::hash(lines.as_bytes()).to_hex().to_string()
            }
        };
        Ok(Self {
            architecture: model.config.architecture.hf_name().to_string(),
            config_blake3,
            weights_blake3,
        })
    }
}

/// What the native format records besides the LoRA weights and settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeInfo {
    pub base_model: BaseModel,
    /// The compute dtype the adapter was trained in (`f32`, `bf16`).
    pub dtype: String,
    /// The training configuration (and anything else the trainer wants kept), as JSON.
    pub training: Value,
}

fn hash_file(path: &Path) -> Result<String, FormatError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// `value` with every object's keys in sorted order (serde_json here keeps insertion order).
pub fn sorted_json(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sorted_json(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted_json).collect()),
        other => other,
    }
}

fn layers_json(layers: &LayerSelection) -> Value {
    match layers {
        LayerSelection::All => Value::from("all"),
        LayerSelection::List(l) => Value::from(l.clone()),
        LayerSelection::Range { start, end } => Value::from((*start..*end).collect::<Vec<_>>()),
    }
}

/// Writes `adapter` into `dir` (created if missing) in the native format.
pub fn write(dir: &Path, adapter: &Adapter, info: &NativeInfo) -> Result<(), FormatError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FormatError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let c = &adapter.config;
    let pairs = |p: &[(String, f64)]| -> Value {
        Value::Array(p.iter().map(|(k, v)| serde_json::json!([k, v])).collect())
    };
    let ranks: Vec<(String, f64)> = c
        .rank_pattern
        .iter()
        .map(|(k, r)| (k.clone(), *r as f64))
        .collect();
    let config = serde_json::json!({
        "format": FORMAT,
        "r": c.r,
        "alpha": c.alpha,
        "rslora": c.rslora,
        "dropout": c.dropout,
        "targets": c.targets.names(),
        "layers": layers_json(&c.layers),
        "modules": adapter.modules.keys().collect::<Vec<_>>(),
        "rank_pattern": pairs(&ranks),
        "alpha_pattern": pairs(&c.alpha_pattern),
        "dtype": info.dtype,
        "base_model": serde_json::to_value(&info.base_model).unwrap_or(Value::Null),
        "training": info.training,
    });
    let config_path = dir.join(ADAPTER_CONFIG);
    let mut text =
        serde_json::to_string_pretty(&sorted_json(config)).map_err(|source| FormatError::Json {
            path: config_path.clone(),
            source,
        })?;
    text.push('\n');
    std::fs::write(&config_path, text).map_err(io(&config_path))?;

    let weights_path = dir.join(WEIGHTS);
    let fail = |message: String| FormatError::Safetensors {
        file: weights_path.clone(),
        message,
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (module, m) in &adapter.modules {
        for (suffix, t) in [("lora_A.weight", &m.a), ("lora_B.weight", &m.b)] {
            let t = t
                .to_device(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.contiguous())
                .map_err(|e| fail(format!("{module}.{suffix}: {e}")))?;
            tensors.push((format!("{module}.{suffix}"), t));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = HashMap::from([("format".to_string(), FORMAT.to_string())]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
            .map_err(|e| fail(e.to_string()))?;
    std::fs::write(&weights_path, bytes).map_err(io(&weights_path))
}

/// Reads the native adapter in `dir`.
pub fn read(dir: &Path) -> Result<Adapter, FormatError> {
    read_with_info(dir).map(|(adapter, _)| adapter)
}

/// Reads the native adapter in `dir` with what it records about its training.
pub fn read_with_info(dir: &Path) -> Result<(Adapter, NativeInfo), FormatError> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let json = read_json(&config_path)?;
    let invalid = |key: &str, message: String| FormatError::Invalid {
        path: config_path.clone(),
        key: key.to_string(),
        message,
    };
    match json.get("format").and_then(Value::as_str) {
        Some(FORMAT) => {}
        Some(other) => {
            return Err(invalid(
                "format",
                format!("unknown format \"{other}\" (taper reads {FORMAT})"),
            ))
        }
        None => return Err(invalid("format", "missing".into())),
    }
    let uint = |key: &str| {
        json.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| invalid(key, "expected a non-negative integer".into()))
    };
    let float = |key: &str| {
        json.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| invalid(key, "expected a number".into()))
    };
    let mut config = LoraConfig::new(uint("r")? as usize, float("alpha")?);
    config.dropout = float("dropout")? as f32;
    config.rslora = json
        .get("rslora")
        .and_then(Value::as_bool)
        .ok_or_else(|| invalid("rslora", "expected true or false".into()))?;
    config.layers = match json.get("layers") {
        Some(Value::String(s)) if s == "all" => LayerSelection::All,
        Some(Value::Array(items)) => LayerSelection::List(
            items
                .iter()
                .map(|v| v.as_u64().map(|i| i as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    invalid(
                        "layers",
                        "expected \"all\" or a list of block indices".into(),
                    )
                })?,
        ),
        _ => {
            return Err(invalid(
                "layers",
                "expected \"all\" or a list of block indices".into(),
            ))
        }
    };
    let pattern = |key: &str| -> Result<Vec<(String, f64)>, FormatError> {
        let bad = || invalid(key, "expected a list of [pattern, value] pairs".into());
        match json.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|p| match p.as_array().map(Vec::as_slice) {
                    Some([Value::String(k), v]) => {
                        v.as_f64().map(|v| (k.clone(), v)).ok_or_else(bad)
                    }
                    _ => Err(bad()),
                })
                .collect(),
            Some(_) => Err(bad()),
        }
    };
    config.rank_pattern = pattern("rank_pattern")?
        .into_iter()
        .map(|(k, v)| (k, v as usize))
        .collect();
    config.alpha_pattern = pattern("alpha_pattern")?;
    config.validate().map_err(|e| invalid("r", e.to_string()))?;

    let weights_path = dir.join(WEIGHTS);
    let tensors = read_tensors(&weights_path)?;
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in tensors {
        let (module, is_b) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            (m, false)
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            (m, true)
        } else {
            return Err(FormatError::UnexpectedTensor {
                file: weights_path.clone(),
                name,
                message: "expected <module>.lora_A.weight or <module>.lora_B.weight".into(),
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
        if is_b {
            slot.1 = Some(t)
        } else {
            slot.0 = Some(t)
        }
    }
    let mut modules = BTreeMap::new();
    for (module, (a, b)) in pairs {
        let missing = |which: &str| FormatError::MissingTensor {
            file: weights_path.clone(),
            name: format!("{module}.lora_{which}.weight"),
        };
        let (a, b) = (
            a.ok_or_else(|| missing("A"))?,
            b.ok_or_else(|| missing("B"))?,
        );
        let r = config.rank_for(&module);
        if a.dims().len() != 2 || a.dims()[0] != r || b.dims().len() != 2 || b.dims()[1] != r {
            return Err(FormatError::ShapeMismatch {
                file: weights_path.clone(),
                name: format!("{module}.lora_A.weight / lora_B.weight"),
                expected: format!("[{r}, in] and [out, {r}] (rank {r} from the config)"),
                found: [a.dims(), b.dims()].concat(),
            });
        }
        let scale = config.scale_for(&module);
        modules.insert(module, AdapterModule { a, b, scale });
    }
    if modules.is_empty() {
        return Err(FormatError::MissingTensor {
            file: weights_path,
            name: "*.lora_A.weight".into(),
        });
    }
    config.targets = targets_present(modules.keys());
    let base_model = json
        .get("base_model")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| {
            invalid(
                "base_model",
                "expected {architecture, config_blake3, weights_blake3}".into(),
            )
        })?;
    let info = NativeInfo {
        base_model,
        dtype: json
            .get("dtype")
            .and_then(Value::as_str)
            .unwrap_or("f32")
            .to_string(),
        training: json.get("training").cloned().unwrap_or(Value::Null),
    };
    Ok((
        Adapter {
            format: AdapterFormat::Native,
            config,
            modules,
        },
        info,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora_config::Targets;

    fn sample() -> (Adapter, NativeInfo) {
        let dev = Device::Cpu;
        let mut config = LoraConfig::new(2, 4.0);
        config.targets = Targets::parse(&["q_proj", "v_proj"]).unwrap();
        config.dropout = 0.1;
        let mut modules = BTreeMap::new();
        for (i, m) in [
            "model.layers.1.self_attn.v_proj",
            "model.layers.0.self_attn.q_proj",
        ]
        .iter()
        .enumerate()
        {
            let a = Tensor::arange(0f32, 6., &dev)
                .unwrap()
                .reshape((2, 3))
                .unwrap();
            let b = (Tensor::ones((4, 2), DType::F32, &dev).unwrap() * (i as f64 + 1.0)).unwrap();
            modules.insert(m.to_string(), AdapterModule { a, b, scale: 2.0 });
        }
        let info = NativeInfo {
            base_model: BaseModel {
                architecture: "LlamaForCausalLM".into(),
                config_blake3: "c".into(),
                weights_blake3: "w".into(),
            },
            dtype: "f32".into(),
            training: serde_json::json!({"seed": 1, "lr": 0.1}),
        };
        (
            Adapter {
                format: AdapterFormat::Native,
                config,
                modules,
            },
            info,
        )
    }

    #[test]
    fn round_trips_and_bytes_are_deterministic() {
        let (adapter, info) = sample();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write(d1.path(), &adapter, &info).unwrap();
        write(d2.path(), &adapter, &info).unwrap();
        for f in [WEIGHTS, ADAPTER_CONFIG] {
            assert_eq!(
                std::fs::read(d1.path().join(f)).unwrap(),
                std::fs::read(d2.path().join(f)).unwrap()
            );
        }
        let text = std::fs::read_to_string(d1.path().join(ADAPTER_CONFIG)).unwrap();
        assert!(
            text.find("\"alpha\"").unwrap() < text.find("\"r\"").unwrap(),
            "sorted keys"
        );
        assert_eq!(
            super::super::detect_format(d1.path()).unwrap(),
            AdapterFormat::Native
        );
        let (back, info_back) = read_with_info(d1.path()).unwrap();
        assert_eq!(info_back, info);
        assert_eq!(back.config, adapter.config);
        for (name, m) in &adapter.modules {
            let got = &back.modules[name];
            assert_eq!(got.scale, 2.0);
            assert_eq!(
                got.b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                m.b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn wrong_format_and_shapes_are_named() {
        let (adapter, info) = sample();
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &adapter, &info).unwrap();
        let path = dir.path().join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"r\": 2", "\"r\": 3")).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("rank 3"), "{err}");
        std::fs::write(&path, text.replace(FORMAT, "taper.adapter.v9")).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("taper.adapter.v9"), "{err}");
    }
}
