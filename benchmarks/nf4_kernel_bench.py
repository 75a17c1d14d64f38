"""The NF4 Triton kernel (engine/lora/nf4.py) against bitsandbytes at decode shapes: a config sweep (GPU).

Builds NF4 weights (blocks of 64, double-quantized absmax, as the loader makes them) of one Mistral-7B
layer's base matmuls as the batched decoder runs them: q/k/v stacked (N=6144, K=4096), o (4096, 4096),
gate/up stacked (28672, 4096), down (4096, 14336). For each number of rows (1 2 4 8 16 32 64) it times
every candidate config of the kernel and bitsandbytes' path as lora/stacked.py's stacked_base calls
it (`bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state)`: the stacked groups with the float32
absmax compat.stack_4bit makes, o and down with their own nested state), each inside a CUDA graph
(20 calls captured, replayed, timed with CUDA events). It checks the kernel's bf16 output against the
float32 product of bitsandbytes' dequantized weight rounded to bf16 (bitsandbytes' own output too,
for scale), and the best config's float32 output against the float32 product. Configs that fail to
compile or run are skipped and listed; once --budget-s has passed, untried configs are skipped too.

Writes $OUT/nf4-bench.json (per shape and rows: best config, its us, bitsandbytes' us, GB/s of the
weight bytes the kernel reads, errors; every config's us; the whole model per decode step: 32 layers
x the four shapes) and prints a table and the CONFIGS literal for nf4.py. Run on the GPU machine:

    PYTHONPATH=src python3 benchmarks/nf4_kernel_bench.py --out $OUT

--smoke runs it on the CPU in Triton's interpreter at tiny shapes (seconds; timings meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
SMOKE_SHAPES = {"qkv": (96, 128), "o": (64, 128), "gate_up": (128, 128), "down": (64, 256)}
GROUPS = ("qkv", "gate_up")  # stacked by compat.stack_4bit: float32 absmax; o and down keep their nested state
LAYERS, BLOCKSIZE, CALLS = 32, 64, 20


def candidates(smoke: bool) -> list:
    """The configs swept, likeliest first (so that a budget cut drops the long shots)."""
    from lqmf.engine.lora.nf4 import Config

    if smoke:
        return [Config(block_m=1, block_n=32, block_k=128, dot=False), Config(block_m=16, block_n=32, block_k=128),
                Config(block_m=16, block_n=32, block_k=64, lut=1, swap=True),
                Config(block_m=16, block_n=32, block_k=128, late_scale=True)]
    gemv_tiles = ((32, 256), (64, 128), (16, 512), (64, 256))  # block_n, block_k
    dot_tiles = ((64, 128, 4), (32, 256, 4), (64, 256, 4), (128, 128, 8), (128, 256, 8))  # and warps

    def gemvs(block_m, tiles, lut=0, late_scale=False):
        return [Config(block_m=block_m, block_n=n, block_k=k, dot=False, lut=lut, late_scale=late_scale)
                for n, k in tiles]

    def dots(block_m, tiles, lut=0, stages=2, late_scale=False, swaps=(False, True)):
        return [Config(block_m=block_m, block_n=n, block_k=k, warps=warps, stages=stages, lut=lut, swap=swap,
                       late_scale=late_scale) for n, k, warps in tiles for swap in swaps]

    # lut 2 first (no memory reads for the lookup; about 5.1-7.1 instructions a weight value compiled for
    # sm_90, benchmarks/nf4_sass_count.py), then lut 1 (one gather a byte: it lost to bitsandbytes on an
    # H100, 2026-12-06) for comparison; each config once, in the order of its first mention
    wide = ((128, 256, 4), (64, 512, 4), (128, 512, 8))
    # fewer warps a tile: each warp prepares x for its own tl.dot, so fewer warps over as many weight
    # columns leave fewer instructions a weight value (5.1-5.7 against 7.1 for the 4-warp winners of
    # 2026-12-06, nf4_sass_count.py; swapped a little fewer); tried first
    few_warps = ((128, 128, 2), (64, 128, 1), (64, 256, 2), (32, 256, 1), (32, 256, 2))
    return list(dict.fromkeys(
            dots(16, dot_tiles[:2], lut=2, stages=3, late_scale=True, swaps=(False,))  # the first sweep's winners
            + dots(32, dot_tiles[2:3], lut=2, late_scale=True, swaps=(False,))
            + dots(16, few_warps, lut=2, stages=3, late_scale=True)
            + dots(32, few_warps[:4], lut=2, late_scale=True, swaps=(True,))
            + dots(32, dot_tiles[:2], lut=2, late_scale=True, swaps=(False,))
            + dots(16, dot_tiles + wide, lut=2, late_scale=True) + dots(32, dot_tiles[:3], lut=2, late_scale=True)
            + dots(64, dot_tiles[:3], lut=2, late_scale=True) + gemvs(1, gemv_tiles[:2], lut=2, late_scale=True)
            + dots(16, dot_tiles[:3], lut=2, stages=3, late_scale=True)
            + gemvs(1, gemv_tiles, lut=1) + gemvs(1, gemv_tiles[:2], lut=1, late_scale=True)
            + dots(16, dot_tiles, lut=1) + dots(16, dot_tiles[:3], lut=1, late_scale=True)
            + gemvs(2, gemv_tiles[:2], lut=1) + gemvs(4, gemv_tiles[:2], lut=1, late_scale=True)
            + dots(32, dot_tiles[:3], lut=1) + dots(64, dot_tiles[:3], lut=1)
            + dots(64, dot_tiles[2:3], lut=1, late_scale=True)
            + gemvs(1, gemv_tiles[:2]) + dots(16, dot_tiles[:3]) + dots(16, dot_tiles[2:3], lut=1, stages=3)))


def one_row_candidates() -> list:
    """A wider grid for one row (--grid one-row): tl.dot tiles of 16 x 16..64 columns, two or four
    blocks a step, one or two warps, 3 or 4 stages, swapped or not, and lut 2 GEMVs; the first
    sweeps' one-row winners first."""
    from lqmf.engine.lora.nf4 import Config

    winners = [Config(block_n=32, block_k=256, warps=1, stages=3, lut=2, late_scale=True),
               Config(stages=3, lut=2, late_scale=True),
               Config(block_n=128, warps=2, stages=3, lut=2, late_scale=True),
               Config(block_n=32, block_k=256, warps=2, stages=3, lut=2, late_scale=True)]
    dots = [Config(block_n=n, block_k=k, warps=w, stages=st, lut=2, swap=swap, late_scale=True)
            for st in (4, 3) for n in (16, 32, 64) for k in (512, 256) for w in (1, 2) for swap in (True, False)]
    gemvs = [Config(block_m=1, block_n=n, block_k=k, warps=w, dot=False, lut=2, late_scale=True)
             for n, k, w in ((16, 512, 1), (32, 256, 1), (32, 512, 2), (64, 256, 2), (64, 256, 4), (64, 512, 4),
                             (128, 256, 4))]
    return list(dict.fromkeys(winners + dots + gemvs))


