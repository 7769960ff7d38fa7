"""Oracles for the optimizers torch.optim lacks: for-loop implementations in
the style of torch.optim's single-tensor paths (``foreach=False``; complex
params stepped as real pairs), written from the papers and the authors' code,
standing where the tests use ``torch.optim.X(params, foreach=False)``.

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


def _check_lr_betas_weight_decay(lr, betas, weight_decay, foreach, capturable) -> None:
    """torch.optim.Adam's checks and wording, for the hyperparameters Lion and ADOPT share with it."""
    if isinstance(lr, Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _value(x) -> float:
    return x.item() if isinstance(x, Tensor) else x


def _real(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Complex tensors as (real, imaginary) pairs, as torch.optim steps them."""
    return tuple(torch.view_as_real(t) if t.is_complex() else t for t in tensors)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, Program 1) in lion-pytorch's order of operations."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False, fused=None):
        _check_lr_betas_weight_decay(lr, betas, weight_decay, foreach, capturable)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                      foreach=foreach, capturable=capturable,
                                      differentiable=differentiable, fused=fused))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = _value(group["lr"]), group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                p, grad, exp_avg = _real(p, grad, state["exp_avg"])
                p.mul_(1 - lr * wd)
                p.add_(exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_(), alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        return loss


class ADOPT(torch.optim.Optimizer):
    """ADOPT with the authors' reference code's arguments, state and single-tensor
    step (github.com/iShohei220/adopt): the first step of a param only
    initializes ``exp_avg_sq``; later ones normalize the grad by the previous
    ``exp_avg_sq``, clip it to ``clip_lambda(step)`` and update ``exp_avg``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, clip_lambda=default_clip_lambda,
                 weight_decay=0.0, decouple=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None):
        _check_lr_betas_weight_decay(lr, betas, weight_decay, foreach, capturable)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        self.clip_lambda = clip_lambda
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decouple=decouple, maximize=maximize, foreach=foreach,
                                      capturable=capturable, differentiable=differentiable, fused=fused))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = _value(group["lr"]), group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
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
                    continue
                normed_grad = grad.div(torch.clamp(exp_avg_sq.sqrt(), group["eps"]))
                if self.clip_lambda is not None:
                    clip = self.clip_lambda(step)
                    normed_grad.clamp_(-clip, clip)
                exp_avg.lerp_(normed_grad, 1 - beta1)
                p.add_(exp_avg, alpha=-lr)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return loss
