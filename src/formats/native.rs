//! taper's native adapter format: what the `train` stage writes, and what `migrate`
//! reads and writes as `taper`. One layout, read and written only here:
//!
//! - `adapter.safetensors`: `<module>.lora_A.weight` `[r, in]` and
//!   `<module>.lora_B.weight` `[out, r]` (PEFT's orientation, module paths such as
//!   `model.layers.0.self_attn.q_proj`, so a PEFT key is `base_model.model.` + the native
//!   key), sorted, with `__metadata__ = {"format": "taper"}`.
//! - `adapter_config.json`, sorted keys: `format: "taper-lora"`, `format_version: 1`,
//!   `r`, `alpha`, `rslora`, `dropout`, `targets` (short names), `layers` (null = all,
//!   or block indices), `rank_pattern` / `alpha_pattern` as ordered `[key, value]` pairs
//!   (PEFT's first-match rule needs the order), `dtype` (storage dtype), `base_model`
//!   (`{config_hash, weights_hash}` of [`BaseIdentity`], which hashes tensors in name
//!   order and so does not depend on sharding; or null) and `training` (the train
//!   stage's record: its configuration, steps, rows and tokens seen; or null).
//!
//! Both files are deterministic: the same adapter gives the same bytes (no timestamps,
//! no absolute paths).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::adapter::{read_json, Adapter, ADAPTER_CONFIG};
use super::checkpoint::BaseIdentity;
use super::error::FormatError;
use super::raw_adapter::{faithful_config, AdapterKind, RawAdapter, RawModule};
use super::safetensors_in::{RawTensor, SafetensorsFile};
use super::safetensors_out::{short_f64, write_file, write_json};
use crate::model::lora_config::{layer_index, LayerSelection, LoraConfig, Targets, LORA_TARGETS};

/// The weights file name.
pub const WEIGHTS: &str = "adapter.safetensors";
/// The value of `format` in the config.
pub const FORMAT: &str = "taper-lora";
/// The value of `format_version` in the config.
pub const FORMAT_VERSION: u64 = 1;

fn a_key(module: &str) -> String {
    format!("{module}.lora_A.weight")
}

fn b_key(module: &str) -> String {
    format!("{module}.lora_B.weight")
}

