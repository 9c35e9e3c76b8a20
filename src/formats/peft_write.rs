//! Writing PEFT LoRA adapters: `adapter_config.json` (sorted keys) and
//! `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` `[r, in]`
//! and `...lora_B.weight` `[out, r]`, bytes as read (no recomputation).
//!
//! Which modules get an adapter is written as `target_modules` (short names) plus
//! `layers_to_transform` when the modules are every target in every listed block, and
//! otherwise as a regex string that matches exactly the adapted modules (PEFT full-matches
//! a string `target_modules`). Ranks and multipliers come from [`faithful_config`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Map, Value};

use super::adapter::ADAPTER_CONFIG;
use super::error::FormatError;
use super::peft::{key, WEIGHTS};
use super::raw_adapter::{faithful_config, RawAdapter};
use super::safetensors_in::RawTensor;
use super::safetensors_out::{write_file, write_json};
use crate::model::lora_config::{layer_index, LayerSelection};

/// Writes `adapter` as a PEFT adapter into the existing directory `dir`.
pub fn write(adapter: &RawAdapter, dir: &Path) -> Result<(), FormatError> {
    let config = faithful_config(adapter, "peft", true)?;
    let shorts: BTreeSet<&str> = adapter
        .modules
        .keys()
        .map(|m| m.rsplit('.').next().unwrap_or(m))
        .collect();
    let layers = adapter.layers();
    let full_product = adapter.modules.len() == shorts.len() * layers.len()
        && adapter.modules.keys().all(|m| layer_index(m).is_some());
    let (targets, layers_to_transform) = if full_product {
        let layers = match config.layers {
            LayerSelection::All => Value::Null,
            _ => json!(layers),
        };
        (json!(shorts.iter().collect::<Vec<_>>()), layers)
    } else {
        let names: Vec<String> = adapter.modules.keys().map(|m| regex::escape(m)).collect();
        (json!(format!("^(?:{})$", names.join("|"))), Value::Null)
    };
    let pattern = |p: Vec<(String, Value)>| -> Value {
        Value::Object(p.into_iter().collect::<Map<String, Value>>())
    };
    let value = json!({
        "alpha_pattern": pattern(config.alpha_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        "base_model_name_or_path": null,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": layers_to_transform,
        "lora_alpha": config.alpha,
        "lora_dropout": super::safetensors_out::short_f64(config.dropout),
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": pattern(config.rank_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": config.rslora,
    });
    write_json(&dir.join(ADAPTER_CONFIG), &value)?;
    let mut tensors: BTreeMap<String, RawTensor> = BTreeMap::new();
    for (module, m) in &adapter.modules {
        tensors.insert(key(module, "A"), m.a.clone());
        tensors.insert(key(module, "B"), m.b.clone());
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_file(&dir.join(WEIGHTS), &tensors, Some(&meta))
}
