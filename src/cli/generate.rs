//! `taper generate`: text from a model (and an adapter, applied unmerged), with a KV
//! cache and seeded sampling. The generated text goes to stdout, alone.

use super::exit::{self, Failure};
use crate::model::{self, ChatTemplate, DeviceChoice, GenerateOptions, SamplingConfig};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

/// `taper generate` options.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folder (any format taper reads), applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Generate at most this many tokens.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose mass reaches P.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Penalise tokens already in the sequence (transformers' rule; 1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wrap the prompt as a user turn of the chat template.
    #[arg(long)]
    pub chat: bool,
    /// chatml | llama3 (with --chat).
    #[arg(long, default_value = "chatml", requires = "chat")]
    pub chat_template: String,
    /// cpu | cuda | metal | auto
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32 | bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::ERROR, format!("error: {e}"))
}

/// `taper generate`.
pub fn generate(a: &GenerateArgs) -> Result<i32, Failure> {
    let device: DeviceChoice = a.device.parse().map_err(fail)?;
    let device = device.open().map_err(fail)?;
    let dtype = model::parse_compute_dtype(&a.dtype).map_err(fail)?;
    let chat = if a.chat {
        Some(a.chat_template.parse::<ChatTemplate>().map_err(fail)?)
    } else {
        None
    };
    let sampling = SamplingConfig {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
    };
    sampling.validate().map_err(fail)?;
    let tokenizer = model::TextTokenizer::from_model_dir(&a.model).map_err(fail)?;
    let mut llama = model::load_model(&a.model, dtype, &device).map_err(fail)?;
    llama.store_for_inference().map_err(fail)?;
    if let Some(dir) = &a.adapter {
        let adapter = crate::formats::read_adapter(dir).map_err(fail)?;
        model::attach_adapter(&mut llama, &adapter, None).map_err(fail)?;
    }
    let ids = tokenizer.encode_prompt(&a.prompt, chat).map_err(fail)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        seed: a.seed,
        stop_tokens: tokenizer.stop_tokens(chat),
    };
    let out = model::generate(&llama, &ids, &opts).map_err(fail)?;
    let text = tokenizer.decode(&out.tokens).map_err(fail)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|_| stdout.flush())
        .map_err(fail)?;
    Ok(exit::SUCCESS)
}
