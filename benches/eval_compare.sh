#!/usr/bin/env bash
# Eval throughput (scored tokens/s), taper's eval stage vs PyTorch, on the bench-size
# Llama (hidden 512, intermediate 1408, 8 layers, 8 heads, vocab 8192, random weights),
# the same rows, batch size and thread count (RAYON_NUM_THREADS / torch.set_num_threads).
#
#   bash benches/eval_compare.sh [ROWS] [SEQ] [BATCH] [THREADS] [ROUNDS]
#                                                      (default 32 256 4 2 3)
#
# Needs: a release build of taper (built here if missing; or set TAPER=path), python3
# with numpy and pyarrow, and torch (transformers' LlamaForCausalLM is used when
# installed, else the same math in plain torch). The two sides run in turns, ROUNDS
# times (two taper runs, then a PyTorch process that makes two passes, the first warming
# it up; each side keeps the better of its two), so a slow minute of a shared machine
# falls on both; each side keeps its best round, and every round is printed. Two taper
# numbers: the eval stage's duration from the ledger (model load + shard read +
# scoring), and its scoring alone (the `eval/tokens_per_s` metric). PyTorch's is the
# scoring loop alone: like for like with the second, and favoured against the first.
set -euo pipefail
ROWS=${1:-32}; SEQ=${2:-256}; BATCH=${3:-4}; THREADS=${4:-2}; ROUNDS=${5:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TAPER=${TAPER:-$TARGET/release/taper}
if [ ! -x "$TAPER" ]; then (cd "$ROOT" && cargo build --release --bin taper); fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 "$ROOT/benches/eval_compare.py" make "$WORK" --rows "$ROWS" --seq "$SEQ" --batch "$BATCH"

best=""; best_rate=0; torch_json=""; torch_best=""
for i in $(seq "$ROUNDS"); do
  s=""; rate=0
  for _pass in 1 2; do
    if ! (cd "$WORK" && RAYON_NUM_THREADS=$THREADS "$TAPER" run --force-all pipeline.yaml \
        >/dev/null 2>"$WORK/taper.log"); then
      cat "$WORK/taper.log" >&2; exit 1
    fi
    read -r ps prate < <(cd "$WORK" && "$TAPER" show --json | python3 -c \
        'import json,sys; e=[s for s in json.load(sys.stdin)["stages"] if s["stage"]=="eval"][0]; print(e["duration_s"], e["metrics"]["eval/tokens_per_s"])')
    if [ -z "$s" ] || python3 -c "import sys; sys.exit(not $ps < $s)"; then s=$ps; fi
    if python3 -c "import sys; sys.exit(not $prate > $rate)"; then rate=$prate; fi
  done
  # The round's better pass against the best so far.
  if [ -z "$best" ] || python3 -c "import sys; sys.exit(not $s < $best)"; then best=$s; fi
  if python3 -c "import sys; sys.exit(not $rate > $best_rate)"; then best_rate=$rate; fi
  tj=$(python3 "$ROOT/benches/eval_compare.py" torch "$WORK" --batch "$BATCH" --threads "$THREADS" \
      --repeat 2 2>"$WORK/torch.log") || { cat "$WORK/torch.log" >&2; exit 1; }
  ts=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['seconds'])" "$tj")
  if [ -z "$torch_best" ] || python3 -c "import sys; sys.exit(not $ts < $torch_best)"; then
    torch_best=$ts; torch_json=$tj
  fi
  python3 -c "import json,sys; t=json.loads(sys.argv[2])['tokens']; s,r,p=map(float,sys.argv[3:6]); \
print(f'round {sys.argv[1]}: taper stage {s:.3f}s, scoring {r:,.0f} tokens/s; pytorch ' \
      f'{t/p:,.0f} tokens/s; taper / pytorch: scoring {r*p/t:.2f}x')" "$i" "$tj" "$s" "$rate" "$ts"
done
taper_loss=$(python3 -c "import json; print(json.load(open('$WORK/reports/eval.json'))['eval']['loss'])")
tokens=$(python3 -c "import json; print(json.load(open('$WORK/reports/eval.json'))['eval']['tokens'])")

python3 - "$best" "$taper_loss" "$tokens" "$torch_json" "$best_rate" <<'PY'
import json, sys
t_s, t_loss, tokens, tj = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
rate = float(sys.argv[5])
t_tps, p_tps = tokens / t_s, tj["tokens"] / tj["seconds"]
print(f"taper eval stage: {tokens} tokens in {t_s:.3f}s = {t_tps:,.0f} tokens/s (loss {t_loss:.6f})")
print(f"taper scoring alone: {rate:,.0f} tokens/s")
print(f"pytorch ({tj['impl']}): {tj['tokens']} tokens in {tj['seconds']:.3f}s = {p_tps:,.0f} tokens/s (loss {tj['loss']:.6f})")
print(f"taper / pytorch: stage {t_tps / p_tps:.2f}x, scoring {rate / p_tps:.2f}x   |loss diff| {abs(t_loss - tj['loss']):.2e}")
PY
