"""The one table of optimizers × options and the table of parameter shapes
that drive most of fastopt's tests, plus the helpers that build parameters
and feed them identical random gradients.

Every option of every optimizer appears in at least one ``OptimizerCase``.
Learning rates are large (1e-2 .. 1e-1) so that ten steps move every
parameter by far more than any comparison tolerance: a wrong or missing
update cannot hide inside a tolerance.

Weight decays are "unround" (0.0731, not 0.1): with 0.1, ``0.1 * p`` of a
float16 / bfloat16 ``p`` is often exactly a float16 / bfloat16 number, so
``g + wd * p`` cancels to exactly zero for some elements; whether the result
is then 0 or a rounding residue depends on whether an implementation fuses
the multiply-add (torch.optim's ``add(alpha=)`` does, fastopt's rules do
not), and Adagrad / Adam normalize that residue into a full ``lr``-sized
step.  That is ill-conditioning of the comparison, not an error of either.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import pytest
import torch
from torch import Tensor

import fastopt
from fastopt import swats
import oracles  # torch.optim-style oracles of the optimizers torch.optim lacks
from fastopt.reference import is_dense  # the layout the kernels walk in place

# -- optimizers × options ------------------------------------------------------


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer with one set of options."""

    id: str
    torch_cls: type[torch.optim.Optimizer]
    fastopt_cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def make_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """A fresh copy of ``kwargs`` (tensor hyperparameters are cloned, so two
        optimizers never share one), with ``overrides``."""
        return {**{k: v.clone() if isinstance(v, Tensor) else v for k, v in self.kwargs.items()}, **overrides}

    def make_torch(self, params: Sequence[Tensor], clipped_before: bool = False) -> torch.optim.Optimizer:
        """torch.optim's for-loop implementation: the oracle.  ``clipped_before``:
        the test clips the grads itself (``clip_grad_norm_``), so an oracle
        that clips in its step (LAMB's ``max_grad_norm``) must not clip again."""
        kwargs = self.make_kwargs()
        parameters = inspect.signature(self.torch_cls).parameters
        if clipped_before and "max_grad_norm" in parameters:
            kwargs["max_grad_norm"] = None
        if "foreach" in parameters:  # torch.optim.Muon has only a for-loop
            kwargs["foreach"] = False
        return self.torch_cls(params, **kwargs)

    def make_fastopt(self, params: Sequence[Tensor], backend: str | None = None) -> torch.optim.Optimizer:
        return self.fastopt_cls(params, backend=backend, **self.make_kwargs())


