"""lut 2 (register lookup) against lut 0 and lut 1 of the NF4 kernel, launched directly on each tile of
tests/gpu/test_nf4_kernel.py (diagnostic, GPU only): how many outputs differ from lut 0 and by how much,
each lut's error against the float32 product, and whether nf4.lookup_verified passes the variant.

    PYTHONPATH=src python3 benchmarks/nf4_lut_check.py
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path


def main() -> None:
    import torch
    from bitsandbytes.functional import dequantize_4bit

    os.environ["LQMF_NF4_KERNEL"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "gpu"))
    from test_nf4_kernel import _group

    from lqmf.engine.lora import nf4

    layer = _group()[0]
    base = nf4.NF4Linear.of_module(layer)
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    for block_n, warps, stages in [(64, 4, 2), (32, 2, 3)]:
        for rows in (1, 16, 33):
            for dtype in (torch.bfloat16, torch.float16):
                torch.manual_seed(rows)
                x = torch.randn(rows, weight.shape[1], device="cuda").to(dtype)
                config = nf4.Config(block_m=16 if rows <= 16 else 64, block_n=block_n, block_k=256, warps=warps,
                                    stages=stages, lut=2, swap=True, late_scale=True)
                fitted, split = nf4.fitted(config, rows, base.shape, base.blocksize)
                verified = nf4.lookup_verified(fitted, split, x, base.packed, base.absmax, base.code, base.shape,
                                               base.blocksize)
                runs = {lut: nf4._launch(replace(fitted, lut=lut), split, x, base.packed, base.absmax, base.code,
                                         nf4.byte_pairs(base.code), base.shape, base.blocksize).float()
                        for lut in (0, 1, 2)}
                exact = x.float() @ weight.t()
                top = float(exact.abs().max())
                apart = (runs[2] - runs[0]).abs()
                errors = " ".join(f"lut{lut} {float((runs[lut] - exact).abs().max()) / top:.2e}" for lut in runs)
                print(f"n{block_n} w{warps} s{stages} rows {rows} {str(dtype)[6:]} verified={verified} split={split}: "
                      f"lut2!=lut0 {int((apart > 0).sum())}/{apart.numel()} max {float(apart.max()):.3g}; "
                      f"err vs f32 {errors}", flush=True)


if __name__ == "__main__":
    main()
