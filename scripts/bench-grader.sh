#!/usr/bin/env bash
# Grading throughput, single thread: spur's paper and math_verify graders vs
# HuggingFace math-verify (PyPI), on the shared grader corpus. Prints each and
# the ratios.
#
#   scripts/bench-grader.sh [--limit N]   (N: rows for math-verify; default all)
#
# Env: SPUR_SHARED_DATA (default ../shared/data), BENCH_VENV (default
# $HOME/.cache/spur/bench-venv), MATH_VERIFY_VERSION (default 0.9.0).
set -euo pipefail
cd "$(dirname "$0")/.."

data="${SPUR_SHARED_DATA:-../shared/data}"
files=("$data/grader/real_outputs.jsonl" "$data/grader/real_outputs_aime_amc.jsonl")
for f in "${files[@]}"; do
    [[ -f "$f" ]] || { echo "bench-grader: $f not found (set SPUR_SHARED_DATA)" >&2; exit 1; }
done
limit=()
if [[ "${1:-}" == "--limit" ]]; then limit=(--limit "$2"); fi

venv="${BENCH_VENV:-$HOME/.cache/spur/bench-venv}"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "math-verify==${MATH_VERIFY_VERSION:-0.9.0}"
fi

# One thread everywhere: no BLAS/OpenMP pools in the Python process.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

spur=$(cargo run --quiet --release -p spur-math --example bench_grader -- "${files[@]}")
echo "$spur"
spur_mv=$(cargo run --quiet --release -p spur-math --example bench_grader -- --grader math_verify "${files[@]}")
echo "$spur_mv"
mv=$("$venv/bin/python" scripts/bench_grader.py "${files[@]}" "${limit[@]}")
echo "$mv"

python3 - "$spur" "$spur_mv" "$mv" <<'PY'
import json, sys
s, smv, m = (json.loads(a) for a in sys.argv[1:4])
for r in (s, smv):
    print(f"{r['grader']} {r['responses_per_sec']:.0f} responses/s, math-verify {m['responses_per_sec']:.1f} responses/s, "
          f"ratio {r['responses_per_sec'] / m['responses_per_sec']:.0f}x")
PY
