"""Where batch-1 decoding time goes, with the base and with an adapter (GPU diagnostic, not a test).

Loads the 4-bit Mistral-7B-shaped model of benchmarks/gpu_train_bench.py in the model host of
`lqmf serve` with one random r=16 q/k/v/o adapter (benchmarks/serve_bench.py writes it), then for
each LoRA execution variant:

  - times 200 replays of the captured one-token CUDA graph with CUDA events: the GPU's time per
    token, without the host's per-token work (sampling, streaming);
  - profiles one eager step (eagerly the lean forward runs the LoRA products in line, as for a
    prompt): kernels launched and their GPU time, the top kernels by time;
  - times the prompt (eager) up to the first token, the median of 10.

Variants: `side-triton` is what ships (the lean forward's LoRA products on a side stream, by the
Triton kernels of engine/lora/kernels.py, q_proj computing k/v's and passing theirs as their 4-bit
GEMV's bias; the decoder's attention backends); `inline-*` runs the products on the main stream,
`*-cublas` with cuBLAS GEMMs, `*-cudnn` lets SDPA use cuDNN; `peft` is PEFT's own LoRA forward.
For the lean variants it also compares one eager decode step's logits with PEFT's forward. Run on
the GPU machine:

    PYTHONPATH=src:benchmarks python3 benchmarks/decode_profile.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from gpu_train_bench import MODEL_DIR, ensure_model
from serve_bench import PROMPT, write_adapters


def _variants() -> dict[str, dict[str, Any]]:
    """{name: setup}: LoRA products on a side stream or in line, by the Triton kernels or cuBLAS, with the
    decoder's attention backends or with cuDNN's allowed (PyTorch's default); and PEFT's forward."""
    from torch.nn.attention import SDPBackend

    cudnn = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    variants = {}
    for stream in ("side", "inline"):
        for kernels in ("triton", "cublas"):
            for attention in ("", "-cudnn"):
                variants[f"{stream}-{kernels}{attention}"] = {
                    "side": stream == "side", "kernels": kernels == "triton",
                    "attention": cudnn if attention else "default"}
    variants["peft"] = {"side": False, "kernels": False, "attention": "default"}
    return variants


VARIANTS = _variants()


def replay_ms(graph, repeats: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def eager_profile(decoder, top: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lqmf.engine.lora.lean import adapter_key

    key = adapter_key(decoder.lora_layers)
    with torch.inference_mode():
        decoder._step(key)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder._step(key)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    totals: dict[str, list[float]] = {}
    for event in kernels:
        totals.setdefault(event.name[:90], []).append(event.time_range.elapsed_us())
    ranked = sorted(totals.items(), key=lambda item: -sum(item[1]))[:top]
    return {"kernels": len(kernels), "kernel_ms": round(sum(e.time_range.elapsed_us() for e in kernels) / 1000, 3),
            "top": [{"kernel": name, "count": len(times), "total_us": round(sum(times), 1)} for name, times in ranked]}


def graph_trace(graph, path: Path) -> None:
    """A Chrome trace of one replay of graph: its kernels, per stream, with GPU start and end times."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))


@contextlib.contextmanager
def cache_kept(decoder):
    """Undo the cache advance of the steps and replays inside (each writes one token into the static cache)."""
    import torch

    lengths = [layer.cumulative_length.clone() for layer in decoder.cache.layers]
    try:
        yield
    finally:
        with torch.inference_mode():
            for layer, length in zip(decoder.cache.layers, lengths, strict=True):
                layer.cumulative_length.copy_(length)


def lean_vs_peft(model, decoder) -> dict[str, Any]:
    """One eager decode step with the lean LoRA forward and with PEFT's own: how far their logits are apart."""
    import torch

    from lqmf.engine.lora.lean import adapter_key

    key = adapter_key(decoder.lora_layers)
    with torch.inference_mode():
        with cache_kept(decoder):
            lean = decoder._step(key).float()
        for layer in decoder.lean_layers:
            layer.lean.enabled = False  # PEFT's own forward
        try:
            with cache_kept(decoder):
                reference = decoder._step(key).float()
        finally:
            for layer in decoder.lean_layers:
                layer.lean.enabled = True
    return {"max_abs_logit_diff": round(float((lean - reference).abs().max()), 5),
            "logit_scale": round(float(reference.abs().max()), 3),
            "same_argmax": bool(lean.argmax() == reference.argmax())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--trace", action="store_true",
                        help="also save a kernel trace of one replay of the first variant's graphs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=sorted(VARIANTS), help="variants to measure, in this order (peft must come last)")
    args = parser.parse_args()
    from lqmf.core.workspace import Workspace
    from lqmf.engine import inference
    from lqmf.engine.lora.lean import adapter_key, lean_state
    from lqmf.engine.serve.host import BatchSettings, ModelHost

    ensure_model()
    workspace = Workspace(Path(tempfile.mkdtemp(prefix="lqmf-profile-")))
    names = write_adapters(workspace.root, MODEL_DIR, str(MODEL_DIR), 1, 16, ["q_proj", "k_proj", "v_proj", "o_proj"],
                           True)
    host = ModelHost.start(workspace, base=str(MODEL_DIR), adapters=names, device="cuda", quantize_4bit=True,
                           batching=BatchSettings(enabled=False))  # the single-stream decoder on PEFT slots
    model = host.model
    ids = inference.prompt_ids(model, PROMPT)
    results: dict[str, Any] = {}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    side_stream = None
    for variant in args.variants:
        setup = VARIANTS[variant]
        os.environ["LQMF_LORA_KERNELS"] = "1" if setup["kernels"] else "0"
        model.decoder = None
        inference.generate(model, ids, max_new_tokens=4)  # builds the decoder (and lean layers)
        for layer in model.decoder.lean_layers:
            state = lean_state(layer)
            side_stream = side_stream or state.side_stream
            state.side_stream = side_stream if setup["side"] else None
            if variant == "peft":
                state.enabled = False  # PEFT's own forward
        if setup["attention"] != "default":
            model.decoder.lora_attention_backends = setup["attention"]
        model.decoder.graphs.clear()
        model.decoder.pool = None  # the cleared graphs' memory pool
        rows = {}
        for label, slot in (("base", None), ("adapter", host.resident[names[0]].slot)):
            with inference.adapter_context(model, slot):
                inference.generate(model, ids, max_new_tokens=4)  # captures this adapter set's graph
                key = adapter_key(model.decoder.lora_layers)
                if key not in model.decoder.graphs:
                    raise SystemExit(f"{variant}/{label}: the CUDA graph capture failed")
                graph = model.decoder.graphs[key][0]
                prefill = [model.decoder.generate(ids, 1).first_token_seconds for _ in range(10)]
                with cache_kept(model.decoder):
                    rows[label] = {"graph_ms_per_token": round(replay_ms(graph, args.repeats), 4),
                                   "prompt_to_first_token_ms": round(1000 * statistics.median(prefill), 2)}
                with cache_kept(model.decoder):
                    rows[label].update(eager_profile(model.decoder, args.top))
                if args.trace and variant == args.variants[0]:
                    with cache_kept(model.decoder):
                        graph_trace(graph, Path(args.out) / f"trace-{variant}-{label}.json")
                if label == "adapter" and variant != "peft":
                    rows["lean_vs_peft"] = lean_vs_peft(model, model.decoder)
        rows["graph_slowdown_pct"] = round(
            100 * (rows["adapter"]["graph_ms_per_token"] / rows["base"]["graph_ms_per_token"] - 1), 2)
        results[variant] = rows
        print(variant, json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                                                                         if kk != "top"}) for k, v in rows.items()}),
              flush=True)
    (Path(args.out) / "decode_profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
