//! Text in and out of a model folder's `tokenizer.json`, for generation: the prompt
//! (optionally in a chat template) to ids with the model's BOS in front, generated ids
//! back to text, and the tokens that end a generation.
//!
//! BOS and EOS are found as the tokenize stage finds them, so a prompt looks like the
//! start of a training row: `tokenizer_config.json`'s `bos_token` / `eos_token` (a string
//! or `{content}`; `null` = none), else the first special token of the vocabulary among
//! the usual names; `add_bos_token: false` there means no BOS in front of a prompt (as the
//! tokenize stage leaves it out of training rows). Generation also stops at `generation_config.json`'s `eos_token_id`
//! (a number or a list) and, with a chat template, at the template's end-of-turn marker.
//!
//! The chat templates render one user turn and the assistant header, exactly as the
//! tokenize stage renders those messages (no system prompt is added).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::error::ModelError;

/// Names tried for BOS when `tokenizer_config.json` does not name it (as the tokenize
/// stage tries them).
pub(crate) const BOS_NAMES: &[&str] = &["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"];
/// Names tried for EOS likewise.
pub(crate) const EOS_NAMES: &[&str] = &[
    "</s>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|im_end|>",
    "<eos>",
    "<|eot_id|>",
];

/// What `tokenizer_config.json` says about one special token (`bos_token`, ...).
pub(crate) enum Declared {
    /// The key is missing (or an object without `content`): fall back to the names.
    Absent,
    /// `null`: the model has no such token (as Qwen2 has no BOS).
    Null,
    /// A string, or an object with a `content` string.
    Named(String),
}

/// Reads `key` of a parsed `tokenizer_config.json`.
pub(crate) fn declared(config: Option<&serde_json::Value>, key: &str) -> Declared {
    match config.and_then(|v| v.get(key)) {
        None => Declared::Absent,
        Some(serde_json::Value::Null) => Declared::Null,
        Some(serde_json::Value::String(s)) => Declared::Named(s.clone()),
        Some(other) => match other.get("content").and_then(|c| c.as_str()) {
            Some(s) => Declared::Named(s.to_string()),
            None => Declared::Absent,
        },
    }
}

/// The first of `names` that is a special added token of `tokenizer`, with its id.
pub(crate) fn well_known_special(tokenizer: &Tokenizer, names: &[&str]) -> Option<(String, u32)> {
    let added = tokenizer.get_added_tokens_decoder();
    names.iter().find_map(|name| {
        added
            .iter()
            .find(|(_, t)| t.special && t.content == *name)
            .map(|(id, _)| (name.to_string(), *id))
    })
}

/// A chat format for prompts (the tokenize stage's `chat_template` values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatTemplate {
    /// `<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n`; stops at
    /// `<|im_end|>`.
    #[default]
    Chatml,
    /// `<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>` +
    /// `<|start_header_id|>assistant<|end_header_id|>\n\n` (prompt trimmed); stops at
    /// `<|eot_id|>`.
    Llama3,
}

impl ChatTemplate {
    /// A single user turn followed by the assistant's header.
    pub fn render(self, prompt: &str) -> String {
        match self {
            Self::Chatml => {
                format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
            }
            Self::Llama3 => format!(
                "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>\
                 <|start_header_id|>assistant<|end_header_id|>\n\n",
                prompt.trim()
            ),
        }
    }

    /// The marker that ends the assistant's turn.
    pub fn end_of_turn(self) -> &'static str {
        match self {
            Self::Chatml => "<|im_end|>",
            Self::Llama3 => "<|eot_id|>",
        }
    }
}

impl std::str::FromStr for ChatTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "chatml" => Ok(Self::Chatml),
            "llama3" => Ok(Self::Llama3),
            other => Err(format!(
                "unknown chat template `{other}` (expected chatml or llama3)"
            )),
        }
    }
}

