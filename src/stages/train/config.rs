//! `with:` of a train stage: a serde mirror of the YAML (unknown keys are errors), then
//! [`TrainConfig::resolve`] checks values and builds the typed settings the loop uses.
//!
//! Every key and its default (also in README):
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `base_model` | required | workspace-relative HF model folder |
//! | `data.train` / `data.valid` | required / none | token shard folders of the tokenize stage |
//! | `lora.r` / `lora.alpha` | 8 / 16 | rank and alpha (scale alpha/r) |
//! | `lora.dropout` | 0.0 | dropout on the LoRA branch input |
//! | `lora.targets` | `[q_proj, v_proj]` | projections, or `[all-linear]` |
//! | `lora.layers` | `all` | `all` or a list of block indices |
//! | `lora.rslora` | false | scale alpha/sqrt(r) |
//! | `optimizer` | `{name: adamw, lr: 2e-4, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0}` | PyTorch AdamW |
//! | `schedule` | `{warmup_steps: 0, decay: cosine, min_lr_ratio: 0.0}` | see [`super::schedule`] |
//! | `batch_size` / `grad_accum` | 4 / 1 | rows per micro-batch, micro-batches per step |
//! | `max_steps` / `epochs` | epochs 1 | optimizer steps; at most one of the two |
//! | `max_grad_norm` | 1.0 | global gradient-norm clip; `null` or 0 disables |
//! | `seed` | 42 | LoRA init, shuffling, dropout |
//! | `eval_every` | 0 | steps between validation passes; 0 = only after the last step |
//! | `checkpoint_every` | 50 | steps between checkpoints; 0 = none |
//! | `keep_checkpoints` | 2 | newest checkpoints kept |
//! | `device` / `dtype` | `auto` / `f32` | cpu, cuda, metal, auto / f32, bf16 |
//! | `frozen_weights` | `fast` | `fast` or `compact`: see [`FrozenWeights`] |

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use candle_core::DType;

use crate::model::{parse_compute_dtype, DeviceChoice, LayerSelection, LoraConfig, Targets};

/// Every `with:` key: (key, default, meaning), printed by `taper kinds` and `taper run
/// --help`; a test checks its top-level keys are exactly the fields of [`TrainConfig`].
pub const KEYS: &[(&str, &str, &str)] = &[
    ("base_model", "required", "Hugging Face model folder"),
    (
        "data.train",
        "required",
        "token shard folder of a tokenize stage",
    ),
    (
        "data.valid",
        "none",
        "validation shards (eval/loss during training)",
    ),
    ("lora.r", "8", "LoRA rank"),
    ("lora.alpha", "16", "LoRA alpha (scale alpha/r)"),
    ("lora.dropout", "0.0", "dropout on the LoRA branch input"),
    (
        "lora.targets",
        "[q_proj, v_proj]",
        "projections, or [all-linear]",
    ),
    ("lora.layers", "all", "all, or a list of block indices"),
    ("lora.rslora", "false", "scale alpha/sqrt(r)"),
    ("optimizer.name", "adamw", "optimizer"),
    ("optimizer.lr", "2e-4", "peak learning rate"),
    ("optimizer.betas", "[0.9, 0.999]", "Adam betas"),
    ("optimizer.eps", "1e-8", "Adam epsilon"),
    ("optimizer.weight_decay", "0.0", "decoupled weight decay"),
    ("schedule.warmup_steps", "0", "linear warm-up steps"),
    (
        "schedule.decay",
        "cosine",
        "learning-rate decay after warm-up",
    ),
    (
        "schedule.min_lr_ratio",
        "0.0",
        "final lr as a fraction of the peak",
    ),
    ("batch_size", "4", "rows per micro-batch"),
    ("grad_accum", "1", "micro-batches per optimizer step"),
    (
        "max_steps",
        "none",
        "optimizer steps (at most one of max_steps, epochs)",
    ),
    ("epochs", "1", "passes over the training shards"),
    (
        "max_grad_norm",
        "1.0",
        "global gradient-norm clip; null or 0 disables",
    ),
    ("seed", "42", "LoRA init, shuffling, dropout"),
    (
        "eval_every",
        "0",
        "steps between validation passes; 0 = after the last step only",
    ),
    (
        "checkpoint_every",
        "50",
        "steps between checkpoints; 0 = none",
    ),
    ("keep_checkpoints", "2", "newest checkpoints kept"),
    ("device", "auto", "cpu, cuda, metal or auto"),
    ("dtype", "f32", "f32 or bf16"),
    (
        "frozen_weights",
        "fast",
        "fast (AVX-512 CPUs: large f32 frozen weights held twice, packed for both products) or compact (held once as loaded)",
    ),
];

