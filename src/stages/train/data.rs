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
//
// The tokenize stage has its own reader (`stages::tokenize::read`); this one reads only
// the two columns training needs, and the two are to be merged into one.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::UInt32Type;
use candle_core::{Device, Tensor};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::rng::Rng;

/// One training row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Row {
    /// Targets that count toward the loss (the first token is never one).
    pub fn targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// The rows of one split, with how many were dropped.
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub rows: Vec<Row>,
    pub dropped: usize,
}

/// The `part-*.parquet` files of `dir`, sorted by name.
pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("{}: cannot read: {e}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("part-") && name.ends_with(".parquet") {
            paths.push(entry.path());
        }
    }
    paths.sort();
    Ok(paths)
}

/// Every usable row of the shards in `dir`, in file order. Ids must be below `vocab`.
pub fn read_split(dir: &Path, vocab: usize) -> Result<Split, String> {
    let paths = shard_paths(dir)?;
    if paths.is_empty() {
        return Err(format!("{}: no part-*.parquet token shards", dir.display()));
    }
    let mut split = Split::default();
    for path in paths {
        read_shard(&path, vocab, &mut split)?;
    }
    Ok(split)
}

fn read_shard(path: &Path, vocab: usize, out: &mut Split) -> Result<(), String> {
    let err = |m: String| format!("{}: {m}", path.display());
    let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(e.to_string()))?;
    let schema = builder.parquet_schema();
    let wanted: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| {
            let p = schema.column(i).path().parts()[0].clone();
            p == "input_ids" || p == "loss_mask"
        })
        .collect();
    let mask = ProjectionMask::leaves(schema, wanted);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut file_row = 0usize;
    for batch in reader {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| err(format!("no column \"{name}\"")))
        };
        let ids = column("input_ids")?
            .as_list_opt::<i32>()
            .ok_or_else(|| err("input_ids is not a list".into()))?;
        let mask = column("loss_mask")?
            .as_list_opt::<i32>()
            .ok_or_else(|| err("loss_mask is not a list".into()))?;
        let id_values = ids
            .values()
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(|| err("input_ids items are not u32".into()))?;
        let mask_values = mask
            .values()
            .as_boolean_opt()
            .ok_or_else(|| err("loss_mask items are not bool".into()))?;
        let (io, mo) = (ids.value_offsets(), mask.value_offsets());
        for i in 0..batch.num_rows() {
            let (a, b) = (io[i] as usize, io[i + 1] as usize);
            let (c, d) = (mo[i] as usize, mo[i + 1] as usize);
            if b - a != d - c {
                return Err(err(format!(
                    "row {file_row}: input_ids and loss_mask differ in length"
                )));
            }
            let input_ids = id_values.values()[a..b].to_vec();
            if let Some(bad) = input_ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(err(format!(
                    "row {file_row}: token id {bad} is outside the model's vocabulary \
                     (size {vocab}); were the shards made with this model's tokenizer?"
                )));
            }
            let row = Row {
                input_ids,
                loss_mask: (c..d)
                    .map(|j| mask_values.is_valid(j) && mask_values.value(j))
                    .collect(),
            };
            if row.targets() == 0 {
                out.dropped += 1;
            } else {
                out.rows.push(row);
            }
            file_row += 1;
        }
    }
    Ok(())
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
