"""fastopt.Adagrad: torch.optim's Adagrad on fused kernels (csrc/rules/adagrad.h)."""
from __future__ import annotations

import torch
from torch import Tensor

from .optimizer import FusedOptimizer, large_model_options, MIN_8BIT_SIZE


class Adagrad(FusedOptimizer):
    """Drop-in for :class:`torch.optim.Adagrad`; see :class:`fastopt.Adam` for
    fastopt's keyword-only extras.  Like torch.optim, the state of the
    constructor's params is created at construction.  Sparse grads run on
    the reference (see Note [Failed steps] in optimizer.py); with 8-bit state
    (``state_dtype=torch.uint8``) they are rejected."""

    _op = "adagrad"
    _op_slots = ("sum",)

    def __init__(self, params, lr: float | Tensor = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0, eps: float = 1e-10,
                 foreach: bool | None = None, *, maximize: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 backend: str | None = None,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                self._init_slots(group, p, state)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    def _init_slots(self, group, param, state):
        if state.get("sum") is None:
            value = group["initial_accumulator_value"]
            if param.is_complex():  # both halves of each (real, imaginary) pair, as torch.optim does
                value = complex(value, value)
            self._new_slot(param, state, "sum", value)

    def _sparse_grad_problem(self, group):
        if group["weight_decay"] != 0:
            return "weight_decay option is not compatible with sparse gradients"
        return None

    def _hyper(self, group):
        return {"lr_decay": group["lr_decay"], "weight_decay": group["weight_decay"],
                "eps": group["eps"], "maximize": group["maximize"]}
