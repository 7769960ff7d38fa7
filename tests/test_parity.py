"""fastopt against torch.optim (for-loop, ``foreach=False``) and fused against
reference, over the registry × dtype × backend × shape product.

Every comparison is element-wise (``torch.testing.assert_close``) over every
param and every state tensor, including ``step``, after ``STEPS`` steps on
identical random gradients.

Note [Parity tolerances]
A tolerance is ``k`` units of the dtype's machine epsilon, relative to each
element plus the typical size of that param or state slot:

    |actual - expected| <= k * eps * (|expected| + rms)

i.e. ``rtol = k * eps`` and ``atol = k * eps * rms``, where ``rms`` is the
root mean square of that key ("param", "exp_avg", ...) over all params of
the run.
The ``atol`` term is there because updates cancel: ``p - lr * u`` or
``beta * m + (1 - beta) * g`` can land near zero, and a one-rounding
difference of the *operands* (of the tensor's typical size) is then many ulps
of the tiny result.  For params the typical size is at least the rms of the
params before the run (a run of one element that ends near zero would
otherwise have no scale).  Measured maxima of ``k`` over this file's cases (10
steps; two different random data sets while writing the tests), and the
bounds asserted:

* float32 / float64 vs torch.optim: <= 4.2.  torch's CPU ops fuse some
  multiply-adds (``add(alpha=)``, ``lerp``, ``addcmul``) and fastopt's rules do
  not (-ffp-contract=off), so elements differ by an ulp per step, and ten
  steps through the recurrences reach a few ulps.  Asserted: k = 16
  (float32: rtol 1.9e-6; float64: 3.6e-15).
* fused vs reference, float32 / float64: <= 3.9, for the same reason (the
  reference runs torch ops; they are not bit-identical even for one SGD
  step).  Asserted: k = 8 (float32: rtol 9.5e-7).
* float16 / bfloat16 vs torch.optim run on float32 copies that are rounded to
  the storage dtype after every step (what fastopt computes: float32 opmath,
  one rounding on store): <= 1.1, a float32-level difference flips one
  rounding of the storage dtype now and then.  Asserted: k = 2, i.e. two ulps
  of the storage dtype (eps = 2^-7 for bfloat16, 2^-10 for float16).
* fused vs reference, float16 / bfloat16: <= 1.1.  Asserted: k = 2.
* bfloat16 vs torch.optim computing in bfloat16 (rounding after every op):
  <= 11.5, asserted loosely with k = 16 on params only (float16, where
  meaningful: <= 3.3).  See ``torch_float16_is_meaningful`` for why float16
  is compared this way only for some optimizers.

The scalar states (step counts, NAdam's mu_product) are compared exactly.
``test_params_move`` checks that the updates are far larger than these
tolerances, so that none of them could hide a missing update.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from registry import (
    DTYPE_NAMES,
    OPTIMIZERS,
    OPTIMIZERS_BY_ID,
    state_shape,
    MEASURED_STATE_KEYS,
    SCALAR_STATE_KEYS,
    assert_scalar_state_matches,
    SHAPES,
    SHAPES_BY_ID,
    GradientFeed,
    ShapeCase,
    clone_params,
    make_params,
    run_steps,
    snapshot,
)

STEPS = 10
PARAM_SEED = 1234
GRAD_SEED = 4321

K_VS_TORCH = 16
K_FUSED_VS_REFERENCE = 8
K_LOW_PRECISION = 2
K_LOW_PRECISION_VS_TORCH_LOW = 16

ALL_SHAPE_IDS = [s.id for s in SHAPES]
# Fewer shapes for the dtypes after float32: each still has a SIMD tail, a
# chunk boundary inside a multi-tensor list, and a non-contiguous layout.
FLOAT64_SHAPE_IDS = ["one", "odd-33", "chunks-mixed-list", "param-strided", "grad-transposed"]
LOW_PRECISION_SHAPE_IDS = ["odd-7", "odd-1023", "chunks-mixed-list", "param-transposed", "grad-strided"]

BACKENDS = ["fused", "reference"]



def torch_float16_is_meaningful(case) -> bool:
    """Whether torch.optim computing in float16 is a useful (loose) oracle:
    not for Adam / AdamW / RMSprop / NAdam / RAdam, whose ``(1 - beta2) * g * g``
    falls into float16's subnormal range, nor for Adagrad with weight decay, whose
    ``eps = 1e-10`` is 0 in float16 so that a ``g + wd * p`` that cancels
    exactly gives 0 / 0."""
    return (case.id.startswith(("sgd", "adamax", "adadelta"))
            or (case.id.startswith("adagrad") and not case.kwargs.get("weight_decay")))


# -- runs (cached: each is shared by several comparisons) ----------------------

@dataclass(frozen=True)
class Run:
    """The params and state after a run, compactly: one flat tensor per key
    ("param", "exp_avg", "step", ...) holding the params' tensors of that key
    one after another (few Python objects, however many params: the cache
    holds thousands of runs)."""

    keys: tuple[str, ...]  # per param: its state keys and "param", comma-joined
    values: dict[str, torch.Tensor]
    owners: dict[str, torch.Tensor]  # per key: the param index of each flat element
    initial_param_rms: float = 0.0  # rms of the params before the run, where known


def initial_rms(params) -> float:
    return rms(torch.cat([p.detach().reshape(-1) for p in params])) if params else 0.0


def record(optimizer: torch.optim.Optimizer, params, initial_param_rms: float = 0.0) -> Run:
    entries = snapshot(optimizer, params)
    keys = tuple(",".join(sorted(entry)) for entry in entries)
    values, owners = {}, {}
    for key in sorted({key for entry in entries for key in entry}):
        having = [(index, entry[key]) for index, entry in enumerate(entries) if key in entry]
        values[key] = torch.cat([t.reshape(-1) for _, t in having])
        owners[key] = torch.cat([torch.full((t.numel(),), index) for index, t in having])
    return Run(keys, values, owners, initial_param_rms)


@functools.lru_cache(maxsize=None)
def fastopt_run(case_id: str, shape_id: str, dtype: torch.dtype, backend: str) -> Run:
    case, shape = OPTIMIZERS_BY_ID[case_id], SHAPES_BY_ID[shape_id]
    params = make_params(shape, dtype, PARAM_SEED)
    optimizer = case.make_fastopt(params, backend=backend)
    for p in params:
        assert p.is_leaf
    start_rms = initial_rms(params)
    run_steps(optimizer, params, GradientFeed(GRAD_SEED, shape.grad_layout), STEPS)
    for p in params:  # fastopt's slots have the param's dtype and shape, its scalar states are 0-dim float32
        for key, value in optimizer.state.get(p, {}).items():
            if key in SCALAR_STATE_KEYS:
                assert value.dtype == torch.float32 and value.dim() == 0, key
            else:
                assert value.dtype == dtype and value.shape == state_shape(key, p), key
    return record(optimizer, params, start_rms)


@functools.lru_cache(maxsize=None)
def torch_run(case_id: str, shape_id: str, dtype: torch.dtype, compute_dtype: torch.dtype) -> Run:
    """torch.optim on the same initial params and grads, computing in
    ``compute_dtype``; when that differs from ``dtype`` every step is rounded
    to ``dtype`` (see registry.run_steps)."""
    case, shape = OPTIMIZERS_BY_ID[case_id], SHAPES_BY_ID[shape_id]
    params = clone_params(make_params(shape, dtype, PARAM_SEED), compute_dtype)
    optimizer = case.make_torch(params)
    start_rms = initial_rms(params)
    feed = GradientFeed(GRAD_SEED, shape.grad_layout, dtype=dtype)
    run_steps(optimizer, params, feed, STEPS, storage_dtype=dtype if compute_dtype != dtype else None)
    return record(optimizer, params, start_rms)


# -- comparison --------------------------------------------------------------------

def rms(t: torch.Tensor) -> float:
    """Root mean square of the elements of ``t``: the typical size of a param
    or state slot (over every param of a run, so that a one-element tensor
    gets a scale too)."""
    return t.double().pow(2).mean().sqrt().item() if t.numel() else 0.0


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, k: float, dtype: torch.dtype,
                        scale: float, what: str, owners: torch.Tensor | None = None) -> None:
    """|actual - expected| <= k * eps(dtype) * (|expected| + scale), element
    by element (Note [Parity tolerances]).  ``owners`` maps flat elements to
    param indices for the message."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    eps = torch.finfo(dtype).eps
    actual64, expected64 = actual.detach().double(), expected.detach().double()

    def message(default: str) -> str:
        if owners is None:
            return f"{what}: {default}"
        bad = ~torch.isclose(actual64, expected64, rtol=k * eps, atol=k * eps * scale)
        first = int(bad.nonzero()[0, 0])
        return (f"{what}: {default}\nfirst mismatch in params[{int(owners[first])}] "
                f"(flat index {first}): {actual64[first].item()!r} vs {expected64[first].item()!r}; "
                f"mismatching params: {sorted(set(owners[bad].tolist()))[:20]}")

    torch.testing.assert_close(actual64, expected64, rtol=k * eps, atol=k * eps * scale, msg=message)


