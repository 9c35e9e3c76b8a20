//! A model directory on disk: `config.json`, the weights (`model.safetensors`, or shards
//! listed by `model.safetensors.index.json`, also when it lists one shard) and usually
//! `tokenizer.json`. Loading builds the network in the caller's compute dtype.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::{config_path, ModelConfig};
use super::error::ModelError;
use super::llama::Llama;
use super::weights::{WeightFiles, Weights};

/// Single-file weights.
pub const SINGLE_WEIGHTS: &str = "model.safetensors";
/// Index of sharded weights.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
/// The tokenizer file.
pub const TOKENIZER: &str = "tokenizer.json";

/// An opened model directory: parsed config and mapped weights.
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weights: WeightFiles,
    /// `tokenizer.json` when present.
    pub tokenizer: Option<PathBuf>,
}

impl ModelDir {
    /// Reads `config.json` and maps the weights (the index wins over a single file).
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let config = ModelConfig::from_file(&config_path(dir))?;
        let index = dir.join(WEIGHTS_INDEX);
        let single = dir.join(SINGLE_WEIGHTS);
        let weights = if index.is_file() {
            WeightFiles::open_index(&index)?
        } else if single.is_file() {
            WeightFiles::open(&[single])?
        } else {
            return Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        let tokenizer = Some(dir.join(TOKENIZER)).filter(|p| p.is_file());
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer,
        })
    }

    /// Builds the model with weights converted to `dtype` on `device`.
    pub fn load(&self, dtype: DType, device: &Device) -> Result<Llama, ModelError> {
        check_compute_dtype(dtype)?;
        Llama::load(&Weights::new(&self.weights, dtype, device), &self.config)
    }
}

/// Opens `dir` and builds its model in `dtype` on `device`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Llama, ModelError> {
    ModelDir::open(dir)?.load(dtype, device)
}

/// Parses a compute dtype name as a user writes it: `f32`/`float32`, `bf16`/`bfloat16`
/// (also `f16` and `f64`).
pub fn parse_compute_dtype(name: &str) -> Result<DType, ModelError> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        "f64" | "float64" => Ok(DType::F64),
        other => Err(ModelError::InvalidInput {
            what: "dtype".into(),
            message: format!("unknown dtype `{other}` (expected f32 or bf16)"),
        }),
    }
}

/// Compute dtypes the model code supports: f32 and bf16 (f16 and f64 for experiments
/// and gradient checks).
pub fn check_compute_dtype(dtype: DType) -> Result<(), ModelError> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 | DType::F64 => Ok(()),
        other => Err(ModelError::InvalidInput {
            what: "compute dtype".into(),
            message: format!("{other:?} is not a float type taper computes in (use f32 or bf16)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_parse_and_unknown_ones_are_named() {
        assert_eq!(parse_compute_dtype("BF16").unwrap(), DType::BF16);
        assert_eq!(parse_compute_dtype("float32").unwrap(), DType::F32);
        let err = parse_compute_dtype("int8").unwrap_err().to_string();
        assert!(err.contains("int8"), "{err}");
    }
}
