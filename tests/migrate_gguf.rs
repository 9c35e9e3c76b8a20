//! GGUF import: a GGUF written here from tiny-llama the way llama.cpp's converter does it
//! (q/k rows permuted for rotary, GGUF names, tokenizer in metadata) imports back to
//! tiny-llama's tensors (F32 and F16 exactly, Q8_0/Q4_0/Q4_1 within quantization error),
//! the same logits, and a tokenizer that encodes like the original.

mod model_util;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use model_util::{fixture, input_ids, max_abs_diff};
use taper::formats::checkpoint::Checkpoint;
use taper::formats::gguf::permute;
use taper::formats::{migrate, MigrateFormat as F, MigrateOptions};

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (i, part) = rest.split_once('.').unwrap();
    let g = match part {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        other => panic!("{other}"),
    };
    format!("blk.{i}.{g}.weight")
}

fn tiny_llama() -> BTreeMap<String, Tensor> {
    let c = Checkpoint::open(&fixture("tiny-llama")).unwrap();
    c.names()
        .map(|n| (n.clone(), c.read(n).unwrap().to_tensor().unwrap()))
        .collect()
}

/// Writes tiny-llama as GGUF with matrices in `dtype` (norms stay F32, as llama.cpp does).
fn write_gguf(path: &Path, dtype: GgmlDType) {
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tiny-llama/tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let special: Vec<u64> = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            Value::String(format!(
                "{} {}",
                m[0].as_str().unwrap(),
                m[1].as_str().unwrap()
            ))
        })
        .collect();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if special.contains(&(i as u64)) { 3 } else { 1 }))
        .collect();
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(2)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(64)),
        ("llama.feed_forward_length", Value::U32(128)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.padding_token_id", Value::U32(0)),
    ];
    let mut tensors = Vec::new();
    for (name, t) in tiny_llama() {
        let t = if name.ends_with("q_proj.weight") {
            permute(&t, 4).unwrap()
        } else if name.ends_with("k_proj.weight") {
            permute(&t, 2).unwrap()
        } else {
            t
        };
        let dt = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        tensors.push((gguf_name(&name), QTensor::quantize(&t, dt).unwrap()));
    }
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &ts).unwrap();
}

fn import(dir: &Path, dtype: GgmlDType) -> std::path::PathBuf {
    let gguf = dir.join(format!("{dtype:?}.gguf"));
    write_gguf(&gguf, dtype);
    let out = dir.join(format!("{dtype:?}"));
    migrate(F::Gguf, F::Hf, &gguf, &out, &MigrateOptions::default()).unwrap();
    out
}

#[test]
fn f32_gguf_imports_exactly_with_the_same_logits_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let out = import(tmp.path(), GgmlDType::F32);
    let c = Checkpoint::open(&out).unwrap();
    for (name, want) in tiny_llama() {
        let got = c.read(&name).unwrap().to_tensor().unwrap();
        assert_eq!(got.to_vec1::<f32>().ok(), want.to_vec1::<f32>().ok());
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{name}");
    }
    let want = taper::model::forward_logits(
        &fixture("tiny-llama"),
        None,
        input_ids(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let got =
        taper::model::forward_logits(&out, None, input_ids(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(max_abs_diff(&got, &want), 0.0);
    let a = tokenizers::Tokenizer::from_file(fixture("tiny-llama/tokenizer.json")).unwrap();
    let b = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "  spaces,\ttabs\nand <s> specials </s> 123",
    ] {
        assert_eq!(
            a.encode(text, false).unwrap().get_ids(),
            b.encode(text, false).unwrap().get_ids(),
            "{text}"
        );
    }
    // Importing twice gives the same bytes.
    let again = tmp.path().join("again");
    migrate(
        F::Gguf,
        F::Hf,
        &tmp.path().join("F32.gguf"),
        &again,
        &MigrateOptions::default(),
    )
    .unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn f16_gguf_imports_the_f16_values_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = import(tmp.path(), GgmlDType::F16);
    let c = Checkpoint::open(&out).unwrap();
    for (name, want) in tiny_llama() {
        let got = c.read(&name).unwrap().to_tensor().unwrap();
        let want = if want.rank() == 2 {
            want.to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        } else {
            want
        };
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{name}");
    }
}

#[test]
fn quantized_ggufs_import_within_quantization_error() {
    let tmp = tempfile::tempdir().unwrap();
    let want_logits = taper::model::forward_logits(
        &fixture("tiny-llama"),
        None,
        input_ids(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    // Largest rounding error per element, as a fraction of the tensor's largest |x|:
    // half a step (a full step where Q4_0 clamps at +7), plus the f16 rounding of the
    // block scale (and minimum) times the largest quantized magnitude.
    for (dtype, bound) in [
        (GgmlDType::Q8_0, 1.0 / 254.0 + 1.0 / 1024.0),
        (GgmlDType::Q4_0, 1.0 / 8.0 + 1.0 / 512.0),
        (GgmlDType::Q4_1, 1.0 / 15.0 + 1.0 / 256.0),
    ] {
        let out = import(tmp.path(), dtype);
        let c = Checkpoint::open(&out).unwrap();
        let mut worst = 0f64;
        for (name, want) in tiny_llama() {
            let got = c.read(&name).unwrap().to_tensor().unwrap();
            let amax = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let d = max_abs_diff(&got, &want);
            worst = worst.max(d / amax);
            assert!(
                d <= amax * bound * 1.001 + 1e-7,
                "{dtype:?} {name}: {d} > {}",
                amax * bound
            );
            if want.rank() == 2 {
                // Rows are in place: the permutation was undone, not left in.
                assert!(
                    d < max_abs_diff(&permute(&want, 2).unwrap(), &want),
                    "{name}"
                );
            }
        }
        let got = taper::model::forward_logits(&out, None, input_ids(), &Device::Cpu, DType::F32)
            .unwrap();
        eprintln!(
            "{dtype:?}: worst error {worst:.4} of max|w|; logits diff {:e}",
            max_abs_diff(&got, &want_logits)
        );
    }
}

#[test]
fn non_llama_and_garbage_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF but not really").unwrap();
    let err = migrate(
        F::Gguf,
        F::Hf,
        &bad,
        &tmp.path().join("o"),
        &MigrateOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bad.gguf") && err.contains("GGUF"), "{err}");
    assert!(!tmp.path().join("o").exists());
    let err = migrate(
        F::Gguf,
        F::Mlx,
        &bad,
        &tmp.path().join("o"),
        &MigrateOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("hf"), "{err}");
}
