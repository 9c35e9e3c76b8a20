//! Parse + plan of generated pipelines with 1,000 and 10,000 `command` stages, all up to
//! date (the cost of `taper plan` / `taper status` / the start of `taper run`).
//!
//! The workspace is prepared once per size: inputs written, outputs written, and a
//! success row per stage appended to the ledger with the fingerprint the planner computes,
//! exactly as `taper run` would leave it.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use taper::plan::{check_stage, make_plan, Action, History, PlanOptions};
use taper::state::{FileHash, HashCache, Layout, Ledger, StageRunRow};

/// The `taper` binary's global allocator (`CacheAligned`).
#[global_allocator]
static ALLOC: taper::model::device::CacheAligned = taper::model::device::CacheAligned;

/// Writes a pipeline of `n` command stages: each reads its own input and, every tenth
/// stage, the previous stage's output; each writes one output.
fn generate(root: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(root.join("data")).expect("mkdir");
    std::fs::create_dir_all(root.join("out")).expect("mkdir");
    let mut y = String::from("version: 1\nname: generated\nparams: {tag: v1}\nstages:\n");
    for i in 0..n {
        std::fs::write(
            root.join(format!("data/in_{i}.txt")),
            format!("input {i}\n"),
        )
        .expect("write");
        let extra = if i % 10 == 9 {
            format!(", out/o_{}.txt", i - 1)
        } else {
            String::new()
        };
        let _ = write!(
            y,
            "  s{i}:\n    kind: command\n    inputs: [data/in_{i}.txt{extra}]\n    outputs: [out/o_{i}.txt]\n    with: {{run: \"cp data/in_{i}.txt out/o_{i}.txt # ${{params.tag}}\"}}\n"
        );
    }
    let file = root.join("pipeline.yaml");
    std::fs::write(&file, y).expect("write");
    file
}

/// Makes every stage up to date, as a completed `taper run` would.
fn record_success(root: &Path, file: &Path) {
    let layout = Layout::new(root);
    let loaded = taper::cli::load::load(file, &[], Some(root)).expect("valid pipeline");
    let mut cache = HashCache::load(&layout);
    let history = History::default();
    let mut rows = Vec::new();
    for &i in &loaded.dag.order {
        let s = &loaded.pipeline.stages[i];
        let out = &s.outputs[0].path;
        std::fs::copy(root.join(&s.inputs[0].path), root.join(out)).expect("copy");
        let c = check_stage(s, 1, &history, &mut cache, root);
        let h = cache.hash_path(&root.join(out)).expect("hash");
        rows.push(StageRunRow {
            run_id: "setup".into(),
            stage: s.name.clone(),
            kind: "command".into(),
            fingerprint: c.fingerprint,
            config_hash: c.config_hash,
            status: "success".into(),
            reason: "never run".into(),
            attempt: 1,
            started_at: 0,
            ended_at: Some(0),
            inputs: c.inputs,
            outputs: vec![FileHash {
                path: out.clone(),
                hash: h.hash,
                bytes: h.bytes,
            }],
            error: None,
        });
    }
    Ledger::new(&layout).append(&rows).expect("ledger");
    cache.save(&layout).expect("cache");
}

fn parse_and_plan(root: &Path, file: &Path) -> usize {
    let layout = Layout::new(root);
    let loaded = taper::cli::load::load(file, &[], Some(root)).expect("valid pipeline");
    let history = History::load(&Ledger::new(&layout)).expect("ledger");
    let mut cache = HashCache::load(&layout);
    let plan = make_plan(
        &loaded.pipeline,
        &loaded.dag,
        &history,
        &mut cache,
        root,
        &PlanOptions::default(),
    )
    .expect("plan");
    plan.steps
        .iter()
        .filter(|s| s.action == Action::Skip)
        .count()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_and_plan_up_to_date");
    group.sample_size(10);
    for n in [1_000usize, 10_000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = generate(dir.path(), n);
        record_success(dir.path(), &file);
        assert_eq!(
            parse_and_plan(dir.path(), &file),
            n,
            "every stage must be up to date"
        );
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| parse_and_plan(dir.path(), &file))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
