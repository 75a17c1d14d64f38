"""Training's frozen NF4 base: x times a bitsandbytes 4-bit weight, its dequantize one Triton kernel.

bitsandbytes 0.50 multiplies a training batch by a 4-bit weight through three custom operators in
forward (the nested absmax's 8-bit dequantize, the add of its offset, the NF4 dequantize) and three
more in backward, each a Python dispatch and a launch, on a host that sets the pace of a 7B
micro-batch (docs/performance.md). `FrozenNF4Matmul` (`_frozen_nf4_matmul`) gives the same values in
one launch each way: `nf4_dequantize_kernel` (nf4_kernels.py) writes the weight in x's dtype
as dequantize_4bit does, bit for bit (tests/engine/lora/test_nf4_frozen.py, tests/gpu), and the same
GEMM follows (forward x W^T, backward grad W). Like bitsandbytes it keeps only the packed weight for
backward, on the Function's context, not as a saved tensor (a checkpoint or activation offload
leaves it alone).

`switch_on(model)` marks the model's plain NF4 Linear4bit layers; `linear(module, x)` runs a marked
layer this way while gradients are on and x is on a CUDA device in the layer's compute dtype, and
calls the module otherwise. Training turns it on with the fused kernels (engine/fused/blocks.py);
the callers are the lean LoRA layers' base product and the fused SwiGLU's three projections.
"""

from __future__ import annotations

import functools
import weakref

from lqmf.engine import compat
from lqmf.engine.lora.nf4 import kernel_module

BLOCK = 1024  # packed bytes a program of the dequantize kernel
OFF_GPU = False  # run on the CPU too (the tests do, under TRITON_INTERPRET=1)
_SWITCHED_ON: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its nf4_stored_parts


def switch_on(model) -> int:
    """Mark model's NF4 bitsandbytes Linear4bit layers (the bases under LoRA layers included; not
    subclasses, which may compute otherwise) for `linear`; how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    if kernel_module() is None:
        return 0
    count = 0
    for module in model.modules():
        parts = compat.nf4_stored_parts(module) if type(module) is bnb.nn.Linear4bit else None
        if parts is not None and not module.weight.requires_grad:
            _SWITCHED_ON[module] = parts
            count += 1
    return count


def linear(module, x):
    """module(x), through FrozenNF4Matmul where module was switched on and x qualifies (see the module docstring)."""
    import torch

    parts = _SWITCHED_ON.get(module)
    if (parts is None or not torch.is_grad_enabled() or not (x.is_cuda or OFF_GPU)
            or x.dtype != module.compute_dtype or parts["packed"].data_ptr() != module.weight.data_ptr()):
        return module(x)
    bias = module.bias
    if bias is not None and (bias.requires_grad or bias.dtype != x.dtype):
        return module(x)
    return _frozen_nf4_matmul().apply(x, parts, bias)


def dequantize(parts: dict, dtype):
    """The whole [N, K] weight in dtype, as bitsandbytes' dequantize_4bit gives it."""
    import torch

    packed, absmax, nested = parts["packed"], parts["absmax"], parts["nested"]
    out = torch.empty(parts["shape"], dtype=dtype, device=packed.device)
    second = (parts["absmax2"], parts["code2"], parts["offset"]) if nested else (absmax, absmax, absmax)
    kernel_module().nf4_dequantize_kernel[(-(-packed.numel() // BLOCK),)](
        packed, absmax, *second, parts["code"], out, out.numel(), BLOCKSIZE=parts["blocksize"],
        BLOCKSIZE2=parts.get("blocksize2", 1), NESTED=nested, BLOCK=BLOCK, INTERPRETED=not packed.is_cuda,
        num_warps=4, enable_fp_fusion=False)
    return out


@functools.cache
def _frozen_nf4_matmul():
    import torch

    class FrozenNF4Matmul(torch.autograd.Function):
        """x W^T + bias for a frozen NF4 weight W (parts: nf4_stored_parts); the gradient is x's alone."""

        @staticmethod
        def forward(ctx, x, parts: dict, bias):
            ctx.parts = parts
            return torch.nn.functional.linear(x, dequantize(parts, x.dtype), bias)

        @staticmethod
        def backward(ctx, grad):
            if not ctx.needs_input_grad[0]:
                return None, None, None
            return torch.matmul(grad, dequantize(ctx.parts, grad.dtype)), None, None

    return FrozenNF4Matmul
