//! The tokenizer as the stage uses it: loaded from `tokenizer.json` with the `tokenizers`
//! crate, hashed, with any truncation or padding stored in the file turned off (rows are
//! cut by taper, never by the tokenizer), and its BOS/EOS tokens found.
//!
//! # Which tokens are BOS and EOS
//!
//! For each of BOS and EOS, the first rule that applies decides:
//! 1. `bos_token` / `eos_token` in the stage config name it.
//! 2. `tokenizer_config.json` beside `tokenizer.json` has the key `bos_token` / `eos_token`:
//!    a string, or an object with a `content` string, names it; `null` means the model has
//!    none (as Qwen2 has no BOS).
//! 3. Otherwise the first of these that is a special added token of the tokenizer:
//!    BOS `<s>`, `<|begin_of_text|>`, `<bos>`, `<|startoftext|>`;
//!    EOS `</s>`, `<|end_of_text|>`, `<|endoftext|>`, `<|im_end|>`, `<eos>`, `<|eot_id|>`.
//!
//! A named token must be in the vocabulary. Then `add_bos` absent adds BOS if one was found,
//! unless `tokenizer_config.json` says `add_bos_token: false` (the model has a BOS token but
//! its text does not start with it, as SmolLM2's `<|im_start|>`; Hugging Face's key);
//! `true` requires one (an error saying what was looked for), `false` never adds it. The
//! same for EOS, except that `add_eos_token` is not read: Hugging Face tokenizers set it for
//! encoding prompts, while the stage ends every training example with EOS so that the model
//! learns to stop.

use std::path::Path;

use serde::Serialize;
use tokenizers::Tokenizer;

use super::config::TokenizeConfig;
use super::error::TokenizeError;
use super::words::Words;

use crate::model::tokenizer::{declared, well_known_special, Declared, BOS_NAMES, EOS_NAMES};

/// A special token and its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpecialToken {
    pub token: String,
    pub id: u32,
}

/// The loaded tokenizer and the special tokens the stage adds.
#[derive(Debug)]
pub(crate) struct StageTokenizer {
    /// The tokenizer, with the per-thread word cache of [`super::words`].
    pub words: Words,
    /// blake3 of `tokenizer.json`'s bytes, hex.
    pub hash: String,
    /// BOS put before every example, if any.
    pub bos: Option<SpecialToken>,
    /// EOS put after every example, if any.
    pub eos: Option<SpecialToken>,
}

impl StageTokenizer {
    /// Loads `cfg.tokenizer` (relative to `workspace`) and resolves BOS/EOS.
    pub(crate) fn load(cfg: &TokenizeConfig, workspace: &Path) -> Result<Self, TokenizeError> {
        let shown = cfg.tokenizer.clone();
        let fail = |message: String| TokenizeError::Tokenizer {
            path: shown.clone(),
            message,
        };
        let path = workspace.join(&cfg.tokenizer);
        let bytes = std::fs::read(&path).map_err(|e| TokenizeError::io(&cfg.tokenizer, e))?;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        let mut tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| fail(e.to_string()))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| fail(e.to_string()))?
            .with_padding(None);
        let side = match path.parent() {
            Some(dir) => read_side_config(&dir.join("tokenizer_config.json"), &cfg.tokenizer)?,
            None => None,
        };
        let add_bos = cfg
            .add_bos
            .or(match side.as_ref().map(|v| v.get("add_bos_token")) {
                Some(Some(serde_json::Value::Bool(false))) => Some(false),
                _ => None,
            });
        let bos = resolve(
            &tokenizer,
            &shown,
            "bos",
            add_bos,
            cfg.bos_token.as_deref(),
            side.as_ref(),
            BOS_NAMES,
        )?;
        let eos = resolve(
            &tokenizer,
            &shown,
            "eos",
            cfg.add_eos,
            cfg.eos_token.as_deref(),
            side.as_ref(),
            EOS_NAMES,
        )?;
        Ok(StageTokenizer {
            words: Words::new(tokenizer),
            hash,
            bos,
            eos,
        })
    }
}

/// Reads `tokenizer_config.json` if it exists.
fn read_side_config(
    path: &Path,
    tokenizer_shown: &str,
) -> Result<Option<serde_json::Value>, TokenizeError> {
    let shown = format!("{tokenizer_shown} (tokenizer_config.json beside it)");
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TokenizeError::io(shown, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| TokenizeError::Tokenizer {
            path: shown,
            message: format!("invalid JSON: {e}"),
        })
}

/// Applies the rule in the module docs to one of BOS (`which = "bos"`) or EOS.
fn resolve(
    tokenizer: &Tokenizer,
    shown: &str,
    which: &str,
    add: Option<bool>,
    configured: Option<&str>,
    side: Option<&serde_json::Value>,
    well_known: &[&str],
) -> Result<Option<SpecialToken>, TokenizeError> {
    if add == Some(false) {
        return Ok(None);
    }
    let upper = which.to_uppercase();
    let lookup = |token: &str, source: &str| match tokenizer.token_to_id(token) {
        Some(id) => Ok(SpecialToken {
            token: token.to_string(),
            id,
        }),
        None => Err(TokenizeError::SpecialToken {
            path: shown.to_string(),
            message: format!(
                "{source} names {upper} token \"{token}\", which is not in the vocabulary"
            ),
        }),
    };
    let (found, looked) = if let Some(token) = configured {
        (
            Some(lookup(token, &format!("`{which}_token`"))?),
            String::new(),
        )
    } else {
        match declared(side, &format!("{which}_token")) {
            Declared::Named(token) => (
                Some(lookup(&token, "tokenizer_config.json")?),
                String::new(),
            ),
            Declared::Null => (
                None,
                format!("tokenizer_config.json sets `{which}_token: null`"),
            ),
            Declared::Absent => {
                let found = well_known_special(tokenizer, well_known)
                    .map(|(token, id)| SpecialToken { token, id });
                (
                    found,
                    format!("no special token named {}", well_known.join(" ")),
                )
            }
        }
    };
    match (found, add) {
        (Some(token), _) => Ok(Some(token)),
        (None, None) => Ok(None),
        (None, _) => Err(TokenizeError::SpecialToken {
            path: shown.to_string(),
            message: format!(
                "`add_{which}: true` but the tokenizer has no {upper} token ({looked}); \
                 set `{which}_token` to name one, or `add_{which}: false`"
            ),
        }),
    }
}