def assert_runs_match(actual: Run, expected: Run, k: float, dtype: torch.dtype,
                      check_state_dtype: bool = True) -> None:
    """Same state keys for every param; every param and state element within
    ``k`` eps; scalar states (step counts, ASGD's eta and mu: the same double
    arithmetic stored as float32) identical, measured ones (SWATS's sums)
    within ``k`` eps of float32 or of ``dtype``."""
    assert actual.keys == expected.keys, "state keys differ"
    for key, expected_value in expected.values.items():
        value = actual.values[key]
        if key in SCALAR_STATE_KEYS:
            assert_scalar_state_matches(key, value, expected_value,
                                        k * max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps))
            continue
        assert value.dtype == dtype, f"{key}: dtype {value.dtype}, expected {dtype}"
        if check_state_dtype:
            assert value.dtype == expected_value.dtype
        # A param that ends near zero got there by cancelling operands of its
        # initial size: its scale is at least the initial params' rms.
        scale = rms(expected_value)
        if key == "param":
            scale = max(scale, expected.initial_param_rms)
        assert_scaled_close(value, expected_value, k, dtype, scale, key, expected.owners[key])


def _product(dtype, shape_ids, backends=BACKENDS):
    return [
        pytest.param(case.id, shape_id, dtype, backend, id=f"{case.id}-{shape_id}-{DTYPE_NAMES[dtype]}-{backend}")
        for case in OPTIMIZERS
        for shape_id in shape_ids
        for backend in backends
    ]


