//! The causal language-modelling loss: mean cross-entropy of predicting token `t+1` from
//! positions `..=t`, as transformers computes it with `labels = input_ids`.

use candle_core::{DType, Result, Tensor};

use super::fused::{cross_entropy, loss_dtype};

/// Mean cross-entropy over the `batch × (seq - 1)` next-token predictions of `logits`
/// `[batch, seq, vocab]` against `input_ids` `[batch, seq]` (u32). With `label_mask`
/// `[batch, seq]` (non-zero = counts), a prediction counts only when the token it
/// predicts is marked. Computed in f32 (f64 for f64 logits); differentiable through
/// [`super::fused::cross_entropy`], whose backward does not keep a log-softmax of the
/// vocabulary.
///
/// The logits are scored as they are, all `batch × seq` rows, with the last position of
/// each sequence weighted 0 (it predicts nothing): narrowing them to `seq - 1` positions
/// would copy the whole `[batch, seq - 1, vocab]` block, and its backward would pad the
/// gradient back with another copy.
pub fn causal_lm_loss(
    logits: &Tensor,
    input_ids: &Tensor,
    label_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        candle_core::bail!("the loss needs sequences of at least 2 tokens, got {s}")
    }
    if input_ids.dims() != [b, s] {
        candle_core::bail!(
            "the loss got input ids {:?} for logits {:?}",
            input_ids.dims(),
            logits.dims()
        )
    }
    let dtype = loss_dtype(logits.dtype());
    let logits = logits.to_dtype(dtype)?.reshape((b * s, v))?;
    // Row (i, j) predicts token (i, j + 1); the last row of each sequence gets label 0
    // and weight 0.
    let pad = |t: &Tensor| -> Result<Tensor> {
        let t = t.narrow(1, 1, s - 1)?;
        Tensor::cat(&[&t, &t.narrow(1, 0, 1)?.zeros_like()?], 1)?.flatten_all()
    };
    let labels = pad(input_ids)?;
    let counts = match label_mask {
        None => Tensor::ones((b, s), DType::U8, logits.device())?,
        Some(mask) => mask.ne(0u8)?,
    };
    let weights = pad(&counts)?.to_dtype(dtype)?;
    cross_entropy(&logits, &labels, Some(&weights))
}
