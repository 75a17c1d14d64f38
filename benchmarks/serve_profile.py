"""Where a batched decode step of `lqmf serve` spends its time on the GPU (diagnostic, not a test).

Loads the 4-bit Mistral-7B-shaped model of benchmarks/gpu_train_bench.py in the real model host
(engine/host.py, continuous batching, three random r=16 q/k/v/o adapters resident) and measures:

- per batch bucket: whether the decode step's CUDA graph is captured, the capture time, the GPU
  time of one replay (CUDA events), the wall time of one `decode()` call as the scheduler makes it
  (with the argmax and copy back), and one eager step; with and without the NF4 kernel
  (engine/nf4_kernels.py) and without adapters (the per-row LoRA's share);
- the kernels of one replay by category (torch.profiler);
- the base matmuls of one layer alone, bitsandbytes vs the NF4 kernel's configurations, in graphs;
- prefill of a short and a 512-token prompt;
- the scheduler in process: C client threads x 2 requests of 128 tokens, the time in prefill,
  in decode steps and elsewhere.

    PYTHONPATH=src:benchmarks python3 benchmarks/serve_profile.py --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from gpu_train_bench import MODEL_DIR, ensure_model
from serve_bench import write_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT_IDS = [1, *range(400, 416)]  # about the benchmark prompt's length


def events_ms(fn, repeats: int) -> float:
    import torch

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeats, 4)


def graphed_us(fn, repeats: int = 20) -> float:
    """GPU microseconds of one fn() call, from a CUDA graph of repeats calls."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    return round(events_ms(graph.replay, 10) * 1000 / repeats, 2)


def category(name: str) -> str:
    lowered = name.lower()
    for key, label in (("dequant", "bnb_dequantize"), ("gemv_4bit", "bnb_gemv"), ("kgemm_4bit", "bnb_gemv"),
                       ("nf4_matmul", "nf4_kernel"), ("softmax", "attention_softmax"), ("gemm", "gemm"),
                       ("cutlass", "gemm"), ("xmma", "gemm"), ("nvjet", "gemm"), ("index", "index_kv"),
                       ("elementwise", "elementwise"), ("reduce", "reduce")):
        if key in lowered:
            return label
    return "other"


def kernel_profile(fn) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_category: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_category.setdefault(category(event.name), []).append(event.time_range.elapsed_us())
        by_name.setdefault(event.name[:80], []).append(event.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:12]
    return {"kernels": len(kernels), "kernel_ms": round(sum(sum(v) for v in by_category.values()) / 1000, 3),
            "by_category_ms": {k: [len(v), round(sum(v) / 1000, 3)] for k, v in sorted(by_category.items())},
            "top": [[name, len(v), round(sum(v), 1)] for name, v in top]}