OPTIMIZERS: list[OptimizerCase] = [
    # Adam: L2 or decoupled weight decay, amsgrad, maximize, a 0-dim tensor lr.
    OptimizerCase("adam-default", torch.optim.Adam, fastopt.Adam, {"lr": 5e-2}),
    OptimizerCase("adam-weight_decay", torch.optim.Adam, fastopt.Adam,
                  {"lr": 5e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0731}),
    OptimizerCase("adam-amsgrad", torch.optim.Adam, fastopt.Adam, {"lr": 5e-2, "amsgrad": True}),
    OptimizerCase("adam-maximize", torch.optim.Adam, fastopt.Adam, {"lr": 5e-2, "maximize": True}),
    OptimizerCase("adam-decoupled_weight_decay", torch.optim.Adam, fastopt.Adam,
                  {"lr": 5e-2, "weight_decay": 0.0731, "decoupled_weight_decay": True}),
    # A float64 0-dim lr: torch.optim computes lr / bias_correction1 as a tensor
    # op, so a float32 lr tensor would round the step size to float32 (6e-8
    # relative) while fastopt takes lr.item() and works in double; a float64
    # tensor keeps the float64 parity tests meaningful.
    OptimizerCase("adam-tensor_lr", torch.optim.Adam, fastopt.Adam,
                  {"lr": torch.tensor(8e-2, dtype=torch.float64)}),
    # AdamW: decoupled weight decay (default 1e-2, raised so it matters).
    OptimizerCase("adamw-default", torch.optim.AdamW, fastopt.AdamW, {"lr": 5e-2, "weight_decay": 0.0731}),
    OptimizerCase("adamw-amsgrad-maximize", torch.optim.AdamW, fastopt.AdamW,
                  {"lr": 5e-2, "weight_decay": 0.0517, "amsgrad": True, "maximize": True}),
    # SGD: the first momentum step copies the gradient, later ones use the recurrence.
    OptimizerCase("sgd-plain", torch.optim.SGD, fastopt.SGD, {"lr": 5e-2}),
    OptimizerCase("sgd-momentum", torch.optim.SGD, fastopt.SGD, {"lr": 5e-2, "momentum": 0.9}),
    OptimizerCase("sgd-momentum-dampening", torch.optim.SGD, fastopt.SGD,
                  {"lr": 5e-2, "momentum": 0.8, "dampening": 0.3}),
    OptimizerCase("sgd-nesterov-weight_decay", torch.optim.SGD, fastopt.SGD,
                  {"lr": 5e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0731}),
    OptimizerCase("sgd-maximize", torch.optim.SGD, fastopt.SGD,
                  {"lr": 5e-2, "momentum": 0.5, "maximize": True}),
    # RMSprop: centered and momentum are independent template flags.
    OptimizerCase("rmsprop-default", torch.optim.RMSprop, fastopt.RMSprop, {"lr": 1e-2}),
    OptimizerCase("rmsprop-centered", torch.optim.RMSprop, fastopt.RMSprop,
                  {"lr": 1e-2, "centered": True}),
    OptimizerCase("rmsprop-momentum", torch.optim.RMSprop, fastopt.RMSprop,
                  {"lr": 1e-2, "momentum": 0.9}),
    OptimizerCase("rmsprop-centered-momentum-weight_decay", torch.optim.RMSprop, fastopt.RMSprop,
                  {"lr": 1e-2, "alpha": 0.9, "eps": 1e-6, "centered": True, "momentum": 0.5,
                   "weight_decay": 0.0731}),
    OptimizerCase("rmsprop-maximize", torch.optim.RMSprop, fastopt.RMSprop,
                  {"lr": 1e-2, "maximize": True}),
    # Adagrad: the step count enters through lr_decay.
    OptimizerCase("adagrad-default", torch.optim.Adagrad, fastopt.Adagrad, {"lr": 1e-1}),
    OptimizerCase("adagrad-lr_decay", torch.optim.Adagrad, fastopt.Adagrad,
                  {"lr": 1e-1, "lr_decay": 0.05}),
    OptimizerCase("adagrad-initial_accumulator_value", torch.optim.Adagrad, fastopt.Adagrad,
                  {"lr": 1e-1, "initial_accumulator_value": 0.5, "eps": 1e-6}),
    OptimizerCase("adagrad-weight_decay-maximize", torch.optim.Adagrad, fastopt.Adagrad,
                  {"lr": 1e-1, "weight_decay": 0.0731, "maximize": True}),
    # NAdam: the momentum schedule (momentum_decay) and its mu_product state,
    # L2 or decoupled weight decay (NAdamW).
    OptimizerCase("nadam-default", torch.optim.NAdam, fastopt.NAdam, {"lr": 5e-2}),
    OptimizerCase("nadam-weight_decay-momentum_decay", torch.optim.NAdam, fastopt.NAdam,
                  {"lr": 5e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0731,
                   "momentum_decay": 0.0123}),
    OptimizerCase("nadam-decoupled_weight_decay-maximize", torch.optim.NAdam, fastopt.NAdam,
                  {"lr": 5e-2, "weight_decay": 0.0731, "decoupled_weight_decay": True, "maximize": True}),
    # float64 for the reason given at adam-tensor_lr.
    OptimizerCase("nadam-tensor_lr", torch.optim.NAdam, fastopt.NAdam,
                  {"lr": torch.tensor(8e-2, dtype=torch.float64)}),
    # RAdam: with the default beta2 = 0.999, rho_t > 5 from step 6 on, so ten
    # steps take both the unrectified and the rectified update.
    OptimizerCase("radam-default", torch.optim.RAdam, fastopt.RAdam, {"lr": 5e-2}),
    OptimizerCase("radam-weight_decay", torch.optim.RAdam, fastopt.RAdam,
                  {"lr": 5e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0731}),
    OptimizerCase("radam-decoupled_weight_decay-maximize", torch.optim.RAdam, fastopt.RAdam,
                  {"lr": 5e-2, "weight_decay": 0.0731, "decoupled_weight_decay": True, "maximize": True}),
    OptimizerCase("radam-tensor_lr", torch.optim.RAdam, fastopt.RAdam,
                  {"lr": torch.tensor(8e-2, dtype=torch.float64)}),
    # Adamax: the infinity norm exp_inf = max(beta2 * exp_inf, |g| + eps).
    OptimizerCase("adamax-default", torch.optim.Adamax, fastopt.Adamax, {"lr": 5e-2}),
    OptimizerCase("adamax-weight_decay", torch.optim.Adamax, fastopt.Adamax,
                  {"lr": 5e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.0731}),
    OptimizerCase("adamax-maximize-tensor_lr", torch.optim.Adamax, fastopt.Adamax,
                  {"lr": torch.tensor(8e-2, dtype=torch.float64), "maximize": True}),
    # Adadelta: its first steps are ~sqrt(eps) * lr in size, so eps (and lr)
    # are raised for the updates to stand far above the tolerances.
    OptimizerCase("adadelta-eps", torch.optim.Adadelta, fastopt.Adadelta, {"eps": 1e-3}),
    OptimizerCase("adadelta-rho-weight_decay", torch.optim.Adadelta, fastopt.Adadelta,
                  {"lr": 5.0, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.0731}),
    OptimizerCase("adadelta-maximize-tensor_lr", torch.optim.Adadelta, fastopt.Adadelta,
                  {"lr": torch.tensor(2.0, dtype=torch.float64), "eps": 1e-3, "maximize": True}),
    # ASGD: eta and mu are scalar states the previous step stored.  The default
    # t0 (1e6) keeps mu = 1 (ax copies the param); t0 = 3 averages from step 5
    # on, a fractional t0 gives fractional mu.
    OptimizerCase("asgd-default", torch.optim.ASGD, fastopt.ASGD, {"lr": 5e-2}),
    OptimizerCase("asgd-averaging", torch.optim.ASGD, fastopt.ASGD,
                  {"lr": 5e-2, "lambd": 0.0731, "alpha": 0.6, "t0": 3}),
    OptimizerCase("asgd-weight_decay-maximize", torch.optim.ASGD, fastopt.ASGD,
                  {"lr": 5e-2, "t0": 2.5, "weight_decay": 0.0731, "maximize": True}),
    OptimizerCase("asgd-tensor_lr", torch.optim.ASGD, fastopt.ASGD,
                  {"lr": torch.tensor(5e-2, dtype=torch.float64), "t0": 4}),
    # Rprop: step sizes start at lr; step_sizes (0.02, 0.2) make both bounds
    # clamp (0.05 * 0.37 < 0.02 on the first sign change).
    OptimizerCase("rprop-default", torch.optim.Rprop, fastopt.Rprop, {"lr": 5e-2}),
    OptimizerCase("rprop-etas-step_sizes", torch.optim.Rprop, fastopt.Rprop,
                  {"lr": 5e-2, "etas": (0.37, 1.31), "step_sizes": (0.02, 0.2)}),
    OptimizerCase("rprop-maximize", torch.optim.Rprop, fastopt.Rprop, {"lr": 5e-2, "maximize": True}),
    OptimizerCase("rprop-tensor_lr", torch.optim.Rprop, fastopt.Rprop,
                  {"lr": torch.tensor(5e-2, dtype=torch.float64)}),
    # Lion (oracle: tests/oracles.py, checked against lion-pytorch in
    # test_oracles.py).  Every row decays the weights: without decay each step
    # moves an element by exactly +-lr, and ten steps bring ~25% of them back
    # exactly to their start, which test_params_move rightly cannot tell from
    # no update.  weight_decay=0 is the same arithmetic (factor 1), compared
    # with lion-pytorch in test_oracles.py.
    # beta1 is "unround" for the reason weight decays are (module docstring):
    # with 0.9 (or 0.8), 16-bit m and g often make beta1*m + (1 - beta1)*g
    # cancel exactly (m = -g/9), and the sign of the residue then depends on
    # how each implementation rounds (a fused multiply-add, as torch's
    # add(alpha=) in a 16-bit oracle, decides otherwise): a 2*lr difference.
    # For 0.8934 and 0.9172, (1 - beta1)/beta1 stays >= 4e-6 (relative) from
    # every ratio of two bfloat16 / float16 mantissas, far above float32
    # rounding.
    OptimizerCase("lion-weight_decay", oracles.Lion, fastopt.Lion,
                  {"lr": 5e-2, "betas": (0.8934, 0.99), "weight_decay": 0.0731}),
    OptimizerCase("lion-betas-maximize", oracles.Lion, fastopt.Lion,
                  {"lr": 5e-2, "betas": (0.9172, 0.95), "weight_decay": 0.0517, "maximize": True}),
    OptimizerCase("lion-tensor_lr", oracles.Lion, fastopt.Lion,
                  {"lr": torch.tensor(5e-2, dtype=torch.float64), "betas": (0.8934, 0.99),
                   "weight_decay": 0.0731}),
    # ADOPT (oracle: tests/oracles.py, the authors' reference, checked against
    # pytorch-optimizer in test_oracles.py): the first step only initializes
    # exp_avg_sq; clipping on (default) or off; L2 or decoupled weight decay.
    # lr 0.1: nine updates of a clipped, averaged direction must still move
    # bfloat16 params by several ulps (test_params_move).
    OptimizerCase("adopt-default", oracles.ADOPT, fastopt.ADOPT, {"lr": 1e-1}),
    OptimizerCase("adopt-no_clip", oracles.ADOPT, fastopt.ADOPT,
                  {"lr": 5e-2, "clip_lambda": None, "betas": (0.8, 0.99), "eps": 1e-4}),
    OptimizerCase("adopt-weight_decay", oracles.ADOPT, fastopt.ADOPT, {"lr": 1e-1, "weight_decay": 0.0731}),
    OptimizerCase("adopt-decouple-maximize", oracles.ADOPT, fastopt.ADOPT,
                  {"lr": 1e-1, "weight_decay": 0.0517, "decouple": True, "maximize": True}),
    OptimizerCase("adopt-tensor_lr", oracles.ADOPT, fastopt.ADOPT,
                  {"lr": torch.tensor(8e-2, dtype=torch.float64)}),
    # AdaBound (oracle: tests/oracles.py, the authors' adabound package's
    # step, checked against the package in test_oracles.py).  gamma 0.3-0.5
    # makes the bounds bite within ten steps (with the default 1e-3 the upper
    # bound stays ~1000x final_lr, and AdaBound is Adam for thousands of steps).
    OptimizerCase("adabound-default", oracles.AdaBound, fastopt.AdaBound, {"lr": 5e-2}),
    OptimizerCase("adabound-bounds-weight_decay", oracles.AdaBound, fastopt.AdaBound,
                  {"lr": 5e-2, "final_lr": 0.05, "gamma": 0.5, "weight_decay": 0.0731}),
    OptimizerCase("adabound-amsbound-maximize", oracles.AdaBound, fastopt.AdaBound,
                  {"lr": 5e-2, "gamma": 0.3, "amsbound": True, "maximize": True}),
    OptimizerCase("adabound-tensor_lr", oracles.AdaBound, fastopt.AdaBound,
                  {"lr": torch.tensor(5e-2, dtype=torch.float64), "gamma": 0.3}),
    # QHAdam (oracle: tests/oracles.py, the paper's update; checked against
    # qhoptim in test_oracles.py): nus mix the grad into each moment.
    OptimizerCase("qhadam-default", oracles.QHAdam, fastopt.QHAdam, {"lr": 5e-2, "nus": (0.7, 1.0)}),
    OptimizerCase("qhadam-nus-weight_decay", oracles.QHAdam, fastopt.QHAdam,
                  {"lr": 5e-2, "nus": (0.8, 0.6), "betas": (0.8, 0.99), "weight_decay": 0.0731}),
    OptimizerCase("qhadam-decoupled-maximize", oracles.QHAdam, fastopt.QHAdam,
                  {"lr": 5e-2, "nus": (0.7, 0.9), "weight_decay": 0.0517, "decouple_weight_decay": True,
                   "maximize": True}),
    OptimizerCase("qhadam-tensor_lr", oracles.QHAdam, fastopt.QHAdam,
                  {"lr": torch.tensor(5e-2, dtype=torch.float64), "nus": (0.7, 1.0)}),
    # AggMo (oracle: tests/oracles.py, the authors' step; checked against
    # pytorch-optimizer in test_oracles.py): one, two or three betas.
    OptimizerCase("aggmo-default", oracles.AggMo, fastopt.AggMo, {"lr": 5e-2}),
    OptimizerCase("aggmo-two_betas-weight_decay", oracles.AggMo, fastopt.AggMo,
                  {"lr": 5e-2, "betas": (0.5, 0.95), "weight_decay": 0.0731}),
    OptimizerCase("aggmo-one_beta-maximize", oracles.AggMo, fastopt.AggMo,
                  {"lr": 5e-2, "betas": (0.9,), "maximize": True}),
    OptimizerCase("aggmo-tensor_lr", oracles.AggMo, fastopt.AggMo,
                  {"lr": torch.tensor(5e-2, dtype=torch.float64)}),
    # LAMB (oracle: tests/oracles.py, Apex's FusedLAMB; checked against
    # pytorch-optimizer in test_oracles.py): the trust ratio of each param's
    # norms (the reduction phase), L2 or decoupled decay, no bias correction or
    # grad averaging, and without decay no ratio unless use_nvlamb.  Apex's
    # default max_grad_norm=1.0 is turned off: its coefficient comes from a
    # norm summed in another order than the oracle's, 10 ulps apart in
    # float64, beyond these tolerances (and where the L2 decay cancels the
    # clipped grads, an ulp of them is many of the result); tests/test_clip.py
    # checks LAMB's clipping, as every optimizer's, against clip_grad_norm_.
    OptimizerCase("lamb-weight_decay", oracles.LAMB, fastopt.LAMB, {"lr": 5e-2, "max_grad_norm": None}),
    OptimizerCase("lamb-l2-no_bias_correction-maximize", oracles.LAMB, fastopt.LAMB,
                  {"lr": 5e-2, "weight_decay": 0.0731, "adam_w_mode": False, "bias_correction": False,
                   "grad_averaging": False, "max_grad_norm": None, "maximize": True}),
    OptimizerCase("lamb-no_weight_decay", oracles.LAMB, fastopt.LAMB,
                  {"lr": 5e-2, "betas": (0.8, 0.99), "weight_decay": 0.0, "max_grad_norm": None}),
    OptimizerCase("lamb-nvlamb-tensor_lr", oracles.LAMB, fastopt.LAMB,
                  {"lr": torch.tensor(5e-2, dtype=torch.float64), "weight_decay": 0.0, "use_nvlamb": True,
                   "max_grad_norm": None}),
    # LARS (oracle: tests/oracles.py; checked against pytorch-optimizer in
    # test_oracles.py).  trust_coefficient 0.02 and lr 1 move each param by
    # ~2% of its norm per step, far above the tolerances (without momentum,
    # whose steps do not add up, lr 3).
    OptimizerCase("lars-weight_decay", oracles.LARS, fastopt.LARS,
                  {"lr": 1.0, "trust_coefficient": 0.02, "weight_decay": 0.0731}),
    OptimizerCase("lars-nesterov-exclude_1d", oracles.LARS, fastopt.LARS,
                  {"lr": 0.5, "trust_coefficient": 0.02, "nesterov": True, "weight_decay": 0.0517,
                   "exclude_1d": True}),
    OptimizerCase("lars-no_momentum-eps-maximize", oracles.LARS, fastopt.LARS,
                  {"lr": 3.0, "momentum": 0.0, "trust_coefficient": 0.02, "eps": 1e-4, "maximize": True}),
    OptimizerCase("lars-dampening-tensor_lr", oracles.LARS, fastopt.LARS,
                  {"lr": torch.tensor(1.0, dtype=torch.float64), "momentum": 0.8, "dampening": 0.3,
                   "trust_coefficient": 0.02}),
    # Adafactor (oracle: torch.optim.Adafactor, but for empty params, which it
    # divides by zero): factored matrices and full vectors, decay, maximize,
    # its eps pair and clipping threshold d.  eps1 is given: its default, the
    # machine epsilon of the param's dtype, is not the same for 16-bit params
    # and torch.optim's float32 copies of them (tests/test_adafactor.py checks
    # the default against torch.optim in the same dtype).
    OptimizerCase("adafactor-eps1", oracles.Adafactor, fastopt.Adafactor, {"lr": 5e-2, "eps": (1e-15, 1e-3)}),
    OptimizerCase("adafactor-weight_decay-maximize-d", oracles.Adafactor, fastopt.Adafactor,
                  {"lr": 5e-2, "beta2_decay": -0.5, "eps": (1e-10, 2e-3), "d": 1.5, "weight_decay": 0.0731,
                   "maximize": True}),
    OptimizerCase("adafactor-tensor_lr", oracles.Adafactor, fastopt.Adafactor,
                  {"lr": torch.tensor(8e-2, dtype=torch.float64), "eps": (1e-15, 1e-3)}),
    # SWATS (oracle: tests/oracles.py, from the paper; checked against
    # pytorch-optimizer in test_oracles.py): L2 decay, maximize, a tensor lr,
    # and eps 1.0, whose switch tolerance every group meets at step 2, so
    # that steps 3 on run the SGD phase (its momentum from 0 at step 3; lr 2,
    # because eps 1.0 in Adam's denominator makes ~0.03 * lr * g steps, and
    # the learned SGD step is of their size).
    OptimizerCase("swats-default", oracles.SWATS, fastopt.SWATS, {"lr": 5e-2}),
    OptimizerCase("swats-weight_decay-maximize", oracles.SWATS, fastopt.SWATS,
                  {"lr": 5e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0731, "maximize": True}),
    OptimizerCase("swats-switches-tensor_lr", oracles.SWATS, fastopt.SWATS,
                  {"lr": torch.tensor(2.0, dtype=torch.float64), "eps": 1.0, "weight_decay": 0.0517}),
]

