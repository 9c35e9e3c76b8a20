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
//! over the input rows, packed at each call into tiles of 6 rows interleaved feature by
//! feature (`pack_rows`: one stream to read instead of six a row apart, a copy the size
//! of the input). Same memory as the weight (its last panel padded with zeros).
//! [`PackedWeight::lora_linear`] adds a LoRA update in the same pass, its `r` features
//! continuing each output's chain. Training's weights stay as loaded; its products with
//! 1,024-2,048 input features pack them four panels at a time at the call, a row-major
//! weight's next four between the tiles over the current ones ([`strided_product`]). Measured against gemm in BENCHMARKS.md ("Session 10",
//! "Session 11").
//!
//! Every output is one chain of fused multiply-adds over the input features in order (in
//! blocks of 2048 features, each block's sum added to the output in order; a LoRA
//! update's features after the last block's), whatever the thread count or the number of
//! rows: results reproduce bit for bit across thread counts, and
//! the scalar path (`mul_add`, the same order) gives the same bits as the AVX2 one
//! (`simd_and_scalar_paths_agree_to_the_bit_at_every_thread_count`).
//!
//! Packed only where that was measured to pay: x86-64 with AVX2 and FMA and without
//! AVX-512 (where gemm's AVX-512 kernels do twice the work an instruction; no AVX-512
//! kernel here yet; [`packing_pays`]). Elsewhere the weight keeps the transposed layout
//! gemm reads ([`crate::model::frozen::FrozenLinear::store_for_inference`] decides).
//! The 8 x 8 register transpose that fills the panels also serves gemm's products on AMD
//! CPUs (`transpose_into`, `fast_transpose`): training's forward weight, column-major
//! as gemm sees it, transposed a slice at a time before gemm multiplies it in.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

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
/// next rows, so the rows (at most 120 x 2048 x 4 bytes, 960 KB) stay in a 1 MB L2
/// cache. A multiple of [`MR`], so blocks start on whole tiles of the packed rows.
const MC: usize = 120;
const _: () = assert!(MC.is_multiple_of(MR));

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
        with_matrix(w, |m| Ok(Self::from_fn(out, inp, |o, i| m.at(o, i))))
    }

    /// The weight `[out, in]` whose element `(o, i)` is `at(o, i)`.
    fn from_fn(out: usize, inp: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let panels = out.div_ceil(NR);
        let mut rows = vec![Row([0.0; NR]); panels * inp];
        let pack = |(p, panel): (usize, &mut [Row])| {
            for j in 0..NR.min(out - p * NR) {
                for (i, row) in panel.iter_mut().enumerate() {
                    row.0[j] = at(p * NR + j, i);
                }
            }
        };
        if out * inp >= PARALLEL_PACK {
            rows.par_chunks_mut(inp.max(1)).enumerate().for_each(pack);
        } else {
            rows.chunks_mut(inp.max(1)).enumerate().for_each(pack);
        }
        Self { rows, out, inp }
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

    /// `x W^T` for `x` `[m, in]` row-major: `[m, out]`, on rayon's threads (the rows
    /// packed first, `pack_rows`).
    pub fn linear(&self, x: &[f32], m: usize) -> Vec<f32> {
        let k = self.inp;
        assert!(
            x.len() >= m * k,
            "packed linear: input shorter than {m} x {k}"
        );
        self.product(&pack_rows(&x[..m * k], m, k), m, None, simd_available())
    }

    /// `x W^T + s (x A^T) B^T` for `x` `[m, in]`, `a` `[r, in]` and `b` `[out, r]`, all
    /// row-major: a LoRA linear's forward in one pass over the output. The rows are
    /// packed once for both products with them; the low-rank product `s x A^T` runs on
    /// the packed product too (A packed at each call, `r x in`, small), and its `r`
    /// features continue each output's chain of multiply-adds after the input's, with
    /// B packed at each call as a second weight: no product of its own over the output
    /// and no second pass over it.
    pub fn lora_linear(
        &self,
        x: &[f32],
        m: usize,
        a: &[f32],
        b: &[f32],
        r: usize,
        s: f32,
    ) -> Vec<f32> {
        self.lora_with(x, m, (a, b, r, s), simd_available())
    }

    /// [`Self::lora_linear`] on the AVX2 path or the scalar one.
    fn lora_with(
        &self,
        x: &[f32],
        m: usize,
        (a, b, r, s): (&[f32], &[f32], usize, f32),
        simd: bool,
    ) -> Vec<f32> {
        let (n, k) = (self.out, self.inp);
        assert!(
            x.len() >= m * k && a.len() >= r * k && b.len() >= n * r,
            "packed lora linear: x, A or B shorter than {m} x {k}, {r} x {k}, {n} x {r}"
        );
        let xp = pack_rows(&x[..m * k], m, k);
        let down = Self::from_fn(r, k, |j, i| a[j * k + i]);
        let mut t = down.product(&xp, m, None, simd);
        t.iter_mut().for_each(|v| *v *= s);
        let up = Self::from_fn(n, r, |o, j| b[o * r + j]);
        self.product(&xp, m, Some((&up, &pack_rows(&t, m, r))), simd)
    }

    /// The product over rows packed by [`pack_rows`], and `low`'s (a weight `[out, r]`
    /// and its `r` input features packed) after them in every output's sum. Work items
    /// are a block of panels (at least [`MIN_PANELS`], one a thread at most) times a
    /// block of [`MC`] rows, so a weight of one panel still spreads over the threads.
    fn product(
        &self,
        xp: &[f32],
        m: usize,
        low: Option<(&PackedWeight, &[f32])>,
        simd: bool,
    ) -> Vec<f32> {
        let (n, k) = (self.out, self.inp);
        if let Some((w2, x2)) = low {
            assert!(
                w2.out == n && x2.len() == m * w2.inp,
                "packed: low-rank shapes"
            );
        }
        if m == 0 || n == 0 || (k == 0 && low.is_none()) {
            return vec![0.0; m * n];
        }
        let (panels, per) = panel_split(n);
        let mut y = Vec::<f32>::with_capacity(m * n);
        let out = SendPtr(y.as_mut_ptr());
        let items: Vec<_> = (0..panels)
            .step_by(per)
            .flat_map(|p0| (0..m).step_by(MC).map(move |i0| (p0, i0)))
            .collect();
        items.into_par_iter().for_each(|(p0, i0)| {
            let (panels, rows) = (p0..(p0 + per).min(panels), i0..(i0 + MC).min(m));
            // SAFETY: `xp` (and `low`'s rows) hold m rows packed (asserted above and by
            // the callers), `y` has room for m x n, and the items write disjoint blocks.
            unsafe { self.run_block(xp, low, (0, panels), rows, (out, n), simd, None) }
        });
        // SAFETY: every item's first input block wrote every element of its panels'
        // columns for its rows, and the items cover all panels and rows.
        unsafe { y.set_len(m * n) };
        y
    }

    /// Panels `panels` of rows `rows` (a block starting on a tile) of the product into
    /// `y`, `low`'s features (when given) after the input's.
    ///
    /// # Safety
    ///
    /// `xp` is rows of `in` features packed by [`pack_rows`] (and `low`'s of its `r`),
    /// at least up to `rows.end`; `y` has room for them times `out`; and no other thread
    /// writes these elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_block(
        &self,
        xp: &[f32],
        low: Option<(&PackedWeight, &[f32])>,
        (first, panels): (usize, std::ops::Range<usize>),
        rows: std::ops::Range<usize>,
        (y, y_rs): (SendPtr, usize),
        simd: bool,
        mut ahead: Option<&mut Filler>,
    ) {
        let (n, k) = (self.out, self.inp);
        let blocks = k.div_ceil(KC).max(1);
        for (bi, kb) in (0..blocks).map(|bi| (bi, bi * KC)) {
            let kc = KC.min(k - kb);
            for p in panels.clone() {
                let mut t = Tile {
                    kc,
                    w: self.rows.as_ptr().add(p * k + kb).cast::<f32>(),
                    c_rs: y_rs,
                    cols: NR.min(n - p * NR),
                    accumulate: bi > 0,
                    low: None,
                };
                let mut i = rows.start;
                while i < rows.end {
                    let r = MR.min(rows.end - i);
                    if let Some((w2, x2)) = low.filter(|_| bi + 1 == blocks) {
                        let k2 = w2.inp;
                        let w = w2.rows.as_ptr().add((first + p) * k2).cast::<f32>();
                        t.low = Some((k2, w, x2.as_ptr().add(i * k2)));
                    }
                    // The tile of rows i.. starts at i * k (the tiles before it are
                    // full) and holds its r rows at each feature.
                    let xs = xp.as_ptr().add(i * k + kb * r);
                    let c = y.get().add(i * y_rs + (first + p) * NR);
                    t.run(r, xs, c, simd);
                    if let Some(f) = ahead.as_deref_mut() {
                        f.advance();
                    }
                    i += r;
                }
            }
        }
    }
}

