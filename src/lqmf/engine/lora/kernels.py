"""LoRA products with small Triton kernels for decode-sized inputs: one adapter's scaled product
(`scaled_product`, training's lean layers), and each row by its own adapter (`rows_product_into`, the
batched decoder: BGMV in Punica's terms).

At batch 1 the product is a few hundred KB of reads, and its cost is kernel count and latency.
cuBLAS runs x A^T as a split-K GEMM over few SMs plus a reduction kernel, then the B GEMM; on the
H200 the chain outlasted the 4-bit GEMV it ran beside (docs/performance.md). Here:

  - `shrink`: each program reduces one slice of the input dimension for every rank, into fp32
    partial sums (one wave of small programs over the whole GPU);
  - `expand`: each program sums the partials (rounding x A^T to the input dtype, as PEFT's GEMM
    does), then multiplies its block of B and scales.

Per row (`rows_product_into`), the same two steps read only the row's own adapter's A and B from the
adapter tables (`AdapterTables`): a decode step's LoRA costs what its rows' adapters weigh, however
many adapters are resident.

Triton comes with CUDA builds of PyTorch. Without it, off the GPU, for more rows than a decode
step has, or with LQMF_LORA_KERNELS=0, the products run as GEMMs.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from lqmf.engine.decode import pdl

MAX_ROWS = 4  # a decode step; prompts go to cuBLAS
MAX_TABLE_ROWS = 64  # rows_product_into: a batched decode step; prefill goes to cuBLAS
TABLE_BLOCK_N = 64  # output columns per expand program; every projection's width is a multiple of it
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
               K: tl.constexpr, SPLITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
               PDL: tl.constexpr = False):
        if PDL:  # decode/pdl.py: wait for the kernel before, then let the next one launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
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
               SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
               PDL: tl.constexpr = False):
        if PDL:  # decode/pdl.py: wait for the kernel before, then let the next one launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
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


def kernels_apply(rows, a, max_rows: int = MAX_ROWS) -> bool:
    """Whether the Triton kernels run this product: a few rows on a GPU, Triton installed, not switched off."""
    return ((rows.is_cuda or OFF_GPU) and rows.shape[0] <= max_rows and a.shape[-2] <= MAX_RANK
            and os.environ.get("LQMF_LORA_KERNELS", "1") != "0" and _kernels() is not None)


def _shrink_plan(triton, width: int, rank: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, splits) of a shrink kernel: every rank in one block, K cut into about
    TARGET_SPLITS slices of a power of two."""
    block_k = max(32, triton.next_power_of_2(triton.cdiv(width, TARGET_SPLITS)))
    return max(16, triton.next_power_of_2(rank)), block_k, triton.cdiv(width, block_k)


def scaled_product(rows, a, b, scale: float):
    """scale * (rows A^T) B^T as a new [M, N] tensor in rows' dtype; rows is [M, K], a [R, K], b [N, R]."""
    if not kernels_apply(rows, a):
        return rows.new_empty(rows.shape[0], b.shape[0]).addmm_(rows @ a.t(), b.t(), beta=0, alpha=scale)
    import torch

    triton, shrink, expand = _kernels()
    (count, width), rank, outputs = rows.shape, a.shape[0], b.shape[0]
    block_r, block_k, splits = _shrink_plan(triton, width, rank)
    block_n = 64
    partials = torch.empty((count, splits, block_r), dtype=torch.float32, device=rows.device)
    out = torch.empty((count, outputs), dtype=rows.dtype, device=rows.device)
    shrink[(splits, count)](rows, a, partials, rank, rows.stride(0), rows.stride(1), a.stride(0), a.stride(1),
                            K=width, SPLITS=splits, BLOCK_K=block_k, BLOCK_R=block_r,
                            num_warps=4 if block_k * block_r <= 4096 else 8, **pdl.launch(rows.device))
    expand[(triton.cdiv(outputs, block_n), count)](
        partials, b, out, outputs, rank, float(scale), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
        **pdl.launch(rows.device))
    return out


