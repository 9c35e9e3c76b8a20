//! Loading errors name the tensor and the file; sharded checkpoints load like single
//! files; a tied `lm_head` reads the embedding; f16 checkpoints load and run; the mask
//! handles right padding.

mod model_util;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use model_util::{fixture, input_ids, max_abs_diff};
use taper::model::{forward_logits, load_model, ModelError};

/// A copy of tiny-llama's config and tokenizer with `tensors` as its weights.
fn model_dir(config_edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config_edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn tiny_llama_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("tiny-llama/model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn load_err(dir: &Path) -> ModelError {
    load_model(dir, DType::F32, &Device::Cpu).unwrap_err()
}

#[test]
fn missing_tensor_is_named_with_its_file() {
    let dir = model_dir(|_| {});
    let mut tensors = tiny_llama_tensors();
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    eprintln!("{err}");
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("`model.layers.1.mlp.up_proj.weight`") && text.contains("model.safetensors"),
        "{text}"
    );
}

#[test]
fn shape_mismatch_names_tensor_file_and_both_shapes() {
    let dir = model_dir(|c| c["intermediate_size"] = 96.into());
    std::fs::copy(
        fixture("tiny-llama/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let text = load_err(dir.path()).to_string();
    eprintln!("{text}");
    assert!(
        text.contains("`model.layers.0.mlp.gate_proj.weight`"),
        "{text}"
    );
    assert!(
        text.contains("[128, 64]")
            && text.contains("[96, 64]")
            && text.contains("model.safetensors"),
        "{text}"
    );
}

#[test]
fn missing_weights_and_bad_config_are_reported() {
    let dir = model_dir(|_| {});
    let text = load_err(dir.path()).to_string();
    assert!(text.contains("no model weights"), "{text}");
    let dir = model_dir(|c| c["architectures"] = serde_json::json!(["MistralForCausalLM"]));
    let text = load_err(dir.path()).to_string();
    assert!(
        text.contains("config.json")
            && text.contains("MistralForCausalLM")
            && text.contains("not supported yet"),
        "{text}"
    );
    let dir = model_dir(|c| c["rope_parameters"]["rope_type"] = "llama3".into());
    let text = load_err(dir.path()).to_string();
    assert!(
        text.contains("rope_type") && text.contains("llama3"),
        "{text}"
    );
}

/// Splits tiny-llama into two shards with an index.
fn sharded(drop_from_shard: Option<&str>) -> tempfile::TempDir {
    let dir = model_dir(|_| {});
    let tensors = tiny_llama_tensors();
    let mut shards = [HashMap::new(), HashMap::new()];
    let mut weight_map = serde_json::Map::new();
    for (name, t) in tensors {
        let i = usize::from(name.contains("layers.1") || name.starts_with("lm_head"));
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        weight_map.insert(name.clone(), file.into());
        if Some(name.as_str()) != drop_from_shard {
            shards[i].insert(name, t);
        }
    }
    for (i, shard) in shards.iter().enumerate() {
        let path = dir
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", i + 1));
        candle_core::safetensors::save(shard, path).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn sharded_checkpoint_gives_the_same_logits() {
    let dir = sharded(None);
    let single = forward_logits(
        &fixture("tiny-llama"),
        None,
        input_ids(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let split = forward_logits(dir.path(), None, input_ids(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(max_abs_diff(&single, &split), 0.0);
}

/// tiny-llama with `lm_head.weight` replaced by the embedding (and dropped from the file
/// when `tied`), in `dtype` on disk.
fn variant(tied: bool, dtype: DType) -> tempfile::TempDir {
    let dir = model_dir(|c| {
        c["tie_word_embeddings"] = serde_json::Value::Bool(tied);
    });
    let mut tensors = tiny_llama_tensors();
    let embed = tensors["model.embed_tokens.weight"].clone();
    if tied {
        tensors.remove("lm_head.weight");
    } else {
        tensors.insert("lm_head.weight".into(), embed);
    }
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn tied_lm_head_reads_the_embedding() {
    let logits =
        |dir: &Path| forward_logits(dir, None, input_ids(), &Device::Cpu, DType::F32).unwrap();
    // Tied (no lm_head in the file) equals untied with lm_head = the embedding, exactly,
    // and differs from tiny-llama's own lm_head.
    let (tied, untied) = (variant(true, DType::F32), variant(false, DType::F32));
    let t = logits(tied.path());
    assert_eq!(max_abs_diff(&t, &logits(untied.path())), 0.0);
    assert!(max_abs_diff(&t, &logits(&fixture("tiny-llama"))) > 1e-3);
    // Untied without lm_head in the file is an error naming it.
    let broken = variant(true, DType::F32);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(broken.path().join("config.json")).unwrap())
            .unwrap();
    config["tie_word_embeddings"] = serde_json::Value::Bool(false);
    std::fs::write(broken.path().join("config.json"), config.to_string()).unwrap();
    let err = load_err(broken.path()).to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
}

#[test]
fn f16_checkpoint_loads_and_runs_close_to_f32() {
    let (f32_dir, f16_dir) = (variant(false, DType::F32), variant(false, DType::F16));
    let want = forward_logits(f32_dir.path(), None, input_ids(), &Device::Cpu, DType::F32).unwrap();
    for dtype in [DType::F32, DType::F16] {
        let got = forward_logits(f16_dir.path(), None, input_ids(), &Device::Cpu, dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let diff = max_abs_diff(&want, &got);
        // f16 weights (11-bit mantissa): tiny-llama's logits are O(1).
        assert!(
            diff < 2e-2,
            "f16 on disk, {dtype:?} compute: max abs diff {diff:e}"
        );
        assert!(diff > 0.0, "f16 rounding must show");
    }
}

#[test]
fn tensor_missing_from_its_shard_names_that_shard() {
    let dir = sharded(Some("model.layers.1.self_attn.o_proj.weight"));
    let text = load_err(dir.path()).to_string();
    eprintln!("{text}");
    assert!(
        text.contains("model.layers.1.self_attn.o_proj.weight")
            && text.contains("model-00002-of-00002.safetensors"),
        "{text}"
    );
}

#[test]
fn input_ids_outside_the_vocabulary_are_refused() {
    let err = forward_logits(
        &fixture("tiny-llama"),
        None,
        vec![vec![1, 512]],
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("row 0 position 1") && err.contains("512"),
        "{err}"
    );
    let err = forward_logits(
        &fixture("tiny-llama"),
        None,
        vec![vec![1, 2], vec![3]],
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("row 1"), "{err}");
}

#[test]
fn right_padded_batch_with_mask_equals_unpadded_on_real_tokens() {
    let model = load_model(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let ids = input_ids();
    let full = taper::model::ids_tensor(&ids, 512, &Device::Cpu).unwrap();
    let want = model.forward(&full, None, false).unwrap();
    // Row 0 keeps 16 tokens, row 1 only its first 9, then padding (id 0, masked).
    let real = [16usize, 9];
    let mut padded = ids.clone();
    for (row, &n) in padded.iter_mut().zip(&real) {
        row[n..].iter_mut().for_each(|id| *id = 0);
    }
    let mask: Vec<u32> = real
        .iter()
        .flat_map(|&n| (0..16).map(move |j| u32::from(j < n)))
        .collect();
    let mask = Tensor::from_vec(mask, (2, 16), &Device::Cpu).unwrap();
    let padded = taper::model::ids_tensor(&padded, 512, &Device::Cpu).unwrap();
    let got = model.forward(&padded, Some(&mask), false).unwrap();
    for (row, &n) in real.iter().enumerate() {
        let a = got.get(row).unwrap().narrow(0, 0, n).unwrap();
        let b = want.get(row).unwrap().narrow(0, 0, n).unwrap();
        let diff = max_abs_diff(&a, &b);
        assert!(diff <= 1e-6, "row {row}: {diff}");
    }
    // Without the mask the padding is just more tokens; the causal mask alone must keep
    // the real prefix unchanged.
    let unmasked = model.forward(&padded, None, false).unwrap();
    let prefix = max_abs_diff(
        &unmasked.get(1).unwrap().narrow(0, 0, 9).unwrap(),
        &want.get(1).unwrap().narrow(0, 0, 9).unwrap(),
    );
    assert!(prefix <= 1e-6, "causal mask leaks future tokens: {prefix}");
}

#[test]
fn masked_key_cannot_influence_other_positions() {
    // With key 3 masked, whatever token sits there must not change any other position.
    let model = load_model(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let mut ids = input_ids();
    ids.truncate(1);
    let mut other = ids.clone();
    other[0][3] = 7;
    let mask: Vec<u32> = (0..16).map(|j| u32::from(j != 3)).collect();
    let mask = Tensor::from_vec(mask, (1, 16), &Device::Cpu).unwrap();
    let run = |ids: &[Vec<u32>], mask: Option<&Tensor>| {
        let t = taper::model::ids_tensor(ids, 512, &Device::Cpu).unwrap();
        model.forward(&t, mask, false).unwrap().get(0).unwrap()
    };
    let (a, b) = (run(&ids, Some(&mask)), run(&other, Some(&mask)));
    for range in [(0, 3), (4, 12)] {
        let diff = max_abs_diff(
            &a.narrow(0, range.0, range.1).unwrap(),
            &b.narrow(0, range.0, range.1).unwrap(),
        );
        assert!(
            diff <= 1e-6,
            "masked token leaked into positions {range:?}: {diff}"
        );
    }
    // Unmasked, the same change does move later positions (so the check above can fail).
    let (c, d) = (run(&ids, None), run(&other, None));
    assert!(max_abs_diff(&c.narrow(0, 4, 12).unwrap(), &d.narrow(0, 4, 12).unwrap()) > 1e-3);
}

#[test]
fn fully_masked_rows_stay_finite() {
    // Left padding: the pad queries have nothing to attend to; no NaN may appear.
    let model = load_model(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let ids = taper::model::ids_tensor(&[vec![0, 0, 50, 358]], 512, &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[0u32, 0, 1, 1]], &Device::Cpu).unwrap();
    let logits = model.forward(&ids, Some(&mask), false).unwrap();
    let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
}
