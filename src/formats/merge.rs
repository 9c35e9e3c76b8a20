//! Merging a LoRA adapter into its base: `W' = W + s·(B @ A)` for every adapted module,
//! every other tensor copied byte for byte, written as a Hugging Face model directory.
//!
//! Streams: tensors are read, merged and written one at a time in name order, so peak
//! memory is a few times the largest tensor, not the model. Shards are planned from the
//! headers before anything is written (merging keeps dtype and shape).
//!
//! Two rounding rules for half-precision bases, as the reference tools do it:
//! - [`Rounding::Peft`] (default): `Δ = (B @ A)·s` in f32, `W' = half(f32(W) + Δ)`.
//! - [`Rounding::Mlx`]: `Δ = (s·B) @ A` in f32, `W' = half(W + half(Δ))`.
//!
//! For f32 bases the two differ only in where `s` is applied.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::adapter::AdapterModule;
use super::checkpoint::{Checkpoint, SINGLE_WEIGHTS, WEIGHTS_INDEX};
use super::error::FormatError;
use super::output::{check_identity, OutputDir};
use super::raw_adapter::{AdapterKind, RawAdapter};
use super::safetensors_in::{candle_dtype, RawTensor};
use super::safetensors_out::{write_json, SafetensorsWriter, TensorSpec};

/// How a half-precision weight and its delta are rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// `half(W + Δ)` with `Δ` in f32 (PEFT's `merge_and_unload`).
    #[default]
    Peft,
    /// `half(W + half(Δ))` (mlx-lm's `fuse`).
    Mlx,
}

impl std::str::FromStr for Rounding {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "peft" => Ok(Self::Peft),
            "mlx" => Ok(Self::Mlx),
            other => Err(FormatError::Usage(format!(
                "unknown rounding `{other}` (expected peft or mlx)"
            ))),
        }
    }
}

/// The default shard size: 5 GB, as `save_pretrained`.
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// What a merge did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    /// Tensors that got an adapter's delta.
    pub merged: usize,
    /// Tensors copied as they were.
    pub copied: usize,
    /// Safetensors files written.
    pub shards: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
}

/// Files of a model directory carried over to the merged one, byte for byte.
const CARRIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Parses `5GB`, `500MB`, `2GiB`, `1000` (bytes).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = num * mult;
    (bytes >= 1.0 && bytes.is_finite()).then_some(bytes as u64)
}

/// Merges the adapter in `adapter_dir` (any format) into the model in `base_dir`, writing
/// a model directory at `out_dir` (which must not exist or be empty).
pub fn merge(
    base_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    rounding: Rounding,
    shard_size: u64,
) -> Result<MergeReport, FormatError> {
    merge_with_progress(
        base_dir,
        adapter_dir,
        out_dir,
        rounding,
        shard_size,
        &mut |_, _| true,
    )
}

