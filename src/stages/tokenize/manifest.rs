//! `manifest.json`: what was made from what. Fields are in a fixed order, there are no
//! timestamps and no absolute paths, so the same inputs give a byte-identical manifest.

use std::path::Path;

use serde::Serialize;

use super::config::{ChatTemplate, SourceFormat, TextSplit, TokenizeConfig};
use super::error::TokenizeError;
use super::shard::ShardInfo;
use super::summary::{SplitCounts, Summary};
use super::tokenizer::SpecialToken;

/// The value of the manifest's `format` key.
pub const MANIFEST_FORMAT: &str = "taper.tokens.v1";

/// The whole manifest.
#[derive(Debug, Serialize)]
pub struct Manifest<'a> {
    pub format: &'static str,
    pub tokenizer: TokenizerInfo<'a>,
    /// The stage config exactly as given (paths relative to the workspace).
    pub config: &'a TokenizeConfig,
    /// The config's inferred defaults, resolved.
    pub resolved: Resolved,
    pub columns: Columns,
    pub inputs: Vec<InputInfo>,
    pub records: u64,
    pub skipped: u64,
    pub skipped_samples: &'a [String],
    pub empty_files: &'a [String],
    pub splits: Splits,
}

/// The tokenizer used.
#[derive(Debug, Serialize)]
pub struct TokenizerInfo<'a> {
    pub path: &'a str,
    pub blake3: &'a str,
    /// The BOS put before each example (`null`: none).
    pub bos: Option<SpecialToken>,
    /// The EOS put after each example (`null`: none).
    pub eos: Option<SpecialToken>,
}

/// Defaults the config left to inference.
#[derive(Debug, Serialize)]
pub struct Resolved {
    pub format: SourceFormat,
    pub text_split: Option<TextSplit>,
    pub chat_template: Option<ChatTemplate>,
}

/// What the columns mean, for a reader with only the files.
#[derive(Debug, Serialize)]
pub struct Columns {
    pub input_ids: &'static str,
    pub loss_mask: &'static str,
    pub example_id: &'static str,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            input_ids: "list<u32>: token ids, 1 to seq_len per row, not padded",
            loss_mask: "list<bool>, aligned with input_ids: true = input_ids[i], as the target \
                        predicted from input_ids[..i], counts toward the loss (HF labels convention)",
            example_id: "u64: 0-based input record index of the example the row's first token belongs to",
        }
    }
}

/// One input file.
#[derive(Debug, Serialize)]
pub struct InputInfo {
    pub path: String,
    pub bytes: u64,
    pub blake3: String,
}

/// Both splits.
#[derive(Debug, Serialize)]
pub struct Splits {
    pub train: SplitInfo,
    pub valid: SplitInfo,
}

/// One split: its counts and shards.
#[derive(Debug, Serialize)]
pub struct SplitInfo {
    #[serde(flatten)]
    pub counts: SplitCounts,
    pub shards: Vec<ShardInfo>,
}

impl Manifest<'_> {
    /// Writes the manifest as pretty JSON with a final newline.
    pub fn write(&self, path: &Path) -> Result<(), TokenizeError> {
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| TokenizeError::Internal(e.to_string()))?;
        text.push('\n');
        std::fs::write(path, text).map_err(|e| TokenizeError::io(path, e))
    }
}

/// Checks that the shards add up to the counts (a cheap guard against bookkeeping bugs).
pub(crate) fn check_totals(
    summary: &Summary,
    train: &[ShardInfo],
    valid: &[ShardInfo],
) -> Result<(), TokenizeError> {
    for (counts, shards, name) in [
        (&summary.train, train, "train"),
        (&summary.valid, valid, "valid"),
    ] {
        let rows: u64 = shards.iter().map(|s| s.rows).sum();
        let tokens: u64 = shards.iter().map(|s| s.tokens).sum();
        if rows != counts.rows || tokens != counts.tokens {
            return Err(TokenizeError::Internal(format!(
                "{name}: shards hold {rows} rows / {tokens} tokens, counted {} / {}",
                counts.rows, counts.tokens
            )));
        }
    }
    Ok(())
}
