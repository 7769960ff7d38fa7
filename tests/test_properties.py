"""Property tests (hypothesis): for random optimizers, options and
hyperparameters in their valid ranges, random lists of parameter shapes
(0-size, 0-dim, odd, a few crossing a CPU chunk boundary) with random
layouts (contiguous, transposed, strided) of params and grads, every dtype
and a few steps, the fused backend, the reference backend and torch.optim
agree element-wise within the tolerances of tests/test_parity.py (Note
[Parity tolerances]).

The examples are derandomized (a fixed sequence per hypothesis version) and
bounded, so CI is reproducible and the module stays well under 30 s; to
search longer locally, raise ``FASTOPT_HYPOTHESIS_EXAMPLES``.

Hyperparameter ranges are the valid ones, narrowed where the comparison
itself (not an implementation) becomes ill-conditioned:

* RMSprop ``alpha`` >= 0.5: at ``alpha`` = 0 centered RMSprop computes
  ``g*g - g*g``, whose sign is a rounding accident (torch fuses the multiply-
  add, fastopt does not), and ``sqrt`` of a negative residue is NaN.
* No small gradients (1e-2) for centered RMSprop in float16: its state
  ``(1 - alpha) * g * g`` is then subnormal, and ``square_avg - grad_avg**2``
  of the rounded state is as often negative (NaN after ``sqrt``) as not, in
  torch.optim as in fastopt: float16 needs a loss scale there.
* SGD ``nesterov`` only with ``momentum`` > 0 and ``dampening`` = 0, as torch
  requires.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from registry import (DTYPE_NAMES, FLOAT_DTYPES, LOW_PRECISION_DTYPES, SCALAR_STATE_KEYS, assert_scalar_state_matches, clone_params,
                      random_values, with_layout)
from test_parity import K_FUSED_VS_REFERENCE, K_LOW_PRECISION, K_VS_TORCH, Run, record, rms

import fastopt
import oracles

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Per optimizer and dtype (4 dtypes).
MAX_EXAMPLES = int(os.environ.get("FASTOPT_HYPOTHESIS_EXAMPLES", "15"))
PROPERTY_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # a step on a few 10^4 elements through three implementations varies in time
    derandomize=True,  # the same examples on every run: CI failures reproduce
    database=None,  # nothing written into the checkout (.hypothesis/)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

# -- strategies ----------------------------------------------------------------------------

LR = st.floats(1e-4, 1e-1)
EPS = st.floats(1e-10, 1e-3)
WEIGHT_DECAY = st.one_of(st.just(0.0), st.floats(1e-3, 0.2))


@st.composite
def adam_kwargs(draw, decoupled_option: bool) -> dict[str, Any]:
    kwargs = dict(lr=draw(LR), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))),
                  eps=draw(EPS), weight_decay=draw(WEIGHT_DECAY), amsgrad=draw(st.booleans()),
                  maximize=draw(st.booleans()))
    if decoupled_option:
        kwargs["decoupled_weight_decay"] = draw(st.booleans())
    return kwargs


@st.composite
def sgd_kwargs(draw) -> dict[str, Any]:
    momentum = draw(st.one_of(st.just(0.0), st.floats(0.1, 0.95)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9)))
    return dict(lr=draw(LR), momentum=momentum, dampening=dampening, weight_decay=draw(WEIGHT_DECAY),
                nesterov=nesterov, maximize=draw(st.booleans()))


@st.composite
def rmsprop_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(st.floats(1e-4, 1e-2)), alpha=draw(st.floats(0.5, 0.999)), eps=draw(EPS),
                weight_decay=draw(WEIGHT_DECAY), momentum=draw(st.one_of(st.just(0.0), st.floats(0.1, 0.95))),
                centered=draw(st.booleans()), maximize=draw(st.booleans()))


@st.composite
def adagrad_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), lr_decay=draw(st.one_of(st.just(0.0), st.floats(1e-3, 0.5))),
                weight_decay=draw(WEIGHT_DECAY),
                initial_accumulator_value=draw(st.one_of(st.just(0.0), st.floats(0.01, 1.0))),
                eps=draw(EPS), maximize=draw(st.booleans()))


@st.composite
def nadam_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))), eps=draw(EPS),
                weight_decay=draw(WEIGHT_DECAY), momentum_decay=draw(st.floats(0.0, 0.1)),
                decoupled_weight_decay=draw(st.booleans()), maximize=draw(st.booleans()))


@st.composite
def radam_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))), eps=draw(EPS),
                weight_decay=draw(WEIGHT_DECAY), decoupled_weight_decay=draw(st.booleans()),
                maximize=draw(st.booleans()))


@st.composite
def adamax_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.9999))), eps=draw(EPS),
                weight_decay=draw(WEIGHT_DECAY), maximize=draw(st.booleans()))


@st.composite
def adadelta_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(st.floats(1e-2, 2.0)), rho=draw(st.floats(0.0, 1.0)), eps=draw(EPS),
                weight_decay=draw(WEIGHT_DECAY), maximize=draw(st.booleans()))


@st.composite
def asgd_kwargs(draw) -> dict[str, Any]:
    # t0 small enough that mu averages within the few steps, or torch's default.
    return dict(lr=draw(LR), lambd=draw(st.floats(0.0, 0.1)), alpha=draw(st.floats(0.1, 1.0)),
                t0=draw(st.one_of(st.just(1e6), st.floats(0.0, 3.0))), weight_decay=draw(WEIGHT_DECAY),
                maximize=draw(st.booleans()))


@st.composite
def rprop_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), etas=(draw(st.floats(0.1, 0.9)), draw(st.floats(1.05, 2.0))),
                step_sizes=(draw(st.floats(1e-6, 1e-3)), draw(st.floats(1e-2, 50.0))), maximize=draw(st.booleans()))


@st.composite
def lion_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))),
                weight_decay=draw(WEIGHT_DECAY), maximize=draw(st.booleans()))


@st.composite
def adopt_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))), eps=draw(EPS),
                clip_lambda=draw(st.sampled_from([fastopt.adopt.default_clip_lambda, None])),
                weight_decay=draw(WEIGHT_DECAY), decouple=draw(st.booleans()), maximize=draw(st.booleans()))


@st.composite
def adabound_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))),
                final_lr=draw(st.floats(0.0, 1.0)),
                # gamma -> 0 makes the upper bound final_lr / (gamma * t) overflow float32, where the
                # oracle's clamp_ (as the adabound package's) raises: 0 itself means no upper bound.
                gamma=draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.9))), eps=draw(EPS),
                weight_decay=draw(WEIGHT_DECAY), amsbound=draw(st.booleans()), maximize=draw(st.booleans()))


@st.composite
def qhadam_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))),
                nus=(draw(st.floats(0.0, 1.0)), draw(st.floats(0.0, 1.0))), eps=draw(EPS),
                weight_decay=draw(WEIGHT_DECAY), decouple_weight_decay=draw(st.booleans()),
                maximize=draw(st.booleans()))


@st.composite
def aggmo_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), betas=tuple(draw(st.lists(st.floats(0.0, 0.999), min_size=1, max_size=3))),
                weight_decay=draw(WEIGHT_DECAY), maximize=draw(st.booleans()))


# LAMB without Apex's default clipping: float64 coefficients from norms summed
# in two orders differ by ~10 ulps, beyond these tolerances (test_clip.py
# checks the clipping, with its own float64 tolerance).
@st.composite
def lamb_kwargs(draw) -> dict[str, Any]:
    return dict(lr=draw(LR), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))),
                eps=draw(st.floats(1e-8, 1e-3)), weight_decay=draw(WEIGHT_DECAY),
                bias_correction=draw(st.booleans()), adam_w_mode=draw(st.booleans()),
                grad_averaging=draw(st.booleans()), use_nvlamb=draw(st.booleans()),
                max_grad_norm=None, maximize=draw(st.booleans()))


@st.composite
def lars_kwargs(draw) -> dict[str, Any]:
    momentum = draw(st.one_of(st.just(0.0), st.floats(0.1, 0.95)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9)))
    return dict(lr=draw(st.floats(1e-2, 1.0)), momentum=momentum, dampening=dampening,
                weight_decay=draw(WEIGHT_DECAY), nesterov=nesterov,
                trust_coefficient=draw(st.floats(1e-3, 0.1)), eps=draw(EPS), exclude_1d=draw(st.booleans()),
                maximize=draw(st.booleans()))


# name -> (fastopt class, torch.optim class (or the oracle of tests/oracles.py), hyperparameter strategy)
OPTIMIZERS = {
    "Adam": (fastopt.Adam, torch.optim.Adam, adam_kwargs(decoupled_option=True)),
    "AdamW": (fastopt.AdamW, torch.optim.AdamW, adam_kwargs(decoupled_option=False)),
    "SGD": (fastopt.SGD, torch.optim.SGD, sgd_kwargs()),
    "RMSprop": (fastopt.RMSprop, torch.optim.RMSprop, rmsprop_kwargs()),
    "Adagrad": (fastopt.Adagrad, torch.optim.Adagrad, adagrad_kwargs()),
    "NAdam": (fastopt.NAdam, torch.optim.NAdam, nadam_kwargs()),
    "RAdam": (fastopt.RAdam, torch.optim.RAdam, radam_kwargs()),
    "Adamax": (fastopt.Adamax, torch.optim.Adamax, adamax_kwargs()),
    "Adadelta": (fastopt.Adadelta, torch.optim.Adadelta, adadelta_kwargs()),
    "ASGD": (fastopt.ASGD, torch.optim.ASGD, asgd_kwargs()),
    "Rprop": (fastopt.Rprop, torch.optim.Rprop, rprop_kwargs()),
    "Lion": (fastopt.Lion, oracles.Lion, lion_kwargs()),
    "ADOPT": (fastopt.ADOPT, oracles.ADOPT, adopt_kwargs()),
    "AdaBound": (fastopt.AdaBound, oracles.AdaBound, adabound_kwargs()),
    "QHAdam": (fastopt.QHAdam, oracles.QHAdam, qhadam_kwargs()),
    "AggMo": (fastopt.AggMo, oracles.AggMo, aggmo_kwargs()),
    "LAMB": (fastopt.LAMB, oracles.LAMB, lamb_kwargs()),
    "LARS": (fastopt.LARS, oracles.LARS, lars_kwargs()),
}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    param_layout: str
    grad_layout: str


def _layouts(shape: tuple[int, ...]) -> list[str]:
    return ["contiguous", "strided"] + (["transposed"] if len(shape) == 2 else [])


@st.composite
def tensor_specs(draw) -> TensorSpec:
    # Up to 3 dims of up to 40: 0-size and 0-dim tensors, odd sizes (SIMD
    # tails), and now and then more than one CPU chunk (16384 elements);
    # mostly 2-D, the only shapes that can be transposed.
    ndim = draw(st.sampled_from([0, 1, 1, 2, 2, 2, 3]))
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim)))
    layouts = _layouts(shape)
    return TensorSpec(shape, draw(st.sampled_from(layouts)), draw(st.sampled_from(layouts)))


@dataclass(frozen=True)
class Problem:
    optimizer: str
    kwargs: dict[str, Any]
    dtype: torch.dtype
    tensors: tuple[TensorSpec, ...]
    steps: int
    grad_scale: float
    seed: int


@st.composite
def problems(draw, name: str, dtype: torch.dtype) -> Problem:
    kwargs = draw(OPTIMIZERS[name][2])
    grad_scales = [1.0, 30.0] if dtype == torch.float16 and kwargs.get("centered") else [1.0, 1e-2, 30.0]
    return Problem(
        optimizer=name,
        kwargs=kwargs,
        dtype=dtype,
        tensors=tuple(draw(st.lists(tensor_specs(), min_size=1, max_size=4))),
        steps=draw(st.integers(1, 4)),
        grad_scale=draw(st.sampled_from(grad_scales)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# -- runs ---------------------------------------------------------------------------------

def _initial_params(problem: Problem) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(problem.seed)
    return [torch.nn.Parameter(with_layout(random_values(spec.shape, problem.dtype, generator), spec.param_layout))
            for spec in problem.tensors]


def _run(problem: Problem, optimizer_cls, backend: str | None, compute_dtype: torch.dtype):
    """``problem.steps`` steps from the problem's initial params on its
    gradients (rounded to ``problem.dtype``, laid out per tensor spec; strided
    grads hold NaN in their gaps).  With a ``compute_dtype`` other than the
    problem's (torch.optim as the oracle of float16 / bfloat16), params and
    state are rounded to the problem's dtype after every step.

    Returns the final ``Run`` and, per key, the largest magnitude each element
    had along the way (params: from their initial value on)."""
    params = clone_params(_initial_params(problem), compute_dtype)
    kwargs = dict(problem.kwargs, backend=backend) if backend else dict(problem.kwargs, foreach=False)
    optimizer = optimizer_cls(params, **kwargs)
    generator = torch.Generator().manual_seed(problem.seed + 1)
    largest = {"param": torch.cat([p.detach().reshape(-1).double().abs() for p in params])}
    for _ in range(problem.steps):
        for p, spec in zip(params, problem.tensors):
            values = random_values(spec.shape, problem.dtype, generator, problem.grad_scale)
            p.grad = with_layout(values.to(compute_dtype), spec.grad_layout, gap_fill=float("nan"))
        optimizer.step()
        if compute_dtype != problem.dtype:
            with torch.no_grad():
                for p in params:
                    p.copy_(p.to(problem.dtype))
                    for key, value in optimizer.state.get(p, {}).items():
                        if key not in SCALAR_STATE_KEYS and torch.is_tensor(value):
                            value.copy_(value.to(problem.dtype))
        run = record(optimizer, params)
        for key, value in run.values.items():
            magnitude = value.double().abs()
            largest[key] = torch.maximum(largest[key], magnitude) if key in largest else magnitude
    return run, largest


def assert_close_along_the_way(actual: Run, expected: Run, largest: dict[str, torch.Tensor], k: float,
                               dtype: torch.dtype, what: str) -> None:
    """Like test_parity.assert_runs_match (Note [Parity tolerances]), with
    one more term in the tolerance of each element: the largest magnitude it
    had along the way, ``k * eps * (|expected| + rms + largest)``.  The parity
    tests get away with rms alone because every run has many elements of
    typical size; here a run can be one element that ends near 0 by
    cancellation (a param of 1e-2 moved by lr-sized steps to 4e-4), where an
    ulp of the operands is many ulps of the result.  Non-finite elements must
    match exactly; scalar states (step counts, ...) must be identical."""
    assert actual.keys == expected.keys, f"{what}: state keys differ"
    for key, e in expected.values.items():
        a = actual.values[key]
        if key in SCALAR_STATE_KEYS:
            assert_scalar_state_matches(key, a, e, k * max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps),
                                        f"{what}: ")
            continue
        assert a.dtype == dtype, f"{what}: {key} has dtype {a.dtype}, expected {dtype}"
        a64, e64 = a.double(), e.double()
        assert torch.equal(a64.isnan(), e64.isnan()), f"{what}: {key} NaN in different elements"
        finite = e64.isfinite()
        assert torch.equal(a64[~finite & ~e64.isnan()], e64[~finite & ~e64.isnan()]), f"{what}: {key} infinities differ"
        tolerance = k * torch.finfo(dtype).eps * (e64.abs() + rms(e64[finite]) + largest[key])
        bad = finite & ~((a64 - e64).abs() <= tolerance)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise AssertionError(
                f"{what}: {key}: {int(bad.sum())} of {e.numel()} elements differ by more than "
                f"{k} eps; first: params[{int(expected.owners[key][i])}] {a64[i].item()!r} vs {e64[i].item()!r} "
                f"(tolerance {tolerance[i].item():.3g}, largest along the way {largest[key][i].item():.3g})")


def _describe(problem: Problem) -> str:
    return (f"{problem.optimizer}({problem.kwargs}) {DTYPE_NAMES[problem.dtype]} steps={problem.steps} "
            f"grad_scale={problem.grad_scale} tensors={problem.tensors}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=[DTYPE_NAMES[d] for d in FLOAT_DTYPES])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_fused_reference_and_torch_optim_agree(name: str, dtype: torch.dtype, data):
    problem = data.draw(problems(name, dtype), label="problem")
    hypothesis.note(_describe(problem))
    fastopt_cls, torch_cls, _ = OPTIMIZERS[problem.optimizer]
    low_precision = problem.dtype in LOW_PRECISION_DTYPES
    fused, _ = _run(problem, fastopt_cls, "fused", problem.dtype)
    reference, reference_largest = _run(problem, fastopt_cls, "reference", problem.dtype)
    oracle, oracle_largest = _run(problem, torch_cls, None, torch.float32 if low_precision else problem.dtype)
    k_backends = K_LOW_PRECISION if low_precision else K_FUSED_VS_REFERENCE
    k_torch = K_LOW_PRECISION if low_precision else K_VS_TORCH
    assert_close_along_the_way(fused, reference, reference_largest, k_backends, problem.dtype, "fused vs reference")
    assert_close_along_the_way(fused, oracle, oracle_largest, k_torch, problem.dtype, "fused vs torch.optim")
    assert_close_along_the_way(reference, oracle, oracle_largest, k_torch, problem.dtype,
                               "reference vs torch.optim")
