//! CPU kernels for the element-wise work around the matrix products: the attention
//! softmax (forward and backward), RMSNorm, SwiGLU and the cross-entropy, one pass over
//! the data each, f32 only.
//!
//! Built of candle ops, this work is a dozen passes over each tensor (scale, add the
//! mask, softmax; in the backward the recomputation, `P * dP`, the row sums, the
//! subtraction and the scale), every one a fresh allocation, with glibc's scalar `expf`
//! (whose underflow path is slow on the `-1e9` of the mask) for the exponentials. A
//! `perf` profile of a CPU training step put about 40 % of the time there, against 45 %
//! in the matrix products (BENCHMARKS.md, "train (CPU)"). These kernels are the CUDA
//! kernels of [`super::fused_cuda`] written for the CPU: rows split over rayon's
//! threads, the inner loops compiled for AVX-512 or AVX2 when the CPU has them (chosen at
//! run time) and vectorised, and [`exp`] a polynomial that vectorises with them.
//!
//! Results do not depend on the instruction set: the inner loops use plain IEEE
//! additions and multiplications (Rust never fuses them into FMAs on its own), fused
//! multiply-adds only where written (`mul_add`, rounded once on every CPU), and every
//! row sum runs over the same [`LANES`] partial sums reduced in the same order. (The
//! matrix products are gemm's, whose blocking follows the cache sizes and the thread
//! count: a CPU run reproduces bit for bit on one machine with one thread count, which is
//! what the resume test checks; a weight packed for inference goes through
//! [`super::packed`], and one in panels (training's and inference's on CPUs with
//! AVX-512) through [`super::panels`], whose sums do not depend on the thread count.)

use std::mem::MaybeUninit;

use candle_core::{DType, Result, Storage, Tensor};

use super::frozen::Weight;
use super::mask::MASKED;
use super::packed;
use super::panels::{Panels, Update};
use rayon::prelude::*;

/// Partial sums per row reduction: 64 f32 lanes, four AVX-512 registers (eight AVX2
/// ones), so that consecutive additions do not wait on each other's latency.
pub const LANES: usize = 64;

/// Elements a rayon task should have at least, so that splitting pays for itself.
const TASK_ELEMENTS: usize = 1 << 14;

/// Whether the RMSNorm kernels can serve `x` with `weight`.
pub fn usable_norm(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && weight.rank() == 1
}

/// Whether the SwiGLU kernels can serve `g` and `u`.
pub fn usable_swiglu(g: &Tensor, u: &Tensor) -> bool {
    g.device().is_cpu()
        && g.dtype() == DType::F32
        && u.dtype() == DType::F32
        && u.dims() == g.dims()
}

/// Whether the cross-entropy kernels can serve `logits` `[n, vocab]`.
pub fn usable_cross_entropy(logits: &Tensor) -> bool {
    logits.device().is_cpu() && logits.dtype() == DType::F32 && logits.rank() == 2
}

// ---------------------------------------------------------------------------------------
// Element and row primitives, inlined into the multiversioned loops below.

/// `e^x` to about 1 ulp (Cephes' `expf` polynomial after a Cody-Waite reduction), in
/// operations that vectorise. `x > 88` gives `inf`, `x < -87` gives 0 (where the exact
/// result is subnormal), NaN gives NaN.
///
/// The reduction and the polynomial are fused multiply-adds (`mul_add`): one instruction
/// each in the AVX2 and AVX-512 loops, and on a CPU without FMA a call to libm's `fmaf`,
/// slower but with the same bits, since a fused multiply-add is rounded once everywhere.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x > 88.0 { 88.0 } else { x };
    let xc = if xc < -87.0 { -87.0 } else { xc };
    let n = xc.mul_add(LOG2E, ROUND) - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    // n is an integer in [-126, 127], so 2^n is a normal float: n + 127 + 2^23 holds
    // n + 127 in its low mantissa bits, and shifting them into the exponent field gives
    // 2^n. (Bit operations vectorise; a saturating `as i32` would not.)
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    let y = y * scale;
    let y = if x > 88.0 { f32::INFINITY } else { y };
    let y = if x < -87.0 { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// The sum of the [`LANES`] partial sums, halving them in a fixed order (lane `i` takes
/// lane `i + w` for `w` = 32, 16, ..., 1), which vectorises as well.
#[inline(always)]
fn reduce_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// Folds `step(acc, a[i], b[i], c[i])` over [`LANES`] partial results in a fixed order
/// (lane `i % LANES` takes element `i`), then adds the lanes ([`reduce_lanes`]); the
/// slices have one length.
#[inline(always)]
fn lane_fold3(a: &[f32], b: &[f32], c: &[f32], step: impl Fn(f32, f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len();
    let full = n - n % LANES;
    let chunks = a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES));
    for ((ca, cb), cc) in chunks.zip(c[..full].chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = step(acc[l], ca[l], cb[l], cc[l]);
        }
    }
    for i in full..n {
        acc[i - full] = step(acc[i - full], a[i], b[i], c[i]);
    }
    reduce_lanes(acc)
}

/// `sum(f(a[i], b[i], c[i]))` over [`lane_fold3`]'s lanes.
#[inline(always)]
fn lane_sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    lane_fold3(a, b, c, |acc, x, y, z| acc + f(x, y, z))
}

/// `sum(p * q)` for `(p, q) = f(a[i], b[i], c[i])` over [`lane_fold3`]'s lanes, each
/// product added by a fused multiply-add (one instruction in the AVX2 and AVX-512 loops,
/// libm's `fmaf` with the same bits elsewhere, as in [`exp`]): one operation fewer an
/// element than a product and a sum, which counts where AVX-512 runs at half rate (a Zen
/// 4's layer norm: BENCHMARKS.md, "Session 17").
#[inline(always)]
fn lane_dot3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> (f32, f32)) -> f32 {
    lane_fold3(a, b, c, |acc, x, y, z| {
        let (p, q) = f(x, y, z);
        p.mul_add(q, acc)
    })
}

/// `sum(a)`, as [`lane_sum3`] adds.
#[inline(always)]
fn lane_sum(a: &[f32]) -> f32 {
    lane_sum3(a, a, a, |x, _, _| x)
}

/// `sum(a * b)`, as [`lane_dot3`] adds.
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    lane_dot3(a, b, b, |x, y, _| (x, y))
}

/// The largest of `xs` (`-inf` when empty); NaNs are skipped (they propagate through
/// the exponentials instead).
#[inline(always)]
fn row_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a = if v > *a { v } else { *a };
    }
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] = if acc[i + w] > acc[i] {
                acc[i + w]
            } else {
                acc[i]
            };
        }
        w /= 2;
    }
    acc[0]
}

/// Writes `e^(x - max(x))` to every element of `y` and returns their sum (each
/// exponential is added to lane `i % LANES`, the order [`lane_sum`] uses).
#[inline(always)]
fn exp_shifted_from(x: &[f32], y: &mut [MaybeUninit<f32>]) -> f32 {
    let m = row_max(x);
    let mut acc = [0f32; LANES];
    let full = x.len() - x.len() % LANES;
    let body = x[..full]
        .chunks_exact(LANES)
        .zip(y[..full].chunks_exact_mut(LANES));
    for (cx, cy) in body {
        for l in 0..LANES {
            let e = exp(cx[l] - m);
            cy[l].write(e);
            acc[l] += e;
        }
    }
    for i in full..x.len() {
        let e = exp(x[i] - m);
        y[i].write(e);
        acc[i - full] += e;
    }
    reduce_lanes(acc)
}

/// Writes `e^(z - max)` over `z` in place and returns their sum.
#[inline(always)]
fn exp_shifted(z: &mut [f32]) -> f32 {
    let m = row_max(z);
    // One pass: each exponential is stored and added to its lane (`i % LANES`, the
    // order `lane_sum` uses).
    let mut acc = [0f32; LANES];
    let full = z.len() - z.len() % LANES;
    let (body, tail) = z.split_at_mut(full);
    for c in body.chunks_exact_mut(LANES) {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp(*v - m);
            *a += *v;
        }
    }
    for (a, v) in acc.iter_mut().zip(tail.iter_mut()) {
        *v = exp(*v - m);
        *a += *v;
    }
    reduce_lanes(acc)
}

/// `1 / sqrt(mean(x^2) + eps)`.
#[inline(always)]
fn rms_inverse(x: &[f32], eps: f32) -> f32 {
    let sq = lane_dot(x, x);
    1.0 / (sq / x.len() as f32 + eps).sqrt()
}

/// The mean of `x` and `1 / sqrt(var(x) + eps)`, the variance from a second pass over
/// the deviations (no cancellation), biased as layer norms take it.
#[inline(always)]
fn mean_inverse(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum(x) / n;
    let var = lane_dot3(x, x, x, |v, _, _| (v - mean, v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

// ---------------------------------------------------------------------------------------
// Multiversioned loops: each body is compiled three times (AVX-512, AVX2 + FMA, and the
// build's baseline) and the best the CPU runs is picked at run time.

macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has every feature `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has every feature `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

multiversion! {
    fn rms_rows(x: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>], eps: f32) {
        let h = w.len();
        for (yr, xr) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let inv = rms_inverse(xr, eps);
            for ((yj, &xj), &wj) in yr.iter_mut().zip(xr).zip(w) {
                yj.write((xj * inv) * wj);
            }
        }
    }
}

multiversion! {
    fn rms_backward_rows(x: &[f32], w: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], eps: f32) {
        let h = w.len();
        for (i, dxr) in dx.chunks_exact_mut(h).enumerate() {
            let (xr, dyr) = (&x[i * h..(i + 1) * h], &dy[i * h..(i + 1) * h]);
            let inv = rms_inverse(xr, eps);
            // dx = (g - n * mean(g * n)) * inv with n = x * inv and g = dy * w.
            let dot = lane_dot3(dyr, w, xr, |d, w, x| (d * w, x * inv));
            let mean = dot / h as f32;
            for (j, d) in dxr.iter_mut().enumerate() {
                d.write((dyr[j] * w[j] - xr[j] * inv * mean) * inv);
            }
        }
    }
}

multiversion! {
    fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], y: &mut [MaybeUninit<f32>], eps: f32) {
        let h = w.len();
        for (yr, xr) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let (mean, inv) = mean_inverse(xr, eps);
            for (((yj, &xj), &wj), &bj) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                yj.write(((xj - mean) * inv).mul_add(wj, bj));
            }
        }
    }
}

multiversion! {
    fn layer_norm_backward_rows(
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: &mut [MaybeUninit<f32>],
        eps: f32,
    ) {
        let h = w.len();
        for (i, dxr) in dx.chunks_exact_mut(h).enumerate() {
            let (xr, dyr) = (&x[i * h..(i + 1) * h], &dy[i * h..(i + 1) * h]);
            let (mean, inv) = mean_inverse(xr, eps);
            // dx = (g - mean(g) - n * mean(g * n)) * inv with n = (x - mean) * inv and
            // g = dy * w.
            let mg = lane_dot(dyr, w) / h as f32;
            let mgn = lane_dot3(dyr, w, xr, |d, w, x| (d * w, (x - mean) * inv)) / h as f32;
            for (j, d) in dxr.iter_mut().enumerate() {
                d.write((dyr[j] * w[j] - mg - ((xr[j] - mean) * inv) * mgn) * inv);
            }
        }
    }
}

multiversion! {
    fn add_elements(a: &[f32], b: &[f32], y: &mut [MaybeUninit<f32>]) {
        for ((yj, &aj), &bj) in y.iter_mut().zip(a).zip(b) {
            yj.write(aj + bj);
        }
    }
}

multiversion! {
    fn swiglu_elements(g: &[f32], u: &[f32], y: &mut [MaybeUninit<f32>]) {
        for ((yj, &gj), &uj) in y.iter_mut().zip(g).zip(u) {
            yj.write((gj / (1.0 + exp(-gj))) * uj);
        }
    }
}

multiversion! {
    fn swiglu_backward_elements(
        g: &[f32],
        u: &[f32],
        dy: &[f32],
        dg: &mut [MaybeUninit<f32>],
        du: &mut [MaybeUninit<f32>],
    ) {
        for (j, (dgj, duj)) in dg.iter_mut().zip(du.iter_mut()).enumerate() {
            let (gj, dyj) = (g[j], dy[j]);
            let sg = 1.0 / (1.0 + exp(-gj));
            duj.write(dyj * (gj * sg));
            dgj.write((dyj * u[j]) * (sg * (1.0 + gj * (1.0 - sg))));
        }
    }
}

multiversion! {
    /// Per row of `v`: the log-sum-exp (into `lse`) and the log-probability of the label
    /// (into `picked`).
    fn cross_entropy_rows(x: &[f32], labels: &[u32], picked: &mut [f32], lse: &mut [f32], v: usize) {
        for (i, xr) in x.chunks_exact(v).enumerate() {
            let m = row_max(xr);
            let sum = lane_sum3(xr, xr, xr, |xj, _, _| exp(xj - m));
            let l = m + sum.ln();
            lse[i] = l;
            picked[i] = xr[labels[i] as usize] - l;
        }
    }
}

