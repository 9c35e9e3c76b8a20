//! A frozen weight packed once on CPUs with AVX-512, for training or for inference, and
//! the products over it: our own loops around gemm's AVX-512 micro-kernel.
//!
//! Training's forward `y = x W^T` for `W` `[out, in]` as loaded made gemm pack `W` at
//! every call (a transpose of the whole weight, which does not fit the caches) or, in
//! [`crate::model::fused_cpu`]'s `transposed_product`, transpose `x` and `y` around a
//! product that reads `W` as stored; the backward's `g W` had gemm pack `g` and read `W`
//! down its rows. The weight is frozen, so [`Panels`] packs it once each way, the way
//! gemm's `avx512f` micro-kernel (`gemm_f32::microkernel::avx512f::f32`, 64 x 6 tiles,
//! 24 zmm accumulators) reads its left operand ([`PanelWeight`]): panels of [`MR`] (64)
//! output features, each holding, for every input feature `p`, the panel's 64 weights
//! side by side; `W` for the forward, `W^T` for the backward (`g W = g (W^T)^T`, the
//! same product). The kernel broadcasts its right operand from any strides, so it reads
//! the rows of `x` (or `g`) where they are, and it stores a tile's 64 outputs of a row
//! side by side, so it writes `y` (or `dx`) as it is laid out: no transposes and no
//! packing at the call. The two copies take twice the weight's memory, and the tensor
//! as loaded is let go. Inference packs `W` alone ([`Panels::forward_only`]), in place
//! of the transposed copy it would hold otherwise: the same memory.
//!
//! [`PanelWeight::product`] runs the input features [`KC`] (512) at a time; within a
//! block, for each group of `PANEL_GROUP` (4) panels (a 512 x 256 block of weights,
//! 512 KB, kept in L2), 6 rows at a time against each panel (the rows, 12 KB, stay in
//! L1). Each output is the kernel's sum over the first block (started from the LoRA
//! update when there is one: a call over its `r` features first), then each later
//! block's sum added to it in order: a fixed order whatever the split over threads,
//! which cuts panels and rows. Measured against gemm and PyTorch in BENCHMARKS.md
//! ("Session 20").

use rayon::prelude::*;

use super::fused_cpu::SendPtr;

/// Output features a panel holds: the micro-kernel's 4 x 16 lanes.
pub const MR: usize = 64;
/// Rows of `x` a micro-kernel call takes: its 6 broadcasts.
const NR: usize = 6;
/// Input features the product sums at a time (its depth blocks).
pub const KC: usize = 512;
/// Panels a block of the product runs through before taking the next rows.
const PANEL_GROUP: usize = 4;

/// Features a weight has at least, each way, to be packed in panels for training
/// ([`pays_for_training`]).
pub const PANEL_MIN: usize = 2048;

/// Features a weight has at least, each way, to be packed in panels for inference
/// ([`pays_for_inference`]).
pub const INFERENCE_PANEL_MIN: usize = 512;

/// Whether training packs a weight `[out, in]` in panels, forward and backward (on a CPU
/// that [`available`] allows): at least [`PANEL_MIN`] features each way, where it was
/// measured to pay (BENCHMARKS.md, "Session 20"; at 512 to 1,408 features the panels
/// read 0.82-1.16x gemm's product on the Xeon, 1.03-1.12x on a Zen 4). Training holds
/// the weight twice in panels, so smaller weights stay as they are.
pub fn pays_for_training(out: usize, inp: usize) -> bool {
    out >= PANEL_MIN && inp >= PANEL_MIN
}

/// Whether inference packs a weight `[out, in]` in panels for the forward alone, in
/// place of its transpose (on a CPU that [`available`] allows): at least
/// [`INFERENCE_PANEL_MIN`] features each way. Below 2,048 features (512 x 512 to
/// 8192 x 512) the forward in panels read 0.98-1.20x the transposed layout's at 128 and
/// 512 rows and 0.93-6.32x at 1 to 16 rows, 72 of 75 readings at 1.0x or more, on a Xeon
/// and a Zen 4 (BENCHMARKS.md, "Session 21"); smaller weights were not measured.
pub fn pays_for_inference(out: usize, inp: usize) -> bool {
    out >= INFERENCE_PANEL_MIN && inp >= INFERENCE_PANEL_MIN
}

