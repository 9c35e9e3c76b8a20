//! What a LoRA adapter covers and how strongly: rank, alpha, rsLoRA, dropout, target
//! projections, layer selection, and PEFT's per-module `rank_pattern` / `alpha_pattern`.
//!
//! Module names are full paths such as `model.layers.0.self_attn.q_proj`. A pattern key
//! `k` applies to a module when the regex `(.*\.)?(k)$` matches the whole name; the first
//! such key in the pattern's order wins, as in PEFT.

use regex::Regex;

use super::error::ModelError;

/// Every projection LoRA may target, in checkpoint order. The LM head never is one.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which projections of a block get an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// All of [`LORA_TARGETS`] (`all-linear`).
    AllLinear,
    /// A subset of [`LORA_TARGETS`], by short name.
    Modules(Vec<String>),
}

impl Targets {
    /// Parses short names; `all-linear` alone means every projection.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, ModelError> {
        let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
        if names == ["all-linear"] {
            return Ok(Self::AllLinear);
        }
        if names.is_empty() {
            return Err(invalid("targets", "no target modules given"));
        }
        let mut out: Vec<String> = Vec::new();
        for name in names {
            if !LORA_TARGETS.contains(&name) {
                let hint = if name == "lm_head" || name == "embed_tokens" {
                    "taper never puts LoRA on the LM head or the embedding".to_string()
                } else {
                    format!("expected all-linear or some of {}", LORA_TARGETS.join(", "))
                };
                return Err(invalid(
                    "targets",
                    format!("unknown module `{name}`: {hint}"),
                ));
            }
            if !out.iter().any(|o| o == name) {
                out.push(name.to_string());
            }
        }
        // Checkpoint order, so that the same set always prints and saves the same way.
        out.sort_by_key(|n| LORA_TARGETS.iter().position(|t| t == n));
        Ok(Self::Modules(out))
    }

    /// The short names covered.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Self::AllLinear => LORA_TARGETS.to_vec(),
            Self::Modules(m) => m.iter().map(String::as_str).collect(),
        }
    }

    /// Whether `module` (a full path) ends in one of the targeted names.
    pub fn matches(&self, module: &str) -> bool {
        let short = module.rsplit('.').next().unwrap_or(module);
        self.names().contains(&short)
    }
}

/// Which decoder blocks get adapters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LayerSelection {
    #[default]
    All,
    /// Explicit block indices.
    List(Vec<usize>),
    /// Blocks `start..end` (end exclusive).
    Range { start: usize, end: usize },
}

impl LayerSelection {
    pub fn contains(&self, layer: usize) -> bool {
        match self {
            Self::All => true,
            Self::List(l) => l.contains(&layer),
            Self::Range { start, end } => (*start..*end).contains(&layer),
        }
    }
}

/// The block index in a module path (`...layers.{i}....`).
pub fn layer_index(module: &str) -> Option<usize> {
    let mut parts = module.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next().and_then(|i| i.parse().ok());
        }
    }
    None
}

/// LoRA hyper-parameters with PEFT's meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    pub targets: Targets,
    pub layers: LayerSelection,
    /// Ordered `(pattern, rank)` overrides.
    pub rank_pattern: Vec<(String, usize)>,
    /// Ordered `(pattern, alpha)` overrides.
    pub alpha_pattern: Vec<(String, f64)>,
}

impl LoraConfig {
    /// Rank `r`, `alpha`, on q_proj and v_proj of every block (PEFT's Llama default).
    pub fn new(r: usize, alpha: f64) -> Self {
        Self {
            r,
            alpha,
            dropout: 0.0,
            rslora: false,
            targets: Targets::Modules(vec!["q_proj".into(), "v_proj".into()]),
            layers: LayerSelection::All,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
        }
    }

