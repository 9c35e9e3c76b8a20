//! How close training's 512 x 2048 x 2048 products run to the CPU's FMA units: times
//! `x W^T` as training runs it (`fused_cpu::linear`, the transposed product), the
//! backward's `g W` (`fused_cpu::linear_input_grad`) and gemm's own split of the same
//! row-major product, fastest of 8 calls each, between two timings of the FMA units'
//! peak (independent multiply-add chains on as many threads as rayon's pool has,
//! AVX-512 or AVX2), and prints each product's GFLOPS and share of the higher peak, per
//! round.
//! `benches/lora_parts_torch.py` times PyTorch's two products at the same shape.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release --example product_peak -- [ROUNDS]`
//! (default 3; x86-64 only)

use std::hint::black_box;
use std::time::Instant;

use candle_core::{Device, Tensor};
use taper::model::fused_cpu;

/// The `taper` binary's global allocator (`CacheAligned`).
#[global_allocator]
static ALLOC: taper::model::device::CacheAligned = taper::model::device::CacheAligned;

/// Multiply-add chains a thread keeps in flight: enough to cover the FMA latency on
/// both units of current x86 cores.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::*;

    use super::CHAINS;

    /// `iters` rounds of `CHAINS` independent 16-lane multiply-adds; returns a sum of
    /// them so the loop is not optimised away.
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(iters: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let s = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v));
        _mm512_reduce_add_ps(s)
    }

    /// [`avx512`] with 8-lane multiply-adds.
    ///
    /// # Safety
    ///
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(iters: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        let s = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        lanes.iter().sum()
    }
}

/// The FMA units' peak in GFLOPS on `threads` threads, with the widest vectors the CPU
/// has (`None` without AVX2 and FMA).
#[cfg(target_arch = "x86_64")]
fn peak(threads: usize) -> Option<f64> {
    let lanes = if is_x86_feature_detected!("avx512f") {
        16
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        8
    } else {
        return None;
    };
    let iters = 50_000_000;
    let t = Instant::now();
    let sums: Vec<f32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                // SAFETY: the CPU has the features of the variant picked (checked above).
                s.spawn(move || unsafe {
                    if lanes == 16 {
                        fma::avx512(iters)
                    } else {
                        fma::avx2(iters)
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    black_box(sums);
    let flops = (threads * iters * CHAINS * lanes * 2) as f64;
    Some(flops / t.elapsed().as_secs_f64() / 1e9)
}

#[cfg(not(target_arch = "x86_64"))]
fn peak(_threads: usize) -> Option<f64> {
    None
}

/// The fastest of 8 calls of `f`, in seconds.
fn fastest(f: &dyn Fn()) -> f64 {
    (0..8)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    taper::model::device::keep_freed_buffers();
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let threads = rayon::current_num_threads();
    let (m, d) = (512usize, 2048usize);
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (m, d), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.02, (d, d), &dev).unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ws = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // Allocated once, and gemm overwrites it (`read_dst` false): taper's products take
    // their outputs uninitialised, and zeroing 4 MiB a call here would tilt the rows.
    let out = std::cell::RefCell::new(vec![0f32; m * d]);
    let gemm_split = || {
        let mut out = out.borrow_mut();
        // SAFETY: `out`, `xs` and `ws` hold the m x d, m x d and d x d row-major
        // matrices the strides describe.
        unsafe {
            gemm::gemm(
                m,
                d,
                d,
                out.as_mut_ptr(),
                1,
                d as isize,
                false,
                xs.as_ptr(),
                1,
                d as isize,
                ws.as_ptr(),
                1,
                d as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        }
        black_box(&mut out[..]);
    };
    let flops = 2.0 * (m * d * d) as f64;
    println!("{m} x {d} x {d} on {threads} threads, fastest of 8 calls");
    for round in 0..rounds {
        let before = peak(threads);
        let products = [
            (
                "x W^T (training)",
                fastest(&|| drop(black_box(fused_cpu::linear(&xs, &ws, (m, d, d))))),
            ),
            (
                "g W (backward)",
                fastest(&|| drop(black_box(fused_cpu::linear_input_grad(&x, &w).unwrap()))),
            ),
            ("gemm's split, row-major W", fastest(&gemm_split)),
        ];
        let after = peak(threads);
        let top = before.zip(after).map(|(a, b)| a.max(b));
        match (before, after) {
            (Some(a), Some(b)) => println!("round {round}: peak {a:.0} / {b:.0} GFLOPS"),
            _ => println!("round {round}: no AVX2 + FMA, peak not measured"),
        }
        for (name, t) in products {
            let gf = flops / t / 1e9;
            let share = top.map_or(String::new(), |p| {
                format!(", {:.0} % of peak", 100.0 * gf / p)
            });
            println!("  {name:28} {:7.2} ms  {gf:5.0} GFLOPS{share}", t * 1e3);
        }
    }
}
