"""fastopt.LAMB: LAMB (You et al. 2019, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", Algorithm 2) as NVIDIA Apex's
FusedLAMB and DeepSpeed define it, on fused kernels (csrc/rules/lamb.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_adam_style
from .optimizer import FusedOptimizer, _scalar, large_model_options, MIN_8BIT_SIZE


class LAMB(FusedOptimizer):
    """Drop-in for ``apex.optimizers.FusedLAMB`` (its arguments and defaults),
    with torch.optim's conventions: state ``step`` (per param, a 0-dim
    float32 tensor, as torch.optim.Adam), ``exp_avg`` and ``exp_avg_sq``,
    errors worded as torch.optim.Adam's, ``maximize``.

    Per step and param: Adam's moments (``grad_averaging``: ``m`` takes
    ``(1 - beta1) * g``, else ``g``; ``bias_correction``) give the update
    ``u = m_hat / (sqrt(v_hat) + eps)``, plus ``weight_decay * p`` in
    ``adam_w_mode`` (else the decay is added to the grad, L2); then
    ``p -= lr * ratio * u`` with the trust ratio ``||p|| / ||u||`` of the
    whole param (1 where either norm is 0, or where ``weight_decay`` is 0
    unless ``use_nvlamb``).  The norms are taken in a first pass over the
    params (Note [Reduction phase] in csrc/rules/reduction.h).

    ``max_grad_norm`` (default 1.0, as Apex; None: off) clips the grads'
    global norm inside the step as fastopt's optimizers do, as
    ``torch.nn.utils.clip_grad_norm_`` would (Apex divides by
    ``norm / max_grad_norm``: the same but for torch's 1e-6 in the norm).
    ``amsgrad=True`` raises, as in Apex.  DTensor params (FSDP2) raise
    NotImplementedError: the norms span ranks.  See :class:`fastopt.Adam`
    for fastopt's other keyword-only extras."""

    _op = "lamb"
    _op_slots = ("exp_avg", "exp_avg_sq")
    _sparse_grad_error = "LAMB does not support sparse gradients"
    _norms_per_param = True

    def __init__(self, params, lr: float | Tensor = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 *, amsgrad: bool = False, adam_w_mode: bool = True, grad_averaging: bool = True,
                 max_grad_norm: float | None = 1.0, use_nvlamb: bool = False, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, backend: str | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if amsgrad:
            raise RuntimeError("LAMB does not support the AMSGrad variant.")
        check_adam_style(lr, betas, weight_decay, foreach=foreach, capturable=capturable, fused=fused, eps=eps)
        defaults = {
            "lr": lr,
            "bias_correction": bias_correction,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "adam_w_mode": adam_w_mode,
            "grad_averaging": grad_averaging,
            "use_nvlamb": use_nvlamb,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
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
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": _scalar(beta1), "beta2": _scalar(beta2), "eps": group["eps"],
                "weight_decay": group["weight_decay"], "bias_correction": group["bias_correction"],
                "adam_w_mode": group["adam_w_mode"], "grad_averaging": group["grad_averaging"],
                "use_nvlamb": group["use_nvlamb"], "maximize": group["maximize"]}
