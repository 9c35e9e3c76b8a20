//! Reading the token shards an eval scores: every `part-*.parquet` of a split folder, in
//! name order, columns `input_ids: list<u32>` and `loss_mask: list<bool>` (other columns
//! are ignored).
//!
//! `loss_mask[i]` is about `input_ids[i]` as a target, the tokenize stage's convention:
//! when true, predicting `input_ids[i]` from `input_ids[..i]` counts. Position 0 is never
//! a target.
//!
//! This is a private copy of the tokenize stage's `read_shards` (on its own branch when
//! this was written); the two are to become one at merge.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::UInt32Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// One row of token ids and its loss mask (same length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Row {
    /// Targets that count: marked positions after the first.
    pub fn target_count(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// The shard files of `dir`, sorted by name. A missing folder is an error.
pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("{}: cannot read: {e}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: cannot read: {e}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("part-") && name.ends_with(".parquet") {
            paths.push(entry.path());
        }
    }
    paths.sort();
    Ok(paths)
}

/// Every row of every shard in `dir`, in order.
pub fn read_rows(dir: &Path) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for path in shard_paths(dir)? {
        read_shard(&path, &mut rows)?;
    }
    Ok(rows)
}

fn read_shard(path: &Path, rows: &mut Vec<Row>) -> Result<(), String> {
    let err = |message: String| format!("{}: {message}", path.display());
    let file = File::open(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| err(e.to_string()))?;
    let mut file_row = 0u64;
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
        if id_values.null_count() > 0 || mask_values.null_count() > 0 {
            return Err(err("null items in input_ids or loss_mask".into()));
        }
        let (id_offsets, mask_offsets) = (ids.value_offsets(), mask.value_offsets());
        for i in 0..batch.num_rows() {
            file_row += 1;
            let (a, b) = (id_offsets[i] as usize, id_offsets[i + 1] as usize);
            let (c, d) = (mask_offsets[i] as usize, mask_offsets[i + 1] as usize);
            if b - a != d - c {
                return Err(err(format!(
                    "row {file_row}: input_ids and loss_mask differ in length"
                )));
            }
            rows.push(Row {
                input_ids: id_values.values()[a..b].to_vec(),
                loss_mask: (c..d).map(|j| mask_values.value(j)).collect(),
            });
        }
    }
    Ok(())
}
