"""How each implementation builds a step function over one param set.

Every builder takes an optimizer spec and a list of params whose ``.grad``
is set, and returns a zero-argument callable that performs one step.  A
builder raises :class:`Unsupported` (with a note for the report) when the
implementation does not exist for that optimizer, dtype or device.

A spec with ``max_grad_norm`` is a training pipeline (:class:`PipelineStep`):
the AMP GradScaler and gradient clipping around the step.  torch's
implementations run torch's recipe (``scaler.unscale_``, ``clip_grad_norm_``,
``scaler.step``, ``scaler.update``), fastopt's run the same semantics fused
(``fastopt.GradScaler`` and ``max_grad_norm=``).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
from torch import Tensor

from .optimizers import OptimizerSpec

Step = Callable[[], object]

FASTOPT_IMPLS = ("fastopt-fused", "fastopt-reference")
TORCH_IMPLS = ("torch-forloop", "torch-foreach", "torch-fused")
IMPLS = FASTOPT_IMPLS + TORCH_IMPLS + ("pypi", "deepspeed", "apex", "roofline")
# Implementations that need the compiled fastopt extension.
NEEDS_EXTENSION = ("fastopt-fused", "roofline")


class Unsupported(Exception):
    """The implementation does not exist for this case; the message says why."""


def _fastopt(backend: str) -> Callable[[OptimizerSpec, list[Tensor]], Step]:
    def build(spec: OptimizerSpec, params: list[Tensor]) -> Step:
        import fastopt

        return getattr(fastopt, spec.cls)(params, **spec.options, backend=backend).step

    return build


def _torch_optimizer(spec: OptimizerSpec, params: list[Tensor], flags: dict) -> torch.optim.Optimizer:
    if not hasattr(torch.optim, spec.cls):
        raise Unsupported(f"torch.optim has no {spec.cls}")
    if "state_dtype" in spec.options:
        raise Unsupported(f"torch.optim.{spec.cls} keeps its state in the params' dtype")
    cls = getattr(torch.optim, spec.cls)
    if flags == {"foreach": False} and "foreach" not in inspect.signature(cls).parameters:
        flags = {}  # a for-loop only (Muon)
    try:
        return cls(params, **spec.options, **flags)
    except TypeError as error:  # e.g. RMSprop takes no `fused`
        raise Unsupported(f"torch.optim.{spec.cls} does not accept {flags} ({error})") from None


def _torch(**flags) -> Callable[[OptimizerSpec, list[Tensor]], Step]:
    def build(spec: OptimizerSpec, params: list[Tensor]) -> Step:
        return _torch_optimizer(spec, params, flags).step

    return build


TORCH_FLAGS = {"torch-forloop": {"foreach": False}, "torch-foreach": {"foreach": True},
               "torch-fused": {"fused": True}}


class PipelineStep:
    """One iteration of a training loop's optimizer part on grads that are
    already set: GradScaler, clipping to ``spec.max_grad_norm``, step, scale
    update.  The scale is 1.0 and never grows, so torch's in-place unscale
    leaves the grads as they are (the work is the same for any scale) and
    they stay finite: no step may be skipped, as a skipped step would time
    nothing; :meth:`skipped_steps` lets the runner check that."""

    def __init__(self, impl: str, spec: OptimizerSpec, params: list[Tensor]) -> None:
        import fastopt

        device = params[0].device.type
        if impl in FASTOPT_IMPLS:
            backend = impl.removeprefix("fastopt-")
            self.optimizer = getattr(fastopt, spec.cls)(params, **spec.options, backend=backend,
                                                        max_grad_norm=spec.max_grad_norm)
            self.scaler = fastopt.GradScaler(device, init_scale=1.0, growth_interval=2**30)
        elif impl in TORCH_FLAGS:
            self.optimizer = _torch_optimizer(spec, params, TORCH_FLAGS[impl])
            self.scaler = torch.amp.GradScaler(device, init_scale=1.0, growth_interval=2**30)
        else:
            raise Unsupported(f"{impl} has no training-pipeline variant")
        self.params, self.max_grad_norm = params, spec.max_grad_norm
        self.fused_clip = impl in FASTOPT_IMPLS
        self.scaler.scale(torch.ones((), device=device))  # creates the scale, as a loss would
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if not self.fused_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def skipped_steps(self) -> int:
        return self.calls - int(self.optimizer.state[self.params[0]]["step"].item())


def _deepspeed(spec: OptimizerSpec, params: list[Tensor]) -> Step:
    try:
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as error:  # not installed, or its ops cannot build
        raise Unsupported(f"deepspeed is not importable ({type(error).__name__})") from None
    if params[0].device.type != "cpu":
        raise Unsupported("DeepSpeed's CPU optimizers run on CPU tensors only")
    options = dict(spec.options)
    if spec.cls in ("Adam", "AdamW") and not options.get("amsgrad"):
        optimizer = DeepSpeedCPUAdam(params, lr=options["lr"],
                                     weight_decay=options.get("weight_decay", 0.0),
                                     adamw_mode=spec.cls == "AdamW")
    elif spec.cls == "Adagrad":
        optimizer = DeepSpeedCPUAdagrad(params, lr=options["lr"])
    else:
        raise Unsupported(f"DeepSpeed has no CPU optimizer for {spec.label}")
    return optimizer.step


def _apex(spec: OptimizerSpec, params: list[Tensor]) -> Step:
    """Apex's fused CUDA optimizers (FusedAdam, FusedSGD, FusedAdagrad)."""
    if params[0].device.type != "cuda":
        raise Unsupported("Apex's fused optimizers run on CUDA tensors only")
    try:
        from apex import optimizers as apex_optimizers
    except Exception as error:  # not installed, or built without its CUDA extensions
        raise Unsupported(f"apex is not importable ({type(error).__name__})") from None
    options = dict(spec.options)
    if spec.cls in ("Adam", "AdamW"):
        optimizer = apex_optimizers.FusedAdam(params, lr=options["lr"],
                                              weight_decay=options.get("weight_decay", 0.0),
                                              amsgrad=options.get("amsgrad", False),
                                              adam_w_mode=spec.cls == "AdamW")
    elif spec.cls == "SGD":
        optimizer = apex_optimizers.FusedSGD(params, lr=options["lr"],
                                             momentum=options.get("momentum", 0.0),
                                             nesterov=options.get("nesterov", False))
    elif spec.cls == "Adagrad":
        optimizer = apex_optimizers.FusedAdagrad(params, lr=options["lr"])
    else:
        raise Unsupported(f"Apex has no fused optimizer for {spec.label}")
    return optimizer.step


