#!/usr/bin/env bash
# Compares taper's tokenize stage with the Python `tokenizers` package on the same corpus,
# tokenizer and CPUs.
#
#   benches/tokenize_compare.sh [WORKDIR]
#
# Environment:
#   CORPUS_MB  size of the corpus in MiB (default 100)
#   PROFILE    cargo profile for taper: release (default; a release build of the whole
#              dependency tree takes 15-20 minutes on 2 cores) or dev (dependencies are
#              optimised in dev too, taper's own code is not: a lower bound, for a quick check)
#   CPUS       CPU list both sides are pinned to with taskset (default 0,1)
#   TAPER_BIN  use this already built `tokenize_corpus` binary instead of building one
#
# Corpus: real English text from Debian packages, installed with apt-get if missing:
# the GNU Collaborative International Dictionary of English (`dict-gcide`, ~40 MB of text)
# and the glosses of WordNet 3.0 (`wordnet-base`), cycled until CORPUS_MB is reached.
# Blank lines are dropped and trailing whitespace trimmed, so "one example per line" means
# the same thing on both sides.
#
# Tokenizer: a byte-level BPE with a 32k vocabulary trained with Python `tokenizers` on the
# first 20 MB of the corpus.
#
# Measured:
#   (a) taper, end to end: reading the text file, tokenizing (one example per line, no
#       BOS/EOS so the token counts can be compared), packing into 2048-token rows, writing
#       Snappy Parquet shards and the manifest; wall time and peak RSS from /usr/bin/time -v.
#       taper is driven through `examples/tokenize_corpus.rs`, which calls
#       `taper::stages::tokenize::run`, until the CLI can run a single stage.
#   (b) Python `tokenizers` `encode_batch` (batches of 10,000 lines, add_special_tokens=False),
#       tokenizing only: the lines are already in memory and nothing is written.
# Both use 2 threads (rayon). The script checks both produced the same number of tokens.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-${TMPDIR:-/tmp}/taper-tokenize-bench}"
CORPUS_MB="${CORPUS_MB:-100}"
PROFILE="${PROFILE:-release}"
CPUS="${CPUS:-0,1}"
THREADS=2
mkdir -p "$WORK/ws/tok" "$WORK/ws/data"

# --- tools ------------------------------------------------------------------------------
need_apt=()
[ -f /usr/share/dictd/gcide.dict.dz ] || need_apt+=(dict-gcide)
[ -f /usr/share/wordnet/data.noun ] || need_apt+=(wordnet-base)
[ -x /usr/bin/time ] || need_apt+=(time)
if [ "${#need_apt[@]}" -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
python3 -c 'import tokenizers' 2>/dev/null || python3 -m pip install -q 'tokenizers>=0.23,<0.24'

# --- corpus -----------------------------------------------------------------------------
CORPUS="$WORK/ws/data/corpus.txt"
if [ ! -s "$CORPUS" ] || [ "$(stat -c %s "$CORPUS")" -lt $((CORPUS_MB << 20)) ]; then
  python3 - "$CORPUS" "$CORPUS_MB" <<'PY'
import gzip, sys, glob
out_path, mb = sys.argv[1], int(sys.argv[2])
def gcide():
    with gzip.open("/usr/share/dictd/gcide.dict.dz", "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            yield line
def wordnet():
    for path in sorted(glob.glob("/usr/share/wordnet/data.*")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "| " not in line:
                    continue  # licence header or no gloss
                yield line.split("| ", 1)[1]
target = mb << 20
written = 0
with open(out_path, "w", encoding="utf-8") as out:
    while written < target:
        for source in (gcide, wordnet):
            for line in source():
                line = line.rstrip()
                if not line.strip():
                    continue
                data = line + "\n"
                out.write(data)
                written += len(data.encode("utf-8"))
                if written >= target:
                    break
            if written >= target:
                break
print(f"corpus: {written / 2**20:.1f} MiB", file=sys.stderr)
PY
fi

# --- tokenizer --------------------------------------------------------------------------
if [ ! -s "$WORK/ws/tok/tokenizer.json" ]; then
  python3 - "$CORPUS" "$WORK/ws/tok" <<'PY'
import itertools, json, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
corpus, out = sys.argv[1], sys.argv[2]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.post_processor = processors.ByteLevel(trim_offsets=False)
trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<pad>", "<s>", "</s>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
def lines(limit=20 << 20):
    n = 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            n += len(line)
            if n > limit:
                return
            yield line
tok.train_from_iterator(lines(), trainer)
tok.save(f"{out}/tokenizer.json")
json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, open(f"{out}/tokenizer_config.json", "w"))
print(f"tokenizer: vocab {tok.get_vocab_size()}", file=sys.stderr)
PY
fi

# --- (a) taper ----------------------------------------------------------------------------
cat > "$WORK/with.yaml" <<'YAML'
tokenizer: tok/tokenizer.json
source: {path: data/corpus.txt, format: text}
seq_len: 2048
packing: true
add_bos: false
add_eos: false
split: {valid: 0.05, seed: 0}
YAML
if [ -n "${TAPER_BIN:-}" ]; then
  BIN="$TAPER_BIN"
else
  (cd "$ROOT" && cargo build -q --profile "$PROFILE" --example tokenize_corpus)
  case "$PROFILE" in dev) DIR=debug ;; *) DIR="$PROFILE" ;; esac
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$DIR/examples/tokenize_corpus"
fi
rm -rf "$WORK/out"
taskset -c "$CPUS" /usr/bin/time -v "$BIN" "$WORK/with.yaml" "$WORK/ws" "$WORK/out" "$THREADS" \
  >"$WORK/taper_summary.json" 2>"$WORK/taper_time.txt"
