//! The run ledger: each table a folder of immutable Parquet files.
//!
//! An append writes a new file under a temporary name, fsyncs it, renames it to its final
//! `.parquet` name and fsyncs the folder. Readers list the folder and read only final
//! names, so a crash at any point leaves either the whole append or none of it.
//! Compaction (`taper gc`, and automatically after a run when a table has many files)
//! writes one file with all rows the same way, then removes the files it merged.

use super::layout::{sync_dir, Layout};
use super::schema::{SchemaError, Table};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Ledger I/O failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// File system.
    #[error("ledger file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Parquet encoding or decoding.
    #[error("ledger file {path}: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The error.
        source: parquet::errors::ParquetError,
    },
    /// A file with an unexpected schema.
    #[error("ledger file {path}: {source}")]
    Schema {
        /// The file.
        path: PathBuf,
        /// The error.
        source: SchemaError,
    },
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Appends and reads ledger tables of one workspace.
#[derive(Clone, Debug)]
pub struct Ledger {
    layout: Layout,
}

impl Ledger {
    /// The ledger of the workspace at `layout`.
    pub fn new(layout: &Layout) -> Self {
        Ledger {
            layout: layout.clone(),
        }
    }

    /// Appends `rows` to table `T` as one new file. No-op for no rows.
    pub fn append<T: Table>(&self, rows: &[T]) -> Result<(), LedgerError> {
        if rows.is_empty() {
            return Ok(());
        }
        let dir = self.layout.table_dir(T::NAME);
        let name = format!(
            "{:016}-{}-{:06}.parquet",
            super::time::now_micros(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        write_file::<T>(&dir, &name, rows)
    }

    /// All rows of table `T`, in file-name (= append) order.
    pub fn read<T: Table>(&self) -> Result<Vec<T>, LedgerError> {
        let mut rows = Vec::new();
        for path in self.files(T::NAME)? {
            rows.extend(read_file::<T>(&path)?);
        }
        Ok(rows)
    }

    /// The final files of a table, sorted.
    pub fn files(&self, table: &str) -> Result<Vec<PathBuf>, LedgerError> {
        let dir = self.layout.table_dir(table);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(LedgerError::Io { path: dir, source }),
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.ends_with(".parquet") && !name.starts_with('.')
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Merges all files of table `T` into one. Returns how many files were merged.
    pub fn compact<T: Table>(&self) -> Result<usize, LedgerError> {
        let files = self.files(T::NAME)?;
        if files.len() < 2 {
            return Ok(0);
        }
        let mut rows = Vec::new();
        for path in &files {
            rows.extend(read_file::<T>(path)?);
        }
        // Named after the last merged file so that later appends still sort after it.
        let last = files
            .last()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .unwrap_or("0");
        let name = last.replace(".parquet", "-c.parquet");
        let dir = self.layout.table_dir(T::NAME);
        write_file::<T>(&dir, &name, &rows)?;
        for path in &files {
            fs::remove_file(path).map_err(|source| LedgerError::Io {
                path: path.clone(),
                source,
            })?;
        }
        sync_dir(&dir);
        Ok(files.len())
    }
}

fn write_file<T: Table>(dir: &Path, name: &str, rows: &[T]) -> Result<(), LedgerError> {
    let io = |path: &Path, source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(|e| io(dir, e))?;
    let batch = T::to_batch(rows);
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("taper {}", env!("CARGO_PKG_VERSION")))
        .build();
    let pq = |source| LedgerError::Parquet {
        path: dir.join(name),
        source,
    };
    let file = tmp.as_file().try_clone().map_err(|e| io(dir, e))?;
    let mut writer = ArrowWriter::try_new(file, T::schema(), Some(props)).map_err(pq)?;
    writer.write(&batch).map_err(pq)?;
    writer.close().map_err(pq)?;
    tmp.as_file().sync_all().map_err(|e| io(tmp.path(), e))?;
    let final_path = dir.join(name);
    tmp.persist(&final_path)
        .map_err(|e| io(&final_path, e.error))?;
    sync_dir(dir);
    Ok(())
}

fn read_file<T: Table>(path: &Path) -> Result<Vec<T>, LedgerError> {
    let file = fs::File::open(path).map_err(|source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let pq = |source| LedgerError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(pq)?
        .build()
        .map_err(pq)?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| pq(e.into()))?;
        rows.extend(T::from_batch(&batch).map_err(|source| LedgerError::Schema {
            path: path.to_path_buf(),
            source,
        })?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::schema::{FileHash, MetricRow, StageRunRow};

    fn row(stage: &str) -> StageRunRow {
        StageRunRow {
            run_id: "r1".into(),
            stage: stage.into(),
            kind: "command".into(),
            fingerprint: "fp".into(),
            config_hash: "ch".into(),
            status: "success".into(),
            reason: "never run".into(),
            attempt: 1,
            started_at: 1,
            ended_at: Some(2),
            inputs: vec![FileHash {
                path: "a".into(),
                hash: "h".into(),
                bytes: 0,
            }],
            outputs: vec![FileHash {
                path: "b".into(),
                hash: "h2".into(),
                bytes: 7,
            }],
            error: None,
        }
    }

    #[test]
    fn append_read_compact_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(&Layout::new(dir.path()));
        ledger.append(&[row("a")]).unwrap();
        ledger.append(&[row("b"), row("c")]).unwrap();
        ledger
            .append(&[MetricRow {
                run_id: "r1".into(),
                stage: "a".into(),
                step: 3,
                name: "loss".into(),
                value: 1.5,
                time: 9,
            }])
            .unwrap();
        let rows: Vec<StageRunRow> = ledger.read().unwrap();
        assert_eq!(
            rows.iter().map(|r| r.stage.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(rows[0], row("a"));
        assert_eq!(ledger.compact::<StageRunRow>().unwrap(), 2);
        assert_eq!(ledger.files("stage_runs").unwrap().len(), 1);
        ledger.append(&[row("d")]).unwrap();
        let rows: Vec<StageRunRow> = ledger.read().unwrap();
        assert_eq!(
            rows.iter().map(|r| r.stage.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert_eq!(ledger.read::<MetricRow>().unwrap()[0].value, 1.5);
    }

    #[test]
    fn temp_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(&Layout::new(dir.path()));
        ledger.append(&[row("a")]).unwrap();
        let tdir = Layout::new(dir.path()).table_dir("stage_runs");
        fs::write(tdir.join(".tmp-xyz.part"), b"half a file").unwrap();
        assert_eq!(ledger.read::<StageRunRow>().unwrap().len(), 1);
    }
}
