"""The compiled CPU kernels: identical results across instruction sets and
thread counts, the ops' validation (before any mutation), the roofline op,
memory outside a non-dense param left alone, and the choice of backend."""
from __future__ import annotations

import inspect

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastopt
from fastopt import _extension, reference
from registry import (
    DTYPE_NAMES,
    CPU_MIN_ELEMENTS_PER_THREAD,
    FLOAT_DTYPES,
    OPTIMIZERS,
    PARAM_GAP_FILL,
    SHAPES_BY_ID,
    GradientFeed,
    ShapeCase,
    make_params,
    run_steps,
    snapshot,
)

TESTS_DIR = Path(__file__).resolve().parent

# Odd sizes: vector body plus scalar tail for every vector width.
KERNEL_SHAPES = ShapeCase("kernel-mix", ((1,), (7,), (33,), (1023,), (37, 13), (4099,)))
KERNEL_STEPS = 5


def _run_all_fused(shape: ShapeCase, steps: int, dtypes=FLOAT_DTYPES) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Every registry case × dtype on the fused backend, from fixed seeds."""
    results = {}
    for case in OPTIMIZERS:
        for dtype in dtypes:
            params = make_params(shape, dtype, seed=11)
            optimizer = case.make_fastopt(params, backend="fused")
            run_steps(optimizer, params, GradientFeed(seed=12, layout=shape.grad_layout), steps)
            results[f"{case.id}/{DTYPE_NAMES[dtype]}"] = snapshot(optimizer, params)
    return results


def assert_bit_identical(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        for index, (a, e) in enumerate(zip(actual[name], expected[name])):
            assert a.keys() == e.keys(), f"{what}: {name} params[{index}] state keys differ"
            for key in e:
                assert a[key].dtype == e[key].dtype
                assert torch.equal(a[key], e[key]), (
                    f"{what}: {name} params[{index}] {key} differs in "
                    f"{(a[key] != e[key]).sum().item()} of {e[key].numel()} elements"
                )


# -- (a) every ISA rounds identically ---------------------------------------------

_ISA_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import torch, fastopt
import test_kernels
results = test_kernels._run_all_fused(test_kernels.KERNEL_SHAPES, test_kernels.KERNEL_STEPS)
torch.save({"capability": fastopt.backends()["cpu_capability"], "results": results}, sys.argv[2])
"""


