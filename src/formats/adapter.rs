//! The in-memory adapter every format reads into (and, later, writes from): per module
//! `A` `[r, in]` and `B` `[out, r]` as f32 tensors in PEFT's orientation, the module's
//! multiplier `s`, and the LoRA settings. Module names are model paths such as
//! `model.layers.0.self_attn.q_proj`, with no format-specific prefix.
//!
//! Also here: telling formats apart from the files present in a directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::FormatError;
use super::{mlx, native, peft};
use crate::model::lora_config::LoraConfig;

/// Adapter layouts taper reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// Hugging Face PEFT: `adapter_config.json` + `adapter_model.safetensors`.
    Peft,
    /// mlx-lm: `adapter_config.json` + `adapters.safetensors`.
    Mlx,
    /// taper's own: `adapter_config.json` + `adapter.safetensors`.
    Native,
}

impl std::fmt::Display for AdapterFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Peft => "peft",
            Self::Mlx => "mlx",
            Self::Native => "taper",
        })
    }
}

/// The LoRA weights of one linear.
#[derive(Debug, Clone)]
pub struct AdapterModule {
    /// `[r, in]`, f32, on the CPU.
    pub a: Tensor,
    /// `[out, r]`, f32, on the CPU.
    pub b: Tensor,
    /// The multiplier applied to `B A x`.
    pub scale: f64,
}

impl AdapterModule {
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }
}

/// A LoRA adapter, independent of the format it came from.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The format it was read from.
    pub format: AdapterFormat,
    /// Rank, alpha, targets and layers as the adapter's config states them (targets are
    /// those actually present in the weights).
    pub config: LoraConfig,
    /// Module path -> weights, sorted by path.
    pub modules: BTreeMap<String, AdapterModule>,
}

impl Adapter {
    /// Number of trainable values (all A and B elements).
    pub fn parameter_count(&self) -> usize {
        self.modules
            .values()
            .map(|m| m.a.elem_count() + m.b.elem_count())
            .sum()
    }
}

/// The config file of every adapter format.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Which format the adapter in `dir` is, from the files present (and, when ambiguous,
/// the keys of `adapter_config.json`).
pub fn detect_format(dir: &Path) -> Result<AdapterFormat, FormatError> {
    let unknown = |message: &str| FormatError::UnknownFormat {
        dir: dir.to_path_buf(),
        message: message.to_string(),
    };
    if !dir.join(ADAPTER_CONFIG).is_file() {
        return Err(unknown("no adapter_config.json"));
    }
    if dir.join(native::WEIGHTS).is_file() {
        return Ok(AdapterFormat::Native);
    }
    let peft = dir.join(peft::WEIGHTS).is_file();
    let mlx = dir.join(mlx::WEIGHTS).is_file();
    match (peft, mlx) {
        (true, false) => Ok(AdapterFormat::Peft),
        (false, true) => Ok(AdapterFormat::Mlx),
        (true, true) => {
            let config = read_json(&dir.join(ADAPTER_CONFIG))?;
            if config.get("peft_type").is_some() {
                Ok(AdapterFormat::Peft)
            } else {
                Ok(AdapterFormat::Mlx)
            }
        }
        (false, false) if dir.join("adapter_model.bin").is_file() => {
            Err(FormatError::Unsupported {
                path: dir.join("adapter_model.bin"),
                key: "adapter_model.bin".into(),
                what: "a pickled PEFT adapter (save it with safe_serialization=True)".into(),
            })
        }
        (false, false) => Err(unknown(&format!(
            "no {}, {} or {} next to adapter_config.json",
            peft::WEIGHTS,
            mlx::WEIGHTS,
            native::WEIGHTS
        ))),
    }
}

/// Reads the adapter in `dir`, whatever its format.
pub fn read_adapter(dir: &Path) -> Result<Adapter, FormatError> {
    match detect_format(dir)? {
        AdapterFormat::Peft => peft::read(dir),
        AdapterFormat::Mlx => mlx::read(dir),
        AdapterFormat::Native => native::read_adapter(dir),
    }
}

/// The weight files of the adapter in `dir` (for listing tensors).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, FormatError> {
    Ok(match detect_format(dir)? {
        AdapterFormat::Peft => vec![dir.join(peft::WEIGHTS)],
        AdapterFormat::Mlx => vec![dir.join(mlx::WEIGHTS)],
        AdapterFormat::Native => vec![dir.join(native::WEIGHTS)],
    })
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, FormatError> {
    let text = std::fs::read_to_string(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| FormatError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Every tensor of a safetensors file, converted to f32 on the CPU.
pub(crate) fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, FormatError> {
    let fail = |message: String| FormatError::Safetensors {
        file: path.to_path_buf(),
        message,
    };
    if let Err(source) = std::fs::metadata(path) {
        return Err(FormatError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| fail(e.to_string()))?;
    tensors
        .into_iter()
        .map(|(name, t)| {
            if !t.dtype().is_float() {
                return Err(fail(format!(
                    "tensor `{name}` is {:?}, not a float",
                    t.dtype()
                )));
            }
            let t = t
                .to_dtype(DType::F32)
                .map_err(|e| fail(format!("`{name}`: {e}")))?;
            Ok((name, t))
        })
        .collect()
}
