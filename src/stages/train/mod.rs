//! `kind: train` — LoRA fine-tuning that resumes bit-identically from its checkpoints.
//!
//! [`config`] (the `with:` block), [`data`] (token shards, seeded order, batches),
//! [`step`] (accumulated loss, clipping, update), [`optimizer`] (AdamW), [`schedule`]
//! (learning rate), [`rng`] (the saved RNG), [`checkpoint`] (atomic checkpoints in the
//! staging area), and the run itself in `loop.rs`.

pub mod checkpoint;
pub mod config;
pub mod data;
mod r#loop;
pub mod optimizer;
pub mod rng;
pub mod schedule;
pub mod step;

pub use config::TrainConfig;
pub use r#loop::run;

/// Bumped when the way a train stage runs changes what it produces.
pub const VERSION: u32 = 2;
