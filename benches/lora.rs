//! Benchmarks of the model math: LoRA linear forward (size and rank scaling), the
//! differentiable softmax, RMSNorm and layer norm against candle's fused kernels,
//! forward+backward of a LoRA layer with the frozen-linear op against a plain matmul, and the forward of a
//! small Llama built from random weights. Sample sizes are small; run with
//! `cargo bench --bench lora`. `benches/lora_torch.py` times the same shapes in PyTorch.
//!
//! With `TAPER_BENCH_TURNS=1` in its environment the binary runs no criterion bench: it
//! reads `CASE SECONDS` lines on stdin and answers each with `CASE MS`, the fastest
//! mean time per call over windows of about 0.1 s run for SECONDS (taper's side of
//! `benches/lora_compare.py --turns`, which keeps both sides' processes alive and
//! alternates them a second at a time). Its cases are taper's routines of the criterion
//! benches below, set up once by [`routine`].

use std::collections::HashMap;
use std::hint::black_box;
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use criterion::{criterion_group, BenchmarkId, Criterion};
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
/// weight is set up as the train stage sets it up (`FrozenLinear::store_for_training`);
/// otherwise the layer is set up as taper's
/// inference paths (eval, generate) set it up, its weight packed or transposed
/// (`FrozenLinear::store_for_inference`).
fn lora_layer(d: usize, r: usize, trainable: bool) -> (LoraLinear, Vec<Var>) {
    let mut layer = LoraLinear::new("bench", FrozenLinear::new(randn(&[d, d]), None));
    if trainable {
        layer.store_for_training().unwrap();
    } else {
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

/// One call of a case, set up (its result dropped inside the call, as criterion's
/// `iter` drops it inside the timing).
type Routine = Box<dyn FnMut()>;

/// taper's routine of the criterion bench `id`, set up: the cases `lora_compare.py`
/// pairs with PyTorch's. `None` for any other id.
fn routine(id: &str) -> Option<Routine> {
    let parts: Vec<&str> = id.split('/').collect();
    let lora = |d: usize, r: usize| -> Routine {
        let x = randn(&[BATCH, SEQ, d]);
        let (layer, _) = lora_layer(d, r, false);
        Box::new(move || drop(black_box(layer.forward_t(&x, false).unwrap())))
    };
    Some(match parts.as_slice() {
        ["lora_forward", "r16", d] => lora(d.parse().ok()?, 16),
        ["lora_rank_d2048", r] => lora(2048, r.parse().ok()?),
        ["softmax_1024x1024", "taper_differentiable"] => {
            let x = randn(&[1024, 1024]);
            Box::new(move || drop(black_box(softmax_last_dim(&x).unwrap())))
        }
        ["rms_norm_4x128x2048", "taper_differentiable"] => {
            let norm = RmsNorm::new(randn(&[2048]), 1e-5);
            let x = randn(&[BATCH, SEQ, 2048]);
            Box::new(move || drop(black_box(norm.forward_t(&x, false).unwrap())))
        }
        ["layer_norm_4x128x2048", "taper_differentiable"] => {
            // Not used by Llama or Qwen2 (they use RMSNorm); here to compare with the
            // seed's suite.
            let x = randn(&[BATCH, SEQ, 2048]);
            let (w, b) = (randn(&[2048]), randn(&[2048]));
            Box::new(move || drop(black_box(fused::layer_norm(&x, &w, &b, 1e-5).unwrap())))
        }
        ["lora_fwd_bwd_d2048_r16", "frozen_op"] => {
            // The input needs a gradient, as in any block below another adapted one;
            // otherwise backprop never enters the base product. The layer as taper runs
            // it: on the CPU in f32 one fused op (`fused::lora_linear`), whose backward
            // skips the frozen weight's gradient as the frozen-linear op does.
            let x = Var::from_tensor(&randn(&[BATCH, SEQ, 2048])).unwrap();
            let (layer, _vars) = lora_layer(2048, 16, true);
            Box::new(move || {
                let x = x.as_tensor();
                let out = layer.forward_t(x, true).unwrap();
                let grads = out.sum_all().unwrap().backward().unwrap();
                assert!(grads.get(x).is_some());
                // Packed for training (panels) there is no weight tensor in the graph.
                if let Some(w) = layer.base().weight() {
                    assert!(grads.get(w).is_none());
                }
            })
        }
        ["llama_h512_l8_forward", "1x128"] => {
            let dir = tempfile::tempdir().unwrap();
            let model = bench_llama(dir.path());
            let ids: Vec<u32> = (0..SEQ as u32).map(|t| (t * 37) % 8192).collect();
            let ids = Tensor::from_vec(ids, (1, SEQ), &Device::Cpu).unwrap();
            Box::new(move || {
                let _dir = &dir;
                drop(black_box(model.forward(&ids, None, false).unwrap()))
            })
        }
        _ => return None,
    })
}

/// Benches taper's routine of `group/name` in `group`.
fn bench_routine<M: criterion::measurement::Measurement>(
    group: &mut criterion::BenchmarkGroup<M>,
    id: BenchmarkId,
    full: &str,
) {
    let mut run = routine(full).unwrap_or_else(|| panic!("no routine for {full}"));
    group.bench_function(id, |b| b.iter(&mut run));
}

fn lora_forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("lora_forward");
    for d in [512, 2048] {
        let full = format!("lora_forward/r16/{d}");
        bench_routine(&mut group, BenchmarkId::new("r16", d), &full);
    }
    group.finish();
}

fn lora_rank_scaling(c: &mut Criterion) {
    let mut group = c.benchmark_group("lora_rank_d2048");
    for r in [8, 16, 32, 64] {
        let full = format!("lora_rank_d2048/{r}");
        bench_routine(&mut group, BenchmarkId::from_parameter(r), &full);
    }
    group.finish();
}

fn softmax(c: &mut Criterion) {
    let mut group = c.benchmark_group("softmax_1024x1024");
    let x = randn(&[1024, 1024]);
    let id = BenchmarkId::from_parameter("taper_differentiable");
    bench_routine(&mut group, id, "softmax_1024x1024/taper_differentiable");
    group.bench_function("candle_fused_no_backward", |b| {
        b.iter(|| candle_nn::ops::softmax_last_dim(&x).unwrap())
    });
    group.finish();
}

fn rms_norm(c: &mut Criterion) {
    let mut group = c.benchmark_group("rms_norm_4x128x2048");
    let x = randn(&[BATCH, SEQ, 2048]);
    let w = randn(&[2048]);
    let id = BenchmarkId::from_parameter("taper_differentiable");
    bench_routine(&mut group, id, "rms_norm_4x128x2048/taper_differentiable");
    group.bench_function("candle_fused_no_backward", |b| {
        b.iter(|| candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap())
    });
    group.finish();
}

fn layer_norm(c: &mut Criterion) {
    let mut group = c.benchmark_group("layer_norm_4x128x2048");
    let x = randn(&[BATCH, SEQ, 2048]);
    let (w, b) = (randn(&[2048]), randn(&[2048]));
    let id = BenchmarkId::from_parameter("taper_differentiable");
    bench_routine(&mut group, id, "layer_norm_4x128x2048/taper_differentiable");
    group.bench_function("candle_fused_no_backward", |bench| {
        bench.iter(|| candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap())
    });
    group.finish();
}

fn lora_forward_backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("lora_fwd_bwd_d2048_r16");
    let id = BenchmarkId::from_parameter("frozen_op");
    bench_routine(&mut group, id, "lora_fwd_bwd_d2048_r16/frozen_op");
    // The same shapes with the base through candle's matmul: backprop also computes the
    // base-weight gradient nobody uses.
    let x = Var::from_tensor(&randn(&[BATCH, SEQ, 2048])).unwrap();
    let x = x.as_tensor();
    let (layer, vars) = lora_layer(2048, 16, true);
    let w = layer.base().stored().to_tensor().unwrap().into_owned();
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
    let mut group = c.benchmark_group("llama_h512_l8_forward");
    let id = BenchmarkId::from_parameter("1x128");
    bench_routine(&mut group, id, "llama_h512_l8_forward/1x128");
    group.finish();
}