def _start_with_isa(isa: str | None, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTOPT_CPU_CAPABILITY", "FASTOPT_BACKEND")}
    if isa is not None:
        env["FASTOPT_CPU_CAPABILITY"] = isa
    return subprocess.Popen([sys.executable, "-c", _ISA_SCRIPT, str(TESTS_DIR), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def isa_runs(tmp_path_factory):
    """The same seeded steps in one process per FASTOPT_CPU_CAPABILITY
    (read once per process, so each needs its own)."""
    directory = tmp_path_factory.mktemp("isa")
    started = {}
    for isa in ("baseline", "avx2", None):
        name = isa or "default"
        started[name] = (_start_with_isa(isa, directory / f"{name}.pt"), directory / f"{name}.pt")
    runs = {}
    for name, (process, out) in started.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {stderr[-4000:]}"
        runs[name] = torch.load(out)
    return runs


def test_isa_override_is_reported(isa_runs):
    assert isa_runs["baseline"]["capability"] == "baseline"
    assert isa_runs["default"]["capability"] in ("baseline", "avx2", "avx512")
    # Lowering to avx2 gives avx2 exactly when the CPU has at least avx2.
    expected_avx2 = "baseline" if isa_runs["default"]["capability"] == "baseline" else "avx2"
    assert isa_runs["avx2"]["capability"] == expected_avx2


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_isas_round_identically(isa_runs, isa):
    """-ffp-contract=off: AVX-512, AVX2 and the baseline loop give the same
    bits for every optimizer variant and dtype."""
    run = isa_runs[isa]
    if run["capability"] == "baseline" or (isa == "default" and run["capability"] == isa_runs["avx2"]["capability"]):
        pytest.skip(f"this CPU runs {isa!r} as {run['capability']!r}: nothing new to compare")
    assert_bit_identical(run["results"], isa_runs["baseline"]["results"], f"{run['capability']} vs baseline")


# -- (b) the thread split does not change results ----------------------------------

@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape_id", ["chunks-70001", "chunks-mixed-list"])
def test_thread_count_does_not_change_results(restore_threads, shape_id):
    """One thread vs the default vs more threads than cores (more chunk
    boundaries, each inside a tensor): bit-identical.  (float32 and bfloat16:
    the split does not depend on the dtype, and the ISA test covers the rest.)"""
    shape = SHAPES_BY_ID[shape_id]
    assert shape.numel > 2 * CPU_MIN_ELEMENTS_PER_THREAD
    default_threads = torch.get_num_threads()
    runs = {}
    for threads in sorted({1, default_threads, 3}):
        torch.set_num_threads(threads)
        runs[threads] = _run_all_fused(shape, steps=3, dtypes=(torch.float32, torch.bfloat16))
    for threads, run in runs.items():
        if threads != 1:
            assert_bit_identical(run, runs[1], f"{threads} threads vs 1")


# -- (c) the ops validate everything before changing anything ----------------------

# One valid call per op: the positional tensor lists in schema order (those
# after "params" and "grads" are state), and keyword hyperparameters that use
# every list.
OP_SPECS = {
    "adam_": (["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"],
              dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                   decoupled_weight_decay=False, amsgrad=True, maximize=False)),
    "sgd_": (["params", "grads", "momentum_buffers"],
             dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False,
                  first_momentum_step=False)),
    "rmsprop_": (["params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps"],
                 dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.01, momentum=0.9, centered=True,
                      maximize=False)),
    "adagrad_": (["params", "grads", "state_sums", "state_steps"],
                 dict(lr=1e-2, lr_decay=0.01, weight_decay=0.01, eps=1e-10, maximize=False)),
    "asgd_": (["params", "grads", "axs", "state_steps", "etas", "mus"],
              dict(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1.0, weight_decay=0.01, maximize=False)),
    "rprop_": (["params", "grads", "prevs", "step_sizes", "state_steps"],
               dict(lr=1e-2, etaminus=0.5, etaplus=1.2, step_size_min=1e-6, step_size_max=50.0, maximize=False)),
    "lion_": (["params", "grads", "exp_avgs"],
              dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.01, maximize=False)),
    "adopt_": (["params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps"],
               dict(lr=1e-2, beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=0.01, decoupled_weight_decay=False,
                    clip_normalized_grad=True, maximize=False)),
    "nadam_": (["params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps", "mu_products"],
               dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, momentum_decay=4e-3,
                    decoupled_weight_decay=False, maximize=False)),
    "radam_": (["params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps"],
               dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled_weight_decay=True,
                    maximize=False)),
    "adabound_": (["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"],
                  dict(lr=1e-2, beta1=0.9, beta2=0.999, final_lr=0.1, base_lr=1e-2, gamma=0.3, eps=1e-8,
                       weight_decay=0.01, amsbound=True, maximize=False)),
    "qhadam_": (["params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps"],
                dict(lr=1e-2, beta1=0.9, beta2=0.999, nu1=0.7, nu2=0.9, eps=1e-8, weight_decay=0.01,
                     decouple_weight_decay=False, maximize=False)),
    "aggmo_": (["params", "grads", "momentum_buffers_0", "momentum_buffers_1", "momentum_buffers_2"],
               dict(lr=1e-2, beta1=0.0, beta2=0.9, beta3=0.99, num_betas=3.0, weight_decay=0.01, maximize=False)),
    "adamax_": (["params", "grads", "exp_avgs", "exp_infs", "state_steps"],
                dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False)),
    "adadelta_": (["params", "grads", "square_avgs", "acc_deltas", "state_steps"],
                  dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.01, maximize=False)),
    "lamb_": (["params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps"],
              dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                   adam_w_mode=True, grad_averaging=True, use_nvlamb=False, maximize=False)),
    "lars_": (["params", "grads", "momentum_buffers"],
              dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.01, trust_coefficient=1e-3, eps=1e-8,
                   nesterov=True, adapt=True, maximize=False)),
    # Muon's two passes (fastopt/muon.py): the momentum writes its params (the
    # updates to orthogonalize), the update reads orthogonalized updates as grads.
    "muon_momentum_": (["params", "grads", "momentum_buffers"],
                       dict(lr=0.0, momentum=0.95, nesterov=True, maximize=False)),
    "muon_update_": (["params", "grads"], dict(lr=1e-2, weight_decay=0.1, lr_ratio=1.5, maximize=False)),
    "adafactor_": (["params", "grads", "variances", "state_steps"],
                   dict(lr=1e-2, beta2_decay=-0.8, eps1=1e-3, eps2=1e-3, d=1.0, weight_decay=0.01, factored=False,
                        maximize=False)),
    # In the Adam phase (switched 0): the reduction phase stores its sums.
    "swats_": (["params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps", "switched", "sgd_lrs", "lr_avgs",
                "update_sqs", "update_dot_grads"],
               dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-9, weight_decay=0.01, maximize=False)),
}
# The per-tensor scalar-state lists of the ops (one-element float tensors) and
# the value each holds in the valid calls: steps after 3 steps, NAdam's
# mu_product then (~0.45^3), ASGD's eta and mu as a previous step left them
# (mu < 1: the average moves).
SCALAR_STATE_VALUES = {"state_steps": 3.0, "mu_products": 0.1, "etas": 0.05, "mus": 0.5, "switched": 0.0,
                       "sgd_lrs": 0.0, "lr_avgs": 0.002, "update_sqs": 0.3, "update_dot_grads": -0.2}
