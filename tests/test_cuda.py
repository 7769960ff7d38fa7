"""The CUDA backend: the registry on CUDA tensors against torch.optim on CUDA,
the reference and the CPU kernels; CUDA graph capture and replay; unaligned,
empty, many and huge tensors.  Every test here needs a GPU and skips cleanly
without one.  (AMP with GradScaler is tested on every device in
test_amp.py.)

Tolerances are those of Note [Parity tolerances] in test_parity.py.  The CUDA
kernels are compiled without multiply-add contraction (--fmad=false), as the
CPU kernels are, and the same code is checked bit for bit against the CPU
kernels on the CPU (ctest cuda_emulated); on the device only the per-step
scalars (double pow) may differ in a last bit, so tolerances stay.
"""
from __future__ import annotations

import functools
import inspect

import pytest
import torch

import fastopt
from registry import (
    DTYPE_NAMES,
    OPTIMIZERS,
    OPTIMIZERS_BY_ID,
    SHAPES,
    GradientFeed,
    ShapeCase,
    make_params,
    run_steps,
    snapshot,
)
from test_parity import (
    FLOAT64_SHAPE_IDS,
    GRAD_SEED,
    K_FUSED_VS_REFERENCE,
    K_LOW_PRECISION,
    K_VS_TORCH,
    LOW_PRECISION_SHAPE_IDS,
    PARAM_SEED,
    STEPS,
    assert_runs_match,
    record,
)

HAS_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")

# Shapes only CUDA needs beyond the registry's: more tensors than one launch
# takes (Note [CUDA driver layout]), and a tensor of several chunks with a
# partial last vector next to tensors of one chunk and one element.
# (Unaligned views are in test_unaligned_views.)
CUDA_SHAPES = {
    "launches-1200": ShapeCase("launches-1200", tuple((1 + (i * 13) % 97,) for i in range(1200))),
    "blocks-3x65536+5": ShapeCase("blocks-3x65536+5", ((3 * 65536 + 5,), (65536,), (1,))),
}
SHAPES_BY_ID = {**{s.id: s for s in SHAPES}, **CUDA_SHAPES}
FLOAT32_SHAPE_IDS = [s.id for s in SHAPES] + list(CUDA_SHAPES)


def test_cuda_kernels_are_built():
    """With a GPU, the extension must carry CUDA kernels (not fall back)."""
    assert "cuda" in fastopt.backends()["fused_devices"], fastopt.backends()


@functools.lru_cache(maxsize=None)
def run(case_id: str, shape_id: str, dtype: torch.dtype, device: str, implementation: str):
    """A recorded run of 10 steps: implementation is "fused" or "reference"
    (fastopt) or "torch" (torch.optim for-loop); float16 / bfloat16 torch
    runs compute in float32 and round on store, as fastopt does."""
    case, shape = OPTIMIZERS_BY_ID[case_id], SHAPES_BY_ID[shape_id]
    low_precision = dtype in (torch.float16, torch.bfloat16)
    compute_dtype = torch.float32 if implementation == "torch" and low_precision else dtype
    params = [torch.nn.Parameter(p.detach().to(compute_dtype))
              for p in make_params(shape, dtype, PARAM_SEED, device)] if compute_dtype != dtype \
        else make_params(shape, dtype, PARAM_SEED, device)
    if implementation == "torch":
        optimizer = case.make_torch(params)
    else:
        optimizer = case.make_fastopt(params, backend=implementation)
    feed = GradientFeed(GRAD_SEED, shape.grad_layout, dtype=dtype)
    run_steps(optimizer, params, feed, STEPS, storage_dtype=dtype if compute_dtype != dtype else None)
    return record(optimizer, params)


def _product(dtype, shape_ids):
    return [pytest.param(case.id, shape_id, dtype, id=f"{case.id}-{shape_id}-{DTYPE_NAMES[dtype]}")
            for case in OPTIMIZERS for shape_id in shape_ids]


ALL_CASES = (_product(torch.float32, FLOAT32_SHAPE_IDS) + _product(torch.float64, FLOAT64_SHAPE_IDS)
             + _product(torch.bfloat16, LOW_PRECISION_SHAPE_IDS)
             + _product(torch.float16, LOW_PRECISION_SHAPE_IDS))


def _k(dtype, k_full):
    return K_LOW_PRECISION if dtype in (torch.float16, torch.bfloat16) else k_full


@pytest.mark.parametrize("case_id, shape_id, dtype", ALL_CASES)
def test_cuda_matches_torch_optim(case_id, shape_id, dtype):
    assert_runs_match(run(case_id, shape_id, dtype, "cuda", "fused"),
                      run(case_id, shape_id, dtype, "cuda", "torch"), _k(dtype, K_VS_TORCH), dtype,
                      check_state_dtype=dtype in (torch.float32, torch.float64))