/// Rows [`strided_product`] runs over a panel at most before the next panel (16 MB of
/// packed rows at 2,048 features).
const ROW_GROUP: usize = 2046;
const _: () = assert!(ROW_GROUP.is_multiple_of(MR));

/// Panels [`strided_product`] packs at a time, then runs over the rows one after the
/// other: 512 KB at 2,048 features, in a 1 MB L2 cache beside the rows streaming
/// through. Four panels read 256 contiguous bytes of each row of a row-major weight
/// instead of 64 bytes of rows 8 KB apart: packing a row-major 2048 x 2048 weight took
/// 1.8-2.1 ms instead of 3.7 (one panel at a time; BENCHMARKS.md, "Session 12").
const FILL_PANELS: usize = 4;

/// A matrix as stored: `(data, row stride, column stride)`.
pub type Stored<'a> = (&'a [f32], usize, usize);

/// `x B (+ t U)` for `x` `[m, k]` row-major and `b` `[k, n]` as stored (`(data, row
/// stride, column stride)`): the packed micro-kernel over a weight that is not packed
/// (training's, forward `x W^T` and backward `g W`), a few panels of `b` packed at a
/// time into a buffer of the thread's (`FILL_PANELS`), then run over all the rows (a
/// row-major `b`'s next panels filled into a second buffer between the tiles, `Filler`).
/// `low` is `(t, r, u)`: `t` `[m, r]` row-major, `u` `[r, n]` as stored, its `r`
/// features continuing every output's sum. Each output is one chain of multiply-adds in
/// feature order, so the result does not depend on the thread count.
pub fn strided_product(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    b: Stored,
    low: Option<(&[f32], usize, Stored)>,
) -> Vec<f32> {
    assert!(
        x.len() >= m * k,
        "strided product: x shorter than {m} x {k}"
    );
    PackedRows::new(&x[..m * k], m, k).strided_product(n, b, low)
}

