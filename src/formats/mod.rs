//! Adapter and checkpoint formats: PEFT, mlx-lm and taper adapters read into one
//! in-memory [`Adapter`] and written from stored bytes ([`raw_adapter`]), conversions
//! between them and GGUF import ([`convert`]), merging into a base ([`merge()`]), and
//! deterministic safetensors / JSON output.

pub mod adapter;
pub mod checkpoint;
pub mod convert;
pub mod error;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod merge;
pub mod mlx;
pub mod mlx_write;
pub mod native;
pub mod output;
pub mod peft;
pub mod peft_write;
pub mod raw_adapter;
pub mod safetensors_in;
pub mod safetensors_out;

pub use adapter::{detect_format, read_adapter, Adapter, AdapterFormat, AdapterModule};
pub use convert::{migrate, MigrateFormat, MigrateOptions, MigrateReport};
pub use error::FormatError;
pub use merge::{merge, merge_with_progress, MergeReport, Rounding, DEFAULT_SHARD_SIZE};
