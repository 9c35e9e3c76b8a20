//! Training rows from the tokenize stage's shards, the seeded order they are visited in,
//! and padded micro-batches.
//!
//! Shards are `<split>/part-*.parquet` with `input_ids: list<u32>` and
//! `loss_mask: list<bool>` (true = `input_ids[i]`, as the target predicted from
//! `input_ids[..i]`, counts toward the loss — the labels convention of transformers and
//! of [`crate::model::causal_lm_loss`]). Rows that have no counted target (fewer than two
//! tokens, or nothing marked after the first) teach nothing and are dropped at load.
//!
//! The order is a permutation of the rows drawn per epoch from the seed; the [`Cursor`]
//! (epoch, position, order) is all a checkpoint needs to continue the same stream.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::rng::Rng;
use crate::stages::tokenize;

/// One training row (the tokenize stage's reader defines it).
pub use crate::stages::tokenize::Row;

/// The rows of one split, with how many were dropped.
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub rows: Vec<Row>,
    pub dropped: usize,
}

/// Every usable row of the shards in `dir`, in file order. Ids must be below `vocab`.
pub fn read_split(dir: &Path, vocab: usize) -> Result<Split, String> {
    let paths = tokenize::shard_paths(dir).map_err(|e| e.to_string())?;
    if paths.is_empty() {
        return Err(format!("{}: no part-*.parquet token shards", dir.display()));
    }
    let mut split = Split::default();
    for path in paths {
        let rows = tokenize::read_shard_rows(&path).map_err(|e| e.to_string())?;
        for (file_row, row) in rows.into_iter().enumerate() {
            if let Some(bad) = row.input_ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(format!(
                    "{}: row {}: token id {bad} is outside the model's vocabulary \
                     (size {vocab}); were the shards made with this model's tokenizer?",
                    path.display(),
                    file_row + 1
                ));
            }
            if row.targets() == 0 {
                split.dropped += 1;
            } else {
                split.rows.push(row);
            }
        }
    }
    Ok(split)
}

/// Where the training stream is: the epoch, the position inside its order, and the order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u64,
    pub position: u64,
    pub order: Vec<u32>,
}

/// The shuffle stream tag of [`Rng::new`].
const SHUFFLE_STREAM: u64 = 1;

impl Cursor {
    /// The start of epoch 0 over `rows` rows.
    pub fn start(rows: usize, seed: u64) -> Self {
        Self {
            epoch: 0,
            position: 0,
            order: epoch_order(rows, seed, 0),
        }
    }

    /// The next row index, moving to a freshly shuffled epoch at the end of one.
    pub fn next(&mut self, seed: u64) -> usize {
        if self.position as usize >= self.order.len() {
            self.epoch += 1;
            self.position = 0;
            self.order = epoch_order(self.order.len(), seed, self.epoch);
        }
        let row = self.order[self.position as usize] as usize;
        self.position += 1;
        row
    }
}

/// The visiting order of epoch `epoch`: a permutation drawn from `(seed, epoch)`.
pub fn epoch_order(rows: usize, seed: u64, epoch: u64) -> Vec<u32> {
    Rng::new(
        seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        SHUFFLE_STREAM,
    )
    .permutation(rows)
}

/// A padded micro-batch.
pub struct Batch {
    /// `[rows, len]` u32 ids, right-padded with 0.
    pub ids: Tensor,
    /// `[rows, len]` u8 loss mask, 0 on padding.
    pub mask: Tensor,
    /// Counted targets.
    pub targets: usize,
    /// Real (non-padding) tokens.
    pub tokens: usize,
}

/// Pads `rows` to the longest of them. Padding needs no attention mask: attention is
/// causal and padding only follows real tokens, so no real position sees it, and the
/// loss mask drops its targets.
pub fn make_batch(rows: &[&Row], device: &Device) -> candle_core::Result<Batch> {
    let len = rows
        .iter()
        .map(|r| r.input_ids.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask = Vec::with_capacity(rows.len() * len);
    for r in rows {
        ids.extend_from_slice(&r.input_ids);
        ids.extend(std::iter::repeat_n(0u32, len - r.input_ids.len()));
        mask.extend(r.loss_mask.iter().map(|&m| m as u8));
        mask.extend(std::iter::repeat_n(0u8, len - r.loss_mask.len()));
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (rows.len(), len), device)?,
        mask: Tensor::from_vec(mask, (rows.len(), len), device)?,
        targets: rows.iter().map(|r| r.targets()).sum(),
        tokens: rows.iter().map(|r| r.input_ids.len()).sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_walks_epochs_in_seeded_orders() {
        let mut c = Cursor::start(5, 7);
        let first: Vec<usize> = (0..5).map(|_| c.next(7)).collect();
        let second: Vec<usize> = (0..5).map(|_| c.next(7)).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        assert_ne!(first, second, "each epoch reshuffles");
        assert_eq!((c.epoch, c.position), (1, 5));
        let mut resumed = c.clone();
        assert_eq!(c.next(7), resumed.next(7));
    }

    #[test]
    fn batches_pad_with_masked_zeros() {
        let a = Row {
            input_ids: vec![5, 6, 7],
            loss_mask: vec![false, true, true],
        };
        let b = Row {
            input_ids: vec![8, 9],
            loss_mask: vec![true, true],
        };
        let batch = make_batch(&[&a, &b], &Device::Cpu).unwrap();
        assert_eq!(
            batch.ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![8, 9, 0]]
        );
        assert_eq!(
            batch.mask.to_vec2::<u8>().unwrap(),
            vec![vec![0, 1, 1], vec![1, 1, 0]]
        );
        assert_eq!((batch.targets, batch.tokens), (3, 5));
    }
}
