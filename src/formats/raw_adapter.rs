//! An adapter as stored bytes, for exact conversions: per module A `[r, in]` and B
//! `[out, r]` (PEFT's orientation) in their stored dtype, moved and transposed byte by
//! byte, never recomputed, plus the multiplier of each module and the settings.
//!
//! Reading validates through the format readers ([`super::peft::read`],
//! [`super::mlx::read`], [`super::native::read_config`]) and then takes the bytes
//! from the weights file, after checking its header with [`SafetensorsFile`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::adapter::{Adapter, AdapterFormat, AdapterModule, ADAPTER_CONFIG};
use super::checkpoint::BaseIdentity;
use super::error::FormatError;
use super::safetensors_in::{RawTensor, SafetensorsFile};
use super::{mlx, native, peft};
use crate::model::lora_config::{layer_index, scale, LoraConfig};

/// The adapter layouts taper converts between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// taper's native format (`adapter.safetensors`).
    Taper,
    /// Hugging Face PEFT.
    Peft,
    /// mlx-lm.
    Mlx,
}

impl AdapterKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Taper => "taper",
            Self::Peft => "peft",
            Self::Mlx => "mlx",
        }
    }

    /// Which layout the adapter in `dir` has, from the files present.
    pub fn detect(dir: &Path) -> Result<Self, FormatError> {
        if dir.join(native::WEIGHTS).is_file() && dir.join(ADAPTER_CONFIG).is_file() {
            return Ok(Self::Taper);
        }
        Ok(match super::adapter::detect_format(dir)? {
            AdapterFormat::Peft => Self::Peft,
            AdapterFormat::Mlx => Self::Mlx,
            AdapterFormat::Native => Self::Taper,
        })
    }
}

/// One module's stored LoRA weights.
#[derive(Debug, Clone, PartialEq)]
pub struct RawModule {
    /// `[r, in]`.
    pub a: RawTensor,
    /// `[out, r]`.
    pub b: RawTensor,
    /// The multiplier of `B A x`.
    pub scale: f64,
}

impl RawModule {
    pub fn rank(&self) -> usize {
        self.a.shape[0]
    }

    pub fn in_dim(&self) -> usize {
        self.a.shape[1]
    }

    pub fn out_dim(&self) -> usize {
        self.b.shape[0]
    }
}

/// A stored adapter, format-independent.
#[derive(Debug, Clone)]
pub struct RawAdapter {
    pub kind: AdapterKind,
    /// Settings as the source states them (patterns in their order).
    pub config: LoraConfig,
    /// Module path -> weights.
    pub modules: BTreeMap<String, RawModule>,
    /// The base identity the adapter records (taper's format only).
    pub base: Option<BaseIdentity>,
    /// taper's `training` record, carried through taper -> taper.
    pub training: Option<serde_json::Value>,
}

fn tensor_bytes(module: &str, which: &str, t: &Tensor) -> Result<RawTensor, FormatError> {
    t.to_device(&Device::Cpu)
        .and_then(|t| RawTensor::from_tensor(&t))
        .map_err(|e| FormatError::Safetensors {
            file: format!("{module}.lora_{which}.weight").into(),
            message: e.to_string(),
        })
}

impl RawAdapter {
    /// Reads the adapter in `dir` as `kind`.
    pub fn read(dir: &Path, kind: AdapterKind) -> Result<Self, FormatError> {
        match kind {
            AdapterKind::Peft => {
                let file = SafetensorsFile::open(&dir.join(peft::WEIGHTS))?;
                let adapter = peft::read(dir)?;
                let modules = take(&adapter, |m| {
                    Ok((
                        file.read(&peft::key(m, "A"))?,
                        file.read(&peft::key(m, "B"))?,
                    ))
                })?;
                Ok(Self::from_parts(AdapterKind::Peft, adapter, modules))
            }
            AdapterKind::Mlx => {
                let path = dir.join(mlx::WEIGHTS);
                let file = SafetensorsFile::open(&path)?;
                let adapter = mlx::read(dir)?;
                let modules = take(&adapter, |m| {
                    let t = |which: &str| -> Result<RawTensor, FormatError> {
                        let name = format!("{m}.lora_{which}");
                        file.read(&name)?
                            .transpose2d()
                            .ok_or_else(|| FormatError::ShapeMismatch {
                                file: path.clone(),
                                name,
                                expected: "a matrix".into(),
                                found: vec![],
                            })
                    };
                    Ok((t("a")?, t("b")?))
                })?;
                Ok(Self::from_parts(AdapterKind::Mlx, adapter, modules))
            }
            AdapterKind::Taper => native::read(dir),
        }
    }

    /// The stored form of an in-memory adapter (the train stage's weights), each tensor's
    /// bytes in its own dtype, as taper's format.
    pub fn from_adapter(
        adapter: &Adapter,
        base: Option<BaseIdentity>,
        training: Option<serde_json::Value>,
    ) -> Result<Self, FormatError> {
        let mut modules = BTreeMap::new();
        for (name, m) in &adapter.modules {
            modules.insert(
                name.clone(),
                RawModule {
                    a: tensor_bytes(name, "A", &m.a)?,
                    b: tensor_bytes(name, "B", &m.b)?,
                    scale: m.scale,
                },
            );
        }
        Ok(Self {
            kind: AdapterKind::Taper,
            config: adapter.config.clone(),
            modules,
            base,
            training,
        })
    }

    fn from_parts(
        kind: AdapterKind,
        adapter: Adapter,
        modules: BTreeMap<String, RawModule>,
    ) -> Self {
        Self {
            kind,
            config: adapter.config,
            modules,
            base: None,
            training: None,
        }
    }

