//! The Llama decoder (and Qwen2, which is Llama with q/k/v biases): token embedding,
//! a stack of pre-norm blocks (attention + SwiGLU MLP), final RMSNorm and the LM head,
//! tied to the embedding or not.
//!
//! The training forward maps a full sequence to logits and is differentiable end to end
//! with respect to any LoRA weights attached to the projections; the base weights are
//! plain tensors behind frozen linears and never receive a gradient.
//!
//! The incremental forward ([`Llama::forward_cached`]) feeds new tokens against a
//! [`KvCache`] for generation.

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use rayon::iter::{IntoParallelIterator, ParallelIterator};

use super::attention::Attention;
use super::config::ModelConfig;
use super::error::ModelError;
use super::frozen::FrozenLinear;
use super::fused::add;
use super::kv_cache::{KvCache, LayerCache};
use super::lora::{DropoutSeed, LoraLinear};
use super::mask::{attention_bias, causal_bias_after};
use super::mlp::Mlp;
use super::norm::{internal_dtype, RmsNorm};
use super::rope::RotaryEmbedding;
use super::weights::Weights;

/// One pre-norm transformer block.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    pub fn load(w: &Weights, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::load(&w.pp("self_attn"), cfg)?,
            mlp: Mlp::load(&w.pp("mlp"), cfg)?,
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), h, eps)?,
            post_attention_layernorm: RmsNorm::load(&w.pp("post_attention_layernorm"), h, eps)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let x = add(x, &self.self_attn.forward(&h, cos, sin, bias, train)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        add(&x, &self.mlp.forward_t(&h, train)?)
    }

    fn forward_cached(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        cache: &mut LayerCache,
    ) -> candle_core::Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let x = add(
            x,
            &self.self_attn.forward_cached(&h, cos, sin, bias, cache)?,
        )?;
        let h = self.post_attention_layernorm.forward(&x)?;
        add(&x, &self.mlp.forward_t(&h, false)?)
    }
}

/// Which positions [`Llama::forward_cached`] computes logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsAt {
    /// Every new position: `[batch, new, vocab]`.
    All,
    /// Only the last new position: `[batch, 1, vocab]` (what decoding needs; skips the
    /// LM head for the rest of a prompt).
    Last,
}

/// A causal language model of the Llama family.
#[derive(Clone, Debug)]
pub struct Llama {
    cfg: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: FrozenLinear,
    rope: RotaryEmbedding,
}

