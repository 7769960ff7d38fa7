"""The base every fastopt optimizer shares: grouping of tensors by device and
dtype, lazy state creation, the cached per-group tensor lists and the choice
of backend.  An optimizer subclass only declares its state layout, how a
state starts, and which op a group's tensors go to.

Note [Step plans]
A step must cost O(param groups) Python work, not O(params).  For each param
group the optimizer keeps a plan: the group's params split into buckets of
one device and dtype, each holding its params, state slots and step counts
bound once into a ``BoundTensors`` object (Note [Bound tensors] in
csrc/bound_ops.cpp).  A step makes one ``*_bound_`` op call per bucket, which
reads the grads itself and skips params without one.  A plan is rebuilt when
the group's params (compared by identity) or state layout change, after load_state_dict /
add_param_group, and on the step after new state was created.  State created in a step gets its own buckets for that
step, because some rules start differently (SGD's momentum buffer copies the
first gradient).  Hand edits of ``optimizer.state`` that replace state
tensors must be followed by ``optimizer.invalidate_plans()``.

DTensor params (FSDP2's fully_shard, tensor parallel) get buckets of their
own, still one fused call each: the ops must see the local shards, not the
DTensors (each op on a DTensor would go through its Python dispatch).  Their
state is created with zeros_like(param), so it is a DTensor as in torch.optim
(distributed checkpoints and state_dicts see the same state).  The C++ bound op
cannot be used for them: it reads ``.grad`` in C++, and a DTensor's grad is a
DTensor whose local shard only Python can unwrap; FSDP2 may also swap a
param's local tensor (lazy init pads uneven shards).  So such a bucket binds a
``_LocalShards`` and runs the Python bound ops of fastopt.reference, which each
step take the local shards of the params, their grads and their state and call
the backend's list op (``torch.ops.fastopt.adam_`` or the reference's) once:
O(params) Python work per step for DTensor buckets only.
"""
from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import _extension, reference


@dataclass
class _Bucket:
    """The params of one device and dtype in a group with their state: one op
    call per step."""

    kernels: Any  # fastopt.reference or the compiled ops (fastopt._extension)
    device: torch.device
    fresh: bool  # holds params whose state was created this step
    # kernels.BoundTensors(params, slot-major state slots, steps), or for
    # DTensor params a _LocalShards with the list ops (kernels is the reference)
    bound: Any


@dataclass
class _Plan:
    key: tuple
    params: list[Tensor]  # the group's params when the plan was built
    buckets: list[_Bucket]
    waiting: list[Tensor]  # params without state that have had no grad yet
    single_use: bool  # built with fresh state: rebuild on the next step


def _scalar(value: float | Tensor) -> float:
    """A hyperparameter as a Python number (``lr`` may be a 0-dim tensor)."""
    return value.item() if isinstance(value, Tensor) else value


def _to(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    return None if tensor is None else tensor.to(device, non_blocking=True)


def _step_device(param: Tensor) -> torch.device:
    """Where a param's step count lives: on its accelerator, so kernels there
    read it without a host sync (as torch's fused and capturable optimizers
    keep it), else on the CPU."""
    return torch.device("cpu") if param.device.type == "cpu" else param.device


def _dtensor_type() -> type | None:
    """torch's DTensor class, or None while torch.distributed.tensor is not
    imported (then no DTensor exists, and importing it would take seconds)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (``to_local()`` without the view it makes
    for Parameters), a plain tensor itself."""
    dtensor = _dtensor_type()
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor) else t


class _LocalShards(reference.BoundTensors):
    """A bucket of DTensor params and their state, bound for the list ops
    ``ops`` (the compiled ops or the reference): each step runs them on the
    local shards (Note [Step plans])."""

    def __init__(self, ops: Any, params: list[Tensor], slots: list[Tensor], steps: list[Tensor]):
        super().__init__(params, slots, steps)
        self.ops = ops

    def step_tensors(self):
        tensors = super().step_tensors()
        if tensors is None:
            return None
        params, grads, slots, steps = tensors
        # A grad laid out unlike its param (e.g. Partial) is redistributed, as
        # torch.optim's ops on the DTensors would do implicitly.
        grads = [g if g.placements == p.placements else g.redistribute(p.device_mesh, p.placements)
                 for p, g in zip(params, grads)]
        # The ops change the local shards in place; autograd checks the
        # DTensors' own version counters, as torch's in-place ops bump them.
        torch.autograd.graph.increment_version(params)
        return ([_local(p) for p in params], [_local(g) for g in grads],
                [[_local(t) for t in slot] for slot in slots], steps)


