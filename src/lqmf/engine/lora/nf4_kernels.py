"""Triton kernels of engine/lora/nf4.py (and nf4_frozen.py): a bitsandbytes NF4 weight times a few rows, read once.

Imported only by nf4.py and nf4_frozen.py, and only when a kernel runs (importing triton takes time). The layout they
read is bitsandbytes' (checked by tests/engine/lora/test_nf4.py against its own dequantize_4bit): a
[N, K] weight row-major, two codes a byte, the even k in the high nibble; one float32 absmax per
BLOCKSIZE consecutive values of a row (pre-dequantized once where bitsandbytes nests it).

Two kernels, two ways to multiply: `nf4_matmul_kernel`, `tl.dot` on tensor cores for a tile of up to
BLOCK_M rows (SWAP: the weight as the first operand; float32 inputs in full precision, not TF32), and
`nf4_gemv_kernel`, float32 multiply-adds on CUDA cores for one row a program (a GEMV, 16 bytes of a
weight row a thread, loaded straight into registers). Each program owns BLOCK_N output columns, one of
the slices of K and one block of rows. A loop step of the tl.dot kernel covers BLOCK_K // BLOCKSIZE
quantization blocks, unrolled; per block it loads a [BLOCK_N, BLOCKSIZE // 2] byte tile (contiguous
along K) and the BLOCK_N absmax values, splits each byte into its two codes, maps them to NF4 values
(LUT 0: two loads from the 16-entry code, which sits in one cache line; LUT 1: one 64-bit load per
byte from a 256-entry byte -> (value, value) table; LUT 2: no load, PTX byte permutes on the table
held as immediates, `register_lookup_asm`; LUT 3, the GEMV only: the same with the table's words
as operands loaded once, `_operand_codes`), scales them by the absmax and rounds them to x's dtype
as dequantize_4bit does (LATE_SCALE: rounds the codes and scales each block's sums). LUT 1 gives
the high and low codes, which x's even and odd columns multiply; LUT 0, 2 and 3 give runs of CHUNK
values of k in order, and x is loaded in the same runs, so no register of x is permuted (each warp
would permute its own copy), and the two multiply the same values in the same order. With more than
one slice they write float32 partials that `reduce_splits` sums in a fixed order (no atomics, no
host sync: both kernels can be captured in a CUDA graph), or, with SERIAL, the last of a tile's slices
to finish sums them in the same order itself (`_last_slice_sums`: a counter per tile, one launch fewer).

A third kernel, `nf4_dequantize_kernel`, serves training (nf4_frozen.py): the whole weight dequantized
in one pass, the nested absmax undone in registers, for a GEMM in forward and in backward.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

# bitsandbytes' NF4 code (bitsandbytes.functional.get_4bit_type("nf4")), which lut 2 builds into its PTX
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def _half_bits(value: float, dtype: str) -> int:
    """value's 16 bits in bfloat16 (float32 bits rounded to nearest even) or float16."""
    if dtype == "bf16":
        bits = struct.unpack("<I", struct.pack("<f", value))[0]
        return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return struct.unpack("<H", struct.pack("<e", value))[0]


def table_words(dtype: str) -> list[int]:
    """The NF4 table as eight 32-bit words (signed, as int32 holds them): the low bytes of the 16-bit
    values of entries 4w .. 4w + 3 (w = 0 .. 3), then their high bytes."""
    bits = [_half_bits(value, dtype) for value in NF4_CODE]
    words = [sum(((bits[4 * w + i] >> (8 * part)) & 0xFF) << (8 * i) for i in range(4)) for part in (0, 1)
             for w in range(4)]
    return [word - (1 << 32) if word >= 1 << 31 else word for word in words]


# lut 3: the operands that hold `table_words` (pack 4: four operands an int32 argument, the first of each used)
WORD_OPERANDS = tuple(f"${5 + 4 * w}" for w in range(8))


