"""Gradient clipping inside the step: ``max_grad_norm=`` of every fastopt optimizer.

Note [Fused gradient clipping]
``torch.nn.utils.clip_grad_norm_(params, max_norm)`` before a step reads the
grads three times (norm, scale in place, step) and rewrites them.  fastopt
reads them once for the norm (``fastopt::grad_sq_norm``, a deterministic sum
of squares per device, Note [Deterministic grad norm] in
csrc/cpu/grad_norm_cpu.cpp) and folds the clip coefficient into the ops'
``grad_scale``: the kernels already divide every grad by it in registers (for
AMP), so ``grad_scale = amp_scale / clip_coef`` clips without touching
``p.grad``.  Everything here is tensor ops, so a CUDA step needs no host sync.

The coefficient is clip_grad_norm_'s, in the dtype it computes it in (that of
the norms of the grads).  A non-finite norm behaves as in
``clip_grad_norm_(error_if_nonfinite=False)``: a NaN norm gives a NaN
coefficient and ``g / NaN`` is NaN as ``g * NaN``; an inf norm gives 0 and
``g / inf`` is ``g * 0`` (a zero of g's sign, NaN for an infinite g).  With AMP
(a ``grad_scale`` or ``found_inf``), a non-finite norm instead skips the step,
as a non-finite grad does.

fastopt.GradScaler (fastopt/amp.py) takes the sums in its inf check and hands
them to the step that follows, so the grads are read once before the step.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

# clip_grad_norm_'s coefficient is max_norm / (total_norm + 1e-6).
CLIP_NORM_EPS = 1e-6


def check_max_grad_norm(value: Any) -> float | None:
    """``max_grad_norm`` as a float (None: no clipping); a ValueError unless > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(f"Invalid max_grad_norm value: {value}")
    return float(value)


def norm_dtype(params: list[Tensor]) -> torch.dtype:
    """The dtype clip_grad_norm_ returns the norm of these params' grads in:
    their promoted (real) dtype."""
    dtypes = [p.dtype.to_real() if p.is_complex() else p.dtype for p in params]
    return functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32


def clipped_step_scales(sq_sums: dict[torch.device, Tensor], max_norm: float, grad_scale: Tensor | None,
                        found_inf: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
    """The ops' ``grad_scale`` and ``found_inf`` for a clipped step, and the
    grad norm (unscaled, in ``dtype``), on the first device of ``sq_sums``.

    ``sq_sums``: the sum of squares of the grads as they are (AMP-scaled by
    ``grad_scale`` when given) per device; ``grad_scale`` / ``found_inf``:
    AMP's, or None."""
    device = next(iter(sq_sums))
    sq_sum = sum(s.to(device, non_blocking=device.type != "cpu") for s in sq_sums.values())
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    amp_scale = (torch.ones((), dtype=opmath, device=device) if grad_scale is None
                 else grad_scale.to(device, opmath, non_blocking=device.type != "cpu"))
    total_norm = (sq_sum.sqrt() / amp_scale).to(dtype)
    clip_coef = (max_norm / (total_norm + CLIP_NORM_EPS)).clamp(max=1.0)
    step_scale = amp_scale / clip_coef.to(opmath)
    if grad_scale is not None or found_inf is not None:
        nonfinite = total_norm.isfinite().logical_not().to(torch.float32)
        if found_inf is not None:
            nonfinite = nonfinite + found_inf.to(device, non_blocking=device.type != "cpu")
        found_inf = nonfinite
    return step_scale, found_inf, total_norm