class FusedOptimizer(torch.optim.Optimizer):
    """Base class of fastopt optimizers (see Note [Step plans]).

    Subclasses define ``_counts_steps``, ``_slot_names(group)``,
    ``_init_slots(group, param, state)`` and ``_run(group, bucket, step_args)``.
    """

    _counts_steps: bool = True
    # torch.amp.GradScaler.step sets ``grad_scale`` and ``found_inf`` on
    # optimizers that advertise this; the kernels unscale the grads in
    # registers and skip the whole step when found_inf is nonzero.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict[str, Any], *, backend: str | None) -> None:
        if defaults.get("differentiable"):
            raise ValueError(
                f"fastopt.{type(self).__name__} does not support differentiable=True: its fused "
                f"steps are not recorded by autograd; use torch.optim.{type(self).__name__}"
            )
        self._backend = _extension.resolve_backend(backend)
        self._plans: dict[int, _Plan] = {}
        super().__init__(params, defaults)
        if self._backend == "fused":
            for group in self.param_groups:
                for p in group["params"]:
                    _extension.kernels_for("fused", p.device)

    # -- what a subclass declares -------------------------------------------
    def _slot_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def _init_slots(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        """Creates the missing slots of ``state`` for ``param``."""
        raise NotImplementedError

    def _run(self, group: dict[str, Any], bucket: _Bucket, step_args: dict[str, Any]) -> None:
        """Calls the bucket's ``*_bound_`` op with the group's hyperparameters
        and ``**step_args`` (lr and the per-step tensors, see ``_step_args``)."""
        raise NotImplementedError

    # -- torch.optim.Optimizer interface ----------------------------------------
    @property
    def backend(self) -> str:
        """The backend this optimizer was created with: auto, fused or reference."""
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_backend"] = self._backend
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict also lands here, with only state and param_groups:
        # it must keep the backend this optimizer was created with.
        if "_backend" not in state:
            state["_backend"] = getattr(self, "_backend", "auto")
        super().__setstate__(state)
        self._plans = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_backend", None) == "fused":
            for p in self.param_groups[-1]["params"]:
                _extension.kernels_for("fused", p.device)
        self.invalidate_plans()

    def invalidate_plans(self) -> None:
        """Forget the cached tensor lists; the next step rebuilds them from
        ``param_groups`` and ``state``."""
        if hasattr(self, "_plans"):
            self._plans.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs a single optimization step (one fused op per device and
        dtype of each param group).

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(index, group) for index, group in enumerate(self.param_groups)]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group, plan in zip(self.param_groups, plans):
            for bucket in plan.buckets:
                self._run(group, bucket, self._step_args(group, bucket, grad_scale, found_inf))
        return loss

    @staticmethod
    def _step_args(group: dict[str, Any], bucket: _Bucket, grad_scale: Tensor | None,
                   found_inf: Tensor | None) -> dict[str, Any]:
        """The lr and the per-step tensors of one op call (Note [fastopt op
        schemas]).  A tensor lr on the bucket's accelerator is read there by
        the kernels (no host sync: capturable); any other lr as a number."""
        lr = group["lr"]
        lr_tensor = None
        if isinstance(lr, Tensor) and lr.device.type != "cpu" and lr.device == bucket.device:
            lr, lr_tensor = 0.0, lr
        return {
            "lr": _scalar(lr),
            "lr_tensor": lr_tensor,
            "grad_scale": _to(grad_scale, bucket.device),
            "found_inf": _to(found_inf, bucket.device),
        }

    # -- plans ---------------------------------------------------------------
    def _plan(self, index: int, group: dict[str, Any]) -> _Plan:
        key = (id(group), self._slot_names(group))
        plan = self._plans.get(index)
        if (
            plan is None
            or plan.key != key
            or plan.single_use
            or len(plan.params) != len(group["params"])
            # Identity, not ==: a C-level pass (~20 ns a param) that also sees
            # one param replaced in place in the list (model surgery).
            or not all(map(operator.is_, plan.params, group["params"]))
            or any(p.grad is not None for p in plan.waiting)
        ):
            plan = self._build_plan(group, key)
            self._plans[index] = plan
        return plan

    def _build_plan(self, group: dict[str, Any], key: tuple) -> _Plan:
        slot_names = self._slot_names(group)
        required = slot_names + (("step",) if self._counts_steps else ())
        # (device, dtype, fresh, DTensor?) -> (params, one list per slot, steps)
        lists: dict[tuple, tuple[list[Tensor], list[list[Tensor]], list[Tensor]]] = {}
        waiting: list[Tensor] = []
        dtensor = _dtensor_type()
        for p in group["params"]:
            if p.is_complex():
                raise NotImplementedError(
                    f"fastopt.{type(self).__name__}: complex parameters are not supported yet "
                    f"(got a {p.dtype} parameter of shape {tuple(p.shape)})"
                )
            state = self.state.get(p, {})
            fresh = any(state.get(name) is None for name in required)
            if fresh:
                if p.grad is None:
                    waiting.append(p)
                    continue
                state = self.state[p]
                if self._counts_steps and state.get("step") is None:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=_step_device(p))
                self._init_slots(group, p, state)
            if self._counts_steps and state["step"].device != _step_device(p):
                # e.g. loaded from torch.optim, which keeps steps on the CPU
                state["step"] = state["step"].to(_step_device(p), torch.float32)
            sharded = dtensor is not None and isinstance(p, dtensor)
            params, slots, steps = lists.setdefault(
                (p.device, p.dtype, fresh, sharded), ([], [[] for _ in slot_names], [])
            )
            params.append(p)
            for slot, name in zip(slots, slot_names):
                slot.append(state[name])
            if self._counts_steps:
                steps.append(state["step"])
        buckets = []
        for (device, _, fresh, sharded), (params, slots, steps) in lists.items():
            kernels = _extension.kernels_for(self._backend, device)
            flat_slots = [t for slot in slots for t in slot]
            if sharded:
                bound = _LocalShards(kernels, params, flat_slots, steps)
                buckets.append(_Bucket(reference, device, fresh, bound))
            else:
                bound = kernels.BoundTensors(params, flat_slots, steps)
                buckets.append(_Bucket(kernels, device, fresh, bound))
        single_use = any(bucket.fresh for bucket in buckets)
        return _Plan(key, list(group["params"]), buckets, waiting, single_use)


__all__ = ["FusedOptimizer"]
