"""fastopt.Muon: torch.optim.Muon (momentum orthogonalized by Newton–Schulz
iterations) with its element-wise passes on fused kernels
(csrc/rules/muon_momentum.h, csrc/rules/muon_update.h).

Note [Muon's passes]
A Muon step per bucket of params (one device and dtype):
  1. ``muon_momentum_``: one fused pass over the grads and momentum buffers
     (AMP unscaling, max_grad_norm's coefficient and the skip on found_inf
     included) writes each param's update to orthogonalize into a buffer
     shaped and typed like its grad;
  2. ``orthogonalize``: per param, torch.optim.Muon's Newton–Schulz
     iteration in bfloat16 with torch's matmuls (its normalization by the
     Frobenius norm included): the same torch ops on the same input as
     torch.optim, so the same bits;
  3. ``muon_update_``: one fused pass per distinct ``adjust_lr_fn`` factor
     of the bucket's shapes applies the decoupled weight decay and the
     scaled update to the params (master copies and stochastic rounding
     included).
The Newton–Schulz matmuls dominate the step (~5 * (2 m^2 n + m^3) multiply-
adds for an m x n matrix, m <= n): the fused passes save the element-wise
traffic around them, not the matmuls.  Step 2 runs Python between two op
calls, so Muon's buckets bind their lists in Python (``_bound_in_python``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .optimizer import FusedOptimizer, _Bucket, large_model_options, MIN_8BIT_SIZE

# torch.optim.Muon's defaults: Keller Jordan's quintic coefficients, 5 steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
_ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def orthogonalize(update: Tensor, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  ns_steps: int = NS_STEPS, eps: float = EPS) -> Tensor:
    """The Newton–Schulz orthogonalization of torch.optim.Muon, in bfloat16:
    ``X = update / max(||update||_F, eps)`` (as the wide matrix: transposed
    when it has more rows than columns), then ``ns_steps`` times
    ``A = X X^T;  X = a X + (b A + c A^2) X``, for ``(a, b, c) = ns_coefficients``.
    The result approximates ``U V^T`` of the SVD ``update = U S V^T`` (singular
    values pushed into ~[0.7, 1.2] rather than exactly 1)."""
    a, b, c = ns_coefficients
    x = update.bfloat16()
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The factor of lr for a param of ``shape`` (torch.optim.Muon's
    ``_adjust_lr``): ``sqrt(max(1, rows / cols))`` (None, "original": Keller
    Jordan's) or ``0.2 * sqrt(max(rows, cols))`` ("match_rms_adamw":
    Moonshot's, to reuse AdamW's lr and weight decay).  1 for a param without
    columns, which has no elements to update (torch.optim divides by zero)."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols)) if cols else 1.0


class Muon(FusedOptimizer):
    """torch.optim.Muon: for each 2-D param, ``b = lerp(b, g, 1 - momentum)``,
    ``u = lerp(g, b, momentum)`` with ``nesterov`` (else ``b``),
    ``O = orthogonalize(u)`` (Newton–Schulz in bfloat16, see
    :func:`orthogonalize`), ``p = p * (1 - lr * weight_decay) - lr * lr_ratio * O``
    with ``lr_ratio`` from ``adjust_lr_fn`` (:func:`lr_ratio`).  Same arguments,
    defaults, errors (params that are not 2-D raise ValueError) and state
    (``momentum_buffer``) as torch.optim.Muon; use AdamW or another optimizer
    for biases, norms and embeddings.  The momentum and the update are fused
    kernels, the Newton–Schulz matmuls torch's (Note [Muon's passes]).
    DTensor params (FSDP2) raise NotImplementedError: the iteration needs
    each whole matrix.  See :class:`fastopt.Adam` for fastopt's keyword-only
    extras."""

    _op = "muon_momentum"
    _op_slots = ("momentum_buffer",)
    _scalar_states = ()
    _sparse_grad_error = "Muon does not support sparse gradients"
    _norms_per_param = True
    _bound_in_python = True

    def __init__(self, params, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None, *,
                 backend: str | None = None, max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in _ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # a set: torch.optim's TypeError below
            param_group["params"] = params = list(params)  # a generator is read once
        for p in [params] if isinstance(params, Tensor) else params:
            if isinstance(p, Tensor) and p.ndim != 2:
                raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                 f"{p.size()}")
        super().add_param_group(param_group)

    def _check_groups(self) -> None:
        """torch.optim.Muon's checks in its step."""
        for group in self.param_groups:
            if group["ns_steps"] >= 100:
                raise ValueError("Number of steps must be less than 100 for computational efficiency")
            if len(group["ns_coefficients"]) != 3:
                raise ValueError("Coefficients must be a tuple of exactly 3 values")
            if any(p.is_complex() for p in group["params"]):
                raise RuntimeError("Muon does not support complex parameters")

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"momentum": group["momentum"], "nesterov": group["nesterov"], "maximize": False}

    def _run(self, group: dict[str, Any], bucket: _Bucket, step_args: dict[str, Any]) -> None:
        bound = bucket.bound  # a reference.BoundTensors over the bucket's list ops
        tensors = bound.step_tensors()
        if tensors is None:
            return
        # The first op may change state; the second must not fail after it.
        bound.check()
        params, grads, (buffers,), _, masters, state_scales = tensors
        ratios = [lr_ratio(group["adjust_lr_fn"], p.shape) for p in params]
        updates = [torch.empty_like(g) for g in grads]
        scales = {"state_scales": state_scales} if state_scales else {}
        bound.ops.muon_momentum_(updates, grads, buffers, lr=0.0, grad_scale=step_args["grad_scale"],
                                 found_inf=step_args["found_inf"], **scales, **self._hyper(group))
        orthogonalized = [orthogonalize(u, group["ns_coefficients"], group["ns_steps"], group["eps"]).to(p.dtype)
                          for u, p in zip(updates, params)]
        for ratio in dict.fromkeys(ratios):
            chosen = [i for i, r in enumerate(ratios) if r == ratio]
            bound.ops.muon_update_(
                [params[i] for i in chosen], [orthogonalized[i] for i in chosen], lr=step_args["lr"],
                lr_tensor=step_args["lr_tensor"], weight_decay=group["weight_decay"], lr_ratio=ratio,
                maximize=False, found_inf=step_args["found_inf"],
                master_params=[masters[i] for i in chosen] if masters else [],
                rounding_seed=step_args["rounding_seed"])
