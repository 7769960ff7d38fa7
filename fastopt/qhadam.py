"""fastopt.QHAdam: quasi-hyperbolic Adam (Ma & Yarats, ICLR 2019) on fused
kernels (csrc/rules/qhadam.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_adam_style
from .optimizer import FusedOptimizer, _scalar, large_model_options, MIN_8BIT_SIZE


class QHAdam(FusedOptimizer):
    """QHAdam (Ma & Yarats, "Quasi-hyperbolic momentum and Adam for deep
    learning", ICLR 2019, section 4): each of Adam's bias-corrected moments is
    averaged with the current gradient (squared) by its ``nus`` weight::

        p -= lr * ((1 - nu1) g + nu1 m_hat) / (sqrt((1 - nu2) g^2 + nu2 v_hat) + eps)

    ``nus=(1.0, 1.0)`` is Adam.  The arguments, defaults and errors of the
    authors' ``qhoptim`` package (``weight_decay`` L2, or decoupled with
    ``decouple_weight_decay=True``: ``p *= 1 - lr * weight_decay``).  State as
    the paper writes it and as torch.optim.Adam keeps it: ``step``,
    ``exp_avg``, ``exp_avg_sq`` (the moments before bias correction; qhoptim
    keeps bias-corrected moments and its own weights, the same update up to
    rounding), so an Adam ``state_dict`` loads into QHAdam.  Plus
    ``maximize`` and fastopt's keyword-only extras (see :class:`fastopt.Adam`)."""

    _op = "qhadam"
    _op_slots = ("exp_avg", "exp_avg_sq")
    _sparse_grad_error = "QHAdam does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 nus: tuple[float, float] = (1.0, 1.0), weight_decay: float = 0.0,
                 decouple_weight_decay: bool = False, eps: float = 1e-8, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        check_adam_style(lr, betas, weight_decay, foreach=foreach, capturable=False, fused=None, eps=eps)
        for index, nu in enumerate(nus):
            if not 0.0 <= nu <= 1.0:
                raise ValueError(f"Invalid nu parameter at index {index}: {nu}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "nus": nus,
            "weight_decay": weight_decay,
            "decouple_weight_decay": decouple_weight_decay,
            "eps": eps,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def _hyper(self, group):
        (beta1, beta2), (nu1, nu2) = group["betas"], group["nus"]
        return {"beta1": _scalar(beta1), "beta2": _scalar(beta2), "nu1": nu1, "nu2": nu2, "eps": group["eps"],
                "weight_decay": group["weight_decay"],
                "decouple_weight_decay": group["decouple_weight_decay"], "maximize": group["maximize"]}