/// `with:` of a train stage.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub base_model: String,
    pub data: DataPaths,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub optimizer: OptimizerSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default)]
    pub epochs: Option<f64>,
    #[serde(default = "d_clip")]
    pub max_grad_norm: Option<f64>,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: u64,
    #[serde(default = "d_keep")]
    pub keep_checkpoints: usize,
    #[serde(default = "d_device")]
    pub device: String,
    #[serde(default = "d_dtype")]
    pub dtype: String,
    /// Left out of the serialized form at its default, so that configurations written
    /// before the key existed keep their fingerprint.
    #[serde(default, skip_serializing_if = "FrozenWeights::is_fast")]
    pub frozen_weights: FrozenWeights,
}

/// `frozen_weights`: how training holds the base model's frozen weights.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FrozenWeights {
    /// [`crate::model::Llama::store_for_training`]: on CPUs with AVX-512, f32 weights of
    /// 2,048 or more features each way are packed twice, for the forward's and the
    /// backward's products, and the loaded copy is let go (twice their memory; on a
    /// 2,048-wide, 16-layer model 1.02-1.10x the tokens/s of `compact` on a Zen 4, peak
    /// memory 7.1-7.2 GB against 5.3-6.0 GB, BENCHMARKS.md "Session 21").
    /// Elsewhere the same as `compact`.
    #[default]
    Fast,
    /// The weights stay as loaded, held once.
    Compact,
}

impl FrozenWeights {
    fn is_fast(&self) -> bool {
        *self == Self::Fast
    }
}

/// `data:`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataPaths {
    pub train: String,
    #[serde(default)]
    pub valid: Option<String>,
}

/// `lora:`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "d_r")]
    pub r: usize,
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default = "d_targets")]
    pub targets: Vec<String>,
    #[serde(default)]
    pub layers: Layers,
    #[serde(default)]
    pub rslora: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: d_r(),
            alpha: d_alpha(),
            dropout: 0.0,
            targets: d_targets(),
            layers: Layers::All,
            rslora: false,
        }
    }
}

/// `lora.layers`: `all` or a list of block indices.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Layers {
    #[default]
    All,
    List(Vec<usize>),
}

impl Serialize for Layers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Layers::All => s.serialize_str("all"),
            Layers::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Layers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Layers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`all` or a list of block indices")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Layers, E> {
                if s == "all" {
                    Ok(Layers::All)
                } else {
                    Err(E::custom(format!(
                        "expected `all` or a list of block indices, got \"{s}\""
                    )))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Layers, A::Error> {
                let mut out = Vec::new();
                while let Some(i) = seq.next_element::<usize>()? {
                    out.push(i);
                }
                Ok(Layers::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `optimizer.name`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    #[default]
    Adamw,
}

/// `optimizer:`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    #[serde(default)]
    pub name: OptimizerName,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_betas")]
    pub betas: [f64; 2],
    #[serde(default = "d_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            name: OptimizerName::Adamw,
            lr: d_lr(),
            betas: d_betas(),
            eps: d_eps(),
            weight_decay: 0.0,
        }
    }
}

/// `schedule.decay`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// `schedule:`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub decay: Decay,
    #[serde(default)]
    pub min_lr_ratio: f64,
}

fn d_batch() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_clip() -> Option<f64> {
    Some(1.0)
}
fn d_seed() -> u64 {
    42
}
fn d_ckpt() -> u64 {
    50
}
fn d_keep() -> usize {
    2
}
fn d_device() -> String {
    "auto".into()
}
fn d_dtype() -> String {
    "f32".into()
}
fn d_r() -> usize {
    8
}
fn d_alpha() -> f64 {
    16.0
}
fn d_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}
fn d_lr() -> f64 {
    2e-4
}
fn d_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn d_eps() -> f64 {
    1e-8
}

