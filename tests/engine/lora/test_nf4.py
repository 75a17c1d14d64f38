"""The NF4 matmul kernel (engine/lora/nf4.py), run by Triton's interpreter on the CPU, against
bitsandbytes' own dequantize_4bit and a matmul in float32.

Tolerances: with float32 inputs only the order of the sums differs (1e-5 of the largest output);
with bf16 inputs the kernel rounds each dequantized value to bf16 as dequantize_4bit does, so the
outputs differ from the float32 product of those bf16 values by the final rounding: at most one bf16
unit in the last place (2**-7 relative). A late_scale config rounds the code instead of code * absmax
(the tl.dot) or nothing (the GEMV), so its reference weight is the code rounded so, times the absmax
in float32; the same bound then holds. On a GPU machine conftest.py leaves the interpreter off and
these CPU runs are skipped; benchmarks/nf4_kernel_bench.py checks the kernel there."""

import subprocess
import sys
from dataclasses import asdict

import pytest

from tests.helpers import REPO, compiled_for_sm90, compiling_env, triton_interpreter_only

triton_interpreter_only("the GPU bench checks the kernel")


@pytest.fixture
def nf4(monkeypatch):
    from lqmf.engine.lora import nf4 as module

    monkeypatch.setattr(module, "OFF_GPU", True)
    monkeypatch.setenv("LQMF_NF4_KERNEL", "1")
    return module


