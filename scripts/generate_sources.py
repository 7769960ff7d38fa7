"""Writes the translation units that instantiate each optimizer of the table
(Note [The optimizer table] in csrc/optimizer_table.h) on each driver: one
per optimizer and driver, so the build compiles them in parallel and a rule
change recompiles that rule only.  Used by setup.py and CMakeLists.txt.

    python scripts/generate_sources.py OUT_DIR   # prints the files, one per line
"""
from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "csrc", "optimizer_table.h")

# (kind, file name, contents) for each row (name, Descriptor) of the table:
# the driver and the optimizer's own rule header (csrc/rules/<name>.h) only,
# so that a change to one rule, or a new row, recompiles that optimizer only.
# The includes are relative to csrc/, which the builds put on the include path.
UNITS = (
    ("cpu", "cpu_{name}.cpp",
     '#include "cpu/step_cpu.h"\n#include "rules/{name}.h"\n\nFASTOPT_INSTANTIATE_CPU_STEP({name}, {descriptor})\n'),
    ("cuda", "cuda_{name}.cu",
     '#include "cuda/multi_tensor_apply.cuh"\n#include "rules/{name}.h"\n\n'
     'FASTOPT_INSTANTIATE_CUDA_STEP({name}, {descriptor})\n'),
    # The CUDA unit as host C++ against the emulated runtime (CMake's C++ tests).
    ("emulated", "cuda_{name}_emulated.cpp", '#include "cuda_{name}.cu"\n'),
)


def table_rows() -> list[tuple[str, str]]:
    """The (name, Descriptor) rows of FASTOPT_OPTIMIZERS."""
    with open(TABLE) as f:
        rows = re.findall(r"^\s*X\((\w+), (\w+)\)", f.read(), re.M)
    if not rows:
        raise RuntimeError(f"{TABLE}: no X(name, Descriptor) rows found")
    return rows


def generate(out_dir: str) -> dict[str, list[str]]:
    """Writes the units into out_dir (only those whose text changed, so builds
    stay incremental); returns their paths by kind: cpu, cuda, emulated."""
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, list[str]] = {kind: [] for kind, _, _ in UNITS}
    for name, descriptor in table_rows():
        for kind, pattern, text in UNITS:
            path = os.path.join(out_dir, pattern.format(name=name))
            text = text.format(name=name, descriptor=descriptor)
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
            paths[kind].append(path)
    return paths


if __name__ == "__main__":
    for kind, files in generate(sys.argv[1]).items():
        for path in files:
            print(f"{kind} {path}")
