#!/usr/bin/env python3
"""What changed between an experiment's step-0 eval and each run's last eval.

    python3 scripts/eval-changes.py EXPERIMENT_NAME [--cache DIR]

Reads the run records in DIR/runs (written by `spur run`) and the eval
artifacts they point to, and prints one Markdown row per run: accuracy,
boxed-answer rate and mean response length (tokens) before and after, the
share of eval responses that differ from the step-0 response to the same
problem at all (greedy decoding, so any difference comes from the weights),
and the rollout-side trajectory from the update metrics (mean reward, mean
response length, clip fraction, share of zero-advantage groups). Used for
docs/results.md.
"""
import argparse
import json
from pathlib import Path


def eval_responses(cache: Path, node_id: str) -> list:
    path = cache / "nodes" / node_id[:2] / node_id / "out" / "eval.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment")
    ap.add_argument("--cache", default="cache", type=Path)
    args = ap.parse_args()

    records = []
    for path in sorted((args.cache / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        if r["experiment"]["name"] == args.experiment:
            records.append(r)
    if not records:
        raise SystemExit(f"no run records of `{args.experiment}` in {args.cache / 'runs'}")
    records.sort(key=lambda r: json.dumps(r["cell"], sort_keys=True))

    print("| run | accuracy | boxed | length (tokens) | responses changed | reward by step | rollout length by step | clip fraction by step | zero-adv. groups by step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        evals = sorted((n for n in r["nodes"] if n["kind"] == "eval" and n["status"] == "cached"),
                       key=lambda n: n["step"])
        if len(evals) < 2 or evals[0]["step"] != 0:
            print(f"| {r['cell']} | unfinished | | | | | | | |")
            continue
        first, last = evals[0], evals[-1]
        before = eval_responses(args.cache, first["id"])
        after = eval_responses(args.cache, last["id"])
        changed = sum(a["record"]["response"] != b["record"]["response"] for a, b in zip(before, after))
        m0, m1 = first["metrics"], last["metrics"]
        ups = [n["metrics"] for n in sorted(r["nodes"], key=lambda n: n["step"]) if n["kind"] == "update" and n["metrics"]]
        fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)
        lengths = " ".join(f"{u['response_length']:.0f}" for u in ups)
        cell = ", ".join(f"{k}={v}" for k, v in r["cell"].items())
        print(
            f"| {cell} "
            f"| {m0['accuracy']:.3f} → {m1['accuracy']:.3f} "
            f"| {m0['boxed_rate']:.3f} → {m1['boxed_rate']:.3f} "
            f"| {m0['mean_length']:.1f} → {m1['mean_length']:.1f} "
            f"| {changed}/{len(before)} (step {last['step']}) "
            f"| {fmt(u['reward_mean'] for u in ups)} "
            f"| {lengths} "
            f"| {fmt(u['clip_fraction_low'] + u['clip_fraction_high'] for u in ups)} "
            f"| {fmt(u['zero_advantage_groups'] for u in ups)} |"
        )


if __name__ == "__main__":
    main()