# Optimizers of 2-D params only (torch.optim.Muon), whose result also carries
# the bfloat16 rounding of a Newton–Schulz iteration: the shape table below
# (mostly 1-D) and the tolerances of a few float ulps do not fit them, so
# tests/test_muon.py runs the parity, exactness, storage, clip, AMP and
# bad-input checks on matrices.  Weight decays "unround" as above; lr 0.02
# (Muon's usual) moves each param by ~2% of an orthogonal matrix per step.
MATRIX_OPTIMIZERS: list[OptimizerCase] = [
    OptimizerCase("muon-default", torch.optim.Muon, fastopt.Muon, {"lr": 2e-2}),
    OptimizerCase("muon-no_nesterov-momentum-weight_decay", torch.optim.Muon, fastopt.Muon,
                  {"lr": 2e-2, "nesterov": False, "momentum": 0.8, "weight_decay": 0.0731}),
    OptimizerCase("muon-match_rms_adamw", torch.optim.Muon, fastopt.Muon,
                  {"lr": 2e-2, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0517}),
    OptimizerCase("muon-newton_schulz-tensor_lr", torch.optim.Muon, fastopt.Muon,
                  {"lr": torch.tensor(3e-2, dtype=torch.float64), "adjust_lr_fn": "original", "ns_steps": 3,
                   "ns_coefficients": (2.0, -1.5, 0.5), "eps": 1e-5, "weight_decay": 0.0}),
]
OPTIMIZER_IDS = [case.id for case in OPTIMIZERS]
OPTIMIZERS_BY_ID = {case.id: case for case in OPTIMIZERS}
# The state keys of per-tensor scalar states ("step", NAdam's "mu_product",
# ASGD's "eta" and "mu"):
# 0-dim float32 tensors whatever the param's dtype and shape, compared
# exactly (fastopt computes them as torch.optim does) and never rounded to a
# storage dtype.
SCALAR_STATE_KEYS = frozenset(key for case in OPTIMIZERS for key in case.fastopt_cls._scalar_states)
# Scalar states computed from the values of a step (SWATS's sums of its Adam
# step and their running average, and the learned step taken from it): sums
# over whole params, equal only within the rounding of their terms, so
# compared within a tolerance (assert_scalar_state_matches), not bit for bit.
# The sum of u*g over a param of a few elements can cancel, so an ulp of
# its terms is more than an ulp of it: never tighter than MEASURED_RTOL.
MEASURED_STATE_KEYS = frozenset(swats.SUM_STATES) | frozenset(swats.GROUP_STATES) - {"switched"}
MEASURED_RTOL = 1e-4


