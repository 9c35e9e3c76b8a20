//! The eval stage: its loss equals PyTorch's on the fixture batch (adapter and base),
//! masks and batching behave, and in a pipeline a failed gate stops the run with exit
//! code 5 before any downstream stage, while a passing one publishes the report.

mod model_util;

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, ListArray, RecordBatch, UInt32Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::{DType, Device, D};
use model_util::{expected, fixture, input_ids};
use parquet::arrow::ArrowWriter;
use taper::formats::read_adapter;
use taper::model::{attach_adapter, load_model, Llama};
use taper::stages::eval::{read_rows, score, Row, Score};

/// Writes `rows` as a token shard the way the tokenize stage lays it out.
fn write_shard(path: &Path, rows: &[Row]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let item = |t| Arc::new(Field::new("item", t, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("input_ids", DataType::List(item(DataType::UInt32)), false),
        Field::new("loss_mask", DataType::List(item(DataType::Boolean)), false),
    ]));
    let lens = rows.iter().map(|r| r.input_ids.len());
    let ids = ListArray::new(
        item(DataType::UInt32),
        OffsetBuffer::from_lengths(lens.clone()),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().flat_map(|r| r.input_ids.iter().copied()),
        )),
        None,
    );
    let mask = ListArray::new(
        item(DataType::Boolean),
        OffsetBuffer::from_lengths(lens),
        Arc::new(BooleanArray::from_iter(
            rows.iter()
                .flat_map(|r| r.loss_mask.iter().map(|&m| Some(m))),
        )),
        None,
    );
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(ids) as ArrayRef, Arc::new(mask) as ArrayRef],
    )
    .unwrap();
    let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// The fixture batch, every target counted.
fn fixture_rows() -> Vec<Row> {
    input_ids()
        .into_iter()
        .map(|ids| Row {
            loss_mask: vec![true; ids.len()],
            input_ids: ids,
        })
        .collect()
}