/// The rows of `x` `[m, k]` packed once (`pack_rows`) for several products with them:
/// a LoRA linear's `x A^T` and `x W^T` in training's forward, `g W` in its backward.
pub struct PackedRows {
    xp: Vec<f32>,
    m: usize,
    k: usize,
}

impl PackedRows {
    /// Packs `x` `[m, k]` row-major.
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(x.len() >= m * k, "packed rows: x shorter than {m} x {k}");
        Self {
            xp: pack_rows(&x[..m * k], m, k),
            m,
            k,
        }
    }

    /// `x C^T` for a small `c` `[r, k]` as stored (a LoRA factor; packed at the call):
    /// `[m, r]`, the rows in blocks over rayon's threads. The same sums, in the same
    /// order, as [`strided_product`] with `c^T`.
    pub fn times_small(&self, (data, rs, cs): Stored, r: usize) -> Vec<f32> {
        let k = self.k;
        assert!(
            r == 0 || k == 0 || (r - 1) * rs + (k - 1) * cs < data.len(),
            "packed rows: the factor is shorter than {r} x {k}"
        );
        let c = PackedWeight::from_fn(r, k, |j, i| data[j * rs + i * cs]);
        c.product(&self.xp, self.m, None, simd_available())
    }

    /// [`strided_product`] over these rows.
    pub fn strided_product(
        &self,
        n: usize,
        b: Stored,
        low: Option<(&[f32], usize, Stored)>,
    ) -> Vec<f32> {
        let (m, k, xp) = (self.m, self.k, &self.xp);
        assert!(
            k == 0 || n == 0 || (k - 1) * b.1 + (n - 1) * b.2 < b.0.len(),
            "strided product: b shorter than {k} x {n}"
        );
        let simd = simd_available();
        let low = low.map(|(t, r, (u, rs, cs))| {
            let up = PackedWeight::from_fn(n, r, |o, j| u[j * rs + o * cs]);
            (up, pack_rows(&t[..m * r], m, r))
        });
        let low = low.as_ref().map(|(up, tp)| (up, &tp[..]));
        if m == 0 || n == 0 || (k == 0 && low.is_none()) {
            return vec![0.0; m * n];
        }
        let (panels_total, per) = panel_split(n);
        let mut y = Vec::<f32>::with_capacity(m * n);
        let out = SendPtr(y.as_mut_ptr());
        let chunks: Vec<usize> = (0..panels_total).step_by(per).collect();
        chunks.into_par_iter().for_each(|p0| {
            let buffer = || PackedWeight {
                rows: vec![Row([0.0; NR]); FILL_PANELS * k],
                out: NR,
                inp: k,
            };
            let mut panels = buffer();
            // Rows in groups of at most ROW_GROUP (whole tiles), each run over every panel:
            // the group's packed rows stay in the L3 cache while the panels pass. Each
            // run fills the next run's panels between its tiles.
            let groups = m.div_ceil(ROW_GROUP);
            let size = m.div_ceil(groups).next_multiple_of(MR);
            let end = (p0 + per).min(panels_total);
            let cols = |g0: usize| g0 * NR..((g0 + FILL_PANELS).min(end) * NR).min(n);
            let runs: Vec<(usize, usize)> = (0..m)
                .step_by(size)
                .flat_map(|i0| (p0..end).step_by(FILL_PANELS).map(move |g0| (i0, g0)))
                .collect();
            // Only a row-major weight's: a column-major one is read down its columns,
            // which the hardware prefetcher follows.
            let pipelined = b.2 == 1 && runs.len() > 1;
            let mut next = pipelined.then(buffer);
            panels.out = panels.fill_panels(b, cols(runs[0].1), simd);
            for (j, &(i0, g0)) in runs.iter().enumerate() {
                let count = FILL_PANELS.min(end - g0);
                let rows = i0..(i0 + size).min(m);
                let tiles = count * rows.len().div_ceil(MR);
                if j > 0 && !pipelined {
                    panels.out = panels.fill_panels(b, cols(g0), simd);
                }
                let mut ahead = match (runs.get(j + 1), next.as_mut()) {
                    (Some(&(_, g1)), Some(buf)) => Some(Filler::new(buf, b, cols(g1), tiles, simd)),
                    _ => None,
                };
                // SAFETY: `xp` (and `low`'s rows) hold m packed rows, `y` has room for
                // m x n, and the chunks write disjoint columns.
                unsafe {
                    let out = (out, n);
                    panels.run_block(xp, low, (g0, 0..count), rows, out, simd, ahead.as_mut())
                }
                if let Some(f) = ahead {
                    f.finish();
                }
                if let Some(buf) = next.as_mut().filter(|_| j + 1 < runs.len()) {
                    std::mem::swap(&mut panels, buf);
                }
            }
        });
        // SAFETY: every panel's first input block wrote all its columns for every row, and
        // the chunks cover all panels.
        unsafe { y.set_len(m * n) };
        y
    }
}