def gemv_candidates() -> list:
    """The table's one-row tiles, then GEMV tiles of 16..256 columns by 256 or 512 values a step with one
    to four 16-byte loads a thread, each with lut 2 and lut 3 (--grid gemv, --rows 1)."""
    from lqmf.engine.lora.nf4 import CONFIGS, Config

    table = [replace(config, split=0) for (rows_key, _, _), config in CONFIGS.items() if rows_key == 1]
    tiles = ((16, 512, 1), (32, 256, 1), (32, 512, 1), (32, 512, 2), (64, 256, 2), (64, 512, 2), (64, 256, 4),
             (64, 512, 4), (128, 256, 4), (128, 256, 8), (128, 512, 8), (256, 256, 8))
    grid = [Config(block_m=1, block_n=n, block_k=k, warps=w, dot=False, lut=lut, late_scale=True)
            for n, k, w in tiles for lut in (2, 3)]  # lut 3: the table's words as the PTX's operands
    return list(dict.fromkeys(table + grid))


def batch_candidates(rows: int) -> list:
    """A wider grid for a decode batch of this many rows (--grid batch, 16 or more rows): tl.dot tiles as
    tall as the row bucket, 32..128 columns, two or four blocks a step, 1, 2 or 4 warps, 2 or 3 stages,
    swapped or not; the table's tiles for that bucket first."""
    from lqmf.engine.lora.nf4 import CONFIGS, Config, row_bucket

    bucket = max(16, row_bucket(rows))
    table = [replace(config, split=0) for (rows_key, _, _), config in CONFIGS.items() if rows_key == bucket]
    grid = [Config(block_m=bucket, block_n=n, block_k=k, warps=w, stages=st, lut=2, swap=swap, late_scale=True)
            for st in (3, 2) for n in (64, 32, 128) for k in (256, 128) for w in (2, 1, 4) for swap in (True, False)]
    return list(dict.fromkeys(table + grid))


