//! The ledger's tables: one Rust row type per table and its Arrow schema.
//!
//! Schemas are documented in ARCHITECTURE.md; changing a column is a format change.
//! Times are `timestamp[us, UTC]`.

use arrow::array::{
    Array, ArrayRef, Float64Array, Int64Array, ListArray, ListBuilder, RecordBatch, StringArray,
    StringBuilder, TimestampMicrosecondArray, UInt32Array, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use std::sync::Arc;

/// Reading a table back failed because a column is missing or has another type.
#[derive(Debug, thiserror::Error)]
#[error("ledger table {table}: column `{column}` is missing or has the wrong type")]
pub struct SchemaError {
    /// Table.
    pub table: &'static str,
    /// Column.
    pub column: &'static str,
}

/// A row type stored in one ledger table.
pub trait Table: Sized {
    /// The table's folder name under `.taper/ledger/`.
    const NAME: &'static str;
    /// The Arrow schema.
    fn schema() -> SchemaRef;
    /// Rows to a record batch.
    fn to_batch(rows: &[Self]) -> RecordBatch;
    /// A record batch back to rows.
    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>, SchemaError>;
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}
fn utf8_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}
fn u64_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::UInt64, true)))
}

fn strs<'a>(it: impl IntoIterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(it))
}
fn opt_strs<'a>(it: impl IntoIterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(StringArray::from_iter(it))
}
fn times(it: impl IntoIterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter(it).with_timezone("UTC"))
}
fn str_lists<'a>(rows: impl IntoIterator<Item = Vec<&'a str>>) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new());
    for row in rows {
        for v in row {
            b.values().append_value(v);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}
fn u64_lists(rows: impl IntoIterator<Item = Vec<u64>>) -> ArrayRef {
    let mut b = ListBuilder::new(UInt64Builder::new());
    for row in rows {
        for v in row {
            b.values().append_value(v);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

struct Cols<'a> {
    table: &'static str,
    batch: &'a RecordBatch,
}

impl<'a> Cols<'a> {
    fn get<T: 'static>(&self, column: &'static str) -> Result<&'a T, SchemaError> {
        self.batch
            .column_by_name(column)
            .and_then(|c| c.as_any().downcast_ref::<T>())
            .ok_or(SchemaError {
                table: self.table,
                column,
            })
    }
    fn s(&self, c: &'static str) -> Result<&'a StringArray, SchemaError> {
        self.get(c)
    }
    fn t(&self, c: &'static str) -> Result<&'a TimestampMicrosecondArray, SchemaError> {
        self.get(c)
    }
    fn l(&self, c: &'static str) -> Result<&'a ListArray, SchemaError> {
        self.get(c)
    }
}

fn opt_s(a: &StringArray, i: usize) -> Option<String> {
    (!a.is_null(i)).then(|| a.value(i).to_string())
}
fn opt_t(a: &TimestampMicrosecondArray, i: usize) -> Option<i64> {
    (!a.is_null(i)).then(|| a.value(i))
}
fn list_strs(a: &ListArray, i: usize) -> Vec<String> {
    let v = a.value(i);
    v.as_any()
        .downcast_ref::<StringArray>()
        .map(|s| {
            s.iter()
                .map(|x| x.unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}
fn list_u64s(a: &ListArray, i: usize) -> Vec<u64> {
    let v = a.value(i);
    v.as_any()
        .downcast_ref::<UInt64Array>()
        .map(|s| s.iter().map(|x| x.unwrap_or_default()).collect())
        .unwrap_or_default()
}

/// `runs`: one row when a run starts and one when it ends; the last row of a run wins.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRow {
    /// Run id.
    pub run_id: String,
    /// Pipeline file as given.
    pub pipeline: String,
    /// The pipeline's `name:`.
    pub pipeline_name: String,
    /// running | success | failed | interrupted
    pub status: String,
    /// manual | schedule
    pub trigger: String,
    /// For scheduled runs: the fire time.
    pub scheduled_for: Option<i64>,
    /// Start.
    pub started_at: i64,
    /// End; null while running.
    pub ended_at: Option<i64>,
    /// The command-line options that shaped the run (JSON).
    pub args: String,
    /// Host.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// taper version.
    pub taper_version: String,
}

impl Table for RunRow {
    const NAME: &'static str = "runs";
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("run_id", DataType::Utf8, false),
            Field::new("pipeline", DataType::Utf8, false),
            Field::new("pipeline_name", DataType::Utf8, false),
            Field::new("status", DataType::Utf8, false),
            Field::new("trigger", DataType::Utf8, false),
            Field::new("scheduled_for", ts(), true),
            Field::new("started_at", ts(), false),
            Field::new("ended_at", ts(), true),
            Field::new("args", DataType::Utf8, false),
            Field::new("host", DataType::Utf8, false),
            Field::new("pid", DataType::UInt32, false),
            Field::new("taper_version", DataType::Utf8, false),
        ]))
    }
    fn to_batch(rows: &[Self]) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            strs(rows.iter().map(|r| r.run_id.as_str())),
            strs(rows.iter().map(|r| r.pipeline.as_str())),
            strs(rows.iter().map(|r| r.pipeline_name.as_str())),
            strs(rows.iter().map(|r| r.status.as_str())),
            strs(rows.iter().map(|r| r.trigger.as_str())),
            times(rows.iter().map(|r| r.scheduled_for)),
            times(rows.iter().map(|r| Some(r.started_at))),
            times(rows.iter().map(|r| r.ended_at)),
            strs(rows.iter().map(|r| r.args.as_str())),
            strs(rows.iter().map(|r| r.host.as_str())),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.pid))),
            strs(rows.iter().map(|r| r.taper_version.as_str())),
        ];
        RecordBatch::try_new(Self::schema(), cols).expect("columns match the schema")
    }
    fn from_batch(b: &RecordBatch) -> Result<Vec<Self>, SchemaError> {
        let c = Cols {
            table: Self::NAME,
            batch: b,
        };
        let (id, pl, pn, st, tr) = (
            c.s("run_id")?,
            c.s("pipeline")?,
            c.s("pipeline_name")?,
            c.s("status")?,
            c.s("trigger")?,
        );
        let (sf, sa, ea) = (c.t("scheduled_for")?, c.t("started_at")?, c.t("ended_at")?);
        let (args, host, pid, ver) = (
            c.s("args")?,
            c.s("host")?,
            c.get::<UInt32Array>("pid")?,
            c.s("taper_version")?,
        );
        Ok((0..b.num_rows())
            .map(|i| RunRow {
                run_id: id.value(i).into(),
                pipeline: pl.value(i).into(),
                pipeline_name: pn.value(i).into(),
                status: st.value(i).into(),
                trigger: tr.value(i).into(),
                scheduled_for: opt_t(sf, i),
                started_at: sa.value(i),
                ended_at: opt_t(ea, i),
                args: args.value(i).into(),
                host: host.value(i).into(),
                pid: pid.value(i),
                taper_version: ver.value(i).into(),
            })
            .collect())
    }
}