impl PackedWeight {
    /// Overwrites this weight's first panels with columns `cols` of `b` `[k, n]` as
    /// stored (at most as many as it has room for); returns their count.
    fn fill_panels(&mut self, b: Stored, cols: std::ops::Range<usize>, simd: bool) -> usize {
        self.clear_tail(cols.len());
        self.fill_rows(b, cols.clone(), 0..self.inp, simd);
        cols.len()
    }

    /// Zeroes the panel that `width` columns leave partly filled, if any.
    fn clear_tail(&mut self, width: usize) {
        let k = self.inp;
        if !width.is_multiple_of(NR) {
            let last = &mut self.rows[(width / NR) * k..][..k];
            last.iter_mut().for_each(|row| row.0 = [0.0; NR]);
        }
    }

    /// Rows `rows` (input features) of the first panels, from columns `cols` of `b`
    /// `[k, n]` as stored: a row of `b` at a time when the columns are contiguous, down
    /// the columns otherwise.
    fn fill_rows(
        &mut self,
        (data, rs, cs): Stored,
        cols: std::ops::Range<usize>,
        rows: std::ops::Range<usize>,
        simd: bool,
    ) {
        let (width, c0, k) = (cols.len(), cols.start, self.inp);
        if cs == 1 {
            for i in rows {
                let src = &data[i * rs + c0..][..width];
                for (q, part) in src.chunks(NR).enumerate() {
                    let row = &mut self.rows[q * k + i].0;
                    match <&[f32; NR]>::try_from(part) {
                        Ok(full) => *row = *full,
                        Err(_) => row[..part.len()].copy_from_slice(part),
                    }
                }
            }
        } else {
            // Whole panels of columns contiguous down their length: 8 x 8 blocks
            // transposed in registers; the rest element by element.
            let mut from = 0;
            #[cfg(target_arch = "x86_64")]
            if simd && rs == 1 && rows.len() >= 8 {
                from = width - width % NR;
                let blocks = rows.start..rows.end - rows.len() % 8;
                let last = (c0 + from).saturating_sub(1) * cs + blocks.end;
                assert!(
                    from == 0 || last <= data.len(),
                    "packed: b shorter than its shape"
                );
                for q in 0..from / NR {
                    let panel = &mut self.rows[q * k..][..k];
                    // SAFETY: AVX2 is available (`simd`); columns c0 + 16q.. + 15 hold
                    // the `blocks` elements each at stride 1 from (c0 + j) * cs, in
                    // `data` (asserted), and the panel has k rows.
                    let start = (c0 + q * NR) * cs;
                    unsafe { avx2::transpose_panel(data, start, cs, blocks.clone(), panel) };
                }
                for j in 0..from {
                    let col = (c0 + j) * cs;
                    let panel = &mut self.rows[(j / NR) * k..][..k];
                    for i in blocks.end..rows.end {
                        panel[i].0[j % NR] = data[col + i];
                    }
                }
            }
            let _ = simd;
            for j in from..width {
                let col = (c0 + j) * cs;
                let panel = &mut self.rows[(j / NR) * k..][..k];
                for i in rows.clone() {
                    panel[i].0[j % NR] = data[col + i * rs];
                }
            }
        }
    }
}