/// [`merge`], calling `progress(done, total)` after each tensor; returning `false` stops
/// the merge with [`FormatError::Cancelled`] and leaves no output.
pub fn merge_with_progress(
    base_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    rounding: Rounding,
    shard_size: u64,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<MergeReport, FormatError> {
    if shard_size == 0 {
        return Err(FormatError::Usage("the shard size must be positive".into()));
    }
    let base = Checkpoint::open(base_dir)?;
    let raw = RawAdapter::read(adapter_dir, AdapterKind::detect(adapter_dir)?)?;
    base.check_modules(
        raw.modules
            .iter()
            .map(|(n, m)| (n, m.out_dim(), m.in_dim())),
    )?;
    check_identity(&raw, &base)?;
    let adapter = raw.to_adapter()?;

    let specs: Vec<TensorSpec> = base
        .names()
        .map(|name| {
            let e = base.entry(name).expect("listed names have entries");
            TensorSpec {
                name: name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
            }
        })
        .collect();
    let shards = plan_shards(&specs, shard_size);
    let out = OutputDir::create(out_dir)?;
    let total = specs.len();
    let mut report = MergeReport {
        merged: 0,
        copied: 0,
        shards: shards.len(),
        bytes: 0,
    };
    let mut weight_map = serde_json::Map::new();
    let mut done = 0;
    for (index, shard) in shards.iter().enumerate() {
        let file_name = shard_name(index, shards.len());
        let path = out.path().join(&file_name);
        let meta = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let writer = SafetensorsWriter::create(&path, shard, Some(&meta))?;
        // This thread reads and merges; a second one writes, so the disk and the
        // arithmetic overlap. The channel holds at most two tensors: memory stays near
        // a few times the largest merged tensor (copied tensors never enter memory).
        let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Payload)>(2);
        let outcome = std::thread::scope(|scope| {
            let base = &base;
            let writing = scope.spawn(move || write_all(writer, base, rx));
            let produced = (|| {
                for spec in shard {
                    let module = spec.name.strip_suffix(".weight");
                    let payload = match module.and_then(|m| adapter.modules.get(m)) {
                        Some(m) => {
                            report.merged += 1;
                            merge_one(base, spec, m, rounding)?
                        }
                        None => {
                            report.copied += 1;
                            Payload::Copy
                        }
                    };
                    report.bytes += spec.byte_len();
                    weight_map.insert(spec.name.clone(), json!(file_name));
                    if tx.send((spec.name.clone(), payload)).is_err() {
                        // The writer stopped: its own error says why.
                        return Ok(());
                    }
                    done += 1;
                    if !progress(done, total) {
                        return Err(FormatError::Cancelled);
                    }
                }
                Ok(())
            })();
            drop(tx);
            let written = writing.join().unwrap_or_else(|_| {
                Err(FormatError::Output {
                    path: path.clone(),
                    message: "the thread writing it panicked".into(),
                })
            });
            produced.and(written)
        });
        outcome?;
    }
    if shards.len() > 1 {
        let index = json!({
            "metadata": {"total_size": report.bytes},
            "weight_map": weight_map,
        });
        write_json(&out.path().join(WEIGHTS_INDEX), &index)?;
    }
    for name in CARRIED_FILES {
        let src = base_dir.join(name);
        if src.is_file() {
            let dst = out.path().join(name);
            std::fs::copy(&src, &dst).map_err(|source| FormatError::Io { path: src, source })?;
        }
    }
    out.publish()?;
    Ok(report)
}

/// The bytes of one output tensor, as handed from the merging thread to the writer.
enum Payload {
    /// A merged f32 tensor.
    Floats(Vec<f32>),
    /// A merged tensor of another dtype, as stored.
    Bytes(Vec<u8>),
    /// An untouched tensor: copied from the base's file by the writer.
    Copy,
}

/// Writes what arrives on `rx`, in order, then finishes the file.
fn write_all(
    mut writer: SafetensorsWriter,
    base: &Checkpoint,
    rx: std::sync::mpsc::Receiver<(String, Payload)>,
) -> Result<(), FormatError> {
    for (name, payload) in rx {
        match payload {
            Payload::Floats(v) => writer.write(&name, f32_bytes(&v))?,
            Payload::Bytes(b) => writer.write(&name, &b)?,
            Payload::Copy => {
                let shard = base.shard_of(&name)?;
                let entry = shard.entry(&name)?;
                writer.copy_from(&name, shard.file(), shard.path(), entry.start, entry.len())?
            }
        }
    }
    writer.finish()
}

/// The little-endian bytes of `v` (safetensors' byte order; taper builds for
/// little-endian targets only, as candle does).
fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns, u8 has alignment 1, and the
    // length covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Merges the adapter's module `m` into base tensor `spec`. f32 weights are read straight