multiversion! {
    /// `d = (softmax(x) - one_hot(label)) * k` per row, with `softmax = e^(x - lse)`.
    fn cross_entropy_backward_rows(
        x: &[f32],
        labels: &[u32],
        lse: &[f32],
        k: &[f32],
        d: &mut [MaybeUninit<f32>],
        v: usize,
    ) {
        for (i, dr) in d.chunks_exact_mut(v).enumerate() {
            let (xr, l, ki) = (&x[i * v..(i + 1) * v], lse[i], k[i]);
            for (dj, &xj) in dr.iter_mut().zip(xr) {
                dj.write(exp(xj - l) * ki);
            }
            // SAFETY: the loop above wrote every element of the row.
            let dr = unsafe { assume_init(dr) };
            dr[labels[i] as usize] -= ki;
        }
    }
}

multiversion! {
    /// Rows of attention scores `z` (`t` wide) in place: `softmax(z * scale + bias)`,
    /// where row `i` reads the first `t` of row `(first + i) % s` of `bias` (one batch's
    /// `[s, bt]`).
    fn softmax_block(
        z: &mut [f32],
        t: usize,
        first: usize,
        s_bt: (usize, usize),
        bias: Option<&[f32]>,
        scale: f32,
    ) {
        let (s, bt) = s_bt;
        for (i, zr) in z.chunks_exact_mut(t).enumerate() {
            match bias {
                Some(bias) => {
                    let q = (first + i) % s;
                    for (zj, &bj) in zr.iter_mut().zip(&bias[q * bt..q * bt + t]) {
                        *zj = *zj * scale + bj;
                    }
                }
                None if scale != 1.0 => {
                    for zj in zr.iter_mut() {
                        *zj *= scale;
                    }
                }
                None => {}
            }
            let inv = 1.0 / exp_shifted(zr);
            for zj in zr.iter_mut() {
                *zj *= inv;
            }
        }
    }
}

multiversion! {
    /// `dP` into `dS = P * (dP - sum(P * dP)) * scale`, in place, row by row.
    fn softmax_grad_block(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
        for (pr, dr) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
            let dot = lane_dot(pr, dr);
            for (d, &pj) in dr.iter_mut().zip(pr) {
                *d = pj * (*d - dot) * scale;
            }
        }
    }
}

/// `softmax(x)` of a row into `y` (as long), every element written.
#[inline(always)]
fn softmax_row<'a>(x: &[f32], y: &'a mut [MaybeUninit<f32>]) -> &'a mut [f32] {
    let inv = 1.0 / exp_shifted_from(x, y);
    // SAFETY: `exp_shifted_from` wrote every element of `y`.
    let y = unsafe { assume_init(y) };
    for v in y.iter_mut() {
        *v *= inv;
    }
    y
}

multiversion! {
    /// Rows of `x` (`t` wide) into `y`: `softmax(x)`, reading `x` once from memory.
    fn softmax_rows(x: &[f32], y: &mut [MaybeUninit<f32>], t: usize) {
        for (xr, yr) in x.chunks_exact(t).zip(y.chunks_exact_mut(t)) {
            softmax_row(xr, yr);
        }
    }
}

multiversion! {
    /// Rows of `x` and `dy` (`t` wide) into `dx = p * (dy - sum(p * dy))` with
    /// `p = softmax(x)`, computed in `dx` first.
    fn softmax_backward_rows(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], t: usize) {
        let rows = x.chunks_exact(t).zip(dy.chunks_exact(t));
        for ((xr, dyr), dxr) in rows.zip(dx.chunks_exact_mut(t)) {
            let p = softmax_row(xr, dxr);
            let dot = lane_dot(p, dyr);
            for (pj, &dj) in p.iter_mut().zip(dyr) {
                *pj *= dj - dot;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tensor-level entry points, the same as `fused_cuda`'s.

/// Runs `f` on the elements of a CPU tensor of element type `T`, gathered into a
/// contiguous buffer first if need be (candle's `CpuStorage::as_slice` checks the type).
fn with_elements<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else {
        candle_core::bail!("cpu kernel: expected a tensor on the CPU")
    };
    let data = s.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => f(&data[start..end]),
        None => f(&gather(
            data,
            layout.dims(),
            layout.stride(),
            layout.start_offset(),
        )),
    }
}

/// The elements of a strided view (`dims`, `stride`, `start` into `data`) in row-major
/// order, copied in parallel row by row (candle's `contiguous` copies on one thread; a
/// broadcast gradient, such as a `sum`'s, arrives as such a view).
fn gather<T: Copy + Send + Sync>(
    data: &[T],
    dims: &[usize],
    stride: &[usize],
    start: usize,
) -> Vec<T> {
    let n: usize = dims.iter().product();
    let (last, last_stride) = match (dims.last(), stride.last()) {
        (Some(&l), Some(&s)) => (l.max(1), s),
        _ => (1, 0),
    };
    let mut out = Vec::<T>::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(rows_per_task(last) * last)
        .enumerate()
        .for_each(|(c, chunk)| {
            let first = c * rows_per_task(last);
            for (r, row) in chunk.chunks_mut(last).enumerate() {
                // The row's offset: its index over the leading dimensions, by their strides.
                let (mut rest, mut off) = (first + r, start);
                for (&d, &st) in dims.iter().zip(stride).rev().skip(1) {
                    off += (rest % d) * st;
                    rest /= d;
                }
                for (j, v) in row.iter_mut().enumerate() {
                    v.write(data[off + j * last_stride]);
                }
            }
        });
    // SAFETY: the chunks cover the first n elements, and each row loop wrote every one.
    unsafe { out.set_len(n) };
    out
}

/// Runs `f` on the elements of a CPU f32 tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    with_elements(t, f)
}

/// The same for u32 labels.
fn with_u32<R>(t: &Tensor, f: impl FnOnce(&[u32]) -> Result<R>) -> Result<R> {
    with_elements(t, f)
}

/// A new buffer of `n` elements filled in parallel chunks of `chunk` by `f`, which gets
/// each chunk's index and its memory uninitialised (zeroing it first cost a fifth of a
/// row kernel's time).
///
/// # Safety
///
/// `f` writes every element of the chunk it is given.
unsafe fn par_uninit(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| f(i, c));
    // SAFETY: the chunks cover the first n elements, and the caller's `f` wrote each.
    unsafe { v.set_len(n) };
    v
}

/// `y` as initialised f32s.
///
/// # Safety
///
/// Every element of `y` has been written.
#[inline(always)]
unsafe fn assume_init(y: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the caller guarantees that
    // every element is initialised.
    unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `n` zeros, written in parallel: for buffers the tasks then fill by other splits.
fn par_zeroed(n: usize) -> Vec<f32> {
    // SAFETY: `fill` writes every element of each chunk.
    unsafe {
        par_uninit(n, TASK_ELEMENTS, |_, c| {
            c.fill(MaybeUninit::new(0.0));
        })
    }
}

/// Rows of `width` a rayon task takes: at least [`TASK_ELEMENTS`] elements' worth.
fn rows_per_task(width: usize) -> usize {
    TASK_ELEMENTS.div_ceil(width.max(1)).max(1)
}

/// Whether [`softmax_forward`] and [`softmax_backward`] serve `x`.
pub fn usable_softmax(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() > 0
}

/// `softmax(x)` over the last dimension.
pub fn softmax_forward(x: &Tensor) -> Result<Vec<f32>> {
    let t = x.dims().last().copied().unwrap_or(1).max(1);
    let task = rows_per_task(t) * t;
    with_f32(x, |xs| {
        // SAFETY: `softmax_rows` writes every element of its rows.
        Ok(unsafe {
            par_uninit(xs.len(), task, |i, yc| {
                softmax_rows(&xs[i * task..i * task + yc.len()], yc, t)
            })
        })
    })
}

/// The input gradient of [`softmax_forward`] given the output's gradient `dy`:
/// `p * (dy - sum(p * dy))` per row, with `p` recomputed from `x` a task at a time (in
/// cache), so the forward need not keep a copy of its output.
pub fn softmax_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if x.dims() != dy.dims() {
        candle_core::bail!("softmax: gradient {:?} for input {:?}", dy.dims(), x.dims())
    }
    let t = x.dims().last().copied().unwrap_or(1).max(1);
    let task = rows_per_task(t) * t;
    let dx = with_f32(dy, |d| {
        with_f32(x, |xs| {
            // SAFETY: `softmax_backward_rows` writes every element of its rows.
            Ok(unsafe {
                par_uninit(d.len(), task, |i, dc| {
                    let range = i * task..i * task + dc.len();
                    softmax_backward_rows(&xs[range.clone()], &d[range], dc, t)
                })
            })
        })
    })?;
    Tensor::from_vec(dx, x.shape(), x.device())
}

/// Checks `weight` `[h]` against `x` `[..., h]` and returns `h`.
fn norm_width(x: &Tensor, weight: &Tensor) -> Result<usize> {
    let h = weight.dim(0)?;
    if x.dims().last() != Some(&h) || h == 0 {
        candle_core::bail!("norm: weight {:?} for input {:?}", weight.dims(), x.dims())
    }
    Ok(h)
}

/// RMSNorm of `x` with weight `w`, as `fused::rms_norm`.
pub fn rms_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<Vec<f32>> {
    let h = norm_width(x, w)?;
    let task = rows_per_task(h) * h;
    with_f32(x, |xs| {
        with_f32(w, |w| {
            // SAFETY: `rms_rows` writes every element of its rows.
            Ok(unsafe {
                par_uninit(xs.len(), task, |i, yc| {
                    rms_rows(&xs[i * task..i * task + yc.len()], w, yc, eps as f32)
                })
            })
        })
    })
}

/// Layer norm of `x` over its last dimension, `(x - mean) * inv * w + b`: one pass a row,
/// rows split over the threads.
pub fn layer_norm_forward(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Vec<f32>> {
    let h = norm_width(x, w)?;
    if b.dims() != w.dims() {
        candle_core::bail!("layer norm: bias {:?} for weight {:?}", b.dims(), w.dims())
    }
    let task = rows_per_task(h) * h;
    with_f32(x, |xs| {
        with_f32(w, |w| {
            with_f32(b, |b| {
                // SAFETY: `layer_norm_rows` writes every element of its rows.
                Ok(unsafe {
                    par_uninit(xs.len(), task, |i, yc| {
                        layer_norm_rows(&xs[i * task..i * task + yc.len()], w, b, yc, eps as f32)
                    })
                })
            })
        })
    })
}

/// The input gradient of [`layer_norm_forward`] given the output's gradient `dy`.
pub fn layer_norm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    norm_backward(x, w, dy, eps, "layer norm", layer_norm_backward_rows)
}

/// The input gradient of [`rms_forward`] given the output's gradient `dy`.
pub fn rms_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    norm_backward(x, w, dy, eps, "rms norm", rms_backward_rows)
}

/// A norm's backward over a task's rows: `(x, weight, dy, dx, eps)`; it writes every
/// element of `dx`.
type NormBackwardRows = fn(&[f32], &[f32], &[f32], &mut [MaybeUninit<f32>], f32);

/// A row norm's input gradient: `rows` takes a task's rows of `x` and `dy` to `dx`.
fn norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    name: &str,
    rows: NormBackwardRows,
) -> Result<Tensor> {
    let h = norm_width(x, w)?;
    if dy.dims() != x.dims() {
        candle_core::bail!("{name}: gradient {:?} for input {:?}", dy.dims(), x.dims())
    }
    let task = rows_per_task(h) * h;
    let dx = with_f32(x, |xs| {
        with_f32(w, |w| {
            with_f32(dy, |dys| {
                // SAFETY: a `NormBackwardRows` writes every element of `dx`.
                Ok(unsafe {
                    par_uninit(xs.len(), task, |i, dxc| {
                        let range = i * task..i * task + dxc.len();
                        rows(&xs[range.clone()], w, &dys[range], dxc, eps as f32)
                    })
                })
            })
        })
    })?;
    Tensor::from_vec(dx, x.shape(), x.device())
}

/// `silu(g) * u` of equal-shaped `g` and `u`.
pub fn swiglu_forward(g: &Tensor, u: &Tensor) -> Result<Vec<f32>> {
    // SAFETY: `swiglu_elements` writes every element of its output.
    unsafe { zip_elements("swiglu", g, u, swiglu_elements) }
}

/// `kernel` over equal-shaped `a` and `b`, a chunk of [`TASK_ELEMENTS`] a task, into a
/// new buffer.
///
/// # Safety
///
/// `kernel` writes every element of the output slice it is given.
unsafe fn zip_elements(
    name: &str,
    a: &Tensor,
    b: &Tensor,
    kernel: fn(&[f32], &[f32], &mut [MaybeUninit<f32>]),
) -> Result<Vec<f32>> {
    if a.dims() != b.dims() {
        candle_core::bail!("{name}: inputs of shapes {:?} and {:?}", a.dims(), b.dims())
    }
    let c = TASK_ELEMENTS;
    with_f32(a, |xs| {
        with_f32(b, |ys| {
            // SAFETY: the caller's `kernel` writes every element of `yc`.
            Ok(unsafe {
                par_uninit(xs.len(), c, |i, yc| {
                    let range = i * c..i * c + yc.len();
                    kernel(&xs[range.clone()], &ys[range], yc)
                })
            })
        })
    })
}

/// Whether [`add_forward`] can serve `a + b`: f32 CPU tensors of one shape.
pub fn usable_add(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.dims() == b.dims()
}

