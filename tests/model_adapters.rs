//! Adapters read from PEFT and mlx-lm files and applied unmerged reproduce the reference
//! tools' logits; settings taper cannot honour are refused, naming the key or tensor.

mod model_util;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use model_util::{expected, fixture, input_ids, max_abs_diff};
use taper::formats::{detect_format, read_adapter, AdapterFormat};
use taper::model::{forward_logits, inspect, Targets};

fn adapted_logits(adapter: &str) -> Tensor {
    let adapter = fixture(adapter);
    forward_logits(
        &fixture("tiny-llama"),
        Some(&adapter),
        input_ids(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

#[test]
fn peft_adapter_unmerged_matches_peft() {
    let got = adapted_logits("peft-adapter-llama");
    let diff = max_abs_diff(&got, &expected("logits_llama.safetensors", "peft_adapter"));
    eprintln!("peft adapter unmerged: max abs diff {diff:e}");
    assert!(diff <= 1e-5, "max abs diff {diff}");
    // The adapter must matter, or the comparison proves nothing.
    let base = expected("logits_llama.safetensors", "base");
    assert!(max_abs_diff(&got, &base) > 1e-2);
}

#[test]
fn mlx_adapter_unmerged_matches_mlx_lm() {
    let got = adapted_logits("mlx-adapter-llama");
    let diff = max_abs_diff(
        &got,
        &expected("logits_llama_mlx.safetensors", "mlx_adapter"),
    );
    eprintln!("mlx adapter unmerged: max abs diff {diff:e}");
    assert!(diff <= 1e-5, "max abs diff {diff}");
    let base = expected("logits_llama_mlx.safetensors", "mlx_base");
    assert!(max_abs_diff(&got, &base) > 1e-2);
}

#[test]
fn peft_scalings_match_peft() {
    let text = std::fs::read_to_string(fixture("expected/peft_scalings.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let want = json["peft-adapter-llama"].as_object().unwrap();
    let adapter = read_adapter(&fixture("peft-adapter-llama")).unwrap();
    assert_eq!(adapter.modules.len(), want.len());
    for (key, scale) in want {
        let module = key.strip_prefix("base_model.model.").unwrap();
        let got = adapter
            .modules
            .get(module)
            .unwrap_or_else(|| panic!("{module} missing"))
            .scale;
        assert_eq!(got, scale.as_f64().unwrap(), "{module}");
    }
}

#[test]
fn readers_normalise_to_peft_orientation() {
    let peft = read_adapter(&fixture("peft-adapter-llama")).unwrap();
    assert_eq!(peft.format, AdapterFormat::Peft);
    assert_eq!((peft.config.r, peft.config.alpha), (8, 16.0));
    assert_eq!(
        peft.config.targets,
        Targets::parse(&["q_proj", "v_proj"]).unwrap()
    );
    let v = &peft.modules["model.layers.0.self_attn.v_proj"];
    assert_eq!((v.a.dims(), v.b.dims()), (&[8, 64][..], &[32, 8][..]));

    let mlx = read_adapter(&fixture("mlx-adapter-llama")).unwrap();
    assert_eq!(mlx.format, AdapterFormat::Mlx);
    assert_eq!(mlx.modules.len(), 14);
    assert_eq!(mlx.config.targets, Targets::AllLinear);
    let down = &mlx.modules["model.layers.1.mlp.down_proj"];
    assert_eq!(
        (down.a.dims(), down.b.dims()),
        (&[8, 128][..], &[64, 8][..])
    );
    assert_eq!(down.scale, 20.0);
    // A is lora_a transposed, element for element.
    let raw = candle_core::safetensors::load(
        fixture("mlx-adapter-llama/adapters.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let lora_a = &raw["model.layers.1.mlp.down_proj.lora_a"];
    assert_eq!(max_abs_diff(&down.a, &lora_a.t().unwrap()), 0.0);
}

/// Copies an adapter fixture into a temp dir, edits its config, optionally adds tensors.
fn edited_copy(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    extra: Option<(&str, Tensor)>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    if let Some((key, t)) = extra {
        let file = ["adapter_model.safetensors", "adapters.safetensors"]
            .into_iter()
            .map(|f| dir.path().join(f))
            .find(|p| p.is_file())
            .unwrap();
        let mut all: HashMap<String, Tensor> = candle_core::safetensors::load(&file, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        all.insert(key.to_string(), t);
        candle_core::safetensors::save(&all, &file).unwrap();
    }
    dir
}

fn read_err(dir: &Path) -> String {
    read_adapter(dir).unwrap_err().to_string()
}

#[test]
fn peft_settings_taper_cannot_honour_are_refused_by_key() {
    let cases: [(&str, serde_json::Value); 7] = [
        ("use_dora", true.into()),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("bias", "all".into()),
        ("fan_in_fan_out", true.into()),
        ("peft_type", "IA3".into()),
        ("lora_bias", true.into()),
        ("layer_replication", serde_json::json!([[0, 2]])),
    ];
    for (key, value) in cases {
        let dir = edited_copy("peft-adapter-llama", |c| c[key] = value.clone(), None);
        let err = read_err(dir.path());
        assert!(
            err.contains(&format!("`{key}`")) && err.contains("not supported"),
            "{key}: {err}"
        );
        assert!(err.contains("adapter_config.json"), "{err}");
    }
}

#[test]
fn peft_tensors_outside_lora_a_b_are_refused_by_name() {
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    let extra = Tensor::ones(64, DType::F32, &Device::Cpu).unwrap();
    let dir = edited_copy("peft-adapter-llama", |_| {}, Some((key, extra)));
    let err = read_err(dir.path());
    assert!(
        err.contains(key) && err.contains("adapter_model.safetensors"),
        "{err}"
    );
}

#[test]
fn peft_rank_that_disagrees_with_the_weights_is_refused() {
    let dir = edited_copy(
        "peft-adapter-llama",
        |c| c["rank_pattern"] = serde_json::json!({"v_proj": 4}),
        None,
    );
    let err = read_err(dir.path());
    assert!(
        err.contains("v_proj.lora_A.weight") && err.contains("[8, 64]"),
        "{err}"
    );
}

#[test]
fn mlx_dora_is_refused() {
    let dir = edited_copy(
        "mlx-adapter-llama",
        |c| c["fine_tune_type"] = "dora".into(),
        None,
    );
    let err = read_err(dir.path());
    assert!(
        err.contains("fine_tune_type") && err.contains("not supported"),
        "{err}"
    );
}

#[test]
fn formats_are_detected_from_files() {
    assert_eq!(
        detect_format(&fixture("peft-adapter-llama")).unwrap(),
        AdapterFormat::Peft
    );
    assert_eq!(
        detect_format(&fixture("mlx-adapter-llama")).unwrap(),
        AdapterFormat::Mlx
    );
    let err = detect_format(&fixture("tiny-llama"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
}

#[test]
fn adapter_for_another_model_is_refused_naming_the_module() {
    let mut adapter = read_adapter(&fixture("peft-adapter-llama")).unwrap();
    let m = adapter
        .modules
        .remove("model.layers.1.self_attn.q_proj")
        .unwrap();
    adapter
        .modules
        .insert("model.layers.7.self_attn.q_proj".into(), m);
    let mut model =
        taper::model::load_model(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let err = taper::model::attach_adapter(&mut model, &adapter, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.7.self_attn.q_proj"), "{err}");
}

#[test]
fn inspect_reports_models_and_adapters_of_both_formats() {
    let model = inspect(&fixture("tiny-llama")).unwrap();
    assert_eq!(model.tensors.len(), 21);
    assert_eq!(model.parameter_count, 139_584);
    let text = model.to_string();
    eprintln!("{text}");
    assert!(
        text.contains("LlamaForCausalLM") && text.contains("139,584"),
        "{text}"
    );
    assert!(text.contains("model.layers.1.self_attn.v_proj.weight") && text.contains("[32, 64]"));

    let bf16 = inspect(&fixture("tiny-llama-bf16")).unwrap();
    assert_eq!(bf16.dtypes.keys().collect::<Vec<_>>(), vec!["BF16"]);

    let peft = inspect(&fixture("peft-adapter-llama")).unwrap();
    assert_eq!(peft.tensors.len(), 8);
    let text = peft.to_string();
    eprintln!("{text}");
    assert!(
        text.contains("(peft)") && text.contains("r 8, alpha 16"),
        "{text}"
    );

    let mlx = inspect(&fixture("mlx-adapter-llama")).unwrap();
    assert_eq!(mlx.tensors.len(), 28);
    assert!(mlx.to_string().contains("(mlx)"));
}
