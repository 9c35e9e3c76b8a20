//! Frozen weights packed once for the CPU forward, and the product that reads them.
//!
//! gemm packs both operands of every product into its micro-panels on every call, the
//! weight included: for a frozen weight the same work each time, and at the 128-row
//! products of a one-sequence forward the biggest cost after the multiplications
//! themselves (12-13 % of the bench Llama's forward in `perf`, the weights streaming in
//! from memory while nothing is computed). A model set up for inference
//! ([`crate::model::Llama::store_for_inference`]) packs each f32 weight `[out, in]` once,
//! at load, into panels of [`NR`] output features with the input features running
//! inside them (panel `p` holds `W[16p + j][i]` at `i * 16 + j`, 64-byte rows), and
//! [`PackedWeight::linear`] runs a 6 x 16 FMA micro-kernel straight over those panels and
//! over the input rows as they lie. Same memory as the weight (its last panel padded
//! with zeros); measured against gemm in BENCHMARKS.md ("Session 10").
//!
//! Every output is one chain of fused multiply-adds over the input features in order (in
//! blocks of 2048 features, each block's sum added to the output in order), whatever the thread
//! count or the number of rows: results reproduce bit for bit across thread counts, and
//! the scalar path (`mul_add`, the same order) gives the same bits as the AVX2 one
//! (`simd_and_scalar_paths_agree_to_the_bit_at_every_thread_count`).
//!
//! Packed only where that was measured to pay: x86-64 with AVX2 and FMA and without
//! AVX-512 (where gemm's AVX-512 kernels do twice the work an instruction; no AVX-512
//! kernel here yet; [`packing_pays`]). Elsewhere the weight keeps the transposed layout
//! gemm reads ([`crate::model::frozen::FrozenLinear::store_for_inference`] decides).

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::fused_cpu::{with_matrix, SendPtr};

/// Output features a panel holds: two AVX2 registers of f32.
pub const NR: usize = 16;

/// Rows of the input a micro-kernel call takes: 6 x 2 accumulators, 2 registers of the
/// weight and one broadcast fill 15 of AVX2's 16 registers.
const MR: usize = 6;

/// Input features a pass of the micro-kernel runs over before its sums go to the
/// output (one pass for every model dimension taper has met; the output is then written
/// once).
const KC: usize = 2048;

/// Rows of the input a block takes: all its panels are run over these rows before the
/// next rows, so the rows (at most 120 x 2048 x 4 bytes) stay in the L2 cache.
const MC: usize = 120;

/// Panels a thread takes at least.
const MIN_PANELS: usize = 4;

/// One 64-byte row of a panel: the [`NR`] output features at one input feature.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Row([f32; NR]);

/// A frozen f32 weight `[out, in]` in panels of [`NR`] output features (module docs).
pub struct PackedWeight {
    rows: Vec<Row>,
    out: usize,
    inp: usize,
}

/// Its shape only (a model's `Debug` would otherwise print every weight).
impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("out", &self.out)
            .field("in", &self.inp)
            .finish_non_exhaustive()
    }
}

impl PackedWeight {
    /// Packs the 2-D f32 CPU weight `w` `[out, in]` (any strides). Whatever the CPU:
    /// without AVX2 + FMA the product takes the scalar path (the tests use it), and
    /// whether packing pays here is [`packing_pays`]'s to say.
    pub fn pack(w: &Tensor) -> Result<Self> {
        if !w.device().is_cpu() || w.dtype() != DType::F32 {
            candle_core::bail!("packed weight: f32 on the CPU only, not {:?}", w.dtype())
        }
        let (out, inp) = w.dims2()?;
        let panels = out.div_ceil(NR);
        let mut rows = vec![Row([0.0; NR]); panels * inp];
        with_matrix(w, |m| {
            rows.par_chunks_mut(inp.max(1))
                .enumerate()
                .for_each(|(p, panel)| {
                    for j in 0..NR.min(out - p * NR) {
                        for (i, row) in panel.iter_mut().enumerate() {
                            row.0[j] = m.at(p * NR + j, i);
                        }
                    }
                });
            Ok(())
        })?;
        Ok(Self { rows, out, inp })
    }

