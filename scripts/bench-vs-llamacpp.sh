#!/usr/bin/env bash
# Compare spur's CPU generation speed with llama.cpp's, measured in one run on
# the same model file and thread count, and print the table used in
# docs/performance.md.
#
#   scripts/bench-vs-llamacpp.sh [--model GGUF] [--threads N] [--rounds N] [--spur-json FILE]
#
#   --model GGUF       default: the embedded model in spur's model cache,
#                      ${SPUR_MODEL_CACHE:-$HOME/.cache/spur/models}/SmolLM2-135M-Instruct.Q4_1.gguf
#                      (spur fetches it on first use, e.g. `spur sample --model default`)
#   --threads N        threads for both engines (default 2)
#   --rounds N         rounds of (llama-batched-bench, spur bench models), run
#                      alternately (default 3); the table gives medians, and each
#                      ratio is the median of the rounds' ratios with its range:
#                      on a shared VM one run's speed can move by 10-15%
#   --spur-json FILE   use a saved `spur bench models --json` result in every
#                      round instead of running spur (to check the table only)
#
# spur is $SPUR_BIN, default target/release/spur; it runs from the repository
# root so that its prompt comes from ../shared/data (MATH-500 problem 138).
#
# llama.cpp comes from the pinned llama-cpp-python sdist on PyPI (its
# vendor/llama.cpp), built once with -march=native (its best build here) into
# $HOME/.cache/spur/llama.cpp-<version>. Needs cmake and a C++ compiler; cmake
# is installed with apt-get when missing and running as root.
#
# Measured, each with a 111-token prompt and 128 new tokens:
#   llama-bench          prefill pp111 and decode tg128 at batch 1 (mean ± sd of 5 runs),
#                        once;
#   llama-batched-bench  per-sequence prompts, aggregate decode at batch 1, 16, 64,
#                        once per round;
#   spur bench models    prefill and decode, f32 and quantized weights, once per
#                        round, right after llama-batched-bench.
# Raw outputs are kept in a temporary folder whose path is printed at the end.
set -euo pipefail

