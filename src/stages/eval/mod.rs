//! `kind: eval` — scores a model (base + adapter) on token shards, compares it with the
//! base alone, checks metric gates and records sample generations.
//!
//! Eval loss is the mean next-token cross-entropy over the targets the shards' loss masks
//! mark ([`data`] for the mask convention, [`mod@score`] for the batching); perplexity is its
//! exponential. Metrics go to the ledger (`eval/loss`, `eval/perplexity`, `eval/tokens`,
//! `eval/rows`, `eval/base_loss`, `eval/base_perplexity`, `eval/improvement`), the rest to
//! the JSON report ([`report`]). A failed gate ([`gates`]) fails the stage with
//! [`crate::stages::StageError::Gate`], so downstream stages do not run and `taper run`
//! exits with code 5.

pub mod config;
pub mod data;
pub mod gates;
pub mod report;
mod run;
pub mod score;

pub use config::{Bound, EvalConfig, GatesConfig, SamplesConfig};
pub use data::{read_rows, Row};
pub use gates::{GateResult, Metrics};
pub use report::{Report, Sample};
pub use run::run;
pub use score::{score, Score, ScoreError};

/// Bumped when the way an eval stage computes its outputs changes.
pub const VERSION: u32 = 2;