@functools.cache
def _row_kernels() -> Any:
    """(shrink_rows, expand_rows): the per-row kernels of `rows_product_into` (Triton installed)."""
    import triton
    import triton.language as tl

    @triton.jit
    def shrink_rows(x_ptr, index_ptr, a_ptr, part_ptr, R, stride_xm, stride_ae, stride_ar,
                    K: tl.constexpr, SPLITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    PDL: tl.constexpr = False):
        if PDL:  # decode/pdl.py: wait for the kernel before, then let the next one launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        split, row = tl.program_id(0), tl.program_id(1)
        adapter = tl.load(index_ptr + row)
        ks = split * BLOCK_K + tl.arange(0, BLOCK_K)
        ranks = tl.arange(0, BLOCK_R)
        k_ok = (ks < K) & (ks * 0 + adapter > 0)  # index 0: no adapter, nothing read
        x = tl.load(x_ptr + row * stride_xm + ks, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + adapter * stride_ae + ranks[:, None] * stride_ar + ks[None, :],
                    mask=(ranks < R)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        tl.store(part_ptr + (row * SPLITS + split) * BLOCK_R + ranks, tl.sum(a * x[None, :], axis=1))

    @triton.jit
    def expand_rows(part_ptr, index_ptr, b_ptr, out_ptr, N, RANK, bound1, bound2, stride_bn, stride_be, stride_om,
                    SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_RANK: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:  # decode/pdl.py: wait for the kernel before, then let the next one launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        block, row = tl.program_id(0), tl.program_id(1)
        adapter = tl.load(index_ptr + row)
        first = block * BLOCK_N
        projection = (first >= bound1).to(tl.int32) + (first >= bound2).to(tl.int32)  # a block is in one
        splits, ranks = tl.arange(0, SPLITS_P2), tl.arange(0, BLOCK_RANK)
        rank_ok = ranks < RANK
        parts = tl.load(part_ptr + (row * SPLITS + splits[:, None]) * BLOCK_R + projection * RANK + ranks[None, :],
                        mask=(splits < SPLITS)[:, None] & rank_ok[None, :], other=0.0)
        low = tl.sum(parts, axis=0).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded as a GEMM leaves it
        ns = first + tl.arange(0, BLOCK_N)
        n_ok = (ns < N) & (ns * 0 + adapter > 0)
        b = tl.load(b_ptr + ns[:, None] * stride_bn + adapter * stride_be + ranks[None, :],
                    mask=n_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(b * low[None, :], axis=1)
        old = tl.load(out_ptr + row * stride_om + ns, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + ns, (old + delta).to(out_ptr.dtype.element_ty), mask=n_ok)

    return shrink_rows, expand_rows


def rows_product_into(out, x, rows, tables) -> None:
    """out[i] += x[i] A_e^T B_e^T (scaling in B) for each row i's adapter e = rows[i] (0: none), in
    place; out [M, sum N] (a group's projections side by side), x [M, K], rows [M] (int64), tables an
    `AdapterTables` (lora/stacked.py)."""
    if kernels_apply(x, tables.a, MAX_TABLE_ROWS) and tables.fits_kernels and x.stride(1) == 1 and out.stride(1) == 1:
        _rows_kernels_into(out, x, rows, tables)
        return
    import torch

    count, width = x.shape
    # every slot on a GPU (a CUDA graph replays what it captured, however many adapters come later);
    # elsewhere the slots up to the last one in use (free slots hold zeros)
    adapters, rank = tables.a.shape[0] if x.is_cuda else tables.leading, tables.rank
    products = (x @ tables.a[:adapters].view(-1, width).t()).view(count, adapters, -1)
    own = torch.arange(adapters, device=x.device) == rows.view(-1, 1)
    low = torch.where(own.unsqueeze(-1), products, 0)  # a row's own adapter's columns (0 x NaN would be NaN)
    for number, (start, end) in enumerate(tables.spans):
        part = low[:, :, number * rank:(number + 1) * rank].reshape(count, adapters * rank)
        out[:, start:end].addmm_(part, tables.b[start:end, :adapters].reshape(end - start, adapters * rank).t())


def _rows_kernels_into(out, x, rows, tables) -> None:
    import torch
    import triton

    shrink_rows, expand_rows = _row_kernels()
    (count, width), ranks = x.shape, tables.a.shape[1]
    block_r, block_k, splits = _shrink_plan(triton, width, ranks)
    partials = torch.empty((count, splits, block_r), dtype=torch.float32, device=x.device)
    shrink_rows[(splits, count)](x, rows, tables.a, partials, ranks, x.stride(0), tables.a.stride(0),
                                 tables.a.stride(1), K=width, SPLITS=splits, BLOCK_K=block_k, BLOCK_R=block_r,
                                 num_warps=4 if block_k * block_r <= 4096 else 8, **pdl.launch(x.device))
    bounds = [end for _, end in tables.spans[:-1]] + [out.shape[1]] * (3 - len(tables.spans))
    expand_rows[(triton.cdiv(out.shape[1], TABLE_BLOCK_N), count)](
        partials, rows, tables.b, out, out.shape[1], tables.rank, bounds[0], bounds[1], tables.b.stride(0),
        tables.b.stride(1), out.stride(0), SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits),
        BLOCK_N=TABLE_BLOCK_N, BLOCK_RANK=max(16, triton.next_power_of_2(tables.rank)), BLOCK_R=block_r, num_warps=4,
        **pdl.launch(x.device))
