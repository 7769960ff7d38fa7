"""fastopt.Rprop: torch.optim's Rprop on fused kernels (csrc/rules/rprop.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .optimizer import FusedOptimizer, _scalar, large_model_options, MIN_8BIT_SIZE


class Rprop(FusedOptimizer):
    """Drop-in for :class:`torch.optim.Rprop` (same arguments, defaults, errors,
    ``param_groups`` keys and state: ``step``, ``prev`` and ``step_size``,
    which starts filled with lr); see :class:`fastopt.Adam` for fastopt's
    keyword-only extras."""

    _op = "rprop"
    _op_slots = ("prev", "step_size")
    _scalar_states = ("step",)
    _sparse_grad_error = "Rprop does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50), *, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False,
                 backend: str | None = None, max_grad_norm: float | None = None,
                 master_weights: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
        defaults = {
            "lr": lr,
            "etas": etas,
            "step_sizes": step_sizes,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    def _init_slots(self, group, param, state):
        lr = group["lr"]
        # torch.optim fills a complex param's step sizes with lr + lr*j: both
        # halves of the real pair the kernels step.  A tensor lr is copied.
        fill = {"prev": 0, "step_size": complex(_scalar(lr), _scalar(lr)) if param.is_complex() else lr}
        for name in self._slot_names(group):
            if state.get(name) is None:
                self._new_slot(param, state, name, fill=fill[name])

    def _hyper(self, group):
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        return {"etaminus": etaminus, "etaplus": etaplus, "step_size_min": step_size_min,
                "step_size_max": step_size_max, "maximize": group["maximize"]}
