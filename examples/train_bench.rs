//! Drives taper's train stage on a random-weight Llama of the benchmark size (hidden 512,
//! intermediate 1408, 8 layers, 8 heads, vocab 8192), LoRA r 8 on q,v, batch 4 × 256,
//! and prints training tokens/s. Used by `benches/train_compare.sh`.
//!
//! `cargo run --example train_bench -- [steps]` (set RAYON_NUM_THREADS for threads).

use std::path::Path;
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, BooleanArray, ListArray, RecordBatch, UInt32Array, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::{DType, Device, Tensor};
use taper::stages::{configure, CancelToken, StageContext, StageEvent};

const HIDDEN: usize = 512;
const INTER: usize = 1408;
const LAYERS: usize = 8;
const VOCAB: usize = 8192;
const SEQ: usize = 256;
const BATCH: usize = 4;

fn write_model(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": false, "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let dev = Device::Cpu;
    let rand = |shape: (usize, usize)| Tensor::randn(0f32, 0.02, shape, &dev);
    let mut t = std::collections::HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        rand((VOCAB, HIDDEN))?,
    );
    t.insert("lm_head.weight".to_string(), rand((VOCAB, HIDDEN))?);
    t.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(HIDDEN, DType::F32, &dev)?,
    );
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            t.insert(format!("{p}.self_attn.{m}.weight"), rand((HIDDEN, HIDDEN))?);
        }
        t.insert(format!("{p}.mlp.gate_proj.weight"), rand((INTER, HIDDEN))?);
        t.insert(format!("{p}.mlp.up_proj.weight"), rand((INTER, HIDDEN))?);
        t.insert(format!("{p}.mlp.down_proj.weight"), rand((HIDDEN, INTER))?);
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(
                format!("{p}.{n}.weight"),
                Tensor::ones(HIDDEN, DType::F32, &dev)?,
            );
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}

fn write_tokens(path: &Path, rows: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap_or(path))?;
    let item = |t| Arc::new(Field::new("item", t, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("input_ids", DataType::List(item(DataType::UInt32)), false),
        Field::new("loss_mask", DataType::List(item(DataType::Boolean)), false),
        Field::new("example_id", DataType::UInt64, false),
    ]));
    let mut x = 1u64;
    let ids: Vec<u32> = (0..rows * SEQ)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % VOCAB as u64) as u32
        })
        .collect();
    let offsets = OffsetBuffer::<i32>::from_lengths(std::iter::repeat_n(SEQ, rows));
    let list = |t: DataType, v: ArrayRef| -> anyhow::Result<ArrayRef> {
        Ok(Arc::new(ListArray::try_new(
            item(t),
            offsets.clone(),
            v,
            None,
        )?))
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            list(DataType::UInt32, Arc::new(UInt32Array::from(ids)))?,
            list(
                DataType::Boolean,
                Arc::new(BooleanArray::from(vec![true; rows * SEQ])),
            )?,
            Arc::new(UInt64Array::from_iter_values(0..rows as u64)),
        ],
    )?;
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path)?, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let steps: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10);
    let ws = tempfile::tempdir()?;
    write_model(&ws.path().join("models/base"))?;
    write_tokens(
        &ws.path().join("tokens/train/part-00000.parquet"),
        steps as usize * BATCH,
    )?;
    let yaml = format!(
        "version: 1\nname: bench\nstages:\n  train:\n    kind: train\n    outputs: [adapters/run]\n    with:\n      \
         base_model: models/base\n      data: {{train: tokens/train}}\n      \
         lora: {{r: 8, alpha: 16, targets: [q_proj, v_proj]}}\n      \
         batch_size: {BATCH}\n      max_steps: {steps}\n      checkpoint_every: 0\n      device: cpu\n"
    );
    let file = Path::new("bench.yaml");
    let pipeline = taper::spec::load_str(file, &yaml, &[]).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let stage = pipeline
        .stage("train")
        .ok_or_else(|| anyhow::anyhow!("no stage"))?
        .clone();
    let cfg = configure(file, &stage).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let rates = Mutex::new(Vec::new());
    let events = |e: StageEvent| {
        if let StageEvent::Metric { name, value, .. } = e {
            if name == "train/tokens_per_s" {
                rates.lock().map(|mut r| r.push(value)).ok();
            }
        }
    };
    let staging = ws.path().join(".staging");
    std::fs::create_dir_all(&staging)?;
    let cancel = CancelToken::new();
    let ctx = StageContext {
        run_id: "bench",
        stage: &stage,
        workspace: ws.path(),
        staging: &staging,
        attempt: 1,
        cancel: &cancel,
        deadline: None,
        log_file: staging.join("log.txt"),
        events: &events,
    };
    cfg.run(&ctx).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rates = rates
        .into_inner()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    // The first step warms caches and allocators; report the rest.
    let rest = &rates[1.min(rates.len())..];
    let mean = rest.iter().sum::<f64>() / rest.len().max(1) as f64;
    println!(
        "taper tokens/s {mean:.1} over {} steps (batch {BATCH} x {SEQ})",
        rest.len()
    );
    Ok(())
}