/// The `TAPER_BENCH_TURNS` mode (module docs): each case set up at its first request, run
/// once to warm up, then timed in windows of about 0.1 s for the seconds asked.
fn turns() {
    let mut cases: HashMap<String, Routine> = HashMap::new();
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let Some((case, seconds)) = line.split_once(' ') else {
            continue;
        };
        let seconds: f64 = seconds.trim().parse().expect("seconds");
        let run = cases.entry(case.to_string()).or_insert_with(|| {
            let mut run = routine(case).unwrap_or_else(|| panic!("no routine for {case}"));
            run();
            run
        });
        let (start, window) = (Instant::now(), Duration::from_millis(100));
        let mut best = f64::INFINITY;
        while start.elapsed().as_secs_f64() < seconds {
            let (w0, mut calls) = (Instant::now(), 0u32);
            while calls == 0 || w0.elapsed() < window {
                run();
                calls += 1;
            }
            best = best.min(w0.elapsed().as_secs_f64() / f64::from(calls));
        }
        let mut out = stdout.lock();
        writeln!(out, "{case} {:.6}", best * 1e3)
            .and_then(|()| out.flush())
            .expect("stdout");
    }
}

criterion_group! {
    name = benches;
    config = util::config();
    targets = lora_forward, lora_rank_scaling, softmax, rms_norm, layer_norm, lora_forward_backward, attention, model_forward
}
fn main() {
    if std::env::var("TAPER_BENCH_TURNS").is_ok_and(|v| v == "1") {
        // As criterion's configuration does for the benches (`keep_freed_buffers`).
        taper::model::device::keep_freed_buffers();
        return turns();
    }
    // What `criterion_main!(benches)` expands to.
    benches();
    Criterion::default().configure_from_args().final_summary();
}
