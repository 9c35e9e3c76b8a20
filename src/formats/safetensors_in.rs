//! Reading safetensors files one tensor at a time, without mapping the whole file: the
//! header is parsed and checked up front (length inside the file and at most 100 MB,
//! known dtype strings, offsets that tile the data exactly), then each tensor's bytes are
//! read with a positioned read when asked for. Peak memory is one tensor, which is what
//! a streaming merge needs.
//!
//! Accepts what other tools write: headers not padded to 8 bytes, a null `__metadata__`,
//! data offsets out of key order (mlx-lm does all three).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::Metadata;
use safetensors::Dtype;

use super::error::FormatError;

/// The largest header accepted, as in the safetensors crate.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// A tensor's bytes with their dtype and shape, exactly as stored (little-endian).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// The same values with the two dimensions of a matrix swapped, by moving bytes (no
    /// arithmetic, so a transpose twice gives back the same bytes).
    pub fn transpose2d(&self) -> Option<RawTensor> {
        let [rows, cols] = self.shape[..] else {
            return None;
        };
        let size = self.dtype.bitsize() / 8;
        if size == 0 || self.data.len() != rows * cols * size {
            return None;
        }
        let mut out = vec![0u8; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                let src = (r * cols + c) * size;
                let dst = (c * rows + r) * size;
                out[dst..dst + size].copy_from_slice(&self.data[src..src + size]);
            }
        }
        Some(RawTensor {
            dtype: self.dtype,
            shape: vec![cols, rows],
            data: out,
        })
    }

    /// A candle tensor on the CPU with the stored dtype (float dtypes only).
    pub fn to_tensor(&self) -> candle_core::Result<Tensor> {
        let dtype = candle_dtype(self.dtype).ok_or_else(|| {
            candle_core::Error::Msg(format!("{:?} is not a float dtype", self.dtype))
        })?;
        Tensor::from_raw_buffer(&self.data, dtype, &self.shape, &Device::Cpu)
    }

    /// The bytes of a CPU tensor in its own dtype.
    pub fn from_tensor(t: &Tensor) -> candle_core::Result<RawTensor> {
        let dtype = safetensors_dtype(t.dtype())
            .ok_or_else(|| candle_core::Error::Msg(format!("{:?} cannot be stored", t.dtype())))?;
        // candle's safetensors view copies the bytes in (optimised) dependency code.
        let data = safetensors::View::data(&t.contiguous()?).into_owned();
        Ok(RawTensor {
            dtype,
            shape: t.dims().to_vec(),
            data,
        })
    }
}

/// candle's dtype for a float safetensors dtype.
pub fn candle_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        _ => return None,
    })
}

/// The safetensors dtype of a float candle dtype.
pub fn safetensors_dtype(dtype: DType) -> Option<Dtype> {
    Some(match dtype {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        _ => return None,
    })
}

/// Where one tensor lies in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// An opened, checked safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    entries: BTreeMap<String, TensorEntry>,
    metadata: Option<BTreeMap<String, String>>,
}

impl SafetensorsFile {
    /// Opens `path` and checks its header against the file's size.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let io = |source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        };
        let fail = |message: String| FormatError::Safetensors {
            file: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size < 8 {
            return Err(fail(format!(
                "file is {size} bytes, too short for a safetensors header"
            )));
        }
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0).map_err(io)?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER_SIZE {
            return Err(fail(format!(
                "header of {n} bytes is larger than the {MAX_HEADER_SIZE} bytes accepted"
            )));
        }
        if n > size - 8 {
            return Err(fail(format!(
                "header length {n} goes beyond the end of the file ({size} bytes): truncated?"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8).map_err(io)?;
        let text =
            std::str::from_utf8(&header).map_err(|e| fail(format!("header is not UTF-8: {e}")))?;
        let parsed: Metadata =
            serde_json::from_str(text).map_err(|e| fail(format!("invalid header: {e}")))?;
        let data_start = 8 + n;
        let available = size - data_start;
        let mut entries = BTreeMap::new();
        let mut spans: Vec<(u64, u64, String)> = Vec::new();
        for (name, info) in parsed.tensors() {
            let (s, e) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
            let bits = info
                .shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .and_then(|numel| numel.checked_mul(info.dtype.bitsize() as u64));
            match bits {
                Some(bits) if bits.is_multiple_of(8) && e >= s && e - s == bits / 8 => {}
                _ => {
                    return Err(fail(format!(
                        "tensor `{name}`: offsets [{s}, {e}] do not match {:?} {:?}",
                        info.dtype, info.shape
                    )))
                }
            }
            spans.push((s, e, name.clone()));
            let entry = TensorEntry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + s,
                end: data_start + e,
            };
            entries.insert(name, entry);
        }
        spans.sort();
        let mut next = 0u64;
        for (s, e, name) in &spans {
            if *s != next {
                return Err(fail(format!(
                    "tensor `{name}` starts at byte {s} of the data, expected {next} \
                     (tensors must tile the data without gaps or overlaps)"
                )));
            }
            next = *e;
        }
        if next != available {
            return Err(fail(format!(
                "the header describes {next} bytes of data but the file holds {available}{}",
                if next > available {
                    " (truncated?)"
                } else {
                    ""
                }
            )));
        }
        let metadata = parsed
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        Ok(Self {
            path: path.to_path_buf(),
            file,
            entries,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors by name (sorted).
    pub fn entries(&self) -> &BTreeMap<String, TensorEntry> {
        &self.entries
    }

    /// The `__metadata__` map, if any.
    pub fn metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()
    }

    /// Where tensor `name` lies; an error naming the file when it is not there.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry, FormatError> {
        self.entries
            .get(name)
            .ok_or_else(|| FormatError::MissingTensor {
                file: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// Reads tensor `name` as stored.
    pub fn read(&self, name: &str) -> Result<RawTensor, FormatError> {
        let entry = self.entry(name)?;
        let mut data = vec![0u8; entry.len() as usize];
        self.read_into(name, &mut data)?;
        Ok(RawTensor {
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            data,
        })
    }

    /// The open file, for copying a tensor's bytes elsewhere without reading them here.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads the bytes of tensor `name` into `buf`, which must be exactly their length.
    pub fn read_into(&self, name: &str, buf: &mut [u8]) -> Result<(), FormatError> {
        let entry = self.entry(name)?;
        if buf.len() as u64 != entry.len() {
            return Err(FormatError::Safetensors {
                file: self.path.clone(),
                message: format!(
                    "tensor `{name}` holds {} bytes, {} asked for",
                    entry.len(),
                    buf.len()
                ),
            });
        }
        self.file
            .read_exact_at(buf, entry.start)
            .map_err(|source| FormatError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Reads every tensor as stored.
    pub fn read_all(&self) -> Result<BTreeMap<String, RawTensor>, FormatError> {
        self.entries
            .keys()
            .map(|name| Ok((name.clone(), self.read(name)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposing_twice_gives_the_same_bytes() {
        let t = RawTensor {
            dtype: Dtype::BF16,
            shape: vec![2, 3],
            data: (0u8..12).collect(),
        };
        let tt = t.transpose2d().unwrap();
        assert_eq!(tt.shape, vec![3, 2]);
        assert_eq!(&tt.data[..4], &[0, 1, 6, 7]);
        assert_eq!(tt.transpose2d().unwrap(), t);
    }
}
