"""A real training run: a 64-64-10 ReLU MLP on scikit-learn's bundled digits
data (1797 8x8 images, no download), trained from the same initial weights
with the same minibatch order by torch.optim (for-loop, ``foreach=False``)
and by fastopt, for each optimizer (those torch.optim lacks: against the
oracles of tests/oracles.py).

What is asserted, and why those numbers:

* Per-step loss curves match element-wise within rtol=1e-4, atol=1e-6.  The
  forward/backward passes are identical, so the only difference is rounding
  in the update (fastopt fuses and reorders the arithmetic).  Measured over
  the 176 steps here the worst relative loss difference is ~2e-6 (float32),
  so the tolerance has ~50x margin, yet a wrong update (e.g. a missing bias
  correction, a wrong eps placement or a skipped weight decay) moves the loss
  by far more than 1e-4 within a few steps.
* Final parameters and optimizer state match within float32 rounding
  (rtol=1e-5, atol=1e-6; measured worst difference 3e-7).
* Test accuracy of the fastopt model clears a per-optimizer bar.  Over init /
  batch-order seeds 0-7 torch.optim with these settings reaches at least
  0.964 (Adam, AdamW), 0.962 (SGD), 0.951 (RMSprop), 0.969 (Adagrad),
  0.962 (NAdam), 0.949 (RAdam), 0.964 (Adamax), 0.964 (Adadelta), 0.956
  (ASGD), 0.931 (Rprop, a full-batch method on minibatches), 0.944 (Lion),
  0.964 (ADOPT), 0.962 (AdaBound), 0.964 (QHAdam), 0.951 (AggMo), 0.967 (LAMB), 0.969 (LARS); the bars
  below are ~1-2 points under those minima.  An
  untrained model scores ~0.1.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastopt
import oracles

sklearn_datasets = pytest.importorskip("sklearn.datasets")
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

EPOCHS = 8
BATCH_SIZE = 64
SEED = 0

# name -> (hyperparameters, minimum test accuracy of the fastopt model)
SETUPS = {
    "Adam": (dict(lr=3e-3), 0.95),
    "AdamW": (dict(lr=3e-3, weight_decay=1e-2), 0.95),
    "SGD": (dict(lr=0.05, momentum=0.9, nesterov=True), 0.95),
    "RMSprop": (dict(lr=1e-3), 0.94),
    "Adagrad": (dict(lr=0.05), 0.95),
    "NAdam": (dict(lr=3e-3), 0.95),
    "RAdam": (dict(lr=1e-2), 0.94),
    "Adamax": (dict(lr=1e-2), 0.95),
    "Adadelta": (dict(lr=1.0), 0.95),
    "ASGD": (dict(lr=0.2, t0=100), 0.94),
    "Rprop": (dict(lr=1e-3, step_sizes=(1e-6, 1e-2)), 0.92),
    "Lion": (dict(lr=2e-3, weight_decay=1e-2), 0.93),
    "ADOPT": (dict(lr=3e-3), 0.95),
    "AdaBound": (dict(lr=3e-3), 0.95),
    "QHAdam": (dict(lr=3e-3, nus=(0.7, 1.0)), 0.95),
    "AggMo": (dict(lr=0.05), 0.94),
    "LAMB": (dict(lr=1e-2), 0.95),
    "LARS": (dict(lr=2.5), 0.95),
}
LOSS_TOL = dict(rtol=1e-4, atol=1e-6)
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def load_digits():
    """(X_train, y_train, X_test, y_test): standardized float32 features and labels."""
    X, y = sklearn_datasets.load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_train)
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return as_x(X_train), torch.tensor(y_train), as_x(X_test), torch.tensor(y_test)


@pytest.fixture
def one_thread():
    """The test machine has 2 cores shared with other jobs; torch's intra-op pool
    spinning under contention makes the tiny matmuls here 100x slower.  The
    updates are element-wise, so the results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _initial_model_and_order(n_train):
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    gen = torch.Generator().manual_seed(SEED)
    order = [torch.randperm(n_train, generator=gen) for _ in range(EPOCHS)]
    return model, order


def _train(model, opt, order, X, y):
    losses = []
    for perm in order:
        for start in range(0, len(perm), BATCH_SIZE):
            idx = perm[start:start + BATCH_SIZE]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@torch.no_grad()
