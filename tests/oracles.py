"""Oracles for the optimizers torch.optim lacks: for-loop implementations in
the style of torch.optim's single-tensor paths (``foreach=False``; complex
params stepped as real pairs), written from the papers and the authors' code,
standing where the tests use ``torch.optim.X(params, foreach=False)``.  Their
constructors validate with torch.optim.Adam itself, so fastopt's messages are
compared with torch's own wording.

Why not the PyPI packages themselves (tests/test_oracles.py compares these
classes to them element-wise, and skips when they are missing):

- pytorch-optimizer's ADOPT keeps its step count in the param group
  (``group["step"]``), not per param as the authors' reference does
  (``state["step"]``, a 0-dim float32 tensor, as torch.optim's Adam), so its
  state_dict cannot move to or from fastopt.ADOPT, and a param that misses
  the first step's grad never gets its initializing step;
- lion-pytorch's Lion has torch.optim's state layout (``exp_avg`` only) but
  no ``maximize``, ``foreach``, ``differentiable`` or torch-worded errors;
- and the table-driven tests (tests/registry.py) must run where the optional
  packages are not installed.
"""
from __future__ import annotations

import torch
from torch import Tensor

# The reference's default clip schedule, step**0.25: fastopt's function object,
# so that the signatures compare equal (fastopt.ADOPT accepts only it or None).
from fastopt.adopt import default_clip_lambda


def _check_like_adam(lr, betas, weight_decay, eps=1e-8, **flags) -> None:
    """torch.optim.Adam's own checks (and wording) of the hyperparameters Lion
    and ADOPT share with it: an Adam built with them raises what it raises."""
    torch.optim.Adam([torch.zeros(1)], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **flags)


def _value(x) -> float:
    return x.item() if isinstance(x, Tensor) else x


def _real(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Complex tensors as (real, imaginary) pairs, as torch.optim steps them."""
    return tuple(torch.view_as_real(t) if t.is_complex() else t for t in tensors)


class _ForLoop(torch.optim.Optimizer):
    """The loop of a single-tensor step: each param with a grad (negated for
    maximize) gets ``_update(group, p, grad, state)``."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p, -p.grad if group["maximize"] else p.grad, self.state[p])
        return loss


class Lion(_ForLoop):
    """Lion (Chen et al. 2023, Program 1) in lion-pytorch's order of operations,
    with each product rounded on its own (lion-pytorch's ``add(alpha=)`` fuses
    the multiply-add on CPU): a sign-based update turns one rounding of m or of
    the interpolation into a 2*lr step where it cancels, most often with
    16-bit state, so the oracle rounds as fastopt's rule does (and matches
    lion-pytorch within rounding, test_oracles.py)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False, fused=None):
        _check_like_adam(lr, betas, weight_decay, foreach=foreach, capturable=capturable, fused=fused)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                      foreach=foreach, capturable=capturable,
                                      differentiable=differentiable, fused=fused))

    def _update(self, group, p, grad, state):
        lr, (beta1, beta2) = _value(group["lr"]), group["betas"]
        if len(state) == 0:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        p, grad, exp_avg = _real(p, grad, state["exp_avg"])
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(exp_avg.clone().mul_(beta1).add(grad * (1 - beta1)).sign_(), alpha=-lr)
        exp_avg.mul_(beta2).add_(grad * (1 - beta2))


class ADOPT(_ForLoop):
    """ADOPT with the authors' reference code's arguments, state and single-tensor
    step (github.com/iShohei220/adopt): the first step of a param only
    initializes ``exp_avg_sq``; later ones normalize the grad by the previous
    ``exp_avg_sq``, clip it to ``clip_lambda(step)`` and update ``exp_avg``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, clip_lambda=default_clip_lambda,
                 weight_decay=0.0, decouple=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None):
        _check_like_adam(lr, betas, weight_decay, eps, foreach=foreach, capturable=capturable, fused=fused)
        self.clip_lambda = clip_lambda
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decouple=decouple, maximize=maximize, foreach=foreach,
                                      capturable=capturable, differentiable=differentiable, fused=fused))

    def _update(self, group, p, grad, state):
        lr, (beta1, beta2), wd = _value(group["lr"]), group["betas"], group["weight_decay"]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        p, grad, exp_avg, exp_avg_sq = _real(p, grad, state["exp_avg"], state["exp_avg_sq"])
        state["step"] += 1
        step = state["step"].item()
        if wd != 0:
            if group["decouple"]:
                p.mul_(1 - lr * wd)
            else:
                grad = grad.add(p, alpha=wd)
        if step == 1:
            exp_avg_sq.addcmul_(grad, grad)
            return
        normed_grad = grad.div(torch.clamp(exp_avg_sq.sqrt(), group["eps"]))
        if self.clip_lambda is not None:
            clip = self.clip_lambda(step)
            normed_grad.clamp_(-clip, clip)
        exp_avg.lerp_(normed_grad, 1 - beta1)
        p.add_(exp_avg, alpha=-lr)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