def register_lookup_asm(dtype: str, operands: bool = False) -> str:
    """PTX for tl.inline_asm_elementwise (pack 4): four bytes ($4), the codes of k = 0 .. 7 (byte j: k = 2j
    in its high nibble, 2j + 1 in its low) -> their 16-bit NF4 values in k order, k 0-3 in $0, $1 (the
    first output's four elements) and k 4-7 in $2, $3 (the second's): `CHUNK` values to each in turn,
    not split into even and odd k, so x's columns need no permute either (the kernel loads them in the
    same runs). No memory is read: the 16 values' low and high bytes sit in four words each
    (`table_words`), immediates in the instructions (lut 2), or with operands the arguments after $4
    (lut 3: loaded once a program, so the compiler need not copy immediates into registers before each
    use), and `prmt` (byte permute) looks up four nibbles at a time in each half of the table. `prmt`
    reads a selector nibble's bit 3 as a sign-fill flag, so the selectors carry a code's low 3 bits, and
    its bit 3 picks the half through a byte mask: the sign fill of a byte holding that bit at its top
    (`lop3` 0xD8: mask ? second : first)."""
    words = WORD_OPERANDS if operands else tuple(f"{word & 0xFFFFFFFF:#x}" for word in table_words(dtype))
    low, high = words[:4], words[4:]

    def lookup(mask_selector: int, out0: str, out1: str) -> str:
        # s: the 3-bit parts of nibbles k+1, k, k+3, k+2 (a byte's low nibble comes first); t = $4 << 4
        return (
            f"and.b32 s, s, 0x7777; prmt.b32 m, t, $4, {mask_selector:#x};"  # m: 0xFF where bit 3 is set
            f"prmt.b32 a, {low[0]}, {low[1]}, s; prmt.b32 b, {low[2]}, {low[3]}, s;"
            "lop3.b32 lo, a, b, m, 0xD8;"
            f"prmt.b32 a, {high[0]}, {high[1]}, s; prmt.b32 b, {high[2]}, {high[3]}, s;"
            "lop3.b32 hi, a, b, m, 0xD8;"
            f"prmt.b32 {out0}, lo, hi, 0x4051; prmt.b32 {out1}, lo, hi, 0x6273;"  # swap back into k order
        )

    # bit 3 of nibble 2j is bit 7 of t's byte j (sign fill 8 + j), of nibble 2j + 1 bit 7 of $4's (12 + j)
    return ("{ .reg .b32 s, t, m, a, b, lo, hi; shl.b32 t, $4, 4; mov.b32 s, $4;" + lookup(0xD9C8, "$0", "$1")
            + "shr.b32 s, $4, 16;" + lookup(0xFBEA, "$2", "$3") + "}")


BF16_LOOKUP = tl.constexpr(register_lookup_asm("bf16"))
FP16_LOOKUP = tl.constexpr(register_lookup_asm("fp16"))
OPERAND_LOOKUP = tl.constexpr(register_lookup_asm("bf16", operands=True))  # the same for fp16: the words differ
OPERAND_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * (1 + 4 * 8)))
CHUNK = tl.constexpr(4)  # lut 0 and 2 hand out k in runs of CHUNK: the first tile k 0-3 of each 8, the second 4-7


