#!/usr/bin/env bash
# taper built with --features cuda, checked on a CUDA GPU against the reference logits of
# tests/fixtures (made by transformers + peft on the CPU): tiny-llama base, tiny-llama +
# PEFT adapter (unmerged), tiny-qwen2 base, each in f32 and bf16. Prints the max absolute
# difference per case; the CPU build matches these to 1e-4 in the tests.
#
#   benches/cuda_check.sh BIN_DIR       (BIN_DIR holds the CUDA `taper` binary)
#
# Needs python3 with torch and safetensors (only to read the files).
set -euo pipefail
taper="$1/taper"
cd "$(dirname "$0")/.."
fx=tests/fixtures
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run() { # model adapter dtype
  local extra=() which=base
  if [ -n "$2" ]; then extra=(--adapter "$2"); which=adapter; fi
  "$taper" forward --model "$1" "${extra[@]}" --input-ids $fx/expected/input_ids.json \
    --out "$work/$3-$(basename "$1")-$which.safetensors" --device cuda --dtype "$3"
}
for dtype in f32 bf16; do
  run $fx/tiny-llama "" $dtype
  run $fx/tiny-llama $fx/peft-adapter-llama $dtype
  run $fx/tiny-qwen2 "" $dtype
done
python3 - "$work" <<'PY'
import sys
from safetensors.torch import load_file
w = sys.argv[1]
ref_l = load_file("tests/fixtures/expected/logits_llama.safetensors")
ref_q = load_file("tests/fixtures/expected/logits_qwen2.safetensors")
cases = [("tiny-llama base", "tiny-llama-base", ref_l["base"]),
         ("tiny-llama + PEFT adapter", "tiny-llama-adapter", ref_l["peft_adapter"]),
         ("tiny-qwen2 base", "tiny-qwen2-base", ref_q["base"])]
for dtype in ["f32", "bf16"]:
    for name, f, ref in cases:
        got = load_file(f"{w}/{dtype}-{f}.safetensors")["logits"]
        d = (got - ref).abs().max().item()
        print(f"cuda {dtype:4} {name:28} max |logits - reference| = {d:.3e}")
PY
