//! The stage's entry point: a streamed three-step pipeline.
//!
//! ```text
//! reader thread ──chunks──▶ caller's thread: parse + tokenize in parallel (rayon), ──rows──▶ writer thread
//!  (files in order)          then split + pack in input order                               (Parquet shards)
//! ```
//!
//! The channels are bounded (two chunks of about [`super::chunk::CHUNK_BYTES`] each), so
//! memory stays bounded whatever the corpus size. Parallel work is collected back in input
//! order before anything order-dependent happens, so the output is byte-identical whatever
//! the number of rayon threads (the caller's pool is used: run inside `pool.install` to
//! choose it). `cancel` is checked between chunks.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use rayon::prelude::*;

use super::chunk::{Chunk, ChunkSink, Event};
use super::config::{ChatTemplate, Settings, TokenizeConfig};
use super::config::{OnBadRecord, SourceFormat};
use super::encode::{encode, Encoded};
use super::error::{Location, LocationUnit, RecordProblem, TokenizeError};
use super::manifest::{
    check_totals, Columns, InputInfo, Manifest, Resolved, SplitInfo, Splits, TokenizerInfo,
    MANIFEST_FORMAT,
};
use super::pack::{PackedRow, Packer};
use super::record::parse;
use super::shard::ShardWriter;
use super::source::{read_inputs, resolve_inputs, InputFile};
use super::split::Splitter;
use super::summary::{Progress, Summary, SKIP_SAMPLES};
use super::template::render;
use super::tokenizer::StageTokenizer;

/// Rows for (train, valid) produced from one chunk.
type RowBatch = (Vec<PackedRow>, Vec<PackedRow>);

/// Tokenizes `cfg.source` into `out_dir` (see the module docs of [`super`] for the layout).
///
/// Paths in `cfg` are relative to `workspace`. `out_dir` is created if needed and must be
/// empty. `progress` is called from the calling thread after every chunk. On any error,
/// including [`TokenizeError::Cancelled`], `out_dir` is left incomplete and should be
/// discarded.
pub fn run(
    cfg: &TokenizeConfig,
    workspace: &Path,
    out_dir: &Path,
    progress: &dyn Fn(&Progress),
    cancel: &AtomicBool,
) -> Result<Summary, TokenizeError> {
    let settings = cfg.settings()?;
    let tok = StageTokenizer::load(cfg, workspace)?;
    let files = resolve_inputs(&cfg.source.path, workspace)?;
    prepare_out_dir(out_dir)?;

    let (chunk_tx, chunk_rx) = sync_channel::<Chunk>(2);
    let (row_tx, row_rx) = sync_channel::<RowBatch>(2);
    let (consumed, read, written) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut sink = ChunkSink::new(chunk_tx, cancel);
            read_inputs(
                &files,
                settings.format,
                settings.text_split,
                &cfg.field,
                &mut sink,
            )
        });
        let writer = scope.spawn(|| {
            let mut train = ShardWriter::new(out_dir, "train", cfg.shard_rows, cfg.seq_len);
            let mut valid = ShardWriter::new(out_dir, "valid", cfg.shard_rows, cfg.seq_len);
            for (t, v) in row_rx {
                train.write(t)?;
                valid.write(v)?;
            }
            Ok::<_, TokenizeError>((train.finish()?, valid.finish()?))
        });
        let stage = Consumer {
            cfg,
            settings: &settings,
            tok: &tok,
            files: &files,
            splitter: Splitter::new(&cfg.split),
        };
        let consumed = stage.consume(chunk_rx, row_tx, progress, cancel);
        (consumed, joined(reader.join()), joined(writer.join()))
    });
    // The first problem in input order wins: the consumer's, then the reader's, then the writer's.
    let summary = match consumed {
        Ok(summary) => summary,
        Err(Consumed::Failed(e)) => return Err(e),
        Err(Consumed::WriterGone) => {
            written??;
            return Err(TokenizeError::Internal(
                "the shard writer stopped early".into(),
            ));
        }
    };
    let hashes = read??;
    let (train_shards, valid_shards) = written??;
    if cancel.load(Ordering::Relaxed) {
        return Err(TokenizeError::Cancelled);
    }
    if summary.train.examples + summary.valid.examples == 0 {
        return Err(TokenizeError::NoRecords {
            skipped: summary.skipped,
        });
    }
    check_totals(&summary, &train_shards, &valid_shards)?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        tokenizer: TokenizerInfo {
            path: &cfg.tokenizer,
            blake3: &tok.hash,
            bos: tok.bos.clone(),
            eos: tok.eos.clone(),
        },
        config: cfg,
        resolved: Resolved {
            format: settings.format,
            text_split: (settings.format == SourceFormat::Text).then_some(settings.text_split),
            chat_template: settings.template,
        },
        columns: Columns::default(),
        inputs: files
            .iter()
            .zip(hashes)
            .map(|(f, blake3)| InputInfo {
                path: f.display.clone(),
                bytes: f.size,
                blake3,
            })
            .collect(),
        records: summary.records,
        skipped: summary.skipped,
        skipped_samples: &summary.skipped_samples,
        empty_files: &summary.empty_files,
        splits: Splits {
            train: SplitInfo {
                counts: summary.train.clone(),
                shards: train_shards,
            },
            valid: SplitInfo {
                counts: summary.valid.clone(),
                shards: valid_shards,
            },
        },
    };
    manifest.write(&out_dir.join("manifest.json"))?;
    Ok(summary)
}