/// The checked, typed settings of a train stage.
#[derive(Clone, Debug)]
pub struct Settings {
    pub lora: LoraConfig,
    pub dtype: DType,
    pub device: DeviceChoice,
    /// Gradient-norm clip, if on.
    pub max_grad_norm: Option<f64>,
    pub frozen_weights: FrozenWeights,
}

impl TrainConfig {
    /// Checks every value; errors name the key (`lora.r: ...`).
    pub fn resolve(&self) -> Result<Settings, String> {
        let o = &self.optimizer;
        let s = &self.schedule;
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{key}: must be a positive number, got {v}"))
            }
        };
        positive("optimizer.lr", o.lr)?;
        positive("optimizer.eps", o.eps)?;
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(format!("optimizer.betas[{i}]: must be in [0, 1), got {b}"));
            }
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(format!(
                "optimizer.weight_decay: must be >= 0, got {}",
                o.weight_decay
            ));
        }
        if !(0.0..=1.0).contains(&s.min_lr_ratio) {
            return Err(format!(
                "schedule.min_lr_ratio: must be in [0, 1], got {}",
                s.min_lr_ratio
            ));
        }
        if self.batch_size == 0 {
            return Err("batch_size: must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return Err("grad_accum: must be at least 1".into());
        }
        match (self.max_steps, self.epochs) {
            (Some(_), Some(_)) => return Err("give max_steps or epochs, not both".into()),
            (Some(0), _) => return Err("max_steps: must be at least 1".into()),
            (_, Some(e)) if !(e.is_finite() && e > 0.0) => {
                return Err(format!("epochs: must be a positive number, got {e}"))
            }
            _ => {}
        }
        if self.keep_checkpoints == 0 {
            return Err("keep_checkpoints: must be at least 1".into());
        }
        let max_grad_norm = match self.max_grad_norm {
            Some(v) if v.is_nan() || v < 0.0 => {
                return Err(format!("max_grad_norm: must be >= 0, got {v}"))
            }
            Some(v) if v > 0.0 => Some(v),
            _ => None,
        };
        let dtype = parse_compute_dtype(&self.dtype).map_err(|e| e.to_string())?;
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(format!(
                "dtype: train computes in f32 or bf16, not {}",
                self.dtype
            ));
        }
        let device: DeviceChoice = self.device.parse().map_err(|e| format!("device: {e}"))?;
        let l = &self.lora;
        let mut lora = LoraConfig::new(l.r, l.alpha);
        lora.dropout = l.dropout;
        lora.rslora = l.rslora;
        lora.targets = Targets::parse(&l.targets).map_err(|e| e.to_string())?;
        lora.layers = match &l.layers {
            Layers::All => LayerSelection::All,
            Layers::List(v) if v.is_empty() => return Err("lora.layers: the list is empty".into()),
            Layers::List(v) => LayerSelection::List(v.clone()),
        };
        lora.validate().map_err(|e| e.to_string())?;
        Ok(Settings {
            lora,
            dtype,
            device,
            max_grad_norm,
            frozen_weights: self.frozen_weights,
        })
    }

    /// The number of optimizer steps for a training set of `rows` rows.
    pub fn total_steps(&self, rows: usize) -> u64 {
        if let Some(n) = self.max_steps {
            return n;
        }
        let per_step = (self.batch_size * self.grad_accum) as f64;
        let epochs = self.epochs.unwrap_or(1.0);
        ((epochs * rows as f64 / per_step).ceil() as u64).max(1)
    }

    /// A hash of the whole configuration: a checkpoint made under another one is ignored.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&json).to_hex().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::de::from_node;
    use crate::spec::node::parse;

    fn cfg(yaml: &str) -> Result<TrainConfig, String> {
        let node = parse(yaml).map_err(|e| format!("{e:?}"))?;
        from_node(&node).map_err(|e| format!("{}: {}", e.path.unwrap_or_default(), e.message))
    }

    #[test]
    fn the_issue_example_parses() {
        let c = cfg("base_model: models/base\n\
                     data: {train: tokens/train, valid: tokens/valid}\n\
                     lora: {r: 8, alpha: 16, dropout: 0.05, targets: [q_proj, v_proj], layers: all, rslora: false}\n\
                     optimizer: {name: adamw, lr: 2e-4, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0}\n\
                     schedule: {warmup_steps: 20, decay: cosine, min_lr_ratio: 0.1}\n\
                     batch_size: 4\ngrad_accum: 4\nmax_steps: 200\nmax_grad_norm: 1.0\nseed: 42\n\
                     eval_every: 50\ncheckpoint_every: 50\ndevice: auto\ndtype: f32\n")
        .unwrap();
        assert_eq!(c.optimizer.lr, 2e-4);
        assert_eq!(c.schedule.decay, Decay::Cosine);
        assert_eq!(c.total_steps(10), 200);
        let s = c.resolve().unwrap();
        assert_eq!(s.lora.scale_for("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(s.lora.dropout, 0.05);
    }

    #[test]
    fn defaults_and_layer_lists() {
        let c = cfg("base_model: m\ndata: {train: t}\nlora: {layers: [0, 2]}\n").unwrap();
        assert_eq!((c.batch_size, c.grad_accum, c.seed), (4, 1, 42));
        assert_eq!(c.lora.layers, Layers::List(vec![0, 2]));
        assert_eq!(c.total_steps(9), 3, "one epoch, rounded up");
        assert_eq!(c.resolve().unwrap().max_grad_norm, Some(1.0));
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let err = cfg("base_model: m\ndata: {train: t}\noptimizer: {lrr: 1}\n").unwrap_err();
        assert!(
            err.contains("optimizer.lrr") && err.contains("did you mean \"lr\""),
            "{err}"
        );
        let err = cfg("base_model: m\ndata: {train: t}\nschedule: {decay: cosin}\n").unwrap_err();
        assert!(err.contains("cosin"), "{err}");
        let err = cfg("base_model: m\ndata: {train: t}\nlora: {layers: some}\n").unwrap_err();
        assert!(err.contains("lora.layers"), "{err}");
        let c = cfg("base_model: m\ndata: {train: t}\nmax_steps: 3\nepochs: 1\n").unwrap();
        assert!(c.resolve().unwrap_err().contains("not both"));
        let c = cfg("base_model: m\ndata: {train: t}\nlora: {targets: [lm_head]}\n").unwrap();
        assert!(c.resolve().unwrap_err().contains("lm_head"));
        let c = cfg("base_model: m\ndata: {train: t}\ndtype: int8\n").unwrap();
        assert!(c.resolve().unwrap_err().contains("int8"));
        let err = cfg("base_model: m\ndata: {train: t}\nfrozen_weights: small\n").unwrap_err();
        assert!(
            err.contains("frozen_weights") && err.contains("small"),
            "{err}"
        );
    }

    #[test]
    fn frozen_weights_default_to_fast_and_keep_old_fingerprints() {
        let plain = cfg("base_model: m\ndata: {train: t}\n").unwrap();
        assert_eq!(plain.frozen_weights, FrozenWeights::Fast);
        assert_eq!(plain.resolve().unwrap().frozen_weights, FrozenWeights::Fast);
        // The default is not serialized: the fingerprint of a configuration without the
        // key is what it was before the key existed.
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("frozen_weights"), "{json}");
        let fast = cfg("base_model: m\ndata: {train: t}\nfrozen_weights: fast\n").unwrap();
        assert_eq!(fast.fingerprint(), plain.fingerprint());
        let compact = cfg("base_model: m\ndata: {train: t}\nfrozen_weights: compact\n").unwrap();
        assert_eq!(compact.frozen_weights, FrozenWeights::Compact);
        assert_eq!(
            compact.resolve().unwrap().frozen_weights,
            FrozenWeights::Compact
        );
        assert_ne!(compact.fingerprint(), plain.fingerprint());
    }
}
