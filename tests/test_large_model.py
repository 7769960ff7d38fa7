"""The large-model options (Note [Large-model options] in fastopt/optimizer.py):
state_dtype, master_weights and stochastic_rounding, on every optimizer and
backend, against torch.optim run the way each option promises to behave and
against the reference; state_dict round trips.  CUDA runs of the same skip
without a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastopt
from registry import (OPTIMIZERS, OPTIMIZERS_BY_ID, SCALAR_STATE_KEYS, GradientFeed, ShapeCase, clone_params,
                      make_params)
from test_parity import (
    GRAD_SEED,
    K_LOW_PRECISION,
    K_VS_TORCH,
    PARAM_SEED,
    assert_scaled_close,
    rms,
)

BACKENDS = ["fused", "reference"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="no CUDA device"))]
SHAPE = ShapeCase("large-model", ((1023,), (37, 13), (0,), (2 * 16384 + 5,)))
TRANSPOSED = ShapeCase("large-model-transposed", ((37, 13), (5, 3)), param_layout="transposed")
STEPS = 6
CASE_IDS = [case.id for case in OPTIMIZERS]


def train(optimizer, params, feed: GradientFeed, steps: int = STEPS, round_params_to=None):
    """``steps`` steps on ``feed``'s grads; ``round_params_to``: round the params
    (not the state) to that dtype after each step (torch.optim as the oracle
    of float32 state for 16-bit params)."""
    for _ in range(steps):
        feed.set_grads(params)
        optimizer.step()
        if round_params_to is not None:
            with torch.no_grad():
                for p in params:
                    p.copy_(p.to(round_params_to))


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, k: float, dtype: torch.dtype, what: str):
    assert_scaled_close(actual.cpu().double(), expected.cpu().double(), k, dtype, rms(expected.cpu()), what)


def slots_of(optimizer, p) -> dict[str, torch.Tensor]:
    return {k: v for k, v in optimizer.state[p].items() if k not in SCALAR_STATE_KEYS and k != "master_param"}


# -- state_dtype -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_float32_state_for_bfloat16_params_matches_torch(case_id, backend, device):
    """bfloat16 params with state_dtype=float32: torch.optim on float32 copies
    whose params (only) are rounded to bfloat16 after each step."""
    case = OPTIMIZERS_BY_ID[case_id]
    for shape in (SHAPE, TRANSPOSED):
        params = make_params(shape, torch.bfloat16, PARAM_SEED, device)
        oracle_params = clone_params(params, torch.float32)
        fast = case.fastopt_cls(params, backend=backend, state_dtype=torch.float32, **case.make_kwargs())
        oracle = case.make_torch(oracle_params)
        train(fast, params, GradientFeed(GRAD_SEED, dtype=torch.bfloat16))
        train(oracle, oracle_params, GradientFeed(GRAD_SEED, dtype=torch.bfloat16), round_params_to=torch.bfloat16)
        # The float32 state is held to 1/64 of a bfloat16 ulp, but params may
        # round one bfloat16 ulp apart (allowed above), and L2 weight decay
        # carries that into the state (g + wd * p): up to (1 - beta1) * wd of a
        # param ulp per step, which RAdam / Adamax with wd 0.0731 reach on one
        # element in ~32K.  So with L2 weight decay the state gets 1/16.
        l2_decay = case.kwargs.get("weight_decay") and not (
            case.kwargs.get("decoupled_weight_decay") or case.fastopt_cls.__name__ in ("AdamW", "Lion"))
        state_k = K_LOW_PRECISION * 2**-8 / 2**-23 / (16 if l2_decay else 64)
        for p, q in zip(params, oracle_params):
            assert p.dtype == torch.bfloat16
            assert_close_to(p.detach(), q.detach(), K_LOW_PRECISION, torch.bfloat16, "param")
            for key, value in slots_of(fast, p).items():
                assert value.dtype == torch.float32, key
                assert_close_to(value, oracle.state[q][key], state_k, torch.float32, key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bfloat16_state_fused_matches_reference(case_id, device):
    """float32 params with bfloat16 state: the kernels and the reference round
    the state the same way (one rounding per step)."""
    case = OPTIMIZERS_BY_ID[case_id]
    runs = []
    for backend in BACKENDS:
        params = make_params(SHAPE, torch.float32, PARAM_SEED, device)
        optimizer = case.fastopt_cls(params, backend=backend, state_dtype=torch.bfloat16, **case.make_kwargs())
        train(optimizer, params, GradientFeed(GRAD_SEED))
        runs.append((optimizer, params))
    (fused, fused_params), (ref, ref_params) = runs
    for p, q in zip(fused_params, ref_params):
        assert_close_to(p.detach(), q.detach(), K_LOW_PRECISION, torch.bfloat16, "param")
        for key, value in slots_of(fused, p).items():
            assert value.dtype == torch.bfloat16, key
            assert_close_to(value, ref.state[q][key], K_LOW_PRECISION, torch.bfloat16, key)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bfloat16_state_takes_half_the_memory(case_id):
    """Every state slot halves in bfloat16; a case whose options keep no slot
    (SGD without momentum) has none."""
    case = OPTIMIZERS_BY_ID[case_id]

    def state_bytes(state_dtype):
        params = make_params(SHAPE, torch.float32, PARAM_SEED)
        optimizer = case.fastopt_cls(params, state_dtype=state_dtype, **case.make_kwargs())
        train(optimizer, params, GradientFeed(GRAD_SEED), steps=1)
        keeps_slots = bool(optimizer._slot_names(optimizer.param_groups[0]))
        return keeps_slots, sum(t.numel() * t.element_size() for p in params for t in slots_of(optimizer, p).values())

    (keeps_slots, full), (_, half) = state_bytes(None), state_bytes(torch.bfloat16)
    assert (full > 0) == keeps_slots and half * 2 == full


# -- master weights ------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_master_weights_follow_the_float32_trajectory(case_id, backend, dtype, device):
    """With master_weights, the float32 master copy and state follow torch.optim
    on float32 params fed the same (16-bit) grads, and each param is its
    master copy rounded to nearest."""
    case = OPTIMIZERS_BY_ID[case_id]
    params = make_params(SHAPE, dtype, PARAM_SEED, device)
    oracle_params = clone_params(params, torch.float32)
    fast = case.fastopt_cls(params, backend=backend, master_weights=True, **case.make_kwargs())
    oracle = case.make_torch(oracle_params)
    train(fast, params, GradientFeed(GRAD_SEED, dtype=dtype))
    train(oracle, oracle_params, GradientFeed(GRAD_SEED, dtype=dtype))
    for p, q in zip(params, oracle_params):
        master = fast.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert_close_to(master, q.detach(), K_VS_TORCH, torch.float32, "master_param")
        assert torch.equal(p.detach(), master.to(dtype))
        for key, value in slots_of(fast, p).items():
            assert value.dtype == torch.float32, key
            assert_close_to(value, oracle.state[q][key], K_VS_TORCH, torch.float32, key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_updates_stall_in_bfloat16_but_not_with_master_weights(backend):
    """SGD steps of 1e-4 on params near 1 are below half a bfloat16 ulp (2^-9):
    plain bfloat16 params never move, master weights follow float32."""
    def run(dtype, **options):
        param = torch.nn.Parameter(torch.ones(4096, dtype=dtype) + torch.rand(4096).to(dtype) * 0.01)
        optimizer = fastopt.SGD([param], lr=1e-4, backend=backend, **options)
        start = param.detach().clone()
        for _ in range(200):
            param.grad = torch.ones_like(param)
            optimizer.step()
        return start, param.detach()

    start, plain = run(torch.bfloat16)
    assert torch.equal(plain, start)
    start32, float32 = run(torch.float32)
    start, master = run(torch.bfloat16, master_weights=True)
    expected = (start.float() - 200 * 1e-4)
    torch.testing.assert_close(master.float(), expected.to(torch.bfloat16).float(), rtol=0, atol=2**-7)
    assert (master.float() - start.float()).mean().item() == pytest.approx(-0.02, rel=0.1)
    assert (float32 - start32).mean().item() == pytest.approx(-0.02, rel=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_state_dict_round_trip_and_from_torch(backend):
    params = make_params(SHAPE, torch.bfloat16, PARAM_SEED)
    optimizer = fastopt.AdamW(params, lr=1e-2, master_weights=True, backend=backend)
    train(optimizer, params, GradientFeed(GRAD_SEED, dtype=torch.bfloat16), steps=3)
    saved = copy.deepcopy(optimizer.state_dict())  # load_state_dict keeps the tensors it gets
    assert all(s["master_param"].dtype == torch.float32 for s in saved["state"].values())

    # fastopt -> fastopt: the master copies come back exactly, as float32.
    restored_params = clone_params(params)
    restored = fastopt.AdamW(restored_params, lr=1e-2, master_weights=True, backend=backend)
    restored.load_state_dict(saved)
    for p, q in zip(params, restored_params):
        assert torch.equal(restored.state[q]["master_param"], optimizer.state[p]["master_param"])
        assert restored.state[q]["exp_avg"].dtype == torch.float32
    train(optimizer, params, GradientFeed(7, dtype=torch.bfloat16), steps=2)
    train(restored, restored_params, GradientFeed(7, dtype=torch.bfloat16), steps=2)
    for p, q in zip(params, restored_params):
        assert torch.equal(p, q)

    # torch.optim -> fastopt: no master copies saved; they start from the params,
    # and the float32 option of the fastopt optimizer is kept.
    torch_params = clone_params(params)
    oracle = torch.optim.AdamW(torch_params, lr=1e-2)
    train(oracle, torch_params, GradientFeed(GRAD_SEED, dtype=torch.bfloat16), steps=2)
    from_torch_params = clone_params(torch_params)
    from_torch = fastopt.AdamW(from_torch_params, lr=1e-2, master_weights=True, backend=backend)
    from_torch.load_state_dict(oracle.state_dict())
    assert from_torch.master_weights is True
    train(from_torch, from_torch_params, GradientFeed(9, dtype=torch.bfloat16), steps=1)
    for p in from_torch_params:
        assert from_torch.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(p.detach(), from_torch.state[p]["master_param"].to(torch.bfloat16))


# -- stochastic rounding -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_is_unbiased(backend):
    """An SGD step of 0.3 of a bfloat16 ulp: rounding to nearest never moves a
    param; stochastic rounding moves ~30% of them by one ulp, so the mean
    update equals the float32 update within statistical error (6 sigma)."""
    n, ulp = 2**18, 2.0**-7  # ulp of bfloat16 in [1, 2)
    lr = 0.3 * ulp

    def step(**options):
        param = torch.nn.Parameter(torch.full((n,), 1.5, dtype=torch.bfloat16))
        param.grad = torch.full_like(param, -1.0)
        fastopt.SGD([param], lr=lr, backend=backend, **options).step()
        return param.detach().float() - 1.5

    assert torch.count_nonzero(step()) == 0
    torch.manual_seed(0)
    moved = step(stochastic_rounding=True)
    assert set(moved.unique().tolist()) == {0.0, ulp}
    sigma = ulp * (0.3 * 0.7 / n) ** 0.5
    assert abs(moved.mean().item() - lr) < 6 * sigma


def test_stochastic_rounding_is_reproducible_and_fused_equals_reference():
    def run(seed, backend):
        torch.manual_seed(seed)
        params = make_params(SHAPE, torch.bfloat16, PARAM_SEED)
        optimizer = fastopt.Adam(params, lr=1e-3, stochastic_rounding=True, backend=backend)
        train(optimizer, params, GradientFeed(GRAD_SEED, dtype=torch.bfloat16), steps=3)
        return [p.detach().clone() for p in params]

    first, again, other = run(1, "fused"), run(1, "fused"), run(2, "fused")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert all(torch.equal(a, b) for a, b in zip(first, run(1, "reference")))


def test_options_are_validated():
    params = make_params(SHAPE, torch.bfloat16, PARAM_SEED)
    with pytest.raises(ValueError, match="state_dtype"):
        fastopt.Adam(params, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="exclude each other"):
        fastopt.Adam(params, master_weights=True, stochastic_rounding=True)


def test_ops_reject_storages_they_do_not_support():
    """The roofline moves plain storage only; the optimizer ops reject state of
    an unsupported dtype and master copies for float32 params, before writing."""
    params, grads = [torch.randn(5)], [torch.randn(5)]
    before = params[0].clone()
    with pytest.raises(RuntimeError, match="state of the params' dtype only"):
        torch.ops.fastopt.roofline_(params, grads, [torch.zeros(5, dtype=torch.bfloat16)])
    for kernels in (torch.ops.fastopt, fastopt.reference):
        with pytest.raises(RuntimeError, match="supported: the params' dtype, float32, bfloat16 or uint8"):
            kernels.sgd_(params, grads, [torch.zeros(5, dtype=torch.float16)], lr=0.1, momentum=0.9,
                         dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                         first_momentum_step=True)
        with pytest.raises(RuntimeError, match="master_params are for float16 / bfloat16"):
            kernels.sgd_(params, grads, [], lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                         nesterov=False, maximize=False, first_momentum_step=False,
                         master_params=[torch.zeros(5)])
    assert torch.equal(params[0], before)
