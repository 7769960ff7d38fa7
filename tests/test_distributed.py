"""fastopt under torch.distributed: DDP, ZeroRedundancyOptimizer and FSDP2
(``fully_shard``, DTensor params) with distributed checkpoints, each against
torch.optim (for-loop, ``foreach=False``) in the same setting.

Two worker processes (this file run as a script) join one gloo process group
on 127.0.0.1 and run every scenario once, so the processes and the group are
started once for the whole file; each worker writes which scenarios failed
(with the traceback) to a JSON file, and each test below asserts on one
scenario of both ranks.  A scenario asserts only after its last collective,
so a failure on one rank does not leave the other waiting in a collective.

Data differs between the ranks, so a missing gradient reduction shows as
replicas that disagree (DDP, ZeRO) or as params unlike torch.optim's (FSDP2).
Parameters are compared element-wise with the tolerance of the parity tests
(Note [Parity tolerances] in test_parity.py: float32 vs torch.optim, k = 16
units of eps relative to each element plus the tensor's rms), after steps
whose updates are far larger than that tolerance (``_assert_moved``).
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

WORLD_SIZE = 2
STEPS = 3
K_VS_TORCH = 16  # Note [Parity tolerances] in test_parity.py
PROCESS_GROUP_TIMEOUT_S = 60  # a collective that hangs (a rank failed) ends the run
WORKERS_TIMEOUT_S = 180  # both workers, start to finish (measured ~20 s on 2 busy cores)
REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (torch.optim class name, keyword arguments); the same names exist in
# fastopt (and in tests/oracles.py for those torch.optim lacks).
FSDP2_CASES = {
    "adamw": ("AdamW", {"lr": 5e-2, "weight_decay": 0.0731}),
    "adam-amsgrad": ("Adam", {"lr": 5e-2, "weight_decay": 0.0731, "amsgrad": True}),
    "sgd-nesterov": ("SGD", {"lr": 5e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0731}),
    "rmsprop-centered-momentum": ("RMSprop", {"lr": 1e-2, "centered": True, "momentum": 0.5}),
    "adagrad": ("Adagrad", {"lr": 1e-1, "lr_decay": 0.05}),
    "nadamw": ("NAdam", {"lr": 5e-2, "weight_decay": 0.0731, "decoupled_weight_decay": True}),
    # RAdam's first steps are unrectified (lr times the averaged grad, not
    # normalized), so a larger lr for every param to move visibly.
    "radam": ("RAdam", {"lr": 0.5, "weight_decay": 0.0731}),
    "adamax": ("Adamax", {"lr": 5e-2}),
    "adadelta": ("Adadelta", {"lr": 1.0, "eps": 1e-3}),
    "asgd": ("ASGD", {"lr": 5e-2, "t0": 1, "weight_decay": 0.0731}),
    # No Rprop: torch.optim.Rprop cannot step FSDP2's sharded DTensors (its
    # masked assignments are index_put_, which DTensor refuses in place).
    # Lion and ADOPT: the oracles of tests/oracles.py.
    "lion": ("Lion", {"lr": 5e-2, "weight_decay": 0.0731}),
    "adopt": ("ADOPT", {"lr": 5e-2, "weight_decay": 0.0731, "decouple": True}),
    # AdaBound, QHAdam, AggMo: the oracles of tests/oracles.py.
    "adabound": ("AdaBound", {"lr": 5e-2, "weight_decay": 0.0731}),
    "qhadam": ("QHAdam", {"lr": 5e-2, "nus": (0.7, 1.0), "weight_decay": 0.0731, "decouple_weight_decay": True}),
    "aggmo": ("AggMo", {"lr": 5e-2, "weight_decay": 0.0731}),
}
BACKENDS = ("fused", "reference")
ADAMW = {"lr": 5e-2, "weight_decay": 0.0731}

SCENARIOS = (
    ["ddp-adamw", "zero-adamw"]
    + [f"fsdp2-{case}-{backend}" for case in FSDP2_CASES for backend in BACKENDS]
    + ["fsdp2-dcp-from-fastopt", "fsdp2-dcp-from-torch", "dtensor-grad-placement", "fsdp2-per-param-norms"]
)


# -- the worker side -------------------------------------------------------------

def _model() -> torch.nn.Module:
    """The same small MLP on every rank; odd sizes, so FSDP2 shards unevenly."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.Tanh(), torch.nn.Linear(11, 5))


