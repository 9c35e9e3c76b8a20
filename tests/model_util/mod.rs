//! Shared helpers of the `model_*` integration tests: fixture paths, the fixture batch,
//! expected tensors, max-abs-diff and relative difference.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The `[2, 16]` batch of `expected/input_ids.json`.
pub fn input_ids() -> Vec<Vec<u32>> {
    taper::model::read_input_ids(&fixture("expected/input_ids.json")).unwrap()
}

/// Tensor `key` of `expected/<file>`, as f32 on the CPU.
pub fn expected(file: &str, key: &str) -> Tensor {
    let path = fixture("expected").join(file);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors
        .get(key)
        .unwrap_or_else(|| panic!("{key} not in {file}"))
        .to_dtype(DType::F32)
        .unwrap()
}

/// Largest absolute elementwise difference (shapes must agree).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |got - want| / max |want| (f32 tensors).
pub fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    let max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    max(&(got - want).unwrap()) / max(want)
}