def step_figures(decoder, batch: int, length: int) -> dict[str, Any]:
    import torch

    tokens, positions = [7] * batch, [length // 2] * batch
    rows = [index % 4 for index in range(batch)]
    started = time.perf_counter()
    decoder.decode(tokens, positions, rows)
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - started
    key = (batch, length)
    record: dict[str, Any] = {"batch": batch, "length": length, "graph": key in decoder.graphs,
                              "capture_failed": key in decoder.failed, "first_call_s": round(capture_s, 3)}
    if key in decoder.graphs:
        record["replay_ms"] = events_ms(decoder.graphs[key][0].replay, 30)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        decoder.decode(tokens, positions, rows).argmax(-1).tolist()
        times.append(time.perf_counter() - started)
    record["decode_call_ms"] = round(statistics.median(times) * 1000, 3)
    record["eager_gpu_ms"] = events_ms(lambda: decoder._step(batch, length), 3)
    started = time.perf_counter()
    for _ in range(3):
        decoder._step(batch, length)
    torch.cuda.synchronize()
    record["eager_wall_ms"] = round((time.perf_counter() - started) / 3 * 1000, 3)
    return record


def steps(decoder, batches, length: int, label: str, out: dict[str, Any]) -> None:
    out[label] = []
    for batch in batches:
        record = step_figures(decoder, batch, length)
        out[label].append(record)
        print(label, json.dumps(record), flush=True)


def set_kernel(decoder, saved: dict[str, Any] | None):
    """Turn the NF4 kernel off (saved None: returns what it removed) or back on; drops captured graphs."""
    removed = {}
    for name, projection in decoder.projections.items():
        if saved is None:
            removed[name], projection.nf4 = projection.nf4, None
        else:
            projection.nf4 = saved[name]
    decoder.drop_graphs()
    return removed


def matmul_table(decoder, rows_list) -> list[dict[str, Any]]:
    import dataclasses

    import torch

    from lqmf.engine.nf4_kernels import Config

    configs = [Config(64, 128), Config(64, 256), Config(128, 128), Config(32, 256), Config(64, 128, warps=8),
               Config(64, 128, split=1), Config(32, 128)]
    layer = decoder.layers[0].projections
    table = []
    for name in ("q_proj", "k_proj", "gate_proj", "down_proj"):
        projection = layer[name]
        weight = projection.nf4
        flat = weight.code2[weight.absmax.long()] * weight.absmax2.repeat_interleave(weight.blocksize2)[
            :weight.absmax.numel()] + weight.offset
        plain = dataclasses.replace(weight, absmax=flat.float().contiguous(), absmax2=None, code2=None, offset=0.0)
        for rows in rows_list:
            x = (torch.randn(rows, 1, weight.in_features, generator=torch.Generator().manual_seed(rows)) * 0.5).to(
                device=decoder.device, dtype=decoder.dtype)
            reference = projection.base(x).float()
            bnb_us = graphed_us(lambda p=projection, x=x: p.base(x))
            entry: dict[str, Any] = {"proj": name, "rows": rows, "bnb_us": bnb_us}
            for label, variant, config in [*((f"k{c.block_n}x{c.block_k}w{c.warps}s{c.split or 'auto'}", weight, c)
                                             for c in configs), ("plain_absmax_k64x128", plain, Config(64, 128))]:
                try:
                    got = variant.matmul(x, config).float()
                    error = ((got - reference).abs().max() / reference.abs().max()).item()
                    entry[label] = [graphed_us(lambda v=variant, x=x, c=config: v.matmul(x, c)), round(error, 4)]
                except Exception as err:  # noqa: BLE001 - reported
                    entry[label] = f"{type(err).__name__}: {str(err)[:200]}"
            table.append(entry)
            print(json.dumps(entry), flush=True)
    return table


def prefill_figures(decoder) -> dict[str, Any]:
    import torch

    figures = {}
    cases = (("prompt_17", [PROMPT_IDS]), ("prompt_512", [[1, *range(500, 1011)]]),
             ("16_prompts_of_17", [PROMPT_IDS] * 16))
    for label, chunks in cases:
        times = []
        for _ in range(4):
            started = time.perf_counter()
            decoder.prefill(list(range(len(chunks))), chunks, [0] * len(chunks), [1] * len(chunks))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        figures[label + "_ms"] = round(statistics.median(times[1:]) * 1000, 2)
    figures["prompt_17_kernels"] = kernel_profile(lambda: decoder.prefill([0], [PROMPT_IDS], [0], [1]))
    return figures


def scheduler_load(scheduler, entries, clients: int, rounds: int = 2, new_tokens: int = 128) -> dict[str, Any]:
    """clients threads, each submitting rounds requests one after another; where the loop's time goes."""
    from lqmf.engine.scheduler import BatchRequest

    spent = {"prefill": 0.0, "decode": 0.0}
    widths: dict[int, int] = {}
    original_prefill, original_decode = scheduler._prefill, scheduler._decode

    def timed(kind, fn):
        def run(arg):
            started = time.perf_counter()
            try:
                return fn(arg)
            finally:
                spent[kind] += time.perf_counter() - started
                if kind == "decode":
                    widths[max(arg) + 1] = widths.get(max(arg) + 1, 0) + 1
        return run

    scheduler._prefill, scheduler._decode = timed("prefill", original_prefill), timed("decode", original_decode)
    steps_before, graphs_before = scheduler.steps, len(scheduler.decoder.graphs)
    latencies = []

    def client(index: int) -> None:
        for round_index in range(rounds):
            entry = ([None, *entries])[(index + round_index * clients) % (len(entries) + 1)]
            request = scheduler.submit(BatchRequest(list(PROMPT_IDS), new_tokens, entry, min_new_tokens=new_tokens))
            while request.tokens.get() is not None:
                pass
            latencies.append(time.perf_counter() - request.submitted)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    del scheduler._prefill, scheduler._decode
    return {"clients": clients, "wall_s": round(wall, 3),
            "tokens_per_s": round(clients * rounds * new_tokens / wall, 1),
            "median_request_s": round(statistics.median(latencies), 3), "steps": scheduler.steps - steps_before,
            "prefill_s": round(spent["prefill"], 3), "decode_s": round(spent["decode"], 3),
            "other_s": round(wall - spent["prefill"] - spent["decode"], 3),
            "graphs_captured": len(scheduler.decoder.graphs) - graphs_before,
            "decode_widths": dict(sorted(widths.items()))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--kernel-min-rows", type=int, default=1, help="the NF4 kernel from this many rows on")
    args = parser.parse_args()

    import torch

    from lqmf.core.workspace import Workspace
    from lqmf.engine import nf4_kernels
    from lqmf.engine.host import BatchSettings, ModelHost
    from lqmf.engine.loading import quiet_libraries

    os.environ["LQMF_NF4_KERNEL"] = "1"  # built into every projection; set_kernel turns it off and on
    nf4_kernels.MIN_ROWS = args.kernel_min_rows
    quiet_libraries()
    ensure_model()
    scratch = Path(tempfile.mkdtemp(prefix="lqmf-serve-profile-"))
    workspace = Workspace(scratch / "ws")
    names = write_adapters(workspace.root, MODEL_DIR, str(MODEL_DIR), 3, 16, TARGETS, True)
    started = time.perf_counter()
    host = ModelHost.start(workspace, base=str(MODEL_DIR), adapters=names, device="cuda", quantize_4bit=True,
                           batching=BatchSettings(max_batch=32, max_seq_len=512))
    report: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 1), "torch": torch.__version__}
    scheduler = host.scheduler
    decoder = scheduler.decoder
    entries = list(scheduler.entries.values())
    report["nf4_kernel_layers"] = sum(p.nf4 is not None for p in decoder.projections.values())

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=1))

    def section(name: str, fn, inference: bool = True) -> None:
        try:
            if inference:
                with torch.inference_mode():
                    fn()
            else:
                fn()
        except Exception as err:  # noqa: BLE001 - recorded; the next section still runs
            import traceback

            report.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
            print(name, "failed:", err, flush=True)
        save()

    saved: dict[str, Any] = {}

    def without_kernel() -> None:
        saved.update(set_kernel(decoder, None))
        steps(decoder, args.batches, 128, "steps_bnb", report)
        report["replay_kernels_b1_bnb"] = kernel_profile(decoder.graphs[(1, 128)][0].replay)
        report["replay_kernels_b16_bnb"] = kernel_profile(decoder.graphs[(16, 128)][0].replay)
        report["eager_kernels_b16_bnb"] = kernel_profile(lambda: decoder._step(16, 128))
        steps(decoder, [16], 512, "steps_bnb_len512", report)

    def without_adapters() -> None:
        decoder.set_adapters([])
        steps(decoder, [1, 16, 32], 128, "steps_bnb_no_adapters", report)

    def restore() -> None:
        scheduler._restack()
        set_kernel(decoder, saved)

    section("steps_nf4", lambda: steps(decoder, args.batches, 128, "steps_nf4_kernel", report))
    section("kernels_nf4", lambda: report.update(
        replay_kernels_b16_nf4=kernel_profile(decoder.graphs[(16, 128)][0].replay),
        replay_kernels_b1_nf4=kernel_profile(decoder.graphs[(1, 128)][0].replay)))
    section("bnb", without_kernel)
    section("no_adapters", without_adapters)
    section("restore", restore)
    section("prefill", lambda: report.update(prefill=prefill_figures(decoder)))
    section("matmuls", lambda: report.update(matmuls=matmul_table(decoder, [1, 4, 16, 32])))
    for label in ("nf4", "bnb"):
        if label == "bnb":
            section("kernel_off", lambda: set_kernel(decoder, None))
        section(f"warm_{label}", lambda: scheduler_load(scheduler, entries, 32, 1, 130), inference=False)
        section(f"scheduler_{label}", lambda label=label: report.update({f"scheduler_{label}": [
            scheduler_load(scheduler, entries, clients) for clients in (1, 4, 16, 32)]}), inference=False)
        print(json.dumps(report.get(f"scheduler_{label}")), flush=True)
    host.close()


if __name__ == "__main__":
    main()
