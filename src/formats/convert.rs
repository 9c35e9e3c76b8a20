//! `taper migrate`: moving adapters between taper, PEFT and mlx-lm layouts, and importing
//! GGUF checkpoints as Hugging Face model directories.
//!
//! Adapter conversions move bytes (rename, transpose), never recompute, so PEFT -> mlx ->
//! PEFT gives the same tensors bit for bit. With a base model, the adapter is first
//! checked against it: every target exists with the right shape, and the base identity a
//! taper adapter records matches.

use std::path::{Path, PathBuf};

use super::checkpoint::Checkpoint;
use super::error::FormatError;
use super::output::{check_identity, OutputDir};
use super::raw_adapter::{AdapterKind, RawAdapter};
use super::{gguf, mlx_write, native, peft_write};

/// The formats `migrate` reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateFormat {
    /// taper's native adapter.
    Taper,
    /// PEFT adapter.
    Peft,
    /// mlx-lm adapter.
    Mlx,
    /// A GGUF checkpoint (input only).
    Gguf,
    /// A Hugging Face model directory (output of a GGUF import).
    Hf,
}

impl std::str::FromStr for MigrateFormat {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "taper" => Self::Taper,
            "peft" => Self::Peft,
            "mlx" => Self::Mlx,
            "gguf" => Self::Gguf,
            "hf" => Self::Hf,
            other => {
                return Err(FormatError::Usage(format!(
                    "unknown format `{other}` (expected taper, peft, mlx, gguf or hf)"
                )))
            }
        })
    }
}

impl MigrateFormat {
    fn adapter_kind(self) -> Option<AdapterKind> {
        match self {
            Self::Taper => Some(AdapterKind::Taper),
            Self::Peft => Some(AdapterKind::Peft),
            Self::Mlx => Some(AdapterKind::Mlx),
            Self::Gguf | Self::Hf => None,
        }
    }
}

/// Options of a migration beyond the two formats and paths.
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    /// The base model directory, to check the adapter against it (and, for mlx output,
    /// to count its blocks; for taper output, to record its identity).
    pub base: Option<PathBuf>,
    /// GGUF import: the dtype of the written weights (`f32`, `f16`, `bf16`); default f32.
    pub dtype: Option<String>,
}

/// What a migration wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Adapter modules converted, or tensors imported.
    pub tensors: usize,
}

/// Converts `input` (a directory, or a `.gguf` file) from `from` to `to`, writing the
/// directory `out_dir` (which must not exist or be empty; nothing is left on failure).
pub fn migrate(
    from: MigrateFormat,
    to: MigrateFormat,
    input: &Path,
    out_dir: &Path,
    options: &MigrateOptions,
) -> Result<MigrateReport, FormatError> {
    if from == MigrateFormat::Gguf {
        if to != MigrateFormat::Hf {
            return Err(FormatError::Usage(
                "a GGUF file can only be migrated to `hf` (a model directory)".into(),
            ));
        }
        let dtype = options.dtype.as_deref().unwrap_or("f32");
        let out = OutputDir::create(out_dir)?;
        let tensors = gguf::import(input, out.path(), dtype)?;
        out.publish()?;
        return Ok(MigrateReport { tensors });
    }
    let (Some(from_kind), Some(to_kind)) = (from.adapter_kind(), to.adapter_kind()) else {
        return Err(FormatError::Usage(format!(
            "cannot migrate {from:?} to {to:?}: adapters go between taper, peft and mlx; \
             GGUF files go to hf"
        )));
    };
    if let Some(dtype) = &options.dtype {
        return Err(FormatError::Usage(format!(
            "dtype `{dtype}` applies to a GGUF import only: adapters are converted in their \
             stored dtype"
        )));
    }
    let found = AdapterKind::detect(input)?;
    if found != from_kind {
        return Err(FormatError::UnknownFormat {
            dir: input.to_path_buf(),
            message: format!(
                "asked to read a {} adapter, found a {} adapter",
                from_kind.name(),
                found.name()
            ),
        });
    }
    let mut adapter = RawAdapter::read(input, from_kind)?;
    let base = match &options.base {
        Some(dir) => Some(Checkpoint::open(dir)?),
        None => None,
    };
    if let Some(base) = &base {
        base.check_modules(
            adapter
                .modules
                .iter()
                .map(|(n, m)| (n, m.out_dim(), m.in_dim())),
        )?;
        check_identity(&adapter, base)?;
    }
    let out = OutputDir::create(out_dir)?;
    match to_kind {
        AdapterKind::Peft => peft_write::write(&adapter, out.path())?,
        AdapterKind::Mlx => mlx_write::write(
            &adapter,
            out.path(),
            base.as_ref().and_then(|b| b.num_layers()),
        )?,
        AdapterKind::Taper => {
            if adapter.base.is_none() {
                if let Some(base) = &base {
                    adapter.base = Some(base.identity()?);
                }
            }
            native::write(&adapter, out.path())?
        }
    }
    out.publish()?;
    Ok(MigrateReport {
        tensors: adapter.modules.len(),
    })
}
