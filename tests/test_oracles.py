"""The test oracles of optimizers torch.optim lacks (tests/oracles.py), and
fastopt.Lion / ADOPT / AdaBound / QHAdam / AggMo / LAMB / LARS / SWATS themselves, against the PyPI implementations:
lion-pytorch's Lion and pytorch-optimizer's ADOPT (both in pyproject's
``test`` extra; each test skips when its package is missing), element by
element.

The ADOPT oracle runs the package's torch ops in the same order, so it must
match exactly; the Lion oracle (which rounds each product on its own) and
fastopt within the parity tolerance of torch.optim (Note [Parity
tolerances] in test_parity.py).  Where the packages' options differ (lion-
pytorch has no ``maximize``: it gets the negated grads; pytorch-optimizer
names decoupled weight decay ``weight_decouple`` and keeps its step count in
the param group), the tests map them.  The packages step complex params
differently (lion-pytorch takes the complex sign z/|z|), so the comparisons
are on real params; fastopt steps complex params as real pairs, as torch.optim
and the oracles do.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastopt
import oracles
from registry import SHAPES_BY_ID, GradientFeed, clone_params, make_params
from test_parity import K_VS_TORCH, assert_scaled_close, rms

STEPS = 10
SHAPE = SHAPES_BY_ID["chunks-mixed-list"]  # several tensors, 2-D ones, an empty one
KEYS = {"Lion": ("exp_avg",), "ADOPT": ("exp_avg", "exp_avg_sq")}


def run_against_package(make, make_package, negate_package_grads: bool = False):
    """``STEPS`` steps of ``make(params)`` and ``make_package(params)`` from the
    same params on the same grads (negated for a package without maximize).
    Returns (initial params, params, package params, optimizer, package)."""
    initial = make_params(SHAPE, torch.float32, seed=0)
    params, package_params = clone_params(initial), clone_params(initial)
    optimizer, package = make(params), make_package(package_params)
    feed = GradientFeed(seed=1)
    for _ in range(STEPS):
        feed.set_grads(params, package_params)
        if negate_package_grads:
            for q in package_params:
                q.grad.neg_()
        optimizer.step()
        package.step()
    return initial, params, package_params, optimizer, package


def assert_runs_equal(params, other_params, optimizer, other_optimizer, keys, exact: bool):
    """Params and state ``keys``: identical (``exact``), or within the parity
    tolerance of float32 over all params per key."""
    for key in ("param", *keys):
        def flat(ps, opt):
            return torch.cat([(p.detach() if key == "param" else opt.state[p][key]).reshape(-1) for p in ps])
        actual, expected = flat(params, optimizer), flat(other_params, other_optimizer)
        if exact:
            torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
        else:
            assert_scaled_close(actual, expected, K_VS_TORCH, torch.float32, rms(expected), key)


def assert_moved(params, initial, fraction):
    """More than ``fraction`` of the elements moved: the run was not a no-op."""
    moved = torch.cat([(p.detach() - q.detach()).abs().flatten() for p, q in zip(params, initial)])
    assert (moved > 0).double().mean().item() > fraction, "the run did not move the params"


# The oracle (exact) and fastopt's backends (within tolerance) against a package.
IMPLEMENTATIONS = {
    "oracle": lambda name, params, options: getattr(oracles, name)(params, foreach=False, **options),
    "fused": lambda name, params, options: getattr(fastopt, name)(params, backend="fused", **options),
    "reference": lambda name, params, options: getattr(fastopt, name)(params, backend="reference", **options),
}

LION_OPTIONS = [
    {"lr": 1e-2},
    {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.0731},
    {"lr": 1e-2, "weight_decay": 0.0517, "maximize": True},
]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("options", LION_OPTIONS, ids=["default", "betas-weight_decay", "maximize"])
def test_lion_matches_lion_pytorch(options, implementation):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    package_options = {k: v for k, v in options.items() if k != "maximize"}
    initial, params, package_params, optimizer, package = run_against_package(
        lambda ps: IMPLEMENTATIONS[implementation]("Lion", ps, options),
        lambda ps: lion_pytorch.Lion(ps, **package_options),
        negate_package_grads=options.get("maximize", False))
    assert set(optimizer.state[params[0]]) == set(package.state[package_params[0]]) == {"exp_avg"}
    # Within rounding only: the oracle rounds each product on its own (tests/oracles.py).
    assert_runs_equal(params, package_params, optimizer, package, KEYS["Lion"], exact=False)
    # Without weight decay each step moves by exactly +-lr: a random walk of 10
    # such steps is back at its start with probability C(10, 5) / 2^10 ~ 25%.
    assert_moved(params, initial, 0.6)


ADOPT_OPTIONS = [
    {"lr": 5e-2},
    {"lr": 5e-2, "clip_lambda": None},
    {"lr": 5e-2, "betas": (0.8, 0.99), "eps": 1e-4, "weight_decay": 0.0731},
    {"lr": 5e-2, "weight_decay": 0.0517, "decouple": True, "maximize": True},
]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("options", ADOPT_OPTIONS, ids=["default", "no_clip", "l2", "decoupled-maximize"])
def test_adopt_matches_pytorch_optimizer(options, implementation):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    package_options = {("weight_decouple" if k == "decouple" else k): v for k, v in options.items()}
    initial, params, package_params, optimizer, package = run_against_package(
        lambda ps: IMPLEMENTATIONS[implementation]("ADOPT", ps, options),
        lambda ps: pytorch_optimizer.ADOPT(ps, foreach=False, **package_options))
    assert_runs_equal(params, package_params, optimizer, package, KEYS["ADOPT"],
                      exact=implementation == "oracle")
    assert_moved(params, initial, 0.99)
    assert package.param_groups[0]["step"] == STEPS
    assert all(optimizer.state[p]["step"].item() == STEPS for p in params)


def test_adopt_clip_lambda_is_the_default_schedule_or_none():
    """The kernels compute the reference's clip bound step**0.25 from each
    tensor's step count: other schedules are refused before anything is built."""
    params = make_params(SHAPE, torch.float32, seed=0)
    assert fastopt.ADOPT(params).clip_lambda is fastopt.adopt.default_clip_lambda
    assert fastopt.ADOPT(params, clip_lambda=None).clip_lambda is None
    with pytest.raises(ValueError, match="clip_lambda=None .* or the default"):
        fastopt.ADOPT(params, clip_lambda=lambda step: step**0.5)


