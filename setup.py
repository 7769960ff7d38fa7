"""Build fastopt: the CPU extension always, the CUDA extension when torch has
CUDA and nvcc is available (the CUDA kernels arrive with the CUDA backend).

Build against the installed torch: pip install --no-build-isolation .
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# -ffp-contract=off: no fused multiply-add contraction, so the AVX-512, AVX2
# and baseline element loops round identically (Note [CPU driver layout]).
# -fno-math-errno lets sqrt vectorize.  No -march: the ISA is chosen at run
# time per function, so one wheel runs on any x86-64.
CXX_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno"]


def cpu_sources():
    patterns = ["csrc/*.cpp", "csrc/cpu/*.cpp"]
    return sorted(
        os.path.relpath(path, ROOT)
        for pattern in patterns
        for path in glob.glob(os.path.join(ROOT, pattern))
    )


setup(
    ext_modules=[
        CppExtension(
            name="fastopt._C",
            sources=cpu_sources(),
            extra_compile_args={"cxx": CXX_FLAGS},
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