/// A file with its content hash, as recorded for inputs and outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHash {
    /// Workspace-relative path.
    pub path: String,
    /// blake3 hex of the content (files) or of the sorted listing (folders).
    pub hash: String,
    /// Size in bytes (sum for folders).
    pub bytes: u64,
}

/// `stage_runs`: one row per stage attempt outcome (and one per skipped stage).
#[derive(Clone, Debug, PartialEq)]
pub struct StageRunRow {
    /// Run id.
    pub run_id: String,
    /// Stage name.
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// The stage fingerprint the attempt ran with.
    pub fingerprint: String,
    /// Hash of the kind, its version and the resolved configuration.
    pub config_hash: String,
    /// success | failed | interrupted | timed_out | skipped
    pub status: String,
    /// Why the stage ran or was skipped.
    pub reason: String,
    /// Attempt number, 1-based (0 for skipped).
    pub attempt: u32,
    /// Start.
    pub started_at: i64,
    /// End.
    pub ended_at: Option<i64>,
    /// Inputs with their hashes when the attempt started.
    pub inputs: Vec<FileHash>,
    /// Outputs with their hashes after publishing (success only).
    pub outputs: Vec<FileHash>,
    /// Error message for failures.
    pub error: Option<String>,
}

impl Table for StageRunRow {
    const NAME: &'static str = "stage_runs";
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("run_id", DataType::Utf8, false),
            Field::new("stage", DataType::Utf8, false),
            Field::new("kind", DataType::Utf8, false),
            Field::new("fingerprint", DataType::Utf8, false),
            Field::new("config_hash", DataType::Utf8, false),
            Field::new("status", DataType::Utf8, false),
            Field::new("reason", DataType::Utf8, false),
            Field::new("attempt", DataType::UInt32, false),
            Field::new("started_at", ts(), false),
            Field::new("ended_at", ts(), true),
            Field::new("input_paths", utf8_list(), false),
            Field::new("input_hashes", utf8_list(), false),
            Field::new("output_paths", utf8_list(), false),
            Field::new("output_hashes", utf8_list(), false),
            Field::new("output_bytes", u64_list(), false),
            Field::new("error", DataType::Utf8, true),
        ]))
    }
    fn to_batch(rows: &[Self]) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            strs(rows.iter().map(|r| r.run_id.as_str())),
            strs(rows.iter().map(|r| r.stage.as_str())),
            strs(rows.iter().map(|r| r.kind.as_str())),
            strs(rows.iter().map(|r| r.fingerprint.as_str())),
            strs(rows.iter().map(|r| r.config_hash.as_str())),
            strs(rows.iter().map(|r| r.status.as_str())),
            strs(rows.iter().map(|r| r.reason.as_str())),
            Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|r| r.attempt),
            )),
            times(rows.iter().map(|r| Some(r.started_at))),
            times(rows.iter().map(|r| r.ended_at)),
            str_lists(
                rows.iter()
                    .map(|r| r.inputs.iter().map(|f| f.path.as_str()).collect()),
            ),
            str_lists(
                rows.iter()
                    .map(|r| r.inputs.iter().map(|f| f.hash.as_str()).collect()),
            ),
            str_lists(
                rows.iter()
                    .map(|r| r.outputs.iter().map(|f| f.path.as_str()).collect()),
            ),
            str_lists(
                rows.iter()
                    .map(|r| r.outputs.iter().map(|f| f.hash.as_str()).collect()),
            ),
            u64_lists(
                rows.iter()
                    .map(|r| r.outputs.iter().map(|f| f.bytes).collect()),
            ),
            opt_strs(rows.iter().map(|r| r.error.as_deref())),
        ];
        RecordBatch::try_new(Self::schema(), cols).expect("columns match the schema")
    }
    fn from_batch(b: &RecordBatch) -> Result<Vec<Self>, SchemaError> {
        let c = Cols {
            table: Self::NAME,
            batch: b,
        };
        let (id, st, kd, fp, ch) = (
            c.s("run_id")?,
            c.s("stage")?,
            c.s("kind")?,
            c.s("fingerprint")?,
            c.s("config_hash")?,
        );
        let (status, reason, attempt) = (
            c.s("status")?,
            c.s("reason")?,
            c.get::<UInt32Array>("attempt")?,
        );
        let (sa, ea) = (c.t("started_at")?, c.t("ended_at")?);
        let (ip, ih, op, oh, ob) = (
            c.l("input_paths")?,
            c.l("input_hashes")?,
            c.l("output_paths")?,
            c.l("output_hashes")?,
            c.l("output_bytes")?,
        );
        let err = c.s("error")?;
        Ok((0..b.num_rows())
            .map(|i| {
                let inputs = list_strs(ip, i)
                    .into_iter()
                    .zip(list_strs(ih, i))
                    .map(|(path, hash)| FileHash {
                        path,
                        hash,
                        bytes: 0,
                    })
                    .collect();
                let outputs = list_strs(op, i)
                    .into_iter()
                    .zip(list_strs(oh, i))
                    .zip(list_u64s(ob, i))
                    .map(|((path, hash), bytes)| FileHash { path, hash, bytes })
                    .collect();
                StageRunRow {
                    run_id: id.value(i).into(),
                    stage: st.value(i).into(),
                    kind: kd.value(i).into(),
                    fingerprint: fp.value(i).into(),
                    config_hash: ch.value(i).into(),
                    status: status.value(i).into(),
                    reason: reason.value(i).into(),
                    attempt: attempt.value(i),
                    started_at: sa.value(i),
                    ended_at: opt_t(ea, i),
                    inputs,
                    outputs,
                    error: opt_s(err, i),
                }
            })
            .collect())
    }
}