# Scalar states an op reads and keeps (SWATS's group states, which its
# optimizer changes after the op: Note [SWATS's switch] in fastopt/swats.py).
CARRIED_STATES = {"switched", "sgd_lrs", "lr_avgs"}
OP_SHAPES = [(5,), (3, 4), (7,)]  # the bad entry is always the last one, index 2
KERNELS = {"fused": lambda: torch.ops.fastopt, "reference": lambda: reference}


def _op_lists(op: str, dtype=torch.float32) -> dict[str, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    lists = {}
    for name in OP_SPECS[op][0]:
        if name in SCALAR_STATE_VALUES:
            lists[name] = [torch.tensor(SCALAR_STATE_VALUES[name]) for _ in OP_SHAPES]
        else:
            values = [torch.randn(shape, generator=generator).to(dtype) for shape in OP_SHAPES]
            # Second moments, Adamax's infinity norm, Adadelta's accumulated
            # updates and Rprop's step sizes must be positive, and square_avg >= grad_avg**2.
            positive = ("exp_avg_sqs", "square_avgs", "state_sums", "exp_infs", "acc_deltas", "step_sizes")
            lists[name] = [v.abs() + 1 if name in positive else v for v in values]
    if "max_exp_avg_sqs" in lists:  # below exp_avg_sq, so that the call raises it
        lists["max_exp_avg_sqs"] = [v * 0.5 for v in lists["exp_avg_sqs"]]
    if "grad_avgs" in lists:  # square_avg - grad_avg**2 > 0
        lists["grad_avgs"] = [v * 0.1 for v in lists["grad_avgs"]]
    if "prevs" in lists:  # the grads' signs again: every Rprop element moves (a sign change would not)
        lists["prevs"] = [g * 0.5 for g in lists["grads"]]
    return lists


def _call(kernels, op: str, lists: dict[str, list[torch.Tensor]], **hyper_changes) -> None:
    names, hyper = OP_SPECS[op]
    getattr(kernels, op)(*[lists[name] for name in names], **{**hyper, **hyper_changes})


def _copy(lists):
    return {name: [t.clone() for t in tensors] for name, tensors in lists.items()}


def _assert_untouched(lists, before) -> None:
    for name, tensors in before.items():
        for index, (t, b) in enumerate(zip(lists[name], tensors)):
            assert torch.equal(t, b), f"{name}[{index}] changed although the call failed"


def _bad_calls(op: str):
    """(id, edit of the lists, the message the error must contain)."""
    names = OP_SPECS[op][0]
    state = [n for n in names if n not in ("params", "grads")]
    slots = [n for n in state if n not in SCALAR_STATE_VALUES]
    cases = []
    for name in names[1:]:
        cases.append((f"short-{name}", lambda lists, n=name: lists[n].pop(),
                      rf"got 3 params but 2 {name}\b"))
    cases.append(("grad-shape", lambda lists: lists["grads"].__setitem__(2, torch.randn(8)),
                  r"grads\[2\] has shape"))
    for name in slots:
        cases.append((f"{name}-dtype",
                      lambda lists, n=name: lists[n].__setitem__(2, lists[n][2].double()),
                      rf"{name}\[2\] has dtype"))
        cases.append((f"{name}-shape",
                      lambda lists, n=name: lists[n].__setitem__(2, lists[n][2].reshape(1, 7)),
                      rf"{name}\[2\] has shape"))
    cases.append(("grad-dtype", lambda lists: lists["grads"].__setitem__(2, lists["grads"][2].half()),
                  r"grads\[2\] has dtype"))
    cases.append(("param-dtype-mix", lambda lists: [lists[n].__setitem__(2, lists[n][2].double())
                                                    for n in names if n not in SCALAR_STATE_VALUES],
                  r"params\[2\] has dtype torch.float64|params\[2\] has dtype Double"))
    for name in state:
        if name in SCALAR_STATE_VALUES:
            cases.append((f"{name}-int", lambda lists, n=name: lists[n].__setitem__(2, torch.tensor(3)),
                          rf"{name}\[2\] must be"))
            cases.append((f"{name}-two-elements",
                          lambda lists, n=name: lists[n].__setitem__(2, torch.tensor([3.0, 3.0])),
                          rf"{name}\[2\] must be"))
    return [pytest.param(op, edit, pattern, id=f"{op}-{case_id}") for case_id, edit, pattern in cases]


@pytest.mark.parametrize("backend", list(KERNELS))
@pytest.mark.parametrize("op, edit, pattern", [p for op in OP_SPECS for p in _bad_calls(op)])
def test_op_rejects_bad_lists_without_mutating(backend, op, edit, pattern):
    lists = _op_lists(op)
    edit(lists)
    before = _copy(lists)
    with pytest.raises(RuntimeError, match=pattern):
        _call(KERNELS[backend](), op, lists)
    _assert_untouched(lists, before)


@pytest.mark.parametrize("backend", list(KERNELS))
@pytest.mark.parametrize("op", list(OP_SPECS))
def test_op_valid_call_mutates(backend, op):
    """The calls the tests above break are valid: every param and state
    list changes, steps advance by one."""
    lists = _op_lists(op)
    before = _copy(lists)
    _call(KERNELS[backend](), op, lists)
    for name, tensors in lists.items():
        assert all(torch.isfinite(t).all() for t in tensors), name
        if name == "grads":
            assert all(torch.equal(t, b) for t, b in zip(tensors, before[name]))
        elif name == "state_steps":
            assert [t.item() for t in tensors] == [4.0] * len(OP_SHAPES)
        elif name in CARRIED_STATES:
            assert all(torch.equal(t, b) for t, b in zip(tensors, before[name])), name
        elif name in SCALAR_STATE_VALUES:  # ASGD's eta and mu for the next step
            assert all(t.item() != SCALAR_STATE_VALUES[name] for t in tensors), name
        else:
            for index, (t, b) in enumerate(zip(tensors, before[name])):
                assert (t != b).all(), f"{name}[{index}] has unchanged elements"


@pytest.mark.parametrize("op", list(OP_SPECS))
def test_reference_accepts_empty_lists(op):
    """(The compiled ops cannot be called with only empty lists: with no
    tensor argument the dispatcher finds no kernel, exactly as for torch's
    own ``torch._fused_adam_``.  The optimizers never make such a call.)"""
    _call(reference, op, {name: [] for name in OP_SPECS[op][0]})


@pytest.mark.parametrize("backend", list(KERNELS))
@pytest.mark.parametrize("op", [op for op, (names, _) in OP_SPECS.items() if "state_steps" in names])
def test_op_float64_steps_give_the_same_update(backend, op):
    """Step counts may be float64 tensors (a state_dict from elsewhere): they
    advance and give the same update as float32 counts."""
    kernels = KERNELS[backend]()
    lists32, lists64 = _op_lists(op), _op_lists(op)
    lists64["state_steps"] = [t.double() for t in lists64["state_steps"]]
    _call(kernels, op, lists32)
    _call(kernels, op, lists64)
    assert [t.item() for t in lists64["state_steps"]] == [4.0] * len(OP_SHAPES)
    assert all(t.dtype == torch.float64 for t in lists64["state_steps"])
    for name in lists32:
        if name != "state_steps":
            for index, (a, b) in enumerate(zip(lists64[name], lists32[name])):
                assert torch.equal(a, b), f"{name}[{index}]"


@pytest.mark.parametrize("backend", list(KERNELS))
def test_op_rejects_unsupported_dtype(backend):
    lists = _op_lists("sgd_")
    lists = {name: [t.to(torch.int32) for t in tensors] for name, tensors in lists.items()}
    before = _copy(lists)
    with pytest.raises(RuntimeError, match=r"params\[0\] has dtype"):
        _call(KERNELS[backend](), "sgd_", lists)
    _assert_untouched(lists, before)


@pytest.mark.parametrize("backend", list(KERNELS))
def test_sgd_op_rejects_nesterov_without_momentum(backend):
    lists = _op_lists("sgd_")
    before = _copy(lists)
    hyper = dict(OP_SPECS["sgd_"][1], momentum=0.0)
    with pytest.raises(RuntimeError, match="nesterov"):
        KERNELS[backend]().sgd_(lists["params"], lists["grads"], [], **hyper)
    _assert_untouched(lists, before)



@pytest.mark.parametrize("backend", list(KERNELS))
@pytest.mark.parametrize("op, hyper, pattern", [
    ("adabound_", dict(base_lr=0.0), "base_lr must be positive"),
    ("aggmo_", dict(num_betas=4.0), "num_betas must be 1, 2 or 3"),
    ("aggmo_", dict(num_betas=1.5), "num_betas must be 1, 2 or 3"),
])
def test_op_rejects_impossible_hyperparameters(backend, op, hyper, pattern):
    lists = _op_lists(op)
    before = _copy(lists)
    with pytest.raises(RuntimeError, match=pattern):
        _call(KERNELS[backend](), op, lists, **hyper)
    _assert_untouched(lists, before)

# -- (d) the roofline op -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=[DTYPE_NAMES[d] for d in FLOAT_DTYPES])
@pytest.mark.parametrize("num_slots", [0, 1, 2, 3])
def test_roofline_adds_grad_to_param_and_every_slot(dtype, num_slots):
    shapes = [(1,), (33,), (0,), (37, 13), (2 * CPU_MIN_ELEMENTS_PER_THREAD + 17,)]
    generator = torch.Generator().manual_seed(3)

    def randoms():
        return [torch.randn(s, generator=generator).to(dtype) for s in shapes]

    params, grads = randoms(), randoms()
    grads[3] = grads[3].t().contiguous().t()  # a grad whose layout differs from its param's
    slots = [t for _ in range(num_slots) for t in randoms()]
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    expected_params = [(p.to(opmath) + g.to(opmath)).to(dtype) for p, g in zip(params, grads)]
    expected_slots = [(s.to(opmath) + grads[i % len(shapes)].to(opmath)).to(dtype) for i, s in enumerate(slots)]
    grads_before = [g.clone() for g in grads]
    torch.ops.fastopt.roofline_(params, grads, slots)
    for index, (p, e) in enumerate(zip(params, expected_params)):
        assert torch.equal(p, e), f"params[{index}]"
    for index, (s, e) in enumerate(zip(slots, expected_slots)):
        assert torch.equal(s, e), f"slots[{index}]"
    assert all(torch.equal(g, b) for g, b in zip(grads, grads_before))


def test_roofline_rejects_bad_slot_counts():
    params, grads = [torch.ones(3), torch.ones(4)], [torch.ones(3), torch.ones(4)]
    with pytest.raises(RuntimeError, match="whole number"):
        torch.ops.fastopt.roofline_(params, grads, [torch.ones(3)])
    with pytest.raises(RuntimeError, match="at most 3"):
        torch.ops.fastopt.roofline_(params, grads, [torch.ones(3), torch.ones(4)] * 4)
    assert all((p == 1).all() for p in params)


# -- layouts: a non-dense param's neighbours stay untouched -----------------------------

@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("case", OPTIMIZERS, ids=[c.id for c in OPTIMIZERS])
def test_strided_param_leaves_gaps_alone(case, backend):
    """A param that is every other element of a buffer: the elements between
    are not written (they keep PARAM_GAP_FILL), the param's own elements are."""
    params = make_params(SHAPES_BY_ID["param-strided"], torch.float32, seed=21)
    before = [p.detach().clone() for p in params]
    optimizer = case.make_fastopt(params, backend=backend)
    run_steps(optimizer, params, GradientFeed(seed=22, layout="strided"), 3)
    for index, (p, b) in enumerate(zip(params, before)):
        assert p.stride(-1) == 2
        buffer = torch.empty(0, dtype=p.dtype).set_(p.untyped_storage())
        gaps = buffer[1::2]
        assert gaps.numel() == p.numel()
        assert (gaps == PARAM_GAP_FILL).all(), f"params[{index}]: {(gaps != PARAM_GAP_FILL).sum()} gap elements written"
        assert (p != b).all(), f"params[{index}]: not updated"


# -- (e) backend selection ---------------------------------------------------------------

FASTOPT_CLASSES = list(dict.fromkeys(case.fastopt_cls for case in OPTIMIZERS))


def _params():
    return [torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(1)))]