def prefill_candidates() -> list:
    """Tall tiles for prompts longer than a decode step (--grid prefill, with --rows 128 or more and --splits
    1), where bitsandbytes dequantizes each weight and runs a GEMM: 64 or 128 rows by 64..256 columns,
    4 or 8 warps, 2..4 stages; GEMM-shaped 128 x 128 x 64 tiles first."""
    from lqmf.engine.lora.nf4 import Config

    tiles = ((128, 128, 64, 8), (128, 256, 64, 8), (64, 128, 128, 4), (128, 128, 128, 8), (64, 256, 64, 8),
             (64, 64, 128, 4))
    return [Config(block_m=m, block_n=n, block_k=k, warps=w, stages=stages, lut=2, late_scale=True)
            for stages in (3, 4, 2) for m, n, k, w in tiles]


def table_candidates() -> list:
    """nf4.CONFIGS' tiles as the table has them (--grid table: the same grid for two source trees)."""
    from lqmf.engine.lora.nf4 import CONFIGS

    return list(dict.fromkeys(CONFIGS.values()))


def config_fits(config, rows: int) -> bool:
    """Whether config is one the table would use for rows: a GEMV of at most rows (<= 8) rows a tile,
    or a tl.dot tile no taller than the rows (16 at least)."""
    from lqmf.engine.lora.nf4 import row_bucket

    bucket = row_bucket(rows)
    if not config.dot:
        return config.block_m <= bucket <= 8
    return config.block_m <= max(16, bucket)


