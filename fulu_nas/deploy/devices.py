"""Which device a measurement ran on, by model: what a latency or a memory figure is only comparable
within."""

from __future__ import annotations

import platform

import torch


def processor_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (from /proc/cpuinfo; the platform's words where it has none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """``cpu: MODEL`` or ``cuda: NAME``: two trials' costs compare where their labels are equal."""
    return f"{device.type}: {processor_name(device)}"
