"""fastopt.GradScaler: torch.amp.GradScaler with one pass over the grads
before a clipped fastopt step.

torch's ``GradScaler.step`` checks the grads for infs and NaNs
(``_check_inf_per_device``, a pass over them) before it calls ``step`` of an
optimizer that unscales in its own kernels, as fastopt's do.  With
``max_grad_norm`` the step then needs the grads' norm, a second pass.  Here
the check of a fastopt optimizer with ``max_grad_norm`` is fastopt's sum of
squares of the (scaled) grads per device: non-finite exactly when some grad
is (the sum is in float64, see csrc/cpu/grad_norm_cpu.cpp), and the same
sums give the step its norm (Note [Fused gradient clipping] in
fastopt/clip.py).  They are handed to the optimizer only for the step that
``GradScaler.step`` runs right after the check, and dropped after it.
"""
from __future__ import annotations

from typing import Any

import torch

from .optimizer import FusedOptimizer

__all__ = ["GradScaler"]


class GradScaler(torch.amp.GradScaler):
    """Drop-in for :class:`torch.amp.GradScaler` (same arguments and
    methods).  For fastopt optimizers with ``max_grad_norm``, ``step`` reads
    the grads once for the inf check and the norm together, instead of once
    for each; other optimizers are handled exactly as by torch's scaler.

    Call ``scaler.unscale_(optimizer)`` only if you need the unscaled grads
    in ``p.grad``: it rewrites them (torch's unscale) and the step then reads
    them again for the norm.
    """

    # The optimizer whose GradScaler.step is running: only then do the sums
    # of the inf check reach the optimizer (its step follows the check).
    _stepping: torch.optim.Optimizer | None = None

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        self._stepping = optimizer
        try:
            return super().step(optimizer, *args, **kwargs)
        finally:
            self._stepping = None
            if isinstance(optimizer, FusedOptimizer):
                optimizer._scaler_grad_sq_sums = None

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
        if not isinstance(optimizer, FusedOptimizer) or optimizer.max_grad_norm is None:
            return super()._check_inf_per_device(optimizer)
        self._check_scale_growth_tracker("_check_inf_per_device")
        sq_sums = optimizer._grad_sq_sums()
        found_inf_per_device = {device: sq_sum.isfinite().logical_not().to(torch.float32)
                                for device, sq_sum in sq_sums.items()}
        self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = found_inf_per_device
        if self._stepping is optimizer:
            optimizer._scaler_grad_sq_sums = (optimizer._grad_bindings, sq_sums)
        return found_inf_per_device
