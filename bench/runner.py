"""The benchmark loop: for each workload, dtype and optimizer option set,
build every implementation's step over the same params and time it
(timing.measure), then derive GB/s, % of roofline and speedup over torch."""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from . import timing
from .implementations import TORCH_IMPLS, PipelineStep, Unsupported, build_step
from .optimizers import SPECS, OptimizerSpec
from .progress import Progress
from .workloads import WORKLOADS, Workload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class Config:
    workloads: list[str]
    optimizers: list[str]
    dtypes: list[str]
    impls: list[str]
    device: torch.device
    policy: timing.Policy
    reference_max_numel: int = 17_000_000
    reference_max_repeats: int = 3
    rotation_factor: int = 2
    seed: int = 0


@dataclass
class Notes:
    """Report notes, each message once with the places it applies to."""

    where: dict[str, list[str]] = field(default_factory=dict)

    def add(self, message: str, place: str = "") -> None:
        places = self.where.setdefault(message, [])
        if place and place not in places:
            places.append(place)

    def lines(self) -> list[str]:
        out = []
        for message, places in self.where.items():
            if places:
                shown = ", ".join(places[:6]) + (f", … ({len(places)} in all)" if len(places) > 6 else "")
                out.append(f"{message} [{shown}]")
            else:
                out.append(message)
        return out


class ParamSets:
    """Independent copies of one workload's params (each with a random
    normal ``.grad``), created on demand and shared by every optimizer and
    implementation of this workload and dtype."""

    def __init__(self, workload: Workload, dtype: torch.dtype, device: torch.device, seed: int) -> None:
        self.workload, self.dtype, self.device, self.seed = workload, dtype, device, seed
        self.sets: list[list[torch.Tensor]] = []

    def get(self, copies: int) -> list[list[torch.Tensor]]:
        while len(self.sets) < copies:
            # Drawn on the device itself: on CUDA, drawing GPT-2 XL's 1.56B
            # params and grads on the CPU and copying them over takes minutes.
            generator = torch.Generator(device=self.device).manual_seed(self.seed + len(self.sets))
            params = []
            for shape in self.workload.shapes:
                p = torch.randn(shape, generator=generator, dtype=self.dtype, device=self.device)
                p.grad = torch.randn(shape, generator=generator, dtype=self.dtype, device=self.device)
                params.append(p)
            self.sets.append(params)
        return self.sets[:copies]


