"""fastopt as a drop-in for torch.optim: constructor validation, param_groups,
state_dict interchange, LR schedulers, closures, hooks, zero_grad, param
groups added or edited mid-training, params without grads, mixed dtypes, the
step-plan cache (Note [Step plans]) and pickling.

Oracle: torch.optim with ``foreach=False`` (the for-loop implementation) fed
the same gradients.  Gradients are ``0.5 * param + noise`` with noise drawn
from a generator seeded by the step number, so the trajectory depends on the
optimizer's own earlier updates and a wrong step shows up in every later one.
"""
from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

import fastopt
import oracles
from registry import MEASURED_STATE_KEYS

BACKENDS = ("fused", "reference")
# State every param keeps for its whole group, which changes with the group's steps.
GROUP_STATE_KEYS = {"SWATS": fastopt.swats.GROUP_STATES}

# One registry: each optimizer with a couple of option sets.
CONFIGS = {
    "Adam": [
        dict(lr=1e-2),
        dict(lr=1e-2, amsgrad=True, weight_decay=0.1),
        dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05, decoupled_weight_decay=True,
             maximize=True),
    ],
    "AdamW": [
        dict(lr=1e-2),
        dict(lr=1e-2, amsgrad=True, weight_decay=0.1, eps=1e-6),
    ],
    "SGD": [
        dict(lr=0.05),
        dict(lr=0.05, momentum=0.9, nesterov=True),
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True),
    ],
    "RMSprop": [
        dict(lr=1e-2),
        dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.01, alpha=0.9),
    ],
    "Adagrad": [
        dict(lr=0.1),
        dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),
    ],
    "NAdam": [
        dict(lr=1e-2),
        dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, momentum_decay=0.01, decoupled_weight_decay=True,
             maximize=True),
    ],
    "RAdam": [
        dict(lr=1e-2),
        dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.05, decoupled_weight_decay=True, maximize=True),
    ],
    "Adamax": [
        dict(lr=1e-2),
        dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, maximize=True),
    ],
    "Adadelta": [
        dict(lr=1.0),
        dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.05, maximize=True),
    ],
    "ASGD": [
        dict(lr=1e-2),
        dict(lr=1e-2, lambd=0.01, alpha=0.6, t0=2, weight_decay=0.01, maximize=True),
    ],
    "Rprop": [
        dict(lr=1e-2),
        dict(lr=1e-2, etas=(0.4, 1.3), step_sizes=(1e-3, 1.0), maximize=True),
    ],
    # Oracles: tests/oracles.py.
    "Lion": [
        dict(lr=1e-3),
        dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.05, maximize=True),
    ],
    # Decoupled weight decay in both: a param's first ADOPT step only
    # initializes exp_avg_sq, and these tests expect every step to move it.
    "ADOPT": [
        dict(lr=1e-2, weight_decay=0.01, decouple=True),
        dict(lr=1e-2, clip_lambda=None, eps=1e-4, weight_decay=0.05, decouple=True, maximize=True),
    ],
    "AdaBound": [
        dict(lr=1e-2),
        dict(lr=1e-2, betas=(0.8, 0.95), final_lr=0.05, gamma=0.3, eps=1e-6, weight_decay=0.05,
             amsbound=True, maximize=True),
    ],
    "QHAdam": [
        dict(lr=1e-2, nus=(0.7, 1.0)),
        dict(lr=1e-2, betas=(0.8, 0.95), nus=(0.8, 0.6), weight_decay=0.05, decouple_weight_decay=True,
             eps=1e-6, maximize=True),
    ],
    "AggMo": [
        dict(lr=1e-2),
        dict(lr=1e-2, betas=(0.5, 0.95), weight_decay=0.05, maximize=True),
    ],
    # Not clipped (Apex's default max_grad_norm=1.0): in a group mixing float32 and
    # float64 params the global norm carries the float32 params' ulps into the float64
    # comparisons; tests/test_clip.py covers the clipping.
    "LAMB": [
        dict(lr=1e-2, max_grad_norm=None),
        dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05, adam_w_mode=False, bias_correction=False,
             max_grad_norm=None, maximize=True),
    ],
    "LARS": [
        dict(lr=0.5, trust_coefficient=0.02),
        dict(lr=0.5, momentum=0.8, trust_coefficient=0.02, weight_decay=0.05, nesterov=True, exclude_1d=True,
             maximize=True),
    ],
    "Adafactor": [
        dict(lr=1e-2),
        dict(lr=1e-2, beta2_decay=-0.5, eps=(1e-30, 1e-3), d=1.5, weight_decay=0.05, maximize=True),
    ],
    # eps=1.0: the groups switch to SGD at step 2.
    "SWATS": [
        dict(lr=1e-2),
        dict(lr=1e-2, betas=(0.8, 0.95), eps=1.0, weight_decay=0.05, maximize=True),
    ],
}
CASES = [
    pytest.param((name, kw), id=f"{name}-{i}")
    for name, kws in CONFIGS.items()
    for i, kw in enumerate(kws)
]
COUNTS_STEPS = {name: "step" in getattr(fastopt, name)._scalar_states for name in CONFIGS}

