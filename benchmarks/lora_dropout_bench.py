"""LoRA's dropout inside the rank-r product (engine/lora/dropout.py) against torch's dropout and GEMMs (GPU),
and the kernels as an H100 would run them, compiled on any machine (--sass).

On a GPU, for a LoRA layer of rank --rank reading Mistral-7B's hidden size (q/k/v/o: 4,096) and its MLP
width (down_proj: 14,336), bf16 under autocast as training runs, with dropout --p, it times both ways:

- device: a micro-batch of --tokens (8,192: 4 x 2,048) rows, CUDA events around --calls calls, forward
  alone (what a checkpoint's recomputation runs again) and forward + backward;
- host: forward + backward of 16 rows, seconds a call of the issuing thread.

and checks the product and both gradients against torch's dropout and GEMMs given the kernels' own mask.
Prints a RESULT line a width and writes $OUT/lora-dropout.json.

    PYTHONPATH=src:benchmarks python3 benchmarks/lora_dropout_bench.py --out $OUT
    PYTHONPATH=src:benchmarks python3 benchmarks/lora_dropout_bench.py --sass     # no GPU needed

--sass compiles each kernel for sm_90 (bf16, the rank given) and prints registers, spilled bytes and the
instructions of its main loop per element a thread handles in one trip (a static count, not a timing).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

WIDTHS = {"attention input (q/k/v/o)": 4096, "MLP width (down)": 14336}
BLOCK_M = 64  # dropout.BLOCK_M, without importing torch for --sass
SIGNATURES = {
    "dropout_shrink_kernel": ("x_ptr:*D a_ptr:*fp32 out_ptr:*D M:i32 K:i32 R:i32 stride_xm:i32 stride_ar:i32 "
                              "seed:i64 THRESHOLD:i32 SCALE:fp32"),
    "dropout_shrink_backward_kernel": ("x_ptr:*D a_ptr:*fp32 grad_ptr:*D dx_ptr:*D partial_ptr:*fp32 M:i32 K:i32 "
                                       "R:i32 stride_xm:i32 stride_ar:i32 ROWS_PER_SPLIT:i32 seed:i64 "
                                       "THRESHOLD:i32 SCALE:fp32"),
    "dropout_mask_kernel": "out_ptr:*i8 M:i32 K:i32 seed:i64 THRESHOLD:i32",
}


def compiled(name: str, dtype: str, rank: int):
    """Kernel name of dropout_kernels compiled for sm_90 (triton's CompiledKernel), x in dtype (bf16 or fp16)."""
    from nf4_sass_count import compile_sm90

    from lqmf.engine.lora import dropout_kernels

    types = {arg: kind.replace("*D", f"*{dtype}")
             for arg, kind in (item.split(":") for item in SIGNATURES[name].split())}
    constants = dict(BLOCK_M=BLOCK_M, BLOCK_R=max(16, 1 << (rank - 1).bit_length()), IEEE=False, INTERPRETED=False,
                     WANT_DX=True, WANT_DA=True)
    return compile_sm90(getattr(dropout_kernels, name), types, constants, {"num_warps": 4})


def sass(rank: int) -> None:
    from nf4_sass_count import resource_usage

    elements = BLOCK_M * 64 / 128  # a trip covers BLOCK_M rows x one column group, over 4 warps
    for name in SIGNATURES:
        usage = resource_usage(compiled(name, "bf16", rank))
        loop = len(usage["loop"])
        per = f"{loop / elements:.1f} a element" if name != "dropout_mask_kernel" else "no loop"
        print(f"{name} (rank {rank}): registers {usage['registers']}, spilled {usage['spilled']} B, "
              f"loop {loop} instructions = {per}; {dict(usage['kinds'].most_common(6))}")


def _runs(weight, p: float) -> dict:
    import torch

    from lqmf.engine.lora import dropout

    def torch_path(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return torch.nn.functional.linear(torch.nn.functional.dropout(x, p, training=True), weight)

    def fused(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return dropout.low_rank(x, weight, p)

    return {"torch": torch_path, "lqmf": fused}


def _forward_seconds(run, x, calls: int) -> float:
    import torch

    run(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        run(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / calls


def checked(weight, x, grad, p: float) -> dict:
    """The largest differences from torch's dropout and GEMMs given the kernels' mask, relative to the largest value."""
    import torch

    from lqmf.engine.lora import dropout

    torch.manual_seed(0)
    seed = dropout.draw_seed()
    mask = dropout.mask(x.shape[0], x.shape[1], p, seed, x.device)
    torch.manual_seed(0)
    inputs, down = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = dropout.low_rank(inputs, down, p)
    out.backward(grad)
    ref_x, ref_w = x.detach().float().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = ((ref_x * mask * (1 / (1 - p))).to(torch.bfloat16).float() @ ref_w.to(torch.bfloat16).float().t())
    expected.backward(grad.float())

    def worst(got, want):
        return ((got.float() - want).abs().max() / want.abs().max()).item()

    return {"kept": mask.float().mean().item(), "out_rel": worst(out, expected),
            "dx_rel": worst(inputs.grad, ref_x.grad), "da_rel": worst(down.grad, ref_w.grad)}


def measure(label: str, width: int, args) -> dict:
    import torch
    from nf4_frozen_bench import device_seconds, host_seconds

    weight = torch.nn.Parameter(torch.randn(args.rank, width, device="cuda") * 0.02)
    x = torch.randn(args.tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.tokens, args.rank, device="cuda", dtype=torch.bfloat16)
    row = {"width": label, "in_features": width, "rank": args.rank, "p": args.p, **checked(weight, x, grad, args.p)}
    small = torch.randn(16, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    small_grad = torch.randn(16, args.rank, device="cuda", dtype=torch.bfloat16)
    for name, run in _runs(weight, args.p).items():
        row[f"{name}_forward_ms"] = 1000 * _forward_seconds(run, x, args.calls)
        row[f"{name}_device_ms"] = 1000 * device_seconds(run, x, grad, args.calls)
        row[f"{name}_host_us"] = 1e6 * host_seconds(run, small, small_grad, args.calls)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--sass", action="store_true", help="compile for sm_90 and count instructions (no GPU)")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.sass:
        os.environ.pop("TRITON_INTERPRET", None)
        sass(args.rank)
        return
    import torch

    rows = [measure(label, width, args) for label, width in WIDTHS.items()]
    for row in rows:
        print("RESULT", json.dumps({key: round(value, 4) if isinstance(value, float) else value
                                    for key, value in row.items()}))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora-dropout.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                            "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
