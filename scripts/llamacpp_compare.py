#!/usr/bin/env python3
"""Helpers for scripts/bench-vs-llamacpp.sh (standard library only).

  llamacpp_compare.py run OUT_FILE -- COMMAND...
      Run COMMAND with stdout saved to OUT_FILE (stderr passes through) and
      print its peak resident memory in MiB. Fails if COMMAND fails.

  llamacpp_compare.py table --llama-bench F --batched-bench F --spur F
                            [--batches 1,16,64] [--threads N] [--prompt-tokens N]
                            [--peak NAME=MiB ...]
      Print the markdown comparison table from llama-bench's `-o json`,
      llama-batched-bench's `--output-format jsonl` and spur's
      `bench models --json` output.
"""

import argparse
import json
import resource
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


def ratio(a, b):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def table(args):
    (pp, pp_sd), (tg, tg_sd), build = llama_bench(args.llama_bench)
    batched = batched_bench(args.batched_bench)
    prompt_tokens, threads, spur = spur_results(args.spur)
    batches = [int(b) for b in args.batches.split(",")]
    missing = [b for b in batches if b not in batched]
    if missing:
        sys.exit(f"error: llama-batched-bench gave no result for batch {missing} (context too small?)")

    if args.threads is not None and threads != args.threads:
        print(f"warning: spur ran with {threads} threads, llama.cpp with {args.threads}", file=sys.stderr)
    if args.prompt_tokens is not None and prompt_tokens != args.prompt_tokens:
        print(f"warning: spur's prompt has {prompt_tokens} tokens, llama.cpp's {args.prompt_tokens}",
              file=sys.stderr)

    f32 = spur.get("f32", (None, {}))
    quant = spur.get("quantized", (None, {}))

    rows = [
        ("prefill, batch 1 (llama-bench pp)", pp, pp_sd, f32[0], quant[0]),
        ("prefill, batch 1 (llama-batched-bench)", batched[1][0] if 1 in batched else None,
         None, f32[0], quant[0]),
        ("decode, batch 1 (llama-bench tg)", tg, tg_sd, f32[1].get(1), quant[1].get(1)),
    ]
    for b in batches:
        rows.append((f"decode, batch {b}, aggregate (llama-batched-bench)", batched[b][1], None,
                     f32[1].get(b), quant[1].get(b)))

    print(f"llama.cpp {build}; spur: {prompt_tokens}-token prompt, {threads} threads. Speeds in tok/s.")
    print()
    print("| measurement | llama.cpp | spur f32 | spur quantized | f32 / llama.cpp | quantized / llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ref, sd, a, b in rows:
        ref_text = fmt(ref) if sd is None else f"{ref:.1f} ± {sd:.1f}"
        print(f"| {name} | {ref_text} | {fmt(a)} | {fmt(b)} | {ratio(a, ref)} | {ratio(b, ref)} |")
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
    p.add_argument("--batched-bench", required=True)
    p.add_argument("--spur", required=True)
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
