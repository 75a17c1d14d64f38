"""Memory on the training device: readings (VRAM on a GPU, resident set size otherwise), the
budget that picks the micro-batch, and recovery from running out."""

from __future__ import annotations

import functools
import gc
import os
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_gb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def process_baseline_bytes(device: str) -> int:
    """Off CUDA, the memory this process holds before any weights load (measured once); 0 on CUDA."""
    return 0 if device == "cuda" else _first_rss_bytes()


@functools.cache
def _first_rss_bytes() -> int:
    return int(_rss_gb() * 2**30)


def memory_budget(max_memory: str | None, device: str, cap: str | None = None) -> tuple[int | None, str | None, bool]:
    """(bytes, where the number came from, whether it must also hold this process's CUDA context).

    max_memory wins; then on a CUDA GPU gpu_memory_cap (what the allocator may hand out, the context
    is outside it), else the GPU's free memory, read after this process has created its own context
    (so the context is already spent); elsewhere there is no budget.
    """
    from lqmf.core.memory_plan import parse_size

    if max_memory is not None:
        return parse_size(max_memory), "max_memory", True
    if device == "cuda" and cap is not None:
        return parse_size(cap), "gpu_memory_cap", False
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return free, "free GPU memory", False
    return None, None, True


def cap_allocator(cap: str | None, device: str) -> float | None:
    """Emulate a smaller GPU: PyTorch's allocator on this process's current GPU hands out at most cap
    (gpu_memory_cap), and raises CUDA's out-of-memory error beyond it; the fraction set, or None
    (no cap asked, or not on CUDA). Each process of a multi-GPU run calls it for its own GPU."""
    if cap is None or device != "cuda":
        return None
    import torch

    from lqmf.core.memory_plan import parse_size

    index = torch.cuda.current_device()
    fraction = min(1.0, parse_size(cap) / torch.cuda.get_device_properties(index).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, or another backend's (MPS, XPU) RuntimeError saying so."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def release_memory(device: str) -> None:
    """Drop unreferenced tensors and hand cached device blocks back."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    elif device == "mps":
        import torch

        torch.mps.empty_cache()


def torch_gpu_details() -> dict:
    """What PyTorch sees: its CUDA build, and per device the capability, bf16 support and free memory."""
    import torch

    details = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": False,
               "devices": [], "problem": None}
    try:
        available = torch.cuda.is_available()
    except RuntimeError as err:  # a broken driver install
        available, details["problem"] = False, str(err).splitlines()[0]
    if not available:
        details["problem"] = details["problem"] or ("this torch build has no CUDA" if torch.version.cuda is None
                                                    else "no CUDA device visible")
        return details
    details["cuda_available"] = True
    details["cudnn"] = torch.backends.cudnn.version()
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        details["devices"].append({
            "index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
            "bf16": torch.cuda.is_bf16_supported() if index == torch.cuda.current_device() else props.major >= 8,
            "total_gb": round(total / 2**30, 2), "free_gb": round(free / 2**30, 2),
            "multiprocessors": props.multi_processor_count,
        })
    return details


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
