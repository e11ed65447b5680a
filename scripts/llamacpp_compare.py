#!/usr/bin/env python3
"""Helpers for scripts/bench-vs-llamacpp.sh (standard library only).

  llamacpp_compare.py run OUT_FILE -- COMMAND...
      Run COMMAND with stdout saved to OUT_FILE (stderr passes through) and
      print its peak resident memory in MiB. Fails if COMMAND fails.

  llamacpp_compare.py table --llama-bench F (--batched-bench F --spur F)...
                            [--batches 1,16,64] [--threads N] [--prompt-tokens N]
                            [--peak NAME=MiB ...]
      Print the markdown comparison table from llama-bench's `-o json`,
      llama-batched-bench's `--output-format jsonl` and spur's
      `bench models --json` output. --batched-bench and --spur repeat once per
      round, in the order the rounds ran; each ratio is the median over rounds
      of spur's speed over llama.cpp's in the same round, with its range.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys


def run(args):
    with open(args.out, "wb") as out:
        status = subprocess.run(args.command, stdout=out).returncode
    if status != 0:
        sys.exit(f"error: `{' '.join(args.command)}` exited with status {status}")
    # ru_maxrss of waited-for children, in KiB on Linux; one child per call.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"{peak_kib / 1024:.0f}")


def load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot read {what} output {path}: {e}")


def llama_bench(path):
    """Prefill and decode tok/s (mean, stddev) from llama-bench -o json."""
    rows = load_json(path, "llama-bench")
    prefill = decode = None
    for row in rows:
        speed = (row["avg_ts"], row["stddev_ts"])
        if row["n_prompt"] > 0 and row["n_gen"] == 0:
            prefill = speed
        elif row["n_prompt"] == 0 and row["n_gen"] > 0:
            decode = speed
    if prefill is None or decode is None:
        sys.exit(f"error: {path} lacks a prefill (pp) or decode (tg) result")
    build = f"{rows[0].get('build_commit', '?')} (build {rows[0].get('build_number', '?')})"
    return prefill, decode, build


def batched_bench(path):
    """{batch: (prefill tok/s, aggregate decode tok/s)} from llama-batched-bench jsonl."""
    by_batch = {}
    try:
        with open(path) as f:
            lines = [line for line in f if line.startswith("{")]
    except OSError as e:
        sys.exit(f"error: cannot read llama-batched-bench output {path}: {e}")
    for line in lines:
        row = json.loads(line)
        by_batch[row["pl"]] = (row["speed_pp"], row["speed_tg"])
    return by_batch


def spur_results(path):
    """{precision: (prefill tok/s, {batch: decode tok/s})} from spur bench models --json."""
    doc = load_json(path, "spur bench models")
    try:
        out = {}
        for r in doc["results"]:
            out[r["precision"]] = (r["prefill_tok_s"], {d["batch"]: d["tok_s"] for d in r["decode"]})
        return doc["prompt_tokens"], doc["threads"], out
    except (KeyError, TypeError) as e:
        sys.exit(f"error: {path} is not `spur bench models --json` output (missing {e})")


def fmt(x):
    return "—" if x is None else f"{x:.1f}"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio_text(pairs):
    """Median and range of a/b over (a, b) pairs, one pair per round."""
    ratios = [a / b for a, b in pairs if a is not None and b]
    if not ratios:
        return "—"
    text = f"{statistics.median(ratios):.2f}×"
    if len(ratios) > 1:
        text += f" ({min(ratios):.2f}–{max(ratios):.2f})"
    return text


def table(args):
    (pp, pp_sd), (tg, tg_sd), build = llama_bench(args.llama_bench)
    if len(args.batched_bench) != len(args.spur):
        sys.exit("error: give one --batched-bench and one --spur per round")
    batches = [int(b) for b in args.batches.split(",")]
    rounds = []
    for batched_path, spur_path in zip(args.batched_bench, args.spur):
        batched = batched_bench(batched_path)
        missing = [b for b in batches if b not in batched]
        if missing:
            sys.exit(f"error: {batched_path} has no result for batch {missing} (context too small?)")
        prompt_tokens, threads, spur = spur_results(spur_path)
        rounds.append((batched, spur))

    if args.threads is not None and threads != args.threads:
        print(f"warning: spur ran with {threads} threads, llama.cpp with {args.threads}", file=sys.stderr)
    if args.prompt_tokens is not None and prompt_tokens != args.prompt_tokens:
        print(f"warning: spur's prompt has {prompt_tokens} tokens, llama.cpp's {args.prompt_tokens}",
              file=sys.stderr)

    def spur_speed(spur, precision, batch):
        """Prefill speed for batch None, else decode speed at that batch."""
        prefill, decode = spur.get(precision, (None, {}))
        return prefill if batch is None else decode.get(batch)

    # Per row: llama.cpp's speed in each round, and which spur speed it compares with.
    rows = [
        ("prefill, batch 1 (llama-bench pp)", [pp] * len(rounds), pp_sd, None),
        ("prefill, batch 1 (llama-batched-bench)", [b.get(1, (None,))[0] for b, _ in rounds], None, None),
        ("decode, batch 1 (llama-bench tg)", [tg] * len(rounds), tg_sd, 1),
    ]
    for batch in batches:
        rows.append((f"decode, batch {batch}, aggregate (llama-batched-bench)",
                     [b[batch][1] for b, _ in rounds], None, batch))

    n = len(rounds)
    print(f"llama.cpp {build}; spur: {prompt_tokens}-token prompt, {threads} threads. Speeds in tok/s"
          + (f", medians of {n} rounds; ratios are medians of each round's ratio (range)." if n > 1 else "."))
    print()
    print("| measurement | llama.cpp | spur f32 | spur quantized | f32 / llama.cpp | quantized / llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, refs, sd, batch in rows:
        f32 = [spur_speed(s, "f32", batch) for _, s in rounds]
        quant = [spur_speed(s, "quantized", batch) for _, s in rounds]
        ref = median(refs)
        ref_text = fmt(ref) if sd is None else f"{ref:.1f} ± {sd:.1f}"
        print(f"| {name} | {ref_text} | {fmt(median(f32))} | {fmt(median(quant))} | "
              f"{ratio_text(zip(f32, refs))} | {ratio_text(zip(quant, refs))} |")
    if args.peak:
        print()
        print("Peak RSS: " + ", ".join(f"{p.split('=', 1)[0]} {p.split('=', 1)[1]} MiB" for p in args.peak) + ".")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("out")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = sub.add_parser("table")
    p.add_argument("--llama-bench", required=True)
    p.add_argument("--batched-bench", required=True, action="append")
    p.add_argument("--spur", required=True, action="append")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--threads", type=int, help="warn when spur ran with another thread count")
    p.add_argument("--prompt-tokens", type=int, help="warn when spur's prompt has another length")
    p.add_argument("--peak", action="append", default=[], metavar="NAME=MiB")
    args = parser.parse_args()
    if args.cmd == "run":
        if args.command[:1] == ["--"]:
            args.command = args.command[1:]
        if not args.command:
            parser.error("run needs a command after --")
        run(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
