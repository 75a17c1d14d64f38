"""A 4-bit (NF4) weight times a few rows in one Triton kernel: the base matmul of a batched decode step.

For two rows or more bitsandbytes dequantizes the whole weight to bf16 and then runs a GEMM, so a
step writes and reads back four times the bytes of the packed weight. This kernel reads the packed
weight once for all rows (up to MAX_ROWS): program (n, s) owns BLOCK_N output columns and the s-th
of `split` slices of K (split-K, so that a 4096 x 4096 layer still gives every multiprocessor
work), unpacks two 4-bit codes per byte (the first element in the high nibble, as bitsandbytes
packs them), looks them up in the 16-entry NF4 code, scales them by their block's absmax (for a
double-quantized weight the absmax is itself dequantized in the kernel: code2[q] * absmax2 +
offset) and multiplies the even and odd columns of the rows with `tl.dot` in fp32. Slices add
their partial sums into an fp32 output with atomics; with one slice the kernel stores the result
in the input's dtype directly. The dequantized values are those of bitsandbytes'
`dequantize_4bit`, rounded to the input dtype as it rounds them; only the order of sums differs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

MIN_ROWS, MAX_ROWS = 2, 64  # fewer rows: bitsandbytes' GEMV
TARGET_PROGRAMS = 264  # two per multiprocessor of an H100/H200
OFF_GPU = False  # run on the CPU too (the tests do, under TRITON_INTERPRET=1)


@functools.cache
def _kernel() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def nf4_matmul(x_ptr, q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, code_ptr, out_ptr, M, N, K,
                   stride_xm, K_SLICE,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                   BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, ATOMIC: tl.constexpr, DOT_FP32: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        half = tl.arange(0, BLOCK_K // 2)
        row_ok = rows < M
        col_ok = cols < N
        col_bytes = cols.to(tl.int64) * (K // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        begin = pid_k * K_SLICE
        for start in range(begin, begin + K_SLICE, BLOCK_K):
            pairs = start // 2 + half  # byte j of a weight row holds its elements 2j (high nibble) and 2j + 1
            byte = col_bytes[:, None] + pairs[None, :]
            packed = tl.load(q_ptr + byte, mask=col_ok[:, None], other=0).to(tl.int32)
            block = (byte * 2) // BLOCKSIZE
            if NESTED:
                quantized = tl.load(absmax_ptr + block, mask=col_ok[:, None], other=0).to(tl.int32)
                scale = tl.load(code2_ptr + quantized) * tl.load(absmax2_ptr + block // BLOCKSIZE2,
                                                                 mask=col_ok[:, None], other=0.0) + offset
            else:
                scale = tl.load(absmax_ptr + block, mask=col_ok[:, None], other=0.0)
            high = (tl.load(code_ptr + (packed >> 4)) * scale).to(x_ptr.dtype.element_ty)
            low = (tl.load(code_ptr + (packed & 15)) * scale).to(x_ptr.dtype.element_ty)
            x_at = x_ptr + rows[:, None] * stride_xm + 2 * pairs[None, :]
            x_even = tl.load(x_at, mask=row_ok[:, None], other=0.0)
            x_odd = tl.load(x_at + 1, mask=row_ok[:, None], other=0.0)
            if DOT_FP32:  # Triton's CPU interpreter multiplies bf16 wrongly
                x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
                high, low = high.to(tl.float32), low.to(tl.float32)
            acc += tl.dot(x_even, tl.trans(high))
            acc += tl.dot(x_odd, tl.trans(low))
        at = out_ptr + rows[:, None] * N + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        if ATOMIC:
            tl.atomic_add(at, acc, mask=ok, sem="relaxed")
        else:
            tl.store(at, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return triton, nf4_matmul


@dataclass(frozen=True)
class Config:
    block_n: int = 64
    block_k: int = 128
    split: int | None = None  # None: enough slices for TARGET_PROGRAMS programs
    warps: int = 4


DEFAULT = Config()


@dataclass
class NF4Weight:
    """A 4-bit layer's weight as the kernel reads it (engine/compat.nf4_parts); None from `of` where the
    kernel does not apply."""

    packed: Any
    absmax: Any
    absmax2: Any
    code2: Any
    offset: float
    code: Any
    out_features: int
    in_features: int
    blocksize: int
    blocksize2: int
    bias: Any
    config: Config = DEFAULT

    @classmethod
    def of(cls, layer) -> NF4Weight | None:
        from lqmf.engine import compat

        if _kernel() is None or os.environ.get("LQMF_NF4_KERNEL", "0") != "1":
            return None
        parts = compat.nf4_parts(layer)
        if parts is None or not (parts["packed"].is_cuda or OFF_GPU):
            return None
        if parts["in_features"] % DEFAULT.block_k or parts["blocksize"] % 2:
            return None
        return cls(**parts, bias=getattr(layer, "bias", None))

    def applies(self, x) -> bool:
        rows = x.numel() // x.shape[-1]
        return MIN_ROWS <= rows <= MAX_ROWS and x.dtype in _dtypes()

    def slices(self, config: Config) -> int:
        """How many K slices: config.split, or enough for TARGET_PROGRAMS programs, dividing K in BLOCK_K steps."""
        chunks = self.in_features // config.block_k
        wanted = config.split or max(1, -(-TARGET_PROGRAMS // -(-self.out_features // config.block_n)))
        return max(s for s in range(1, min(wanted, chunks) + 1) if chunks % s == 0)

    def matmul(self, x, config: Config | None = None):
        """x [..., K] times the weight's transpose (plus the layer's bias): [..., N] in x's dtype."""
        import torch

        config = config or self.config
        triton, kernel = _kernel()
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        count = rows.shape[0]
        split = self.slices(config)
        out = (torch.zeros if split > 1 else torch.empty)(
            (count, self.out_features), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
        grid = (triton.cdiv(self.out_features, config.block_n), split)
        nested = self.absmax2 is not None
        kernel[grid](rows, self.packed, self.absmax, self.absmax2 if nested else self.absmax,
                     self.code2 if nested else self.code, self.offset, self.code, out, count,
                     self.out_features, self.in_features, rows.stride(0), self.in_features // split,
                     BLOCK_M=max(16, triton.next_power_of_2(count)), BLOCK_N=config.block_n,
                     BLOCK_K=config.block_k, BLOCKSIZE=self.blocksize, BLOCKSIZE2=self.blocksize2,
                     NESTED=nested, ATOMIC=split > 1, DOT_FP32=not x.is_cuda,
                     num_warps=config.warps)
        out = out.to(x.dtype)
        if self.bias is not None:
            out += self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def _dtypes():
    import torch

    return (torch.bfloat16, torch.float16)
