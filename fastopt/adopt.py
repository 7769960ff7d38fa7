"""fastopt.ADOPT: ADOPT (Taniguchi et al. 2024, "ADOPT: Modified Adam Can
Converge with Any beta2 with the Optimal Rate") on fused kernels
(csrc/rules/adopt.h), with the arguments and state of the authors'
reference implementation (github.com/iShohei220/adopt)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_adam_style
from .optimizer import FusedOptimizer, _scalar, large_model_options, MIN_8BIT_SIZE


def default_clip_lambda(step: float) -> float:
    """The reference's default clipping schedule: the normalized grad of step
    ``step`` is clamped to ``+-step**0.25``."""
    return step**0.25


class ADOPT(FusedOptimizer):
    """ADOPT with the authors' reference arguments (``decouple``: decoupled
    weight decay ``p *= 1 - lr * weight_decay`` instead of L2), defaults and
    state (``step``, a 0-dim float32 tensor, ``exp_avg``, ``exp_avg_sq``) and
    torch.optim's conventions (``maximize``; ``foreach``, ``capturable`` and
    ``fused`` accepted and recorded; errors worded as torch.optim.Adam's).
    A param's first step only initializes ``exp_avg_sq``.  See
    :class:`fastopt.Adam` for fastopt's keyword-only extras.

    ``clip_lambda`` is the reference's ``step**0.25`` (``default_clip_lambda``)
    or None (no clipping): the kernels compute the bound per tensor from its
    step count, so other callables are rejected.
    """

    _op = "adopt"
    _op_slots = ("exp_avg", "exp_avg_sq")
    _scalar_states = ("step",)
    _sparse_grad_error = "ADOPT does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.9999),
                 eps: float = 1e-6, clip_lambda=default_clip_lambda, weight_decay: float = 0.0,
                 decouple: bool = False, *, foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 backend: str | None = None, max_grad_norm: float | None = None,
                 master_weights: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        check_adam_style(lr, betas, weight_decay, foreach=foreach, capturable=capturable, fused=fused,
                         eps=eps)
        if clip_lambda is not None and clip_lambda is not default_clip_lambda:
            raise ValueError("fastopt.ADOPT supports clip_lambda=None (no clipping) or the default "
                             f"fastopt.adopt.default_clip_lambda (step**0.25), got {clip_lambda!r}")
        # Not a param-group key, as in the reference: param_groups stay its own.
        self.clip_lambda = clip_lambda
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "decouple": decouple,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def __getstate__(self):
        state = super().__getstate__()
        state["clip_lambda"] = self.clip_lambda
        return state

    def __setstate__(self, state):
        # load_state_dict lands here without it: keep this optimizer's.
        state.setdefault("clip_lambda", getattr(self, "clip_lambda", default_clip_lambda))
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decouple", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": _scalar(beta1), "beta2": _scalar(beta2), "eps": group["eps"],
                "weight_decay": group["weight_decay"], "decoupled_weight_decay": group["decouple"],
                "clip_normalized_grad": self.clip_lambda is not None, "maximize": group["maximize"]}
