//! What the criterion benches share: the bench-size Llama (hidden 512, intermediate 1408,
//! 8 layers, 8 heads, vocab 8192) with random weights.
#![allow(dead_code)]

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::Criterion;
use taper::model::device::CacheAligned;
use taper::model::Llama;

/// The `taper` binary's global allocator, so that the benches measure its buffers.
#[global_allocator]
static ALLOC: CacheAligned = CacheAligned;

/// The criterion settings of the benches, after the allocator setting the `taper`
/// binary starts with (`keep_freed_buffers`; its global allocator is declared above).
pub fn config() -> Criterion {
    taper::model::device::keep_freed_buffers();
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
}

/// Normal(0, 0.02) f32 values on the CPU.
pub fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 0.02, shape, &Device::Cpu).unwrap()
}

/// A random Llama's sizes ([`write_llama`]).
#[derive(Clone, Copy, Debug)]
pub struct LlamaShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
}

/// The bench-size Llama: hidden 512, intermediate 1408, 8 layers, 8 heads, vocab 8192.
pub const BENCH: LlamaShape = LlamaShape {
    hidden: 512,
    intermediate: 1408,
    layers: 8,
    heads: 8,
    kv_heads: 8,
    vocab: 8192,
};

/// Writes a random-weight Llama of `shape` (untied LM head, f32) to `dir`: `config.json`
/// and `model.safetensors`.
pub fn write_llama(dir: &std::path::Path, shape: LlamaShape) {
    let LlamaShape {
        hidden: h,
        intermediate: i,
        layers,
        heads,
        kv_heads,
        vocab,
    } = shape;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "hidden_act": "silu"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let kv = h / heads * kv_heads;
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("model.embed_tokens.weight".to_string(), randn(&[vocab, h]));
    tensors.insert("lm_head.weight".to_string(), randn(&[vocab, h]));
    let ones = || Tensor::ones(h, DType::F32, &Device::Cpu).unwrap();
    tensors.insert("model.norm.weight".to_string(), ones());
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", [h, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, h]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            tensors.insert(format!("{p}.{name}.weight"), randn(&shape));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.insert(format!("{p}.{norm}.weight"), ones());
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

/// Writes the bench-size random Llama ([`BENCH`]) to `dir` and loads it through the
/// normal path, set up as taper's inference paths set it up.
pub fn bench_llama(dir: &std::path::Path) -> Llama {
    write_llama(dir, BENCH);
    let mut model = taper::model::load_model(dir, DType::F32, &Device::Cpu).unwrap();
    // As taper's inference paths (eval, generate, forward) set it up.
    model.store_for_inference().unwrap();
    model
}
