#!/usr/bin/env bash
# Merge benchmark: an r 16 all-linear PEFT adapter into a ~1 GB f32 Llama generated here,
# with taper (examples/merge.rs, dev profile unless PROFILE=release), with PEFT
# merge_and_unload + save_pretrained (when torch, peft and transformers import), and
# against the floor: a plain read + write of the same bytes (dd). Time and peak RSS from
# /usr/bin/time -v. Usage: benches/merge_compare.sh [WORKDIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$(mktemp -d)}"
profile="${PROFILE:-dev}"
mkdir -p "$work"
[ -f "$work/base/model.safetensors" ] || python3 "$here/merge_compare.py" gen "$work"
size=$(stat -c %s "$work/base/model.safetensors")
echo "model: $size bytes of f32; machine: $(nproc) cores, $(uname -m); $(date -u +%F)"

measure() { # name, command...
  local name="$1"; shift
  rm -rf "$work/out-$name"
  /usr/bin/time -v "$@" 2> "$work/time-$name.txt" > /dev/null
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$work/time-$name.txt" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$work/time-$name.txt" | awk '{print $NF}')
  printf "%-8s wall %-10s peak RSS %6d MB (%4.1f%% of the model)\n" "$name" "$wall" \
    $((rss / 1024)) "$(echo "$rss * 1024 * 100 / $size" | bc -l)"
}

if [ "$profile" = release ]; then flag=--release; dir=release; else flag=; dir=debug; fi
cargo build $flag --example merge -q --manifest-path "$here/../Cargo.toml"
bin="${CARGO_TARGET_DIR:-$here/../target}/$dir/examples/merge"

sync
measure floor dd if="$work/base/model.safetensors" of="$work/out-floor.safetensors" bs=16M
measure taper "$bin" "$work/base" "$work/adapter" "$work/out-taper"
if python3 -c "import torch, peft, transformers" 2>/dev/null; then
  measure peft python3 "$here/merge_compare.py" peft "$work" "$work/out-peft"
else
  echo "peft     skipped: torch, peft and transformers are not importable here"
fi
