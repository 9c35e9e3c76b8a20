//! Benchmarks of inference: the sampling operations on vocabulary-sized logits (greedy,
//! temperature, top-k, top-p, repetition penalty), the bench-size Llama's forward (a
//! 128-token prefill, one KV-cache step after 128 cached positions) and tokens/s of
//! KV-cache generation. The model is hidden 512, intermediate 1408, 8 layers, 8 heads,
//! vocab 8192, random weights. Run with `cargo bench --bench generate`; the
//! `generate` group reports tokens/s as elements/s.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use taper::model::sampling::{apply_repetition_penalty, argmax, distribution};
use taper::model::{generate, GenerateOptions, LogitsAt, Sampler, SamplingConfig};

mod util;

use util::bench_llama;

const VOCABS: [usize; 2] = [8192, 32000];

fn logits(n: usize) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    (0..n).map(|_| rng.random_range(-8.0f32..8.0)).collect()
}

fn sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("sampling");
    let cfg = |temperature, top_k, top_p| SamplingConfig {
        temperature,
        top_k,
        top_p,
        repetition_penalty: 1.0,
    };
    for v in VOCABS {
        let l = logits(v);
        group.bench_with_input(BenchmarkId::new("greedy", v), &l, |b, l| {
            b.iter(|| argmax(l))
        });
        for (name, c) in [
            ("temperature", cfg(0.7, None, None)),
            ("top_k_50", cfg(0.7, Some(50), None)),
            ("top_p_0.9", cfg(0.7, None, Some(0.9))),
            ("top_k_50_top_p_0.9", cfg(0.7, Some(50), Some(0.9))),
        ] {
            group.bench_with_input(BenchmarkId::new(name, v), &l, |b, l| {
                b.iter(|| distribution(l, &c))
            });
        }
        let history: Vec<u32> = (0..256u32).map(|i| (i * 31) % v as u32).collect();
        group.bench_with_input(BenchmarkId::new("repetition_penalty_256", v), &l, |b, l| {
            b.iter_batched(
                || l.clone(),
                |mut l| apply_repetition_penalty(&mut l, &history, 1.1),
                criterion::BatchSize::SmallInput,
            )
        });
        let mut sampler = Sampler::new(cfg(0.7, Some(50), Some(0.9)), 1);
        group.bench_with_input(BenchmarkId::new("sample_top_k_top_p", v), &l, |b, l| {
            b.iter_batched(
                || l.clone(),
                |mut l| sampler.sample(&mut l, &[]),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|t| (t * 37 + 11) % 8192).collect()
}

fn model_forward(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let model = bench_llama(dir.path());
    let mut group = c.benchmark_group("llama_h512_l8");
    let prompt = Tensor::from_vec(ids(128), (1, 128), &Device::Cpu).unwrap();
    group.throughput(Throughput::Elements(128));
    group.bench_function("forward_1x128", |b| {
        b.iter(|| model.forward(&prompt, None, false).unwrap())
    });
    group.bench_function("prefill_1x128_last_logits", |b| {
        b.iter(|| {
            let mut cache = model.new_cache();
            model
                .forward_cached(&prompt, &mut cache, LogitsAt::Last)
                .unwrap()
        })
    });
    group.throughput(Throughput::Elements(1));
    let one = Tensor::from_vec(vec![5u32], (1, 1), &Device::Cpu).unwrap();
    group.bench_function("decode_step_after_128", |b| {
        b.iter_batched(
            || {
                let mut cache = model.new_cache();
                model
                    .forward_cached(&prompt, &mut cache, LogitsAt::Last)
                    .unwrap();
                cache
            },
            |mut cache| {
                model
                    .forward_cached(&one, &mut cache, LogitsAt::Last)
                    .unwrap()
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn generation(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let model = bench_llama(dir.path());
    let prompt = ids(16);
    let mut group = c.benchmark_group("generate");
    for new in [32usize, 128] {
        group.throughput(Throughput::Elements(new as u64));
        for (name, sampling) in [
            ("greedy", SamplingConfig::default()),
            (
                "top_p_0.9",
                SamplingConfig {
                    temperature: 0.7,
                    top_p: Some(0.9),
                    ..SamplingConfig::default()
                },
            ),
        ] {
            let opts = GenerateOptions {
                max_new_tokens: new,
                sampling,
                seed: 1,
                stop_tokens: vec![],
            };
            group.bench_function(BenchmarkId::new(name, new), |b| {
                b.iter(|| generate(&model, &prompt, &opts).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = util::config();
    targets = sampling, model_forward, generation
}
criterion_main!(benches);
