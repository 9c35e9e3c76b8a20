//! Errors in a pipeline file, each pointing at file, line:column, stage and key.

use super::de::DeError;
use super::node::Pos;
use std::fmt;
use std::path::PathBuf;

/// One problem found in a pipeline file.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecError {
    /// The pipeline file, as the user named it.
    pub file: PathBuf,
    /// Where in the file; `None` for problems of the whole file.
    pub pos: Option<Pos>,
    /// The stage concerned, if any.
    pub stage: Option<String>,
    /// The key path from the document root, e.g. `stages.train.with.lr`.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
    /// The source line at `pos`, quoted under the message.
    pub line_text: Option<String>,
}

impl SpecError {
    /// An error at `pos` in `file`.
    pub fn at(file: &std::path::Path, pos: Pos, message: impl Into<String>) -> SpecError {
        SpecError {
            file: file.to_path_buf(),
            pos: pos.is_known().then_some(pos),
            stage: None,
            key: None,
            message: message.into(),
            line_text: None,
        }
    }

    /// Names the stage the error belongs to.
    pub fn stage(mut self, stage: &str) -> SpecError {
        self.stage = Some(stage.to_string());
        self
    }

    /// Names the key path.
    pub fn key(mut self, key: impl Into<String>) -> SpecError {
        let key = key.into();
        self.key = (!key.is_empty()).then_some(key);
        self
    }

    /// Converts a typed-conversion error below `base` (a key path) into a spec error.
    pub fn from_de(file: &std::path::Path, fallback: Pos, base: &str, e: DeError) -> SpecError {
        let key = match e.path.as_deref() {
            Some("") | None => base.to_string(),
            Some(p) if p.starts_with('[') => format!("{base}{p}"),
            Some(p) if base.is_empty() => p.to_string(),
            Some(p) => format!("{base}.{p}"),
        };
        SpecError::at(file, e.pos.unwrap_or(fallback), e.message).key(key)
    }

    /// Attaches the quoted source line, given the file's text.
    pub fn with_source(mut self, source: &str) -> SpecError {
        if let Some(pos) = self.pos {
            self.line_text = source
                .lines()
                .nth(pos.line.saturating_sub(1) as usize)
                .map(str::to_string);
        }
        self
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(pos) = self.pos {
            write!(f, ":{pos}")?;
        }
        f.write_str(": ")?;
        if let Some(stage) = &self.stage {
            write!(f, "stage \"{stage}\": ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)?;
        if let (Some(pos), Some(line)) = (self.pos, &self.line_text) {
            let gutter = pos.line.to_string();
            write!(f, "\n {gutter} | {line}")?;
            let pad = " ".repeat(gutter.len());
            let caret_pad = " ".repeat(pos.col.saturating_sub(1) as usize);
            write!(f, "\n {pad} | {caret_pad}^")?;
        }
        Ok(())
    }
}

/// All the problems found in one pipeline file.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

impl From<SpecError> for SpecErrors {
    fn from(e: SpecError) -> Self {
        SpecErrors(vec![e])
    }
}