# Measured worst case over 20 steps of every config above: 2.4e-7 absolute
# (params of magnitude ~1) for float32, 7e-16 for float64.  The tolerances
# leave a margin of ~4x / ~1000x over that and are far below any real error.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}

SHAPES = ((4, 5), (7,), (3, 2, 2), (33,))


# -- helpers -----------------------------------------------------------------
def fresh_kw(kw):
    """Constructor kwargs with tensors cloned (schedulers fill_ a tensor lr in place)."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def make_params(seed=0, shapes=SHAPES, dtypes=None):
    """Two independent but equal lists of random parameters (torch's, fastopt's)."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(shapes)
    base = [torch.randn(s, generator=gen, dtype=torch.float64).to(dt)
            for s, dt in zip(shapes, dtypes)]
    return ([nn.Parameter(b.clone()) for b in base], [nn.Parameter(b.clone()) for b in base])


def clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, step, skip=()):
    """grad = 0.5 * param + noise(step); params whose index is in ``skip`` get None."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad = None if i in skip else 0.5 * p.detach() + noise.to(p.dtype)


def run(opt, params, steps, skip=()):
    for k in steps:
        set_grads(params, k, skip)
        opt.step()


def torch_cls(name):
    """torch.optim's class of that name, or the test oracle of one torch.optim lacks (tests/oracles.py)."""
    return getattr(torch.optim, name, None) or getattr(oracles, name)


def make_torch(name, params, kw):
    return torch_cls(name)(params, foreach=False, **fresh_kw(kw))


def make_fast(name, params, kw, backend):
    # foreach=False too, so that param_groups / state_dicts compare equal to torch's.
    return getattr(fastopt, name)(params, foreach=False, backend=backend, **fresh_kw(kw))


def assert_params_close(fast_params, torch_params, what="param"):
    assert len(fast_params) == len(torch_params)
    for i, (f, t) in enumerate(zip(fast_params, torch_params)):
        assert f.dtype == t.dtype and f.shape == t.shape
        torch.testing.assert_close(f.detach(), t.detach(), **TOL[t.dtype],
                                   msg=lambda m, i=i: f"{what} {i}: {m}")


def assert_state_close(fast_opt, fast_params, torch_opt, torch_params):
    """Same params have state, same keys, shapes, dtypes, devices and values."""
    for i, (f, t) in enumerate(zip(fast_params, torch_params)):
        f_state, t_state = fast_opt.state.get(f, {}), torch_opt.state.get(t, {})
        assert set(f_state) == set(t_state), f"state keys of param {i}"
        for key, t_value in t_state.items():
            f_value = f_state[key]
            assert isinstance(f_value, torch.Tensor) == isinstance(t_value, torch.Tensor), key
            if not isinstance(t_value, torch.Tensor):
                assert f_value == t_value, key
                continue
            assert (f_value.shape, f_value.dtype, f_value.device) == (
                t_value.shape, t_value.dtype, t_value.device), f"param {i} state {key!r}"
            # Scalar states (step counts, NAdam's mu_product) are computed as torch.optim
            # does; measured ones (SWATS's sums) are float32 sums of the step's values.
            if key in MEASURED_STATE_KEYS:
                tol = TOL[torch.float32]
            else:
                tol = dict(rtol=0, atol=0) if key in type(fast_opt)._scalar_states else TOL[t.dtype]
            torch.testing.assert_close(f_value, t_value, **tol,
                                       msg=lambda m, i=i, key=key: f"param {i} state {key!r}: {m}")


