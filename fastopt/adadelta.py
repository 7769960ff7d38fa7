"""fastopt.Adadelta: torch.optim's Adadelta on fused kernels (csrc/rules/adadelta.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .optimizer import FusedOptimizer, large_model_options, MIN_8BIT_SIZE


class Adadelta(FusedOptimizer):
    """Drop-in for :class:`torch.optim.Adadelta` (same arguments, defaults,
    errors, ``param_groups`` keys and state: ``step``, ``square_avg``,
    ``acc_delta``); see :class:`fastopt.Adam` for fastopt's keyword-only
    extras.  ``foreach`` and ``capturable`` are accepted and recorded."""

    _op = "adadelta"
    _op_slots = ("square_avg", "acc_delta")
    _scalar_states = ("step",)
    _sparse_grad_error = "Adadelta does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0, foreach: bool | None = None, *, capturable: bool = False,
                 maximize: bool = False, differentiable: bool = False, backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "foreach": foreach,
            "differentiable": differentiable,
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

    def _hyper(self, group):
        return {"rho": group["rho"], "eps": group["eps"], "weight_decay": group["weight_decay"],
                "maximize": group["maximize"]}
