//! Importing a llama-architecture GGUF checkpoint (llama.cpp's format) as a Hugging Face
//! model directory: `config.json` from the `llama.*` metadata, `model.safetensors` with
//! HF tensor names, and `tokenizer.json` rebuilt from the `tokenizer.ggml.*` metadata.
//!
//! Tensors are dequantized one at a time (F32, F16, BF16, Q4_0, Q4_1, Q8_0) with candle's
//! GGUF reader. llama.cpp's converter permutes the rows of `attn_q` / `attn_k` so that
//! rotary pairs are adjacent (`reshape(heads, 2, d/2, in).swapaxes(1, 2)`); the import
//! undoes it (`reshape(heads, d/2, 2, in).swapaxes(1, 2)`), which moves values only.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::error::FormatError;
use super::safetensors_in::{safetensors_dtype, RawTensor};
use super::safetensors_out::{write_json, SafetensorsWriter, TensorSpec};

/// Imports the GGUF file `path` into the existing directory `out`, weights stored as
/// `dtype` (`f32`, `f16` or `bf16`). Returns the number of tensors written.
pub fn import(path: &Path, out: &Path, dtype: &str) -> Result<usize, FormatError> {
    let fail = |message: String| FormatError::Gguf {
        file: path.to_path_buf(),
        message,
    };
    let dtype = match dtype {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => {
            return Err(fail(format!(
                "unknown dtype `{other}` (expected f32, f16 or bf16)"
            )))
        }
    };
    let mut file = File::open(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content =
        Content::read(&mut file).map_err(|e| fail(format!("not a readable GGUF file: {e}")))?;
    let meta = Meta {
        content: &content,
        fail: &fail,
    };
    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        return Err(fail(format!(
            "architecture `{arch}` is not supported (only llama)"
        )));
    }
    let heads = meta.uint("llama.attention.head_count")?;
    let kv_heads = meta.uint_or("llama.attention.head_count_kv", heads)?;
    let hidden = meta.uint("llama.embedding_length")?;
    let layers = meta.uint("llama.block_count")?;

    // Plan: every GGUF tensor, its HF name and how to fix it.
    let mut plan: BTreeMap<String, (String, Fix)> = BTreeMap::new();
    for (name, info) in &content.tensor_infos {
        match info.ggml_dtype {
            GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::BF16
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q8_0 => {}
            other => {
                return Err(fail(format!(
                "tensor `{name}` is {other:?}; taper imports F32, F16, BF16, Q4_0, Q4_1 and Q8_0"
            )))
            }
        }
        let (hf, fix) = hf_name(name, heads, kv_heads).ok_or_else(|| {
            fail(format!(
                "tensor `{name}` has no Hugging Face Llama counterpart"
            ))
        })?;
        if plan.insert(hf.clone(), (name.clone(), fix)).is_some() {
            return Err(fail(format!("two tensors map to `{hf}`")));
        }
    }
    let embed = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| fail("no token_embd.weight".into()))?;
    let vocab = embed.shape.dims()[0];
    let tied = !plan.contains_key("lm_head.weight");

    let st_dtype = safetensors_dtype(dtype).expect("float dtype");
    let specs: Vec<TensorSpec> = plan
        .iter()
        .map(|(hf, (name, _))| TensorSpec {
            name: hf.clone(),
            dtype: st_dtype,
            shape: content.tensor_infos[name].shape.dims().to_vec(),
        })
        .collect();
    let weights = out.join("model.safetensors");
    let st_meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = SafetensorsWriter::create(&weights, &specs, Some(&st_meta))?;
    for (hf, (name, fix)) in &plan {
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| fail(format!("reading `{name}`: {e}")))?;
        let t = q
            .dequantize(&Device::Cpu)
            .and_then(|t| fix.apply(t))
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| fail(format!("dequantizing `{name}`: {e}")))?;
        let raw = RawTensor::from_tensor(&t).map_err(|e| fail(format!("`{name}`: {e}")))?;
        writer.write(hf, &raw.data)?;
    }
    writer.finish()?;

    let head_dim = meta.uint_or("llama.attention.key_length", hidden / heads.max(1))?;
    let token_id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": false,
        "mlp_bias": false,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": meta.uint("llama.feed_forward_length")?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": meta.uint_or("llama.context_length", 2048)?,
        "rms_norm_eps": meta.float_or("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
        "rope_theta": meta.float_or("llama.rope.freq_base", 10000.0)?,
        "tie_word_embeddings": tied,
        "vocab_size": vocab,
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
        "pad_token_id": token_id("tokenizer.ggml.padding_token_id"),
        "torch_dtype": match dtype { DType::F16 => "float16", DType::BF16 => "bfloat16", _ => "float32" },
    });
    write_json(&out.join("config.json"), &config)?;
    if content.metadata.contains_key("tokenizer.ggml.model") {
        let tokenizer = super::gguf_tokenizer::rebuild(&content.metadata)
            .map_err(|m| fail(format!("tokenizer: {m}")))?;
        write_json(&out.join("tokenizer.json"), &tokenizer.tokenizer)?;
        write_json(&out.join("tokenizer_config.json"), &tokenizer.config)?;
    }
    Ok(plan.len())
}