/// Whether this CPU runs [`PanelWeight`]'s product: x86-64 with AVX-512F.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight `[out, in]` packed in panels of [`MR`] output features (module docs); the
/// last panel's missing features are zeros.
#[derive(Debug)]
pub struct PanelWeight {
    out: usize,
    inp: usize,
    /// `ceil(out / MR)` panels of `inp x MR`.
    data: Vec<f32>,
}

/// A LoRA update for [`PanelWeight::product`]: `s t B^T` with `t` `[m, r]` row-major
/// and `B` `[out, r]` given as (slice, row stride, column stride): `B` itself in the
/// forward, `A^T` in the backward.
#[derive(Clone, Copy)]
pub struct Update<'a> {
    pub t: &'a [f32],
    pub b: (&'a [f32], usize, usize),
    pub r: usize,
    pub s: f32,
}

/// A frozen weight `W` `[out, in]` in panels on CPUs with AVX-512, and no other copy:
/// set up for training ([`crate::model::frozen::FrozenLinear::store_for_training`]),
/// `W` in panels for the forward's `x W^T` and `W^T` for the backward's `g W` (the same
/// product with `W^T` in `W`'s place); set up for inference
/// ([`crate::model::frozen::FrozenLinear::store_for_inference`]), `W` alone.
#[derive(Debug)]
pub struct Panels {
    forward: PanelWeight,
    /// `None` for a weight set up for inference ([`Panels::forward_only`]).
    backward: Option<PanelWeight>,
}

impl Panels {
    /// Packs the weight `[out, in]` whose element `(o, i)` is `at(o, i)` both ways.
    pub fn from_fn(out: usize, inp: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        Self {
            forward: PanelWeight::from_fn(out, inp, &at),
            backward: Some(PanelWeight::from_fn(inp, out, |i, o| at(o, i))),
        }
    }

    /// Packs the weight for the forward alone (inference's layout,
    /// [`crate::model::frozen::FrozenLinear::store_for_inference`]): the weight's memory
    /// once. A backward through it takes the weight unpacked.
    pub fn forward_only(out: usize, inp: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        Self {
            forward: PanelWeight::from_fn(out, inp, at),
            backward: None,
        }
    }

    /// Whether the backward's panels are there ([`Self::input_grad`]).
    pub fn trains(&self) -> bool {
        self.backward.is_some()
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        self.forward.dims()
    }

    /// The weight `[out, in]` row-major ([`PanelWeight::unpack`]).
    pub fn unpack(&self) -> Vec<f32> {
        self.forward.unpack()
    }

    /// `x W^T (+ s t B^T)` `[m, out]` for `x` `[m, in]`: [`PanelWeight::product`].
    pub fn forward(&self, x: &[f32], m: usize, update: Option<Update>) -> Vec<f32> {
        self.forward.product(x, m, update)
    }

    /// `g W (+ s u A)` `[m, in]` for `g` `[m, out]` (the update's `B` is `A^T`):
    /// [`PanelWeight::product`] over `W^T`. Panics unless [`Self::trains`].
    pub fn input_grad(&self, g: &[f32], m: usize, update: Option<Update>) -> Vec<f32> {
        let backward = self.backward.as_ref();
        let backward = backward.expect("panels: input gradient of a weight set up for inference");
        backward.product(g, m, update)
    }
}

