"""max_grad_norm (Note [Fused gradient clipping] in fastopt/clip.py) and
fastopt.GradScaler (fastopt/amp.py).

The oracle is torch's recipe: ``torch.nn.utils.clip_grad_norm_`` over the
optimizer's params, then torch.optim's for-loop step (with AMP: the scaler
unscales first, and skips the step on an inf).  The norm op itself is
compared with a float64 sum and checked for bit-identical results across
thread counts.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import fastopt
from fastopt import reference
from registry import (OPTIMIZERS, OPTIMIZERS_BY_ID, SHAPES_BY_ID, GradientFeed, ShapeCase, clone_params,
                      make_params, one_process_mesh, snapshot, with_layout)
from test_parity import (GRAD_SEED, K_FUSED_VS_REFERENCE, K_LOW_PRECISION_VS_TORCH_LOW, K_VS_TORCH, PARAM_SEED,
                         assert_runs_match, assert_scaled_close, record, rms)

BACKENDS = ["fused", "reference"]
CASE_IDS = [case.id for case in OPTIMIZERS]
SHAPE = ShapeCase("clip", ((1023,), (37, 13), (1,), (0,)))  # ~1505 elements: N(0, 1) grads have norm ~39
MAX_NORM = 20.0
# Grad sizes per step: norm ~39 (clipped, coef ~0.5), ~8 (coef clamped to 1), ...
GRAD_SCALES = (1.0, 0.2, 1.5, 0.1, 1.0, 0.3)
STEPS = len(GRAD_SCALES)


def clipped_runs(case_id: str, backend: str, shape: ShapeCase = SHAPE, dtype=torch.float32,
                 grad_layout: str = "contiguous", device: str = "cpu"):
    """fastopt with max_grad_norm and torch's clip_grad_norm_ + step on the
    same grads; returns both optimizers, params, and per step (torch's norm,
    fastopt's last_grad_norm)."""
    case = OPTIMIZERS_BY_ID[case_id]
    initial = make_params(shape, dtype, PARAM_SEED, device)
    fast_params, torch_params = clone_params(initial), clone_params(initial)
    fast = case.fastopt_cls(fast_params, backend=backend, **case.make_kwargs(max_grad_norm=MAX_NORM))
    oracle = case.make_torch(torch_params, clipped_before=True)
    feed = GradientFeed(GRAD_SEED, layout=grad_layout)
    norms = []
    assert fast.last_grad_norm is None
    for scale in GRAD_SCALES:
        feed.scale = scale
        drawn = feed.set_grads(fast_params, torch_params)
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_params, MAX_NORM)
        oracle.step()
        fast.step()
        norms.append((torch_norm, fast.last_grad_norm))
        for p, values in zip(fast_params, drawn):
            assert torch.equal(p.grad, values), "fastopt rewrote a grad"
    return fast, oracle, fast_params, torch_params, norms


