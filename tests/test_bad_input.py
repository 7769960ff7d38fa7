"""Bad input: a step (or a load) that fails changes nothing, and says which
param and what was expected; input that torch.optim accepts gives torch.optim's
result.

Tables:
  HYPERPARAMETERS  every hyperparameter torch.optim validates: the same error
                   type and message (or none, where torch accepts the value);
  BAD_STEPS        broken params / grads / state before a step: a RuntimeError
                   naming ``param_groups[g]['params'][j]`` and what was expected,
                   params and every state tensor bit-identical afterwards;
  BAD_LOADS        state_dicts that do not fit: a ValueError, the optimizer
                   bit-identical afterwards;
plus the accepted cases: mixed dtypes, duplicate params, sparse grads (SGD,
Adagrad), complex params, NaN / Inf grads, checked element by element against
torch.optim (for-loop).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

import fastopt
import oracles
from registry import OPTIMIZER_IDS, OPTIMIZERS, SCALAR_STATE_KEYS

BACKENDS = ("fused", "reference")
NAMES = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "NAdam", "RAdam", "Adamax", "Adadelta", "ASGD", "Rprop",
         "Lion", "ADOPT", "AdaBound", "QHAdam", "AggMo", "LAMB", "LARS")
# One configuration per optimizer that keeps every state slot it can have.
STATEFUL = {
    "Adam": dict(lr=0.05, amsgrad=True, weight_decay=0.0731),
    "AdamW": dict(lr=0.05),
    "SGD": dict(lr=0.05, momentum=0.9),
    "RMSprop": dict(lr=0.01, centered=True, momentum=0.5),
    "Adagrad": dict(lr=0.1, lr_decay=0.01),
    "NAdam": dict(lr=0.05, weight_decay=0.0731, momentum_decay=0.0123),
    "RAdam": dict(lr=0.05, weight_decay=0.0731),
    "Adamax": dict(lr=0.05, weight_decay=0.0731),
    "Adadelta": dict(lr=1.0, eps=1e-3, weight_decay=0.0731),
    "ASGD": dict(lr=0.05, t0=1),
    "Rprop": dict(lr=0.05),
    "Lion": dict(lr=0.05, weight_decay=0.0731),
    "ADOPT": dict(lr=0.05, weight_decay=0.0731),
    "AdaBound": dict(lr=0.05, gamma=0.3, amsbound=True, weight_decay=0.0731),
    "QHAdam": dict(lr=0.05, nus=(0.7, 0.9), weight_decay=0.0731),
    "AggMo": dict(lr=0.05, weight_decay=0.0731),
    # Unclipped: a global norm would couple the dtypes of test_group_mixing_dtypes_steps_like_torch.
    "LAMB": dict(lr=0.05, weight_decay=0.0731, max_grad_norm=None),
    "LARS": dict(lr=0.5, trust_coefficient=0.02, weight_decay=0.0731),
}
SLOTS = {"Adam": "exp_avg", "AdamW": "exp_avg_sq", "SGD": "momentum_buffer", "RMSprop": "grad_avg",
         "Adagrad": "sum", "NAdam": "exp_avg_sq", "RAdam": "exp_avg", "Adamax": "exp_inf", "Adadelta": "acc_delta",
         "ASGD": "ax", "Rprop": "step_size", "Lion": "exp_avg", "ADOPT": "exp_avg_sq",
         "AdaBound": "max_exp_avg_sq", "QHAdam": "exp_avg", "AggMo": "momentum_buffer_2", "LAMB": "exp_avg_sq",
         "LARS": "momentum_buffer"}
# The optimizers that count steps (all but SGD, Lion, AggMo and LARS).
COUNTING = tuple(name for name in NAMES if "step" in getattr(fastopt, name)._scalar_states)


def torch_cls(name: str) -> type[torch.optim.Optimizer]:
    """torch.optim's class of that name, or the test oracle of one torch.optim lacks (tests/oracles.py)."""
    return getattr(torch.optim, name, None) or getattr(oracles, name)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


