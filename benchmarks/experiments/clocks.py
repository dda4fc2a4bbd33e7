"""Mean SM clock, power and temperature of the GPU during each row of a `speed.py` run.

    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 250 > smi.csv &
    python3 benchmarks/speed.py --out speed.json ...
    python3 benchmarks/experiments/clocks.py smi.csv speed.json

Tells whether a variant's steps ran at lower clocks than the frozen base's (power or thermal limits), which
would slow the base GEMMs as well as the adapter's kernels.
"""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime


def main():
    smi_path, speed_path = sys.argv[1:3]
    samples = []
    with open(smi_path) as handle:
        for row in csv.reader(handle):
            if len(row) < 4:
                continue
            try:
                stamp = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                samples.append((stamp, float(row[1].split()[0]), float(row[2].split()[0]), float(row[3])))
            except ValueError:
                continue
    print(f"{'variant':<30} {'shape':>8} {'samples':>7} {'SM MHz':>7} {'watts':>6} {'deg C':>5}")
    for row in json.load(open(speed_path))["results"]:
        window = [s for s in samples if row["unix_start"] <= s[0] <= row["unix_end"]]
        if not window:
            continue
        mean = [sum(s[i] for s in window) / len(window) for i in (1, 2, 3)]
        print(f"{row['variant']:<30} {row['batch']}x{row['seq']:<6} {len(window):>7} {mean[0]:7.0f} {mean[1]:6.0f} "
              f"{mean[2]:5.0f}")


if __name__ == "__main__":
    main()
