//! Rotary position embeddings (the "default" rope type), differentiable.
//!
//! `x * cos + rotate_half(x) * sin` in the non-interleaved layout used by transformers'
//! Llama and Qwen2. candle_nn's `rotary_emb::rope` kernel has no backward pass, so it is
//! applied through [`super::fused::rope`], which adds one. The angles are computed in f32
//! like transformers does (in f64 when the model runs in f64, for gradient checks).

use candle_core::{DType, Device, Result, Tensor};

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

    /// `cos`, `sin` of shape `[seq_len, head_dim / 2]` (one half; both halves of a head
    /// share the angles) for positions `offset..offset+seq_len`,
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
            let mut cos = Vec::with_capacity(seq_len * half);
            let mut sin = Vec::with_capacity(seq_len * half);
            for p in offset..offset + seq_len {
                for i in 0..half {
                    let inv = 1.0 / self.theta.powf((2 * i) as f64 / self.head_dim as f64);
                    let a = p as f64 * inv;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
            (
                Tensor::from_vec(cos, (seq_len, half), device)?,
                Tensor::from_vec(sin, (seq_len, half), device)?,
            )
        } else {
            let theta = self.theta as f32;
            let mut cos = Vec::with_capacity(seq_len * half);
            let mut sin = Vec::with_capacity(seq_len * half);
            for p in offset..offset + seq_len {
                for i in 0..half {
                    let inv = 1.0f32 / theta.powf((2 * i) as f32 / self.head_dim as f32);
                    let a = p as f32 * inv;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
            (
                Tensor::from_vec(cos, (seq_len, half), device)?.to_dtype(dtype)?,
                Tensor::from_vec(sin, (seq_len, half), device)?.to_dtype(dtype)?,
            )
        };
        Ok((cos, sin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_rotate_like_transformers() {
        // Position 1, head_dim 4, theta 10000: angles 1 and 1/100 for the two pairs.
        let rope = RotaryEmbedding::new(4, 10_000.0);
        let (cos, sin) = rope.cos_sin(1, 1, DType::F64, &Device::Cpu).unwrap();
        let x = Tensor::new(&[1f64, 2., 3., 4.], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let y = super::super::fused::rope(&x, &cos, &sin).unwrap();
        let got = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (a, b) = (1f64, 0.01f64);
        let want = [
            a.cos() - 3. * a.sin(),
            2. * b.cos() - 4. * b.sin(),
            a.sin() + 3. * a.cos(),
            2. * b.sin() + 4. * b.cos(),
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
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