    /// `(out, in)`, as the weight's `dims2`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The weight `[out, in]`, row-major, as a new tensor (for the rare backward through
    /// a model set up for inference).
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let (out, inp) = (self.out, self.inp);
        let mut w = Vec::with_capacity(out * inp);
        for o in 0..out {
            let panel = &self.rows[(o / NR) * inp..][..inp];
            w.extend(panel.iter().map(|row| row.0[o % NR]));
        }
        Tensor::from_vec(w, (out, inp), device)
    }

    /// `x W^T` for `x` `[m, in]` row-major: `[m, out]`, on rayon's threads (blocks of
    /// panels, one a thread).
    pub fn linear(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.out, self.inp);
        assert!(
            x.len() >= m * k,
            "packed linear: input shorter than {m} x {k}"
        );
        if m == 0 || n == 0 || k == 0 {
            return vec![0.0; m * n];
        }
        let panels = n.div_ceil(NR);
        let threads = rayon::current_num_threads()
            .min(panels.div_ceil(MIN_PANELS))
            .max(1);
        let per = panels.div_ceil(threads);
        let simd = simd_available();
        let mut y = Vec::<f32>::with_capacity(m * n);
        let out = SendPtr(y.as_mut_ptr());
        (0..panels)
            .step_by(per)
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|p0| {
                // SAFETY: `x` holds m x k elements (asserted), `y` has room for m x n,
                // and the blocks write disjoint panels (columns).
                unsafe { self.run_panels(x, m, p0..(p0 + per).min(panels), out, simd) }
            });
        // SAFETY: the first input block (kb = 0) wrote every element of every panel's
        // columns for every row, and the blocks cover all panels.
        unsafe { y.set_len(m * n) };
        y
    }

    /// Panels `range` of the product into `y`.
    ///
    /// # Safety
    ///
    /// `x` holds `m` rows of `in` features, `y` has room for `m x out`, and no other
    /// thread writes these panels' columns.
    unsafe fn run_panels(
        &self,
        x: &[f32],
        m: usize,
        range: std::ops::Range<usize>,
        y: SendPtr,
        simd: bool,
    ) {
        let (n, k) = (self.out, self.inp);
        for kb in (0..k).step_by(KC) {
            let kc = KC.min(k - kb);
            for ib in (0..m).step_by(MC) {
                let end = (ib + MC).min(m);
                for p in range.clone() {
                    let w = self.rows.as_ptr().add(p * k + kb).cast::<f32>();
                    let t = Tile {
                        kc,
                        x_rs: k,
                        w,
                        c_rs: n,
                        cols: NR.min(n - p * NR),
                        accumulate: kb > 0,
                    };
                    let mut i = ib;
                    while i < end {
                        let r = MR.min(end - i);
                        let xs = x.as_ptr().add(i * k + kb);
                        let c = y.get().add(i * n + p * NR);
                        t.run(r, xs, c, simd);
                        i += r;
                    }
                }
            }
        }
    }
}

/// One micro-kernel call's fixed arguments: `kc` input features, the input's row stride,
/// the panel's rows from the block's first feature, the output's row stride, the
/// panel's real columns, and whether the sums add to the output or replace it.
#[derive(Clone, Copy)]
struct Tile {
    kc: usize,
    x_rs: usize,
    w: *const f32,
    c_rs: usize,
    cols: usize,
    accumulate: bool,
}

