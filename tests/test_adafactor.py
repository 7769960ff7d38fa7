"""fastopt.Adafactor beyond the registry's checks (tests/registry.py runs its
parity, exactness, storage, clip, AMP and bad-input checks): the default
eps1 per dtype, params of three and more dims (batched factors), the layout
and dtypes of its factors under every storage option, state_dicts with
factors in both directions, a bad factor in a loaded state, DTensor params
and a compiled step.  torch.optim.Adafactor is the oracle (``foreach=False``)."""
from __future__ import annotations

import copy

import pytest
import torch

import fastopt
from fastopt.adafactor import FACTORS
from registry import GradientFeed, ShapeCase, clone_params, make_params, one_process_mesh, run_steps, snapshot
from test_parity import K_VS_TORCH

BACKENDS = ("fused", "reference")
COMPILED = "cpu" in fastopt.backends()["fused_devices"]
needs_extension = pytest.mark.skipif(not COMPILED, reason="fastopt._C is not loaded")
STEPS = 6
PARAM_SEED, GRAD_SEED = 5, 6
# Vectors, a 0-dim param, matrices (one a column, one a row) and batches of
# matrices, whose factors keep the leading dims.
SHAPES = ShapeCase("adafactor", ((33,), (), (37, 13), (16, 1), (1, 9), (3, 7, 11), (2, 1, 5, 4)))


def _run(make, dtype: torch.dtype = torch.float32, steps: int = STEPS, shape: ShapeCase = SHAPES):
    params = make_params(shape, dtype, PARAM_SEED)
    optimizer = make(params)
    run_steps(optimizer, params, GradientFeed(GRAD_SEED), steps)
    return optimizer, params


def _skip_without_extension(backend: str) -> None:
    if backend == "fused" and not COMPILED:
        pytest.skip("fastopt._C is not loaded")


def assert_near_torch(fast, fast_params, oracle, torch_params) -> None:
    """Params and state within K_VS_TORCH ulps of their size; the same keys and shapes."""
    for index, (p, q) in enumerate(zip(fast_params, torch_params)):
        eps = torch.finfo(p.dtype).eps
        torch.testing.assert_close(p, q, rtol=K_VS_TORCH * eps, atol=K_VS_TORCH * eps,
                                   msg=lambda m, index=index: f"params[{index}]: {m}")
        assert fast.state[p].keys() == oracle.state[q].keys()
        for key, expected in oracle.state[q].items():
            actual = fast.state[p][key]
            assert actual.shape == expected.shape, (index, key)
            torch.testing.assert_close(actual, expected, rtol=K_VS_TORCH * eps,
                                       atol=K_VS_TORCH * eps * expected.abs().max().item(),
                                       msg=lambda m, index=index, key=key: f"params[{index}] {key}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_defaults_and_batched_matrices_match_torch_optim(dtype, backend):
    """torch.optim.Adafactor's defaults (eps1: the dtype's machine epsilon)
    on vectors, a 0-dim param, matrices and batches of matrices."""
    _skip_without_extension(backend)
    fast, fast_params = _run(lambda ps: fastopt.Adafactor(ps, backend=backend), dtype)
    oracle, torch_params = _run(lambda ps: torch.optim.Adafactor(ps, foreach=False), dtype)
    assert_near_torch(fast, fast_params, oracle, torch_params)
    assert fast.state[fast_params[5]]["row_var"].shape == (3, 7, 1)
    assert fast.state[fast_params[5]]["col_var"].shape == (3, 1, 11)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_default_eps1_is_the_machine_epsilon_of_the_param_dtype(dtype):
    """As torch.optim: eps1=None is ``torch.finfo(param.dtype).eps``, bit for
    bit the run with that eps1 given; grads of ~1e-3 put g*g below its square,
    so that a smaller eps1 changes the result."""
    def run(eps1):
        param = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(1)).to(dtype))
        optimizer = fastopt.Adafactor([param], eps=(eps1, 1e-3), backend="reference")
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            param.grad = (torch.randn(64, generator=generator) * 1e-3).to(dtype)
            optimizer.step()
        return param, optimizer.state[param]["variance"]

    default, given, smaller = run(None), run(torch.finfo(dtype).eps), run(1e-30)
    assert all(torch.equal(a, b) for a, b in zip(default, given))
    assert not torch.equal(default[0], smaller[0])