impl PanelWeight {
    /// Packs the weight `[out, in]` whose element `(o, i)` is `at(o, i)`.
    pub fn from_fn(out: usize, inp: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let data = pack(out, inp, at);
        Self { out, inp, data }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The weight `[out, in]` row-major, unpacked over the threads a row at a time into
    /// an uninitialised buffer (no zeroing pass, as in `pack`).
    pub fn unpack(&self) -> Vec<f32> {
        let (out, inp) = self.dims();
        let mut w = Vec::<f32>::with_capacity(out * inp);
        if inp == 0 {
            return w;
        }
        w.spare_capacity_mut()[..out * inp]
            .par_chunks_mut(inp)
            .enumerate()
            .for_each(|(o, row)| {
                let panel = &self.data[(o / MR) * inp * MR..][..inp * MR];
                for (v, p) in row.iter_mut().zip(panel.iter().skip(o % MR).step_by(MR)) {
                    v.write(*p);
                }
            });
        // SAFETY: each of the `out` rows of `inp` elements was written in full: a panel
        // holds `inp` weights of each of its outputs, MR apart.
        unsafe { w.set_len(out * inp) };
        w
    }

    /// `y = x W^T` `[m, out]` for `x` `[m, in]` row-major, plus `s t B^T` when `update` is
    /// set (summed first). Panics unless [`available`] and the slices fit the sizes.
    pub fn product(&self, x: &[f32], m: usize, update: Option<Update>) -> Vec<f32> {
        let (n, k) = (self.out, self.inp);
        assert!(available(), "panel product: this CPU has no AVX-512");
        assert_eq!(x.len(), m * k, "panel product: x is not [{m}, {k}]");
        // B in panels like W's (it changes every step; out x r is small).
        let low = update.filter(|u| u.r > 0 && n > 0).map(|u| {
            let (b, rs, cs) = u.b;
            let last = (n - 1) * rs + (u.r - 1) * cs;
            assert!(
                u.t.len() == m * u.r && last < b.len(),
                "panel product: update's t or B does not fit [{m}, {n}] at rank {}",
                u.r
            );
            (u, pack(n, u.r, |o, j| b[o * rs + j * cs]))
        });
        let mut y = Vec::<f32>::with_capacity(m * n);
        if m == 0 || n == 0 {
            return y;
        }
        if k == 0 && low.is_none() {
            return vec![0.0; m * n];
        }
        let out = SendPtr(y.as_mut_ptr());
        let tasks = split(n.div_ceil(MR), m, rayon::current_num_threads());
        tasks.into_par_iter().for_each(|(panels, rows)| {
            let low = low.as_ref().map(|(u, bp)| (*u, &bp[..]));
            // SAFETY: the tasks' (panels, rows) blocks are disjoint and cover y; `run`
            // keeps every read inside x, the panels and the update (sizes checked above)
            // and overwrites each element of its block before reading it.
            unsafe { self.run(x, m, low, out, panels, rows) }
        });
        // SAFETY: every element was written (above).
        unsafe { y.set_len(m * n) };
        y
    }

    /// [`Self::run`] off x86-64, where [`available`] is false and nothing calls it
    /// (gemm has no AVX-512 kernels there).
    ///
    /// # Safety
    ///
    /// Never called.
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run(
        &self,
        _: &[f32],
        _: usize,
        _: Option<(Update, &[f32])>,
        _: SendPtr,
        _: std::ops::Range<usize>,
        _: std::ops::Range<usize>,
    ) {
        unreachable!("panel product: no AVX-512 off x86-64")
    }

    /// One task of [`Self::product`]: outputs of `panels`' features for `rows` of `x`.
    ///
    /// # Safety
    ///
    /// [`available`]; `y` holds `m x out` elements, and nothing else touches this block
    /// of them meanwhile; `x` is `[m, in]` and `low`'s `t` `[m, r]`, its panels packed
    /// from `B` `[out, r]`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run(
        &self,
        x: &[f32],
        m: usize,
        low: Option<(Update, &[f32])>,
        y: SendPtr,
        panels: std::ops::Range<usize>,
        rows: std::ops::Range<usize>,
    ) {
        let (n, k) = (self.out, self.inp);
        debug_assert!(rows.end <= m);
        let kernels = &gemm_f32::microkernel::avx512f::f32::UKR[MR / 16 - 1];
        // dst (i = output feature, j = row) at j n + i; lhs a panel, MR apart a step;
        // rhs (p, j) at j ld + p.
        let call = |q: usize,
                    jr: usize,
                    depth: usize,
                    lhs: *const f32,
                    rhs: (*const f32, usize),
                    add: bool,
                    s: f32| {
            let nr = NR.min(rows.end - jr);
            let mr = MR.min(n - q * MR);
            kernels[nr - 1](
                mr,
                nr,
                depth,
                y.get().add(jr * n + q * MR),
                lhs,
                rhs.0,
                n as isize,
                1,
                MR as isize,
                1,
                rhs.1 as isize,
                1.0,
                s,
                u8::from(add),
                false,
                false,
                false,
                std::ptr::null(),
            )
        };
        for pc in (0..k.max(1)).step_by(KC) {
            let depth = KC.min(k - pc.min(k));
            let mut group = panels.start;
            while group < panels.end {
                let group_end = (group + PANEL_GROUP).min(panels.end);
                for jr in rows.clone().step_by(NR) {
                    for q in group..group_end {
                        let first = pc == 0;
                        if let (true, Some((u, bp))) = (first, low) {
                            let lhs = bp.as_ptr().add(q * u.r * MR);
                            call(
                                q,
                                jr,
                                u.r,
                                lhs,
                                (u.t.as_ptr().add(jr * u.r), u.r),
                                false,
                                u.s,
                            );
                        }
                        if depth > 0 {
                            let lhs = self.data.as_ptr().add(q * k * MR + pc * MR);
                            let add = !first || low.is_some();
                            call(
                                q,
                                jr,
                                depth,
                                lhs,
                                (x.as_ptr().add(jr * k + pc), k),
                                add,
                                1.0,
                            );
                        }
                    }
                }
                group = group_end;
            }
        }
    }
}

