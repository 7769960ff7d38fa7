#!/usr/bin/env bash
# The one command to run on a GPU machine (`make gpu-check OUT=DIR`): builds
# fastopt's CUDA extension for the local GPU only, with every core; runs every
# CUDA test (tests/test_cuda.py and the CUDA halves of the AMP, clip,
# large-model and torch.compile tests: parity with torch.optim, graph capture,
# unaligned, many and huge tensors); then the GPU bench (bench/gpu_run.sh).  Writes into DIR:
#   summary.md     what ran, how long each part took, the failing tests by name
#   build.log      the extension build
#   tests.log      pytest's output (tests.xml: JUnit)
#   bench/         results.json, report.md, plots, nvidia-smi.txt
# Exits non-zero, naming what failed, if the build, any test or the bench
# fails.  Sized for ~8 minutes on a 16-core H100/H200 machine; needs torch with
# CUDA, nvcc, ninja and pytest, and no network.
# Usage: scripts/gpu_check.sh DIR
# Env: PYTHON (default python3), REPEATS (bench steps per measurement,
#      default 30), BUILD_TIMEOUT / TEST_TIMEOUT / BENCH_TIMEOUT (seconds),
#      GPU_CHECK_DRY_RUN=1 (print the commands instead of running them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"

if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: scripts/gpu_check.sh DIR   (or: make gpu-check OUT=DIR)" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
out="$(cd "$1" && pwd)"
PYTHON="${PYTHON:-python3}"
dry_run="${GPU_CHECK_DRY_RUN:-0}"
summary="$out/summary.md"
failures=()
start=$SECONDS

note() { echo "$*" | tee -a "$summary"; }
fail() { failures+=("$1"); note "- **FAILED**: $1"; }
# Runs a command (or prints it in a dry run) with a time limit; its output
# goes to a log file.  Returns the command's status.
run_step() {
  local limit="$1" log="$2"
  shift 2
  if [[ "$dry_run" == 1 ]]; then
    echo "would run (limit ${limit} s, log $log): $*"
    return 0
  fi
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$log" 2>&1
}

: > "$summary"
note "# fastopt GPU check"
note ""
note "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# ---- what this machine has ----
if ! device_info="$("$PYTHON" - <<'EOF' 2>&1
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} sees no CUDA GPU (torch.version.cuda = {torch.version.cuda})")
major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}|{torch.cuda.get_device_name()}|torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
)"; then
  note "- **FAILED**: no usable GPU: ${device_info##*$'\n'}"
  echo "gpu-check: FAILED: no usable GPU (${device_info##*$'\n'})" >&2
  [[ "$dry_run" == 1 ]] || exit 1
  device_info="9.0|(dry run: no GPU)|(dry run)"
fi
arch="${device_info%%|*}"
rest="${device_info#*|}"
note "- GPU: ${rest%%|*} (sm_${arch/./}), ${rest#*|}, $(nproc) cores"
if ! command -v nvcc >/dev/null 2>&1 && [[ -z "${CUDA_HOME:-}" ]]; then
  fail "nvcc not found (put it on PATH or set CUDA_HOME)"
fi

# ---- build: the local architecture only, every core ----
step_start=$SECONDS
note ""
note "## Build"
built=0
if run_step "${BUILD_TIMEOUT:-360}" "$out/build.log" \
    env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace; then
  if [[ "$dry_run" != 1 ]] && ! "$PYTHON" -c "
import fastopt, sys
b = fastopt.backends()
sys.exit(0 if 'cuda' in b['fused_devices'] else f'fastopt loaded without CUDA kernels: {b}')" >> "$out/build.log" 2>&1; then
    fail "the build finished but fastopt has no CUDA kernels (build.log)"
  else
    built=1
  fi
else
  fail "extension build (status $?; last lines of build.log below)"
  tail -n 30 "$out/build.log" | sed 's/^/    /' | tee -a "$summary"
fi
note "- $((SECONDS - step_start)) s: \`TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) $PYTHON setup.py build_ext --inplace\`"

# ---- every CUDA test ----
step_start=$SECONDS
note ""
note "## Tests"
tests=(tests/test_cuda.py tests/test_amp.py tests/test_clip.py tests/test_large_model.py tests/test_compile.py)
if [[ $built == 1 || "$dry_run" == 1 ]]; then
  run_step "${TEST_TIMEOUT:-240}" "$out/tests.log" \
    env PYTHONPATH="$repo" "$PYTHON" -m pytest -q -rfE -p no:cacheprovider -k cuda \
    --junitxml="$out/tests.xml" "${tests[@]}"
  status=$?
  if [[ "$dry_run" != 1 ]]; then
    note "- $(grep -E '(passed|failed|error|no tests ran)' "$out/tests.log" | tail -n 1)"
    if [[ $status -eq 124 || $status -eq 137 ]]; then
      fail "CUDA tests timed out after ${TEST_TIMEOUT:-240} s (tests.log)"
    elif [[ $status -ne 0 ]]; then
      fail "CUDA tests (status $status)"
      grep -E '^(FAILED|ERROR) ' "$out/tests.log" | head -n 50 | sed 's/^/    /' | tee -a "$summary"
    fi
  fi
else
  note "- skipped: the build failed"
fi
note "- $((SECONDS - step_start)) s: \`pytest -k cuda ${tests[*]}\`"

# ---- the GPU bench ----
step_start=$SECONDS
note ""
note "## Bench"
# Measured even when tests failed: the numbers still tell where things stand.
if [[ $built == 1 || "$dry_run" == 1 ]]; then
  if run_step "${BENCH_TIMEOUT:-240}" "$out/bench.log" \
      env PYTHONPATH="$repo" PYTHON="$PYTHON" REPEATS="${REPEATS:-30}" bash bench/gpu_run.sh "$out/bench"; then
    if [[ -f "$out/bench/report.md" ]]; then
      # The report's Targets table, as it stands.
      awk '/^## Targets/{show=1} show && /^## / && !/^## Targets/{exit} show' "$out/bench/report.md" >> "$summary"
    fi
  else
    fail "GPU bench (bench.log)"
    tail -n 20 "$out/bench.log" 2>/dev/null | sed 's/^/    /' | tee -a "$summary"
  fi
else
  note "- skipped: fastopt has no CUDA kernels"
fi
note "- $((SECONDS - step_start)) s: \`REPEATS=${REPEATS:-30} bench/gpu_run.sh\`"

note ""
if [[ "$dry_run" == 1 ]]; then
  note "Dry run: nothing was built, tested or measured."
  exit 0
fi
if [[ ${#failures[@]} -eq 0 ]]; then
  note "**GPU check passed** in $((SECONDS - start)) s."
  exit 0
fi
note "**GPU check FAILED** after $((SECONDS - start)) s: ${failures[*]}"
echo "gpu-check: FAILED: ${failures[*]} (see $summary)" >&2
exit 1