def groups_without_params(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def assert_groups_equal(fast_opt, torch_opt):
    f_groups, t_groups = groups_without_params(fast_opt), groups_without_params(torch_opt)
    assert len(f_groups) == len(t_groups)
    for f, t in zip(f_groups, t_groups):
        assert set(f) == set(t)
        for key in t:
            _assert_same_value(f[key], t[key], key)


def _assert_same_value(fv, tv, key):
    """Equal type and value, recursing into tuples/lists (0.9 == tensor(0.9) is not enough)."""
    assert type(fv) is type(tv), (key, fv, tv)
    if isinstance(tv, torch.Tensor):
        torch.testing.assert_close(fv, tv, rtol=0, atol=0)
    elif isinstance(tv, (tuple, list)):
        assert len(fv) == len(tv), (key, fv, tv)
        for a, b in zip(fv, tv):
            _assert_same_value(a, b, key)
    else:
        assert fv == tv, (key, fv, tv)


@pytest.fixture(params=CASES)
def case(request):
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# -- constructor validation ----------------------------------------------------
def _p():
    return [nn.Parameter(torch.randn(3))]


INVALID = {
    "Adam": [
        dict(lr=-1e-3), dict(lr=torch.tensor(-1.0)), dict(eps=-1e-8),
        dict(betas=(1.0, 0.999)), dict(betas=(-0.1, 0.999)), dict(betas=(0.9, 1.0)),
        dict(betas=(0.9, -0.5)), dict(weight_decay=-0.1),
        dict(lr=torch.tensor([0.1, 0.2])), dict(lr=torch.tensor(0.01), foreach=True),
        dict(betas=(torch.tensor(0.9), 0.999)),
        dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.999))),
        dict(betas=(torch.tensor(0.9), torch.tensor([0.99, 0.9]))),
        dict(fused=True, foreach=True),
    ],
    "AdamW": [
        dict(lr=-1e-3), dict(eps=-1.0), dict(betas=(1.0, 0.999)), dict(betas=(0.9, 1.5)),
        dict(weight_decay=-1e-2), dict(lr=torch.tensor([0.1, 0.2])),
        dict(lr=torch.tensor(0.01), foreach=True), dict(fused=True, foreach=True),
    ],
    "SGD": [
        dict(lr=-0.1), dict(lr=torch.tensor(-0.1)), dict(momentum=-0.5),
        dict(weight_decay=-1.0), dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1),
        dict(lr=torch.tensor([0.1, 0.2])), dict(fused=True, foreach=True),
    ],
    "RMSprop": [
        dict(lr=-0.1), dict(eps=-1.0), dict(momentum=-0.1), dict(weight_decay=-0.1),
        dict(alpha=-0.5), dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "Adagrad": [
        dict(lr=-0.1), dict(lr_decay=-0.1), dict(weight_decay=-0.1),
        dict(initial_accumulator_value=-0.1), dict(eps=-1e-10),
        dict(lr=torch.tensor([0.1, 0.2])), dict(fused=True, foreach=True),
    ],
    "NAdam": [
        dict(lr=-1e-3), dict(lr=torch.tensor(-1.0)), dict(eps=-1e-8), dict(betas=(1.0, 0.999)),
        dict(betas=(0.9, -0.5)), dict(weight_decay=-0.1), dict(momentum_decay=-0.1),
        dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "RAdam": [
        dict(lr=-1e-3), dict(eps=-1e-8), dict(betas=(-0.1, 0.999)), dict(betas=(0.9, 1.0)),
        dict(weight_decay=-0.1), dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "Adamax": [
        dict(lr=-1e-3), dict(eps=-1e-8), dict(betas=(1.0, 0.999)), dict(betas=(0.9, 1.5)),
        dict(weight_decay=-0.1), dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "Adadelta": [
        dict(lr=-0.1), dict(rho=-0.1), dict(rho=1.5), dict(eps=-1e-6), dict(weight_decay=-0.1),
        dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "ASGD": [dict(lr=-0.1), dict(weight_decay=-0.1), dict(lr=torch.tensor([0.1, 0.2]))],
    "Rprop": [
        dict(lr=-0.1), dict(etas=(1.0, 1.2)), dict(etas=(0.5, 1.0)), dict(etas=(0.0, 1.2)),
        dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "Lion": [
        dict(lr=-1e-3), dict(betas=(1.0, 0.99)), dict(betas=(0.9, 1.0)), dict(weight_decay=-0.1),
        dict(lr=torch.tensor([0.1, 0.2])), dict(lr=torch.tensor(0.01), foreach=True),
    ],
    "ADOPT": [
        dict(lr=-1e-3), dict(eps=-1e-6), dict(betas=(1.0, 0.9999)), dict(betas=(0.9, -0.1)),
        dict(weight_decay=-0.1), dict(lr=torch.tensor([0.1, 0.2])), dict(lr=torch.tensor(0.01), foreach=True),
    ],
    "AdaBound": [
        dict(lr=-1e-3), dict(lr=0.0), dict(eps=-1e-8), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)),
        dict(weight_decay=-0.1), dict(final_lr=-0.1), dict(gamma=1.0), dict(gamma=-1e-3),
        dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "QHAdam": [
        dict(lr=-1e-3), dict(eps=-1e-8), dict(betas=(1.0, 0.999)), dict(betas=(0.9, 1.5)),
        dict(weight_decay=-0.1), dict(nus=(1.5, 1.0)), dict(nus=(1.0, -0.1)), dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "AggMo": [
        dict(lr=-1e-3), dict(betas=()), dict(betas=(0.0, 0.5, 0.9, 0.99)), dict(betas=(0.0, 1.0)),
        dict(betas=(-0.1,)), dict(weight_decay=-0.1), dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "LAMB": [
        dict(lr=-1e-3), dict(eps=-1e-6), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)),
        dict(weight_decay=-0.1), dict(amsgrad=True), dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "LARS": [
        dict(lr=-0.1), dict(momentum=-0.1), dict(weight_decay=-0.1), dict(trust_coefficient=-1.0),
        dict(eps=-1e-8), dict(nesterov=True, momentum=0.0), dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "Adafactor": [
        dict(lr=-1e-3), dict(beta2_decay=0.5), dict(eps=(-1e-30, 1e-3)), dict(eps=(None, -1.0)), dict(d=0.5),
        dict(weight_decay=-0.1), dict(lr=torch.tensor([0.1, 0.2])),
    ],
    "SWATS": [
        dict(lr=-1e-3), dict(eps=-1e-9), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)),
        dict(weight_decay=-0.1), dict(lr=torch.tensor([0.1, 0.2])),
    ],
}
_TENSOR_BETAS_FOREACH = "Adam tensor betas with foreach=True"
INVALID_CASES = [
    pytest.param(name, kw, id=f"{name}-{'-'.join(sorted(kw))}-{i}")
    for name, kws in INVALID.items()
    for i, kw in enumerate(kws)
] + [pytest.param(name, {}, id=f"{name}-empty-params") for name in CONFIGS] + [
    pytest.param(
        name, dict(betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=True),
        id=f"{name}-tensor-betas-foreach",
    )
    for name in ("Adam", "AdamW")
]


@pytest.mark.parametrize("name, kw", INVALID_CASES)
def test_constructor_validation_matches_torch(name, kw, backend):
    params = [] if not kw else _p()
    with pytest.raises(Exception) as torch_error:
        torch_cls(name)(params, **fresh_kw(kw))
    with pytest.raises(torch_error.type) as fast_error:
        getattr(fastopt, name)(params, backend=backend, **fresh_kw(kw))
    assert type(fast_error.value) is type(torch_error.value)
    assert str(fast_error.value) == str(torch_error.value)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_invalid_backend_is_rejected(name):
    with pytest.raises(ValueError, match="backend must be one of"):
        getattr(fastopt, name)(_p(), backend="cuda-please")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_signature_defaults_match_torch(name):
    torch_sig = inspect.signature(torch_cls(name).__init__).parameters
    fast_sig = inspect.signature(getattr(fastopt, name).__init__).parameters
    for arg, parameter in torch_sig.items():
        assert arg in fast_sig, arg
        assert fast_sig[arg].kind == parameter.kind, arg
        assert fast_sig[arg].default == parameter.default, arg
    # fastopt's own extras: keyword-only, off by default (min_8bit_size acts only with
    # state_dtype=torch.uint8; README "Training large models").
    # (LAMB has max_grad_norm of its own, as Apex's FusedLAMB.)
    extras = {"backend": None, "max_grad_norm": None, "master_weights": False, "state_dtype": None,
              "stochastic_rounding": False, "min_8bit_size": 4096}
    extras = {extra: default for extra, default in extras.items() if extra not in torch_sig}
    assert set(fast_sig) - set(torch_sig) == set(extras)
    for extra, default in extras.items():
        assert fast_sig[extra].kind is inspect.Parameter.KEYWORD_ONLY, extra
        assert fast_sig[extra].default == default, extra


# -- param_groups ---------------------------------------------------------------
def test_param_groups_and_defaults_match_torch(case, backend):
    name, kw = case
    pt, pf = make_params()
    groups_t = [{"params": pt[:2]}, {"params": pt[2:], "lr": 0.003, "weight_decay": 0.2}]
    groups_f = [{"params": pf[:2]}, {"params": pf[2:], "lr": 0.003, "weight_decay": 0.2}]
    ot = torch_cls(name)(groups_t, **fresh_kw(kw))
    of = getattr(fastopt, name)(groups_f, backend=backend, **fresh_kw(kw))
    assert_groups_equal(of, ot)
    assert of.defaults == ot.defaults
    assert of.backend == backend


@pytest.mark.parametrize("name", list(CONFIGS))
def test_default_construction_matches_torch(name, backend):
    pt, pf = make_params()
    ot = torch_cls(name)(pt)
    of = getattr(fastopt, name)(pf, backend=backend)
    assert_groups_equal(of, ot)
    assert of.defaults == ot.defaults
    assert isinstance(of, torch.optim.Optimizer)


def test_param_groups_tensor_betas_match_torch(backend):
    pt, pf = make_params()
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    ot = torch.optim.Adam(pt, betas=tuple(b.clone() for b in betas))
    of = fastopt.Adam(pf, betas=tuple(b.clone() for b in betas), backend=backend)
    assert_groups_equal(of, ot)


# -- state_dict interchange ------------------------------------------------------
def test_state_layout_matches_torch(case, backend):
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    for k in range(6):
        set_grads(pt, k)
        set_grads(pf, k)
        ot.step()
        of.step()
        assert_state_close(of, pf, ot, pt)
    assert_params_close(pf, pt)
    for state in of.state.values():
        for key in type(of)._scalar_states:
            assert state[key].dtype == torch.float32 and state[key].dim() == 0
            assert state[key].device.type == "cpu"
    sd_t, sd_f = ot.state_dict(), of.state_dict()
    assert sd_f["param_groups"] == sd_t["param_groups"]
    assert set(sd_f["state"]) == set(sd_t["state"])


def test_state_dict_torch_to_fastopt(case, backend):
    name, kw = case
    pt, _ = make_params()
    ot = make_torch(name, pt, kw)
    run(ot, pt, range(5))
    pf = clone_params(pt)
    of = make_fast(name, pf, kw, backend)
    of.load_state_dict(copy.deepcopy(ot.state_dict()))
    assert_state_close(of, pf, ot, pt)
    run(ot, pt, range(5, 15))
    run(of, pf, range(5, 15))
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)


def test_state_dict_fastopt_to_torch(case, backend):
    name, kw = case
    _, pf = make_params()
    of = make_fast(name, pf, kw, backend)
    run(of, pf, range(5))
    pt = clone_params(pf)
    ot = make_torch(name, pt, kw)
    ot.load_state_dict(copy.deepcopy(of.state_dict()))
    assert_state_close(of, pf, ot, pt)
    run(ot, pt, range(5, 15))
    run(of, pf, range(5, 15))
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)


def test_state_dict_fastopt_to_fastopt(case, backend):
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    run(ot, pt, range(5))
    run(of, pf, range(5))
    pf2 = clone_params(pf)
    other = "reference" if backend == "fused" else "fused"
    of2 = make_fast(name, pf2, kw, other)
    of2.load_state_dict(copy.deepcopy(of.state_dict()))
    run(ot, pt, range(5, 15))
    run(of2, pf2, range(5, 15))
    assert_params_close(pf2, pt)
    assert_state_close(of2, pf2, ot, pt)


def test_load_state_dict_keeps_backend(backend):
    pt, pf = make_params()
    of = fastopt.Adam(pf, lr=1e-2, backend=backend)
    run(of, pf, range(2))
    of.load_state_dict(copy.deepcopy(of.state_dict()))
    assert of.backend == backend


# -- LR schedulers -------------------------------------------------------------
SCHEDULERS = {
    "LambdaLR-warmup-Adam": (
        "Adam", dict(lr=0.01),
        lambda o: lr_scheduler.LambdaLR(o, lambda e: min(1.0, (e + 1) / 6))),
    "LinearLR-AdamW": (
        "AdamW", dict(lr=0.01, weight_decay=0.1),
        lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=10)),
    "SequentialLR-warmup-cosine-AdamW": (
        "AdamW", dict(lr=0.01, weight_decay=0.1),
        lambda o: lr_scheduler.SequentialLR(
            o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
                lr_scheduler.CosineAnnealingLR(o, T_max=15)], milestones=[5])),
    "SequentialLR-warmup-StepLR-SGD": (
        "SGD", dict(lr=0.05, momentum=0.9),
        lambda o: lr_scheduler.SequentialLR(
            o, [lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=4),
                lr_scheduler.StepLR(o, step_size=5, gamma=0.5)], milestones=[4])),
    "CyclicLR-SGD-cycle-momentum": (
        "SGD", dict(lr=0.01, momentum=0.9),
        lambda o: lr_scheduler.CyclicLR(o, base_lr=0.005, max_lr=0.05, step_size_up=4,
                                        cycle_momentum=True, base_momentum=0.8,
                                        max_momentum=0.95)),
    "CyclicLR-Adam": (
        "Adam", dict(lr=0.01, amsgrad=True),
        lambda o: lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.02, step_size_up=5,
                                        cycle_momentum=False)),
    "CosineAnnealingWarmRestarts-RMSprop": (
        "RMSprop", dict(lr=0.01, centered=True, momentum=0.5),
        lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2, eta_min=1e-4)),
    "OneCycleLR-Adam-cycles-beta1": (
        "Adam", dict(lr=0.01),
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=20)),
    "OneCycleLR-SGD-nesterov": (
        "SGD", dict(lr=0.01, momentum=0.9, nesterov=True),
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20)),
    "StepLR-Adagrad": (
        "Adagrad", dict(lr=0.1, lr_decay=0.01),
        lambda o: lr_scheduler.StepLR(o, step_size=5, gamma=0.5)),
    "StepLR-tensor-lr-Adam": (
        "Adam", dict(lr=torch.tensor(0.01)),
        lambda o: lr_scheduler.StepLR(o, step_size=4, gamma=0.5)),
    "LambdaLR-tensor-lr-SGD": (
        "SGD", dict(lr=torch.tensor(0.05), momentum=0.9),
        lambda o: lr_scheduler.LambdaLR(o, lambda e: min(1.0, (e + 1) / 5))),
    "CosineAnnealingWarmRestarts-tensor-lr-RMSprop": (
        "RMSprop", dict(lr=torch.tensor(0.01)),
        lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5)),
    "LinearLR-tensor-lr-Adagrad": (
        "Adagrad", dict(lr=torch.tensor(0.1)),
        lambda o: lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=8)),
    "StepLR-tensor-lr-NAdam": (
        "NAdam", dict(lr=torch.tensor(0.01), momentum_decay=0.01),
        lambda o: lr_scheduler.StepLR(o, step_size=4, gamma=0.5)),
    "CosineAnnealingLR-RAdam": (
        "RAdam", dict(lr=0.01, weight_decay=0.05),
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10)),
    "OneCycleLR-Adamax-cycles-beta1": (
        "Adamax", dict(lr=0.01),
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=20)),
    "ExponentialLR-tensor-lr-Adadelta": (
        "Adadelta", dict(lr=torch.tensor(1.0)),
        lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8)),
}


