//! Shared helpers of the `train_*` integration tests: a temp workspace with the tiny
//! model and token shards, a train stage configured from YAML the way the executor does
//! it, and running it with a real [`StageContext`].
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, BooleanArray, ListArray, RecordBatch, UInt32Array, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use taper::stages::{configure, CancelToken, StageConfig, StageContext, StageError, StageEvent};

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A token row: ids and loss mask.
pub type Row = (Vec<u32>, Vec<bool>);

/// Writes `rows` as one shard with the tokenize stage's columns.
pub fn write_shard(path: &Path, rows: &[Row]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let item = |t| Arc::new(Field::new("item", t, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("input_ids", DataType::List(item(DataType::UInt32)), false),
        Field::new("loss_mask", DataType::List(item(DataType::Boolean)), false),
        Field::new("example_id", DataType::UInt64, false),
    ]));
    let offsets = OffsetBuffer::<i32>::from_lengths(rows.iter().map(|r| r.0.len()));
    let ids: Vec<u32> = rows.iter().flat_map(|r| r.0.iter().copied()).collect();
    let mask: Vec<bool> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
    let list = |t: DataType, values: ArrayRef| -> ArrayRef {
        Arc::new(ListArray::try_new(item(t), offsets.clone(), values, None).unwrap())
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            list(DataType::UInt32, Arc::new(UInt32Array::from(ids))),
            list(DataType::Boolean, Arc::new(BooleanArray::from(mask))),
            Arc::new(UInt64Array::from_iter_values(0..rows.len() as u64)),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// A workspace with `models/base` (a copy of tiny-llama) and `tokens/{train,valid}`.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new(train: &[Row], valid: &[Row]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("models/base");
        std::fs::create_dir_all(&base).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(fixture("tiny-llama").join(f), base.join(f)).unwrap();
        }
        write_shard(&dir.path().join("tokens/train/part-00000.parquet"), train);
        write_shard(&dir.path().join("tokens/valid/part-00000.parquet"), valid);
        Workspace { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh staging folder for one stage (kept across attempts, as the executor does
    /// for a resumable stage whose fingerprint did not change).
    pub fn staging(&self, name: &str) -> PathBuf {
        let p = self.path().join(".taper/staging").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

/// The pipeline text of one train stage with `with` (YAML lines, indented by the caller
/// or not: they are indented here).
pub fn pipeline_yaml(with: &str) -> String {
    let with: String = with.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "version: 1\nname: t\nstages:\n  train:\n    kind: train\n    \
         inputs: [tokens/train, tokens/valid, models/base]\n    outputs: [adapters/run]\n    \
         with:\n{with}"
    )
}

/// Loads the pipeline and configures its train stage as the executor does.
pub fn stage(with: &str) -> (taper::spec::Stage, StageConfig) {
    let file = Path::new("pipeline.yaml");
    let p =
        taper::spec::load_str(file, &pipeline_yaml(with), &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let stage = p.stage("train").unwrap().clone();
    let cfg = configure(file, &stage).unwrap_or_else(|e| panic!("{e:?}"));
    (stage, cfg)
}

/// What a run reported.
#[derive(Default)]
pub struct Report {
    pub events: Vec<StageEvent>,
}

impl Report {
    /// `(step, value)` of every metric named `name`.
    pub fn metric(&self, name: &str) -> Vec<(i64, f64)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                StageEvent::Metric {
                    step,
                    name: n,
                    value,
                } if n == name => Some((*step, *value)),
                _ => None,
            })
            .collect()
    }
}

/// Runs one attempt of the stage; `on_event` sees each event with the cancel token.
pub fn run(
    ws: &Workspace,
    staging: &Path,
    with: &str,
    on_event: impl Fn(&StageEvent, &CancelToken) + Sync,
) -> (Result<(), StageError>, Report) {
    let (stage, cfg) = stage(with);
    let cancel = CancelToken::new();
    let report = Mutex::new(Report::default());
    let events = |e: StageEvent| {
        on_event(&e, &cancel);
        report.lock().unwrap().events.push(e);
    };
    let ctx = StageContext {
        run_id: "test",
        stage: &stage,
        workspace: ws.path(),
        staging,
        attempt: 1,
        cancel: &cancel,
        deadline: None,
        log_file: staging.join("log.txt"),
        events: &events,
    };
    let result = cfg.run(&ctx);
    (result, report.into_inner().unwrap())
}

/// Tokenizes `text` with the tiny model's real byte-level BPE and cuts it into rows of
/// `len` tokens, every target counted.
pub fn text_rows(text: &str, len: usize) -> Vec<Row> {
    let tok = tokenizers::Tokenizer::from_file(fixture("tiny-llama/tokenizer.json")).unwrap();
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    ids.chunks(len)
        .filter(|c| c.len() >= 2)
        .map(|c| (c.to_vec(), vec![true; c.len()]))
        .collect()
}
