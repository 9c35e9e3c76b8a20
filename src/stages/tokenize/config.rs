//! The `with:` block of a `kind: tokenize` stage, as serde reads it, with every default, and
//! its validation into the settings the stage runs with.
//!
//! ```yaml
//! with:
//!   tokenizer: models/base/tokenizer.json
//!   source: {path: "datasets/*.jsonl", format: jsonl}
//!   field: messages
//!   chat_template: chatml
//!   mask_prompt: true
//!   seq_len: 512
//!   packing: true
//!   add_bos: true
//!   add_eos: true
//!   split: {valid: 0.05, seed: 7}
//!   shard_rows: 65536
//!   on_bad_record: error
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::TokenizeError;
pub use super::field::FieldSpec;

/// The largest `seq_len` accepted (16 Mi tokens): beyond it a row could not be held in memory.
pub const MAX_SEQ_LEN: usize = 1 << 24;

/// Every `with:` key: (key, default, meaning), printed by `taper kinds` and `taper run
/// --help`; a test checks its top-level keys are exactly the fields of [`TokenizeConfig`].
pub const KEYS: &[(&str, &str, &str)] = &[
    ("tokenizer", "required", "a Hugging Face tokenizer.json"),
    ("source.path", "required", "input file or glob"),
    (
        "source.format",
        "from the extension",
        "text, jsonl or parquet",
    ),
    (
        "source.text_split",
        "line",
        "for text: line, paragraph or document",
    ),
    (
        "field",
        "text",
        "text, messages (chat), or {prompt: P, completion: C}",
    ),
    (
        "chat_template",
        "chatml",
        "for messages: chatml, llama3 or none",
    ),
    (
        "mask_prompt",
        "true",
        "loss only on assistant turns / the completion",
    ),
    ("seq_len", "2048", "tokens per row"),
    ("packing", "true", "consecutive examples share rows"),
    (
        "add_bos",
        "when the tokenizer has one (and tokenizer_config.json has no add_bos_token: false)",
        "prepend the BOS token",
    ),
    (
        "add_eos",
        "when the tokenizer has one",
        "append the EOS token",
    ),
    ("bos_token", "found", "name the BOS token"),
    ("eos_token", "found", "name the EOS token"),
    ("split.valid", "0.05", "fraction of examples to valid/"),
    ("split.seed", "0", "seed of the content-hash split"),
    ("shard_rows", "65536", "rows per Parquet file"),
    (
        "on_bad_record",
        "error",
        "error, or skip (counted as tokenize/skipped)",
    ),
];

/// Configuration of one tokenize stage. Paths are relative to the workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    /// Path of a Hugging Face `tokenizer.json` (required). A `tokenizer_config.json` beside
    /// it, if present, names the BOS/EOS tokens (see [`super::tokenizer`]).
    pub tokenizer: String,
    /// The input records (required).
    pub source: SourceConfig,
    /// Which field(s) of each record are the example. Default: `text`. See [`FieldSpec`].
    #[serde(default)]
    pub field: FieldSpec,
    /// How chat messages become text; only with `field: messages`. Default: `chatml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<ChatTemplate>,
    /// When true (the default), only assistant turns (chat) or the completion
    /// (prompt/completion) count toward the loss; when false every token does (except BOS).
    #[serde(default = "default_true")]
    pub mask_prompt: bool,
    /// Length of a row in tokens (default 2048, at most [`MAX_SEQ_LEN`]).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// When true (the default), consecutive examples share rows of up to `seq_len` tokens;
    /// an example is never split across rows unless it alone is longer than `seq_len`.
    /// When false, every example starts a new row. See [`super::pack`].
    #[serde(default = "default_true")]
    pub packing: bool,
    /// Put the tokenizer's BOS token before each example. Default (absent): add it when the
    /// tokenizer has one and `tokenizer_config.json` does not say `add_bos_token: false`;
    /// `true` requires one (an error if there is none); `false` never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_bos: Option<bool>,
    /// Put the tokenizer's EOS token after each example. Same rule as `add_bos`, without
    /// the `tokenizer_config.json` key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_eos: Option<bool>,
    /// Name the BOS token instead of finding it (e.g. `"<|begin_of_text|>"`). Default: found
    /// by the rule in [`super::tokenizer`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<String>,
    /// Name the EOS token instead of finding it. Default: found as for `bos_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<String>,
    /// The train/valid split. Default: `{valid: 0.05, seed: 0}`.
    #[serde(default)]
    pub split: SplitConfig,
    /// Rows per Parquet shard (default 65536).
    #[serde(default = "default_shard_rows")]
    pub shard_rows: usize,
    /// What a malformed record does: `error` (the default) stops with its file and line,
    /// `skip` counts it in the summary and manifest and goes on.
    #[serde(default)]
    pub on_bad_record: OnBadRecord,
}

