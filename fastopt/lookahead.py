"""fastopt.Lookahead: slow weights that follow any optimizer's fast weights
(Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step
back", NeurIPS 2019), synchronized by one fused op per bucket
(csrc/rules/lookahead.h)."""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Any, Callable

import torch
from torch import Tensor

from . import _extension
from .optimizer import FusedOptimizer, _has_master, _local


class Lookahead(torch.optim.Optimizer):
    """Wraps ``optimizer`` (fastopt's or torch.optim's): every ``k`` of its
    steps, ``slow += alpha * (fast - slow)`` and then ``fast = slow``, for
    every param (Algorithm 1 of the paper; the slow weights start as the
    params at the first step).

    It is a ``torch.optim.Optimizer`` whose ``param_groups`` and ``defaults``
    are the inner optimizer's, so LR schedulers, ``GradScaler`` (its skipped
    steps do not count towards ``k``) and ``zero_grad`` work through it.  The
    synchronization is one call per (device, dtype) bucket of the op
    ``fastopt::lookahead_`` (or of fastopt.reference where the kernels are not
    loaded, as ``backend`` chooses), which reads and writes each fast and slow
    weight once.  Where a fastopt inner optimizer keeps float32 master
    weights, those are the fast weights (the slow weights are float32 too).

    ``state_dict()`` is the inner optimizer's with a ``"lookahead"`` entry
    (``k``, ``alpha``, the steps taken, and ``slow_params`` by param index),
    so it also loads into the bare inner optimizer; ``load_state_dict``
    restores both and checks everything before it changes anything."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5, *,
                 backend: str | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Lookahead wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_k_alpha(k, alpha)
        self.optimizer = optimizer
        self.k = k
        self.alpha = alpha
        self._backend = _extension.resolve_backend(backend)
        self._fast_steps = 0
        self.state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        # What torch.optim.Optimizer.__init__ sets up besides the param groups,
        # which are the inner optimizer's.
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)  # torch.optim.Optimizer's would keep its own fields only

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        with torch.no_grad():
            for p in self._params():
                if "slow_param" not in self.state[p]:
                    self.state[p]["slow_param"] = self._fast_weight(p).detach().clone(
                        memory_format=torch.preserve_format)
        loss = self.optimizer.step(closure)
        self._fast_steps += 1
        if self._fast_steps % self.k == 0:
            self._synchronize()
        return loss

    @torch.no_grad()
    def _synchronize(self) -> None:
        """One ``lookahead_`` call per (device, dtype, master copies?) bucket."""
        buckets: dict[tuple, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        for p in self._params():
            master = self._master(p)
            fast, slow = _local(p), _local(self.state[p]["slow_param"])
            if fast.is_complex():
                fast, slow = torch.view_as_real(fast), torch.view_as_real(slow)
            params, slows, masters = buckets.setdefault((fast.device, fast.dtype, master is not None), ([], [], []))
            params.append(fast)
            slows.append(slow)
            if master is not None:
                masters.append(master)
        for (device, _, _), (params, slows, masters) in buckets.items():
            kernels = _extension.kernels_for(self._backend, device)
            # The rule reads no grad; the params stand in for the op's grad list.
            kernels.lookahead_(params, params, slows, lr=0.0, alpha=self.alpha, maximize=False,
                               master_params=masters)

    def _params(self) -> list[Tensor]:
        """Each param once, in param_groups order."""
        return list({id(p): p for group in self.param_groups for p in group["params"]}.values())

    def _master(self, p: Tensor) -> Tensor | None:
        """The inner fastopt optimizer's float32 master copy of ``p``, if it keeps one."""
        return self.optimizer.state.get(p, {}).get("master_param")

    def _fast_weight(self, p: Tensor) -> Tensor:
        master = self._master(p)
        if master is None and isinstance(self.optimizer, FusedOptimizer) and _has_master(
                self.optimizer._options, p):
            return p.float()  # the master copy the inner optimizer's first step makes
        return p if master is None else master

    # -- checkpoints ---------------------------------------------------------
    def _indices(self, packed_groups: list[dict[str, Any]]) -> dict[int, Tensor]:
        """Param index (as the inner state_dict numbers params) -> param."""
        return {index: p for group, packed in zip(self.param_groups, packed_groups)
                for p, index in zip(group["params"], packed["params"])}

    def state_dict(self) -> dict[str, Any]:
        state_dict = self.optimizer.state_dict()
        slow = {index: self.state[p]["slow_param"] for index, p in self._indices(state_dict["param_groups"]).items()
                if "slow_param" in self.state.get(p, {})}
        return {**state_dict, "lookahead": {"k": self.k, "alpha": self.alpha, "fast_steps": self._fast_steps,
                                            "slow_params": slow}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        where = "fastopt.Lookahead.load_state_dict"
        if "lookahead" not in state_dict:
            raise ValueError(f"{where}: the state_dict has no 'lookahead' entry (saved by the bare inner "
                             "optimizer? load it into that one); nothing was changed")
        saved = state_dict["lookahead"]
        _check_k_alpha(saved["k"], saved["alpha"])
        params = self._indices(state_dict["param_groups"])
        slow = {}
        for index, value in saved["slow_params"].items():
            if index not in params:
                raise ValueError(f"{where}: slow_params has param index {index}, which the loaded "
                                 "param_groups do not hold; nothing was changed")
            p = params[index]
            if not isinstance(value, Tensor) or value.shape != p.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{where}: slow_params[{index}] has shape {shape} but its param has "
                                 f"shape {tuple(p.shape)}; nothing was changed")
            slow[p] = value
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "lookahead"})
        self.k, self.alpha, self._fast_steps = saved["k"], saved["alpha"], saved["fast_steps"]
        self.state = defaultdict(dict)
        for p, value in slow.items():
            dtype = self._fast_weight(p).dtype
            self.state[p]["slow_param"] = value.to(device=p.device, dtype=dtype, copy=True)


def _check_k_alpha(k: int, alpha: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k: {k!r} (a whole number of steps >= 1)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Invalid alpha: {alpha} (the slow weights' step, in [0, 1])")


__all__ = ["Lookahead"]
