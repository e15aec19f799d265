"""What every benchmark prints about where it ran."""
from __future__ import annotations

import platform
import resource

import torch


def device_line(wb) -> str:
    """The device, with the GPU's name or the CPU and its thread count."""
    device = str(wb.device)
    if wb.device.type == "cuda":
        return device + f" ({torch.cuda.get_device_name(wb.device)})"
    return device + f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
