//! `taper inspect`: what a model or adapter directory holds, for people and for tests.
//! For a model only the config and the safetensors headers are read; an adapter (small)
//! is read in full, so inspecting it also validates it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::config::{config_path, ModelConfig};
use super::error::ModelError;
use super::load::ModelDir;
use super::lora_config::{LayerSelection, LoraConfig};
use super::weights::{TensorInfo, WeightFiles};
use crate::formats::{self, adapter::ADAPTER_CONFIG, AdapterFormat};

/// What kind of directory was inspected.
#[derive(Debug, Clone)]
pub enum InspectKind {
    Model {
        config: ModelConfig,
        has_tokenizer: bool,
    },
    Adapter {
        format: AdapterFormat,
        config: LoraConfig,
        modules: usize,
    },
}

/// A summary of a model or adapter directory.
#[derive(Debug, Clone)]
pub struct InspectReport {
    pub path: PathBuf,
    pub kind: InspectKind,
    /// Total number of stored values.
    pub parameter_count: usize,
    /// Storage dtype -> number of tensors.
    pub dtypes: BTreeMap<String, usize>,
    /// Every stored tensor, sorted by name.
    pub tensors: Vec<TensorInfo>,
}

/// Inspects `dir`: a model (has `config.json`) or an adapter of any format taper reads.
pub fn inspect(dir: &Path) -> Result<InspectReport, ModelError> {
    let (kind, files) = if config_path(dir).is_file() {
        let model = ModelDir::open(dir)?;
        let kind = InspectKind::Model {
            config: model.config.clone(),
            has_tokenizer: model.tokenizer.is_some(),
        };
        (kind, model.weights)
    } else if dir.join(ADAPTER_CONFIG).is_file() {
        let adapter = formats::read_adapter(dir)?;
        let files = WeightFiles::open(&formats::adapter::weight_files(dir)?)?;
        let kind = InspectKind::Adapter {
            format: adapter.format,
            modules: adapter.modules.len(),
            config: adapter.config,
        };
        (kind, files)
    } else {
        return Err(ModelError::InvalidInput {
            what: dir.display().to_string(),
            message: "neither a model (config.json) nor an adapter (adapter_config.json)".into(),
        });
    };
    let tensors = files.infos();
    let mut dtypes = BTreeMap::new();
    for t in &tensors {
        *dtypes.entry(t.dtype.clone()).or_insert(0) += 1;
    }
    Ok(InspectReport {
        path: dir.to_path_buf(),
        kind,
        parameter_count: tensors.iter().map(TensorInfo::numel).sum(),
        dtypes,
        tensors,
    })
}

/// `1234567` -> `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            InspectKind::Model {
                config: c,
                has_tokenizer,
            } => {
                writeln!(f, "model {}", self.path.display())?;
                writeln!(f, "  architecture  {}", c.architecture)?;
                writeln!(
                    f,
                    "  shape         {} layers, hidden {}, intermediate {}, {} heads ({} kv, head_dim {}), vocab {}",
                    c.num_hidden_layers, c.hidden_size, c.intermediate_size,
                    c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size
                )?;
                writeln!(
                    f,
                    "  rope theta    {}   rms eps {:e}   tied embeddings {}",
                    c.rope_theta,
                    c.rms_norm_eps,
                    if c.tie_word_embeddings { "yes" } else { "no" }
                )?;
                writeln!(
                    f,
                    "  tokenizer     {}",
                    if *has_tokenizer {
                        "tokenizer.json"
                    } else {
                        "none"
                    }
                )?;
            }
            InspectKind::Adapter {
                format,
                config: c,
                modules,
            } => {
                writeln!(f, "adapter {} ({format})", self.path.display())?;
                writeln!(
                    f,
                    "  lora          r {}, alpha {}, {}dropout {}",
                    c.r,
                    c.alpha,
                    if c.rslora { "rslora, " } else { "" },
                    c.dropout
                )?;
                writeln!(f, "  targets       {}", c.targets.names().join(", "))?;
                let layers = match &c.layers {
                    LayerSelection::All => "all".to_string(),
                    LayerSelection::List(l) => format!("{l:?}"),
                    LayerSelection::Range { start, end } => format!("{start}..{end}"),
                };
                writeln!(f, "  layers        {layers}")?;
                writeln!(f, "  modules       {modules}")?;
            }
        }
        writeln!(f, "  parameters    {}", thousands(self.parameter_count))?;
        let dtypes: Vec<String> = self
            .dtypes
            .iter()
            .map(|(d, n)| format!("{d} x{n}"))
            .collect();
        writeln!(f, "  dtypes        {}", dtypes.join(", "))?;
        writeln!(f, "  tensors       {}", self.tensors.len())?;
        let width = self.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
        let sharded = self.tensors.iter().any(|t| t.file != self.tensors[0].file);
        for t in &self.tensors {
            write!(f, "    {:width$}  {:5} {:?}", t.name, t.dtype, t.shape)?;
            if sharded {
                let file = t
                    .file
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                write!(f, "  {file}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_groups_digits() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(139584), "139,584");
        assert_eq!(super::thousands(1234567), "1,234,567");
    }
}
