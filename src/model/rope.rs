//! Rotary position embeddings (the "default" rope type), differentiable.
//!
//! candle_nn's `rotary_emb::rope` kernel has no backward pass; this applies
//! `x * cos + rotate_half(x) * sin` with ordinary ops, the non-interleaved layout used
//! by transformers' Llama and Qwen2. The angles are computed in f32 like transformers
//! does (in f64 when the model runs in f64, for gradient checks).

use candle_core::{DType, Device, Result, Tensor, D};

/// Inverse frequencies of one head; produces `cos`/`sin` tables for any position range.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    head_dim: usize,
    theta: f64,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        Self { head_dim, theta }
    }

    /// `cos`, `sin` of shape `[seq_len, head_dim]` for positions `offset..offset+seq_len`,
    /// in `dtype`. The offset is there for a KV cache.
    pub fn cos_sin(
        &self,
        offset: usize,
        seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        let (cos, sin) = if dtype == DType::F64 {
            let mut cos = Vec::with_capacity(seq_len * self.head_dim);
            let mut sin = Vec::with_capacity(seq_len * self.head_dim);
            for p in offset..offset + seq_len {
                for _ in 0..2 {
                    for i in 0..half {
                        let inv = 1.0 / self.theta.powf((2 * i) as f64 / self.head_dim as f64);
                        let a = p as f64 * inv;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
            (
                Tensor::from_vec(cos, (seq_len, self.head_dim), device)?,
                Tensor::from_vec(sin, (seq_len, self.head_dim), device)?,
            )
        } else {
            let theta = self.theta as f32;
            let mut cos = Vec::with_capacity(seq_len * self.head_dim);
            let mut sin = Vec::with_capacity(seq_len * self.head_dim);
            for p in offset..offset + seq_len {
                for _ in 0..2 {
                    for i in 0..half {
                        let inv = 1.0f32 / theta.powf((2 * i) as f32 / self.head_dim as f32);
                        let a = p as f32 * inv;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
            (
                Tensor::from_vec(cos, (seq_len, self.head_dim), device)?.to_dtype(dtype)?,
                Tensor::from_vec(sin, (seq_len, self.head_dim), device)?.to_dtype(dtype)?,
            )
        };
        Ok((cos, sin))
    }
}

/// Applies rope to `x` `[batch, heads, seq, head_dim]` with tables `[seq, head_dim]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn matches_candle_kernel_and_keeps_gradients() {
        let dev = Device::Cpu;
        let rope = RotaryEmbedding::new(8, 10_000.0);
        let (cos, sin) = rope.cos_sin(0, 5, DType::F32, &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let ours = apply_rope(x.as_tensor(), &cos, &sin).unwrap();
        let half_cos = cos.narrow(1, 0, 4).unwrap().contiguous().unwrap();
        let half_sin = sin.narrow(1, 0, 4).unwrap().contiguous().unwrap();
        let fused = candle_nn::rotary_emb::rope(x.as_tensor(), &half_cos, &half_sin).unwrap();
        let diff = (&ours - &fused).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        let grads = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }

    #[test]
    fn position_offset_shifts_the_tables() {
        let rope = RotaryEmbedding::new(4, 10_000.0);
        let (full, _) = rope.cos_sin(0, 6, DType::F32, &Device::Cpu).unwrap();
        let (tail, _) = rope.cos_sin(4, 2, DType::F32, &Device::Cpu).unwrap();
        let want = full.narrow(0, 4, 2).unwrap();
        let diff = (&tail - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}