# The published implementation of each optimizer torch.optim lacks: (module,
# class, options renamed to its arguments).  Test extras (pyproject.toml),
# never fastopt's dependencies.
PYPI = {
    "AdaBound": ("adabound", "AdaBound", {}),
    "QHAdam": ("qhoptim.pyt", "QHAdam", {}),
    "AggMo": ("pytorch_optimizer", "AggMo", {}),
    "Lion": ("lion_pytorch", "Lion", {}),
    "ADOPT": ("pytorch_optimizer", "ADOPT", {"decouple": "weight_decouple"}),
    # pytorch-optimizer's Lamb adds the decay to the update (Apex's adam_w_mode)
    # with weight_decouple=False, and clips only with pre_norm.
    "LAMB": ("pytorch_optimizer", "Lamb", {"max_grad_norm": None}),
    "LARS": ("pytorch_optimizer", "LARS", {}),
    "SWATS": ("pytorch_optimizer", "SWATS", {}),
}


# 8-bit state: bitsandbytes' block-wise 8-bit optimizers, by option set (its
# state_dtype option is fastopt's and is left out).
PYPI_BY_OPTION_SET = {
    "adam-8bit": ("bitsandbytes.optim", "Adam8bit", {"state_dtype": None}),
    "adamw-8bit": ("bitsandbytes.optim", "AdamW8bit", {"state_dtype": None}),
}


# Option sets whose published implementation would run another algorithm.
NO_PYPI = {
    "swats-adam": "pytorch-optimizer's SWATS switches to SGD at step 2 on the bench's constant grads "
                  "whatever its eps (its tolerance has an absolute 1e-8): see option set swats",
}


def _pypi(spec: OptimizerSpec, params: list[Tensor]) -> Step:
    """The optimizer's published PyPI implementation, where one is installed."""
    if spec.key in NO_PYPI:
        raise Unsupported(NO_PYPI[spec.key])
    published = PYPI_BY_OPTION_SET.get(spec.key) or PYPI.get(spec.cls)
    if published is None or (spec.state_itemsize is not None and spec.key not in PYPI_BY_OPTION_SET):
        raise Unsupported(f"no PyPI implementation of {spec.label} is benchmarked")
    module, name, renames = published
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise Unsupported(f"{module} is not installed ({error})") from None
    options = {renames.get(k, k): v for k, v in spec.options.items()}
    if spec.cls == "LAMB":
        options["weight_decouple"] = False
    return cls(params, **{k: v for k, v in options.items() if k is not None}).step


def _roofline(spec: OptimizerSpec, params: list[Tensor]) -> Step:
    """torch.ops.fastopt.roofline_bound_ over the same params and grads with K
    fresh slots per param (K = the optimizer's state tensors per param), bound
    once like the optimizers' own step so both pay the same per-step cost."""
    slots = [[torch.zeros_like(p) for p in params] for _ in range(spec.slots)]
    bound = torch.classes.fastopt.BoundTensors(params, slots, [], [], [])
    op = torch.ops.fastopt.roofline_bound_
    if spec.reduction_slots is None:
        return lambda: op(bound)
    # A reduction phase reads its streams once more first: a read-only pass
    # over them (grad_sq_norm) before the roofline's update pass.
    def two_passes() -> None:
        read = [*params, *(p.grad for p in params), *(t for slot in slots[:spec.reduction_slots] for t in slot)]
        torch.ops.fastopt.grad_sq_norm(read)
        op(bound)

    return two_passes


BUILDERS: dict[str, Callable[[OptimizerSpec, list[Tensor]], Step]] = {
    "fastopt-fused": _fastopt("fused"),
    "fastopt-reference": _fastopt("reference"),
    **{impl: _torch(**flags) for impl, flags in TORCH_FLAGS.items()},
    "pypi": _pypi,
    "deepspeed": _deepspeed,
    "apex": _apex,
    "roofline": _roofline,
}


def build_step(impl: str, spec: OptimizerSpec, params: list[Tensor]) -> Step:
    if spec.max_grad_norm is not None:
        return PipelineStep(impl, spec, params)
    return BUILDERS[impl](spec, params)
