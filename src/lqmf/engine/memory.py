"""Memory readings: VRAM on a GPU, resident set size otherwise."""

from __future__ import annotations

import os
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_gb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def memory_in_use_gb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.memory_allocated() / 2**30
    return _rss_gb()


def reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's RSS high-water mark."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        PROC_CLEAR_REFS.write_text("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    except OSError:  # not Linux, or not allowed: the peak stays the process's lifetime peak
        pass


def _high_water_mark_gb() -> float | None:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory_gb(device: str) -> float:
    """Peak allocated VRAM since the last reset, or the process's peak RSS on the CPU.

    On Linux the RSS peak counts from the last reset_peak_memory; elsewhere it is the lifetime peak.
    """
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    hwm = _high_water_mark_gb()
    if hwm is not None:
        return hwm
    import resource
    import sys

    # ru_maxrss is in bytes on macOS, kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
