//! Errors of the model layer: loading `config.json` and safetensors, building the
//! network, attaching adapters and running it. Every variant names the file, tensor or
//! key it is about, so a user can find what to fix.

use std::path::PathBuf;

use thiserror::Error;

use crate::formats::FormatError;

/// Anything that can go wrong between a model directory on disk and logits in memory.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A JSON file is not valid JSON or lacks a required field.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    /// `config.json` parsed but its values do not describe a usable model.
    #[error("{path}: {message}")]
    InvalidConfig { path: PathBuf, message: String },

    /// A real feature of the checkpoint that taper does not implement.
    #[error("{path}: {what} is not supported yet")]
    Unsupported { path: PathBuf, what: String },

    /// The directory has no weights taper knows how to find.
    #[error("{dir}: no model weights found (expected model.safetensors or model.safetensors.index.json)")]
    NoWeights { dir: PathBuf },

    /// A safetensors file could not be opened or its header is malformed.
    #[error("{file}: cannot read safetensors: {message}")]
    Safetensors { file: PathBuf, message: String },

    /// A tensor the architecture needs is absent.
    #[error("tensor `{name}` not found in {file}")]
    MissingTensor { name: String, file: PathBuf },

    /// A tensor exists but does not have the shape the config implies.
    #[error("tensor `{name}` in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A tensor is stored in a dtype taper does not load as weights.
    #[error("tensor `{name}` in {file} is stored as {dtype}; weights must be f32, bf16 or f16")]
    UnsupportedDtype {
        name: String,
        file: PathBuf,
        dtype: String,
    },

    /// The requested accelerator was not compiled in.
    #[error("taper was built without the {feature} feature")]
    FeatureMissing { feature: &'static str },

    /// The requested device exists in this build but could not be opened.
    #[error("cannot open {device} device: {source}")]
    Device {
        device: &'static str,
        source: candle_core::Error,
    },

    /// The input token ids are unusable (empty, ragged, out of the vocabulary).
    #[error("{what}: {message}")]
    InvalidInput { what: String, message: String },

    /// An adapter does not fit the model it is applied to.
    #[error("adapter module `{module}`: {message}")]
    AdapterMismatch { module: String, message: String },

    /// An adapter file could not be read.
    #[error(transparent)]
    Format(#[from] FormatError),

    /// A tensor operation failed; `context` says which step.
    #[error("{context}: {source}")]
    Candle {
        context: String,
        source: candle_core::Error,
    },
}

impl ModelError {
    /// Wraps a candle error with the step it happened in.
    pub fn candle(context: impl Into<String>, source: candle_core::Error) -> Self {
        Self::Candle {
            context: context.into(),
            source,
        }
    }
}

/// Attaches a context string to candle results, turning them into [`ModelError`].
pub trait CandleContext<T> {
    /// Maps the error to [`ModelError::Candle`] with `context` computed lazily.
    fn ctx<C: Into<String>, F: FnOnce() -> C>(self, context: F) -> Result<T, ModelError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx<C: Into<String>, F: FnOnce() -> C>(self, context: F) -> Result<T, ModelError> {
        self.map_err(|e| ModelError::candle(context(), e))
    }
}
