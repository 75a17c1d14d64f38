"""`python -m lqmf ARGS...` with PyTorch's CUDA allocator capped, to behave as a smaller card.

    python3 benchmarks/capped_lqmf.py 7.3 train MODEL DATA chat ...

caps the allocator at 7.3 GiB on the process's GPU (torch.cuda.set_per_process_memory_fraction)
before LQMF starts, whatever LQMF version runs: benchmarks/gpu_train_bench.py uses it so that
today's main and a branch run under the same cap. (LQMF's own gpu_memory_cap key does the same,
on every process of a multi-GPU run.)

With LQMF_KERNEL_PROFILE=FILE.json the whole command runs under PyTorch's profiler (CUDA activity
only) and FILE.json gets the GPU time of its kernels and copies, by name, biggest first: where a
training run's device time goes (the model's quantization at load shows as its own kernels).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

import torch


def profiled(run, path: str) -> None:
    """run() under the profiler; the CUDA events' time (CPU ops' where there is no GPU) by name (count,
    total ms) into path."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU])
    device = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    started = time.perf_counter()
    try:
        with prof:
            run()
    finally:
        wall = time.perf_counter() - started
        totals: dict[str, list[float]] = {}
        for event in prof.events():
            if event.device_type == device:
                entry = totals.setdefault(event.name[:120], [0, 0.0])
                entry[0] += 1
                entry[1] += event.time_range.elapsed_us() / 1000
        ranked = sorted(totals.items(), key=lambda item: -item[1][1])
        spans = [(event.time_range.start, event.time_range.end) for event in prof.events()
                 if event.device_type == device]
        with open(path, "w") as handle:
            json.dump({"wall_s": round(wall, 2), "device_ms": round(sum(ms for _, ms in totals.values()), 1),
                       "idle": idle_gaps(spans),
                       "by_name": [[name, count, round(ms, 2)] for name, (count, ms) in ranked[:60]]}, handle, indent=1)


def idle_gaps(spans: list[tuple[float, float]]) -> dict:
    """How long the device ran nothing between its first and last event (spans in microseconds, any
    stream), as ms by gap length: short gaps are the host falling behind the kernels it launches,
    long ones loading, saving or a synchronizing wait."""
    buckets = {"under_0.1ms": 0.0, "0.1_to_1ms": 0.0, "1_to_10ms": 0.0, "over_10ms": 0.0}
    counts = dict.fromkeys(buckets, 0)
    busy_until = None
    for start, end in sorted(spans):
        if busy_until is not None and start > busy_until:
            gap = (start - busy_until) / 1000
            key = ("under_0.1ms" if gap < 0.1 else "0.1_to_1ms" if gap < 1 else "1_to_10ms" if gap < 10
                   else "over_10ms")
            buckets[key] += gap
            counts[key] += 1
        busy_until = end if busy_until is None else max(busy_until, end)
    first = min((start for start, _ in spans), default=0)
    return {"span_ms": round(((busy_until or first) - first) / 1000, 1),
            "gap_ms": {key: round(ms, 1) for key, ms in buckets.items()}, "gaps": counts}


if __name__ == "__main__":
    cap = float(sys.argv[1]) * 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory), 0)
    sys.argv = ["lqmf", *sys.argv[2:]]

    def run_lqmf() -> None:
        runpy.run_module("lqmf", run_name="__main__", alter_sys=True)

    target = os.environ.get("LQMF_KERNEL_PROFILE")
    if target:
        profiled(run_lqmf, target)
    else:
        run_lqmf()
