//! Times the parts of one LoRA layer's training step on the CPU (d 2048, r 16, input
//! `[4, 128, 2048]`, the `lora_fwd_bwd_d2048_r16` case of `benches/lora.rs`): the whole
//! forward + backward through candle's graph, the forward alone, the fused kernels'
//! forward and backward (on the weight as training stores it: `store_for_training`),
//! the bare base products in both layouts and over the panels where there are, the rank's products and
//! the adapter's gradients, and packing the weight for training's product (a product
//! over 6 rows, which is little else). Prints the fastest of N calls of each, the parts
//! in turns so a machine's slow phases touch all of them.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release --example lora_parts -- [N]` (default 10)

use std::time::Instant;

use candle_core::{Device, ModuleT, Tensor, Var};
use taper::model::frozen::{FrozenLinear, Weight};
use taper::model::fused_cpu;
use taper::model::lora::{LoraBranch, LoraLinear};
use taper::model::packed;

/// The `taper` binary's global allocator (`CacheAligned`).
#[global_allocator]
static ALLOC: taper::model::device::CacheAligned = taper::model::device::CacheAligned;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 0.02, shape, &Device::Cpu).unwrap()
}

/// A named part of the step.
type Part<'a> = (&'static str, Box<dyn Fn() + 'a>);

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn main() {
    taper::model::device::keep_freed_buffers();
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let (m, d, r) = (512, 2048, 16);
    let x = Var::from_tensor(&randn(&[4, 128, d])).unwrap();
    let x = x.as_tensor();
    let w = randn(&[d, d]);
    let (a, b) = (randn(&[r, d]), randn(&[d, r]));
    let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
    let mut layer = LoraLinear::new("bench", FrozenLinear::new(w.clone(), None));
    layer.store_for_training().unwrap();
    let branch = LoraBranch {
        a: va.as_tensor().clone(),
        b: vb.as_tensor().clone(),
        scale: 2.0,
        dropout: 0.0,
    };
    layer.set_lora(Some(branch)).unwrap();
    let x2 = x.reshape((m, d)).unwrap().detach();
    let g = randn(&[m, d]);
    let (ws, xs, gs) = (flat(&w), flat(&x2), flat(&g));
    let (as_, bs) = (flat(&a), flat(&b));
    let t = fused_cpu::linear(&xs, &as_, (m, r, d));
    // As training stores it (with panels on CPUs with AVX-512).
    let weight = layer.base().stored().clone();

    let mut parts: Vec<Part> = vec![
        (
            "layer forward + backward (candle graph)",
            Box::new(|| {
                let y = layer.forward_t(x, true).unwrap();
                drop(y.sum_all().unwrap().backward().unwrap());
            }),
        ),
        (
            "layer forward (training)",
            Box::new(|| drop(layer.forward_t(x, true).unwrap())),
        ),
        (
            "fused_cpu::lora_forward",
            Box::new(|| drop(fused_cpu::lora_forward(&x2, &weight, None, &a, &b, 2.0).unwrap())),
        ),
        (
            "fused_cpu::lora_backward",
            Box::new(|| {
                let out = fused_cpu::lora_backward(&x2, &weight, &a, &b, &g, 2.0, None, true);
                drop(out.unwrap())
            }),
        ),
        (
            "base product x W^T (gemm, W as loaded)",
            Box::new(|| drop(fused_cpu::linear(&xs, &ws, (m, d, d)))),
        ),
        (
            "base product g W (gemm, W as loaded)",
            Box::new(|| drop(fused_cpu::linear_input_grad(&g, &w).unwrap())),
        ),
        (
            "rank product t = x A^T",
            Box::new(|| drop(fused_cpu::linear(&xs, &as_, (m, r, d)))),
        ),
        (
            "rank product u = g B (alone)",
            Box::new(|| drop(fused_cpu::matmul_new((m, r, d), (&gs, d, 1), (&bs, r, 1)))),
        ),
        (
            "u = g B, dA = s u^T x, dB = s g^T t",
            Box::new(|| {
                drop(fused_cpu::adapter_grads(
                    (m, d, d, r),
                    &xs,
                    &gs,
                    (&bs, &t),
                    2.0,
                ))
            }),
        ),
        (
            "packing W for x W^T (6 rows)",
            Box::new(|| drop(packed::strided_product((6, d, d), &xs, (&ws, 1, d), None))),
        ),
        (
            "packing W for g W (6 rows)",
            Box::new(|| drop(packed::strided_product((6, d, d), &xs, (&ws, d, 1), None))),
        ),
    ];
    if let Weight::Paneled(p) = &weight {
        let (p, q, xr, gr) = (p.clone(), p.clone(), &xs, &gs);
        parts.push((
            "base product x W^T (panels)",
            Box::new(move || drop(p.forward(xr, m, None))),
        ));
        parts.push((
            "base product g W (panels)",
            Box::new(move || drop(q.input_grad(gr, m, None))),
        ));
    }
    let mut best = vec![f64::INFINITY; parts.len()];
    for _ in 0..calls {
        for (i, (_, f)) in parts.iter().enumerate() {
            let t = Instant::now();
            f();
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    println!(
        "packing on this CPU: {}; {} threads; fastest of {calls}",
        packed::packing_pays(),
        rayon::current_num_threads()
    );
    for ((name, _), t) in parts.iter().zip(best) {
        println!("{name:42} {:8.2} ms", t * 1e3);
    }
}