/// A thread's result, with a panic turned into an internal error.
fn joined<T>(result: std::thread::Result<T>) -> Result<T, TokenizeError> {
    result.map_err(|_| TokenizeError::Internal("a tokenize thread panicked".into()))
}

/// Creates `out_dir` with empty `train/` and `valid/` folders; refuses a non-empty one.
fn prepare_out_dir(out_dir: &Path) -> Result<(), TokenizeError> {
    std::fs::create_dir_all(out_dir).map_err(|e| TokenizeError::io(out_dir, e))?;
    let mut entries = std::fs::read_dir(out_dir).map_err(|e| TokenizeError::io(out_dir, e))?;
    if entries.next().is_some() {
        return Err(TokenizeError::OutputNotEmpty {
            path: out_dir.to_path_buf(),
        });
    }
    for split in ["train", "valid"] {
        let dir = out_dir.join(split);
        std::fs::create_dir(&dir).map_err(|e| TokenizeError::io(&dir, e))?;
    }
    Ok(())
}

/// Why the consumer stopped early.
enum Consumed {
    Failed(TokenizeError),
    /// The writer thread hung up; its own result says why.
    WriterGone,
}

impl From<TokenizeError> for Consumed {
    fn from(e: TokenizeError) -> Self {
        Consumed::Failed(e)
    }
}

/// One event after the parallel step.
enum Outcome {
    Example {
        index: u64,
        valid: bool,
        encoded: Encoded,
    },
    Bad {
        file: usize,
        number: u64,
        problem: RecordProblem,
    },
    EmptyFile(usize),
}

/// The work done on the caller's thread.
struct Consumer<'a> {
    cfg: &'a TokenizeConfig,
    settings: &'a Settings,
    tok: &'a StageTokenizer,
    files: &'a [InputFile],
    splitter: Splitter,
}

