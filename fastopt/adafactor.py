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
  1. matrices only: ``row_col_sq_means_``, one read of the bucket's grads
     for the row and column means of g * g (Note [Row and column sums] in
     csrc/rules/row_col_sums.h: a reduction phase per row and column, on
     both drivers, deterministic for any thread count); per param, the
     factors lerped towards them (a row and a column of values) and the
     estimate ``row_var @ col_var / mean(row_var)`` in a buffer of the
     param's size (torch.optim builds such a temporary too);
  2. ``adafactor_``: one fused op over the bucket: its reduction phase
     takes ||p|| and ||u|| of each param, u = g / sqrt(max(v, eps1^2)) with
     v the estimate (matrices) or the lerped variance (vectors), and its
     update pass scales and applies u (weight decay, master copies and
     stochastic rounding included);
  3. matrices only: the lerped factors stored (computed again, from the
     step count the op advanced: see ``_run``).
torch.optim runs the same step as ~10 kernels and two host reads per param:
g * g into a temporary, a norm over its rows and one striding through its
columns, the estimate, and the element-wise passes and norms that the fused
op takes.  The estimate is still a buffer: computing it in the fused op
would need each element's row and column there.
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


def _opmath(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


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
        return _factored(param)  # True: a bucket of matrices

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
        params to step, which no op checks: step 1 of Note [Adafactor's
        passes] reads them, step 3 writes them after the op."""
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

    def _binds_in_python(self, kind: bool) -> bool:
        return kind  # matrices: step 1 runs before their op; vectors: one bound op

    def _run(self, group: dict[str, Any], bucket: _Bucket, step_args: dict[str, Any]) -> None:
        eps1 = group["eps"][0]
        if eps1 is None:
            eps1 = torch.finfo(bucket.dtype).eps
        hyper = {"eps1": eps1, "factored": bucket.kind, **self._hyper(group)}
        if not bucket.kind:
            bucket.kernels.adafactor_bound_(bucket.bound, **step_args, **hyper)
            return
        bound = bucket.bound  # a reference.BoundTensors over the bucket's list ops
        tensors = bound.step_tensors()
        if tensors is None:
            return
        # Step 1 reads the grads before the op would check them.
        bound.check()
        params, grads, _, (steps,), masters, _ = tensors
        beta2_decay = group["beta2_decay"]
        means = self._means(bound.ops, grads, step_args)
        estimates = [self._estimate(p, self._advanced_factors(p, step + 1, mean, beta2_decay), eps1)
                     for p, step, mean in zip(params, steps, means)]
        bound.ops.adafactor_(params, grads, estimates, steps, master_params=masters, **step_args, **hyper)
        # Stored after the op, from the step count it advanced (the estimates'
        # factors took step + 1, the same number): torch.compile's Inductor
        # (torch 2.13) computes what a step stores from its inputs as they are
        # after the op, which counts in place.
        for p, step, mean in zip(params, steps, means):
            for name, factor in self._advanced_factors(p, step, mean, beta2_decay).items():
                self.state[p][name].copy_(factor)

    # -- step 1 of Note [Adafactor's passes], for one matrix -------------------------
    # In opmath (float32 for 16-bit params), the factors rounded only on store,
    # as the kernels compute.  No ``found_inf`` can skip the step: without
    # ``_step_supports_amp_scaling`` GradScaler skips the whole call, and the
    # clip sets ``grad_scale`` only.

    @staticmethod
    def _means(ops: Any, grads: list[Tensor], step_args: dict[str, Any]) -> list[tuple[Tensor, Tensor] | None]:
        """Per grad, the row and column means of g * g (unscaled by
        max_grad_norm's coefficient; float64 for float64 params, else
        float32): one ``row_col_sq_means_`` over the bucket; None for a
        matrix without elements (torch.optim divides by zero)."""
        rows = [torch.empty(_factor_shape(g, -1), dtype=_opmath(g), device=g.device) for g in grads]
        cols = [torch.empty(_factor_shape(g, -2), dtype=_opmath(g), device=g.device) for g in grads]
        ops.row_col_sq_means_(grads, rows, cols, grad_scale=step_args["grad_scale"])
        return [None if g.numel() == 0 else means for g, means in zip(grads, zip(rows, cols))]

    def _advanced_factors(self, param: Tensor, count: Tensor, means: tuple[Tensor, ...] | None,
                          beta2_decay: float) -> dict[str, Tensor]:
        """The factors lerped towards ``means`` by ``count^beta2_decay``
        (``count``: the step being taken), unrounded; as they are without means."""
        factors = {name: self.state[param][name].to(_opmath(param)) for name in FACTORS}
        if means is None:
            return factors
        weight = (count.double() ** beta2_decay).to(_opmath(param))
        return {name: factor.lerp(mean, weight) for (name, factor), mean in zip(factors.items(), means)}

    @staticmethod
    def _estimate(param: Tensor, factors: dict[str, Tensor], eps1: float) -> Tensor:
        """``row_var @ col_var / mean(row_var)`` (one product per element, as
        torch.optim's matmul) in a buffer laid out as the op's slots (like
        the param)."""
        row_var, col_var = factors["row_var"], factors["col_var"]
        estimate = torch.mul(row_var, col_var, out=torch.empty_like(param, dtype=_opmath(param)))
        return estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
