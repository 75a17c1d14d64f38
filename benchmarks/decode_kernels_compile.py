"""The decoder's fused kernels (engine/decode/kernels.py) compiled for sm_90 on a CPU machine, at Mistral-7B
shapes in bfloat16: does each compile, and its registers, spilled bytes and shared memory.

No GPU needed: Triton compiles for a named target with the ptxas it ships (as benchmarks/nf4_sass_count.py
does). Integer arguments that are multiples of 16 at these shapes are specialized as Triton's JIT does.
A static check, not a timing (benchmarks/decode_kernels_bench.py times them on a GPU).

    PYTHONPATH=src:benchmarks python3 benchmarks/decode_kernels_compile.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).parent))

HEADS, KV_HEADS, DIM, HIDDEN, INTERMEDIATE = 32, 8, 128, 4096, 14336


def cases() -> list[tuple[str, str, dict, dict, set, int]]:
    """(label, kernel name, {argument: type}, {constexpr: value}, arguments divisible by 16, warps)."""
    from lqmf.engine.decode import kernels

    strides = dict.fromkeys(("stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_vb", "stride_vh",
                             "stride_cos", "stride_sin", "stride_ob", "stride_oh", "stride_slot", "stride_head",
                             "stride_pos"), "i32")
    rotary = ({name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr")} | {"pos_ptr": "*i64"}
              | {name: "*bf16" for name in ("q_out_ptr", "keys_ptr", "values_ptr")} | strides)
    attention = ({"q_ptr": "*bf16", "keys_ptr": "*bf16", "values_ptr": "*bf16", "pos_ptr": "*i64",
                  "max_ptr": "*fp32", "sum_ptr": "*fp32", "acc_ptr": "*fp32", "length": "i32", "window": "i64",
                  "scaling": "fp32", "tiles": "i32"}
                 | dict.fromkeys(("stride_qb", "stride_qh", "stride_slot", "stride_head", "stride_pos"), "i32"))
    combine = {"max_ptr": "*fp32", "sum_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*bf16", "stride_ob": "i32",
               "stride_oh": "i32"}
    norm = ({name: "*bf16" for name in ("x_ptr", "delta_ptr", "w_ptr", "out_ptr", "sum_ptr")} | {"eps": "fp32"}
            | dict.fromkeys(("stride_x", "stride_d", "stride_o", "stride_s"), "i32"))
    silu = {"gate_up_ptr": "*bf16", "out_ptr": "*bf16", "width": "i32", "stride_g": "i32", "stride_o": "i32"}
    pointers = lambda types: {name for name, kind in types.items() if kind.startswith("*")}  # noqa: E731
    out = [("rms_norm + residual", "rms_norm_kernel", norm, dict(N=HIDDEN, BLOCK=HIDDEN, RESIDUAL=True),
            set(norm) - {"eps"}, kernels._warps(HIDDEN)),
           ("rotary + cache write", "rotary_write_kernel", rotary, dict(HEADS=HEADS, KV_HEADS=KV_HEADS, D=DIM,
                                                                       BLOCK_D=DIM), set(rotary), 1),
           ("silu * up", "silu_mul_kernel", silu, dict(BLOCK=kernels.SILU_BLOCK), set(silu), 4)]
    for batch, length, dot in ((1, 128, True), (1, 4096, True), (16, 4096, True), (16, 4096, False)):
        plan = kernels.attention_plan(batch, HEADS, KV_HEADS, DIM, length, dot)
        out.append((f"attention split ({batch} x {length}: {plan.splits} splits, {'dot' if dot else 'fma'})",
                    "attention_split_kernel", attention,
                    dict(GROUPS=plan.groups, D=DIM, SPLITS=plan.splits, BLOCK_G=plan.block_g, BLOCK_N=plan.block_n,
                         BLOCK_D=plan.block_d, USE_DOT=plan.dot, UPCAST=not plan.dot),
                    pointers(attention) | {"length", "stride_qb", "stride_qh", "stride_slot", "stride_head",
                                           "stride_pos"}, plan.split_warps))
        out.append((f"attention combine ({plan.splits} splits)", "attention_combine_kernel", combine,
                    dict(HEADS=HEADS, D=DIM, SPLITS=plan.splits, SPLITS_P2=plan.splits_p2, BLOCK_D=plan.block_d),
                    set(combine), plan.combine_warps))
    return out


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lqmf.engine.decode import kernels

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / "decode_kernels_compile.cubin"
    found = kernels._kernels()
    failed = 0
    for label, name, types, constants, sixteen, warps in cases():
        signature = types | dict.fromkeys(constants, "constexpr")
        names = list(signature)
        source = ASTSource(fn=getattr(found, name), signature=signature,
                           constexprs={(names.index(key),): value for key, value in constants.items()},
                           attrs={(names.index(key),): [["tt.divisibility", 16]] for key in sixteen})
        try:
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        except Exception as failure:  # say which, go on to the next
            failed += 1
            print(f"{label}: does not compile: {str(failure).splitlines()[0][:300]}")
            continue
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True,
                               text=True).stdout
        registers, spilled = (re.search(pattern, usage).group(1) for pattern in (r"REG:(\d+)", r"LOCAL:(\d+)"))
        print(f"{label}: {warps} warps, registers {registers}, spilled {spilled} B, "
              f"shared {kernel.metadata.shared} B", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
