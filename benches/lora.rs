//! Benchmarks of the model math: LoRA linear forward (size and rank scaling), the
//! differentiable softmax, RMSNorm and layer norm against candle's fused kernels,
//! forward+backward of a LoRA layer with the frozen-linear op against a plain matmul, and the forward of a
//! small Llama built from random weights. Sample sizes are small; run with
//! `cargo bench --bench lora`. `benches/lora_torch.py` times the same shapes in PyTorch.

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use taper::model::attention::softmax_last_dim;
use taper::model::frozen::FrozenLinear;
use taper::model::fused;
use taper::model::fused_cpu;
use taper::model::lora::{LoraBranch, LoraLinear};
use taper::model::mask::attention_bias;
use taper::model::norm::RmsNorm;

mod util;

use util::{bench_llama, randn};

const BATCH: usize = 4;
const SEQ: usize = 128;

/// A `d x d` LoRA linear of rank `r`. With `trainable`, A and B are variables and the base
/// weight keeps the layout training uses; otherwise the layer is set up as taper's
/// inference paths (eval, generate) set it up, its weight packed or transposed
/// (`FrozenLinear::store_for_inference`).
fn lora_layer(d: usize, r: usize, trainable: bool) -> (LoraLinear, Vec<Var>) {
    let mut layer = LoraLinear::new("bench", FrozenLinear::new(randn(&[d, d]), None));
    if !trainable {
        layer.store_for_inference().unwrap();
    }
    let (a, b) = (randn(&[r, d]), randn(&[d, r]));
    let vars = if trainable {
        vec![Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap()]
    } else {
        vec![]
    };
    let (a, b) = match vars.as_slice() {
        [va, vb] => (va.as_tensor().clone(), vb.as_tensor().clone()),
        _ => (a, b),
    };
    let branch = LoraBranch {
        a,
        b,
        scale: 2.0,
        dropout: 0.0,
    };
    layer.set_lora(Some(branch)).unwrap();
    (layer, vars)
}

fn lora_forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("lora_forward");
    for d in [512, 2048] {
        let x = randn(&[BATCH, SEQ, d]);
        let (layer, _) = lora_layer(d, 16, false);
        group.bench_with_input(BenchmarkId::new("r16", d), &d, |bench, _| {
            bench.iter(|| layer.forward_t(&x, false).unwrap())
        });
    }
    group.finish();
}

fn lora_rank_scaling(c: &mut Criterion) {
    let mut group = c.benchmark_group("lora_rank_d2048");
    let x = randn(&[BATCH, SEQ, 2048]);
    for r in [8, 16, 32, 64] {
        let (layer, _) = lora_layer(2048, r, false);
        group.bench_with_input(BenchmarkId::from_parameter(r), &r, |bench, _| {
            bench.iter(|| layer.forward_t(&x, false).unwrap())
        });
    }
    group.finish();
}

fn softmax(c: &mut Criterion) {
    let mut group = c.benchmark_group("softmax_1024x1024");
    let x = randn(&[1024, 1024]);
    group.bench_function("taper_differentiable", |b| {
        b.iter(|| softmax_last_dim(&x).unwrap())
    });
    group.bench_function("candle_fused_no_backward", |b| {
        b.iter(|| candle_nn::ops::softmax_last_dim(&x).unwrap())
    });
    group.finish();
}

fn rms_norm(c: &mut Criterion) {
    let mut group = c.benchmark_group("rms_norm_4x128x2048");
    let x = randn(&[BATCH, SEQ, 2048]);
    let w = randn(&[2048]);
    let norm = RmsNorm::new(w.clone(), 1e-5);
    group.bench_function("taper_differentiable", |b| {
        b.iter(|| norm.forward_t(&x, false).unwrap())
    });
    group.bench_function("candle_fused_no_backward", |b| {
        b.iter(|| candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap())
    });
    group.finish();
}

fn layer_norm(c: &mut Criterion) {
    // Not used by Llama or Qwen2 (they use RMSNorm); here to compare with the seed's suite.
    let mut group = c.benchmark_group("layer_norm_4x128x2048");
    let x = randn(&[BATCH, SEQ, 2048]);
    let (w, b) = (randn(&[2048]), randn(&[2048]));
    group.bench_function("taper_differentiable", |bench| {
        bench.iter(|| fused::layer_norm(&x, &w, &b, 1e-5).unwrap())
    });
    group.bench_function("candle_fused_no_backward", |bench| {
        bench.iter(|| candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap())
    });
    group.finish();
}

fn lora_forward_backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("lora_fwd_bwd_d2048_r16");
    // The input needs a gradient, as in any block below another adapted one; otherwise
    // backprop never enters the base product and both variants do the same work.
    let x = Var::from_tensor(&randn(&[BATCH, SEQ, 2048])).unwrap();
    let x = x.as_tensor();
    let (layer, vars) = lora_layer(2048, 16, true);
    // The layer as taper runs it: on the CPU in f32 one fused op (`fused::lora_linear`),
    // whose backward skips the frozen weight's gradient as the frozen-linear op does.
    group.bench_function("frozen_op", |b| {
        b.iter(|| {
            let grads = layer
                .forward_t(x, true)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(grads.get(x).is_some() && grads.get(layer.base().weight().unwrap()).is_none());
        })
    });
    // The same layer with the base through candle's matmul: backprop also computes the
    // base-weight gradient nobody uses.
    let w = layer.base().weight().unwrap().clone();
    let (a, bm) = (vars[0].as_tensor().clone(), vars[1].as_tensor().clone());
    group.bench_function("plain_matmul", |b| {
        b.iter(|| {
            let base = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let delta = x
                .broadcast_matmul(&a.t().unwrap())
                .unwrap()
                .broadcast_matmul(&bm.t().unwrap())
                .unwrap();
            let y = (base + (delta * 2.0).unwrap()).unwrap();
            let grads = y.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(x).is_some());
        })
    });
    group.finish();
}

/// Causal attention through the CPU kernels at the eval bench's shape (batch 4, 8 heads,
/// 256 positions, head dim 64): the forward, and the backward given an output gradient.
fn attention(c: &mut Criterion) {
    let shape = [BATCH, 8, 256, 64];
    let (q, k, v, dout) = (randn(&shape), randn(&shape), randn(&shape), randn(&shape));
    let bias = attention_bias(BATCH, 256, None, DType::F32, &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("attention_causal_4x8x256");
    group.bench_function("forward", |b| {
        b.iter(|| fused_cpu::attention_forward(&q, &k, &v, Some(&bias), 0.125).unwrap())
    });
    group.bench_function("backward", |b| {
        b.iter(|| fused_cpu::attention_backward(&q, &k, &v, Some(&bias), &dout, 0.125).unwrap())
    });
    group.finish();
}

fn model_forward(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let model = bench_llama(dir.path());
    let ids: Vec<u32> = (0..SEQ as u32).map(|t| (t * 37) % 8192).collect();
    let ids = Tensor::from_vec(ids, (1, SEQ), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("llama_h512_l8_forward");
    group.bench_function("1x128", |b| {
        b.iter(|| model.forward(&ids, None, false).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = util::config();
    targets = lora_forward, lora_rank_scaling, softmax, rms_norm, layer_norm, lora_forward_backward, attention, model_forward
}
criterion_main!(benches);
