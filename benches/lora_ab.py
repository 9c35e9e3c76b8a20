"""Two builds of the `lora` bench binary against each other, case by case, in turns
(the before and after of a change), on a noisy machine: both binaries stay alive with
TAPER_BENCH_TURNS=1 (as in `lora_compare.py --turns`) and take turns a second at a
time, the first one first in even rounds, the second in odd ones; each keeps its
fastest window of about 0.1 s.

    RAYON_NUM_THREADS=2 python3 benches/lora_ab.py BEFORE AFTER ROUNDS CASE...

CASE is a criterion id that `lora_compare.py` pairs (e.g. `lora_forward/r16/512`).
Prints, per case, each side's fastest time over the rounds (ms), their ratio
BEFORE / AFTER (> 1: AFTER faster) and the median of the rounds' own ratios.
"""
import os
import statistics
import subprocess
import sys

if len(sys.argv) < 5:
    sys.exit(__doc__)
before, after, rounds, cases = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
env = dict(os.environ, TAPER_BENCH_TURNS="1")
sides = [subprocess.Popen([b], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) for b in (before, after)]


def time(side, case):
    side.stdin.write(f"{case} 1\n")
    side.stdin.flush()
    name, _, ms = side.stdout.readline().rstrip("\n").rpartition(" ")
    if name != case or ms in ("", "-"):
        sys.exit(f"{side.args[0]} has no case {case!r}")
    return float(ms)


times = {case: [] for case in cases}
for r in range(rounds):
    for case in cases:
        order = (0, 1) if r % 2 == 0 else (1, 0)
        got = {i: time(sides[i], case) for i in order}
        times[case].append((got[0], got[1]))
for side in sides:
    side.stdin.close()
    side.wait()
print(f"{'case':40} {'before ms':>10} {'after ms':>10} {'before/after':>13} {'median':>7}")
for case, pairs in times.items():
    a, b = min(p[0] for p in pairs), min(p[1] for p in pairs)
    median = statistics.median(p[0] / p[1] for p in pairs)
    print(f"{case:40} {a:10.3f} {b:10.3f} {a / b:12.3f}x {median:6.3f}x")