/// A model's tokenizer with its BOS and stop tokens.
#[derive(Clone, Debug)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    /// Put before every prompt, if the model has one.
    pub bos: Option<u32>,
    /// Tokens that end a generation (EOS and friends), sorted, without duplicates.
    pub stop: Vec<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` of the model folder `dir` and resolves BOS and EOS from the
    /// files beside it.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(super::load::TOKENIZER);
        let fail = |message: String| ModelError::InvalidInput {
            what: path.display().to_string(),
            message,
        };
        if !path.is_file() {
            return Err(fail("no tokenizer.json in the model folder".into()));
        }
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| fail(e.to_string()))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| fail(e.to_string()))?;
        tokenizer.with_padding(None);
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let generation = read_optional_json(&dir.join("generation_config.json"))?;
        let bos = match config.as_ref().and_then(|c| c.get("add_bos_token")) {
            Some(serde_json::Value::Bool(false)) => None,
            _ => resolve(&tokenizer, config.as_ref(), "bos_token", BOS_NAMES),
        };
        let eos = resolve(&tokenizer, config.as_ref(), "eos_token", EOS_NAMES);
        let mut stop: Vec<u32> = eos.into_iter().collect();
        match generation.as_ref().and_then(|g| g.get("eos_token_id")) {
            Some(serde_json::Value::Number(n)) => stop.extend(n.as_u64().map(|n| n as u32)),
            Some(serde_json::Value::Array(ids)) => {
                stop.extend(ids.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
            }
            _ => {}
        }
        stop.sort_unstable();
        stop.dedup();
        Ok(Self {
            tokenizer,
            path,
            bos,
            stop,
        })
    }

    /// The ids of `prompt`: BOS (if any), then the text, rendered in `chat` first when
    /// given. The tokenizer's own post-processor adds nothing.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        chat: Option<ChatTemplate>,
    ) -> Result<Vec<u32>, ModelError> {
        let text = match chat {
            Some(t) => t.render(prompt),
            None => prompt.to_string(),
        };
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| self.fail(e.to_string()))?;
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The stop tokens for a generation in `chat` (adds its end-of-turn marker when the
    /// vocabulary has it).
    pub fn stop_tokens(&self, chat: Option<ChatTemplate>) -> Vec<u32> {
        let mut stop = self.stop.clone();
        if let Some(id) = chat.and_then(|t| self.tokenizer.token_to_id(t.end_of_turn())) {
            stop.push(id);
            stop.sort_unstable();
            stop.dedup();
        }
        stop
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| self.fail(e.to_string()))
    }

    fn fail(&self, message: String) -> ModelError {
        ModelError::InvalidInput {
            what: self.path.display().to_string(),
            message,
        }
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>, ModelError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// A special token's id: named by `key` in `tokenizer_config.json`, else the first of
/// `names` the vocabulary has. An explicit `null` means none.
/// The tokenize stage's rule (`stages::tokenize::tokenizer`) without its errors: a named
/// token that is not in the vocabulary counts as none.
fn resolve(
    tokenizer: &Tokenizer,
    config: Option<&serde_json::Value>,
    key: &str,
    names: &[&str],
) -> Option<u32> {
    match declared(config, key) {
        Declared::Null => None,
        Declared::Named(token) => tokenizer.token_to_id(&token),
        Declared::Absent => well_known_special(tokenizer, names).map(|(_, id)| id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_follow_the_tokenize_stage_rule() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let bos = |config: serde_json::Value| resolve(&tok, Some(&config), "bos_token", BOS_NAMES);
        // No key, or an object without `content`: the first special token among the names.
        assert_eq!(resolve(&tok, None, "bos_token", BOS_NAMES), Some(1));
        assert_eq!(bos(serde_json::json!({"bos_token": {}})), Some(1));
        // Named, as a string or `{content}`; `null` means none.
        assert_eq!(bos(serde_json::json!({"bos_token": "</s>"})), Some(2));
        assert_eq!(
            bos(serde_json::json!({"bos_token": {"content": "<pad>"}})),
            Some(0)
        );
        assert_eq!(bos(serde_json::json!({"bos_token": null})), None);
        assert_eq!(
            resolve(&tok, None, "eos_token", EOS_NAMES),
            Some(2),
            "`</s>` is the first EOS name"
        );
        // A name that is in no form in the tokenizer falls back to none, not an error.
        assert_eq!(bos(serde_json::json!({"bos_token": "<nope>"})), None);
    }

    #[test]
    fn templates_render_one_user_turn_and_the_assistant_header() {
        assert_eq!(
            ChatTemplate::Chatml.render("Hi"),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            ChatTemplate::Llama3.render(" Hi "),
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert!("phi".parse::<ChatTemplate>().unwrap_err().contains("phi"));
    }
}