# -- helpers -------------------------------------------------------------------
def _bits(t: Tensor) -> Tensor | None:
    """The bytes of ``t``: equal bits, NaN payloads and signed zeros included
    (None for a meta tensor, which has no data)."""
    t = t.detach()
    if t.is_meta:
        return None
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1).contiguous().view(torch.uint8).clone()


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything a failed call must leave alone: each param's bits, the state
    (which params have it, each key, the tensor objects and their bits) and
    the param groups."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = {}
    for p, entry in opt.state.items():
        state[id(p)] = {key: (value, _bits(value) if isinstance(value, Tensor) else None)
                        for key, value in entry.items()}
    groups = [{k: (v if k != "params" else [id(p) for p in v]) for k, v in g.items()}
              for g in opt.param_groups]
    return {"params": [(p, _bits(p)) for p in params], "state": state, "groups": copy.deepcopy(groups)}


def assert_unchanged(opt: torch.optim.Optimizer, before: dict[str, Any]) -> None:
    after = snapshot(opt)
    for i, ((p, bits), (q, bits_after)) in enumerate(zip(before["params"], after["params"])):
        assert p is q and torch.equal(bits, bits_after), f"param {i} changed"
    assert before["state"].keys() == after["state"].keys(), "params with state changed"
    for pid, entry in before["state"].items():
        entry_after = after["state"][pid]
        assert entry.keys() == entry_after.keys(), "state keys changed"
        for key, (value, bits) in entry.items():
            value_after, bits_after = entry_after[key]
            assert value_after is value, f"state {key!r} replaced"
            assert bits is None or torch.equal(bits, bits_after), f"state {key!r} changed"
    assert before["groups"] == after["groups"]


def make(name: str, params, backend: str, **kw) -> torch.optim.Optimizer:
    return getattr(fastopt, name)(params, backend=backend, **(STATEFUL[name] | kw))


def make_torch(name: str, params, **kw) -> torch.optim.Optimizer:
    return torch_cls(name)(params, foreach=False, **(STATEFUL[name] | kw))


def leaf(*shape, dtype=torch.float32, seed=0) -> nn.Parameter:
    drawn = torch.complex128 if dtype.is_complex else torch.float64
    return nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=drawn).to(dtype))


def set_grads(params, step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        noise = torch.randn(torch.view_as_real(p).shape if p.is_complex() else p.shape,
                            generator=generator, dtype=torch.float64)
        p.grad = (torch.view_as_complex(noise) if p.is_complex() else noise).to(p.dtype) + 0.5 * p.detach()


def assert_close_to_torch(fast_params, torch_params, fast_opt=None, torch_opt=None, tol=None) -> None:
    """Params (and with the optimizers, state) element by element; ``tol``
    overrides the per-dtype tolerances."""
    for i, (f, t) in enumerate(zip(fast_params, torch_params)):
        close = tol or TOL.get(t.dtype.to_real(), dict(rtol=2e-2, atol=2e-2))
        torch.testing.assert_close(f.detach(), t.detach(), equal_nan=True, **close, msg=lambda m, i=i: f"param {i}: {m}")
        if fast_opt is None:
            continue
        f_state, t_state = fast_opt.state.get(f, {}), torch_opt.state.get(t, {})
        assert set(f_state) == set(t_state), i
        for key, value in t_state.items():
            assert f_state[key].dtype == value.dtype, (i, key)
            torch.testing.assert_close(f_state[key], value, equal_nan=True, **close,
                                       msg=lambda m, i=i, key=key: f"param {i} state {key!r}: {m}")


def two_groups(dtype_mix: bool = True) -> list[nn.Parameter]:
    """Params for [{'params': [0, 1, 2]}, {'params': [3, 4]}]: group 0 holds
    two dtypes (two buckets), group 1 one; five buckets' worth of calls
    whichever fails."""
    second = torch.float64 if dtype_mix else torch.float32
    return [leaf(4, 3, seed=0), leaf(5, dtype=second, seed=1), leaf(7, seed=2), leaf(6, seed=3),
            leaf(2, 2, seed=4)]


def grouped(params):
    return [{"params": params[:3]}, {"params": params[3:], "lr": 0.02}]


# -- hyperparameters ---------------------------------------------------------------
# Candidate values per argument; a row expects fastopt to do what torch.optim
# does with the value: the same error type and message, or no error.
BAD_VALUES = {
    "lr": [-1.0, -1e-30, math.nan, torch.tensor(-0.5), torch.tensor([0.1, 0.2])],
    "eps": [-1e-8, -math.inf, math.nan],
    "betas": [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.999), (0.9, -0.5), (math.nan, 0.999),
              (torch.tensor(0.9), 0.999), (torch.tensor([0.9, 0.8]), torch.tensor(0.999))],
    "weight_decay": [-0.1, math.nan],
    "momentum": [-0.5, math.nan],
    "dampening": [-0.5, 2.0],
    "nesterov": [True],
    "alpha": [-0.5, math.nan],
    "lr_decay": [-0.1, math.nan],
    "initial_accumulator_value": [-0.1, math.nan],
    "etas": [(1.0, 1.2), (0.5, 1.0), (0.0, 1.2), (math.nan, 1.2)],
    "step_sizes": [(50.0, 1e-6)],  # not validated by torch.optim.Rprop
    "lambd": [-0.1],
    "t0": [-1.0],
    "momentum_decay": [-0.1, math.nan],
    "rho": [-0.1, 1.5, math.nan],
}
HYPERPARAMETERS = [
    pytest.param(name, arg, value, id=f"{name}-{arg}={value!r}".replace(" ", ""))
    for name in NAMES
    for arg, values in BAD_VALUES.items()
    if arg in torch_cls(name).__init__.__code__.co_varnames
    for value in values
]


