//! Scoring rows: the mean next-token cross-entropy over the targets the loss masks mark,
//! and its exponential, the perplexity.
//!
//! Rows are batched in order of length (fewer pad positions), right-padded with id 0.
//! Right padding needs no attention mask under a causal model: a real position never
//! sees a later one, so pad keys are invisible to every query that counts. Per-token
//! losses are summed in f64, so the result does not depend on how rows are batched
//! beyond float rounding of the forward itself.

use candle_core::{DType, Device, Tensor, D};

use super::data::Row;
use crate::model::Llama;

/// Loss over a set of rows.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Score {
    /// Mean token loss (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Targets counted.
    pub tokens: u64,
    /// Rows with at least one target.
    pub rows: u64,
}

/// Scores `rows` through `model`, `batch_size` rows per forward pass. `each_batch` is
/// called with the number of rows done after every batch; an error from it stops.
pub fn score<E>(
    model: &Llama,
    rows: &[Row],
    batch_size: usize,
    mut each_batch: impl FnMut(usize) -> Result<(), E>,
) -> Result<Score, ScoreError<E>> {
    let vocab = model.config().vocab_size;
    for (i, r) in rows.iter().enumerate() {
        if r.input_ids.len() != r.loss_mask.len() {
            return Err(ScoreError::Input(format!(
                "row {i}: {} input_ids but {} loss_mask values",
                r.input_ids.len(),
                r.loss_mask.len()
            )));
        }
        if let Some(t) = r.input_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ScoreError::Input(format!(
                "row {i}: token id {t} is outside the model's vocabulary (size {vocab})"
            )));
        }
    }
    let mut order: Vec<&Row> = rows
        .iter()
        .filter(|r| super::data::target_count(r) > 0)
        .collect();
    order.sort_by_key(|r| r.input_ids.len());
    let (mut sum, mut tokens) = (0.0f64, 0u64);
    let mut done = 0usize;
    for batch in order.chunks(batch_size.max(1)) {
        let (s, n) = batch_nll(model, batch).map_err(|e| ScoreError::Model(e.to_string()))?;
        sum += s;
        tokens += n;
        done += batch.len();
        each_batch(done).map_err(ScoreError::Stopped)?;
    }
    if tokens == 0 {
        return Err(ScoreError::Input(
            "no row has a target token to score (every loss_mask is false, or rows have \
             fewer than 2 tokens)"
                .into(),
        ));
    }
    let loss = sum / tokens as f64;
    Ok(Score {
        loss,
        perplexity: loss.exp(),
        tokens,
        rows: order.len() as u64,
    })
}

/// Why scoring failed.
#[derive(Debug)]
pub enum ScoreError<E> {
    /// The rows cannot be scored by this model.
    Input(String),
    /// A tensor operation failed.
    Model(String),
    /// The callback asked to stop.
    Stopped(E),
}

/// Summed loss and target count of one batch. Every position is scored, the last of
/// each row against a dummy target with weight 0: narrowing the logits to `len - 1`
/// positions would copy the whole block.
fn batch_nll(model: &Llama, batch: &[&Row]) -> candle_core::Result<(f64, u64)> {
    let device = model.device();
    let len = batch.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
    let b = batch.len();
    let mut ids = vec![0u32; b * len];
    let mut targets = vec![0u32; b * len];
    let mut weights = vec![0f32; b * len];
    let mut count = 0u64;
    for (r, row) in batch.iter().enumerate() {
        let n = row.input_ids.len();
        ids[r * len..r * len + n].copy_from_slice(&row.input_ids);
        if n > 1 {
            targets[r * len..r * len + n - 1].copy_from_slice(&row.input_ids[1..]);
        }
        for (i, &m) in row.loss_mask.iter().enumerate().skip(1) {
            if m {
                weights[r * len + i - 1] = 1.0;
                count += 1;
            }
        }
    }
    let ids = Tensor::from_vec(ids, (b, len), device)?;
    let targets = Tensor::from_vec(targets, (b, len), device)?;
    let logits = model.forward(&ids, None, false)?;
    let nll = token_nll(&logits, &targets)?.to_dtype(DType::F32)?;
    let w = Tensor::from_vec(weights, (b, len), &Device::Cpu)?.to_device(device)?;
    // A position of weight 0 adds nothing, whatever its loss (0 * inf would be NaN).
    let nll = w.ne(0f32)?.where_cond(&nll, &nll.zeros_like()?)?;
    let sum = (nll * w)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok((sum, count))
}

/// `-log softmax(logits)[target]` per position: logits `[b, s, v]`, targets `[b, s]`
/// (u32); computed in f32 (f64 for f64 logits). Returns `[b, s]`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logits = logits.to_dtype(dtype)?;
    if crate::model::fused_cpu::usable_cross_entropy(&logits.flatten_to(1)?) {
        // One pass a row on the CPU (max, exp-sum, pick), without the shifted copy.
        let (b, s, v) = logits.dims3()?;
        let (picked, _) = crate::model::fused_cpu::cross_entropy_forward(
            &logits.reshape((b * s, v))?,
            &targets.flatten_all()?,
        )?;
        return picked.neg()?.reshape((b, s));
    }
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
    (lse - picked)?.squeeze(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_minus_log_softmax_of_the_target() {
        let logits = Tensor::new(&[[[0f32, (3f32).ln()], [1.0, 1.0]]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[1u32, 0]], &Device::Cpu).unwrap();
        let nll = token_nll(&logits, &targets)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((nll[0][0] - (-(0.75f32).ln())).abs() < 1e-6);
        assert!((nll[0][1] - 2f32.ln()).abs() < 1e-6);
    }
}
