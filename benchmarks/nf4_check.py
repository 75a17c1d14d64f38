"""Check and time engine/nf4_kernels.py on a GPU against bitsandbytes (dequantize + GEMM, or its GEMV
for one row), for the linear shapes of a Mistral-7B block. Prints one JSON object.

    PYTHONPATH=src python benchmarks/nf4_check.py --out nf4.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import bitsandbytes as bnb
    import torch

    from lqmf.engine.nf4_kernels import NF4Weight

    report = {"shapes": []}
    for out_features, in_features in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4").to(torch.bfloat16)
        layer = layer.cuda()
        weight = NF4Weight.of(layer)
        dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        rows_report = []
        for rows in args.rows:
            x = torch.randn(rows, 1, in_features, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                reference = (x.view(rows, -1).float() @ dequantized.float().t())
                timings = {}
                for name, fn in (("bnb", lambda x=x, layer=layer: layer(x)),
                                 ("kernel", lambda x=x, weight=weight: weight.matmul(x))):
                    if name == "kernel" and rows > 64:
                        continue
                    fn()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(args.repeats):
                        out = fn()
                    end.record()
                    torch.cuda.synchronize()
                    timings[f"{name}_us"] = round(start.elapsed_time(end) / args.repeats * 1000, 1)
                    error = (out.view(rows, -1).float() - reference).abs().max().item()
                    timings[f"{name}_max_abs_err"] = round(error, 4)
            rows_report.append({"rows": rows, **timings})
        report["shapes"].append({"out": out_features, "in": in_features, "rows": rows_report})
        print(json.dumps(report["shapes"][-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
