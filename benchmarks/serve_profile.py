"""Where a batched decode step of `lqmf serve` spends its time on the GPU (diagnostic, not a test).

Loads the 4-bit Mistral-7B-shaped model of benchmarks/gpu_train_bench.py in the real model host
(engine/serve/host.py, continuous batching, three random r=16 q/k/v/o adapters resident) and measures:

- per batch bucket: whether the decode step's CUDA graph is captured, the capture time, the GPU
  time of one replay (CUDA events), the wall time of one `decode()` call as the scheduler makes it
  (with the argmax and copy back), and one eager step; also without adapters (the per-row LoRA's share);
- the kernels of one replay (and one eager step) by category (torch.profiler);
- prefill of a short prompt, a 512-token prompt and 16 short prompts in one pass;
- the scheduler in process (no HTTP): C client threads x 2 requests of 128 tokens, the time in
  prefill, in decode steps and elsewhere.

    PYTHONPATH=src:benchmarks python3 benchmarks/serve_profile.py --out $OUT/profile.json [--scheduler-only]

(Commit 695468a/a16c91d's NF4 Triton kernels were timed with earlier versions of this script:
docs/measurements/h200-serve-profile-2.json.)
"""

from __future__ import annotations

import argparse
import json
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
    for key, label in (("rms_norm_kernel", "fused_norm"), ("rotary_write", "fused_rotary_kv"),
                       ("attention_split", "fused_attention"), ("attention_combine", "fused_attention"),
                       ("silu_mul", "fused_silu_mul"), ("dequant", "bnb_dequantize"), ("gemv_4bit", "bnb_gemv"),
                       ("kgemm_4bit", "bnb_gemv"),
                       ("softmax", "attention_softmax"), ("gemm", "gemm"),
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
    key = (batch, length, False)  # a greedy step
    record: dict[str, Any] = {"batch": batch, "length": length, "graph": key in decoder.graphs,
                              "capture_failed": key in decoder.failed, "first_call_s": round(capture_s, 3)}
    if key in decoder.graphs:
        record["replay_ms"] = events_ms(decoder.graphs[key][0].replay, 30)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        decoder.decode(tokens, positions, rows).greedy()
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


def host_profile(work, repeats: int = 3) -> list[str]:
    """Where the host's time goes in repeats calls of work (cProfile, after one unprofiled call): the
    40 functions that spend the most time themselves."""
    import cProfile
    import io
    import pstats

    import torch

    work()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        work()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    return text.getvalue().splitlines()


def scheduler_load(scheduler, entries, clients: int, rounds: int = 2, new_tokens: int = 128) -> dict[str, Any]:
    """clients threads, each submitting rounds requests one after another; where the loop's time goes."""
    from lqmf.engine.serve.scheduler import BatchRequest

    spent = {"prefill": 0.0, "decode": 0.0}
    widths: dict[int, int] = {}
    originals = scheduler._prefill, scheduler._decode_ahead, scheduler._decode_on_host

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

    scheduler._prefill = timed("prefill", originals[0])
    scheduler._decode_ahead, scheduler._decode_on_host = timed("decode", originals[1]), timed("decode", originals[2])
    steps_before, graphs_before = scheduler.steps, len(scheduler.decoder.graphs)
    ahead_before = scheduler.steps_ahead
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
    del scheduler._prefill, scheduler._decode_ahead, scheduler._decode_on_host
    return {"clients": clients, "wall_s": round(wall, 3),
            "tokens_per_s": round(clients * rounds * new_tokens / wall, 1),
            "median_request_s": round(statistics.median(latencies), 3), "steps": scheduler.steps - steps_before,
            "steps_ahead": scheduler.steps_ahead - ahead_before,
            "prefill_s": round(spent["prefill"], 3), "decode_s": round(spent["decode"], 3),
            "other_s": round(wall - spent["prefill"] - spent["decode"], 3),
            "graphs_captured": len(scheduler.decoder.graphs) - graphs_before,
            "decode_widths": dict(sorted(widths.items()))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--scheduler-only", action="store_true", help="only the in-process scheduler runs")
    parser.add_argument("--no-scheduler", action="store_true", help="skip the in-process scheduler runs")
    args = parser.parse_args()

    import torch

    from lqmf.core.workspace import Workspace
    from lqmf.engine.loading import quiet_libraries
    from lqmf.engine.serve.host import BatchSettings, ModelHost

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

    def graphs_and_kernels() -> None:
        steps(decoder, args.batches, 128, "steps", report)
        report["replay_kernels_b1"] = kernel_profile(decoder.graphs[(1, 128, False)][0].replay)
        report["replay_kernels_b16"] = kernel_profile(decoder.graphs[(16, 128, False)][0].replay)
        report["eager_kernels_b16"] = kernel_profile(lambda: decoder._step(16, 128))
        steps(decoder, [16], 512, "steps_len512", report)

    def without_adapters() -> None:
        decoder.set_adapters([])
        steps(decoder, [1, 16, 32], 128, "steps_no_adapters", report)
        scheduler._build_tables()

    if not args.scheduler_only:
        section("steps", graphs_and_kernels)
        section("no_adapters", without_adapters)
        section("prefill", lambda: report.update(prefill=prefill_figures(decoder)))
        section("host_prefill", lambda: report.update(
            host_prefill_17=host_profile(lambda: decoder.prefill([0], [PROMPT_IDS], [0], [1]))))
        section("host_step", lambda: report.update(host_step_b16=host_profile(lambda: decoder._step(16, 128))))
    if args.no_scheduler:
        host.close()
        return
    section("warm", lambda: scheduler_load(scheduler, entries, 32, 1, 130), inference=False)
    section("scheduler", lambda: report.update(scheduler=[scheduler_load(scheduler, entries, clients)
                                                          for clients in (1, 4, 16, 32)]), inference=False)
    print(json.dumps(report.get("scheduler")), flush=True)
    host.close()


if __name__ == "__main__":
    main()