def _hyper(opt):
    g = opt.param_groups[0]
    return (float(g["lr"]), g.get("momentum"), g.get("betas"))


@pytest.mark.parametrize("sched_case", list(SCHEDULERS))
def test_lr_scheduler_trajectory_matches_torch(sched_case, backend):
    name, kw, make_sched = SCHEDULERS[sched_case]
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    st, sf = make_sched(ot), make_sched(of)
    lrs = set()
    for k in range(20):
        assert _hyper(of) == _hyper(ot), f"step {k}"
        lrs.add(float(of.param_groups[0]["lr"]))
        set_grads(pt, k)
        set_grads(pf, k)
        ot.step()
        of.step()
        st.step()
        sf.step()
        assert_params_close(pf, pt, what=f"step {k} param")
    assert len(lrs) > 2, "the scheduler did not change lr: the test would be vacuous"
    assert isinstance(of.param_groups[0]["lr"], torch.Tensor) == isinstance(kw["lr"], torch.Tensor)
    assert_state_close(of, pf, ot, pt)


# -- closures and hooks ---------------------------------------------------------
def _closure(params, opt, calls):
    targets = [torch.linspace(-1, 1, p.numel(), dtype=p.dtype).view_as(p) for p in params]

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = sum(((p - t) ** 2).sum() + 0.01 * (p ** 4).sum() for p, t in zip(params, targets))
        loss.backward()
        return loss
    return closure


