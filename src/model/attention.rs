//! Grouped-query self-attention with rope and an additive causal/padding bias.
//!
//! The attention itself and the rotary embedding are [`super::fused`] ops: candle's fused
//! kernels forward, a written-out backward that recomputes the probabilities instead of
//! keeping them. Scores and softmax run in f32 for half-precision models (f64 for f64
//! models), as transformers does. Key/value heads are shared by groups of query heads
//! without materialising repeated copies.
//!
//! [`Attention::forward_cached`] is the incremental path: it appends the new keys and
//! values to a [`LayerCache`] and attends over all cached positions.

use candle_core::{ModuleT, Tensor};

use super::fused;

use super::config::ModelConfig;
use super::error::ModelError;
use super::kv_cache::LayerCache;
use super::lora::LoraLinear;
use super::weights::Weights;

/// The `q/k/v/o` projections of one decoder block and its head layout.
#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn load(w: &Weights, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        Ok(Self {
            q_proj: LoraLinear::load(&w.pp("q_proj"), h, q_out, cfg.qkv_bias)?,
            k_proj: LoraLinear::load(&w.pp("k_proj"), h, kv_out, cfg.qkv_bias)?,
            v_proj: LoraLinear::load(&w.pp("v_proj"), h, kv_out, cfg.qkv_bias)?,
            o_proj: LoraLinear::load(&w.pp("o_proj"), q_out, h, cfg.o_bias)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// The four linears, in checkpoint order.
    pub fn linears_mut(&mut self) -> [&mut LoraLinear; 4] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ]
    }

    pub fn linears(&self) -> [&LoraLinear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    /// `x` `[b, s, hidden]`; `cos`/`sin` `[s, head_dim / 2]`; `bias` `[b, 1, s, s]` in the
    /// softmax dtype. Returns `[b, s, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.project(x, cos, sin, train)?;
        self.attend(&q, &k, &v, Some(bias), train)
    }

    /// The incremental forward: `x` `[b, s, hidden]` holds the `s` positions after those
    /// in `cache` (`cos`/`sin` are for those positions), whose keys and values are
    /// appended to the cache. `bias` `[1 or b, 1, s, cached + s]` masks future keys; it
    /// may be `None` when `s` is 1 (one new query sees every key). Inference only.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        cache: &mut LayerCache,
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.project(x, cos, sin, false)?;
        let (k, v) = cache.append(&k, &v)?;
        self.attend(&q, &k, &v, bias, false)
    }

    /// Queries `[b, heads, s, hd]` and keys/values `[b, kv_heads, s, hd]`, rope applied.
    fn project(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        train: bool,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rope = Some((cos, sin));
        let heads = |t: Tensor, n: usize, rope| {
            if t.dim(2)? != n * hd {
                candle_core::bail!(
                    "a projection gave {} features for {n} heads of {hd}",
                    t.dim(2)?
                )
            }
            fused::split_heads(&t, n, rope)
        };
        let q = heads(self.q_proj.forward_t(x, train)?, nh, rope)?;
        let k = heads(self.k_proj.forward_t(x, train)?, nkv, rope)?;
        let v = heads(self.v_proj.forward_t(x, train)?, nkv, None)?;
        Ok((q, k, v))
    }

    /// Attention of `s` queries over `t` keys (`t = s` without a cache), then `o_proj`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let out = fused::merge_heads(&fused::attention(q, k, v, bias)?)?;
        self.o_proj.forward_t(&out, train)
    }
}

/// Differentiable softmax over the last dimension: [`super::fused::softmax_last_dim`].
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    super::fused::softmax_last_dim(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_matches_candle_and_has_gradients() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 3., (4, 7), &Device::Cpu).unwrap()).unwrap();
        let ours = softmax_last_dim(x.as_tensor()).unwrap();
        let fused = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
        let diff = (&ours - &fused).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let w = Tensor::randn(0f32, 1., (4, 7), &Device::Cpu).unwrap();
        let grads = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        // d/dx sum(softmax(x) * w) = p * (w - sum(p * w)), row by row.
        let p = ours.to_vec2::<f32>().unwrap();
        let wv = w.to_vec2::<f32>().unwrap();
        let got = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        for ((pr, wr), gr) in p.iter().zip(&wv).zip(&got) {
            let dot: f32 = pr.iter().zip(wr).map(|(a, b)| a * b).sum();
            for ((pj, wj), gj) in pr.iter().zip(wr).zip(gr) {
                assert!(
                    (pj * (wj - dot) - gj).abs() < 1e-6,
                    "{gj} against {}",
                    pj * (wj - dot)
                );
            }
        }
        // f64 takes candle's ops: the same values.
        let x64 = x.as_tensor().to_dtype(candle_core::DType::F64).unwrap();
        let composed = softmax_last_dim(&x64)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let diff = (&ours - &composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
