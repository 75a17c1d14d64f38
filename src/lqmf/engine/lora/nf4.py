"""A bitsandbytes NF4 weight times the 1..64 rows of a decode step, in one Triton kernel (nf4_kernels.py).

bitsandbytes 0.50 multiplies more than one row by dequantizing the whole weight to bf16 and then
running a GEMM, so a step writes and reads back four times the packed bytes. `nf4_matmul` reads the
packed bytes and a float32 absmax once, dequantizes in registers and accumulates in float32. Its
launch configuration comes from a fixed table (`config_for`: row bucket, N, K), never from run-time
autotuning, because decode steps are captured in CUDA graphs; benchmarks/nf4_kernel_bench.py sweeps
the candidates on a GPU and prints the table.

`NF4Linear` is what the batched decoder calls (lora/stacked.py's BatchedLoRALinear, where
`switched_on`): built from bitsandbytes Linear4bit modules that read one input (`nf4_base`: a group
stacked by compat.stack_4bit, or one layer), it runs the kernel where `kernel_applies` and
bitsandbytes' own path otherwise. Off the GPU the kernel does not apply (the tests set OFF_GPU and run
it in Triton's interpreter). On by default (DEFAULT_SWITCH): with the NF4 lookup in registers (lut 2)
the 32 layers' base matmuls of a 7B decode step take 3.04 ms at 16 rows and 4.01 ms at 32 against
bitsandbytes' 12.50 and 12.66 ms, and 2.92 against 3.46 ms at one row (H100, docs/serving.md).
LQMF_NF4_KERNEL=0 turns it off, 1 on. lut 2 is PTX written here whose byte groups follow the register
layout Triton picks, so `lookup_verified` checks each compiled variant on its first launch. On Hopper
and newer the kernels are programmatic dependent launches (decode/pdl.py).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lqmf.engine import compat
from lqmf.engine.decode import pdl

log = logging.getLogger("lqmf.serve")

MAX_ROWS = 64
TARGET_WARPS = 1056  # eight per multiprocessor of an H100/H200: split K until a launch has this many
OFF_GPU = False  # run on the CPU too (the tests do, under TRITON_INTERPRET=1)
DEFAULT_SWITCH = "1"  # LQMF_NF4_KERNEL when unset
REGISTER_LUTS = (2, 3)  # lookups in registers, from PTX written here: checked on first launch (`lookup_verified`)


@dataclass(frozen=True)
class Config:
    """One launch of the kernel: dot (tensor cores, block_m >= 16) or not (float32 multiply-adds, a GEMV:
    one row a program, block_m 1);
    split: slices of K (0: enough for TARGET_WARPS warps); block_k: K a loop step (whole
    quantization blocks, unrolled); lut: 0 two loads from the 16-entry code per byte, 1 one load from
    a 256-entry byte -> pair table, 2 no load: byte-permute lookups in registers (with late_scale, bf16/fp16
    inputs on a GPU and bitsandbytes' NF4 code; lut 1 otherwise), 3 as 2 with the table's words handed to
    the PTX as operands loaded once a program (GEMVs only; a tl.dot tile takes lut 2)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split: int = 0
    warps: int = 4
    stages: int = 2
    lut: int = 0
    dot: bool = True
    swap: bool = False  # dot: the weight as tl.dot's first operand (out^T = W x^T)
    late_scale: bool = False  # scale each block's sums by its absmax, not each value (fewer operations;
    # the dot rounds the codes, not code * absmax, to x's dtype: not bitsandbytes' rounding, as close)
    serial: bool = False  # split K: the last slice of a tile to finish sums the slices (the same values as
    # reduce_splits, one launch fewer; `serial_counters`)


# (row bucket, N, K) -> Config, from GPU sweeps (benchmarks/nf4_kernel_bench.py prints this table), one
# H100, docs/serving.md: at one row the best of the GEMV grid with 2, 4 or 8 slices of K, each with its
# serial twin (`--grid gemv --serial --splits 2 4 8`, session 17: GEMVs with K in 4 slices at every shape,
# 2.57 ms a step against 2.92); at 16 and 32 rows the best of the table's own tiles with 0, 2 or 8 slices
# and their serial twins (`--grid table --serial`, session 17: serial split K at two shapes of 16 rows,
# 2.90 ms a step at 16 rows, 3.92 at 32): lut 2 everywhere. Other shapes and row buckets take
# `default_config`.
CONFIGS: dict[tuple[int, int, int], Config] = {
    (1, 6144, 4096): Config(block_m=1, block_n=16, block_k=512, split=4, warps=1, dot=False, lut=2, late_scale=True),
    (16, 6144, 4096): Config(split=8, stages=3, lut=2, late_scale=True, serial=True),
    (32, 6144, 4096): Config(block_m=32, split=8, lut=2, late_scale=True),
    (1, 4096, 4096): Config(block_m=1, block_n=16, block_k=512, split=4, warps=1, dot=False, lut=2, late_scale=True),
    (16, 4096, 4096): Config(stages=3, lut=2, late_scale=True),
    (32, 4096, 4096): Config(block_m=32, block_k=256, lut=2, late_scale=True),
    (1, 28672, 4096): Config(block_m=1, block_n=64, block_k=256, split=4, dot=False, lut=2, late_scale=True),
    (16, 28672, 4096): Config(split=2, stages=3, lut=2, late_scale=True, serial=True),
    (32, 28672, 4096): Config(block_m=32, lut=2, late_scale=True),
    (1, 4096, 14336): Config(block_m=1, block_n=16, block_k=512, split=4, warps=1, dot=False, lut=2, late_scale=True),
    (16, 4096, 14336): Config(split=8, stages=3, lut=2, late_scale=True),
    (32, 4096, 14336): Config(block_m=32, block_k=256, split=8, warps=2, lut=2, swap=True, late_scale=True),
}


def row_bucket(rows: int) -> int:
    """The power of two at or above rows (1, 2, 4 ... 64): the table's first key."""
    return 1 << max(0, rows - 1).bit_length()


def default_config(rows: int) -> Config:
    """A config for a shape the table lacks, shaped as the sweep's winners at the 7B shapes: a tl.dot
    tile of max(16, the row bucket) rows, 64 columns, four blocks a step, the lookup in registers with
    the absmax applied to each block's sums (3 pipeline stages up to 16 rows). 64 rows: not timed."""
    bucket = row_bucket(rows)
    return Config(block_m=max(16, bucket), block_n=64, block_k=256, stages=3 if bucket <= 16 else 2, lut=2,
                  late_scale=True)


def config_for(rows: int, out_features: int, in_features: int) -> Config:
    return CONFIGS.get((row_bucket(rows), out_features, in_features)) or default_config(rows)


def fitted(config: Config, rows: int, shape: tuple[int, int], blocksize: int) -> tuple[Config, int]:
    """config with block_k dividing K (a multiple of blocksize) and block_m covering at most the rows it
    must, and the number of K slices: config.split, or enough for TARGET_WARPS warps, dividing K's steps."""
    out_features, in_features = shape
    block_k = max(config.block_k, blocksize, 32)
    while in_features % block_k:
        block_k //= 2
    block_m = min(config.block_m, max(16, row_bucket(rows))) if config.dot else 1
    steps = in_features // block_k
    programs = -(-out_features // config.block_n) * -(-rows // block_m)
    wanted = config.split or max(1, -(-TARGET_WARPS // (programs * config.warps)))
    split = max(s for s in range(1, min(wanted, steps) + 1) if steps % s == 0)
    return replace(config, block_k=block_k, block_m=block_m, split=split), split


def shape_applies(shape: tuple[int, int], blocksize: int) -> bool:
    """Whether the kernel reads this weight: blocks of a power of two >= 32 that do not cross rows."""
    return blocksize >= 32 and blocksize & (blocksize - 1) == 0 and shape[1] % blocksize == 0


def switched_on() -> bool:
    """Whether the decoder uses the kernel: LQMF_NF4_KERNEL (1 on, 0 off; unset: DEFAULT_SWITCH)."""
    return os.environ.get("LQMF_NF4_KERNEL", DEFAULT_SWITCH) != "0"


def kernel_applies(x, shape: tuple[int, int], blocksize: int) -> bool:
    """Whether nf4_matmul runs x ([..., K]): 1..MAX_ROWS rows of a float dtype on a GPU (or OFF_GPU),
    a shape it reads, Triton installed, and switched on."""
    import torch

    rows = x.numel() // max(1, x.shape[-1])
    return ((x.is_cuda or OFF_GPU) and 1 <= rows <= MAX_ROWS and x.shape[-1] == shape[1]
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and shape_applies(shape, blocksize)
            and switched_on() and kernel_module() is not None)


def _runs_kernel(device) -> bool:
    """Whether the kernel runs on device: a CUDA GPU of compute capability 8.0 (Ampere) or newer, where
    tl.dot takes bf16 (the configs were timed on an H100; older GPUs keep bitsandbytes)."""
    import torch

    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def kernel_module() -> Any:
    """nf4_kernels (this module's kernels and nf4_frozen.py's), or None where Triton is missing."""
    try:
        from lqmf.engine.lora import nf4_kernels
    except ImportError:
        return None
    return nf4_kernels


def byte_pairs(code):
    """The 256-entry table of lut 1: byte b -> (code[b >> 4] bits << 32) | code[b & 15] bits (int64)."""
    import torch

    bits = code.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    every = torch.arange(256, device=code.device)
    return (bits[every >> 4] << 32) | (bits[every & 15] & 0xFFFFFFFF)


def is_nf4_code(code) -> bool:
    """Whether code (16 values) is nf4_kernels.NF4_CODE, the table lut 2 carries in its instructions
    (False where Triton is missing)."""
    import torch

    kernels = kernel_module()
    return (kernels is not None and code.numel() == len(kernels.NF4_CODE)
            and torch.equal(code.detach().float().cpu(), torch.tensor(kernels.NF4_CODE)))


def launched(config: Config, x, standard_code: bool) -> Config:
    """config as it can run on x: lut 2 (compiled PTX for 16-bit inputs and NF4_CODE, with late_scale: its
    codes are rounded to x's dtype, so scaling each value afterwards would round it twice; on the CPU only
    for the tests, OFF_GPU, in the interpreter's stand-in) else lut 1; float32 inputs on a GPU without
    late_scale (as tests/gpu checks them; the decoder's are 16-bit)."""
    import torch

    if x.is_cuda and x.dtype == torch.float32:
        config = replace(config, late_scale=False)
    if config.lut == 3 and config.dot:
        config = replace(config, lut=2)
    if config.lut in REGISTER_LUTS and not (config.late_scale and standard_code and (x.is_cuda or OFF_GPU)
                                            and x.dtype in (torch.bfloat16, torch.float16)):
        config = replace(config, lut=1)
    return config


def nf4_matmul(x, packed, absmax, code, shape: tuple[int, int], blocksize: int, config: Config | None = None,
               pairs=None, standard_code: bool | None = None):
    """x [M, K] times the NF4 weight's transpose: [M, N] in x's dtype, M <= MAX_ROWS.

    packed: bitsandbytes' bytes of the [N, K] weight (any shape, N*K/2 uint8); absmax: float32, one per
    blocksize values (nested absmax dequantized beforehand); code: the 16 NF4 values; pairs: byte_pairs(code),
    made here when a lut-1 config needs it and none is given; standard_code: is_nf4_code(code), checked
    here when not given (a host sync: callers inside a CUDA graph pass it). On a GPU, lut 2 runs in a
    compiled variant only once `lookup_verified` has checked that variant (else lut 1)."""
    if not shape_applies(shape, blocksize):
        raise ValueError(f"nf4_matmul reads blocks of a power of two >= 32 dividing K, not {blocksize} of {shape}")
    rows = x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    config, split = fitted(config or config_for(rows, *shape), rows, shape, blocksize)
    if config.lut in REGISTER_LUTS or config.late_scale:
        config = launched(config, x, is_nf4_code(code) if standard_code is None else standard_code)
    if (config.lut in REGISTER_LUTS and x.is_cuda
            and not lookup_verified(config, split, x, packed, absmax, code, shape, blocksize)):
        config = replace(config, lut=1)
    if config.lut == 1 and pairs is None:
        pairs = byte_pairs(code)
    return _launch(config, split, x, packed, absmax, code, pairs, shape, blocksize)


def _launch(config: Config, split: int, x, packed, absmax, code, pairs, shape: tuple[int, int], blocksize: int):
    """The kernel (and reduce_splits over split > 1 float32 partials, unless config.serial) as config says:
    [M, N] in x's dtype."""
    import torch

    kernels = kernel_module()
    dependent = pdl.launch(x.device)
    rows, (out_features, in_features) = x.shape[0], shape
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    target = out if split == 1 else torch.empty((split, rows, out_features), dtype=torch.float32, device=x.device)
    grid = (-(-out_features // config.block_n), split, -(-rows // config.block_m) if config.dot else rows)
    counters = serial_counters(x.device, grid[0] * grid[2]) if config.serial and split > 1 else None
    serial = dict(SERIAL=True, SPLIT=split) if counters is not None else {}
    common = dict(BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCKSIZE=blocksize, LUT=config.lut,
                  LATE_SCALE=config.late_scale, INTERPRETED=not x.is_cuda, **dependent, **serial,
                  num_warps=config.warps, num_stages=config.stages)
    table = table_words_on(x.device, x.dtype) if config.lut == 3 else code if pairs is None else pairs
    arguments = (x, packed, absmax, code, table, target, rows, out_features, in_features,
                 x.stride(0), in_features // split, out, target if counters is None else counters)
    if config.dot:
        kernels.nf4_matmul_kernel[grid](*arguments, BLOCK_M=config.block_m, SWAP=config.swap,
                                        IEEE=x.dtype == torch.float32, **common)
    else:
        kernels.nf4_gemv_kernel[grid](*arguments, **common)
    if split > 1 and counters is None:
        block = 1024
        kernels.reduce_splits[(-(-out.numel() // block),)](target, out, out.numel(), SPLIT=split, BLOCK=block,
                                                           INTERPRETED=not x.is_cuda, **dependent,
                                                           num_warps=4)
    return out


_TABLE_WORDS: dict[tuple[str, Any], Any] = {}


def table_words_on(device, dtype):
    """nf4_kernels.table_words for dtype as an int32 tensor on device (lut 3's operands), made once (not
    inside a CUDA-graph capture: the decoder's warm-up steps run first)."""
    import torch

    key = (str(device), dtype)
    if key not in _TABLE_WORDS:
        words = kernel_module().table_words("bf16" if dtype == torch.bfloat16 else "fp16")
        _TABLE_WORDS[key] = torch.tensor(words, dtype=torch.int32, device=device)
    return _TABLE_WORDS[key]


COUNTERS = 1 << 17  # tiles a serial launch may count (int32 each, one buffer a device)
_COUNTERS: dict[str, Any] = {}


def serial_counters(device, tiles: int):
    """The device's zeroed int32 tile counters for a serial split-K launch (each launch leaves them zero),
    or None (then reduce_splits sums the slices): more tiles than COUNTERS, or the buffer not made yet
    inside a CUDA-graph capture. One buffer a device: the decoder's launches run one after another on a
    stream, and a dependent launch (decode/pdl.py) touches them only after the kernel before it ends."""
    import torch

    key = str(device)
    if tiles > COUNTERS or (key not in _COUNTERS and _capturing()):
        return None
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


_LOOKUP_CHECKS: dict[tuple, bool] = {}
CHECK_FEATURES = 256  # output features of a weight that lookup_verified multiplies
WRONG_SHARE = 2**-6  # further from the float32 product than this share of its largest value: wrong, not rounded


def _specialized(value: int) -> int:
    """The class Triton compiles an integer argument (or pointer address) for: 1, a multiple of 16, other."""
    return 1 if value == 1 else 16 if value % 16 == 0 else 0


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (never without CUDA)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def lookup_verified(config: Config, split: int, x, packed, absmax, code, shape: tuple[int, int],
                    blocksize: int) -> bool:
    """Whether lut 2 or 3 (PTX written here, whose byte groups follow the register layout Triton picks for a
    tile) gives the right values in the variant this launch compiles to. Which registers make up a
    group depends on the tile, the warps and Triton's specialization of sizes and addresses (on an H100
    some 4- and 8-warp tiles grouped the wrong bytes), so each variant is checked on its first launch
    outside CUDA-graph capture: `_lookup_check` multiplies random rows by this weight's first output
    features. A variant that fails (or fails to compile) takes lut 1, with a warning; one first met
    inside a capture takes lut 1 there, unchecked (the decoder's warm-up steps come first)."""
    out_features, in_features = shape
    key = (str(x.device), config, split, x.dtype, _specialized(x.shape[0]), _specialized(out_features),
           _specialized(in_features), _specialized(x.stride(0)), _specialized(in_features // split),
           _specialized(x.data_ptr()), _specialized(packed.data_ptr()), _specialized(absmax.data_ptr()))
    if key not in _LOOKUP_CHECKS:
        if _capturing():
            return False
        failure = _lookup_check(config, split, x, packed, absmax, code, shape, blocksize)
        if failure:
            log.warning("the NF4 kernel's register lookup (lut %d) %s for %s at %d rows of %s x %s in %s; using the "
                        "table lookup (lut 1), which is slower", config.lut, failure, config, x.shape[0], out_features,
                        in_features, x.dtype)
        _LOOKUP_CHECKS[key] = not failure
    return _LOOKUP_CHECKS[key]


def _lookup_check(config: Config, split: int, x, packed, absmax, code, shape: tuple[int, int],
                  blocksize: int) -> str | None:
    """None where lut 2, launched as config on random rows like x (its strides and address class) and
    the first output features of this weight (the same addresses; as many as 16 divides), is as near the
    float32 product of the dequantized weight as rounding allows; else what went wrong."""
    import torch

    out_features, in_features = shape
    features = out_features if out_features <= 2 * CHECK_FEATURES else CHECK_FEATURES + out_features % 16
    span = (x.shape[0] - 1) * x.stride(0) + in_features
    shift = 0 if x.data_ptr() % 16 == 0 else 1
    generator = torch.Generator(device=x.device).manual_seed(0)
    rows = torch.randn(span + shift, generator=generator, device=x.device).to(x.dtype)[shift:].as_strided(
        x.shape, x.stride())
    bytes_ = packed.reshape(-1)[: features * in_features // 2]
    codes = torch.stack((bytes_ >> 4, bytes_ & 15), dim=-1).reshape(features, in_features).long()
    weight = code.float()[codes] * absmax[: features * in_features // blocksize].repeat_interleave(blocksize).view(
        features, in_features)
    want = rows.float() @ weight.T
    try:
        got = _launch(config, split, rows, packed, absmax, code, None, (features, in_features), blocksize).float()
    except Exception as error:  # noqa: BLE001 - a compile or launch failure: the slower lookup still serves
        return f"fails ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    error = float((got - want).abs().max())
    return None if error <= WRONG_SHARE * float(want.abs().max()) else f"gives wrong values (max error {error:.3g})"


class NF4Linear:
    """A 4-bit weight (one layer's, or a group's stacked) as the kernel reads it, with bitsandbytes'
    path for inputs the kernel does not take: called with x [..., K], gives [..., N] in x's dtype."""

    def __init__(self, packed, absmax, code, shape: tuple[int, int], blocksize: int, fallback: Callable[[Any], Any]):
        self.packed, self.absmax, self.code = packed, absmax, code
        self.shape, self.blocksize, self.fallback = shape, blocksize, fallback
        self.pairs = byte_pairs(code)
        self.standard_code = is_nf4_code(code)  # lut 2 applies (each variant checked on a GPU: lookup_verified)

    @classmethod
    def of_stacked(cls, packed, state, fallback: Callable[[Any], Any]) -> NF4Linear | None:
        """From compat.stack_4bit's (packed, QuantState; its absmax already float32), or None for a
        weight the kernel does not read."""
        import torch

        shape = (int(state.shape[0]), int(state.shape[1]))
        if state.quant_type != "nf4" or state.nested or not shape_applies(shape, state.blocksize):
            return None
        return cls(packed.reshape(-1).view(torch.uint8), state.absmax.float().contiguous(),
                   state.code.to(packed.device, torch.float32).contiguous(), shape, int(state.blocksize), fallback)

    @classmethod
    def of_module(cls, module) -> NF4Linear | None:
        """From one bitsandbytes Linear4bit without bias (its nested absmax dequantized once), or None."""
        parts = compat.nf4_parts(module)
        if parts is None or module.bias is not None or not shape_applies(parts[3], parts[4]):
            return None
        return cls(*parts, fallback=module)

    def __call__(self, x):
        if not kernel_applies(x, self.shape, self.blocksize):
            return self.fallback(x)
        out = nf4_matmul(x.reshape(-1, self.shape[1]), self.packed, self.absmax, self.code, self.shape,
                         self.blocksize, pairs=self.pairs, standard_code=self.standard_code)
        return out.view(*x.shape[:-1], self.shape[0])


def stacked_matmul_4bit(packed, state, compute) -> Callable[[Any], Any]:
    """bitsandbytes' matmul of x with compat.stack_4bit's (packed, state), in the layers' compute dtype:
    what stacked_base runs for a 4-bit group, and NF4Linear for inputs the kernel does not take."""
    import bitsandbytes as bnb

    def matmul_4bit(x):
        return bnb.matmul_4bit(x.to(compute or x.dtype), packed.t(), quant_state=state).to(x.dtype)

    return matmul_4bit


def nf4_base(modules: list) -> Callable[[Any], Any] | None:
    """For bitsandbytes 4-bit linears that read one input (as lora/stacked.py's stacked_base takes them):
    NF4Linear for one alone or a group stacked by compat.stack_4bit (the modules' weights become views
    of the stacked bytes); bitsandbytes' matmul of a stacked group the kernel cannot read; None for
    anything else (then stacked_base), and off the GPU (unless OFF_GPU), where the kernel never runs."""
    if not (OFF_GPU or all(_runs_kernel(module.weight.device) for module in modules)):
        return None
    if len(modules) == 1:
        return NF4Linear.of_module(modules[0])
    stacked = compat.stack_4bit(modules)
    if stacked is None:
        return None
    packed, state = stacked
    matmul_4bit = stacked_matmul_4bit(packed, state, modules[0].compute_dtype)
    return NF4Linear.of_stacked(packed, state, matmul_4bit) or matmul_4bit
