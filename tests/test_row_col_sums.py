"""fastopt::row_col_sq_means_, the reduction phase per row and column (Note
[Row and column sums] in csrc/rules/row_col_sums.h) that Adafactor's
factored step starts with: the compiled op against the reference bit for
bit, both against the means of (g / grad_scale)**2 taken in float64, the
same bits for any thread count, and bad input refused before any output is
written.  The emulated CUDA kernels are compared with the CPU op in
csrc/tests/test_cuda_emulated.cpp.
"""
from __future__ import annotations

import pytest
import torch

import fastopt
from fastopt import reference

COMPILED = "cpu" in fastopt.backends()["fused_devices"]
OPS = {"fused": getattr(torch.ops.fastopt, "row_col_sq_means_", None), "reference": reference.row_col_sq_means_}
BACKENDS = ["fused", "reference"] if COMPILED else ["reference"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Single rows and columns, odd sizes, a batch dim, several column chunks
# (300 x 70: 18 rows per chunk; 40 x 20000: 7 rows), rows
# longer than the 16 lanes with a remainder, and matrices without elements.
SHAPES = [(1, 1), (3, 5), (7, 33), (2, 3, 17), (300, 70), (40, 20000), (2, 2, 1, 130), (0, 5), (5, 0), (2, 0, 3)]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grads(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Scales spread over rows and columns, as real grads have.
    return [(torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator).add(0.1) * 3).to(dtype)
            for shape in SHAPES]


def _outputs(grads: list[torch.Tensor], fill: float = 7.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    def shaped(g, dim):
        shape = list(g.shape)
        shape[dim] = 1
        return torch.full(shape, fill, dtype=_opmath(g.dtype))
    return [shaped(g, -1) for g in grads], [shaped(g, -2) for g in grads]


def _run(backend: str, grads, grad_scale=None):
    rows, cols = _outputs(grads)
    OPS[backend](grads, rows, cols, grad_scale=grad_scale)
    return rows, cols


def _assert_bits(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e) or torch.equal(a.isnan(), e.isnan()) and torch.equal(a.nan_to_num(), e.nan_to_num())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale"])
def test_means_of_squares(backend, dtype, scaled):
    grads = _grads(dtype)
    before = [g.clone() for g in grads]
    grad_scale = torch.tensor(1.7, dtype=torch.float64) if scaled else None
    rows, cols = _run(backend, grads, grad_scale)
    for g, row, col in zip(grads, rows, cols):
        squares = (g.to(_opmath(dtype)) / (1.7 if scaled else 1.0)).double().square()
        rtol = 1e-13 if dtype == torch.float64 else 1e-6
        for means, dim in ((row, -1), (col, -2)):
            expected = squares.mean(dim=dim, keepdim=True)
            if g.numel() == 0:  # a mean over nothing is NaN, as torch's
                assert means.isnan().all()
                continue
            torch.testing.assert_close(means.double(), expected, rtol=rtol, atol=0)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))


@pytest.mark.skipif(not COMPILED, reason="fastopt._C is not loaded")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_the_reference_bit_for_bit(dtype):
    grads = _grads(dtype, seed=1)
    grads.append(torch.randn(33, 70, generator=torch.Generator().manual_seed(2)).to(dtype).t())  # not contiguous
    grads.append(torch.randn(4, 9, 50, dtype=torch.float64).to(dtype)[:, ::2])  # strided rows
    scale = torch.tensor(0.37, dtype=torch.float32)
    for grad_scale in (None, scale):
        fused, ref = _run("fused", grads, grad_scale), _run("reference", grads, grad_scale)
        _assert_bits(fused[0], ref[0])
        _assert_bits(fused[1], ref[1])


@pytest.mark.skipif(not COMPILED, reason="fastopt._C is not loaded")
def test_same_bits_for_any_thread_count():
    grads = _grads(torch.float32, seed=3) + [torch.randn(2000, 700), torch.randn(5, 3, 40000)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run("fused", grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        _assert_bits(other[0], results[0][0])
        _assert_bits(other[1], results[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_and_nan_reach_their_row_and_column_only(backend):
    grad = torch.randn(4, 6)
    grad[1, 2] = float("inf")
    grad[3, 4] = float("nan")
    (row,), (col,) = _run(backend, [grad])
    assert row[1].isinf() and row[3].isnan() and row[[0, 2]].isfinite().all()
    assert col[0, 2].isinf() and col[0, 4].isnan() and col[0, [0, 1, 3, 5]].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["col shape", "row dtype", "row not contiguous", "grad 1-D", "grad int",
                                 "lengths", "grad_scale"])
def test_bad_input_is_refused_before_any_output_is_written(backend, bad):
    grads = [torch.randn(3, 4), torch.randn(2, 5, 6)]
    rows, cols = _outputs(grads)
    grad_scale = None
    match = {"col shape": r"col_means\[1\]", "row dtype": r"row_means\[0\]", "row not contiguous": r"row_means\[1\]",
             "grad 1-D": r"grads\[1\]", "grad int": r"grads\[0\]", "lengths": "one of each per grad",
             "grad_scale": "grad_scale"}[bad]
    if bad == "col shape":
        cols[1] = torch.zeros(2, 1, 5)
    elif bad == "row dtype":
        rows[0] = rows[0].double()
    elif bad == "row not contiguous":
        rows[1] = torch.zeros(5, 2, 1).transpose(0, 1)
    elif bad == "grad 1-D":
        grads[1], rows[1], cols[1] = torch.randn(6), torch.zeros(1), torch.zeros(6)
    elif bad == "grad int":
        grads[0] = torch.ones(3, 4, dtype=torch.int32)
    elif bad == "lengths":
        cols = cols[:1]
    else:
        grad_scale = torch.ones(2)
    written = [t.clone() for t in rows + cols]
    with pytest.raises(RuntimeError, match=match):
        OPS[backend](grads, rows, cols, grad_scale=grad_scale)
    assert all(torch.equal(t, w) for t, w in zip(rows + cols, written))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_call_does_nothing(backend):
    OPS[backend]([], [], [])