# The CUDA caching allocator hands out blocks of >= 1 MiB in 2 MiB steps.
def _cuda_bytes(workload: Workload, itemsize: int) -> int:
    """Device bytes of one tensor set shaped like ``workload`` (allocator rounding included)."""
    total = 0
    for shape in workload.shapes:
        n = math.prod(shape) * itemsize
        total += -(-n // (2 * 2**20)) * 2 * 2**20 if n >= 2**20 else -(-n // 512) * 512
    return total


def _cuda_free_bytes(device: torch.device) -> int:
    """Free device memory plus what torch's caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


CUDA_MARGIN_BYTES = 2 * 2**30


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def _row(config: Config, impl: str, spec: OptimizerSpec, workload: Workload, dtype_name: str,
         copies: int, measured: timing.Measurement) -> dict[str, Any]:
    bytes_per_step = spec.bytes_per_step(workload.numel, DTYPES[dtype_name].itemsize,
                                         roofline=impl == "roofline")
    median = measured.median
    return {
        "optimizer": spec.cls,
        # dtypes (state_dtype) by name, so the row is JSON
        "options": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in spec.options.items()},
        "option_set": spec.key,
        "label": spec.label,
        "workload": workload.name,
        "dtype": dtype_name,
        "device": str(config.device),
        "impl": impl,
        "median_ms": median * 1e3,
        "min_ms": min(measured.samples) * 1e3,
        "max_ms": max(measured.samples) * 1e3,
        "repeats": len(measured.samples),
        "copies": copies,
        "bytes_per_step": bytes_per_step,
        "gbps": bytes_per_step / median / 1e9,
        "roofline_fraction": None,
        "copy_bw_fraction": None,
        "speedup_vs_torch": None,
        "speedup_vs_pypi": None,
        "peak_extra_mib": _mib(measured.peak_extra_bytes),
    }


def _measure_group(config: Config, spec: OptimizerSpec, workload: Workload, dtype_name: str,
                   sets: ParamSets, copies: int, notes: Notes, progress: Progress) -> list[dict[str, Any]]:
    """Builds every implementation's steps for one (workload, dtype, option
    set) and times them together (timing.measure_group)."""
    place = f"{workload.name}/{dtype_name}/{spec.label}"
    label = f"{workload.name} {dtype_name} {spec.label}"
    cases: dict[str, list] = {}
    impl_copies: dict[str, int] = {}
    max_repeats: dict[str, int | None] = {}

    def failed(impl: str, error: Exception) -> None:
        first_line = (str(error).splitlines() or [""])[0][:200]
        notes.add(f"{impl} failed: {type(error).__name__}: {first_line}", place)
        cases.pop(impl, None)

    # On CUDA every implementation of the group keeps its own state on the GPU at
    # once (GPT-2 XL fp32 Adam: 11.6 GiB each); one that would not fit is skipped
    # up front instead of running out of memory mid-group and failing another.
    # Kept free: one param set for a step's temporaries (torch foreach) + a margin.
    budget = None
    if config.device.type == "cuda":
        sets.get(copies)
        set_bytes = _cuda_bytes(workload, DTYPES[dtype_name].itemsize)
        budget = _cuda_free_bytes(config.device) - set_bytes - CUDA_MARGIN_BYTES
    for impl in config.impls:
        n = copies
        if impl == "fastopt-reference":
            if workload.numel > config.reference_max_numel:
                notes.add(f"fastopt-reference skipped on workloads over {config.reference_max_numel:,} "
                          "elements (the pure-PyTorch reference is slow)", workload.name)
                continue
            max_repeats[impl] = config.reference_max_repeats
            n = 1
        need = n * spec.slots * set_bytes if budget is not None else 0
        if budget is not None and need > budget:
            notes.add(f"{impl} skipped: its state ({need / 2**30:.1f} GiB) does not fit in the GPU "
                      "memory left by the implementations before it", place)
            continue
        progress.show(f"{label}: build {impl}")
        try:
            cases[impl] = [build_step(impl, spec, params) for params in sets.get(n)]
            impl_copies[impl] = n
            if budget is not None:
                budget -= need
        except Unsupported as why:
            notes.add(f"{impl}: {why}", place)
        except Exception as error:  # an implementation failing must not stop the run
            failed(impl, error)
    # Memory is measured on the first dtype only (the profiler costs ~0.25 ms per
    # recorded op: seconds on 4000 tensors) and not on the overhead workload.
    measure_memory = (config.policy.measure_memory and not workload.overhead
                      and dtype_name == config.dtypes[0])
    try:
        measured = timing.measure_group(
            cases, config.device, config.policy, max_repeats=max_repeats,
            measure_memory=measure_memory, on_error=failed,
            on_phase=lambda phase: progress.show(f"{label}: {phase}"))
        skipped = {impl: sum(step.skipped_steps() for step in steps) for impl, steps in cases.items()
                   if isinstance(steps[0], PipelineStep)}
    finally:
        cases.clear()
        gc.collect()
    for impl, count in skipped.items():
        if count:  # a skipped step is not a step: its time would flatter the implementation
            failed(impl, RuntimeError(f"{count} pipeline steps were skipped (non-finite grads)"))
            measured.pop(impl, None)
    rows = [_row(config, impl, spec, workload, dtype_name, impl_copies[impl], measured[impl])
            for impl in config.impls if impl in measured]
    for row in rows:
        if row["impl"] in skipped:
            row["skipped_steps"] = skipped[row["impl"]]
    return rows


def _derive(rows: list[dict[str, Any]]) -> None:
    """Fills roofline_fraction, speedup_vs_torch and speedup_vs_pypi within
    one (workload, dtype, option set) group.  The roofline fraction is a ratio
    of bandwidths, which is the ratio of times where the roofline moves the
    same bytes (every option set but 8-bit state, OptimizerSpec.bytes_per_step)."""
    roofline = next((r["gbps"] for r in rows if r["impl"] == "roofline"), None)
    torch_times = [r["median_ms"] for r in rows if r["impl"] in TORCH_IMPLS]
    best_torch = min(torch_times) if torch_times else None
    pypi = next((r["median_ms"] for r in rows if r["impl"] == "pypi"), None)
    for r in rows:
        if roofline is not None:
            r["roofline_fraction"] = r["gbps"] / roofline
        if best_torch is not None:
            r["speedup_vs_torch"] = best_torch / r["median_ms"]
        if pypi is not None:
            r["speedup_vs_pypi"] = pypi / r["median_ms"]


def set_copy_fraction(rows: list[dict[str, Any]], copy_gbps: float | None) -> None:
    """copy_bw_fraction of every row: its GB/s over the device's copy bandwidth
    (timing.copy_bandwidth)."""
    for r in rows:
        r["copy_bw_fraction"] = r["gbps"] / copy_gbps if copy_gbps else None


def run(config: Config, llc_bytes: int, notes: Notes) -> list[dict[str, Any]]:
    workloads = [WORKLOADS[name] for name in config.workloads]
    specs = [SPECS[key] for key in config.optimizers]
    progress = Progress(len(workloads) * len(config.dtypes) * len(specs))
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for workload in workloads:
            for dtype_name in config.dtypes:
                dtype = DTYPES[dtype_name]
                sets = ParamSets(workload, dtype, config.device, config.seed)
                for spec in specs:
                    footprint = workload.numel * dtype.itemsize * (2 + spec.slots)
                    copies = 1 if workload.overhead else timing.rotation_copies(
                        footprint, llc_bytes, config.rotation_factor)
                    group = _measure_group(config, spec, workload, dtype_name, sets, copies, notes,
                                           progress)
                    _derive(group)
                    rows.extend(group)
                    progress.advance()
                del sets
                gc.collect()
                if config.device.type == "cuda":
                    torch.cuda.empty_cache()  # the next dtype's tensors have other sizes
    progress.close()
    return rows


def cache_policy_text(llc_bytes: int, factor: int) -> str:
    return (f"Workloads whose param+grad+state footprint is under {factor}× the last-level cache "
            f"({llc_bytes / 2**20:.0f} MiB) are stepped round-robin over ceil({factor}×LLC / footprint) "
            "independent copies (own params, grads and state; at most 16), so every step finds its "
            "data out of cache; the time reported is per step.  The `overhead` workload is never "
            "rotated: it is cache-resident on purpose and measures fixed per-step cost.  "
            "fastopt-reference is never rotated (it is far from memory-bound; rotating would only "
            "multiply its long run time).")


__all__ = ["Config", "Notes", "run", "set_copy_fraction", "DTYPES", "cache_policy_text"]
