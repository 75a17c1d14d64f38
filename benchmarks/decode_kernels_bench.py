"""GPU time of the batched decoder's step with its fused kernels (engine/decode/kernels.py) and with the
torch code they replace (what LQMF_DECODE_KERNELS=0 runs), side by side in one process (diagnostic,
not a test).

A random Mistral-7B-shaped model (32 layers, hidden 4096, GQA 32/8, window 4096) in bfloat16, not
4-bit, so only torch, transformers and Triton are needed on the GPU machine; the step's matmuls are
the same either way, so the difference is the norms, rotary, cache writes, attention and SiLU * up.
For each batch bucket and length bucket, on three paths (the kernels with attention through tl.dot,
the kernels with attention by multiply-adds: `kernels.ATTENTION_DOT`, and torch): the GPU time of
one CUDA-graph replay (CUDA events), the kernels of one replay by category (torch.profiler) and the
largest logit difference from the torch path relative to the largest logit; the JSON is rewritten
after each (batch, length), so a run cut short keeps what it measured. benchmarks/serve_profile.py
measures the real 4-bit server: run it twice, with LQMF_DECODE_KERNELS=0 and without, to compare.

    PYTHONPATH=src:benchmarks python3 benchmarks/decode_kernels_bench.py --out $OUT/decode-kernels.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

from serve_profile import events_ms, kernel_profile

PATHS = ("fused", "fused-fma", "torch")


def build_decoder(layers: int, slots: int, max_len: int):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from lqmf.engine.decode.batched import BatchedDecoder

    config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                           sliding_window=4096)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = MistralForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return BatchedDecoder(model, slots=slots, max_len=max_len)


def measure(decoder, path: str, batch: int, length: int, repeats: int) -> dict[str, Any]:
    """Capture the step for (batch, length) on path ("fused": the kernels, attention through tl.dot;
    "fused-fma": attention by multiply-adds; "torch") and time its replay; rows end at length."""
    from lqmf.engine.decode import kernels

    decoder.kernels = path != "torch"
    kernels.ATTENTION_DOT = path != "fused-fma"
    decoder.drop_graphs()
    positions = [length - 1 - 3 * row for row in range(batch)]
    step = decoder.decode(list(range(100, 100 + batch)), positions, [0] * batch)
    logits = step.logits.float().clone()
    assert (batch, length, False) in decoder.graphs, f"{path}: the step was not captured (see the warning logged)"
    graph = decoder.graphs[(batch, length, False)][0]
    return {"path": path, "batch": batch, "length": length, "replay_ms": events_ms(graph.replay, repeats),
            "profile": kernel_profile(graph.replay), "logits": logits}


def main() -> None:
    import torch
    import triton

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--lengths", default="128,1024")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    batches, lengths = [int(b) for b in args.batches.split(",")], [int(n) for n in args.lengths.split(",")]
    started = time.perf_counter()
    decoder = build_decoder(args.layers, max(batches), max(lengths))
    assert decoder.kernels, "the fused kernels are off (Triton missing or LQMF_DECODE_KERNELS=0)"
    rows: list[dict[str, Any]] = []
    report = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "python": platform.python_version(), "layers": args.layers,
              "dtype": "bfloat16", "rows": rows}
    with torch.inference_mode():
        for batch in batches:
            for length in lengths:
                runs = {path: measure(decoder, path, batch, length, args.repeats) for path in PATHS}
                expected = runs["torch"]["logits"]
                for run in runs.values():
                    worst = (run.pop("logits") - expected).abs().amax(-1) / expected.abs().amax(-1)
                    run["worst_logit_difference"] = round(float(worst.max()), 5)
                    run["speedup_over_torch"] = round(runs["torch"]["replay_ms"] / run["replay_ms"], 3)
                rows.append({"batch": batch, "length": length, "runs": runs})
                print(f"batch {batch:3d} x {length:5d}: " + "; ".join(
                    f"{path} {run['replay_ms']:.3f} ms ({run['profile']['kernels']} kernels, logits within "
                    f"{run['worst_logit_difference']})" for path, run in runs.items())
                    + f"  [{time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
                with open(args.out, "w", encoding="utf-8") as out:
                    json.dump(report, out, indent=1)

if __name__ == "__main__":
    main()
