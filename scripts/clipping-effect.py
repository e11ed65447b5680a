#!/usr/bin/env python3
"""Is an arm's probe different from the no-clip arm's by more than the seeds' spread?

    python3 scripts/clipping-effect.py [REPORT_DIR] [--control VARIANT]

Reads `probe.csv` from a `spur report` directory (default
reports/clipping_cpu) and prints, per metric, each arm's final mean ± sample
std over seeds, its difference from the control arm (default: the one whose
variant is `clipping=none`), and Welch's t for that difference with its
degrees of freedom. |t| well above 2 at these seed counts means the
difference is larger than the spread across seeds; below it, it is not.
Used for docs/results.md.
"""
import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

METRICS = [
    "entropy",
    "greedy_logprob",
    "opening_repeat",
    "greedy_repeat",
    "response_length",
    "clip_fraction_high_mean",
    "clip_fraction_low_mean",
]


def mean_std(xs):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def welch(a, b):
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0:
        return float("nan"), float("nan")
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return t, df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", nargs="?", default="reports/clipping_cpu", type=Path)
    ap.add_argument("--control", default="clipping=none")
    args = ap.parse_args()
    finals = defaultdict(lambda: defaultdict(list))
    baseline = {}
    with open(args.report / "probe.csv") as f:
        for row in csv.DictReader(f):
            finals[row["variant"]][row["metric"]].append(float(row["final"]))
            if row["baseline"]:
                baseline[row["metric"]] = float(row["baseline"])
    if args.control not in finals:
        raise SystemExit(f"no arm {args.control!r} in {args.report}/probe.csv; arms: {sorted(finals)}")
    control = finals[args.control]
    print("| metric | base model | arm | final (mean ± std) | Δ vs control | Welch t (df) |")
    print("|---|---|---|---|---|---|")
    for metric in METRICS:
        for arm in sorted(finals):
            xs = finals[arm][metric]
            if not xs:
                continue
            m, s = mean_std(xs)
            base = baseline.get(metric)
            base = f"{base:.4f}" if base is not None else "—"
            if arm == args.control:
                diff, test = "(control)", ""
            else:
                t, df = welch(xs, control[metric])
                diff = f"{m - mean_std(control[metric])[0]:+.4f}"
                test = f"{t:+.2f} ({df:.1f})"
            print(f"| {metric} | {base} | {arm} | {m:.4f} ± {s:.4f} | {diff} | {test} |")


if __name__ == "__main__":
    main()
