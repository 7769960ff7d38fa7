"""Build fastopt: the CPU extension always, the CUDA extension when torch has
CUDA and nvcc is available (the CUDA kernels arrive with the CUDA backend).

Build against the installed torch: pip install --no-build-isolation .
"""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import generate_sources  # noqa: E402  (scripts/ is not a package)

# The per-optimizer translation units (Note [The optimizer table]).
GENERATED = os.path.join("build", "generated")

# -ffp-contract=off: no fused multiply-add contraction, so the AVX-512, AVX2
# and baseline element loops round identically (Note [CPU driver layout]).
# -fno-math-errno lets sqrt vectorize.  -fno-trapping-math lets GCC turn a
# rule's select on a hyperparameter (weight_decay != 0 ? ... : ...) and c10's
# NaN test in float -> bfloat16 into vector selects: assuming traps, it kept
# them as branches, and without AVX-512's masks the loops that have one (16-bit
# storages, most of them) ran scalar.  Neither changes a value.  No -march:
# the ISA is chosen at run time per function, so one wheel runs on any x86-64.
# No -std: torch's BuildExtension adds the standard its headers need (C++20
# since torch 2.14 refuses C++17).
# -g0: Python's own build flags ask for debug info, which for the many
# instantiated kernels costs about a third of the compile time and is of no
# use in a release extension.
CXX_FLAGS = ["-O3", "-g0", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
# --fmad=false: no multiply-add contraction on the device either, so the CUDA
# kernels round every operation as the CPU kernels do (bit-identical where
# the per-step scalars agree; Note [CUDA emulation]).  The steps are
# memory-bound: the extra instructions cost no time.
NVCC_FLAGS = ["-O3", "--fmad=false"]
# at::parallel_for is inline and splits work only where the caller is built
# with OpenMP (torch's Linux wheels use OpenMP; libgomp resolves to torch's
# own copy, so there is one thread pool and torch.set_num_threads applies).
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []


def sources(*patterns):
    return sorted(
        os.path.relpath(path, ROOT)
        for pattern in patterns
        for path in glob.glob(os.path.join(ROOT, pattern))
    )


def extension():
    """fastopt._C: the CPU kernels always; the CUDA kernels (csrc/cuda/) too
    when torch was built with CUDA and nvcc is installed."""
    generated = {kind: [os.path.relpath(path, ROOT) for path in paths]
                 for kind, paths in generate_sources.generate(os.path.join(ROOT, GENERATED)).items()}
    cpu = sources("csrc/*.cpp", "csrc/cpu/*.cpp") + generated["cpu"]
    cuda = sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp") + generated["cuda"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if cuda and torch.version.cuda is not None and nvcc:
        return CUDAExtension(
            name="fastopt._C",
            sources=cpu + cuda,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=OPENMP_FLAGS,
        )
    return CppExtension(
        name="fastopt._C",
        sources=cpu,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS},
        extra_link_args=OPENMP_FLAGS,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