/// `a + b` elementwise on the calling thread's rayon pool. candle's own add splits
/// large tensors over a process-wide pool of its own, which two forward passes running
/// side by side (the eval's batches, `stages::eval::score`) would have to share.
pub fn add_forward(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    // SAFETY: `add_elements` writes every element of its output.
    unsafe { zip_elements("add", a, b, add_elements) }
}

/// The gradients of [`swiglu_forward`] for `g` and `u`, given the output's `dy`.
pub fn swiglu_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    if g.dims() != u.dims() || dy.dims() != g.dims() {
        candle_core::bail!("swiglu: inputs of different shapes")
    }
    let n = g.elem_count();
    let (mut dg, mut du) = (Vec::<f32>::with_capacity(n), Vec::<f32>::with_capacity(n));
    with_f32(g, |gs| {
        with_f32(u, |us| {
            with_f32(dy, |dys| {
                let c = TASK_ELEMENTS;
                dg.spare_capacity_mut()[..n]
                    .par_chunks_mut(c)
                    .zip(du.spare_capacity_mut()[..n].par_chunks_mut(c))
                    .zip(
                        gs.par_chunks(c)
                            .zip(us.par_chunks(c))
                            .zip(dys.par_chunks(c)),
                    )
                    .for_each(|((dgc, duc), ((gc, uc), dyc))| {
                        swiglu_backward_elements(gc, uc, dyc, dgc, duc)
                    });
                Ok(())
            })
        })
    })?;
    // SAFETY: `g`, `u` and `dy` have `n` elements each, so the chunks above covered the
    // first `n` of both buffers, and `swiglu_backward_elements` wrote every one.
    unsafe {
        dg.set_len(n);
        du.set_len(n);
    }
    Ok((
        Tensor::from_vec(dg, g.shape(), g.device())?,
        Tensor::from_vec(du, g.shape(), g.device())?,
    ))
}

/// The rotation of [`copy_rows`]: `cos`, `sin` `[positions, hd / 2]`; row `r` is rotated
/// at position `pos + r * step`, by the angle times `sign` (-1 rotates back).
#[derive(Clone, Copy)]
struct Rotation<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
    pos: usize,
    step: usize,
    sign: f32,
}

impl Rotation<'_> {
    /// The same rotation with row `r` at position `pos + r * step`.
    fn at(self, pos: usize, step: usize) -> Self {
        Self { pos, step, ..self }
    }
}

multiversion! {
    /// `rows` rows of `hd` elements from `src` (row `r` at `r * src.1`) to `dst` (row `r`
    /// at `r * dst.1`), rotated when `rope` is given: the halves `(a, b)` become
    /// `(a cos - b sin, a sin + b cos)`, the formula of candle's rope kernel.
    fn copy_rows(
        src: (&[f32], usize),
        dst: (&mut [MaybeUninit<f32>], usize),
        rows: usize,
        hd: usize,
        rope: Option<Rotation>,
    ) {
        let ((src, src_stride), (dst, dst_stride)) = (src, dst);
        let half = hd / 2;
        for r in 0..rows {
            let x = &src[r * src_stride..r * src_stride + hd];
            let y = &mut dst[r * dst_stride..r * dst_stride + hd];
            match rope {
                None => {
                    for (yj, &xj) in y.iter_mut().zip(x) {
                        yj.write(xj);
                    }
                }
                Some(rot) => {
                    let p = (rot.pos + r * rot.step) * half;
                    let (cos, sin) = (&rot.cos[p..p + half], &rot.sin[p..p + half]);
                    let (xa, xb) = x.split_at(half);
                    let (ya, yb) = y.split_at_mut(half);
                    for j in 0..half {
                        let (c, s) = (cos[j], sin[j] * rot.sign);
                        ya[j].write(xa[j] * c - xb[j] * s);
                        yb[j].write(xa[j] * s + xb[j] * c);
                    }
                }
            }
        }
    }
}

/// Whether [`to_heads`] and [`from_heads`] serve `x` with this rotation: f32 on the CPU,
/// `cos` and `sin` f32 `[s, hd / 2]`.
pub fn usable_heads(x: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && rope.is_none_or(|(c, s)| {
            c.dtype() == DType::F32
                && s.dtype() == DType::F32
                && c.rank() == 2
                && c.dims() == s.dims()
        })
}

/// Runs `f` on the rotation of `rope` (back, when `inverse`), checked to cover `s`
/// positions of `hd`; rows at positions 0, 1, ... until [`Rotation::at`] says otherwise.
fn with_rope<R>(
    rope: Option<(&Tensor, &Tensor)>,
    (s, hd): (usize, usize),
    inverse: bool,
    f: impl FnOnce(Option<Rotation>) -> Result<R>,
) -> Result<R> {
    let Some((cos, sin)) = rope else {
        return f(None);
    };
    if hd % 2 != 0 || cos.dims() != [s, hd / 2] || sin.dims() != [s, hd / 2] {
        candle_core::bail!(
            "rope: cos {:?} and sin {:?} for {s} positions of head size {hd}",
            cos.dims(),
            sin.dims()
        )
    }
    let sign = if inverse { -1.0 } else { 1.0 };
    with_f32(cos, |cos| {
        with_f32(sin, |sin| {
            f(Some(Rotation {
                cos,
                sin,
                pos: 0,
                step: 1,
                sign,
            }))
        })
    })
}

/// `x` `[b, s, n * hd]` as heads `[b, n, s, hd]`, each row rotated at its position by
/// `rope` when given (back, when `inverse`). One task per (batch, head).
pub fn to_heads(
    x: &Tensor,
    (b, s, n, hd): (usize, usize, usize, usize),
    rope: Option<(&Tensor, &Tensor)>,
    inverse: bool,
) -> Result<Vec<f32>> {
    if x.elem_count() != b * s * n * hd {
        candle_core::bail!("heads: {:?} is not [{b}, {s}, {n} x {hd}]", x.dims())
    }
    with_f32(x, |xs| {
        with_rope(rope, (s, hd), inverse, |rope| {
            // SAFETY: each task's `s` rows of `hd` are its whole chunk, and `copy_rows`
            // writes every element of them.
            Ok(unsafe {
                par_uninit(xs.len(), s * hd, |blk, dst| {
                    let (bi, h) = (blk / n, blk % n);
                    let src = &xs[bi * s * n * hd + h * hd..];
                    copy_rows((src, n * hd), (dst, hd), s, hd, rope)
                })
            })
        })
    })
}

/// The inverse of [`to_heads`]: heads `[b, n, s, hd]` to `[b, s, n * hd]`, each row
/// rotated at its position by `rope` when given (back, when `inverse`). Tasks take rows
/// of the output.
pub fn from_heads(
    x: &Tensor,
    (b, n, s, hd): (usize, usize, usize, usize),
    rope: Option<(&Tensor, &Tensor)>,
    inverse: bool,
) -> Result<Vec<f32>> {
    if x.elem_count() != b * s * n * hd {
        candle_core::bail!("heads: {:?} is not [{b}, {n}, {s}, {hd}]", x.dims())
    }
    let width = n * hd;
    let rows = rows_per_task(width);
    with_f32(x, |xs| {
        with_rope(rope, (s, hd), inverse, |rope| {
            // SAFETY: a task's chunk is whole rows of `width`, and `copy_rows` writes
            // the `n` runs of `hd` that make up each.
            Ok(unsafe {
                par_uninit(xs.len(), rows * width, |c, dst| {
                    for (r, row) in dst.chunks_exact_mut(width).enumerate() {
                        let (bi, i) = ((c * rows + r) / s, (c * rows + r) % s);
                        let src = &xs[(bi * n * s + i) * hd..];
                        // The n heads of one position: all rotated at i.
                        let rope = rope.map(|r| r.at(i, 0));
                        copy_rows((src, s * hd), (row, hd), n, hd, rope)
                    }
                })
            })
        })
    })
}

/// Checks u32 `labels` `[n]` against `logits` `[n, vocab]`.
fn check_labels(labels: &[u32], n: usize, vocab: usize) -> Result<()> {
    if labels.len() != n {
        candle_core::bail!("cross-entropy: {} labels for {n} rows", labels.len())
    }
    match labels.iter().find(|&&l| l as usize >= vocab) {
        Some(l) => {
            candle_core::bail!("cross-entropy: label {l} is outside the vocabulary of {vocab}")
        }
        None => Ok(()),
    }
}

/// Per row of `logits` `[n, vocab]`: the log-probability of `labels[i]` (u32 `[n]`) and
/// the log-sum-exp, both `[n]`.
pub fn cross_entropy_forward(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, vocab) = logits.dims2()?;
    let (mut picked, mut lse) = (vec![0f32; n], vec![0f32; n]);
    with_f32(logits, |x| {
        with_u32(labels, |labels| {
            check_labels(labels, n, vocab)?;
            let rows = rows_per_task(vocab);
            picked
                .par_chunks_mut(rows)
                .zip(lse.par_chunks_mut(rows))
                .zip(x.par_chunks(rows * vocab).zip(labels.par_chunks(rows)))
                .for_each(|((pc, lc), (xc, labc))| cross_entropy_rows(xc, labc, pc, lc, vocab));
            Ok(())
        })
    })?;
    let dev = logits.device();
    Ok((
        Tensor::from_vec(picked, n, dev)?,
        Tensor::from_vec(lse, n, dev)?,
    ))
}

/// The gradient of the loss for `logits`: `(softmax - one_hot(label)) * k[i]` per row,
/// with the log-sum-exp `lse` from [`cross_entropy_forward`] and `k` `[n]` each row's
/// factor (its weight in the mean times the loss's gradient).
pub fn cross_entropy_backward(
    logits: &Tensor,
    labels: &Tensor,
    lse: &Tensor,
    k: &Tensor,
) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    let d = with_f32(logits, |x| {
        with_u32(labels, |labels| {
            check_labels(labels, n, vocab)?;
            with_f32(lse, |lse| {
                with_f32(k, |k| {
                    if lse.len() != n || k.len() != n {
                        candle_core::bail!("cross-entropy: row factors of another length")
                    }
                    let rows = rows_per_task(vocab);
                    // SAFETY: `cross_entropy_backward_rows` writes every element of
                    // its rows.
                    Ok(unsafe {
                        par_uninit(n * vocab, rows * vocab, |i, dc| {
                            let (r0, r) = (i * rows, dc.len() / vocab);
                            cross_entropy_backward_rows(
                                &x[r0 * vocab..(r0 + r) * vocab],
                                &labels[r0..r0 + r],
                                &lse[r0..r0 + r],
                                &k[r0..r0 + r],
                                dc,
                                vocab,
                            )
                        })
                    })
                })
            })
        })
    })?;
    Tensor::from_vec(d, (n, vocab), logits.device())
}

/// A matrix operand: its elements, row stride and column stride.
type Operand<'a> = (&'a [f32], usize, usize);

/// `dst = lhs * rhs` (`m x k` times `k x n`), or `dst += lhs * rhs` when `accumulate`;
/// `dst` is row-major with row stride `dst_rs`. On gemm's kernels, single-threaded unless
/// `threads > 1`.
fn matmul(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    threads: usize,
) {
    scaled_matmul(mnk, dst, dst_rs, accumulate, lhs, rhs, 1.0, threads)
}

/// [`matmul`] with the product scaled: `dst (+)= s * lhs * rhs`.
#[allow(clippy::too_many_arguments)]
fn scaled_matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    s: f32,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The last element each operand is read or written at, inside its slice: the
    // pointers below stay in bounds.
    assert!((m - 1) * dst_rs + n <= dst.len(), "matmul: dst too short");
    if k > 0 {
        check_operands((m, n, k), lhs, rhs, "matmul");
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every access of the m x n, m x k and k x n
    // operands, at these strides, inside the slices; `dst` is borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            if accumulate { 1.0 } else { 0.0 },
            s,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Panics unless `lhs` holds an `m x k` and `rhs` a `k x n` matrix at their strides (each
/// one's last element inside its slice), for `m`, `n` and `k` at least 1; `what` names the
/// product in the message.
fn check_operands((m, n, k): (usize, usize, usize), lhs: Operand, rhs: Operand, what: &str) {
    assert!(
        (m - 1) * lhs.1 + (k - 1) * lhs.2 < lhs.0.len(),
        "{what}: lhs too short"
    );
    assert!(
        (k - 1) * rhs.1 + (n - 1) * rhs.2 < rhs.0.len(),
        "{what}: rhs too short"
    );
}

/// `lhs * rhs` (`m x k` times `k x n`) into a new row-major buffer, on all of rayon's
/// threads. The buffer is not zeroed first (candle's matmul zeroes its output, a pass of
/// its own): gemm writes every element.
pub fn matmul_new(mnk: (usize, usize, usize), lhs: Operand, rhs: Operand) -> Vec<f32> {
    matmul_plus(mnk, lhs, rhs, None)
}

/// A low-rank term a product starts from ([`matmul_plus`]): `s * lhs * rhs`, `m x r`
/// times `r x n`, operands as (slice, row stride, column stride). A LoRA linear's update,
/// `s (x A^T) B^T` in the forward and `s (g B) A` in the backward.
#[derive(Clone, Copy)]
pub struct LowRank<'a> {
    /// `m x r`.
    pub lhs: Operand<'a>,
    /// `r x n`.
    pub rhs: Operand<'a>,
    /// The rank, at least 1.
    pub r: usize,
    /// The scale.
    pub s: f32,
}

impl LowRank<'_> {
    /// Panics unless both operands hold an `m x r` and an `r x n` matrix at their strides
    /// (the bounds [`Self::start_block`] relies on).
    fn check(&self, m: usize, n: usize) {
        assert!(self.r > 0, "low-rank term of rank 0");
        check_operands((m, n, self.r), self.lhs, self.rhs, "low rank");
    }

    /// The term of the transposed product: `s rhs^T lhs^T`, `n x r` times `r x m`.
    fn transposed(self) -> Self {
        let (l, r) = (self.lhs, self.rhs);
        Self {
            lhs: (r.0, r.2, r.1),
            rhs: (l.0, l.2, l.1),
            ..self
        }
    }

    /// Sets a block of a product's output, rows `i0..i0 + rows` and columns
    /// `j0..j0 + cols`, to the term: `dst = s lhs rhs` there, `dst` the block's first
    /// element, at row stride `dst.1`; the product then adds its sums to it (gemm with
    /// `read_dst`), which costs no pass of its own.
    ///
    /// # Safety
    ///
    /// [`Self::check`] passed for the whole output, the block lies inside it, `dst` has
    /// room for the block at its stride and nothing else accesses it meanwhile.
    unsafe fn start_block(
        self,
        (i0, rows): (usize, usize),
        (j0, cols): (usize, usize),
        dst: (*mut f32, usize),
    ) {
        let (l, r) = (self.lhs, self.rhs);
        serial_gemm_scaled(
            (rows, cols, self.r),
            dst,
            false,
            (l.0.as_ptr().add(i0 * l.1), l.1, l.2),
            (r.0.as_ptr().add(j0 * r.2), r.1, r.2),
            self.s,
        )
    }
}

