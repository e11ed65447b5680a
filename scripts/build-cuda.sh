#!/usr/bin/env bash
# Build spur with the `cuda` feature on a machine without a GPU or a system
# CUDA toolkit, using the CUDA 13.0 toolkit wheels from PyPI.
#
#   scripts/build-cuda.sh [--out DIR] [--features LIST] [--check]
#
# Steps (each skipped when already done):
#   1. a venv holding cuda-toolkit 13.0.2 (nvcc, cudart, cublas, curand, nvrtc...);
#   2. a CUDA_HOME-like folder over the wheels' files, with unversioned .so links;
#   3. a link-time stub libcuda.so (the driver's real library is used at run time);
#   4. `cargo build --release --features cuda` (plus LIST, e.g. `mistralrs`, which adds
#      mistral.rs's CUDA build: about 33 minutes more on 2 cores);
#   5. DIR/spur-cuda (stripped) and DIR/spur-cuda.xz (the compressed copy to carry to a GPU).
# With --check, step 4 is `cargo check` of every target and steps 5 is skipped: a quick proof
# that the CUDA-only code (and NCCL's, with --features nccl) compiles.
#
# Environment:
#   SPUR_CUDA_HOME_BASE  toolkit cache (default: $HOME/.cache/spur/cuda-13.0)
#   CUDA_COMPUTE_CAP     target GPU (default 90: sm_90a, H100/H200)
#   CARGO_TARGET_DIR     cargo target dir (default: <repo>/target/cuda, kept apart
#                        from the CPU build so target/release/spur is untouched)
#
# Why 13.0 exactly: the 12.x wheels ship no nvcc, and nvcc 13.1+ emits PTX that
# the lent GPU machines' driver (580, CUDA 13.0) cannot load.
set -euo pipefail

