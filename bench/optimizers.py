"""The optimizer option sets benchmarked, and the state tensors each keeps
(which sets the bytes a step moves)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Bytes per element of an 8-bit state slot: the code and its share of the
# block's float32 scale (Note [8-bit state] in csrc/rules/quantization.h).
EIGHT_BIT_STATE_BYTES = 1 + 4 / 256


@dataclass(frozen=True)
class OptimizerSpec:
    key: str            # CLI name
    cls: str            # class name in torch.optim and fastopt
    label: str          # name in the report
    options: dict[str, Any] = field(default_factory=dict)
    slots: int = 0      # state tensors per param (K)
    # A training pipeline (implementations.py): AMP grad scaling and clipping to
    # this norm around the step, as a training loop runs it; None: the step alone.
    max_grad_norm: float | None = None
    # Bytes per element of a state slot when not the params' dtype (8-bit state).
    state_itemsize: float | None = None
    # A reduction phase (Note [Reduction phase] in csrc/rules/reduction.h): the
    # slots its first, read-only pass reads besides the params and grads; None:
    # one pass.
    reduction_slots: int | None = None

    def bytes_per_step(self, numel: int, itemsize: int, roofline: bool = False) -> int:
        """Param read+write, K slots read+write, grad read (twice in a
        pipeline: the norm must be known before the step), and with a
        reduction phase its read of the params, grads and its slots.
        ``roofline``: the bytes the roofline kernel moves for this spec, whose
        slots are of the params' dtype (for 8-bit state it is a bandwidth
        ceiling, compared in GB/s)."""
        grad_reads = 1 if self.max_grad_norm is None else 2
        slot_itemsize = itemsize if roofline or self.state_itemsize is None else self.state_itemsize
        reduction = 0 if self.reduction_slots is None else 2 * itemsize + self.reduction_slots * slot_itemsize
        return int(numel * (itemsize * (2 + grad_reads) + 2 * self.slots * slot_itemsize + reduction))


SPECS: dict[str, OptimizerSpec] = {
    s.key: s
    for s in (
        OptimizerSpec("adam", "Adam", "Adam", {"lr": 1e-3}, 2),
        OptimizerSpec("adam-amsgrad", "Adam", "Adam amsgrad", {"lr": 1e-3, "amsgrad": True}, 3),
        OptimizerSpec("adamw", "AdamW", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, 2),
        OptimizerSpec("sgd", "SGD", "SGD", {"lr": 1e-3}, 0),
        OptimizerSpec("sgd-momentum", "SGD", "SGD momentum", {"lr": 1e-3, "momentum": 0.9}, 1),
        OptimizerSpec("sgd-nesterov", "SGD", "SGD nesterov",
                      {"lr": 1e-3, "momentum": 0.9, "nesterov": True}, 1),
        OptimizerSpec("rmsprop", "RMSprop", "RMSprop", {"lr": 1e-3}, 1),
        OptimizerSpec("rmsprop-centered-momentum", "RMSprop", "RMSprop centered+momentum",
                      {"lr": 1e-3, "centered": True, "momentum": 0.9}, 3),
        OptimizerSpec("adagrad", "Adagrad", "Adagrad", {"lr": 1e-2}, 1),
        OptimizerSpec("nadam", "NAdam", "NAdam", {"lr": 2e-3}, 2),
        OptimizerSpec("radam", "RAdam", "RAdam", {"lr": 1e-3}, 2),
        OptimizerSpec("adamax", "Adamax", "Adamax", {"lr": 2e-3}, 2),
        OptimizerSpec("adadelta", "Adadelta", "Adadelta", {"lr": 1.0}, 2),
        OptimizerSpec("adam-pipeline", "Adam", "Adam + GradScaler + clip", {"lr": 1e-3}, 2,
                      max_grad_norm=1.0),
        OptimizerSpec("asgd", "ASGD", "ASGD", {"lr": 1e-3}, 1),
        OptimizerSpec("rprop", "Rprop", "Rprop", {"lr": 1e-3}, 2),
        OptimizerSpec("lion", "Lion", "Lion", {"lr": 1e-4, "weight_decay": 1e-2}, 1),
        OptimizerSpec("adopt", "ADOPT", "ADOPT", {"lr": 1e-3}, 2),
        OptimizerSpec("adabound", "AdaBound", "AdaBound", {"lr": 1e-3}, 2),
        OptimizerSpec("qhadam", "QHAdam", "QHAdam", {"lr": 1e-3, "nus": (0.7, 1.0)}, 2),
        OptimizerSpec("aggmo", "AggMo", "AggMo", {"lr": 1e-3}, 3),
        # LAMB without its default clipping (max_grad_norm=1.0, a pass of its own).
        OptimizerSpec("lamb", "LAMB", "LAMB", {"lr": 1e-3, "weight_decay": 1e-2, "max_grad_norm": None}, 2,
                      reduction_slots=2),
        OptimizerSpec("lars", "LARS", "LARS", {"lr": 1e-1, "weight_decay": 1e-4}, 1, reduction_slots=0),
        # Muon: 2-D params only (workloads matrices-64x256, gpt2-124m-matrices); its
        # roofline is the element-wise streams of a momentum step (one slot), the
        # Newton-Schulz matmuls come on top.
        OptimizerSpec("muon", "Muon", "Muon", {"lr": 2e-2}, 1),
        # Adafactor: its fused op's streams, a variance-like slot (a matrix's is the
        # estimate built from its factors) in a reduction pass and an update pass;
        # the factors' row and column means (torch's reductions) come on top.
        OptimizerSpec("adafactor", "Adafactor", "Adafactor", {"lr": 1e-2}, 1, reduction_slots=1),
        # SWATS: on the bench's constant grads its projection is constant, so a
        # group switches at step 2 (here and in pytorch-optimizer's): `swats` times
        # the SGD phase (one pass over Adam's streams), `swats-adam` the Adam phase
        # (eps 0: never switches), whose reduction pass takes the projection.  Both
        # add the group's switch after the op (a few list ops over the params).
        OptimizerSpec("swats", "SWATS", "SWATS (after its switch)", {"lr": 1e-3}, 2),
        OptimizerSpec("swats-adam", "SWATS", "SWATS (Adam phase)", {"lr": 1e-3, "eps": 0.0}, 2,
                      reduction_slots=2),
        OptimizerSpec("adam-8bit", "Adam", "Adam 8-bit state", {"lr": 1e-3, "state_dtype": torch.uint8}, 2,
                      state_itemsize=EIGHT_BIT_STATE_BYTES),
        OptimizerSpec("adamw-8bit", "AdamW", "AdamW 8-bit state",
                      {"lr": 1e-3, "weight_decay": 1e-2, "state_dtype": torch.uint8}, 2,
                      state_itemsize=EIGHT_BIT_STATE_BYTES),
    )
}

# Plain SGD (no state) and the optimizers added after the first five are
# available with --optimizers but not run by default (Lion, ADOPT, AdaBound,
# QHAdam, AggMo, LAMB, LARS and SWATS have no torch.optim baseline: their rows compare with the
# roofline and with the published package, impl `pypi`, where installed; the
# 8-bit specs compare with bitsandbytes, impl `pypi`, and with the same
# optimizer's float32 state, option sets adam / adamw).
DEFAULT_OPTIMIZERS = ("adam", "adam-amsgrad", "adamw", "sgd-momentum", "sgd-nesterov", "rmsprop",
                      "rmsprop-centered-momentum", "adagrad", "adam-pipeline")
