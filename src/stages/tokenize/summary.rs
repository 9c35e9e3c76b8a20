//! What the stage reports: [`Progress`] while it runs (the caller renders it; this stage
//! prints nothing) and a [`Summary`] of counts at the end, for the run ledger.

use serde::Serialize;

/// Progress so far; sent after every chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Input bytes consumed (for Parquet, estimated from the rows read).
    pub bytes_read: u64,
    /// Size of all input files together, as found at the start.
    pub bytes_total: u64,
    /// Records seen, good and bad.
    pub records: u64,
    /// Records skipped as bad (`on_bad_record: skip`).
    pub skipped: u64,
    /// Tokens produced (both splits).
    pub tokens: u64,
}

/// Counts for one split.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SplitCounts {
    /// Examples (good records) assigned to this split.
    pub examples: u64,
    /// Rows written.
    pub rows: u64,
    /// Tokens written.
    pub tokens: u64,
    /// Tokens whose loss mask is true.
    pub loss_tokens: u64,
    /// Examples longer than `seq_len`, cut across rows.
    pub cut_examples: u64,
}

/// How many of each reason-for-skipping are kept as samples.
pub const SKIP_SAMPLES: usize = 10;

/// The outcome of a successful run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Records seen, good and bad.
    pub records: u64,
    /// Bad records skipped (`on_bad_record: skip`); always 0 in `error` mode.
    pub skipped: u64,
    /// The first [`SKIP_SAMPLES`] skipped records, as `file:line: problem`.
    pub skipped_samples: Vec<String>,
    /// Input files that held no record (only in `skip` mode; an error otherwise).
    pub empty_files: Vec<String>,
    pub train: SplitCounts,
    pub valid: SplitCounts,
}