/// `out x inp` elements `at(o, i)` in panels of [`MR`] rows (module docs).
fn pack(out: usize, inp: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Vec<f32> {
    let len = out.div_ceil(MR) * inp * MR;
    let mut data = Vec::<f32>::with_capacity(len);
    if inp == 0 {
        return data;
    }
    // A panel in tiles of PACK_TILE input features: a tile's 64 x 16 weights are read a
    // row (or, from a transposed source, a column) at a time and written within 4 KB, so
    // both the forward's panels (from `W`'s rows) and the backward's (from its columns)
    // read and write within the L1. Every element is written once, the missing
    // features of the last panel as zeros, by the thread that packs its panel: no
    // zeroing pass first, which for a large weight is a serial pass over fresh pages.
    const PACK_TILE: usize = 16;
    data.spare_capacity_mut()[..len]
        .par_chunks_mut(inp * MR)
        .enumerate()
        .for_each(|(q, panel)| {
            let rows = MR.min(out - q * MR);
            for p0 in (0..inp).step_by(PACK_TILE) {
                let tile = &mut panel[p0 * MR..(p0 + PACK_TILE).min(inp) * MR];
                for i in 0..MR {
                    for (dp, v) in tile.iter_mut().skip(i).step_by(MR).enumerate() {
                        v.write(if i < rows {
                            at(q * MR + i, p0 + dp)
                        } else {
                            0.0
                        });
                    }
                }
            }
        });
    // SAFETY: the panels cover the `len` elements and each tile's offsets `p * MR + i`
    // (every `p` of the tile, every `i` below MR) cover the tile: all were written.
    unsafe { data.set_len(len) };
    data
}

/// The product's tasks for `panels` panels and `m` rows on `threads` threads: the panels
/// cut in as many runs as threads when there are enough, otherwise each panel's rows cut
/// too (in multiples of 6), so that a wide layer and a narrow one both fill the threads.
fn split(
    panels: usize,
    m: usize,
    threads: usize,
) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let threads = threads.max(1);
    let runs = panels.min(threads).max(1);
    let row_cuts = (threads / runs).max(1);
    let rows_per = m.div_ceil(row_cuts).next_multiple_of(NR).max(NR);
    let per_run = panels.div_ceil(runs);
    let mut tasks = Vec::new();
    for p in (0..panels).step_by(per_run.max(1)) {
        for r in (0..m).step_by(rows_per) {
            tasks.push((p..(p + per_run).min(panels), r..(r + rows_per).min(m)));
        }
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thresholds_take_both_dimensions() {
        let n = INFERENCE_PANEL_MIN;
        assert!(pays_for_inference(n, n));
        assert!(!pays_for_inference(n - 1, n) && !pays_for_inference(n, n - 1));
        let n = PANEL_MIN;
        assert!(pays_for_training(n, n));
        assert!(!pays_for_training(n - 1, n) && !pays_for_training(n, n - 1));
        // A weight that trains in panels also infers in them.
        assert!(pays_for_inference(PANEL_MIN, PANEL_MIN));
    }

    /// Deterministic values in [-1, 1) from a seed.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// `(x, W, t, B)` for `(m, out, in, r)`.
    fn operands((m, n, k, r): (usize, usize, usize, usize)) -> [Vec<f32>; 4] {
        [
            values(m * k, 1),
            values(n * k, 2),
            values(m * r, 3),
            values(n * r, 4),
        ]
    }

    fn product(
        w: &[f32],
        (m, n, k, r): (usize, usize, usize, usize),
        x: &[f32],
        low: Option<(&[f32], &[f32], f32)>,
    ) -> Vec<f32> {
        let p = PanelWeight::from_fn(n, k, |o, i| w[o * k + i]);
        assert_eq!(p.dims(), (n, k));
        let update = low.map(|(t, b, s)| Update {
            t,
            b: (b, r, 1),
            r,
            s,
        });
        p.product(x, m, update)
    }

    #[test]
    fn the_product_matches_f64_sums_over_ragged_sizes() {
        if !available() {
            eprintln!("no AVX-512 on this CPU: the panel product is not tried");
            return;
        }
        // Rows past a 6-row group, features past a 64-wide panel, inputs past one and
        // two 512-wide depth blocks, ranks 1, 3 and 16.
        for dims in [
            (13, 130, 1100, 3),
            (6, 64, 512, 16),
            (1, 1, 1, 1),
            (20, 70, 513, 0),
        ] {
            let (m, n, k, r) = dims;
            let [x, w, t, b] = operands(dims);
            for s in [None, Some(0.75f32)] {
                let y = product(&w, dims, &x, s.map(|s| (&t[..], &b[..], s)));
                assert_eq!(y.len(), m * n);
                if let Some(s) = s {
                    // B given as its transpose [r, out] (the backward's A), strided.
                    let bt: Vec<f32> = (0..r * n).map(|e| b[(e % n) * r + e / n]).collect();
                    let p = PanelWeight::from_fn(n, k, |o, i| w[o * k + i]);
                    let update = Update {
                        t: &t,
                        b: (&bt, 1, n),
                        r,
                        s,
                    };
                    let strided = p.product(&x, m, Some(update));
                    let same = strided
                        .iter()
                        .zip(&y)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dims:?}: a strided B changed a bit");
                    assert_eq!(p.unpack(), w, "{dims:?}: unpacked");
                }
                for i in 0..m {
                    for o in 0..n {
                        let mut sum = 0f64;
                        let mut size = 0f64;
                        for p in 0..k {
                            let v = x[i * k + p] as f64 * w[o * k + p] as f64;
                            sum += v;
                            size += v.abs();
                        }
                        if let Some(s) = s {
                            for j in 0..r {
                                let v = s as f64 * t[i * r + j] as f64 * b[o * r + j] as f64;
                                sum += v;
                                size += v.abs();
                            }
                        }
                        let got = y[i * n + o] as f64;
                        assert!(
                            (got - sum).abs() <= 1e-6 * size.max(1.0),
                            "{dims:?} update {s:?} at ({i}, {o}): {got} against {sum}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_product_gives_the_same_bits_on_every_thread_count() {
        if !available() {
            eprintln!("no AVX-512 on this CPU: the panel product is not tried");
            return;
        }
        // 3 panels on 1 to 8 threads: runs of panels, and from 6 threads the 40 rows cut
        // in two too (24 and 16).
        let dims = (40, 150, 1030, 4);
        let [x, w, t, b] = operands(dims);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| product(&w, dims, &x, Some((&t, &b, 1.5))))
        };
        let one = run(1);
        for threads in [2, 3, 5, 6, 8] {
            let y = run(threads);
            let same = one.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{threads} threads changed a bit");
        }
    }

    #[test]
    fn empty_sizes_give_their_shapes() {
        if !available() {
            eprintln!("no AVX-512 on this CPU: the panel product is not tried");
            return;
        }
        for dims in [(0, 5, 7, 2), (3, 0, 7, 2), (3, 5, 0, 2), (3, 5, 0, 0)] {
            let (m, n, _, _) = dims;
            let [x, w, t, b] = operands(dims);
            let y = product(&w, dims, &x, None);
            assert_eq!(y, vec![0.0; m * n], "{dims:?}");
            let y = product(&w, dims, &x, Some((&t, &b, 2.0)));
            let want: Vec<f32> = (0..m * n)
                .map(|e| {
                    let (i, o) = (e / n.max(1), e % n.max(1));
                    2.0 * (0..dims.3)
                        .map(|j| t[i * dims.3 + j] * b[o * dims.3 + j])
                        .sum::<f32>()
                })
                .collect();
            let close = y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5);
            assert!(
                y.len() == m * n && close,
                "{dims:?}: {y:?} against {want:?}"
            );
        }
    }

    #[test]
    fn splits_cover_every_panel_and_row_once() {
        for (panels, m, threads) in [(32, 512, 2), (3, 40, 5), (1, 7, 16), (5, 1, 3), (2, 0, 4)] {
            let mut seen = vec![0u8; panels * m];
            for (ps, rows) in split(panels, m, threads) {
                for p in ps {
                    for i in rows.clone() {
                        seen[p * m + i] += 1;
                    }
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "{panels} panels, {m} rows, {threads} threads"
            );
        }
    }
}
