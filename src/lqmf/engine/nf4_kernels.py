"""A 4-bit (NF4) weight times a few rows, in one Triton kernel: the base matmul of a batched decode step.

bitsandbytes multiplies one row by a 4-bit weight with a GEMV that reads the packed weight once.
For two rows or more it dequantizes the whole weight to bf16 and runs a GEMM: for a 7B model every
decode step then writes and reads back 14 GB, and that, not the arithmetic, sets the step's time
(docs/serving.md). This kernel reads the packed weight once for all rows of the step (up to
MAX_ROWS): each program owns BLOCK_N output columns, walks K, unpacks two 4-bit codes per byte
(the first element in the high nibble, as bitsandbytes packs them), looks them up in the
quantization code, scales them by their block's absmax and multiplies the even and odd columns of
the rows with `tl.dot`, accumulating in fp32. The dequantized values are those of
`bitsandbytes.functional.dequantize_4bit`, rounded to the input dtype as it rounds them; only the
order of the sums differs from its GEMM.
"""

from __future__ import annotations

import functools
import os
from typing import Any

MAX_ROWS = 64
OFF_GPU = False  # run on the CPU too (the tests do, under TRITON_INTERPRET=1)


@functools.cache
def _kernel() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def nf4_matmul(x_ptr, q_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                   DOT_FP32: tl.constexpr):
        block = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        half = tl.arange(0, BLOCK_K // 2)
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            pairs = start // 2 + half  # byte j of this K slice holds elements 2j (high nibble) and 2j + 1
            pair_ok = pairs < K // 2
            element = cols[:, None].to(tl.int64) * K + 2 * pairs[None, :]
            ok = col_ok[:, None] & pair_ok[None, :]
            packed = tl.load(q_ptr + element // 2, mask=ok, other=0).to(tl.int32)
            scale = tl.load(absmax_ptr + element // BLOCKSIZE, mask=ok, other=0.0)
            high = (tl.load(code_ptr + (packed >> 4)) * scale).to(x_ptr.dtype.element_ty)
            low = (tl.load(code_ptr + (packed & 15)) * scale).to(x_ptr.dtype.element_ty)
            x_ok = row_ok[:, None] & pair_ok[None, :]
            x_even = tl.load(x_ptr + rows[:, None] * stride_xm + 2 * pairs[None, :], mask=x_ok, other=0.0)
            x_odd = tl.load(x_ptr + rows[:, None] * stride_xm + 2 * pairs[None, :] + 1, mask=x_ok, other=0.0)
            if DOT_FP32:  # Triton's CPU interpreter multiplies bf16 wrongly
                x_even, x_odd, high, low = (x_even.to(tl.float32), x_odd.to(tl.float32), high.to(tl.float32),
                                            low.to(tl.float32))
            acc += tl.dot(x_even, tl.trans(high))
            acc += tl.dot(x_odd, tl.trans(low))
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    return triton, nf4_matmul


class NF4Weight:
    """A bitsandbytes 4-bit layer's weight as the kernel reads it: the packed bytes, fp32 absmax per block
    (double quantization undone once, here) and the code; None from `of` where the kernel does not apply."""

    def __init__(self, packed, absmax, code, shape: tuple[int, int], blocksize: int, bias):
        self.packed, self.absmax, self.code = packed, absmax, code
        self.out_features, self.in_features = shape
        self.blocksize, self.bias = blocksize, bias

    @classmethod
    def of(cls, layer) -> NF4Weight | None:
        weight = getattr(layer, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or state.quant_type != "nf4" or _kernel() is None:
            return None
        if not (weight.is_cuda or OFF_GPU) or os.environ.get("LQMF_NF4_KERNEL", "1") == "0":
            return None
        import bitsandbytes.functional as bnb_functional

        absmax = state.absmax
        if state.nested:
            absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        out_features, in_features = state.shape
        if in_features % 2:
            return None
        return cls(weight.data.view(-1), absmax.float().contiguous(), state.code.float().contiguous(),
                   (out_features, in_features), state.blocksize, getattr(layer, "bias", None))

    def applies(self, x) -> bool:
        rows = x.numel() // x.shape[-1]
        return 1 < rows <= MAX_ROWS and x.is_floating_point() and x.element_size() == 2

    def matmul(self, x):
        """x [..., K] times the weight's transpose (plus the layer's bias): [..., N] in x's dtype."""
        import torch

        triton, kernel = _kernel()
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        count = rows.shape[0]
        out = torch.empty((count, self.out_features), dtype=x.dtype, device=x.device)
        block_n = 32 if self.out_features >= 8192 else 16
        kernel[(triton.cdiv(self.out_features, block_n),)](
            rows, self.packed, self.absmax, self.code, out, count, self.out_features, self.in_features,
            rows.stride(0), out.stride(0), BLOCK_M=max(16, triton.next_power_of_2(count)), BLOCK_N=block_n,
            BLOCK_K=256, BLOCKSIZE=self.blocksize, DOT_FP32=not x.is_cuda, num_warps=4)
        if self.bias is not None:
            out += self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)