def _clone(value):
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, arg, value", HYPERPARAMETERS)
def test_hyperparameter_validation_matches_torch(name, arg, value, backend):
    params = [leaf(3)]
    before = _bits(params[0])
    try:
        torch_cls(name)(params, **{arg: _clone(value)})
        torch_error = None
    except Exception as error:  # noqa: BLE001 (the type is the point)
        torch_error = error
    if torch_error is None:
        getattr(fastopt, name)(params, backend=backend, **{arg: _clone(value)})
    else:
        with pytest.raises(type(torch_error)) as fast_error:
            getattr(fastopt, name)(params, backend=backend, **{arg: _clone(value)})
        assert type(fast_error.value) is type(torch_error)
        assert str(fast_error.value) == str(torch_error)
    assert torch.equal(_bits(params[0]), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_non_leaf_params_are_rejected_like_torch(name, backend):
    base = leaf(3)
    non_leaf = base * 2
    for make_optimizer in (lambda params: torch_cls(name)(params),
                           lambda params: getattr(fastopt, name)(params, backend=backend)):
        with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
            make_optimizer([non_leaf])
        opt = make_optimizer([leaf(2)])
        with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
            opt.add_param_group({"params": [non_leaf]})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_param_in_two_groups_is_rejected_like_torch(name, backend):
    shared = leaf(3)
    for cls in (torch_cls(name), lambda *a, **k: getattr(fastopt, name)(*a, backend=backend, **k)):
        with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
            cls([{"params": [shared]}, {"params": [leaf(2), shared]}])


# -- bad steps -------------------------------------------------------------------
@dataclass(frozen=True)
class BadStep:
    """``breaks(opt, params)`` breaks the last group after two good steps;
    the next step must raise ``error`` matching ``pattern``."""

    id: str
    breaks: Callable[[torch.optim.Optimizer, list[nn.Parameter], str], None]
    pattern: str
    names: tuple[str, ...] = NAMES
    error: type[Exception] = RuntimeError
    needs_cuda: bool = False


def _resize_param(opt, params, name):
    """Model surgery: a resized embedding; the new grad fits the param, the state does not."""
    params[4].data = torch.randn(3, 2)
    params[4].grad = torch.randn(3, 2)


def _resize_param_keep_grad(opt, params, name):
    params[4].data = torch.randn(3, 2)


def _grad_shape(opt, params, name):
    params[4].grad.data = torch.randn(5)


def _grad_dtype(opt, params, name):
    params[4].grad.data = params[4].grad.data.double()


def _grad_device(opt, params, name):
    grad = params[4].grad
    params[4].data = params[4].data.cuda()
    params[4].grad = None
    params[4].grad_dtype = None
    params[4].grad = grad


def _state(edit, key=None):
    """Breaks state ``key`` (default: the optimizer's slot in SLOTS)."""
    def breaks(opt, params, name):
        state = opt.state[params[4]]
        broken = key or SLOTS[name]
        state[broken] = {
            "shape": lambda t: torch.zeros(9),
            "dtype": lambda t: t.double(),
            "device": lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"),
            "int": lambda t: torch.tensor(2),
        }[edit](state[broken])
        opt.invalidate_plans()
    return breaks


def _sparse_grad(opt, params, name):
    params[4].grad = params[4].grad.to_sparse()


BAD_STEPS = [
    BadStep("param-resized", _resize_param, r"state\['\w+'\] has shape \[2, 2\] but the param has shape \[3, 2\]"),
    BadStep("param-resized-grad-stale", _resize_param_keep_grad,
            r"grad has shape \[2, 2\] but the param has shape \[3, 2\]"),
    BadStep("grad-shape", _grad_shape, r"grad has shape \[5\] but the param has shape \[2, 2\]"),
    BadStep("grad-dtype", _grad_dtype, r"grad has dtype torch.float64 but the param has dtype torch.float32"),
    BadStep("grad-device", _grad_device, r"grad is on cpu but the param is on cuda", needs_cuda=True),
    BadStep("state-shape", _state("shape"), r"state\['\w+'\] has shape \[9\] but the param has shape \[2, 2\]"),
    BadStep("state-dtype", _state("dtype"), r"state\['\w+'\] has dtype torch.float64 but the param"),
    BadStep("state-device", _state("device"), r"state\['\w+'\] is on meta but the param is on cpu"),
    BadStep("step-int", _state("int", "step"), r"state\['step'\] must be a one-element float32 or float64 tensor",
            names=COUNTING),
    BadStep("mu_product-int", _state("int", "mu_product"),
            r"state\['mu_product'\] must be a one-element float32 or float64 tensor", names=("NAdam",)),
    BadStep("eta-int", _state("int", "eta"), r"state\['eta'\] must be a one-element float32 or float64 tensor",
            names=("ASGD",)),
    BadStep("sparse-grad-unsupported", _sparse_grad, "Adam does not support sparse gradients, please "
            r"consider SparseAdam instead \(got a sparse grad for param_groups\[1\]\['params'\]\[1\]\)",
            names=("Adam", "AdamW")),
    *[BadStep("sparse-grad-unsupported", _sparse_grad, f"{name} does not support sparse gradients", names=(name,))
      for name in ("RMSprop", "NAdam", "RAdam", "Adamax", "Adadelta", "ASGD", "Rprop", "Lion", "ADOPT",
                   "AdaBound", "QHAdam", "AggMo", "LAMB", "LARS")],
]
BAD_STEP_CASES = [pytest.param(case, name, id=f"{case.id}-{name}") for case in BAD_STEPS for name in case.names]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, name", BAD_STEP_CASES)
def test_bad_step_changes_nothing(case, name, backend):
    """The broken param is the last of five (three buckets in group 0, one in
    group 1 before it): every earlier bucket would have run by then."""
    if case.needs_cuda and not torch.cuda.is_available():
        pytest.skip("a grad on another device than its param needs CUDA (autograd refuses others)")
    params = two_groups()
    opt = make(name, grouped(params), backend)
    for k in range(2):
        set_grads(params, k)
        opt.step()
    set_grads(params, 2)
    case.breaks(opt, params, name)
    before = snapshot(opt)
    with pytest.raises(case.error, match=case.pattern) as error:
        opt.step()
    if "sparse" not in case.id:
        assert f"fastopt.{name}.step: param_groups[1]['params'][1]: " in str(error.value)
        assert str(error.value).endswith("nothing was changed")
    assert_unchanged(opt, before)
    with pytest.raises(case.error, match=case.pattern):  # and again: no half-built plan is left behind
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_failed_first_step_leaves_no_state_behind(name, backend):
    """State created lazily by a step that fails is removed again; the next
    (good) step then starts it exactly as torch.optim does (SGD's momentum
    buffer copies the first grad)."""
    params, torch_params = two_groups(), two_groups()
    opt, torch_opt = make(name, grouped(params), backend), make_torch(name, grouped(torch_params))
    set_grads(params, 0)
    good_grad = params[4].grad
    params[4].grad = None
    params[4].grad_dtype = None
    params[4].grad = torch.randn(2, 2, dtype=torch.float64)  # the wrong dtype
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[1\]: grad has dtype torch.float64"):
        opt.step()
    assert_unchanged(opt, before)
    params[4].grad = good_grad
    set_grads(torch_params, 0)
    opt.step()
    torch_opt.step()
    for k in range(1, 4):
        set_grads(params, k)
        set_grads(torch_params, k)
        opt.step()
        torch_opt.step()
    assert_close_to_torch(params, torch_params, opt, torch_opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_param_replaced_by_another_dtype_steps_like_torch(backend):
    """Without state, a param whose ``p.data`` became float64 is a valid
    param: the stale plan is rebuilt, not reported."""
    params, torch_params = [leaf(3), leaf(4, seed=1)], [leaf(3), leaf(4, seed=1)]
    opt = fastopt.SGD(params, lr=0.1, backend=backend)
    torch_opt = torch.optim.SGD(torch_params, lr=0.1, foreach=False)
    for k in range(4):
        if k == 2:
            for p in (params[1], torch_params[1]):
                p.data = p.data.double()
        set_grads(params, k)
        set_grads(torch_params, k)
        opt.step()
        torch_opt.step()
    assert params[1].dtype == torch.float64
    assert_close_to_torch(params, torch_params)


# -- accepted input that torch.optim accepts: its results ----------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_group_mixing_dtypes_steps_like_torch(name, backend):
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16)
    params = [leaf(5, dtype=dtype, seed=i) for i, dtype in enumerate(dtypes)]
    torch_params = [leaf(5, dtype=dtype, seed=i) for i, dtype in enumerate(dtypes)]
    opt, torch_opt = make(name, params, backend), make_torch(name, torch_params)
    for k in range(5):
        set_grads(params, k)
        set_grads(torch_params, k)
        opt.step()
        torch_opt.step()
    assert_close_to_torch(params, torch_params, opt, torch_opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_duplicate_params_in_a_group_step_like_torch(name, backend):
    """torch.optim warns and steps a param listed twice twice (for-loop order,
    shared state); so does fastopt (its entries never share one op call)."""
    params, torch_params = [leaf(6), leaf(3, seed=1)], [leaf(6), leaf(3, seed=1)]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = make(name, [params[0], params[1], params[0]], backend)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        torch_opt = make_torch(name, [torch_params[0], torch_params[1], torch_params[0]])
    for k in range(4):
        set_grads(params, k)
        set_grads(torch_params, k)
        opt.step()
        torch_opt.step()
    assert_close_to_torch(params, torch_params, opt, torch_opt)
    if "step" in torch_opt.state[torch_params[0]]:
        assert opt.state[params[0]]["step"].item() == 8.0


# -- sparse grads ---------------------------------------------------------------------
SPARSE_CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.8, dampening=0.3, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, maximize=True)),
    ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.5, eps=1e-6)),
]


