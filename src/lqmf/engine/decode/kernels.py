"""Fused Triton kernels for the batched decoder's step (decode/batched.py), a handful a layer instead of ~50.

  - `rms_norm`: LlamaRMSNorm in one kernel (fp32 math, cast back, times the weight), optionally after
    the residual add it follows (`hidden + delta` rounded to the model's dtype), returning both;
  - `rotary_write`: the rotate-half rotary embedding of q and k with the cos/sin the model's
    `rotary_emb` gave, q to a new tensor, k and v straight into the static KV cache at each row's
    position: one kernel for all three;
  - `decode_attention`: one new token per row over the cache up to `length` (grouped-query, keys past
    the row's position or outside its sliding window masked, fp32 softmax), split over the keys
    ("flash decoding": partial maxima, sums and outputs per split, then one combine kernel), so a
    few rows still fill the GPU; its products through tl.dot for 16-bit caches, multiply-adds for float32;
  - `silu_mul`: SiLU(gate) * up, read in place from the stacked gate/up matmul's output.

Each rounds where the torch code it replaces rounds, so bfloat16 results stay within a rounding
of it. Every launch has fixed block sizes and no host sync: a CUDA graph captures it (each kernel
compiles on its first use per shape, in the eager warm-up before a capture). Where Triton
is missing, off the GPU (unless OFF_GPU: the tests, under TRITON_INTERPRET=1), or with
LQMF_DECODE_KERNELS=0, the decoder runs its torch code.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from lqmf.engine.decode import pdl

OFF_GPU = False  # run them on the CPU too (the tests do, under TRITON_INTERPRET=1)
TARGET_PROGRAMS = 512  # attention programs a step aims for (rows x kv heads x splits), ~4 per SM of an H100
SILU_BLOCK = 1024
NO_WINDOW = 1 << 40
ATTENTION_DOT = True  # 16-bit caches: attention's products on tensor cores (False: multiply-adds, as float32)


def enabled(device) -> bool:
    """Whether the decoder's step runs these kernels on device: CUDA (or OFF_GPU), Triton installed, not off."""
    return ((device.type == "cuda" or OFF_GPU) and os.environ.get("LQMF_DECODE_KERNELS", "1") != "0"
            and _kernels() is not None)


