//! Memory-mapped safetensors files and a prefix-scoped view over them.
//!
//! [`WeightFiles`] maps one or several files (a sharded checkpoint, an adapter) and knows
//! which file holds each tensor, so that a missing tensor or a wrong shape is reported with
//! the tensor's name *and* its file. [`Weights`] is the candle `VarBuilder` idea with typed
//! errors: `weights.pp("q_proj").get((out, in), "weight")` reads
//! `<prefix>.q_proj.weight`, checks its shape and converts it to the compute dtype.
//!
//! safetensors 0.8 accepts what mlx-lm writes (headers not padded to 8 bytes, a null
//! `__metadata__`, data offsets out of key order); candle copies unaligned data.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};

use super::error::ModelError;

/// Name, storage dtype, shape and file of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// The safetensors dtype name as stored (`F32`, `BF16`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    pub file: PathBuf,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One or more mmapped safetensors files with a tensor -> file routing table.
pub struct WeightFiles {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
    /// Where a tensor absent from every file "should" have been, for error messages.
    listing: PathBuf,
}

impl WeightFiles {
    /// Maps the given files. Tensors are routed to the file that holds them.
    pub fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let st = mmap(path)?;
            for (name, _) in st.tensors() {
                routing.insert(name, index);
            }
            files.push((path.clone(), st));
        }
        let listing = paths.first().cloned().unwrap_or_default();
        Ok(Self {
            files,
            routing,
            listing,
        })
    }

    /// Maps the shards named by a `model.safetensors.index.json` (also accepted when it
    /// lists a single shard, as mlx-lm writes it). A tensor the index routes to a shard
    /// that lacks it is reported against that shard.
    pub fn open_index(index_path: &Path) -> Result<Self, ModelError> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(index_path).map_err(|source| ModelError::Io {
            path: index_path.to_path_buf(),
            source,
        })?;
        let index: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index_path.to_path_buf(),
            source,
        })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&String> = index.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut paths = Vec::with_capacity(shard_names.len());
        for shard in shard_names {
            let escapes = Path::new(shard)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)));
            if escapes {
                return Err(ModelError::InvalidConfig {
                    path: index_path.to_path_buf(),
                    message: format!(
                        "shard `{shard}` must be a file name inside the model directory"
                    ),
                });
            }
            paths.push(dir.join(shard));
        }
        let mut files = Self::open(&paths)?;
        for (name, shard) in &index.weight_map {
            if let Some(i) = files.files.iter().position(|(p, _)| p == &dir.join(shard)) {
                files.routing.insert(name.clone(), i);
            }
        }
        files.listing = index_path.to_path_buf();
        Ok(files)
    }

    /// The files, in routing order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// Whether some file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// Every stored tensor, sorted by name.
    pub fn infos(&self) -> Vec<TensorInfo> {
        let mut infos: Vec<TensorInfo> = self
            .files
            .iter()
            .flat_map(|(path, st)| {
                st.tensors()
                    .into_iter()
                    .map(move |(name, view)| TensorInfo {
                        name,
                        dtype: format!("{:?}", view.dtype()),
                        shape: view.shape().to_vec(),
                        file: path.clone(),
                    })
            })
            .collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    /// The file that holds (or, per the index, should hold) `name`.
    pub fn file_of(&self, name: &str) -> &Path {
        match self.routing.get(name).and_then(|&i| self.files.get(i)) {
            Some((path, _)) => path,
            None => &self.listing,
        }
    }

    /// Loads `name` as stored (no dtype conversion), checking `expected` when given.
    pub fn load_raw(
        &self,
        name: &str,
        expected: Option<&Shape>,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
            file: self.file_of(name).to_path_buf(),
        };
        let (path, st) = self
            .routing
            .get(name)
            .and_then(|&i| self.files.get(i))
            .ok_or_else(missing)?;
        let view = st.get(name).map_err(|_| missing())?;
        if let Some(expected) = expected {
            if view.shape() != expected.dims() {
                return Err(ModelError::ShapeMismatch {
                    name: name.to_string(),
                    file: path.clone(),
                    expected: expected.dims().to_vec(),
                    found: view.shape().to_vec(),
                });
            }
        }
        use safetensors::Dtype as St;
        if !matches!(view.dtype(), St::F32 | St::BF16 | St::F16 | St::F64) {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                file: path.clone(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        view.load(device)
            .map_err(|e| ModelError::candle(format!("{}: loading `{name}`", path.display()), e))
    }

    /// Loads `name`, checks its shape and converts it to `dtype`.
    pub fn load(
        &self,
        name: &str,
        expected: &Shape,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let t = self.load_raw(name, Some(expected), device)?;
        t.to_dtype(dtype).map_err(|e| {
            ModelError::candle(
                format!("{}: converting `{name}`", self.file_of(name).display()),
                e,
            )
        })
    }
}

fn mmap(path: &Path) -> Result<MmapedSafetensors, ModelError> {
    if let Err(source) = std::fs::metadata(path) {
        return Err(ModelError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    // SAFETY: the mapping is read-only and the tensors are copied out of it on load;
    // a file truncated underneath us while mapped is outside what we can defend against
    // (the same contract as candle's `VarBuilder::from_mmaped_safetensors`).
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Safetensors {
        file: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A prefix-scoped view of [`WeightFiles`] that yields tensors in one dtype on one device.
#[derive(Clone)]
pub struct Weights<'a> {
    files: &'a WeightFiles,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl<'a> Weights<'a> {
    /// A view at the root of `files`.
    pub fn new(files: &'a WeightFiles, dtype: DType, device: &Device) -> Self {
        Self {
            files,
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// The view one level down: `pp("model")` then `pp("layers")` then `pp(0)`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            prefix: self.path(&name.to_string()),
            ..self.clone()
        }
    }

    /// The full tensor name of `name` at this level.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The prefix of this view (the module name it stands for).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Loads `name` with the given shape in the compute dtype.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor, ModelError> {
        self.files
            .load(&self.path(name), &shape.into(), self.dtype, &self.device)
    }

    /// Whether `name` exists at this level.
    pub fn contains(&self, name: &str) -> bool {
        self.files.contains(&self.path(name))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}