@pytest.mark.parametrize("case_id, shape_id, dtype", ALL_CASES)
def test_cuda_matches_reference_and_cpu_kernels(case_id, shape_id, dtype):
    cuda = run(case_id, shape_id, dtype, "cuda", "fused")
    assert_runs_match(cuda, run(case_id, shape_id, dtype, "cpu", "reference"),
                      _k(dtype, K_FUSED_VS_REFERENCE), dtype)
    assert_runs_match(cuda, run(case_id, shape_id, dtype, "cpu", "fused"),
                      _k(dtype, K_FUSED_VS_REFERENCE), dtype)


@pytest.mark.parametrize("case_id", [case.id for case in OPTIMIZERS])
def test_unaligned_views(case_id):
    """Params, grads and state at odd element offsets (not 16-byte aligned)
    in one call with aligned ones: the scalar and the vector path agree with
    the CPU kernels."""
    case = OPTIMIZERS_BY_ID[case_id]
    results = []
    for device in ("cuda", "cpu"):
        base = make_params(ShapeCase("bases", ((1001,), (64,), (9,))), torch.float32, PARAM_SEED, device)
        params = [torch.nn.Parameter(base[0].detach()[1:1000]), torch.nn.Parameter(base[1].detach()),
                  torch.nn.Parameter(base[2].detach()[3:4])]
        assert params[0].data_ptr() % 16 != 0
        optimizer = case.make_fastopt(params, backend="fused")
        generator = torch.Generator().manual_seed(GRAD_SEED)
        for _ in range(STEPS):
            for i, p in enumerate(params):
                values = torch.randn(p.numel() + 1, generator=generator).to(device)[1:]
                # params[1] and its grad and state are aligned: the vector path
                p.grad = values.clone() if i == 1 else values
            optimizer.step()
        results.append(record(optimizer, params))
    assert_runs_match(results[0], results[1], K_FUSED_VS_REFERENCE, torch.float32)


# radam-default: the replayed steps 4-8 cross into the rectified update (step 6).
GRAPH_CASES = ["adam-default", "adamw-amsgrad-maximize", "sgd-nesterov-weight_decay",
               "rmsprop-centered-momentum-weight_decay", "adagrad-lr_decay",
               "nadam-decoupled_weight_decay-maximize", "radam-default", "adamax-weight_decay",
               "adadelta-rho-weight_decay"]


@pytest.mark.parametrize("case_id", [c for c in GRAPH_CASES if c in OPTIMIZERS_BY_ID])
def test_cuda_graph_replay_equals_eager(case_id):
    """A step captured in a torch.cuda.CUDAGraph (capturable=True, lr a CUDA
    tensor changed between replays, step counts on the device) replays to
    exactly the params and state of eager steps on the same grads."""
    case = OPTIMIZERS_BY_ID[case_id]
    kwargs = case.make_kwargs()
    lr_value = float(kwargs.pop("lr", 1e-2))
    if "capturable" in inspect.signature(case.torch_cls).parameters:
        kwargs["capturable"] = True
    shape = ShapeCase("graph", ((1023,), (37, 13), (65536 + 3,)))
    grads = [[torch.randn(s, generator=torch.Generator().manual_seed(step * 7 + i)).cuda()
              for i, s in enumerate(shape.shapes)] for step in range(8)]
    lrs = [lr_value * (1 - 0.1 * step) for step in range(8)]

    def setup():
        params = make_params(shape, torch.float32, PARAM_SEED, "cuda")
        lr = torch.tensor(lr_value, device="cuda")
        return params, lr, case.fastopt_cls(params, lr=lr, backend="fused", **kwargs)

    eager_params, eager_lr, eager = setup()
    for step in range(8):
        for p, g in zip(eager_params, grads[step]):
            p.grad = g.clone()
        eager_lr.fill_(lrs[step])
        eager.step()

    params, lr, optimizer = setup()
    for p in params:
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state and step plans exist before capture
        for step in range(3):
            for p, g in zip(params, grads[step]):
                p.grad.copy_(g)
            lr.fill_(lrs[step])
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    for step in range(3, 8):
        for p, g in zip(params, grads[step]):
            p.grad.copy_(g)
        lr.fill_(lrs[step])
        graph.replay()
    torch.cuda.synchronize()
    for actual, expected in zip(snapshot(optimizer, params), snapshot(eager, eager_params)):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key


def test_64_bit_indexing():
    """A tensor of more than 2^31 elements: elements past 2^31 are updated."""
    numel = 2**31 + 7
    needed = numel * 2 * 2  # bfloat16 param and grad
    if torch.cuda.get_device_properties(0).total_memory < 3 * needed:
        pytest.skip("not enough GPU memory for a 2^31-element tensor")
    param = torch.nn.Parameter(torch.zeros(numel, dtype=torch.bfloat16, device="cuda"))
    param.grad = torch.ones_like(param)
    fastopt.SGD([param], lr=0.5, backend="fused").step()
    tail = param.detach()[-(2**20):]
    assert torch.equal(tail, torch.full_like(tail, -0.5))
    assert torch.equal(param.detach()[:16], torch.full((16,), -0.5, dtype=torch.bfloat16, device="cuda"))
    del param
    torch.cuda.empty_cache()
