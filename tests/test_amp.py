"""AMP: ``torch.amp.GradScaler.step`` hands fastopt's optimizers
``grad_scale`` and ``found_inf`` (they advertise
``_step_supports_amp_scaling``).  The kernels divide the grads by the scale in
registers, and a step with an inf or NaN in any grad changes nothing: params,
state and step counts stay bit-identical.  The oracle is torch.optim's
for-loop step driven by the same GradScaler, which unscales the grads in
place and skips the step; with the scaler's power-of-two scales both see the
same unscaled values.
"""
from __future__ import annotations

import pytest
import torch

from registry import OPTIMIZERS, OPTIMIZERS_BY_ID, ShapeCase, make_params, snapshot
from test_parity import K_VS_TORCH, PARAM_SEED, assert_runs_match, record

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="no CUDA device"))]
BACKENDS = ["fused", "reference"]
SHAPE = ShapeCase("amp", ((1023,), (37, 13), (1,)))
STEPS = 6
INF_STEP = 2  # this step's loss is inf: the scaler skips it and halves its scale


def grads_of_step(step: int, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(shape, generator=generator).to(device) for shape in SHAPE.shapes]
    if step == INF_STEP:
        grads[1][3, 4] = float("inf")
    return grads


def scaled_step(optimizer, scaler, params, step: int) -> None:
    """backward of sum(p * g) through the scaler: p.grad = g * scale."""
    optimizer.zero_grad(set_to_none=True)
    loss = sum((p * g).sum() for p, g in zip(params, grads_of_step(step, params[0].device.type)))
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_id", [case.id for case in OPTIMIZERS])
def test_grad_scaler_matches_torch_optim(case_id, device, backend):
    case = OPTIMIZERS_BY_ID[case_id]
    fast_params = make_params(SHAPE, torch.float32, PARAM_SEED, device)
    torch_params = make_params(SHAPE, torch.float32, PARAM_SEED, device)
    fast, oracle = case.make_fastopt(fast_params, backend=backend), case.make_torch(torch_params)
    fast_scaler, torch_scaler = torch.amp.GradScaler(device), torch.amp.GradScaler(device)
    for step in range(STEPS):
        scaled_step(oracle, torch_scaler, torch_params, step)
        if step == INF_STEP:
            before = snapshot(fast, fast_params)
        scaled_step(fast, fast_scaler, fast_params, step)
        if step == INF_STEP:
            after = snapshot(fast, fast_params)
            assert [e.keys() for e in after] == [e.keys() for e in before]
            for b, a in zip(before, after):
                for key in b:
                    assert torch.equal(a[key], b[key]), f"{key} changed by a step with found_inf"
    assert fast_scaler.get_scale() == torch_scaler.get_scale() == 2.0**16 / 2
    assert_runs_match(record(fast, fast_params), record(oracle, torch_params), K_VS_TORCH, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_grads_are_unscaled_in_registers_not_rewritten(device, backend):
    """fastopt reads grad / scale but leaves p.grad as the scaler left it."""
    params = make_params(SHAPE, torch.float32, PARAM_SEED, device)
    optimizer = OPTIMIZERS_BY_ID["adam-default"].make_fastopt(params, backend=backend)
    scaler = torch.amp.GradScaler(device)
    loss = sum((p * g).sum() for p, g in zip(params, grads_of_step(0, device)))
    scaler.scale(loss).backward()
    scaled = [p.grad.clone() for p in params]
    scaler.step(optimizer)
    for p, g, raw in zip(params, scaled, grads_of_step(0, device)):
        assert torch.equal(p.grad, g)
        torch.testing.assert_close(g, raw * 2.0**16, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_on_the_op_level(backend):
    """The ops themselves: found_inf = 1 leaves params, state and steps
    untouched; found_inf = 0 with grad_scale = 4 equals grads / 4."""
    import fastopt
    kernels = torch.ops.fastopt if backend == "fused" else fastopt.reference
    generator = torch.Generator().manual_seed(7)
    params = [torch.randn(33, generator=generator), torch.randn(5, 3, generator=generator)]
    grads = [torch.randn_like(p) * 4 for p in params]
    exp_avgs = [torch.rand_like(p) for p in params]
    exp_avg_sqs = [torch.rand_like(p) for p in params]
    steps = [torch.tensor(3.0), torch.tensor(3.0)]
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                 amsgrad=False, maximize=False)
    tensors = [params, exp_avgs, exp_avg_sqs, steps]
    before = [[t.clone() for t in ts] for ts in tensors]
    kernels.adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, **hyper,
                  grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    for ts, bs in zip(tensors, before):
        assert all(torch.equal(t, b) for t, b in zip(ts, bs))
    expected = [[t.clone() for t in ts] for ts in tensors]
    kernels.adam_(expected[0], [g / 4 for g in grads], expected[1], expected[2], [], expected[3], **hyper)
    kernels.adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, **hyper,
                  grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    for ts, es in zip(tensors, expected):
        assert all(torch.equal(t, e) for t, e in zip(ts, es))