/// [`matmul_new`] plus a low-rank term: `s lhs' rhs' + lhs rhs`, where each thread's
/// block of the output is first set to its part of the term and the product then adds
/// its sums to it (gemm's `read_dst`), so the term takes no pass over the output of its
/// own: a LoRA linear's update on gemm, forward and backward. Against the product then a
/// separate update (one process, in turns): 1.01-1.07x on a Xeon and 1.00-1.06x on a
/// Zen 4 over LoRA shapes at 512 x 2048 x 2048 and 512 x 1408 x 512 (BENCHMARKS.md,
/// "Session 17"). The term's sums do not depend on the blocks, so neither do the bits.
pub fn matmul_plus(
    (m, n, k): (usize, usize, usize),
    lhs: Operand,
    rhs: Operand,
    low: Option<LowRank>,
) -> Vec<f32> {
    if m == 0 || n == 0 {
        return Vec::new();
    }
    if let Some(low) = low {
        low.check(m, n);
    }
    if k == 0 {
        let mut y = vec![0f32; m * n];
        if let Some(l) = low {
            let threads = rayon::current_num_threads();
            scaled_matmul((m, n, l.r), &mut y, n, false, l.lhs, l.rhs, l.s, threads);
        }
        return y;
    }
    check_operands((m, n, k), lhs, rhs, "matmul");
    if transposes_output((m, n, k), lhs, rhs) {
        return transposed_product((m, n, k), lhs, rhs, low);
    }
    if transposes_rhs((m, n, k), rhs) {
        return transposing_product((m, n, k), lhs, rhs, low);
    }
    // Each thread takes a block of columns with a single-threaded gemm: at these sizes
    // that beats gemm's own split, most of all for few rows (1.3-1.6x at 128 rows;
    // BENCHMARKS.md, "train (CPU)"). Too few columns for every thread (a LoRA rank, say)
    // and enough rows: blocks of rows instead.
    let all = rayon::current_num_threads();
    let threads = all.min(n / COLUMN_BLOCK).max(1);
    let by_rows = threads < all && m >= all * ROW_BLOCK;
    let (blocks, width) = if by_rows {
        (m, m.div_ceil(all).next_multiple_of(8).min(m))
    } else {
        (n, n.div_ceil(threads).next_multiple_of(16).min(n))
    };
    let block = |out: SendPtr, start: usize| {
        let len = width.min(blocks - start);
        let ((rows, cols), (i0, j0)) = if by_rows {
            ((len, n), (start, 0))
        } else {
            ((m, len), (0, start))
        };
        // SAFETY: the checks keep every read of lhs and rhs (rows start..start + len of
        // lhs, or columns start..start + len of rhs) and of the low-rank term (`check`)
        // inside their slices, and `dst` has room for the m x n result at row stride n;
        // the blocks write disjoint rows or columns. With `read_dst` false gemm sets
        // alpha to zero and then, on every path (micro-kernels, gemv; k = 0 and r = 0
        // are excluded above), overwrites each element of its block without reading it,
        // so the term's product initialises the block the main one then reads, and all
        // m * n elements are initialised when `par_blocks` returns.
        unsafe {
            let dst = out.get().add(i0 * n + j0);
            if let Some(low) = low {
                low.start_block((i0, rows), (j0, cols), (dst, n));
            }
            serial_gemm(
                (rows, cols, k),
                (dst, n),
                low.is_some(),
                (lhs.0.as_ptr().add(i0 * lhs.1), lhs.1, lhs.2),
                (rhs.0.as_ptr().add(j0 * rhs.2), rhs.1, rhs.2),
            )
        }
    };
    // SAFETY: the blocks cover rows 0..m or columns 0..n, each written once (above).
    unsafe { par_blocks(m * n, (blocks, width), block) }
}

/// A new `len`-element buffer that `block(out, start)` fills for each `start` of
/// `(0..end).step_by(width)` on rayon's threads, writing through `out`, the buffer's
/// start.
///
/// # Safety
///
/// The blocks together write every one of the `len` elements, each once, and nothing
/// outside them.
unsafe fn par_blocks(
    len: usize,
    (end, width): (usize, usize),
    block: impl Fn(SendPtr, usize) + Sync,
) -> Vec<f32> {
    let mut dst = Vec::<f32>::with_capacity(len);
    let out = SendPtr(dst.as_mut_ptr());
    (0..end)
        .step_by(width)
        .collect::<Vec<_>>()
        .into_par_iter()
        .for_each(|start| block(out, start));
    dst.set_len(len);
    dst
}

/// Whether [`matmul_new`] computes `lhs rhs` as the transpose of `rhs^T lhs^T`
/// ([`transposed_product`]): a column-major `rhs` (a weight `W` `[n, k]` as loaded, so
/// the product is a linear layer's `x W^T`, training's layout), a row-major `lhs` of more
/// than 64 rows, a CPU with AVX2 for the transposes, and a weight large beside the rows:
/// `n k > m (2 k + n)`. That weighs gemm's packing of `W` down its columns (`n k`
/// elements, gathered 64 rows at a time) against what the other way adds on two threads
/// (`x` transposed and packed by each thread, `2 m k`, and the result's transpose,
/// `m n`). Measured (BENCHMARKS.md, "Session 16"): gains at 512 x 2048 x 2048 and
/// 128 x 2048 x 2048 on a Zen 4 and a Xeon, losses at 512 rows by 512 x 1408 and
/// 1408 x 512 on the Xeon, which the rule leaves out. The rule does not read the thread
/// count, so the path, and with it the bits, stay the same on every count (invariant
/// 11); more than 64 rows keeps gemm's blocking of the sums the same in every block
/// (gemm blocks `k` differently when both sides of its product are 64 or less). On
/// CPUs with AVX-512, weights of at least 2,048 features each way are in panels for
/// training and never reach this product ([`super::panels`]); it serves the smaller ones
/// there, and every size on CPUs with AVX2 alone.
fn transposes_output((m, n, k): (usize, usize, usize), lhs: Operand, rhs: Operand) -> bool {
    let extra = m.saturating_mul(k.saturating_mul(2).saturating_add(n));
    rhs.1 == 1 && lhs.2 == 1 && m > 64 && n.saturating_mul(k) > extra && packed::simd_available()
}

/// [`matmul_new`] for a column-major `rhs` large beside `lhs` ([`transposes_output`]):
/// `lhs` `[m, k]` is transposed to `[k, m]` in registers (slices of the features over the
/// threads), each thread multiplies a block of `W`'s rows (`W = rhs^T` `[n, k]`, row-major
/// as stored) by it with a single-threaded gemm into its block of `y^T` `[n, m]`, and
/// `y^T` is transposed back: each block into its columns of `y` right away where the
/// block is at most [`HOT_BLOCK_BYTES`] (a Xeon's 2 MiB L2), otherwise by blocks of rows
/// after all the products. gemm reads `W` for that product six rows at a time, each
/// along its length (by its source, unpacked below 8,192 rows of `x`), where for `x W^T`
/// it gathers every packed column of `W` down 64 rows `4 k` bytes apart. Each element
/// is one gemm sum over all of `k`, as in gemm's own product (the same bits on the Zen 4
/// and the Xeon measured), added to the low-rank term's when there is one, so the
/// blocks, and with them the thread count, do not change it.
fn transposed_product(
    (m, n, k): (usize, usize, usize),
    lhs: Operand,
    rhs: Operand,
    low: Option<LowRank>,
) -> Vec<f32> {
    let threads = rayon::current_num_threads();
    // x^T [k, m].
    let kb = k.div_ceil(threads).next_multiple_of(8).min(k);
    let transpose_x = |out: SendPtr, c: usize| {
        let e = (c + kb).min(k);
        // SAFETY: the block writes rows c..e of the k x m buffer, its own.
        unsafe { packed::transpose_to(lhs.0, lhs.1, 0..m, c..e, (out.get().add(c * m), m)) }
    };
    // SAFETY: the blocks cover rows 0..k of x^T, each written whole once (above).
    let xt = unsafe { par_blocks(k * m, (k, kb), transpose_x) };
    // y^T [n, m] by blocks of W's rows; each block transposed into its columns of y
    // right after its product when it is at most `HOT_BLOCK_BYTES`, otherwise all of y^T
    // first and then y by blocks of rows. The choice reads the thread count (through the
    // block's size) but cannot change a bit: the product is the same gemm call into
    // either buffer, and the transposes copy.
    let nb = n.div_ceil(threads).next_multiple_of(16).min(n);
    let hot = nb * m * std::mem::size_of::<f32>() <= HOT_BLOCK_BYTES;
    // `out` is y when `hot`, otherwise y^T.
    let product = |out: SendPtr, start: usize| {
        let len = nb.min(n - start);
        // The block's own buffer when it is transposed right away.
        let mut own = hot.then(|| Vec::<f32>::with_capacity(len * m));
        // SAFETY: matmul_plus's checks keep W's rows start..start + len (elements
        // `j * rhs.2 + p`, p < k) and the low-rank term's reads inside their slices;
        // x^T is k x m; the block's len x m at row stride m lie in `own` (hot) or in rows
        // start..start + len of y^T (n x m), this block's own, each element overwritten
        // by the first product into it (`read_dst` false, as in matmul_plus), so all of
        // it is initialised before the transpose reads it, which writes columns
        // start..start + len of the m x n result, this block's own.
        unsafe {
            let dst = match own.as_mut() {
                Some(own) => own.as_mut_ptr(),
                None => out.get().add(start * m),
            };
            if let Some(low) = low {
                // y^T's term: s rhs'^T lhs'^T.
                low.transposed().start_block((start, len), (0, m), (dst, m));
            }
            serial_gemm(
                (len, m, k),
                (dst, m),
                low.is_some(),
                (rhs.0.as_ptr().add(start * rhs.2), rhs.2, 1),
                (xt.as_ptr(), m, 1),
            );
            if let Some(mut own) = own {
                own.set_len(len * m);
                packed::transpose_to(&own, m, 0..len, 0..m, (out.get().add(start), n))
            }
        }
    };
    // SAFETY: the blocks cover rows 0..n of y^T, each written once (above), or when
    // `hot` columns 0..n of y.
    let out = unsafe { par_blocks(n * m, (n, nb), product) };
    if hot {
        return out;
    }
    // Not hot: `out` is y^T.
    drop(xt);
    let yt = out;
    let mb = m.div_ceil(threads).next_multiple_of(8).min(m);
    let transpose_y = |out: SendPtr, i: usize| {
        let e = (i + mb).min(m);
        // SAFETY: the block writes rows i..e of the m x n result, its own.
        unsafe { packed::transpose_to(&yt, m, 0..n, i..e, (out.get().add(i * n), n)) }
    };
    // SAFETY: the blocks cover rows 0..m of the result, each written whole once.
    unsafe { par_blocks(m * n, (m, mb), transpose_y) }
}

/// The largest block of `y^T` a thread of [`transposed_product`] transposes into `y`
/// right after its product, while the block is still in its caches: 2 MiB, a Xeon's L2.
/// On the Xeon that read 1.01-1.08x at 512 x 2048 x 2048 (2 MiB blocks on two threads)
/// and 1.04-1.07x at 128 x 1408 x 512, against 0.98-0.99x at 512 x 5632 x 2048 (blocks of
/// 5.5 MiB, which keep the separate pass); on a Zen 4, 0.96-1.03x (BENCHMARKS.md,
/// "Session 19").
const HOT_BLOCK_BYTES: usize = 2 << 20;

