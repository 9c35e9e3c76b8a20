//! Times a frozen linear's forward in inference's layouts by the number of rows: the
//! weight transposed (gemm's) against `store_for_inference`'s choice on this CPU (panels
//! on CPUs with AVX-512, packed on those that pack), at 1 to 512 rows, for the shapes of
//! the bench Llama (hidden 512, intermediate 1408, vocab 8192), a 1024-wide layer, a
//! 2048-wide layer and the two MLP shapes of a 2048 x 5632 model. Fastest of N calls
//! each, the two layouts in turns.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release --example layout_rows -- [N]` (default 20)

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use taper::model::frozen::FrozenLinear;

/// The `taper` binary's global allocator (`CacheAligned`).
#[global_allocator]
static ALLOC: taper::model::device::CacheAligned = taper::model::device::CacheAligned;

fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    println!(
        "{} threads; fastest of {calls}; store_for_inference's layout against the transpose",
        rayon::current_num_threads()
    );
    for (out, inp) in [
        (512, 512),
        (1408, 512),
        (512, 1408),
        (8192, 512),
        (1024, 1024),
        (2048, 2048),
        (5632, 2048),
        (2048, 5632),
    ] {
        let w = Tensor::randn(0f32, 0.02, (out, inp), &Device::Cpu).unwrap();
        let mut transposed = FrozenLinear::new(w.clone(), None);
        transposed.store_transposed().unwrap();
        let mut chosen = FrozenLinear::new(w, None);
        chosen.store_for_inference().unwrap();
        let layers = [&transposed, &chosen];
        for m in [1usize, 4, 16, 128, 512] {
            let x = Tensor::randn(0f32, 1.0, (m, inp), &Device::Cpu).unwrap();
            let mut best = [f64::INFINITY; 2];
            for c in 0..calls {
                for k in 0..2 {
                    let i = (k + c) % 2;
                    let t = Instant::now();
                    std::hint::black_box(layers[i].forward(&x).unwrap());
                    best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            println!(
                "{out} x {inp}, {m:3} rows: transposed {:8.3} ms, chosen {:8.3} ms, {:.2}x",
                best[0],
                best[1],
                best[0] / best[1]
            );
        }
    }
}
