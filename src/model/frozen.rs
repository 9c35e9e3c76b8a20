//! A linear layer whose weight never receives a gradient.
//!
//! candle's `matmul` records both operands, so backprop through `x @ W^T` also computes
//! `x^T @ grad` for the base weight: a full extra matmul per layer, and a gradient tensor
//! as big as the model, for a weight that LoRA keeps frozen. [`FrozenLinear`] applies a
//! `CustomOp1` to the input only; the weight lives inside the op, the forward is a
//! storage-level matmul and the backward returns just the input gradient `grad @ W`.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Storage, Tensor};

use super::error::ModelError;
use super::packed::PackedWeight;
use super::panels::Panels;
use super::weights::Weights;

/// `y = x @ W^T (+ b)` with `W` `[out, in]` frozen.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// How a frozen weight `[out, in]` is stored.
#[derive(Clone, Debug)]
pub enum Weight {
    /// A tensor `[out, in]`: as loaded, or its contiguous transpose seen as `[out, in]`.
    Tensor(Tensor),
    /// Packed for the CPU forward ([`PackedWeight`]); f32 on the CPU.
    Packed(Arc<PackedWeight>),
    /// In panels for CPUs with AVX-512 ([`Panels`]), f32 on the CPU: for the forward and
    /// the backward when set up for training ([`FrozenLinear::store_for_training`]), for
    /// the forward alone when set up for inference ([`FrozenLinear::store_for_inference`]).
    Paneled(Arc<Panels>),
}

impl Weight {
    /// `(out, in)`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Weight::Tensor(t) => t.dims2(),
            Weight::Packed(p) => Ok(p.dims()),
            Weight::Paneled(p) => Ok(p.dims()),
        }
    }

    /// The weight as a tensor `[out, in]`: itself, or a packed one unpacked into a new
    /// tensor (a copy of the weight: only a backward through a model set up for
    /// inference takes it, and taper's stages never train one; and the non-f32 paths of
    /// a weight set up for training, which its f32 CPU model never takes).
    pub fn to_tensor(&self) -> candle_core::Result<Cow<'_, Tensor>> {
        match self {
            Weight::Tensor(t) => Ok(Cow::Borrowed(t)),
            Weight::Packed(p) => p.to_tensor(&candle_core::Device::Cpu).map(Cow::Owned),
            Weight::Paneled(p) => {
                let data = p.unpack();
                Tensor::from_vec(data, p.dims(), &candle_core::Device::Cpu).map(Cow::Owned)
            }
        }
    }
}

/// How [`FrozenLinear::store_for_inference`] stores a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InferenceLayout {
    /// [`PackedWeight`].
    Packed,
    /// [`Panels::forward_only`].
    Paneled,
    /// The contiguous transpose.
    Transposed,
}

impl InferenceLayout {
    /// The fastest layout on this CPU for a weight `[out, in]`: packed where
    /// [`super::packed::packing_pays`], in panels where [`super::panels::available`] and
    /// [`super::panels::pays_for_inference`], otherwise transposed.
    pub(crate) fn fastest(out: usize, inp: usize) -> Self {
        if super::packed::packing_pays() {
            Self::Packed
        } else if super::panels::available() && super::panels::pays_for_inference(out, inp) {
            Self::Paneled
        } else {
            Self::Transposed
        }
    }
}

