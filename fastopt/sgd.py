"""fastopt.SGD: torch.optim's SGD with momentum / Nesterov on fused kernels
(csrc/rules/sgd.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_sgd_style
from .optimizer import FusedOptimizer, large_model_options, MIN_8BIT_SIZE


class SGD(FusedOptimizer):
    """Drop-in for :class:`torch.optim.SGD`; see :class:`fastopt.Adam` for
    fastopt's keyword-only extras.  The momentum buffer starts as a copy of the
    first gradient, as in torch.optim.  Sparse grads run on the reference
    (see Note [Failed steps] in optimizer.py)."""

    _op = "sgd"
    _op_slots = ("momentum_buffer",)
    _scalar_states = ()
    _optional_slots = ("momentum_buffer",)  # torch.optim creates it on the first momentum step

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        check_sgd_style(lr, momentum, dampening, weight_decay, nesterov, foreach=foreach, fused=fused)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _slot_names(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _hyper(self, group):
        return {"momentum": group["momentum"], "dampening": group["dampening"],
                "weight_decay": group["weight_decay"], "nesterov": group["nesterov"],
                "maximize": group["maximize"]}

    def _run(self, group, bucket, step_args):
        # A bucket of fresh state holds buffers that start as a copy of the grad.
        super()._run(group, bucket, {**step_args, "first_momentum_step": bucket.fresh})
