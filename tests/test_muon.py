"""fastopt.Muon against torch.optim.Muon and against its reference backend:
the registry's checks (parity, exactness, storages, clip, AMP, bad input,
state_dicts both ways) on matrices, since Muon takes 2-D params only
(tests/registry.py, MATRIX_OPTIMIZERS).

Tolerances.  fastopt's momentum pass rounds as torch.lerp's formula without
a fused multiply-add, torch's vectorized lerp with one, so a momentum buffer
may differ from torch.optim's by an ulp (compared at K_VS_TORCH ulps).  The
update to orthogonalize is then rounded to bfloat16 as torch.optim does, and
where such an ulp sits on a bfloat16 rounding boundary the Newton–Schulz
input differs by one bfloat16 ulp, which the iteration spreads over the
matrix: the params are compared to within one bfloat16 ulp of a unit element
of the orthogonalized update per step, ``steps * lr * lr_ratio * 2**-8``, far
below what one step moves (~lr * lr_ratio / sqrt(min(rows, cols))).  Against
the reference backend, which runs the same torch ops around the same
roundings, everything is compared bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastopt
from fastopt.muon import lr_ratio
from registry import (MATRIX_OPTIMIZERS, GradientFeed, ShapeCase, clone_params, make_params, one_process_mesh,
                      run_steps, snapshot)
from test_parity import K_VS_TORCH

CASES = {case.id: case for case in MATRIX_OPTIMIZERS}
BACKENDS = ("fused", "reference")
COMPILED = "cpu" in fastopt.backends()["fused_devices"]
needs_extension = pytest.mark.skipif(not COMPILED, reason="fastopt._C is not loaded")
STEPS = 8
PARAM_SEED, GRAD_SEED = 3, 4

MATRIX_SHAPES = {case.id: case for case in (
    # Odd sizes for the SIMD tails, tall and wide (transposed for the iteration), 1 x 1.
    ShapeCase("odd", ((37, 13), (13, 37), (1, 1), (1, 33), (33, 1))),
    ShapeCase("empty", ((0, 5), (3, 4))),
    # More than one CPU thread's share of elements (16384).
    ShapeCase("chunks-130x131", ((130, 131),)),
    ShapeCase("param-transposed", ((37, 13), (5, 3)), param_layout="transposed"),
    ShapeCase("param-strided", ((20, 20), (3, 7)), param_layout="strided"),
    ShapeCase("grad-transposed", ((37, 13), (5, 3)), grad_layout="transposed"),
    ShapeCase("grad-strided", ((37, 13), (9, 4)), grad_layout="strided"),
    # Many tensors, several lr ratios: several update calls per step.
    ShapeCase("many-matrices", tuple((1 + i % 7, 1 + (i * 5) % 11) for i in range(61))),
)}
MIXED = ShapeCase("mixed", ((37, 13), (13, 37), (130, 131), (1, 33)))


def _lr(case) -> float:
    lr = case.kwargs["lr"]
    return lr.item() if isinstance(lr, torch.Tensor) else lr


def _run(case, shape: ShapeCase, dtype: torch.dtype, make, steps: int = STEPS, **kwargs):
    torch.manual_seed(0)  # the stochastic rounding seeds the steps draw
    params = make_params(shape, dtype, PARAM_SEED)
    optimizer = make(params, **kwargs)
    run_steps(optimizer, params, GradientFeed(GRAD_SEED, layout=shape.grad_layout), steps)
    return optimizer, params


def _fastopt(case, backend, **options):
    return lambda params: case.fastopt_cls(params, backend=backend, **case.make_kwargs(**options))


def assert_near_torch(case, fast, fast_params, oracle, torch_params, steps: int = STEPS,
                      bfloat16_ulps: int = 1) -> None:
    """Params within ``bfloat16_ulps`` bfloat16 ulps of a unit element of the
    orthogonalized update per step, momentum buffers within K_VS_TORCH ulps
    (module docstring)."""
    for index, (p, q) in enumerate(zip(fast_params, torch_params)):
        eps = torch.finfo(p.dtype).eps
        assert p.shape == q.shape and p.stride() == q.stride()
        atol = steps * _lr(case) * lr_ratio(case.kwargs.get("adjust_lr_fn"), p.shape) * bfloat16_ulps * 2.0**-8
        torch.testing.assert_close(p, q, rtol=K_VS_TORCH * eps, atol=atol,
                                   msg=lambda m, index=index: f"params[{index}]: {m}")
        torch.testing.assert_close(fast.state[p]["momentum_buffer"], oracle.state[q]["momentum_buffer"],
                                   rtol=K_VS_TORCH * eps, atol=K_VS_TORCH * eps,
                                   msg=lambda m, index=index: f"momentum_buffer[{index}]: {m}")
        assert fast.state[p].keys() == oracle.state[q].keys()


def assert_bit_identical(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert [e.keys() for e in a] == [e.keys() for e in b]
    for index, (x, y) in enumerate(zip(a, b)):
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (
                f"params[{index}] {key}: {(x[key] != y[key]).sum().item()} of {x[key].numel()} elements differ")


# -- parity ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape_id", list(MATRIX_SHAPES))
@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_torch_optim(case_id, shape_id, dtype, backend):
    if backend == "fused" and not COMPILED:
        pytest.skip("fastopt._C is not loaded")
    case, shape = CASES[case_id], MATRIX_SHAPES[shape_id]
    fast, fast_params = _run(case, shape, dtype, _fastopt(case, backend))
    oracle, torch_params = _run(case, shape, dtype, case.make_torch)
    assert_near_torch(case, fast, fast_params, oracle, torch_params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case_id", list(CASES))
def test_low_precision_near_torch_optim_in_float32(case_id, dtype):
    """16-bit params against torch.optim on float32 copies of them, rounded
    to ``dtype`` after each step (fastopt computes in float32 and rounds on
    store): within an ulp of ``dtype`` per step."""
    case, shape = CASES[case_id], MATRIX_SHAPES["odd"]
    fast, fast_params = _run(case, shape, dtype, _fastopt(case, "reference"))
    params = [torch.nn.Parameter(p.detach().float()) for p in make_params(shape, dtype, PARAM_SEED)]
    oracle = case.make_torch(params)
    run_steps(oracle, params, GradientFeed(GRAD_SEED, dtype=dtype), STEPS, storage_dtype=dtype)
    for p, q in zip(fast_params, params):
        torch.testing.assert_close(p.float(), q, rtol=STEPS * torch.finfo(dtype).eps, atol=STEPS * _lr(case) * 2**-7)


@needs_extension
@pytest.mark.parametrize("options", [
    {}, {"state_dtype": torch.bfloat16}, {"state_dtype": torch.uint8, "min_8bit_size": 0},
    {"master_weights": True}, {"stochastic_rounding": True}, {"max_grad_norm": 0.3}],
    ids=["default", "bf16_state", "8bit_state", "master_weights", "stochastic_rounding", "max_grad_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case_id", list(CASES))
def test_fused_is_the_reference_bit_for_bit(case_id, dtype, options):
    """Every storage (state dtype, 8-bit state, master copies, stochastic
    rounding) and the fused clipping: the same bits on both backends (but
    for clipped float64 grads, whose norm the backends sum in different
    orders: its float64 coefficient differs in last bits)."""
    if "max_grad_norm" in options and dtype == torch.float64:
        pytest.skip("the backends' float64 grad norms differ in last bits (summation order)")
    case = CASES[case_id]
    fused, fused_params = _run(case, MIXED, dtype, _fastopt(case, "fused", **options))
    ref, ref_params = _run(case, MIXED, dtype, _fastopt(case, "reference", **options))
    assert_bit_identical(snapshot(fused, fused_params), snapshot(ref, ref_params))


def test_momentum_buffer_is_not_normalized_with_bfloat16_params():
    """torch.optim.Muon's orthogonalization divides its input in place, and
    for bfloat16 params without nesterov that input is the momentum buffer
    itself (``bfloat16()`` of a bfloat16 tensor is the tensor): torch's
    buffer ends normalized.  fastopt orthogonalizes a copy: its buffer is the
    momentum the algorithm defines."""
    grad = make_params(ShapeCase("g", ((8, 6),)), torch.bfloat16, GRAD_SEED)[0].detach()
    param = torch.nn.Parameter(torch.ones(8, 6, dtype=torch.bfloat16))
    optimizer = fastopt.Muon([param], lr=0.02, nesterov=False, backend="reference")
    param.grad = grad.clone()
    optimizer.step()
    expected = torch.zeros(8, 6).lerp_(grad.float(), 0.05).bfloat16()
    assert torch.equal(optimizer.state[param]["momentum_buffer"], expected)


# -- exactness and state_dicts -------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"state_dtype": torch.uint8, "min_8bit_size": 0}], ids=["float", "8bit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_state_dict_is_bit_exact(backend, options):
    if backend == "fused" and not COMPILED:
        pytest.skip("fastopt._C is not loaded")
    case = CASES["muon-default"]
    make = _fastopt(case, backend, **options)
    straight, straight_params = _run(case, MIXED, torch.float32, make, steps=6)
    params, feed = make_params(MIXED, torch.float32, PARAM_SEED), GradientFeed(GRAD_SEED)
    first = make(params)
    run_steps(first, params, feed, 3)
    resumed_params = clone_params(params)
    resumed = make(resumed_params)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    run_steps(resumed, resumed_params, feed, 3)
    assert_bit_identical(snapshot(resumed, resumed_params), snapshot(straight, straight_params))


@pytest.mark.parametrize("direction", ["torch-to-fastopt", "fastopt-to-torch"])
def test_state_dict_moves_both_ways(direction):
    """Three steps on one side, its state_dict loaded into the other, three
    more: near the run that stays on torch.optim for all six."""
    case = CASES["muon-no_nesterov-momentum-weight_decay"]
    makers = (case.make_torch, _fastopt(case, "reference"))
    first_make, second_make = makers if direction == "torch-to-fastopt" else makers[::-1]
    oracle, torch_params = _run(case, MIXED, torch.float32, case.make_torch, steps=6)
    params, feed = make_params(MIXED, torch.float32, PARAM_SEED), GradientFeed(GRAD_SEED)
    first = first_make(params)
    run_steps(first, params, feed, 3)
    second_params = clone_params(params)
    second = second_make(second_params)
    second.load_state_dict(first.state_dict())
    run_steps(second, second_params, feed, 3)
    assert_near_torch(case, second, second_params, oracle, torch_params, steps=6)


# -- clip and AMP ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_is_clip_grad_norm_before_the_step(backend):
    if backend == "fused" and not COMPILED:
        pytest.skip("fastopt._C is not loaded")
    case = CASES["muon-default"]
    fast, fast_params = _run(case, MIXED, torch.float32, _fastopt(case, backend, max_grad_norm=0.3))
    torch_params = make_params(MIXED, torch.float32, PARAM_SEED)
    oracle, feed = case.make_torch(torch_params), GradientFeed(GRAD_SEED)
    for _ in range(STEPS):
        feed.set_grads(torch_params)
        torch.nn.utils.clip_grad_norm_(torch_params, 0.3)
        oracle.step()
    assert_near_torch(case, fast, fast_params, oracle, torch_params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_unscales_and_skips_inf_steps(backend):
    """torch.amp.GradScaler drives fastopt.Muon (grad_scale and found_inf in
    the kernels) as it drives torch.optim.Muon (grads unscaled in place); the
    step with an inf changes nothing."""
    if backend == "fused" and not COMPILED:
        pytest.skip("fastopt._C is not loaded")
    case = CASES["muon-default"]
    fast_params, torch_params = make_params(MIXED, torch.float32, PARAM_SEED), make_params(MIXED, torch.float32,
                                                                                        PARAM_SEED)
    fast, oracle = _fastopt(case, backend)(fast_params), case.make_torch(torch_params)
    scalers = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for step in range(5):
        generator = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(p.shape, generator=generator) for p in fast_params]
        if step == 2:
            grads[1][3, 4] = float("inf")
            before = snapshot(fast, fast_params)
        for optimizer, params, scaler in ((fast, fast_params, scalers[0]), (oracle, torch_params, scalers[1])):
            optimizer.zero_grad()
            scaler.scale(sum((p * g).sum() for p, g in zip(params, grads))).backward()
            scaler.step(optimizer)
            scaler.update()
        if step == 2:
            assert_bit_identical(snapshot(fast, fast_params), before)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**15
    assert_near_torch(case, fast, fast_params, oracle, torch_params, steps=4)


# -- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"lr": -1.0}, {"lr": torch.tensor([0.1, 0.2])}, {"momentum": -0.1}, {"weight_decay": -0.5},
    {"adjust_lr_fn": "sqrt"}], ids=str)
def test_constructor_errors_are_torch_optims(kwargs):
    params = [torch.nn.Parameter(torch.randn(3, 4))]
    with pytest.raises(ValueError) as expected:
        torch.optim.Muon(params, **kwargs)
    with pytest.raises(ValueError) as actual:
        fastopt.Muon(params, **kwargs)
    assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()], ids=str)
def test_params_that_are_not_matrices_raise_as_in_torch_optim(shape):
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(shape))]
    with pytest.raises(ValueError) as expected:
        torch.optim.Muon(params)
    with pytest.raises(ValueError) as actual:
        fastopt.Muon(params)
    assert str(actual.value) == str(expected.value)
    optimizer = fastopt.Muon(params[:1])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        optimizer.add_param_group({"params": params[1:]})
    assert len(optimizer.param_groups) == 1


def test_params_from_generators_are_all_kept():
    """The 2-D check reads a generator of params once, for torch.optim's own reading too."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=False))
    optimizer = fastopt.Muon(p for p in model[0].parameters())
    optimizer.add_param_group({"params": (p for p in model[1].parameters())})
    assert [len(group["params"]) for group in optimizer.param_groups] == [1, 1]


