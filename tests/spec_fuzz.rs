//! A seeded mutation fuzzer for the spec loader that runs on stable Rust, beside the
//! cargo-fuzz target in `fuzz/`: it mutates valid and invalid pipeline files and checks
//! that loading, configuring and building the DAG never panic.
//!
//! `cargo test --test spec_fuzz` runs a short, deterministic round. For a long run:
//! `TAPER_FUZZ_SECS=300 TAPER_FUZZ_SEED=7 cargo test --test spec_fuzz -- --nocapture`.
//! A panicking input is written to `$TMPDIR/taper-fuzz-crash-*.yaml`.

mod util;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Fragments that matter to the loader, spliced into documents.
const TOKENS: &[&str] = &[
    ":",
    ": ",
    "- ",
    "\n",
    "\n  ",
    "\n    ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\"",
    "'",
    "#",
    "&a ",
    "*a",
    "<<: *a",
    "!!str ",
    "!!int ",
    "~",
    "null",
    "true",
    "-1",
    "0",
    "1e400",
    "4294967296",
    "${",
    "${params.",
    "${params.lr}",
    "${item}",
    "${item.lr}",
    "${key}",
    "$${x}",
    "}",
    "kind: command",
    "kind: train",
    "needs: [a]",
    "needs: [b, a]",
    "inputs: [a.txt]",
    "outputs: [a.txt]",
    "outputs: [a]",
    "inputs: [../x]",
    "outputs: [/abs]",
    "foreach: [x, y]",
    "foreach: {p: 1, q: 2}",
    "matrix: {lr: [1, 2], r: [3]}",
    "matrix: {}",
    "retries: 3",
    "timeout: 1s",
    "timeout: 5 fortnights",
    "backoff: -1",
    "resources: {gpu: 2}",
    "with: {run: \"x\"}",
    "with: {run: [1]}",
    "version: 1",
    "version: 1.5",
    "name: x",
    "params: {lr: 0.1, nested: {a: [1, 2]}}",
    "stages:",
    "a@b",
    "é",
    "\t",
    "\r\n",
    "---",
    "...",
    "|\n  text",
    ">-\n  folded",
    "? complex\n: key",
];

const SEEDS: &[&str] = &[
    "version: 1\nname: t\nparams:\n  lr: 0.1\n  lrs: [1, 2]\nresources:\n  gpu: 1\nstages:\n  a:\n    kind: command\n    outputs: [a.txt]\n    with: {run: \"echo ${params.lr} > a.txt\"}\n  b:\n    kind: command\n    needs: [a]\n    inputs: [a.txt]\n    outputs: [b/out]\n    retries: 2\n    backoff: 1s\n    timeout: 5m\n    resources: {gpu: 1}\n    with:\n      run: \"cat a.txt\"\n      env: {X: \"1\"}\n  sweep:\n    kind: command\n    matrix: {lr: \"${params.lrs}\", r: [8, 16]}\n    inputs: [b/out]\n    outputs: [\"s/${item.lr}-${item.r}\"]\n    with: {run: \"echo ${item.lr}\"}\n  each:\n    kind: command\n    foreach: {x: 1, y: 2}\n    needs: [sweep]\n    with: {run: \"echo ${key}=${item}\"}\n",
    "version: 1\nname: cycle\nstages:\n  a:\n    kind: command\n    needs: [c]\n  b:\n    kind: command\n    needs: [a]\n    outputs: [x]\n  c:\n    kind: command\n    inputs: [x]\n",
    "version: 1\nname: anchors\nbase: &b {kind: command}\nstages:\n  a: *b\n  b:\n    <<: *b\n    needs: [a]\n",
];

