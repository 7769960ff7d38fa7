"""fastopt.RMSprop: torch.optim's RMSprop (centered and/or momentum) on fused
kernels (csrc/rules/rmsprop.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .optimizer import FusedOptimizer, large_model_options, MIN_8BIT_SIZE


class RMSprop(FusedOptimizer):
    """Drop-in for :class:`torch.optim.RMSprop`; see :class:`fastopt.Adam` for
    fastopt's keyword-only extras."""

    _op = "rmsprop"
    _op_slots = ("square_avg", "grad_avg", "momentum_buffer")
    _sparse_grad_error = "RMSprop does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *, backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    def _slot_names(self, group):
        return (
            ("square_avg",)
            + (("grad_avg",) if group["centered"] else ())
            + (("momentum_buffer",) if group["momentum"] > 0 else ())
        )

    def _hyper(self, group):
        return {"alpha": group["alpha"], "eps": group["eps"], "weight_decay": group["weight_decay"],
                "momentum": group["momentum"], "centered": group["centered"],
                "maximize": group["maximize"]}