def test_closure(case, backend):
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    calls_t, calls_f = [], []
    closure_t, closure_f = _closure(pt, ot, calls_t), _closure(pf, of, calls_f)
    for k in range(10):
        returned = []

        def recording_closure():
            returned.append(closure_f())
            return returned[-1]
        loss_t = ot.step(closure_t)
        loss_f = of.step(recording_closure)
        assert len(returned) == 1 and loss_f is returned[0]
        torch.testing.assert_close(loss_f.detach(), loss_t.detach(), **TOL[torch.float32])
        assert_params_close(pf, pt, what=f"step {k} param")
    assert calls_f == [True] * 10 and calls_t == calls_f
    assert of.step() is None


def test_step_hooks(case, backend):
    name, kw = case
    _, pf = make_params()
    of = make_fast(name, pf, kw, backend)
    events = []

    def pre(opt, args, kwargs):
        events.append(("pre", opt, pf[0].detach().clone()))

    def post(opt, args, kwargs):
        events.append(("post", opt, pf[0].detach().clone()))

    def global_pre(opt, args, kwargs):
        events.append(("global_pre", opt, None))

    def global_post(opt, args, kwargs):
        events.append(("global_post", opt, None))

    handles = [of.register_step_pre_hook(pre), of.register_step_post_hook(post)]
    global_handles = [register_optimizer_step_pre_hook(global_pre),
                      register_optimizer_step_post_hook(global_post)]
    try:
        for k in range(3):
            before = pf[0].detach().clone()
            set_grads(pf, k)
            of.step()
            step_events = events[4 * k:4 * k + 4]
            assert [e[0] for e in step_events] == ["global_pre", "pre", "post", "global_post"]
            assert all(e[1] is of for e in step_events)
            assert torch.equal(step_events[1][2], before)  # pre hook sees the old param
            assert not torch.equal(step_events[2][2], before)  # post hook sees the update
            torch.testing.assert_close(step_events[2][2], pf[0].detach(), rtol=0, atol=0)
        assert len(events) == 12
    finally:
        for h in global_handles:
            h.remove()
    set_grads(pf, 3)
    of.step()
    assert len(events) == 14  # global hooks removed, own hooks still there
    for h in handles:
        h.remove()
    set_grads(pf, 4)
    of.step()
    assert len(events) == 14