/// Whether [`matmul_new`] transposes `rhs` before gemm's product
/// ([`transposing_product`]): a column-major `rhs` (a linear layer's `x W^T` with `W`
/// `[n, k]` row-major as loaded, training's layout) of at least [`TRANSPOSE_MIN`] rows
/// and columns, for at least 48 rows of `lhs` (fewer, and gemm reads `rhs` unpacked),
/// where the CPU transposes in registers. gemm packs such an operand element by element
/// down 8 KB strides: at 512 x 2048 x 2048 its product took 25.4 ms against 20.1 ms for
/// the same product with `rhs` row-major (BENCHMARKS.md, "Session 15").
fn transposes_rhs((m, n, k): (usize, usize, usize), rhs: Operand) -> bool {
    rhs.1 == 1 && m >= 48 && n >= TRANSPOSE_MIN && k >= TRANSPOSE_MIN && packed::fast_transpose()
}

/// Rows and columns a column-major `rhs` has at least for [`transposing_product`].
const TRANSPOSE_MIN: usize = 256;

/// Input features a slice of [`transposing_product`] transposes at a time: with
/// [`TRANSPOSE_NB`] columns, 1 MB of `rhs` row-major, which stays in the core's L2 while
/// gemm packs it (slices of 128 and 512 features ran as fast, the whole block at once
/// 3-8 % slower at 512 x 2048 x 2048).
const TRANSPOSE_KC: usize = 256;

/// The most columns a block of [`transposing_product`] takes.
const TRANSPOSE_NB: usize = 1024;

/// [`matmul_new`] for a column-major `rhs` ([`transposes_rhs`]): blocks of at most
/// [`TRANSPOSE_NB`] columns over rayon's threads, each running through the input features
/// [`TRANSPOSE_KC`] at a time, the slice of `rhs` transposed to row-major in registers
/// ([`packed::transpose_into`]) and multiplied in by a single-threaded gemm that adds to
/// the block (the low-rank term sets it first when there is one, else the first slice).
fn transposing_product(
    (m, n, k): (usize, usize, usize),
    lhs: Operand,
    rhs: Operand,
    low: Option<LowRank>,
) -> Vec<f32> {
    let threads = rayon::current_num_threads();
    let width = n
        .div_ceil(threads)
        .next_multiple_of(16)
        .min(TRANSPOSE_NB)
        .min(n);
    let block = |out: SendPtr, start: usize| {
        let len = width.min(n - start);
        let mut slice = vec![0f32; TRANSPOSE_KC.min(k) * len];
        if let Some(low) = low {
            // SAFETY: as for the slices' products below (the term's reads: `check`).
            unsafe { low.start_block((0, m), (start, len), (out.get().add(start), n)) }
        }
        for c in (0..k).step_by(TRANSPOSE_KC) {
            let kc = TRANSPOSE_KC.min(k - c);
            // rhs is column-major: its columns are the rows of a row-major matrix of
            // row stride rhs.2.
            packed::transpose_into(rhs.0, rhs.2, start..start + len, c..c + kc, &mut slice);
            // SAFETY: matmul_plus's checks keep the reads of lhs (columns c..c + kc of
            // its m rows) inside its slice; `slice` holds kc x len elements at row
            // stride len; `dst` has room for the m x n result at row stride n and the
            // blocks write disjoint columns. The first product into the block (the
            // low-rank term's, or the first slice's) runs with `read_dst` false, which
            // overwrites every element of the block (as in matmul_plus), so the later
            // ones add to initialised values and `par_blocks` returns them set.
            unsafe {
                serial_gemm(
                    (m, len, kc),
                    (out.get().add(start), n),
                    c > 0 || low.is_some(),
                    (lhs.0.as_ptr().add(c * lhs.2), lhs.1, lhs.2),
                    (slice.as_ptr(), len, 1),
                )
            }
        }
    };
    // SAFETY: the blocks cover columns 0..n, each written once (above).
    unsafe { par_blocks(m * n, (n, width), block) }
}

/// One single-threaded gemm call: `dst = lhs * rhs`, or `dst += lhs * rhs` when
/// `read_dst`, for `m x n` `dst` row-major at row stride `dst.1` and the operands given
/// as (pointer, row stride, column stride).
///
/// # Safety
///
/// Every element `(i, j)` of `dst`, `(i, p)` of `lhs` and `(p, j)` of `rhs` at those
/// strides is in bounds, and nothing else accesses `dst`'s elements meanwhile; with
/// `read_dst` they are initialised (without it gemm overwrites each one unread).
unsafe fn serial_gemm(
    mnk: (usize, usize, usize),
    dst: (*mut f32, usize),
    read_dst: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
) {
    serial_gemm_scaled(mnk, dst, read_dst, lhs, rhs, 1.0)
}

/// [`serial_gemm`] with the product scaled by `s`: `dst (+)= s lhs rhs`.
///
/// # Safety
///
/// As for [`serial_gemm`].
unsafe fn serial_gemm_scaled(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize),
    read_dst: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    s: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        1,
        dst.1 as isize,
        read_dst,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        if read_dst { 1.0 } else { 0.0 },
        s,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Columns a thread's block of [`matmul_new`] has at least.
const COLUMN_BLOCK: usize = 64;

/// Rows a thread's block of [`matmul_new`] has at least, when it splits by rows.
const ROW_BLOCK: usize = 64;

/// An output buffer the blocks of a product share ([`matmul_new`],
/// [`packed::PackedWeight::linear`]); each writes its own rows or columns.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: used only to hand disjoint blocks of one buffer to rayon's threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `x W^T` for `x` `[m, k]` and `w` `[n, k]`, row-major slices: a linear layer's forward.
pub fn linear(x: &[f32], w: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f32> {
    linear_with(
        x,
        Matrix {
            data: w,
            rs: k,
            cs: 1,
        },
        (m, n, k),
    )
}

/// [`linear`] with the weight `[n, k]` as it is stored.
pub fn linear_with(x: &[f32], w: Matrix, (m, n, k): (usize, usize, usize)) -> Vec<f32> {
    frozen_product((m, n, k), x, w.transposed())
}

/// `x rhs` for `x` `[m, k]` row-major and a frozen weight's `rhs` `[k, n]` as stored:
/// the packed micro-kernel where [`packs_per_call`] says so, gemm otherwise.
fn frozen_product((m, n, k): (usize, usize, usize), x: &[f32], rhs: Operand) -> Vec<f32> {
    if packs_per_call(m, k) {
        return packed::strided_product((m, n, k), x, rhs, None);
    }
    matmul_new((m, n, k), (x, k, 1), rhs)
}

/// Whether a product of `m` rows and `k` features with a weight as stored (training's,
/// forward and backward) runs on the packed micro-kernel, the weight packed a panel at a
/// time at the call ([`packed::strided_product`]), rather than on gemm: where packed
/// weights pay ([`packed::packing_pays`]), from as many rows as gemm packs its operand
/// for (48), and for 1,024 to 2,048 features, where it was measured to pay
/// (`benches/packed_ab.rs`: 1.03-1.16x gemm at 512 x 2048 x 2048, parity at 1,408
/// features; 0.91x at 512, 0.8x at 8,192, whose output takes several passes).
fn packs_per_call(m: usize, k: usize) -> bool {
    m >= 48 && (1024..=2048).contains(&k) && packed::packing_pays()
}

/// A 2-D f32 matrix as stored: element `(i, j)` at `i * rs + j * cs` of `data`. A frozen
/// weight `[out, in]` is row-major as loaded, or column-major when the model was set up
/// for inference ([`crate::model::frozen::FrozenLinear::store_for_inference`] where the
/// weights are not packed): the layout the forward's product wants (gemm reads it
/// unpacked for up to 48 rows, and packs it with contiguous reads above that).
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Matrix<'a> {
    /// The matrix as a product operand.
    fn operand(self) -> Operand<'a> {
        (self.data, self.rs, self.cs)
    }

    /// Its transpose as a product operand.
    fn transposed(self) -> Operand<'a> {
        (self.data, self.cs, self.rs)
    }

    /// Element `(i, j)`.
    pub(crate) fn at(self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// The contiguous transpose `[c, r]` of an f32 CPU matrix `[r, c]`, in tiles of 32 x 32
/// over the threads (candle's strided copy runs on one thread).
pub fn transpose(t: &Tensor) -> Result<Tensor> {
    const TILE: usize = 32;
    let (r, c) = t.dims2()?;
    let out = with_matrix(t, |m| {
        // Output rows j..j + TILE (input columns) per task.
        // SAFETY: a chunk is `cols` whole output rows of `r`, and the loops write
        // `dst[jj * r + i]` for every `jj < cols` and `i < r`.
        Ok(unsafe {
            par_uninit(r * c, TILE * r, |blk, dst| {
                let j0 = blk * TILE;
                let cols = dst.len() / r.max(1);
                for i0 in (0..r).step_by(TILE) {
                    for i in i0..(i0 + TILE).min(r) {
                        for jj in 0..cols {
                            dst[jj * r + i].write(m.data[i * m.rs + (j0 + jj) * m.cs]);
                        }
                    }
                }
            })
        })
    })?;
    Tensor::from_vec(out, (c, r), t.device())
}

/// Runs `f` on a 2-D f32 CPU tensor as a [`Matrix`], row-major or column-major as it is
/// stored (any other layout is made contiguous first).
pub fn with_matrix<R>(t: &Tensor, f: impl FnOnce(Matrix) -> Result<R>) -> Result<R> {
    let (r, c) = t.dims2()?;
    let compact = {
        let layout = t.layout();
        let (rs, cs) = (layout.stride()[0], layout.stride()[1]);
        ((cs == 1 && rs == c) || (rs == 1 && cs == r)).then_some((layout.start_offset(), rs, cs))
    };
    let Some((start, rs, cs)) = compact else {
        return with_f32(t, |data| f(Matrix { data, rs: c, cs: 1 }));
    };
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(Matrix {
            data: &s.as_slice::<f32>()?[start..start + r * c],
            rs,
            cs,
        }),
        _ => candle_core::bail!("cpu kernel: expected a matrix on the CPU"),
    }
}

/// `g W` for `g` `[..., n]` and `w` `[n, k]`: a linear layer's input gradient, shaped as
/// `g` with `k` features.
pub fn linear_input_grad(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    input_grad_with(g, (n, k), |gs, m| {
        with_matrix(w, |w| Ok(frozen_product((m, k, n), gs, w.operand())))
    })
}

/// [`linear_input_grad`] over a weight set up for training ([`Panels::input_grad`]).
pub fn panel_input_grad(g: &Tensor, p: &Panels) -> Result<Tensor> {
    input_grad_with(g, p.dims(), |gs, m| Ok(p.input_grad(gs, m, None)))
}

/// A linear layer's input gradient for `g` `[..., n]` and a weight `[n, k]`, shaped as
/// `g` with `k` features: `product(g's m x n elements, m)` gives its `m x k` elements.
fn input_grad_with(
    g: &Tensor,
    (n, k): (usize, usize),
    product: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let mut shape = g.dims().to_vec();
    match shape.last_mut() {
        Some(last) if *last == n => *last = k,
        _ => candle_core::bail!("linear: gradient {:?} for a weight {:?}", g.dims(), [n, k]),
    }
    let m = g.elem_count() / n.max(1);
    let dx = with_f32(g, |gs| product(gs, m))?;
    Tensor::from_vec(dx, shape, g.device())
}

/// Query rows a forward task takes, and the backward's row chunk: the scores of a chunk
/// (`ROW_CHUNK x t`) stay in the core's cache between the products and the softmax.
/// Under a causal mask a chunk computes the keys of its last row for all its rows, so
/// smaller chunks waste less of the upper triangle: 64 rows ran the forward 10 % and
/// the backward 12 % faster than 128 at 4 x 8 heads x 256 positions, and 32 rows
/// slower than 64 (BENCHMARKS.md, "Attention row chunk").
pub const ROW_CHUNK: usize = 64;

/// The shape of one attention call: `q` `[b, heads, s, hd]`, `k`, `v` `[b, kv_heads, t,
/// hd]`, an optional bias `[1 or b, 1, s, t]`.
struct AttnShape {
    b: usize,
    nkv: usize,
    /// Query heads per kv head; a kv head's queries are `groups * s` rows of `q`.
    groups: usize,
    s: usize,
    t: usize,
    hd: usize,
    bias_per_batch: bool,
}

