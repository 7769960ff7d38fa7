#!/usr/bin/env bash
# Compiles every CUDA kernel (csrc/cuda/*.cu and the generated unit of each
# optimizer of the table, scripts/generate_sources.py) with nvcc for sm_80 and sm_90,
# with setup.py's NVCC_FLAGS, compile only: the kernels include no torch header, so this runs on
# machines without a GPU or a CUDA build of torch (CI).  The -D flags are
# the ones torch's CUDAExtension passes, so what compiles here compiles
# there.  Usage: scripts/cuda_compile_check.sh  (env NVCC, default nvcc)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "scripts/cuda_compile_check.sh: $NVCC not found" >&2
  exit 1
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$SECONDS
python3 scripts/generate_sources.py "$out/generated" > /dev/null
for source in csrc/cuda/*.cu "$out"/generated/*.cu; do
  for arch in 80 90; do
    echo "nvcc sm_$arch: ${source#"$out/"}"
    "$NVCC" -std=c++20 -O3 --fmad=false -c "$source" -o "$out/$(basename "$source" .cu).sm_$arch.o" -I csrc \
      -gencode "arch=compute_$arch,code=sm_$arch" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      -Xcompiler -Wall -Werror all-warnings
  done
done
echo "scripts/cuda_compile_check.sh: compiled in $((SECONDS - start)) s"