impl Tile {
    /// `r` rows (1..=6) from `x`, into `c`.
    ///
    /// # Safety
    ///
    /// `x` has `r` rows of `kc` features at stride `x_rs`, `w` has `kc` panel rows, and
    /// `c` has `r` rows of `cols` elements at stride `c_rs`, which no one else touches
    /// (initialised when `accumulate`).
    unsafe fn run(self, r: usize, x: *const f32, c: *mut f32, simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            match r {
                6 => return avx2::tile::<6>(self, x, c),
                5 => return avx2::tile::<5>(self, x, c),
                4 => return avx2::tile::<4>(self, x, c),
                3 => return avx2::tile::<3>(self, x, c),
                2 => return avx2::tile::<2>(self, x, c),
                _ => return avx2::tile::<1>(self, x, c),
            }
        }
        let _ = simd;
        self.scalar(r, x, c)
    }

    /// The same sums one element at a time, in the same order (`mul_add` is the FMA).
    ///
    /// # Safety
    ///
    /// As [`Tile::run`].
    unsafe fn scalar(self, r: usize, x: *const f32, c: *mut f32) {
        for i in 0..r {
            for j in 0..self.cols {
                let mut s = 0f32;
                for kk in 0..self.kc {
                    s = (*x.add(i * self.x_rs + kk)).mul_add(*self.w.add(kk * NR + j), s);
                }
                let cp = c.add(i * self.c_rs + j);
                *cp = if self.accumulate { *cp + s } else { s };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Tile, NR};

    /// `R` rows times the panel's 16 columns: 2R accumulators, one FMA chain each.
    ///
    /// # Safety
    ///
    /// As [`Tile::run`], and the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize>(t: Tile, x: *const f32, c: *mut f32) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..t.kc {
            let w0 = _mm256_load_ps(t.w.add(kk * NR));
            let w1 = _mm256_load_ps(t.w.add(kk * NR + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(r * t.x_rs + kk));
                a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let cp = c.add(r * t.c_rs);
            if t.cols == NR {
                let (mut lo, mut hi) = (a[0], a[1]);
                if t.accumulate {
                    lo = _mm256_add_ps(_mm256_loadu_ps(cp), lo);
                    hi = _mm256_add_ps(_mm256_loadu_ps(cp.add(8)), hi);
                }
                _mm256_storeu_ps(cp, lo);
                _mm256_storeu_ps(cp.add(8), hi);
            } else {
                let mut s = [0f32; NR];
                _mm256_storeu_ps(s.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(s.as_mut_ptr().add(8), a[1]);
                for (j, &v) in s.iter().enumerate().take(t.cols) {
                    let e = cp.add(j);
                    *e = if t.accumulate { *e + v } else { v };
                }
            }
        }
    }
}

/// Whether this CPU runs the AVX2 + FMA micro-kernel.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether weights are packed on this CPU (module docs).
pub fn packing_pays() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd_available() && !std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(r: usize, c: usize, seed: u64) -> Tensor {
        let mut s = seed;
        let v: Vec<f32> = (0..r * c)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / 16_777_216.0 - 0.5) * 0.5
            })
            .collect();
        Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// The packed product with the scalar path forced.
    fn scalar_linear(p: &PackedWeight, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = p.dims();
        let mut y = vec![f32::NAN; m * n];
        let out = SendPtr(y.as_mut_ptr());
        // SAFETY: as in `linear`, one thread over every panel.
        unsafe { p.run_panels(x, m, 0..n.div_ceil(NR), out, false) };
        assert!(
            k == 0 || y.iter().all(|v| !v.is_nan()),
            "an element not written"
        );
        y
    }

    #[test]
    fn packed_products_match_candles_over_ragged_shapes() {
        // Rows around the micro-kernel's 6 and the block's 120, outputs around a panel's
        // 16, inputs past one block of 2048; a transposed (column-major) weight too.
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 15, 3),
            (6, 16, 64),
            (7, 17, 130),
            (121, 40, 33),
            (13, 33, 2100),
        ] {
            let (x, w) = (matrix(m, k, 1), matrix(n, k, 2));
            let want = flat(&x.matmul(&w.t().unwrap()).unwrap());
            for weight in [w.clone(), w.t().unwrap().contiguous().unwrap().t().unwrap()] {
                let p = PackedWeight::pack(&weight).unwrap();
                assert_eq!(p.dims(), (n, k));
                let got = p.linear(&flat(&x), m);
                let tol = 1e-6 * (k as f32).sqrt() * 4.0;
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!((g - e).abs() <= tol, "{m}x{n}x{k} [{i}]: {g} against {e}");
                }
            }
        }
    }

    #[test]
    fn simd_and_scalar_paths_agree_to_the_bit_at_every_thread_count() {
        let (m, n, k) = (131, 70, 2100);
        let (x, w) = (flat(&matrix(m, k, 3)), matrix(n, k, 4));
        let p = PackedWeight::pack(&w).unwrap();
        let scalar = scalar_linear(&p, &x, m);
        for threads in [1, 2, 3, 7] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| p.linear(&x, m));
            let same = got
                .iter()
                .zip(&scalar)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{threads} threads differ from the scalar path");
        }
    }

    #[test]
    fn unpacking_gives_the_weight_back_exactly() {
        let w = matrix(37, 19, 5);
        let p = PackedWeight::pack(&w).unwrap();
        assert_eq!(flat(&p.to_tensor(&Device::Cpu).unwrap()), flat(&w));
        // Empty shapes pack and multiply to empty or zero outputs.
        let e = PackedWeight::pack(&matrix(4, 0, 6)).unwrap();
        assert_eq!(e.linear(&[], 3), vec![0.0; 12]);
    }

    #[test]
    fn debug_prints_the_shape_not_the_weights() {
        let p = PackedWeight::pack(&matrix(40, 30, 8)).unwrap();
        assert_eq!(format!("{p:?}"), "PackedWeight { out: 40, in: 30, .. }");
    }

    #[test]
    fn only_f32_cpu_weights_are_packed() {
        let w = matrix(8, 8, 7).to_dtype(DType::BF16).unwrap();
        let err = PackedWeight::pack(&w).unwrap_err().to_string();
        assert!(err.contains("f32 on the CPU only"), "{err}");
    }
}
