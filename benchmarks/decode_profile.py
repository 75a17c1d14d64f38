"""Where batch-1 decoding time goes, with the base and with an adapter (GPU diagnostic, not a test).

Loads the 4-bit Mistral-7B-shaped model of benchmarks/gpu_train_bench.py in the model host of
`lqmf serve` with one random r=16 q/k/v/o adapter (benchmarks/serve_bench.py writes it), then for
each LoRA execution variant:

  - times 200 replays of the captured one-token CUDA graph with CUDA events: the GPU's time per
    token, without the host's per-token work (sampling, streaming);
  - profiles one eager step: kernels launched and their GPU time, the top kernels by time.

Variants: `side` (the shipped lean forward: LoRA GEMMs on a side stream, q_proj computing k/v's),
`inline` (the same GEMMs on the main stream), `peft` (PEFT's own LoRA forward). Run on the GPU machine:

    PYTHONPATH=src:benchmarks python3 benchmarks/decode_profile.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gpu_train_bench import MODEL_DIR, ensure_model
from serve_bench import PROMPT, write_adapters


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

    with torch.inference_mode():
        decoder._step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder._step()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    totals: dict[str, list[float]] = {}
    for event in kernels:
        totals.setdefault(event.name[:90], []).append(event.time_range.elapsed_us())
    ranked = sorted(totals.items(), key=lambda item: -sum(item[1]))[:top]
    return {"kernels": len(kernels), "kernel_ms": round(sum(e.time_range.elapsed_us() for e in kernels) / 1000, 3),
            "top": [{"kernel": name, "count": len(times), "total_us": round(sum(times), 1)} for name, times in ranked]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--variants", nargs="+", default=["side", "inline", "peft"], choices=["side", "inline", "peft"],
                        help="LoRA execution variants to measure, in this order (peft must come last)")
    args = parser.parse_args()
    from lqmf.core.workspace import Workspace
    from lqmf.engine import inference
    from lqmf.engine.fastgen import adapter_key
    from lqmf.engine.host import ModelHost

    ensure_model()
    workspace = Workspace(Path(tempfile.mkdtemp(prefix="lqmf-profile-")))
    names = write_adapters(workspace.root, MODEL_DIR, str(MODEL_DIR), 1, 16, ["q_proj", "k_proj", "v_proj", "o_proj"],
                           True)
    host = ModelHost.start(workspace, base=str(MODEL_DIR), adapters=names, device="cuda", quantize_4bit=True)
    model = host.model
    ids = inference.prompt_ids(model, PROMPT)
    results: dict[str, Any] = {}
    for variant in args.variants:
        model.decoder = None
        inference.generate(model, ids, max_new_tokens=4)  # builds the decoder (and lean layers)
        if variant == "inline":
            for layer in model.decoder.lora_layers:
                layer.__dict__.pop("_side_stream", None)
            model.decoder.graphs.clear()
        if variant == "peft":
            for layer in model.decoder.lora_layers:
                layer.forward = layer._peft_forward
            model.decoder.graphs.clear()
        rows = {}
        for label, slot in (("base", None), ("adapter", host.resident[names[0]].slot)):
            with inference.adapter_context(model, slot):
                inference.generate(model, ids, max_new_tokens=4)  # captures this adapter set's graph
                graph = model.decoder.graphs[adapter_key(model.decoder.lora_layers)][0]
                rows[label] = {"graph_ms_per_token": round(replay_ms(graph, args.repeats), 4),
                               **eager_profile(model.decoder, args.top)}
        rows["graph_slowdown_pct"] = round(
            100 * (rows["adapter"]["graph_ms_per_token"] / rows["base"]["graph_ms_per_token"] - 1), 2)
        results[variant] = rows
        print(variant, json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                                                                         if kk != "top"}) for k, v in rows.items()}),
              flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
