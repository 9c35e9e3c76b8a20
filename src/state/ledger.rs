//! The run ledger: each table a folder of immutable Parquet files.
//!
//! An append writes a new file under a temporary name, fsyncs it, renames it to its final
//! `.parquet` name and fsyncs the folder. Readers list the folder and read only final
//! names, so a crash at any point leaves either the whole append or none of it.
//!
//! Rewriting a table (compaction by `taper gc` and after a run when a table has many
//! files; pruning old runs for `keep_runs`) writes one new file the same way, then
//! removes the files it replaces. The new file's name says which files it replaces, so a
//! crash between the two steps never shows a row twice or brings a removed row back:
//!
//! - A file's *key* is its name without `.parquet` and without trailing `-c` suffixes (its
//!   base), plus how many `-c` suffixes it had: `X-c.parquet` is `(X, 1)`. Files are read
//!   in key order (not name order: `X-c.parquet` sorts before `X.parquet` by name, since
//!   `-` < `.`).
//! - A rewrite names its file after the last file it read, with one more `-c`: it
//!   *supersedes* every file whose key is lower. Readers ignore superseded files, and the
//!   next rewrite or compaction deletes whatever a crash left of them.
//! - Appends are named `<micros>-<pid>-<seq>`, with a time later than every file already
//!   there (even if the clock went back), so an append always sorts after, and is never
//!   superseded by, a merged file it was not part of.
//!
//! Only the holder of the exclusive workspace lock rewrites; appends of `--only` runs go
//! on under the shared lock, which excludes rewrites.

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
        // Later than every file there, so that no merged file can supersede this one.
        let newest = list(&dir)?
            .into_iter()
            .filter_map(|(key, _)| key.micros())
            .max();
        let now = super::time::now_micros();
        let micros = match newest {
            Some(n) if n >= now => n + 1,
            _ => now,
        };
        let name = format!(
            "{:016}-{}-{:06}.parquet",
            micros,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        write_file::<T>(&dir, &name, rows)
    }

    /// All rows of table `T`, in append order.
    pub fn read<T: Table>(&self) -> Result<Vec<T>, LedgerError> {
        read_all(&self.files(T::NAME)?)
    }

    /// The live files of a table, in read order: final names only, and none that a merged
    /// file supersedes.
    pub fn files(&self, table: &str) -> Result<Vec<PathBuf>, LedgerError> {
        Ok(split(list(&self.layout.table_dir(table))?).0)
    }

    /// Merges the live files of table `T` into one, and deletes superseded files (also
    /// those a crashed rewrite left). Returns how many files were merged.
    pub fn compact<T: Table>(&self) -> Result<usize, LedgerError> {
        let dir = self.layout.table_dir(T::NAME);
        let (live, _) = split(list(&dir)?);
        let merged = if live.len() < 2 {
            0
        } else {
            write_merged::<T>(&dir, &live, &read_all(&live)?)?;
            live.len()
        };
        remove_superseded(&dir)?;
        Ok(merged)
    }

    /// Rewrites table `T` without the rows `keep` rejects (order kept), as one merged file
    /// that supersedes the old ones. Writes nothing when every row is kept. Returns how
    /// many rows were removed.
    pub fn retain<T: Table>(&self, mut keep: impl FnMut(&T) -> bool) -> Result<usize, LedgerError> {
        let dir = self.layout.table_dir(T::NAME);
        let (live, _) = split(list(&dir)?);
        let rows = read_all::<T>(&live)?;
        let before = rows.len();
        let kept: Vec<T> = rows.into_iter().filter(|r| keep(r)).collect();
        let removed = before - kept.len();
        if removed > 0 {
            write_merged::<T>(&dir, &live, &kept)?;
            remove_superseded(&dir)?;
        }
        Ok(removed)
    }
}

/// Where a final file stands in its table: see the module docs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    /// The name without `.parquet` and without trailing `-c` suffixes.
    base: String,
    /// How many `-c` suffixes: 0 for an append, n for a file n rewrites made.
    merges: usize,
}

impl Key {
    /// The key of a final file name; `None` for temporary and foreign names.
    fn of(name: &str) -> Option<Key> {
        if name.starts_with('.') {
            return None;
        }
        let mut base = name.strip_suffix(".parquet")?;
        let mut merges = 0;
        while let Some(b) = base.strip_suffix("-c") {
            base = b;
            merges += 1;
        }
        Some(Key {
            base: base.to_string(),
            merges,
        })
    }

    /// The file name with one more `-c`: a rewrite whose last input is this file.
    fn merged_name(&self) -> String {
        format!("{}{}.parquet", self.base, "-c".repeat(self.merges + 1))
    }

    /// The append time at the start of the name.
    fn micros(&self) -> Option<i64> {
        self.base.split('-').next()?.parse().ok()
    }
}

/// The final files of a table folder with their keys, in key order.
fn list(dir: &Path) -> Result<Vec<(Key, PathBuf)>, LedgerError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LedgerError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut files: Vec<(Key, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let key = Key::of(p.file_name()?.to_str()?)?;
            Some((key, p))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Splits a listing into (live, superseded): everything before the last merged file is
/// superseded by it.
fn split(files: Vec<(Key, PathBuf)>) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let cut = files
        .iter()
        .rposition(|(key, _)| key.merges > 0)
        .unwrap_or(0);
    let mut paths: Vec<PathBuf> = files.into_iter().map(|(_, p)| p).collect();
    let live = paths.split_off(cut);
    (live, paths)
}

