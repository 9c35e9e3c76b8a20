//! Writing safetensors files that are byte-identical for identical tensors: tensors in
//! name order, data laid out in that order, the JSON header with sorted keys and no
//! whitespace, padded with spaces to a multiple of 8 bytes, and `__metadata__` only when
//! the caller gives one (never a timestamp or a path).
//!
//! [`SafetensorsWriter`] streams: the header is written from the tensors' names, dtypes
//! and shapes, then each tensor's bytes in turn, so a merge holds one tensor at a time.
//! Also here: writing JSON files the same way (sorted keys, two-space indent, newline).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{Map, Value};

use super::error::FormatError;
use super::safetensors_in::RawTensor;

/// Name, dtype and shape of a tensor to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of data.
    pub fn byte_len(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * (self.dtype.bitsize() / 8) as u64
    }
}

/// The safetensors dtype string (`F32`, `BF16`, ...).
pub fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

/// The 8-byte length plus the padded header for `specs` (any order; laid out sorted).
pub fn header_bytes(specs: &[TensorSpec], metadata: Option<&BTreeMap<String, String>>) -> Vec<u8> {
    let mut sorted: Vec<&TensorSpec> = specs.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header: BTreeMap<String, Value> = BTreeMap::new();
    if let Some(meta) = metadata {
        let m: Map<String, Value> = meta
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0u64;
    for spec in sorted {
        let end = offset + spec.byte_len();
        let mut entry = Map::new();
        entry.insert("dtype".into(), Value::String(dtype_name(spec.dtype)));
        entry.insert("shape".into(), serde_json::json!(spec.shape));
        entry.insert("data_offsets".into(), serde_json::json!([offset, end]));
        header.insert(spec.name.clone(), Value::Object(sort_object(entry)));
        offset = end;
    }
    let obj: Map<String, Value> = header.into_iter().collect();
    let mut text = serde_json::to_string(&Value::Object(obj)).unwrap_or_default();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

fn sort_object(map: Map<String, Value>) -> Map<String, Value> {
    let sorted: BTreeMap<String, Value> = map.into_iter().collect();
    sorted.into_iter().collect()
}

/// Recursively sorts every object's keys (serde_json keeps insertion order in this crate).
pub fn sorted_json(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, Value> =
                map.iter().map(|(k, v)| (k, sorted_json(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted_json).collect()),
        other => other.clone(),
    }
}

/// Writes `value` with sorted keys, two-space indent and a final newline.
pub fn write_json(path: &Path, value: &Value) -> Result<(), FormatError> {
    let mut text = serde_json::to_string_pretty(&sorted_json(value)).unwrap_or_default();
    text.push('\n');
    std::fs::write(path, text).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// An f32 setting as the f64 with the same shortest decimal form (0.05, not
/// 0.05000000074505806), for JSON.
pub fn short_f64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

/// A safetensors file being written tensor by tensor, in name order.
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// Remaining tensors, in the order their bytes must come.
    pending: std::collections::VecDeque<TensorSpec>,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `specs`.
    pub fn create(
        path: &Path,
        specs: &[TensorSpec],
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Self, FormatError> {
        let io = |source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut pending: Vec<TensorSpec> = specs.to_vec();
        pending.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = pending.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(FormatError::Safetensors {
                file: path.to_path_buf(),
                message: format!("tensor `{}` given twice", w[0].name),
            });
        }
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
        out.write_all(&header_bytes(specs, metadata)).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            pending: pending.into(),
        })
    }

    /// The name of the tensor whose bytes come next.
    pub fn next_name(&self) -> Option<&str> {
        self.pending.front().map(|s| s.name.as_str())
    }

    /// Checks that tensor `name` of `len` bytes is the next one due, and takes it off
    /// the list.
    fn take_next(&mut self, name: &str, len: u64) -> Result<(), FormatError> {
        let fail = |message: String| FormatError::Safetensors {
            file: self.path.clone(),
            message,
        };
        let Some(spec) = self.pending.front() else {
            return Err(fail(format!("tensor `{name}` was not announced")));
        };
        if spec.name != name {
            return Err(fail(format!(
                "tensor `{name}` written where `{}` was due",
                spec.name
            )));
        }
        if spec.byte_len() != len {
            return Err(fail(format!(
                "tensor `{name}`: {len} bytes given, {} announced",
                spec.byte_len()
            )));
        }
        self.pending.pop_front();
        Ok(())
    }

    /// Writes the bytes of tensor `name`, which must be the next one in name order.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<(), FormatError> {
        self.take_next(name, data.len() as u64)?;
        self.out.write_all(data).map_err(|source| FormatError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Writes tensor `name` (the next one due) as the `len` bytes at `offset` of `src`,
    /// copied file to file: the kernel moves them (`copy_file_range` on Linux, which
    /// `std::io::copy` uses), so they never pass through this process's memory.
    pub fn copy_from(
        &mut self,
        name: &str,
        src: &File,
        src_path: &Path,
        offset: u64,
        len: u64,
    ) -> Result<(), FormatError> {
        self.take_next(name, len)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FormatError::Io { path, source }
        };
        self.out.flush().map_err(io(&self.path))?;
        let mut reader = src;
        reader.seek(SeekFrom::Start(offset)).map_err(io(src_path))?;
        let copied =
            std::io::copy(&mut reader.take(len), self.out.get_mut()).map_err(io(&self.path))?;
        if copied != len {
            return Err(FormatError::Safetensors {
                file: src_path.to_path_buf(),
                message: format!("tensor `{name}`: {copied} of {len} bytes could be read"),
            });
        }
        Ok(())
    }

    /// Flushes the file; every announced tensor must have been written.
    pub fn finish(mut self) -> Result<(), FormatError> {
        if let Some(spec) = self.pending.front() {
            return Err(FormatError::Safetensors {
                file: self.path.clone(),
                message: format!("tensor `{}` was announced but never written", spec.name),
            });
        }
        let io = |source| FormatError::Io {
            path: self.path.clone(),
            source,
        };
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_all().map_err(io)
    }
}

/// Writes a whole set of tensors at once.
pub fn write_file(
    path: &Path,
    tensors: &BTreeMap<String, RawTensor>,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<(), FormatError> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, t)| TensorSpec {
            name: name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let mut w = SafetensorsWriter::create(path, &specs, metadata)?;
    for (name, t) in tensors {
        w.write(name, &t.data)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_sorted_and_padded() {
        let specs = vec![
            TensorSpec {
                name: "b".into(),
                dtype: Dtype::F32,
                shape: vec![2],
            },
            TensorSpec {
                name: "a".into(),
                dtype: Dtype::BF16,
                shape: vec![3],
            },
        ];
        let h = header_bytes(&specs, None);
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        assert_eq!(h.len(), 8 + n);
        let text = std::str::from_utf8(&h[8..]).unwrap().trim_end();
        assert_eq!(
            text,
            r#"{"a":{"data_offsets":[0,6],"dtype":"BF16","shape":[3]},"b":{"data_offsets":[6,14],"dtype":"F32","shape":[2]}}"#
        );
    }
}
