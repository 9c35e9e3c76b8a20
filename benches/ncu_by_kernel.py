"""GPU time by kernel name from an `ncu --csv` report.

    ncu --metrics gpu__time_duration.sum --csv --print-units base \
        BIN_DIR/train_bench 2 --size gpu --device cuda --dtype bf16 --batch 2 > ncu.csv
    python3 benches/ncu_by_kernel.py ncu.csv

Prints each kernel's share of the summed GPU time, its total and its launch count,
largest first (the first 40).
"""
import collections
import csv
import sys


def main(path):
    header = None
    total = collections.Counter()
    count = collections.Counter()
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if header is None:
                if "Kernel Name" in row:
                    header = row
                continue
            try:
                name = row[header.index("Kernel Name")]
                value = float(row[header.index("Metric Value")].replace(",", ""))
            except (ValueError, IndexError):
                continue
            key = name.split("(")[0][:90]
            total[key] += value
            count[key] += 1
    whole = sum(total.values())
    print("total GPU ns", whole)
    for key, value in total.most_common(40):
        print(f"{100 * value / whole:6.2f}% {value / 1e6:9.2f} ms n={count[key]:6d} {key}")


if __name__ == "__main__":
    main(sys.argv[1])
