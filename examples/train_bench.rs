//! Drives taper's train stage on a random-weight Llama and prints training tokens/s.
//! Used by `benches/train_compare.sh` (CPU) and `benches/train_compare_gpu.sh` (CUDA).
//!
//! `cargo run --example train_bench -- [steps] [--size bench|gpu] [--device cpu|cuda] [--dtype f32|bf16] [--batch B] [--seq S] [--frozen-weights fast|compact]`
//!
//! - `bench`: hidden 512, intermediate 1408, 8 layers, 8 heads, vocab 8192, batch 4 × 256.
//! - `gpu`: hidden 2048, intermediate 5632, 16 layers, 32 heads (4 key/value heads),
//!   vocab 32000, batch 8 × 1024: a model that fills a GPU.
//!
//! LoRA r 8, alpha 16 on q,v, no dropout. Set RAYON_NUM_THREADS for the CPU threads.

use std::path::Path;
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, BooleanArray, ListArray, RecordBatch, UInt32Array, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::{DType, Device, Tensor};
use taper::stages::{configure, CancelToken, StageContext, StageEvent};

/// The `taper` binary's global allocator (`CacheAligned`).
#[global_allocator]
static ALLOC: taper::model::device::CacheAligned = taper::model::device::CacheAligned;

/// The shape of the benchmark model and batch.
#[derive(Clone, Copy)]
struct Size {
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    seq: usize,
    batch: usize,
}

const BENCH: Size = Size {
    hidden: 512,
    inter: 1408,
    layers: 8,
    heads: 8,
    kv_heads: 8,
    vocab: 8192,
    seq: 256,
    batch: 4,
};

const GPU: Size = Size {
    hidden: 2048,
    inter: 5632,
    layers: 16,
    heads: 32,
    kv_heads: 4,
    vocab: 32000,
    seq: 1024,
    batch: 8,
};

fn write_model(dir: &Path, z: Size, dev: &Device) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": z.hidden, "intermediate_size": z.inter, "num_hidden_layers": z.layers,
        "num_attention_heads": z.heads, "num_key_value_heads": z.kv_heads,
        "vocab_size": z.vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    // Stored as bf16 (half the bytes to write for the large size); loaded in the compute dtype.
    let rand = |rows: usize, cols: usize| {
        Tensor::randn(0f32, 0.02, (rows, cols), dev)?.to_dtype(DType::BF16)
    };
    let ones = || Tensor::ones(z.hidden, DType::BF16, dev);
    let mut t = std::collections::HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        rand(z.vocab, z.hidden)?,
    );
    t.insert("lm_head.weight".to_string(), rand(z.vocab, z.hidden)?);
    t.insert("model.norm.weight".to_string(), ones()?);
    let kv = z.hidden / z.heads * z.kv_heads;
    for i in 0..z.layers {
        let p = format!("model.layers.{i}");
        for (m, out) in [
            ("q_proj", z.hidden),
            ("k_proj", kv),
            ("v_proj", kv),
            ("o_proj", z.hidden),
        ] {
            t.insert(format!("{p}.self_attn.{m}.weight"), rand(out, z.hidden)?);
        }
        t.insert(
            format!("{p}.mlp.gate_proj.weight"),
            rand(z.inter, z.hidden)?,
        );
        t.insert(format!("{p}.mlp.up_proj.weight"), rand(z.inter, z.hidden)?);
        t.insert(
            format!("{p}.mlp.down_proj.weight"),
            rand(z.hidden, z.inter)?,
        );
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{n}.weight"), ones()?);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}

fn write_tokens(path: &Path, rows: usize, z: Size) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap_or(path))?;
    let item = |t| Arc::new(Field::new("item", t, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("input_ids", DataType::List(item(DataType::UInt32)), false),
        Field::new("loss_mask", DataType::List(item(DataType::Boolean)), false),
        Field::new("example_id", DataType::UInt64, false),
    ]));
    let mut x = 1u64;
    let ids: Vec<u32> = (0..rows * z.seq)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % z.vocab as u64) as u32
        })
        .collect();
    let offsets = OffsetBuffer::<i32>::from_lengths(std::iter::repeat_n(z.seq, rows));
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
                Arc::new(BooleanArray::from(vec![true; rows * z.seq])),
            )?,
            Arc::new(UInt64Array::from_iter_values(0..rows as u64)),
        ],
    )?;
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path)?, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}

/// The value after `name` on the command line, if any.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    taper::model::device::keep_freed_buffers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: u64 = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10);
    let z = match flag(&args, "--size").as_deref() {
        None | Some("bench") => BENCH,
        Some("gpu") => GPU,
        Some(other) => anyhow::bail!("--size {other}: expected bench or gpu"),
    };
    let mut z = z;
    if let Some(b) = flag(&args, "--batch") {
        z.batch = b.parse()?;
    }
    if let Some(s) = flag(&args, "--seq") {
        z.seq = s.parse()?;
    }
    let device = flag(&args, "--device").unwrap_or_else(|| "cpu".into());
    let dtype = flag(&args, "--dtype").unwrap_or_else(|| "f32".into());
    let frozen = flag(&args, "--frozen-weights").unwrap_or_else(|| "fast".into());
    let ws = tempfile::tempdir()?;
    // Random weights are drawn on the benchmark's device (fast on a GPU for the large size).
    let choice: taper::model::DeviceChoice =
        device.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let dev = choice.open()?;
    write_model(&ws.path().join("models/base"), z, &dev)?;
    write_tokens(
        &ws.path().join("tokens/train/part-00000.parquet"),
        steps as usize * z.batch,
        z,
    )?;
    let batch = z.batch;
    let yaml = format!(
        "version: 1\nname: bench\nstages:\n  train:\n    kind: train\n    outputs: [adapters/run]\n    with:\n      \
         base_model: models/base\n      data: {{train: tokens/train}}\n      \
         lora: {{r: 8, alpha: 16, targets: [q_proj, v_proj]}}\n      \
         batch_size: {batch}\n      max_steps: {steps}\n      checkpoint_every: 0\n      \
         device: {device}\n      dtype: {dtype}\n      frozen_weights: {frozen}\n"
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
    // The fastest step too: on a shared machine, interference only ever slows a step.
    let fastest = rest.iter().copied().fold(0.0, f64::max);
    println!(
        "taper tokens/s {mean:.1} over {} steps (batch {} x {}, {device}, {dtype}, frozen_weights {frozen}); fastest step {fastest:.1}",
        rest.len(),
        z.batch,
        z.seq
    );
    Ok(())
}
