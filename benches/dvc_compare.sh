#!/usr/bin/env bash
# taper vs DVC on the same 1,000-stage pipeline, all stages up to date:
# times `taper status` against `dvc status` and prints the ratio.
#
#   bash benches/dvc_compare.sh [N_STAGES]      (default 1000)
#
# Needs: a release build of taper (built here if missing; TAPER=path to use another) and
# DVC from PyPI (installed into a virtualenv under target/bench-venv if missing; VENV=path
# to use another). Both tools first bring every stage up to date; only the up-to-date check
# is timed, best of 5, on the same machine and files. taper runs the pipeline (`taper run`).
# For DVC, `dvc repro` slows down superlinearly with the stage count (446 of 1,000 stages
# took 6.5 min here), so by default the script runs the stage commands itself and records
# them with `dvc commit -f`, which writes the same dvc.lock and cache; DVC_SETUP=repro uses
# `dvc repro` instead.
set -euo pipefail
N=${1:-1000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TAPER=${TAPER:-$TARGET/release/taper}
if [ ! -x "$TAPER" ]; then (cd "$ROOT" && cargo build --release --bin taper); fi
VENV=${VENV:-$TARGET/bench-venv}
if [ ! -x "$VENV/bin/dvc" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q dvc
fi
DVC=$VENV/bin/dvc

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/taper/data" "$WORK/dvc/data"
{
  echo "version: 1"; echo "name: generated"; echo "stages:"
} > "$WORK/taper/pipeline.yaml"
echo "stages:" > "$WORK/dvc/dvc.yaml"
for i in $(seq 0 $((N - 1))); do
  echo "input $i" > "$WORK/taper/data/in_$i.txt"
  echo "input $i" > "$WORK/dvc/data/in_$i.txt"
  extra=""; dvc_extra=""
  if [ $((i % 10)) -eq 9 ]; then extra=", out/o_$((i - 1)).txt"; dvc_extra="      - out/o_$((i - 1)).txt"$'\n'; fi
  printf '  s%d:\n    kind: command\n    inputs: [data/in_%d.txt%s]\n    outputs: [out/o_%d.txt]\n    with: {run: "mkdir -p out && cp data/in_%d.txt out/o_%d.txt"}\n' \
    "$i" "$i" "$extra" "$i" "$i" "$i" >> "$WORK/taper/pipeline.yaml"
  printf '  s%d:\n    cmd: mkdir -p out && cp data/in_%d.txt out/o_%d.txt\n    deps:\n      - data/in_%d.txt\n%s    outs:\n      - out/o_%d.txt\n' \
    "$i" "$i" "$i" "$i" "$dvc_extra" "$i" >> "$WORK/dvc/dvc.yaml"
done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "taper: $("$TAPER" --version)   dvc: $("$DVC" --version)"

(cd "$WORK/taper" && "$TAPER" run pipeline.yaml --jobs 2 > /dev/null 2>&1)
if [ "${DVC_SETUP:-commit}" = repro ]; then
  (cd "$WORK/dvc" && git init -q && "$DVC" init -q && "$DVC" config core.autostage false && "$DVC" repro -q > /dev/null 2>&1)
else
  (cd "$WORK/dvc" && git init -q && "$DVC" init -q && "$DVC" config core.autostage false \
    && mkdir -p out && for i in $(seq 0 $((N - 1))); do cp "data/in_$i.txt" "out/o_$i.txt"; done \
    && "$DVC" commit -f -q > /dev/null 2>&1)
fi

best() { # best wall time in seconds of 5 runs of "$@"
  local b=999999
  for _ in 1 2 3 4 5; do
    local s e; s=$(date +%s.%N); "$@" > /dev/null 2>&1; e=$(date +%s.%N)
    b=$(python3 -c "print(min($b, $e - $s))")
  done
  echo "$b"
}
t_taper=$(cd "$WORK/taper" && best "$TAPER" status pipeline.yaml)
t_dvc=$(cd "$WORK/dvc" && best "$DVC" status)
# Sanity: both must report everything up to date.
(cd "$WORK/taper" && "$TAPER" plan pipeline.yaml | tail -1)
(cd "$WORK/dvc" && "$DVC" status | tail -1)
python3 - "$N" "$t_taper" "$t_dvc" <<'PY'
import sys
n, t, d = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
print(f"{n} stages up to date: taper status {t*1000:.0f} ms, dvc status {d*1000:.0f} ms, taper is {d/t:.1f}x faster")
PY
