"""fastopt.Adamax: torch.optim's Adamax on fused kernels (csrc/rules/adamax.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .optimizer import FusedOptimizer, large_model_options, _scalar, MIN_8BIT_SIZE


class Adamax(FusedOptimizer):
    """Drop-in for :class:`torch.optim.Adamax` (same arguments, defaults, errors,
    ``param_groups`` keys and state: ``step``, ``exp_avg``, ``exp_inf``); see
    :class:`fastopt.Adam` for fastopt's keyword-only extras.  ``foreach`` and
    ``capturable`` are accepted and recorded."""

    _op = "adamax"
    _op_slots = ("exp_avg", "exp_inf")
    _scalar_states = ("step",)
    _sparse_grad_error = "Adamax does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 2e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, foreach: bool | None = None, *, maximize: bool = False,
                 differentiable: bool = False, capturable: bool = False, backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
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

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": _scalar(beta1), "beta2": _scalar(beta2), "eps": group["eps"],
                "weight_decay": group["weight_decay"],
                "maximize": group["maximize"]}
