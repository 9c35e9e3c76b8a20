//! The whole product through the real binary, as a user meets it: one pipeline file,
//! tokenize -> train -> migrate (PEFT, mlx-lm) -> merge, run by `taper run` in a temp
//! workspace; then the ledger (`taper show --json`), the outputs (`taper inspect`,
//! `taper forward`), and a second run that has nothing to do.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const PIPELINE: &str = r#"version: 1
name: e2e
stages:
  tokenize:
    kind: tokenize
    inputs: [data/chat.jsonl, models/base/tokenizer.json]
    outputs: [work/tokens]
    with:
      tokenizer: models/base/tokenizer.json
      source: {path: data/chat.jsonl, format: jsonl}
      field: messages
      seq_len: 64
      split: {valid: 0.15, seed: 3}
  train:
    kind: train
    inputs: [work/tokens, models/base]
    outputs: [work/adapter]
    with:
      base_model: models/base
      data: {train: work/tokens/train, valid: work/tokens/valid}
      lora: {r: 8, alpha: 16, targets: [all-linear]}
      optimizer: {lr: 1e-2}
      schedule: {warmup_steps: 2, decay: cosine, min_lr_ratio: 0.5}
      batch_size: 8
      max_steps: 24
      eval_every: 8
      checkpoint_every: 8
      device: cpu
  to_peft:
    kind: migrate
    inputs: [work/adapter, models/base]
    outputs: [work/peft]
    with: {from: taper, to: peft, base_model: models/base}
  to_mlx:
    kind: migrate
    inputs: [work/adapter, models/base]
    outputs: [work/mlx]
    with: {from: taper, to: mlx, base_model: models/base}
  merge:
    kind: merge
    inputs: [work/adapter, models/base]
    outputs: [work/merged]
    with: {base_model: models/base, adapter: work/adapter}
"#;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A workspace with the pipeline, `models/base` (tiny-llama) and the first 300
/// conversations of the embedded corpus.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("models/base");
    std::fs::create_dir_all(&base).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(repo("tests/fixtures/tiny-llama").join(f), base.join(f)).unwrap();
    }
    let corpus = std::fs::read_to_string(repo("datasets/chat.jsonl")).unwrap();
    let head: String = corpus.lines().take(300).map(|l| format!("{l}\n")).collect();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/chat.jsonl"), head).unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), PIPELINE).unwrap();
    dir
}

fn taper(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_taper"))
        .current_dir(dir)
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .env_remove("TAPER_TRIGGER")
        .env_remove("TAPER_SCHEDULED_FOR")
        .env_remove("TAPER_RUN_TIME")
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    let text = format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(0), "{text}");
    String::from_utf8(o.stdout).unwrap()
}

fn json(o: Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap()
}

fn stage<'a>(show: &'a Value, name: &str) -> &'a Value {
    show["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {show}"))
}

fn series(stage: &Value, metric: &str) -> Vec<(i64, f64)> {
    stage["series"][metric]
        .as_array()
        .unwrap_or_else(|| panic!("no series {metric} in {stage}"))
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

fn logits(path: &Path) -> Vec<f32> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    t["logits"].flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn tokenize_train_migrate_merge_then_nothing_to_do() {
    let ws = workspace();
    let dir = ws.path();
    ok(taper(dir, &["run", "pipeline.yaml"]));

    for f in [
        "work/tokens/manifest.json",
        "work/adapter/adapter.safetensors",
        "work/adapter/adapter_config.json",
        "work/peft/adapter_model.safetensors",
        "work/peft/adapter_config.json",
        "work/mlx/adapters.safetensors",
        "work/mlx/adapter_config.json",
        "work/merged/model.safetensors",
        "work/merged/config.json",
        "work/merged/tokenizer.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} is missing");
    }

    // The ledger: every stage succeeded, and the losses went down.
    let runs = json(taper(dir, &["runs", "--json"]));
    let first = runs[0]["run_id"].as_str().unwrap().to_string();
    let show = json(taper(dir, &["show", &first, "--json"]));
    assert_eq!(show["status"], "success", "{show}");
    for s in ["tokenize", "train", "to_peft", "to_mlx", "merge"] {
        assert_eq!(stage(&show, s)["status"], "success", "{s}: {show}");
    }
    let train = stage(&show, "train");
    let loss = series(train, "train/loss");
    assert_eq!(loss.len(), 24);
    assert_eq!(
        loss.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=24).collect::<Vec<_>>()
    );
    let mean = |s: &[(i64, f64)]| s.iter().map(|p| p.1).sum::<f64>() / s.len() as f64;
    let (early, late) = (mean(&loss[..4]), mean(&loss[20..]));
    assert!(
        early - late > 0.5,
        "train/loss did not fall: {early:.3} -> {late:.3}"
    );
    let eval = series(train, "eval/loss");
    assert_eq!(eval.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 8, 16, 24]);
    assert!(
        eval[0].1 - eval[3].1 > 0.3,
        "eval/loss did not fall: {eval:?}"
    );
    assert_eq!(train["metrics"]["train/loss"], loss[23].1);

    // The merged model loads, and computes what base + adapter compute.
    let inspect = ok(taper(dir, &["inspect", "work/merged"]));
    assert!(inspect.contains("LlamaForCausalLM"), "{inspect}");
    std::fs::write(
        dir.join("ids.json"),
        r#"{"input_ids": [[1, 5, 9, 42, 100, 7]]}"#,
    )
    .unwrap();
    let forward = |extra: &[&str], out: &str| {
        let mut args = vec!["forward", "--input-ids", "ids.json", "--out", out];
        args.extend_from_slice(extra);
        ok(taper(dir, &args));
        logits(&dir.join(out))
    };
    let merged = forward(&["--model", "work/merged"], "merged.safetensors");
    for adapter in ["work/adapter", "work/peft", "work/mlx"] {
        let unmerged = forward(
            &["--model", "models/base", "--adapter", adapter],
            "unmerged.safetensors",
        );
        let diff = merged
            .iter()
            .zip(&unmerged)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{adapter}: max |merged - unmerged| = {diff}");
    }
    let base = forward(&["--model", "models/base"], "base.safetensors");
    assert_ne!(base, merged, "the adapter changed nothing");

    // A second run finds everything up to date.
    let again = ok(taper(dir, &["run", "pipeline.yaml"]));
    let show = json(taper(dir, &["show", "--json"]));
    assert_ne!(show["run_id"], first.as_str());
    for s in ["tokenize", "train", "to_peft", "to_mlx", "merge"] {
        assert_eq!(stage(&show, s)["status"], "skipped", "{s}: {show}\n{again}");
    }
}
