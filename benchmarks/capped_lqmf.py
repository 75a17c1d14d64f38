"""`python -m lqmf ARGS...` with PyTorch's CUDA allocator capped, to behave as a smaller card.

    python3 benchmarks/capped_lqmf.py 7.3 train MODEL DATA chat ...

caps the allocator at 7.3 GiB on the process's GPU (torch.cuda.set_per_process_memory_fraction)
before LQMF starts, whatever LQMF version runs: benchmarks/gpu_train_bench.py uses it so that
today's main and a branch run under the same cap. (LQMF's own gpu_memory_cap key does the same,
on every process of a multi-GPU run.)
"""

from __future__ import annotations

import runpy
import sys

import torch

if __name__ == "__main__":
    cap = float(sys.argv[1]) * 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory), 0)
    sys.argv = ["lqmf", *sys.argv[2:]]
    runpy.run_module("lqmf", run_name="__main__", alter_sys=True)
