#!/usr/bin/env bash
# Compiles every CUDA kernel (csrc/cuda/*.cu and the generated unit of each
# optimizer of the table, scripts/generate_sources.py) with nvcc for sm_80 and sm_90,
# with setup.py's NVCC_FLAGS, compile only: the kernels include no torch header, so this runs on
# machines without a GPU or a CUDA build of torch (CI).  The -D flags are
# the ones torch's CUDAExtension passes, so what compiles here compiles
# there.  Usage: scripts/cuda_compile_check.sh  (env NVCC, default nvcc;
# JOBS, default the number of cores)
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
# One nvcc per unit for both architectures (the host side is compiled once),
# JOBS units at a time; each unit's output is printed when it is done.
compile() {
  local source="$1" log
  log="$out/$(basename "$source" .cu).log"
  if "$NVCC" -std=c++20 -O3 --fmad=false -c "$source" -o "$out/$(basename "$source" .cu).o" -I csrc \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      -Xcompiler -Wall -Werror all-warnings > "$log" 2>&1; then
    echo "nvcc sm_80 sm_90: ${source#"$out/"}"
    cat "$log"
  else
    echo "nvcc sm_80 sm_90: ${source#"$out/"} FAILED"
    cat "$log"
    return 1
  fi
}
export -f compile
export NVCC out
printf '%s\0' csrc/cuda/*.cu "$out"/generated/*.cu | xargs -0 -n 1 -P "${JOBS:-$(nproc)}" bash -c 'compile "$0"'
echo "scripts/cuda_compile_check.sh: compiled in $((SECONDS - start)) s"
