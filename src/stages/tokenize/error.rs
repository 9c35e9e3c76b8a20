//! The typed errors of the tokenize stage: every one names the config key, file, line or
//! row it is about, so the user can go straight to the cause.

use std::fmt;
use std::path::PathBuf;

/// Where a record came from: the input file (as the user would write it, relative to the
/// workspace) and its 1-based line (text, JSONL) or row (Parquet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The input file, relative to the workspace.
    pub file: String,
    /// 1-based line (text, JSONL) or row (Parquet) number.
    pub number: u64,
    /// Whether `number` counts lines or Parquet rows.
    pub unit: LocationUnit,
}

/// What a [`Location`] number counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocationUnit {
    /// A line of a text or JSONL file (`file:17`).
    Line,
    /// A row of a Parquet file (`file: row 17`).
    Row,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.unit {
            LocationUnit::Line => write!(f, "{}:{}", self.file, self.number),
            LocationUnit::Row => write!(f, "{}: row {}", self.file, self.number),
        }
    }
}

/// Why one record could not become a training example.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordProblem {
    /// The bytes are not UTF-8; `byte` is the offset of the first bad byte in the record.
    #[error("invalid UTF-8 at byte {byte}")]
    InvalidUtf8 { byte: usize },
    /// The JSONL line is not valid JSON.
    #[error("invalid JSON at column {column}: {message}")]
    InvalidJson { column: usize, message: String },
    /// The JSONL line is valid JSON but not an object.
    #[error("expected a JSON object, found {found}")]
    NotAnObject { found: &'static str },
    /// The field named in `field:` is absent.
    #[error("missing field \"{field}\"")]
    MissingField { field: String },
    /// The field has the wrong type (`found` says what it was).
    #[error("field \"{field}\" must be {expected}, found {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: String,
    },
    /// A text field is empty or only whitespace.
    #[error("field \"{field}\" is empty")]
    Empty { field: String },
    /// A chat message has a role taper does not know.
    #[error("message {index}: unknown role \"{role}\" (expected system, user, assistant or tool)")]
    UnknownRole { index: usize, role: String },
    /// The tokenizer itself failed on the text.
    #[error("tokenizer failed: {message}")]
    Tokenizer { message: String },
}

/// Everything that can go wrong in the tokenize stage.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// A key of the stage's `with:` block has an invalid value; `key` is its path inside
    /// `with:` (e.g. `split.valid`).
    #[error("tokenize config `{key}`: {message}")]
    Config { key: String, message: String },
    /// The tokenizer file could not be read or parsed.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },
    /// `add_bos` / `add_eos` (or `bos_token` / `eos_token`) asked for a special token the
    /// tokenizer does not have.
    #[error("tokenizer {path}: {message}")]
    SpecialToken { path: String, message: String },
    /// `source.path` matched no file.
    #[error("tokenize config `source.path`: `{pattern}` matches no file")]
    NoInputFiles { pattern: String },
    /// An input file holds no record at all (and `on_bad_record` is `error`).
    #[error("{file}: file has no records")]
    EmptyFile { file: String },
    /// A record is malformed (and `on_bad_record` is `error`).
    #[error("{location}: {problem}")]
    BadRecord {
        location: Location,
        problem: RecordProblem,
    },
    /// Every record was skipped or the inputs held none: there is nothing to write.
    #[error("no usable records in the input ({skipped} skipped)")]
    NoRecords { skipped: u64 },
    /// Reading an input or writing an output failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A Parquet input could not be read, or a shard could not be written.
    #[error("{path}: parquet: {message}")]
    Parquet { path: PathBuf, message: String },
    /// The output folder already holds files; taper never mixes old and new shards.
    #[error("output folder {path} is not empty")]
    OutputNotEmpty { path: PathBuf },
    /// The `cancel` flag was raised; the output folder is incomplete.
    #[error("tokenize cancelled")]
    Cancelled,
    /// A worker thread panicked (a bug in taper, never the user's input).
    #[error("internal error: {0}")]
    Internal(String),
}

impl TokenizeError {
    /// A [`TokenizeError::Config`] for `key` (the path inside `with:`).
    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        TokenizeError::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    /// A [`TokenizeError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TokenizeError::Io {
            path: path.into(),
            source,
        }
    }
}
