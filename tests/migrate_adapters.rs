//! Adapter conversions between PEFT, mlx-lm and taper layouts: converted adapters give
//! the reference tools' logits, round trips are bit-identical, outputs are reproducible,
//! and what a format cannot express is refused naming the module.

mod model_util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use model_util::{expected, fixture, input_ids, max_abs_diff};
use taper::formats::raw_adapter::{AdapterKind, RawAdapter};
use taper::formats::{
    merge, migrate, MigrateFormat as F, MigrateOptions, Rounding, DEFAULT_SHARD_SIZE,
};

fn with_base(base: &str) -> MigrateOptions {
    MigrateOptions {
        base: Some(fixture(base)),
        dtype: None,
    }
}

fn convert(from: F, to: F, input: &Path, out: &Path) -> PathBuf {
    migrate(from, to, input, out, &with_base("tiny-llama")).unwrap();
    out.to_path_buf()
}

fn logits(adapter: &Path) -> candle_core::Tensor {
    taper::model::forward_logits(
        &fixture("tiny-llama"),
        Some(adapter),
        input_ids(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn bytes_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
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
fn peft_converted_to_mlx_gives_peft_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let mlx = convert(
        F::Peft,
        F::Mlx,
        &fixture("peft-adapter-llama"),
        &tmp.path().join("mlx"),
    );
    assert_eq!(AdapterKind::detect(&mlx).unwrap(), AdapterKind::Mlx);
    let d = max_abs_diff(
        &logits(&mlx),
        &expected("logits_llama.safetensors", "peft_adapter"),
    );
    eprintln!("peft -> mlx, applied: {d:e}");
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn mlx_converted_to_peft_gives_mlx_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let peft = convert(
        F::Mlx,
        F::Peft,
        &fixture("mlx-adapter-llama"),
        &tmp.path().join("peft"),
    );
    assert_eq!(AdapterKind::detect(&peft).unwrap(), AdapterKind::Peft);
    let d = max_abs_diff(
        &logits(&peft),
        &expected("logits_llama_mlx.safetensors", "mlx_adapter"),
    );
    eprintln!("mlx -> peft, applied: {d:e}");
    assert!(d <= 1e-5, "{d}");
}

/// A, B and the multiplier's bits of one module.
type Module = (Vec<u8>, Vec<usize>, Vec<u8>, Vec<usize>, u64);

/// Tensors and multipliers of an adapter, for bit-for-bit comparison.
fn contents(dir: &Path) -> BTreeMap<String, Module> {
    let raw = RawAdapter::read(dir, AdapterKind::detect(dir).unwrap()).unwrap();
    raw.modules
        .into_iter()
        .map(|(n, m)| {
            (
                n,
                (m.a.data, m.a.shape, m.b.data, m.b.shape, m.scale.to_bits()),
            )
        })
        .collect()
}

#[test]
fn round_trips_are_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);
    // PEFT -> mlx -> PEFT, and once more: the second lap writes the same bytes.
    let peft = fixture("peft-adapter-llama");
    convert(F::Peft, F::Mlx, &peft, &t("m1"));
    convert(F::Mlx, F::Peft, &t("m1"), &t("p1"));
    convert(F::Peft, F::Mlx, &t("p1"), &t("m2"));
    convert(F::Mlx, F::Peft, &t("m2"), &t("p2"));
    assert_eq!(contents(&t("p1")), contents(&peft));
    assert_eq!(bytes_of(&t("p1")), bytes_of(&t("p2")));
    assert_eq!(bytes_of(&t("m1")), bytes_of(&t("m2")));
    // mlx -> PEFT -> mlx, through taper's format too.
    let mlx = fixture("mlx-adapter-llama");
    convert(F::Mlx, F::Taper, &mlx, &t("t1"));
    convert(F::Taper, F::Peft, &t("t1"), &t("p3"));
    convert(F::Peft, F::Mlx, &t("p3"), &t("m3"));
    assert_eq!(contents(&t("m3")), contents(&mlx));
    assert_eq!(contents(&t("t1")), contents(&mlx));
    // The mlx tensors themselves are the fixture's bytes.
    let a =
        taper::formats::safetensors_in::SafetensorsFile::open(&mlx.join("adapters.safetensors"))
            .unwrap();
    let b = taper::formats::safetensors_in::SafetensorsFile::open(
        &t("m3").join("adapters.safetensors"),
    )
    .unwrap();
    assert_eq!(a.read_all().unwrap(), b.read_all().unwrap());
}

#[test]
fn writing_twice_gives_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    for to in [F::Peft, F::Mlx, F::Taper] {
        let a = convert(
            F::Peft,
            to,
            &fixture("peft-adapter-llama"),
            &tmp.path().join(format!("{to:?}a")),
        );
        let b = convert(
            F::Peft,
            to,
            &fixture("peft-adapter-llama"),
            &tmp.path().join(format!("{to:?}b")),
        );
        assert_eq!(bytes_of(&a), bytes_of(&b), "{to:?}");
        // Nothing of this machine leaks into the files.
        for (name, bytes) in bytes_of(&a) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains(tmp.path().to_str().unwrap()),
                "{name} holds a path"
            );
        }
    }
}

