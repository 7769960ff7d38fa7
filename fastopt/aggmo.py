"""fastopt.AggMo: aggregated momentum (Lucas et al., ICLR 2019) on fused
kernels (csrc/rules/aggmo.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .optimizer import FusedOptimizer, large_model_options, MIN_8BIT_SIZE

# One state slot per beta; the drivers keep at most three slots per param.
MAX_BETAS = 3


class AggMo(FusedOptimizer):
    """AggMo (Lucas, Sun, Zemel & Grosse, "Aggregated Momentum: Stability
    Through Passive Damping", ICLR 2019, Algorithm 1): one heavy-ball
    velocity per beta, the param moved by their average::

        b_k = beta_k * b_k + g;   p -= (lr / K) * b_k   for k = 1..K

    in the order of the authors' code (each buffer moves the param in turn),
    with its L2 ``weight_decay``.  Up to three betas (the paper's default
    ``(0.0, 0.9, 0.99)``).  State ``momentum_buffer_0`` .. ``_{K-1}``, one
    per beta in order (the authors' code keeps a dict keyed by beta).  Plus
    ``maximize`` and fastopt's keyword-only extras (see :class:`fastopt.Adam`)."""

    _op = "aggmo"
    _op_slots = tuple(f"momentum_buffer_{k}" for k in range(MAX_BETAS))
    _scalar_states = ()
    _sparse_grad_error = "AggMo does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, ...] = (0.0, 0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        _check_betas(betas)
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def add_param_group(self, param_group):
        if "betas" in param_group:
            _check_betas(param_group["betas"])
        super().add_param_group(param_group)

    def _slot_names(self, group):
        return self._op_slots[:len(group["betas"])]

    def _hyper(self, group):
        betas = tuple(group["betas"]) + (0.0,) * (MAX_BETAS - len(group["betas"]))
        return {"beta1": betas[0], "beta2": betas[1], "beta3": betas[2], "num_betas": float(len(group["betas"])),
                "weight_decay": group["weight_decay"], "maximize": group["maximize"]}


def _check_betas(betas) -> None:
    if not 1 <= len(betas) <= MAX_BETAS:
        raise ValueError(f"AggMo takes 1 to {MAX_BETAS} betas (one state slot each), got {len(betas)}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
