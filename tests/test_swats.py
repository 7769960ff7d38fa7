"""fastopt.SWATS beyond the registry-driven tests: the switch per param group
(Note [SWATS's switch] in fastopt/swats.py), the sums the kernels store, the
SGD phase's momentum from 0, a param that first steps after the switch, a
skipped step, and a training run that switches."""
from __future__ import annotations

import pytest
import torch

import fastopt
import oracles
from registry import GradientFeed, SHAPES_BY_ID, clone_params, make_params

BACKENDS = ["fused", "reference"]
SHAPE = SHAPES_BY_ID["chunks-mixed-list"]  # several tensors, 2-D ones, an empty one


def _groups(params, eps_per_group):
    half = len(params) // 2
    return [{"params": params[:half], "eps": eps_per_group[0]}, {"params": params[half:], "eps": eps_per_group[1]}]


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_switch_apart(backend):
    """A group whose tolerance its projection meets switches at step 2 (every
    param's ``switched`` = 3, its first SGD step, with the group's learned
    step); the other stays in the Adam phase.  Params and states match the
    oracle (the paper's algorithm) throughout."""
    initial = make_params(SHAPE, torch.float64, seed=0)
    params, oracle_params = clone_params(initial), clone_params(initial)
    optimizer = fastopt.SWATS(_groups(params, (1.0, 1e-9)), lr=5e-2, weight_decay=0.0517, backend=backend)
    oracle = oracles.SWATS(_groups(oracle_params, (1.0, 1e-9)), lr=5e-2, weight_decay=0.0517)
    feed = GradientFeed(seed=1)
    for _ in range(6):
        feed.set_grads(params, oracle_params)
        optimizer.step()
        oracle.step()
    switched, adam = optimizer.param_groups
    sgd_lrs = {optimizer.state[p]["sgd_lr"].item() for p in switched["params"]}
    assert len(sgd_lrs) == 1 and sgd_lrs.pop() > 0
    assert all(optimizer.state[p]["switched"].item() == 3 for p in switched["params"])
    assert all(optimizer.state[p]["switched"].item() == 0 and optimizer.state[p]["sgd_lr"].item() == 0
               for p in adam["params"])
    for p, q in zip(params, oracle_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        for key, value in oracle.state[q].items():
            torch.testing.assert_close(optimizer.state[p][key], value, rtol=1e-6, atol=0, msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stored_sums_are_the_projection_of_the_step(backend):
    """In the Adam phase the step stores, per param, the sums of ``u*u`` and
    ``u*g`` of the update it applied (float64 params: ``u`` is the change of
    the param), and the group's ``lr_avg`` is (1 - beta2) times their ratio
    after the first step."""
    params = make_params(SHAPE, torch.float64, seed=3)
    optimizer = fastopt.SWATS(params, lr=5e-2, betas=(0.9, 0.99), backend=backend)
    GradientFeed(seed=4).set_grads(params)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    update_sq = update_dot_grad = 0.0
    for p, b in zip(params, before):
        u = (p.detach() - b).double()
        state = optimizer.state[p]
        assert state["update_sq"].item() == pytest.approx(u.square().sum().item(), rel=1e-6)
        assert state["update_dot_grad"].item() == pytest.approx((u * p.grad).sum().item(), rel=1e-6)
        update_sq += u.square().sum().item()
        update_dot_grad += (u * p.grad).sum().item()
    assert update_dot_grad < 0  # Adam's step goes against the gradient
    gamma = update_sq / -update_dot_grad
    for p in params:
        assert optimizer.state[p]["lr_avg"].item() == pytest.approx(0.01 * gamma, rel=1e-6)
        assert optimizer.state[p]["switched"].item() == 0  # no switch at step 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_phase_and_a_late_param(backend):
    """After the switch: ``v = beta1 * v + g`` from 0 (at the first SGD step
    ``v = g``) and ``p -= sgd_lr * (1 - beta1) * v``; a param that first
    steps after the switch starts in the SGD phase (``switched`` = 1)."""
    params = make_params(SHAPE, torch.float64, seed=5)
    late = torch.nn.Parameter(torch.randn(37, dtype=torch.float64))
    optimizer = fastopt.SWATS([{"params": params + [late]}], lr=5e-2, betas=(0.8, 0.99), eps=1.0,
                              backend=backend)
    feed = GradientFeed(seed=6)
    for step in range(1, 5):
        feed.set_grads(params)
        before = {p: (p.detach().clone(), optimizer.state[p]["exp_avg"].clone()) for p in params
                  if step > 2}
        optimizer.step()
        for p, (value, exp_avg) in before.items():
            sgd_lr = optimizer.state[p]["sgd_lr"].item()
            momentum = p.grad if step == 3 else 0.8 * exp_avg + p.grad
            torch.testing.assert_close(optimizer.state[p]["exp_avg"], momentum, rtol=1e-14, atol=0)
            torch.testing.assert_close(p.detach(), value - sgd_lr * 0.2 * momentum, rtol=1e-14, atol=1e-15)
            assert optimizer.state[p]["update_sq"].item() == 0
    assert optimizer.state[params[0]]["switched"].item() == 3
    late.grad = torch.randn_like(late)
    value = late.detach().clone()
    optimizer.step()
    state = optimizer.state[late]
    assert state["switched"].item() == 1 and state["step"].item() == 1
    assert state["sgd_lr"].item() == optimizer.state[params[0]]["sgd_lr"].item()
    torch.testing.assert_close(state["exp_avg"], late.grad, rtol=0, atol=0)
    torch.testing.assert_close(late.detach(), value - state["sgd_lr"].item() * 0.2 * late.grad, rtol=1e-14,
                               atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_changes_nothing(backend):
    """A step that AMP skips (found_inf) leaves params and every state as they
    were, the group's running average included."""
    params = make_params(SHAPE, torch.float32, seed=7)
    optimizer = fastopt.SWATS(params, lr=5e-2, backend=backend)
    feed = GradientFeed(seed=8)
    feed.set_grads(params)
    optimizer.step()
    feed.set_grads(params)
    saved = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    optimizer.step()
    for p, value in zip(params, saved):
        assert torch.equal(p.detach(), value)
        for key, expected in state[p].items():
            assert torch.equal(optimizer.state[p][key], expected), key


def test_training_switches_and_keeps_descending():
    """A least-squares fit with the paper's switch tolerance loosened to 1e-4:
    the group switches once the projection settles, and SGD at the learned
    step keeps lowering the loss."""
    generator = torch.Generator().manual_seed(9)
    features = torch.randn(256, 16, generator=generator)
    targets = features @ torch.randn(16, 1, generator=generator) + 0.1 * torch.randn(256, 1, generator=generator)
    model = torch.nn.Linear(16, 1)
    optimizer = fastopt.SWATS(model.parameters(), lr=1e-2, eps=1e-4)
    losses, switch_step = [], None
    for step in range(1, 401):
        loss = torch.nn.functional.mse_loss(model(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if switch_step is None and optimizer.state[model.weight]["switched"].item() != 0:
            switch_step = step
    assert switch_step is not None and switch_step < 300
    assert optimizer.state[model.weight]["sgd_lr"].item() > 0
    assert losses[-1] < 0.5 * losses[switch_step - 1]


def test_inductor_step_switches_as_eager():
    """A step compiled by Inductor reads the sums the op stored in place, after
    the op (Note [SWATS's switch]): its switch, learned step and params are
    eager's (the group switches at step 2; steps 3 and 4 are SGD steps)."""
    runs = []
    for compiled in (False, True):
        params = make_params(SHAPE, torch.float32, seed=10)
        optimizer = fastopt.SWATS(params, lr=0.5, eps=1.0)
        step = torch.compile(optimizer.step) if compiled else optimizer.step
        feed = GradientFeed(seed=11)
        for _ in range(4):
            feed.set_grads(params)
            step()
        runs.append((params, optimizer))
    (eager_params, eager), (compiled_params, compiled) = runs
    for p, q in zip(compiled_params, eager_params):
        assert compiled.state[p]["switched"].item() == eager.state[q]["switched"].item() == 3
        torch.testing.assert_close(compiled.state[p]["sgd_lr"], eager.state[q]["sgd_lr"], rtol=1e-6, atol=0)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