def _batches(rank: int, steps: int, offset: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random batches, different on each rank, identical between runs."""
    generator = torch.Generator().manual_seed(1000 * rank + offset)
    return [(torch.randn(4, 6, generator=generator), torch.randn(4, 5, generator=generator))
            for _ in range(steps)]


def _train(model, optimizer, batches, on_last_step=None) -> None:
    for index, (inputs, target) in enumerate(batches):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), target).backward()
        if on_last_step is not None and index == len(batches) - 1:
            with on_last_step:
                optimizer.step()
        else:
            optimizer.step()


def _optimizer_class(library: str, name: str):
    import fastopt
    import oracles

    if library == "fastopt":
        return getattr(fastopt, name)
    return getattr(torch.optim, name, None) or getattr(oracles, name)


def _make_optimizer(library: str, name: str, params, kwargs, backend: str = "fused"):
    if library == "fastopt":
        return _optimizer_class("fastopt", name)(params, backend=backend, **kwargs)
    return _optimizer_class("torch", name)(params, foreach=False, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _assert_close(actual, expected, what: str) -> None:
    """Element-wise, K_VS_TORCH units of eps relative to each element plus the tensor's rms."""
    assert len(actual) == len(expected), what
    for index, (a, e) in enumerate(zip(actual, expected)):
        a, e = _local(a).detach(), _local(e).detach()
        eps = torch.finfo(e.dtype).eps
        rms = e.double().pow(2).mean().sqrt().item() if e.numel() else 0.0
        torch.testing.assert_close(a, e, rtol=K_VS_TORCH * eps, atol=K_VS_TORCH * eps * rms,
                                   msg=lambda m: f"{what}[{index}]: {m}")


def _assert_equal(actual, expected, what: str) -> None:
    assert len(actual) == len(expected), what
    for index, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(_local(a), _local(e), rtol=0, atol=0,
                                   msg=lambda m: f"{what}[{index}]: {m}")


def _assert_moved(params, initial, what: str) -> None:
    """Typical updates are >= 1e-3, several hundred times the tolerance of
    _assert_close for these O(0.1..1) params, so no missing update hides in it."""
    for index, (p, p0) in enumerate(zip(params, initial)):
        moved = (_local(p) - _local(p0)).abs().median().item()
        assert moved > 1e-3, f"{what}[{index}] barely moved (median |change| {moved:.2e})"


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _state_tensors(optimizer, params) -> list[torch.Tensor]:
    """Every state tensor (step included) of ``params``, in a fixed order."""
    return [optimizer.state[p][key] for p in params for key in sorted(optimizer.state[p])]


def _snapshot(tensors) -> list[torch.Tensor]:
    """Copies of the local shards (the originals change in later steps)."""
    return [_local(t).detach().clone() for t in tensors]


def _scenario_ddp(rank: int, tmpdir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = _batches(rank, 5)
    final = {}
    for library in ("torch", "fastopt"):
        model = DDP(_model())
        _train(model, _make_optimizer(library, "AdamW", model.parameters(), ADAMW), batches)
        final[library] = _params(model)
    replicas = [None] * WORLD_SIZE
    torch.distributed.all_gather_object(replicas, final["fastopt"])
    _assert_moved(final["torch"], _params(_model()), "params")
    _assert_close(final["fastopt"], final["torch"], "params")
    _assert_equal(replicas[1], replicas[0], "rank 1 vs rank 0 params")


def _scenario_zero(rank: int, tmpdir: Path) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastopt

    batches = _batches(rank, STEPS + 1)
    final, consolidated, zeros = {}, {}, {}
    for library in ("torch", "fastopt"):
        model = DDP(_model())
        extra = {"foreach": False} if library == "torch" else {"backend": "fused"}
        zero = ZeroRedundancyOptimizer(model.parameters(),
                                       optimizer_class=_optimizer_class(library, "AdamW"),
                                       **ADAMW, **extra)
        _train(model, zero, batches[:STEPS])
        zero.consolidate_state_dict(to=0)
        # A copy: the consolidated dict holds rank 0's live state tensors.
        consolidated[library] = copy.deepcopy(zero.state_dict()) if rank == 0 else None
        final[library] = _params(model)
        zeros[library] = (model, zero)
    # torch's consolidated state continues under fastopt: load it into a
    # fresh fastopt ZeRO over a copy of torch's model, one more step each.
    # (A copy again: load_state_dict keeps the tensors it is given.)
    state_dict = [copy.deepcopy(consolidated["torch"])]
    torch.distributed.broadcast_object_list(state_dict, src=0)
    torch_model, torch_zero = zeros["torch"]
    model = DDP(copy.deepcopy(torch_model.module))
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fastopt.AdamW, **ADAMW)
    zero.load_state_dict(state_dict[0])
    _train(model, zero, batches[STEPS:])
    _train(torch_model, torch_zero, batches[STEPS:])
    replicas = [None] * WORLD_SIZE
    torch.distributed.all_gather_object(replicas, final["fastopt"])

    assert isinstance(zeros["fastopt"][1].optim, fastopt.AdamW)
    local_params = zeros["fastopt"][1].optim.param_groups[0]["params"]
    assert 0 < len(local_params) < len(final["fastopt"]), "ZeRO should hold a partition only"
    _assert_moved(final["torch"], _params(_model()), "params")
    _assert_close(final["fastopt"], final["torch"], "params")
    _assert_equal(replicas[1], replicas[0], "rank 1 vs rank 0 params")
    if rank == 0:
        states = {library: consolidated[library]["state"] for library in consolidated}
        assert sorted(states["fastopt"]) == sorted(states["torch"]) == list(range(4))
        for index, state in states["torch"].items():
            keys = sorted(state)
            assert sorted(states["fastopt"][index]) == keys
            _assert_close([states["fastopt"][index][k] for k in keys], [state[k] for k in keys],
                          f"consolidated state of param {index} ({keys})")
    _assert_close(_params(model), _params(torch_model), "params after loading torch's ZeRO state")


def _fsdp2_model(mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _op_recorder():
    """A dispatch mode that records the ops called with a DTensor argument
    and the fastopt ops called."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class OpRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtensor_ops, self.fastopt_ops = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "fastopt":
                self.fastopt_ops.append(str(func))
            if any(isinstance(t, DTensor) for t in tree_leaves((args, kwargs))):
                self.dtensor_ops.append(str(func))
            return func(*args, **kwargs)

    return OpRecorder()


def _fsdp2_run(mesh, library, name, kwargs, batches, backend="fused"):
    model = _fsdp2_model(mesh)
    optimizer = _make_optimizer(library, name, model.parameters(), kwargs, backend)
    recorder = _op_recorder()
    _train(model, optimizer, batches, on_last_step=recorder)
    return model, optimizer, recorder


def _scenario_fsdp2(rank: int, tmpdir: Path, case: str, backend: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    name, kwargs = FSDP2_CASES[case]
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    batches = _batches(rank, STEPS)
    torch_model, torch_opt, torch_ops = _fsdp2_run(mesh, "torch", name, kwargs, batches)
    model, optimizer, ops = _fsdp2_run(mesh, "fastopt", name, kwargs, batches, backend)

    params, torch_params = list(model.parameters()), list(torch_model.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    _assert_moved(torch_params, list(_fsdp2_model(mesh).parameters()), "params")
    _assert_close(params, torch_params, "params")
    for p in params:  # slots are DTensors as in torch.optim, scalar states (step, ...) plain tensors
        for key, value in optimizer.state[p].items():
            if key not in type(optimizer)._scalar_states:
                assert isinstance(value, DTensor) and value.placements == p.placements, key
    _assert_close(_state_tensors(optimizer, params), _state_tensors(torch_opt, torch_params),
                  f"state ({sorted(optimizer.state[params[0]])})")
    # A step runs on the local shards: no op sees a DTensor, and the fused
    # backend makes one op call for the one bucket.  The recorder does see
    # torch.optim's DTensor ops, so it would see fastopt's.
    assert torch_ops.dtensor_ops, "the recorder missed torch.optim's DTensor ops"
    assert ops.dtensor_ops == [], f"ops on DTensors in a fastopt step: {ops.dtensor_ops}"
    expected = [f"fastopt.{type(optimizer)._op}_.default"] if backend == "fused" else []
    assert ops.fastopt_ops == expected


def _scenario_dtensor_grad_placement(rank: int, tmpdir: Path) -> None:
    """DTensor params without FSDP (as tensor parallelism makes them), with
    grads laid out unlike the params (replicated grads of sharded params):
    fastopt redistributes them as torch.optim's DTensor ops do, and bumps the
    DTensors' version counters as in-place ops would."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    name, kwargs = FSDP2_CASES["adamw"]
    full_params = [p.detach() for p in _model().parameters()]
    generator = torch.Generator().manual_seed(7)  # the same full grads on both ranks
    full_grads = [[torch.randn(p.shape, generator=generator) for p in full_params] for _ in range(STEPS)]
    final, versions = {}, {}
    for library in ("torch", "fastopt"):
        params = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in full_params]
        optimizer = _make_optimizer(library, name, params, kwargs)
        for grads in full_grads:
            for p, g in zip(params, grads):
                p.grad = distribute_tensor(g, mesh, [Replicate()])
            before = [p._version for p in params]
            optimizer.step()
            versions[library] = [after > b for after, b in zip([p._version for p in params], before)]
        final[library] = params

    assert all(versions["torch"]) and all(versions["fastopt"]), versions
    _assert_moved(final["torch"], [distribute_tensor(p, mesh, [Shard(0)]) for p in full_params],
                  "params")
    _assert_close(final["fastopt"], final["torch"], "params")


def _scenario_fsdp2_per_param_norms(rank: int, tmpdir: Path) -> None:
    """LAMB, LARS and Adafactor take the norm of each whole param (Adafactor
    also its row and column means), SWATS sums over its whole group, Muon
    orthogonalizes each whole matrix,
    which the step of a shard cannot see: given FSDP2's
    DTensor params they raise NotImplementedError naming that limit (never a
    silently local norm), when built and when such params are added to a
    built optimizer."""
    import fastopt
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for name in ("LAMB", "LARS", "Muon", "Adafactor", "SWATS"):
        model = _fsdp2_model(mesh)
        # Muon takes matrices only: the weights, not the biases.
        params = [p for p in model.parameters() if name != "Muon" or p.dim() == 2]
        for build in (lambda: getattr(fastopt, name)(params),
                      lambda: getattr(fastopt, name)([torch.nn.Parameter(torch.ones(3, 3))]).add_param_group(
                          {"params": params})):
            try:
                build()
            except NotImplementedError as error:
                assert "norm of each whole param" in str(error), str(error)
            else:
                raise AssertionError(f"fastopt.{name} took DTensor params, whose norms it would take locally")


def _dcp_save(model, optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path))


