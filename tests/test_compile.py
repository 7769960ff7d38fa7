"""torch.compile (Note [Compiled steps] in fastopt/optimizer.py).

- ``opt.step()`` of every optimizer in the registry traces to one graph with
  no break, and steps as the eager optimizer does, bit for bit;
- a whole training step (forward, backward, ``opt.step()``) compiles with
  ``fullgraph=True`` for every optimizer and the large-model options, equal to
  eager bit for bit (the ``aot_eager`` backend: functionalization and
  AOTAutograd see fastopt's ops, the forward and backward keep eager's kernels);
- with inductor, a compiled step under an LR scheduler compiles twice (the
  first step creates the state) and never again while the tensor lr changes;
- AMP: a compiled ``opt.step`` under ``torch.amp.GradScaler`` / ``fastopt.GradScaler``;
- every op passes ``torch.library.opcheck`` (schema, fake implementation,
  functionalization and AOTAutograd);
- on CUDA, ``mode="reduce-overhead"`` captures the whole step in a CUDA graph.

Models are tiny and compiled functions few, so the file runs in about a minute.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fastopt
from registry import OPTIMIZERS, OPTIMIZERS_BY_ID

STEPS = 4  # the first step (state creation), then the steady state


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with empty compile caches and may trace ``backward()``."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


def _model(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    return model, torch.randn(4, 5, dtype=dtype)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e), (g - e).abs().max()


def _state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.detach().clone() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


# -- opt.step() alone: one graph, no break ---------------------------------------


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.id)
def test_step_is_one_graph(case):
    runs = []
    for explain in (False, True):
        model, x = _model()
        model(x).square().sum().backward()
        optimizer = case.make_fastopt(list(model.parameters()), backend="fused")
        if explain:
            result = torch._dynamo.explain(optimizer.step)()
            assert (result.graph_count, result.graph_break_count) == (1, 0), result.break_reasons
        else:
            optimizer.step()
        runs.append((_params(model), _state(optimizer)))
    _assert_same(runs[1][0], runs[0][0])
    _assert_same(runs[1][1], runs[0][1])


# -- a whole training step -------------------------------------------------------

# (registry case, options, param dtype): the large-model options, composed.
OPTION_CASES = [
    ("adamw-default", {"max_grad_norm": 0.3}, torch.float32),
    ("adam-default", {"master_weights": True}, torch.bfloat16),
    ("adam-amsgrad", {"state_dtype": torch.bfloat16}, torch.float32),
    ("sgd-momentum", {"stochastic_rounding": True}, torch.bfloat16),
    ("rmsprop-centered", {"master_weights": True, "state_dtype": torch.bfloat16, "max_grad_norm": 0.3},
     torch.float16),
    ("adagrad-lr_decay", {"stochastic_rounding": True, "max_grad_norm": 0.3}, torch.bfloat16),
    ("nadam-weight_decay-momentum_decay", {"master_weights": True, "max_grad_norm": 0.3}, torch.bfloat16),
    ("adadelta-eps", {"state_dtype": torch.bfloat16}, torch.float32),
    # 8-bit state (the traced step quantizes the new state), alone and with the
    # other options; min_8bit_size=16 keeps the biases (7 and 3 elements) in
    # float32: two buckets per dtype.
    ("adamw-amsgrad-maximize", {"state_dtype": torch.uint8, "min_8bit_size": 0}, torch.float32),
    ("sgd-momentum", {"state_dtype": torch.uint8, "min_8bit_size": 16, "stochastic_rounding": True},
     torch.bfloat16),
    ("rprop-default", {"state_dtype": torch.uint8, "min_8bit_size": 16, "master_weights": True,
                       "max_grad_norm": 0.3}, torch.float16),
]
TRAINING_CASES = [(case.id, {}, torch.float32) for case in OPTIMIZERS] + OPTION_CASES


def _train(case_id: str, options: dict, dtype: torch.dtype, compiled: bool):
    """STEPS training steps (forward, backward, step) from a fixed start."""
    model, x = _model(dtype)
    case = OPTIMIZERS_BY_ID[case_id]
    optimizer = case.fastopt_cls(model.parameters(), backend="fused", **case.make_kwargs(), **options)

    def train_step():
        loss = model(x).float().square().mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    step = torch.compile(train_step, backend="aot_eager", fullgraph=True) if compiled else train_step
    torch.manual_seed(1)  # the stochastic rounding seeds
    losses, compiles = [], []
    for _ in range(STEPS):
        losses.append(step())
        optimizer.zero_grad()
        # Graphs compiled so far (a backend call count would also count the
        # partial graphs of traces that dynamo restarts).
        compiles.append(counters["stats"]["unique_graphs"])
    return losses, _params(model), _state(optimizer), compiles, optimizer


@pytest.mark.parametrize("case_id,options,dtype", TRAINING_CASES,
                         ids=[f"{c}-{'-'.join(o) or 'plain'}-{str(d)[6:]}" for c, o, d in TRAINING_CASES])
def test_training_step_compiles_to_eager_result(case_id, options, dtype):
    eager = _train(case_id, options, dtype, compiled=False)
    compiled = _train(case_id, options, dtype, compiled=True)
    for got, expected in zip(compiled[:3], eager[:3]):
        _assert_same(got, expected)
    # The first step may create state, which the second step finds: a second
    # compile at most, then none.
    compiles = compiled[3]
    assert compiles[0] == 1 and compiles[1] <= 2 and compiles[-1] == compiles[1], compiles
    if options.get("max_grad_norm"):
        assert torch.equal(compiled[4].last_grad_norm, eager[4].last_grad_norm)


# -- inductor, an LR scheduler and a tensor lr: no recompiles --------------------


@pytest.mark.parametrize("case_id", ["adamw-default", "sgd-momentum"])
def test_inductor_step_under_scheduler_does_not_recompile(case_id):
    case = OPTIMIZERS_BY_ID[case_id]
    runs = []
    for compiled in (False, True):
        model, x = _model()
        optimizer = case.fastopt_cls(model.parameters(), backend="fused",
                                     **{**case.make_kwargs(), "lr": torch.tensor(0.05)})
        # cycle_momentum=False: a momentum that changes is a float that changes (a recompile)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20,
                                                        cycle_momentum=False)
        step = torch.compile(optimizer.step, fullgraph=True) if compiled else optimizer.step
        lrs = []
        for i in range(20):
            model(x).square().mean().backward()
            step()
            optimizer.zero_grad()
            scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"].item())
            if i == 1:
                compiles_after_two_steps = counters["stats"]["unique_graphs"]
        runs.append(_params(model))
        assert len(set(lrs)) > 10  # the scheduler did change lr
    assert compiles_after_two_steps == counters["stats"]["unique_graphs"] == 2
    _assert_same(runs[1], runs[0])


def test_float_lr_recompiles_when_it_changes():
    """A float lr is a constant of the graph (README: use a tensor lr)."""
    model, x = _model()
    optimizer = fastopt.SGD(model.parameters(), lr=0.1)
    step = torch.compile(optimizer.step, backend="eager", fullgraph=True)
    for lr in (0.1, 0.1, 0.05, 0.02):
        optimizer.param_groups[0]["lr"] = lr
        model(x).sum().backward()
        step()
    assert counters["stats"]["unique_graphs"] == 3


# -- AMP ----------------------------------------------------------------------------


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fastopt.GradScaler], ids=["torch", "fastopt"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.3])
def test_compiled_step_under_grad_scaler(scaler_cls, max_grad_norm):
    """torch.compile does not trace torch.amp (torch skips that module), so
    the scaler stays outside and calls the compiled step."""
    runs = []
    for compiled in (False, True):
        model, x = _model()
        optimizer = fastopt.Adam(model.parameters(), lr=torch.tensor(0.05), max_grad_norm=max_grad_norm)
        scaler = scaler_cls("cpu", init_scale=2.0**10, growth_interval=2)
        if compiled:
            optimizer.step = torch.compile(optimizer.step, backend="aot_eager", fullgraph=True)
        for i in range(6):
            # An inf in step 3 makes the scaler skip that step and back off.
            loss = model(x).square().mean() * (float("inf") if i == 3 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        runs.append((_params(model), _state(optimizer), scaler.get_scale()))
    _assert_same(runs[1][0], runs[0][0])
    _assert_same(runs[1][1], runs[0][1])
    assert runs[1][2] == runs[0][2]


# -- the ops ------------------------------------------------------------------------


def _op_samples():
    """(op, args, kwargs): every list op with every optional per-step tensor."""
    torch.manual_seed(0)
    shapes = [(3,), (2, 5)]

    def tensors(dtype=torch.float32):
        return [torch.randn(s, dtype=dtype) for s in shapes]

    def steps():
        return [torch.zeros(()) for _ in shapes]

    def positive():
        return [t.abs() for t in tensors()]

    extras = {"lr_tensor": torch.tensor(0.01, dtype=torch.float64), "grad_scale": torch.tensor(2.0),
              "found_inf": torch.tensor(0.0)}
    ops = torch.ops.fastopt
    adam = dict(lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                amsgrad=True, maximize=False)
    yield ops.adam_, (tensors(), tensors(), tensors(), positive(), positive(), steps()), {**adam, **extras}
    bf16 = [t.bfloat16() for t in tensors()]
    yield (ops.adam_, (bf16, [t.bfloat16() for t in tensors()], tensors(), positive(), [], steps()),
           {**adam, "amsgrad": False, "master_params": [t.float() for t in bf16]})
    yield (ops.sgd_, ([t.bfloat16() for t in tensors()], [t.bfloat16() for t in tensors()],
                      [t.bfloat16() for t in tensors()]),
           dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=True,
                first_momentum_step=False, rounding_seed=7))
    yield (ops.rmsprop_, (tensors(), tensors(), positive(), tensors(), tensors(), steps()),
           dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.5, centered=False,
                maximize=False, **extras))
    yield (ops.adagrad_, (tensors(), tensors(), positive(), steps()),
           dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-10, maximize=False))
    mu_products = [torch.ones(()) for _ in shapes]
    yield (ops.nadam_, (tensors(), tensors(), tensors(), positive(), steps(), mu_products),
           dict(lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, momentum_decay=4e-3,
                decoupled_weight_decay=False, maximize=True, **extras))
    yield (ops.radam_, (tensors(), tensors(), tensors(), positive(), steps()),
           dict(lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                maximize=False, **extras))
    yield (ops.adamax_, (tensors(), tensors(), tensors(), positive(), steps()),
           dict(lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, maximize=False, **extras))
    yield (ops.adadelta_, (tensors(), tensors(), positive(), positive(), steps()),
           dict(lr=0.0, rho=0.9, eps=1e-6, weight_decay=0.1, maximize=False, **extras))
    yield ops.roofline_, (tensors(), tensors(), tensors()), {}
    yield ops.grad_sq_norm, (tensors(),), {}
    matrices = [torch.randn(2, 5), torch.randn(3, 4, 6)]
    yield (ops.row_col_sq_means_, (matrices, [torch.empty(2, 1), torch.empty(3, 4, 1)],
                                   [torch.empty(1, 5), torch.empty(3, 1, 6)]), dict(grad_scale=torch.tensor(2.0)))


@pytest.mark.parametrize("sample", list(_op_samples()), ids=lambda s: str(s[0]))
def test_op_passes_opcheck(sample):
    op, args, kwargs = sample
    torch.library.opcheck(op, args, kwargs)


def test_rounding_seed_op_draws_as_eager_does():
    # Not opcheck'ed: it draws a new number per call, so its outputs differ by design.
    like = torch.zeros(1)
    torch.manual_seed(3)
    drawn = [torch.ops.fastopt.rounding_seed(like) for _ in range(2)]
    torch.manual_seed(3)
    assert drawn == [int(torch.randint(2**31, (), dtype=torch.int64)) for _ in range(2)]
    assert drawn[0] != drawn[1]


# -- CUDA graphs ----------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_reduce_overhead_captures_the_step_in_a_cuda_graph():
    from torch._dynamo.utils import counters

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)).cuda()
        x = torch.randn(32, 64, device="cuda")
        optimizer = fastopt.AdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), max_grad_norm=1.0)

        def train_step():
            loss = model(x).square().mean()
            loss.backward()
            optimizer.step()
            return loss.detach()

        counters.clear()
        step = torch.compile(train_step, mode="reduce-overhead", fullgraph=True) if compiled else train_step
        for _ in range(6):
            step()
            optimizer.zero_grad(set_to_none=False)  # grads keep their addresses for the graph
        torch.cuda.synchronize()
        runs.append(_params(model))
        if compiled:
            # inductor counts every graph it could not capture (e.g. mutated
            # inputs that are not static, a CPU tensor, a host sync).
            assert counters["stats"]["unique_graphs"] >= 1
            assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    for got, expected in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # inductor's forward/backward round differently
