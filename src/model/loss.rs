//! The causal language-modelling loss: mean cross-entropy of predicting token `t+1` from
//! positions `..=t`, as transformers computes it with `labels = input_ids`.

use candle_core::{DType, Result, Tensor, D};

/// Mean cross-entropy over the `batch × (seq - 1)` next-token predictions of `logits`
/// `[batch, seq, vocab]` against `input_ids` `[batch, seq]` (u32). With `label_mask`
/// `[batch, seq]` (non-zero = counts), a prediction counts only when the token it
/// predicts is marked. Computed in f32 (f64 for f64 logits); differentiable.
pub fn causal_lm_loss(
    logits: &Tensor,
    input_ids: &Tensor,
    label_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        candle_core::bail!("the loss needs sequences of at least 2 tokens, got {s}")
    }
    let dtype = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logits = logits
        .narrow(1, 0, s - 1)?
        .to_dtype(dtype)?
        .reshape((b * (s - 1), v))?;
    let labels = input_ids.narrow(1, 1, s - 1)?.flatten_all()?;
    // log_softmax with a detached max shift (the shift does not change the value).
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    match label_mask {
        None => picked.mean_all()?.neg(),
        Some(mask) => {
            let w = mask
                .narrow(1, 1, s - 1)?
                .flatten_all()?
                .ne(0u8)?
                .to_dtype(dtype)?;
            let count = w.sum_all()?;
            (picked * &w)?.sum_all()?.neg()?.broadcast_div(&count)
        }
    }
}
