#!/usr/bin/env bash
# Training tokens/s and peak RSS: taper's train stage vs PyTorch + PEFT on the bench-size
# Llama (hidden 512, intermediate 1408, 8 layers, 8 heads, vocab 8192), LoRA r 8 on q,v,
# batch 4 x 256, 2 CPU threads each. Record the numbers in BENCHMARKS.md with the
# machine, the date and this command line.
#
#   benches/train_compare.sh [steps] [threads]     (needs python3 with torch, transformers, peft)
#
# PROFILE=release builds taper optimised (slow to build); the default dev profile
# optimises dependencies (candle, gemm) but not taper itself.
set -euo pipefail
steps="${1:-10}"
threads="${2:-2}"
profile="${PROFILE:-dev}"
cd "$(dirname "$0")/.."
flags=()
[ "$profile" = release ] && flags=(--release)
cargo build "${flags[@]}" --example train_bench
target="${CARGO_TARGET_DIR:-target}"
dir=debug
[ "$profile" = release ] && dir=release
bin="$target/$dir/examples/train_bench"

echo "== taper ($profile), $threads threads"
RAYON_NUM_THREADS="$threads" /usr/bin/time -v "$bin" "$steps" 2> taper.time
grep -E "Maximum resident|Elapsed" taper.time
echo "== PyTorch + PEFT, $threads threads"
OMP_NUM_THREADS="$threads" /usr/bin/time -v python3 benches/train_torch.py "$steps" "$threads" --attn "${ATTN:-eager}" 2> torch.time
grep -E "Maximum resident|Elapsed" torch.time
rm -f taper.time torch.time