def _weight(out_features: int, in_features: int, nested: bool, seed: int):
    """(packed, QuantState) of a random [N, K] weight quantized by bitsandbytes (NF4, blocks of 64)."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    return quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)


def _assert_matches(got, x, weight):
    """got == x @ weight^T within the tolerances of the module docstring (weight: float32, [N, K])."""
    import torch

    expected = x.float() @ weight.t()
    assert got.dtype == x.dtype and got.shape == expected.shape
    error = (got.float() - expected).abs()
    if x.dtype == torch.float32:
        assert float(error.max()) <= 1e-5 * float(expected.abs().max())
    else:
        assert bool((error <= expected.abs() * 2**-7 + 1e-5 * expected.abs().max()).all()), float(error.max())


def _weight_used(packed, state, dtype, config: dict | None):
    """The float32 weight the kernel multiplies x by: bitsandbytes' dequantized one rounded to dtype; for
    late_scale the code rounded to dtype (a tl.dot) or not at all (a GEMV), times the absmax."""
    import torch
    from bitsandbytes.functional import dequantize_4bit

    from lqmf.engine import compat

    dense = dequantize_4bit(packed, state).float()
    if not (config and config.get("late_scale")):
        return dense.to(dtype).float()
    if not config.get("dot", True):
        return dense
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=-1).view(dense.shape).long()
    absmax = compat.absmax_fp32(state).view(dense.shape[0], -1).repeat_interleave(64, dim=1)
    return state.code[codes].to(dtype).float() * absmax


@pytest.mark.parametrize(("rows", "out_features", "in_features", "nested", "dtype_name", "config"), [
    (1, 64, 256, True, "bfloat16", dict(block_m=1, block_n=32, block_k=128, split=2, dot=False)),
    (3, 48, 384, False, "float32", dict(block_m=2, block_n=16, block_k=128, split=1, dot=False, lut=1)),
    (16, 256, 128, True, "bfloat16", dict(block_m=16, block_n=64, block_k=64, split=2, lut=1, swap=True)),
    (17, 32, 512, False, "bfloat16", dict(block_m=16, block_n=32, block_k=128, split=4)),
    (40, 96, 256, True, "float32", dict(block_m=64, block_n=32, block_k=256, split=1, swap=True)),
    (40, 200, 128, False, "float16", None),  # the default config for 40 rows
    (3, 64, 256, True, "bfloat16", dict(block_m=2, block_n=32, block_k=128, dot=False, late_scale=True)),
    (17, 128, 256, False, "bfloat16", dict(block_m=16, block_n=32, block_k=128, swap=True, late_scale=True)),
    (16, 64, 128, True, "float32", dict(block_m=16, block_n=32, block_k=64, split=2, late_scale=True)),
    # lut 2 (the interpreter's stand-in for its PTX: the same values in the same runs of k) and x in those runs
    (1, 64, 256, True, "bfloat16", dict(block_m=1, block_n=32, block_k=128, dot=False, lut=2, late_scale=True)),
    (17, 128, 256, False, "bfloat16", dict(block_m=16, block_n=32, block_k=128, lut=2, late_scale=True)),
    (16, 96, 512, True, "float16", dict(block_m=16, block_n=32, block_k=256, split=2, lut=2, late_scale=True,
                                        swap=True)),
    # lut 3, a GEMV's (the interpreter's stand-in: lut 2's), its words loaded from the table it is handed
    (1, 64, 256, True, "bfloat16", dict(block_m=1, block_n=32, block_k=128, dot=False, lut=3, late_scale=True)),
    (2, 48, 512, False, "float16", dict(block_m=1, block_n=16, block_k=256, split=2, dot=False, lut=3,
                                        late_scale=True)),
])
def test_nf4_matmul_matches_bitsandbytes_dequantize(nf4, rows, out_features, in_features, nested, dtype_name,
                                                    config):
    import torch

    from lqmf.engine import compat

    packed, state = _weight(out_features, in_features, nested, seed=rows)
    assert state.nested == nested
    dtype = getattr(torch, dtype_name)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = nf4.nf4_matmul(x, packed, compat.absmax_fp32(state), state.code, (out_features, in_features), 64,
                         None if config is None else nf4.Config(**config))
    used = asdict(nf4.default_config(rows)) if config is None else config
    _assert_matches(got, x, _weight_used(packed, state, dtype, used))


@pytest.mark.parametrize(("rows", "config"), [
    (1, dict(block_m=1, block_n=32, block_k=128, split=4, dot=False, lut=2, late_scale=True)),
    (3, dict(block_m=1, block_n=16, block_k=128, split=2, dot=False)),
    (17, dict(block_m=16, block_n=32, block_k=128, split=4, lut=2, late_scale=True)),
    (16, dict(block_m=16, block_n=64, block_k=64, split=2, lut=1, swap=True)),
])
def test_serial_split_k_gives_what_the_reduce_kernel_gives(nf4, rows, config, monkeypatch):
    """Serial split K (Config.serial): the last slice of a tile to finish sums the slices in slice order,
    as reduce_splits does, so the output is the same to the bit; every tile's counter is left at zero
    (for the next launch, and a CUDA graph's next replay), and a launch with more tiles than the
    counters falls back to reduce_splits."""
    import torch

    from lqmf.engine import compat

    packed, state = _weight(96, 512, True, seed=rows)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    args = (x, packed, compat.absmax_fp32(state), state.code, (96, 512), 64)
    kernels, reduces = nf4.kernel_module(), []
    reduce_splits = kernels.reduce_splits
    monkeypatch.setattr(kernels, "reduce_splits", type("Counted", (), {"__getitem__": lambda self, grid: (
        reduces.append(grid), reduce_splits[grid])[1]})())
    plain = nf4.nf4_matmul(*args, nf4.Config(**config))
    serial = nf4.nf4_matmul(*args, nf4.Config(**config, serial=True))
    assert len(reduces) == 1 and torch.equal(plain, serial)
    assert not nf4._COUNTERS["cpu"].any()
    assert torch.equal(nf4.nf4_matmul(*args, nf4.Config(**config, serial=True)), plain)  # the counters reused
    assert nf4.serial_counters("cpu", nf4.COUNTERS + 1) is None


def test_configs_fit_the_shape_and_fill_the_machine(nf4):
    import torch

    config, split = nf4.fitted(nf4.Config(block_m=16, block_n=64, block_k=512), 5, (4096, 14336), 64)
    assert (config.block_k, config.block_m) == (512, 16) and 14336 // 512 % split == 0
    assert -(-4096 // 64) * split * 4 >= nf4.TARGET_WARPS // 2  # 64 column blocks of 4 warps: split K 4 or 7 ways
    _, one_warp_split = nf4.fitted(nf4.Config(block_n=64, block_k=512, warps=1), 5, (4096, 14336), 64)
    assert one_warp_split == 14 > split  # a tile of one warp: more slices (of 28 steps) for as many warps
    config, split = nf4.fitted(nf4.Config(block_k=256, split=3), 40, (4096, 4096), 64)
    assert split == 2  # 3 does not divide 16 steps of 256
    assert nf4.fitted(nf4.Config(block_k=256), 1, (64, 192), 64)[0].block_k == 64  # 192 = 3 x 64
    assert [nf4.row_bucket(m) for m in (1, 2, 3, 16, 17, 64)] == [1, 2, 4, 16, 32, 64]
    assert nf4.config_for(1, 4096, 4096) == nf4.CONFIGS[(1, 4096, 4096)]  # the GPU sweep's table first
    assert nf4.config_for(2, 4096, 4096).block_m == 16 and nf4.config_for(40, 4096, 4096).block_m == 64  # defaults
    assert not nf4.shape_applies((64, 96), 64) and not nf4.shape_applies((64, 96), 48)
    with pytest.raises(ValueError, match="not 64 of"):
        nf4.nf4_matmul(torch.ones(1, 96), None, None, None, (64, 96), 64)


def test_nf4_base_runs_groups_and_single_layers_like_bitsandbytes(nf4, monkeypatch):
    """A q/k/v-like group (stacked) and one layer alone, from bitsandbytes Linear4bit modules (nested
    absmax, as the loader quantizes): the kernel's outputs are the layers' own; inputs it does not
    take (more than MAX_ROWS rows, LQMF_NF4_KERNEL=0) go to bitsandbytes."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    group = [bnb.nn.Linear4bit(128, rows, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
             for rows in (64, 32, 32)]
    alone = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    x = torch.randn(2, 3, 128)
    expected = torch.cat([layer(x) for layer in group], dim=-1)
    expected_alone = alone(x)
    stacked, single = nf4.nf4_base(group), nf4.nf4_base([alone])
    assert stacked.shape == (128, 128) and single.shape == (96, 128)
    assert nf4.kernel_applies(x, stacked.shape, stacked.blocksize)
    torch.testing.assert_close(stacked(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single(x), expected_alone, rtol=1e-5, atol=1e-5)
    many = torch.randn(nf4.MAX_ROWS + 1, 128)
    assert not nf4.kernel_applies(many, stacked.shape, stacked.blocksize)
    torch.testing.assert_close(stacked(many), torch.cat([layer(many) for layer in group], dim=-1))
    monkeypatch.setenv("LQMF_NF4_KERNEL", "0")
    assert not nf4.kernel_applies(x, stacked.shape, stacked.blocksize)
    with_bias = bnb.nn.Linear4bit(128, 32, bias=True, quant_type="nf4").to("cpu")
    fp4 = bnb.nn.Linear4bit(128, 32, bias=False, quant_type="fp4").to("cpu")
    assert nf4.nf4_base([with_bias]) is None and nf4.nf4_base([fp4]) is None


def test_the_batched_decoder_layer_runs_the_kernel_when_switched_on(nf4):
    """BatchedLoRALinear (lora/stacked.py) over a 4-bit group takes the kernel with LQMF_NF4_KERNEL=1."""
    import bitsandbytes as bnb
    import torch

    from lqmf.engine.lora.stacked import BatchedLoRALinear

    torch.manual_seed(1)
    group = [bnb.nn.Linear4bit(128, rows, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
             for rows in (64, 32)]
    x = torch.randn(3, 1, 128)
    expected = torch.cat([layer(x) for layer in group], dim=-1)
    layer = BatchedLoRALinear(("gate_proj", "up_proj"), group)
    assert isinstance(layer.base, nf4.NF4Linear)
    torch.testing.assert_close(layer(x, {}), expected, rtol=1e-5, atol=1e-5)


def _run_ptx(asm: str, word: int, operands: dict[str, int] | None = None) -> list[int]:
    """The four output registers of register_lookup_asm's PTX for input word $4 (and operands, {"$5": value...}),
    executed here: the instructions it uses (mov, shr, shl, and, or, lop3, prmt in its default mode, sign
    fill included) on 32-bit values."""
    registers = {"$4": word, **(operands or {})}

    def value(operand: str) -> int:
        return registers[operand] if operand in registers else int(operand, 0)

    def prmt(a: int, b: int, selector: int) -> int:
        pool = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
        out = 0
        for j in range(4):
            nibble = (selector >> 4 * j) & 0xF
            byte = pool[nibble & 7]
            if nibble & 8:  # sign fill: the byte's top bit, eight times
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << 8 * j
        return out

    def lop3(a: int, b: int, c: int, table: int) -> int:  # each bit: table's bit 4a + 2b + c
        return sum(((table >> (4 * (a >> k & 1) + 2 * (b >> k & 1) + (c >> k & 1))) & 1) << k for k in range(32))

    operations = {"mov.b32": lambda a: a, "shr.b32": lambda a, b: a >> b, "shl.b32": lambda a, b: a << b,
                  "and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b, "prmt.b32": prmt, "lop3.b32": lop3}
    for instruction in asm.strip("{} ").split(";"):
        instruction = instruction.strip()
        if not instruction or instruction.startswith(".reg"):
            continue
        name, operands = instruction.split(None, 1)
        target, *sources = (operand.strip() for operand in operands.split(","))
        registers[target] = operations[name](*(value(source) for source in sources)) & 0xFFFFFFFF
    return [registers[f"${i}"] for i in range(4)]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_register_lookup_ptx_maps_every_byte_to_its_two_codes(dtype_name):
    """lut 2's PTX (compiled only on a GPU; tests/gpu checks it there) run instruction by instruction:
    every byte value, in every position of the word, gives its two codes' 16-bit values at their k
    (runs of four to each output), and the table it carries is bitsandbytes' NF4 code."""
    import torch
    from bitsandbytes.functional import get_4bit_type

    from lqmf.engine.lora import nf4, nf4_kernels

    dtype = getattr(torch, dtype_name)
    assert nf4.is_nf4_code(get_4bit_type("nf4", device="cpu"))
    assert not nf4.is_nf4_code(get_4bit_type("fp4", device="cpu"))
    late = nf4.Config(lut=2, late_scale=True)
    x = torch.ones(1, 64, dtype=dtype)
    assert nf4.launched(late, x, True).lut == 1  # on the CPU: compiled PTX only, so lut 1
    assert nf4.launched(nf4.Config(lut=0, late_scale=True), x, True) == nf4.Config(lut=0, late_scale=True)
    halves = [half & 0xFFFF for half in torch.tensor(nf4_kernels.NF4_CODE).to(dtype).view(torch.int16).tolist()]
    asm = nf4_kernels.register_lookup_asm("bf16" if dtype == torch.bfloat16 else "fp16")
    for byte in range(256):
        for position in range(4):
            filler = (0x5A, 0xC3, 0x0F, 0xF0)
            word_bytes = [filler[i] if i != position else byte for i in range(4)]
            out = _run_ptx(asm, sum(b << 8 * i for i, b in enumerate(word_bytes)))
            values = [half for register in out for half in (register & 0xFFFF, register >> 16)]
            codes = [code for b in word_bytes for code in (b >> 4, b & 15)]  # k = 0 .. 7: high nibble first
            assert values == [halves[code] for code in codes]  # k in order: 0-3 the first output's, 4-7 the second's


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_lut_3_ptx_takes_the_table_from_its_operands_and_gives_lut_2s_values(dtype_name):
    """lut 3's PTX, with the table's words in the operands a GEMV hands it (the first of each int32
    argument's four under pack 4; the other three hold garbage here), gives lut 2's registers for every
    byte in every position; it holds no immediate of the table; a tl.dot tile asking for it gets lut 2."""
    import torch

    from lqmf.engine.lora import nf4, nf4_kernels

    dtype = "bf16" if dtype_name == "bfloat16" else "fp16"
    words = nf4_kernels.table_words(dtype)
    operands = {f"${5 + 4 * w + copy}": (word if copy == 0 else 0xDEAD0000 + copy) & 0xFFFFFFFF
                for w, word in enumerate(words) for copy in range(4)}
    with_operands = nf4_kernels.register_lookup_asm(dtype, operands=True)
    immediate = nf4_kernels.register_lookup_asm(dtype)
    assert not any(f"{word & 0xFFFFFFFF:#x}" in with_operands for word in words)
    for byte in range(256):
        for position in range(4):
            word = sum((byte if i == position else (0x5A, 0xC3, 0x0F, 0xF0)[i]) << 8 * i for i in range(4))
            assert _run_ptx(with_operands, word, operands) == _run_ptx(immediate, word)
    x = torch.ones(1, 64, dtype=getattr(torch, dtype_name))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nf4, "OFF_GPU", True)
        assert nf4.launched(nf4.Config(lut=3, late_scale=True), x, True).lut == 2
        assert nf4.launched(nf4.Config(dot=False, lut=3, late_scale=True), x, True).lut == 3
        assert nf4.launched(nf4.Config(dot=False, lut=3), x, True).lut == 1  # lookups in registers need late_scale


def test_each_variant_of_the_register_lookup_is_checked_once(nf4, monkeypatch, caplog):
    """lookup_verified multiplies random rows by the weight's first output features in the variant a
    launch compiles to and compares with the float32 product: here lut 2 runs in the interpreter's
    stand-in, so it passes, once a variant; a lut 2 that gives other values or does not compile is
    caught with a warning, and a variant first met inside a CUDA-graph capture is not taken unchecked."""
    import logging

    import torch

    monkeypatch.setattr(nf4, "_LOOKUP_CHECKS", {})
    packed, state = _weight(600, 256, nested=False, seed=4)  # 600 features: the check multiplies 256 + 600 % 16
    absmax, code = state.absmax.float(), state.code.float()
    config, x = nf4.Config(block_n=32, lut=2, late_scale=True), torch.randn(5, 256, dtype=torch.bfloat16)
    seen = []
    launch = nf4._launch

    def counted(config, split, rows, packed, absmax, code, pairs, shape, blocksize):
        seen.append((config.lut, shape))
        return launch(config, split, rows, packed, absmax, code, pairs, shape, blocksize)

    monkeypatch.setattr(nf4, "_launch", counted)
    verified = lambda: nf4.lookup_verified(config, 2, x, packed, absmax, code, (600, 256), 64)  # noqa: E731
    assert verified() and verified() and seen == [(2, (264, 256))]  # checked once, on 264 features

    def broken(config, split, rows, packed, absmax, code, pairs, shape, blocksize):
        out = launch(config, split, rows, packed, absmax, code, pairs, shape, blocksize)
        return out * 1.5 if config.lut == 2 else out  # a wrong table, say

    monkeypatch.setattr(nf4, "_launch", broken)
    config = nf4.Config(block_n=64, lut=2, late_scale=True)
    with caplog.at_level(logging.WARNING, logger="lqmf.serve"):
        assert not verified()
    assert "register lookup (lut 2) gives wrong values" in caplog.text

    def failing(config, *args):
        if config.lut == 2:
            raise RuntimeError("PTX does not assemble")
        return launch(config, *args)

    monkeypatch.setattr(nf4, "_launch", failing)
    config = nf4.Config(block_n=16, lut=2, late_scale=True)
    with caplog.at_level(logging.WARNING, logger="lqmf.serve"):
        assert not verified()
    assert "fails (RuntimeError: PTX does not assemble)" in caplog.text

    monkeypatch.setattr(nf4, "_capturing", lambda: True)
    config = nf4.Config(block_n=128, lut=2, late_scale=True)
    assert not verified() and len(nf4._LOOKUP_CHECKS) == 3  # unchecked: lut 1 in the graph, checked later


def test_lut_3_compiles_to_fewer_instructions_where_lut_2_copies_its_immediates():
    """The GEMV tile of gate/up's table entry (64 columns x 256 values, four warps) compiled for sm_90 with the
    table's words as operands (lut 3): no spill, the lookup's input grouped as its PTX assumes, and fewer
    instructions a weight value in the main loop than lut 2, whose immediates the compiler copies into
    registers before each use (a static count; the GPU sweep times it)."""
    probe = ("from nf4_sass_count import compile_config, groups_neighbours, lookup_input_layout, resource_usage\n"
             "from lqmf.engine.lora.nf4 import Config\n"
             "for lut in (2, 3):\n"
             "    config = Config(block_m=1, block_n=64, block_k=256, warps=4, dot=False, lut=lut, late_scale=True)\n"
             "    kernel = compile_config(config)\n"
             "    usage = resource_usage(kernel)\n"
             "    print(usage['spilled'], groups_neighbours(lookup_input_layout(kernel)), len(usage['loop']))\n")
    out = compiled_for_sm90(probe)
    lut2, lut3 = out[:3], out[3:]
    assert lut2[:2] == lut3[:2] == ["0", "True"]
    assert int(lut3[2]) < 0.9 * int(lut2[2])


def test_a_dependent_launch_waits_before_its_first_read():
    """As a programmatic dependent launch (on Hopper, by default) the kernel starts while the one before it
    ends, so nothing may read memory before `griddepcontrol.wait`; it lets the next launch start after it.
    Compiled for sm_90 (no GPU needed): the wait comes before the first global load or async copy, and a
    plain launch has neither instruction."""
    probe = ("import re\n"
             "from nf4_sass_count import compile_config\n"
             "from lqmf.engine.lora.nf4 import CONFIGS\n"
             "from lqmf.engine.lora.nf4 import Config\n"
             "gemv = Config(block_m=1, block_n=64, block_k=256, dot=False, lut=2, late_scale=True)\n"
             "for config in (CONFIGS[(1, 28672, 4096)], gemv):\n"
             "    for pdl in (False, True):\n"
             "        ptx = compile_config(config, pdl).asm['ptx']\n"
             "        wait, read = ptx.find('griddepcontrol.wait'), re.search(r'ld\\.global|cp\\.async', ptx).start()\n"
             "        print(wait >= 0, 0 <= wait < read, 'griddepcontrol.launch_dependents' in ptx)\n")
    assert compiled_for_sm90(probe) == ["False", "False", "False", "True", "True", "True"] * 2


def test_the_tuned_tiles_hand_the_register_lookup_neighbouring_bytes():
    """lut 2's PTX takes the four bytes Triton hands one call as neighbours along k; which bytes those are
    follows the layout Triton picks for the tile (on an H100 a 4-warp swapped tile whose layout holds two
    bytes of k a thread gave wrong values). Compiled for sm_90 here (no GPU needed), in a process
    without the interpreter: that tile is caught, and the GEMV's tiles and every tile of nf4.CONFIGS and
    the default configs have a layout that groups neighbours."""
    probe = ("from nf4_sass_count import compile_config, groups_neighbours, lookup_input_layout\n"
             "from lqmf.engine.lora.nf4 import Config\n"
             "for warps, stages in ((4, 2), (2, 3)):\n"
             "    config = Config(block_n=64, block_k=256, warps=warps, stages=stages, lut=2, swap=True,\n"
             "                    late_scale=True)\n"
             "    print(groups_neighbours(lookup_input_layout(compile_config(config))))\n"
             "for warps in (1, 4):  # the GEMV: 16 bytes of a row a thread\n"
             "    config = Config(block_m=1, block_n=64, block_k=256, warps=warps, dot=False, lut=2, late_scale=True)\n"
             "    print(groups_neighbours(lookup_input_layout(compile_config(config))))\n")
    assert compiled_for_sm90(probe) == ["False", "True", "True", "True"]
    tables = subprocess.run([sys.executable, str(REPO / "benchmarks" / "nf4_sass_count.py"), "--check-tables"],
                            env=compiling_env(), capture_output=True, text=True, timeout=600)
    assert tables.returncode == 0, tables.stdout + tables.stderr[-2000:]
