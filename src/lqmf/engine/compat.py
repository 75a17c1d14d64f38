"""Every use of a library's private API or internals, in one place, each with a test (tests/test_compat.py)
that fails loudly when an upgrade changes it. Other modules call these functions instead."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any


def tensor_version(tensor) -> int | None:
    """A tensor's in-place version counter (torch's `_version`; inference tensors keep none: None)."""
    return None if tensor.is_inference() else tensor._version


def foreach_copy(targets: list, sources: list) -> None:
    """Copy each source into its target in one batched call (torch's `_foreach_copy_`)."""
    import torch

    torch._foreach_copy_(targets, sources)


def bind_forward(module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """Make forward(module, ...) the forward of this one module instance; returns the forward it replaces.

    Used by engine/fastgen.py's lean LoRA layers on PEFT's LoRA layers, for the single-stream decoder
    and training; the batched decoder of `lqmf serve` (engine/batched.py) runs its own modules instead.
    """
    return set_forward(module, types.MethodType(forward, module))


def set_forward(module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """Give this module instance the (bound) forward; returns the one it had (to put back)."""
    previous = module.forward
    module.forward = forward
    return previous