def assert_scalar_state_matches(key: str, actual: Tensor, expected: Tensor, rtol: float, what: str = "") -> None:
    """Scalar states ``key`` of two runs: identical, or for a measured one
    (MEASURED_STATE_KEYS) within ``max(rtol, MEASURED_RTOL)`` of the largest
    magnitude among them."""
    if key not in MEASURED_STATE_KEYS:
        assert torch.equal(actual, expected), f"{what}{key}: {actual.tolist()} vs {expected.tolist()}"
        return
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0,
                               atol=max(rtol, MEASURED_RTOL) * scale,
                               msg=lambda m: f"{what}{key}: {m}")


def state_shape(key: str, param: Tensor) -> tuple[int, ...]:
    """The shape of ``param``'s state slot ``key``: the param's, but for the
    factors of Adafactor's second moment (its last dim, or the one before, 1)."""
    shape = list(param.shape)
    if key in fastopt.adafactor.FACTORS:
        shape[fastopt.adafactor.FACTORS[key]] = 1
    return tuple(shape)




# -- shapes --------------------------------------------------------------------

# Layouts of a parameter or gradient tensor:
#   "contiguous"  row-major;
#   "transposed"  dense but not contiguous (a 2-D tensor built transposed);
#   "strided"     not dense: every other element of a buffer twice as wide; the
#                 gaps hold NaN for gradients (a kernel that reads them poisons
#                 the result) and PARAM_GAP_FILL for parameters (a kernel that
#                 writes them is caught by comparing the buffer).
LAYOUTS = ("contiguous", "transposed", "strided")
PARAM_GAP_FILL = 1024.0  # exact in every float dtype, far from N(0, 1) values