fn model(adapter: bool) -> Llama {
    let mut m = load_model(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    if adapter {
        let a = read_adapter(&fixture("peft-adapter-llama")).unwrap();
        attach_adapter(&mut m, &a, None).unwrap();
    }
    m
}

fn score_of(m: &Llama, rows: &[Row], batch: usize) -> Score {
    score::<()>(m, rows, batch, |_| Ok(())).unwrap()
}

/// The loss PyTorch computed for tiny-llama + peft-adapter-llama (file metadata).
fn pytorch_adapter_loss() -> f64 {
    let bytes = std::fs::read(fixture("expected/grads_llama.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().as_ref().unwrap()["loss"].parse().unwrap()
}

/// Mean next-token cross-entropy of transformers' base logits, computed here.
fn reference_base_loss() -> f64 {
    let logits = expected("logits_llama.safetensors", "base")
        .to_dtype(DType::F64)
        .unwrap();
    let ids = input_ids();
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let lsm = lsm.to_vec3::<f64>().unwrap();
    let (mut sum, mut n) = (0.0, 0);
    for (b, row) in ids.iter().enumerate() {
        for t in 1..row.len() {
            sum -= lsm[b][t - 1][row[t] as usize];
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn adapter_and_base_losses_equal_pytorch_on_the_fixture_batch() {
    let dir = tempfile::tempdir().unwrap();
    write_shard(&dir.path().join("part-00000.parquet"), &fixture_rows());
    let rows = read_rows(dir.path()).unwrap();
    assert_eq!(rows, fixture_rows());

    let adapted = score_of(&model(true), &rows, 2);
    let want = pytorch_adapter_loss();
    eprintln!("adapter loss {} vs pytorch {want}", adapted.loss);
    assert!(
        (adapted.loss - want).abs() < 1e-5 * want,
        "{} vs {want}",
        adapted.loss
    );
    assert!((adapted.perplexity - want.exp()).abs() < 1e-5 * want.exp());
    assert_eq!((adapted.tokens, adapted.rows), (30, 2));

    let base = score_of(&model(false), &rows, 2);
    let want = reference_base_loss();
    eprintln!("base loss {} vs transformers logits {want}", base.loss);
    assert!(
        (base.loss - want).abs() < 1e-5 * want,
        "{} vs {want}",
        base.loss
    );
    assert!((base.perplexity - want.exp()).abs() < 1e-5 * want.exp());
    assert!(adapted.loss != base.loss);
}

#[test]
fn masks_padding_and_batch_size_do_not_change_what_is_counted() {
    let m = model(true);
    let full = fixture_rows();
    // Row 1 shortened to 9 tokens (padding in a batch of 2), half its targets masked.
    let mut rows = full.clone();
    rows[1].input_ids.truncate(9);
    rows[1].loss_mask = (0..9).map(|i| i % 2 == 0).collect();
    let one_by_one: Vec<Score> = rows
        .iter()
        .map(|r| score_of(&m, std::slice::from_ref(r), 1))
        .collect();
    let want = (one_by_one[0].loss * 15.0 + one_by_one[1].loss * 4.0) / 19.0;
    let batched = score_of(&m, &rows, 2);
    assert_eq!(batched.tokens, 19);
    assert!(
        (batched.loss - want).abs() < 1e-6,
        "{} vs {want}",
        batched.loss
    );
    // A row with no target does not count; a bad id is an error, not a panic.
    let mut with_empty = rows.clone();
    with_empty.push(Row {
        input_ids: vec![5],
        loss_mask: vec![true],
    });
    assert_eq!(score_of(&m, &with_empty, 3).rows, 2);
    let bad = vec![Row {
        input_ids: vec![1, 9999],
        loss_mask: vec![true, true],
    }];
    let err = score::<()>(&m, &bad, 1, |_| Ok(())).unwrap_err();
    assert!(format!("{err:?}").contains("9999"));
}

// ---- pipelines driving the binary ------------------------------------------------

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A workspace with the base model, the adapter, one validation shard and prompts.
fn workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    let p = ws.path();
    copy_dir(&fixture("tiny-llama"), &p.join("models/base"));
    copy_dir(&fixture("peft-adapter-llama"), &p.join("adapters/run"));
    write_shard(&p.join("tokens/valid/part-00000.parquet"), &fixture_rows());
    std::fs::write(p.join("prompts.txt"), "Permission is\n\nfree of charge\n").unwrap();
    ws
}

fn pipeline(gates: &str) -> String {
    format!(
        r#"version: 1
name: eval-gate
stages:
  eval:
    kind: eval
    inputs: [models/base, adapters/run, tokens/valid, prompts.txt]
    outputs: [reports/eval.json]
    with:
      base_model: models/base
      adapter: adapters/run
      data: tokens/valid
      compare_base: true
      device: cpu
      batch_size: 2
      samples: {{prompts: prompts.txt, max_new_tokens: 6, temperature: 0.7, top_p: 0.9, seed: 1}}
      gates:
{gates}
  ship:
    kind: command
    inputs: [reports/eval.json]
    outputs: [shipped.txt]
    with: {{run: "echo shipped > shipped.txt"}}
"#
    )
}

fn run(ws: &Path, yaml: &str) -> std::process::Output {
    std::fs::write(ws.join("pipeline.yaml"), yaml).unwrap();
    Command::new(env!("CARGO_BIN_EXE_taper"))
        .current_dir(ws)
        .args(["run", "pipeline.yaml"])
        .output()
        .unwrap()
}

fn ledger_metrics(ws: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_taper"))
        .arg("-C")
        .arg(ws)
        .args(["show", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stages = v["stages"].as_array().unwrap();
    let eval = stages.iter().find(|s| s["stage"] == "eval").unwrap();
    eval["metrics"].clone()
}

#[test]
fn a_failed_gate_stops_the_pipeline_with_exit_code_5() {
    let ws = workspace();
    let out = run(ws.path(), &pipeline("        perplexity: {max: 1.5}"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(5), "{all}");
    assert!(all.contains("> max 1.5"), "{all}");
    assert!(all.contains("perplexity"), "{all}");
    assert!(
        !ws.path().join("shipped.txt").exists(),
        "downstream stage ran"
    );
    assert!(!ws.path().join("reports/eval.json").exists());
    // The metrics reached the ledger anyway.
    let m = ledger_metrics(ws.path());
    let loss = m["eval/loss"].as_f64().unwrap();
    assert!((loss - pytorch_adapter_loss()).abs() < 1e-4, "{m}");
}

#[test]
fn passing_gates_publish_the_report_and_downstream_runs() {
    let ws = workspace();
    let gates = "        perplexity: {max: 1000000}\n        improvement_over_base: {min: -1}";
    let out = run(ws.path(), &pipeline(gates));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ws.path().join("shipped.txt").exists());
    let text = std::fs::read_to_string(ws.path().join("reports/eval.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let loss = r["eval"]["loss"].as_f64().unwrap();
    assert!((loss - pytorch_adapter_loss()).abs() < 1e-4 * loss);
    let base = r["base"]["loss"].as_f64().unwrap();
    assert!((base - reference_base_loss()).abs() < 1e-4 * base);
    let imp = r["improvement_over_base"].as_f64().unwrap();
    assert!((imp - (base - loss) / base).abs() < 1e-12);
    assert_eq!(r["eval"]["tokens"], 30);
    assert_eq!(r["gates"].as_array().unwrap().len(), 2);
    assert_eq!(r["passed"], true);
    let samples = r["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[1]["prompt"], "free of charge");
    assert!(samples[0]["tokens"].as_u64().unwrap() <= 6);
    // With compare_base, the base alone answers the same prompts.
    let base_samples = r["base_samples"].as_array().unwrap();
    assert_eq!(base_samples.len(), 2);
    assert_eq!(base_samples[1]["prompt"], "free of charge");
    assert!(base_samples[0]["tokens"].as_u64().unwrap() <= 6);
    // Keys are sorted at every level.
    let top: Vec<&String> = r.as_object().unwrap().keys().collect();
    let mut sorted = top.clone();
    sorted.sort();
    assert_eq!(top, sorted);
    let m = ledger_metrics(ws.path());
    for key in [
        "eval/loss",
        "eval/perplexity",
        "eval/base_loss",
        "eval/base_perplexity",
        "eval/improvement",
        "eval/tokens",
    ] {
        assert!(m.get(key).is_some(), "{key} missing from {m}");
    }
    // The same inputs and seed give the same report, byte for byte.
    let again = run(
        ws.path(),
        &pipeline(gates).replace("batch_size: 2", "batch_size: 1"),
    );
    assert_eq!(again.status.code(), Some(0));
    let text2 = std::fs::read_to_string(ws.path().join("reports/eval.json")).unwrap();
    let r2: serde_json::Value = serde_json::from_str(&text2).unwrap();
    assert_eq!(r["samples"], r2["samples"]);
    assert_eq!(r["base_samples"], r2["base_samples"]);
}

#[test]
fn bad_eval_configuration_is_reported_before_anything_runs() {
    let ws = workspace();
    let yaml = pipeline("        improvment_over_base: {min: 0.1}");
    let out = run(ws.path(), &yaml);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("improvement_over_base"), "{err}");
    let yaml = pipeline("        perplexity: {max: 5}")
        .replace("compare_base: true", "compare_base: false")
        .replace("perplexity: {max: 5}", "base_loss: {max: 5}");
    let out = run(ws.path(), &yaml);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("compare_base"), "{err}");
}