impl Llama {
    /// Builds the model from checkpoint weights laid out as transformers saves them
    /// (`model.embed_tokens.weight`, `model.layers.{i}....`, `lm_head.weight`).
    pub fn load(w: &Weights, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let m = w.pp("model");
        let embed_tokens = m
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        // The layers load (copy out of the mapping, convert the dtype) in parallel; the
        // first failing layer in order names the error, as a serial load would.
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|i| DecoderLayer::load(&m.pp("layers").pp(i), cfg))
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(&m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            FrozenLinear::new(embed_tokens.clone(), None)
        } else {
            FrozenLinear::load(&w.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        Ok(Self {
            rope: RotaryEmbedding::new(cfg.head_dim, cfg.rope_theta),
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The compute dtype (that of the loaded weights).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The frozen tensors outside the projections: embedding, norms and an untied LM head
    /// (unless packed for inference, when it is no tensor).
    pub fn frozen_tensors(&self) -> Vec<&Tensor> {
        let mut out = vec![&self.embed_tokens, self.norm.weight()];
        out.extend(self.lm_head.weight());
        for l in &self.layers {
            out.push(l.input_layernorm.weight());
            out.push(l.post_attention_layernorm.weight());
        }
        out
    }

    /// Sets the model up for inference: every frozen projection, and an untied LM head,
    /// stores its weight as the forward reads it fastest
    /// ([`FrozenLinear::store_for_inference`]: packed, in panels, or transposed), which speeds up
    /// the forward on the CPU in f32 at the same memory. A model set up this way still
    /// trains, with slower backward products, so the train stage does not call it. A
    /// tied LM head keeps the embedding's layout (a transposed copy would be a second
    /// embedding in memory).
    pub fn store_for_inference(&mut self) -> candle_core::Result<()> {
        self.store_as(FrozenLinear::store_for_inference)
    }

    /// Sets the model up for training: every frozen projection and an untied LM head
    /// ([`FrozenLinear::store_for_training`]: on CPUs with AVX-512, large f32 weights
    /// packed for the forward's and the backward's products). The train stage calls it.
    /// A tied LM head keeps the embedding's tensor (the embedding would keep it anyway,
    /// beside two packed copies).
    pub fn store_for_training(&mut self) -> candle_core::Result<()> {
        for l in self.linears_mut() {
            l.store_for_training()?;
        }
        if !self.cfg.tie_word_embeddings {
            self.lm_head.store_for_training()?;
        }
        Ok(())
    }

    /// [`Self::store_for_inference`] never packing (every weight transposed, as on CPUs
    /// without the packed product or panels): for comparisons.
    pub fn store_transposed(&mut self) -> candle_core::Result<()> {
        self.store_as(FrozenLinear::store_transposed)
    }

    /// `store` on every frozen projection and an untied LM head.
    fn store_as(
        &mut self,
        store: impl Fn(&mut FrozenLinear) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        for l in self.linears_mut() {
            store(l.base_mut())?;
        }
        if !self.cfg.tie_word_embeddings {
            store(&mut self.lm_head)?;
        }
        Ok(())
    }

    /// Every projection that can carry LoRA, layer by layer in checkpoint order
    /// (q, k, v, o, gate, up, down). Never the LM head.
    pub fn linears(&self) -> impl Iterator<Item = &LoraLinear> {
        self.layers
            .iter()
            .flat_map(|l| l.self_attn.linears().into_iter().chain(l.mlp.linears()))
    }

    /// Mutable access to the same projections, for attaching adapters.
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.layers.iter_mut().flat_map(|l| {
            l.self_attn
                .linears_mut()
                .into_iter()
                .chain(l.mlp.linears_mut())
        })
    }

    /// Makes LoRA dropout of every projection reproducible from `seed` (see
    /// [`DropoutSeed`]); `None` goes back to candle's unseeded dropout.
    pub fn set_dropout_seed(&mut self, seed: Option<DropoutSeed>) {
        for linear in self.linears_mut() {
            linear.set_dropout_seed(seed.clone());
        }
    }

    /// Logits `[batch, seq, vocab]` in the compute dtype for `input_ids` `[batch, seq]`
    /// (u32). `attention_mask` `[batch, seq]` marks real tokens with non-zero; positions
    /// are `0..seq` for every row. With `train`, LoRA dropout is active.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        self.logits(&self.forward_hidden(input_ids, attention_mask, train)?)
    }

    /// The LM head's logits for final hidden states `[..., hidden]` (as
    /// [`Llama::forward_hidden`] gives them), `[..., vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// [`Llama::forward`] up to the LM head: the final (normed) hidden states
    /// `[batch, seq, hidden]`. Scoring takes the logits from them a block of positions at
    /// a time, so that `[batch, seq, vocab]` never exists at once.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let dtype = self.dtype();
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, self.cfg.hidden_size))?;
        let (cos, sin) = self.rope.cos_sin(0, s, dtype, self.device())?;
        let bias = attention_bias(b, s, attention_mask, internal_dtype(dtype), self.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, &bias, train)?;
        }
        self.norm.forward(&x)
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// The incremental forward of inference: `input_ids` `[batch, new]` (u32) are the
    /// tokens at positions `cache.seq_len()..` of sequences whose earlier positions are
    /// in `cache`; their keys and values are appended to it. No padding, no dropout.
    /// Gives the logits a full [`Llama::forward`] over the whole sequence gives at those
    /// positions.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        at: LogitsAt,
    ) -> candle_core::Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if s == 0 {
            candle_core::bail!("forward_cached needs at least one new token")
        }
        let offset = cache.seq_len();
        let dtype = self.dtype();
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, self.cfg.hidden_size))?;
        let (cos, sin) = self.rope.cos_sin(offset, s, dtype, self.device())?;
        let bias = if s > 1 {
            Some(causal_bias_after(
                offset,
                s,
                internal_dtype(dtype),
                self.device(),
            )?)
        } else {
            None
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let Some(lc) = cache.layer_mut(i) else {
                candle_core::bail!("the KV cache has fewer layers than the model")
            };
            x = layer.forward_cached(&x, &cos, &sin, bias.as_ref(), lc)?;
        }
        if at == LogitsAt::Last && s > 1 {
            x = x.narrow(1, s - 1, 1)?.contiguous()?;
        }
        self.lm_head.forward(&self.norm.forward(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;

    use crate::model::frozen::Weight;
    use crate::model::{causal_lm_loss, init_lora, load_model, LoraConfig, Targets};

    /// The fixture Llama with LoRA on every projection, B set to fixed values (it starts
    /// at zero, which would zero A's gradients); with every frozen weight in training's
    /// panels when `panels`, whatever its size.
    fn model(panels: bool) -> (super::Llama, VarMap) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let mut model = load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let mut cfg = LoraConfig::new(4, 8.0);
        cfg.targets = Targets::AllLinear;
        let varmap = VarMap::new();
        init_lora(&mut model, &cfg, 7, &varmap).unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.contains("lora_B") {
                let n = var.elem_count();
                let values: Vec<f32> = (0..n)
                    .map(|i| ((i * 7919 + name.len()) % 101) as f32 / 250.0 - 0.2)
                    .collect();
                var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        if panels {
            for l in model.linears_mut() {
                l.base_mut().panel().unwrap();
            }
            model.lm_head.panel().unwrap();
        }
        (model, varmap)
    }

    #[test]
    fn a_model_in_panels_trains_as_the_loaded_one() {
        if !crate::model::panels::available() {
            eprintln!("no AVX-512 on this CPU: the panels are not tried");
            return;
        }
        let ids = Tensor::new(&[[1u32, 15, 9, 200, 17, 3, 42, 8, 99, 5]], &Device::Cpu).unwrap();
        let run = |panels: bool| {
            let (model, varmap) = model(panels);
            if panels {
                let paneled = model
                    .linears()
                    .all(|l| matches!(l.base().stored(), Weight::Paneled(p) if p.trains()));
                assert!(paneled && matches!(model.lm_head.stored(), Weight::Paneled(_)));
            }
            let loss =
                causal_lm_loss(&model.forward(&ids, None, false).unwrap(), &ids, None).unwrap();
            let grads = loss.backward().unwrap();
            let mut named: Vec<(String, Vec<f32>)> = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(name, var)| {
                    let g = grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{name}: no gradient"));
                    (
                        name.clone(),
                        g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    )
                })
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            (loss.to_scalar::<f32>().unwrap(), named)
        };
        let (loss1, grads1) = run(false);
        let (loss2, grads2) = run(true);
        assert!(
            (loss1 - loss2).abs() <= 1e-5 * loss1.abs(),
            "loss {loss1} against {loss2}"
        );
        assert_eq!(grads1.len(), grads2.len());
        for ((name, g1), (_, g2)) in grads1.iter().zip(&grads2) {
            let size = g1.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = g1
                .iter()
                .zip(g2)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(size > 0.0, "{name}: zero gradient");
            assert!(
                diff <= 1e-4 * size,
                "{name}: gradients differ by {diff} of {size}"
            );
        }
    }
}