/// Fills the next panels of a product packed at the call ([`PackedRows::strided_product`])
/// a slice of input features at a time between the micro-kernel's tiles over the current
/// ones, so that the weight's reads (rows of a row-major weight 8 KB apart, which the
/// hardware prefetcher does not follow) overlap the arithmetic instead of stalling it: each
/// step copies its slice and prefetches the next one's cache lines. Row-major weights
/// only (a column-major one's columns are read in the hardware prefetcher's order).
struct Filler<'a> {
    panels: &'a mut PackedWeight,
    b: Stored<'a>,
    cols: std::ops::Range<usize>,
    done: usize,
    step: usize,
    simd: bool,
}

impl<'a> Filler<'a> {
    /// A filler of columns `cols` of `b` into `panels`, in about `steps` steps.
    fn new(
        panels: &'a mut PackedWeight,
        b: Stored<'a>,
        cols: std::ops::Range<usize>,
        steps: usize,
        simd: bool,
    ) -> Self {
        panels.clear_tail(cols.len());
        panels.out = cols.len();
        let step = panels.inp.div_ceil(steps.max(1)).next_multiple_of(8);
        let filler = Self {
            panels,
            b,
            cols,
            done: 0,
            step,
            simd,
        };
        filler.prefetch(0..step);
        filler
    }

    /// Copies the next slice and prefetches the one after it.
    fn advance(&mut self) {
        let k = self.panels.inp;
        if self.done < k {
            let rows = self.done..(self.done + self.step).min(k);
            self.prefetch(rows.end..(rows.end + self.step).min(k));
            self.panels
                .fill_rows(self.b, self.cols.clone(), rows.clone(), self.simd);
            self.done = rows.end;
        }
    }

    /// Copies what is left.
    fn finish(self) {
        let rows = self.done..self.panels.inp;
        if !rows.is_empty() {
            self.panels.fill_rows(self.b, self.cols, rows, self.simd);
        }
    }

    /// Asks for the cache lines of input features `rows` of the columns.
    fn prefetch(&self, rows: std::ops::Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let (data, rs, cs) = self.b;
            let line = |at: usize| {
                if at < data.len() {
                    // SAFETY: a prefetch of an address inside `data`; it reads nothing.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(at).cast()) }
                }
            };
            // A row-major weight's (the only one filled this way): each row's columns.
            let (c0, c1) = (self.cols.start, self.cols.end);
            debug_assert_eq!(cs, 1);
            for i in rows.clone() {
                (c0..c1)
                    .step_by(16)
                    .chain([c1 - 1])
                    .for_each(|c| line(i * rs + c));
            }
        }
        let _ = rows;
    }
}

/// The rows of `x` `[m, k]` in tiles of [`MR`] rows (120-row blocks are whole tiles, so
/// the micro-kernel's tiles are these): tile `t` at `t * MR * k`, its `r` rows
/// interleaved feature by feature (`x[MR t + j][f]` at `t * MR * k + f * r + j`), so the
/// micro-kernel reads one stream instead of `r` rows a row's length apart. The same
/// size as `x`, written once a product and read once for each panel.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    if m * k == 0 {
        return Vec::new();
    }
    let mut xp = Vec::with_capacity(m * k);
    let pack = |(t, dst): (usize, &mut [MaybeUninit<f32>])| {
        let r = dst.len() / k;
        for (j, row) in x[t * MR * k..][..r * k].chunks_exact(k).enumerate() {
            for (f, &v) in row.iter().enumerate() {
                dst[f * r + j].write(v);
            }
        }
    };
    let spare = &mut xp.spare_capacity_mut()[..m * k];
    if m * k >= PARALLEL_PACK {
        spare.par_chunks_mut(MR * k).enumerate().for_each(pack);
    } else {
        spare.chunks_mut(MR * k).enumerate().for_each(pack);
    }
    // SAFETY: the chunks cover all m x k elements, and each tile of r rows writes its
    // r x k elements (j < r, f < k: every index f * r + j once).
    unsafe { xp.set_len(m * k) };
    xp
}

/// Elements of an input from which [`pack_rows`] runs on rayon's threads.
const PARALLEL_PACK: usize = 1 << 16;

/// The panels of an output of `n` columns, and how many a thread takes (at least
/// [`MIN_PANELS`], as many threads as that leaves work for).
fn panel_split(n: usize) -> (usize, usize) {
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads()
        .min(panels.div_ceil(MIN_PANELS))
        .max(1);
    (panels, panels.div_ceil(threads))
}