impl AttnShape {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (b, nh, s, hd) = q.dims4()?;
        let (kb, nkv, t, khd) = k.dims4()?;
        if kb != b || khd != hd || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        let bias_per_batch = match bias.map(Tensor::dims) {
            None => false,
            Some(&[bb, 1, bs, bt]) if bs == s && bt == t && (bb == 1 || bb == b) => {
                bb == b && b > 1
            }
            Some(d) => candle_core::bail!("attention: bias {d:?} for scores [{b}, {nh}, {s}, {t}]"),
        };
        Ok(Self {
            b,
            nkv,
            groups: nh / nkv,
            s,
            t,
            hd,
            bias_per_batch,
        })
    }

    /// Which `[s, t]` bias batch `bi` takes: its own, or the one all share.
    fn bias_index(&self, bi: usize) -> usize {
        if self.bias_per_batch {
            bi
        } else {
            0
        }
    }

    /// The `[s, t]` bias of batch `bi`.
    fn bias_of<'a>(&self, bias: Option<&'a [f32]>, bi: usize) -> Option<&'a [f32]> {
        let (n, bi) = (self.s * self.t, self.bias_index(bi));
        bias.map(|b| &b[bi * n..(bi + 1) * n])
    }

    /// The [`key_limits`] of each distinct `[s, t]` bias (one per batch when the bias
    /// has a batch dimension, else one), scanned once per call rather than once per
    /// (batch, kv head) task.
    fn limits(&self, bias: Option<&[f32]>) -> Vec<Vec<usize>> {
        let n = if self.bias_per_batch { self.b } else { 1 };
        (0..n)
            .map(|bi| key_limits(self.bias_of(bias, bi), self.s, self.t))
            .collect()
    }

    /// Batch `bi`'s limits among [`AttnShape::limits`].
    fn limits_of<'a>(&self, limits: &'a [Vec<usize>], bi: usize) -> &'a [usize] {
        &limits[self.bias_index(bi)]
    }

    /// Rows of queries per kv head, and the gemm threads per task: 1 when there are
    /// enough (batch, kv head) tasks to keep every thread busy.
    fn rows(&self) -> usize {
        self.groups * self.s
    }

    fn threads_per_task(&self, tasks: usize) -> usize {
        let threads = rayon::current_num_threads();
        if tasks >= threads {
            1
        } else {
            threads
        }
    }
}

/// Runs `f` on the elements of an optional bias.
fn with_bias<R>(bias: Option<&Tensor>, f: impl FnOnce(Option<&[f32]>) -> Result<R>) -> Result<R> {
    match bias {
        Some(b) => with_f32(b, |b| f(Some(b))),
        None => f(None),
    }
}

/// Per query position of one batch's bias `[s, t]`: one past its last key that is not
/// masked (bias above half of [`MASKED`]), or `t` when every key is masked, since such a
/// row's softmax spans all of them. Keys past a query's limit get a probability of
/// exactly 0 (`exp` of about -1e9), so the kernels leave them out: under a causal mask,
/// the upper triangle of the scores.
fn key_limits(bias: Option<&[f32]>, s: usize, t: usize) -> Vec<usize> {
    let masked = (MASKED / 2.0) as f32;
    match bias {
        None => vec![t; s],
        Some(b) => b
            .chunks_exact(t.max(1))
            .take(s)
            .map(|row| row.iter().rposition(|&v| v > masked).map_or(t, |j| j + 1))
            .collect(),
    }
}

/// Keys that rows `first..first + r` need: the largest of their [`key_limits`] (row `i`
/// is query position `i % s`).
fn chunk_keys(limits: &[usize], first: usize, r: usize) -> usize {
    let s = limits.len().max(1);
    (first..first + r).map(|i| limits[i % s]).max().unwrap_or(0)
}

/// Whether [`attention_forward`] and [`attention_backward`] serve these inputs.
pub fn usable_attention(q: &Tensor, bias: Option<&Tensor>) -> bool {
    q.device().is_cpu()
        && q.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32 && b.rank() == 4)
}

/// Scaled dot-product attention `softmax(q k^T * scale + bias) v`, grouped-query, as
/// `fused::attention`; returns `[b, heads, s, hd]`. Each task takes up to
/// [`ROW_CHUNK`] query rows of one (batch, kv head): scores, softmax and the product with
/// `v` run on a buffer that stays in cache, and the probabilities are never stored.
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Vec<f32>> {
    let g = AttnShape::of(q, k, v, bias)?;
    let (rows, t, hd) = (g.rows(), g.t, g.hd);
    let mut out = par_zeroed(q.elem_count());
    if out.is_empty() || t == 0 {
        return Ok(out);
    }
    let tasks = g.b * g.nkv * rows.div_ceil(ROW_CHUNK);
    let threads = g.threads_per_task(tasks);
    with_f32(q, |qs| {
        with_f32(k, |ks| {
            with_f32(v, |vs| {
                with_bias(bias, |bias| {
                    let all_limits = g.limits(bias);
                    out.par_chunks_mut(rows * hd)
                        .enumerate()
                        .for_each(|(blk, ob)| {
                            let bias = g.bias_of(bias, blk / g.nkv);
                            let limits = g.limits_of(&all_limits, blk / g.nkv);
                            let kb = &ks[blk * t * hd..(blk + 1) * t * hd];
                            let vb = &vs[blk * t * hd..(blk + 1) * t * hd];
                            let qb = &qs[blk * rows * hd..(blk + 1) * rows * hd];
                            ob.par_chunks_mut(ROW_CHUNK * hd)
                                .enumerate()
                                .for_each(|(c, oc)| {
                                    let r = oc.len() / hd;
                                    let qc = &qb[c * ROW_CHUNK * hd..c * ROW_CHUNK * hd + r * hd];
                                    // The keys these rows see (`tc` of `t`).
                                    let tc = chunk_keys(limits, c * ROW_CHUNK, r);
                                    let mut z = vec![0f32; r * tc];
                                    matmul(
                                        (r, tc, hd),
                                        &mut z,
                                        tc,
                                        false,
                                        (qc, hd, 1),
                                        (kb, 1, hd),
                                        threads,
                                    );
                                    softmax_block(
                                        &mut z,
                                        tc,
                                        c * ROW_CHUNK,
                                        (g.s, t),
                                        bias,
                                        scale as f32,
                                    );
                                    matmul(
                                        (r, hd, tc),
                                        oc,
                                        hd,
                                        false,
                                        (&z, tc, 1),
                                        (vb, hd, 1),
                                        threads,
                                    );
                                });
                        });
                    Ok(())
                })
            })
        })
    })?;
    Ok(out)
}

/// The gradients of [`attention_forward`] for `q`, `k` and `v` given the output's `dout`.
/// One task per (batch, kv head), over its query rows in chunks of [`ROW_CHUNK`]: the
/// probabilities are recomputed, and `dK`, `dV` summed over the chunks in order.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    dout: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = AttnShape::of(q, k, v, bias)?;
    if dout.dims() != q.dims() {
        candle_core::bail!(
            "attention: gradient {:?} for output {:?}",
            dout.dims(),
            q.dims()
        )
    }
    let (rows, t, hd) = (g.rows(), g.t, g.hd);
    let mut dq = par_zeroed(q.elem_count());
    let (mut dk, mut dv) = (par_zeroed(k.elem_count()), par_zeroed(v.elem_count()));
    if !dq.is_empty() && t > 0 {
        let threads = g.threads_per_task(g.b * g.nkv);
        let scale = scale as f32;
        with_f32(q, |qs| {
            with_f32(k, |ks| {
                with_f32(v, |vs| {
                    with_f32(dout, |dos| {
                        with_bias(bias, |bias| {
                            let all_limits = g.limits(bias);
                            dq.par_chunks_mut(rows * hd)
                                .zip(dk.par_chunks_mut(t * hd).zip(dv.par_chunks_mut(t * hd)))
                                .enumerate()
                                .for_each(|(blk, (dqb, (dkb, dvb)))| {
                                    let bias = g.bias_of(bias, blk / g.nkv);
                                    let limits = g.limits_of(&all_limits, blk / g.nkv);
                                    let kb = &ks[blk * t * hd..(blk + 1) * t * hd];
                                    let vb = &vs[blk * t * hd..(blk + 1) * t * hd];
                                    let qb = &qs[blk * rows * hd..(blk + 1) * rows * hd];
                                    let dob = &dos[blk * rows * hd..(blk + 1) * rows * hd];
                                    let chunk = ROW_CHUNK.min(rows);
                                    let (mut p, mut ds) =
                                        (vec![0f32; chunk * t], vec![0f32; chunk * t]);
                                    for (c, r0) in (0..rows).step_by(ROW_CHUNK).enumerate() {
                                        let r = ROW_CHUNK.min(rows - r0);
                                        // The keys these rows see (`tc` of `t`); the
                                        // gradients of the others get nothing from them
                                        // (dK and dV start as zeros).
                                        let tc = chunk_keys(limits, r0, r);
                                        let (p, ds) = (&mut p[..r * tc], &mut ds[..r * tc]);
                                        let span = r0 * hd..(r0 + r) * hd;
                                        let (qc, doc) = (&qb[span.clone()], &dob[span.clone()]);
                                        // P, recomputed.
                                        matmul(
                                            (r, tc, hd),
                                            p,
                                            tc,
                                            false,
                                            (qc, hd, 1),
                                            (kb, 1, hd),
                                            threads,
                                        );
                                        softmax_block(p, tc, r0, (g.s, t), bias, scale);
                                        // dP = dO v^T, then dS in place.
                                        matmul(
                                            (r, tc, hd),
                                            ds,
                                            tc,
                                            false,
                                            (doc, hd, 1),
                                            (vb, 1, hd),
                                            threads,
                                        );
                                        softmax_grad_block(p, ds, tc, scale);
                                        let acc = c > 0;
                                        // dV += P^T dO; dK += dS^T q; dQ = dS k.
                                        matmul(
                                            (tc, hd, r),
                                            dvb,
                                            hd,
                                            acc,
                                            (p, 1, tc),
                                            (doc, hd, 1),
                                            threads,
                                        );
                                        matmul(
                                            (tc, hd, r),
                                            dkb,
                                            hd,
                                            acc,
                                            (ds, 1, tc),
                                            (qc, hd, 1),
                                            threads,
                                        );
                                        matmul(
                                            (r, hd, tc),
                                            &mut dqb[span],
                                            hd,
                                            false,
                                            (ds, tc, 1),
                                            (kb, hd, 1),
                                            threads,
                                        );
                                    }
                                });
                            Ok(())
                        })
                    })
                })
            })
        })?;
    }
    let dev = q.device();
    Ok((
        Tensor::from_vec(dq, q.shape(), dev)?,
        Tensor::from_vec(dk, k.shape(), dev)?,
        Tensor::from_vec(dv, v.shape(), dev)?,
    ))
}

/// Whether [`lora_forward`] and [`lora_backward`] serve this LoRA linear: everything f32
/// on the CPU (a packed weight is).
pub fn usable_lora(x: &Tensor, w: &Weight, a: &Tensor, b: &Tensor) -> bool {
    let w_ok = match w {
        Weight::Tensor(w) => w.device().is_cpu() && w.dtype() == DType::F32,
        Weight::Packed(_) | Weight::Paneled(..) => true,
    };
    w_ok && x.device().is_cpu() && [x, a, b].iter().all(|t| t.dtype() == DType::F32)
}

/// The sizes of a LoRA linear: `x` `[m, in]`, `w` `[out, in]`, `a` `[r, in]`, `b`
/// `[out, r]`; returns `(m, in, out, r)`.
fn lora_dims(
    x: &Tensor,
    (o, wi): (usize, usize),
    a: &Tensor,
    b: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    let (m, i) = x.dims2()?;
    let (r, ai) = a.dims2()?;
    let (bo, br) = b.dims2()?;
    if wi != i || ai != i || bo != o || br != r {
        candle_core::bail!(
            "lora linear: x {:?}, W {:?}, A {:?}, B {:?} do not fit",
            x.dims(),
            [o, wi],
            a.dims(),
            b.dims()
        )
    }
    Ok((m, i, o, r))
}

/// `y = x W^T (+ bias) + s (x A^T) B^T` for `x` `[m, in]`: with a packed weight, or one
/// packed at the call (`packs_per_call`), one pass over the output
/// ([`packed::PackedWeight::lora_linear`], [`packed::PackedRows::strided_product`], the
/// rows packed once for `x A^T` and the main product); otherwise gemm's base product
/// starting from the low-rank update ([`matmul_plus`]), with no pass of its own.
/// A weight in panels ([`Weight::Paneled`]) runs [`super::panels::Panels::forward`],
/// the update summed first. Returns `y` and, for a weight not packed for the AVX2 kernel
/// (training's), `t = x A^T` `[m, r]`, which [`lora_backward`] takes instead of computing
/// it again.
pub fn lora_forward(
    x: &Tensor,
    w: &Weight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let (m, i, o, r) = lora_dims(x, w.dims()?, a, b)?;
    let (mut y, t) = with_f32(x, |xs| {
        with_f32(a, |as_| {
            with_f32(b, |bs| {
                let w = match w {
                    Weight::Packed(p) => {
                        return Ok((p.lora_linear(xs, m, as_, bs, r, s as f32), None))
                    }
                    Weight::Paneled(p) => {
                        let t = linear(xs, as_, (m, r, i));
                        let update = Update {
                            t: &t,
                            b: (bs, r, 1),
                            r,
                            s: s as f32,
                        };
                        return Ok((p.forward(xs, m, Some(update)), Some(t)));
                    }
                    Weight::Tensor(w) => w,
                };
                if packs_per_call(m, i) {
                    let xp = packed::PackedRows::new(xs, m, i);
                    let t = xp.times_small((as_, i, 1), r);
                    // The low-rank update continues each output's sum (B^T as stored).
                    let st: Vec<f32> = t.iter().map(|v| v * s as f32).collect();
                    let low = Some((&st[..], r, (bs, 1, r)));
                    let y = with_matrix(w, |wm| Ok(xp.strided_product(o, wm.transposed(), low)))?;
                    return Ok((y, Some(t)));
                }
                let t = linear(xs, as_, (m, r, i));
                // The update s t B^T (B^T as stored) is the term the product starts from.
                let up = (r > 0).then_some(LowRank {
                    lhs: (&t, r, 1),
                    rhs: (bs, 1, r),
                    r,
                    s: s as f32,
                });
                let y = with_matrix(w, |wm| {
                    Ok(matmul_plus((m, o, i), (xs, i, 1), wm.transposed(), up))
                })?;
                Ok((y, Some(t)))
            })
        })
    })?;
    if let Some(bias) = bias {
        with_f32(bias, |bv| {
            if bv.len() != o {
                candle_core::bail!("lora linear: bias of {} for {o} outputs", bv.len())
            }
            for row in y.chunks_exact_mut(o) {
                for (yj, &bj) in row.iter_mut().zip(bv) {
                    *yj += bj;
                }
            }
            Ok(())
        })?;
    }
    Ok((y, t))
}