# -- fastopt vs torch.optim --------------------------------------------------------

@pytest.mark.parametrize(
    "case_id, shape_id, dtype, backend",
    _product(torch.float32, ALL_SHAPE_IDS) + _product(torch.float64, FLOAT64_SHAPE_IDS),
)
def test_matches_torch_optim(case_id, shape_id, dtype, backend):
    assert_runs_match(fastopt_run(case_id, shape_id, dtype, backend),
                      torch_run(case_id, shape_id, dtype, dtype), K_VS_TORCH, dtype)


@pytest.mark.parametrize(
    "case_id, shape_id, dtype, backend",
    _product(torch.bfloat16, LOW_PRECISION_SHAPE_IDS) + _product(torch.float16, LOW_PRECISION_SHAPE_IDS),
)
def test_low_precision_matches_torch_optim_in_float32(case_id, shape_id, dtype, backend):
    """Against torch.optim computing in float32 and storing in ``dtype``."""
    assert_runs_match(fastopt_run(case_id, shape_id, dtype, backend),
                      torch_run(case_id, shape_id, dtype, torch.float32), K_LOW_PRECISION, dtype,
                      check_state_dtype=False)


@pytest.mark.parametrize(
    "case_id, dtype",
    [pytest.param(case.id, torch.bfloat16, id=f"{case.id}-bfloat16") for case in OPTIMIZERS]
    + [pytest.param(case.id, torch.float16, id=f"{case.id}-float16") for case in OPTIMIZERS
       if torch_float16_is_meaningful(case)],
)
def test_low_precision_params_near_torch_optim_in_same_dtype(case_id, dtype):
    """Loosely against torch.optim computing in ``dtype`` itself (it rounds
    after every op, fastopt once per step): params only."""
    shape_id = "odd-1023"
    actual = fastopt_run(case_id, shape_id, dtype, "fused").values["param"]
    expected = torch_run(case_id, shape_id, dtype, dtype)
    assert_scaled_close(actual, expected.values["param"], K_LOW_PRECISION_VS_TORCH_LOW, dtype,
                        rms(expected.values["param"]), "param", expected.owners["param"])