def graph_us(fn, calls: int = CALLS, repeats: int = 5) -> float:
    """us per call of fn: `calls` calls captured in one CUDA graph, replayed `repeats` times (CUDA events)."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (repeats * calls)


def timer(smoke: bool):
    """us per call of fn: CUDA-graph replays of CALLS calls (GPU, `graph_us`), or wall-clock calls (smoke)."""

    def cpu_us(fn, repeats: int = 2) -> float:
        fn()
        begin = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - begin) * 1e6 / repeats

    return cpu_us if smoke else graph_us


def build(shapes: dict, device: str) -> dict:
    """name -> weight pieces: packed bytes, nested state (as quantized), float32-absmax state, dense float32."""
    import torch
    from bitsandbytes.functional import QuantState, dequantize_4bit, quantize_4bit

    from lqmf.engine import compat
    from lqmf.engine.lora.nf4 import is_nf4_code

    weights = {}
    for name, (n, k) in shapes.items():
        dense = torch.randn(n, k, device=device) * 0.02
        packed, nested = quantize_4bit(dense, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        absmax = compat.absmax_fp32(nested).contiguous()
        flat = QuantState(absmax=absmax, shape=nested.shape, code=nested.code, blocksize=BLOCKSIZE,
                          quant_type="nf4", dtype=nested.dtype)
        weights[name] = {"packed": packed, "state": flat if name in GROUPS else nested, "absmax": absmax,
                         "standard_code": is_nf4_code(nested.code),
                         "code": nested.code.float().contiguous(), "dense": dequantize_4bit(packed, nested).float(),
                         "bytes": packed.numel() + absmax.numel() * 4}
        del dense
    return weights


def sweep(weights: dict, rows_list: list[int], configs: list, measure, budget_s: float, device: str,
          results: dict, skipped: dict, splits: tuple[int, ...] = (0, 1)) -> None:
    """Every config on every (shape, rows) it fits, bf16 inputs, into results {(name, rows): {(config index,
    split): (us, error)}}; configs that fail, or give a wrong answer, into skipped {index: why}."""
    import torch

    from lqmf.engine.lora.nf4 import WRONG_SHARE, fitted, lookup_verified, nf4_matmul

    inputs = {(name, rows): torch.randn(rows, weights[name]["dense"].shape[1], device=device, dtype=torch.bfloat16)
              for name in weights for rows in rows_list}
    references = {key: reference(x, weights[key[0]]) for key, x in inputs.items()}
    results.update({key: {} for key in inputs})
    begin = time.monotonic()
    for index, config in enumerate(configs):
        if time.monotonic() - begin > budget_s:
            skipped[index] = "budget"
            continue
        for (name, rows), x in inputs.items():
            weight = weights[name]
            shape = tuple(weight["dense"].shape)
            if not config_fits(config, rows) or fitted(config, rows, shape, BLOCKSIZE)[0].block_k != config.block_k:
                continue
            for split in splits:
                def call(config=replace(config, split=split), x=x, weight=weight, shape=shape):
                    return nf4_matmul(x, weight["packed"], weight["absmax"], weight["code"], shape, BLOCKSIZE, config,
                                      standard_code=weight["standard_code"])

                chosen, slices = fitted(replace(config, split=split), rows, shape, BLOCKSIZE)
                if config.serial and slices == 1:  # the same launch as its plain twin
                    continue
                try:
                    if chosen.lut in (2, 3) and not lookup_verified(chosen, slices, x, weight["packed"],
                                                                    weight["absmax"], weight["code"], shape, BLOCKSIZE):
                        skipped[index] = f"lut {chosen.lut} fails its check at {name}, {rows} rows, split {split}"
                        break
                    error = float((call().float() - references[(name, rows)]).abs().max())
                    if not error <= WRONG_SHARE * float(references[(name, rows)].abs().max()):
                        skipped[index] = f"wrong: max abs error {error:.3g} at {name}, {rows} rows, split {split}"
                        break
                    results[(name, rows)][(index, split)] = (measure(call), error)
                except Exception as failure:  # a config that does not compile or run: skip it
                    skipped[index] = f"{type(failure).__name__}: {str(failure).splitlines()[0][:160]}"
                    recover(device)
                    break
            if index in skipped:
                break
        if index in skipped:  # none of its timings count
            for timed in results.values():
                for key in [key for key in timed if key[0] == index]:
                    del timed[key]
        print(f"config {index + 1}/{len(configs)} done, {time.monotonic() - begin:.0f} s", file=sys.stderr)


def reference(x, weight):
    """x times bitsandbytes' dequantized weight in float32, the weight rounded to x's dtype first."""
    return x.float() @ weight["dense"].to(x.dtype).float().t()


def recover(device: str) -> None:
    """After a failed launch: let the device settle (a failure inside a capture leaves nothing behind)."""
    import torch

    if device == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception as failure:  # the context itself failed: nothing more can run
            print(f"CUDA failed: {failure}", file=sys.stderr)
            raise


def summarize(weights, rows_list, configs, results, measure, device, deadline: float) -> dict:
    """Per (shape, rows): the best config against bitsandbytes; and the per-step sums over the model.
    The float32 check compiles the kernel once more per best config: skipped once past deadline (monotonic)."""
    import bitsandbytes as bnb
    import torch

    table, step = {}, {rows: {"kernel_us": 0.0, "bitsandbytes_us": 0.0} for rows in rows_list}
    for (name, rows), timed in results.items():
        weight = weights[name]
        x = torch.randn(rows, weight["dense"].shape[1], device=device, dtype=torch.bfloat16)

        def bnb_call(x=x, weight=weight):
            return bnb.matmul_4bit(x, weight["packed"].t(), quant_state=weight["state"])

        bnb_us = measure(bnb_call)
        bnb_error = float((bnb_call().float() - reference(x, weight)).abs().max())
        entry = {"bitsandbytes_us": round(bnb_us, 2), "bitsandbytes_gb_per_s": round(weight["bytes"] / bnb_us / 1e3, 1),
                 "bitsandbytes_bf16_max_abs_error": bnb_error,
                 "reference_max_abs": float(reference(x, weight).abs().max())}
        if timed:
            (index, split), (us, error) = min(timed.items(), key=lambda item: item[1][0])
            best = replace(configs[index], split=split)
            entry.update(config=asdict(best), us=round(us, 2), speedup=round(bnb_us / us, 3),
                         gb_per_s=round(weight["bytes"] / us / 1e3, 1), bf16_max_abs_error=error,
                         fp32_max_abs_error=fp32_error(x.float(), weight, best) if time.monotonic() < deadline
                         else "skipped (time)",
                         every_config_us={f"{i}/split{'auto' if s == 0 else s}": round(t, 2)
                                          for (i, s), (t, _) in sorted(timed.items())})
            step[rows]["kernel_us"] += LAYERS * us
        else:
            step[rows]["kernel_us"] = float("nan")
        step[rows]["bitsandbytes_us"] += LAYERS * bnb_us
        table[f"{name}/{rows}"] = entry
    return {"per_shape": table, "per_step_32_layers": {str(r): {k: round(v, 1) for k, v in s.items()}
                                                       for r, s in step.items()}}


def fp32_error(x, weight, config) -> float | str:
    """Max abs error of the kernel (config, float32 inputs) against the float32 product; the failure if any."""
    from lqmf.engine.lora.nf4 import nf4_matmul

    try:
        out = nf4_matmul(x, weight["packed"], weight["absmax"], weight["code"], tuple(weight["dense"].shape),
                         BLOCKSIZE, config)
    except Exception as failure:  # reported, not fatal: the bf16 sweep is what the run is for
        return f"{type(failure).__name__}: {str(failure).splitlines()[0][:160]}"
    return float((out - x @ weight["dense"].t()).abs().max())


def report(summary: dict, weights: dict) -> None:
    from lqmf.engine.lora.nf4 import Config, row_bucket

    print(f"{'shape':>8} {'rows':>4} {'kernel us':>10} {'bnb us':>8} {'x':>6} {'GB/s':>7} {'bf16 err':>9}  config")
    for key, entry in summary["per_shape"].items():
        name, rows = key.split("/")
        config = entry.get("config")
        brief = ("-" if config is None else
                 f"{'dot' if config['dot'] else 'gemv'} m{config['block_m']} n{config['block_n']} "
                 f"k{config['block_k']} s{config['split'] or 'auto'} w{config['warps']} st{config['stages']} "
                 f"lut{config['lut']}{' swap' if config['swap'] else ''}{' late' if config['late_scale'] else ''}"
                 f"{' serial' if config.get('serial') else ''}")
        print(f"{name:>8} {rows:>4} {entry.get('us', float('nan')):>10.1f} {entry['bitsandbytes_us']:>8.1f} "
              f"{entry.get('speedup', float('nan')):>6.2f} {entry.get('gb_per_s', float('nan')):>7.0f} "
              f"{entry.get('bf16_max_abs_error', float('nan')):>9.2e}  {brief}")
    for rows, step in summary["per_step_32_layers"].items():
        print(f"step of {rows:>2} rows, 32 layers: kernel {step['kernel_us']:.0f} us, "
              f"bitsandbytes {step['bitsandbytes_us']:.0f} us")
    print("CONFIGS = {")
    for key, entry in summary["per_shape"].items():
        if entry.get("config"):
            name, rows = key.split("/")
            n, k = weights[name]["dense"].shape
            rows = row_bucket(int(rows))
            defaults = asdict(Config())
            fields = ", ".join(f"{field}={value}" for field, value in entry["config"].items()
                               if value != defaults[field])  # what differs from Config's defaults
            print(f"    ({rows}, {n}, {k}): Config({fields}),")
    print("}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--budget-s", type=float, default=85.0,
                        help="stop trying new configs after this long (the float32 checks: 20 s more)")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument("--grid", choices=("default", "one-row", "gemv", "batch", "table", "prefill"),
                        default="default",
                        help="one-row: a wider grid of one-row configs (`one_row_candidates`); gemv: the table's "
                             "one-row tiles and GEMV tiles (`gemv_candidates`); batch: of configs "
                             "for the largest of --rows (`batch_candidates`); table: nf4.CONFIGS' own tiles; "
                             "prefill: tall tiles for prompts (`prefill_candidates`)")
    parser.add_argument("--serial", action="store_true",
                        help="also each config with serial split K (Config.serial: no reduce_splits launch)")
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1],
                        help="slices of K to try per config (0: enough for nf4.TARGET_WARPS warps)")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported
    import torch

    from lqmf.engine.lora import nf4

    device = "cpu" if args.smoke else "cuda"
    nf4.OFF_GPU = args.smoke
    torch.manual_seed(0)
    began = time.monotonic()
    weights = build(SMOKE_SHAPES if args.smoke else SHAPES, device)
    grids = {"one-row": one_row_candidates, "gemv": gemv_candidates, "batch": lambda: batch_candidates(max(args.rows)),
             "table": table_candidates, "prefill": prefill_candidates}
    configs = grids[args.grid]() if args.grid in grids and not args.smoke else candidates(args.smoke)
    if args.serial:  # each config, then its serial twin, so that a budget cut drops whole pairs
        configs = [twin for config in configs for twin in (config, replace(config, serial=True))]
    rows_list = [1, 3, 17] if args.smoke and args.rows == parser.get_default("rows") else args.rows
    measure = timer(args.smoke)
    results: dict = {}
    skipped: dict = {}
    facts = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
                 torch=torch.__version__, triton=__import__("triton").__version__,
                 bitsandbytes=__import__("bitsandbytes").__version__, blocksize=BLOCKSIZE, calls_per_graph=CALLS,
                 configs={str(i): asdict(c) for i, c in enumerate(configs)}, skipped_configs=skipped,
                 command=" ".join(sys.argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        sweep(weights, rows_list, configs, measure, args.budget_s, device, results, skipped, tuple(args.splits))
        summary = summarize(weights, rows_list, configs, results, measure, device, began + args.budget_s + 20)
    except Exception as failure:  # the device failed: keep what was measured
        partial = {f"{name}/{rows}": {f"{i}/split{s}": t for (i, s), (t, _) in timed.items()}
                   for (name, rows), timed in results.items()}
        (out / "nf4-bench.json").write_text(json.dumps(dict(facts, fatal=repr(failure), partial_us=partial,
                                                            seconds=round(time.monotonic() - began, 1)), indent=1))
        raise
    summary.update(facts, seconds=round(time.monotonic() - began, 1))
    (out / "nf4-bench.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    report(summary, weights)


if __name__ == "__main__":
    main()