/// `metrics`: long format, one value per row.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricRow {
    /// Run id.
    pub run_id: String,
    /// Stage name.
    pub stage: String,
    /// Step (0 for single values).
    pub step: i64,
    /// Metric name (`train/loss`, `eval/perplexity`, ...).
    pub name: String,
    /// Value.
    pub value: f64,
    /// When it was reported.
    pub time: i64,
}

impl Table for MetricRow {
    const NAME: &'static str = "metrics";
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("run_id", DataType::Utf8, false),
            Field::new("stage", DataType::Utf8, false),
            Field::new("step", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
            Field::new("time", ts(), false),
        ]))
    }
    fn to_batch(rows: &[Self]) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            strs(rows.iter().map(|r| r.run_id.as_str())),
            strs(rows.iter().map(|r| r.stage.as_str())),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.step))),
            strs(rows.iter().map(|r| r.name.as_str())),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.value))),
            times(rows.iter().map(|r| Some(r.time))),
        ];
        RecordBatch::try_new(Self::schema(), cols).expect("columns match the schema")
    }
    fn from_batch(b: &RecordBatch) -> Result<Vec<Self>, SchemaError> {
        let c = Cols {
            table: Self::NAME,
            batch: b,
        };
        let (id, st, step, name, value, time) = (
            c.s("run_id")?,
            c.s("stage")?,
            c.get::<Int64Array>("step")?,
            c.s("name")?,
            c.get::<Float64Array>("value")?,
            c.t("time")?,
        );
        Ok((0..b.num_rows())
            .map(|i| MetricRow {
                run_id: id.value(i).into(),
                stage: st.value(i).into(),
                step: step.value(i),
                name: name.value(i).into(),
                value: value.value(i),
                time: time.value(i),
            })
            .collect())
    }
}

