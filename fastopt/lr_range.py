"""The learning-rate range test of Smith 2017: train a few hundred steps with
an exponentially growing lr, read the loss curve, then put everything back."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn


@dataclass
class LRRangeResult:
    """``lrs[i]`` is the lr of step ``i``; ``losses[i]`` the smoothed loss up to
    and including that step's batch; ``suggested_lr`` the steepest-descent lr,
    or None when there were too few steps to suggest one."""

    lrs: list[float]
    losses: list[float]
    suggested_lr: float | None

    def plot(self, path) -> None:
        """Save the loss against the lr (log scale), the suggestion marked, as a PNG."""
        from matplotlib.figure import Figure  # no pyplot: no backend or global state

        fig = Figure()
        ax = fig.subplots()
        ax.plot(self.lrs, self.losses)
        if self.suggested_lr is not None:
            loss = self.losses[self.lrs.index(self.suggested_lr)]
            ax.scatter([self.suggested_lr], [loss], s=75, color="red", zorder=3,
                       label=f"steepest descent: lr={self.suggested_lr:.2e}")
            ax.legend()
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("smoothed loss")
        fig.savefig(path, format="png")


def lr_range_test(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                  data: Iterable, optimizer: torch.optim.Optimizer,
                  start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100, *,
                  smooth_f: float = 0.05, diverge_th: float | None = 5.0,
                  skip_start: int = 10, skip_end: int = 5, save_plot=None) -> LRRangeResult:
    """Learning-rate range test (L. N. Smith, "Cyclical Learning Rates for
    Training Neural Networks", WACV 2017, arXiv:1506.01186), in the
    exponential form of torch-lr-finder's ``LRFinder.range_test(step_mode="exp")``.

    Step ``i`` (of ``num_steps``) sets every param group's lr to
    ``start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))``, then does one
    ``zero_grad``, ``loss_fn(model(inputs), targets).backward()`` and
    ``optimizer.step()`` on the next ``(inputs, targets)`` batch of ``data``
    (iterated again when it runs out; batches must be on the model's device).
    Any ``torch.optim.Optimizer`` works, fastopt's or torch's.

    The recorded loss is an exponential moving average with weight
    ``smooth_f`` on the new loss (0: no smoothing), seeded with the first
    loss, as torch-lr-finder does; seeded so, it has no start-up bias and
    needs no bias correction.  The test stops early once the smoothed loss
    exceeds ``diverge_th`` times the best smoothed loss so far (that step is
    recorded, as in torch-lr-finder) or is not finite (torch-lr-finder would
    go on with NaNs); ``diverge_th=None`` never stops early.

    ``suggested_lr`` is torch-lr-finder's ``plot(suggest_lr=True)``
    suggestion: drop the first ``skip_start`` and last ``skip_end`` points,
    take the lr where ``np.gradient`` of the smoothed losses is most negative;
    None if fewer than ``skip_start + skip_end + 2`` points were recorded.

    Afterwards the model's state_dict (params and buffers), the params'
    grads, the modules' train/eval modes and the optimizer's state_dict (each
    group's lr included) are restored bit-exactly from copies taken before the
    first step, also when the test raises.  ``save_plot=path`` also writes
    ``result.plot(path)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable")
    if not (math.isfinite(start_lr) and start_lr > 0):
        raise ValueError(f"start_lr must be a finite number > 0, got {start_lr}")
    if not (math.isfinite(end_lr) and end_lr > start_lr):
        raise ValueError(f"end_lr must be finite and > start_lr ({start_lr}), got {end_lr}")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if not 0 <= smooth_f < 1:
        raise ValueError(f"smooth_f must be in [0, 1), got {smooth_f}")
    if diverge_th is not None and not diverge_th > 1:
        raise ValueError(f"diverge_th must be > 1 or None, got {diverge_th}")
    for name, skip in (("skip_start", skip_start), ("skip_end", skip_end)):
        if not isinstance(skip, int) or skip < 0:
            raise ValueError(f"{name} must be an int >= 0, got {skip!r}")

    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    grads = {p: None if p.grad is None else p.grad.clone() for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    lrs: list[float] = []
    losses: list[float] = []
    try:
        model.train()
        batches = _cycle(data)
        for i in range(num_steps):
            lr = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = next(batches)
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            loss = loss.item()
            # torch-lr-finder's order: smooth, update the best, record, then check.
            if i == 0:
                best = loss
            else:
                if smooth_f > 0:
                    loss = smooth_f * loss + (1 - smooth_f) * losses[-1]
                best = min(best, loss)
            lrs.append(lr)
            losses.append(loss)
            if diverge_th is not None and not (math.isfinite(loss) and loss <= diverge_th * best):
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        for p, grad in grads.items():
            p.grad = grad
        for m, training in modes.items():
            m.training = training

    result = LRRangeResult(lrs, losses, _steepest(lrs, losses, skip_start, skip_end))
    if save_plot is not None:
        result.plot(save_plot)
    return result


def _cycle(data):
    # Iterate ``data`` again on each pass (a DataLoader reshuffles) rather than
    # itertools.cycle, which would keep every batch of the first pass in memory.
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("data yielded no batches (a used-up iterator cannot be cycled: "
                             "pass a list or a DataLoader)")


def _steepest(lrs, losses, skip_start, skip_end):
    n = len(lrs)
    if n < skip_start + skip_end + 2:  # np.gradient needs two points
        return None
    lrs, losses = lrs[skip_start:n - skip_end], losses[skip_start:n - skip_end]
    return lrs[int(np.gradient(np.array(losses)).argmin())]