SKIPPED_GRADS = {0: [1], 1: [1, 3], 2: [4], 3: [0, 2], 4: [4], 5: [1]}  # step -> params without a grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", [case.id for case in OPTIMIZERS])
def test_params_without_grads_are_skipped(case_id, backend):
    """Params whose grad is None in a step are left alone and their step
    count stays behind, so that one op call later holds tensors of different
    step counts (5, 3, 5, 5, 4: per-tensor bias corrections / lr decay)."""
    case = OPTIMIZERS_BY_ID[case_id]
    shape = ShapeCase("skips", ((7,), (33,), (5,), (1023,), (9,)))
    initial = make_params(shape, torch.float32, PARAM_SEED)
    fast_params, torch_params = clone_params(initial), clone_params(initial)
    fast, oracle = case.make_fastopt(fast_params, backend=backend), case.make_torch(torch_params)
    feed = GradientFeed(GRAD_SEED)
    for step in range(6):
        feed.set_grads(fast_params, torch_params)
        for index in SKIPPED_GRADS.get(step, []):
            fast_params[index].grad = None
            torch_params[index].grad = None
        fast.step()
        oracle.step()
    if "step" in oracle.state[torch_params[0]]:
        assert [oracle.state[p]["step"].item() for p in torch_params] == [5, 3, 5, 5, 4]
    assert_runs_match(record(fast, fast_params), record(oracle, torch_params), K_VS_TORCH, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", [case.id for case in OPTIMIZERS])
def test_non_finite_grads_propagate_like_torch_optim(case_id, backend):
    """A NaN, +inf and -inf in one step's grad of the first param leave NaN /
    inf in exactly the elements (of params and state) where torch.optim leaves
    them (LAMB, LARS: in all of that param's, through its norms); the other
    elements, and the second param, still match."""
    case = OPTIMIZERS_BY_ID[case_id]
    initial = make_params(ShapeCase("non-finite", ((1023,), (2047,))), torch.float32, PARAM_SEED)
    fast_params, torch_params = clone_params(initial), clone_params(initial)
    fast, oracle = case.make_fastopt(fast_params, backend=backend), case.make_torch(torch_params)
    feed = GradientFeed(GRAD_SEED)
    for step in range(4):
        feed.set_grads(fast_params, torch_params)
        if step == 1:
            for p in (fast_params[0], torch_params[0]):
                p.grad[[5, 17, 700]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        fast.step()
        oracle.step()
    actual, expected = record(fast, fast_params), record(oracle, torch_params)
    assert actual.keys == expected.keys
    for key, e in expected.values.items():
        a = actual.values[key]
        assert torch.equal(a.isnan(), e.isnan()), f"{key}: NaN at {a.isnan().nonzero().flatten().tolist()}, " \
            f"torch.optim at {e.isnan().nonzero().flatten().tolist()}"
        assert torch.equal(a.isposinf(), e.isposinf()) and torch.equal(a.isneginf(), e.isneginf()), key
        finite = e.isfinite()
        # (SWATS's sums over the first param, and its group's average of them, are NaN from step 1.)
        assert finite.sum() > e.numel() // 2 or key in MEASURED_STATE_KEYS
        assert_scaled_close(a[finite], e[finite], K_VS_TORCH, torch.float32, rms(e[finite]), key)


GROUP_OPTIONS = {
    # class name -> options of a second param group that differ from the first
    "Adam": {"lr": 2e-2, "weight_decay": 0.0517, "amsgrad": True, "betas": (0.8, 0.95)},
    "AdamW": {"lr": 2e-2, "weight_decay": 0.2, "maximize": True},
    "SGD": {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.0517},
    "RMSprop": {"lr": 5e-3, "centered": True, "alpha": 0.9},
    "Adagrad": {"lr": 0.05, "lr_decay": 0.1},
    "NAdam": {"lr": 2e-2, "weight_decay": 0.0517, "decoupled_weight_decay": True, "momentum_decay": 0.0123},
    "RAdam": {"lr": 2e-2, "betas": (0.8, 0.9), "weight_decay": 0.0517},
    "Adamax": {"lr": 2e-2, "betas": (0.8, 0.95), "maximize": True},
    "Adadelta": {"lr": 2.0, "rho": 0.8, "weight_decay": 0.0517},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_name", list(GROUP_OPTIONS))
def test_param_groups_keep_their_own_options(class_name, backend):
    """Two param groups, the second with different options (including ones
    that change the state layout): each group steps with its own."""
    case = next(c for c in OPTIMIZERS if c.fastopt_cls.__name__ == class_name)
    initial = make_params(SHAPES_BY_ID["param-transposed"], torch.float32, PARAM_SEED) + \
        make_params(SHAPES_BY_ID["odd-33"], torch.float32, PARAM_SEED + 1)
    fast_params, torch_params = clone_params(initial), clone_params(initial)

    def groups(params):
        return [{"params": params[:2]}, {"params": params[2:], **GROUP_OPTIONS[class_name]}]

    fast = case.fastopt_cls(groups(fast_params), backend=backend, **case.make_kwargs())
    oracle = case.torch_cls(groups(torch_params), foreach=False, **case.make_kwargs())
    run_steps(fast, fast_params, GradientFeed(GRAD_SEED), STEPS)
    run_steps(oracle, torch_params, GradientFeed(GRAD_SEED), STEPS)
    # Group by group: the scales (rms) of each group's state are their own.
    for group in (slice(0, 2), slice(2, None)):
        assert_runs_match(record(fast, fast_params[group]), record(oracle, torch_params[group]),
                          K_VS_TORCH, torch.float32)


# -- fused vs reference ------------------------------------------------------------

def _cases(dtype, shape_ids):
    return [
        pytest.param(case.id, shape_id, dtype, id=f"{case.id}-{shape_id}-{DTYPE_NAMES[dtype]}")
        for case in OPTIMIZERS
        for shape_id in shape_ids
    ]


@pytest.mark.parametrize(
    "case_id, shape_id, dtype",
    _cases(torch.float32, ALL_SHAPE_IDS)
    + _cases(torch.float64, FLOAT64_SHAPE_IDS)
    + _cases(torch.bfloat16, LOW_PRECISION_SHAPE_IDS)
    + _cases(torch.float16, LOW_PRECISION_SHAPE_IDS),
)
def test_fused_matches_reference(case_id, shape_id, dtype):
    """The reference runs the rules' arithmetic in the same order with torch
    ops, which fuse some multiply-adds: agreement within rounding, not bits."""
    k = K_LOW_PRECISION if dtype in (torch.bfloat16, torch.float16) else K_FUSED_VS_REFERENCE
    assert_runs_match(fastopt_run(case_id, shape_id, dtype, "fused"),
                      fastopt_run(case_id, shape_id, dtype, "reference"), k, dtype)


# -- the updates are real ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case_id", [case.id for case in OPTIMIZERS])
def test_params_move(case_id, dtype, backend):
    """The updates are much larger than the parity tolerances, so that a
    no-op (or a tiny wrong update) cannot pass the tests above: in float32
    every element moves and 95% move by more than 100x their tolerance (the
    rest are random walks that came back near their start); in bfloat16,
    where a step of lr is only a few ulps, the typical element moves by more
    than 2x its tolerance and nearly all move."""
    shape_id = "odd-1023"
    initial = torch.cat([p.detach().reshape(-1) for p in make_params(SHAPES_BY_ID[shape_id], dtype, PARAM_SEED)])
    p = fastopt_run(case_id, shape_id, dtype, backend).values["param"].double()
    moved = (p - initial.double()).abs()
    assert torch.isfinite(p).all()
    if dtype == torch.float32:
        tolerance = K_VS_TORCH * torch.finfo(dtype).eps * (p.abs() + rms(p))
        assert (moved > 0).all(), f"{(moved == 0).sum().item()} elements did not move"
        ratio = (moved / tolerance).quantile(0.05).item()
        assert ratio > 100, f"5% of the elements moved less than {ratio:.1f}x their tolerance"
    else:
        tolerance = K_LOW_PRECISION * torch.finfo(dtype).eps * (p.abs() + rms(p))
        ratio = (moved / tolerance).median().item()
        assert ratio > 2, f"the median move is only {ratio:.1f}x the tolerance"
        fraction = (moved > 0).double().mean().item()
        assert fraction > 0.9, f"only {fraction:.3f} of the elements moved"


def test_params_move_against_own_grads():
    """The direction is right: plain SGD moves each element against its
    gradient (maximize: along it), by exactly lr * |g| up to rounding."""
    shape = SHAPES_BY_ID["odd-1023"]
    for case_id, sign in (("sgd-plain", -1.0), ("sgd-maximize", 1.0)):
        case = OPTIMIZERS_BY_ID[case_id]
        for backend in BACKENDS:
            params = make_params(shape, torch.float64, PARAM_SEED)
            before = params[0].detach().clone()
            optimizer = case.make_fastopt(params, backend=backend)
            grads = GradientFeed(GRAD_SEED).set_grads(params)
            optimizer.step()
            expected = before + sign * case.kwargs["lr"] * grads[0]
            torch.testing.assert_close(params[0].detach(), expected, rtol=1e-15, atol=1e-15)
