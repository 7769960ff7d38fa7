"""fastopt.lr_range_test (Smith 2017's LR range test) on a small MLP with
batch norm on scikit-learn's bundled digits (no download): the exponential
sweep, a bit-exact restore of model, grads, modes and optimizer, the same
lrs, smoothed losses, early stop and suggestion as torch-lr-finder's
``LRFinder``, input validation that touches nothing, and the plot."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastopt

sklearn_datasets = pytest.importorskip("sklearn.datasets")

LOSS = nn.functional.cross_entropy


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loader():
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    return DataLoader(data, batch_size=64)  # 29 batches, in order: the same for every run


def make(cls, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    lr = kw.pop("lr")
    # Two groups with their own lr: the test sets both and restores each.
    groups = [{"params": model[0].parameters(), "lr": lr / 2},
              {"params": list(model[1].parameters()) + list(model[3].parameters())}]
    return model, cls(groups, lr=lr, **kw)


def train(model, optimizer, batches):
    for inputs, targets in batches:
        optimizer.zero_grad()
        LOSS(model(inputs), targets).backward()
        optimizer.step()


def assert_same(a, b, where="state_dict"):
    """Equal nested dicts / lists with bit-equal tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def snapshot(model, optimizer):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [m.training for m in model.modules()])


def assert_unchanged(model, optimizer, before):
    after = snapshot(model, optimizer)
    assert_same(after[0], before[0], "model")
    assert_same(after[1], before[1], "optimizer")
    assert_same(after[2], before[2], "grads")
    assert after[3] == before[3], "train/eval modes"


