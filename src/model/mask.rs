//! The additive attention bias: causal masking plus an optional padding mask.
//!
//! Position `i` may attend to key `j` when `j <= i` and key `j` is a real token. Blocked
//! pairs get a large negative bias rather than `-inf`, so a row with nothing to attend to
//! (a padding query under left padding) gives finite garbage instead of NaN.

use candle_core::{DType, Device, Result, Tensor};

/// The bias added to blocked attention scores.
pub const MASKED: f64 = -1e9;

/// `[batch, 1, seq, seq]` additive bias in `dtype` (use the softmax dtype, f32 or f64).
///
/// `padding` is `[batch, seq]`, non-zero for real tokens, zero for padding; any dtype.
pub fn attention_bias(
    batch: usize,
    seq_len: usize,
    padding: Option<&Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let causal: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j <= i { 0.0 } else { MASKED as f32 }))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, seq_len, seq_len), device)?.to_dtype(dtype)?;
    match padding {
        None => causal
            .broadcast_as((batch, 1, seq_len, seq_len))?
            .contiguous(),
        Some(mask) => {
            let (b, s) = mask.dims2()?;
            if (b, s) != (batch, seq_len) {
                candle_core::bail!(
                    "attention mask has shape [{b}, {s}], input ids are [{batch}, {seq_len}]"
                )
            }
            let real = mask.ne(0u8)?.to_dtype(dtype)?;
            // 0 for real keys, MASKED for padding keys; min() keeps one MASKED per pair.
            let keys = ((real - 1.0)? * -MASKED)?.reshape((batch, 1, 1, seq_len))?;
            causal.broadcast_minimum(&keys)
        }
    }
}

/// `[1, 1, new, cached + new]` causal bias for `new` queries at positions
/// `cached..cached + new` over every key up to the last of them (a KV-cache step).
pub fn causal_bias_after(
    cached: usize,
    new: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let total = cached + new;
    let bias: Vec<f32> = (0..new)
        .flat_map(|i| (0..total).map(move |j| if j <= cached + i { 0.0 } else { MASKED as f32 }))
        .collect();
    Tensor::from_vec(bias, (1, 1, new, total), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_and_padding_combine() {
        let mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
        let bias = attention_bias(1, 3, Some(&mask), DType::F32, &Device::Cpu).unwrap();
        let rows = bias
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let m = MASKED as f32;
        assert_eq!(rows, vec![vec![0., m, m], vec![0., 0., m], vec![0., 0., m]]);
    }

    #[test]
    fn bias_after_a_cache_sees_every_cached_key() {
        let bias = causal_bias_after(2, 2, DType::F32, &Device::Cpu).unwrap();
        let rows = bias.squeeze(0).unwrap().squeeze(0).unwrap();
        let m = MASKED as f32;
        assert_eq!(
            rows.to_vec2::<f32>().unwrap(),
            vec![vec![0., 0., 0., m], vec![0., 0., 0., 0.]]
        );
    }
}
