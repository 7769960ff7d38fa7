"""The base every fastopt optimizer shares: grouping of tensors by device and
dtype, lazy state creation, the cached per-group tensor lists and the choice
of backend.  An optimizer subclass only declares its state layout, how a
state starts, and which op a group's tensors go to.

Note [Step plans]
A step must cost O(param groups) Python work, not O(params).  For each param
group the optimizer keeps a plan: the group's params split into buckets of
one device and dtype, each holding its params, state slots and step counts
bound once into a ``BoundTensors`` object (Note [Bound tensors] in
csrc/bound_ops.cpp).  A step makes one ``*_bound_`` op call per bucket, which
reads the grads itself and skips params without one.  A plan is rebuilt when
the group's params (compared by identity) or state layout change, after load_state_dict /
add_param_group, and on the step after new state was created.  State created in a step gets its own buckets for that
step, because some rules start differently (SGD's momentum buffer copies the
first gradient).  Hand edits of ``optimizer.state`` that replace state
tensors must be followed by ``optimizer.invalidate_plans()``.

DTensor params (FSDP2's fully_shard, tensor parallel) get buckets of their
own, still one fused call each: the ops must see the local shards, not the
DTensors (each op on a DTensor would go through its Python dispatch).  Their
state is created with zeros_like(param), so it is a DTensor as in torch.optim
(distributed checkpoints and state_dicts see the same state).  The C++ bound op
cannot be used for them: it reads ``.grad`` in C++, and a DTensor's grad is a
DTensor whose local shard only Python can unwrap; FSDP2 may also swap a
param's local tensor (lazy init pads uneven shards).  So such a bucket binds a
``_LocalShards`` and runs the Python bound ops of fastopt.reference, which each
step take the local shards of the params, their grads and their state and call
the backend's list op (``torch.ops.fastopt.adam_`` or the reference's) once:
O(params) Python work per step for DTensor buckets only.

Note [Failed steps]
A step that raises changes nothing.  Each op checks its tensors before
writing any, and a step with more than one bucket checks all the others
before the first runs (Note [Atomic steps across buckets] in
csrc/bound_ops.cpp); state created by the failed step is removed again.
Only then, off the common path, does the step look for the culprit in
Python (O(params)) and raise naming it as ``param_groups[g]['params'][j]``.
If every tensor fits, the failure had one of two harmless causes, and the
step is tried once more with fresh plans: the plans were stale (``p.data``
replaced by a tensor of another dtype), or some grads are sparse (the
kernels take dense grads only; optimizers that support sparse grads then
run the step on the reference).

Complex params are stepped as real pairs (``torch.view_as_real``, as
torch.optim does); their state stays complex.  The views are bound anew each
step (O(complex params)), so that a replaced ``p.data`` is followed.

A param listed twice in a group is stepped twice, in order, as torch.optim
does: its second entry goes to a later bucket (within one op call the two
entries would race).

Note [Compiled steps]
torch.compile cannot trace the eager step: it cannot pass a BoundTensors
script object to an op, and the plan cache lives outside any graph.  So
``step`` makes one choice: while torch.compile traces it
(``torch.compiler.is_compiling()``), it gathers each bucket's lists in Python
(``_bucket_lists``, the same as a plan build, creating missing state) and
calls the list ops (``torch.ops.fastopt.adam_``, ...) through the Python bound
functions of fastopt.reference: the same kernels as the bound ops, seen by the
compiler through their schemas and fake implementations (fastopt/_fake.py).
The Python work is the tracer's, once per compile; the compiled graph holds
only the op calls.  Differences in the traced step:
- a tensor lr goes to the kernels as ``lr_tensor`` (read in double, as the
  eager ``.item()``), so a scheduler changing it does not recompile; a float
  lr is a constant of the graph (a new value compiles anew);
- the stochastic rounding seed is drawn by the op ``fastopt::rounding_seed``
  (the eager draw, opaque to the compiler, so the same numbers);
- the grad norm of max_grad_norm is the list op on lists per group and device;
- what the step records for later reads (``last_grad_norm``) goes into a
  dict: torch.compile drops a traced step's attribute writes on an optimizer.
The graph guards on the state it read: the first compiled step, which
creates the state, and the second, which finds it, compile separately.
Complex and DTensor params are not supported there (NotImplementedError).
"""
from __future__ import annotations

import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from . import _extension, _fake, clip, reference


@dataclass
class _Bucket:
    """The params of one device and dtype in a group with their state: one op
    call per step."""

    kernels: Any  # fastopt.reference or the compiled ops (fastopt._extension)
    device: torch.device
    dtype: torch.dtype
    fresh: bool  # holds params whose state was created this step
    # kernels.BoundTensors(params, slot lists, scalar-state lists, master
    # copies), or for DTensor params a _LocalShards with the list ops
    # (kernels is the reference)
    bound: Any
    # Complex params: (params, slot lists, scalar-state lists), bound as real
    # views each step (Note [Failed steps]); None for real params.
    complex_tensors: tuple[list[Tensor], list[list[Tensor]], list[list[Tensor]]] | None = None
    kind: Any = None  # the subclass's _bucket_kind of its params

    def bind_real_views(self) -> None:
        params, slots, scalar_states = self.complex_tensors
        views = []
        for p in params:
            view = torch.view_as_real(p)
            if p.grad is not None:
                view.grad = torch.view_as_real(p.grad)
            views.append(view)
        real_slots = [[torch.view_as_real(t) for t in slot] for slot in slots]
        self.bound = self.kernels.BoundTensors(views, real_slots, scalar_states, [])


@dataclass
class _Plan:
    key: tuple
    params: list[Tensor]  # the group's params when the plan was built
    buckets: list[_Bucket]
    waiting: list[Tensor]  # params without state that have had no grad yet
    single_use: bool  # built with fresh state: rebuild on the next step
    # The state of each param whose state this plan's build created or
    # completed, as it was before: restored if the step fails.
    created: list[tuple[Tensor, dict[str, Any] | None]]
    # What the subclass's _finish_group keeps while the plan holds (its
    # group's state lists), so that a step stays O(groups) Python work.
    memo: dict[str, Any] = field(default_factory=dict)