def _embedding_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 3, sparse=True), nn.Linear(3, 2), nn.Linear(2, 1).double())


def _sparse_loss(model: nn.Module, step: int) -> Tensor:
    indices = torch.tensor([step % 11, 3, 3, 7])  # a repeated index: an uncoalesced grad
    hidden = model[1](model[0](indices))
    return model[2](hidden.double()).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, kw", SPARSE_CONFIGS, ids=[f"{n}-{'-'.join(kw)}" for n, kw in SPARSE_CONFIGS])
def test_sparse_grads_step_like_torch(name, kw, backend):
    """Sparse embedding grads next to dense float32 and float64 params, in two
    groups: element for element torch.optim's update (untouched rows stay)."""
    models = [_embedding_model(0), _embedding_model(0)]
    groups = [[{"params": m[0].parameters()}, {"params": list(m[1].parameters()) + list(m[2].parameters())}]
              for m in models]
    opt = getattr(fastopt, name)(groups[0], backend=backend, **kw)
    torch_opt = getattr(torch.optim, name)(groups[1], foreach=False, **kw)
    untouched = models[0][0].weight.detach()[[5, 10]].clone()  # rows no step looks up
    for k in range(4):
        for model, optimizer in ((models[0], opt), (models[1], torch_opt)):
            optimizer.zero_grad()
            _sparse_loss(model, k).backward()
            assert model[0].weight.grad.is_sparse
            optimizer.step()
    fast_params, torch_params = list(models[0].parameters()), list(models[1].parameters())
    # float32 tolerances for the float64 layer too: its grads come from float32 activations.
    assert_close_to_torch(fast_params, torch_params, tol=TOL[torch.float32])
    for f, t in zip(fast_params, torch_params):
        for key, value in torch_opt.state.get(t, {}).items():
            got = opt.state[f][key]
            torch.testing.assert_close(got, value.to_dense() if value.is_sparse else value,
                                       **TOL[torch.float32])
    assert torch.equal(models[0][0].weight.detach()[[5, 10]], untouched)
    assert not torch.equal(models[0][0].weight.detach()[3], _embedding_model(0)[0].weight.detach()[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_adagrad_sparse_grad_with_weight_decay_is_rejected_like_torch(backend):
    params = two_groups()
    opt = fastopt.Adagrad(grouped(params), weight_decay=0.1, backend=backend)
    set_grads(params, 0)
    params[4].grad = params[4].grad.to_sparse()
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients"):
        opt.step()
    assert_unchanged(opt, before)


# -- complex params ---------------------------------------------------------------------
# torch.optim.Adafactor refuses complex params in its step (its factors are of real matrices).
REFUSES_COMPLEX = (fastopt.Adafactor,)
COMPLEX_CASES = [case for case in OPTIMIZERS if case.fastopt_cls not in REFUSES_COMPLEX]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["complex64", "complex128"])
@pytest.mark.parametrize("case", COMPLEX_CASES, ids=[case.id for case in COMPLEX_CASES])
def test_complex_params_step_like_torch(case, dtype, backend):
    """Complex params next to a real one; torch.optim steps each complex
    element as a (real, imaginary) pair; the state stays complex."""
    def params():
        return [leaf(4, 3, dtype=dtype, seed=0), leaf(5, seed=1), leaf(7, dtype=dtype, seed=2)]
    fast_params, torch_params = params(), params()
    opt, torch_opt = case.make_fastopt(fast_params, backend), case.make_torch(torch_params)
    for k in range(6):
        set_grads(fast_params, k)
        set_grads(torch_params, k)
        opt.step()
        torch_opt.step()
    assert_close_to_torch(fast_params, torch_params, opt, torch_opt)
    # The state moves to torch.optim and on: the same trajectory.
    moved_params = [nn.Parameter(p.detach().clone()) for p in fast_params]
    moved = case.make_torch(moved_params)
    moved.load_state_dict(copy.deepcopy(opt.state_dict()))
    for k in range(6, 9):
        for ps, optimizer in ((moved_params, moved), (torch_params, torch_opt)):
            set_grads(ps, k)
            optimizer.step()
    assert_close_to_torch(moved_params, torch_params, moved, torch_opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", REFUSES_COMPLEX, ids=lambda cls: cls.__name__)
def test_complex_params_raise_like_torch_and_change_nothing(cls, backend):
    case = next(case for case in OPTIMIZERS if case.fastopt_cls is cls)
    errors = []
    for side, make in (("torch", case.make_torch), ("fastopt", lambda ps: case.make_fastopt(ps, backend))):
        params = [leaf(5, seed=1), leaf(4, 3, seed=0)]
        opt = make(params)
        set_grads(params, 0)
        opt.step()
        params.append(leaf(7, dtype=torch.complex64, seed=2))
        opt.add_param_group({"params": params[2:]})
        set_grads(params, 1)
        before = snapshot(opt)
        with pytest.raises(RuntimeError) as error:
            opt.step()
        if side == "fastopt":  # torch.optim steps the groups before the complex one
            assert_unchanged(opt, before)
        errors.append(str(error.value))
    assert errors[0] == errors[1] == f"{cls.__name__} does not support complex parameters"


# -- NaN / Inf grads ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_nan_and_inf_grads_propagate_like_torch(case, backend):
    """Without AMP a non-finite grad is applied, as torch.optim applies it:
    NaN and Inf land in the same elements of params and state, step after
    step (sign-based rules such as Rprop's and Lion's keep them out of the
    params, and Rprop's prev forgets them a step later)."""
    def params():
        return [leaf(6, seed=0), leaf(3, 2, seed=1), leaf(4, dtype=torch.float64, seed=2)]
    fast_params, torch_params = params(), params()
    opt, torch_opt = case.make_fastopt(fast_params, backend), case.make_torch(torch_params)
    reached_non_finite = False
    for k in range(4):
        for ps in (fast_params, torch_params):
            set_grads(ps, k)
            if k == 1:
                ps[0].grad[1] = math.nan
                ps[0].grad[4] = math.inf
                ps[1].grad[2, 0] = -math.inf
        opt.step()
        torch_opt.step()
        assert_close_to_torch(fast_params, torch_params, opt, torch_opt)
        for f, t in zip(fast_params, torch_params):
            for key, value in [("param", t), *torch_opt.state[t].items()]:
                fast_value = f if key == "param" else opt.state[f][key]
                assert torch.equal(fast_value.isnan(), value.isnan()), (k, key)
                assert torch.equal(fast_value.isinf(), value.isinf()), (k, key)
                reached_non_finite |= not torch.isfinite(value).all().item()
    assert reached_non_finite, "the test must reach non-finite values"


# -- load_state_dict -----------------------------------------------------------------------
def _trained(name: str, backend: str | None = None, **kw):
    """A (fastopt or, with backend None, torch) optimizer after two steps on two groups."""
    params = two_groups(dtype_mix=False)
    opt = make(name, grouped(params), backend, **kw) if backend else make_torch(name, grouped(params), **kw)
    for k in range(2):
        set_grads(params, k)
        opt.step()
    return opt


def _edit_state(edit: Callable[[dict], None]):
    def state_dict(name):
        sd = _trained(name).state_dict()
        edit(sd["state"][4])
        return sd
    return state_dict


@dataclass(frozen=True)
class BadLoad:
    id: str
    state_dict: Callable[[str], dict]  # of the optimizer name
    pattern: str
    names: tuple[str, ...] = NAMES


def _other_optimizer(name: str) -> dict:
    # One whose param_groups lack a key of ``name``'s.
    other = {"Adam": "SGD", "AdamW": "Adagrad", "SGD": "Adam", "RMSprop": "Adam", "Adagrad": "RMSprop",
             "NAdam": "RMSprop", "RAdam": "SGD", "Adamax": "Adagrad", "Adadelta": "Adam",
             "ASGD": "Rprop", "Rprop": "ASGD", "Lion": "ASGD", "ADOPT": "Lion",
             "AdaBound": "Adam", "QHAdam": "Adam", "AggMo": "SGD", "LAMB": "Adam", "LARS": "SGD"}[name]
    return _trained(other).state_dict()


def _drop_group(name: str) -> dict:
    sd = _trained(name).state_dict()
    sd["param_groups"].pop()
    return sd


def _shrink_group(name: str) -> dict:
    sd = _trained(name).state_dict()
    sd["param_groups"][1]["params"].pop()
    return sd


def _drop_hyperparameter(name: str) -> dict:
    sd = _trained(name).state_dict()
    del sd["param_groups"][1]["lr"]
    return sd


BAD_LOADS = [
    BadLoad("missing-slot", _edit_state(lambda s: s.pop(next(k for k in s if k not in SCALAR_STATE_KEYS))),
            r"the loaded state of param_groups\[1\]\['params'\]\[1\] has no \['\w+'\]",
            # torch.optim.SGD creates its momentum buffer lazily: a state without one is valid;
            # Lion's and LARS's only state is their slot: without it the state is empty, i.e. not started.
            names=tuple(name for name in NAMES if name not in ("SGD", "Lion", "LARS"))),
    BadLoad("missing-scalar-state", _edit_state(lambda s: s.pop(next(k for k in s if k in SCALAR_STATE_KEYS))),
            r"the loaded state of param_groups\[1\]\['params'\]\[1\] has no \['\w+'\]", names=COUNTING),
    BadLoad("slot-shape", _edit_state(lambda s: s.update({k: torch.zeros(3) for k in s if k not in SCALAR_STATE_KEYS})),
            r"the loaded state of param_groups\[1\]\['params'\]\[1\]: state\['\w+'\] has shape \[3\] "
            r"but the param has shape \[2, 2\]"),
    BadLoad("other-optimizer", _other_optimizer, r"the loaded param_groups\[0\] has no \[.+\] \(the state_dict "
            "of another optimizer"),
    BadLoad("missing-hyperparameter", _drop_hyperparameter, r"the loaded param_groups\[1\] has no \['lr'\]"),
    BadLoad("group-count", _drop_group, "loaded state dict has a different number of parameter groups"),
    BadLoad("group-size", _shrink_group,
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, name", [pytest.param(c, n, id=f"{c.id}-{n}") for c in BAD_LOADS for n in c.names])
def test_bad_load_state_dict_changes_nothing(case, name, backend):
    opt = _trained(name, backend)
    state_dict = case.state_dict(name)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=case.pattern):
        opt.load_state_dict(state_dict)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ("Adam", "RMSprop", "Adagrad", "NAdam", "ASGD", "Rprop"))
def test_load_state_dict_with_scalar_states_as_numbers_like_torch(name, backend):
    """Older checkpoints hold steps (and NAdam's mu_product, ASGD's eta and
    mu) as numbers; torch.optim converts them."""
    sd = _trained(name).state_dict()
    keys = getattr(fastopt, name)._scalar_states
    for state in sd["state"].values():
        state["step"] = int(state["step"].item())
        for key in keys[1:]:
            state[key] = state[key].item()
    opt, torch_opt = _trained(name, backend), _trained(name)
    opt.load_state_dict(copy.deepcopy(sd))
    torch_opt.load_state_dict(copy.deepcopy(sd))
    for p, t in zip(opt.param_groups[1]["params"], torch_opt.param_groups[1]["params"]):
        assert opt.state[p]["step"].item() == 2.0
        for key in keys:
            value, torch_value = opt.state[p][key], torch_opt.state[t][key]
            assert isinstance(value, Tensor) and value.dtype == torch_value.dtype
            assert value.item() == torch_value.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_sgd_state_without_momentum_buffer(backend):
    """torch.optim.SGD creates its momentum buffer on the first momentum step:
    a state_dict saved without momentum loads into a group that now has it."""
    sd = _trained("SGD", momentum=0.0).state_dict()
    assert not sd["state"]
    sd["state"][1] = {"momentum_buffer": None}
    for group in sd["param_groups"]:
        group["momentum"] = 0.9
    params, torch_params = two_groups(dtype_mix=False), two_groups(dtype_mix=False)
    opt, torch_opt = make("SGD", grouped(params), backend), make_torch("SGD", grouped(torch_params))
    opt.load_state_dict(copy.deepcopy(sd))
    torch_opt.load_state_dict(copy.deepcopy(sd))
    for k in range(3):
        set_grads(params, k)
        set_grads(torch_params, k)
        opt.step()
        torch_opt.step()
    assert_close_to_torch(params, torch_params, opt, torch_opt)