@functools.cache
def _kernels() -> Any:
    """A namespace of the jitted kernels (compiled on first use per shape), or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return SimpleNamespace(triton=triton, **_norm_kernels(triton, tl), **_rotary_kernels(triton, tl),
                           **_attention_kernels(triton, tl), **_silu_kernels(triton, tl))


def _norm_kernels(triton, tl) -> dict[str, Any]:
    """RMSNorm, after the residual add or not."""

    @triton.jit
    def rms_norm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, sum_ptr, eps, stride_x, stride_d, stride_o, stride_s,
                        N: tl.constexpr, BLOCK: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:  # decode/pdl.py: wait for the kernel before, then let the next one launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)  # int64 offsets: a long prefill's rows x width may pass 2**31
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if RESIDUAL:  # hidden + delta, rounded to the model's dtype as torch's add does
            delta = tl.load(delta_ptr + row * stride_d + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + delta.to(tl.float32)).to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
        xf = x.to(tl.float32)
        variance = tl.sum(xf * xf, axis=0) / N
        normed = (xf * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
        weight = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=ok)

    return {"rms_norm_kernel": rms_norm_kernel}


def _rotary_kernels(triton, tl) -> dict[str, Any]:
    """Rotary for q and k, k and v into the cache."""

    @triton.jit
    def rotary_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, keys_ptr, values_ptr,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_sin,
                            stride_ob, stride_oh, stride_slot, stride_head, stride_pos,
                            HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            PDL: tl.constexpr = False):
        if PDL:  # decode/pdl.py: wait for the kernel before, then let the next one launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row, head = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: cache offsets pass 2**31
        dims = tl.arange(0, BLOCK_D)
        ok = dims < D
        cos = tl.load(cos_ptr + row * stride_cos + dims, mask=ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + row * stride_sin + dims, mask=ok, other=0.0).to(tl.float32)
        cached = row * stride_slot + tl.load(pos_ptr + row) * stride_pos  # slot = row
        if head < HEADS + KV_HEADS:  # q or k: x * cos + rotate_half(x) * sin, each product rounded as torch's
            if head < HEADS:
                src = q_ptr + row * stride_qb + head * stride_qh
                dst = q_out_ptr + row * stride_ob + head * stride_oh
            else:
                src = k_ptr + row * stride_kb + (head - HEADS) * stride_kh
                dst = keys_ptr + cached + (head - HEADS) * stride_head
            half = D // 2
            x = tl.load(src + dims, mask=ok, other=0.0)
            rotated = tl.load(src + tl.where(dims < half, dims + half, dims - half), mask=ok, other=0.0)
            rotated = tl.where(dims < half, -rotated.to(tl.float32), rotated.to(tl.float32))
            first = (x.to(tl.float32) * cos).to(x.dtype).to(tl.float32)
            second = (rotated * sin).to(x.dtype).to(tl.float32)
            tl.store(dst + dims, (first + second).to(x.dtype), mask=ok)
        else:
            kv = head - HEADS - KV_HEADS
            value = tl.load(v_ptr + row * stride_vb + kv * stride_vh + dims, mask=ok, other=0.0)
            tl.store(values_ptr + cached + kv * stride_head + dims, value, mask=ok)

    return {"rotary_write_kernel": rotary_write_kernel}


def _attention_kernels(triton, tl) -> dict[str, Any]:
    """Decode attention's two kernels: per split, then the combine."""

    @triton.jit
    def attention_split_kernel(q_ptr, keys_ptr, values_ptr, pos_ptr, max_ptr, sum_ptr, acc_ptr,
                               length, window, scaling, tiles,
                               stride_qb, stride_qh, stride_slot, stride_head, stride_pos,
                               GROUPS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                               BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:  # decode/pdl.py: wait for the kernel before, then let the next one launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row, kv, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        group, dims = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
        g_ok, d_ok = group < GROUPS, dims < D
        heads = kv * GROUPS + group
        q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # float32 operands: multiply-adds, or tl.dot in the interpreter (it multiplies 16-bit ones wrongly)
            q = q.to(tl.float32)
        position = tl.load(pos_ptr + row)
        cache = row * stride_slot + kv * stride_head
        best = tl.full([BLOCK_G], -1.0e30, tl.float32)  # finite: a split with every key masked stays 0, not NaN
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for tile in range(0, tiles):
            keys_at = (split * tiles + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
            seen = (keys_at < length) & (keys_at <= position) & (keys_at > position - window)
            at = cache + keys_at[:, None] * stride_pos + dims[None, :]
            both = seen[:, None] & d_ok[None, :]
            k = tl.load(keys_ptr + at, mask=both, other=0.0)
            v = tl.load(values_ptr + at, mask=both, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            if USE_DOT:  # tensor cores: 16-bit operands, float32 sums; BLOCK_G >= 16 (padded query rows)
                scores = tl.dot(q, tl.trans(k))
            else:  # multiply-adds: float32 throughout
                scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
            scores = tl.where(seen[None, :], scores * scaling, float("-inf"))  # [BLOCK_G, BLOCK_N]
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            if USE_DOT:  # the weights rounded to the values' dtype, as torch rounds the probabilities
                update = tl.dot(weights.to(values_ptr.dtype.element_ty).to(v.dtype), v)
            else:
                update = tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
            acc = acc * rescale[:, None] + update
            total = total * rescale + tl.sum(weights, axis=1)
            best = new_best
        part = (row * GROUPS * tl.num_programs(1) + heads) * SPLITS + split  # [rows, heads, SPLITS]
        tl.store(max_ptr + part, best, mask=g_ok)
        tl.store(sum_ptr + part, total, mask=g_ok)
        tl.store(acc_ptr + part[:, None] * D + dims[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def attention_combine_kernel(max_ptr, sum_ptr, acc_ptr, out_ptr, stride_ob, stride_oh,
                                 HEADS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                                 SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:  # decode/pdl.py: wait for the kernel before, then let the next one launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row, head = tl.program_id(0), tl.program_id(1)
        splits, dims = tl.arange(0, SPLITS_P2), tl.arange(0, BLOCK_D)
        s_ok, d_ok = splits < SPLITS, dims < D
        part = (row * HEADS + head) * SPLITS + splits
        best = tl.load(max_ptr + part, mask=s_ok, other=-1.0e30)
        scale = tl.where(s_ok, tl.exp(best - tl.max(best, axis=0)), 0.0)
        total = tl.sum(tl.load(sum_ptr + part, mask=s_ok, other=0.0) * scale, axis=0)
        acc = tl.load(acc_ptr + part[:, None] * D + dims[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        out = tl.sum(acc * scale[:, None], axis=0) / total
        tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=d_ok)

    return {"attention_split_kernel": attention_split_kernel, "attention_combine_kernel": attention_combine_kernel}


def _silu_kernels(triton, tl) -> dict[str, Any]:
    """SiLU(gate) * up."""

    @triton.jit
    def silu_mul_kernel(gate_up_ptr, out_ptr, width, stride_g, stride_o, BLOCK: tl.constexpr,
                        PDL: tl.constexpr = False):
        if PDL:  # decode/pdl.py: wait for the kernel before, then let the next one launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=ok, other=0.0)
        up = tl.load(gate_up_ptr + row * stride_g + width + cols, mask=ok, other=0.0).to(tl.float32)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # torch's silu, rounded
        tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)

    return {"silu_mul_kernel": silu_mul_kernel}


def _unit_last_stride(tensor):
    """tensor, or a copy of it where its last dimension is strided (the kernels step through it by one)."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def rms_norm(hidden, weight, eps: float, delta=None):
    """(hidden + delta, norm of that) where delta is given, else (hidden, its norm): LlamaRMSNorm of the
    last dimension, in hidden's dtype. weight is [N], in hidden's dtype."""
    import torch

    k = _kernels()
    width = hidden.shape[-1]
    flat = _unit_last_stride(hidden.reshape(-1, width))
    residual = delta is not None
    deltas = _unit_last_stride(delta.reshape(-1, width)) if residual else flat
    summed = torch.empty_like(flat) if residual else flat
    out = torch.empty_like(flat)
    block = k.triton.next_power_of_2(width)
    k.rms_norm_kernel[(flat.shape[0],)](flat, deltas, weight, out, summed, float(eps), flat.stride(0),
                                        deltas.stride(0), out.stride(0), summed.stride(0),
                                        N=width, BLOCK=block, RESIDUAL=residual, **pdl.launch(hidden.device),
                                        num_warps=_warps(block))
    return summed.view(hidden.shape), out.view(hidden.shape)


def rotary_write(q, k, v, cos, sin, positions, keys, values):
    """Rotate q, k [B, heads, D] (head views of one step's projections, last dim contiguous) by cos, sin
    [B, D]; write k and v [B, kv heads, D] into keys/values [slots, kv heads, L, D] at slot b, positions[b].
    Returns the rotated q, [B, heads, D]."""
    import torch

    kern = _kernels()
    q, k, v, cos, sin = (_unit_last_stride(t) for t in (q, k, v, cos, sin))
    batch, heads, dim = q.shape
    kv_heads = k.shape[1]
    rotated = torch.empty((batch, heads, dim), dtype=q.dtype, device=q.device)
    block = kern.triton.next_power_of_2(dim)
    kern.rotary_write_kernel[(batch, heads + 2 * kv_heads)](
        q, k, v, cos, sin, positions, rotated, keys, values,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        rotated.stride(0), rotated.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        HEADS=heads, KV_HEADS=kv_heads, D=dim, BLOCK_D=block, num_warps=1 if block <= 128 else 2,
        **pdl.launch(q.device))
    return rotated


def _power_of_2(value: int) -> int:
    """The smallest power of two >= value, at least 2 (no 1-wide blocks)."""
    return max(2, 1 << (value - 1).bit_length())


@dataclass(frozen=True)
class AttentionPlan:
    """Block sizes, grid and warps of `decode_attention` for one (batch, length) step: fixed per step."""

    groups: int  # query heads per kv head
    block_g: int
    block_n: int  # keys a tile
    block_d: int
    splits: int  # programs along the keys, per row and kv head
    tiles: int  # key tiles per split
    splits_p2: int
    dot: bool  # tl.dot on tensor cores (16-bit caches) or multiply-adds (float32)
    split_warps: int = 4
    combine_warps: int = 1


def attention_plan(batch: int, heads: int, kv_heads: int, dim: int, length: int, sixteen_bit: bool) -> AttentionPlan:
    """Enough programs (rows x kv heads x splits) to fill the GPU, no empty split, up to 32 partial
    outputs a thread in the combine. With 16-bit caches (and ATTENTION_DOT) a tile is 64 keys through
    tl.dot, at least 16 query rows; otherwise [G, N, D] products of at most 8K elements."""
    groups = heads // kv_heads
    dot = ATTENTION_DOT and sixteen_bit and dim >= 16
    block_g, block_d = _power_of_2(groups), _power_of_2(dim)
    if dot:
        block_g, block_n = max(16, block_g), 64
    else:
        block_n = min(64, max(16, 8192 // (block_g * block_d)))
    tiles = -(-length // block_n)
    splits = max(1, min(tiles, -(-TARGET_PROGRAMS // (batch * kv_heads))))
    per_split = -(-tiles // splits)
    splits = -(-tiles // per_split)
    splits_p2 = _power_of_2(splits)
    return AttentionPlan(groups, block_g, block_n, block_d, splits, per_split, splits_p2, dot,
                         combine_warps=max(1, min(8, splits_p2 * block_d // 1024)))


def decode_attention(q, keys, values, positions, length: int, window: int | None, scaling: float):
    """Attention of one new token per row: q [B, heads, D] over keys/values [slots, kv heads, L, D] of
    slots 0..B-1, positions 0..length-1, each row seeing keys at or before positions[b] (and within the
    window). Returns [B, heads, D] in q's dtype."""
    import torch

    kern = _kernels()
    q = _unit_last_stride(q)
    batch, heads, dim = q.shape
    plan = attention_plan(batch, heads, keys.shape[1], dim, length, keys.element_size() == 2)
    best = torch.empty((batch, heads, plan.splits), dtype=torch.float32, device=q.device)
    total = torch.empty_like(best)
    acc = torch.empty((batch, heads, plan.splits, dim), dtype=torch.float32, device=q.device)
    kern.attention_split_kernel[(batch, keys.shape[1], plan.splits)](
        q, keys, values, positions, best, total, acc, length, window or NO_WINDOW, float(scaling), plan.tiles,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        GROUPS=plan.groups, D=dim, SPLITS=plan.splits, BLOCK_G=plan.block_g, BLOCK_N=plan.block_n,
        BLOCK_D=plan.block_d, USE_DOT=plan.dot, UPCAST=not plan.dot or os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=plan.split_warps, **pdl.launch(q.device))
    out = torch.empty((batch, heads, dim), dtype=q.dtype, device=q.device)
    kern.attention_combine_kernel[(batch, heads)](
        best, total, acc, out, out.stride(0), out.stride(1), HEADS=heads, D=dim, SPLITS=plan.splits,
        SPLITS_P2=plan.splits_p2, BLOCK_D=plan.block_d, **pdl.launch(q.device), num_warps=plan.combine_warps)
    return out


def silu_mul(gate_up):
    """SiLU(gate) * up for gate_up [..., 2 I] holding gate then up side by side; [..., I] in its dtype."""
    import torch

    kern = _kernels()
    width = gate_up.shape[-1] // 2
    flat = _unit_last_stride(gate_up.reshape(-1, 2 * width))
    out = torch.empty((flat.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)
    kern.silu_mul_kernel[(flat.shape[0], kern.triton.cdiv(width, SILU_BLOCK))](
        flat, out, width, flat.stride(0), out.stride(0), BLOCK=SILU_BLOCK, **pdl.launch(gate_up.device), num_warps=4)
    return out.view(*gate_up.shape[:-1], width)