/// `events`: what happened during a run, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    /// Run id.
    pub run_id: String,
    /// When.
    pub time: i64,
    /// The stage, for stage events.
    pub stage: Option<String>,
    /// Event name (`run_started`, `stage_started`, `stage_retry`, ...).
    pub event: String,
    /// Details.
    pub message: String,
}

impl Table for EventRow {
    const NAME: &'static str = "events";
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("run_id", DataType::Utf8, false),
            Field::new("time", ts(), false),
            Field::new("stage", DataType::Utf8, true),
            Field::new("event", DataType::Utf8, false),
            Field::new("message", DataType::Utf8, false),
        ]))
    }
    fn to_batch(rows: &[Self]) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            strs(rows.iter().map(|r| r.run_id.as_str())),
            times(rows.iter().map(|r| Some(r.time))),
            opt_strs(rows.iter().map(|r| r.stage.as_deref())),
            strs(rows.iter().map(|r| r.event.as_str())),
            strs(rows.iter().map(|r| r.message.as_str())),
        ];
        RecordBatch::try_new(Self::schema(), cols).expect("columns match the schema")
    }
    fn from_batch(b: &RecordBatch) -> Result<Vec<Self>, SchemaError> {
        let c = Cols {
            table: Self::NAME,
            batch: b,
        };
        let (id, time, stage, event, msg) = (
            c.s("run_id")?,
            c.t("time")?,
            c.s("stage")?,
            c.s("event")?,
            c.s("message")?,
        );
        Ok((0..b.num_rows())
            .map(|i| EventRow {
                run_id: id.value(i).into(),
                time: time.value(i),
                stage: opt_s(stage, i),
                event: event.value(i).into(),
                message: msg.value(i).into(),
            })
            .collect())
    }
}