/// A copy of the PEFT fixture with its config edited.
fn edited_peft(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let out = dir.join("edited");
    std::fs::create_dir_all(&out).unwrap();
    let src = fixture("peft-adapter-llama");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        out.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(
        out.join("adapter_config.json"),
        serde_json::to_vec(&json).unwrap(),
    )
    .unwrap();
    out
}

#[test]
fn per_module_scales_go_to_peft_and_taper_but_not_mlx() {
    let tmp = tempfile::tempdir().unwrap();
    let src = edited_peft(tmp.path(), |j| {
        j["alpha_pattern"] = serde_json::json!({"v_proj": 32})
    });
    let err = migrate(
        F::Peft,
        F::Mlx,
        &src,
        &tmp.path().join("mlx"),
        &with_base("tiny-llama"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.v_proj") && err.contains("scale"),
        "{err}"
    );
    assert!(!tmp.path().join("mlx").exists(), "no output on failure");
    // PEFT and taper express it; the multipliers survive.
    convert(F::Peft, F::Taper, &src, &tmp.path().join("t"));
    convert(
        F::Taper,
        F::Peft,
        &tmp.path().join("t"),
        &tmp.path().join("p"),
    );
    assert_eq!(contents(&tmp.path().join("p")), contents(&src));
    let scales: Vec<f64> = RawAdapter::read(&tmp.path().join("p"), AdapterKind::Peft)
        .unwrap()
        .modules
        .values()
        .map(|m| m.scale)
        .collect();
    assert_eq!(scales, vec![2.0, 4.0, 2.0, 4.0]);
}

#[test]
fn unrepresentable_settings_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dora = edited_peft(tmp.path(), |j| j["use_dora"] = serde_json::json!(true));
    let err = migrate(
        F::Peft,
        F::Mlx,
        &dora,
        &tmp.path().join("o"),
        &MigrateOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("use_dora") && err.contains("DoRA"), "{err}");
    let saved = tmp.path().join("s");
    std::fs::create_dir_all(&saved).unwrap();
    let saved = edited_peft(&saved, |j| {
        j["modules_to_save"] = serde_json::json!(["lm_head"])
    });
    let err = migrate(
        F::Peft,
        F::Taper,
        &saved,
        &tmp.path().join("o"),
        &MigrateOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("modules_to_save"), "{err}");
    assert!(!tmp.path().join("o").exists());
    // Asking for the wrong source format is caught before anything is read.
    let err = migrate(
        F::Mlx,
        F::Peft,
        &fixture("peft-adapter-llama"),
        &tmp.path().join("o"),
        &MigrateOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("found a peft adapter"), "{err}");
}

#[test]
fn adapters_are_checked_against_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    // A base whose v_proj of block 0 has another shape.
    let base = tmp.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(fixture("tiny-llama/config.json"), base.join("config.json")).unwrap();
    let c = taper::formats::checkpoint::Checkpoint::open(&fixture("tiny-llama")).unwrap();
    let mut tensors: BTreeMap<_, _> = c.names().map(|n| (n.clone(), c.read(n).unwrap())).collect();
    let v = tensors
        .get_mut("model.layers.0.self_attn.v_proj.weight")
        .unwrap();
    v.shape = vec![16, 64];
    v.data.truncate(16 * 64 * 4);
    taper::formats::safetensors_out::write_file(&base.join("model.safetensors"), &tensors, None)
        .unwrap();
    let opts = MigrateOptions {
        base: Some(base.clone()),
        dtype: None,
    };
    let err = migrate(
        F::Peft,
        F::Mlx,
        &fixture("peft-adapter-llama"),
        &tmp.path().join("o"),
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.v_proj") && err.contains("[16, 64]"),
        "{err}"
    );
    let err = merge(
        &base,
        &fixture("peft-adapter-llama"),
        &tmp.path().join("o"),
        Rounding::Peft,
        DEFAULT_SHARD_SIZE,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("model.layers.0.self_attn.v_proj"), "{err}");
    assert!(!tmp.path().join("o").exists());

    // taper adapters record their base; merging into another base is refused.
    let native = convert(
        F::Peft,
        F::Taper,
        &fixture("peft-adapter-llama"),
        &tmp.path().join("t"),
    );
    let err = merge(
        &fixture("tiny-llama-bf16"),
        &native,
        &tmp.path().join("o"),
        Rounding::Peft,
        DEFAULT_SHARD_SIZE,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("base_model") && err.contains("hash"), "{err}");
    assert!(!tmp.path().join("o").exists());
    merge(
        &fixture("tiny-llama"),
        &native,
        &tmp.path().join("ok"),
        Rounding::Peft,
        DEFAULT_SHARD_SIZE,
    )
    .unwrap();
}

#[test]
fn mlx_output_needs_the_last_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    // Only block 0 of 2: mlx-lm can only adapt the last blocks.
    let src = edited_peft(tmp.path(), |j| {
        j["layers_to_transform"] = serde_json::json!([0, 1])
    });
    convert(F::Peft, F::Mlx, &src, &tmp.path().join("ok"));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("ok/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["num_layers"], -1);
    assert_eq!(
        cfg["lora_parameters"]["keys"],
        serde_json::json!(["self_attn.q_proj", "self_attn.v_proj"])
    );
    let err = migrate(
        F::Peft,
        F::Mlx,
        &src,
        &tmp.path().join("o"),
        &MigrateOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("base model"), "{err}");
}