# The CPU driver hands at most one chunk of >= kCpuMinElementsPerThread
# (csrc/rules/common.h) elements to each thread; chunks start and end inside
# tensors.
CPU_MIN_ELEMENTS_PER_THREAD = 16384


@dataclass(frozen=True)
class ShapeCase:
    """A list of parameter shapes with the layout of the params and grads."""

    id: str
    shapes: tuple[tuple[int, ...], ...]
    param_layout: str = "contiguous"
    grad_layout: str = "contiguous"

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _many_small_shapes(count: int = 523) -> tuple[tuple[int, ...], ...]:
    """``count`` small tensors of varied sizes (1..61 elements, some 2-D):
    more than one CUDA launch holds and more than a few SIMD tails."""
    shapes = []
    for i in range(count):
        n = 1 + (i * 37) % 61
        shapes.append((n,) if i % 3 else (1 + i % 5, n))
    return tuple(shapes)


_CHUNK = CPU_MIN_ELEMENTS_PER_THREAD
SHAPES: list[ShapeCase] = [
    ShapeCase("empty", ((0,),)),
    ShapeCase("one", ((1,),)),
    ShapeCase("odd-7", ((7,),)),
    ShapeCase("odd-33", ((33,),)),
    ShapeCase("odd-1023", ((1023,),)),
    ShapeCase("chunks-2x16384+17", ((2 * _CHUNK + 17,),)),
    ShapeCase("chunks-70001", ((70001,),)),
    # A list whose chunk boundaries fall inside tensors, with an empty tensor
    # between non-empty ones.
    ShapeCase("chunks-mixed-list", ((_CHUNK - 1,), (0,), (5,), (_CHUNK + 3, 1), (7, 3001))),
    ShapeCase("2d-37x13", ((37, 13),)),
    ShapeCase("param-transposed", ((37, 13), (5, 3)), param_layout="transposed"),
    ShapeCase("param-strided", ((20, 20), (3, 7)), param_layout="strided"),
    ShapeCase("grad-transposed", ((37, 13), (5, 3)), grad_layout="transposed"),
    ShapeCase("grad-strided", ((37, 13), (1023,)), grad_layout="strided"),
    ShapeCase("many-tensors", _many_small_shapes()),
]