def _step(optimizer, steps=1):
    for _ in range(steps):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(2))
        optimizer.step()


REFERENCE_OPS = tuple(dict.fromkeys(f"{cls._op}_" for cls in FASTOPT_CLASSES))


@pytest.fixture
def reference_calls(monkeypatch):
    """Counts calls of the reference's update functions (the spec of the ops
    of the same names; every reference step goes through one of them)."""
    calls = {}
    for name in REFERENCE_OPS:
        original = getattr(reference, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(reference, name, counted)
    return calls


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)


@pytest.mark.parametrize("cls", FASTOPT_CLASSES, ids=lambda c: c.__name__)
def test_invalid_backend_is_rejected(cls, no_backend_env):
    with pytest.raises(ValueError, match="backend"):
        cls(_params(), backend="gpu")


def test_invalid_backend_env_is_rejected(monkeypatch):
    monkeypatch.setenv("FASTOPT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTOPT_BACKEND"):
        fastopt.Adam(_params())


@pytest.mark.parametrize("cls", FASTOPT_CLASSES, ids=lambda c: c.__name__)
def test_backend_env_reference_is_used(cls, monkeypatch, reference_calls):
    monkeypatch.setenv("FASTOPT_BACKEND", "reference")
    assert fastopt.backends()["default_backend"] == "reference"
    optimizer = cls(_params(), lr=0.1)
    assert optimizer.backend == "reference"
    _step(optimizer, steps=2)
    assert sum(reference_calls.values()) == 2


