//! A frozen linear layer that can carry a LoRA branch:
//! `y = W x (+ b) + s · B(A(dropout(x)))`, with `A` `[r, in]` and `B` `[out, r]` as in
//! PEFT. The branch runs in its own dtype (f32 for an f32 or half model, like PEFT's
//! autocast adapter dtype), and the sum is formed in that dtype before casting back.
//! Dropout is applied only when training.

use candle_core::{Module, ModuleT, Tensor};

use super::error::ModelError;
use super::frozen::FrozenLinear;
use super::weights::Weights;

/// The low-rank update of one linear.
#[derive(Clone, Debug)]
pub struct LoraBranch {
    /// `[r, in]`; a `Var`'s tensor when training.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// The multiplier `s` (alpha / r, alpha / sqrt(r) with rsLoRA, or mlx's `scale`).
    pub scale: f64,
    /// Dropout probability on the branch input, used only when training.
    pub dropout: f32,
}

impl LoraBranch {
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }
}

/// One projection of a decoder block: frozen base plus an optional LoRA branch.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    name: String,
    base: FrozenLinear,
    lora: Option<LoraBranch>,
}

impl LoraLinear {
    /// A layer named `name` (the module path, e.g. `model.layers.0.self_attn.q_proj`).
    pub fn new(name: impl Into<String>, base: FrozenLinear) -> Self {
        Self {
            name: name.into(),
            base,
            lora: None,
        }
    }

    /// Loads the frozen base; the module name is the weights prefix.
    pub fn load(
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self, ModelError> {
        Ok(Self::new(
            w.prefix(),
            FrozenLinear::load(w, in_dim, out_dim, bias)?,
        ))
    }

    /// The module path, which is also the PEFT key stem.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }

    pub fn lora(&self) -> Option<&LoraBranch> {
        self.lora.as_ref()
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        self.base.dims()
    }

    /// Attaches (or with `None` removes) a branch, checking its shapes against the base.
    pub fn set_lora(&mut self, lora: Option<LoraBranch>) -> Result<(), ModelError> {
        if let Some(l) = &lora {
            let (in_dim, out_dim) = self.dims();
            let r = l.rank();
            let (a, b) = (l.a.dims(), l.b.dims());
            if r == 0 || a != [r, in_dim] || b != [out_dim, r] {
                return Err(ModelError::AdapterMismatch {
                    module: self.name.clone(),
                    message: format!(
                        "lora_A {a:?} / lora_B {b:?} do not fit a {in_dim} -> {out_dim} linear \
                         (expected [r, {in_dim}] and [{out_dim}, r])"
                    ),
                });
            }
        }
        self.lora = lora;
        Ok(())
    }
}

impl ModuleT for LoraLinear {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        let Some(l) = &self.lora else { return Ok(y) };
        let x = if train && l.dropout > 0.0 {
            candle_nn::ops::dropout(x, l.dropout)?
        } else {
            x.clone()
        };
        let dtype = l.a.dtype();
        let x = x.to_dtype(dtype)?;
        let down = candle_nn::Linear::new(l.a.clone(), None).forward(&x)?;
        let up = candle_nn::Linear::new(l.b.clone(), None).forward(&down)?;
        let delta = (up * l.scale)?;
        if y.dtype() == dtype {
            y + delta
        } else {
            (y.to_dtype(dtype)? + delta)?.to_dtype(y.dtype())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn branch_adds_scaled_low_rank_update() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1., (6, 5), &dev).unwrap();
        let a = Tensor::randn(0f64, 1., (2, 5), &dev).unwrap();
        let b = Tensor::randn(0f64, 1., (6, 2), &dev).unwrap();
        let x = Tensor::randn(0f64, 1., (3, 5), &dev).unwrap();
        let mut layer = LoraLinear::new("m", FrozenLinear::new(w.clone(), None));
        let branch = LoraBranch {
            a: a.clone(),
            b: b.clone(),
            scale: 2.5,
            dropout: 0.5,
        };
        layer.set_lora(Some(branch)).unwrap();
        let merged = (w + (b.matmul(&a).unwrap() * 2.5).unwrap()).unwrap();
        let want = x.matmul(&merged.t().unwrap()).unwrap();
        let got = layer.forward_t(&x, false).unwrap(); // eval: no dropout
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
    }

    #[test]
    fn wrong_shapes_name_the_module() {
        let w = Tensor::zeros((6, 5), DType::F32, &Device::Cpu).unwrap();
        let mut layer = LoraLinear::new("model.layers.0.mlp.up_proj", FrozenLinear::new(w, None));
        let a = Tensor::zeros((2, 6), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((6, 2), DType::F32, &Device::Cpu).unwrap();
        let err = layer
            .set_lora(Some(LoraBranch {
                a,
                b,
                scale: 1.0,
                dropout: 0.0,
            }))
            .unwrap_err();
        assert!(
            err.to_string().contains("model.layers.0.mlp.up_proj"),
            "{err}"
        );
    }

    #[test]
    fn gradients_reach_a_and_b_but_not_the_base() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (4, 3), &dev).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 2), &dev).unwrap()).unwrap();
        let mut layer = LoraLinear::new("m", FrozenLinear::new(w.clone(), None));
        let branch = LoraBranch {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 1.0,
            dropout: 0.1,
        };
        layer.set_lora(Some(branch)).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 5, 3), &dev).unwrap();
        let grads = layer
            .forward_t(&x, true)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(a.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
        assert!(grads.get(&w).is_none());
    }
}
