//! The `tokenize` stage: text, JSONL or Parquet records in; packed, masked token rows out,
//! as Parquet shards plus a manifest.
//!
//! Output layout (`out_dir` is the stage's output folder):
//!
//! ```text
//! out_dir/manifest.json               tokenizer hash, config, inputs, counts, shard hashes
//! out_dir/train/part-00000.parquet    input_ids: list<u32>, loss_mask: list<bool>, example_id: u64
//! out_dir/valid/part-00000.parquet
//! ```
//!
//! Where each decision is documented: loss mask semantics in [`encode`], packing and the
//! cutting of long examples in [`pack`], the split rule in [`split`], BOS/EOS in
//! [`tokenizer`], chat templates in [`config::ChatTemplate`] and [`template`], columns in
//! [`shard`].

mod chunk;
pub mod config;
pub mod encode;
pub mod error;
mod field;
pub mod manifest;
pub mod pack;
mod parquet_source;
mod read;
mod record;
mod run;
pub mod shard;
mod source;
pub mod split;
pub mod stage;
mod summary;
pub mod template;
pub mod tokenizer;
mod words;

pub use config::{
    ChatTemplate, FieldSpec, OnBadRecord, SourceConfig, SourceFormat, SplitConfig, TextSplit,
    TokenizeConfig,
};
pub use error::{Location, LocationUnit, RecordProblem, TokenizeError};
pub use manifest::{Manifest, MANIFEST_FORMAT};
pub use read::{read_shard, read_shard_rows, read_shards, shard_paths, Row};
pub use run::run;
pub use shard::ShardInfo;
pub use source::{resolve_inputs, InputFile};
pub use summary::{Progress, SplitCounts, Summary, SKIP_SAMPLES};
pub use tokenizer::SpecialToken;
