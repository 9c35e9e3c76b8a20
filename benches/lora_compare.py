"""taper / PyTorch ratios for the model-math suite (`benches/lora.rs` against
`benches/lora_torch.py`), robust to a noisy machine: case by case, the two sides run in
turns (taper's case, then PyTorch's, a few seconds apart), ROUNDS times, so a slow phase
of the machine touches both sides of a pair. Each side keeps its fastest time per call
over a window of calls (criterion: its fastest sample, time / iterations; PyTorch: its
fastest window of about 0.1 s, the same estimator). Interference only ever adds time,
so the fastest of several is the closest either side gets to its own speed.

    python3 benches/lora_compare.py [THREADS] [ROUNDS] [FILTER] [--turns]   (default 2 3 "")

With --turns both sides' processes stay alive for the whole run (the `lora` bench binary
with TAPER_BENCH_TURNS=1, `lora_torch.py --turns`) and take turns a second at a time:
for each round and case, one second of taper's calls, then one of PyTorch's (PyTorch
first every second round, from the second), each side's fastest window of about 0.1 s
kept. No process starts between the two sides of a pair, so they run about a second
apart instead of several, and rounds are cheap enough to take 10 or more.

Needs cargo and python3 with torch (transformers for the Llama case); with
TAPER_BENCH_BIN set to a built `lora` bench binary (`cargo bench --bench lora --no-run`
prints its path), that binary runs instead of cargo, on a machine without Rust. Sets
RAYON_NUM_THREADS for taper; PyTorch gets the same thread count. Prints, per case, the
fastest time of each side over all rounds and their ratio PyTorch time / taper time
(> 1: taper faster), then the lowest and the median of the rounds' own ratios (each
from one pair of runs seconds apart). With TAPER_COMPARE_JSON=FILE in the environment it
also writes every round's pair of times (ms, `[taper, torch]`, in round order) to FILE,
case by case, so the spread behind the summary can be read.
"""
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ARGS = [a for a in sys.argv[1:] if a != "--turns"]
TURNS = "--turns" in sys.argv[1:]
THREADS = ARGS[0] if len(ARGS) > 0 else "2"
ROUNDS = int(ARGS[1]) if len(ARGS) > 1 else 3
FILTER = ARGS[2] if len(ARGS) > 2 else ""
ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))

# criterion id -> PyTorch case name (taper's own variant of each case).
PAIRS = {
    "lora_forward/r16/512": "lora_forward/r16/512",
    "lora_forward/r16/2048": "lora_forward/r16/2048",
    "lora_rank_d2048/8": "lora_rank_d2048/8",
    "lora_rank_d2048/16": "lora_rank_d2048/16",
    "lora_rank_d2048/32": "lora_rank_d2048/32",
    "lora_rank_d2048/64": "lora_rank_d2048/64",
    "softmax_1024x1024/taper_differentiable": "softmax_1024x1024",
    "rms_norm_4x128x2048/taper_differentiable": "rms_norm_4x128x2048",
    "layer_norm_4x128x2048/taper_differentiable": "layer_norm_4x128x2048",
    "lora_fwd_bwd_d2048_r16/frozen_op": "lora_fwd_bwd_d2048_r16",
    "llama_h512_l8_forward/1x128": "llama_h512_l8_forward/1x128 (eager attention)",
}
PAIRS = {k: v for k, v in PAIRS.items() if FILTER in k}


def taper_case(case):
    env = dict(os.environ, RAYON_NUM_THREADS=THREADS)
    timing = ["--warm-up-time", "1", "--measurement-time", "2", "--exact", case]
    binary = os.environ.get("TAPER_BENCH_BIN")
    if binary:
        args = [binary, "--bench"] + timing
        env["CARGO_TARGET_DIR"] = str(TARGET)
    else:
        args = ["cargo", "bench", "--bench", "lora", "--"] + timing
    subprocess.run(args, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    sample = json.loads((TARGET / "criterion" / case / "new" / "sample.json").read_text())
    return min(t / i for t, i in zip(sample["times"], sample["iters"])) / 1e6


def torch_case(name):
    args = [sys.executable, str(ROOT / "benches" / "lora_torch.py"), THREADS, name]
    text = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    for line in text.splitlines():
        m = re.match(r"(.+?)\s+[\d.]+ ms\s+\(fastest window ([\d.]+) ms\)", line)
        if m and m.group(1).strip() == name:
            return float(m.group(2))
    return None


class Side:
    """A side's process in --turns mode: `CASE SECONDS` lines in, `CASE MS` lines out."""

    def __init__(self, args, env=None):
        # stderr passes through: cargo's build errors, a panic or a traceback show.
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def time(self, case, seconds=1.0):
        self.proc.stdin.write(f"{case} {seconds}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"{self.proc.args[0]} ended at {case}")
        name, _, ms = line.rstrip("\n").rpartition(" ")
        if name != case:
            sys.exit(f"{self.proc.args[0]} answered {line!r} to {case}")
        return None if ms == "-" else float(ms)


times = {case: [] for case in PAIRS}
if TURNS:
    env = dict(os.environ, RAYON_NUM_THREADS=THREADS, TAPER_BENCH_TURNS="1")
    binary = os.environ.get("TAPER_BENCH_BIN")
    taper = Side([binary] if binary else ["cargo", "bench", "--bench", "lora"], env)
    torch = Side([sys.executable, str(ROOT / "benches" / "lora_torch.py"), THREADS,
                  "--turns"])
    for r in range(ROUNDS):
        for case, name in PAIRS.items():
            if r % 2 == 0:
                ours = taper.time(case)
                theirs = torch.time(name)
            else:
                theirs = torch.time(name)
                ours = taper.time(case)
            times[case].append((ours, theirs))
        print(f"round {r + 1} of {ROUNDS} done", file=sys.stderr)
    for side in (taper, torch):
        side.proc.stdin.close()
        side.proc.wait()
else:
    for r in range(ROUNDS):
        for case, name in PAIRS.items():
            times[case].append((taper_case(case), torch_case(name)))
        print(f"round {r + 1} of {ROUNDS} done", file=sys.stderr)

dump = os.environ.get("TAPER_COMPARE_JSON")
if dump:
    Path(dump).write_text(json.dumps({"threads": THREADS, "turns": TURNS, "times": times},
                                     indent=1))

print(f"{'case':44} {'taper ms':>9} {'torch ms':>9} {'torch/taper':>12} {'rounds: low':>12} {'median':>7}")
best_taper = {}
for case, pairs in times.items():
    pairs = [(ours, theirs) for ours, theirs in pairs
             if ours is not None and theirs is not None]
    if not pairs:
        print(f"{case:44} {'-':>9} {'-':>9} {'(missing)':>12}")
        continue
    a, b = min(p[0] for p in pairs), min(p[1] for p in pairs)
    best_taper[case] = a
    ratios = [theirs / ours for ours, theirs in pairs]
    low, median = min(ratios), statistics.median(ratios)
    print(f"{case:44} {a:9.3f} {b:9.3f} {b / a:11.2f}x {low:11.2f}x {median:6.2f}x")
r8, r64 = best_taper.get("lora_rank_d2048/8"), best_taper.get("lora_rank_d2048/64")
if r8 and r64:
    print(f"taper rank 64 / rank 8 at d 2048: {r64 / r8:.2f}")