@pytest.mark.parametrize("cls", FASTOPT_CLASSES, ids=lambda c: c.__name__)
def test_backend_keyword_overrides_env(cls, monkeypatch, reference_calls):
    monkeypatch.setenv("FASTOPT_BACKEND", "reference")
    optimizer = cls(_params(), lr=0.1, backend="fused")
    assert optimizer.backend == "fused"
    _step(optimizer, steps=2)
    assert reference_calls == {}


@pytest.mark.parametrize("cls", FASTOPT_CLASSES, ids=lambda c: c.__name__)
def test_auto_uses_compiled_kernels_when_loaded(cls, no_backend_env, reference_calls):
    assert "cpu" in fastopt.backends()["fused_devices"]
    optimizer = cls(_params(), lr=0.1)
    assert optimizer.backend == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _step(optimizer, steps=2)
    assert reference_calls == {}


@pytest.fixture
def kernels_unavailable(monkeypatch, no_backend_env):
    monkeypatch.setattr(_extension, "_COMPILED_DEVICE_TYPES", ())
    monkeypatch.setattr(_extension, "_fallback_warned", False)


@pytest.mark.parametrize("cls", FASTOPT_CLASSES, ids=lambda c: c.__name__)
def test_fused_without_kernels_is_an_error(cls, kernels_unavailable):
    assert fastopt.backends()["fused_devices"] == []
    assert fastopt.backends()["cpu_capability"] is None
    with pytest.raises(RuntimeError, match="backend='fused' needs compiled kernels"):
        cls(_params(), backend="fused")