/// Writes `adapter` in taper's format into `dir` (created if missing).
pub fn write(adapter: &RawAdapter, dir: &Path) -> Result<(), FormatError> {
    std::fs::create_dir_all(dir).map_err(|source| FormatError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let config = faithful_config(adapter, "taper", false)?;
    let dtype = adapter
        .modules
        .values()
        .next()
        .map(|m| format!("{:?}", m.a.dtype))
        .unwrap_or_else(|| "F32".into());
    let layers = match config.layers {
        LayerSelection::All => Value::Null,
        _ => json!(adapter.layers()),
    };
    let pairs = |p: Vec<Value>| Value::Array(p);
    let value = json!({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "r": config.r,
        "alpha": config.alpha,
        "rslora": config.rslora,
        "dropout": short_f64(config.dropout),
        "targets": super::peft::targets_present(adapter.modules.keys()).names(),
        "layers": layers,
        "rank_pattern": pairs(config.rank_pattern.iter().map(|(k, v)| json!([k, v])).collect()),
        "alpha_pattern": pairs(config.alpha_pattern.iter().map(|(k, v)| json!([k, v])).collect()),
        "dtype": dtype,
        "base_model": adapter.base.as_ref().map(BaseIdentity::to_json),
        "training": adapter.training.clone(),
    });
    write_json(&dir.join(ADAPTER_CONFIG), &value)?;
    let mut tensors: BTreeMap<String, RawTensor> = BTreeMap::new();
    for (module, m) in &adapter.modules {
        tensors.insert(a_key(module), m.a.clone());
        tensors.insert(b_key(module), m.b.clone());
    }
    let meta = BTreeMap::from([("format".to_string(), "taper".to_string())]);
    write_file(&dir.join(WEIGHTS), &tensors, Some(&meta))
}

/// Reads the taper adapter in `dir` as f32 tensors, to run or inspect it.
pub fn read_adapter(dir: &Path) -> Result<Adapter, FormatError> {
    read(dir)?.to_adapter()
}

/// Reads the taper adapter in `dir` as stored, with its base identity and training
/// record.
pub fn read(dir: &Path) -> Result<RawAdapter, FormatError> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let json = read_json(&config_path)?;
    let config = read_config(&json, &config_path)?;
    let weights = dir.join(WEIGHTS);
    let file = SafetensorsFile::open(&weights)?;
    let unexpected = |name: &str, message: &str| FormatError::UnexpectedTensor {
        file: weights.clone(),
        name: name.into(),
        message: message.into(),
    };
    let mut modules = BTreeMap::new();
    for name in file.entries().keys() {
        let Some(module) = name.strip_suffix(".lora_A.weight") else {
            if name.strip_suffix(".lora_B.weight").is_none() {
                return Err(unexpected(
                    name,
                    "only lora_A / lora_B weights are expected",
                ));
            }
            continue;
        };
        let short = module.rsplit('.').next().unwrap_or(module);
        if !LORA_TARGETS.contains(&short) || layer_index(module).is_none() {
            return Err(unexpected(
                name,
                "LoRA is only supported on the projections of a decoder block",
            ));
        }
        let a = file.read(name)?;
        let b = file.read(&b_key(module))?;
        let r = config.rank_for(module);
        let shape_err =
            |name: String, t: &RawTensor, expected: String| FormatError::ShapeMismatch {
                file: weights.clone(),
                name,
                expected,
                found: t.shape.clone(),
            };
        if a.shape.len() != 2 || a.shape[0] != r {
            return Err(shape_err(a_key(module), &a, format!("[{r}, in]")));
        }
        if b.shape.len() != 2 || b.shape[1] != r {
            return Err(shape_err(b_key(module), &b, format!("[out, {r}]")));
        }
        let scale = config.scale_for(module);
        modules.insert(module.to_string(), RawModule { a, b, scale });
    }
    for name in file.entries().keys() {
        if let Some(module) = name.strip_suffix(".lora_B.weight") {
            if !modules.contains_key(module) {
                return Err(FormatError::MissingTensor {
                    file: weights.clone(),
                    name: a_key(module),
                });
            }
        }
    }
    if modules.is_empty() {
        return Err(FormatError::MissingTensor {
            file: weights,
            name: "*.lora_A.weight".into(),
        });
    }
    Ok(RawAdapter {
        kind: AdapterKind::Taper,
        config,
        modules,
        base: json.get("base_model").and_then(BaseIdentity::from_json),
        training: json.get("training").filter(|v| !v.is_null()).cloned(),
    })
}

