"""Training's frozen NF4 base (engine/lora/nf4_frozen.py) against bitsandbytes' matmul_4bit, side by side (GPU).

For each base matmul of a Mistral-7B layer (q and o: 4096 x 4096, k and v: 1024 x 4096, gate and up:
14336 x 4096, down: 4096 x 14336; NF4, blocks of 64, nested absmax, as the loader makes them) it times
forward + backward (x's gradient) both ways:

- device: a micro-batch of --tokens (8,192: 4 x 2,048) bf16 rows, CUDA events around --calls calls;
- host: the same with 16 rows, where the GPU waits on Python, as seconds a call of the issuing thread
  (perf_counter around --calls calls, synchronised before and after).

It checks that the dequantized weights are equal bit for bit and the outputs and x's gradients equal.
Prints a RESULT line a shape and one for the 7B layer (the seven matmuls), and writes $OUT/nf4-frozen.json.

    PYTHONPATH=src python3 benchmarks/nf4_frozen_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096), "gate": (14336, 4096),
          "up": (14336, 4096), "down": (4096, 14336)}


def _layer(out_features: int, in_features: int):
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features) * 0.02, requires_grad=False,
                                     compress_statistics=True, quant_type="nf4", blocksize=64)
    return layer.cuda()


def step(run, x, grad):
    x.grad = None
    run(x).backward(grad)


def device_seconds(run, x, grad, calls: int) -> float:
    import torch

    step(run, x, grad)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        step(run, x, grad)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / calls


def host_seconds(run, x, grad, calls: int) -> float:
    import torch

    step(run, x, grad)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(calls):
        step(run, x, grad)
    issued = time.perf_counter() - began
    torch.cuda.synchronize()
    return issued / calls


def measure(name: str, shape: tuple[int, int], tokens: int, calls: int) -> dict:
    import torch
    from bitsandbytes.functional import dequantize_4bit

    from lqmf.engine import compat
    from lqmf.engine.lora import nf4_frozen

    layer = _layer(*shape)
    parts = compat.nf4_stored_parts(layer)
    same_weight = torch.equal(nf4_frozen.dequantize(parts, torch.bfloat16),
                              dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16))
    nf4_frozen.switch_on(torch.nn.Sequential(layer))
    ours = {"bitsandbytes": layer, "lqmf": lambda inputs: nf4_frozen.linear(layer, inputs)}
    row = {"shape": name, "out_features": shape[0], "in_features": shape[1], "same_weight": same_weight}
    x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, shape[0], device="cuda", dtype=torch.bfloat16)
    outputs = {}
    for label, run in ours.items():
        x.grad = None
        out = run(x)
        out.backward(grad)
        outputs[label] = (out.detach(), x.grad.clone())
        row[f"{label}_device_ms"] = 1000 * device_seconds(run, x, grad, calls)
    row["same_output"] = all(torch.equal(a, b) for a, b in zip(outputs["bitsandbytes"], outputs["lqmf"], strict=True))
    small = torch.randn(16, shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    small_grad = torch.randn(16, shape[0], device="cuda", dtype=torch.bfloat16)
    for label, run in ours.items():
        row[f"{label}_host_us"] = 1e6 * host_seconds(run, small, small_grad, calls)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    import torch

    rows = [measure(name, shape, args.tokens, args.calls) for name, shape in SHAPES.items()]
    layer = {key: sum(row[key] for row in rows) for key in rows[0] if key.endswith(("_ms", "_us"))}
    layer.update(shape="7B layer", same_weight=all(r["same_weight"] for r in rows),
                 same_output=all(r["same_output"] for r in rows))
    for row in [*rows, layer]:
        print("RESULT", json.dumps({key: round(value, 3) if isinstance(value, float) else value
                                    for key, value in row.items()}))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nf4-frozen.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                          "tokens": args.tokens, "rows": [*rows, layer]}, indent=1))


if __name__ == "__main__":
    main()
