"""fastopt.Adam and fastopt.AdamW: torch.optim's Adam/AdamW on fused kernels
(one rule, csrc/rules/adam.h, with an L2 or decoupled weight-decay mode)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_adam_style
from .optimizer import FusedOptimizer, large_model_options, _scalar, MIN_8BIT_SIZE


class Adam(FusedOptimizer):
    """Drop-in for :class:`torch.optim.Adam` (same arguments, defaults, errors,
    ``param_groups`` keys and state), plus keyword-only ``backend``:
    ``"auto"`` (compiled kernels when loaded, else the reference), ``"fused"``
    or ``"reference"``; default ``$FASTOPT_BACKEND`` or ``"auto"``.

    ``foreach``, ``fused`` and ``capturable`` are accepted and recorded for
    compatibility; fastopt always runs its own fused step.

    Keyword-only ``max_grad_norm`` (every fastopt optimizer): clip the grads'
    global L2 norm to it inside the step, as ``torch.nn.utils.clip_grad_norm_``
    would before it, without rewriting ``p.grad``; ``last_grad_norm`` holds
    the norm of the last step.

    Keyword-only large-model options (every fastopt optimizer; Note
    [Large-model options] in fastopt/optimizer.py): ``master_weights`` (float32
    copies of float16 / bfloat16 params), ``state_dtype`` (``torch.float32``,
    ``torch.bfloat16`` or ``torch.uint8``: 8-bit block-quantized state, kept
    as codes under torch.optim's key and float32 block scales under
    ``"<key>_scales"``), ``min_8bit_size`` (with ``state_dtype=torch.uint8``,
    params of fewer elements keep float32 state; default 4096) and
    ``stochastic_rounding`` (bfloat16 params).
    """

    _op = "adam"
    _op_slots = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _sparse_grad_error = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False,
                 backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        check_adam_style(lr, betas, weight_decay, foreach=foreach, capturable=capturable, fused=fused, eps=eps)
        defaults = {
            "lr": lr,
            "betas": tuple(beta.reshape(()) if isinstance(beta, Tensor) else beta for beta in betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)

    def _slot_names(self, group):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": _scalar(beta1), "beta2": _scalar(beta2), "eps": group["eps"],
                "weight_decay": group["weight_decay"],
                "decoupled_weight_decay": group["decoupled_weight_decay"], "amsgrad": group["amsgrad"],
                "maximize": group["maximize"]}


class AdamW(Adam):
    """Drop-in for :class:`torch.optim.AdamW`: Adam with decoupled weight decay
    (default ``weight_decay=1e-2``).  See :class:`Adam` for fastopt's extras."""

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, backend=backend,
                         max_grad_norm=max_grad_norm,
                         master_weights=master_weights, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding, min_8bit_size=min_8bit_size)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