def assert_norms_match(norms, dtype=torch.float32, rtol=1e-6) -> None:
    for torch_norm, fast_norm in norms:
        assert fast_norm.dtype == torch_norm.dtype and fast_norm.dim() == 0
        torch.testing.assert_close(fast_norm, torch_norm, rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_max_grad_norm_matches_clip_grad_norm_then_torch_optim(case_id, backend):
    fast, oracle, fast_params, torch_params, norms = clipped_runs(case_id, backend)
    clipped = [n.item() > MAX_NORM for n, _ in norms]
    assert any(clipped) and not all(clipped), "the steps must clip some grads and leave others"
    assert_norms_match(norms)
    assert_runs_match(record(fast, fast_params), record(oracle, torch_params), K_VS_TORCH, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_max_grad_norm_on_cuda_matches_clip_grad_norm_then_torch_optim(case_id):
    """The CUDA norm pass (per-tensor norms summed in float64) and the clip
    coefficient in the CUDA kernels, against torch's recipe on the GPU."""
    fast, oracle, fast_params, torch_params, norms = clipped_runs(case_id, "fused", device="cuda")
    assert all(n.device.type == "cuda" for _, n in norms)
    assert_norms_match(norms, rtol=1e-5)
    assert_runs_match(record(fast, fast_params), record(oracle, torch_params), K_VS_TORCH, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_id, grad_layout", [
    ("chunks-mixed-list", "contiguous"), ("grad-transposed", "transposed"), ("grad-strided", "strided"),
    ("many-tensors", "contiguous"), ("empty", "contiguous")])
def test_max_grad_norm_shapes_and_layouts(shape_id, grad_layout, backend):
    shape = SHAPES_BY_ID[shape_id]
    fast, oracle, fast_params, torch_params, norms = clipped_runs("adamw-default", backend, shape,
                                                                  grad_layout=grad_layout)
    assert_norms_match(norms)
    assert_runs_match(record(fast, fast_params), record(oracle, torch_params), K_VS_TORCH, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", ["adam-default", "sgd-momentum", "rmsprop-centered", "adagrad-default"])
def test_max_grad_norm_float64(case_id, backend):
    fast, oracle, fast_params, torch_params, norms = clipped_runs(case_id, backend, dtype=torch.float64)
    assert_norms_match(norms, rtol=1e-13)
    assert_runs_match(record(fast, fast_params), record(oracle, torch_params), K_VS_TORCH, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id, dtype", [
    ("adam-default", torch.bfloat16), ("sgd-momentum", torch.bfloat16), ("sgd-momentum", torch.float16),
    ("adagrad-default", torch.float16)], ids=["adam-bfloat16", "sgd-bfloat16", "sgd-float16", "adagrad-float16"])
def test_max_grad_norm_low_precision(case_id, dtype, backend):
    """torch clips 16-bit grads with a 16-bit norm and coefficient (as fastopt)
    but rounds the clipped grads to 16 bits (fastopt keeps them in float32):
    near torch in the same dtype (where torch's float16 arithmetic is a
    meaningful oracle: test_parity.torch_float16_is_meaningful), and fused
    within rounding of the reference."""
    fast, oracle, fast_params, torch_params, norms = clipped_runs(case_id, backend, dtype=dtype)
    assert_norms_match(norms, rtol=2 * torch.finfo(dtype).eps)
    assert_runs_match(record(fast, fast_params), record(oracle, torch_params), K_LOW_PRECISION_VS_TORCH_LOW,
                      dtype)
    if backend == "fused":
        ref, _, ref_params, _, _ = clipped_runs(case_id, "reference", dtype=dtype)
        assert_runs_match(record(fast, fast_params), record(ref, ref_params), K_FUSED_VS_REFERENCE, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_over_groups_dtypes_and_params_without_grads(backend):
    """One global norm over every group; params without a grad count for
    nothing; float32 and float64 params together give a float64 norm, as
    clip_grad_norm_ does."""
    initial = [torch.randn(300), torch.randn(20, dtype=torch.float64), torch.randn(7), torch.randn(5)]
    fast_params, torch_params = clone_params(initial), clone_params(initial)
    fast = fastopt.SGD([{"params": fast_params[:2]}, {"params": fast_params[2:], "lr": 0.2}], lr=0.1,
                       backend=backend, max_grad_norm=2.0)
    oracle = torch.optim.SGD([{"params": torch_params[:2]}, {"params": torch_params[2:], "lr": 0.2}], lr=0.1,
                             foreach=False)
    for params in (fast_params, torch_params):
        for p, g in zip(params[:3], [torch.full((300,), 0.5), torch.full((20,), -1.0, dtype=torch.float64),
                                     torch.full((7,), 2.0)]):
            p.grad = g.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(torch_params, 2.0)
    oracle.step()
    fast.step()
    assert torch_norm.dtype == fast.last_grad_norm.dtype == torch.float64
    # torch takes the float32 tensors' norms in float32 before it promotes them.
    torch.testing.assert_close(fast.last_grad_norm, torch_norm, rtol=1e-7, atol=0)
    for a, e in zip(fast_params, torch_params):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_non_finite_norm_without_amp_matches_clip_grad_norm_(case_id, backend, bad):
    """clip_grad_norm_(error_if_nonfinite=False): an inf norm makes the coef 0
    (grads 0, inf * 0 = NaN), a NaN norm makes every grad NaN.  fastopt's
    g / (1 / coef) leaves NaN and inf in exactly torch's places."""
    case = OPTIMIZERS_BY_ID[case_id]
    initial = make_params(SHAPE, torch.float32, PARAM_SEED)
    fast_params, torch_params = clone_params(initial), clone_params(initial)
    fast = case.fastopt_cls(fast_params, backend=backend, **case.make_kwargs(max_grad_norm=MAX_NORM))
    oracle = case.make_torch(torch_params, clipped_before=True)
    feed = GradientFeed(GRAD_SEED)
    for step in range(3):
        feed.set_grads(fast_params, torch_params)
        if step == 1:
            values = [float("inf"), -float("inf")] if bad == "inf" else [float("nan"), 1.0]
            for p in (fast_params[0], torch_params[0]):
                p.grad[[5, 700]] = torch.tensor(values)
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_params, MAX_NORM)
        oracle.step()
        fast.step()
        assert torch.equal(fast.last_grad_norm.isnan(), torch_norm.isnan())
        assert torch.equal(fast.last_grad_norm.isinf(), torch_norm.isinf())
    actual, expected = record(fast, fast_params), record(oracle, torch_params)
    assert actual.keys == expected.keys
    for key, e in expected.values.items():
        a = actual.values[key]
        assert torch.equal(a.isnan(), e.isnan()), f"{key}: NaN at {a.isnan().nonzero().flatten().tolist()[:9]}, " \
            f"torch at {e.isnan().nonzero().flatten().tolist()[:9]}"
        assert torch.equal(a.isposinf(), e.isposinf()) and torch.equal(a.isneginf(), e.isneginf()), key
        finite = e.isfinite()
        if finite.any():
            assert_scaled_close(a[finite], e[finite], K_VS_TORCH, torch.float32, rms(e[finite]), key)
    if bad == "inf":  # zero grads but two NaN: the rest stays finite (LAMB, LARS: but params[0], through its norms)
        poisoned = fast_params[0].numel() if case.fastopt_cls._norms_per_param else 2
        assert expected.values["param"].isfinite().sum() >= expected.values["param"].numel() - poisoned


def test_division_by_the_inverse_coefficient_equals_torch_multiply_for_non_finite_norms():
    """The identity the kernels rely on, element by element: g / (1 / coef)
    == g * coef for coef = 0 (inf norm) and NaN (NaN norm), signs of zeros included."""
    g = torch.tensor([1.5, -2.0, 0.0, -0.0, float("inf"), -float("inf"), float("nan")])
    for norm in (float("inf"), float("nan")):
        coef = (MAX_NORM / (torch.tensor(norm) + 1e-6)).clamp(max=1.0)
        multiplied, divided = g * coef, g / (1 / coef)
        assert torch.equal(multiplied.isnan(), divided.isnan())
        finite = ~multiplied.isnan()
        assert torch.equal(multiplied[finite], divided[finite])
        assert torch.equal(multiplied[finite].signbit(), divided[finite].signbit())


# -- AMP -----------------------------------------------------------------------------

INF_STEP = 2


def amp_grads(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    scale = GRAD_SCALES[step % len(GRAD_SCALES)]
    grads = [torch.randn(shape, generator=generator) * scale for shape in SHAPE.shapes]
    if step == INF_STEP:
        grads[1][3, 4] = float("inf")
    return grads


def backward_scaled(optimizer, scaler, params, step: int) -> None:
    """backward of sum(p * g) through the scaler: p.grad = g * scale."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(sum((p * g).sum() for p, g in zip(params, amp_grads(step)))).backward()


@pytest.mark.parametrize("recipe", ["step", "unscale_-then-step"])
@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fastopt.GradScaler], ids=["torch", "fastopt"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_grad_scaler_with_max_grad_norm_matches_torch_recipe(case_id, backend, scaler_cls, recipe):
    """torch: scale, backward, unscale_, clip_grad_norm_, step, update.
    fastopt: scale, backward, [unscale_,] step, update with max_grad_norm; the
    inf step changes nothing (params, state, steps bit-identical)."""
    case = OPTIMIZERS_BY_ID[case_id]
    fast_params = make_params(SHAPE, torch.float32, PARAM_SEED)
    torch_params = make_params(SHAPE, torch.float32, PARAM_SEED)
    fast = case.fastopt_cls(fast_params, backend=backend, **case.make_kwargs(max_grad_norm=MAX_NORM))
    oracle = case.make_torch(torch_params, clipped_before=True)
    fast_scaler, torch_scaler = scaler_cls("cpu"), torch.amp.GradScaler("cpu")
    for step in range(STEPS):
        backward_scaled(oracle, torch_scaler, torch_params, step)
        torch_scaler.unscale_(oracle)
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_params, MAX_NORM)
        torch_scaler.step(oracle)
        torch_scaler.update()

        backward_scaled(fast, fast_scaler, fast_params, step)
        before = snapshot(fast, fast_params)
        if recipe == "unscale_-then-step":
            fast_scaler.unscale_(fast)
        fast_scaler.step(fast)
        fast_scaler.update()
        if step == INF_STEP:
            after = snapshot(fast, fast_params)
            for b, a in zip(before, after):
                assert b.keys() == a.keys()
                assert all(torch.equal(a[key], b[key]) for key in b), "a step with an inf grad changed something"
            # An optimizer that takes no grad_scale (Adafactor, as torch.optim's)
            # is not stepped at all: GradScaler skips its step.
            assert not fast.last_grad_norm.isfinite() or not fast._step_supports_amp_scaling
        else:
            torch.testing.assert_close(fast.last_grad_norm, torch_norm, rtol=1e-6, atol=0)
        assert fast._scaler_grad_sq_sums is None
    assert fast_scaler.get_scale() == torch_scaler.get_scale() == 2.0**16 / 2
    assert_runs_match(record(fast, fast_params), record(oracle, torch_params), K_VS_TORCH, torch.float32)


def count_grad_passes(monkeypatch, backend: str) -> dict[str, int]:
    """Counts calls of fastopt's norm pass and of torch's inf check / unscale
    (each reads every grad once)."""
    counts = {"norm": 0, "torch_check": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    if backend == "reference":
        monkeypatch.setattr(reference, "grad_sq_norm", counting("norm", reference.grad_sq_norm))
    else:
        monkeypatch.setattr(fastopt._extension._CompiledKernels, "grad_sq_norm_bound_",
                            staticmethod(counting("norm", torch.ops.fastopt.grad_sq_norm_bound_)),
                            raising=False)
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_",
                        counting("torch_check", torch._amp_foreach_non_finite_check_and_unscale_))
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_fastopt_grad_scaler_reads_the_grads_once_before_the_step(monkeypatch, backend):
    counts = count_grad_passes(monkeypatch, backend)
    params = make_params(SHAPE, torch.float32, PARAM_SEED)
    optimizer = fastopt.Adam(params, lr=1e-2, backend=backend, max_grad_norm=MAX_NORM)
    expected = {fastopt.GradScaler: {"norm": 1, "torch_check": 0},
                torch.amp.GradScaler: {"norm": 1, "torch_check": 1}}
    for scaler_cls, passes in expected.items():
        scaler = scaler_cls("cpu")
        for step in (0, 1):
            backward_scaled(optimizer, scaler, params, step)
            counts.update(norm=0, torch_check=0)
            scaler.step(optimizer)
            scaler.update()
            assert counts == passes, scaler_cls
    # Without max_grad_norm there is no norm: fastopt.GradScaler leaves the check to torch.
    optimizer.max_grad_norm = None
    scaler = fastopt.GradScaler("cpu")
    backward_scaled(optimizer, scaler, params, 0)
    counts.update(norm=0, torch_check=0)
    scaler.step(optimizer)
    assert counts == {"norm": 0, "torch_check": 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_sums_are_never_used_for_another_step(backend):
    """The sums of an inf check reach only the step GradScaler.step runs
    right after it: a check called by hand, or a step that raises, leaves
    nothing behind, and the next step reads the grads as they are then."""
    params = make_params(SHAPE, torch.float32, PARAM_SEED)
    optimizer = fastopt.SGD(params, lr=1e-2, backend=backend, max_grad_norm=MAX_NORM)
    scaler = fastopt.GradScaler("cpu")
    backward_scaled(optimizer, scaler, params, 0)
    scaler._check_inf_per_device(optimizer)
    assert optimizer._scaler_grad_sq_sums is None
    for p in params:
        p.grad.mul_(3)
    optimizer.step()
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.testing.assert_close(optimizer.last_grad_norm, expected, rtol=1e-6, atol=0)

    def failing_hook(*_):
        raise RuntimeError("hook")

    handle = optimizer.register_step_pre_hook(failing_hook)
    scaler = fastopt.GradScaler("cpu")
    backward_scaled(optimizer, scaler, params, 1)
    with pytest.raises(RuntimeError, match="hook"):
        scaler.step(optimizer)
    handle.remove()
    assert optimizer._scaler_grad_sq_sums is None
    del optimizer.grad_scale, optimizer.found_inf  # torch's GradScaler.step leaves them after a raise

    # A param added between the check and the step: the sums do not cover it.
    extra = torch.nn.Parameter(torch.zeros(50))
    extra.grad = torch.full((50,), 1e6)
    handle = optimizer.register_step_pre_hook(lambda *_: optimizer.add_param_group({"params": [extra]}))
    scaler = fastopt.GradScaler("cpu")
    backward_scaled(optimizer, scaler, params, 3)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    handle.remove()
    expected = torch.nn.utils.get_total_norm([p.grad for p in params] + [extra.grad]) / scale
    torch.testing.assert_close(optimizer.last_grad_norm, expected, rtol=1e-6, atol=0)


# -- the norm op ----------------------------------------------------------------------

def exact_sq_norm(grads) -> torch.Tensor:
    return sum(((torch.view_as_real(g) if g.is_complex() else g).double() ** 2).sum() for g in grads)


def op_grads(dtype) -> list[torch.Tensor]:
    """Odd sizes, an empty tensor, chunk-crossing sizes and non-dense views
    whose gaps hold NaN (a read of a gap poisons the sum)."""
    generator = torch.Generator().manual_seed(5)
    grads = [torch.randn(n, generator=generator).to(dtype) for n in (1, 7, 0, 33, 1023, 65536 + 17, 150001)]
    grads.append(with_layout(torch.randn(37, 13, generator=generator).to(dtype), "transposed"))
    grads.append(with_layout(torch.randn(301, 9, generator=generator).to(dtype), "strided", float("nan")))
    return grads


@pytest.mark.parametrize("kernels", ["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
def test_grad_sq_norm_op(kernels, dtype):
    op = torch.ops.fastopt.grad_sq_norm if kernels == "fused" else reference.grad_sq_norm
    grads = op_grads(dtype)
    before = [g.clone() for g in grads]
    result = op(grads)
    assert result.dtype == torch.float64 and result.dim() == 0
    torch.testing.assert_close(result, exact_sq_norm(grads), rtol=1e-13, atol=0)
    assert all(torch.equal(g, b) or (g.isnan() == b.isnan()).all() for g, b in zip(grads, before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
def test_grad_sq_norm_op_on_cuda(dtype):
    grads = [g.cuda() for g in op_grads(dtype)]
    result = torch.ops.fastopt.grad_sq_norm(grads)
    assert result.dtype == torch.float64 and result.dim() == 0 and result.is_cuda
    # Per-tensor norms in float32 (float64 for float64 grads), then summed.
    rtol = 1e-13 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(result.cpu(), exact_sq_norm(op_grads(dtype)), rtol=rtol, atol=0)


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_grad_sq_norm_op_mixed_dtypes_complex_many_and_empty(kernels):
    op = torch.ops.fastopt.grad_sq_norm if kernels == "fused" else reference.grad_sq_norm
    generator = torch.Generator().manual_seed(6)
    many = [torch.randn(1 + i % 61, generator=generator) for i in range(700)]
    mixed = many + [torch.randn(99, generator=generator).to(dtype)
                    for dtype in (torch.float64, torch.bfloat16, torch.float16, torch.complex64)]
    torch.testing.assert_close(op(mixed), exact_sq_norm(mixed), rtol=1e-13, atol=0)
    assert op([]).item() == 0 and op([torch.empty(0)]).item() == 0
    assert torch.isinf(op([torch.tensor([1.0, float("inf")])]))
    assert torch.isnan(op([torch.tensor([float("inf"), float("nan")])]))
    with pytest.raises(RuntimeError, match=r"grads\[1\] has layout"):
        op([torch.randn(3), torch.randn(3).to_sparse()])
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype"):
        op([torch.ones(3, dtype=torch.int32)])


def test_grad_sq_norm_is_bit_identical_across_thread_counts():
    grads = op_grads(torch.float32) + op_grads(torch.bfloat16) + [torch.randn(3_000_001)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.fastopt.grad_sq_norm(grads))
    finally:
        torch.set_num_threads(threads)
    assert results[0].item() == results[1].item() == results[2].item()
    torch.testing.assert_close(results[0], exact_sq_norm(grads), rtol=1e-13, atol=0)


def test_clipped_steps_are_bit_identical_across_thread_counts():
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params = make_params(ShapeCase("big", ((300_001,), (77, 1001))), torch.float32, PARAM_SEED)
            optimizer = fastopt.AdamW(params, lr=1e-2, backend="fused", max_grad_norm=10.0)
            feed = GradientFeed(GRAD_SEED)
            norms = []
            for _ in range(3):
                feed.set_grads(params)
                optimizer.step()
                norms.append(optimizer.last_grad_norm.item())
            runs.append((norms, [p.detach().clone() for p in params]))
    finally:
        torch.set_num_threads(threads)
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


# -- the keyword --------------------------------------------------------------------

@pytest.mark.parametrize("cls", list(dict.fromkeys(case.fastopt_cls for case in OPTIMIZERS)),
                         ids=lambda cls: cls.__name__)
def test_max_grad_norm_keyword(cls):
    params = [torch.nn.Parameter(torch.randn(4))]
    assert cls(params).max_grad_norm == (1.0 if cls is fastopt.LAMB else None)  # Apex's FusedLAMB default
    assert cls(params, max_grad_norm=1).max_grad_norm == 1.0
    for bad in (0, -1.0, float("nan"), True, "1", torch.tensor(1.0)):
        with pytest.raises(ValueError, match="Invalid max_grad_norm value"):
            cls(params, max_grad_norm=bad)
    optimizer = cls(params, lr=0.1, max_grad_norm=0.5)
    with pytest.raises(ValueError, match="Invalid max_grad_norm value"):
        optimizer.max_grad_norm = 0.0
    assert "max_grad_norm" not in optimizer.param_groups[0]
    params[0].grad = torch.ones(4)
    optimizer.step()
    for copied in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert copied.max_grad_norm == 0.5
    fresh = cls(params, lr=0.1, max_grad_norm=0.25)
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.max_grad_norm == 0.25


def test_max_grad_norm_rejects_dtensor_params():
    with one_process_mesh() as mesh:
        from torch.distributed.tensor import distribute_tensor

        param = torch.nn.Parameter(distribute_tensor(torch.randn(8), mesh))
        param.grad = distribute_tensor(torch.randn(8), mesh)
        optimizer = fastopt.Adam([param], max_grad_norm=1.0)
        with pytest.raises(NotImplementedError, match="max_grad_norm with DTensor params"):
            optimizer.step()
        assert not optimizer.state
