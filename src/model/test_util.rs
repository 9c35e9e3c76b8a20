//! Helpers for the unit tests of `model`.

use candle_core::{DType, Tensor};

/// The largest absolute elementwise difference of two tensors of one shape, as f64.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `max |a - b| / max |b|`.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_diff(a, b) / max_diff(b, &b.zeros_like().unwrap()).max(1e-30)
}
