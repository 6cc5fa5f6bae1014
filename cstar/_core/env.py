"""A record of the software and hardware a run used, saved beside its results."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone

import torch

from .._version import __version__


def describe_device(device: torch.device | str) -> str:
    """A human-readable name of ``device`` (CPU model and thread count, or GPU name)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device | str, seed: int | None = None) -> dict:
    """Versions, device and seed of the current process, as plain JSON values."""
    return {
        "cstar": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "device_name": describe_device(device),
        "cuda": torch.version.cuda,
        "seed": seed,
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
