"""GPU time of the batched decoder's step with its fused kernels (engine/decode/kernels.py) and with the
torch code they replace (what LQMF_DECODE_KERNELS=0 runs), side by side in one process (diagnostic,
not a test).

A random Mistral-7B-shaped model (32 layers, hidden 4096, GQA 32/8, window 4096) in bfloat16, not
4-bit, so only torch, transformers and Triton are needed on the GPU machine; the step's matmuls are
the same either way, so the difference is the norms, rotary, cache writes, attention and SiLU * up.
For each batch bucket and length bucket: the GPU time of one CUDA-graph replay (CUDA events), the
kernels of one replay by category (torch.profiler) and the largest logit difference between the two
paths relative to the largest logit. benchmarks/serve_profile.py measures the real 4-bit server;
run it twice, with LQMF_DECODE_KERNELS=0 and without, for that comparison.

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


def measure(decoder, kernels: bool, batch: int, length: int, repeats: int) -> dict[str, Any]:
    """Capture the step for (batch, length) on the chosen path and time its replay; rows end at length."""
    decoder.kernels = kernels
    decoder.drop_graphs()
    positions = [length - 1 - 3 * row for row in range(batch)]
    step = decoder.decode(list(range(100, 100 + batch)), positions, [0] * batch)
    logits = step.logits.float().clone()
    graph = decoder.graphs[(batch, length)][0]
    return {"kernels": kernels, "batch": batch, "length": length, "replay_ms": events_ms(graph.replay, repeats),
            "profile": kernel_profile(graph.replay), "logits": logits}


def main() -> None:
    import torch
    import triton

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--lengths", default="128,1024")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    batches, lengths = [int(b) for b in args.batches.split(",")], [int(n) for n in args.lengths.split(",")]
    started = time.perf_counter()
    decoder = build_decoder(args.layers, max(batches), max(lengths))
    assert decoder.kernels, "the fused kernels are off (Triton missing or LQMF_DECODE_KERNELS=0)"
    rows = []
    with torch.inference_mode():
        for batch in batches:
            for length in lengths:
                fused, plain = (measure(decoder, on, batch, length, args.repeats) for on in (True, False))
                worst = (fused.pop("logits") - plain["logits"]).abs().amax(-1) / plain.pop("logits").abs().amax(-1)
                row = {"batch": batch, "length": length, "fused": fused, "torch": plain,
                       "speedup": round(plain["replay_ms"] / fused["replay_ms"], 3),
                       "worst_logit_difference": round(float(worst.max()), 5)}
                rows.append(row)
                print(f"batch {batch:3d} x {length:5d}: fused {fused['replay_ms']:.3f} ms "
                      f"({fused['profile']['kernels']} kernels), torch {plain['replay_ms']:.3f} ms "
                      f"({plain['profile']['kernels']} kernels), logits within {row['worst_logit_difference']}"
                      f"  [{time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
    report = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "python": platform.python_version(), "layers": args.layers,
              "dtype": "bfloat16", "rows": rows}
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
