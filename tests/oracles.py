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

import functools
import math

import torch
from torch import Tensor

# The reference's default clip schedule, step**0.25: fastopt's function object,
# so that the signatures compare equal (fastopt.ADOPT accepts only it or None).
from fastopt.adopt import default_clip_lambda
# The order fastopt's kernels add a norm's squares in (LAMB and LARS, below).
from fastopt.reference import ordered_sum


def _check_like_adam(lr, betas, weight_decay, eps=1e-8, **flags) -> None:
    """torch.optim.Adam's own checks (and wording) of the hyperparameters Lion
    and ADOPT share with it: an Adam built with them raises what it raises."""
    torch.optim.Adam([torch.zeros(1)], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **flags)


def _value(x) -> float:
    return x.item() if isinstance(x, Tensor) else x


def _norm(t: Tensor) -> float:
    """||t||: its squares in float64 added in the order of fastopt's kernels
    (row-major, fastopt.reference.ordered_sum).  The norm is the papers'; the
    order decides only its last bits, which float64 comparisons would see."""
    flat = t.reshape(-1).double()
    return math.sqrt(ordered_sum(flat * flat))


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


class AdaBound(_ForLoop):
    """AdaBound / AMSBound (Luo et al., ICLR 2019) as the authors' ``adabound``
    package steps it (the code of the paper's experiments), with its
    arguments and errors, plus ``maximize``; ``base_lr`` (the lr the bounds
    scale with) is a param_groups key, where the package keeps a list."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8,
                 weight_decay=0, amsbound=False, *, foreach=None, maximize=False, differentiable=False):
        _check_like_adam(lr, betas, weight_decay, eps)
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr} (AdaBound scales final_lr by lr / initial lr)")
        if not 0.0 <= final_lr:
            raise ValueError(f"Invalid final learning rate: {final_lr}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"Invalid gamma parameter: {gamma}")
        super().__init__(params, dict(lr=lr, betas=betas, final_lr=final_lr, gamma=gamma, eps=eps,
                                      weight_decay=weight_decay, amsbound=amsbound, maximize=maximize,
                                      foreach=foreach, differentiable=differentiable))

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("base_lr", _value(self.param_groups[-1]["lr"]))

    def _update(self, group, p, grad, state):
        lr, (beta1, beta2) = _value(group["lr"]), group["betas"]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsbound"] else ()):
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        p, grad, exp_avg, exp_avg_sq = _real(p, grad, state["exp_avg"], state["exp_avg_sq"])
        state["step"] += 1
        step = state["step"].item()
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["amsbound"]:
            (max_exp_avg_sq,) = _real(state["max_exp_avg_sq"])
            torch.max(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = max_exp_avg_sq.sqrt().add_(group["eps"])
        else:
            denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        final_lr = group["final_lr"] * lr / group["base_lr"]
        lower_bound = final_lr * (1 - 1 / (group["gamma"] * step + 1))
        upper_bound = final_lr * (1 + 1 / (group["gamma"] * step)) if group["gamma"] != 0 else math.inf
        p.add_(-torch.full_like(denom, step_size).div_(denom).clamp_(lower_bound, upper_bound).mul_(exp_avg))


class QHAdam(_ForLoop):
    """QHAdam (Ma & Yarats, ICLR 2019) as the paper's update writes it, with
    Adam's state (raw moments, bias-corrected at use), and the arguments and
    errors of the authors' ``qhoptim`` package (which keeps bias-corrected
    moments instead: the same update up to rounding), plus ``maximize``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), nus=(1.0, 1.0), weight_decay=0.0,
                 decouple_weight_decay=False, eps=1e-8, *, foreach=None, maximize=False,
                 differentiable=False):
        _check_like_adam(lr, betas, weight_decay, eps)
        for index, nu in enumerate(nus):
            if not 0.0 <= nu <= 1.0:
                raise ValueError(f"Invalid nu parameter at index {index}: {nu}")
        super().__init__(params, dict(lr=lr, betas=betas, nus=nus, weight_decay=weight_decay,
                                      decouple_weight_decay=decouple_weight_decay, eps=eps,
                                      maximize=maximize, foreach=foreach, differentiable=differentiable))

    def _update(self, group, p, grad, state):
        lr, (beta1, beta2), (nu1, nu2) = _value(group["lr"]), group["betas"], group["nus"]
        wd = group["weight_decay"]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        p, grad, exp_avg, exp_avg_sq = _real(p, grad, state["exp_avg"], state["exp_avg_sq"])
        state["step"] += 1
        step = state["step"].item()
        if wd != 0:
            if group["decouple_weight_decay"]:
                p.mul_(1 - lr * wd)
            else:
                grad = grad.add(p, alpha=wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        numerator = exp_avg.mul(nu1 / (1 - beta1**step)).add_(grad, alpha=1 - nu1)
        denom = exp_avg_sq.mul(nu2 / (1 - beta2**step)).addcmul_(grad, grad, value=1 - nu2).sqrt_()
        p.addcdiv_(numerator, denom.add_(group["eps"]), value=-lr)


class AggMo(_ForLoop):
    """AggMo (Lucas et al., ICLR 2019) as the authors' code steps it (each
    beta's buffer in turn moves the param by ``-lr / K`` times it, L2
    ``weight_decay``), up to three betas, state ``momentum_buffer_<k>``, plus
    ``maximize``."""

    def __init__(self, params, lr=1e-3, betas=(0.0, 0.9, 0.99), weight_decay=0.0, *, foreach=None,
                 maximize=False, differentiable=False):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 1 <= len(betas) <= 3:
            raise ValueError(f"AggMo takes 1 to 3 betas (one state slot each), got {len(betas)}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize,
                                      foreach=foreach, differentiable=differentiable))

    def _update(self, group, p, grad, state):
        betas = group["betas"]
        if len(state) == 0:
            for k in range(len(betas)):
                state[f"momentum_buffer_{k}"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        p, grad = _real(p, grad)
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        for k, beta in enumerate(betas):
            (buf,) = _real(state[f"momentum_buffer_{k}"])
            buf.mul_(beta).add_(grad)
            p.add_(buf, alpha=-_value(group["lr"]) / len(betas))


class Lookahead:
    """Lookahead (Zhang et al., NeurIPS 2019, Algorithm 1) around any
    optimizer, in plain torch ops: the slow weights start as the params at the
    first step; every ``k`` inner steps ``slow += alpha * (fast - slow)`` and
    ``fast = slow``."""

    def __init__(self, optimizer, k=5, alpha=0.5):
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.steps = 0
        self.slow: dict[Tensor, Tensor] = {}

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self):
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            if p not in self.slow:
                self.slow[p] = p.detach().clone()
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.k == 0:
            for p in params:
                self.slow[p].add_(self.alpha * (p - self.slow[p]))
                p.copy_(self.slow[p])


