//! `config.json` of a Hugging Face causal LM, read in both the transformers 4 form
//! (top-level `rope_theta`, `torch_dtype`) and the transformers 5 form
//! (`rope_parameters: {rope_theta, rope_type}`, `dtype`), then validated into
//! [`ModelConfig`], the one shape the model code reads.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::ModelError;

/// The decoder families taper implements. Qwen2 is Llama with q/k/v biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    /// The class name used in `config.json`'s `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hf_name())
    }
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// The dtype the checkpoint says it was saved in (`dtype` or `torch_dtype`), if any.
    pub stored_dtype: Option<String>,
}

/// Mirror of the fields taper reads; everything else in the file is ignored.
#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    dtype: Option<String>,
    torch_dtype: Option<String>,
}

/// `rope_parameters` (v5) or `rope_scaling` (v4).
#[derive(Debug, Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    /// Older v4 files spell it `type`.
    #[serde(rename = "type")]
    kind: Option<String>,
}

impl ModelConfig {
    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses config text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ModelError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Validator { path }.validate(raw)
    }

    /// Number of query heads per key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, message: impl Into<String>) -> ModelError {
        ModelError::InvalidConfig {
            path: self.path.to_path_buf(),
            message: message.into(),
        }
    }

    fn unsupported(&self, what: impl Into<String>) -> ModelError {
        ModelError::Unsupported {
            path: self.path.to_path_buf(),
            what: what.into(),
        }
    }

    fn required(&self, value: Option<usize>, key: &str) -> Result<usize, ModelError> {
        match value {
            Some(0) => Err(self.invalid(format!("`{key}` must be greater than 0"))),
            Some(v) => Ok(v),
            None => Err(self.invalid(format!("missing `{key}`"))),
        }
    }

    fn architecture(&self, raw: &RawConfig) -> Result<Architecture, ModelError> {
        let names = raw.architectures.as_deref().unwrap_or_default();
        match names {
            [] => Err(self.invalid("missing `architectures`")),
            [name] => match name.as_str() {
                "LlamaForCausalLM" => Ok(Architecture::Llama),
                "Qwen2ForCausalLM" => Ok(Architecture::Qwen2),
                other => Err(self.unsupported(format!(
                    "architecture `{other}` (taper reads LlamaForCausalLM and Qwen2ForCausalLM)"
                ))),
            },
            many => Err(self.unsupported(format!("several architectures {many:?}"))),
        }
    }

    /// The rope base, from v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`.
    fn rope_theta(&self, raw: &RawConfig) -> Result<f64, ModelError> {
        for (key, rope) in [
            ("rope_parameters", &raw.rope_parameters),
            ("rope_scaling", &raw.rope_scaling),
        ] {
            if let Some(rope) = rope {
                let kind = rope.rope_type.as_deref().or(rope.kind.as_deref());
                if let Some(kind) = kind.filter(|k| *k != "default") {
                    return Err(self.unsupported(format!("`{key}.rope_type` = \"{kind}\"")));
                }
            }
        }
        let theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(self.invalid(format!("rope_theta must be positive, got {theta}")));
        }
        Ok(theta)
    }

    fn validate(&self, raw: RawConfig) -> Result<ModelConfig, ModelError> {
        let architecture = self.architecture(&raw)?;
        let hidden_size = self.required(raw.hidden_size, "hidden_size")?;
        let intermediate_size = self.required(raw.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = self.required(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = self.required(raw.num_attention_heads, "num_attention_heads")?;
        let vocab_size = self.required(raw.vocab_size, "vocab_size")?;
        let num_key_value_heads = self.required(
            raw.num_key_value_heads.or(Some(num_attention_heads)),
            "num_key_value_heads",
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(self.invalid(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of \
                 num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => self.required(Some(d), "head_dim")?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(self.invalid(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads \
                     ({num_attention_heads}) and no head_dim is given"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.invalid(format!("head_dim ({head_dim}) must be even for rope")));
        }
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(self.unsupported(format!("hidden_act \"{act}\"")));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(self.unsupported("use_sliding_window = true"));
        }
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(self.invalid(format!("rms_norm_eps must be >= 0, got {rms_norm_eps}")));
        }
        let rope_theta = self.rope_theta(&raw)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match architecture {
            Architecture::Llama => (
                attention_bias,
                attention_bias,
                raw.mlp_bias.unwrap_or(false),
            ),
            Architecture::Qwen2 => (true, false, false),
        };
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            stored_dtype: raw.dtype.or(raw.torch_dtype),
        })
    }
}

/// The `config.json` path inside a model directory.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_json_str(text, Path::new("config.json"))
    }

    const V4: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"vocab_size":512,"rms_norm_eps":1e-5,"rope_theta":500000.0,
        "torch_dtype":"bfloat16","tie_word_embeddings":true,"rope_scaling":null}"#;

    #[test]
    fn reads_transformers_v4_form() {
        let c = parse(V4).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_groups(), 2);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.stored_dtype.as_deref(), Some("bfloat16"));
        assert!(!c.qkv_bias);
    }

    #[test]
    fn reads_transformers_v5_form() {
        let text = V4
            .replace(
                r#""rope_theta":500000.0"#,
                r#""rope_parameters":{"rope_theta":1e6,"rope_type":"default"}"#,
            )
            .replace("torch_dtype", "dtype");
        let c = parse(&text).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.stored_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_llama_honours_attention_bias() {
        let q = parse(&V4.replace("LlamaForCausalLM", "Qwen2ForCausalLM")).unwrap();
        assert!(q.qkv_bias && !q.o_bias);
        let l =
            parse(&V4.replace(r#""vocab_size""#, r#""attention_bias":true,"vocab_size""#)).unwrap();
        assert!(l.qkv_bias && l.o_bias);
    }

    #[test]
    fn unknown_architecture_is_refused_by_name() {
        let err = parse(&V4.replace("LlamaForCausalLM", "GPT2LMHeadModel")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("GPT2LMHeadModel") && text.contains("not supported yet"),
            "{text}"
        );
    }

    #[test]
    fn scaled_rope_is_refused_in_both_forms() {
        let v4 = V4.replace(
            r#""rope_scaling":null"#,
            r#""rope_scaling":{"rope_type":"llama3","factor":8.0}"#,
        );
        let text = parse(&v4).unwrap_err().to_string();
        assert!(
            text.contains("llama3") && text.contains("not supported yet"),
            "{text}"
        );
        let v5 = V4.replace(
            r#""rope_theta":500000.0"#,
            r#""rope_parameters":{"rope_theta":1e6,"rope_type":"yarn"}"#,
        );
        assert!(parse(&v5).unwrap_err().to_string().contains("yarn"));
    }

    #[test]
    fn bad_head_counts_are_refused() {
        let text = parse(&V4.replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#))
            .unwrap_err()
            .to_string();
        assert!(text.contains("num_key_value_heads"), "{text}");
        let text = parse(&V4.replace(r#""hidden_size":64,"#, ""))
            .unwrap_err()
            .to_string();
        assert!(text.contains("missing `hidden_size`"), "{text}");
    }
}
