"""Facts about the machine the benchmark runs on."""
from __future__ import annotations

import glob
import os
import platform
import re

import torch

ASSUMED_LLC_BYTES = 32 * 2**20


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _parse_size(text: str) -> int | None:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        return None
    return int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()]


def last_level_cache(device: torch.device) -> tuple[int, str]:
    """(bytes, where the number came from) of the last-level cache."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return (size, "cuda device properties") if size else (ASSUMED_LLC_BYTES, "assumed")
    best_level, best_size = -1, None
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(index, "size")) as f:
                size = _parse_size(f.read())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and size and level > best_level:
            best_level, best_size = level, size
    if best_size:
        return best_size, f"L{best_level} from /sys/devices/system/cpu/cpu0/cache"
    return ASSUMED_LLC_BYTES, "assumed (cache size not readable)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()
