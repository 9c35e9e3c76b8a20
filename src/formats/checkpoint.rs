//! A Hugging Face model directory seen as files of tensors, for conversions and merges:
//! `config.json`, the weights (`model.safetensors` or the shards of
//! `model.safetensors.index.json`, also a single-shard index) opened for tensor-by-tensor
//! reads, the base identity recorded in taper adapters, and the check that an adapter
//! fits the base.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::FormatError;
use super::safetensors_in::{RawTensor, SafetensorsFile, TensorEntry};

/// Single-file weights.
pub const SINGLE_WEIGHTS: &str = "model.safetensors";
/// Index of sharded weights.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// A model directory with its weights opened for streaming reads.
pub struct Checkpoint {
    pub dir: PathBuf,
    /// `config.json`, parsed.
    pub config: Value,
    shards: Vec<SafetensorsFile>,
    /// Tensor name -> shard index, sorted by name.
    routing: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens `dir`: reads `config.json` and checks every shard's header.
    pub fn open(dir: &Path) -> Result<Self, FormatError> {
        let config = super::adapter::read_json(&dir.join("config.json"))?;
        let index = dir.join(WEIGHTS_INDEX);
        let single = dir.join(SINGLE_WEIGHTS);
        let shard_paths: Vec<PathBuf> = if index.is_file() {
            let json = super::adapter::read_json(&index)?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| FormatError::Invalid {
                    path: index.clone(),
                    key: "weight_map".into(),
                    message: "missing or not an object".into(),
                })?;
            let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            names.sort();
            names.dedup();
            for name in &names {
                let plain = Path::new(name)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if !plain || Path::new(name).components().count() != 1 {
                    return Err(FormatError::Invalid {
                        path: index.clone(),
                        key: "weight_map".into(),
                        message: format!("shard `{name}` must be a file name in the directory"),
                    });
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(FormatError::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json",
                ),
            });
        };
        let mut shards = Vec::new();
        let mut routing = BTreeMap::new();
        for (i, path) in shard_paths.iter().enumerate() {
            let file = SafetensorsFile::open(path)?;
            for name in file.entries().keys() {
                if routing.insert(name.clone(), i).is_some() {
                    return Err(FormatError::Safetensors {
                        file: path.clone(),
                        message: format!("tensor `{name}` is stored in two shards"),
                    });
                }
            }
            shards.push(file);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            shards,
            routing,
        })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.routing.keys()
    }

    /// Where tensor `name` lies, if present.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        let i = *self.routing.get(name)?;
        self.shards[i].entries().get(name)
    }

    /// Reads tensor `name` as stored.
    pub fn read(&self, name: &str) -> Result<RawTensor, FormatError> {
        match self.routing.get(name) {
            Some(&i) => self.shards[i].read(name),
            None => Err(FormatError::MissingTensor {
                file: self.dir.clone(),
                name: name.to_string(),
            }),
        }
    }

    /// The shard that holds tensor `name`.
    pub fn shard_of(&self, name: &str) -> Result<&SafetensorsFile, FormatError> {
        match self.routing.get(name) {
            Some(&i) => Ok(&self.shards[i]),
            None => Err(FormatError::MissingTensor {
                file: self.dir.clone(),
                name: name.to_string(),
            }),
        }
    }

    /// `num_hidden_layers` from `config.json`.
    pub fn num_layers(&self) -> Option<usize> {
        self.config
            .get("num_hidden_layers")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
    }

    /// Checks that each module `(name, out, in)` is a 2-D weight of the base with that
    /// shape and a float dtype.
    pub fn check_modules<'a>(
        &self,
        modules: impl Iterator<Item = (&'a String, usize, usize)>,
    ) -> Result<(), FormatError> {
        for (module, out_dim, in_dim) in modules {
            let incompatible = |message: String| FormatError::Incompatible {
                base: self.dir.clone(),
                module: module.clone(),
                message,
            };
            let name = format!("{module}.weight");
            let Some(entry) = self.entry(&name) else {
                return Err(incompatible(format!("the base has no tensor `{name}`")));
            };
            if entry.shape != [out_dim, in_dim] {
                return Err(incompatible(format!(
                    "the adapter is for a [{out_dim}, {in_dim}] weight, the base's `{name}` \
                     is {:?}",
                    entry.shape
                )));
            }
            if super::safetensors_in::candle_dtype(entry.dtype).is_none() {
                return Err(incompatible(format!(
                    "the base's `{name}` is {:?}, not a float type taper can merge into",
                    entry.dtype
                )));
            }
        }
        Ok(())
    }

    /// The identity taper records for a base: hashes of `config.json` and of the tensors.
    pub fn identity(&self) -> Result<BaseIdentity, FormatError> {
        let config_path = self.dir.join("config.json");
        let bytes = std::fs::read(&config_path).map_err(|source| FormatError::Io {
            path: config_path,
            source,
        })?;
        let config_hash = blake3::hash(&bytes).to_hex().to_string();
        let mut hasher = blake3::Hasher::new();
        for name in self.routing.keys() {
            let t = self.read(name)?;
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(format!("{:?}{:?}", t.dtype, t.shape).as_bytes());
            hasher.update(&(t.data.len() as u64).to_le_bytes());
            hasher.update(&t.data);
        }
        Ok(BaseIdentity {
            config_hash,
            weights_hash: hasher.finalize().to_hex().to_string(),
        })
    }
}

/// What identifies a base model: blake3 of `config.json`'s bytes, and blake3 over every
/// tensor in name order (name, dtype, shape, bytes), which does not depend on sharding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseIdentity {
    pub config_hash: String,
    pub weights_hash: String,
}

impl BaseIdentity {
    pub fn to_json(&self) -> Value {
        serde_json::json!({"config_hash": self.config_hash, "weights_hash": self.weights_hash})
    }

    pub fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            config_hash: v.get("config_hash")?.as_str()?.to_string(),
            weights_hash: v.get("weights_hash")?.as_str()?.to_string(),
        })
    }
}
