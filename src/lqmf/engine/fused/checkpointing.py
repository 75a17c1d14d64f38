"""Activation checkpointing as LQMF runs it: PyTorch's non-reentrant checkpoint without its determinism check.

With `determinism_check="default"` PyTorch records the shape, dtype and device of every tensor a
checkpointed region saves, in Python, and compares them when backward recomputes the region: a call
per saved tensor on the host that issues a micro-batch's kernels. Without it a micro-batch of the
32-layer host-time model took 92.7 ms instead of 117.8 on the CPU (benchmarks/train_host_time.py,
docs/performance.md), with the same losses. What the check guards against, a recomputation that
saves other tensors than the forward did, our regions cannot do: they recompute the same modules
on the same inputs with the random state restored, and the tests compare every checkpointed path's
gradients with an unchecked one (tests/engine, tests/gpu).
"""

from __future__ import annotations

# gradient_checkpointing_kwargs for transformers' per-layer checkpoints, and the options of ours
OPTIONS = {"use_reentrant": False, "determinism_check": "none"}


def checkpoint(function, *args):
    """function(*args) under PyTorch's non-reentrant checkpoint (OPTIONS): recomputed in backward."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    return torch_checkpoint(function, *args, **OPTIONS)
