"""fastopt.Lookahead (Zhang et al., NeurIPS 2019) around fastopt and
torch.optim optimizers: element-wise against the plain-torch oracle of
tests/oracles.py and pytorch-optimizer's Lookahead, fused against the
reference bit for bit, through checkpoints, LR schedulers and GradScaler,
with master weights, and with bad input that changes nothing."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastopt
import oracles
from fastopt import reference

BACKENDS = ("fused", "reference")
STEPS = 13  # two synchronizations at k=5 and three steps after the last


def make_params(dtype=torch.float32, seed=0):
    """Odd sizes, an empty tensor, a non-contiguous (transposed) param and a 0-dim one."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 5), (0,), (129,), (3, 4, 5), ()]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    params.append(nn.Parameter(torch.randn(6, 11, generator=gen).to(dtype).t()))
    assert not params[-1].is_contiguous()
    return params


def clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def set_grads(step, *param_lists):
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()


def run(optimizers, params_lists, steps=STEPS, first=0):
    for step in range(first, first + steps):
        set_grads(step, *params_lists)
        for optimizer in optimizers:
            optimizer.step()


INNER = {
    "fastopt.Adam": lambda ps, backend: fastopt.Adam(ps, lr=5e-2, weight_decay=0.0731, backend=backend),
    "fastopt.SGD": lambda ps, backend: fastopt.SGD(ps, lr=5e-2, momentum=0.9, backend=backend),
    "torch.optim.RMSprop": lambda ps, backend: torch.optim.RMSprop(ps, lr=1e-2, foreach=False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("k, alpha", [(5, 0.5), (3, 0.8), (1, 0.3)])
def test_matches_the_oracle(inner, k, alpha, backend):
    params = make_params()
    oracle_params = clone(params)
    optimizer = fastopt.Lookahead(INNER[inner](params, backend), k=k, alpha=alpha, backend=backend)
    oracle = oracles.Lookahead(INNER[inner](oracle_params, "reference"), k=k, alpha=alpha)
    initial = clone(params)
    run([optimizer, oracle], [params, oracle_params])
    for p, q, p0 in zip(params, oracle_params, initial):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(optimizer.state[p]["slow_param"], oracle.slow[q], rtol=1e-5, atol=1e-6)
        if p.numel():
            assert not torch.equal(p, p0)
    # The last synchronization set fast = slow; the steps since moved the fast weights only.
    last_sync = STEPS - STEPS % k
    assert optimizer._fast_steps == STEPS and last_sync > 0


@pytest.mark.parametrize("dtype, with_masters", [(torch.float32, False), (torch.float64, False),
                                                  (torch.bfloat16, False), (torch.bfloat16, True)])
def test_synchronization_op_fused_equals_reference_bit_for_bit(dtype, with_masters):
    """fastopt::lookahead_ (one element: slow += alpha * (fast - slow); fast =
    slow) against the reference, on odd sizes and an empty tensor."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(37, 5), (0,), (129,), (1,)]
    runs = []
    for kernels in (torch.ops.fastopt, reference):
        fast = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        slow_dtype = torch.float32 if with_masters else dtype
        slow = [torch.randn(s, generator=gen).to(slow_dtype) for s in shapes]
        masters = [torch.randn(s, generator=gen) for s in shapes] if with_masters else []
        kernels.lookahead_(fast, fast, slow, lr=0.0, alpha=0.37, maximize=False, master_params=masters)
        runs.append(fast + slow + masters)
        gen.manual_seed(3)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # And it did move: slow is now the interpolation, fast (or the master) equals it.
    fast, slow = runs[0][:len(shapes)], runs[0][len(shapes):2 * len(shapes)]
    masters = runs[0][2 * len(shapes):]
    for i, (f, s_) in enumerate(zip(fast, slow)):
        assert torch.equal(masters[i] if with_masters else f, s_)
        if with_masters:
            assert torch.equal(f, s_.to(dtype))


def test_matches_pytorch_optimizer():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    params = make_params()
    package_params = clone(params)
    optimizer = fastopt.Lookahead(fastopt.Adam(params, lr=5e-2), k=5, alpha=0.5)
    package = pytorch_optimizer.Lookahead(torch.optim.Adam(package_params, lr=5e-2, foreach=False), k=5,
                                          alpha=0.5)
    run([optimizer, package], [params, package_params])
    for p, q in zip(params, package_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(optimizer.state[p]["slow_param"], package.state[q]["slow_params"],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_params_with_master_weights_synchronize_the_masters(backend):
    """The fast weights are the inner optimizer's float32 master copies: the
    slow weights are float32, slow = slow0 + alpha * (master - slow0), then
    the master is the slow weight and the param its bfloat16 rounding."""
    params, unsynced_params = make_params(torch.bfloat16), make_params(torch.bfloat16)
    make = lambda ps, k: fastopt.Lookahead(  # noqa: E731
        fastopt.AdamW(ps, lr=5e-2, master_weights=True, backend=backend), k=k, alpha=0.5, backend=backend)
    optimizer, unsynced = make(params, 5), make(unsynced_params, 1000)
    run([optimizer, unsynced], [params, unsynced_params], steps=4)
    slow_before = [optimizer.state[p]["slow_param"].clone() for p in params]
    run([optimizer, unsynced], [params, unsynced_params], steps=1, first=4)  # the fifth step synchronizes
    for p, q, slow0 in zip(params, unsynced_params, slow_before):
        slow, master = optimizer.state[p]["slow_param"], optimizer.optimizer.state[p]["master_param"]
        fast = unsynced.optimizer.state[q]["master_param"]  # the same five inner steps, no synchronization
        assert slow.dtype == torch.float32
        assert torch.equal(slow, slow0 + 0.5 * (fast - slow0))
        assert torch.equal(master, slow)
        assert torch.equal(p.detach(), slow.to(torch.bfloat16))


def test_state_dict_resumes_bit_exactly_and_loads_into_the_bare_optimizer():
    params = make_params()
    optimizer = fastopt.Lookahead(fastopt.Adam(params, lr=5e-2), k=5, alpha=0.5)
    run([optimizer], [params], steps=7)
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["lookahead"]["fast_steps"] == 7
    assert len(saved["lookahead"]["slow_params"]) == len(params)

    resumed_params = clone(params)
    resumed = fastopt.Lookahead(fastopt.Adam(resumed_params, lr=1.0), k=2, alpha=0.1)
    resumed.load_state_dict(saved)
    assert (resumed.k, resumed.alpha, resumed.param_groups[0]["lr"]) == (5, 0.5, 5e-2)
    run([optimizer, resumed], [params, resumed_params], steps=6, first=7)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(optimizer.state[p]["slow_param"], resumed.state[q]["slow_param"])

    bare = fastopt.Adam(clone(params), lr=5e-2)
    bare.load_state_dict(saved)
    assert len(bare.state) == len(params)


def test_bad_load_changes_nothing():
    params = make_params()
    optimizer = fastopt.Lookahead(fastopt.Adam(params, lr=5e-2), k=5, alpha=0.5)
    run([optimizer], [params], steps=3)
    before = copy.deepcopy(optimizer.state_dict())
    bare_state = fastopt.Adam(clone(params), lr=5e-2).state_dict()
    wrong_shape = copy.deepcopy(before)
    wrong_shape["lookahead"]["slow_params"][0] = torch.zeros(3)
    wrong_alpha = copy.deepcopy(before)
    wrong_alpha["lookahead"]["alpha"] = 2.0
    for bad, pattern in ((bare_state, "no 'lookahead' entry"), (wrong_shape, r"slow_params\[0\] has shape"),
                         (wrong_alpha, "Invalid alpha")):
        with pytest.raises(ValueError, match=pattern):
            optimizer.load_state_dict(bad)
        after = optimizer.state_dict()
        assert after["lookahead"]["fast_steps"] == before["lookahead"]["fast_steps"]
        for index, slow in before["lookahead"]["slow_params"].items():
            assert torch.equal(after["lookahead"]["slow_params"][index], slow)
        for index, state in before["state"].items():
            for key, value in state.items():
                assert torch.equal(after["state"][index][key], value)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(k=0), "Invalid k"), (dict(k=2.5), "Invalid k"), (dict(alpha=1.5), "Invalid alpha"),
    (dict(alpha=-0.1), "Invalid alpha"), (dict(backend="gpu"), "backend must be one of"),
])
def test_bad_arguments_are_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        fastopt.Lookahead(fastopt.SGD(make_params(), lr=0.1), **kwargs)
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        fastopt.Lookahead(make_params())


def test_schedulers_and_grad_scaler_work_through_it():
    params = make_params()
    inner = fastopt.SGD(params, lr=0.1, momentum=0.9)
    optimizer = fastopt.Lookahead(inner, k=2, alpha=0.5)
    assert isinstance(optimizer, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # as scaler.scale(loss) would, before the first step
    set_grads(0, params)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == 0.05 and optimizer._fast_steps == 1
    # A step with an inf grad is skipped by the scaler: nothing moves, k does not advance.
    set_grads(1, params)
    params[0].grad[0, 0] = float("inf")
    before = clone(params)
    scaler.step(optimizer)
    scaler.update()
    assert optimizer._fast_steps == 1
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(params, before))
