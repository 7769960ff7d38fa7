"""fastopt.ASGD: torch.optim's ASGD on fused kernels (csrc/rules/asgd.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .optimizer import FusedOptimizer, large_model_options, MIN_8BIT_SIZE


class ASGD(FusedOptimizer):
    """Drop-in for :class:`torch.optim.ASGD` (same arguments, defaults, errors,
    ``param_groups`` keys and state: ``step``, ``eta`` and ``mu`` as 0-dim
    float32 tensors, ``ax`` shaped like the param); see :class:`fastopt.Adam`
    for fastopt's keyword-only extras.

    As in torch.optim, a step updates the param with the ``eta`` and ``mu``
    the previous step stored (``eta`` starts at lr, ``mu`` at 1), then stores
    ``eta = lr / (1 + lambd * lr * step)**alpha`` and
    ``mu = 1 / max(1, step - t0)`` for the next one.
    """

    _op = "asgd"
    _op_slots = ("ax",)
    _scalar_states = ("step", "eta", "mu")
    _sparse_grad_error = "ASGD does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1e-2, lambd: float = 1e-4, alpha: float = 0.75,
                 t0: float = 1e6, weight_decay: float = 0, foreach: bool | None = None,
                 maximize: bool = False, differentiable: bool = False, capturable: bool = False, *,
                 backend: str | None = None, max_grad_norm: float | None = None,
                 master_weights: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "lambd": lambd,
            "alpha": alpha,
            "t0": t0,
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

    def _initial_scalar_state(self, group, param, name):
        # torch.optim.ASGD: eta starts at the group's lr (a tensor lr is copied), mu at 1, step at 0.
        return {"eta": group["lr"], "mu": 1.0}.get(name, 0.0)

    def _hyper(self, group):
        return {"lambd": group["lambd"], "alpha": group["alpha"], "t0": group["t0"],
                "weight_decay": group["weight_decay"], "maximize": group["maximize"]}