/// `source:` — where the records are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A file, or a glob (`*`, `?`, `[..]`, `**`) whose matches are read in sorted order.
    pub path: String,
    /// `text`, `jsonl` or `parquet`. Default: from the extension of `path` (`.jsonl`,
    /// `.ndjson` → jsonl; `.parquet` → parquet; `.txt`, `.text`, `.md` → text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SourceFormat>,
    /// For `format: text` only: what one example is. Default: `line`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_split: Option<TextSplit>,
}

/// The input file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// UTF-8 text; examples cut by [`TextSplit`].
    Text,
    /// One JSON object per line; blank lines are ignored (they are not records).
    Jsonl,
    /// A Parquet file whose columns are named by `field` (string columns, or for messages a
    /// `list<struct<role: string, content: string>>` column).
    Parquet,
}

/// How `format: text` cuts a file into examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TextSplit {
    /// Each line that is not blank (only whitespace) is an example, without its line ending.
    #[default]
    Line,
    /// Runs of non-blank lines separated by blank lines; the lines of a paragraph are joined
    /// with `\n`.
    Paragraph,
    /// The whole file is one example, exactly as it is (held in memory in full).
    Document,
}

/// How a chat (`field: messages`) is rendered. Each message has a `role` (`system`, `user`,
/// `assistant` or `tool`) and a string `content`. No default system prompt is added and no
/// generation prompt is appended. With `mask_prompt`, exactly the pieces marked "trained"
/// below count toward the loss. See [`super::template`] for the renderer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatTemplate {
    /// Per message: `<|im_start|>{role}\n` + `{content}<|im_end|>` + `\n`. For assistant
    /// messages `{content}<|im_end|>` is trained; everything else is prompt.
    Chatml,
    /// Llama 3: per message `<|start_header_id|>{role}<|end_header_id|>\n\n` +
    /// `{content}<|eot_id|>`, with `content` trimmed of surrounding whitespace as Meta's
    /// template does; the `tool` role is written `ipython`, as in Meta's Llama 3.1
    /// template. For assistant messages `{content}<|eot_id|>` is trained.
    /// `<|begin_of_text|>` is the tokenizer's BOS: it comes from `add_bos`.
    Llama3,
    /// The contents concatenated exactly as they are, nothing added between them; assistant
    /// contents are trained.
    #[serde(rename = "none")]
    Plain,
}

/// `split:` — which examples go to the validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Fraction of examples sent to `valid`, in `[0, 1)`. Default 0.05.
    #[serde(default = "default_valid")]
    pub valid: f64,
    /// Seed mixed into each example's hash. Default 0. See [`super::split`].
    #[serde(default)]
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            valid: default_valid(),
            seed: 0,
        }
    }
}

/// What a malformed record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRecord {
    /// Stop with an error naming the file and line (the default).
    #[default]
    Error,
    /// Count the record as skipped (reported in the summary and manifest) and go on.
    Skip,
}

fn default_true() -> bool {
    true
}
fn default_seq_len() -> usize {
    2048
}
fn default_shard_rows() -> usize {
    65536
}
fn default_valid() -> f64 {
    0.05
}

/// A [`TokenizeConfig`] checked and with every "default: inferred" resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    pub format: SourceFormat,
    pub text_split: TextSplit,
    /// `Some` exactly when the field is [`FieldSpec::Messages`].
    pub template: Option<ChatTemplate>,
}

impl TokenizeConfig {
    /// Checks every key without touching the disk, so a planner can reject a bad pipeline
    /// before running anything. Errors name the key inside `with:`.
    pub fn validate(&self) -> Result<(), TokenizeError> {
        self.settings().map(|_| ())
    }

