"""fastopt.Adafactor: torch.optim.Adafactor (Shazeer & Stern 2018,
"Adafactor: Adaptive Learning Rates with Sublinear Memory Cost") with its
element-wise pass and its per-tensor norms on a fused kernel
(csrc/rules/adafactor.h).

Note [Adafactor's passes]
A param of two or more dims keeps its second moment as two factors,
``row_var`` (its shape with the last dim 1) and ``col_var`` (the
second-to-last dim 1); a vector (or 0-dim) param keeps a full ``variance``.
A step per bucket of params (one device and dtype, matrices and vectors
apart):
  1. matrices only: per param, torch.optim.Adafactor's factor update with
     torch's reductions: the row and column means of g*g lerped into the
     factors, then the estimate ``row_var @ col_var / mean(row_var)`` (a
     temporary shaped like the param, as torch.optim builds it);
  2. ``adafactor_``: one fused op over the bucket: its reduction phase
     takes ||p|| and ||u|| of each param, u = g / sqrt(max(v, eps1^2)) with
     v the estimate (matrices) or the lerped variance (vectors), and its
     update pass scales and applies u (weight decay, master copies and
     stochastic rounding included).
The row and column sums of step 1 are torch's reductions, not yet a phase of
the drivers: the fused op saves the element-wise passes and the norms, which
torch.optim runs as ~8 kernels and two host reads per param.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .optimizer import FusedOptimizer, _Bucket, _QUANTIZED, _slot_dtype, large_model_options, MIN_8BIT_SIZE

# The state of a param of two or more dims: its second moment's factors, and
# the dim each one reduces (torch.optim.Adafactor's keys).
FACTORS = {"row_var": -1, "col_var": -2}


def _factored(param: Tensor) -> bool:
    return param.dim() > 1


def _factor_shape(param: Tensor, dim: int) -> list[int]:
    shape = list(param.shape)
    shape[dim] = 1
    return shape


class Adafactor(FusedOptimizer):
    """torch.optim.Adafactor: the same arguments, defaults, errors, state
    (``step``; ``row_var`` and ``col_var`` for params of two or more dims,
    ``variance`` for the others) and results.  Per param and step ``t``::

        v = lerp(v, g*g, t^beta2_decay)   (factored: row and column means of g*g into the
                                           factors, v = row_var @ col_var / mean(row_var))
        u = g / sqrt(max(v, eps1^2))
        p = p * (1 - lr*wd) - max(eps2, rms(p)) * min(lr, 1/sqrt(t)) / max(1, rms(u) / d) * u

    with ``rms(p)`` taken before the step, ``eps = (eps1, eps2)`` and ``eps1``
    None: the machine epsilon of the param's dtype (of each bucket's dtype;
    torch.optim takes the first param's for the whole group).  The
    element-wise pass and the norms are one fused op (Note [Adafactor's
    passes]).  As torch.optim.Adafactor it takes no ``grad_scale``:
    torch.amp.GradScaler unscales the grads before the step.
    ``state_dtype`` applies to the factors as to ``variance``, but 8-bit
    (torch.uint8) to ``variance`` only: the factors stay float32.  DTensor
    params (FSDP2) raise NotImplementedError: the norms span ranks.  See
    :class:`fastopt.Adam` for fastopt's other keyword-only extras."""

    _op = "adafactor"
    _op_slots = ("variance",)
    _other_slots = tuple(FACTORS)
    _sparse_grad_error = "Adafactor does not support sparse gradients"
    _step_supports_amp_scaling = False  # as torch.optim.Adafactor
    _norms_per_param = True
    _bound_in_python = True

    def __init__(self, params, lr: float | Tensor = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, maximize: bool = False, backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        # torch.optim.Adafactor's checks, in its order and wording.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        defaults = {
            "lr": lr,
            "beta2_decay": beta2_decay,
            "eps": eps,
            "d": d,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)

    # -- the factors: state not shaped like the param ---------------------------
    def _factor_dtype(self, param: Tensor) -> torch.dtype:
        dtype = _slot_dtype(self._options, param)
        return torch.float32 if dtype == _QUANTIZED else dtype

    def _param_slot_names(self, group: dict[str, Any], param: Tensor) -> tuple[str, ...]:
        return tuple(FACTORS) if _factored(param) else self._op_slots

    def _bucket_kind(self, group: dict[str, Any], param: Tensor) -> bool:
        return _factored(param)

    def _init_slots(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        if not _factored(param):
            super()._init_slots(group, param, state)
            return
        for name, dim in FACTORS.items():
            if state.get(name) is None:
                state[name] = torch.zeros(_factor_shape(param, dim), dtype=self._factor_dtype(param),
                                          device=param.device)

    def _load_slot(self, param: Tensor, state: dict[str, Any], name: str, saved: Tensor,
                   saved_scales: Any) -> None:
        if name in FACTORS and saved.is_floating_point():
            state[name] = saved.to(param.device, self._factor_dtype(param))
        else:
            super()._load_slot(param, state, name, saved, saved_scales)

    def _state_tensors(self, group: dict[str, Any], param: Tensor,
                       state: dict[str, Any]) -> dict[str, Tensor]:
        # The factors are checked by _state_layout_problem: they are not shaped like the param.
        tensors = super()._state_tensors(group, param, state)
        for name in FACTORS:
            tensors.pop(f"state[{name!r}]", None)
        return tensors

    def _state_layout_problem(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> str | None:
        if not _factored(param):
            return super()._state_layout_problem(group, param, state)
        dtype = self._factor_dtype(param)
        for name, dim in FACTORS.items():
            factor, shape = state.get(name), _factor_shape(param, dim)
            if factor is None:  # created at the first step
                continue
            if (not isinstance(factor, Tensor) or list(factor.shape) != shape or factor.dtype != dtype
                    or factor.device != param.device):
                got = (f"a {factor.dtype} tensor of shape {list(factor.shape)} on {factor.device}"
                       if isinstance(factor, Tensor) else type(factor).__name__)
                return (f"state[{name!r}] must be a {dtype} tensor of shape {shape} on {param.device} (a "
                        f"factor of the second moment of a param of shape {list(param.shape)}), got {got}")
        return None

    # -- the step ------------------------------------------------------------------
    def _check_groups(self) -> None:
        """torch.optim.Adafactor's check in its step, and the factors of the
        params to step: step 1 of Note [Adafactor's passes] changes them before
        any op checks its tensors."""
        for g, group in enumerate(self.param_groups):
            if any(p.is_complex() for p in group["params"]):
                raise RuntimeError("Adafactor does not support complex parameters")
            for j, p in enumerate(group["params"]):
                if p.grad is not None and _factored(p) and p in self.state:
                    problem = self._state_layout_problem(group, p, self.state[p])
                    if problem is not None:
                        raise RuntimeError(f"fastopt.Adafactor.step: param_groups[{g}]['params'][{j}]: {problem}; "
                                           "nothing was changed")

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"beta2_decay": group["beta2_decay"], "eps2": group["eps"][1], "d": group["d"],
                "weight_decay": group["weight_decay"], "maximize": group["maximize"]}

    def _run(self, group: dict[str, Any], bucket: _Bucket, step_args: dict[str, Any]) -> None:
        bound = bucket.bound  # a reference.BoundTensors over the bucket's list ops
        tensors = bound.step_tensors()
        if tensors is None:
            return
        # The factors change before the op: its tensors are checked first.
        bound.check()
        params, grads, (variances,), (steps,), masters, state_scales = tensors
        eps1 = group["eps"][0]
        if eps1 is None:
            eps1 = torch.finfo(bucket.dtype).eps
        factored = bucket.kind
        if factored:
            variances = [self._estimate(p, g, step, group["beta2_decay"], eps1, step_args)
                         for p, g, step in zip(params, grads, steps)]
        scales = {"state_scales": state_scales} if state_scales else {}
        bound.ops.adafactor_(params, grads, variances, steps, eps1=eps1, factored=factored,
                             master_params=masters, **scales, **step_args, **self._hyper(group))

    # Eager under torch.compile (a graph break): Inductor (torch 2.13) stores the
    # factors it computes here from the step count after the op's increment.
    @torch.compiler.disable
    def _estimate(self, param: Tensor, grad: Tensor, step: Tensor, beta2_decay: float, eps1: float,
                  step_args: dict[str, Any]) -> Tensor:
        """Step 1 of Note [Adafactor's passes] for one matrix: its factors
        advanced, and the estimate of its second moment.  Computed in opmath
        (float32 for 16-bit params) and the factors rounded on store, as the
        kernels do; the estimate, a temporary, stays in opmath.  No
        ``found_inf`` can skip the step: without ``_step_supports_amp_scaling``
        GradScaler skips the whole call, and the clip sets ``grad_scale`` only."""
        state = self.state[param]
        opmath = torch.float64 if param.dtype == torch.float64 else torch.float32
        if param.numel() == 0:  # no means to take (torch.optim divides by zero)
            return torch.empty_like(param, dtype=opmath)
        if step_args["grad_scale"] is not None:  # max_grad_norm's coefficient
            grad = grad.to(opmath) / step_args["grad_scale"]
        weight = ((step.double() + 1) ** beta2_decay).to(opmath)  # the op counts the step
        factors = []
        for name, dim in FACTORS.items():
            # (g * g).mean(dim) as torch.optim takes it, without a g-sized temporary
            mean = torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=opmath).square_().div_(grad.size(dim))
            factor = state[name]
            advanced = factor.to(opmath).lerp(mean, weight)
            factor.copy_(advanced)
            factors.append(advanced)  # before the rounding on store, as the kernels' slots
        row_var, col_var = factors
        # row_var @ col_var as torch.optim takes it (one product per element), laid
        # out as the op's slots: like the param.
        estimate = torch.mul(row_var, col_var, out=torch.empty_like(param, dtype=opmath))
        return estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
