"""fastopt.SWATS: Adam that switches to SGD (Keskar & Socher 2017, "Improving
Generalization Performance by Switching from Adam to SGD", Algorithm 1), on a
fused kernel (csrc/rules/swats.h).

Note [SWATS's switch]
The switch is decided per param group, from the projection of the group's
whole Adam step ``u`` on its gradient ``g`` (the paper's ``p_k^T p_k`` and
``p_k^T g_k``, over every param of the group that stepped):

    gamma = (u.u) / -(u.g)                       where u.g != 0
    lr_avg = beta2 * lr_avg + (1 - beta2) * gamma
    switch when t > 1 and |lr_avg / (1 - beta2^t) - gamma| < eps,
    with the learned SGD step  sgd_lr = lr_avg / (1 - beta2^t).

The op's reduction phase stores each param's two sums in its state
(``update_sq``, ``update_dot_grad``; 0 after the switch, when the kernels
skip that pass); ``_finish_group`` adds them up in float64 after the
group's ops, decides, and writes the group's new ``lr_avg``, ``sgd_lr`` and
``switched`` into the state of each of its params, all with tensor ops on
the state's device: no host synchronization, so a CUDA step stays
capturable and a compiled step one graph.  Every param keeps the group's
values (the state is per param, as torch.optim's), so ``state_dict`` and
the checks of every other optimizer apply unchanged.  ``switched`` is 0 in
the Adam phase, else the param's step count of its first SGD step, whose
momentum starts from 0 (the paper's ``v_k = 0``); a param that first steps
after the switch starts in the SGD phase.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._checks import check_adam_style
from .optimizer import FusedOptimizer, _scalar, large_model_options, MIN_8BIT_SIZE

# The states every param keeps for its group (Note [SWATS's switch]).
GROUP_STATES = ("switched", "sgd_lr", "lr_avg")
# The sums of a param's Adam step that the op stores (its sum states).
SUM_STATES = ("update_sq", "update_dot_grad")


class SWATS(FusedOptimizer):
    """SWATS (Keskar & Socher 2017, Algorithm 1): Adam until the group's
    learned SGD step settles, then SGD with momentum at that step.

    Per step and param, with ``g += weight_decay * p`` (L2) in both phases:
    in the Adam phase ``m = lerp(m, g, 1 - beta1)``, ``a = beta2 * a +
    (1 - beta2) * g * g``, ``p += u`` with ``u = -lr * sqrt(1 - beta2^t) /
    (1 - beta1^t) * m / (sqrt(a) + eps)``; in the SGD phase ``v = beta1 * v + g``
    (from 0, in ``exp_avg``) and ``p -= sgd_lr * (1 - beta1) * v``.  A param
    group switches after a step where ``|sgd_lr - gamma| < eps`` (Note
    [SWATS's switch]: ``gamma`` is the projection of the group's Adam step
    on its gradient, ``sgd_lr`` its bias-corrected running average); put
    each layer in a group of its own to switch layers apart, as the paper's
    experiments do.  After the switch ``lr`` (and an LR scheduler) no longer
    applies: the step is the learned ``sgd_lr``, as in the paper.

    Defaults are the paper's (``eps=1e-9``, which is both Adam's epsilon and
    the switch's tolerance).  State per param: ``step``, ``exp_avg``,
    ``exp_avg_sq``, and its group's ``switched`` (0 before the switch), ``sgd_lr``
    and ``lr_avg`` with the last Adam step's sums ``update_sq`` and
    ``update_dot_grad`` (0-dim float32 tensors).  DTensor params (FSDP2) raise
    NotImplementedError: the sums span ranks.  ``foreach``, ``capturable``
    and ``fused`` are accepted and recorded, errors are worded as
    torch.optim.Adam's.  See :class:`fastopt.Adam` for fastopt's keyword-only
    extras."""

    _op = "swats"
    _op_slots = ("exp_avg", "exp_avg_sq")
    _scalar_states = ("step", *GROUP_STATES, *SUM_STATES)
    _sparse_grad_error = "SWATS does not support sparse gradients"
    _norms_per_param = True

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-9, weight_decay: float = 0.0, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, backend: str | None = None, max_grad_norm: float | None = None,
                 master_weights: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        check_adam_style(lr, betas, weight_decay, foreach=foreach, capturable=capturable, fused=fused, eps=eps)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults, backend=backend, max_grad_norm=max_grad_norm,
                         options=large_model_options(master_weights, state_dtype, stochastic_rounding,
                                                     min_8bit_size))

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": _scalar(beta1), "beta2": _scalar(beta2), "eps": group["eps"],
                "weight_decay": group["weight_decay"], "maximize": group["maximize"]}

    def _initial_scalar_state(self, group: dict[str, Any], param: Tensor, name: str) -> float | Tensor:
        """A new param takes its group's states from a param that has them:
        after the switch it starts in the SGD phase (``switched`` = 1, its
        first step)."""
        if name in GROUP_STATES:
            for q in group["params"]:
                state = self.state.get(q, {})
                if q is not param and state.get(name) is not None:
                    return (state[name] != 0).float() if name == "switched" else state[name]
        return 0.0

    def _states_by_device(self, group: dict[str, Any]) -> list[tuple[list[Tensor], dict[str, list[Tensor]]]]:
        """The group's params with state, each once, per device (a group may
        span devices), with their scalar-state tensors per key."""
        by_device: dict[torch.device, tuple[list[Tensor], dict[str, list[Tensor]]]] = {}
        for p in dict.fromkeys(group["params"]):
            state = self.state.get(p)
            if state and state.get("switched") is not None:
                params, tensors = by_device.setdefault(
                    state["step"].device, ([], {key: [] for key in self._scalar_states}))
                params.append(p)
                for key in self._scalar_states:
                    tensors[key].append(state[key])
        return list(by_device.values())

    def _finish_group(self, group: dict[str, Any], memo: dict[str, Any], found_inf: Tensor | None) -> None:
        """The group's switch (Note [SWATS's switch]): a few list ops per
        device, on state lists kept with the step plan (``memo``)."""
        if "by_device" not in memo:
            memo["by_device"] = self._states_by_device(group)
        partial_sums, first = [], None
        for params, tensors in memo["by_device"]:
            stepped = [p.grad is not None for p in params]
            sq, dot = tensors["update_sq"], tensors["update_dot_grad"]
            if not all(stepped):
                sq, dot = [t for t, s in zip(sq, stepped) if s], [t for t, s in zip(dot, stepped) if s]
            if not sq:
                continue
            if first is None:
                first = {key: tensors[key][stepped.index(True)] for key in ("step", "switched", "sgd_lr", "lr_avg")}
            # Added in param order (cumsum: in order on the CPU, whatever its threads).
            partial_sums.append(torch.stack(sq + dot).double().view(2, -1).cumsum(1)[:, -1])
        if first is None:
            return
        device = first["step"].device
        update_sq, update_dot_grad = sum(s.to(device) for s in partial_sums).unbind()
        beta2 = _scalar(group["betas"][1])
        step = first["step"].to(torch.float64)
        lr_avg = first["lr_avg"].to(torch.float64)
        projected = (first["switched"] == 0) & (update_dot_grad != 0)
        if found_inf is not None:  # the ops skipped this step
            projected &= found_inf.to(device) == 0
        gamma = update_sq / torch.where(projected, -update_dot_grad, 1.0)
        lr_avg = torch.where(projected, beta2 * lr_avg + (1 - beta2) * gamma, lr_avg)
        sgd_lr = lr_avg / (1 - beta2**step)
        switch = projected & (step > 1) & ((sgd_lr - gamma).abs() < group["eps"])
        sgd_lr = torch.where(switch, sgd_lr, first["sgd_lr"].to(torch.float64))
        for params, tensors in memo["by_device"]:
            on = tensors["step"][0].device
            # switched = switch ? step + 1 : switched, in place (exact: whole numbers
            # far below 2^24; out-of-place list ops would allocate a tensor per param).
            switching = [switch.to(on, torch.float32)] * len(params)
            torch._foreach_mul_(tensors["switched"], 1 - switching[0])
            torch._foreach_addcmul_(tensors["switched"], tensors["step"], switching)
            torch._foreach_add_(tensors["switched"], switching)
            torch._foreach_copy_(tensors["sgd_lr"], [sgd_lr.to(on)] * len(params))
            torch._foreach_copy_(tensors["lr_avg"], [lr_avg.to(on)] * len(params))
