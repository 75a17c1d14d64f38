"""Programmatic dependent launch (PDL) for the decode step's Triton kernels, on Hopper and newer GPUs.

A one-row decode step is about 600 small kernels, and each normally starts only when the one before
it has finished and flushed its writes. Launched with programmatic stream serialization (Triton's
`launch_pdl=True`), a kernel's programs are placed while the kernel before it ends. Each kernel that
takes the PDL flag does two things first: `gdc_wait` (wait for the kernel before it to finish and
its writes to be visible; nothing is read or written before) and `gdc_launch_dependents` (let the
kernel after it launch now). So at most two kernels overlap, and every kernel sees what the kernels
before it wrote, as with plain launches. Kernels of other libraries between them launch plainly.

`launch(device)` gives the launch option and the kernels' flag together: empty off Hopper, off the
GPU (Triton's interpreter has no PDL) and with LQMF_PDL=0.
"""

from __future__ import annotations

import functools
import os
from typing import Any


def launch(device) -> dict[str, Any]:
    """Keyword arguments for a Triton kernel launch on device: launch_pdl and the kernel's PDL flag where
    programmatic dependent launch applies (a CUDA GPU of compute capability 9.0 or newer, LQMF_PDL not
    0), else none."""
    if os.environ.get("LQMF_PDL", "1") == "0" or device.type != "cuda" or not _hopper(device.index):
        return {}
    return {"launch_pdl": True, "PDL": True}


@functools.cache
def _hopper(index: int | None) -> bool:
    import torch

    return torch.cuda.get_device_capability(index) >= (9, 0)
