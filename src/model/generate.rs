//! Autoregressive generation with a KV cache: the prompt is fed once, then one token per
//! step, each chosen by a seeded [`Sampler`] from the last position's logits. Stops at a
//! stop token (EOS) or after `max_new_tokens`.
//!
//! Works on any [`Llama`]: an adapter attached unmerged is applied in every step.

use candle_core::{DType, Tensor};
use serde::Serialize;

use super::api::ids_tensor;
use super::error::{CandleContext, ModelError};
use super::llama::{Llama, LogitsAt};
use super::sampling::{Sampler, SamplingConfig};

/// What to generate and how.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// At most this many new tokens (a stop token is not counted in the output).
    pub max_new_tokens: usize,
    /// How each token is picked.
    pub sampling: SamplingConfig,
    /// Seed of the sampler's RNG.
    pub seed: u64,
    /// Tokens that end the generation.
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: SamplingConfig::default(),
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopCause {
    /// A stop token was generated.
    Eos,
    /// `max_new_tokens` were generated.
    MaxNewTokens,
}

/// The generated tokens (prompt and stop token excluded) and why generation stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: StopCause,
}

/// Generates a continuation of `prompt` (non-empty ids inside the vocabulary).
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<Generation, ModelError> {
    generate_with(model, prompt, opts, |_| true)
}

/// [`generate`], calling `on_token` with each new token as it is chosen; returning false
/// from it stops early (reported as [`StopCause::MaxNewTokens`]).
pub fn generate_with(
    model: &Llama,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation, ModelError> {
    opts.sampling
        .validate()
        .map_err(|message| ModelError::InvalidInput {
            what: "sampling".into(),
            message,
        })?;
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput {
            what: "prompt".into(),
            message: "the prompt has no tokens (and the tokenizer adds no BOS)".into(),
        });
    }
    let device = model.device();
    let vocab = model.config().vocab_size;
    let mut input = ids_tensor(&[prompt.to_vec()], vocab, device)?;
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(opts.sampling.clone(), opts.seed);
    let mut history = prompt.to_vec();
    let mut tokens = Vec::new();
    while tokens.len() < opts.max_new_tokens {
        let step = tokens.len();
        let mut logits = model
            .forward_cached(&input, &mut cache, LogitsAt::Last)
            .and_then(|l| l.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .ctx(|| format!("generation step {step}"))?;
        let next = sampler.sample(&mut logits, &history);
        if opts.stop_tokens.contains(&next) {
            return Ok(Generation {
                tokens,
                stop: StopCause::Eos,
            });
        }
        tokens.push(next);
        history.push(next);
        if !on_token(next) {
            break;
        }
        input = Tensor::from_vec(vec![next], (1, 1), device)
            .ctx(|| format!("generation step {step}"))?;
    }
    Ok(Generation {
        tokens,
        stop: StopCause::MaxNewTokens,
    })
}