SHAPE_IDS = [case.id for case in SHAPES]
SHAPES_BY_ID = {case.id: case for case in SHAPES}

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
               torch.float16: "float16"}
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def with_layout(values: Tensor, layout: str, gap_fill: float = PARAM_GAP_FILL) -> Tensor:
    """A new tensor equal to ``values`` with the given layout.

    ``gap_fill`` is what the unused elements of a "strided" layout hold.
    "transposed" needs a 2-D tensor.
    """
    if layout == "contiguous":
        return values.clone(memory_format=torch.contiguous_format)
    if layout == "transposed":
        if values.dim() != 2:
            raise ValueError(f"layout 'transposed' needs a 2-D tensor, got shape {tuple(values.shape)}")
        return values.t().contiguous().t()
    if layout == "strided":
        wide_shape = (*values.shape[:-1], 2 * values.shape[-1]) if values.dim() else (2,)
        buffer = torch.full(wide_shape, gap_fill, dtype=values.dtype, device=values.device)
        view = buffer[..., ::2] if values.dim() else buffer[0]
        view.copy_(values)
        return view
    raise ValueError(f"unknown layout {layout!r}, expected one of {LAYOUTS}")


def random_values(shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator,
                  scale: float = 1.0) -> Tensor:
    """Normal random values drawn in float32 and rounded to ``dtype``; never
    exactly zero (a zero is replaced by ``scale``)."""
    values = torch.randn(tuple(shape), generator=generator, dtype=torch.float32).mul_(scale).to(dtype)
    return values.masked_fill_(values == 0, scale)


