"""The test oracles of optimizers torch.optim lacks (tests/oracles.py) against
the PyPI implementations the task names, element by element: lion-pytorch's
Lion and pytorch-optimizer's ADOPT (both in pyproject's ``test`` extra; each
test skips when its package is missing).

Both sides run the same torch ops in the same order, so the comparison is
exact.  Where the packages' options differ from the oracles' (lion-pytorch
has no ``maximize``: it gets the negated grads; pytorch-optimizer names
decoupled weight decay ``weight_decouple``), the test maps them.
"""
from __future__ import annotations

import pytest
import torch

import oracles
from registry import SHAPES_BY_ID, GradientFeed, clone_params, make_params

STEPS = 10
SHAPE = SHAPES_BY_ID["chunks-mixed-list"]  # several tensors, 2-D ones, an empty one


def assert_equal_runs(params, other_params, optimizer, other_optimizer, keys):
    for i, (p, q) in enumerate(zip(params, other_params)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0, msg=lambda m: f"params[{i}]: {m}")
        for key in keys:
            torch.testing.assert_close(optimizer.state[p][key], other_optimizer.state[q][key], rtol=0, atol=0,
                                       msg=lambda m: f"params[{i}] {key}: {m}")


def assert_moved(params, initial, fraction):
    """More than ``fraction`` of the elements moved: the run was not a no-op."""
    moved = torch.cat([(p.detach() - q.detach()).abs().flatten() for p, q in zip(params, initial)])
    assert (moved > 0).double().mean().item() > fraction, "the run did not move the params"


LION_OPTIONS = [
    {"lr": 1e-2},
    {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.0731},
    {"lr": 1e-2, "weight_decay": 0.0517, "maximize": True},
]


@pytest.mark.parametrize("options", LION_OPTIONS, ids=["default", "betas-weight_decay", "maximize"])
def test_lion_oracle_matches_lion_pytorch(options):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    initial = make_params(SHAPE, torch.float32, seed=0)
    params, package_params = clone_params(initial), clone_params(initial)
    oracle = oracles.Lion(params, foreach=False, **options)
    package_options = {k: v for k, v in options.items() if k != "maximize"}
    package = lion_pytorch.Lion(package_params, **package_options)
    feed = GradientFeed(seed=1)
    for _ in range(STEPS):
        feed.set_grads(params, package_params)
        if options.get("maximize"):
            for q in package_params:
                q.grad.neg_()
        oracle.step()
        package.step()
    assert_equal_runs(params, package_params, oracle, package, ("exp_avg",))
    # Without weight decay each step moves by exactly +-lr: a random walk of 10
    # such steps is back at its start with probability C(10, 5) / 2^10 ~ 25%.
    assert_moved(params, initial, 0.6)


ADOPT_OPTIONS = [
    {"lr": 5e-2},
    {"lr": 5e-2, "clip_lambda": None},
    {"lr": 5e-2, "betas": (0.8, 0.99), "eps": 1e-4, "weight_decay": 0.0731},
    {"lr": 5e-2, "weight_decay": 0.0517, "decouple": True, "maximize": True},
]


@pytest.mark.parametrize("options", ADOPT_OPTIONS, ids=["default", "no_clip", "l2", "decoupled-maximize"])
def test_adopt_oracle_matches_pytorch_optimizer(options):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    initial = make_params(SHAPE, torch.float32, seed=0)
    params, package_params = clone_params(initial), clone_params(initial)
    oracle = oracles.ADOPT(params, foreach=False, **options)
    package_options = {("weight_decouple" if k == "decouple" else k): v for k, v in options.items()}
    package = pytorch_optimizer.ADOPT(package_params, foreach=False, **package_options)
    feed = GradientFeed(seed=1)
    for _ in range(STEPS):
        feed.set_grads(params, package_params)
        oracle.step()
        package.step()
    assert_equal_runs(params, package_params, oracle, package, ("exp_avg", "exp_avg_sq"))
    assert_moved(params, initial, 0.99)
    assert package.param_groups[0]["step"] == STEPS
    assert all(oracle.state[p]["step"].item() == STEPS for p in params)