llamacpp_python_version=0.3.36
prompt_tokens=111
new_tokens=128
batches=1,16,64

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
default_model=${SPUR_MODEL_CACHE:-$HOME/.cache/spur/models}/SmolLM2-135M-Instruct.Q4_1.gguf
model=$default_model
threads=2
rounds=3
spur_json=
cache=$HOME/.cache/spur/llama.cpp-$llamacpp_python_version
spur_bin=${SPUR_BIN:-$repo/target/release/spur}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 1; }
step() { echo "==> $*" >&2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --model|--threads|--rounds|--spur-json)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case $1 in
                --model) model=$2 ;;
                --threads) threads=$2 ;;
                --rounds) rounds=$2 ;;
                --spur-json) spur_json=$2 ;;
            esac
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -f $model ]] || die "model $model not found; run \`spur sample --model default --prompt hi\` to fetch it, or pass --model"
[[ $threads =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer, got '$threads'"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer, got '$rounds'"
helper=$repo/scripts/llamacpp_compare.py

# Build llama.cpp once.
if [[ -x $cache/bin/llama-bench && -x $cache/bin/llama-batched-bench ]]; then
    step "llama.cpp (llama-cpp-python $llamacpp_python_version) already built in $cache"
else
    if ! command -v cmake >/dev/null; then
        [[ $(id -u) == 0 ]] || die "cmake is missing; install it (apt-get install cmake) and rerun"
        step "installing cmake with apt-get"
        apt-get install -y -qq cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
    fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    step "downloading llama-cpp-python $llamacpp_python_version source from PyPI"
    # --no-binary for this package only: build dependencies come as wheels.
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-python -d "$work" "llama-cpp-python==$llamacpp_python_version"
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
    [[ -f $src/CMakeLists.txt ]] || die "no vendor/llama.cpp in the llama-cpp-python sdist"
    mkdir -p "$cache/bin"
    log=$cache/build.log
    step "building llama-bench and llama-batched-bench (Release, -march=native; log in $log)"
    start=$SECONDS
    {
        cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
            -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF &&
            cmake --build "$work/build" --config Release -j "$(nproc)" \
                --target llama-bench llama-batched-bench
    } >"$log" 2>&1 || { tail -n 30 "$log" >&2; die "llama.cpp build failed; full log in $log"; }
    cp "$work/build/bin/llama-bench" "$work/build/bin/llama-batched-bench" "$cache/bin/"
    step "built in $((SECONDS - start)) s"
fi

raw=$(mktemp -d "${TMPDIR:-/tmp}/spur-vs-llamacpp.XXXXXX")
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
# llama.cpp's threads spin while waiting for each other: with other work on
# the same cores its speed collapses (here 3-4x at 2 threads), and spur's too.
if awk -v l="${load_before%% *}" 'BEGIN { exit !(l > 0.5) }'; then
    echo "warning: load average is ${load_before}; other processes share the CPU, so these numbers understate both engines" >&2
fi

step "llama-bench: pp$prompt_tokens, tg$new_tokens, $threads threads"
peak_bench=$(python3 "$helper" run "$raw/llama-bench.json" -- \
    "$cache/bin/llama-bench" -m "$model" -t "$threads" -p "$prompt_tokens" -n "$new_tokens" -o json \
    2>"$raw/llama-bench.log") || { tail -n 20 "$raw/llama-bench.log" >&2; die "llama-bench failed"; }

# Each sequence holds its own prompt; llama.cpp splits the context evenly
# between sequences, in multiples of 256 cells.
max_batch=${batches##*,}
ctx=$(( max_batch * ((prompt_tokens + new_tokens + 255) / 256 * 256) ))
if [[ -z $spur_json ]]; then
    [[ -x $spur_bin ]] || die "$spur_bin not found; run \`cargo build --release\` (or set SPUR_BIN)"
fi
spur_model=$model
[[ $model == "$default_model" ]] && spur_model=default
peak_batched=0
peak_spur=0
round_files=()
for round in $(seq 1 "$rounds"); do
    step "round $round of $rounds: llama-batched-bench: npp $prompt_tokens, ntg $new_tokens, batches $batches, context $ctx"
    batched_out=$raw/llama-batched-bench.$round.jsonl
    peak=$(python3 "$helper" run "$batched_out" -- \
        "$cache/bin/llama-batched-bench" -m "$model" -t "$threads" -c "$ctx" -b 2048 -ub 512 \
        -npp "$prompt_tokens" -ntg "$new_tokens" -npl "$batches" --output-format jsonl \
        2>"$raw/llama-batched-bench.$round.log") || { tail -n 20 "$raw/llama-batched-bench.$round.log" >&2; die "llama-batched-bench failed"; }
    (( peak > peak_batched )) && peak_batched=$peak
    spur_out=$raw/spur.$round.json
    if [[ -n $spur_json ]]; then
        step "round $round of $rounds: spur: using saved result $spur_json"
        cp "$spur_json" "$spur_out"
    else
        step "round $round of $rounds: spur bench models: model $spur_model, batches $batches, $new_tokens steps"
        # candle sizes its thread pool from RAYON_NUM_THREADS.
        peak=$(cd "$repo" && RAYON_NUM_THREADS=$threads python3 "$helper" run "$spur_out" -- \
            "$spur_bin" bench models --json --model "$spur_model" --device cpu \
            --batches "$batches" --steps "$new_tokens")
        (( peak > peak_spur )) && peak_spur=$peak
    fi
    round_files+=(--batched-bench "$batched_out" --spur "$spur_out")
done
peaks=(--peak "llama-bench=$peak_bench" --peak "llama-batched-bench=$peak_batched")
[[ -z $spur_json ]] && peaks+=(--peak "spur bench models=$peak_spur")
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
echo "$(date -u +%Y-%m-%dT%H:%MZ), $cpu, $(nproc) CPUs; load average before ${load_before}, after ${load_after}."
python3 "$helper" table --llama-bench "$raw/llama-bench.json" "${round_files[@]}" \
    --batches "$batches" --threads "$threads" --prompt-tokens "$prompt_tokens" "${peaks[@]}"
step "raw outputs in $raw"