class LAMB(torch.optim.Optimizer):
    """LAMB as NVIDIA Apex's FusedLAMB computes it (its multi_tensor_lamb
    stages, one param at a time): Adam's moments with ``beta3`` and optional
    bias correction, the update ``u`` (+ ``wd * p`` in ``adam_w_mode``, else
    the decay goes into the grad), then ``p -= lr * ||p|| / ||u|| * u`` where
    both norms are nonzero and ``wd != 0 or use_nvlamb``.  ``max_grad_norm``
    clips the grads' global norm first, as ``torch.nn.utils.clip_grad_norm_``
    (fastopt's clipping; Apex's differs by torch's 1e-6 in the norm)."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 *, amsgrad=False, adam_w_mode=True, grad_averaging=True, max_grad_norm=1.0, use_nvlamb=False,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        if amsgrad:
            raise RuntimeError("LAMB does not support the AMSGrad variant.")
        _check_like_adam(lr, betas, weight_decay, eps, foreach=foreach, capturable=capturable, fused=fused)
        self.max_grad_norm = max_grad_norm
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay, adam_w_mode=adam_w_mode,
                                      grad_averaging=grad_averaging, use_nvlamb=use_nvlamb, maximize=maximize,
                                      foreach=foreach, capturable=capturable, differentiable=differentiable,
                                      fused=fused))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        inverse_coef = None
        if self.max_grad_norm is not None and with_grad:
            # clip_grad_norm_'s coefficient, the norm summed in float64; grads
            # divided by its inverse, as fastopt folds it into the grad scale.
            norms = torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in with_grad])
            dtype = functools.reduce(torch.promote_types, [p.grad.dtype for p in with_grad])
            total_norm = norms.square().sum().sqrt().to(dtype)
            inverse_coef = 1 / (self.max_grad_norm / (total_norm + 1e-6)).clamp(max=1.0)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grad = -p.grad if group["maximize"] else p.grad
                    self._update(group, p, grad if inverse_coef is None else grad / inverse_coef.to(grad.dtype),
                                 self.state[p])
        return loss

    def _update(self, group, p, grad, state):
        lr, (beta1, beta2), wd, eps = _value(group["lr"]), group["betas"], group["weight_decay"], group["eps"]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        p, grad, exp_avg, exp_avg_sq = _real(p, grad, state["exp_avg"], state["exp_avg_sq"])
        state["step"] += 1
        step = state["step"].item()
        if not group["adam_w_mode"]:
            grad = grad + wd * p
        exp_avg.mul_(beta1).add_(grad * (1 - beta1 if group["grad_averaging"] else 1.0))
        exp_avg_sq.mul_(beta2).add_(grad * grad * (1 - beta2))
        bias_correction1 = 1 - beta1**step if group["bias_correction"] else 1.0
        bias_correction2 = 1 - beta2**step if group["bias_correction"] else 1.0
        update = (exp_avg / bias_correction1) / ((exp_avg_sq / bias_correction2).sqrt() + eps)
        if group["adam_w_mode"]:
            update = update + wd * p
        param_norm, update_norm = _norm(p), _norm(update)
        ratio = 1.0
        if (wd != 0 or group["use_nvlamb"]) and param_norm != 0 and update_norm != 0:
            ratio = param_norm / update_norm
        p.add_(update * -(lr * ratio))


class LARS(_ForLoop):
    """LARS (You et al. 2017) as torchlars and pytorch-optimizer's ``LARS``
    compute it: the trust ratio ``tc * ||p|| / (||g|| + wd * ||p|| + eps)``
    scales ``g + wd * p``, then SGD momentum from a zero buffer; params of at
    most one dimension skip ratio and decay with ``exclude_1d``."""

    def __init__(self, params, lr=1e-3, momentum=0.9, dampening=0, weight_decay=0, nesterov=False,
                 trust_coefficient=1e-3, eps=1e-8, exclude_1d=False, *, maximize=False, foreach=None,
                 differentiable=False, fused=None):
        torch.optim.SGD([torch.zeros(1)], lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, foreach=foreach, fused=fused)
        if not 0.0 <= trust_coefficient:
            raise ValueError(f"Invalid trust_coefficient value: {trust_coefficient}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, trust_coefficient=trust_coefficient, eps=eps,
                                      exclude_1d=exclude_1d, maximize=maximize, foreach=foreach,
                                      differentiable=differentiable, fused=fused))

    def _update(self, group, p, grad, state):
        lr, momentum = _value(group["lr"]), group["momentum"]
        adapt = not (group["exclude_1d"] and p.dim() <= 1)
        wd = group["weight_decay"] if adapt else 0.0
        if momentum != 0 and len(state) == 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        p, grad = _real(p, grad)
        ratio = 1.0
        if adapt:
            param_norm = _norm(p)
            denominator = _norm(grad) + wd * param_norm + group["eps"]
            if param_norm > 0 and denominator > 0:
                ratio = group["trust_coefficient"] * param_norm / denominator
        direction = (grad + wd * p if wd != 0 else grad) * ratio
        if momentum != 0:
            (buf,) = _real(state["momentum_buffer"])
            buf.mul_(momentum).add_(direction * (1 - group["dampening"]))
            direction = direction + momentum * buf if group["nesterov"] else buf
        p.add_(direction * -lr)


class Adafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor, but for params without elements: torch.optim
    divides their norm by their zero elements (ZeroDivisionError); here, as in
    fastopt, their state is created and their step counted, and nothing else
    changes."""

    @torch.no_grad()
    def step(self, closure=None):
        empty = {p: p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None and p.numel() == 0}
        for p in empty:
            p.grad = None
        try:
            loss = super().step(closure)
        finally:
            for p, grad in empty.items():
                p.grad = grad
        for p in empty:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                if p.dim() > 1:
                    state["row_var"] = p.new_zeros(*p.shape[:-1], 1)
                    state["col_var"] = p.new_zeros(*p.shape[:-2], 1, p.shape[-1])
                else:
                    state["variance"] = torch.zeros_like(p)
            state["step"] += 1
        return loss