def make_params(shape_case: ShapeCase, dtype: torch.dtype, seed: int,
                device: str | torch.device = "cpu") -> list[torch.nn.Parameter]:
    """Leaf Parameters on ``device`` with the shapes and param layout of
    ``shape_case``, random normal values (the same for the same seed on every
    device)."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shape_case.shapes:
        values = random_values(shape, dtype, generator).to(device)
        layout = shape_case.param_layout if len(shape) == 2 or shape_case.param_layout == "strided" \
            else "contiguous"
        params.append(torch.nn.Parameter(with_layout(values, layout)))
    return params


def clone_params(params: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[torch.nn.Parameter]:
    """Leaf copies of ``params`` with the same layout (dense layouts are kept;
    a non-dense param is rebuilt as a non-dense view), optionally as ``dtype``."""
    copies = []
    for p in params:
        target = dtype or p.dtype
        if is_dense(p):
            data = p.detach().to(target, copy=True)  # preserve_format keeps dense strides
        else:
            data = with_layout(p.detach().to(target), "strided")
        copies.append(torch.nn.Parameter(data))
    return copies


class GradientFeed:
    """Sets the same random gradients on several parameter lists, step after
    step, from one seeded generator.

    Gradients are normal random values (never zero) rounded to the dtype of
    the first list's param (or to ``dtype``), so lists of a different dtype (a
    float32 oracle of bfloat16 params) get exactly the values the
    low-precision list gets.  ``layout``
    is the gradient layout ("transposed" applies to 2-D params only).
    """

    def __init__(self, seed: int, layout: str = "contiguous", dtype: torch.dtype | None = None,
                 scale: float = 1.0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.layout = layout
        self.dtype = dtype
        self.scale = scale

    def set_grads(self, *param_lists: Sequence[Tensor]) -> list[Tensor]:
        """Draws one gradient per param and sets it on the matching param of
        every list (each list gets its own tensor).  Returns the values drawn."""
        first = param_lists[0]
        for other in param_lists[1:]:
            assert [tuple(p.shape) for p in other] == [tuple(p.shape) for p in first]
        # One draw for all params (a step of 500 small tensors stays cheap).
        flat = random_values((sum(p.numel() for p in first),), torch.float32, self.generator, self.scale)
        drawn, offset = [], 0
        for i, p in enumerate(first):
            values = flat[offset:offset + p.numel()].view(p.shape).to(self.dtype or p.dtype)
            values = values.masked_fill(values == 0, self.scale)  # float16 underflow
            offset += p.numel()
            drawn.append(values)
            layout = self.layout if (self.layout != "transposed" or p.dim() == 2) else "contiguous"
            for params in param_lists:
                q = params[i]
                q.grad = with_layout(values.to(device=q.device, dtype=q.dtype), layout, gap_fill=float("nan"))
        return drawn


def run_steps(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], feed: GradientFeed,
              steps: int, storage_dtype: torch.dtype | None = None) -> None:
    """``steps`` optimizer steps, each on fresh gradients from ``feed``.

    With ``storage_dtype``, params and state tensors (not ``step``) are
    rounded to that dtype after every step: torch.optim run on float32 copies
    this way computes each step in float32 and rounds once on store, which is
    what fastopt does for float16 / bfloat16 tensors.
    """
    for _ in range(steps):
        feed.set_grads(params)
        optimizer.step()
        if storage_dtype is not None:
            round_through(optimizer, params, storage_dtype)


@torch.no_grad()
def round_through(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], dtype: torch.dtype) -> None:
    """Rounds every param and state tensor (but the scalar states) to ``dtype``, in place."""
    for p in params:
        p.copy_(p.to(dtype))
        for key, value in optimizer.state.get(p, {}).items():
            if key not in SCALAR_STATE_KEYS and isinstance(value, Tensor):
                value.copy_(value.to(dtype))


@contextlib.contextmanager
def one_process_mesh() -> Iterator[Any]:
    """A CPU DeviceMesh of this process alone (a gloo group of one rank), for
    DTensor params in a single-process test; skips where torch.distributed
    is not available."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.tensor import DeviceMesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DeviceMesh("cpu", [0])
    finally:
        dist.destroy_process_group()


def snapshot(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """Copies of every param and its state tensors on the CPU, keyed "param" /
    state key."""
    out = []
    for p in params:
        entry = {"param": p.detach().to("cpu", copy=True)}
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, Tensor):
                entry[key] = value.detach().to("cpu", copy=True)
        out.append(entry)
    return out


__all__ = [
    "OptimizerCase", "OPTIMIZERS", "MATRIX_OPTIMIZERS", "state_shape", "OPTIMIZER_IDS", "OPTIMIZERS_BY_ID", "SCALAR_STATE_KEYS",
    "MEASURED_STATE_KEYS", "assert_scalar_state_matches", "ShapeCase",
    "SHAPES",
    "SHAPE_IDS", "SHAPES_BY_ID", "FLOAT_DTYPES", "DTYPE_NAMES", "LOW_PRECISION_DTYPES", "LAYOUTS",
    "CPU_MIN_ELEMENTS_PER_THREAD", "make_params", "clone_params", "with_layout", "random_values",
    "GradientFeed", "run_steps", "round_through", "snapshot", "is_dense", "one_process_mesh",
    "PARAM_GAP_FILL",
]
