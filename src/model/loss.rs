//! The causal language-modelling loss: mean cross-entropy of predicting token `t+1` from
//! positions `..=t`, as transformers computes it with `labels = input_ids`.

use candle_core::{Result, Tensor};

use super::fused::{cross_entropy, loss_dtype};

/// Mean cross-entropy over the `batch × (seq - 1)` next-token predictions of `logits`
/// `[batch, seq, vocab]` against `input_ids` `[batch, seq]` (u32). With `label_mask`
/// `[batch, seq]` (non-zero = counts), a prediction counts only when the token it
/// predicts is marked. Computed in f32 (f64 for f64 logits); differentiable through
/// [`super::fused::cross_entropy`], whose backward does not keep a log-softmax of the
/// vocabulary.
pub fn causal_lm_loss(
    logits: &Tensor,
    input_ids: &Tensor,
    label_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        candle_core::bail!("the loss needs sequences of at least 2 tokens, got {s}")
    }
    let dtype = loss_dtype(logits.dtype());
    let logits = logits
        .narrow(1, 0, s - 1)?
        .to_dtype(dtype)?
        .reshape((b * (s - 1), v))?;
    let labels = input_ids.narrow(1, 1, s - 1)?.flatten_all()?;
    let weights = match label_mask {
        None => None,
        Some(mask) => Some(
            mask.narrow(1, 1, s - 1)?
                .flatten_all()?
                .ne(0u8)?
                .to_dtype(dtype)?,
        ),
    };
    cross_entropy(&logits, &labels, weights.as_ref())
}
