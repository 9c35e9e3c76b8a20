//! Throughput of the tokenize stage end to end (read JSONL, tokenize, pack, write Parquet)
//! on a small generated corpus with the tiny-llama fixture tokenizer.
//!
//! `cargo bench --bench tokenize`. For the comparison with Python `tokenizers` on a real
//! 100 MB corpus and a 32k vocabulary, see `benches/tokenize_compare.sh`.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use taper::stages::tokenize::{self, TokenizeConfig};

/// The `taper` binary's global allocator (`CacheAligned`).
#[global_allocator]
static ALLOC: taper::model::device::CacheAligned = taper::model::device::CacheAligned;

/// About `bytes` of JSONL text, generated deterministically from a word list.
fn corpus(bytes: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "adapter",
        "learns",
        "a",
        "low",
        "rank",
        "update",
        "while",
        "base",
        "weights",
        "stay",
        "frozen",
        "and",
        "gradients",
        "flow",
        "only",
        "through",
        "small",
        "matrices",
        "tokenization",
        "packs",
        "examples",
        "into",
        "rows",
        "of",
        "fixed",
        "length",
        "café",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut out = String::with_capacity(bytes + 1024);
    while out.len() < bytes {
        let mut line = String::new();
        let n = 8 + (state >> 60) as usize * 6;
        for _ in 0..n {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
        }
        out.push_str(&serde_json::json!({ "text": line }).to_string());
        out.push('\n');
    }
    out
}

fn bench(c: &mut Criterion) {
    let ws = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    std::fs::create_dir_all(ws.path().join("tok")).unwrap();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(name), ws.path().join("tok").join(name)).unwrap();
    }
    let data = corpus(4 << 20);
    std::fs::write(ws.path().join("data.jsonl"), &data).unwrap();
    let cfg: TokenizeConfig = serde_saphyr::from_str(
        "tokenizer: tok/tokenizer.json\nsource: {path: data.jsonl}\nseq_len: 512\nsplit: {valid: 0.05}\n",
    )
    .unwrap();
    let mut group = c.benchmark_group("tokenize");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(data.len() as u64));
    let mut run = 0;
    group.bench_function("jsonl_4MiB_end_to_end", |b| {
        b.iter(|| {
            run += 1;
            let out = ws.path().join(format!("out{run}"));
            tokenize::run(&cfg, ws.path(), &out, &|_| {}, &AtomicBool::new(false)).unwrap();
            std::fs::remove_dir_all(out).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