    /// Checks ranges and that every pattern key is a valid regex.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.r == 0 {
            return Err(invalid("r", "rank must be at least 1"));
        }
        if !self.alpha.is_finite() {
            return Err(invalid(
                "alpha",
                format!("must be a finite number, got {}", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        for (key, r) in &self.rank_pattern {
            pattern_regex(key).map_err(|e| invalid(&format!("rank_pattern.{key}"), e))?;
            if *r == 0 {
                return Err(invalid(
                    &format!("rank_pattern.{key}"),
                    "rank must be at least 1",
                ));
            }
        }
        for (key, _) in &self.alpha_pattern {
            pattern_regex(key).map_err(|e| invalid(&format!("alpha_pattern.{key}"), e))?;
        }
        Ok(())
    }

    /// Whether `module` gets an adapter (target name and block both selected).
    pub fn selects(&self, module: &str) -> bool {
        self.targets.matches(module) && layer_index(module).is_some_and(|i| self.layers.contains(i))
    }

    /// The rank of `module` after `rank_pattern`.
    pub fn rank_for(&self, module: &str) -> usize {
        pattern_value(&self.rank_pattern, module).unwrap_or(self.r)
    }

    /// The alpha of `module` after `alpha_pattern`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        pattern_value(&self.alpha_pattern, module).unwrap_or(self.alpha)
    }

    /// The multiplier `s` of `module`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale_for(&self, module: &str) -> f64 {
        scale(self.alpha_for(module), self.rank_for(module), self.rslora)
    }
}

/// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn scale(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

fn pattern_regex(key: &str) -> Result<Regex, String> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| format!("invalid pattern: {e}"))
}

/// The value of the first key whose pattern matches `module` (PEFT's `get_pattern_key`).
pub fn pattern_value<T: Copy>(pattern: &[(String, T)], module: &str) -> Option<T> {
    pattern
        .iter()
        .find(|(key, _)| pattern_regex(key).is_ok_and(|re| re.is_match(module)))
        .map(|(_, v)| *v)
}

fn invalid(key: &str, message: impl Into<String>) -> ModelError {
    ModelError::InvalidInput {
        what: format!("lora.{key}"),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_pattern_wins_and_suffixes_must_be_whole_segments() {
        let pattern = vec![
            ("layers.0.self_attn.q_proj".to_string(), 4),
            ("q_proj".to_string(), 16),
            ("model.layers.0.self_attn.q_proj".to_string(), 32),
        ];
        assert_eq!(
            pattern_value(&pattern, "model.layers.0.self_attn.q_proj"),
            Some(4)
        );
        assert_eq!(
            pattern_value(&pattern, "model.layers.1.self_attn.q_proj"),
            Some(16)
        );
        assert_eq!(
            pattern_value(&pattern, "model.layers.1.self_attn.xq_proj"),
            None
        );
        let regex = vec![(r"layers\.[01]\.mlp\..*".to_string(), 2)];
        assert_eq!(pattern_value(&regex, "model.layers.1.mlp.up_proj"), Some(2));
        assert_eq!(pattern_value(&regex, "model.layers.2.mlp.up_proj"), None);
    }

    #[test]
    fn scales_follow_patterns_and_rslora() {
        let mut c = LoraConfig::new(8, 16.0);
        c.rank_pattern = vec![("v_proj".into(), 4)];
        c.alpha_pattern = vec![("layers.1.self_attn.q_proj".into(), 64.0)];
        assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(c.scale_for("model.layers.0.self_attn.v_proj"), 4.0);
        assert_eq!(c.scale_for("model.layers.1.self_attn.q_proj"), 8.0);
        c.rslora = true;
        assert_eq!(c.scale_for("model.layers.0.self_attn.v_proj"), 8.0);
    }

    #[test]
    fn targets_and_layers_select_modules() {
        let mut c = LoraConfig::new(8, 16.0);
        c.targets = Targets::parse(&["down_proj", "q_proj", "q_proj"]).unwrap();
        assert_eq!(c.targets.names(), vec!["q_proj", "down_proj"]);
        c.layers = LayerSelection::Range { start: 1, end: 3 };
        assert!(c.selects("model.layers.1.mlp.down_proj"));
        assert!(!c.selects("model.layers.0.mlp.down_proj"));
        assert!(!c.selects("model.layers.1.mlp.up_proj"));
        assert_eq!(Targets::parse(&["all-linear"]).unwrap().names().len(), 7);
        let err = Targets::parse(&["lm_head"]).unwrap_err().to_string();
        assert!(err.contains("lm_head"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = LoraConfig::new(8, 16.0);
        c.rank_pattern = vec![("q_proj(".into(), 4)];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rank_pattern.q_proj("));
        assert!(LoraConfig::new(0, 1.0)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lora.r"));
    }
}