/// One micro-kernel call's fixed arguments: `kc` input features, the panel's rows from
/// the block's first feature, the output's row stride, the panel's real columns, and
/// whether the sums add to the output or replace it; and a second input and weight
/// whose features continue the sums (`(features, panel rows, packed rows)`, the
/// low-rank update of [`PackedWeight::lora_linear`]).
#[derive(Clone, Copy)]
struct Tile {
    kc: usize,
    w: *const f32,
    c_rs: usize,
    cols: usize,
    accumulate: bool,
    low: Option<(usize, *const f32, *const f32)>,
}

impl Tile {
    /// `r` rows (1..=6) from `x`, into `c`.
    ///
    /// # Safety
    ///
    /// `x` has `kc` features of `r` rows each, interleaved ([`pack_rows`]), `w` has `kc`
    /// panel rows, and
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
                    s = (*x.add(kk * r + i)).mul_add(*self.w.add(kk * NR + j), s);
                }
                if let Some((k2, w2, x2)) = self.low {
                    for kk in 0..k2 {
                        s = (*x2.add(kk * r + i)).mul_add(*w2.add(kk * NR + j), s);
                    }
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

    use super::{Row, Tile, NR};

    /// `R` rows times the panel's 16 columns: 2R accumulators, one FMA chain each.
    ///
    /// # Safety
    ///
    /// As [`Tile::run`], and the CPU has AVX2 and FMA.
    /// `kc` features of `R` packed rows `x` times panel rows `w`, into `acc`.
    ///
    /// # Safety
    ///
    /// `x` holds `kc x R` elements, `w` `kc` panel rows, and the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn chain<const R: usize>(
        acc: &mut [[__m256; 2]; R],
        kc: usize,
        x: *const f32,
        w: *const f32,
    ) {
        for kk in 0..kc {
            let w0 = _mm256_load_ps(w.add(kk * NR));
            let w1 = _mm256_load_ps(w.add(kk * NR + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(kk * R + r));
                a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
            }
        }
    }

    /// Rows `rows` (a range of whole 8-row blocks) of a panel from 16 columns of
    /// `data`, column `j`'s elements contiguous from `start + j * cs`: two 8 x 8 blocks
    /// transposed in registers per 8 rows.
    ///
    /// # Safety
    ///
    /// The CPU has AVX2; `data` holds the first `rows.end` elements of each of the 16
    /// columns and `panel` at least `rows.end` rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose_panel(
        data: &[f32],
        start: usize,
        cs: usize,
        rows: std::ops::Range<usize>,
        panel: &mut [Row],
    ) {
        let src = data.as_ptr().add(start);
        let dst = panel.as_mut_ptr().cast::<f32>();
        for i0 in rows.step_by(8) {
            for h in 0..2 {
                let col = |j: usize| _mm256_loadu_ps(src.add((8 * h + j) * cs + i0));
                let out = transpose8([
                    col(0),
                    col(1),
                    col(2),
                    col(3),
                    col(4),
                    col(5),
                    col(6),
                    col(7),
                ]);
                for (ii, v) in out.into_iter().enumerate() {
                    // Row i0 + ii, columns 8h..8h + 8: 32-byte aligned in a 64-byte row.
                    _mm256_store_ps(dst.add((i0 + ii) * NR + 8 * h), v);
                }
            }
        }
    }

    /// The transpose of the 8 x 8 block whose rows are `r`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let (t0, t1) = (
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
        );
        let (t2, t3) = (
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
        );
        let (t4, t5) = (
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
        );
        let (t6, t7) = (
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        );
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// `dst[kk * dst_ld + j] = src[j * ld + kk]` for `j < rows` and `kk < cols`, both
    /// multiples of 8: 8 x 8 blocks transposed in registers, a row of `dst` written
    /// contiguously per sweep.
    ///
    /// # Safety
    ///
    /// The CPU has AVX2; `src` is readable at every `j * ld + kk` and `dst` writable at
    /// every `kk * dst_ld + j` above.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose_block(
        src: *const f32,
        ld: usize,
        (rows, cols): (usize, usize),
        dst: *mut f32,
        dst_ld: usize,
    ) {
        for kk0 in (0..cols).step_by(8) {
            for j0 in (0..rows).step_by(8) {
                let row = |jj: usize| _mm256_loadu_ps(src.add((j0 + jj) * ld + kk0));
                let out = transpose8([
                    row(0),
                    row(1),
                    row(2),
                    row(3),
                    row(4),
                    row(5),
                    row(6),
                    row(7),
                ]);
                for (ii, v) in out.into_iter().enumerate() {
                    _mm256_storeu_ps(dst.add((kk0 + ii) * dst_ld + j0), v);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize>(t: Tile, x: *const f32, c: *mut f32) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        chain::<R>(&mut acc, t.kc, x, t.w);
        if let Some((k2, w2, x2)) = t.low {
            chain::<R>(&mut acc, k2, x2, w2);
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

/// Whether this CPU runs the AVX2 + FMA micro-kernel (and [`transpose_into`]'s register
/// transposes).
pub(crate) fn simd_available() -> bool {
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

/// Whether transposing a column-major operand before gemm's product pays on this CPU
/// (`fused_cpu::matmul_new`): an AMD CPU with AVX2, where [`transpose_into`] runs in
/// registers. Measured on a Zen 4 (AVX-512, where gemm serves training's products):
/// 1.17-1.19x gemm's own packing at 512 x 2048 x 2048, 1.03-1.04x at 512 and 1,408
/// features. On an Intel Xeon (AVX-512) gemm's product with such an operand was within
/// 10 % of the row-major one, and the transposing product showed no gain (0.88-1.29x
/// over two pairs in a swinging phase): Intel CPUs keep gemm's packing (BENCHMARKS.md,
/// "Session 15").
pub(crate) fn fast_transpose() -> bool {
    static AMD_WITH_AVX2: OnceLock<bool> = OnceLock::new();
    *AMD_WITH_AVX2.get_or_init(|| simd_available() && amd())
}

/// Whether the CPU's vendor is AMD (`cpuid` leaf 0).
fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        [id.ebx, id.edx, id.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .eq(*b"AuthenticAMD")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows `rows` and columns `cols` of the row-major `w` (row stride `ld`) transposed into
/// the row-major `t` `[cols.len(), rows.len()]`: `t[kk * nb + j] = w[(rows.start + j) *
/// ld + cols.start + kk]`. 8 x 8 blocks in AVX2 registers where the CPU has it, the
/// edges element by element.
pub(crate) fn transpose_into(
    w: &[f32],
    ld: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    t: &mut [f32],
) {
    assert!(
        t.len() >= rows.len() * cols.len(),
        "packed: transpose target too short"
    );
    let nb = rows.len();
    // SAFETY: `t` holds the `cols.len() x rows.len()` elements written (asserted).
    unsafe { transpose_to(w, ld, rows, cols, (t.as_mut_ptr(), nb)) }
}

/// [`transpose_into`] writing through a pointer, at row stride `ldt` (at least
/// `rows.len()`): into a buffer not yet initialised, or into a block of columns of a
/// wider one, which it fills (every `kk * ldt + j`, `kk < cols.len()`, `j < rows.len()`).
///
/// # Safety
///
/// `t` is valid for writes of those elements, and nothing else accesses them meanwhile.
pub(crate) unsafe fn transpose_to(
    w: &[f32],
    ld: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    (t, ldt): (*mut f32, usize),
) {
    let (nb, kc) = (rows.len(), cols.len());
    debug_assert!(ldt >= nb, "packed: transpose target's rows overlap");
    if nb == 0 || kc == 0 {
        return;
    }
    assert!(
        (rows.end - 1) * ld + cols.end <= w.len(),
        "packed: transpose source too short"
    );
    let at = |j: usize, kk: usize| w[(rows.start + j) * ld + cols.start + kk];
    let (mut jb, mut kb) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        (jb, kb) = (nb - nb % 8, kc - kc % 8);
        // SAFETY: AVX2 is available; the reads stay below `(rows.end - 1) * ld +
        // cols.end <= w.len()` (asserted) and the writes are the caller's elements.
        unsafe {
            let src = w.as_ptr().add(rows.start * ld + cols.start);
            avx2::transpose_block(src, ld, (jb, kb), t, ldt)
        }
    }
    for kk in 0..kc {
        let from = if kk < kb { jb } else { 0 };
        for j in from..nb {
            // SAFETY: kk * ldt + j is one of the caller's elements.
            unsafe { t.add(kk * ldt + j).write(at(j, kk)) };
        }
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

    /// `f` on a rayon pool of `threads` threads.
    fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    /// Every element of `got` within `tol` of `want`'s.
    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, e)) in got.iter().zip(want).enumerate() {
            assert!((g - e).abs() <= tol, "{what} [{i}]: {g} against {e}");
        }
    }

    /// Whether `a` and `b` hold the same bits.
    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// The packed product with the scalar path forced.
    fn scalar_linear(p: &PackedWeight, x: &[f32], m: usize) -> Vec<f32> {
        p.product(&pack_rows(x, m, p.inp), m, None, false)
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
                assert_close(&got, &want, tol, &format!("{m}x{n}x{k}"));
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
            let got = in_pool(threads, || p.linear(&x, m));
            assert!(
                same_bits(&got, &scalar),
                "{threads} threads differ from the scalar path"
            );
        }
    }

    #[test]
    fn the_fused_lora_product_matches_its_three_products() {
        // Ranks under, at and over a panel; inputs past one block of 2048 (the low-rank
        // features then follow the last block only); rows past a block of 120.
        for &(m, n, k, r) in &[
            (1, 16, 8, 1),
            (7, 33, 130, 3),
            (121, 40, 64, 16),
            (13, 20, 2100, 20),
        ] {
            let (x, w) = (matrix(m, k, 11), matrix(n, k, 12));
            let (a, b) = (matrix(r, k, 13), matrix(n, r, 14));
            let s = 1.5f32;
            let t = x.matmul(&a.t().unwrap()).unwrap();
            let low = (t.matmul(&b.t().unwrap()).unwrap() * s as f64).unwrap();
            let want = flat(&(x.matmul(&w.t().unwrap()).unwrap() + low).unwrap());
            let p = PackedWeight::pack(&w).unwrap();
            let (xs, as_, bs) = (flat(&x), flat(&a), flat(&b));
            let got = p.lora_linear(&xs, m, &as_, &bs, r, s);
            let (tol, what) = (
                1e-6 * ((k + r) as f32).sqrt() * 8.0,
                format!("{m}x{n}x{k} r{r}"),
            );
            assert_close(&got, &want, tol, &what);
            // The same bits on the scalar path and at any thread count.
            let scalar = p.lora_with(&xs, m, (&as_, &bs, r, s), false);
            for threads in [1, 3] {
                let got = in_pool(threads, || p.lora_linear(&xs, m, &as_, &bs, r, s));
                assert!(same_bits(&got, &scalar), "{what}: {threads} threads differ");
            }
        }
    }

    #[test]
    fn the_product_packed_at_the_call_matches_candles_both_layouts_and_low_rank() {
        // Panels split over threads, ragged columns, inputs past a block of 2048, rows
        // past a group of 2046 (two groups of 1050); the operand `b` row-major
        // (backward's `g W`) and column-major (forward's `x W^T`), with and without the
        // low-rank features.
        for &(m, n, k, r) in &[
            (1, 1, 1, 0),
            (50, 33, 130, 3),
            (121, 600, 70, 16),
            (13, 40, 2100, 5),
            (2100, 20, 30, 2),
        ] {
            let (x, b) = (matrix(m, k, 21), matrix(k, n, 22));
            let (t, u) = (matrix(m, r, 23), matrix(r, n, 24));
            let mut want = x.matmul(&b).unwrap();
            if r > 0 {
                want = (want + t.matmul(&u).unwrap()).unwrap();
            }
            let want = flat(&want);
            let (xs, ts, bs, us) = (flat(&x), flat(&t), flat(&b), flat(&u));
            let bt = flat(&b.t().unwrap().contiguous().unwrap());
            let low = (r > 0).then_some((&ts[..], r, (&us[..], n, 1)));
            let mut bits = None;
            for (operand, threads) in [
                ((&bs[..], n, 1), 1),
                ((&bt[..], 1, k), 2),
                ((&bs[..], n, 1), 7),
            ] {
                let got = in_pool(threads, || strided_product((m, n, k), &xs, operand, low));
                let (tol, what) = (
                    1e-6 * ((k + r) as f32).sqrt() * 8.0,
                    format!("{m}x{n}x{k} r{r}"),
                );
                assert_close(&got, &want, tol, &what);
                let first = bits.get_or_insert_with(|| got.clone());
                assert!(same_bits(first, &got), "{what}: {threads} threads differ");
            }
            // The small product over the same packed rows (a LoRA factor's, `x C^T` for
            // C = b^T as stored) adds the same products in the same order.
            let rows = PackedRows::new(&xs, m, k);
            let plain = in_pool(2, || rows.strided_product(n, (&bs[..], n, 1), None));
            let small = in_pool(2, || rows.times_small((&bt[..], k, 1), n));
            assert!(
                same_bits(&plain, &small),
                "{m}x{n}x{k}: times_small differs"
            );
        }
    }

    #[test]
    fn transpose_into_copies_every_element_of_ragged_ranges() {
        // Whole 8 x 8 blocks and edges both ways, a range not at the matrix's origin.
        let (r, c) = (43, 61);
        let w: Vec<f32> = (0..r * c).map(|e| e as f32).collect();
        for (rows, cols) in [
            (3..43, 5..61),
            (0..16, 0..24),
            (8..15, 0..7),
            (0..43, 0..61),
        ] {
            let (nb, kc) = (rows.len(), cols.len());
            let mut t = vec![f32::NAN; nb * kc];
            transpose_into(&w, c, rows.clone(), cols.clone(), &mut t);
            for kk in 0..kc {
                for j in 0..nb {
                    let want = w[(rows.start + j) * c + cols.start + kk];
                    assert_eq!(t[kk * nb + j], want, "{rows:?} {cols:?} ({kk}, {j})");
                }
            }
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
