//! Rebuilding a Hugging Face `tokenizer.json` from GGUF tokenizer metadata
//! (`tokenizer.ggml.*`). Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported:
//! vocabulary from `tokens` in id order, `merges` as stored, control and user-defined
//! tokens (token types 3 and 4) as added tokens. SentencePiece models are refused.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map, Value as Json};

/// The rebuilt `tokenizer.json` and a matching `tokenizer_config.json`.
pub struct Rebuilt {
    pub tokenizer: Json,
    pub config: Json,
}

fn strings<'a>(meta: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>, String> {
    let v = meta
        .get(key)
        .ok_or_else(|| format!("`{key}` is missing"))?
        .to_vec()
        .map_err(|_| format!("`{key}` is not an array"))?;
    v.iter()
        .map(|s| {
            s.to_string()
                .map(String::as_str)
                .map_err(|_| format!("`{key}` holds a non-string"))
        })
        .collect()
}

/// Builds the tokenizer files from `meta`.
pub fn rebuild(meta: &HashMap<String, Value>) -> Result<Rebuilt, String> {
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"
        ));
    }
    let tokens = strings(meta, "tokenizer.ggml.tokens")?;
    let merges = strings(meta, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|_| "`tokenizer.ggml.token_type` is not an array".to_string())?
            .iter()
            .map(|t| t.to_i32().map(i64::from).unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.to_string(), json!(id));
        let kind = types.get(id).copied().unwrap_or(1);
        if kind == 3 || kind == 4 {
            added.push(json!({
                "id": id,
                "content": token,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": kind == 4,
                "special": kind == 3,
            }));
        }
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    let pre_tokenizer = match pre {
        // SmolLM's tokenizer splits digits one by one before the byte-level split.
        Some("smollm") => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level.clone(),
        ]}),
        _ => byte_level.clone(),
    };
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => json!([a, b]),
            None => json!([m, ""]),
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    let token = |key: &str| {
        meta.get(key)
            .and_then(|v| v.to_u32().ok())
            .and_then(|id| tokens.get(id as usize))
            .map(|t| json!(t))
            .unwrap_or(Json::Null)
    };
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
    });
    if let Some(t) = meta
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
    {
        config["chat_template"] = json!(t);
    }
    Ok(Rebuilt { tokenizer, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A byte-level vocabulary like SmolLM2's: specials first, single bytes, `ĠĠ`, and
    /// no merge that joins digits (its merges were learned on digits split one by one).
    fn smollm_like(pre: &str) -> HashMap<String, Value> {
        let tokens = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "Ġ",
            "1",
            "2",
            "a",
            "ĠĠ",
        ];
        HashMap::from([
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".into(), strings(&tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array([3, 3, 3, 1, 1, 1, 1, 1].map(Value::I32).to_vec()),
            ),
            ("tokenizer.ggml.merges".into(), strings(&["Ġ Ġ"])),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ])
    }

    fn encode(meta: &HashMap<String, Value>, text: &str) -> Vec<u32> {
        let json = rebuild(meta).unwrap().tokenizer.to_string();
        let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn smollm_splits_each_digit_as_llama_cpp_does() {
        // Checked on SmolLM2-135M-Instruct.Q4_1.gguf by benches/gguf_check.py: llama.cpp's
        // `smollm` split isolates digits, so two spaces before `12` stay one `ĠĠ`.
        assert_eq!(encode(&smollm_like("smollm"), "  12"), [7, 4, 5]);
        // Without the digit split GPT-2's regex takes ` 12` together: `Ġ`, `Ġ`, `1`, `2`.
        assert_eq!(encode(&smollm_like("gpt2"), "  12"), [3, 3, 4, 5]);
        // Control tokens stay whole.
        assert_eq!(
            encode(&smollm_like("smollm"), "<|im_start|>a<|im_end|>"),
            [1, 6, 2]
        );
    }

    #[test]
    fn tokenizer_config_keeps_bos_and_add_bos_token() {
        let config = rebuild(&smollm_like("smollm")).unwrap().config;
        assert_eq!(config["bos_token"], "<|im_start|>");
        assert_eq!(config["eos_token"], "<|im_end|>");
        assert_eq!(config["add_bos_token"], false);
    }
}
