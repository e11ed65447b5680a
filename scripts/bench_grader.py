"""Times HuggingFace math-verify on the grader corpus, single-threaded.

Usage: python scripts/bench_grader.py FILE.jsonl... [--limit N]
Prints one JSON line: rows, seconds, responses_per_sec, agree_with_math_verify_verdict.
"""
import argparse
import json
import time

from math_verify import parse, verify


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--limit", type=int, default=0, help="grade only the first N rows")
    args = ap.parse_args()
    rows = []
    for path in args.files:
        with open(path) as f:
            rows.extend(json.loads(line) for line in f)
    if args.limit:
        rows = rows[: args.limit]
    agree = 0
    start = time.perf_counter()
    for r in rows:
        ok = verify(parse("$" + r["gold"] + "$"), parse(r["response"]))
        agree += int(bool(ok) == r.get("math_verify_verdict"))
    seconds = time.perf_counter() - start
    print(json.dumps({
        "grader": "math-verify",
        "rows": len(rows),
        "seconds": round(seconds, 3),
        "responses_per_sec": round(len(rows) / seconds, 1),
        "agree_with_math_verify_verdict": agree,
    }))


if __name__ == "__main__":
    main()
