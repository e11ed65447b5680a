#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (no Rust, no network; PyTorch's CUDA 13 wheels and
# transformers installed) from the repository root, with the binary that
# `scripts/build-cuda.sh --features mistralrs` built carried along:
#
#   scripts/gpu-check.sh [target/cuda-dist/spur-cuda.xz]
#
# 1. Environment: unpacks the binary, puts the CUDA libraries of PyTorch's wheels
#    (site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH, checks that every library resolves.
# 2. CPU vs CUDA: the fused training ops' CUDA kernels against their CPU kernels
#    (`spur bench train-ops`); tiny random-weight Qwen2 and Llama checkpoints: `spur sample`
#    greedy and seeded (T=1) on both devices in f32, and greedy in bf16, compared token by
#    token and log-prob by log-prob, also with spur's unchecked CUDA kernels on the device
#    (SPUR_CUDA_KERNELS=1: decode attention); one update step's gradient norm on both devices,
#    with candle's composite training ops and with spur's kernels.
# 3. Update step, Qwen2.5-Math-1.5B shapes: `spur bench update` in bf16 (with and without
#    activation checkpointing, and with spur's training kernels) and f32 against the same GRPO step in PyTorch (bf16 autocast
#    over f32 master weights, and f32), with peak memory beside the memory model's estimate.
# 4. Rollouts: `spur bench generate` in bf16 (with candle's attention and with spur's decode
#    attention kernel) against transformers `generate` in bf16, batch 64 and 256, 512 new
#    tokens, greedy, the same prompt ids.
# 5. Qwen2.5-Math-7B shapes: an update step of 4 x 2,048 tokens (bf16, checkpointing, bf16 Adam
#    moments unless GPU_CHECK_7B_MOMENTS=f32) and a 64-sequence rollout, peak device memory
#    beside the estimate.
# 6. The earlier runs' comparisons: f32/TF32 decoding at batch 1 and 64, mistral.rs.
#
# Every step appends one JSON line {"step", "seconds", "result"|"error"} to
# $OUT/gpu-check.jsonl (or ./gpu-check.jsonl without $OUT); the log goes to gpu-check.log
# beside it. A failed step is recorded and the next one runs.
# Environment: GPU_CHECK_STEPS (steps to run, space-separated: full names such as
# generate:mistralrs, or the part before the first colon such as generate; default all),
# GPU_CHECK_ROLLOUTS (update-step rollouts, default 16), GPU_CHECK_STEP_TIMEOUT (seconds a
# command may run, default 150). To try the script on a machine without
# a GPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_TORCH_DEVICE=cpu GPU_CHECK_SHAPE=tiny-qwen2.
set -uo pipefail

packed=${1:-target/cuda-dist/spur-cuda.xz}
[[ -f $packed ]] || { echo "error: $packed not found; carry it from scripts/build-cuda.sh" >&2; exit 1; }
out=${OUT:-$PWD}
results=$out/gpu-check.jsonl
: >"$results"
exec > >(tee "$out/gpu-check.log") 2>&1

device=${GPU_CHECK_DEVICE:-cuda}
step_timeout=${GPU_CHECK_STEP_TIMEOUT:-150}
shape=${GPU_CHECK_SHAPE:-qwen2.5-math-1.5b}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
helper=$here/gpu_check.py
work=$(mktemp -d)
spur=$work/spur-cuda
python3 - "$packed" "$spur" <<'EOF'
import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
chmod +x "$spur"

