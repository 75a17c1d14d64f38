"""Issue 23 exploration (GPU): does dequantizing NF4 weights in chunks into one reused scratch buffer beat
bitsandbytes' dequantize-then-GEMM for a decode step of several rows?

bitsandbytes 0.50 multiplies more than a few rows by a 4-bit weight by dequantizing the whole weight
to bf16 in memory and then running a GEMM: for the Mistral-7B shape a step writes and reads back
about 14.5 GB of bf16 besides reading the 3.8 GB of packed bytes. Dequantized a chunk at a time into
one scratch buffer that fits the L2 cache (50 MB on an H100), the bf16 copy may never reach HBM: the
same lines are overwritten chunk after chunk.

Builds 32 layers of Mistral-7B-shaped NF4 weights on the GPU (q/k/v and gate/up stacked, blocks of 64,
float32 absmax, as compat.stack_4bit leaves the groups), then times one decode step's base matmuls
(32 layers x 4 groups) for each number of rows, each way captured in one CUDA graph:
  - `bnb`: bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state), as lora/stacked.py calls it;
  - `chunks-N`: for each weight, chunks of N MB of bf16: bitsandbytes' dequantize_4bit(out=scratch),
    then torch.mm into the output's rows (the output kept transposed, [N, M]).
Checks that both give the same product for one weight (same dequantized values; the GEMMs may add
in another order).

    PYTHONPATH=src python3 benchmarks/dequant_chunks_bench.py --rows 1 16 32 --chunk-mb 8 16 32 --out $OUT
    PYTHONPATH=src python3 benchmarks/dequant_chunks_bench.py --smoke     # the CPU, tiny shapes, no timing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nf4_kernel_bench import graph_us  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
SMOKE_SHAPES = {"qkv": (192, 128), "o": (128, 128), "gate_up": (256, 128), "down": (128, 256)}
BLOCKSIZE = 64


def build(shapes: dict, layers: int, device: str) -> list:
    """[(group, packed, state)] for every layer's four groups; float32 absmax, not nested."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    weights = []
    for _ in range(layers):
        for name, shape in shapes.items():
            dense = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
            packed, state = quantize_4bit(dense, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
            state.absmax = state.absmax.float()
            weights.append((name, packed, state))
            del dense
    return weights


def chunk_plan(packed, state, chunk_values: int) -> list:
    """[(packed slice, QuantState of the slice, first row, end row)]: rows of the weight, chunk_values at most."""
    import torch
    from bitsandbytes.functional import QuantState

    rows, width = state.shape
    step = max(1, chunk_values // width)
    plan = []
    for first in range(0, rows, step):
        end = min(rows, first + step)
        sub = QuantState(absmax=state.absmax[first * width // BLOCKSIZE:end * width // BLOCKSIZE],
                         shape=torch.Size([end - first, width]), code=state.code, blocksize=BLOCKSIZE,
                         quant_type="nf4", dtype=torch.bfloat16)
        plan.append((packed[first * width // 2:end * width // 2], sub, first, end))
    return plan


def chunked_matmul(x, plan, scratch, out_t) -> None:
    """out_t [N, M] = W x^T, W dequantized a chunk at a time into scratch."""
    import torch
    from bitsandbytes.functional import dequantize_4bit

    width = x.shape[1]
    for packed, sub, first, end in plan:
        chunk = scratch[:(end - first) * width].view(end - first, width)
        if x.is_cuda:
            dequantize_4bit(packed, sub, out=chunk, quant_type="nf4")
        else:  # bitsandbytes has no in-place dequantize on the CPU (--smoke)
            chunk.copy_(dequantize_4bit(packed, sub, quant_type="nf4"))
        torch.mm(chunk, x.t(), out=out_t[first:end])


def check(weights, device) -> float:
    """Largest difference of the chunked product from bitsandbytes', over its largest value (one weight each)."""
    import bitsandbytes as bnb
    import torch

    worst = 0.0
    seen = set()
    for name, packed, state in weights:
        if name in seen:
            continue
        seen.add(name)
        rows, width = state.shape
        x = torch.randn(16, width, device=device, dtype=torch.bfloat16)
        expected = bnb.matmul_4bit(x, packed.t(), quant_state=state).float()
        out_t = torch.empty(rows, 16, device=device, dtype=torch.bfloat16)
        scratch = torch.empty(rows * width // 3 + width, device=device, dtype=torch.bfloat16)
        chunked_matmul(x, chunk_plan(packed, state, scratch.numel()), scratch, out_t)
        worst = max(worst, float((out_t.t().float() - expected).abs().max() / expected.abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--chunk-mb", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()
    import bitsandbytes as bnb
    import torch

    device = "cpu" if args.smoke else "cuda"
    weights = build(SMOKE_SHAPES if args.smoke else SHAPES, 2 if args.smoke else args.layers, device)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "layers": len(weights) // 4,
              "relative_difference": check(weights, device), "step_us": {}}
    print(json.dumps({"relative_difference": report["relative_difference"]}), flush=True)
    for rows in args.rows:
        inputs = {width: torch.randn(rows, width, device=device, dtype=torch.bfloat16)
                  for width in {s.shape[1] for _, _, s in weights}}
        outputs = [torch.empty(s.shape[0], rows, device=device, dtype=torch.bfloat16) for _, _, s in weights]

        def bnb_step(inputs=inputs):
            for _, packed, state in weights:
                bnb.matmul_4bit(inputs[state.shape[1]], packed.t(), quant_state=state)

        timings = {"bnb": None if args.smoke else graph_us(bnb_step, calls=1, repeats=3)}
        for megabytes in args.chunk_mb:
            scratch = torch.empty(megabytes * 2**20 // 2, device=device, dtype=torch.bfloat16)
            plans = [chunk_plan(packed, state, scratch.numel()) for _, packed, state in weights]

            def chunked_step(plans=plans, scratch=scratch, inputs=inputs, outputs=outputs):
                for (_, _, state), plan, out_t in zip(weights, plans, outputs, strict=True):
                    chunked_matmul(inputs[state.shape[1]], plan, scratch, out_t)

            chunked_step()
            timings[f"chunks-{megabytes}"] = None if args.smoke else graph_us(chunked_step, calls=1, repeats=3)
        report["step_us"][rows] = timings
        print(json.dumps({"rows": rows, **timings}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "dequant-chunks.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
