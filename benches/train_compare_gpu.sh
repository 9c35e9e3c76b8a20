#!/usr/bin/env bash
# Training tokens/s and peak GPU memory on one CUDA GPU: taper (built with --features cuda)
# vs PyTorch eager + PEFT, same model and batch: a random-weight Llama with hidden 2048,
# intermediate 5632, 16 layers, 32 heads (4 key/value heads), vocab 32000, batch 8 x 1024,
# bf16, LoRA r 8 on q,v. PyTorch runs twice: with transformers' eager attention (matmul +
# softmax, as taper computes it) and with its default fused `sdpa` attention.
#
#   benches/train_compare_gpu.sh BIN_DIR [steps]
#
# BIN_DIR holds `train_bench`, built with
#   cargo build --release --features cuda --example train_bench
# (see README, "CUDA"). Needs python3 with torch, transformers and peft, and nvidia-smi.
set -uo pipefail
bin="$1/train_bench"
steps="${2:-8}"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# BATCHES (default "8 4 2") are run in turn, each with sequence length 1024: where one
# side runs out of GPU memory it says so and the next batch size is tried.
for b in ${BATCHES:-8 4 2}; do
  echo "#### batch $b x 1024 ($(date -u +%T))"
  # Peak GPU memory of taper: the highest `memory.used` nvidia-smi reports while it runs
  # (the CUDA context included; PyTorch's figure is its allocator's peak, without it).
  mem=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$mem" &
  smi=$!
  echo "== taper (cuda, bf16)"
  "$bin" "$steps" --size gpu --device cuda --dtype bf16 --batch "$b" 2>&1 | grep -v '^ *[0-9]*: ' || true
  kill "$smi"
  echo "taper peak GPU memory $(sort -n "$mem" | tail -1) MiB (nvidia-smi, sampled every 200 ms)"
  rm -f "$mem"
  for attn in eager sdpa; do
    echo "== PyTorch + PEFT (cuda, bf16, attention $attn) ($(date -u +%T))"
    python3 benches/train_torch.py "$steps" 16 --size gpu --device cuda --dtype bf16 \
      --attn "$attn" --batch "$b" 2>&1 | tail -1 || true
  done
done
