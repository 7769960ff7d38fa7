"""Timers, the warm-up / repeat policy, cache rotation and peak extra memory.

Method (DESIGN.md, Benchmarks):
* A *pass* steps every param-set copy once (see rotation below); a sample is
  the time of one pass divided by the number of copies.
* The first pass creates optimizer state and is not timed; then warm-up
  passes (at least ``min_warmup``, until ``warmup_s`` has elapsed, at most
  ``max_warmup``), the first of which measures peak extra memory when asked;
  then ``repeats`` timed passes.  Without an explicit ``repeats``, enough
  passes to fill ``target_s`` (clamped to [min_repeats, max_repeats]) based on
  the warm-up time.  Reported: min / median / max of the samples.
* The implementations compared in one row group (same workload, dtype and
  option set) are alive together and their timed passes are interleaved in
  rounds, so a change in machine load during the group (a shared machine)
  hits all of them alike instead of skewing the ratios.
* CPU samples use time.perf_counter around the pass.  On CUDA a pass is
  bracketed by CUDA events after a synchronize (the hook is ``Timer``).
* The reference bandwidth of the device is that of ``dst.copy_(src)`` on a
  buffer far beyond the last-level cache (:func:`copy_bandwidth`), timed the
  same way; bytes moved per copy = read + write = 2 x buffer size.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Seconds one call of ``fn`` takes on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # Record on the device's current stream (the one torch.optim and
            # fastopt launch on), also when ``device`` is not the current device.
            stream = torch.cuda.current_stream(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


@dataclass
class Policy:
    repeats: int | None = None  # None: fill target_s
    target_s: float = 0.5
    min_repeats: int = 3
    max_repeats: int = 50
    min_warmup: int = 1
    max_warmup: int = 10
    warmup_s: float = 0.2
    measure_memory: bool = True


@dataclass
class Measurement:
    samples: list[float]  # seconds per step
    peak_extra_bytes: int | None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def rotation_copies(footprint_bytes: int, llc_bytes: int, factor: int = 2, cap: int = 16) -> int:
    """How many independent copies of the param set (with their own grads and
    optimizer state) to step round-robin so that each step finds its data out
    of the last-level cache: enough that one pass touches >= factor x LLC."""
    if footprint_bytes <= 0:
        return 1
    return max(1, min(cap, math.ceil(factor * llc_bytes / footprint_bytes)))


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's C++ chatter on fd 2 (it would break the progress bar)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes a call of ``fn`` allocates beyond what is live before it.

    CUDA: the caching allocator's peak statistics.  CPU: the allocation and
    free events of torch's CPU allocator recorded by torch.profiler
    (profile_memory=True), summed in time order.  This counts every tensor a
    step allocates (temporaries of foreach/for-loop steps included) but not
    memory that bypasses torch's allocator (Python objects, small vectors
    inside C++ ops), so it is a lower bound; RSS is not used because glibc
    reuses freed pages and would hide repeated temporaries.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]"]
    except Exception:  # private profiler API moved: report no number rather than a wrong one
        return None
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda event: event[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_group(cases: dict[str, Sequence[Callable[[], object]]], device: torch.device,
                  policy: Policy, max_repeats: dict[str, int | None] | None = None,
                  measure_memory: bool | None = None,
                  on_error: Callable[[str, Exception], None] | None = None,
                  on_phase: Callable[[str], None] | None = None) -> dict[str, Measurement]:
    """Times several implementations of one step (name -> one step function
    per param-set copy), interleaved so that slow drifts in machine load hit
    every implementation alike (see the module docstring for the method).

    Each case is set up in turn: state-creating pass, then warm-up passes
    (the first measures peak extra memory when asked).  The repeats each case
    wants are then taken in ``rounds`` = the smallest repeat count: every round
    times each case ``ceil(repeats / rounds)`` passes, cases in rotating order.
    A case that raises is dropped and reported through ``on_error``.
    """
    timer = Timer(device)
    max_repeats = max_repeats or {}
    measure_memory = policy.measure_memory if measure_memory is None else measure_memory
    passes: dict[str, Callable[[], None]] = {}
    copies: dict[str, int] = {}
    wanted: dict[str, int] = {}
    peaks: dict[str, int | None] = {}

    def fail(name: str, error: Exception) -> None:
        passes.pop(name, None)
        if on_error is not None:
            on_error(name, error)

    for name, steps in cases.items():
        if on_phase is not None:
            on_phase(f"warm-up {name}")

        def one_pass(steps=steps) -> None:
            for step in steps:
                step()

        try:
            one_pass()  # creates optimizer state
            warm: list[float] = []
            began = time.perf_counter()
            peaks[name] = None
            if measure_memory:
                # The profiled pass doubles as the first warm-up pass; its time
                # (with profiler overhead) only guides the choice of repeats.
                start = time.perf_counter()
                peaks[name] = peak_extra_bytes(steps[0], device)
                for step in steps[1:]:
                    step()
                synchronize(device)  # CUDA: the steps above were only queued
                warm.append((time.perf_counter() - start) / len(steps))
            while len(warm) < policy.max_warmup and (
                len(warm) < policy.min_warmup or time.perf_counter() - began < policy.warmup_s
            ):
                warm.append(timer(one_pass) / len(steps))
        except Exception as error:
            fail(name, error)
            continue
        if policy.repeats is not None:
            repeats = policy.repeats
        else:
            estimate = max(statistics.median(warm), 1e-9)
            repeats = min(policy.max_repeats, max(policy.min_repeats, round(policy.target_s / estimate)))
        if max_repeats.get(name) is not None:
            repeats = min(repeats, max_repeats[name])
        passes[name], copies[name], wanted[name] = one_pass, len(steps), max(1, repeats)

    samples: dict[str, list[float]] = {name: [] for name in passes}
    rounds = min(wanted.values(), default=0)
    names = list(passes)
    for round_index in range(rounds):
        if on_phase is not None:
            on_phase(f"timing round {round_index + 1}/{rounds}")
        shift = round_index % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            if name not in passes:
                continue
            try:
                for _ in range(math.ceil(wanted[name] / rounds)):
                    samples[name].append(timer(passes[name]) / copies[name])
            except Exception as error:
                fail(name, error)
    return {name: Measurement(samples[name], peaks[name]) for name in passes if samples[name]}


COPY_MIN_BYTES_CPU = 256 * 2**20
COPY_BYTES_CUDA = 2**30


def copy_buffer_bytes(device: torch.device, llc_bytes: int) -> int:
    """Size of each of the two copy buffers: 1 GiB on CUDA (less when the GPU
    has little free memory); on CPU 4x the last-level cache, at least 256 MiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(COPY_BYTES_CUDA, max(64 * 2**20, free // 8) // 2**20 * 2**20)
    return max(4 * llc_bytes, COPY_MIN_BYTES_CPU)


def copy_bandwidth(device: torch.device, llc_bytes: int, policy: Policy) -> dict:
    """The device's achievable streaming bandwidth as a reference: ``dst.copy_(src)``
    of two uint8 buffers of :func:`copy_buffer_bytes` each (on CUDA a
    device-to-device cudaMemcpy), bytes moved = read + write = 2 x size.
    Untimed first copy, warm-up copies (>= 2, ~``warmup_s``), then timed
    copies (``policy.repeats``, else enough for ~``target_s``, 5 to 50),
    each timed alone like an optimizer pass (:class:`Timer`); GB/s from the
    median."""
    size = copy_buffer_bytes(device, llc_bytes)
    src = torch.empty(size, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    timer = Timer(device)
    copy = lambda: dst.copy_(src)  # noqa: E731
    copy()  # first touch of dst (CPU page faults)
    warm: list[float] = []
    began = time.perf_counter()
    while len(warm) < 2 or (len(warm) < 20 and time.perf_counter() - began < policy.warmup_s):
        warm.append(timer(copy))
    repeats = policy.repeats if policy.repeats is not None else min(
        50, max(5, round(policy.target_s / max(statistics.median(warm), 1e-9))))
    samples = [timer(copy) for _ in range(max(5, repeats))]
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the 2 buffers back before the workloads
    median = statistics.median(samples)
    method = ("dst.copy_(src), uint8 buffers on the device (a device-to-device cudaMemcpy), "
              "CUDA events after a synchronize" if device.type == "cuda" else
              f"dst.copy_(src), uint8 buffers ({torch.get_num_threads()} threads), "
              "time.perf_counter; buffer ≥ 4× the last-level cache")
    return {
        "device": str(device),
        "buffer_bytes": size,
        "bytes_per_copy": 2 * size,
        "method": method,
        "median_ms": median * 1e3,
        "min_ms": min(samples) * 1e3,
        "max_ms": max(samples) * 1e3,
        "repeats": len(samples),
        "gbps": 2 * size / median / 1e9,
        "gbps_best": 2 * size / min(samples) / 1e9,
    }
