//! Writing rows to Parquet shards: `<split>/part-00000.parquet`, `part-00001.parquet`, ...,
//! `shard_rows` rows each (the last one fewer), Snappy-compressed, hashed with blake3 while
//! they are written.
//!
//! # Columns
//!
//! | column | type | meaning |
//! | --- | --- | --- |
//! | `input_ids` | `list<u32>` (items non-null) | the row's token ids, 1 to `seq_len` of them |
//! | `loss_mask` | `list<bool>` (items non-null) | same length; true = this token, as a target, counts toward the loss (see [`super::encode`]) |
//! | `example_id` | `u64` | record index of the example the row's first token belongs to (see [`super::pack`]) |
//!
//! Row groups hold about 1 Mi tokens. The bytes depend only on the rows, never on timing or
//! threads, so the same input gives byte-identical shards.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, ListArray, RecordBatch, UInt32Array, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Serialize;

use super::error::TokenizeError;
use super::pack::PackedRow;

/// Tokens per row group, roughly.
const GROUP_TOKENS: usize = 1 << 20;

/// One written shard, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardInfo {
    /// Path relative to the output folder, `/`-separated (e.g. `train/part-00000.parquet`).
    pub name: String,
    pub rows: u64,
    pub tokens: u64,
    pub bytes: u64,
    /// blake3 of the file, hex.
    pub blake3: String,
}

/// The Arrow schema of every shard.
pub(crate) fn schema() -> SchemaRef {
    let item = |t| Arc::new(Field::new("item", t, false));
    Arc::new(Schema::new(vec![
        Field::new("input_ids", DataType::List(item(DataType::UInt32)), false),
        Field::new("loss_mask", DataType::List(item(DataType::Boolean)), false),
        Field::new("example_id", DataType::UInt64, false),
    ]))
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct OpenShard {
    writer: ArrowWriter<Hashing<BufWriter<File>>>,
    name: String,
    path: PathBuf,
    rows: u64,
    tokens: u64,
}

/// Writes the rows of one split into shards.
pub(crate) struct ShardWriter {
    out_dir: PathBuf,
    split: &'static str,
    shard_rows: usize,
    group_rows: usize,
    buffer: Vec<PackedRow>,
    open: Option<OpenShard>,
    shards: Vec<ShardInfo>,
}

impl ShardWriter {
    /// Shards go to `out_dir/<split>/`, which must exist.
    pub(crate) fn new(
        out_dir: &Path,
        split: &'static str,
        shard_rows: usize,
        seq_len: usize,
    ) -> Self {
        ShardWriter {
            out_dir: out_dir.to_path_buf(),
            split,
            shard_rows,
            group_rows: (GROUP_TOKENS / seq_len).clamp(1, shard_rows),
            buffer: Vec::new(),
            open: None,
            shards: Vec::new(),
        }
    }

    /// Queues rows, writing every full row group.
    pub(crate) fn write(&mut self, rows: Vec<PackedRow>) -> Result<(), TokenizeError> {
        for row in rows {
            self.buffer.push(row);
            let in_shard = self.open.as_ref().map_or(0, |s| s.rows as usize);
            if self.buffer.len() >= self.group_rows
                || in_shard + self.buffer.len() >= self.shard_rows
            {
                self.flush_group()?;
            }
        }
        Ok(())
    }

    /// Writes what is queued and closes the last shard; returns every shard written.
    pub(crate) fn finish(mut self) -> Result<Vec<ShardInfo>, TokenizeError> {
        self.flush_group()?;
        self.close_shard()?;
        Ok(self.shards)
    }

    fn flush_group(&mut self) -> Result<(), TokenizeError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if self.open.is_none() {
            self.open_shard()?;
        }
        let rows = std::mem::take(&mut self.buffer);
        let batch = to_batch(&rows).map_err(|message| self.parquet_error(message))?;
        let shard = self
            .open
            .as_mut()
            .ok_or_else(|| TokenizeError::Internal("no open shard".into()))?;
        shard.rows += rows.len() as u64;
        shard.tokens += rows.iter().map(|r| r.ids.len() as u64).sum::<u64>();
        let result = shard.writer.write(&batch).map_err(|e| e.to_string());
        result.map_err(|message| self.parquet_error(message))?;
        if self
            .open
            .as_ref()
            .is_some_and(|s| s.rows as usize >= self.shard_rows)
        {
            self.close_shard()?;
        }
        Ok(())
    }

    fn open_shard(&mut self) -> Result<(), TokenizeError> {
        let name = format!("{}/part-{:05}.parquet", self.split, self.shards.len());
        let path = self.out_dir.join(&name);
        let file = File::create(&path).map_err(|e| TokenizeError::io(&path, e))?;
        let sink = Hashing {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: blake3::Hasher::new(),
            bytes: 0,
        };
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(self.group_rows))
            .build();
        let writer = ArrowWriter::try_new(sink, schema(), Some(props)).map_err(|e| {
            TokenizeError::Parquet {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
        self.open = Some(OpenShard {
            writer,
            name,
            path,
            rows: 0,
            tokens: 0,
        });
        Ok(())
    }

    fn close_shard(&mut self) -> Result<(), TokenizeError> {
        let Some(shard) = self.open.take() else {
            return Ok(());
        };
        let parquet_err = |e: parquet::errors::ParquetError| TokenizeError::Parquet {
            path: shard.path.clone(),
            message: e.to_string(),
        };
        let mut sink = shard.writer.into_inner().map_err(parquet_err)?;
        sink.flush()
            .map_err(|e| TokenizeError::io(&shard.path, e))?;
        self.shards.push(ShardInfo {
            name: shard.name,
            rows: shard.rows,
            tokens: shard.tokens,
            bytes: sink.bytes,
            blake3: sink.hasher.finalize().to_hex().to_string(),
        });
        Ok(())
    }

    fn parquet_error(&self, message: String) -> TokenizeError {
        let path = self
            .open
            .as_ref()
            .map_or_else(|| self.out_dir.join(self.split), |s| s.path.clone());
        TokenizeError::Parquet { path, message }
    }
}

/// Builds the Arrow batch of `rows`.
fn to_batch(rows: &[PackedRow]) -> Result<RecordBatch, String> {
    let lengths = rows.iter().map(|r| r.ids.len());
    let offsets = OffsetBuffer::<i32>::from_lengths(lengths);
    let ids: Vec<u32> = rows.iter().flat_map(|r| r.ids.iter().copied()).collect();
    let mask: Vec<bool> = rows.iter().flat_map(|r| r.mask.iter().copied()).collect();
    let fields = schema();
    let list = |i: usize, values: ArrayRef| -> Result<ArrayRef, String> {
        let DataType::List(item) = fields.field(i).data_type() else {
            return Err("schema is not a list".into());
        };
        ListArray::try_new(item.clone(), offsets.clone(), values, None)
            .map(|a| Arc::new(a) as ArrayRef)
            .map_err(|e| e.to_string())
    };
    let columns = vec![
        list(0, Arc::new(UInt32Array::from(ids)))?,
        list(1, Arc::new(BooleanArray::from(mask)))?,
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.example_id),
        )) as ArrayRef,
    ];
    RecordBatch::try_new(fields.clone(), columns).map_err(|e| e.to_string())
}