/// The gradients of [`lora_forward`] given `g` `[m, out]`: for `x` (when `need_dx`),
/// `A` and `B`. `dx = g W + s (g B) A`, `dA = s (g B)^T x`, `dB = s g^T (x A^T)`; `t`
/// is `x A^T` as the forward computed it (computed here when `None`). A packed weight
/// (inference's) is unpacked for it; one set up for training gives `dx` from its panels.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    x: &Tensor,
    w: &Weight,
    a: &Tensor,
    b: &Tensor,
    g: &Tensor,
    s: f64,
    t: Option<&[f32]>,
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let (m, i, o, r) = lora_dims(x, w.dims()?, a, b)?;
    if g.dims() != [m, o] || t.is_some_and(|t| t.len() != m * r) {
        candle_core::bail!("lora linear: gradient {:?} for output [{m}, {o}]", g.dims())
    }
    let s = s as f32;
    // The weight as a tensor where dx is wanted from one (unpacked where it is packed
    // for inference).
    let dense = match w {
        Weight::Paneled(p) if p.trains() => None,
        _ if !need_dx => None,
        _ => Some(w.to_tensor()?),
    };
    let (dx, da, db) = with_f32(x, |xs| {
        with_f32(a, |as_| {
            with_f32(b, |bs| {
                with_f32(g, |gs| {
                    let computed;
                    let t = match t {
                        Some(t) => t,
                        None => {
                            computed = linear(xs, as_, (m, r, i));
                            &computed[..]
                        }
                    };
                    // u = g B [m, r], dA and dB; then dx = g W + s u A.
                    let (u, da, db) = adapter_grads((m, i, o, r), xs, gs, (bs, t), s);
                    if !need_dx {
                        return Ok((None, da, db));
                    }
                    let dx = match (w, &dense) {
                        (Weight::Paneled(p), None) => {
                            // The update's B is A^T (A as stored).
                            let update = Update {
                                t: &u,
                                b: (as_, 1, i),
                                r,
                                s,
                            };
                            p.input_grad(gs, m, Some(update))
                        }
                        (_, Some(w)) => with_matrix(w, |wm| {
                            Ok(dense_input_grad((m, i, o, r), gs, wm, &u, as_, s))
                        })?,
                        (_, None) => unreachable!("a tensor is there where dx is wanted"),
                    };
                    Ok((Some(dx), da, db))
                })
            })
        })
    })?;
    let dev = x.device();
    let dx = match dx {
        Some(dx) => Some(Tensor::from_vec(dx, (m, i), dev)?),
        None => None,
    };
    Ok((
        dx,
        Tensor::from_vec(da, (r, i), dev)?,
        Tensor::from_vec(db, (o, r), dev)?,
    ))
}

/// [`lora_backward`]'s `dx = g W + s u A` for a weight as a tensor: on `g`'s rows packed
/// where [`packs_per_call`] says so, otherwise gemm's product starting from `s u A`.
fn dense_input_grad(
    (m, i, o, r): (usize, usize, usize, usize),
    gs: &[f32],
    wm: Matrix,
    u: &[f32],
    as_: &[f32],
    s: f32,
) -> Vec<f32> {
    if packs_per_call(m, o) {
        // On g's rows packed, the sums continuing into s u A (A as stored).
        let gp = packed::PackedRows::new(gs, m, o);
        let su: Vec<f32> = u.iter().map(|v| v * s).collect();
        let low = Some((&su[..], r, (as_, i, 1)));
        return gp.strided_product(i, wm.operand(), low);
    }
    // The product starts from s (g B) A (A as stored).
    let up = (r > 0).then_some(LowRank {
        lhs: (u, r, 1),
        rhs: (as_, i, 1),
        r,
        s,
    });
    matmul_plus((m, i, o), (gs, o, 1), wm.operand(), up)
}

/// Rows of `x` and `g` one gemm call of [`adapter_grads`] sums over.
const GRAD_ROWS: usize = 64;
/// Columns of `x` or `g` a task of [`adapter_grads`] takes.
const GRAD_COLUMNS: usize = 256;

