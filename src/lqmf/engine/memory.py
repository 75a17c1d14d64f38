"""Memory readings: VRAM on a GPU, resident set size otherwise."""

from __future__ import annotations

import os


def _rss_gb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def memory_in_use_gb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.memory_allocated() / 2**30
    return _rss_gb()


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: str) -> float:
    """Peak allocated VRAM since the last reset, or the process's peak RSS on the CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
