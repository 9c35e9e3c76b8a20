//! Times generation on a random-weight Llama in inference's two CPU layouts, in turns:
//! `Llama::store_for_inference` (panels on CPUs with AVX-512, packed on those that
//! pack) against `Llama::store_transposed` (every weight transposed, gemm's layout).
//! The model has TinyLlama's shapes (hidden 2048, intermediate 5632, 32 heads, 4
//! key/value heads, vocab 32000, untied head) and LAYERS layers (default 4). Prints the
//! fastest of N rounds (default 4) of a 128-token prefill, a decode step after it, and
//! greedy generation of 32 tokens after a 16-token prompt.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release --example generate_layouts -- [N] [LAYERS]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use taper::model::{generate, load_model, GenerateOptions, Llama, LogitsAt, SamplingConfig};

// The benches' shared code: the random Llama, and the `taper` binary's global allocator
// (`CacheAligned`).
#[path = "../benches/util/mod.rs"]
mod util;

use util::{write_llama, LlamaShape};

/// TinyLlama's shapes with `layers` layers.
fn shape(layers: usize) -> LlamaShape {
    LlamaShape {
        hidden: 2048,
        intermediate: 5632,
        layers,
        heads: 32,
        kv_heads: 4,
        vocab: 32000,
    }
}

/// One round: (prefill ms, decode step ms, generation ms).
fn round(model: &Llama, ids: &[u32]) -> [f64; 3] {
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let prompt = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let one = Tensor::from_vec(vec![5u32], (1, 1), &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    let t = Instant::now();
    model
        .forward_cached(&prompt, &mut cache, LogitsAt::Last)
        .unwrap();
    let prefill = ms(t);
    let t = Instant::now();
    model
        .forward_cached(&one, &mut cache, LogitsAt::Last)
        .unwrap();
    let step = ms(t);
    let opts = GenerateOptions {
        max_new_tokens: 32,
        sampling: SamplingConfig::default(),
        seed: 1,
        stop_tokens: vec![],
    };
    let t = Instant::now();
    generate(model, &ids[..16], &opts).unwrap();
    [prefill, step, ms(t)]
}

fn main() {
    taper::model::device::keep_freed_buffers();
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, layers) = (arg(1, 4), arg(2, 4));
    let dir = tempfile::tempdir().unwrap();
    write_llama(dir.path(), shape(layers));
    let load = || load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let mut transposed = load();
    transposed.store_transposed().unwrap();
    let mut chosen = load();
    chosen.store_for_inference().unwrap();
    let ids: Vec<u32> = (0..128u32).map(|t| (t * 37) % 32000).collect();
    let mut best = [[f64::INFINITY; 3]; 2];
    for r in 0..rounds {
        for k in 0..2 {
            let i = (k + r) % 2;
            let model = if i == 0 { &transposed } else { &chosen };
            for (b, t) in best[i].iter_mut().zip(round(model, &ids)) {
                *b = b.min(t);
            }
        }
    }
    println!(
        "{} threads, {layers} layers, fastest of {rounds}: transposed against store_for_inference's layout",
        rayon::current_num_threads()
    );
    for (j, name) in [
        "prefill 1 x 128",
        "decode step after 128",
        "greedy, 32 new tokens",
    ]
    .iter()
    .enumerate()
    {
        let (a, b) = (best[0][j], best[1][j]);
        println!("{name:24} {a:9.2} ms {b:9.2} ms {:.2}x", a / b);
    }
}
