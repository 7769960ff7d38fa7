# The README's two commands: `make test` (every test) and `make bench` (the
# throughput report).  Each creates .venv and installs what it needs itself:
# the pinned CPU torch, the build and test tools, and fastopt built against
# that torch (--no-build-isolation).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

.PHONY: install test pytest ctest ctest-sanitize cuda-check gpu-check bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q setuptools wheel ninja cmake
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $@

test: pytest ctest ctest-sanitize

pytest: install
	$(PY) -m pytest -q

ctest: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/ctest.sh

# The same C++ tests built with AddressSanitizer and UndefinedBehaviorSanitizer
# (CMakeLists.txt, FASTOPT_SANITIZE) in their own build folder.
ctest-sanitize: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" BUILD_DIR=build-cmake-asan bash scripts/ctest.sh -DFASTOPT_SANITIZE=ON

# Compiles every CUDA kernel for sm_80 and sm_90 with nvcc (no GPU needed).
cuda-check:
	bash scripts/cuda_compile_check.sh

# On a GPU machine (torch with CUDA, nvcc, ninja, pytest; no venv, no network):
# builds for the local GPU, runs every CUDA test and the GPU bench, and writes
# summary.md, the logs and the bench report into OUT (scripts/gpu_check.sh).
OUT ?= gpu-check-out
gpu-check:
	bash scripts/gpu_check.sh $(OUT)

bench: install
	$(PY) -m bench --out bench-out

bench-quick: install
	$(PY) -m bench --quick --out bench-out/quick

clean:
	rm -rf $(VENV) build build-cmake build-cmake-asan bench-out fastopt/_C*.so *.egg-info