/// into an f32 buffer and the delta added in place: `W + Δ` with `Δ` as
/// [`merge_tensor`] forms it, so the bytes are the same as its.
fn merge_one(
    base: &Checkpoint,
    spec: &TensorSpec,
    m: &AdapterModule,
    rounding: Rounding,
) -> Result<Payload, FormatError> {
    let shard = base.shard_of(&spec.name)?;
    let candle = |e: candle_core::Error| FormatError::Safetensors {
        file: shard.path().to_path_buf(),
        message: format!("merging into `{}`: {e}", spec.name),
    };
    if spec.dtype != safetensors::Dtype::F32 {
        let stored = shard.read(&spec.name)?;
        return Ok(Payload::Bytes(
            merge_tensor(&stored, m, rounding).map_err(candle)?.data,
        ));
    }
    let n: usize = spec.shape.iter().product();
    let mut w = vec![0f32; n];
    // SAFETY: as in `f32_bytes`; every bit pattern is a valid f32.
    let bytes = unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast::<u8>(), 4 * n) };
    shard.read_into(&spec.name, bytes)?;
    let (a, b) = (
        m.a.to_dtype(DType::F32).map_err(candle)?,
        m.b.to_dtype(DType::F32).map_err(candle)?,
    );
    let (product, scale) = match rounding {
        // Δ = (B @ A)·s
        Rounding::Peft => (b.matmul(&a).map_err(candle)?, Some(m.scale as f32)),
        // Δ = (s·B) @ A
        Rounding::Mlx => (
            b.affine(m.scale, 0.0)
                .and_then(|b| b.matmul(&a))
                .map_err(candle)?,
            None,
        ),
    };
    let (storage, layout) = product.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(candle(candle_core::Error::Msg(
            "delta is not on the CPU".into(),
        )));
    };
    let delta = cpu.as_slice::<f32>().map_err(candle)?;
    let delta = delta
        .get(layout.start_offset()..layout.start_offset() + n)
        .filter(|_| layout.is_contiguous() && product.dims() == spec.shape.as_slice())
        .ok_or_else(|| candle(candle_core::Error::Msg("delta has the wrong shape".into())))?;
    match scale {
        // `x * s + 0` as candle's affine computes it (the `+ 0` turns -0 into +0).
        Some(s) => w.iter_mut().zip(delta).for_each(|(w, d)| *w += d * s + 0.0),
        None => w.iter_mut().zip(delta).for_each(|(w, d)| *w += d),
    }
    Ok(Payload::Floats(w))
}

/// `model.safetensors` for one shard, else `model-00001-of-00003.safetensors`, ...
pub fn shard_name(index: usize, count: usize) -> String {
    if count == 1 {
        SINGLE_WEIGHTS.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
    }
}

/// Splits `specs` (name order) into shards of at most `shard_size` bytes of data; a
/// tensor larger than that gets a shard of its own.
pub fn plan_shards(specs: &[TensorSpec], shard_size: u64) -> Vec<Vec<TensorSpec>> {
    let mut sorted = specs.to_vec();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shards: Vec<Vec<TensorSpec>> = Vec::new();
    let mut current: Vec<TensorSpec> = Vec::new();
    let mut size = 0u64;
    for spec in sorted {
        let len = spec.byte_len();
        if !current.is_empty() && size + len > shard_size {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(spec);
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// `W + s·(B @ A)` under `rounding`, in `W`'s dtype.
pub fn merge_tensor(
    w: &RawTensor,
    m: &AdapterModule,
    rounding: Rounding,
) -> candle_core::Result<RawTensor> {
    let dtype = candle_dtype(w.dtype)
        .ok_or_else(|| candle_core::Error::Msg(format!("{:?} is not a float", w.dtype)))?;
    let wt = w.to_tensor()?;
    let (a, b) = (m.a.to_dtype(DType::F32)?, m.b.to_dtype(DType::F32)?);
    let delta = match rounding {
        Rounding::Peft => b.matmul(&a)?.affine(m.scale, 0.0)?,
        Rounding::Mlx => b.affine(m.scale, 0.0)?.matmul(&a)?,
    };
    let merged: Tensor = match (dtype, rounding) {
        (DType::F32, _) => (wt + delta)?,
        (DType::F64, _) => (wt + delta.to_dtype(DType::F64)?)?,
        (_, Rounding::Peft) => (wt.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?,
        (_, Rounding::Mlx) => (wt + delta.to_dtype(dtype)?)?,
    };
    RawTensor::from_tensor(&merged)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("2 MiB"), Some(2 * 1024 * 1024));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("0"), None);
    }
}