def _step_error_cases():
    def complex_params(params):
        params[1].data = torch.randn(params[1].shape, dtype=torch.complex64)
        params[1].grad = torch.randn(params[1].shape, dtype=torch.complex64)
    return [
        ("ns_steps", lambda optimizer, params: optimizer.param_groups[0].__setitem__("ns_steps", 100)),
        ("ns_coefficients", lambda optimizer, params: optimizer.param_groups[0].__setitem__(
            "ns_coefficients", (3.0, -4.0))),
        ("complex", lambda optimizer, params: complex_params(params)),
        ("sparse", lambda optimizer, params: setattr(params[1], "grad", params[1].grad.to_sparse())),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what, edit", _step_error_cases(), ids=[c[0] for c in _step_error_cases()])
def test_step_errors_are_torch_optims_and_change_nothing(what, edit, backend):
    if backend == "fused" and not COMPILED:
        pytest.skip("fastopt._C is not loaded")
    case = CASES["muon-default"]
    runs = []
    for make in (case.make_torch, _fastopt(case, backend)):
        params = make_params(MIXED, torch.float32, PARAM_SEED)
        optimizer = make(params)
        feed = GradientFeed(GRAD_SEED)
        run_steps(optimizer, params, feed, 2)
        feed.set_grads(params)
        edit(optimizer, params)
        before = snapshot(optimizer, params)
        with pytest.raises((ValueError, RuntimeError)) as error:
            optimizer.step()
        runs.append((error, optimizer, params, before))
    (expected, *_), (actual, optimizer, params, before) = runs
    assert type(actual.value) is type(expected.value)
    assert str(expected.value) in str(actual.value)
    assert_bit_identical(snapshot(optimizer, params), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_grad_in_a_later_bucket_changes_nothing(backend):
    """float32 and float64 matrices (two buckets, the first stepped first): a
    grad of the wrong shape on the last float64 param raises naming it, and
    the float32 params and their state are left as they were."""
    if backend == "fused" and not COMPILED:
        pytest.skip("fastopt._C is not loaded")
    params = make_params(MIXED, torch.float32, PARAM_SEED) + make_params(MIXED, torch.float64, PARAM_SEED)
    optimizer = fastopt.Muon(params, lr=0.02, backend=backend)
    feed = GradientFeed(GRAD_SEED)
    run_steps(optimizer, params, feed, 2)
    feed.set_grads(params)
    params[-1].grad.data = torch.randn(5, 5, dtype=torch.float64)  # .data: past autograd's own check
    before = snapshot(optimizer, params)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[7\].*shape"):
        optimizer.step()
    assert_bit_identical(snapshot(optimizer, params), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_bumps_version_counters_like_torch(backend):
    """A graph that saved a param before the step refuses backward after it,
    as with torch.optim.Muon (the list ops Muon calls from Python do not bump
    the counters themselves: its step does)."""
    if backend == "fused" and not COMPILED:
        pytest.skip("fastopt._C is not loaded")
    params = make_params(MIXED, torch.float32, PARAM_SEED)
    optimizer = fastopt.Muon(params, backend=backend)
    GradientFeed(GRAD_SEED).set_grads(params)
    loss = sum((p * p).sum() for p in params)
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_dtensor_params_raise_not_implemented():
    """The iteration needs each whole matrix: a shard's step cannot run it."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    with one_process_mesh() as mesh:
        param = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Replicate()]))
        with pytest.raises(NotImplementedError, match="whole param"):
            fastopt.Muon([param])


# -- torch.compile ------------------------------------------------------------------------

@needs_extension
def test_compiled_step_matches_eager():
    """The same kernels; the compiler fuses the iteration's bfloat16 ops and
    keeps what it fuses in float32 (fewer roundings, measured ~2.3 bfloat16
    ulps apart after three steps), so the params within 4 ulps per step."""
    case = CASES["muon-match_rms_adamw"]
    eager, eager_params = _run(case, MIXED, torch.float32, _fastopt(case, "fused"), steps=3)
    params = make_params(MIXED, torch.float32, PARAM_SEED)
    compiled = _fastopt(case, "fused")(params)
    step = torch.compile(compiled.step, fullgraph=False)
    feed = GradientFeed(GRAD_SEED)
    for _ in range(3):
        feed.set_grads(params)
        step()
    assert_near_torch(case, compiled, params, eager, eager_params, steps=3, bfloat16_ulps=4)
