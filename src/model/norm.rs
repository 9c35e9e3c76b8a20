//! RMSNorm that gradients flow through.
//!
//! candle_nn's fused `rms_norm` kernel has no backward pass and silently drops the
//! gradient; this one follows transformers' `LlamaRMSNorm` step by step (normalise in
//! f32 or f64, cast back to the input dtype, then scale by the weight) as a
//! [`super::fused::rms_norm`] op, whose backward keeps only the input.

use candle_core::{DType, Module, Tensor};

use super::error::ModelError;
use super::weights::Weights;

/// `weight * x / sqrt(mean(x^2) + eps)` over the last dimension.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// Loads `weight` `[size]`.
    pub fn load(w: &Weights, size: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self::new(w.get(size, "weight")?, eps))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// The dtype reductions run in: f32 for half types, the input dtype otherwise.
pub fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        super::fused::rms_norm(x, &self.weight, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_fused_kernel_and_keeps_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let ours = RmsNorm::new(w.clone(), 1e-5)
            .forward(x.as_tensor())
            .unwrap();
        let fused = candle_nn::ops::rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let diff = (&ours - &fused).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        let grads = ours.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(x.as_tensor()).is_some(),
            "gradient must reach the input"
        );
    }
}
