"""How fast one decode row could stream the NF4 weights: a kernel that only reads them (GPU; diagnostic).

The one-row NF4 tiles move 1.0-1.5 TB/s of an H100's 3.35 (docs/serving.md). Whether that is the
lookup's instructions or the access pattern (each program reads BLOCK_N rows of the packed bytes, a
slice of K at a time, and one float32 absmax per 64 values) is what this answers: `stream_kernel`
reads exactly those bytes with the same grid shapes (BLOCK_N rows, K in slices) and does no more than
xor them, so its best time per shape is what the access pattern allows. Beside it, a plain copy of the
packed bytes (read + write) and the table's own one-row config (nf4.CONFIGS), all in CUDA graphs of 20
calls (nf4_kernel_bench.graph_us). The GEMV and tl.dot candidates are timed by
`nf4_kernel_bench.py --grid one-row`.

    PYTHONPATH=src:benchmarks python3 benchmarks/nf4_stream_ceiling.py --out $OUT

--smoke runs it on the CPU in Triton's interpreter at tiny shapes (seconds; timings meaningless).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated, so before the import below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


@triton.jit
def stream_kernel(words_ptr, absmax_ptr, out_ptr, N, WORDS, WORDS_PER_SPLIT, BLOCK_N: tl.constexpr,
                  BLOCK_W: tl.constexpr):
    """Reads rows of int32 words ([N, WORDS], the packed bytes) and their absmax (one float32 per 8 words),
    BLOCK_N rows by BLOCK_W words a step over one slice; writes each row's xor (plus the absmax sum)."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    begin = pid_s * WORDS_PER_SPLIT
    at = words_ptr + (cols.to(tl.int64) * WORDS + begin)[:, None] + tl.arange(0, BLOCK_W)[None, :]
    scale_at = (absmax_ptr + (cols.to(tl.int64) * (WORDS // 8) + begin // 8)[:, None]
                + tl.arange(0, BLOCK_W // 8)[None, :])
    bits = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
    scales = tl.zeros((BLOCK_N, BLOCK_W // 8), dtype=tl.float32)
    for _ in range(0, WORDS_PER_SPLIT, BLOCK_W):
        bits ^= tl.load(at, mask=col_ok[:, None], other=0)
        scales += tl.load(scale_at, mask=col_ok[:, None], other=0.0)
        at += BLOCK_W
        scale_at += BLOCK_W // 8
    total = tl.xor_sum(bits, axis=1).to(tl.float32) + tl.sum(scales, axis=1)
    tl.store(out_ptr + pid_s * N + cols, total, mask=col_ok)


def ceiling(weights: dict, measure, smoke: bool) -> dict:
    """Per shape: the streaming kernel's best grid and time, the copy's and the table config's time, GB/s."""
    return {name: _one_shape(weight, measure, smoke) for name, weight in weights.items()}


def _one_shape(weight: dict, measure, smoke: bool) -> dict:
    import torch
    from nf4_kernel_bench import BLOCKSIZE

    from lqmf.engine.lora import nf4

    n, k = weight["dense"].shape
    words = weight["packed"].reshape(-1).view(torch.int32).view(n, k // 8)
    out = torch.empty((16, n), dtype=torch.float32, device=words.device)
    x = torch.randn(1, k, device=words.device).to(torch.bfloat16)

    def stream(block_n: int, block_w: int, warps: int, split: int) -> None:
        stream_kernel[(-(-n // block_n), split)](words, weight["absmax"], out, n, k // 8, k // 8 // split,
                                                 BLOCK_N=block_n, BLOCK_W=block_w, num_warps=warps)

    timed = []
    for grid in itertools.product((32, 64, 128), (16, 32, 64), (2, 4), (1, 2, 4, 8)):  # block_n, block_w, warps, split
        if (k // 8) % (grid[1] * grid[3]) or (smoke and len(timed) == 2):
            continue
        timed.append((measure(lambda grid=grid: stream(*grid)), dict(zip(("block_n", "block_w", "warps", "split"),
                                                                          grid, strict=True))))
    timed.sort(key=lambda entry: entry[0])
    copy = torch.empty_like(weight["packed"])
    table_us = measure(lambda: nf4.nf4_matmul(x, weight["packed"], weight["absmax"], weight["code"], (n, k), BLOCKSIZE,
                                              standard_code=weight["standard_code"]))
    stream_us, copy_us = timed[0][0], measure(lambda: copy.copy_(weight["packed"]))
    return dict(bytes=weight["bytes"], stream_us=round(stream_us, 2), stream_grid=timed[0][1],
                stream_gb_per_s=round(weight["bytes"] / stream_us / 1e3, 1),
                copy_gb_per_s=round(2 * weight["packed"].numel() / copy_us / 1e3, 1),
                table_us=round(table_us, 2), table_gb_per_s=round(weight["bytes"] / table_us / 1e3, 1),
                runners_up=timed[1:4])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    args = parser.parse_args()
    import torch
    from nf4_kernel_bench import LAYERS, SHAPES, SMOKE_SHAPES, build, timer

    from lqmf.engine.lora import nf4

    nf4.OFF_GPU = args.smoke
    torch.manual_seed(0)
    results = ceiling(build(SMOKE_SHAPES if args.smoke else SHAPES, "cpu" if args.smoke else "cuda"),
                      timer(args.smoke), args.smoke)
    step = {kind: round(LAYERS * sum(entry[f"{kind}_us"] for entry in results.values()), 1)
            for kind in ("stream", "table")}
    summary = dict(per_shape=results, one_row_step_us=step,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)",
                   command=" ".join(sys.argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nf4-stream-ceiling.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    for name, entry in results.items():
        print(f"{name:8} stream {entry['stream_gb_per_s']:8.1f} GB/s ({entry['stream_us']} us, "
              f"{entry['stream_grid']}); table {entry['table_gb_per_s']:8.1f} GB/s ({entry['table_us']} us); "
              f"copy {entry['copy_gb_per_s']} GB/s")
    print(f"32 layers at one row: streaming {step['stream']} us, the table's kernel {step['table']} us")


if __name__ == "__main__":
    main()
