//! A linear layer whose weight never receives a gradient.
//!
//! candle's `matmul` records both operands, so backprop through `x @ W^T` also computes
//! `x^T @ grad` for the base weight: a full extra matmul per layer, and a gradient tensor
//! as big as the model, for a weight that LoRA keeps frozen. [`FrozenLinear`] applies a
//! `CustomOp1` to the input only; the weight lives inside the op, the forward is a
//! storage-level matmul and the backward returns just the input gradient `grad @ W`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Storage, Tensor};

use super::error::ModelError;
use super::weights::Weights;

/// `y = x @ W^T (+ b)` with `W` `[out, in]` frozen.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// Wraps existing tensors. They should not be `Var`s: no gradient reaches them.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
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

    /// Re-stores an f32 CPU weight as its contiguous transpose `[in, out]`, seen as the
    /// same `[out, in]` tensor: the layout the forward's product wants, which gemm reads
    /// without packing for up to 48 rows and packs with contiguous reads above that
    /// (15-50 % faster at 128 rows; BENCHMARKS.md). The input gradient's product wants
    /// the loaded layout, so models that train keep it. The loaded copy is dropped
    /// unless something else holds it (a tied embedding does).
    /// Other devices and dtypes keep their layout.
    pub fn store_transposed(&mut self) -> candle_core::Result<()> {
        let w = &self.weight;
        if w.device().is_cpu() && w.dtype() == DType::F32 && w.layout().stride()[1] == 1 {
            self.weight = super::fused_cpu::transpose(w)?.t()?;
        }
        Ok(())
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (
            d.get(1).copied().unwrap_or(0),
            d.first().copied().unwrap_or(0),
        )
    }
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
    weight: Tensor,
}

impl FrozenMatmul {
    /// The output shape and the `(m, n, k)` of the flattened product.
    fn plan(&self, x: &Layout) -> candle_core::Result<(Shape, (usize, usize, usize))> {
        let (out_dim, in_dim) = self.weight.dims2()?;
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
        // f32: straight to gemm, into an output that is not zeroed first, with the weight
        // as stored (row-major, or its transpose after `store_transposed`).
        if let CpuStorage::F32(xs) = x {
            if self.weight.dtype() == DType::F32 && self.weight.device().is_cpu() {
                let (shape, (m, n, k)) = self.plan(layout)?;
                let x0 = layout.start_offset();
                let y = super::fused_cpu::with_matrix(&self.weight, |w| {
                    Ok(super::fused_cpu::linear_with(
                        &xs[x0..x0 + m * k],
                        w,
                        (m, n, k),
                    ))
                })?;
                return Ok((CpuStorage::F32(y), shape));
            }
        }
        let (w, w_layout) = self.weight.storage_and_layout();
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
        let (w, w_layout) = self.weight.storage_and_layout();
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
        let (w, w_layout) = self.weight.storage_and_layout();
        match &*w {
            Storage::Metal(w) => self.fwd(x, layout, w, w_layout),
            _ => candle_core::bail!("frozen linear: weight and input on different devices"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d(x @ W^T)/dx = grad @ W; the weight is deliberately left without a gradient.
        if grad.device().is_cpu() && grad.dtype() == DType::F32 && self.weight.dtype() == DType::F32
        {
            return super::fused_cpu::linear_input_grad(grad, &self.weight).map(Some);
        }
        let (out_dim, in_dim) = self.weight.dims2()?;
        let dims = grad.dims().to_vec();
        let m = grad.elem_count() / out_dim.max(1);
        let gx = grad
            .contiguous()?
            .reshape((m, out_dim))?
            .matmul(&self.weight)?;
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
    use crate::model::test_util::max_diff;
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
        // f32 on the CPU goes straight to gemm (`fused_cpu::linear`), forward and backward.
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
        let x = Var::from_tensor(&f32s(rand(&[2, 3, 7]))).unwrap();
        let dy = f32s(rand(&[2, 3, 5]));
        let y = frozen.forward(x.as_tensor()).unwrap();
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let want = dy.broadcast_matmul(&w).unwrap();
        let got = grads.get(x.as_tensor()).unwrap();
        assert!(max_diff(got, &want) < 1e-5, "{}", max_diff(got, &want));
        assert!(grads.get(&w).is_none());
    }

    #[test]
    fn a_transposed_store_gives_the_same_value_and_gradient() {
        let f32s = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (w, b) = (f32s(rand(&[5, 7])), f32s(rand(&[5])));
        let plain = FrozenLinear::new(w.clone(), Some(b.clone()));
        let mut stored = FrozenLinear::new(w.clone(), Some(b));
        stored.store_transposed().unwrap();
        stored.store_transposed().unwrap(); // twice: still one transpose
        assert_eq!(stored.weight().dims(), [5, 7]);
        assert_eq!(stored.weight().layout().stride(), [1, 5]);
        assert_eq!(max_diff(stored.weight(), &w), 0.0);
        let x = Var::from_tensor(&f32s(rand(&[2, 3, 7]))).unwrap();
        let dy = f32s(rand(&[2, 3, 5]));
        let run = |l: &FrozenLinear| {
            let y = l.forward(x.as_tensor()).unwrap();
            let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let ((y1, g1), (y2, g2)) = (run(&plain), run(&stored));
        assert!(max_diff(&y1, &y2) < 1e-5, "{}", max_diff(&y1, &y2));
        assert!(max_diff(&g1, &g2) < 1e-5, "{}", max_diff(&g1, &g2));
        // Other dtypes keep their layout.
        let mut f64s = FrozenLinear::new(rand(&[5, 7]), None);
        f64s.store_transposed().unwrap();
        assert_eq!(f64s.weight().layout().stride(), [7, 1]);
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
