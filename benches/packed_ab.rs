//! Packed weights against the transposed layout, in one process, calls in turns.
//!
//! `cargo bench --bench packed_ab -- [PAIRS]` (default 30; set `RAYON_NUM_THREADS`).
//! The same bench-size Llama (hidden 512, intermediate 1408, 8 layers, vocab 8192,
//! random weights) set up twice for inference: `Llama::store_transposed` (gemm's path,
//! what CPUs without the packed product get) and `Llama::store_for_inference` (packed
//! where this CPU runs the packed product), and LoRA layers of the LoRA suite the same
//! two ways. Each pair times one call of each, back to back, so a slow minute of a
//! shared machine falls on both; prints the fastest and the median of each side and
//! their ratios (> 1: packed faster). Not a criterion suite: criterion times one case
//! after the other, and on a noisy VM the minutes between them swing more than the
//! difference measured here.

#[path = "util/mod.rs"]
mod util;

use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor};
use taper::model::frozen::FrozenLinear;
use taper::model::lora::{LoraBranch, LoraLinear};
use taper::model::{fused_cpu, packed};
use taper::model::{generate, GenerateOptions};

/// Fastest and median of `v`.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

/// `pairs` pairs of calls, transposed then packed; prints the comparison. Skipped unless
/// its name contains the filter (the first argument that is not a number), if one is
/// given.
fn ab(name: &str, pairs: usize, mut transposed: impl FnMut(), mut packed: impl FnMut()) {
    let filter = std::env::args()
        .skip(1)
        .find(|a| a.parse::<usize>().is_err() && !a.starts_with('-'));
    if filter.is_some_and(|f| !name.contains(&f)) {
        return;
    }
    transposed();
    packed();
    let (mut ta, mut tb) = (vec![], vec![]);
    for _ in 0..pairs.max(1) {
        let t = Instant::now();
        transposed();
        ta.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        packed();
        tb.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let ((amin, amed), (bmin, bmed)) = (stats(ta), stats(tb));
    println!(
        "{name:32} transposed {amin:8.2} / {amed:8.2} ms   packed {bmin:8.2} / {bmed:8.2} ms   \
         gain {:.2}x / {:.2}x",
        amin / bmin,
        amed / bmed
    );
}

/// A `d x d` LoRA linear of rank 16 set up for inference, packed or transposed.
fn lora(d: usize, pack: bool) -> LoraLinear {
    let mut l = LoraLinear::new("bench", FrozenLinear::new(util::randn(&[d, d]), None));
    if pack {
        l.store_for_inference().unwrap();
    } else {
        l.store_transposed().unwrap();
    }
    let branch = LoraBranch {
        a: util::randn(&[16, d]),
        b: util::randn(&[d, 16]),
        scale: 2.0,
        dropout: 0.0,
    };
    l.set_lora(Some(branch)).unwrap();
    l
}

fn ids(batch: usize, seq: usize) -> Tensor {
    let v: Vec<u32> = (0..(batch * seq) as u32).map(|i| i * 37 % 8192).collect();
    Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
}

fn main() {
    let pairs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    println!(
        "packing on this CPU: {}; {} threads; fastest / median of {pairs} pairs",
        taper::model::packed::packing_pays(),
        rayon::current_num_threads()
    );
    let dir = tempfile::tempdir().unwrap();
    let packed = util::bench_llama(dir.path());
    let mut transposed = taper::model::load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    transposed.store_transposed().unwrap();

    let (seq, one) = (ids(1, 128), ids(1, 1));
    let fwd = |m: &taper::model::Llama, x: &Tensor| {
        std::hint::black_box(m.forward(x, None, false).unwrap());
    };
    ab(
        "llama forward 1 x 128",
        pairs,
        || fwd(&transposed, &seq),
        || fwd(&packed, &seq),
    );
    ab(
        "llama forward 1 x 1",
        pairs * 3,
        || fwd(&transposed, &one),
        || fwd(&packed, &one),
    );
    let opts = GenerateOptions {
        max_new_tokens: 32,
        sampling: Default::default(),
        seed: 1,
        stop_tokens: vec![],
    };
    let prompt: Vec<u32> = (0..16u32).map(|i| i * 37 % 8192).collect();
    let gen = |m: &taper::model::Llama| generate(m, &prompt, &opts).unwrap().tokens;
    println!(
        "greedy tokens the same both ways: {}",
        gen(&transposed) == gen(&packed)
    );
    ab(
        "generate greedy 32 after 16",
        pairs / 3,
        || {
            std::hint::black_box(gen(&transposed));
        },
        || {
            std::hint::black_box(gen(&packed));
        },
    );
    // The eval's shape: a batch of 4 x 256 in a one-thread pool (batches side by side).
    let batch = ids(4, 256);
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    one_thread.install(|| {
        ab(
            "llama forward 4 x 256, 1 thread",
            pairs / 3,
            || fwd(&transposed, &batch),
            || fwd(&packed, &batch),
        )
    });
    for d in [512, 2048] {
        let x = util::randn(&[4, 128, d]);
        let (lt, lp) = (lora(d, false), lora(d, true));
        ab(
            &format!("lora forward r16 d{d}"),
            pairs,
            || {
                std::hint::black_box(lt.forward_t(&x, false).unwrap());
            },
            || {
                std::hint::black_box(lp.forward_t(&x, false).unwrap());
            },
        );
    }
    // Training's products with a frozen weight as stored (row-major `[out, in]`): gemm,
    // against the packed micro-kernel with the weight packed a panel at a time at the
    // call. Forward `x W^T` and backward `g W` at the train bench's shapes (4 x 256
    // rows, the bench Llama's projections and head) and the LoRA suite's d 2048.
    for (m, o, i) in [
        (1024, 512, 512),
        (1024, 1408, 512),
        (1024, 512, 1408),
        (1024, 8192, 512),
        (512, 2048, 2048),
    ] {
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (x, w) = (
            flat(util::randn(&[m, i.max(o)])),
            flat(util::randn(&[o, i])),
        );
        let (fwd_w, bwd_w) = ((&w[..], 1, i), (&w[..], i, 1));
        for (name, (n, k), b) in [("forward", (o, i), fwd_w), ("backward", (i, o), bwd_w)] {
            ab(
                &format!("train {name} {m}x{o}x{i}"),
                pairs,
                || {
                    std::hint::black_box(fused_cpu::matmul_new((m, n, k), (&x, k, 1), b));
                },
                || {
                    std::hint::black_box(packed::strided_product((m, n, k), &x, b, None));
                },
            );
        }
    }
}