echo "== environment"
if [[ $device == cuda* ]]; then
    cuda_lib=$(python3 -c '
import glob, sys
print(next((p for d in sys.path for p in glob.glob(d + "/nvidia/cu13/lib")), ""))')
    [[ -n $cuda_lib ]] || { echo "error: no site-packages/nvidia/cu13/lib for python3; is PyTorch (CUDA 13) installed?" >&2; exit 1; }
    export LD_LIBRARY_PATH=$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "CUDA libraries: $cuda_lib"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
fi
ldd "$spur" | grep -E 'libcuda|libcublas|libcurand|libcudart|libnvrtc|libstdc|not found'
if ldd "$spur" | grep -q 'not found'; then
    echo "error: unresolved libraries above" >&2
    exit 1
fi
"$spur" --version

# step NAME COMMAND...: runs COMMAND, whose stdout is one JSON value, and records it.
step() {
    local name=$1; shift
    if [[ -n ${GPU_CHECK_STEPS:-} && " $GPU_CHECK_STEPS " != *" ${name%%:*} "*
          && " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        return 0
    fi
    echo "== $name: $*"
    local start=$SECONDS status
    if [[ $(type -t "$1") == function ]]; then
        "$@" >"$work/stdout"
    else
        timeout "$step_timeout" "$@" >"$work/stdout"
    fi
    status=$?
    cat "$work/stdout"
    python3 - "$name" "$((SECONDS - start))" "$status" "$work/stdout" >>"$results" <<'EOF'
import json, sys
name, seconds, status, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
row = {"step": name, "seconds": seconds}
text = open(path).read().strip()
try:
    value = json.loads(text) if text else None
except ValueError:
    value = None
if status != 0 or value is None:
    row["error"] = f"exit {status}" + ("" if value is not None else "; no JSON on stdout")
else:
    row["result"] = value
print(json.dumps(row))
EOF
}

# Samples from one model as JSONL, on a device, by an engine (ENGINE/N: at most N sequences
# decoded together).
samples() { # DIR DEVICE ENGINE[/N] [spur sample flags...]
    local dir=$1 device=$2 engine=${3%/*} together=()
    [[ $3 == */* ]] && together=(--max-sequences "${3#*/}")
    shift 3
    timeout "$step_timeout" "$spur" sample --model "$dir" --prompts "$work/prompts.jsonl" \
        --device "$device" --engine "$engine" "${together[@]}" --precision "${precision:-f32}" \
        --max-tokens 48 \
        --json "$@"
}
compare() { # DIR A_DEVICE A_ENGINE B_DEVICE B_ENGINE [flags...]
    local dir=$1 a_dev=$2 a_eng=$3 b_dev=$4 b_eng=$5; shift 5
    samples "$dir" "$a_dev" "$a_eng" "$@" >"$work/a.jsonl" \
        && samples "$dir" "$b_dev" "$b_eng" "$@" >"$work/b.jsonl" \
        && python3 "$helper" compare-samples "$work/a.jsonl" "$work/b.jsonl"
}

compare_update() { # DIR: one update step's gradient norm on the CPU and on $device, f32
    local args=(bench update --model "$1" --rollouts 4 --prompt-tokens 40 --completion-tokens 96
                --micro-batch 2 --json)
    timeout "$step_timeout" "$spur" "${args[@]}" --device cpu >"$work/a.json" \
        && timeout "$step_timeout" "$spur" "${args[@]}" --device "$device" >"$work/b.json" \
        && python3 - "$work/a.json" "$work/b.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
gap = abs(a["grad_norm"] - b["grad_norm"]) / abs(a["grad_norm"])
print(json.dumps({"cpu_grad_norm": a["grad_norm"], "device_grad_norm": b["grad_norm"],
                  "relative_gap": gap, "agree_1e-4": gap <= 1e-4}))
PY
}

python3 - "$work/prompts.jsonl" <<'EOF'
import json, sys
prompts = ["What is 2 + 2?", "Express the quotient $413_5 \\div 2_5$ in base 5.",
           "Find all real x with x^2 - 5x + 6 = 0.", "Write a python function.",
           "The sum of two numbers is 25 and their difference is 11. What is the larger?",
           "Hi", "Compute $\\dbinom{8}{4}$.", "Let f(x) = 3x + 2. What is f(f(1))?"]
with open(sys.argv[1], "w") as f:
    for p in prompts:
        f.write(json.dumps({"problem": p}) + "\n")
EOF

# Most telling steps first: a run cut short by the lease still says the most it can.
step "train-ops" "$spur" bench train-ops --device "$device" --json
echo "== CPU vs $device on tiny models"
for tiny in tiny-qwen2 tiny-llama; do
    python3 "$helper" write-model "$work/$tiny" "$tiny" --dtype f32 >/dev/null
    step "cpu-vs-cuda:$tiny:greedy" compare "$work/$tiny" cpu candle "$device" candle \
        --temperature 0
    step "cpu-vs-cuda:$tiny:seeded" compare "$work/$tiny" cpu candle "$device" candle \
        --temperature 1 --n 4 --seed 7
    # bf16 compute: the CPU multiplies bf16 operands in f32 and rounds (tensor cores' sums).
    precision=bf16 step "cpu-vs-cuda-bf16:$tiny:greedy" compare "$work/$tiny" cpu candle \
        "$device" candle --temperature 0
    # The training path (packed attention, chunked head log-probs, Adam): the gradient norm of
    # one update step on both devices.
    # spur's unchecked CUDA kernels (decode attention; training ops and Adam) on the device side.
    SPUR_CUDA_KERNELS=1 step "cpu-vs-cuda-kernels:$tiny:seeded" compare "$work/$tiny" cpu \
        candle "$device" candle --temperature 1 --n 4 --seed 7
    SPUR_CUDA_KERNELS=1 precision=bf16 step "cpu-vs-cuda-kernels-bf16:$tiny:greedy" compare \
        "$work/$tiny" cpu candle "$device" candle --temperature 0
    step "cpu-vs-cuda-update:$tiny" compare_update "$work/$tiny"
    SPUR_CUDA_KERNELS=1 step "cpu-vs-cuda-update-kernels:$tiny" compare_update "$work/$tiny"
done

echo "== $shape"
big=$work/$shape
step "write-model" python3 "$helper" write-model "$big" "$shape" --dtype bf16

# The update step against PyTorch in bf16 (spur: bf16 products over f32 master weights, with
# and without activation checkpointing; PyTorch: autocast over f32 master weights).
rollouts=${GPU_CHECK_ROLLOUTS:-16}
update=(--rollouts "$rollouts" --prompt-tokens 111 --completion-tokens 512 --micro-batch 4)
step "update:spur-bf16" "$spur" bench update --model "$big" --device "$device" "${update[@]}" \
    --precision bf16 --json
step "update:spur-bf16-ckpt" "$spur" bench update --model "$big" --device "$device" \
    "${update[@]}" --precision bf16 --checkpoint-activations --json
SPUR_CUDA_KERNELS=1 step "update:spur-bf16-kernels" "$spur" bench update --model "$big" \
    --device "$device" "${update[@]}" --precision bf16 --json
step "update:pytorch-bf16" python3 "$helper" torch-update "$big" --dtype bf16 "${update[@]}"

# Rollouts at the paper's scale: batch 64 and 256, 512 new tokens, bf16 on both sides.
# ~110 tokens with the byte-level tokenizer, like a MATH-500 problem in a chat template.
prompt='Express the quotient $413_5 \div 2_5$ in base 5. Then check the answer by multiplying it back out, in base 5.'
rollout=(--model "$big" --device "$device" --batches 64,256 --max-tokens 512 --prompt "$prompt")
step "rollout:candle-bf16" "$spur" bench generate --engine candle "${rollout[@]}" \
    --precision bf16 --json
SPUR_CUDA_KERNELS=1 step "rollout:candle-bf16-kernels" "$spur" bench generate --engine candle \
    "${rollout[@]}" --precision bf16 --json
step "rollout:transformers-bf16" python3 "$helper" hf-generate "$big" --dtype bf16 \
    --batches 64,256 --max-tokens 512 --prompt "$prompt"

# Qwen2.5-Math-7B's shapes on one GPU: an update step of 4 x 2,048 tokens and a 64-sequence
# rollout, with peak device memory beside the memory model's estimate.
seven=$work/qwen2.5-math-7b
step "7b:write-model" python3 "$helper" write-model "$seven" qwen2.5-math-7b --dtype bf16
step "7b:update" "$spur" bench update --model "$seven" --device "$device" --rollouts 4 \
    --prompt-tokens 512 --completion-tokens 1536 --micro-batch 4 --precision bf16 \
    --checkpoint-activations --moments "${GPU_CHECK_7B_MOMENTS:-bf16}" --json
step "7b:rollout" "$spur" bench generate --engine candle --model "$seven" --device "$device" \
    --batches 64 --max-tokens 512 --prompt "$prompt" --precision bf16 --json

# f32, as the earlier runs measured it (docs/gpu-runs).
step "update:spur-f32" "$spur" bench update --model "$big" --device "$device" "${update[@]}" --json
step "update:pytorch-f32" python3 "$helper" torch-update "$big" --dtype f32 "${update[@]}"

# Earlier runs' comparisons, kept for reruns.
generate=(--model "$big" --device "$device" --batches 1,64 --max-tokens 128 --prompt "$prompt")
step "generate:candle-f32" "$spur" bench generate --engine candle "${generate[@]}" --json
for dtype in bf16 f32; do
    step "generate:transformers-$dtype" python3 "$helper" hf-generate "$big" --dtype "$dtype" \
        --batches 1,64 --max-tokens 128 --prompt "$prompt"
done
step "generate:mistralrs" "$spur" bench generate --engine mistralrs "${generate[@]}" --json
step "generate:candle-tf32" "$spur" bench generate --engine candle "${generate[@]}" --tf32 --json
step "update:spur-tf32" "$spur" bench update --model "$big" --device "$device" "${update[@]}" \
    --tf32 --json
for tiny in tiny-qwen2 tiny-llama; do
    step "mistralrs-vs-candle:$tiny:greedy" compare "$work/$tiny" "$device" candle "$device" \
        mistralrs --temperature 0
    step "mistralrs-batched:$tiny:greedy" compare "$work/$tiny" "$device" mistralrs "$device" \
        mistralrs/8 --temperature 0
done

echo "== summary"
python3 - "$results" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    r = row.get("result")
    if r is None:
        print(f"{row['step']:40s} FAILED ({row['error']})")
    elif "identical" in r:
        print(f"{row['step']:40s} {r['identical']}/{r['samples']} identical, "
              f"max log-prob gap {r['max_logprob_gap']:.2e}")
    elif "runs" in r:
        print(f"{row['step']:40s} " + ", ".join(
            f"batch {x['batch']}: {x['tok_s']:.1f} tok/s"
            + (f" (peak {x['peak_memory_bytes'] / 2**30:.1f} GiB, estimated "
               f"{x['estimated_memory_bytes'] / 2**30:.1f})"
               if x.get("peak_memory_bytes") and x.get("estimated_memory_bytes") else "")
            for x in r["runs"]))
    elif "step_s" in r:
        mfu = "" if r.get("mfu_bf16") is None else (
            f", MFU {100 * r['mfu_bf16']:.1f}% of the measured bf16 peak "
            f"{r['peak_bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")
        memory = ""
        if r.get("peak_memory_bytes"):
            memory = (f", peak {r['peak_memory_bytes'] / 2**30:.1f} GiB (estimated "
                      f"{r['estimated_memory_bytes'] / 2**30:.1f})")
        elif r.get("max_memory_gb"):
            memory = f", torch max allocated {r['max_memory_gb'] / 1.073741824:.1f} GiB"
        print(f"{row['step']:40s} {r['step_s']:.2f} s, {r['tokens_per_s']:.0f} tokens/s, "
              f"grad norm {r['grad_norm']:.4f}{mfu}{memory}")
    else:
        print(f"{row['step']:40s} done in {row['seconds']} s")
EOF