    /// The sorted block indices that carry an adapter.
    pub fn layers(&self) -> Vec<usize> {
        let set: BTreeSet<usize> = self.modules.keys().filter_map(|m| layer_index(m)).collect();
        set.into_iter().collect()
    }

    /// The in-memory adapter (f32 tensors) for merging or running.
    pub fn to_adapter(&self) -> Result<Adapter, FormatError> {
        let mut modules = BTreeMap::new();
        for (name, m) in &self.modules {
            let f32 = |t: &RawTensor| -> Result<Tensor, FormatError> {
                t.to_tensor()
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|e| FormatError::Safetensors {
                        file: name.into(),
                        message: e.to_string(),
                    })
            };
            modules.insert(
                name.clone(),
                AdapterModule {
                    a: f32(&m.a)?,
                    b: f32(&m.b)?,
                    scale: m.scale,
                },
            );
        }
        Ok(Adapter {
            format: match self.kind {
                AdapterKind::Mlx => AdapterFormat::Mlx,
                AdapterKind::Peft => AdapterFormat::Peft,
                AdapterKind::Taper => AdapterFormat::Native,
            },
            config: self.config.clone(),
            modules,
        })
    }

    /// If every module has the same rank and multiplier, those.
    pub fn uniform(&self) -> Result<(usize, f64), (String, String)> {
        let mut iter = self.modules.iter();
        let Some((first_name, first)) = iter.next() else {
            return Err((String::new(), "the adapter has no modules".into()));
        };
        for (name, m) in iter {
            if m.rank() != first.rank() {
                return Err((
                    name.clone(),
                    format!(
                        "rank {} differs from `{first_name}`'s rank {}",
                        m.rank(),
                        first.rank()
                    ),
                ));
            }
            if m.scale != first.scale {
                return Err((
                    name.clone(),
                    format!(
                        "scale {} differs from `{first_name}`'s scale {}",
                        m.scale, first.scale
                    ),
                ));
            }
        }
        Ok((first.rank(), first.scale))
    }
}

fn take(
    adapter: &Adapter,
    mut read: impl FnMut(&str) -> Result<(RawTensor, RawTensor), FormatError>,
) -> Result<BTreeMap<String, RawModule>, FormatError> {
    adapter
        .modules
        .iter()
        .map(|(name, m)| {
            let (a, b) = read(name)?;
            Ok((
                name.clone(),
                RawModule {
                    a,
                    b,
                    scale: m.scale,
                },
            ))
        })
        .collect()
}

/// An alpha for which `scale(alpha, r, rslora)` is exactly `s` in f64, when one exists
/// near `s·r` (or `s·√r`).
pub fn exact_alpha(s: f64, r: usize, rslora: bool) -> Option<f64> {
    let start = if rslora {
        s * (r as f64).sqrt()
    } else {
        s * r as f64
    };
    let (mut up, mut down) = (start, start);
    for _ in 0..64 {
        if scale(up, r, rslora) == s {
            return Some(up);
        }
        if scale(down, r, rslora) == s {
            return Some(down);
        }
        up = up.next_up();
        down = down.next_down();
    }
    None
}

/// A pattern key matching exactly the module `name` (PEFT's `(.*\.)?(key)$` rule).
pub fn exact_key(name: &str) -> String {
    regex::escape(name)
}

/// A config that gives every module of `adapter` its rank and multiplier, preferring
/// (1) one rank and alpha, (2) the source's own patterns, (3) one pattern entry per
/// module that differs. `patterns_sorted`: the target keeps patterns in key order (JSON
/// objects), so the source's patterns must still work in that order.
pub fn faithful_config(
    adapter: &RawAdapter,
    format: &str,
    patterns_sorted: bool,
) -> Result<LoraConfig, FormatError> {
    let unrepresentable = |module: &str, message: String| FormatError::Unrepresentable {
        format: format.into(),
        module: module.into(),
        message,
    };
    let fits = |c: &LoraConfig| {
        adapter
            .modules
            .iter()
            .find(|(name, m)| c.rank_for(name) != m.rank() || c.scale_for(name) != m.scale)
            .map(|(name, _)| name.clone())
    };
    let mut base = adapter.config.clone();
    base.rank_pattern.clear();
    base.alpha_pattern.clear();
    if let Ok((r, s)) = adapter.uniform() {
        if let Some(alpha) = exact_alpha(s, r, base.rslora) {
            let mut c = base.clone();
            c.r = r;
            c.alpha = alpha;
            if fits(&c).is_none() {
                return Ok(c);
            }
        }
    }
    let mut own = adapter.config.clone();
    if patterns_sorted {
        own.rank_pattern.sort_by(|a, b| a.0.cmp(&b.0));
        own.alpha_pattern.sort_by(|a, b| a.0.cmp(&b.0));
    }
    if fits(&own).is_none() {
        return Ok(own);
    }
    let mut c = base;
    for (name, m) in &adapter.modules {
        if c.rank_for(name) != m.rank() {
            c.rank_pattern.push((exact_key(name), m.rank()));
        }
        if scale(c.alpha, m.rank(), c.rslora) != m.scale {
            let alpha = exact_alpha(m.scale, m.rank(), c.rslora).ok_or_else(|| {
                unrepresentable(
                    name,
                    format!("no alpha gives exactly the multiplier {}", m.scale),
                )
            })?;
            c.alpha_pattern.push((exact_key(name), alpha));
        }
    }
    match fits(&c) {
        None => Ok(c),
        Some(name) => Err(unrepresentable(
            &name,
            "its rank and multiplier cannot be expressed".into(),
        )),
    }
}