impl FrozenLinear {
    /// Wraps existing tensors. They should not be `Var`s: no gradient reaches them.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Tensor(weight),
            bias,
        }
    }

    /// Loads `weight` `[out, in]` and, when `bias` is set, `bias` `[out]`.
    pub fn load(
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self, ModelError> {
        let weight = w.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(w.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// Re-stores an f32 CPU weight the way the forward reads it fastest
    /// (`InferenceLayout::fastest`): packed ([`PackedWeight`]) where this CPU runs the
    /// packed product; on CPUs with AVX-512, in panels for the forward alone where the
    /// weight is large enough ([`Panels::forward_only`]); else as its contiguous
    /// transpose `[in, out]` seen as the same `[out, in]` tensor, which gemm reads
    /// without packing for products of up to 48 rows and packs with contiguous reads
    /// above that (15-50 % faster at 128 rows; BENCHMARKS.md). Each way the same memory.
    /// The input gradient's product wants the loaded layout (or training's panels), so
    /// models that train keep it ([`Self::store_for_training`]). The loaded copy is
    /// dropped unless something else holds it (a tied embedding does). Other devices and
    /// dtypes keep their layout.
    pub fn store_for_inference(&mut self) -> candle_core::Result<()> {
        let (out, inp) = self.weight.dims()?;
        self.store_as(InferenceLayout::fastest(out, inp))
    }

    /// [`Self::store_for_inference`] never packing: the transposed layout (what CPUs
    /// without the packed product or panels get), for comparisons.
    pub fn store_transposed(&mut self) -> candle_core::Result<()> {
        self.store_as(InferenceLayout::Transposed)
    }

    /// [`Self::store_for_inference`] in the given layout (packed, or in panels, only
    /// where the CPU has the instructions or, packed, runs the scalar path: the tests
    /// take each).
    pub(crate) fn store_as(&mut self, layout: InferenceLayout) -> candle_core::Result<()> {
        let Weight::Tensor(w) = &self.weight else {
            return Ok(());
        };
        if !(w.device().is_cpu() && w.dtype() == DType::F32) {
            return Ok(());
        }
        match layout {
            InferenceLayout::Packed => {
                self.weight = Weight::Packed(Arc::new(PackedWeight::pack(w)?));
            }
            InferenceLayout::Paneled => self.weight = paneled(w, false)?,
            InferenceLayout::Transposed if w.layout().stride()[1] == 1 => {
                self.weight = Weight::Tensor(super::fused_cpu::transpose(w)?.t()?);
            }
            InferenceLayout::Transposed => {}
        }
        Ok(())
    }

    /// Sets the weight up for training on the CPU: on CPUs with AVX-512
    /// ([`super::panels::available`]), an f32 weight of at least
    /// [`super::panels::PANEL_MIN`] features each way is packed in panels twice, for the
    /// forward's `x W^T` and the backward's `g W` ([`Weight::Paneled`], [`Panels`]),
    /// which the products read where they are, with no packing or transposes at the
    /// call, and the tensor is let go: twice the weight's memory, unless something else
    /// holds the tensor too (BENCHMARKS.md, "Session 20", has what it saves). Other
    /// CPUs, devices and dtypes, and smaller weights, keep the weight as it is.
    pub fn store_for_training(&mut self) -> candle_core::Result<()> {
        let Weight::Tensor(w) = &self.weight else {
            return Ok(());
        };
        let (out, inp) = w.dims2()?;
        if w.device().is_cpu()
            && w.dtype() == DType::F32
            && super::panels::available()
            && super::panels::pays_for_training(out, inp)
        {
            self.panel()?;
        }
        Ok(())
    }

    /// Packs an f32 CPU weight into panels both ways, whatever its size (the caller
    /// checks the CPU).
    pub(crate) fn panel(&mut self) -> candle_core::Result<()> {
        if let Weight::Tensor(w) = &self.weight {
            self.weight = paneled(w, true)?;
        }
        Ok(())
    }

    /// The weight as stored.
    pub fn stored(&self) -> &Weight {
        &self.weight
    }

    /// The weight as a tensor, unless it is packed ([`Self::store_for_inference`],
    /// [`Self::store_for_training`]).
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Tensor(t) => Some(t),
            Weight::Packed(_) | Weight::Paneled(_) => None,
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        let (out, inp) = self.weight.dims().unwrap_or((0, 0));
        (inp, out)
    }
}

/// An f32 CPU weight `[out, in]` in panels: both ways when `train` ([`Panels::from_fn`]),
/// the forward's alone otherwise ([`Panels::forward_only`]).
fn paneled(w: &Tensor, train: bool) -> candle_core::Result<Weight> {
    let (out, inp) = w.dims2()?;
    let panels = super::fused_cpu::with_matrix(w, |m| {
        let at = |o, i| m.at(o, i);
        Ok(if train {
            Panels::from_fn(out, inp, at)
        } else {
            Panels::forward_only(out, inp, at)
        })
    })?;
    Ok(Weight::Paneled(Arc::new(panels)))
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.contiguous()?.apply_op1(FrozenMatmul {
            weight: self.weight.clone(),
        })?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x @ W^T` over the last dimension of a contiguous `x`; gradient for `x` only.
struct FrozenMatmul {
    weight: Weight,
}

impl FrozenMatmul {
    /// The weight as a tensor, for the storage-level products of other devices (a packed
    /// weight is f32 on the CPU and never reaches them).
    fn tensor(&self) -> candle_core::Result<&Tensor> {
        match &self.weight {
            Weight::Tensor(t) => Ok(t),
            Weight::Packed(_) | Weight::Paneled(_) => {
                candle_core::bail!("frozen linear: a packed weight serves f32 on the CPU only")
            }
        }
    }

    /// The output shape and the `(m, n, k)` of the flattened product.
    fn plan(&self, x: &Layout) -> candle_core::Result<(Shape, (usize, usize, usize))> {
        let (out_dim, in_dim) = self.weight.dims()?;
        let dims = x.dims();
        let Some((&k, batch)) = dims.split_last() else {
            candle_core::bail!("frozen linear: input is a scalar")
        };
        if k != in_dim {
            candle_core::bail!("frozen linear: input has {k} features, weight expects {in_dim}")
        }
        if !x.is_contiguous() {
            candle_core::bail!("frozen linear: input must be contiguous")
        }
        let m: usize = batch.iter().product();
        let mut out = batch.to_vec();
        out.push(out_dim);
        Ok((Shape::from(out), (m, out_dim, k)))
    }

    /// The same storage-level product for every backend.
    fn fwd<S: BackendStorage>(
        &self,
        x: &S,
        x_layout: &Layout,
        w: &S,
        w_layout: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (shape, (m, n, k)) = self.plan(x_layout)?;
        // The same layouts candle's `Linear` hands to matmul: x as [m, k], W^T as the
        // transposed view [k, n] with strides [1, k].
        let lhs = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
        let rhs = w_layout.transpose(0, 1)?;
        let out = x.matmul(w, (1, m, n, k), &lhs, &rhs)?;
        Ok((out, shape))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        // f32: the packed product, or `linear_with` (gemm, or the packed kernel with the
        // weight packed at the call) with the weight as stored
        // (row-major, or its transpose), into an output that is not zeroed first.
        if let CpuStorage::F32(xs) = x {
            let (shape, (m, n, k)) = self.plan(layout)?;
            let x0 = layout.start_offset();
            let xs = &xs[x0..x0 + m * k];
            match &self.weight {
                Weight::Packed(p) => return Ok((CpuStorage::F32(p.linear(xs, m)), shape)),
                Weight::Paneled(p) => return Ok((CpuStorage::F32(p.forward(xs, m, None)), shape)),
                Weight::Tensor(w) if w.dtype() == DType::F32 && w.device().is_cpu() => {
                    let y = super::fused_cpu::with_matrix(w, |w| {
                        Ok(super::fused_cpu::linear_with(xs, w, (m, n, k)))
                    })?;
                    return Ok((CpuStorage::F32(y), shape));
                }
                Weight::Tensor(_) => {}
            }
        }
        let w = self.tensor()?;
        let (w, w_layout) = w.storage_and_layout();
        match &*w {
            Storage::Cpu(w) => self.fwd(x, layout, w, w_layout),
            _ => candle_core::bail!("frozen linear: weight and input on different devices"),
        }
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let w = self.tensor()?;
        let (w, w_layout) = w.storage_and_layout();
        match &*w {
            Storage::Cuda(w) => self.fwd(x, layout, w, w_layout),
            _ => candle_core::bail!("frozen linear: weight and input on different devices"),
        }
    }

    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        let w = self.tensor()?;
        let (w, w_layout) = w.storage_and_layout();
        match &*w {
            Storage::Metal(w) => self.fwd(x, layout, w, w_layout),
            _ => candle_core::bail!("frozen linear: weight and input on different devices"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d(x @ W^T)/dx = grad @ W; the weight is deliberately left without a gradient.
        if let Weight::Paneled(p) = &self.weight {
            if p.trains() && grad.device().is_cpu() && grad.dtype() == DType::F32 {
                return super::fused_cpu::panel_input_grad(grad, p).map(Some);
            }
        }
        let weight = self.weight.to_tensor()?;
        if grad.device().is_cpu() && grad.dtype() == DType::F32 && weight.dtype() == DType::F32 {
            return super::fused_cpu::linear_input_grad(grad, &weight).map(Some);
        }
        let (out_dim, in_dim) = weight.dims2()?;
        let dims = grad.dims().to_vec();
        let m = grad.elem_count() / out_dim.max(1);
        let gx = grad.contiguous()?.reshape((m, out_dim))?.matmul(&weight)?;
        let mut shape = dims;
        if let Some(last) = shape.last_mut() {
            *last = in_dim;
        }
        Ok(Some(gx.reshape(shape)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{max_diff, rel_diff};
    use candle_core::{DType, Device, Var};

    fn rand(shape: &[usize]) -> Tensor {
        Tensor::randn(0f64, 1f64, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_matches_plain_matmul_with_bias() {
        let w = rand(&[5, 7]);
        let b = rand(&[5]);
        let x = rand(&[2, 3, 7]);
        let frozen = FrozenLinear::new(w.clone(), Some(b.clone()));
        let plain = candle_nn::Linear::new(w, Some(b));
        assert!(max_diff(&frozen.forward(&x).unwrap(), &plain.forward(&x).unwrap()) < 1e-12);
    }

    #[test]
    fn forward_accepts_non_contiguous_and_offset_input() {
        let w = rand(&[4, 6]);
        let x = rand(&[6, 3, 2]).permute((2, 1, 0)).unwrap(); // [2, 3, 6], strided
        let frozen = FrozenLinear::new(w.clone(), None);
        let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&frozen.forward(&x).unwrap(), &want) < 1e-12);
        let x2 = rand(&[3, 6]).narrow(0, 1, 2).unwrap(); // start offset 6
        let want = x2.matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&frozen.forward(&x2).unwrap(), &want) < 1e-12);
    }

    #[test]
    fn f32_on_the_cpu_matches_candles_matmul_value_and_gradient() {
        // f32 on the CPU goes straight to gemm or the packed micro-kernel
        // (`fused_cpu::linear_with`), forward and backward.
        let f32s = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let w = f32s(rand(&[5, 7]));
        let b = f32s(rand(&[5]));
        let frozen = FrozenLinear::new(w.clone(), Some(b.clone()));
        let x2 = f32s(rand(&[4, 7])).narrow(0, 1, 3).unwrap(); // start offset 7
        let want = x2
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_diff(&frozen.forward(&x2).unwrap(), &want) < 1e-5);
        // 6 rows of 7 (gemm), and 80 of 1,100 (forward) or 1,030 (backward), which pack
        // the weight at the call where packing pays (`fused_cpu::packs_per_call`); the
        // weight row-major and column-major.
        for (rows, (o, i)) in [(3, (5, 7)), (40, (1030, 1100))] {
            let w = f32s(rand(&[o, i]));
            let w_t = w.t().unwrap().contiguous().unwrap().t().unwrap();
            // Sums of about a thousand unit-variance products: f32 rounding, not errors.
            let tol = 1e-5 * (o.max(i) as f64).sqrt() * 4.0;
            for weight in [&w, &w_t] {
                let frozen = FrozenLinear::new(weight.clone(), None);
                let x = Var::from_tensor(&f32s(rand(&[2, rows, i]))).unwrap();
                let dy = f32s(rand(&[2, rows, o]));
                let y = frozen.forward(x.as_tensor()).unwrap();
                let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                assert!(max_diff(&y, &want) < tol, "{rows}: {}", max_diff(&y, &want));
                let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let want = dy.broadcast_matmul(&w).unwrap();
                let got = grads.get(x.as_tensor()).unwrap();
                assert!(
                    max_diff(got, &want) < tol,
                    "{rows}: {}",
                    max_diff(got, &want)
                );
                assert!(grads.get(weight).is_none());
            }
        }
    }

    #[test]
    fn a_store_for_inference_gives_the_same_value_and_gradient() {
        let f32s = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (w, b) = (f32s(rand(&[5, 7])), f32s(rand(&[5])));
        let plain = FrozenLinear::new(w.clone(), Some(b.clone()));
        let x = Var::from_tensor(&f32s(rand(&[2, 3, 7]))).unwrap();
        let dy = f32s(rand(&[2, 3, 5]));
        let run = |l: &FrozenLinear| {
            let y = l.forward(x.as_tensor()).unwrap();
            let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(&plain);
        // Packed, in panels (on CPUs with AVX-512), and transposed (what CPUs without
        // either get).
        let mut layouts = vec![InferenceLayout::Packed, InferenceLayout::Transposed];
        if crate::model::panels::available() {
            layouts.push(InferenceLayout::Paneled);
        }
        for layout in layouts {
            let mut stored = FrozenLinear::new(w.clone(), Some(b.clone()));
            stored.store_as(layout).unwrap();
            stored.store_as(layout).unwrap(); // twice: still one re-store
            assert_eq!(stored.dims(), (7, 5));
            match stored.stored() {
                Weight::Packed(p) => {
                    assert_eq!(layout, InferenceLayout::Packed);
                    assert_eq!(max_diff(&p.to_tensor(&Device::Cpu).unwrap(), &w), 0.0);
                }
                Weight::Tensor(t) => {
                    assert_eq!(layout, InferenceLayout::Transposed);
                    assert_eq!(t.layout().stride(), [1, 5]);
                    assert_eq!(max_diff(t, &w), 0.0);
                }
                Weight::Paneled(p) => {
                    assert_eq!(layout, InferenceLayout::Paneled);
                    assert!(!p.trains(), "inference's panels are the forward's alone");
                    let unpacked = stored.stored().to_tensor().unwrap();
                    assert_eq!(max_diff(&unpacked, &w), 0.0);
                }
            }
            // The backward of a weight set up for inference takes it unpacked.
            let (y2, g2) = run(&stored);
            assert!(max_diff(&y1, &y2) < 1e-5, "{}", max_diff(&y1, &y2));
            assert!(max_diff(&g1, &g2) < 1e-5, "{}", max_diff(&g1, &g2));
        }
        let mut auto = FrozenLinear::new(w, None);
        auto.store_for_inference().unwrap();
        let packed = matches!(auto.stored(), Weight::Packed(_));
        assert_eq!(packed, super::super::packed::packing_pays());
        // Large enough, a weight gets panels on CPUs with AVX-512 (that do not pack);
        // one feature fewer either way, it does not.
        let n = crate::model::panels::INFERENCE_PANEL_MIN;
        let panels_here =
            crate::model::panels::available() && !super::super::packed::packing_pays();
        for (out, inp, want) in [(n, n, panels_here), (n - 1, n, false), (n, n - 1, false)] {
            let mut big = FrozenLinear::new(
                Tensor::zeros((out, inp), DType::F32, &Device::Cpu).unwrap(),
                None,
            );
            big.store_for_inference().unwrap();
            let paneled = matches!(big.stored(), Weight::Paneled(_));
            assert_eq!(paneled, want, "{out} x {inp}");
            assert_eq!(
                paneled,
                InferenceLayout::fastest(out, inp) == InferenceLayout::Paneled
            );
        }
        // Other dtypes keep their layout, whatever is asked.
        for layout in [
            InferenceLayout::Packed,
            InferenceLayout::Paneled,
            InferenceLayout::Transposed,
        ] {
            let mut f64s = FrozenLinear::new(rand(&[5, 7]), None);
            f64s.store_as(layout).unwrap();
            assert_eq!(f64s.weight().unwrap().layout().stride(), [7, 1]);
        }
    }

    #[test]
    fn store_for_training_gives_the_same_value_and_gradient() {
        let f32s = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        // 70 outputs (a panel and 6 features of a second), 600 inputs (two depth blocks),
        // 3 x 5 rows (two 6-row groups and 3).
        let (w, b) = (f32s(rand(&[70, 600])), f32s(rand(&[70])));
        let plain = FrozenLinear::new(w.clone(), Some(b.clone()));
        let x = Var::from_tensor(&f32s(rand(&[3, 5, 600]))).unwrap();
        let dy = f32s(rand(&[3, 5, 70]));
        let run = |l: &FrozenLinear| {
            let y = l.forward(x.as_tensor()).unwrap();
            let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(&plain);
        // Too small to pay: stays as it is.
        let mut small = plain.clone();
        small.store_for_training().unwrap();
        assert!(matches!(small.stored(), Weight::Tensor(_)));
        if !crate::model::panels::available() {
            eprintln!("no AVX-512 on this CPU: the panels are not tried");
            return;
        }
        let mut paneled = plain.clone();
        paneled.panel().unwrap();
        paneled.panel().unwrap(); // twice: still one copy
        let Weight::Paneled(p) = paneled.stored() else {
            panic!("not paneled: {:?}", paneled.stored())
        };
        assert_eq!(p.dims(), (70, 600));
        // Unpacked, it is the weight; the tensor itself is let go.
        assert_eq!(max_diff(&paneled.stored().to_tensor().unwrap(), &w), 0.0);
        assert!(paneled.weight().is_none());
        let (y2, g2) = run(&paneled);
        assert!(rel_diff(&y2, &y1) < 1e-5, "{}", rel_diff(&y2, &y1));
        assert!(rel_diff(&g2, &g1) < 1e-5, "{}", rel_diff(&g2, &g1));
        // A weight of PANEL_MIN features each way gets its panels from store_for_training.
        let n = crate::model::panels::PANEL_MIN;
        let mut big = FrozenLinear::new(
            Tensor::zeros((n, n), DType::F32, &Device::Cpu).unwrap(),
            None,
        );
        big.store_for_training().unwrap();
        assert!(matches!(big.stored(), Weight::Paneled(..)));
        // Other dtypes keep their layout.
        let mut f64s = FrozenLinear::new(rand(&[5, 7]), None);
        f64s.store_for_training().unwrap();
        assert!(matches!(f64s.stored(), Weight::Tensor(_)));
    }

    #[test]
    fn backward_gives_input_gradient_and_none_for_the_weight() {
        let w = rand(&[5, 7]);
        let x = Var::from_tensor(&rand(&[2, 3, 7])).unwrap();
        let frozen = FrozenLinear::new(w.clone(), None);
        let y = frozen.forward(x.as_tensor()).unwrap();
        let loss = (y.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(&w).is_none(),
            "the frozen weight must not get a gradient"
        );

        // Reference: the same loss through candle's matmul with W as a Var.
        let wv = Var::from_tensor(&w).unwrap();
        let x2 = Var::from_tensor(x.as_tensor()).unwrap();
        let y2 = x2
            .as_tensor()
            .broadcast_matmul(&wv.as_tensor().t().unwrap())
            .unwrap();
        assert!(max_diff(&y, &y2) < 1e-12);
        let loss2 = (y2.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let grads2 = loss2.backward().unwrap();
        assert!(
            grads2.get(wv.as_tensor()).is_some(),
            "plain matmul does pay for W's gradient"
        );
        let gx = grads.get(x.as_tensor()).unwrap();
        let gx2 = grads2.get(x2.as_tensor()).unwrap();
        assert_eq!(gx.dims(), &[2, 3, 7]);
        assert!(max_diff(gx, gx2) < 1e-12);
    }

    #[test]
    fn works_in_f32_and_bf16_shapes() {
        let w = rand(&[4, 8]).to_dtype(DType::F32).unwrap();
        let x = rand(&[3, 8]).to_dtype(DType::F32).unwrap();
        let y = FrozenLinear::new(w.clone(), None).forward(&x).unwrap();
        assert_eq!(y.dims(), &[3, 4]);
        assert!(
            max_diff(
                &y.to_dtype(DType::F64).unwrap(),
                &x.matmul(&w.t().unwrap())
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
            ) < 1e-5
        );
    }
}