/// A fix-up applied to a dequantized tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    None,
    /// Undo llama.cpp's rotary row permutation with this many heads.
    Unpermute(usize),
}

impl Fix {
    fn apply(self, t: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Fix::None => Ok(t),
            Fix::Unpermute(heads) => unpermute(&t, heads),
        }
    }
}

/// Inverse of llama.cpp's `permute`: rows `[heads, 2, d/2]` were stored as `[heads, d/2, 2]`.
pub fn unpermute(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("{rows} rows cannot be split into {heads} heads of pairs");
    }
    t.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// llama.cpp's `permute` (for tests and for writing GGUF files).
pub fn permute(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("{rows} rows cannot be split into {heads} heads of pairs");
    }
    t.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

fn hf_name(name: &str, heads: usize, kv_heads: usize) -> Option<(String, Fix)> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(top) = top {
        return Some((top.to_string(), Fix::None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, fix) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", Fix::None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", Fix::None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Fix::Unpermute(heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Fix::Unpermute(kv_heads)),
        "attn_v.weight" => ("self_attn.v_proj.weight", Fix::None),
        "attn_output.weight" => ("self_attn.o_proj.weight", Fix::None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", Fix::None),
        "ffn_up.weight" => ("mlp.up_proj.weight", Fix::None),
        "ffn_down.weight" => ("mlp.down_proj.weight", Fix::None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), fix))
}

struct Meta<'a, F: Fn(String) -> FormatError> {
    content: &'a Content,
    fail: &'a F,
}

impl<F: Fn(String) -> FormatError> Meta<'_, F> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<String, FormatError> {
        self.get(key)
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| (self.fail)(format!("metadata `{key}` is missing or not a string")))
    }

    fn uint(&self, key: &str) -> Result<usize, FormatError> {
        match self.get(key) {
            Some(v) => {
                int(v).ok_or_else(|| (self.fail)(format!("metadata `{key}` is not an integer")))
            }
            None => Err((self.fail)(format!("metadata `{key}` is missing"))),
        }
    }

    fn uint_or(&self, key: &str, default: usize) -> Result<usize, FormatError> {
        match self.get(key) {
            Some(_) => self.uint(key),
            None => Ok(default),
        }
    }

    fn float_or(&self, key: &str, default: f64) -> Result<f64, FormatError> {
        match self.get(key) {
            Some(Value::F32(v)) => Ok(super::safetensors_out::short_f64(*v)),
            Some(Value::F64(v)) => Ok(*v),
            Some(_) => Err((self.fail)(format!("metadata `{key}` is not a number"))),
            None => Ok(default),
        }
    }
}

fn int(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => Some(*x as usize),
        Value::I32(x) if *x >= 0 => Some(*x as usize),
        Value::I64(x) if *x >= 0 => Some(*x as usize),
        _ => None,
    }
}
