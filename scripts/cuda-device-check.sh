#!/usr/bin/env bash
# Run on a lent GPU machine (no Rust, no network; PyTorch's CUDA 13 wheels
# installed) from the repository root, with the binary built by
# scripts/build-cuda.sh carried along:
#
#   scripts/cuda-device-check.sh [target/cuda-dist/spur-cuda.xz]
#
# Unpacks the binary, puts the CUDA libraries of PyTorch's wheels
# (site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH, checks that every
# library resolves, and reports the device and spur's version.
# The log also goes to $OUT/cuda-device-check.log when $OUT is set.
set -euo pipefail

packed=${1:-target/cuda-dist/spur-cuda.xz}
[[ -f $packed ]] || { echo "error: $packed not found; carry it from scripts/build-cuda.sh" >&2; exit 1; }
if [[ -n ${OUT:-} ]]; then
    exec > >(tee "$OUT/cuda-device-check.log") 2>&1
fi

bin_dir=$(mktemp -d)
spur=$bin_dir/spur-cuda
python3 - "$packed" "$spur" <<'EOF'
import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
chmod +x "$spur"

cuda_lib=$(python3 -c '
import glob, sys
print(next((p for d in sys.path for p in glob.glob(d + "/nvidia/cu13/lib")), ""))')
[[ -n $cuda_lib ]] || { echo "error: no site-packages/nvidia/cu13/lib for python3; is PyTorch (CUDA 13) installed?" >&2; exit 1; }
export LD_LIBRARY_PATH=$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "CUDA libraries: $cuda_lib"

echo "== nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
echo "== shared libraries"
ldd "$spur" | grep -E 'libcuda|libcublas|libcurand|libcudart|libnvrtc|not found'
if ldd "$spur" | grep -q 'not found'; then
    echo "error: unresolved libraries above" >&2
    exit 1
fi
echo "== spur --version"
"$spur" --version
