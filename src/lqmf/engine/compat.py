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


def nf4_parts(layer) -> dict[str, Any] | None:
    """The pieces of a bitsandbytes NF4 layer's weight that engine/nf4_kernels.py reads, or None where the
    layer holds no NF4 weight: the packed bytes (two codes a byte, the first element in the high nibble),
    the per-block absmax (uint8 codes with the second-level absmax, code and offset when double-quantized,
    else float32), the 16-entry NF4 code and the shapes. Relies on bitsandbytes' QuantState layout."""
    weight = getattr(layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "quant_type", None) != "nf4" or weight.dtype.itemsize != 1:
        return None
    out_features, in_features = state.shape
    nested = bool(state.nested)
    return {"packed": weight.data.view(-1), "absmax": (state.absmax if nested else state.absmax.float()).contiguous(),
            "absmax2": state.state2.absmax.float().contiguous() if nested else None,
            "code2": state.state2.code.float().contiguous() if nested else None,
            "offset": float(state.offset) if nested else 0.0, "code": state.code.float().contiguous(),
            "out_features": int(out_features), "in_features": int(in_features), "blocksize": int(state.blocksize),
            "blocksize2": int(state.state2.blocksize) if nested else 1}