TAPER_TOKENS=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["train"]["tokens"]+s["valid"]["tokens"])' "$WORK/taper_summary.json")
TAPER_WALL=$(python3 - "$WORK/taper_time.txt" <<'PY'
import sys
for line in open(sys.argv[1]):
    if "Elapsed (wall clock)" in line:
        parts = [float(p) for p in line.rsplit(" ", 1)[1].split(":")]
        secs = 0.0
        for p in parts:
            secs = secs * 60 + p
        print(secs)
PY
)
TAPER_RSS_KB=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/taper_time.txt")
TAPER_CPU=$(awk -F': ' '/User time|System time/ {s += $2} END {print s}' "$WORK/taper_time.txt")

# --- (b) Python tokenizers ----------------------------------------------------------------
read -r PY_TOKENS PY_SECS PY_CPU < <(TOKENIZERS_PARALLELISM=true RAYON_NUM_THREADS=$THREADS \
  taskset -c "$CPUS" python3 - "$CORPUS" "$WORK/ws/tok/tokenizer.json" <<'PY'
import sys, time
from tokenizers import Tokenizer
corpus, tok_path = sys.argv[1], sys.argv[2]
tok = Tokenizer.from_file(tok_path)
with open(corpus, encoding="utf-8") as f:
    lines = f.read().split("\n")
lines = [l for l in lines if l.strip(" \t\n\r\x0c")]
tokens = 0
start, cpu = time.perf_counter(), time.process_time()
for i in range(0, len(lines), 10_000):
    for enc in tok.encode_batch(lines[i:i + 10_000], add_special_tokens=False):
        tokens += len(enc.ids)
secs, cpu = time.perf_counter() - start, time.process_time() - cpu
print(tokens, secs, cpu)
PY
)

# --- report -------------------------------------------------------------------------------
python3 - "$TAPER_TOKENS" "$TAPER_WALL" "$TAPER_RSS_KB" "$PY_TOKENS" "$PY_SECS" "$PROFILE" "$CORPUS" "$TAPER_CPU" "$PY_CPU" <<'PY'
import os, platform, sys, datetime
taper_tokens, taper_secs, rss_kb, py_tokens, py_secs = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
profile, corpus = sys.argv[6], sys.argv[7]
taper_cpu, py_cpu = float(sys.argv[8]), float(sys.argv[9])
a, b = taper_tokens / taper_secs, py_tokens / py_secs
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"date:     {datetime.date.today()}")
print(f"machine:  {cpu}, pinned to 2 CPUs, {platform.system()} {platform.release()}")
print(f"corpus:   {os.path.getsize(corpus) / 2**20:.1f} MiB, taper profile: {profile}")
print(f"tokens:   taper {taper_tokens}, python {py_tokens} ({'equal' if taper_tokens == py_tokens else 'DIFFERENT'})")
print(f"(a) taper tokenize end to end (Parquet written): {taper_secs:8.2f} s  {a:12,.0f} tokens/s  (CPU {taper_cpu:.1f} s)")
print(f"(b) python tokenizers encode_batch only:         {py_secs:8.2f} s  {b:12,.0f} tokens/s  (CPU {py_cpu:.1f} s)")
print(f"ratio a/b: {a / b:.2f}x (target >= 1.5x); per CPU-second: {(taper_tokens / taper_cpu) / (py_tokens / py_cpu):.2f}x")
print(f"load average now: {os.getloadavg()[0]:.2f} (other work on these CPUs skews wall times)")
print(f"taper peak RSS: {rss_kb / 1024:.0f} MiB (target < 512 MiB)")
PY
