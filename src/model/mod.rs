//! Candle model code: config, weight loading, the Llama/Qwen2 decoder, the frozen
//! linear, LoRA, and the entry points the CLI calls.

pub mod adapt;
pub mod api;
pub mod attention;
pub mod config;
pub mod device;
pub mod error;
pub mod frozen;
pub mod inspect;
pub mod llama;
pub mod load;
pub mod lora;
pub mod lora_config;
pub mod loss;
pub mod mask;
pub mod mlp;
pub mod norm;
pub mod rope;
pub mod weights;

pub use adapt::{attach_adapter, init_lora, lora_a_name, lora_b_name};
pub use api::{forward_logits, ids_tensor, read_input_ids, write_logits};
pub use config::{Architecture, ModelConfig};
pub use device::DeviceChoice;
pub use error::ModelError;
pub use inspect::{inspect, InspectKind, InspectReport};
pub use llama::Llama;
pub use load::{load_model, parse_compute_dtype, ModelDir};
pub use lora::DropoutSeed;
pub use lora_config::{LayerSelection, LoraConfig, Targets};
pub use loss::causal_lm_loss;
