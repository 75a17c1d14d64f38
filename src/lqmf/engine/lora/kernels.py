"""A LoRA layer's scaled product, scale * (x A^T) B^T, with two small Triton kernels for decode-sized inputs.

At batch 1 the product is a few hundred KB of reads, and its cost is kernel count and latency.
cuBLAS runs x A^T as a split-K GEMM over few SMs plus a reduction kernel, then the B GEMM; on the
H200 the chain outlasted the 4-bit GEMV it ran beside (docs/performance.md). Here:

  - `shrink`: each program reduces one slice of the input dimension for every rank, into fp32
    partial sums (one wave of small programs over the whole GPU);
  - `expand`: each program sums the partials (rounding x A^T to the input dtype, as PEFT's GEMM
    does), then multiplies its block of B and scales.

Triton comes with CUDA builds of PyTorch. Without it, off the GPU, for more rows than a decode
step has, or with LQMF_LORA_KERNELS=0, the product runs as two GEMMs.
"""

from __future__ import annotations

import functools
import os
from typing import Any

MAX_ROWS = 4  # a decode step; prompts go to cuBLAS
MAX_RANK = 128
TARGET_SPLITS = 64  # programs of `shrink` per row
OFF_GPU = False  # run them on the CPU too (the tests do, under TRITON_INTERPRET=1)


@functools.cache
def _kernels() -> Any:
    """(triton, shrink, expand), compiled on first use per shape, or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def shrink(x_ptr, a_ptr, part_ptr, R, stride_xm, stride_xk, stride_ar, stride_ak,
               K: tl.constexpr, SPLITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        split, row = tl.program_id(0), tl.program_id(1)
        ks = split * BLOCK_K + tl.arange(0, BLOCK_K)
        ranks = tl.arange(0, BLOCK_R)
        k_ok, rank_ok = ks < K, ranks < R
        x = tl.load(x_ptr + row * stride_xm + ks * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + ks[None, :] * stride_ak,
                    mask=rank_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        tl.store(part_ptr + (row * SPLITS + split) * BLOCK_R + ranks, tl.sum(a * x[None, :], axis=1))

    @triton.jit
    def expand(part_ptr, b_ptr, out_ptr, N, R, scale, stride_bn, stride_br, stride_om, stride_on,
               SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        block, row = tl.program_id(0), tl.program_id(1)
        splits, ranks = tl.arange(0, SPLITS_P2), tl.arange(0, BLOCK_R)
        parts = tl.load(part_ptr + (row * SPLITS + splits[:, None]) * BLOCK_R + ranks[None, :],
                        mask=(splits < SPLITS)[:, None], other=0.0)
        low = tl.sum(parts, axis=0).to(out_ptr.dtype.element_ty).to(tl.float32)
        ns = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        b = tl.load(b_ptr + ns[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=n_ok[:, None] & (ranks < R)[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(b * low[None, :], axis=1) * scale
        tl.store(out_ptr + row * stride_om + ns * stride_on, delta.to(out_ptr.dtype.element_ty), mask=n_ok)

    return triton, shrink, expand


def kernels_apply(rows, a) -> bool:
    """Whether the Triton kernels run this product: a few rows on a GPU, Triton installed, not switched off."""
    return ((rows.is_cuda or OFF_GPU) and rows.shape[0] <= MAX_ROWS and a.shape[0] <= MAX_RANK
            and os.environ.get("LQMF_LORA_KERNELS", "1") != "0" and _kernels() is not None)


def scaled_product(rows, a, b, scale: float):
    """scale * (rows A^T) B^T as a new [M, N] tensor in rows' dtype; rows is [M, K], a [R, K], b [N, R]."""
    if not kernels_apply(rows, a):
        return rows.new_empty(rows.shape[0], b.shape[0]).addmm_(rows @ a.t(), b.t(), beta=0, alpha=scale)
    import torch

    triton, shrink, expand = _kernels()
    (count, width), rank, outputs = rows.shape, a.shape[0], b.shape[0]
    block_r = max(16, triton.next_power_of_2(rank))
    block_k = max(32, triton.next_power_of_2(triton.cdiv(width, TARGET_SPLITS)))
    splits = triton.cdiv(width, block_k)
    block_n = 64
    partials = torch.empty((count, splits, block_r), dtype=torch.float32, device=rows.device)
    out = torch.empty((count, outputs), dtype=rows.dtype, device=rows.device)
    shrink[(splits, count)](rows, a, partials, rank, rows.stride(0), rows.stride(1), a.stride(0), a.stride(1),
                            K=width, SPLITS=splits, BLOCK_K=block_k, BLOCK_R=block_r,
                            num_warps=4 if block_k * block_r <= 4096 else 8)
    expand[(triton.cdiv(outputs, block_n), count)](
        partials, b, out, outputs, rank, float(scale), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4)
    return out
