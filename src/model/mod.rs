//! Candle model code: config, weight loading, the Llama/Qwen2 decoder, the frozen
//! linear, LoRA, generation (KV cache, sampling, tokenizer) and the entry points the
//! CLI calls.

pub mod adapt;
pub mod api;
pub mod attention;
pub mod config;
pub mod device;
pub mod error;
pub mod frozen;
pub mod fused;
pub mod fused_cpu;
pub mod fused_cuda;
pub mod generate;
pub mod inspect;
pub mod kv_cache;
pub mod llama;
pub mod load;
pub mod lora;
pub mod lora_config;
pub mod loss;
pub mod mask;
pub mod mlp;
pub mod norm;
pub mod packed;
pub mod panels;
pub mod rope;
pub mod sampling;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod weights;

pub use adapt::{attach_adapter, init_lora, lora_a_name, lora_b_name};
pub use api::{forward_logits, ids_tensor, read_input_ids, write_logits};
pub use config::{Architecture, ModelConfig};
pub use device::DeviceChoice;
pub use error::ModelError;
pub use generate::{generate, generate_with, GenerateOptions, Generation, StopCause};
pub use inspect::{inspect, InspectKind, InspectReport};
pub use kv_cache::KvCache;
pub use llama::{Llama, LogitsAt};
pub use load::{load_model, parse_compute_dtype, ModelDir};
pub use lora::DropoutSeed;
pub use lora_config::{LayerSelection, LoraConfig, Targets};
pub use loss::causal_lm_loss;
pub use sampling::{Sampler, SamplingConfig};
pub use tokenizer::{ChatTemplate, TextTokenizer};
