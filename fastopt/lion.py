"""fastopt.Lion: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms") on fused kernels (csrc/rules/lion.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_adam_style
from .optimizer import FusedOptimizer, _scalar, large_model_options, MIN_8BIT_SIZE


class Lion(FusedOptimizer):
    """Lion with torch.optim's conventions: the update of lion-pytorch's
    ``Lion`` (decoupled weight decay ``p *= 1 - lr * weight_decay``), state
    ``exp_avg`` only (no step count), plus ``maximize``; ``foreach``,
    ``capturable`` and ``fused`` are accepted and recorded, errors are worded
    as torch.optim.Adam's.  See :class:`fastopt.Adam` for fastopt's
    keyword-only extras."""

    _op = "lion"
    _op_slots = ("exp_avg",)
    _scalar_states = ()
    _sparse_grad_error = "Lion does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 backend: str | None = None, max_grad_norm: float | None = None,
                 master_weights: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        check_adam_style(lr, betas, weight_decay, foreach=foreach, capturable=capturable, fused=fused)
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": _scalar(beta1), "beta2": _scalar(beta2), "weight_decay": group["weight_decay"],
                "maximize": group["maximize"]}
