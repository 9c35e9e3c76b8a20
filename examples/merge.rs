//! Drives `taper::formats::merge` from the command line, for the merge benchmark:
//! `cargo run --example merge -- BASE ADAPTER OUT [peft|mlx] [SHARD_BYTES]`.

use std::path::PathBuf;
use std::process::ExitCode;

use taper::formats::{merge, Rounding, DEFAULT_SHARD_SIZE};

/// The `taper` binary's global allocator (`CacheAligned`).
#[global_allocator]
static ALLOC: taper::model::device::CacheAligned = taper::model::device::CacheAligned;

fn main() -> ExitCode {
    // As the taper binary does (the merge stage runs in it).
    taper::model::device::keep_freed_buffers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: merge BASE ADAPTER OUT [peft|mlx] [SHARD_BYTES]");
        return ExitCode::from(2);
    }
    let rounding: Rounding = match args.get(3).map(|s| s.parse()).unwrap_or(Ok(Rounding::Peft)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let shard = args
        .get(4)
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SHARD_SIZE);
    let start = std::time::Instant::now();
    match merge(
        &PathBuf::from(&args[0]),
        &PathBuf::from(&args[1]),
        &PathBuf::from(&args[2]),
        rounding,
        shard,
    ) {
        Ok(report) => {
            println!("{report:?} in {:.2}s", start.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
