# The README's two commands: `make test` (every test) and `make bench` (the
# throughput report).  Each creates .venv and installs what it needs itself:
# the pinned CPU torch, the build and test tools, and fastopt built against
# that torch (--no-build-isolation).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

.PHONY: install test pytest ctest ctest-sanitize cuda-check gpu-check bench bench-quick bench-8bit-bound clean

install: $(VENV)/.installed

# Says what each step does; pip's output goes to $(VENV)/install.log, shown
# (its end) only when a step fails.
$(VENV)/.installed: $(SOURCES)
	@echo "install: creating $(VENV) (log: $(VENV)/install.log)"
	@$(PYTHON) -m venv $(VENV) && : > $(VENV)/install.log
	@echo "install: [1/3] torch==$(TORCH_VERSION), CPU build (about a minute the first time)"
	@$(PY) -m pip install torch==$(TORCH_VERSION) >> $(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; exit 1; }
	@echo "install: [2/3] build tools (setuptools, wheel, ninja, cmake)"
	@$(PY) -m pip install setuptools wheel ninja cmake >> $(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; exit 1; }
	@echo "install: [3/3] test and bench tools, and fastopt's C++ extension compiled against that torch (several minutes on 2 cores)"
	@$(PY) -m pip install --no-build-isolation -e '.[test,bench]' >> $(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; exit 1; }
	@touch $@
	@echo "install: done"

test: pytest ctest ctest-sanitize

pytest: install
	$(PY) -m pytest -q --durations=15

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

# Where an Adam step with 8-bit state spends its CPU time on one core (the
# rule, the codec, both), in L1 and in memory: bench/cpu_8bit_bound.cpp.
# Header-only, no torch; setup.py's floating-point flags, and the best ISA of
# this CPU (the extension picks it at run time).
CXX ?= g++
bench-8bit-bound:
	mkdir -p build
	$(CXX) -std=c++20 -O3 -march=native -mprefer-vector-width=512 -ffp-contract=off -fno-math-errno \
	    -fno-trapping-math -Icsrc bench/cpu_8bit_bound.cpp -o build/cpu_8bit_bound
	build/cpu_8bit_bound

clean:
	rm -rf $(VENV) build build-cmake build-cmake-asan bench-out fastopt/_C*.so *.egg-info