/// Validates a taper `adapter_config.json` into a [`LoraConfig`].
pub fn read_config(json: &Value, path: &Path) -> Result<LoraConfig, FormatError> {
    let invalid = |key: &str, message: &str| FormatError::Invalid {
        path: path.to_path_buf(),
        key: key.into(),
        message: message.into(),
    };
    match json.get("format").and_then(Value::as_str) {
        Some(FORMAT) => {}
        Some(other) => {
            return Err(invalid(
                "format",
                &format!("unknown format \"{other}\" (taper reads \"{FORMAT}\")"),
            ))
        }
        None => {
            return Err(invalid(
                "format",
                &format!("missing (expected \"{FORMAT}\")"),
            ))
        }
    }
    match json.get("format_version").and_then(Value::as_u64) {
        Some(FORMAT_VERSION) => {}
        _ => {
            return Err(invalid(
                "format_version",
                &format!("only version {FORMAT_VERSION} is known"),
            ))
        }
    }
    let r = json
        .get("r")
        .and_then(Value::as_u64)
        .filter(|r| *r > 0)
        .ok_or_else(|| invalid("r", "must be a positive integer"))? as usize;
    let alpha = json
        .get("alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| invalid("alpha", "must be a number"))?;
    let mut c = LoraConfig::new(r, alpha);
    c.rslora = json.get("rslora").and_then(Value::as_bool).unwrap_or(false);
    c.dropout = json.get("dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    if let Some(t) = json.get("targets").and_then(Value::as_array) {
        let names: Vec<&str> = t.iter().filter_map(Value::as_str).collect();
        c.targets = Targets::parse(&names).map_err(|e| invalid("targets", &e.to_string()))?;
    }
    c.layers = match json.get("layers") {
        None | Some(Value::Null) => LayerSelection::All,
        Some(Value::Array(a)) => LayerSelection::List(
            a.iter()
                .map(|v| v.as_u64().map(|i| i as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("layers", "must be block indices"))?,
        ),
        Some(_) => return Err(invalid("layers", "must be null or a list")),
    };
    let pairs = |key: &str| -> Result<Vec<(String, Value)>, FormatError> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|p| match p.as_array().map(Vec::as_slice) {
                    Some([Value::String(k), v]) => Ok((k.clone(), v.clone())),
                    _ => Err(invalid(key, "entries must be [pattern, value] pairs")),
                })
                .collect(),
            Some(_) => Err(invalid(key, "must be a list of [pattern, value] pairs")),
        }
    };
    for (k, v) in pairs("rank_pattern")? {
        let r = v
            .as_u64()
            .filter(|r| *r > 0)
            .ok_or_else(|| invalid("rank_pattern", "ranks must be positive integers"))?;
        c.rank_pattern.push((k, r as usize));
    }
    for (k, v) in pairs("alpha_pattern")? {
        let a = v
            .as_f64()
            .ok_or_else(|| invalid("alpha_pattern", "alphas must be numbers"))?;
        c.alpha_pattern.push((k, a));
    }
    c.validate().map_err(|e| invalid("lora", &e.to_string()))?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::adapter::{AdapterFormat, AdapterModule};
    use candle_core::{DType, Device, Tensor};

    fn sample() -> RawAdapter {
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
        let adapter = Adapter {
            format: AdapterFormat::Native,
            config,
            modules,
        };
        let base = BaseIdentity {
            config_hash: "c".into(),
            weights_hash: "w".into(),
        };
        let training = json!({"seed": 1, "lr": 0.1});
        RawAdapter::from_adapter(&adapter, Some(base), Some(training)).unwrap()
    }

    #[test]
    fn round_trips_and_bytes_are_deterministic() {
        let adapter = sample();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write(&adapter, d1.path()).unwrap();
        write(&adapter, &d2.path().join("new")).unwrap();
        for f in [WEIGHTS, ADAPTER_CONFIG] {
            assert_eq!(
                std::fs::read(d1.path().join(f)).unwrap(),
                std::fs::read(d2.path().join("new").join(f)).unwrap()
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
        let back = read(d1.path()).unwrap();
        assert_eq!(back.base, adapter.base);
        assert_eq!(back.training, adapter.training);
        assert_eq!(back.config.r, 2);
        assert_eq!(back.config.alpha, 4.0);
        assert_eq!(back.config.dropout, 0.1);
        assert_eq!(back.modules, adapter.modules);
        let f32s = read_adapter(d1.path()).unwrap();
        assert_eq!(f32s.format, AdapterFormat::Native);
        let b = &f32s.modules["model.layers.1.self_attn.v_proj"].b;
        assert_eq!(b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [1.0; 8]);
    }

    #[test]
    fn wrong_format_and_shapes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(&sample(), dir.path()).unwrap();
        let path = dir.path().join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"r\": 2", "\"r\": 3")).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("[3, in]"), "{err}");
        std::fs::write(&path, text.replace(FORMAT, "taper.adapter.v1")).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("taper.adapter.v1"), "{err}");
    }
}