class SWATS(torch.optim.Optimizer):
    """SWATS from the paper (Keskar & Socher 2017, Algorithm 1), one switch per
    param group: Adam (``p += u``) until ``|sgd_lr - gamma| < eps``, where
    ``gamma = u.u / -(u.g)`` is the projection of the group's whole Adam step
    on its gradient and ``sgd_lr = lr_avg / (1 - beta2^t)`` the bias-corrected
    running average of it; then SGD with momentum ``v = beta1 * v + g`` from 0
    and ``p -= sgd_lr * (1 - beta1) * v``.  ``g`` includes the L2 decay.  The
    state is fastopt.SWATS's (the group's values in every param's state), the
    sums added in the order of fastopt's kernels (row-major, ordered_sum) as
    _norm does.  pytorch-optimizer's SWATS (tests/test_oracles.py) keeps one
    running average per param and switches the group on any one param's,
    with a relative tolerance; with one param per group and before any switch
    they agree."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-9, weight_decay=0.0, *, maximize=False,
                 foreach=None, capturable=False, differentiable=False, fused=None):
        _check_like_adam(lr, betas, weight_decay, eps, foreach=foreach, capturable=capturable, fused=fused)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                                      foreach=foreach, capturable=capturable, differentiable=differentiable,
                                      fused=fused))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group):
        lr, (beta1, beta2), eps, wd = _value(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        with_state = [p for p in group["params"] if self.state.get(p)]
        switched = with_state and self.state[with_state[0]]["switched"].item() != 0
        update_sq = update_dot_grad = 0.0
        stepped = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                template = self.state[with_state[0]] if with_state else None
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["switched"] = torch.tensor(1.0 if switched else 0.0)
                for key in ("sgd_lr", "lr_avg"):
                    state[key] = template[key].clone() if template else torch.tensor(0.0)
                state["update_sq"] = torch.tensor(0.0)
                state["update_dot_grad"] = torch.tensor(0.0)
            stepped.append(state)
            grad = -p.grad if group["maximize"] else p.grad
            param, grad, exp_avg, exp_avg_sq = _real(p, grad, state["exp_avg"], state["exp_avg_sq"])
            state["step"] += 1
            step = state["step"].item()
            if wd != 0:
                grad = grad + wd * param
            if state["switched"].item() != 0:
                if step == state["switched"].item():
                    exp_avg.copy_(grad)
                else:
                    exp_avg.mul_(beta1).add_(grad)
                param.add_(exp_avg * (1 - beta1) * -state["sgd_lr"].item())
                state["update_sq"].fill_(0.0)
                state["update_dot_grad"].fill_(0.0)
                continue
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).add_(grad * grad * (1 - beta2))
            update = exp_avg / (exp_avg_sq.sqrt() + eps) * -(lr * math.sqrt(1 - beta2**step) / (1 - beta1**step))
            param.add_(update)
            flat_update, flat_grad = update.reshape(-1).double(), grad.reshape(-1).double()
            state["update_sq"].fill_(ordered_sum(flat_update * flat_update))
            state["update_dot_grad"].fill_(ordered_sum(flat_update * flat_grad))
            update_sq += state["update_sq"].item()
            update_dot_grad += state["update_dot_grad"].item()
        if not stepped or switched:
            return
        first = stepped[0]
        step, lr_avg = first["step"].item(), first["lr_avg"].item()
        switch = False
        if update_dot_grad != 0:
            gamma = update_sq / -update_dot_grad
            lr_avg = beta2 * lr_avg + (1 - beta2) * gamma
            sgd_lr = lr_avg / (1 - beta2**step)
            switch = step > 1 and abs(sgd_lr - gamma) < eps
        for p in group["params"]:
            state = self.state.get(p)
            if state:
                state["lr_avg"].fill_(lr_avg)
                if switch:
                    state["switched"].fill_(state["step"].item() + 1)
                    state["sgd_lr"].fill_(sgd_lr)
