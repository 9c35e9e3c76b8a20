//! Writing mlx-lm LoRA adapters: `adapter_config.json` (`fine_tune_type: lora`,
//! `num_layers` counted from the last block, `lora_parameters: {rank, scale, dropout,
//! keys}`) and `adapters.safetensors` with `<module>.lora_a` `[in, r]` and
//! `<module>.lora_b` `[r, out]`: PEFT's matrices transposed byte by byte.
//!
//! mlx-lm has one rank and one scale for all modules, applies the same `keys` to each of
//! the last `num_layers` blocks, and nothing else; an adapter outside that is refused,
//! naming the module that does not fit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::json;

use super::adapter::ADAPTER_CONFIG;
use super::error::FormatError;
use super::mlx::WEIGHTS;
use super::raw_adapter::RawAdapter;
use super::safetensors_in::RawTensor;
use super::safetensors_out::{write_file, write_json};
use crate::model::lora_config::{layer_index, LayerSelection};

/// Writes `adapter` as an mlx-lm adapter into the existing directory `dir`.
/// `base_layers` is the base model's block count, needed unless the adapter covers all
/// blocks by its own settings.
pub fn write(
    adapter: &RawAdapter,
    dir: &Path,
    base_layers: Option<usize>,
) -> Result<(), FormatError> {
    let refuse = |module: &str, message: String| FormatError::Unrepresentable {
        format: "mlx".into(),
        module: module.into(),
        message,
    };
    let (rank, scale) = adapter.uniform().map_err(|(m, why)| {
        refuse(
            &m,
            format!("{why}; mlx-lm has one rank and one scale for every module"),
        )
    })?;
    // Keys: module path relative to its block, the same set in every adapted block.
    let mut keys: BTreeSet<String> = BTreeSet::new();
    for module in adapter.modules.keys() {
        let Some(i) = layer_index(module) else {
            return Err(refuse(module, "mlx-lm adapts only decoder blocks".into()));
        };
        let prefix = format!("layers.{i}.");
        let rel = module
            .split_once(&prefix)
            .map(|(_, rest)| rest.to_string())
            .ok_or_else(|| refuse(module, "not inside a `layers.N` block".into()))?;
        keys.insert(rel);
    }
    let layers = adapter.layers();
    for &i in &layers {
        for k in &keys {
            let name = format!("model.layers.{i}.{k}");
            if !adapter.modules.contains_key(&name) {
                return Err(refuse(
                    &name,
                    format!(
                        "has no adapter while other blocks' `{k}` do; mlx-lm applies the \
                         same keys to every adapted block"
                    ),
                ));
            }
        }
    }
    let count = layers.len();
    let num_layers: i64 = match (base_layers, &adapter.config.layers) {
        (Some(n), _) => {
            let last: Vec<usize> = (n.saturating_sub(count)..n).collect();
            if layers != last {
                let first = layers.first().copied().unwrap_or(0);
                return Err(refuse(
                    &format!("model.layers.{first}"),
                    format!(
                        "mlx-lm adapts the last `num_layers` blocks; this adapter covers \
                         blocks {layers:?} of {n}"
                    ),
                ));
            }
            if count == n {
                -1
            } else {
                count as i64
            }
        }
        (None, LayerSelection::All) => -1,
        (None, _) => {
            return Err(refuse(
                "num_layers",
                "the adapter does not cover every block by its settings; give the base model \
                 so that taper can check the blocks are the last ones"
                    .into(),
            ))
        }
    };
    let value = json!({
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": super::safetensors_out::short_f64(adapter.config.dropout),
            "keys": keys.iter().collect::<Vec<_>>(),
        },
    });
    write_json(&dir.join(ADAPTER_CONFIG), &value)?;
    let mut tensors: BTreeMap<String, RawTensor> = BTreeMap::new();
    for (module, m) in &adapter.modules {
        let t = |t: &RawTensor, which: &str| {
            t.transpose2d()
                .ok_or_else(|| refuse(module, format!("lora_{which} is not a matrix")))
        };
        tensors.insert(format!("{module}.lora_a"), t(&m.a, "a")?);
        tensors.insert(format!("{module}.lora_b"), t(&m.b, "b")?);
    }
    let meta = BTreeMap::from([("format".to_string(), "mlx".to_string())]);
    write_file(&dir.join(WEIGHTS), &tensors, Some(&meta))
}
