//! Generation: KV-cache decoding gives the logits of a full forward over the growing
//! sequence, greedy decoding with an adapter unmerged equals the merged model (PEFT and
//! mlx-lm fixtures), seeds reproduce samples, stop tokens stop, and `taper generate`
//! prints the text alone.

mod model_util;

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use model_util::{fixture, input_ids, max_abs_diff};
use taper::formats::read_adapter;
use taper::model::sampling::argmax;
use taper::model::{
    attach_adapter, generate, load_model, GenerateOptions, Llama, LogitsAt, SamplingConfig,
    StopCause, TextTokenizer,
};

fn model(name: &str, adapter: Option<&str>) -> Llama {
    let mut m = load_model(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    if let Some(a) = adapter {
        attach_adapter(&mut m, &read_adapter(&fixture(a)).unwrap(), None).unwrap();
    }
    m
}

fn ids(rows: &[Vec<u32>]) -> Tensor {
    taper::model::ids_tensor(rows, 512, &Device::Cpu).unwrap()
}

/// Prefill `prefill` tokens, then one token per step; every step's logits against a
/// full forward over the sequence so far. Returns the largest difference seen.
fn cache_vs_full(m: &Llama, prefill: usize) -> f64 {
    let rows = input_ids();
    let full_all = m.forward(&ids(&rows), None, false).unwrap();
    let mut cache = m.new_cache();
    let head: Vec<Vec<u32>> = rows.iter().map(|r| r[..prefill].to_vec()).collect();
    let got = m
        .forward_cached(&ids(&head), &mut cache, LogitsAt::All)
        .unwrap();
    let mut worst = max_abs_diff(&got, &full_all.narrow(1, 0, prefill).unwrap());
    for t in prefill..rows[0].len() {
        let step: Vec<Vec<u32>> = rows.iter().map(|r| vec![r[t]]).collect();
        let got = m
            .forward_cached(&ids(&step), &mut cache, LogitsAt::Last)
            .unwrap();
        let grown: Vec<Vec<u32>> = rows.iter().map(|r| r[..=t].to_vec()).collect();
        let full = m.forward(&ids(&grown), None, false).unwrap();
        let want = full.narrow(1, t, 1).unwrap();
        worst = worst.max(max_abs_diff(&got, &want));
        assert_eq!(cache.seq_len(), t + 1);
    }
    worst
}

#[test]
fn kv_cache_steps_match_a_full_forward_over_the_growing_sequence() {
    for (name, adapter) in [
        ("tiny-llama", None),
        ("tiny-llama", Some("peft-adapter-llama")),
        ("tiny-llama", Some("mlx-adapter-llama")),
        ("tiny-qwen2", None),
    ] {
        let m = model(name, adapter);
        for prefill in [1, 5] {
            let d = cache_vs_full(&m, prefill);
            eprintln!("{name} + {adapter:?}, prefill {prefill}: max |diff| {d:e}");
            assert!(d <= 1e-5, "{name} {adapter:?} prefill {prefill}: {d}");
        }
    }
}

#[test]
fn last_only_logits_equal_the_last_of_all() {
    let m = model("tiny-llama", None);
    let rows = input_ids();
    let all = m
        .forward_cached(&ids(&rows), &mut m.new_cache(), LogitsAt::All)
        .unwrap();
    let last = m
        .forward_cached(&ids(&rows), &mut m.new_cache(), LogitsAt::Last)
        .unwrap();
    assert_eq!(max_abs_diff(&last, &all.narrow(1, 15, 1).unwrap()), 0.0);
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        ..GenerateOptions::default()
    }
}

