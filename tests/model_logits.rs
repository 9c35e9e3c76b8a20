//! Logits of the tiny fixtures against transformers / PEFT / mlx-lm, number for number.

mod model_util;

use candle_core::{DType, Device, Storage, Tensor};
use model_util::{expected, fixture, input_ids, max_abs_diff};
use taper::model::device::CacheAligned;
use taper::model::{forward_logits, fused};

/// The `taper` binary's global allocator: these forwards allocate as the binary's do.
#[global_allocator]
static ALLOC: CacheAligned = CacheAligned;

const F32_TOL: f64 = 1e-5;

fn logits(model: &str, adapter: Option<&str>, dtype: DType) -> candle_core::Tensor {
    let adapter = adapter.map(fixture);
    forward_logits(
        &fixture(model),
        adapter.as_deref(),
        input_ids(),
        &Device::Cpu,
        dtype,
    )
    .unwrap()
}

#[test]
fn tiny_llama_matches_transformers() {
    let got = logits("tiny-llama", None, DType::F32);
    let diff = max_abs_diff(&got, &expected("logits_llama.safetensors", "base"));
    eprintln!("tiny-llama base: max abs diff {diff:e}");
    assert!(diff <= F32_TOL, "max abs diff {diff}");
}

#[test]
fn tiny_qwen2_with_qkv_bias_matches_transformers() {
    let got = logits("tiny-qwen2", None, DType::F32);
    let diff = max_abs_diff(&got, &expected("logits_qwen2.safetensors", "base"));
    eprintln!("tiny-qwen2 base: max abs diff {diff:e}");
    assert!(diff <= F32_TOL, "max abs diff {diff}");
}

#[test]
fn tiny_llama_matches_mlx_base() {
    let got = logits("tiny-llama", None, DType::F32);
    let diff = max_abs_diff(&got, &expected("logits_llama_mlx.safetensors", "mlx_base"));
    eprintln!("tiny-llama vs mlx base: max abs diff {diff:e}");
    assert!(diff <= F32_TOL, "max abs diff {diff}");
}

#[test]
fn mlx_fused_checkpoint_loads_unpadded_header_and_single_shard_index() {
    // model.safetensors.index.json for one shard, header not padded to 8 bytes,
    // `__metadata__` {"format": "mlx"}, data offsets out of key order.
    let got = logits("mlx-fused-llama", None, DType::F32);
    let diff = max_abs_diff(&got, &expected("logits_llama_mlx.safetensors", "mlx_fused"));
    eprintln!("mlx-fused-llama: max abs diff {diff:e}");
    assert!(diff <= F32_TOL, "max abs diff {diff}");
}

#[test]
fn peft_merged_checkpoint_matches() {
    let got = logits("peft-merged-llama", None, DType::F32);
    let diff = max_abs_diff(&got, &expected("logits_llama.safetensors", "peft_merged"));
    eprintln!("peft-merged-llama: max abs diff {diff:e}");
    assert!(diff <= F32_TOL, "max abs diff {diff}");
}

#[test]
fn bf16_checkpoint_runs_in_f32_and_bf16_close_to_f32_logits() {
    let reference = logits("tiny-llama", None, DType::F32);
    let scale = max_abs_diff(&reference, &reference.zeros_like().unwrap());
    for dtype in [DType::F32, DType::BF16] {
        let got = logits("tiny-llama-bf16", None, dtype);
        assert_eq!(got.dtype(), DType::F32);
        let diff = max_abs_diff(&got, &reference);
        eprintln!(
            "tiny-llama-bf16 computed in {dtype:?}: max abs diff {diff:e} (logit scale {scale:.3})"
        );
        // bf16 keeps 8 bits of mantissa: weights rounded once (~0.4% relative), and in
        // bf16 compute every activation again; allow a few percent of the logit scale
        // (a misread tensor moves logits by about the whole scale).
        let tol = if dtype == DType::F32 { 0.02 } else { 0.04 } * scale;
        assert!(diff <= tol, "{dtype:?}: max abs diff {diff} > {tol}");
    }
}

#[test]
fn logits_are_written_as_one_safetensors_tensor() {
    let got = logits("tiny-llama", None, DType::F32);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logits.safetensors");
    taper::model::write_logits(&path, &got).unwrap();
    let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.keys().collect::<Vec<_>>(), vec!["logits"]);
    assert_eq!(max_abs_diff(&back["logits"], &got), 0.0);
}

/// Where an f32 tensor's data starts, modulo a 64-byte cache line.
fn line_offset(t: &Tensor) -> usize {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        panic!("not on the CPU")
    };
    let data = cpu.as_slice::<f32>().unwrap();
    data[layout.start_offset()..].as_ptr() as usize % 64
}

#[test]
fn tensor_buffers_start_on_a_cache_line() {
    // glibc's malloc alone puts a block on a line about one time in four: 8 sizes x 3
    // buffers all aligned by chance is a 1 in 2^48 event.
    let w = Tensor::ones(256, DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(256, DType::F32, &Device::Cpu).unwrap();
    let square = Tensor::randn(0f32, 1.0, (256, 256), &Device::Cpu).unwrap();
    // Each buffer holds at least 4 x 256 floats: 4 KiB, `CacheAligned`'s threshold.
    for rows in 4..12 {
        let x = Tensor::randn(0f32, 1.0, (rows, 256), &Device::Cpu).unwrap();
        let y = fused::layer_norm(&x, &w, &b, 1e-5).unwrap();
        let z = x.matmul(&square).unwrap();
        for (name, t) in [("input", &x), ("layer norm", &y), ("product", &z)] {
            assert_eq!(line_offset(t), 0, "{name} with {rows} rows");
        }
    }
    let logits = logits("tiny-llama", None, DType::F32);
    assert_eq!(line_offset(&logits), 0, "logits");
}