    /// Validates and resolves the inferred defaults.
    pub(crate) fn settings(&self) -> Result<Settings, TokenizeError> {
        if self.tokenizer.trim().is_empty() {
            return Err(TokenizeError::config("tokenizer", "is empty"));
        }
        if self.source.path.trim().is_empty() {
            return Err(TokenizeError::config("source.path", "is empty"));
        }
        let format = match self.source.format {
            Some(format) => format,
            None => infer_format(&self.source.path)?,
        };
        if self.source.text_split.is_some() && format != SourceFormat::Text {
            return Err(TokenizeError::config(
                "source.text_split",
                "only applies to `format: text`",
            ));
        }
        if format == SourceFormat::Text && self.field != FieldSpec::default() {
            return Err(TokenizeError::config(
                "field",
                "`format: text` has no fields; leave `field` at its default (`text`)",
            ));
        }
        let template = match (&self.field, self.chat_template) {
            (FieldSpec::Messages(_), t) => Some(t.unwrap_or(ChatTemplate::Chatml)),
            (_, None) => None,
            (_, Some(_)) => {
                return Err(TokenizeError::config(
                    "chat_template",
                    "only applies to `field: messages`",
                ));
            }
        };
        if self.seq_len == 0 || self.seq_len > MAX_SEQ_LEN {
            return Err(TokenizeError::config(
                "seq_len",
                format!("must be between 1 and {MAX_SEQ_LEN}, got {}", self.seq_len),
            ));
        }
        if self.shard_rows == 0 {
            return Err(TokenizeError::config("shard_rows", "must be at least 1"));
        }
        let valid = self.split.valid;
        if !(0.0..1.0).contains(&valid) {
            return Err(TokenizeError::config(
                "split.valid",
                format!("must be in [0, 1), got {valid}"),
            ));
        }
        for (key, value) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if value.as_deref() == Some("") {
                return Err(TokenizeError::config(key, "is empty"));
            }
        }
        Ok(Settings {
            format,
            text_split: self.source.text_split.unwrap_or_default(),
            template,
        })
    }
}

/// The format implied by the extension of `path` (a file name or glob).
fn infer_format(path: &str) -> Result<SourceFormat, TokenizeError> {
    let ext = Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("jsonl" | "ndjson") => Ok(SourceFormat::Jsonl),
        Some("parquet") => Ok(SourceFormat::Parquet),
        Some("txt" | "text" | "md") => Ok(SourceFormat::Text),
        _ => Err(TokenizeError::config(
            "source.format",
            format!("cannot tell the format of `{path}` from its extension; set `source.format` to text, jsonl or parquet"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> TokenizeConfig {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults() {
        let cfg = parse("tokenizer: t.json\nsource: {path: d.jsonl}\n");
        assert_eq!(cfg.field, FieldSpec::Text("text".into()));
        assert!(cfg.mask_prompt && cfg.packing);
        assert_eq!((cfg.seq_len, cfg.shard_rows), (2048, 65536));
        assert_eq!((cfg.add_bos, cfg.add_eos), (None, None));
        assert_eq!(
            cfg.split,
            SplitConfig {
                valid: 0.05,
                seed: 0
            }
        );
        assert_eq!(cfg.on_bad_record, OnBadRecord::Error);
        let s = cfg.settings().unwrap();
        assert_eq!(s.format, SourceFormat::Jsonl);
        assert_eq!(s.template, None);
    }

    #[test]
    fn full_example_parses() {
        let cfg = parse(
            "tokenizer: models/base/tokenizer.json\n\
             source: {path: datasets/chat.jsonl, format: jsonl}\n\
             field: messages\nchat_template: llama3\nmask_prompt: true\nseq_len: 512\n\
             packing: true\nadd_bos: true\nadd_eos: true\nsplit: {valid: 0.05, seed: 7}\n\
             shard_rows: 65536\non_bad_record: skip\n",
        );
        assert_eq!(cfg.settings().unwrap().template, Some(ChatTemplate::Llama3));
        assert_eq!(cfg.on_bad_record, OnBadRecord::Skip);
        let cfg = parse("tokenizer: t\nsource: {path: c.jsonl}\nfield: messages\n");
        assert_eq!(cfg.settings().unwrap().template, Some(ChatTemplate::Chatml));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = serde_saphyr::from_str::<TokenizeConfig>(
            "tokenizer: t\nsource: {path: a.txt}\nseqlen: 3\n",
        );
        assert!(err.unwrap_err().to_string().contains("seqlen"));
    }

    #[test]
    fn validation_names_the_key() {
        let key = |yaml: &str| match parse(yaml).validate() {
            Err(TokenizeError::Config { key, .. }) => key,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(
            key("tokenizer: t\nsource: {path: a.csv}\n"),
            "source.format"
        );
        assert_eq!(
            key("tokenizer: t\nsource: {path: a.txt}\nseq_len: 0\n"),
            "seq_len"
        );
        assert_eq!(
            key("tokenizer: t\nsource: {path: a.txt}\nsplit: {valid: 1.0}\n"),
            "split.valid"
        );
        assert_eq!(
            key("tokenizer: t\nsource: {path: a.txt}\nfield: body\n"),
            "field"
        );
        assert_eq!(
            key("tokenizer: t\nsource: {path: a.jsonl}\nchat_template: chatml\n"),
            "chat_template"
        );
        assert_eq!(
            key("tokenizer: t\nsource: {path: a.jsonl, text_split: line}\n"),
            "source.text_split"
        );
        assert_eq!(
            key("tokenizer: t\nsource: {path: a.txt}\nshard_rows: 0\n"),
            "shard_rows"
        );
    }
}