def test_fused_add_param_group_without_kernels_is_an_error(no_backend_env, monkeypatch):
    optimizer = fastopt.Adam(_params(), backend="fused")
    monkeypatch.setattr(_extension, "_COMPILED_DEVICE_TYPES", ())
    with pytest.raises(RuntimeError, match="backend='fused' needs compiled kernels"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})


def test_auto_without_kernels_falls_back_with_one_warning(kernels_unavailable, reference_calls):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = []
        for cls in FASTOPT_CLASSES:
            optimizer = cls(_params(), lr=0.1)
            assert optimizer.backend == "auto"
            _step(optimizer, steps=2)
            runs.append(optimizer.param_groups[0]["params"][0].detach().clone())
    fallback = [w for w in caught if issubclass(w.category, RuntimeWarning) and "reference" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert sum(reference_calls.values()) == 2 * len(FASTOPT_CLASSES)
    # The fallback is the reference: the same bits as asking for it.
    for cls, result in zip(FASTOPT_CLASSES, runs):
        optimizer = cls(_params(), lr=0.1, backend="reference")
        _step(optimizer, steps=2)
        assert torch.equal(optimizer.param_groups[0]["params"][0], result), cls.__name__


# The classes whose torch.optim namesake takes differentiable (Adafactor's does not).
@pytest.mark.parametrize("cls", [cls for cls in FASTOPT_CLASSES if "differentiable" in inspect.signature(cls).parameters],
                         ids=lambda c: c.__name__)
def test_differentiable_is_rejected(cls, no_backend_env):
    with pytest.raises(ValueError, match="differentiable"):
        cls(_params(), differentiable=True)