# Note [Large-model options]
# Keyword-only options of every fastopt optimizer, for all its params.  They
# are attributes of the optimizer, not param-group keys: param_groups stay
# exactly torch.optim's, so checkpoints (torch.distributed.checkpoint
# included) load both ways.
#   master_weights   float16 / bfloat16 params get a float32 copy in their
#                    state ("master_param") that the kernels update; the param
#                    receives its rounding.  Other params are unaffected.
#   state_dtype      dtype of the state slots (float32, bfloat16 or uint8);
#                    None: float32 with master weights, else the param's dtype.
#                    uint8: 8-bit block-quantized slots (Note [8-bit state] in
#                    csrc/rules/quantization.h) for float32 / float16 /
#                    bfloat16 params of at least min_8bit_size elements (the
#                    others keep float32 state, float64 params float64).  The
#                    codes are the slot under torch.optim's key (uint8, laid
#                    out like the param), the block scales a 1-D float32
#                    tensor under "<key>_scales"; the kernels dequantize,
#                    update and requantize both in one pass.  state_dict()
#                    saves them as they are; load_state_dict() quantizes a
#                    float state and dequantizes an 8-bit one into a float
#                    optimizer (_load_slot); dequantize_state_dict() gives
#                    torch.optim's layout.  DTensor params cannot have 8-bit
#                    state (the scales of a shard are not a DTensor).
#   min_8bit_size    with state_dtype=torch.uint8: params of fewer elements
#                    keep float32 state (bitsandbytes' min_8bit_size: on small
#                    tensors the memory saved is negligible and biases,
#                    norms and embeddings of few elements are sensitive).
#   stochastic_rounding  bfloat16 params without master weights are stored
#                    with stochastic rounding (Note [Stochastic rounding]).
# Complex params keep their dtype for all of these.
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_QUANTIZED = torch.uint8  # the state_dtype of 8-bit state
# Default of min_8bit_size: bitsandbytes' default, so that the same models
# keep the same tensors in float32.
MIN_8BIT_SIZE = 4096
# The state key of the block scales of 8-bit slot ``key``.
SCALES_SUFFIX = "_scales"


def large_model_options(master_weights: bool, state_dtype: torch.dtype | None,
                        stochastic_rounding: bool, min_8bit_size: int = MIN_8BIT_SIZE) -> dict[str, Any]:
    """The checked options of Note [Large-model options]."""
    if state_dtype not in (None, torch.float32, torch.bfloat16, _QUANTIZED):
        raise ValueError(f"Invalid state_dtype: {state_dtype} (supported: None, torch.float32, "
                         "torch.bfloat16, torch.uint8 (8-bit))")
    if master_weights and stochastic_rounding:
        raise ValueError("master_weights and stochastic_rounding exclude each other: with master "
                         "weights the float32 copy carries the precision")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r} (a non-negative int: params of fewer "
                         "elements keep float32 state with state_dtype=torch.uint8)")
    return {"master_weights": bool(master_weights), "state_dtype": state_dtype,
            "stochastic_rounding": bool(stochastic_rounding), "min_8bit_size": min_8bit_size}


def _has_master(options: dict[str, Any], param: Tensor) -> bool:
    return options["master_weights"] and param.dtype in _LOW_PRECISION


def _slot_dtype(options: dict[str, Any], param: Tensor) -> torch.dtype:
    """The dtype of ``param``'s state slots (Note [Large-model options]):
    torch.uint8 for 8-bit slots."""
    if not param.is_floating_point():
        return param.dtype
    if options["state_dtype"] == _QUANTIZED:
        if param.dtype == torch.float64:
            return torch.float64
        return _QUANTIZED if param.numel() >= options["min_8bit_size"] else torch.float32
    if options["state_dtype"] is not None:
        return options["state_dtype"]
    return torch.float32 if _has_master(options, param) else param.dtype


def _scales_key(slot: str) -> str:
    return slot + SCALES_SUFFIX


def _store_slot(options: dict[str, Any], param: Tensor, state: dict[str, Any], name: str,
                values: Tensor) -> None:
    """Stores the floating ``values`` of ``param``'s slot ``name`` in ``state``,
    on the param's device, in the slot dtype of Note [Large-model options]
    and laid out like ``values`` (a new slot: like the param, as torch.optim's
    zeros_like): for 8-bit slots the codes under ``name`` and the block
    scales under ``name + "_scales"``.  The one place where a slot is
    created or converted."""
    values = values.to(param.device)
    if _slot_dtype(options, param) == _QUANTIZED:
        codes, scales = reference.quantize_blocks(values)
        state[name] = torch.empty_like(values, dtype=_QUANTIZED, memory_format=torch.preserve_format).copy_(codes)
        state[_scales_key(name)] = scales
    else:
        state[name] = values.to(_slot_dtype(options, param))
        state.pop(_scales_key(name), None)


def _slot_scales_problem(param: Tensor, state: dict[str, Any], name: str) -> str | None:
    """What is wrong with the block scales of ``param``'s 8-bit slot ``name``, or None."""
    key = _scales_key(name)
    scales = state.get(key)
    expected = reference.num_quantization_blocks(param.numel())
    if (not isinstance(scales, Tensor) or scales.dtype != torch.float32 or scales.dim() != 1
            or scales.numel() != expected or scales.device != param.device or not scales.is_contiguous()):
        got = ("None" if scales is None else
               f"a {scales.dtype} tensor of shape {list(scales.shape)} on {scales.device}"
               + ("" if scales.is_contiguous() else " (not contiguous)")
               if isinstance(scales, Tensor) else type(scales).__name__)
        return (f"state[{key!r}] must be a contiguous 1-D float32 tensor of {expected} elements on "
                f"{param.device} (the block scales of the 8-bit state[{name!r}]), got {got}")
    return None


def _rounds_stochastically(options: dict[str, Any], dtype: torch.dtype) -> bool:
    """Whether params of ``dtype`` are stored with stochastic rounding (each
    step draws a seed for them)."""
    return options["stochastic_rounding"] and dtype == torch.bfloat16 and not options["master_weights"]