@pytest.mark.parametrize("set_to_none", [True, False, None])
def test_zero_grad_matches_torch(case, backend, set_to_none):
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    run(ot, pt, range(2))
    run(of, pf, range(2))
    grads_f = [p.grad for p in pf]
    args = () if set_to_none is None else (set_to_none,)
    ot.zero_grad(*args)
    of.zero_grad(*args)
    for i, (f, t) in enumerate(zip(pf, pt)):
        assert (f.grad is None) == (t.grad is None), i
        if t.grad is not None:
            assert f.grad is grads_f[i]  # zeroed in place, like torch
            assert torch.equal(f.grad, torch.zeros_like(f)) and torch.equal(t.grad, f.grad)
    assert (pf[0].grad is None) == (set_to_none is not False)
    # Zeroed grads still step (weight decay / momentum move params) exactly like torch.
    if set_to_none is False:
        ot.step()
        of.step()
        assert_params_close(pf, pt)
    run(ot, pt, range(2, 5))
    run(of, pf, range(2, 5))
    assert_params_close(pf, pt)


# -- param groups ------------------------------------------------------------------
def test_add_param_group_mid_training(case, backend):
    name, kw = case
    pt, pf = make_params(shapes=SHAPES + ((6,), (2, 9)))
    ot, of = make_torch(name, pt[:3], kw), make_fast(name, pf[:3], kw, backend)
    run(ot, pt[:3], range(4))
    run(of, pf[:3], range(4))
    ot.add_param_group({"params": pt[3:], "lr": 0.03, "weight_decay": 0.02})
    of.add_param_group({"params": pf[3:], "lr": 0.03, "weight_decay": 0.02})
    assert_groups_equal(of, ot)
    before = [p.detach().clone() for p in pf[3:]]
    run(ot, pt, range(4, 12))
    run(of, pf, range(4, 12))
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)
    for p, b in zip(pf[3:], before):
        assert not torch.equal(p.detach(), b), "the added group did not train"