def _accuracy(model, X, y):
    return (model(X).argmax(dim=1) == y).double().mean().item()


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("name", list(SETUPS))
def test_mlp_on_digits_matches_torch(name, backend, digits, one_thread):
    X_train, y_train, X_test, y_test = digits
    hyper, min_accuracy = SETUPS[name]
    init, order = _initial_model_and_order(len(X_train))

    model_t, model_f = copy.deepcopy(init), copy.deepcopy(init)
    # torch.optim's class, or the oracle of tests/oracles.py for those it lacks.
    opt_t = (getattr(torch.optim, name, None) or getattr(oracles, name))(model_t.parameters(), foreach=False, **hyper)
    opt_f = getattr(fastopt, name)(model_f.parameters(), backend=backend, **hyper)

    untrained_accuracy = _accuracy(init, X_test, y_test)
    losses_t = _train(model_t, opt_t, order, X_train, y_train)
    losses_f = _train(model_f, opt_f, order, X_train, y_train)

    steps = EPOCHS * -(-len(X_train) // BATCH_SIZE)
    assert losses_f.shape == losses_t.shape == (steps,)
    torch.testing.assert_close(losses_f, losses_t, **LOSS_TOL)
    # Training did something: the last epoch's mean loss is far below the first step's.
    per_epoch = steps // EPOCHS
    assert losses_f[-per_epoch:].mean() < 0.1 * losses_f[0]

    for (pname, p_f), p_t in zip(model_f.named_parameters(), model_t.parameters()):
        torch.testing.assert_close(p_f.detach(), p_t.detach(), **PARAM_TOL,
                                   msg=lambda m, pname=pname: f"{pname}: {m}")
    for p_f, p_t in zip(model_f.parameters(), model_t.parameters()):
        state_f, state_t = opt_f.state[p_f], opt_t.state[p_t]
        assert set(state_f) == set(state_t)
        for key in state_t:
            tol = dict(rtol=0, atol=0) if key in type(opt_f)._scalar_states else PARAM_TOL
            torch.testing.assert_close(state_f[key], state_t[key], **tol)

    accuracy_f = _accuracy(model_f, X_test, y_test)
    accuracy_t = _accuracy(model_t, X_test, y_test)
    assert untrained_accuracy < 0.5
    assert accuracy_f >= min_accuracy, f"{name}: test accuracy {accuracy_f:.4f} < {min_accuracy}"
    # Parameters agree to ~1e-7, so at most a sample on a decision boundary may flip.
    assert abs(accuracy_f - accuracy_t) <= 2 / len(y_test)


# Lookahead (k=5, alpha=0.5) around SGD and Adam: over seeds 0-7 the oracle
# (tests/oracles.py around torch.optim) reaches at least 0.962 and 0.947.
LOOKAHEAD_SETUPS = {
    "SGD": (dict(lr=0.05, momentum=0.9, nesterov=True), 0.95),
    "Adam": (dict(lr=3e-3), 0.93),
}


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("inner", list(LOOKAHEAD_SETUPS))
def test_lookahead_mlp_on_digits_matches_the_oracle(inner, backend, digits, one_thread):
    X_train, y_train, X_test, y_test = digits
    hyper, min_accuracy = LOOKAHEAD_SETUPS[inner]
    init, order = _initial_model_and_order(len(X_train))
    model_t, model_f = copy.deepcopy(init), copy.deepcopy(init)
    opt_t = oracles.Lookahead(getattr(torch.optim, inner)(model_t.parameters(), foreach=False, **hyper))
    opt_f = fastopt.Lookahead(getattr(fastopt, inner)(model_f.parameters(), backend=backend, **hyper),
                              backend=backend)
    losses_t = _train(model_t, opt_t, order, X_train, y_train)
    losses_f = _train(model_f, opt_f, order, X_train, y_train)
    torch.testing.assert_close(losses_f, losses_t, **LOSS_TOL)
    for p_f, p_t in zip(model_f.parameters(), model_t.parameters()):
        torch.testing.assert_close(p_f.detach(), p_t.detach(), **PARAM_TOL)
        torch.testing.assert_close(opt_f.state[p_f]["slow_param"], opt_t.slow[p_t], **PARAM_TOL)
    accuracy_f = _accuracy(model_f, X_test, y_test)
    assert accuracy_f >= min_accuracy, f"Lookahead({inner}): test accuracy {accuracy_f:.4f} < {min_accuracy}"
    assert abs(accuracy_f - _accuracy(model_t, X_test, y_test)) <= 2 / len(y_test)
