"""How each implementation builds a step function over one param set.

Every builder takes an optimizer spec and a list of params whose ``.grad``
is set, and returns a zero-argument callable that performs one step.  A
builder raises :class:`Unsupported` (with a note for the report) when the
implementation does not exist for that optimizer, dtype or device.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .optimizers import OptimizerSpec

Step = Callable[[], object]

FASTOPT_IMPLS = ("fastopt-fused", "fastopt-reference")
TORCH_IMPLS = ("torch-forloop", "torch-foreach", "torch-fused")
IMPLS = FASTOPT_IMPLS + TORCH_IMPLS + ("deepspeed", "apex", "roofline")
# Implementations that need the compiled fastopt extension.
NEEDS_EXTENSION = ("fastopt-fused", "roofline")


class Unsupported(Exception):
    """The implementation does not exist for this case; the message says why."""


def _fastopt(backend: str) -> Callable[[OptimizerSpec, list[Tensor]], Step]:
    def build(spec: OptimizerSpec, params: list[Tensor]) -> Step:
        import fastopt

        return getattr(fastopt, spec.cls)(params, **spec.options, backend=backend).step

    return build


def _torch(**flags) -> Callable[[OptimizerSpec, list[Tensor]], Step]:
    def build(spec: OptimizerSpec, params: list[Tensor]) -> Step:
        try:
            optimizer = getattr(torch.optim, spec.cls)(params, **spec.options, **flags)
        except TypeError as error:  # e.g. RMSprop takes no `fused`
            raise Unsupported(f"torch.optim.{spec.cls} does not accept {flags} ({error})") from None
        return optimizer.step

    return build


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


def _roofline(spec: OptimizerSpec, params: list[Tensor]) -> Step:
    """torch.ops.fastopt.roofline_bound_ over the same params and grads with K
    fresh slots per param (K = the optimizer's state tensors per param), bound
    once like the optimizers' own step so both pay the same per-step cost."""
    slots = [torch.zeros_like(p) for _ in range(spec.slots) for p in params]
    bound = torch.classes.fastopt.BoundTensors(params, slots, [], [])
    op = torch.ops.fastopt.roofline_bound_
    return lambda: op(bound)


BUILDERS: dict[str, Callable[[OptimizerSpec, list[Tensor]], Step]] = {
    "fastopt-fused": _fastopt("fused"),
    "fastopt-reference": _fastopt("reference"),
    "torch-forloop": _torch(foreach=False),
    "torch-foreach": _torch(foreach=True),
    "torch-fused": _torch(fused=True),
    "deepspeed": _deepspeed,
    "apex": _apex,
    "roofline": _roofline,
}


def build_step(impl: str, spec: OptimizerSpec, params: list[Tensor]) -> Step:
    return BUILDERS[impl](spec, params)
