//! One optimizer step over a set of micro-batches: the accumulated loss and its
//! gradients, global gradient-norm clipping, the AdamW update. Also the validation loss.
//!
//! The accumulated loss is the mean cross-entropy over **all** counted targets of the
//! step's micro-batches (not a mean of per-batch means): micro-batch `i` with `n_i` of the
//! step's `N` targets contributes `mean_i · n_i / N`, so the summed gradients are those of
//! one big batch.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::data::Batch;
use super::optimizer::{AdamW, AdamWParams};
use super::rng::Rng;
use crate::model::{causal_lm_loss, DropoutSeed, Llama};

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the step's counted targets.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Counted targets.
    pub targets: usize,
    /// Real tokens fed.
    pub tokens: usize,
}

/// Why a step did not update the weights.
#[derive(Debug)]
pub enum StepFailure {
    /// The loss or the gradient norm is NaN or infinite; nothing was updated.
    NonFinite {
        loss: f64,
        grad_norm: f64,
    },
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for StepFailure {
    fn from(e: candle_core::Error) -> Self {
        StepFailure::Candle(e)
    }
}

/// The model with its trainable LoRA weights, optimizer and dropout RNG.
pub struct Trainer {
    model: Llama,
    opt: AdamW,
    dropout: DropoutSeed,
    /// Draws one dropout seed per micro-batch; saved in checkpoints.
    pub rng: Rng,
    max_grad_norm: Option<f64>,
}

impl Trainer {
    /// `vars` are the LoRA weights attached to `model` (any order; kept sorted by name).
    pub fn new(
        mut model: Llama,
        vars: Vec<(String, Var)>,
        adam: AdamWParams,
        max_grad_norm: Option<f64>,
        rng: Rng,
    ) -> candle_core::Result<Self> {
        let dropout = DropoutSeed::new(0);
        model.set_dropout_seed(Some(dropout.clone()));
        Ok(Self {
            model,
            opt: AdamW::new(vars, adam)?,
            dropout,
            rng,
            max_grad_norm,
        })
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    /// The trainable weights, sorted by name.
    pub fn vars(&self) -> &[(String, Var)] {
        self.opt.vars()
    }

    /// Forward and backward of one micro-batch, its mean loss weighted by `weight`
    /// (`n_i / N`). Draws the batch's dropout seed. Returns the weighted loss and grads.
    pub fn micro_backward(
        &mut self,
        batch: &Batch,
        weight: f64,
    ) -> candle_core::Result<(f64, GradStore)> {
        self.dropout.set(self.rng.next_u64());
        let logits = self.model.forward(&batch.ids, None, true)?;
        let loss = (causal_lm_loss(&logits, &batch.ids, Some(&batch.mask))? * weight)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((value, loss.backward()?))
    }

    /// The accumulated loss and gradients (in [`Self::vars`] order) of `micro`.
    pub fn gradients(&mut self, micro: &[Batch]) -> candle_core::Result<(f64, Vec<Tensor>)> {
        let total: usize = micro.iter().map(|b| b.targets).sum();
        let mut acc: Vec<Option<Tensor>> = vec![None; self.vars().len()];
        let mut loss = 0.0;
        for batch in micro.iter().filter(|b| b.targets > 0) {
            let (l, grads) = self.micro_backward(batch, batch.targets as f64 / total as f64)?;
            loss += l;
            for (slot, (_, var)) in acc.iter_mut().zip(self.opt.vars()) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        None => g.clone(),
                        Some(a) => (a + g)?,
                    });
                }
            }
        }
        let grads = acc
            .into_iter()
            .zip(self.opt.vars())
            .map(|(g, (_, v))| g.map_or_else(|| v.zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((loss, grads))
    }

    /// One optimizer step at learning rate `lr`.
    pub fn step(&mut self, micro: &[Batch], lr: f64) -> Result<StepStats, StepFailure> {
        let (loss, mut grads) = self.gradients(micro)?;
        let grad_norm = global_norm(&grads)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(StepFailure::NonFinite { loss, grad_norm });
        }
        if let Some(max) = self.max_grad_norm {
            grads = clip(grads, grad_norm, max)?;
        }
        self.opt.step(&grads, lr)?;
        Ok(StepStats {
            loss,
            grad_norm,
            targets: micro.iter().map(|b| b.targets).sum(),
            tokens: micro.iter().map(|b| b.tokens).sum(),
        })
    }

    /// Mean loss over every counted target of `batches`, without dropout or gradients.
    pub fn eval_loss(&self, batches: &[Batch]) -> candle_core::Result<f64> {
        let total: usize = batches.iter().map(|b| b.targets).sum();
        let mut sum = 0.0;
        for b in batches.iter().filter(|b| b.targets > 0) {
            let logits = self.model.forward(&b.ids, None, false)?.detach();
            let mean = causal_lm_loss(&logits, &b.ids, Some(&b.mask))?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            sum += mean * b.targets as f64;
        }
        Ok(sum / total.max(1) as f64)
    }
}

/// `sqrt(Σ‖g‖²)` over all gradients, summed in f64 in their fixed order.
pub fn global_norm(grads: &[Tensor]) -> candle_core::Result<f64> {
    let mut sum = 0.0;
    for g in grads {
        sum += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Global gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`: every gradient
/// scaled by `max / (norm + 1e-6)` when that is below 1, else left as it is.
pub fn clip(grads: Vec<Tensor>, norm: f64, max: f64) -> candle_core::Result<Vec<Tensor>> {
    let coef = max / (norm + 1e-6);
    if coef >= 1.0 {
        return Ok(grads);
    }
    grads.iter().map(|g| g * coef).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clipping_scales_the_global_norm_down_to_the_maximum_only() {
        let dev = Device::Cpu;
        // Norm 13 over two tensors: sqrt(3² + 4² + 12²).
        let grads = vec![
            Tensor::new(&[3f32, 4.0], &dev).unwrap(),
            Tensor::new(&[[12f32]], &dev).unwrap(),
        ];
        let norm = global_norm(&grads).unwrap();
        assert!((norm - 13.0).abs() < 1e-9);
        let clipped = clip(grads.clone(), norm, 1.0).unwrap();
        let after = global_norm(&clipped).unwrap();
        assert!((after - 13.0 / (13.0 + 1e-6)).abs() < 1e-6, "{after}");
        // Direction kept: each element scaled by the same factor.
        let ratio = clipped[1].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] / 12.0;
        let first = clipped[0].to_vec1::<f32>().unwrap();
        assert!((first[0] - 3.0 * ratio).abs() < 1e-6 && (first[1] - 4.0 * ratio).abs() < 1e-6);
        // Below the maximum: untouched.
        let same = clip(grads.clone(), norm, 20.0).unwrap();
        assert_eq!(same[0].to_vec1::<f32>().unwrap(), [3.0, 4.0]);
    }
}