def test_per_group_hyperparameters(case, backend):
    name, kw = case
    pt, pf = make_params()

    def groups(params):
        return [{"params": params[:2]},
                {"params": params[2:], "lr": 3 * float(kw["lr"]), "weight_decay": 0.05}]
    ot, of = make_torch(name, groups(pt), kw), make_fast(name, groups(pf), kw, backend)
    run(ot, pt, range(10))
    run(of, pf, range(10))
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)
    # The groups really differ: the same optimizer with group 1's settings everywhere ends elsewhere.
    _, pf_same = make_params()
    of_same = make_fast(name, pf_same, kw, backend)
    run(of_same, pf_same, range(10))
    assert not torch.allclose(pf_same[3], pf[3])


def test_params_without_grad_are_skipped(case, backend):
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    never = 1  # never gets a grad
    initial = pf[never].detach().clone()
    state_before = copy.deepcopy(dict(of.state.get(pf[never], {})))
    run(ot, pt, range(5), skip={never})
    run(of, pf, range(5), skip={never})
    assert torch.equal(pf[never].detach(), initial)
    if name == "Adagrad":  # torch creates Adagrad state at construction
        assert set(of.state[pf[never]]) == set(state_before) == {"step", "sum"}
        for key, value in state_before.items():
            assert torch.equal(of.state[pf[never]][key], value), key
    else:
        assert pf[never] not in of.state and pt[never] not in ot.state
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)
    for i in (0, 2, 3):
        assert pf[i] in of.state or not COUNTS_STEPS[name] and kw.get("momentum", 0) == 0


def test_param_losing_grad_for_one_step_is_skipped(case, backend):
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    run(ot, pt, range(3))
    run(of, pf, range(3))
    gap = 2
    value = pf[gap].detach().clone()
    state = copy.deepcopy(dict(of.state.get(pf[gap], {})))
    other = pf[0].detach().clone()
    run(ot, pt, [3], skip={gap})
    run(of, pf, [3], skip={gap})
    assert torch.equal(pf[gap].detach(), value)
    for key, v in state.items():
        # SWATS keeps its group's switch in every param's state (Note [SWATS's switch]).
        if key not in GROUP_STATE_KEYS.get(name, ()):
            assert torch.equal(of.state[pf[gap]][key], v), key
    if COUNTS_STEPS[name]:
        assert of.state[pf[gap]]["step"].item() == 3.0
        assert of.state[pf[0]]["step"].item() == 4.0
    assert not torch.equal(pf[0].detach(), other)
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)
    run(ot, pt, range(4, 10))
    run(of, pf, range(4, 10))
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)


def test_mixed_dtypes_in_one_group(case, backend):
    name, kw = case
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.float64]
    pt, pf = make_params(shapes=SHAPES + ((5, 3),), dtypes=dtypes)
    # A non-contiguous float64 param in the same group.
    pt[4], pf[4] = (nn.Parameter(p.detach().t().contiguous().t()) for p in (pt[4], pf[4]))
    assert not pf[4].is_contiguous()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    run(ot, pt, range(12))
    run(of, pf, range(12))
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)


# -- the step-plan cache (Note [Step plans]) ----------------------------------------
def test_plan_cache_param_appended_to_group(case, backend):
    name, kw = case
    pt, pf = make_params(shapes=SHAPES + ((8,),))
    ot, of = make_torch(name, pt[:4], kw), make_fast(name, pf[:4], kw, backend)
    run(ot, pt[:4], range(4))
    run(of, pf[:4], range(4))
    ot.param_groups[0]["params"].append(pt[4])
    of.param_groups[0]["params"].append(pf[4])
    before = pf[4].detach().clone()
    run(ot, pt, range(4, 10))
    run(of, pf, range(4, 10))
    assert not torch.equal(pf[4].detach(), before)
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)


def test_plan_cache_param_replaced_in_group(case, backend):
    name, kw = case
    pt, pf = make_params(shapes=SHAPES + ((7,),))
    ot, of = make_torch(name, pt[:4], kw), make_fast(name, pf[:4], kw, backend)
    run(ot, pt[:4], range(4))
    run(of, pf[:4], range(4))
    ot.param_groups[0]["params"][1] = pt[4]
    of.param_groups[0]["params"][1] = pf[4]
    live_t, live_f = [pt[0], pt[4], pt[2], pt[3]], [pf[0], pf[4], pf[2], pf[3]]
    run(ot, live_t, range(4, 10))
    run(of, live_f, range(4, 10))
    assert_params_close(live_f, live_t)
    assert_state_close(of, live_f, ot, live_t)


def test_plan_cache_group_params_list_replaced(case, backend):
    name, kw = case
    pt, pf = make_params(shapes=SHAPES + ((7,),))
    ot, of = make_torch(name, pt[:4], kw), make_fast(name, pf[:4], kw, backend)
    run(ot, pt[:4], range(4))
    run(of, pf[:4], range(4))
    ot.param_groups[0]["params"] = [pt[0], pt[4], pt[2], pt[3]]
    of.param_groups[0]["params"] = [pf[0], pf[4], pf[2], pf[3]]
    live_t, live_f = ot.param_groups[0]["params"], of.param_groups[0]["params"]
    run(ot, live_t, range(4, 10))
    run(of, live_f, range(4, 10))
    assert_params_close(live_f, live_t)
    assert_state_close(of, live_f, ot, live_t)


