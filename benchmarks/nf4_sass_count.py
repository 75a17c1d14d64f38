"""The NF4 kernel's loop as a GPU would run it, counted on a CPU machine: compile for sm_90, read the SASS.

No GPU needed: Triton compiles for a named target with the ptxas it ships. For each config of
benchmarks/nf4_kernel_bench.py (bf16 inputs; integer arguments specialized as Triton's JIT does for
multiples of 16) this prints registers, spilled bytes, shared memory, and the instructions of the
kernel's main loop per weight value a thread handles in one trip. A GPU streams about 29 weight
values a clock per SM on an H100 (3.35 TB/s, 132 SMs at 1.75 GHz, half a byte each) and issues 128
thread-instructions a clock per SM, so a loop above about 4.4 instructions a value cannot keep up
with memory however it is scheduled; byte permutes, logic ops and shifts go to an integer pipe of
half those lanes, so above about 2.2 of those a value cannot either. A static count, not a timing:
memory stalls and tensor-core work are not in it.

    PYTHONPATH=src python3 benchmarks/nf4_sass_count.py [config indices...]
    PYTHONPATH=src python3 benchmarks/nf4_sass_count.py --table     # nf4.CONFIGS' tiles
    PYTHONPATH=src python3 benchmarks/nf4_sass_count.py --check-tables

--check-tables compiles nf4.CONFIGS' tiles and says whether lut 2's input layout groups four
neighbouring bytes of k in a thread's registers (what its PTX assumes; on an H100 the tiles whose
layout does not gave wrong values): exit 1 when one does not.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).parent))

ARGS = ("x_ptr", "q_ptr", "absmax_ptr", "code_ptr", "pair_ptr", "out_ptr", "M", "N", "K", "stride_xm", "K_PER_SPLIT",
        "final_ptr", "count_ptr")
TYPES = ("*bf16", "*u8", "*fp32", "*fp32", "*i64", "*bf16", "i32", "i32", "i32", "i32", "i32", "*bf16", "*i32")
INTEGER_PIPE = ("PRMT", "LOP3", "SHF", "LEA")  # half the lanes a clock of the issue slots on sm_90
MULTIPLES_OF_16 = set(ARGS) - {"M"}  # pointers, N, K, strides: what the JIT sees at the 7B shapes


def compile_config(config, pdl: bool = False):
    """The compiled kernel (triton's CompiledKernel) for config, bf16 inputs, target sm_90; with pdl as a
    programmatic dependent launch (decode/pdl.py); config.serial: float32 partials of config.split (at
    least 2) slices, summed by the last to finish."""
    from lqmf.engine.lora import nf4_kernels

    constants = dict(BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCKSIZE=64, LUT=config.lut,
                     LATE_SCALE=config.late_scale, INTERPRETED=False, PDL=pdl, SERIAL=False, SPLIT=1)
    types = dict(zip(ARGS, TYPES, strict=True))
    if config.serial:
        constants |= dict(SERIAL=True, SPLIT=max(config.split, 2))
        types["out_ptr"] = "*fp32"
    if config.lut == 3:  # the table's words (nf4.table_words_on)
        types["pair_ptr"] = "*i32"
    if config.dot:
        constants |= dict(BLOCK_M=config.block_m, SWAP=config.swap, IEEE=False)
    kernel = nf4_kernels.nf4_matmul_kernel if config.dot else nf4_kernels.nf4_gemv_kernel
    return compile_sm90(kernel, types, constants,
                        {"num_warps": config.warps, "num_stages": config.stages, "launch_pdl": pdl}, MULTIPLES_OF_16)


def compile_sm90(kernel, types: dict, constants: dict, options: dict, multiples_of_16=()):
    """kernel (a triton.jit function) compiled for sm_90 (triton's CompiledKernel): types of its runtime
    arguments in its order ("*bf16", "i32", ...), constants for those of its constexprs given, the
    arguments named in multiples_of_16 specialized as the JIT does for multiples of 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {name: constants[name] for name in kernel.arg_names if name in constants}  # the kernel's order
    signature = types | dict.fromkeys(constants, "constexpr")
    names = list(signature)
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in multiples_of_16})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(kernel) -> dict:
    """A compiled kernel's registers, spilled bytes, and its main loop (`loop_instructions`) with the count of
    each kind of instruction in it (`kinds`, predicates and modifiers dropped)."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"nf4_sass_count_{os.getpid()}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True,
                           text=True).stdout
    sass = subprocess.run([tools / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    cubin.unlink()
    loop = loop_instructions(sass)
    registers, spilled = (int(re.search(pattern, usage).group(1)) for pattern in (r"REG:(\d+)", r"LOCAL:(\d+)"))
    return {"registers": registers, "spilled": spilled, "loop": loop,
            "kinds": collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                                         for text in loop)}


def loop_instructions(sass: str) -> list[str]:
    """The instructions of the longest backward branch's body (the main loop)."""
    labels, instructions = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instruction = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if instruction:
            instructions.append(instruction.group(1).strip())
    loops = [(labels[target.group(1)], end) for end, text in enumerate(instructions)
             if (target := re.search(r"BRA.*\.L_x_(\d+)", text)) and labels.get(target.group(1), end) < end]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0], default=(0, -1))
    return instructions[start:end + 1]