@triton.jit
def _codes(packed, code_ptr, pair_ptr, dtype: tl.constexpr, LUT: tl.constexpr, INTERPRETED: tl.constexpr):
    """The NF4 values of a [BLOCK_N, BLOCKSIZE // 2] byte tile as two tiles of its shape: LUT 1 the high
    (even k) and low (odd k) codes, float32; LUT 0 and 2 in runs of CHUNK values of k, to each tile in
    turn: LUT 2 (16-bit dtypes) in dtype, looked up in registers (`register_lookup_asm`), LUT 0 float32,
    loaded from code_ptr (also Triton's interpreter's stand-in for LUT 2, which it cannot run as PTX)."""
    if LUT == 2 and not INTERPRETED:
        if dtype == tl.bfloat16:
            first, second = tl.inline_asm_elementwise(BF16_LOOKUP, "=r,=r,=r,=r,r", [packed],
                                                      dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            first, second = tl.inline_asm_elementwise(FP16_LOOKUP, "=r,=r,=r,=r,r", [packed],
                                                      dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    elif LUT == 1:
        pair = tl.load(pair_ptr + packed.to(tl.int32))
        first = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        second = pair.to(tl.int32).to(tl.float32, bitcast=True)
    else:
        index = packed.to(tl.int32)
        pairs = tl.join(tl.load(code_ptr + (index >> 4)), tl.load(code_ptr + (index & 15)))  # k in order
        runs = tl.reshape(pairs, (packed.shape[0], packed.shape[1] // CHUNK, 2, CHUNK))
        first, second = tl.split(tl.permute(runs, (0, 1, 3, 2)))
        first = tl.reshape(first, packed.shape)
        second = tl.reshape(second, packed.shape)
    return first, second


@triton.jit
def _operand_codes(packed, words_ptr, dtype: tl.constexpr):
    """lut 3 (compiled only): `_codes`' lut 2 with the table's eight words (`table_words`, at words_ptr, int32)
    handed to the PTX as operands. The words are loaded here; the compiler hoists the loads out of the loop."""
    w0, w1, w2, w3 = tl.load(words_ptr), tl.load(words_ptr + 1), tl.load(words_ptr + 2), tl.load(words_ptr + 3)
    w4, w5, w6, w7 = tl.load(words_ptr + 4), tl.load(words_ptr + 5), tl.load(words_ptr + 6), tl.load(words_ptr + 7)
    arguments = [packed, w0, w1, w2, w3, w4, w5, w6, w7]
    if dtype == tl.bfloat16:
        first, second = tl.inline_asm_elementwise(OPERAND_LOOKUP, OPERAND_CONSTRAINTS, arguments,
                                                  dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        first, second = tl.inline_asm_elementwise(OPERAND_LOOKUP, OPERAND_CONSTRAINTS, arguments,
                                                  dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    return first, second


@triton.jit
def rounded(value, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """value (float32) in dtype, rounded to nearest even. Triton's CPU interpreter truncates float32 to
    bfloat16, so there the rounding is done on the bits first (then the cast is exact)."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = value.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        value = bits.to(tl.float32, bitcast=True)
    return value.to(dtype)


@triton.jit
def _block_values(byte_at, scale_at, col_ok, code_ptr, pair_ptr, dtype: tl.constexpr, LUT: tl.constexpr,
                  LATE_SCALE: tl.constexpr, INTERPRETED: tl.constexpr):
    """One quantization block of BLOCK_N weight rows: its values as `_codes` splits them (two tiles of
    [BLOCK_N, BLOCKSIZE // 2]) and the rows' absmax [BLOCK_N]. The values are code * absmax in dtype,
    rounded once as bitsandbytes' dequantize_4bit rounds them; with LATE_SCALE the codes alone
    (float32; LUT 2: in dtype), the caller scales the sums."""
    packed = tl.load(byte_at, mask=col_ok[:, None], other=0)
    scale = tl.load(scale_at, mask=col_ok, other=0.0)
    first, second = _codes(packed, code_ptr, pair_ptr, dtype, LUT, INTERPRETED)
    if not LATE_SCALE:
        first = rounded(first * scale[:, None], dtype, INTERPRETED)
        second = rounded(second * scale[:, None], dtype, INTERPRETED)
    return first, second, scale


@triton.jit
def _dot(acc, x, weight, SWAP: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + x weight^T ([BLOCK_M, BLOCK_N]), or with SWAP acc + weight x^T ([BLOCK_N, BLOCK_M]: the
    weight is the first operand, which a GPU can read from registers)."""
    if INTERPRETED:  # Triton's CPU interpreter multiplies bf16 operands wrongly
        x, weight = x.to(tl.float32), weight.to(tl.float32)
    if SWAP:
        first, second = weight, tl.trans(x)
    else:
        first, second = x, tl.trans(weight)
    if IEEE:  # float32 inputs: full precision, not TF32
        acc = tl.dot(first, second, acc, input_precision="ieee")
    else:
        acc = tl.dot(first, second, acc)
    return acc


@triton.jit
def _accumulate(acc, x_first, x_second, first, second, scale, dtype: tl.constexpr, SWAP: tl.constexpr,
                LATE_SCALE: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc plus one block's products on tensor cores, x_first times the first tile of weight values and
    x_second the second (see nf4_matmul_kernel for acc's shape). Every branch is static, and the one
    return is at the end (compiled Triton visits statements after a return in a static if)."""
    if LATE_SCALE:  # the block's sums over the codes (in dtype), then times the absmax
        first, second = rounded(first, dtype, INTERPRETED), rounded(second, dtype, INTERPRETED)
        part = _dot(_dot(tl.zeros_like(acc), x_first, first, SWAP, IEEE, INTERPRETED), x_second, second, SWAP,
                    IEEE, INTERPRETED)
        if SWAP:
            acc += part * scale[:, None]
        else:
            acc += part * scale[None, :]
    else:
        acc = _dot(_dot(acc, x_first, first, SWAP, IEEE, INTERPRETED), x_second, second, SWAP, IEEE, INTERPRETED)
    return acc


@triton.jit
def nf4_matmul_kernel(x_ptr, q_ptr, absmax_ptr, code_ptr, pair_ptr, out_ptr, M, N, K, stride_xm, K_PER_SPLIT,
                      final_ptr, count_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCKSIZE: tl.constexpr, SWAP: tl.constexpr, LUT: tl.constexpr,
                      LATE_SCALE: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr,
                      PDL: tl.constexpr = False, SERIAL: tl.constexpr = False, SPLIT: tl.constexpr = 1):
    """out[s] (or out, one slice) = x[rows] W[cols, slice s of K]^T; BLOCK_K // BLOCKSIZE blocks a step.
    PDL (launched as a programmatic dependent launch, so it starts while the kernel before it ends): it
    waits for that kernel's writes before its first read, then lets the kernel after it launch. SERIAL:
    final = the SPLIT slices' sum, written by the last of them to finish (`_last_slice_sums`)."""
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    begin = pid_s * K_PER_SPLIT
    row_bytes = tl.multiple_of(cols.to(tl.int64) * (K // 2) + begin // 2, 16)  # K, begin: multiples of blocksize
    byte_at = q_ptr + row_bytes[:, None] + tl.arange(0, BLOCKSIZE // 2)[None, :]  # so 16-byte vector loads
    scale_at = absmax_ptr + cols.to(tl.int64) * (K // BLOCKSIZE) + begin // BLOCKSIZE
    x_at = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + begin
    half = tl.arange(0, BLOCKSIZE // 2)
    if LUT != 1:  # x's columns as lut 0 and 2 hand out the weight's: runs of CHUNK, alternately
        x_at += ((half // CHUNK) * (2 * CHUNK) + half % CHUNK)[None, :]
    else:  # loaded whole, split into even and odd columns below
        x_at += tl.arange(0, BLOCKSIZE)[None, :]
    dtype = x_ptr.dtype.element_ty
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K_PER_SPLIT, BLOCK_K):
        for block in tl.static_range(BLOCK_K // BLOCKSIZE):
            first, second, scale = _block_values(byte_at + block * (BLOCKSIZE // 2), scale_at + block, col_ok,
                                                 code_ptr, pair_ptr, dtype, LUT, LATE_SCALE, INTERPRETED)
            if LUT != 1:
                x_first = tl.load(x_at + block * BLOCKSIZE, mask=row_ok[:, None], other=0.0)
                x_second = tl.load(x_at + block * BLOCKSIZE + CHUNK, mask=row_ok[:, None], other=0.0)
            else:
                x = tl.load(x_at + block * BLOCKSIZE, mask=row_ok[:, None], other=0.0)
                x_first, x_second = tl.split(tl.reshape(x, (BLOCK_M, BLOCKSIZE // 2, 2)))
            acc = _accumulate(acc, x_first, x_second, first, second, scale, dtype, SWAP, LATE_SCALE, IEEE,
                              INTERPRETED)
        byte_at += BLOCK_K // 2
        scale_at += BLOCK_K // BLOCKSIZE
        x_at += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    ok = row_ok[:, None] & col_ok[None, :]
    at = (pid_s * M + rows.to(tl.int64))[:, None] * N + cols[None, :]
    tl.store(out_ptr + at, rounded(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=ok)
    if SERIAL:
        _last_slice_sums(out_ptr, final_ptr, count_ptr + pid_m * tl.num_programs(0) + pid_n,
                         rows.to(tl.int64)[:, None] * N + cols[None, :], ok, M * N, SPLIT, INTERPRETED)


@triton.jit
def nf4_gemv_kernel(x_ptr, q_ptr, absmax_ptr, code_ptr, pair_ptr, out_ptr, M, N, K, stride_xm, K_PER_SPLIT,
                    final_ptr, count_ptr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                    LUT: tl.constexpr, LATE_SCALE: tl.constexpr, INTERPRETED: tl.constexpr,
                    PDL: tl.constexpr = False, SERIAL: tl.constexpr = False, SPLIT: tl.constexpr = 1):
    """out[s, row] (or out, one slice) = x[row, slice s of K] W[cols, slice s]^T, one row a program, on CUDA
    cores: each thread loads RUN bytes of a weight row (one 16-byte vector, into registers), looks them
    up, multiplies them by x in float32 and sums the run; a run's sum times its block's absmax (with
    LATE_SCALE; else each value is code * absmax rounded to x's dtype first) goes to one float32 per
    run, summed across runs at the end. PDL and SERIAL as in nf4_matmul_kernel."""
    RUN: tl.constexpr = 16  # bytes (32 values) of a row a thread reads at once; BLOCKSIZE >= 32 holds whole runs
    RUNS: tl.constexpr = BLOCK_K // (2 * RUN)
    pid_n, pid_s, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    begin = pid_s * K_PER_SPLIT
    row_bytes = tl.multiple_of(cols.to(tl.int64) * (K // 2) + begin // 2, 16)
    byte_at = q_ptr + row_bytes[:, None] + tl.arange(0, BLOCK_K // 2)[None, :]
    run_k = begin + tl.arange(0, RUNS) * (2 * RUN)
    scale_at = absmax_ptr + cols.to(tl.int64)[:, None] * (K // BLOCKSIZE) + (run_k // BLOCKSIZE)[None, :]
    half = tl.arange(0, BLOCK_K // 2)
    if LUT != 1:  # x's columns as lut 0 and 2 hand out the weight's: runs of CHUNK, alternately
        x_at = x_ptr + row.to(tl.int64) * stride_xm + begin + (half // CHUNK) * (2 * CHUNK) + half % CHUNK
        x_second_at = x_at + CHUNK
    else:  # lut 1: the even and the odd columns
        x_at = x_ptr + row.to(tl.int64) * stride_xm + begin + 2 * half
        x_second_at = x_at + 1
    dtype = x_ptr.dtype.element_ty
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, RUNS), dtype=tl.float32)
    for _ in range(0, K_PER_SPLIT, BLOCK_K):
        packed = tl.load(byte_at, mask=col_ok[:, None], other=0)
        scale = tl.load(scale_at, mask=col_ok[:, None], other=0.0)
        if LUT == 3 and not INTERPRETED:
            first, second = _operand_codes(packed, pair_ptr, dtype)
        else:  # the interpreter's stand-in for lut 3 is lut 2's: lut 0's values in its runs
            first, second = _codes(packed, code_ptr, pair_ptr, dtype, LUT, INTERPRETED)
        first = tl.reshape(first.to(tl.float32), (BLOCK_N, RUNS, RUN))
        second = tl.reshape(second.to(tl.float32), (BLOCK_N, RUNS, RUN))
        if not LATE_SCALE:  # as bitsandbytes' dequantize_4bit rounds them
            first = rounded(first * scale[:, :, None], dtype, INTERPRETED).to(tl.float32)
            second = rounded(second * scale[:, :, None], dtype, INTERPRETED).to(tl.float32)
        x_first = tl.reshape(tl.load(x_at).to(tl.float32), (RUNS, RUN))
        x_second = tl.reshape(tl.load(x_second_at).to(tl.float32), (RUNS, RUN))
        sums = tl.sum(first * x_first[None, :, :], axis=2) + tl.sum(second * x_second[None, :, :], axis=2)
        if LATE_SCALE:
            acc += sums * scale
        else:
            acc += sums
        byte_at += BLOCK_K // 2
        scale_at += BLOCK_K // BLOCKSIZE
        x_at += BLOCK_K
        x_second_at += BLOCK_K
    at = (pid_s * M + row.to(tl.int64)) * N + cols
    tl.store(out_ptr + at, rounded(tl.sum(acc, axis=1), out_ptr.dtype.element_ty, INTERPRETED), mask=col_ok)
    if SERIAL:
        _last_slice_sums(out_ptr, final_ptr, count_ptr + row * tl.num_programs(0) + pid_n, row.to(tl.int64) * N + cols,
                         col_ok, M * N, SPLIT, INTERPRETED)


@triton.jit
def _last_slice_sums(part_ptr, final_ptr, count_ptr, at, ok, MN, SPLIT: tl.constexpr, INTERPRETED: tl.constexpr):
    """Serial split K, after a program stored its float32 partial of a tile: count it in the tile's counter
    (count_ptr, int32, zero between launches); the last of the SPLIT to arrive sums the partials in slice
    order (as reduce_splits does, so the same values), writes them to final in its dtype and sets the
    counter back to zero. The barrier and the counter's release order every thread's partial before the
    count; its acquire, the last program's reads after it (which bypass L1)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT - 1:
        total = tl.load(part_ptr + at, mask=ok, other=0.0, cache_modifier=".cg")
        for s in tl.static_range(1, SPLIT):
            total += tl.load(part_ptr + s * MN + at, mask=ok, other=0.0, cache_modifier=".cg")
        tl.store(final_ptr + at, rounded(total, final_ptr.dtype.element_ty, INTERPRETED), mask=ok)
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def reduce_splits(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
                  PDL: tl.constexpr = False):
    """out[i] = sum over s of part[s, i] (float32 partials, summed in slice order), in out's dtype."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = at < MN
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        total += tl.load(part_ptr + s * MN + at, mask=ok, other=0.0)
    tl.store(out_ptr + at, rounded(total, out_ptr.dtype.element_ty, INTERPRETED), mask=ok)


@triton.jit
def nf4_dequantize_kernel(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, NUMEL,
                          BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                          BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """out = the whole NF4 weight in out's dtype, as bitsandbytes' dequantize_4bit gives it, in one pass
    (nf4_frozen.py, training's frozen base): BLOCK packed bytes a program, each block's absmax undone
    from its second level in registers where NESTED (code2[absmax] * absmax2 + offset, in float32, both
    roundings kept: launched without FMA contraction), each code times it in float32, then rounded."""
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = at * 2 < NUMEL
    byte = tl.load(q_ptr + at, mask=ok, other=0).to(tl.int32)
    block = at // (BLOCKSIZE // 2)
    if NESTED:
        level = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + level) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=ok, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    high = tl.load(code_ptr + (byte >> 4)) * scale
    low = tl.load(code_ptr + (byte & 15)) * scale
    values = rounded(tl.interleave(high, low), out_ptr.dtype.element_ty, INTERPRETED)
    out_at = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_at, values, mask=out_at < NUMEL)
