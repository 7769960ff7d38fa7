"""Exactness (issue #6): a checkpointed run resumes bit for bit in a fresh
process, and results depend neither on the thread count nor on the run.

* Resume: a small model trained ``TOTAL_STEPS`` steps in this process must
  equal, bit for bit (``torch.equal`` on every param and every state tensor,
  ``step`` included), the same model trained ``CHECKPOINT_STEP`` steps,
  saved with ``torch.save`` (model and optimizer ``state_dict``), loaded with
  ``torch.load`` into a freshly built model and optimizer in a *new process*
  and trained the remaining steps.  For every registry case, both backends and
  every dtype.  The steps after the checkpoint run in both processes, so this
  is also process-to-process determinism.  One subprocess runs all cases.
* Threads: the fused step on a many-tensor workload large enough to be split
  over several threads is bit-identical with 1 thread, the default and more
  threads than CI's 2 cores, and when simply run again.
  (tests/test_kernels.py covers the instruction sets, and thread counts on
  one- and few-tensor shapes.)
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastopt
from registry import (
    CPU_MIN_ELEMENTS_PER_THREAD,
    DTYPE_NAMES,
    FLOAT_DTYPES,
    OPTIMIZERS,
    OPTIMIZERS_BY_ID,
    GradientFeed,
    ShapeCase,
    make_params,
    snapshot,
)

TESTS_DIR = Path(__file__).resolve().parent
BACKENDS = ("fused", "reference")

# -- resume in a fresh process --------------------------------------------------------

TOTAL_STEPS = 7
CHECKPOINT_STEP = 3
# A param that first gets a gradient after the checkpoint: its state is
# created lazily in the resumed process, next to state that was loaded.
LATE_PARAM_FIRST_STEP = 5
# The model is far too small for any op (fastopt's or torch's) to split its
# work over threads, but torch's tiny forward / backward ops still open
# OpenMP regions, which cost tens of ms each on an oversubscribed machine;
# one thread keeps the module at a few seconds there.  (Thread counts are
# tested on a workload that is split, below.)
RESUME_THREADS = 1
MODEL_SEED = 17
DATA_SEED = 1000
BATCH, IN_FEATURES, HIDDEN, CLASSES = 32, 12, 16, 5


class TinyNet(nn.Module):
    """A two-layer MLP with a transposed (dense, non-contiguous) weight and a
    bias that joins the loss only from ``LATE_PARAM_FIRST_STEP`` on."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(MODEL_SEED)

        def randn(*shape, scale):
            return (torch.randn(shape, generator=generator) * scale).to(dtype)

        self.w1 = nn.Parameter(randn(HIDDEN, IN_FEATURES, scale=0.3))
        self.b1 = nn.Parameter(randn(HIDDEN, scale=0.1))
        self.w2 = nn.Parameter(randn(HIDDEN, CLASSES, scale=0.3).t())  # stride (1, CLASSES)
        self.b2 = nn.Parameter(randn(CLASSES, scale=0.1))
        self.late_bias = nn.Parameter(randn(CLASSES, scale=0.1))

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        out = F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)
        return out + self.late_bias if step >= LATE_PARAM_FIRST_STEP else out


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The minibatch of step ``step`` (0-based): a function of the step alone,
    so that a resumed process draws exactly what the original one did."""
    generator = torch.Generator().manual_seed(DATA_SEED + step)
    x = torch.randn(BATCH, IN_FEATURES, generator=generator).to(dtype)
    y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return x, y


def make_optimizer(case_id: str, model: TinyNet, backend: str) -> torch.optim.Optimizer:
    """Two param groups, weights with the case's hyperparameters and biases
    without weight decay (a common setup; it also checkpoints two groups)."""
    groups = [{"params": [model.w1, model.w2]},
              {"params": [model.b1, model.b2, model.late_bias], "weight_decay": 0.0}]
    return OPTIMIZERS_BY_ID[case_id].make_fastopt(groups, backend=backend)


def train(model: TinyNet, optimizer: torch.optim.Optimizer, dtype: torch.dtype, first: int, stop: int) -> None:
    for step in range(first, stop):
        x, y = batch(step, dtype)
        optimizer.zero_grad()
        # Summed, not averaged: with mean-sized gradients (~1e-2) centered
        # RMSprop's float16 state underflows ((1 - alpha) * g * g is subnormal)
        # and square_avg - grad_avg**2 turns negative, giving NaN (torch.optim
        # does the same in float16), and NaN would make torch.equal fail.
        F.cross_entropy(model(x, step).float(), y, reduction="sum").backward()
        optimizer.step()


def model_snapshot(model: TinyNet, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Copies of every param and state tensor, named "<param>" / "<param>.<state key>"."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach().clone()
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[f"{name}.{key}"] = value.detach().clone()
    return out


RESUME_CASES = [(case.id, backend, dtype) for case in OPTIMIZERS for backend in BACKENDS for dtype in FLOAT_DTYPES]


def case_name(case_id: str, backend: str, dtype: torch.dtype) -> str:
    return f"{case_id}-{backend}-{DTYPE_NAMES[dtype]}"


def resume_in_this_process(directory: Path) -> None:
    """What the subprocess runs (``_RESUME_SCRIPT``): for every case, load
    the checkpoint into a new model and optimizer, train the remaining steps
    and save the end state."""
    results = {}
    for case_id, backend, dtype in RESUME_CASES:
        name = case_name(case_id, backend, dtype)
        checkpoint = torch.load(directory / f"{name}.pt")
        model = TinyNet(dtype)
        optimizer = make_optimizer(case_id, model, backend)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        train(model, optimizer, dtype, CHECKPOINT_STEP, TOTAL_STEPS)
        results[name] = model_snapshot(model, optimizer)
    torch.save(results, directory / "results.pt")


# argv: the tests folder, the folder that holds the fastopt this process
# imported (so the subprocess tests the same build), the checkpoint folder.
_RESUME_SCRIPT = """
import sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import torch
import test_exactness
torch.set_num_threads(test_exactness.RESUME_THREADS)
test_exactness.resume_in_this_process(Path(sys.argv[3]))
"""


@pytest.fixture(scope="module")
def resume_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(RESUME_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, resume_threads):
    """This process: every case trained to the checkpoint (saved), then on to
    the end.  A subprocess: every case resumed from its checkpoint.  Returns
    {case: {"checkpoint", "expected", "resumed"}} (snapshots)."""
    directory = tmp_path_factory.mktemp("resume")
    runs = {}
    for case_id, backend, dtype in RESUME_CASES:
        name = case_name(case_id, backend, dtype)
        model = TinyNet(dtype)
        optimizer = make_optimizer(case_id, model, backend)
        train(model, optimizer, dtype, 0, CHECKPOINT_STEP)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, directory / f"{name}.pt")
        checkpoint = model_snapshot(model, optimizer)
        train(model, optimizer, dtype, CHECKPOINT_STEP, TOTAL_STEPS)
        runs[name] = {"checkpoint": checkpoint, "expected": model_snapshot(model, optimizer)}
    fastopt_root = Path(fastopt.__file__).resolve().parent.parent
    process = subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, str(TESTS_DIR), str(fastopt_root), str(directory)],
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    for name, resumed in torch.load(directory / "results.pt").items():
        runs[name]["resumed"] = resumed
    return runs


def assert_snapshots_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(actual) == sorted(expected), f"{what}: different params / state keys"
    for key, e in expected.items():
        a = actual[key]
        assert a.dtype == e.dtype and a.shape == e.shape and a.stride() == e.stride(), (
            f"{what}: {key} is {a.dtype} {tuple(a.shape)} stride {a.stride()}, "
            f"expected {e.dtype} {tuple(e.shape)} stride {e.stride()}")
        assert torch.equal(a, e), (
            f"{what}: {key} differs in {(a != e).sum().item()} of {e.numel()} elements "
            f"(max abs difference {(a.double() - e.double()).abs().max().item():.3g})")


@pytest.mark.parametrize("case_id, backend, dtype", [
    pytest.param(*case, id=case_name(*case)) for case in RESUME_CASES])
def test_resume_in_fresh_process_is_bit_exact(resume_runs, case_id, backend, dtype):
    run = resume_runs[case_name(case_id, backend, dtype)]
    expected = run["expected"]
    # Not vacuous: the steps after the checkpoint move every param, and the
    # late bias gets its state only after the checkpoint (plain SGD and LARS
    # without momentum keep none; Adagrad, like torch's, creates its state in
    # the constructor).
    for name in ("w1", "b1", "w2", "b2", "late_bias"):
        assert not torch.equal(expected[name], run["checkpoint"][name]), f"{name} did not move after the checkpoint"
    has_state = case_id not in ("sgd-plain", "lars-no_momentum-eps-maximize")
    for name in ("w1", "b1", "w2", "b2", "late_bias"):
        assert any(key.startswith(f"{name}.") for key in expected) == has_state, f"{name}: state keys"
    if not case_id.startswith("adagrad"):
        assert not any(key.startswith("late_bias.") for key in run["checkpoint"])
    assert all(torch.isfinite(t).all() for t in expected.values()), "non-finite values (torch.equal fails on NaN)"
    assert_snapshots_equal(run["resumed"], expected, "resumed in a new process vs uninterrupted")



# -- thread count and rerun on many tensors -----------------------------------------------

def _many_tensor_shapes(count: int = 300) -> tuple[tuple[int, ...], ...]:
    """``count`` tensors of 1 .. 1201 elements (every fourth 2-D), ~190k
    elements in all: 11 chunks of CPU_MIN_ELEMENTS_PER_THREAD, so that every
    thread count up to 11 splits the step, with boundaries inside tensors;
    and more than one task of the per-tensor passes (kCpuParamsPerTask = 256
    params)."""
    shapes = []
    for i in range(count):
        n = 1 + (i * 389) % 1201
        shapes.append((n,) if i % 4 else (1 + i % 3, n))
    return tuple(shapes)


MANY_TENSORS = ShapeCase("many-tensors-multithread", _many_tensor_shapes())
THREAD_STEPS = 2  # the first step creates state (SGD's momentum copies the grad), the second uses it


@pytest.fixture(scope="module")
def many_tensor_inputs():
    """Per dtype: the initial params and each step's grads, drawn once (the
    runs below differ only in the thread count)."""
    inputs = {}
    for dtype in FLOAT_DTYPES:
        params = make_params(MANY_TENSORS, dtype, seed=31)
        feed = GradientFeed(seed=32)
        inputs[dtype] = (params, [feed.set_grads(params) for _ in range(THREAD_STEPS)])
    return inputs


def _run_all_fused(params, grads) -> dict[str, list[torch.Tensor]]:
    """Every registry case from ``params`` on ``grads``; per case the params
    and state tensors, each key's tensors flattened into one."""
    results = {}
    for case in OPTIMIZERS:
        run_params = [nn.Parameter(p.detach().clone()) for p in params]
        optimizer = case.make_fastopt(run_params, backend="fused")
        for step_grads in grads:
            for p, g in zip(run_params, step_grads):
                p.grad = g
            optimizer.step()
        entries = snapshot(optimizer, run_params)
        keys = dict.fromkeys(key for entry in entries for key in entry)  # Adafactor's differ by param
        results[case.id] = {key: torch.cat([entry[key].reshape(-1) for entry in entries if key in entry])
                            for key in keys}
    return results


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=[DTYPE_NAMES[d] for d in FLOAT_DTYPES])
def test_many_tensors_independent_of_thread_count_and_run(restore_threads, many_tensor_inputs, dtype):
    """1 thread, the default, 3 threads (more chunk boundaries than CI's 2
    cores), and the default once more: bit-identical, for every registry
    case."""
    assert MANY_TENSORS.numel > 8 * CPU_MIN_ELEMENTS_PER_THREAD
    params, grads = many_tensor_inputs[dtype]
    default_threads = restore_threads
    torch.set_num_threads(1)
    expected = _run_all_fused(params, grads)
    for threads in sorted({default_threads, 3}) + [default_threads]:
        torch.set_num_threads(threads)
        actual = _run_all_fused(params, grads)
        for case_id, values in expected.items():
            assert actual[case_id].keys() == values.keys()
            for key, e in values.items():
                a = actual[case_id][key]
                assert torch.equal(a, e), (f"{case_id} {key}: {threads} threads vs 1 thread differ in "
                                           f"{(a != e).sum().item()} of {e.numel()} elements")
