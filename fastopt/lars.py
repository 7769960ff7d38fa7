"""fastopt.LARS: layer-wise adaptive rate scaling (You et al. 2017, "Large
Batch Training of Convolutional Networks", Algorithm 1) on fused kernels
(csrc/rules/lars.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_sgd_style
from .optimizer import FusedOptimizer, large_model_options, MIN_8BIT_SIZE


class LARS(FusedOptimizer):
    """LARS in the form of torchlars, NVIDIA's LARC and pytorch-optimizer's
    ``LARS``: per param, the trust ratio

        ``ratio = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps)``

    (1 where ``||p||`` or the denominator is 0) scales ``g + weight_decay * p``,
    then SGD with momentum applies ``lr``: ``b = momentum * b + (1 - dampening)
    * d`` (the buffer starts at zero, as in the paper), ``d = d + momentum * b``
    with ``nesterov``, else ``b``; ``p -= lr * d``.  ``momentum=0``: no
    buffer, ``p -= lr * d``.  The norms of the whole param are taken in a first
    pass (Note [Reduction phase] in csrc/rules/reduction.h).

    ``exclude_1d=True`` leaves params of at most one dimension (biases,
    normalization weights) out of the adaptation and the weight decay: they
    take plain SGD with momentum, as SimCLR, BYOL and Barlow Twins train
    them (and as pytorch-optimizer's LARS always does).  State
    ``momentum_buffer``, as torch.optim.SGD.  DTensor params (FSDP2) raise
    NotImplementedError: the norms span ranks.  See :class:`fastopt.Adam` for
    fastopt's keyword-only extras."""

    _op = "lars"
    _op_slots = ("momentum_buffer",)
    _scalar_states = ()
    _sparse_grad_error = "LARS does not support sparse gradients"
    _norms_per_param = True

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0.9, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, trust_coefficient: float = 1e-3,
                 eps: float = 1e-8, exclude_1d: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 backend: str | None = None, max_grad_norm: float | None = None,
                 master_weights: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        check_sgd_style(lr, momentum, dampening, weight_decay, nesterov, foreach=foreach, fused=fused)
        if not 0.0 <= trust_coefficient:
            raise ValueError(f"Invalid trust_coefficient value: {trust_coefficient}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "exclude_1d": exclude_1d,
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
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    def _slot_names(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _bucket_kind(self, group, param):
        # Excluded params are stepped by a call of their own, without adaptation.
        return group["exclude_1d"] and param.dim() <= 1

    def _hyper(self, group):
        return {"momentum": group["momentum"], "dampening": group["dampening"],
                "weight_decay": group["weight_decay"], "nesterov": group["nesterov"],
                "trust_coefficient": group["trust_coefficient"], "eps": group["eps"],
                "maximize": group["maximize"]}

    def _run(self, group, bucket, step_args):
        super()._run(group, bucket, {**step_args, "adapt": not bucket.kind})