def test_plan_cache_load_state_dict_rewinds(case, backend):
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    run(ot, pt, range(3))
    run(of, pf, range(3))
    snap_t = (copy.deepcopy(ot.state_dict()), [p.detach().clone() for p in pt])
    snap_f = (copy.deepcopy(of.state_dict()), [p.detach().clone() for p in pf])
    run(ot, pt, range(3, 8))
    run(of, pf, range(3, 8))
    for opt, params, (sd, values) in ((ot, pt, snap_t), (of, pf, snap_f)):
        opt.load_state_dict(sd)
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
    run(ot, pt, range(3, 12))
    run(of, pf, range(3, 12))
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)


def test_plan_cache_state_replaced_by_hand_then_invalidated(case, backend):
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    run(ot, pt, range(3))
    run(of, pf, range(3))
    if not any(k != "step" for s in of.state.values() for k in s):
        pytest.skip("this configuration keeps no state tensors")
    for opt, params in ((ot, pt), (of, pf)):
        for p in params:
            for key, value in list(opt.state[p].items()):
                opt.state[p][key] = value.clone()  # new tensor objects, same values
    of.invalidate_plans()
    run(ot, pt, range(3, 9))
    run(of, pf, range(3, 9))
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)


@pytest.mark.parametrize("nesterov", [False, True])
def test_plan_cache_sgd_momentum_switched_on(backend, nesterov):
    """State layout change: SGD gains a momentum buffer mid-training; its
    first momentum step copies the gradient, as in torch.optim."""
    pt, pf = make_params()
    ot = torch.optim.SGD(pt, lr=0.05, foreach=False)
    of = fastopt.SGD(pf, lr=0.05, backend=backend)
    run(ot, pt, range(3))
    run(of, pf, range(3))
    assert not of.state
    for opt in (ot, of):
        opt.param_groups[0].update(momentum=0.9, nesterov=nesterov)
    run(ot, pt, range(3, 10))
    run(of, pf, range(3, 10))
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)


# -- pickling and deepcopy ------------------------------------------------------------
@pytest.mark.parametrize("method", ["deepcopy", "pickle"])
def test_copy_then_continue(case, backend, method):
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    run(ot, pt, range(5))
    run(of, pf, range(5))
    if method == "deepcopy":
        pf2, of2 = copy.deepcopy((pf, of))
    else:
        pf2, of2 = pickle.loads(pickle.dumps((pf, of)))
    assert type(of2) is type(of) and of2.backend == backend
    assert all(a is b for a, b in zip(of2.param_groups[0]["params"], pf2))
    assert_state_close(of2, pf2, of, pf)
    original = [p.detach().clone() for p in pf]
    run(of2, pf2, range(5, 12))
    for p, v in zip(pf, original):  # the copy does not share params or state
        assert torch.equal(p.detach(), v)
    run(ot, pt, range(5, 12))
    assert_params_close(pf2, pt)
    assert_state_close(of2, pf2, ot, pt)
    run(of, pf, range(5, 12))
    assert_params_close(pf, pt)


# -- interaction with autograd and with params edited in place --------------------
def test_step_bumps_version_counters_like_torch(case, backend):
    """A graph that saved a param before the step must refuse backward after it,
    as with torch.optim (the fused op bumps version counters itself)."""
    name, kw = case
    pt, pf = make_params()
    for params, opt in ((pt, make_torch(name, pt, kw)), (pf, make_fast(name, pf, kw, backend))):
        set_grads(params, 0)
        versions = [p._version for p in params]
        loss = sum((p * p).sum() for p in params)
        opt.step()
        assert all(p._version > v for p, v in zip(params, versions))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_param_data_replaced_mid_training(case, backend):
    """``p.data = ...`` swaps the storage behind the same Parameter; the cached
    plan holds the Parameter, so the step must follow the new storage."""
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    run(ot, pt, range(3))
    run(of, pf, range(3))
    for params in (pt, pf):
        for p in params:
            p.data = p.detach() * 0.5 + 0.25
    run(ot, pt, range(3, 9))
    run(of, pf, range(3, 9))
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)


def test_non_contiguous_grads(case, backend):
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    for k in range(8):
        for params in (pt, pf):
            set_grads(params, k)
            for p in params:
                if p.dim() >= 2:
                    p.grad = p.grad.transpose(0, 1).contiguous().transpose(0, 1)
                    assert not p.grad.is_contiguous()
        ot.step()
        of.step()
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)


def test_param_without_grad_at_first_joins_later(case, backend):
    """A param that has no grad in the first steps (no state yet) starts
    training on the first step it has one, with fresh state, like torch."""
    name, kw = case
    pt, pf = make_params()
    ot, of = make_torch(name, pt, kw), make_fast(name, pf, kw, backend)
    late = 3
    run(ot, pt, range(4), skip={late})
    run(of, pf, range(4), skip={late})
    before = pf[late].detach().clone()
    run(ot, pt, range(4, 10))
    run(of, pf, range(4, 10))
    assert not torch.equal(pf[late].detach(), before)
    assert_params_close(pf, pt)
    assert_state_close(of, pf, ot, pt)
    if COUNTS_STEPS[name]:
        assert of.state[pf[late]]["step"].item() == 6.0
