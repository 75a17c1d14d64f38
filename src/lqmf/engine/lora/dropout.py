"""LoRA's dropout inside its rank-r product, for training: dropout(x) A^T in one Triton kernel each way.

PEFT's LoRA layer runs lora_A(dropout(x)): a dropout kernel that writes x's size again and a mask
(kept for backward, or made again by a recomputation), a GEMM that reads the dropped copy back, and
in backward a GEMM into x's size, the mask's multiply, and A's gradient GEMM over the dropped copy.
`DropoutLowRank` (`_dropout_low_rank`) draws the mask in registers where it is used (Philox,
dropout_kernels.py): forward reads x once into the rank-r product; backward draws the same mask again
from the seed and writes x's gradient and float32 parts of A's in one kernel. Nothing of the dropout
is stored, kept or recomputed; the layer keeps x, as LQMF's recomputed dropout did.

The mask is not torch's (another generator) but a dropout's all the same: each element kept with
probability 1 - p, independently, and scaled by 1 / (1 - p) in float32 before rounding to x's dtype.
The seed is drawn from torch's CPU generator, so `torch.manual_seed` makes a run repeat itself, and a
checkpoint's recomputation, which restores that generator's state, draws the same mask.

lean.py's training forward calls `low_rank` where `applies` (CUDA, or anywhere with OFF_GPU: the tests
run the kernels in Triton's interpreter); training switches it on with the fused kernels
(engine/fused/blocks.py: use_fused_kernels, through lean.py: fuse_lora_dropout).
"""

from __future__ import annotations

import functools
from typing import Any

BLOCK_M = 64  # rows a program
MAX_RANK = 64  # larger ranks keep torch's dropout and GEMM (the backward's registers)
TARGET_PROGRAMS = 264  # backward: column groups x row slices, two waves of an H100's 132 SMs
OFF_GPU = False  # run on the CPU too (the tests do, under TRITON_INTERPRET=1)


@functools.cache
def kernel_module() -> Any:
    """dropout_kernels, or None where Triton is missing."""
    try:
        from lqmf.engine.lora import dropout_kernels
    except ImportError:
        return None
    return dropout_kernels


def applies(dropout, down, x) -> bool:
    """Whether `low_rank` computes down(dropout(x)) here: a torch Dropout in training with 0 < p < 1, a
    bias-free lora_A of rank up to MAX_RANK, x on CUDA (or OFF_GPU) in the dtype down's GEMM would run in
    (autocast's, else the weight's)."""
    import torch

    weight = down.weight
    if not (isinstance(dropout, torch.nn.Dropout) and dropout.training and 0 < dropout.p < 1
            and getattr(down, "bias", None) is None and weight.shape[0] <= MAX_RANK
            and (x.is_cuda or OFF_GPU) and x.shape[-1] == weight.shape[1] and weight.is_contiguous()):
        return False
    device = x.device.type
    wanted = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return x.dtype == wanted and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def low_rank(x, weight, p: float):
    """dropout(x) A^T (A = weight, [r, in]) in x's dtype, through DropoutLowRank."""
    return _dropout_low_rank().apply(x, weight, p)


def keep_threshold(p: float) -> int:
    """A Philox value keeps its element where its top 24 bits are at least this."""
    return min(round(p * (1 << 24)), 1 << 24)


def _common(rows, weight, p: float) -> dict:
    import torch

    return dict(M=rows.shape[0], K=rows.shape[1], R=weight.shape[0], stride_xm=rows.stride(0),
                stride_ar=weight.stride(0), THRESHOLD=keep_threshold(p), SCALE=1.0 / (1.0 - p),
                BLOCK_M=BLOCK_M, BLOCK_R=max(16, 1 << (weight.shape[0] - 1).bit_length()),
                IEEE=rows.dtype == torch.float32, INTERPRETED=not rows.is_cuda)


def shrink(rows, weight, p: float, seed: int):
    """dropout(rows) weight^T [M, r] in rows' dtype, the mask drawn for seed."""
    import torch

    args = _common(rows, weight, p)
    out = torch.empty(args["M"], args["R"], dtype=rows.dtype, device=rows.device)
    kernel_module().dropout_shrink_kernel[(-(-args["M"] // BLOCK_M),)](rows, weight, out, seed=seed, **args)
    return out


def shrink_backward(rows, weight, grad, p: float, seed: int, want_dx: bool = True, want_da: bool = True):
    """(d rows, d weight) of `shrink` from grad [M, r] (None where not wanted): d rows in rows' dtype,
    d weight summed in float32 over row slices, then in weight's dtype."""
    import torch

    args = _common(rows, weight, p)
    kernels = kernel_module()
    groups = -(-args["K"] // kernels.GROUP_COLUMNS)
    blocks = -(-args["M"] // BLOCK_M)
    per_split = -(-blocks // max(1, min(blocks, TARGET_PROGRAMS // groups))) * BLOCK_M
    splits = -(-args["M"] // per_split)
    dx = torch.empty_like(rows) if want_dx else rows
    partial = (torch.empty(splits, args["R"], args["K"], dtype=torch.float32, device=rows.device) if want_da
               else rows.new_empty(0, dtype=torch.float32))
    kernels.dropout_shrink_backward_kernel[(groups, splits)](
        rows, weight, grad.to(rows.dtype).contiguous(), dx, partial, ROWS_PER_SPLIT=per_split, seed=seed,
        WANT_DX=want_dx, WANT_DA=want_da, **args)
    da = (partial.sum(0) if splits > 1 else partial[0]).to(weight.dtype) if want_da else None
    return (dx if want_dx else None), da


def mask(rows: int, columns: int, p: float, seed: int, device) -> Any:
    """The [rows, columns] mask the kernels draw for seed (int8: 1 kept, 0 dropped)."""
    import torch

    out = torch.empty(rows, columns, dtype=torch.int8, device=device)
    kernels = kernel_module()
    grid = (-(-rows // BLOCK_M), -(-columns // kernels.GROUP_COLUMNS))
    kernels.dropout_mask_kernel[grid](out, rows, columns, seed, keep_threshold(p), BLOCK_M=BLOCK_M)
    return out


def draw_seed() -> int:
    """A Philox seed from torch's CPU generator (what a checkpoint's recomputation restores)."""
    import torch

    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))


@functools.cache
def _dropout_low_rank():
    import torch

    class DropoutLowRank(torch.autograd.Function):
        """dropout(x) A^T with the mask drawn in the kernels (see the module docstring); keeps x and A."""

        @staticmethod
        def forward(ctx, x, weight, p: float):
            seed = draw_seed()
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            out = shrink(rows, weight, p, seed)
            ctx.save_for_backward(rows, weight)
            ctx.shape, ctx.p, ctx.seed = x.shape, p, seed
            return out.view(*x.shape[:-1], -1)

        @staticmethod
        def backward(ctx, grad):
            rows, weight = ctx.saved_tensors
            want_dx, want_da = ctx.needs_input_grad[:2]
            if not (want_dx or want_da):
                return None, None, None
            dx, da = shrink_backward(rows, weight, grad.reshape(-1, weight.shape[0]), ctx.p, ctx.seed,
                                     want_dx, want_da)
            return (dx.view(ctx.shape) if dx is not None else None), da, None

    return DropoutLowRank