def lookup_input_layout(kernel) -> str | None:
    """The layout (TTGIR) of the register lookup's input, the [BLOCK_N, BLOCKSIZE // 2] byte tile; None for
    a kernel without it (lut 0 or 1)."""
    for line in kernel.asm["ttgir"].splitlines():
        if "tt.elementwise_inline_asm" in line:
            start = line.index("tensor<", line.rindex(" : ", 0, line.index("->"))) + len("tensor<")
            depth, end = 1, start
            while depth:
                depth += {"<": 1, ">": -1}.get(line[end], 0)
                end += 1
            layout = line[start:end - 1].split(",", 1)[1].strip()
            aliases = dict(re.findall(r"^(#\w+) = (.*)$", kernel.asm["ttgir"], re.M))
            return aliases.get(layout, layout)
    return None


def groups_neighbours(layout: str) -> bool:
    """Whether each thread's registers of this layout come in fours of neighbouring bytes along k (dim 1),
    which is what lut 2's PTX assumes of the four bytes Triton hands one call (pack 4): a linear layout
    whose first two register bits step k by 1 and 2, tl.dot's operand layout with 4 or more k a
    thread, or a blocked layout with k fastest and 4 or more of it a thread."""
    if layout.startswith("#ttg.linear"):
        bases = re.search(r"register = \[(.*?)\], lane", layout).group(1)
        return bases.replace(" ", "").startswith("[0,1],[0,2]")
    if layout.startswith("#ttg.dot_op"):
        width = re.search(r"kWidth = (\d+)", layout)
        return "opIdx = 0" in layout and width is not None and int(width.group(1)) >= 4
    if layout.startswith("#ttg.blocked"):
        size = [int(n) for n in re.search(r"sizePerThread = \[([\d, ]+)\]", layout).group(1).split(",")]
        order = [int(n) for n in re.search(r"order = \[([\d, ]+)\]", layout).group(1).split(",")]
        return order[0] == 1 and size[1] >= 4
    return False


def check_tables() -> int:
    """Compile nf4.CONFIGS and the default configs' lut-2 tiles for sm_90 and say, per tile, whether the
    lookup's input groups neighbouring bytes (json lines); 1 when one does not."""
    import json

    from lqmf.engine.lora import nf4

    configs = {repr(config): config for config in [*nf4.CONFIGS.values(),
                                                   *(nf4.default_config(rows) for rows in (2, 4, 8, 64))]}
    wrong = 0
    for name, config in configs.items():
        layout = lookup_input_layout(compile_config(config))
        right = layout is None or groups_neighbours(layout)
        wrong += not right
        print(json.dumps({"config": name, "layout": layout, "groups_neighbours": right}), flush=True)
    return 1 if wrong else 0


def main() -> None:
    from nf4_kernel_bench import candidates

    from lqmf.engine.lora import nf4

    if sys.argv[1:] == ["--table"]:  # nf4.CONFIGS, labelled by (row bucket, N, K)
        named = [(str(key), config) for key, config in nf4.CONFIGS.items()]
    else:
        configs = candidates(smoke=False)
        named = [(f"{index:>2}", configs[index]) for index in
                 ([int(arg) for arg in sys.argv[1:]] or range(len(configs)))]
    for label, config in named:
        brief = (f"{label} {'dot' if config.dot else 'gemv'} m{config.block_m} n{config.block_n} k{config.block_k} "
                 f"w{config.warps} st{config.stages} lut{config.lut}{' swap' if config.swap else ''}"
                 f"{' late' if config.late_scale else ''}")
        try:
            kernel = compile_config(config)
        except Exception as failure:  # a config that does not compile: say so, go on
            print(f"{brief}: does not compile: {str(failure).splitlines()[0][:200]}")
            continue
        usage = resource_usage(kernel)
        loop, kinds = usage["loop"], usage["kinds"]
        values = config.block_n * config.block_k / (32 * config.warps)  # weight values a thread handles a trip
        integer = sum(kinds[kind] for kind in INTEGER_PIPE)
        moves = collections.Counter(text.split()[0] for text in loop if text.startswith("IMAD."))
        print(f"{brief}: registers {usage['registers']}, spilled {usage['spilled']} B, "
              f"shared {kernel.metadata.shared} B, "
              f"loop {len(loop)} instructions = {len(loop) / values:.2f} a weight value "
              f"({integer / values:.2f} on the integer pipe); "
              f"{', '.join(f'{kind} {count}' for kind, count in kinds.most_common(6))}; "
              f"IMAD forms: {', '.join(f'{kind} {count}' for kind, count in moves.most_common(4))}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check-tables"]:
        sys.exit(check_tables())
    main()
