//! taper: LoRA fine-tuning of language models from declarative pipeline files.
//!
//! Data flows one way: [`spec`] (YAML -> typed pipeline) -> [`plan`] (DAG + ledger -> what
//! runs and why) -> [`exec`] (runs the plan, emits events) -> [`stages`] (one module per
//! stage kind) -> [`model`] / [`formats`] (candle model code, adapter files) -> [`state`]
//! (the Parquet ledger). [`cli`] drives it all. See ARCHITECTURE.md for the map.

// Errors that point into a pipeline file carry the file, position, stage, key and the
// quoted line; they are built on the cold path only, so their size does not matter.
#![allow(clippy::result_large_err)]

pub mod cli;
pub mod exec;
pub mod export;
pub mod formats;
pub mod model;
pub mod plan;
pub mod report;
pub mod schedule;
pub mod spec;
pub mod stages;
pub mod state;
