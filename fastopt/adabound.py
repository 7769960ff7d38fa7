"""fastopt.AdaBound: AdaBound / AMSBound (Luo et al., ICLR 2019) on fused
kernels (csrc/rules/adabound.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_adam_style
from .optimizer import FusedOptimizer, _scalar, large_model_options, MIN_8BIT_SIZE


class AdaBound(FusedOptimizer):
    """AdaBound (Luo, Xiong, Liu & Sun, "Adaptive Gradient Methods with
    Dynamic Bound of Learning Rate", ICLR 2019): Adam whose per-element
    learning rate is clipped to bounds that converge to ``final_lr``, so it
    turns into SGD over training; ``amsbound=True`` is AMSBound.

    The arguments, defaults, errors and update of the authors' ``adabound``
    package (the code of the paper's experiments: bias-corrected step size,
    L2 ``weight_decay``, bounds ``final_lr * (1 -+ 1 / (gamma * t (+ 1)))``,
    no ``1/sqrt(t)`` factor — that factor of the paper's Algorithm 2 belongs
    to its convergence analysis).  As in the package, an LR schedule scales
    the bounds too: ``final_lr`` is taken times ``lr / base_lr``, where
    ``base_lr`` is the group's lr when it was added (a ``param_groups`` key,
    saved in ``state_dict``).  State: ``step``, ``exp_avg``, ``exp_avg_sq``
    and, with amsbound, ``max_exp_avg_sq``.  Plus ``maximize`` and fastopt's
    keyword-only extras (see :class:`fastopt.Adam`)."""

    _op = "adabound"
    _op_slots = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _sparse_grad_error = "AdaBound does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 final_lr: float = 0.1, gamma: float = 1e-3, eps: float = 1e-8, weight_decay: float = 0,
                 amsbound: bool = False, *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        check_adam_style(lr, betas, weight_decay, foreach=foreach, capturable=False, fused=None, eps=eps)
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr} (AdaBound scales final_lr by lr / initial lr)")
        if not 0.0 <= final_lr:
            raise ValueError(f"Invalid final learning rate: {final_lr}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"Invalid gamma parameter: {gamma}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "final_lr": final_lr,
            "gamma": gamma,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsbound": amsbound,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "base_lr" not in group:
            if not _scalar(group["lr"]) > 0:
                raise ValueError(f"Invalid learning rate: {group['lr']} (AdaBound scales final_lr by "
                                 "lr / initial lr)")
            group["base_lr"] = _scalar(group["lr"])

    def _slot_names(self, group):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsbound"] else ())

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": _scalar(beta1), "beta2": _scalar(beta2), "final_lr": group["final_lr"],
                "base_lr": group["base_lr"], "gamma": group["gamma"], "eps": group["eps"],
                "weight_decay": group["weight_decay"], "amsbound": group["amsbound"],
                "maximize": group["maximize"]}
