"""Loading of the compiled kernels and the choice of backend.

The extension ``fastopt._C`` registers the ops ``torch.ops.fastopt.*`` (see
csrc/optimizer_ops.cpp).  When it cannot be loaded, fastopt runs every step on
``fastopt.reference`` and says why once per process.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Any

import torch

from . import _fake, reference

try:
    importlib.import_module(f"{__package__}._C")  # registers torch.ops.fastopt

    _LOAD_ERROR: str | None = None
except Exception as error:  # any failure to load means: use the reference
    _LOAD_ERROR = f"{type(error).__name__}: {error}"
else:
    _fake.register_fakes()

BACKENDS = ("auto", "fused", "reference")
_ENV_BACKEND = "FASTOPT_BACKEND"
_fallback_warned = False


def _registered_device_types() -> tuple[str, ...]:
    if _LOAD_ERROR is not None:
        return ()
    return tuple(
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("fastopt::adam_", key)
    )


# Asked once: every kernel registers when fastopt._C loads, and a compiled
# step cannot trace the dispatcher query (it returns no tensor).
_COMPILED_DEVICE_TYPES = _registered_device_types()


def backends() -> dict[str, Any]:
    """What is compiled and loaded: devices with fused kernels, the CPU
    instruction set the kernels run with, and why loading failed (if it did)."""
    devices = _COMPILED_DEVICE_TYPES
    return {
        "fused_devices": list(devices),
        "cpu_capability": torch.ops.fastopt.cpu_capability() if "cpu" in devices else None,
        "load_error": _LOAD_ERROR,
        "default_backend": os.environ.get(_ENV_BACKEND, "auto"),
    }


def resolve_backend(backend: str | None) -> str:
    """The backend an optimizer uses: the keyword, else $FASTOPT_BACKEND, else auto."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(_ENV_BACKEND, "auto"), f"${_ENV_BACKEND}"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend


class _CompiledKernels:
    """``torch.ops.fastopt`` shaped like the reference module: the ops as
    attributes, plus the ``BoundTensors`` class."""

    def __getattr__(self, name: str) -> Any:
        if name == "BoundTensors":
            return _bound_tensors
        return getattr(torch.ops.fastopt, name)


def _bound_tensors(params: list, slots: list, scalar_states: list, masters: list,
                   scales: list | None = None) -> Any:
    """The compiled BoundTensors with the reference's signature (``scales``:
    the 8-bit slots' block scales, one list per slot, optional)."""
    return torch.classes.fastopt.BoundTensors(params, slots, scalar_states, masters, scales or [])


_COMPILED = _CompiledKernels()


def kernels_for(backend: str, device: torch.device) -> ModuleType | Any:
    """The object whose ``adam_``, ``adam_bound_``, ..., ``BoundTensors`` run a
    step on ``device``: the compiled ops, or the reference module."""
    if backend == "reference":
        return reference
    if device.type in _COMPILED_DEVICE_TYPES:
        return _COMPILED
    reason = (
        f"the compiled extension failed to load ({_LOAD_ERROR})"
        if _LOAD_ERROR is not None
        else f"it was built without kernels for {device.type} tensors"
    )
    if backend == "fused":
        raise RuntimeError(f"fastopt: backend='fused' needs compiled kernels for {device}, but {reason}")
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"fastopt: running the pure-PyTorch reference (slow) because {reason}",
            RuntimeWarning,
            stacklevel=4,
        )
    return reference
