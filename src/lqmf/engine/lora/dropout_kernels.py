"""Triton kernels of engine/lora/dropout.py: LoRA's dropout inside its rank-r product dropout(x) A^T, the
mask drawn in registers from Philox in forward and drawn again in backward, never stored.

The mask of element (m, k): columns come in groups of GROUP = 64, each four lanes of LANE = 16
columns; one Philox call (`randint4x`) at counter (m * groups + g) * 16 + j gives the four lanes'
values at columns g * 64 + lane * 16 + j. A value keeps its element where its top 24 bits are at or
above THRESHOLD (p * 2^24), scaled by 1 / (1 - p) in float32 and rounded to x's dtype, as
torch's dropout does. Every kernel walks whole column groups, so each sees the same mask for a seed
whatever its row tiles.

Imported only by dropout.py, and only when a kernel runs (importing triton takes time).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lqmf.engine.lora.nf4_kernels import rounded

GROUP_COLUMNS = 64  # columns a Philox call covers: four lanes
GROUP = tl.constexpr(GROUP_COLUMNS)
LANE = tl.constexpr(16)  # columns of one lane: the smallest tl.dot operand


@triton.jit
def _keeps(seed, rows, group, GROUPS, THRESHOLD):
    """The keep masks of column group `group`'s four lanes for rows: four [BLOCK_M, LANE] booleans."""
    counter = (rows.to(tl.int64)[:, None] * GROUPS + group) * LANE + tl.arange(0, LANE)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    return ((r0 >> 8).to(tl.int32) >= THRESHOLD, (r1 >> 8).to(tl.int32) >= THRESHOLD,
            (r2 >> 8).to(tl.int32) >= THRESHOLD, (r3 >> 8).to(tl.int32) >= THRESHOLD)


@triton.jit
def _dropped(x_ptr, rows, cols, keep, M, K, stride_xm, SCALE, INTERPRETED: tl.constexpr):
    """dropout(x) at rows x cols ([BLOCK_M, LANE]) in x's dtype; 0 outside x."""
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
    return rounded(tl.where(keep, x.to(tl.float32) * SCALE, 0.0), x.dtype, INTERPRETED)


@triton.jit
def _a_lane(a_ptr, ranks, cols, R, K, stride_ar, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """A's lane transposed ([LANE, BLOCK_R]), rounded to dtype (as autocast rounds an fp32 weight)."""
    inside = (cols < K)[:, None] & (ranks < R)[None, :]
    a = tl.load(a_ptr + ranks[None, :] * stride_ar + cols[:, None], mask=inside, other=0.0)
    return rounded(a.to(tl.float32), dtype, INTERPRETED)


@triton.jit
def _dot(acc, first, second, IEEE: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + first second in float32."""
    if INTERPRETED:  # Triton's CPU interpreter multiplies bf16 operands wrongly
        first, second = first.to(tl.float32), second.to(tl.float32)
    if IEEE:  # float32 inputs: full precision, not TF32
        return tl.dot(first, second, acc, input_precision="ieee")
    return tl.dot(first, second, acc)


@triton.jit
def _shrink_lane(acc, x_ptr, a_ptr, rows, ranks, cols, keep, M, K, R, stride_xm, stride_ar, SCALE,
                 IEEE: tl.constexpr, INTERPRETED: tl.constexpr):
    dropped = _dropped(x_ptr, rows, cols, keep, M, K, stride_xm, SCALE, INTERPRETED)
    return _dot(acc, dropped, _a_lane(a_ptr, ranks, cols, R, K, stride_ar, dropped.dtype, INTERPRETED), IEEE,
                INTERPRETED)


@triton.jit(do_not_specialize=["seed"])
def dropout_shrink_kernel(x_ptr, a_ptr, out_ptr, M, K, R, stride_xm, stride_ar, seed, THRESHOLD, SCALE,
                          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                          INTERPRETED: tl.constexpr):
    """out[M, R] = dropout(x) A^T for BLOCK_M rows a program, over every column group of K."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    groups = tl.cdiv(K, GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for group in range(groups):
        k0, k1, k2, k3 = _keeps(seed, rows, group, groups, THRESHOLD)
        cols = group * GROUP + tl.arange(0, LANE)
        acc = _shrink_lane(acc, x_ptr, a_ptr, rows, ranks, cols, k0, M, K, R, stride_xm, stride_ar, SCALE,
                           IEEE, INTERPRETED)
        acc = _shrink_lane(acc, x_ptr, a_ptr, rows, ranks, cols + LANE, k1, M, K, R, stride_xm, stride_ar, SCALE,
                           IEEE, INTERPRETED)
        acc = _shrink_lane(acc, x_ptr, a_ptr, rows, ranks, cols + 2 * LANE, k2, M, K, R, stride_xm, stride_ar,
                           SCALE, IEEE, INTERPRETED)
        acc = _shrink_lane(acc, x_ptr, a_ptr, rows, ranks, cols + 3 * LANE, k3, M, K, R, stride_xm, stride_ar,
                           SCALE, IEEE, INTERPRETED)
    inside = (rows < M)[:, None] & (ranks < R)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * R + ranks[None, :],
             rounded(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=inside)


@triton.jit
def _backward_lane(acc, x_ptr, dx_ptr, grad, a_t, rows, cols, keep, M, K, stride_xm, SCALE,
                   WANT_DX: tl.constexpr, WANT_DA: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr):
    """One lane of backward: stores dx = dropout'(grad A) there, and returns acc + grad^T dropout(x)."""
    if WANT_DX:
        product = _dot(tl.zeros((grad.shape[0], LANE), dtype=tl.float32), grad, a_t, IEEE, INTERPRETED)
        product = rounded(product, grad.dtype, INTERPRETED).to(tl.float32)  # the rank-r GEMM's output, rounded
        dx = rounded(tl.where(keep, product * SCALE, 0.0), dx_ptr.dtype.element_ty, INTERPRETED)
        inside = (rows < M)[:, None] & (cols < K)[None, :]
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], dx, mask=inside)
    if WANT_DA:
        dropped = _dropped(x_ptr, rows, cols, keep, M, K, stride_xm, SCALE, INTERPRETED)
        acc = _dot(acc, tl.trans(grad), dropped, IEEE, INTERPRETED)
    return acc