toolkit_version=13.0.2
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out_dir=$repo/target/cuda-dist
features=cuda
check=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) [[ $# -ge 2 ]] || { echo "error: --out needs a directory" >&2; exit 2; }
               out_dir=$2; shift 2 ;;
        --features) [[ $# -ge 2 ]] || { echo "error: --features needs a list, e.g. mistralrs" >&2; exit 2; }
               features=cuda,$2; shift 2 ;;
        --check) check=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

base=${SPUR_CUDA_HOME_BASE:-$HOME/.cache/spur/cuda-13.0}
venv=$base/venv
cuda_home=$base/cuda
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

step() { echo "==> $*"; }
die() { echo "error: $*" >&2; exit 1; }

for tool in python3 cc cargo strip xz awk; do
    command -v "$tool" >/dev/null || die "'$tool' is not on PATH; install it first"
done

# 1. Toolkit wheels.
if [[ -x $venv/bin/python ]] \
    && [[ $("$venv/bin/python" -m pip show cuda-toolkit 2>/dev/null | sed -n 's/^Version: //p') == "$toolkit_version" ]]; then
    step "CUDA toolkit $toolkit_version already in $venv"
else
    step "installing cuda-toolkit $toolkit_version into $venv (about 1 GB download)"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm,cublas,curand,nvrtc]==$toolkit_version"
fi
if [[ ,$features, == *,nccl,* ]] && ! "$venv/bin/python" -m pip show nvidia-nccl-cu13 >/dev/null 2>&1; then
    step "installing nvidia-nccl-cu13 into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check nvidia-nccl-cu13
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cu13=$site/nvidia/cu13
[[ -x $cu13/bin/nvcc ]] || die "no nvcc at $cu13/bin/nvcc; delete $venv and rerun"

# 2. CUDA_HOME-like folder. Links are cheap, so they are refreshed every run.
step "linking CUDA_HOME at $cuda_home"
mkdir -p "$cuda_home/lib64/stubs"
for dir in bin include nvvm; do
    ln -sfn "$cu13/$dir" "$cuda_home/$dir"
done
for lib in "$cu13"/lib/*.so.*; do
    ln -sf "$lib" "$cuda_home/lib64/$(basename "$lib")"
done
if [[ -d $site/nvidia/nccl ]]; then
    ln -sf "$site"/nvidia/nccl/lib/libnccl.so.* "$cuda_home/lib64/"
    ln -sf "$(cd "$cuda_home/lib64" && ls libnccl.so.* | sort -V | head -n 1)" "$cuda_home/lib64/libnccl.so"
fi
# The wheels ship only libX.so.N; the linker looks for libX.so.
for name in cublas cublasLt cudart curand nvrtc; do
    versioned=$(cd "$cuda_home/lib64" && ls "lib$name.so."* 2>/dev/null | sort -V | head -n 1)
    [[ -n $versioned ]] || die "lib$name.so.* is missing from $cu13/lib"
    ln -sf "$versioned" "$cuda_home/lib64/lib$name.so"
done

# 3. Link-time stub for the driver library, which no wheel ships. Every cu*
# function named in cuda.h, including the _v2/_ptsz names its macros map to.
stub=$cuda_home/lib64/stubs/libcuda.so
header=$cuda_home/include/cuda.h
if [[ -f $stub && $stub -nt $header ]]; then
    step "libcuda stub already built"
else
    step "building link-time libcuda stub from $header"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(|#define[[:space:]]+cu[A-Z][A-Za-z0-9_]*[[:space:]]+cu[A-Z][A-Za-z0-9_]*' "$header" \
        | grep -oE 'cu[A-Z][A-Za-z0-9_]*' | sort -u \
        | sed 's/.*/void &(void) {}/' >"$work/stub.c"
    count=$(wc -l <"$work/stub.c")
    [[ $count -gt 300 ]] || die "found only $count cu* names in $header; is it the real cuda.h?"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$work/stub.c"
    echo "    $count symbols"
fi

# 4. Build.
export CUDA_HOME=$cuda_home CUDA_PATH=$cuda_home
export PATH=$cuda_home/bin:$PATH
export LIBRARY_PATH=$cuda_home/lib64:$cuda_home/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
[[ $nvcc_version == 13.0 ]] || die "nvcc on PATH is $nvcc_version, need 13.0"
if (( check )); then
    step "cargo check --release --all-targets --features $features (target dir $CARGO_TARGET_DIR)"
    (cd "$repo" && cargo check --release --all-targets --features "$features")
    exit 0
fi
step "cargo build --release --features $features (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target dir $CARGO_TARGET_DIR)"
start=$SECONDS
(cd "$repo" && cargo build --release --features "$features" --bin spur)
echo "    build took $((SECONDS - start)) s"

# 5. Binary and compressed copy.
binary=$CARGO_TARGET_DIR/release/spur
mkdir -p "$out_dir"
if [[ -f $out_dir/spur-cuda.xz && $out_dir/spur-cuda.xz -nt $binary ]]; then
    step "$out_dir/spur-cuda.xz is up to date"
else
    # Without debug info: 466 MiB → 135 MiB with mistral.rs (62 → 20 MiB compressed).
    step "stripping and compressing to $out_dir/spur-cuda.xz"
    strip -o "$out_dir/spur-cuda" "$binary"
    xz -T0 -9 -c "$out_dir/spur-cuda" >"$out_dir/spur-cuda.xz.tmp"
    mv "$out_dir/spur-cuda.xz.tmp" "$out_dir/spur-cuda.xz"
fi
size=$(stat -c %s "$out_dir/spur-cuda")
xz_size=$(stat -c %s "$out_dir/spur-cuda.xz")
awk -v s="$size" -v x="$xz_size" -v d="$out_dir" 'BEGIN {
    printf "spur-cuda     %6.1f MiB  %s/spur-cuda\n", s / 1048576, d
    printf "spur-cuda.xz  %6.1f MiB  %s/spur-cuda.xz\n", x / 1048576, d
}'
(( xz_size <= 64 * 1048576 )) || echo "warning: spur-cuda.xz is over the 64 MiB that can be carried to a GPU machine" >&2