@needs_extension
@pytest.mark.parametrize("options, factor_dtype, variance_dtype", [
    ({}, torch.bfloat16, torch.bfloat16),
    ({"state_dtype": torch.float32}, torch.float32, torch.float32),
    ({"master_weights": True}, torch.float32, torch.float32),
    ({"state_dtype": torch.uint8, "min_8bit_size": 0}, torch.float32, torch.uint8),
], ids=["default", "float32_state", "master_weights", "8bit_state"])
def test_state_dtypes_of_factors_and_variance(options, factor_dtype, variance_dtype):
    """bfloat16 params: the factors in the state dtype (8-bit: float32, they are
    small), a vector's variance in it; fused and reference within an ulp
    (torch's CPU sqrt may round otherwise than the kernels' on some CPUs)."""
    runs = [_run(lambda ps, b=backend: fastopt.Adafactor(ps, backend=b, **options), torch.bfloat16)
            for backend in BACKENDS]
    (fused, fused_params), (ref, ref_params) = runs
    for a, b in zip(snapshot(fused, fused_params), snapshot(ref, ref_params)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype
            if a[key].dtype == torch.uint8:
                assert (a[key].int() - b[key].int()).abs().max() <= 1, key
            else:
                eps = torch.finfo(a[key].dtype).eps
                torch.testing.assert_close(a[key], b[key], rtol=eps, atol=eps, msg=lambda m, key=key: f"{key}: {m}")
    vector, matrix = fused_params[0], fused_params[2]
    assert fused.state[vector]["variance"].dtype == variance_dtype
    assert {key: t.dtype for key, t in fused.state[matrix].items() if key in FACTORS} == {
        "row_var": factor_dtype, "col_var": factor_dtype}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["torch-to-fastopt", "fastopt-to-torch"])
def test_state_dict_moves_both_ways(direction, backend):
    """Three steps on one side, its state_dict (factors and variances) loaded
    into the other, three more: near six steps of torch.optim."""
    _skip_without_extension(backend)
    makers = (lambda ps: torch.optim.Adafactor(ps, foreach=False), lambda ps: fastopt.Adafactor(ps, backend=backend))
    first_make, second_make = makers if direction == "torch-to-fastopt" else makers[::-1]
    oracle, torch_params = _run(makers[0])
    params, feed = make_params(SHAPES, torch.float32, PARAM_SEED), GradientFeed(GRAD_SEED)
    first = first_make(params)
    run_steps(first, params, feed, STEPS // 2)
    second_params = clone_params(params)
    second = second_make(second_params)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    run_steps(second, second_params, feed, STEPS - STEPS // 2)
    assert_near_torch(second, second_params, oracle, torch_params)


def test_loaded_factors_take_the_state_dtype():
    """torch.optim keeps a bfloat16 param's factors in bfloat16; with master
    weights fastopt keeps them in float32, the loaded values unchanged."""
    params = make_params(SHAPES, torch.bfloat16, PARAM_SEED)
    oracle = torch.optim.Adafactor(params, foreach=False)
    run_steps(oracle, params, GradientFeed(GRAD_SEED), 2)
    fast = fastopt.Adafactor(clone_params(params), master_weights=True, backend="reference")
    fast.load_state_dict(oracle.state_dict())
    for p, q in zip(fast.param_groups[0]["params"], params):
        for key, saved in oracle.state[q].items():
            assert fast.state[p][key].dtype == torch.float32
            assert torch.equal(fast.state[p][key], saved.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loaded_factor_of_the_wrong_shape_raises_and_changes_nothing(backend):
    _skip_without_extension(backend)
    optimizer, params = _run(lambda ps: fastopt.Adafactor(ps, backend=backend), steps=2)
    saved = optimizer.state_dict()
    saved["state"][2]["col_var"] = torch.zeros(37, 1)
    before = snapshot(optimizer, params)
    with pytest.raises(ValueError, match=r"params'\]\[2\].*state\['col_var'\] must be a torch.float32 tensor of "
                                         r"shape \[1, 13\]"):
        optimizer.load_state_dict(saved)
    for a, b in zip(snapshot(optimizer, params), before):
        assert all(torch.equal(a[key], b[key]) for key in a)
    optimizer.state[params[2]]["row_var"] = torch.zeros(13, 1)  # set by hand: the step names it
    with pytest.raises(RuntimeError, match=r"params'\]\[2\].*state\['row_var'\].*nothing was changed"):
        params[2].grad = torch.ones_like(params[2])
        optimizer.step()


def test_dtensor_params_raise_not_implemented():
    """The step's norms and factors span the whole param: a shard cannot take them alone."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    with one_process_mesh() as mesh:
        param = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Replicate()]))
        with pytest.raises(NotImplementedError, match="whole param"):
            fastopt.Adafactor([param])


@needs_extension
def test_compiled_step_matches_eager():
    eager, eager_params = _run(lambda ps: fastopt.Adafactor(ps, weight_decay=0.05), steps=3)
    params = make_params(SHAPES, torch.float32, PARAM_SEED)
    compiled = fastopt.Adafactor(params, weight_decay=0.05)
    step = torch.compile(compiled.step, fullgraph=False)
    feed = GradientFeed(GRAD_SEED)
    for _ in range(3):
        feed.set_grads(params)
        step()
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=4 * K_VS_TORCH * 2**-23, atol=4 * K_VS_TORCH * 2**-23)
