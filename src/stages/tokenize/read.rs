//! Loading rows back from the shards of one split, for the train and eval stages.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{UInt32Type, UInt64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::error::TokenizeError;

/// One training row: token ids and the loss mask aligned with them (`loss_mask[i]` true =
/// `input_ids[i]`, as a target, counts toward the loss; see [`super::encode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Row {
    /// Targets that count toward the loss (the first token is never one: nothing
    /// predicts it).
    pub fn targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// The shard files of one split folder (e.g. `<out_dir>/train`): every `part-*.parquet`,
/// sorted by name. A missing folder is an error; an empty one has no shards.
pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, TokenizeError> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| TokenizeError::io(dir, e))? {
        let entry = entry.map_err(|e| TokenizeError::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("part-") && name.ends_with(".parquet") {
            paths.push(entry.path());
        }
    }
    paths.sort();
    Ok(paths)
}

/// Every row of every shard in `dir` (one split's folder), in order.
pub fn read_shards(dir: &Path) -> Result<Vec<Row>, TokenizeError> {
    let mut rows = Vec::new();
    for path in shard_paths(dir)? {
        read_shard_into(&path, &mut rows, None)?;
    }
    Ok(rows)
}

/// The rows of one shard file, in order (only the `input_ids` and `loss_mask` columns are
/// read).
pub fn read_shard_rows(path: &Path) -> Result<Vec<Row>, TokenizeError> {
    let mut rows = Vec::new();
    read_shard_into(path, &mut rows, None)?;
    Ok(rows)
}

/// The rows of one shard file, with their `example_id`s.
pub fn read_shard(path: &Path) -> Result<Vec<(Row, u64)>, TokenizeError> {
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    read_shard_into(path, &mut rows, Some(&mut ids))?;
    Ok(rows.into_iter().zip(ids).collect())
}

fn read_shard_into(
    path: &Path,
    rows: &mut Vec<Row>,
    mut example_ids: Option<&mut Vec<u64>>,
) -> Result<(), TokenizeError> {
    let err = |message: String| TokenizeError::Parquet {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| TokenizeError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(e.to_string()))?;
    // Read only the columns asked for (shards may carry more).
    let schema = builder.parquet_schema();
    let wanted: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| {
            let column = schema.column(i);
            let top = column.path().parts()[0].as_str();
            top == "input_ids"
                || top == "loss_mask"
                || (example_ids.is_some() && top == "example_id")
        })
        .collect();
    let projection = ProjectionMask::leaves(schema, wanted);
    let reader = builder
        .with_projection(projection)
        .build()
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
                loss_mask: (c..d)
                    .map(|j| mask_values.is_valid(j) && mask_values.value(j))
                    .collect(),
            });
        }
        if let Some(out) = example_ids.as_deref_mut() {
            let col = column("example_id")?
                .as_primitive_opt::<UInt64Type>()
                .ok_or_else(|| err("example_id is not u64".into()))?;
            out.extend(col.values().iter().copied());
        }
    }
    Ok(())
}
