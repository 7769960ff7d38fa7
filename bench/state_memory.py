"""State memory of fastopt.Adam with ``state_dtype=torch.bfloat16`` (target:
exactly half) and ``torch.uint8`` (8-bit, target: at most 0.26) against
float32 state, on each workload's shapes."""
from __future__ import annotations

from typing import Any

import torch

from .workloads import Workload

# Above this many params the two extra optimizers would crowd the device
# (GPT-2 XL's fp32 Adam state alone is 25 GB): such workloads are skipped.
MAX_NUMEL = 200_000_000


def _state_bytes(workload: Workload, device: torch.device, state_dtype: torch.dtype | None) -> int:
    import fastopt

    params = [torch.nn.Parameter(torch.zeros(shape, device=device)) for shape in workload.shapes]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer = fastopt.Adam(params, lr=1e-3, state_dtype=state_dtype)
    optimizer.step()  # the state is created lazily, as torch.optim's
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for key, t in state.items() if key != "step")


def measure(workloads: list[Workload], device: torch.device) -> list[dict[str, Any]]:
    """Per workload: the bytes of Adam's state (exp_avg, exp_avg_sq and, with
    8-bit state, their block scales) for float32 params with float32,
    bfloat16 and 8-bit state, and the ratios to float32."""
    rows = []
    for workload in workloads:
        if workload.overhead or workload.numel > MAX_NUMEL or device.type not in workload.devices:
            continue
        fp32 = _state_bytes(workload, device, None)
        bf16 = _state_bytes(workload, device, torch.bfloat16)
        eight_bit = _state_bytes(workload, device, torch.uint8)
        rows.append({"workload": workload.name, "fp32_state_bytes": fp32, "bf16_state_bytes": bf16,
                     "ratio": bf16 / fp32, "uint8_state_bytes": eight_bit, "uint8_ratio": eight_bit / fp32})
    return rows