OPTIMIZERS = {
    "fastopt.SGD-momentum": (fastopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "fastopt.Adam": (fastopt.Adam, dict(lr=1e-3, weight_decay=0.01)),
    "torch.optim.AdamW": (torch.optim.AdamW, dict(lr=1e-3)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_exponential_sweep_then_everything_restored(name, loader):
    cls, kw = OPTIMIZERS[name]
    model, optimizer = make(cls, **kw)
    batches = list(loader)
    train(model, optimizer, batches[:3])  # state to restore: moments, steps, running stats, grads
    model.eval()
    twin_model, twin_optimizer = copy.deepcopy((model, optimizer))
    before = snapshot(model, optimizer)
    seen = []  # every group's lr at each step
    hook = optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))

    start, end, n = 1e-5, 1.0, 40
    result = fastopt.lr_range_test(model, LOSS, loader, optimizer, start, end, n, diverge_th=None)
    hook.remove()

    assert result.lrs == [start * (end / start) ** (i / (n - 1)) for i in range(n)]
    np.testing.assert_allclose(result.lrs, np.geomspace(start, end, n), rtol=1e-12)
    assert seen == [[lr, lr] for lr in result.lrs]
    assert len(result.losses) == n and all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[-1] != result.losses[0]  # the test did train
    assert start <= result.suggested_lr <= end and result.suggested_lr in result.lrs

    assert_unchanged(model, optimizer, before)
    assert [g["lr"] for g in optimizer.param_groups] == [kw["lr"] / 2, kw["lr"]]
    # Training goes on as if the test had not run.
    train(model, optimizer, batches[3:5])
    train(twin_model, twin_optimizer, batches[3:5])
    assert_same(model.state_dict(), twin_model.state_dict(), "model after training on")
    assert_same(optimizer.state_dict(), twin_optimizer.state_dict(), "optimizer after training on")


# (optimizer, options, start_lr, end_lr, smooth_f, diverge_th, stops early)
ANCHORS = {
    "SGD-diverges": (fastopt.SGD, dict(lr=0.1, momentum=0.9), 1e-4, 10.0, 0.05, 5, True),
    "Adam-full-sweep": (fastopt.Adam, dict(lr=1e-3), 1e-5, 1.0, 0.05, 5, False),
    "Adam-diverges": (fastopt.Adam, dict(lr=1e-3), 1e-5, 100.0, 0.2, 3, True),
    "RMSprop-unsmoothed": (fastopt.RMSprop, dict(lr=1e-3), 1e-5, 1.0, 0.0, 5, True),
}


@pytest.mark.parametrize("name", list(ANCHORS))
def test_matches_torch_lr_finder(name, loader):
    """The same run through torch-lr-finder's LRFinder.range_test(step_mode="exp"):
    it sets lr start * (end / start) ** (i / (num_iter - 1)) for batch i (its
    ExponentialLR), records that lr and the batch's smoothed loss, and smooths,
    tracks the best and checks divergence in the same float expressions, so
    lrs, losses, the early stop and the suggestion are equal, not just close."""
    lr_finder = pytest.importorskip("torch_lr_finder")
    from matplotlib.figure import Figure
    cls, kw, start, end, smooth_f, diverge_th, stops_early = ANCHORS[name]
    n = 60
    model, optimizer = make(cls, **kw)
    ours = fastopt.lr_range_test(model, LOSS, loader, optimizer, start, end, n,
                                 smooth_f=smooth_f, diverge_th=diverge_th)
    model, optimizer = make(cls, **kw)
    finder = lr_finder.LRFinder(model, optimizer, nn.CrossEntropyLoss())
    finder.range_test(loader, start_lr=start, end_lr=end, num_iter=n, step_mode="exp",
                      smooth_f=smooth_f, diverge_th=diverge_th)
    _, suggested = finder.plot(ax=Figure().subplots())  # default skip_start=10, skip_end=5

    assert (len(ours.lrs) < n) == stops_early
    assert ours.lrs == finder.history["lr"]
    assert ours.losses == finder.history["loss"]
    assert ours.suggested_lr == suggested


BAD = [
    (dict(start_lr=0.0), "start_lr"), (dict(start_lr=-1e-3), "start_lr"),
    (dict(start_lr=float("nan")), "start_lr"), (dict(start_lr=float("inf")), "start_lr"),
    (dict(end_lr=1e-5), "end_lr"), (dict(end_lr=1e-6), "end_lr"), (dict(end_lr=float("inf")), "end_lr"),
    (dict(num_steps=1), "num_steps"), (dict(num_steps=10.0), "num_steps"),
    (dict(smooth_f=1.0), "smooth_f"), (dict(smooth_f=-0.1), "smooth_f"),
    (dict(diverge_th=1.0), "diverge_th"), (dict(skip_start=-1), "skip_start"),
    (dict(skip_end=2.5), "skip_end"),
]


class Untouchable:
    def __iter__(self):
        raise AssertionError("data was read")


@pytest.mark.parametrize("bad,argument", BAD, ids=[f"{k}={v}" for k, v in (next(iter(b.items())) for b, _ in BAD)])
def test_bad_input_raises_and_changes_nothing(bad, argument, loader):
    model, optimizer = make(fastopt.Adam, lr=1e-3)
    train(model, optimizer, list(loader)[:2])
    before = snapshot(model, optimizer)
    args = dict(start_lr=1e-5, end_lr=1.0, num_steps=20) | bad
    with pytest.raises(ValueError, match=argument):
        fastopt.lr_range_test(model, LOSS, Untouchable(), optimizer, **args)
    assert_unchanged(model, optimizer, before)


def test_wrong_types_raise_type_error(loader):
    model, optimizer = make(fastopt.SGD, lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        fastopt.lr_range_test(model, LOSS, loader, model.parameters())
    with pytest.raises(TypeError, match="model"):
        fastopt.lr_range_test(LOSS, LOSS, loader, optimizer)


def test_cycles_data_and_restores_when_it_raises(loader):
    model, optimizer = make(fastopt.SGD, lr=0.1, momentum=0.9)
    batches = list(loader)[:3]
    seen = []

    def loss_fn(outputs, targets):
        seen.append(targets)
        return LOSS(outputs, targets)

    fastopt.lr_range_test(model, loss_fn, batches, optimizer, 1e-4, 1.0, 7)
    assert [id(t) for t in seen] == [id(b[1]) for b in (batches * 3)[:7]]

    train(model, optimizer, batches[:1])
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="data yielded no batches"):  # a used-up iterator cannot cycle
        fastopt.lr_range_test(model, LOSS, iter(batches), optimizer, 1e-4, 1.0, 7)
    assert_unchanged(model, optimizer, before)


def test_plot_writes_a_png(loader, tmp_path):
    pytest.importorskip("matplotlib")
    model, optimizer = make(fastopt.Adam, lr=1e-3)
    result = fastopt.lr_range_test(model, LOSS, loader, optimizer, 1e-5, 1.0, 30,
                                   save_plot=tmp_path / "kw.png")
    assert result.suggested_lr is not None
    result.plot(tmp_path / "method.png")
    short = fastopt.lr_range_test(model, LOSS, loader, optimizer, 1e-5, 1.0, 16)
    assert short.suggested_lr is None  # fewer than skip_start + skip_end + 2 = 17 points
    short.plot(tmp_path / "short.png")
    for name in ("kw.png", "method.png", "short.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