#[test]
fn greedy_generation_equals_argmax_of_full_forwards() {
    let m = model("tiny-llama", Some("peft-adapter-llama"));
    let prompt = input_ids()[0][..6].to_vec();
    let out = generate(&m, &prompt, &greedy(12)).unwrap();
    let mut seq = prompt.clone();
    for _ in 0..12 {
        let logits = m.forward(&ids(&[seq.clone()]), None, false).unwrap();
        let last = logits
            .narrow(1, seq.len() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        seq.push(argmax(&last));
    }
    assert_eq!(out.tokens, seq[6..]);
    assert_eq!(out.stop, StopCause::MaxNewTokens);
}

#[test]
fn unmerged_and_merged_adapters_generate_the_same_greedy_tokens() {
    for (adapter, merged) in [
        ("peft-adapter-llama", "peft-merged-llama"),
        ("mlx-adapter-llama", "mlx-fused-llama"),
    ] {
        let unmerged = model("tiny-llama", Some(adapter));
        let merged = model(merged, None);
        let base = model("tiny-llama", None);
        for row in input_ids() {
            let prompt = &row[..4];
            let a = generate(&unmerged, prompt, &greedy(40)).unwrap();
            let b = generate(&merged, prompt, &greedy(40)).unwrap();
            assert_eq!(a.tokens.len(), 40);
            assert_eq!(a.tokens, b.tokens, "{adapter}");
            // ... and the adapter matters: the base alone says something else.
            let c = generate(&base, prompt, &greedy(40)).unwrap();
            assert_ne!(a.tokens, c.tokens, "{adapter}");
        }
    }
}

#[test]
fn a_seed_reproduces_a_sample_and_top_k_one_is_greedy() {
    let m = model("tiny-llama", Some("peft-adapter-llama"));
    let prompt = input_ids()[1][..3].to_vec();
    let sampled = |seed| {
        let opts = GenerateOptions {
            max_new_tokens: 24,
            sampling: SamplingConfig {
                temperature: 1.0,
                top_k: Some(100),
                top_p: Some(0.95),
                repetition_penalty: 1.1,
            },
            seed,
            stop_tokens: vec![],
        };
        generate(&m, &prompt, &opts).unwrap().tokens
    };
    assert_eq!(sampled(5), sampled(5));
    assert_ne!(sampled(5), sampled(6));
    let top1 = GenerateOptions {
        max_new_tokens: 24,
        sampling: SamplingConfig {
            temperature: 1.3,
            top_k: Some(1),
            ..SamplingConfig::default()
        },
        seed: 9,
        stop_tokens: vec![],
    };
    assert_eq!(
        generate(&m, &prompt, &top1).unwrap().tokens,
        generate(&m, &prompt, &greedy(24)).unwrap().tokens
    );
}

#[test]
fn generation_stops_at_a_stop_token() {
    let m = model("tiny-llama", None);
    let prompt = input_ids()[0][..4].to_vec();
    let free = generate(&m, &prompt, &greedy(10)).unwrap().tokens;
    let first_of_third = free.iter().position(|&t| t == free[2]).unwrap();
    let opts = GenerateOptions {
        stop_tokens: vec![free[2]],
        ..greedy(10)
    };
    let out = generate(&m, &prompt, &opts).unwrap();
    assert_eq!(out.stop, StopCause::Eos);
    assert_eq!(out.tokens, free[..first_of_third]);
}

#[test]
fn the_tokenizer_adds_bos_and_knows_eos() {
    let t = TextTokenizer::from_model_dir(&fixture("tiny-llama")).unwrap();
    assert_eq!(t.bos, Some(1));
    assert_eq!(t.stop, vec![2]);
    let ids = t.encode_prompt("Permission is hereby", None).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(&ids[1..4], &input_ids()[0][..3]);
    assert_eq!(t.decode(&ids).unwrap(), "Permission is hereby");
}

#[test]
fn add_bos_token_false_means_no_bos_before_the_prompt() {
    // As SmolLM2's GGUF import writes it: BOS named, but not put before text.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-llama/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false}"#,
    )
    .unwrap();
    let t = TextTokenizer::from_model_dir(dir.path()).unwrap();
    assert_eq!(t.bos, None);
    assert_eq!(t.stop, vec![2]);
    let ids = t.encode_prompt("Permission is hereby", None).unwrap();
    assert_eq!(&ids[..3], &input_ids()[0][..3]);
}

fn taper(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_taper"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn taper_generate_prints_the_generated_text_alone() {
    let model_dir = fixture("tiny-llama");
    let adapter_dir = fixture("peft-adapter-llama");
    let (m, a) = (model_dir.to_str().unwrap(), adapter_dir.to_str().unwrap());
    let args = [
        "generate",
        "--model",
        m,
        "--adapter",
        a,
        "--prompt",
        "Permission is",
        "--max-new-tokens",
        "12",
    ];
    let out = taper(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // The library's greedy tokens, decoded, and nothing else.
    let t = TextTokenizer::from_model_dir(&model_dir).unwrap();
    let prompt = t.encode_prompt("Permission is", None).unwrap();
    let want = generate(
        &model("tiny-llama", Some("peft-adapter-llama")),
        &prompt,
        &greedy(12),
    )
    .unwrap();
    assert_eq!(text, format!("{}\n", t.decode(&want.tokens).unwrap()));

    let sampled = |seed: &str| {
        let mut v = args.to_vec();
        v.extend([
            "--temperature",
            "0.9",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--chat",
        ]);
        let out = taper(&v);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    assert_eq!(sampled("3"), sampled("3"));

    let bad = taper(&["generate", "--model", m, "--prompt", "x", "--top-p", "2"]);
    assert_eq!(bad.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("top_p"));
}
