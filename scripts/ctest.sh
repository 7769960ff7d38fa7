#!/usr/bin/env bash
# Configures, builds and runs fastopt's C++ tests (CMakeLists.txt) in
# ./build-cmake against the torch of the current Python environment.
# Usage: scripts/ctest.sh [extra cmake -D options, e.g. -DFASTOPT_SANITIZE=ON]
# Env: PYTHON (default python), BUILD_DIR (default build-cmake), JOBS (default 2).
# `make test` runs it twice: as is, and as
#   BUILD_DIR=build-cmake-asan scripts/ctest.sh -DFASTOPT_SANITIZE=ON
# (AddressSanitizer + UndefinedBehaviorSanitizer, every report fatal).
set -euo pipefail
# A sanitizer report with the call stack, not just the faulting line (ASan
# prints one anyway); no effect on builds without sanitizers.
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
BUILD_DIR="${BUILD_DIR:-build-cmake}"
JOBS="${JOBS:-2}"

TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

# Ninja when available (pip's ninja is a Python package, not always on PATH).
generator=()
if command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
elif NINJA_DIR="$("$PYTHON" -c 'import ninja, os; print(ninja.BIN_DIR)' 2>/dev/null)" &&
     [[ -x "$NINJA_DIR/ninja" ]]; then
  generator=(-G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA_DIR/ninja")
fi
# A build directory keeps the generator it was configured with.
if [[ -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  generator=()
fi

start=$SECONDS
cmake -S . -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" "$@"
cmake --build "$BUILD_DIR" --parallel "$JOBS"
(cd "$BUILD_DIR" && ctest --output-on-failure --parallel "$JOBS")
# Each C++ test ends with "NAME: N passed, M failed" (csrc/tests/check.h):
# the number of checks behind ctest's one line per test.
grep -h -E '^[a-z_]+: [0-9]+ passed, [0-9]+ failed$' "$BUILD_DIR/Testing/Temporary/LastTest.log" || true
echo "scripts/ctest.sh: configured, built and tested in $((SECONDS - start)) s"