/// Writes `rows` as the file that supersedes `live` (named after its last file).
fn write_merged<T: Table>(dir: &Path, live: &[PathBuf], rows: &[T]) -> Result<(), LedgerError> {
    let key = live
        .last()
        .and_then(|p| Key::of(p.file_name()?.to_str()?))
        .unwrap_or(Key {
            base: format!("{:016}", super::time::now_micros()),
            merges: 0,
        });
    write_file::<T>(dir, &key.merged_name(), rows)
}

/// Deletes the files a merged file supersedes. Each deletion leaves a readable table.
fn remove_superseded(dir: &Path) -> Result<(), LedgerError> {
    let (_, superseded) = split(list(dir)?);
    if superseded.is_empty() {
        return Ok(());
    }
    for path in superseded {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(LedgerError::Io { path, source }),
        }
    }
    sync_dir(dir);
    Ok(())
}

fn read_all<T: Table>(files: &[PathBuf]) -> Result<Vec<T>, LedgerError> {
    let mut rows = Vec::new();
    for path in files {
        rows.extend(read_file::<T>(path)?);
    }
    Ok(rows)
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

    fn stages(ledger: &Ledger) -> Vec<String> {
        ledger
            .read::<StageRunRow>()
            .unwrap()
            .into_iter()
            .map(|r| r.stage)
            .collect()
    }

    fn names(ledger: &Ledger) -> Vec<String> {
        let dir = ledger.layout.table_dir("stage_runs");
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_merged_file_supersedes_what_it_merged_even_before_they_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(&Layout::new(dir.path()));
        for s in ["a", "b", "c"] {
            ledger.append(&[row(s)]).unwrap();
        }
        let tdir = ledger.layout.table_dir("stage_runs");
        let old = ledger.files("stage_runs").unwrap();
        // A compaction that crashed after writing its file, before deleting any input.
        let rows: Vec<StageRunRow> = ledger.read().unwrap();
        write_merged::<StageRunRow>(&tdir, &old, &rows).unwrap();
        assert_eq!(names(&ledger).len(), 4);
        assert_eq!(stages(&ledger), ["a", "b", "c"]);
        // `X-c.parquet` sorts before `X.parquet` by name, yet supersedes it.
        let last = old[2].file_name().unwrap().to_str().unwrap();
        assert!(
            names(&ledger)[2].ends_with("-c.parquet"),
            "{:?}",
            names(&ledger)
        );
        assert_eq!(names(&ledger)[3], last);
        // ... or after deleting some of them.
        fs::remove_file(&old[0]).unwrap();
        assert_eq!(stages(&ledger), ["a", "b", "c"]);
        // A prune that crashed the same way: the rows it dropped do not come back.
        write_merged::<StageRunRow>(&tdir, &ledger.files("stage_runs").unwrap(), &rows[1..])
            .unwrap();
        assert_eq!(stages(&ledger), ["b", "c"]);
        // The next compaction deletes the leftovers.
        assert_eq!(ledger.compact::<StageRunRow>().unwrap(), 0);
        assert_eq!(names(&ledger), [last.replace(".parquet", "-c-c.parquet")]);
        assert_eq!(stages(&ledger), ["b", "c"]);
    }

    #[test]
    fn compaction_and_pruning_then_appends_read_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(&Layout::new(dir.path()));
        ledger.append(&[row("a")]).unwrap();
        ledger.append(&[row("b")]).unwrap();
        assert_eq!(ledger.compact::<StageRunRow>().unwrap(), 2);
        ledger.append(&[row("c")]).unwrap();
        ledger.append(&[row("d")]).unwrap();
        assert_eq!(stages(&ledger), ["a", "b", "c", "d"]);
        assert_eq!(ledger.compact::<StageRunRow>().unwrap(), 3);
        ledger.append(&[row("e")]).unwrap();
        assert_eq!(ledger.retain::<StageRunRow>(|r| r.stage != "b").unwrap(), 1);
        // A rewrite of a single merged file supersedes it too.
        assert_eq!(ledger.retain::<StageRunRow>(|r| r.stage != "d").unwrap(), 1);
        assert_eq!(ledger.retain::<StageRunRow>(|_| true).unwrap(), 0);
        assert_eq!(names(&ledger).len(), 1);
        assert!(names(&ledger)[0].ends_with("-c-c.parquet"));
        ledger.append(&[row("f")]).unwrap();
        assert_eq!(stages(&ledger), ["a", "c", "e", "f"]);
    }

    #[test]
    fn an_append_after_a_merged_file_from_the_future_is_not_superseded() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(&Layout::new(dir.path()));
        let tdir = ledger.layout.table_dir("stage_runs");
        // Compacted while the clock was ahead, then the clock went back.
        let ahead = super::super::time::now_micros() + 3_600_000_000;
        write_file::<StageRunRow>(
            &tdir,
            &format!("{ahead:016}-1-000000-c.parquet"),
            &[row("a")],
        )
        .unwrap();
        ledger.append(&[row("b")]).unwrap();
        ledger.append(&[row("c")]).unwrap();
        assert_eq!(stages(&ledger), ["a", "b", "c"]);
        assert_eq!(ledger.compact::<StageRunRow>().unwrap(), 3);
        assert_eq!(stages(&ledger), ["a", "b", "c"]);
    }
}
