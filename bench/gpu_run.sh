#!/usr/bin/env bash
# Every GPU measurement in ONE `python -m bench` run (one process, so the
# ratios, the roofline and the copy-bandwidth reference all come from the
# same run).  Adam, fp32 and bf16, on GPT-2 XL (1.56B params) and 4000 x 1000
# tensors; fastopt fused vs torch.optim fused and foreach, the roofline op,
# and Apex when importable (the harness notes it otherwise, and skips any
# implementation whose state would not fit in GPU memory).  report.md then
# holds a "Targets" table: >= 0.9 of copy bandwidth, >= 1.0x torch fused on
# GPT-2 XL and >= 1.3x on 4000 x 1000, each met or not.
#
# Needs a CUDA build of fastopt (pip install --no-build-isolation -e .).
# About 1-2 minutes on an H100 (GPT-2 XL fp32 peaks at ~64 GiB of GPU memory).
# Usage: bench/gpu_run.sh [OUT_DIR]   (default bench-out/gpu; env PYTHON, REPEATS)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-bench-out/gpu}"
mkdir -p "$out"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
fi
exec "${PYTHON:-python}" -m bench \
  --device cuda \
  --workloads gpt2-xl,4000x1000 \
  --dtypes fp32,bf16 \
  --optimizers adam \
  --impls roofline,fastopt-fused,torch-fused,torch-foreach,apex \
  --repeats "${REPEATS:-100}" \
  --out "$out"
