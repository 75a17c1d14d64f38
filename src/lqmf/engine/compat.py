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


def cache_keyword(model) -> str:
    """The forward keyword that takes a KV cache object: `past_key_values` up to transformers 5.2x, then
    `cache`. For a PEFT model, the keyword of the model it wraps (PEFT passes keywords through)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    for keyword in ("cache", "past_key_values"):
        if keyword in parameters:
            return keyword
    raise RuntimeError(f"{type(base).__name__}.forward takes no KV cache keyword (cache or past_key_values); "
                       "this transformers version is not supported by the static-cache decoder")


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