ADABOUND_OPTIONS = [
    {"lr": 1e-2},
    {"lr": 1e-2, "final_lr": 0.05, "gamma": 0.3, "weight_decay": 0.0731},
    {"lr": 1e-2, "betas": (0.8, 0.99), "gamma": 0.5, "amsbound": True, "maximize": True},
]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("options", ADABOUND_OPTIONS, ids=["default", "bounds-l2", "amsbound-maximize"])
def test_adabound_matches_adabound_package(options, implementation):
    """The authors' package (its deprecated add_(scalar, tensor) calls warn)."""
    adabound = pytest.importorskip("adabound")
    package_options = {k: v for k, v in options.items() if k != "maximize"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        initial, params, package_params, optimizer, package = run_against_package(
            lambda ps: IMPLEMENTATIONS[implementation]("AdaBound", ps, options),
            lambda ps: adabound.AdaBound(ps, **package_options),
            negate_package_grads=options.get("maximize", False))
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if options.get("amsbound") else ())
    assert_runs_equal(params, package_params, optimizer, package, keys, exact=implementation == "oracle")
    assert_moved(params, initial, 0.99)


QHADAM_OPTIONS = [
    {"lr": 1e-2, "nus": (0.7, 1.0)},
    {"lr": 1e-2, "nus": (0.8, 0.6), "betas": (0.8, 0.99), "weight_decay": 0.0731},
    {"lr": 1e-2, "nus": (0.7, 0.9), "weight_decay": 0.0517, "decouple_weight_decay": True, "maximize": True},
]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("options", QHADAM_OPTIONS, ids=["default", "nus-l2", "decoupled-maximize"])
def test_qhadam_matches_qhoptim(options, implementation):
    """The authors' qhoptim keeps bias-corrected moments (Adam's divided by
    1 - beta^t) and updates them with weights of its own: the same update up
    to rounding, so params and the corrected moments are compared within the
    parity tolerance."""
    qhoptim = pytest.importorskip("qhoptim.pyt")
    package_options = {k: v for k, v in options.items() if k != "maximize"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        initial, params, package_params, optimizer, package = run_against_package(
            lambda ps: IMPLEMENTATIONS[implementation]("QHAdam", ps, options),
            lambda ps: qhoptim.QHAdam(ps, **package_options),
            negate_package_grads=options.get("maximize", False))
    assert_runs_equal(params, package_params, optimizer, package, (), exact=False)
    beta1, beta2 = options.get("betas", (0.9, 0.999))
    for key, beta in (("exp_avg", beta1), ("exp_avg_sq", beta2)):
        corrected = torch.cat([(optimizer.state[p][key] / (1 - beta**STEPS)).flatten() for p in params])
        expected = torch.cat([package.state[q][key].flatten() for q in package_params])
        assert_scaled_close(corrected, expected, K_VS_TORCH, torch.float32, rms(expected), key)
    assert_moved(params, initial, 0.99)


AGGMO_OPTIONS = [
    {"lr": 1e-2},
    {"lr": 1e-2, "betas": (0.5, 0.95), "weight_decay": 0.0731},
    {"lr": 1e-2, "betas": (0.2, 0.9, 0.999), "maximize": True},  # the package takes 2+ betas
]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("options", AGGMO_OPTIONS, ids=["default", "two_betas-l2", "maximize"])
def test_aggmo_matches_pytorch_optimizer(options, implementation):
    """pytorch-optimizer keeps the buffers in a dict keyed by beta
    (``momentum_buffer[beta]``, as the authors' code); fastopt in
    ``momentum_buffer_<k>``, one per beta in order."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    initial, params, package_params, optimizer, package = run_against_package(
        lambda ps: IMPLEMENTATIONS[implementation]("AggMo", ps, options),
        lambda ps: pytorch_optimizer.AggMo(ps, foreach=False, **options))
    betas = options.get("betas", (0.0, 0.9, 0.99))
    for q in package_params:
        for k, beta in enumerate(betas):
            package.state[q][f"momentum_buffer_{k}"] = package.state[q]["momentum_buffer"][beta]
    keys = tuple(f"momentum_buffer_{k}" for k in range(len(betas)))
    assert_runs_equal(params, package_params, optimizer, package, keys, exact=implementation == "oracle")
    assert_moved(params, initial, 0.99)


# pytorch-optimizer's Lamb has no bias correction (the paper's version 3
# without it), adds the decay to the update as Apex's adam_w_mode does when
# weight_decouple=False, and has no max_grad_norm clipping unless pre_norm.
LAMB_OPTIONS = [
    {"lr": 1e-2, "weight_decay": 0.0731},
    {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.0517, "grad_averaging": False, "maximize": True},
    {"lr": 1e-2, "weight_decay": 0.0, "use_nvlamb": True},
]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=["decay", "no_averaging-maximize", "nvlamb"])
def test_lamb_matches_pytorch_optimizer(options, implementation):
    """pytorch-optimizer takes the trust ratio as ``min(||p||, 10) / (||u|| +
    eps)``: the clamp at 10 is its own (Apex and the paper's Algorithm 2 use
    ``||p||``), so it is lifted here; its ``+ eps`` is within rounding for
    these norms.  It divides lr by ``1 - beta1^t`` unless ``adam_debias``
    (a step Apex and the paper do not scale), so that is set.  Without decay
    it applies the ratio always, as fastopt does with use_nvlamb."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    options = {**options, "bias_correction": False, "max_grad_norm": None}

    def make_package(ps):
        package = pytorch_optimizer.Lamb(
            ps, lr=options["lr"], betas=options.get("betas", (0.9, 0.999)), weight_decay=options["weight_decay"],
            weight_decouple=False, grad_averaging=options.get("grad_averaging", True),
            eps=options.get("eps", 1e-6), maximize=options.get("maximize", False), foreach=False,
            adam_debias=True)
        package.clamp = float("inf")
        return package

    initial, params, package_params, optimizer, package = run_against_package(
        lambda ps: IMPLEMENTATIONS[implementation]("LAMB", ps, options), make_package)
    assert_runs_equal(params, package_params, optimizer, package, ("exp_avg", "exp_avg_sq"), exact=False)
    assert_moved(params, initial, 0.99)


# pytorch-optimizer's LARS always leaves params of at most one dimension out
# of the adaptation (fastopt's exclude_1d) and has no eps.
LARS_OPTIONS = [
    {"lr": 1.0, "trust_coefficient": 0.02, "weight_decay": 0.0731},
    {"lr": 0.5, "trust_coefficient": 0.02, "momentum": 0.8, "dampening": 0.3},
    {"lr": 0.5, "trust_coefficient": 0.02, "nesterov": True, "weight_decay": 0.0517, "maximize": True},
]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("options", LARS_OPTIONS, ids=["decay", "dampening", "nesterov-maximize"])
def test_lars_matches_pytorch_optimizer(options, implementation):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    initial, params, package_params, optimizer, package = run_against_package(
        lambda ps: IMPLEMENTATIONS[implementation]("LARS", ps, {**options, "eps": 0.0, "exclude_1d": True}),
        lambda ps: pytorch_optimizer.LARS(ps, foreach=False, **options))
    assert_runs_equal(params, package_params, optimizer, package, ("momentum_buffer",), exact=False)
    assert_moved(params, initial, 0.99)


SWATS_OPTIONS = [
    {"lr": 1e-2, "eps": 1e-8},
    {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0731},
]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("options", SWATS_OPTIONS, ids=["default", "betas-l2"])
def test_swats_matches_pytorch_optimizer_before_the_switch(options, implementation):
    """pytorch-optimizer's SWATS keeps one running average of the projection
    per param (``exp_avg2``) and switches its whole group on any one param's,
    within a relative tolerance, where the paper (and fastopt) keeps one per
    group, within an absolute one: with one param per group and before a
    switch they are the same algorithm, so params, moments and averages
    agree element-wise.  The package also adds 1e-15 to the second moment
    under the square root, which the paper does not (it moves elements whose
    grads are ~1e-5 by ~1e-4 of their step): the test sets that to 0."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

    def per_param(ps):
        return [{"params": [p]} for p in ps]

    def package_as_the_paper(ps):
        package = pytorch_optimizer.SWATS(per_param(ps), foreach=False, **options)
        package.apply_ams_bound = lambda **kwargs: type(package).apply_ams_bound(**kwargs, exp_avg_sq_eps=0.0)
        return package

    initial, params, package_params, optimizer, package = run_against_package(
        lambda ps: IMPLEMENTATIONS[implementation]("SWATS", per_param(ps), options), package_as_the_paper)
    assert all(group["phase"] == "adam" for group in package.param_groups)
    assert all(optimizer.state[p]["switched"].item() == 0 for p in params)
    assert_runs_equal(params, package_params, optimizer, package, ("exp_avg", "exp_avg_sq"), exact=False)
    averages = torch.stack([optimizer.state[p]["lr_avg"] for p in params if p.numel()])
    expected = torch.stack([package.state[q]["exp_avg2"][0] for q in package_params if q.numel()])
    torch.testing.assert_close(averages, expected, rtol=1e-5, atol=0)
    assert (averages > 0).all()
    assert_moved(params, initial, 0.99)