/// A LoRA linear's adapter gradients from its `m` rows, given `x` `[m, i]`, `g` `[m, o]`,
/// `B` `[o, r]` and `t = x A^T` `[m, r]` (row-major slices): `u = g B` `[m, r]` (which
/// the input's gradient needs too), `dA = s u^T x` `[r, i]` and `dB = s g^T t` `[o, r]`.
///
/// Two passes, each a rayon task per block of `GRAD_COLUMNS` (256) columns, each block
/// taking its rows `GRAD_ROWS` (64) at a time with single-threaded gemm calls: over `g`,
/// the block's part of `u` (a partial sum over its columns) and its columns of
/// `dB^T = s t^T g`, so that `g` is read once for both; then over `x`, its columns of
/// `dA`. The partial `u`s are added in the blocks' order. A pass has as many tasks as
/// blocks (8 at 2,048 columns), whatever the thread count: the blocks are what fixes the
/// bits.
///
/// gemm reads `x` (or `g`) for the `r`-row products unpacked, 64 columns down the rows,
/// a panel it reads again for each 6 of the `r` rows: over all 512 rows of the bench's
/// layer (`4 i` bytes apart, so that a panel falls in few of the cache's sets) the panel
/// left the Xeon's L2 between those reads. 64 rows at a time keep it there: 0.78-0.94 ms
/// against 1.01-1.31 ms for `dA` and `dB` at 512 x 2048, r 16, on a Xeon; on a Zen 4
/// 0.42 ms against 0.37-0.41 ms (BENCHMARKS.md, "Session 19"). The blocks do not depend
/// on the thread count, and each element's sum runs over the same calls in the same
/// order, so neither do the bits
/// (`the_lora_backward_gives_the_same_bits_on_every_thread_count`).
pub fn adapter_grads(
    (m, i, o, r): (usize, usize, usize, usize),
    x: &[f32],
    g: &[f32],
    (b, t): (&[f32], &[f32]),
    s: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(
        x.len() >= m * i && g.len() >= m * o && b.len() >= o * r && t.len() >= m * r,
        "adapter gradients: operands too short"
    );
    let (mut da, mut dbt) = (vec![0f32; r * i], vec![0f32; r * o]);
    if m == 0 || r == 0 || o == 0 {
        // No rows, rank or outputs: u = g B and both gradients are zeros.
        return (vec![0f32; m * r], da, dbt);
    }
    // Over g: each block's partial u ([m, r], one after another) and its columns of dB^T.
    let mut u = vec![0f32; o.div_ceil(GRAD_COLUMNS) * m * r];
    let pb = SendPtr(dbt.as_mut_ptr());
    u.par_chunks_mut(m * r).enumerate().for_each(|(blk, part)| {
        let c0 = blk * GRAD_COLUMNS;
        let cols = GRAD_COLUMNS.min(o - c0);
        for p0 in (0..m).step_by(GRAD_ROWS) {
            let rows = GRAD_ROWS.min(m - p0);
            let gb = (g[p0 * o + c0..].as_ptr(), o, 1);
            // SAFETY: the assert above keeps rows p0..p0 + rows of t ([m, r]) and of g's
            // columns c0..c0 + cols ([m, o]), and B's rows c0..c0 + cols ([o, r]),
            // inside their slices. The block writes columns c0..c0 + cols of the r x o
            // dB^T, its own (the first call overwrites them, the others add to them), and
            // rows p0..p0 + rows of its own part.
            unsafe {
                serial_gemm_scaled(
                    (r, cols, rows),
                    (pb.get().add(c0), o),
                    p0 > 0,
                    (t[p0 * r..].as_ptr(), 1, r),
                    gb,
                    s,
                );
                serial_gemm(
                    (rows, r, cols),
                    (part[p0 * r..].as_mut_ptr(), r),
                    false,
                    gb,
                    (b[c0 * r..].as_ptr(), r, 1),
                );
            }
        }
    });
    // u: the first part plus the others, in order.
    let (sum, rest) = u.split_at_mut(m * r);
    for part in rest.chunks_exact(m * r) {
        for (uj, pj) in sum.iter_mut().zip(part) {
            *uj += pj;
        }
    }
    u.truncate(m * r);
    // Over x: columns of dA.
    let pa = SendPtr(da.as_mut_ptr());
    let u_rows = &u;
    (0..i.div_ceil(GRAD_COLUMNS))
        .into_par_iter()
        .for_each(|blk| {
            let c0 = blk * GRAD_COLUMNS;
            let cols = GRAD_COLUMNS.min(i - c0);
            for p0 in (0..m).step_by(GRAD_ROWS) {
                let rows = GRAD_ROWS.min(m - p0);
                // SAFETY: the assert above keeps rows p0..p0 + rows of u ([m, r]) and of
                // x's columns c0..c0 + cols ([m, i]) inside their slices; the block writes
                // columns c0..c0 + cols of the r x i dA, its own, which the first call
                // overwrites and the others add to.
                unsafe {
                    serial_gemm_scaled(
                        (r, cols, rows),
                        (pa.get().add(c0), i),
                        p0 > 0,
                        (u_rows[p0 * r..].as_ptr(), 1, r),
                        (x[p0 * i + c0..].as_ptr(), i, 1),
                        s,
                    )
                }
            }
        });
    let mut db = vec![0f32; o * r];
    packed::transpose_into(&dbt, o, 0..r, 0..o, &mut db);
    (u, da, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_candles_over_partial_tiles() {
        // 37 x 70: tiles of 32 leave remainders both ways; also a transposed input.
        let t = Tensor::arange(0f32, 37.0 * 70.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((37, 70))
            .unwrap();
        for input in [t.clone(), t.t().unwrap()] {
            let ours = transpose(&input).unwrap();
            let want = input.t().unwrap().contiguous().unwrap();
            assert_eq!(ours.dims(), want.dims());
            assert_eq!(
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn strided_inputs_are_gathered_as_candle_lays_them_out() {
        // A 3-d tensor of 40 x 130 x 7 (many tasks of rows), then views of it: a
        // transpose, a narrowed slice (start offset, gaps), a broadcast (zero strides, as
        // the gradient of a sum arrives) and a scalar.
        let dev = candle_core::Device::Cpu;
        let t = Tensor::arange(0f32, 40.0 * 130.0 * 7.0, &dev)
            .unwrap()
            .reshape((40, 130, 7))
            .unwrap();
        let views = [
            t.transpose(1, 2).unwrap(),
            t.narrow(1, 3, 100).unwrap().narrow(2, 1, 5).unwrap(),
            Tensor::new(2.5f32, &dev)
                .unwrap()
                .broadcast_as((4, 128, 64))
                .unwrap(),
            t.narrow(0, 0, 1)
                .unwrap()
                .broadcast_as((3, 130, 7))
                .unwrap(),
            Tensor::new(7f32, &dev).unwrap(),
        ];
        for v in views {
            let want = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = with_f32(&v, |xs| Ok(xs.to_vec())).unwrap();
            assert_eq!(got, want, "{:?} {:?}", v.dims(), v.layout().stride());
        }
    }

    /// [`matmul_plus`] or one of its paths.
    type ProductFn = fn((usize, usize, usize), Operand, Operand, Option<LowRank>) -> Vec<f32>;

    /// `len` patterned values (`a` and `b` pick the pattern), multiples of 1/8 below 2 in
    /// magnitude.
    fn patterned(len: usize, a: usize, b: usize) -> Vec<f32> {
        (0..len)
            .map(|e| ((e * a % b) as f32 - (b / 2) as f32) / 8.0)
            .collect()
    }

    /// A product (`matmul_plus` or one of its paths) on 1, 2 and 3 threads, each result
    /// checked against an f64 product; `lhs` `m x k` and `rhs` `k x n` are patterned
    /// data laid out by the given (row, column) strides. With `rank` > 0, the product
    /// starts from a low-rank term of that rank, scale 1.5, laid out as a LoRA
    /// forward's (`t` `[m, r]` row-major, `B` `[n, r]` as stored). Returns the results in
    /// thread-count order.
    fn product_on_threads(
        product: ProductFn,
        (m, n, k): (usize, usize, usize),
        (lrs, lcs): (usize, usize),
        (rrs, rcs): (usize, usize),
        rank: usize,
    ) -> Vec<Vec<f32>> {
        let (lhs, rhs) = (patterned(m * k, 7, 23), patterned(k * n, 5, 19));
        let (t, bt) = (patterned(m * rank, 3, 13), patterned(n * rank, 11, 17));
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                let low: f64 = (0..rank)
                    .map(|p| t[i * rank + p] as f64 * bt[j * rank + p] as f64)
                    .sum();
                (0..k)
                    .map(|p| lhs[i * lrs + p * lcs] as f64 * rhs[p * rrs + j * rcs] as f64)
                    .sum::<f64>()
                    + 1.5 * low
            })
            .collect();
        let low = (rank > 0).then_some(LowRank {
            lhs: (&t, rank, 1),
            rhs: (&bt, 1, rank),
            r: rank,
            s: 1.5,
        });
        [1, 2, 3]
            .map(|threads| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got =
                    pool.install(|| product((m, n, k), (&lhs, lrs, lcs), (&rhs, rrs, rcs), low));
                assert_eq!(got.len(), m * n);
                for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() < 1e-3 * w.abs().max(1.0),
                        "{m}x{n}x{k} on {threads} threads, element {e}: {g} vs {w}"
                    );
                }
                got
            })
            .to_vec()
    }

    #[test]
    fn matmul_new_splits_by_columns_or_rows_and_matches_a_plain_product() {
        // Wide (column blocks), thin with many rows (row blocks: a LoRA rank), thin with
        // few rows (one block), odd sizes; lhs stored k x m (transposed through its
        // strides).
        for (m, n, k) in [(130, 300, 17), (700, 8, 33), (20, 5, 9), (257, 65, 64)] {
            product_on_threads(matmul_plus, (m, n, k), (1, m), (n, 1), 0);
        }
    }

    #[test]
    fn matmul_plus_starts_every_path_from_the_low_rank_term() {
        // Column blocks, row blocks, one block, the transposed output and the transposing
        // product (the last two called directly too, as matmul_plus picks them by CPU),
        // each with a LoRA-like term of rank 1, 5 or 16; the same bits on every thread
        // count, and no input features at all (the term alone).
        let cm = |k: usize| (1, k);
        // (path, m x n x k, rhs strides, rank)
        type Case = (ProductFn, (usize, usize, usize), (usize, usize), usize);
        let cases: [Case; 9] = [
            (matmul_plus, (130, 300, 17), (300, 1), 5),
            (matmul_plus, (700, 8, 33), (8, 1), 1),
            (matmul_plus, (20, 5, 9), (5, 1), 16),
            (matmul_plus, (70, 300, 530), cm(530), 5),
            (transposed_product, (70, 300, 530), cm(530), 5),
            (transposed_product, (65, 257, 263), cm(263), 16),
            (transposing_product, (50, 1100, 256), cm(256), 5),
            (transposing_product, (48, 257, 600), cm(600), 1),
            (matmul_plus, (33, 40, 0), (40, 1), 3),
        ];
        for (product, (m, n, k), rhs, rank) in cases {
            let runs = product_on_threads(product, (m, n, k), (k, 1), rhs, rank);
            same_bits_on_every_count(&runs, &format!("{m}x{n}x{k} + rank {rank}"));
        }
    }

    /// Asserts that runs on 1, 2, 3, ... threads (of [`product_on_threads`], say) have
    /// the same bits; `what` names them in the message.
    fn same_bits_on_every_count(runs: &[Vec<f32>], what: &str) {
        for (threads, got) in runs.iter().enumerate().skip(1) {
            assert!(
                got.iter()
                    .zip(&runs[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: {} threads gave other bits than 1",
                threads + 1
            );
        }
    }

    #[test]
    fn adapter_grads_match_f64_sums_over_ragged_blocks() {
        // 130 rows: two chunks of 64 and a ragged one; 1,100 outputs: four blocks of 256
        // and a ragged one, so u adds five partial sums; 600 inputs: a ragged dA block.
        // Rank 16 reaches gemm's third panel of 6 rows.
        for (m, i, o, r) in [(130, 600, 1100, 3), (70, 300, 530, 16)] {
            let (x, g) = (patterned(m * i, 7, 23), patterned(m * o, 5, 19));
            let (b, t) = (patterned(o * r, 3, 13), patterned(m * r, 11, 17));
            let s = 1.5;
            let (u, da, db) = adapter_grads((m, i, o, r), &x, &g, (&b, &t), s);
            let close = |got: &[f32], want: Vec<f64>, what: &str| {
                assert_eq!(got.len(), want.len(), "{what}");
                for (e, (&gv, wv)) in got.iter().zip(want).enumerate() {
                    let tol = 1e-5 * wv.abs().max(1.0);
                    assert!(
                        (gv as f64 - wv).abs() <= tol,
                        "{m}x{i}x{o} r {r}, {what}[{e}]: {gv} against {wv}"
                    );
                }
            };
            let u64: Vec<f64> = (0..m * r)
                .map(|e| {
                    let (p, k) = (e / r, e % r);
                    (0..o)
                        .map(|j| g[p * o + j] as f64 * b[j * r + k] as f64)
                        .sum()
                })
                .collect();
            let da64 = (0..r * i)
                .map(|e| {
                    let (k, c) = (e / i, e % i);
                    let sum: f64 = (0..m).map(|p| u64[p * r + k] * x[p * i + c] as f64).sum();
                    s as f64 * sum
                })
                .collect();
            let db64 = (0..o * r)
                .map(|e| {
                    let (j, k) = (e / r, e % r);
                    let sum: f64 = (0..m)
                        .map(|p| g[p * o + j] as f64 * t[p * r + k] as f64)
                        .sum();
                    s as f64 * sum
                })
                .collect();
            close(&u, u64, "u");
            close(&da, da64, "dA");
            close(&db, db64, "dB");
        }
    }

    #[test]
    fn adapter_grads_of_empty_sizes_have_their_shapes() {
        let grads = |(m, i, o, r): (usize, usize, usize, usize)| {
            let (x, g) = (patterned(m * i, 7, 23), patterned(m * o, 5, 19));
            let (b, t) = (patterned(o * r, 3, 13), patterned(m * r, 11, 17));
            let out = adapter_grads((m, i, o, r), &x, &g, (&b, &t), 1.5);
            let lens = (out.0.len(), out.1.len(), out.2.len());
            assert_eq!(lens, (m * r, r * i, o * r), "{m}x{i}x{o} r {r}");
            out
        };
        // No rows, outputs or rank: every product sums nothing.
        for dims in [(0, 5, 6, 2), (4, 5, 0, 2), (4, 5, 6, 0)] {
            let (u, da, db) = grads(dims);
            assert!(
                u.iter().chain(&da).chain(&db).all(|&v| v == 0.0),
                "{dims:?}"
            );
        }
        // No inputs: dA is empty; u and dB do not read x, so they are those of one input.
        let (u, _, db) = grads((4, 0, 6, 2));
        let (u1, _, db1) = grads((4, 1, 6, 2));
        assert_eq!((u, db), (u1, db1));
    }

    #[test]
    fn the_lora_backward_gives_the_same_bits_on_every_thread_count() {
        // dx, dA and dB on 1, 2 and 3 threads: ragged sizes; 512 rows (several chunks of
        // the adapter's gradients); 1,100 outputs, whose u adds five partial sums.
        let dev = candle_core::Device::Cpu;
        let patterned = |shape: (usize, usize), seed: usize| {
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|e| (((e * 7 + seed) % 23) as f32 - 11.0) / 16.0)
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        for (m, i, o, r) in [(300, 260, 270, 5), (512, 700, 400, 8), (130, 600, 1100, 3)] {
            let (x, w, g) = (
                patterned((m, i), 1),
                patterned((o, i), 2),
                patterned((m, o), 3),
            );
            let (a, b) = (patterned((r, i), 4), patterned((o, r), 5));
            let runs = [1, 2, 3].map(|threads| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let (dx, da, db) = pool
                    .install(|| {
                        lora_backward(&x, &Weight::Tensor(w.clone()), &a, &b, &g, 1.5, None, true)
                    })
                    .unwrap();
                [dx.unwrap(), da, db].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            });
            for (n, name) in ["dx", "dA", "dB"].iter().enumerate() {
                let by_count: Vec<Vec<f32>> = runs.iter().map(|run| run[n].clone()).collect();
                same_bits_on_every_count(&by_count, &format!("{m}x{i}x{o} r {r}, {name}"));
            }
        }
    }

    #[test]
    fn matmul_new_transposes_the_output_of_a_large_column_major_rhs() {
        // rhs column-major (a weight [n, k] as loaded, for x W^T) large beside the rows:
        // rows, columns and features not multiples of 8 (the transposes' scalar edges),
        // blocks of W's rows with a ragged last one, 65 rows (the least the path takes)
        // and its neighbours the rule leaves out (64 rows; a weight too small beside the
        // rows); 130 x 4100 x 144 transposes y^T in a separate pass on one thread (a
        // block of 2.1 MB, over `HOT_BLOCK_BYTES`) and block by block on two and three.
        // The transposed product runs on every CPU (its scalar transposes where there is
        // no AVX2), and through matmul_new where that picks it.
        let block_bytes = |threads: usize| {
            4100usize.div_ceil(threads).next_multiple_of(16) * 130 * std::mem::size_of::<f32>()
        };
        assert!(block_bytes(1) > HOT_BLOCK_BYTES && block_bytes(2) <= HOT_BLOCK_BYTES);
        for ((m, n, k), picked) in [
            ((130, 4100, 144), true),
            ((70, 300, 530), true),
            ((100, 1100, 256), true),
            ((65, 257, 263), true),
            ((64, 300, 300), false),
            ((130, 300, 300), false),
        ] {
            let rhs_cm: Operand = (&[], 1, k);
            assert_eq!(
                transposes_output((m, n, k), (&[], k, 1), rhs_cm),
                picked && packed::simd_available(),
                "{m}x{n}x{k}"
            );
            for product in [transposed_product, matmul_plus] {
                let runs = product_on_threads(product, (m, n, k), (k, 1), (1, k), 0);
                // Same bits on every thread count (invariant 11): only the blocks change.
                same_bits_on_every_count(&runs, &format!("{m}x{n}x{k}"));
            }
        }
        // A row-major lhs only: stored k x m it keeps to the other paths.
        assert!(!transposes_output(
            (70, 300, 530),
            (&[], 1, 70),
            (&[], 1, 530)
        ));
    }

    #[test]
    fn matmul_new_transposes_a_column_major_rhs_and_matches_a_plain_product() {
        // rhs column-major (a weight [n, k] as loaded, for x W^T): slices of 256 input
        // features with a ragged last one, blocks of 1,024 columns with a ragged last
        // one, columns not a multiple of 8; and a shape just under the threshold. The
        // transposing product runs on every CPU (its scalar transpose where there is no
        // AVX2), and through matmul_new where that picks it (the first shape takes the
        // transposed output there instead: `transposes_output`).
        for (m, n, k) in [
            (70, 300, 530),
            (50, 1100, 256),
            (48, 257, 263),
            (47, 300, 300),
        ] {
            assert_eq!(
                transposes_rhs((m, n, k), (&[], 1, k)),
                m >= 48 && packed::fast_transpose()
            );
            for product in [transposing_product, matmul_plus] {
                let runs = product_on_threads(product, (m, n, k), (k, 1), (1, k), 0);
                // Same bits on every thread count (invariant 11): only the columns'
                // split changes.
                same_bits_on_every_count(&runs, &format!("{m}x{n}x{k}"));
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_and_keeps_the_special_values() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        // f32's epsilon is 1.19e-7: two ulp at most.
        assert!(worst < 2.4e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn multiversioned_loops_give_the_same_bits_as_the_baseline() {
        // The dispatch picks AVX-512 or AVX2 here when the CPU has them; the baseline
        // `imp` of the same body must agree bit for bit (no implicit FMA contraction, same lane
        // order), or CPU runs would not reproduce across machines.
        let g: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let u: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut fast = vec![MaybeUninit::new(0f32); 1000];
        swiglu_elements(&g, &u, &mut fast);
        // SAFETY: every element was initialised by `vec!`.
        let fast: Vec<f32> = fast.iter().map(|v| unsafe { v.assume_init() }).collect();
        let slow: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&gj, &uj)| (gj / (1.0 + exp(-gj))) * uj)
            .collect();
        assert_eq!(fast, slow);
        let sum = lane_sum(&g);
        let mut acc = [0f32; LANES];
        for (i, v) in g.iter().enumerate() {
            acc[i % LANES] += v;
        }
        assert_eq!(sum, reduce_lanes(acc));
        // Layer norm's fused multiply-adds (its variance and its output): one row of 1,000
        // through the dispatch against the same formula in the baseline build.
        let bias: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.07).sin()).collect();
        let mut fast = vec![MaybeUninit::new(0f32); 1000];
        layer_norm_rows(&g, &u, &bias, &mut fast, 1e-5);
        // SAFETY: every element was initialised by `vec!`.
        let fast: Vec<f32> = fast.iter().map(|v| unsafe { v.assume_init() }).collect();
        let (mean, inv) = mean_inverse(&g, 1e-5);
        let slow: Vec<f32> = g
            .iter()
            .zip(&u)
            .zip(&bias)
            .map(|((&x, &w), &b)| ((x - mean) * inv).mul_add(w, b))
            .collect();
        assert_eq!(fast, slow);
    }
}