@triton.jit
def _store_partial(partial_ptr, acc, split, ranks, cols, R, K):
    inside = (ranks < R)[:, None] & (cols < K)[None, :]
    tl.store(partial_ptr + (split * R + ranks[:, None]).to(tl.int64) * K + cols[None, :], acc, mask=inside)


@triton.jit(do_not_specialize=["seed"])
def dropout_shrink_backward_kernel(x_ptr, a_ptr, grad_ptr, dx_ptr, partial_ptr, M, K, R, stride_xm, stride_ar,
                                   ROWS_PER_SPLIT, seed, THRESHOLD, SCALE, BLOCK_M: tl.constexpr,
                                   BLOCK_R: tl.constexpr, WANT_DX: tl.constexpr, WANT_DA: tl.constexpr,
                                   IEEE: tl.constexpr, INTERPRETED: tl.constexpr):
    """Backward of dropout_shrink_kernel for one column group (program_id 0) and one slice of ROWS_PER_SPLIT
    rows (program_id 1), from grad = d out [M, R]: dx [M, K] = dropout'(grad A) (WANT_DX), and the slice's
    float32 part of dA = grad^T dropout(x) in partial[split] ([splits, R, K]; WANT_DA), the mask drawn again."""
    group, split = tl.program_id(0), tl.program_id(1)
    groups = tl.cdiv(K, GROUP)
    ranks = tl.arange(0, BLOCK_R)
    cols = group * GROUP + tl.arange(0, LANE)
    dtype = x_ptr.dtype.element_ty
    a0 = tl.trans(_a_lane(a_ptr, ranks, cols, R, K, stride_ar, dtype, INTERPRETED))
    a1 = tl.trans(_a_lane(a_ptr, ranks, cols + LANE, R, K, stride_ar, dtype, INTERPRETED))
    a2 = tl.trans(_a_lane(a_ptr, ranks, cols + 2 * LANE, R, K, stride_ar, dtype, INTERPRETED))
    a3 = tl.trans(_a_lane(a_ptr, ranks, cols + 3 * LANE, R, K, stride_ar, dtype, INTERPRETED))
    acc0 = tl.zeros((BLOCK_R, LANE), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_R, LANE), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, LANE), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_R, LANE), dtype=tl.float32)
    start = split * ROWS_PER_SPLIT
    for first in range(start, tl.minimum(start + ROWS_PER_SPLIT, M), BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        inside = (rows < M)[:, None] & (ranks < R)[None, :]
        grad = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * R + ranks[None, :], mask=inside, other=0.0)
        k0, k1, k2, k3 = _keeps(seed, rows, group, groups, THRESHOLD)
        acc0 = _backward_lane(acc0, x_ptr, dx_ptr, grad, a0, rows, cols, k0, M, K, stride_xm, SCALE,
                              WANT_DX, WANT_DA, IEEE, INTERPRETED)
        acc1 = _backward_lane(acc1, x_ptr, dx_ptr, grad, a1, rows, cols + LANE, k1, M, K, stride_xm, SCALE,
                              WANT_DX, WANT_DA, IEEE, INTERPRETED)
        acc2 = _backward_lane(acc2, x_ptr, dx_ptr, grad, a2, rows, cols + 2 * LANE, k2, M, K, stride_xm, SCALE,
                              WANT_DX, WANT_DA, IEEE, INTERPRETED)
        acc3 = _backward_lane(acc3, x_ptr, dx_ptr, grad, a3, rows, cols + 3 * LANE, k3, M, K, stride_xm, SCALE,
                              WANT_DX, WANT_DA, IEEE, INTERPRETED)
    if WANT_DA:
        _store_partial(partial_ptr, acc0, split, ranks, cols, R, K)
        _store_partial(partial_ptr, acc1, split, ranks, cols + LANE, R, K)
        _store_partial(partial_ptr, acc2, split, ranks, cols + 2 * LANE, R, K)
        _store_partial(partial_ptr, acc3, split, ranks, cols + 3 * LANE, R, K)


@triton.jit(do_not_specialize=["seed"])
def dropout_mask_kernel(out_ptr, M, K, seed, THRESHOLD, BLOCK_M: tl.constexpr):
    """out[M, K] (int8) = the mask the other two kernels draw for seed: 1 kept, 0 dropped (tests, benchmarks)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = tl.cdiv(K, GROUP)
    group = tl.program_id(1)
    keeps = _keeps(seed, rows, group, groups, THRESHOLD)
    cols = group * GROUP + tl.arange(0, LANE)
    for lane in tl.static_range(4):
        at = cols + lane * LANE
        inside = (rows < M)[:, None] & (at < K)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + at[None, :], keeps[lane].to(tl.int8), mask=inside)