def _dcp_load(model, optimizer, path: Path) -> None:
    """Loads the checkpoint into a fresh optimizer (whose state does not exist yet)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state_dict = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state_dict, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state_dict["optimizer"])


def _copy_model_state(source, target) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    set_model_state_dict(target, get_model_state_dict(source))


def _scenario_dcp(rank: int, tmpdir: Path, source: str) -> None:
    """The state of a fastopt or torch.optim AdamW under FSDP2 through
    dcp.save / dcp.load into a fresh fastopt AdamW: the same state (DTensors,
    bit for bit), then one more step of both: the same params (bit for bit
    from fastopt, within rounding from torch.optim) and state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    batches = _batches(rank, STEPS + 1)
    saved_model, saved, _ = _fsdp2_run(mesh, source, "AdamW", ADAMW, batches[:STEPS])
    _dcp_save(saved_model, saved, tmpdir / source)
    model = _fsdp2_model(mesh)
    _copy_model_state(saved_model, model)
    optimizer = _make_optimizer("fastopt", "AdamW", model.parameters(), ADAMW)
    _dcp_load(model, optimizer, tmpdir / source)
    loaded_state = _state_tensors(optimizer, list(model.parameters()))
    loaded_are_dtensors = [isinstance(t, DTensor) for t in loaded_state if t.dim() > 0]
    loaded_state = _snapshot(loaded_state)
    saved_state = _snapshot(_state_tensors(saved, list(saved_model.parameters())))
    _train(model, optimizer, batches[STEPS:])
    _train(saved_model, saved, batches[STEPS:])

    assert loaded_are_dtensors and all(loaded_are_dtensors)
    _assert_equal(loaded_state, saved_state, "loaded state")
    compare = _assert_equal if source == "fastopt" else _assert_close
    compare(list(model.parameters()), list(saved_model.parameters()), "params one step after loading")
    compare(_state_tensors(optimizer, list(model.parameters())),
            _state_tensors(saved, list(saved_model.parameters())), "state one step after loading")


