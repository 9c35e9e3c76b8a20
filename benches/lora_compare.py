"""taper / PyTorch ratios for the model-math suite (`benches/lora.rs` against
`benches/lora_torch.py`), robust to a noisy machine: the two run in turns, ROUNDS times,
and each case keeps its fastest time per call over a window of calls (criterion: its
fastest sample, time / iterations; PyTorch: its fastest window of about 0.1 s, the same
estimator). Interference only ever adds time, so the fastest of several is the closest
either side gets to its own speed.

    python3 benches/lora_compare.py [THREADS] [ROUNDS] [FILTER]   (default 2 3 "")

Needs cargo and python3 with torch (transformers for the Llama case); with
TAPER_BENCH_BIN set to a built `lora` bench binary (`cargo bench --bench lora --no-run`
prints its path), that binary runs instead of cargo, on a machine without Rust. Sets
RAYON_NUM_THREADS for taper; PyTorch gets the same thread count. Prints, per case, the
fastest time of each side and the ratio PyTorch time / taper time (> 1: taper faster).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

THREADS = sys.argv[1] if len(sys.argv) > 1 else "2"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
FILTER = sys.argv[3] if len(sys.argv) > 3 else ""
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


def taper_round():
    env = dict(os.environ, RAYON_NUM_THREADS=THREADS)
    timing = ["--warm-up-time", "1", "--measurement-time", "2"]
    binary = os.environ.get("TAPER_BENCH_BIN")
    if binary:
        args = [binary, "--bench"] + timing
        env["CARGO_TARGET_DIR"] = str(TARGET)
    else:
        args = ["cargo", "bench", "--bench", "lora", "--"] + timing
    if FILTER:
        args.append(FILTER)
    subprocess.run(args, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    out = {}
    for case in PAIRS:
        sample = json.loads((TARGET / "criterion" / case / "new" / "sample.json").read_text())
        out[case] = min(t / i for t, i in zip(sample["times"], sample["iters"])) / 1e6
    return out


def torch_round():
    args = [sys.executable, str(ROOT / "benches" / "lora_torch.py"), THREADS, FILTER]
    text = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    out = {}
    for line in text.splitlines():
        m = re.match(r"(.+?)\s+[\d.]+ ms\s+\(fastest window ([\d.]+) ms\)", line)
        if m:
            out[m.group(1).strip()] = float(m.group(2))
    return out


best_taper, best_torch = {}, {}
for r in range(ROUNDS):
    for case, t in taper_round().items():
        best_taper[case] = min(t, best_taper.get(case, float("inf")))
    for name, t in torch_round().items():
        best_torch[name] = min(t, best_torch.get(name, float("inf")))
    print(f"round {r + 1} of {ROUNDS} done", file=sys.stderr)

print(f"{'case':44} {'taper ms':>9} {'torch ms':>9} {'torch/taper':>12}")
for case, name in PAIRS.items():
    a, b = best_taper.get(case), best_torch.get(name)
    if a is None or b is None:
        print(f"{case:44} {'-':>9} {'-':>9} {'(missing)':>12}")
        continue
    print(f"{case:44} {a:9.3f} {b:9.3f} {b / a:11.2f}x")
r8, r64 = best_taper.get("lora_rank_d2048/8"), best_taper.get("lora_rank_d2048/64")
if r8 and r64:
    print(f"taper rank 64 / rank 8 at d 2048: {r64 / r8:.2f}")