class _NothingChanged(Exception):
    """A step failed before changing anything; ``error`` says why."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _scalar(value: float | Tensor) -> float:
    """A hyperparameter as a Python number (``lr`` may be a 0-dim tensor)."""
    return value.item() if isinstance(value, Tensor) else value


def _same_params(bound: list[Tensor], current: list[Tensor]) -> bool:
    """Whether a group's params are still the ones bound.  Identity, not ==: a
    C-level pass (~20 ns a param) that also sees one param replaced in place
    in the list (model surgery)."""
    return len(bound) == len(current) and all(map(operator.is_, bound, current))


def _to(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    """``tensor`` on ``device``; copies to the CPU are synchronous (the CPU ops
    read the value at once; a non-blocking copy from CUDA could still be in
    flight)."""
    if tensor is None:
        return None
    return tensor.to(device, non_blocking=device.type != "cpu")


def _step_device(param: Tensor) -> torch.device:
    """Where a param's step count lives: on its accelerator, so kernels there
    read it without a host sync (as torch's fused and capturable optimizers
    keep it), else on the CPU."""
    return torch.device("cpu") if param.device.type == "cpu" else param.device


def _dtensor_type() -> type | None:
    """torch's DTensor class, or None while torch.distributed.tensor is not
    imported (then no DTensor exists, and importing it would take seconds)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (``to_local()`` without the view it makes
    for Parameters), a plain tensor itself."""
    dtensor = _dtensor_type()
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor) else t


class _LocalShards(reference.BoundTensors):
    """A bucket of DTensor params and their state, bound for the list ops
    ``ops`` (the compiled ops or the reference): each step runs them on the
    local shards (Note [Step plans])."""

    def __init__(self, ops: Any, params: list[Tensor], slots: list[list[Tensor]],
                 scalar_states: list[list[Tensor]], masters: list[Tensor]):
        super().__init__(params, slots, scalar_states, masters, ops=ops)

    def step_tensors(self):
        tensors = super().step_tensors()
        if tensors is None:
            return None
        params, grads, slots, scalar_states, masters, scales = tensors
        # A grad laid out unlike its param (e.g. Partial) is redistributed, as
        # torch.optim's ops on the DTensors would do implicitly.
        grads = [g if g.placements == p.placements else g.redistribute(p.device_mesh, p.placements)
                 for p, g in zip(params, grads)]
        # The ops change the local shards in place; autograd checks the
        # DTensors' own version counters, as torch's in-place ops bump them.
        torch.autograd.graph.increment_version(params)
        return ([_local(p) for p in params], [_local(g) for g in grads],
                [[_local(t) for t in slot] for slot in slots], scalar_states, [_local(m) for m in masters],
                [_local(t) for t in scales])


@dataclass
class _GradBindings:
    """Every param of the optimizer bound once per (group, device) for
    ``grad_sq_norm_bound_`` (max_grad_norm), rebuilt when a group's params
    change, as the step plans are."""

    group_params: list[list[Tensor]]  # each group's params when bound
    buckets: list[tuple[torch.device, Any, Any]]  # (device, kernels, BoundTensors)
    norm_dtype: torch.dtype  # the dtype torch's clip_grad_norm_ gives their norm

    def fits(self, param_groups: list[dict[str, Any]]) -> bool:
        return len(self.group_params) == len(param_groups) and all(
            _same_params(params, group["params"]) for params, group in zip(self.group_params, param_groups))


class FusedOptimizer(torch.optim.Optimizer):
    """Base class of fastopt optimizers (see Note [Step plans]).

    A subclass declares its op and state (see "what a subclass declares"
    below): ``_op``, ``_op_slots``, ``_scalar_states``, ``_hyper(group)`` and,
    where its options change them, ``_slot_names(group)``,
    ``_init_slots(group, param, state)`` and ``_initial_scalar_state``;
    ``_bucket_kind`` where some params take other hyperparameters (LARS's
    excluded 1-D params), ``_norms_per_param`` where its rule takes norms of
    whole params (no DTensor shards), ``_bound_in_python`` where its ``_run``
    calls several ops with Python between them (Muon; ``_binds_in_python``
    where only some kinds of bucket do: Adafactor's matrices),
    ``_param_slot_names`` where a kind of param keeps other state
    (Adafactor's factored matrices), ``_check_groups`` for torch.optim's
    checks in its step and ``_finish_group`` for work on a whole group after
    its ops (SWATS's switch).

    ``max_grad_norm`` (keyword-only in every optimizer; None: off, the
    default but for LAMB's 1.0, Apex's) clips as
    ``torch.nn.utils.clip_grad_norm_(all params, max_grad_norm)`` before each
    step would, fused into it (Note [Fused gradient clipping] in
    fastopt/clip.py); ``last_grad_norm`` is the norm the last step saw.
    """

    # The op a step runs: fastopt::<_op>_bound_ (compiled) or
    # fastopt.reference.<_op>_bound_, whose list op takes the state lists in
    # the order of the optimizer's row of csrc/optimizer_table.h.
    _op: str
    # torch.optim's state key of each of the op's slot lists, in op order.
    _op_slots: tuple[str, ...] = ()
    # torch.optim's state key of each of the op's per-tensor scalar states
    # (0-dim float32 tensors, "step" first where the optimizer counts steps).
    _scalar_states: tuple[str, ...] = ("step",)
    # torch.amp.GradScaler.step sets ``grad_scale`` and ``found_inf`` on
    # optimizers that advertise this; the kernels unscale the grads in
    # registers and skip the whole step when found_inf is nonzero.
    _step_supports_amp_scaling = True
    # State tensors some params keep instead of the op's slots (see
    # ``_param_slot_names``), loaded as slots are.
    _other_slots: tuple[str, ...] = ()
    # Slots torch.optim creates lazily, so a loaded state may lack them.
    _optional_slots: tuple[str, ...] = ()
    # torch.optim's error for a sparse grad; None where sparse grads are supported.
    _sparse_grad_error: str | None = None
    # The rule takes norms of whole params (Note [Reduction phase] in
    # csrc/rules/reduction.h): a DTensor's local shard cannot be stepped alone.
    _norms_per_param: bool = False
    # The step runs Python between op calls (Muon's orthogonalization): its
    # buckets bind their lists in Python (reference.BoundTensors over the
    # bucket's list ops), which its ``_run`` reads.
    _bound_in_python: bool = False

    def __init__(self, params, defaults: dict[str, Any], *, backend: str | None,
                 max_grad_norm: float | None = None, options: dict[str, Any]) -> None:
        if defaults.get("differentiable"):
            raise ValueError(
                f"fastopt.{type(self).__name__} does not support differentiable=True: its fused "
                f"steps are not recorded by autograd; use torch.optim.{type(self).__name__}"
            )
        self._backend = _extension.resolve_backend(backend)
        self._options = options  # Note [Large-model options]
        self._plans: dict[int, _Plan] = {}
        self.max_grad_norm = max_grad_norm
        self._reset_clip_state()
        super().__init__(params, defaults)
        if self._backend == "fused":
            for group in self.param_groups:
                for p in group["params"]:
                    _extension.kernels_for("fused", p.device)

    # -- what a subclass declares -------------------------------------------
    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """The op's keyword arguments from ``group``: its hyperparameters but
        lr (which ``_step_args`` gives), and ``maximize``."""
        raise NotImplementedError

    def _slot_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The slots ``group``'s options keep, in op order (a subset of ``_op_slots``)."""
        return self._op_slots

    def _param_slot_names(self, group: dict[str, Any], param: Tensor) -> tuple[str, ...]:
        """The state tensors ``param`` keeps besides its scalar states: the
        group's slots, unless the kind of param changes them (Adafactor's
        factors of a matrix, which are not shaped like it)."""
        return self._slot_names(group)

    def _init_slots(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        """Creates the missing slots of ``state`` for ``param`` (zeros by
        default) with ``_new_slot``."""
        for name in self._param_slot_names(group, param):
            if state.get(name) is None:
                self._new_slot(param, state, name)

    def _initial_scalar_state(self, group: dict[str, Any], param: Tensor, name: str) -> float | Tensor:
        """The value scalar state ``name`` starts with (the step count: 0); a
        one-element tensor (ASGD's eta from a tensor lr) is copied, not read."""
        return 0.0

    def _run(self, group: dict[str, Any], bucket: _Bucket, step_args: dict[str, Any]) -> None:
        """Calls the bucket's ``<_op>_bound_`` op with the group's
        hyperparameters and ``**step_args`` (lr and the per-step tensors, see
        ``_step_args``)."""
        getattr(bucket.kernels, f"{self._op}_bound_")(bucket.bound, **step_args, **self._hyper(group))

    def _finish_group(self, group: dict[str, Any], memo: dict[str, Any], found_inf: Tensor | None) -> None:
        """Runs after the ops of ``group``'s buckets in a step: the per-group
        work of an optimizer whose decisions span the group (SWATS's switch).
        ``memo``: kept with the group's step plan (empty again when the plan is
        rebuilt: state or params changed), for lists of the group's state.
        ``found_inf``: the step's AMP / clip flag (nonzero: the ops changed nothing)."""

    def _binds_in_python(self, kind: Any) -> bool:
        """Whether buckets of ``kind`` bind their lists in Python: all where
        ``_bound_in_python`` (Muon); Adafactor's matrices only."""
        return self._bound_in_python

    def _bucket_kind(self, group: dict[str, Any], param: Tensor) -> Any:
        """Params of different kinds go to different buckets (op calls), which
        ``_run`` can call with different hyperparameters (``bucket.kind``)."""
        return None

    def _check_groups(self) -> None:
        """Raises for hyperparameters or params the torch.optim class rejects
        only in its step (Muon's ``ns_steps``, complex params), before anything
        changes."""

    def _sparse_grad_problem(self, group: dict[str, Any]) -> str | None:
        """Why a sparse grad cannot be stepped with ``group``'s options
        (torch.optim's message), or None."""
        return self._sparse_grad_error

    # -- torch.optim.Optimizer interface ----------------------------------------
    @property
    def master_weights(self) -> bool:
        """Whether float16 / bfloat16 params have float32 master copies (Note [Large-model options])."""
        return self._options["master_weights"]

    @property
    def state_dtype(self) -> torch.dtype | None:
        """The state_dtype this optimizer was created with (None: the default)."""
        return self._options["state_dtype"]

    @property
    def min_8bit_size(self) -> int:
        """With ``state_dtype=torch.uint8``: params of fewer elements keep float32 state."""
        return self._options.get("min_8bit_size", MIN_8BIT_SIZE)

    @property
    def stochastic_rounding(self) -> bool:
        """Whether bfloat16 params without master copies are stored with stochastic rounding."""
        return self._options["stochastic_rounding"]

    @property
    def backend(self) -> str:
        """The backend this optimizer was created with: auto, fused or reference."""
        return self._backend

    @property
    def max_grad_norm(self) -> float | None:
        """The max norm the grads are clipped to in each step (None: no clipping)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        self._max_grad_norm = clip.check_max_grad_norm(value)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_backend"] = self._backend
        state["_options"] = self._options
        state["_max_grad_norm"] = self._max_grad_norm
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict also lands here, with only state and param_groups:
        # it must keep the backend and max_grad_norm this optimizer was created with.
        if "_backend" not in state:
            state["_backend"] = getattr(self, "_backend", "auto")
        if "_options" not in state:
            state["_options"] = getattr(self, "_options", large_model_options(False, None, False))
        if "_max_grad_norm" not in state:
            state["_max_grad_norm"] = getattr(self, "_max_grad_norm", None)
        super().__setstate__(state)
        self._plans = {}
        self._reset_clip_state()

    def _reset_clip_state(self) -> None:
        # What a step records for later reads: in a dict, because torch.compile
        # keeps a traced step's writes to a dict but drops its attribute writes
        # on an optimizer (Note [Compiled steps]).
        self._step_record: dict[str, Any] = {"called": False, "last_grad_norm": None}
        self._grad_bindings: _GradBindings | None = None
        # (the bindings they were taken with, sums of squares of the grads per
        # device), set by fastopt.GradScaler for the one step that follows its
        # inf check (fastopt/amp.py).
        self._scaler_grad_sq_sums: tuple[_GradBindings, dict[torch.device, Tensor]] | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's ``load_state_dict``, which checks the number and sizes
        of the param groups, plus a check that the loaded groups and state fit
        this optimizer and its params: else a ValueError and nothing changes
        (load-state-dict post hooks have run by then)."""
        previous = {"state": self.state, "param_groups": self.param_groups}
        super().load_state_dict(state_dict)
        try:
            self._recast_loaded_state(state_dict)
            self._check_loaded_state()
        except Exception:
            self.__setstate__(previous)  # the load replaced these objects, it did not change them
            raise

    def _recast_loaded_state(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load_state_dict casts all state but ``step`` to the
        param's dtype; fastopt keeps master copies in float32, slots in the
        optimizer's state dtype (Note [Large-model options]; 8-bit codes and
        their scales included) and every scalar state as saved, as
        torch.optim keeps ``step`` (a bfloat16 NAdam ``mu_product`` would lose
        its precision), so those are taken again from the saved tensors,
        without the lossy cast."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key, value in saved.items():
                if key in self._scalar_states:
                    self.state[p][key] = value
                elif not isinstance(value, Tensor) or not p.is_floating_point():
                    continue
                elif key in self._op_slots or key in self._other_slots:
                    self._load_slot(p, self.state[p], key, value, saved.get(_scales_key(key)))
                elif key == "master_param" and p.dtype != torch.float32:
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    def _load_slot(self, param: Tensor, state: dict[str, Any], name: str, saved: Tensor,
                   saved_scales: Any) -> None:
        """Slot ``name`` of ``param`` from its saved tensor (and the saved block
        scales of an 8-bit one) in this optimizer's storage: 8-bit state is
        kept as saved or dequantized, float state cast or quantized.  What
        does not fit (codes without fitting scales) is kept as saved, for
        ``_check_loaded_state`` to name."""
        fits = (saved.dtype == _QUANTIZED and isinstance(saved_scales, Tensor)
                and saved_scales.dtype == torch.float32 and list(saved.shape) == list(param.shape)
                and saved_scales.numel() == reference.num_quantization_blocks(saved.numel()))
        if fits and _slot_dtype(self._options, param) == _QUANTIZED:
            state[name] = saved.to(param.device)
            state[_scales_key(name)] = saved_scales.to(param.device)
        elif fits:
            values = reference.dequantize_blocks(saved.to(param.device), saved_scales.to(param.device))
            _store_slot(self._options, param, state, name, torch.empty_like(
                saved, dtype=torch.float32, device=param.device, memory_format=torch.preserve_format).copy_(values))
        elif saved.is_floating_point():
            _store_slot(self._options, param, state, name, saved)
        else:
            state[name] = saved
            if saved_scales is not None:
                state[_scales_key(name)] = saved_scales

    def _check_loaded_state(self) -> None:
        where = f"fastopt.{type(self).__name__}.load_state_dict"
        for g, group in enumerate(self.param_groups):
            # torch.optim's __setstate__ adds "differentiable" to the defaults of
            # every optimizer, also of those without such an argument (Muon).
            missing = [key for key in self.defaults if key not in group and key != "differentiable"]
            if missing:
                raise ValueError(f"{where}: the loaded param_groups[{g}] has no {missing} (the "
                                 "state_dict of another optimizer?); nothing was changed")
            for j, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not state:
                    continue
                required = [name for name in self._param_slot_names(group, p) if name not in self._optional_slots]
                required += list(self._scalar_states)
                param = f"param_groups[{g}]['params'][{j}]"
                missing = [key for key in required if state.get(key) is None]
                if missing:
                    raise ValueError(f"{where}: the loaded state of {param} has no {missing}; expected "
                                     f"{required} (the state_dict of another optimizer, or saved with "
                                     "other options?); nothing was changed")
                for name in self._scalar_states:
                    if not isinstance(state[name], Tensor):
                        # Saved as a number (older torch), converted as torch.optim does.
                        state[name] = torch.tensor(float(state[name]), dtype=torch.float32)
                problem = self._state_layout_problem(group, p, state) or reference.tensor_problem(
                    "the param", p, self._state_tensors(group, p, state),
                    {f"state[{name!r}]": state[name] for name in self._scalar_states}, complex_ok=True,
                    dtypes=self._state_dtypes(group, p))
                if problem is not None:
                    raise ValueError(
                        f"{where}: the loaded state of {param}: {problem}; nothing was changed")

    def _state_layout_problem(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> str | None:
        """What is wrong with ``param``'s state that ``reference.tensor_problem``
        does not check, or None: the block scales of its 8-bit slots (or
        scales left next to a slot that could not be dequantized)."""
        quantized = _slot_dtype(self._options, param) == _QUANTIZED
        for name in self._param_slot_names(group, param):
            if state.get(name) is not None and (quantized or _scales_key(name) in state):
                problem = _slot_scales_problem(param, state, name)
                if problem is not None:
                    return problem
        return None

    def _state_tensors(self, group: dict[str, Any], param: Tensor,
                       state: dict[str, Any]) -> dict[str, Tensor]:
        """The state tensors of ``param`` the kernels read, by their name in messages."""
        names = self._param_slot_names(group, param)
        names += ("master_param",) if _has_master(self._options, param) else ()
        return {f"state[{key!r}]": state[key] for key in names if state.get(key) is not None}

    def _state_dtypes(self, group: dict[str, Any], param: Tensor) -> dict[str, torch.dtype]:
        """The dtype each state tensor of ``param`` must have, by its name in messages."""
        return {**{f"state[{key!r}]": _slot_dtype(self._options, param)
                   for key in self._param_slot_names(group, param)},
                "state['master_param']": torch.float32}

    def _new_slot(self, param: Tensor, state: dict[str, Any], name: str, fill: Any = 0) -> None:
        """Creates ``param``'s slot ``name`` in ``state``, filled with ``fill``, in
        the optimizer's state dtype (8-bit: quantized, with its block scales);
        a one-element tensor ``fill`` (Rprop's step size from a tensor lr) is
        copied, not read."""
        dtype = _slot_dtype(self._options, param)
        if dtype == _QUANTIZED:
            dtype = torch.float32  # the values, quantized by _store_slot
        if isinstance(fill, Tensor):
            values = torch.empty_like(param, dtype=dtype, memory_format=torch.preserve_format).copy_(fill.reshape(()))
        else:
            values = torch.full_like(param, fill, dtype=dtype, memory_format=torch.preserve_format)
        _store_slot(self._options, param, state, name, values)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_dtensor_params(self.param_groups[-1]["params"])
        except NotImplementedError:
            self.param_groups.pop()
            raise
        if getattr(self, "_backend", None) == "fused":
            for p in self.param_groups[-1]["params"]:
                _extension.kernels_for("fused", p.device)
        self.invalidate_plans()

    def invalidate_plans(self) -> None:
        """Forget the cached tensor lists; the next step rebuilds them from
        ``param_groups`` and ``state``."""
        if hasattr(self, "_plans"):
            self._plans.clear()
            self._grad_bindings = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs a single optimization step (one fused op per device and
        dtype of each param group).

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        self._step_record["called"] = True  # what the LR schedulers' step wrapper records (see below)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():  # Note [Compiled steps]
            self._traced_step()
            return loss
        try:
            self._apply(self._step_plans())
        except _NothingChanged as failure:
            sparse = self._raise_for_invalid_tensors(failure.error)
            try:
                self._apply(self._step_plans(reference if sparse else None), checked=sparse)
            except _NothingChanged as retry:
                raise retry.error from None
        return loss

    # An LR scheduler wraps ``optimizer.step`` in a function of its own module
    # to learn that it was called (for a warning on the order of the calls);
    # torch.compile never traces that module, so a compiled training step
    # with a scheduler would break there.  fastopt's step records the call
    # itself (``_opt_called``) and says so, and the scheduler leaves it
    # unwrapped (the mark survives torch.optim's hook wrapper, which copies it).
    step._wrapped_by_lr_sched = True

    @property
    def _opt_called(self) -> bool:
        """Whether ``step`` has run, for the LR schedulers' order check."""
        return self._step_record["called"]

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The grad norm the last clipped step saw (unscaled), or None."""
        return self._step_record["last_grad_norm"]

    def _traced_step(self) -> None:
        """The step while torch.compile traces it (Note [Compiled steps]): the
        list ops on lists gathered in Python, which the compiler sees through."""
        self._check_groups()
        grad_scale, found_inf, grad_norm = self._step_scales(traced=True)
        for group in self.param_groups:
            lists, _, _ = self._bucket_lists(group)
            for (device, dtype, fresh, sharded, kind), (params, slots, scalar_states, masters, scales) in lists:
                if dtype.is_complex or sharded:
                    raise NotImplementedError(
                        f"fastopt.{type(self).__name__}: a compiled step supports real, non-DTensor "
                        f"params only (got {'complex' if dtype.is_complex else 'DTensor'} params); "
                        "step outside torch.compile")
                bound = reference.BoundTensors(params, slots, scalar_states, masters, scales,
                                               ops=_extension.kernels_for(self._backend, device))
                bucket = _Bucket(reference, device, dtype, fresh, bound, kind=kind)
                self._run(group, bucket, self._step_args(group, bucket, grad_scale, found_inf, traced=True))
            if lists:
                self._finish_group(group, {}, found_inf)
        if grad_norm is not None:
            self._step_record["last_grad_norm"] = grad_norm

    def _step_plans(self, kernels: Any = None) -> list[_Plan]:
        self._check_groups()
        plans: list[_Plan] = []
        try:
            for index, group in enumerate(self.param_groups):
                plans.append(self._plan(index, group, kernels))
        except Exception:  # e.g. _check_8bit_params: the earlier groups' new state goes again
            self.invalidate_plans()
            self._restore_created_state(plans)
            raise
        return plans

    def _apply(self, plans: list[_Plan], checked: bool = False) -> None:
        """Runs every bucket of ``plans`` (``checked``: every tensor is known to
        fit); raises ``_NothingChanged`` when it fails before changing anything."""
        runs = [(group, bucket) for group, plan in zip(self.param_groups, plans)
                for bucket in plan.buckets]
        ran_any = False
        try:
            grad_scale, found_inf, grad_norm = self._step_scales()
            for _, bucket in runs:
                if bucket.complex_tensors is not None:
                    bucket.bind_real_views()
            if not checked:
                # Note [Atomic steps across buckets]: the first op checks its own
                # tensors before changing anything; the others' are checked now.
                for _, bucket in runs[1:]:
                    bucket.bound.check()
            for group, plan in zip(self.param_groups, plans):
                for bucket in plan.buckets:
                    self._run(group, bucket, self._step_args(group, bucket, grad_scale, found_inf))
                    ran_any = True
                    if self._binds_in_python(bucket.kind):
                        # As torch.optim's in-place ops (and the bound ops, csrc/bound_ops.cpp),
                        # which the list ops its _run calls do not.
                        torch.autograd.graph.increment_version(
                            [p for p in bucket.bound.params if p.grad is not None])
                if plan.buckets:
                    self._finish_group(group, plan.memo, found_inf)
            if grad_norm is not None:
                self._step_record["last_grad_norm"] = grad_norm
        except Exception as error:
            self.invalidate_plans()
            if ran_any:  # tensors were checked: not a failure of the tensors
                raise
            self._restore_created_state(plans)
            raise _NothingChanged(error) from error

    def _restore_created_state(self, plans: list[_Plan]) -> None:
        for plan in plans:
            for p, before in plan.created:
                if before is None:
                    self.state.pop(p, None)
                else:
                    self.state[p].clear()
                    self.state[p].update(before)

    def _raise_for_invalid_tensors(self, error: Exception) -> bool:
        """After a failed step, raises (from ``error``) naming the first param
        whose grad or state does not fit it; else returns whether some grad
        is sparse."""
        name = type(self).__name__
        sparse = False
        for g, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"param_groups[{g}]['params'][{j}]"
                if p.grad.is_sparse:
                    sparse = True
                    problem = self._sparse_grad_problem(group)
                    if problem is not None:
                        raise RuntimeError(f"{problem} (got a sparse grad for {where})") from error
                state = self.state.get(p, {})
                tensors = {"grad": p.grad, **self._state_tensors(group, p, state)}
                scalar_states = {f"state[{key!r}]": state[key] for key in self._scalar_states if key in state}
                problem = self._state_layout_problem(group, p, state) or reference.tensor_problem(
                    "the param", p, tensors, scalar_states, complex_ok=True, sparse_ok=("grad",),
                    dtypes=self._state_dtypes(group, p))
                if problem is not None:
                    raise RuntimeError(
                        f"fastopt.{name}.step: {where}: {problem}; nothing was changed") from error
        return sparse

    def _step_scales(self, traced: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """This step's ``grad_scale`` and ``found_inf`` for the ops: AMP's (set
        by GradScaler.step) with the clip coefficient folded in, and the grad
        norm (None without max_grad_norm).  ``traced``: Note [Compiled steps]."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # fastopt.GradScaler's sums hold for this step only, whether used or not.
        scaler_sums, self._scaler_grad_sq_sums = self._scaler_grad_sq_sums, None
        if self._max_grad_norm is None:
            return grad_scale, found_inf, None
        # The sums fastopt.GradScaler took are this step's if taken with the
        # same bindings (a traced step binds nothing: it reads the grads anew).
        if traced:
            bindings = self._grad_bindings
            norm_dtype = clip.norm_dtype([p for group in self.param_groups for p in group["params"]])
        else:
            bindings = self._bound_grads()
            norm_dtype = bindings.norm_dtype
        sq_sums = (scaler_sums[1] if scaler_sums is not None and scaler_sums[0] is bindings
                   else self._grad_sq_sums())
        return clip.clipped_step_scales(sq_sums, self._max_grad_norm, grad_scale, found_inf, norm_dtype)

    def _bound_grads(self) -> _GradBindings:
        if self._grad_bindings is None or not self._grad_bindings.fits(self.param_groups):
            self._grad_bindings = self._bind_grads()
        return self._grad_bindings

    def _grad_sq_sums(self) -> dict[torch.device, Tensor]:
        """The sum of squares of all grads of this optimizer per device
        (float64 on that device): one ``grad_sq_norm`` pass over them, per
        group and device.  Traced by torch.compile, the list op on lists
        gathered in Python (Note [Compiled steps])."""
        if torch.compiler.is_compiling():
            buckets = [(device, reference, reference.BoundTensors(params, [], [], [], ops=kernels))
                       for device, kernels, params in self._grad_buckets()]
        else:
            buckets = self._bound_grads().buckets
        sums: dict[torch.device, Tensor] = {}
        for device, kernels, bound in buckets:
            sq_sum = kernels.grad_sq_norm_bound_(bound)
            sums[device] = sq_sum if device not in sums else sums[device] + sq_sum
        return sums

    def _bind_grads(self) -> _GradBindings:
        buckets = [(device, kernels, kernels.BoundTensors(params, [], [], []))
                   for device, kernels, params in self._grad_buckets()]
        params = [p for group in self.param_groups for p in group["params"]]
        return _GradBindings([list(group["params"]) for group in self.param_groups], buckets,
                             clip.norm_dtype(params))

    def _grad_buckets(self) -> list[tuple[torch.device, Any, list[Tensor]]]:
        """Every param of this optimizer, per group and device, with the
        kernels of that device: (device, kernels, params)."""
        dtensor = _dtensor_type()
        buckets = []
        for group in self.param_groups:
            by_device: dict[torch.device, list[Tensor]] = {}
            for p in group["params"]:
                if dtensor is not None and isinstance(p, dtensor):
                    raise NotImplementedError(
                        f"fastopt.{type(self).__name__}: max_grad_norm with DTensor params (FSDP2, "
                        "tensor parallel) is not supported: the norm needs a reduction across ranks; "
                        "use torch.nn.utils.clip_grad_norm_ before the step instead")
                by_device.setdefault(p.device, []).append(p)
            for device, params in by_device.items():
                buckets.append((device, _extension.kernels_for(self._backend, device), params))
        return buckets

    def _step_args(self, group: dict[str, Any], bucket: _Bucket, grad_scale: Tensor | None,
                   found_inf: Tensor | None, traced: bool = False) -> dict[str, Any]:
        """The lr and the per-step tensors of one op call (Note [fastopt op
        schemas]).  A tensor lr on the bucket's accelerator is read there by
        the kernels (no host sync: capturable); any other lr as a number,
        except in a traced step (Note [Compiled steps]), where every tensor lr
        goes to the kernels, which read it in double as ``.item()`` would."""
        lr = group["lr"]
        lr_tensor = None
        if isinstance(lr, Tensor) and (traced or (lr.device.type != "cpu" and lr.device == bucket.device)):
            lr, lr_tensor = 0.0, lr if lr.device == bucket.device else _to(lr, bucket.device)
        seed = None
        if _rounds_stochastically(self._options, bucket.dtype):
            seed = (torch.ops.fastopt.rounding_seed(bucket.bound.params[0]) if traced
                    else _fake.draw_rounding_seed())
        return {
            "lr": _scalar(lr),
            "lr_tensor": lr_tensor,
            "grad_scale": _to(grad_scale, bucket.device),
            "found_inf": _to(found_inf, bucket.device),
            "rounding_seed": seed,
        }

    # -- plans ---------------------------------------------------------------
    def _plan(self, index: int, group: dict[str, Any], kernels: Any = None) -> _Plan:
        """The group's cached plan, rebuilt when stale; ``kernels``: a single-use
        plan whose buckets all run on these kernels."""
        key = (id(group), self._slot_names(group))
        plan = self._plans.get(index)
        if (
            kernels is not None
            or plan is None
            or plan.key != key
            or plan.single_use
            or not _same_params(plan.params, group["params"])
            or any(p.grad is not None for p in plan.waiting)
        ):
            plan = self._build_plan(group, key, kernels)
            self._plans[index] = plan
        return plan

    def _build_plan(self, group: dict[str, Any], key: tuple, kernels: Any = None) -> _Plan:
        lists, waiting, created = self._bucket_lists(group)
        buckets = []
        for (device, dtype, fresh, sharded, kind), (params, slots, scalar_states, masters, scales) in lists:
            bucket_kernels = kernels or _extension.kernels_for(self._backend, device)
            if dtype.is_complex:
                complex_tensors = (params, slots, scalar_states)
                buckets.append(_Bucket(bucket_kernels, device, dtype, fresh, None, complex_tensors, kind=kind))
            elif sharded:
                bound = _LocalShards(bucket_kernels, params, slots, scalar_states, masters)
                buckets.append(_Bucket(reference, device, dtype, fresh, bound, kind=kind))
            elif self._binds_in_python(kind):
                bound = reference.BoundTensors(params, slots, scalar_states, masters, scales, ops=bucket_kernels)
                buckets.append(_Bucket(reference, device, dtype, fresh, bound, kind=kind))
            else:
                bound = bucket_kernels.BoundTensors(params, slots, scalar_states, masters, scales)
                buckets.append(_Bucket(bucket_kernels, device, dtype, fresh, bound, kind=kind))
        single_use = kernels is not None or any(bucket.fresh for bucket in buckets)
        return _Plan(key, list(group["params"]), buckets, waiting, single_use, created)

    def _complete_state(self, group: dict[str, Any], p: Tensor, create: bool) -> dict[str, Any]:
        """``p``'s state, with its missing scalar states (step count, ...) and
        slots created when ``create``, its scalar states where the kernels
        read them and its master copy (if it has one) made when missing."""
        state = self.state[p] if create or p in self.state else {}  # no empty entries
        if create:
            for name in self._scalar_states:
                if state.get(name) is None:
                    # full, not tensor(value): no host-to-device copy per param; a tensor
                    # value is copied without a host read (none for torch.compile to break on)
                    value = self._initial_scalar_state(group, p, name)
                    state[name] = (
                        torch.empty((), dtype=torch.float32, device=_step_device(p)).copy_(value.reshape(()))
                        if isinstance(value, Tensor)
                        else torch.full((), value, dtype=torch.float32, device=_step_device(p)))
            self._init_slots(group, p, state)
        for name in self._scalar_states:
            value = state.get(name)
            if value is not None and (value.device != _step_device(p) or (
                    p.device.type != "cpu" and value.dtype != torch.float32)):
                # e.g. loaded from torch.optim, which keeps steps on the CPU;
                # the CUDA kernels read and write float32 states on the device.
                state[name] = value.to(_step_device(p), torch.float32)
        if _has_master(self._options, p) and state.get("master_param") is None:
            # New, or loaded from a state_dict without one (torch.optim's).
            state = self.state[p]
            state["master_param"] = p.detach().to(torch.float32, copy=True)
        return state

    def _bucket_lists(self, group: dict[str, Any]):
        """The group's params with a grad or state, split into buckets, each
        as ((device, dtype, fresh, DTensor?, kind), (params, one list per slot of the
        op (empty for slots the options leave out), one list per scalar state,
        master copies, one list of block scales per slot of the op (empty for
        slots that are not 8-bit))) in the order they step; the params still
        waiting for their first grad; and the state this created or completed,
        as it was before (see _Plan).  Creates missing state.  Params whose
        slots are 8-bit and those whose slots are not go to separate buckets
        (one op call takes one state dtype), as are params of different
        ``_bucket_kind``."""
        self._check_dtensor_params(group["params"])
        # (device, dtype, 8-bit?, fresh, DTensor?, occurrence, kind)
        #   -> (params, slot lists, scalar-state lists, masters, scale lists)
        lists: dict[tuple, tuple[list[Tensor], list[list[Tensor]], list[list[Tensor]], list[Tensor],
                                 list[list[Tensor]]]] = {}
        waiting: list[Tensor] = []
        created: list[tuple[Tensor, dict[str, Any] | None]] = []
        created_ids: set[int] = set()
        occurrences: dict[int, int] = {}  # by id(param): entries seen so far
        dtensor = _dtensor_type()
        for p in group["params"]:
            occurrence = occurrences.get(id(p), 0)
            occurrences[id(p)] = occurrence + 1
            state = self.state.get(p, {})
            slot_names = self._param_slot_names(group, p)
            required = slot_names + self._scalar_states
            # A second entry of a param whose state this step creates starts
            # fresh too: torch.optim gathers all entries' state before stepping.
            fresh = id(p) in created_ids or any(state.get(name) is None for name in required)
            if fresh and p.grad is None:
                waiting.append(p)
                continue
            create = fresh and id(p) not in created_ids
            if create:
                created_ids.add(id(p))
                created.append((p, dict(state) if p in self.state else None))
            state = self._complete_state(group, p, create)
            sharded = dtensor is not None and isinstance(p, dtensor)
            quantized = _slot_dtype(self._options, p) == _QUANTIZED
            params, slots, scalar_states, masters, scales = lists.setdefault(
                (p.device, p.dtype, quantized, fresh, sharded, occurrence, self._bucket_kind(group, p)),
                ([], [[] for _ in self._op_slots], [[] for _ in self._scalar_states], [],
                 [[] for _ in self._op_slots]))
            params.append(p)
            for slot, slot_scales, name in zip(slots, scales, self._op_slots):
                if name in slot_names:
                    slot.append(state[name])
                    if quantized:
                        slot_scales.append(state[_scales_key(name)])
            for states, name in zip(scalar_states, self._scalar_states):
                states.append(state[name])
            if _has_master(self._options, p):
                masters.append(state["master_param"])
        # Sorted by occurrence: a param's second entry steps after its first.
        ordered = sorted(lists.items(), key=lambda item: item[0][5])
        return [((device, dtype, fresh, sharded, kind), tensors)
                for (device, dtype, _, fresh, sharded, _, kind), tensors in ordered], waiting, created

    def _check_dtensor_params(self, params: list[Tensor]) -> None:
        """Raises NotImplementedError for a DTensor param that this optimizer
        cannot step on its local shard (before any state is created): one
        whose rule takes norms of whole params, or that would get 8-bit state."""
        dtensor = _dtensor_type()
        if dtensor is None:
            return
        for p in params:
            if isinstance(p, dtensor) and self._norms_per_param:
                raise NotImplementedError(
                    f"fastopt.{type(self).__name__}: DTensor params (FSDP2, tensor parallel) are not "
                    "supported: its step takes the norm of each whole param, which a shard's step "
                    "cannot see without a reduction across ranks")
            if isinstance(p, dtensor) and _slot_dtype(self._options, p) == _QUANTIZED:
                raise NotImplementedError(
                    f"fastopt.{type(self).__name__}: state_dtype=torch.uint8 with DTensor params (FSDP2, "
                    "tensor parallel) is not supported: the block scales of a shard's 8-bit state are "
                    "not a DTensor; use state_dtype=torch.bfloat16, or a min_8bit_size above "
                    f"{p.numel()} (the elements of this param)")


def dequantize_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of an optimizer ``state_dict`` in torch.optim's layout: each
    8-bit slot (a uint8 tensor ``state[key]`` next to its block scales
    ``state[key + "_scales"]``, Note [Large-model options]) replaced by its
    float32 values, shaped and laid out like the codes, and the scales
    entries dropped; everything else as it was (tensors shared, as
    ``state_dict()`` shares them with the optimizer).  The result loads into
    torch.optim, or into a fastopt optimizer with float state."""
    state = {}
    for index, param_state in state_dict["state"].items():
        quantized = {key for key, value in param_state.items()
                     if isinstance(value, Tensor) and value.dtype == _QUANTIZED
                     and isinstance(param_state.get(_scales_key(key)), Tensor)}
        converted = {}
        for key, value in param_state.items():
            if key in quantized:
                converted[key] = torch.empty_like(value, dtype=torch.float32, memory_format=torch.preserve_format)
                converted[key].copy_(reference.dequantize_blocks(value, param_state[_scales_key(key)]))
            elif not (key.endswith(SCALES_SUFFIX) and key[:-len(SCALES_SUFFIX)] in quantized):
                converted[key] = value
        state[index] = converted
    return {**state_dict, "state": state, "param_groups": [dict(group) for group in state_dict["param_groups"]]}

__all__ = ["FusedOptimizer", "dequantize_state_dict"]
