//! Entry points the CLI calls: read an `input_ids.json`, compute logits of a model
//! (optionally with an adapter applied unmerged) and write them as safetensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::adapt::attach_adapter;
use super::error::{CandleContext, ModelError};
use super::load::load_model;
use crate::formats;

/// Reads `{"input_ids": [[...], ...]}` (other keys are ignored).
pub fn read_input_ids(path: &Path) -> Result<Vec<Vec<u32>>, ModelError> {
    #[derive(serde::Deserialize)]
    struct File {
        input_ids: Vec<Vec<u32>>,
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file: File = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(file.input_ids)
}

/// Checks a batch of ids (non-empty, rectangular, inside the vocabulary) and makes the
/// `[batch, seq]` u32 tensor.
pub fn ids_tensor(
    ids: &[Vec<u32>],
    vocab_size: usize,
    device: &Device,
) -> Result<Tensor, ModelError> {
    let invalid = |message: String| ModelError::InvalidInput {
        what: "input_ids".into(),
        message,
    };
    let seq = ids.first().map(Vec::len).unwrap_or(0);
    if seq == 0 {
        return Err(invalid("the batch is empty".into()));
    }
    for (row, r) in ids.iter().enumerate() {
        if r.len() != seq {
            return Err(invalid(format!(
                "row {row} has {} ids, row 0 has {seq}; rows must be the same length",
                r.len()
            )));
        }
        if let Some((pos, id)) = r
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= vocab_size)
        {
            return Err(invalid(format!(
                "row {row} position {pos}: id {id} is outside the vocabulary (size {vocab_size})"
            )));
        }
    }
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (ids.len(), seq), device).ctx(|| "building the input ids tensor")
}

/// Logits `[batch, seq, vocab]` as f32 for `input_ids` through the model in `model_dir`,
/// with the adapter in `adapter_dir` (taper, PEFT or mlx-lm, detected) applied unmerged.
/// The model runs in `dtype` (f32 or bf16) on `device`.
pub fn forward_logits(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    input_ids: Vec<Vec<u32>>,
    device: &Device,
    dtype: DType,
) -> Result<Tensor, ModelError> {
    let mut model = load_model(model_dir, dtype, device)?;
    model
        .store_for_inference()
        .ctx(|| format!("{}: setting up for inference", model_dir.display()))?;
    if let Some(dir) = adapter_dir {
        let adapter = formats::read_adapter(dir)?;
        attach_adapter(&mut model, &adapter, None)?;
    }
    let ids = ids_tensor(&input_ids, model.config().vocab_size, device)?;
    model
        .forward(&ids, None, false)
        .and_then(|l| l.to_dtype(DType::F32))
        .ctx(|| format!("{}: forward pass", model_dir.display()))
}

/// Writes `logits` as a safetensors file with one tensor named `logits`.
pub fn write_logits(path: &Path, logits: &Tensor) -> Result<(), ModelError> {
    let tensors = HashMap::from([("logits".to_string(), logits.clone())]);
    candle_core::safetensors::save(&tensors, path)
        .ctx(|| format!("{}: writing logits", path.display()))
}
