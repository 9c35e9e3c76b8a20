//! The token shards an eval scores, read with the tokenize stage's reader: every
//! `part-*.parquet` of a split folder, in name order.
//!
//! `loss_mask[i]` is about `input_ids[i]` as a target, the tokenize stage's convention:
//! when true, predicting `input_ids[i]` from `input_ids[..i]` counts. Position 0 is never
//! a target.

use std::path::Path;

pub use crate::stages::tokenize::Row;

/// Targets of `row` that count: marked positions after the first.
pub fn target_count(row: &Row) -> usize {
    row.loss_mask.iter().skip(1).filter(|&&m| m).count()
}

/// Every row of every shard in `dir`, in order.
pub fn read_rows(dir: &Path) -> Result<Vec<Row>, String> {
    crate::stages::tokenize::read_shards(dir).map_err(|e| e.to_string())
}