def _run_scenario(name: str, rank: int, tmpdir: Path) -> None:
    if name == "ddp-adamw":
        _scenario_ddp(rank, tmpdir)
    elif name == "zero-adamw":
        _scenario_zero(rank, tmpdir)
    elif name.startswith("fsdp2-dcp-from-"):
        _scenario_dcp(rank, tmpdir, name.removeprefix("fsdp2-dcp-from-"))
    elif name == "dtensor-grad-placement":
        _scenario_dtensor_grad_placement(rank, tmpdir)
    elif name == "fsdp2-per-param-norms":
        _scenario_fsdp2_per_param_norms(rank, tmpdir)
    else:
        case, backend = name.removeprefix("fsdp2-").rsplit("-", 1)
        _scenario_fsdp2(rank, tmpdir, case, backend)


def _worker(rank: int, port: int, tmpdir: Path) -> None:
    """Runs every scenario on one rank; writes {scenario: traceback or None}."""
    from datetime import timedelta

    import torch.distributed as dist

    import fastopt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the machine's cores
    results = {"fastopt_file": fastopt.__file__, "failures": {}}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    try:
        for name in SCENARIOS:
            try:
                _run_scenario(name, rank, tmpdir)
                results["failures"][name] = None
            except Exception:
                results["failures"][name] = traceback.format_exc()
            dist.barrier()
    finally:
        dist.destroy_process_group()
        (tmpdir / f"rank{rank}.json").write_text(json.dumps(results))


# -- the pytest side ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """Runs both workers once; the per-rank results."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("torch.distributed has no gloo backend in this torch build")
    tmpdir = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    workers = [
        subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(tmpdir)],
                         cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for rank in range(WORLD_SIZE)
    ]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=WORKERS_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the distributed workers did not finish within {WORKERS_TIMEOUT_S} s")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    results = []
    for rank, (worker, output) in enumerate(zip(workers, outputs)):
        path = tmpdir / f"rank{rank}.json"
        if worker.returncode != 0 or not path.exists():
            pytest.fail(f"rank {rank} exited with {worker.returncode}:\n{output[-5000:]}")
        results.append(json.loads(path.read_text()))
    return results


def test_workers_import_this_fastopt(worker_results):
    import fastopt

    for result in worker_results:
        assert Path(result["fastopt_file"]) == Path(fastopt.__file__)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(worker_results, scenario):
    failures = [f"rank {rank}:\n{result['failures'][scenario]}"
                for rank, result in enumerate(worker_results) if result["failures"][scenario]]
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