impl Consumer<'_> {
    fn consume(
        &self,
        chunks: Receiver<Chunk>,
        rows: SyncSender<RowBatch>,
        progress: &dyn Fn(&Progress),
        cancel: &AtomicBool,
    ) -> Result<Summary, Consumed> {
        let mut summary = Summary::default();
        let mut report = Progress {
            bytes_total: self.files.iter().map(|f| f.size).sum(),
            ..Progress::default()
        };
        let mut packers = [
            Packer::new(self.cfg.seq_len, self.cfg.packing),
            Packer::new(self.cfg.seq_len, self.cfg.packing),
        ];
        for chunk in chunks {
            if cancel.load(Ordering::Relaxed) {
                return Err(TokenizeError::Cancelled.into());
            }
            report.bytes_read += chunk.bytes_read;
            let outcomes: Vec<Outcome> = chunk
                .events
                .into_par_iter()
                .map(|e| self.process(e))
                .collect();
            let mut batch: RowBatch = (Vec::new(), Vec::new());
            for outcome in outcomes {
                match outcome {
                    Outcome::Example {
                        index,
                        valid,
                        encoded,
                    } => {
                        summary.records += 1;
                        let counts = if valid {
                            &mut summary.valid
                        } else {
                            &mut summary.train
                        };
                        counts.examples += 1;
                        counts.tokens += encoded.ids.len() as u64;
                        counts.loss_tokens += encoded.mask.iter().filter(|m| **m).count() as u64;
                        report.tokens += encoded.ids.len() as u64;
                        let out = if valid { &mut batch.1 } else { &mut batch.0 };
                        packers[usize::from(valid)].push(index, encoded, out);
                    }
                    Outcome::Bad {
                        file,
                        number,
                        problem,
                    } => {
                        summary.records += 1;
                        let location = self.location(file, number);
                        if self.cfg.on_bad_record == OnBadRecord::Error {
                            return Err(TokenizeError::BadRecord { location, problem }.into());
                        }
                        summary.skipped += 1;
                        if summary.skipped_samples.len() < SKIP_SAMPLES {
                            summary
                                .skipped_samples
                                .push(format!("{location}: {problem}"));
                        }
                    }
                    Outcome::EmptyFile(file) => {
                        let name = self.files[file].display.clone();
                        if self.cfg.on_bad_record == OnBadRecord::Error {
                            return Err(TokenizeError::EmptyFile { file: name }.into());
                        }
                        summary.empty_files.push(name);
                    }
                }
            }
            report.records = summary.records;
            report.skipped = summary.skipped;
            self.send(&rows, batch, &mut summary)?;
            progress(&report);
        }
        let mut last: RowBatch = (Vec::new(), Vec::new());
        packers[0].close(&mut last.0);
        packers[1].close(&mut last.1);
        self.send(&rows, last, &mut summary)?;
        summary.train.cut_examples = packers[0].cut_examples;
        summary.valid.cut_examples = packers[1].cut_examples;
        Ok(summary)
    }

    /// Counts rows and hands them to the writer.
    fn send(
        &self,
        rows: &SyncSender<RowBatch>,
        batch: RowBatch,
        summary: &mut Summary,
    ) -> Result<(), Consumed> {
        if batch.0.is_empty() && batch.1.is_empty() {
            return Ok(());
        }
        summary.train.rows += batch.0.len() as u64;
        summary.valid.rows += batch.1.len() as u64;
        rows.send(batch).map_err(|_| Consumed::WriterGone)
    }

    /// Parses, renders, splits and tokenizes one record (runs on the rayon pool).
    fn process(&self, event: Event) -> Outcome {
        let record = match event {
            Event::Record(record) => record,
            Event::EmptyFile(file) => return Outcome::EmptyFile(file),
        };
        let (file, number) = (record.file, record.number);
        let result =
            parse(record.body, self.settings.format, &self.cfg.field).and_then(|content| {
                let template = self.settings.template.unwrap_or(ChatTemplate::Chatml);
                let rendered = render(&content, template, self.cfg.mask_prompt);
                let valid = self.splitter.is_valid(&content);
                encode(self.tok, &rendered).map(|encoded| (valid, encoded))
            });
        match result {
            Ok((valid, encoded)) => Outcome::Example {
                index: record.index,
                valid,
                encoded,
            },
            Err(problem) => Outcome::Bad {
                file,
                number,
                problem,
            },
        }
    }

    fn location(&self, file: usize, number: u64) -> Location {
        let unit = match self.settings.format {
            SourceFormat::Parquet => LocationUnit::Row,
            SourceFormat::Text | SourceFormat::Jsonl => LocationUnit::Line,
        };
        Location {
            file: self.files[file].display.clone(),
            number,
            unit,
        }
    }
}
