//! Runs the tokenize stage on its own, outside a pipeline: a driver for benchmarks and manual
//! checks until the `taper` CLI can run a tokenize stage by itself.
//!
//! ```text
//! cargo run --release --example tokenize_corpus -- WITH.yaml WORKSPACE OUT_DIR [THREADS]
//! ```
//!
//! `WITH.yaml` holds the stage's `with:` block; its paths are relative to `WORKSPACE`.
//! Prints the summary as JSON on stdout and `tokens/s` on stderr.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use taper::stages::tokenize::{self, TokenizeConfig};

/// The `taper` binary's global allocator (`CacheAligned`).
#[global_allocator]
static ALLOC: taper::model::device::CacheAligned = taper::model::device::CacheAligned;

fn main() -> anyhow::Result<()> {
    // As the taper binary does (the tokenize stage runs in it).
    taper::model::device::keep_freed_buffers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, workspace, out, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: tokenize_corpus WITH.yaml WORKSPACE OUT_DIR [THREADS]");
    };
    let cfg: TokenizeConfig = serde_saphyr::from_str(&std::fs::read_to_string(config)?)?;
    let threads = match rest.first() {
        Some(n) => n.parse()?,
        None => 0, // rayon's default: one per core
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let cancel = AtomicBool::new(false);
    let start = Instant::now();
    let summary = pool
        .install(|| tokenize::run(&cfg, Path::new(workspace), Path::new(out), &|_| {}, &cancel))?;
    let secs = start.elapsed().as_secs_f64();
    let tokens = summary.train.tokens + summary.valid.tokens;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!(
        "taper tokenize: {tokens} tokens in {secs:.2} s = {:.0} tokens/s ({} threads)",
        tokens as f64 / secs,
        pool.current_num_threads()
    );
    Ok(())
}
