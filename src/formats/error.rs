//! Errors reading adapter files. Each names the file and, where it applies, the JSON key
//! or tensor; features taper cannot represent are refused, never dropped silently.

use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong reading an adapter directory.
#[derive(Debug, Error)]
pub enum FormatError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    /// A setting taper cannot honour; `key` is the JSON key that asks for it.
    #[error("{path}: `{key}`: {what} is not supported")]
    Unsupported {
        path: PathBuf,
        key: String,
        what: String,
    },

    /// A value that does not make sense.
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },

    /// A tensor whose name does not fit the format's layout.
    #[error("{file}: unexpected tensor `{name}`: {message}")]
    UnexpectedTensor {
        file: PathBuf,
        name: String,
        message: String,
    },

    #[error("{file}: tensor `{name}` is missing")]
    MissingTensor { file: PathBuf, name: String },

    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected}")]
    ShapeMismatch {
        file: PathBuf,
        name: String,
        expected: String,
        found: Vec<usize>,
    },

    /// A safetensors file that cannot be parsed or converted.
    #[error("{file}: {message}")]
    Safetensors { file: PathBuf, message: String },

    /// Nothing in the directory looks like an adapter taper reads.
    #[error("{dir}: not an adapter taper can read ({message})")]
    UnknownFormat { dir: PathBuf, message: String },

    /// An adapter or checkpoint the target format cannot express faithfully.
    #[error("cannot write as {format}: `{module}`: {message}")]
    Unrepresentable {
        format: String,
        module: String,
        message: String,
    },

    /// An adapter that does not fit the base model it is converted or merged against.
    #[error("adapter does not fit the base model {base}: `{module}`: {message}")]
    Incompatible {
        base: PathBuf,
        module: String,
        message: String,
    },

    /// A GGUF file taper cannot import.
    #[error("{file}: {message}")]
    Gguf { file: PathBuf, message: String },

    /// Where the output should go is not usable.
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },

    /// A usage mistake (unknown format name, impossible option).
    #[error("{0}")]
    Usage(String),

    /// The caller asked the work to stop.
    #[error("stopped before finishing")]
    Cancelled,
}
