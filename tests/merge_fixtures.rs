//! Merging the fixture adapters into tiny-llama reproduces what PEFT's
//! `merge_and_unload` and mlx-lm's `fuse` wrote; untouched tensors stay bit-identical;
//! the bf16 rounding rules are what they say; output bytes are reproducible.

mod model_util;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use model_util::{expected, fixture, input_ids, max_abs_diff};
use taper::formats::checkpoint::Checkpoint;
use taper::formats::safetensors_in::RawTensor;
use taper::formats::{merge, read_adapter, Rounding, DEFAULT_SHARD_SIZE};

fn tensors(dir: &Path) -> BTreeMap<String, RawTensor> {
    let c = Checkpoint::open(dir).unwrap();
    c.names().map(|n| (n.clone(), c.read(n).unwrap())).collect()
}

fn f32_tensor(t: &RawTensor) -> Tensor {
    t.to_tensor().unwrap().to_dtype(DType::F32).unwrap()
}

/// Merges and compares with a reference directory: adapted tensors within `tol`,
/// every other tensor bit-identical to both the base and the reference.
fn check_against(adapter: &str, rounding: Rounding, reference: &str, tol: f64) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = merge(
        &fixture("tiny-llama"),
        &fixture(adapter),
        &out,
        rounding,
        DEFAULT_SHARD_SIZE,
    )
    .unwrap();
    let adapted = read_adapter(&fixture(adapter)).unwrap();
    assert_eq!(report.merged, adapted.modules.len());
    let (got, want, base) = (
        tensors(&out),
        tensors(&fixture(reference)),
        tensors(&fixture("tiny-llama")),
    );
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let mut worst = 0f64;
    for (name, t) in &got {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        if adapted.modules.contains_key(module) {
            let d = max_abs_diff(&f32_tensor(t), &f32_tensor(&want[name]));
            worst = worst.max(d);
            assert!(d <= tol, "{name}: max abs diff {d}");
            assert!(
                max_abs_diff(&f32_tensor(t), &f32_tensor(&base[name])) > 1e-4,
                "{name} unchanged"
            );
        } else {
            assert_eq!(
                t, &want[name],
                "{name} must be bit-identical to the reference"
            );
            assert_eq!(t, &base[name], "{name} must be bit-identical to the base");
        }
    }
    eprintln!("{adapter} merged vs {reference}: max abs diff {worst:e}");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(fixture("tiny-llama").join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn peft_adapter_merges_like_peft() {
    check_against(
        "peft-adapter-llama",
        Rounding::Peft,
        "peft-merged-llama",
        1e-6,
    );
}

#[test]
fn mlx_adapter_fuses_like_mlx_lm() {
    check_against("mlx-adapter-llama", Rounding::Mlx, "mlx-fused-llama", 1e-6);
}

#[test]
fn merged_model_gives_the_merged_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    merge(
        &fixture("tiny-llama"),
        &fixture("peft-adapter-llama"),
        &out,
        Rounding::Peft,
        DEFAULT_SHARD_SIZE,
    )
    .unwrap();
    let logits =
        taper::model::forward_logits(&out, None, input_ids(), &Device::Cpu, DType::F32).unwrap();
    let d = max_abs_diff(
        &logits,
        &expected("logits_llama.safetensors", "peft_merged"),
    );
    eprintln!("merged logits vs peft_merged: {d:e}");
    assert!(d <= 1e-5, "{d}");
}

/// The two rules, recomputed here from the definitions with `half` doing the rounding.
#[test]
fn bf16_rounding_rules_match_their_definitions() {
    let adapter = read_adapter(&fixture("peft-adapter-llama")).unwrap();
    let base = tensors(&fixture("tiny-llama-bf16"));
    let mut differ = 0usize;
    let mut total = 0usize;
    let mut outs = Vec::new();
    let tmp = tempfile::tempdir().unwrap();
    for rounding in [Rounding::Peft, Rounding::Mlx] {
        let out = tmp.path().join(format!("{rounding:?}"));
        merge(
            &fixture("tiny-llama-bf16"),
            &fixture("peft-adapter-llama"),
            &out,
            rounding,
            DEFAULT_SHARD_SIZE,
        )
        .unwrap();
        outs.push(tensors(&out));
    }
    for (name, w) in &base {
        let module = name.strip_suffix(".weight").unwrap();
        let Some(m) = adapter.modules.get(module) else {
            assert_eq!(&outs[0][name], w);
            assert_eq!(&outs[1][name], w);
            continue;
        };
        let s = m.scale as f32;
        let ba = m.b.matmul(&m.a).unwrap().to_vec2::<f32>().unwrap();
        let sb_a = (&m.b * m.scale)
            .unwrap()
            .matmul(&m.a)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let w = w.to_tensor().unwrap().to_vec2::<bf16>().unwrap();
        let got_peft = outs[0][name]
            .to_tensor()
            .unwrap()
            .to_vec2::<bf16>()
            .unwrap();
        let got_mlx = outs[1][name]
            .to_tensor()
            .unwrap()
            .to_vec2::<bf16>()
            .unwrap();
        for i in 0..w.len() {
            for j in 0..w[i].len() {
                let peft = bf16::from_f32(w[i][j].to_f32() + ba[i][j] * s);
                let mlx = bf16::from_f32(w[i][j].to_f32() + bf16::from_f32(sb_a[i][j]).to_f32());
                assert_eq!(
                    got_peft[i][j].to_bits(),
                    peft.to_bits(),
                    "{name}[{i},{j}] peft rule"
                );
                assert_eq!(
                    got_mlx[i][j].to_bits(),
                    mlx.to_bits(),
                    "{name}[{i},{j}] mlx rule"
                );
                total += 1;
                differ += usize::from(peft != mlx);
            }
        }
    }
    eprintln!("bf16 rules differ in {differ} of {total} adapted elements");
    assert!(
        differ > 0,
        "the two rules must differ somewhere for this test to mean anything"
    );
}

fn read_dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn sharded_output_is_reproducible_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for out in [&a, &b] {
        let r = merge(
            &fixture("tiny-llama"),
            &fixture("mlx-adapter-llama"),
            out,
            Rounding::Peft,
            150_000,
        )
        .unwrap();
        assert!(r.shards > 1, "{r:?}");
    }
    let (fa, fb) = (read_dir_bytes(&a), read_dir_bytes(&b));
    assert_eq!(fa, fb, "two merges must write the same bytes");
    assert!(fa.contains_key("model.safetensors.index.json"));
    assert!(
        fa.contains_key("model-00001-of-00004.safetensors"),
        "{:?}",
        fa.keys()
    );
    // Headers are padded to 8 bytes.
    for (name, bytes) in &fa {
        if name.ends_with(".safetensors") {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            assert_eq!(n % 8, 0, "{name}");
        }
    }
    let logits =
        taper::model::forward_logits(&a, None, input_ids(), &Device::Cpu, DType::F32).unwrap();
    let d = max_abs_diff(
        &logits,
        &expected("logits_llama_mlx.safetensors", "mlx_fused"),
    );
    eprintln!("sharded merged logits vs mlx_fused: {d:e}");
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn mlx_fused_output_with_single_shard_index_is_read() {
    // The mlx-lm fixture has an unpadded header, null-free metadata, offsets out of key
    // order and a one-shard index; merging *into* it must work.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let r = merge(
        &fixture("mlx-fused-llama"),
        &fixture("peft-adapter-llama"),
        &out,
        Rounding::Peft,
        DEFAULT_SHARD_SIZE,
    )
    .unwrap();
    assert_eq!((r.merged, r.shards), (4, 1));
}
