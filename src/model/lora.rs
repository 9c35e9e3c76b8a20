//! A frozen linear layer that can carry a LoRA branch:
//! `y = W x (+ b) + s · B(A(dropout(x)))`, with `A` `[r, in]` and `B` `[out, r]` as in
//! PEFT. The branch runs in its own dtype (f32 for an f32 or half model, like PEFT's
//! autocast adapter dtype), and the sum is formed in that dtype before casting back.
//! Dropout is applied only when training. With a [`DropoutSeed`] attached the mask is a
//! pure function of the seed's current value and the module name, so a training run can
//! be replayed bit for bit; without one, candle's (unseeded) dropout is used.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

/// A shared, settable seed for reproducible dropout masks. The trainer sets a fresh
/// value (from its own saved RNG) before each forward pass; every module then derives its
/// mask from that value and its name.
#[derive(Clone, Debug, Default)]
pub struct DropoutSeed(Arc<AtomicU64>);

impl DropoutSeed {
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(AtomicU64::new(seed)))
    }

    pub fn set(&self, seed: u64) {
        self.0.store(seed, Ordering::SeqCst)
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// SplitMix64: one step of the generator whose state is `state`.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted dropout with a mask drawn from `seed`: each element is kept with probability
/// `1 - p` and scaled by `1 / (1 - p)`, as candle's and PyTorch's dropout do.
fn seeded_dropout(x: &Tensor, p: f32, seed: u64) -> candle_core::Result<Tensor> {
    let mut state = seed;
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            // 24 random bits -> uniform in [0, 1), exact in f32.
            let u = (splitmix64(&mut state) >> 40) as f32 / (1u32 << 24) as f32;
            if u >= p {
                scale
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// FNV-1a of a module name, to give each module its own mask stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One projection of a decoder block: frozen base plus an optional LoRA branch.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    name: String,
    base: FrozenLinear,
    lora: Option<LoraBranch>,
    dropout_seed: Option<DropoutSeed>,
}

impl LoraLinear {
    /// Re-stores the frozen base weight for inference:
    /// [`FrozenLinear::store_for_inference`].
    pub fn store_for_inference(&mut self) -> candle_core::Result<()> {
        self.base.store_for_inference()
    }

    /// Sets the frozen base weight up for training: [`FrozenLinear::store_for_training`].
    pub fn store_for_training(&mut self) -> candle_core::Result<()> {
        self.base.store_for_training()
    }

    /// The same never packing: [`FrozenLinear::store_transposed`].
    pub fn store_transposed(&mut self) -> candle_core::Result<()> {
        self.base.store_transposed()
    }

    /// A layer named `name` (the module path, e.g. `model.layers.0.self_attn.q_proj`).
    pub fn new(name: impl Into<String>, base: FrozenLinear) -> Self {
        Self {
            name: name.into(),
            base,
            lora: None,
            dropout_seed: None,
        }
    }

    /// Makes training-time dropout reproducible from `seed` (or, with `None`, candle's
    /// unseeded dropout again).
    pub fn set_dropout_seed(&mut self, seed: Option<DropoutSeed>) {
        self.dropout_seed = seed;
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

    /// The frozen base, to re-store its weight ([`crate::model::Llama`]'s set-ups).
    pub(crate) fn base_mut(&mut self) -> &mut FrozenLinear {
        &mut self.base
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
        let Some(l) = &self.lora else {
            return self.base.forward(x);
        };
        if !(train && l.dropout > 0.0) {
            let (w, bias) = (self.base.stored(), self.base.bias());
            if let Some(y) = super::fused::lora_linear(x, w, bias, &l.a, &l.b, l.scale)? {
                return Ok(y);
            }
        }
        let y = self.base.forward(x)?;
        let x = if train && l.dropout > 0.0 {
            match &self.dropout_seed {
                Some(seed) => {
                    let mut state = seed.get() ^ name_hash(&self.name);
                    seeded_dropout(x, l.dropout, splitmix64(&mut state))?
                }
                None => candle_nn::ops::dropout(x, l.dropout)?,
            }
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
    fn seeded_dropout_repeats_per_seed_and_differs_per_module() {
        let dev = Device::Cpu;
        let x = Tensor::ones((4, 64), DType::F32, &dev).unwrap();
        let branch = LoraBranch {
            a: Tensor::eye(64, DType::F32, &dev).unwrap(),
            b: Tensor::eye(64, DType::F32, &dev).unwrap(),
            scale: 1.0,
            dropout: 0.5,
        };
        let zero = Tensor::zeros((64, 64), DType::F32, &dev).unwrap();
        let layer = |name: &str, seed: &DropoutSeed| {
            let mut l = LoraLinear::new(name, FrozenLinear::new(zero.clone(), None));
            l.set_lora(Some(branch.clone())).unwrap();
            l.set_dropout_seed(Some(seed.clone()));
            l
        };
        let seed = DropoutSeed::new(1);
        let out = |l: &LoraLinear| {
            l.forward_t(&x, true)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (q, v) = (layer("m.q_proj", &seed), layer("m.v_proj", &seed));
        let first = out(&q);
        assert_eq!(first, out(&q), "same seed, same mask");
        assert_ne!(first, out(&v), "another module, another mask");
        assert!(first.iter().all(|&y| y == 0.0 || y == 2.0));
        let kept = first.iter().filter(|&&y| y == 2.0).count();
        assert!((96..160).contains(&kept), "kept {kept} of 256 at p = 0.5");
        seed.set(2);
        assert_ne!(first, out(&q), "new seed, new mask");
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