fn load_everything(text: &str) {
    let file = Path::new("fuzz.yaml");
    if let Ok(p) = taper::spec::load_str(file, text, &[]) {
        for s in &p.stages {
            let _ = taper::stages::configure(file, s);
        }
        if let Ok(dag) = taper::plan::Dag::build(&p) {
            assert_eq!(dag.order.len(), p.stages.len(), "toposort lost stages");
        }
    }
    let _ = taper::spec::load_str(file, text, &["lr=2".into(), "nested.a=[3]".into()]);
}

fn corpus() -> Vec<String> {
    let mut docs: Vec<String> = SEEDS.iter().map(|s| s.to_string()).collect();
    let invalid = util::tests_dir().join("invalid");
    for e in std::fs::read_dir(invalid).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            docs.push(std::fs::read_to_string(p).unwrap());
        }
    }
    docs
}

/// Cuts at a char boundary at or before `i`.
fn floor(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn mutate(rng: &mut Rng, doc: &str, corpus: &[String]) -> String {
    let mut s = doc.to_string();
    for _ in 0..1 + rng.below(4) {
        let a = floor(&s, rng.below(s.len() + 1));
        let b = floor(&s, a + rng.below(24));
        match rng.below(7) {
            0 => s.insert_str(a, TOKENS[rng.below(TOKENS.len())]),
            1 => s.replace_range(a..b, ""),
            2 => {
                let piece = s[a..b].to_string();
                let at = floor(&s, rng.below(s.len() + 1));
                s.insert_str(at, &piece);
            }
            3 => s.replace_range(a..b, TOKENS[rng.below(TOKENS.len())]),
            4 => {
                // Splice lines of another document.
                let other = &corpus[rng.below(corpus.len())];
                let lines: Vec<&str> = other.lines().collect();
                let from = rng.below(lines.len());
                let to = (from + 1 + rng.below(4)).min(lines.len());
                let at = floor(&s, rng.below(s.len() + 1));
                s.insert_str(at, &(lines[from..to].join("\n") + "\n"));
            }
            5 => {
                // Re-indent a line.
                let at = floor(&s, rng.below(s.len() + 1));
                let start = s[..at].rfind('\n').map(|i| i + 1).unwrap_or(0);
                s.insert_str(start, &" ".repeat(1 + rng.below(4)));
            }
            _ => {
                let c = char::from_u32(rng.below(0x80) as u32).unwrap_or('x');
                s.insert(a, c);
            }
        }
    }
    s
}

#[test]
fn mutated_pipelines_never_panic_the_loader() {
    let seed: u64 = std::env::var("TAPER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7a9e_2026);
    let budget = std::env::var("TAPER_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);
    let iterations = if budget.is_some() { u64::MAX } else { 3000 };
    let corpus = corpus();
    let mut rng = Rng(seed | 1);
    // Keep interesting mutants (those that still load) as further seeds.
    let mut pool = corpus.clone();
    let start = Instant::now();
    let mut runs = 0u64;
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut crash = None;
    while runs < iterations && budget.is_none_or(|b| start.elapsed() < b) {
        let base = &pool[rng.below(pool.len())];
        let doc = mutate(&mut rng, base, &corpus);
        runs += 1;
        if catch_unwind(AssertUnwindSafe(|| load_everything(&doc))).is_err() {
            crash = Some(doc);
            break;
        }
        if pool.len() < 4096 && taper::spec::load_str(Path::new("f.yaml"), &doc, &[]).is_ok() {
            pool.push(doc);
        }
    }
    std::panic::set_hook(hook);
    if let Some(doc) = crash {
        let path = std::env::temp_dir().join(format!("taper-fuzz-crash-{seed}-{runs}.yaml"));
        std::fs::write(&path, &doc).unwrap();
        // Panic again, with the hook back, to show the message.
        load_everything(&doc);
        panic!("input {} panicked (saved to {})", runs, path.display());
    }
    println!(
        "spec fuzz: {runs} inputs, no panic (seed {seed}, {:.1}s, {} loadable mutants kept)",
        start.elapsed().as_secs_f64(),
        pool.len() - corpus.len()
    );
}
